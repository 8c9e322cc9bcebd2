//! Bad input of every kind, in both protocols: each is answered with its exact error code or close
//! code, and wherever the connection should survive, the next valid message still gets its reply.

mod support;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use support::{
    Client, Closed, FRAME_TIMEOUT, TestApp, files, files_under, legacy_file, legacy_message, send,
    send_file,
};
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;

/// Flags small enough that a 1 MiB frame is far over the frame limit (about 65 KiB + base64 of
/// 1 KiB).
const SMALL_LIMITS: &[&str] = &[
    "--max-image-bytes",
    "1KiB",
    "--max-voice-bytes",
    "1KiB",
    "--max-video-bytes",
    "1KiB",
    "--max-text-chars",
    "100",
];

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Reads the next frame and checks it is a legacy error frame with `code`.
async fn expect_legacy_error(client: &mut Client, code: &str) -> Value {
    let frame = client.next_json().await;
    assert_eq!(frame["type"], "error", "expected a {code} error: {frame}");
    assert_eq!(frame["data"]["code"], code, "{frame}");
    assert!(
        frame["data"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "an error carries a readable message: {frame}"
    );
    frame
}

/// Reads the next frame and checks it is a native error frame with `code`.
async fn expect_native_error(client: &mut Client, code: &str) -> Value {
    let frame = client.next_json().await;
    assert_eq!(frame["type"], "error", "expected a {code} error: {frame}");
    assert_eq!(frame["code"], code, "{frame}");
    assert!(
        frame["message"].as_str().is_some_and(|m| !m.is_empty()),
        "an error carries a readable message: {frame}"
    );
    frame
}

/// Reads the error frame with `code` in the shape of the protocol; a native one must name the
/// message `id` it refuses.
async fn expect_error(client: &mut Client, native: bool, code: &str, id: &str) {
    let error = expect_error_frame(client, native, code).await;
    if native {
        assert_eq!(error["id"], id, "{error}");
    }
}

/// Reads the error frame with `code` in the shape of the protocol.
async fn expect_error_frame(client: &mut Client, native: bool, code: &str) -> Value {
    if native {
        expect_native_error(client, code).await
    } else {
        expect_legacy_error(client, code).await
    }
}

/// A client connected in either protocol, with the protocol's name appended to `client_id`.
async fn connect(app: &TestApp, native: bool, client_id: &str) -> Client {
    if native {
        app.native(&format!("{client_id}-native"), "UTC").await
    } else {
        app.legacy(&format!("{client_id}-legacy"), "UTC").await
    }
}

/// A message frame of either protocol; `id` is the native client message id.
fn message(native: bool, id: &str, message_type: &str, content: &str) -> Value {
    if native {
        send(id, message_type, content)
    } else {
        legacy_message(message_type, content)
    }
}

/// A base64 file frame of either protocol; `id` is the native client message id.
fn file(native: bool, id: &str, message_type: &str, filename: &str, bytes: &[u8]) -> Value {
    if native {
        send_file(id, message_type, filename, bytes)
    } else {
        legacy_file(message_type, filename, bytes)
    }
}

/// The connection still answers a valid text message.
async fn still_replies(client: &mut Client, native: bool) {
    if native {
        native_still_replies(client, "after").await;
    } else {
        legacy_still_replies(client).await;
    }
}

/// Sends a valid text message on a legacy connection and waits for its text reply.
async fn legacy_still_replies(client: &mut Client) {
    client
        .send_json(legacy_message("text", "are you still there?"))
        .await;
    let reply = client.next_json().await;
    assert_eq!(reply["type"], "message", "{reply}");
    assert_eq!(reply["data"]["reply_type"], "text", "{reply}");
    assert!(
        reply["data"]["id"].as_i64().is_some(),
        "a reply, not a rejection: {reply}"
    );
}

/// Sends a valid text message on a native connection and waits for its ack, its text reply and
/// its `replied` status.
async fn native_still_replies(client: &mut Client, id: &str) {
    client
        .send_json(send(id, "text", "are you still there?"))
        .await;
    let ack = client.next_json().await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["id"], id, "{ack}");
    assert_eq!(ack["status"], "accepted", "{ack}");
    let reply = client
        .until(|f| f["type"] == "reply" && f["id"] == id)
        .await;
    assert_eq!(reply["reply"]["reply_type"], "text", "{reply}");
    client
        .until(|f| f["type"] == "status" && f["id"] == id && f["status"] == "replied")
        .await;
}

