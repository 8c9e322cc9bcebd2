//! Chat history (R12): the legacy offset endpoint, and the native cursor endpoint that stays
//! correct while new messages arrive. With auth on, a client reads only its own.

use super::{ApiError, HttpState, access};
use crate::auth::Access;
use crate::domain::ClientId;
use crate::store::{StoredMessage, StoredReply};
use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use kaiwa_protocol::history::{
    ErrorBody, HistoryMessage, HistoryPage, HistoryReply, LegacyHistory, LegacyMessage,
    LegacyPagination, LegacyReply,
};
use kaiwa_protocol::{Delivery, MessageStatus};
use serde::Deserialize;
use std::sync::Arc;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

const DEFAULT_LIMIT: u32 = 50;
const MAX_LIMIT: u32 = 100;

pub(super) fn router() -> OpenApiRouter<Arc<HttpState>> {
    OpenApiRouter::new()
        .routes(routes!(legacy))
        .routes(routes!(page))
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

/// The client id of the path; with auth on, it must be the token's.
fn client(
    state: &HttpState,
    headers: &HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> Result<ClientId, ApiError> {
    let Path(raw) = path.map_err(|rejection| ApiError::InvalidParameter(rejection.body_text()))?;
    // Who asks comes before what is asked: without a token, nothing is looked at.
    access::history(state, headers, &raw)?;
    // The path names the id exactly (the OpenAPI document says so too): no space around it.
    if raw.trim() != raw {
        return Err(ApiError::InvalidParameter(
            "the client id in the path has spaces around it".into(),
        ));
    }
    ClientId::parse_stored(&raw).map_err(|err| ApiError::InvalidParameter(err.to_string()))
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
/// With auth on, the URL carries `sig`, the server's word that the file is this client's.
fn content(message: &StoredMessage, access: &Access) -> String {
    if !message.kind.is_media() || message.content.is_empty() {
        return message.content.clone();
    }
    match &access.tokens {
        Some(auth) => format!(
            "/{}?sig={}",
            message.content,
            auth.sign_media(&message.client_id, &message.content)
        ),
        None => format!("/{}", message.content),
    }
}

/// The Python server's history: newest first, by offset.
#[utoipa::path(
    get,
    path = "/chat-history/{client_id}",
    tag = "history",
    params(
        ("client_id" = String, Path, min_length = 1, max_length = 128, pattern = r"^[^\s/\x00-\x1F\x7F-\x9F](?:[^/\x00-\x1F\x7F-\x9F]*[^\s/\x00-\x1F\x7F-\x9F])?$", description = "The client whose history this is: at most 128 bytes, no `/`, no control characters, no space around it."),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 100, description = "Messages per page (default 50)."),
        ("offset" = Option<i64>, Query, minimum = 0, description = "Messages to skip, newest first (default 0)."),
    ),
    security(("client_token" = [])),
    responses(
        (status = 200, description = "A page of messages, newest first, each with its replies.", body = LegacyHistory),
        (status = 401, description = "Auth is on and the request has no valid token: `code` says what is wrong with it.", body = ErrorBody),
        (status = 403, description = "The token is for another client (`client_id_mismatch`).", body = ErrorBody),
        (status = 422, description = "A parameter is out of range or malformed (`invalid_parameter`).", body = ErrorBody),
        (status = 500, description = "The store failed (`internal`).", body = ErrorBody),
        (status = 503, description = "The database is unavailable for now (`unavailable`).", body = ErrorBody),
    ),
)]
async fn legacy(
    State(state): State<Arc<HttpState>>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    params: Result<Query<OffsetParams>, QueryRejection>,
) -> Result<Json<LegacyHistory>, ApiError> {
    let client_id = client(&state, &headers, path)?;
    let params = query(params)?;
    let limit = limit(params.limit.as_deref())?;
    let offset = match params.offset.as_deref() {
        None => 0,
        // No larger than a database's OFFSET takes (a signed 64-bit integer).
        Some(text) => text
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|offset| i64::try_from(*offset).is_ok())
            .ok_or_else(|| {
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
            content: content(&message, &state.access),
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

/// kaiwa's history: newest first, with a cursor that stays correct while messages arrive.
#[utoipa::path(
    get,
    path = "/api/v1/clients/{client_id}/messages",
    tag = "history",
    params(
        ("client_id" = String, Path, min_length = 1, max_length = 128, pattern = r"^[^\s/\x00-\x1F\x7F-\x9F](?:[^/\x00-\x1F\x7F-\x9F]*[^\s/\x00-\x1F\x7F-\x9F])?$", description = "The client whose history this is: at most 128 bytes, no `/`, no control characters, no space around it."),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 100, description = "Messages per page (default 50)."),
        ("before" = Option<String>, Query, pattern = r"^(|[1-9][0-9]{0,17})$", description = "A `next_cursor` from an earlier page: only older messages. Empty or absent: the newest."),
    ),
    security(("client_token" = [])),
    responses(
        (status = 200, description = "A page of messages, newest first, each with its replies.", body = HistoryPage),
        (status = 401, description = "Auth is on and the request has no valid token: `code` says what is wrong with it.", body = ErrorBody),
        (status = 403, description = "The token is for another client (`client_id_mismatch`).", body = ErrorBody),
        (status = 422, description = "A parameter is out of range or malformed (`invalid_parameter`).", body = ErrorBody),
        (status = 500, description = "The store failed (`internal`).", body = ErrorBody),
        (status = 503, description = "The database is unavailable for now (`unavailable`).", body = ErrorBody),
    ),
)]
async fn page(
    State(state): State<Arc<HttpState>>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    params: Result<Query<CursorParams>, QueryRejection>,
) -> Result<Json<HistoryPage>, ApiError> {
    let client_id = client(&state, &headers, path)?;
    let params = query(params)?;
    let limit = limit(params.limit.as_deref())?;
    let before = match params.before.as_deref() {
        None | Some("") => None,
        // Exactly as next_cursor spells it: digits, no sign, no leading zero.
        Some(cursor) => Some(
            Some(cursor)
                .filter(|c| c.bytes().all(|b| b.is_ascii_digit()) && !c.starts_with('0'))
                .and_then(|c| c.parse::<i64>().ok())
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
        messages: messages
            .into_iter()
            .map(|message| history_message(message, &state.access))
            .collect(),
        next_cursor,
    }))
}

fn history_message(message: StoredMessage, access: &Access) -> HistoryMessage {
    HistoryMessage {
        id: message.id,
        content: content(&message, access),
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
