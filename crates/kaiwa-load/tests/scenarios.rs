//! The load tool against real servers: an in-process kaiwa with small delays (nothing may be lost;
//! the binary in the path dialect too, its clients at the server's root), two of them given as two
//! endpoints (each client keeps to its own), the echo baseline, fake servers that withhold or
//! repeat replies (the tool must report it, so its checks can fail), and a kaiwa behind a proxy
//! that cuts every connection mid-run (`--reconnect` must come back and lose nothing, and its plot
//! mark the reconnects; without it, the cut must show as lost). `--plot` writes an SVG of a run.

use futures::{SinkExt, StreamExt};
use kaiwa::clock::SystemClock;
use kaiwa::{Application, ServeConfig};
use kaiwa_load::auth::TokenSettings;
use kaiwa_load::connections::{self, ConnectionsConfig};
use kaiwa_load::media::Samples;
use kaiwa_load::plan::{self, Mix};
use kaiwa_load::plot;
use kaiwa_load::{LoadConfig, Mode};
use kaiwa_protocol::{CloseCode, ErrorCode, MessageStatus, MessageType, ReplyType, native};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_util::sync::CancellationToken;

/// A kaiwa on a free port with its own data directory, stopped when dropped.
struct Server {
    addr: SocketAddr,
    _dir: TempDir,
    _stop: oneshot::Sender<()>,
}

impl Server {
    async fn start(flags: &[&str]) -> Server {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let data_dir = dir.path().to_str().expect("a UTF-8 path").to_owned();
        let mut args = vec!["--bind", "127.0.0.1:0", "--data-dir", &data_dir];
        args.extend_from_slice(flags);
        let config = ServeConfig::from_args(args).expect("a valid configuration");
        let app = Application::build(config, Arc::new(SystemClock))
            .await
            .expect("kaiwa starts");
        let addr = app.local_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(app.run_until(async move {
            stopped.await.ok();
        }));
        Server {
            addr,
            _dir: dir,
            _stop: stop,
        }
    }

    fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// GET `path` as JSON (HTTP/1.1, one request per connection, no client library needed).
    async fn get(&self, path: &str) -> serde_json::Value {
        let mut tcp = TcpStream::connect(self.addr).await.expect("connects");
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.addr
        );
        tcp.write_all(request.as_bytes()).await.expect("writes");
        let mut raw = Vec::new();
        tcp.read_to_end(&mut raw).await.expect("reads");
        let text = String::from_utf8(raw).expect("UTF-8");
        let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
        assert!(head.starts_with("HTTP/1.1 200"), "{path}: {head}");
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
    }

    /// The sessions this server holds now, by its /health.
    async fn connections(&self) -> u64 {
        self.get("/health").await["connections"]
            .as_u64()
            .expect("a connection count")
    }

    /// How many messages this server stored from `client_id`.
    async fn stored(&self, client_id: &str) -> u64 {
        self.get(&format!("/chat-history/{client_id}?limit=1"))
            .await["pagination"]["total"]
            .as_u64()
            .expect("a total")
    }

    /// Every message this server stored from `client_id`, with its replies.
    /// The client's history once every reply in it is marked delivered, or as it stands after
    /// a bound no healthy run comes near. Delivery marks are written after the frame went out,
    /// in the store's next batch, so the last ones may land a moment after the run ends.
    async fn settled_history(&self, client_id: &str) -> Vec<serde_json::Value> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let history = self.history(client_id).await;
            let delivered = history.iter().all(|message| {
                message["replies"]
                    .as_array()
                    .is_some_and(|replies| replies.iter().all(|r| r["is_delivered"] == true))
            });
            if delivered || tokio::time::Instant::now() >= deadline {
                return history;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn history(&self, client_id: &str) -> Vec<serde_json::Value> {
        let mut messages = Vec::new();
        loop {
            let page = self
                .get(&format!(
                    "/chat-history/{client_id}?limit=100&offset={}",
                    messages.len()
                ))
                .await;
            let data = page["data"].as_array().expect("a page").clone();
            let done = data.is_empty() || page["pagination"]["has_more"] != true;
            messages.extend(data);
            if done {
                return messages;
            }
        }
    }
}