async fn assert_healthy(app: &TestApp) {
    let health = app.health().await;
    assert_eq!(health["status"], "ok", "{health}");
}

/// The handshake refusal: an error frame with `code` (legacy or native shape), then close 1008.
async fn expect_refused(client: &mut Client, native: bool, code: &str) {
    expect_error_frame(client, native, code).await;
    let closed = client.closed().await;
    assert_eq!(closed.code, 1008, "{closed:?}");
    assert!(closed.reason.starts_with("bad_handshake"), "{closed:?}");
}

/// A connected client whose handshake frame is `hello`, refused with `code` and 1008.
async fn refused_handshake(app: &TestApp, native: bool, hello: Value, code: &str) {
    let mut client = Client::connect(&app.ws_url(), native)
        .await
        .expect("connects");
    client.send_json(hello).await;
    expect_refused(&mut client, native, code).await;
}

/// How a connection that never sent its handshake ends. A frame before the close, if any, must
/// be the `handshake_required` error.
async fn closed_after_handshake_required(client: &mut Client, native: bool) -> Closed {
    match client.next().await {
        Ok(frame) => {
            let code = if native {
                &frame["code"]
            } else {
                &frame["data"]["code"]
            };
            assert_eq!(frame["type"], "error", "{frame}");
            assert_eq!(code, "handshake_required", "{frame}");
            client.closed().await
        }
        Err(closed) => closed,
    }
}

/// A PNG (by its magic bytes) of `size` bytes.
fn png_of_size(size: usize) -> Vec<u8> {
    let mut bytes = files::png();
    bytes.resize(size.max(bytes.len()), 0);
    bytes
}

fn is_allowed_data_file(path: &Path) -> bool {
    let database = ["kaiwa.db", "kaiwa.db-wal", "kaiwa.db-shm", "kaiwa.lock"]
        .iter()
        .any(|name| path == Path::new(name));
    let media = ["media/images", "media/videos", "media/voices"]
        .iter()
        .any(|dir| path.starts_with(dir));
    database || media
}

// ---------------------------------------------------------------------------------------------
// Malformed JSON
// ---------------------------------------------------------------------------------------------

async fn malformed_json_is_an_error_and_the_connection_stays_usable(native: bool) {
    let app = TestApp::spawn(&[]).await;
    let mut client = connect(&app, native, "mal").await;
    let truncated = if native {
        r#"{"type": "send", "id": "m1","#
    } else {
        r#"{"message_type": "text","#
    };
    for bad in [truncated, "not json"] {
        client.send_text(bad).await;
        expect_error_frame(&mut client, native, "malformed_json").await;
    }
    still_replies(&mut client, native).await;
    assert_healthy(&app).await;
}

#[tokio::test]
async fn malformed_json_after_the_handshake_is_an_error_and_the_legacy_connection_stays_usable() {
    malformed_json_is_an_error_and_the_connection_stays_usable(false).await;
}

#[tokio::test]
async fn malformed_json_after_the_handshake_is_an_error_and_the_native_connection_stays_usable() {
    malformed_json_is_an_error_and_the_connection_stays_usable(true).await;
}

// ---------------------------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_legacy_message_before_the_handshake_is_refused_with_handshake_required_and_1008() {
    let app = TestApp::spawn(&[]).await;
    refused_handshake(
        &app,
        false,
        legacy_message("text", "hi"),
        "handshake_required",
    )
    .await;
    assert_healthy(&app).await;
}

#[tokio::test]
async fn a_native_send_before_hello_is_refused_with_handshake_required_and_1008() {
    let app = TestApp::spawn(&[]).await;
    refused_handshake(&app, true, send("m1", "text", "hi"), "handshake_required").await;
    assert_healthy(&app).await;
}

#[tokio::test]
async fn a_legacy_handshake_without_a_usable_client_id_is_refused_with_1008() {
    let app = TestApp::spawn(&[]).await;
    for hello in [
        json!({"timezone": "UTC"}),
        json!({"client_id": "", "timezone": "UTC"}),
        json!({"client_id": "   \t ", "timezone": "UTC"}),
    ] {
        refused_handshake(&app, false, hello, "missing_client_id").await;
    }
    assert_healthy(&app).await;
}

