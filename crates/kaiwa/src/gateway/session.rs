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
use crate::domain::ClientId;
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

    pub(super) fn gateway(&self) -> &Arc<Gateway> {
        &self.gateway
    }

    pub(super) fn client_id(&self) -> &ClientId {
        &self.client.client_id
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

/// What a session does with what the client sends, one command at a time: its messages
/// answered, its acknowledgements recorded, and every other command applied. (Its timers are
/// in `gateway/tests.rs`.)
#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::{AdmissionError, Invalid};
    use crate::domain::{ClientId, Timezone};
    use crate::gateway::handshake::Resume;
    use crate::gateway::outbox::Frames;
    use crate::store::{Existing, Store, StoreError};
    use crate::testing::{Fixture, accepted_text, reply, stored};
    use bytes::Bytes;
    use chrono::Utc;
    use kaiwa_protocol::{Delivery, ReplyType};
    use std::time::Duration;

    /// Every message inside its window, whatever the time of the run.
    const OPEN: &[&str] = &["--text-window", "00:00-24:00"];

    fn client() -> ClientId {
        ClientId::parse("ann").expect("an id")
    }

    /// A session of `ann` just after its welcome, with a reply stream (native) starting at
    /// `position`.
    fn session(fixture: &Fixture, protocol: Protocol, position: u64) -> (Session, Frames) {
        let gateway = &fixture.gateway;
        let (outbox, frames) = Outbox::new(gateway.settings.outbox);
        let stream = (protocol == Protocol::Native).then(|| {
            ReplyStream::new(
                client(),
                outbox.clone(),
                gateway.store.clone(),
                gateway.tracker.clone(),
                position,
            )
        });
        let hello = Hello {
            protocol,
            client_id: client(),
            timezone: Timezone::parse("UTC").expect("a zone"),
            resume: Resume::Fresh,
            token: None,
        };
        let session = Session::new(
            gateway.clone(),
            hello,
            outbox,
            Arc::new(Liveness::default()),
            CancellationToken::new(),
            stream,
            position,
        );
        (session, frames)
    }

    fn frame(protocol: Protocol, text: &str) -> Command {
        Command::from_frame(protocol, Message::Text(text.to_owned().into()))
    }

    fn json(frame: &super::super::outbox::Outgoing) -> Option<serde_json::Value> {
        match frame.message() {
            Message::Text(text) => serde_json::from_str(text.as_str()).ok(),
            _ => None,
        }
    }

    /// The text frames queued so far.
    fn queued(frames: &mut Frames) -> Vec<serde_json::Value> {
        std::iter::from_fn(|| frames.try_recv())
            .filter_map(|frame| json(&frame))
            .collect()
    }

    /// The next text frame, once it is queued.
    async fn next(frames: &mut Frames) -> serde_json::Value {
        loop {
            let frame = frames.recv().await.expect("the outbox is open");
            if let Some(value) = json(&frame) {
                return value;
            }
        }
    }

    /// `ann`'s two messages with five replies stored, all pending: m1's three (seq 1 to 3, each
    /// stored apart) and m2's two (seq 4 and 5, stored as its last).
    async fn five_replies(store: &dyn Store) {
        let id = stored(store, accepted_text("ann", Some("m1"), "hi")).await;
        for reply_type in [ReplyType::Text, ReplyType::Voice, ReplyType::Image] {
            store
                .insert_replies(
                    id,
                    &client(),
                    vec![reply(reply_type, "r")],
                    Utc::now(),
                    false,
                )
                .await
                .expect("stored");
        }
        let id = stored(store, accepted_text("ann", Some("m2"), "again")).await;
        let replies = vec![reply(ReplyType::Text, "r"), reply(ReplyType::Voice, "r")];
        store
            .insert_replies(id, &client(), replies, Utc::now(), true)
            .await
            .expect("stored");
    }

    /// The stream's replies sent, up to `seq`.
    async fn sent_up_to(frames: &mut Frames, seq: u64) {
        loop {
            let frame = next(frames).await;
            if frame["type"] == "reply" && frame["seq"] == seq {
                return;
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_message_is_answered_with_its_ack_and_sent_again_with_the_first_ack() {
        let fixture = Fixture::new(OPEN);
        let (mut session, mut frames) = session(&fixture, Protocol::Native, 0);
        let send = r#"{"type":"send","id":"m1","message_type":"text","content":"hello"}"#;
        assert_eq!(session.apply(frame(Protocol::Native, send)), None);
        let ack = next(&mut frames).await;
        assert_eq!(ack["type"], "ack", "{ack}");
        assert_eq!(ack["id"], "m1");
        assert_eq!(ack["status"], "accepted");
        let message_id = ack["message_id"].clone();
        assert!(session.sent_message);
        // The same id again: stored once, answered with the first.
        assert_eq!(session.apply(frame(Protocol::Native, send)), None);
        let again = next(&mut frames).await;
        assert_eq!(again["type"], "ack", "{again}");
        assert_eq!(again["message_id"], message_id);
        assert_eq!(again["duplicate"], true);
        let stored = fixture
            .store
            .history(&client(), None, 10)
            .await
            .expect("read");
        assert_eq!(stored.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn each_verdict_is_answered_in_the_clients_words() {
        let fixture = Fixture::new(&[]);
        let (outbox, mut frames) = Outbox::new(fixture.gateway.settings.outbox);
        let clock = fixture.gateway.clock.clone();
        let settled = |verdict| Settled {
            id: Some("m1".into()),
            message_type: Some(MessageType::Text),
            received_at: Utc::now(),
            verdict,
        };
        let answered = |frames: &mut Frames, verdict| {
            answer(Protocol::Native, &outbox, clock.as_ref(), settled(verdict));
            let mut queued = queued(frames);
            assert_eq!(queued.len(), 1, "{queued:?}");
            queued.remove(0)
        };
        let rejected = answered(
            &mut frames,
            Verdict::Rejected {
                message_id: 4,
                reason: "outside its window".into(),
            },
        );
        assert_eq!(
            (&rejected["type"], &rejected["status"], &rejected["reason"]),
            (
                &"ack".into(),
                &"rejected".into(),
                &"outside its window".into()
            )
        );
        let duplicate = answered(
            &mut frames,
            Verdict::Duplicate(Existing {
                id: 3,
                status: MessageStatus::Replied,
                reason: None,
                received_at: Utc::now(),
            }),
        );
        assert_eq!(
            (
                &duplicate["message_id"],
                &duplicate["status"],
                &duplicate["duplicate"]
            ),
            (&3.into(), &"replied".into(), &true.into())
        );
        let invalid = answered(&mut frames, Verdict::Invalid(Invalid::EmptyText));
        assert_eq!(
            (&invalid["type"], &invalid["code"], &invalid["id"]),
            (&"error".into(), &"empty_text".into(), &"m1".into())
        );
        let busy = answered(
            &mut frames,
            Verdict::Busy {
                retry_after: Duration::from_millis(1500),
                limit: 500,
            },
        );
        assert_eq!(
            (&busy["code"], &busy["retry_after_ms"]),
            (&"busy".into(), &1500.into())
        );
        let away = StoreError::Unavailable("connection refused".into());
        let unavailable = answered(&mut frames, Verdict::Failed(AdmissionError::Store(away)));
        assert_eq!(
            (&unavailable["code"], &unavailable["retry_after_ms"]),
            (&"unavailable".into(), &1000.into())
        );
        let broken = StoreError::Database("disk I/O error".into());
        let internal = answered(&mut frames, Verdict::Failed(AdmissionError::Store(broken)));
        assert_eq!(internal["code"], "internal");
        assert!(internal.get("retry_after_ms").is_none(), "{internal}");
        // A legacy client hears of an accepted message only through its replies.
        answer(
            Protocol::Legacy,
            &outbox,
            clock.as_ref(),
            settled(Verdict::Accepted { message_id: 5 }),
        );
        assert_eq!(queued(&mut frames), Vec::<serde_json::Value>::new());
    }

    #[tokio::test(start_paused = true)]
    async fn an_acknowledgement_is_recorded_once_and_never_past_what_was_sent() {
        let fixture = Fixture::new(&[]);
        five_replies(fixture.store.as_ref()).await;
        let (mut session, mut frames) = session(&fixture, Protocol::Native, 0);
        let stream = session.stream().expect("native").clone();
        stream.replay(Some(0));
        sent_up_to(&mut frames, 5).await;
        let acknowledged = || async { fixture.store.acknowledged(&client()).await.expect("read") };

        session.apply(frame(Protocol::Native, r#"{"type":"received","seq":3}"#));
        assert_eq!((session.acknowledged, acknowledged().await), (3, 3));
        // An older one changes nothing.
        session.apply(frame(Protocol::Native, r#"{"type":"received","seq":2}"#));
        assert_eq!(session.acknowledged, 3);
        // Beyond what this connection sent: the last reply sent.
        session.apply(frame(Protocol::Native, r#"{"type":"received","seq":99}"#));
        assert_eq!((session.acknowledged, acknowledged().await), (5, 5));
        assert!(
            queued(&mut frames)
                .iter()
                .all(|frame| frame["type"] != "error")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn on_departure_the_replies_sent_and_not_acknowledged_count_as_not_delivered() {
        let fixture = Fixture::new(&[]);
        five_replies(fixture.store.as_ref()).await;
        let (mut session, mut frames) = session(&fixture, Protocol::Native, 0);
        session.stream().expect("native").replay(Some(0));
        sent_up_to(&mut frames, 5).await;
        session.apply(frame(Protocol::Native, r#"{"type":"received","seq":3}"#));
        session.depart();
        let deliveries: Vec<Delivery> = fixture
            .store
            .replies_after(&client(), 0, 10)
            .await
            .expect("read")
            .into_iter()
            .map(|missed| missed.reply.delivery)
            .collect();
        use Delivery::{Delivered, Failed};
        assert_eq!(
            deliveries,
            [Delivered, Delivered, Delivered, Failed, Failed]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_file_is_taken_only_right_after_its_announcement() {
        let fixture = Fixture::new(OPEN);
        let (mut session, mut frames) = session(&fixture, Protocol::Native, 0);
        // A binary frame nobody announced.
        session.apply(Command::File(Bytes::from_static(b"\x89PNG")));
        let unexpected = queued(&mut frames);
        assert_eq!(unexpected.len(), 1, "{unexpected:?}");
        assert_eq!(unexpected[0]["code"], "unexpected_binary");
        assert!(!session.sent_message);

        // Announced, then another frame first: that message is dropped, the frame still applied.
        let announce =
            r#"{"type":"send","id":"f1","message_type":"image","filename":"a.png","binary":true}"#;
        session.apply(frame(Protocol::Native, announce));
        session.apply(frame(Protocol::Native, r#"{"type":"ping","nonce":7}"#));
        let answered = queued(&mut frames);
        assert_eq!(answered.len(), 2, "{answered:?}");
        assert_eq!(
            (&answered[0]["code"], &answered[0]["id"]),
            (&"expected_binary".into(), &"f1".into())
        );
        assert_eq!(
            (&answered[1]["type"], &answered[1]["nonce"]),
            (&"pong".into(), &7.into())
        );
        // Announced, then its file: one message, answered as any other.
        session.apply(frame(Protocol::Native, announce));
        session.apply(Command::File(Bytes::from_static(b"not a png")));
        assert!(session.sent_message);
        let answer = next(&mut frames).await;
        assert_eq!(
            (&answer["id"], &answer["code"]),
            (&"f1".into(), &"media_mismatch".into()),
            "{answer}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn commands_a_session_cannot_do_are_refused_and_the_session_goes_on() {
        let fixture = Fixture::new(&[]);
        let (mut legacy, mut frames) = session(&fixture, Protocol::Legacy, 0);
        assert_eq!(legacy.apply(Command::Sync { after: None }), None);
        assert_eq!(
            legacy.apply(Command::Refresh {
                token: Some(crate::auth::Token::new("t"))
            }),
            None
        );
        let refused: Vec<_> = queued(&mut frames)
            .into_iter()
            .map(|frame| frame["data"]["code"].clone())
            .collect();
        assert_eq!(refused, ["unknown_frame", "unknown_frame"]);
        // A frame the reading already refused is told as it is.
        let (mut native, mut frames) = session(&fixture, Protocol::Native, 0);
        native.apply(frame(Protocol::Native, r#"{"type":"received"}"#));
        let told = queued(&mut frames);
        assert_eq!(told.len(), 1, "{told:?}");
        assert_eq!(told[0]["code"], "bad_frame");
        // Its close frame ends the session.
        assert_eq!(
            native.apply(Command::from_frame(Protocol::Native, Message::Close(None))),
            Some(Ending::ClientClosed)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_draining_server_takes_no_message_and_says_so() {
        let fixture = Fixture::new(OPEN);
        let (mut session, mut frames) = session(&fixture, Protocol::Native, 0);
        fixture.gateway.begin_drain();
        let send = r#"{"type":"send","id":"m1","message_type":"text","content":"hello"}"#;
        session.apply(frame(Protocol::Native, send));
        let answered = queued(&mut frames);
        assert_eq!(answered.len(), 1, "{answered:?}");
        assert_eq!(
            (&answered[0]["code"], &answered[0]["id"]),
            (&"shutting_down".into(), &"m1".into())
        );
        let stored = fixture
            .store
            .history(&client(), None, 10)
            .await
            .expect("read");
        assert!(stored.is_empty());
    }
}
