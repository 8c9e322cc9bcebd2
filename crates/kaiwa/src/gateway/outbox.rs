//! The outbox: a bounded queue of frames for one connection, and the writer task that drains it
//! into the socket and records which replies were delivered.
//!
//! The bound is what keeps a client that stops reading from growing server memory: once its
//! outbox is full, it is disconnected as a slow consumer instead. An idle connection's outbox
//! holds no buffer at all: the writer takes the queue's whole buffer with each batch, and drops
//! it once written (most connections are idle most of the time; see docs/architecture.md).

use crate::clock::Clock;
use crate::store::Store;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes};
use futures::{Sink, SinkExt};
use kaiwa_protocol::Delivery;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;

/// Frames written per flush, at most: one syscall carries many small frames under load.
const WRITE_BATCH: usize = 64;
/// How long closing may take for a client that does not read: bounded, so shutdown is too.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// One frame to write; `reply_id` names the stored reply it carries when the frame's being
/// written is what makes the reply `delivered` (legacy clients, which cannot acknowledge).
#[derive(Debug)]
pub(crate) struct Outgoing {
    message: Message,
    reply_id: Option<i64>,
    /// What this frame counts against the outbox's byte limit.
    bytes: usize,
}

/// The sending side of a connection's outbox. Cheap to clone: the session, its admission
/// pipeline, its reply stream and the delivery task each hold one.
#[derive(Debug, Clone)]
pub(crate) struct Outbox {
    queue: Arc<FrameQueue>,
    /// Bytes queued and not yet taken by the writer, against `max_bytes`.
    queued_bytes: Arc<AtomicUsize>,
    max_bytes: usize,
    /// Cancelled when a push found the outbox full; the session then disconnects the client.
    overflowed: CancellationToken,
    /// Woken by the writer each time it takes frames out, for pushes that wait for room.
    drained: Arc<Notify>,
}

/// The frames between the session's side and the writer: a queue that allocates only while it
/// holds frames (a bounded channel keeps a block of slots for its whole life).
#[derive(Debug)]
struct FrameQueue {
    pending: Mutex<Pending>,
    /// Woken at each push, and when the queue closes; a wake-up with no waiter is kept for the
    /// next one, so the writer misses none.
    ready: Notify,
    max_frames: usize,
}

#[derive(Debug, Default)]
struct Pending {
    frames: VecDeque<Outgoing>,
    /// The writer is done: nothing more is taken in.
    closed: bool,
}

impl FrameQueue {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // Every update is a push, a take or a flag: a panic cannot leave it half done.
        self.pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn push(&self, outgoing: Outgoing) -> Result<(), PushError> {
        {
            let mut pending = self.lock();
            if pending.closed {
                return Err(PushError::Closed);
            }
            if pending.frames.len() >= self.max_frames {
                return Err(PushError::Full);
            }
            pending.frames.push_back(outgoing);
        }
        self.ready.notify_one();
        Ok(())
    }

    fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_one();
    }
}

/// Why a frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PushError {
    Full,
    Closed,
}

/// The writer's side of an outbox: the frames, taken in batches.
#[derive(Debug)]
pub(crate) struct Frames {
    queue: Arc<FrameQueue>,
}

impl Frames {
    /// Waits for frames and takes up to [`WRITE_BATCH`] of them; empty once the outbox is
    /// closed and drained. A batch that is the whole queue takes its buffer along, so that the
    /// queue holds no memory while the connection is idle.
    async fn take(&self) -> VecDeque<Outgoing> {
        loop {
            // Registered before the check, so a push between the two is not missed.
            let ready = self.queue.ready.notified();
            {
                let mut pending = self.queue.lock();
                if pending.frames.len() > WRITE_BATCH {
                    return pending.frames.drain(..WRITE_BATCH).collect();
                }
                if !pending.frames.is_empty() || pending.closed {
                    return std::mem::take(&mut pending.frames);
                }
            }
            ready.await;
        }
    }

    /// Takes whatever is queued now, up to `room` frames, into `batch`.
    fn top_up(&self, batch: &mut VecDeque<Outgoing>, room: usize) {
        let mut pending = self.queue.lock();
        let count = room.min(pending.frames.len());
        batch.extend(pending.frames.drain(..count));
    }

    /// Closes the outbox and takes what is left in it.
    fn close(&self) -> VecDeque<Outgoing> {
        let mut pending = self.queue.lock();
        pending.closed = true;
        std::mem::take(&mut pending.frames)
    }

