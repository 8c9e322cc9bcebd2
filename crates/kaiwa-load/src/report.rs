//! What a run found: the counters and latency histograms each client fills ([`Tally`]), the live
//! counters behind the progress bar ([`Live`]), and the final [`Summary`] as a table and as JSON.

use crate::gaps::Timeline;
use crate::latency::{add_into, record_into};
use crate::series::Series;
use hdrhistogram::Histogram;
use kaiwa_protocol::{CloseCode, MessageType};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Something wrong that a run found. Any of them fails the run.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Problem {
    /// A message never got its ack (native) or any answer (legacy, echo).
    LostAck,
    /// With `--reconnect`: a message whose ack never came, though it was sent again on every
    /// new connection. Whether the server has it is unknown, so it is not counted as lost; it
    /// still fails the run.
    Unacked,
    /// An accepted message is missing some of its replies.
    LostReply,
    /// An accepted message got its replies but not its `processing` or `replied` status.
    LostStatus,
    DuplicateAck,
    DuplicateReply,
    DuplicateStatus,
    /// A frame for no message the client sent, or one a message should not get (a reply to a
    /// rejected message, a reply beyond the expected set, a welcome mid-session).
    UnexpectedFrame,
    /// A frame that is not one of the protocol's.
    MalformedFrame,
    /// A reply of the wrong type for its place in the reply set.
    WrongReply,
    /// Frames of one message in the wrong order (a reply before the ack, `replied` too early).
    OutOfOrder,
    /// Replies a connection's stream skipped: their `seq` never arrived, though later ones did.
    /// Counted once per missing `seq`.
    SeqGap,
    /// A reply whose `seq` the connection had already delivered.
    SeqRepeat,
    /// A reply whose `seq` had been skipped arrived after a later one: the stream was out of
    /// order, not short.
    SeqOutOfOrder,
    /// Accepted although its window says it must be rejected.
    AcceptedOutsideWindow,
    /// Rejected although its window says it must be accepted.
    RejectedInsideWindow,
    /// An error frame (other than `busy`, which is retried), by code.
    Error(String),
    /// The server closed a connection the client did not want closed, by close code.
    Closed(u16),
    /// The client could not connect or complete its handshake.
    ConnectFailed,
    /// The run ended before a client got a slot and sent its first message (R16).
    NoTurn,
}

impl Problem {
    /// Whether this problem means messages went missing.
    pub fn is_loss(&self) -> bool {
        matches!(self, Self::LostAck | Self::LostReply | Self::LostStatus)
    }

    /// Whether this problem means something came twice.
    pub fn is_duplicate(&self) -> bool {
        matches!(
            self,
            Self::DuplicateAck | Self::DuplicateReply | Self::DuplicateStatus | Self::SeqRepeat
        )
    }

    /// Whether this problem means frames came in the wrong order.
    pub fn is_out_of_order(&self) -> bool {
        matches!(self, Self::OutOfOrder | Self::SeqOutOfOrder)
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Self::LostAck => "lost_ack",
            Self::Unacked => "unacked",
            Self::LostReply => "lost_reply",
            Self::LostStatus => "lost_status",
            Self::DuplicateAck => "duplicate_ack",
            Self::DuplicateReply => "duplicate_reply",
            Self::DuplicateStatus => "duplicate_status",
            Self::UnexpectedFrame => "unexpected_frame",
            Self::MalformedFrame => "malformed_frame",
            Self::WrongReply => "wrong_reply",
            Self::OutOfOrder => "out_of_order",
            Self::SeqGap => "seq_gap",
            Self::SeqRepeat => "seq_repeat",
            Self::SeqOutOfOrder => "seq_out_of_order",
            Self::AcceptedOutsideWindow => "accepted_outside_window",
            Self::RejectedInsideWindow => "rejected_inside_window",
            Self::Error(code) => return write!(f, "error:{code}"),
            Self::Closed(code) => return write!(f, "closed:{}", close_label(*code)),
            Self::ConnectFailed => "connect_failed",
            Self::NoTurn => "no_turn",
        };
        f.write_str(name)
    }
}

/// A close code with its name when it has one (`4509 duplicate_connection`), so a report reads
/// without the protocol's table at hand, whatever the numbering of the day.
pub fn close_label(code: u16) -> String {
    let name = match CloseCode::from_code(code) {
        Some(close) => Some(close.name()),
        // What the tool records for a connection that ended without a close frame, or with one
        // that carried no code.
        None if code == 1006 => Some("abnormal_closure"),
        None if code == 1005 => Some("no_status"),
        None => None,
    };
    match name {
        Some(name) => format!("{code} {name}"),
        None => code.to_string(),
    }
}

