//! Connections over their lifetime: limits (R13, R15), heartbeats (R2), idle clients (R16),
//! slow consumers, delivery status and resume (R11), restarts and shutdown.

mod support;

use serde_json::json;
use support::raw::RawClient;
use support::{Client, TestApp, eventually, files, legacy_message, send, send_file};

fn assert_close(closed: &support::Closed, code: u16, name: &str) {
    assert_eq!(closed.code, code, "{closed:?}");
    assert!(closed.reason.starts_with(name), "{closed:?}");
}

async fn round_trip(client: &mut Client, id: &str) {
    client.send_json(send(id, "text", "still here?")).await;
    client
        .until(|f| f["type"] == "reply" && f["id"] == id)
        .await;
}

#[tokio::test]
async fn the_client_past_the_limit_is_refused_and_the_others_keep_talking() {
    let app = TestApp::spawn(&["--max-clients", "3"]).await;
    let mut clients = Vec::new();
    for n in 0..3 {
        clients.push(app.native(&format!("c{n}"), "UTC").await);
    }
    let mut extra = Client::connect(&app.ws_url(), true)
        .await
        .expect("the upgrade succeeds");
    // A slot is taken only by a verified handshake: the refusal answers the hello.
    extra
        .send_json(json!({"type": "hello", "client_id": "c3", "timezone": "UTC"}))
        .await;
    let notice = extra.next().await.expect("an error frame first");
    assert_eq!(notice["code"], "over_capacity", "{notice}");
    assert_close(&extra.closed().await, 1013, "over_capacity");

    for (n, client) in clients.iter_mut().enumerate() {
        round_trip(client, &format!("still-{n}")).await;
    }
    assert_eq!(app.health().await["status"], "ok");

    // A slot freed by a leaving client can be taken again.
    clients.pop().expect("a client").close().await;
    eventually("a free slot", || async {
        (app.health().await["slots_in_use"] == 2).then_some(())
    })
    .await;
    let mut next = app.native("c-next", "UTC").await;
    round_trip(&mut next, "next").await;
}

#[tokio::test]
async fn a_second_connection_with_a_live_id_is_refused() {
    let app = TestApp::spawn(&[]).await;
    let mut first = app.legacy("twin", "UTC").await;
    let mut second = Client::connect(&app.ws_url(), false)
        .await
        .expect("connects");
    second
        .send_json(json!({"client_id": "twin", "timezone": "UTC"}))
        .await;
    let error = second.next().await.expect("an error frame");
    assert_eq!(error["type"], "error");
    assert!(
        error["data"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("already connected"))
    );
    assert_close(&second.closed().await, 4509, "duplicate_connection");

    first
        .send_json(legacy_message("text", "I am the real one"))
        .await;
    assert_eq!(first.next_json().await["data"]["reply_type"], "text");
}

