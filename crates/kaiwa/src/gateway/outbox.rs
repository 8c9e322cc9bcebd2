//! The outbox: a bounded queue of frames for one connection, and the writer task that drains it
//! into the socket and records which replies were delivered.
//!
//! The bound is what keeps a client that stops reading from growing server memory: once its
//! outbox is full, it is disconnected as a slow consumer instead.

use crate::clock::Clock;
use crate::store::Store;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures::SinkExt;
use futures::stream::SplitSink;
use kaiwa_protocol::Delivery;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// Frames written per flush, at most: one syscall carries many small frames under load.
const WRITE_BATCH: usize = 64;
/// How long closing may take for a client that does not read: bounded, so shutdown is too.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// One frame to write; `reply_id` names the stored reply it carries, if any.
#[derive(Debug)]
pub(crate) struct Outgoing {
    message: Message,
    reply_id: Option<i64>,
}

/// The sending side of a connection's outbox. Cheap to clone: the session, its message tasks
/// and the delivery task each hold one.
#[derive(Debug, Clone)]
pub(crate) struct Outbox {
    frames: mpsc::Sender<Outgoing>,
    /// Cancelled when a push found the outbox full; the session then disconnects the client.
    overflowed: CancellationToken,
    /// Woken by the writer each time it takes frames out, for pushes that wait for room.
    drained: Arc<Notify>,
}

impl Outbox {
    pub(crate) fn new(capacity: usize) -> (Self, mpsc::Receiver<Outgoing>) {
        let (frames, receiver) = mpsc::channel(capacity);
        (
            Self {
                frames,
                overflowed: CancellationToken::new(),
                drained: Arc::default(),
            },
            receiver,
        )
    }

    /// Queues a frame without waiting. False if the connection is gone or its outbox is full
    /// (which also flags the client as a slow consumer).
    pub(crate) fn push(&self, text: Utf8Bytes) -> bool {
        self.try_send(Outgoing {
            message: Message::Text(text),
            reply_id: None,
        })
    }

    pub(crate) fn push_reply(&self, text: Utf8Bytes, reply_id: i64) -> bool {
        self.try_send(Outgoing {
            message: Message::Text(text),
            reply_id: Some(reply_id),
        })
    }

    pub(crate) fn push_ping(&self) -> bool {
        self.try_send(Outgoing {
            message: Message::Ping(bytes::Bytes::new()),
            reply_id: None,
        })
    }

    /// Queues a reply, waiting for room: for replays, which may be longer than the outbox and
    /// must not count as slowness. False if the connection is gone.
    pub(crate) async fn push_reply_waiting(&self, text: Utf8Bytes, reply_id: i64) -> bool {
        self.send_leaving_room(Outgoing {
            message: Message::Text(text),
            reply_id: Some(reply_id),
        })
        .await
    }

    /// Queues a frame, waiting for room; see [`Outbox::push_reply_waiting`].
    pub(crate) async fn push_waiting(&self, text: Utf8Bytes) -> bool {
        self.send_leaving_room(Outgoing {
            message: Message::Text(text),
            reply_id: None,
        })
        .await
    }

    /// Queues a frame only if the outbox is at most half full; drops it otherwise. For frames
    /// a client can do without (pieces of a reply whose whole text follows), so that they never
    /// get a busy client disconnected as slow.
    pub(crate) fn push_optional(&self, text: Utf8Bytes) -> bool {
        if !self.half_free() {
            return false;
        }
        self.frames
            .try_send(Outgoing {
                message: Message::Text(text),
                reply_id: None,
            })
            .is_ok()
    }

    /// Waits until more than half the outbox is free, then queues: a long replay never fills
    /// it, so the frames that cannot wait (pings, pongs, live replies) still find room.
    async fn send_leaving_room(&self, outgoing: Outgoing) -> bool {
        loop {
            let drained = self.drained.notified();
            tokio::pin!(drained);
            // Registered before the check, so a drain between the two is not missed.
            drained.as_mut().enable();
            if self.frames.is_closed() {
                return false;
            }
            if self.half_free() {
                return self.frames.try_send(outgoing).is_ok();
            }
            drained.await;
        }
    }

