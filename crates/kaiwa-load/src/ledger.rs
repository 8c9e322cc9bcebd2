//! The accounting of one client's messages: what each message must get back (one ack; for an
//! accepted one `processing`, its reply set in order and `replied`; for a rejected one nothing
//! more), what it did get, and what that makes it: complete, lost, duplicated, unexpected or
//! misjudged against its window. Beside the messages it follows the connection's reply stream:
//! native replies carry `seq`, which must go 1, 2, 3... on a connection, each once. Pure
//! bookkeeping, fed by the client's reader, so it can be tested frame by frame.
//!
//! A client that reconnects (`--reconnect`) keeps one ledger across its connections: the reply
//! stream goes on where it stopped (the server replays what came after the client's `after`),
//! unacked messages are sent again under the same id and a `duplicate` ack answers them, and
//! every accepted message still ends with its `processing` and `replied`: the server sends
//! them on the connection that carries the message's replies, and once more on the next one
//! for the set whose last reply the client had as its connection ended. Statuses are counted
//! per connection, since a message that crossed a reconnect may get them on both.

use crate::gaps::Wait;
use crate::report::{Live, Problem, Tally};
use crate::windows::Expectation;
use kaiwa_protocol::{ErrorCode, MessageStatus, MessageType, ReplyType};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the server speaks, which decides which frames a message must get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `kaiwa.v1`: ack, statuses and replies, matched by the client's message id.
    Native,
    /// The Python server's frames: replies or a rejection, no ack and no statuses. They name no
    /// client message id, so a legacy client keeps one message outstanding at a time.
    Legacy,
    /// The path dialect (the second Python system's clients: the id in the URL, `type`/`content`
    /// frames): accounted as legacy, one message outstanding at a time.
    Path,
    /// A bare echo server: each frame comes back once, unchanged.
    Echo,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Self::Native => "native",
            Self::Legacy => "legacy",
            Self::Path => "path",
            Self::Echo => "echo",
        }
    }

    /// Whether its frames name no message of the client's: then a client keeps one message
    /// outstanding, learns of acceptance from the first reply, and acknowledges nothing.
    pub fn one_at_a_time(self) -> bool {
        matches!(self, Self::Legacy | Self::Path)
    }
}

/// A message the client has just written to the socket.
#[derive(Debug, Clone)]
pub struct Sent {
    pub key: String,
    pub kind: MessageType,
    pub expectation: Expectation,
    /// When it was due: latency counts from here, so a client that falls behind its schedule
    /// shows it (no coordinated omission). In closed loop, the moment it was sent.
    pub scheduled: Instant,
}

/// One frame about a message, whichever protocol carried it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Observed {
    Ack {
        status: MessageStatus,
        duplicate: bool,
        message_id: i64,
    },
    Status(MessageStatus),
    Reply {
        reply_id: i64,
        reply_type: ReplyType,
    },
    /// A piece of a streamed text reply: counted, never a problem.
    Delta,
    Error {
        code: ErrorCode,
        retry_after: Option<Duration>,
    },
    /// The echo server sent the frame back.
    Echo,
}

/// What the client must do after a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    Nothing,
    /// The message's fate is known and nothing more is due for it: its window slot is free.
    Settled,
    /// The server was busy and stored nothing: send the same message again after `after`.
    Resend {
        key: String,
        kind: MessageType,
        after: Duration,
    },
}

/// How long to wait before resending a `busy` message when the server does not say.
const DEFAULT_RETRY: Duration = Duration::from_secs(1);
/// With `--reconnect`, the first wait before resending after another retryable error that
/// names no time; it doubles with each retry of the same message, up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

#[derive(Debug)]
struct Tracked {
    kind: MessageType,
    expectation: Expectation,
    scheduled: Instant,
    /// The stored id, once the server named it.
    message_id: Option<i64>,
    acks: u32,
    /// `Some(true)` accepted, `Some(false)` rejected.
    accepted: Option<bool>,
    processing: u32,
    replied: u32,
    replies: Vec<ReplyType>,
    settled: bool,
    /// Its place among the client's messages, so that resends after a reconnect keep the order
    /// of the first sends.
    order: u64,
    /// The connection it was first sent on. Its frames that come on a later one crossed a
    /// reconnect: their statuses may be repeated (one per connection), and its replies may come
    /// before the ack of its resend.
    first_connection: u32,
    /// The connection it was last sent on.
    last_connection: u32,
    /// Sent again on a later connection because no ack came: the server may have stored it
    /// already, and then answers with a `duplicate` ack, which is its ack.
    resent_after_reconnect: bool,
    /// Sends again after a retryable error, for the backoff.
    retries: u32,
    /// The connection `processing_here` and `replied_here` count on: each connection sends a
    /// message's statuses at most once.
    status_connection: u32,
    processing_here: u32,
    replied_here: u32,
}

impl Tracked {
    fn crossed(&self, connection: u32) -> bool {
        connection != self.first_connection
    }
}

/// What a new connection changes, from [`Ledger::reconnected`].
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reconnected {
    /// Messages whose ack never came, in the order they were first sent: send each again with
    /// the same id.
    pub resend: Vec<(String, MessageType)>,
}

/// A connection's reply stream as the client sees it. The server numbers a client id's replies
/// 1, 2, 3... and sends them on a connection in that order, each once; a fresh client id (every
/// run makes its own) starts at 1.
#[derive(Debug, Default)]
struct Stream {
    /// The highest `seq` seen: what the client acknowledges with `received`.
    last: u64,
    /// `seq`s jumped over, as ranges `start..=end` by start. Judged at the end, so that a reply
    /// that comes late counts as out of order rather than as a gap and then something else.
    skipped: BTreeMap<u64, u64>,
}

impl Stream {
    /// Takes the `seq` of the next reply on the connection.
    fn take(&mut self, seq: u64) -> Option<Problem> {
        let next = self.last.saturating_add(1);
        if seq >= next {
            if seq > next {
                self.skipped.insert(next, seq - 1);
            }
            self.last = seq;
            None
        } else if self.fill(seq) {
            Some(Problem::SeqOutOfOrder)
        } else {
            Some(Problem::SeqRepeat)
        }
    }

    /// Whether `seq` was skipped; if so it no longer is.
    fn fill(&mut self, seq: u64) -> bool {
        let Some((&start, &end)) = self.skipped.range(..=seq).next_back() else {
            return false;
        };
        if seq > end {
            return false;
        }
        self.skipped.remove(&start);
        if start < seq {
            self.skipped.insert(start, seq - 1);
        }
        if seq < end {
            self.skipped.insert(seq + 1, end);
        }
        true
    }

