//! Chat history over HTTP (R12): the legacy offset endpoint and the native cursor endpoint,
//! which stays correct while new messages arrive.

mod support;

use serde_json::Value;
use support::{Client, TestApp, eventually, legacy_message, send};

/// Sends `count` native texts `"{prefix}{n}"` and waits for each one's last reply.
async fn say(client: &mut Client, prefix: &str, count: usize) {
    for n in 0..count {
        let id = format!("{prefix}{n}");
        client.send_json(send(&id, "text", &id)).await;
        client
            .until(|f| f["type"] == "status" && f["status"] == "replied" && f["id"] == id.as_str())
            .await;
    }
}

fn contents(page: &Value) -> Vec<String> {
    page["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["content"].as_str().expect("content").to_owned())
        .collect()
}

#[tokio::test]
async fn the_cursor_pages_back_without_gaps_or_repeats_while_new_messages_arrive() {
    let app = TestApp::spawn(&[]).await;
    let mut client = app.native("reader", "UTC").await;
    say(&mut client, "old", 25).await;

    let (status, first) = app
        .get_json("/api/v1/clients/reader/messages?limit=10")
        .await;
    assert_eq!(status, 200);
    let expected: Vec<String> = (15..25).rev().map(|n| format!("old{n}")).collect();
    assert_eq!(contents(&first), expected);
    let message = &first["messages"][0];
    assert_eq!(message["status"], "replied");
    assert_eq!(message["replies"][0]["seq"], 25);

    // A reply is delivered once the client acknowledges it; the store records it in its next
    // batch.
    client.received(25).await;
    let reply = eventually("the acknowledged reply delivered", || async {
        let (_, page) = app
            .get_json("/api/v1/clients/reader/messages?limit=1")
            .await;
        let reply = page["messages"][0]["replies"][0].clone();
        (reply["delivery"] == "delivered").then_some(reply)
    })
    .await;
    assert!(reply["delivered_at"].is_string(), "{reply}");

    // New messages arrive between the first page and the next ones.
    say(&mut client, "new", 7).await;

    let mut seen = contents(&first);
    let mut cursor = first["next_cursor"].as_str().expect("a cursor").to_owned();
    loop {
        let (_, page) = app
            .get_json(&format!(
                "/api/v1/clients/reader/messages?limit=10&before={cursor}"
            ))
            .await;
        seen.extend(contents(&page));
        match page["next_cursor"].as_str() {
            Some(next) => cursor = next.to_owned(),
            None => break,
        }
    }
    let all_old: Vec<String> = (0..25).rev().map(|n| format!("old{n}")).collect();
    assert_eq!(seen, all_old, "every older message once, newest first");

    let (_, latest) = app
        .get_json("/api/v1/clients/reader/messages?limit=3")
        .await;
    assert_eq!(contents(&latest), ["new6", "new5", "new4"]);
}

#[tokio::test]
async fn the_legacy_endpoint_pages_by_offset_with_the_python_servers_shape() {
    let app = TestApp::spawn(&[]).await;
    let mut client = app.legacy("old-client", "Asia/Ho_Chi_Minh").await;
    for n in 0..5 {
        client
            .send_json(legacy_message("text", &format!("line {n}")))
            .await;
        let reply = client.next_json().await;
        assert_eq!(reply["type"], "message");
    }

    let (status, body) = app
        .get_json("/chat-history/old-client?limit=2&offset=1")
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["status"], "success");
    assert_eq!(body["pagination"]["total"], 5);
    assert_eq!(body["pagination"]["offset"], 1);
    assert_eq!(body["pagination"]["limit"], 2);
    assert_eq!(body["pagination"]["has_more"], true);
    let data = body["data"].as_array().expect("data");
    assert_eq!(data.len(), 2);
    assert_eq!(data[0]["content"], "line 3");
    assert_eq!(data[1]["content"], "line 2");
    let message = &data[0];
    for key in [
        "id",
        "client_id",
        "content",
        "message_type",
        "timezone",
        "is_accepted",
        "status_message",
        "client_timestamp",
        "replies",
    ] {
        assert!(message.get(key).is_some(), "{key} missing from {message}");
    }
    assert_eq!(message["timezone"], "Asia/Ho_Chi_Minh");
    assert_eq!(message["is_accepted"], true);
    let reply = &message["replies"][0];
    for key in ["id", "content", "reply_type", "is_delivered"] {
        assert!(reply.get(key).is_some(), "{key} missing from {reply}");
    }
    assert_eq!(reply["is_delivered"], true);

    let (_, last) = app
        .get_json("/chat-history/old-client?limit=2&offset=4")
        .await;
    assert_eq!(last["pagination"]["has_more"], false);
    let (_, nobody) = app.get_json("/chat-history/nobody").await;
    assert_eq!(nobody["pagination"]["total"], 0);
    assert_eq!(nobody["data"], serde_json::json!([]));
}

#[tokio::test]
async fn out_of_range_parameters_get_422_with_a_stable_code() {
    let app = TestApp::spawn(&[]).await;
    for path in [
        "/chat-history/x?limit=0",
        "/chat-history/x?limit=101",
        "/chat-history/x?limit=ten",
        "/chat-history/x?offset=-1",
        "/api/v1/clients/x/messages?limit=500",
        "/api/v1/clients/x/messages?before=abc",
    ] {
        let (status, body) = app.get_json(path).await;
        assert_eq!(status, 422, "{path}");
        assert_eq!(body["status"], "error", "{path}");
        assert_eq!(body["code"], "invalid_parameter", "{path}");
    }
    let (status, _) = app.get_json("/chat-history/x?limit=100&offset=0").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_client_stored_under_the_old_id_rules_keeps_its_history() {
    use kaiwa::domain::{ClientId, Timezone};
    use kaiwa::store::{NewMessage, SqliteOptions, SqliteStore, Store};
    use kaiwa_protocol::{MessageStatus, MessageType};

    // An id with a space was accepted before ids were held to one plain path segment.
    let dir = tempfile::tempdir().expect("a temporary directory");
    let store = SqliteStore::open(&dir.path().join("kaiwa.db"), SqliteOptions::default())
        .await
        .expect("opens");
    store
        .insert_message(NewMessage {
            client_id: ClientId::parse_stored("old timer").expect("an old id"),
            client_message_id: None,
            kind: MessageType::Text,
            content: "from before".into(),
            filename: None,
            mime_type: None,
            size_bytes: None,
            timezone: Timezone::parse("UTC").expect("a zone"),
            status: MessageStatus::Accepted,
            reason: None,
            client_timestamp: None,
            received_at: support::morning(),
        })
        .await
        .expect("stored");
    store.close().await;

    let app = TestApp::spawn_in(dir, &[]).await;
    let (status, page) = app.get_json("/chat-history/old%20timer").await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["data"][0]["content"], "from before");
    let (status, page) = app.get_json("/api/v1/clients/old%20timer/messages").await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["messages"][0]["content"], "from before");
}
