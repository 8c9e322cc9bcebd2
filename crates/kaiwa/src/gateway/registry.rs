//! The registry of connected clients: one live session per client id (R15), and the way the
//! delivery task finds a client's outbox.

use super::outbox::Outbox;
use super::stream::ReplyStream;
use super::wire::Protocol;
use crate::config::DuplicatePolicy;
use crate::domain::ClientId;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How to reach a live session.
#[derive(Debug, Clone)]
pub(crate) struct SessionHandle {
    /// Tells this connection apart from an earlier or later one with the same client id.
    pub conn_id: u64,
    pub protocol: Protocol,
    pub outbox: Outbox,
    /// Where a native client's replies go, in order; `None` for legacy clients.
    pub stream: Option<Arc<ReplyStream>>,
    /// Cancelled when a newer connection replaces this one.
    pub replaced: CancellationToken,
    /// Set when the newer connection is on another gateway: this one's replies may have to be
    /// caught up there.
    pub moved: Arc<AtomicBool>,
    /// When the client was last heard from, so a duplicate connection can tell a live session
    /// from one whose network died.
    pub liveness: Arc<Liveness>,
}

/// Whether a session's client still answers: the one record of when it was last heard from,
/// read by the heartbeat and by duplicate connections.
#[derive(Debug, Default)]
pub(crate) struct Liveness {
    /// Milliseconds since [`epoch`] at the last frame from the client.
    last_heard: AtomicU64,
    /// False while the session does not read (backpressure): a client we do not read from
    /// counts as heard, whatever it sends.
    paused: AtomicBool,
    heard: Notify,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn millis_since_epoch(at: Instant) -> u64 {
    u64::try_from(at.duration_since(epoch()).as_millis()).unwrap_or(u64::MAX)
}

impl Liveness {
    /// Called by the session for every frame it reads.
    pub(crate) fn heard(&self) {
        self.last_heard
            .store(millis_since_epoch(Instant::now()), Ordering::Relaxed);
        self.heard.notify_waiters();
    }

    /// Called by the session as it stops or resumes reading.
    pub(crate) fn set_reading(&self, reading: bool) {
        let was_paused = self.paused.swap(!reading, Ordering::Relaxed);
        if was_paused && reading {
            // The silence starts when reading resumes, not when it stopped.
            self.heard();
        }
    }

    /// How long the client has been silent; zero while the session is not reading.
    pub(crate) fn silent_for(&self) -> Duration {
        if self.paused.load(Ordering::Relaxed) {
            return Duration::ZERO;
        }
        let last = self.last_heard.load(Ordering::Relaxed);
        Duration::from_millis(millis_since_epoch(Instant::now()).saturating_sub(last))
    }

    /// True if the client was heard from within `within`, or answers a ping in that time.
    pub(crate) async fn answers(&self, outbox: &Outbox, within: Duration) -> bool {
        if self.silent_for() < within {
            return true;
        }
        let heard = self.heard.notified();
        tokio::pin!(heard);
        // Registered before the ping goes out, so a fast answer is not missed.
        heard.as_mut().enable();
        if !outbox.push_ping() {
            return false;
        }
        tokio::time::timeout(within, heard).await.is_ok()
    }
}

#[derive(Debug, Default)]
pub(crate) struct Registry {
    sessions: Mutex<HashMap<ClientId, SessionHandle>>,
}

/// A live connection already holds this client id; here is how to reach it.
#[derive(Debug)]
pub(crate) struct Duplicate(pub SessionHandle);

impl Registry {
    /// Makes `handle` the client's session. With `Refuse`, fails if one is live; with `Replace`,
    /// tells the live one to close and takes its place.
    pub(crate) fn register(
        &self,
        client_id: ClientId,
        handle: SessionHandle,
        policy: DuplicatePolicy,
    ) -> Result<(), Duplicate> {
        let mut sessions = self.lock();
        if let Some(live) = sessions.get(&client_id) {
            match policy {
                DuplicatePolicy::Refuse => return Err(Duplicate(live.clone())),
                DuplicatePolicy::Replace => live.replaced.cancel(),
            }
        }
        sessions.insert(client_id, handle);
        Ok(())
    }

    /// Makes `handle` the client's session in place of `stale` (a session found not to answer),
    /// unless another connection took the id meanwhile.
    pub(crate) fn take_over(
        &self,
        client_id: ClientId,
        handle: SessionHandle,
        stale: u64,
    ) -> Result<(), Duplicate> {
        let mut sessions = self.lock();
        match sessions.get(&client_id) {
            Some(live) if live.conn_id != stale => return Err(Duplicate(live.clone())),
            Some(live) => live.replaced.cancel(),
            None => {}
        }
        sessions.insert(client_id, handle);
        Ok(())
    }

    /// Removes the client's session if it is still this connection's (a replaced session must
    /// not remove its successor).
    pub(crate) fn remove(&self, client_id: &ClientId, conn_id: u64) {
        let mut sessions = self.lock();
        if sessions
            .get(client_id)
            .is_some_and(|live| live.conn_id == conn_id)
        {
            sessions.remove(client_id);
        }
    }

    /// A connection on another gateway took the client's id: removes this connection's session
    /// (events for the client are then passed on) and tells it to close.
    pub(crate) fn evict(&self, client_id: &ClientId, conn_id: u64) -> bool {
        let mut sessions = self.lock();
        let Some(live) = sessions
            .get(client_id)
            .filter(|live| live.conn_id == conn_id)
        else {
            return false;
        };
        live.moved.store(true, Ordering::Relaxed);
        live.replaced.cancel();
        sessions.remove(client_id);
        true
    }

    /// Runs `f` on the client's session, if connected. `f` runs under the lock: keep it short
    /// and never await in it.
    pub(crate) fn with<T>(
        &self,
        client_id: &ClientId,
        f: impl FnOnce(&SessionHandle) -> T,
    ) -> Option<T> {
        self.lock().get(client_id).map(f)
    }

    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<ClientId, SessionHandle>> {
        // Every update is a single insert or remove, so a poisoned map is still consistent.
        self.sessions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_session_is_alive_if_recently_heard_or_if_it_answers_a_ping() {
        let (outbox, mut frames) = Outbox::new(super::super::outbox::OutboxLimits {
            frames: 8,
            bytes: 1 << 20,
        });
        let liveness = Arc::new(Liveness::default());
        liveness.heard();
        assert!(
            liveness.answers(&outbox, Duration::from_secs(1)).await,
            "just heard"
        );

        tokio::time::advance(Duration::from_secs(5)).await;
        // A client that answers the ping.
        let answering = liveness.clone();
        let answer = tokio::spawn(async move {
            frames.recv().await.expect("the ping is queued");
            answering.heard();
            frames
        });
        assert!(
            liveness.answers(&outbox, Duration::from_secs(1)).await,
            "answered the ping"
        );
        let mut frames = answer.await.expect("joins");

        // A client that no longer answers.
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(
            !liveness.answers(&outbox, Duration::from_secs(1)).await,
            "silent"
        );
        assert!(
            frames.recv().await.is_some(),
            "a ping was sent all the same"
        );
    }
}