fn config(url: String, mode: Mode, clients: usize, messages: u64) -> LoadConfig {
    LoadConfig {
        scenario: "spec".into(),
        label: None,
        urls: vec![url],
        mode,
        clients,
        messages: Some(messages),
        duration: None,
        rate: None,
        window: 32,
        mix: Mix::spec(),
        seed: 42,
        drain_timeout: Duration::from_secs(20),
        timeout: Duration::from_secs(120),
        progress: false,
        reconnect: false,
        auth: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spec_scenario_accounts_for_every_message_and_every_client_gets_its_turn() {
    // Five slots for twenty clients: most are refused at first and must wait for a turn.
    let server = Server::start(&["--max-clients", "5", "--reply-delay-scale", "0.01"]).await;
    let summary = kaiwa_load::run(config(server.url(), Mode::Native, 20, 200))
        .await
        .expect("the run completes");
    assert!(summary.ok, "{}", summary.table());
    assert_eq!(summary.lost, 0);
    assert_eq!((summary.sent, summary.completed), (200, 200));
    assert_eq!(summary.clients_sent, 20, "every client sent a message");
    assert!(summary.refusals > 0, "the client limit was hit");
    assert!(summary.max_concurrent <= 5, "{}", summary.max_concurrent);
    assert_eq!(summary.accepted + summary.rejected, 200);
    assert!(
        summary.by_type.contains_key("video"),
        "media types are sent"
    );
}

/// The text of every `<text>` of an SVG document, which must parse as XML with an `<svg>` root.
fn svg_texts(svg: &str) -> Vec<String> {
    let document = roxmltree::Document::parse(svg).unwrap_or_else(|e| panic!("not XML: {e}"));
    let root = document.root_element();
    assert_eq!(root.tag_name().name(), "svg");
    root.descendants()
        .filter(|node| node.has_tag_name("text"))
        .filter_map(|node| node.text())
        .map(|text| text.trim().to_owned())
        .collect()
}

/// Runs the kaiwa-load binary with `args` and `--json json`; it must succeed. Its summary, and
/// the table it printed.
async fn run_binary(args: &[&str], json: &std::path::Path) -> (kaiwa_load::Summary, String) {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_kaiwa-load"))
        .args(args)
        .arg("--json")
        .arg(json)
        .output()
        .await
        .expect("kaiwa-load runs");
    let table = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{table}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summary = serde_json::from_str(&std::fs::read_to_string(json).expect("the JSON report"))
        .expect("a summary");
    (summary, table)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spec_run_with_plot_draws_throughput_latency_and_every_type_sent_as_svg() {
    let server = Server::start(&["--reply-delay-scale", "0.01"]).await;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (plot, json) = (dir.path().join("spec.svg"), dir.path().join("spec.json"));
    let (summary, _) = run_binary(
        &[
            "spec",
            "--url",
            &server.url(),
            "--clients",
            "10",
            "--messages",
            "80",
            "--quiet",
            "--plot",
            plot.to_str().expect("a UTF-8 path"),
        ],
        &json,
    )
    .await;

    let svg = std::fs::read_to_string(&plot).expect("the plot is written");
    let texts = svg_texts(&svg);
    for wanted in [
        plot::TIME_AXIS,
        plot::THROUGHPUT_AXIS,
        plot::LATENCY_AXIS,
        plot::DISTRIBUTION_AXIS,
        plot::SHARE_AXIS,
        plot::THROUGHPUT_SERIES,
        "p50",
        "p99",
    ] {
        assert!(
            texts.iter().any(|t| t == wanted),
            "no {wanted:?} in {texts:?}"
        );
    }
    assert!(
        texts
            .iter()
            .any(|t| t.starts_with("kaiwa-load spec: 10 clients")),
        "a title: {texts:?}"
    );
    // Every type sent has its distribution, named in the legend with what it came to.
    let sent: Vec<(&String, u64)> = summary
        .by_type
        .iter()
        .filter(|(_, t)| t.sent > 0)
        .map(|(kind, t)| (kind, t.reply_ms.map_or(0, |q| q.count)))
        .collect();
    assert!(
        sent.len() >= 3,
        "the spec mix sends several types: {sent:?}"
    );
    for (kind, replied) in sent {
        let entry = if replied > 0 {
            format!("{kind}: {replied} replied, p50 ")
        } else {
            format!("{kind}: ")
        };
        assert!(
            texts.iter().any(|t| t.starts_with(&entry)),
            "no {entry:?} in {texts:?}"
        );
    }
    // A line per series: throughput, p50, p99 and a curve per type.
    let lines = svg.matches("<polyline").count();
    assert!(lines >= 3 + summary.by_type.len(), "{lines} lines");
    // Nothing to mark in a run without --reconnect.
    assert!(
        !texts.iter().any(|t| t.starts_with("reconnects")),
        "{texts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_clients_are_accounted_from_replies_and_rejections_alone() {
    let server = Server::start(&["--reply-delay-scale", "0.01"]).await;
    let summary = kaiwa_load::run(config(server.url(), Mode::Legacy, 10, 60))
        .await
        .expect("the run completes");
    assert!(summary.ok, "{}", summary.table());
    assert_eq!((summary.sent, summary.completed), (60, 60));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spec_scenario_runs_in_the_path_dialect_with_the_id_in_the_url() {
    // Five slots for twenty clients: a path client refused as the server is full waits too.
    // Heartbeats every 50 ms: each client reads PINGs between its answers, and answers them.
    let server = Server::start(&[
        "--max-clients",
        "5",
        "--reply-delay-scale",
        "0.01",
        "--heartbeat-interval",
        "0.05",
    ])
    .await;
    let summary = kaiwa_load::run(config(server.url(), Mode::Path, 20, 100))
        .await
        .expect("the run completes");
    assert!(summary.ok, "{}", summary.table());
    assert_eq!((summary.sent, summary.completed), (100, 100));
    assert_eq!(summary.clients_sent, 20, "every client sent a message");
    assert!(summary.refusals > 0, "the client limit was hit");
    assert!(summary.max_concurrent <= 5, "{}", summary.max_concurrent);
    assert!(
        summary.by_type.contains_key("video"),
        "media types are sent, as files"
    );
    assert_eq!(summary.protocol, "path");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_runs_the_spec_scenario_in_the_path_dialect_with_ids_at_the_servers_root() {
    let server = Server::start(&["--reply-delay-scale", "0.01"]).await;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let json = dir.path().join("path.json");
    // The server's root, as that system's scripts give it: each client at ws://<addr>/<id>.
    let root = format!("ws://{}", server.addr);
    let (summary, table) = run_binary(
        &[
            "spec",
            "--dialect",
            "path",
            "--url",
            &root,
            "--clients",
            "10",
            "--messages",
            "60",
            "--quiet",
        ],
        &json,
    )
    .await;
    assert!(summary.ok, "{table}");
    assert_eq!(summary.protocol, "path");
    assert_eq!(summary.urls, [root]);
    assert_eq!((summary.sent, summary.completed, summary.lost), (60, 60, 0));
    assert_eq!(summary.accepted + summary.rejected, 60);
    assert_eq!(summary.clients_sent, 10, "every client sent a message");
    // The server stored each message under the id the client's URL named.
    let run_id = summary.run_id.as_deref().expect("the run's id");
    let mut stored = 0;
    for client in 0..10 {
        stored += server.stored(&format!("load-{run_id}-{client}")).await;
    }
    assert_eq!(stored, 60);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_loop_run_sends_on_schedule_and_loses_nothing() {
    let server = Server::start(&["--reply-delay-scale", "0"]).await;
    let mut config = config(server.url(), Mode::Native, 4, 40);
    config.rate = Some(200.0);
    config.mix = Mix::text();
    let summary = kaiwa_load::run(config).await.expect("the run completes");
    assert!(summary.ok, "{}", summary.table());
    assert_eq!(summary.completed, 40);
    assert_eq!(summary.offered_rate, Some(200.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_echo_baseline_returns_every_frame() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
    let addr = listener.local_addr().expect("an address");
    let (_stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(kaiwa_load::echo::serve(listener, async move {
        stopped.await.ok();
    }));
    let mut config = config(format!("ws://{addr}/ws"), Mode::Echo, 5, 500);
    config.mix = Mix::text();
    let summary = kaiwa_load::run(config).await.expect("the run completes");
    assert!(summary.ok, "{}", summary.table());
    assert_eq!(summary.completed, 500);
}

/// What a fake native server does with each `send` after acking it.
#[derive(Clone, Copy)]
enum Fake {
    /// Answers properly: ack, `processing`, the text reply, `replied`.
    Answer,
    /// Acks, says `processing`, and never replies.
    WithholdReplies,
    /// Answers properly, but sends the text reply twice (the same `seq` too).
    DuplicateReply,
}

/// What a fake server's connection saw of its reply stream, reported when it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Acknowledged {
    /// The `seq` of the last reply sent.
    sent: u64,
    /// The highest `seq` the client acknowledged.
    received: u64,
    /// How many `received` frames it took.
    frames: u64,
}

/// Chooses kaiwa.v1, as kaiwa does for clients that offer it.
// The signature is tungstenite's callback type.
#[allow(clippy::result_large_err)]
fn choose(_: &Request, mut response: Response) -> Result<Response, ErrorResponse> {
    response.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static(kaiwa_protocol::SUBPROTOCOL),
    );
    Ok(response)
}

/// A fake native server, stopped when dropped.
struct FakeServer {
    addr: SocketAddr,
    /// One report per connection that ended.
    streams: mpsc::UnboundedReceiver<Acknowledged>,
    _stop: oneshot::Sender<()>,
}

impl FakeServer {
    fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }
}

/// How a fake server turns connections away, as kaiwa does: an error frame after the hello,
/// then a close with `code`.
#[derive(Clone, Copy)]
struct Refusal {
    error: ErrorCode,
    code: u16,
    /// The first this many connections are refused.
    times: usize,
}

/// A native server that welcomes every client and answers sends as `behaviour` says, numbering
/// each connection's replies from 1 as kaiwa numbers a new client id's.
async fn fake_server(behaviour: Fake) -> FakeServer {
    refusing_server(behaviour, None).await
}

async fn refusing_server(behaviour: Fake, refusal: Option<Refusal>) -> FakeServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
    let addr = listener.local_addr().expect("an address");
    let (stop, mut stopped) = oneshot::channel::<()>();
    let (streams_tx, streams) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        for connection in 0.. {
            let (tcp, _) = tokio::select! {
                accepted = listener.accept() => accepted.expect("accepts"),
                _ = &mut stopped => return,
            };
            let streams_tx = streams_tx.clone();
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tcp, choose).await else {
                    return;
                };
                if let Some(refusal) = refusal.filter(|r| connection < r.times) {
                    refuse(&mut ws, refusal).await;
                    return;
                }
                let mut next_id = 0;
                let mut stream = Acknowledged {
                    sent: 0,
                    received: 0,
                    frames: 0,
                };
                'connection: while let Some(Ok(frame)) = ws.next().await {
                    let Message::Text(text) = frame else { continue };
                    let answers = match serde_json::from_str::<native::ClientFrame>(&text) {
                        Ok(native::ClientFrame::Hello(hello)) => vec![welcome(hello)],
                        Ok(native::ClientFrame::Send(send)) => {
                            next_id += 1;
                            stream.sent += 1;
                            answer(
                                behaviour,
                                &send.id.unwrap_or_default(),
                                next_id,
                                stream.sent,
                            )
                        }
                        Ok(native::ClientFrame::Received { seq }) => {
                            stream.received = stream.received.max(seq);
                            stream.frames += 1;
                            vec![]
                        }
                        _ => vec![],
                    };
                    for answer in answers {
                        let json = serde_json::to_string(&answer).expect("serializes");
                        if ws.send(Message::text(json)).await.is_err() {
                            break 'connection;
                        }
                    }
                }
                if next_id > 0 {
                    streams_tx.send(stream).ok();
                }
            });
        }
    });
    FakeServer {
        addr,
        streams,
        _stop: stop,
    }
}