#[tokio::test]
async fn a_native_hello_without_a_usable_client_id_is_refused_with_1008() {
    let app = TestApp::spawn(&[]).await;
    for hello in [
        json!({"type": "hello", "timezone": "UTC"}),
        json!({"type": "hello", "client_id": "", "timezone": "UTC"}),
        json!({"type": "hello", "client_id": "   ", "timezone": "UTC"}),
    ] {
        refused_handshake(&app, true, hello, "missing_client_id").await;
    }
    assert_healthy(&app).await;
}

#[tokio::test]
async fn client_ids_that_are_not_one_plain_path_segment_are_refused_in_both_protocols() {
    let app = TestApp::spawn(&[]).await;
    for id in [".", "..", "\\..\\x", "%2e%2e%2f", "a b", "a/b", ".hidden"] {
        refused_handshake(
            &app,
            false,
            json!({"client_id": id, "timezone": "UTC"}),
            "invalid_client_id",
        )
        .await;
        refused_handshake(
            &app,
            true,
            json!({"type": "hello", "client_id": id, "timezone": "UTC"}),
            "invalid_client_id",
        )
        .await;
    }
    // Letters of any script, digits and the few marks ids are made of pass.
    for id in ["さくら", "user@example.com", "load-1_a.b~c+d:e=f"] {
        let mut client = connect(&app, true, id).await;
        native_still_replies(&mut client, "ok").await;
    }
    assert_healthy(&app).await;
}

async fn invalid_utf8_closes_with_1007(hello: &str) {
    let app = TestApp::spawn(&[]).await;
    let mut raw = support::raw::RawClient::connect(app.addr).await;
    raw.send_text(hello).await;
    raw.send_text_bytes(b"{\"message_type\": \"text\", \"content\": \"\xff\xfe\"}")
        .await;
    assert_eq!(raw.close_code().await, Some(1007));
    assert_healthy(&app).await;
}

