//! The real binary under a few hundred thousand messages: its memory follows its load, not the
//! number of messages it has handled. It used to keep about 30 bytes of every message for good
//! (histogram samples nothing drained), which this test sees as 9 MB.

mod support;

use kaiwa_load::plan::Mix;
use kaiwa_load::{LoadConfig, Mode};
use std::net::SocketAddr;
use std::time::Duration;

/// Messages before the first measure: SQLite's page caches and the metrics summaries fill up
/// to their bounds in the first hundred thousand or so.
const WARM: u64 = 150_000;
/// Messages between the two measures.
const MEASURED: u64 = 300_000;
/// Growth allowed per measured message. What the bounded caches still add and the allocator's
/// noise come to 1–4 bytes in release builds; the leak this guards against kept 25–31.
const BYTES_PER_MESSAGE: u64 = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_does_not_grow_with_the_number_of_messages() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_kaiwa"));
    command
        .arg("serve")
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--bind", "127.0.0.1:0", "--log-format", "json"])
        // Every message answered at once, whatever the time of day.
        .args(["--reply-delay-scale", "0", "--max-in-flight", "100000"])
        .args(["--text-window", "00:00-24:00"]);
    let server = support::start_listening("kaiwa", &mut command, dir.path()).await;
    let pid = server.child.id().expect("the server's pid");

    send(server.addr, WARM, 1).await;
    let warm = rss_anon(pid);
    send(server.addr, MEASURED, 2).await;
    let after = rss_anon(pid);

    let grown = after.saturating_sub(warm);
    eprintln!(
        "RssAnon {warm} bytes after {WARM} messages, {after} after {MEASURED} more: {:.1} bytes per message",
        grown as f64 / MEASURED as f64
    );
    assert!(
        grown < MEASURED * BYTES_PER_MESSAGE,
        "RssAnon grew from {warm} to {after} bytes over {MEASURED} messages: {} bytes each",
        grown / MEASURED
    );
}

/// `messages` text messages from 50 clients, as fast as the server answers; all must be
/// answered.
async fn send(addr: SocketAddr, messages: u64, seed: u64) {
    let config = LoadConfig {
        scenario: "throughput".into(),
        label: None,
        urls: vec![format!("ws://{addr}/ws")],
        mode: Mode::Native,
        clients: 50,
        messages: Some(messages),
        duration: None,
        rate: None,
        window: 32,
        mix: Mix::text(),
        seed,
        drain_timeout: Duration::from_secs(60),
        timeout: Duration::from_secs(900),
        progress: false,
        reconnect: false,
        auth: None,
    };
    let summary = kaiwa_load::run(config).await.expect("the run completes");
    assert!(summary.ok, "{}", summary.table());
    assert_eq!(summary.completed, messages, "{}", summary.table());
}

/// The process's anonymous resident memory (heap and stacks, not the mapped binary), in bytes.
fn rss_anon(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("its status");
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("RssAnon:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("an RssAnon line");
    kib * 1024
}
