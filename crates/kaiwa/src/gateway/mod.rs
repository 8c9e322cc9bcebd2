//! The gateway: the WebSocket endpoints, `/ws` and the path dialect's (an upgrade to any other
//! path, such as `/<client_id>` or `/ws/<client_id>`). It upgrades connections, runs one session
//! actor per client (handshake, heartbeat, reading), keeps the registry of connected clients, and
//! delivers what workers report back to the right client's outbox.

mod cluster;
mod command;
mod connection;
mod delivery;
mod expiry;
mod handshake;
mod outbox;
mod refusal;
mod registry;
mod session;
mod strangers;
mod stream;
#[cfg(test)]
mod tests;
mod wire;

use crate::admission::{Admission, ConnectionSlots};
use crate::auth::{self, AuthError, Authenticator, Claims};
use crate::clock::Clock;
use crate::config::{ServeConfig, SessionConfig};
use crate::domain::Networks;
use crate::listener::{Peer, ShareFull, Shares};
use crate::store::Store;
use crate::url::Plus;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{FromRequestParts, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use handshake::{Opening, PathIntro};
use kaiwa_protocol::ErrorCode;
use kaiwa_protocol::history::ErrorBody;
use kaiwa_protocol::native::{Limits, WindowInfo};
use registry::Registry;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use strangers::Strangers;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use cluster::ClusterLink;
pub(crate) use outbox::OutboxLimits;

/// Per-connection WebSocket buffers. The read buffer is allocated for every connection up
/// front (axum's default is 128 KiB), so it is kept small; frames larger than it are still read,
/// into a buffer sized for that frame. 1 KiB holds a typical client frame; going down from 4 KiB
/// took an idle connection from 17 to 14 KiB resident (bench/run.sh), with no measurable cost
/// in messages per second.
const READ_BUFFER: usize = 1024;
/// Frames are gathered up to this size before a write to the socket.
const WRITE_BUFFER: usize = 16 * 1024;
/// Beyond this, writes fail rather than buffer: the outbox is the queue, not the socket.
const MAX_WRITE_BUFFER: usize = 4 * 1024 * 1024;
/// What a connection may send after the upgrade until its handshake is verified, frame
/// headers, pings and the handshake frame itself included: a handshake frame of the largest
/// size taken (with a token of the largest size taken) fits, a megabyte frame does not start.
/// Past it the connection is closed with 1009, having been read no further.
pub const HANDSHAKE_ALLOWANCE: usize = 16 * 1024;

/// What sessions need to know, fixed at start.
#[derive(Debug, Clone)]
pub struct GatewaySettings {
    pub sessions: SessionConfig,
    /// Addresses many clients share (a proxy in front): not capped per address.
    pub(crate) proxies: Networks,
    pub max_clients: usize,
    pub max_in_flight_per_client: usize,
    pub(crate) outbox: OutboxLimits,
    pub max_frame_bytes: usize,
    /// What a native client is told at `welcome` besides the session timers.
    pub(crate) limits: Limits,
    pub(crate) windows: Vec<WindowInfo>,
    /// Checks the tokens of clients when auth is on; `None` when it is off.
    pub(crate) auth: Option<Arc<Authenticator>>,
}

impl GatewaySettings {
    pub fn from_config(config: &ServeConfig) -> Self {
        let limits = &config.limits;
        // An accepted media message sends up to six frames (ack, processing, three replies,
        // replied): an outbox smaller than that per allowed message can cut off a healthy client.
        let per_client_frames = 6 * limits.max_in_flight_per_client;
        if limits.outbox_capacity < per_client_frames {
            tracing::warn!(
                outbox_capacity = limits.outbox_capacity,
                max_in_flight_per_client = limits.max_in_flight_per_client,
                "--outbox-capacity is below 6 frames per message a client may have in flight; clients using their whole allowance may be disconnected as slow"
            );
        }
        Self {
            sessions: config.sessions.clone(),
            proxies: config.listener.proxy_address.clone(),
            max_clients: limits.max_clients as usize,
            max_in_flight_per_client: limits.max_in_flight_per_client as usize,
            outbox: OutboxLimits {
                frames: limits.outbox_capacity as usize,
                bytes: limits.outbox_bytes,
            },
            max_frame_bytes: config.content.max_frame_bytes(),
            limits: Limits {
                max_text_chars: config.content.max_text_chars as usize,
                max_image_bytes: config.content.max_image_bytes,
                max_voice_bytes: config.content.max_voice_bytes,
                max_video_bytes: config.content.max_video_bytes,
                max_in_flight_per_client: limits.max_in_flight_per_client as usize,
            },
            windows: config.windows.describe(),
            auth: None,
        }
    }

    /// The same settings with auth on (`Some`) or off.
    pub fn with_auth(self, auth: Option<Arc<Authenticator>>) -> Self {
        Self { auth, ..self }
    }
}

pub struct Gateway {
    pub(crate) settings: GatewaySettings,
    pub(crate) slots: ConnectionSlots,
    /// Connections upgraded and not yet verified: they hold no client slot.
    pub(crate) strangers: Strangers,
    pub(crate) registry: Registry,
    pub(crate) admission: Arc<Admission>,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) clock: Arc<dyn Clock>,
    /// Sessions, their writers and their message tasks, so shutdown can wait for all of them.
    pub(crate) tracker: TaskTracker,
    /// Cancelled when shutdown begins: sessions take no new messages, upgrades are refused.
    pub(crate) draining: CancellationToken,
    /// Cancelled when the drain ends: every session sends its going-away close.
    pub(crate) close_sessions: CancellationToken,
    /// Cancelled (and replaced by a fresh one) to close every session now open while the
    /// gateway goes on: in a cluster, when its lease ran out and its claims may be others' now.
    evictions: Mutex<CancellationToken>,
    /// The rest of the cluster: in one process, a cluster of one ([`crate::presence::LocalPresence`]).
    pub(crate) cluster: Arc<ClusterLink>,
    next_conn_id: AtomicU64,
}