#[tokio::test]
async fn invalid_utf8_in_a_legacy_text_frame_closes_with_1007() {
    invalid_utf8_closes_with_1007(r#"{"client_id": "bytes", "timezone": "UTC"}"#).await;
}

#[tokio::test]
async fn invalid_utf8_in_a_native_text_frame_closes_with_1007() {
    invalid_utf8_closes_with_1007(r#"{"type": "hello", "client_id": "bytes", "timezone": "UTC"}"#)
        .await;
}

#[tokio::test]
async fn invalid_utf8_in_the_handshake_frame_closes_with_1007() {
    let app = TestApp::spawn(&[]).await;
    let mut raw = support::raw::RawClient::connect(app.addr).await;
    raw.send_text_bytes(b"{\"client_id\": \"\xc3\x28\", \"timezone\": \"UTC\"}")
        .await;
    assert_eq!(raw.close_code().await, Some(1007));
    assert_healthy(&app).await;
}

#[tokio::test]
async fn a_heartbeat_of_the_wrong_shape_is_a_bad_frame_and_the_connection_stays_usable() {
    let app = TestApp::spawn(&[]).await;
    let mut client = connect(&app, false, "shapes").await;
    for wrong in [
        json!({"type": "heartbeat", "data": []}),
        json!({"type": "heartbeat", "data": "pong"}),
        json!({"type": "heartbeat", "data": {"message": 7}}),
    ] {
        client.send_json(wrong).await;
        expect_legacy_error(&mut client, "bad_frame").await;
    }
    legacy_still_replies(&mut client).await;
    let mut native = connect(&app, true, "native-shapes").await;
    native.send_json(json!({"type": "received"})).await;
    expect_native_error(&mut native, "bad_frame").await;
    native
        .send_json(json!({"type": "sync", "after": "yesterday"}))
        .await;
    expect_native_error(&mut native, "bad_frame").await;
    native_still_replies(&mut native, "after-shapes").await;
}

#[tokio::test]
async fn unknown_timezone_is_refused_with_1008_in_both_protocols() {
    let app = TestApp::spawn(&[]).await;
    refused_handshake(
        &app,
        false,
        json!({"client_id": "tz-legacy", "timezone": "Mars/Olympus_Mons"}),
        "unknown_timezone",
    )
    .await;
    refused_handshake(
        &app,
        true,
        json!({"type": "hello", "client_id": "tz-native", "timezone": "Mars/Olympus_Mons"}),
        "unknown_timezone",
    )
    .await;
    assert_healthy(&app).await;
}

#[tokio::test]
async fn a_valid_timezone_in_lower_case_is_accepted_with_its_canonical_name() {
    let app = TestApp::spawn(&[]).await;
    let (mut native, welcome) = app.native_with("tokyo-native", "asia/tokyo", false).await;
    assert_eq!(welcome["timezone"], "Asia/Tokyo", "{welcome}");
    native_still_replies(&mut native, "t1").await;

    // The legacy handshake asserts "Connected successfully".
    let mut legacy = app.legacy("tokyo-legacy", "asia/tokyo").await;
    legacy_still_replies(&mut legacy).await;
}

async fn silent_connection_closes_with_4004(native: bool) {
    let app = TestApp::spawn(&["--handshake-timeout", "0.3"]).await;
    let mut client = Client::connect(&app.ws_url(), native)
        .await
        .expect("connects");
    let closed = closed_after_handshake_required(&mut client, native).await;
    assert_eq!(closed.code, 4004, "{closed:?}");
    assert!(closed.reason.starts_with("handshake_timeout"), "{closed:?}");
    assert_healthy(&app).await;
}

#[tokio::test]
async fn a_silent_legacy_connection_is_closed_with_4004_after_the_handshake_timeout() {
    silent_connection_closes_with_4004(false).await;
}

#[tokio::test]
async fn a_silent_native_connection_is_closed_with_4004_after_the_handshake_timeout() {
    silent_connection_closes_with_4004(true).await;
}

// ---------------------------------------------------------------------------------------------
// Message content
// ---------------------------------------------------------------------------------------------

async fn unknown_message_type_is_an_error(native: bool) {
    let app = TestApp::spawn(&[]).await;
    let mut client = connect(&app, native, "sticker").await;
    client
        .send_json(message(native, "s1", "sticker", "🐱"))
        .await;
    expect_error(&mut client, native, "unknown_message_type", "s1").await;
    still_replies(&mut client, native).await;
    assert_healthy(&app).await;
}

#[tokio::test]
async fn unknown_message_type_is_an_error_and_the_legacy_connection_stays_usable() {
    unknown_message_type_is_an_error(false).await;
}

#[tokio::test]
async fn unknown_message_type_is_an_error_and_the_native_connection_stays_usable() {
    unknown_message_type_is_an_error(true).await;
}

async fn empty_and_blank_text_is_an_error(native: bool) {
    let app = TestApp::spawn(&[]).await;
    let mut client = connect(&app, native, "empty").await;
    for (id, text) in [("e1", ""), ("e2", "   \n\t ")] {
        client.send_json(message(native, id, "text", text)).await;
        expect_error(&mut client, native, "empty_text", id).await;
    }
    still_replies(&mut client, native).await;
    assert_healthy(&app).await;
}

#[tokio::test]
async fn empty_and_blank_text_is_an_error_and_the_legacy_connection_stays_usable() {
    empty_and_blank_text_is_an_error(false).await;
}

#[tokio::test]
async fn empty_and_blank_text_is_an_error_and_the_native_connection_stays_usable() {
    empty_and_blank_text_is_an_error(true).await;
}

/// The limit counts characters, not bytes: "あ" is three bytes in UTF-8.
async fn text_over_the_limit_is_an_error_but_text_at_the_limit_passes(native: bool) {
    let app = TestApp::spawn(&["--max-text-chars", "100"]).await;
    let mut client = connect(&app, native, "long").await;
    client
        .send_json(message(native, "long", "text", &"あ".repeat(101)))
        .await;
    expect_error(&mut client, native, "text_too_long", "long").await;

    client
        .send_json(message(native, "limit", "text", &"あ".repeat(100)))
        .await;
    if native {
        let ack = client.next_json().await;
        assert_eq!(ack["type"], "ack", "{ack}");
        assert_eq!(ack["id"], "limit", "{ack}");
        assert_eq!(ack["status"], "accepted", "{ack}");
        client
            .until(|f| f["type"] == "reply" && f["id"] == "limit")
            .await;
    } else {
        let reply = client.next_json().await;
        assert_eq!(reply["type"], "message", "{reply}");
        assert_eq!(reply["data"]["reply_type"], "text", "{reply}");
        assert!(reply["data"]["id"].as_i64().is_some(), "{reply}");
    }
    assert_healthy(&app).await;
}

#[tokio::test]
async fn text_over_the_limit_is_an_error_but_text_at_the_limit_passes_in_legacy() {
    text_over_the_limit_is_an_error_but_text_at_the_limit_passes(false).await;
}

#[tokio::test]
async fn text_over_the_limit_is_an_error_but_text_at_the_limit_passes_in_native() {
    text_over_the_limit_is_an_error_but_text_at_the_limit_passes(true).await;
}

// ---------------------------------------------------------------------------------------------
// Media
// ---------------------------------------------------------------------------------------------

async fn invalid_base64_is_an_error(native: bool) {
    let app = TestApp::spawn(&[]).await;
    let mut client = connect(&app, native, "b64").await;
    let mut frame = file(native, "b1", "image", "x.png", &[]);
    frame["content"] = "this is *not* base64!".into();
    client.send_json(frame).await;
    expect_error(&mut client, native, "invalid_base64", "b1").await;
    still_replies(&mut client, native).await;
    assert_healthy(&app).await;
}

#[tokio::test]
async fn invalid_base64_is_an_error_and_the_legacy_connection_stays_usable() {
    invalid_base64_is_an_error(false).await;
}

#[tokio::test]
async fn invalid_base64_is_an_error_and_the_native_connection_stays_usable() {
    invalid_base64_is_an_error(true).await;
}

async fn media_whose_bytes_or_extension_do_not_match_is_refused(native: bool) {
    let app = TestApp::spawn(&[]).await;
    let mut client = connect(&app, native, "mismatch").await;
    // PNG bytes declared as a voice message, then named as a JPEG.
    for (id, kind, name) in [("v1", "voice", "x.wav"), ("i1", "image", "x.jpg")] {
        client
            .send_json(file(native, id, kind, name, &files::png()))
            .await;
        expect_error(&mut client, native, "media_mismatch", id).await;
    }
    still_replies(&mut client, native).await;
    assert_healthy(&app).await;
}

#[tokio::test]
async fn media_whose_bytes_or_extension_do_not_match_is_refused_in_legacy() {
    media_whose_bytes_or_extension_do_not_match_is_refused(false).await;
}

#[tokio::test]
async fn media_whose_bytes_or_extension_do_not_match_is_refused_in_native() {
    media_whose_bytes_or_extension_do_not_match_is_refused(true).await;
}

const PATH_NAMES: [&str; 3] = ["../../x.png", "..\\x.png", "/etc/passwd.png"];

fn assert_nothing_written_outside_media(app: &TestApp) {
    let all = files_under(app.data_dir());
    assert!(
        all.iter().any(|path| path == Path::new("kaiwa.db")),
        "the listing sees the data directory: {all:?}"
    );
    let stray: Vec<_> = all
        .into_iter()
        .filter(|path| !is_allowed_data_file(path))
        .collect();
    assert!(
        stray.is_empty(),
        "files outside the database and media/{{images,videos,voices}}: {stray:?}"
    );
    // Nothing escaped the data directory either.
    let parent = app.data_dir().parent().expect("a parent directory");
    assert!(!parent.join("x.png").exists(), "x.png escaped the data dir");
}

#[tokio::test]
async fn path_filenames_are_refused_and_nothing_lands_outside_media_in_legacy() {
    let app = TestApp::spawn(&[]).await;
    let mut client = app.legacy("path-legacy", "UTC").await;
    for name in PATH_NAMES {
        client
            .send_json(legacy_file("image", name, &files::png()))
            .await;
        expect_legacy_error(&mut client, "invalid_filename").await;
    }
    legacy_still_replies(&mut client).await;
    assert_nothing_written_outside_media(&app);
    assert_healthy(&app).await;
}

#[tokio::test]
async fn path_filenames_are_refused_and_nothing_lands_outside_media_in_native() {
    let app = TestApp::spawn(&[]).await;
    let mut client = app.native("path-native", "UTC").await;
    for (n, name) in PATH_NAMES.into_iter().enumerate() {
        let id = format!("p{n}");
        client
            .send_json(send_file(&id, "image", name, &files::png()))
            .await;
        let error = expect_native_error(&mut client, "invalid_filename").await;
        assert_eq!(error["id"], id.as_str(), "{error}");
    }
    // The same names on a file that comes as a binary frame.
    for (n, name) in PATH_NAMES.into_iter().enumerate() {
        let id = format!("pb{n}");
        client
            .send_json(json!({"type": "send", "id": id, "message_type": "image", "filename": name, "binary": true}))
            .await;
        client.send_binary(files::png()).await;
        let error = expect_native_error(&mut client, "invalid_filename").await;
        assert_eq!(error["id"], id.as_str(), "{error}");
    }
    // A plain name is still accepted, and its file lands under media/images.
    client
        .send_json(send_file("plain", "image", "x.png", &files::png()))
        .await;
    let ack = client.next_json().await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["status"], "accepted", "{ack}");
    client
        .until(|f| f["type"] == "status" && f["id"] == "plain" && f["status"] == "replied")
        .await;
    native_still_replies(&mut client, "after").await;
    assert_nothing_written_outside_media(&app);
    let images = files_under(&app.data_dir().join("media/images"));
    assert_eq!(
        images.len(),
        1,
        "only the plain-named image is stored: {images:?}"
    );
    assert_healthy(&app).await;
}

/// Refuses a file over the 1 KiB image limit; a native client also sends one as a binary frame.
async fn media_over_its_size_limit_is_refused(native: bool) {
    let app = TestApp::spawn(&["--max-image-bytes", "1KiB"]).await;
    let mut client = connect(&app, native, "big").await;
    client
        .send_json(file(native, "big", "image", "big.png", &png_of_size(4096)))
        .await;
    expect_error(&mut client, native, "media_too_large", "big").await;
    if native {
        // Just over the limit, as a binary frame.
        client
            .send_json(json!({"type": "send", "id": "big-bin", "message_type": "image", "filename": "big.png", "binary": true}))
            .await;
        client.send_binary(png_of_size(1025)).await;
        expect_error(&mut client, native, "media_too_large", "big-bin").await;
    }
    still_replies(&mut client, native).await;
    assert_healthy(&app).await;
}

#[tokio::test]
async fn media_over_its_size_limit_is_refused_and_the_legacy_connection_stays_usable() {
    media_over_its_size_limit_is_refused(false).await;
}

#[tokio::test]
async fn media_over_its_size_limit_is_refused_and_the_native_connection_stays_usable() {
    media_over_its_size_limit_is_refused(true).await;
}

// ---------------------------------------------------------------------------------------------
// Frames
// ---------------------------------------------------------------------------------------------

/// Sends a 1 MiB text frame and expects close 1009; then a new client still gets replies.
async fn oversize_frame_closes_with_1009(native: bool) {
    let app = TestApp::spawn(SMALL_LIMITS).await;
    let mut client = if native {
        app.native("huge", "UTC").await
    } else {
        app.legacy("huge", "UTC").await
    };
    let huge = json!({"message_type": "text", "content": "x".repeat(1 << 20)}).to_string();
    // The server may stop reading part-way through the frame; whether the write completes is
    // not what is tested, the close code is.
    let sent = client.ws.send(Message::text(huge)).await;
    let closed = client.closed().await;
    assert_eq!(
        closed.code, 1009,
        "{closed:?} (sending the frame: {sent:?})"
    );
    assert!(closed.reason.starts_with("message_too_big"), "{closed:?}");

    assert_healthy(&app).await;
    let mut legacy = app.legacy("after-huge-legacy", "UTC").await;
    legacy_still_replies(&mut legacy).await;
    let mut native = app.native("after-huge-native", "UTC").await;
    native_still_replies(&mut native, "after").await;
}

#[tokio::test]
async fn an_oversize_legacy_frame_is_closed_with_1009_and_the_server_stays_up() {
    oversize_frame_closes_with_1009(false).await;
}

#[tokio::test]
async fn an_oversize_native_frame_is_closed_with_1009_and_the_server_stays_up() {
    oversize_frame_closes_with_1009(true).await;
}

#[tokio::test]
async fn a_binary_frame_from_a_legacy_client_is_an_error_and_the_connection_stays_usable() {
    let app = TestApp::spawn(&[]).await;
    let mut client = app.legacy("bin-legacy", "UTC").await;
    client.send_binary(files::png()).await;
    expect_legacy_error(&mut client, "unexpected_binary").await;
    legacy_still_replies(&mut client).await;
    assert_healthy(&app).await;
}

#[tokio::test]
async fn an_unannounced_native_binary_frame_is_an_error_and_the_connection_stays_usable() {
    let app = TestApp::spawn(&[]).await;
    let mut client = app.native("bin-native", "UTC").await;
    client.send_binary(files::png()).await;
    expect_native_error(&mut client, "unexpected_binary").await;
    // A send without "binary": true does not announce one either.
    client.send_json(send("plain", "text", "hello")).await;
    client
        .until(|f| f["type"] == "status" && f["id"] == "plain" && f["status"] == "replied")
        .await;
    client.send_binary(files::png()).await;
    expect_native_error(&mut client, "unexpected_binary").await;
    native_still_replies(&mut client, "after").await;
    assert_healthy(&app).await;
}

#[tokio::test]
async fn a_text_frame_in_place_of_an_announced_binary_frame_is_an_error_but_still_processed() {
    let app = TestApp::spawn(&[]).await;
    let mut client = app.native("expect-bin", "UTC").await;
    client
        .send_json(json!({"type": "send", "id": "file1", "message_type": "image", "filename": "a.png", "binary": true}))
        .await;
    client.send_json(send("text2", "text", "not a file")).await;

    let error = expect_native_error(&mut client, "expected_binary").await;
    assert_eq!(error["id"], "file1", "{error}");
    let ack = client.next_json().await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["id"], "text2", "{ack}");
    assert_eq!(ack["status"], "accepted", "{ack}");
    let reply = client
        .until(|f| f["type"] == "reply" && f["id"] == "text2")
        .await;
    assert_eq!(reply["reply"]["reply_type"], "text", "{reply}");
    client
        .until(|f| f["type"] == "status" && f["id"] == "text2" && f["status"] == "replied")
        .await;

    // The dropped announcement does not swallow a later binary frame.
    client.send_binary(files::png()).await;
    expect_native_error(&mut client, "unexpected_binary").await;
    native_still_replies(&mut client, "after").await;
    assert_healthy(&app).await;
}

