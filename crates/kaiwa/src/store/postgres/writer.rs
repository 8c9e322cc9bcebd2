//! The PostgreSQL writer: one task with a connection of its own. It takes every command waiting,
//! writes them in one transaction with one multi-row statement per kind of row (rows passed as
//! arrays and read back with `UNNEST`), commits once, and answers each command. When the
//! database cannot be reached it answers at once that it is unavailable, instead of queueing,
//! and reconnects with backoff.

use super::super::batch::{Backlog, Batch, Command, ReplyBatch, Updates, respond};
use super::super::bigint_param;
use super::super::read::{REPLY_COLUMNS, ReplyRecord};
use super::super::{Existing, Inserted, NewMessage, StoreError, StoreHealth, StoredReply};
use super::{PgShared, connect, describe};
use kaiwa_protocol::MessageStatus;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{Connection, Postgres, Transaction};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Commands taken in one transaction, at most.
const MAX_BATCH: usize = 4096;
/// The first wait before reconnecting, doubled after each failure up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// At most this long after the database is back, writes go through again: an outage is a
/// delay of its own length plus this.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// The advisory lock namespace of reply streams: replies of one client are numbered by one
/// transaction at a time, whichever process writes them. (The second key is the client id's
/// hash; sqlx's migration lock uses the one-key form, so the two never meet.)
const REPLY_STREAM_LOCKS: i32 = 0x6b61_6977; // "kaiw"

pub(super) struct Writer {
    options: PgConnectOptions,
    /// `None` while the database is unreachable.
    conn: Option<PgConnection>,
    commands: mpsc::UnboundedReceiver<Command>,
    health: Arc<Mutex<StoreHealth>>,
    backoff: Duration,
    /// When to try connecting again, while unreachable.
    retry_at: tokio::time::Instant,
    /// The cluster-wide in-flight limit and the gateway whose messages these are, when the
    /// database is shared.
    shared: Option<PgShared>,
    /// Delivery updates of failed batches, written with the next one.
    backlog: Backlog,
}

/// What one batch learned from the database.
struct Written {
    /// Per message, in the batch's order: new under this id, or stored before.
    messages: Vec<Inserted>,
    /// Per reply batch, in the batch's order.
    replies: Vec<Vec<StoredReply>>,
}

impl Writer {
    pub(super) async fn connect(
        options: PgConnectOptions,
        commands: mpsc::UnboundedReceiver<Command>,
        health: Arc<Mutex<StoreHealth>>,
        shared: Option<PgShared>,
    ) -> Result<Self, StoreError> {
        let conn = connect(&options).await?;
        Ok(Self {
            options,
            conn: Some(conn),
            commands,
            health,
            backoff: FIRST_BACKOFF,
            retry_at: tokio::time::Instant::now(),
            shared,
            backlog: Backlog::default(),
        })
    }

    pub(super) async fn run(mut self) {
        let mut commands = Vec::with_capacity(256);
        loop {
            tokio::select! {
                received = self.commands.recv_many(&mut commands, MAX_BATCH) => {
                    if received == 0 {
                        return;
                    }
                }
                () = tokio::time::sleep_until(self.retry_at), if self.conn.is_none() || !self.backlog.is_empty() => {
                    if self.conn.is_none() {
                        self.reconnect().await;
                    }
                    if self.conn.is_some() && !self.backlog.is_empty() {
                        // Updates of a failed batch, written now that the database is back.
                        self.commit(Batch::default()).await;
                    }
                    continue;
                }
            }
            let batch = Batch::gather(commands.drain(..));
            if let Some(closed) = self.commit(batch).await {
                self.commands.close();
                let rest: Vec<Command> =
                    std::iter::from_fn(|| self.commands.try_recv().ok()).collect();
                if !rest.is_empty() {
                    self.commit(Batch::gather(rest)).await;
                }
                if let Some(conn) = self.conn.take()
                    && let Err(err) = conn.close().await
                {
                    tracing::debug!(%err, "closing the database writer's connection");
                }
                respond(closed, ());
                return;
            }
        }
    }

