//! Every reply exactly once across reconnects (R11): a native client's replies form a stream
//! numbered by `seq`; it says where it stopped (`after`) and gets the rest, in order, with no gap
//! and no duplicate at the seam between replayed and live replies, whenever it reconnects.

mod support;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use kaiwa::domain::ClientId;
use kaiwa::store::{
    Inserted, MissedReply, NewMessage, NewReply, Store, StoreError, StoreFuture, StoredMessage,
    StoredReply,
};
use kaiwa_protocol::Delivery;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use support::{Client, TestApp, eventually, files, send, send_file};

/// The replies one client has processed, across all its connections. Each connection delivers
/// in `seq` order and resumes after the last one processed, so the whole history must read
/// 1, 2, 3... with no gap and no repeat. Beside them, the messages whose `replied` came.
#[derive(Debug, Default)]
struct Processed {
    seqs: Vec<u64>,
    replied: BTreeSet<String>,
}

impl Processed {
    /// The `seq` of the last reply processed: what a client resumes after.
    fn cursor(&self) -> u64 {
        self.seqs.last().copied().unwrap_or(0)
    }

    /// Takes one frame; panics if a reply comes out of turn.
    fn take(&mut self, frame: &Value) {
        if frame["type"] == "status" && frame["status"] == "replied" {
            let id = frame["id"].as_str().expect("a status names its message");
            self.replied.insert(id.to_owned());
        }
        if frame["type"] != "reply" {
            return;
        }
        let seq = frame["seq"].as_u64().expect("a reply has a seq");
        assert_eq!(
            seq,
            self.cursor() + 1,
            "reply out of turn after {:?}: {frame}",
            self.seqs
        );
        self.seqs.push(seq);
    }

    /// Reads frames for up to `within`, or until the connection ends.
    async fn read_for(&mut self, client: &mut Client, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        while let Ok(Ok(frame)) = tokio::time::timeout_at(deadline, client.next()).await {
            self.take(&frame);
        }
    }

    /// Reads frames until `synced`, which it returns.
    async fn read_until_synced(&mut self, client: &mut Client) -> Value {
        loop {
            let frame = client.next_json().await;
            if frame["type"] == "synced" {
                return frame;
            }
            self.take(&frame);
        }
    }

    /// Reads frames until `count` replies in all were processed.
    async fn read_until(&mut self, client: &mut Client, count: usize) {
        while self.seqs.len() < count {
            let frame = client.next_json().await;
            self.take(&frame);
        }
    }

    /// Reads frames until the `replied` of every message in `ids` came, on this connection
    /// or an earlier one.
    async fn read_until_replied(&mut self, client: &mut Client, ids: &BTreeSet<String>) {
        while !self.replied.is_superset(ids) {
            let frame = client.next_json().await;
            self.take(&frame);
        }
    }
}

/// A store whose reply writes take their time: `before` the commit, and `after` it before the
/// worker hears of it. A reconnect then lands in every phase of storing a reply.
struct SlowReplies {
    inner: Arc<dyn Store>,
    before: Duration,
    after: Duration,
}

#[async_trait]
impl Store for SlowReplies {
    fn insert_message(&self, message: NewMessage) -> StoreFuture<Inserted> {
        self.inner.insert_message(message)
    }

    async fn insert_replies(
        &self,
        message_id: i64,
        client_id: &ClientId,
        replies: Vec<NewReply>,
        created_at: DateTime<Utc>,
        completes: bool,
    ) -> Result<Vec<StoredReply>, StoreError> {
        tokio::time::sleep(self.before).await;
        let stored = self
            .inner
            .insert_replies(message_id, client_id, replies, created_at, completes)
            .await;
        tokio::time::sleep(self.after).await;
        stored
    }

    fn record_delivery(&self, reply_id: i64, delivery: Delivery, at: DateTime<Utc>) {
        self.inner.record_delivery(reply_id, delivery, at);
    }

    fn record_received(&self, client_id: &ClientId, seq: u64, at: DateTime<Utc>) {
        self.inner.record_received(client_id, seq, at);
    }

    fn record_departure(&self, client_id: &ClientId, acknowledged: u64, at: DateTime<Utc>) {
        self.inner.record_departure(client_id, acknowledged, at);
    }

    async fn message(&self, id: i64) -> Result<Option<StoredMessage>, StoreError> {
        self.inner.message(id).await
    }

    async fn history(
        &self,
        client_id: &ClientId,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        self.inner.history(client_id, before, limit).await
    }

