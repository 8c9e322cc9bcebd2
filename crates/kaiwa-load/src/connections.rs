//! The `connections` scenario: opens and holds many idle native connections, spread over
//! source addresses 127.0.0.x and, past what one process may hold open, over child processes of
//! the tool; reads the server's resident memory from /proc before and while they are held.

use crate::client::{self, Attempt};
use crate::ledger::Mode;
use crate::plan::ClientPlan;
use crate::report::{Memory, Problem, RunInfo, Summary, Tally};
use chrono::{SecondsFormat, Utc};
use chrono_tz::Tz;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
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
    pub url: String,
    pub clients: usize,
    /// Client processes; 0 picks one per 10,000 connections.
    pub processes: usize,
    /// The server's process id, to read its resident memory.
    pub server_pid: Option<u32>,
    /// How long to hold the connections before measuring.
    pub hold: Duration,
    /// This tool's executable, to start the child processes.
    pub exe: Option<PathBuf>,
    pub seed: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectionsError {
    #[error("cannot start a client process: {0}")]
    Spawn(std::io::Error),
    #[error("a client process failed: {0}")]
    Child(String),
    #[error("{0} connections need child processes, but the tool's executable is unknown")]
    NoExecutable(usize),
}

/// What one process's share of the connections came to.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PartReport {
    pub connected: u64,
    /// By close code.
    pub refusals: BTreeMap<u16, u64>,
    pub problems: BTreeMap<String, u64>,
}

/// Connections held open by this process.
pub struct Held {
    stop: CancellationToken,
    tasks: JoinSet<Tally>,
    pub connected: u64,
}

