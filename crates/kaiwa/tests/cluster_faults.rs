//! A cluster's dependencies fail under load (issue 11, guarantee 6): RabbitMQ stops and starts
//! again (`rabbitmqctl stop_app` / `start_app`), and, separately, PostgreSQL restarts, while
//! clients send as fast as they are answered. Processes reconnect by themselves; while a
//! dependency is down clients get retryable errors or are refused with a retryable close, never
//! an ack for a message that is not stored; `/health` says `degraded` with the reason; and once
//! the run is over every acked message has its reply set.
//!
//! These tests stop services of the whole machine, so they run alone: scripts/test.sh runs
//! this binary after every other test, one test at a time.

mod support;

use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use support::Client;
use support::cluster::{Cluster, Process, rabbitmqctl};
use tokio::task::JoinSet;

/// Clients sending at once.
const CLIENTS: usize = 4;
/// How long everything gets to settle after the fault.
const SETTLE: Duration = Duration::from_secs(90);

/// What one client sent and had acked.
#[derive(Debug, Default)]
struct Ledger {
    client_id: String,
    acked: BTreeSet<String>,
    /// Error frames (retryable) and refused or broken connections seen.
    errors: usize,
    reconnects: usize,
}

/// A client that sends texts one after another until `stop`, each until it is acked: it
/// resends the same id after a retryable error, and reconnects (resuming) when its connection
/// ends or is refused.
async fn keep_sending(url: String, client_id: String, stop: Arc<AtomicBool>) -> Ledger {
    let mut ledger = Ledger {
        client_id: client_id.clone(),
        ..Ledger::default()
    };
    let mut n = 0;
    let mut client = None;
    while !stop.load(Ordering::Relaxed) {
        let connection = match client.as_mut() {
            Some(connection) => connection,
            None => match connect(&url, &client_id).await {
                Some(connection) => client.insert(connection),
                None => {
                    ledger.reconnects += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            },
        };
        let id = format!("{client_id}-{n}");
        connection
            .send_json(json!({"type": "send", "id": id, "message_type": "text", "content": "still there?"}))
            .await;
        match answer(connection, &id).await {
            Answer::Acked => {
                ledger.acked.insert(id);
                n += 1;
            }
            Answer::Retry => {
                ledger.errors += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Answer::Gone => {
                ledger.errors += 1;
                client = None;
            }
        }
    }
    ledger
}

enum Answer {
    Acked,
    Retry,
    Gone,
}

/// Waits for the server's word on message `id`.
async fn answer(client: &mut Client, id: &str) -> Answer {
    loop {
        let frame = match tokio::time::timeout(Duration::from_secs(15), client.next_raw()).await {
            Ok(Some(frame)) => frame,
            // No answer in time, or the connection ended: the message may or may not be
            // stored; resending its id after reconnecting finds out.
            _ => return Answer::Gone,
        };
        match frame["type"].as_str() {
            Some("ack") if frame["id"] == id => {
                assert_ne!(frame["status"], "rejected", "{frame}");
                return Answer::Acked;
            }
            Some("error") if frame["id"] == id => {
                assert!(
                    matches!(
                        frame["code"].as_str(),
                        Some("busy" | "unavailable" | "internal")
                    ),
                    "only retryable errors while a dependency is down: {frame}"
                );
                return Answer::Retry;
            }
            _ => {}
        }
    }
}

async fn connect(url: &str, client_id: &str) -> Option<Client> {
    let mut client = Client::connect(url, true).await.ok()?;
    client
        .send_json(
            json!({"type": "hello", "client_id": client_id, "timezone": "UTC", "resume": true}),
        )
        .await;
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), client.next_raw())
            .await
            .ok()??;
        match frame["type"].as_str() {
            Some("welcome") => return Some(client),
            Some("error") => {
                // A refusal must say to come back later.
                assert!(
                    matches!(
                        frame["code"].as_str(),
                        Some("internal" | "over_capacity" | "duplicate_connection")
                    ),
                    "{frame}"
                );
            }
            _ => {}
        }
    }
}

/// Runs the load against `gateway` while `fault` runs; returns the ledgers.
async fn under_load(
    gateway: &Process,
    fault: impl std::future::Future<Output = ()>,
) -> Vec<Ledger> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = JoinSet::new();
    for n in 0..CLIENTS {
        clients.spawn(keep_sending(
            gateway.ws_url(),
            format!("steady-{n}"),
            stop.clone(),
        ));
    }
    // Some messages before the fault, the fault, and some after.
    tokio::time::sleep(Duration::from_secs(2)).await;
    fault.await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    clients.join_all().await
}

