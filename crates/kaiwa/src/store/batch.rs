//! The writes both database stores batch: the commands a store sends to its one writer, the
//! handle that sends them, and a batch of commands sorted by kind for one transaction. Each
//! backend's writer only decides how a batch becomes SQL.

use super::inbox;
use super::{Inserted, NewMessage, NewReply, StoreError, StoreFuture, StoredReply};
use crate::domain::ClientId;
use chrono::{DateTime, Utc};
use kaiwa_protocol::Delivery;
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// How soon the updates of a failed batch are tried again when no other write comes.
const BACKLOG_RETRY: Duration = Duration::from_millis(500);

/// How long delivery marks and acknowledgements wait for a batch of messages or replies to
/// ride with, at most (while a failed batch's updates wait for their retry, they wait with
/// them, up to [`BACKLOG_RETRY`]). They are on no client's path, and at a few hundred messages
/// a second a transaction of their own after each reply was a third of a process's commits,
/// each of them round trips, a WAL flush and wake-ups on every side.
pub(super) const UPDATES_WAIT: Duration = Duration::from_millis(50);

/// Where a command's result goes.
pub(super) type Respond<T> = oneshot::Sender<Result<T, StoreError>>;

pub(super) enum Command {
    Message(Box<NewMessage>, Respond<Inserted>),
    Replies(ReplyBatch, Respond<Vec<StoredReply>>),
    Delivery(DeliveryUpdate),
    Received(StreamUpdate),
    Departure(StreamUpdate),
    /// Answered once every command sent before it is committed.
    #[cfg(test)]
    Barrier(oneshot::Sender<()>),
    Close(oneshot::Sender<()>),
}

impl Command {
    /// Whether it goes without waiting for others to join it (`PgOptions::write_interval`):
    /// a close, and a departure, whose client may be back on another gateway already, asking
    /// what it acknowledged. The same commands keep a batch from waiting in the backlog
    /// ([`Batch::may_wait`]).
    pub(super) fn is_urgent(&self) -> bool {
        #[cfg(test)]
        if matches!(self, Self::Barrier(_)) {
            return true;
        }
        matches!(self, Self::Close(_) | Self::Departure(_))
    }

    /// Whether it may wait for a batch to ride with ([`UPDATES_WAIT`]): a delivery mark or an
    /// acknowledgement.
    pub(super) fn may_wait(&self) -> bool {
        matches!(self, Self::Delivery(_) | Self::Received(_))
    }
}

pub(super) struct ReplyBatch {
    pub message_id: i64,
    pub client_id: ClientId,
    pub replies: Vec<NewReply>,
    pub created_at: DateTime<Utc>,
    pub completes: bool,
}

#[derive(Clone, Copy)]
pub(super) struct DeliveryUpdate {
    pub reply_id: i64,
    pub delivery: Delivery,
    pub at: DateTime<Utc>,
}

/// A client's reply stream up to (`Received`) or after (`Departure`) a position.
pub(super) struct StreamUpdate {
    pub client_id: ClientId,
    pub seq: u64,
    pub at: DateTime<Utc>,
}

/// Sends a command's result back; a caller that gave up waiting is no error.
pub(super) fn respond<T>(tx: oneshot::Sender<T>, value: T) {
    if tx.send(value).is_err() {
        tracing::trace!("a store caller stopped waiting for its result");
    }
}

/// The sending side of a writer's inbox, with the store's write calls on it.
pub(super) struct Writes {
    commands: inbox::Sender,
}

impl Writes {
    pub(super) fn channel() -> (Self, inbox::Receiver) {
        let (commands, receiver) = inbox::channel();
        (Self { commands }, receiver)
    }

    fn send(&self, command: Command) -> Result<(), StoreError> {
        self.commands.send(command)
    }

    pub(super) fn insert_message(&self, message: NewMessage) -> StoreFuture<Inserted> {
        let (tx, rx) = oneshot::channel();
        let sent = self.send(Command::Message(Box::new(message), tx));
        Box::pin(async move {
            sent?;
            rx.await.map_err(|_| StoreError::Closed)?
        })
    }

