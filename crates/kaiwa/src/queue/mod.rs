//! The hand-off between gateways and workers: accepted messages go to workers as [`Job`]s, and
//! what workers make of them comes back as [`Event`]s. In-process now ([`MemoryQueue`]); the
//! [`Queue`] trait is the seam for a broker between processes.

mod memory;

pub use memory::MemoryQueue;

use crate::domain::{ClientId, Timezone};
use crate::store::{StoredMessage, StoredReply};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::stream::BoxStream;
use kaiwa_protocol::MessageType;

/// An accepted message, as much of it as processing needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub message_id: i64,
    pub client_id: ClientId,
    pub client_message_id: Option<String>,
    pub kind: MessageType,
    /// The text, or the stored file's path relative to the data directory.
    pub content: String,
    pub filename: Option<String>,
    pub size_bytes: Option<u64>,
    pub timezone: Timezone,
    pub received_at: DateTime<Utc>,
}

impl From<StoredMessage> for Job {
    fn from(message: StoredMessage) -> Self {
        Self {
            message_id: message.id,
            client_id: message.client_id,
            client_message_id: message.client_message_id,
            kind: message.kind,
            content: message.content,
            filename: message.filename,
            size_bytes: message.size_bytes,
            timezone: message.timezone,
            received_at: message.received_at,
        }
    }
}

/// Which message an event is about, and whose it is.
#[derive(Debug, Clone, PartialEq)]
pub struct MessageRef {
    pub client_id: ClientId,
    pub message_id: i64,
    pub client_message_id: Option<String>,
}

impl From<&Job> for MessageRef {
    fn from(job: &Job) -> Self {
        Self {
            client_id: job.client_id.clone(),
            message_id: job.message_id,
            client_message_id: job.client_message_id.clone(),
        }
    }
}

/// What a worker reports about a message, for the gateway that holds its client.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A worker took the message.
    Processing(MessageRef),
    /// The next piece of a text reply being written; the `Reply` with the whole text follows.
    Delta { message: MessageRef, delta: String },
    /// One reply, stored; `last` marks the end of the message's reply set.
    Reply {
        message: MessageRef,
        reply: StoredReply,
        last: bool,
    },
    /// Processing failed; the message stays accepted and the sweeper queues it again.
    Failed { message: MessageRef, reason: String },
}

impl Event {
    pub fn message(&self) -> &MessageRef {
        match self {
            Self::Processing(message)
            | Self::Delta { message, .. }
            | Self::Reply { message, .. }
            | Self::Failed { message, .. } => message,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("the queue is closed")]
    Closed,
    #[error("the queue's {0} stream was already taken: it has a single consumer")]
    AlreadyConsumed(&'static str),
}

#[async_trait]
pub trait Queue: Send + Sync + 'static {
    /// Waits while the queue is full: that is backpressure on admission.
    async fn publish_job(&self, job: Job) -> Result<(), QueueError>;

    /// The jobs, for the worker pool of this process.
    fn jobs(&self) -> Result<BoxStream<'static, Job>, QueueError>;

    async fn publish_event(&self, event: Event) -> Result<(), QueueError>;

    /// The events for the clients of this process's gateway.
    fn events(&self) -> Result<BoxStream<'static, Event>, QueueError>;

    /// Jobs waiting for a worker, when the queue can tell.
    fn depth(&self) -> Option<usize>;
}
