//! Health (R19) and Prometheus metrics. Anyone gets the liveness answer of `/health`; the live
//! counters and `/metrics` are for operators: open when auth is off and no admin token is set,
//! else behind the admin token, or on the admin address (`--admin-bind`).

use super::HttpState;
use super::access::{self, HealthView};
use crate::store::StoreHealth;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use kaiwa_protocol::history::ErrorBody;
use serde::Serialize;
use std::sync::Arc;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub(super) fn router() -> OpenApiRouter<Arc<HttpState>> {
    OpenApiRouter::new()
        .routes(routes!(health))
        .routes(routes!(metrics))
}

/// The admin address: both endpoints in full, with no token (it is meant for a private
/// network).
pub(super) fn admin_router() -> Router<Arc<HttpState>> {
    Router::new()
        .route(
            "/health",
            axum::routing::get(|State(state): State<Arc<HttpState>>| async move {
                detailed(&state).await
            }),
        )
        .route(
            "/metrics",
            axum::routing::get(|State(state): State<Arc<HttpState>>| async move {
                render(&state).await
            }),
        )
}

/// Whether the server takes clients: `ok`, `draining` (shutting down) or `degraded` (the
/// database takes no writes).
#[derive(Debug, Serialize, ToSchema)]
// Nothing more: the document must tell it from the detailed answer.
#[serde(deny_unknown_fields)]
struct Liveness {
    status: String,
}

/// The liveness answer with the live counters.
#[derive(Debug, Serialize, ToSchema)]
struct HealthReport {
    /// `ok`, `draining` or `degraded`.
    status: String,
    /// Why the server is degraded.
    reason: Option<String>,
    version: String,
    /// `serve` (gateway and worker in one process), `gateway` or `worker`.
    role: String,
    /// The process's id in the cluster (`local` when it is the whole of kaiwa).
    id: String,
    uptime_seconds: u64,
    /// This gateway's sessions past the handshake (absent in a worker).
    #[serde(skip_serializing_if = "Option::is_none")]
    connections: Option<u64>,
    /// This gateway's client slots taken, by verified clients.
    #[serde(skip_serializing_if = "Option::is_none")]
    slots_in_use: Option<u64>,
    /// This gateway's connections in their handshake: upgraded, not yet verified, holding no
    /// client slot.
    #[serde(skip_serializing_if = "Option::is_none")]
    handshakes: Option<u64>,
    /// The client limit (of the whole cluster, in a cluster).
    #[serde(skip_serializing_if = "Option::is_none")]
    max_clients: Option<u64>,
    /// Messages this gateway holds in flight (alone: all of them).
    #[serde(skip_serializing_if = "Option::is_none")]
    in_flight: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    in_flight_peak: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_in_flight: Option<u64>,
    /// Jobs waiting for a worker, when the queue can tell.
    queue_depth: Option<u64>,
    /// The whole cluster's counts, in a cluster.
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster: Option<ClusterReport>,
    /// `built-in`, or the language model's name.
    responder: String,
}

/// What the whole cluster holds now.
#[derive(Debug, Serialize, ToSchema)]
struct ClusterReport {
    /// Clients connected to any gateway.
    clients: u64,
    /// Messages accepted and not yet replied to.
    in_flight: u64,
    /// Gateways whose lease runs.
    gateways: u64,
}

/// Whether the server takes clients: 200 while serving; 503 while draining for shutdown, or
/// while the database takes no writes, so a load balancer stops sending clients here. The live
/// counters come with the admin token (or when the admin endpoints are open).
#[utoipa::path(
    get,
    path = "/health",
    tag = "operations",
    security((), ("admin_token" = [])),
    responses(
        (status = 200, description = "Serving. The counters come with the admin token (or when auth and the admin token are off).", body = inline(Health)),
        (status = 503, description = "Draining for shutdown, or degraded.", body = inline(Health)),
        (status = 401, description = "The Authorization header is not a bearer token.", body = ErrorBody),
        (status = 403, description = "A token that is not the admin token (`forbidden`).", body = ErrorBody),
    ),
)]
async fn health(State(state): State<Arc<HttpState>>, headers: HeaderMap) -> Response {
    match access::health(&state, &headers) {
        Ok(HealthView::Detailed) => detailed(&state).await,
        Ok(HealthView::Liveness) => {
            let (code, status, _) = status(&state);
            let liveness = Liveness {
                status: status.to_owned(),
            };
            (code, Json(Health::Liveness(liveness))).into_response()
        }
        Err(err) => err.into_response(),
    }
}

