//! How many connections each source address holds, so that none takes more than its share of
//! a limit: the listener's HTTP connections, the gateway's handshakes.

use crate::domain::{Networks, Source};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// The connections of each source, against one cap per source.
#[derive(Debug)]
pub struct Shares {
    counts: Arc<Mutex<HashMap<Source, usize>>>,
    /// Connections one source may hold; 0 for no cap.
    limit: usize,
    /// Sources many clients share (a proxy in front): not capped.
    shared: Networks,
}

/// A source holds as many connections as it may.
#[derive(Debug, Clone, Copy)]
pub struct ShareFull {
    pub source: Source,
    pub limit: usize,
}

/// One connection's place in its source's share, given back when dropped.
#[derive(Debug)]
pub struct Share {
    counts: Arc<Mutex<HashMap<Source, usize>>>,
    source: Source,
}

impl Shares {
    pub fn new(limit: usize, shared: Networks) -> Self {
        Self {
            counts: Arc::default(),
            limit,
            shared,
        }
    }

    /// A place for a connection from `addr`: `None` when it is not capped (no cap, a shared
    /// address, or an unknown one), an error when its source holds all it may.
    pub fn take(&self, addr: Option<IpAddr>) -> Result<Option<Share>, ShareFull> {
        let Some(addr) = addr.filter(|addr| self.limit > 0 && !self.shared.contains(*addr)) else {
            return Ok(None);
        };
        let source = Source::of(addr);
        let mut counts = lock(&self.counts);
        let count = counts.entry(source).or_default();
        if *count >= self.limit {
            return Err(ShareFull {
                source,
                limit: self.limit,
            });
        }
        *count += 1;
        Ok(Some(Share {
            counts: self.counts.clone(),
            source,
        }))
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        let mut counts = lock(&self.counts);
        if let Some(count) = counts.get_mut(&self.source) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.source);
            }
        }
    }
}

fn lock(
    counts: &Mutex<HashMap<Source, usize>>,
) -> std::sync::MutexGuard<'_, HashMap<Source, usize>> {
    counts
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> Option<IpAddr> {
        Some(text.parse().expect("an address"))
    }

    #[test]
    fn a_source_gets_its_share_back_when_a_connection_ends() {
        let shares = Shares::new(2, Networks::default());
        let a = shares.take(addr("198.51.100.7")).expect("room");
        let _b = shares.take(addr("198.51.100.7")).expect("room");
        let full = shares.take(addr("198.51.100.7")).expect_err("full");
        assert_eq!(full.limit, 2);
        assert!(shares.take(addr("198.51.100.8")).is_ok(), "another source");
        drop(a);
        assert!(shares.take(addr("198.51.100.7")).is_ok(), "room again");
    }

    #[test]
    fn shared_unknown_and_uncapped_sources_hold_no_share() {
        let proxies = Networks::parse("127.0.0.0/8").expect("valid");
        let shares = Shares::new(1, proxies);
        for _ in 0..3 {
            assert!(shares.take(addr("127.0.0.1")).expect("uncapped").is_none());
            assert!(shares.take(None).expect("uncapped").is_none());
        }
        let off = Shares::new(0, Networks::default());
        assert!(off.take(addr("203.0.113.1")).expect("no cap").is_none());
    }
}
