//! The HTTP handlers driven through `Router::oneshot` over the in-memory store: the whole
//! request path of each endpoint, with no socket and no database file.

use super::router;
use crate::domain::{ClientId, Timezone};
use crate::store::{NewMessage, NewReply, Store};
use crate::testing::Fixture;
use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use chrono::{TimeZone, Utc};
use kaiwa_protocol::{MessageStatus, MessageType, ReplyType};
use serde_json::{Value, json};
use tower::ServiceExt;

async fn get(app: &Router, uri: &str) -> (StatusCode, Value) {
    let response = app
        .clone()
        .oneshot(Request::get(uri).body(Body::empty()).expect("a request"))
        .await
        .expect("the router answers");
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .expect("a body");
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, body)
}

/// `count` text messages of `client`, "m0", "m1"..., each with its text reply.
async fn conversation(store: &dyn Store, client: &str, count: usize) {
    for n in 0..count {
        exchange(store, client, n, MessageType::Text, &[ReplyType::Text]).await;
    }
}

/// Stores message "m{n}" of `client` of type `kind`, with one reply of each of `replies`, and
/// returns its id.
async fn exchange(
    store: &dyn Store,
    client: &str,
    n: usize,
    kind: MessageType,
    replies: &[ReplyType],
) -> i64 {
    let client_id = ClientId::parse_stored(client).expect("an id");
    let received_at = Utc
        .with_ymd_and_hms(2026, 11, 21, 9, 0, 0)
        .single()
        .expect("a time");
    let message = NewMessage {
        client_id: client_id.clone(),
        client_message_id: Some(format!("c{n}")),
        kind,
        content: format!("m{n}"),
        filename: None,
        mime_type: None,
        size_bytes: None,
        timezone: Timezone::parse("UTC").expect("a zone"),
        status: MessageStatus::Accepted,
        reason: None,
        client_timestamp: None,
        received_at,
    };
    let crate::store::Inserted::New(id) = store.insert_message(message).await.expect("stored")
    else {
        panic!("a new message");
    };
    let replies = replies
        .iter()
        .map(|&reply_type| NewReply {
            reply_type,
            content: format!("re: m{n}"),
            filename: None,
            mime_type: None,
            fallback: false,
        })
        .collect();
    store
        .insert_replies(id, &client_id, replies, received_at, true)
        .await
        .expect("replied");
    id
}

fn app(fixture: &Fixture) -> Router {
    router(fixture.http_state())
}

fn contents(messages: &Value) -> Vec<&str> {
    messages
        .as_array()
        .expect("a list")
        .iter()
        .map(|m| m["content"].as_str().expect("content"))
        .collect()
}

#[tokio::test]
async fn the_legacy_history_pages_by_offset_newest_first_in_the_python_servers_shape() {
    let fixture = Fixture::new(&[]);
    conversation(fixture.store.as_ref(), "alice", 5).await;
    let app = app(&fixture);
    let (status, page) = get(&app, "/chat-history/alice?limit=2&offset=1").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page["status"], "success");
    assert_eq!(contents(&page["data"]), ["m3", "m2"]);
    assert_eq!(
        page["pagination"],
        json!({"total": 5, "offset": 1, "limit": 2, "has_more": true})
    );
    let reply = &page["data"][0]["replies"][0];
    assert_eq!(reply["content"], "re: m3");
    assert_eq!(reply["is_delivered"], false);
    assert_eq!(page["data"][0]["is_accepted"], true);
}

#[tokio::test]
async fn the_cursor_history_pages_back_to_the_oldest_and_says_when_it_is_done() {
    let fixture = Fixture::new(&[]);
    conversation(fixture.store.as_ref(), "bob", 5).await;
    conversation(fixture.store.as_ref(), "someone-else", 3).await;
    let app = app(&fixture);
    let mut seen = Vec::new();
    let mut uri = "/api/v1/clients/bob/messages?limit=2".to_owned();
    loop {
        let (status, page) = get(&app, &uri).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        seen.extend(contents(&page["messages"]).into_iter().map(str::to_owned));
        match page["next_cursor"].as_str() {
            Some(cursor) => uri = format!("/api/v1/clients/bob/messages?limit=2&before={cursor}"),
            None => break,
        }
    }
    assert_eq!(seen, ["m4", "m3", "m2", "m1", "m0"]);
    let (_, newest) = get(&app, "/api/v1/clients/bob/messages?limit=1").await;
    assert_eq!(newest["messages"][0]["replies"][0]["seq"], 5);
    assert_eq!(newest["messages"][0]["client_message_id"], "c4");
}

