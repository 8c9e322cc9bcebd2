//! Auth on a real kaiwa: who may connect (every refusal, in both protocols, with its own error
//! and close code), tokens running out while connected (with and without a refresh), secret
//! rotation, who may read a history or a file, the admin endpoints, CORS, and the refusal to
//! listen beyond loopback without auth.

mod support;

use kaiwa::clock::Clock as _;
use serde_json::{Value, json};
use std::time::Duration;
use support::tokens::{OTHER_SECRET, SECRET, token, token_for};
use support::{Client, TestApp, files, refused_upgrade, send, send_file};

const AUTH: &[&str] = &["--auth-secret", SECRET];
const HOUR: Duration = Duration::from_secs(3600);

fn alice(app: &TestApp) -> String {
    token(SECRET, "alice", HOUR, app.clock.now())
}

/// A native client (by header) that says hello with `hello`.
async fn native(app: &TestApp, hello: Value) -> Client {
    let mut client = Client::connect(&app.ws_url(), true)
        .await
        .expect("connects");
    client.send_json(hello).await;
    client
}

async fn legacy(app: &TestApp, hello: Value) -> Client {
    let mut client = Client::connect(&app.ws_url(), false)
        .await
        .expect("connects");
    client.send_json(hello).await;
    client
}

/// Reads the refusal: an error frame with `code`, then the close with `close`.
async fn refused(client: &mut Client, native: bool, code: &str, close: u16) {
    let error = client.next_json().await;
    let got = if native {
        &error["code"]
    } else {
        &error["data"]["code"]
    };
    assert_eq!(got, code, "{error}");
    let closed = client.closed().await;
    assert_eq!(closed.code, close, "{closed:?}");
    assert!(closed.reason.starts_with(code), "{closed:?}");
}

async fn get(app: &TestApp, path: &str, bearer: Option<&str>) -> reqwest::Response {
    let mut request = app.http.get(app.url(path));
    if let Some(token) = bearer {
        request = request.bearer_auth(token);
    }
    request.send().await.expect("HTTP works")
}

async fn json(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    (status, response.json().await.expect("a JSON body"))
}

#[tokio::test]
async fn a_client_is_who_its_token_says_in_both_protocols() {
    let app = TestApp::spawn(AUTH).await;
    let token = alice(&app);
    let mut client = native(
        &app,
        json!({"type": "hello", "token": token, "timezone": "UTC"}),
    )
    .await;
    let welcome = client.next_json().await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    assert_eq!(welcome["client_id"], "alice");
    assert_eq!(
        welcome["token_expires_at"],
        (app.clock.now() + chrono::TimeDelta::hours(1))
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    );
    client.send_json(send("n1", "text", "hello")).await;
    let reply = client.until(|frame| frame["type"] == "reply").await;
    assert_eq!(reply["id"], "n1");
    client.close().await;

    // The same id in the frame is fine; the legacy handshake carries the token the same way.
    let mut client = legacy(
        &app,
        json!({"client_id": "alice", "timezone": "UTC", "token": token}),
    )
    .await;
    let connected = client.next_json().await;
    assert_eq!(connected["data"]["message"], "Connected successfully");
    client
        .send_json(support::legacy_message("text", "hi"))
        .await;
    let reply = client.until(|frame| frame["type"] == "message").await;
    assert!(reply["data"]["id"].is_i64(), "{reply}");
    client.close().await;

    let (status, history) =
        json(get(&app, "/api/v1/clients/alice/messages", Some(&token)).await).await;
    assert_eq!(status, 200, "{history}");
    assert_eq!(history["messages"].as_array().map(Vec::len), Some(2));
}

#[tokio::test]
async fn the_token_may_come_with_the_upgrade_request_instead() {
    let app = TestApp::spawn(AUTH).await;
    let token = alice(&app);
    let bearer = format!("Bearer {token}");
    let mut client = Client::connect_with(&app.ws_url(), true, &[("Authorization", &bearer)])
        .await
        .expect("connects");
    client
        .send_json(json!({"type": "hello", "timezone": "UTC"}))
        .await;
    assert_eq!(client.next_json().await["client_id"], "alice");
    client.close().await;

    let url = format!("{}?token={token}", app.ws_url());
    let mut client = Client::connect(&url, false).await.expect("connects");
    client.send_json(json!({"timezone": "UTC"})).await;
    assert_eq!(
        client.next_json().await["data"]["message"],
        "Connected successfully"
    );
    client.close().await;

    // The frame's token comes first: a bad one in the frame is not saved by a good header.
    let mut client = Client::connect_with(&app.ws_url(), true, &[("Authorization", &bearer)])
        .await
        .expect("connects");
    client
        .send_json(json!({"type": "hello", "timezone": "UTC", "token": "not-a-jwt"}))
        .await;
    refused(&mut client, true, "malformed_token", 4602).await;
}

