//! The SQLite store: one writer thread that commits commands in batches (group commit,
//! [`writer`]), and a pool of read-only connections for history. WAL mode lets readers run
//! beside the writer.

mod writer;

use writer::Writer;

use super::batch::{DeliveryUpdate, ReplyBatch, StreamUpdate, Writes};
use super::sql::migrate_error;
use super::{
    Inserted, MissedReply, NewMessage, NewReply, Store, StoreError, StoreFuture, StoreHealth,
    StoredMessage, StoredReply,
};
use crate::domain::{ClientId, Timezone};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use kaiwa_protocol::{Delivery, MessageStatus, MessageType, ReplyType};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::{Connection, FromRow};
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// How hard the SQLite store syncs its commits to disk (its `synchronous` setting in WAL mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Durability {
    /// Every batch is synced before its messages are acked: an acked message survives a power
    /// cut. One fsync per batch, not per message.
    #[default]
    Full,
    /// Commits are not synced; the WAL is synced at checkpoints. An acked message survives the
    /// process crashing or being killed; a power cut or an OS crash may lose the last moments.
    Normal,
}

/// The writer's page cache unless told otherwise: a larger one costs the writer more than it
/// saves, since every commit walks it.
pub const DEFAULT_SQLITE_CACHE_MIB: u32 = 8;
/// Read connections, each with a quarter of the writer's cache: they map the database file,
/// so their caches hold only pages still in the WAL (the newest), and a small cache fills
/// within the first tens of thousands of messages instead of growing for hours.
const READ_CONNECTIONS: u32 = 4;

/// The SQLite store's own settings.
#[derive(Debug, Clone, Copy)]
pub struct SqliteOptions {
    pub durability: Durability,
    /// The page cache of the writer, in MiB; the read connections share as much again.
    pub cache_mib: u32,
}

impl SqliteOptions {
    /// The value of `PRAGMA cache_size` for the writer: negative, a size in KiB rather than a
    /// number of pages.
    fn cache_size(&self) -> i64 {
        -i64::from(self.cache_mib) * 1024
    }

    /// The same for each read connection.
    fn read_cache_size(&self) -> i64 {
        self.cache_size() / i64::from(READ_CONNECTIONS)
    }
}

impl Default for SqliteOptions {
    fn default() -> Self {
        Self {
            durability: Durability::default(),
            cache_mib: DEFAULT_SQLITE_CACHE_MIB,
        }
    }
}

pub struct SqliteStore {
    /// To the writer thread.
    writes: Writes,
    reads: SqlitePool,
    /// The writer's thread, joined by `close` after its last commit.
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Whether the writer's last batch went through, and why not.
    health: Arc<Mutex<StoreHealth>>,
    /// An exclusive lock on the file beside the database (`kaiwa.lock` for `kaiwa.db`): the
    /// writer owns the id counters, so two processes must never write the same database.
    /// Released by `close`, not by the last drop, so that a restart need not wait for every
    /// holder of the store to let go.
    lock: Mutex<Option<File>>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database file at `path`, applies pending migrations,
    /// marks replies left `pending` by a previous process as `failed`, and starts the writer.
    pub async fn open(path: &Path, options: SqliteOptions) -> Result<Self, StoreError> {
        let (lock, mut conn, _) = migrated(path).await?;
        let swept =
            sqlx::query("UPDATE replies SET delivery = 'failed' WHERE delivery = 'pending'")
                .execute(&mut conn)
                .await?
                .rows_affected();
        if swept > 0 {
            tracing::info!(
                replies = swept,
                "replies left undelivered by the previous run marked failed"
            );
        }
        conn.close().await?;
        let reads = SqlitePoolOptions::new()
            .max_connections(READ_CONNECTIONS)
            .connect_with(read_options(path, options))
            .await?;
        let (writes, rx) = Writes::channel();
        let health = Arc::new(Mutex::new(StoreHealth::Ok));
        let writer = Writer::open(path, options, rx, health.clone())
            .map_err(|err| writer::write_error(&err))?;
        Ok(Self {
            writes,
            reads,
            writer: Mutex::new(Some(writer.spawn()?)),
            health,
            lock: Mutex::new(Some(lock)),
        })
    }

    /// Applies pending migrations to the database file at `path` and returns how many there
    /// were.
    pub async fn migrate(path: &Path) -> Result<usize, StoreError> {
        let (_lock, conn, applied) = migrated(path).await?;
        conn.close().await?;
        Ok(applied)
    }
}

