//! The one error type of the HTTP API: a status and a stable code for the client, the cause
//! logged on the server and never sent.

use crate::auth::AuthError;
use crate::store::StoreError;
use axum::Json;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use kaiwa_protocol::ErrorCode;
use kaiwa_protocol::history::ErrorBody;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidParameter(String),
    #[error("not found")]
    NotFound,
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Something else failed on the server; the text says what, for the log only.
    #[error("{0}")]
    Internal(String),
    /// No token, or one that is not valid (401): the code says which.
    #[error(transparent)]
    Unauthorized(#[from] AuthError),
    /// A valid token that does not open this resource (403): the code says why.
    #[error("{1}")]
    Forbidden(ErrorCode, String),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, message) = match &self {
            Self::InvalidParameter(message) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                ErrorCode::InvalidParameter,
                message.clone(),
            ),
            Self::NotFound => (
                StatusCode::NOT_FOUND,
                ErrorCode::NotFound,
                "not found".to_owned(),
            ),
            Self::Store(err) if err.is_transient() => {
                tracing::warn!(%err, "request failed: the database is unavailable");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorCode::Unavailable,
                    "the database is unavailable for now; retry shortly".to_owned(),
                )
            }
            Self::Store(err) => {
                tracing::error!(%err, "request failed in the store");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    ErrorCode::Internal,
                    "internal error; see the server log".to_owned(),
                )
            }
            Self::Unauthorized(err) => (StatusCode::UNAUTHORIZED, err.code(), err.to_string()),
            Self::Forbidden(code, message) => (StatusCode::FORBIDDEN, *code, message.clone()),
            Self::Internal(cause) => {
                tracing::error!(%cause, "request failed");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    ErrorCode::Internal,
                    "internal error; see the server log".to_owned(),
                )
            }
        };
        let mut response = (status, Json(ErrorBody::new(code, message))).into_response();
        if let Self::Unauthorized(err) = &self {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, crate::auth::challenge(err));
        }
        response
    }
}
