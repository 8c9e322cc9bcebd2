//! `kaiwa.v1`, the native protocol: tagged frames in both directions.
//!
//! A client tags each message with its own id; the server acks it with the stored id and status,
//! announces `processing`, and names the message in every reply. Media may follow a `send` frame
//! as one binary frame instead of base64 text.
//!
//! Replies form one stream per client id: each carries `seq`, its place in that stream (1, 2, 3,
//! ...), and a connection receives them in `seq` order. A client acknowledges what it has
//! processed with `received` (cumulative), and on reconnect says where it stopped (`hello` with
//! `after`): the server then sends every later reply, in order, and goes on with live ones with
//! no gap and no duplicate at the seam. That is what makes every reply arrive exactly once
//! across reconnects.

use crate::{ErrorCode, MessageStatus, MessageType, ReplyType};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// What a native client sends.
///
/// Fields the server validates are optional here, so that a missing one gets its own error code
/// rather than a generic parse error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    Hello(Hello),
    Send(Send),
    /// An application-level ping, for clients (such as browsers) that cannot send WebSocket pings.
    Ping {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        nonce: Option<u64>,
    },
    /// Asks for every reply after `after` (default: after the last one this connection sent),
    /// then `synced`.
    Sync {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<u64>,
    },
    /// The client has processed every reply up to and including `seq` (cumulative): the server
    /// records them `delivered`.
    Received {
        seq: u64,
    },
    /// A new token for this connection (auth on): before the current one runs out, or within
    /// the grace period after `token_expired`. Answered with `refreshed`, or an `error` with
    /// the token's error code (the connection goes on, with the old token's deadline).
    Refresh {
        #[serde(default)]
        token: Option<String>,
    },
    /// Any frame type this version does not know.
    #[serde(other)]
    Unknown,
}

/// Any native client frame as a server reads it: one flat shape, every field optional, unknown
/// fields skipped. A tagged enum like [`ClientFrame`] must buffer a whole frame (a 30 MB file
/// included) before it can read the tag; this reads each field once, in place.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct IncomingFrame {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub client_id: Option<String>,
    pub timezone: Option<String>,
    pub resume: bool,
    pub id: Option<String>,
    pub message_type: Option<String>,
    pub content: Option<String>,
    pub filename: Option<String>,
    pub timestamp: Option<String>,
    pub binary: bool,
    pub nonce: Option<u64>,
    pub after: Option<u64>,
    pub seq: Option<u64>,
    pub token: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default)]
    pub timezone: Option<String>,
    /// Send the replies this client has not acknowledged, right after `welcome`. Prefer
    /// `after`, which says exactly where the client stopped.
    #[serde(default)]
    pub resume: bool,
    /// The `seq` of the last reply the client processed (0 for none): every later reply is sent
    /// right after `welcome`, in order, then `synced`. Implies `resume`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<u64>,
    /// The signed token (JWT) that says who the client is, when the server has auth on; its
    /// `sub` is the client id, and `client_id` may then be left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Send {
    /// The client's own id for this message (1–64 characters). Sending the same id again, for
    /// example after a reconnect, is answered with the first ack and stores nothing new.
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub message_type: Option<String>,
    /// The text, or the file as base64 when `binary` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filename: Option<String>,
    /// The client's own clock at sending, stored as given and never used to judge windows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<String>,
    /// The file follows as the next frame, a binary one, instead of in `content`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub binary: bool,
}

/// What the server sends to a native client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    Welcome(Welcome),
    Ack(Ack),
    Status(Status),
    /// A piece of a text reply still being written (streamed from a language model); the
    /// `reply` frame that follows carries the whole text.
    Delta(Delta),
    Reply(Reply),
    Error(Error),
    Pong {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        nonce: Option<u64>,
    },
    /// Ends the replay that `resume`, `after` or `sync` asked for: `replies` were sent, and the
    /// connection's stream now stands at `seq` (the last reply sent; live replies follow it).
    Synced {
        replies: u32,
        seq: u64,
    },
    /// The connection's token has expired: send `refresh` with a new one within
    /// `closes_in_ms`, or the connection is closed with 4603 (`expired_token`).
    TokenExpired {
        expired_at: DateTime<Utc>,
        closes_in_ms: u64,
        message: String,
    },
    /// The answer to a `refresh` that carried a good token: it now runs until `expires_at`.
    Refreshed {
        expires_at: DateTime<Utc>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    pub client_id: String,
    /// The canonical IANA name of the timezone the client gave.
    pub timezone: String,
    pub protocol: String,
    pub server_time: DateTime<Utc>,
    pub heartbeat_interval_ms: u64,
    pub heartbeat_timeout_ms: u64,
    pub first_message_timeout_ms: u64,
    pub limits: Limits,
    pub windows: Vec<WindowInfo>,
    /// When the connection's token runs out (auth on only): `refresh` before then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_expires_at: Option<DateTime<Utc>>,
}

