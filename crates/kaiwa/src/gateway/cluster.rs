//! The gateway's part in its cluster (in one process, a cluster of one): a cluster-wide client
//! slot and the client's id for each connection (taken from [`Presence`] after the gateway's
//! own checks), events for clients that are no longer here, passed on to the gateway that holds
//! them now, liveness probes across gateways, and the gateway's side of its lease.

use super::Gateway;
use crate::domain::ClientId;
use crate::domain::GatewayId;
use crate::presence::{Claim, Lessee, Presence, PresenceError, Stopped, route};
use crate::queue::{Event, Queue, Routed};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// How a gateway reaches the rest of its cluster.
pub struct ClusterLink {
    pub id: GatewayId,
    pub presence: Arc<dyn Presence>,
    pub queue: Arc<dyn Queue>,
    /// Connections that may hold a cluster slot or a client id. A release that failed (the
    /// database was down) leaves a row behind; the lease renewal gives back every row of this
    /// gateway's that no connection here holds.
    live: Mutex<HashSet<u64>>,
    /// Probes sent to other gateways, by the client and the connection probed, waiting for
    /// their answer.
    probes: Mutex<HashMap<(ClientId, u64), oneshot::Sender<bool>>>,
}

impl ClusterLink {
    pub fn new(id: GatewayId, presence: Arc<dyn Presence>, queue: Arc<dyn Queue>) -> Self {
        Self {
            id,
            presence,
            queue,
            live: Mutex::new(HashSet::new()),
            probes: Mutex::new(HashMap::new()),
        }
    }

    /// The connections that may hold something in presence now.
    pub fn live_connections(&self) -> Vec<u64> {
        lock(&self.live).iter().copied().collect()
    }

    /// Takes a cluster-wide client slot for a connection; `None` when the cluster is full.
    pub(super) async fn take_slot(
        self: &Arc<Self>,
        conn_id: u64,
        max_clients: usize,
    ) -> Result<Option<ClusterSlot>, PresenceError> {
        // Listed before the row exists, so that a lease renewal never gives it back under us.
        let listed = Listed::new(&self.live, conn_id);
        let max = u32::try_from(max_clients).unwrap_or(u32::MAX);
        let slot = self.presence.take_slot(conn_id, max).await?;
        Ok(slot.map(|slot| {
            listed.keep();
            ClusterSlot {
                link: self.clone(),
                slot,
                conn_id,
                client_id: None,
            }
        }))
    }

    /// Asks `holder` whether its connection `conn_id`, which holds the client's id, still
    /// answers; one that does not is closed there, and its claim given back. `None` if no
    /// answer came within `wait`.
    pub(super) async fn probe(
        &self,
        client_id: &ClientId,
        holder: &GatewayId,
        conn_id: u64,
        wait: Duration,
    ) -> Option<bool> {
        let key = (client_id.clone(), conn_id);
        let (tx, rx) = oneshot::channel();
        lock(&self.probes).insert(key.clone(), tx);
        let event = Event::Probe {
            client_id: client_id.clone(),
            conn_id,
            from: self.id.clone(),
        };
        let asked = async {
            match self.queue.publish_event(holder, event).await {
                Ok(Routed::Delivered) => rx.await.ok(),
                // Gone: its lease ends soon, and the claim with it.
                Ok(Routed::NoGateway) | Err(_) => None,
            }
        };
        let answer = tokio::time::timeout(wait, asked).await.ok().flatten();
        lock(&self.probes).remove(&key);
        answer
    }

    /// The answer to a probe this gateway sent.
    pub(super) fn probed(&self, client_id: ClientId, conn_id: u64, alive: bool) {
        if let Some(waiting) = lock(&self.probes).remove(&(client_id, conn_id)) {
            // The prober may have stopped waiting.
            let _ = waiting.send(alive);
        }
    }

    /// Tells whichever gateway holds the client now that its previous connection, here, has
    /// closed having been offered replies up to `seq`.
    pub(super) async fn hand_over(&self, client_id: &ClientId, seq: u64, stop: &CancellationToken) {
        let event = Event::CatchUp {
            client_id: client_id.clone(),
            seq,
        };
        if self.route_elsewhere(&event, stop).await.is_err() {
            tracing::debug!(%client_id, "stopped before the client was handed over");
        }
    }

