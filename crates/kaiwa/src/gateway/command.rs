//! What a client asks for: every frame read from a connection, in any protocol, becomes one
//! [`Command`], which the session then applies. This is the only place that knows how each
//! protocol spells its requests.

use super::wire::{About, Protocol};
use crate::admission::{self, Submission};
use crate::auth::Token;
use axum::extract::ws::Message;
use bytes::Bytes;
use kaiwa_protocol::{ErrorCode, MessageType, legacy, native, path};

#[derive(Debug, PartialEq)]
pub(super) enum Command {
    /// A message, ready for admission.
    Send(Submission),
    /// A native `send` with `binary: true`: its file comes in the next frame.
    Announce(Submission),
    /// A binary frame: the file of the announced message, if one was announced.
    File(Bytes),
    /// An application-level ping (legacy `heartbeat` ping, native `ping`, path
    /// `check_connection`): answered with a pong.
    Ping { nonce: Option<u64> },
    /// Nothing to do but note that the client is alive: a heartbeat answer, a WebSocket ping or
    /// pong, a repeated legacy handshake.
    Alive,
    /// Native: send the reply stream again after `after`, then `synced`.
    Sync { after: Option<u64> },
    /// Native: every reply up to `seq` was processed.
    Received { seq: u64 },
    /// A new token for the connection (auth on), in either protocol.
    Refresh { token: Option<Token> },
    /// A frame that asks for nothing valid: the client is told why, and the connection goes on.
    Refuse {
        code: ErrorCode,
        message: String,
        /// The message concerned, as far as the frame named one.
        about: About,
    },
    /// The client closed the connection.
    Close,
}

impl Command {
    /// Reads one frame as a command of `protocol`.
    pub(super) fn from_frame(protocol: Protocol, frame: Message) -> Self {
        match frame {
            Message::Text(text) => match protocol {
                Protocol::Legacy => Self::from_legacy(&text),
                Protocol::Native => Self::from_native(&text),
                Protocol::Path => Self::from_path(&text),
            },
            Message::Binary(bytes) => Self::File(bytes),
            Message::Ping(_) | Message::Pong(_) => Self::Alive,
            Message::Close(_) => Self::Close,
        }
    }

    fn from_legacy(text: &str) -> Self {
        let frame: legacy::ClientFrame = match serde_json::from_str(text) {
            Ok(frame) => frame,
            Err(err) => return Self::unreadable(&err, None),
        };
        // A frame with `message_type` is a message, whatever its `type` says.
        if frame.message_type.is_none() {
            match frame.kind.as_deref() {
                Some("heartbeat") => {
                    let ping = frame.data.and_then(|data| data.message).as_deref() == Some("ping");
                    return if ping {
                        Self::Ping { nonce: None }
                    } else {
                        Self::Alive
                    };
                }
                Some("refresh") => {
                    return Self::Refresh {
                        token: frame.token.map(Token::new),
                    };
                }
                Some(other) => {
                    return Self::refuse(
                        ErrorCode::UnknownFrame,
                        format!(
                            "unknown frame type {:?}",
                            other.chars().take(32).collect::<String>()
                        ),
                        None,
                    );
                }
                // A repeated handshake is harmless: the client is already connected.
                None if frame.content.is_none() && frame.client_id.is_some() => {
                    return Self::Alive;
                }
                None => {}
            }
        }
        Self::Send(Submission {
            client_message_id: None,
            message_type: frame.message_type,
            content: frame.content,
            filename: frame.filename,
            client_timestamp: frame.timestamp,
            binary: None,
            text_notes: false,
        })
    }

    fn from_native(text: &str) -> Self {
        let frame: native::IncomingFrame = match serde_json::from_str(text) {
            Ok(frame) => frame,
            Err(err) => return Self::unreadable(&err, None),
        };
        match frame.kind.as_deref() {
            Some("send") => {
                let id = match admission::client_message_id(frame.id.clone()) {
                    Ok(id) => id,
                    Err(invalid) => {
                        return Self::refuse(invalid.code(), invalid.to_string(), frame.id);
                    }
                };
                let submission = Submission {
                    client_message_id: Some(id),
                    message_type: frame.message_type,
                    content: frame.content,
                    filename: frame.filename,
                    client_timestamp: frame.timestamp,
                    binary: None,
                    text_notes: false,
                };
                if frame.binary {
                    Self::Announce(submission)
                } else {
                    Self::Send(submission)
                }
            }
            Some("ping") => Self::Ping { nonce: frame.nonce },
            Some("refresh") => Self::Refresh {
                token: frame.token.map(Token::new),
            },
            Some("sync") => Self::Sync { after: frame.after },
            Some("received") => match frame.seq {
                Some(seq) => Self::Received { seq },
                None => Self::refuse(
                    ErrorCode::BadFrame,
                    r#"received needs "seq": the seq of the last reply processed"#.into(),
                    None,
                ),
            },
            Some("hello") => Self::refuse(
                ErrorCode::UnknownFrame,
                "already connected: hello is only the first frame".into(),
                None,
            ),
            _ => Self::refuse(
                ErrorCode::UnknownFrame,
                "unknown frame type; see docs/protocol.md".into(),
                None,
            ),
        }
    }

