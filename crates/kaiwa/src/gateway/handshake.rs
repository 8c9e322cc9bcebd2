//! How a connection says who it is: its first frame (which protocol it speaks, who the client
//! is, its timezone), or for the path dialect its URL. With auth on, who the client is comes
//! from its token, never from the frame or the URL alone.

use super::wire::Protocol;
use crate::auth::{AuthError, Authenticator, Claims, MAX_TOKEN_BYTES, Token};
use crate::clock::Clock;
use crate::domain::{ClientId, ClientIdError, Timezone, TimezoneError};
use crate::listener::is_over_allowance;
use axum::extract::ws::Message;
use futures::{Stream, StreamExt};
use kaiwa_protocol::{CloseCode, ErrorCode, legacy, native};
use std::sync::Arc;
use std::time::Duration;

/// A client that introduced itself properly.
#[derive(Debug)]
pub(crate) struct Hello {
    pub protocol: Protocol,
    pub client_id: ClientId,
    pub timezone: Timezone,
    /// Native only: where the client's reply stream picks up.
    pub resume: Resume,
    /// What the client's token says, when auth is on.
    pub token: Option<Claims>,
}

/// How a connection says who it is, as its upgrade request chose.
#[derive(Debug)]
pub(crate) enum Opening {
    /// On `/ws`: with its first frame; `native` when it chose `kaiwa.v1` in the upgrade request.
    Frame { native: bool },
    /// On `/<client_id>` or `/ws/<client_id>` (the path dialect): with its URL, and no frame.
    Path(PathIntro),
}

/// What the URL of a path dialect connection says, as written (unescaped, unchecked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PathIntro {
    /// The last segment of the path.
    pub client_id: String,
    /// `?timezone=`, if given.
    pub timezone: Option<String>,
}

/// What a handshake checks who the client is with.
pub(crate) struct Credentials {
    /// The server's authenticator; `None` when auth is off and clients name themselves.
    pub auth: Option<Arc<Authenticator>>,
    /// What the upgrade request's token (`Authorization: Bearer`, `?token=`) says, checked
    /// before the upgrade. The handshake frame's own `token` comes first.
    pub upgrade: Option<Claims>,
    /// The server's clock, which judges expiry.
    pub clock: Arc<dyn Clock>,
}

#[cfg(test)]
impl Credentials {
    /// Auth off: the client id is the frame's.
    pub(crate) fn anonymous() -> Self {
        Self {
            auth: None,
            upgrade: None,
            clock: Arc::new(crate::clock::SystemClock),
        }
    }
}

/// Where a native client's reply stream starts on this connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Resume {
    /// With the replies stored from now on (legacy clients, and `hello` without `resume`).
    Fresh,
    /// After the last reply the client acknowledged (`resume: true` without `after`).
    Unacknowledged,
    /// After the reply with this `seq`, which the client says it processed last.
    After(u64),
}

#[derive(Debug)]
pub(crate) enum HandshakeError {
    /// The client left, or the connection broke; nobody to answer.
    Gone,
    /// No handshake frame in time.
    Timeout,
    /// The first frame was a text frame that is not UTF-8.
    InvalidUtf8,
    /// The connection sent more than it may before its handshake is verified.
    TooLarge,
    /// Too many connections were in their handshake, and a newer one took this one's place.
    CrowdedOut,
    /// The server is draining for shutdown and takes no new sessions.
    ShuttingDown,
    /// The handshake frame was wrong, or its token; `protocol` is the one to answer in, and
    /// `close` the close code that follows the error frame.
    Invalid {
        protocol: Protocol,
        code: ErrorCode,
        close: CloseCode,
        message: String,
    },
}

/// Reads the handshake frame. `native` is whether the client chose `kaiwa.v1` in the upgrade
/// request; a client that did not may still choose it with a `hello` first frame.
pub(crate) async fn receive<S>(
    socket: &mut S,
    native: bool,
    timeout: Duration,
    credentials: &Credentials,
) -> Result<Hello, HandshakeError>
where
    S: Stream<Item = Result<Message, axum::Error>> + Unpin,
{
    let guess = Protocol::chosen_at_upgrade(native);
    let first = tokio::time::timeout(timeout, async {
        loop {
            match socket.next().await {
                Some(Ok(Message::Text(text))) => return Ok(text),
                Some(Ok(Message::Binary(_))) => {
                    return Err(invalid(
                        guess,
                        ErrorCode::UnexpectedBinary,
                        "the first frame must be a JSON text frame with client_id and timezone",
                    ));
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Err(err)) if is_invalid_utf8(&err) => return Err(HandshakeError::InvalidUtf8),
                Some(Err(err)) if is_over_allowance(&err) => return Err(HandshakeError::TooLarge),
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                    return Err(HandshakeError::Gone);
                }
            }
        }
    })
    .await
    .map_err(|_| HandshakeError::Timeout)??;
    if first.len() > MAX_HELLO_BYTES {
        return Err(invalid(
            guess,
            ErrorCode::MalformedJson,
            format!("the handshake frame must be under {MAX_HELLO_BYTES} bytes"),
        ));
    }
    parse(&first, native, credentials)
}