/// Counters the progress bar reads while clients run.
#[derive(Debug, Default)]
pub struct Live {
    pub sent: AtomicU64,
    pub settled: AtomicU64,
    pub problems: AtomicU64,
    pub busy: AtomicU64,
    pub refusals: AtomicU64,
    pub connected: AtomicU64,
    pub concurrent: AtomicU64,
    pub max_concurrent: AtomicU64,
    /// When any client saw a reply, for the run's longest silence.
    pub replies: Timeline,
    pub reconnects: AtomicU64,
    /// The run second by second, for `--plot`.
    pub series: Series,
}

impl Live {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub fn connection_opened(&self) {
        Self::add(&self.connected, 1);
        let now = self.concurrent.fetch_add(1, Ordering::Relaxed) + 1;
        self.max_concurrent.fetch_max(now, Ordering::Relaxed);
    }

    pub fn connection_closed(&self) {
        self.concurrent.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counters and latencies of one message type.
#[derive(Debug, Clone, Default)]
pub struct TypeTally {
    pub sent: u64,
    pub accepted: u64,
    pub rejected: u64,
    /// Sent within the edge margin of a window, so either answer was right.
    pub edge: u64,
    /// From the (scheduled) send to the ack; for legacy clients, which get no ack, to the
    /// first answer.
    pub ack: Option<Histogram<u32>>,
    /// From the (scheduled) send to the last reply.
    pub reply: Option<Histogram<u32>>,
}

impl TypeTally {
    pub fn record_ack(&mut self, latency: Duration) {
        record_into(&mut self.ack, latency);
    }

    pub fn record_reply(&mut self, latency: Duration) {
        record_into(&mut self.reply, latency);
    }

    fn merge(&mut self, other: &TypeTally) {
        self.sent += other.sent;
        self.accepted += other.accepted;
        self.rejected += other.rejected;
        self.edge += other.edge;
        for (mine, theirs) in [(&mut self.ack, &other.ack), (&mut self.reply, &other.reply)] {
            if let Some(theirs) = theirs {
                add_into(mine, theirs);
            }
        }
    }
}

/// What one client (or a whole run, once merged) counted.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    /// Messages sent, each counted once however often it was resent.
    pub sent: u64,
    /// Sends again of a message already sent: after `busy` (or, with `--reconnect`, another
    /// retryable error), and after a reconnect.
    pub resent: u64,
    pub busy: u64,
    /// With `--reconnect`: connections made again after one ended under the client.
    pub reconnects: u64,
    /// Replies that came through the replay a reconnect asked for (`missed: true`).
    pub replayed: u64,
    /// Messages sent again on a new connection because their ack had not come (each time).
    pub resent_after_reconnect: u64,
    /// Error frames the client answered by sending the message again, by code (`busy` too).
    pub retried: BTreeMap<&'static str, u64>,
    /// The client's longest wait for a reply while it had a message awaiting one.
    pub longest_wait: Duration,
    /// When the client had sent every message it was going to (resends aside); merged, the
    /// last of them.
    pub sending_done: Option<Instant>,
    /// A client (any, once merged) never got to its last new message: the run stopped first.
    pub still_sending: bool,
    pub accepted: u64,
    pub rejected: u64,
    /// Messages whose every expected frame arrived (accepted and replied, or rejected).
    pub completed: u64,
    pub replies: u64,
    pub deltas: u64,
    /// `received` frames sent: how often the client acknowledged its reply stream.
    pub acknowledgements: u64,
    /// Connection attempts the server closed with a code that says come back (1013 when it is
    /// full), by code.
    pub refusals: BTreeMap<u16, u64>,
    pub connected: u64,
    pub clients: u64,
    /// Clients that sent at least one message.
    pub clients_sent: u64,
    pub by_type: BTreeMap<&'static str, TypeTally>,
    pub problems: BTreeMap<Problem, u64>,
    pub first_send: Option<Instant>,
    pub last_settle: Option<Instant>,
}

impl Tally {
    pub fn problem(&mut self, problem: Problem) {
        self.problems_of(problem, 1);
    }

    pub fn problems_of(&mut self, problem: Problem, count: u64) {
        if count > 0 {
            *self.problems.entry(problem).or_default() += count;
        }
    }

    pub fn refused(&mut self, code: u16) {
        *self.refusals.entry(code).or_default() += 1;
    }

