//! The vocabulary both protocols and the history API share: kinds of message and reply, statuses.

use serde::{Deserialize, Serialize};
use std::fmt;

/// What a client sends (R4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum MessageType {
    Text,
    Voice,
    Video,
    Image,
}

impl MessageType {
    pub const ALL: [MessageType; 4] = [Self::Text, Self::Voice, Self::Video, Self::Image];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Voice => "voice",
            Self::Video => "video",
            Self::Image => "image",
        }
    }

    /// Parses the wire name; `None` for anything else, so callers can answer with
    /// [`crate::ErrorCode::UnknownMessageType`] instead of a generic parse error.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == name)
    }

    pub fn is_media(self) -> bool {
        self != Self::Text
    }

    /// The replies a message of this kind gets, in the order they are sent (R8).
    pub fn reply_types(self) -> &'static [ReplyType] {
        match self {
            Self::Text => &[ReplyType::Text],
            Self::Voice => &[ReplyType::Text, ReplyType::Voice],
            Self::Video | Self::Image => &[ReplyType::Text, ReplyType::Voice, ReplyType::Image],
        }
    }
}

impl fmt::Display for MessageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the server answers with (R8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum ReplyType {
    Text,
    Voice,
    Image,
}

impl ReplyType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Voice => "voice",
            Self::Image => "image",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        [Self::Text, Self::Voice, Self::Image]
            .into_iter()
            .find(|kind| kind.as_str() == name)
    }
}

impl fmt::Display for ReplyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a message is on its way from receipt to its last reply (R6, R11).
///
/// `processing` is announced on the wire but not stored: a message that was processing when the
/// server stopped is still `accepted` in the database and is processed again on restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum MessageStatus {
    Accepted,
    Processing,
    Replied,
    Rejected,
}

impl MessageStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Processing => "processing",
            Self::Replied => "replied",
            Self::Rejected => "rejected",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        [
            Self::Accepted,
            Self::Processing,
            Self::Replied,
            Self::Rejected,
        ]
        .into_iter()
        .find(|status| status.as_str() == name)
    }
}

/// Whether a reply reached its client (R11).
///
/// `delivered` means the frame was written to the client's connection; `failed` means the client
/// was gone (or too slow) when it was due, and a native client can ask for it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Delivery {
    Pending,
    Delivered,
    Failed,
}

impl Delivery {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Delivered => "delivered",
            Self::Failed => "failed",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        [Self::Pending, Self::Delivered, Self::Failed]
            .into_iter()
            .find(|delivery| delivery.as_str() == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_parse() {
        for kind in MessageType::ALL {
            assert_eq!(MessageType::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(MessageType::parse("sticker"), None);
        assert_eq!(MessageType::parse("Text"), None);
    }

    #[test]
    fn image_gets_the_video_reply_set() {
        assert_eq!(
            MessageType::Image.reply_types(),
            MessageType::Video.reply_types()
        );
        assert_eq!(MessageType::Voice.reply_types().len(), 2);
        assert_eq!(MessageType::Text.reply_types(), &[ReplyType::Text]);
    }
}