    /// How many `seq`s were skipped and never came.
    fn missing(&self) -> u64 {
        self.skipped
            .iter()
            .map(|(start, end)| end - start + 1)
            .sum()
    }
}

/// One client's messages and what became of them.
#[derive(Debug)]
pub struct Ledger {
    mode: Mode,
    messages: HashMap<String, Tracked>,
    /// The client has one connection that carries replies, so one stream.
    stream: Stream,
    /// Every reply id seen, to catch a reply delivered twice.
    reply_ids: HashSet<i64>,
    /// Legacy: which message a stored id belongs to, so a late frame finds its message.
    by_message_id: HashMap<i64, String>,
    /// Legacy: the message awaiting its answer.
    current: Option<String>,
    unsettled: usize,
    tally: Tally,
    live: Arc<Live>,
    /// The client reconnects and resumes when a connection ends under it (`--reconnect`).
    resumes: bool,
    /// How many connections came before the current one.
    connection: u32,
    /// The current connection asked for a replay (`after`) and has not had its `synced` yet.
    replaying: bool,
    /// Messages sent so far, to number them.
    sends: u64,
    wait: Wait,
}

impl Ledger {
    pub fn new(mode: Mode, live: Arc<Live>) -> Self {
        Self {
            mode,
            messages: HashMap::new(),
            stream: Stream::default(),
            reply_ids: HashSet::new(),
            by_message_id: HashMap::new(),
            current: None,
            unsettled: 0,
            tally: Tally::default(),
            live,
            resumes: false,
            connection: 0,
            replaying: false,
            sends: 0,
            wait: Wait::default(),
        }
    }

    /// A ledger for a client that reconnects and resumes when a connection ends under it.
    pub fn resuming(mut self) -> Self {
        self.resumes = true;
        self
    }

    /// A new connection took over from one that ended under the client, and asked the server
    /// to replay the reply stream after [`Ledger::stream_position`]. Every message still
    /// unsettled has now crossed a reconnect: those without an ack are to be sent again.
    pub fn reconnected(&mut self, at: Instant) -> Reconnected {
        self.connection += 1;
        self.replaying = true;
        self.tally.reconnects += 1;
        Live::add(&self.live.reconnects, 1);
        self.live.series.reconnected(at);
        let mut resend: Vec<_> = self
            .messages
            .iter()
            .filter(|(_, t)| !t.settled && t.acks == 0)
            .map(|(key, t)| (t.order, key.clone(), t.kind))
            .collect();
        resend.sort_unstable_by_key(|(order, _, _)| *order);
        Reconnected {
            resend: resend
                .into_iter()
                .map(|(_, key, kind)| (key, kind))
                .collect(),
        }
    }

    /// Whether replayed replies (`missed: true`) belong here: the connection asked for a
    /// replay and its `synced` has not come.
    pub fn replaying(&self) -> bool {
        self.replaying
    }

    /// The replay is over; a `synced` nobody asked for is unexpected.
    pub fn synced(&mut self) {
        if self.replaying {
            self.replaying = false;
        } else {
            self.problem(Problem::UnexpectedFrame);
        }
    }

    /// The client has sent every message it will send (resends aside).
    pub fn sending_done(&mut self, at: Instant) {
        self.tally.sending_done.get_or_insert(at);
    }

    /// Messages sent whose fate is not known yet.
    pub fn unsettled(&self) -> usize {
        self.unsettled
    }

    pub fn tally_mut(&mut self) -> &mut Tally {
        &mut self.tally
    }

    /// How far the client has processed its reply stream: the `seq` a `received` frame
    /// acknowledges. For the echo baseline, the number of frames echoed, so that an echo client
    /// acknowledges as often as a native one.
    pub fn stream_position(&self) -> u64 {
        self.stream.last
    }

    /// The `seq` of a native reply, in the order replies arrived on the connection. Call it for
    /// every reply frame, before [`Ledger::observe`].
    pub fn reply_seq(&mut self, seq: u64) {
        if let Some(problem) = self.stream.take(seq) {
            self.problem(problem);
        }
    }

    /// Records a send. Sending a key again (after `busy`) is a resend, not a new message.
    pub fn sent(&mut self, sent: Sent) {
        if self.mode.one_at_a_time() {
            self.current = Some(sent.key.clone());
        }
        if let Some(t) = self.messages.get_mut(&sent.key) {
            self.tally.resent += 1;
            if t.last_connection != self.connection {
                t.last_connection = self.connection;
                t.resent_after_reconnect = true;
                self.tally.resent_after_reconnect += 1;
                // The server judges the window by whichever send it stored first: the
                // first one if it got it, else this one.
                if t.expectation != sent.expectation && t.expectation != Expectation::Either {
                    t.expectation = Expectation::Either;
                    self.tally.kind(t.kind).edge += 1;
                }
            }
            return;
        }
        self.tally.sent += 1;
        Live::add(&self.live.sent, 1);
        let per_type = self.tally.kind(sent.kind);
        per_type.sent += 1;
        if sent.expectation == Expectation::Either {
            per_type.edge += 1;
        }
        self.tally.first_send = Some(match self.tally.first_send {
            Some(first) => first.min(sent.scheduled),
            None => sent.scheduled,
        });
        if self.unsettled == 0 {
            self.wait.start(sent.scheduled);
        }
        self.unsettled += 1;
        self.sends += 1;
        self.messages.insert(
            sent.key,
            Tracked {
                kind: sent.kind,
                expectation: sent.expectation,
                scheduled: sent.scheduled,
                message_id: None,
                acks: 0,
                accepted: None,
                processing: 0,
                replied: 0,
                replies: Vec::new(),
                settled: false,
                order: self.sends,
                first_connection: self.connection,
                last_connection: self.connection,
                resent_after_reconnect: false,
                retries: 0,
                status_connection: self.connection,
                processing_here: 0,
                replied_here: 0,
            },
        );
    }

    /// The window verdict of `key` changed while it was being sent: either answer is right.
    pub fn widen(&mut self, key: &str) {
        if let Some(t) = self.messages.get_mut(key)
            && t.expectation != Expectation::Either
        {
            t.expectation = Expectation::Either;
            self.tally.kind(t.kind).edge += 1;
        }
    }

