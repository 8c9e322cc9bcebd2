//! The in-process queue: two channels, jobs to the worker pool and events to the gateway. One
//! process holds every client and every worker, so there is one gateway to route to, and a job
//! cannot outlive the process that would redeliver it.

use super::{Done, Event, GatewayId, Job, Queue, QueueError, Routed, Taken, record_publish};
use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use std::sync::Mutex;
use tokio::sync::mpsc;

pub struct MemoryQueue {
    jobs: mpsc::Sender<Job>,
    /// Taken once by the worker pool.
    job_receiver: Mutex<Option<mpsc::Receiver<Job>>>,
    events: mpsc::Sender<Event>,
    /// Taken once by the gateway's delivery task.
    event_receiver: Mutex<Option<mpsc::Receiver<Event>>>,
    /// The one gateway, once its delivery task listens: events for any other find no one.
    gateway: Mutex<Option<GatewayId>>,
}

impl MemoryQueue {
    /// `capacity` bounds both channels. Jobs are bounded anyway by the in-flight limit; the
    /// bound makes that explicit.
    pub fn new(capacity: usize) -> Self {
        let (jobs, job_receiver) = mpsc::channel(capacity.max(1));
        let (events, event_receiver) = mpsc::channel(capacity.max(1) * 4);
        Self {
            jobs,
            job_receiver: Mutex::new(Some(job_receiver)),
            events,
            event_receiver: Mutex::new(Some(event_receiver)),
            gateway: Mutex::new(None),
        }
    }
}

fn take<T>(
    slot: &Mutex<Option<mpsc::Receiver<T>>>,
    name: &'static str,
) -> Result<mpsc::Receiver<T>, QueueError> {
    slot.lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .take()
        .ok_or(QueueError::AlreadyConsumed(name))
}

fn stream<T: Send + 'static>(receiver: mpsc::Receiver<T>) -> BoxStream<'static, T> {
    futures::stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|item| (item, receiver))
    })
    .boxed()
}

/// Nothing to tell: a job lost with the process is found by the next start's recovery.
struct InProcess;

#[async_trait]
impl Done for InProcess {
    async fn done(self: Box<Self>) -> Result<(), QueueError> {
        Ok(())
    }
}

#[async_trait]
impl Queue for MemoryQueue {
    async fn publish_job(&self, job: Job) -> Result<(), QueueError> {
        let started = std::time::Instant::now();
        self.jobs.send(job).await.map_err(|_| QueueError::Closed)?;
        record_publish("job", started);
        Ok(())
    }

    fn jobs(&self) -> Result<BoxStream<'static, Taken>, QueueError> {
        let jobs = take(&self.job_receiver, "jobs").map(stream)?;
        Ok(jobs
            .map(|job| Taken::new(job, false, Box::new(InProcess)))
            .boxed())
    }

    async fn publish_event(&self, gateway: &GatewayId, event: Event) -> Result<Routed, QueueError> {
        let listening = self
            .gateway
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        if listening.is_some_and(|listening| listening != *gateway) {
            return Ok(Routed::NoGateway);
        }
        let started = std::time::Instant::now();
        self.events
            .send(event)
            .await
            .map_err(|_| QueueError::Closed)?;
        record_publish("event", started);
        Ok(Routed::Delivered)
    }

    fn events(&self, gateway: &GatewayId) -> Result<BoxStream<'static, Event>, QueueError> {
        let events = take(&self.event_receiver, "events").map(stream)?;
        *self
            .gateway
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(gateway.clone());
        Ok(events)
    }

    async fn depth(&self) -> Option<usize> {
        Some(self.jobs.max_capacity() - self.jobs.capacity())
    }
}
