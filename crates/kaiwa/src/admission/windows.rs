//! Time windows (R5): when each message type is accepted, judged by the server's clock in the
//! client's own timezone.

use chrono::{DateTime, Timelike, Utc};
use chrono_tz::Tz;
use clap::Args;
use kaiwa_protocol::MessageType;
use kaiwa_protocol::native::WindowInfo;
use std::fmt;
use std::str::FromStr;

const DAY: u32 = 24 * 60 * 60;

/// A daily window of local time: `start` inclusive, `end` exclusive, both in seconds after
/// midnight. `end` may be `24:00`; a window whose end is before its start runs over midnight
/// (`22:00-02:00`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    start: u32,
    end: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a window: use HH:MM-HH:MM with times from 00:00 to 24:00, e.g. 05:00-24:00")]
pub struct WindowParseError(String);

impl Window {
    pub const ALWAYS: Window = Window { start: 0, end: DAY };

    pub fn contains(self, seconds_after_midnight: u32) -> bool {
        let t = seconds_after_midnight;
        if self.start <= self.end {
            (self.start..self.end).contains(&t)
        } else {
            t >= self.start || t < self.end
        }
    }

    pub fn is_always(self) -> bool {
        self.start == 0 && self.end == DAY
    }

    fn parse_time(text: &str) -> Option<u32> {
        let mut parts = text.trim().split(':');
        let hours: u32 = parts.next()?.parse().ok()?;
        let minutes: u32 = parts.next()?.parse().ok()?;
        let seconds: u32 = match parts.next() {
            Some(s) => s.parse().ok()?,
            None => 0,
        };
        if parts.next().is_some() || minutes > 59 || seconds > 59 {
            return None;
        }
        let total = hours
            .checked_mul(3600)?
            .checked_add(minutes * 60 + seconds)?;
        (total <= DAY).then_some(total)
    }

    fn format_time(seconds: u32) -> String {
        let (h, m, s) = (seconds / 3600, seconds / 60 % 60, seconds % 60);
        if s == 0 {
            format!("{h:02}:{m:02}")
        } else {
            format!("{h:02}:{m:02}:{s:02}")
        }
    }

    pub fn start_text(self) -> String {
        Self::format_time(self.start)
    }

    pub fn end_text(self) -> String {
        Self::format_time(self.end)
    }
}

impl FromStr for Window {
    type Err = WindowParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = || WindowParseError(text.to_owned());
        let (start, end) = text.split_once('-').ok_or_else(invalid)?;
        let start = Self::parse_time(start).ok_or_else(invalid)?;
        let end = Self::parse_time(end).ok_or_else(invalid)?;
        if start == DAY || start == end {
            return Err(invalid());
        }
        Ok(Self { start, end })
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.start_text(), self.end_text())
    }
}

/// The window of every message type (R5), configurable per type.
#[derive(Debug, Clone, Copy, Args)]
#[command(next_help_heading = "Time windows (local time of the client)")]
pub struct Windows {
    /// When text messages are accepted.
    #[arg(long = "text-window", env = "KAIWA_TEXT_WINDOW", value_name = "HH:MM-HH:MM", default_value = "05:00-24:00", value_parser = parse_window)]
    pub text: Window,
    /// When voice messages are accepted.
    #[arg(long = "voice-window", env = "KAIWA_VOICE_WINDOW", value_name = "HH:MM-HH:MM", default_value = "08:00-12:00", value_parser = parse_window)]
    pub voice: Window,
    /// When video messages are accepted.
    #[arg(long = "video-window", env = "KAIWA_VIDEO_WINDOW", value_name = "HH:MM-HH:MM", default_value = "20:00-24:00", value_parser = parse_window)]
    pub video: Window,
    /// When image messages are accepted (the exercise names no window for images).
    #[arg(long = "image-window", env = "KAIWA_IMAGE_WINDOW", value_name = "HH:MM-HH:MM", default_value = "00:00-24:00", value_parser = parse_window)]
    pub image: Window,
}

impl Default for Windows {
    fn default() -> Self {
        Self {
            text: Window {
                start: 5 * 3600,
                end: DAY,
            },
            voice: Window {
                start: 8 * 3600,
                end: 12 * 3600,
            },
            video: Window {
                start: 20 * 3600,
                end: DAY,
            },
            image: Window::ALWAYS,
        }
    }
}

impl Windows {
    pub fn get(&self, kind: MessageType) -> Window {
        match kind {
            MessageType::Text => self.text,
            MessageType::Voice => self.voice,
            MessageType::Video => self.video,
            MessageType::Image => self.image,
        }
    }

