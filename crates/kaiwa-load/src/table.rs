//! The benchmark table: reads the JSON reports of several runs (and of the store benchmark) and
//! prints one table, with kaiwa's throughput as a ratio of the echo ceiling at the same client
//! count and each figure checked against its target.

use crate::report::{Summary, ms};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;

/// The JSON line the store benchmark (`cargo run -p kaiwa --example store_bench`) prints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoreBench {
    pub scenario: String,
    pub label: Option<String>,
    pub messages: u64,
    pub writers: u64,
    pub seconds: f64,
    pub messages_per_second: f64,
}

/// One report file.
#[derive(Debug, Clone, PartialEq)]
pub enum Report {
    Run(Box<Summary>),
    Store(StoreBench),
}

impl Report {
    pub fn parse(text: &str) -> Result<Self, serde_json::Error> {
        match serde_json::from_str::<Summary>(text) {
            Ok(summary) => Ok(Self::Run(Box::new(summary))),
            Err(err) => serde_json::from_str::<StoreBench>(text)
                .map(Self::Store)
                .map_err(|_| err),
        }
    }
}

/// Targets for this machine (issue 3; idle memory, issue 20).
pub const THROUGHPUT_RATIO_TARGET: f64 = 0.30;
pub const P99_TARGET_MS: f64 = 10.0;
pub const P99_TARGET_RATE: f64 = 1_000.0;
pub const MEMORY_TARGET_KIB: f64 = 10.0;

/// A run's own p99 target at [`P99_TARGET_RATE`], by label (`--p99-target cluster-rate-1000=25`):
/// a cluster is held to its own target, not to one process's.
#[derive(Debug, Clone, PartialEq)]
pub struct P99Target {
    pub label: String,
    pub ms: f64,
}

#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a p99 target: use LABEL=MS, e.g. cluster-rate-1000=25")]
pub struct BadP99Target(String);

impl std::str::FromStr for P99Target {
    type Err = BadP99Target;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || BadP99Target(text.to_owned());
        let (label, ms) = text.split_once('=').ok_or_else(bad)?;
        let ms: f64 = ms.trim().parse().map_err(|_| bad())?;
        if label.trim().is_empty() || !ms.is_finite() || ms <= 0.0 {
            return Err(bad());
        }
        Ok(Self {
            label: label.trim().to_owned(),
            ms,
        })
    }
}

