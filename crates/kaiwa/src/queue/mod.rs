//! The hand-off between gateways and workers: accepted messages go to workers as [`Job`]s, and
//! what workers make of them comes back as [`Event`]s, to the gateway that holds the client.
//! In one process ([`MemoryQueue`]) or across processes through RabbitMQ ([`AmqpQueue`]).

mod amqp;
mod memory;

pub use amqp::{AmqpOptions, AmqpQueue};
pub use memory::MemoryQueue;

use crate::domain::{ClientId, GatewayId, Timezone};
use crate::store::{StoredMessage, StoredReply};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::stream::BoxStream;
use kaiwa_protocol::MessageType;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Instant;

/// An accepted message, as much of it as processing needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    /// Queued again (at start, or by the sweeper): its replies may be stored already.
    #[serde(default)]
    pub requeued: bool,
    /// The gateway that admitted it, where its client most likely still is: replies go there
    /// first, and only if it is gone is the client looked up.
    #[serde(default)]
    pub origin: Option<GatewayId>,
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
            requeued: false,
            origin: None,
        }
    }
}

/// Which message an event is about, and whose it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessageRef {
    pub client_id: ClientId,
    pub message_id: i64,
    pub client_message_id: Option<String>,
    /// What the gateway that hands out the last reply times it from
    /// (`kaiwa_message_reply_seconds`). `None` in replies read back from the store, which are
    /// not live, and in events of a process that predates it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receipt: Option<Receipt>,
}

/// A message's type and when its gateway received it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Receipt {
    pub kind: MessageType,
    pub received_at: DateTime<Utc>,
}

impl From<&Job> for MessageRef {
    fn from(job: &Job) -> Self {
        Self {
            client_id: job.client_id.clone(),
            message_id: job.message_id,
            client_message_id: job.client_message_id.clone(),
            receipt: Some(Receipt {
                kind: job.kind,
                received_at: job.received_at,
            }),
        }
    }
}

/// What a worker reports about a message, for the gateway that holds its client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    /// Gateway to gateway: a connection elsewhere took the client's id (policy `replace`), so
    /// the connection `conn_id` is to close.
    Replaced { client_id: ClientId, conn_id: u64 },
    /// Gateway to gateway: the client's previous connection has closed, having been offered
    /// replies up to `seq`, some maybe after this connection began: its reply stream reads
    /// back from the store whatever it lacks up to there.
    CatchUp { client_id: ClientId, seq: u64 },
    /// Gateway to gateway: the client is connecting through `from`, and the connection
    /// `conn_id` here holds its id. The holder pings that connection, closes it if it does not
    /// answer (its network died; its claim goes with it), and answers with `Probed`.
    Probe {
        client_id: ClientId,
        conn_id: u64,
        from: GatewayId,
    },
    /// The answer to a `Probe`: whether the connection answered.
    Probed {
        client_id: ClientId,
        conn_id: u64,
        alive: bool,
    },
}

impl Event {
    /// The message the event is about; `None` for the gateways' own events.
    pub fn message(&self) -> Option<&MessageRef> {
        match self {
            Self::Processing(message)
            | Self::Delta { message, .. }
            | Self::Reply { message, .. }
            | Self::Failed { message, .. } => Some(message),
            Self::Replaced { .. }
            | Self::CatchUp { .. }
            | Self::Probe { .. }
            | Self::Probed { .. } => None,
        }
    }

    /// The message this event is the last word on (its last reply, or its failure), if any.
    pub fn finishes(&self) -> Option<i64> {
        match self {
            Self::Reply {
                message,
                last: true,
                ..
            }
            | Self::Failed { message, .. } => Some(message.message_id),
            _ => None,
        }
    }

    pub fn client_id(&self) -> &ClientId {
        match self {
            Self::Processing(message)
            | Self::Delta { message, .. }
            | Self::Reply { message, .. }
            | Self::Failed { message, .. } => &message.client_id,
            Self::Replaced { client_id, .. }
            | Self::CatchUp { client_id, .. }
            | Self::Probe { client_id, .. }
            | Self::Probed { client_id, .. } => client_id,
        }
    }
}

