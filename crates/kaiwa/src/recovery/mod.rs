//! Recovery: no accepted message waits for a restart. The sweepers find messages that stay
//! accepted with no worker on them (the last run stopped while they were in flight, or their
//! processing failed: a full disk, a store error, a job that was never queued or was lost with
//! the broker) and queue them again, in the running process: [`Sweeper`] when one process is the
//! whole of kaiwa (it knows its own in-flight slots), [`ClusterSweeper`] in a cluster (it claims
//! them in the shared database, so that one process queues each).

use crate::admission::{Admission, AdmissionError};
use crate::domain::GatewayId;
use crate::queue::{Job, Queue, QueueError};
use crate::store::{Store, StoreError, StoredMessage, StuckClaims};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The longest a message that keeps failing waits between two tries.
const MAX_BACKOFF: Duration = Duration::from_secs(600);
/// Messages claimed per sweep, at most.
const CLAIM_BATCH: u32 = 500;
/// How often every process looks for the messages of a gateway that died: one query over the
/// messages in flight, so that they wait for the gateway's lease, not for `--requeue-after`.
const ORPHAN_SWEEP: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    #[error("could not read the stuck messages: {0}")]
    Store(#[from] StoreError),
    #[error("could not queue a stuck message: {0}")]
    Queue(#[from] QueueError),
    #[error(transparent)]
    Admission(#[from] AdmissionError),
}

/// A sweeper, as the application runs it: one per process, from start to shutdown.
#[async_trait]
pub trait Recovery: Send {
    /// Sweeps until `stop` is cancelled.
    async fn run(self: Box<Self>, stop: CancellationToken);
}

/// The sweeper of a process that is the whole of kaiwa.
pub struct Sweeper {
    admission: Arc<Admission>,
    store: Arc<dyn Store>,
    /// How long a message must be seen accepted with no worker on it before it is queued again.
    after: Duration,
    /// What the last run left unfinished, queued first.
    unfinished: Vec<StoredMessage>,
    /// Messages seen stuck, with when that was first seen (or when they were last queued again)
    /// and how many times they have been queued again.
    stuck: HashMap<i64, SeenStuck>,
}

#[derive(Debug, Clone, Copy)]
struct SeenStuck {
    since: Instant,
    retries: u32,
}

impl Sweeper {
    /// A sweeper that first queues `unfinished`: the messages the last run left accepted, read
    /// before this run accepts its first message (see [`Admission::requeue`]).
    pub fn new(
        admission: Arc<Admission>,
        store: Arc<dyn Store>,
        after: Duration,
        unfinished: Vec<StoredMessage>,
    ) -> Self {
        Self {
            admission,
            store,
            after,
            unfinished,
            stuck: HashMap::new(),
        }
    }

    /// One pass: queues again the messages seen stuck for long enough; returns how many.
    ///
    /// A message is stuck when it is accepted in the store and holds no in-flight slot here:
    /// a message being processed (or waiting for a worker) always holds one. Requiring it to be
    /// seen that way for `after` covers the moment between its commit and its slot being parked.
    pub async fn sweep(&mut self, stop: &CancellationToken) -> Result<usize, RecoveryError> {
        let unfinished = self.store.unfinished_messages().await?;
        let now = Instant::now();
        let mut seen = HashMap::with_capacity(self.stuck.len());
        let mut due = Vec::new();
        for message in unfinished {
            let id = message.id;
            if self.admission.in_flight.holds(id) {
                // Being processed again: its retries so far still count if it fails once more.
                if let Some(stuck) = self.stuck.get(&id) {
                    seen.insert(id, *stuck);
                }
                continue;
            }
            let mut stuck = self.stuck.get(&id).copied().unwrap_or(SeenStuck {
                since: now,
                retries: 0,
            });
            if now.duration_since(stuck.since) >= self.backoff(stuck.retries) {
                tracing::debug!(
                    message_id = id,
                    retries = stuck.retries,
                    "queueing a stuck message again"
                );
                stuck = SeenStuck {
                    since: now,
                    retries: stuck.retries.saturating_add(1),
                };
                due.push(message);
            }
            seen.insert(id, stuck);
        }
        self.stuck = seen;
        let queued = self.admission.requeue(due, stop).await?;
        requeued("stuck", queued);
        Ok(queued)
    }

    fn backoff(&self, retries: u32) -> Duration {
        self.after
            .saturating_mul(1 << retries.min(16))
            .min(MAX_BACKOFF.max(self.after))
    }
}

#[async_trait]
impl Recovery for Sweeper {
    /// Queues what the last run left unfinished, then sweeps every quarter of `after`.
    async fn run(mut self: Box<Self>, stop: CancellationToken) {
        let unfinished = std::mem::take(&mut self.unfinished);
        match self.admission.requeue(unfinished, &stop).await {
            Ok(0) => {}
            Ok(count) => {
                requeued("unfinished_at_start", count);
                tracing::info!(
                    messages = count,
                    "unfinished messages from the last run queued again"
                );
            }
            Err(err) => tracing::error!(%err, "could not queue unfinished messages"),
        }
        // From here on, a message whose processing fails is retried in this run.
        let mut tick = every_quarter_of(self.after);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => log_pass(self.sweep(&stop).await),
            }
        }
    }
}