#[tokio::test]
async fn a_bad_token_on_the_upgrade_request_is_refused_with_401_and_nothing_is_upgraded() {
    let app = TestApp::spawn(AUTH).await;
    let now = app.clock.now();
    let expired = token(SECRET, "alice", HOUR, now - chrono::TimeDelta::hours(2));
    let bearer = format!("Bearer {expired}");
    let (status, body) = refused_upgrade(&app.ws_url(), true, &[("Authorization", &bearer)]).await;
    assert_eq!(status, 401);
    assert_eq!(body["code"], "expired_token", "{body}");
    let (status, body) =
        refused_upgrade(&format!("{}?token=not-a-jwt", app.ws_url()), true, &[]).await;
    assert_eq!(status, 401);
    assert_eq!(body["code"], "malformed_token", "{body}");
    assert_eq!(app.health().await["status"], "ok");
}

#[tokio::test]
async fn a_token_over_8_kib_is_refused_before_it_is_decoded() {
    let app = TestApp::spawn(AUTH).await;
    // A real token, padded: decoding it would succeed up to the padding.
    let huge = format!("{}{}", alice(&app), "A".repeat(9 * 1024));
    let (status, body) = json(get(&app, "/api/v1/clients/alice/messages", Some(&huge)).await).await;
    assert_eq!(status, 401);
    assert_eq!(body["code"], "malformed_token", "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| m.contains("8192")),
        "{body}"
    );
    let mut client = native(
        &app,
        json!({"type": "hello", "token": huge, "timezone": "UTC"}),
    )
    .await;
    refused(&mut client, true, "malformed_token", 4602).await;
}

#[tokio::test]
async fn every_bad_token_is_refused_with_its_own_error_and_close_code_in_both_protocols() {
    let app = TestApp::spawn(AUTH).await;
    let now = app.clock.now();
    let cases: Vec<(&str, Option<String>, &str, &str, u16)> = vec![
        ("no token", None, "alice", "missing_token", 4601),
        (
            "not a JWT",
            Some("three.parts.no".into()),
            "alice",
            "malformed_token",
            4602,
        ),
        (
            "expired",
            Some(token(
                SECRET,
                "alice",
                HOUR,
                now - chrono::TimeDelta::hours(2),
            )),
            "alice",
            "expired_token",
            4603,
        ),
        (
            "another secret",
            Some(token(OTHER_SECRET, "alice", HOUR, now)),
            "alice",
            "invalid_token_signature",
            4604,
        ),
        (
            "another audience",
            Some(token_for(SECRET, "elsewhere", "alice", HOUR, now)),
            "alice",
            "wrong_token_audience",
            4605,
        ),
        (
            "someone else's token",
            Some(token(SECRET, "bob", HOUR, now)),
            "alice",
            "client_id_mismatch",
            4606,
        ),
    ];
    for (what, token, client_id, code, close) in cases {
        let mut hello = json!({"type": "hello", "client_id": client_id, "timezone": "UTC"});
        if let Some(token) = &token {
            hello["token"] = json!(token);
        }
        let mut client = native(&app, hello).await;
        refused(&mut client, true, code, close).await;

        let mut handshake = json!({"client_id": client_id, "timezone": "UTC"});
        if let Some(token) = &token {
            handshake["token"] = json!(token);
        }
        let mut client = legacy(&app, handshake).await;
        refused(&mut client, false, code, close).await;
        eprintln!("{what}: refused with {code} and {close} in both protocols");
    }
    let health = app.health().await;
    assert_eq!(
        health["connections"],
        json!(null),
        "liveness only: {health}"
    );
}

