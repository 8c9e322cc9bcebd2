//! Why a connection gets no session, and how each reason is told: the error frame's code, the
//! close code, the words, the metric and the log line, in one place.

use super::HANDSHAKE_ALLOWANCE;
use super::handshake::HandshakeError;
use super::wire::Protocol;
use crate::domain::{ClientId, GatewayId};
use kaiwa_protocol::{CloseCode, ErrorCode};
use std::time::Duration;

/// How long the server waits for the client's answer to its close frame.
pub(super) const CLOSE_REPLY_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a stranger refused in its handshake gets to take its refusal, and to answer it.
const STRANGER_LINGER: Duration = Duration::from_millis(500);

#[derive(Debug)]
pub(super) enum Refusal {
    /// The server drains for shutdown and takes no new sessions.
    ShuttingDown,
    /// The handshake frame was a text frame that is not UTF-8.
    InvalidUtf8,
    /// No handshake frame in time.
    HandshakeTimeout,
    /// The connection sent more than it may before its handshake is verified.
    TooLarge,
    /// Too many connections were in their handshake; a newer one took this one's place.
    CrowdedOut,
    /// The handshake frame or its token was wrong: the handshake says how.
    BadHandshake {
        code: ErrorCode,
        close: CloseCode,
        message: String,
    },
    /// Every client slot of `whole` (this server, or the cluster) is taken.
    Full {
        whole: &'static str,
        max_clients: usize,
    },
    /// The cluster's shared state cannot be reached now.
    Unavailable,
    /// The client's reply stream could not be read.
    StreamUnreadable,
    /// A connection that still answers holds the client's id: on this gateway, or `elsewhere`.
    Duplicate {
        client_id: ClientId,
        elsewhere: Option<GatewayId>,
    },
}

impl Refusal {
    /// The refusal a failed handshake earns; `None` when nobody is left to tell.
    pub(super) fn of_handshake(err: HandshakeError) -> Option<(Option<Protocol>, Self)> {
        Some(match err {
            HandshakeError::Gone => return None,
            HandshakeError::ShuttingDown => (None, Self::ShuttingDown),
            HandshakeError::InvalidUtf8 => (None, Self::InvalidUtf8),
            HandshakeError::Timeout => (None, Self::HandshakeTimeout),
            HandshakeError::TooLarge => (None, Self::TooLarge),
            HandshakeError::CrowdedOut => (None, Self::CrowdedOut),
            HandshakeError::Invalid {
                protocol,
                code,
                close,
                message,
            } => (
                Some(protocol),
                Self::BadHandshake {
                    code,
                    close,
                    message,
                },
            ),
        })
    }

    pub(super) fn error_code(&self) -> ErrorCode {
        match self {
            Self::ShuttingDown => ErrorCode::ShuttingDown,
            Self::InvalidUtf8 => ErrorCode::MalformedJson,
            Self::HandshakeTimeout => ErrorCode::HandshakeRequired,
            Self::TooLarge => ErrorCode::FrameTooLarge,
            Self::CrowdedOut => ErrorCode::TooManyHandshakes,
            Self::BadHandshake { code, .. } => *code,
            Self::Full { .. } => ErrorCode::OverCapacity,
            Self::Unavailable | Self::StreamUnreadable => ErrorCode::Internal,
            Self::Duplicate { .. } => ErrorCode::DuplicateConnection,
        }
    }

    pub(super) fn close_code(&self) -> CloseCode {
        match self {
            Self::ShuttingDown => CloseCode::GoingAway,
            Self::InvalidUtf8 => CloseCode::InvalidPayload,
            Self::HandshakeTimeout => CloseCode::HandshakeTimeout,
            Self::TooLarge => CloseCode::MessageTooBig,
            Self::CrowdedOut => CloseCode::CrowdedOut,
            Self::BadHandshake { close, .. } => *close,
            Self::Full { .. } => CloseCode::OverCapacity,
            Self::Unavailable | Self::StreamUnreadable => CloseCode::InternalError,
            Self::Duplicate { .. } => CloseCode::DuplicateConnection,
        }
    }

    /// What the client is told, after the close code's name.
    pub(super) fn detail(&self) -> String {
        match self {
            Self::ShuttingDown => "server shutting down; reconnect shortly".to_owned(),
            Self::InvalidUtf8 => "a text frame was not valid UTF-8".to_owned(),
            Self::HandshakeTimeout => "no handshake frame in time".to_owned(),
            Self::TooLarge => format!(
                "before the handshake is verified a connection may send {HANDSHAKE_ALLOWANCE} bytes"
            ),
            Self::CrowdedOut => "too many connections were in their handshake; reconnect and send the handshake frame at once".to_owned(),
            Self::BadHandshake { message, .. } => message.clone(),
            Self::Full { whole, max_clients } => {
                format!("{whole} is full ({max_clients} clients); retry later")
            }
            Self::Unavailable => {
                "the cluster's client registry is unavailable; retry shortly".to_owned()
            }
            Self::StreamUnreadable => {
                "the server could not load this client's replies; retry shortly".to_owned()
            }
            Self::Duplicate { client_id, .. } => {
                format!("client id {client_id} is already connected")
            }
        }
    }

