//! Media over HTTP: uploaded files (with range requests, so a video can be seeked), the spoken
//! voice replies and the generated image replies.

use super::{ApiError, HttpState};
use crate::replies::{image, voice};
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use std::sync::Arc;
use tower::ServiceExt;
use tower_http::services::ServeFile;

/// Reply media never changes once made: it may be cached for good.
const IMMUTABLE: &str = "public, max-age=31536000, immutable";

pub(super) fn router() -> Router<Arc<HttpState>> {
    Router::new()
        .route("/media/replies/voice/{file}", get(voice_reply))
        .route("/media/replies/image/{file}", get(image_reply))
        .route("/media/{folder}/{file}", get(uploaded))
}

async fn uploaded(
    State(state): State<Arc<HttpState>>,
    Path((folder, file)): Path<(String, String)>,
    request: Request,
) -> Result<Response, ApiError> {
    let path = state
        .media
        .stored_file(&folder, &file)
        .ok_or(ApiError::NotFound)?;
    let mut response = ServeFile::new(path)
        .oneshot(request)
        .await
        .unwrap_or_else(|never| match never {})
        .map(Body::new);
    let found = response.status().is_success() || response.status() == StatusCode::NOT_MODIFIED;
    let headers = response.headers_mut();
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // Only a file that exists may be cached for good: it never changes under its name.
    if found {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static(IMMUTABLE));
    }
    Ok(response)
}

async fn voice_reply(Path(file): Path<String>) -> Result<Response, ApiError> {
    let clip = file
        .strip_suffix(".wav")
        .and_then(voice::clip)
        .ok_or(ApiError::NotFound)?;
    Ok(media_response(voice::MIME, Body::from(clip.wav)))
}

async fn image_reply(Path(file): Path<String>) -> Result<Response, ApiError> {
    let seed: i64 = file
        .strip_suffix(".png")
        .and_then(|id| id.parse().ok())
        .filter(|id| *id > 0)
        .ok_or(ApiError::NotFound)?;
    let png = tokio::task::spawn_blocking(move || image::render(seed))
        .await
        .map_err(|err| ApiError::Internal(format!("drawing image reply {seed} failed: {err}")))?;
    Ok(media_response(image::MIME, Body::from(png)))
}

fn media_response(mime: &'static str, body: Body) -> Response {
    (
        [
            (header::CONTENT_TYPE, mime),
            (header::CACHE_CONTROL, IMMUTABLE),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}