    /// The path dialect: `{"type": ..., "content": ...}` messages (also encoded twice), and
    /// `check_connection` heartbeats. A message's `type` is its message type, so an unknown one
    /// is refused here, in the words of this dialect; anything else goes to admission.
    fn from_path(text: &str) -> Self {
        let frame = match path::ClientFrame::parse(text) {
            Ok(frame) => frame,
            Err(err) => return Self::unreadable(&err, None),
        };
        let Some(kind) = frame.kind else {
            return match frame.check_connection.as_deref().map(str::trim) {
                Some(word) if word.eq_ignore_ascii_case(path::PING) => Self::Ping { nonce: None },
                Some(word) if word.eq_ignore_ascii_case(path::PONG) => Self::Alive,
                Some(_) => Self::refuse(
                    ErrorCode::BadFrame,
                    r#"check_connection must be "PING" or "PONG""#.into(),
                    None,
                ),
                None => Self::refuse(
                    ErrorCode::UnknownMessageType,
                    r#"a message needs "type" (text, voice or video) and "content""#.into(),
                    None,
                ),
            };
        };
        if kind == "refresh" {
            return Self::Refresh {
                token: frame.token.map(Token::new),
            };
        }
        if MessageType::parse(kind.trim()).is_none() {
            // Echoed in the answer's `type`: kept short.
            let written: String = kind.trim().chars().take(32).collect();
            let message = format!(
                "unknown type {:?}: use text, voice or video (or image, with a filename)",
                kind.chars().take(32).collect::<String>()
            );
            return Self::Refuse {
                code: ErrorCode::UnknownMessageType,
                message,
                about: About {
                    id: None,
                    message_type: Some(written.into()),
                },
            };
        }
        Self::Send(Submission {
            client_message_id: None,
            message_type: Some(kind),
            content: frame.content,
            filename: frame.filename,
            client_timestamp: frame.timestamp,
            binary: None,
            text_notes: true,
        })
    }

    /// Not JSON at all, or JSON of the wrong shape: two different mistakes, told apart.
    fn unreadable(err: &serde_json::Error, id: Option<String>) -> Self {
        match err.classify() {
            serde_json::error::Category::Data => {
                Self::refuse(ErrorCode::BadFrame, format!("invalid frame: {err}"), id)
            }
            _ => Self::refuse(
                ErrorCode::MalformedJson,
                format!("invalid frame: not JSON: {err}"),
                id,
            ),
        }
    }

