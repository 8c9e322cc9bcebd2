//! kaiwa as a cluster (issue 11): real `kaiwa gateway` and `kaiwa worker` processes over the
//! machine's PostgreSQL and RabbitMQ, each test on a database and a vhost of its own. Every
//! guarantee is checked through what clients see and through the history API, never the logs.

mod support;

use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use support::cluster::{Cluster, Process};
use support::{Client, Closed, files, send, send_file};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

/// Longest a cluster-wide state change may take to show (a lease ending, a sweep).
const SETTLE: Duration = Duration::from_secs(40);

/// A native client on `gateway`, after `welcome`; `hello` adds fields (resume, after).
async fn native(gateway: &Process, client_id: &str, hello: Value) -> Client {
    match connect(gateway, client_id, hello).await {
        Ok(client) => client,
        Err(closed) => panic!("{client_id} refused by {}: {closed:?}", gateway.id),
    }
}

/// A native client's handshake: the client after `welcome`, or how it was refused.
async fn connect(gateway: &Process, client_id: &str, hello: Value) -> Result<Client, Closed> {
    connect_to(&gateway.ws_url(), client_id, hello).await
}

async fn connect_to(url: &str, client_id: &str, hello: Value) -> Result<Client, Closed> {
    let mut client = Client::connect(url, true)
        .await
        .expect("the WebSocket opens");
    let mut frame = json!({"type": "hello", "client_id": client_id, "timezone": "UTC"});
    if let (Some(frame), Some(extra)) = (frame.as_object_mut(), hello.as_object()) {
        frame.extend(extra.clone());
    }
    client.send_json(frame).await;
    loop {
        let answer = client.next().await?;
        match answer["type"].as_str() {
            Some("welcome") => return Ok(client),
            // The refusal's error frame; its close frame follows.
            Some("error") => continue,
            _ => panic!("unexpected answer to hello: {answer}"),
        }
    }
}

/// The client's stored messages with their replies, oldest first.
async fn history(gateway: &Process, client_id: &str) -> Vec<Value> {
    let (status, page) = gateway
        .get_json(&format!("/api/v1/clients/{client_id}/messages?limit=100"))
        .await;
    assert_eq!(status, 200, "{page}");
    let mut messages = page["messages"].as_array().cloned().unwrap_or_default();
    messages.reverse();
    messages
}

/// Polls `check` every 50 ms until it gives a value, for at most `within`.
async fn within<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until every message of `client_id` is replied, and returns the history.
async fn all_replied(gateway: &Process, client_id: &str, count: usize) -> Vec<Value> {
    within(SETTLE, "every message replied", || async {
        let messages = history(gateway, client_id).await;
        (messages.len() == count && messages.iter().all(|m| m["status"] == "replied"))
            .then_some(messages)
    })
    .await
}

/// The reply types of a message, which must each be there once.
fn reply_types(message: &Value) -> Vec<String> {
    let mut types: Vec<String> = message["replies"]
        .as_array()
        .expect("replies")
        .iter()
        .map(|reply| reply["reply_type"].as_str().unwrap_or_default().to_owned())
        .collect();
    types.sort();
    types
}

/// Reads frames until the replies with these `seq`s have all arrived; returns them by seq.
async fn replies_until(client: &mut Client, seqs: &BTreeSet<u64>) -> BTreeMap<u64, Value> {
    let mut got = BTreeMap::new();
    while !seqs.iter().all(|seq| got.contains_key(seq)) {
        let frame = client.next_json().await;
        if frame["type"] == "reply" {
            let seq = frame["seq"].as_u64().expect("a seq");
            assert!(
                got.insert(seq, frame.clone()).is_none(),
                "reply {seq} arrived twice: {frame}"
            );
        }
    }
    got
}

