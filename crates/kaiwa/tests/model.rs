//! Text replies from a language model (R10), against a fake OpenAI-compatible provider that
//! speaks the real wire format and misbehaves on cue.

mod support;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::{Client, TestApp, files, legacy_message, send, send_file};
use tokio::time::Instant;

/// What the fake provider does with one request.
#[derive(Clone)]
enum Behavior {
    /// A plain (non-streamed) completion body.
    Json(Value),
    /// Server-sent events, written in pieces of `chunk` bytes so events and lines are split
    /// across TCP writes.
    Stream { events: Vec<Value>, chunk: usize },
    /// A bare status, with `Retry-After` if given.
    Status(u16, Option<&'static str>),
    /// A 200 whose body is not JSON.
    Garbage,
    /// Never answers.
    Hang,
}

struct Recorded {
    at: Instant,
    body: Value,
    authorization: Option<String>,
}

#[derive(Clone)]
struct Fake {
    script: Arc<Mutex<VecDeque<Behavior>>>,
    otherwise: Behavior,
    requests: Arc<Mutex<Vec<Recorded>>>,
}

impl Fake {
    /// Serves `script` in order, then `otherwise` for every later request.
    async fn start(script: Vec<Behavior>, otherwise: Behavior) -> (Fake, SocketAddr) {
        let fake = Fake {
            script: Arc::new(Mutex::new(script.into())),
            otherwise,
            requests: Arc::new(Mutex::new(Vec::new())),
        };
        let app = Router::new()
            .route("/v1/chat/completions", post(complete))
            .with_state(fake.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binds");
        let addr = listener.local_addr().expect("an address");
        tokio::spawn(async move { axum::serve(listener, app).await });
        (fake, addr)
    }

    fn requests(&self) -> Vec<(Instant, Value, Option<String>)> {
        self.requests
            .lock()
            .expect("lock")
            .iter()
            .map(|r| (r.at, r.body.clone(), r.authorization.clone()))
            .collect()
    }
}

async fn complete(State(fake): State<Fake>, headers: HeaderMap, body: Bytes) -> Response {
    let body: Value = serde_json::from_slice(&body).expect("kaiwa sends JSON");
    let authorization = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    fake.requests.lock().expect("lock").push(Recorded {
        at: Instant::now(),
        body,
        authorization,
    });
    let behavior = fake
        .script
        .lock()
        .expect("lock")
        .pop_front()
        .unwrap_or_else(|| fake.otherwise.clone());
    match behavior {
        Behavior::Json(value) => axum::Json(value).into_response(),
        Behavior::Status(code, retry_after) => {
            let mut response = StatusCode::from_u16(code)
                .expect("a status")
                .into_response();
            if let Some(after) = retry_after {
                response
                    .headers_mut()
                    .insert("retry-after", after.parse().expect("a header"));
            }
            response
        }
        Behavior::Garbage => {
            ([("content-type", "application/json")], "{not json at all").into_response()
        }
        Behavior::Hang => {
            std::future::pending::<()>().await;
            StatusCode::OK.into_response()
        }
        Behavior::Stream { events, chunk } => {
            let mut text = String::new();
            for event in events {
                text.push_str(&format!("data: {event}\n\n"));
            }
            text.push_str("data: [DONE]\n\n");
            let pieces: Vec<Bytes> = text
                .into_bytes()
                .chunks(chunk)
                .map(Bytes::copy_from_slice)
                .collect();
            let stream = futures::stream::iter(pieces).then(|piece| async move {
                // A pause between writes makes each piece its own TCP segment.
                tokio::time::sleep(Duration::from_millis(2)).await;
                Ok::<_, std::io::Error>(piece)
            });
            (
                [("content-type", "text/event-stream")],
                Body::from_stream(stream),
            )
                .into_response()
        }
    }
}

use futures::StreamExt as _;

fn completion(text: &str) -> Value {
    json!({
        "id": "chatcmpl-1", "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}
    })
}

/// A streamed reply in the given pieces, with the quirks providers have: a role-only first
/// chunk, `finish_reason` empty, missing or null, and a usage chunk with empty `choices`.
fn streamed(pieces: &[&str], chunk: usize) -> Behavior {
    let mut events = vec![
        json!({"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": null}]}),
    ];
    for (n, piece) in pieces.iter().enumerate() {
        let mut choice = json!({"index": 0, "delta": {"content": piece}});
        if n % 2 == 0 {
            choice["finish_reason"] = json!("");
        }
        events.push(json!({"choices": [choice]}));
    }
    events.push(json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}));
    events.push(json!({"choices": [], "usage": {"prompt_tokens": 20, "completion_tokens": 4}}));
    Behavior::Stream { events, chunk }
}

