//! Processing: takes jobs from the queue, waits out each message's reply delay (R9), makes its
//! replies, stores them and reports them through the queue to the gateway that holds the
//! client now. A job is done only once its replies are stored and reported: a worker that dies
//! before leaves it to another, which finds the stored replies and reports those.

use crate::clock::Clock;
use crate::domain::GatewayId;
use crate::presence::{self, Presence};
use crate::queue::{Event, Job, MessageRef, Queue, QueueError, Taken};
use crate::replies::{Deltas, ReplyMaker};
use crate::store::{NewReply, Store, StoreError, StoredReply};
use futures::{FutureExt, StreamExt};
use kaiwa_protocol::MessageStatus;
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
    /// Where each client is now, so that its replies go to its gateway.
    presence: Arc<dyn Presence>,
    replies: ReplyMaker,
    delays: Delays,
    clock: Arc<dyn Clock>,
}

impl Worker {
    pub fn new(
        store: Arc<dyn Store>,
        queue: Arc<dyn Queue>,
        presence: Arc<dyn Presence>,
        replies: ReplyMaker,
        delays: Delays,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            store,
            queue,
            presence,
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
            let taken = tokio::select! {
                biased;
                () = stop.cancelled() => break,
                taken = jobs.next() => match taken {
                    Some(taken) => taken,
                    None => break,
                },
            };
            let worker = worker.clone();
            let stop = stop.clone();
            tracker.spawn(async move { worker.take(taken, stop).await });
        }
        tracing::info!("worker stopped taking jobs");
        Ok(())
    }

    /// Processes one job, and tells the queue it is done unless it was abandoned at shutdown
    /// (then it goes to another worker, or to the next start).
    async fn take(&self, taken: Taken, stop: CancellationToken) {
        let message = MessageRef::from(&taken.job);
        let mut route = Route::new(taken.job.origin.clone(), stop.clone());
        let finished = match AssertUnwindSafe(self.process(&taken, &mut route, stop))
            .catch_unwind()
            .await
        {
            Ok(finished) => finished,
            Err(_) => {
                // A panic must not leave the message's in-flight slot held for good: reporting
                // it failed frees it, and the sweeper queues the message again.
                tracing::error!(message_id = message.message_id, "processing panicked");
                // A panic amid routing the `processing` event can leave no gateway named: the
                // one that admitted the message is where its slot is held.
                if route.gateway.is_none() {
                    route.gateway = taken.job.origin.clone();
                }
                let failed = Event::Failed {
                    message: message.clone(),
                    reason: "processing failed; the message is kept and will be processed again"
                        .to_owned(),
                };
                self.report(&mut route, vec![failed]).await;
                Finished::Done
            }
        };
        if finished == Finished::Done
            && let Err(err) = taken.done().await
        {
            // The queue hands the job out again; its stored replies are reported again.
            tracing::warn!(message_id = message.message_id, %err, "could not tell the queue a job is done");
        }
    }

    async fn process(&self, taken: &Taken, route: &mut Route, stop: CancellationToken) -> Finished {
        let job = &taken.job;
        let message = MessageRef::from(job);
        if taken.redelivered || job.requeued {
            // A worker may have stored the replies and died before it was done: those stand.
            match self.store.message(job.message_id).await {
                Ok(Some(stored)) if stored.status == MessageStatus::Replied => {
                    tracing::info!(
                        message_id = job.message_id,
                        "replies found stored; reporting them again"
                    );
                    return self
                        .report_replies(route, &message, stored.replies, true, None)
                        .await;
                }
                Ok(Some(_)) => {}
                Ok(None) => {
                    tracing::error!(
                        message_id = job.message_id,
                        "a job for a message that is not stored"
                    );
                    return Finished::Done;
                }
                Err(err) => {
                    tracing::warn!(message_id = job.message_id, %err, "could not look for stored replies; processing");
                }
            }
        }
        // The text is written while the delay runs (a model's latency then overlaps it); its
        // pieces wait in `pieces` until the delay is over (R9).
        let (deltas, mut pieces) = Deltas::channel();
        let text = self.replies.text(job, self.clock.now(), &deltas);
        tokio::pin!(text);
        // A timer, not a thread: thousands of messages can wait at once (R9).
        let delay = tokio::time::sleep(self.delays.pick(job.kind));
        tokio::pin!(delay);
        let processing = Event::Processing(message.clone());
        // The `processing` event waits a moment for the replies. Made and stored by then (no
        // reply delay, a quick responder), it goes to the gateway with them, in one message;
        // otherwise it goes alone while they are made and stored, and what waits for its
        // confirm is only the events after it, which keep its order.
        let (made, processing) = {
            let made = async {
                let mut written = None;
                loop {
                    // A text ready when the delay is over is taken: with no delay, both are
                    // ready at the first poll, and a delay polled first would leave the text
                    // to the slow path and the `processing` event to go alone.
                    tokio::select! {
                        biased;
                        () = stop.cancelled() => return Made::Stopped,
                        reply = &mut text, if written.is_none() => written = Some(reply),
                        () = &mut delay => break,
                    }
                }
                // The usual case: the whole set at once, in order.
                let Some(text) = written else {
                    return Made::TextPending;
                };
                let replies = std::iter::once(text)
                    .chain(self.replies.media(job))
                    .collect();
                match self.store_replies(job, replies, true, &stop).await {
                    Some(stored) => Made::Stored(stored),
                    None => Made::Stopped,
                }
            };
            tokio::pin!(made);
            tokio::select! {
                made = &mut made => (made, Some(processing)),
                () = tokio::time::sleep(PROCESSING_WAIT) => {
                    let (_, made) = tokio::join!(self.report(route, vec![processing]), made);
                    (made, None)
                }
            }
        };
        match made {
            Made::Stopped => return abandon(job),
            Made::Stored(stored) => {
                return self
                    .reported(job, route, &message, Some(stored), true, processing)
                    .await;
            }
            Made::TextPending => {
                if let Some(processing) = processing {
                    self.report(route, vec![processing]).await;
                }
            }
        }
        let media = self.replies.media(job);
        // The text is still being written: a slow responder must not hold back the voice and
        // image replies, so they go first, and the text follows as it grows.
        if !media.is_empty() {
            let first = self
                .store_and_report(job, route, &message, media, false)
                .await;
            if first != Finished::Done {
                return first;
            }
        }
        let text = loop {
            tokio::select! {
                () = stop.cancelled() => return abandon(job),
                reply = &mut text => break reply,
                Some(mut delta) = pieces.recv() => {
                    // Whatever piled up goes out as one frame.
                    while let Ok(more) = pieces.try_recv() {
                        delta.push_str(&more);
                    }
                    self.report(route, vec![Event::Delta { message: message.clone(), delta }]).await;
                }
            }
        };
        self.store_and_report(job, route, &message, vec![text], true)
            .await
    }

    /// Stores replies and reports each; `completes` marks the end of the message's reply set.
    /// An outage of the database is waited out (the client sees a delay, not a failure); any
    /// other failure to store is reported, and the sweeper retries the message later. A failure
    /// to report is not done: the queue hands the job out again.
    async fn store_and_report(
        &self,
        job: &Job,
        route: &mut Route,
        message: &MessageRef,
        replies: Vec<NewReply>,
        completes: bool,
    ) -> Finished {
        let stored = self
            .store_replies(job, replies, completes, &route.stop)
            .await;
        self.reported(job, route, message, stored, completes, None)
            .await
    }

    /// Reports replies as they were stored (`None`: stopped first), or that they could not be.
    async fn reported(
        &self,
        job: &Job,
        route: &mut Route,
        message: &MessageRef,
        stored: Option<Result<Vec<StoredReply>, StoreError>>,
        completes: bool,
        first: Option<Event>,
    ) -> Finished {
        let Some(stored) = stored else {
            return abandon(job);
        };
        match stored {
            Ok(stored) => {
                if completes {
                    metrics::counter!("kaiwa_messages_processed_total", "type" => job.kind.as_str())
                        .increment(1);
                    tracing::debug!(message_id = job.message_id, kind = %job.kind, "message processed");
                }
                self.report_replies(route, message, stored, completes, first)
                    .await
            }
            Err(err) => {
                tracing::error!(message_id = job.message_id, %err, "could not store the replies; the sweeper queues the message again");
                let failed = Event::Failed {
                    message: message.clone(),
                    reason: "the replies could not be stored; the message is kept and will be processed again".to_owned(),
                };
                self.report(route, first.into_iter().chain([failed]).collect())
                    .await;
                Finished::Done
            }
        }
    }

    /// Stores a message's replies, trying again while the database is unreachable; `None` if
    /// `stop` came first.
    async fn store_replies(
        &self,
        job: &Job,
        replies: Vec<NewReply>,
        completes: bool,
        stop: &CancellationToken,
    ) -> Option<Result<Vec<StoredReply>, StoreError>> {
        let mut retry = STORE_RETRY;
        loop {
            let stored = self
                .store
                .insert_replies(
                    job.message_id,
                    &job.client_id,
                    replies.clone(),
                    self.clock.now(),
                    completes,
                )
                .await;
            match stored {
                Err(err) if err.is_transient() => {
                    tracing::warn!(message_id = job.message_id, %err, retry_in_ms = retry.as_millis() as u64, "the database is unavailable; storing the replies again shortly");
                }
                stored => return Some(stored),
            }
            tokio::select! {
                () = stop.cancelled() => return None,
                () = tokio::time::sleep(retry) => {}
            }
            retry = (retry * 2).min(MAX_STORE_RETRY);
        }
    }

    /// Reports stored replies in order, after `first` if given, all in one go; the last is
    /// marked so when `completes`. Unreported if they could not be sent: the queue then hands
    /// the job out again.
    async fn report_replies(
        &self,
        route: &mut Route,
        message: &MessageRef,
        replies: Vec<StoredReply>,
        completes: bool,
        first: Option<Event>,
    ) -> Finished {
        let count = replies.len();
        let replies = replies
            .into_iter()
            .enumerate()
            .map(|(index, reply)| Event::Reply {
                message: message.clone(),
                reply,
                last: completes && index + 1 == count,
            });
        if self
            .report(route, first.into_iter().chain(replies).collect())
            .await
        {
            Finished::Done
        } else {
            Finished::Unreported
        }
    }

    /// Sends a message's events, in order, to the gateway that holds its client now: the one
    /// that admitted the message while it is there, else the one presence names; outages of
    /// the broker and of presence are waited out. A reply for a client no gateway holds is
    /// recorded `failed` here, by this one process: the client gets it when it resumes. False
    /// only if the worker stopped first.
    async fn report(&self, route: &mut Route, events: Vec<Event>) -> bool {
        let routed = presence::route_all(
            self.presence.as_ref(),
            self.queue.as_ref(),
            &mut route.gateway,
            None,
            &events,
            &route.stop,
        )
        .await;
        match routed {
            Ok(taken) => {
                for event in &events[taken..] {
                    if let Event::Reply { reply, .. } = event {
                        self.store.record_undelivered(reply.id, self.clock.now());
                    }
                }
                true
            }
            Err(presence::Stopped) => {
                let message_id = events
                    .first()
                    .and_then(Event::message)
                    .map_or(0, |message| message.message_id);
                tracing::debug!(message_id, "stopped before an event was reported");
                false
            }
        }
    }
}

