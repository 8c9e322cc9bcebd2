//! Tokens for the simulated clients when the server has auth on: each client gets its own,
//! signed with the server's secret (HS256, `sub` its client id, `aud` and `exp`), as a login
//! service would make them.

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;
use std::time::Duration;

/// The environment variable of the secret: the server's own, so that one setting serves both.
pub const AUTH_SECRET_ENV: &str = "KAIWA_AUTH_SECRET";

/// What signs the clients' tokens: the server's secret, its audience, and how long a token is
/// good for. Kept to hand the secret to child processes through their environment, never on
/// a command line.
#[derive(Clone)]
pub struct TokenSettings {
    pub secret: String,
    pub audience: String,
    pub ttl: Duration,
}

impl std::fmt::Debug for TokenSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSettings")
            .field("secret", &"[redacted]")
            .field("audience", &self.audience)
            .field("ttl", &self.ttl)
            .finish()
    }
}

impl TokenSettings {
    pub fn minter(&self) -> Result<Minter, AuthError> {
        Minter::new(&self.secret, &self.audience, self.ttl)
    }
}

/// Signs the clients' tokens.
pub struct Minter {
    key: EncodingKey,
    audience: String,
    ttl: Duration,
}

impl std::fmt::Debug for Minter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Minter")
            .field("audience", &self.audience)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error(
        "--auth-secret must be at least 32 bytes, as the server's must (the value is not shown)"
    )]
    ShortSecret,
    #[error("could not sign a token: {0}")]
    Signing(String),
}

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    aud: &'a str,
    iat: i64,
    exp: i64,
}

impl Minter {
    pub fn new(secret: &str, audience: &str, ttl: Duration) -> Result<Self, AuthError> {
        if secret.len() < 32 {
            return Err(AuthError::ShortSecret);
        }
        Ok(Self {
            key: EncodingKey::from_secret(secret.as_bytes()).map_err(|_| AuthError::ShortSecret)?,
            audience: audience.to_owned(),
            ttl,
        })
    }

    /// A token for `client_id`, good for the minter's time to live from now.
    pub fn token(&self, client_id: &str) -> Result<String, AuthError> {
        let now = chrono::Utc::now().timestamp();
        let ttl = i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX);
        let claims = Claims {
            sub: client_id,
            aud: &self.audience,
            iat: now,
            exp: now.saturating_add(ttl),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.key)
            .map_err(|err| AuthError::Signing(err.to_string()))
    }
}
