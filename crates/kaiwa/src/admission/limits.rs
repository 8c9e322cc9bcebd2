//! Capacity limits: client slots (R13) and messages in flight (R14).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// The client slots. A connection takes one at the upgrade, before its handshake, so that
/// handshaking connections count too and the limit holds at every moment.
#[derive(Debug)]
pub struct ConnectionSlots {
    slots: Arc<Semaphore>,
    max: usize,
}

/// One taken client slot, given back when dropped.
#[derive(Debug)]
pub struct ConnectionSlot(#[allow(dead_code)] OwnedSemaphorePermit);

impl ConnectionSlots {
    pub fn new(max: usize) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    pub fn try_acquire(&self) -> Option<ConnectionSlot> {
        self.slots
            .clone()
            .try_acquire_owned()
            .ok()
            .map(ConnectionSlot)
    }

    pub fn in_use(&self) -> usize {
        self.max - self.slots.available_permits()
    }
}

/// Where an accepted message's in-flight slot on its gateway ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotEnds {
    /// At the message's last reply, handed out by this gateway: the gateway keeps the limit.
    AtLastReply,
    /// Once the message is queued: the store keeps the limit, counting the message until its
    /// replies are stored across every process that shares it (a cluster, whose replies may
    /// reach the client through another gateway). The slot here only bounds what this gateway
    /// waits on while admitting.
    WhenQueued,
}

/// Messages between acceptance and their last reply, across all clients.
///
/// A message takes a permit before it is stored as accepted and keeps it, parked here under its
/// id, until the gateway has handed out its last reply (or, as [`SlotEnds`] says, until it is
/// queued). Parking permits by id (rather than moving them along with the job) is what lets a
/// job cross a process boundary.
#[derive(Debug)]
pub struct InFlight {
    permits: Arc<Semaphore>,
    max: usize,
    ends: SlotEnds,
    parked: Mutex<HashMap<i64, InFlightSlot>>,
    peak: AtomicUsize,
    /// Woken at every release, for shutdown to wait until nothing is in flight.
    released: Notify,
}

/// The permits one accepted message holds: one of the global ones and one of its client's.
#[derive(Debug)]
pub struct InFlightSlot {
    _global: OwnedSemaphorePermit,
    _client: Option<OwnedSemaphorePermit>,
}

