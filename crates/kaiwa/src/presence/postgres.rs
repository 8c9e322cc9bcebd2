//! Presence shared through PostgreSQL, for a cluster: each gateway keeps a lease, takes client
//! slots and client ids in rows that several gateways compete for, and workers read there which
//! gateway holds a client. The limits are exact because each slot and each id is one row held
//! by one gateway at a time, taken with row locks rather than counted and then added. Slots are
//! held in blocks (see [`super::block`]) and ids claimed in batches (see [`super::claims`]), so
//! that a storm of connections costs a statement per many of them rather than several each.
//! Every statement runs on presence's own thread ([`crate::db_thread`]); the block and its lock
//! stay with the callers.

use super::block::{SlotBlock, Surplus};
use super::claims::Claims;
use super::sql::{LEASE_CONNECTION, RoundTrip, unavailable};
use super::{Claim, ClusterCounts, Lessee, Presence, PresenceError};
use crate::db_thread::DbThread;
use crate::domain::ClientId;
use crate::domain::GatewayId;
use crate::store::IN_FLIGHT_COUNT;
use crate::store::bigint_param;
use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use std::future::Future;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Connections for presence queries (batches of claims and departures, slot fetches and
/// give-backs, and the workers' lookups).
const CONNECTIONS: u32 = 4;

/// A wait for a pool connection longer than this is logged (sqlx's slow acquire warning): the
/// bound issue 19 sets, half of sqlx's default.
pub(crate) const SLOW_ACQUIRE: Duration = Duration::from_secs(1);

pub struct PgPresence {
    db: Db,
    /// The client slots this gateway holds.
    block: Mutex<SlotBlock>,
    /// Held by whatever changes which rows of `client_slots` are this gateway's (a fetch, a
    /// give-back, a renewal, joining and leaving), so that the block and the table agree
    /// whenever one of them looks: a renewal frees the rows the block does not list, and must
    /// not free those a fetch has taken but not yet listed.
    rows: tokio::sync::Mutex<()>,
    /// Connections waiting for `rows` to fetch slots: the fetch brings one for each.
    waiting: AtomicUsize,
    /// Spare slots taken out of the block by departures and not yet given back: whoever holds
    /// `rows` next gives back all of them in one statement, so that thousands of clients
    /// leaving at once cost a few statements, not one per spare's worth of departures.
    returning: Mutex<Surplus>,
    /// Claims and departures of client ids, written in batches.
    claims: Claims,
    /// Reads of the cluster's counts begun so far.
    counts_begun: AtomicU64,
    /// Held while the cluster's counts are read, with the last counts read and the number of
    /// their read: `/health` asked while a read is under way shares the next one (`counts`).
    counted: tokio::sync::Mutex<Option<(u64, ClusterCounts)>>,
    /// Where every statement runs. Last, so that it stops after everything that uses it.
    thread: DbThread,
}

/// What presence's statements need, cloned into each task on presence's thread.
#[derive(Clone)]
struct Db {
    pool: PgPool,
    /// The lease's own connection: thousands of clients connecting at once queue on `pool`, and
    /// a renewal stuck behind them would let the lease run out under a healthy gateway.
    lease_pool: PgPool,
    gateway: GatewayId,
    /// How long a gateway's claims outlive its last renewal.
    lease: Duration,
}

/// The `application_name` of a gateway's lease connection. PostgreSQL keeps its first 63
/// bytes; `claim` compares as many (gateway ids are ASCII).
fn lease_connection_name(gateway: &GatewayId) -> String {
    format!("{LEASE_CONNECTION}{gateway}")
}

/// How often the lease connection is checked (and opened again if it dropped).
const LEASE_PING: Duration = Duration::from_millis(500);

fn seconds(lease: Duration) -> f64 {
    lease.as_secs_f64()
}

impl PgPresence {
    /// Connects to the database (whose schema the store has applied).
    pub async fn connect(
        url: &str,
        gateway: GatewayId,
        lease: Duration,
    ) -> Result<Self, PresenceError> {
        let options = PgConnectOptions::from_str(url)
            .map_err(|err| PresenceError::Database(format!("not a usable PostgreSQL URL: {err}")))?
            .application_name("kaiwa-presence");
        // Named after the gateway, and never closed while the process lives: a gateway whose
        // process died has no such connection any more, which others see at once, long before
        // its lease runs out (see `claim`).
        let lease_options = options
            .clone()
            .application_name(&lease_connection_name(&gateway));
        let thread = DbThread::start("kaiwa-presence").map_err(|err| {
            PresenceError::Database(format!("could not start presence's thread: {err}"))
        })?;
        let (pool, lease_pool) = thread
            .run(async move {
                let pool = PgPoolOptions::new()
                    .max_connections(CONNECTIONS)
                    .acquire_timeout(Duration::from_secs(5))
                    .acquire_slow_threshold(SLOW_ACQUIRE)
                    .connect_with(options)
                    .await
                    .map_err(|err| unavailable(&err))?;
                let lease_pool = PgPoolOptions::new()
                    .max_connections(1)
                    .min_connections(1)
                    .idle_timeout(None)
                    .max_lifetime(None)
                    .acquire_timeout(lease / 3)
                    .acquire_slow_threshold(SLOW_ACQUIRE)
                    .connect_with(lease_options)
                    .await
                    .map_err(|err| unavailable(&err))?;
                Ok::<_, PresenceError>((pool, lease_pool))
            })
            .await?;
        let claims = Claims::spawn(thread.handle().clone(), pool.clone(), gateway.clone());
        Ok(Self {
            db: Db {
                pool,
                lease_pool,
                gateway,
                lease,
            },
            block: Mutex::new(SlotBlock::default()),
            rows: tokio::sync::Mutex::new(()),
            waiting: AtomicUsize::new(0),
            returning: Mutex::new(Surplus::default()),
            claims,
            counts_begun: AtomicU64::new(0),
            counted: tokio::sync::Mutex::new(None),
            thread,
        })
    }

    /// Runs statements of `db`'s on presence's thread.
    async fn on_thread<T, F, Fut>(&self, work: F) -> Result<T, PresenceError>
    where
        F: FnOnce(Db) -> Fut,
        Fut: Future<Output = Result<T, PresenceError>> + Send + 'static,
        T: Send + 'static,
    {
        self.thread.run(work(self.db.clone())).await
    }

    /// Extends the lease, if it still runs, gives back client ids no live connection holds
    /// and slot rows the block does not list, and then the block's surplus. False if the lease
    /// had run out.
    pub(super) async fn renew(&self, live: &[u64]) -> Result<bool, PresenceError> {
        let _timed = RoundTrip::start("renew");
        let live: Vec<i64> = live.iter().map(|&conn| bigint_param(conn)).collect();
        let rows = self.rows.lock().await;
        let started = tokio::time::Instant::now();
        let held = slot_params(&lock(&self.block).held());
        let Some(short) = self.on_thread(move |db| db.renew(live, held)).await? else {
            return Ok(false);
        };
        let surplus =
            lock(&self.block).renewed(started, self.db.lease, short, tokio::time::Instant::now());
        self.give_back_locked(surplus).await;
        drop(rows);
        let reclaimed = self
            .on_thread(|db| async move { reclaim(&db.lease_pool).await })
            .await;
        if let Err(err) = reclaimed {
            // The lease is renewed: a reclaim that failed is tried again at the next renewal,
            // and must not count as a renewal that failed.
            tracing::warn!(gateway = %self.db.gateway, %err, "could not free the slots of gateways that are gone");
        }
        Ok(true)
    }

    /// Returns slots to the cluster; `rows` is held. A give-back of an earlier epoch is
    /// dropped: joining again or a renewal freed its rows, and some may be this gateway's
    /// again.
    async fn give_back_locked(&self, surplus: Surplus) {
        if surplus.slots.is_empty() || surplus.epoch != lock(&self.block).epoch() {
            return;
        }
        let count = surplus.slots.len();
        let slots = slot_params(&surplus.slots);
        if let Err(err) = self.on_thread(move |db| db.give_back(slots)).await {
            // Nothing is lost: the rows are no longer in the block, and the next renewal frees
            // every row of this gateway's that the block does not list.
            tracing::info!(slots = count, %err, "spare client slots not given back yet; the next renewal frees them");
        }
    }

    /// How many slots the block lists, spare or in use.
    #[cfg(test)]
    pub(super) fn block_held(&self) -> usize {
        lock(&self.block).held().len()
    }

    /// A slot of the block for the connection, if one is spare.
    fn take_here(&self, conn_id: u64) -> Result<Option<u32>, PresenceError> {
        let now = tokio::time::Instant::now();
        let mut block = lock(&self.block);
        if !block.lease_runs(now) {
            return Err(PresenceError::Unavailable(
                "this gateway's lease has run out; it joins the cluster again".into(),
            ));
        }
        Ok(block.take(conn_id, now))
    }

    /// Gives back every slot and client id this gateway holds.
    async fn leave(&self) -> Result<(), PresenceError> {
        let _rows = self.rows.lock().await;
        self.leave_locked().await
    }

    async fn leave_locked(&self) -> Result<(), PresenceError> {
        lock(&self.block).reset(None);
        self.on_thread(Db::leave).await
    }
}

impl Db {
    /// The cluster's counts, read now (what `counts` shares).
    async fn read_counts(self) -> Result<ClusterCounts, PresenceError> {
        let _timed = RoundTrip::start("counts");
        let (clients, in_flight, gateways): (i64, i64, i64) =
            sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT \
                     (SELECT COUNT(*) FROM sessions AS s JOIN gateways AS g ON g.id = s.gateway_id \
                      WHERE g.lease_until > now()), \
                     ({IN_FLIGHT_COUNT}), \
                     (SELECT COUNT(*) FROM gateways WHERE lease_until > now())"
            )))
            .fetch_one(&self.pool)
            .await
            .map_err(|err| unavailable(&err))?;
        let count = |what: &str, value: i64| {
            u64::try_from(value)
                .map_err(|_| PresenceError::Database(format!("a corrupt count of {what}: {value}")))
        };
        Ok(ClusterCounts {
            clients: count("clients", clients)?,
            in_flight: count("messages in flight", in_flight)?,
            gateways: count("gateways", gateways)?,
        })
    }

    /// The renewal's statements: whether any gateway ran short of free slots lately, or
    /// `None` if this gateway's lease had run out.
    async fn renew(self, live: Vec<i64>, held: Vec<i32>) -> Result<Option<bool>, PresenceError> {
        let mut tx = self
            .lease_pool
            .begin()
            .await
            .map_err(|err| unavailable(&err))?;
        // Whether any gateway ran short of free slots lately comes back with the renewal.
        let short: Option<bool> = sqlx::query_scalar(
            "UPDATE gateways SET lease_until = now() + make_interval(secs => $2) \
             WHERE id = $1 AND lease_until > now() \
             RETURNING EXISTS (SELECT 1 FROM gateways \
                 WHERE short_until > now() AND lease_until > now())",
        )
        .bind(self.gateway.as_str())
        .bind(seconds(self.lease))
        .fetch_optional(&mut *tx)
        .await
        .map_err(|err| unavailable(&err))?;
        if short.is_some() {
            // Only rows older than a moment: a connection takes its row after it is listed
            // live, and the list was read before this statement.
            // Anti-joins, not `<> ALL`: a gateway lists thousands of live connections, and
            // comparing each row with the whole list would cost their product.
            sqlx::query(
                "DELETE FROM sessions AS s WHERE s.gateway_id = $1 \
                 AND s.since < now() - interval '5 seconds' \
                 AND NOT EXISTS (SELECT 1 FROM UNNEST($2::bigint[]) AS l(conn) WHERE l.conn = s.conn_id)",
            )
            .bind(self.gateway.as_str())
            .bind(&live)
            .execute(&mut *tx)
            .await
            .map_err(|err| unavailable(&err))?;
            // Rows of a give-back or a fetch that failed halfway.
            sqlx::query(
                "UPDATE client_slots AS c SET gateway_id = NULL, conn_id = NULL, taken_at = NULL \
                 WHERE c.gateway_id = $1 \
                 AND NOT EXISTS (SELECT 1 FROM UNNEST($2::integer[]) AS h(slot) WHERE h.slot = c.slot)",
            )
            .bind(self.gateway.as_str())
            .bind(&held)
            .execute(&mut *tx)
            .await
            .map_err(|err| unavailable(&err))?;
        }
        tx.commit().await.map_err(|err| unavailable(&err))?;
        Ok(short)
    }

    async fn give_back(self, slots: Vec<i32>) -> Result<(), PresenceError> {
        let _timed = RoundTrip::start("give_back");
        // Row by row, for the reason the departures' statement gives (`claims.rs`).
        sqlx::query(
            "UPDATE client_slots SET gateway_id = NULL, conn_id = NULL, taken_at = NULL \
             WHERE ctid = ANY(ARRAY( \
                 SELECT found.ctid FROM UNNEST($2::integer[]) AS g(slot) \
                 CROSS JOIN LATERAL (SELECT c.ctid FROM client_slots AS c \
                     WHERE c.slot = g.slot AND c.gateway_id = $1 OFFSET 0) AS found))",
        )
        .bind(self.gateway.as_str())
        .bind(&slots)
        .execute(&self.pool)
        .await
        .map(drop)
        .map_err(|err| unavailable(&err))
    }

    /// Takes up to `want` free slots for this gateway's block. When there are fewer, the slots
    /// of gateways whose lease ended are freed first, and the gateway is marked short (others
    /// keep no spare slots while one is).
    async fn fetch(self, want: usize, max_clients: u32) -> Result<Vec<u32>, PresenceError> {
        let mut slots = self.fetch_once(want, max_clients).await?;
        if slots.len() < want {
            if reclaim(&self.pool).await? > 0 {
                let more = self.fetch_once(want - slots.len(), max_clients).await?;
                slots.extend(more);
            }
            if slots.len() < want {
                sqlx::query(
                    "UPDATE gateways SET short_until = now() + make_interval(secs => $2) WHERE id = $1",
                )
                .bind(self.gateway.as_str())
                .bind(seconds(self.lease))
                .execute(&self.pool)
                .await
                .map_err(|err| unavailable(&err))?;
            }
        }
        Ok(slots)
    }

    /// The lowest free slots, up to `want`; rows another gateway is taking right now are
    /// skipped rather than waited for. Nothing while this gateway's lease has run out: what it
    /// holds may be freed by others any moment.
    async fn fetch_once(&self, want: usize, max_clients: u32) -> Result<Vec<u32>, PresenceError> {
        let _timed = RoundTrip::start("fetch_slots");
        let slots: Vec<i32> = sqlx::query_scalar(
            "WITH free AS ( \
                 SELECT slot FROM client_slots WHERE gateway_id IS NULL AND slot <= $3 \
                 AND EXISTS (SELECT 1 FROM gateways WHERE id = $1 AND lease_until > now()) \
                 ORDER BY slot LIMIT $2 FOR UPDATE SKIP LOCKED) \
             UPDATE client_slots AS c SET gateway_id = $1, conn_id = NULL, taken_at = now() \
             FROM free WHERE c.slot = free.slot RETURNING c.slot",
        )
        .bind(self.gateway.as_str())
        .bind(i64::try_from(want).unwrap_or(i64::MAX))
        .bind(i32::try_from(max_clients).unwrap_or(i32::MAX))
        .fetch_all(&self.pool)
        .await
        .map_err(|err| unavailable(&err))?;
        Ok(slots
            .into_iter()
            .filter_map(|slot| u32::try_from(slot).ok())
            .collect())
    }

    /// Gives back every slot and client id of this gateway's, and ends its lease.
    async fn leave(self) -> Result<(), PresenceError> {
        let _timed = RoundTrip::start("leave");
        let mut tx = self.pool.begin().await.map_err(|err| unavailable(&err))?;
        sqlx::query("DELETE FROM sessions WHERE gateway_id = $1")
            .bind(self.gateway.as_str())
            .execute(&mut *tx)
            .await
            .map_err(|err| unavailable(&err))?;
        sqlx::query(
            "UPDATE client_slots SET gateway_id = NULL, conn_id = NULL, taken_at = NULL \
             WHERE gateway_id = $1",
        )
        .bind(self.gateway.as_str())
        .execute(&mut *tx)
        .await
        .map_err(|err| unavailable(&err))?;
        // Kept, with its lease over, rather than deleted: a slot some connection takes during
        // shutdown, after this, is then still one that `reclaim` finds.
        sqlx::query("UPDATE gateways SET lease_until = '-infinity' WHERE id = $1")
            .bind(self.gateway.as_str())
            .execute(&mut *tx)
            .await
            .map_err(|err| unavailable(&err))?;
        tx.commit().await.map_err(|err| unavailable(&err))
    }

    /// Puts this gateway's lease in, and the cluster's slots.
    async fn join(self, max_clients: u32) -> Result<(), PresenceError> {
        sqlx::query(
            "INSERT INTO gateways (id, started_at, lease_until) \
             VALUES ($1, now(), now() + make_interval(secs => $2)) \
             ON CONFLICT (id) DO UPDATE SET started_at = now(), lease_until = EXCLUDED.lease_until",
        )
        .bind(self.gateway.as_str())
        .bind(seconds(self.lease))
        .execute(&self.pool)
        .await
        .map_err(|err| unavailable(&err))?;
        // Slots beyond the configured count stay unused; all gateways should agree on it.
        sqlx::query(
            "INSERT INTO client_slots (slot) SELECT generate_series(1, $1) ON CONFLICT DO NOTHING",
        )
        .bind(i32::try_from(max_clients).unwrap_or(i32::MAX))
        .execute(&self.pool)
        .await
        .map_err(|err| unavailable(&err))?;
        Ok(())
    }

    async fn holder(self, client_id: ClientId) -> Result<Option<GatewayId>, PresenceError> {
        let _timed = RoundTrip::start("holder");
        let holder: Option<String> = sqlx::query_scalar(
            "SELECT s.gateway_id FROM sessions AS s JOIN gateways AS g ON g.id = s.gateway_id \
             WHERE s.client_id = $1 AND g.lease_until > now()",
        )
        .bind(client_id.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(|err| unavailable(&err))?;
        Ok(holder.map(GatewayId::new))
    }

    /// Checks the lease connection, opening it again if it dropped.
    async fn ping(self) -> Result<(), PresenceError> {
        sqlx::query("SELECT 1")
            .execute(&self.lease_pool)
            .await
            .map(drop)
            .map_err(|err| unavailable(&err))
    }

    async fn in_flight(self) -> Result<Option<u64>, PresenceError> {
        let _timed = RoundTrip::start("in_flight");
        let in_flight: i64 = sqlx::query_scalar(IN_FLIGHT_COUNT)
            .fetch_one(&self.pool)
            .await
            .map_err(|err| unavailable(&err))?;
        u64::try_from(in_flight).map(Some).map_err(|_| {
            PresenceError::Database(format!(
                "a corrupt count of messages in flight: {in_flight}"
            ))
        })
    }
}

