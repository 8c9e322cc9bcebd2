//! `kaiwa-load delay-proxy` in front of an echo server on loopback: bytes arrive intact and in
//! order both ways, the end of a stream is passed on, a round trip takes at least twice the
//! delay, and a target that refuses the connection closes the client's.

use kaiwa_load::delay::DelayProxy;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

/// Only so that a broken proxy fails the test instead of hanging it; no assertion uses it.
const STUCK: Duration = Duration::from_secs(30);

/// An echo server on a free loopback port: each connection gets back what it sends, and its
/// end when it ends.
fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the echo server");
    let addr = listener.local_addr().expect("the echo server's address");
    thread::spawn(move || {
        for stream in listener.incoming() {
            let stream = stream.expect("accept at the echo server");
            thread::spawn(move || {
                let (mut reader, mut writer) = (&stream, &stream);
                io::copy(&mut reader, &mut writer).expect("echo");
                stream.shutdown(Shutdown::Write).expect("end the echo");
            });
        }
    });
    addr
}

/// A proxy to `target` on a free loopback port, running until the test ends.
fn proxy(target: SocketAddr, delay: Duration) -> SocketAddr {
    let proxy =
        DelayProxy::bind("127.0.0.1:0", &target.to_string(), delay).expect("bind the proxy");
    let addr = proxy.local_addr().expect("the proxy's address");
    thread::spawn(move || proxy.run());
    addr
}

fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).expect("connect to the proxy");
    stream.set_read_timeout(Some(STUCK)).expect("read timeout");
    stream
        .set_write_timeout(Some(STUCK))
        .expect("write timeout");
    stream.set_nodelay(true).expect("nodelay");
    stream
}

#[test]
fn bytes_come_back_intact_in_order_and_then_the_end() {
    let addr = proxy(echo_server(), Duration::from_millis(2));
    let stream = connect(addr);
    // 4 MiB, more than the proxy holds per direction, written in uneven pieces while the
    // echo comes back: the proxy's backpressure must not deadlock, nor reorder anything.
    let sent: Vec<u8> = (0..4 << 20).map(|i: u32| (i % 251) as u8).collect();
    let writer = {
        let mut stream = stream.try_clone().expect("clone");
        let sent = sent.clone();
        thread::spawn(move || {
            for piece in sent.chunks(7_919) {
                stream.write_all(piece).expect("write to the proxy");
            }
            stream.shutdown(Shutdown::Write).expect("end the stream");
        })
    };
    let mut received = Vec::new();
    (&stream)
        .read_to_end(&mut received)
        .expect("read the echo to its end");
    writer.join().expect("the writer");
    assert_eq!(received.len(), sent.len());
    assert!(received == sent, "the bytes came back changed or reordered");
}

#[test]
fn a_round_trip_takes_at_least_twice_the_delay() {
    let delay = Duration::from_millis(5);
    let addr = proxy(echo_server(), delay);
    let mut stream = connect(addr);
    for round in 0..20u8 {
        let ping = [round; 32];
        let started = Instant::now();
        stream.write_all(&ping).expect("ping");
        let mut pong = [0; 32];
        stream.read_exact(&mut pong).expect("pong");
        let took = started.elapsed();
        assert_eq!(pong, ping);
        assert!(
            took >= 2 * delay,
            "round trip {round} took {took:?}, less than twice the delay of {delay:?}"
        );
    }
}

#[test]
fn a_target_that_refuses_closes_the_client() {
    let refusing = {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("address")
    };
    let addr = proxy(refusing, Duration::from_millis(1));
    let mut stream = connect(addr);
    let mut byte = [0; 1];
    match stream.read(&mut byte) {
        Ok(0) => {}
        Ok(_) => panic!("a proxy whose target refused it sent bytes"),
        Err(err) => assert_ne!(err.kind(), io::ErrorKind::WouldBlock, "still open: {err}"),
    }
}