#[tokio::test]
async fn a_native_send_without_a_usable_id_is_refused_with_invalid_message_id() {
    let app = TestApp::spawn(&[]).await;
    let mut client = app.native("ids", "UTC").await;

    client
        .send_json(json!({"type": "send", "message_type": "text", "content": "no id"}))
        .await;
    expect_native_error(&mut client, "invalid_message_id").await;

    client.send_json(send("", "text", "empty id")).await;
    expect_native_error(&mut client, "invalid_message_id").await;

    let long = "i".repeat(65);
    client.send_json(send(&long, "text", "long id")).await;
    expect_native_error(&mut client, "invalid_message_id").await;

    // 64 characters is the limit, and passes.
    native_still_replies(&mut client, &"i".repeat(64)).await;
    assert_healthy(&app).await;
}

async fn unknown_frame_type_is_an_error(native: bool) {
    let app = TestApp::spawn(&[]).await;
    let mut client = connect(&app, native, "teleport").await;
    client.send_json(json!({"type": "teleport"})).await;
    expect_error_frame(&mut client, native, "unknown_frame").await;
    still_replies(&mut client, native).await;
    assert_healthy(&app).await;
}

#[tokio::test]
async fn an_unknown_native_frame_type_is_an_error_and_the_connection_stays_usable() {
    unknown_frame_type_is_an_error(true).await;
}

