//! Validating newtypes for what a client says about itself: its id and its timezone.

use chrono_tz::Tz;
use std::fmt;
use std::sync::Arc;

/// A client's id: 1–128 bytes of letters, digits and `-` `_` `.` `~` `@` `+` `:` `=`, not
/// starting with a dot. It appears as one segment of URL paths (`/chat-history/{id}`), so it can
/// be neither a path segment of its own (`.`, `..`), nor hold a separator (`/`, `\`), an escape
/// (`%`), a space or a control character: every HTTP client then reaches the same history.
///
/// Cheap to clone: it is copied into every job, event and registry entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId(Arc<str>);

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ClientIdError {
    #[error("client_id is required")]
    Missing,
    #[error("client_id must be at most {} bytes", ClientId::MAX_LEN)]
    TooLong,
    #[error(
        "client_id may hold only letters, digits and - _ . ~ @ + : = (no spaces, slashes, backslashes, % or control characters)"
    )]
    BadCharacter,
    #[error("client_id must not start with a dot")]
    LeadingDot,
}

impl ClientId {
    pub const MAX_LEN: usize = 128;

    /// Checks an id a client introduces itself with.
    pub fn parse(raw: &str) -> Result<Self, ClientIdError> {
        let id = Self::bounded(raw)?;
        if !id
            .chars()
            .all(|c| c.is_alphanumeric() || "-_.~@+:=".contains(c))
        {
            return Err(ClientIdError::BadCharacter);
        }
        if id.starts_with('.') {
            return Err(ClientIdError::LeadingDot);
        }
        Ok(Self(id.into()))
    }

    /// An id read back from the store, or named in a history request: held to the rules ids
    /// were stored under before the current ones (no control characters, no `/`), so that
    /// clients stored then stay readable.
    pub fn parse_stored(raw: &str) -> Result<Self, ClientIdError> {
        let id = Self::bounded(raw)?;
        if id.chars().any(|c| c.is_control() || c == '/') {
            return Err(ClientIdError::BadCharacter);
        }
        Ok(Self(id.into()))
    }

    fn bounded(raw: &str) -> Result<&str, ClientIdError> {
        let id = raw.trim();
        if id.is_empty() {
            return Err(ClientIdError::Missing);
        }
        if id.len() > Self::MAX_LEN {
            return Err(ClientIdError::TooLong);
        }
        Ok(id)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// As text; read back with the rules of stored ids, since it comes from kaiwa itself (a queue).
impl serde::Serialize for ClientId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for ClientId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        Self::parse_stored(&raw).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An IANA timezone known to the tz database kaiwa was built with. An unknown name is an error,
/// never a silent fallback to UTC (R3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timezone(Tz);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimezoneError {
    #[error("timezone is required (an IANA name such as Asia/Ho_Chi_Minh)")]
    Missing,
    #[error("unknown timezone {0:?}: expected an IANA name such as Asia/Ho_Chi_Minh or UTC")]
    Unknown(String),
}

impl Timezone {
    /// Accepts the exact IANA name, or the same name in another letter case, and keeps the
    /// canonical spelling.
    pub fn parse(raw: &str) -> Result<Self, TimezoneError> {
        let name = raw.trim();
        if name.is_empty() {
            return Err(TimezoneError::Missing);
        }
        name.parse::<Tz>()
            .or_else(|_| Tz::from_str_insensitive(name))
            .map(Self)
            .map_err(|_| TimezoneError::Unknown(name.chars().take(64).collect()))
    }

    pub fn tz(self) -> Tz {
        self.0
    }

    pub fn name(self) -> &'static str {
        self.0.name()
    }
}

impl serde::Serialize for Timezone {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

impl<'de> serde::Deserialize<'de> for Timezone {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        Self::parse(&raw).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for Timezone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ids_are_trimmed_and_checked() {
        assert_eq!(
            ClientId::parse("  alice ").map(|id| id.to_string()),
            Ok("alice".into())
        );
        assert_eq!(ClientId::parse("   "), Err(ClientIdError::Missing));
        assert_eq!(
            ClientId::parse(&"x".repeat(129)),
            Err(ClientIdError::TooLong)
        );
        for fine in [
            "user@example.com",
            "42",
            "load-7_x.y~z+1:2=3",
            "さくら",
            "a..b",
            "José",
        ] {
            assert!(ClientId::parse(fine).is_ok(), "{fine}");
        }
    }

    #[test]
    fn ids_that_are_not_one_plain_path_segment_are_refused() {
        for dot in [".", "..", ".hidden"] {
            assert_eq!(
                ClientId::parse(dot),
                Err(ClientIdError::LeadingDot),
                "{dot}"
            );
        }
        for bad in [
            "a/b",
            "\\..\\x",
            "%2e%2e%2f",
            "a b",
            "a\nb",
            "tab\there",
            "a?b",
            "a#b",
        ] {
            assert_eq!(
                ClientId::parse(bad),
                Err(ClientIdError::BadCharacter),
                "{bad}"
            );
        }
    }

    #[test]
    fn ids_stored_under_the_old_rules_stay_readable() {
        for old in ["..", "a b", "%2e%2e%2f", "\\..\\x"] {
            assert!(ClientId::parse_stored(old).is_ok(), "{old}");
        }
        assert_eq!(
            ClientId::parse_stored("a/b"),
            Err(ClientIdError::BadCharacter)
        );
    }

    #[test]
    fn timezones_are_iana_names_in_any_case() {
        assert_eq!(
            Timezone::parse("asia/ho_chi_minh").map(Timezone::name),
            Ok("Asia/Ho_Chi_Minh")
        );
        assert_eq!(Timezone::parse("UTC").map(Timezone::name), Ok("UTC"));
        assert!(matches!(
            Timezone::parse("Mars/Olympus_Mons"),
            Err(TimezoneError::Unknown(_))
        ));
        assert_eq!(Timezone::parse(""), Err(TimezoneError::Missing));
    }
}