async fn refuse(ws: &mut WebSocketStream<TcpStream>, refusal: Refusal) {
    // The hello.
    ws.next().await;
    let error = native::ServerFrame::Error(native::Error {
        code: refusal.error,
        message: "refused".into(),
        id: None,
        retry_after_ms: None,
    });
    let json = serde_json::to_string(&error).expect("serializes");
    ws.send(Message::text(json)).await.ok();
    let close = CloseFrame {
        code: refusal.code.into(),
        reason: "refused".into(),
    };
    ws.send(Message::Close(Some(close))).await.ok();
    while let Some(Ok(_)) = ws.next().await {}
}

fn welcome(hello: native::Hello) -> native::ServerFrame {
    let window = |message_type, start: &str, end: &str| native::WindowInfo {
        message_type,
        start: start.into(),
        end: end.into(),
    };
    native::ServerFrame::Welcome(native::Welcome {
        client_id: hello.client_id.unwrap_or_default(),
        timezone: hello.timezone.unwrap_or_default(),
        protocol: "kaiwa.v1".into(),
        server_time: chrono::Utc::now(),
        heartbeat_interval_ms: 20_000,
        heartbeat_timeout_ms: 60_000,
        first_message_timeout_ms: 60_000,
        limits: native::Limits {
            max_text_chars: 4096,
            max_image_bytes: 1 << 20,
            max_voice_bytes: 1 << 20,
            max_video_bytes: 1 << 20,
            max_in_flight_per_client: 32,
        },
        // Every type always open, so every message must be accepted.
        windows: MessageType::ALL
            .into_iter()
            .map(|kind| window(kind, "00:00", "24:00"))
            .collect(),
        token_expires_at: None,
    })
}

