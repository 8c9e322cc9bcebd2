//! The session actor: one per connection. It reads frames, turns messages into admission tasks,
//! keeps the heartbeat, and ends the connection with the right close code.

use super::Gateway;
use super::handshake::{self, HandshakeError};
use super::outbox::{Closing, Outbox, Writer};
use super::registry::{Duplicate, Liveness, SessionHandle};
use super::wire::Protocol;
use crate::admission::{self, Admitting, ConnectionSlot, Outcome, Sender, Submission};
use crate::store::Existing;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use bytes::Bytes;
use futures::stream::{FuturesOrdered, SplitStream};
use futures::{Stream, StreamExt};
use kaiwa_protocol::{CloseCode, ErrorCode, MessageStatus, legacy, native};
use rand::RngExt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

/// Why a session ended.
#[derive(Debug)]
enum Ending {
    ClientClosed,
    ConnectionLost,
    HeartbeatTimeout,
    FirstMessageTimeout,
    SlowConsumer,
    Replaced,
    ShuttingDown,
    TooBig(usize),
}

impl Ending {
    fn close_frame(&self, gateway: &Gateway) -> Option<CloseFrame> {
        let sessions = &gateway.settings.sessions;
        let (code, detail) = match self {
            Self::ClientClosed | Self::ConnectionLost => return None,
            Self::HeartbeatTimeout => (
                CloseCode::HeartbeatTimeout,
                format!("no frame for {}s", sessions.heartbeat_timeout.as_secs_f64()),
            ),
            Self::FirstMessageTimeout => (
                CloseCode::FirstMessageTimeout,
                format!(
                    "no message within {}s of connecting",
                    sessions.first_message_timeout.as_secs_f64()
                ),
            ),
            Self::SlowConsumer => (
                CloseCode::SlowConsumer,
                "frames were not read fast enough".into(),
            ),
            Self::Replaced => (
                CloseCode::Replaced,
                "a newer connection with this client id took over".into(),
            ),
            Self::ShuttingDown => (
                CloseCode::GoingAway,
                "server shutting down; reconnect shortly".into(),
            ),
            Self::TooBig(max) => (
                CloseCode::MessageTooBig,
                format!("frames are limited to {max} bytes"),
            ),
        };
        Some(close_frame(code, &detail))
    }

    /// Whether queued frames should still be written: only when the client is known to read.
    fn drains(&self) -> bool {
        matches!(self, Self::ShuttingDown | Self::FirstMessageTimeout)
    }

    /// Whether the server closes first and should wait for the client's close in return.
    fn awaits_close_reply(&self) -> bool {
        !matches!(self, Self::ClientClosed | Self::ConnectionLost)
    }

    fn name(&self) -> &'static str {
        match self {
            Self::ClientClosed => "client_closed",
            Self::ConnectionLost => "connection_lost",
            Self::HeartbeatTimeout => "heartbeat_timeout",
            Self::FirstMessageTimeout => "first_message_timeout",
            Self::SlowConsumer => "slow_consumer",
            Self::Replaced => "replaced",
            Self::ShuttingDown => "going_away",
            Self::TooBig(_) => "message_too_big",
        }
    }
}

/// How long the server waits for the client's answer to its close frame.
const CLOSE_REPLY_TIMEOUT: Duration = Duration::from_secs(2);

