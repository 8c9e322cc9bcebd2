//! The read side of the two SQL stores, written once for SQLite and PostgreSQL: the rows as
//! read, their conversion into stored messages and replies, and the queries behind the read
//! methods of [`Store`](super::Store).
//!
//! Both schemas have the same tables and columns; only the types under them differ. SQLite
//! keeps timestamps as RFC 3339 text and booleans as 0 or 1, which sqlx decodes into the same
//! `DateTime<Utc>` and `bool` as PostgreSQL's `timestamptz` and `boolean`, so one record type
//! reads either. sqlx's SQLite driver takes `$1`-style parameters too, so the SQL text is
//! shared as well. What is written twice is in [`Dialect`]: how a list of ids is passed, where
//! unfinished messages are found, and how a message's status is read.

use super::{MissedReply, StoreError, StoredMessage, StoredReply};
use crate::domain::{ClientId, Timezone};
use chrono::{DateTime, Utc};
use kaiwa_protocol::{Delivery, MessageStatus, MessageType, ReplyType};
use sqlx::{Database, Encode, Executor, FromRow, IntoArguments, Pool, Postgres, Sqlite, Type};
use std::collections::HashMap;

/// A message's columns as read from `messages`, its status as the dialect reads it.
pub(super) fn message_columns<DB: Dialect>() -> String {
    format!(
        "id, client_id, client_msg_id, message_type, content, filename, mime_type, size_bytes, \
         timezone, {} AS status, status_reason, client_timestamp, received_at",
        DB::status_of("messages")
    )
}
pub(super) const REPLY_COLUMNS: &str = "id, message_id, seq, reply_type, content, filename, \
     mime_type, fallback, delivery, created_at, delivered_at";

#[derive(FromRow)]
pub(super) struct MessageRecord {
    id: i64,
    client_id: String,
    client_msg_id: Option<String>,
    message_type: String,
    content: String,
    filename: Option<String>,
    mime_type: Option<String>,
    size_bytes: Option<i64>,
    timezone: String,
    status: String,
    status_reason: Option<String>,
    client_timestamp: Option<String>,
    received_at: DateTime<Utc>,
}

/// A reply row, as both stores read it: through sqlx here and in the PostgreSQL writer, and
/// through the SQLite writer's own connection (rusqlite, which fills the fields itself).
#[derive(FromRow)]
pub(super) struct ReplyRecord {
    pub(super) id: i64,
    pub(super) message_id: i64,
    pub(super) seq: i64,
    pub(super) reply_type: String,
    pub(super) content: String,
    pub(super) filename: Option<String>,
    pub(super) mime_type: Option<String>,
    pub(super) fallback: bool,
    pub(super) delivery: String,
    pub(super) created_at: DateTime<Utc>,
    pub(super) delivered_at: Option<DateTime<Utc>>,
}

/// A reply read back from a client's stream, with what [`MissedReply`] adds from its message.
#[derive(FromRow)]
pub(super) struct MissedRecord {
    #[sqlx(flatten)]
    reply: ReplyRecord,
    client_msg_id: Option<String>,
    completes: bool,
}

fn corrupt(what: &str, value: &str) -> StoreError {
    StoreError::Corrupt(format!("{what} {value:?}"))
}

impl TryFrom<MessageRecord> for StoredMessage {
    type Error = StoreError;

    fn try_from(row: MessageRecord) -> Result<Self, StoreError> {
        Ok(Self {
            id: row.id,
            client_id: ClientId::parse_stored(&row.client_id)
                .map_err(|_| corrupt("client id", &row.client_id))?,
            client_message_id: row.client_msg_id,
            kind: MessageType::parse(&row.message_type)
                .ok_or_else(|| corrupt("message type", &row.message_type))?,
            content: row.content,
            filename: row.filename,
            mime_type: row.mime_type,
            size_bytes: row.size_bytes.and_then(|size| u64::try_from(size).ok()),
            timezone: Timezone::parse(&row.timezone)
                .map_err(|_| corrupt("timezone", &row.timezone))?,
            status: MessageStatus::parse(&row.status)
                .ok_or_else(|| corrupt("message status", &row.status))?,
            reason: row.status_reason,
            client_timestamp: row.client_timestamp,
            received_at: row.received_at,
            replies: Vec::new(),
        })
    }
}

impl TryFrom<ReplyRecord> for StoredReply {
    type Error = StoreError;

