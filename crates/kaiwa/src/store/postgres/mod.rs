//! The PostgreSQL store: one batching writer task that commits every waiting command in one
//! transaction ([`writer`]), and a pool of connections for reads, where the reads of reply
//! streams' ends that wait together go as one statement ([`stream_ends`]). Both run their
//! statements on threads of their own (see [`crate::db_thread`]). Several kaiwa
//! processes may share one database: ids come from the database's sequences, and each client's
//! reply stream is numbered under a lock of that client's own.

mod stream_ends;
mod writer;

use stream_ends::StreamEnds;
use writer::Writer;

use super::batch::{DeliveryUpdate, ReplyBatch, StreamUpdate, Writes};
use super::read::{Dialect, MessageRecord, Reads, message_columns};
use super::sql::migrate_error;
use super::{
    Inserted, MissedReply, NewMessage, NewReply, Store, StoreError, StoreFuture, StoreHealth,
    StoredMessage, StoredReply, StuckClaims,
};
use crate::db_thread::DbThread;
use crate::domain::{ClientId, GatewayId};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use kaiwa_protocol::Delivery;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::{Connection, Postgres};
use std::collections::HashSet;
use std::future::Future;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// How long connecting may take before the database counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections for reads (history, resume, recovery).
const READ_CONNECTIONS: u32 = 8;

/// How a process uses the database.
#[derive(Debug, Clone, Default)]
pub struct PgOptions {
    /// `Some` when other kaiwa processes share the database (a cluster): what is pending is
    /// not this process's alone to clean up at start, and the in-flight limit is kept here.
    pub shared: Option<PgShared>,
    /// How long delivery marks and acknowledgements wait for a batch of messages or replies to
    /// ride with, at most; `None`: [`super::batch::UPDATES_WAIT`]. Tests set their own.
    pub updates_wait: Option<Duration>,
    /// How long after one of the writer's calls began a batch of a few commands waits for
    /// more before its own (`--write-interval`); zero: none waits.
    pub write_interval: Duration,
}

/// What a process that shares the database with a cluster keeps in it.
#[derive(Debug, Clone)]
pub struct PgShared {
    /// At most this many messages `accepted` and not yet replied to, across every process:
    /// an accepted message beyond it is not stored, and its sender is told to retry.
    pub max_in_flight: u32,
    /// The gateway this process is, written with every message it admits: if it dies before
    /// publishing a job, the others find the message by it once its lease has ended.
    pub admitted_by: Option<Arc<str>>,
}

/// Which accepted messages a sweeper claims.
#[derive(Debug, Clone)]
enum Claiming {
    /// Neither queued again nor received for this long.
    Untouched(Duration),
    /// Admitted by a gateway whose lease has ended, and never queued again.
    Orphaned,
    /// Admitted by this gateway before this time (by its last run), and never queued again.
    LeftBy(GatewayId, DateTime<Utc>),
}

/// The number of messages in flight across the cluster: the sum of the count's shards (see
/// migration 8), read by `/health` through presence as well as by the store's tests.
pub(crate) const IN_FLIGHT_COUNT: &str = "SELECT SUM(accepted)::bigint FROM in_flight";

pub struct PgStore {
    /// To the writer task.
    writes: Writes,
    reads: PgPool,
    stream_ends: StreamEnds,
    /// The writer's thread, joined by `close` after its last commit.
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Whether the writer's last batch went through, and why not.
    health: Arc<Mutex<StoreHealth>>,
    /// Where every read runs. Last, so that it stops after everything that uses it.
    thread: DbThread,
}

impl PgStore {
    /// Checks that `url` is a PostgreSQL URL sqlx can use. The error never repeats the URL.
    pub fn check_url(url: &str) -> Result<(), String> {
        PgConnectOptions::from_str(url)
            .map(drop)
            .map_err(|err| format!("not a usable PostgreSQL URL (the URL is not shown): {err}"))
    }