    /// The next frame, waiting for one; `None` once the outbox is closed and drained.
    #[cfg(test)]
    pub(crate) async fn recv(&mut self) -> Option<Outgoing> {
        loop {
            let ready = self.queue.ready.notified();
            {
                let mut pending = self.queue.lock();
                if let Some(outgoing) = pending.frames.pop_front() {
                    return Some(outgoing);
                }
                if pending.closed {
                    return None;
                }
            }
            ready.await;
        }
    }

    /// The next frame, if one is queued.
    #[cfg(test)]
    pub(crate) fn try_recv(&mut self) -> Option<Outgoing> {
        self.queue.lock().frames.pop_front()
    }
}

impl Drop for Frames {
    fn drop(&mut self) {
        // The writer is gone: pushes fail from now on, so the session sees its client is.
        self.queue.close();
    }
}

/// Where a frame goes: the write queue of one connection, bounded in frames and in bytes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct OutboxLimits {
    pub frames: usize,
    pub bytes: usize,
}

impl Outbox {
    pub(crate) fn new(limits: OutboxLimits) -> (Self, Frames) {
        let queue = Arc::new(FrameQueue {
            pending: Mutex::default(),
            ready: Notify::new(),
            max_frames: limits.frames.max(1),
        });
        (
            Self {
                queue: queue.clone(),
                queued_bytes: Arc::default(),
                max_bytes: limits.bytes,
                overflowed: CancellationToken::new(),
                drained: Arc::default(),
            },
            Frames { queue },
        )
    }

    /// Queues a frame without waiting. False if the connection is gone or its outbox is full
    /// (which also flags the client as a slow consumer).
    pub(crate) fn push(&self, text: Utf8Bytes) -> bool {
        self.try_send(Outgoing::text(text, None))
    }

    /// Queues a legacy client's reply, recorded `delivered` once written.
    pub(crate) fn push_written_reply(&self, text: Utf8Bytes, reply_id: i64) -> bool {
        self.try_send(Outgoing::text(text, Some(reply_id)))
    }

    pub(crate) fn push_ping(&self) -> bool {
        self.try_send(Outgoing {
            message: Message::Ping(bytes::Bytes::new()),
            reply_id: None,
            bytes: 0,
        })
    }