async fn spawn_with(addr: SocketAddr, extra: &[&str]) -> TestApp {
    let base = format!("http://{addr}/v1");
    let mut flags = vec![
        "--openai-api-key",
        "sk-test-key",
        "--model-base-url",
        &base,
        "--model-first-token-timeout",
        "2",
        "--model-total-timeout",
        "5",
    ];
    flags.extend_from_slice(extra);
    TestApp::spawn(&flags).await
}

/// Sends a native text and collects its deltas and its text reply.
async fn ask(client: &mut Client, id: &str, text: &str) -> (Vec<String>, Value) {
    client.send_json(send(id, "text", text)).await;
    let mut deltas = Vec::new();
    loop {
        let frame = client.next_json().await;
        match frame["type"].as_str() {
            Some("delta") => {
                assert_eq!(frame["id"], id);
                deltas.push(frame["delta"].as_str().expect("a piece").to_owned());
            }
            Some("reply") if frame["reply"]["reply_type"] == "text" => {
                return (deltas, frame["reply"].clone());
            }
            _ => {}
        }
    }
}

#[tokio::test]
async fn a_plain_completion_becomes_the_text_reply() {
    let (fake, addr) =
        Fake::start(vec![], Behavior::Json(completion("Hello from the model."))).await;
    let app = spawn_with(addr, &["--model-stream", "false"]).await;
    let mut client = app.native("p1", "UTC").await;
    let (deltas, reply) = ask(&mut client, "m1", "hi").await;
    assert!(deltas.is_empty());
    assert_eq!(reply["content"], "Hello from the model.");
    assert!(reply.get("fallback").is_none());
    let requests = fake.requests();
    assert_eq!(requests[0].2.as_deref(), Some("Bearer sk-test-key"));
    assert_eq!(requests[0].1["model"], "gpt-4o-mini");
    assert_eq!(requests[0].1["stream"], false);
}

#[tokio::test]
async fn a_streamed_reply_reaches_native_clients_as_deltas_then_the_whole_reply() {
    let pieces = ["Hel", "lo, ", "こんにちは", " world", "!"];
    // Seven-byte writes split events, lines and the multi-byte characters apart.
    let (_fake, addr) = Fake::start(vec![], streamed(&pieces, 7)).await;
    let app = spawn_with(addr, &[]).await;
    let mut client = app.native("s1", "UTC").await;
    let (deltas, reply) = ask(&mut client, "m1", "greet me").await;
    let whole: String = pieces.concat();
    assert!(!deltas.is_empty(), "pieces were streamed");
    assert_eq!(deltas.concat(), whole);
    assert_eq!(reply["content"], whole);

    // The stored reply is the whole text.
    let (_, page) = app.get_json("/api/v1/clients/s1/messages").await;
    assert_eq!(page["messages"][0]["replies"][0]["content"], whole);

    // Legacy clients get only the final frame.
    let mut legacy = app.legacy("s2", "UTC").await;
    legacy.send_json(legacy_message("text", "and me?")).await;
    let frame = legacy.next_json().await;
    assert_eq!(frame["type"], "message");
    assert_eq!(frame["data"]["content"], whole);
}

#[tokio::test]
async fn a_500_is_retried_and_the_retry_answers() {
    let (fake, addr) = Fake::start(
        vec![Behavior::Status(500, None)],
        Behavior::Json(completion("second time lucky")),
    )
    .await;
    let app = spawn_with(addr, &["--model-stream", "false"]).await;
    let mut client = app.native("r1", "UTC").await;
    let (_, reply) = ask(&mut client, "m1", "hi").await;
    assert_eq!(reply["content"], "second time lucky");
    assert_eq!(fake.requests().len(), 2);
}

