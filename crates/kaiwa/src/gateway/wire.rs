//! Frames as each protocol spells them. Sessions and the delivery task say what to send; this
//! module says how, so the protocols never leak into the rest of the gateway.

use super::GatewaySettings;
use crate::queue::MessageRef;
use crate::store::StoredReply;
use axum::extract::ws::{CloseFrame, Utf8Bytes};
use chrono::{DateTime, SecondsFormat, Utc};
use kaiwa_protocol::{CloseCode, ErrorCode, MessageStatus, MessageType, legacy};
use kaiwa_protocol::{native, path};
use serde::Serialize;
use std::borrow::Cow;
use std::time::Duration;

/// The protocol a session speaks, fixed at the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocol {
    Legacy,
    Native,
    /// The path dialect: the client id in the URL, `type`/`content` frames (see
    /// [`kaiwa_protocol::path`]).
    Path,
}

/// The message a frame is about, as the client named it: what an answer must repeat.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct About {
    /// The client's own id of the message (native).
    pub id: Option<String>,
    /// Its type: the path dialect answers a message with its type. A known type's name is
    /// borrowed; an unknown one is as the client wrote it, trimmed and cut to 32 characters
    /// when it is read (see `command.rs`).
    pub message_type: Option<Cow<'static, str>>,
}

impl About {
    /// A frame about no message in particular.
    pub(crate) fn nothing() -> Self {
        Self::default()
    }

    /// A frame about the message the client calls `id` (native).
    pub(crate) fn id(id: Option<String>) -> Self {
        Self {
            id,
            message_type: None,
        }
    }

    /// A frame about a message of type `kind`, which the client calls `id` (native).
    pub(crate) fn message(id: Option<String>, kind: Option<MessageType>) -> Self {
        Self {
            id,
            message_type: kind.map(|kind| Cow::Borrowed(kind.as_str())),
        }
    }

    /// The type to answer with.
    fn kind(&self) -> Option<String> {
        self.message_type.as_deref().map(str::to_owned)
    }
}

