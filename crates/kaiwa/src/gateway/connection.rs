//! One connection's life: the refusals that need no session (server full, shutting down, bad or
//! missing handshake, duplicate client id), then the session, then the close handshake and the
//! bookkeeping of a client that left.

use super::Gateway;
use super::cluster::ClusterSlot;
use super::handshake::{self, Credentials, HandshakeError, Hello, Resume};
use super::outbox::{Closing, Outbox, Writer};
use super::registry::{Duplicate, Liveness, SessionHandle};
use super::session::Session;
use super::strangers::Pass;
use super::stream::ReplyStream;
use super::wire::Protocol;
use crate::auth::Claims;
use crate::config::DuplicatePolicy;
use crate::domain::ClientId;
use crate::listener::Peer;
use crate::presence::{Claim, PresenceError};
use crate::store::StoreError;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures::{Stream, StreamExt};
use kaiwa_protocol::{CloseCode, ErrorCode};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// How long the server waits for the client's answer to its close frame.
const CLOSE_REPLY_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a stranger refused in its handshake gets to take its refusal, and to answer it.
const STRANGER_LINGER: Duration = Duration::from_millis(500);
/// The longest a duplicate connection waits to learn whether the live one still answers.
const LIVENESS_PROBE: Duration = Duration::from_secs(3);
/// What a probe of a connection on another gateway may take besides the ping itself: the
/// broker both ways.
const PROBE_ROUND_TRIP: Duration = Duration::from_secs(1);
/// How long the claim is made again after the holder closed a connection that did not answer.
const RELEASE_WAIT: Duration = Duration::from_secs(2);

/// An upgraded connection, as the upgrade request left it.
pub(crate) struct Arrival {
    /// Whether the client chose `kaiwa.v1` in the upgrade request.
    pub native: bool,
    /// The connection as the listener accepted it: its address and its read allowance.
    /// `None` only when the router is served by something else than kaiwa's listener.
    pub peer: Option<Arc<Peer>>,
    /// Its place in the strangers' pool, until its handshake frame is read.
    pub pass: Pass,
    /// What the upgrade request's token says, checked (auth on).
    pub verified: Option<Claims>,
}