/// Whether a read failed on a text frame that is not valid UTF-8 (close 1007).
pub(crate) fn is_invalid_utf8(err: &axum::Error) -> bool {
    std::error::Error::source(err)
        .and_then(|source| source.downcast_ref::<tungstenite::Error>())
        .is_some_and(|inner| matches!(inner, tungstenite::Error::Utf8(_)))
}

/// A handshake holds a client id, a timezone, a resume position and a token of at most
/// [`MAX_TOKEN_BYTES`]: refusing anything larger before parsing it keeps a stranger from
/// making the server parse more. (What it may send at all is capped before this, by the
/// connection's allowance.)
const MAX_HELLO_BYTES: usize = MAX_TOKEN_BYTES + 4096;

fn invalid(protocol: Protocol, code: ErrorCode, message: impl Into<String>) -> HandshakeError {
    HandshakeError::Invalid {
        protocol,
        code,
        close: CloseCode::BadHandshake,
        message: message.into(),
    }
}

/// A token refused: its own error code and close code.
fn refused(protocol: Protocol, err: &AuthError) -> HandshakeError {
    HandshakeError::Invalid {
        protocol,
        code: err.code(),
        close: err.close_code(),
        message: err.to_string(),
    }
}

fn resume(resume: bool, after: Option<u64>) -> Resume {
    match (resume, after) {
        (_, Some(after)) => Resume::After(after),
        (true, None) => Resume::Unacknowledged,
        (false, None) => Resume::Fresh,
    }
}

/// A path dialect client, from its URL: the path names the client (with auth on, the token's
/// `sub` must be that name), `?timezone=` its timezone, else `default_timezone`.
pub(crate) fn from_path(
    intro: &PathIntro,
    credentials: &Credentials,
    default_timezone: Timezone,
) -> Result<Hello, HandshakeError> {
    let protocol = Protocol::Path;
    let named = ClientId::parse(&intro.client_id).map_err(|err| {
        let message = if intro.client_id.is_empty() {
            "the URL path names no client id: its last segment, after the last /, is empty (connect to /<client_id> or /ws/<client_id>)".to_owned()
        } else {
            let written: String = intro.client_id.chars().take(64).collect();
            format!("the client id {written:?} in the URL path is not valid: {err}")
        };
        invalid(protocol, client_id_code(err), message)
    })?;
    let (client_id, token) = match &credentials.auth {
        None => (named, None),
        Some(auth) => {
            let claims = identify(auth, Some(named.as_str()), None, credentials)
                .map_err(|err| refused(protocol, &err))?;
            (claims.client_id.clone(), Some(claims))
        }
    };
    let timezone = match intro.timezone.as_deref() {
        None => default_timezone,
        Some(name) => Timezone::parse(name).map_err(|err| {
            invalid(
                protocol,
                timezone_code(&err),
                format!("{err} (from ?timezone= in the URL)"),
            )
        })?,
    };
    Ok(Hello {
        protocol,
        client_id,
        timezone,
        resume: Resume::Fresh,
        token,
    })
}