impl Gateway {
    pub fn new(
        settings: GatewaySettings,
        admission: Arc<Admission>,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        tracker: TaskTracker,
        cluster: Arc<ClusterLink>,
    ) -> Self {
        Self {
            slots: ConnectionSlots::new(settings.max_clients),
            strangers: Strangers::new(
                settings.sessions.max_handshakes as usize,
                Shares::new(
                    settings.sessions.max_handshakes_per_address as usize,
                    settings.proxies.clone(),
                ),
            ),
            settings,
            registry: Registry::default(),
            admission,
            store,
            clock,
            tracker,
            draining: CancellationToken::new(),
            close_sessions: CancellationToken::new(),
            evictions: Mutex::new(CancellationToken::new()),
            cluster,
            next_conn_id: AtomicU64::new(1),
        }
    }

    /// The token that closes the sessions starting now, when [`Gateway::evict_all`] is called.
    pub(crate) fn eviction(&self) -> CancellationToken {
        self.evictions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Closes every open session with "going away" (clients reconnect), and goes on serving.
    pub fn evict_all(&self) {
        let old = std::mem::replace(
            &mut *self
                .evictions
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
            CancellationToken::new(),
        );
        old.cancel();
    }

    fn next_conn_id(&self) -> u64 {
        self.next_conn_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Clients with a live session (handshake done).
    pub fn connected(&self) -> usize {
        self.registry.len()
    }

    /// Client slots taken: by verified clients only, never by a connection in its handshake.
    pub fn slots_in_use(&self) -> usize {
        self.slots.in_use()
    }

    /// Connections upgraded and still in their handshake.
    pub fn handshakes(&self) -> usize {
        self.strangers.len()
    }

    /// Stops taking messages: the first step of shutdown.
    pub fn begin_drain(&self) {
        self.draining.cancel();
    }

    /// Closes every session with "going away": the last step of shutdown.
    pub fn close_all(&self) {
        self.close_sessions.cancel();
    }

    pub fn is_draining(&self) -> bool {
        self.draining.is_cancelled()
    }
}

/// `/ws`, and `/ws/<client_id>` for the path dialect. Upgrades to `/ws/<client_id>` are taken by
/// [`path_upgrades`] before they reach the route, as are those to any other path but `/ws`
/// (which may be another route's, `/health`, `/index.html`...): the route stays for what it
/// answers a plain request (400), and for the OpenAPI document.
pub fn router(gateway: Arc<Gateway>) -> Router {
    // GET only (HTTP/1.1 upgrades; the server speaks no HTTP/2): other methods get 405 with
    // `Allow`, from the router.
    Router::new()
        .route("/ws", get(upgrade))
        .route("/ws/{client_id}", get(upgrade_path))
        .with_state(gateway)
}

/// The WebSocket endpoints in the HTTP API's OpenAPI document.
pub fn openapi() -> utoipa::openapi::OpenApi {
    #[derive(utoipa::OpenApi)]
    #[openapi(paths(upgrade, upgrade_path))]
    struct Doc;
    <Doc as utoipa::OpenApi>::openapi()
}

/// Middleware over the whole router: a WebSocket upgrade to any path but `/ws` goes to the path
/// dialect, its last segment the client id, whatever that path serves to plain requests, which
/// go on to their route (or to 404) as before. An id that is also a page's name (`health`) is
/// thus still a client's, and a path that ends in `/` names an empty id, which is refused as
/// any invalid one is (after the upgrade, with an error frame the client can read).
pub async fn path_upgrades(
    State(gateway): State<Arc<Gateway>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(client_id) = path_client(&request) else {
        return next.run(request).await;
    };
    let (mut parts, _body) = request.into_parts();
    let ws = match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
        Ok(ws) => ws,
        Err(rejection) => return rejection.into_response(),
    };
    let peer = parts.extensions.get::<Arc<Peer>>().cloned();
    accept(
        gateway,
        peer,
        &parts.headers,
        parts.uri.query(),
        ws,
        Some(client_id),
    )
}

/// The client id of a WebSocket upgrade to a path other than `/ws`: the path's last segment,
/// unescaped (empty when the path ends in `/`); `None` for any other request.
fn path_client(request: &Request) -> Option<String> {
    let upgrade = request
        .headers()
        .get(header::UPGRADE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| {
            value
                .split(',')
                .any(|token| token.trim().eq_ignore_ascii_case("websocket"))
        });
    if request.method() != Method::GET || !upgrade {
        return None;
    }
    let path = request.uri().path();
    if path == "/ws" {
        return None;
    }
    // Split before unescaping: an escaped `/` (`%2F`) is part of the id, and refused with it.
    let segment = path.rsplit_once('/').map_or(path, |(_, last)| last);
    Some(crate::url::unescape(segment, Plus::Literal))
}

/// The WebSocket endpoint of the legacy and native protocols (see docs/protocol.md). With auth
/// on, the token may come in the handshake frame, or here, where it is checked before anything
/// is upgraded.
#[utoipa::path(
    get,
    path = "/ws",
    tag = "websocket",
    params(
        ("token" = Option<String>, Query, description = "The client's token (auth on), for clients that cannot set headers; the handshake frame's `token` is preferred."),
    ),
    responses(
        (status = 101, description = "Switched to WebSocket: `kaiwa.v1` if offered in `Sec-WebSocket-Protocol`, else the legacy protocol. Refusals after the upgrade come as an error frame and a close code."),
        (status = 400, description = "Not a WebSocket upgrade request.", content_type = "text/plain"),
        (status = 401, description = "Auth is on and the upgrade request carries a token (`Authorization: Bearer` or `?token=`) that is not valid: `code` says why. Nothing is upgraded.", body = ErrorBody),
        (status = 426, description = "The connection cannot be upgraded.", content_type = "text/plain"),
        (status = 429, description = "This address has as many connections in their handshake as it may (`too_many_handshakes`); retry after `Retry-After` seconds.", body = ErrorBody),
    ),
)]
pub(crate) async fn upgrade(
    State(gateway): State<Arc<Gateway>>,
    peer: Option<Extension<Arc<Peer>>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    ws: WebSocketUpgrade,
) -> Response {
    let peer = peer.map(|Extension(peer)| peer);
    accept(gateway, peer, &headers, query.as_deref(), ws, None)
}