    pub(super) async fn insert_replies(
        &self,
        batch: ReplyBatch,
    ) -> Result<Vec<StoredReply>, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Replies(batch, tx))?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    pub(super) fn record_delivery(&self, update: DeliveryUpdate) {
        let reply_id = update.reply_id;
        if self.send(Command::Delivery(update)).is_err() {
            // Only after shutdown: the reply stays `pending` and the next start marks it failed.
            tracing::debug!(
                reply_id,
                "delivery status not recorded: the store is closed"
            );
        }
    }

    pub(super) fn record_received(&self, update: StreamUpdate) {
        if self.send(Command::Received(update)).is_err() {
            tracing::debug!("acknowledgement not recorded: the store is closed");
        }
    }

    pub(super) fn record_departure(&self, update: StreamUpdate) {
        if self.send(Command::Departure(update)).is_err() {
            tracing::debug!("departure not recorded: the store is closed");
        }
    }

    /// Asks the writer to commit what it has and stop; waits for its answer.
    pub(super) async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.send(Command::Close(tx)).is_ok() && rx.await.is_err() {
            tracing::warn!("the database writer stopped before confirming its last commit");
        }
    }

    /// Waits until everything sent so far is committed.
    #[cfg(test)]
    pub(super) async fn barrier(&self) {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Barrier(tx)).expect("the store is open");
        rx.await.expect("the writer answers");
    }
}

/// The commands of one transaction, by kind, in the order they were sent.
#[derive(Default)]
pub(super) struct Batch {
    pub messages: Vec<(Box<NewMessage>, Respond<Inserted>)>,
    pub replies: Vec<(ReplyBatch, Respond<Vec<StoredReply>>)>,
    pub updates: Updates,
    /// A close request: the writer stops after this batch.
    pub close: Option<oneshot::Sender<()>>,
    /// Answered when the batch is done, however it ends.
    #[cfg(test)]
    pub barriers: Vec<oneshot::Sender<()>>,
}

/// The delivery updates of one batch, reduced to what each one's last word says.
#[derive(Default)]
pub(super) struct Updates {
    /// The last word on each reply, by id, except that delivered stays delivered.
    pub deliveries: HashMap<i64, DeliveryUpdate>,
    /// Each client's highest acknowledgement (they are cumulative).
    pub received: HashMap<ClientId, StreamUpdate>,
    pub departures: Vec<StreamUpdate>,
}

impl Updates {
    pub(super) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(super) fn len(&self) -> usize {
        self.deliveries.len() + self.received.len() + self.departures.len()
    }

    fn add_delivery(&mut self, update: DeliveryUpdate) {
        let entry = self.deliveries.entry(update.reply_id).or_insert(update);
        if entry.delivery != Delivery::Delivered {
            *entry = update;
        }
    }

    fn add_received(&mut self, update: StreamUpdate) {
        match self.received.entry(update.client_id.clone()) {
            Entry::Occupied(mut known) if known.get().seq < update.seq => {
                known.insert(update);
            }
            Entry::Occupied(_) => {}
            Entry::Vacant(new) => {
                new.insert(update);
            }
        }
    }

    fn add_departure(&mut self, update: StreamUpdate) {
        self.departures.push(update);
    }

    /// Takes in the updates sent after these ones, as if they had come in one batch.
    fn absorb(&mut self, later: Updates) {
        for update in later.deliveries.into_values() {
            self.add_delivery(update);
        }
        for update in later.received.into_values() {
            self.add_received(update);
        }
        self.departures.extend(later.departures);
    }
}

impl Batch {
    pub(super) fn gather(commands: impl IntoIterator<Item = Command>) -> Self {
        let mut batch = Self::default();
        for command in commands {
            match command {
                Command::Message(message, respond) => batch.messages.push((message, respond)),
                Command::Replies(replies, respond) => batch.replies.push((replies, respond)),
                Command::Delivery(update) => batch.updates.add_delivery(update),
                Command::Received(update) => batch.updates.add_received(update),
                Command::Departure(update) => batch.updates.add_departure(update),
                #[cfg(test)]
                Command::Barrier(done) => batch.barriers.push(done),
                Command::Close(done) => batch.close = Some(done),
            }
        }
        batch
    }

