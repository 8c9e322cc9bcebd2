//! The session's timers on tokio's paused clock: the heartbeat, the first-message timeout, the
//! handshake timeout and the token's expiry, each checked to the second without a real sleep. The
//! session reads from a channel here instead of a socket, so that no real I/O keeps the clock from
//! jumping.

use super::handshake::{self, HandshakeError, Hello, Resume};
use super::outbox::Outbox;
use super::registry::Liveness;
use super::session::{Ending, Session};
use super::wire::Protocol;
use crate::domain::{ClientId, Timezone};
use axum::extract::ws::Message;
use futures::channel::mpsc as futures_mpsc;
use kaiwa_protocol::CloseCode;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

type Frames = futures_mpsc::UnboundedReceiver<Result<Message, axum::Error>>;

struct Fixture(crate::testing::Fixture);

impl Fixture {
    fn new(flags: &[&str]) -> Self {
        Self(crate::testing::Fixture::new(flags))
    }

    /// A session of a client that just said hello, reading what the test sends.
    fn session(&self, protocol: Protocol) -> (Session, super::outbox::Frames) {
        self.session_with(protocol, None)
    }

    /// A token for the fixture's client, good for `ttl` from now.
    fn token(&self, client: &str, ttl: Duration) -> String {
        let auth = self.0.gateway.settings.auth.as_ref().expect("auth on");
        let client = ClientId::parse(client).expect("an id");
        auth.issue(&client, ttl, chrono::Utc::now())
            .expect("signed")
    }

    /// A session of a client that said hello with a token good for `ttl`.
    fn session_with_token(
        &self,
        protocol: Protocol,
        ttl: Duration,
    ) -> (Session, super::outbox::Frames) {
        let auth = self.0.gateway.settings.auth.as_ref().expect("auth on");
        let token = crate::auth::Token::new(self.token("timer", ttl));
        let claims = auth.verify(&token, chrono::Utc::now()).expect("valid");
        self.session_with(protocol, Some(claims))
    }

