//! Admission: what may come in. Client slots, messages in flight, content validation and time
//! windows decide whether a message is accepted; an accepted or rejected message is stored
//! before the client hears about it, and an accepted one is then handed to the queue.

mod limits;
pub mod media;
mod pipeline;
mod validate;
mod windows;

pub use limits::{ConnectionSlot, ConnectionSlots, InFlight, InFlightSlot, SlotEnds};
pub use pipeline::{Answer, Pipeline, Settled, Verdict};
pub use validate::{
    Body, ContentLimits, Draft, Invalid, Submission, Upload, client_message_id, parse_bytes,
};
pub use windows::{Window, Windows};

use crate::domain::GatewayId;
use crate::domain::{ClientId, Timezone};
use crate::queue::{Job, Queue, QueueError};
use crate::store::{
    Existing, Inserted, MediaStore, NewMessage, Store, StoreError, StoreFuture, StoredMessage,
};
use chrono::{DateTime, Utc};
use kaiwa_protocol::{MessageStatus, MessageType};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

/// Who sent a message.
#[derive(Debug, Clone)]
pub struct Sender {
    pub client_id: ClientId,
    pub timezone: Timezone,
}

/// The admission step, shared by all sessions.
pub struct Admission {
    pub limits: ContentLimits,
    pub windows: Windows,
    pub in_flight: InFlight,
    in_flight_wait: Duration,
    store: Arc<dyn Store>,
    media: Arc<dyn MediaStore>,
    queue: Arc<dyn Queue>,
    /// Where this process's clients are: workers send the replies of its messages here first.
    origin: GatewayId,
}

/// What became of a message. Every variant is answered to the client; none is dropped silently.
#[derive(Debug)]
pub enum Outcome {
    /// Stored as accepted and holding an in-flight slot; [`Ticket::dispatch`] hands it on.
    Accepted(Ticket),
    /// Stored as rejected: outside its time window (R6).
    Rejected { message_id: i64, reason: String },
    /// The client sent this id before; nothing new was stored.
    Duplicate(Existing),
    /// Not a valid message; nothing was stored.
    Invalid(Invalid),
    /// No in-flight slot freed up in time; nothing was stored, the client should retry.
    Busy { retry_after: Duration },
    /// Storing failed; nothing was stored.
    Failed(AdmissionError),
}

#[derive(Debug, thiserror::Error)]
pub enum AdmissionError {
    #[error("could not store the message: {0}")]
    Store(#[from] StoreError),
    #[error("could not queue the message: {0}")]
    Queue(#[from] QueueError),
    #[error("the client's admission task has stopped")]
    Stopped,
}

impl AdmissionError {
    /// Whether the same message can be taken later: the database is only unreachable for now.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Store(err) if err.is_transient())
    }
}

/// A message after [`Admission::admit`]: decided without the store, or on its way into it.
#[derive(Debug)]
pub enum Admitting {
    Decided(Outcome),
    Storing(Storing),
}

/// A message the store has taken in; [`Admission::settle`] waits for it.
#[must_use = "a message being stored must be settled, or its client never hears of it"]
pub struct Storing {
    inserted: StoreFuture<Inserted>,
    slot: Option<InFlightSlot>,
    job: Option<Job>,
    reason: Option<String>,
    /// The media file saved for it, to delete if the message turns out not to be new.
    saved_path: Option<String>,
}

impl std::fmt::Debug for Storing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storing")
            .field("job", &self.job)
            .finish_non_exhaustive()
    }
}

/// An accepted, stored message, ready to be queued.
///
/// Kept apart from [`Admission::admit`] so that the gateway can ack the message before it is
/// queued: the client then always sees `accepted` before `processing`.
#[derive(Debug)]
pub struct Ticket {
    pub job: Job,
    slot: InFlightSlot,
}

/// Why a text note sent under a media type is rejected, whatever the hour: a voice or video
/// message is a file, checked by its bytes and kept on disk (R7), and a note has none.
fn note_refused(kind: MessageType) -> String {
    let (capital, article) = match kind {
        MessageType::Image => ("An", "an"),
        _ => ("A", "a"),
    };
    format!(
        "{capital} {kind} message carries {article} {kind} file, and this one carries text only: it was not taken as {kind}. Send the text with type text, or the file in base64 with a filename."
    )
}

impl Admission {
    pub fn new(
        limits: ContentLimits,
        windows: Windows,
        in_flight: InFlight,
        in_flight_wait: Duration,
        store: Arc<dyn Store>,
        media: Arc<dyn MediaStore>,
        queue: Arc<dyn Queue>,
    ) -> Self {
        Self {
            limits,
            windows,
            in_flight,
            in_flight_wait,
            store,
            media,
            queue,
            origin: GatewayId::new("local"),
        }
    }

    /// The same admission step for the clients of gateway `origin` (one of a cluster).
    pub fn for_gateway(mut self, origin: GatewayId) -> Self {
        self.origin = origin;
        self
    }

