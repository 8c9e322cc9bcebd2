//! Chat history (R12): the legacy offset endpoint, and the native cursor endpoint that stays
//! correct while new messages arrive.

use super::{ApiError, HttpState};
use crate::domain::ClientId;
use crate::store::{StoredMessage, StoredReply};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::routing::get;
use axum::{Json, Router};
use kaiwa_protocol::history::{
    HistoryMessage, HistoryPage, HistoryReply, LegacyHistory, LegacyMessage, LegacyPagination,
    LegacyReply,
};
use kaiwa_protocol::{Delivery, MessageStatus};
use serde::Deserialize;
use std::sync::Arc;

const DEFAULT_LIMIT: u32 = 50;
const MAX_LIMIT: u32 = 100;

pub(super) fn router() -> Router<Arc<HttpState>> {
    Router::new()
        .route("/chat-history/{client_id}", get(legacy))
        .route("/api/v1/clients/{client_id}/messages", get(page))
}

#[derive(Debug, Deserialize)]
struct OffsetParams {
    limit: Option<String>,
    offset: Option<String>,
}

#[derive(Debug, Deserialize)]
struct CursorParams {
    limit: Option<String>,
    before: Option<String>,
}

fn client(raw: &str) -> Result<ClientId, ApiError> {
    ClientId::parse_stored(raw).map_err(|err| ApiError::InvalidParameter(err.to_string()))
}

fn limit(raw: Option<&str>) -> Result<u32, ApiError> {
    match raw {
        None => Ok(DEFAULT_LIMIT),
        Some(text) => text
            .trim()
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| {
                ApiError::InvalidParameter(format!(
                    "limit must be an integer from 1 to {MAX_LIMIT}"
                ))
            }),
    }
}

fn query<T>(query: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    query
        .map(|Query(params)| params)
        .map_err(|rejection| ApiError::InvalidParameter(rejection.body_text()))
}

/// The text, or the URL of a stored file (its path under the data directory, served at `/`).
fn content(message: &StoredMessage) -> String {
    if message.kind.is_media() && !message.content.is_empty() {
        format!("/{}", message.content)
    } else {
        message.content.clone()
    }
}

async fn legacy(
    State(state): State<Arc<HttpState>>,
    Path(client_id): Path<String>,
    params: Result<Query<OffsetParams>, QueryRejection>,
) -> Result<Json<LegacyHistory>, ApiError> {
    let params = query(params)?;
    let client_id = client(&client_id)?;
    let limit = limit(params.limit.as_deref())?;
    let offset = match params.offset.as_deref() {
        None => 0,
        Some(text) => text.trim().parse::<u64>().map_err(|_| {
            ApiError::InvalidParameter("offset must be a non-negative integer".into())
        })?,
    };
    let (messages, total) = state
        .store
        .history_by_offset(&client_id, offset, limit)
        .await?;
    let data = messages
        .into_iter()
        .map(|message| LegacyMessage {
            id: message.id,
            client_id: message.client_id.to_string(),
            content: content(&message),
            message_type: message.kind,
            timezone: message.timezone.name().to_owned(),
            is_accepted: message.status != MessageStatus::Rejected,
            status_message: message.reason,
            client_timestamp: message.client_timestamp,
            created_at: message.received_at,
            replies: message
                .replies
                .into_iter()
                .map(|reply| LegacyReply {
                    id: reply.id,
                    content: reply.content,
                    reply_type: reply.reply_type,
                    is_delivered: reply.delivery == Delivery::Delivered,
                })
                .collect(),
        })
        .collect::<Vec<_>>();
    let has_more = offset.saturating_add(data.len() as u64) < total;
    Ok(Json(LegacyHistory {
        status: "success".to_owned(),
        data,
        pagination: LegacyPagination {
            total,
            offset,
            limit,
            has_more,
        },
    }))
}

async fn page(
    State(state): State<Arc<HttpState>>,
    Path(client_id): Path<String>,
    params: Result<Query<CursorParams>, QueryRejection>,
) -> Result<Json<HistoryPage>, ApiError> {
    let params = query(params)?;
    let client_id = client(&client_id)?;
    let limit = limit(params.limit.as_deref())?;
    let before = match params.before.as_deref() {
        None | Some("") => None,
        Some(cursor) => Some(
            cursor
                .trim()
                .parse::<i64>()
                .ok()
                .filter(|id| *id > 0)
                .ok_or_else(|| {
                    ApiError::InvalidParameter("before must be a cursor from next_cursor".into())
                })?,
        ),
    };
    // One more than asked tells whether an older page exists.
    let mut messages = state.store.history(&client_id, before, limit + 1).await?;
    let more = messages.len() > limit as usize;
    messages.truncate(limit as usize);
    let next_cursor = more
        .then(|| messages.last().map(|m| m.id.to_string()))
        .flatten();
    Ok(Json(HistoryPage {
        messages: messages.into_iter().map(history_message).collect(),
        next_cursor,
    }))
}

fn history_message(message: StoredMessage) -> HistoryMessage {
    HistoryMessage {
        id: message.id,
        content: content(&message),
        client_message_id: message.client_message_id,
        message_type: message.kind,
        filename: message.filename,
        mime_type: message.mime_type,
        size_bytes: message.size_bytes,
        timezone: message.timezone.name().to_owned(),
        status: message.status,
        reason: message.reason,
        client_timestamp: message.client_timestamp,
        received_at: message.received_at,
        replies: message.replies.into_iter().map(history_reply).collect(),
    }
}

fn history_reply(reply: StoredReply) -> HistoryReply {
    HistoryReply {
        id: reply.id,
        seq: reply.seq,
        reply_type: reply.reply_type,
        content: reply.content,
        filename: reply.filename,
        mime_type: reply.mime_type,
        fallback: reply.fallback,
        delivery: reply.delivery,
        created_at: reply.created_at,
        delivered_at: reply.delivered_at,
    }
}
