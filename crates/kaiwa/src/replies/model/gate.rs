//! The gate in front of the provider: a cap on calls at once, and one cool-down shared by all
//! calls after the provider says "too many requests".

use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio::time::Instant;

#[derive(Debug)]
pub(crate) struct Gate {
    calls: Semaphore,
    /// Until when nobody may call: set by a 429, honoured by every call.
    cool_down_until: Mutex<Option<Instant>>,
}

impl Gate {
    pub(crate) fn new(concurrency: usize) -> Self {
        Self {
            calls: Semaphore::new(concurrency),
            cool_down_until: Mutex::new(None),
        }
    }

    /// Waits out any cool-down, then for a free call.
    pub(crate) async fn enter(&self) -> Option<SemaphorePermit<'_>> {
        loop {
            if let Some(until) = self.cooling_until() {
                tokio::time::sleep_until(until).await;
            }
            let permit = self.calls.acquire().await.ok()?;
            // A 429 may have arrived while this call waited for its turn.
            if self.cooling_until().is_none() {
                return Some(permit);
            }
        }
    }

    /// Pauses every call for `pause` (extending a cool-down already running, never shortening).
    pub(crate) fn cool_down(&self, pause: Duration) {
        let until = Instant::now() + pause;
        let mut current = self.lock();
        if current.is_none_or(|existing| existing < until) {
            *current = Some(until);
        }
    }

    fn cooling_until(&self) -> Option<Instant> {
        let mut current = self.lock();
        match *current {
            Some(until) if until > Instant::now() => Some(until),
            Some(_) => {
                *current = None;
                None
            }
            None => None,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.cool_down_until
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_cool_down_holds_every_caller_until_it_ends() {
        let gate = Gate::new(4);
        gate.cool_down(Duration::from_secs(3));
        let started = Instant::now();
        let (a, b) = tokio::join!(gate.enter(), gate.enter());
        assert!(a.is_some() && b.is_some());
        assert!(started.elapsed() >= Duration::from_secs(3));
        // A shorter cool-down does not cut a longer one short.
        gate.cool_down(Duration::from_secs(10));
        gate.cool_down(Duration::from_secs(1));
        let started = Instant::now();
        drop((a, b));
        let _permit = gate.enter().await;
        assert!(started.elapsed() >= Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn calls_past_the_cap_wait_their_turn() {
        let gate = Gate::new(1);
        let first = gate.enter().await;
        assert!(
            tokio::time::timeout(Duration::from_secs(1), gate.enter())
                .await
                .is_err()
        );
        drop(first);
        assert!(gate.enter().await.is_some());
    }
}
