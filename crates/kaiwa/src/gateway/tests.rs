//! The session's timers on tokio's paused clock: the heartbeat, the first-message timeout and the
//! handshake timeout, each checked to the second without a real sleep. The session reads from a
//! channel here instead of a socket, so that no real I/O keeps the clock from jumping.

use super::handshake::{self, HandshakeError, Hello, Resume};
use super::outbox::{Outbox, Outgoing};
use super::registry::Liveness;
use super::session::{Ending, Session};
use super::wire::Protocol;
use crate::domain::{ClientId, Timezone};
use axum::extract::ws::Message;
use futures::channel::mpsc as futures_mpsc;
use kaiwa_protocol::CloseCode;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

type Frames = futures_mpsc::UnboundedReceiver<Result<Message, axum::Error>>;

struct Fixture(crate::testing::Fixture);

impl Fixture {
    fn new(flags: &[&str]) -> Self {
        Self(crate::testing::Fixture::new(flags))
    }

    /// A session of a client that just said hello, reading what the test sends.
    fn session(&self, protocol: Protocol) -> (Session, mpsc::Receiver<Outgoing>) {
        let gateway = &self.0.gateway;
        let (outbox, sent) = Outbox::new(gateway.settings.outbox);
        let liveness = Arc::new(Liveness::default());
        liveness.heard();
        let hello = Hello {
            protocol,
            client_id: ClientId::parse("timer").expect("an id"),
            timezone: Timezone::parse("UTC").expect("a zone"),
            resume: Resume::Fresh,
        };
        let session = Session::new(
            gateway.clone(),
            hello,
            outbox,
            liveness,
            CancellationToken::new(),
            None,
            0,
        );
        (session, sent)
    }
}

/// A client that answers every heartbeat, by a pong every `every`, until its task is stopped;
/// the connection stays open while the returned sender lives.
type Connection = futures_mpsc::UnboundedSender<Result<Message, axum::Error>>;

fn answering(every: Duration) -> (Frames, tokio::task::JoinHandle<()>, Connection) {
    let (frames, read) = futures_mpsc::unbounded();
    let open = frames.clone();
    let pongs = tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            if frames
                .unbounded_send(Ok(Message::Pong(bytes::Bytes::new())))
                .is_err()
            {
                return;
            }
        }
    });
    (read, pongs, open)
}

#[tokio::test(start_paused = true)]
async fn a_silent_client_is_closed_after_the_heartbeat_timeout_and_before_one_more_interval() {
    let fixture = Fixture::new(&[
        "--heartbeat-interval",
        "20",
        "--heartbeat-timeout",
        "60",
        "--first-message-timeout",
        "3600",
    ]);
    let (mut session, _sent) = fixture.session(Protocol::Native);
    let (_client, mut frames) = futures_mpsc::unbounded::<Result<Message, axum::Error>>();
    let started = Instant::now();
    let ending = session.run(&mut frames).await;
    let after = started.elapsed();
    assert_eq!(ending, Ending::Closed(CloseCode::HeartbeatTimeout));
    // Checked at each tick: the first tick past 60 s, the ticks being up to 25 % early.
    assert!(
        after > Duration::from_secs(60) && after <= Duration::from_secs(80),
        "{after:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_client_that_answers_heartbeats_stays_for_as_long_as_it_answers() {
    let fixture = Fixture::new(&[
        "--heartbeat-interval",
        "20",
        "--heartbeat-timeout",
        "60",
        "--first-message-timeout",
        "36000",
    ]);
    let (mut session, mut sent) = fixture.session(Protocol::Legacy);
    let (mut frames, pongs, _open) = answering(Duration::from_secs(20));
    // Half an hour: what the session queues meanwhile fits its outbox, which nobody reads here.
    let half_an_hour = Duration::from_secs(1800);
    assert!(
        tokio::time::timeout(half_an_hour, session.run(&mut frames))
            .await
            .is_err(),
        "still connected after half an hour"
    );
    // A legacy client gets a WebSocket ping and a heartbeat frame at every tick.
    let mut pings = 0;
    let mut heartbeats = 0;
    while let Ok(outgoing) = sent.try_recv() {
        match outgoing.message() {
            Message::Ping(_) => pings += 1,
            Message::Text(text) if text.contains("heartbeat") => heartbeats += 1,
            _ => {}
        }
    }
    assert!((90..=91).contains(&pings), "{pings} pings in half an hour");
    assert_eq!(heartbeats, pings);

    // Once it stops answering, it is let go.
    pongs.abort();
    let started = Instant::now();
    let ending = session.run(&mut frames).await;
    assert_eq!(ending, Ending::Closed(CloseCode::HeartbeatTimeout));
    assert!(started.elapsed() <= Duration::from_secs(80));
}

#[tokio::test(start_paused = true)]
async fn a_client_that_sends_no_message_is_let_go_at_the_first_message_timeout() {
    let fixture = Fixture::new(&["--first-message-timeout", "30"]);
    let (mut session, _sent) = fixture.session(Protocol::Native);
    let (mut frames, _pongs, _open) = answering(Duration::from_secs(5));
    let started = Instant::now();
    let ending = session.run(&mut frames).await;
    assert_eq!(ending, Ending::Closed(CloseCode::FirstMessageTimeout));
    assert_eq!(started.elapsed(), Duration::from_secs(30));
}

#[tokio::test(start_paused = true)]
async fn a_client_that_sends_a_message_in_time_is_not_held_to_the_first_message_timeout() {
    let fixture = Fixture::new(&["--first-message-timeout", "30"]);
    let (mut session, mut sent) = fixture.session(Protocol::Native);
    let (client, mut frames) = futures_mpsc::unbounded();
    let talker = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(29)).await;
        let hello = r#"{"type":"send","id":"m1","message_type":"text","content":"just in time"}"#;
        client
            .unbounded_send(Ok(Message::Text(hello.into())))
            .expect("the session reads");
        // Then only pongs, for ten minutes.
        for _ in 0..60 {
            tokio::time::sleep(Duration::from_secs(10)).await;
            client
                .unbounded_send(Ok(Message::Pong(bytes::Bytes::new())))
                .expect("the session reads");
        }
        client
    });
    let ten_minutes = Duration::from_secs(600);
    assert!(
        tokio::time::timeout(ten_minutes, session.run(&mut frames))
            .await
            .is_err(),
        "still connected"
    );
    let acked = std::iter::from_fn(|| sent.try_recv().ok())
        .any(|outgoing| matches!(outgoing.message(), Message::Text(text) if text.contains(r#""type":"ack""#)));
    assert!(acked, "the message was taken");
    drop(talker.await);
}

#[tokio::test(start_paused = true)]
async fn a_connection_that_never_says_hello_times_out_at_the_handshake_timeout() {
    let (_client, mut frames) = futures_mpsc::unbounded::<Result<Message, axum::Error>>();
    let started = Instant::now();
    let result = handshake::receive(&mut frames, true, Duration::from_secs(10)).await;
    assert!(matches!(result, Err(HandshakeError::Timeout)), "{result:?}");
    assert_eq!(started.elapsed(), Duration::from_secs(10));
}
