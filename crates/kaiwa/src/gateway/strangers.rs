//! Connections in their handshake: upgraded, not yet verified. They live in a small pool of
//! their own, capped overall and per source address, so that strangers can never hold what
//! clients need. When the pool is full, the oldest makes room for the newcomer: a client that
//! sends its handshake at once is verified long before it becomes the oldest, while a stranger
//! that sends nothing only ever takes another stranger's place.

use crate::listener::{Share, ShareFull, Shares};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;

/// The pool of connections in their handshake.
pub(crate) struct Strangers {
    pool: Arc<Mutex<Pool>>,
    /// Connections in the pool at once.
    capacity: usize,
    /// Each source's share of the pool.
    shares: Shares,
}

#[derive(Default)]
struct Pool {
    next: u64,
    /// By arrival: the first is the oldest.
    waiting: BTreeMap<u64, Waiting>,
}

struct Waiting {
    /// Its source's share, given back when it leaves; `None` for a source not capped.
    _share: Option<Share>,
    /// Cancelled when a newcomer takes this connection's place.
    crowded_out: CancellationToken,
}

/// A connection's place in the pool, given back when it is dropped.
pub(crate) struct Pass {
    pool: Arc<Mutex<Pool>>,
    id: u64,
    crowded_out: CancellationToken,
}

impl Strangers {
    /// A pool of `capacity` places, each source's share of them kept by `shares`.
    pub(crate) fn new(capacity: usize, shares: Shares) -> Self {
        Self {
            pool: Arc::default(),
            capacity: capacity.max(1),
            shares,
        }
    }

    /// Takes a place in the pool for a connection from `addr` (`None` when unknown: not capped
    /// per source): refused when its source has as many as it may; when the pool is full, the
    /// oldest connection in it is crowded out.
    pub(crate) fn admit(&self, addr: Option<IpAddr>) -> Result<Pass, ShareFull> {
        let share = self.shares.take(addr)?;
        let mut pool = self.lock();
        while pool.waiting.len() >= self.capacity {
            let Some((_, oldest)) = pool.waiting.pop_first() else {
                break;
            };
            oldest.crowded_out.cancel();
            metrics::counter!("kaiwa_handshakes_crowded_out_total").increment(1);
        }
        let id = pool.next;
        pool.next += 1;
        let crowded_out = CancellationToken::new();
        pool.waiting.insert(
            id,
            Waiting {
                _share: share,
                crowded_out: crowded_out.clone(),
            },
        );
        metrics::gauge!("kaiwa_handshakes").set(pool.waiting.len() as f64);
        Ok(Pass {
            pool: self.pool.clone(),
            id,
            crowded_out,
        })
    }

    /// Connections in their handshake now.
    pub(crate) fn len(&self) -> usize {
        self.lock().waiting.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.pool
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Pass {
    /// Resolves when a newcomer took this connection's place.
    pub(crate) async fn crowded_out(&self) {
        self.crowded_out.cancelled().await;
    }
}

impl Drop for Pass {
    fn drop(&mut self) {
        let mut pool = self
            .pool
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // A connection crowded out has left the pool already (and its source's share with it).
        pool.waiting.remove(&self.id);
        metrics::gauge!("kaiwa_handshakes").set(pool.waiting.len() as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Networks;

    /// A pool of `capacity`, with `per_source` places for a source (loopback not capped).
    fn strangers(capacity: usize, per_source: usize) -> Strangers {
        let loopback = Networks::parse("127.0.0.0/8,::1").expect("valid");
        Strangers::new(capacity, Shares::new(per_source, loopback))
    }

    fn addr(text: &str) -> IpAddr {
        text.parse().expect("an address")
    }

    #[test]
    fn a_full_pool_crowds_out_its_oldest_connection() {
        let pool = strangers(2, 16);
        let first = pool.admit(Some(addr("192.0.2.1"))).expect("room");
        let second = pool.admit(Some(addr("192.0.2.2"))).expect("room");
        assert!(!first.crowded_out.is_cancelled());
        let third = pool
            .admit(Some(addr("192.0.2.3")))
            .expect("the oldest makes room");
        assert!(first.crowded_out.is_cancelled());
        assert!(!second.crowded_out.is_cancelled());
        assert_eq!(pool.len(), 2);
        drop(first);
        assert_eq!(pool.len(), 2, "a crowded-out pass was already gone");
        drop(second);
        drop(third);
        assert_eq!(pool.len(), 0);
    }

    #[test]
    fn one_source_may_hold_only_its_share_and_gets_it_back() {
        let pool = strangers(1024, 2);
        let a = pool.admit(Some(addr("198.51.100.7"))).expect("room");
        let _b = pool.admit(Some(addr("198.51.100.7"))).expect("room");
        let full = pool
            .admit(Some(addr("198.51.100.7")))
            .err()
            .expect("the source is full");
        assert_eq!(full.limit, 2);
        // Another address is not held back, nor another host of a different /64.
        let _other = pool.admit(Some(addr("198.51.100.8"))).expect("room");
        drop(a);
        let _again = pool.admit(Some(addr("198.51.100.7"))).expect("room again");
    }

    #[test]
    fn shared_addresses_and_a_cap_of_zero_are_not_capped_per_source() {
        let behind_proxy = strangers(1024, 1);
        let _unknown = behind_proxy
            .admit(None)
            .expect("an unknown source is not capped");
        let _also = behind_proxy
            .admit(None)
            .expect("an unknown source is not capped");
        let _a = behind_proxy.admit(Some(addr("127.0.0.1"))).expect("room");
        let _b = behind_proxy
            .admit(Some(addr("127.0.0.1")))
            .expect("loopback is a proxy by default");
        let uncapped = strangers(1024, 0);
        let _c = uncapped.admit(Some(addr("203.0.113.1"))).expect("room");
        let _d = uncapped.admit(Some(addr("203.0.113.1"))).expect("no cap");
    }
}
