//! One client's admission pipeline: its messages are admitted one after another, in the order
//! they arrived (so the store numbers them in that order), while several wait for their commit
//! at once; each is answered in order once its fate is known, and an accepted one is then queued
//! for a worker. The gateway only submits messages and turns the verdicts into frames.

use super::{Admission, AdmissionError, Admitting, Invalid, Outcome, Sender, Submission};
use crate::store::Existing;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::{FuturesOrdered, FuturesUnordered};
use kaiwa_protocol::MessageType;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::task::TaskTracker;

/// What a client is told about one message it sent.
#[derive(Debug)]
pub struct Settled {
    /// The client's own id of the message (native clients).
    pub id: Option<String>,
    /// Its type, when it names a known one: the path dialect answers a message with its type.
    pub message_type: Option<MessageType>,
    /// The server's clock at receipt: the time its window was judged by.
    pub received_at: DateTime<Utc>,
    pub verdict: Verdict,
}

#[derive(Debug)]
pub enum Verdict {
    /// Stored as accepted; it is queued for a worker right after this answer.
    Accepted { message_id: i64 },
    /// Stored as rejected: outside its time window (R6).
    Rejected { message_id: i64, reason: String },
    /// The client sent this id before; nothing new was stored.
    Duplicate(Existing),
    /// Not a valid message; nothing was stored.
    Invalid(Invalid),
    /// No in-flight slot freed up in time (`limit` are in flight); nothing was stored.
    Busy { retry_after: Duration, limit: usize },
    /// Storing failed; nothing was stored.
    Failed(AdmissionError),
}

/// How a pipeline answers its client: called once per message, in the order they were sent.
pub type Answer = Box<dyn Fn(Settled) + Send + Sync>;

/// The pipeline of one connected client.
pub struct Pipeline {
    admission: Arc<Admission>,
    sender: Arc<Sender>,
    /// This client's share of the in-flight limit: every message holds one permit from its
    /// receipt to its last reply. While none is left the session stops reading from the client,
    /// so a flooding client is slowed by TCP backpressure instead of queued in memory.
    permits: Arc<Semaphore>,
    /// Shared with the task, which answers through it.
    answer: Arc<Answer>,
    /// Where the task runs, so shutdown waits for the messages it holds.
    tracker: TaskTracker,
    /// To the pipeline's task, started with the first message (an idle client costs no task).
    /// Unbounded, because every queued message holds one of the client's permits: those bound it.
    queue: Option<mpsc::UnboundedSender<Queued>>,
}

/// A message waiting for admission, holding one of its client's in-flight permits.
struct Queued {
    submission: Submission,
    received_at: DateTime<Utc>,
    permit: OwnedSemaphorePermit,
}

/// A message handed to the store (or decided without it), waiting to be settled.
struct Admitted {
    id: Option<String>,
    message_type: Option<MessageType>,
    received_at: DateTime<Utc>,
    admitting: Admitting,
}

/// A message whose fate the store has decided.
struct Decided {
    id: Option<String>,
    message_type: Option<MessageType>,
    received_at: DateTime<Utc>,
    outcome: Outcome,
}

impl Pipeline {
    pub fn new(
        admission: Arc<Admission>,
        sender: Arc<Sender>,
        max_in_flight: usize,
        tracker: TaskTracker,
        answer: Answer,
    ) -> Self {
        Self {
            admission,
            sender,
            permits: Arc::new(Semaphore::new(max_in_flight)),
            answer: Arc::new(answer),
            tracker,
            queue: None,
        }
    }

    /// Whether the client may send another message now.
    pub fn has_room(&self) -> bool {
        self.permits.available_permits() > 0
    }

    /// Resolves when the client may send another message.
    pub async fn room(&self) {
        if let Ok(permit) = self.permits.acquire().await {
            drop(permit);
        }
    }

    /// Takes a message in. Never waits: a caller that checks [`Pipeline::has_room`] first always
    /// finds a permit; one that does not is answered `busy`.
    pub fn submit(&mut self, submission: Submission, received_at: DateTime<Utc>) {
        let id = submission.client_message_id.clone();
        let message_type = submission.kind();
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            (self.answer)(Settled {
                id,
                message_type,
                received_at,
                verdict: Verdict::Busy {
                    retry_after: Duration::from_secs(1),
                    limit: self.admission.in_flight.max(),
                },
            });
            return;
        };
        let queue = self.queue.get_or_insert_with(|| {
            let (queue, queued) = mpsc::unbounded_channel();
            let task = Task {
                admission: self.admission.clone(),
                sender: self.sender.clone(),
                answer: self.answer.clone(),
            };
            self.tracker.spawn(task.run(queued));
            queue
        });
        let queued = Queued {
            submission,
            received_at,
            permit,
        };
        if queue.send(queued).is_err() {
            tracing::error!(client_id = %self.sender.client_id, "the admission task of this client has stopped; message not admitted");
            (self.answer)(Settled {
                id,
                message_type,
                received_at,
                verdict: Verdict::Failed(AdmissionError::Stopped),
            });
        }
    }
}

