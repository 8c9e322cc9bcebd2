//! Validating newtypes for what a client says about itself (its id and its timezone) and for
//! where it comes from (its network), the name of a gateway in a cluster, and the file format
//! of an upload.

use chrono_tz::Tz;
use std::fmt;
use std::net::IpAddr;
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

/// Where a connection comes from, as far as per-address limits go: an IPv4 address, or the
/// /64 network of an IPv6 one (a single host is commonly given a whole /64).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Source(IpAddr);

impl Source {
    pub fn of(addr: IpAddr) -> Self {
        match addr.to_canonical() {
            IpAddr::V4(v4) => Self(IpAddr::V4(v4)),
            IpAddr::V6(v6) => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                Self(IpAddr::V6(prefix.into()))
            }
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            IpAddr::V4(v4) => v4.fmt(f),
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
        }
    }
}

/// A list of networks (`127.0.0.0/8,::1`, or `none`): the addresses a flag applies to.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Networks(Vec<(IpAddr, u8)>);

impl Networks {
    /// Reads `address[/prefix]` items separated by commas, or `none` for an empty list.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let raw = raw.trim();
        if raw.eq_ignore_ascii_case("none") || raw.is_empty() {
            return Ok(Self::default());
        }
        raw.split(',')
            .map(|item| {
                let item = item.trim();
                let (address, prefix) = item.split_once('/').unwrap_or((item, ""));
                let address: IpAddr = address.parse().map_err(|_| {
                    format!("{item:?} is not an address or network (e.g. 10.0.0.0/8, ::1)")
                })?;
                let longest = if address.is_ipv4() { 32 } else { 128 };
                let prefix = match prefix {
                    "" => longest,
                    prefix => prefix
                        .parse::<u8>()
                        .ok()
                        .filter(|bits| *bits <= longest)
                        .ok_or_else(|| format!("{item:?}: the prefix must be 0 to {longest}"))?,
                };
                Ok((address, prefix))
            })
            .collect::<Result<_, String>>()
            .map(Self)
    }

    pub fn contains(&self, addr: IpAddr) -> bool {
        let addr = addr.to_canonical();
        self.0
            .iter()
            .any(|(network, prefix)| match (network, addr) {
                (IpAddr::V4(network), IpAddr::V4(addr)) => {
                    let mask = u32::MAX.checked_shl(32 - u32::from(*prefix)).unwrap_or(0);
                    u32::from(*network) & mask == u32::from(addr) & mask
                }
                (IpAddr::V6(network), IpAddr::V6(addr)) => {
                    let mask = u128::MAX.checked_shl(128 - u32::from(*prefix)).unwrap_or(0);
                    u128::from(*network) & mask == u128::from(addr) & mask
                }
                _ => false,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_hold_the_addresses_of_their_prefix() {
        let loopback = Networks::parse("127.0.0.0/8, ::1").expect("valid");
        assert!(loopback.contains("127.0.0.1".parse().expect("an address")));
        assert!(loopback.contains("127.9.9.9".parse().expect("an address")));
        assert!(loopback.contains("::ffff:127.0.0.1".parse().expect("an address")));
        assert!(loopback.contains("::1".parse().expect("an address")));
        assert!(!loopback.contains("10.0.0.1".parse().expect("an address")));
        assert!(!loopback.contains("::2".parse().expect("an address")));
        let any = Networks::parse("0.0.0.0/0").expect("valid");
        assert!(any.contains("203.0.113.9".parse().expect("an address")));
        assert_eq!(Networks::parse("none"), Ok(Networks::default()));
        assert!(Networks::parse("10.0.0.0/33").is_err());
        assert!(Networks::parse("localhost").is_err());
    }

    #[test]
    fn an_ipv6_source_is_its_64_network() {
        let a = Source::of("2001:db8:1:2:aaaa::1".parse().expect("an address"));
        let b = Source::of("2001:db8:1:2:bbbb::9".parse().expect("an address"));
        let c = Source::of("2001:db8:1:3::1".parse().expect("an address"));
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.to_string(), "2001:db8:1:2::/64");
        assert_eq!(
            Source::of("::ffff:192.0.2.1".parse().expect("an address")),
            Source::of("192.0.2.1".parse().expect("an address"))
        );
    }

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

/// A gateway's name in the cluster: events for the clients it holds are routed to it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct GatewayId(Arc<str>);

impl GatewayId {
    pub fn new(id: impl Into<Arc<str>>) -> Self {
        Self(id.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for GatewayId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A file format kaiwa accepts: how to serve it, which extensions a client's filename may have
/// for it. Admission recognises one by its leading bytes; the store names the file after it.
#[derive(Debug)]
pub struct MediaFormat {
    pub name: &'static str,
    pub mime: &'static str,
    /// The first is the one kaiwa gives the stored file.
    pub extensions: &'static [&'static str],
}

impl MediaFormat {
    pub fn extension(&self) -> &'static str {
        self.extensions[0]
    }

    /// Whether `filename` has one of this format's extensions; a name without an extension
    /// passes, since the bytes already decided the format.
    pub fn fits_filename(&self, filename: &str) -> bool {
        match filename.rsplit_once('.') {
            None => true,
            Some((_, ext)) => self
                .extensions
                .iter()
                .any(|known| known.eq_ignore_ascii_case(ext)),
        }
    }
}