/// Frees the slots of gateways whose lease has run out; returns how many. Whatever they held
/// counted as free already (every check joins on a live lease): this only puts the rows back
/// where a taker looks first. Their clients' sessions go too, and with them what those clients
/// were offered and never acknowledged: replies still `pending` become `failed`, as a gateway
/// that stops cleanly records them, so that history says the truth (the client gets them when
/// it resumes, on whichever gateway).
async fn reclaim(pool: &PgPool) -> Result<u64, PresenceError> {
    let mut tx = pool.begin().await.map_err(|err| unavailable(&err))?;
    let freed = sqlx::query(
        "UPDATE client_slots SET gateway_id = NULL, conn_id = NULL, taken_at = NULL \
         WHERE gateway_id IN (SELECT id FROM gateways WHERE lease_until <= now())",
    )
    .execute(&mut *tx)
    .await
    .map_err(|err| unavailable(&err))?
    .rows_affected();
    // The replies table is the store's; it is touched here, in the one statement that knows
    // whose sessions ended, the way the store's own departure update does (`seq` after the
    // client's acknowledgement, through the stream's index).
    let failed = sqlx::query(
        "WITH gone AS ( \
             DELETE FROM sessions WHERE gateway_id IN \
                 (SELECT id FROM gateways WHERE lease_until <= now()) \
             RETURNING client_id) \
         UPDATE replies AS r SET delivery = 'failed' \
         FROM gone LEFT JOIN reply_streams AS s ON s.client_id = gone.client_id \
         WHERE r.client_id = gone.client_id AND r.seq > COALESCE(s.acknowledged, 0) \
             AND r.delivery = 'pending'",
    )
    .execute(&mut *tx)
    .await
    .map_err(|err| unavailable(&err))?
    .rows_affected();
    tx.commit().await.map_err(|err| unavailable(&err))?;
    if freed > 0 || failed > 0 {
        tracing::info!(
            slots = freed,
            undelivered_replies = failed,
            "gateways whose lease ran out: their client slots are free again, and replies their clients never acknowledged are failed"
        );
    }
    Ok(freed)
}