/// Opens `count` idle connections, numbered from `first`, and returns once each is connected
/// or has failed.
pub async fn hold(url: &str, first: usize, count: usize, run_id: &str) -> Held {
    let stop = CancellationToken::new();
    let gate = Arc::new(Semaphore::new(CONNECTING_AT_ONCE));
    let (connected_tx, mut connected_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = JoinSet::new();
    for index in first..first + count {
        let plan = ClientPlan {
            index,
            client_id: format!("idle-{run_id}-{index}"),
            timezone: Tz::UTC,
            messages: Some(0),
            source: Some(source_address(index)),
            seed: index as u64,
        };
        let url = url.to_owned();
        let gate = gate.clone();
        let stop = stop.clone();
        let connected_tx = connected_tx.clone();
        tasks.spawn(async move {
            let mut tally = Tally {
                clients: 1,
                ..Tally::default()
            };
            let permit = gate.acquire_owned().await;
            let ws = match client::connect(&url, Mode::Native, &plan).await {
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
            connected_tx.send(ws.is_some()).ok();
            let Some(ws) = ws else { return tally };
            let mut ws = *ws;
            tally.connected = 1;
            // Idle: read (which also answers the server's pings) until told to stop.
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    frame = ws.next() => match frame {
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                        Some(Ok(Message::Close(close))) => {
                            tally.problem(Problem::Closed(close.map_or(1005, |c| u16::from(c.code))));
                            return tally;
                        }
                        Some(Ok(_)) => tally.problem(Problem::UnexpectedFrame),
                        Some(Err(_)) | None => {
                            tally.problem(Problem::Closed(1006));
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
                tally.problem(Problem::Closed(1006));
            }
            tally
        });
    }
    drop(connected_tx);
    // Each task reports once, then holds its connection (and its sender) until released.
    let mut connected = 0;
    for _ in 0..count {
        match connected_rx.recv().await {
            Some(ok) => connected += u64::from(ok),
            None => break,
        }
    }
    Held {
        stop,
        tasks,
        connected,
    }
}

impl Held {
    /// Closes every connection and returns what they counted.
    pub async fn release(mut self) -> Tally {
        self.stop.cancel();
        let mut tally = Tally::default();
        while let Some(done) = self.tasks.join_next().await {
            match done {
                Ok(part) => tally.merge(&part),
                Err(_) => tally.problem(Problem::ConnectFailed),
            }
        }
        tally
    }
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

/// Runs the scenario: connects, waits `hold`, measures, closes.
pub async fn run(config: ConnectionsConfig) -> Result<Summary, ConnectionsError> {
    let started_at = Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true);
    let began = Instant::now();
    let run_id = crate::plan::run_id(config.seed);
    let processes = if config.processes == 0 {
        config.clients.div_ceil(PER_PROCESS).max(1)
    } else {
        config.processes
    };
    let baseline = config.server_pid.and_then(resident_kib);
    let mut tally = Tally::default();
    let mut extra_problems: BTreeMap<String, u64> = BTreeMap::new();
    let mut connected = 0;
    let loaded;
    if processes <= 1 {
        let held = hold(&config.url, 0, config.clients, &run_id).await;
        connected = held.connected;
        tokio::time::sleep(config.hold).await;
        loaded = config.server_pid.and_then(resident_kib);
        tally = held.release().await;
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
            let mut child = Command::new(&exe)
                .args([
                    "connections-part",
                    "--url",
                    &config.url,
                    "--first",
                    &first.to_string(),
                    "--count",
                    &count.to_string(),
                    "--run-id",
                    &run_id,
                ])
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
            let line = next_line(part).await?;
            let ready: PartReport = serde_json::from_str(&line)
                .map_err(|e| ConnectionsError::Child(format!("{e}: {line}")))?;
            connected += ready.connected;
        }
        tokio::time::sleep(config.hold).await;
        loaded = config.server_pid.and_then(resident_kib);
        for part in &mut parts {
            part.stdin
                .write_all(b"stop\n")
                .await
                .map_err(|e| ConnectionsError::Child(e.to_string()))?;
        }
        for mut part in parts {
            let line = next_line(&mut part).await?;
            let report: PartReport = serde_json::from_str(&line)
                .map_err(|e| ConnectionsError::Child(format!("{e}: {line}")))?;
            tally.connected += report.connected;
            for (code, count) in report.refusals {
                *tally.refusals.entry(code).or_default() += count;
            }
            for (problem, count) in report.problems {
                *extra_problems.entry(problem).or_default() += count;
            }
            part.child
                .wait()
                .await
                .map_err(|e| ConnectionsError::Child(e.to_string()))?;
        }
        tally.clients = config.clients as u64;
    }
    let info = RunInfo {
        scenario: "connections".into(),
        label: config.label.clone(),
        protocol: "native".into(),
        url: config.url.clone(),
        started_at,
        offered_rate: None,
        elapsed: began.elapsed(),
        max_concurrent: connected,
    };
    let mut summary = Summary::new(info, &tally);
    for (problem, count) in extra_problems {
        *summary.problems.entry(problem).or_default() += count;
    }
    if connected < config.clients as u64 {
        let missing = config.clients as u64 - connected;
        *summary.problems.entry("not_connected".into()).or_default() += missing;
    }
    summary.ok = summary.problems.is_empty();
    if let (Some(pid), Some(baseline), Some(loaded)) = (config.server_pid, baseline, loaded) {
        summary.memory = Some(Memory {
            server_pid: pid,
            baseline_kib: baseline,
            loaded_kib: loaded,
            per_connection_kib: loaded.saturating_sub(baseline) as f64 / connected.max(1) as f64,
        });
    }
    Ok(summary)
}

async fn next_line(part: &mut Part) -> Result<String, ConnectionsError> {
    part.stdout
        .next_line()
        .await
        .map_err(|e| ConnectionsError::Child(e.to_string()))?
        .ok_or_else(|| ConnectionsError::Child("a client process ended early".into()))
}

/// The child side: holds `count` connections, prints a [`PartReport`] line when they are open,
/// waits for a line (or the end) on standard input, closes them and prints the final report.
pub async fn run_part(url: &str, first: usize, count: usize, run_id: &str) -> PartReport {
    let held = hold(url, first, count, run_id).await;
    let ready = PartReport {
        connected: held.connected,
        ..PartReport::default()
    };
    println!("{}", serde_json::to_string(&ready).unwrap_or_default());
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    stdin.next_line().await.ok();
    PartReport::from_tally(&held.release().await)
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
    fn resident_memory_is_read_from_proc() {
        let kib = resident_kib(std::process::id()).expect("our own status is readable");
        assert!(kib > 0);
        assert_eq!(resident_kib(u32::MAX), None);
    }
}
