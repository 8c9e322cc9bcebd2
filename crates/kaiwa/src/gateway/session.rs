//! The session actor: one per connection, from welcome to close. Its loop reads the client's
//! frames one at a time, turns each into a [`Command`] and applies it; beside reading, it keeps
//! the heartbeat and watches for the reasons a session ends.

use super::command::Command;
use super::delivery::seconds_since;
use super::expiry::{Expiry, Lapse};
use super::handshake::Hello;
use super::outbox::Outbox;
use super::registry::Liveness;
use super::stream::ReplyStream;
use super::wire::{About, Protocol, close_frame};
use super::{Gateway, GatewaySettings};
use crate::admission::{Pipeline, Sender, Settled, Submission, Verdict};
use crate::auth::Token;
use crate::clock::Clock;
use axum::extract::ws::{CloseFrame, Message};
use futures::{Stream, StreamExt};
use kaiwa_protocol::{CloseCode, ErrorCode, MessageStatus, MessageType};
use rand::RngExt;
use std::sync::Arc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ending {
    /// The client sent a close frame (the WebSocket layer answers it).
    ClientClosed,
    /// The connection broke without a close.
    ConnectionLost,
    /// The server closes, with this code.
    Closed(CloseCode),
}

impl Ending {
    pub(super) fn close_frame(self, settings: &GatewaySettings) -> Option<CloseFrame> {
        let Self::Closed(code) = self else {
            return None;
        };
        let sessions = &settings.sessions;
        let detail = match code {
            CloseCode::HeartbeatTimeout => {
                format!("no frame for {}s", sessions.heartbeat_timeout.as_secs_f64())
            }
            CloseCode::FirstMessageTimeout => format!(
                "no message within {}s of connecting; connect again to send one",
                sessions.first_message_timeout.as_secs_f64()
            ),
            CloseCode::SlowConsumer => {
                "frames were not read fast enough; reconnect and resume".into()
            }
            CloseCode::Replaced => "a newer connection with this client id took over".into(),
            CloseCode::GoingAway => "server shutting down; reconnect shortly".into(),
            // Only the cluster closes a session this way: the gateway's lease ran out.
            CloseCode::InternalError => {
                "this gateway lost its place in the cluster; reconnect and resume".into()
            }
            CloseCode::MessageTooBig => {
                format!("frames are limited to {} bytes", settings.max_frame_bytes)
            }
            CloseCode::InvalidPayload => "a text frame was not valid UTF-8".into(),
            CloseCode::ExpiredToken => format!(
                "the token expired and no refresh came within {}s",
                settings
                    .auth
                    .as_ref()
                    .map_or(0.0, |auth| auth.refresh_grace.as_secs_f64())
            ),
            other => other.name().into(),
        };
        Some(close_frame(code, &detail))
    }

    /// Whether queued frames should still be written: only when the client is known to read.
    pub(super) fn drains(self) -> bool {
        matches!(
            self,
            Self::Closed(CloseCode::GoingAway | CloseCode::FirstMessageTimeout)
        )
    }

    /// Whether the server closes first and should wait for the client's close in return.
    pub(super) fn awaits_close_reply(self) -> bool {
        matches!(self, Self::Closed(_))
    }

    pub(super) fn name(self) -> &'static str {
        match self {
            Self::ClientClosed => "client_closed",
            Self::ConnectionLost => "connection_lost",
            Self::Closed(code) => code.name(),
        }
    }
}

pub(super) struct Session {
    gateway: Arc<Gateway>,
    client: Arc<Sender>,
    protocol: Protocol,
    outbox: Outbox,
    /// Told of every frame, so a duplicate connection can see this client is alive.
    liveness: Arc<Liveness>,
    /// Cancelled by the registry when a newer connection with the same id takes over.
    replaced: CancellationToken,
    /// Native clients' replies, in order; legacy clients get theirs straight from delivery.
    stream: Option<Arc<ReplyStream>>,
    /// This client's messages on their way through admission.
    pipeline: Pipeline,
    /// The last reply `seq` the client acknowledged: on departure, later ones it was sent
    /// count as not delivered.
    acknowledged: u64,
    /// A native `send` whose file comes in the next (binary) frame.
    awaiting_binary: Option<Submission>,
    /// Whether the client sent a message yet (R16).
    sent_message: bool,
    /// When the client's token runs out (auth on); `None` with auth off.
    expiry: Option<Expiry>,
}