/// The table, one line per report, with targets checked where they apply; `p99_targets`
/// replaces [`P99_TARGET_MS`] for the runs they name.
pub fn render(reports: &[Report], p99_targets: &[P99Target]) -> String {
    let runs: Vec<&Summary> = reports
        .iter()
        .filter_map(|report| match report {
            Report::Run(summary) => Some(summary.as_ref()),
            Report::Store(_) => None,
        })
        .collect();
    let echo_at = |clients: u64| {
        runs.iter()
            .find(|s| s.protocol == "echo" && s.clients == clients && s.offered_rate.is_none())
            .map(|s| s.throughput)
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<22} {:<11} {:>7} {:>12} {:>9} {:>9} {:>9} {:>10} {:>5}  target",
        "run", "scenario", "clients", "msg/s", "vs echo", "p50 ms", "p99 ms", "KiB/conn", "ok"
    );
    for report in reports {
        match report {
            Report::Run(s) => {
                let label = row_label(s);
                let ratio = (s.protocol != "echo" && s.offered_rate.is_none() && s.sent > 0)
                    .then(|| echo_at(s.clients))
                    .flatten()
                    .filter(|echo| *echo > 0.0)
                    .map(|echo| s.throughput / echo);
                let reply = s.all_reply_ms.as_ref();
                let memory = s.memory.as_ref().map(|m| m.per_connection_kib);
                // Each gateway is held to the target, so one cannot hide behind another.
                let worst = s
                    .memory_by_gateway
                    .iter()
                    .map(|g| g.per_connection_kib)
                    .fold(memory, |worst, kib| Some(worst.map_or(kib, |w| w.max(kib))));
                let mut target = String::new();
                if let Some(ratio) = ratio {
                    target = verdict(
                        ratio >= THROUGHPUT_RATIO_TARGET,
                        &format!("≥ {:.0}% of echo", THROUGHPUT_RATIO_TARGET * 100.0),
                    );
                }
                if s.offered_rate == Some(P99_TARGET_RATE)
                    && let Some(reply) = reply
                {
                    let limit = p99_targets
                        .iter()
                        .find(|t| s.label.as_deref() == Some(t.label.as_str()))
                        .map_or(P99_TARGET_MS, |t| t.ms);
                    target = verdict(reply.p99 < limit, &format!("p99 < {limit} ms"));
                }
                if let Some(kib) = worst {
                    target = verdict(
                        kib <= MEMORY_TARGET_KIB,
                        &format!("≤ {MEMORY_TARGET_KIB} KiB"),
                    );
                }
                let throughput = if s.sent > 0 {
                    match s.offered_rate {
                        Some(rate) => format!("{:.0}/{rate:.0}", s.throughput),
                        None => format!("{:.0}", s.throughput),
                    }
                } else {
                    "-".into()
                };
                let _ = writeln!(
                    out,
                    "{:<22} {:<11} {:>7} {:>12} {:>9} {:>9} {:>9} {:>10} {:>5}  {target}",
                    label,
                    s.scenario,
                    s.clients,
                    throughput,
                    ratio.map_or("-".into(), |r| format!("{:.0}%", r * 100.0)),
                    reply.map_or("-".into(), |q| ms(q.p50)),
                    reply.map_or("-".into(), |q| ms(q.p99)),
                    memory.map_or("-".into(), |k| format!("{k:.1}")),
                    if s.ok { "yes" } else { "NO" },
                );
            }
            Report::Store(b) => {
                let label = b.label.clone().unwrap_or_else(|| "store".into());
                let _ = writeln!(
                    out,
                    "{:<22} {:<11} {:>7} {:>12} {:>9} {:>9} {:>9} {:>10} {:>5}  {} messages, SQLite alone",
                    label,
                    b.scenario,
                    b.writers,
                    format!("{:.0}", b.messages_per_second),
                    "-",
                    "-",
                    "-",
                    "-",
                    "yes",
                    b.messages,
                );
            }
        }
    }
    out
}

/// A run's label, with the protocol it spoke when that is not kaiwa's own and the label does
/// not say it: a legacy run's row must not pass for a native one's.
fn row_label(s: &Summary) -> String {
    let label = s.label.clone().unwrap_or_else(|| s.scenario.clone());
    if matches!(s.protocol.as_str(), "native" | "echo") || label.contains(&s.protocol) {
        label
    } else {
        format!("{label} ({})", s.protocol)
    }
}

