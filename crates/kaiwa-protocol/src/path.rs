//! The path dialect: the frames of the second Python system kaiwa replaces, whose clients name
//! themselves in the URL (`/<client_id>`, or `/ws/<client_id>`) and send no handshake frame, so
//! that they work unchanged.
//!
//! The server greets with `{"message": "Connected"}`, answers each message with
//! `{"type": ..., "content": ...}`, and keeps the connection alive with
//! `{"check_connection": "PING"}`, which the client answers with `"PONG"`. Some of those clients
//! encode every frame twice (the frame is a JSON string holding the object):
//! [`ClientFrame::parse`] reads both.

use crate::{ErrorCode, MessageStatus};
use serde::{Deserialize, Serialize};

/// The server's greeting on upgrade.
pub const CONNECTED: &str = "Connected";
/// What a second connection with a live client id is told, as that system told it.
pub const ALREADY_CONNECTED: &str = "Already connected";
/// The heartbeat's ping, either way.
pub const PING: &str = "PING";
/// The answer to a heartbeat ping, either way.
pub const PONG: &str = "PONG";

/// Any frame such a client sends: a message (`type`, `content`) or a heartbeat
/// (`check_connection`). Parsed leniently, like the legacy frames: numbers and booleans are
/// read as text, and `null` as absent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClientFrame {
    /// The message's type: `text`, `voice` or `video` (and `image`, a kaiwa addition); also
    /// `refresh` with `token` (auth on, a kaiwa addition).
    #[serde(
        rename = "type",
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::legacy::lenient_string"
    )]
    pub kind: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::legacy::lenient_string"
    )]
    pub content: Option<String>,
    /// A kaiwa addition: with it, `content` is a file in base64, as in the legacy frames.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::legacy::lenient_string"
    )]
    pub filename: Option<String>,
    /// A kaiwa addition: the client's own time of sending, stored and never trusted.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::legacy::lenient_string"
    )]
    pub timestamp: Option<String>,
    /// `PING` or `PONG`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::legacy::lenient_string"
    )]
    pub check_connection: Option<String>,
    /// A new token for the connection, with `"type": "refresh"` (auth on, a kaiwa addition).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::legacy::lenient_string"
    )]
    pub token: Option<String>,
}

impl ClientFrame {
    /// Reads a frame, also one encoded twice: a JSON string whose text is the frame. Only one
    /// level is undone; what is inside must be the object.
    pub fn parse(text: &str) -> Result<Self, serde_json::Error> {
        if text.trim_start().starts_with('"') {
            let inner: String = serde_json::from_str(text)?;
            return Self::object(&inner);
        }
        Self::object(text)
    }

    /// Serde would also read a struct from a list of its fields in order: a frame must be an
    /// object.
    fn object(text: &str) -> Result<Self, serde_json::Error> {
        let frame: Self = serde_json::from_str(text)?;
        if !text.trim_start().starts_with('{') {
            return Err(serde::de::Error::custom(
                "a frame must be a JSON object such as {\"type\": \"text\", \"content\": \"hi\"}",
            ));
        }
        Ok(frame)
    }

    /// A message as those clients send it.
    pub fn message(kind: &str, content: &str) -> Self {
        Self {
            kind: Some(kind.to_owned()),
            content: Some(content.to_owned()),
            ..Self::default()
        }
    }

    /// A heartbeat frame: [`PING`] or [`PONG`].
    pub fn check(word: &str) -> Self {
        Self {
            check_connection: Some(word.to_owned()),
            ..Self::default()
        }
    }
}

/// Any frame the server sends. Each shape has a field the others lack, so a client can read
/// any frame as this.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ServerFrame {
    /// The heartbeat: [`PING`] every heartbeat interval, [`PONG`] to a client's ping.
    Check { check_connection: String },
    /// A refusal or a frame that is about no message: `{"error": "...", "code": "..."}`.
    Error(Failure),
    /// The answer to a message: a reply, a rejection, or why it was not taken.
    Answer(Answer),
    /// The greeting, and kaiwa's notices (a token running out, a token refreshed).
    Notice(Notice),
}

impl ServerFrame {
    pub fn connected() -> Self {
        Self::Notice(Notice {
            message: CONNECTED.to_owned(),
            code: None,
        })
    }

    pub fn check(word: &str) -> Self {
        Self::Check {
            check_connection: word.to_owned(),
        }
    }
}

/// `{"error": "...", "code": "..."}`: a connection refused (then its close), or a frame that
/// asks for nothing valid and names no message type. `code` is a kaiwa addition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    pub error: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<ErrorCode>,
}