pub(crate) fn parse(
    text: &str,
    native_header: bool,
    credentials: &Credentials,
) -> Result<Hello, HandshakeError> {
    let (protocol, client_id, timezone, resume, token) = if native_header {
        match serde_json::from_str::<native::IncomingFrame>(text) {
            Ok(hello) if hello.kind.as_deref() == Some("hello") => (
                Protocol::Native,
                hello.client_id,
                hello.timezone,
                resume(hello.resume, hello.after),
                hello.token,
            ),
            Ok(_) => {
                return Err(invalid(
                    Protocol::Native,
                    ErrorCode::HandshakeRequired,
                    r#"the first frame must be {"type":"hello","client_id":...,"timezone":...}"#,
                ));
            }
            Err(err) => {
                let code = match err.classify() {
                    serde_json::error::Category::Data => ErrorCode::BadFrame,
                    _ => ErrorCode::MalformedJson,
                };
                return Err(invalid(
                    Protocol::Native,
                    code,
                    format!("invalid hello frame: {err}"),
                ));
            }
        }
    } else {
        let value: serde_json::Value = serde_json::from_str(text).map_err(|err| {
            invalid(
                Protocol::Legacy,
                ErrorCode::MalformedJson,
                format!("the first frame is not JSON: {err}"),
            )
        })?;
        if !value.is_object() {
            return Err(invalid(
                Protocol::Legacy,
                ErrorCode::BadFrame,
                r#"the first frame must be a JSON object: {"client_id":...,"timezone":...}"#,
            ));
        }
        if value.get("type").and_then(|t| t.as_str()) == Some("hello") {
            let hello: native::Hello = serde_json::from_value(value).map_err(|err| {
                invalid(
                    Protocol::Native,
                    ErrorCode::BadFrame,
                    format!("invalid hello frame: {err}"),
                )
            })?;
            (
                Protocol::Native,
                hello.client_id,
                hello.timezone,
                resume(hello.resume, hello.after),
                hello.token,
            )
        } else {
            let frame: legacy::ClientFrame = serde_json::from_value(value).map_err(|err| {
                invalid(
                    Protocol::Legacy,
                    ErrorCode::BadFrame,
                    format!("invalid handshake frame: {err}"),
                )
            })?;
            let introduces = frame.client_id.is_some() || frame.token.is_some();
            if !introduces && (frame.message_type.is_some() || frame.kind.is_some()) {
                return Err(invalid(
                    Protocol::Legacy,
                    ErrorCode::HandshakeRequired,
                    r#"send {"client_id":...,"timezone":...} before anything else"#,
                ));
            }
            (
                Protocol::Legacy,
                frame.client_id,
                frame.timezone,
                Resume::Fresh,
                frame.token,
            )
        }
    };
    let (client_id, token) = match &credentials.auth {
        None => (named(protocol, client_id.as_deref())?, None),
        Some(auth) => {
            let claims = identify(auth, client_id.as_deref(), token, credentials)
                .map_err(|err| refused(protocol, &err))?;
            (claims.client_id.clone(), Some(claims))
        }
    };
    let timezone = Timezone::parse(timezone.as_deref().unwrap_or_default())
        .map_err(|err| invalid(protocol, timezone_code(&err), err.to_string()))?;
    Ok(Hello {
        protocol,
        client_id,
        timezone,
        resume,
        token,
    })
}

/// Auth off: the client id the frame names.
fn named(protocol: Protocol, client_id: Option<&str>) -> Result<ClientId, HandshakeError> {
    ClientId::parse(client_id.unwrap_or_default())
        .map_err(|err| invalid(protocol, client_id_code(err), err.to_string()))
}

fn client_id_code(err: ClientIdError) -> ErrorCode {
    match err {
        ClientIdError::Missing => ErrorCode::MissingClientId,
        ClientIdError::TooLong | ClientIdError::BadCharacter | ClientIdError::LeadingDot => {
            ErrorCode::InvalidClientId
        }
    }
}

fn timezone_code(err: &TimezoneError) -> ErrorCode {
    match err {
        TimezoneError::Missing => ErrorCode::MissingTimezone,
        TimezoneError::Unknown(_) => ErrorCode::UnknownTimezone,
    }
}