/// Locks the database (creating its directory if needed) and applies pending migrations.
/// Returns the lock, the connection that migrated (for more start-up work) and how many
/// migrations it applied.
async fn migrated(path: &Path) -> Result<(File, SqliteConnection, usize), StoreError> {
    if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let lock = lock_database(path)?;
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        // The migrations and the start-up sweep are durable before the first message is taken.
        .synchronous(SqliteSynchronous::Full);
    let mut conn = SqliteConnection::connect_with(&options).await?;
    // A new database has no migrations table yet; any other failure to read it is an error.
    let has_table: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = '_sqlx_migrations')",
    )
    .fetch_one(&mut conn)
    .await?;
    let applied: HashSet<i64> = if has_table {
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations")
            .fetch_all(&mut conn)
            .await?
            .into_iter()
            .collect()
    } else {
        HashSet::new()
    };
    MIGRATOR.run(&mut conn).await.map_err(migrate_error)?;
    let pending = MIGRATOR
        .iter()
        .filter(|migration| !applied.contains(&migration.version))
        .count();
    Ok((lock, conn, pending))
}

/// The read pool's connections. The writer thread opens its own (see [`writer`]).
fn read_options(path: &Path, options: SqliteOptions) -> SqliteConnectOptions {
    SqliteConnectOptions::new()
        .filename(path)
        .read_only(true)
        // History reads map the file rather than copying pages into each connection's cache.
        .pragma("mmap_size", "268435456")
        // Each connection's cache still fills with the pages it has read from the WAL, up to
        // this bound.
        .pragma("cache_size", options.read_cache_size().to_string())
}

fn lock_database(path: &Path) -> Result<File, StoreError> {
    let file = File::create(lock_path(path))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Locked(path.to_owned())),
        Err(std::fs::TryLockError::Error(err)) => Err(err.into()),
    }
}

/// The lock file of a database: `kaiwa.lock` beside `kaiwa.db`.
fn lock_path(path: &Path) -> PathBuf {
    path.with_extension("lock")
}

const MESSAGE_COLUMNS: &str = "id, client_id, client_msg_id, message_type, content, filename, \
     mime_type, size_bytes, timezone, status, status_reason, client_timestamp, received_at";

#[derive(FromRow)]
struct MessageRecord {
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

#[derive(FromRow)]
struct ReplyRecord {
    id: i64,
    message_id: i64,
    seq: i64,
    reply_type: String,
    content: String,
    filename: Option<String>,
    mime_type: Option<String>,
    fallback: bool,
    delivery: String,
    created_at: DateTime<Utc>,
    delivered_at: Option<DateTime<Utc>>,
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

impl SqliteStore {
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
        // The ids as a JSON array, for `json_each`.
        let ids: Vec<String> = messages.iter().map(|m| m.id.to_string()).collect();
        let replies: Vec<ReplyRecord> = sqlx::query_as(
            "SELECT id, message_id, seq, reply_type, content, filename, mime_type, fallback, \
                 delivery, created_at, delivered_at \
             FROM replies WHERE message_id IN (SELECT value FROM json_each(?1)) ORDER BY id",
        )
        .bind(format!("[{}]", ids.join(",")))
        .fetch_all(&self.reads)
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

#[async_trait]
impl Store for SqliteStore {
    fn insert_message(&self, message: NewMessage) -> StoreFuture<Inserted> {
        self.writes.insert_message(message)
    }

    async fn insert_replies(
        &self,
        message_id: i64,
        client_id: &ClientId,
        replies: Vec<NewReply>,
        created_at: DateTime<Utc>,
        completes: bool,
    ) -> Result<Vec<StoredReply>, StoreError> {
        self.writes
            .insert_replies(ReplyBatch {
                message_id,
                client_id: client_id.clone(),
                replies,
                created_at,
                completes,
            })
            .await
    }

    fn record_delivery(&self, reply_id: i64, delivery: Delivery, at: DateTime<Utc>) {
        self.writes.record_delivery(DeliveryUpdate {
            reply_id,
            delivery,
            at,
        });
    }

    fn record_received(&self, client_id: &ClientId, seq: u64, at: DateTime<Utc>) {
        self.writes.record_received(StreamUpdate {
            client_id: client_id.clone(),
            seq,
            at,
        });
    }

    fn record_departure(&self, client_id: &ClientId, acknowledged: u64, at: DateTime<Utc>) {
        self.writes.record_departure(StreamUpdate {
            client_id: client_id.clone(),
            seq: acknowledged,
            at,
        });
    }