    async fn reconnect(&mut self) {
        match connect(&self.options).await {
            Ok(conn) => {
                tracing::info!(database = %describe(&self.options), "reconnected to the database");
                self.conn = Some(conn);
                self.backoff = FIRST_BACKOFF;
                self.set_health(StoreHealth::Ok);
            }
            Err(err) => {
                tracing::warn!(%err, retry_in_ms = self.backoff.as_millis() as u64, "the database is still unreachable");
                self.set_health(StoreHealth::Degraded(err.to_string()));
                self.retry_at = tokio::time::Instant::now() + self.backoff;
                self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
            }
        }
    }

    /// Writes one batch and answers every command in it. Returns the close request if the
    /// batch held one.
    async fn commit(&mut self, mut batch: Batch) -> Option<oneshot::Sender<()>> {
        batch.updates = self.backlog.take_with(std::mem::take(&mut batch.updates));
        if batch.is_empty() {
            return batch.fail(&StoreError::Closed);
        }
        let Some(conn) = self.conn.as_mut() else {
            // Unreachable: fail at once, so clients are told to retry now rather than later.
            let count = batch.len();
            tracing::debug!(commands = count, "database unreachable: batch refused");
            let err = StoreError::Unavailable(self.health_reason());
            self.backlog.keep(std::mem::take(&mut batch.updates), &err);
            return batch.fail(&err);
        };
        let started = Instant::now();
        let mut replies = Replies::New;
        let mut conflicts_left = 1;
        let result = loop {
            match write(conn, &batch, self.shared.as_ref(), replies).await {
                // A job processed twice: its batch runs again, reading what was stored before.
                Err(Failed::StoredBefore) if replies == Replies::New => {
                    replies = Replies::MaybeStored;
                }
                // Two processes' batches can wait on each other's row locks: PostgreSQL then
                // aborts one of them, which can simply run again.
                Err(Failed::Sql(err)) if is_retryable(&err) && conflicts_left > 0 => {
                    tracing::debug!(%err, "batch aborted by a conflict; running it again");
                    conflicts_left -= 1;
                }
                other => break other.map_err(Failed::into_sql),
            }
        };
        match result {
            Ok(written) => {
                self.set_health(StoreHealth::Ok);
                self.backlog.written();
                metrics::histogram!("kaiwa_store_batch_size").record(batch.len() as f64);
                metrics::histogram!("kaiwa_store_commit_seconds")
                    .record(started.elapsed().as_secs_f64());
                answer(batch, written)
            }
            Err(err) => {
                let err = super::super::sql::error(&err);
                tracing::error!(%err, commands = batch.len(), "database batch failed");
                if err.is_transient() {
                    self.conn = None;
                    self.set_health(StoreHealth::Degraded(err.to_string()));
                    self.retry_at = tokio::time::Instant::now();
                } else {
                    self.retry_at =
                        tokio::time::Instant::now() + crate::store::batch::BACKLOG_RETRY;
                }
                self.backlog.keep(std::mem::take(&mut batch.updates), &err);
                batch.fail(&err)
            }
        }
    }

    fn health_reason(&self) -> String {
        match &*self
            .health
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
        {
            StoreHealth::Degraded(reason) => reason.clone(),
            StoreHealth::Ok => "reconnecting to the database".to_owned(),
        }
    }

    fn set_health(&self, health: StoreHealth) {
        let mut current = self
            .health
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *current = health;
    }
}

fn is_retryable(err: &sqlx::Error) -> bool {
    // 40001 serialization failure, 40P01 deadlock detected.
    matches!(err, sqlx::Error::Database(db) if db.code().is_some_and(|code| code == "40001" || code == "40P01"))
}

/// Answers every command of a committed batch.
fn answer(batch: Batch, written: Written) -> Option<oneshot::Sender<()>> {
    let Batch {
        messages,
        replies,
        close,
        #[cfg(test)]
        barriers,
        ..
    } = batch;
    for ((_, tx), inserted) in messages.into_iter().zip(written.messages) {
        respond(tx, Ok(inserted));
    }
    for ((_, tx), stored) in replies.into_iter().zip(written.replies) {
        respond(tx, Ok(stored));
    }
    #[cfg(test)]
    for done in barriers {
        respond(done, ());
    }
    close
}

/// Whether a batch's reply sets may hold replies stored before. Almost never: only a job
/// processed twice (a worker died before acknowledging it) brings them, so a batch first runs
/// without reading them, and runs again reading them if an insert finds one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Replies {
    New,
    MaybeStored,
}