fn verdict(met: bool, target: &str) -> String {
    format!("{target}: {}", if met { "met" } else { "MISSED" })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{Memory, Quantiles, RunInfo, Tally};
    use std::time::Duration;

    /// A run of idle connections, each holding `per_connection_kib`.
    fn idle(label: &str, protocol: &str, per_connection_kib: f64) -> Summary {
        let mut idle = summary(label, protocol, 0.0);
        idle.sent = 0;
        idle.memory = Some(Memory {
            server_pid: 1,
            server_pids: vec![1],
            baseline_kib: 1_000,
            loaded_kib: 1_000 + (per_connection_kib * 10_000.0) as u64,
            per_connection_kib,
        });
        idle
    }

    fn summary(label: &str, protocol: &str, throughput: f64) -> Summary {
        let info = RunInfo {
            scenario: "throughput".into(),
            label: Some(label.into()),
            protocol: protocol.into(),
            urls: vec!["ws://127.0.0.1:1/ws".into()],
            started_at: String::new(),
            offered_rate: None,
            elapsed: Duration::from_secs(1),
            max_concurrent: 50,
        };
        let mut summary = Summary::new(info, &Tally::default());
        summary.clients = 50;
        summary.sent = 100;
        summary.throughput = throughput;
        summary
    }

    #[test]
    fn kaiwa_is_shown_as_a_share_of_the_echo_ceiling_at_the_same_client_count() {
        let echo = summary("echo", "echo", 40_000.0);
        let kaiwa = summary("kaiwa", "native", 10_000.0);
        let table = render(
            &[Report::Run(Box::new(echo)), Report::Run(Box::new(kaiwa))],
            &[],
        );
        let kaiwa_line = table
            .lines()
            .find(|l| l.starts_with("kaiwa"))
            .expect("a line");
        assert!(kaiwa_line.contains("25%"), "{table}");
        assert!(kaiwa_line.contains("MISSED"), "{table}");
    }

    #[test]
    fn latency_and_memory_targets_are_checked() {
        let mut rate = summary("rate-1000", "native", 1_000.0);
        rate.offered_rate = Some(1_000.0);
        rate.all_reply_ms = Some(Quantiles {
            count: 1,
            p50: 1.0,
            p90: 2.0,
            p99: 3.0,
            p999: 4.0,
            max: 5.0,
        });
        let idle = idle("idle-10000", "native", 10.0);
        let table = render(
            &[Report::Run(Box::new(rate)), Report::Run(Box::new(idle))],
            &[],
        );
        assert!(table.contains("p99 < 10 ms: met"), "{table}");
        assert!(table.contains("≤ 10 KiB: met"), "{table}");
    }

    #[test]
    fn a_run_named_with_a_target_of_its_own_is_held_to_it() {
        let at = |label: &str, p99: f64| {
            let mut rate = summary(label, "native", 1_000.0);
            rate.offered_rate = Some(1_000.0);
            rate.all_reply_ms = Some(Quantiles {
                count: 1,
                p50: 1.0,
                p90: 2.0,
                p99,
                p999: p99,
                max: p99,
            });
            Report::Run(Box::new(rate))
        };
        let targets = ["cluster-rate-1000=25".parse().expect("a target")];
        let table = render(
            &[at("cluster-rate-1000", 20.0), at("serve-rate-1000", 20.0)],
            &targets,
        );
        let line = |label: &str| {
            table
                .lines()
                .find(|l| l.starts_with(label))
                .expect("a line")
                .to_owned()
        };
        assert!(line("cluster").ends_with("p99 < 25 ms: met"), "{table}");
        assert!(line("serve").ends_with("p99 < 10 ms: MISSED"), "{table}");
        for bad in ["cluster", "=25", "cluster=", "cluster=-1", "cluster=fast"] {
            assert!(bad.parse::<P99Target>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_row_names_the_protocol_its_run_spoke() {
        let table = render(
            &[
                ("idle-10000", "native"),
                ("idle-10000", "legacy"),
                ("idle-path-10000", "path"),
            ]
            .map(|(label, protocol)| Report::Run(Box::new(idle(label, protocol, 7.9)))),
            &[],
        );
        let rows: Vec<&str> = table.lines().skip(1).collect();
        assert!(rows[0].starts_with("idle-10000 "), "{table}");
        assert!(rows[1].starts_with("idle-10000 (legacy) "), "{table}");
        assert!(rows[2].starts_with("idle-path-10000 "), "{table}");
        assert!(
            rows.iter().all(|row| row.ends_with("≤ 10 KiB: met")),
            "{table}"
        );
    }

    #[test]
    fn store_reports_parse_beside_run_summaries() {
        let line = r#"{"scenario":"store","label":null,"messages":1000,"writers":64,"seconds":0.5,"messages_per_second":2000.0}"#;
        assert!(matches!(Report::parse(line), Ok(Report::Store(_))));
        assert!(Report::parse("{}").is_err());
    }
}