#[tokio::test]
async fn a_429_pauses_every_call_for_its_retry_after_then_they_succeed() {
    let (fake, addr) = Fake::start(
        vec![Behavior::Status(429, Some("1"))],
        Behavior::Json(completion("after the pause")),
    )
    .await;
    let app = spawn_with(addr, &["--model-stream", "false"]).await;
    let mut first = app.native("q1", "UTC").await;
    let mut second = app.native("q2", "UTC").await;
    first.send_json(send("a", "text", "one")).await;
    // Once the 429 has been answered, a second client asks.
    support::eventually("the 429", || async {
        (!fake.requests().is_empty()).then_some(())
    })
    .await;
    second.send_json(send("b", "text", "two")).await;
    for client in [&mut first, &mut second] {
        let reply = client.until(|f| f["type"] == "reply").await;
        assert_eq!(reply["reply"]["content"], "after the pause");
    }
    let requests = fake.requests();
    assert_eq!(
        requests.len(),
        3,
        "the limited call once more, and the second call"
    );
    let limited_at = requests[0].0;
    for (at, _, _) in &requests[1..] {
        assert!(
            *at >= limited_at + Duration::from_millis(950),
            "a call went out during the pause"
        );
    }
}

#[tokio::test]
async fn malformed_json_gives_the_fallback_reply_marked_as_such() {
    let (_fake, addr) = Fake::start(vec![], Behavior::Garbage).await;
    let app = spawn_with(addr, &["--model-stream", "false"]).await;
    let mut client = app.native("f1", "UTC").await;
    let (_, reply) = ask(&mut client, "m1", "hi").await;
    assert_eq!(reply["fallback"], true);
    assert!(
        reply["content"]
            .as_str()
            .is_some_and(|c| c.starts_with("Sorry"))
    );
    let (_, page) = app.get_json("/api/v1/clients/f1/messages").await;
    assert_eq!(page["messages"][0]["replies"][0]["fallback"], true);
    let (_, legacy) = app.get_json("/chat-history/f1").await;
    assert_eq!(legacy["data"][0]["replies"][0]["reply_type"], "text");
}

#[tokio::test]
async fn empty_choices_everywhere_also_fall_back() {
    let empty = Behavior::Stream {
        events: vec![
            json!({"choices": []}),
            json!({"choices": [{"delta": {"content": ""}}]}),
        ],
        chunk: 64,
    };
    let (_fake, addr) = Fake::start(vec![], empty).await;
    let app = spawn_with(addr, &["--model-retries", "0"]).await;
    let mut client = app.native("e1", "UTC").await;
    let (_, reply) = ask(&mut client, "m1", "hi").await;
    assert_eq!(reply["fallback"], true);
}

#[tokio::test]
async fn a_provider_that_never_answers_times_out_into_the_fallback() {
    let (fake, addr) = Fake::start(vec![], Behavior::Hang).await;
    let app = spawn_with(
        addr,
        &[
            "--model-first-token-timeout",
            "0.2",
            "--model-total-timeout",
            "1",
            "--model-retries",
            "1",
        ],
    )
    .await;
    let mut client = app.native("h1", "UTC").await;
    let started = Instant::now();
    let (_, reply) = ask(&mut client, "m1", "anyone there?").await;
    assert_eq!(reply["fallback"], true);
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(
        fake.requests().len(),
        2,
        "one retry after the first timeout"
    );
}

#[tokio::test]
async fn a_slow_provider_holds_back_neither_media_replies_nor_other_clients() {
    let (_fake, addr) =
        Fake::start(vec![Behavior::Hang], Behavior::Json(completion("quick"))).await;
    let app = spawn_with(
        addr,
        &[
            "--model-stream",
            "false",
            "--model-first-token-timeout",
            "3",
            "--model-total-timeout",
            "3",
            "--model-retries",
            "0",
        ],
    )
    .await;
    let mut slow = app.native("slow", "UTC").await;
    slow.send_json(send_file("img", "image", "cat.png", &files::png()))
        .await;
    // Voice and image come first; the text is still being written.
    let mut order = Vec::new();
    while order.len() < 2 {
        let frame = slow.until(|f| f["type"] == "reply").await;
        order.push(
            frame["reply"]["reply_type"]
                .as_str()
                .expect("a type")
                .to_owned(),
        );
    }
    assert_eq!(order, ["voice", "image"]);

    // Meanwhile another client is answered at once.
    let mut other = app.native("other", "UTC").await;
    let (_, reply) = ask(&mut other, "o1", "hi").await;
    assert_eq!(reply["content"], "quick");

    let text = slow.until(|f| f["type"] == "reply").await;
    assert_eq!(text["reply"]["reply_type"], "text");
    assert_eq!(text["reply"]["fallback"], true);
    let replied = slow.until(|f| f["type"] == "status").await;
    assert_eq!(replied["status"], "replied");
}

