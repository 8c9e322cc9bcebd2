//! Client ids claimed and given back in batches: every claim and departure of a gateway goes
//! over a channel to one task, which writes all that are waiting with one statement per kind
//! (rows passed as arrays, the statement run on presence's thread) and answers each claim, as
//! the store's writer does with messages.
//! A storm of 50,000 connections then costs PostgreSQL a few hundred statements, not 50,000
//! transactions of four round trips each.

use super::sql::{LEASE_CONNECTION, RoundTrip, unavailable};
use super::{Claim, PresenceError};
use crate::db_thread::run_on;
use crate::domain::{ClientId, GatewayId};
use crate::store::bigint_param;
use sqlx::PgPool;
use std::collections::{HashMap, HashSet};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, oneshot};

/// Requests taken in one go, at most.
const MAX_BATCH: usize = 4096;

/// How often a claim that met a row inserted by another gateway in the same instant is made
/// again (the second time it sees that row and is decided).
const RACED_ATTEMPTS: u8 = 3;

pub(super) enum Request {
    Claim(Pending),
    Release {
        client_id: ClientId,
        conn_id: u64,
        done: oneshot::Sender<()>,
    },
}

/// The sending side, kept by [`super::PgPresence`].
#[derive(Clone)]
pub(super) struct Claims {
    /// Unbounded because each request stands for a connection holding a slot: the client limit
    /// bounds it.
    requests: mpsc::UnboundedSender<Request>,
}

impl Claims {
    /// Starts the task that writes the claims of `gateway`, its statements run on `thread`
    /// (presence's); it ends when every sender is gone. The task itself stays with the
    /// gateway's tasks, which it answers.
    pub(super) fn spawn(thread: Handle, pool: PgPool, gateway: GatewayId) -> Self {
        let (requests, receiver) = mpsc::unbounded_channel();
        let writer = Writer {
            thread,
            pool,
            gateway,
            requests: receiver,
            again: Vec::new(),
        };
        tokio::spawn(writer.run());
        Self { requests }
    }

    pub(super) async fn claim(
        &self,
        client_id: &ClientId,
        conn_id: u64,
        replace: bool,
    ) -> Result<Claim, PresenceError> {
        let (respond, answer) = oneshot::channel();
        self.requests
            .send(Request::Claim(Pending {
                client_id: client_id.clone(),
                conn_id,
                replace,
                respond,
                attempts: 0,
            }))
            .map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
    }

    /// Gives the id back if the connection still holds it; returns once written (or failed).
    pub(super) async fn release(&self, client_id: &ClientId, conn_id: u64) {
        let (done, written) = oneshot::channel();
        let request = Request::Release {
            client_id: client_id.clone(),
            conn_id,
            done,
        };
        if self.requests.send(request).is_ok() {
            // A writer that stopped has nothing more to say; the lease's end frees the row.
            written.await.ok();
        }
    }
}

fn closed() -> PresenceError {
    PresenceError::Unavailable("presence is shutting down".into())
}

struct Writer {
    thread: Handle,
    pool: PgPool,
    gateway: GatewayId,
    requests: mpsc::UnboundedReceiver<Request>,
    /// Claims to make again in the next batch (see [`RACED_ATTEMPTS`]).
    again: Vec<Request>,
}

/// A claim waiting for its statement.
pub(super) struct Pending {
    client_id: ClientId,
    conn_id: u64,
    replace: bool,
    respond: oneshot::Sender<Result<Claim, PresenceError>>,
    attempts: u8,
}

/// What the claim statement read and did for one id.
struct Outcome {
    claimed: bool,
    /// The row as it was before, if there was one.
    held: Option<Holder>,
}

/// Who held an id when the claim statement began.
struct Holder {
    gateway: String,
    conn: i64,
    /// Whether that gateway's lease ran.
    live: bool,
}

impl Writer {
    async fn run(mut self) {
        let mut batch = Vec::with_capacity(256);
        loop {
            if self.again.is_empty() {
                if self.requests.recv_many(&mut batch, MAX_BATCH).await == 0 {
                    return;
                }
            } else {
                batch.append(&mut self.again);
                // Whatever else is waiting rides along; nothing waiting is no reason to wait.
                while batch.len() < MAX_BATCH {
                    match self.requests.try_recv() {
                        Ok(request) => batch.push(request),
                        Err(_) => break,
                    }
                }
            }
            let mut releases = Vec::new();
            let mut claims = Vec::new();
            for request in batch.drain(..) {
                match request {
                    Request::Release {
                        client_id,
                        conn_id,
                        done,
                    } => releases.push((client_id, conn_id, done)),
                    Request::Claim(claim) => claims.push(claim),
                }
            }
            // Departures first: a client that left and came back within one batch finds its
            // old row gone.
            if !releases.is_empty() {
                self.release(releases).await;
            }
            if !claims.is_empty() {
                self.claim(claims).await;
            }
        }
    }