    /// The `reason` of `kaiwa_connections_refused_total`; `None` for a bad handshake frame,
    /// which is the client's bug rather than something an operator can act on.
    pub(super) fn metric(&self) -> Option<&'static str> {
        match self {
            Self::BadHandshake {
                close: CloseCode::BadHandshake,
                ..
            } => None,
            Self::Full { .. } => Some("over_capacity"),
            Self::Duplicate { .. } => Some("duplicate"),
            Self::Unavailable => Some("unavailable"),
            Self::StreamUnreadable => Some("internal_error"),
            other => Some(other.close_code().name()),
        }
    }

    /// How long sending the refusal, and then the client's close frame, may take. A stranger
    /// gets no long wait: until it is gone its socket counts nowhere (it has left the pool of
    /// strangers, and never had a slot).
    pub(super) fn linger(&self) -> Duration {
        match self {
            Self::Full { .. }
            | Self::Unavailable
            | Self::StreamUnreadable
            | Self::Duplicate { .. } => CLOSE_REPLY_TIMEOUT,
            _ => STRANGER_LINGER,
        }
    }

    /// Logs the refusal at the level its reason deserves.
    pub(super) fn log(&self) {
        let code = self.error_code().as_str();
        match self {
            Self::Duplicate {
                client_id,
                elsewhere: None,
            } => {
                tracing::info!(%client_id, "refused: the client id is connected and answering");
            }
            Self::Duplicate {
                client_id,
                elsewhere: Some(gateway),
            } => {
                tracing::info!(%client_id, %gateway, "refused: the client id is connected to another gateway");
            }
            // A token refused says something about a client: logged (the code, never the
            // token).
            _ if (4600..4700).contains(&self.close_code().code()) => {
                tracing::info!(code, "refused at the handshake");
            }
            // Strangers closed for their deadline, their size or a newcomer come in floods;
            // a full server says so in its metrics; the causes of the rest are logged where
            // they are found.
            _ => tracing::debug!(code, close = self.close_code().name(), "refused"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<Refusal> {
        vec![
            Refusal::ShuttingDown,
            Refusal::InvalidUtf8,
            Refusal::HandshakeTimeout,
            Refusal::TooLarge,
            Refusal::CrowdedOut,
            Refusal::BadHandshake {
                code: ErrorCode::MissingClientId,
                close: CloseCode::BadHandshake,
                message: "no client_id".into(),
            },
            Refusal::Full {
                whole: "the cluster",
                max_clients: 50,
            },
            Refusal::Unavailable,
            Refusal::StreamUnreadable,
            Refusal::Duplicate {
                client_id: ClientId::parse("alice").expect("valid"),
                elsewhere: None,
            },
        ]
    }

    #[test]
    fn every_refusal_but_a_bad_frame_is_counted_under_a_reason_of_its_own() {
        let mut reasons: Vec<_> = all().iter().filter_map(Refusal::metric).collect();
        assert_eq!(
            reasons.len(),
            all().len() - 1,
            "only a bad handshake frame is not counted"
        );
        reasons.sort_unstable();
        reasons.dedup();
        assert_eq!(
            reasons.len(),
            all().len() - 1,
            "two refusals share a reason"
        );
    }

    #[test]
    fn a_verified_client_waits_longer_for_its_close_than_a_stranger() {
        for refusal in all() {
            let verified = matches!(
                refusal,
                Refusal::Full { .. }
                    | Refusal::Unavailable
                    | Refusal::StreamUnreadable
                    | Refusal::Duplicate { .. }
            );
            assert_eq!(
                refusal.linger() == CLOSE_REPLY_TIMEOUT,
                verified,
                "{refusal:?}"
            );
        }
    }

    #[test]
    fn the_words_name_the_limit_and_the_client() {
        let full = Refusal::Full {
            whole: "server",
            max_clients: 50,
        };
        assert_eq!(full.detail(), "server is full (50 clients); retry later");
        assert_eq!(full.close_code(), CloseCode::OverCapacity);
        let duplicate = Refusal::Duplicate {
            client_id: ClientId::parse("alice").expect("valid"),
            elsewhere: Some(GatewayId::new("gw-2")),
        };
        assert_eq!(duplicate.detail(), "client id alice is already connected");
        assert_eq!(duplicate.error_code(), ErrorCode::DuplicateConnection);
        assert!(
            Refusal::TooLarge
                .detail()
                .contains(&HANDSHAKE_ALLOWANCE.to_string())
        );
    }
}
