//! The whole server on PostgreSQL: a representative set of what the SQLite suite checks
//! (handshakes, replies of every type, history, a restart losing nothing, exact resume), and
//! the faults only a database server has: refused at start, lost while running, a schema from a
//! newer kaiwa. Each test has a database of its own on the server the tests use.

mod support;

use serde_json::{Value, json};
use std::process::Stdio;
use std::time::Duration;
use support::postgres::TestDatabase;
use support::{TestApp, eventually, files, legacy_file, legacy_message, send, send_file};

#[tokio::test]
async fn both_protocols_connect_and_get_their_replies_on_postgres() {
    let app = TestApp::spawn_postgres(&[]).await;
    let mut legacy = app.legacy("old-client", "UTC").await;
    legacy.send_json(legacy_message("text", "hello")).await;
    let reply = legacy.next_json().await;
    assert_eq!(reply["data"]["reply_type"], "text", "{reply}");
    legacy
        .send_json(legacy_file("voice", "note.wav", &files::wav()))
        .await;
    let types: Vec<Value> = vec![
        legacy.next_json().await["data"]["reply_type"].clone(),
        legacy.next_json().await["data"]["reply_type"].clone(),
    ];
    assert_eq!(types, [json!("text"), json!("voice")]);

    let mut native = app.native("new-client", "UTC").await;
    native
        .send_json(send_file("img", "image", "a.png", &files::png()))
        .await;
    let ack = native.until(|f| f["type"] == "ack").await;
    assert_eq!(ack["status"], "accepted");
    let mut replies = Vec::new();
    while replies.len() < 3 {
        let frame = native.until(|f| f["type"] == "reply").await;
        replies.push((frame["seq"].clone(), frame["reply"]["reply_type"].clone()));
    }
    assert_eq!(
        replies,
        [
            (json!(1), json!("text")),
            (json!(2), json!("voice")),
            (json!(3), json!("image"))
        ]
    );
    // Outside its window (09:00 UTC), video is stored as rejected with the reason.
    native
        .send_json(send_file("vid", "video", "v.mp4", &files::mp4()))
        .await;
    let rejected = native.until(|f| f["type"] == "ack").await;
    assert_eq!(rejected["status"], "rejected", "{rejected}");
}

#[tokio::test]
async fn history_pages_by_cursor_and_by_offset_on_postgres() {
    let app = TestApp::spawn_postgres(&[]).await;
    let mut client = app.native("reader", "UTC").await;
    for n in 0..12 {
        let id = format!("m{n}");
        client.send_json(send(&id, "text", &id)).await;
        client
            .until(|f| f["type"] == "status" && f["status"] == "replied" && f["id"] == id.as_str())
            .await;
    }
    let mut seen = Vec::new();
    let mut path = "/api/v1/clients/reader/messages?limit=5".to_owned();
    loop {
        let (status, page) = app.get_json(&path).await;
        assert_eq!(status, 200, "{page}");
        for message in page["messages"].as_array().expect("messages") {
            seen.push(message["content"].as_str().expect("content").to_owned());
            assert_eq!(message["replies"][0]["reply_type"], "text");
        }
        match page["next_cursor"].as_str() {
            Some(cursor) => {
                path = format!("/api/v1/clients/reader/messages?limit=5&before={cursor}")
            }
            None => break,
        }
    }
    let expected: Vec<String> = (0..12).rev().map(|n| format!("m{n}")).collect();
    assert_eq!(seen, expected);
    let (_, legacy) = app.get_json("/chat-history/reader?limit=4&offset=8").await;
    assert_eq!(
        legacy["pagination"],
        json!({"total": 12, "offset": 8, "limit": 4, "has_more": false})
    );
    assert_eq!(legacy["data"][0]["content"], "m3");
}

