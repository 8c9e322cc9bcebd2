//! The SQLite writer: the one thread that writes the database. It takes commands from its
//! inbox, commits as many as are waiting in one transaction (group commit: one fsync per
//! batch), and answers each command when its batch is committed. Delivery marks and
//! acknowledgements alone wait for the next batch (up to `updates_wait`), as on PostgreSQL.
//!
//! It runs on a plain thread with its own connection (rusqlite) and cached prepared
//! statements: a write is then a few microseconds of SQLite, with no handoff between threads
//! or runtimes per statement, which is what bounds the whole server's throughput.

use super::super::batch::{Backlog, Batch, ReplyBatch, UPDATES_WAIT, Updates, respond};
use super::super::inbox::{self, Schedule, Turn};
use super::super::read::{REPLY_COLUMNS, ReplyRecord};
use super::super::{
    Existing, Inserted, NewMessage, StoreError, StoreHealth, StoredReply, bigint_param,
};
use super::{Durability, SqliteOptions};
use chrono::{DateTime, SecondsFormat, Utc};
use kaiwa_protocol::{Delivery, MessageStatus};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Commands taken in one transaction, at most: enough that one commit (and its fsync) takes
/// every command waiting under load.
const MAX_BATCH: usize = 8192;

// The writer's statements, prepared once and cached on its connection.
const INSERT_MESSAGE: &str = "INSERT INTO messages (id, client_id, client_msg_id, message_type, \
         content, filename, mime_type, size_bytes, timezone, status, status_reason, \
         client_timestamp, received_at) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13) \
     ON CONFLICT DO NOTHING";
const FIND_MESSAGE: &str = "SELECT id, status, status_reason, received_at FROM messages \
     WHERE client_id = ?1 AND client_msg_id = ?2";
const INSERT_REPLY: &str = "INSERT INTO replies (id, message_id, client_id, reply_type, content, \
         filename, mime_type, fallback, created_at, seq) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) \
     ON CONFLICT DO NOTHING";
/// The client's latest reply stream position, found through `replies_client_seq`.
const LATEST_SEQ: &str = "SELECT COALESCE(MAX(seq), 0) FROM replies WHERE client_id = ?1";
const MARK_REPLIED: &str =
    "UPDATE messages SET status = 'replied' WHERE id = ?1 AND status = 'accepted'";
const RECORD_DELIVERY: &str = "UPDATE replies SET delivery = ?2, delivered_at = ?3 \
     WHERE id = ?1 AND delivery <> 'delivered'";
/// The replies since the client's last acknowledgement (`?3`), up to this one (`?2`): a range
/// of the stream, however long the client's history.
const RECORD_RECEIVED: &str = "UPDATE replies SET delivery = 'delivered', delivered_at = ?4 \
     WHERE client_id = ?1 AND seq > ?3 AND seq <= ?2 AND delivery <> 'delivered'";
const ACKNOWLEDGED: &str = "SELECT acknowledged FROM reply_streams WHERE client_id = ?1";
const RECORD_ACKNOWLEDGED: &str = "INSERT INTO reply_streams (client_id, acknowledged) \
     VALUES (?1, ?2) \
     ON CONFLICT (client_id) DO UPDATE SET acknowledged = MAX(acknowledged, excluded.acknowledged)";
const RECORD_DEPARTURE: &str = "UPDATE replies SET delivery = 'failed' \
     WHERE client_id = ?1 AND seq > ?2 AND delivery = 'pending'";

fn timestamp(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, true)
}

pub(super) struct Writer {
    conn: Connection,
    inbox: inbox::Receiver,
    /// What the store reports to `/health`: degraded from a failed batch until one succeeds.
    health: Arc<Mutex<StoreHealth>>,
    /// Ids are assigned here, before the insert, so a batch needs no round trip to learn them.
    /// Safe because this thread is the database's only writer (see the lock file).
    next_message_id: i64,
    next_reply_id: i64,
    /// Delivery updates of failed batches, and those waiting for a batch to ride with,
    /// written with the next one.
    backlog: Backlog,
    /// How long updates may wait alone for a batch to ride with.
    updates_wait: Duration,
}