/// Where one job's events go: the gateway that admitted the message, until it is found gone;
/// then wherever presence says the client is. `stop` ends the waiting for an outage.
#[derive(Debug)]
struct Route {
    gateway: Option<GatewayId>,
    stop: CancellationToken,
}

impl Route {
    fn new(origin: Option<GatewayId>, stop: CancellationToken) -> Self {
        Self {
            gateway: origin,
            stop,
        }
    }
}

/// The first wait before replies are stored again while the database is away; it doubles up
/// to [`MAX_STORE_RETRY`], so they go in at most that long after it is back.
const STORE_RETRY: Duration = Duration::from_millis(100);
const MAX_STORE_RETRY: Duration = Duration::from_secs(1);

/// How long the `processing` event waits for the replies to go with them, at most: longer than
/// a batch of replies takes to be stored under load, short enough that a client waiting for a
/// reply that takes seconds (a model, the reply delay) sees no difference.
const PROCESSING_WAIT: Duration = Duration::from_millis(20);

/// How far a job got while its `processing` event waited.
enum Made {
    Stopped,
    /// The delay is over and the text is still being written.
    TextPending,
    /// The whole reply set, stored or not.
    Stored(Result<Vec<StoredReply>, StoreError>),
}

/// How processing a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Finished {
    /// Its replies are stored and reported, or its failure is: the queue may forget it.
    Done,
    /// An event could not be sent: the queue hands the job out again.
    Unreported,
    /// Stopped at shutdown before its replies were made: processed again by another worker,
    /// or at the next start.
    Abandoned,
}

fn abandon(job: &Job) -> Finished {
    tracing::info!(
        message_id = job.message_id,
        "processing abandoned at shutdown; the message is processed again later"
    );
    Finished::Abandoned
}

#[cfg(test)]
mod tests;