/// Serves one upgraded connection from handshake to close. The client gets a client slot only
/// once its handshake is verified: until then it is a stranger, in a pool of its own.
pub(crate) async fn serve(gateway: Arc<Gateway>, mut socket: WebSocket, arrival: Arrival) {
    let Arrival {
        native,
        peer,
        pass,
        verified,
    } = arrival;
    let Some(hello) = introduce(&gateway, &mut socket, native, pass, verified).await else {
        return;
    };
    // Verified: the client may send what clients may.
    if let Some(peer) = &peer {
        peer.unlimit_reads();
    }
    let Some(slot) = gateway.slots.try_acquire() else {
        refuse_full(
            &mut socket,
            hello.protocol,
            "server",
            gateway.settings.max_clients,
        )
        .await;
        return;
    };
    let conn_id = gateway.next_conn_id();
    // In a cluster the limit is the whole cluster's: one more slot, shared by every gateway.
    let mut cluster_slot = None;
    if let Some(link) = &gateway.cluster {
        match link.take_slot(conn_id, gateway.settings.max_clients).await {
            Ok(Some(slot)) => cluster_slot = Some(slot),
            Ok(None) => {
                refuse_full(
                    &mut socket,
                    hello.protocol,
                    "the cluster",
                    gateway.settings.max_clients,
                )
                .await;
                return;
            }
            Err(err) => {
                tracing::error!(%err, "could not take a cluster client slot");
                refuse_unavailable(&mut socket, hello.protocol).await;
                return;
            }
        }
    }
    let position = match start_position(&gateway, &hello).await {
        Ok(position) => position,
        Err(err) => {
            tracing::error!(client_id = %hello.client_id, %err, "could not read the client's reply stream");
            let detail = "the server could not load this client's replies; retry shortly";
            refuse(
                &mut socket,
                hello.protocol,
                ErrorCode::Internal,
                CloseCode::InternalError,
                detail,
            )
            .await;
            return;
        }
    };

    let (outbox, frames) = Outbox::new(gateway.settings.outbox);
    // Queued before the session is registered, so that no reply can overtake the welcome.
    outbox.push(hello.protocol.welcome(
        hello.client_id.as_str(),
        hello.timezone.name(),
        gateway.clock.now(),
        &gateway.settings,
        hello.token.as_ref().map(|claims| claims.expires_at),
    ));
    let stream = (hello.protocol == Protocol::Native).then(|| {
        ReplyStream::new(
            hello.client_id.clone(),
            outbox.clone(),
            gateway.store.clone(),
            gateway.tracker.clone(),
            position,
        )
    });
    let replaced = CancellationToken::new();
    let moved = Arc::new(AtomicBool::new(false));
    let liveness = Arc::new(Liveness::default());
    // The handshake frame was the first word from the client.
    liveness.heard();
    let handle = SessionHandle {
        conn_id,
        protocol: hello.protocol,
        outbox: outbox.clone(),
        stream: stream.clone(),
        replaced: replaced.clone(),
        moved: moved.clone(),
        liveness: liveness.clone(),
    };
    if let Err(Duplicate(live)) = register(&gateway, &hello, handle).await {
        metrics::counter!("kaiwa_connections_refused_total", "reason" => "duplicate").increment(1);
        tracing::info!(client_id = %hello.client_id, live_conn_id = live.conn_id, "refused: the client id is connected and answering");
        let detail = format!("client id {} is already connected", hello.client_id);
        refuse(
            &mut socket,
            hello.protocol,
            ErrorCode::DuplicateConnection,
            CloseCode::DuplicateConnection,
            &detail,
        )
        .await;
        return;
    }
    if let Some(slot) = cluster_slot.as_mut() {
        let replace = gateway.settings.sessions.duplicate_connection == DuplicatePolicy::Replace;
        let refusal = match claim_across(&gateway, slot, &hello.client_id, replace).await {
            Ok(Claim::Claimed { .. }) => None,
            Ok(Claim::Held {
                gateway: holder, ..
            }) => Some(Some(holder)),
            Err(err) => {
                tracing::error!(client_id = %hello.client_id, %err, "could not claim the client id in the cluster");
                Some(None)
            }
        };
        if let Some(holder) = refusal {
            gateway.registry.remove(&hello.client_id, conn_id);
            match holder {
                Some(holder) => {
                    metrics::counter!("kaiwa_connections_refused_total", "reason" => "duplicate")
                        .increment(1);
                    tracing::info!(client_id = %hello.client_id, gateway = %holder, "refused: the client id is connected to another gateway");
                    let detail = format!("client id {} is already connected", hello.client_id);
                    refuse(
                        &mut socket,
                        hello.protocol,
                        ErrorCode::DuplicateConnection,
                        CloseCode::DuplicateConnection,
                        &detail,
                    )
                    .await;
                }
                None => refuse_unavailable(&mut socket, hello.protocol).await,
            }
            return;
        }
    }
    if let Resume::After(after) = hello.resume
        && position > 0
    {
        // What the client says it processed is what it acknowledges.
        gateway
            .store
            .record_received(&hello.client_id, position, gateway.clock.now());
        tracing::debug!(client_id = %hello.client_id, after, position, "resuming");
    }
    if let Some(stream) = &stream
        && hello.resume != Resume::Fresh
    {
        stream.replay(None);
    }

    let (sink, mut frames_in) = socket.split();
    let (close_tx, close_rx) = oneshot::channel();
    let writer = gateway.tracker.spawn(
        Writer {
            sink,
            frames,
            drained: outbox.drained(),
            queued_bytes: outbox.queued_bytes(),
            closing: close_rx,
            store: gateway.store.clone(),
            clock: gateway.clock.clone(),
        }
        .run(),
    );
    tracing::info!(client_id = %hello.client_id, timezone = %hello.timezone, protocol = ?hello.protocol, conn_id, "client connected");
    metrics::gauge!("kaiwa_connections").increment(1.0);

    let client_id = hello.client_id.clone();
    let mut session = Session::new(
        gateway.clone(),
        hello,
        outbox,
        liveness,
        replaced,
        stream,
        position,
    );
    let ending = session.run(&mut frames_in).await;

    gateway.registry.remove(&client_id, conn_id);
    // The client is gone as far as the limits go; the close handshake below is bounded.
    drop(slot);
    drop(cluster_slot);
    session.depart();
    if moved.load(Ordering::Relaxed)
        && let (Some(link), Some(stream)) = (&gateway.cluster, session.stream())
    {
        // Replies may have come here after the client's new connection began.
        let link = link.clone();
        let seq = stream.known();
        let client_id = client_id.clone();
        let stop = gateway.close_sessions.clone();
        gateway
            .tracker
            .spawn(async move { link.hand_over(&client_id, seq, &stop).await });
    }
    let closing = Closing {
        frame: ending.close_frame(&gateway.settings),
        drain: ending.drains(),
    };
    if close_tx.send(closing).is_err() {
        tracing::debug!(conn_id, "the writer ended before the session");
    }
    let linger = async {
        if ending.awaits_close_reply() {
            await_close_reply(&mut frames_in, CLOSE_REPLY_TIMEOUT).await;
        }
    };
    let (written, ()) = tokio::join!(writer, linger);
    if let Err(err) = written {
        tracing::error!(conn_id, %err, "the writer task failed");
    }
    metrics::gauge!("kaiwa_connections").decrement(1.0);
    metrics::counter!("kaiwa_disconnects_total", "reason" => ending.name()).increment(1);
    tracing::info!(%client_id, conn_id, ending = ending.name(), "client disconnected");
}