    async fn message(&self, id: i64) -> Result<Option<StoredMessage>, StoreError> {
        let rows: Vec<MessageRecord> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = ?1"
        )))
        .bind(id)
        .fetch_all(&self.reads)
        .await?;
        Ok(self.with_replies(rows).await?.pop())
    }

    async fn history(
        &self,
        client_id: &ClientId,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let rows: Vec<MessageRecord> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages \
             WHERE client_id = ?1 AND id < ?2 ORDER BY id DESC LIMIT ?3"
        )))
        .bind(client_id.as_str())
        .bind(before.unwrap_or(i64::MAX))
        .bind(i64::from(limit))
        .fetch_all(&self.reads)
        .await?;
        self.with_replies(rows).await
    }

    async fn history_by_offset(
        &self,
        client_id: &ClientId,
        offset: u64,
        limit: u32,
    ) -> Result<(Vec<StoredMessage>, u64), StoreError> {
        let total: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM messages WHERE client_id = ?1")
            .bind(client_id.as_str())
            .fetch_one(&self.reads)
            .await?;
        let rows: Vec<MessageRecord> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages \
             WHERE client_id = ?1 ORDER BY id DESC LIMIT ?2 OFFSET ?3"
        )))
        .bind(client_id.as_str())
        .bind(i64::from(limit))
        .bind(i64::try_from(offset).unwrap_or(i64::MAX))
        .fetch_all(&self.reads)
        .await?;
        Ok((self.with_replies(rows).await?, total.max(0) as u64))
    }

    async fn replies_after(
        &self,
        client_id: &ClientId,
        after: u64,
        limit: u32,
    ) -> Result<Vec<MissedReply>, StoreError> {
        #[derive(FromRow)]
        struct Row {
            #[sqlx(flatten)]
            reply: ReplyRecord,
            client_msg_id: Option<String>,
            completes: bool,
        }
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT r.id, r.message_id, r.seq, r.reply_type, r.content, r.filename, r.mime_type, \
                 r.fallback, r.delivery, r.created_at, r.delivered_at, m.client_msg_id, \
                 (m.status = 'replied' AND NOT EXISTS (SELECT 1 FROM replies AS later \
                     WHERE later.message_id = r.message_id AND later.seq > r.seq)) AS completes \
             FROM replies AS r JOIN messages AS m ON m.id = r.message_id \
             WHERE r.client_id = ?1 AND r.seq > ?2 \
             ORDER BY r.seq LIMIT ?3",
        )
        .bind(client_id.as_str())
        .bind(super::seq_param(after))
        .bind(i64::from(limit))
        .fetch_all(&self.reads)
        .await?;
        rows.into_iter()
            .map(|row| {
                Ok(MissedReply {
                    reply: StoredReply::try_from(row.reply)?,
                    client_message_id: row.client_msg_id,
                    completes: row.completes,
                })
            })
            .collect()
    }

    async fn latest_seq(&self, client_id: &ClientId) -> Result<u64, StoreError> {
        let seq: i64 =
            sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM replies WHERE client_id = ?1")
                .bind(client_id.as_str())
                .fetch_one(&self.reads)
                .await?;
        super::non_negative("reply seq", seq)
    }

    async fn acknowledged(&self, client_id: &ClientId) -> Result<u64, StoreError> {
        let seq: Option<i64> =
            sqlx::query_scalar("SELECT acknowledged FROM reply_streams WHERE client_id = ?1")
                .bind(client_id.as_str())
                .fetch_optional(&self.reads)
                .await?;
        seq.map_or(Ok(0), |seq| super::non_negative("acknowledged seq", seq))
    }

    async fn unfinished_messages(&self) -> Result<Vec<StoredMessage>, StoreError> {
        let rows: Vec<MessageRecord> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE status = 'accepted' ORDER BY id"
        )))
        .fetch_all(&self.reads)
        .await?;
        rows.into_iter().map(StoredMessage::try_from).collect()
    }

    fn health(&self) -> StoreHealth {
        self.health
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    async fn close(&self) {
        self.writes.close().await;
        let writer = self
            .writer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(writer) = writer {
            match tokio::task::spawn_blocking(move || writer.join()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => tracing::error!("the database writer thread panicked"),
                Err(err) => tracing::error!(%err, "could not join the database writer thread"),
            }
        }
        self.reads.close().await;
        let lock = self
            .lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        drop(lock);
    }
}

