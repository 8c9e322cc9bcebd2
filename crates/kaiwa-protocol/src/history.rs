//! Bodies of the HTTP API: the chat history endpoints, and the error body every endpoint uses.

use crate::{Delivery, ErrorCode, MessageStatus, MessageType, ReplyType};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// `GET /chat-history/{client_id}?limit&offset`, as the Python server answered it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LegacyHistory {
    pub status: String,
    pub data: Vec<LegacyMessage>,
    pub pagination: LegacyPagination,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LegacyMessage {
    pub id: i64,
    pub client_id: String,
    /// The text, or the URL path of the stored file (empty for a rejected file).
    pub content: String,
    pub message_type: MessageType,
    pub timezone: String,
    pub is_accepted: bool,
    pub status_message: Option<String>,
    pub client_timestamp: Option<String>,
    pub created_at: DateTime<Utc>,
    pub replies: Vec<LegacyReply>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LegacyReply {
    pub id: i64,
    pub content: String,
    pub reply_type: ReplyType,
    pub is_delivered: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LegacyPagination {
    pub total: u64,
    pub offset: u64,
    pub limit: u32,
    pub has_more: bool,
}

/// `GET /api/v1/clients/{client_id}/messages?limit&before`: newest first; pass `next_cursor` as
/// `before` to load older messages. The cursor names a message, so pages stay correct while new
/// messages arrive.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HistoryPage {
    pub messages: Vec<HistoryMessage>,
    /// `None` on the oldest page.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HistoryMessage {
    pub id: i64,
    /// The client's own id of the message (native protocol only).
    pub client_message_id: Option<String>,
    pub message_type: MessageType,
    /// The text, or the URL path of the stored file (empty for a rejected file).
    pub content: String,
    pub filename: Option<String>,
    pub mime_type: Option<String>,
    pub size_bytes: Option<u64>,
    pub timezone: String,
    pub status: MessageStatus,
    /// Why it was rejected, for `rejected` messages.
    pub reason: Option<String>,
    pub client_timestamp: Option<String>,
    pub received_at: DateTime<Utc>,
    /// Oldest first, in the order they were sent.
    pub replies: Vec<HistoryReply>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HistoryReply {
    pub id: i64,
    /// The reply's place in the client's reply stream, as in the native `reply` frame.
    pub seq: u64,
    pub reply_type: ReplyType,
    pub content: String,
    pub filename: Option<String>,
    pub mime_type: Option<String>,
    /// The text responder gave up and this is kaiwa's stand-in text.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fallback: bool,
    pub delivery: Delivery,
    pub created_at: DateTime<Utc>,
    pub delivered_at: Option<DateTime<Utc>>,
}

/// The body of every HTTP error: a stable `code` (the same codes as the WebSocket error
/// frames) and a readable `message`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    /// Always `"error"`.
    pub status: String,
    pub code: ErrorCode,
    pub message: String,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            status: "error".to_owned(),
            code,
            message: message.into(),
        }
    }
}