    fn refuse(code: ErrorCode, message: String, id: Option<String>) -> Self {
        Self::Refuse {
            code,
            message,
            about: About::id(id),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn legacy(text: &str) -> Command {
        Command::from_frame(Protocol::Legacy, Message::Text(text.into()))
    }

    fn native(text: &str) -> Command {
        Command::from_frame(Protocol::Native, Message::Text(text.into()))
    }

    fn code(command: &Command) -> Option<ErrorCode> {
        match command {
            Command::Refuse { code, .. } => Some(*code),
            _ => None,
        }
    }

    #[test]
    fn both_protocols_read_into_the_same_commands() {
        let Command::Send(old) = legacy(r#"{"message_type":"text","content":"hi"}"#) else {
            panic!("a legacy message");
        };
        let Command::Send(new) =
            native(r#"{"type":"send","id":"m1","message_type":"text","content":"hi"}"#)
        else {
            panic!("a native message");
        };
        assert_eq!(old.content, new.content);
        assert_eq!(new.client_message_id.as_deref(), Some("m1"));
        assert_eq!(
            legacy(r#"{"type":"heartbeat","data":{"message":"ping"}}"#),
            Command::Ping { nonce: None }
        );
        assert_eq!(
            native(r#"{"type":"ping","nonce":4}"#),
            Command::Ping { nonce: Some(4) }
        );
        assert_eq!(
            legacy(r#"{"type":"heartbeat","data":{"message":"pong"}}"#),
            Command::Alive
        );
        assert_eq!(
            legacy(r#"{"client_id":"a","timezone":"UTC"}"#),
            Command::Alive,
            "a repeated handshake"
        );
        assert_eq!(
            native(r#"{"type":"sync","after":3}"#),
            Command::Sync { after: Some(3) }
        );
        assert_eq!(
            native(r#"{"type":"received","seq":9}"#),
            Command::Received { seq: 9 }
        );
        assert!(matches!(
            native(
                r#"{"type":"send","id":"f","message_type":"image","filename":"a.png","binary":true}"#
            ),
            Command::Announce(_)
        ));
        for refresh in [
            native(r#"{"type":"refresh","token":"a.b.c"}"#),
            legacy(r#"{"type":"refresh","token":"a.b.c"}"#),
        ] {
            assert_eq!(
                refresh,
                Command::Refresh {
                    token: Some(Token::new("a.b.c"))
                }
            );
        }
    }

    fn path(text: &str) -> Command {
        Command::from_frame(Protocol::Path, Message::Text(text.into()))
    }

    #[test]
    fn the_path_dialect_reads_messages_once_or_twice_encoded_and_its_heartbeats() {
        let Command::Send(once) = path(r#"{"type": "video", "content": "hello"}"#) else {
            panic!("a path message");
        };
        assert_eq!(once.message_type.as_deref(), Some("video"));
        assert_eq!(once.content.as_deref(), Some("hello"));
        assert!(once.text_notes, "its media types carry text");
        let twice = serde_json::to_string(r#"{"type": "video", "content": "hello"}"#)
            .expect("a JSON string");
        assert_eq!(path(&twice), Command::Send(once));
        assert_eq!(
            path(r#"{"check_connection": "PING"}"#),
            Command::Ping { nonce: None }
        );
        assert_eq!(path(r#"{"check_connection": "PONG"}"#), Command::Alive);
        assert_eq!(
            path(r#"{"type": "refresh", "token": "a.b.c"}"#),
            Command::Refresh {
                token: Some(Token::new("a.b.c"))
            }
        );
    }

    #[test]
    fn path_frames_that_ask_for_nothing_valid_say_why_and_repeat_the_type_they_named() {
        let Command::Refuse {
            code: refused,
            about,
            ..
        } = path(r#"{"type": "sticker", "content": "hi"}"#)
        else {
            panic!("refused");
        };
        assert_eq!(refused, ErrorCode::UnknownMessageType);
        assert_eq!(about.message_type.as_deref(), Some("sticker"));
        assert_eq!(
            code(&path(r#"{"content": "no type"}"#)),
            Some(ErrorCode::UnknownMessageType)
        );
        assert_eq!(
            code(&path(r#"{"check_connection": "HELLO"}"#)),
            Some(ErrorCode::BadFrame)
        );
        assert_eq!(code(&path("not json")), Some(ErrorCode::MalformedJson));
        assert_eq!(code(&path(r#""[1]""#)), Some(ErrorCode::BadFrame));
        assert_eq!(code(&path("[1, 2]")), Some(ErrorCode::BadFrame));
    }

    #[test]
    fn a_message_type_makes_a_frame_a_message_whatever_its_type() {
        assert!(matches!(
            legacy(r#"{"type":"heartbeat","message_type":"text","content":"hi"}"#),
            Command::Send(_)
        ));
    }

    #[test]
    fn wrong_shapes_and_broken_json_are_told_apart() {
        assert_eq!(code(&legacy("{")), Some(ErrorCode::MalformedJson));
        assert_eq!(code(&native("not json")), Some(ErrorCode::MalformedJson));
        assert_eq!(
            code(&legacy(r#"{"type":"heartbeat","data":[]}"#)),
            Some(ErrorCode::BadFrame)
        );
        assert_eq!(
            code(&native(r#"{"type":"received"}"#)),
            Some(ErrorCode::BadFrame)
        );
        assert_eq!(
            code(&native(r#"{"type":"received","seq":"nine"}"#)),
            Some(ErrorCode::BadFrame)
        );
        assert_eq!(
            code(&native(r#"{"type":"sync","after":-1}"#)),
            Some(ErrorCode::BadFrame)
        );
        assert_eq!(
            code(&native(r#"{"type":"teleport"}"#)),
            Some(ErrorCode::UnknownFrame)
        );
        assert_eq!(
            code(&legacy(r#"{"type":"teleport"}"#)),
            Some(ErrorCode::UnknownFrame)
        );
        assert_eq!(
            code(&native(
                r#"{"type":"send","message_type":"text","content":"no id"}"#
            )),
            Some(ErrorCode::InvalidMessageId)
        );
    }
}