struct PendingMessage {
    id: i64,
    message: Box<NewMessage>,
    respond: oneshot::Sender<Result<Inserted, StoreError>>,
}

struct PendingReplies {
    first_id: i64,
    /// The stream position of the first reply, found while writing.
    first_seq: u64,
    batch: ReplyBatch,
    respond: oneshot::Sender<Result<Vec<StoredReply>, StoreError>>,
}

/// What a batch write found besides plain inserts.
#[derive(Default)]
struct Written {
    /// Messages that were stored before, by the id they were given in this batch.
    duplicates: HashMap<i64, Existing>,
    /// Reply sets stored before, by their position in the batch.
    earlier_replies: HashMap<usize, Vec<StoredReply>>,
}

impl Writer {
    /// Opens the writer's connection. The schema must already be migrated.
    pub(super) fn open(
        path: &Path,
        options: SqliteOptions,
        inbox: inbox::Receiver,
        health: Arc<Mutex<StoreHealth>>,
    ) -> Result<Self, rusqlite::Error> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        // The cache keeps the hot pages (index leaves where each client's rows go, the tables'
        // tails). Checkpoints run on this thread, every 10,000 WAL pages (40 MB) instead of
        // SQLite's 1,000: a page rewritten by many commits in between is copied to the database
        // once, which took a tenth off the writer's time; the journal size limit gives the disk
        // back.
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA foreign_keys = ON; \
             PRAGMA wal_autocheckpoint = 10000; PRAGMA journal_size_limit = 67108864;",
        )?;
        conn.pragma_update(None, "cache_size", options.cache_size())?;
        // FULL syncs the WAL at every commit (one fsync per batch, not per message).
        conn.pragma_update(
            None,
            "synchronous",
            match options.durability {
                Durability::Full => "FULL",
                Durability::Normal => "NORMAL",
            },
        )?;
        conn.set_prepared_statement_cache_capacity(16);
        let next_id = |table: &str| -> Result<i64, rusqlite::Error> {
            conn.query_row(
                &format!("SELECT COALESCE(MAX(id), 0) + 1 FROM {table}"),
                [],
                |row| row.get(0),
            )
        };
        let next_message_id = next_id("messages")?;
        let next_reply_id = next_id("replies")?;
        Ok(Self {
            conn,
            inbox,
            health,
            next_message_id,
            next_reply_id,
            backlog: Backlog::default(),
            updates_wait: options.updates_wait.unwrap_or(UPDATES_WAIT),
        })
    }

    /// Runs the writer on a thread of its own until the store is closed.
    pub(super) fn spawn(self) -> Result<std::thread::JoinHandle<()>, StoreError> {
        // Only to wait for the doorbell or a deadline: the writes themselves block.
        let timer = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()?;
        Ok(std::thread::Builder::new()
            .name("kaiwa-store-writer".to_owned())
            .spawn(move || self.run(&timer))?)
    }

    fn run(mut self, timer: &tokio::runtime::Runtime) {
        let mut commands = Vec::with_capacity(1024);
        loop {
            let now = tokio::time::Instant::now();
            // Each batch goes as soon as the one before is done: a local commit is cheap.
            let schedule = Schedule {
                writes_due: None,
                backlog_due: self.backlog.due(),
            };
            let turn = self
                .inbox
                .take_or_listen(&mut commands, MAX_BATCH, |pending| {
                    schedule.decide(pending, now)
                });
            match turn {
                Turn::Took => {}
                // The wait is made inside the runtime: its timer needs the runtime's clock.
                Turn::Listen(listen) => {
                    timer.block_on(self.inbox.wait(listen));
                    continue;
                }
                Turn::Abandoned => {
                    // Every sender is gone without a close: what waits is written now.
                    if !self.backlog.is_empty() {
                        self.commit(Batch::default());
                    }
                    return;
                }
            }
            let mut batch = Batch::gather(commands.drain(..));
            if batch.may_wait() {
                self.backlog
                    .hold(std::mem::take(&mut batch.updates), self.updates_wait);
                if self.backlog.due().is_some_and(|due| due > now) {
                    continue;
                }
            }
            if let Some(closed) = self.commit(batch) {
                // Commands sent before the close still get an answer.
                let rest = self.inbox.close();
                if !rest.is_empty() {
                    self.commit(Batch::gather(rest));
                }
                if let Err((_, err)) = self.conn.close() {
                    tracing::warn!(%err, "closing the database writer failed");
                }
                respond(closed, ());
                return;
            }
        }
    }

    /// Writes one batch in one transaction and answers every command in it. Returns the close
    /// request if the batch held one.
    fn commit(&mut self, batch: Batch) -> Option<oneshot::Sender<()>> {
        let Batch {
            messages,
            replies,
            updates,
            close,
            #[cfg(test)]
            barriers,
        } = batch;
        #[cfg(test)]
        let _answer_barriers_on_return = BarrierGuard(barriers);
        let updates = self.backlog.take_with(updates);
        let messages: Vec<PendingMessage> = messages
            .into_iter()
            .map(|(message, respond)| {
                let id = self.next_message_id;
                self.next_message_id += 1;
                PendingMessage {
                    id,
                    message,
                    respond,
                }
            })
            .collect();
        let mut replies: Vec<PendingReplies> = replies
            .into_iter()
            .map(|(batch, respond)| {
                let first_id = self.next_reply_id;
                self.next_reply_id += batch.replies.len() as i64;
                PendingReplies {
                    first_id,
                    first_seq: 0,
                    batch,
                    respond,
                }
            })
            .collect();
        if messages.is_empty() && replies.is_empty() && updates.is_empty() {
            return close;
        }
        let started = Instant::now();
        let count = messages.len() + replies.len() + updates.len();
        match self.write(&messages, &mut replies, &updates) {
            Ok(mut written) => {
                self.set_health(StoreHealth::Ok);
                self.backlog.written();
                metrics::histogram!("kaiwa_store_batch_size").record(count as f64);
                metrics::histogram!("kaiwa_store_commit_seconds")
                    .record(started.elapsed().as_secs_f64());
                for pending in messages {
                    let result = match written.duplicates.remove(&pending.id) {
                        Some(existing) => Inserted::Duplicate(existing),
                        None => Inserted::New(pending.id),
                    };
                    respond(pending.respond, Ok(result));
                }
                for (index, pending) in replies.into_iter().enumerate() {
                    let PendingReplies {
                        first_id,
                        first_seq,
                        batch,
                        respond: answer,
                    } = pending;
                    let stored = match written.earlier_replies.remove(&index) {
                        Some(earlier) => earlier,
                        None => stored_replies(first_id, first_seq, batch),
                    };
                    respond(answer, Ok(stored));
                }
            }
            Err(err) => {
                tracing::error!(%err, commands = count, "database batch failed");
                let err = write_error(&err);
                self.set_health(StoreHealth::Degraded(err.to_string()));
                self.backlog.keep(updates, &err);
                for pending in messages {
                    respond(pending.respond, Err(err.clone()));
                }
                for pending in replies {
                    respond(pending.respond, Err(err.clone()));
                }
            }
        }
        close
    }

    fn set_health(&self, health: StoreHealth) {
        let mut current = self
            .health
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if *current != health {
            if health == StoreHealth::Ok {
                tracing::info!("database writes go through again");
            }
            *current = health;
        }
    }

    fn write(
        &mut self,
        messages: &[PendingMessage],
        replies: &mut [PendingReplies],
        updates: &Updates,
    ) -> Result<Written, rusqlite::Error> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut written = Written::default();
        {
            let mut insert = tx.prepare_cached(INSERT_MESSAGE)?;
            let mut find = tx.prepare_cached(FIND_MESSAGE)?;
            for pending in messages {
                let m = &pending.message;
                let inserted = insert.execute(params![
                    pending.id,
                    m.client_id.as_str(),
                    m.client_message_id,
                    m.kind.as_str(),
                    m.content,
                    m.filename,
                    m.mime_type,
                    m.size_bytes.and_then(|size| i64::try_from(size).ok()),
                    m.timezone.name(),
                    m.status.as_str(),
                    m.reason,
                    m.client_timestamp,
                    timestamp(m.received_at),
                ])?;
                if inserted == 1 {
                    continue;
                }
                // The client sent this id before (possibly earlier in this very batch).
                let existing = find
                    .query_row(params![m.client_id.as_str(), m.client_message_id], |row| {
                        Ok((
                            row.get::<_, i64>(0)?,
                            row.get::<_, String>(1)?,
                            row.get::<_, Option<String>>(2)?,
                            row.get::<_, String>(3)?,
                        ))
                    })
                    .optional()?;
                let Some((id, status, reason, received_at)) = existing else {
                    return Err(corrupt(format!(
                        "message {} was neither inserted nor found",
                        pending.id
                    )));
                };
                let status = MessageStatus::parse(&status)
                    .ok_or_else(|| corrupt(format!("unknown message status {status:?}")))?;
                written.duplicates.insert(
                    pending.id,
                    Existing {
                        id,
                        status,
                        reason,
                        received_at: parse_time(&received_at)?,
                    },
                );
            }
        }
        if !replies.is_empty() {
            let mut insert = tx.prepare_cached(INSERT_REPLY)?;
            let mut replied = tx.prepare_cached(MARK_REPLIED)?;
            let mut latest = tx.prepare_cached(LATEST_SEQ)?;
            for (index, pending) in replies.iter_mut().enumerate() {
                let batch = &pending.batch;
                let created_at = timestamp(batch.created_at);
                // Read in the transaction, so it counts this batch's earlier rows too: a
                // client's stream has no gaps, and a reply that is not inserted takes no seq.
                let mut next_seq = latest.query_row(params![batch.client_id.as_str()], |row| {
                    row.get::<_, i64>(0)
                })? + 1;
                pending.first_seq = u64::try_from(next_seq)
                    .map_err(|_| corrupt(format!("reply seq {next_seq}")))?;
                let mut all_new = true;
                for (reply, id) in batch.replies.iter().zip(pending.first_id..) {
                    let inserted = insert.execute(params![
                        id,
                        batch.message_id,
                        batch.client_id.as_str(),
                        reply.reply_type.as_str(),
                        reply.content,
                        reply.filename,
                        reply.mime_type,
                        reply.fallback,
                        created_at,
                        next_seq,
                    ])?;
                    if inserted == 1 {
                        next_seq += 1;
                    } else {
                        all_new = false;
                    }
                }
                if !all_new {
                    // These replies were stored before (a job processed twice): answer with
                    // what is stored.
                    written
                        .earlier_replies
                        .insert(index, stored_earlier(&tx, batch)?);
                }
                if batch.completes {
                    replied.execute(params![batch.message_id])?;
                }
            }
        }
        if !updates.deliveries.is_empty() {
            let mut update = tx.prepare_cached(RECORD_DELIVERY)?;
            for update_of in updates.deliveries.values() {
                let delivered_at =
                    (update_of.delivery == Delivery::Delivered).then(|| timestamp(update_of.at));
                update.execute(params![
                    update_of.reply_id,
                    update_of.delivery.as_str(),
                    delivered_at
                ])?;
            }
        }
        if !updates.received.is_empty() {
            let mut since = tx.prepare_cached(ACKNOWLEDGED)?;
            let mut update = tx.prepare_cached(RECORD_RECEIVED)?;
            let mut position = tx.prepare_cached(RECORD_ACKNOWLEDGED)?;
            for received in updates.received.values() {
                let client_id = received.client_id.as_str();
                let seq = bigint_param(received.seq);
                let acknowledged: i64 = since
                    .query_row(params![client_id], |row| row.get(0))
                    .optional()?
                    .unwrap_or(0);
                if seq <= acknowledged {
                    continue;
                }
                update.execute(params![
                    client_id,
                    seq,
                    acknowledged,
                    timestamp(received.at)
                ])?;
                position.execute(params![client_id, seq])?;
            }
        }
        if !updates.departures.is_empty() {
            let mut update = tx.prepare_cached(RECORD_DEPARTURE)?;
            for departure in &updates.departures {
                update.execute(params![
                    departure.client_id.as_str(),
                    bigint_param(departure.seq)
                ])?;
            }
        }
        tx.commit()?;
        Ok(written)
    }
}

