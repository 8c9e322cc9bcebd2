//! The `strangers` scenario: what connections that never say who they are cost a server, and
//! whether a real client still gets in among them. It opens, all at once, WebSocket upgrades
//! that never send a frame, upgrades whose first frame is tens of megabytes, and HTTP requests
//! whose headers never end; once they are all open, one real client connects, sends an image
//! and waits for its replies. It reports how long that client took, how and when the server
//! closed each stranger, and the server's resident memory before, at its peak and after.
//!
//! The strangers speak raw bytes over TCP, as an attacker would: an upgrade request, then as
//! little or as much as the scenario wants, reading only what the server sends back.

use crate::auth::Minter;
use crate::connect;
use crate::connections::resident_kib;
use crate::media::Samples;
use futures::{SinkExt, StreamExt};
use kaiwa_protocol::{MessageStatus, MessageType, native};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// How often the server's memory is read while the strangers are at it.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// What a large first frame is written in.
const CHUNK: usize = 64 * 1024;

#[derive(Debug, Clone)]
pub struct StrangersConfig {
    /// The server's WebSocket endpoint (`ws://host:port/ws`).
    pub url: String,
    /// Upgrades that never send a frame.
    pub silent: usize,
    /// Upgrades whose first frame is `large_bytes` long.
    pub large: usize,
    pub large_bytes: usize,
    /// HTTP requests whose headers never end.
    pub slow_headers: usize,
    /// The real client's token, when the server has auth on.
    pub auth: Option<Arc<Minter>>,
    /// The server's process id, to read its memory.
    pub server_pid: Option<u32>,
    /// How long the strangers get to be closed by the server before the run gives up on them.
    pub wait: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum StrangersError {
    #[error("--url {0:?} is not ws://host:port/path")]
    Url(String),
    #[error("{0}")]
    Resolve(String),
    #[error(transparent)]
    Media(#[from] crate::media::MediaError),
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthError),
}

/// How one kind of stranger fared.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KindReport {
    pub kind: String,
    /// Strangers that got as far as their kind goes (upgraded, or their headers half sent).
    pub opened: u64,
    /// Strangers refused before that, by what they got (an HTTP status, or the error).
    pub refused: BTreeMap<String, u64>,
    /// How the server ended the opened ones: a close code, `eof` (the socket closed with no
    /// close frame, or an HTTP connection closed), or `open` (still open when the run gave up).
    pub ended: BTreeMap<String, u64>,
    /// The longest an opened stranger lasted before the server ended it, in milliseconds.
    pub slowest_end_ms: Option<u64>,
}

/// How the real client fared among the strangers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClientReport {
    /// From the start of its connection to its welcome.
    pub welcome_ms: Option<u64>,
    /// From the start of its connection to its message's last reply.
    pub replied_ms: Option<u64>,
    /// Why it did not get that far.
    pub failure: Option<String>,
}

/// The server's resident memory (VmRSS), in KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct MemoryReport {
    pub before_kib: u64,
    pub peak_kib: u64,
    pub after_kib: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StrangersReport {
    pub kinds: Vec<KindReport>,
    pub client: ClientReport,
    pub memory: Option<MemoryReport>,
}

impl StrangersReport {
    pub fn kind(&self, kind: &str) -> Option<&KindReport> {
        self.kinds.iter().find(|report| report.kind == kind)
    }

    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<13} {:>7}  {:<22} {:<30} {:>9}",
            "stranger", "opened", "refused", "ended by the server", "slowest"
        );
        for kind in &self.kinds {
            let _ = writeln!(
                out,
                "{:<13} {:>7}  {:<22} {:<30} {:>9}",
                kind.kind,
                kind.opened,
                tally(&kind.refused),
                tally(&kind.ended),
                kind.slowest_end_ms
                    .map_or("-".to_owned(), |ms| format!("{:.1} s", ms as f64 / 1000.0)),
            );
        }
        let client = &self.client;
        let ms = |value: Option<u64>| value.map_or("-".to_owned(), |ms| format!("{ms} ms"));
        let _ = writeln!(
            out,
            "real client: welcome {}, last reply {}{}",
            ms(client.welcome_ms),
            ms(client.replied_ms),
            client
                .failure
                .as_ref()
                .map_or(String::new(), |failure| format!(" ({failure})")),
        );
        if let Some(memory) = &self.memory {
            let _ = writeln!(
                out,
                "server memory: {:.1} MiB before, {:.1} MiB at the peak, {:.1} MiB after",
                memory.before_kib as f64 / 1024.0,
                memory.peak_kib as f64 / 1024.0,
                memory.after_kib as f64 / 1024.0,
            );
        }
        out
    }
}

