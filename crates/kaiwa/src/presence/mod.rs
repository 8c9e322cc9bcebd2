//! Presence: which gateway holds which client now, and the cluster-wide limits on who may be
//! connected. Workers ask it where to send a client's replies; gateways join it, keep a lease
//! in it, and take a client slot and the client's id from it. In one process the gateway's own
//! registry and slots are the whole truth ([`LocalPresence`]); in a cluster they are rows in
//! PostgreSQL ([`PgPresence`]), slots held by each gateway in blocks and ids claimed in
//! batches.

mod block;
mod claims;
mod postgres;
mod route;
mod sql;
#[cfg(test)]
mod tests;

pub use postgres::PgPresence;
pub use route::{Stopped, route, route_all};

use crate::domain::ClientId;
use crate::domain::GatewayId;
use async_trait::async_trait;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, thiserror::Error)]
pub enum PresenceError {
    /// The database cannot be reached now; the same call can succeed later.
    #[error("presence is unavailable: {0}")]
    Unavailable(String),
    /// The database took the call and failed it: a bug or a broken schema, not an outage.
    #[error("presence failed: {0}")]
    Database(String),
}

impl From<crate::db_thread::Stopped> for PresenceError {
    fn from(stopped: crate::db_thread::Stopped) -> Self {
        Self::Unavailable(stopped.to_string())
    }
}

impl PresenceError {
    /// Whether the same call may succeed later.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

/// The outcome of claiming a client id for a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The id is this connection's. `replaced` names the connection on another gateway that
    /// held it (policy `replace`): that gateway is to close it.
    Claimed { replaced: Option<(GatewayId, u64)> },
    /// A live connection on another gateway holds it (policy `refuse`): `conn_id` there.
    Held { gateway: GatewayId, conn_id: u64 },
}

/// What the whole cluster holds now, for `/health`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClusterCounts {
    pub clients: u64,
    pub in_flight: u64,
    pub gateways: u64,
}

/// A gateway as its lease sees it: what it holds, and what it must do when the lease is lost.
pub trait Lessee: Send + Sync {
    /// The connections that may hold a client id now: `sessions` rows of this gateway's that
    /// none of them holds (their release failed) are given back. (Slots are the block's to
    /// account for.)
    fn live_connections(&self) -> Vec<u64>;

    /// The lease ran out: other gateways may hold this one's slots and ids now, so its sessions
    /// are to close (their clients reconnect).
    fn lease_lost(&self);
}

#[async_trait]
pub trait Presence: Send + Sync + 'static {
    /// Joins as a gateway with `max_clients` slots in all, giving back what an earlier process
    /// with the same id left behind. Called before the gateway's listener opens, so that the
    /// first client finds its slot there.
    async fn join(&self, max_clients: u32) -> Result<(), PresenceError>;

    /// Keeps the joined gateway's place until `stop`, then gives back everything it holds.
    async fn keep_lease(&self, max_clients: u32, stop: CancellationToken, lessee: Arc<dyn Lessee>);

    /// The gateway that holds the client now, if any gateway does.
    async fn holder(&self, client_id: &ClientId) -> Result<Option<GatewayId>, PresenceError>;

    /// Takes one of the cluster's `max_clients` slots for a new connection; `None` when every
    /// slot is taken (one may be spare in another gateway's block for a moment; see
    /// docs/architecture.md, "Presence").
    async fn take_slot(&self, conn_id: u64, max_clients: u32)
    -> Result<Option<u32>, PresenceError>;

    async fn release_slot(&self, slot: u32, conn_id: u64);

    /// Claims a client id for a connection of this gateway.
    async fn claim(
        &self,
        client_id: &ClientId,
        conn_id: u64,
        replace: bool,
    ) -> Result<Claim, PresenceError>;

    /// Gives a client id back, if this connection still holds it.
    async fn release(&self, client_id: &ClientId, conn_id: u64);

    /// Clients connected, messages in flight and gateways alive, in the whole cluster; `None`
    /// when this process is the whole of kaiwa, and its own counts say as much.
    async fn counts(&self) -> Result<Option<ClusterCounts>, PresenceError>;

    /// Messages in flight in the whole cluster, against `--max-in-flight`: one row, cheap
    /// enough for every scrape of `/metrics`. `None` when this process is the whole of kaiwa.
    async fn in_flight(&self) -> Result<Option<u64>, PresenceError> {
        Ok(None)
    }
}

/// One process: the gateway is the only one. Its own slots and registry already decide who
/// may connect (they are checked before these calls), and it knows itself whether a client is
/// connected: a client it has no session for is held by no gateway (see [`route`]). It has no
/// lease to lose and nobody to share its counts with.
#[derive(Debug, Clone)]
pub struct LocalPresence {
    gateway: GatewayId,
}