/// The pipeline's task. Runs until the session ends and its queue is empty, so a message read
/// before a disconnect is still stored and processed.
struct Task {
    admission: Arc<Admission>,
    sender: Arc<Sender>,
    answer: Arc<Answer>,
}

impl Task {
    async fn run(self, mut queue: mpsc::UnboundedReceiver<Queued>) {
        let mut settling: FuturesOrdered<BoxFuture<'static, Decided>> = FuturesOrdered::new();
        // Accepted messages on their way into the queue. A broker confirms a persistent job
        // after its disk write, milliseconds later: the client's next messages do not wait for
        // that (they are committed, and a job never confirmed is swept back). An in-process
        // queue takes a job at the first poll, in the order they were pushed.
        let mut dispatching: FuturesUnordered<BoxFuture<'static, ()>> = FuturesUnordered::new();
        // The message being admitted. The next one waits for it, but earlier ones keep settling
        // meanwhile: admission may wait for an in-flight slot that only an earlier message's
        // answer (its dispatch, then its replies) can free.
        let mut admitting: Option<BoxFuture<'static, Admitted>> = None;
        let mut open = true;
        loop {
            tokio::select! {
                biased;
                Some(()) = dispatching.next(), if !dispatching.is_empty() => {}
                Some(decided) = settling.next(), if !settling.is_empty() => {
                    if let Some(dispatch) = self.answer(decided) {
                        dispatching.push(dispatch);
                    }
                }
                admitted = async {
                    match admitting.as_mut() {
                        Some(admission) => admission.await,
                        None => std::future::pending().await,
                    }
                }, if admitting.is_some() => {
                    admitting = None;
                    let admission = self.admission.clone();
                    settling.push_back(Box::pin(async move {
                        let Admitted { id, message_type, received_at, admitting } = admitted;
                        let outcome = match admitting {
                            Admitting::Decided(outcome) => outcome,
                            Admitting::Storing(storing) => admission.settle(storing).await,
                        };
                        Decided { id, message_type, received_at, outcome }
                    }));
                }
                queued = queue.recv(), if open && admitting.is_none() => match queued {
                    Some(queued) => admitting = Some(self.admit(queued)),
                    None => open = false,
                },
                else => break,
            }
        }
    }

