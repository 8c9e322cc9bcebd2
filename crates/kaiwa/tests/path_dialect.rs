//! The path dialect against a real server: clients written the way the second Python system's
//! clients behave (the id in the URL, no handshake frame, `type`/`content` messages, one of
//! them encoded twice, one answer read per message, every PING answered with PONG), many at
//! once, a duplicate, bad ids (an empty one too) and timezones, auth, the routes it must not
//! shadow, and the history those clients leave.

mod support;

use futures::{SinkExt, StreamExt};
use kaiwa::clock::Clock as _;
use serde_json::{Value, json};
use std::time::Duration;
use support::tokens::{SECRET, token};
use support::{Closed, FRAME_TIMEOUT, TestApp, b64, decode, eventually, files, local};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

/// A client of that system: it reads frames one at a time, answers the server's PING with
/// PONG, and counts the PINGs it answered.
struct PathClient {
    ws: support::Socket,
    pings: usize,
}

impl PathClient {
    /// Connects to `path` (`/alice`, `/ws/alice?timezone=...`) and returns the first frame.
    async fn connect(app: &TestApp, path: &str) -> (PathClient, Result<Value, Closed>) {
        Self::connect_with(app, path, &[]).await
    }

    async fn connect_with(
        app: &TestApp,
        path: &str,
        headers: &[(&'static str, &str)],
    ) -> (PathClient, Result<Value, Closed>) {
        let mut request = format!("ws://{}{path}", app.addr)
            .into_client_request()
            .expect("a request");
        for (name, value) in headers {
            request
                .headers_mut()
                .insert(*name, HeaderValue::from_str(value).expect("a header"));
        }
        let (ws, _) = tokio_tungstenite::connect_async(request)
            .await
            .expect("the upgrade succeeds");
        let mut client = PathClient { ws, pings: 0 };
        let first = client.next().await;
        (client, first)
    }

    /// Connects, and checks the server's greeting.
    async fn connected(app: &TestApp, path: &str) -> PathClient {
        let (client, first) = Self::connect(app, path).await;
        assert_eq!(first, Ok(json!({"message": "Connected"})), "{path}");
        client
    }

    async fn send(&mut self, frame: Value) {
        self.send_text(&frame.to_string()).await;
    }

    async fn send_text(&mut self, text: &str) {
        self.ws
            .send(Message::text(text))
            .await
            .expect("the frame is sent");
    }

    /// The next frame that is not the server's PING (which is answered), or how the
    /// connection ended.
    async fn next(&mut self) -> Result<Value, Closed> {
        loop {
            match self.next_frame().await {
                Ok(value) if value == json!({"check_connection": "PING"}) => {
                    self.pings += 1;
                    self.send(json!({"check_connection": "PONG"})).await;
                }
                result => return result,
            }
        }
    }

    /// Reads until `count` more PINGs came, answering each and sending nothing else; any
    /// other frame, or the close, fails the test.
    async fn answer_pings(&mut self, count: usize) {
        for _ in 0..count {
            let frame = self.next_frame().await;
            assert_eq!(frame, Ok(json!({"check_connection": "PING"})));
            self.pings += 1;
            self.send(json!({"check_connection": "PONG"})).await;
        }
    }

    async fn next_frame(&mut self) -> Result<Value, Closed> {
        loop {
            let frame = tokio::time::timeout(FRAME_TIMEOUT, self.ws.next())
                .await
                .expect("a frame arrives in time");
            if let Some(result) = decode(frame) {
                return result;
            }
        }
    }

    /// Sends one message and reads the one frame that answers it.
    async fn ask(&mut self, frame: Value) -> Value {
        self.send(frame).await;
        self.next().await.expect("an answer")
    }

    async fn closed(&mut self) -> Closed {
        loop {
            if let Err(closed) = self.next().await {
                return closed;
            }
        }
    }

    async fn close(mut self) {
        self.ws.close(None).await.ok();
        while let Some(Ok(_)) = self.ws.next().await {}
    }
}

fn message(kind: &str, content: &str) -> Value {
    json!({"type": kind, "content": content})
}

/// The frame encoded twice, as one of that system's clients sends it.
fn twice(frame: &Value) -> Value {
    Value::String(frame.to_string())
}

/// Every answer has the shape those clients read: a string `type` and a string `content`.
fn assert_shape(answer: &Value, kind: &str) {
    assert_eq!(answer["type"], kind, "{answer}");
    assert!(answer["content"].is_string(), "{answer}");
}

/// A reply to an accepted message: the shape, a `reply_id` (a rejection has none), and no
/// `status` or `code`.
fn assert_replied(answer: &Value, kind: &str) {
    assert_shape(answer, kind);
    assert!(answer["reply_id"].is_i64(), "not a reply: {answer}");
    assert!(answer.get("status").is_none(), "{answer}");
    assert!(answer.get("code").is_none(), "{answer}");
}

async fn history(app: &TestApp, client_id: &str) -> Vec<Value> {
    let (status, body) = app
        .get_json(&format!("/chat-history/{client_id}?limit=100"))
        .await;
    assert_eq!(status, 200, "{body}");
    body["data"].as_array().expect("a page").clone()
}

#[tokio::test]
async fn a_client_of_that_system_gets_one_answer_per_message_in_its_shape() {
    // 09:00 UTC: text is open; voice, video and image sent as text are notes, never files.
    let app = TestApp::spawn(&[]).await;
    let mut client = PathClient::connected(&app, "/alice").await;

    let reply = client.ask(message("text", "Hello there")).await;
    assert_shape(&reply, "text");
    assert!(
        reply["content"]
            .as_str()
            .is_some_and(|c| c.contains("Good morning")),
        "{reply}"
    );

    for kind in ["voice", "video", "image"] {
        let answer = client.ask(message(kind, "a note, not a file")).await;
        assert_shape(&answer, kind);
        assert_eq!(answer["status"], "rejected", "{answer}");
        assert!(
            answer["content"]
                .as_str()
                .is_some_and(|reason| reason.contains("carries text only")),
            "{answer}"
        );
    }

    // Encoded twice, as one of its clients does: the same answers.
    let again = client.ask(twice(&message("text", "Twice encoded"))).await;
    assert_shape(&again, "text");
    assert!(
        again["content"]
            .as_str()
            .is_some_and(|c| c.contains("Twice encoded")),
        "{again}"
    );
    let note = client.ask(twice(&message("video", "twice"))).await;
    assert_shape(&note, "video");
    assert_eq!(note["status"], "rejected");

    // Bad input gets a clear answer of its own, and the connection goes on.
    let unknown = client.ask(message("sticker", "hi")).await;
    assert_shape(&unknown, "sticker");
    assert_eq!(unknown["code"], "unknown_message_type", "{unknown}");
    let empty = client.ask(message("text", "   ")).await;
    assert_shape(&empty, "text");
    assert_eq!(empty["code"], "empty_text", "{empty}");
    let broken = client.ask(json!("{not json")).await;
    assert_eq!(broken["code"], "malformed_json", "{broken}");
    assert!(broken["error"].is_string(), "{broken}");
    let untyped = client.ask(json!({"content": "no type"})).await;
    assert_eq!(untyped["code"], "unknown_message_type", "{untyped}");

    // Its own ping is answered.
    let pong = client.ask(json!({"check_connection": "PING"})).await;
    assert_eq!(pong, json!({"check_connection": "PONG"}));

    let still = client.ask(message("text", "still here?")).await;
    assert_shape(&still, "text");
    client.close().await;

    let messages = history(&app, "alice").await;
    let kinds: Vec<_> = messages
        .iter()
        .map(|m| m["message_type"].as_str().unwrap_or_default())
        .collect();
    // Newest first; refusals that stored nothing are not there.
    assert_eq!(
        kinds,
        ["text", "video", "text", "image", "video", "voice", "text"],
        "{messages:?}"
    );
    for stored in &messages {
        assert_eq!(stored["timezone"], "UTC");
        let replies = stored["replies"].as_array().expect("replies");
        if stored["message_type"] == "text" {
            assert_eq!(stored["is_accepted"], true, "{stored}");
            assert_eq!(replies.len(), 1, "{stored}");
            assert_eq!(replies[0]["reply_type"], "text");
        } else {
            assert_eq!(stored["is_accepted"], false, "{stored}");
            assert!(stored["status_message"].is_string(), "{stored}");
            assert!(replies.is_empty(), "{stored}");
        }
    }
    assert_eq!(messages[6]["content"], "Hello there");
    // A note is stored as a refused file is: without its content.
    assert_eq!(messages[5]["content"], "");
    // A reply written to the socket is delivered, as for legacy clients.
    eventually("the replies recorded delivered", || async {
        let messages = history(&app, "alice").await;
        messages
            .iter()
            .filter(|m| m["message_type"] == "text")
            .all(|m| m["replies"][0]["is_delivered"] == true)
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_file_with_a_filename_is_a_media_message_whose_further_replies_are_further_frames() {
    let app = TestApp::spawn(&[]).await;
    let mut client = PathClient::connected(&app, "/painter").await;
    let frame = json!({"type": "image", "content": b64(&files::png()), "filename": "dot.png"});
    let first = client.ask(frame).await;
    assert_shape(&first, "text");
    let voice = client.next().await.expect("the voice reply");
    assert_shape(&voice, "voice");
    let image = client.next().await.expect("the image reply");
    assert_shape(&image, "image");
    assert!(
        image["content"]
            .as_str()
            .is_some_and(|url| url.starts_with("/media/replies/image/")),
        "{image}"
    );
    assert_eq!(first["message_id"], image["message_id"]);
    let messages = history(&app, "painter").await;
    assert_eq!(messages[0]["message_type"], "image");
    assert_eq!(messages[0]["replies"].as_array().map(Vec::len), Some(3));
}

#[tokio::test]
async fn the_heartbeat_is_pinged_in_its_words_and_an_answering_client_stays() {
    let app = TestApp::spawn(&["--heartbeat-interval", "0.2", "--heartbeat-timeout", "0.7"]).await;
    let mut client = PathClient::connected(&app, "/pinged").await;
    let reply = client.ask(message("text", "hi")).await;
    assert_shape(&reply, "text");
    // Reading (and answering each PING) for three timeouts' worth, sending nothing else: the
    // server sends this dialect no WebSocket pings, so the pongs tungstenite sends by itself
    // do not keep the client; only its PONGs do.
    let until = tokio::time::Instant::now() + Duration::from_millis(2100);
    while tokio::time::Instant::now() < until {
        if let Ok(Some(frame)) = tokio::time::timeout_at(until, client.ws.next())
            .await
            .map(decode)
        {
            let frame = frame.expect("still connected");
            assert_eq!(frame, json!({"check_connection": "PING"}));
            client.pings += 1;
            client.send(json!({"check_connection": "PONG"})).await;
        }
    }
    assert!(client.pings >= 5, "{} pings", client.pings);
    let reply = client.ask(message("text", "still here")).await;
    assert_shape(&reply, "text");
}

#[tokio::test]
async fn a_client_that_never_answers_is_closed_at_the_heartbeat_timeout() {
    let app = TestApp::spawn(&["--heartbeat-interval", "0.1", "--heartbeat-timeout", "0.35"]).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/mute", app.addr))
        .await
        .expect("the upgrade succeeds");
    // Not reading at all: neither its PINGs nor the WebSocket pings get an answer.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut seen = Vec::new();
    let closed = loop {
        match decode(
            tokio::time::timeout(FRAME_TIMEOUT, ws.next())
                .await
                .expect("in time"),
        ) {
            Some(Ok(frame)) => seen.push(frame),
            Some(Err(closed)) => break closed,
            None => {}
        }
    };
    assert_eq!(closed.code, 4001, "{closed:?}");
    assert_eq!(seen[0], json!({"message": "Connected"}));
    assert!(seen.len() >= 2, "no PING before the close: {seen:?}");
    assert!(
        seen[1..]
            .iter()
            .all(|frame| *frame == json!({"check_connection": "PING"})),
        "{seen:?}"
    );
    eventually("the slot freed", || async {
        (app.health().await["slots_in_use"] == 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn forty_clients_at_once_each_get_their_answers() {
    // PINGs every 100 ms, and replies 0-200 ms after their message: a PING may come between
    // a message and its answer, and the client answers it and reads on.
    let app = TestApp::spawn(&[
        "--heartbeat-interval",
        "0.1",
        "--heartbeat-timeout",
        "0.35",
        "--reply-delay-scale",
        "0.2",
    ])
    .await;
    // Between two messages each client answers this many PINGs and sends nothing else: 0.4 s
    // and more of a silence a client that does not answer them would be closed in (at most
    // four PINGs come within the 0.35 s timeout), so each one stays only by its PONGs.
    const PINGS_BETWEEN_MESSAGES: usize = 5;
    let mut clients = Vec::new();
    for n in 0..40 {
        let path = if n % 2 == 0 {
            format!("/crowd-{n}")
        } else {
            format!("/ws/crowd-{n}")
        };
        clients.push(PathClient::connected(&app, &path).await);
    }
    assert_eq!(app.health().await["connections"], 40);
    let talks = clients
        .into_iter()
        .enumerate()
        .map(|(n, mut client)| async move {
            for round in 0..3 {
                let text = format!("client {n}, round {round}");
                let frame = message("text", &text);
                let frame = if round == 1 { twice(&frame) } else { frame };
                let reply = client.ask(frame).await;
                assert_replied(&reply, "text");
                assert!(reply["message_id"].is_i64(), "{reply}");
                // The built-in responder quotes the message: this client's, of this round.
                assert!(
                    reply["content"]
                        .as_str()
                        .is_some_and(|content| content.contains(&text)),
                    "{text}: {reply}"
                );
                client.answer_pings(PINGS_BETWEEN_MESSAGES).await;
            }
            let note = client.ask(message("voice", "hum")).await;
            assert_shape(&note, "voice");
            assert_eq!(note["status"], "rejected", "{note}");
            assert!(
                note["content"]
                    .as_str()
                    .is_some_and(|reason| reason.contains("carries text only")),
                "{note}"
            );
            client.close().await;
        });
    futures::future::join_all(talks).await;
    for n in [0, 17, 39] {
        let messages = history(&app, &format!("crowd-{n}")).await;
        assert_eq!(messages.len(), 4, "crowd-{n}: {messages:?}");
    }
}

#[tokio::test]
async fn a_second_connection_with_the_same_id_is_told_it_is_already_connected() {
    let app = TestApp::spawn(&[]).await;
    let mut first = PathClient::connected(&app, "/twin").await;
    for path in ["/twin", "/ws/twin"] {
        let (mut second, refusal) = PathClient::connect(&app, path).await;
        let refusal = refusal.expect("an error frame first");
        assert_eq!(refusal["error"], "Already connected", "{refusal}");
        assert_eq!(refusal["code"], "duplicate_connection");
        let closed = second.closed().await;
        assert_eq!(closed.code, 4509, "{closed:?}");
    }
    // A client of another dialect with that id is refused too: one connection per id.
    let mut legacy = support::Client::connect(&app.ws_url(), false)
        .await
        .expect("connects");
    legacy
        .send_json(json!({"client_id": "twin", "timezone": "UTC"}))
        .await;
    assert_eq!(
        legacy.next_json().await["data"]["code"],
        "duplicate_connection"
    );
    let reply = first.ask(message("text", "I am the real one")).await;
    assert_shape(&reply, "text");
}

/// An upgrade to `path` is refused after it: an error frame with `code` whose words contain
/// `words`, then close 1008.
async fn assert_refused(app: &TestApp, path: &str, code: &str, words: &str) {
    let (mut client, refusal) = PathClient::connect(app, path).await;
    let refusal = refusal.expect("an error frame first");
    assert_eq!(refusal["code"], code, "{path}: {refusal}");
    assert!(
        refusal["error"]
            .as_str()
            .is_some_and(|error| error.contains(words)),
        "{path}: {refusal}"
    );
    let closed = client.closed().await;
    assert_eq!(closed.code, 1008, "{path}: {closed:?}");
}

#[tokio::test]
async fn an_invalid_id_in_the_path_is_refused_with_a_clear_error_and_1008() {
    let app = TestApp::spawn(&[]).await;
    for path in ["/ws/a%20b", "/.hidden", "/ws/caf%C3%A9%2Fbar", "/x%00y"] {
        assert_refused(
            &app,
            path,
            "invalid_client_id",
            "in the URL path is not valid",
        )
        .await;
    }
    assert_eq!(app.health().await["slots_in_use"], 0);
}

#[tokio::test]
async fn the_timezone_comes_from_the_query_else_from_the_default_flag() {
    let app = TestApp::spawn(&["--default-timezone", "Asia/Tokyo"]).await;
    // 02:00 UTC is 11:00 in Tokyo, 15:00 in Auckland and 21:00 the day before at GMT-5: text
    // is open in each of them, and not in UTC. Each is answered with a reply only if it was
    // judged in its own zone.
    app.set_time(local("UTC", 2026, 11, 21, 2, 0, 0));
    let mut tokyo = PathClient::connected(&app, "/owl").await;
    assert_replied(&tokyo.ask(message("text", "morning")).await, "text");
    let mut utc = PathClient::connected(&app, "/ws/lark?timezone=UTC").await;
    let rejected = utc.ask(message("text", "too early")).await;
    assert_shape(&rejected, "text");
    assert_eq!(rejected["status"], "rejected", "{rejected}");
    assert!(
        rejected["content"]
            .as_str()
            .is_some_and(|reason| reason.contains("(UTC)")),
        "{rejected}"
    );
    // Escaped, in any letter case, with a `+` left as it is.
    let mut escaped = PathClient::connected(&app, "/kiwi?timezone=pacific%2Fauckland").await;
    assert_replied(&escaped.ask(message("text", "kia ora")).await, "text");
    let mut offset = PathClient::connected(&app, "/ws/sailor?timezone=Etc/GMT+5").await;
    assert_replied(&offset.ask(message("text", "ahoy")).await, "text");

    let (mut unknown, refusal) = PathClient::connect(&app, "/lost?timezone=Mars/Olympus").await;
    let refusal = refusal.expect("an error frame first");
    assert_eq!(refusal["code"], "unknown_timezone", "{refusal}");
    assert_eq!(unknown.closed().await.code, 1008);

    for (client, zone) in [
        ("owl", "Asia/Tokyo"),
        ("lark", "UTC"),
        ("kiwi", "Pacific/Auckland"),
        ("sailor", "Etc/GMT+5"),
    ] {
        let messages = history(&app, client).await;
        assert_eq!(messages[0]["timezone"], zone, "{client}: {messages:?}");
    }
}

#[tokio::test]
async fn plain_requests_keep_their_routes_and_upgrades_to_any_path_but_ws_reach_the_dialect() {
    let app = TestApp::spawn(&[]).await;
    let (status, health) = app.get_json("/health").await;
    assert_eq!((status, &health["status"]), (200, &json!("ok")));
    for path in ["/somebody", "/ws/", "/somebody/", "/x/y/deep", "/ws/a/b"] {
        let nobody = app.get(path).await;
        assert_eq!(nobody.status(), 404, "{path}");
        assert_eq!(nobody.text().await.expect("a body"), "", "{path}");
    }
    let page = app.get("/").await;
    assert_eq!(page.status(), 200);
    let not_upgraded = app.get("/ws/somebody").await;
    assert_eq!(not_upgraded.status(), 400, "not a WebSocket upgrade");

    // A client named like a page is still a client.
    let mut health_client = PathClient::connected(&app, "/health").await;
    assert_shape(&health_client.ask(message("text", "hi")).await, "text");
    let (status, history) = app.get_json("/chat-history/health").await;
    assert_eq!(status, 200);
    assert_eq!(history["pagination"]["total"], 1, "{history}");
    // Any depth: the last segment names the client, on another route's path too.
    for (path, client_id) in [
        ("/x/y/deep", "deep"),
        ("/ws/a/b?timezone=UTC", "b"),
        ("/chat-history/reader", "reader"),
        ("/ws/ws", "ws"),
    ] {
        let mut client = PathClient::connected(&app, path).await;
        assert_replied(&client.ask(message("text", "hi")).await, "text");
        client.close().await;
        let (status, history) = app.get_json(&format!("/chat-history/{client_id}")).await;
        assert_eq!(status, 200);
        assert_eq!(history["pagination"]["total"], 1, "{path}: {history}");
    }
    // `/ws` itself keeps its protocols.
    app.legacy("old-timer", "UTC").await;
}

#[tokio::test]
async fn an_upgrade_to_a_path_ending_in_a_slash_names_no_client_and_is_refused_with_1008() {
    let app = TestApp::spawn(&[]).await;
    for path in ["/ws/", "/alice/", "/", "/x/y/", "/ws/?timezone=UTC"] {
        assert_refused(
            &app,
            path,
            "missing_client_id",
            "the URL path names no client id",
        )
        .await;
    }
    assert_eq!(app.health().await["slots_in_use"], 0);
    assert_eq!(app.health().await["connections"], 0);
}

#[tokio::test]
async fn with_auth_on_the_token_must_be_for_the_client_the_path_names() {
    let app = TestApp::spawn(&["--auth-secret", SECRET]).await;
    let hour = Duration::from_secs(3600);
    let alice = token(SECRET, "alice", hour, app.clock.now());
    let bearer = format!("Bearer {alice}");
    let (_client, first) =
        PathClient::connect_with(&app, "/alice", &[("Authorization", &bearer)]).await;
    assert_eq!(first, Ok(json!({"message": "Connected"})));

    let mut by_query = PathClient::connected(
        &app,
        &format!("/ws/bob-in-query?token={}", {
            token(SECRET, "bob-in-query", hour, app.clock.now())
        }),
    )
    .await;
    assert_shape(&by_query.ask(message("text", "hi")).await, "text");

    let (mut mallory, refusal) =
        PathClient::connect_with(&app, "/carol", &[("Authorization", &bearer)]).await;
    assert_eq!(
        refusal.expect("an error frame")["code"],
        "client_id_mismatch"
    );
    assert_eq!(mallory.closed().await.code, 4606);

    let (mut anonymous, refusal) = PathClient::connect(&app, "/dave").await;
    assert_eq!(refusal.expect("an error frame")["code"], "missing_token");
    assert_eq!(anonymous.closed().await.code, 4601);
}