impl Session {
    pub(super) fn new(
        gateway: Arc<Gateway>,
        hello: Hello,
        outbox: Outbox,
        liveness: Arc<Liveness>,
        replaced: CancellationToken,
        stream: Option<Arc<ReplyStream>>,
        position: u64,
    ) -> Self {
        let expiry = hello
            .token
            .as_ref()
            .zip(gateway.settings.auth.as_ref())
            .map(|(claims, auth)| Expiry::new(claims, gateway.clock.now(), auth.refresh_grace));
        let client = Arc::new(Sender {
            client_id: hello.client_id,
            timezone: hello.timezone,
        });
        let protocol = hello.protocol;
        let answers = outbox.clone();
        let clock = gateway.clock.clone();
        let pipeline = Pipeline::new(
            gateway.admission.clone(),
            client.clone(),
            gateway.settings.max_in_flight_per_client,
            gateway.tracker.clone(),
            Box::new(move |settled| answer(protocol, &answers, clock.as_ref(), settled)),
        );
        Self {
            gateway,
            client,
            protocol,
            outbox,
            liveness,
            replaced,
            stream,
            pipeline,
            acknowledged: position,
            awaiting_binary: None,
            sent_message: false,
            expiry,
        }
    }

    /// Runs until the session ends, reading from `frames`.
    pub(super) async fn run<S>(&mut self, frames: &mut S) -> Ending
    where
        S: Stream<Item = Result<Message, axum::Error>> + Unpin,
    {
        let sessions = self.gateway.settings.sessions.clone();
        let interval = sessions.heartbeat_interval;
        // Jitter spreads the pings of clients that connected together.
        let jitter = interval.mul_f64(rand::rng().random_range(0.0..0.25));
        let mut heartbeat = tokio::time::interval_at(Instant::now() + interval - jitter, interval);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let first_message_deadline = tokio::time::sleep(sessions.first_message_timeout);
        tokio::pin!(first_message_deadline);
        // Far off, and not polled, when auth is off.
        let token_deadline = tokio::time::sleep_until(self.token_deadline());
        tokio::pin!(token_deadline);
        let close_sessions = self.gateway.close_sessions.clone();
        let evicted = self.gateway.eviction();
        let overflowed = self.outbox.overflowed().clone();
        let replaced = self.replaced.clone();
        loop {
            let reading = self.pipeline.has_room();
            // Not reading is our doing (backpressure), not the client's silence.
            self.liveness.set_reading(reading);
            tokio::select! {
                biased;
                () = close_sessions.cancelled() => return Ending::Closed(CloseCode::GoingAway),
                () = evicted.cancelled() => return Ending::Closed(CloseCode::InternalError),
                () = replaced.cancelled() => return Ending::Closed(CloseCode::Replaced),
                () = overflowed.cancelled() => return Ending::Closed(CloseCode::SlowConsumer),
                () = &mut first_message_deadline, if !self.sent_message => {
                    return Ending::Closed(CloseCode::FirstMessageTimeout);
                }
                () = &mut token_deadline, if self.expiry.is_some() => {
                    if let Some(ending) = self.token_lapsed() {
                        return ending;
                    }
                    token_deadline.as_mut().reset(self.token_deadline());
                }
                _ = heartbeat.tick() => {
                    if self.liveness.silent_for() > sessions.heartbeat_timeout {
                        return Ending::Closed(CloseCode::HeartbeatTimeout);
                    }
                    if self.protocol.websocket_pings() {
                        self.outbox.push_ping();
                    }
                    if let Some(frame) = self.protocol.heartbeat(self.gateway.clock.now()) {
                        self.outbox.push(frame);
                    }
                }
                // Wakes the loop when the client may send again, so reading resumes.
                () = self.pipeline.room(), if !reading => {}
                frame = frames.next(), if reading => {
                    self.liveness.heard();
                    let command = match frame {
                        Some(Ok(frame)) => Command::from_frame(self.protocol, frame),
                        Some(Err(err)) => return self.broken(&err),
                        None => return Ending::ClientClosed,
                    };
                    if let Some(ending) = self.apply(command) {
                        return ending;
                    }
                    if self.expiry.as_mut().is_some_and(Expiry::take_renewed) {
                        token_deadline.as_mut().reset(self.token_deadline());
                    }
                }
            }
        }
    }

