//! Who may read what over HTTP: a client's history and files need its token (auth on); the
//! admin endpoints need the admin token. Each check answers 401 without a usable token and 403
//! with a valid one that does not open the resource, and the body says which.

use super::{ApiError, HttpState};
use crate::auth::{self, AdminAccess, AuthError, Claims};
use crate::domain::ClientId;
use axum::http::HeaderMap;
use kaiwa_protocol::ErrorCode;

/// The verified token of the request, or `None` when auth is off.
fn claims(state: &HttpState, headers: &HeaderMap) -> Result<Option<Claims>, ApiError> {
    let Some(auth) = &state.access.tokens else {
        return Ok(None);
    };
    let token = auth::bearer(headers)?.ok_or(AuthError::MissingToken)?;
    Ok(Some(auth.verify(&token, state.clock.now())?))
}

/// Whether the request may read the history of `client_id` (as the path names it): its token
/// is for that client.
pub(super) fn history(
    state: &HttpState,
    headers: &HeaderMap,
    client_id: &str,
) -> Result<(), ApiError> {
    let client_id = client_id.trim();
    match claims(state, headers)? {
        Some(claims) if claims.client_id.as_str() != client_id => Err(ApiError::Forbidden(
            ErrorCode::ClientIdMismatch,
            format!(
                "this token is for client {}; it cannot read the history of {}",
                claims.client_id,
                client_id
                    .chars()
                    .take(ClientId::MAX_LEN)
                    .collect::<String>()
            ),
        )),
        _ => Ok(()),
    }
}

/// Whether the request may read the uploaded file at `path`: its token's client is the one
/// the history showed the file to, as `proof` (the link's `sig`) vouches.
pub(super) fn file(
    state: &HttpState,
    headers: &HeaderMap,
    path: &str,
    proof: Option<&str>,
) -> Result<(), ApiError> {
    let Some(claims) = claims(state, headers)? else {
        return Ok(());
    };
    let owns = state.access.tokens.as_ref().is_some_and(|auth| {
        proof.is_some_and(|proof| auth.owns_media(&claims.client_id, path, proof))
    });
    if owns {
        return Ok(());
    }
    Err(ApiError::Forbidden(
        ErrorCode::ClientIdMismatch,
        format!(
            "this file is not one of client {}'s, or its link lacks its sig: use the link from your history",
            claims.client_id
        ),
    ))
}

/// How much of `/health` the request may see.
pub(super) enum HealthView {
    /// Status only: the liveness answer anyone gets.
    Liveness,
    /// Everything, with the live counters.
    Detailed,
}

/// `/health`: the detailed answer with the admin token (or when the admin endpoints are open);
/// liveness without a token; 403 with a wrong one.
pub(super) fn health(state: &HttpState, headers: &HeaderMap) -> Result<HealthView, ApiError> {
    if matches!(state.access.admin, AdminAccess::Open) {
        return Ok(HealthView::Detailed);
    }
    match auth::bearer(headers)? {
        None => Ok(HealthView::Liveness),
        Some(_) => admin(state, headers).map(|()| HealthView::Detailed),
    }
}

/// `/metrics` and the detailed `/health`: the admin token, unless they are open.
pub(super) fn admin(state: &HttpState, headers: &HeaderMap) -> Result<(), ApiError> {
    let access = &state.access.admin;
    if matches!(access, AdminAccess::Open) {
        return Ok(());
    }
    let token = auth::bearer(headers)?.ok_or(AuthError::MissingToken)?;
    match access {
        _ if access.admits(&token) => Ok(()),
        AdminAccess::Closed => Err(ApiError::Forbidden(
            ErrorCode::Forbidden,
            "no admin token is set on this address: the detailed health and the metrics are on --admin-bind, or need --admin-token".into(),
        )),
        _ => Err(ApiError::Forbidden(
            ErrorCode::Forbidden,
            "this is not the admin token".into(),
        )),
    }
}