/// The path dialect's WebSocket endpoint (see docs/protocol.md): the last path segment is the
/// client id, `?timezone=` its timezone (else `--default-timezone`), and there is no handshake
/// frame. An upgrade to any other path but `/ws` (`/<client_id>`, `/a/b/<client_id>`) works the
/// same. With auth on, the token comes here (`Authorization: Bearer` or `?token=`), and its `sub`
/// must be the path's client id.
#[utoipa::path(
    get,
    path = "/ws/{client_id}",
    tag = "websocket",
    params(
        ("client_id" = String, Path, description = "The client's id."),
        ("timezone" = Option<String>, Query, description = "The client's IANA timezone; the server's --default-timezone (UTC unless set) when absent."),
        ("token" = Option<String>, Query, description = "The client's token (auth on), for clients that cannot set headers."),
    ),
    responses(
        (status = 101, description = "Switched to WebSocket, in the path dialect: the server greets with {\"message\": \"Connected\"}. Refusals after the upgrade (an invalid client id or timezone, a duplicate, a full server) come as an {\"error\": ...} frame and a close code."),
        (status = 400, description = "Not a WebSocket upgrade request.", content_type = "text/plain"),
        (status = 401, description = "Auth is on and the upgrade request carries a token (`Authorization: Bearer` or `?token=`) that is not valid: `code` says why. Nothing is upgraded.", body = ErrorBody),
        (status = 426, description = "The connection cannot be upgraded.", content_type = "text/plain"),
        (status = 429, description = "This address has as many connections in their handshake as it may (`too_many_handshakes`); retry after `Retry-After` seconds.", body = ErrorBody),
    ),
)]
pub(crate) async fn upgrade_path(_upgrade: WebSocketUpgrade) -> StatusCode {
    // Upgrades never get here: `path_upgrades` takes every one to a path but `/ws` before the
    // router does. The route answers a plain request (400, from the extractor) and names the
    // endpoint in the API document; a router without the middleware would find no client here.
    StatusCode::NOT_FOUND
}

