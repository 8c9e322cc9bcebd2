//! The HTTP API beside the WebSocket: chat history, health, metrics, media files, and the
//! browser client, described by the OpenAPI document at `/api/openapi.json`.

mod access;
pub(crate) mod cors;
mod error;
mod health;
mod history;
mod media;
mod openapi;
mod scrape;
#[cfg(test)]
mod tests;
mod web;

pub use error::ApiError;

use crate::auth::Access;
use crate::clock::Clock;
use crate::config::Role;
use crate::domain::GatewayId;
use crate::gateway::Gateway;
use crate::presence::Presence;
use crate::queue::Queue;
use crate::store::{MediaStore, Store};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use std::sync::Arc;
use std::time::Instant;
use tokio_util::sync::CancellationToken;

/// What the HTTP handlers share.
pub struct HttpState {
    pub store: Arc<dyn Store>,
    /// Sessions and admission; `None` in a worker.
    pub gateway: Option<Arc<Gateway>>,
    /// Which process this is.
    pub node: Node,
    pub clock: Arc<dyn Clock>,
    /// Cancelled when shutdown begins.
    pub draining: CancellationToken,
    pub queue: Arc<dyn Queue>,
    /// Uploaded files, served back by `/media/...`.
    pub media: Arc<dyn MediaStore>,
    pub started: Instant,
    pub responder: &'static str,
    /// `None` when another metrics recorder was installed first (e.g. in tests).
    pub metrics: Option<PrometheusHandle>,
    /// Who may read what: client tokens, the admin token.
    pub access: Access,
}

pub fn router(state: Arc<HttpState>) -> Router {
    let (router, routes) = utoipa_axum::router::OpenApiRouter::new()
        .merge(history::router())
        .merge(health::router())
        .merge(media::router())
        .merge(web::router())
        .merge(openapi::router())
        .split_for_parts();
    let document = openapi::document(routes, &state.access);
    router.with_state(state).layer(axum::Extension(document))
}

/// Which process of a deployment this is, for `/health`.
#[derive(Clone)]
pub struct Node {
    pub role: Role,
    pub id: GatewayId,
    /// Where the whole cluster's counts come from (none, when this process is all of kaiwa).
    pub presence: Arc<dyn Presence>,
}

/// A worker's main address: `/health` and `/metrics` under the same rules as a gateway's
/// (the admin token, or the admin address).
pub fn operator_router(state: Arc<HttpState>) -> Router {
    let (router, _) = utoipa_axum::router::OpenApiRouter::new()
        .merge(health::router())
        .split_for_parts();
    router.with_state(state)
}

/// The admin address (`--admin-bind`): `/health` in full and `/metrics`, with no token.
pub fn admin_router(state: Arc<HttpState>) -> Router {
    health::admin_router().with_state(state)
}
