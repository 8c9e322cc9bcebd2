//! Processing: takes jobs from the queue, waits out each message's reply delay (R9), makes its
//! replies, stores them and reports them back through the queue.

use crate::clock::Clock;
use crate::queue::{Event, Job, MessageRef, Queue, QueueError};
use crate::replies::{Deltas, ReplyMaker};
use crate::store::{NewReply, Store};
use futures::{FutureExt, StreamExt};
use kaiwa_protocol::MessageType;
use rand::RngExt;
use std::ops::Range;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The random delay before a message's reply set (R9), scaled; 0 turns delays off.
#[derive(Debug, Clone, Copy)]
pub struct Delays {
    scale: f64,
}

impl Delays {
    pub fn new(scale: f64) -> Self {
        Self { scale }
    }

    /// The unscaled range, in seconds.
    fn range(kind: MessageType) -> Range<f64> {
        match kind {
            MessageType::Text => 0.0..1.0,
            MessageType::Voice => 1.0..2.0,
            MessageType::Video | MessageType::Image => 2.0..3.0,
        }
    }

    pub fn pick(&self, kind: MessageType) -> Duration {
        if self.scale == 0.0 {
            return Duration::ZERO;
        }
        let seconds = rand::rng().random_range(Self::range(kind));
        Duration::from_secs_f64(seconds * self.scale)
    }
}

pub struct Worker {
    store: Arc<dyn Store>,
    queue: Arc<dyn Queue>,
    replies: ReplyMaker,
    delays: Delays,
    clock: Arc<dyn Clock>,
}

impl Worker {
    pub fn new(
        store: Arc<dyn Store>,
        queue: Arc<dyn Queue>,
        replies: ReplyMaker,
        delays: Delays,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            store,
            queue,
            replies,
            delays,
            clock,
        }
    }

    /// Takes jobs until `stop` is cancelled, processing each in its own task on `tracker`.
    /// Concurrency needs no bound of its own here: every job holds an in-flight slot.
    ///
    /// `stop` also abandons jobs still waiting out their delay: shutdown cancels it once the
    /// grace period is over, and those messages stay `accepted`, to be processed on restart.
    pub async fn run(
        self,
        stop: CancellationToken,
        tracker: TaskTracker,
    ) -> Result<(), QueueError> {
        let mut jobs = self.queue.jobs()?;
        let worker = Arc::new(self);
        tracing::info!(
            responder = worker.replies.responder_name(),
            "worker started"
        );
        loop {
            let job = tokio::select! {
                biased;
                () = stop.cancelled() => break,
                job = jobs.next() => match job {
                    Some(job) => job,
                    None => break,
                },
            };
            let worker = worker.clone();
            let stop = stop.clone();
            tracker.spawn(async move {
                let message = MessageRef::from(&job);
                // A panic must not leave the message's in-flight slot held for good: report
                // the message failed, which frees it; the message stays accepted for a restart.
                if AssertUnwindSafe(worker.process(job, stop))
                    .catch_unwind()
                    .await
                    .is_err()
                {
                    tracing::error!(message_id = message.message_id, "processing panicked");
                    worker
                        .publish(Event::Failed {
                            message,
                            reason:
                                "processing failed; the message is kept and will be processed again"
                                    .to_owned(),
                        })
                        .await;
                }
            });
        }
        tracing::info!("worker stopped taking jobs");
        Ok(())
    }

    async fn process(&self, job: Job, stop: CancellationToken) {
        let message = MessageRef::from(&job);
        self.publish(Event::Processing(message.clone())).await;
        // The text is written while the delay runs (a model's latency then overlaps it); its
        // pieces wait in `pieces` until the delay is over (R9).
        let (deltas, mut pieces) = Deltas::channel();
        let text = self.replies.text(&job, self.clock.now(), &deltas);
        tokio::pin!(text);
        // A timer, not a thread: thousands of messages can wait at once (R9).
        let delay = tokio::time::sleep(self.delays.pick(job.kind));
        tokio::pin!(delay);
        let mut written = None;
        loop {
            tokio::select! {
                () = stop.cancelled() => return abandon(&job),
                () = &mut delay => break,
                reply = &mut text, if written.is_none() => written = Some(reply),
            }
        }
        let media = self.replies.media(&job);
        if let Some(text) = written {
            // The usual case: the whole set at once, in order.
            let replies = std::iter::once(text).chain(media).collect();
            self.store_and_publish(&job, &message, replies, true).await;
            return;
        }
        // The text is still being written: a slow responder must not hold back the voice and
        // image replies, so they go first, and the text follows as it grows.
        if !media.is_empty() && !self.store_and_publish(&job, &message, media, false).await {
            return;
        }
        let text = loop {
            tokio::select! {
                () = stop.cancelled() => return abandon(&job),
                reply = &mut text => break reply,
                Some(mut delta) = pieces.recv() => {
                    // Whatever piled up goes out as one frame.
                    while let Ok(more) = pieces.try_recv() {
                        delta.push_str(&more);
                    }
                    self.publish(Event::Delta { message: message.clone(), delta }).await;
                }
            }
        };
        self.store_and_publish(&job, &message, vec![text], true)
            .await;
    }

    /// Stores replies and reports each; `completes` marks the end of the message's reply set.
    /// False if they could not be stored (the message is then reported failed).
    async fn store_and_publish(
        &self,
        job: &Job,
        message: &MessageRef,
        replies: Vec<NewReply>,
        completes: bool,
    ) -> bool {
        let stored = self
            .store
            .insert_replies(
                job.message_id,
                &job.client_id,
                replies,
                self.clock.now(),
                completes,
            )
            .await;
        match stored {
            Ok(stored) => {
                if completes {
                    metrics::counter!("kaiwa_messages_processed_total", "type" => job.kind.as_str())
                        .increment(1);
                    tracing::debug!(message_id = job.message_id, kind = %job.kind, "message processed");
                }
                let count = stored.len();
                for (index, reply) in stored.into_iter().enumerate() {
                    self.publish(Event::Reply {
                        message: message.clone(),
                        reply,
                        last: completes && index + 1 == count,
                    })
                    .await;
                }
                true
            }
            Err(err) => {
                tracing::error!(message_id = job.message_id, %err, "could not store the replies; the sweeper queues the message again");
                self.publish(Event::Failed {
                    message: message.clone(),
                    reason: "the replies could not be stored; the message is kept and will be processed again".to_owned(),
                })
                .await;
                false
            }
        }
    }

    async fn publish(&self, event: Event) {
        let message_id = event.message().message_id;
        if let Err(err) = self.queue.publish_event(event).await {
            tracing::warn!(message_id, %err, "could not report a message event");
        }
    }
}

fn abandon(job: &Job) {
    tracing::info!(
        message_id = job.message_id,
        "processing abandoned at shutdown; the message is processed again on the next start"
    );
}
