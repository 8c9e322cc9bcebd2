//! Routing an event to the gateway that holds its client: the one step workers and gateways
//! share when they pass a client's events on, and where an outage must stay a delay. Only
//! "no gateway holds this client" is an answer; a broker or database that is away, or a
//! gateway that is only reconnecting to the broker, is waited out.

use super::Presence;
use crate::domain::GatewayId;
use crate::queue::{Event, Queue, Routed};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long an event keeps trying a gateway that presence names but whose queue takes nothing:
/// it is declaring its queue again after the broker came back, or it died and its lease has
/// not run out yet. After that the event counts as having found no gateway.
const PATIENCE: Duration = Duration::from_secs(10);
const FIRST_RETRY: Duration = Duration::from_millis(50);
const MAX_RETRY: Duration = Duration::from_secs(1);

/// The routing stopped before it knew: the process is shutting down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("stopped before the event was routed")]
pub struct Stopped;

/// Sends `event` to the gateway that holds its client. `guess` is where it most likely is (the
/// gateway that admitted the message, or where the last event went): tried first, and left
/// naming the gateway that took the event. A client presence places on `not_here` counts as
/// held by no gateway (that gateway asks, having found no session for it).
pub async fn route(
    presence: &dyn Presence,
    queue: &dyn Queue,
    guess: &mut Option<GatewayId>,
    not_here: Option<&GatewayId>,
    event: &Event,
    stop: &CancellationToken,
) -> Result<Routed, Stopped> {
    let taken = route_all(
        presence,
        queue,
        guess,
        not_here,
        std::slice::from_ref(event),
        stop,
    )
    .await?;
    Ok(if taken == 1 {
        Routed::Delivered
    } else {
        Routed::NoGateway
    })
}

/// Sends `events`, all of one client's, as [`route`] sends one: in order, and in one message
/// where the broker can carry them so. Returns how many, from the first, a gateway took; the
/// rest found none.
pub async fn route_all(
    presence: &dyn Presence,
    queue: &dyn Queue,
    guess: &mut Option<GatewayId>,
    not_here: Option<&GatewayId>,
    events: &[Event],
    stop: &CancellationToken,
) -> Result<usize, Stopped> {
    let Some(first) = events.first() else {
        return Ok(0);
    };
    let started = Instant::now();
    let mut retry = FIRST_RETRY;
    let mut sent = 0;
    loop {
        let (gateway, guessed) = match guess.take() {
            Some(gateway) => (gateway, true),
            None => match presence.holder(first.client_id()).await {
                Ok(Some(gateway)) if Some(&gateway) != not_here => (gateway, false),
                Ok(_) => return Ok(sent),
                Err(err) if err.is_transient() => {
                    tracing::debug!(%err, "presence is unavailable; routing the event again shortly");
                    pause(&mut retry, stop).await?;
                    continue;
                }
                Err(err) => {
                    // Not an outage: waiting would not help. The client reads what it missed
                    // back from the store when it resumes.
                    tracing::error!(%err, "could not find the client's gateway");
                    return Ok(sent);
                }
            },
        };
        let taken = queue
            .publish_events(&gateway, events[sent..].to_vec())
            .await
            .map_err(|_| Stopped)?;
        sent += taken;
        if sent == events.len() {
            *guess = Some(gateway);
            return Ok(sent);
        }
        // A guess that was wrong: the client is looked up at once.
        if guessed && taken == 0 {
            continue;
        }
        if started.elapsed() >= PATIENCE {
            tracing::debug!(%gateway, "the client's gateway takes no events; given up");
            return Ok(sent);
        }
        pause(&mut retry, stop).await?;
    }
}

