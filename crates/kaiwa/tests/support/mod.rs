//! The test harness: a real kaiwa on port 0 with a temporary data directory and a manual clock,
//! and WebSocket clients for both protocols.

#![allow(dead_code, unreachable_pub)]

use anyhow::{Context, Result, bail};
use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;
use futures::{SinkExt, StreamExt};
use kaiwa::app::AppError;
use kaiwa::clock::ManualClock;
use kaiwa::store::Store;
use kaiwa::{Application, ServeConfig};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tempfile::TempDir;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long a test waits for any one frame before failing.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(10);

/// Every message type accepted at any hour: for tests whose clients are in any timezone, or
/// whose point is not the windows.
pub const ANY_HOUR: [&str; 8] = [
    "--text-window",
    "00:00-24:00",
    "--voice-window",
    "00:00-24:00",
    "--image-window",
    "00:00-24:00",
    "--video-window",
    "00:00-24:00",
];

/// A UTC instant for a local wall-clock time in `zone`.
pub fn local(zone: &str, y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> DateTime<Utc> {
    let tz: Tz = zone.parse().expect("a known zone");
    tz.with_ymd_and_hms(y, mo, d, h, mi, s)
        .single()
        .expect("an unambiguous local time")
        .with_timezone(&Utc)
}

/// 09:00 UTC: text, voice and image are accepted in UTC; video is not.
pub fn morning() -> DateTime<Utc> {
    local("UTC", 2026, 11, 21, 9, 0, 0)
}

/// 21:00 UTC: text, video and image are accepted in UTC; voice is not.
pub fn evening() -> DateTime<Utc> {
    local("UTC", 2026, 11, 21, 21, 0, 0)
}

/// Logs to the test output when `KAIWA_TEST_LOG` holds a filter (e.g. `kaiwa=debug`).
fn init_logs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if let Ok(filter) = std::env::var("KAIWA_TEST_LOG") {
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_test_writer()
                .try_init()
                .ok();
        }
    });
}

pub mod cluster;
pub mod postgres;

/// Runs a program of the machine's to its end and returns what it printed; panics with its
/// output unless it succeeds, naming the Debian package that brings it when it is missing and
/// adding `if_failed` when it fails.
pub fn tool(program: &str, args: &[&str], package: &str, if_failed: &str) -> String {
    let output = std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|err| {
            panic!("{program} cannot run ({err}): it comes with Debian's {package}")
        });
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}{}\n{if_failed}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub struct TestApp {
    pub addr: SocketAddr,
    /// The admin address, with `--admin-bind`.
    pub admin_addr: Option<SocketAddr>,
    pub clock: Arc<ManualClock>,
    pub http: reqwest::Client,
    dir: Option<TempDir>,
    /// The PostgreSQL database of this test, when it runs on PostgreSQL (else SQLite, in the
    /// data directory).
    database: Option<Arc<postgres::TestDatabase>>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), AppError>>>,
}

impl TestApp {
    /// Starts kaiwa with reply delays off and the given extra flags.
    pub async fn spawn(flags: &[&str]) -> TestApp {
        let dir = tempfile::tempdir().expect("a temporary directory");
        Self::spawn_in(dir, flags).await
    }

    /// Starts kaiwa on an existing data directory (to test restarts).
    pub async fn spawn_in(dir: TempDir, flags: &[&str]) -> TestApp {
        Self::spawn_wrapped(dir, flags, |store| store).await
    }

    /// Starts kaiwa with its store wrapped by `wrap` (to slow it down, or make it fail).
    pub async fn spawn_wrapped(
        dir: TempDir,
        flags: &[&str],
        wrap: impl FnOnce(Arc<dyn Store>) -> Arc<dyn Store>,
    ) -> TestApp {
        Self::start(dir, None, flags, wrap).await
    }

    /// Starts kaiwa on a PostgreSQL database of this test's own.
    pub async fn spawn_postgres(flags: &[&str]) -> TestApp {
        let database = Arc::new(postgres::TestDatabase::create().await);
        let dir = tempfile::tempdir().expect("a temporary directory");
        Self::start(dir, Some(database), flags, |store| store).await
    }