/// Auth on: the client is its token's `sub`. The frame's `token` comes first, then the
/// upgrade request's; a `client_id` in the frame must be the same as `sub`.
fn identify(
    auth: &Authenticator,
    claimed: Option<&str>,
    token: Option<String>,
    credentials: &Credentials,
) -> Result<Claims, AuthError> {
    let now = credentials.clock.now();
    let claims = match token.filter(|token| !token.trim().is_empty()) {
        Some(token) => auth.verify(&Token::new(token), now)?,
        None => {
            let claims = credentials.upgrade.clone().ok_or(AuthError::MissingToken)?;
            // Checked at the upgrade; it may have run out during the handshake.
            if claims.expired(now) {
                return Err(AuthError::ExpiredToken(claims.expires_at));
            }
            claims
        }
    };
    match claimed.filter(|id| !id.trim().is_empty()) {
        Some(claimed) => claims.for_client(claimed),
        None => Ok(claims),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A handshake with auth off.
    fn parse(text: &str, native_header: bool) -> Result<Hello, HandshakeError> {
        super::parse(text, native_header, &Credentials::anonymous())
    }

    fn code(result: &Result<Hello, HandshakeError>) -> Option<ErrorCode> {
        match result {
            Err(HandshakeError::Invalid { code, .. }) => Some(*code),
            _ => None,
        }
    }

    #[test]
    fn legacy_and_native_hellos_are_told_apart_by_their_first_frame() {
        let legacy = parse(r#"{"client_id":"u1","timezone":"UTC"}"#, false).expect("legacy hello");
        assert_eq!(legacy.protocol, Protocol::Legacy);
        let native = parse(
            r#"{"type":"hello","client_id":"u1","timezone":"UTC","resume":true}"#,
            false,
        )
        .expect("native hello");
        assert_eq!(native.protocol, Protocol::Native);
        assert_eq!(native.resume, Resume::Unacknowledged);
        let after = parse(
            r#"{"type":"hello","client_id":"u1","timezone":"UTC","after":12}"#,
            true,
        )
        .expect("native hello");
        assert_eq!(after.resume, Resume::After(12));
        let by_header = parse(
            r#"{"type":"hello","client_id":"u1","timezone":"Asia/Tokyo"}"#,
            true,
        )
        .expect("native hello");
        assert_eq!(by_header.timezone.name(), "Asia/Tokyo");
    }

    fn from_path(client_id: &str, timezone: Option<&str>) -> Result<Hello, HandshakeError> {
        let intro = PathIntro {
            client_id: client_id.to_owned(),
            timezone: timezone.map(str::to_owned),
        };
        let utc = Timezone::parse("UTC").expect("a zone");
        super::from_path(&intro, &Credentials::anonymous(), utc)
    }

    #[test]
    fn a_path_names_the_client_and_the_query_its_timezone_else_the_default() {
        let hello = from_path("alice", Some("asia/tokyo")).expect("valid");
        assert_eq!(hello.protocol, Protocol::Path);
        assert_eq!(hello.client_id.as_str(), "alice");
        assert_eq!(hello.timezone.name(), "Asia/Tokyo");
        assert_eq!(hello.resume, Resume::Fresh);
        let plain = from_path("bob", None).expect("valid");
        assert_eq!(plain.timezone.name(), "UTC");
        assert_eq!(
            code(&from_path("a b", None)),
            Some(ErrorCode::InvalidClientId)
        );
        let Err(HandshakeError::Invalid { close, message, .. }) = from_path("..", None) else {
            panic!("refused");
        };
        assert_eq!(close, CloseCode::BadHandshake);
        assert!(message.contains("URL path"), "{message}");
        let empty = from_path("", None);
        assert_eq!(code(&empty), Some(ErrorCode::MissingClientId));
        let Err(HandshakeError::Invalid { close, message, .. }) = empty else {
            panic!("refused");
        };
        assert_eq!(close, CloseCode::BadHandshake);
        assert!(message.contains("names no client id"), "{message}");
        assert_eq!(
            code(&from_path("alice", Some("Mars/Olympus"))),
            Some(ErrorCode::UnknownTimezone)
        );
    }

    #[test]
    fn bad_handshakes_get_specific_codes() {
        assert_eq!(code(&parse("{", false)), Some(ErrorCode::MalformedJson));
        assert_eq!(code(&parse("[1]", false)), Some(ErrorCode::BadFrame));
        assert_eq!(
            code(&parse(
                r#"{"type":"hello","client_id":"a","timezone":"UTC","after":"x"}"#,
                true
            )),
            Some(ErrorCode::BadFrame)
        );
        assert_eq!(
            code(&parse(r#"{"timezone":"UTC"}"#, false)),
            Some(ErrorCode::MissingClientId)
        );
        assert_eq!(
            code(&parse(r#"{"client_id":"","timezone":"UTC"}"#, false)),
            Some(ErrorCode::MissingClientId)
        );
        assert_eq!(
            code(&parse(r#"{"client_id":"u1"}"#, false)),
            Some(ErrorCode::MissingTimezone)
        );
        assert_eq!(
            code(&parse(
                r#"{"client_id":"u1","timezone":"Nowhere/City"}"#,
                false
            )),
            Some(ErrorCode::UnknownTimezone)
        );
        assert_eq!(
            code(&parse(r#"{"message_type":"text","content":"hi"}"#, false)),
            Some(ErrorCode::HandshakeRequired)
        );
        assert_eq!(
            code(&parse(r#"{"type":"ping"}"#, true)),
            Some(ErrorCode::HandshakeRequired)
        );
    }
}
