//! Health (R19) with the live counters, and Prometheus metrics.

use super::HttpState;
use crate::store::StoreHealth;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use std::sync::Arc;

pub(super) fn router() -> Router<Arc<HttpState>> {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
}

/// 200 while serving; 503 while draining for shutdown, or while the database takes no writes
/// (`degraded`, with the reason), so a load balancer stops sending clients here.
async fn health(State(state): State<Arc<HttpState>>) -> Response {
    let gateway = &state.gateway;
    let in_flight = &gateway.admission.in_flight;
    let draining = gateway.is_draining();
    let degraded = match state.store.health() {
        StoreHealth::Ok => None,
        StoreHealth::Degraded(reason) => Some(reason),
    };
    let status = match (draining, &degraded) {
        (true, _) => "draining",
        (false, Some(_)) => "degraded",
        (false, None) => "ok",
    };
    let body = json!({
        "status": status,
        "reason": degraded,
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": state.started.elapsed().as_secs(),
        "connections": gateway.connected(),
        "slots_in_use": gateway.slots_in_use(),
        "max_clients": gateway.settings.max_clients,
        "in_flight": in_flight.current(),
        "in_flight_peak": in_flight.peak(),
        "max_in_flight": in_flight.max(),
        "queue_depth": state.queue.depth(),
        "responder": state.responder,
    });
    let code = if status == "ok" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

async fn metrics(State(state): State<Arc<HttpState>>) -> Response {
    match &state.metrics {
        Some(handle) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            handle.render(),
        )
            .into_response(),
        None => (
            StatusCode::NOT_FOUND,
            "metrics are not enabled in this process",
        )
            .into_response(),
    }
}
