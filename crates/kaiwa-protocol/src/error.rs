//! Error codes carried by `error` frames and HTTP error bodies.

use serde::{Deserialize, Serialize};

/// A stable, machine-readable error code. The human-readable text beside it may change; these
/// names do not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame is not valid JSON.
    MalformedJson,
    /// The frame is JSON, but not the shape its type needs (a field of the wrong type, an
    /// object where a list is, a required field missing).
    BadFrame,
    /// A message arrived before the handshake frame.
    HandshakeRequired,
    MissingClientId,
    InvalidClientId,
    /// Another live connection holds this client id (close code 4509 follows).
    DuplicateConnection,
    /// All client slots are taken (close code 1013 follows); retry after a backoff.
    OverCapacity,
    MissingTimezone,
    UnknownTimezone,
    UnknownMessageType,
    /// A native frame with an unknown `type`.
    UnknownFrame,
    /// A native `send` without a usable client message id.
    InvalidMessageId,
    EmptyText,
    TextTooLong,
    MissingContent,
    InvalidBase64,
    MissingFilename,
    InvalidFilename,
    MediaTooLarge,
    /// The file's bytes are not a format accepted for its message type, or do not match the
    /// extension of its filename.
    MediaMismatch,
    /// A binary frame where a text frame was expected.
    UnexpectedBinary,
    /// A text frame where the binary frame announced by a `send` was expected.
    ExpectedBinary,
    /// Too many messages are being processed; retry after `retry_after_ms` (R14).
    Busy,
    /// The server is shutting down and takes no new messages; retry on another connection.
    ShuttingDown,
    /// The server's database cannot be reached for now; nothing was stored. Retry after
    /// `retry_after_ms`.
    Unavailable,
    /// The message is stored but could not be processed now; it is processed again after a
    /// restart. Not retryable: sending it again would only be recognised as a duplicate.
    ProcessingFailed,
    /// An HTTP query parameter is out of range or malformed.
    InvalidParameter,
    NotFound,
    Internal,
    /// Auth is on and no token came: not in the handshake frame, nor in the upgrade request
    /// (`Authorization: Bearer`, `?token=`), nor in the HTTP request. Close code 4601.
    MissingToken,
    /// The token is not a JWT kaiwa accepts: not three base64url parts, not JSON, an algorithm
    /// other than HS256, `sub`, `exp` or `aud` missing, or a `sub` that is not a client id.
    /// Close code 4602.
    MalformedToken,
    /// The token's `exp` has passed (beyond the clock leeway). Close code 4603, also when a
    /// token runs out during a session and no `refresh` came within the grace period.
    ExpiredToken,
    /// The token's signature does not verify with any secret the server holds. Close code 4604.
    InvalidTokenSignature,
    /// The token's `aud` is not the audience the server expects. Close code 4605.
    WrongTokenAudience,
    /// The handshake names a client id other than the token's `sub`, a `refresh` token is for
    /// another client, or an HTTP request reads another client's history or files (status 403).
    /// Close code 4606.
    ClientIdMismatch,
    /// HTTP: the credentials given do not open this endpoint (a wrong admin token; status 403).
    Forbidden,
    /// Too many connections are in their handshake: from this address (HTTP 429 on the
    /// upgrade, with `Retry-After`), or on the server, where this one was the oldest and made
    /// room for a newer one (close code 4005). Retry, and send the handshake frame at once.
    TooManyHandshakes,
    /// A frame larger than the server takes at this point: before the handshake is verified,
    /// more than 16 KiB in all. Close code 1009 follows.
    FrameTooLarge,
    /// Auth off: the request comes from a page of an origin that is neither loopback, nor the
    /// server's own, nor one of `--cors-origin` (HTTP 403; nothing is upgraded).
    ForbiddenOrigin,
    /// Auth off: the `Host` header names neither a loopback name, nor an IP address, nor one
    /// of `--allowed-host` (HTTP 421), so the page may be another site's (DNS rebinding).
    ForbiddenHost,
}

impl ErrorCode {
    /// Whether sending the same thing again later can succeed.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            Self::Busy
                | Self::OverCapacity
                | Self::ShuttingDown
                | Self::Unavailable
                | Self::Internal
                | Self::TooManyHandshakes
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::MalformedJson => "malformed_json",
            Self::BadFrame => "bad_frame",
            Self::HandshakeRequired => "handshake_required",
            Self::MissingClientId => "missing_client_id",
            Self::InvalidClientId => "invalid_client_id",
            Self::DuplicateConnection => "duplicate_connection",
            Self::OverCapacity => "over_capacity",
            Self::MissingTimezone => "missing_timezone",
            Self::UnknownTimezone => "unknown_timezone",
            Self::UnknownMessageType => "unknown_message_type",
            Self::UnknownFrame => "unknown_frame",
            Self::InvalidMessageId => "invalid_message_id",
            Self::EmptyText => "empty_text",
            Self::TextTooLong => "text_too_long",
            Self::MissingContent => "missing_content",
            Self::InvalidBase64 => "invalid_base64",
            Self::MissingFilename => "missing_filename",
            Self::InvalidFilename => "invalid_filename",
            Self::MediaTooLarge => "media_too_large",
            Self::MediaMismatch => "media_mismatch",
            Self::UnexpectedBinary => "unexpected_binary",
            Self::ExpectedBinary => "expected_binary",
            Self::Busy => "busy",
            Self::ShuttingDown => "shutting_down",
            Self::Unavailable => "unavailable",
            Self::ProcessingFailed => "processing_failed",
            Self::InvalidParameter => "invalid_parameter",
            Self::NotFound => "not_found",
            Self::Internal => "internal",
            Self::MissingToken => "missing_token",
            Self::MalformedToken => "malformed_token",
            Self::ExpiredToken => "expired_token",
            Self::InvalidTokenSignature => "invalid_token_signature",
            Self::WrongTokenAudience => "wrong_token_audience",
            Self::ClientIdMismatch => "client_id_mismatch",
            Self::Forbidden => "forbidden",
            Self::TooManyHandshakes => "too_many_handshakes",
            Self::FrameTooLarge => "frame_too_large",
            Self::ForbiddenOrigin => "forbidden_origin",
            Self::ForbiddenHost => "forbidden_host",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn as_str_matches_the_serialized_name() {
        for code in [
            ErrorCode::MalformedJson,
            ErrorCode::BadFrame,
            ErrorCode::UnknownTimezone,
            ErrorCode::MediaMismatch,
            ErrorCode::ExpectedBinary,
            ErrorCode::Busy,
            ErrorCode::Unavailable,
            ErrorCode::MissingToken,
            ErrorCode::InvalidTokenSignature,
            ErrorCode::ClientIdMismatch,
            ErrorCode::TooManyHandshakes,
            ErrorCode::FrameTooLarge,
            ErrorCode::ForbiddenOrigin,
            ErrorCode::ForbiddenHost,
        ] {
            let json = serde_json::to_string(&code).expect("serializes");
            assert_eq!(json, format!("\"{}\"", code.as_str()));
        }
    }
}