#[async_trait]
impl Presence for PgPresence {
    async fn join(&self, max_clients: u32) -> Result<(), PresenceError> {
        let _timed = RoundTrip::start("join");
        let _rows = self.rows.lock().await;
        self.leave_locked().await?;
        let started = tokio::time::Instant::now();
        self.on_thread(move |db| db.join(max_clients)).await?;
        let mut block = lock(&self.block);
        block.size_for(max_clients);
        block.reset(Some((started, self.db.lease)));
        Ok(())
    }

    /// Renews the lease every third of it until `stop`, then leaves the cluster. Each renewal
    /// also gives back the client ids of this gateway's that no live connection holds (their
    /// release failed), slot rows its block does not list, and the block's surplus. If the
    /// lease could not be renewed before it ran out, others may have taken this gateway's
    /// slots and ids: the lessee is told (it closes its sessions), and the gateway joins again
    /// once the database answers.
    async fn keep_lease(&self, max_clients: u32, stop: CancellationToken, lessee: Arc<dyn Lessee>) {
        let mut tick = tokio::time::interval(self.db.lease / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Others read this gateway as alive from its lease connection being open (`claim`):
        // one that dropped (a database restart, a reset) is opened again within this, rather
        // than at the next renewal.
        let mut ping = tokio::time::interval(LEASE_PING);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut renewed_at = tokio::time::Instant::now();
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = ping.tick() => {
                    // A connection in use is open: the ping is for one idle or dropped, and
                    // waiting behind a renewal slowed by a storm only made sqlx warn.
                    let lease_pool = &self.db.lease_pool;
                    if lease_pool.size() > 0 && lease_pool.num_idle() == 0 {
                        continue;
                    }
                    if let Err(err) = self.on_thread(Db::ping).await {
                        tracing::debug!(gateway = %self.db.gateway, %err, "the lease connection is down");
                    }
                    continue;
                }
                _ = tick.tick() => {}
            }
            match self.renew(&lessee.live_connections()).await {
                Ok(true) => renewed_at = tokio::time::Instant::now(),
                Ok(false) => {
                    tracing::error!(gateway = %self.db.gateway, "the gateway's lease ran out: its clients are closed and it joins again");
                    metrics::counter!("kaiwa_lease_lost_total").increment(1);
                    lessee.lease_lost();
                    match self.join(max_clients).await {
                        Ok(()) => renewed_at = tokio::time::Instant::now(),
                        Err(err) => {
                            tracing::warn!(gateway = %self.db.gateway, %err, "could not join the cluster again")
                        }
                    }
                }
                Err(err) => {
                    tracing::warn!(gateway = %self.db.gateway, %err, "could not renew the gateway's lease");
                    if renewed_at.elapsed() >= self.db.lease {
                        // Nobody can tell whether others took our slots: act as if they did.
                        lessee.lease_lost();
                    }
                }
            }
        }
        if let Err(err) = self.leave().await {
            tracing::warn!(gateway = %self.db.gateway, %err, "could not give back the gateway's clients");
        }
    }

    async fn holder(&self, client_id: &ClientId) -> Result<Option<GatewayId>, PresenceError> {
        let client_id = client_id.clone();
        self.on_thread(move |db| db.holder(client_id)).await
    }

    async fn take_slot(
        &self,
        conn_id: u64,
        max_clients: u32,
    ) -> Result<Option<u32>, PresenceError> {
        if let Some(slot) = self.take_here(conn_id)? {
            return Ok(Some(slot));
        }
        let _timed = RoundTrip::start("take_slot");
        let waiting = Waiting::enter(&self.waiting);
        let rows = self.rows.lock().await;
        drop(waiting);
        // Another connection's fetch may have brought one meanwhile.
        if let Some(slot) = self.take_here(conn_id)? {
            return Ok(Some(slot));
        }
        let (want, epoch) = {
            let block = lock(&self.block);
            let waiting = self.waiting.load(Ordering::SeqCst) + 1;
            (
                block.wanted(waiting, tokio::time::Instant::now()),
                block.epoch(),
            )
        };
        let slots = self
            .on_thread(move |db| db.fetch(want, max_clients))
            .await?;
        lock(&self.block).fill(
            epoch,
            slots,
            want,
            tokio::time::Instant::now(),
            self.db.lease,
        );
        drop(rows);
        self.take_here(conn_id)
    }

    async fn release_slot(&self, slot: u32, conn_id: u64) {
        let surplus = lock(&self.block).release(conn_id, slot, tokio::time::Instant::now());
        if surplus.slots.is_empty() {
            return;
        }
        lock(&self.returning).merge(surplus);
        let _rows = self.rows.lock().await;
        // Empty when an earlier departure's give-back took these along.
        let surplus = std::mem::take(&mut *lock(&self.returning));
        self.give_back_locked(surplus).await;
    }

    async fn claim(
        &self,
        client_id: &ClientId,
        conn_id: u64,
        replace: bool,
    ) -> Result<Claim, PresenceError> {
        self.claims.claim(client_id, conn_id, replace).await
    }

    async fn release(&self, client_id: &ClientId, conn_id: u64) {
        self.claims.release(client_id, conn_id).await;
    }

    /// One read at a time, and none older than its question: a caller that waited for the
    /// turn takes the counts of a read that began after it asked, if there is one, else reads
    /// again. The counts visit every live `sessions` row, and every load balancer check and
    /// monitor asks for them: while 50,000 clients left at once and the cores were short, each
    /// read took over a second, and reads that overlapped would each hold one of the pool's four
    /// connections that the departures' statements wait for.
    async fn counts(&self) -> Result<Option<ClusterCounts>, PresenceError> {
        let asked = self.counts_begun.load(Ordering::SeqCst);
        let mut counted = self.counted.lock().await;
        if let Some((read, counts)) = *counted
            && read > asked
        {
            return Ok(Some(counts));
        }
        let read = self.counts_begun.fetch_add(1, Ordering::SeqCst) + 1;
        let counts = self.on_thread(Db::read_counts).await?;
        *counted = Some((read, counts));
        Ok(Some(counts))
    }

    async fn in_flight(&self) -> Result<Option<u64>, PresenceError> {
        self.on_thread(Db::in_flight).await
    }
}

/// A connection counted in [`PgPresence::waiting`] while it waits for `rows`, and no longer
/// once that wait ends, however it ends: one dropped while it waited (at a hard stop) would
/// otherwise make every later fetch ask for a slot more.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn enter(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Self(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every update leaves the block whole: a panic cannot stop one halfway.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Slot numbers as PostgreSQL integers.
fn slot_params(slots: &[u32]) -> Vec<i32> {
    slots
        .iter()
        .filter_map(|&slot| i32::try_from(slot).ok())
        .collect()
}