    /// A PostgreSQL URL without its password: `postgres://user@host:port/database`.
    pub fn describe_url(url: &str) -> String {
        match PgConnectOptions::from_str(url) {
            Ok(options) => describe(&options),
            Err(_) => "PostgreSQL (an unreadable URL)".to_owned(),
        }
    }

    /// Connects, applies pending migrations (under PostgreSQL's advisory lock, so processes
    /// starting together do not race), marks replies left `pending` by a previous run as
    /// `failed`, and starts the writer.
    pub async fn connect(url: &str, settings: PgOptions) -> Result<Self, StoreError> {
        let options = connect_options(url)?;
        let mut conn = connect(&options).await?;
        migrated(&mut conn).await?;
        // Alone on the database, replies still pending were on their way to clients of a run
        // that stopped. In a cluster they may be on their way now, through another gateway.
        if settings.shared.is_none() {
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
        }
        conn.close().await?;
        let thread = DbThread::start("kaiwa-pg-reads").map_err(|err| {
            StoreError::Database(format!("could not start the reads' thread: {err}"))
        })?;
        let pool_options = options.clone();
        let reads = thread
            .run(async move {
                PgPoolOptions::new()
                    .max_connections(READ_CONNECTIONS)
                    .acquire_timeout(CONNECT_TIMEOUT)
                    .connect_with(pool_options.clone())
                    .await
                    .map_err(|err| unreachable(&pool_options, &err))
            })
            .await?;
        let health = Arc::new(Mutex::new(StoreHealth::Ok));
        let (writes, rx) = Writes::channel();
        let writer = spawn_writer(options, rx, health.clone(), &settings).await?;
        Ok(Self {
            writes,
            stream_ends: StreamEnds::spawn(thread.handle().clone(), reads.clone()),
            reads,
            writer: Mutex::new(Some(writer)),
            health,
            thread,
        })
    }

    /// [`claim`] on the reads' thread.
    async fn claim(&self, stuck: Claiming, limit: u32) -> Result<Vec<StoredMessage>, StoreError> {
        self.read(move |pool| async move { claim(&pool, stuck, limit).await })
            .await
    }

    /// Messages accepted and not yet replied to, across every process (what the contract tests
    /// check the limit by; `/health` reads it through presence).
    #[cfg(test)]
    pub async fn in_flight(&self) -> Result<u64, StoreError> {
        let count: i64 =
            self.read(|pool| async move {
                Ok(sqlx::query_scalar(IN_FLIGHT_COUNT).fetch_one(&pool).await?)
            })
            .await?;
        super::non_negative("messages in flight", count)
    }

    /// Applies pending migrations and returns how many there were.
    pub async fn migrate(url: &str) -> Result<usize, StoreError> {
        let options = connect_options(url)?;
        let mut conn = connect(&options).await?;
        let applied = migrated(&mut conn).await?;
        conn.close().await?;
        Ok(applied)
    }
}

/// Marks up to `limit` accepted messages that are `stuck` as queued again now, and returns them;
/// other processes skip the rows it locks.
async fn claim(
    reads: &PgPool,
    stuck: Claiming,
    limit: u32,
) -> Result<Vec<StoredMessage>, StoreError> {
    let condition = match stuck {
        Claiming::Untouched(_) => {
            "COALESCE(touched_at, received_at) < now() - make_interval(secs => $2)"
        }
        // The first question asked once, before any message is looked up: every process
        // asks every second, and nearly always every lease runs.
        Claiming::Orphaned => {
            "EXISTS (SELECT 1 FROM gateways WHERE lease_until <= now()) \
             AND touched_at IS NULL AND admitted_by IN \
             (SELECT id FROM gateways WHERE lease_until <= now())"
        }
        Claiming::LeftBy(..) => "touched_at IS NULL AND admitted_by = $2 AND received_at < $3",
    };
    let unfinished = <Postgres as Dialect>::UNFINISHED;
    // A reply set completes its message by deleting its row in `unfinished`, not by
    // touching the message (migration 11): a message whose completion is under way is
    // skipped by its row there, and one claimed first holds that row until the claim
    // commits, as the message's own row did when completion updated it.
    let sql = format!(
        "UPDATE messages SET touched_at = now() WHERE id IN ( \
             SELECT id FROM messages \
             WHERE {unfinished} AND {condition} \
                 AND EXISTS (SELECT 1 FROM unfinished AS u \
                     WHERE u.message_id = messages.id FOR KEY SHARE SKIP LOCKED) \
             ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED) \
         RETURNING {}",
        message_columns::<Postgres>()
    );
    let mut query =
        sqlx::query_as::<_, MessageRecord>(sqlx::AssertSqlSafe(sql)).bind(i64::from(limit));
    match stuck {
        Claiming::Untouched(older_than) => query = query.bind(older_than.as_secs_f64()),
        Claiming::Orphaned => {}
        Claiming::LeftBy(gateway, before) => {
            query = query.bind(gateway.as_str().to_owned()).bind(before);
        }
    }
    let mut messages = query
        .fetch_all(reads)
        .await?
        .into_iter()
        .map(StoredMessage::try_from)
        .collect::<Result<Vec<_>, _>>()?;
    messages.sort_by_key(|message| message.id);
    Ok(messages)
}