/// The limits a client should check before sending, so it can refuse a file without uploading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub max_text_chars: usize,
    pub max_image_bytes: usize,
    pub max_voice_bytes: usize,
    pub max_video_bytes: usize,
    pub max_in_flight_per_client: usize,
}

/// When a message type is accepted, in the client's local time: `start` inclusive, `end`
/// exclusive, as `HH:MM` (`24:00` is midnight at the end of the day).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowInfo {
    pub message_type: MessageType,
    pub start: String,
    pub end: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ack {
    /// The client's id for the message.
    pub id: String,
    /// The id the message is stored under.
    pub message_id: i64,
    /// `accepted`, or `rejected` with `reason`; for a duplicate, the stored status.
    pub status: MessageStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// This id was seen before; nothing new was stored.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
    pub received_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub message_id: i64,
    pub status: MessageStatus,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delta {
    /// The client's id of the message being answered, when it gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub message_id: i64,
    /// The next piece of the text: append it to what came before.
    pub delta: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// The client's id of the message this answers, when it gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub message_id: i64,
    /// The reply's place in this client's reply stream: what `received` and `after` refer to.
    pub seq: u64,
    pub reply: ReplyBody,
    /// This reply was due while the client was away, and comes from `resume` or `sync`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub missed: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplyBody {
    pub id: i64,
    pub reply_type: ReplyType,
    /// The text, or the URL path of the media file.
    pub content: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filename: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mime_type: Option<String>,
    /// The text responder gave up and this is kaiwa's stand-in text.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fallback: bool,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Error {
    pub code: ErrorCode,
    pub message: String,
    /// The client's id of the message this error is about, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn unknown_frame_types_parse_as_unknown() {
        let frame: ClientFrame =
            serde_json::from_value(json!({"type": "teleport", "to": "mars"})).expect("parses");
        assert_eq!(frame, ClientFrame::Unknown);
    }

    #[test]
    fn send_without_optional_fields_parses() {
        let frame: ClientFrame = serde_json::from_value(
            json!({"type": "send", "id": "c1", "message_type": "text", "content": "hi"}),
        )
        .expect("parses");
        let ClientFrame::Send(send) = frame else {
            panic!("expected a send frame");
        };
        assert_eq!(send.id.as_deref(), Some("c1"));
        assert!(!send.binary);
    }

    #[test]
    fn every_client_frame_reads_as_an_incoming_frame() {
        let frames = [
            ClientFrame::Hello(Hello {
                client_id: Some("u".into()),
                timezone: Some("UTC".into()),
                resume: true,
                after: Some(17),
                token: Some("a.b.c".into()),
            }),
            ClientFrame::Send(Send {
                id: Some("m1".into()),
                message_type: Some("image".into()),
                filename: Some("a.png".into()),
                binary: true,
                ..Send::default()
            }),
            ClientFrame::Ping { nonce: Some(7) },
            ClientFrame::Sync { after: None },
            ClientFrame::Sync { after: Some(3) },
            ClientFrame::Received { seq: 9 },
            ClientFrame::Refresh {
                token: Some("a.b.c".into()),
            },
        ];
        for frame in frames {
            let json = serde_json::to_string(&frame).expect("serializes");
            let incoming: IncomingFrame = serde_json::from_str(&json).expect("parses");
            assert!(incoming.kind.is_some(), "{json}");
        }
        let odd: IncomingFrame = serde_json::from_value(
            json!({"type": "send", "id": "x", "extra": [1, 2, {"deep": true}]}),
        )
        .expect("unknown fields are skipped");
        assert_eq!(odd.id.as_deref(), Some("x"));
    }

    #[test]
    fn server_frames_are_tagged_by_type() {
        let frame = ServerFrame::Synced {
            replies: 3,
            seq: 12,
        };
        assert_eq!(
            serde_json::to_value(&frame).expect("serializes"),
            json!({"type": "synced", "replies": 3, "seq": 12})
        );
        let sync: ClientFrame = serde_json::from_value(json!({"type": "sync"})).expect("parses");
        assert_eq!(sync, ClientFrame::Sync { after: None });
    }
}
