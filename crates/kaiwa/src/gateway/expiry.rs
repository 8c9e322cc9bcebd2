//! When a connection's token runs out (auth on): the session is told at the token's expiry,
//! warns the client, and closes with 4603 if no `refresh` comes within the grace period.

use crate::auth::Claims;
use chrono::{DateTime, Utc};
use std::time::Duration;
use tokio::time::Instant;

/// The token clock of one session.
#[derive(Debug)]
pub(super) struct Expiry {
    /// The token's `exp`, for the warning.
    expires_at: DateTime<Utc>,
    /// When the timer fires next: the end of the token (with leeway), then the end of the grace.
    deadline: Instant,
    /// Whether the client was warned, and the timer now runs out the grace period.
    warned: bool,
    /// A refresh moved the deadline: the session's timer must be set again.
    renewed: bool,
    grace: Duration,
}

/// What the timer's firing means.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Lapse {
    /// The token ran out: warn the client that it has `closes_in` to refresh.
    Warn {
        expired_at: DateTime<Utc>,
        closes_in: Duration,
    },
    /// The grace period is over too: close with 4603.
    Close,
}

impl Expiry {
    pub(super) fn new(claims: &Claims, now: DateTime<Utc>, grace: Duration) -> Self {
        Self {
            expires_at: claims.expires_at,
            deadline: deadline(claims, now),
            warned: false,
            renewed: false,
            grace,
        }
    }

    pub(super) fn deadline(&self) -> Instant {
        self.deadline
    }

    /// The timer fired: the first time a warning, the second the close.
    pub(super) fn lapse(&mut self) -> Lapse {
        if self.warned {
            return Lapse::Close;
        }
        self.warned = true;
        self.deadline = Instant::now() + self.grace;
        Lapse::Warn {
            expired_at: self.expires_at,
            closes_in: self.grace,
        }
    }

    /// Whether the token has run out (its `exp` and the leeway are past) and no new one came:
    /// by the deadline itself, so that a frame read in the same turn as the timer's firing is
    /// judged as the timer would.
    pub(super) fn lapsed(&self) -> bool {
        self.warned || Instant::now() >= self.deadline
    }

    /// A new token came: the clock starts over from it.
    pub(super) fn renew(&mut self, claims: &Claims, now: DateTime<Utc>) {
        self.expires_at = claims.expires_at;
        self.deadline = deadline(claims, now);
        self.warned = false;
        self.renewed = true;
    }

    /// Whether the deadline moved since the last call.
    pub(super) fn take_renewed(&mut self) -> bool {
        std::mem::take(&mut self.renewed)
    }
}

/// The moment the token stops being taken, on the session's clock: what is left of it by the
/// server's clock, from now.
fn deadline(claims: &Claims, now: DateTime<Utc>) -> Instant {
    let left = (claims.valid_until - now)
        .to_std()
        .unwrap_or(Duration::ZERO);
    Instant::now() + left
}
