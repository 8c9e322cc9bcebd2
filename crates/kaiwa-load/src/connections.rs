//! The `connections` scenario: opens and holds many idle connections (native, legacy or the path
//! dialect), spread over the servers' endpoints (connection i on url[i % n]), over source
//! addresses 127.0.0.x and, past what one process may hold open, over child processes of the
//! tool; reads each server's resident memory from /proc before and while they are held, per
//! connection it holds.

use crate::auth::{AUTH_SECRET_ENV, Minter, TokenSettings};
use crate::connect::{self, Attempt};
use crate::ledger::Mode;
use crate::plan::{self, ClientPlan};
use crate::report::{GatewayMemory, Problem, RunInfo, Summary, Tally, UrlShare};
use chrono::{SecondsFormat, Utc};
use chrono_tz::Tz;
use futures::{SinkExt, StreamExt};
use kaiwa_protocol::{legacy, path};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// Handshakes in progress at once: enough to open 19,000 connections in seconds, few enough
/// not to overflow the server's accept backlog.
const CONNECTING_AT_ONCE: usize = 256;
/// Connections per source address: well inside the ~28,000 ephemeral ports of each.
const PER_SOURCE: usize = 10_000;
/// Connections per client process: one process may hold 20,000 open files in all.
pub const PER_PROCESS: usize = 10_000;

#[derive(Debug, Clone)]
pub struct ConnectionsConfig {
    pub label: Option<String>,
    /// The servers' endpoints; connection i goes to `urls[i % urls.len()]`.
    pub urls: Vec<String>,
    pub clients: usize,
    /// Client processes; 0 picks one per 10,000 connections.
    pub processes: usize,
    /// The servers' process ids, to read their resident memory: none, or one per URL in the
    /// same order (the same id twice when one process serves two endpoints).
    pub server_pids: Vec<u32>,
    /// How long to hold the connections before measuring.
    pub hold: Duration,
    /// This tool's executable, to start the child processes.
    pub exe: Option<PathBuf>,
    pub seed: u64,
    /// The clients' tokens, when the server has auth on.
    pub auth: Option<TokenSettings>,
    /// What the connections speak: native, legacy or the path dialect.
    pub mode: Mode,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectionsError {
    #[error("cannot start a client process: {0}")]
    Spawn(std::io::Error),
    #[error("a client process failed: {0}")]
    Child(String),
    #[error("{0} connections need child processes, but the tool's executable is unknown")]
    NoExecutable(usize),
    #[error("at least one --url is needed")]
    NoUrls,
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthError),
    #[error(
        "{pids} server process ids for {urls} URLs: give one --server-pid per --url, in the same order"
    )]
    PidsPerUrl { pids: usize, urls: usize },
}

/// What one process's share of the connections came to.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PartReport {
    pub connected: u64,
    /// By close code.
    pub refusals: BTreeMap<u16, u64>,
    pub problems: BTreeMap<String, u64>,
    /// The same per endpoint, in the order of the URLs (each with no `by_url` of its own).
    #[serde(default)]
    pub by_url: Vec<PartReport>,
}

/// Connections held open by this process.
pub struct Held {
    stop: CancellationToken,
    tasks: JoinSet<Tally>,
    /// Which endpoint each task's connection went to.
    endpoints: HashMap<tokio::task::Id, usize>,
    urls: usize,
    pub connected: u64,
    /// Connected per endpoint, in the order of the URLs.
    pub connected_by_url: Vec<u64>,
}