/// The stored replies of these types for this message, read as the read side reads a reply
/// ([`ReplyRecord`], and its conversion with the same words for a corrupt value).
fn stored_earlier(
    tx: &rusqlite::Transaction<'_>,
    batch: &ReplyBatch,
) -> Result<Vec<StoredReply>, rusqlite::Error> {
    // Prepared on the rare batch that needs it (a job processed twice), then cached.
    let mut find = tx.prepare_cached(&format!(
        "SELECT {REPLY_COLUMNS} FROM replies WHERE message_id = ?1 ORDER BY id"
    ))?;
    let records = find.query_map(params![batch.message_id], reply_record)?;
    let mut stored = Vec::new();
    for record in records {
        let reply = StoredReply::try_from(record?).map_err(|err| corrupt(err.to_string()))?;
        if batch
            .replies
            .iter()
            .any(|asked| asked.reply_type == reply.reply_type)
        {
            stored.push(reply);
        }
    }
    // In the order they were asked for, as a fresh reply set would be.
    stored.sort_by_key(|reply| {
        batch
            .replies
            .iter()
            .position(|asked| asked.reply_type == reply.reply_type)
    });
    Ok(stored)
}

/// A row of [`REPLY_COLUMNS`] as sqlx would read it: SQLite keeps its timestamps as RFC 3339
/// text.
fn reply_record(row: &rusqlite::Row<'_>) -> Result<ReplyRecord, rusqlite::Error> {
    Ok(ReplyRecord {
        id: row.get("id")?,
        message_id: row.get("message_id")?,
        seq: row.get("seq")?,
        reply_type: row.get("reply_type")?,
        content: row.get("content")?,
        filename: row.get("filename")?,
        mime_type: row.get("mime_type")?,
        fallback: row.get("fallback")?,
        delivery: row.get("delivery")?,
        created_at: parse_time(&row.get::<_, String>("created_at")?)?,
        delivered_at: row
            .get::<_, Option<String>>("delivered_at")?
            .as_deref()
            .map(parse_time)
            .transpose()?,
    })
}

