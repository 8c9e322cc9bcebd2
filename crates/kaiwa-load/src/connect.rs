//! What every client of a run shares, and how one client gets a connection: the WebSocket (from
//! a chosen loopback address when asked), the protocol's handshake, and what the server's
//! `welcome` told it. A client's first connection and those after one ended under it
//! (`--reconnect`) are made alike, so both build on this.

use crate::ledger::Mode;
use crate::media::Samples;
use crate::plan::{self, ClientPlan, Mix};
use crate::report::{Live, Problem};
use crate::windows::Windows;
use futures::{SinkExt, StreamExt};
use kaiwa_protocol::{ErrorCode, legacy, native, path};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{WebSocketStream, client_async_with_config};
use tokio_util::sync::CancellationToken;

pub type Ws = WebSocketStream<TcpStream>;

/// How long the handshake (TCP, upgrade, hello and welcome) may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

/// WebSocket buffers kept small: the `connections` scenario holds 19,000 of them.
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0)
}

/// What every client of a run shares.
#[derive(Debug, Clone)]
pub struct Shared {
    /// The servers' endpoints; each client keeps to the one [`plan::endpoint`] gives it.
    pub urls: Arc<[String]>,
    pub mode: Mode,
    pub mix: Mix,
    pub samples: Arc<Samples>,
    pub live: Arc<Live>,
    /// Cancelled when the run is over (its time limit, or Ctrl-C): clients stop where they are.
    pub stop: CancellationToken,
    /// The windows to judge by when no `welcome` gives them (legacy).
    pub windows: Option<Windows>,
    /// How long a client waits for the answers still due after its last send.
    pub drain_timeout: Duration,
    /// When to stop sending, for runs with a duration.
    pub deadline: Option<Instant>,
    /// Reconnect and resume when a connection ends under the client (`--reconnect`), instead
    /// of counting what it had not got as lost.
    pub reconnect: bool,
}

impl Shared {
    /// The endpoint of client `index`.
    pub fn url(&self, index: usize) -> &str {
        self.urls
            .get(plan::endpoint(index, self.urls.len()))
            .map_or("", String::as_str)
    }
}

/// What a connected client learned from the server.
#[derive(Debug, Clone, Default)]
pub struct Welcome {
    pub windows: Option<Windows>,
    pub max_in_flight_per_client: Option<usize>,
}

/// The outcome of one connection attempt.
#[derive(Debug)]
pub enum Attempt {
    Ready(Box<Ws>, Welcome),
    /// The server closed with this code, one that says to reconnect with backoff (1013 when it
    /// is full): wait and try again.
    Refused(u16),
    /// The connection broke below the WebSocket: worth another try or two.
    Transport(String),
    Failed(Problem),
}

/// Why a WebSocket could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// HTTP 429: the address has as many connections in their handshake as the server takes
    /// from one; another try after a backoff gets in.
    #[error("the server has as many handshakes from this address as it takes (HTTP 429)")]
    TooManyHandshakes,
    #[error("{0}")]
    Failed(String),
}

impl From<OpenError> for String {
    fn from(err: OpenError) -> Self {
        err.to_string()
    }
}

/// Opens a WebSocket to `url` from `source` (any local address when `None`).
pub async fn open(
    url: &str,
    native_header: bool,
    source: Option<std::net::IpAddr>,
) -> Result<Ws, OpenError> {
    let mut request = url.into_client_request().map_err(failed)?;
    if native_header {
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static(kaiwa_protocol::SUBPROTOCOL),
        );
    }
    let uri = request.uri();
    let host = uri.host().unwrap_or("127.0.0.1").trim_matches(['[', ']']);
    let port = uri.port_u16().unwrap_or(80);
    let addr: SocketAddr = tokio::net::lookup_host((host, port))
        .await
        .map_err(failed)?
        .next()
        .ok_or_else(|| failed(format!("{host} has no address")))?;
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(failed)?;
    if let Some(source) = source {
        socket
            .bind(SocketAddr::new(source, 0))
            .map_err(|e| failed(format!("cannot bind {source}: {e}")))?;
    }
    let tcp = socket.connect(addr).await.map_err(failed)?;
    // Small frames must not wait for delayed ACKs (Nagle), or every latency grows by ~40 ms.
    tcp.set_nodelay(true).map_err(failed)?;
    match client_async_with_config(request, tcp, Some(ws_config())).await {
        Ok((ws, _response)) => Ok(ws),
        Err(tungstenite::Error::Http(response)) if response.status() == 429 => {
            Err(OpenError::TooManyHandshakes)
        }
        Err(err) => Err(failed(err)),
    }
}