/// The handshake of a connection that is not yet a client: it ends with a verified hello, or
/// with the connection refused (and `None`). A stranger is closed when its deadline passes,
/// when it sends more than its allowance, or when a newer stranger takes its place.
async fn introduce(
    gateway: &Gateway,
    socket: &mut WebSocket,
    native: bool,
    pass: Pass,
    verified: Option<Claims>,
) -> Option<Hello> {
    let guess = if native {
        Protocol::Native
    } else {
        Protocol::Legacy
    };
    let timeout = gateway.settings.sessions.handshake_timeout;
    let credentials = Credentials {
        auth: gateway.settings.auth.clone(),
        upgrade: verified,
        clock: gateway.clock.clone(),
    };
    // A draining server takes no new sessions: a handshake in progress (or one that begins
    // after the drain did) ends at once.
    let received = tokio::select! {
        received = handshake::receive(socket, native, timeout, &credentials) => received,
        () = pass.crowded_out() => Err(HandshakeError::CrowdedOut),
        () = gateway.draining.cancelled() => Err(HandshakeError::ShuttingDown),
    };
    // Whatever came of it, the connection is no longer a stranger in the pool.
    drop(pass);
    let (protocol, error, close, detail) = match received {
        Ok(hello) if !gateway.is_draining() => return Some(hello),
        Ok(hello) => shutting_down(hello.protocol),
        Err(HandshakeError::ShuttingDown) => shutting_down(guess),
        Err(HandshakeError::Gone) => return None,
        Err(HandshakeError::InvalidUtf8) => (
            guess,
            ErrorCode::MalformedJson,
            CloseCode::InvalidPayload,
            "a text frame was not valid UTF-8".to_owned(),
        ),
        Err(HandshakeError::Timeout) => (
            guess,
            ErrorCode::HandshakeRequired,
            CloseCode::HandshakeTimeout,
            "no handshake frame in time".to_owned(),
        ),
        Err(HandshakeError::TooLarge) => (
            guess,
            ErrorCode::FrameTooLarge,
            CloseCode::MessageTooBig,
            format!(
                "before the handshake is verified a connection may send {} bytes",
                super::HANDSHAKE_ALLOWANCE
            ),
        ),
        Err(HandshakeError::CrowdedOut) => (
            guess,
            ErrorCode::TooManyHandshakes,
            CloseCode::CrowdedOut,
            "too many connections were in their handshake; reconnect and send the handshake frame at once".to_owned(),
        ),
        Err(HandshakeError::Invalid {
            protocol,
            code,
            close,
            message,
        }) => (protocol, code, close, message),
    };
    if close != CloseCode::BadHandshake {
        metrics::counter!("kaiwa_connections_refused_total", "reason" => close.name()).increment(1);
    }
    // A token refused says something about a client: logged (the code, never the token).
    // Strangers closed for their deadline, their size or a newcomer come in floods: not.
    if (4600..4700).contains(&close.code()) {
        tracing::info!(code = error.as_str(), "refused at the handshake");
    } else {
        tracing::debug!(
            code = error.as_str(),
            close = close.name(),
            "refused at the handshake"
        );
    }
    // A stranger gets its close frame, but no long wait for the answer: until it is gone its
    // socket counts nowhere (it has left the pool, and never had a slot).
    refuse_within(socket, protocol, error, close, &detail, STRANGER_LINGER).await;
    None
}

