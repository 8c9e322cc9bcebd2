//! Delivery: routes what workers report (processing, replies, failures) to the outbox of the
//! client's session, records replies that found no session as failed, and frees a message's
//! in-flight slot at its last reply. Also replays missed replies to reconnecting clients.

use super::Gateway;
use super::outbox::Outbox;
use super::wire::Protocol;
use crate::domain::ClientId;
use crate::queue::{Event, MessageRef};
use crate::store::StoreError;
use futures::StreamExt;
use futures::stream::BoxStream;
use kaiwa_protocol::{Delivery, ErrorCode, MessageStatus};
use tokio_util::sync::CancellationToken;

/// Missed replies read from the store at a time.
const REPLAY_PAGE: u32 = 200;

impl Gateway {
    /// Delivers events until the stream ends or `stop` is cancelled.
    pub async fn deliver_events(
        &self,
        mut events: BoxStream<'static, Event>,
        stop: CancellationToken,
    ) {
        loop {
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                event = events.next() => match event {
                    Some(event) => self.deliver(event),
                    None => break,
                },
            }
        }
    }

    fn deliver(&self, event: Event) {
        // The session's protocol and outbox, taken out of the registry so that frames are
        // encoded without holding its lock.
        let session = self.registry.with(&event.message().client_id, |s| {
            (s.protocol, s.outbox.clone())
        });
        match event {
            Event::Processing(message) => {
                if let Some((protocol, outbox)) = session
                    && let Some(frame) = protocol.status(&message, MessageStatus::Processing)
                {
                    outbox.push(frame);
                }
            }
            Event::Delta { message, delta } => {
                if let Some((protocol, outbox)) = session
                    && let Some(frame) = protocol.delta(&message, delta)
                {
                    outbox.push_optional(frame);
                }
            }
            Event::Reply {
                message,
                reply,
                last,
            } => {
                let queued = session.is_some_and(|(protocol, outbox)| {
                    let queued =
                        outbox.push_reply(protocol.reply(&message, &reply, false), reply.id);
                    if queued
                        && last
                        && let Some(frame) = protocol.status(&message, MessageStatus::Replied)
                    {
                        outbox.push(frame);
                    }
                    queued
                });
                if !queued {
                    // The client left (or is too slow): it can ask for this reply on reconnect.
                    self.store
                        .record_delivery(reply.id, Delivery::Failed, self.clock.now());
                    metrics::counter!("kaiwa_replies_total", "delivery" => "failed").increment(1);
                }
                if last {
                    let released = self.admission.in_flight.release(message.message_id);
                    tracing::debug!(
                        message_id = message.message_id,
                        released,
                        "last reply handed over"
                    );
                }
            }
            Event::Failed { message, reason } => {
                self.admission.in_flight.release(message.message_id);
                if let Some((protocol, outbox)) = session {
                    outbox.push(protocol.error(
                        ErrorCode::ProcessingFailed,
                        reason,
                        message.client_message_id.clone(),
                        None,
                    ));
                }
            }
        }
    }

    /// Queues every reply `client_id` missed, oldest first, then `synced`. Waits for room in the
    /// outbox rather than overflowing it. Returns how many replies were queued.
    pub(crate) async fn replay(
        &self,
        client_id: &ClientId,
        protocol: Protocol,
        outbox: &Outbox,
    ) -> Result<u32, StoreError> {
        let mut after = 0;
        let mut count = 0u32;
        loop {
            let page = self
                .store
                .missed_replies(client_id, after, REPLAY_PAGE)
                .await?;
            let Some(last) = page.last() else { break };
            after = last.reply.id;
            for missed in page {
                let message = MessageRef {
                    client_id: client_id.clone(),
                    message_id: missed.reply.message_id,
                    client_message_id: missed.client_message_id,
                };
                let frame = protocol.reply(&message, &missed.reply, true);
                if !outbox.push_reply_waiting(frame, missed.reply.id).await {
                    return Ok(count);
                }
                count += 1;
            }
        }
        if let Some(frame) = protocol.synced(count) {
            outbox.push_waiting(frame).await;
        }
        Ok(count)
    }
}
