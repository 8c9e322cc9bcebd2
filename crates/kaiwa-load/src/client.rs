//! One simulated client: it connects and introduces itself ([`crate::connect`]), waits its turn
//! while the server is full, then sends its messages at its pace from a writer task while its
//! reader hands every frame to the [`Ledger`], and closes properly. With
//! `--reconnect`, a connection that ends under it is followed by another ([`crate::resume`]),
//! and the same writer, reader and ledger go on over it.

use crate::connect::{ABNORMAL_CLOSURE, Attempt, NO_STATUS, Shared, Welcome, Ws, connect, to_json};
use crate::ledger::{Effect, Ledger, Mode, Observed, Sent};
use crate::media::Samples;
use crate::plan::{ClientPlan, Mix, Pace};
use crate::report::{Live, Problem, Tally};
use crate::resume::{self, Resumed};
use crate::windows::{Expectation, Windows};
use chrono::{SecondsFormat, Utc};
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use kaiwa_protocol::{ErrorCode, MessageStatus, MessageType, ReplyType, legacy, native, path};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::{Instant, sleep_until};
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::sync::CancellationToken;

/// How long to wait for the server's answer to our close frame.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connection attempts that fail below the WebSocket (refused, reset) before giving up.
const TRANSPORT_ATTEMPTS: u32 = 5;
/// Bounds of the wait between attempts while the server says to come back (1013 when full).
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Tells the runner a client is connected (or never will be), for open-loop runs that start
/// every schedule at the same instant.
#[derive(Debug, Clone)]
pub struct StartLine {
    pub ready: mpsc::UnboundedSender<bool>,
    pub start: watch::Receiver<Option<Instant>>,
}

/// Runs one client from connection to close and returns what it counted.
pub async fn run(shared: Shared, plan: ClientPlan, pace: Pace, start: Option<StartLine>) -> Tally {
    let mut ledger = Ledger::new(shared.mode, shared.live.clone());
    if shared.reconnect {
        ledger = ledger.resuming();
    }
    ledger.tally_mut().clients = 1;
    let Some((mut ws, welcome)) = wait_for_turn(&shared, &plan, &mut ledger).await else {
        if let Some(start) = &start {
            start.ready.send(false).ok();
        }
        return ledger.finish();
    };
    ledger.tally_mut().connected = 1;
    let began = match start {
        Some(mut line) => {
            line.ready.send(true).ok();
            let waited = line.start.wait_for(Option::is_some).await.map(|t| *t);
            match waited {
                Ok(Some(at)) => at,
                _ => Instant::now(),
            }
        }
        None => Instant::now(),
    };
    let windows = welcome.windows.or(shared.windows).unwrap_or_default();
    let window = match (shared.mode, pace) {
        // Legacy and path frames name no message of ours: one at a time keeps every answer
        // attributable.
        (mode, _) if mode.one_at_a_time() => 1,
        (_, Pace::Closed { window }) => window
            .min(welcome.max_in_flight_per_client.unwrap_or(usize::MAX))
            .max(1),
        (_, Pace::Open { .. }) => Semaphore::MAX_PERMITS,
    };
    let permits = Arc::new(Semaphore::new(window));
    let (notes_tx, notes_rx) = mpsc::unbounded_channel();
    let (commands_tx, commands_rx) = mpsc::unbounded_channel();
    let (acks_tx, acks_rx) = watch::channel(0);
    let mut writer = Writer {
        notes: notes_tx,
        commands: commands_rx,
        acks: acks_rx,
        permits: permits.clone(),
        mode: shared.mode,
        mix: shared.mix.clone(),
        samples: shared.samples.clone(),
        windows,
        timezone: plan.timezone,
        messages: plan.messages,
        deadline: shared.deadline,
        pace,
        began,
        rng: StdRng::seed_from_u64(plan.seed),
        seq: 0,
        resends: VecDeque::new(),
        sending: true,
        acks_open: true,
        acknowledgements: 0,
    };
    let mut reader = Reader {
        notes: notes_rx,
        commands: commands_tx,
        acks: acks_tx,
        permits,
        mode: shared.mode,
        drain: shared.drain_timeout,
        drain_deadline: None,
        reconnect: shared.reconnect,
    };
    let mut acknowledgements = 0;
    // One pass per connection: more than one only when a connection ends under a client that
    // reconnects.
    loop {
        shared.live.connection_opened();
        let leaving = Arc::new(Leaving::new(shared.live.clone()));
        let (sink, stream) = (*ws).split();
        let writing = tokio::spawn(writer.run(sink, leaving.clone()));
        let ended = reader.run(stream, &mut ledger, &shared.stop).await;
        leaving.left();
        let written = writing.await;
        writer = match written {
            Ok(writer) => writer,
            Err(_) => {
                ledger.problem(Problem::ConnectFailed);
                break;
            }
        };
        acknowledgements = writer.acknowledgements;
        let Ended::Lost(code) = ended else {
            break;
        };
        // Every send the writer announced is in the ledger before it says what to send again.
        reader.take_notes(&mut ledger);
        if reader.drain_deadline.is_some() && ledger.unsettled() == 0 {
            // Nothing more to send or to wait for: no need to come back.
            break;
        }
        let until = reader.give_up_at(shared.deadline);
        match resume::reconnect(&shared, &plan, &mut ledger, until).await {
            Resumed::Connected(next, _) => ws = next,
            Resumed::OutOfTime => {
                ledger.problem(Problem::Closed(code));
                break;
            }
            Resumed::Refused => break,
        }
        let reconnected = ledger.reconnected(std::time::Instant::now());
        writer.resume(reconnected.resend);
    }
    ledger.tally_mut().acknowledgements = acknowledgements;
    let mut tally = ledger.finish();
    tally.clients_sent = u64::from(tally.sent > 0);
    tally
}