    async fn release(&self, releases: Vec<(ClientId, u64, oneshot::Sender<()>)>) {
        let _timed = RoundTrip::start("release");
        let ids: Vec<String> = releases.iter().map(|(id, ..)| id.to_string()).collect();
        let conns: Vec<i64> = releases
            .iter()
            .map(|(_, conn, _)| bigint_param(*conn))
            .collect();
        // Each row found by its id, one lookup per row of the batch (the `LATERAL`, kept apart
        // by `OFFSET 0`), then deleted where it lies: one plan for every size of batch. Left
        // to choose, the planner read and hashed every row the gateway held for a batch of a
        // few hundred (7 ms against 1.4 ms for 300 of 16,667), and a list of ids it could not
        // see the length of was compared with each of those rows (a14f72e: seconds).
        let (pool, gateway) = (self.pool.clone(), self.gateway.clone());
        let released = run_on(&self.thread, async move {
            sqlx::query(
                "DELETE FROM sessions WHERE ctid = ANY(ARRAY( \
                 SELECT found.ctid FROM UNNEST($2::text[], $3::bigint[]) AS r(client_id, conn_id) \
                 CROSS JOIN LATERAL (SELECT s.ctid FROM sessions AS s \
                     WHERE s.client_id = r.client_id AND s.gateway_id = $1 \
                       AND s.conn_id = r.conn_id OFFSET 0) AS found))",
            )
            .bind(gateway.as_str())
            .bind(&ids)
            .bind(&conns)
            .execute(&pool)
            .await
            .map_err(|err| unavailable(&err))
        })
        .await;
        if let Err(err) = released {
            // The rows go at the next renewal that finds their connections gone.
            tracing::warn!(client_ids = releases.len(), %err, "could not give back client ids");
        }
        for (_, _, done) in releases {
            // The caller may have stopped waiting.
            let _ = done.send(());
        }
    }

    /// Makes the claims, one statement per policy and per round of distinct ids (a statement
    /// may touch a row once).
    async fn claim(&mut self, claims: Vec<Pending>) {
        let mut rounds: Vec<(bool, Vec<Pending>, HashSet<ClientId>)> = Vec::new();
        for claim in claims {
            let round = rounds.iter_mut().find(|(replace, _, ids)| {
                *replace == claim.replace && !ids.contains(&claim.client_id)
            });
            match round {
                Some((_, pending, ids)) => {
                    ids.insert(claim.client_id.clone());
                    pending.push(claim);
                }
                None => {
                    let ids = HashSet::from([claim.client_id.clone()]);
                    rounds.push((claim.replace, vec![claim], ids));
                }
            }
        }
        for (replace, pending, _) in rounds {
            self.claim_round(replace, pending).await;
        }
    }