    /// Starts kaiwa on a PostgreSQL database made by the test (a restored dump, say) and the
    /// data directory `dir`.
    pub async fn spawn_on(
        dir: TempDir,
        database: Arc<postgres::TestDatabase>,
        flags: &[&str],
    ) -> TestApp {
        Self::start(dir, Some(database), flags, |store| store).await
    }

    /// Stops kaiwa as SIGTERM would, and starts it again on the same data directory and
    /// database.
    pub async fn restart(mut self, flags: &[&str]) -> TestApp {
        self.shutdown().await.expect("kaiwa stops cleanly");
        let dir = self.dir.take().expect("the data directory");
        Self::start(dir, self.database.take(), flags, |store| store).await
    }

    /// The URL of this test's PostgreSQL database, if it runs on one.
    pub fn database_url(&self) -> Option<&str> {
        self.database.as_ref().map(|database| database.url.as_str())
    }

    async fn start(
        dir: TempDir,
        database: Option<Arc<postgres::TestDatabase>>,
        flags: &[&str],
        wrap: impl FnOnce(Arc<dyn Store>) -> Arc<dyn Store>,
    ) -> TestApp {
        init_logs();
        let data_dir = dir.path().to_str().expect("a UTF-8 path").to_owned();
        // Always named, so that a DATABASE_URL in the environment never redirects a test.
        let database_url = match &database {
            Some(database) => database.url.clone(),
            None => format!("sqlite://{data_dir}/kaiwa.db"),
        };
        let mut args = vec![
            "--database-url",
            &database_url,
            "--bind",
            "127.0.0.1:0",
            "--data-dir",
            &data_dir,
            "--reply-delay-scale",
            "0",
            "--shutdown-grace",
            "5",
            // Never a developer's own key from the environment: tests choose their responder.
            "--openai-api-key",
            "",
        ];
        args.extend_from_slice(flags);
        let config = ServeConfig::from_args(args).expect("a valid configuration");
        let clock = Arc::new(ManualClock::new(morning()));
        let store = kaiwa::app::open_store(&config.store)
            .await
            .expect("the store opens");
        let app = Application::build_with_store(config, clock.clone(), wrap(store))
            .await
            .expect("kaiwa starts");
        let addr = app.local_addr();
        let admin_addr = app.admin_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until(async move {
            stopped.await.ok();
        }));
        TestApp {
            addr,
            admin_addr,
            clock,
            http: reqwest::Client::new(),
            dir: Some(dir),
            database,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.as_ref().expect("the data directory").path()
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn set_time(&self, now: DateTime<Utc>) {
        self.clock.set(now);
    }

    /// A plain GET of `path`.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(self.url(path))
            .send()
            .await
            .expect("HTTP works")
    }

    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let response = self.get(path).await;
        let status = response.status().as_u16();
        let body = response.json().await.expect("a JSON body");
        (status, body)
    }

    pub async fn health(&self) -> Value {
        self.get_json("/health").await.1
    }

    /// A legacy client after a successful handshake.
    pub async fn legacy(&self, client_id: &str, timezone: &str) -> Client {
        let mut client = Client::connect(&self.ws_url(), false)
            .await
            .expect("connects");
        client
            .send_json(json!({"client_id": client_id, "timezone": timezone}))
            .await;
        let connected = client.next_json().await;
        assert_eq!(
            connected["data"]["message"], "Connected successfully",
            "{connected}"
        );
        client
    }

    /// A native client (`kaiwa.v1` by header) after `welcome`.
    pub async fn native(&self, client_id: &str, timezone: &str) -> Client {
        self.native_with(client_id, timezone, false).await.0
    }

    /// A native client; returns the welcome frame too.
    pub async fn native_with(
        &self,
        client_id: &str,
        timezone: &str,
        resume: bool,
    ) -> (Client, Value) {
        self.native_hello(json!({"type": "hello", "client_id": client_id, "timezone": timezone, "resume": resume}))
            .await
    }

    /// A native client that resumes its reply stream after `after`, the `seq` of the last reply
    /// it processed.
    pub async fn native_after(&self, client_id: &str, after: u64) -> Client {
        self.native_hello(
            json!({"type": "hello", "client_id": client_id, "timezone": "UTC", "after": after}),
        )
        .await
        .0
    }

    /// A native client that says `hello`; returns the welcome frame too.
    pub async fn native_hello(&self, hello: Value) -> (Client, Value) {
        let mut client = Client::connect(&self.ws_url(), true)
            .await
            .expect("connects");
        client.send_json(hello).await;
        let welcome = client.next_json().await;
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        (client, welcome)
    }

    /// Stops kaiwa as SIGTERM would and returns its data directory for a restart.
    pub async fn stop(mut self) -> TempDir {
        self.shutdown().await.expect("kaiwa stops cleanly");
        self.dir.take().expect("the data directory")
    }

    pub async fn shutdown(&mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            stop.send(()).ok();
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .context("shutdown took too long")???;
        }
        Ok(())
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            stop.send(()).ok();
        }
    }
}