/// The refusal of a connection that came while the server drains, in `protocol`.
fn shutting_down(protocol: Protocol) -> (Protocol, ErrorCode, CloseCode, String) {
    let detail = "server shutting down; reconnect shortly";
    (
        protocol,
        ErrorCode::ShuttingDown,
        CloseCode::GoingAway,
        detail.to_owned(),
    )
}

/// The `seq` the client's reply stream starts after on this connection. A cursor beyond the
/// stored stream (a client that kept one from another server, or from a database since reset)
/// starts at the end of what is stored, so that no later reply is taken as already sent.
async fn start_position(gateway: &Gateway, hello: &Hello) -> Result<u64, StoreError> {
    if hello.protocol != Protocol::Native {
        return Ok(0);
    }
    let store = &gateway.store;
    let latest = store.latest_seq(&hello.client_id).await?;
    Ok(match hello.resume {
        Resume::Fresh => latest,
        Resume::After(after) => after.min(latest),
        Resume::Unacknowledged => store.acknowledged(&hello.client_id).await?.min(latest),
    })
}

impl Gateway {
    /// How long a connection whose id a new one wants gets to answer a ping.
    pub(super) fn liveness_probe(&self) -> Duration {
        self.settings
            .sessions
            .heartbeat_interval
            .min(LIVENESS_PROBE)
    }
}

/// Registers the session under its client id. Under the `refuse` policy a live session with
/// the same id keeps it only if its client still answers: a client whose network died (and who
/// is now reconnecting) would otherwise be locked out until the heartbeat timeout.
async fn register(
    gateway: &Gateway,
    hello: &Hello,
    handle: SessionHandle,
) -> Result<(), Duplicate> {
    let registry = &gateway.registry;
    let policy = gateway.settings.sessions.duplicate_connection;
    let Err(Duplicate(live)) = registry.register(hello.client_id.clone(), handle.clone(), policy)
    else {
        return Ok(());
    };
    if live
        .liveness
        .answers(&live.outbox, gateway.liveness_probe())
        .await
    {
        return Err(Duplicate(live));
    }
    tracing::info!(client_id = %hello.client_id, stale_conn_id = live.conn_id, "the live connection did not answer a ping; the new one takes over");
    registry.take_over(hello.client_id.clone(), handle, live.conn_id)
}

