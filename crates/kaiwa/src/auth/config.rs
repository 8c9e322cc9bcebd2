//! The flags of authentication, the admin endpoints and CORS, and the `kaiwa token` command.

use super::AuthError;
use crate::flags::{self, Secret};
use clap::{ArgAction, Args};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// A secret must be at least this long: HS256 keys shorter than the hash are easy to guess.
pub const MIN_SECRET_BYTES: usize = 32;
/// The current secret and the previous one, during a rotation.
pub const MAX_SECRETS: usize = 2;
/// An admin token shorter than this could be guessed.
pub const MIN_ADMIN_TOKEN_BYTES: usize = 16;

/// Where the signing secrets come from, and the audience tokens must name. Shared by `serve`
/// (which verifies tokens) and `token` (which signs one).
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Authentication")]
pub struct KeyConfig {
    /// Turns auth on: the HS256 secret that signs and verifies tokens (at least 32 bytes). Give
    /// it twice to rotate: the first signs and verifies, the second (the previous secret) only
    /// verifies. Never printed; prefer the environment or --auth-secret-file.
    // Read as a secret and checked later: clap would repeat an invalid value in its error.
    #[arg(long = "auth-secret", env = "KAIWA_AUTH_SECRET", hide_env_values = true, action = ArgAction::Append, value_parser = secret)]
    pub secrets: Vec<Secret>,

    /// A file holding the secret instead, one per line: the current one first, then the
    /// previous one during a rotation. May be given twice, one secret per file.
    #[arg(long = "auth-secret-file", env = "KAIWA_AUTH_SECRET_FILE", action = ArgAction::Append)]
    pub secret_files: Vec<PathBuf>,

    /// The `aud` a token must carry.
    #[arg(
        long = "auth-audience",
        env = "KAIWA_AUTH_AUDIENCE",
        default_value = "kaiwa"
    )]
    pub audience: String,
}

impl KeyConfig {
    /// The configured secrets, current first, each checked; empty when auth is off.
    pub fn secrets(&self) -> Result<Vec<Secret>, AuthError> {
        if !self.secrets.is_empty() && !self.secret_files.is_empty() {
            return Err(AuthError::SecretTwice);
        }
        let mut secrets = self.secrets.clone();
        for path in &self.secret_files {
            let text = std::fs::read_to_string(path).map_err(|err| AuthError::SecretFile {
                path: path.clone(),
                reason: err.to_string(),
            })?;
            secrets.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|line| !line.is_empty())
                    .map(Secret::new),
            );
        }
        if secrets.len() > MAX_SECRETS {
            return Err(AuthError::TooManySecrets(secrets.len()));
        }
        if secrets
            .iter()
            .any(|secret| secret.expose().len() < MIN_SECRET_BYTES)
        {
            return Err(AuthError::ShortSecret);
        }
        if self.audience.trim().is_empty() {
            return Err(AuthError::EmptyAudience);
        }
        Ok(secrets)
    }
}

/// Who may connect and read: signed tokens, the admin endpoints, CORS.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Authentication")]
pub struct AuthConfig {
    #[command(flatten)]
    pub keys: KeyConfig,

    /// Seconds of clock difference allowed when judging a token's `exp` (and `nbf`).
    #[arg(long = "auth-leeway", env = "KAIWA_AUTH_LEEWAY", default_value = "30", value_parser = leeway)]
    pub leeway: Duration,

    /// Seconds a connection whose token expired has to send `refresh` with a new one before it
    /// is closed (4603), at most 300. Meanwhile its messages are refused with `expired_token`.
    #[arg(long = "auth-refresh-grace", env = "KAIWA_AUTH_REFRESH_GRACE", default_value = "30", value_parser = refresh_grace)]
    pub refresh_grace: Duration,

    /// Run without auth on an address other than loopback (anyone who reaches it can be any
    /// client). Without auth, kaiwa refuses to listen beyond loopback unless this is given.
    #[arg(long = "allow-anonymous", env = "KAIWA_ALLOW_ANONYMOUS")]
    pub allow_anonymous: bool,

    /// Bearer token that opens /metrics and the detailed /health (at least 16 bytes). Never
    /// printed.
    #[arg(long = "admin-token", env = "KAIWA_ADMIN_TOKEN", hide_env_values = true, value_parser = secret)]
    pub admin_token: Option<Secret>,

