//! How a job's events leave the worker: which go to the gateway together.

use super::*;
use crate::clock::ManualClock;
use crate::presence::LocalPresence;
use crate::queue::{Done, Routed};
use crate::replies::{BuiltinResponder, ReplyRequest, ResponderError, TextResponder};
use crate::store::{MemoryStore, StoredMessage};
use crate::testing::{accepted_text, stored};
use async_trait::async_trait;
use futures::stream::BoxStream;
use std::sync::Mutex;

/// A queue that records what each publish to a gateway carried, by kind, and takes it all.
#[derive(Default)]
struct Recorder {
    publishes: Mutex<Vec<Vec<&'static str>>>,
}

impl Recorder {
    fn publishes(&self) -> Vec<Vec<&'static str>> {
        self.publishes.lock().expect("not poisoned").clone()
    }
}

fn kind(event: &Event) -> &'static str {
    match event {
        Event::Processing(_) => "processing",
        Event::Delta { .. } => "delta",
        Event::Reply { last: true, .. } => "last reply",
        Event::Reply { .. } => "reply",
        Event::Failed { .. } => "failed",
        _ => "other",
    }
}

#[async_trait]
impl Queue for Recorder {
    async fn publish_job(&self, _: Job) -> Result<(), QueueError> {
        Ok(())
    }

    fn jobs(&self) -> Result<BoxStream<'static, Taken>, QueueError> {
        Err(QueueError::Closed)
    }

    async fn publish_event(&self, gateway: &GatewayId, event: Event) -> Result<Routed, QueueError> {
        self.publish_events(gateway, vec![event]).await?;
        Ok(Routed::Delivered)
    }

    async fn publish_events(&self, _: &GatewayId, events: Vec<Event>) -> Result<usize, QueueError> {
        let count = events.len();
        self.publishes
            .lock()
            .expect("not poisoned")
            .push(events.iter().map(kind).collect());
        Ok(count)
    }

    fn events(&self, _: &GatewayId) -> Result<BoxStream<'static, Event>, QueueError> {
        Err(QueueError::Closed)
    }

    async fn depth(&self) -> Option<usize> {
        None
    }
}

struct Forgotten;

#[async_trait]
impl Done for Forgotten {
    async fn done(self: Box<Self>) -> Result<(), QueueError> {
        Ok(())
    }
}

/// Writes its reply after a second: longer than the `processing` event waits.
struct Slow;

#[async_trait]
impl TextResponder for Slow {
    fn name(&self) -> &'static str {
        "slow"
    }

    async fn respond(&self, _: &ReplyRequest<'_>, _: &Deltas) -> Result<String, ResponderError> {
        tokio::time::sleep(Duration::from_secs(1)).await;
        Ok("at last".to_owned())
    }
}

/// Processes one message of `kind` with `responder` and `delays`; what went to the gateway.
async fn publishes_for(
    kind: MessageType,
    responder: Arc<dyn TextResponder>,
    delays: Delays,
) -> Vec<Vec<&'static str>> {
    let store = Arc::new(MemoryStore::default());
    let queue = Arc::new(Recorder::default());
    let gateway = GatewayId::new("gw-1");
    let message = crate::store::NewMessage {
        kind,
        ..accepted_text("ann", Some("m1"), "hello")
    };
    let id = stored(store.as_ref(), message.clone()).await;
    let job = Job {
        origin: Some(gateway.clone()),
        ..Job::from(StoredMessage::new(id, message))
    };
    let worker = Worker::new(
        store.clone(),
        queue.clone(),
        Arc::new(LocalPresence::new(gateway)),
        ReplyMaker::new(responder, store.clone()),
        delays,
        Arc::new(ManualClock::new(chrono::Utc::now())),
    );
    worker
        .take(
            Taken::new(job, false, Box::new(Forgotten)),
            CancellationToken::new(),
        )
        .await;
    queue.publishes()
}

#[tokio::test(start_paused = true)]
async fn a_reply_set_made_at_once_goes_with_its_processing_event_in_one_publish() {
    let publishes = publishes_for(
        MessageType::Text,
        Arc::new(BuiltinResponder),
        Delays::new(0.0),
    )
    .await;
    assert_eq!(publishes, [vec!["processing", "last reply"]]);
}

#[tokio::test(start_paused = true)]
async fn the_processing_event_does_not_wait_for_a_reply_that_takes_longer() {
    let publishes = publishes_for(MessageType::Text, Arc::new(Slow), Delays::new(0.0)).await;
    assert_eq!(publishes, [vec!["processing"], vec!["last reply"]]);
}

#[tokio::test(start_paused = true)]
async fn the_processing_event_does_not_wait_out_the_reply_delay() {
    // A voice message's delay is one to two seconds: `processing` goes once its own wait is
    // over, and the text and voice replies together after the delay.
    let publishes = publishes_for(
        MessageType::Voice,
        Arc::new(BuiltinResponder),
        Delays::new(1.0),
    )
    .await;
    assert_eq!(publishes, [vec!["processing"], vec!["reply", "last reply"]]);
}