#[tokio::test]
async fn an_unknown_legacy_frame_type_is_an_error_and_the_connection_stays_usable() {
    unknown_frame_type_is_an_error(false).await;
}

// ---------------------------------------------------------------------------------------------
// Flood
// ---------------------------------------------------------------------------------------------

const FLOOD: usize = 3_000;

#[derive(Debug, Default)]
struct Tally {
    acks: HashMap<String, usize>,
    text_replies: HashMap<String, usize>,
    replied: HashMap<String, usize>,
    unexpected: Vec<Value>,
}

/// Reads the flooding client's frames until every id and the final probe are replied, counting
/// acks and replies per id. Signals `started` once a tenth of the flood is acked, and
/// `flood_replied` once every flood message is replied.
async fn read_flood(
    mut stream: futures::stream::SplitStream<support::Socket>,
    progress: Arc<AtomicUsize>,
    started: oneshot::Sender<()>,
    flood_replied: oneshot::Sender<()>,
) -> Result<Tally, Closed> {
    let mut tally = Tally::default();
    let mut started = Some(started);
    let mut flood_replied = Some(flood_replied);
    loop {
        let Ok(frame) = tokio::time::timeout(FRAME_TIMEOUT, stream.next()).await else {
            panic!(
                "no frame for {FRAME_TIMEOUT:?}: {} acked, {} replied, {} unexpected frames",
                tally.acks.len(),
                tally.replied.len(),
                tally.unexpected.len()
            );
        };
        let Some(frame) = support::decode(frame) else {
            continue;
        };
        let frame = frame?;
        let id = frame["id"].as_str().unwrap_or_default().to_owned();
        match frame["type"].as_str() {
            Some("ack") if frame["status"] == "accepted" && frame["duplicate"] != true => {
                *tally.acks.entry(id).or_default() += 1;
                if tally.acks.len() >= FLOOD / 10
                    && let Some(started) = started.take()
                {
                    started.send(()).ok();
                }
            }
            Some("reply") if frame["reply"]["reply_type"] == "text" => {
                *tally.text_replies.entry(id).or_default() += 1;
            }
            Some("status") if frame["status"] == "processing" => {}
            Some("status") if frame["status"] == "replied" => {
                if id == "probe" {
                    *tally.replied.entry(id).or_default() += 1;
                    return Ok(tally);
                }
                *tally.replied.entry(id).or_default() += 1;
                progress.store(tally.replied.len(), Ordering::SeqCst);
                if tally.replied.len() >= FLOOD
                    && let Some(flood_replied) = flood_replied.take()
                {
                    flood_replied.send(()).ok();
                }
            }
            _ => tally.unexpected.push(frame),
        }
    }
}

