//! The PostgreSQL writer: one task with a connection of its own. It takes every command waiting
//! (in a cluster, small batches first wait out `--write-interval` after the call before,
//! without being woken by each command that comes meanwhile: `store::inbox`) and
//! writes them with one call of a database function (migration 10's `write_batch`), which
//! stores every kind of row with one multi-row statement (rows passed as arrays and read back
//! with `UNNEST`) and commits as it returns: one round trip per batch. It then answers each
//! command. When the database cannot be reached it answers at once that it is unavailable,
//! instead of queueing, and reconnects with backoff.

use super::super::batch::{Backlog, Batch, ReplyBatch, Respond, Updates, respond};
use super::super::inbox::{self, Listen, Pending, Schedule, Turn, Wake};
use super::super::read::{Dialect, REPLY_COLUMNS, ReplyRecord};
use super::super::{
    Existing, Inserted, NewMessage, NewReply, StoreError, StoreHealth, StoredReply, bigint_param,
    sql,
};
use super::{PgShared, connect, describe};
use kaiwa_protocol::MessageStatus;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{Connection, Postgres};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;

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
    inbox: inbox::Receiver,
    health: Arc<Mutex<StoreHealth>>,
    backoff: Duration,
    /// When to try connecting again while unreachable.
    retry_at: tokio::time::Instant,
    /// The cluster-wide in-flight limit and the gateway whose messages these are, when the
    /// database is shared.
    shared: Option<PgShared>,
    /// Delivery updates of failed batches and those waiting, written with the next batch.
    backlog: Backlog,
    /// How long delivery marks and acknowledgements alone wait for a batch to ride with.
    updates_wait: Duration,
    /// How long after the start of a call a batch of fewer than [`inbox::FULL_ENOUGH`]
    /// commands waits before its own begins (`PgOptions::write_interval`).
    write_interval: Duration,
    /// When the last call began; `None` before the first.
    last_call: Option<tokio::time::Instant>,
}

/// What one batch learned from the database. The batch is committed by then: a read after it
/// that fails (what a resend or a reply stored before is answered with) fails only the commands
/// that needed it.
struct Written {
    /// Per message, in the batch's order: new under this id, or stored before.
    messages: Vec<Result<Inserted, StoreError>>,
    /// Per reply batch, in the batch's order.
    replies: Vec<Result<Vec<StoredReply>, StoreError>>,
}

impl Writer {
    pub(super) async fn connect(
        options: PgConnectOptions,
        inbox: inbox::Receiver,
        health: Arc<Mutex<StoreHealth>>,
        shared: Option<PgShared>,
        updates_wait: Duration,
        write_interval: Duration,
    ) -> Result<Self, StoreError> {
        let conn = connect(&options).await?;
        Ok(Self {
            options,
            conn: Some(conn),
            inbox,
            health,
            backoff: FIRST_BACKOFF,
            retry_at: tokio::time::Instant::now(),
            shared,
            backlog: Backlog::default(),
            updates_wait,
            write_interval,
            last_call: None,
        })
    }

