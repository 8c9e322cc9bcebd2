//! The browser chat client: the page at `/` and its assets under `/assets/`, embedded in the
//! binary at compile time so that running kaiwa needs nothing else on disk. The page is told at
//! load whether the server needs a token (a `<meta name="kaiwa-auth">` tag).

use super::HttpState;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use std::borrow::Cow;
use std::sync::Arc;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// One embedded file of `web/`.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: Cow<'static, [u8]>,
    /// A hash of the body, fixed at compile time, so a browser can revalidate for free.
    etag: u64,
}

macro_rules! asset {
    ($name:literal, $content_type:expr) => {{
        const BODY: &[u8] = include_bytes!(concat!("../../../../web/", $name));
        Asset {
            name: $name,
            content_type: $content_type,
            body: Cow::Borrowed(BODY),
            etag: fnv1a(BODY),
        }
    }};
}

const HTML: &str = "text/html; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const SVG: &str = "image/svg+xml";

const INDEX: Asset = asset!("index.html", HTML);

const ASSETS: &[Asset] = &[
    asset!("style.css", CSS),
    asset!("app.js", JS),
    asset!("protocol.js", JS),
    asset!("conversation.js", JS),
    asset!("ui.js", JS),
    asset!("media.js", JS),
    asset!("words.js", JS),
    asset!("favicon.svg", SVG),
];

/// The names carry no content hash, so the browser must ask every time; the ETag makes the
/// answer a 304 while the binary is the same, and a new build is picked up at once.
const CACHE_CONTROL: &str = "no-cache";

/// Everything the page loads comes from this server; media may also be local blobs (previews of
/// files being sent, voice being recorded).
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' blob: data:; media-src 'self' blob:; connect-src 'self'; \
     base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// What the page says about auth in the file; the server says `token` instead when auth is on.
const AUTH_OFF: &str = r#"<meta name="kaiwa-auth" content="none">"#;
const AUTH_ON: &str = r#"<meta name="kaiwa-auth" content="token">"#;

pub(super) fn router() -> OpenApiRouter<Arc<HttpState>> {
    OpenApiRouter::new()
        .routes(routes!(index))
        .routes(routes!(index_html))
        .routes(routes!(asset))
}

/// The browser client.
#[utoipa::path(
    get,
    path = "/",
    tag = "browser client",
    params(("If-None-Match" = Option<String>, Header, description = "The page's `ETag`, to get 304 if it is unchanged.")),
    responses(
        (status = 200, description = "The page.", content_type = "text/html", body = String),
        (status = 304, description = "Unchanged since the `ETag` given."),
    ),
)]
async fn index(State(state): State<Arc<HttpState>>, headers: HeaderMap) -> Response {
    page(&state, &headers)
}

/// The browser client, by its file name.
#[utoipa::path(
    get,
    path = "/index.html",
    tag = "browser client",
    params(("If-None-Match" = Option<String>, Header, description = "The page's `ETag`, to get 304 if it is unchanged.")),
    responses(
        (status = 200, description = "The page.", content_type = "text/html", body = String),
        (status = 304, description = "Unchanged since the `ETag` given."),
    ),
)]
async fn index_html(State(state): State<Arc<HttpState>>, headers: HeaderMap) -> Response {
    page(&state, &headers)
}

fn page(state: &HttpState, headers: &HeaderMap) -> Response {
    let with_auth;
    let index = if state.access.tokens.is_some() {
        let text = String::from_utf8_lossy(&INDEX.body).replace(AUTH_OFF, AUTH_ON);
        with_auth = Asset {
            etag: fnv1a(text.as_bytes()),
            body: Cow::Owned(text.into_bytes()),
            ..INDEX
        };
        &with_auth
    } else {
        &INDEX
    };
    let mut response = serve(index, headers);
    response.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    response
}

/// A file of the browser client: its modules, style sheet and icon.
#[utoipa::path(
    get,
    path = "/assets/{file}",
    tag = "browser client",
    params(
        ("file" = String, Path, description = "`app.js`, `style.css`, `favicon.svg`..."),
        ("If-None-Match" = Option<String>, Header, description = "The file's `ETag`, to get 304 if it is unchanged."),
    ),
    responses(
        (status = 200, description = "The file.", content(("text/javascript"), ("text/css"), ("image/svg+xml"))),
        (status = 304, description = "Unchanged since the `ETag` given."),
        (status = 404, description = "No such file (`not_found`).", body = kaiwa_protocol::history::ErrorBody),
    ),
)]
async fn asset(
    path: Result<Path<String>, axum::extract::rejection::PathRejection>,
    headers: HeaderMap,
) -> Response {
    let found = path
        .ok()
        .and_then(|Path(file)| ASSETS.iter().find(|asset| asset.name == file));
    match found {
        Some(asset) => serve(asset, &headers),
        None => super::ApiError::NotFound.into_response(),
    }
}

fn serve(asset: &Asset, request: &HeaderMap) -> Response {
    let etag = format!("\"{:016x}\"", asset.etag);
    let fresh = request
        .get(header::IF_NONE_MATCH)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|tags| {
            tags.split(',')
                .any(|tag| tag.trim() == etag || tag.trim() == "*")
        });
    let common = [
        (header::CACHE_CONTROL, CACHE_CONTROL.to_owned()),
        (header::ETAG, etag),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_owned()),
    ];
    if fresh {
        return (StatusCode::NOT_MODIFIED, common).into_response();
    }
    (
        common,
        [(header::CONTENT_TYPE, asset.content_type)],
        match &asset.body {
            // Embedded files go out without a copy.
            Cow::Borrowed(body) => axum::body::Body::from(*body),
            Cow::Owned(body) => axum::body::Body::from(body.clone()),
        },
    )
        .into_response()
}

/// FNV-1a, 64 bits: not for security, only to tell two builds' files apart.
const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_asset_the_page_names_is_embedded() {
        let page = std::str::from_utf8(&INDEX.body).expect("the page is UTF-8");
        for start in page
            .match_indices("/assets/")
            .map(|(at, _)| at + "/assets/".len())
        {
            let name: String = page[start..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
                .collect();
            assert!(
                ASSETS.iter().any(|asset| asset.name == name),
                "index.html loads /assets/{name}, which is not embedded"
            );
        }
    }

    #[test]
    fn the_page_says_whether_auth_is_on_in_a_tag_the_server_can_change() {
        let page = std::str::from_utf8(&INDEX.body).expect("the page is UTF-8");
        assert_eq!(
            page.matches(AUTH_OFF).count(),
            1,
            "{AUTH_OFF} once in index.html"
        );
    }

    #[test]
    fn every_module_import_is_embedded() {
        for asset in ASSETS.iter().filter(|asset| asset.content_type == JS) {
            let source = std::str::from_utf8(&asset.body).expect("modules are UTF-8");
            for (at, _) in source.match_indices("from './") {
                let name: String = source[at + "from './".len()..]
                    .chars()
                    .take_while(|c| *c != '\'')
                    .collect();
                assert!(
                    ASSETS.iter().any(|asset| asset.name == name),
                    "{} imports ./{name}, which is not embedded",
                    asset.name
                );
            }
        }
    }
}