    /// Records a problem that is not about one message (a frame without an id, a close).
    pub fn problem(&mut self, problem: Problem) {
        Live::add(&self.live.problems, 1);
        self.tally.problem(problem);
    }

    /// A frame about the message the client calls `key` (native, echo).
    pub fn observe(&mut self, key: Option<&str>, observed: Observed, at: Instant) -> Effect {
        if observed == Observed::Delta {
            self.tally.deltas += 1;
            return Effect::Nothing;
        }
        if observed == Observed::Echo {
            // The echo server numbers nothing: every frame it sends back is the next one.
            self.stream.last += 1;
        }
        let Some(key) = key else {
            self.problem(Problem::UnexpectedFrame);
            return Effect::Nothing;
        };
        // An unknown key is reported by `apply`.
        self.apply(key, observed, at)
    }

    /// A legacy or path frame: it names the stored message id (kaiwa adds it) or nothing, so it belongs
    /// to the message that id was first seen with, or else to the one outstanding message.
    pub fn observe_legacy(
        &mut self,
        message_id: Option<i64>,
        observed: Observed,
        at: Instant,
    ) -> Effect {
        let known = message_id.and_then(|id| self.by_message_id.get(&id).cloned());
        let Some(key) = known.or_else(|| self.current.clone()) else {
            self.problem(Problem::UnexpectedFrame);
            return Effect::Nothing;
        };
        if let Some(id) = message_id {
            let tracked = self.messages.get_mut(&key);
            if let Some(tracked) = tracked {
                match tracked.message_id {
                    None => {
                        tracked.message_id = Some(id);
                        self.by_message_id.insert(id, key.clone());
                    }
                    // The outstanding message already has another id: this frame answers none.
                    Some(own) if own != id => {
                        self.problem(Problem::UnexpectedFrame);
                        return Effect::Nothing;
                    }
                    Some(_) => {}
                }
            }
        }
        self.apply(&key, observed, at)
    }

    fn apply(&mut self, key: &str, observed: Observed, at: Instant) -> Effect {
        let mode = self.mode;
        let connection = self.connection;
        let resumes = self.resumes;
        let is_reply = matches!(observed, Observed::Reply { .. } | Observed::Echo);
        if is_reply {
            self.live.replies.mark(at);
        }
        let Some(t) = self.messages.get_mut(key) else {
            self.problem(Problem::UnexpectedFrame);
            return Effect::Nothing;
        };
        let crossed = t.crossed(connection);
        if matches!(observed, Observed::Status(_)) && t.status_connection != connection {
            t.status_connection = connection;
            t.processing_here = 0;
            t.replied_here = 0;
        }
        let mut problems: Vec<Problem> = Vec::new();
        let mut effect = Effect::Nothing;
        let mut failed = false;
        let latency = at.saturating_duration_since(t.scheduled);
        match observed {
            Observed::Delta => self.tally.deltas += 1,
            Observed::Echo => {
                if t.settled {
                    problems.push(Problem::DuplicateReply);
                } else {
                    t.acks += 1;
                    t.accepted = Some(true);
                    let per_type = self.tally.kind(t.kind);
                    per_type.accepted += 1;
                    per_type.record_ack(latency);
                    per_type.record_reply(latency);
                    self.live.series.replied(at, latency);
                    self.tally.accepted += 1;
                    effect = Effect::Settled;
                }
            }
            Observed::Ack {
                status,
                duplicate,
                message_id,
            } => {
                t.acks += 1;
                // A resend after a reconnect of a message the server had stored already: the
                // ack it never got, late.
                let answers_resend = duplicate && t.resent_after_reconnect;
                if (duplicate && !answers_resend) || t.acks > 1 {
                    problems.push(Problem::DuplicateAck);
                } else {
                    t.message_id = Some(message_id);
                    let accepted = match status {
                        MessageStatus::Accepted => true,
                        MessageStatus::Rejected => false,
                        // A duplicate ack carries the status the message has reached.
                        MessageStatus::Processing | MessageStatus::Replied if answers_resend => {
                            true
                        }
                        MessageStatus::Processing | MessageStatus::Replied => {
                            problems.push(Problem::UnexpectedFrame);
                            true
                        }
                    };
                    problems.extend(judge(t, accepted));
                    if !accepted && !t.replies.is_empty() {
                        // Replies came (across a reconnect, before this ack) for a message
                        // that turns out rejected.
                        problems.push(Problem::UnexpectedFrame);
                    }
                    t.accepted = Some(accepted);
                    let per_type = self.tally.kind(t.kind);
                    per_type.record_ack(latency);
                    if accepted {
                        per_type.accepted += 1;
                        self.tally.accepted += 1;
                    } else {
                        per_type.rejected += 1;
                        self.tally.rejected += 1;
                        effect = Effect::Settled;
                    }
                }
            }
            Observed::Status(MessageStatus::Processing) => {
                t.processing += 1;
                t.processing_here += 1;
                match t.accepted {
                    Some(false) => problems.push(Problem::UnexpectedFrame),
                    // Across a reconnect, the ack of the resend may still be on its way.
                    None if !crossed => problems.push(Problem::OutOfOrder),
                    _ if t.processing_here > 1 => problems.push(Problem::DuplicateStatus),
                    _ if crossed && t.replied_here > 0 => problems.push(Problem::OutOfOrder),
                    // Across a reconnect, the replies that came on the last connection may be
                    // followed by a `processing` on this one, with the rest of them.
                    _ if !t.replies.is_empty() && !crossed => problems.push(Problem::OutOfOrder),
                    _ => {}
                }
            }
            Observed::Status(MessageStatus::Replied) => {
                t.replied += 1;
                t.replied_here += 1;
                match t.accepted {
                    Some(false) => problems.push(Problem::UnexpectedFrame),
                    _ if t.replied_here > 1 => problems.push(Problem::DuplicateStatus),
                    _ if t.replies.len() < t.kind.reply_types().len() => {
                        problems.push(Problem::OutOfOrder)
                    }
                    _ if t.processing == 0 && !crossed => problems.push(Problem::OutOfOrder),
                    _ => {}
                }
            }
            Observed::Status(_) => problems.push(Problem::UnexpectedFrame),
            Observed::Reply {
                reply_id,
                reply_type,
            } => {
                self.tally.replies += 1;
                if !self.reply_ids.insert(reply_id) {
                    problems.push(Problem::DuplicateReply);
                } else if t.accepted == Some(false) {
                    problems.push(Problem::UnexpectedFrame);
                } else {
                    if t.accepted.is_none() {
                        if mode.one_at_a_time() {
                            // A legacy client learns of acceptance from the first reply.
                            problems.extend(judge(t, true));
                            t.accepted = Some(true);
                            let per_type = self.tally.kind(t.kind);
                            per_type.accepted += 1;
                            per_type.record_ack(latency);
                            self.tally.accepted += 1;
                        } else if !crossed {
                            problems.push(Problem::OutOfOrder);
                        }
                        // Across a reconnect the replay comes before the ack of the resend.
                    } else if mode == Mode::Native && t.processing == 0 && !crossed {
                        problems.push(Problem::OutOfOrder);
                    }
                    if mode == Mode::Native && t.replied > 0 {
                        problems.push(Problem::OutOfOrder);
                    }
                    let expected = t.kind.reply_types();
                    let index = t.replies.len();
                    t.replies.push(reply_type);
                    match expected.get(index) {
                        None => problems.push(Problem::UnexpectedFrame),
                        Some(want) if *want != reply_type => problems.push(Problem::WrongReply),
                        Some(_) => {}
                    }
                    if t.replies.len() == expected.len() {
                        self.tally.kind(t.kind).record_reply(latency);
                        self.live.series.replied(at, latency);
                    }
                }
            }
            Observed::Error { code, retry_after }
                if t.accepted.is_none()
                    && !t.settled
                    && (code == ErrorCode::Busy || (resumes && code.is_retryable())) =>
            {
                if code == ErrorCode::Busy {
                    self.tally.busy += 1;
                    Live::add(&self.live.busy, 1);
                }
                *self.tally.retried.entry(code.as_str()).or_default() += 1;
                t.retries += 1;
                let fallback = if resumes {
                    retry_backoff(t.retries)
                } else {
                    DEFAULT_RETRY
                };
                effect = Effect::Resend {
                    key: key.to_owned(),
                    kind: t.kind,
                    after: retry_after.unwrap_or(fallback),
                };
            }
            Observed::Error { code, .. } => {
                problems.push(Problem::Error(code.as_str().to_owned()));
                if !t.settled {
                    // Its fate is known (it failed); free its slot so the run goes on.
                    t.settled = true;
                    failed = true;
                    effect = Effect::Settled;
                }
            }
        }
        let completes = !t.settled
            && match effect {
                Effect::Settled => true,
                Effect::Nothing => is_complete(mode, t),
                Effect::Resend { .. } => false,
            };
        if completes {
            t.settled = true;
            effect = Effect::Settled;
            self.completed(at);
        } else if failed {
            self.one_less(at);
        }
        if is_reply {
            self.wait.reply(at, self.unsettled > 0);
        }
        if effect == Effect::Settled && self.current.as_deref() == Some(key) {
            self.current = None;
        }
        for problem in problems {
            self.problem(problem);
        }
        effect
    }