    /// Applies one command; returns how the session ends, if it does.
    fn apply(&mut self, command: Command) -> Option<Ending> {
        if let Some(announced) = self.awaiting_binary.take() {
            if let Command::File(bytes) = command {
                self.submit(Submission {
                    content: None,
                    binary: Some(bytes),
                    ..announced
                });
                return None;
            }
            self.refuse(
                ErrorCode::ExpectedBinary,
                "the file announced by the last send frame must come next, as a binary frame; that message was dropped".into(),
                About::id(announced.client_message_id),
            );
        }
        match command {
            Command::Send(submission) => self.submit(submission),
            Command::Announce(submission) => self.awaiting_binary = Some(submission),
            Command::File(_) => {
                let message = match self.protocol {
                    Protocol::Legacy | Protocol::Path => {
                        "binary frames are not accepted: send media as base64 in content, with a filename"
                    }
                    Protocol::Native => {
                        "a binary frame must follow a send frame with \"binary\": true"
                    }
                };
                self.refuse(
                    ErrorCode::UnexpectedBinary,
                    message.into(),
                    About::nothing(),
                );
            }
            Command::Ping { nonce } => {
                let now = self.gateway.clock.now();
                self.outbox.push(self.protocol.heartbeat_answer(now, nonce));
            }
            Command::Alive => {}
            Command::Sync { after } => match &self.stream {
                Some(stream) => stream.replay(after),
                None => self.refuse(
                    ErrorCode::UnknownFrame,
                    "sync is a kaiwa.v1 frame".into(),
                    About::nothing(),
                ),
            },
            Command::Received { seq } => self.acknowledge(seq),
            Command::Refresh { token } => self.refresh(token),
            Command::Refuse {
                code,
                message,
                about,
            } => self.refuse(code, message, about),
            Command::Close => return Some(Ending::ClientClosed),
        }
        None
    }

    /// When the token clock fires next (a day away with auth off, where it is never polled).
    fn token_deadline(&self) -> Instant {
        self.expiry.as_ref().map_or_else(
            || Instant::now() + std::time::Duration::from_secs(86_400),
            Expiry::deadline,
        )
    }

    /// The token clock fired: the client is warned first, and closed at the end of the grace.
    fn token_lapsed(&mut self) -> Option<Ending> {
        match self.expiry.as_mut()?.lapse() {
            Lapse::Warn {
                expired_at,
                closes_in,
            } => {
                tracing::info!(client_id = %self.client.client_id, "token expired; waiting for a refresh");
                self.outbox
                    .push(self.protocol.token_expired(expired_at, closes_in));
                None
            }
            Lapse::Close => {
                tracing::info!(client_id = %self.client.client_id, "token expired and not refreshed");
                Some(Ending::Closed(CloseCode::ExpiredToken))
            }
        }
    }

    /// A new token for this connection: good and for this client, it moves the deadline; any
    /// other is refused with its code, and the old deadline stands.
    fn refresh(&mut self, token: Option<Token>) {
        let Some(auth) = self.gateway.settings.auth.clone() else {
            return self.refuse(
                ErrorCode::UnknownFrame,
                "this server has auth off: there is no token to refresh".into(),
                About::nothing(),
            );
        };
        let now = self.gateway.clock.now();
        let verified = token
            .ok_or(crate::auth::AuthError::MissingToken)
            .and_then(|token| auth.verify_for(&token, self.client.client_id.as_str(), now));
        match verified {
            Ok(claims) => {
                if let Some(expiry) = self.expiry.as_mut() {
                    expiry.renew(&claims, now);
                }
                self.outbox.push(self.protocol.refreshed(claims.expires_at));
            }
            Err(err) => self.refuse(err.code(), err.to_string(), About::nothing()),
        }
    }

    /// Hands a message to this client's admission pipeline, which answers it in order while
    /// the session goes on reading.
    fn submit(&mut self, submission: Submission) {
        self.sent_message = true;
        let about = || About::message(submission.client_message_id.clone(), submission.kind());
        // The grace period decides only when the connection closes: a message sent on a token
        // that ran out is not taken.
        if self.expiry.as_ref().is_some_and(Expiry::lapsed) {
            let message =
                "your token expired: send refresh with a new one, then this message again";
            return self.refuse(ErrorCode::ExpiredToken, message.into(), about());
        }
        if self.gateway.is_draining() {
            let message = "the server is shutting down; send this again after reconnecting";
            return self.refuse(ErrorCode::ShuttingDown, message.into(), about());
        }
        let received_at = self.gateway.clock.now();
        self.pipeline.submit(submission, received_at);
    }