fn tally(counts: &BTreeMap<String, u64>) -> String {
    if counts.is_empty() {
        return "-".to_owned();
    }
    counts
        .iter()
        .map(|(what, count)| format!("{what}: {count}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What became of one stranger.
enum Fate {
    Refused(String),
    /// Opened, and ended after this long with this code (or `eof`, or `open`).
    Ended(String, Duration),
}

/// The kinds of stranger, in the order of the report (`kind as usize` is its place there).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Upgrades, then says nothing.
    Silent,
    /// Upgrades, then starts a huge first frame.
    Large,
    /// Sends half a request's headers, then nothing.
    SlowHeaders,
}

impl Kind {
    const ALL: [Kind; 3] = [Kind::Silent, Kind::Large, Kind::SlowHeaders];

    fn name(self) -> &'static str {
        match self {
            Self::Silent => "silent",
            Self::Large => "large",
            Self::SlowHeaders => "slow_headers",
        }
    }

    fn count(self, config: &StrangersConfig) -> usize {
        match self {
            Self::Silent => config.silent,
            Self::Large => config.large,
            Self::SlowHeaders => config.slow_headers,
        }
    }
}

/// The parts of the endpoint a raw client needs.
struct Target {
    addr: SocketAddr,
    host: String,
    path: String,
}

impl Target {
    async fn parse(url: &str) -> Result<Self, StrangersError> {
        let rest = url
            .strip_prefix("ws://")
            .ok_or_else(|| StrangersError::Url(url.to_owned()))?;
        let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
        let addr = tokio::net::lookup_host(host)
            .await
            .map_err(|err| StrangersError::Resolve(format!("{host}: {err}")))?
            .next()
            .ok_or_else(|| StrangersError::Resolve(format!("{host} has no address")))?;
        Ok(Self {
            addr,
            host: host.to_owned(),
            path: format!("/{path}"),
        })
    }
}

/// Runs the scenario.
pub async fn run(config: StrangersConfig) -> Result<StrangersReport, StrangersError> {
    let target = Arc::new(Target::parse(&config.url).await?);
    let samples = Samples::generate()?;
    let before = config.server_pid.and_then(resident_kib);
    let sampling = CancellationToken::new();
    let peak = tokio::spawn(sample_peak(config.server_pid, sampling.clone()));

    let mut strangers = JoinSet::new();
    let (opened_tx, mut opened_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    for kind in Kind::ALL {
        for _ in 0..kind.count(&config) {
            let target = target.clone();
            let opened = opened_tx.clone();
            let (wait, bytes) = (config.wait, config.large_bytes);
            strangers
                .spawn(async move { (kind, stranger(kind, &target, bytes, opened, wait).await) });
        }
    }
    drop(opened_tx);
    // Every stranger in place (or refused) before the real client comes.
    let total: usize = Kind::ALL.iter().map(|kind| kind.count(&config)).sum();
    let settle = tokio::time::timeout(config.wait, async {
        let mut settled = 0;
        while settled < total && opened_rx.recv().await.is_some() {
            settled += 1;
        }
    });
    settle.await.ok();

    let client = real_client(&config, &samples).await;

    let mut kinds = Kind::ALL.map(|kind| KindReport {
        kind: kind.name().to_owned(),
        ..KindReport::default()
    });
    while let Some(joined) = strangers.join_next().await {
        let Ok((kind, fate)) = joined else { continue };
        let Some(report) = kinds.get_mut(kind as usize) else {
            continue;
        };
        match fate {
            Fate::Refused(why) => *report.refused.entry(why).or_default() += 1,
            Fate::Ended(how, lasted) => {
                report.opened += 1;
                *report.ended.entry(how).or_default() += 1;
                let lasted = u64::try_from(lasted.as_millis()).unwrap_or(u64::MAX);
                report.slowest_end_ms = Some(report.slowest_end_ms.unwrap_or(0).max(lasted));
            }
        }
    }
    sampling.cancel();
    let peak = peak.await.ok().flatten();
    let after = config.server_pid.and_then(resident_kib);
    let memory = match (before, peak, after) {
        (Some(before), Some(peak), Some(after)) => Some(MemoryReport {
            before_kib: before,
            peak_kib: peak.max(before).max(after),
            after_kib: after,
        }),
        _ => None,
    };
    Ok(StrangersReport {
        kinds: kinds.into(),
        client,
        memory,
    })
}

/// The highest resident memory of `pid` until `stop`.
async fn sample_peak(pid: Option<u32>, stop: CancellationToken) -> Option<u64> {
    let pid = pid?;
    let mut peak = resident_kib(pid)?;
    loop {
        tokio::select! {
            () = stop.cancelled() => return Some(peak),
            () = tokio::time::sleep(SAMPLE_EVERY) => {
                if let Some(now) = resident_kib(pid) {
                    peak = peak.max(now);
                }
            }
        }
    }
}

/// An upgrade request, as any WebSocket client sends it; returns the socket and whatever came
/// after the response head, or the status line of a refusal.
async fn upgrade(target: &Target) -> Result<(TcpStream, Vec<u8>), String> {
    let mut tcp = TcpStream::connect(target.addr)
        .await
        .map_err(|err| err.kind().to_string())?;
    tcp.set_nodelay(true).ok();
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        target.path, target.host
    );
    tcp.write_all(request.as_bytes())
        .await
        .map_err(|err| err.kind().to_string())?;
    let mut head = Vec::new();
    let mut buf = [0; 1024];
    let end = loop {
        let read = tcp
            .read(&mut buf)
            .await
            .map_err(|err| err.kind().to_string())?;
        if read == 0 {
            return Err("closed".to_owned());
        }
        head.extend_from_slice(&buf[..read]);
        if let Some(at) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
    };
    let status =
        String::from_utf8_lossy(&head[..head.iter().position(|&b| b == b'\r').unwrap_or(0)])
            .into_owned();
    if !status.starts_with("HTTP/1.1 101") {
        // "HTTP/1.1 429 Too Many Requests" → "429"
        return Err(status.split(' ').nth(1).unwrap_or("no status").to_owned());
    }
    Ok((tcp, head.split_off(end)))
}

/// Reads server frames until a close frame (its code), the end of the socket (`eof`) or the
/// end of `wait` (`open`).
async fn await_close(mut reader: OwnedReadHalf, mut pending: Vec<u8>, wait: Duration) -> String {
    let read = async {
        let mut buf = vec![0; 4096];
        loop {
            while let Some((opcode, payload, used)) = frame(&pending) {
                if opcode == 8 {
                    return payload.get(..2).map_or("1005".to_owned(), |code| {
                        u16::from_be_bytes([code[0], code[1]]).to_string()
                    });
                }
                pending.drain(..used);
            }
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => return "eof".to_owned(),
                Ok(read) => pending.extend_from_slice(&buf[..read]),
            }
        }
    };
    tokio::time::timeout(wait, read)
        .await
        .unwrap_or_else(|_| "open".to_owned())
}