    pub fn refusal_count(&self) -> u64 {
        self.refusals.values().sum()
    }

    pub fn kind(&mut self, kind: MessageType) -> &mut TypeTally {
        self.by_type.entry(kind.as_str()).or_default()
    }

    pub fn merge(&mut self, other: &Tally) {
        self.sent += other.sent;
        self.resent += other.resent;
        self.busy += other.busy;
        self.reconnects += other.reconnects;
        self.replayed += other.replayed;
        self.resent_after_reconnect += other.resent_after_reconnect;
        for (code, count) in &other.retried {
            *self.retried.entry(code).or_default() += count;
        }
        self.longest_wait = self.longest_wait.max(other.longest_wait);
        self.sending_done = self.sending_done.max(other.sending_done);
        self.still_sending |= other.still_sending;
        self.accepted += other.accepted;
        self.rejected += other.rejected;
        self.completed += other.completed;
        self.replies += other.replies;
        self.deltas += other.deltas;
        self.acknowledgements += other.acknowledgements;
        for (code, count) in &other.refusals {
            *self.refusals.entry(*code).or_default() += count;
        }
        self.connected += other.connected;
        self.clients += other.clients;
        self.clients_sent += other.clients_sent;
        for (kind, tally) in &other.by_type {
            self.by_type.entry(kind).or_default().merge(tally);
        }
        for (problem, count) in &other.problems {
            *self.problems.entry(problem.clone()).or_default() += count;
        }
        self.first_send = match (self.first_send, other.first_send) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.last_settle = match (self.last_settle, other.last_settle) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }

    pub fn problem_count(&self) -> u64 {
        self.problems.values().sum()
    }

    pub fn lost(&self) -> u64 {
        self.problems_where(Problem::is_loss)
    }

