//! The frames of the Python server kaiwa replaces, so its clients work unchanged.
//!
//! Client frames are parsed leniently into one flat [`ClientFrame`]: those clients send the
//! handshake, heartbeat answers and messages without a common tag, and some send numbers where
//! strings are expected.

use crate::{ErrorCode, ReplyType};
use serde::{Deserialize, Deserializer, Serialize};

/// Any frame a legacy client sends: the handshake (`client_id`, `timezone`), a heartbeat answer
/// (`type: "heartbeat"`), or a message (`message_type`, `content`, `filename`, `timestamp`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClientFrame {
    #[serde(
        rename = "type",
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient_string"
    )]
    pub kind: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient_string"
    )]
    pub client_id: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient_string"
    )]
    pub timezone: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient_string"
    )]
    pub message_type: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient_string"
    )]
    pub content: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient_string"
    )]
    pub filename: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient_string"
    )]
    pub timestamp: Option<String>,
    /// The signed token (JWT) of a server with auth on, in the handshake or a `refresh` frame
    /// (a kaiwa addition).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient_string"
    )]
    pub token: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "object_only"
    )]
    pub data: Option<Data>,
}

/// `data` as an object or `null`. Serde would also read a struct from a list of its fields in
/// order, so `"data": []` would pass as an empty object; a client that sends that has the shape
/// wrong and is told so.
fn object_only<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Data>, D::Error> {
    struct Object;

    impl<'de> serde::de::Visitor<'de> for Object {
        type Value = Option<Data>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an object or null")
        }

        fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            Data::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(Some)
        }

        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_none<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
    }

    deserializer.deserialize_any(Object)
}

/// Accepts a string, a number or a boolean as text, and `null` as absent: the clients in the wild
/// are not consistent about ids and timestamps. An array or an object is refused as soon as it
/// starts, without reading (or echoing) it.
pub(crate) fn lenient_string<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<String>, D::Error> {
    struct Lenient;

    impl<'de> serde::de::Visitor<'de> for Lenient {
        type Value = Option<String>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a string, a number, a boolean or null")
        }

        fn visit_str<E>(self, text: &str) -> Result<Self::Value, E> {
            Ok(Some(text.to_owned()))
        }

        fn visit_string<E>(self, text: String) -> Result<Self::Value, E> {
            Ok(Some(text))
        }

        fn visit_i64<E>(self, number: i64) -> Result<Self::Value, E> {
            Ok(Some(number.to_string()))
        }

        fn visit_u64<E>(self, number: u64) -> Result<Self::Value, E> {
            Ok(Some(number.to_string()))
        }

        fn visit_f64<E>(self, number: f64) -> Result<Self::Value, E> {
            Ok(Some(number.to_string()))
        }

        fn visit_bool<E>(self, flag: bool) -> Result<Self::Value, E> {
            Ok(Some(flag.to_string()))
        }

        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_none<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
    }

    deserializer.deserialize_any(Lenient)
}

/// The `type` of a server frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FrameKind {
    System,
    Heartbeat,
    Message,
    Error,
}

/// A frame the server sends: `{"type": ..., "data": {...}}`, plus `"is_system": true` on the
/// connection notice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerFrame {
    #[serde(rename = "type")]
    pub kind: FrameKind,
    pub data: Data,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub is_system: bool,
}

/// The `data` of a frame. One flat shape for all kinds, as the Python server had: a reply fills
/// `id`, `content`, `reply_type` (and `filename`, `mime_type` for media); a notice, rejection or
/// error fills `message` (and `code` for errors); a heartbeat fills `message` and `timestamp`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Data {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<i64>,
    /// The stored id of the message this frame answers (a kaiwa addition).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_type: Option<ReplyType>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filename: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mime_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<ErrorCode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<String>,
    /// Set on a text reply that is kaiwa's stand-in because the language model gave up (a
    /// kaiwa addition).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<bool>,
}

impl ServerFrame {
    pub fn connected() -> Self {
        Self {
            kind: FrameKind::System,
            data: Data {
                message: Some("Connected successfully".to_owned()),
                ..Data::default()
            },
            is_system: true,
        }
    }

    pub fn heartbeat_ping(timestamp: String) -> Self {
        Self {
            kind: FrameKind::Heartbeat,
            data: Data {
                message: Some("ping".to_owned()),
                timestamp: Some(timestamp),
                ..Data::default()
            },
            is_system: false,
        }
    }