/// One unmasked server frame at the start of `bytes`: its opcode, payload and length in all.
fn frame(bytes: &[u8]) -> Option<(u8, &[u8], usize)> {
    let opcode = bytes.first()? & 0x0f;
    let short = usize::from(bytes.get(1)? & 0x7f);
    let (len, start) = match short {
        126 => (
            usize::from(u16::from_be_bytes([*bytes.get(2)?, *bytes.get(3)?])),
            4,
        ),
        127 => {
            let raw: [u8; 8] = bytes.get(2..10)?.try_into().ok()?;
            (usize::try_from(u64::from_be_bytes(raw)).ok()?, 10)
        }
        len => (len, 2),
    };
    let payload = bytes.get(start..start + len)?;
    Some((opcode, payload, start + len))
}

/// One stranger of `kind`: opens its connection, says so on `opened` (opened or refused), then
/// holds it until the server ends it or `wait` runs out.
async fn stranger(
    kind: Kind,
    target: &Target,
    large_bytes: usize,
    opened: tokio::sync::mpsc::UnboundedSender<()>,
    wait: Duration,
) -> Fate {
    let connected = match kind {
        Kind::Silent | Kind::Large => upgrade(target).await,
        Kind::SlowHeaders => half_a_request(target).await,
    };
    opened.send(()).ok();
    let (tcp, pending) = match connected {
        Ok(connected) => connected,
        Err(why) => return Fate::Refused(why),
    };
    let started = Instant::now();
    let how = match kind {
        Kind::Silent => {
            // Held, not dropped: dropping the write half would send a FIN, and a stranger says
            // nothing at all.
            let (reader, _writer) = tcp.into_split();
            await_close(reader, pending, wait).await
        }
        Kind::Large => large(tcp, pending, large_bytes, wait).await,
        Kind::SlowHeaders => await_end(tcp, wait).await,
    };
    Fate::Ended(how, started.elapsed())
}

/// Starts a text frame of `bytes` and writes it as fast as the server reads; returns how the
/// server ended it.
async fn large(tcp: TcpStream, pending: Vec<u8>, bytes: usize, wait: Duration) -> String {
    let (reader, mut writer) = tcp.into_split();
    // FIN and text, then a masked 64-bit length with a mask of zeros (the payload as is).
    let mut header = vec![0x81, 0x80 | 127];
    header.extend_from_slice(&(bytes as u64).to_be_bytes());
    header.extend_from_slice(&[0; 4]);
    let write = async move {
        writer.write_all(&header).await?;
        let chunk = vec![b'x'; CHUNK];
        let mut left = bytes;
        while left > 0 {
            let take = left.min(CHUNK);
            writer.write_all(&chunk[..take]).await?;
            left -= take;
        }
        // Hold the socket open: it is the server's to close.
        std::future::pending::<()>().await;
        Ok::<(), std::io::Error>(())
    };
    // A write that fails means the server closed: its close frame is read all the same.
    let writing = tokio::spawn(write);
    let how = await_close(reader, pending, wait).await;
    writing.abort();
    how
}