    fn try_from(row: ReplyRecord) -> Result<Self, StoreError> {
        Ok(Self {
            id: row.id,
            message_id: row.message_id,
            seq: super::non_negative("reply seq", row.seq)?,
            reply_type: ReplyType::parse(&row.reply_type)
                .ok_or_else(|| corrupt("reply type", &row.reply_type))?,
            content: row.content,
            filename: row.filename,
            mime_type: row.mime_type,
            fallback: row.fallback,
            delivery: Delivery::parse(&row.delivery)
                .ok_or_else(|| corrupt("delivery status", &row.delivery))?,
            created_at: row.created_at,
            delivered_at: row.delivered_at,
        })
    }
}

impl TryFrom<MissedRecord> for MissedReply {
    type Error = StoreError;

    fn try_from(row: MissedRecord) -> Result<Self, StoreError> {
        Ok(Self {
            reply: StoredReply::try_from(row.reply)?,
            client_message_id: row.client_msg_id,
            completes: row.completes,
        })
    }
}

/// What the two databases write differently in these reads: a list of message ids as one
/// parameter, where unfinished messages are found, and a message's status (PostgreSQL derives
/// `replied` from `unfinished`, its migration 11). PostgreSQL takes an array; SQLite has
/// no array type, and a JSON array read back by `json_each` keeps the statement the same
/// whatever the number of ids (an `IN` list of that many parameters would be a new statement
/// for every length).
pub(super) trait Dialect: Database {
    /// The ids as bound.
    type Ids: for<'q> Encode<'q, Self> + Type<Self> + Send + 'static;
    /// The condition that `message_id` is one of the ids bound as `$1`.
    const MESSAGE_ID_IN: &'static str;
    /// The condition that a message is accepted and not yet replied to, for a query of
    /// `messages`: SQLite has a partial index of them, PostgreSQL a table (its migration 8).
    const UNFINISHED: &'static str;

    /// The status of the message row `row`, as stored or as it follows from what is stored.
    fn status_of(row: &str) -> String;

    fn ids(ids: Vec<i64>) -> Self::Ids;
}

impl Dialect for Sqlite {
    type Ids = String;
    const MESSAGE_ID_IN: &'static str = "message_id IN (SELECT value FROM json_each($1))";
    const UNFINISHED: &'static str = "status = 'accepted'";

    fn status_of(row: &str) -> String {
        format!("{row}.status")
    }

    fn ids(ids: Vec<i64>) -> String {
        let ids: Vec<String> = ids.iter().map(i64::to_string).collect();
        format!("[{}]", ids.join(","))
    }
}

impl Dialect for Postgres {
    type Ids = Vec<i64>;
    const MESSAGE_ID_IN: &'static str = "message_id = ANY($1)";
    // The ids as a list looked up in the primary key, not a join the planner may turn
    // around: `unfinished` is a few rows that churn, and statistics taken while it held many
    // (a burst, a backlog) made every sweep read the whole of `messages`: 27 ms at 300,000
    // messages, growing with the history, and a cluster's sweepers look for orphans every
    // second.
    const UNFINISHED: &'static str =
        "id = ANY(ARRAY(SELECT message_id FROM unfinished)) AND status = 'accepted'";

    // A reply set completes its message by taking it out of `unfinished`, without rewriting
    // the row (migration 11): `accepted` and not in `unfinished` is replied to.
    fn status_of(row: &str) -> String {
        format!(
            "CASE WHEN {row}.status = 'accepted' AND NOT EXISTS (SELECT 1 FROM unfinished AS u \
                 WHERE u.message_id = {row}.id) THEN 'replied' ELSE {row}.status END"
        )
    }

    fn ids(ids: Vec<i64>) -> Vec<i64> {
        ids
    }
}

/// The read methods of [`Store`](super::Store), on a store's pool of read connections.
pub(super) struct Reads<'p, DB: Database>(pub(super) &'p Pool<DB>);

