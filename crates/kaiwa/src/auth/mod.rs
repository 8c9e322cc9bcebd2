//! Who a client is: signed tokens (JWT, HS256) whose `sub` is the client id, the proof that an
//! uploaded file belongs to a client, and the admin token of `/metrics` and the detailed
//! `/health`.
//!
//! With no secret configured, auth is off and clients say who they are, as before. With one,
//! every WebSocket connection and every read of a client's history or files needs a token
//! signed with it (or with the previous secret, during a rotation). Tokens are checked against
//! the server's own clock (the [`Clock`](crate::clock::Clock)), not the system's, so that tests
//! on a manual clock see expiry as the server does.

pub mod config;

pub use config::{AuthConfig, KeyConfig, TokenArgs};

use crate::domain::ClientId;
use crate::url;
use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, TimeDelta, Utc};
use hmac::{Hmac, KeyInit, Mac};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use kaiwa_protocol::{CloseCode, ErrorCode};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// The longest token taken. kaiwa's own tokens are a few hundred bytes; a larger one is
/// refused before it is decoded, so that a stranger cannot make the server parse megabytes.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// Everything that can go wrong with a token, and with the flags that configure them.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuthError {
    #[error(
        "a token is required: send it as \"token\" in the first frame, or as Authorization: Bearer"
    )]
    MissingToken,
    #[error("the token is malformed: {0}")]
    MalformedToken(&'static str),
    #[error("the token is longer than {MAX_TOKEN_BYTES} bytes")]
    TokenTooLong,
    #[error("the token expired at {0}; get a new one")]
    ExpiredToken(DateTime<Utc>),
    #[error("the token's signature does not verify with this server's secret")]
    InvalidSignature,
    #[error("the token is for another audience; this server expects aud {0:?}")]
    WrongAudience(String),
    #[error("the token is for client {sub}, not {claimed}")]
    ClientIdMismatch { sub: String, claimed: String },

    #[error("give the secret with --auth-secret or with --auth-secret-file, not both")]
    SecretTwice,
    #[error("--auth-secret-file {path}: {reason}")]
    SecretFile { path: PathBuf, reason: String },
    #[error(
        "{0} auth secrets given: give at most two, the current one and the previous one (--auth-secret)"
    )]
    TooManySecrets(usize),
    #[error(
        "--auth-secret must be at least {} bytes (the value is not shown)",
        config::MIN_SECRET_BYTES
    )]
    ShortSecret,
    #[error("--auth-audience must not be empty")]
    EmptyAudience,
    #[error(
        "--bind {0} is not a loopback address and auth is off: anyone who reaches it could be any client. Give --auth-secret (or --auth-secret-file) to turn auth on, or --allow-anonymous to run without it anyway"
    )]
    AnonymousOnPublicAddress(SocketAddr),
    #[error(
        "--admin-token must be at least {} bytes (the value is not shown)",
        config::MIN_ADMIN_TOKEN_BYTES
    )]
    ShortAdminToken,
    /// `--cors-origin` or `--allowed-host`, read below auth since the HTTP layer uses them too.
    #[error(transparent)]
    Flag(#[from] crate::flags::FlagError),
    #[error("no secret to sign with: give --auth-secret or --auth-secret-file")]
    NoSecret,
    #[error("--client-id: {0}")]
    ClientId(#[from] crate::domain::ClientIdError),
    #[error("could not sign the token: {0}")]
    Signing(String),
}

impl AuthError {
    /// The error code a client is told, for the errors a client can cause.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::MissingToken => ErrorCode::MissingToken,
            Self::ExpiredToken(_) => ErrorCode::ExpiredToken,
            Self::InvalidSignature => ErrorCode::InvalidTokenSignature,
            Self::WrongAudience(_) => ErrorCode::WrongTokenAudience,
            Self::ClientIdMismatch { .. } => ErrorCode::ClientIdMismatch,
            _ => ErrorCode::MalformedToken,
        }
    }

    /// The close code a refused WebSocket connection gets: each in the terminal range, since
    /// the same token would be refused again.
    pub fn close_code(&self) -> CloseCode {
        match self {
            Self::MissingToken => CloseCode::MissingToken,
            Self::ExpiredToken(_) => CloseCode::ExpiredToken,
            Self::InvalidSignature => CloseCode::InvalidTokenSignature,
            Self::WrongAudience(_) => CloseCode::WrongTokenAudience,
            Self::ClientIdMismatch { .. } => CloseCode::ClientIdMismatch,
            _ => CloseCode::MalformedToken,
        }
    }
}

/// A token as a client sent it. Never printed: `Debug` shows only its length.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    pub fn new(raw: impl Into<String>) -> Self {
        Self(raw.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Token([redacted], {} bytes)", self.0.len())
    }
}