fn failed(err: impl std::fmt::Display) -> OpenError {
    OpenError::Failed(err.to_string())
}

/// Connects and completes the protocol's handshake.
pub async fn connect(url: &str, mode: Mode, plan: &ClientPlan) -> Attempt {
    connect_after(url, mode, plan, None).await
}

/// Connects and completes the handshake; a native `hello` with `after` asks for every reply
/// after that `seq` first.
pub async fn connect_after(
    url: &str,
    mode: Mode,
    plan: &ClientPlan,
    after: Option<u64>,
) -> Attempt {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, connect_inner(url, mode, plan, after)).await {
        Ok(attempt) => attempt,
        Err(_) => Attempt::Transport("the handshake timed out".into()),
    }
}

async fn connect_inner(url: &str, mode: Mode, plan: &ClientPlan, after: Option<u64>) -> Attempt {
    let url = match mode {
        Mode::Path => path_url(url, plan),
        _ => url.to_owned(),
    };
    let mut ws = match open(&url, mode == Mode::Native, plan.source).await {
        Ok(ws) => ws,
        // Like a full server's 1013: come back after a backoff.
        Err(OpenError::TooManyHandshakes) => return Attempt::Refused(TRY_AGAIN_LATER),
        Err(OpenError::Failed(err)) => return Attempt::Transport(err),
    };
    let hello = match mode {
        Mode::Native | Mode::Echo => Some(to_json(&native::ClientFrame::Hello(native::Hello {
            client_id: Some(plan.client_id.clone()),
            timezone: Some(plan.timezone.name().to_owned()),
            resume: false,
            after,
            token: plan.token.clone(),
        }))),
        Mode::Legacy => Some(to_json(&legacy::ClientFrame {
            client_id: Some(plan.client_id.clone()),
            timezone: Some(plan.timezone.name().to_owned()),
            token: plan.token.clone(),
            ..legacy::ClientFrame::default()
        })),
        // The URL said it all.
        Mode::Path => None,
    };
    // A full server closes right after the upgrade, so this write may fail; its close frame
    // is still there to read.
    let sent = match hello {
        Some(hello) => ws.send(Message::text(hello)).await,
        None => Ok(()),
    };
    // A refusal is an error frame, then the close whose code says whether to come back: the
    // error says why, the close code decides.
    let mut refusal: Option<ErrorCode> = None;
    loop {
        let frame = match ws.next().await {
            Some(Ok(frame)) => frame,
            Some(Err(err)) => {
                return match sent {
                    // Our hello crossed the server's refusal, and the reset took its close
                    // frame with it: a connection lost without a close is 1006, which says to
                    // come back.
                    Err(_) => Attempt::Refused(ABNORMAL_CLOSURE),
                    Ok(()) => Attempt::Transport(err.to_string()),
                };
            }
            None => return Attempt::Transport("closed during the handshake".into()),
        };
        let text = match frame {
            Message::Text(text) => text,
            Message::Close(close) => {
                let code = close.map_or(NO_STATUS, |c| u16::from(c.code));
                return if kaiwa_protocol::reconnects(code) {
                    Attempt::Refused(code)
                } else {
                    Attempt::Failed(refusal.map_or(Problem::Closed(code), |error| {
                        Problem::Error(error.as_str().to_owned())
                    }))
                };
            }
            _ => continue,
        };
        if refusal.is_some() {
            // Only the close may follow a refusal.
            return Attempt::Failed(Problem::UnexpectedFrame);
        }
        match mode {
            Mode::Echo => return Attempt::Ready(Box::new(ws), Welcome::default()),
            Mode::Native => match serde_json::from_str::<native::ServerFrame>(&text) {
                Ok(native::ServerFrame::Welcome(welcome)) => {
                    let windows = match Windows::from_welcome(&welcome.windows) {
                        Ok(windows) => windows,
                        Err(_) => return Attempt::Failed(Problem::MalformedFrame),
                    };
                    return Attempt::Ready(
                        Box::new(ws),
                        Welcome {
                            windows: Some(windows),
                            max_in_flight_per_client: Some(welcome.limits.max_in_flight_per_client),
                        },
                    );
                }
                Ok(native::ServerFrame::Error(error)) => refusal = Some(error.code),
                _ => return Attempt::Failed(Problem::UnexpectedFrame),
            },
            Mode::Legacy => match serde_json::from_str::<legacy::ServerFrame>(&text) {
                Ok(frame) if frame.kind == legacy::FrameKind::System => {
                    return Attempt::Ready(Box::new(ws), Welcome::default());
                }
                Ok(frame) if frame.kind == legacy::FrameKind::Error => {
                    refusal = Some(frame.data.code.unwrap_or(ErrorCode::Internal));
                }
                Ok(frame) if frame.kind == legacy::FrameKind::Heartbeat => continue,
                _ => return Attempt::Failed(Problem::UnexpectedFrame),
            },
            Mode::Path => match serde_json::from_str::<path::ServerFrame>(&text) {
                Ok(path::ServerFrame::Notice(notice)) if notice.message == path::CONNECTED => {
                    return Attempt::Ready(Box::new(ws), Welcome::default());
                }
                Ok(path::ServerFrame::Error(failure)) => {
                    refusal = Some(failure.code.unwrap_or(ErrorCode::Internal));
                }
                Ok(path::ServerFrame::Check { .. }) => continue,
                _ => return Attempt::Failed(Problem::UnexpectedFrame),
            },
        }
    }
}