/// `{"message": "..."}`: the greeting, or a notice about the connection (`code` says which, a
/// kaiwa addition).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notice {
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<ErrorCode>,
}

/// `{"type": "...", "content": "..."}`: one answer to one message.
///
/// A reply's `type` is the reply's type (`text`, or `voice` and `image` for the clip and the
/// picture of a media message, whose `content` is then a URL path); a rejection or a refusal
/// keeps the message's own `type` and carries the reason in `content`. Every other field is a
/// kaiwa addition, which that system's clients ignore.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    #[serde(rename = "type")]
    pub kind: String,
    pub content: String,
    /// The stored id of the message answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<i64>,
    /// The reply's id, on a reply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_id: Option<i64>,
    /// `rejected` on a message stored as rejected (`content` is the reason).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<MessageStatus>,
    /// Why a message was not taken (nothing stored; `content` says it in words).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<ErrorCode>,
    /// With `busy` and `unavailable`: when to send it again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filename: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mime_type: Option<String>,
    /// A text reply that is kaiwa's stand-in because the language model gave up.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fallback: bool,
}

impl Answer {
    /// Whether this is a reply (as opposed to a rejection or a refusal).
    pub fn is_reply(&self) -> bool {
        self.reply_id.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_the_frames_of_that_systems_clients_once_or_twice_encoded() {
        let plain = ClientFrame::parse(r#"{"type": "voice", "content": "hello"}"#).expect("parses");
        assert_eq!(plain, ClientFrame::message("voice", "hello"));
        let twice = serde_json::to_string(r#"{"type": "voice", "content": "hello"}"#)
            .expect("a JSON string");
        assert_eq!(ClientFrame::parse(&twice).expect("parses"), plain);
        let pong = ClientFrame::parse(r#"{"check_connection": "PONG"}"#).expect("parses");
        assert_eq!(pong.check_connection.as_deref(), Some(PONG));
        let numeric = ClientFrame::parse(r#"{"type": "text", "content": 42}"#).expect("parses");
        assert_eq!(numeric.content.as_deref(), Some("42"));
    }

    #[test]
    fn a_string_that_holds_no_object_is_a_wrong_shape_and_broken_json_is_told_apart() {
        let category = |text: &str| ClientFrame::parse(text).map_err(|err| err.classify());
        assert_eq!(category("{"), Err(serde_json::error::Category::Eof));
        assert_eq!(
            category(r#""{\"type\": ""#),
            Err(serde_json::error::Category::Eof)
        );
        assert_eq!(
            category(r#""[1, 2]""#),
            Err(serde_json::error::Category::Data)
        );
        assert_eq!(category("[1, 2]"), Err(serde_json::error::Category::Data));
        assert_eq!(
            category(r#"{"content": [1]}"#),
            Err(serde_json::error::Category::Data)
        );
    }

    #[test]
    fn server_frames_are_spelled_as_that_system_spelled_them() {
        let spelled = |frame: &ServerFrame| serde_json::to_value(frame).expect("serializes");
        assert_eq!(
            spelled(&ServerFrame::connected()),
            json!({"message": "Connected"})
        );
        assert_eq!(
            spelled(&ServerFrame::check(PING)),
            json!({"check_connection": "PING"})
        );
        let reply = ServerFrame::Answer(Answer {
            kind: "text".into(),
            content: "hi there".into(),
            ..Answer::default()
        });
        assert_eq!(
            spelled(&reply),
            json!({"type": "text", "content": "hi there"})
        );
        let refused = ServerFrame::Error(Failure {
            error: ALREADY_CONNECTED.into(),
            code: None,
        });
        assert_eq!(spelled(&refused), json!({"error": "Already connected"}));
    }

    #[test]
    fn every_server_frame_reads_back_as_itself() {
        let frames = [
            ServerFrame::connected(),
            ServerFrame::check(PONG),
            ServerFrame::Error(Failure {
                error: "no".into(),
                code: Some(ErrorCode::InvalidClientId),
            }),
            ServerFrame::Answer(Answer {
                kind: "voice".into(),
                content: "too early".into(),
                message_id: Some(3),
                status: Some(MessageStatus::Rejected),
                ..Answer::default()
            }),
        ];
        for frame in frames {
            let text = serde_json::to_string(&frame).expect("serializes");
            let back: ServerFrame = serde_json::from_str(&text).expect("parses");
            assert_eq!(back, frame, "{text}");
        }
    }
}
