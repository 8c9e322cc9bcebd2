//! `kaiwa backup` and `kaiwa restore` with the real binary: a server on SQLite under load
//! (kaiwa-load, and clients of the test's own that note every ack), a backup taken while the
//! load goes on, restored into a fresh data directory, and a kaiwa started on it; and the
//! procedure README gives for PostgreSQL (pg_dump, the media directory, pg_restore), run as
//! written there.

mod support;

use kaiwa_load::plan::Mix;
use kaiwa_load::{LoadConfig, Mode};
use kaiwa_protocol::history::{HistoryMessage, HistoryPage};
use kaiwa_protocol::{MessageStatus, MessageType, ReplyType};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::{files, isolated, native_at, send, send_file, serve_command, start_listening};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Every type accepted at any hour, so that kaiwa-load's clients in random timezones and the
/// test's own send all four; replies after a short delay, so that some are still to come when
/// the backup is taken.
fn flags() -> Vec<&'static str> {
    let delays_and_room = ["--reply-delay-scale", "0.05", "--max-clients", "100"];
    [support::ANY_HOUR.as_slice(), &delays_and_room].concat()
}

/// A message a client of the test sent, as its ack came back.
#[derive(Debug, Clone)]
struct Acked {
    client_id: String,
    message_id: i64,
    kind: MessageType,
    /// The text, or the file's bytes.
    sent: Vec<u8>,
    at: Instant,
}

/// Sends text, image, voice and video messages in turn, each after the last one's ack, until
/// `stop`, noting each ack.
async fn keep_sending(
    addr: SocketAddr,
    client_id: String,
    acked: Arc<Mutex<Vec<Acked>>>,
    stop: CancellationToken,
) {
    let mut client = native_at(addr, &client_id).await;
    for n in 0u32.. {
        if stop.is_cancelled() {
            break;
        }
        let id = format!("m{n}");
        let (kind, frame, sent) = match n % 4 {
            0 => {
                let text = format!("{client_id} says {n}");
                let frame = send(&id, "text", &text);
                (MessageType::Text, frame, text.into_bytes())
            }
            1 => {
                // A picture of its own for each message, so a file served for another is seen.
                let png = kaiwa::replies::image::render(i64::from(n));
                let frame = send_file(&id, "image", "picture.png", &png);
                (MessageType::Image, frame, png)
            }
            2 => {
                let wav = files::wav();
                (
                    MessageType::Voice,
                    send_file(&id, "voice", "note.wav", &wav),
                    wav,
                )
            }
            _ => {
                let mut mp4 = files::mp4();
                mp4.extend_from_slice(&n.to_be_bytes());
                (
                    MessageType::Video,
                    send_file(&id, "video", "clip.mp4", &mp4),
                    mp4,
                )
            }
        };
        client.send_json(frame).await;
        let ack = client
            .until(|frame| frame["type"] == "ack" && frame["id"] == id.as_str())
            .await;
        assert_eq!(ack["status"], "accepted", "{ack}");
        acked.lock().expect("the ledger").push(Acked {
            client_id: client_id.clone(),
            message_id: ack["message_id"].as_i64().expect("a message id"),
            kind,
            sent,
            at: Instant::now(),
        });
    }
    client.close().await;
}

/// GET `path` from a server: its status and body.
async fn get(http: &reqwest::Client, addr: SocketAddr, path: &str) -> (u16, Vec<u8>) {
    let response = http
        .get(format!("http://{addr}{path}"))
        .send()
        .await
        .expect("HTTP works");
    let status = response.status().as_u16();
    (status, response.bytes().await.expect("a body").to_vec())
}

/// A client's whole history on a server, by message id, through the cursor API.
async fn history(
    http: &reqwest::Client,
    addr: SocketAddr,
    client_id: &str,
) -> BTreeMap<i64, HistoryMessage> {
    let mut messages = BTreeMap::new();
    let mut before = String::new();
    loop {
        let path = format!("/api/v1/clients/{client_id}/messages?limit=100&before={before}");
        let (status, body) = get(http, addr, &path).await;
        assert_eq!(status, 200, "{path}: {}", String::from_utf8_lossy(&body));
        let page: HistoryPage = serde_json::from_slice(&body).expect("a history page");
        messages.extend(page.messages.into_iter().map(|m| (m.id, m)));
        match page.next_cursor {
            Some(cursor) => before = cursor,
            None => return messages,
        }
    }
}

/// The replies each type gets (R8).
fn reply_types(kind: MessageType) -> Vec<ReplyType> {
    match kind {
        MessageType::Text => vec![ReplyType::Text],
        MessageType::Voice => vec![ReplyType::Text, ReplyType::Voice],
        MessageType::Video | MessageType::Image => {
            vec![ReplyType::Text, ReplyType::Voice, ReplyType::Image]
        }
    }
}