pub type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A WebSocket client that reads JSON frames, skipping heartbeats.
pub struct Client {
    pub ws: Socket,
}

/// What one read from a socket means to a test: a JSON frame, the end of the connection (with
/// its close code, 1005 for none, 1006 for a broken stream), or `None` for a frame tests
/// ignore (ping, pong, binary).
pub fn decode(
    frame: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
) -> Option<Result<Value, Closed>> {
    match frame {
        Some(Ok(Message::Text(text))) => {
            Some(Ok(serde_json::from_str(&text).expect("frames are JSON")))
        }
        Some(Ok(Message::Close(frame))) => Some(Err(frame
            .map(|f| Closed {
                code: f.code.into(),
                reason: f.reason.to_string(),
            })
            .unwrap_or(Closed {
                code: 1005,
                reason: String::new(),
            }))),
        Some(Ok(_)) => None,
        Some(Err(err)) => Some(Err(Closed {
            code: 1006,
            reason: err.to_string(),
        })),
        None => Some(Err(Closed {
            code: 1006,
            reason: "stream ended".into(),
        })),
    }
}

/// How a connection ended, as the client saw it.
#[derive(Debug, PartialEq, Eq)]
pub struct Closed {
    pub code: u16,
    pub reason: String,
}

impl Client {
    pub async fn connect(url: &str, native: bool) -> Result<Client> {
        Self::connect_with(url, native, &[]).await
    }

