//! A conversation end to end: handshake in both protocols, replies per message type, media that
//! can be downloaded, statuses and acks of the native protocol.

mod support;

use serde_json::{Value, json};
use support::{TestApp, evening, files, legacy_file, legacy_message, send, send_file};

#[tokio::test]
async fn legacy_client_gets_the_python_servers_frames() {
    let app = TestApp::spawn(&[]).await;
    let mut client = app.legacy("alice", "UTC").await;

    client
        .send_json(legacy_message("text", "hello kaiwa"))
        .await;
    let reply = client.next_json().await;
    assert_eq!(reply["type"], "message");
    assert_eq!(reply["data"]["reply_type"], "text");
    assert!(reply["data"]["id"].as_i64().is_some(), "{reply}");
    assert!(
        reply["data"]["content"]
            .as_str()
            .is_some_and(|c| !c.is_empty())
    );
}

#[tokio::test]
async fn native_client_sees_ack_processing_reply_and_replied() {
    let app = TestApp::spawn(&[]).await;
    let mut client = app.native("bob", "Asia/Ho_Chi_Minh").await;
    // 16:00 in Ho Chi Minh City: text is accepted.
    client.send_json(send("m1", "text", "Hello there")).await;

    let ack = client.next_json().await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["id"], "m1");
    assert_eq!(ack["status"], "accepted");
    let message_id = ack["message_id"].as_i64().expect("a stored id");

    let processing = client.next_json().await;
    assert_eq!(
        processing,
        json!({"type": "status", "id": "m1", "message_id": message_id, "status": "processing"})
    );
    let reply = client.next_json().await;
    assert_eq!(reply["type"], "reply");
    assert_eq!(reply["id"], "m1");
    assert_eq!(reply["message_id"], message_id);
    assert_eq!(reply["reply"]["reply_type"], "text");
    assert!(
        reply["reply"]["content"]
            .as_str()
            .is_some_and(|c| c.contains("Asia/Ho_Chi_Minh")),
        "{reply}"
    );
    let replied = client.next_json().await;
    assert_eq!(replied["status"], "replied");
}

#[tokio::test]
async fn a_hello_first_frame_chooses_the_native_protocol_without_the_header() {
    let app = TestApp::spawn(&[]).await;
    let mut client = support::Client::connect(&app.ws_url(), false)
        .await
        .expect("connects");
    client
        .send_json(json!({"type": "hello", "client_id": "carol", "timezone": "Europe/Paris"}))
        .await;
    let welcome = client.next_json().await;
    assert_eq!(welcome["type"], "welcome");
    assert_eq!(welcome["timezone"], "Europe/Paris");
    assert_eq!(welcome["limits"]["max_video_bytes"], 25 << 20);
    let windows = welcome["windows"].as_array().expect("windows");
    assert!(windows.contains(&json!({"message_type": "voice", "start": "08:00", "end": "12:00"})));
}

/// Collects a native message's ack and replies; returns (ack, replies).
async fn exchange(client: &mut support::Client, frame: Value) -> (Value, Vec<Value>) {
    let id = frame["id"].as_str().expect("an id").to_owned();
    client.send_json(frame).await;
    let ack = client
        .until(|f| f["type"] == "ack" && f["id"] == id.as_str())
        .await;
    let mut replies = Vec::new();
    if ack["status"] == "accepted" {
        loop {
            let frame = client.next_json().await;
            match frame["type"].as_str() {
                Some("reply") => replies.push(frame["reply"].clone()),
                Some("status") if frame["status"] == "replied" => break,
                Some("status") => {}
                _ => panic!("unexpected frame {frame}"),
            }
        }
    }
    (ack, replies)
}

fn types(replies: &[Value]) -> Vec<&str> {
    replies
        .iter()
        .filter_map(|r| r["reply_type"].as_str())
        .collect()
}

#[tokio::test]
async fn each_message_type_gets_its_reply_set_with_downloadable_media() {
    let app = TestApp::spawn(&[]).await;
    let mut client = app.native("dave", "UTC").await;

    let (_, replies) = exchange(&mut client, send("t", "text", "hi")).await;
    assert_eq!(types(&replies), ["text"]);

    let (_, replies) = exchange(
        &mut client,
        send_file("v", "voice", "note.wav", &files::wav()),
    )
    .await;
    assert_eq!(types(&replies), ["text", "voice"]);

    let (_, replies) = exchange(
        &mut client,
        send_file("i", "image", "cat.png", &files::png()),
    )
    .await;
    assert_eq!(types(&replies), ["text", "voice", "image"]);
    for reply in &replies[1..] {
        let url = reply["content"].as_str().expect("a URL path");
        let response = app.http.get(app.url(url)).send().await.expect("HTTP works");
        assert_eq!(response.status(), 200, "{url}");
        let mime = reply["mime_type"].as_str().expect("a MIME type");
        assert_eq!(response.headers()["content-type"], mime);
        let body = response.bytes().await.expect("a body");
        match mime {
            "audio/wav" => assert_eq!(&body[..4], b"RIFF"),
            "image/png" => assert_eq!(&body[..8], b"\x89PNG\r\n\x1a\n"),
            other => panic!("unexpected MIME type {other}"),
        }
    }

    app.set_time(evening());
    let (ack, replies) = exchange(
        &mut client,
        send_file("vid", "video", "clip.mp4", &files::mp4()),
    )
    .await;
    assert_eq!(ack["status"], "accepted", "{ack}");
    assert_eq!(types(&replies), ["text", "voice", "image"]);
}

