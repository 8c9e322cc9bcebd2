//! Media over HTTP: uploaded files (with range requests, so a video can be seeked), the spoken
//! voice replies and the generated image replies. With auth on, an uploaded file is served only
//! to its client; reply media reveals nothing about anyone and stays public.

use super::{ApiError, HttpState, access};
use crate::replies::{image, voice};
use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use kaiwa_protocol::ReplyType;
use kaiwa_protocol::history::ErrorBody;
use serde::Deserialize;
use std::sync::Arc;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// Reply media never changes once made: it may be cached for good.
const IMMUTABLE: &str = "public, max-age=31536000, immutable";
/// An uploaded file never changes under its name either, but with auth on only its client may
/// see it: no shared cache may keep it.
const IMMUTABLE_PRIVATE: &str = "private, max-age=31536000, immutable";

pub(super) fn router() -> OpenApiRouter<Arc<HttpState>> {
    OpenApiRouter::new()
        .routes(routes!(voice_reply))
        .routes(routes!(image_reply))
        .routes(routes!(uploaded))
}

#[derive(Debug, Deserialize)]
struct FileParams {
    sig: Option<String>,
}

/// An uploaded file, at the path the history gives in `content`.
#[utoipa::path(
    get,
    path = "/media/{folder}/{file}",
    tag = "media",
    params(
        ("folder" = String, Path, description = "`images`, `videos` or `voices`."),
        ("file" = String, Path, description = "The stored file's name: letters, digits and dots."),
        ("sig" = Option<String>, Query, description = "Auth on: the proof that the file is the token's client's, as the history's link carries it."),
        ("Range" = Option<String>, Header, description = "A byte range, e.g. `bytes=0-1023`."),
    ),
    security(("client_token" = [])),
    responses(
        (status = 200, description = "The file, with `ETag`, `Last-Modified` and `Accept-Ranges: bytes`.", content(("image/*"), ("video/*"), ("audio/*"))),
        (status = 206, description = "The range asked for.", content(("image/*"), ("video/*"), ("audio/*"))),
        (status = 304, description = "Not modified since the `If-Modified-Since` given."),
        (status = 401, description = "Auth is on and the request has no valid token: `code` says what is wrong with it.", body = ErrorBody),
        (status = 403, description = "The token is for a client this file is not one of (`client_id_mismatch`).", body = ErrorBody),
        (status = 404, description = "No such file (`not_found`).", body = ErrorBody),
        (status = 416, description = "The range is outside the file."),
    ),
)]
async fn uploaded(
    State(state): State<Arc<HttpState>>,
    path: Result<Path<(String, String)>, PathRejection>,
    params: Result<Query<FileParams>, QueryRejection>,
    headers: HeaderMap,
    request: Request,
) -> Result<Response, ApiError> {
    let Path((folder, file)) = path.map_err(|_| ApiError::NotFound)?;
    let proof = params.ok().and_then(|Query(params)| params.sig);
    // The file's own path as the history stores it: what `sig` vouches for.
    access::file(
        &state,
        &headers,
        &format!("media/{folder}/{file}"),
        proof.as_deref(),
    )?;
    let mut response = state
        .media
        .serve(&folder, &file, request)
        .await
        .ok_or(ApiError::NotFound)?;
    let found = response.status().is_success() || response.status() == StatusCode::NOT_MODIFIED;
    let headers = response.headers_mut();
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // Only a file that exists may be cached for good: it never changes under its name.
    if found {
        let cache = if state.access.tokens.is_some() {
            IMMUTABLE_PRIVATE
        } else {
            IMMUTABLE
        };
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    }
    Ok(response)
}

/// A spoken voice reply, built into the server.
#[utoipa::path(
    get,
    path = "/media/replies/voice/{file}",
    tag = "media",
    params(("file" = String, Path, description = "`voice.wav`, `video.wav` or `image.wav`.")),
    responses(
        (status = 200, description = "The clip.", content_type = "audio/wav", body = [u8]),
        (status = 404, description = "No such clip (`not_found`).", body = ErrorBody),
    ),
)]
async fn voice_reply(path: Result<Path<String>, PathRejection>) -> Result<Response, ApiError> {
    let Path(file) = path.map_err(|_| ApiError::NotFound)?;
    let clip = file
        .strip_suffix(".wav")
        .and_then(voice::clip)
        .ok_or(ApiError::NotFound)?;
    Ok(media_response(voice::MIME, Body::from(clip.wav)))
}

/// The image reply of a message: a PNG drawn from its id, the same every time.
#[utoipa::path(
    get,
    path = "/media/replies/image/{file}",
    tag = "media",
    params(("file" = String, Path, description = "`<message id>.png`, for a positive id.")),
    responses(
        (status = 200, description = "A 256×256 PNG.", content_type = "image/png", body = [u8]),
        (status = 404, description = "No stored message with this id has an image reply (`not_found`).", body = ErrorBody),
        (status = 500, description = "The picture could not be drawn (`internal`).", body = ErrorBody),
        (status = 503, description = "The database cannot be read now (`unavailable`).", body = ErrorBody),
    ),
)]
async fn image_reply(
    State(state): State<Arc<HttpState>>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(file) = path.map_err(|_| ApiError::NotFound)?;
    let seed: i64 = file
        .strip_suffix(".png")
        .and_then(|id| id.parse().ok())
        .filter(|id| *id > 0)
        .ok_or(ApiError::NotFound)?;
    // Drawn only for a message that has an image reply: a flood of made-up ids costs one
    // indexed read each, never a drawing.
    let has_image = state.store.message(seed).await?.is_some_and(|message| {
        message
            .replies
            .iter()
            .any(|reply| reply.reply_type == ReplyType::Image)
    });
    if !has_image {
        return Err(ApiError::NotFound);
    }
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