/// Records one publish in `kaiwa_queue_publish_seconds{item}`: from the call to the broker's
/// confirm (an in-process queue: to the channel's taking it), outages waited out included.
fn record_publish(item: &'static str, started: Instant) {
    metrics::histogram!("kaiwa_queue_publish_seconds", "item" => item)
        .record(started.elapsed().as_secs_f64());
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum QueueError {
    #[error("the queue is closed")]
    Closed,
    #[error("the queue's {0} stream was already taken: it has a single consumer")]
    AlreadyConsumed(&'static str),
    /// The broker cannot be reached now, or did not confirm; the same call can succeed later.
    #[error("the message broker is unavailable: {0}")]
    Unavailable(String),
    #[error("a queued item could not be read: {0}")]
    Malformed(String),
}

/// A job taken from the queue. It stays the worker's until [`Taken::done`]: if the worker dies
/// first, the queue hands the job to another worker.
pub struct Taken {
    pub job: Job,
    /// The queue handed this job out before and saw no `done`: its replies may be stored already.
    pub redelivered: bool,
    done: Box<dyn Done>,
}

impl Taken {
    pub(crate) fn new(job: Job, redelivered: bool, done: Box<dyn Done>) -> Self {
        Self {
            job,
            redelivered,
            done,
        }
    }

    /// The job's replies are stored and reported: the queue may forget it.
    pub async fn done(self) -> Result<(), QueueError> {
        self.done.done().await
    }
}

impl fmt::Debug for Taken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Taken")
            .field("job", &self.job)
            .field("redelivered", &self.redelivered)
            .finish_non_exhaustive()
    }
}

/// How a queue learns that a job is done (an AMQP ack, or nothing in-process).
#[async_trait]
pub(crate) trait Done: Send + Sync {
    async fn done(self: Box<Self>) -> Result<(), QueueError>;
}

/// What became of an event sent to a gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routed {
    /// The gateway's queue took it.
    Delivered,
    /// No such gateway is listening (it stopped or died): nobody will hand the event out.
    NoGateway,
}

#[async_trait]
pub trait Queue: Send + Sync + 'static {
    /// Queues a job for a worker. When this returns, the job is kept durably (the broker
    /// confirmed it). An outage of the broker is waited out: this fails only when the queue
    /// closes, and a job that never made it is still `accepted` in the store, where a sweeper
    /// or the next start finds it.
    async fn publish_job(&self, job: Job) -> Result<(), QueueError>;

    /// The jobs, for this process's workers. Each stays taken until [`Taken::done`].
    fn jobs(&self) -> Result<BoxStream<'static, Taken>, QueueError>;

    /// Sends an event to a gateway, confirmed by the broker; like [`Queue::publish_job`], it
    /// waits out an outage of the broker and fails only when the queue closes.
    async fn publish_event(&self, gateway: &GatewayId, event: Event) -> Result<Routed, QueueError>;

    /// Sends events to a gateway in order, as [`Queue::publish_event`] sends each; a broker
    /// carries them in one message where they fit, with one confirm. Returns how many, from
    /// the first, the gateway's queue took: the rest found no gateway.
    async fn publish_events(
        &self,
        gateway: &GatewayId,
        events: Vec<Event>,
    ) -> Result<usize, QueueError> {
        let mut taken = 0;
        for event in events {
            if self.publish_event(gateway, event).await? == Routed::NoGateway {
                break;
            }
            taken += 1;
        }
        Ok(taken)
    }

    /// The events for `gateway`'s clients, for its delivery task.
    fn events(&self, gateway: &GatewayId) -> Result<BoxStream<'static, Event>, QueueError>;

    /// Jobs waiting for a worker, when the queue can tell.
    async fn depth(&self) -> Option<usize>;

    /// Why the queue cannot take jobs or events now (the broker is unreachable), if it cannot.
    fn unavailable(&self) -> Option<String> {
        None
    }

    /// Stops taking and handing out: the last step of shutdown.
    async fn close(&self) {}
}