#[tokio::test]
async fn a_reconnecting_client_takes_over_from_its_own_dead_connection() {
    // The probe lasts one heartbeat interval; the heartbeat timeout is far away.
    let app = TestApp::spawn(&["--heartbeat-interval", "0.2", "--heartbeat-timeout", "60"]).await;
    let mut dead = RawClient::connect(app.addr).await;
    dead.send_text(r#"{"type": "hello", "client_id": "roamer", "timezone": "UTC"}"#)
        .await;
    eventually("the first connection's session", || async {
        (app.health().await["connections"] == 1).then_some(())
    })
    .await;
    // Once its last frame is older than the probe and it does not answer the ping, the new
    // connection takes the id (a connection attempted too early is refused, as for a live one).
    let mut back = eventually("the take-over", || async {
        let mut client = Client::connect(&app.ws_url(), true).await.ok()?;
        client
            .send_json(json!({"type": "hello", "client_id": "roamer", "timezone": "UTC"}))
            .await;
        let first = client.next().await.ok()?;
        (first["type"] == "welcome").then_some(client)
    })
    .await;
    round_trip(&mut back, "back").await;
    assert_eq!(dead.close_code().await, Some(4510));
}

#[tokio::test]
async fn with_the_replace_policy_the_newer_connection_takes_over() {
    let app = TestApp::spawn(&["--duplicate-connection", "replace"]).await;
    let mut first = app.native("phone", "UTC").await;
    let mut second = app.native("phone", "UTC").await;
    assert_close(&first.closed().await, 4510, "replaced");
    round_trip(&mut second, "after-replace").await;
}

#[tokio::test]
async fn a_client_that_stops_answering_is_disconnected_and_its_slot_freed() {
    let app = TestApp::spawn(&[
        "--heartbeat-interval",
        "0.1",
        "--heartbeat-timeout",
        "0.35",
        "--max-clients",
        "1",
    ])
    .await;
    let mut dead = RawClient::connect(app.addr).await;
    dead.send_text(r#"{"client_id": "ghost", "timezone": "UTC"}"#)
        .await;
    assert_eq!(dead.close_code().await, Some(4001));
    eventually("the slot to be freed", || async {
        (app.health().await["slots_in_use"] == 0).then_some(())
    })
    .await;
    // The only slot is free again.
    app.legacy("alive", "UTC").await;
}

#[tokio::test]
async fn a_client_that_never_sends_a_message_loses_its_slot() {
    // The timers themselves are tested to the second on a paused clock (gateway::tests); this
    // is the close a real client sees.
    let app = TestApp::spawn(&["--first-message-timeout", "0.2", "--max-clients", "1"]).await;
    let mut idle = app.native("lurker", "UTC").await;
    assert_close(&idle.closed().await, 4502, "first_message_timeout");
    eventually("the slot to be freed", || async {
        (app.health().await["slots_in_use"] == 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_client_that_stops_reading_is_disconnected_as_a_slow_consumer() {
    let app = TestApp::spawn(&["--outbox-capacity", "8"]).await;
    let mut client = support::slow_reader(&app, "sloth").await;
    support::flood(&mut client, 40_000).await;
    assert_close(&client.closed().await, 4003, "slow_consumer");

    eventually("the slow consumer counted", || async {
        let metrics = app
            .http
            .get(app.url("/metrics"))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        metrics
            .contains(r#"kaiwa_disconnects_total{reason="slow_consumer"} 1"#)
            .then_some(())
    })
    .await;
    let mut other = app.native("quick", "UTC").await;
    round_trip(&mut other, "q").await;
}

#[tokio::test]
async fn a_restart_with_the_same_data_directory_loses_nothing() {
    let app = TestApp::spawn(&[]).await;
    let mut legacy = app.legacy("keeper", "UTC").await;
    legacy
        .send_json(legacy_message("text", "remember me"))
        .await;
    legacy.next_json().await;
    let mut native = app.native("keeper-2", "UTC").await;
    native
        .send_json(send_file("img", "image", "a.png", &files::png()))
        .await;
    native.until(|f| f["status"] == "replied").await;
    native.received(3).await;
    eventually("the replies acknowledged", || async {
        let (_, page) = app.get_json("/api/v1/clients/keeper-2/messages").await;
        page["messages"][0]["replies"]
            .as_array()?
            .iter()
            .all(|r| r["delivery"] == "delivered")
            .then_some(())
    })
    .await;
    let before = eventually("the legacy reply recorded as written", || async {
        let (_, page) = app.get_json("/chat-history/keeper").await;
        (page["data"][0]["replies"][0]["is_delivered"] == true).then_some(page)
    })
    .await;
    let (_, before_native) = app.get_json("/api/v1/clients/keeper-2/messages").await;
    drop((legacy, native));
    let dir = app.stop().await;

    let app = TestApp::spawn_in(dir, &[]).await;
    let (_, after) = app.get_json("/chat-history/keeper").await;
    let (_, after_native) = app.get_json("/api/v1/clients/keeper-2/messages").await;
    assert_eq!(after, before);
    assert_eq!(after_native, before_native);
    let url = after_native["messages"][0]["content"]
        .as_str()
        .expect("a URL");
    let file = app
        .http
        .get(app.url(url))
        .send()
        .await
        .expect("HTTP")
        .bytes()
        .await
        .expect("body");
    assert_eq!(file.as_ref(), files::png().as_slice());

    // New messages continue the ids, and a resend of an old id is still recognised.
    let mut native = app.native("keeper-2", "UTC").await;
    native
        .send_json(send_file("img", "image", "a.png", &files::png()))
        .await;
    let ack = native.until(|f| f["type"] == "ack").await;
    assert_eq!(ack["duplicate"], true);
    assert_eq!(ack["message_id"], after_native["messages"][0]["id"]);
}

#[tokio::test]
async fn a_message_in_flight_at_shutdown_is_processed_after_the_restart() {
    // Replies would take minutes, and shutdown waits only a moment.
    let app = TestApp::spawn(&["--reply-delay-scale", "100", "--shutdown-grace", "0.05"]).await;
    let mut client = app.native("patient", "UTC").await;
    client
        .send_json(send("late", "text", "answer me later"))
        .await;
    let ack = client.until(|f| f["type"] == "ack").await;
    assert_eq!(ack["status"], "accepted");
    let dir = app.stop().await;

    let app = TestApp::spawn_in(dir, &[]).await;
    let (mut back, _) = app.native_with("patient", "UTC", true).await;
    let reply = back
        .until(|f| f["type"] == "reply" || f["type"] == "synced" && f["replies"] != 0)
        .await;
    assert_eq!(reply["type"], "reply", "{reply}");
    assert_eq!(reply["message_id"], ack["message_id"]);
    let (_, page) = app.get_json("/api/v1/clients/patient/messages").await;
    assert_eq!(page["messages"][0]["status"], "replied");
}

#[tokio::test]
async fn shutdown_lets_replies_in_flight_finish_then_says_going_away() {
    let app = TestApp::spawn(&["--reply-delay-scale", "0.3"]).await;
    let mut client = app.native("last-word", "UTC").await;
    client
        .send_json(send_file("v", "voice", "v.wav", &files::wav()))
        .await;
    client
        .until(|f| f["type"] == "status" && f["status"] == "processing")
        .await;

    let mut app = app;
    let stopping = tokio::spawn(async move { app.shutdown().await });
    let mut replies = 0;
    let closed = loop {
        match client.next().await {
            Ok(frame) if frame["type"] == "reply" => replies += 1,
            Ok(_) => {}
            Err(closed) => break closed,
        }
    };
    assert_eq!(replies, 2, "both replies arrive before the close");
    assert_close(&closed, 1001, "going_away");
    stopping.await.expect("joins").expect("shutdown succeeds");
}

#[tokio::test]
async fn no_more_messages_than_the_limit_are_ever_in_flight() {
    let app = TestApp::spawn(&[
        "--max-in-flight",
        "2",
        "--max-in-flight-per-client",
        "2",
        "--reply-delay-scale",
        "0.05",
    ])
    .await;
    let mut alice = app.native("alice", "UTC").await;
    let mut bob = app.native("bob", "UTC").await;
    for n in 0..6 {
        alice.send_json(send(&format!("a{n}"), "text", "one")).await;
        bob.send_json(send(&format!("b{n}"), "text", "two")).await;
    }
    // Messages are processed concurrently, so replies may come in any order.
    for (client, prefix) in [(&mut alice, "a"), (&mut bob, "b")] {
        let mut waiting: std::collections::HashSet<String> =
            (0..6).map(|n| format!("{prefix}{n}")).collect();
        while !waiting.is_empty() {
            let frame = client.until(|f| f["type"] == "reply").await;
            waiting.remove(frame["id"].as_str().expect("an id"));
        }
    }
    let health = app.health().await;
    let peak = health["in_flight_peak"].as_u64().expect("a peak");
    assert!((1..=2).contains(&peak), "{health}");
    assert_eq!(health["max_in_flight"], 2);
}

#[tokio::test]
async fn past_the_wait_for_a_slot_the_client_is_told_to_retry() {
    let app = TestApp::spawn(&[
        "--max-in-flight",
        "1",
        "--max-in-flight-per-client",
        "1",
        "--in-flight-wait",
        "0.05",
        "--reply-delay-scale",
        "1",
    ])
    .await;
    let mut busy = app.native("busy", "UTC").await;
    // A voice reply takes at least a second: the only slot stays taken.
    busy.send_json(send_file("v", "voice", "v.wav", &files::wav()))
        .await;
    assert_eq!(
        busy.until(|f| f["type"] == "ack").await["status"],
        "accepted"
    );

    let mut other = app.native("other", "UTC").await;
    other.send_json(send("o1", "text", "me too")).await;
    let error = other.next_json().await;
    assert_eq!(error["type"], "error", "{error}");
    assert_eq!(error["code"], "busy");
    assert_eq!(error["id"], "o1");
    assert!(error["retry_after_ms"].as_u64().is_some_and(|ms| ms > 0));

    let (_, page) = app.get_json("/api/v1/clients/other/messages").await;
    assert_eq!(
        page["messages"],
        json!([]),
        "a refused message is not stored"
    );
}

#[tokio::test]
async fn a_busy_client_the_server_is_not_reading_is_not_taken_for_dead() {
    // One message at a time per client, and replies that take seconds: after its first message
    // the server stops reading this client (backpressure), so it cannot read its pongs.
    let app = TestApp::spawn(&[
        "--max-in-flight-per-client",
        "1",
        "--reply-delay-scale",
        "10",
        "--heartbeat-interval",
        "0.2",
        "--heartbeat-timeout",
        "60",
    ])
    .await;
    let mut busy = app.native("busy-bee", "UTC").await;
    busy.send_json(send_file("img", "image", "a.png", &files::png()))
        .await;
    assert_eq!(
        busy.until(|f| f["type"] == "ack").await["status"],
        "accepted"
    );
    busy.send_json(send("t", "text", "queued behind the image"))
        .await;

    let mut second = Client::connect(&app.ws_url(), true)
        .await
        .expect("connects");
    second
        .send_json(json!({"type": "hello", "client_id": "busy-bee", "timezone": "UTC"}))
        .await;
    let error = second.next().await.expect("an error frame");
    assert_eq!(error["code"], "duplicate_connection", "{error}");
    assert_close(&second.closed().await, 4509, "duplicate_connection");
}

#[tokio::test]
async fn shutdown_is_not_held_up_by_a_half_sent_http_request() {
    use tokio::io::AsyncWriteExt;
    let mut app = TestApp::spawn(&["--shutdown-grace", "0.1"]).await;
    let mut slow = tokio::net::TcpStream::connect(app.addr)
        .await
        .expect("connects");
    slow.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("sent");
    let started = tokio::time::Instant::now();
    app.shutdown().await.expect("shuts down");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    drop(slow);
}

#[tokio::test]
async fn an_oversize_handshake_is_refused_before_it_is_parsed() {
    let app = TestApp::spawn(&[]).await;
    let mut client = Client::connect(&app.ws_url(), false)
        .await
        .expect("connects");
    // Within what a stranger may send, but larger than any handshake frame.
    let padding = "x".repeat(14 * 1024);
    client
        .send_json(json!({"client_id": "big", "timezone": "UTC", "padding": padding}))
        .await;
    let error = client.next().await.expect("an error frame");
    assert_eq!(error["data"]["code"], "malformed_json", "{error}");
    assert_close(&client.closed().await, 1008, "bad_handshake");
}

#[tokio::test]
async fn a_first_frame_past_the_strangers_allowance_closes_with_1009() {
    let app = TestApp::spawn(&[]).await;
    let mut client = Client::connect(&app.ws_url(), false)
        .await
        .expect("connects");
    let padding = "x".repeat(64 * 1024);
    client
        .send_json(json!({"client_id": "big", "timezone": "UTC", "padding": padding}))
        .await;
    let error = client.next().await.expect("an error frame");
    assert_eq!(error["data"]["code"], "frame_too_large", "{error}");
    assert_close(&client.closed().await, 1009, "message_too_big");
}