impl LocalPresence {
    pub fn new(gateway: GatewayId) -> Self {
        Self { gateway }
    }
}

#[async_trait]
impl Presence for LocalPresence {
    async fn join(&self, _max_clients: u32) -> Result<(), PresenceError> {
        Ok(())
    }

    async fn keep_lease(&self, _max: u32, stop: CancellationToken, _lessee: Arc<dyn Lessee>) {
        stop.cancelled().await;
    }

    async fn holder(&self, _client_id: &ClientId) -> Result<Option<GatewayId>, PresenceError> {
        Ok(Some(self.gateway.clone()))
    }

    async fn take_slot(&self, _conn_id: u64, _max: u32) -> Result<Option<u32>, PresenceError> {
        Ok(Some(0))
    }

    async fn release_slot(&self, _slot: u32, _conn_id: u64) {}

    async fn claim(
        &self,
        _client_id: &ClientId,
        _conn_id: u64,
        _replace: bool,
    ) -> Result<Claim, PresenceError> {
        Ok(Claim::Claimed { replaced: None })
    }

    async fn release(&self, _client_id: &ClientId, _conn_id: u64) {}

    async fn counts(&self) -> Result<Option<ClusterCounts>, PresenceError> {
        Ok(None)
    }
}

/// `LocalPresence` on its own: a cluster of one never refuses, never loses its lease and has
/// nothing to count, because the gateway's own slots and registry already decided.
#[cfg(test)]
mod local_tests {
    use super::{Claim, Lessee, LocalPresence, Presence};
    use crate::domain::{ClientId, GatewayId};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;
    use tokio_util::sync::CancellationToken;

    fn local() -> LocalPresence {
        LocalPresence::new(GatewayId::new("local"))
    }

    fn client(id: &str) -> ClientId {
        ClientId::parse(id).expect("a client id")
    }

    #[derive(Default)]
    struct Watched {
        lost: AtomicBool,
    }

    impl Lessee for Watched {
        fn live_connections(&self) -> Vec<u64> {
            Vec::new()
        }

        fn lease_lost(&self) {
            self.lost.store(true, Ordering::Relaxed);
        }
    }

    #[tokio::test]
    async fn every_client_is_held_by_the_one_gateway_and_its_own_registry_says_whether_it_is_there()
    {
        let presence = local();
        for id in ["alice", "bob"] {
            assert_eq!(
                presence.holder(&client(id)).await.expect("no outage"),
                Some(GatewayId::new("local"))
            );
        }
    }

    #[tokio::test]
    async fn slots_and_ids_are_never_refused_since_the_gateway_checked_them_before() {
        let presence = local();
        presence.join(2).await.expect("joins");
        // Past the limit: the gateway's own client slots are the limit, taken before this.
        for conn_id in 0..5 {
            assert_eq!(
                presence.take_slot(conn_id, 2).await.expect("no outage"),
                Some(0)
            );
        }
        presence.release_slot(0, 0).await;
        // The same id for a second connection, under either policy: the registry decided.
        for (conn_id, replace) in [(1, false), (2, false), (3, true)] {
            assert_eq!(
                presence
                    .claim(&client("alice"), conn_id, replace)
                    .await
                    .expect("no outage"),
                Claim::Claimed { replaced: None }
            );
        }
        presence.release(&client("alice"), 1).await;
    }

    #[tokio::test]
    async fn the_process_is_the_whole_of_kaiwa_so_there_is_nothing_to_count() {
        let presence = local();
        assert_eq!(presence.counts().await.expect("no outage"), None);
        assert_eq!(presence.in_flight().await.expect("no outage"), None);
    }

    #[tokio::test(start_paused = true)]
    async fn the_lease_is_kept_until_stopped_and_never_lost() {
        let presence = Arc::new(local());
        let lessee = Arc::new(Watched::default());
        let stop = CancellationToken::new();
        let kept = tokio::spawn({
            let (presence, lessee, stop) = (presence.clone(), lessee.clone(), stop.clone());
            async move { presence.keep_lease(2, stop, lessee).await }
        });
        // A day on the paused clock: no lease runs out in a cluster of one.
        tokio::time::sleep(Duration::from_secs(86_400)).await;
        assert!(!kept.is_finished(), "the lease ended without a stop");
        assert!(!lessee.lost.load(Ordering::Relaxed), "the lease was lost");
        stop.cancel();
        kept.await.expect("the lease task ends at the stop");
        assert!(!lessee.lost.load(Ordering::Relaxed));
    }
}