/// Runs `kaiwa ARGS` to its end in `dir`; panics with its output unless it succeeds.
async fn kaiwa(dir: &Path, args: &[&str]) -> String {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_kaiwa"));
    command.args(args);
    isolated(&mut command, dir).stderr(std::process::Stdio::piped());
    let output = command.output().await.expect("kaiwa runs");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "kaiwa {args:?}: {said}");
    said
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_under_load_restores_every_message_acked_before_it_with_its_replies_and_files() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let source_dir = dir.path().join("source");
    let mut command = serve_command(&source_dir);
    command.args(["--bind", "127.0.0.1:0"]).args(flags());
    let mut source = start_listening("source", &mut command, dir.path()).await;
    let http = reqwest::Client::new();

    // The load: kaiwa-load's clients at a steady rate, and four of the test's own.
    let load = tokio::spawn(kaiwa_load::run(LoadConfig {
        scenario: "backup".into(),
        label: None,
        urls: vec![format!("ws://{}/ws", source.addr)],
        mode: Mode::Native,
        clients: 8,
        messages: None,
        duration: Some(Duration::from_secs(8)),
        rate: Some(120.0),
        window: 32,
        mix: Mix::spec(),
        seed: 22,
        drain_timeout: Duration::from_secs(20),
        timeout: Duration::from_secs(90),
        progress: false,
        reconnect: false,
        auth: None,
    }));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let stop = CancellationToken::new();
    let writers: Vec<_> = (0..4)
        .map(|i| {
            tokio::spawn(keep_sending(
                source.addr,
                format!("tracked-{i}"),
                acked.clone(),
                stop.clone(),
            ))
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked.lock().expect("the ledger").len() < 40 {
        assert!(Instant::now() < deadline, "the load got no acks");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The backup, while both go on.
    let began = Instant::now();
    let before: Vec<Acked> = acked.lock().expect("the ledger").clone();
    let backup_dir = dir.path().join("backup");
    let said = kaiwa(
        dir.path(),
        &[
            "backup",
            "--data-dir",
            source_dir.to_str().expect("UTF-8"),
            "--to",
            backup_dir.to_str().expect("UTF-8"),
        ],
    )
    .await;
    let ended = Instant::now();
    let during = acked
        .lock()
        .expect("the ledger")
        .iter()
        .filter(|a| a.at > began && a.at < ended)
        .count();
    assert!(
        during > 0,
        "no message was acked while the backup ran: {said}"
    );
    eprintln!(
        "{} messages of the test's clients acked before the backup, {during} while it ran ({:?}): {said}",
        before.len(),
        ended - began
    );
    stop.cancel();
    for writer in writers {
        writer.await.expect("a writer ran");
    }
    let summary = load
        .await
        .expect("kaiwa-load ran")
        .expect("kaiwa-load completes");
    assert!(
        summary.ok,
        "the backup disturbed nothing: {}",
        summary.table()
    );
    let mut backed_up = support::files_under(&backup_dir);
    backed_up.retain(|path| !path.starts_with("media"));
    assert_eq!(
        backed_up,
        [Path::new("kaiwa.db")],
        "one file, no WAL: {said}"
    );

    // Restored into a fresh data directory, and served.
    let restored_dir = dir.path().join("restored");
    kaiwa(
        dir.path(),
        &[
            "restore",
            "--from",
            backup_dir.to_str().expect("UTF-8"),
            "--data-dir",
            restored_dir.to_str().expect("UTF-8"),
        ],
    )
    .await;
    let mut command = serve_command(&restored_dir);
    command.args(["--bind", "127.0.0.1:0"]).args(flags());
    let restored = start_listening("restored", &mut command, dir.path()).await;

    // Every message acked before the backup began is there, with its file. Those still
    // waiting for replies when it was taken get them now: the restored kaiwa recovers them.
    for message in &before {
        let what = format!("{} message {}", message.client_id, message.message_id);
        let stored = history(&http, restored.addr, &message.client_id)
            .await
            .remove(&message.message_id)
            .unwrap_or_else(|| panic!("{what} is not in the backup"));
        assert_eq!(stored.message_type, message.kind, "{what}");
        if message.kind == MessageType::Text {
            assert_eq!(stored.content.as_bytes(), message.sent, "{what}");
        } else {
            let (status, body) = get(&http, restored.addr, &stored.content).await;
            assert_eq!(status, 200, "{what}: {}", stored.content);
            assert!(body == message.sent, "{what}: another file");
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    for message in &before {
        let what = format!("{} message {}", message.client_id, message.message_id);
        let stored = loop {
            let stored = history(&http, restored.addr, &message.client_id)
                .await
                .remove(&message.message_id)
                .expect("still there");
            if stored.status == MessageStatus::Replied {
                break stored;
            }
            assert!(
                Instant::now() < deadline,
                "{what} is never replied: {stored:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let mut types: Vec<ReplyType> = stored.replies.iter().map(|r| r.reply_type).collect();
        types.sort_by_key(|t| reply_types(message.kind).iter().position(|e| e == t));
        assert_eq!(types, reply_types(message.kind), "{what}");
        for reply in stored
            .replies
            .iter()
            .filter(|r| r.reply_type != ReplyType::Text)
        {
            let (status, _) = get(&http, restored.addr, &reply.content).await;
            assert_eq!(status, 200, "{what}: {}", reply.content);
        }
    }

    // The backup is one moment of the source: each client's messages up to the last one in
    // it, none missing, none changed (the source went on past it).
    let run_id = summary.run_id.clone().expect("the run's id");
    let clients = (0..8)
        .map(|i| format!("load-{run_id}-{i}"))
        .chain((0..4).map(|i| format!("tracked-{i}")));
    let mut newest_backed_up = 0;
    let mut newest_in_source = 0;
    let mut copies = Vec::new();
    for client in clients {
        let kept = history(&http, restored.addr, &client).await;
        let all = history(&http, source.addr, &client).await;
        newest_backed_up = newest_backed_up.max(kept.keys().max().copied().unwrap_or(0));
        newest_in_source = newest_in_source.max(all.keys().max().copied().unwrap_or(0));
        copies.push((client, kept, all));
    }
    assert!(
        newest_in_source > newest_backed_up,
        "the load went on past the backup"
    );
    for (client, kept, all) in copies {
        let expected: Vec<_> = all
            .range(..=newest_backed_up)
            .map(|(id, m)| (*id, m))
            .collect();
        assert_eq!(
            kept.len(),
            expected.len(),
            "{client}: messages up to {newest_backed_up}"
        );
        for ((id, copy), (_, original)) in kept.iter().zip(expected) {
            assert_eq!(
                (
                    id,
                    &copy.client_message_id,
                    &copy.content,
                    copy.message_type
                ),
                (
                    &original.id,
                    &original.client_message_id,
                    &original.content,
                    original.message_type
                ),
                "{client}"
            );
        }
    }
    source.child.kill().await.ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgresql_the_documented_dump_and_media_copy_restore_the_history_and_files() {
    let app = support::TestApp::spawn_postgres(&flags()).await;
    let mut client = app.native("pg-client", "UTC").await;
    let png = kaiwa::replies::image::render(7);
    let mut mp4 = files::mp4();
    mp4.extend_from_slice(b"one of a kind");
    let sent = [
        (
            MessageType::Text,
            send("t", "text", "kept in PostgreSQL"),
            b"kept in PostgreSQL".to_vec(),
        ),
        (
            MessageType::Image,
            send_file("i", "image", "p.png", &png),
            png.clone(),
        ),
        (
            MessageType::Voice,
            send_file("v", "voice", "n.wav", &files::wav()),
            files::wav(),
        ),
        (
            MessageType::Video,
            send_file("c", "video", "c.mp4", &mp4),
            mp4.clone(),
        ),
    ];
    for (_, frame, _) in &sent {
        let id = frame["id"].as_str().expect("an id").to_owned();
        client.send_json(frame.clone()).await;
        client
            .until(|f| f["type"] == "status" && f["id"] == id.as_str() && f["status"] == "replied")
            .await;
    }

    // The procedure, with the server running: the dump first, then the media directory.
    let backup = tempfile::tempdir().expect("a temporary directory");
    let dump = backup.path().join("kaiwa.dump");
    let dump = dump.to_str().expect("UTF-8");
    let url = app.database_url().expect("PostgreSQL");
    let postgres_tool = |program: &str, args: &[&str]| {
        support::tool(program, args, "postgresql-client", "");
    };
    // As README documents it: `cp -a FROM/media/. TO/media/`.
    let copy_media = |from: &Path, to: &Path| {
        let media = |dir: &Path| format!("{}/media/", dir.display());
        support::tool(
            "cp",
            &["-a", &format!("{}.", media(from)), &media(to)],
            "coreutils",
            "",
        );
    };
    postgres_tool(
        "pg_dump",
        &["--format=custom", &format!("--file={dump}"), url],
    );
    copy_media(app.data_dir(), backup.path());

    // Restored into a new database and a new data directory, and served.
    let database = Arc::new(support::postgres::TestDatabase::create().await);
    postgres_tool(
        "pg_restore",
        &["--no-owner", &format!("--dbname={}", database.url), dump],
    );
    let data_dir = tempfile::tempdir().expect("a temporary directory");
    copy_media(backup.path(), data_dir.path());
    let restored = support::TestApp::spawn_on(data_dir, database, &flags()).await;

    let http = reqwest::Client::new();
    let kept = history(&http, restored.addr, "pg-client").await;
    assert_eq!(kept.len(), sent.len());
    for ((kind, _, bytes), stored) in sent.iter().zip(kept.values()) {
        assert_eq!(stored.message_type, *kind);
        assert_eq!(stored.status, MessageStatus::Replied);
        let mut types: Vec<ReplyType> = stored.replies.iter().map(|r| r.reply_type).collect();
        types.sort_by_key(|t| reply_types(*kind).iter().position(|e| e == t));
        assert_eq!(types, reply_types(*kind), "{stored:?}");
        if *kind == MessageType::Text {
            assert_eq!(stored.content.as_bytes(), bytes);
        } else {
            let (status, body) = get(&http, restored.addr, &stored.content).await;
            assert_eq!(status, 200, "{}", stored.content);
            assert!(body == *bytes, "{}: another file", stored.content);
        }
    }
}