    fn problems_where(&self, which: impl Fn(&Problem) -> bool) -> u64 {
        self.problems
            .iter()
            .filter(|(problem, _)| which(problem))
            .map(|(_, count)| count)
            .sum()
    }
}

/// Latency quantiles in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Quantiles {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Quantiles {
    fn of(histogram: &Histogram<u32>) -> Self {
        let ms = |micros: u64| micros as f64 / 1000.0;
        Self {
            count: histogram.len(),
            p50: ms(histogram.value_at_quantile(0.50)),
            p90: ms(histogram.value_at_quantile(0.90)),
            p99: ms(histogram.value_at_quantile(0.99)),
            p999: ms(histogram.value_at_quantile(0.999)),
            max: ms(histogram.max()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TypeSummary {
    pub sent: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub edge: u64,
    pub ack_ms: Option<Quantiles>,
    pub reply_ms: Option<Quantiles>,
}

/// Resident memory of the server, for the `connections` scenario. Against several servers, the
/// sums over all of them, per connection they held between them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Memory {
    /// The first server's process id (reports older than clusters had only one).
    pub server_pid: u32,
    /// Every server measured.
    #[serde(default)]
    pub server_pids: Vec<u32>,
    pub baseline_kib: u64,
    pub loaded_kib: u64,
    pub per_connection_kib: f64,
}

/// Resident memory of one server process (a gateway) and the connections it held.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GatewayMemory {
    pub server_pid: u32,
    /// The endpoints this process serves, usually one.
    pub urls: Vec<String>,
    pub connections: u64,
    pub baseline_kib: u64,
    pub loaded_kib: u64,
    pub per_connection_kib: f64,
}

impl GatewayMemory {
    /// The totals over several servers, so a cluster's figure reads like a single server's.
    pub fn total(gateways: &[GatewayMemory]) -> Option<Memory> {
        let first = gateways.first()?;
        let baseline: u64 = gateways.iter().map(|g| g.baseline_kib).sum();
        let loaded: u64 = gateways.iter().map(|g| g.loaded_kib).sum();
        let connections: u64 = gateways.iter().map(|g| g.connections).sum();
        let grown: u64 = gateways
            .iter()
            .map(|g| g.loaded_kib.saturating_sub(g.baseline_kib))
            .sum();
        Some(Memory {
            server_pid: first.server_pid,
            server_pids: gateways.iter().map(|g| g.server_pid).collect(),
            baseline_kib: baseline,
            loaded_kib: loaded,
            per_connection_kib: grown as f64 / connections.max(1) as f64,
        })
    }
}

/// What the clients of one endpoint came to, when a run spreads them over several.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UrlShare {
    pub url: String,
    pub clients: u64,
    pub connected: u64,
    pub sent: u64,
    pub completed: u64,
    pub lost: u64,
    /// Problems of every kind, `lost` included.
    pub problems: u64,
    /// Connections made again by this endpoint's clients (`--reconnect`).
    #[serde(default)]
    pub reconnects: u64,
}

impl UrlShare {
    pub fn from_tally(url: &str, tally: &Tally) -> Self {
        Self {
            url: url.to_owned(),
            clients: tally.clients,
            connected: tally.connected,
            sent: tally.sent,
            completed: tally.completed,
            lost: tally.lost(),
            problems: tally.problem_count(),
            reconnects: tally.reconnects,
        }
    }
}

/// The result of a run, as printed and as written by `--json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub scenario: String,
    pub label: Option<String>,
    /// `native`, `legacy`, `path` or `echo`.
    pub protocol: String,
    /// The endpoints, joined by ", " (a single URL before runs could have several).
    pub url: String,
    /// The endpoints, in the order clients were given to them.
    #[serde(default)]
    pub urls: Vec<String>,
    /// The tag in this run's client ids (`load-<run_id>-<i>`, `idle-<run_id>-<i>`), to find
    /// them in the servers' history.
    #[serde(default)]
    pub run_id: Option<String>,
    pub started_at: String,
    pub clients: u64,
    pub offered_rate: Option<f64>,
    pub elapsed_s: f64,
    /// Completed messages per second, from the first send to the last completion.
    pub throughput: f64,
    pub sent: u64,
    pub resent: u64,
    pub busy: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub completed: u64,
    pub replies: u64,
    pub deltas: u64,
    /// `received` frames the clients sent to acknowledge their replies.
    #[serde(default)]
    pub acknowledgements: u64,
    pub lost: u64,
    /// Whether the clients reconnected and resumed when a connection ended under them
    /// (`--reconnect`); the fields below up to `out_of_order` count what that took.
    #[serde(default)]
    pub reconnect: bool,
    /// Connections made again after one ended under a client.
    #[serde(default)]
    pub reconnects: u64,
    /// Replies that came through the replays those connections asked for.
    #[serde(default)]
    pub replayed: u64,
    /// Sends again, on a new connection, of messages whose ack had not come (each time).
    #[serde(default)]
    pub resent_after_reconnect: u64,
    /// Error frames answered by sending the message again, by code (`busy` included).
    #[serde(default)]
    pub retried_errors: BTreeMap<String, u64>,
    /// Messages whose ack never came (with `--reconnect`; without, they count as lost).
    #[serde(default)]
    pub unacked: u64,
    /// Frames that came twice: acks, replies, statuses and reply `seq`s.
    #[serde(default)]
    pub duplicated: u64,
    /// Frames in the wrong order: within a message, or in the reply stream.
    #[serde(default)]
    pub out_of_order: u64,
    /// The longest time during the sending phase in which no client saw any reply.
    #[serde(default)]
    pub longest_silence_ms: Option<f64>,
    /// The longest time one client waited between replies while it had a message awaiting
    /// its answers (the longest over all clients).
    #[serde(default)]
    pub longest_client_gap_ms: Option<f64>,
    pub connected: u64,
    pub refusals: u64,
    /// The refusals by close code and name (`"1013 over_capacity"`).
    #[serde(default)]
    pub refused_by: BTreeMap<String, u64>,
    pub max_concurrent: u64,
    pub clients_sent: u64,
    pub problems: BTreeMap<String, u64>,
    pub by_type: BTreeMap<String, TypeSummary>,
    pub all_ack_ms: Option<Quantiles>,
    pub all_reply_ms: Option<Quantiles>,
    pub memory: Option<Memory>,
    /// Per server process, in the `connections` scenario.
    #[serde(default)]
    pub memory_by_gateway: Vec<GatewayMemory>,
    /// Per endpoint, in the order of `urls`.
    #[serde(default)]
    pub by_url: Vec<UrlShare>,
    /// In the `connections` scenario: from the first connect to the last connection open or
    /// failed, and from telling every connection to close to the last one closed. A storm is
    /// judged by these as much as by what was refused.
    #[serde(default)]
    pub connect_s: Option<f64>,
    #[serde(default)]
    pub leave_s: Option<f64>,
    /// Nothing lost or wrong, and every client had its turn.
    pub ok: bool,
}

/// How a run was set up, for the summary.
#[derive(Debug, Clone)]
pub struct RunInfo {
    pub scenario: String,
    pub label: Option<String>,
    pub protocol: String,
    pub urls: Vec<String>,
    pub started_at: String,
    pub offered_rate: Option<f64>,
    pub elapsed: Duration,
    pub max_concurrent: u64,
}