/// Opens `count` idle connections, numbered from `first`, each to its endpoint of `urls`, and
/// returns once each is connected or has failed.
pub async fn hold(
    urls: &[String],
    first: usize,
    count: usize,
    run_id: &str,
    auth: Option<&Minter>,
    mode: Mode,
) -> Held {
    let stop = CancellationToken::new();
    let gate = Arc::new(Semaphore::new(CONNECTING_AT_ONCE));
    let (connected_tx, mut connected_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = JoinSet::new();
    let mut endpoints = HashMap::new();
    for index in first..first + count {
        let endpoint = plan::endpoint(index, urls.len());
        let client_id = format!("idle-{run_id}-{index}");
        let plan = ClientPlan {
            index,
            // Signing with a key the minter already took fails only if serialization does.
            token: auth.and_then(|minter| minter.token(&client_id).ok()),
            client_id,
            timezone: Tz::UTC,
            messages: Some(0),
            source: Some(source_address(index)),
            seed: index as u64,
        };
        let url = urls.get(endpoint).cloned().unwrap_or_default();
        let gate = gate.clone();
        let stop = stop.clone();
        let connected_tx = connected_tx.clone();
        let task = tasks.spawn(async move {
            let mut tally = Tally {
                clients: 1,
                ..Tally::default()
            };
            let permit = gate.acquire_owned().await;
            // A connection reset while thousands connect at once is the server's accept queue
            // overflowing for an instant, which any client retries; a refusal is an answer.
            let mut attempt = connect::connect(&url, mode, &plan).await;
            for backoff in [100, 400] {
                if !matches!(attempt, Attempt::Transport(_)) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(backoff)).await;
                attempt = connect::connect(&url, mode, &plan).await;
            }
            let ws = match attempt {
                Attempt::Ready(ws, _) => Some(ws),
                // Idle connections are not retried: a refusal is a connection short.
                Attempt::Refused(code) => {
                    tally.refused(code);
                    tally.problem(Problem::Closed(code));
                    None
                }
                Attempt::Transport(err) => {
                    eprintln!("kaiwa-load: connection {index} failed: {err}");
                    tally.problem(Problem::ConnectFailed);
                    None
                }
                Attempt::Failed(problem) => {
                    tally.problem(problem);
                    None
                }
            };
            drop(permit);
            connected_tx.send((endpoint, ws.is_some())).ok();
            let Some(ws) = ws else { return tally };
            let mut ws = *ws;
            tally.connected = 1;
            // Idle: read (which also answers the server's pings, and its heartbeats in the
            // protocols that send them as frames) until told to stop.
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    frame = ws.next() => match frame {
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                        Some(Ok(Message::Text(text))) => match heartbeat_answer(mode, &text) {
                            Some(answer) => {
                                if ws.send(Message::text(answer)).await.is_err() {
                                    tally.problem(Problem::Closed(connect::ABNORMAL_CLOSURE));
                                    return tally;
                                }
                            }
                            None => tally.problem(Problem::UnexpectedFrame),
                        },
                        Some(Ok(Message::Close(close))) => {
                            tally.problem(Problem::Closed(close.map_or(connect::NO_STATUS, |c| u16::from(c.code))));
                            return tally;
                        }
                        Some(Ok(_)) => tally.problem(Problem::UnexpectedFrame),
                        Some(Err(_)) | None => {
                            tally.problem(Problem::Closed(connect::ABNORMAL_CLOSURE));
                            return tally;
                        }
                    }
                }
            }
            ws.close(None).await.ok();
            let drained = tokio::time::timeout(Duration::from_secs(5), async {
                while let Some(Ok(_)) = ws.next().await {}
            })
            .await;
            if drained.is_err() {
                tally.problem(Problem::Closed(connect::ABNORMAL_CLOSURE));
            }
            tally
        });
        endpoints.insert(task.id(), endpoint);
    }
    drop(connected_tx);
    // Each task reports once, then holds its connection (and its sender) until released.
    let mut connected = 0;
    let mut connected_by_url = vec![0; urls.len()];
    for _ in 0..count {
        match connected_rx.recv().await {
            Some((endpoint, ok)) => {
                connected += u64::from(ok);
                if let Some(slot) = connected_by_url.get_mut(endpoint) {
                    *slot += u64::from(ok);
                }
            }
            None => break,
        }
    }
    Held {
        stop,
        tasks,
        endpoints,
        urls: urls.len(),
        connected,
        connected_by_url,
    }
}

impl Held {
    /// Closes every connection and returns what they counted, per endpoint in the order of the
    /// URLs.
    pub async fn release(mut self) -> Vec<Tally> {
        self.stop.cancel();
        let mut by_url = vec![Tally::default(); self.urls];
        while let Some(done) = self.tasks.join_next_with_id().await {
            let (id, part) = match done {
                Ok((id, part)) => (id, part),
                Err(err) => {
                    // A task that died still was a client of its endpoint, one that failed.
                    let mut part = Tally {
                        clients: 1,
                        ..Tally::default()
                    };
                    part.problem(Problem::ConnectFailed);
                    (err.id(), part)
                }
            };
            let endpoint = self.endpoints.get(&id).copied().unwrap_or_default();
            if let Some(tally) = by_url.get_mut(endpoint) {
                tally.merge(&part);
            }
        }
        by_url
    }

