//! The ends of clients' reply streams, read in batches: every native connection reads where its
//! stream ends before it is welcomed, and a storm of 50,000 connections made that 50,000 round
//! trips on the read pool, twice presence's, and the pool's longest waits. Reads that wait
//! together go as one statement instead, as the claims of the same connections do.

use crate::store::{StoreError, non_negative};
use sqlx::PgPool;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{Semaphore, mpsc, oneshot};

/// Client ids read by one statement, at most.
const MAX_BATCH: usize = 2048;

/// Statements in flight at once. More than one, so that a slow statement (a starved core in a
/// storm) holds back only the connections in its batch; few, so that the reads that wait meanwhile
/// gather into the next.
const IN_FLIGHT: usize = 2;

type Answer = oneshot::Sender<Result<u64, StoreError>>;

/// The sending side, kept by the store; the task that reads ends when the store is dropped.
pub(super) struct StreamEnds {
    /// Unbounded because each request is a connection being admitted, which holds a client
    /// slot: the client limit bounds it.
    requests: mpsc::UnboundedSender<(String, Answer)>,
}

impl StreamEnds {
    pub(super) fn spawn(pool: PgPool) -> Self {
        let (requests, waiting) = mpsc::unbounded_channel();
        tokio::spawn(read_in_batches(pool, waiting));
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

async fn read_in_batches(pool: PgPool, mut waiting: mpsc::UnboundedReceiver<(String, Answer)>) {
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
        let pool = pool.clone();
        tokio::spawn(async move {
            answer(&pool, batch).await;
            drop(turn);
        });
    }
}

async fn answer(pool: &PgPool, batch: Vec<(String, Answer)>) {
    let started = Instant::now();
    let ids: Vec<&str> = batch.iter().map(|(id, _)| id.as_str()).collect();
    // Each end from the end of the stream's index, one id at a time; the same id twice in a
    // batch is read twice, which is harmless.
    let ends: Result<Vec<(String, i64)>, _> = sqlx::query_as(
        "SELECT c.client_id, COALESCE((SELECT r.seq FROM replies AS r \
             WHERE r.client_id = c.client_id ORDER BY r.seq DESC LIMIT 1), 0) \
         FROM UNNEST($1::text[]) AS c(client_id)",
    )
    .bind(&ids)
    .fetch_all(pool)
    .await;
    metrics::histogram!("kaiwa_store_stream_ends_seconds").record(started.elapsed().as_secs_f64());
    let ends: Result<HashMap<String, i64>, StoreError> = ends
        .map(|rows| rows.into_iter().collect())
        .map_err(StoreError::from);
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
