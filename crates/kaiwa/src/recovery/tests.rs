//! The sweepers on tokio's paused clock, over the in-memory store and queue.

use super::*;
use crate::admission::{InFlight, SlotEnds};
use crate::config::ServeConfig;
use crate::queue::{MemoryQueue, Taken};
use crate::store::{DiskMedia, Inserted, MemoryStore, NewMessage};
use futures::StreamExt;
use futures::stream::BoxStream;
use std::sync::Mutex;

const AFTER: Duration = Duration::from_secs(8);

fn message(text: &str) -> NewMessage {
    crate::testing::accepted_text("alice", None, text)
}

struct Alone {
    store: Arc<MemoryStore>,
    admission: Arc<Admission>,
    jobs: BoxStream<'static, Taken>,
    _dir: tempfile::TempDir,
}

impl Alone {
    fn new() -> Self {
        let config = ServeConfig::from_args(&[] as &[&str]).expect("defaults");
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = Arc::new(MemoryStore::default());
        let queue = Arc::new(MemoryQueue::new(16));
        let jobs = queue.jobs().expect("the jobs");
        let admission = Arc::new(Admission::new(
            config.content,
            config.windows,
            InFlight::new(16, SlotEnds::AtLastReply),
            Duration::ZERO,
            store.clone(),
            Arc::new(DiskMedia::open(&dir.path().join("media")).expect("media folders")),
            queue,
        ));
        Self {
            store,
            admission,
            jobs,
            _dir: dir,
        }
    }

    /// An accepted message that no worker has: its job was lost.
    async fn stuck(&self, text: &str) -> i64 {
        match self.store.insert_message(message(text)).await {
            Ok(Inserted::New(id)) => id,
            other => panic!("not stored: {other:?}"),
        }
    }

    fn sweeper(&self, unfinished: Vec<StoredMessage>) -> Sweeper {
        Sweeper::new(
            self.admission.clone(),
            self.store.clone(),
            AFTER,
            unfinished,
        )
    }

    async fn next_job(&mut self) -> Job {
        let taken = self.jobs.next().await.expect("a job");
        taken.job.clone()
    }
}

#[tokio::test(start_paused = true)]
async fn a_stuck_message_is_queued_again_once_seen_stuck_for_long_enough() {
    let mut alone = Alone::new();
    let id = alone.stuck("lost").await;
    let mut sweeper = alone.sweeper(Vec::new());
    let stop = CancellationToken::new();

    assert_eq!(
        sweeper.sweep(&stop).await.expect("swept"),
        0,
        "first seen now"
    );
    tokio::time::advance(AFTER - Duration::from_millis(1)).await;
    assert_eq!(sweeper.sweep(&stop).await.expect("swept"), 0, "not yet");
    tokio::time::advance(Duration::from_millis(1)).await;
    assert_eq!(sweeper.sweep(&stop).await.expect("swept"), 1);
    let job = alone.next_job().await;
    assert_eq!((job.message_id, job.requeued), (id, true));
    assert!(alone.admission.in_flight.holds(id), "it holds a slot again");

    // Being processed: left alone, however long it takes.
    tokio::time::advance(AFTER * 10).await;
    assert_eq!(sweeper.sweep(&stop).await.expect("swept"), 0);
}

#[tokio::test(start_paused = true)]
async fn a_message_that_keeps_failing_waits_twice_as_long_each_time() {
    let mut alone = Alone::new();
    let id = alone.stuck("fails").await;
    let mut sweeper = alone.sweeper(Vec::new());
    let stop = CancellationToken::new();
    sweeper.sweep(&stop).await.expect("swept");
    tokio::time::advance(AFTER).await;
    assert_eq!(sweeper.sweep(&stop).await.expect("swept"), 1);
    alone.next_job().await;

    // Its processing fails: the slot goes, the message stays accepted.
    assert!(alone.admission.in_flight.release(id));
    tokio::time::advance(AFTER).await;
    assert_eq!(
        sweeper.sweep(&stop).await.expect("swept"),
        0,
        "the second wait is 2×"
    );
    tokio::time::advance(AFTER).await;
    assert_eq!(sweeper.sweep(&stop).await.expect("swept"), 1);
    assert_eq!(alone.next_job().await.message_id, id);
}

#[tokio::test(start_paused = true)]
async fn what_the_last_run_left_unfinished_is_queued_at_once() {
    let mut alone = Alone::new();
    let id = alone.stuck("left over").await;
    let unfinished = alone.store.unfinished_messages().await.expect("read");
    let stop = CancellationToken::new();
    let running = tokio::spawn(Box::new(alone.sweeper(unfinished)).run(stop.clone()));

    let job = alone.next_job().await;
    assert_eq!((job.message_id, job.requeued), (id, true));
    assert!(alone.admission.in_flight.holds(id));
    stop.cancel();
    running.await.expect("the sweeper stops");
}

/// Claims handed out from a list, as the shared database would, once each.
#[derive(Default)]
struct Claims {
    stuck: Mutex<Vec<StoredMessage>>,
    orphaned: Mutex<Vec<StoredMessage>>,
    left: Mutex<Vec<StoredMessage>>,
}

#[async_trait]
impl StuckClaims for Claims {
    async fn claim_stuck(&self, _: Duration, _: u32) -> Result<Vec<StoredMessage>, StoreError> {
        Ok(std::mem::take(
            &mut *self.stuck.lock().expect("not poisoned"),
        ))
    }

    async fn claim_orphaned(&self, _: u32) -> Result<Vec<StoredMessage>, StoreError> {
        Ok(std::mem::take(
            &mut *self.orphaned.lock().expect("not poisoned"),
        ))
    }

    async fn claim_left_by(
        &self,
        _: &GatewayId,
        _: DateTime<Utc>,
        _: u32,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        Ok(std::mem::take(
            &mut *self.left.lock().expect("not poisoned"),
        ))
    }
}

#[tokio::test]
async fn the_cluster_sweeper_queues_what_it_claimed_marked_as_queued_again() {
    let claims = Arc::new(Claims::default());
    claims.stuck.lock().expect("not poisoned").extend([
        StoredMessage::new(1, message("a")),
        StoredMessage::new(2, message("b")),
    ]);
    claims
        .orphaned
        .lock()
        .expect("not poisoned")
        .push(StoredMessage::new(3, message("c")));
    let queue = Arc::new(MemoryQueue::new(8));
    let mut jobs = queue.jobs().expect("the jobs");
    let sweeper = ClusterSweeper::new(claims, queue, AFTER);

    assert_eq!(sweeper.sweep().await.expect("swept"), 2);
    assert_eq!(sweeper.sweep_orphans().await.expect("swept"), 1);
    assert_eq!(sweeper.sweep().await.expect("swept"), 0, "claimed once");
    for expected in 1..=3 {
        let taken = jobs.next().await.expect("a job");
        assert_eq!((taken.job.message_id, taken.job.requeued), (expected, true));
    }
}

#[tokio::test]
async fn a_job_the_queue_does_not_take_fails_the_pass() {
    let claims = Arc::new(Claims::default());
    claims
        .stuck
        .lock()
        .expect("not poisoned")
        .push(StoredMessage::new(1, message("a")));
    let queue = Arc::new(MemoryQueue::new(8));
    // Nobody will ever take a job: the queue is closed.
    drop(queue.jobs().expect("the jobs"));
    let sweeper = ClusterSweeper::new(claims, queue, AFTER);
    assert!(matches!(
        sweeper.sweep().await,
        Err(RecoveryError::Queue(_))
    ));
}