    /// The answer to a client's own `heartbeat` ping.
    pub fn heartbeat_pong(timestamp: String) -> Self {
        Self {
            kind: FrameKind::Heartbeat,
            data: Data {
                message: Some("pong".to_owned()),
                timestamp: Some(timestamp),
                ..Data::default()
            },
            is_system: false,
        }
    }

    /// A notice from the server that is not about a message: a `system` frame whose `code` says
    /// what it is about (a kaiwa addition), e.g. `expired_token`.
    pub fn notice(code: Option<ErrorCode>, message: String) -> Self {
        Self {
            kind: FrameKind::System,
            data: Data {
                message: Some(message),
                code,
                ..Data::default()
            },
            is_system: true,
        }
    }

    /// A message refused by its time window (R6): a text "reply" carrying the reason.
    pub fn rejection(message_id: Option<i64>, reason: String) -> Self {
        Self {
            kind: FrameKind::Message,
            data: Data {
                message_id,
                message: Some(reason),
                reply_type: Some(ReplyType::Text),
                ..Data::default()
            },
            is_system: false,
        }
    }

    pub fn error(code: ErrorCode, message: String) -> Self {
        Self {
            kind: FrameKind::Error,
            data: Data {
                message: Some(message),
                code: Some(code),
                ..Data::default()
            },
            is_system: false,
        }
    }

    /// Whether this is a reply (as opposed to a rejection, which is also a `message` frame).
    pub fn is_reply(&self) -> bool {
        self.kind == FrameKind::Message && self.data.id.is_some()
    }
}

/// The answer a client gives to the server's heartbeat ping.
pub fn heartbeat_pong() -> ClientFrame {
    ClientFrame {
        kind: Some("heartbeat".to_owned()),
        data: Some(Data {
            message: Some("pong".to_owned()),
            ..Data::default()
        }),
        ..ClientFrame::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_the_python_clients_frames() {
        let hello: ClientFrame =
            serde_json::from_value(json!({"client_id": "u1", "timezone": "Asia/Ho_Chi_Minh"}))
                .expect("hello parses");
        assert_eq!(hello.client_id.as_deref(), Some("u1"));
        assert_eq!(hello.timezone.as_deref(), Some("Asia/Ho_Chi_Minh"));

        let numeric: ClientFrame =
            serde_json::from_value(json!({"client_id": 42, "timezone": "UTC", "timestamp": null}))
                .expect("numeric id parses");
        assert_eq!(numeric.client_id.as_deref(), Some("42"));
        assert_eq!(numeric.timestamp, None);

        let pong: ClientFrame =
            serde_json::from_value(json!({"type": "heartbeat", "data": {"message": "pong"}}))
                .expect("pong parses");
        assert_eq!(pong.kind.as_deref(), Some("heartbeat"));
    }

    #[test]
    fn arrays_and_objects_are_refused_without_being_echoed() {
        let err = serde_json::from_str::<ClientFrame>(r#"{"content": [1, 2, 3, "secret"]}"#)
            .expect_err("an array is not text");
        assert!(!err.to_string().contains("secret"), "{err}");
        assert!(serde_json::from_str::<ClientFrame>(r#"{"client_id": {"a": 1}}"#).is_err());
    }

    #[test]
    fn heartbeat_data_must_be_an_object() {
        for wrong in [r#"[]"#, r#"["pong"]"#, r#""pong""#, "7"] {
            let frame = format!(r#"{{"type": "heartbeat", "data": {wrong}}}"#);
            assert!(
                serde_json::from_str::<ClientFrame>(&frame).is_err(),
                "{frame} was accepted"
            );
        }
        let null: ClientFrame =
            serde_json::from_value(json!({"type": "heartbeat", "data": null})).expect("parses");
        assert_eq!(null.data, None);
    }

    #[test]
    fn frames_serialize_as_the_python_server_did() {
        assert_eq!(
            serde_json::to_value(ServerFrame::connected()).expect("serializes"),
            json!({"type": "system", "data": {"message": "Connected successfully"}, "is_system": true})
        );
        assert_eq!(
            serde_json::to_value(ServerFrame::rejection(None, "too late".into()))
                .expect("serializes"),
            json!({"type": "message", "data": {"message": "too late", "reply_type": "text"}})
        );
    }
}