impl Summary {
    pub fn new(info: RunInfo, tally: &Tally) -> Self {
        let active = match (tally.first_send, tally.last_settle) {
            (Some(first), Some(last)) if last > first => last - first,
            _ => Duration::ZERO,
        };
        let throughput = if active.is_zero() {
            0.0
        } else {
            tally.completed as f64 / active.as_secs_f64()
        };
        let mut all_ack: Option<Histogram<u32>> = None;
        let mut all_reply: Option<Histogram<u32>> = None;
        let mut by_type = BTreeMap::new();
        for (kind, t) in &tally.by_type {
            for (all, mine) in [(&mut all_ack, &t.ack), (&mut all_reply, &t.reply)] {
                if let Some(mine) = mine {
                    add_into(all, mine);
                }
            }
            by_type.insert(
                (*kind).to_owned(),
                TypeSummary {
                    sent: t.sent,
                    accepted: t.accepted,
                    rejected: t.rejected,
                    edge: t.edge,
                    ack_ms: t.ack.as_ref().map(Quantiles::of),
                    reply_ms: t.reply.as_ref().map(Quantiles::of),
                },
            );
        }
        let problems: BTreeMap<String, u64> = tally
            .problems
            .iter()
            .map(|(problem, count)| (problem.to_string(), *count))
            .collect();
        Self {
            scenario: info.scenario,
            label: info.label,
            protocol: info.protocol,
            url: info.urls.join(", "),
            urls: info.urls,
            run_id: None,
            started_at: info.started_at,
            clients: tally.clients,
            offered_rate: info.offered_rate,
            elapsed_s: info.elapsed.as_secs_f64(),
            throughput,
            sent: tally.sent,
            resent: tally.resent,
            busy: tally.busy,
            accepted: tally.accepted,
            rejected: tally.rejected,
            completed: tally.completed,
            replies: tally.replies,
            deltas: tally.deltas,
            acknowledgements: tally.acknowledgements,
            lost: tally.lost(),
            reconnect: false,
            reconnects: tally.reconnects,
            replayed: tally.replayed,
            resent_after_reconnect: tally.resent_after_reconnect,
            retried_errors: tally
                .retried
                .iter()
                .map(|(code, count)| ((*code).to_owned(), *count))
                .collect(),
            unacked: tally.problems.get(&Problem::Unacked).copied().unwrap_or(0),
            duplicated: tally.problems_where(Problem::is_duplicate),
            out_of_order: tally.problems_where(Problem::is_out_of_order),
            longest_silence_ms: None,
            longest_client_gap_ms: (tally.sent > 0).then(|| millis(tally.longest_wait)),
            connected: tally.connected,
            refusals: tally.refusal_count(),
            refused_by: tally
                .refusals
                .iter()
                .map(|(code, count)| (close_label(*code), *count))
                .collect(),
            max_concurrent: info.max_concurrent,
            clients_sent: tally.clients_sent,
            ok: problems.is_empty(),
            problems,
            by_type,
            all_ack_ms: all_ack.as_ref().map(Quantiles::of),
            all_reply_ms: all_reply.as_ref().map(Quantiles::of),
            memory: None,
            memory_by_gateway: Vec::new(),
            by_url: Vec::new(),
            connect_s: None,
            leave_s: None,
        }
    }