#[tokio::test]
async fn tokens_of_the_previous_secret_work_during_a_rotation_and_not_after_it() {
    let rotating = ["--auth-secret", SECRET, "--auth-secret", OTHER_SECRET];
    let app = TestApp::spawn(&rotating).await;
    let old = token(OTHER_SECRET, "alice", HOUR, app.clock.now());
    let new = token(SECRET, "alice", HOUR, app.clock.now());
    for token in [&old, &new] {
        let mut client = native(
            &app,
            json!({"type": "hello", "token": token, "timezone": "UTC"}),
        )
        .await;
        assert_eq!(client.next_json().await["type"], "welcome");
        client.close().await;
    }
    let (status, _) = json(get(&app, "/chat-history/alice", Some(&old)).await).await;
    assert_eq!(status, 200);

    let app = app.restart(AUTH).await;
    let mut client = native(
        &app,
        json!({"type": "hello", "token": old, "timezone": "UTC"}),
    )
    .await;
    refused(&mut client, true, "invalid_token_signature", 4604).await;
    let (status, body) = json(get(&app, "/chat-history/alice", Some(&old)).await).await;
    assert_eq!(
        (status, &body["code"]),
        (401, &json!("invalid_token_signature"))
    );
    let mut client = native(
        &app,
        json!({"type": "hello", "token": new, "timezone": "UTC"}),
    )
    .await;
    assert_eq!(client.next_json().await["type"], "welcome");
}

/// Auth on, tokens judged to the second, and a one-second grace.
const SHORT: &[&str] = &[
    "--auth-secret",
    SECRET,
    "--auth-leeway",
    "0",
    "--auth-refresh-grace",
    "1",
];

#[tokio::test]
async fn a_connection_whose_token_runs_out_is_warned_then_closed_with_4603() {
    let app = TestApp::spawn(SHORT).await;
    let short = token(SECRET, "alice", Duration::from_secs(2), app.clock.now());
    for native_protocol in [true, false] {
        let mut client = if native_protocol {
            native(
                &app,
                json!({"type": "hello", "token": short, "timezone": "UTC"}),
            )
            .await
        } else {
            legacy(&app, json!({"token": short, "timezone": "UTC"})).await
        };
        client.next_json().await;
        let warning = client.next_json().await;
        if native_protocol {
            assert_eq!(warning["type"], "token_expired", "{warning}");
            assert_eq!(warning["closes_in_ms"], 1000);
        } else {
            assert_eq!(warning["type"], "system", "{warning}");
            assert_eq!(warning["data"]["code"], "expired_token");
        }
        let closed = client.closed().await;
        assert_eq!(closed.code, 4603, "{closed:?}");
    }
}

#[tokio::test]
async fn a_message_sent_on_a_token_that_ran_out_is_refused_until_a_refresh() {
    let mut flags = AUTH.to_vec();
    // A long grace: the connection stays open, but its token no longer takes messages.
    flags.extend(["--auth-leeway", "0", "--auth-refresh-grace", "300"]);
    let app = TestApp::spawn(&flags).await;
    let short = token(SECRET, "alice", Duration::from_secs(2), app.clock.now());
    let mut native_client = native(
        &app,
        json!({"type": "hello", "token": short, "timezone": "UTC"}),
    )
    .await;
    native_client.next_json().await;
    let mut legacy_client = legacy(
        &app,
        json!({"token": token(SECRET, "bob", Duration::from_secs(2), app.clock.now()), "timezone": "UTC"}),
    )
    .await;
    legacy_client.next_json().await;
    assert_eq!(native_client.next_json().await["type"], "token_expired");
    assert_eq!(
        legacy_client.next_json().await["data"]["code"],
        "expired_token"
    );

    native_client
        .send_json(send("late", "text", "too late"))
        .await;
    let refusal = native_client.next_json().await;
    assert_eq!(refusal["type"], "error", "{refusal}");
    assert_eq!(refusal["code"], "expired_token", "{refusal}");
    assert_eq!(refusal["id"], "late", "{refusal}");
    legacy_client
        .send_json(support::legacy_message("text", "too late"))
        .await;
    let refusal = legacy_client.next_json().await;
    assert_eq!(refusal["data"]["code"], "expired_token", "{refusal}");
    // Nothing of either was stored.
    let (_, history) =
        json(get(&app, "/api/v1/clients/alice/messages", Some(&alice(&app))).await).await;
    assert_eq!(history["messages"], json!([]), "{history}");

    native_client
        .send_json(json!({"type": "refresh", "token": alice(&app)}))
        .await;
    assert_eq!(native_client.next_json().await["type"], "refreshed");
    native_client
        .send_json(send("again", "text", "in time"))
        .await;
    let reply = native_client.until(|frame| frame["type"] == "reply").await;
    assert_eq!(reply["id"], "again");
}