/// Sends half a request's headers, then nothing.
async fn half_a_request(target: &Target) -> Result<(TcpStream, Vec<u8>), String> {
    let sent = async {
        let mut tcp = TcpStream::connect(target.addr).await?;
        let partial = format!("GET /health HTTP/1.1\r\nHost: {}\r\n", target.host);
        tcp.write_all(partial.as_bytes()).await?;
        Ok::<TcpStream, std::io::Error>(tcp)
    };
    sent.await
        .map(|tcp| (tcp, Vec::new()))
        .map_err(|err| err.kind().to_string())
}

/// Waits for an HTTP connection to end: `eof`, `answered` (a 408, say), or `open` after `wait`.
async fn await_end(mut tcp: TcpStream, wait: Duration) -> String {
    let mut buf = [0; 1024];
    let ended = tokio::time::timeout(wait, async {
        match tcp.read(&mut buf).await {
            Ok(0) | Err(_) => "eof".to_owned(),
            Ok(_) => "answered".to_owned(),
        }
    })
    .await;
    ended.unwrap_or_else(|_| "open".to_owned())
}

/// One real client: connects (with its token when auth is on), sends an image and waits for
/// the message to be replied.
async fn real_client(config: &StrangersConfig, samples: &Samples) -> ClientReport {
    let started = Instant::now();
    let mut report = ClientReport::default();
    let client_id = "real-client-among-strangers";
    let token = match &config.auth {
        Some(minter) => match minter.token(client_id) {
            Ok(token) => Some(token),
            Err(err) => {
                report.failure = Some(err.to_string());
                return report;
            }
        },
        None => None,
    };
    let outcome = tokio::time::timeout(config.wait, async {
        let mut ws = connect::open(&config.url, true, None).await?;
        let hello = native::ClientFrame::Hello(native::Hello {
            client_id: Some(client_id.to_owned()),
            timezone: Some("UTC".to_owned()),
            resume: false,
            after: None,
            token,
        });
        send(&mut ws, &hello).await?;
        let image = samples
            .get(MessageType::Image)
            .ok_or_else(|| "no sample image".to_owned())?;
        loop {
            let text = match ws.next().await {
                Some(Ok(Message::Text(text))) => text,
                Some(Ok(Message::Close(close))) => {
                    return Err(format!(
                        "closed with {}",
                        close.map_or(1005, |close| u16::from(close.code))
                    ));
                }
                Some(Ok(_)) => continue,
                Some(Err(err)) => return Err(err.to_string()),
                None => return Err("the connection ended".to_owned()),
            };
            match serde_json::from_str::<native::ServerFrame>(&text) {
                Ok(native::ServerFrame::Welcome(_)) => {
                    report.welcome_ms = Some(millis(started));
                    let send_frame = native::ClientFrame::Send(native::Send {
                        id: Some("among-strangers".to_owned()),
                        message_type: Some("image".to_owned()),
                        content: Some(image.base64.to_string()),
                        filename: Some(image.filename.to_owned()),
                        timestamp: None,
                        binary: false,
                    });
                    send(&mut ws, &send_frame).await?;
                }
                Ok(native::ServerFrame::Status(status))
                    if status.status == MessageStatus::Replied =>
                {
                    report.replied_ms = Some(millis(started));
                    ws.close(None).await.ok();
                    return Ok(());
                }
                Ok(native::ServerFrame::Error(error)) => {
                    return Err(format!("error {}", error.code.as_str()));
                }
                _ => {}
            }
        }
    })
    .await;
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(failure)) => report.failure = Some(failure),
        Err(_) => report.failure = Some(format!("no reply within {:?}", config.wait)),
    }
    report
}

async fn send(ws: &mut connect::Ws, frame: &native::ClientFrame) -> Result<(), String> {
    let text = serde_json::to_string(frame).map_err(|err| err.to_string())?;
    ws.send(Message::text(text))
        .await
        .map_err(|err| err.to_string())
}

fn millis(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_frames_are_read_with_every_length_encoding() {
        let close = [0x88, 0x02, 0x03, 0xe9];
        assert_eq!(frame(&close), Some((8, &close[2..], 4)));
        let mut medium = vec![0x81, 126, 0x01, 0x00];
        medium.extend(std::iter::repeat_n(b'a', 256));
        assert_eq!(
            frame(&medium).map(|(op, p, n)| (op, p.len(), n)),
            Some((1, 256, 260))
        );
        assert_eq!(frame(&medium[..100]), None, "a frame not yet whole");
    }
}