    /// Starts one message's admission: validation, window, in-flight slot, media file, and the
    /// hand-over to the store, whose answer [`Admission::settle`] waits for.
    fn admit(&self, queued: Queued) -> BoxFuture<'static, Admitted> {
        let admission = self.admission.clone();
        let sender = self.sender.clone();
        Box::pin(async move {
            let Queued {
                submission,
                received_at,
                permit,
            } = queued;
            let id = submission.client_message_id.clone();
            let message_type = submission.kind();
            let admitting = admission
                .admit(&sender, submission, received_at, Some(permit))
                .await;
            Admitted {
                id,
                message_type,
                received_at,
                admitting,
            }
        })
    }

    /// Answers the client; an accepted message is then to be queued by the future returned.
    fn answer(&self, decided: Decided) -> Option<BoxFuture<'static, ()>> {
        let Decided {
            id,
            message_type,
            received_at,
            outcome,
        } = decided;
        let settled = |verdict| Settled {
            id: id.clone(),
            message_type,
            received_at,
            verdict,
        };
        match outcome {
            Outcome::Accepted(ticket) => {
                let message_id = ticket.job.message_id;
                // Answered before it is queued: the client always sees `accepted` first.
                (self.answer)(settled(Verdict::Accepted { message_id }));
                let admission = self.admission.clone();
                return Some(Box::pin(async move {
                    // The queue waits out an outage of the broker, so this fails only when the
                    // process stops: the message stays accepted, and is processed by another
                    // process or at the next start. The client's answer stands.
                    if let Err(err) = admission.dispatch(ticket).await {
                        tracing::warn!(message_id, %err, "accepted message not queued before stopping; it is processed later");
                    }
                }));
            }
            Outcome::Rejected { message_id, reason } => {
                (self.answer)(settled(Verdict::Rejected { message_id, reason }));
            }
            Outcome::Duplicate(existing) => (self.answer)(settled(Verdict::Duplicate(existing))),
            Outcome::Invalid(invalid) => (self.answer)(settled(Verdict::Invalid(invalid))),
            Outcome::Busy { retry_after } => (self.answer)(settled(Verdict::Busy {
                retry_after,
                limit: self.admission.in_flight.max(),
            })),
            Outcome::Failed(err) => {
                tracing::error!(client_id = %self.sender.client_id, %err, "could not store a message");
                (self.answer)(settled(Verdict::Failed(err)));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::{InFlight, SlotEnds};
    use crate::config::ServeConfig;
    use crate::domain::{ClientId, Timezone};
    use crate::queue::{MemoryQueue, Queue};
    use crate::store::{DiskMedia, MemoryStore};
    use std::sync::Mutex;

    struct Rig {
        pipeline: Pipeline,
        answers: Arc<Mutex<Vec<Settled>>>,
        queue: Arc<MemoryQueue>,
        _dir: tempfile::TempDir,
    }

    fn rig(per_client: usize) -> Rig {
        let config = ServeConfig::from_args(["--text-window", "00:00-24:00"]).expect("flags");
        let dir = tempfile::tempdir().expect("a temporary directory");
        let queue = Arc::new(MemoryQueue::new(16));
        let admission = Arc::new(Admission::new(
            config.content,
            config.windows,
            InFlight::new(16, SlotEnds::AtLastReply),
            Duration::ZERO,
            Arc::new(MemoryStore::default()),
            Arc::new(DiskMedia::open(&dir.path().join("media")).expect("media folders")),
            queue.clone(),
        ));
        let sender = Arc::new(Sender {
            client_id: ClientId::parse("alice").expect("valid"),
            timezone: Timezone::parse("UTC").expect("valid"),
        });
        let answers = Arc::new(Mutex::new(Vec::new()));
        let answered = answers.clone();
        let pipeline = Pipeline::new(
            admission,
            sender,
            per_client,
            TaskTracker::new(),
            Box::new(move |settled| answered.lock().expect("not poisoned").push(settled)),
        );
        Rig {
            pipeline,
            answers,
            queue,
            _dir: dir,
        }
    }

    fn text(id: &str) -> Submission {
        Submission {
            client_message_id: Some(id.to_owned()),
            message_type: Some("text".into()),
            content: Some(format!("message {id}")),
            filename: None,
            client_timestamp: None,
            binary: None,
            text_notes: false,
        }
    }

    impl Rig {
        async fn answered(&self, count: usize) -> Vec<(Option<String>, String)> {
            loop {
                {
                    let answers = self.answers.lock().expect("not poisoned");
                    if answers.len() >= count {
                        return answers
                            .iter()
                            .map(|a| (a.id.clone(), format!("{:?}", a.verdict)))
                            .collect();
                    }
                }
                tokio::task::yield_now().await;
            }
        }
    }

    #[tokio::test]
    async fn messages_are_answered_and_queued_in_the_order_they_were_sent() {
        let mut rig = rig(8);
        let mut jobs = rig.queue.jobs().expect("the jobs");
        for id in ["a", "b", "c"] {
            rig.pipeline.submit(text(id), chrono::Utc::now());
        }
        let answered = rig.answered(3).await;
        let ids: Vec<_> = answered.iter().map(|(id, _)| id.as_deref()).collect();
        assert_eq!(ids, [Some("a"), Some("b"), Some("c")]);
        assert!(
            answered
                .iter()
                .all(|(_, verdict)| verdict.starts_with("Accepted")),
            "{answered:?}"
        );
        for id in ["a", "b", "c"] {
            let taken = jobs.next().await.expect("a job");
            assert_eq!(taken.job.client_message_id.as_deref(), Some(id));
        }
    }

    #[tokio::test]
    async fn a_message_past_the_clients_share_is_answered_busy_at_once() {
        let mut rig = rig(1);
        let _jobs = rig.queue.jobs().expect("the jobs");
        rig.pipeline.submit(text("a"), chrono::Utc::now());
        assert!(
            !rig.pipeline.has_room(),
            "the one permit is held until the last reply"
        );
        rig.pipeline.submit(text("b"), chrono::Utc::now());
        let answered = rig.answered(2).await;
        let busy = answered
            .iter()
            .find(|(id, _)| id.as_deref() == Some("b"))
            .expect("b is answered");
        assert!(busy.1.starts_with("Busy"), "{answered:?}");
    }

    #[tokio::test]
    async fn an_invalid_message_is_answered_in_its_turn_and_not_queued() {
        let mut rig = rig(8);
        let mut jobs = rig.queue.jobs().expect("the jobs");
        rig.pipeline.submit(text("a"), chrono::Utc::now());
        let mut empty = text("b");
        empty.content = Some(String::new());
        rig.pipeline.submit(empty, chrono::Utc::now());
        rig.pipeline.submit(text("c"), chrono::Utc::now());
        let answered = rig.answered(3).await;
        let verdicts: Vec<_> = answered
            .iter()
            .map(|(id, verdict)| {
                (
                    id.clone().unwrap_or_default(),
                    verdict.split(' ').next().unwrap_or("").to_owned(),
                )
            })
            .collect();
        assert_eq!(
            verdicts,
            [
                ("a".to_owned(), "Accepted".to_owned()),
                ("b".to_owned(), "Invalid(EmptyText)".to_owned()),
                ("c".to_owned(), "Accepted".to_owned()),
            ]
        );
        for id in ["a", "c"] {
            let taken = jobs.next().await.expect("a job");
            assert_eq!(taken.job.client_message_id.as_deref(), Some(id));
        }
    }
}