/// The replies of a batch as they were just stored: consecutive ids and stream positions.
fn stored_replies(first_id: i64, first_seq: u64, batch: ReplyBatch) -> Vec<StoredReply> {
    let ReplyBatch {
        message_id,
        replies,
        created_at,
        ..
    } = batch;
    replies
        .into_iter()
        .zip(first_id..)
        .zip(first_seq..)
        .map(|((reply, id), seq)| reply.stored(id, message_id, seq, created_at))
        .collect()
}

/// A failed write as a store error. SQLite fails a write only for something on this machine
/// (a full disk, a locked or broken file): none of it is a connection to come back.
pub(super) fn write_error(err: &rusqlite::Error) -> StoreError {
    StoreError::Database(err.to_string())
}

fn parse_time(text: &str) -> Result<DateTime<Utc>, rusqlite::Error> {
    DateTime::parse_from_rfc3339(text)
        .map(|at| at.with_timezone(&Utc))
        .map_err(|err| corrupt(format!("bad timestamp {text:?}: {err}")))
}

fn corrupt(message: String) -> rusqlite::Error {
    rusqlite::Error::ToSqlConversionFailure(message.into())
}

/// Answers barriers when a batch is done, however `commit` returns.
#[cfg(test)]
struct BarrierGuard(Vec<oneshot::Sender<()>>);