#[tokio::test]
async fn a_refresh_keeps_the_connection_past_the_old_tokens_end() {
    let app = TestApp::spawn(SHORT).await;
    let short = token(SECRET, "alice", Duration::from_secs(2), app.clock.now());
    let mut client = native(
        &app,
        json!({"type": "hello", "token": short, "timezone": "UTC"}),
    )
    .await;
    client.next_json().await;
    let warning = client.next_json().await;
    assert_eq!(warning["type"], "token_expired", "{warning}");
    // A token for someone else does not do.
    let bob = token(SECRET, "bob", HOUR, app.clock.now());
    client
        .send_json(json!({"type": "refresh", "token": bob}))
        .await;
    assert_eq!(client.next_json().await["code"], "client_id_mismatch");
    let fresh = alice(&app);
    client
        .send_json(json!({"type": "refresh", "token": fresh}))
        .await;
    let refreshed = client.next_json().await;
    assert_eq!(refreshed["type"], "refreshed", "{refreshed}");
    // Past the grace period, the connection still works.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    client.send_json(send("after", "text", "still here")).await;
    let reply = client.until(|frame| frame["type"] == "reply").await;
    assert_eq!(reply["id"], "after");
}

#[tokio::test]
async fn a_history_is_read_only_with_its_own_clients_token_and_the_body_says_why() {
    let app = TestApp::spawn(AUTH).await;
    let alice_token = alice(&app);
    let bob_token = token(SECRET, "bob", HOUR, app.clock.now());
    for path in ["/chat-history/alice", "/api/v1/clients/alice/messages"] {
        let response = get(&app, path, None).await;
        assert_eq!(
            response.headers()["www-authenticate"],
            r#"Bearer realm="kaiwa""#,
            "{path}"
        );
        let (status, body) = json(response).await;
        assert_eq!(
            (status, &body["code"]),
            (401, &json!("missing_token")),
            "{path}"
        );

        let (status, body) = json(get(&app, path, Some("garbage")).await).await;
        assert_eq!(
            (status, &body["code"]),
            (401, &json!("malformed_token")),
            "{path}"
        );

        let (status, body) = json(get(&app, path, Some(&bob_token)).await).await;
        assert_eq!(
            (status, &body["code"]),
            (403, &json!("client_id_mismatch")),
            "{path}"
        );
        assert!(
            body["message"].as_str().is_some_and(|m| m.contains("bob")),
            "{body}"
        );

        let (status, body) = json(get(&app, path, Some(&alice_token)).await).await;
        assert_eq!(status, 200, "{path}: {body}");
    }
}

#[tokio::test]
async fn an_uploaded_file_is_served_to_its_client_only_and_reply_media_to_anyone() {
    let app = TestApp::spawn(AUTH).await;
    let token = alice(&app);
    let mut client = native(
        &app,
        json!({"type": "hello", "token": token, "timezone": "UTC"}),
    )
    .await;
    client.next_json().await;
    client
        .send_json(send_file("i1", "image", "dot.png", &files::png()))
        .await;
    let image = client
        .until(|frame| frame["type"] == "reply" && frame["reply"]["reply_type"] == "image")
        .await;
    client.close().await;

    let (_, history) = json(get(&app, "/api/v1/clients/alice/messages", Some(&token)).await).await;
    let link = history["messages"][0]["content"]
        .as_str()
        .expect("a link")
        .to_owned();
    assert!(
        link.starts_with("/media/images/") && link.contains("?sig="),
        "{link}"
    );
    let response = get(&app, &link, Some(&token)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "image/png");
    assert!(
        response.headers()["cache-control"]
            .to_str()
            .is_ok_and(|value| value.starts_with("private")),
    );

    let (status, body) = json(get(&app, &link, None).await).await;
    assert_eq!((status, &body["code"]), (401, &json!("missing_token")));
    let bob = token_for(SECRET, "kaiwa", "bob", HOUR, app.clock.now());
    let (status, body) = json(get(&app, &link, Some(&bob)).await).await;
    assert_eq!((status, &body["code"]), (403, &json!("client_id_mismatch")));
    let bare = link.split('?').next().expect("a path");
    let (status, body) = json(get(&app, bare, Some(&token)).await).await;
    assert_eq!((status, &body["code"]), (403, &json!("client_id_mismatch")));

    let reply_media = image["reply"]["content"].as_str().expect("a link");
    assert_eq!(get(&app, reply_media, None).await.status(), 200);
    assert_eq!(
        get(&app, "/media/replies/voice/image.wav", None)
            .await
            .status(),
        200
    );
}