    async fn history_by_offset(
        &self,
        client_id: &ClientId,
        offset: u64,
        limit: u32,
    ) -> Result<(Vec<StoredMessage>, u64), StoreError> {
        self.inner.history_by_offset(client_id, offset, limit).await
    }

    async fn replies_after(
        &self,
        client_id: &ClientId,
        after: u64,
        limit: u32,
    ) -> Result<Vec<MissedReply>, StoreError> {
        self.inner.replies_after(client_id, after, limit).await
    }

    async fn latest_seq(&self, client_id: &ClientId) -> Result<u64, StoreError> {
        self.inner.latest_seq(client_id).await
    }

    async fn acknowledged(&self, client_id: &ClientId) -> Result<u64, StoreError> {
        self.inner.acknowledged(client_id).await
    }

    async fn unfinished_messages(&self) -> Result<Vec<StoredMessage>, StoreError> {
        self.inner.unfinished_messages().await
    }

    async fn close(&self) {
        self.inner.close().await;
    }
}

async fn replies_of(app: &TestApp, client_id: &str) -> Vec<Value> {
    let (_, page) = app
        .get_json(&format!("/api/v1/clients/{client_id}/messages?limit=100"))
        .await;
    let mut replies: Vec<Value> = page["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .flat_map(|m| m["replies"].as_array().cloned().unwrap_or_default())
        .collect();
    replies.sort_by_key(|r| r["seq"].as_u64());
    replies
}

#[tokio::test]
async fn every_reply_arrives_exactly_once_when_reconnecting_while_it_is_stored() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    // The newer connection replaces one the server has not yet seen drop.
    let app = TestApp::spawn_wrapped(dir, &["--duplicate-connection", "replace"], |inner| {
        Arc::new(SlowReplies {
            inner,
            before: Duration::from_millis(25),
            after: Duration::from_millis(25),
        })
    })
    .await;
    let mut processed = Processed::default();
    const ROUNDS: u64 = 16;
    for round in 0..ROUNDS {
        let mut client = app.native_after("roamer", processed.cursor()).await;
        processed.read_until_synced(&mut client).await;
        let id = format!("r{round}");
        client
            .send_json(send_file(&id, "image", "a.png", &files::png()))
            .await;
        let ack = loop {
            let frame = client.next_json().await;
            if frame["type"] == "ack" {
                break frame;
            }
            processed.take(&frame);
        };
        assert_eq!(ack["status"], "accepted", "{ack}");
        // Leave at a different moment of the reply's storing each round: before its commit,
        // between the commit and its announcement, or after.
        let stay = Duration::from_millis(round * 5 % 70);
        processed.read_for(&mut client, stay).await;
        if round % 2 == 0 {
            client.close().await;
        } else {
            // The network drops: no close frame.
            drop(client);
        }
    }
    let mut client = app.native_after("roamer", processed.cursor()).await;
    processed.read_until(&mut client, 3 * ROUNDS as usize).await;
    let expected: Vec<u64> = (1..=3 * ROUNDS).collect();
    assert_eq!(processed.seqs, expected);
    // Some connections ended between a message's last reply and its `replied`: the next one
    // brought the status.
    let sent = (0..ROUNDS).map(|round| format!("r{round}")).collect();
    processed.read_until_replied(&mut client, &sent).await;
    assert_eq!(replies_of(&app, "roamer").await.len(), expected.len());
}

#[tokio::test]
async fn resuming_again_and_again_while_replies_arrive_neither_loses_nor_repeats_one() {
    // Image replies come 0.2–0.3 s after their message: they arrive across many connections.
    let app = TestApp::spawn(&[
        "--reply-delay-scale",
        "0.1",
        "--duplicate-connection",
        "replace",
    ])
    .await;
    let mut client = app.native("hopper", "UTC").await;
    for n in 0..10 {
        client
            .send_json(send_file(&format!("h{n}"), "image", "a.png", &files::png()))
            .await;
    }
    let mut processed = Processed::default();
    let mut connections = 1;
    while processed.seqs.len() < 30 {
        processed
            .read_for(&mut client, Duration::from_millis(40))
            .await;
        drop(client);
        client = app.native_after("hopper", processed.cursor()).await;
        connections += 1;
    }
    assert_eq!(processed.seqs, (1..=30).collect::<Vec<u64>>());
    let sent = (0..10).map(|n| format!("h{n}")).collect();
    processed.read_until_replied(&mut client, &sent).await;
    assert!(
        connections > 3,
        "the replies spanned {connections} connections"
    );
}