    /// Whether the batch holds only updates that may wait ([`UPDATES_WAIT`]): delivery marks
    /// and acknowledgements. A departure goes at once, with whatever waits: its client may be
    /// back on another gateway already, asking what it acknowledged.
    pub(super) fn may_wait(&self) -> bool {
        #[cfg(test)]
        if !self.barriers.is_empty() {
            return false;
        }
        self.messages.is_empty()
            && self.replies.is_empty()
            && self.close.is_none()
            && self.updates.departures.is_empty()
            && !self.updates.is_empty()
    }

    /// Whether there is anything to write.
    pub(super) fn is_empty(&self) -> bool {
        self.messages.is_empty() && self.replies.is_empty() && self.updates.is_empty()
    }

    pub(super) fn len(&self) -> usize {
        self.messages.len() + self.replies.len() + self.updates.len()
    }

    /// Answers every write of the batch with `err` (its transaction failed or never ran).
    pub(super) fn fail(self, err: &StoreError) -> Option<oneshot::Sender<()>> {
        for (_, tx) in self.messages {
            respond(tx, Err(err.clone()));
        }
        for (_, tx) in self.replies {
            respond(tx, Err(err.clone()));
        }
        #[cfg(test)]
        for done in self.barriers {
            respond(done, ());
        }
        self.close
    }
}

/// The updates of batches that failed, and those waiting for a batch to ride with, kept for
/// the next batch. They say where replies went and what clients acknowledged, and each is
/// idempotent, so writing them late is right; an outage of the database only delays them.
/// Bounded by what they are about: a reply has one entry, a client one acknowledgement, and a
/// departure happens once per connection.
pub(super) struct Backlog {
    updates: Updates,
    /// When the updates are written if no batch comes for them to ride with: set by the first
    /// to wait ([`Backlog::hold`]), or a failed batch's retry ([`Backlog::keep`]).
    due: tokio::time::Instant,
    /// Since when the updates fail on an error that is not an outage (a full disk, a bug):
    /// after [`GIVE_UP_AFTER`] of that they are dropped, so they cannot fail every batch.
    refused_since: Option<Instant>,
}

/// How long updates that fail on something other than an outage are tried again.
const GIVE_UP_AFTER: Duration = Duration::from_secs(60);

impl Default for Backlog {
    fn default() -> Self {
        Self {
            updates: Updates::default(),
            due: tokio::time::Instant::now(),
            refused_since: None,
        }
    }
}

impl Backlog {
    pub(super) fn is_empty(&self) -> bool {
        self.updates.is_empty()
    }

    /// When what waits is to be written alone; `None` while nothing waits.
    pub(super) fn due(&self) -> Option<tokio::time::Instant> {
        (!self.updates.is_empty()).then_some(self.due)
    }

    /// What the next batch writes: the backlog first, then `fresh`.
    pub(super) fn take_with(&mut self, fresh: Updates) -> Updates {
        if self.updates.is_empty() {
            // The usual case: nothing failed, nothing to merge.
            return fresh;
        }
        let mut updates = std::mem::take(&mut self.updates);
        updates.absorb(fresh);
        updates
    }

    /// Keeps `later` for the next batch, after what waits already. The first to wait sets when
    /// they go, `wait` from now; a backlog already waiting keeps its time.
    pub(super) fn hold(&mut self, later: Updates, wait: Duration) {
        if self.updates.is_empty() {
            self.due = tokio::time::Instant::now() + wait;
        }
        self.updates = self.take_with(later);
    }

    /// The batch went through, and the updates it held with it.
    pub(super) fn written(&mut self) {
        self.refused_since = None;
    }

    /// The batch that held `updates` failed with `err`: they wait for the next one, unless
    /// they have failed on errors that are not outages for a while.
    pub(super) fn keep(&mut self, updates: Updates, err: &StoreError) {
        if updates.is_empty() {
            return;
        }
        if !err.is_transient() {
            let since = *self.refused_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= GIVE_UP_AFTER {
                tracing::error!(%err, lost_delivery_updates = updates.len(), "delivery updates failed for a minute on an error that is not an outage; given up");
                self.refused_since = None;
                return;
            }
        }
        tracing::debug!(%err, delivery_updates = updates.len(), "delivery updates kept for the next batch");
        // `take_with` emptied the backlog into the batch that failed.
        debug_assert!(self.updates.is_empty());
        self.updates = updates;
        self.due = tokio::time::Instant::now() + BACKLOG_RETRY;
    }
}