    /// Connects with extra headers on the upgrade request (`Authorization`, say).
    pub async fn connect_with(
        url: &str,
        native: bool,
        headers: &[(&'static str, &str)],
    ) -> Result<Client> {
        let mut request = url.into_client_request()?;
        for (name, value) in headers {
            request
                .headers_mut()
                .insert(*name, HeaderValue::from_str(value)?);
        }
        if native {
            request.headers_mut().insert(
                "Sec-WebSocket-Protocol",
                HeaderValue::from_static("kaiwa.v1"),
            );
        }
        let (ws, response) = tokio_tungstenite::connect_async(request).await?;
        if native {
            let chosen = response.headers().get("sec-websocket-protocol");
            if chosen.map(|v| v.as_bytes()) != Some(b"kaiwa.v1") {
                bail!("the server did not choose kaiwa.v1: {chosen:?}");
            }
        }
        Ok(Client { ws })
    }

    pub async fn send_json(&mut self, value: Value) {
        self.send_text(&value.to_string()).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws
            .send(Message::text(text))
            .await
            .expect("the frame is sent");
    }

    pub async fn send_binary(&mut self, bytes: Vec<u8>) {
        self.ws
            .send(Message::binary(bytes))
            .await
            .expect("the frame is sent");
    }

    /// The next JSON frame that is not a heartbeat; panics on close or timeout.
    pub async fn next_json(&mut self) -> Value {
        match self.next().await {
            Ok(value) => value,
            Err(closed) => panic!("connection closed while waiting for a frame: {closed:?}"),
        }
    }

    /// The next JSON frame that is not a heartbeat, or how the connection ended.
    pub async fn next(&mut self) -> Result<Value, Closed> {
        loop {
            let frame = tokio::time::timeout(FRAME_TIMEOUT, self.ws.next())
                .await
                .expect("a frame arrives in time");
            match decode(frame) {
                Some(Ok(value)) if value["type"] == "heartbeat" => continue,
                Some(result) => return result,
                None => continue,
            }
        }
    }

    /// The next JSON frame that is not a heartbeat, or `None` once the connection has ended,
    /// however long that takes (the caller bounds the wait).
    pub async fn next_raw(&mut self) -> Option<Value> {
        loop {
            match decode(self.ws.next().await) {
                Some(Ok(value)) if value["type"] == "heartbeat" => continue,
                Some(Ok(value)) => return Some(value),
                Some(Err(_)) => return None,
                None => continue,
            }
        }
    }

    /// Reads until the close frame, skipping everything else.
    pub async fn closed(&mut self) -> Closed {
        loop {
            if let Err(closed) = self.next().await {
                return closed;
            }
        }
    }

    /// Reads frames until one satisfies `pred`; panics if the connection closes first.
    pub async fn until(&mut self, mut pred: impl FnMut(&Value) -> bool) -> Value {
        loop {
            let value = self.next_json().await;
            if pred(&value) {
                return value;
            }
        }
    }

    /// Acknowledges every reply up to `seq` (native `received`).
    pub async fn received(&mut self, seq: u64) {
        self.send_json(json!({"type": "received", "seq": seq}))
            .await;
    }

    pub async fn close(mut self) {
        self.ws.close(None).await.ok();
        // Read the server's answer so the close completes.
        while let Some(Ok(_)) = self.ws.next().await {}
    }
}

/// A native client (by header) with a small receive buffer, so that frames it does not read
/// back up on the server quickly.
pub async fn slow_reader(app: &TestApp, client_id: &str) -> Client {
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    socket
        .set_recv_buffer_size(8 * 1024)
        .expect("buffer size set");
    let stream = socket.connect(app.addr).await.expect("connects");
    let mut request = app.ws_url().into_client_request().expect("a request");
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static("kaiwa.v1"),
    );
    let stream = MaybeTlsStream::Plain(stream);
    let (ws, _) = tokio_tungstenite::client_async(request, stream)
        .await
        .expect("upgrades");
    let mut client = Client { ws };
    client
        .send_json(json!({"type": "hello", "client_id": client_id, "timezone": "UTC"}))
        .await;
    client
}

/// Sends up to `count` native texts without reading, until the server stops taking them.
pub async fn flood(client: &mut Client, count: usize) {
    for n in 0..count {
        let frame = send(&format!("s{n}"), "text", "are you keeping up?").to_string();
        if client.ws.feed(Message::text(frame)).await.is_err() {
            break;
        }
        if n % 500 == 0 && client.ws.flush().await.is_err() {
            break;
        }
    }
    client.ws.flush().await.ok();
}

/// A native client (`kaiwa.v1` by header) of the server at `addr`, in UTC, after `welcome`.
pub async fn native_at(addr: SocketAddr, client_id: &str) -> Client {
    let mut client = Client::connect(&format!("ws://{addr}/ws"), true)
        .await
        .expect("connects");
    client
        .send_json(json!({"type": "hello", "client_id": client_id, "timezone": "UTC"}))
        .await;
    let welcome = client.next_json().await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    client
}

/// A native `send` frame.
pub fn send(id: &str, message_type: &str, content: &str) -> Value {
    json!({"type": "send", "id": id, "message_type": message_type, "content": content})
}

/// A native `send` frame for a file in base64.
pub fn send_file(id: &str, message_type: &str, filename: &str, bytes: &[u8]) -> Value {
    json!({"type": "send", "id": id, "message_type": message_type, "filename": filename, "content": b64(bytes)})
}

/// A legacy message frame.
pub fn legacy_message(message_type: &str, content: &str) -> Value {
    json!({"message_type": message_type, "content": content, "timestamp": "2026-11-21T09:00:00Z"})
}

pub fn legacy_file(message_type: &str, filename: &str, bytes: &[u8]) -> Value {
    json!({"message_type": message_type, "filename": filename, "content": b64(bytes), "timestamp": "2026-11-21T09:00:00Z"})
}

pub fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Small files of each accepted kind, recognised by content.
pub mod files {
    pub fn png() -> Vec<u8> {
        kaiwa::replies::image::render(42)
    }

