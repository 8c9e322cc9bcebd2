//! What `/metrics` reads at each scrape, beside what the code counts as it goes: the gauges of
//! `/health` (degraded parts, draining, messages in flight against their limit, jobs waiting),
//! and, at zero, the series the alert rules of `deploy/prometheus/` watch, so that a rate sees
//! the first event and a rule has a series to judge before anything has happened.

use super::HttpState;
use crate::store::StoreHealth;
use kaiwa_protocol::MessageType;
use std::future::Future;
use std::time::Duration;

/// The longest a scrape waits for one reading (the cluster's in-flight row, the job queue's
/// depth): past it the gauge keeps its last value, and `kaiwa_health_degraded` says which part
/// is away.
const READ_WAIT: Duration = Duration::from_secs(1);

/// Refreshes the gauges read at scrape time. Cheap: two reads at most, each one row or one
/// passive declare.
pub(super) async fn refresh(state: &HttpState) {
    let role = state.node.role;
    zero_series(role.runs_gateway(), role.runs_worker());
    metrics::gauge!("kaiwa_build_info", "version" => env!("CARGO_PKG_VERSION"), "role" => role.name())
        .set(1.0);
    let database = matches!(state.store.health(), StoreHealth::Degraded(_));
    let broker = state.queue.unavailable().is_some();
    metrics::gauge!("kaiwa_health_degraded", "part" => "database").set(flag(database));
    metrics::gauge!("kaiwa_health_degraded", "part" => "broker").set(flag(broker));
    let draining = state.draining.is_cancelled()
        || state
            .gateway
            .as_ref()
            .is_some_and(|gateway| gateway.is_draining());
    metrics::gauge!("kaiwa_draining").set(flag(draining));
    if let Some(depth) = within(state.queue.depth()).await.flatten() {
        metrics::gauge!("kaiwa_queue_jobs_waiting").set(depth as f64);
    }
    if let Some(gateway) = &state.gateway {
        let in_flight = &gateway.admission.in_flight;
        metrics::gauge!("kaiwa_in_flight_limit").set(in_flight.max() as f64);
        // In a cluster the limit is the store's, over every gateway's messages; a gateway's own
        // slots end once a message is queued.
        let counted = match within(state.node.presence.in_flight()).await {
            Some(Ok(Some(cluster))) => Some(cluster as f64),
            Some(Ok(None)) => Some(in_flight.current() as f64),
            Some(Err(_)) | None => None,
        };
        if let Some(counted) = counted {
            metrics::gauge!("kaiwa_in_flight_messages").set(counted);
        }
    }
}

fn flag(on: bool) -> f64 {
    if on { 1.0 } else { 0.0 }
}

async fn within<T>(read: impl Future<Output = T>) -> Option<T> {
    tokio::time::timeout(READ_WAIT, read).await.ok()
}

/// Connection refusals an operator acts on: the cluster or the process is full, or presence
/// is away.
const REFUSALS: [&str; 4] = [
    "over_capacity",
    "duplicate",
    "too_many_handshakes",
    "unavailable",
];
/// Session endings the dashboard and the rules show.
const DISCONNECTS: [&str; 4] = [
    "client_closed",
    "connection_lost",
    "slow_consumer",
    "heartbeat_timeout",
];
const STATUSES: [&str; 4] = ["accepted", "rejected", "busy", "unavailable"];
const REQUEUES: [&str; 3] = ["stuck", "gateway_gone", "unfinished_at_start"];

/// Registers the counters the rules and the dashboard watch, at zero: an added zero changes
/// nothing, and a counter that already counts keeps its count.
fn zero_series(gateway: bool, worker: bool) {
    for reason in REQUEUES {
        metrics::counter!("kaiwa_messages_requeued_total", "reason" => reason).increment(0);
    }
    if gateway {
        metrics::gauge!("kaiwa_connections").increment(0.0);
        for reason in REFUSALS {
            metrics::counter!("kaiwa_connections_refused_total", "reason" => reason).increment(0);
        }
        for reason in DISCONNECTS {
            metrics::counter!("kaiwa_disconnects_total", "reason" => reason).increment(0);
        }
        for kind in MessageType::ALL.map(MessageType::as_str) {
            for status in STATUSES {
                metrics::counter!("kaiwa_messages_total", "status" => status, "type" => kind)
                    .increment(0);
            }
        }
        metrics::counter!("kaiwa_lease_lost_total").increment(0);
    }
    if worker {
        for kind in MessageType::ALL.map(MessageType::as_str) {
            metrics::counter!("kaiwa_messages_processed_total", "type" => kind).increment(0);
        }
        metrics::counter!("kaiwa_model_calls_total").increment(0);
        for outcome in ["ok", "fallback"] {
            metrics::counter!("kaiwa_model_replies_total", "outcome" => outcome).increment(0);
        }
    }
}