    /// Sends an event to the gateway that holds its client, if that is another gateway (this
    /// one has no session for it: `NoGateway`), waiting out outages until `stop`.
    async fn route_elsewhere(
        &self,
        event: &Event,
        stop: &CancellationToken,
    ) -> Result<Routed, Stopped> {
        route(
            self.presence.as_ref(),
            self.queue.as_ref(),
            &mut None,
            Some(&self.id),
            event,
            stop,
        )
        .await
    }
}

/// The gateway's side of what its cluster link carries.
impl Gateway {
    /// Passes on an event for a client this gateway does not hold (any more) to the gateway
    /// that does. A reply that finds no gateway is recorded `failed` here: this gateway is the
    /// one process that has the event. An outage is waited out, until the gateway stops.
    pub(super) fn forward(self: &Arc<Self>, event: Event) {
        let gateway = self.clone();
        self.tracker.spawn(async move {
            let link = &gateway.cluster;
            let routed = match link.route_elsewhere(&event, &gateway.close_sessions).await {
                Ok(routed) => routed,
                Err(Stopped) => {
                    tracing::debug!("stopped before an event was passed on");
                    return;
                }
            };
            metrics::counter!("kaiwa_events_forwarded_total", "routed" => match routed {
                Routed::Delivered => "delivered",
                Routed::NoGateway => "no_gateway",
            })
            .increment(1);
            if routed == Routed::NoGateway
                && let Event::Reply { reply, .. } = &event
            {
                gateway
                    .store
                    .record_undelivered(reply.id, gateway.clock.now());
            }
        });
    }

    /// Another gateway (`from`) asks whether this gateway's connection `conn_id` of the client
    /// still answers, as this one asks itself of a duplicate connection: one that does not is
    /// closed, which gives its claim back. The answer goes back as `Probed`.
    pub(super) fn answer_probe(
        self: &Arc<Self>,
        from: GatewayId,
        client_id: ClientId,
        conn_id: u64,
    ) {
        let gateway = self.clone();
        self.tracker.spawn(async move {
            let session = gateway.registry.with(&client_id, |s| {
                (s.conn_id == conn_id).then(|| (s.liveness.clone(), s.outbox.clone()))
            });
            let alive = match session.flatten() {
                Some((liveness, outbox)) => {
                    liveness.answers(&outbox, gateway.liveness_probe()).await
                }
                // Gone already: its claim is on its way back.
                None => false,
            };
            if !alive && gateway.registry.evict(&client_id, conn_id) {
                tracing::info!(%client_id, conn_id, gateway = %from, "the connection did not answer a ping; closed for the client's new one on another gateway");
            }
            let event = Event::Probed {
                client_id,
                conn_id,
                alive,
            };
            if let Err(err) = gateway.cluster.queue.publish_event(&from, event).await {
                tracing::debug!(gateway = %from, %err, "stopped before a probe was answered");
            }
        });
    }
}

impl Lessee for Gateway {
    fn live_connections(&self) -> Vec<u64> {
        self.cluster.live_connections()
    }

    fn lease_lost(&self) {
        self.evict_all();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every update is a single insert or remove.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A connection listed in [`ClusterLink::live`] while it waits for a slot: unlisted again
/// unless it got one, however the wait ends. A connection dropped while it waited (at a hard
/// stop) would otherwise stay listed, and its rows would never count as left behind.
struct Listed<'a> {
    live: &'a Mutex<HashSet<u64>>,
    conn_id: u64,
}

impl<'a> Listed<'a> {
    fn new(live: &'a Mutex<HashSet<u64>>, conn_id: u64) -> Self {
        lock(live).insert(conn_id);
        Self { live, conn_id }
    }

    /// The connection holds a slot now: its [`ClusterSlot`] unlists it when dropped.
    fn keep(self) {
        std::mem::forget(self);
    }
}

impl Drop for Listed<'_> {
    fn drop(&mut self) {
        lock(self.live).remove(&self.conn_id);
    }
}

/// A cluster-wide client slot, and the client id once claimed, held by one connection; given
/// back when dropped.
pub(super) struct ClusterSlot {
    link: Arc<ClusterLink>,
    slot: u32,
    conn_id: u64,
    client_id: Option<ClientId>,
}

