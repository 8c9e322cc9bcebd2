//! Time windows at their edges (R5, R6), judged by the server's clock in the client's timezone,
//! in zones that change for daylight saving and zones with half-hour offsets.

mod support;

use support::{Client, TestApp, files, legacy_message, local, send, send_file};

/// Sends one message of `kind` at local time `h:m:s` in `zone` and returns the ack's status,
/// with the rejection reason if any.
async fn verdict(
    app: &TestApp,
    client: &mut Client,
    zone: &str,
    date: (i32, u32, u32),
    (h, m, s): (u32, u32, u32),
    kind: &str,
    n: usize,
) -> (String, Option<String>) {
    app.set_time(local(zone, date.0, date.1, date.2, h, m, s));
    let id = format!("{kind}-{n}");
    let frame = match kind {
        "text" => send(&id, "text", "edge"),
        "voice" => send_file(&id, "voice", "v.wav", &files::wav()),
        "video" => send_file(&id, "video", "v.mp4", &files::mp4()),
        other => panic!("no sample for {other}"),
    };
    client.send_json(frame).await;
    let ack = client
        .until(|f| f["type"] == "ack" && f["id"] == id.as_str())
        .await;
    (
        ack["status"].as_str().expect("a status").to_owned(),
        ack["reason"].as_str().map(str::to_owned),
    )
}

const EDGES: [(&str, (u32, u32, u32), bool); 18] = [
    ("text", (4, 59, 59), false),
    ("text", (5, 0, 0), true),
    ("text", (23, 59, 59), true),
    ("text", (0, 0, 0), false),
    ("text", (12, 0, 0), true),
    ("voice", (7, 59, 59), false),
    ("voice", (8, 0, 0), true),
    ("voice", (11, 59, 59), true),
    ("voice", (12, 0, 0), false),
    ("voice", (0, 0, 0), false),
    ("video", (19, 59, 59), false),
    ("video", (20, 0, 0), true),
    ("video", (23, 59, 59), true),
    ("video", (0, 0, 0), false),
    ("video", (12, 0, 0), false),
    ("text", (4, 0, 0), false),
    ("voice", (9, 30, 0), true),
    ("video", (21, 30, 0), true),
];

async fn check_zone(zone: &str, date: (i32, u32, u32)) {
    let app = TestApp::spawn(&[]).await;
    let mut client = app
        .native(&format!("edge-{}", zone.replace('/', "-")), zone)
        .await;
    for (n, (kind, time, accepted)) in EDGES.into_iter().enumerate() {
        let (status, reason) = verdict(&app, &mut client, zone, date, time, kind, n).await;
        let expected = if accepted { "accepted" } else { "rejected" };
        assert_eq!(
            status, expected,
            "{kind} at {time:?} in {zone} on {date:?}: {reason:?}"
        );
        if !accepted {
            let reason = reason.expect("a rejection has a reason");
            assert!(reason.contains(zone), "the reason names the zone: {reason}");
        }
    }
}

#[tokio::test]
async fn edges_hold_in_new_york_on_the_day_clocks_spring_forward() {
    // 2026-03-08: 02:00 EST becomes 03:00 EDT; the edges lie after the change.
    check_zone("America/New_York", (2026, 3, 8)).await;
}

#[tokio::test]
async fn edges_hold_in_new_york_on_the_day_clocks_fall_back() {
    check_zone("America/New_York", (2026, 11, 1)).await;
}

#[tokio::test]
async fn edges_hold_in_kolkata_at_plus_five_thirty() {
    check_zone("Asia/Kolkata", (2026, 11, 21)).await;
}

#[tokio::test]
async fn edges_hold_in_adelaide_with_a_half_hour_offset_and_summer_time() {
    // Adelaide is +10:30 in its summer (November) and +09:30 in winter.
    check_zone("Australia/Adelaide", (2026, 11, 21)).await;
    check_zone("Australia/Adelaide", (2026, 6, 21)).await;
}

#[tokio::test]
async fn a_client_timestamp_is_stored_but_never_decides_the_window() {
    let app = TestApp::spawn(&[]).await;
    // 03:00 in Tokyo by the server's clock; the client claims it is noon.
    app.set_time(local("Asia/Tokyo", 2026, 11, 21, 3, 0, 0));
    let mut client = app.legacy("liar", "Asia/Tokyo").await;
    let mut message = legacy_message("text", "let me in");
    message["timestamp"] = "2026-11-21T12:00:00+09:00".into();
    client.send_json(message).await;
    let rejection = client.next_json().await;
    assert_eq!(rejection["type"], "message");
    let reason = rejection["data"]["message"].as_str().expect("a reason");
    assert!(reason.contains("from 05:00 to midnight"), "{reason}");
    assert!(reason.contains("03:00:00"), "{reason}");

    let (_, history) = app.get_json("/chat-history/liar").await;
    let stored = &history["data"][0];
    assert_eq!(stored["is_accepted"], false);
    assert_eq!(stored["status_message"], reason);
    assert_eq!(stored["client_timestamp"], "2026-11-21T12:00:00+09:00");
}

#[tokio::test]
async fn custom_windows_from_the_command_line_are_used() {
    let app = TestApp::spawn(&["--voice-window", "22:00-02:00"]).await;
    let mut client = app.native("night-owl", "UTC").await;
    let cases = [
        ((9, 0, 0), "rejected"),
        ((23, 0, 0), "accepted"),
        ((1, 59, 59), "accepted"),
        ((2, 0, 0), "rejected"),
    ];
    for (n, (time, expected)) in cases.into_iter().enumerate() {
        let (got, _) = verdict(&app, &mut client, "UTC", (2026, 11, 21), time, "voice", n).await;
        assert_eq!(got, expected, "voice at {time:?} UTC");
    }
}