    /// Records that the client processed its replies up to `seq`. It cannot acknowledge what it
    /// was not sent: a larger `seq` counts as the last reply sent.
    fn acknowledge(&mut self, seq: u64) {
        let Some(stream) = &self.stream else { return };
        let seq = seq.min(stream.sent());
        if seq > self.acknowledged {
            self.acknowledged = seq;
            self.gateway.store.record_received(
                &self.client.client_id,
                seq,
                self.gateway.clock.now(),
            );
        }
    }

    /// The native client's reply stream.
    pub(super) fn stream(&self) -> Option<&Arc<ReplyStream>> {
        self.stream.as_ref()
    }

    /// Records that the client left: replies sent to it but not acknowledged did not reach it.
    pub(super) fn depart(&self) {
        if self.stream.is_some() {
            self.gateway.store.record_departure(
                &self.client.client_id,
                self.acknowledged,
                self.gateway.clock.now(),
            );
        }
    }

    /// How a broken read ends the session: a frame over the limit and invalid UTF-8 get their
    /// own close codes; anything else is a lost connection.
    fn broken(&self, err: &axum::Error) -> Ending {
        let cause = std::error::Error::source(err)
            .and_then(|source| source.downcast_ref::<tungstenite::Error>());
        match cause {
            Some(tungstenite::Error::Capacity(_)) => {
                tracing::info!(client_id = %self.client.client_id, "frame over the size limit");
                Ending::Closed(CloseCode::MessageTooBig)
            }
            Some(tungstenite::Error::Utf8(_)) => {
                tracing::info!(client_id = %self.client.client_id, "text frame with invalid UTF-8");
                Ending::Closed(CloseCode::InvalidPayload)
            }
            _ => {
                tracing::debug!(client_id = %self.client.client_id, %err, "connection lost");
                Ending::ConnectionLost
            }
        }
    }

    fn refuse(&self, code: ErrorCode, message: String, about: About) {
        metrics::counter!("kaiwa_client_errors_total", "code" => code.as_str()).increment(1);
        self.outbox
            .push(self.protocol.error(code, message, about, None));
    }
}

/// Tells the client what became of one of its messages.
fn answer(protocol: Protocol, outbox: &Outbox, clock: &dyn Clock, settled: Settled) {
    let Settled {
        id,
        message_type,
        received_at,
        verdict,
    } = settled;
    let kind = message_type.map_or("unknown", MessageType::as_str);
    let about = About::message(id, message_type);
    let frame = match verdict {
        Verdict::Accepted { message_id } => {
            metrics::counter!("kaiwa_messages_total", "status" => "accepted", "type" => kind)
                .increment(1);
            // Queued just below, and the outbox keeps the order: this is the ack going out.
            metrics::histogram!("kaiwa_message_ack_seconds", "type" => kind)
                .record(seconds_since(received_at, clock.now()));
            protocol.stored(
                about,
                message_id,
                MessageStatus::Accepted,
                None,
                false,
                received_at,
            )
        }
        Verdict::Rejected { message_id, reason } => {
            metrics::counter!("kaiwa_messages_total", "status" => "rejected", "type" => kind)
                .increment(1);
            protocol.stored(
                about,
                message_id,
                MessageStatus::Rejected,
                Some(reason),
                false,
                received_at,
            )
        }
        Verdict::Duplicate(existing) => protocol.stored(
            about,
            existing.id,
            existing.status,
            existing.reason,
            true,
            existing.received_at,
        ),
        Verdict::Invalid(invalid) => {
            let code = invalid.code();
            metrics::counter!("kaiwa_client_errors_total", "code" => code.as_str()).increment(1);
            Some(protocol.error(code, invalid.to_string(), about, None))
        }
        Verdict::Busy { retry_after, limit } => {
            metrics::counter!("kaiwa_messages_total", "status" => "busy", "type" => kind)
                .increment(1);
            let message = format!(
                "{limit} messages are in flight, the server's limit; send this again later"
            );
            Some(protocol.error(ErrorCode::Busy, message, about, Some(retry_after)))
        }
        Verdict::Failed(err) if err.is_transient() => {
            metrics::counter!("kaiwa_messages_total", "status" => "unavailable", "type" => kind)
                .increment(1);
            Some(protocol.error(
                ErrorCode::Unavailable,
                "the database is unavailable for now; nothing was stored: send this again shortly"
                    .into(),
                about,
                Some(std::time::Duration::from_secs(1)),
            ))
        }
        Verdict::Failed(_) => Some(protocol.error(
            ErrorCode::Internal,
            "the message could not be stored; send it again".into(),
            about,
            None,
        )),
    };
    if let Some(frame) = frame {
        outbox.push(frame);
    }
}