/// Every acked message is stored once, replied, with one text reply.
async fn every_acked_message_replied(gateway: &Process, ledgers: &[Ledger]) {
    for ledger in ledgers {
        assert!(!ledger.acked.is_empty(), "{ledger:?}");
        let deadline = tokio::time::Instant::now() + SETTLE;
        loop {
            let messages = all_messages(gateway, &ledger.client_id).await;
            let stored: Vec<&str> = messages
                .iter()
                .filter_map(|m| m["client_message_id"].as_str())
                .collect();
            let unique: BTreeSet<&str> = stored.iter().copied().collect();
            assert_eq!(unique.len(), stored.len(), "no message stored twice");
            let missing: Vec<&String> = ledger
                .acked
                .iter()
                .filter(|id| !unique.contains(id.as_str()))
                .collect();
            assert!(missing.is_empty(), "acked but not stored: {missing:?}");
            let unreplied = messages.iter().filter(|m| m["status"] != "replied").count();
            if unreplied == 0 {
                for message in &messages {
                    let replies = message["replies"].as_array().expect("replies");
                    assert_eq!(replies.len(), 1, "one reply set: {message}");
                }
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{unreplied} messages of {} still unreplied after {SETTLE:?}",
                ledger.client_id
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        eprintln!(
            "{}: {} acked, {} retryable errors, {} refused connections",
            ledger.client_id,
            ledger.acked.len(),
            ledger.errors,
            ledger.reconnects
        );
    }
}

async fn all_messages(gateway: &Process, client_id: &str) -> Vec<Value> {
    let mut messages = Vec::new();
    let mut before: Option<i64> = None;
    loop {
        let path = match before {
            Some(cursor) => {
                format!("/api/v1/clients/{client_id}/messages?limit=100&before={cursor}")
            }
            None => format!("/api/v1/clients/{client_id}/messages?limit=100"),
        };
        let (status, page) = gateway.get_json(&path).await;
        if status != 200 {
            // The database may still be coming back.
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        messages.extend(page["messages"].as_array().cloned().unwrap_or_default());
        match page["next_cursor"].as_str().and_then(|c| c.parse().ok()) {
            Some(cursor) => before = Some(cursor),
            None => return messages,
        }
    }
}

/// Waits until `/health` of `process` says `status`; returns the report.
async fn health_says(process: &Process, status: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let health = process.health().await;
        if health["status"] == status {
            return health;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} never said {status}: {health}",
            process.id
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn cluster_of_two() -> (Cluster, Process, Process, Process) {
    let cluster = Cluster::create().await;
    let flags = ["--requeue-after", "3", "--reply-delay-scale", "0.05"];
    let a = cluster.gateway("gw-a", &flags).await;
    let b = cluster.gateway("gw-b", &flags).await;
    let worker = cluster.worker("wk-1", &flags).await;
    (cluster, a, b, worker)
}

#[tokio::test]
async fn rabbitmq_stopping_and_starting_under_load_loses_no_acked_message() {
    let (_cluster, a, _b, worker) = cluster_of_two().await;
    let ledgers = under_load(&a, async {
        rabbitmqctl(&["stop_app"]);
        let health = health_says(&a, "degraded").await;
        assert!(
            health["reason"]
                .as_str()
                .unwrap_or_default()
                .contains("RabbitMQ"),
            "{health}"
        );
        health_says(&worker, "degraded").await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        rabbitmqctl(&["start_app"]);
        rabbitmqctl(&["await_startup"]);
        health_says(&a, "ok").await;
    })
    .await;
    every_acked_message_replied(&a, &ledgers).await;
}

#[tokio::test]
async fn postgresql_restarting_under_load_loses_no_acked_message() {
    let (_cluster, a, _b, _worker) = cluster_of_two().await;
    let ledgers = under_load(&a, async {
        let version = std::fs::read_dir("/etc/postgresql")
            .expect("PostgreSQL's configuration in /etc/postgresql")
            .filter_map(|entry| entry.ok())
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .next()
            .expect("a PostgreSQL version");
        let stopped = std::process::Command::new("pg_ctlcluster")
            .args([
                "--skip-systemctl-redirect",
                &version,
                "main",
                "stop",
                "-m",
                "fast",
            ])
            .status()
            .expect("pg_ctlcluster runs");
        assert!(stopped.success());
        let health = health_says(&a, "degraded").await;
        assert!(health["reason"].is_string(), "{health}");
        tokio::time::sleep(Duration::from_secs(2)).await;
        let started = std::process::Command::new("pg_ctlcluster")
            .args(["--skip-systemctl-redirect", &version, "main", "start"])
            .status()
            .expect("pg_ctlcluster runs");
        assert!(started.success());
        health_says(&a, "ok").await;
    })
    .await;
    every_acked_message_replied(&a, &ledgers).await;
}