#[tokio::test]
async fn a_restart_on_postgres_loses_nothing_and_resumes_exactly() {
    let app = TestApp::spawn_postgres(&[]).await;
    let mut client = app.native("keeper", "UTC").await;
    client.send_json(send("a", "text", "first")).await;
    let first = client.until(|f| f["type"] == "reply").await;
    assert_eq!(first["seq"], 1);
    client.received(1).await;
    client.send_json(send("b", "text", "second")).await;
    client.until(|f| f["type"] == "reply").await;
    // The client leaves having processed only the first reply.
    client.close().await;

    // Messages in flight at the stop are processed after the restart.
    let app = app
        .restart(&["--reply-delay-scale", "100", "--shutdown-grace", "0.05"])
        .await;
    let mut late = app.native_after("keeper", 2).await;
    // The status after the last reply the client had, which it left without reading.
    assert_eq!(
        late.next_json().await,
        json!({"type": "status", "id": "b", "message_id": 2, "status": "replied"})
    );
    assert_eq!(
        late.next_json().await,
        json!({"type": "synced", "replies": 0, "seq": 2})
    );
    late.send_json(send("c", "text", "answer me later")).await;
    assert_eq!(
        late.until(|f| f["type"] == "ack").await["status"],
        "accepted"
    );
    late.close().await;
    let (_, before) = app.get_json("/api/v1/clients/keeper/messages").await;

    let app = app.restart(&[]).await;
    let (_, after) = app.get_json("/api/v1/clients/keeper/messages").await;
    assert_eq!(after["messages"][1], before["messages"][1]);
    assert_eq!(after["messages"][2], before["messages"][2]);
    let mut back = app.native_after("keeper", 1).await;
    // The replay brings the second reply; the third comes when the restarted server has
    // processed the message it found unfinished, before or after the replay ends.
    let mut seqs = Vec::new();
    while seqs.len() < 2 {
        let frame = back.next_json().await;
        if frame["type"] == "reply" {
            seqs.push(frame["seq"].as_u64().expect("a seq"));
        }
    }
    assert_eq!(
        seqs,
        [2, 3],
        "the unacknowledged reply, then the one stored after the restart"
    );
    // A resend of an old id is still recognised.
    back.send_json(send("a", "text", "first")).await;
    let ack = back.until(|f| f["type"] == "ack").await;
    assert_eq!(ack["duplicate"], true);
}