    /// A second address that serves /health (detailed) and /metrics with no token, for a
    /// private network; the main address then answers /health with liveness only.
    #[arg(long = "admin-bind", env = "KAIWA_ADMIN_BIND")]
    pub admin_bind: Option<SocketAddr>,

    /// An origin whose pages may call the HTTP API (e.g. https://chat.example.com); repeat it,
    /// or separate origins with commas. `*` allows any. Default: any origin without auth, only
    /// the server's own pages with auth.
    #[arg(long = "cors-origin", env = "KAIWA_CORS_ORIGIN", value_delimiter = ',', action = ArgAction::Append)]
    pub cors_origins: Vec<String>,

    /// With auth off, a host name pages may reach kaiwa by (as in the `Host` header, without
    /// the port), besides loopback names and IP addresses: any other is refused with 421, so
    /// that a site whose name resolves to this server cannot use it (DNS rebinding). Repeat
    /// it, or separate names with commas.
    #[arg(long = "allowed-host", env = "KAIWA_ALLOWED_HOST", value_delimiter = ',', action = ArgAction::Append)]
    pub allowed_hosts: Vec<String>,
}

impl AuthConfig {
    /// Checks the rules that span several flags: `bind` is the main listening address.
    pub fn check(&self, bind: SocketAddr) -> Result<(), AuthError> {
        let secrets = self.keys.secrets()?;
        if secrets.is_empty() && !bind.ip().is_loopback() && !self.allow_anonymous {
            return Err(AuthError::AnonymousOnPublicAddress(bind));
        }
        if self
            .admin_token
            .as_ref()
            .is_some_and(|token| token.expose().len() < MIN_ADMIN_TOKEN_BYTES)
        {
            return Err(AuthError::ShortAdminToken);
        }
        flags::origins(&self.cors_origins)?;
        flags::hosts(&self.allowed_hosts)?;
        Ok(())
    }
}

/// `kaiwa token`: a token for one client, signed with the current secret.
#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    /// The client id the token is for (its `sub`).
    #[arg(long)]
    pub client_id: String,

    /// How long the token is good for: seconds, or a number with s, m, h or d (`90s`, `1h`).
    #[arg(long, default_value = "1h", value_parser = ttl)]
    pub ttl: Duration,

    #[command(flatten)]
    pub keys: KeyConfig,
}

fn secret(raw: &str) -> Result<Secret, String> {
    Ok(Secret::new(raw.trim()))
}

/// The longest refresh grace: a connection whose token ran out takes no messages, and should
/// not hold its slot for long either.
pub const MAX_REFRESH_GRACE: Duration = Duration::from_secs(300);

/// Seconds, from a millisecond to [`MAX_REFRESH_GRACE`].
fn refresh_grace(raw: &str) -> Result<Duration, String> {
    let grace = flags::parse_seconds(raw)?;
    if grace > MAX_REFRESH_GRACE {
        return Err(format!(
            "{raw} s is out of range: use up to {} seconds",
            MAX_REFRESH_GRACE.as_secs()
        ));
    }
    Ok(grace)
}

/// Seconds from 0 (no leeway) to an hour.
fn leeway(raw: &str) -> Result<Duration, String> {
    crate::flags::parse_seconds_within(raw, 0.0..=3600.0)
}

/// `90`, `90s`, `15m`, `1h`, `7d`: from a second to a year.
pub(crate) fn ttl(raw: &str) -> Result<Duration, String> {
    let text = raw.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let count: u64 = number
        .parse()
        .map_err(|_| format!("{raw:?} is not a duration: use e.g. 90s, 15m, 1h or 7d"))?;
    let unit = match unit.trim() {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{raw:?}: the unit must be s, m, h or d")),
    };
    let seconds = count.saturating_mul(unit);
    if !(1..=365 * 86_400).contains(&seconds) {
        return Err(format!("{raw} is out of range: from 1 second to 365 days"));
    }
    Ok(Duration::from_secs(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_to_live_reads_seconds_minutes_hours_and_days() {
        assert_eq!(ttl("90"), Ok(Duration::from_secs(90)));
        assert_eq!(ttl("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(ttl("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(ttl("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(ttl("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert!(ttl("0").is_err());
        assert!(ttl("1y").is_err());
        assert!(ttl("h").is_err());
        assert!(ttl("400d").is_err());
    }
}
