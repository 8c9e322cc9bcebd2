//! The front door: accepts TCP connections (TLS when configured) and serves HTTP/1 on them
//! under limits a stranger cannot outlast: a cap on connections, a deadline for a request's
//! headers and another for an idle kept-alive connection, and a byte allowance for an upgraded
//! connection that has not yet said who it is ([`Peer::limit_reads`]).

mod peer;
mod shares;
mod timer;
mod tls;

pub use peer::{Peer, is_over_allowance};
pub use shares::{Share, ShareFull, Shares};
pub use tls::{Tls, TlsError};

use crate::config::ListenerConfig;
use crate::domain::Networks;
use axum::Router;
use axum::http::Request;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use peer::Metered;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use timer::ConnectionTimer;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// The most a connection's read buffer grows to while it sends a request head (hyper's
/// default is about 400 KiB). Heads larger than this are refused with 431; it holds a token
/// of the largest size kaiwa takes and a browser's cookies with room to spare, and caps what a
/// connection that never finishes its headers can hold.
const MAX_HEAD_BUFFER: usize = 32 * 1024;
/// After an accept error other than a refused connection (out of file descriptors, say), the
/// loop waits before the next accept rather than spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// What every connection of a listener is held to.
#[derive(Debug, Clone)]
pub struct Limits {
    /// HTTP connections open at once; an upgraded connection stops counting.
    pub max_connections: usize,
    /// The same from one source address (0: no cap), but for `proxies`.
    pub per_address: usize,
    pub proxies: Networks,
    /// A connection's first request head must arrive within it (and the TLS handshake too).
    pub header_timeout: Duration,
    /// A kept-alive connection's next request head must arrive within it.
    pub idle_timeout: Duration,
}

impl Limits {
    pub fn from_config(config: &ListenerConfig) -> Self {
        Self {
            max_connections: config.max_connections as usize,
            per_address: config.max_connections_per_address as usize,
            proxies: config.proxy_address.clone(),
            header_timeout: config.header_timeout,
            idle_timeout: config.idle_timeout,
        }
    }
}

/// A bound socket, served by [`Listener::serve`].
pub struct Listener {
    tcp: TcpListener,
    limits: Limits,
    tls: Option<Arc<Tls>>,
}

impl Listener {
    pub fn new(tcp: TcpListener, limits: Limits, tls: Option<Arc<Tls>>) -> Self {
        Self { tcp, limits, tls }
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// Serves `router` until `stop` is cancelled, then lets the requests in progress finish
    /// (kept-alive connections close at once) and returns once every HTTP connection has
    /// closed. Upgraded connections belong to whoever took them by then.
    pub async fn serve(self, router: Router, stop: CancellationToken) {
        let permits = Arc::new(Semaphore::new(self.limits.max_connections));
        let shares = Shares::new(self.limits.per_address, self.limits.proxies.clone());
        let connections = TaskTracker::new();
        let shared = Arc::new(Shared {
            router,
            limits: self.limits.clone(),
            tls: self.tls,
            stop: stop.clone(),
        });
        loop {
            // A connection is accepted only once it has a place: past the cap, new ones wait
            // in the kernel's backlog rather than in the server's memory.
            let permit = tokio::select! {
                () = stop.cancelled() => break,
                permit = permits.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
            };
            let (tcp, addr) = tokio::select! {
                () = stop.cancelled() => break,
                accepted = self.tcp.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(err) if is_connection_error(&err) => continue,
                    Err(err) => {
                        tracing::error!(%err, "could not accept a connection");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                },
            };
            // One address may not take every place: past its share, its new connection is
            // closed at once, and the place goes back to the others.
            let share = match shares.take(Some(addr.ip())) {
                Ok(share) => share,
                Err(full) => {
                    metrics::counter!("kaiwa_http_refused_total", "reason" => "per_address")
                        .increment(1);
                    tracing::debug!(source = %full.source, "refused: too many HTTP connections from one address");
                    continue;
                }
            };
            // Without TCP_NODELAY the several small frames of one message wait on delayed
            // ACKs (Nagle), adding ~40 ms to every reply.
            if let Err(err) = tcp.set_nodelay(true) {
                tracing::debug!(%err, "could not set TCP_NODELAY");
            }
            let shared = shared.clone();
            connections.spawn(async move {
                metrics::gauge!("kaiwa_http_connections").increment(1.0);
                shared.serve_connection(tcp, addr).await;
                metrics::gauge!("kaiwa_http_connections").decrement(1.0);
                drop(share);
                drop(permit);
            });
        }
        connections.close();
        connections.wait().await;
    }
}

/// What every connection task of one listener shares.
struct Shared {
    router: Router,
    limits: Limits,
    tls: Option<Arc<Tls>>,
    /// Cancelled when the server stops: connections finish their request and close.
    stop: CancellationToken,
}

impl Shared {
    async fn serve_connection(&self, tcp: TcpStream, addr: SocketAddr) {
        let Some(tls) = &self.tls else {
            return self.serve_http(tcp, addr).await;
        };
        // The TLS handshake is part of what must arrive within the header timeout.
        match tokio::time::timeout(self.limits.header_timeout, tls.accept(tcp)).await {
            Ok(Ok(stream)) => self.serve_http(stream, addr).await,
            Ok(Err(err)) => {
                metrics::counter!("kaiwa_http_refused_total", "reason" => "tls_handshake")
                    .increment(1);
                tracing::debug!(%addr, %err, "TLS handshake failed");
            }
            Err(_) => {
                metrics::counter!("kaiwa_http_refused_total", "reason" => "tls_timeout")
                    .increment(1);
                tracing::debug!(%addr, "no TLS handshake within the header timeout");
            }
        }
    }

    async fn serve_http<S>(&self, io: S, addr: SocketAddr)
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let peer = Arc::new(Peer::new(addr));
        let io = Metered::new(io, peer.clone());
        let timer = ConnectionTimer::new(
            peer.clone(),
            self.limits.header_timeout,
            self.limits.idle_timeout,
        );
        let service = self
            .router
            .clone()
            .map_request(move |mut request: Request<Incoming>| {
                peer.count_request();
                request.extensions_mut().insert(peer.clone());
                request
            });
        let connection = http1::Builder::new()
            .timer(timer)
            .header_read_timeout(self.limits.header_timeout)
            .max_buf_size(MAX_HEAD_BUFFER)
            .serve_connection(TokioIo::new(io), TowerToHyperService::new(service))
            .with_upgrades();
        tokio::pin!(connection);
        let served = tokio::select! {
            served = connection.as_mut() => served,
            () = self.stop.cancelled() => {
                connection.as_mut().graceful_shutdown();
                connection.await
            }
        };
        if let Err(err) = served {
            if err.is_timeout() {
                metrics::counter!("kaiwa_http_refused_total", "reason" => "header_timeout")
                    .increment(1);
            }
            tracing::debug!(%addr, %err, "HTTP connection ended with an error");
        }
    }
}

/// Errors of one connection that say nothing about the listener.
fn is_connection_error(err: &std::io::Error) -> bool {
    matches!(
        err.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}