/// Connects, retrying with backoff for as long as the run lasts while the server closes with a
/// code that says to come back ([`kaiwa_protocol::reconnects`]: 1013 when it is full, but also a
/// server restarting or failing for a moment); `None` if the client never got in.
async fn wait_for_turn(
    shared: &Shared,
    plan: &ClientPlan,
    ledger: &mut Ledger,
) -> Option<(Box<Ws>, Welcome)> {
    let mut rng = StdRng::seed_from_u64(plan.seed ^ 0x5eed);
    let mut backoff = BACKOFF_MIN;
    let mut transport_failures = 0;
    loop {
        if shared.stop.is_cancelled() {
            ledger.problem(Problem::NoTurn);
            return None;
        }
        match connect(shared.url(plan.index), shared.mode, plan).await {
            Attempt::Ready(ws, welcome) => return Some((ws, welcome)),
            Attempt::Refused(code) => {
                ledger.tally_mut().refused(code);
                Live::add(&shared.live.refusals, 1);
            }
            Attempt::Transport(err) => {
                transport_failures += 1;
                if transport_failures >= TRANSPORT_ATTEMPTS {
                    tracing_note(&plan.client_id, &err);
                    ledger.problem(Problem::ConnectFailed);
                    return None;
                }
            }
            Attempt::Failed(problem) => {
                ledger.problem(problem);
                return None;
            }
        }
        // Jitter keeps the refused clients from coming back all at once.
        let jitter = backoff.mul_f64(rng.random_range(0.0..1.0));
        tokio::select! {
            () = shared.stop.cancelled() => {}
            () = tokio::time::sleep(backoff + jitter) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

fn tracing_note(client_id: &str, err: &str) {
    eprintln!("kaiwa-load: client {client_id} could not connect: {err}");
}

/// From the writer to the reader, always sent before the frame it announces.
#[derive(Debug)]
enum Note {
    Sent(Sent),
    /// The window verdict changed while the frame was being written: either answer is right.
    Edge(String),
    /// The writer has sent everything it will send (resends aside).
    Done,
}

/// From the reader to the writer.
#[derive(Debug)]
enum Command {
    Resend {
        key: String,
        kind: MessageType,
        at: Instant,
    },
    /// Answer the server's heartbeat ping (legacy, path).
    Pong,
    Close,
}

/// One connection's end as the concurrency count sees it, counted once: when the client sends
/// its close frame (the server gives the client slot back as it reads it, before its close in
/// return reaches us), or else when the connection is over.
struct Leaving {
    live: Arc<Live>,
    counted: AtomicBool,
}

impl Leaving {
    fn new(live: Arc<Live>) -> Self {
        Self {
            live,
            counted: AtomicBool::new(false),
        }
    }

    fn left(&self) {
        if !self.counted.swap(true, Ordering::Relaxed) {
            self.live.connection_closed();
        }
    }
}

/// The sending half of a client. It outlives its connection: with `--reconnect` the same
/// writer, with its place in the schedule and its message numbering, goes on over the next.
struct Writer {
    notes: mpsc::UnboundedSender<Note>,
    commands: mpsc::UnboundedReceiver<Command>,
    /// The reply stream position to acknowledge, from the reader. A watch keeps only the
    /// latest: acknowledgements are cumulative, so one that waited behind a large frame
    /// replaces those that came after it instead of queueing beside them.
    acks: watch::Receiver<u64>,
    /// Free places in the client's window of unsettled messages; the reader gives them back.
    permits: Arc<Semaphore>,
    mode: Mode,
    mix: Mix,
    samples: Arc<Samples>,
    windows: Windows,
    timezone: chrono_tz::Tz,
    messages: Option<u64>,
    deadline: Option<Instant>,
    pace: Pace,
    began: Instant,
    rng: StdRng,
    /// Messages sent so far (resends aside): the next one's number.
    seq: u64,
    /// Messages to send again, and when.
    resends: VecDeque<(Instant, String, MessageType)>,
    /// Whether new messages are still to be sent.
    sending: bool,
    acks_open: bool,
    /// `received` frames sent.
    acknowledgements: u64,
}

impl Writer {
    /// Sends until done, told to close, or the connection fails; hands itself back so that a
    /// client that reconnects can go on with it.
    async fn run(mut self, mut sink: SplitSink<Ws, Message>, leaving: Arc<Leaving>) -> Self {
        loop {
            let due = match self.pace {
                Pace::Open { interval, phase } => {
                    Some(self.began + phase + interval.mul_f64(self.seq as f64))
                }
                Pace::Closed { .. } => None,
            };
            if self.sending {
                let more = self.messages.is_none_or(|limit| self.seq < limit)
                    && self
                        .deadline
                        .is_none_or(|deadline| due.unwrap_or_else(Instant::now) < deadline);
                if !more {
                    self.sending = false;
                    self.notes.send(Note::Done).ok();
                }
            }
            let next_resend = self.resends.front().map(|(at, _, _)| *at);
            tokio::select! {
                biased;
                // First, so that the reader's last acknowledgement goes out before its Close.
                changed = self.acks.changed(), if self.acks_open => {
                    if changed.is_err() {
                        self.acks_open = false;
                        continue;
                    }
                    let seq = *self.acks.borrow_and_update();
                    let received = to_json(&native::ClientFrame::Received { seq });
                    if sink.send(Message::text(received)).await.is_err() {
                        break;
                    }
                    self.acknowledgements += 1;
                }
                command = self.commands.recv() => match command {
                    Some(Command::Resend { key, kind, at }) => self.resends.push_back((at, key, kind)),
                    Some(Command::Pong) => {
                        let pong = crate::connect::heartbeat_pong(self.mode);
                        if sink.send(Message::text(pong)).await.is_err() {
                            break;
                        }
                    }
                    Some(Command::Close) | None => break,
                },
                () = sleep_until(next_resend.unwrap_or_else(Instant::now)), if next_resend.is_some() => {
                    if let Some((_, key, kind)) = self.resends.pop_front() {
                        let at = Instant::now();
                        if self.write(&mut sink, key, kind, at).await.is_err() {
                            break;
                        }
                    }
                }
                permit = async {
                    if let Some(due) = due {
                        sleep_until(due).await;
                    }
                    self.permits.clone().acquire_owned().await
                }, if self.sending => {
                    let Ok(permit) = permit else { break };
                    if self.deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                        // Time ran out while waiting for a place: this message is not sent.
                        drop(permit);
                        self.sending = false;
                        self.notes.send(Note::Done).ok();
                        continue;
                    }
                    permit.forget();
                    let kind = self.mix.pick(&mut self.rng);
                    let key = format!("m{}", self.seq);
                    self.seq += 1;
                    let scheduled = due.unwrap_or_else(Instant::now);
                    if self.write(&mut sink, key, kind, scheduled).await.is_err() {
                        break;
                    }
                }
            }
        }
        let close = CloseFrame {
            code: WsCloseCode::Normal,
            reason: "done".into(),
        };
        leaving.left();
        // If this fails, the connection is already gone, and the reader has reported how.
        sink.send(Message::Close(Some(close))).await.ok();
        self
    }

    /// Gets ready for a new connection: what the old one had queued to send again is dropped
    /// (its reader asked for it, and every message without an ack is in `resend` anyway), and
    /// the messages in `resend` go out first, in order.
    fn resume(&mut self, resend: Vec<(String, MessageType)>) {
        while self.commands.try_recv().is_ok() {}
        self.resends.clear();
        let now = Instant::now();
        self.resends
            .extend(resend.into_iter().map(|(key, kind)| (now, key, kind)));
    }

    async fn write(
        &mut self,
        sink: &mut SplitSink<Ws, Message>,
        key: String,
        kind: MessageType,
        scheduled: Instant,
    ) -> Result<(), tungstenite::Error> {
        let now = Utc::now();
        let expectation = match self.mode {
            Mode::Echo => Expectation::Accept,
            Mode::Native | Mode::Legacy | Mode::Path => {
                self.windows.expect(kind, self.timezone, now)
            }
        };
        let frame = frame(self.mode, &key, kind, &self.samples, now);
        self.notes
            .send(Note::Sent(Sent {
                key: key.clone(),
                kind,
                expectation,
                scheduled: scheduled.into_std(),
            }))
            .ok();
        sink.send(Message::text(frame)).await?;
        if expectation != Expectation::Either
            && self.mode != Mode::Echo
            && self.windows.expect(kind, self.timezone, Utc::now()) != expectation
        {
            self.notes.send(Note::Edge(key)).ok();
        }
        Ok(())
    }
}

/// The frame that sends message `key`.
pub fn frame(
    mode: Mode,
    key: &str,
    kind: MessageType,
    samples: &Samples,
    now: chrono::DateTime<Utc>,
) -> String {
    let sample = samples.get(kind);
    let content = match sample {
        Some(sample) => sample.base64.to_string(),
        None => format!("Hello from the load tool, message {key}"),
    };
    let filename = sample.map(|s| s.filename.to_owned());
    let timestamp = Some(now.to_rfc3339_opts(SecondsFormat::Millis, true));
    match mode {
        Mode::Native | Mode::Echo => to_json(&native::ClientFrame::Send(native::Send {
            id: Some(key.to_owned()),
            message_type: Some(kind.as_str().to_owned()),
            content: Some(content),
            filename,
            timestamp,
            binary: false,
        })),
        Mode::Legacy => to_json(&legacy::ClientFrame {
            message_type: Some(kind.as_str().to_owned()),
            content: Some(content),
            filename,
            timestamp,
            ..legacy::ClientFrame::default()
        }),
        // Media as files (base64 with a filename, kaiwa's addition to the dialect): text under
        // a media type would be a note, which is rejected whatever the hour.
        Mode::Path => to_json(&path::ClientFrame {
            kind: Some(kind.as_str().to_owned()),
            content: Some(content),
            filename,
            timestamp,
            ..path::ClientFrame::default()
        }),
    }
}

/// How a connection's reader stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// The client is done, the run stopped, or the server closed the connection for good.
    Closed,
    /// The connection ended under a client that reconnects, with this close code (1006 when
    /// no close frame came), one that says to come back.
    Lost(u16),
}

/// The receiving half of a client; like the writer, it outlives its connection.
struct Reader {
    notes: mpsc::UnboundedReceiver<Note>,
    commands: mpsc::UnboundedSender<Command>,
    /// Tells the writer how far to acknowledge the reply stream.
    acks: watch::Sender<u64>,
    /// Given back as messages settle, so the writer may send the next.
    permits: Arc<Semaphore>,
    mode: Mode,
    /// After the last send, how long the answers still due may take.
    drain: Duration,
    /// Set once the writer is done sending.
    drain_deadline: Option<Instant>,
    /// Whether a connection lost with a close code that says to come back is followed by
    /// another, instead of being a problem.
    reconnect: bool,
}

impl Reader {
    async fn run(
        &mut self,
        mut stream: SplitStream<Ws>,
        ledger: &mut Ledger,
        stop: &CancellationToken,
    ) -> Ended {
        let mut ended = None;
        loop {
            if self.drain_deadline.is_some() && ledger.unsettled() == 0 {
                break;
            }
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                note = self.notes.recv() => match note {
                    Some(note) => self.note(ledger, note),
                    None => self.writer_done(ledger),
                },
                () = sleep_until(self.drain_deadline.unwrap_or_else(Instant::now)), if self.drain_deadline.is_some() => break,
                frame = stream.next() => {
                    if let Some(end) = self.frame(ledger, frame) {
                        ended = Some(end);
                        break;
                    }
                }
                // Acknowledgements as a real client sends them, cheaply: one `received` per
                // read burst, for everything in it. This branch comes last, so it runs only
                // once the socket has nothing more to read right now; a burst of replies (the
                // server writes several frames per send) costs one frame and one store update,
                // not one per reply, and no reply waits on a timer to be acknowledged.
                () = std::future::ready(()), if self.owes_ack(ledger) => self.acknowledge(ledger),
            }
        }
        // What was processed is acknowledged before the close: the server records replies
        // sent but not acknowledged as failed when the connection ends.
        self.acknowledge(ledger);
        self.commands.send(Command::Close).ok();
        if let Some(end) = ended {
            return end;
        }
        // Read on until the server answers our close: frames still in flight are accounted.
        let closing = async {
            loop {
                match stream.next().await {
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                    frame => {
                        self.frame(ledger, frame);
                    }
                }
            }
        };
        if tokio::time::timeout(CLOSE_TIMEOUT, closing).await.is_err() {
            ledger.problem(Problem::Closed(ABNORMAL_CLOSURE));
        }
        Ended::Closed
    }

    /// Whether replies were processed that the server has not been told of. The legacy and
    /// path protocols have no acknowledgements.
    fn owes_ack(&self, ledger: &Ledger) -> bool {
        !self.mode.one_at_a_time() && ledger.stream_position() > *self.acks.borrow()
    }

    fn acknowledge(&self, ledger: &Ledger) {
        if self.owes_ack(ledger) {
            // The writer may be gone with the connection; then there is no one to tell.
            self.acks.send_replace(ledger.stream_position());
        }
    }

    fn writer_done(&mut self, ledger: &mut Ledger) {
        let drain = self.drain;
        let now = Instant::now();
        self.drain_deadline.get_or_insert(now + drain);
        ledger.sending_done(now.into_std());
    }

    fn note(&mut self, ledger: &mut Ledger, note: Note) {
        match note {
            Note::Sent(sent) => ledger.sent(sent),
            Note::Edge(key) => ledger.widen(&key),
            Note::Done => self.writer_done(ledger),
        }
    }

    /// Hands the ledger every note the writer left, once it has stopped.
    fn take_notes(&mut self, ledger: &mut Ledger) {
        while let Ok(note) = self.notes.try_recv() {
            self.note(ledger, note);
        }
    }

    /// When a client that lost its connection stops trying to come back: at the end of its
    /// drain once it has sent everything, or that long after the run's sending deadline;
    /// otherwise only when the run stops.
    fn give_up_at(&self, deadline: Option<Instant>) -> Option<Instant> {
        self.drain_deadline
            .or_else(|| deadline.map(|deadline| deadline + self.drain))
    }

    /// Handles one frame; `Some` when the connection ended.
    fn frame(
        &mut self,
        ledger: &mut Ledger,
        frame: Option<Result<Message, tungstenite::Error>>,
    ) -> Option<Ended> {
        // Sends are noted before they are written, so every note for a frame's message is here.
        self.take_notes(ledger);
        let at = std::time::Instant::now();
        let code = match frame {
            Some(Ok(Message::Text(text))) => {
                let effect = self.text(ledger, &text, at);
                self.apply(effect);
                return None;
            }
            Some(Ok(Message::Binary(_))) => {
                ledger.problem(Problem::UnexpectedFrame);
                return None;
            }
            Some(Ok(Message::Close(close))) => close.map_or(NO_STATUS, |c| u16::from(c.code)),
            Some(Ok(_)) => return None,
            Some(Err(_)) | None => ABNORMAL_CLOSURE,
        };
        if self.reconnect && kaiwa_protocol::reconnects(code) {
            return Some(Ended::Lost(code));
        }
        ledger.problem(Problem::Closed(code));
        Some(Ended::Closed)
    }

    fn apply(&mut self, effect: Effect) {
        match effect {
            Effect::Nothing => {}
            Effect::Settled => self.permits.add_permits(1),
            Effect::Resend { key, kind, after } => {
                let at = Instant::now() + after;
                self.commands.send(Command::Resend { key, kind, at }).ok();
            }
        }
    }

    fn text(&mut self, ledger: &mut Ledger, text: &str, at: std::time::Instant) -> Effect {
        match self.mode {
            Mode::Native => native_frame(ledger, text, at),
            Mode::Echo => match serde_json::from_str::<native::ClientFrame>(text) {
                Ok(native::ClientFrame::Send(send)) => {
                    ledger.observe(send.id.as_deref(), Observed::Echo, at)
                }
                _ => {
                    ledger.problem(Problem::UnexpectedFrame);
                    Effect::Nothing
                }
            },
            Mode::Legacy => {
                let Ok(frame) = serde_json::from_str::<legacy::ServerFrame>(text) else {
                    ledger.problem(Problem::MalformedFrame);
                    return Effect::Nothing;
                };
                let data = frame.data;
                match frame.kind {
                    legacy::FrameKind::Heartbeat => {
                        if data.message.as_deref() == Some("ping") {
                            self.commands.send(Command::Pong).ok();
                        }
                        Effect::Nothing
                    }
                    legacy::FrameKind::Message => match (data.id, data.reply_type) {
                        (Some(reply_id), Some(reply_type)) => ledger.observe_legacy(
                            data.message_id,
                            Observed::Reply {
                                reply_id,
                                reply_type,
                            },
                            at,
                        ),
                        (None, _) if data.message.is_some() => ledger.observe_legacy(
                            data.message_id,
                            Observed::Ack {
                                status: MessageStatus::Rejected,
                                duplicate: false,
                                message_id: data.message_id.unwrap_or_default(),
                            },
                            at,
                        ),
                        _ => {
                            ledger.problem(Problem::MalformedFrame);
                            Effect::Nothing
                        }
                    },
                    legacy::FrameKind::Error => ledger.observe_legacy(
                        None,
                        Observed::Error {
                            code: data.code.unwrap_or(ErrorCode::Internal),
                            retry_after: None,
                        },
                        at,
                    ),
                    legacy::FrameKind::System => {
                        ledger.problem(Problem::UnexpectedFrame);
                        Effect::Nothing
                    }
                }
            }
            Mode::Path => self.path_frame(ledger, text, at),
        }
    }

    /// Hands one path dialect frame to the ledger: a reply, a rejection or a refusal of the
    /// one message outstanding (each names its stored id, a kaiwa addition), or the heartbeat.
    fn path_frame(&mut self, ledger: &mut Ledger, text: &str, at: std::time::Instant) -> Effect {
        let Ok(frame) = serde_json::from_str::<path::ServerFrame>(text) else {
            ledger.problem(Problem::MalformedFrame);
            return Effect::Nothing;
        };
        match frame {
            path::ServerFrame::Check { check_connection } => {
                if check_connection == path::PING {
                    self.commands.send(Command::Pong).ok();
                }
                Effect::Nothing
            }
            path::ServerFrame::Answer(answer) => {
                let observed = match (answer.reply_id, answer.status, answer.code) {
                    (Some(reply_id), _, _) => match ReplyType::parse(&answer.kind) {
                        Some(reply_type) => Observed::Reply {
                            reply_id,
                            reply_type,
                        },
                        None => {
                            ledger.problem(Problem::MalformedFrame);
                            return Effect::Nothing;
                        }
                    },
                    (None, Some(MessageStatus::Rejected), _) => Observed::Ack {
                        status: MessageStatus::Rejected,
                        duplicate: false,
                        message_id: answer.message_id.unwrap_or_default(),
                    },
                    (None, _, Some(code)) => {
                        return ledger.observe_legacy(
                            None,
                            Observed::Error {
                                code,
                                retry_after: answer.retry_after_ms.map(Duration::from_millis),
                            },
                            at,
                        );
                    }
                    _ => {
                        ledger.problem(Problem::MalformedFrame);
                        return Effect::Nothing;
                    }
                };
                ledger.observe_legacy(answer.message_id, observed, at)
            }
            path::ServerFrame::Error(failure) => {
                let code = failure.code.unwrap_or(ErrorCode::Internal);
                ledger.problem(Problem::Error(code.as_str().to_owned()));
                Effect::Nothing
            }
            // A greeting or a notice once connected: nothing we asked for.
            path::ServerFrame::Notice(_) => {
                ledger.problem(Problem::UnexpectedFrame);
                Effect::Nothing
            }
        }
    }
}