#[tokio::test]
async fn parameters_out_of_range_are_refused_with_422_and_a_stable_code() {
    let app = app(&Fixture::new(&[]));
    for uri in [
        "/chat-history/alice?limit=0",
        "/chat-history/alice?limit=101",
        "/chat-history/alice?offset=-1",
        "/chat-history/alice?limit=ten",
        "/api/v1/clients/alice/messages?before=abc",
        "/api/v1/clients/alice/messages?before=0",
        "/api/v1/clients/a%2Fb/messages",
    ] {
        let (status, body) = get(&app, uri).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{uri}: {body}");
        assert_eq!(body["status"], "error", "{uri}");
        assert_eq!(body["code"], "invalid_parameter", "{uri}");
    }
}

#[tokio::test]
async fn a_client_with_no_messages_has_an_empty_history() {
    let app = app(&Fixture::new(&[]));
    let (status, page) = get(&app, "/chat-history/nobody").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page["data"], json!([]));
    assert_eq!(page["pagination"]["has_more"], false);
    let (status, page) = get(&app, "/api/v1/clients/nobody/messages").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page, json!({"messages": [], "next_cursor": null}));
}

#[tokio::test]
async fn health_reports_the_live_counters_and_says_when_draining() {
    let fixture = Fixture::new(&["--max-clients", "7"]);
    let app = app(&fixture);
    let (status, health) = get(&app, "/health").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(health["status"], "ok");
    assert_eq!(health["max_clients"], 7);
    assert_eq!(health["connections"], 0);
    assert_eq!(health["in_flight"], 0);
    assert_eq!(health["queue_depth"], 0);
    fixture.gateway.begin_drain();
    let (status, health) = get(&app, "/health").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(health["status"], "draining");
}

#[tokio::test]
async fn media_paths_kaiwa_does_not_serve_are_not_found() {
    let app = app(&Fixture::new(&[]));
    for uri in [
        "/media/images/.hidden",
        "/media/secrets/a.png",
        "/media/images/a%2F..%2Fkaiwa.db",
        "/media/replies/voice/nope.wav",
        "/media/replies/image/0.png",
        "/media/replies/image/-3.png",
    ] {
        let (status, body) = get(&app, uri).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{uri}");
        assert_eq!(body["code"], "not_found", "{uri}: {body}");
    }
}

#[tokio::test]
async fn the_image_reply_of_a_message_is_a_png_that_may_be_cached_for_good() {
    let fixture = Fixture::new(&[]);
    let text = exchange(
        fixture.store.as_ref(),
        "ann",
        0,
        MessageType::Text,
        &[ReplyType::Text],
    )
    .await;
    let image = exchange(
        fixture.store.as_ref(),
        "ann",
        1,
        MessageType::Image,
        &[ReplyType::Text, ReplyType::Voice, ReplyType::Image],
    )
    .await;
    let app = app(&fixture);
    // Only a message with an image reply has a picture: made-up ids cost no drawing.
    for id in [text, image + 1, 4242] {
        let (status, body) = get(&app, &format!("/media/replies/image/{id}.png")).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{id}");
        assert_eq!(body["code"], "not_found", "{id}");
    }
    let response = app
        .oneshot(
            Request::get(format!("/media/replies/image/{image}.png"))
                .body(Body::empty())
                .expect("a request"),
        )
        .await
        .expect("the router answers");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()[header::CONTENT_TYPE], "image/png");
    assert!(
        response.headers()[header::CACHE_CONTROL]
            .to_str()
            .is_ok_and(|value| value.contains("immutable"))
    );
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .expect("a body");
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"));
}