    /// What this process's connections are, as the ready line of a child process says it.
    pub fn ready(&self) -> PartReport {
        PartReport {
            connected: self.connected,
            by_url: self
                .connected_by_url
                .iter()
                .map(|&connected| PartReport {
                    connected,
                    ..PartReport::default()
                })
                .collect(),
            ..PartReport::default()
        }
    }
}

/// All endpoints' tallies in one.
pub fn merged(by_url: &[Tally]) -> Tally {
    let mut tally = Tally::default();
    for part in by_url {
        tally.merge(part);
    }
    tally
}

impl PartReport {
    pub fn from_tally(tally: &Tally) -> Self {
        Self {
            connected: tally.connected,
            refusals: tally.refusals.clone(),
            problems: tally
                .problems
                .iter()
                .map(|(problem, count)| (problem.to_string(), *count))
                .collect(),
            by_url: Vec::new(),
        }
    }

    /// The report of connections spread over endpoints: the whole, and each endpoint's.
    pub fn from_tallies(by_url: &[Tally]) -> Self {
        Self {
            by_url: by_url.iter().map(Self::from_tally).collect(),
            ..Self::from_tally(&merged(by_url))
        }
    }

    /// Adds `other`'s counts (and its endpoints', one by one) to these.
    pub fn merge(&mut self, other: &PartReport) {
        self.connected += other.connected;
        for (code, count) in &other.refusals {
            *self.refusals.entry(*code).or_default() += count;
        }
        for (problem, count) in &other.problems {
            *self.problems.entry(problem.clone()).or_default() += count;
        }
        if self.by_url.len() < other.by_url.len() {
            self.by_url
                .resize(other.by_url.len(), PartReport::default());
        }
        for (mine, theirs) in self.by_url.iter_mut().zip(&other.by_url) {
            mine.merge(theirs);
        }
    }
}

/// 127.0.0.2, 127.0.0.3, …: one per 10,000 connections.
pub fn source_address(index: usize) -> IpAddr {
    let n = 2 + (index / PER_SOURCE) as u8;
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, n))
}

/// Resident memory of a process, in KiB, from /proc/<pid>/status.
pub fn resident_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

/// A child process holding its share.
struct Part {
    child: Child,
    stdin: ChildStdin,
    stdout: tokio::io::Lines<BufReader<ChildStdout>>,
}

/// One server process to measure, and the endpoints (indices into the URLs) it serves.
struct Server {
    pid: u32,
    endpoints: Vec<usize>,
}

/// The distinct processes behind the endpoints, in the order they are first named, so a process
/// named for two endpoints is read once and divided by the connections of both.
fn servers(pids: &[u32]) -> Vec<Server> {
    let mut servers: Vec<Server> = Vec::new();
    for (endpoint, &pid) in pids.iter().enumerate() {
        match servers.iter_mut().find(|server| server.pid == pid) {
            Some(server) => server.endpoints.push(endpoint),
            None => servers.push(Server {
                pid,
                endpoints: vec![endpoint],
            }),
        }
    }
    servers
}

fn resident(servers: &[Server]) -> Vec<Option<u64>> {
    servers
        .iter()
        .map(|server| resident_kib(server.pid))
        .collect()
}