/// Why a batch's transaction did not commit.
enum Failed {
    Sql(sqlx::Error),
    /// A reply of a type its message already has, found by the insert of [`Replies::New`].
    StoredBefore,
}

impl From<sqlx::Error> for Failed {
    fn from(err: sqlx::Error) -> Self {
        Self::Sql(err)
    }
}

impl Failed {
    fn into_sql(self) -> sqlx::Error {
        match self {
            Self::Sql(err) => err,
            Self::StoredBefore => {
                sqlx::Error::Protocol("replies stored before were not read back".into())
            }
        }
    }
}

/// The whole batch in one transaction.
async fn write(
    conn: &mut PgConnection,
    batch: &Batch,
    shared: Option<&PgShared>,
    seen: Replies,
) -> Result<Written, Failed> {
    let mut tx = conn.begin().await?;
    let replies = insert_replies(&mut tx, &batch.replies, seen).await?;
    record_updates(&mut tx, &batch.updates).await?;
    // Last, right before the commit: with a shared in-flight limit this locks the cluster-wide
    // count that every gateway's messages wait for, so nothing else may run while it is held.
    // (Nothing else in a batch can refer to its new messages: their ids are not out yet.)
    let messages = insert_messages(&mut tx, &batch.messages, shared).await?;
    tx.commit().await?;
    Ok(Written { messages, replies })
}