#[tokio::test]
async fn legacy_media_replies_carry_url_filename_and_mime_type() {
    let app = TestApp::spawn(&[]).await;
    let mut client = app.legacy("erin", "UTC").await;
    client
        .send_json(legacy_file("image", "photo.png", &files::png()))
        .await;
    let mut seen = Vec::new();
    for _ in 0..3 {
        let reply = client.next_json().await;
        assert_eq!(reply["type"], "message", "{reply}");
        seen.push(
            reply["data"]["reply_type"]
                .as_str()
                .expect("a type")
                .to_owned(),
        );
        if reply["data"]["reply_type"] != "text" {
            assert!(
                reply["data"]["content"]
                    .as_str()
                    .is_some_and(|c| c.starts_with("/media/replies/"))
            );
            assert!(reply["data"]["filename"].is_string());
            assert!(reply["data"]["mime_type"].is_string());
        }
    }
    assert_eq!(seen, ["text", "voice", "image"]);
}

#[tokio::test]
async fn media_sent_as_a_binary_frame_is_stored_and_served_back_with_ranges() {
    let app = TestApp::spawn(&[]).await;
    let mut client = app.native("frank", "UTC").await;
    let png = files::png();
    client
        .send_json(json!({"type": "send", "id": "b1", "message_type": "image", "filename": "drawing.png", "binary": true}))
        .await;
    client.send_binary(png.clone()).await;
    let ack = client.until(|f| f["type"] == "ack").await;
    assert_eq!(ack["status"], "accepted", "{ack}");

    let (_, page) = app.get_json("/api/v1/clients/frank/messages").await;
    let message = &page["messages"][0];
    assert_eq!(message["filename"], "drawing.png");
    assert_eq!(message["mime_type"], "image/png");
    assert_eq!(message["size_bytes"], png.len());
    let url = message["content"].as_str().expect("a URL");
    assert!(
        url.starts_with("/media/images/") && url.ends_with(".png"),
        "{url}"
    );
    assert!(
        app.data_dir().join(&url[1..]).is_file(),
        "stored under the data directory"
    );

    let whole = app.http.get(app.url(url)).send().await.expect("HTTP works");
    assert_eq!(whole.headers()["content-type"], "image/png");
    assert_eq!(
        whole.bytes().await.expect("a body").as_ref(),
        png.as_slice()
    );
    let part = app
        .http
        .get(app.url(url))
        .header("Range", "bytes=1-3")
        .send()
        .await
        .expect("HTTP works");
    assert_eq!(part.status(), 206);
    assert_eq!(part.bytes().await.expect("a body").as_ref(), b"PNG");
}

#[tokio::test]
async fn a_resent_message_id_is_acked_again_but_stored_once() {
    let app = TestApp::spawn(&[]).await;
    let mut client = app.native("gina", "UTC").await;
    let (first, _) = exchange(&mut client, send("same", "text", "only once")).await;
    client.close().await;

    let mut again = app.native("gina", "UTC").await;
    again.send_json(send("same", "text", "only once")).await;
    let second = again.until(|f| f["type"] == "ack").await;
    assert_eq!(second["message_id"], first["message_id"]);
    assert_eq!(second["duplicate"], true);
    assert_eq!(second["status"], "replied");

    let (_, page) = app.get_json("/api/v1/clients/gina/messages").await;
    assert_eq!(page["messages"].as_array().map(Vec::len), Some(1));
}

#[tokio::test]
async fn a_clients_pipelined_messages_are_stored_and_acked_in_the_order_sent() {
    let app = TestApp::spawn(&[]).await;
    let mut client = app.native("orderly", "UTC").await;
    let count = 200;
    for n in 0..count {
        // Media and text mixed: a slower file save must not let a later text overtake it.
        let frame = if n % 10 == 0 {
            send_file(&format!("m{n}"), "image", "p.png", &files::png())
        } else {
            send(&format!("m{n}"), "text", &format!("number {n}"))
        };
        client.send_json(frame).await;
    }
    let mut acked = Vec::new();
    while acked.len() < count {
        let ack = client.until(|f| f["type"] == "ack").await;
        acked.push(ack["id"].as_str().expect("an id").to_owned());
    }
    let sent: Vec<String> = (0..count).map(|n| format!("m{n}")).collect();
    assert_eq!(acked, sent, "acks come in the order sent");

    let mut stored = Vec::new();
    let mut cursor = String::new();
    loop {
        let (_, page) = app
            .get_json(&format!(
                "/api/v1/clients/orderly/messages?limit=100&before={cursor}"
            ))
            .await;
        for message in page["messages"].as_array().expect("messages") {
            stored.push(
                message["client_message_id"]
                    .as_str()
                    .expect("an id")
                    .to_owned(),
            );
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = next.to_owned(),
            None => break,
        }
    }
    stored.reverse();
    assert_eq!(stored, sent, "ids follow the order sent");
}

#[tokio::test]
async fn a_missing_media_file_is_a_404_that_is_not_cached() {
    let app = TestApp::spawn(&[]).await;
    let response = app
        .http
        .get(app.url("/media/images/0123456789abcdef.png"))
        .send()
        .await
        .expect("HTTP works");
    assert_eq!(response.status(), 404);
    let cache = response
        .headers()
        .get("cache-control")
        .map(|v| v.to_str().unwrap_or_default().to_owned());
    assert!(!cache.unwrap_or_default().contains("immutable"));
}
