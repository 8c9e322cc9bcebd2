//! The tool's own reading of the time windows: from the server's `welcome`, it predicts whether
//! each message must be accepted or rejected, judged by the local time of the client at send.

use chrono::{DateTime, Timelike, Utc};
use chrono_tz::Tz;
use kaiwa_protocol::MessageType;
use kaiwa_protocol::native::WindowInfo;
use std::time::Duration;

const DAY: u32 = 24 * 60 * 60;

/// What the server must answer to a message, by its window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expectation {
    Accept,
    Reject,
    /// Sent so close to a window's edge that the server's clock, read an instant later, may
    /// judge either way.
    Either,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    #[error("the server's window {0:?} is not HH:MM")]
    Time(String),
    #[error("the server's welcome has no window for {0}")]
    Missing(MessageType),
}

/// A daily window of local time: `start` inclusive, `end` exclusive, in seconds after midnight.
/// An end before the start runs over midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    start: u32,
    end: u32,
}

impl Window {
    pub fn new(start: u32, end: u32) -> Self {
        Self { start, end }
    }

    fn parse_time(text: &str) -> Result<u32, WindowError> {
        let bad = || WindowError::Time(text.to_owned());
        let mut parts = text.split(':');
        let hours: u32 = parts.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
        let minutes: u32 = parts.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
        let seconds: u32 = match parts.next() {
            Some(s) => s.parse().map_err(|_| bad())?,
            None => 0,
        };
        let total = hours * 3600 + minutes * 60 + seconds;
        if minutes > 59 || seconds > 59 || total > DAY {
            return Err(bad());
        }
        Ok(total)
    }

    pub fn from_info(info: &WindowInfo) -> Result<Self, WindowError> {
        Ok(Self {
            start: Self::parse_time(&info.start)?,
            end: Self::parse_time(&info.end)?,
        })
    }

    fn always(self) -> bool {
        self.start == 0 && self.end == DAY
    }

    pub fn contains(self, t: u32) -> bool {
        if self.start <= self.end {
            (self.start..self.end).contains(&t)
        } else {
            t >= self.start || t < self.end
        }
    }

    /// Whether `t` is within `margin` seconds of an edge, counting around midnight.
    fn near_edge(self, t: u32, margin: u32) -> bool {
        if self.always() {
            return false;
        }
        let distance = |edge: u32| {
            let edge = edge % DAY;
            let d = t.abs_diff(edge);
            d.min(DAY - d)
        };
        distance(self.start) <= margin || distance(self.end) <= margin
    }
}

/// The windows of all four message types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Windows {
    text: Window,
    voice: Window,
    video: Window,
    image: Window,
    /// How close to an edge a send may be and still be judged either way.
    margin: u32,
}

/// Client and server read their clocks at slightly different instants.
pub const EDGE_MARGIN: Duration = Duration::from_secs(2);

impl Default for Windows {
    /// kaiwa's defaults (R5), for when no `welcome` says otherwise.
    fn default() -> Self {
        Self {
            text: Window::new(5 * 3600, DAY),
            voice: Window::new(8 * 3600, 12 * 3600),
            video: Window::new(20 * 3600, DAY),
            image: Window::new(0, DAY),
            margin: EDGE_MARGIN.as_secs() as u32,
        }
    }
}

impl Windows {
    /// The windows a `welcome` announced.
    pub fn from_welcome(infos: &[WindowInfo]) -> Result<Self, WindowError> {
        let find = |kind: MessageType| {
            infos
                .iter()
                .find(|info| info.message_type == kind)
                .ok_or(WindowError::Missing(kind))
                .and_then(Window::from_info)
        };
        Ok(Self {
            text: find(MessageType::Text)?,
            voice: find(MessageType::Voice)?,
            video: find(MessageType::Video)?,
            image: find(MessageType::Image)?,
            ..Self::default()
        })
    }

