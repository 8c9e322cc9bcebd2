//! The SQLite store: one writer thread that commits commands in batches (group commit,
//! [`writer`]), and a pool of read-only connections for history. WAL mode lets readers run
//! beside the writer.

mod writer;

use writer::Writer;

use super::batch::{DeliveryUpdate, ReplyBatch, StreamUpdate, Writes};
use super::read::Reads;
use super::sql::migrate_error;
use super::{
    Inserted, MissedReply, NewMessage, NewReply, Store, StoreError, StoreFuture, StoreHealth,
    StoredMessage, StoredReply,
};
use crate::domain::ClientId;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use kaiwa_protocol::Delivery;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::{Connection, Sqlite};
use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
    /// How long delivery marks and acknowledgements wait for a batch of messages or replies to
    /// ride with, at most; `None`: [`super::batch::UPDATES_WAIT`]. Tests set their own.
    pub updates_wait: Option<Duration>,
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
            updates_wait: None,
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

/// Takes the lock a kaiwa process holds on the database at `path` while it uses it (also
/// taken by `kaiwa restore` while it writes one).
pub(crate) fn lock_database(path: &Path) -> Result<File, StoreError> {
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

impl SqliteStore {
    fn read(&self) -> Reads<'_, Sqlite> {
        Reads(&self.reads)
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
        self.read().message(id).await
    }

    async fn history(
        &self,
        client_id: &ClientId,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        self.read().history(client_id, before, limit).await
    }

    async fn history_by_offset(
        &self,
        client_id: &ClientId,
        offset: u64,
        limit: u32,
    ) -> Result<(Vec<StoredMessage>, u64), StoreError> {
        self.read()
            .history_by_offset(client_id, offset, limit)
            .await
    }

    async fn replies_after(
        &self,
        client_id: &ClientId,
        after: u64,
        limit: u32,
    ) -> Result<Vec<MissedReply>, StoreError> {
        self.read().replies_after(client_id, after, limit).await
    }

    async fn latest_seq(&self, client_id: &ClientId) -> Result<u64, StoreError> {
        self.read().latest_seq(client_id).await
    }

    async fn acknowledged(&self, client_id: &ClientId) -> Result<u64, StoreError> {
        self.read().acknowledged(client_id).await
    }

    async fn unfinished_messages(&self) -> Result<Vec<StoredMessage>, StoreError> {
        self.read().unfinished_messages().await
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
    use kaiwa_protocol::{MessageStatus, MessageType, ReplyType};

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
            .insert_replies(
                id,
                &client,
                vec![crate::testing::reply(ReplyType::Text, "one")],
                now,
                true,
            )
            .await
            .expect("stored");
        let second = store
            .insert_replies(
                id,
                &client,
                vec![crate::testing::reply(ReplyType::Text, "two")],
                now,
                true,
            )
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
                .insert_replies(
                    id,
                    &client,
                    vec![crate::testing::reply(ReplyType::Text, "lost")],
                    Utc::now(),
                    true,
                )
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