    pub(super) async fn run(mut self) {
        let mut commands = Vec::with_capacity(256);
        loop {
            let now = tokio::time::Instant::now();
            if self.conn.is_none() && now >= self.retry_at {
                self.reconnect().await;
                // Updates of a failed batch, written now that the database is back.
                self.write_backlog().await;
                continue;
            }
            let turn = self
                .inbox
                .take_or_listen(&mut commands, MAX_BATCH, |pending| {
                    self.decide(pending, now)
                });
            match turn {
                Turn::Took => {}
                Turn::Listen(listen) => {
                    self.inbox.wait(listen).await;
                    continue;
                }
                Turn::Abandoned => {
                    // Every sender is gone without a close: what waits is written now.
                    self.write_backlog().await;
                    return;
                }
            }
            let mut batch = Batch::gather(commands.drain(..));
            if batch.may_wait() && self.conn.is_some() {
                self.backlog
                    .hold(std::mem::take(&mut batch.updates), self.updates_wait);
                if self.backlog.due().is_some_and(|due| due > now) {
                    continue;
                }
            }
            if let Some(closed) = self.commit(batch).await {
                let rest = self.inbox.close();
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

    /// Whether to take what waits now (`None`), else how to wait. Small batches of writes wait
    /// until `write_interval` after the last call began: at a few hundred messages a second,
    /// each call held one or two and cost PostgreSQL as much as a hundred rows
    /// (docs/architecture.md, "Writes at a steady rate").
    fn decide(&self, pending: &Pending, now: tokio::time::Instant) -> Option<Listen> {
        if self.conn.is_none() {
            // Unreachable, commands are refused at once, so that clients retry now.
            return (pending.len == 0).then_some(Listen {
                wake: Wake::Any,
                until: Some(self.retry_at),
            });
        }
        let writes_due = self
            .last_call
            .filter(|_| !self.write_interval.is_zero())
            .map(|last| last + self.write_interval);
        Schedule {
            writes_due,
            backlog_due: self.backlog.due(),
        }
        .decide(pending, now)
    }

    /// Writes the updates that wait, if there are any and a connection to write them.
    async fn write_backlog(&mut self) {
        if self.conn.is_some() && !self.backlog.is_empty() {
            self.commit(Batch::default()).await;
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
        let started = tokio::time::Instant::now();
        self.last_call = Some(started);
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
                let err = sql::error(&err);
                tracing::error!(%err, commands = batch.len(), "database batch failed");
                if err.is_transient() {
                    self.conn = None;
                    self.set_health(StoreHealth::Degraded(err.to_string()));
                    self.retry_at = tokio::time::Instant::now();
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
        respond(tx, inserted);
    }
    for ((_, tx), stored) in replies.into_iter().zip(written.replies) {
        respond(tx, stored);
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

/// The call of migration 10's `write_batch`, which writes a whole batch in one round trip and
/// one transaction of its own: its arguments are bound by [`MessageRows::bind`],
/// [`ReplyRows::bind`] and [`bind_updates`], in that order.
const WRITE_BATCH: &str = "SELECT kind, position, id, seq, fresh, admitted FROM write_batch(\
    $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, \
    $15, $16, $17, $18, $19, $20, $21, $22, $23, $24, $25, \
    $26, $27, $28, $29, $30, $31, $32, $33)";

/// What `write_batch` fails with when a reply finds one of its type stored and replies stored
/// before were not looked for.
const STORED_BEFORE: &str = "KW001";

type Call<'q> = sqlx::query::QueryAs<'q, Postgres, Outcome, sqlx::postgres::PgArguments>;

/// One row `write_batch` returns: what became of one message or reply given to it.
#[derive(sqlx::FromRow)]
struct Outcome {
    /// `b'm'` for a message, `b'r'` for a reply.
    kind: i8,
    /// Its place among the rows of its kind given, from 1.
    position: i64,
    id: i64,
    /// A reply's place in its client's stream.
    seq: Option<i64>,
    /// Stored by this call (else: stored before).
    fresh: bool,
    /// Whether a message had room under the cluster's in-flight limit.
    admitted: bool,
}

/// The whole batch in one statement: replies, delivery updates, then messages.
async fn write(
    conn: &mut PgConnection,
    batch: &Batch,
    shared: Option<&PgShared>,
    seen: Replies,
) -> Result<Written, Failed> {
    let messages = MessageRows::plan(&batch.messages);
    let replies = ReplyRows::plan(&batch.replies);
    let call = sqlx::query_as(WRITE_BATCH);
    let call = messages.bind(call, shared);
    let call = replies.bind(call, seen);
    let call = bind_updates(call, &batch.updates);
    let returned = call.fetch_all(&mut *conn).await.map_err(|err| match &err {
        sqlx::Error::Database(db) if db.code().as_deref() == Some(STORED_BEFORE) => {
            Failed::StoredBefore
        }
        _ => Failed::Sql(err),
    })?;
    let (message_rows, reply_rows): (Vec<Outcome>, Vec<Outcome>) =
        returned.into_iter().partition(|row| row.kind == b'm' as i8);
    // Committed: from here on a failure answers the commands it concerns, not the batch.
    let messages = match messages.outcome(conn, message_rows).await {
        Ok(outcome) => outcome,
        Err(err) => vec![Err(sql::error(&err)); batch.messages.len()],
    };
    let replies = match replies.answers(conn, reply_rows).await {
        Ok(answers) => answers,
        Err(err) => vec![Err(sql::error(&err)); batch.replies.len()],
    };
    Ok(Written { messages, replies })
}

/// A batch's messages as rows: a client message id sent twice within the batch is stored
/// once, by its first send.
struct MessageRows<'a> {
    messages: &'a [(Box<NewMessage>, Respond<Inserted>)],
    /// Per message, the earlier one of the batch it repeats.
    repeat_of: Vec<Option<usize>>,
    /// The messages sent as rows, in the batch's order.
    rows: Vec<usize>,
}

impl<'a> MessageRows<'a> {
    fn plan(messages: &'a [(Box<NewMessage>, Respond<Inserted>)]) -> Self {
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
        let rows = (0..messages.len())
            .filter(|&i| repeat_of[i].is_none())
            .collect();
        Self {
            messages,
            repeat_of,
            rows,
        }
    }

    /// Binds the columns (arrays of borrowed text: encoded straight from the messages), the
    /// gateway admitting them and the cluster's in-flight limit.
    fn bind<'q>(&self, call: Call<'q>, shared: Option<&'q PgShared>) -> Call<'q>
    where
        'a: 'q,
    {
        let messages = self.messages;
        let rows = &self.rows;
        // Alone on the database, the process's own in-flight slots keep the limit (admission):
        // only gateways that share it need the count that all of them see, read and locked in
        // the insert itself.
        let limit = shared
            .filter(|_| {
                messages
                    .iter()
                    .any(|(m, _)| m.status == MessageStatus::Accepted)
            })
            .map(|shared| i64::from(shared.max_in_flight));
        let admitted_by = shared.and_then(|shared| shared.admitted_by.as_deref());
        let column = |f: &dyn Fn(&'a NewMessage) -> Option<&'a str>| -> Vec<Option<&'a str>> {
            rows.iter().map(|&i| f(&messages[i].0)).collect()
        };
        call.bind(column(&|m| Some(m.client_id.as_str())))
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
    }

    /// What became of each message, in the batch's order; a native resend of a stored client
    /// message id gets the stored message, read now (rare: a client that resends after a lost
    /// acknowledgement).
    async fn outcome(
        &self,
        conn: &mut PgConnection,
        returned: Vec<Outcome>,
    ) -> Result<Vec<Result<Inserted, StoreError>>, sqlx::Error> {
        let messages = self.messages;
        let mut row_of: Vec<Option<Row>> = vec![None; messages.len()];
        for row in returned {
            let index = usize::try_from(row.position - 1)
                .ok()
                .and_then(|at| self.rows.get(at))
                .ok_or_else(|| {
                    sqlx::Error::Protocol(format!("a message row {} not sent", row.position))
                })?;
            row_of[*index] = Some(match (row.admitted, row.fresh) {
                (false, _) => Row::Busy,
                (true, true) => Row::Inserted(row.id),
                (true, false) => Row::Resent,
            });
        }
        let resent: Vec<usize> = self
            .rows
            .iter()
            .copied()
            .filter(|&i| row_of[i] == Some(Row::Resent))
            .collect();
        let existing = if resent.is_empty() {
            Ok(HashMap::new())
        } else {
            stored_messages(conn, resent.iter().map(|&i| &*messages[i].0))
                .await
                .map_err(|err| sql::error(&err))
        };
        let mut outcome: Vec<Result<Inserted, StoreError>> = Vec::with_capacity(messages.len());
        for (index, (message, _)) in messages.iter().enumerate() {
            let result = match self.repeat_of[index] {
                // A repeat within the batch answers as its first send turned out.
                Some(first) => match &outcome[first] {
                    Ok(Inserted::New(id)) => Ok(Inserted::Duplicate(Existing {
                        id: *id,
                        status: messages[first].0.status,
                        reason: messages[first].0.reason.clone(),
                        received_at: messages[first].0.received_at,
                    })),
                    duplicate => duplicate.clone(),
                },
                None => match row_of[index] {
                    Some(Row::Busy) => Ok(Inserted::Busy),
                    Some(Row::Inserted(id)) => Ok(Inserted::New(id)),
                    Some(Row::Resent) | None => {
                        let key = (
                            message.client_id.as_str().to_owned(),
                            message.client_message_id.clone().unwrap_or_default(),
                        );
                        look_up(&existing, &key, || {
                            format!("message {index} of a batch was neither inserted nor found")
                        })
                        .map(Inserted::Duplicate)
                    }
                },
            };
            outcome.push(result);
        }
        Ok(outcome)
    }
}

/// The messages stored under the client message ids of `resent`, by client and client message
/// id.
async fn stored_messages(
    conn: &mut PgConnection,
    resent: impl Iterator<Item = &NewMessage> + Clone,
) -> Result<HashMap<(String, String), Existing>, sqlx::Error> {
    #[derive(sqlx::FromRow)]
    struct Found {
        id: i64,
        client_id: String,
        client_msg_id: String,
        status: String,
        status_reason: Option<String>,
        received_at: chrono::DateTime<chrono::Utc>,
    }
    let found: Vec<Found> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT m.id, m.client_id, m.client_msg_id, {} AS status, m.status_reason, \
                 m.received_at \
             FROM messages AS m \
             JOIN UNNEST($1::text[], $2::text[]) AS r(client_id, client_msg_id) \
                 ON m.client_id = r.client_id AND m.client_msg_id = r.client_msg_id",
        <Postgres as Dialect>::status_of("m")
    )))
    .bind(
        resent
            .clone()
            .map(|m| m.client_id.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        resent
            .map(|m| m.client_message_id.as_deref().unwrap_or_default())
            .collect::<Vec<_>>(),
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut existing = HashMap::with_capacity(found.len());
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
    Ok(existing)
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

/// A batch's reply sets as rows: a reply of a type its message has twice in the batch is sent
/// once, by its first set. Each client's replies are numbered by `write_batch`, under an
/// advisory lock of that client's taken in one order by every process (so two processes never
/// wait on each other in a circle), which makes the numbering gap-free and the per-type check
/// exact.
struct ReplyRows<'a> {
    batches: &'a [(ReplyBatch, Respond<Vec<StoredReply>>)],
    /// The replies sent, in the order of the calls: (reply set, reply).
    rows: Vec<(usize, &'a NewReply)>,
}

impl<'a> ReplyRows<'a> {
    fn plan(batches: &'a [(ReplyBatch, Respond<Vec<StoredReply>>)]) -> Self {
        let mut rows = Vec::new();
        let mut taken: HashSet<(i64, &'static str)> = HashSet::new();
        for (index, (batch, _)) in batches.iter().enumerate() {
            for reply in &batch.replies {
                if taken.insert((batch.message_id, reply.reply_type.as_str())) {
                    rows.push((index, reply));
                }
            }
        }
        Self { batches, rows }
    }

    fn bind<'q>(&self, call: Call<'q>, seen: Replies) -> Call<'q>
    where
        'a: 'q,
    {
        let batches = self.batches;
        let rows = &self.rows;
        let completed: Vec<i64> = batches
            .iter()
            .filter(|(batch, _)| batch.completes)
            .map(|(batch, _)| batch.message_id)
            .collect();
        call.bind(REPLY_STREAM_LOCKS)
            .bind(
                rows.iter()
                    .map(|&(set, _)| batches[set].0.message_id)
                    .collect::<Vec<i64>>(),
            )
            .bind(
                rows.iter()
                    .map(|&(set, _)| batches[set].0.client_id.as_str())
                    .collect::<Vec<&str>>(),
            )
            .bind(
                rows.iter()
                    .map(|(_, reply)| reply.reply_type.as_str())
                    .collect::<Vec<&str>>(),
            )
            .bind(
                rows.iter()
                    .map(|(_, reply)| reply.content.as_str())
                    .collect::<Vec<&str>>(),
            )
            .bind(
                rows.iter()
                    .map(|(_, reply)| reply.filename.as_deref())
                    .collect::<Vec<Option<&str>>>(),
            )
            .bind(
                rows.iter()
                    .map(|(_, reply)| reply.mime_type.as_deref())
                    .collect::<Vec<Option<&str>>>(),
            )
            .bind(
                rows.iter()
                    .map(|(_, reply)| reply.fallback)
                    .collect::<Vec<bool>>(),
            )
            .bind(
                rows.iter()
                    .map(|&(set, _)| batches[set].0.created_at)
                    .collect::<Vec<_>>(),
            )
            .bind(completed)
            .bind(seen == Replies::MaybeStored)
    }

    /// Each reply set's answer: its replies as stored, new or from before (those read now), in
    /// the order asked.
    async fn answers(
        &self,
        conn: &mut PgConnection,
        returned: Vec<Outcome>,
    ) -> Result<Vec<Result<Vec<StoredReply>, StoreError>>, sqlx::Error> {
        let batches = self.batches;
        // Per row sent: its id and stream position, and whether it was stored before.
        let mut stored: Vec<Option<(i64, i64, bool)>> = vec![None; self.rows.len()];
        for row in returned {
            let at = usize::try_from(row.position - 1)
                .ok()
                .filter(|&at| at < stored.len())
                .ok_or_else(|| {
                    sqlx::Error::Protocol(format!("a reply row {} not sent", row.position))
                })?;
            let seq = row
                .seq
                .ok_or_else(|| sqlx::Error::Protocol("a reply without its seq".into()))?;
            stored[at] = Some((row.id, seq, !row.fresh));
        }
        let before: Vec<i64> = stored
            .iter()
            .flatten()
            .filter(|(_, _, before)| *before)
            .map(|&(id, _, _)| id)
            .collect();
        let earlier = if before.is_empty() {
            Ok(HashMap::new())
        } else {
            replies_by_id(conn, &before)
                .await
                .map_err(|err| sql::error(&err))
        };
        // Each reply sent, as stored, by its message and type: a second of its kind in the
        // batch answers the same.
        let mut by_type: HashMap<(i64, &'static str), Result<StoredReply, StoreError>> =
            HashMap::with_capacity(self.rows.len());
        for (&(set, reply), stored) in self.rows.iter().zip(stored) {
            let batch = &batches[set].0;
            let (id, seq, before) = stored.ok_or_else(|| {
                sqlx::Error::Protocol("an inserted reply was not returned".into())
            })?;
            let answer = if before {
                look_up(&earlier, &id, || {
                    format!("reply {id}, stored before, was not found")
                })
            } else {
                let seq = u64::try_from(seq)
                    .map_err(|_| sqlx::Error::Protocol(format!("a corrupt reply seq {seq}")))?;
                Ok(reply
                    .clone()
                    .stored(id, batch.message_id, seq, batch.created_at))
            };
            by_type.insert((batch.message_id, reply.reply_type.as_str()), answer);
        }
        Ok(batches
            .iter()
            .map(|(batch, _)| {
                batch
                    .replies
                    .iter()
                    .filter_map(|reply| {
                        by_type
                            .get(&(batch.message_id, reply.reply_type.as_str()))
                            .cloned()
                    })
                    .collect()
            })
            .collect())
    }
}

/// The row read after the commit under `key`: the read's failure, or `missing` if it found no
/// such row.
fn look_up<K: Eq + std::hash::Hash, V: Clone>(
    read: &Result<HashMap<K, V>, StoreError>,
    key: &K,
    missing: impl FnOnce() -> String,
) -> Result<V, StoreError> {
    let found = read.as_ref().map_err(Clone::clone)?;
    found
        .get(key)
        .cloned()
        .ok_or_else(|| StoreError::Database(missing()))
}

/// Replies as stored, by id.
async fn replies_by_id(
    conn: &mut PgConnection,
    ids: &[i64],
) -> Result<HashMap<i64, StoredReply>, sqlx::Error> {
    let records: Vec<ReplyRecord> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {REPLY_COLUMNS} FROM replies WHERE id = ANY($1)"
    )))
    .bind(ids)
    .fetch_all(&mut *conn)
    .await?;
    records
        .into_iter()
        .map(|record| {
            StoredReply::try_from(record)
                .map(|reply| (reply.id, reply))
                .map_err(|err| sqlx::Error::Protocol(err.to_string()))
        })
        .collect()
}

/// Binds delivery statuses: by reply, by acknowledgement, by departure (delivered stays
/// delivered).
fn bind_updates<'q>(call: Call<'q>, updates: &'q Updates) -> Call<'q> {
    let deliveries: Vec<_> = updates.deliveries.values().collect();
    let received: Vec<_> = updates.received.values().collect();
    call.bind(deliveries.iter().map(|u| u.reply_id).collect::<Vec<i64>>())
        .bind(
            deliveries
                .iter()
                .map(|u| u.delivery.as_str())
                .collect::<Vec<&str>>(),
        )
        .bind(deliveries.iter().map(|u| u.at).collect::<Vec<_>>())
        .bind(
            received
                .iter()
                .map(|u| u.client_id.as_str())
                .collect::<Vec<&str>>(),
        )
        .bind(
            received
                .iter()
                .map(|u| bigint_param(u.seq))
                .collect::<Vec<i64>>(),
        )
        .bind(received.iter().map(|u| u.at).collect::<Vec<_>>())
        .bind(
            updates
                .departures
                .iter()
                .map(|u| u.client_id.as_str())
                .collect::<Vec<&str>>(),
        )
        .bind(
            updates
                .departures
                .iter()
                .map(|u| bigint_param(u.seq))
                .collect::<Vec<i64>>(),
        )
}