    /// Accepts the message, or says why not in words a person can act on.
    pub fn judge(&self, kind: MessageType, tz: Tz, now: DateTime<Utc>) -> Result<(), String> {
        let window = self.get(kind);
        let local = now.with_timezone(&tz);
        if window.contains(local.num_seconds_from_midnight()) {
            return Ok(());
        }
        let until = if window.end == DAY {
            "midnight".to_owned()
        } else {
            window.end_text()
        };
        let mut noun = kind.as_str().to_owned();
        noun[..1].make_ascii_uppercase();
        Err(format!(
            "{noun} messages are accepted from {} to {until} in your timezone ({}); it is {} there now.",
            window.start_text(),
            tz.name(),
            local.format("%H:%M:%S"),
        ))
    }

    pub fn describe(&self) -> Vec<WindowInfo> {
        MessageType::ALL
            .into_iter()
            .map(|kind| {
                let window = self.get(kind);
                WindowInfo {
                    message_type: kind,
                    start: window.start_text(),
                    end: window.end_text(),
                }
            })
            .collect()
    }
}

/// A window flag's value: `HH:MM-HH:MM`, see [`Window`].
fn parse_window(raw: &str) -> Result<Window, String> {
    raw.parse().map_err(|err| format!("{err}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(tz: Tz, y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> DateTime<Utc> {
        tz.with_ymd_and_hms(y, mo, d, h, mi, s)
            .single()
            .expect("an unambiguous local time")
            .with_timezone(&Utc)
    }

    #[test]
    fn text_window_edges_in_ho_chi_minh() {
        let windows = Windows::default();
        let tz: Tz = "Asia/Ho_Chi_Minh".parse().expect("known zone");
        let judge = |h, m, s| {
            windows
                .judge(MessageType::Text, tz, at(tz, 2026, 11, 21, h, m, s))
                .is_ok()
        };
        assert!(!judge(4, 59, 59));
        assert!(judge(5, 0, 0));
        assert!(judge(23, 59, 59));
        assert!(!judge(0, 0, 0));
    }

    #[test]
    fn voice_and_video_edges_in_a_half_hour_zone() {
        let windows = Windows::default();
        let tz: Tz = "Asia/Kolkata".parse().expect("known zone");
        let judge = |kind, h, m, s| windows.judge(kind, tz, at(tz, 2026, 6, 1, h, m, s)).is_ok();
        assert!(!judge(MessageType::Voice, 7, 59, 59));
        assert!(judge(MessageType::Voice, 8, 0, 0));
        assert!(judge(MessageType::Voice, 11, 59, 59));
        assert!(!judge(MessageType::Voice, 12, 0, 0));
        assert!(!judge(MessageType::Video, 19, 59, 59));
        assert!(judge(MessageType::Video, 20, 0, 0));
        assert!(judge(MessageType::Video, 23, 59, 59));
        assert!(!judge(MessageType::Video, 0, 0, 0));
        assert!(judge(MessageType::Image, 3, 0, 0));
    }

    #[test]
    fn the_same_instant_is_judged_by_local_time_on_both_sides_of_a_dst_change() {
        let windows = Windows::default();
        let london: Tz = "Europe/London".parse().expect("known zone");
        // 07:30 UTC is 07:30 in winter (GMT) but 08:30 in summer (BST).
        let winter = Utc
            .with_ymd_and_hms(2026, 3, 28, 7, 30, 0)
            .single()
            .expect("valid");
        let summer = Utc
            .with_ymd_and_hms(2026, 3, 29, 7, 30, 0)
            .single()
            .expect("valid");
        assert!(windows.judge(MessageType::Voice, london, winter).is_err());
        assert!(windows.judge(MessageType::Voice, london, summer).is_ok());
    }

    #[test]
    fn rejection_reasons_say_when_and_where() {
        let windows = Windows::default();
        let tz: Tz = "Asia/Tokyo".parse().expect("known zone");
        let reason = windows
            .judge(MessageType::Voice, tz, at(tz, 2026, 11, 21, 14, 32, 0))
            .expect_err("voice at 14:32 is refused");
        assert_eq!(
            reason,
            "Voice messages are accepted from 08:00 to 12:00 in your timezone (Asia/Tokyo); it is 14:32:00 there now."
        );
        let reason = windows
            .judge(MessageType::Text, tz, at(tz, 2026, 11, 21, 3, 0, 0))
            .expect_err("text at 03:00 is refused");
        assert!(reason.contains("from 05:00 to midnight"), "{reason}");
    }

    #[test]
    fn windows_parse_and_may_cross_midnight() {
        let overnight: Window = "22:00-02:00".parse().expect("valid");
        assert!(overnight.contains(23 * 3600));
        assert!(overnight.contains(3600));
        assert!(!overnight.contains(12 * 3600));
        assert_eq!(
            "05:00-24:00".parse::<Window>().map(|w| w.to_string()),
            Ok("05:00-24:00".into())
        );
        assert!("00:00-24:00".parse::<Window>().is_ok_and(Window::is_always));
        for bad in [
            "1193047:00-24:00",
            "",
            "5-6",
            "08:00",
            "08:00-08:00",
            "24:00-01:00",
            "08:60-09:00",
            "07:00-25:00",
        ] {
            assert!(bad.parse::<Window>().is_err(), "{bad} should not parse");
        }
    }
}