fn answer(behaviour: Fake, id: &str, message_id: i64, seq: u64) -> Vec<native::ServerFrame> {
    let status = |status| {
        native::ServerFrame::Status(native::Status {
            id: Some(id.to_owned()),
            message_id,
            status,
        })
    };
    let ack = native::ServerFrame::Ack(native::Ack {
        id: id.to_owned(),
        message_id,
        status: MessageStatus::Accepted,
        reason: None,
        duplicate: false,
        received_at: chrono::Utc::now(),
    });
    let reply = native::ServerFrame::Reply(native::Reply {
        id: Some(id.to_owned()),
        message_id,
        seq,
        reply: native::ReplyBody {
            id: message_id,
            reply_type: ReplyType::Text,
            content: "hi".into(),
            filename: None,
            mime_type: None,
            fallback: false,
            created_at: chrono::Utc::now(),
        },
        missed: false,
    });
    match behaviour {
        Fake::Answer => vec![
            ack,
            status(MessageStatus::Processing),
            reply,
            status(MessageStatus::Replied),
        ],
        Fake::WithholdReplies => vec![ack, status(MessageStatus::Processing)],
        Fake::DuplicateReply => vec![
            ack,
            status(MessageStatus::Processing),
            reply.clone(),
            reply,
            status(MessageStatus::Replied),
        ],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_reply_is_acknowledged_before_the_client_closes() {
    let mut server = fake_server(Fake::Answer).await;
    let mut config = config(server.url(), Mode::Native, 3, 300);
    config.mix = Mix::text();
    let summary = kaiwa_load::run(config).await.expect("the run completes");
    assert!(summary.ok, "{}", summary.table());
    let mut replies = 0;
    let mut frames = 0;
    for _ in 0..3 {
        let stream = tokio::time::timeout(Duration::from_secs(5), server.streams.recv())
            .await
            .expect("every connection ends")
            .expect("a report");
        assert!(stream.sent > 0, "{stream:?}");
        assert_eq!(stream.received, stream.sent, "{stream:?}");
        replies += stream.sent;
        frames += stream.frames;
    }
    assert_eq!(replies, 300);
    // At most one acknowledgement per read burst that brought a reply; how many replies a
    // burst holds depends on scheduling, so fewer frames than replies is likely, not certain.
    assert!(
        frames <= replies,
        "{frames} received frames for {replies} replies"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_that_never_come_are_reported_as_lost_and_fail_the_run() {
    let server = fake_server(Fake::WithholdReplies).await;
    let mut config = config(server.url(), Mode::Native, 3, 12);
    config.mix = Mix::text();
    config.drain_timeout = Duration::from_millis(300);
    let summary = kaiwa_load::run(config).await.expect("the run completes");
    assert!(!summary.ok);
    assert_eq!(summary.lost, 12, "{}", summary.table());
    assert_eq!(summary.problems.get("lost_reply"), Some(&12));
    assert_eq!(summary.accepted, 12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_delivered_twice_is_reported_as_a_duplicate_and_a_repeated_seq() {
    let server = fake_server(Fake::DuplicateReply).await;
    let mut config = config(server.url(), Mode::Native, 2, 6);
    config.mix = Mix::text();
    let summary = kaiwa_load::run(config).await.expect("the run completes");
    assert!(!summary.ok);
    assert_eq!(summary.lost, 0);
    let problems: Vec<(&str, u64)> = summary
        .problems
        .iter()
        .map(|(problem, count)| (problem.as_str(), *count))
        .collect();
    assert_eq!(
        problems,
        [("duplicate_reply", 6), ("seq_repeat", 6)],
        "{}",
        summary.table()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_code_that_says_come_back_is_retried_even_one_the_tool_does_not_know() {
    let refusal = Refusal {
        error: ErrorCode::Internal,
        code: 4321,
        times: 3,
    };
    let server = refusing_server(Fake::Answer, Some(refusal)).await;
    let mut config = config(server.url(), Mode::Native, 1, 2);
    config.mix = Mix::text();
    let summary = kaiwa_load::run(config).await.expect("the run completes");
    assert!(summary.ok, "{}", summary.table());
    assert_eq!(summary.completed, 2);
    assert_eq!(summary.refusals, 3);
    assert_eq!(
        summary.refused_by.into_iter().collect::<Vec<_>>(),
        [("4321".to_owned(), 3)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_code_that_says_do_not_reconnect_ends_the_client_at_once() {
    let refusal = Refusal {
        error: ErrorCode::DuplicateConnection,
        code: CloseCode::DuplicateConnection.code(),
        times: usize::MAX,
    };
    let server = refusing_server(Fake::Answer, Some(refusal)).await;
    let mut config = config(server.url(), Mode::Native, 1, 2);
    config.mix = Mix::text();
    let summary = kaiwa_load::run(config).await.expect("the run completes");
    assert!(!summary.ok);
    assert_eq!((summary.refusals, summary.sent), (0, 0));
    assert_eq!(
        summary.problems.into_iter().collect::<Vec<_>>(),
        [("error:duplicate_connection".to_owned(), 1)]
    );
}

const SECRET: &str = "a-load-test-secret-long-enough-for-hs256";

fn tokens() -> TokenSettings {
    TokenSettings {
        secret: SECRET.to_owned(),
        audience: "kaiwa".to_owned(),
        ttl: Duration::from_secs(3600),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn against_a_server_with_auth_on_every_client_signs_in_with_its_own_token() {
    let server = Server::start(&["--auth-secret", SECRET, "--reply-delay-scale", "0"]).await;
    let mut signed = config(server.url(), Mode::Native, 10, 100);
    signed.auth = Some(Arc::new(tokens().minter().expect("a minter")));
    let summary = kaiwa_load::run(signed).await.expect("the run completes");
    assert!(summary.ok, "{}", summary.table());
    assert_eq!(summary.sent, 100);
    let mut legacy = config(server.url(), Mode::Legacy, 4, 20);
    legacy.auth = Some(Arc::new(tokens().minter().expect("a minter")));
    let summary = kaiwa_load::run(legacy).await.expect("the run completes");
    assert!(summary.ok, "{}", summary.table());

    // Without tokens, every client is refused: 4601 is terminal.
    let summary = kaiwa_load::run(config(server.url(), Mode::Native, 2, 2))
        .await
        .expect("the run completes");
    assert!(!summary.ok);

    // Idle connections too, in child processes that get the secret by their environment.
    let held = ConnectionsConfig {
        label: None,
        urls: vec![server.url()],
        clients: 20,
        processes: 2,
        server_pids: Vec::new(),
        hold: Duration::ZERO,
        exe: Some(env!("CARGO_BIN_EXE_kaiwa-load").into()),
        seed: 8,
        auth: Some(tokens()),
        mode: Mode::Native,
    };
    let summary = connections::run(held).await.expect("the run completes");
    assert!(summary.ok, "{}", summary.table());
    assert_eq!(summary.connected, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_held_from_several_source_addresses_and_processes() {
    let server = Server::start(&["--max-clients", "100"]).await;
    let config = ConnectionsConfig {
        label: None,
        urls: vec![server.url()],
        clients: 40,
        processes: 2,
        server_pids: vec![std::process::id()],
        hold: Duration::ZERO,
        exe: Some(env!("CARGO_BIN_EXE_kaiwa-load").into()),
        seed: 3,
        auth: None,
        mode: Mode::Native,
    };
    let summary = connections::run(config).await.expect("the run completes");
    assert!(summary.ok, "{}", summary.table());
    assert_eq!(summary.connected, 40);
    assert!(summary.memory.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_legacy_and_path_connections_answer_the_heartbeats_their_protocols_send_as_frames() {
    // Two heartbeat timeouts: a connection that left one unanswered would be closed (4001)
    // and counted as a problem.
    let server = Server::start(&[
        "--max-clients",
        "100",
        "--heartbeat-interval",
        "1",
        "--heartbeat-timeout",
        "2",
    ])
    .await;
    for mode in [Mode::Legacy, Mode::Path] {
        let config = ConnectionsConfig {
            label: None,
            urls: vec![server.url()],
            clients: 10,
            processes: 2,
            server_pids: vec![std::process::id()],
            hold: Duration::from_secs(4),
            exe: Some(env!("CARGO_BIN_EXE_kaiwa-load").into()),
            seed: 5,
            auth: None,
            mode,
        };
        let summary = connections::run(config).await.expect("the run completes");
        assert!(summary.ok, "{mode:?}: {}", summary.table());
        assert_eq!(summary.connected, 10, "{mode:?}");
        // The report names the protocol spoken, which bench tables label the row by.
        assert_eq!(summary.protocol, mode.name());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_are_spread_over_several_urls_and_each_keeps_to_its_own_server() {
    // Two separate kaiwas share nothing: a client that strayed to the other server would find
    // no messages of its own there, and its history would be split.
    let servers = [
        Server::start(&["--max-clients", "3", "--reply-delay-scale", "0.01"]).await,
        Server::start(&["--max-clients", "3", "--reply-delay-scale", "0.01"]).await,
    ];
    let (clients, messages) = (9, 90);
    let mut config = config(servers[0].url(), Mode::Native, clients, messages);
    config.urls.push(servers[1].url());
    let summary = kaiwa_load::run(config).await.expect("the run completes");
    assert!(summary.ok, "{}", summary.table());
    assert_eq!((summary.sent, summary.completed), (messages, messages));
    assert_eq!(summary.clients_sent, clients as u64);
    // Five and four clients for three slots each: both servers turned some away for a while.
    assert!(summary.refusals > 0, "{}", summary.table());
    assert_eq!(summary.urls, [servers[0].url(), servers[1].url()]);
    assert_eq!(
        summary.url,
        format!("{}, {}", servers[0].url(), servers[1].url())
    );
    let shares: Vec<(u64, u64)> = summary
        .by_url
        .iter()
        .map(|share| (share.clients, share.connected))
        .collect();
    assert_eq!(shares, [(5, 5), (4, 4)], "{}", summary.table());

    // The servers' own records: client i stored exactly its messages on server i % 2, and none
    // on the other.
    let run_id = summary.run_id.clone().expect("the run's id");
    let plans = plan::clients(clients, Some(messages), 42, &run_id);
    let mut stored = [0, 0];
    for plan in &plans {
        let home = plan.index % 2;
        let on_home = servers[home].stored(&plan.client_id).await;
        assert_eq!(Some(on_home), plan.messages, "{}", plan.client_id);
        assert_eq!(servers[1 - home].stored(&plan.client_id).await, 0);
        stored[home] += on_home;
    }
    let sent: Vec<u64> = summary.by_url.iter().map(|share| share.sent).collect();
    assert_eq!(sent, stored);
    assert!(stored.iter().all(|&n| n > 0), "{stored:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_over_two_urls_are_counted_and_measured_per_gateway() {
    let servers = [
        Server::start(&["--max-clients", "100"]).await,
        Server::start(&["--max-clients", "100"]).await,
    ];
    let urls = vec![servers[0].url(), servers[1].url()];

    // Each server holds its half, by its own count.
    let held = connections::hold(&urls, 0, 21, "spread", None, Mode::Native).await;
    assert_eq!(held.connected_by_url, [11, 10]);
    for (server, expected) in servers.iter().zip([11, 10]) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while server.connections().await != expected && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(server.connections().await, expected);
    }
    let tallies = held.release().await;
    assert!(tallies.iter().all(|t| t.problems.is_empty()), "{tallies:?}");

    // Both kaiwas live in this process: a stand-in process gives the second URL a pid of its
    // own, so the report has to keep two gateways apart. Its memory is not the server's, only
    // the attribution is checked.
    let mut stand_in = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .expect("sleep starts");
    let config = ConnectionsConfig {
        label: None,
        urls: urls.clone(),
        clients: 40,
        processes: 2,
        server_pids: vec![std::process::id(), stand_in.id()],
        hold: Duration::ZERO,
        exe: Some(env!("CARGO_BIN_EXE_kaiwa-load").into()),
        seed: 5,
        auth: None,
        mode: Mode::Native,
    };
    let summary = connections::run(config).await;
    stand_in.kill().ok();
    stand_in.wait().ok();
    let summary = summary.expect("the run completes");
    assert!(summary.ok, "{}", summary.table());
    assert_eq!(summary.connected, 40);
    let shares: Vec<(u64, u64)> = summary
        .by_url
        .iter()
        .map(|share| (share.clients, share.connected))
        .collect();
    assert_eq!(shares, [(20, 20), (20, 20)], "{}", summary.table());
    let gateways: Vec<(u32, Vec<String>, u64)> = summary
        .memory_by_gateway
        .iter()
        .map(|g| (g.server_pid, g.urls.clone(), g.connections))
        .collect();
    assert_eq!(
        gateways,
        [
            (std::process::id(), vec![urls[0].clone()], 20),
            (stand_in.id(), vec![urls[1].clone()], 20),
        ],
        "{}",
        summary.table()
    );
    let memory = summary.memory.as_ref().expect("the total over both");
    assert_eq!(memory.server_pids, [std::process::id(), stand_in.id()]);

    // One process named for both URLs is read once, for the connections of both.
    let config = ConnectionsConfig {
        label: None,
        urls: urls.clone(),
        clients: 10,
        processes: 1,
        server_pids: vec![std::process::id(); 2],
        hold: Duration::ZERO,
        exe: None,
        seed: 6,
        auth: None,
        mode: Mode::Native,
    };
    let summary = connections::run(config).await.expect("the run completes");
    assert!(summary.ok, "{}", summary.table());
    assert_eq!(summary.memory_by_gateway.len(), 1);
    assert_eq!(summary.memory_by_gateway[0].urls, urls);
    assert_eq!(summary.memory_by_gateway[0].connections, 10);

    // A pid for only one of two URLs is refused rather than guessed.
    let config = ConnectionsConfig {
        label: None,
        urls,
        clients: 2,
        processes: 1,
        server_pids: vec![std::process::id()],
        hold: Duration::ZERO,
        exe: None,
        seed: 7,
        auth: None,
        mode: Mode::Native,
    };
    assert!(connections::run(config).await.is_err());
}

#[tokio::test]
async fn kaiwa_recognises_the_generated_media_by_content_and_name() {
    let samples = Samples::generate().expect("samples");
    for kind in [MessageType::Voice, MessageType::Video, MessageType::Image] {
        let sample = samples.get(kind).expect("a sample");
        let format = kaiwa::admission::media::sniff(kind, &sample.bytes)
            .unwrap_or_else(|| panic!("kaiwa recognises the {kind} sample"));
        assert!(format.fits_filename(sample.filename), "{}", sample.filename);
    }
}

/// A TCP proxy in front of a server, which the test can mute (the server's bytes are read and
/// dropped, so acks and replies go missing while the clients' sends still arrive), cut (every
/// connection through it ends at once, with no close frame) and let through again. Stopped when
/// dropped.
struct Proxy {
    addr: SocketAddr,
    shared: Arc<ProxyShared>,
    _stop: oneshot::Sender<()>,
}

#[derive(Default)]
struct ProxyShared {
    /// Bytes passed from the clients to the server.
    upstream: AtomicU64,
    /// Bytes from the server passed on to the clients.
    downstream: AtomicU64,
    /// Bytes from the server dropped while muted.
    swallowed: AtomicU64,
    /// Reply frames among them (server frames are not masked, so they can be read here).
    swallowed_replies: AtomicU64,
    /// Connections turned away while cut.
    turned_away: AtomicU64,
    state: Mutex<ProxyState>,
    /// Woken at every change of a count, for tests that wait for one.
    changed: Notify,
}

#[derive(Default)]
struct ProxyState {
    muted: bool,
    cut: bool,
    /// Cancelled by a cut: every connection through the proxy ends with it.
    connections: CancellationToken,
}

impl ProxyShared {
    fn count(&self, counter: &AtomicU64, bytes: usize) {
        counter.fetch_add(bytes as u64, Ordering::Relaxed);
        self.changed.notify_waiters();
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ProxyState> {
        self.state.lock().expect("the proxy's state")
    }
}

impl Proxy {
    async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
        let addr = listener.local_addr().expect("an address");
        let shared = Arc::new(ProxyShared::default());
        let (stop, mut stopped) = oneshot::channel::<()>();
        tokio::spawn({
            let shared = shared.clone();
            async move {
                loop {
                    let (client, _) = tokio::select! {
                        accepted = listener.accept() => accepted.expect("accepts"),
                        _ = &mut stopped => return,
                    };
                    let connection = {
                        let state = shared.state();
                        (!state.cut).then(|| state.connections.clone())
                    };
                    match connection {
                        Some(cancel) => {
                            tokio::spawn(forward(client, target, cancel, shared.clone()));
                        }
                        None => {
                            drop(client);
                            shared.count(&shared.turned_away, 1);
                        }
                    }
                }
            }
        });
        Proxy {
            addr,
            shared,
            _stop: stop,
        }
    }

    fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    fn get(&self, counter: impl Fn(&ProxyShared) -> &AtomicU64) -> u64 {
        counter(&self.shared).load(Ordering::Relaxed)
    }

    /// Waits until `ready` holds; a run that ends first would leave it waiting, hence the
    /// bound, which no healthy run comes near.
    async fn wait_until(&self, what: &str, ready: impl Fn(&Proxy) -> bool) {
        let waiting = async {
            loop {
                let changed = self.shared.changed.notified();
                tokio::pin!(changed);
                // Registered before the check, so a change between the two is not missed.
                changed.as_mut().enable();
                if ready(self) {
                    return;
                }
                changed.await;
            }
        };
        tokio::time::timeout(Duration::from_secs(60), waiting)
            .await
            .unwrap_or_else(|_| panic!("the proxy never saw {what}"));
    }

    fn mute(&self) {
        self.shared.state().muted = true;
    }

    /// Ends every connection through the proxy and turns new ones away.
    fn cut(&self) {
        let mut state = self.shared.state();
        state.cut = true;
        state.muted = false;
        state.connections.cancel();
        state.connections = CancellationToken::new();
    }

    fn let_through(&self) {
        self.shared.state().cut = false;
    }
}

/// How a reply frame starts.
const REPLY: &[u8] = br#"{"type":"reply""#;

/// Passes one connection's bytes both ways until either side closes or the proxy is cut; then
/// both sockets are dropped, so the client sees the connection end without a close frame.
async fn forward(
    client: TcpStream,
    target: SocketAddr,
    cancel: CancellationToken,
    shared: Arc<ProxyShared>,
) {
    let Ok(server) = TcpStream::connect(target).await else {
        return;
    };
    client.set_nodelay(true).ok();
    server.set_nodelay(true).ok();
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let upstream = async {
        let mut buffer = vec![0; 16 * 1024];
        while let Ok(n @ 1..) = client_read.read(&mut buffer).await {
            if server_write.write_all(&buffer[..n]).await.is_err() {
                break;
            }
            shared.count(&shared.upstream, n);
        }
        server_write.shutdown().await.ok();
    };
    let downstream = async {
        let mut buffer = vec![0; 16 * 1024];
        // Once bytes are dropped, none after them may pass: a TCP stream loses its tail, never
        // its middle. (A cut unmutes before this task sees it end, and a reply let through then
        // would stand after one swallowed, a gap no network makes.)
        let mut swallowing = false;
        while let Ok(n @ 1..) = server_read.read(&mut buffer).await {
            swallowing = swallowing || shared.state().muted;
            if swallowing {
                let replies = buffer[..n]
                    .windows(REPLY.len())
                    .filter(|w| *w == REPLY)
                    .count();
                shared
                    .swallowed_replies
                    .fetch_add(replies as u64, Ordering::Relaxed);
                shared.count(&shared.swallowed, n);
                continue;
            }
            if client_write.write_all(&buffer[..n]).await.is_err() {
                break;
            }
            shared.count(&shared.downstream, n);
        }
        client_write.shutdown().await.ok();
    };
    tokio::select! {
        () = cancel.cancelled() => {}
        _ = async { tokio::join!(upstream, downstream) } => {}
    }
}

/// A kaiwa that accepts text at any hour in any timezone (the clients' zones are random), so
/// every message must be accepted and replied, behind a proxy.
async fn server_behind_a_proxy() -> (Server, Proxy) {
    let server =
        Server::start(&["--reply-delay-scale", "0.2", "--text-window", "00:00-24:00"]).await;
    let proxy = Proxy::start(server.addr).await;
    (server, proxy)
}

/// Open loop, so the clients keep sending while their answers are held back.
fn cut_config(url: String, clients: usize, messages: u64, reconnect: bool) -> LoadConfig {
    let mut config = config(url, Mode::Native, clients, messages);
    config.mix = Mix::text();
    config.rate = Some(150.0);
    config.reconnect = reconnect;
    config
}

/// Once answers flow, mutes the proxy until the server has had sends whose acks went missing
/// and sent replies that went missing, then cuts every connection.
async fn cut_mid_run(proxy: &Proxy) {
    proxy
        .wait_until("answers flowing", |p| p.get(|s| &s.downstream) >= 20_000)
        .await;
    let before = proxy.get(|s| &s.upstream);
    proxy.mute();
    proxy
        .wait_until("sends while muted", |p| {
            p.get(|s| &s.upstream) >= before + 1_000 && p.get(|s| &s.swallowed_replies) >= 3
        })
        .await;
    proxy.cut();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_reconnect_a_cut_mid_run_loses_nothing_and_every_message_is_stored_and_replied_once() {
    let (server, proxy) = server_behind_a_proxy().await;
    let (clients, messages) = (6, 300);
    let run = tokio::spawn(kaiwa_load::run_charted(cut_config(
        proxy.url(),
        clients,
        messages,
        true,
    )));
    cut_mid_run(&proxy).await;
    // Let through again once clients have been turned away trying to come back.
    proxy
        .wait_until("clients trying to come back", |p| {
            p.get(|s| &s.turned_away) >= clients as u64
        })
        .await;
    proxy.let_through();
    let (summary, chart) = run
        .await
        .expect("the run's task")
        .expect("the run completes");

    let table = summary.table();
    println!("{table}");
    assert_plot_marks(&summary, &chart);
    assert!(summary.ok, "{table}");
    assert!(summary.reconnect);
    assert_eq!(
        (summary.sent, summary.completed),
        (messages, messages),
        "{table}"
    );
    assert_eq!(summary.accepted, messages, "{table}");
    assert_eq!(
        (
            summary.lost,
            summary.unacked,
            summary.duplicated,
            summary.out_of_order
        ),
        (0, 0, 0, 0),
        "{table}"
    );
    assert!(summary.reconnects > 0, "{table}");
    // Sends whose acks the mute swallowed went out again under their ids: the server had
    // stored them, so a duplicate ack answered, and nothing was stored twice (below).
    assert!(summary.resent_after_reconnect > 0, "{table}");
    // Replies the mute swallowed came through the replay after the reconnect.
    assert!(summary.replayed > 0, "{table}");
    assert!(table.contains("reconnects"), "{table}");
    let silence = summary.longest_silence_ms.expect("a longest silence");
    let gap = summary.longest_client_gap_ms.expect("a longest client gap");
    // Some client was waiting all through the silence (to the millisecond the timeline keeps).
    assert!(
        silence > 0.0 && gap + 1.0 >= silence,
        "{silence} {gap}: {table}"
    );

    // The server's own record: each client's messages stored once each, every one replied
    // once, and every reply acknowledged by the client (on the connection that got it, or by
    // the `after` of the next).
    let run_id = summary.run_id.clone().expect("the run's id");
    // An open-loop run gives every client an even share.
    let share = messages / clients as u64;
    let mut stored = 0;
    for plan in &plan::clients(clients, Some(messages), 42, &run_id) {
        let history = server.settled_history(&plan.client_id).await;
        assert_eq!(history.len() as u64, share, "{}", plan.client_id);
        for message in &history {
            assert_eq!(message["is_accepted"], true, "{message}");
            let replies = message["replies"].as_array().expect("replies");
            assert_eq!(replies.len(), 1, "{message}");
            assert_eq!(replies[0]["is_delivered"], true, "{message}");
        }
        stored += history.len() as u64;
    }
    assert_eq!(stored, messages);
}

/// The plot of a `--reconnect` run marks its reconnects, each in the second it happened, and
/// the silences long enough to mark, the longest as long as the summary's.
fn assert_plot_marks(summary: &kaiwa_load::Summary, chart: &plot::Chart) {
    let reconnects: u64 = chart.buckets.iter().map(|b| b.reconnects).sum();
    assert_eq!(reconnects, summary.reconnects);
    let longest = summary.longest_silence_ms.expect("a longest silence");
    let marked = chart
        .silences
        .iter()
        .map(|s| s.length * 1000.0)
        .fold(0.0, f64::max);
    if longest >= plot::MARKED_SILENCE.as_millis() as f64 {
        assert!(
            (marked - longest).abs() < 1.0,
            "{marked} ms marked, {longest} ms longest"
        );
    } else {
        assert!(chart.silences.is_empty(), "{:?}", chart.silences);
    }
    let texts = svg_texts(&chart.svg().expect("an SVG"));
    let entry = format!("reconnects: {}", summary.reconnects);
    assert!(
        texts.iter().any(|t| t.starts_with(&entry)),
        "no {entry:?} in {texts:?}"
    );
    assert!(
        texts.iter().any(|t| t.starts_with("no client got a reply")),
        "{texts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_reconnect_the_same_cut_is_reported_as_lost_and_fails_the_run() {
    let (_server, proxy) = server_behind_a_proxy().await;
    let run = tokio::spawn(kaiwa_load::run(cut_config(proxy.url(), 6, 300, false)));
    cut_mid_run(&proxy).await;
    let summary = run
        .await
        .expect("the run's task")
        .expect("the run completes");
    let table = summary.table();
    assert!(!summary.ok, "{table}");
    assert!(summary.lost > 0, "{table}");
    assert_eq!(summary.reconnects, 0, "{table}");
    assert!(
        summary
            .problems
            .contains_key("closed:1006 abnormal_closure"),
        "{table}"
    );
}
