//! Delivery: routes what workers report (processing, replies, failures) to the client's
//! session: replies of native clients into their reply stream, everything else into the outbox.
//! Passes events for a client with no session here on to the gateway that holds it now (none,
//! in one process: a reply is then recorded failed), and frees a message's in-flight slot at
//! its last reply.

use super::Gateway;
use super::outbox::Outbox;
use super::stream::{Live, ReplyStream};
use super::wire::Protocol;
use crate::queue::Event;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use futures::stream::BoxStream;
use kaiwa_protocol::MessageStatus;
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
            self.forward(event);
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
                let receipt = message.receipt.filter(|_| last);
                let handed = match session {
                    // Native: in stream order, acknowledged by the client.
                    Some((_, _, Some(stream))) => stream.offer(Live {
                        message,
                        reply,
                        last,
                    }),
                    // Legacy: delivered once written; `replied` is a native frame.
                    Some((protocol, outbox, None)) => {
                        outbox.push_written_reply(protocol.reply(&message, reply, false), reply_id)
                    }
                    None => false,
                };
                if !handed {
                    // The client is too slow (or left just now): a native client gets it on
                    // resume.
                    self.store.record_undelivered(reply_id, self.clock.now());
                } else if let Some(receipt) = receipt {
                    metrics::histogram!("kaiwa_message_reply_seconds", "type" => receipt.kind.as_str())
                        .record(seconds_since(receipt.received_at, self.clock.now()));
                }
            }
            Event::Failed { message, reason } => {
                if let Some((_, _, Some(stream))) = &session {
                    stream.forget(message.message_id);
                }
                if let Some((protocol, outbox, _)) = session
                    && let Some(frame) = protocol.processing_failed(&message, reason)
                {
                    outbox.push(frame);
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
            } => self.answer_probe(from, client_id, conn_id),
            Event::Probed {
                client_id,
                conn_id,
                alive,
            } => self.cluster.probed(client_id, conn_id, alive),
        }
    }
}

/// Seconds from `then` to `now`; none if the clocks of two processes disagree so far that
/// `now` comes first.
pub(super) fn seconds_since(then: DateTime<Utc>, now: DateTime<Utc>) -> f64 {
    (now - then)
        .to_std()
        .map_or(0.0, |elapsed| elapsed.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DuplicatePolicy;
    use crate::domain::ClientId;
    use crate::gateway::registry::{Liveness, SessionHandle};
    use crate::queue::MessageRef;
    use crate::store::{Store, StoredReply};
    use crate::testing::Fixture;
    use axum::extract::ws::Message;
    use chrono::Utc;
    use kaiwa_protocol::ReplyType;
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    fn alice() -> ClientId {
        ClientId::parse("alice").expect("valid")
    }

    /// A message of alice's, stored with one reply, holding an in-flight slot here.
    async fn in_flight(fixture: &Fixture) -> (MessageRef, StoredReply) {
        let store = &fixture.store;
        let message = crate::testing::accepted_text("alice", Some("m1"), "hello");
        let message_id = crate::testing::stored(store.as_ref(), message).await;
        let reply = crate::testing::reply(ReplyType::Text, "hi there");
        let mut stored = store
            .insert_replies(message_id, &alice(), vec![reply], Utc::now(), true)
            .await
            .expect("stored");
        let in_flight = &fixture.gateway.admission.in_flight;
        let slot = in_flight
            .acquire(None, Duration::ZERO)
            .await
            .expect("a slot");
        in_flight.park(message_id, slot);
        let message = MessageRef {
            client_id: alice(),
            message_id,
            client_message_id: Some("m1".into()),
            receipt: None,
        };
        (message, stored.remove(0))
    }

    /// Registers a legacy session for alice; returns what its outbox sends.
    fn legacy_session(fixture: &Fixture) -> crate::gateway::outbox::Frames {
        let gateway = &fixture.gateway;
        let (outbox, frames) = Outbox::new(gateway.settings.outbox);
        let handle = SessionHandle {
            conn_id: 1,
            protocol: Protocol::Legacy,
            outbox,
            stream: None,
            replaced: CancellationToken::new(),
            moved: Arc::new(AtomicBool::new(false)),
            liveness: Arc::new(Liveness::default()),
        };
        gateway
            .registry
            .register(alice(), handle, DuplicatePolicy::Refuse)
            .expect("registered");
        frames
    }

    fn texts(frames: &mut crate::gateway::outbox::Frames) -> Vec<serde_json::Value> {
        std::iter::from_fn(|| frames.try_recv())
            .filter_map(|outgoing| match outgoing.message() {
                Message::Text(text) => serde_json::from_str(text.as_str()).ok(),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn a_reply_for_a_client_here_goes_to_its_outbox_and_the_last_frees_the_slot() {
        let fixture = Fixture::new(&[]);
        let mut frames = legacy_session(&fixture);
        let (message, reply) = in_flight(&fixture).await;
        let message_id = message.message_id;
        fixture.gateway.deliver(Event::Reply {
            message,
            reply,
            last: true,
        });
        let sent = texts(&mut frames);
        assert_eq!(sent.len(), 1, "{sent:?}");
        assert!(sent[0].to_string().contains("hi there"), "{sent:?}");
        assert!(!fixture.gateway.admission.in_flight.holds(message_id));
    }

    #[tokio::test]
    async fn a_reply_for_a_client_that_left_is_recorded_failed_and_still_frees_the_slot() {
        let fixture = Fixture::new(&[]);
        let (message, reply) = in_flight(&fixture).await;
        let (message_id, reply_id) = (message.message_id, reply.id);
        fixture.gateway.deliver(Event::Reply {
            message,
            reply,
            last: true,
        });
        assert!(!fixture.gateway.admission.in_flight.holds(message_id));
        // Passed on first, to whichever gateway holds the client: in one process, none.
        loop {
            let stored = fixture.store.message(message_id).await.expect("read");
            let stored = stored.expect("stored");
            if stored
                .replies
                .iter()
                .any(|r| r.id == reply_id && r.delivery == kaiwa_protocol::Delivery::Failed)
            {
                break;
            }
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn a_failed_message_frees_its_slot_and_the_client_is_told() {
        let fixture = Fixture::new(&[]);
        let mut frames = legacy_session(&fixture);
        let (message, _) = in_flight(&fixture).await;
        let message_id = message.message_id;
        fixture.gateway.deliver(Event::Failed {
            message,
            reason: "the disk is full".into(),
        });
        assert!(!fixture.gateway.admission.in_flight.holds(message_id));
        let sent = texts(&mut frames);
        assert_eq!(sent.len(), 1, "{sent:?}");
        assert!(sent[0].to_string().contains("the disk is full"), "{sent:?}");
    }

    #[tokio::test]
    async fn an_interim_event_for_a_client_that_left_frees_nothing() {
        let fixture = Fixture::new(&[]);
        let (message, reply) = in_flight(&fixture).await;
        let message_id = message.message_id;
        fixture.gateway.deliver(Event::Processing(message.clone()));
        fixture.gateway.deliver(Event::Reply {
            message,
            reply,
            last: false,
        });
        assert!(
            fixture.gateway.admission.in_flight.holds(message_id),
            "only the last reply frees the slot"
        );
    }
}
