//! The real binary under a few hundred thousand messages: its heap follows its load, not the
//! number of messages it has handled. It used to keep 20–30 bytes of every message for good
//! (histogram samples nothing drained), which this test sees as 4–6 MB; now the heap is flat
//! to within a few tens of kilobytes (18.12 MB, then 18.06 MB 300,000 messages later).

mod support;

use kaiwa_load::plan::Mix;
use kaiwa_load::{LoadConfig, Mode};
use std::net::SocketAddr;
use std::time::Duration;

/// Messages before the first measure, in which what is bounded fills up to its bound: SQLite's
/// page caches (1 MiB each here).
const WARM: u64 = 150_000;
/// Messages between the two measures.
const MEASURED: u64 = 200_000;
/// Heap growth allowed per measured message; the leak this guards against kept 20–31 bytes,
/// and the summaries' sketches 6–8.
const BYTES_PER_MESSAGE: u64 = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_does_not_grow_with_the_number_of_messages() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut command = support::serve_command(dir.path());
    command
        .args(["--bind", "127.0.0.1:0"])
        // Every message answered at once, whatever the time of day.
        .args(["--reply-delay-scale", "0", "--max-in-flight", "100000"])
        .args(["--text-window", "00:00-24:00"])
        // The page caches full within the warm-up (1 MiB for the writer, 256 KiB for each
        // reader): their defaults would fill over the first hundreds of thousands of messages
        // and look like growth.
        .args(["--sqlite-cache-mib", "1"]);
    let server = support::start_listening("kaiwa", &mut command, dir.path()).await;
    let pid = server.child.id().expect("the server's pid");

    // The same 50 clients in both runs, as a chat's clients come back: what is measured is
    // what a message leaves behind, not what a client id seen once does.
    send(server.addr, WARM, 1).await;
    let (warm, warm_rss) = (settled_heap(server.addr).await, status(pid, "RssAnon"));
    let warm_threads = status(pid, "Threads");
    send(server.addr, MEASURED, 1).await;
    let (after, after_rss) = (settled_heap(server.addr).await, status(pid, "RssAnon"));
    let after_threads = status(pid, "Threads");

    let grown = after.saturating_sub(warm);
    eprintln!(
        "heap {warm} bytes after {WARM} messages, {after} after {MEASURED} more: {:.1} bytes per \
         message (RssAnon {warm_rss} -> {after_rss} KiB, threads {warm_threads} -> {after_threads})",
        grown as f64 / MEASURED as f64
    );
    assert!(
        grown < MEASURED * BYTES_PER_MESSAGE,
        "the heap grew from {warm} to {after} bytes over {MEASURED} messages: {} bytes each",
        grown / MEASURED
    );
}

/// Snapshots of the heap taken once a run is over, of which the least is judged.
const SNAPSHOTS: usize = 3;

/// The heap the server holds once a run has left it: every connection closed, then the least
/// of a few snapshots. One snapshot can catch what is still being freed (sessions torn down,
/// the writer's last batch, jemalloc's thread caches): on a loaded machine that swung one
/// snapshot by 450 KB, more than half of what the whole run may grow. A leak raises the least.
async fn settled_heap(addr: SocketAddr) -> u64 {
    for _ in 0..300 {
        if gauge(addr, "kaiwa_connections").await == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        gauge(addr, "kaiwa_connections").await,
        0,
        "connections left open"
    );
    let mut least = u64::MAX;
    for _ in 0..SNAPSHOTS {
        least = least.min(allocated(addr).await);
    }
    least
}

/// The heap the server's allocator has handed out (`kaiwa_memory_allocated_bytes`), as of a
/// snapshot taken after this call: the gauge is refreshed every 5 s, so this waits for it to
/// change, or for a refresh to have come and found the same heap.
async fn allocated(addr: SocketAddr) -> u64 {
    let before = gauge(addr, "kaiwa_memory_allocated_bytes").await;
    let refreshed = tokio::time::Instant::now() + Duration::from_millis(6_500);
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = gauge(addr, "kaiwa_memory_allocated_bytes").await;
        if now != before || tokio::time::Instant::now() >= refreshed {
            return now;
        }
    }
}

/// A gauge's value from the server's `/metrics`.
async fn gauge(addr: SocketAddr, name: &str) -> u64 {
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .and_then(reqwest::Response::error_for_status)
        .expect("/metrics answers")
        .text()
        .await
        .expect("the metrics");
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse::<f64>().ok())
        .map(|value| value as u64)
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
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

/// A number from the process's `/proc/<pid>/status`, such as `RssAnon` (anonymous resident
/// memory in KiB: shown beside the heap, not judged, as the allocator keeps freed pages for a
/// while) or `Threads`.
fn status(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("its status");
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} line in the status"))
}