#[tokio::test]
async fn the_database_lost_while_running_loses_nothing_acked_and_comes_back() {
    let app = TestApp::spawn_postgres(&["--requeue-after", "0.3"]).await;
    let url = app.database_url().expect("on PostgreSQL").to_owned();
    let database = url
        .rsplit('/')
        .next()
        .and_then(|last| last.split('?').next())
        .expect("a database name")
        .to_owned();
    let mut client = app.native("survivor", "UTC").await;
    let mut acked = Vec::new();
    let mut unavailable = 0;
    let cutter = tokio::spawn(async move {
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(150)).await;
            terminate_backends(&database).await;
        }
    });
    let mut n = 0;
    while !cutter.is_finished() || acked.len() < 20 {
        let id = format!("m{n}");
        client.send_json(send(&id, "text", &id)).await;
        let answer = client
            .until(|f| (f["type"] == "ack" || f["type"] == "error") && f["id"] == id.as_str())
            .await;
        match answer["type"].as_str() {
            Some("ack") => {
                assert_eq!(answer["status"], "accepted", "{answer}");
                acked.push(id);
                n += 1;
            }
            _ => {
                // Never an ack for what was not stored: told to retry, the same id goes again.
                assert!(
                    matches!(answer["code"].as_str(), Some("unavailable" | "internal")),
                    "{answer}"
                );
                unavailable += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    cutter.await.expect("joins");
    // Every acked message is stored once and replied, whatever the cuts did to its replies.
    let messages = eventually("every stored message replied", || async {
        let messages = all_messages(&app, "survivor").await?;
        messages
            .iter()
            .all(|m| m["status"] == "replied")
            .then_some(messages)
    })
    .await;
    let mut stored: Vec<String> = messages
        .iter()
        .map(|m| m["client_message_id"].as_str().expect("an id").to_owned())
        .collect();
    stored.sort();
    acked.sort();
    assert_eq!(stored, acked);
    assert_eq!(app.health().await["status"], "ok");
    eprintln!("{unavailable} sends were told to retry while the database was cut");
}

/// Every message of a client, all history pages read; `None` while the history cannot be read.
async fn all_messages(app: &TestApp, client_id: &str) -> Option<Vec<Value>> {
    let mut messages = Vec::new();
    let mut path = format!("/api/v1/clients/{client_id}/messages?limit=100");
    loop {
        let (status, page) = app.get_json(&path).await;
        if status != 200 {
            return None;
        }
        messages.extend(page["messages"].as_array()?.iter().cloned());
        match page["next_cursor"].as_str() {
            Some(cursor) => {
                path = format!("/api/v1/clients/{client_id}/messages?limit=100&before={cursor}")
            }
            None => return Some(messages),
        }
    }
}

/// Cuts every connection to `database`, as a database restart or a failover would.
async fn terminate_backends(database: &str) {
    use sqlx::Connection;
    let server = std::env::var("KAIWA_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let mut conn = sqlx::PgConnection::connect(&server)
        .await
        .expect("the server");
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()")
        .bind(database)
        .execute(&mut conn)
        .await
        .expect("terminated");
}

/// Runs the kaiwa binary with `args` and the environment cleared of kaiwa's settings; returns
/// its exit code and everything it printed.
async fn kaiwa(args: &[&str]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_kaiwa"));
    command
        .args(args)
        .current_dir(dir.path())
        .env_remove("DATABASE_URL")
        .env_remove("KAIWA_DATABASE_URL")
        .env_remove("OPENAI_API_KEY")
        .stdin(Stdio::null());
    let output = tokio::time::timeout(Duration::from_secs(30), command.output())
        .await
        .expect("kaiwa exits in time")
        .expect("kaiwa runs");
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code(), printed)
}

#[tokio::test]
async fn an_unknown_database_scheme_is_refused_without_showing_the_url() {
    let (code, printed) = kaiwa(&[
        "migrate",
        "--database-url",
        "mysql://admin:hunter2@db.example/chat",
    ])
    .await;
    assert_eq!(code, Some(1), "{printed}");
    assert!(
        printed.contains("unsupported database URL scheme \"mysql\""),
        "{printed}"
    );
    assert!(!printed.contains("hunter2"), "{printed}");
}

#[tokio::test]
async fn a_database_that_refuses_the_connection_stops_kaiwa_naming_the_host_not_the_password() {
    // Nothing listens on port 1.
    let (code, printed) = kaiwa(&[
        "serve",
        "--bind",
        "127.0.0.1:0",
        "--database-url",
        "postgres://kaiwa:hunter2@127.0.0.1:1/chat",
    ])
    .await;
    assert_eq!(code, Some(1), "{printed}");
    assert!(
        printed.contains("postgres://kaiwa@127.0.0.1:1/chat"),
        "{printed}"
    );
    assert!(printed.contains("could not connect"), "{printed}");
    assert!(!printed.contains("hunter2"), "{printed}");
}

#[tokio::test]
async fn a_schema_from_a_newer_kaiwa_is_refused_with_a_clear_message() {
    let database = TestDatabase::create().await;
    let (code, printed) = kaiwa(&["migrate", "--database-url", &database.url]).await;
    assert_eq!(code, Some(0), "{printed}");
    {
        let mut conn = database.connect().await;
        sqlx::query(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
             VALUES (29991231000000, 'from the future', true, '\\x00', 0)",
        )
        .execute(&mut conn)
        .await
        .expect("a migration this kaiwa does not know");
    }
    let (code, printed) = kaiwa(&[
        "serve",
        "--bind",
        "127.0.0.1:0",
        "--database-url",
        &database.url,
    ])
    .await;
    assert_eq!(code, Some(1), "{printed}");
    assert!(
        printed.contains("schema is newer than this kaiwa"),
        "{printed}"
    );
    assert!(printed.contains("29991231000000"), "{printed}");
}

#[tokio::test]
async fn two_processes_migrating_one_database_at_once_do_not_race() {
    let database = TestDatabase::create().await;
    let args = ["migrate", "--database-url", database.url.as_str()];
    let (first, second) = tokio::join!(kaiwa(&args), kaiwa(&args));
    assert_eq!(first.0, Some(0), "{}", first.1);
    assert_eq!(second.0, Some(0), "{}", second.1);
    let applied: Vec<&str> = [&first.1, &second.1]
        .iter()
        .filter_map(|printed| printed.split_whitespace().next())
        .collect();
    let mut counts: Vec<u32> = applied.iter().filter_map(|n| n.parse().ok()).collect();
    counts.sort_unstable();
    assert!(
        counts.len() == 2 && counts[0] == 0 && counts[1] > 0,
        "one applies the schema, the other finds it done: {counts:?}"
    );
}