/// The advisory lock kaiwa holds while it migrates: two processes starting at once take turns,
/// and the second finds the schema done.
const MIGRATION_LOCK: i64 = 0x6b61_6977_615f_6d69; // "kaiwa_mi"

/// Applies pending migrations under [`MIGRATION_LOCK`]; returns how many it applied.
async fn migrated(conn: &mut PgConnection) -> Result<usize, StoreError> {
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut *conn)
        .await?;
    let result = apply_migrations(conn).await;
    let unlocked = sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut *conn)
        .await;
    let applied = result?;
    unlocked?;
    Ok(applied)
}

async fn apply_migrations(conn: &mut PgConnection) -> Result<usize, StoreError> {
    let has_table: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
        .fetch_one(&mut *conn)
        .await?;
    let applied: HashSet<i64> = if has_table {
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations")
            .fetch_all(&mut *conn)
            .await?
            .into_iter()
            .collect()
    } else {
        HashSet::new()
    };
    MIGRATOR.run(&mut *conn).await.map_err(migrate_error)?;
    Ok(MIGRATOR
        .iter()
        .filter(|migration| !applied.contains(&migration.version))
        .count())
}

/// Runs the writer on a thread of its own, with a runtime of its own: its round trips to the
/// database then never wait behind the sessions' tasks for a turn, which under load took longer
/// than the database did.
async fn spawn_writer(
    options: PgConnectOptions,
    inbox: super::inbox::Receiver,
    health: Arc<Mutex<StoreHealth>>,
    settings: &PgOptions,
) -> Result<std::thread::JoinHandle<()>, StoreError> {
    let shared = settings.shared.clone();
    let updates_wait = settings.updates_wait.unwrap_or(super::batch::UPDATES_WAIT);
    let write_interval = settings.write_interval;
    let (ready, connected) = tokio::sync::oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("kaiwa-pg-writer".to_owned())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(err) => {
                    if ready.send(Err(StoreError::from(err))).is_err() {
                        tracing::debug!("the store stopped waiting for its writer");
                    }
                    return;
                }
            };
            runtime.block_on(async move {
                match Writer::connect(options, inbox, health, shared, updates_wait, write_interval)
                    .await
                {
                    Ok(writer) => {
                        if ready.send(Ok(())).is_ok() {
                            writer.run().await;
                        }
                    }
                    Err(err) => {
                        if ready.send(Err(err)).is_err() {
                            tracing::debug!("the store stopped waiting for its writer");
                        }
                    }
                }
            });
        })?;
    connected.await.map_err(|_| StoreError::Closed)??;
    Ok(thread)
}