    /// One message fewer awaits its answers.
    fn one_less(&mut self, at: Instant) {
        self.unsettled -= 1;
        Live::add(&self.live.settled, 1);
        if self.unsettled == 0 {
            self.wait.end(at);
        }
    }

    /// A message got everything it was due.
    fn completed(&mut self, at: Instant) {
        self.one_less(at);
        self.tally.completed += 1;
        self.live.series.completed(at);
        self.tally.last_settle = Some(match self.tally.last_settle {
            Some(last) => last.max(at),
            None => at,
        });
    }

    /// Ends the accounting: whatever is still unsettled is lost, by what it lacks.
    pub fn finish(mut self) -> Tally {
        let mut lost = Vec::new();
        for t in self.messages.values().filter(|t| !t.settled) {
            let replies_due = t.kind.reply_types().len();
            lost.push(match t.accepted {
                None if self.resumes => Problem::Unacked,
                None => Problem::LostAck,
                Some(_) if t.replies.len() < replies_due => Problem::LostReply,
                Some(_) => Problem::LostStatus,
            });
        }
        for problem in lost {
            self.problem(problem);
        }
        let missing = self.stream.missing();
        Live::add(&self.live.problems, missing);
        self.tally.problems_of(Problem::SeqGap, missing);
        self.wait.end(Instant::now());
        self.tally.longest_wait = self.wait.longest();
        self.tally.still_sending = self.tally.sending_done.is_none();
        self.tally
    }
}

/// Whether an accepted message has every frame it is due.
fn is_complete(mode: Mode, t: &Tracked) -> bool {
    if t.accepted != Some(true) || t.replies.len() < t.kind.reply_types().len() {
        return false;
    }
    match mode {
        Mode::Native => t.processing > 0 && t.replied > 0,
        Mode::Legacy | Mode::Path | Mode::Echo => true,
    }
}

/// The wait before the `retries`th resend of a message after a retryable error that names
/// no time.
fn retry_backoff(retries: u32) -> Duration {
    RETRY_MIN
        .saturating_mul(1 << retries.saturating_sub(1).min(16))
        .min(RETRY_MAX)
}

