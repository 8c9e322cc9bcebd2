//! The delaying TCP proxy (`kaiwa-load delay-proxy`): every byte that crosses it, either way,
//! is written a fixed one-way delay after it was read, as between two machines of a data
//! centre; for a host without `tc netem`, where every part of a cluster shares loopback.
//!
//! Threads, not tokio: tokio's timer has a resolution of one millisecond (its `sleep_until`
//! of 250 µs took 1.0 to 2.0 ms here), too coarse for the quarter of a millisecond a data
//! centre's round trip is made of. A thread blocked in `std::thread::sleep` wakes within the
//! kernel's timer slack (50 µs by default; see [`tighten_timer_slack`]). Each direction of a
//! connection is two threads: a reader that stamps each chunk with the time it is due and a
//! writer that sleeps until then. So the delay is a latency and never accumulates: chunks read
//! at `t` are written at `t + delay` in order, however many are in flight, and throughput is
//! not capped by it. The channel between them is bounded, so a slow receiver holds the reader
//! and TCP's own flow control pushes back on the sender.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread;
use std::time::{Duration, Instant};

/// The most bytes one read takes: one chunk.
const READ_BUFFER: usize = 64 * 1024;
/// Chunks a direction holds before its reader waits: with [`READ_BUFFER`], at most 4 MiB per
/// direction however slow the receiver.
const CHUNKS_PER_DIRECTION: usize = 64;
/// The proxy's threads hold one buffer and a few frames; the default 2 MiB stack is mostly
/// never touched, but a smaller one keeps a few hundred threads cheap to map.
const STACK: usize = 256 * 1024;
/// The timer slack [`tighten_timer_slack`] asks for: a sleep of 250 µs took 256 µs at the
/// median with it, 305 µs with the default of 50 µs.
const TIMER_SLACK_NS: u32 = 1_000;
/// How long the accept loop waits after a failed accept (out of file descriptors, say) before
/// trying again, so that it does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum DelayError {
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: String, source: io::Error },
    #[error("{target} names no address to connect to: {source}")]
    Target { target: String, source: io::Error },
    #[error("{target} names no address to connect to")]
    NoTarget { target: String },
    #[error("cannot connect to {target}: {source}")]
    Connect { target: String, source: io::Error },
    #[error("cannot set up a connection: {0}")]
    Socket(io::Error),
    #[error("cannot start a thread: {0}")]
    Spawn(io::Error),
    #[error("cannot set this process's timer slack: {0}")]
    TimerSlack(io::Error),
}

/// A listening socket whose connections are forwarded to `target`, delayed.
#[derive(Debug)]
pub struct DelayProxy {
    listener: TcpListener,
    /// What `--to` named, for messages.
    target_name: String,
    /// Resolved once at the start: a name that stops resolving mid-run should not cut the
    /// connections of a benchmark.
    target: Vec<SocketAddr>,
    delay: Duration,
}

impl DelayProxy {
    /// Listens on `listen` (port 0 for any free one); each connection accepted will be
    /// forwarded to `target`, `delay` later each way.
    pub fn bind(listen: &str, target: &str, delay: Duration) -> Result<Self, DelayError> {
        let resolved: Vec<SocketAddr> = target
            .to_socket_addrs()
            .map_err(|source| DelayError::Target {
                target: target.to_owned(),
                source,
            })?
            .collect();
        if resolved.is_empty() {
            return Err(DelayError::NoTarget {
                target: target.to_owned(),
            });
        }
        let listener = TcpListener::bind(listen).map_err(|source| DelayError::Listen {
            addr: listen.to_owned(),
            source,
        })?;
        Ok(Self {
            listener,
            target_name: target.to_owned(),
            target: resolved,
            delay,
        })
    }

    /// Where the proxy listens (the port, when it was bound to port 0).
    pub fn local_addr(&self) -> Result<SocketAddr, DelayError> {
        self.listener.local_addr().map_err(DelayError::Socket)
    }

    /// Accepts connections for as long as the process lives. A connection that cannot be
    /// forwarded (the target refuses it, no thread can be started) is closed and said on
    /// stderr; the proxy goes on with the next.
    pub fn run(self) {
        loop {
            match self.listener.accept() {
                Ok((client, peer)) => {
                    if let Err(err) = self.forward(client) {
                        eprintln!("delay-proxy: connection from {peer} closed: {err}");
                    }
                }
                Err(err) => {
                    eprintln!("delay-proxy: accept failed: {err}");
                    thread::sleep(ACCEPT_BACKOFF);
                }
            }
        }
    }