    fn half_free(&self) -> bool {
        self.frames.capacity() * 2 > self.frames.max_capacity()
    }

    /// What the writer wakes when it takes frames out.
    pub(crate) fn drained(&self) -> Arc<Notify> {
        self.drained.clone()
    }

    fn try_send(&self, outgoing: Outgoing) -> bool {
        match self.frames.try_send(outgoing) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.overflowed.cancel();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    pub(crate) fn overflowed(&self) -> &CancellationToken {
        &self.overflowed
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
pub(crate) struct Writer {
    pub sink: SplitSink<WebSocket, Message>,
    pub frames: mpsc::Receiver<Outgoing>,
    /// Woken after each batch is taken out of `frames`.
    pub drained: Arc<Notify>,
    pub closing: oneshot::Receiver<Closing>,
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
}

impl Writer {
    pub(crate) async fn run(mut self) {
        let mut batch = Vec::with_capacity(WRITE_BATCH);
        let closing = loop {
            tokio::select! {
                biased;
                closing = &mut self.closing => break closing.ok(),
                received = self.frames.recv_many(&mut batch, WRITE_BATCH) => {
                    if received == 0 {
                        break None;
                    }
                    // Frames for one client come in bursts (the acks of one store commit, the
                    // replies of the next): one turn at the back of the run queue lets the rest
                    // of a burst join this write, so it costs one syscall, not several.
                    if batch.len() < WRITE_BATCH {
                        tokio::task::yield_now().await;
                        while batch.len() < WRITE_BATCH {
                            match self.frames.try_recv() {
                                Ok(outgoing) => batch.push(outgoing),
                                Err(_) => break,
                            }
                        }
                    }
                    self.drained.notify_waiters();
                    let reply_ids: Vec<i64> = batch.iter().filter_map(|o| o.reply_id).collect();
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
                    let delivery = if written { Delivery::Delivered } else { Delivery::Failed };
                    self.record(&reply_ids, delivery);
                    if let Some(closing) = closing {
                        break closing;
                    }
                }
            }
        };
        self.finish(closing).await;
    }

    async fn finish(mut self, closing: Option<Closing>) {
        let drain = closing.as_ref().is_some_and(|c| c.drain);
        self.frames.close();
        let mut rest = Vec::new();
        while let Ok(outgoing) = self.frames.try_recv() {
            rest.push(outgoing);
        }
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

async fn write_all(
    sink: &mut SplitSink<WebSocket, Message>,
    batch: &mut Vec<Outgoing>,
) -> Result<(), axum::Error> {
    for outgoing in batch.drain(..) {
        sink.feed(outgoing.message).await?;
    }
    sink.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_replay_leaves_room_for_frames_that_cannot_wait() {
        let (outbox, mut frames) = Outbox::new(8);
        let replaying = outbox.clone();
        let replay = tokio::spawn(async move {
            for id in 0..20 {
                if !replaying.push_reply_waiting("missed".into(), id).await {
                    break;
                }
            }
        });
        // Let the replay run until it waits for room (nobody reads the outbox yet).
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        assert!(outbox.push("a live reply".into()), "room was left");
        assert!(outbox.push_ping(), "and for a ping");
        assert!(!outbox.overflowed().is_cancelled());

        // Reading as the writer does, waking waiting pushes after each frame taken out.
        let drained = outbox.drained();
        for _ in 0..22 {
            frames.recv().await.expect("a frame");
            drained.notify_waiters();
        }
        replay
            .await
            .expect("the replay finishes once the outbox is read");
    }

    #[tokio::test]
    async fn optional_frames_are_dropped_rather_than_filling_the_outbox() {
        let (outbox, _frames) = Outbox::new(8);
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