    /// Decides on one message and hands the decision to the store. `client_permit` is the
    /// sender's own in-flight permit; an accepted message keeps it until its last reply.
    ///
    /// Call it for one client's messages in order: the store numbers them in the order of
    /// these calls. Awaiting the store ([`Admission::settle`]) can then overlap.
    pub async fn admit(
        &self,
        sender: &Sender,
        submission: Submission,
        received_at: DateTime<Utc>,
        client_permit: Option<OwnedSemaphorePermit>,
    ) -> Admitting {
        let draft = match self.limits.validate(submission) {
            Ok(draft) => draft,
            Err(invalid) => return Admitting::Decided(Outcome::Invalid(invalid)),
        };
        let verdict = match draft.body {
            Body::Note(_) => Err(note_refused(draft.kind)),
            _ => self
                .windows
                .judge(draft.kind, sender.timezone.tz(), received_at),
        };
        let slot = match verdict {
            Ok(()) => match self
                .in_flight
                .acquire(client_permit, self.in_flight_wait)
                .await
            {
                Some(slot) => Some(slot),
                None => {
                    return Admitting::Decided(Outcome::Busy {
                        retry_after: Duration::from_secs(1),
                    });
                }
            },
            Err(_) => None,
        };
        let kind = draft.kind;
        let (content, upload) = match draft.body {
            Body::Text(text) => (text, None),
            // The content of a media message is its file, and a note has none: kept like a
            // refused file (not at all), so every reader of the history sees what it expects.
            Body::Note(_) => (String::new(), None),
            // Files of rejected messages are not kept: the client still has them, and the
            // history shows the name of the file that was refused.
            Body::Media(upload) if slot.is_none() => (String::new(), Some(upload)),
            Body::Media(upload) => match self
                .media
                .save(kind, upload.format, upload.bytes.clone())
                .await
            {
                Ok(path) => (path, Some(upload)),
                Err(err) => return Admitting::Decided(Outcome::Failed(err.into())),
            },
        };
        let reason = verdict.err();
        let message = NewMessage {
            client_id: sender.client_id.clone(),
            client_message_id: draft.client_message_id,
            kind,
            content,
            filename: upload.as_ref().map(|u| u.filename.clone()),
            mime_type: upload.as_ref().map(|u| u.format.mime.to_owned()),
            size_bytes: upload.as_ref().map(|u| u.bytes.len() as u64),
            timezone: sender.timezone,
            status: if slot.is_some() {
                MessageStatus::Accepted
            } else {
                MessageStatus::Rejected
            },
            reason: reason.clone(),
            client_timestamp: draft.client_timestamp,
            received_at,
        };
        let saved_path = (slot.is_some() && upload.is_some()).then(|| message.content.clone());
        // Built before the message moves into the store; the id comes back from it.
        let job = slot
            .is_some()
            .then(|| Job::from(StoredMessage::new(0, message.clone())));
        let inserted = self.store.insert_message(message);
        Admitting::Storing(Storing {
            inserted,
            slot,
            job,
            reason,
            saved_path,
        })
    }

    /// Waits for the store to confirm a message, and says what became of it.
    pub async fn settle(&self, storing: Storing) -> Outcome {
        let Storing {
            inserted,
            slot,
            job,
            reason,
            saved_path,
        } = storing;
        let inserted = inserted.await;
        if !matches!(inserted, Ok(Inserted::New(_)))
            && let Some(path) = saved_path
        {
            self.media.remove(&path).await;
        }
        match inserted {
            Ok(Inserted::New(message_id)) => match (slot, job) {
                (Some(slot), Some(mut job)) => {
                    job.message_id = message_id;
                    job.origin = Some(self.origin.clone());
                    Outcome::Accepted(Ticket { job, slot })
                }
                _ => Outcome::Rejected {
                    message_id,
                    reason: reason.unwrap_or_default(),
                },
            },
            Ok(Inserted::Duplicate(existing)) => Outcome::Duplicate(existing),
            Ok(Inserted::Busy) => Outcome::Busy {
                retry_after: Duration::from_secs(1),
            },
            Err(err) => Outcome::Failed(err.into()),
        }
    }

    /// Queues an accepted message, parking its in-flight slot (until the last reply, or not at
    /// all: see [`SlotEnds`]).
    pub async fn dispatch(&self, ticket: Ticket) -> Result<(), AdmissionError> {
        let message_id = ticket.job.message_id;
        tracing::debug!(
            message_id,
            in_flight = self.in_flight.current(),
            "message queued"
        );
        self.in_flight.park(message_id, ticket.slot);
        if let Err(err) = self.queue.publish_job(ticket.job).await {
            // The message stays `accepted` in the store: a sweeper queues it again.
            self.in_flight.release(message_id);
            return Err(err.into());
        }
        Ok(())
    }

    /// Queues messages that were accepted but never replied to (the last run stopped while
    /// they were in flight). Each takes an in-flight slot like a new message, so recovery cannot
    /// overrun the limit.
    ///
    /// `unfinished` must be read before this run accepts its first message: read later, it
    /// would also hold this run's own messages and process them twice.
    /// Returns how many were queued: recovery stops when `stop` is cancelled (at shutdown),
    /// leaving the rest for the next start.
    pub async fn requeue(
        &self,
        unfinished: Vec<StoredMessage>,
        stop: &CancellationToken,
    ) -> Result<usize, AdmissionError> {
        let mut queued = 0;
        for message in unfinished {
            let slot = tokio::select! {
                () = stop.cancelled() => break,
                slot = self.in_flight.acquire(None, Duration::MAX) => match slot {
                    Some(slot) => slot,
                    None => break,
                },
            };
            let job = Job {
                requeued: true,
                ..Job::from(message)
            };
            self.dispatch(Ticket { job, slot }).await?;
            queued += 1;
        }
        Ok(queued)
    }
}