fn connect_options(url: &str) -> Result<PgConnectOptions, StoreError> {
    // Plans made for the parameters of each execution, not one generic plan cached per
    // statement: a generic plan is chosen once, while the tables are small (a sequential scan
    // of `replies` joined to a batch's ids costs nothing then), and kept as they grow, until
    // every batch reads the whole table. Planning again costs far less than one such scan.
    PgConnectOptions::from_str(url)
        .map(|options| {
            options
                .application_name("kaiwa")
                .options([("plan_cache_mode", "force_custom_plan")])
        })
        .map_err(|err| StoreError::Database(format!("not a usable PostgreSQL URL: {err}")))
}

fn describe(options: &PgConnectOptions) -> String {
    format!(
        "postgres://{}@{}:{}/{}",
        options.get_username(),
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or_default()
    )
}

/// A connection that could not be made, naming the server but not the password.
fn unreachable(options: &PgConnectOptions, err: &sqlx::Error) -> StoreError {
    StoreError::Unavailable(format!(
        "could not connect to PostgreSQL at {}: {err}",
        describe(options)
    ))
}

async fn connect(options: &PgConnectOptions) -> Result<PgConnection, StoreError> {
    match tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(options)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(err)) => Err(unreachable(options, &err)),
        Err(_) => Err(StoreError::Unavailable(format!(
            "could not connect to PostgreSQL at {}: no answer within {}s",
            describe(options),
            CONNECT_TIMEOUT.as_secs()
        ))),
    }
}

impl PgStore {
    /// Runs a read on the reads' thread.
    async fn read<T, F, Fut>(&self, read: F) -> Result<T, StoreError>
    where
        F: FnOnce(PgPool) -> Fut,
        Fut: Future<Output = Result<T, StoreError>> + Send + 'static,
        T: Send + 'static,
    {
        self.thread.run(read(self.reads.clone())).await
    }
}

#[async_trait]
impl StuckClaims for PgStore {
    async fn claim_stuck(
        &self,
        older_than: Duration,
        limit: u32,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        self.claim(Claiming::Untouched(older_than), limit).await
    }

    async fn claim_orphaned(&self, limit: u32) -> Result<Vec<StoredMessage>, StoreError> {
        self.claim(Claiming::Orphaned, limit).await
    }

    async fn claim_left_by(
        &self,
        gateway: &GatewayId,
        before: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        self.claim(Claiming::LeftBy(gateway.clone(), before), limit)
            .await
    }
}

#[async_trait]
impl Store for PgStore {
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
        self.read(move |pool| async move { Reads(&pool).message(id).await })
            .await
    }

    async fn history(
        &self,
        client_id: &ClientId,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let client_id = client_id.clone();
        self.read(move |pool| async move { Reads(&pool).history(&client_id, before, limit).await })
            .await
    }

    async fn history_by_offset(
        &self,
        client_id: &ClientId,
        offset: u64,
        limit: u32,
    ) -> Result<(Vec<StoredMessage>, u64), StoreError> {
        let client_id = client_id.clone();
        self.read(move |pool| async move {
            Reads(&pool)
                .history_by_offset(&client_id, offset, limit)
                .await
        })
        .await
    }

    async fn replies_after(
        &self,
        client_id: &ClientId,
        after: u64,
        limit: u32,
    ) -> Result<Vec<MissedReply>, StoreError> {
        let client_id = client_id.clone();
        self.read(
            move |pool| async move { Reads(&pool).replies_after(&client_id, after, limit).await },
        )
        .await
    }

    async fn latest_seq(&self, client_id: &ClientId) -> Result<u64, StoreError> {
        self.stream_ends.latest(client_id.as_str()).await
    }

    async fn acknowledged(&self, client_id: &ClientId) -> Result<u64, StoreError> {
        let client_id = client_id.clone();
        self.read(move |pool| async move { Reads(&pool).acknowledged(&client_id).await })
            .await
    }

    async fn unfinished_messages(&self) -> Result<Vec<StoredMessage>, StoreError> {
        self.read(|pool| async move { Reads(&pool).unfinished_messages().await })
            .await
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
    }
}

#[cfg(test)]
impl PgStore {
    /// Waits until everything sent to the writer so far is committed.
    pub(super) async fn barrier(&self) {
        self.writes.barrier().await;
    }
}