#[cfg(test)]
impl Drop for BarrierGuard {
    fn drop(&mut self) {
        for done in self.0.drain(..) {
            respond(done, ());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;
    use crate::store::sqlite::{SqliteOptions, SqliteStore};

    const MIGRATIONS: [&str; 4] = [
        include_str!("../../../migrations/sqlite/20261121000001_init.sql"),
        include_str!("../../../migrations/sqlite/20261121000002_reply_fallback.sql"),
        include_str!("../../../migrations/sqlite/20261121000003_checks_as_comparisons.sql"),
        include_str!("../../../migrations/sqlite/20261201000004_reply_streams.sql"),
    ];

    /// Opcodes of `sql` as SQLite would run it on `conn`.
    fn opcodes(conn: &Connection, sql: &str) -> Vec<String> {
        let mut explain = conn.prepare(&format!("EXPLAIN {sql}")).expect("explains");
        let params = explain.parameter_count();
        let nulls = vec![rusqlite::types::Null; params];
        explain
            .query_map(rusqlite::params_from_iter(nulls), |row| {
                row.get::<_, String>(1)
            })
            .expect("runs")
            .collect::<Result<_, _>>()
            .expect("opcodes")
    }

    #[tokio::test]
    async fn no_write_builds_a_scratch_table() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SqliteStore::open(&dir.path().join("kaiwa.db"), SqliteOptions::default())
            .await
            .expect("opens");
        store.close().await;
        let conn = Connection::open(dir.path().join("kaiwa.db")).expect("opens");
        conn.execute_batch("PRAGMA foreign_keys = ON")
            .expect("pragma");
        // A CHECK (x IN (a, b, c)) fills a temporary b-tree per row (see migration 3); this is
        // what keeps such a constraint from coming back unnoticed.
        for sql in [
            INSERT_MESSAGE,
            FIND_MESSAGE,
            INSERT_REPLY,
            MARK_REPLIED,
            RECORD_DELIVERY,
            RECORD_RECEIVED,
            ACKNOWLEDGED,
            RECORD_ACKNOWLEDGED,
            RECORD_DEPARTURE,
            LATEST_SEQ,
        ] {
            let ops = opcodes(&conn, sql);
            assert!(
                !ops.iter().any(|op| op == "OpenEphemeral"),
                "{sql} opens a scratch table: {ops:?}"
            );
        }
    }

    #[test]
    fn existing_replies_are_numbered_per_client_in_the_order_they_were_stored() {
        let conn = Connection::open_in_memory().expect("opens");
        conn.execute_batch("PRAGMA foreign_keys = ON")
            .expect("pragma");
        for migration in &MIGRATIONS[..3] {
            conn.execute_batch(migration).expect("migrates");
        }
        conn.execute_batch(
            "INSERT INTO messages (id, client_id, message_type, content, timezone, status, \
                 received_at) \
             VALUES (1, 'a', 'image', 'x', 'UTC', 'replied', 't'), \
                    (2, 'b', 'text', 'y', 'UTC', 'replied', 't'), \
                    (3, 'a', 'text', 'z', 'UTC', 'replied', 't'); \
             INSERT INTO replies (id, message_id, client_id, reply_type, content, delivery, \
                 created_at) \
             VALUES (10, 1, 'a', 'text', '', 'delivered', 't'), \
                    (11, 1, 'a', 'voice', '', 'failed', 't'), \
                    (12, 2, 'b', 'text', '', 'delivered', 't'), \
                    (13, 1, 'a', 'image', '', 'failed', 't'), \
                    (14, 3, 'a', 'text', '', 'pending', 't');",
        )
        .expect("rows");
        conn.execute_batch(&format!("BEGIN; {} COMMIT;", MIGRATIONS[3]))
            .expect("migrates");
        let mut numbered = conn
            .prepare("SELECT id, client_id, seq FROM replies ORDER BY id")
            .expect("prepares");
        let rows: Vec<(i64, String, i64)> = numbered
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
            .expect("runs")
            .collect::<Result<_, _>>()
            .expect("rows");
        assert_eq!(
            rows,
            [
                (10, "a".into(), 1),
                (11, "a".into(), 2),
                (12, "b".into(), 1),
                (13, "a".into(), 3),
                (14, "a".into(), 4)
            ]
        );
        // Acknowledgements read only what is not acknowledged yet.
        // What was recorded delivered counts as acknowledged.
        let acknowledged: Vec<(String, i64)> = conn
            .prepare("SELECT client_id, acknowledged FROM reply_streams ORDER BY client_id")
            .expect("prepares")
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
            .expect("runs")
            .collect::<Result<_, _>>()
            .expect("rows");
        assert_eq!(acknowledged, [("a".into(), 1), ("b".into(), 1)]);
        // An acknowledgement reads the client's range of the stream, not all of it.
        let plan: Vec<String> = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {RECORD_RECEIVED}"))
            .expect("explains")
            .query_map(rusqlite::params!["a", 3, 1, "t"], |row| {
                row.get::<_, String>(3)
            })
            .expect("runs")
            .collect::<Result<_, _>>()
            .expect("plan");
        assert!(
            plan.iter()
                .any(|step| step.contains("replies_client_seq (client_id=? AND seq>? AND seq<?)")),
            "{plan:?}"
        );
    }

    #[test]
    fn rebuilding_the_tables_keeps_every_row_and_every_rule() {
        let conn = Connection::open_in_memory().expect("opens");
        conn.execute_batch("PRAGMA foreign_keys = ON")
            .expect("pragma");
        for migration in &MIGRATIONS[..2] {
            conn.execute_batch(migration).expect("migrates");
        }
        conn.execute_batch(
            "INSERT INTO messages (id, client_id, client_msg_id, message_type, content, \
                 timezone, status, received_at) \
             VALUES (1, 'a', 'm1', 'text', 'hi', 'UTC', 'replied', 't'), \
                    (2, 'a', NULL, 'voice', 'media/voices/x.wav', 'UTC', 'accepted', 't'); \
             INSERT INTO replies (id, message_id, client_id, reply_type, content, delivery, \
                 created_at, fallback) \
             VALUES (7, 1, 'a', 'text', 'hello', 'failed', 't', 1);",
        )
        .expect("rows");
        let scratch = |conn: &Connection| {
            opcodes(conn, INSERT_MESSAGE)
                .iter()
                .any(|op| op == "OpenEphemeral")
        };
        assert!(scratch(&conn), "the old checks build a scratch table");
        // As sqlx runs it: in a transaction, foreign keys on.
        conn.execute_batch(&format!("BEGIN; {} COMMIT;", MIGRATIONS[2]))
            .expect("rebuilds");

        assert!(!scratch(&conn), "the new ones do not");

        let count = |sql: &str| -> i64 { conn.query_row(sql, [], |row| row.get(0)).expect(sql) };
        assert_eq!(count("SELECT COUNT(*) FROM messages"), 2);
        assert_eq!(
            count(
                "SELECT COUNT(*) FROM replies WHERE id = 7 AND delivery = 'failed' AND fallback = 1"
            ),
            1
        );
        assert_eq!(
            count("SELECT COUNT(*) FROM sqlite_schema WHERE name LIKE '%_old'"),
            0
        );
        assert_eq!(
            count("SELECT COUNT(*) FROM sqlite_schema WHERE type = 'index' AND sql IS NOT NULL"),
            5,
            "every index is back"
        );
        for bad in [
            "INSERT INTO replies (message_id, client_id, reply_type, content, created_at) \
                 VALUES (1, 'a', 'video', 'x', 't')",
            "INSERT INTO replies (message_id, client_id, reply_type, content, created_at) \
                 VALUES (99, 'a', 'text', 'x', 't')",
            "UPDATE messages SET status = 'lost' WHERE id = 1",
            "UPDATE messages SET message_type = 'gif' WHERE id = 1",
            "UPDATE replies SET delivery = 'maybe' WHERE id = 7",
            "UPDATE replies SET fallback = 2 WHERE id = 7",
            "INSERT INTO messages (client_id, client_msg_id, message_type, content, timezone, \
                 status, received_at) VALUES ('a', 'm1', 'text', 'again', 'UTC', 'accepted', 't')",
        ] {
            assert!(conn.execute(bad, []).is_err(), "allowed: {bad}");
        }
    }
}