/// Runs the scenario: connects, waits `hold`, measures, closes.
pub async fn run(config: ConnectionsConfig) -> Result<Summary, ConnectionsError> {
    if config.urls.is_empty() {
        return Err(ConnectionsError::NoUrls);
    }
    if !config.server_pids.is_empty() && config.server_pids.len() != config.urls.len() {
        return Err(ConnectionsError::PidsPerUrl {
            pids: config.server_pids.len(),
            urls: config.urls.len(),
        });
    }
    let started_at = Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true);
    let began = Instant::now();
    let run_id = crate::plan::run_id(config.seed);
    let processes = if config.processes == 0 {
        config.clients.div_ceil(PER_PROCESS).max(1)
    } else {
        config.processes
    };
    let servers = servers(&config.server_pids);
    let baseline = resident(&servers);
    // What was connected while the memory was read, and what the connections came to at the
    // end, both per endpoint.
    let mut ready = PartReport::default();
    let mut report = PartReport::default();
    let loaded;
    let (connected_in, left_in);
    if processes <= 1 {
        let minter = config
            .auth
            .as_ref()
            .map(TokenSettings::minter)
            .transpose()?;
        let held = hold(
            &config.urls,
            0,
            config.clients,
            &run_id,
            minter.as_ref(),
            config.mode,
        )
        .await;
        ready = held.ready();
        connected_in = began.elapsed();
        tokio::time::sleep(config.hold).await;
        loaded = resident(&servers);
        let leaving = Instant::now();
        report = PartReport::from_tallies(&held.release().await);
        left_in = leaving.elapsed();
    } else {
        let exe = config
            .exe
            .clone()
            .ok_or(ConnectionsError::NoExecutable(config.clients))?;
        let share = config.clients.div_ceil(processes);
        let mut parts = Vec::new();
        for part in 0..processes {
            let first = part * share;
            let count = share.min(config.clients.saturating_sub(first));
            if count == 0 {
                break;
            }
            // Every child gets every URL: it numbers its connections from `first`, so each
            // goes to the endpoint it would have had in a single process.
            let mut args = vec!["connections-part".to_owned()];
            for url in &config.urls {
                args.extend(["--url".to_owned(), url.clone()]);
            }
            args.extend([
                "--dialect".to_owned(),
                config.mode.name().to_owned(),
                "--first".to_owned(),
                first.to_string(),
                "--count".to_owned(),
                count.to_string(),
                "--run-id".to_owned(),
                run_id.clone(),
            ]);
            let mut command = Command::new(&exe);
            if let Some(auth) = &config.auth {
                // The secret goes through the environment: a command line is public.
                command.env(AUTH_SECRET_ENV, &auth.secret);
                args.extend([
                    "--auth-audience".to_owned(),
                    auth.audience.clone(),
                    "--token-ttl".to_owned(),
                    auth.ttl.as_secs().to_string(),
                ]);
            }
            let mut child = command
                .args(&args)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .map_err(ConnectionsError::Spawn)?;
            let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
                return Err(ConnectionsError::Child("no pipes to the child".into()));
            };
            parts.push(Part {
                child,
                stdin,
                stdout: BufReader::new(stdout).lines(),
            });
        }
        for part in &mut parts {
            ready.merge(&next_report(part).await?);
        }
        connected_in = began.elapsed();
        tokio::time::sleep(config.hold).await;
        loaded = resident(&servers);
        let leaving = Instant::now();
        // Every process is told before any is waited for: all leave at once.
        for part in &mut parts {
            part.stdin
                .write_all(b"stop\n")
                .await
                .map_err(|e| ConnectionsError::Child(e.to_string()))?;
        }
        for mut part in parts {
            report.merge(&next_report(&mut part).await?);
            part.child
                .wait()
                .await
                .map_err(|e| ConnectionsError::Child(e.to_string()))?;
        }
        left_in = leaving.elapsed();
    }
    // Problems arrive by name (children print them), so the tally carries the counts and the
    // names are added to the summary after.
    let tally = Tally {
        clients: config.clients as u64,
        connected: report.connected,
        refusals: report.refusals.clone(),
        ..Tally::default()
    };
    let info = RunInfo {
        scenario: "connections".into(),
        label: config.label.clone(),
        protocol: config.mode.name().to_owned(),
        urls: config.urls.clone(),
        started_at,
        offered_rate: None,
        elapsed: began.elapsed(),
        max_concurrent: ready.connected,
    };
    let mut summary = Summary::new(info, &tally);
    summary.run_id = Some(run_id);
    summary.problems = report.problems.clone();
    let per_endpoint = plan::clients_per_endpoint(config.clients, config.urls.len());
    let connected_at =
        |endpoint: usize, of: &PartReport| of.by_url.get(endpoint).map_or(0, |part| part.connected);
    for (endpoint, url) in config.urls.iter().enumerate() {
        let clients = per_endpoint.get(endpoint).copied().unwrap_or_default() as u64;
        let missing = clients.saturating_sub(connected_at(endpoint, &ready));
        let problems: u64 = report
            .by_url
            .get(endpoint)
            .map_or(0, |part| part.problems.values().sum());
        summary.by_url.push(UrlShare {
            url: url.clone(),
            clients,
            connected: connected_at(endpoint, &report),
            sent: 0,
            completed: 0,
            lost: 0,
            problems: problems + missing,
            reconnects: 0,
        });
    }
    if ready.connected < config.clients as u64 {
        let missing = config.clients as u64 - ready.connected;
        *summary.problems.entry("not_connected".into()).or_default() += missing;
    }
    summary.ok = summary.problems.is_empty();
    summary.connect_s = Some(connected_in.as_secs_f64());
    summary.leave_s = Some(left_in.as_secs_f64());
    summary.memory_by_gateway = servers
        .iter()
        .zip(baseline.iter().zip(&loaded))
        .filter_map(|(server, (baseline, loaded))| {
            let (baseline, loaded) = ((*baseline)?, (*loaded)?);
            let connections: u64 = server
                .endpoints
                .iter()
                .map(|&endpoint| connected_at(endpoint, &ready))
                .sum();
            Some(GatewayMemory {
                server_pid: server.pid,
                urls: server
                    .endpoints
                    .iter()
                    .filter_map(|&endpoint| config.urls.get(endpoint).cloned())
                    .collect(),
                connections,
                baseline_kib: baseline,
                loaded_kib: loaded,
                per_connection_kib: loaded.saturating_sub(baseline) as f64
                    / connections.max(1) as f64,
            })
        })
        .collect();
    // Only the whole: a total over some of the servers would pass for the cluster's.
    if summary.memory_by_gateway.len() == servers.len() {
        summary.memory = GatewayMemory::total(&summary.memory_by_gateway);
    }
    Ok(summary)
}