    /// Queues a frame only if the outbox is at most half full; drops it otherwise. For frames
    /// a client can do without (pieces of a reply whose whole text follows), so that they never
    /// get a busy client disconnected as slow.
    pub(crate) fn push_optional(&self, text: Utf8Bytes) -> bool {
        if !self.half_free() {
            return false;
        }
        let outgoing = Outgoing::text(text, None);
        let bytes = outgoing.bytes;
        self.queued_bytes.fetch_add(bytes, Ordering::Relaxed);
        if self.queue.push(outgoing).is_err() {
            self.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Resolves once more than half the outbox is free (in frames and in bytes), or the
    /// connection is gone (then false). A replay pushes only after this, so it goes at the
    /// client's reading pace and never fills the outbox: the frames that cannot wait (pings,
    /// pongs, live replies) still find room.
    pub(crate) async fn room(&self) -> bool {
        loop {
            let drained = self.drained.notified();
            tokio::pin!(drained);
            // Registered before the check, so a drain between the two is not missed.
            drained.as_mut().enable();
            if self.queue.lock().closed {
                return false;
            }
            if self.half_free() {
                return true;
            }
            drained.await;
        }
    }

    fn half_free(&self) -> bool {
        self.queue.lock().frames.len() * 2 < self.queue.max_frames
            && self.queued_bytes.load(Ordering::Relaxed) * 2 < self.max_bytes
    }

    /// Does what the writer does when it takes a frame out, for tests that take frames
    /// themselves (a replay longer than the outbox waits for room).
    #[cfg(test)]
    pub(crate) fn taken(&self, outgoing: &Outgoing) {
        self.queued_bytes
            .fetch_sub(outgoing.bytes, Ordering::Relaxed);
        self.drained.notify_waiters();
    }

    /// What the writer wakes when it takes frames out.
    pub(crate) fn drained(&self) -> Arc<Notify> {
        self.drained.clone()
    }

    /// The counter the writer takes written bytes off.
    pub(crate) fn queued_bytes(&self) -> Arc<AtomicUsize> {
        self.queued_bytes.clone()
    }

    fn try_send(&self, outgoing: Outgoing) -> bool {
        let bytes = outgoing.bytes;
        // A frame always fits into an empty outbox, however large: the byte limit is about
        // frames piling up, not about one big one.
        let queued = self.queued_bytes.fetch_add(bytes, Ordering::Relaxed);
        if queued > 0 && queued + bytes > self.max_bytes {
            self.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
            self.overflowed.cancel();
            return false;
        }
        match self.queue.push(outgoing) {
            Ok(()) => true,
            Err(refused) => {
                self.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
                if refused == PushError::Full {
                    self.overflowed.cancel();
                }
                false
            }
        }
    }

    pub(crate) fn overflowed(&self) -> &CancellationToken {
        &self.overflowed
    }
}

impl Outgoing {
    #[cfg(test)]
    pub(crate) fn message(&self) -> &Message {
        &self.message
    }

    fn text(text: Utf8Bytes, reply_id: Option<i64>) -> Self {
        Self {
            bytes: text.len(),
            message: Message::Text(text),
            reply_id,
        }
    }
}

/// How the writer should end.
#[derive(Debug)]
pub(crate) struct Closing {
    /// The close frame to send; `None` when the client closed first (its close is answered by
    /// the WebSocket layer).
    pub frame: Option<CloseFrame>,
    /// Write what is queued before closing (a graceful close), or drop it (the client is gone
    /// or too slow).
    pub drain: bool,
}

/// Drains an outbox into the socket's write half.
pub(crate) struct Writer<S> {
    /// The socket's write half (or, in tests, anything that takes messages).
    pub sink: S,
    pub frames: Frames,
    /// Woken after each batch is taken out of `frames`, and again once it is written.
    pub drained: Arc<Notify>,
    /// Bytes pushed and not yet written; the writer takes a batch off once it is written.
    pub queued_bytes: Arc<AtomicUsize>,
    pub closing: oneshot::Receiver<Closing>,
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
}

impl<S> Writer<S>
where
    S: Sink<Message, Error = axum::Error> + Unpin,
{
    pub(crate) async fn run(mut self) {
        let closing = loop {
            tokio::select! {
                biased;
                closing = &mut self.closing => break closing.ok(),
                mut batch = self.frames.take() => {
                    if batch.is_empty() {
                        break None;
                    }
                    // Frames for one client come in bursts (the acks of one store commit, the
                    // replies of the next): one turn at the back of the run queue lets the rest
                    // of a burst join this write, so it costs one syscall, not several.
                    if batch.len() < WRITE_BATCH {
                        tokio::task::yield_now().await;
                        let room = WRITE_BATCH - batch.len();
                        self.frames.top_up(&mut batch, room);
                    }
                    self.drained.notify_waiters();
                    let reply_ids: Vec<i64> = batch.iter().filter_map(|o| o.reply_id).collect();
                    let bytes: usize = batch.iter().map(|o| o.bytes).sum();
                    let (written, closing) = {
                        let write = write_all(&mut self.sink, &mut batch);
                        tokio::pin!(write);
                        tokio::select! {
                            biased;
                            closing = &mut self.closing => {
                                let closing = closing.ok();
                                // A graceful close still owes the client the batch in hand.
                                let written = if closing.as_ref().is_some_and(|c| c.drain) {
                                    tokio::time::timeout(CLOSE_TIMEOUT, write).await.is_ok_and(|w| w.is_ok())
                                } else {
                                    false
                                };
                                (written, Some(closing))
                            }
                            written = &mut write => match written {
                                Ok(()) => (true, None),
                                Err(err) => {
                                    tracing::debug!(%err, "writing to the client failed");
                                    (false, Some(None))
                                }
                            },
                        }
                    };
                    self.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
                    self.drained.notify_waiters();
                    let delivery = if written { Delivery::Delivered } else { Delivery::Failed };
                    self.record(&reply_ids, delivery);
                    if let Some(closing) = closing {
                        break closing;
                    }
                }
            }
        };
        // Boxed: its state is needed once, at the end, and would otherwise size the writer of
        // every idle connection.
        Box::pin(self.finish(closing)).await;
    }

    async fn finish(mut self, closing: Option<Closing>) {
        let drain = closing.as_ref().is_some_and(|c| c.drain);
        let mut rest = self.frames.close();
        let reply_ids: Vec<i64> = rest.iter().filter_map(|o| o.reply_id).collect();
        let delivered = drain
            && matches!(
                tokio::time::timeout(CLOSE_TIMEOUT, write_all(&mut self.sink, &mut rest)).await,
                Ok(Ok(()))
            );
        self.record(
            &reply_ids,
            if delivered {
                Delivery::Delivered
            } else {
                Delivery::Failed
            },
        );
        if let Some(frame) = closing.and_then(|c| c.frame)
            && tokio::time::timeout(CLOSE_TIMEOUT, self.sink.send(Message::Close(Some(frame))))
                .await
                .is_err()
        {
            tracing::debug!("the client did not take the close frame in time");
        }
        // Flushes the answer to a client's close, if that is how the connection ended.
        if let Ok(Err(err)) = tokio::time::timeout(CLOSE_TIMEOUT, self.sink.close()).await {
            tracing::trace!(%err, "closing the socket");
        }
    }

    fn record(&self, reply_ids: &[i64], delivery: Delivery) {
        if reply_ids.is_empty() {
            return;
        }
        let now = self.clock.now();
        for &id in reply_ids {
            self.store.record_delivery(id, delivery, now);
        }
        metrics::counter!("kaiwa_replies_total", "delivery" => delivery.as_str())
            .increment(reply_ids.len() as u64);
    }
}

async fn write_all<S>(sink: &mut S, batch: &mut VecDeque<Outgoing>) -> Result<(), axum::Error>
where
    S: Sink<Message, Error = axum::Error> + Unpin,
{
    for outgoing in batch.drain(..) {
        sink.feed(outgoing.message).await?;
    }
    sink.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;
    use crate::store::MemoryStore;
    use futures::StreamExt;
    use futures::channel::mpsc as futures_mpsc;

    fn limits(frames: usize, bytes: usize) -> OutboxLimits {
        OutboxLimits { frames, bytes }
    }

    /// A writer whose socket is a channel of capacity one: it writes only as fast as the test
    /// reads, like a client reading slowly.
    fn slow_client(
        outbox: &Outbox,
        frames: Frames,
    ) -> (futures_mpsc::Receiver<Message>, oneshot::Sender<Closing>) {
        let (sink, socket) = futures_mpsc::channel(0);
        let (close, closing) = oneshot::channel();
        let writer = Writer {
            sink: sink.sink_map_err(axum::Error::new),
            frames,
            drained: outbox.drained(),
            queued_bytes: outbox.queued_bytes(),
            closing,
            store: Arc::new(MemoryStore::default()),
            clock: Arc::new(SystemClock),
        };
        tokio::spawn(writer.run());
        (socket, close)
    }

    fn text(message: &Message) -> &str {
        match message {
            Message::Text(text) => text.as_str(),
            _ => "",
        }
    }

    #[tokio::test]
    async fn a_replay_goes_at_the_readers_pace_and_leaves_room_for_live_frames() {
        let (outbox, frames) = Outbox::new(limits(8, 1 << 20));
        let replaying = outbox.clone();
        let replay = tokio::spawn(async move {
            let mut pushed = 0;
            for id in 0..20 {
                if !replaying.room().await {
                    break;
                }
                assert!(replaying.push(format!("missed {id}").into()));
                pushed += 1;
            }
            pushed
        });
        // Let the replay run until it waits for room (nobody reads yet).
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        assert!(outbox.push("live".into()), "room was left for a live reply");
        assert!(outbox.push_ping(), "and for a ping");
        assert!(!outbox.overflowed().is_cancelled());

        let (mut socket, _close) = slow_client(&outbox, frames);
        let mut missed = Vec::new();
        let mut live = 0;
        while missed.len() < 20 {
            let message = socket.next().await.expect("the writer writes");
            match text(&message) {
                "live" => live += 1,
                "" => {}
                other => missed.push(other.to_owned()),
            }
        }
        assert_eq!(live, 1);
        let expected: Vec<String> = (0..20).map(|id| format!("missed {id}")).collect();
        assert_eq!(missed, expected, "every replayed frame, once, in order");
        assert_eq!(replay.await.expect("joins"), 20);
        assert!(!outbox.overflowed().is_cancelled(), "never counted as slow");
    }

    #[test]
    fn a_client_behind_on_large_frames_is_cut_as_early_as_on_small_ones() {
        let (outbox, _frames) = Outbox::new(limits(256, 1000));
        let large = "x".repeat(300);
        assert!(outbox.push(large.clone().into()));
        assert!(outbox.push(large.clone().into()));
        assert!(outbox.push(large.clone().into()));
        assert!(!outbox.overflowed().is_cancelled());
        assert!(
            !outbox.push(large.into()),
            "1,200 bytes do not fit in 1,000"
        );
        assert!(outbox.overflowed().is_cancelled(), "a slow consumer");

        let (outbox, _frames) = Outbox::new(limits(256, 1000));
        assert!(
            outbox.push("y".repeat(5000).into()),
            "one frame larger than the limit still fits an empty outbox"
        );
        assert!(!outbox.push("z".into()));
    }

    #[test]
    fn optional_frames_are_dropped_rather_than_filling_the_outbox() {
        let (outbox, _frames) = Outbox::new(limits(8, 1 << 20));
        let mut queued = 0;
        for _ in 0..8 {
            if outbox.push_optional("piece".into()) {
                queued += 1;
            }
        }
        assert_eq!(queued, 4, "only while at most half full");
        assert!(!outbox.overflowed().is_cancelled());
        assert!(
            outbox.push("a reply".into()),
            "the rest stays free for what matters"
        );
    }
}