impl ClusterSlot {
    /// Claims the client's id for this connection across the cluster. A connection on another
    /// gateway that held it is told to close (policy `replace`).
    pub(super) async fn claim(
        &mut self,
        client_id: &ClientId,
        replace: bool,
    ) -> Result<Claim, PresenceError> {
        let claim = self
            .link
            .presence
            .claim(client_id, self.conn_id, replace)
            .await?;
        if let Claim::Claimed { replaced } = &claim {
            self.client_id = Some(client_id.clone());
            if let Some((gateway, conn_id)) = replaced {
                let event = Event::Replaced {
                    client_id: client_id.clone(),
                    conn_id: *conn_id,
                };
                // The id is this connection's already: the handshake does not wait for the old
                // connection's gateway to hear of it (through an outage of the broker, say).
                let queue = self.link.queue.clone();
                let gateway = gateway.clone();
                let client_id = client_id.clone();
                tokio::spawn(async move {
                    match queue.publish_event(&gateway, event).await {
                        Ok(Routed::Delivered) => {}
                        // Gone: its lease ends soon, and with it the connection's claim.
                        Ok(Routed::NoGateway) => {}
                        Err(err) => {
                            tracing::debug!(%client_id, %gateway, %err, "stopped before a gateway heard that its connection was replaced");
                        }
                    }
                });
            }
        }
        Ok(claim)
    }
}

impl Drop for ClusterSlot {
    fn drop(&mut self) {
        let link = self.link.clone();
        let (slot, conn_id, client_id) = (self.slot, self.conn_id, self.client_id.take());
        // Drop cannot wait; until the release lands, the slot counts as taken, which errs on
        // the side of the limit.
        tokio::spawn(async move {
            if let Some(client_id) = client_id {
                link.presence.release(&client_id, conn_id).await;
            }
            link.presence.release_slot(slot, conn_id).await;
            lock(&link.live).remove(&conn_id);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presence::{ClusterCounts, LocalPresence};
    use crate::queue::MemoryQueue;
    use async_trait::async_trait;
    use tokio::sync::Semaphore;

    /// One process's presence, whose slots are handed out only once the gate opens.
    struct Gated {
        local: LocalPresence,
        gate: Semaphore,
    }

    #[async_trait]
    impl Presence for Gated {
        async fn join(&self, max: u32) -> Result<(), PresenceError> {
            self.local.join(max).await
        }
        async fn keep_lease(&self, max: u32, stop: CancellationToken, lessee: Arc<dyn Lessee>) {
            self.local.keep_lease(max, stop, lessee).await;
        }
        async fn holder(&self, id: &ClientId) -> Result<Option<GatewayId>, PresenceError> {
            self.local.holder(id).await
        }
        async fn take_slot(&self, conn: u64, max: u32) -> Result<Option<u32>, PresenceError> {
            let _open = self.gate.acquire().await.expect("the gate stays");
            self.local.take_slot(conn, max).await
        }
        async fn release_slot(&self, slot: u32, conn: u64) {
            self.local.release_slot(slot, conn).await;
        }
        async fn claim(
            &self,
            id: &ClientId,
            conn: u64,
            replace: bool,
        ) -> Result<Claim, PresenceError> {
            self.local.claim(id, conn, replace).await
        }
        async fn release(&self, id: &ClientId, conn: u64) {
            self.local.release(id, conn).await;
        }
        async fn counts(&self) -> Result<Option<ClusterCounts>, PresenceError> {
            self.local.counts().await
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_dropped_while_it_waits_for_a_slot_is_not_left_listed() {
        let id = GatewayId::new("gw-1");
        let presence = Arc::new(Gated {
            local: LocalPresence::new(id.clone()),
            gate: Semaphore::new(0),
        });
        let link = Arc::new(ClusterLink::new(
            id,
            presence.clone(),
            Arc::new(MemoryQueue::new(8)),
        ));
        let waited = tokio::time::timeout(Duration::from_secs(1), link.take_slot(1, 10)).await;
        assert!(waited.is_err(), "the gate is shut");
        assert_eq!(link.live_connections(), Vec::<u64>::new());

        presence.gate.add_permits(1);
        let slot = link.take_slot(2, 10).await.expect("taken").expect("a slot");
        assert_eq!(
            link.live_connections(),
            [2],
            "a connection with a slot stays listed"
        );
        drop(slot);
        while !link.live_connections().is_empty() {
            tokio::task::yield_now().await;
        }
    }
}