async fn next_report(part: &mut Part) -> Result<PartReport, ConnectionsError> {
    let line = part
        .stdout
        .next_line()
        .await
        .map_err(|e| ConnectionsError::Child(e.to_string()))?
        .ok_or_else(|| ConnectionsError::Child("a client process ended early".into()))?;
    serde_json::from_str(&line).map_err(|e| ConnectionsError::Child(format!("{e}: {line}")))
}

/// The child side: holds `count` connections, prints a [`PartReport`] line when they are open,
/// waits for a line (or the end) on standard input, closes them and prints the final report.
pub async fn run_part(
    urls: &[String],
    first: usize,
    count: usize,
    run_id: &str,
    auth: Option<&Minter>,
    mode: Mode,
) -> PartReport {
    let held = hold(urls, first, count, run_id, auth, mode).await;
    println!(
        "{}",
        serde_json::to_string(&held.ready()).unwrap_or_default()
    );
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    stdin.next_line().await.ok();
    PartReport::from_tallies(&held.release().await)
}

/// The answer to a heartbeat the server sends as a text frame (legacy, path dialect); `None`
/// for any other frame.
fn heartbeat_answer(mode: Mode, text: &str) -> Option<String> {
    let ping = match mode {
        Mode::Legacy => serde_json::from_str::<legacy::ServerFrame>(text)
            .is_ok_and(|frame| frame.kind == legacy::FrameKind::Heartbeat),
        Mode::Path => matches!(
            serde_json::from_str::<path::ServerFrame>(text),
            Ok(path::ServerFrame::Check { check_connection }) if check_connection == path::PING
        ),
        Mode::Native | Mode::Echo => false,
    };
    ping.then(|| connect::heartbeat_pong(mode))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_spread_over_source_addresses() {
        assert_eq!(source_address(0), IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)));
        assert_eq!(
            source_address(18_999),
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3))
        );
    }

    #[test]
    fn a_process_named_for_two_endpoints_is_measured_once_for_both() {
        let servers = servers(&[7, 8, 7]);
        let found: Vec<(u32, Vec<usize>)> = servers
            .into_iter()
            .map(|server| (server.pid, server.endpoints))
            .collect();
        assert_eq!(found, [(7, vec![0, 2]), (8, vec![1])]);
    }

    #[test]
    fn part_reports_add_up_per_endpoint() {
        let part = |connected: u64, by_url: Vec<u64>| PartReport {
            connected,
            by_url: by_url
                .into_iter()
                .map(|connected| PartReport {
                    connected,
                    ..PartReport::default()
                })
                .collect(),
            ..PartReport::default()
        };
        let mut total = PartReport::default();
        total.merge(&part(3, vec![2, 1]));
        total.merge(&part(4, vec![2, 2]));
        assert_eq!(total, part(7, vec![4, 3]));
        // A child's line from before endpoints were counted still reads.
        let old: PartReport =
            serde_json::from_str(r#"{"connected":5,"refusals":{},"problems":{}}"#).expect("parses");
        assert_eq!(old, part(5, vec![]));
    }

    #[test]
    fn resident_memory_is_read_from_proc() {
        let kib = resident_kib(std::process::id()).expect("our own status is readable");
        assert!(kib > 0);
        assert_eq!(resident_kib(u32::MAX), None);
    }
}
