//! The ends of clients' reply streams, read in batches: every native connection reads where its
//! stream ends before it is welcomed, and a storm of 50,000 connections made that 50,000 round
//! trips on the read pool, twice presence's, and the pool's longest waits. Reads that wait
//! together go as one statement instead, as the claims of the same connections do, run on the
//! reads' thread; the task that answers them stays with the connections' tasks.

use crate::db_thread::run_on;
use crate::store::{StoreError, is_outage, non_negative};
use sqlx::PgPool;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::runtime::Handle;
use tokio::sync::{Semaphore, mpsc, oneshot};

/// Client ids read by one statement, at most.
const MAX_BATCH: usize = 2048;

/// Statements in flight at once. More than one, so that a slow statement (a starved core in a
/// storm) holds back only the connections in its batch; few, so that the reads that wait meanwhile
/// gather into the next.
const IN_FLIGHT: usize = 2;

/// How long one statement may take. Nothing else bounds it, and while two hang every admission
/// would wait behind them with its client slots held: past this, the batch is answered as an
/// outage (the clients are refused and come back), and the turn is free again.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

type Answer = oneshot::Sender<Result<u64, StoreError>>;

/// The sending side, kept by the store; the task that reads ends when the store is dropped.
pub(super) struct StreamEnds {
    /// Unbounded because each request is a connection being admitted, which holds a client
    /// slot: the client limit bounds it.
    requests: mpsc::UnboundedSender<(String, Answer)>,
}

impl StreamEnds {
    /// Starts the task that reads in batches, its statements run on `thread`.
    pub(super) fn spawn(thread: Handle, pool: PgPool) -> Self {
        Self::spawn_with(thread, pool, READ_TIMEOUT)
    }

    fn spawn_with(thread: Handle, pool: PgPool, timeout: Duration) -> Self {
        let (requests, waiting) = mpsc::unbounded_channel();
        tokio::spawn(read_in_batches(thread, pool, waiting, timeout));
        Self { requests }
    }

    /// The `seq` of the client's latest reply, 0 for none, as committed when it is asked for:
    /// a batch's statement starts after every request in it was made.
    pub(super) async fn latest(&self, client_id: &str) -> Result<u64, StoreError> {
        let (answer, answered) = oneshot::channel();
        self.requests
            .send((client_id.to_owned(), answer))
            .map_err(|_| StoreError::Closed)?;
        answered.await.map_err(|_| StoreError::Closed)?
    }
}

async fn read_in_batches(
    thread: Handle,
    pool: PgPool,
    mut waiting: mpsc::UnboundedReceiver<(String, Answer)>,
    timeout: Duration,
) {
    let turns = Arc::new(Semaphore::new(IN_FLIGHT));
    loop {
        // The turn first: requests keep gathering while every statement is in flight.
        let Ok(turn) = turns.clone().acquire_owned().await else {
            return;
        };
        let mut batch = Vec::new();
        if waiting.recv_many(&mut batch, MAX_BATCH).await == 0 {
            return;
        }
        let (thread, pool) = (thread.clone(), pool.clone());
        tokio::spawn(async move {
            answer(&thread, pool, batch, timeout).await;
            drop(turn);
        });
    }
}

async fn answer(thread: &Handle, pool: PgPool, batch: Vec<(String, Answer)>, timeout: Duration) {
    let ids: Vec<String> = batch.iter().map(|(id, _)| id.clone()).collect();
    let ends = run_on(thread, async move {
        match read(&pool, &ids, timeout).await {
            // One connection that broke (a failover, a restart) would otherwise refuse every
            // connection of the batch; the pool opens another. A statement that hung is not
            // made again: the next would likely hang too, and the connections have waited long
            // enough.
            Err(Failed::Sql(err)) if is_outage(&err) => read(&pool, &ids, timeout).await,
            other => other,
        }
        .map_err(|failed| match failed {
            Failed::Sql(err) => StoreError::from(err),
            Failed::TimedOut => StoreError::Unavailable(format!(
                "reading where {} reply streams end took over {} ms",
                ids.len(),
                timeout.as_millis()
            )),
        })
    })
    .await;
    for (client_id, answer) in batch {
        let end = match &ends {
            Ok(ends) => ends.get(&client_id).map_or_else(
                || {
                    Err(StoreError::Corrupt(format!(
                        "no stream end read for {client_id}"
                    )))
                },
                |&seq| non_negative("reply seq", seq),
            ),
            Err(err) => Err(err.clone()),
        };
        // The connection may have stopped waiting.
        let _ = answer.send(end);
    }
}

enum Failed {
    Sql(sqlx::Error),
    TimedOut,
}

/// The ends of the streams of `ids`, by id.
async fn read(
    pool: &PgPool,
    ids: &[String],
    timeout: Duration,
) -> Result<HashMap<String, i64>, Failed> {
    let started = Instant::now();
    // Each end from the end of the stream's index, one id at a time; the same id twice in a
    // batch is read twice, which is harmless.
    let read = sqlx::query_as::<_, (String, i64)>(
        "SELECT c.client_id, COALESCE((SELECT r.seq FROM replies AS r \
             WHERE r.client_id = c.client_id ORDER BY r.seq DESC LIMIT 1), 0) \
         FROM UNNEST($1::text[]) AS c(client_id)",
    )
    .bind(ids)
    .fetch_all(pool);
    let rows = tokio::time::timeout(timeout, read).await;
    metrics::histogram!("kaiwa_store_stream_ends_seconds").record(started.elapsed().as_secs_f64());
    match rows {
        Ok(rows) => Ok(rows.map_err(Failed::Sql)?.into_iter().collect()),
        Err(_) => Err(Failed::TimedOut),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::PgStore;
    use crate::store::contract::test_postgres::TestDatabase;
    use sqlx::Connection;

    /// A statement that never ends (here: behind a lock no one gives back) must not take the
    /// turns with it: each read is answered as an outage in time, and reads go on once the
    /// database does.
    #[tokio::test]
    async fn a_statement_that_hangs_is_answered_as_an_outage_and_gives_its_turn_back() {
        let database = TestDatabase::create().await;
        PgStore::migrate(&database.url).await.expect("migrated");
        let pool = PgPool::connect(&database.url).await.expect("a pool");
        let ends = StreamEnds::spawn_with(
            tokio::runtime::Handle::current(),
            pool,
            Duration::from_millis(200),
        );
        let mut holder = database.connect().await;
        let mut lock = holder.begin().await.expect("a transaction");
        sqlx::query("LOCK TABLE replies IN ACCESS EXCLUSIVE MODE")
            .execute(&mut *lock)
            .await
            .expect("locked");

        let within = Duration::from_secs(20);
        // More reads than there are turns, one after the other.
        for read in 0..=IN_FLIGHT {
            let answered = tokio::time::timeout(within, ends.latest("ann")).await;
            assert!(
                matches!(answered, Ok(Err(StoreError::Unavailable(_)))),
                "read {read}: {answered:?}"
            );
        }
        lock.rollback().await.expect("unlocked");
        let answered = tokio::time::timeout(within, ends.latest("ann")).await;
        assert!(matches!(answered, Ok(Ok(0))), "{answered:?}");
    }
}