/// Stores new messages under ids taken from the table's sequence in the order of the calls;
/// a native resend of a stored client message id gets the stored message instead.
async fn insert_messages(
    tx: &mut Transaction<'_, Postgres>,
    messages: &[(Box<NewMessage>, super::super::batch::Respond<Inserted>)],
    shared: Option<&PgShared>,
) -> Result<Vec<Inserted>, sqlx::Error> {
    if messages.is_empty() {
        return Ok(Vec::new());
    }
    // Alone on the database, the process's own in-flight slots keep the limit (admission):
    // only gateways that share it need the count that all of them see, read and locked in the
    // insert itself (see [`ADMITTED_INSERT`]).
    let limit = shared
        .filter(|_| {
            messages
                .iter()
                .any(|(m, _)| m.status == MessageStatus::Accepted)
        })
        .map(|shared| i64::from(shared.max_in_flight));
    let admitted_by = shared.and_then(|shared| shared.admitted_by.as_deref());
    // A client message id sent twice within the batch is stored once, by its first send.
    let mut first_of: HashMap<(&str, &str), usize> = HashMap::new();
    let mut repeat_of: Vec<Option<usize>> = Vec::with_capacity(messages.len());
    for (index, (message, _)) in messages.iter().enumerate() {
        let repeat = message.client_message_id.as_deref().and_then(|cmid| {
            match first_of.entry((message.client_id.as_str(), cmid)) {
                std::collections::hash_map::Entry::Occupied(first) => Some(*first.get()),
                std::collections::hash_map::Entry::Vacant(slot) => {
                    slot.insert(index);
                    None
                }
            }
        });
        repeat_of.push(repeat);
    }
    let rows: Vec<usize> = (0..messages.len())
        .filter(|&i| repeat_of[i].is_none())
        .collect();
    // Columns as arrays of borrowed text: the rows are encoded straight from the messages.
    let column = |f: &dyn for<'m> Fn(&'m NewMessage) -> Option<&'m str>| -> Vec<Option<&str>> {
        rows.iter().map(|&i| f(&messages[i].0)).collect()
    };
    // Each row's id drawn from the table's sequence in the order of the calls (UNNEST yields
    // them in order, and a volatile output is computed after any sort the ORDER BY needs), in
    // the statement that inserts them: the ids come back with the rows' positions, whether
    // each row went in, and whether it was admitted (accepted messages past the room left are
    // not stored: their senders retry).
    let returned: Vec<(i64, i64, bool, bool)> = sqlx::query_as(if limit.is_some() {
        ADMITTED_INSERT
    } else {
        INSERT
    })
    .bind(column(&|m| Some(m.client_id.as_str())))
    .bind(column(&|m| m.client_message_id.as_deref()))
    .bind(column(&|m| Some(m.kind.as_str())))
    .bind(column(&|m| Some(m.content.as_str())))
    .bind(column(&|m| m.filename.as_deref()))
    .bind(column(&|m| m.mime_type.as_deref()))
    .bind(
        rows.iter()
            .map(|&i| {
                messages[i]
                    .0
                    .size_bytes
                    .and_then(|size| i64::try_from(size).ok())
            })
            .collect::<Vec<Option<i64>>>(),
    )
    .bind(column(&|m| Some(m.timezone.name())))
    .bind(column(&|m| Some(m.status.as_str())))
    .bind(column(&|m| m.reason.as_deref()))
    .bind(column(&|m| m.client_timestamp.as_deref()))
    .bind(
        rows.iter()
            .map(|&i| messages[i].0.received_at)
            .collect::<Vec<_>>(),
    )
    .bind(admitted_by)
    .bind(limit)
    .fetch_all(&mut **tx)
    .await?;
    // Per message of the batch sent as a row: what became of it.
    let mut row_of: Vec<Option<Row>> = vec![None; messages.len()];
    for (position, id, inserted, admitted) in returned {
        let index = usize::try_from(position - 1)
            .ok()
            .and_then(|row| rows.get(row))
            .ok_or_else(|| sqlx::Error::Protocol(format!("a message row {position} not sent")))?;
        row_of[*index] = Some(match (admitted, inserted) {
            (false, _) => Row::Busy,
            (true, true) => Row::Inserted(id),
            (true, false) => Row::Resent,
        });
    }
    let resent: Vec<usize> = rows
        .iter()
        .copied()
        .filter(|&i| row_of[i] == Some(Row::Resent))
        .collect();
    let mut existing: HashMap<(String, String), Existing> = HashMap::new();
    if !resent.is_empty() {
        #[derive(sqlx::FromRow)]
        struct Found {
            id: i64,
            client_id: String,
            client_msg_id: String,
            status: String,
            status_reason: Option<String>,
            received_at: chrono::DateTime<chrono::Utc>,
        }
        let found: Vec<Found> = sqlx::query_as(
            "SELECT m.id, m.client_id, m.client_msg_id, m.status, m.status_reason, m.received_at \
                 FROM messages AS m \
                 JOIN UNNEST($1::text[], $2::text[]) AS r(client_id, client_msg_id) \
                     ON m.client_id = r.client_id AND m.client_msg_id = r.client_msg_id",
        )
        .bind(
            resent
                .iter()
                .map(|&i| messages[i].0.client_id.as_str().to_owned())
                .collect::<Vec<_>>(),
        )
        .bind(
            resent
                .iter()
                .map(|&i| messages[i].0.client_message_id.clone().unwrap_or_default())
                .collect::<Vec<_>>(),
        )
        .fetch_all(&mut **tx)
        .await?;
        for row in found {
            let status = MessageStatus::parse(&row.status).ok_or_else(|| {
                sqlx::Error::Protocol(format!("unknown message status {:?}", row.status))
            })?;
            existing.insert(
                (row.client_id, row.client_msg_id),
                Existing {
                    id: row.id,
                    status,
                    reason: row.status_reason,
                    received_at: row.received_at,
                },
            );
        }
    }
    let mut outcome: Vec<Inserted> = Vec::with_capacity(messages.len());
    for (index, (message, _)) in messages.iter().enumerate() {
        let result = match repeat_of[index] {
            // A repeat within the batch answers as its first send turned out.
            Some(first) => match &outcome[first] {
                Inserted::New(id) => Inserted::Duplicate(Existing {
                    id: *id,
                    status: messages[first].0.status,
                    reason: messages[first].0.reason.clone(),
                    received_at: messages[first].0.received_at,
                }),
                duplicate => duplicate.clone(),
            },
            None => match row_of[index] {
                Some(Row::Busy) => Inserted::Busy,
                Some(Row::Inserted(id)) => Inserted::New(id),
                Some(Row::Resent) | None => {
                    let key = (
                        message.client_id.as_str().to_owned(),
                        message.client_message_id.clone().unwrap_or_default(),
                    );
                    let stored = existing.get(&key).cloned().ok_or_else(|| {
                        sqlx::Error::Protocol(format!(
                            "message {index} of a batch was neither inserted nor found"
                        ))
                    })?;
                    Inserted::Duplicate(stored)
                }
            },
        };
        outcome.push(result);
    }
    Ok(outcome)
}