#[tokio::test]
async fn the_prompt_template_and_the_history_are_what_the_provider_receives() {
    let (fake, addr) = Fake::start(vec![], Behavior::Json(completion("noted"))).await;
    let app = spawn_with(
        addr,
        &[
            "--model-stream",
            "false",
            "--history-turns",
            "2",
            "--system-prompt",
            "Client {client_id} in {timezone}, {local_time} on {weekday}, sent {message_type}.",
        ],
    )
    .await;
    app.set_time(support::local("Asia/Tokyo", 2026, 11, 21, 10, 30, 0));
    let mut client = app.native("ctx", "Asia/Tokyo").await;
    for (id, text) in [("m1", "first"), ("m2", "second"), ("m3", "third")] {
        ask(&mut client, id, text).await;
    }
    let requests = fake.requests();
    let last = &requests[2].1;
    let messages = last["messages"].as_array().expect("messages");
    assert_eq!(
        messages[0],
        json!({"role": "system", "content": "Client ctx in Asia/Tokyo, 10:30 on Saturday, sent text."})
    );
    // Two earlier turns (each a message and its reply), then this message.
    let rest: Vec<(&str, &str)> = messages[1..]
        .iter()
        .map(|m| {
            (
                m["role"].as_str().expect("role"),
                m["content"].as_str().expect("content"),
            )
        })
        .collect();
    assert_eq!(
        rest,
        [
            ("user", "first"),
            ("assistant", "noted"),
            ("user", "second"),
            ("assistant", "noted"),
            ("user", "third")
        ]
    );
    assert_eq!(last["temperature"], 0.7);
    assert_eq!(last["max_tokens"], 300);
}

#[tokio::test]
async fn the_api_key_is_not_shown_by_health_or_metrics() {
    let (_fake, addr) = Fake::start(vec![], Behavior::Json(completion("ok"))).await;
    let app = spawn_with(addr, &["--model-stream", "false"]).await;
    let mut client = app.native("k1", "UTC").await;
    ask(&mut client, "m1", "hi").await;
    let health = app.health().await;
    assert_eq!(health["responder"], "model");
    let metrics = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .expect("HTTP")
        .text()
        .await
        .expect("text");
    assert!(!metrics.contains("sk-test-key") && !health.to_string().contains("sk-test-key"));
    assert!(metrics.contains("kaiwa_model_calls_total"), "{metrics}");
    assert!(
        metrics.contains(r#"kaiwa_model_tokens_total{kind="completion"}"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn an_absurd_retry_after_falls_back_and_frees_the_message() {
    let (fake, addr) = Fake::start(vec![], Behavior::Status(429, Some("1e300"))).await;
    let app = spawn_with(addr, &["--model-stream", "false"]).await;
    let mut client = app.native("absurd", "UTC").await;
    let (_, reply) = ask(&mut client, "m1", "hi").await;
    assert_eq!(reply["fallback"], true);
    support::eventually("the slot freed", || async {
        (app.health().await["in_flight"] == 0).then_some(())
    })
    .await;
    // An unreadable Retry-After counts as none: the usual retries, then the fallback.
    assert_eq!(fake.requests().len(), 3);
}

#[tokio::test]
async fn a_retry_after_past_the_budget_gives_up_at_once() {
    let (fake, addr) = Fake::start(
        vec![Behavior::Status(429, Some("120"))],
        Behavior::Json(completion("late")),
    )
    .await;
    let app = spawn_with(addr, &["--model-stream", "false"]).await;
    let mut client = app.native("patient", "UTC").await;
    let started = Instant::now();
    let (_, reply) = ask(&mut client, "m1", "hi").await;
    assert_eq!(reply["fallback"], true);
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(fake.requests().len(), 1);
}

#[tokio::test]
async fn a_provider_that_ignores_max_tokens_does_not_fill_memory() {
    let huge = "blah ".repeat(40_000);
    let (_fake, addr) = Fake::start(vec![], Behavior::Json(completion(&huge))).await;
    let app = spawn_with(addr, &["--model-stream", "false", "--model-retries", "0"]).await;
    let mut client = app.native("flood", "UTC").await;
    let (_, reply) = ask(&mut client, "m1", "hi").await;
    assert_eq!(reply["fallback"], true);
}