    /// Connects to the target and starts both directions. Connecting happens on the accept
    /// loop: on loopback it takes microseconds, and a refused target is the usual failure.
    fn forward(&self, client: TcpStream) -> Result<(), DelayError> {
        let upstream =
            TcpStream::connect(&self.target[..]).map_err(|source| DelayError::Connect {
                target: self.target_name.clone(),
                source,
            })?;
        // Nagle's algorithm would hold small writes for the peer's ack: a delay of its own,
        // on top of the one simulated.
        for stream in [&client, &upstream] {
            stream.set_nodelay(true).map_err(DelayError::Socket)?;
        }
        let link = Arc::new(Link { client, upstream });
        let started = start_direction(&link, Way::Up, self.delay)
            .and_then(|()| start_direction(&link, Way::Down, self.delay));
        if started.is_err() {
            // The direction already started ends when its sockets do.
            link.cut();
        }
        started
    }
}

/// Both sockets of one proxied connection, shared by its four threads: the sockets close when
/// the last of them ends.
#[derive(Debug)]
struct Link {
    client: TcpStream,
    upstream: TcpStream,
}

/// Which way bytes go over a [`Link`].
#[derive(Debug, Clone, Copy)]
enum Way {
    /// From the client to the target.
    Up,
    /// From the target back to the client.
    Down,
}

impl Link {
    /// The socket read and the socket written, going `way`.
    fn ends(&self, way: Way) -> (&TcpStream, &TcpStream) {
        match way {
            Way::Up => (&self.client, &self.upstream),
            Way::Down => (&self.upstream, &self.client),
        }
    }

    /// Ends the connection both ways: a failed read or write on one side means the peers can
    /// no longer talk. Every thread blocked on either socket wakes (a read returns 0, a write
    /// fails) and ends.
    fn cut(&self) {
        // Errors here only say the socket is already shut.
        self.client.shutdown(Shutdown::Both).ok();
        self.upstream.shutdown(Shutdown::Both).ok();
    }
}

/// Bytes read at one time, and when they are to be written.
#[derive(Debug)]
struct Chunk {
    due: Instant,
    bytes: Vec<u8>,
}

/// Starts the reader and the writer of one direction.
fn start_direction(link: &Arc<Link>, way: Way, delay: Duration) -> Result<(), DelayError> {
    let (chunks, due) = sync_channel(CHUNKS_PER_DIRECTION);
    let writer_link = Arc::clone(link);
    thread::Builder::new()
        .name("delay-write".into())
        .stack_size(STACK)
        .spawn(move || write_due(&due, &writer_link, way))
        .map_err(DelayError::Spawn)?;
    // If the reader cannot start, the writer ends with the channel, and the caller cuts the
    // link.
    let reader_link = Arc::clone(link);
    thread::Builder::new()
        .name("delay-read".into())
        .stack_size(STACK)
        .spawn(move || read_chunks(&chunks, &reader_link, way, delay))
        .map_err(DelayError::Spawn)?;
    Ok(())
}

/// Reads until the end of the stream, stamping each chunk with the time it is due. At the end
/// the channel closes, and the writer passes the end on once it has written the rest.
fn read_chunks(chunks: &SyncSender<Chunk>, link: &Link, way: Way, delay: Duration) {
    let (mut from, _) = link.ends(way);
    let mut buffer = vec![0; READ_BUFFER];
    loop {
        match from.read(&mut buffer) {
            Ok(0) => return,
            Ok(n) => {
                let chunk = Chunk {
                    due: Instant::now() + delay,
                    bytes: buffer[..n].to_vec(),
                };
                if chunks.send(chunk).is_err() {
                    // The writer ended: it cut the link.
                    return;
                }
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => {
                link.cut();
                return;
            }
        }
    }
}

/// Writes each chunk once it is due, in the order read; then passes the end of the stream on
/// (a half close, as TCP allows: the other direction may still be talking).
fn write_due(due: &Receiver<Chunk>, link: &Link, way: Way) {
    let (_, mut to) = link.ends(way);
    for chunk in due {
        let now = Instant::now();
        if chunk.due > now {
            thread::sleep(chunk.due - now);
        }
        if to.write_all(&chunk.bytes).is_err() {
            link.cut();
            return;
        }
    }
    // An error says the socket is already shut, which is what is wanted.
    to.shutdown(Shutdown::Write).ok();
}

/// Lowers the timer slack of the calling thread's process to 1 µs, so that the proxy's sleeps
/// end when asked and not up to 50 µs later. Linux keeps the slack per thread and a thread
/// starts with its creator's; `/proc/self/timerslack_ns` sets the main thread's. So call it
/// from `main` before any thread starts: the proxy's threads then inherit it. Not on Linux,
/// or without `/proc`, it fails and the delays are merely less exact.
pub fn tighten_timer_slack() -> Result<(), DelayError> {
    std::fs::write("/proc/self/timerslack_ns", TIMER_SLACK_NS.to_string())
        .map_err(DelayError::TimerSlack)
}