/// What a valid token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub client_id: ClientId,
    /// The token's `exp`.
    pub expires_at: DateTime<Utc>,
    /// `exp` plus the leeway: the token is taken until then.
    pub valid_until: DateTime<Utc>,
}

impl Claims {
    /// These claims, if they are for `claimed`: a connection or request that names a client
    /// may use only that client's token.
    pub fn for_client(self, claimed: &str) -> Result<Self, AuthError> {
        let claimed = claimed.trim();
        if self.client_id.as_str() != claimed {
            return Err(AuthError::ClientIdMismatch {
                sub: self.client_id.to_string(),
                claimed: claimed.chars().take(ClientId::MAX_LEN).collect(),
            });
        }
        Ok(self)
    }

    /// Whether the token has run out at `now` (its `exp` and the leeway are past).
    pub fn expired(&self, now: DateTime<Utc>) -> bool {
        now > self.valid_until
    }
}

/// The `WWW-Authenticate` challenge of a 401 (RFC 6750): the scheme that would do, and whether
/// the token given was bad.
pub fn challenge(err: &AuthError) -> axum::http::HeaderValue {
    axum::http::HeaderValue::from_static(match err {
        AuthError::MissingToken => r#"Bearer realm="kaiwa""#,
        _ => r#"Bearer realm="kaiwa", error="invalid_token""#,
    })
}

/// The claims kaiwa reads and writes. Other claims (`iat`, `iss`, `jti`...) are ignored.
#[derive(Debug, Serialize, Deserialize)]
struct Wire {
    sub: String,
    exp: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nbf: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iat: Option<i64>,
    /// Checked by jsonwebtoken's validation (a string or a list).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    aud: Option<serde_json::Value>,
}

/// One secret, in the forms it is used in. No `Debug`: it would print the key.
struct Key {
    encoding: EncodingKey,
    decoding: DecodingKey,
    /// Keys the media proofs: derived from the secret, so that a media proof can never be
    /// taken for a token signature or the other way round.
    media: Vec<u8>,
}

impl Key {
    fn new(secret: &str) -> Result<Self, AuthError> {
        let bytes = secret.as_bytes();
        let unusable = |_| AuthError::ShortSecret;
        Ok(Self {
            encoding: EncodingKey::from_secret(bytes).map_err(unusable)?,
            decoding: DecodingKey::from_secret(bytes).map_err(unusable)?,
            media: mac(bytes, &[b"kaiwa media v1"]).ok_or(AuthError::ShortSecret)?,
        })
    }

    /// The media proof of `owner` for `path`.
    fn media_proof(&self, owner: &ClientId, path: &str) -> Option<Vec<u8>> {
        // A separator that can be in neither: ids and paths have no control characters.
        mac(
            &self.media,
            &[owner.as_str().as_bytes(), b"\n", path.as_bytes()],
        )
    }
}

/// HMAC-SHA256 of `parts` under `key`. HMAC takes a key of any length, so this is always
/// `Some`; an `Option` rather than a panic all the same.
fn mac(key: &[u8], parts: &[&[u8]]) -> Option<Vec<u8>> {
    let mut mac = HmacSha256::new_from_slice(key).ok()?;
    for part in parts {
        mac.update(part);
    }
    Some(mac.finalize().into_bytes().to_vec())
}

/// Verifies tokens and media proofs, and signs them, with the configured secrets.
pub struct Authenticator {
    /// The current secret first: it signs. Every one verifies (rotation).
    keys: Vec<Key>,
    validation: Validation,
    audience: String,
    leeway: Duration,
    /// How long a connection whose token expired has to refresh it.
    pub refresh_grace: Duration,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("secrets", &self.keys.len())
            .field("audience", &self.audience)
            .field("leeway", &self.leeway)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// An authenticator for `secrets` (current first), or `None` when there is none: auth off.
    pub fn new(
        keys: &KeyConfig,
        leeway: Duration,
        refresh_grace: Duration,
    ) -> Result<Option<Self>, AuthError> {
        let secrets = keys.secrets()?;
        if secrets.is_empty() {
            return Ok(None);
        }
        let audience = keys.audience.trim().to_owned();
        let mut validation = Validation::new(Algorithm::HS256);
        // Only HS256: a token whose header names another algorithm (`none`, RS256 with our
        // secret as a public key...) is refused before its signature is looked at.
        validation.algorithms = vec![Algorithm::HS256];
        validation.set_audience(&[&audience]);
        validation.set_required_spec_claims(&["exp", "sub", "aud"]);
        // Expiry is judged against the server's clock below, not the system's.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.leeway = 0;
        Ok(Some(Self {
            keys: secrets
                .iter()
                .map(|secret| Key::new(secret.expose()))
                .collect::<Result<_, _>>()?,
            validation,
            audience,
            leeway,
            refresh_grace,
        }))
    }