#[tokio::test]
async fn a_connection_that_ended_between_a_last_reply_and_its_replied_leaves_no_status_owed() {
    // The text's reply comes within 0.1 s, the voice message's two after it.
    let app = TestApp::spawn(&["--reply-delay-scale", "0.1"]).await;
    let mut client = app.native("cut", "UTC").await;
    client
        .send_json(send_file("v", "voice", "note.wav", &files::wav()))
        .await;
    client.send_json(send("t", "text", "hi")).await;
    let mut processed = Processed::default();
    processed.read_until(&mut client, 3).await;
    // The client read no further than the last reply: whatever came after it is lost.
    client.close().await;

    let mut back = app.native_after("cut", 3).await;
    let last = back.next_json().await;
    let id = last["id"].as_str().expect("the status names its message");
    assert_eq!(
        (&last["type"], &last["status"]),
        (&json!("status"), &json!("replied")),
        "{last}"
    );
    assert_eq!(
        back.next_json().await,
        json!({"type": "synced", "replies": 0, "seq": 3})
    );
    // The message before it ended its set at a reply the client also had: it read its
    // `replied` then, and the replay does not repeat it.
    assert!(processed.replied.iter().all(|earlier| earlier != id));
    assert_eq!(processed.replied.len(), 1, "{:?}", processed.replied);
}

#[tokio::test]
async fn replies_due_while_away_are_failed_then_replayed_in_order_and_acknowledged() {
    let app = TestApp::spawn(&["--reply-delay-scale", "0.2"]).await;
    let mut client = app.native("wanderer", "UTC").await;
    client
        .send_json(send_file("v1", "voice", "note.wav", &files::wav()))
        .await;
    let ack = client.until(|f| f["type"] == "ack").await;
    assert_eq!(ack["status"], "accepted");
    client.close().await;

    eventually("both replies marked failed", || async {
        let replies = replies_of(&app, "wanderer").await;
        (replies.len() == 2 && replies.iter().all(|r| r["delivery"] == "failed")).then_some(())
    })
    .await;

    let mut back = app.native_after("wanderer", 0).await;
    let mut processed = Processed::default();
    let mut frames = Vec::new();
    let synced = loop {
        let frame = back.next_json().await;
        if frame["type"] == "synced" {
            break frame;
        }
        processed.take(&frame);
        frames.push(frame);
    };
    assert_eq!(processed.seqs, [1, 2]);
    // The replies between their message's statuses: the store says the set is complete.
    assert_eq!(frames.len(), 4, "{frames:?}");
    assert_eq!(
        frames[0],
        json!({"type": "status", "id": "v1", "message_id": 1, "status": "processing"})
    );
    assert!(
        frames[1..3]
            .iter()
            .all(|f| f["type"] == "reply" && f["missed"] == true && f["id"] == "v1"),
        "{frames:?}"
    );
    assert_eq!(
        frames[3],
        json!({"type": "status", "id": "v1", "message_id": 1, "status": "replied"})
    );
    assert_eq!(synced, json!({"type": "synced", "replies": 2, "seq": 2}));

    // Unacknowledged, they are still not delivered; acknowledged, they are.
    assert!(
        replies_of(&app, "wanderer")
            .await
            .iter()
            .all(|r| r["delivery"] != "delivered")
    );
    back.received(2).await;
    eventually("the replayed replies delivered", || async {
        let replies = replies_of(&app, "wanderer").await;
        replies
            .iter()
            .all(|r| r["delivery"] == "delivered" && r["delivered_at"].is_string())
            .then_some(())
    })
    .await;
    back.send_json(json!({"type": "sync"})).await;
    assert_eq!(
        back.next_json().await,
        json!({"type": "synced", "replies": 0, "seq": 2}),
        "nothing is left to replay"
    );
}

#[tokio::test]
async fn replies_sent_but_not_acknowledged_are_failed_when_the_client_leaves() {
    let app = TestApp::spawn(&[]).await;
    let mut client = app.native("half", "UTC").await;
    client
        .send_json(send_file("i", "image", "a.png", &files::png()))
        .await;
    let mut processed = Processed::default();
    processed.read_until(&mut client, 3).await;
    client.received(2).await;
    client.close().await;
    let replies = eventually("the third reply failed", || async {
        let replies = replies_of(&app, "half").await;
        (replies.len() == 3 && replies[2]["delivery"] == "failed").then_some(replies)
    })
    .await;
    assert_eq!(replies[0]["delivery"], "delivered");
    assert_eq!(replies[1]["delivery"], "delivered");

    // `resume` without a cursor picks up after the last acknowledged reply.
    let (mut back, _) = app.native_with("half", "UTC", true).await;
    let mut replayed = Processed {
        seqs: vec![1, 2],
        ..Processed::default()
    };
    let synced = replayed.read_until_synced(&mut back).await;
    assert_eq!(replayed.seqs, [1, 2, 3]);
    assert_eq!(synced["replies"], 1);
}

