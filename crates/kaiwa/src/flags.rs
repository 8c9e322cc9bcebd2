//! Flag values that more than one module reads, parsed here, below all of them: seconds,
//! secrets that are never printed, and the origins and host names of `--cors-origin` and
//! `--allowed-host`, which auth checks at start and the HTTP layer applies.

use axum::http::HeaderValue;
use std::ops::RangeInclusive;
use std::time::Duration;

/// A flag value that is not what its flag takes.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FlagError {
    #[error("--cors-origin {0:?} is not an origin: use scheme://host[:port], or *")]
    CorsOrigin(String),
    #[error(
        "--allowed-host {0:?} is not a host name: use a name such as chat.example.com, without scheme or port"
    )]
    AllowedHost(String),
}

/// Seconds as a decimal number (`0.5`, `20`), at least a millisecond and at most a day.
pub(crate) fn parse_seconds(raw: &str) -> Result<Duration, String> {
    parse_seconds_within(raw, 0.001..=86_400.0)
}

/// Seconds as a decimal number within `range`, for flags with bounds of their own.
pub(crate) fn parse_seconds_within(
    raw: &str,
    range: RangeInclusive<f64>,
) -> Result<Duration, String> {
    let seconds: f64 = raw
        .trim()
        .parse()
        .map_err(|_| format!("{raw:?} is not a number of seconds"))?;
    if !range.contains(&seconds) {
        return Err(format!(
            "{raw} s is out of range: use {} to {} seconds",
            range.start(),
            range.end()
        ));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// A value that must never be printed: `Debug` and `Display` show `[redacted]`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

/// The origins allowed by `--cors-origin`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Origins {
    /// None given.
    Default,
    /// `*`: any origin, asked for explicitly.
    Any,
    List(Vec<HeaderValue>),
}

impl Origins {
    pub(crate) fn allows(&self, origin: &str) -> bool {
        match self {
            Self::Default => false,
            Self::Any => true,
            Self::List(list) => list.iter().any(|allowed| allowed == origin),
        }
    }
}

/// Reads the `--cors-origin` values: `*`, or origins as a browser sends them
/// (`scheme://host[:port]`, no path).
pub(crate) fn origins(values: &[String]) -> Result<Origins, FlagError> {
    let values: Vec<&str> = values
        .iter()
        .map(|value| value.trim())
        .filter(|value| !value.is_empty())
        .collect();
    if values.is_empty() {
        return Ok(Origins::Default);
    }
    if values.contains(&"*") {
        return Ok(Origins::Any);
    }
    values
        .into_iter()
        .map(|value| {
            let origin = value.strip_suffix('/').unwrap_or(value);
            let well_formed = origin.split_once("://").is_some_and(|(scheme, host)| {
                !scheme.is_empty()
                    && scheme
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
                    && !host.is_empty()
                    && !host.contains(['/', '?', '#', ' ', '*'])
            });
            well_formed
                .then(|| HeaderValue::from_str(origin).ok())
                .flatten()
                .ok_or_else(|| FlagError::CorsOrigin(value.chars().take(100).collect()))
        })
        .collect::<Result<_, _>>()
        .map(Origins::List)
}

/// Reads `--allowed-host`: host names as a `Host` header carries them, without the port.
pub(crate) fn hosts(values: &[String]) -> Result<Vec<String>, FlagError> {
    values
        .iter()
        .map(|value| value.trim())
        .filter(|value| !value.is_empty())
        .map(|value| {
            let plain = value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || ".-_".contains(c));
            plain
                .then(|| value.to_ascii_lowercase())
                .ok_or_else(|| FlagError::AllowedHost(value.chars().take(100).collect()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(values: &[&str]) -> Result<Origins, FlagError> {
        origins(&values.iter().map(|v| v.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn origins_are_read_as_a_browser_sends_them() {
        assert_eq!(list(&[]).ok(), Some(Origins::Default));
        assert_eq!(list(&["*"]).ok(), Some(Origins::Any));
        assert_eq!(
            list(&["https://chat.example.com", "http://localhost:3000/"]).ok(),
            Some(Origins::List(vec![
                HeaderValue::from_static("https://chat.example.com"),
                HeaderValue::from_static("http://localhost:3000"),
            ]))
        );
        for bad in [
            "chat.example.com",
            "https://",
            "https://a.example/path",
            "https://*.example",
        ] {
            assert!(list(&[bad]).is_err(), "{bad}");
        }
    }
}