fn encode<T: Serialize>(frame: &T) -> Utf8Bytes {
    // Our frame types are plain data: serializing them cannot fail.
    serde_json::to_string(frame)
        .unwrap_or_else(|_| r#"{"type":"error","data":{"message":"internal error"}}"#.to_owned())
        .into()
}

/// A close frame: `code`, with a reason that starts with its name.
pub(super) fn close_frame(code: CloseCode, detail: &str) -> CloseFrame {
    CloseFrame {
        code: code.code(),
        reason: code.reason(detail).into(),
    }
}

fn iso(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

impl Protocol {
    /// What a connection speaks until its first frame says otherwise: `kaiwa.v1` if the upgrade
    /// request chose that subprotocol, else the legacy protocol.
    pub(crate) fn chosen_at_upgrade(native: bool) -> Self {
        if native { Self::Native } else { Self::Legacy }
    }

    pub(crate) fn welcome(
        self,
        client_id: &str,
        timezone: &str,
        now: DateTime<Utc>,
        settings: &GatewaySettings,
        token_expires_at: Option<DateTime<Utc>>,
    ) -> Utf8Bytes {
        let sessions = &settings.sessions;
        match self {
            Self::Legacy => encode(&legacy::ServerFrame::connected()),
            Self::Path => encode(&path::ServerFrame::connected()),
            Self::Native => encode(&native::ServerFrame::Welcome(native::Welcome {
                client_id: client_id.to_owned(),
                timezone: timezone.to_owned(),
                protocol: kaiwa_protocol::SUBPROTOCOL.to_owned(),
                server_time: now,
                heartbeat_interval_ms: millis(sessions.heartbeat_interval),
                heartbeat_timeout_ms: millis(sessions.heartbeat_timeout),
                first_message_timeout_ms: millis(sessions.first_message_timeout),
                limits: settings.limits,
                windows: settings.windows.clone(),
                token_expires_at,
            })),
        }
    }

    /// The connection's token ran out: it has `closes_in` to send `refresh`.
    pub(crate) fn token_expired(self, expired_at: DateTime<Utc>, closes_in: Duration) -> Utf8Bytes {
        let message = format!(
            "your token expired at {}: send {{\"type\":\"refresh\",\"token\":...}} with a new one within {} s, or the connection closes with 4603",
            iso(expired_at),
            closes_in.as_secs_f64()
        );
        match self {
            Self::Legacy => encode(&legacy::ServerFrame::notice(
                Some(ErrorCode::ExpiredToken),
                message,
            )),
            Self::Path => encode(&path::ServerFrame::Notice(path::Notice {
                message,
                code: Some(ErrorCode::ExpiredToken),
            })),
            Self::Native => encode(&native::ServerFrame::TokenExpired {
                expired_at,
                closes_in_ms: millis(closes_in),
                message,
            }),
        }
    }

    /// The answer to a good `refresh`: the connection's token now runs until `expires_at`.
    pub(crate) fn refreshed(self, expires_at: DateTime<Utc>) -> Utf8Bytes {
        let message = format!("Token refreshed; it expires at {}", iso(expires_at));
        match self {
            Self::Legacy => encode(&legacy::ServerFrame::notice(None, message)),
            Self::Path => encode(&path::ServerFrame::Notice(path::Notice {
                message,
                code: None,
            })),
            Self::Native => encode(&native::ServerFrame::Refreshed { expires_at }),
        }
    }

    /// Whether the heartbeat sends a WebSocket ping. Not to path clients: that system pinged
    /// in its own words only, and its clients' PONG, not the pong every WebSocket library
    /// sends by itself, is what shows that one still reads and answers. (The probe of a
    /// duplicate id, `Liveness::answers`, pings every protocol: any answer within its short
    /// wait shows the connection is open, which is all it asks.)
    pub(crate) fn websocket_pings(self) -> bool {
        !matches!(self, Self::Path)
    }

    /// The application-level heartbeat, for legacy and path clients; native ones get
    /// WebSocket pings only.
    pub(crate) fn heartbeat(self, now: DateTime<Utc>) -> Option<Utf8Bytes> {
        match self {
            Self::Legacy => Some(encode(&legacy::ServerFrame::heartbeat_ping(iso(now)))),
            Self::Path => Some(encode(&path::ServerFrame::check(path::PING))),
            Self::Native => None,
        }
    }

    pub(crate) fn heartbeat_answer(self, now: DateTime<Utc>, nonce: Option<u64>) -> Utf8Bytes {
        match self {
            Self::Legacy => encode(&legacy::ServerFrame::heartbeat_pong(iso(now))),
            Self::Path => encode(&path::ServerFrame::check(path::PONG)),
            Self::Native => encode(&native::ServerFrame::Pong { nonce }),
        }
    }

    /// Something asked for was not done. A path client is answered in the shape of a reply when
    /// the frame was a message (its `type` repeated, the reason as `content`), so that a client
    /// that reads one frame per message stays in step; otherwise with `{"error": ...}`.
    pub(crate) fn error(
        self,
        code: ErrorCode,
        message: String,
        about: About,
        retry_after: Option<Duration>,
    ) -> Utf8Bytes {
        match self {
            Self::Legacy => encode(&legacy::ServerFrame::error(code, message)),
            Self::Path => match about.kind() {
                Some(kind) => encode(&path::ServerFrame::Answer(path::Answer {
                    kind,
                    content: message,
                    code: Some(code),
                    retry_after_ms: retry_after.map(millis),
                    ..path::Answer::default()
                })),
                None => {
                    // That system's clients know this refusal by its words.
                    let error = if code == ErrorCode::DuplicateConnection {
                        path::ALREADY_CONNECTED.to_owned()
                    } else {
                        message
                    };
                    encode(&path::ServerFrame::Error(path::Failure {
                        error,
                        code: Some(code),
                    }))
                }
            },
            Self::Native => encode(&native::ServerFrame::Error(native::Error {
                code,
                message,
                id: about.id,
                retry_after_ms: retry_after.map(millis),
            })),
        }
    }

    /// A message's replies could not be stored; it is kept and processed again. A path client
    /// is told nothing: its one answer is the reply that comes then, and a frame now would put
    /// a client that reads one frame per message out of step.
    pub(crate) fn processing_failed(
        self,
        message: &MessageRef,
        reason: String,
    ) -> Option<Utf8Bytes> {
        match self {
            Self::Path => None,
            Self::Legacy | Self::Native => Some(self.error(
                ErrorCode::ProcessingFailed,
                reason,
                About::id(message.client_message_id.clone()),
                None,
            )),
        }
    }

    /// The answer to a stored message: an ack for native clients; for legacy and path ones
    /// only a rejection is announced (they learn of acceptance from the replies).
    pub(crate) fn stored(
        self,
        about: About,
        message_id: i64,
        status: MessageStatus,
        reason: Option<String>,
        duplicate: bool,
        received_at: DateTime<Utc>,
    ) -> Option<Utf8Bytes> {
        match self {
            Self::Legacy => (status == MessageStatus::Rejected).then(|| {
                encode(&legacy::ServerFrame::rejection(
                    Some(message_id),
                    reason.unwrap_or_default(),
                ))
            }),
            Self::Path => (status == MessageStatus::Rejected).then(|| {
                encode(&path::ServerFrame::Answer(path::Answer {
                    kind: about.kind().unwrap_or_default(),
                    content: reason.unwrap_or_default(),
                    message_id: Some(message_id),
                    status: Some(status),
                    ..path::Answer::default()
                }))
            }),
            Self::Native => Some(encode(&native::ServerFrame::Ack(native::Ack {
                id: about.id.unwrap_or_default(),
                message_id,
                status,
                reason,
                duplicate,
                received_at,
            }))),
        }
    }

    /// `processing` and `replied`, for native clients only.
    pub(crate) fn status(self, message: &MessageRef, status: MessageStatus) -> Option<Utf8Bytes> {
        match self {
            Self::Legacy | Self::Path => None,
            Self::Native => Some(encode(&native::ServerFrame::Status(native::Status {
                id: message.client_message_id.clone(),
                message_id: message.message_id,
                status,
            }))),
        }
    }

    /// A reply's frame. Takes the reply, whose text (a model's answer may be long) moves into
    /// the frame rather than being copied.
    pub(crate) fn reply(self, message: &MessageRef, reply: StoredReply, missed: bool) -> Utf8Bytes {
        match self {
            Self::Legacy => encode(&legacy::ServerFrame {
                kind: legacy::FrameKind::Message,
                data: legacy::Data {
                    id: Some(reply.id),
                    message_id: Some(message.message_id),
                    content: Some(reply.content),
                    reply_type: Some(reply.reply_type),
                    filename: reply.filename,
                    mime_type: reply.mime_type,
                    fallback: reply.fallback.then_some(true),
                    ..legacy::Data::default()
                },
                is_system: false,
            }),
            // One frame per reply, typed by what it carries: a text message's one reply is
            // `text`, as that system answered it.
            Self::Path => encode(&path::ServerFrame::Answer(path::Answer {
                kind: reply.reply_type.as_str().to_owned(),
                content: reply.content,
                message_id: Some(message.message_id),
                reply_id: Some(reply.id),
                filename: reply.filename,
                mime_type: reply.mime_type,
                fallback: reply.fallback,
                ..path::Answer::default()
            })),
            Self::Native => encode(&native::ServerFrame::Reply(native::Reply {
                id: message.client_message_id.clone(),
                message_id: message.message_id,
                seq: reply.seq,
                reply: native::ReplyBody {
                    id: reply.id,
                    reply_type: reply.reply_type,
                    content: reply.content,
                    filename: reply.filename,
                    mime_type: reply.mime_type,
                    fallback: reply.fallback,
                    created_at: reply.created_at,
                },
                missed,
            })),
        }
    }

    /// A piece of a text reply being written: native clients show it growing; the others wait
    /// for the whole reply.
    pub(crate) fn delta(self, message: &MessageRef, delta: String) -> Option<Utf8Bytes> {
        match self {
            Self::Legacy | Self::Path => None,
            Self::Native => Some(encode(&native::ServerFrame::Delta(native::Delta {
                id: message.client_message_id.clone(),
                message_id: message.message_id,
                delta,
            }))),
        }
    }

    /// The end of a replay: `replies` sent, the stream now at `seq`.
    pub(crate) fn synced(self, replies: u32, seq: u64) -> Option<Utf8Bytes> {
        match self {
            Self::Legacy | Self::Path => None,
            Self::Native => Some(encode(&native::ServerFrame::Synced { replies, seq })),
        }
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}