/// The two answers of `/health`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
enum Health {
    Detailed(Box<HealthReport>),
    Liveness(Liveness),
}

fn status(state: &HttpState) -> (StatusCode, &'static str, Option<String>) {
    let draining = state.draining.is_cancelled()
        || state
            .gateway
            .as_ref()
            .is_some_and(|gateway| gateway.is_draining());
    let degraded = match state.store.health() {
        StoreHealth::Degraded(reason) => Some(reason),
        StoreHealth::Ok => state.queue.unavailable(),
    };
    let status = match (draining, &degraded) {
        (true, _) => "draining",
        (false, Some(_)) => "degraded",
        (false, None) => "ok",
    };
    let code = if status == "ok" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, status, degraded)
}

async fn detailed(state: &HttpState) -> Response {
    let (code, status, mut reason) = status(state);
    let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
    let gateway = state.gateway.as_ref();
    let in_flight = gateway.map(|gateway| &gateway.admission.in_flight);
    let cluster = match state.node.presence.counts().await {
        Ok(counts) => counts.map(|counts| ClusterReport {
            clients: counts.clients,
            in_flight: counts.in_flight,
            gateways: counts.gateways,
        }),
        Err(err) => {
            reason.get_or_insert_with(|| err.to_string());
            None
        }
    };
    let report = HealthReport {
        status: status.to_owned(),
        reason,
        version: env!("CARGO_PKG_VERSION").to_owned(),
        role: state.node.role.name().to_owned(),
        id: state.node.id.to_string(),
        uptime_seconds: state.started.elapsed().as_secs(),
        connections: gateway.map(|gateway| count(gateway.connected())),
        slots_in_use: gateway.map(|gateway| count(gateway.slots_in_use())),
        handshakes: gateway.map(|gateway| count(gateway.handshakes())),
        max_clients: gateway.map(|gateway| count(gateway.settings.max_clients)),
        in_flight: in_flight.map(|in_flight| count(in_flight.current())),
        in_flight_peak: in_flight.map(|in_flight| count(in_flight.peak())),
        max_in_flight: in_flight.map(|in_flight| count(in_flight.max())),
        queue_depth: state.queue.depth().await.map(count),
        cluster,
        responder: state.responder.to_owned(),
    };
    (code, Json(Health::Detailed(Box::new(report)))).into_response()
}

/// Prometheus metrics (text format): open when auth is off and no admin token is set, else
/// the admin token's, or on the admin address.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "The metrics, in Prometheus' text format 0.0.4.", content_type = "text/plain", body = String),
        (status = 401, description = "No admin token (`missing_token`), or not a bearer token.", body = ErrorBody),
        (status = 403, description = "Not the admin token, or no admin token can open them on this address (`forbidden`).", body = ErrorBody),
        (status = 404, description = "Metrics are not enabled in this process.", content_type = "text/plain", body = String),
    ),
)]
async fn metrics(State(state): State<Arc<HttpState>>, headers: HeaderMap) -> Response {
    match access::admin(&state, &headers) {
        Ok(()) => render(&state).await,
        Err(err) => err.into_response(),
    }
}

async fn render(state: &HttpState) -> Response {
    match &state.metrics {
        Some(handle) => {
            super::scrape::refresh(state).await;
            (
                [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                handle.render(),
            )
                .into_response()
        }
        None => (
            StatusCode::NOT_FOUND,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "metrics are not enabled in this process",
        )
            .into_response(),
    }
}