async fn pause(retry: &mut Duration, stop: &CancellationToken) -> Result<(), Stopped> {
    tokio::select! {
        () = stop.cancelled() => return Err(Stopped),
        () = tokio::time::sleep(*retry) => {}
    }
    *retry = (*retry * 2).min(MAX_RETRY);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ClientId;
    use crate::presence::{Claim, ClusterCounts, Lessee, PresenceError};
    use crate::queue::{Job, MessageRef, QueueError, Taken};
    use async_trait::async_trait;
    use futures::stream::BoxStream;
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    /// Presence that answers `holder` from a script, then with its last answer for good.
    struct Scripted(Mutex<VecDeque<Result<Option<&'static str>, bool>>>);

    impl Scripted {
        fn new(answers: impl IntoIterator<Item = Result<Option<&'static str>, bool>>) -> Self {
            Self(Mutex::new(answers.into_iter().collect()))
        }
    }

    #[async_trait]
    impl Presence for Scripted {
        async fn holder(&self, _: &ClientId) -> Result<Option<GatewayId>, PresenceError> {
            let mut answers = self.0.lock().expect("not poisoned");
            let answer = if answers.len() > 1 {
                answers.pop_front()
            } else {
                answers.front().cloned()
            };
            match answer.expect("an answer") {
                Ok(holder) => Ok(holder.map(GatewayId::new)),
                Err(true) => Err(PresenceError::Unavailable("down".into())),
                Err(false) => Err(PresenceError::Database("a bug".into())),
            }
        }
        async fn take_slot(&self, _: u64, _: u32) -> Result<Option<u32>, PresenceError> {
            unimplemented!()
        }
        async fn release_slot(&self, _: u32, _: u64) {}
        async fn claim(&self, _: &ClientId, _: u64, _: bool) -> Result<Claim, PresenceError> {
            unimplemented!()
        }
        async fn release(&self, _: &ClientId, _: u64) {}
        async fn counts(&self) -> Result<Option<ClusterCounts>, PresenceError> {
            unimplemented!()
        }
        async fn join(&self, _: u32) -> Result<(), PresenceError> {
            unimplemented!()
        }
        async fn keep_lease(&self, _: u32, _: CancellationToken, _: Arc<dyn Lessee>) {
            unimplemented!()
        }
    }

    /// A broker on which the gateways in `listening` take events, from the given time on.
    struct Broker {
        listening: Vec<(&'static str, Instant)>,
        sent_to: Mutex<Vec<String>>,
    }

    #[async_trait]
    impl Queue for Broker {
        async fn publish_job(&self, _: Job) -> Result<(), QueueError> {
            unimplemented!()
        }
        fn jobs(&self) -> Result<BoxStream<'static, Taken>, QueueError> {
            unimplemented!()
        }
        async fn publish_event(&self, gateway: &GatewayId, _: Event) -> Result<Routed, QueueError> {
            self.sent_to
                .lock()
                .expect("not poisoned")
                .push(gateway.to_string());
            let listens = self
                .listening
                .iter()
                .any(|(id, from)| *id == gateway.as_str() && Instant::now() >= *from);
            Ok(if listens {
                Routed::Delivered
            } else {
                Routed::NoGateway
            })
        }
        fn events(&self, _: &GatewayId) -> Result<BoxStream<'static, Event>, QueueError> {
            unimplemented!()
        }
        async fn depth(&self) -> Option<usize> {
            None
        }
    }

    fn broker(listening: &[(&'static str, Duration)]) -> Broker {
        let now = Instant::now();
        Broker {
            listening: listening
                .iter()
                .map(|(id, after)| (*id, now + *after))
                .collect(),
            sent_to: Mutex::new(Vec::new()),
        }
    }

    fn event() -> Event {
        Event::Processing(MessageRef {
            client_id: ClientId::parse("amy").expect("an id"),
            message_id: 1,
            client_message_id: None,
            receipt: None,
        })
    }

    async fn route_from(
        presence: &Scripted,
        queue: &Broker,
        guess: Option<&str>,
        not_here: Option<&str>,
    ) -> (Result<Routed, Stopped>, Option<GatewayId>) {
        let mut guess = guess.map(GatewayId::new);
        let not_here = not_here.map(GatewayId::new);
        let routed = route(
            presence,
            queue,
            &mut guess,
            not_here.as_ref(),
            &event(),
            &CancellationToken::new(),
        )
        .await;
        (routed, guess)
    }

    #[tokio::test(start_paused = true)]
    async fn a_wrong_guess_is_followed_by_a_lookup_at_once() {
        let presence = Scripted::new([Ok(Some("gw-2"))]);
        let queue = broker(&[("gw-2", Duration::ZERO)]);
        let started = Instant::now();
        let (routed, guess) = route_from(&presence, &queue, Some("gw-1"), None).await;
        assert_eq!(routed, Ok(Routed::Delivered));
        assert_eq!(guess, Some(GatewayId::new("gw-2")));
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert_eq!(
            *queue.sent_to.lock().expect("not poisoned"),
            ["gw-1", "gw-2"]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_outage_of_presence_is_waited_out() {
        let presence = Scripted::new([Err(true), Err(true), Err(true), Ok(Some("gw-1"))]);
        let queue = broker(&[("gw-1", Duration::ZERO)]);
        let (routed, _) = route_from(&presence, &queue, None, None).await;
        assert_eq!(routed, Ok(Routed::Delivered));
    }

    #[tokio::test(start_paused = true)]
    async fn a_named_gateway_that_is_declaring_its_queue_again_gets_the_event() {
        // After an outage of the broker, workers can be back before a gateway's queue is.
        let presence = Scripted::new([Ok(Some("gw-1"))]);
        let queue = broker(&[("gw-1", Duration::from_secs(3))]);
        let started = Instant::now();
        let (routed, _) = route_from(&presence, &queue, None, None).await;
        assert_eq!(routed, Ok(Routed::Delivered));
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(3) && waited <= Duration::from_secs(4),
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_gateway_that_never_takes_the_event_is_given_up_after_the_patience() {
        let presence = Scripted::new([Ok(Some("gw-dead"))]);
        let queue = broker(&[]);
        let started = Instant::now();
        let (routed, _) = route_from(&presence, &queue, None, None).await;
        assert_eq!(routed, Ok(Routed::NoGateway));
        let waited = started.elapsed();
        assert!(
            waited >= PATIENCE && waited <= PATIENCE + MAX_RETRY,
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn no_holder_a_holder_that_is_the_asker_and_a_bug_are_no_gateway_at_once() {
        for (answer, not_here) in [
            (Ok(None), None),
            (Ok(Some("gw-1")), Some("gw-1")),
            (Err(false), None),
        ] {
            let presence = Scripted::new([answer]);
            let queue = broker(&[("gw-1", Duration::ZERO)]);
            let started = Instant::now();
            let (routed, _) = route_from(&presence, &queue, None, not_here).await;
            assert_eq!(routed, Ok(Routed::NoGateway));
            assert_eq!(started.elapsed(), Duration::ZERO);
            assert!(queue.sent_to.lock().expect("not poisoned").is_empty());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn stopping_ends_the_wait() {
        let presence = Scripted::new([Err(true)]);
        let queue = broker(&[]);
        let stop = CancellationToken::new();
        let stopper = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(30)).await;
            stopper.cancel();
        });
        let routed = route(&presence, &queue, &mut None, None, &event(), &stop).await;
        assert_eq!(routed, Err(Stopped));
    }
}