/// Hands one native frame to the ledger.
pub fn native_frame(ledger: &mut Ledger, text: &str, at: std::time::Instant) -> Effect {
    let Ok(frame) = serde_json::from_str::<native::ServerFrame>(text) else {
        ledger.problem(Problem::MalformedFrame);
        return Effect::Nothing;
    };
    match frame {
        native::ServerFrame::Ack(ack) => ledger.observe(
            Some(&ack.id),
            Observed::Ack {
                status: ack.status,
                duplicate: ack.duplicate,
                message_id: ack.message_id,
            },
            at,
        ),
        native::ServerFrame::Status(status) => {
            ledger.observe(status.id.as_deref(), Observed::Status(status.status), at)
        }
        // A replayed reply is the reply it is while the replay a reconnect asked for lasts.
        native::ServerFrame::Reply(reply) if !reply.missed || ledger.replaying() => {
            if reply.missed {
                ledger.tally_mut().replayed += 1;
            }
            ledger.reply_seq(reply.seq);
            ledger.observe(
                reply.id.as_deref(),
                Observed::Reply {
                    reply_id: reply.reply.id,
                    reply_type: reply.reply.reply_type,
                },
                at,
            )
        }
        // A replay nobody asked for, or one after `synced`: it still takes its place in the
        // stream.
        native::ServerFrame::Reply(reply) => {
            ledger.reply_seq(reply.seq);
            ledger.problem(Problem::UnexpectedFrame);
            Effect::Nothing
        }
        native::ServerFrame::Delta(delta) => {
            ledger.observe(delta.id.as_deref(), Observed::Delta, at)
        }
        native::ServerFrame::Error(error) => match error.id {
            Some(id) => ledger.observe(
                Some(&id),
                Observed::Error {
                    code: error.code,
                    retry_after: error.retry_after_ms.map(Duration::from_millis),
                },
                at,
            ),
            None => {
                ledger.problem(Problem::Error(error.code.as_str().to_owned()));
                Effect::Nothing
            }
        },
        native::ServerFrame::Synced { .. } => {
            ledger.synced();
            Effect::Nothing
        }
        // We never ask for a pong or a second welcome, nor connect with a token.
        native::ServerFrame::Welcome(_)
        | native::ServerFrame::Pong { .. }
        | native::ServerFrame::TokenExpired { .. }
        | native::ServerFrame::Refreshed { .. } => {
            ledger.problem(Problem::UnexpectedFrame);
            Effect::Nothing
        }
    }
}