const ADMIN: &str = "an-admin-token-for-the-tests";

#[tokio::test]
async fn metrics_and_the_detailed_health_need_the_admin_token() {
    let app = TestApp::spawn(&["--auth-secret", SECRET, "--admin-token", ADMIN]).await;
    let (status, liveness) = json(get(&app, "/health", None).await).await;
    assert_eq!((status, liveness), (200, json!({"status": "ok"})));
    let (status, detailed) = json(get(&app, "/health", Some(ADMIN)).await).await;
    assert_eq!(status, 200);
    assert_eq!(detailed["max_clients"], 50, "{detailed}");
    let client_token = alice(&app);
    let (status, body) = json(get(&app, "/health", Some(&client_token)).await).await;
    assert_eq!((status, &body["code"]), (403, &json!("forbidden")));

    let (status, body) = json(get(&app, "/metrics", None).await).await;
    assert_eq!((status, &body["code"]), (401, &json!("missing_token")));
    let (status, body) = json(get(&app, "/metrics", Some("not-the-admin-token")).await).await;
    assert_eq!((status, &body["code"]), (403, &json!("forbidden")));
    let metrics = get(&app, "/metrics", Some(ADMIN)).await;
    assert_ne!(metrics.status(), 401);
    assert_ne!(metrics.status(), 403);
}

#[tokio::test]
async fn the_admin_address_serves_health_and_metrics_and_the_main_one_only_liveness() {
    let app = TestApp::spawn(&["--auth-secret", SECRET, "--admin-bind", "127.0.0.1:0"]).await;
    let admin = app.admin_addr.expect("an admin address");
    let detailed: Value = app
        .http
        .get(format!("http://{admin}/health"))
        .send()
        .await
        .expect("HTTP works")
        .json()
        .await
        .expect("JSON");
    assert_eq!(detailed["status"], "ok");
    assert!(detailed["connections"].is_u64(), "{detailed}");
    let metrics = app
        .http
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .expect("HTTP works");
    assert!(metrics.status() == 200 || metrics.status() == 404);
    let (_, liveness) = json(get(&app, "/health", None).await).await;
    assert_eq!(liveness, json!({"status": "ok"}));
    let (status, body) = json(get(&app, "/metrics", None).await).await;
    assert_eq!((status, &body["code"]), (401, &json!("missing_token")));
}

async fn allowed_origin(app: &TestApp, origin: &str) -> Option<String> {
    let response = app
        .http
        .get(app.url("/health"))
        .header("Origin", origin)
        .send()
        .await
        .expect("HTTP works");
    response
        .headers()
        .get("access-control-allow-origin")
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned)
}

#[tokio::test]
async fn cors_allows_loopback_pages_without_auth_and_only_the_configured_ones_with_it() {
    let open = TestApp::spawn(&[]).await;
    // The first Python system's React page, on its own development server.
    assert_eq!(
        allowed_origin(&open, "http://localhost:3000")
            .await
            .as_deref(),
        Some("http://localhost:3000")
    );
    assert_eq!(
        allowed_origin(&open, "https://anywhere.example").await,
        None
    );

    let closed = TestApp::spawn(AUTH).await;
    assert_eq!(
        allowed_origin(&closed, "https://anywhere.example").await,
        None
    );

    let configured = TestApp::spawn(&[
        "--auth-secret",
        SECRET,
        "--cors-origin",
        "https://chat.example.com",
        "--cors-origin",
        "http://localhost:3000",
    ])
    .await;
    assert_eq!(
        allowed_origin(&configured, "https://chat.example.com")
            .await
            .as_deref(),
        Some("https://chat.example.com")
    );
    assert_eq!(
        allowed_origin(&configured, "https://evil.example").await,
        None
    );
    let preflight = configured
        .http
        .request(
            reqwest::Method::OPTIONS,
            configured.url("/api/v1/clients/alice/messages"),
        )
        .header("Origin", "http://localhost:3000")
        .header("Access-Control-Request-Method", "GET")
        .header("Access-Control-Request-Headers", "authorization")
        .send()
        .await
        .expect("HTTP works");
    let allowed = preflight
        .headers()
        .get("access-control-allow-headers")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    assert!(allowed.contains("authorization"), "{allowed}");

    let wildcard = TestApp::spawn(&["--auth-secret", SECRET, "--cors-origin", "*"]).await;
    assert_eq!(
        allowed_origin(&wildcard, "https://anywhere.example")
            .await
            .as_deref(),
        Some("*")
    );
}