    pub fn wav() -> Vec<u8> {
        kaiwa::replies::voice::clip("voice")
            .expect("a clip")
            .wav
            .to_vec()
    }

    /// The start of an MP4 file: an `ftyp` box, then padding.
    pub fn mp4() -> Vec<u8> {
        let mut bytes = b"\0\0\0\x18ftypisom\0\0\x02\0isomiso2".to_vec();
        bytes.extend(std::iter::repeat_n(0u8, 2048));
        bytes
    }
}

/// Every path under `root`, relative to it.
pub fn files_under(root: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("readable").flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                found.push(path.strip_prefix(root).expect("under root").to_path_buf());
            }
        }
    }
    found.sort();
    found
}

/// A WebSocket client written by hand over TCP: it never answers pings, so it looks like a
/// client whose network died after the handshake.
pub mod raw {
    use super::FRAME_TIMEOUT;
    use std::net::SocketAddr;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    pub struct RawClient {
        stream: TcpStream,
        buffer: Vec<u8>,
    }

    /// A server frame: opcode and payload.
    #[derive(Debug)]
    pub struct Frame {
        pub opcode: u8,
        pub payload: Vec<u8>,
    }

    impl RawClient {
        pub async fn connect(addr: SocketAddr) -> RawClient {
            let mut stream = TcpStream::connect(addr).await.expect("connects");
            let request = format!(
                "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            );
            stream
                .write_all(request.as_bytes())
                .await
                .expect("request sent");
            let mut client = RawClient {
                stream,
                buffer: Vec::new(),
            };
            let end = loop {
                if let Some(end) = client.buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                    break end + 4;
                }
                client.fill().await;
            };
            let head = String::from_utf8_lossy(&client.buffer[..end]).to_string();
            assert!(head.starts_with("HTTP/1.1 101"), "{head}");
            client.buffer.drain(..end);
            client
        }

        async fn fill(&mut self) -> usize {
            let mut chunk = [0u8; 4096];
            let read = tokio::time::timeout(FRAME_TIMEOUT, self.stream.read(&mut chunk))
                .await
                .expect("data arrives in time")
                .unwrap_or(0);
            self.buffer.extend_from_slice(&chunk[..read]);
            read
        }

        pub async fn send_text(&mut self, text: &str) {
            self.send_text_bytes(text.as_bytes()).await;
        }

        /// A text frame with any payload, valid UTF-8 or not (a real client library would
        /// refuse to send invalid UTF-8 as text).
        pub async fn send_text_bytes(&mut self, payload: &[u8]) {
            let mask = [0x37, 0xfa, 0x21, 0x3d];
            let mut frame = vec![0x81];
            match payload.len() {
                n if n < 126 => frame.push(0x80 | n as u8),
                n if n <= 0xFFFF => {
                    frame.push(0x80 | 126);
                    frame.extend_from_slice(&(n as u16).to_be_bytes());
                }
                n => {
                    frame.push(0x80 | 127);
                    frame.extend_from_slice(&(n as u64).to_be_bytes());
                }
            }
            frame.extend_from_slice(&mask);
            frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
            self.stream.write_all(&frame).await.expect("frame sent");
        }

