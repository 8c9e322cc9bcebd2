//! Presence shared through PostgreSQL, for a cluster: each gateway keeps a lease, takes client
//! slots and client ids in rows that several gateways compete for, and workers read there which
//! gateway holds a client. The limits are exact because each slot and each id is one row that
//! one connection holds at a time, taken with row locks rather than counted and then added.

use super::{Claim, ClusterCounts, Lessee, Presence, PresenceError};
use crate::domain::ClientId;
use crate::domain::GatewayId;
use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Connections for presence queries (one per connect and disconnect, and the workers' lookups).
const CONNECTIONS: u32 = 4;

pub struct PgPresence {
    pool: PgPool,
    /// The lease's own connection: thousands of clients connecting at once queue on `pool`, and
    /// a renewal stuck behind them would let the lease run out under a healthy gateway.
    lease_pool: PgPool,
    gateway: GatewayId,
    /// How long a gateway's claims outlive its last renewal.
    lease: Duration,
}

fn unavailable(err: &sqlx::Error) -> PresenceError {
    if crate::store::is_outage(err) {
        PresenceError::Unavailable(err.to_string())
    } else {
        PresenceError::Database(err.to_string())
    }
}

/// The `application_name` of a gateway's lease connection. PostgreSQL keeps its first 63
/// bytes; `claim` compares as many (gateway ids are ASCII).
fn lease_connection_name(gateway: &GatewayId) -> String {
    format!("{LEASE_CONNECTION}{gateway}")
}

const LEASE_CONNECTION: &str = "kaiwa-lease:";

/// How often the lease connection is checked (and opened again if it dropped).
const LEASE_PING: Duration = Duration::from_millis(500);

/// One round trip to the database for presence, timed in `kaiwa_presence_seconds{op}` when it
/// ends, whichever way it ends.
struct RoundTrip {
    op: &'static str,
    started: Instant,
}

impl RoundTrip {
    fn start(op: &'static str) -> Self {
        Self {
            op,
            started: Instant::now(),
        }
    }
}

impl Drop for RoundTrip {
    fn drop(&mut self) {
        metrics::histogram!("kaiwa_presence_seconds", "op" => self.op)
            .record(self.started.elapsed().as_secs_f64());
    }
}

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
        let pool = PgPoolOptions::new()
            .max_connections(CONNECTIONS)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options.clone())
            .await
            .map_err(|err| unavailable(&err))?;
        // Named after the gateway, and never closed while the process lives: a gateway whose
        // process died has no such connection any more, which others see at once, long before
        // its lease runs out (see `claim`).
        let lease_pool = PgPoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .acquire_timeout(lease / 3)
            .connect_with(options.application_name(&lease_connection_name(&gateway)))
            .await
            .map_err(|err| unavailable(&err))?;
        Ok(Self {
            pool,
            lease_pool,
            gateway,
            lease,
        })
    }

    /// Extends the lease, if it still runs, and gives back rows no live connection holds.
    /// False if the lease had run out.
    async fn renew(&self, live: &[u64]) -> Result<bool, PresenceError> {
        let _timed = RoundTrip::start("renew");
        let live: Vec<i64> = live
            .iter()
            .map(|&conn| i64::try_from(conn).unwrap_or(i64::MAX))
            .collect();
        let mut tx = self
            .lease_pool
            .begin()
            .await
            .map_err(|err| unavailable(&err))?;
        let renewed = sqlx::query(
            "UPDATE gateways SET lease_until = now() + make_interval(secs => $2) \
             WHERE id = $1 AND lease_until > now()",
        )
        .bind(self.gateway.as_str())
        .bind(seconds(self.lease))
        .execute(&mut *tx)
        .await
        .map_err(|err| unavailable(&err))?
        .rows_affected()
            == 1;
        if renewed {
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
            sqlx::query(
                "UPDATE client_slots AS c SET gateway_id = NULL, conn_id = NULL, taken_at = NULL \
                 WHERE c.gateway_id = $1 AND c.taken_at < now() - interval '5 seconds' \
                 AND NOT EXISTS (SELECT 1 FROM UNNEST($2::bigint[]) AS l(conn) WHERE l.conn = c.conn_id)",
            )
            .bind(self.gateway.as_str())
            .bind(&live)
            .execute(&mut *tx)
            .await
            .map_err(|err| unavailable(&err))?;
        }
        tx.commit().await.map_err(|err| unavailable(&err))?;
        if renewed && let Err(err) = reclaim(&self.lease_pool).await {
            // The lease is renewed: a reclaim that failed is tried again at the next renewal,
            // and must not count as a renewal that failed.
            tracing::warn!(gateway = %self.gateway, %err, "could not free the slots of gateways that are gone");
        }
        Ok(renewed)
    }

    /// Gives back every slot and client id this gateway holds.
    async fn leave(&self) -> Result<(), PresenceError> {
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
        self.leave().await?;
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

    /// Renews the lease every third of it until `stop`, then leaves the cluster. Each renewal
    /// also gives back the rows of this gateway that no live connection holds (their release
    /// failed). If the lease could not be renewed before it ran out, others may have taken
    /// this gateway's slots and ids: the lessee is told (it closes its sessions), and the
    /// gateway joins again once the database answers.
    async fn keep_lease(&self, max_clients: u32, stop: CancellationToken, lessee: Arc<dyn Lessee>) {
        let mut tick = tokio::time::interval(self.lease / 3);
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
                    if let Err(err) = sqlx::query("SELECT 1").execute(&self.lease_pool).await {
                        tracing::debug!(gateway = %self.gateway, %err, "the lease connection is down");
                    }
                    continue;
                }
                _ = tick.tick() => {}
            }
            match self.renew(&lessee.live_connections()).await {
                Ok(true) => renewed_at = tokio::time::Instant::now(),
                Ok(false) => {
                    tracing::error!(gateway = %self.gateway, "the gateway's lease ran out: its clients are closed and it joins again");
                    metrics::counter!("kaiwa_lease_lost_total").increment(1);
                    lessee.lease_lost();
                    match self.join(max_clients).await {
                        Ok(()) => renewed_at = tokio::time::Instant::now(),
                        Err(err) => {
                            tracing::warn!(gateway = %self.gateway, %err, "could not join the cluster again")
                        }
                    }
                }
                Err(err) => {
                    tracing::warn!(gateway = %self.gateway, %err, "could not renew the gateway's lease");
                    if renewed_at.elapsed() >= self.lease {
                        // Nobody can tell whether others took our slots: act as if they did.
                        lessee.lease_lost();
                    }
                }
            }
        }
        if let Err(err) = self.leave().await {
            tracing::warn!(gateway = %self.gateway, %err, "could not give back the gateway's clients");
        }
    }

    async fn holder(&self, client_id: &ClientId) -> Result<Option<GatewayId>, PresenceError> {
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

    async fn take_slot(
        &self,
        conn_id: u64,
        max_clients: u32,
    ) -> Result<Option<u32>, PresenceError> {
        let _timed = RoundTrip::start("take_slot");
        // The lowest free slot; one another connection is taking right now is skipped rather
        // than waited for. Slots of gateways that died are made free by `reclaim` (here, when
        // none is free, and at every lease renewal), so this stays an index lookup.
        for attempt in 0..2 {
            let slot: Option<i32> = sqlx::query_scalar(
                "WITH free AS ( \
                     SELECT slot FROM client_slots WHERE gateway_id IS NULL AND slot <= $3 \
                     ORDER BY slot LIMIT 1 FOR UPDATE SKIP LOCKED) \
                 UPDATE client_slots AS c SET gateway_id = $1, conn_id = $2, taken_at = now() \
                 FROM free WHERE c.slot = free.slot RETURNING c.slot",
            )
            .bind(self.gateway.as_str())
            .bind(i64::try_from(conn_id).unwrap_or(i64::MAX))
            .bind(i32::try_from(max_clients).unwrap_or(i32::MAX))
            .fetch_optional(&self.pool)
            .await
            .map_err(|err| unavailable(&err))?;
            if let Some(slot) = slot {
                return Ok(u32::try_from(slot).ok());
            }
            if attempt == 0 && reclaim(&self.pool).await? == 0 {
                break;
            }
        }
        Ok(None)
    }

    async fn release_slot(&self, slot: u32, conn_id: u64) {
        let _timed = RoundTrip::start("release_slot");
        let released = sqlx::query(
            "UPDATE client_slots SET gateway_id = NULL, conn_id = NULL, taken_at = NULL \
             WHERE slot = $1 AND gateway_id = $2 AND conn_id = $3",
        )
        .bind(i32::try_from(slot).unwrap_or(i32::MAX))
        .bind(self.gateway.as_str())
        .bind(i64::try_from(conn_id).unwrap_or(i64::MAX))
        .execute(&self.pool)
        .await;
        if let Err(err) = released {
            // The slot comes back when this gateway's lease ends, if it ever does.
            tracing::warn!(slot, %err, "could not give back a client slot");
        }
    }

    async fn claim(
        &self,
        client_id: &ClientId,
        conn_id: u64,
        replace: bool,
    ) -> Result<Claim, PresenceError> {
        let _timed = RoundTrip::start("claim");
        let mut tx = self.pool.begin().await.map_err(|err| unavailable(&err))?;
        // The row, locked: two gateways claiming one id at once take turns. A holder counts
        // while its lease runs; within the lease, it is alive while its lease connection is
        // open. A gateway that was killed loses that connection at once (the kernel closes its
        // sockets), so its clients are not refused elsewhere for the rest of its lease. Ids are
        // compared on PostgreSQL's first 63 bytes of the name: two alike that far count as
        // connected if either is, and the lease alone decides, as before.
        let held: Option<(String, i64, bool, bool)> = sqlx::query_as(
            "SELECT s.gateway_id, s.conn_id, EXISTS ( \
                 SELECT 1 FROM gateways AS g WHERE g.id = s.gateway_id AND g.lease_until > now()), \
               EXISTS (SELECT 1 FROM pg_stat_activity AS a \
                 WHERE a.datname = current_database() \
                   AND a.application_name = left($2 || s.gateway_id, 63)) \
             FROM sessions AS s WHERE s.client_id = $1 FOR UPDATE",
        )
        .bind(client_id.as_str())
        .bind(LEASE_CONNECTION)
        .fetch_optional(&mut *tx)
        .await
        .map_err(|err| unavailable(&err))?;
        let previous = match held {
            // This gateway's own registry already decided between its connections.
            Some((gateway, ..)) if gateway == self.gateway.as_str() => None,
            Some((gateway, conn, true, connected)) => {
                let conn = u64::try_from(conn).map_err(|_| {
                    PresenceError::Database(format!("a corrupt connection id {conn}"))
                })?;
                let other = (GatewayId::new(gateway), conn);
                if connected && !replace {
                    return Ok(Claim::Held {
                        gateway: other.0,
                        conn_id: other.1,
                    });
                }
                // Not connected: most likely dead, but it may only be reopening its lease
                // connection. Taken either way, and the holder is told, as with `replace`,
                // so that a live one closes its connection rather than keep a second one.
                Some(other)
            }
            // Held by a gateway whose lease ended.
            Some((_, _, false, _)) | None => None,
        };
        sqlx::query(
            "INSERT INTO sessions (client_id, gateway_id, conn_id, since) VALUES ($1, $2, $3, now()) \
             ON CONFLICT (client_id) DO UPDATE \
                 SET gateway_id = EXCLUDED.gateway_id, conn_id = EXCLUDED.conn_id, since = now()",
        )
        .bind(client_id.as_str())
        .bind(self.gateway.as_str())
        .bind(i64::try_from(conn_id).unwrap_or(i64::MAX))
        .execute(&mut *tx)
        .await
        .map_err(|err| unavailable(&err))?;
        tx.commit().await.map_err(|err| unavailable(&err))?;
        Ok(Claim::Claimed { replaced: previous })
    }

    async fn release(&self, client_id: &ClientId, conn_id: u64) {
        let _timed = RoundTrip::start("release");
        let released = sqlx::query(
            "DELETE FROM sessions WHERE client_id = $1 AND gateway_id = $2 AND conn_id = $3",
        )
        .bind(client_id.as_str())
        .bind(self.gateway.as_str())
        .bind(i64::try_from(conn_id).unwrap_or(i64::MAX))
        .execute(&self.pool)
        .await;
        if let Err(err) = released {
            tracing::warn!(%client_id, %err, "could not give back a client id");
        }
    }

    async fn counts(&self) -> Result<Option<ClusterCounts>, PresenceError> {
        let _timed = RoundTrip::start("counts");
        let (clients, in_flight, gateways): (i64, i64, i64) = sqlx::query_as(
            "SELECT \
                 (SELECT COUNT(*) FROM sessions AS s JOIN gateways AS g ON g.id = s.gateway_id \
                  WHERE g.lease_until > now()), \
                 (SELECT accepted FROM in_flight), \
                 (SELECT COUNT(*) FROM gateways WHERE lease_until > now())",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(|err| unavailable(&err))?;
        let count = |what: &str, value: i64| {
            u64::try_from(value)
                .map_err(|_| PresenceError::Database(format!("a corrupt count of {what}: {value}")))
        };
        Ok(Some(ClusterCounts {
            clients: count("clients", clients)?,
            in_flight: count("messages in flight", in_flight)?,
            gateways: count("gateways", gateways)?,
        }))
    }

    async fn in_flight(&self) -> Result<Option<u64>, PresenceError> {
        let _timed = RoundTrip::start("in_flight");
        let in_flight: i64 = sqlx::query_scalar("SELECT accepted FROM in_flight")
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
