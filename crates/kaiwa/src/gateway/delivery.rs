//! Delivery: routes what workers report (processing, replies, failures) to the client's
//! session: replies of native clients into their reply stream, everything else into the outbox.
//! Records replies that found no session as failed (in a cluster, passes them on to the
//! gateway that holds the client now), and frees a message's in-flight slot at its last reply.

use super::Gateway;
use super::cluster::ClusterLink;
use super::stream::Live;
use crate::queue::Event;
use futures::StreamExt;
use futures::stream::BoxStream;
use kaiwa_protocol::{Delivery, ErrorCode, MessageStatus};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

impl Gateway {
    /// Delivers events until the stream ends or `stop` is cancelled.
    pub async fn deliver_events(
        self: &Arc<Self>,
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

    fn deliver(self: &Arc<Self>, event: Event) {
        // The session's way in, taken out of the registry so that frames are encoded without
        // holding its lock.
        let session = self.registry.with(event.client_id(), |s| {
            (s.protocol, s.outbox.clone(), s.stream.clone())
        });
        if session.is_none()
            && event.message().is_some()
            && let Some(link) = &self.cluster
        {
            // The client is not here (any more): the gateway that holds it now gets the event.
            ClusterLink::forward(self, link, event);
            return;
        }
        match event {
            Event::Processing(message) => match session {
                // Native: in order with the message's replies.
                Some((_, _, Some(stream))) => stream.processing(&message),
                Some((protocol, outbox, None)) => {
                    if let Some(frame) = protocol.status(&message, MessageStatus::Processing) {
                        outbox.push(frame);
                    }
                }
                None => {}
            },
            Event::Delta { message, delta } => {
                if let Some((protocol, outbox, _)) = session
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
                let message_id = message.message_id;
                let reply_id = reply.id;
                let handed = match session {
                    // Native: in stream order, acknowledged by the client.
                    Some((_, _, Some(stream))) => stream.offer(Live {
                        message,
                        reply,
                        last,
                    }),
                    // Legacy: delivered once written; `replied` is a native frame.
                    Some((protocol, outbox, None)) => {
                        outbox.push_written_reply(protocol.reply(&message, &reply, false), reply_id)
                    }
                    None => false,
                };
                if !handed {
                    // The client left (or is too slow): a native client gets it on resume.
                    self.store
                        .record_delivery(reply_id, Delivery::Failed, self.clock.now());
                    metrics::counter!("kaiwa_replies_total", "delivery" => "failed").increment(1);
                }
                if last {
                    let released = self.admission.in_flight.release(message_id);
                    tracing::debug!(message_id, released, "last reply handed over");
                }
            }
            Event::Failed { message, reason } => {
                self.admission.in_flight.release(message.message_id);
                if let Some((_, _, Some(stream))) = &session {
                    stream.forget(message.message_id);
                }
                if let Some((protocol, outbox, _)) = session {
                    outbox.push(protocol.error(
                        ErrorCode::ProcessingFailed,
                        reason,
                        message.client_message_id.clone(),
                        None,
                    ));
                }
            }
            Event::Replaced { client_id, conn_id } => {
                if self.registry.evict(&client_id, conn_id) {
                    tracing::info!(%client_id, conn_id, "replaced by a connection on another gateway");
                }
            }
            Event::CatchUp { seq, .. } => {
                if let Some((_, _, Some(stream))) = session {
                    stream.expect(seq);
                }
            }
            Event::Probe {
                client_id,
                conn_id,
                from,
            } => {
                if let Some(link) = &self.cluster {
                    ClusterLink::answer_probe(self, link, from, client_id, conn_id);
                }
            }
            Event::Probed {
                client_id,
                conn_id,
                alive,
            } => {
                if let Some(link) = &self.cluster {
                    link.probed(client_id, conn_id, alive);
                }
            }
        }
    }
}
