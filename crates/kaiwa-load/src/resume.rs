//! Coming back after a connection ends under a client (`--reconnect`), as a good native client
//! does (docs/protocol.md, "Reply streams and resume"): to the same URL, after a backoff with
//! jitter, for as long as the run lets it, with a `hello` whose `after` is the last reply the
//! client processed, so the server replays every later one exactly once.

use crate::connect::{self, Attempt, Shared, Welcome, Ws};
use crate::ledger::Ledger;
use crate::plan::ClientPlan;
use crate::report::Live;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use std::time::Duration;
use tokio::time::Instant;

/// The first wait before reconnecting: long enough for a restarted process to be listening
/// again, short enough that an outage of a blink costs about that.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// The longest wait between attempts, so a client notices the server back within about that.
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Waits that double from [`BACKOFF_MIN`] to [`BACKOFF_MAX`], each stretched or shrunk by up
/// to half at random, so that the clients of a killed gateway do not all come back at once.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
    rng: StdRng,
}

impl Backoff {
    pub fn new(seed: u64) -> Self {
        Self {
            next: BACKOFF_MIN,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// The wait before the next attempt.
    pub fn wait(&mut self) -> Duration {
        let base = self.next;
        self.next = (base * 2).min(BACKOFF_MAX);
        base.mul_f64(self.rng.random_range(0.5..1.5))
    }
}

/// How reconnecting ended.
#[derive(Debug)]
pub enum Resumed {
    /// A new connection, welcomed, with the replay under way.
    Connected(Box<Ws>, Welcome),
    /// The run stopped, or `until` came, before a connection was had.
    OutOfTime,
    /// The server said not to come back (a terminal close code); the ledger has why.
    Refused,
}

/// Reconnects client `plan` to its own URL, retrying refusals that say to come back and
/// failures below the WebSocket until `until` (or until the run stops, without one).
pub async fn reconnect(
    shared: &Shared,
    plan: &ClientPlan,
    ledger: &mut Ledger,
    until: Option<Instant>,
) -> Resumed {
    let mut backoff = Backoff::new(plan.seed ^ 0x7e5_0e5e);
    loop {
        let wait = backoff.wait();
        tokio::select! {
            () = shared.stop.cancelled() => return Resumed::OutOfTime,
            () = tokio::time::sleep(wait) => {}
        }
        if until.is_some_and(|until| Instant::now() >= until) {
            return Resumed::OutOfTime;
        }
        let after = Some(ledger.stream_position());
        match connect::connect_after(shared.url(plan.index), shared.mode, plan, after).await {
            Attempt::Ready(ws, welcome) => return Resumed::Connected(ws, welcome),
            Attempt::Refused(code) => {
                ledger.tally_mut().refused(code);
                Live::add(&shared.live.refusals, 1);
            }
            // Nothing listening yet, or a connection cut again mid-handshake: the process is
            // on its way back, or the proxy in front of it is.
            Attempt::Transport(_) => {}
            Attempt::Failed(problem) => {
                ledger.problem(problem);
                return Resumed::Refused;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backoff_doubles_to_its_cap_with_jitter() {
        let mut backoff = Backoff::new(1);
        let waits: Vec<Duration> = (0..8).map(|_| backoff.wait()).collect();
        let bases = [100, 200, 400, 800, 1_600, 2_000, 2_000, 2_000];
        for (wait, base) in waits.iter().zip(bases) {
            let base = Duration::from_millis(base);
            assert!(
                *wait >= base / 2 && *wait < base * 3 / 2,
                "{wait:?} around {base:?}"
            );
        }
        let mut other = Backoff::new(2);
        let others: Vec<Duration> = (0..8).map(|_| other.wait()).collect();
        assert_ne!(waits, others, "clients do not all wait alike");
    }
}