    /// The authenticator `serve` runs with, if auth is on; says at start which way it is.
    pub fn start(config: &AuthConfig, bind: SocketAddr) -> Result<Option<Arc<Self>>, AuthError> {
        let auth = Self::new(&config.keys, config.leeway, config.refresh_grace)?;
        match &auth {
            Some(auth) => tracing::info!(
                audience = %auth.audience,
                secrets = auth.keys.len(),
                leeway_s = auth.leeway.as_secs_f64(),
                "auth is on: clients need a token signed with HS256 (sub = client id)"
            ),
            None if bind.ip().is_loopback() => tracing::warn!(
                %bind,
                "auth is off (no --auth-secret): any client can say it is any client id and read that id's history"
            ),
            None => tracing::warn!(
                %bind,
                "auth is off on an address beyond loopback (--allow-anonymous): anyone who reaches it can be any client id and read that id's history"
            ),
        }
        Ok(auth.map(Arc::new))
    }

    /// Checks `token` at `now`: its signature (with any configured secret), its algorithm,
    /// audience and expiry, and that its `sub` is a client id.
    pub fn verify(&self, token: &Token, now: DateTime<Utc>) -> Result<Claims, AuthError> {
        let raw = token.expose().trim();
        if raw.is_empty() {
            return Err(AuthError::MissingToken);
        }
        if raw.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::TokenTooLong);
        }
        let mut decoded = Err(AuthError::InvalidSignature);
        for key in &self.keys {
            match jsonwebtoken::decode::<Wire>(raw, &key.decoding, &self.validation) {
                Ok(data) => {
                    decoded = Ok(data.claims);
                    break;
                }
                // Perhaps signed with the other secret: try it.
                Err(err) if *err.kind() == ErrorKind::InvalidSignature => {}
                Err(err) => {
                    decoded = Err(self.classify(err.kind()));
                    break;
                }
            }
        }
        let claims = decoded?;
        let expires_at = DateTime::from_timestamp(claims.exp, 0)
            .ok_or(AuthError::MalformedToken("exp is out of range"))?;
        let leeway = TimeDelta::from_std(self.leeway).unwrap_or(TimeDelta::zero());
        let valid_until = expires_at + leeway;
        if now > valid_until {
            return Err(AuthError::ExpiredToken(expires_at));
        }
        if let Some(nbf) = claims.nbf
            && DateTime::from_timestamp(nbf, 0).is_none_or(|nbf| nbf - leeway > now)
        {
            return Err(AuthError::MalformedToken("it is not valid yet (nbf)"));
        }
        let client_id = ClientId::parse(&claims.sub)
            .map_err(|_| AuthError::MalformedToken("sub is not a valid client id"))?;
        Ok(Claims {
            client_id,
            expires_at,
            valid_until,
        })
    }

    fn classify(&self, kind: &ErrorKind) -> AuthError {
        match kind {
            ErrorKind::InvalidAudience => AuthError::WrongAudience(self.audience.clone()),
            ErrorKind::InvalidAlgorithm => {
                AuthError::MalformedToken("only tokens signed with HS256 are accepted")
            }
            ErrorKind::MissingRequiredClaim(_) => {
                AuthError::MalformedToken("a token needs the claims sub, exp and aud")
            }
            ErrorKind::Json(_) | ErrorKind::InvalidClaimFormat(_) => AuthError::MalformedToken(
                "its claims are not JSON of the expected shape (sub a string, exp a number)",
            ),
            _ => AuthError::MalformedToken("it is not a JWT (three base64url parts)"),
        }
    }

    /// Checks `token` as the one a connection or request that names `claimed` may use: valid,
    /// and for that client.
    pub fn verify_for(
        &self,
        token: &Token,
        claimed: &str,
        now: DateTime<Utc>,
    ) -> Result<Claims, AuthError> {
        self.verify(token, now)?.for_client(claimed)
    }

    /// A token for `client_id`, good for `ttl` from `now`, signed with the current secret.
    pub fn issue(
        &self,
        client_id: &ClientId,
        ttl: Duration,
        now: DateTime<Utc>,
    ) -> Result<String, AuthError> {
        let key = self.keys.first().ok_or(AuthError::NoSecret)?;
        let ttl = TimeDelta::from_std(ttl).map_err(|err| AuthError::Signing(err.to_string()))?;
        let claims = Wire {
            sub: client_id.to_string(),
            exp: (now + ttl).timestamp(),
            nbf: None,
            iat: Some(now.timestamp()),
            aud: Some(serde_json::Value::String(self.audience.clone())),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key.encoding)
            .map_err(|err| AuthError::Signing(err.to_string()))
    }

    /// The proof, for a URL, that the uploaded file at `path` belongs to `owner`.
    pub fn sign_media(&self, owner: &ClientId, path: &str) -> String {
        self.keys
            .first()
            .and_then(|key| key.media_proof(owner, path))
            .map(|proof| URL_SAFE_NO_PAD.encode(proof))
            .unwrap_or_default()
    }

    /// Whether `proof` shows that the file at `path` belongs to `owner` (under any configured
    /// secret). The comparison takes the same time whatever the proof.
    pub fn owns_media(&self, owner: &ClientId, path: &str, proof: &str) -> bool {
        let Ok(proof) = URL_SAFE_NO_PAD.decode(proof.trim()) else {
            return false;
        };
        self.keys.iter().any(|key| {
            key.media_proof(owner, path)
                .is_some_and(|expected| bool::from(expected.ct_eq(&proof)))
        })
    }
}