/// Reads and discards until the client's close frame (or the timeout). Reading on keeps the
/// close handshake proper: a socket closed with unread data is reset, and a reset can destroy
/// the close frame before the client reads it.
async fn await_close_reply<S>(stream: &mut S)
where
    S: Stream<Item = Result<Message, axum::Error>> + Unpin,
{
    let drained = tokio::time::timeout(CLOSE_REPLY_TIMEOUT, async {
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

fn close_frame(code: CloseCode, detail: &str) -> CloseFrame {
    CloseFrame {
        code: code.code(),
        reason: code.reason(detail).into(),
    }
}

/// Serves one upgraded connection from handshake to close. `slot` is the client slot taken at
/// the upgrade; without one the server is full.
pub(crate) async fn serve(
    gateway: Arc<Gateway>,
    mut socket: WebSocket,
    native: bool,
    slot: Option<ConnectionSlot>,
) {
    let guess = if native {
        Protocol::Native
    } else {
        Protocol::Legacy
    };
    let Some(slot) = slot else {
        metrics::counter!("kaiwa_connections_refused_total", "reason" => "over_capacity")
            .increment(1);
        let max = gateway.settings.max_clients;
        let detail = format!("server is full ({max} clients); retry later");
        refuse(
            &mut socket,
            guess,
            ErrorCode::OverCapacity,
            close_frame(CloseCode::OverCapacity, &detail),
        )
        .await;
        return;
    };
    if gateway.draining.is_cancelled() {
        let frame = close_frame(
            CloseCode::GoingAway,
            "server shutting down; reconnect shortly",
        );
        refuse(&mut socket, guess, ErrorCode::ShuttingDown, frame).await;
        return;
    }
    let hello = match handshake::receive(
        &mut socket,
        native,
        gateway.settings.sessions.handshake_timeout,
    )
    .await
    {
        Ok(hello) => hello,
        Err(HandshakeError::Gone) => return,
        Err(HandshakeError::Timeout) => {
            let frame = close_frame(CloseCode::HandshakeTimeout, "no handshake frame in time");
            refuse(&mut socket, guess, ErrorCode::HandshakeRequired, frame).await;
            return;
        }
        Err(HandshakeError::Invalid {
            protocol,
            code,
            message,
        }) => {
            let error = protocol.error(code, message.clone(), None, None);
            send_and_close(
                &mut socket,
                Some(error),
                close_frame(CloseCode::BadHandshake, &message),
            )
            .await;
            return;
        }
    };

    let (outbox, frames) = Outbox::new(gateway.settings.outbox_capacity);
    let replaced = CancellationToken::new();
    let liveness = Arc::new(Liveness::default());
    // The handshake frame was the first word from the client.
    liveness.heard();
    let conn_id = gateway.next_conn_id();
    let handle = SessionHandle {
        conn_id,
        protocol: hello.protocol,
        outbox: outbox.clone(),
        replaced: replaced.clone(),
        liveness: liveness.clone(),
    };
    if let Err(Duplicate(live)) = register(&gateway, &hello, handle).await {
        metrics::counter!("kaiwa_connections_refused_total", "reason" => "duplicate").increment(1);
        tracing::info!(client_id = %hello.client_id, live_conn_id = live.conn_id, "refused: the client id is connected and answering");
        let detail = format!("client id {} is already connected", hello.client_id);
        let error =
            hello
                .protocol
                .error(ErrorCode::DuplicateConnection, detail.clone(), None, None);
        send_and_close(
            &mut socket,
            Some(error),
            close_frame(CloseCode::DuplicateConnection, &detail),
        )
        .await;
        return;
    }

    let now = gateway.clock.now();
    outbox.push(hello.protocol.welcome(
        hello.client_id.as_str(),
        hello.timezone.name(),
        now,
        &gateway.settings.welcome,
    ));
    let (sink, mut stream) = socket.split();
    let (close_tx, close_rx) = oneshot::channel();
    let writer = gateway.tracker.spawn(
        Writer {
            sink,
            frames,
            drained: outbox.drained(),
            closing: close_rx,
            store: gateway.store.clone(),
            clock: gateway.clock.clone(),
        }
        .run(),
    );
    tracing::info!(client_id = %hello.client_id, timezone = %hello.timezone, protocol = ?hello.protocol, conn_id, "client connected");
    metrics::gauge!("kaiwa_connections").increment(1.0);

    let per_client = gateway.settings.max_in_flight_per_client;
    let mut session = Session {
        sender: Arc::new(Sender {
            client_id: hello.client_id,
            timezone: hello.timezone,
        }),
        protocol: hello.protocol,
        outbox,
        replaced,
        liveness,
        replays: Arc::default(),
        per_client: Arc::new(Semaphore::new(per_client)),
        awaiting_binary: None,
        admissions: None,

        sent_message: false,
        gateway,
    };
    if hello.resume {
        session.replay();
    }
    let ending = session.run(&mut stream).await;

    let gateway = &session.gateway;
    gateway.registry.remove(&session.sender.client_id, conn_id);
    // The client is gone as far as the limits go; the close handshake below is bounded.
    drop(slot);
    let closing = Closing {
        frame: ending.close_frame(gateway),
        drain: ending.drains(),
    };
    if close_tx.send(closing).is_err() {
        tracing::debug!(conn_id, "the writer ended before the session");
    }
    let linger = async {
        if ending.awaits_close_reply() {
            await_close_reply(&mut stream).await;
        }
    };
    let (written, ()) = tokio::join!(writer, linger);
    if let Err(err) = written {
        tracing::error!(conn_id, %err, "the writer task failed");
    }
    metrics::gauge!("kaiwa_connections").decrement(1.0);
    metrics::counter!("kaiwa_disconnects_total", "reason" => ending.name()).increment(1);
    tracing::info!(client_id = %session.sender.client_id, conn_id, ending = ending.name(), "client disconnected");
}

/// The longest a duplicate connection waits to learn whether the live one still answers.
const LIVENESS_PROBE: Duration = Duration::from_secs(3);

/// Registers the session under its client id. Under the `refuse` policy a live session with
/// the same id keeps it only if its client still answers: a client whose network died (and who
/// is now reconnecting) would otherwise be locked out until the heartbeat timeout.
async fn register(
    gateway: &Gateway,
    hello: &handshake::Hello,
    handle: SessionHandle,
) -> Result<(), Duplicate> {
    let registry = &gateway.registry;
    let policy = gateway.settings.sessions.duplicate_connection;
    let Err(Duplicate(live)) = registry.register(hello.client_id.clone(), handle.clone(), policy)
    else {
        return Ok(());
    };
    let probe = gateway
        .settings
        .sessions
        .heartbeat_interval
        .min(LIVENESS_PROBE);
    if live.liveness.answers(&live.outbox, probe).await {
        return Err(Duplicate(live));
    }
    tracing::info!(client_id = %hello.client_id, stale_conn_id = live.conn_id, "the live connection did not answer a ping; the new one takes over");
    registry.take_over(hello.client_id.clone(), handle, live.conn_id)
}

/// Answers a connection that will not get a session: an error frame it can show, then a close
/// frame with the code that says why.
async fn refuse(socket: &mut WebSocket, protocol: Protocol, code: ErrorCode, frame: CloseFrame) {
    let message = frame.reason.as_str().to_owned();
    let error = protocol.error(code, message, None, None);
    send_and_close(socket, Some(error), frame).await;
}

async fn send_and_close(socket: &mut WebSocket, error: Option<Utf8Bytes>, frame: CloseFrame) {
    let send = async {
        if let Some(error) = error {
            socket.send(Message::Text(error)).await?;
        }
        socket.send(Message::Close(Some(frame))).await
    };
    match tokio::time::timeout(CLOSE_REPLY_TIMEOUT, send).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => tracing::debug!(%err, "could not send the refusal"),
        Err(_) => tracing::debug!("the refused client did not read its close frame"),
    }
    await_close_reply(socket).await;
}

struct Session {
    gateway: Arc<Gateway>,
    sender: Arc<Sender>,
    protocol: Protocol,
    outbox: Outbox,
    /// Cancelled by the registry when a newer connection with the same id takes over.
    replaced: CancellationToken,
    /// Told of every frame, so a duplicate connection can see this client is alive.
    liveness: Arc<Liveness>,
    replays: Arc<ReplayGate>,
    /// This client's share of the in-flight limit. While it has none left, the session stops
    /// reading, so a flooding client is slowed by TCP backpressure instead of queued in memory.
    per_client: Arc<Semaphore>,
    /// A native `send` whose file comes in the next (binary) frame.
    awaiting_binary: Option<Submission>,
    /// To this session's admission task, started with the first message. Unbounded, because
    /// every queued message holds one of the client's in-flight permits: those bound it.
    admissions: Option<mpsc::UnboundedSender<Queued>>,

    sent_message: bool,
}

impl Session {
    async fn run(&mut self, stream: &mut SplitStream<WebSocket>) -> Ending {
        let sessions = self.gateway.settings.sessions.clone();
        let interval = sessions.heartbeat_interval;
        // Jitter spreads the pings of clients that connected together.
        let jitter = interval.mul_f64(rand::rng().random_range(0.0..0.25));
        let mut heartbeat = tokio::time::interval_at(Instant::now() + interval - jitter, interval);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let first_message_deadline = tokio::time::sleep(sessions.first_message_timeout);
        tokio::pin!(first_message_deadline);
        let draining = self.gateway.draining.clone();
        let close_sessions = self.gateway.close_sessions.clone();
        let overflowed = self.outbox.overflowed().clone();
        let replaced = self.replaced.clone();
        let per_client = self.per_client.clone();
        loop {
            let reading = self.per_client.available_permits() > 0;
            // Not reading is our doing (backpressure), not the client's silence.
            self.liveness.set_reading(reading);
            tokio::select! {
                biased;
                () = close_sessions.cancelled() => return Ending::ShuttingDown,
                () = replaced.cancelled() => return Ending::Replaced,
                () = overflowed.cancelled() => return Ending::SlowConsumer,
                () = &mut first_message_deadline, if !self.sent_message => return Ending::FirstMessageTimeout,
                                _ = heartbeat.tick() => {
                    if self.liveness.silent_for() > sessions.heartbeat_timeout {
                        return Ending::HeartbeatTimeout;
                    }
                    self.outbox.push_ping();
                    if let Some(frame) = self.protocol.heartbeat(self.gateway.clock.now()) {
                        self.outbox.push(frame);
                    }
                }
                // Wakes the loop when a permit frees up, so reading resumes.
                permit = per_client.acquire(), if !reading => drop(permit),
                                frame = stream.next(), if reading => {
                    self.liveness.heard();
                    match frame {
                        Some(Ok(Message::Text(text))) => self.on_text(&text, &draining).await,
                        Some(Ok(Message::Binary(bytes))) => self.on_binary(bytes, &draining).await,
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                        Some(Ok(Message::Close(_))) | None => return Ending::ClientClosed,
                        Some(Err(err)) => return self.on_error(&err),
                    }
                }
            }
        }
    }

    fn on_error(&self, err: &axum::Error) -> Ending {
        let too_big = std::error::Error::source(err)
            .and_then(|source| source.downcast_ref::<tungstenite::Error>())
            .is_some_and(|inner| matches!(inner, tungstenite::Error::Capacity(_)));
        if too_big {
            tracing::info!(client_id = %self.sender.client_id, "frame over the size limit");
            return Ending::TooBig(self.gateway.settings.max_frame_bytes);
        }
        tracing::debug!(client_id = %self.sender.client_id, %err, "connection lost");
        Ending::ConnectionLost
    }

    async fn on_text(&mut self, text: &str, draining: &CancellationToken) {
        if let Some(announced) = self.awaiting_binary.take() {
            self.error(
                ErrorCode::ExpectedBinary,
                "the file announced by the last send frame must come next, as a binary frame; that message was dropped".into(),
                announced.client_message_id,
            );
        }
        match self.protocol {
            Protocol::Legacy => self.on_legacy(text, draining).await,
            Protocol::Native => self.on_native(text, draining).await,
        }
    }

    async fn on_legacy(&mut self, text: &str, draining: &CancellationToken) {
        let frame: legacy::ClientFrame = match serde_json::from_str(text) {
            Ok(frame) => frame,
            Err(err) => return self.malformed(&err, None),
        };
        match frame.kind.as_deref() {
            Some("heartbeat") => {
                let ping = frame.data.as_ref().and_then(|d| d.message.as_deref()) == Some("ping");
                if ping {
                    self.outbox.push(
                        self.protocol
                            .heartbeat_answer(self.gateway.clock.now(), None),
                    );
                }
                return;
            }
            Some(other) if frame.message_type.is_none() => {
                let message = format!(
                    "unknown frame type {:?}",
                    other.chars().take(32).collect::<String>()
                );
                return self.error(ErrorCode::UnknownFrame, message, None);
            }
            _ => {}
        }
        // A repeated handshake is harmless; the client is already connected.
        if frame.message_type.is_none() && frame.content.is_none() && frame.client_id.is_some() {
            return;
        }
        let submission = Submission {
            client_message_id: None,
            message_type: frame.message_type,
            content: frame.content,
            filename: frame.filename,
            client_timestamp: frame.timestamp,
            binary: None,
        };
        self.submit(submission, draining).await;
    }

    async fn on_native(&mut self, text: &str, draining: &CancellationToken) {
        let frame: native::IncomingFrame = match serde_json::from_str(text) {
            Ok(frame) => frame,
            Err(err) => return self.malformed(&err, None),
        };
        match frame.kind.as_deref() {
            Some("send") => {
                let id = match admission::client_message_id(frame.id.clone()) {
                    Ok(id) => id,
                    Err(invalid) => {
                        return self.error(invalid.code(), invalid.to_string(), frame.id);
                    }
                };
                let submission = Submission {
                    client_message_id: Some(id),
                    message_type: frame.message_type,
                    content: frame.content,
                    filename: frame.filename,
                    client_timestamp: frame.timestamp,
                    binary: None,
                };
                if frame.binary {
                    self.awaiting_binary = Some(submission);
                    return;
                }
                self.submit(submission, draining).await;
            }
            Some("ping") => {
                self.outbox.push(
                    self.protocol
                        .heartbeat_answer(self.gateway.clock.now(), frame.nonce),
                );
            }
            Some("sync") => self.replay(),
            Some("hello") => {
                self.error(
                    ErrorCode::UnknownFrame,
                    "already connected: hello is only the first frame".into(),
                    None,
                );
            }
            _ => {
                self.error(
                    ErrorCode::UnknownFrame,
                    "unknown frame type; see docs/protocol.md".into(),
                    None,
                );
            }
        }
    }

    async fn on_binary(&mut self, bytes: Bytes, draining: &CancellationToken) {
        let Some(announced) = self.awaiting_binary.take() else {
            let message = match self.protocol {
                Protocol::Legacy => {
                    "binary frames are not accepted: send media as base64 in content"
                }
                Protocol::Native => "a binary frame must follow a send frame with \"binary\": true",
            };
            return self.error(ErrorCode::UnexpectedBinary, message.into(), None);
        };
        let submission = Submission {
            content: None,
            binary: Some(bytes),
            ..announced
        };
        self.submit(submission, draining).await;
    }

    /// Hands a message to admission in its own task, so the session keeps reading while the
    /// message is validated, stored and queued.
    async fn submit(&mut self, submission: Submission, draining: &CancellationToken) {
        self.sent_message = true;
        let id = submission.client_message_id.clone();
        if draining.is_cancelled() {
            let message = "the server is shutting down; send this again after reconnecting".into();
            return self.error(ErrorCode::ShuttingDown, message, id);
        }
        let received_at = self.gateway.clock.now();
        let permit = match self.per_client.clone().acquire_owned().await {
            Ok(permit) => permit,
            Err(_) => return,
        };
        let queued = Queued {
            submission,
            received_at,
            permit,
        };
        let admissions = self.admissions.get_or_insert_with(|| {
            let (admissions, queue) = mpsc::unbounded_channel();
            let task = MessageTask {
                gateway: self.gateway.clone(),
                sender: self.sender.clone(),
                protocol: self.protocol,
                outbox: self.outbox.clone(),
            };
            self.gateway.tracker.spawn(task.run(queue));
            admissions
        });
        if admissions.send(queued).is_err() {
            tracing::error!(client_id = %self.sender.client_id, "the admission task of this session has stopped");
        }
    }

    /// Sends the replies this client missed, then `synced` (native clients only).
    fn replay(&self) {
        if self.protocol != Protocol::Native || !self.replays.request() {
            return;
        }
        let gateway = self.gateway.clone();
        let client_id = self.sender.client_id.clone();
        let outbox = self.outbox.clone();
        let protocol = self.protocol;
        let replays = self.replays.clone();
        self.gateway.tracker.spawn(async move {
            loop {
                replays.begin_pass();
                match gateway.replay(&client_id, protocol, &outbox).await {
                    Ok(count) if count > 0 => {
                        tracing::info!(%client_id, replies = count, "missed replies sent")
                    }
                    Ok(_) => {}
                    Err(err) => {
                        tracing::error!(%client_id, %err, "could not read missed replies");
                        outbox.push(protocol.error(
                            ErrorCode::Internal,
                            "could not load missed replies; send sync to try again".into(),
                            None,
                            None,
                        ));
                    }
                }
                if !replays.finish_pass() {
                    break;
                }
            }
        });
    }

    fn malformed(&self, err: &serde_json::Error, id: Option<String>) {
        self.error(
            ErrorCode::MalformedJson,
            format!("invalid frame: {err}"),
            id,
        );
    }

    fn error(&self, code: ErrorCode, message: String, id: Option<String>) {
        metrics::counter!("kaiwa_client_errors_total", "code" => code.as_str()).increment(1);
        self.outbox
            .push(self.protocol.error(code, message, id, None));
    }
}

/// At most one replay per session at a time: a `sync` that arrives during a replay asks for
/// one more pass instead of a second task, so a client cannot pile up replays.
#[derive(Debug, Default)]
struct ReplayGate {
    running: AtomicBool,
    wanted: AtomicBool,
}

impl ReplayGate {
    /// Asks for a replay; true if the caller should start the task (none is running).
    fn request(&self) -> bool {
        self.wanted.store(true, Ordering::SeqCst);
        !self.running.swap(true, Ordering::SeqCst)
    }

    fn begin_pass(&self) {
        self.wanted.store(false, Ordering::SeqCst);
    }

    /// After a pass: true if another was asked for meanwhile; otherwise the task ends.
    fn finish_pass(&self) -> bool {
        if self.wanted.load(Ordering::SeqCst) {
            return true;
        }
        self.running.store(false, Ordering::SeqCst);
        // A request between the load and the store saw `running` and left the work to us.
        self.wanted.load(Ordering::SeqCst) && !self.running.swap(true, Ordering::SeqCst)
    }
}

/// A message waiting for admission, holding one of its client's in-flight permits.
struct Queued {
    submission: Submission,
    received_at: chrono::DateTime<chrono::Utc>,
    permit: OwnedSemaphorePermit,
}

/// Admits one session's messages in the order they arrived, so a client's messages are stored
/// (and get their ids) in the order it sent them; clients are admitted in parallel. Runs until
/// the session ends and its queue is empty, so a message read before a disconnect is still
/// stored and processed.
struct MessageTask {
    gateway: Arc<Gateway>,
    sender: Arc<Sender>,
    protocol: Protocol,
    outbox: Outbox,
}

/// A message whose fate is known once the store answers.
type Settling = Pin<Box<dyn Future<Output = Settled> + Send>>;

struct Settled {
    id: Option<String>,
    received_at: chrono::DateTime<chrono::Utc>,
    outcome: Outcome,
}

impl MessageTask {
    /// Admits queued messages one after another (so the store numbers them in order), while
    /// up to the client's in-flight limit of them wait for their commit at once; answers them in
    /// order as they settle.
    // Admission yields the future of its store write on purpose: it is awaited in order, later.
    #[allow(clippy::async_yields_async)]
    async fn run(self, mut queue: mpsc::UnboundedReceiver<Queued>) {
        let mut settling: FuturesOrdered<Settling> = FuturesOrdered::new();
        // The message being admitted. The next one waits for it, but earlier ones keep
        // settling meanwhile: admission may wait for an in-flight slot that only an earlier
        // message's answer (its dispatch, then its replies) can free.
        let mut admitting: Option<Pin<Box<dyn Future<Output = Settling> + Send + '_>>> = None;
        let mut open = true;
        loop {
            tokio::select! {
                biased;
                Some(settled) = settling.next(), if !settling.is_empty() => self.answer(settled).await,
                admitted = async {
                    match admitting.as_mut() {
                        Some(admission) => admission.await,
                        None => std::future::pending().await,
                    }
                }, if admitting.is_some() => {
                    admitting = None;
                    settling.push_back(admitted);
                }
                queued = queue.recv(), if open && admitting.is_none() => match queued {
                    Some(queued) => admitting = Some(Box::pin(self.admit(queued))),
                    None => open = false,
                },
                else => break,
            }
        }
    }

    async fn admit(&self, queued: Queued) -> Settling {
        let Queued {
            submission,
            received_at,
            permit,
        } = queued;
        let id = submission.client_message_id.clone();
        let admitting = self
            .gateway
            .admission
            .admit(&self.sender, submission, received_at, Some(permit))
            .await;
        let gateway = self.gateway.clone();
        Box::pin(async move {
            let outcome = match admitting {
                Admitting::Decided(outcome) => outcome,
                Admitting::Storing(storing) => gateway.admission.settle(storing).await,
            };
            Settled {
                id,
                received_at,
                outcome,
            }
        })
    }

    async fn answer(&self, settled: Settled) {
        let Settled {
            id,
            received_at,
            outcome,
        } = settled;
        let admission = &self.gateway.admission;
        let protocol = self.protocol;
        match outcome {
            Outcome::Accepted(ticket) => {
                metrics::counter!("kaiwa_messages_total", "status" => "accepted").increment(1);
                let message_id = ticket.job.message_id;
                if let Some(ack) = protocol.stored(
                    id.clone(),
                    message_id,
                    MessageStatus::Accepted,
                    None,
                    false,
                    received_at,
                ) {
                    self.outbox.push(ack);
                }
                if let Err(err) = admission.dispatch(ticket).await {
                    tracing::error!(message_id, %err, "accepted message not queued; it will be processed after a restart");
                    self.outbox.push(protocol.error(ErrorCode::ProcessingFailed, "the message is stored but could not be queued; it will be processed later".into(), id, None));
                }
            }
            Outcome::Rejected { message_id, reason } => {
                metrics::counter!("kaiwa_messages_total", "status" => "rejected").increment(1);
                if let Some(frame) = protocol.stored(
                    id,
                    message_id,
                    MessageStatus::Rejected,
                    Some(reason),
                    false,
                    received_at,
                ) {
                    self.outbox.push(frame);
                }
            }
            Outcome::Duplicate(Existing {
                id: message_id,
                status,
                reason,
                received_at,
            }) => {
                if let Some(frame) =
                    protocol.stored(id, message_id, status, reason, true, received_at)
                {
                    self.outbox.push(frame);
                }
            }
            Outcome::Invalid(invalid) => {
                metrics::counter!("kaiwa_client_errors_total", "code" => invalid.code().as_str())
                    .increment(1);
                self.outbox
                    .push(protocol.error(invalid.code(), invalid.to_string(), id, None));
            }
            Outcome::Busy { retry_after } => {
                metrics::counter!("kaiwa_messages_total", "status" => "busy").increment(1);
                let message = format!(
                    "{} messages are in flight, the server's limit; send this again later",
                    admission.in_flight.max()
                );
                self.outbox
                    .push(protocol.error(ErrorCode::Busy, message, id, Some(retry_after)));
            }
            Outcome::Failed(err) => {
                tracing::error!(client_id = %self.sender.client_id, %err, "could not store a message");
                self.outbox.push(protocol.error(
                    ErrorCode::Internal,
                    "the message could not be stored; send it again".into(),
                    id,
                    None,
                ));
            }
        }
    }
}