/// What the insert did with one message's row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Row {
    /// Past the cluster's in-flight limit: not stored, its sender retries.
    Busy,
    /// Stored under this id.
    Inserted(i64),
    /// Its client message id was stored before this batch.
    Resent,
}

/// The insert of a batch's messages (see [`insert_messages`]): `$1`-`$12` the columns, `$13`
/// the gateway that admitted them, `$14` the cluster's in-flight limit; `$with` adds CTEs
/// before the input, `$joined` what the rows are joined with, `$admitted` says whether a row
/// may go in.
macro_rules! messages_insert {
    ($with:literal, $joined:literal, $admitted:literal) => {
        concat!(
            "WITH ",
            $with,
            "input AS MATERIALIZED ( \
                 SELECT u.position, nextval(pg_get_serial_sequence('messages', 'id')) AS id, \
                     u.client_id, u.client_msg_id, u.message_type, u.content, u.filename, \
                     u.mime_type, u.size_bytes, u.timezone, u.status, u.status_reason, \
                     u.client_timestamp, u.received_at, ",
            $admitted,
            " AS admitted \
                 FROM ",
            $joined,
            "UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], \
                     $6::text[], $7::bigint[], $8::text[], $9::text[], $10::text[], $11::text[], \
                     $12::timestamptz[]) WITH ORDINALITY AS u(client_id, client_msg_id, \
                         message_type, content, filename, mime_type, size_bytes, timezone, \
                         status, status_reason, client_timestamp, received_at, position) \
                 ORDER BY u.position), \
             inserted AS ( \
                 INSERT INTO messages (id, client_id, client_msg_id, message_type, content, \
                     filename, mime_type, size_bytes, timezone, status, status_reason, \
                     client_timestamp, received_at, admitted_by) \
                 SELECT id, client_id, client_msg_id, message_type, content, filename, \
                     mime_type, size_bytes, timezone, status, status_reason, client_timestamp, \
                     received_at, $13::text \
                 FROM input WHERE admitted \
                 ON CONFLICT DO NOTHING RETURNING id) \
             SELECT input.position, input.id, inserted.id IS NOT NULL, input.admitted \
             FROM input LEFT JOIN inserted ON inserted.id = input.id"
        )
    };
}

/// Every row goes in: alone on the database, admission's own slots kept the limit (`$14` is
/// null here; only [`ADMITTED_INSERT`] is given one).
const INSERT: &str = messages_insert!("", "", "$14::bigint IS NULL");

/// Accepted rows go in, in the batch's order, while the cluster's in-flight count leaves room
/// under `$14`; the others are not stored, and their senders retry. The count's admission shard
/// is locked until the transaction ends, so that the count stays true until these messages
/// are committed (the table's triggers add them to that shard); taking it in the insert
/// itself, not a statement before, keeps it held for one round trip less, and every gateway's
/// accepted messages wait for it. The locked shard is read as it is once the lock is held (a
/// row locked after a wait is read again); the others, where completions take themselves off,
/// as of the statement's start, which can only count completions too late: never more
/// messages than the limit. A resend of a message stored before takes room too (it is answered
/// as that message; the batch is one place short, as it was when the count was read apart).
const ADMITTED_INSERT: &str = messages_insert!(
    "admission AS MATERIALIZED ( \
         SELECT accepted FROM in_flight WHERE shard = 0 FOR UPDATE), \
     room AS MATERIALIZED ( \
         SELECT $14::bigint - (SELECT accepted FROM admission) \
             - (SELECT COALESCE(SUM(accepted), 0) FROM in_flight WHERE shard <> 0) AS places), ",
    // Joined, not asked for by the first accepted row: a subquery is run when a row first needs
    // it, after the rows before it went in, and a rejected row inserted before the lock could
    // make another gateway's batch, holding the lock and inserting the same client message id,
    // wait for this one: a deadlock, that stalled every gateway's admission for a second.
    "room CROSS JOIN ",
    "(u.status <> 'accepted' OR COUNT(*) FILTER (WHERE u.status = 'accepted') \
         OVER (ORDER BY u.position) <= room.places)"
);