/// Upgrades a connection whose request passed the checks that come before a handshake: its
/// token (auth on), and its place among the strangers. `client_id` is the path dialect's, from
/// the URL; without it the first frame says who the client is.
fn accept(
    gateway: Arc<Gateway>,
    peer: Option<Arc<Peer>>,
    headers: &HeaderMap,
    query: Option<&str>,
    ws: WebSocketUpgrade,
    client_id: Option<String>,
) -> Response {
    let verified = match verify_upgrade(&gateway, headers, query) {
        Ok(verified) => verified,
        Err(err) => {
            metrics::counter!("kaiwa_connections_refused_total", "reason" => err.code().as_str())
                .increment(1);
            let body = ErrorBody::new(err.code(), err.to_string());
            let challenge = [(header::WWW_AUTHENTICATE, auth::challenge(&err))];
            return (StatusCode::UNAUTHORIZED, challenge, Json(body)).into_response();
        }
    };
    // Every connection waits in the strangers' pool until its handshake frame is read, one
    // whose upgrade carried a valid token too: it leaves within a round trip, so the pool never
    // crowds it out, but a token does not buy sockets beyond the pool's caps.
    let pass = match gateway
        .strangers
        .admit(peer.as_ref().map(|peer| peer.addr().ip()))
    {
        Ok(pass) => pass,
        Err(full) => return source_full(full),
    };
    if let Some(peer) = &peer {
        peer.limit_reads(HANDSHAKE_ALLOWANCE);
    }
    let max_frame = gateway.settings.max_frame_bytes;
    let ws = ws
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(MAX_WRITE_BUFFER)
        .max_message_size(max_frame)
        .max_frame_size(max_frame);
    let (ws, opening) = match client_id {
        // The path dialect is chosen by the URL: no subprotocol to agree on.
        Some(client_id) => {
            let timezone =
                query.and_then(|query| crate::url::query_param(query, "timezone", Plus::Literal));
            (
                ws,
                Opening::Path(PathIntro {
                    client_id,
                    timezone,
                }),
            )
        }
        None => {
            let ws = ws.protocols([kaiwa_protocol::SUBPROTOCOL]);
            let native = ws.selected_protocol().is_some();
            (ws, Opening::Frame { native })
        }
    };
    let arrival = connection::Arrival {
        opening,
        peer,
        pass,
        verified,
    };
    ws.on_failed_upgrade(|err| tracing::debug!(%err, "WebSocket upgrade failed"))
        .on_upgrade(move |socket| {
            let tracker = gateway.tracker.clone();
            tracker.track_future(connection::serve(gateway, Box::new(socket), arrival))
        })
}

/// The upgrade request's token, checked (auth on): `None` when it carries none.
fn verify_upgrade(
    gateway: &Gateway,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<Option<Claims>, AuthError> {
    let Some(auth) = &gateway.settings.auth else {
        // Auth off: a token is ignored, as the handshake frame's is.
        return Ok(None);
    };
    auth::upgrade_token(headers, query)?
        .map(|token| auth.verify(&token, gateway.clock.now()))
        .transpose()
}

/// 429: the address has as many connections in their handshake as it may.
fn source_full(full: ShareFull) -> Response {
    metrics::counter!("kaiwa_connections_refused_total", "reason" => "too_many_handshakes")
        .increment(1);
    tracing::debug!(source = %full.source, "refused: too many handshakes from one address");
    let body = ErrorBody::new(
        ErrorCode::TooManyHandshakes,
        format!(
            "{} connections from your address are already in their handshake; retry in a second",
            full.limit
        ),
    );
    let retry = [(header::RETRY_AFTER, HeaderValue::from_static("1"))];
    (StatusCode::TOO_MANY_REQUESTS, retry, Json(body)).into_response()
}
