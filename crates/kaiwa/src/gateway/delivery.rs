//! Delivery: routes what workers report (processing, replies, failures) to the client's
//! session: replies of native clients into their reply stream, everything else into the outbox.
//! Passes events for a client with no session here on to the gateway that holds it now (none,
//! in one process: a reply is then recorded failed), and frees a message's in-flight slot at
//! its last reply.

use super::Gateway;
use super::cluster::ClusterLink;
use super::outbox::Outbox;
use super::stream::{Live, ReplyStream};
use super::wire::Protocol;
use crate::queue::Event;
use futures::StreamExt;
use futures::stream::BoxStream;
use kaiwa_protocol::{Delivery, ErrorCode, MessageStatus};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// A session's way in: its protocol, its outbox, and its reply stream (native clients).
type SessionWay = (Protocol, Outbox, Option<Arc<ReplyStream>>);

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
        let finished = event.finishes();
        // The session's way in, taken out of the registry so that frames are encoded without
        // holding its lock.
        let session = self.registry.with(event.client_id(), |s| {
            (s.protocol, s.outbox.clone(), s.stream.clone())
        });
        if session.is_none() && event.message().is_some() {
            // The client is not here (any more): the gateway that holds it now gets the event.
            ClusterLink::forward(self, event);
        } else {
            self.hand(session, event);
        }
        if let Some(message_id) = finished {
            // Once the last frame is in the outbox (a drain for shutdown waits on this), and
            // wherever the client is now: the slot is this gateway's, if the message holds one
            // here at all (see `InFlight`).
            let released = self.admission.in_flight.release(message_id);
            tracing::debug!(message_id, released, "message finished");
        }
    }

    /// Hands an event to the client's session here, if it has one.
    fn hand(self: &Arc<Self>, session: Option<SessionWay>, event: Event) {
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
                    // The client is too slow (or left just now): a native client gets it on
                    // resume.
                    self.store
                        .record_delivery(reply_id, Delivery::Failed, self.clock.now());
                    metrics::counter!("kaiwa_replies_total", "delivery" => "failed").increment(1);
                }
            }
            Event::Failed { message, reason } => {
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
            } => ClusterLink::answer_probe(self, from, client_id, conn_id),
            Event::Probed {
                client_id,
                conn_id,
                alive,
            } => self.cluster.probed(client_id, conn_id, alive),
        }
    }
}