/// Claims the client's id across the cluster. Held by a connection on another gateway, the
/// id is that gateway's to check, as [`register`] checks one here: it pings its connection and
/// closes it if it does not answer, and the claim is made again once its release lands.
async fn claim_across(
    gateway: &Gateway,
    slot: &mut ClusterSlot,
    client_id: &ClientId,
    replace: bool,
) -> Result<Claim, PresenceError> {
    let claim = slot.claim(client_id, replace).await?;
    let (
        Claim::Held {
            gateway: holder,
            conn_id,
        },
        Some(link),
    ) = (&claim, &gateway.cluster)
    else {
        return Ok(claim);
    };
    let probe = gateway.liveness_probe();
    if link
        .probe(client_id, holder, *conn_id, probe + PROBE_ROUND_TRIP)
        .await
        != Some(false)
    {
        return Ok(claim);
    }
    // Closed there; its claim goes back as the connection ends.
    let deadline = tokio::time::Instant::now() + RELEASE_WAIT;
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let claim = slot.claim(client_id, replace).await?;
        if matches!(claim, Claim::Claimed { .. }) || tokio::time::Instant::now() >= deadline {
            return Ok(claim);
        }
    }
}

/// A close frame: `code`, with a reason that starts with its name.
pub(super) fn close_frame(code: CloseCode, detail: &str) -> CloseFrame {
    CloseFrame {
        code: code.code(),
        reason: code.reason(detail).into(),
    }
}

/// Refuses a connection because the cluster's shared state cannot be reached: retryable.
/// Refuses a connection because every client slot of `whole` (this server, or the cluster) is
/// taken.
async fn refuse_full(socket: &mut WebSocket, protocol: Protocol, whole: &str, max_clients: usize) {
    metrics::counter!("kaiwa_connections_refused_total", "reason" => "over_capacity").increment(1);
    let detail = format!("{whole} is full ({max_clients} clients); retry later");
    refuse(
        socket,
        protocol,
        ErrorCode::OverCapacity,
        CloseCode::OverCapacity,
        &detail,
    )
    .await;
}

async fn refuse_unavailable(socket: &mut WebSocket, protocol: Protocol) {
    let detail = "the cluster's client registry is unavailable; retry shortly";
    refuse(
        socket,
        protocol,
        ErrorCode::Internal,
        CloseCode::InternalError,
        detail,
    )
    .await;
}

/// Answers a connection that will not get a session: an error frame it can show, then a close
/// frame with the code that says why.
async fn refuse(
    socket: &mut WebSocket,
    protocol: Protocol,
    error: ErrorCode,
    close: CloseCode,
    detail: &str,
) {
    refuse_within(socket, protocol, error, close, detail, CLOSE_REPLY_TIMEOUT).await;
}

/// [`refuse`], waiting at most `linger` to send the refusal, and as long for the client's
/// close frame.
async fn refuse_within(
    socket: &mut WebSocket,
    protocol: Protocol,
    error: ErrorCode,
    close: CloseCode,
    detail: &str,
    linger: Duration,
) {
    let frame = close_frame(close, detail);
    let error: Utf8Bytes = protocol.error(error, frame.reason.as_str().to_owned(), None, None);
    let send = async {
        socket.send(Message::Text(error)).await?;
        socket.send(Message::Close(Some(frame))).await
    };
    match tokio::time::timeout(linger, send).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => tracing::debug!(%err, "could not send the refusal"),
        Err(_) => tracing::debug!("the refused client did not read its close frame"),
    }
    await_close_reply(socket, linger).await;
}

/// Reads and discards until the client's close frame (or the timeout). Reading on keeps the
/// close handshake proper: a socket closed with unread data is reset, and a reset can destroy
/// the close frame before the client reads it.
async fn await_close_reply<S>(stream: &mut S, within: Duration)
where
    S: Stream<Item = Result<Message, axum::Error>> + Unpin,
{
    let drained = tokio::time::timeout(within, async {
        while let Some(Ok(message)) = stream.next().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::debug!("no close frame from the client in time");
    }
}