// The bounds say, once for every method, that the database can run these queries: both
// databases meet them, which the two stores' use of `Reads` checks.
impl<DB> Reads<'_, DB>
where
    DB: Dialect,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    DB::Arguments: IntoArguments<DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    (i64,): for<'r> FromRow<'r, DB::Row>,
    MessageRecord: for<'r> FromRow<'r, DB::Row>,
    ReplyRecord: for<'r> FromRow<'r, DB::Row>,
    MissedRecord: for<'r> FromRow<'r, DB::Row>,
{
    pub(super) async fn message(&self, id: i64) -> Result<Option<StoredMessage>, StoreError> {
        let rows: Vec<MessageRecord> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {} FROM messages WHERE id = $1",
            message_columns::<DB>()
        )))
        .bind(id)
        .fetch_all(self.0)
        .await?;
        Ok(self.with_replies(rows).await?.pop())
    }

    pub(super) async fn history(
        &self,
        client_id: &ClientId,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let rows: Vec<MessageRecord> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {} FROM messages \
             WHERE client_id = $1 AND id < $2 ORDER BY id DESC LIMIT $3",
            message_columns::<DB>()
        )))
        .bind(client_id.as_str())
        .bind(before.unwrap_or(i64::MAX))
        .bind(i64::from(limit))
        .fetch_all(self.0)
        .await?;
        self.with_replies(rows).await
    }

    pub(super) async fn history_by_offset(
        &self,
        client_id: &ClientId,
        offset: u64,
        limit: u32,
    ) -> Result<(Vec<StoredMessage>, u64), StoreError> {
        let total: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM messages WHERE client_id = $1")
            .bind(client_id.as_str())
            .fetch_one(self.0)
            .await?;
        let rows: Vec<MessageRecord> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {} FROM messages \
             WHERE client_id = $1 ORDER BY id DESC LIMIT $2 OFFSET $3",
            message_columns::<DB>()
        )))
        .bind(client_id.as_str())
        .bind(i64::from(limit))
        .bind(i64::try_from(offset).unwrap_or(i64::MAX))
        .fetch_all(self.0)
        .await?;
        Ok((
            self.with_replies(rows).await?,
            super::non_negative("message count", total)?,
        ))
    }

    pub(super) async fn replies_after(
        &self,
        client_id: &ClientId,
        after: u64,
        limit: u32,
    ) -> Result<Vec<MissedReply>, StoreError> {
        let rows: Vec<MissedRecord> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT r.id, r.message_id, r.seq, r.reply_type, r.content, r.filename, r.mime_type, \
                 r.fallback, r.delivery, r.created_at, r.delivered_at, m.client_msg_id, \
                 ({} = 'replied' AND NOT EXISTS (SELECT 1 FROM replies AS later \
                     WHERE later.message_id = r.message_id AND later.seq > r.seq)) AS completes \
             FROM replies AS r JOIN messages AS m ON m.id = r.message_id \
             WHERE r.client_id = $1 AND r.seq > $2 \
             ORDER BY r.seq LIMIT $3",
            DB::status_of("m")
        )))
        .bind(client_id.as_str())
        .bind(super::bigint_param(after))
        .bind(i64::from(limit))
        .fetch_all(self.0)
        .await?;
        rows.into_iter().map(MissedReply::try_from).collect()
    }

    pub(super) async fn latest_seq(&self, client_id: &ClientId) -> Result<u64, StoreError> {
        let seq: i64 =
            sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM replies WHERE client_id = $1")
                .bind(client_id.as_str())
                .fetch_one(self.0)
                .await?;
        super::non_negative("reply seq", seq)
    }

    pub(super) async fn acknowledged(&self, client_id: &ClientId) -> Result<u64, StoreError> {
        let seq: Option<i64> =
            sqlx::query_scalar("SELECT acknowledged FROM reply_streams WHERE client_id = $1")
                .bind(client_id.as_str())
                .fetch_optional(self.0)
                .await?;
        seq.map_or(Ok(0), |seq| super::non_negative("acknowledged seq", seq))
    }

    pub(super) async fn unfinished_messages(&self) -> Result<Vec<StoredMessage>, StoreError> {
        let rows: Vec<MessageRecord> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {} FROM messages WHERE {} ORDER BY id",
            message_columns::<DB>(),
            DB::UNFINISHED
        )))
        .fetch_all(self.0)
        .await?;
        rows.into_iter().map(StoredMessage::try_from).collect()
    }

    /// Converts message rows and attaches their replies, fetched in one query.
    async fn with_replies(
        &self,
        rows: Vec<MessageRecord>,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let mut messages = rows
            .into_iter()
            .map(StoredMessage::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        if messages.is_empty() {
            return Ok(messages);
        }
        let ids = DB::ids(messages.iter().map(|m| m.id).collect());
        let replies: Vec<ReplyRecord> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {REPLY_COLUMNS} FROM replies WHERE {} ORDER BY id",
            DB::MESSAGE_ID_IN
        )))
        .bind(ids)
        .fetch_all(self.0)
        .await?;
        let position: HashMap<i64, usize> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| (m.id, i))
            .collect();
        for reply in replies {
            let reply = StoredReply::try_from(reply)?;
            if let Some(&i) = position.get(&reply.message_id) {
                messages[i].replies.push(reply);
            }
        }
        Ok(messages)
    }
}
