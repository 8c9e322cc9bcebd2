//! What an idle connection costs the real binary: a few thousand verified native clients that
//! say nothing, and the server's resident memory before and after. This is the test build (no
//! optimizations: its futures are larger than a release build's), so its limit is its own;
//! `bench/run.sh` measures the release build against the target of 10 KiB.

mod support;

use kaiwa_load::Mode;
use kaiwa_load::connections::{self, ConnectionsConfig};
use std::time::Duration;

const CONNECTIONS: usize = 3_000;
/// The test build's figure with headroom: 8.6-8.7 KiB at c74f988 (the release build 7.4 at
/// 10,000), 10.7-10.9 before it (a finished-message list and the socket's box kept by every
/// connection: the test fails there with this limit), and 19.3 before the outbox stopped keeping
/// buffers for idle connections and the session's task its setup's locals.
const LIMIT_KIB: f64 = 10.5;
/// Open files this process needs: a socket per connection, and the runtime's, the pipes to the
/// server and the harness's besides. The server inherits the same limit and holds as many.
const OPEN_FILES_NEEDED: u64 = CONNECTIONS as u64 + 256;

/// The open-files soft and hard limits (`RLIMIT_NOFILE`), from /proc/self/limits: none where
/// that cannot be read. No crate of the workspace can set a limit (neither libc nor nix is a
/// dependency), so a limit too low is named rather than raised.
fn open_files_limits() -> Option<(u64, u64)> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let number = |field: &str| match field {
        "unlimited" => Some(u64::MAX),
        field => field.parse().ok(),
    };
    let mut fields = line["Max open files".len()..].split_whitespace();
    Some((number(fields.next()?)?, number(fields.next()?)?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_costs_the_server_little_memory() {
    // Without this, a low limit shows up as refused or failed connections, not as its cause.
    if let Some((soft, hard)) = open_files_limits() {
        let raise = if hard >= OPEN_FILES_NEEDED {
            format!("raise it with `ulimit -n {OPEN_FILES_NEEDED}` (the hard limit is {hard})")
        } else {
            format!(
                "the hard limit is {hard}, so both must be raised (`ulimit -n {OPEN_FILES_NEEDED}` as root)"
            )
        };
        assert!(
            soft >= OPEN_FILES_NEEDED,
            "the open-files soft limit (RLIMIT_NOFILE, `ulimit -n`) is {soft}, and this test needs \
             {OPEN_FILES_NEEDED} for {CONNECTIONS} connections (the server it starts inherits the \
             limit and needs as many): {raise}"
        );
    }
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut command = support::serve_command(dir.path());
    command
        .args(["--bind", "127.0.0.1:0", "--max-clients", "10000"])
        // Idle means idle: no timer of the session's ends it while it is measured.
        .args([
            "--first-message-timeout",
            "86400",
            "--heartbeat-timeout",
            "86400",
        ]);
    let server = support::start_listening("kaiwa", &mut command, dir.path()).await;
    let pid = server.child.id().expect("the server's pid");

    let summary = connections::run(ConnectionsConfig {
        label: None,
        urls: vec![format!("ws://{}/ws", server.addr)],
        clients: CONNECTIONS,
        processes: 1,
        server_pids: vec![pid],
        hold: Duration::from_secs(1),
        exe: None,
        seed: 1,
        auth: None,
        mode: Mode::Native,
    })
    .await
    .expect("the run completes");
    assert!(summary.ok, "{}", summary.table());
    assert_eq!(summary.connected, CONNECTIONS as u64);
    let memory = summary.memory.expect("the server's memory was read");
    eprintln!(
        "{CONNECTIONS} idle connections: {} KiB -> {} KiB, {:.2} KiB each",
        memory.baseline_kib, memory.loaded_kib, memory.per_connection_kib
    );
    assert!(
        memory.per_connection_kib <= LIMIT_KIB,
        "an idle connection costs {:.2} KiB resident, over the limit of {LIMIT_KIB}",
        memory.per_connection_kib
    );
}