impl InFlight {
    pub fn new(max: usize, ends: SlotEnds) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max)),
            max,
            ends,
            parked: Mutex::new(HashMap::new()),
            peak: AtomicUsize::new(0),
            released: Notify::new(),
        }
    }

    /// Waits up to `wait` for a permit; `None` means the server is saturated and the client
    /// should retry. Waiters are served in arrival order.
    pub async fn acquire(
        &self,
        client: Option<OwnedSemaphorePermit>,
        wait: Duration,
    ) -> Option<InFlightSlot> {
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => tokio::time::timeout(wait, self.permits.clone().acquire_owned())
                .await
                .ok()?
                .ok()?,
        };
        self.peak.fetch_max(self.current(), Ordering::Relaxed);
        Some(InFlightSlot {
            _global: permit,
            _client: client,
        })
    }

    /// Keeps the slot of a message that is being queued until [`InFlight::release`] is called
    /// with the same message id, or lets it go now (see [`SlotEnds`]).
    pub fn park(&self, message_id: i64, slot: InFlightSlot) {
        match self.ends {
            SlotEnds::AtLastReply => {
                self.lock().insert(message_id, slot);
            }
            SlotEnds::WhenQueued => {
                drop(slot);
                self.released.notify_waiters();
            }
        }
    }

    /// Frees the slot of a message; false if it held none (already released, or parked by
    /// another process: a job may cross a process boundary).
    pub fn release(&self, message_id: i64) -> bool {
        let slot = self.lock().remove(&message_id);
        let released = slot.is_some();
        drop(slot);
        if released {
            self.released.notify_waiters();
        }
        released
    }

    /// Whether the message holds a slot here: it is queued or being processed.
    pub fn holds(&self, message_id: i64) -> bool {
        self.lock().contains_key(&message_id)
    }

    /// Resolves once no message is in flight.
    pub async fn idle(&self) {
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            // Registered before the check, so a release between the two is not missed.
            released.as_mut().enable();
            if self.current() == 0 {
                return;
            }
            released.await;
        }
    }

    /// Waits up to `grace` for every message in flight to get its last reply: the drain of a
    /// shutdown. False if some are still in flight when it is over.
    pub async fn idle_within(&self, grace: Duration) -> bool {
        tokio::time::timeout(grace, self.idle()).await.is_ok()
    }

    pub fn current(&self) -> usize {
        self.max - self.permits.available_permits()
    }

    /// The most messages ever in flight at once since start.
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    pub fn max(&self) -> usize {
        self.max
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i64, InFlightSlot>> {
        // The map is only ever inserted into and removed from; a panic elsewhere cannot leave
        // it half-updated, so a poisoned lock is safe to keep using.
        self.parked
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_parked_slot_is_held_until_released() {
        let in_flight = InFlight::new(1, SlotEnds::AtLastReply);
        let slot = in_flight
            .acquire(None, Duration::ZERO)
            .await
            .expect("one permit is free");
        in_flight.park(7, slot);
        assert_eq!(in_flight.current(), 1);
        assert!(
            in_flight
                .acquire(None, Duration::from_millis(1))
                .await
                .is_none()
        );
        assert!(in_flight.release(7));
        assert!(!in_flight.release(7), "a second release finds nothing");
        assert_eq!(in_flight.current(), 0);
        assert_eq!(in_flight.peak(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_message_waits_for_a_slot_exactly_as_long_as_it_may() {
        let in_flight = Arc::new(InFlight::new(1, SlotEnds::AtLastReply));
        let taken = in_flight
            .acquire(None, Duration::ZERO)
            .await
            .expect("one permit is free");
        let started = tokio::time::Instant::now();
        assert!(
            in_flight
                .acquire(None, Duration::from_secs(10))
                .await
                .is_none(),
            "busy"
        );
        assert_eq!(started.elapsed(), Duration::from_secs(10));

        // A slot freed during the wait is taken at that moment.
        let waiting = in_flight.clone();
        let waiter = tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            let slot = waiting.acquire(None, Duration::from_secs(10)).await;
            (slot.is_some(), started.elapsed())
        });
        tokio::time::sleep(Duration::from_secs(3)).await;
        drop(taken);
        assert_eq!(waiter.await.expect("joins"), (true, Duration::from_secs(3)));
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_waits_for_messages_in_flight_up_to_the_grace_period_and_no_longer() {
        let in_flight = Arc::new(InFlight::new(2, SlotEnds::AtLastReply));
        let slot = in_flight
            .acquire(None, Duration::ZERO)
            .await
            .expect("a permit");
        in_flight.park(1, slot);
        let started = tokio::time::Instant::now();
        assert!(!in_flight.idle_within(Duration::from_secs(10)).await);
        assert_eq!(started.elapsed(), Duration::from_secs(10));

        // The last reply comes in the fourth second of the grace period: the drain ends then.
        let releasing = in_flight.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(4)).await;
            releasing.release(1);
        });
        let started = tokio::time::Instant::now();
        assert!(in_flight.idle_within(Duration::from_secs(10)).await);
        assert_eq!(started.elapsed(), Duration::from_secs(4));
    }

    #[tokio::test]
    async fn a_slot_that_ends_when_queued_is_free_once_parked() {
        let in_flight = InFlight::new(1, SlotEnds::WhenQueued);
        let slot = in_flight
            .acquire(None, Duration::ZERO)
            .await
            .expect("one permit is free");
        assert_eq!(in_flight.current(), 1, "held while the message is admitted");
        in_flight.park(7, slot);
        assert_eq!(in_flight.current(), 0);
        assert!(!in_flight.holds(7));
        assert!(
            !in_flight.release(7),
            "the last reply finds nothing to free"
        );
        assert!(in_flight.idle_within(Duration::ZERO).await);
    }

    #[test]
    fn slots_are_counted_while_held() {
        let slots = ConnectionSlots::new(2);
        let first = slots.try_acquire();
        let second = slots.try_acquire();
        assert!(first.is_some() && second.is_some());
        assert!(slots.try_acquire().is_none());
        assert_eq!(slots.in_use(), 2);
        drop(first);
        assert_eq!(slots.in_use(), 1);
    }
}
