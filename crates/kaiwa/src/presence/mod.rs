//! Presence: which gateway holds which client now, and the cluster-wide limits on who may be
//! connected. Workers ask it where to send a client's replies; gateways take a client slot and
//! the client's id from it. In one process the gateway's own registry and slots are the whole
//! truth ([`LocalPresence`]); in a cluster they are rows in PostgreSQL ([`PgPresence`]).

mod postgres;
mod route;

pub use postgres::PgPresence;
pub use route::{PATIENCE, Stopped, route};

use crate::domain::ClientId;
use crate::domain::GatewayId;
use async_trait::async_trait;

#[derive(Debug, thiserror::Error)]
pub enum PresenceError {
    /// The database cannot be reached now; the same call can succeed later.
    #[error("presence is unavailable: {0}")]
    Unavailable(String),
    /// The database took the call and failed it: a bug or a broken schema, not an outage.
    #[error("presence failed: {0}")]
    Database(String),
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

#[async_trait]
pub trait Presence: Send + Sync + 'static {
    /// The gateway that holds the client now, if any gateway does.
    async fn holder(&self, client_id: &ClientId) -> Result<Option<GatewayId>, PresenceError>;

    /// Takes one of the cluster's `max_clients` slots for a new connection; `None` when every
    /// slot is taken.
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

    /// Clients connected, messages in flight and gateways alive, in the whole cluster.
    async fn counts(&self) -> Result<ClusterCounts, PresenceError>;
}

/// One process: the gateway is the only one. Its own slots and registry already decide who
/// may connect (they are checked before these calls), and it knows itself whether a client is
/// connected (a reply for a client that left is recorded there).
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

    async fn counts(&self) -> Result<ClusterCounts, PresenceError> {
        Ok(ClusterCounts::default())
    }
}