#[tokio::test]
async fn a_flood_of_pipelined_sends_is_answered_exactly_once_without_starving_others() {
    let app = TestApp::spawn(&[]).await;
    let mut bystander = app.native("bystander", "UTC").await;
    let flooder = app.native("flooder", "UTC").await;
    let (mut sink, stream) = flooder.ws.split();

    let progress = Arc::new(AtomicUsize::new(0));
    let (started_tx, started_rx) = oneshot::channel();
    let (probe_tx, probe_rx) = oneshot::channel::<()>();
    let reader = tokio::spawn(read_flood(stream, progress.clone(), started_tx, probe_tx));

    // Every send goes out without waiting for any answer; the reader runs alongside so the
    // client is not a slow consumer.
    let (all_sent_tx, all_sent_rx) = oneshot::channel::<()>();
    let sender = tokio::spawn(async move {
        for n in 0..FLOOD {
            let frame = send(&format!("f{n}"), "text", &format!("flood {n}"));
            sink.send(Message::text(frame.to_string()))
                .await
                .expect("a flood frame is sent");
        }
        all_sent_tx.send(()).ok();
        // The probe goes last, once the flood has been replied: anything duplicated would
        // arrive before its reply.
        probe_rx.await.ok();
        sink.send(Message::text(send("probe", "text", "last").to_string()))
            .await
            .expect("the probe is sent");
        sink
    });

    // While the flood is in progress, another client is still served.
    started_rx.await.expect("the flood gets under way");
    let before = progress.load(Ordering::SeqCst);
    assert!(before < FLOOD, "the flood is still in progress");
    native_still_replies(&mut bystander, "meanwhile").await;

    all_sent_rx.await.expect("the whole flood is sent");

    let tally = reader
        .await
        .expect("the reader does not panic")
        .expect("the flooding client is not disconnected");
    let _sink = sender.await.expect("the sender does not panic");

    assert!(tally.unexpected.is_empty(), "{:?}", tally.unexpected);
    for n in 0..FLOOD {
        let id = format!("f{n}");
        assert_eq!(tally.acks.get(&id), Some(&1), "acks for {id}");
        assert_eq!(
            tally.text_replies.get(&id),
            Some(&1),
            "text replies for {id}"
        );
        assert_eq!(tally.replied.get(&id), Some(&1), "replied for {id}");
    }
    assert_eq!(tally.acks.len(), FLOOD + 1, "only the flood and the probe");
    assert_eq!(tally.text_replies.len(), FLOOD + 1);
    assert_healthy(&app).await;
}