/// The window verdict, checked against what the tool predicted at send.
fn judge(t: &Tracked, accepted: bool) -> Option<Problem> {
    match (t.expectation, accepted) {
        (Expectation::Reject, true) => Some(Problem::AcceptedOutsideWindow),
        (Expectation::Accept, false) => Some(Problem::RejectedInsideWindow),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ledger(mode: Mode) -> Ledger {
        Ledger::new(mode, Arc::new(Live::default()))
    }

    fn send(ledger: &mut Ledger, key: &str, kind: MessageType, expectation: Expectation) {
        ledger.sent(Sent {
            key: key.into(),
            kind,
            expectation,
            scheduled: Instant::now(),
        });
    }

    fn ack(status: MessageStatus) -> Observed {
        Observed::Ack {
            status,
            duplicate: false,
            message_id: 1,
        }
    }

    fn reply(reply_id: i64, reply_type: ReplyType) -> Observed {
        Observed::Reply {
            reply_id,
            reply_type,
        }
    }

    /// Feeds a message's whole native answer: ack, processing, its reply set, replied.
    fn answer(ledger: &mut Ledger, key: &str, kind: MessageType, first_reply_id: i64) -> Effect {
        let now = Instant::now();
        let mut last = ledger.observe(Some(key), ack(MessageStatus::Accepted), now);
        assert_eq!(last, Effect::Nothing);
        ledger.observe(Some(key), Observed::Status(MessageStatus::Processing), now);
        for (offset, reply_type) in kind.reply_types().iter().enumerate() {
            last = ledger.observe(
                Some(key),
                reply(first_reply_id + offset as i64, *reply_type),
                now,
            );
        }
        if last == Effect::Nothing {
            last = ledger.observe(Some(key), Observed::Status(MessageStatus::Replied), now);
        }
        last
    }

    fn problems(tally: &Tally) -> Vec<(String, u64)> {
        tally
            .problems
            .iter()
            .map(|(problem, count)| (problem.to_string(), *count))
            .collect()
    }

    #[test]
    fn each_message_type_is_complete_with_exactly_its_reply_set() {
        let mut ledger = ledger(Mode::Native);
        for (n, kind) in MessageType::ALL.into_iter().enumerate() {
            let key = format!("m{n}");
            send(&mut ledger, &key, kind, Expectation::Accept);
            assert_eq!(
                answer(&mut ledger, &key, kind, n as i64 * 10),
                Effect::Settled
            );
        }
        assert_eq!(ledger.unsettled(), 0);
        let tally = ledger.finish();
        assert_eq!(problems(&tally), vec![]);
        assert_eq!(tally.completed, 4);
        assert_eq!(tally.replies, 1 + 2 + 3 + 3);
        assert_eq!(
            tally.by_type["video"].reply.as_ref().map(|h| h.len()),
            Some(1)
        );
    }

    #[test]
    fn a_message_waits_for_replied_after_its_last_reply() {
        let mut ledger = ledger(Mode::Native);
        send(&mut ledger, "v", MessageType::Voice, Expectation::Accept);
        let now = Instant::now();
        ledger.observe(Some("v"), ack(MessageStatus::Accepted), now);
        ledger.observe(Some("v"), Observed::Status(MessageStatus::Processing), now);
        ledger.observe(Some("v"), reply(1, ReplyType::Text), now);
        assert_eq!(
            ledger.observe(Some("v"), reply(2, ReplyType::Voice), now),
            Effect::Nothing
        );
        assert_eq!(
            ledger.observe(Some("v"), Observed::Status(MessageStatus::Replied), now),
            Effect::Settled
        );
    }

    #[test]
    fn a_message_without_an_ack_is_lost() {
        let mut ledger = ledger(Mode::Native);
        send(&mut ledger, "m1", MessageType::Text, Expectation::Accept);
        assert_eq!(problems(&ledger.finish()), vec![("lost_ack".into(), 1)]);
    }

    #[test]
    fn an_accepted_message_missing_replies_is_lost() {
        let mut ledger = ledger(Mode::Native);
        send(&mut ledger, "m1", MessageType::Video, Expectation::Accept);
        let now = Instant::now();
        ledger.observe(Some("m1"), ack(MessageStatus::Accepted), now);
        ledger.observe(Some("m1"), Observed::Status(MessageStatus::Processing), now);
        ledger.observe(Some("m1"), reply(1, ReplyType::Text), now);
        ledger.observe(Some("m1"), reply(2, ReplyType::Voice), now);
        let tally = ledger.finish();
        assert_eq!(problems(&tally), vec![("lost_reply".into(), 1)]);
        assert_eq!(tally.lost(), 1);
    }

    #[test]
    fn replies_without_the_replied_status_count_as_a_lost_status() {
        let mut ledger = ledger(Mode::Native);
        send(&mut ledger, "m1", MessageType::Text, Expectation::Accept);
        let now = Instant::now();
        ledger.observe(Some("m1"), ack(MessageStatus::Accepted), now);
        ledger.observe(Some("m1"), Observed::Status(MessageStatus::Processing), now);
        ledger.observe(Some("m1"), reply(1, ReplyType::Text), now);
        assert_eq!(problems(&ledger.finish()), vec![("lost_status".into(), 1)]);
    }

    #[test]
    fn a_rejected_message_is_settled_by_its_ack_and_gets_nothing_more() {
        let mut ledger = ledger(Mode::Native);
        send(&mut ledger, "m1", MessageType::Voice, Expectation::Reject);
        let now = Instant::now();
        assert_eq!(
            ledger.observe(Some("m1"), ack(MessageStatus::Rejected), now),
            Effect::Settled
        );
        ledger.observe(Some("m1"), reply(7, ReplyType::Text), now);
        let tally = ledger.finish();
        assert_eq!(tally.rejected, 1);
        assert_eq!(problems(&tally), vec![("unexpected_frame".into(), 1)]);
    }

    #[test]
    fn verdicts_against_the_window_are_checked_but_edges_may_go_either_way() {
        let mut ledger = ledger(Mode::Native);
        send(&mut ledger, "in", MessageType::Voice, Expectation::Accept);
        send(&mut ledger, "out", MessageType::Video, Expectation::Reject);
        send(&mut ledger, "edge", MessageType::Text, Expectation::Either);
        let now = Instant::now();
        ledger.observe(Some("in"), ack(MessageStatus::Rejected), now);
        answer(&mut ledger, "out", MessageType::Video, 1);
        ledger.observe(Some("edge"), ack(MessageStatus::Rejected), now);
        let tally = ledger.finish();
        assert_eq!(
            problems(&tally),
            vec![
                ("accepted_outside_window".into(), 1),
                ("rejected_inside_window".into(), 1)
            ]
        );
        assert_eq!(tally.by_type["text"].edge, 1);
    }

    #[test]
    fn a_second_ack_or_the_same_reply_twice_is_a_duplicate() {
        let mut ledger = ledger(Mode::Native);
        send(&mut ledger, "m1", MessageType::Text, Expectation::Accept);
        answer(&mut ledger, "m1", MessageType::Text, 1);
        let now = Instant::now();
        ledger.observe(Some("m1"), ack(MessageStatus::Accepted), now);
        ledger.observe(Some("m1"), reply(1, ReplyType::Text), now);
        ledger.observe(Some("m1"), Observed::Status(MessageStatus::Replied), now);
        assert_eq!(
            problems(&ledger.finish()),
            vec![
                ("duplicate_ack".into(), 1),
                ("duplicate_reply".into(), 1),
                ("duplicate_status".into(), 1)
            ]
        );
    }

    #[test]
    fn frames_for_unknown_messages_or_of_the_wrong_type_are_reported() {
        let mut ledger = ledger(Mode::Native);
        send(&mut ledger, "m1", MessageType::Voice, Expectation::Accept);
        let now = Instant::now();
        ledger.observe(Some("nobody"), ack(MessageStatus::Accepted), now);
        ledger.observe(None, Observed::Status(MessageStatus::Processing), now);
        ledger.observe(Some("m1"), ack(MessageStatus::Accepted), now);
        ledger.observe(Some("m1"), Observed::Status(MessageStatus::Processing), now);
        ledger.observe(Some("m1"), reply(1, ReplyType::Text), now);
        ledger.observe(Some("m1"), reply(2, ReplyType::Image), now);
        ledger.observe(Some("m1"), Observed::Status(MessageStatus::Replied), now);
        let tally = ledger.finish();
        assert_eq!(
            problems(&tally),
            vec![("unexpected_frame".into(), 2), ("wrong_reply".into(), 1)]
        );
        assert_eq!(tally.lost(), 0);
    }

    #[test]
    fn a_reply_before_the_ack_is_out_of_order() {
        let mut ledger = ledger(Mode::Native);
        send(&mut ledger, "m1", MessageType::Text, Expectation::Accept);
        let now = Instant::now();
        ledger.observe(Some("m1"), reply(1, ReplyType::Text), now);
        ledger.observe(Some("m1"), ack(MessageStatus::Accepted), now);
        let tally = ledger.finish();
        assert!(tally.problems.contains_key(&Problem::OutOfOrder));
    }

    #[test]
    fn busy_asks_for_a_resend_and_the_resend_is_not_a_new_message() {
        let mut ledger = ledger(Mode::Native);
        send(&mut ledger, "m1", MessageType::Image, Expectation::Accept);
        let effect = ledger.observe(
            Some("m1"),
            Observed::Error {
                code: ErrorCode::Busy,
                retry_after: Some(Duration::from_millis(250)),
            },
            Instant::now(),
        );
        assert_eq!(
            effect,
            Effect::Resend {
                key: "m1".into(),
                kind: MessageType::Image,
                after: Duration::from_millis(250)
            }
        );
        send(&mut ledger, "m1", MessageType::Image, Expectation::Accept);
        assert_eq!(
            answer(&mut ledger, "m1", MessageType::Image, 1),
            Effect::Settled
        );
        let tally = ledger.finish();
        assert_eq!((tally.sent, tally.resent, tally.busy), (1, 1, 1));
        assert_eq!(problems(&tally), vec![]);
    }

    #[test]
    fn other_errors_settle_the_message_as_wrong() {
        let mut ledger = ledger(Mode::Native);
        send(&mut ledger, "m1", MessageType::Image, Expectation::Accept);
        let effect = ledger.observe(
            Some("m1"),
            Observed::Error {
                code: ErrorCode::MediaMismatch,
                retry_after: None,
            },
            Instant::now(),
        );
        assert_eq!(effect, Effect::Settled);
        let tally = ledger.finish();
        assert_eq!(problems(&tally), vec![("error:media_mismatch".into(), 1)]);
        assert_eq!(tally.completed, 0);
    }

    #[test]
    fn delta_frames_are_counted_and_never_a_problem() {
        let mut ledger = ledger(Mode::Native);
        send(&mut ledger, "m1", MessageType::Text, Expectation::Accept);
        let now = Instant::now();
        ledger.observe(Some("m1"), ack(MessageStatus::Accepted), now);
        ledger.observe(Some("m1"), Observed::Status(MessageStatus::Processing), now);
        ledger.observe(Some("m1"), Observed::Delta, now);
        ledger.observe(Some("somebody-else"), Observed::Delta, now);
        ledger.observe(Some("m1"), reply(1, ReplyType::Text), now);
        ledger.observe(Some("m1"), Observed::Status(MessageStatus::Replied), now);
        let tally = ledger.finish();
        assert_eq!(tally.deltas, 2);
        assert_eq!(problems(&tally), vec![]);
    }

    #[test]
    fn legacy_replies_find_their_message_without_acks_or_statuses() {
        let mut ledger = ledger(Mode::Legacy);
        let now = Instant::now();
        send(&mut ledger, "m1", MessageType::Voice, Expectation::Accept);
        ledger.observe_legacy(Some(10), reply(1, ReplyType::Text), now);
        assert_eq!(
            ledger.observe_legacy(Some(10), reply(2, ReplyType::Voice), now),
            Effect::Settled
        );
        send(&mut ledger, "m2", MessageType::Video, Expectation::Reject);
        let rejection = Observed::Ack {
            status: MessageStatus::Rejected,
            duplicate: false,
            message_id: 11,
        };
        assert_eq!(
            ledger.observe_legacy(Some(11), rejection, now),
            Effect::Settled
        );
        // A late copy of the first message's reply is found by its stored id.
        ledger.observe_legacy(Some(10), reply(2, ReplyType::Voice), now);
        // Nothing outstanding: a frame with an unknown id answers nothing.
        ledger.observe_legacy(Some(99), reply(3, ReplyType::Text), now);
        let tally = ledger.finish();
        assert_eq!((tally.accepted, tally.rejected, tally.completed), (1, 1, 2));
        assert_eq!(
            problems(&tally),
            vec![
                ("duplicate_reply".into(), 1),
                ("unexpected_frame".into(), 1)
            ]
        );
    }

    /// Feeds reply `seq`s as a connection delivered them and returns what the stream made of
    /// them, and where it stands.
    fn stream_of(seqs: &[u64]) -> (Vec<(String, u64)>, u64) {
        let mut ledger = ledger(Mode::Native);
        for &seq in seqs {
            ledger.reply_seq(seq);
        }
        let position = ledger.stream_position();
        (problems(&ledger.finish()), position)
    }

    #[test]
    fn replies_in_seq_order_from_one_are_no_problem() {
        assert_eq!(stream_of(&[1, 2, 3, 4]), (vec![], 4));
        assert_eq!(stream_of(&[]), (vec![], 0));
    }

    #[test]
    fn a_gap_in_the_stream_counts_every_seq_that_never_came() {
        assert_eq!(stream_of(&[1, 2, 5, 6]), (vec![("seq_gap".into(), 2)], 6));
        assert_eq!(
            stream_of(&[2, 3, 4]),
            (vec![("seq_gap".into(), 1)], 4),
            "a fresh client's stream starts at 1"
        );
        assert_eq!(stream_of(&[1, 3, 5]), (vec![("seq_gap".into(), 2)], 5));
    }

    #[test]
    fn a_seq_delivered_twice_is_a_repeat() {
        assert_eq!(
            stream_of(&[1, 2, 2, 3]),
            (vec![("seq_repeat".into(), 1)], 3)
        );
        assert_eq!(
            stream_of(&[1, 2, 3, 1]),
            (vec![("seq_repeat".into(), 1)], 3),
            "an old seq already delivered"
        );
    }

    #[test]
    fn a_skipped_seq_that_comes_late_is_out_of_order_not_a_gap() {
        assert_eq!(
            stream_of(&[1, 3, 2, 4]),
            (vec![("seq_out_of_order".into(), 1)], 4)
        );
        // Two of a run of four skipped come late, one of them twice; the other two never come.
        assert_eq!(
            stream_of(&[1, 6, 3, 4, 3, 7]),
            (
                vec![
                    ("seq_gap".into(), 2),
                    ("seq_repeat".into(), 1),
                    ("seq_out_of_order".into(), 2)
                ],
                7
            )
        );
    }

    #[test]
    fn echo_clients_acknowledge_one_position_per_frame_echoed() {
        let mut ledger = ledger(Mode::Echo);
        send(&mut ledger, "m1", MessageType::Text, Expectation::Accept);
        send(&mut ledger, "m2", MessageType::Text, Expectation::Accept);
        let now = Instant::now();
        ledger.observe(Some("m1"), Observed::Echo, now);
        ledger.observe(Some("m2"), Observed::Echo, now);
        assert_eq!(ledger.stream_position(), 2);
    }

    #[test]
    fn an_echo_settles_its_message_once() {
        let mut ledger = ledger(Mode::Echo);
        send(&mut ledger, "m1", MessageType::Text, Expectation::Accept);
        let now = Instant::now();
        assert_eq!(
            ledger.observe(Some("m1"), Observed::Echo, now),
            Effect::Settled
        );
        ledger.observe(Some("m1"), Observed::Echo, now);
        let tally = ledger.finish();
        assert_eq!(tally.completed, 1);
        assert_eq!(problems(&tally), vec![("duplicate_reply".into(), 1)]);
    }

    fn resuming() -> Ledger {
        ledger(Mode::Native).resuming()
    }

    fn status(status: MessageStatus) -> Observed {
        Observed::Status(status)
    }

    fn duplicate_ack(status: MessageStatus) -> Observed {
        Observed::Ack {
            status,
            duplicate: true,
            message_id: 1,
        }
    }

    /// A reply frame as the reader hands it over: its `seq` first.
    fn reply_at(ledger: &mut Ledger, key: &str, seq: u64, reply_type: ReplyType) -> Effect {
        ledger.reply_seq(seq);
        ledger.observe(
            Some(key),
            reply(i64::try_from(seq).expect("small"), reply_type),
            Instant::now(),
        )
    }

    #[test]
    fn a_message_whose_replies_span_a_reconnect_settles_with_the_statuses_of_the_next_connection() {
        let mut ledger = resuming();
        let now = Instant::now();
        send(&mut ledger, "v", MessageType::Voice, Expectation::Accept);
        ledger.observe(Some("v"), ack(MessageStatus::Accepted), now);
        ledger.observe(Some("v"), status(MessageStatus::Processing), now);
        reply_at(&mut ledger, "v", 1, ReplyType::Text);
        assert_eq!(ledger.reconnected(now), Reconnected::default());
        assert!(ledger.replaying());
        // The replay: the voice reply between the message's statuses, again on this connection.
        ledger.observe(Some("v"), status(MessageStatus::Processing), now);
        assert_eq!(
            reply_at(&mut ledger, "v", 2, ReplyType::Voice),
            Effect::Nothing
        );
        assert_eq!(
            ledger.observe(Some("v"), status(MessageStatus::Replied), now),
            Effect::Settled
        );
        ledger.synced();
        assert!(!ledger.replaying());
        let tally = ledger.finish();
        assert_eq!(problems(&tally), vec![]);
        assert_eq!(
            (tally.completed, tally.replies, tally.reconnects),
            (1, 2, 1)
        );
    }

    #[test]
    fn an_unacked_message_is_sent_again_and_the_duplicate_ack_of_the_resend_is_its_ack() {
        let mut ledger = resuming();
        let now = Instant::now();
        for key in ["m0", "m1", "m2", "m3"] {
            send(&mut ledger, key, MessageType::Text, Expectation::Accept);
        }
        answer(&mut ledger, "m1", MessageType::Text, 10);
        ledger.observe(Some("m0"), ack(MessageStatus::Accepted), now);
        let reconnected = ledger.reconnected(now);
        assert_eq!(
            reconnected.resend,
            [
                ("m2".to_owned(), MessageType::Text),
                ("m3".to_owned(), MessageType::Text)
            ],
            "only the unacked ones, in the order they were sent"
        );
        send(&mut ledger, "m2", MessageType::Text, Expectation::Accept);
        send(&mut ledger, "m3", MessageType::Text, Expectation::Accept);
        // m2 was stored before the cut: its reply is replayed, with its statuses, before the
        // duplicate ack.
        ledger.observe(Some("m2"), status(MessageStatus::Processing), now);
        reply_at(&mut ledger, "m2", 1, ReplyType::Text);
        ledger.observe(Some("m2"), status(MessageStatus::Replied), now);
        assert_eq!(
            ledger.observe(Some("m2"), duplicate_ack(MessageStatus::Replied), now),
            Effect::Settled
        );
        // m3 never reached the server: a fresh ack and the whole answer.
        answer(&mut ledger, "m3", MessageType::Text, 20);
        // m0 was acked before the cut: it is never sent again, its reply comes live.
        ledger.observe(Some("m0"), status(MessageStatus::Processing), now);
        reply_at(&mut ledger, "m0", 2, ReplyType::Text);
        ledger.observe(Some("m0"), status(MessageStatus::Replied), now);
        assert_eq!(ledger.unsettled(), 0);
        let tally = ledger.finish();
        assert_eq!(problems(&tally), vec![]);
        assert_eq!(
            (tally.sent, tally.resent, tally.resent_after_reconnect),
            (4, 2, 2)
        );
        assert_eq!((tally.accepted, tally.completed), (4, 4));
    }

    #[test]
    fn a_duplicate_ack_nobody_resent_or_a_second_ack_of_a_resend_is_still_a_duplicate() {
        let mut ledger = resuming();
        let now = Instant::now();
        send(&mut ledger, "m1", MessageType::Text, Expectation::Accept);
        send(&mut ledger, "m2", MessageType::Text, Expectation::Accept);
        ledger.observe(Some("m1"), duplicate_ack(MessageStatus::Accepted), now);
        ledger.reconnected(now);
        send(&mut ledger, "m2", MessageType::Text, Expectation::Accept);
        ledger.observe(Some("m2"), duplicate_ack(MessageStatus::Accepted), now);
        ledger.observe(Some("m2"), duplicate_ack(MessageStatus::Accepted), now);
        // m1's ack never came (a duplicate one answers no send of it); m2's did, its reply not.
        assert_eq!(
            problems(&ledger.finish()),
            vec![
                ("unacked".into(), 1),
                ("lost_reply".into(), 1),
                ("duplicate_ack".into(), 2)
            ]
        );
    }

    #[test]
    fn a_reply_replayed_again_or_a_status_twice_on_one_connection_is_still_a_duplicate() {
        let mut ledger = resuming();
        let now = Instant::now();
        send(&mut ledger, "v", MessageType::Voice, Expectation::Accept);
        ledger.observe(Some("v"), ack(MessageStatus::Accepted), now);
        ledger.observe(Some("v"), status(MessageStatus::Processing), now);
        reply_at(&mut ledger, "v", 1, ReplyType::Text);
        ledger.reconnected(now);
        // Once more per connection is how the server sends statuses; twice on one is not.
        ledger.observe(Some("v"), status(MessageStatus::Processing), now);
        ledger.observe(Some("v"), status(MessageStatus::Processing), now);
        // The replay starts one too early: the text reply again, same seq.
        reply_at(&mut ledger, "v", 1, ReplyType::Text);
        reply_at(&mut ledger, "v", 2, ReplyType::Voice);
        ledger.observe(Some("v"), status(MessageStatus::Replied), now);
        let tally = ledger.finish();
        assert_eq!(
            problems(&tally),
            vec![
                ("duplicate_reply".into(), 1),
                ("duplicate_status".into(), 1),
                ("seq_repeat".into(), 1)
            ]
        );
        assert_eq!(tally.completed, 1);
    }

    #[test]
    fn a_replied_cut_off_by_a_reconnect_is_still_due_and_comes_on_the_next_connection() {
        let mut ledger = resuming();
        let now = Instant::now();
        send(&mut ledger, "m1", MessageType::Text, Expectation::Accept);
        ledger.observe(Some("m1"), ack(MessageStatus::Accepted), now);
        ledger.observe(Some("m1"), status(MessageStatus::Processing), now);
        reply_at(&mut ledger, "m1", 1, ReplyType::Text);
        let reconnected = ledger.reconnected(now);
        assert!(reconnected.resend.is_empty());
        assert_eq!(ledger.unsettled(), 1, "`replied` is still due");
        // The replay after seq 1 starts with it.
        assert_eq!(
            ledger.observe(Some("m1"), status(MessageStatus::Replied), now),
            Effect::Settled
        );
        assert_eq!(problems(&ledger.finish()), vec![]);
    }

    #[test]
    fn with_reconnects_an_acked_message_short_of_replies_is_lost_and_an_unacked_one_is_not() {
        let mut ledger = resuming();
        let now = Instant::now();
        send(&mut ledger, "m1", MessageType::Text, Expectation::Accept);
        send(&mut ledger, "m2", MessageType::Text, Expectation::Accept);
        ledger.observe(Some("m1"), ack(MessageStatus::Accepted), now);
        ledger.reconnected(now);
        let tally = ledger.finish();
        assert_eq!(
            problems(&tally),
            vec![("unacked".into(), 1), ("lost_reply".into(), 1)]
        );
        assert_eq!(tally.lost(), 1);
    }

    #[test]
    fn a_replay_nobody_asked_for_is_unexpected_and_ends_at_synced() {
        let mut ledger = resuming();
        assert!(!ledger.replaying());
        ledger.synced();
        ledger.reconnected(Instant::now());
        ledger.synced();
        ledger.synced();
        assert_eq!(
            problems(&ledger.finish()),
            vec![("unexpected_frame".into(), 2)]
        );
    }

    #[test]
    fn retryable_errors_are_sent_again_with_backoff_only_when_resuming() {
        let unavailable = Observed::Error {
            code: ErrorCode::Unavailable,
            retry_after: None,
        };
        let mut resumed = resuming();
        let now = Instant::now();
        send(&mut resumed, "m1", MessageType::Text, Expectation::Accept);
        let mut waits = Vec::new();
        for _ in 0..3 {
            match resumed.observe(Some("m1"), unavailable, now) {
                Effect::Resend { after, .. } => waits.push(after.as_millis()),
                other => panic!("{other:?}"),
            }
            send(&mut resumed, "m1", MessageType::Text, Expectation::Accept);
        }
        assert_eq!(waits, [100, 200, 400]);
        answer(&mut resumed, "m1", MessageType::Text, 1);
        let tally = resumed.finish();
        assert_eq!(problems(&tally), vec![]);
        assert_eq!(tally.retried.get("unavailable"), Some(&3));
        assert_eq!((tally.resent, tally.resent_after_reconnect), (3, 0));

        let mut strict = ledger(Mode::Native);
        send(&mut strict, "m1", MessageType::Text, Expectation::Accept);
        assert_eq!(
            strict.observe(Some("m1"), unavailable, now),
            Effect::Settled
        );
        assert_eq!(
            problems(&strict.finish()),
            vec![("error:unavailable".into(), 1)]
        );
    }

    #[test]
    fn the_longest_wait_runs_between_replies_while_something_is_due() {
        let mut ledger = ledger(Mode::Native);
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        ledger.sent(Sent {
            key: "m1".into(),
            kind: MessageType::Voice,
            expectation: Expectation::Accept,
            scheduled: at(0),
        });
        ledger.observe(Some("m1"), ack(MessageStatus::Accepted), at(5));
        ledger.observe(Some("m1"), status(MessageStatus::Processing), at(10));
        ledger.observe(Some("m1"), reply(1, ReplyType::Text), at(300));
        ledger.observe(Some("m1"), reply(2, ReplyType::Voice), at(1_000));
        ledger.observe(Some("m1"), status(MessageStatus::Replied), at(1_001));
        let tally = ledger.finish();
        assert_eq!(tally.longest_wait, Duration::from_millis(700));
    }
}