        /// The next frame from the server, or `None` at the end of the stream.
        pub async fn next(&mut self) -> Option<Frame> {
            loop {
                if let Some((frame, used)) = parse(&self.buffer) {
                    self.buffer.drain(..used);
                    return Some(frame);
                }
                if self.fill().await == 0 {
                    return None;
                }
            }
        }

        /// Reads (without ever answering) until the close frame; returns its code.
        pub async fn close_code(&mut self) -> Option<u16> {
            while let Some(frame) = self.next().await {
                if frame.opcode == 0x8 && frame.payload.len() >= 2 {
                    return Some(u16::from_be_bytes([frame.payload[0], frame.payload[1]]));
                }
            }
            None
        }
    }

    fn parse(buffer: &[u8]) -> Option<(Frame, usize)> {
        if buffer.len() < 2 {
            return None;
        }
        let opcode = buffer[0] & 0x0F;
        let (len, start) = match buffer[1] & 0x7F {
            126 if buffer.len() >= 4 => (u16::from_be_bytes([buffer[2], buffer[3]]) as usize, 4),
            127 if buffer.len() >= 10 => {
                let mut len = [0u8; 8];
                len.copy_from_slice(&buffer[2..10]);
                (u64::from_be_bytes(len) as usize, 10)
            }
            126 | 127 => return None,
            n => (n as usize, 2),
        };
        if buffer.len() < start + len {
            return None;
        }
        let payload = buffer[start..start + len].to_vec();
        Some((Frame { opcode, payload }, start + len))
    }
}

/// Polls `check` until it returns `Some`, for state that settles asynchronously (a delivery
/// status written by the store's next batch, a slot freed after a close).
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + FRAME_TIMEOUT;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Signed tokens for tests: made with the same code the server checks them with.
pub mod tokens {
    use chrono::{DateTime, Utc};
    use kaiwa::auth::{Authenticator, KeyConfig};
    use kaiwa::domain::ClientId;
    use kaiwa::flags::Secret;
    use std::time::Duration;

    /// The secret tests turn auth on with.
    pub const SECRET: &str = "a-test-secret-that-is-long-enough-for-hs256";
    /// A second one, for rotations.
    pub const OTHER_SECRET: &str = "another-test-secret-also-long-enough-for-it";

    /// An authenticator signing with `secret` for `audience`.
    pub fn signer(secret: &str, audience: &str) -> Authenticator {
        let keys = KeyConfig {
            secrets: vec![Secret::new(secret)],
            secret_files: Vec::new(),
            audience: audience.into(),
        };
        Authenticator::new(&keys, Duration::ZERO, Duration::ZERO)
            .expect("valid keys")
            .expect("a secret")
    }

    /// A token for `client` signed with `secret` for the audience `kaiwa`, good for `ttl` from
    /// `now` (the server's clock).
    pub fn token(secret: &str, client: &str, ttl: Duration, now: DateTime<Utc>) -> String {
        token_for(secret, "kaiwa", client, ttl, now)
    }

    pub fn token_for(
        secret: &str,
        audience: &str,
        client: &str,
        ttl: Duration,
        now: DateTime<Utc>,
    ) -> String {
        signer(secret, audience)
            .issue(&ClientId::parse(client).expect("an id"), ttl, now)
            .expect("signed")
    }
}

/// Makes `command` (the `kaiwa` binary) a process of the test's own: it runs in `dir`, so no
/// `.env` file is found; no `KAIWA_*`, `OPENAI_API_KEY` or `DATABASE_URL` of the developer's
/// reaches it; its standard output is piped for its logs; and it dies with the test.
pub fn isolated<'c>(
    command: &'c mut tokio::process::Command,
    dir: &Path,
) -> &'c mut tokio::process::Command {
    command
        .current_dir(dir)
        .env_remove("OPENAI_API_KEY")
        .env_remove("DATABASE_URL")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("KAIWA_") {
            command.env_remove(name);
        }
    }
    command
}