/// Where a path dialect client connects: the endpoint given (`ws://host/ws`, or the server's
/// root) with the client id as one more segment, its timezone and, with auth on, its token in
/// the query.
pub fn path_url(url: &str, plan: &ClientPlan) -> String {
    // Ids and tokens are plain URL characters; a timezone may hold a `+` (`Etc/GMT+5`).
    let timezone = plan.timezone.name().replace('+', "%2B");
    let mut url = format!(
        "{}/{}?timezone={timezone}",
        url.trim_end_matches('/'),
        plan.client_id
    );
    if let Some(token) = &plan.token {
        url.push_str("&token=");
        url.push_str(token);
    }
    url
}

/// What the tool records for an upgrade refused for now (HTTP 429): "try again later".
const TRY_AGAIN_LATER: u16 = 1013;
/// What the tool records for a connection that ended without a close frame (RFC 6455, 7.1.5).
pub(crate) const ABNORMAL_CLOSURE: u16 = 1006;

/// The answer to the server's heartbeat in the protocols that send it as a frame: the path
/// dialect's `PONG`, else the legacy protocol's.
pub(crate) fn heartbeat_pong(mode: Mode) -> String {
    match mode {
        Mode::Path => to_json(&path::ClientFrame::check(path::PONG)),
        _ => to_json(&legacy::heartbeat_pong()),
    }
}
/// What the tool records for a close frame without a code.
pub(crate) const NO_STATUS: u16 = 1005;

pub(crate) fn to_json<T: serde::Serialize>(frame: &T) -> String {
    // Plain data types: serializing cannot fail.
    serde_json::to_string(frame).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(timezone: chrono_tz::Tz, token: Option<&str>) -> ClientPlan {
        ClientPlan {
            index: 0,
            client_id: "load-1a2b-0".into(),
            timezone,
            messages: Some(1),
            source: None,
            seed: 1,
            token: token.map(str::to_owned),
        }
    }

    #[test]
    fn a_path_client_adds_its_id_to_the_endpoint_and_says_its_timezone_in_the_query() {
        let tokyo = plan(chrono_tz::Asia::Tokyo, None);
        assert_eq!(
            path_url("ws://127.0.0.1:8082/ws", &tokyo),
            "ws://127.0.0.1:8082/ws/load-1a2b-0?timezone=Asia/Tokyo"
        );
        for root in ["ws://127.0.0.1:8082/", "ws://127.0.0.1:8082"] {
            assert_eq!(
                path_url(root, &tokyo),
                "ws://127.0.0.1:8082/load-1a2b-0?timezone=Asia/Tokyo"
            );
        }
        let offset = plan(chrono_tz::Etc::GMTPlus5, Some("a.b.c"));
        assert_eq!(
            path_url("ws://h/ws", &offset),
            "ws://h/ws/load-1a2b-0?timezone=Etc/GMT%2B5&token=a.b.c"
        );
    }
}