#[tokio::test]
async fn without_auth_kaiwa_refuses_to_listen_beyond_loopback_unless_told_to() {
    let dir = tempfile::tempdir().expect("a directory");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_kaiwa"))
        .args(["serve", "--bind", "0.0.0.0:0", "--data-dir"])
        .arg(dir.path())
        .env_remove("KAIWA_AUTH_SECRET")
        .env_remove("KAIWA_AUTH_SECRET_FILE")
        .env_remove("KAIWA_ALLOW_ANONYMOUS")
        .output()
        .expect("kaiwa runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--allow-anonymous") && stderr.contains("--auth-secret"),
        "{stderr}"
    );

    let app = TestApp::spawn(&["--bind", "0.0.0.0:0", "--allow-anonymous"]).await;
    let url = format!("http://127.0.0.1:{}/health", app.addr.port());
    let health: Value = app
        .http
        .get(url)
        .send()
        .await
        .expect("HTTP works")
        .json()
        .await
        .expect("JSON");
    assert_eq!(health["status"], "ok");
}

#[tokio::test]
async fn kaiwa_token_prints_a_token_the_server_takes() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_kaiwa"))
        .args(["token", "--client-id", "carol", "--ttl", "1h"])
        .env("KAIWA_AUTH_SECRET", SECRET)
        .env_remove("KAIWA_AUTH_SECRET_FILE")
        .output()
        .expect("kaiwa runs");
    assert!(output.status.success(), "{output:?}");
    let printed = String::from_utf8(output.stdout).expect("text");
    let token = printed.trim();
    assert_eq!(token.split('.').count(), 3, "{token}");

    // The test server's clock is behind the system's: a token made now is good there.
    let app = TestApp::spawn(AUTH).await;
    let mut client = native(
        &app,
        json!({"type": "hello", "token": token, "timezone": "UTC"}),
    )
    .await;
    assert_eq!(client.next_json().await["client_id"], "carol");

    let output = std::process::Command::new(env!("CARGO_BIN_EXE_kaiwa"))
        .args(["token", "--client-id", "carol"])
        .env_remove("KAIWA_AUTH_SECRET")
        .env_remove("KAIWA_AUTH_SECRET_FILE")
        .output()
        .expect("kaiwa runs");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--auth-secret"));
}

#[test]
fn a_dot_env_is_read_from_the_working_directory_only() {
    let project = tempfile::tempdir().expect("a temporary directory");
    std::fs::write(
        project.path().join(".env"),
        format!("KAIWA_AUTH_SECRET={SECRET}\n"),
    )
    .expect("written");
    let below = project.path().join("somewhere-below");
    std::fs::create_dir(&below).expect("a directory");
    let token = |dir: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_kaiwa"))
            .args(["token", "--client-id", "carol"])
            .current_dir(dir)
            .env_remove("KAIWA_AUTH_SECRET")
            .env_remove("KAIWA_AUTH_SECRET_FILE")
            .output()
            .expect("kaiwa runs")
    };
    assert!(token(project.path()).status.success(), "read where it is");
    let below = token(&below);
    assert!(
        !below.status.success(),
        "a parent's .env was read: {below:?}"
    );
    // A line that does not parse is named by where it breaks, never shown.
    std::fs::write(
        project.path().join(".env"),
        "KAIWA_AUTH_SECRET='unterminated-secret-value\n",
    )
    .expect("written");
    let broken = token(project.path());
    assert!(!broken.status.success());
    let printed = String::from_utf8_lossy(&broken.stderr);
    assert!(printed.contains(".env"), "{printed}");
    assert!(!printed.contains("unterminated-secret-value"), "{printed}");
}