    /// The table people read at the end of a run.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let label = self.label.as_deref().unwrap_or("");
        // Writing to a String cannot fail.
        let _ = writeln!(
            out,
            "kaiwa-load {} {label} ({} protocol) against {}",
            self.scenario, self.protocol, self.url
        );
        let rate = self
            .offered_rate
            .map(|r| format!(", offered {r:.0} msg/s"))
            .unwrap_or_default();
        let refused: Vec<String> = self
            .refused_by
            .iter()
            .map(|(close, count)| format!("{close} ×{count}"))
            .collect();
        let refused = if refused.is_empty() {
            String::new()
        } else {
            format!(": {}", refused.join(", "))
        };
        let _ = writeln!(
            out,
            "  {} clients ({} connected, at most {} at once, {} refused{refused}), {} sent a message; {:.1} s{rate}",
            self.clients,
            self.connected,
            self.max_concurrent,
            self.refusals,
            self.clients_sent,
            self.elapsed_s
        );
        if self.by_url.len() > 1 {
            for share in &self.by_url {
                let _ = writeln!(
                    out,
                    "    {}: {} clients, {} connected, sent {}, completed {}, lost {}, problems {}",
                    share.url,
                    share.clients,
                    share.connected,
                    share.sent,
                    share.completed,
                    share.lost,
                    share.problems
                );
            }
        }
        if let (Some(connect), Some(leave)) = (self.connect_s, self.leave_s) {
            let _ = writeln!(
                out,
                "  all connected or failed in {connect:.1} s ({:.0} per second); all closed in {leave:.1} s",
                self.clients as f64 / connect.max(0.001)
            );
        }
        if self.memory_by_gateway.len() > 1 {
            for gateway in &self.memory_by_gateway {
                let _ = writeln!(
                    out,
                    "  server pid {} ({}), {} connections: {} KiB resident before, {} KiB with them: {:.2} KiB per connection",
                    gateway.server_pid,
                    gateway.urls.join(", "),
                    gateway.connections,
                    gateway.baseline_kib,
                    gateway.loaded_kib,
                    gateway.per_connection_kib
                );
            }
        }
        if let Some(memory) = &self.memory {
            let servers = match memory.server_pids.len() {
                0 | 1 => format!("server pid {}", memory.server_pid),
                n => format!("all {n} servers"),
            };
            let _ = writeln!(
                out,
                "  {servers}: {} KiB resident before, {} KiB with the connections: {:.2} KiB per connection",
                memory.baseline_kib, memory.loaded_kib, memory.per_connection_kib
            );
        }
        if self.sent > 0 {
            let _ = writeln!(
                out,
                "  sent {}  accepted {}  rejected {}  completed {}  replies {}  deltas {}  received frames {}  busy (retried) {}  lost {}",
                self.sent,
                self.accepted,
                self.rejected,
                self.completed,
                self.replies,
                self.deltas,
                self.acknowledgements,
                self.busy,
                self.lost
            );
            if self.reconnect {
                let retried: Vec<String> = self
                    .retried_errors
                    .iter()
                    .map(|(code, count)| format!("{code} ×{count}"))
                    .collect();
                let retried = if retried.is_empty() {
                    "none".to_owned()
                } else {
                    retried.join(", ")
                };
                let _ = writeln!(
                    out,
                    "  reconnects {}  replies replayed {}  resent after reconnect {}  unacked {}  lost {}  duplicated {}  out of order {}  errors retried: {retried}",
                    self.reconnects,
                    self.replayed,
                    self.resent_after_reconnect,
                    self.unacked,
                    self.lost,
                    self.duplicated,
                    self.out_of_order
                );
            }
            let gap = |value: Option<f64>| {
                value.map_or_else(|| "-".to_owned(), |v| format!("{} ms", ms(v)))
            };
            let _ = writeln!(
                out,
                "  longest silence (no client got a reply) {}; longest wait of one client between replies {}",
                gap(self.longest_silence_ms),
                gap(self.longest_client_gap_ms)
            );
            let _ = writeln!(out, "  throughput {:.0} msg/s completed", self.throughput);
            let _ = writeln!(out);
            let _ = writeln!(
                out,
                "  {:<6} {:>7} {:>8} {:>8} {:>5} | {:>38} | {:>38}",
                "type",
                "sent",
                "accepted",
                "rejected",
                "edge",
                "to ack, ms: p50 p90 p99 p99.9 max",
                "to last reply, ms: p50 p90 p99 p99.9 max"
            );
            let row = |name: &str,
                       sent: u64,
                       accepted: u64,
                       rejected: u64,
                       edge: u64,
                       ack: Option<&Quantiles>,
                       reply: Option<&Quantiles>| {
                format!(
                    "  {:<6} {:>7} {:>8} {:>8} {:>5} | {:>38} | {:>38}\n",
                    name,
                    sent,
                    accepted,
                    rejected,
                    edge,
                    quantiles(ack),
                    quantiles(reply)
                )
            };
            for (kind, t) in &self.by_type {
                out.push_str(&row(
                    kind,
                    t.sent,
                    t.accepted,
                    t.rejected,
                    t.edge,
                    t.ack_ms.as_ref(),
                    t.reply_ms.as_ref(),
                ));
            }
            let edge = self.by_type.values().map(|t| t.edge).sum();
            out.push_str(&row(
                "all",
                self.sent,
                self.accepted,
                self.rejected,
                edge,
                self.all_ack_ms.as_ref(),
                self.all_reply_ms.as_ref(),
            ));
        }
        let _ = writeln!(out);
        if self.problems.is_empty() {
            let _ = writeln!(
                out,
                "  OK: every message accounted for, nothing lost, duplicated, unexpected or misjudged"
            );
        } else {
            let _ = writeln!(out, "  FAILED: problems by kind");
            for (problem, count) in &self.problems {
                let _ = writeln!(out, "    {problem:<36} {count}");
            }
        }
        out
    }
}