    async fn claim_round(&mut self, replace: bool, mut pending: Vec<Pending>) {
        let _timed = RoundTrip::start("claim");
        // Rows are locked in the order of their ids, by every gateway: two batches that share
        // ids take turns instead of deadlocking.
        pending.sort_by(|a, b| a.client_id.as_str().cmp(b.client_id.as_str()));
        let ids: Vec<String> = pending.iter().map(|p| p.client_id.to_string()).collect();
        let conns: Vec<i64> = pending.iter().map(|p| bigint_param(p.conn_id)).collect();
        let (pool, gateway) = (self.pool.clone(), self.gateway.clone());
        // `holders` locks the rows that exist, read as they are: a holder counts while its
        // lease runs and, within the lease, while its lease connection is open (a gateway
        // that was killed loses it at once). Ids are compared on PostgreSQL's first 63 bytes
        // of the connection's name. A row another gateway inserts meanwhile is met by the
        // conflict clause, which decides on it the same way; such a claim is made again.
        let rows = run_on(&self.thread, async move {
            sqlx::query_as::<_, ClaimRow>(
                "WITH req AS ( \
                     SELECT * FROM UNNEST($2::text[], $3::bigint[]) AS r(client_id, conn_id)), \
                 holders AS ( \
                     SELECT s.client_id, s.gateway_id, s.conn_id, \
                         EXISTS (SELECT 1 FROM gateways AS g \
                             WHERE g.id = s.gateway_id AND g.lease_until > now()) AS live, \
                         EXISTS (SELECT 1 FROM pg_stat_activity AS a \
                             WHERE a.datname = current_database() \
                               AND a.application_name = left($4 || s.gateway_id, 63)) AS connected \
                     FROM sessions AS s WHERE s.client_id = ANY($2::text[]) \
                     ORDER BY s.client_id FOR UPDATE), \
                 taken AS ( \
                     INSERT INTO sessions AS s (client_id, gateway_id, conn_id, since) \
                     SELECT r.client_id, $1, r.conn_id, now() FROM req AS r \
                     LEFT JOIN holders AS c ON c.client_id = r.client_id \
                     WHERE c.client_id IS NULL OR c.gateway_id = $1 OR NOT c.live \
                         OR NOT c.connected OR $5 \
                     ORDER BY r.client_id \
                     ON CONFLICT (client_id) DO UPDATE \
                         SET gateway_id = EXCLUDED.gateway_id, conn_id = EXCLUDED.conn_id, \
                             since = EXCLUDED.since \
                         WHERE s.gateway_id = EXCLUDED.gateway_id OR $5 \
                             OR NOT EXISTS (SELECT 1 FROM gateways AS g \
                                 WHERE g.id = s.gateway_id AND g.lease_until > now()) \
                             OR NOT EXISTS (SELECT 1 FROM pg_stat_activity AS a \
                                 WHERE a.datname = current_database() \
                                   AND a.application_name = left($4 || s.gateway_id, 63)) \
                     RETURNING s.client_id) \
                 SELECT r.client_id, t.client_id IS NOT NULL, c.gateway_id, c.conn_id, c.live \
                 FROM req AS r LEFT JOIN taken AS t ON t.client_id = r.client_id \
                 LEFT JOIN holders AS c ON c.client_id = r.client_id",
            )
            .bind(gateway.as_str())
            .bind(&ids)
            .bind(&conns)
            .bind(LEASE_CONNECTION)
            .bind(replace)
            .fetch_all(&pool)
            .await
            .map_err(|err| unavailable(&err))
        })
        .await;
        let rows = match rows {
            Ok(rows) => rows,
            Err(err) => {
                for claim in pending {
                    let _ = claim.respond.send(Err(err.clone()));
                }
                return;
            }
        };
        let mut outcomes: HashMap<String, Outcome> = rows
            .into_iter()
            .map(|(id, claimed, gateway, conn, live)| {
                let held = match (gateway, conn) {
                    (Some(gateway), Some(conn)) => Some(Holder {
                        gateway,
                        conn,
                        live: live.unwrap_or(false),
                    }),
                    _ => None,
                };
                (id, Outcome { claimed, held })
            })
            .collect();
        for claim in pending {
            let outcome = outcomes.remove(claim.client_id.as_str());
            match self.decide(outcome) {
                Decided::Answer(answer) => {
                    // The connection may have given up waiting.
                    let _ = claim.respond.send(answer);
                }
                Decided::Again if claim.attempts + 1 < RACED_ATTEMPTS => {
                    self.again.push(Request::Claim(Pending {
                        attempts: claim.attempts + 1,
                        ..claim
                    }));
                }
                Decided::Again => {
                    let err = PresenceError::Unavailable(
                        "the client id was claimed elsewhere at the same instant, again and again"
                            .into(),
                    );
                    let _ = claim.respond.send(Err(err));
                }
            }
        }
    }

    fn decide(&self, outcome: Option<Outcome>) -> Decided {
        let Some(outcome) = outcome else {
            return Decided::Answer(Err(PresenceError::Database(
                "the claim statement left out a client id".into(),
            )));
        };
        let other = match outcome.held {
            // This gateway's own registry already decided between its connections; a holder
            // whose lease ended counts for nothing.
            Some(holder) if holder.gateway == self.gateway.as_str() || !holder.live => None,
            None => None,
            Some(holder) => match u64::try_from(holder.conn) {
                Ok(conn) => Some((GatewayId::new(holder.gateway), conn)),
                Err(_) => {
                    return Decided::Answer(Err(PresenceError::Database(format!(
                        "a corrupt connection id {}",
                        holder.conn
                    ))));
                }
            },
        };
        match (outcome.claimed, other) {
            // A live holder that was taken from, connected (policy `replace`) or not (it may
            // only be reopening its lease connection): told, so that a live one closes its
            // connection rather than keep a second one.
            (true, replaced) => Decided::Answer(Ok(Claim::Claimed { replaced })),
            (false, Some((gateway, conn_id))) => {
                Decided::Answer(Ok(Claim::Held { gateway, conn_id }))
            }
            // Not taken, and no row was there when the statement began: another gateway
            // inserted it meanwhile.
            (false, None) => Decided::Again,
        }
    }
}

/// One id's row of the claim statement: the id, whether it was taken, and the row as it was
/// (gateway, connection, lease running), if there was one.
type ClaimRow = (String, bool, Option<String>, Option<i64>, Option<bool>);

enum Decided {
    Answer(Result<Claim, PresenceError>),
    Again,
}