#[cfg(test)]
impl SqliteStore {
    /// Waits until everything sent to the writer so far is committed.
    pub(super) async fn barrier(&self) {
        self.writes.barrier().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{ClientId, Timezone};
    use crate::store::Existing;

    fn message(client: &str, client_message_id: Option<&str>) -> NewMessage {
        NewMessage {
            client_id: ClientId::parse(client).expect("id"),
            client_message_id: client_message_id.map(str::to_owned),
            kind: MessageType::Text,
            content: "hello".into(),
            filename: None,
            mime_type: None,
            size_bytes: None,
            timezone: Timezone::parse("UTC").expect("zone"),
            status: MessageStatus::Accepted,
            reason: None,
            client_timestamp: None,
            received_at: Utc::now(),
        }
    }

    fn text_reply(text: &str) -> NewReply {
        NewReply {
            reply_type: ReplyType::Text,
            content: text.into(),
            filename: None,
            mime_type: None,
            fallback: false,
        }
    }

    #[tokio::test]
    async fn a_client_message_id_is_stored_once() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SqliteStore::open(&dir.path().join("kaiwa.db"), SqliteOptions::default())
            .await
            .expect("opens");
        let first = store
            .insert_message(message("a", Some("m1")))
            .await
            .expect("stored");
        let again = store
            .insert_message(message("a", Some("m1")))
            .await
            .expect("answered");
        let other_client = store
            .insert_message(message("b", Some("m1")))
            .await
            .expect("stored");
        let Inserted::New(id) = first else {
            panic!("first insert is new")
        };
        assert!(matches!(again, Inserted::Duplicate(Existing { id: dup, .. }) if dup == id));
        assert!(matches!(other_client, Inserted::New(other) if other != id));
        store.close().await;
    }

    #[tokio::test]
    async fn replies_are_stored_once_per_message_and_delivered_stays_delivered() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SqliteStore::open(&dir.path().join("kaiwa.db"), SqliteOptions::default())
            .await
            .expect("opens");
        let client = ClientId::parse("a").expect("id");
        let Inserted::New(id) = store
            .insert_message(message("a", None))
            .await
            .expect("stored")
        else {
            panic!("new");
        };
        let now = Utc::now();
        let first = store
            .insert_replies(id, &client, vec![text_reply("one")], now, true)
            .await
            .expect("stored");
        let second = store
            .insert_replies(id, &client, vec![text_reply("two")], now, true)
            .await
            .expect("answered");
        assert_eq!(second.len(), 1);
        assert_eq!(second[0].id, first[0].id);
        assert_eq!(second[0].content, "one", "the first reply set stands");

        store.record_delivery(first[0].id, Delivery::Delivered, now);
        store.record_delivery(first[0].id, Delivery::Failed, now);
        store.barrier().await;
        let history = store.history(&client, None, 10).await.expect("reads");
        assert_eq!(history[0].status, MessageStatus::Replied);
        assert_eq!(history[0].replies[0].delivery, Delivery::Delivered);
        assert_eq!(store.acknowledged(&client).await.expect("reads"), 0);
        store.close().await;
    }

    #[tokio::test]
    async fn pending_replies_of_a_previous_run_are_marked_failed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let client = ClientId::parse("a").expect("id");
        {
            let store = SqliteStore::open(&dir.path().join("kaiwa.db"), SqliteOptions::default())
                .await
                .expect("opens");
            let Inserted::New(id) = store
                .insert_message(message("a", Some("x")))
                .await
                .expect("stored")
            else {
                panic!("new");
            };
            store
                .insert_replies(id, &client, vec![text_reply("lost")], Utc::now(), true)
                .await
                .expect("stored");
            store.close().await;
        }
        let store = SqliteStore::open(&dir.path().join("kaiwa.db"), SqliteOptions::default())
            .await
            .expect("reopens");
        let missed = store.replies_after(&client, 0, 10).await.expect("reads");
        assert_eq!(missed.len(), 1);
        assert_eq!(missed[0].reply.seq, 1);
        assert_eq!(missed[0].client_message_id.as_deref(), Some("x"));
        assert_eq!(missed[0].reply.delivery, Delivery::Failed);
        store.close().await;
    }

    #[tokio::test]
    async fn a_second_store_on_the_same_directory_is_refused_until_the_first_closes() {
        let dir = tempfile::tempdir().expect("temp dir");
        let first = SqliteStore::open(&dir.path().join("kaiwa.db"), SqliteOptions::default())
            .await
            .expect("opens");
        assert!(matches!(
            SqliteStore::open(&dir.path().join("kaiwa.db"), SqliteOptions::default()).await,
            Err(StoreError::Locked(_))
        ));
        first.close().await;
        let second = SqliteStore::open(&dir.path().join("kaiwa.db"), SqliteOptions::default())
            .await
            .expect("opens after close");
        second.close().await;
    }
}
