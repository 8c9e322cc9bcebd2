//! What a connection that has not said who it is can cost, on a real kaiwa: no client slot, a
//! place in a small pool of handshakes (the oldest makes room, an address gets its share), 16
//! KiB of input, a few seconds of HTTP headers, and pages of other sites refused when auth is
//! off.

mod support;

use kaiwa::clock::Clock as _;
use serde_json::json;
use std::time::Duration;
use support::tokens::{SECRET, token};
use support::{Client, TestApp, eventually, refused_upgrade};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Upgrades and says nothing.
async fn stranger(app: &TestApp) -> Client {
    Client::connect(&app.ws_url(), true)
        .await
        .expect("the upgrade succeeds")
}

/// Reads from `socket` until it is closed, and says whether it was within `within`.
async fn closed_within(socket: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0; 1024];
    tokio::time::timeout(within, async {
        loop {
            match socket.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

#[tokio::test]
async fn a_connection_in_its_handshake_holds_no_client_slot() {
    let app = TestApp::spawn(&["--max-clients", "2"]).await;
    let mut strangers = Vec::new();
    for _ in 0..6 {
        strangers.push(stranger(&app).await);
    }
    let _client = app.native("real", "UTC").await;
    let health = app.health().await;
    assert_eq!(health["slots_in_use"], 1, "{health}");
    assert_eq!(health["handshakes"], 6, "{health}");
    // The second slot is still free for a second real client.
    let _second = app.native("second", "UTC").await;
}

#[tokio::test]
async fn when_the_handshake_pool_is_full_the_oldest_makes_room_with_4005() {
    let app = TestApp::spawn(&["--max-handshakes", "3"]).await;
    let mut oldest = stranger(&app).await;
    let _second = stranger(&app).await;
    let _third = stranger(&app).await;
    let mut newcomer = stranger(&app).await;
    let notice = oldest.next_json().await;
    assert_eq!(notice["code"], "too_many_handshakes", "{notice}");
    let closed = oldest.closed().await;
    assert_eq!(closed.code, 4005, "{closed:?}");
    assert!(closed.reason.starts_with("crowded_out"), "{closed:?}");
    newcomer
        .send_json(json!({"type": "hello", "client_id": "late", "timezone": "UTC"}))
        .await;
    assert_eq!(newcomer.next_json().await["type"], "welcome");
}

#[tokio::test]
async fn an_address_with_its_share_of_handshakes_gets_429_until_one_ends() {
    let app = TestApp::spawn(&[
        "--max-handshakes-per-address",
        "2",
        "--proxy-address",
        "none",
    ])
    .await;
    let first = stranger(&app).await;
    let _second = stranger(&app).await;
    let (status, body) = refused_upgrade(&app.ws_url(), false, &[]).await;
    assert_eq!(status, 429);
    assert_eq!(body["code"], "too_many_handshakes", "{body}");
    first.close().await;
    eventually("the address's place back", || async {
        Client::connect(&app.ws_url(), true).await.ok()
    })
    .await;
}

#[tokio::test]
async fn a_proxy_address_is_not_capped_per_address() {
    // Loopback is a proxy's address by default: every client behind it shares it.
    let app = TestApp::spawn(&["--max-handshakes-per-address", "1"]).await;
    let _first = stranger(&app).await;
    let _second = stranger(&app).await;
    assert_eq!(app.health().await["handshakes"], 2);
}

#[tokio::test]
async fn a_token_on_the_upgrade_buys_no_place_beyond_the_pools_caps() {
    let app = TestApp::spawn(&[
        "--auth-secret",
        SECRET,
        "--max-handshakes-per-address",
        "1",
        "--proxy-address",
        "none",
    ])
    .await;
    let bearer = format!(
        "Bearer {}",
        token(SECRET, "alice", Duration::from_secs(3600), app.clock.now())
    );
    let holder = stranger(&app).await;
    let (status, body) = refused_upgrade(&app.ws_url(), true, &[("Authorization", &bearer)]).await;
    assert_eq!(
        (status, &body["code"]),
        (429, &json!("too_many_handshakes"))
    );
    holder.close().await;
    let mut client = eventually("the address's place back", || async {
        Client::connect_with(&app.ws_url(), true, &[("Authorization", &bearer)])
            .await
            .ok()
    })
    .await;
    client
        .send_json(json!({"type": "hello", "timezone": "UTC"}))
        .await;
    assert_eq!(client.next_json().await["type"], "welcome");
}

#[tokio::test]
async fn half_sent_request_headers_are_closed_at_the_header_timeout() {
    let app = TestApp::spawn(&["--http-header-timeout", "0.5"]).await;
    let mut slow = TcpStream::connect(app.addr).await.expect("connects");
    slow.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("sent");
    assert!(
        closed_within(&mut slow, Duration::from_secs(10)).await,
        "a connection that never finished its headers was still open"
    );
}

#[tokio::test]
async fn a_kept_alive_connection_is_closed_after_the_idle_timeout() {
    let app = TestApp::spawn(&["--http-idle-timeout", "0.5", "--http-header-timeout", "60"]).await;
    let mut socket = TcpStream::connect(app.addr).await.expect("connects");
    socket
        .write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .expect("sent");
    let mut buf = [0; 4096];
    let read = socket.read(&mut buf).await.expect("an answer");
    assert!(
        buf[..read].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        &buf[..read]
    );
    // Not the header timeout (a minute): the idle one.
    assert!(
        closed_within(&mut socket, Duration::from_secs(10)).await,
        "an idle kept-alive connection was still open"
    );
}

#[tokio::test]
async fn past_the_http_connection_cap_a_connection_waits_for_a_place() {
    let app = TestApp::spawn(&["--max-http-connections", "1"]).await;
    let mut holder = TcpStream::connect(app.addr).await.expect("connects");
    holder
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("sent");
    // The backlog is first in, first out: the holder is accepted first and takes the place.
    let mut waiting = TcpStream::connect(app.addr).await.expect("in the backlog");
    waiting
        .write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await
        .expect("sent");
    let mut answer = Vec::new();
    let early =
        tokio::time::timeout(Duration::from_millis(500), waiting.read_to_end(&mut answer)).await;
    assert!(early.is_err(), "answered past the cap: {answer:?}");
    drop(holder);
    waiting
        .read_to_end(&mut answer)
        .await
        .expect("answered once the holder left");
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
}

#[tokio::test]
async fn one_address_holds_only_its_share_of_the_http_connections() {
    let app = TestApp::spawn(&[
        "--max-http-connections-per-address",
        "2",
        "--proxy-address",
        "none",
    ])
    .await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut slow = TcpStream::connect(app.addr).await.expect("connects");
        slow.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("sent");
        held.push(slow);
    }
    let mut third = TcpStream::connect(app.addr)
        .await
        .expect("accepted, then closed");
    assert!(
        closed_within(&mut third, Duration::from_secs(10)).await,
        "a third connection from the same address was kept"
    );
    // Another address is not held back.
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    socket
        .bind("127.0.0.2:0".parse().expect("an address"))
        .expect("bound to another loopback address");
    let mut other = socket.connect(app.addr).await.expect("connects");
    other
        .write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await
        .expect("sent");
    let mut answer = Vec::new();
    other.read_to_end(&mut answer).await.expect("answered");
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
}

#[tokio::test]
async fn without_auth_pages_of_other_sites_and_rebound_names_are_refused() {
    let app = TestApp::spawn(&[]).await;
    let (status, body) =
        refused_upgrade(&app.ws_url(), false, &[("Origin", "https://evil.example")]).await;
    assert_eq!((status, &body["code"]), (403, &json!("forbidden_origin")));
    let (status, body) = refused_upgrade(
        &app.ws_url(),
        false,
        &[
            ("Host", "rebound.evil.example"),
            ("Origin", "http://rebound.evil.example"),
        ],
    )
    .await;
    assert_eq!((status, &body["code"]), (421, &json!("forbidden_host")));
    let history = app
        .http
        .get(app.url("/chat-history/alice"))
        .header("Origin", "https://evil.example")
        .send()
        .await
        .expect("HTTP works");
    assert_eq!(history.status(), 403);
    // A development server's page on this machine, any port, gets in.
    let mut client =
        Client::connect_with(&app.ws_url(), false, &[("Origin", "http://localhost:3000")])
            .await
            .expect("a loopback page connects");
    client
        .send_json(json!({"client_id": "dev", "timezone": "UTC"}))
        .await;
    assert_eq!(client.next_json().await["type"], "system");

    // --allowed-host and --cors-origin add to what is let in.
    let configured = TestApp::spawn(&[
        "--allowed-host",
        "chat.example.com",
        "--cors-origin",
        "https://chat.example.com",
    ])
    .await;
    let response = configured
        .http
        .get(configured.url("/health"))
        .header("Host", "chat.example.com")
        .header("Origin", "https://chat.example.com")
        .send()
        .await
        .expect("HTTP works");
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn with_auth_on_the_origin_is_left_to_the_token() {
    let app = TestApp::spawn(&["--auth-secret", SECRET]).await;
    let mut client = Client::connect_with(
        &app.ws_url(),
        true,
        &[("Origin", "https://chat.example.com")],
    )
    .await
    .expect("upgraded");
    client
        .send_json(json!({"type": "hello", "timezone": "UTC", "token": token(SECRET, "alice", Duration::from_secs(3600), app.clock.now())}))
        .await;
    assert_eq!(client.next_json().await["type"], "welcome");
}

/// The real binary, with auth on or off, under every kind of stranger at once: a real client
/// still gets in and is answered, memory stays put, and each stranger is closed within its
/// deadline with its own code.
async fn attacked(auth: bool) {
    const SECRET_FLAG: &str = "--auth-secret";
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut command = support::serve_command(dir.path());
    command.args([
        "--bind",
        "127.0.0.1:0",
        "--reply-delay-scale",
        "0",
        "--handshake-timeout",
        "2",
        "--http-header-timeout",
        "2",
        "--log",
        "warn,kaiwa::app=info",
    ]);
    if auth {
        command.args([SECRET_FLAG, SECRET]);
    }
    let support::Listening {
        mut child, addr, ..
    } = support::start_listening("kaiwa", &mut command, dir.path()).await;
    let minter = auth.then(|| {
        let settings = kaiwa_load::auth::TokenSettings {
            secret: SECRET.to_owned(),
            audience: "kaiwa".to_owned(),
            ttl: Duration::from_secs(3600),
        };
        std::sync::Arc::new(settings.minter().expect("a minter"))
    });
    let config = kaiwa_load::strangers::StrangersConfig {
        url: format!("ws://{addr}/ws"),
        silent: 300,
        large: 8,
        large_bytes: 30_000_000,
        slow_headers: 200,
        auth: minter,
        server_pid: child.id(),
        wait: Duration::from_secs(20),
    };
    let report = kaiwa_load::strangers::run(config)
        .await
        .expect("the scenario runs");
    eprintln!("auth {auth}:\n{}", report.table());
    child.kill().await.ok();

    // Within a second or two: the strangers are there in hundreds, and it does not wait on them.
    let replied = report.client.replied_ms.unwrap_or(u64::MAX);
    assert!(replied < 2_500, "{}", report.table());
    let memory = report.memory.expect("the server's memory");
    assert!(
        memory.peak_kib - memory.before_kib < 40 * 1024,
        "{}",
        report.table()
    );
    // Closed by their deadline (2 s here, with time to spare for a loaded machine), each with
    // its documented code.
    for (kind, count, ended) in [
        ("silent", 300, "4004"),
        ("large", 8, "1009"),
        ("slow_headers", 200, "eof"),
    ] {
        let stranger = report.kind(kind).expect("reported");
        assert_eq!(stranger.opened, count, "{}", report.table());
        assert_eq!(
            stranger.ended.get(ended).copied(),
            Some(count),
            "{}",
            report.table()
        );
        assert!(
            stranger.slowest_end_ms.unwrap_or(u64::MAX) < 6_000,
            "{}",
            report.table()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_every_kind_of_stranger_a_client_with_a_token_gets_in_and_is_answered() {
    attacked(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_every_kind_of_stranger_a_client_with_a_valid_hello_gets_in_and_is_answered() {
    attacked(false).await;
}