/// A duration in milliseconds, as the JSON reports them.
pub fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

fn quantiles(q: Option<&Quantiles>) -> String {
    match q {
        None => "-".to_owned(),
        Some(q) => format!(
            "{} {} {} {} {}",
            ms(q.p50),
            ms(q.p90),
            ms(q.p99),
            ms(q.p999),
            ms(q.max)
        ),
    }
}

/// Milliseconds with precision that fits their size.
pub fn ms(value: f64) -> String {
    if value < 10.0 {
        format!("{value:.2}")
    } else if value < 100.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.0}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_tallies_add_counts_problems_and_latencies() {
        let mut a = Tally {
            sent: 2,
            ..Tally::default()
        };
        a.problem(Problem::LostReply);
        a.kind(MessageType::Text)
            .record_reply(Duration::from_millis(5));
        let mut b = Tally {
            sent: 3,
            ..Tally::default()
        };
        b.problem(Problem::LostReply);
        b.problem(Problem::Error("busy".into()));
        b.kind(MessageType::Text)
            .record_reply(Duration::from_millis(7));
        a.merge(&b);
        assert_eq!(a.sent, 5);
        assert_eq!(a.lost(), 2);
        assert_eq!(a.problem_count(), 3);
        let text = &a.by_type["text"];
        assert_eq!(text.reply.as_ref().map(|h| h.len()), Some(2));
    }

    #[test]
    fn close_codes_are_named_by_the_protocols_numbering() {
        assert_eq!(
            Problem::Closed(4509).to_string(),
            "closed:4509 duplicate_connection"
        );
        assert_eq!(
            Problem::Closed(4502).to_string(),
            "closed:4502 first_message_timeout"
        );
        assert_eq!(Problem::Closed(4510).to_string(), "closed:4510 replaced");
        assert_eq!(
            Problem::Closed(1006).to_string(),
            "closed:1006 abnormal_closure"
        );
        assert_eq!(Problem::Closed(4321).to_string(), "closed:4321");
        assert_eq!(close_label(1013), "1013 over_capacity");
    }

    #[test]
    fn refusals_are_shown_by_close_code() {
        let mut tally = Tally::default();
        tally.refused(1013);
        tally.refused(1013);
        let mut other = Tally::default();
        other.refused(1001);
        tally.merge(&other);
        let info = RunInfo {
            scenario: "spec".into(),
            label: None,
            protocol: "native".into(),
            urls: vec!["ws://127.0.0.1:1/ws".into()],
            started_at: String::new(),
            offered_rate: None,
            elapsed: Duration::from_secs(1),
            max_concurrent: 1,
        };
        let summary = Summary::new(info, &tally);
        assert_eq!(summary.refusals, 3);
        assert!(
            summary
                .table()
                .contains("3 refused: 1001 going_away ×1, 1013 over_capacity ×2"),
            "{}",
            summary.table()
        );
    }

    #[test]
    fn endpoints_and_gateways_are_shown_one_by_one_and_old_reports_still_parse() {
        let urls = vec![
            "ws://127.0.0.1:1/ws".to_owned(),
            "ws://127.0.0.1:2/ws".to_owned(),
        ];
        let info = RunInfo {
            scenario: "connections".into(),
            label: None,
            protocol: "native".into(),
            urls: urls.clone(),
            started_at: String::new(),
            offered_rate: None,
            elapsed: Duration::from_secs(1),
            max_concurrent: 3,
        };
        let mut summary = Summary::new(info, &Tally::default());
        assert_eq!(summary.url, "ws://127.0.0.1:1/ws, ws://127.0.0.1:2/ws");
        summary.by_url = urls
            .iter()
            .map(|url| {
                UrlShare::from_tally(
                    url,
                    &Tally {
                        clients: 2,
                        connected: 2,
                        ..Tally::default()
                    },
                )
            })
            .collect();
        summary.memory_by_gateway = vec![
            GatewayMemory {
                server_pid: 10,
                urls: vec![urls[0].clone()],
                connections: 2,
                baseline_kib: 100,
                loaded_kib: 120,
                per_connection_kib: 10.0,
            },
            GatewayMemory {
                server_pid: 11,
                urls: vec![urls[1].clone()],
                connections: 1,
                baseline_kib: 100,
                loaded_kib: 104,
                per_connection_kib: 4.0,
            },
        ];
        summary.memory = GatewayMemory::total(&summary.memory_by_gateway);
        let memory = summary.memory.clone().expect("a total");
        assert_eq!((memory.server_pid, memory.server_pids), (10, vec![10, 11]));
        assert_eq!((memory.baseline_kib, memory.loaded_kib), (200, 224));
        assert!((memory.per_connection_kib - 8.0).abs() < 1e-9);
        let table = summary.table();
        assert!(
            table.contains("ws://127.0.0.1:2/ws: 2 clients, 2 connected"),
            "{table}"
        );
        assert!(
            table.contains("server pid 11 (ws://127.0.0.1:2/ws), 1 connections"),
            "{table}"
        );
        assert!(table.contains("all 2 servers: 200 KiB"), "{table}");

        let mut json = serde_json::to_value(&summary).expect("serializes");
        let fields = json.as_object_mut().expect("an object");
        for key in ["urls", "run_id", "by_url", "memory_by_gateway"] {
            fields.remove(key);
        }
        if let Some(memory) = fields.get_mut("memory").and_then(|m| m.as_object_mut()) {
            memory.remove("server_pids");
        }
        let old: Summary = serde_json::from_value(json).expect("a report from before clusters");
        assert_eq!(old.url, summary.url);
        assert!(old.urls.is_empty() && old.by_url.is_empty());
    }

    #[test]
    fn a_summary_with_problems_is_not_ok_and_says_so() {
        let mut tally = Tally {
            sent: 1,
            ..Tally::default()
        };
        tally.problem(Problem::LostAck);
        let info = RunInfo {
            scenario: "spec".into(),
            label: None,
            protocol: "native".into(),
            urls: vec!["ws://127.0.0.1:1/ws".into()],
            started_at: String::new(),
            offered_rate: None,
            elapsed: Duration::from_secs(1),
            max_concurrent: 1,
        };
        let summary = Summary::new(info, &tally);
        assert!(!summary.ok);
        assert_eq!(summary.lost, 1);
        assert!(summary.table().contains("lost_ack"));
    }

    #[test]
    fn a_reconnect_run_reports_what_coming_back_took_in_the_table_and_the_json() {
        let mut tally = Tally {
            sent: 10,
            reconnects: 3,
            replayed: 4,
            resent_after_reconnect: 2,
            longest_wait: Duration::from_millis(1_500),
            ..Tally::default()
        };
        tally.retried.insert("unavailable", 5);
        tally.problem(Problem::Unacked);
        tally.problem(Problem::DuplicateReply);
        tally.problem(Problem::SeqRepeat);
        tally.problem(Problem::SeqOutOfOrder);
        let info = RunInfo {
            scenario: "throughput".into(),
            label: None,
            protocol: "native".into(),
            urls: vec!["ws://127.0.0.1:1/ws".into()],
            started_at: String::new(),
            offered_rate: None,
            elapsed: Duration::from_secs(1),
            max_concurrent: 1,
        };
        let mut summary = Summary::new(info, &tally);
        summary.reconnect = true;
        summary.longest_silence_ms = Some(1_234.0);
        assert_eq!(
            (summary.unacked, summary.lost),
            (1, 0),
            "unacked is not lost"
        );
        assert_eq!((summary.duplicated, summary.out_of_order), (2, 1));
        assert!(!summary.ok);
        let table = summary.table();
        assert!(
            table.contains("reconnects 3  replies replayed 4  resent after reconnect 2  unacked 1  lost 0  duplicated 2  out of order 1  errors retried: unavailable ×5"),
            "{table}"
        );
        assert!(table.contains("longest silence (no client got a reply) 1234 ms; longest wait of one client between replies 1500 ms"), "{table}");
        let json = serde_json::to_value(&summary).expect("serializes");
        for (field, value) in [
            ("reconnect", serde_json::json!(true)),
            ("reconnects", serde_json::json!(3)),
            ("replayed", serde_json::json!(4)),
            ("resent_after_reconnect", serde_json::json!(2)),
            ("retried_errors", serde_json::json!({"unavailable": 5})),
            ("unacked", serde_json::json!(1)),
            ("duplicated", serde_json::json!(2)),
            ("out_of_order", serde_json::json!(1)),
            ("longest_silence_ms", serde_json::json!(1234.0)),
            ("longest_client_gap_ms", serde_json::json!(1500.0)),
        ] {
            assert_eq!(json[field], value, "{field}");
        }
    }
}
