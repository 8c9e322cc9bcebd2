//! The OpenAPI 3.1 document of the HTTP API, served at `/api/openapi.json`. It is generated
//! from the handlers (`#[utoipa::path]`, routed with `routes!`, so a route and its description
//! cannot part) and the wire types; at start it is fitted to the configuration: the security
//! requirements are those this server enforces (none with auth off).

use super::HttpState;
use crate::auth::{Access, AdminAccess};
use axum::Extension;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use std::sync::Arc;
use utoipa::openapi::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// The document as served: JSON text, made once at start.
#[derive(Clone)]
pub(super) struct Document(Arc<str>);

pub(super) fn router() -> OpenApiRouter<Arc<HttpState>> {
    OpenApiRouter::new().routes(routes!(serve))
}

/// This document: every HTTP endpoint of kaiwa, its parameters, answers and error bodies.
#[utoipa::path(
    get,
    path = "/api/openapi.json",
    tag = "api",
    responses(
        (status = 200, description = "The OpenAPI 3.1 document of this server.", content_type = "application/json", body = Object),
    ),
)]
async fn serve(Extension(Document(text)): Extension<Document>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        text.to_string(),
    )
        .into_response()
}

/// The whole document: the routes' own, `/ws`, and the security schemes, with the security
/// requirements this configuration enforces.
pub(super) fn document(routes: OpenApi, access: &Access) -> Document {
    let mut document = routes;
    document.merge(crate::gateway::openapi());
    let mut value = serde_json::to_value(&document).unwrap_or_else(|_| json!({}));
    fit(&mut value, access);
    Document(value.to_string().into())
}

/// Fills in what the handlers cannot say, and drops the security requirements that this
/// configuration does not enforce, so that the document says what the server does.
fn fit(document: &mut Value, access: &Access) {
    document["info"] = json!({
        "title": "kaiwa",
        "version": env!("CARGO_PKG_VERSION"),
        "description": "The HTTP API of kaiwa, a real-time chat backend: chat history, media, health and metrics, and the WebSocket endpoint (its frames are in docs/protocol.md). Every error has the body ErrorBody, whose code is stable.",
        "license": {"name": "MIT", "identifier": "MIT"},
    });
    document["components"]["securitySchemes"] = json!({
        "client_token": {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "JWT",
            "description": "A token signed with the server's secret (HS256), whose sub is the client id (auth on only).",
        },
        "admin_token": {
            "type": "http",
            "scheme": "bearer",
            "description": "The server's --admin-token.",
        },
    });
    let tokens = access.tokens.is_some();
    let admin_open = matches!(access.admin, AdminAccess::Open);
    let Some(paths) = document["paths"].as_object_mut() else {
        return;
    };
    for item in paths.values_mut() {
        let Some(operations) = item.as_object_mut() else {
            continue;
        };
        for operation in operations.values_mut() {
            let Some(operation) = operation.as_object_mut() else {
                continue;
            };
            let names = operation
                .get("security")
                .map(|security| security.to_string())
                .unwrap_or_default();
            let unenforced = (names.contains("client_token") && !tokens)
                || (names.contains("admin_token") && admin_open);
            if unenforced {
                operation.remove("security");
            }
        }
    }
}