#[tokio::test]
async fn a_stale_cursor_replays_from_where_it_says_and_one_from_the_future_misses_nothing() {
    let app = TestApp::spawn(&[]).await;
    let mut client = app.native("forgetful", "UTC").await;
    let mut processed = Processed::default();
    for n in 0..3 {
        client.send_json(send(&format!("t{n}"), "text", "hi")).await;
    }
    processed.read_until(&mut client, 3).await;
    client.close().await;

    // A client that lost what it processed after the first reply gets the rest again.
    let mut back = app.native_after("forgetful", 1).await;
    let mut again = Processed {
        seqs: vec![1],
        ..Processed::default()
    };
    let synced = again.read_until_synced(&mut back).await;
    assert_eq!(again.seqs, [1, 2, 3]);
    assert_eq!(synced, json!({"type": "synced", "replies": 2, "seq": 3}));
    back.close().await;

    // A cursor past the end of the stream (kept from a server since reset, say) starts at the
    // end: no reply is taken as sent that was not.
    let mut ahead = app.native_after("forgetful", 999).await;
    assert_eq!(
        ahead.next_json().await,
        json!({"type": "synced", "replies": 0, "seq": 3})
    );
    ahead.send_json(send("t3", "text", "still there?")).await;
    let reply = ahead.until(|f| f["type"] == "reply").await;
    assert_eq!(reply["seq"], 4);
    assert_eq!(reply["id"], "t3");
}

#[tokio::test]
async fn a_slow_reader_cut_off_gets_every_reply_it_did_not_process_on_resume() {
    let app = TestApp::spawn(&["--outbox-capacity", "16"]).await;
    let mut client = support::slow_reader(&app, "sloth").await;
    // Sends and never reads, until the server hangs up.
    support::flood(&mut client, 40_000).await;
    // What reached the socket before the cut is still there to read.
    let mut processed = Processed::default();
    let closed = loop {
        match client.next().await {
            Ok(frame) => processed.take(&frame),
            Err(closed) => break closed,
        }
    };
    assert_eq!(closed.code, 4003, "{closed:?}");
    assert!(closed.reason.starts_with("slow_consumer"), "{closed:?}");
    // Messages read before the cut are still processed.
    eventually("nothing in flight", || async {
        (app.health().await["in_flight"] == 0).then_some(())
    })
    .await;
    let stored = replies_of_all(&app, "sloth").await;
    assert!(stored > processed.seqs.len(), "some replies were cut off");

    let mut back = app.native_after("sloth", processed.cursor()).await;
    processed.read_until_synced(&mut back).await;
    assert_eq!(processed.seqs, (1..=stored as u64).collect::<Vec<u64>>());
}

/// How many replies a client has, all pages of its history counted.
async fn replies_of_all(app: &TestApp, client_id: &str) -> usize {
    let mut total = 0;
    let mut cursor = String::new();
    loop {
        let (_, page) = app
            .get_json(&format!(
                "/api/v1/clients/{client_id}/messages?limit=100&before={cursor}"
            ))
            .await;
        total += page["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .map(|m| m["replies"].as_array().map_or(0, Vec::len))
            .sum::<usize>();
        match page["next_cursor"].as_str() {
            Some(next) => cursor = next.to_owned(),
            None => return total,
        }
    }
}

#[tokio::test]
async fn a_long_replay_to_a_small_outbox_does_not_look_like_a_slow_consumer() {
    let app = TestApp::spawn(&["--outbox-capacity", "8", "--reply-delay-scale", "0.3"]).await;
    let mut client = app.native("returner", "UTC").await;
    // Twenty messages, and the client leaves before any reply is due.
    for n in 0..20 {
        client.send_json(send(&format!("m{n}"), "text", "hi")).await;
    }
    client.close().await;
    eventually("all 20 replies stored", || async {
        (replies_of(&app, "returner").await.len() == 20).then_some(())
    })
    .await;

    let mut back = app.native_after("returner", 0).await;
    let mut processed = Processed::default();
    let synced = processed.read_until_synced(&mut back).await;
    assert_eq!(processed.seqs.len(), 20);
    assert_eq!(synced["replies"], 20);
    back.send_json(send("still", "text", "still here?")).await;
    let reply = back.until(|f| f["type"] == "reply").await;
    assert_eq!(reply["seq"], 21);
}
