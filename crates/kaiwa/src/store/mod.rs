//! Durable state: messages, replies and their delivery statuses behind the [`Store`] trait, and
//! uploaded files in the [`MediaStore`].

pub mod backup;
mod batch;
#[cfg(test)]
pub(crate) mod contract;
mod inbox;
mod media;
mod memory;
mod postgres;
mod read;
mod sql;
pub(crate) use postgres::IN_FLIGHT_COUNT;
pub(crate) use sql::is_outage;
mod sqlite;

pub use media::{DiskMedia, MediaStore};
pub use memory::MemoryStore;
pub use postgres::{PgOptions, PgShared, PgStore};
pub use sqlite::{DEFAULT_SQLITE_CACHE_MIB, Durability, SqliteOptions, SqliteStore};

use crate::domain::{ClientId, GatewayId, Timezone};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use kaiwa_protocol::{Delivery, MessageStatus, MessageType, ReplyType};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// The result of a write the store has already taken in.
pub type StoreFuture<T> = BoxFuture<'static, Result<T, StoreError>>;

/// A message about to be stored, accepted or rejected.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub client_id: ClientId,
    pub client_message_id: Option<String>,
    pub kind: MessageType,
    /// The text, or the stored file's path relative to the data directory (empty when a file
    /// was rejected and not kept).
    pub content: String,
    pub filename: Option<String>,
    pub mime_type: Option<String>,
    pub size_bytes: Option<u64>,
    pub timezone: Timezone,
    /// `Accepted` or `Rejected`.
    pub status: MessageStatus,
    pub reason: Option<String>,
    pub client_timestamp: Option<String>,
    pub received_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inserted {
    New(i64),
    /// A message with the same client message id was stored before.
    Duplicate(Existing),
    /// Not stored: accepting it would pass the store's in-flight limit (kept by a store that
    /// several processes share); its sender is to retry.
    Busy,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Existing {
    pub id: i64,
    pub status: MessageStatus,
    pub reason: Option<String>,
    pub received_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewReply {
    pub reply_type: ReplyType,
    /// The text, or the URL path of the media file.
    pub content: String,
    pub filename: Option<String>,
    pub mime_type: Option<String>,
    /// The text responder gave up; this is kaiwa's stand-in text.
    pub fallback: bool,
}

impl NewReply {
    /// The reply as it was just stored: `pending`, never delivered.
    pub fn stored(
        self,
        id: i64,
        message_id: i64,
        seq: u64,
        created_at: DateTime<Utc>,
    ) -> StoredReply {
        StoredReply {
            id,
            message_id,
            seq,
            reply_type: self.reply_type,
            content: self.content,
            filename: self.filename,
            mime_type: self.mime_type,
            fallback: self.fallback,
            delivery: Delivery::Pending,
            created_at,
            delivered_at: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoredReply {
    pub id: i64,
    pub message_id: i64,
    /// The reply's place in its client's reply stream: 1, 2, 3... per client id, in the order
    /// the replies were stored, with no gaps. Resume and acknowledgements refer to it.
    pub seq: u64,
    pub reply_type: ReplyType,
    pub content: String,
    pub filename: Option<String>,
    pub mime_type: Option<String>,
    pub fallback: bool,
    pub delivery: Delivery,
    pub created_at: DateTime<Utc>,
    pub delivered_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub id: i64,
    pub client_id: ClientId,
    pub client_message_id: Option<String>,
    pub kind: MessageType,
    pub content: String,
    pub filename: Option<String>,
    pub mime_type: Option<String>,
    pub size_bytes: Option<u64>,
    pub timezone: Timezone,
    pub status: MessageStatus,
    pub reason: Option<String>,
    pub client_timestamp: Option<String>,
    pub received_at: DateTime<Utc>,
    /// Oldest first.
    pub replies: Vec<StoredReply>,
}

impl StoredMessage {
    /// A message as stored under `id`, before any reply.
    pub fn new(id: i64, message: NewMessage) -> Self {
        Self {
            id,
            client_id: message.client_id,
            client_message_id: message.client_message_id,
            kind: message.kind,
            content: message.content,
            filename: message.filename,
            mime_type: message.mime_type,
            size_bytes: message.size_bytes,
            timezone: message.timezone,
            status: message.status,
            reason: message.reason,
            client_timestamp: message.client_timestamp,
            received_at: message.received_at,
            replies: Vec::new(),
        }
    }
}

/// A reply read back from a client's reply stream, with the client's id of the message it
/// answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissedReply {
    pub reply: StoredReply,
    pub client_message_id: Option<String>,
    /// The reply ends its message's reply set (the message is `replied`, and this is its last
    /// reply): read back, it carries the message's `replied` status with it, whose live event
    /// may have been lost.
    pub completes: bool,
}

/// What went wrong in a store, whichever database is behind it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached now (refused, lost, restarting); the store reconnects
    /// by itself, and the same request can succeed later.
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    /// The database took the request and failed it (a full disk, a constraint, a bad query).
    #[error("database error: {0}")]
    Database(String),
    #[error("could not apply migrations: {0}")]
    Migrate(String),
    #[error(
        "the database schema is newer than this kaiwa: it has migration {0}, which this version does not know; run a newer kaiwa"
    )]
    SchemaTooNew(i64),
    #[error("file error: {0}")]
    Io(Arc<std::io::Error>),
    #[error("another kaiwa process is using the database {0}")]
    Locked(PathBuf),
    #[error("the store is closed")]
    Closed,
    #[error("unexpected value in the database: {0}")]
    Corrupt(String),
}

impl From<crate::db_thread::Stopped> for StoreError {
    fn from(_: crate::db_thread::Stopped) -> Self {
        Self::Closed
    }
}

/// A count or stream position as read from the database, where a negative value can only
/// mean a corrupt row: an error, never a silent 0.
pub(crate) fn non_negative(what: &str, value: i64) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| StoreError::Corrupt(format!("{what} {value}")))
}