    fn session_with(
        &self,
        protocol: Protocol,
        token: Option<crate::auth::Claims>,
    ) -> (Session, super::outbox::Frames) {
        let gateway = &self.0.gateway;
        let (outbox, sent) = Outbox::new(gateway.settings.outbox);
        let liveness = Arc::new(Liveness::default());
        liveness.heard();
        let hello = Hello {
            protocol,
            client_id: ClientId::parse("timer").expect("an id"),
            timezone: Timezone::parse("UTC").expect("a zone"),
            resume: Resume::Fresh,
            token,
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
    while let Some(outgoing) = sent.try_recv() {
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
async fn a_path_client_is_pinged_in_its_own_words_and_let_go_once_it_stops_answering() {
    let fixture = Fixture::new(&[
        "--heartbeat-interval",
        "20",
        "--heartbeat-timeout",
        "60",
        "--first-message-timeout",
        "36000",
    ]);
    let (mut session, mut sent) = fixture.session(Protocol::Path);
    let (client, mut frames) = futures_mpsc::unbounded();
    // As that system's clients do: a PONG for every PING (here, every 20 s), and a ping of
    // its own; then silence, with the connection left open.
    let answering = tokio::spawn(async move {
        let ping = r#"{"check_connection": "PING"}"#;
        client
            .unbounded_send(Ok(Message::Text(ping.into())))
            .expect("the session reads");
        for _ in 0..30 {
            tokio::time::sleep(Duration::from_secs(20)).await;
            let pong = r#"{"check_connection": "PONG"}"#;
            client
                .unbounded_send(Ok(Message::Text(pong.into())))
                .expect("the session reads");
        }
        client
    });
    let ten_minutes = Duration::from_secs(600);
    assert!(
        tokio::time::timeout(ten_minutes, session.run(&mut frames))
            .await
            .is_err(),
        "still connected while it answers"
    );
    let mut frames_sent = Vec::new();
    let mut websocket_pings = 0;
    while let Some(outgoing) = sent.try_recv() {
        match outgoing.message() {
            Message::Ping(_) => websocket_pings += 1,
            Message::Text(text) => frames_sent.push(
                serde_json::from_str::<serde_json::Value>(text.as_str()).expect("JSON frames"),
            ),
            _ => {}
        }
    }
    // Its PINGs only: a WebSocket pong, which any client's library sends by itself, would
    // keep a client that no longer answers PING.
    assert_eq!(websocket_pings, 0);
    let pings = frames_sent
        .iter()
        .filter(|frame| **frame == serde_json::json!({"check_connection": "PING"}))
        .count();
    assert!((29..=31).contains(&pings), "{pings} pings in ten minutes");
    let pongs = frames_sent
        .iter()
        .filter(|frame| **frame == serde_json::json!({"check_connection": "PONG"}))
        .count();
    assert_eq!(pongs, 1, "its own ping is answered: {frames_sent:?}");

    let _open = answering.await.expect("the client ran");
    let started = Instant::now();
    let ending = session.run(&mut frames).await;
    assert_eq!(ending, Ending::Closed(CloseCode::HeartbeatTimeout));
    assert!(
        started.elapsed() <= Duration::from_secs(80),
        "{:?}",
        started.elapsed()
    );
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
    let acked = std::iter::from_fn(|| sent.try_recv())
        .any(|outgoing| matches!(outgoing.message(), Message::Text(text) if text.contains(r#""type":"ack""#)));
    assert!(acked, "the message was taken");
    drop(talker.await);
}

#[tokio::test(start_paused = true)]
async fn a_connection_that_never_says_hello_times_out_at_the_handshake_timeout() {
    let (_client, mut frames) = futures_mpsc::unbounded::<Result<Message, axum::Error>>();
    let started = Instant::now();
    let credentials = handshake::Credentials::anonymous();
    let result = handshake::receive(&mut frames, true, Duration::from_secs(10), &credentials).await;
    assert!(matches!(result, Err(HandshakeError::Timeout)), "{result:?}");
    assert_eq!(started.elapsed(), Duration::from_secs(10));
}

/// Auth on, no leeway, a 30 s grace, and the other timers out of the way.
const AUTH: &[&str] = &[
    "--auth-secret",
    "a-secret-of-at-least-thirty-two-bytes!!",
    "--auth-leeway",
    "0",
    "--auth-refresh-grace",
    "30",
    "--first-message-timeout",
    "36000",
];

/// The text frames the session queued so far.
fn texts(sent: &mut super::outbox::Frames) -> Vec<serde_json::Value> {
    std::iter::from_fn(|| sent.try_recv())
        .filter_map(|outgoing| match outgoing.message() {
            Message::Text(text) => serde_json::from_str(text.as_str()).ok(),
            _ => None,
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_session_whose_token_runs_out_is_warned_then_closed_when_the_grace_period_ends() {
    let fixture = Fixture::new(AUTH);
    let (mut session, mut sent) =
        fixture.session_with_token(Protocol::Native, Duration::from_secs(60));
    let (mut frames, _pongs, _open) = answering(Duration::from_secs(10));
    let started = Instant::now();
    // The token's exp is in whole seconds: it runs out up to a second before 60 s.
    assert!(
        tokio::time::timeout(Duration::from_secs(58), session.run(&mut frames))
            .await
            .is_err()
    );
    assert!(
        !texts(&mut sent)
            .iter()
            .any(|frame| frame["type"] == "token_expired"),
        "no warning before the token runs out"
    );
    assert!(
        tokio::time::timeout(Duration::from_secs(3), session.run(&mut frames))
            .await
            .is_err(),
        "still connected right after the token ran out"
    );
    let warnings: Vec<_> = texts(&mut sent)
        .into_iter()
        .filter(|frame| frame["type"] == "token_expired")
        .collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(warnings[0]["closes_in_ms"], 30_000);
    let ending = session.run(&mut frames).await;
    assert_eq!(ending, Ending::Closed(CloseCode::ExpiredToken));
    let after = started.elapsed();
    assert!(
        after >= Duration::from_secs(89) && after <= Duration::from_secs(90),
        "{after:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_refresh_within_the_grace_period_keeps_the_session_until_the_new_token_runs_out() {
    let fixture = Fixture::new(AUTH);
    let (mut session, mut sent) =
        fixture.session_with_token(Protocol::Legacy, Duration::from_secs(60));
    let (frames_tx, mut frames) = futures_mpsc::unbounded();
    let fresh = fixture.token("timer", Duration::from_secs(600));
    let client = tokio::spawn(async move {
        // Pongs keep the heartbeat happy; the refresh comes 10 s into the grace period.
        for second in 1..=1000u64 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let frame = if second == 70 {
                Message::Text(format!(r#"{{"type":"refresh","token":"{fresh}"}}"#).into())
            } else if second % 10 == 0 {
                Message::Pong(bytes::Bytes::new())
            } else {
                continue;
            };
            if frames_tx.unbounded_send(Ok(frame)).is_err() {
                return;
            }
        }
    });
    let started = Instant::now();
    let ending = session.run(&mut frames).await;
    let after = started.elapsed();
    assert_eq!(ending, Ending::Closed(CloseCode::ExpiredToken));
    // The new token, refreshed at 70 s, runs 600 s; then comes the 30 s grace.
    assert!(
        after >= Duration::from_secs(699) && after <= Duration::from_secs(700),
        "{after:?}"
    );
    let frames = texts(&mut sent);
    let notices: Vec<_> = frames
        .iter()
        .filter(|frame| frame["type"] == "system")
        .collect();
    assert_eq!(
        notices.len(),
        3,
        "a warning, the refresh's answer, the new token's warning: {frames:?}"
    );
    assert_eq!(notices[0]["data"]["code"], "expired_token");
    assert!(
        notices[1]["data"]["message"]
            .as_str()
            .is_some_and(|message| message.starts_with("Token refreshed")),
        "{frames:?}"
    );
    client.abort();
}

#[tokio::test(start_paused = true)]
async fn a_refresh_with_another_clients_token_is_refused_and_the_old_deadline_stands() {
    let fixture = Fixture::new(AUTH);
    let (mut session, mut sent) =
        fixture.session_with_token(Protocol::Native, Duration::from_secs(60));
    let (frames_tx, mut frames) = futures_mpsc::unbounded();
    let someone_else = fixture.token("someone-else", Duration::from_secs(3600));
    let _client = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(10)).await;
        let refresh = format!(r#"{{"type":"refresh","token":"{someone_else}"}}"#);
        frames_tx
            .unbounded_send(Ok(Message::Text(refresh.into())))
            .ok();
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_secs(10)).await;
            frames_tx
                .unbounded_send(Ok(Message::Pong(bytes::Bytes::new())))
                .ok();
        }
    });
    let started = Instant::now();
    let ending = session.run(&mut frames).await;
    assert_eq!(ending, Ending::Closed(CloseCode::ExpiredToken));
    assert!(started.elapsed() <= Duration::from_secs(90));
    let errors: Vec<_> = texts(&mut sent)
        .into_iter()
        .filter(|frame| frame["type"] == "error")
        .collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0]["code"], "client_id_mismatch");
}

#[tokio::test(start_paused = true)]
async fn a_refresh_ahead_of_expiry_moves_the_deadline_without_a_warning() {
    let fixture = Fixture::new(AUTH);
    let (mut session, mut sent) =
        fixture.session_with_token(Protocol::Native, Duration::from_secs(60));
    let (frames_tx, mut frames) = futures_mpsc::unbounded();
    let fresh = fixture.token("timer", Duration::from_secs(600));
    let _client = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(30)).await;
        let refresh = format!(r#"{{"type":"refresh","token":"{fresh}"}}"#);
        frames_tx
            .unbounded_send(Ok(Message::Text(refresh.into())))
            .ok();
        loop {
            tokio::time::sleep(Duration::from_secs(10)).await;
            if frames_tx
                .unbounded_send(Ok(Message::Pong(bytes::Bytes::new())))
                .is_err()
            {
                return;
            }
        }
    });
    let started = Instant::now();
    let ending = session.run(&mut frames).await;
    assert_eq!(ending, Ending::Closed(CloseCode::ExpiredToken));
    // Refreshed at 30 s for 600 s, then the 30 s grace.
    let after = started.elapsed();
    assert!(
        after >= Duration::from_secs(658) && after <= Duration::from_secs(660),
        "{after:?}"
    );
    let frames = texts(&mut sent);
    let kinds: Vec<_> = frames
        .iter()
        .filter_map(|frame| frame["type"].as_str())
        .collect();
    assert_eq!(kinds, ["refreshed", "token_expired"], "{frames:?}");
}