#[tokio::test]
async fn the_api_is_described_by_an_openapi_document_that_fits_the_configuration() {
    let open = TestApp::spawn(&[]).await;
    let (status, document) = open.get_json("/api/openapi.json").await;
    assert_eq!(status, 200);
    assert_eq!(document["openapi"], "3.1.0");
    for path in [
        "/chat-history/{client_id}",
        "/api/v1/clients/{client_id}/messages",
        "/health",
        "/metrics",
        "/media/{folder}/{file}",
        "/media/replies/voice/{file}",
        "/media/replies/image/{file}",
        "/",
        "/index.html",
        "/assets/{file}",
        "/ws",
        "/api/openapi.json",
    ] {
        assert!(
            document["paths"][path]["get"].is_object(),
            "{path} is documented"
        );
    }
    let history = &document["paths"]["/chat-history/{client_id}"]["get"];
    assert!(
        history["security"].is_null(),
        "no auth, no security: {history}"
    );

    let closed = TestApp::spawn(AUTH).await;
    let (_, document) = closed.get_json("/api/openapi.json").await;
    let history = &document["paths"]["/chat-history/{client_id}"]["get"];
    assert_eq!(history["security"], json!([{"client_token": []}]));
    assert_eq!(
        document["components"]["securitySchemes"]["client_token"]["bearerFormat"],
        "JWT"
    );
}

/// The database URL with a password in it, and the password: the test's own if it has one,
/// else one added (the machine's PostgreSQL trusts local connections and ignores it).
fn with_password(url: &str) -> (String, String) {
    let (scheme, rest) = url.split_once("://").expect("a URL");
    let (userinfo, host) = rest.split_once('@').expect("a user");
    match userinfo.split_once(':') {
        Some((_, password)) => (url.to_owned(), password.to_owned()),
        None => {
            let password = "db-password-that-must-never-be-logged".to_owned();
            (format!("{scheme}://{userinfo}:{password}@{host}"), password)
        }
    }
}

