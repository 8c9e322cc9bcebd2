//! What presence's PostgreSQL parts (the gateway's rows in [`super::postgres`], the batched
//! claims in [`super::claims`]) share: how a sqlx error reads, the lease connection's name,
//! and the timing of a round trip.

use super::PresenceError;
use std::time::Instant;

pub(super) fn unavailable(err: &sqlx::Error) -> PresenceError {
    if crate::store::is_outage(err) {
        PresenceError::Unavailable(err.to_string())
    } else {
        PresenceError::Database(err.to_string())
    }
}

/// The start of the `application_name` of a gateway's lease connection; the gateway's id follows.
pub(super) const LEASE_CONNECTION: &str = "kaiwa-lease:";

/// One round trip to the database for presence, timed in `kaiwa_presence_seconds{op}` when it
/// ends, whichever way it ends.
pub(super) struct RoundTrip {
    op: &'static str,
    started: Instant,
}

impl RoundTrip {
    pub(super) fn start(op: &'static str) -> Self {
        Self {
            op,
            started: Instant::now(),
        }
    }
}

impl Drop for RoundTrip {
    fn drop(&mut self) {
        metrics::histogram!("kaiwa_presence_seconds", "op" => self.op)
            .record(self.started.elapsed().as_secs_f64());
    }
}