/// A stream position or a connection id as the databases store it: a signed 64-bit integer
/// (neither comes near the top).
pub(crate) fn bigint_param(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl StoreError {
    /// Whether the same request may succeed later without anything changing on the client's
    /// side.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

impl From<std::io::Error> for StoreError {
    fn from(err: std::io::Error) -> Self {
        Self::Io(Arc::new(err))
    }
}

/// Whether a store can take writes now, for `/health`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreHealth {
    Ok,
    /// Writes fail for now; the reason is for operators.
    Degraded(String),
}

/// Where messages and replies are kept. Writes are batched by the implementation, so callers
/// may call freely from many tasks.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Stores a message; a native resend of a stored client message id returns the first one.
    ///
    /// The store takes the message when this is called, not when the future is awaited:
    /// messages are stored (and numbered) in the order of the calls, so a caller can keep
    /// several in flight and still keep their order.
    fn insert_message(&self, message: NewMessage) -> StoreFuture<Inserted>;

    /// Stores replies to a message, all `pending`; `completes` marks the message `replied`
    /// (a reply set may be stored in parts, the text after the media when a model is slow).
    /// Idempotent per reply type: replies of a type the message already has are not stored
    /// again, and the stored ones are returned instead.
    async fn insert_replies(
        &self,
        message_id: i64,
        client_id: &ClientId,
        replies: Vec<NewReply>,
        created_at: DateTime<Utc>,
        completes: bool,
    ) -> Result<Vec<StoredReply>, StoreError>;

    /// Records whether a reply reached its client (a legacy client's reply written to its
    /// socket, or a reply that found no session). Does not wait: the update joins the next
    /// batch. A `delivered` reply stays delivered.
    fn record_delivery(&self, reply_id: i64, delivery: Delivery, at: DateTime<Utc>);

    /// Records that a reply did not reach its client (it found no session, or the session's
    /// outbox was full), and counts it.
    fn record_undelivered(&self, reply_id: i64, at: DateTime<Utc>) {
        self.record_delivery(reply_id, Delivery::Failed, at);
        metrics::counter!("kaiwa_replies_total", "delivery" => "failed").increment(1);
    }

    /// A client acknowledged its replies up to and including `seq`: they become `delivered`.
    /// Does not wait, like [`Store::record_delivery`].
    fn record_received(&self, client_id: &ClientId, seq: u64, at: DateTime<Utc>);

    /// A client's connection ended having acknowledged replies up to `acknowledged`: its later
    /// replies that are still `pending` become `failed` (R11). Does not wait.
    fn record_departure(&self, client_id: &ClientId, acknowledged: u64, at: DateTime<Utc>);

    /// One message with its replies, if it is stored.
    async fn message(&self, id: i64) -> Result<Option<StoredMessage>, StoreError>;

    /// A client's messages older than `before` (all when `None`), newest first, with replies.
    async fn history(
        &self,
        client_id: &ClientId,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<StoredMessage>, StoreError>;

    /// A page of a client's messages by offset, newest first, and the client's total count.
    async fn history_by_offset(
        &self,
        client_id: &ClientId,
        offset: u64,
        limit: u32,
    ) -> Result<(Vec<StoredMessage>, u64), StoreError>;

    /// A client's replies with `seq` above `after`, in `seq` order, at most `limit`.
    async fn replies_after(
        &self,
        client_id: &ClientId,
        after: u64,
        limit: u32,
    ) -> Result<Vec<MissedReply>, StoreError>;

    /// The `seq` of a client's latest reply (0 when it has none).
    async fn latest_seq(&self, client_id: &ClientId) -> Result<u64, StoreError>;

    /// The `seq` up to which a client has acknowledged its replies (0 for none).
    async fn acknowledged(&self, client_id: &ClientId) -> Result<u64, StoreError>;

    /// Messages accepted but never replied to, oldest first, without their replies (a part of
    /// the set may be stored): the process stopped while they were in flight, or their
    /// processing failed.
    async fn unfinished_messages(&self) -> Result<Vec<StoredMessage>, StoreError>;

    /// Whether writes are going through now.
    fn health(&self) -> StoreHealth {
        StoreHealth::Ok
    }

    /// Writes everything pending and closes. Later calls fail with [`StoreError::Closed`].
    async fn close(&self);
}

/// Claims on accepted messages that no process is working on, in a database several processes
/// share: a message one process claims is left alone by the others for a while, so that its
/// job is queued again by one of them.
#[async_trait]
pub trait StuckClaims: Send + Sync + 'static {
    /// Accepted messages that nothing has happened to for `older_than` (their job was never
    /// confirmed by the broker, or was lost with it, or their processing failed), claimed for
    /// the caller: a message claimed here is not claimed again by anyone for `older_than`.
    async fn claim_stuck(
        &self,
        older_than: Duration,
        limit: u32,
    ) -> Result<Vec<StoredMessage>, StoreError>;

    /// Claims, like [`StuckClaims::claim_stuck`], the accepted messages that no sweeper has
    /// queued yet of gateways whose lease has ended: a gateway that died between a message's
    /// commit and its job's confirm left them with no job anywhere. Some of them may have a
    /// job after all (confirmed, and not taken yet): queued twice, such a message is processed
    /// twice and still stored with one reply set.
    async fn claim_orphaned(&self, limit: u32) -> Result<Vec<StoredMessage>, StoreError>;

    /// Claims, like [`StuckClaims::claim_orphaned`], the accepted messages that no sweeper has
    /// queued yet which `gateway` admitted before `before`: a gateway that comes back under its
    /// id (restarted after a crash, before its lease ended) takes back at once what its last run
    /// left without a job, instead of the stuck sweep finding them after `--requeue-after`.
    async fn claim_left_by(
        &self,
        gateway: &GatewayId,
        before: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<StoredMessage>, StoreError>;
}