/// The sweeper of a cluster, run by every process: messages that stay `accepted` with nothing
/// happening to them for `after` (their job was lost with a process between the commit and the
/// broker's confirm, or with the broker itself, or their processing failed) are claimed in the
/// shared database, so that exactly one process queues each again, and queued again.
pub struct ClusterSweeper {
    claims: Arc<dyn StuckClaims>,
    queue: Arc<dyn Queue>,
    after: Duration,
    /// On a gateway: its id and when this run began, to take back first what its last run left.
    gateway: Option<(GatewayId, DateTime<Utc>)>,
}

impl ClusterSweeper {
    pub fn new(claims: Arc<dyn StuckClaims>, queue: Arc<dyn Queue>, after: Duration) -> Self {
        Self {
            claims,
            queue,
            after,
            gateway: None,
        }
    }

    /// The sweeper of gateway `id`, whose run began at `started`: it first queues again what
    /// the gateway's last run admitted and left without a job (a gateway killed between a
    /// message's commit and its job's confirm, and back under its id before its lease ended,
    /// would otherwise leave them to the stuck sweep, `after` later).
    pub fn for_gateway(mut self, id: GatewayId, started: DateTime<Utc>) -> Self {
        self.gateway = Some((id, started));
        self
    }

    /// Queues again every message the gateway's last run left unqueued; returns how many.
    pub async fn take_back(&self) -> Result<usize, RecoveryError> {
        let Some((id, started)) = &self.gateway else {
            return Ok(0);
        };
        let mut queued = 0;
        loop {
            let left = self.claims.claim_left_by(id, *started, CLAIM_BATCH).await?;
            if left.is_empty() {
                return Ok(queued);
            }
            queued += self.publish(left, "unfinished_at_start").await?;
        }
    }

    /// Queues again the messages of gateways whose lease ended before any sweeper queued them.
    pub async fn sweep_orphans(&self) -> Result<usize, RecoveryError> {
        let orphaned = self.claims.claim_orphaned(CLAIM_BATCH).await?;
        self.publish(orphaned, "gateway_gone").await
    }

    /// One pass; returns how many messages were queued again. A message whose job cannot be
    /// published now stays claimed until `after` has passed again, then is tried again.
    pub async fn sweep(&self) -> Result<usize, RecoveryError> {
        let stuck = self.claims.claim_stuck(self.after, CLAIM_BATCH).await?;
        self.publish(stuck, "stuck").await
    }

    async fn publish(
        &self,
        stuck: Vec<StoredMessage>,
        reason: &'static str,
    ) -> Result<usize, RecoveryError> {
        let mut queued = 0;
        for message in stuck {
            let job = Job {
                requeued: true,
                ..Job::from(message)
            };
            tracing::debug!(
                message_id = job.message_id,
                "queueing a stuck message again"
            );
            self.queue.publish_job(job).await?;
            requeued(reason, 1);
            queued += 1;
        }
        Ok(queued)
    }
}

#[async_trait]
impl Recovery for ClusterSweeper {
    /// Sweeps every quarter of `after`, and for the messages of gateways that died every
    /// [`ORPHAN_SWEEP`].
    async fn run(self: Box<Self>, stop: CancellationToken) {
        tokio::select! {
            () = stop.cancelled() => return,
            taken = self.take_back() => log_pass(taken),
        }
        let mut tick = every_quarter_of(self.after);
        let mut orphans = tokio::time::interval(ORPHAN_SWEEP);
        orphans.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => log_pass(self.sweep().await),
                _ = orphans.tick() => log_pass(self.sweep_orphans().await),
            }
        }
    }
}

/// A sweeper's timer: the first pass a quarter of `after` from now, then every quarter, so a
/// message waits at most `after` and a quarter once it is stuck.
fn every_quarter_of(after: Duration) -> tokio::time::Interval {
    let period = (after / 4).max(Duration::from_millis(10));
    let mut tick = tokio::time::interval_at(Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}

/// Counts messages queued again, in `kaiwa_messages_requeued_total{reason}`: `stuck` (accepted
/// with nothing happening to them for `--requeue-after`), `gateway_gone` (admitted by a gateway
/// whose lease ended), `unfinished_at_start` (left by the last run of a lone process, or of a
/// gateway back under its id).
pub(crate) fn requeued(reason: &'static str, count: usize) {
    metrics::counter!("kaiwa_messages_requeued_total", "reason" => reason)
        .increment(u64::try_from(count).unwrap_or(u64::MAX));
}

fn log_pass(pass: Result<usize, RecoveryError>) {
    match pass {
        Ok(0) => {}
        Ok(count) => tracing::info!(messages = count, "stuck messages queued again"),
        Err(err) => tracing::warn!(%err, "could not sweep for stuck messages"),
    }
}

#[cfg(test)]
mod tests;