/// The HTTP answer to an upgrade refused before anything was upgraded (401, 429, 403...):
/// its status and JSON body.
pub async fn refused_upgrade(
    url: &str,
    native: bool,
    headers: &[(&'static str, &str)],
) -> (u16, Value) {
    let err = Client::connect_with(url, native, headers)
        .await
        .err()
        .expect("the upgrade is refused");
    match err.downcast_ref::<tokio_tungstenite::tungstenite::Error>() {
        Some(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let body = response.body().clone().unwrap_or_default();
            (
                response.status().as_u16(),
                serde_json::from_slice(&body).unwrap_or(Value::Null),
            )
        }
        _ => panic!("not an HTTP refusal: {err:#}"),
    }
}

/// How long a `kaiwa` process of a test may take to listen.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A `kaiwa` process of the test's own, listening.
pub struct Listening {
    pub child: tokio::process::Child,
    pub addr: SocketAddr,
    /// The warnings it logged before it listened.
    pub warnings: Vec<String>,
}

/// `kaiwa serve` on `data_dir`, logging JSON (what [`start_listening`] reads), answered by the
/// built-in responder: the start of every test's command for the real binary. The caller adds
/// `--bind` and its own flags.
pub fn serve_command(data_dir: &Path) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_kaiwa"));
    command.arg("serve").arg("--data-dir").arg(data_dir).args([
        "--log-format",
        "json",
        "--openai-api-key",
        "",
    ]);
    command
}

/// Starts `command` (the `kaiwa` binary with its arguments and `--log-format json`) as a
/// process of the test's own in `dir` (see [`isolated`]), and returns it once it listens. Its
/// log lines go to the test's output prefixed with `name`: warnings and errors, the
/// application's own lines, and all of them with `KAIWA_TEST_CLUSTER_LOG` set.
pub async fn start_listening(
    name: &str,
    command: &mut tokio::process::Command,
    dir: &Path,
) -> Listening {
    isolated(command, dir);
    let mut child = command.spawn().expect("kaiwa starts");
    let stdout = child.stdout.take().expect("its standard output");
    let (listening, started) = oneshot::channel();
    tokio::spawn(read_logs(name.to_owned(), stdout, listening));
    let (addr, warnings) = match tokio::time::timeout(START_TIMEOUT, started).await {
        Ok(Ok(started)) => started,
        Ok(Err(_)) => panic!(
            "{name} stopped before listening: {:?}",
            child.wait().await.expect("its exit status")
        ),
        Err(_) => panic!("{name} did not listen within {START_TIMEOUT:?}"),
    };
    Listening {
        child,
        addr,
        warnings,
    }
}

/// Reads a kaiwa's log lines (JSON) until it exits: the address it listens on, with the
/// warnings logged before, goes to `listening`. Reading on keeps a full pipe from blocking the
/// server.
async fn read_logs(
    name: String,
    stdout: tokio::process::ChildStdout,
    listening: oneshot::Sender<(SocketAddr, Vec<String>)>,
) {
    use tokio::io::AsyncBufReadExt;
    let mut listening = Some(listening);
    let mut warnings = Vec::new();
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let verbose = std::env::var_os("KAIWA_TEST_CLUSTER_LOG").is_some();
    while let Ok(Some(line)) = lines.next_line().await {
        let Ok(entry) = serde_json::from_str::<Value>(&line) else {
            eprintln!("{name}: {line}");
            continue;
        };
        if entry["message"] == "kaiwa is listening" {
            let addr = entry["addr"].as_str().and_then(|a| a.parse().ok());
            if let (Some(addr), Some(listening)) = (addr, listening.take()) {
                listening.send((addr, std::mem::take(&mut warnings))).ok();
            }
            continue;
        }
        if listening.is_some() && entry["level"] == "WARN" {
            warnings.push(entry["message"].as_str().unwrap_or_default().to_owned());
        }
        if verbose || entry["level"] != "INFO" || entry["target"] == "kaiwa::app" {
            eprintln!("{name}: {line}");
        }
    }
}