    pub fn get(&self, kind: MessageType) -> Window {
        match kind {
            MessageType::Text => self.text,
            MessageType::Voice => self.voice,
            MessageType::Video => self.video,
            MessageType::Image => self.image,
        }
    }

    /// What the server must answer to a `kind` message sent at `at` by a client in `tz`.
    pub fn expect(&self, kind: MessageType, tz: Tz, at: DateTime<Utc>) -> Expectation {
        let window = self.get(kind);
        let local = at.with_timezone(&tz).num_seconds_from_midnight();
        if window.near_edge(local, self.margin) {
            Expectation::Either
        } else if window.contains(local) {
            Expectation::Accept
        } else {
            Expectation::Reject
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(tz: Tz, h: u32, m: u32, s: u32) -> DateTime<Utc> {
        tz.with_ymd_and_hms(2026, 6, 1, h, m, s)
            .single()
            .expect("an unambiguous local time")
            .with_timezone(&Utc)
    }

    #[test]
    fn messages_inside_and_outside_their_window_are_predicted_by_local_time() {
        let windows = Windows::default();
        let kolkata: Tz = "Asia/Kolkata".parse().expect("known zone");
        assert_eq!(
            windows.expect(MessageType::Voice, kolkata, at(kolkata, 9, 30, 0)),
            Expectation::Accept
        );
        assert_eq!(
            windows.expect(MessageType::Voice, kolkata, at(kolkata, 14, 0, 0)),
            Expectation::Reject
        );
        assert_eq!(
            windows.expect(MessageType::Text, kolkata, at(kolkata, 3, 0, 0)),
            Expectation::Reject
        );
        assert_eq!(
            windows.expect(MessageType::Image, kolkata, at(kolkata, 3, 0, 0)),
            Expectation::Accept
        );
    }

    #[test]
    fn sends_within_two_seconds_of_an_edge_may_go_either_way() {
        let windows = Windows::default();
        let tz: Tz = "Asia/Kathmandu".parse().expect("known zone");
        let voice = |h, m, s| windows.expect(MessageType::Voice, tz, at(tz, h, m, s));
        assert_eq!(voice(7, 59, 57), Expectation::Reject);
        assert_eq!(voice(7, 59, 58), Expectation::Either);
        assert_eq!(voice(8, 0, 2), Expectation::Either);
        assert_eq!(voice(8, 0, 3), Expectation::Accept);
        assert_eq!(voice(11, 59, 59), Expectation::Either);
        // Midnight is the end of the video window, seen from both sides.
        let video = |h, m, s| windows.expect(MessageType::Video, tz, at(tz, h, m, s));
        assert_eq!(video(23, 59, 59), Expectation::Either);
        assert_eq!(video(0, 0, 1), Expectation::Either);
        assert_eq!(video(0, 0, 5), Expectation::Reject);
    }

    #[test]
    fn windows_come_from_the_welcome_and_may_cross_midnight() {
        let infos = vec![
            WindowInfo {
                message_type: MessageType::Text,
                start: "22:00".into(),
                end: "02:00".into(),
            },
            WindowInfo {
                message_type: MessageType::Voice,
                start: "08:00".into(),
                end: "12:00".into(),
            },
            WindowInfo {
                message_type: MessageType::Video,
                start: "20:00".into(),
                end: "24:00".into(),
            },
            WindowInfo {
                message_type: MessageType::Image,
                start: "00:00".into(),
                end: "24:00".into(),
            },
        ];
        let windows = Windows::from_welcome(&infos).expect("valid windows");
        let utc: Tz = "UTC".parse().expect("known zone");
        assert_eq!(
            windows.expect(MessageType::Text, utc, at(utc, 1, 0, 0)),
            Expectation::Accept
        );
        assert_eq!(
            windows.expect(MessageType::Text, utc, at(utc, 12, 0, 0)),
            Expectation::Reject
        );
        assert_eq!(
            Windows::from_welcome(&infos[..3]),
            Err(WindowError::Missing(MessageType::Image))
        );
    }
}