/// The token of an HTTP request: `Authorization: Bearer <token>`. An `Authorization` header
/// of another scheme is a malformed token, not a missing one.
pub fn bearer(headers: &HeaderMap) -> Result<Option<Token>, AuthError> {
    let Some(value) = headers.get(AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| AuthError::MalformedToken("the Authorization header is not text"))?;
    let (scheme, token) = value.trim().split_once(' ').unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::MalformedToken(
            "the Authorization header must be \"Bearer <token>\"",
        ));
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(AuthError::MissingToken);
    }
    Ok(Some(Token::new(token)))
}

/// The token of a WebSocket upgrade request: `Authorization: Bearer`, else `?token=` (which
/// browsers, who cannot set headers on a WebSocket, can send). An `Authorization` header of
/// another scheme (a proxy's own `Basic` login, which a browser repeats on every request) is not
/// kaiwa's, and is left alone.
pub fn upgrade_token(headers: &HeaderMap, query: Option<&str>) -> Result<Option<Token>, AuthError> {
    let bearer_scheme = headers
        .get(AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split_whitespace().next())
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("bearer"));
    if bearer_scheme && let Some(token) = bearer(headers)? {
        return Ok(Some(token));
    }
    // A JWT is base64url and dots, but a client may escape it anyway.
    let from_query = query.and_then(|query| url::query_param(query, "token", url::Plus::Space));
    Ok(from_query.filter(|token| !token.is_empty()).map(Token::new))
}

/// `kaiwa token`: a token for `--client-id`, good for `--ttl` from now (the system's clock),
/// signed with the current secret.
pub fn issue(args: &TokenArgs) -> Result<String, AuthError> {
    let client_id = ClientId::parse(&args.client_id)?;
    let auth = Authenticator::new(&args.keys, Duration::ZERO, Duration::ZERO)?
        .ok_or(AuthError::NoSecret)?;
    auth.issue(&client_id, args.ttl, Utc::now())
}

/// Who may read `/metrics` and the detailed `/health` on the main address.
#[derive(Clone)]
pub enum AdminAccess {
    /// Anyone (auth off and no admin token: as before).
    Open,
    /// Whoever sends this token as `Authorization: Bearer`; kept as its SHA-256 so that
    /// comparing takes the same time whatever the guess, its length included.
    Token([u8; 32]),
    /// Nobody here: auth is on and no admin token is set, or they are on `--admin-bind`.
    Closed,
}

impl std::fmt::Debug for AdminAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Open => "Open",
            Self::Token(_) => "Token([redacted])",
            Self::Closed => "Closed",
        })
    }
}

impl AdminAccess {
    /// The policy of the main address for this configuration.
    pub fn from_config(config: &AuthConfig, auth_on: bool) -> Self {
        match &config.admin_token {
            Some(token) => Self::Token(Sha256::digest(token.expose().as_bytes()).into()),
            None if auth_on || config.admin_bind.is_some() => Self::Closed,
            None => Self::Open,
        }
    }

    /// Whether `given` is the admin token, compared in constant time.
    pub fn admits(&self, given: &Token) -> bool {
        match self {
            Self::Open => true,
            Self::Token(digest) => {
                let guess: [u8; 32] = Sha256::digest(given.expose().as_bytes()).into();
                bool::from(guess.ct_eq(digest))
            }
            Self::Closed => false,
        }
    }
}

/// Who may do what over HTTP, fixed at start.
#[derive(Debug, Clone)]
pub struct Access {
    /// Client tokens; `None` when auth is off.
    pub tokens: Option<Arc<Authenticator>>,
    pub admin: AdminAccess,
}

impl Access {
    /// No auth at all: as kaiwa was before.
    pub fn open() -> Self {
        Self {
            tokens: None,
            admin: AdminAccess::Open,
        }
    }
}

#[cfg(test)]
mod tests;