/// Stores reply sets. Each client's replies are numbered under an advisory lock of that
/// client's, taken in one order by every process (so two processes never wait on each other in
/// a circle), which makes the numbering gap-free and the per-type check below exact.
async fn insert_replies(
    tx: &mut Transaction<'_, Postgres>,
    batches: &[(ReplyBatch, super::super::batch::Respond<Vec<StoredReply>>)],
    seen: Replies,
) -> Result<Vec<Vec<StoredReply>>, Failed> {
    if batches.is_empty() {
        return Ok(Vec::new());
    }
    let clients: Vec<&str> = batches
        .iter()
        .map(|(batch, _)| batch.client_id.as_str())
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    // The streams locked, then where each ends (migration 9's function: one round trip),
    // before anything else of theirs is read: only then is what the lock's last holder wrote
    // in view.
    let latest: Vec<(String, Option<i64>)> =
        sqlx::query_as("SELECT client, latest FROM lock_reply_streams($1, $2)")
            .bind(REPLY_STREAM_LOCKS)
            .bind(&clients)
            .fetch_all(&mut **tx)
            .await?;
    let mut existing: HashMap<(i64, &'static str), StoredReply> = HashMap::new();
    if seen == Replies::MaybeStored {
        let message_ids: Vec<i64> = batches.iter().map(|(batch, _)| batch.message_id).collect();
        let stored: Vec<ReplyRecord> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {REPLY_COLUMNS} FROM replies WHERE message_id = ANY($1)"
        )))
        .bind(&message_ids)
        .fetch_all(&mut **tx)
        .await?;
        for record in stored {
            let reply = StoredReply::try_from(record)
                .map_err(|err| sqlx::Error::Protocol(err.to_string()))?;
            existing.insert((reply.message_id, reply.reply_type.as_str()), reply);
        }
    }
    let mut next_seq: HashMap<String, i64> = latest
        .into_iter()
        .map(|(client, seq)| (client, seq.unwrap_or(0) + 1))
        .collect();

    // Which replies are new, and their stream positions, in the order of the calls.
    struct Row<'a> {
        batch: usize,
        reply: &'a super::super::NewReply,
        seq: i64,
    }
    let mut rows: Vec<Row<'_>> = Vec::new();
    let mut taken: HashSet<(i64, &'static str)> = HashSet::new();
    for (index, (batch, _)) in batches.iter().enumerate() {
        for reply in &batch.replies {
            let key = (batch.message_id, reply.reply_type.as_str());
            if existing.contains_key(&key) || !taken.insert(key) {
                continue;
            }
            // The function answers for every client it was given.
            let next = next_seq
                .get_mut(batch.client_id.as_str())
                .ok_or_else(|| sqlx::Error::Protocol("a reply stream's end was not read".into()))?;
            rows.push(Row {
                batch: index,
                reply,
                seq: *next,
            });
            *next += 1;
        }
    }
    let completed: Vec<i64> = batches
        .iter()
        .filter(|(batch, _)| batch.completes)
        .map(|(batch, _)| batch.message_id)
        .collect();
    let returned: Vec<(i64, String, i64)> = if rows.is_empty() {
        if !completed.is_empty() {
            // Every reply was stored before (a job processed twice): only the status is left.
            sqlx::query(
                "UPDATE messages SET status = 'replied' WHERE id = ANY($1) AND status = 'accepted'",
            )
            .bind(&completed)
            .execute(&mut **tx)
            .await?;
        }
        Vec::new()
    } else {
        // Joined with its message instead of checked by a foreign key: the key's check locks
        // the message's row (a write to its page, and to the WAL) for every reply. Messages
        // are never deleted, so reading the row is as good a guarantee.
        // The messages these replies complete are marked replied by the same statement.
        sqlx::query_as(
            "WITH replied AS (UPDATE messages SET status = 'replied' \
                     WHERE id = ANY($10) AND status = 'accepted') \
                 INSERT INTO replies (message_id, client_id, seq, reply_type, content, filename, \
                     mime_type, fallback, created_at) \
                 SELECT r.* FROM UNNEST($1::bigint[], $2::text[], $3::bigint[], $4::text[], \
                     $5::text[], $6::text[], $7::text[], $8::bool[], $9::timestamptz[]) \
                     AS r(message_id, client_id, seq, reply_type, content, filename, mime_type, \
                         fallback, created_at) \
                 JOIN messages AS m ON m.id = r.message_id \
                 ON CONFLICT (message_id, reply_type) DO NOTHING \
                 RETURNING id, client_id, seq",
        )
        .bind(
            rows.iter()
                .map(|r| batches[r.batch].0.message_id)
                .collect::<Vec<i64>>(),
        )
        .bind(
            rows.iter()
                .map(|r| batches[r.batch].0.client_id.as_str())
                .collect::<Vec<&str>>(),
        )
        .bind(rows.iter().map(|r| r.seq).collect::<Vec<i64>>())
        .bind(
            rows.iter()
                .map(|r| r.reply.reply_type.as_str())
                .collect::<Vec<&str>>(),
        )
        .bind(
            rows.iter()
                .map(|r| r.reply.content.as_str())
                .collect::<Vec<&str>>(),
        )
        .bind(
            rows.iter()
                .map(|r| r.reply.filename.as_deref())
                .collect::<Vec<Option<&str>>>(),
        )
        .bind(
            rows.iter()
                .map(|r| r.reply.mime_type.as_deref())
                .collect::<Vec<Option<&str>>>(),
        )
        .bind(rows.iter().map(|r| r.reply.fallback).collect::<Vec<bool>>())
        .bind(
            rows.iter()
                .map(|r| batches[r.batch].0.created_at)
                .collect::<Vec<_>>(),
        )
        .bind(&completed)
        .fetch_all(&mut **tx)
        .await?
    };
    // Each new reply's id by its stream position.
    let ids: HashMap<(&str, i64), i64> = returned
        .iter()
        .map(|(id, client, seq)| ((client.as_str(), *seq), *id))
        .collect();
    if ids.len() < rows.len() {
        if seen == Replies::New {
            return Err(Failed::StoredBefore);
        }
        let missing = rows
            .iter()
            .find(|r| !ids.contains_key(&(batches[r.batch].0.client_id.as_str(), r.seq)))
            .map_or(0, |r| batches[r.batch].0.message_id);
        return Err(Failed::Sql(sqlx::Error::Protocol(format!(
            "a reply to message {missing}, which is not stored"
        ))));
    }

    // Each batch's answer: its replies as stored, new or from before, in the order asked.
    let mut new_rows = rows.into_iter().peekable();
    let mut answers: Vec<Vec<StoredReply>> = Vec::with_capacity(batches.len());
    // Where each reply stored now was answered: a second of its kind answers the same.
    let mut stored_now: HashMap<(i64, &'static str), (usize, usize)> = HashMap::new();
    for (index, (batch, _)) in batches.iter().enumerate() {
        let mut answer = Vec::with_capacity(batch.replies.len());
        for reply in &batch.replies {
            let key = (batch.message_id, reply.reply_type.as_str());
            if let Some(row) = new_rows.peek()
                && row.batch == index
                && std::ptr::eq(row.reply, reply)
            {
                let id = ids
                    .get(&(batch.client_id.as_str(), row.seq))
                    .copied()
                    .ok_or_else(|| {
                        sqlx::Error::Protocol("an inserted reply was not returned".into())
                    })?;
                let seq = u64::try_from(row.seq).map_err(|_| {
                    sqlx::Error::Protocol(format!("a corrupt reply seq {}", row.seq))
                })?;
                let stored = reply
                    .clone()
                    .stored(id, batch.message_id, seq, batch.created_at);
                stored_now.insert(key, (index, answer.len()));
                answer.push(stored);
                new_rows.next();
            } else if let Some(stored) = existing.get(&key) {
                // Stored before (a job processed twice): the first reply stands.
                answer.push(stored.clone());
            } else if let Some(&(set, at)) = stored_now.get(&key) {
                let first = if set == index {
                    answer[at].clone()
                } else {
                    answers[set][at].clone()
                };
                answer.push(first);
            }
        }
        answers.push(answer);
    }
    Ok(answers)
}

/// Delivery statuses: by reply, by acknowledgement, by departure; delivered stays delivered.
async fn record_updates(conn: &mut PgConnection, updates: &Updates) -> Result<(), sqlx::Error> {
    if !updates.deliveries.is_empty() {
        let deliveries: Vec<_> = updates.deliveries.values().collect();
        // `r.id = ANY($1)` beside the join: the replies then come by their ids from the primary
        // key, whatever the statistics say of how few are still undelivered (below).
        sqlx::query(
            "UPDATE replies AS r SET delivery = u.delivery, \
                 delivered_at = CASE WHEN u.delivery = 'delivered' THEN u.at END \
             FROM UNNEST($1::bigint[], $2::text[], $3::timestamptz[]) AS u(id, delivery, at) \
             WHERE r.id = ANY($1) AND r.id = u.id AND r.delivery <> 'delivered'",
        )
        .bind(deliveries.iter().map(|u| u.reply_id).collect::<Vec<i64>>())
        .bind(
            deliveries
                .iter()
                .map(|u| u.delivery.as_str().to_owned())
                .collect::<Vec<String>>(),
        )
        .bind(deliveries.iter().map(|u| u.at).collect::<Vec<_>>())
        .execute(&mut *conn)
        .await?;
    }
    if !updates.received.is_empty() {
        let received: Vec<_> = updates.received.values().collect();
        let clients: Vec<String> = received
            .iter()
            .map(|u| u.client_id.as_str().to_owned())
            .collect();
        let seqs: Vec<i64> = received.iter().map(|u| bigint_param(u.seq)).collect();
        // Only the range since each client's last acknowledgement, found by a range scan of the
        // client's part of the stream, and the replies then updated by id. Both as fences the
        // planner cannot reorder (`OFFSET 0` keeps each client's range a scan of its own, and
        // `ANY(ARRAY(...))` makes the ids a list looked up in the primary key): left free, once
        // statistics said that nearly every reply is delivered, it started from a scan of every
        // reply for the few that are not (20 ms a batch at 100,000 replies). The new position is
        // written by the same statement, whose reads all see the position from before it.
        sqlx::query(
            "WITH position AS (INSERT INTO reply_streams (client_id, acknowledged) \
                 SELECT * FROM UNNEST($1::text[], $2::bigint[]) \
                 ON CONFLICT (client_id) DO UPDATE \
                     SET acknowledged = GREATEST(reply_streams.acknowledged, \
                         EXCLUDED.acknowledged)) \
             UPDATE replies AS r SET delivery = 'delivered', \
                 delivered_at = (SELECT a.at FROM UNNEST($1::text[], $3::timestamptz[]) \
                     AS a(client_id, at) WHERE a.client_id = r.client_id LIMIT 1) \
             WHERE r.id = ANY(ARRAY( \
                     SELECT range.id \
                     FROM UNNEST($1::text[], $2::bigint[]) AS u(client_id, seq) \
                     LEFT JOIN reply_streams AS s ON s.client_id = u.client_id \
                     CROSS JOIN LATERAL (SELECT id FROM replies \
                         WHERE client_id = u.client_id \
                           AND seq > COALESCE(s.acknowledged, 0) AND seq <= u.seq \
                         OFFSET 0) AS range)) \
               AND r.delivery <> 'delivered'",
        )
        .bind(&clients)
        .bind(&seqs)
        .bind(received.iter().map(|u| u.at).collect::<Vec<_>>())
        .execute(&mut *conn)
        .await?;
    }
    if !updates.departures.is_empty() {
        sqlx::query(
            "UPDATE replies AS r SET delivery = 'failed' \
             WHERE r.id = ANY(ARRAY( \
                     SELECT range.id FROM UNNEST($1::text[], $2::bigint[]) AS u(client_id, seq) \
                     CROSS JOIN LATERAL (SELECT id FROM replies \
                         WHERE client_id = u.client_id AND seq > u.seq OFFSET 0) AS range)) \
               AND r.delivery = 'pending'",
        )
        .bind(
            updates
                .departures
                .iter()
                .map(|u| u.client_id.as_str().to_owned())
                .collect::<Vec<String>>(),
        )
        .bind(
            updates
                .departures
                .iter()
                .map(|u| bigint_param(u.seq))
                .collect::<Vec<i64>>(),
        )
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}
