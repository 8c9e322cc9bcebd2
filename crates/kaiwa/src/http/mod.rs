//! The HTTP API beside the WebSocket: chat history, health, metrics, media files, and the
//! browser client.

mod error;
mod health;
mod history;
mod media;
#[cfg(test)]
mod tests;
mod web;

pub use error::ApiError;

use crate::gateway::Gateway;
use crate::queue::Queue;
use crate::store::{MediaStore, Store};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use std::sync::Arc;
use std::time::Instant;

/// What the HTTP handlers share.
pub struct HttpState {
    pub store: Arc<dyn Store>,
    pub gateway: Arc<Gateway>,
    pub queue: Arc<dyn Queue>,
    /// Uploaded files, served back by `/media/...`.
    pub media: MediaStore,
    pub started: Instant,
    pub responder: &'static str,
    /// `None` when another metrics recorder was installed first (e.g. in tests).
    pub metrics: Option<PrometheusHandle>,
}

pub fn router(state: Arc<HttpState>) -> Router {
    Router::new()
        .merge(history::router())
        .merge(health::router())
        .merge(media::router())
        .merge(web::router())
        .with_state(state)
}