#[tokio::test]
async fn a_reply_reaches_the_client_on_the_gateway_it_moved_to() {
    let cluster = Cluster::create().await;
    let a = cluster.gateway("gw-a", &[]).await;
    let b = cluster.gateway("gw-b", &[]).await;
    // Voice replies wait 1-2 s times the scale: time enough to move.
    let _worker = cluster.worker("wk-1", &["--reply-delay-scale", "2"]).await;

    let mut on_a = native(&a, "mover", json!({})).await;
    on_a.send_json(send_file("v1", "voice", "on-my-way.wav", &files::wav()))
        .await;
    let ack = on_a.until(|f| f["type"] == "ack").await;
    assert_eq!(ack["status"], "accepted", "{ack}");
    on_a.close().await;

    // Resumes on B before the replies are made (they take at least 2 s).
    let mut on_b = native(&b, "mover", json!({"resume": true})).await;
    let replies = replies_until(&mut on_b, &BTreeSet::from([1, 2])).await;
    assert!(
        replies.values().all(|r| r["id"] == "v1"),
        "both replies answer v1: {replies:?}"
    );
    on_b.received(2).await;
    let messages = all_replied(&b, "mover", 1).await;
    assert_eq!(reply_types(&messages[0]), ["text", "voice"]);
    within(SETTLE, "both replies recorded delivered", || async {
        let messages = history(&a, "mover").await;
        messages[0]["replies"]
            .as_array()
            .is_some_and(|r| r.iter().all(|r| r["delivery"] == "delivered"))
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_worker_killed_mid_job_leaves_each_message_exactly_one_reply_set() {
    let cluster = Cluster::create().await;
    let gateway = cluster.gateway("gw-a", &[]).await;
    // Replies wait 2-4 s (voice): the kill lands while every job is held by this worker.
    let doomed = cluster
        .worker("wk-doomed", &["--reply-delay-scale", "2"])
        .await;
    let mut client = native(&gateway, "survivor", json!({})).await;
    let wav = files::wav();
    for n in 0..20 {
        client
            .send_json(send_file(&format!("m{n}"), "voice", "hello.wav", &wav))
            .await;
    }
    let mut processing = BTreeSet::new();
    while processing.len() < 20 {
        let frame = client.next_json().await;
        if frame["type"] == "status" && frame["status"] == "processing" {
            processing.insert(frame["id"].as_str().unwrap_or_default().to_owned());
        }
        assert_ne!(
            frame["type"], "reply",
            "a reply came before the kill: {frame}"
        );
    }
    doomed.kill().await;
    // Its jobs go back to the queue and to the next worker.
    let _heir = cluster
        .worker("wk-heir", &["--reply-delay-scale", "0.01"])
        .await;
    let seqs: BTreeSet<u64> = (1..=40).collect();
    let replies = replies_until(&mut client, &seqs).await;
    let mut per_message: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for reply in replies.values() {
        per_message
            .entry(reply["id"].as_str().unwrap_or_default().to_owned())
            .or_default()
            .push(
                reply["reply"]["reply_type"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            );
    }
    assert_eq!(per_message.len(), 20, "{per_message:?}");
    for (id, mut types) in per_message {
        types.sort();
        assert_eq!(types, ["text", "voice"], "{id}");
    }
    let messages = all_replied(&gateway, "survivor", 20).await;
    for message in &messages {
        assert_eq!(reply_types(message), ["text", "voice"], "{message}");
    }
    let rows = cluster.sql_scalar("SELECT COUNT(*) FROM replies").await;
    assert_eq!(rows, 40, "no reply row twice");
}

#[tokio::test]
async fn the_client_limit_counts_every_gateway_and_is_never_passed() {
    let cluster = Cluster::create().await;
    let a = cluster.gateway("gw-a", &["--max-clients", "50"]).await;
    let b = cluster.gateway("gw-b", &["--max-clients", "50"]).await;
    // 100 connections at once, half to each gateway.
    let attempts = (0..100).map(|n| {
        let gateway = if n % 2 == 0 { &a } else { &b };
        async move { connect(gateway, &format!("crowd-{n}"), json!({})).await }
    });
    let outcomes = futures::future::join_all(attempts).await;
    let mut admitted = Vec::new();
    let mut refused = Vec::new();
    for outcome in outcomes {
        match outcome {
            Ok(client) => admitted.push(client),
            Err(closed) => refused.push(closed),
        }
    }
    assert_eq!(admitted.len(), 50, "exactly the limit is admitted");
    assert!(
        refused.iter().all(|closed| closed.code == 1013),
        "the rest are told the server is full: {refused:?}"
    );
    let health = a.health().await;
    assert_eq!(health["cluster"]["clients"], 50, "{health}");

    // One leaving frees one slot, for either gateway.
    admitted.pop().expect("a client").close().await;
    let late = within(SETTLE, "a slot freed by a client that left", || async {
        connect(&b, "latecomer", json!({})).await.ok()
    })
    .await;
    assert_eq!(
        connect(&a, "one-too-many", json!({}))
            .await
            .err()
            .map(|c| c.code),
        Some(1013)
    );
    drop(late);
}

#[tokio::test]
async fn one_connection_per_client_id_across_gateways_refuse_and_replace() {
    let cluster = Cluster::create().await;
    let a = cluster.gateway("gw-a", &[]).await;
    let b = cluster.gateway("gw-b", &[]).await;
    let _first = native(&a, "solo", json!({})).await;
    let refused = connect(&b, "solo", json!({})).await.err();
    assert_eq!(
        refused.map(|c| c.code),
        Some(4509),
        "refused on another gateway"
    );

    let c = cluster
        .gateway("gw-c", &["--duplicate-connection", "replace"])
        .await;
    let mut old = native(&a, "twin", json!({})).await;
    let mut new = native(&c, "twin", json!({})).await;
    let closed = old.closed().await;
    assert_eq!(
        closed.code, 4510,
        "the older connection is replaced: {closed:?}"
    );
    new.send_json(send("t1", "text", "still here")).await;
    let ack = new.until(|f| f["type"] == "ack").await;
    assert_eq!(ack["status"], "accepted", "{ack}");
}

#[tokio::test]
async fn a_killed_gateway_gives_back_its_clients_within_the_lease() {
    let cluster = Cluster::create().await;
    let flags = ["--max-clients", "3", "--lease", "2"];
    let a = cluster.gateway("gw-a", &flags).await;
    let b = cluster.gateway("gw-b", &flags).await;
    let mut held = Vec::new();
    for n in 0..3 {
        held.push(native(&a, &format!("held-{n}"), json!({})).await);
    }
    assert_eq!(
        connect(&b, "waiting", json!({}))
            .await
            .err()
            .map(|c| c.code),
        Some(1013),
        "the cluster is full"
    );
    let killed_at = tokio::time::Instant::now();
    a.kill().await;
    drop(held);
    // The same client ids come back on B, once A's lease has run out.
    for n in 0..3 {
        within(SETTLE, "a slot and the id back after the lease", || async {
            connect(&b, &format!("held-{n}"), json!({})).await.ok()
        })
        .await;
    }
    let waited = killed_at.elapsed();
    assert!(
        waited < Duration::from_secs(15),
        "given back within the 15 s the docs promise (lease 2 s): took {waited:?}"
    );
}

#[tokio::test]
async fn a_client_whose_gateway_was_killed_is_taken_elsewhere_before_the_lease_ends() {
    let cluster = Cluster::create().await;
    // A lease far longer than the test may wait: only the holder's death can explain a claim.
    let flags = ["--lease", "120"];
    let a = cluster.gateway("gw-a", &flags).await;
    let b = cluster.gateway("gw-b", &flags).await;
    let held = native(&a, "wanderer", json!({})).await;
    // Alive, A keeps the id: the default policy refuses a second connection elsewhere.
    assert_eq!(
        connect(&b, "wanderer", json!({}))
            .await
            .err()
            .map(|c| c.code),
        Some(4509)
    );
    a.kill().await;
    drop(held);
    let started = tokio::time::Instant::now();
    let mut client = within(Duration::from_secs(20), "the id taken on B", || async {
        connect(&b, "wanderer", json!({})).await.ok()
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "taken while A's lease still ran"
    );
    client.send_json(send("after", "text", "still here")).await;
    client.until(|f| f["type"] == "ack").await;
}

/// A TCP proxy in front of one address that can stop forwarding without closing anything:
/// a network that died under a connection, as the server sees it.
struct Proxy {
    addr: SocketAddr,
    frozen: Arc<AtomicBool>,
}

impl Proxy {
    async fn to(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
        let addr = listener.local_addr().expect("its address");
        let frozen = Arc::new(AtomicBool::new(false));
        let stop = frozen.clone();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let outbound = TcpStream::connect(upstream)
                    .await
                    .expect("the upstream answers");
                let (a_read, a_write) = inbound.into_split();
                let (b_read, b_write) = outbound.into_split();
                tokio::spawn(pipe(a_read, b_write, stop.clone()));
                tokio::spawn(pipe(b_read, a_write, stop.clone()));
            }
        });
        Proxy { addr, frozen }
    }

    fn freeze(&self) {
        self.frozen.store(true, Ordering::Relaxed);
    }
}

/// Copies bytes until frozen; then reads nothing more and keeps both sockets open.
async fn pipe(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, frozen: Arc<AtomicBool>) {
    let mut buffer = vec![0; 16 * 1024];
    loop {
        let read = tokio::select! {
            read = from.read(&mut buffer) => read,
            () = async {
                while !frozen.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            } => break,
        };
        match read {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if frozen.load(Ordering::Relaxed) {
                    break;
                }
                if to.write_all(&buffer[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
    // Frozen: both halves stay open (they live in this future), silently, until the test ends.
    std::future::pending::<()>().await;
}

#[tokio::test]
async fn a_client_whose_network_died_under_one_gateway_is_admitted_on_another_at_once() {
    let cluster = Cluster::create().await;
    // The defaults: a dead connection is found by its heartbeat only after 60 s.
    let a = cluster.gateway("gw-a", &[]).await;
    let b = cluster.gateway("gw-b", &[]).await;
    let proxy = Proxy::to(a.addr).await;
    let first = connect_to(&format!("ws://{}/ws", proxy.addr), "cut-off", json!({}))
        .await
        .expect("admitted on A");
    proxy.freeze();
    // Silent for longer than a live client may be without being pinged first.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let started = tokio::time::Instant::now();
    let second = connect(&b, "cut-off", json!({})).await;
    let waited = started.elapsed();
    assert!(
        second.is_ok(),
        "refused on B although A's connection does not answer: {:?}",
        second.err()
    );
    assert!(
        waited < Duration::from_secs(8),
        "admitted on B only after {waited:?}"
    );
    eprintln!("admitted on B {waited:?} after asking");
    drop(first);
}

#[tokio::test]
async fn replies_a_killed_gateway_left_pending_are_failed_when_its_lease_ends() {
    let cluster = Cluster::create().await;
    let flags = ["--lease", "2", "--reply-delay-scale", "0"];
    let a = cluster.gateway("gw-a", &flags).await;
    let b = cluster.gateway("gw-b", &flags).await;
    let _worker = cluster.worker("wk-1", &flags).await;
    // Replies handed to the client, never acknowledged: `pending`, as a client whose network
    // died would leave them.
    let mut client = native(&a, "forgetful", json!({})).await;
    client.send_json(send("m1", "text", "hello?")).await;
    client.until(|f| f["type"] == "reply").await;
    let pending = history(&b, "forgetful").await;
    assert_eq!(
        pending[0]["replies"][0]["delivery"], "pending",
        "{pending:?}"
    );
    a.kill().await;
    drop(client);
    // B's next lease renewal after A's lease ran out settles them.
    within(SETTLE, "the pending reply recorded failed", || async {
        let messages = history(&b, "forgetful").await;
        (messages[0]["replies"][0]["delivery"] == "failed").then_some(())
    })
    .await;
    // The client still gets it, through B, when it resumes.
    let mut back = native(&b, "forgetful", json!({"resume": true})).await;
    let replayed = back.until(|f| f["type"] == "reply").await;
    assert_eq!(replayed["seq"], 1, "{replayed}");
}

/// Gateway `gw-a`, whose broker stops answering, admits three messages of `client_id` (stored
/// and acked, their jobs waiting) and is killed: they have no job anywhere. Also starts the
/// worker that will process them; returns it with the instant of the kill.
async fn stranded_by_a_killed_gateway(
    cluster: &Cluster,
    flags: &[&str],
    client_id: &str,
) -> (Process, tokio::time::Instant) {
    let broker = Proxy::to(cluster.broker_addr()).await;
    let a = cluster.gateway_via("gw-a", flags, Some(broker.addr)).await;
    let worker = cluster.worker("wk-1", flags).await;
    broker.freeze();
    let mut client = native(&a, client_id, json!({})).await;
    for n in 0..3 {
        client
            .send_json(send(&format!("s{n}"), "text", "anyone there?"))
            .await;
        let ack = client.until(|f| f["type"] == "ack").await;
        assert_eq!(ack["status"], "accepted", "{ack}");
    }
    a.kill().await;
    drop(client);
    (worker, tokio::time::Instant::now())
}

#[tokio::test]
async fn messages_a_gateway_died_with_before_publishing_are_queued_when_its_lease_ends() {
    let cluster = Cluster::create().await;
    // The stuck sweep far off: only the pass for a dead gateway's messages can queue them.
    let flags = [
        "--lease",
        "2",
        "--requeue-after",
        "300",
        "--reply-delay-scale",
        "0",
    ];
    let b = cluster.gateway("gw-b", &flags).await;
    let (_worker, killed) = stranded_by_a_killed_gateway(&cluster, &flags, "stranded").await;
    all_replied(&b, "stranded", 3).await;
    let waited = killed.elapsed();
    eprintln!("replied {waited:?} after the gateway was killed (lease 2 s)");
    assert!(
        waited < Duration::from_secs(12),
        "queued again by the lease, not the 300 s sweep: took {waited:?}"
    );
}

#[tokio::test]
async fn messages_a_gateway_died_with_before_publishing_are_queued_when_it_comes_back() {
    let cluster = Cluster::create().await;
    // Neither the lease nor the stuck sweep can queue them in time: only the gateway's own
    // start, taking back what its last run left.
    let flags = [
        "--lease",
        "60",
        "--requeue-after",
        "300",
        "--reply-delay-scale",
        "0",
    ];
    let (_worker, killed) = stranded_by_a_killed_gateway(&cluster, &flags, "left-behind").await;
    let back = cluster.gateway("gw-a", &flags).await;
    all_replied(&back, "left-behind", 3).await;
    let waited = killed.elapsed();
    eprintln!("replied {waited:?} after the gateway was killed and started again");
    assert!(
        waited < Duration::from_secs(12),
        "queued again by the gateway's start, not the lease (60 s) or the sweep (300 s): took {waited:?}"
    );
}

#[tokio::test]
async fn the_in_flight_limit_holds_across_gateways() {
    let cluster = Cluster::create().await;
    let flags = ["--max-in-flight", "6", "--max-in-flight-per-client", "6"];
    let a = cluster.gateway("gw-a", &flags).await;
    let b = cluster.gateway("gw-b", &flags).await;
    // No worker yet: nothing leaves flight.
    let mut on_a = native(&a, "left", json!({})).await;
    let mut on_b = native(&b, "right", json!({})).await;
    for n in 0..5 {
        on_a.send_json(send(&format!("a{n}"), "text", "hi")).await;
        on_b.send_json(send(&format!("b{n}"), "text", "hi")).await;
    }
    let mut accepted = 0;
    let mut busy = 0;
    for client in [&mut on_a, &mut on_b] {
        for _ in 0..5 {
            let frame = client
                .until(|f| f["type"] == "ack" || f["type"] == "error")
                .await;
            match (frame["type"].as_str(), frame["code"].as_str()) {
                (Some("ack"), _) => accepted += 1,
                (Some("error"), Some("busy")) => busy += 1,
                _ => panic!("unexpected: {frame}"),
            }
        }
    }
    assert_eq!(
        (accepted, busy),
        (6, 4),
        "six in flight in the whole cluster"
    );
    let health = b.health().await;
    assert_eq!(health["cluster"]["in_flight"], 6, "{health}");
    // A worker brings them down; then there is room again.
    let _worker = cluster.worker("wk-1", &["--reply-delay-scale", "0"]).await;
    within(SETTLE, "the six replied", || async {
        (b.health().await["cluster"]["in_flight"] == 0).then_some(())
    })
    .await;
    on_a.send_json(send("a9", "text", "again")).await;
    let ack = on_a.until(|f| f["type"] == "ack").await;
    assert_eq!(ack["status"], "accepted", "{ack}");
}

#[tokio::test]
async fn jobs_lost_with_the_broker_are_queued_again_by_the_sweeper() {
    let cluster = Cluster::create().await;
    let gateway = cluster.gateway("gw-a", &["--requeue-after", "1"]).await;
    let mut client = native(&gateway, "patient", json!({})).await;
    for n in 0..5 {
        client
            .send_json(send(&format!("p{n}"), "text", "anyone?"))
            .await;
    }
    for _ in 0..5 {
        let ack = client.until(|f| f["type"] == "ack").await;
        assert_eq!(ack["status"], "accepted", "{ack}");
    }
    // No worker has taken them; the broker loses them (and whatever copies the sweeper has
    // queued meanwhile).
    within(SETTLE, "the jobs queued", || async {
        (cluster.vhost.ready("kaiwa.jobs") >= 5).then_some(())
    })
    .await;
    cluster.vhost.purge_jobs();
    let _worker = cluster
        .worker(
            "wk-1",
            &["--reply-delay-scale", "0", "--requeue-after", "1"],
        )
        .await;
    let replies = replies_until(&mut client, &(1..=5).collect()).await;
    assert_eq!(replies.len(), 5);
    let messages = all_replied(&gateway, "patient", 5).await;
    for message in &messages {
        assert_eq!(reply_types(message), ["text"], "{message}");
    }
}

#[tokio::test]
async fn health_names_the_role_and_id_and_counts_the_cluster() {
    let cluster = Cluster::create().await;
    let gateway = cluster.gateway("gw-a", &[]).await;
    let worker = cluster.worker("wk-1", &[]).await;
    let _client = native(&gateway, "counted", json!({})).await;
    let health = gateway.health().await;
    assert_eq!(health["role"], "gateway", "{health}");
    assert_eq!(health["id"], "gw-a");
    assert_eq!(health["cluster"]["clients"], 1);
    assert_eq!(health["cluster"]["gateways"], 1);
    assert_eq!(health["queue_depth"], 0);
    let health = worker.health().await;
    assert_eq!(health["role"], "worker", "{health}");
    assert_eq!(health["id"], "wk-1");
    assert_eq!(health["cluster"]["clients"], 1);
    assert!(health.get("connections").is_none(), "{health}");
    // A worker serves no clients.
    assert_eq!(
        worker.get_json("/api/v1/clients/counted/messages").await.0,
        404
    );
    worker.stop().await;
    gateway.stop().await;
}

#[tokio::test]
async fn a_workers_metrics_and_detailed_health_need_the_admin_token_like_a_gateways() {
    const ADMIN: &str = "an-admin-token-for-the-tests";
    let cluster = Cluster::create().await;
    let worker = cluster.worker("wk-admin", &["--admin-token", ADMIN]).await;
    let (status, body) = worker.get_json("/metrics").await;
    assert_eq!((status, &body["code"]), (401, &json!("missing_token")));
    let (status, liveness) = worker.get_json("/health").await;
    assert_eq!((status, liveness), (200, json!({"status": "ok"})));
    let client = reqwest::Client::new();
    let detailed: Value = client
        .get(worker.url("/health"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("HTTP works")
        .json()
        .await
        .expect("JSON");
    assert_eq!(detailed["role"], "worker", "{detailed}");
    let metrics = client
        .get(worker.url("/metrics"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("HTTP works");
    assert!(metrics.status() == 200 || metrics.status() == 404);
    worker.stop().await;
}

#[test]
fn invalid_combinations_fail_at_start_with_a_clear_message() {
    let run = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_kaiwa"))
            .args(args)
            .env_remove("KAIWA_QUEUE_URL")
            .env_remove("KAIWA_DATABASE_URL")
            .env_remove("DATABASE_URL")
            .output()
            .expect("kaiwa runs");
        assert_eq!(output.status.code(), Some(1), "{args:?}: {output:?}");
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let dir = tempfile::tempdir().expect("a temporary directory");
    let data = dir.path().to_str().expect("a path");
    let printed = run(&["worker", "--data-dir", data]);
    assert!(
        printed.contains("kaiwa worker needs --queue-url"),
        "{printed}"
    );
    let printed = run(&[
        "gateway",
        "--data-dir",
        data,
        "--queue-url",
        "amqp://guest:secret@127.0.0.1:5672/x",
    ]);
    assert!(
        printed.contains("kaiwa gateway needs a PostgreSQL --database-url"),
        "{printed}"
    );
    assert!(
        !printed.contains("secret"),
        "the password is never printed: {printed}"
    );
    let printed = run(&[
        "serve",
        "--data-dir",
        data,
        "--queue-url",
        "redis://127.0.0.1",
        "--database-url",
        "postgres://postgres@127.0.0.1/x",
    ]);
    assert!(printed.contains("amqp://"), "{printed}");
    // A password with a slash: a naive split would print part of it as the host.
    let printed = run(&[
        "serve",
        "--data-dir",
        data,
        "--queue-url",
        "amqp://kaiwa:pa/ssw0rd@rabbit/kaiwa",
        "--database-url",
        "postgres://postgres@127.0.0.1/x",
    ]);
    assert!(printed.contains("unreadable URL"), "{printed}");
    assert!(
        !printed.contains("pa/ss") && !printed.contains("ssw0rd"),
        "{printed}"
    );
}