#[tokio::test]
async fn a_full_run_never_logs_a_token_a_secret_or_the_database_password() {
    let database = support::postgres::TestDatabase::create().await;
    let (database_url, password) = with_password(&database.url);
    let dir = tempfile::tempdir().expect("a directory");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    let addr = format!("127.0.0.1:{port}");
    let stdout = std::fs::File::create(dir.path().join("stdout.txt")).expect("a file");
    let stderr = std::fs::File::create(dir.path().join("stderr.txt")).expect("a file");
    let data_dir = dir.path().join("data");
    let mut server = std::process::Command::new(env!("CARGO_BIN_EXE_kaiwa"))
        .args([
            "serve",
            "--bind",
            &addr,
            "--log",
            "trace",
            "--reply-delay-scale",
            "0",
        ])
        .args(["--auth-leeway", "0", "--auth-refresh-grace", "1"])
        .arg("--data-dir")
        .arg(&data_dir)
        .env("KAIWA_AUTH_SECRET", SECRET)
        .env("KAIWA_ADMIN_TOKEN", ADMIN)
        .env("KAIWA_DATABASE_URL", &database_url)
        // The binary judges windows by the system's clock: text open all day, so the replies
        // this test waits for come at any hour it runs (UTC's default text window closes
        // from 00:00 to 05:00).
        .env("KAIWA_TEXT_WINDOW", "00:00-24:00")
        .env("KAIWA_OPENAI_API_KEY", "")
        .env_remove("DATABASE_URL")
        .env_remove("OPENAI_API_KEY")
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .expect("kaiwa starts");
    let app_url = |path: &str| format!("http://{addr}{path}");
    let http = reqwest::Client::new();
    let mut up = false;
    for _ in 0..200 {
        if http
            .get(app_url("/health"))
            .send()
            .await
            .is_ok_and(|response| response.status() == 200)
        {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(up, "kaiwa answers /health");

    // The binary runs on the system's clock.
    let now = chrono::Utc::now();
    let good = token(SECRET, "alice", HOUR, now);
    let fresh = token(SECRET, "alice", HOUR * 2, now);
    let short = token(SECRET, "alice", Duration::from_secs(2), now);
    let refused_tokens = [
        token(SECRET, "alice", HOUR, now - chrono::TimeDelta::hours(3)),
        token(OTHER_SECRET, "alice", HOUR, now),
        token_for(SECRET, "elsewhere", "alice", HOUR, now),
        token(SECRET, "bob", HOUR, now),
    ];
    let ws = format!("ws://{addr}/ws");

    let mut client = Client::connect(&ws, true).await.expect("connects");
    client
        .send_json(json!({"type": "hello", "token": good, "timezone": "UTC"}))
        .await;
    client.next_json().await;
    client.send_json(send("m1", "text", "hello")).await;
    client.until(|frame| frame["type"] == "reply").await;
    client
        .send_json(json!({"type": "refresh", "token": fresh}))
        .await;
    client.until(|frame| frame["type"] == "refreshed").await;
    client.close().await;

    let mut client = Client::connect(&format!("{ws}?token={good}"), false)
        .await
        .expect("connects");
    client.send_json(json!({"timezone": "UTC"})).await;
    client.next_json().await;
    client
        .send_json(support::legacy_message("text", "hi"))
        .await;
    client.until(|frame| frame["type"] == "message").await;
    client.close().await;

    let bearer = format!("Bearer {good}");
    let mut client = Client::connect_with(&ws, true, &[("Authorization", &bearer)])
        .await
        .expect("connects");
    client
        .send_json(json!({"type": "hello", "timezone": "UTC"}))
        .await;
    client.next_json().await;
    client.close().await;

    for bad in &refused_tokens {
        let mut client = Client::connect(&ws, true).await.expect("connects");
        client
            .send_json(
                json!({"type": "hello", "client_id": "alice", "token": bad, "timezone": "UTC"}),
            )
            .await;
        client.closed().await;
        let response = http
            .get(app_url("/chat-history/alice"))
            .bearer_auth(bad)
            .send()
            .await
            .expect("HTTP works");
        assert!(response.status() == 401 || response.status() == 403);
    }

    let mut client = Client::connect(&ws, true).await.expect("connects");
    client
        .send_json(json!({"type": "hello", "token": short, "timezone": "UTC"}))
        .await;
    assert_eq!(client.closed().await.code, 4603);

    for (path, token) in [
        ("/chat-history/alice", good.as_str()),
        ("/api/v1/clients/alice/messages", good.as_str()),
        ("/metrics", ADMIN),
        ("/metrics", "a-wrong-admin-token-guess"),
        ("/health", ADMIN),
    ] {
        http.get(app_url(path))
            .bearer_auth(token)
            .send()
            .await
            .expect("HTTP works");
    }

    let stopped = std::process::Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(stopped.success());
    let status = tokio::task::spawn_blocking(move || server.wait())
        .await
        .expect("waited")
        .expect("kaiwa exits");
    assert!(status.success(), "{status:?}");

    let mut logs = String::new();
    for name in ["stdout.txt", "stderr.txt"] {
        logs.push_str(&std::fs::read_to_string(dir.path().join(name)).expect("output"));
    }
    for file in support::files_under(&data_dir.join("logs")) {
        logs.push_str(
            &std::fs::read_to_string(data_dir.join("logs").join(file)).expect("a log file"),
        );
    }
    assert!(logs.contains("auth is on"), "the run logged");
    assert!(
        logs.contains("token expired and not refreshed"),
        "the run logged"
    );
    let mut never = vec![
        SECRET.to_owned(),
        ADMIN.to_owned(),
        password,
        good.clone(),
        fresh.clone(),
        short.clone(),
    ];
    never.extend(refused_tokens.iter().cloned());
    // A token's signature alone would do as much harm as the token.
    let signatures: Vec<String> = never
        .iter()
        .filter_map(|token| {
            token
                .rsplit_once('.')
                .map(|(_, signature)| signature.to_owned())
        })
        .collect();
    never.extend(signatures);
    for secret in &never {
        // Says where, with the secret itself cut out.
        let line = logs.lines().find(|line| line.contains(secret.as_str()));
        assert!(
            line.is_none(),
            "the logs hold a secret: {}",
            line.unwrap_or_default()
                .replace(secret.as_str(), "<SECRET>")
                .chars()
                .take(400)
                .collect::<String>()
        );
    }
}
