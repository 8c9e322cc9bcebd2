//! The contract of [`Store`], written once and run against every implementation: the in-memory
//! store, SQLite and PostgreSQL (each test of the last on a database of its own, on the server
//! the tests use; see `tests/support/postgres.rs`).

use super::{
    Existing, Inserted, MemoryStore, NewMessage, NewReply, PgOptions, PgShared, PgStore,
    SqliteOptions, SqliteStore, Store, StoreError, StoreHealth, StoredMessage, StoredReply,
    StuckClaims,
};
use crate::domain::{ClientId, Timezone};
use crate::testing::stored;
use chrono::{DateTime, TimeZone, Utc};
use futures::future::join_all;
use kaiwa_protocol::{Delivery, MessageStatus, MessageType, ReplyType};
use std::sync::Arc;

// Shared with presence's tests: a file may be a module once.
#[path = "../../tests/support/postgres.rs"]
pub(crate) mod test_postgres;

/// One store under test, and what the contract needs around it.
trait Backend: Sized {
    async fn open() -> Self;
    fn store(&self) -> &dyn Store;
    /// Waits until every write sent so far is applied (writes are batched).
    async fn settle(&self);
}

/// A store that keeps its data across a close, or a crash.
trait Durable: Backend {
    /// Stops without closing (as a killed process would), and opens the same data again.
    async fn crash_and_reopen(self) -> Self;
    /// Closes, and opens the same data again.
    async fn close_and_reopen(self) -> Self;
    /// Makes the database refuse (or take again) every change to a reply, as a trigger
    /// written by someone else would: the store's batches holding one then fail.
    async fn refuse_reply_updates(&self, refuse: bool);
    /// Whether a change was refused since [`Durable::refuse_reply_updates`] was turned on.
    async fn has_refused(&self) -> bool;
    /// Changes the data behind the store's back, as an operator's statement (or a bug in
    /// another version) could.
    async fn tamper(&self, statement: &str);
}

/// A store whose delivery marks and acknowledgements wait for a batch of messages or replies
/// to ride with (`updates_wait` in its options).
trait Waiting: Durable {
    /// Opens a store whose updates wait up to `wait`.
    async fn open_waiting(wait: std::time::Duration) -> Self;
}

struct Memory(MemoryStore);

impl Backend for Memory {
    async fn open() -> Self {
        Self(MemoryStore::default())
    }

    fn store(&self) -> &dyn Store {
        &self.0
    }

    async fn settle(&self) {}
}

struct Sqlite {
    store: Arc<SqliteStore>,
    dir: tempfile::TempDir,
}

impl Sqlite {
    async fn open_in(dir: tempfile::TempDir) -> Self {
        Self::open_with(dir, SqliteOptions::default()).await
    }

    async fn open_with(dir: tempfile::TempDir, options: SqliteOptions) -> Self {
        let store = SqliteStore::open(&dir.path().join("kaiwa.db"), options)
            .await
            .expect("the SQLite store opens");
        Self {
            store: Arc::new(store),
            dir,
        }
    }
}

impl Backend for Sqlite {
    async fn open() -> Self {
        Self::open_in(tempfile::tempdir().expect("a temporary directory")).await
    }

    fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    async fn settle(&self) {
        self.store.barrier().await;
    }
}

impl Durable for Sqlite {
    async fn crash_and_reopen(self) -> Self {
        let Self { store, dir } = self;
        drop(store);
        Self::open_in(dir).await
    }

    async fn close_and_reopen(self) -> Self {
        self.store.close().await;
        self.crash_and_reopen().await
    }

    async fn refuse_reply_updates(&self, refuse: bool) {
        let conn = rusqlite::Connection::open(self.dir.path().join("kaiwa.db")).expect("opens");
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .expect("a busy timeout");
        conn.execute_batch(if refuse {
            "CREATE TRIGGER refuse_reply_updates BEFORE UPDATE ON replies \
             BEGIN SELECT RAISE(ABORT, 'reply updates refused by the test'); END;"
        } else {
            "DROP TRIGGER refuse_reply_updates;"
        })
        .expect("the trigger changes");
    }

    async fn has_refused(&self) -> bool {
        // SQLite's store reports every failed batch (most are a full disk).
        self.store.health() != StoreHealth::Ok
    }

    async fn tamper(&self, statement: &str) {
        let conn = rusqlite::Connection::open(self.dir.path().join("kaiwa.db")).expect("opens");
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .expect("a busy timeout");
        conn.execute_batch(statement).expect("the data changes");
    }
}

impl Waiting for Sqlite {
    async fn open_waiting(wait: std::time::Duration) -> Self {
        let options = SqliteOptions {
            updates_wait: Some(wait),
            ..SqliteOptions::default()
        };
        Self::open_with(tempfile::tempdir().expect("a temporary directory"), options).await
    }
}

struct Postgres {
    store: Arc<PgStore>,
    database: test_postgres::TestDatabase,
}

impl Postgres {
    async fn open_on(database: test_postgres::TestDatabase) -> Self {
        Self::open_with(database, PgOptions::default()).await
    }

    async fn open_with(database: test_postgres::TestDatabase, options: PgOptions) -> Self {
        let store = PgStore::connect(&database.url, options)
            .await
            .expect("the PostgreSQL store opens");
        Self {
            store: Arc::new(store),
            database,
        }
    }
}

impl Backend for Postgres {
    async fn open() -> Self {
        Self::open_on(test_postgres::TestDatabase::create().await).await
    }

    fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    async fn settle(&self) {
        self.store.barrier().await;
    }
}

impl Durable for Postgres {
    async fn crash_and_reopen(self) -> Self {
        let Self { store, database } = self;
        drop(store);
        Self::open_on(database).await
    }

    async fn close_and_reopen(self) -> Self {
        self.store.close().await;
        self.crash_and_reopen().await
    }

    async fn refuse_reply_updates(&self, refuse: bool) {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&self.database.url)
            .await
            .expect("connects");
        let statements: &[&str] = if refuse {
            &[
                // A sequence counts the refusals: it is not rolled back with the transaction.
                "CREATE SEQUENCE refusals",
                "CREATE FUNCTION refuse_reply_updates() RETURNS trigger LANGUAGE plpgsql AS \
                 $$ BEGIN PERFORM nextval('refusals'); \
                 RAISE EXCEPTION 'reply updates refused by the test'; END $$",
                "CREATE TRIGGER refuse_reply_updates BEFORE UPDATE ON replies \
                 FOR EACH ROW EXECUTE FUNCTION refuse_reply_updates()",
            ]
        } else {
            &["DROP TRIGGER refuse_reply_updates ON replies"]
        };
        for statement in statements {
            sqlx::query(*statement)
                .execute(&mut conn)
                .await
                .expect("the trigger changes");
        }
    }

    async fn has_refused(&self) -> bool {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&self.database.url)
            .await
            .expect("connects");
        sqlx::query_scalar("SELECT is_called FROM refusals")
            .fetch_one(&mut conn)
            .await
            .expect("the sequence is read")
    }

    async fn tamper(&self, statement: &str) {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&self.database.url)
            .await
            .expect("connects");
        sqlx::query(sqlx::AssertSqlSafe(statement.to_owned()))
            .execute(&mut conn)
            .await
            .expect("the data changes");
    }
}

impl Waiting for Postgres {
    async fn open_waiting(wait: std::time::Duration) -> Self {
        let options = PgOptions {
            updates_wait: Some(wait),
            ..PgOptions::default()
        };
        Self::open_with(test_postgres::TestDatabase::create().await, options).await
    }
}

fn client(name: &str) -> ClientId {
    ClientId::parse(name).expect("an id")
}

fn at(second: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 21, 9, 0, second)
        .single()
        .expect("a time")
}

/// A text message, accepted, stored under `client_message_id` if given.
pub(super) fn message(
    client_id: &str,
    client_message_id: Option<&str>,
    content: &str,
) -> NewMessage {
    NewMessage {
        client_id: client(client_id),
        client_message_id: client_message_id.map(str::to_owned),
        kind: MessageType::Text,
        content: content.to_owned(),
        filename: None,
        mime_type: None,
        size_bytes: None,
        timezone: Timezone::parse("Asia/Tokyo").expect("a zone"),
        status: MessageStatus::Accepted,
        reason: None,
        client_timestamp: Some("client clock".into()),
        received_at: at(0),
    }
}

fn reply(reply_type: ReplyType, content: &str) -> NewReply {
    NewReply {
        reply_type,
        content: content.to_owned(),
        filename: (reply_type != ReplyType::Text).then(|| format!("{content}.bin")),
        mime_type: (reply_type != ReplyType::Text).then(|| "application/octet-stream".into()),
        fallback: reply_type == ReplyType::Text && content.contains("fallback"),
    }
}

async fn replied(
    store: &dyn Store,
    message_id: i64,
    client_id: &str,
    replies: Vec<NewReply>,
) -> Vec<StoredReply> {
    store
        .insert_replies(message_id, &client(client_id), replies, at(1), true)
        .await
        .expect("replies stored")
}

async fn all_history(store: &dyn Store, client_id: &str) -> Vec<StoredMessage> {
    store
        .history(&client(client_id), None, 100)
        .await
        .expect("history")
}

async fn ids_follow_the_order_of_the_calls(backend: impl Backend) {
    let store = backend.store();
    // Taken in by the store as they are called, committed together.
    let pending: Vec<_> = (0..40)
        .map(|n| store.insert_message(message(&format!("c{}", n % 3), Some(&format!("m{n}")), "x")))
        .collect();
    let ids: Vec<i64> = join_all(pending)
        .await
        .into_iter()
        .map(|inserted| match inserted.expect("stored") {
            Inserted::New(id) => id,
            other => panic!("{other:?}"),
        })
        .collect();
    assert!(ids.windows(2).all(|pair| pair[0] < pair[1]), "{ids:?}");
    let later = stored(store, message("c0", Some("later"), "x")).await;
    assert!(later > ids[39]);
}

async fn a_native_resend_returns_the_first_message(backend: impl Backend) {
    let store = backend.store();
    let mut first = message("alice", Some("m1"), "hello");
    first.status = MessageStatus::Rejected;
    first.reason = Some("too early".into());
    let id = stored(store, first).await;
    let again = store
        .insert_message(message("alice", Some("m1"), "hello again"))
        .await
        .expect("answered");
    assert_eq!(
        again,
        Inserted::Duplicate(Existing {
            id,
            status: MessageStatus::Rejected,
            reason: Some("too early".into()),
            received_at: at(0),
        })
    );
    // Twice in one batch: the first is stored, the second is its duplicate.
    let (one, two) = futures::join!(
        store.insert_message(message("alice", Some("twice"), "a")),
        store.insert_message(message("alice", Some("twice"), "b")),
    );
    let Inserted::New(first_of_two) = one.expect("stored") else {
        panic!("the first of the two is new");
    };
    assert!(
        matches!(two.expect("answered"), Inserted::Duplicate(Existing { id, .. }) if id == first_of_two)
    );
    // Another client's id, and messages without an id (legacy), are always new.
    stored(store, message("bob", Some("m1"), "mine")).await;
    stored(store, message("alice", None, "legacy")).await;
    stored(store, message("alice", None, "legacy")).await;
    let history = all_history(store, "alice").await;
    assert_eq!(history.len(), 4);
    assert_eq!(history.last().map(|m| m.content.as_str()), Some("hello"));
}

async fn replies_are_stored_once_per_type_and_numbered_per_client(backend: impl Backend) {
    let store = backend.store();
    let image = stored(store, message("carol", Some("i"), "a picture")).await;
    let text = stored(store, message("carol", Some("t"), "words")).await;
    let other = stored(store, message("dave", Some("t"), "words")).await;

    // The media first, the text later (a slow model): the set completes with the text.
    let media = store
        .insert_replies(
            image,
            &client("carol"),
            vec![
                reply(ReplyType::Voice, "voice"),
                reply(ReplyType::Image, "image"),
            ],
            at(1),
            false,
        )
        .await
        .expect("stored");
    assert_eq!(media.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(
        all_history(store, "carol").await[1].status,
        MessageStatus::Accepted
    );
    let completes = |read: Vec<super::MissedReply>| {
        read.into_iter()
            .map(|m| (m.reply.seq, m.completes))
            .collect::<Vec<_>>()
    };
    let read = store.replies_after(&client("carol"), 0, 10).await;
    assert_eq!(completes(read.expect("read")), [(1, false), (2, false)]);
    let first = replied(store, text, "carol", vec![reply(ReplyType::Text, "first")]).await;
    assert_eq!(first[0].seq, 3);
    let dave = replied(store, other, "dave", vec![reply(ReplyType::Text, "his")]).await;
    assert_eq!(dave[0].seq, 1, "each client has a stream of its own");

    // A job processed twice: what is stored stands, and only what is missing is added.
    let again = replied(
        store,
        image,
        "carol",
        vec![
            reply(ReplyType::Text, "the text"),
            reply(ReplyType::Voice, "another voice"),
            reply(ReplyType::Image, "another image"),
        ],
    )
    .await;
    assert_eq!(
        again
            .iter()
            .map(|r| (r.reply_type, r.content.as_str(), r.seq))
            .collect::<Vec<_>>(),
        [
            (ReplyType::Text, "the text", 4),
            (ReplyType::Voice, "voice", 1),
            (ReplyType::Image, "image", 2),
        ]
    );
    assert_eq!(again[1].id, media[0].id);
    let twice = replied(store, text, "carol", vec![reply(ReplyType::Text, "second")]).await;
    assert_eq!(twice, first, "the first reply set stands");

    let history = all_history(store, "carol").await;
    assert!(history.iter().all(|m| m.status == MessageStatus::Replied));
    let replies: Vec<u64> = history
        .iter()
        .flat_map(|m| m.replies.iter().map(|r| r.seq))
        .collect();
    assert_eq!(replies.len(), 4, "no reply stored twice: {history:?}");
    assert_eq!(store.latest_seq(&client("carol")).await.expect("read"), 4);
    // Each message's last reply says that it ends the set.
    let read = store.replies_after(&client("carol"), 0, 10).await;
    assert_eq!(
        completes(read.expect("read")),
        [(1, false), (2, false), (3, true), (4, true)]
    );
    assert_eq!(store.latest_seq(&client("nobody")).await.expect("read"), 0);
}

async fn one_reply_set_sent_twice_at_once_is_stored_once(backend: impl Backend) {
    let store = backend.store();
    let id = stored(store, message("fay", Some("1"), "hello")).await;
    // Sent together, as two workers that took the same job would: on the database stores
    // they usually share a batch.
    let set = || {
        vec![
            reply(ReplyType::Text, "text"),
            reply(ReplyType::Voice, "voice"),
        ]
    };
    let (one, two) = futures::join!(
        replied(store, id, "fay", set()),
        replied(store, id, "fay", set())
    );
    assert_eq!(one, two, "both are answered with the replies stored");
    assert_eq!(one.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(store.latest_seq(&client("fay")).await.expect("read"), 2);
}

/// Connections admitted together read their streams' ends together (PostgreSQL answers them
/// with one statement): each gets its own client's end, however many share the read.
async fn stream_ends_read_at_once_are_each_their_clients_own(backend: impl Backend) {
    let store = backend.store();
    for (name, replies) in [("gus", 1), ("hal", 3)] {
        for n in 0..replies {
            let id = stored(store, message(name, Some(&n.to_string()), "hi")).await;
            replied(store, id, name, vec![reply(ReplyType::Text, "hello")]).await;
        }
    }
    let names = ["gus", "hal", "ivy", "hal", "gus"];
    let ids: Vec<ClientId> = (0..40).map(|i| client(names[i % names.len()])).collect();
    let ends = futures::future::join_all(ids.iter().map(|id| store.latest_seq(id))).await;
    let ends: Vec<(&str, u64)> = ids
        .iter()
        .zip(ends)
        .map(|(id, end)| (id.as_str(), end.expect("read")))
        .collect();
    let expected = |name: &str| match name {
        "gus" => 1,
        "hal" => 3,
        _ => 0,
    };
    assert!(
        ends.iter().all(|&(name, end)| end == expected(name)),
        "{ends:?}"
    );
}

async fn a_reply_to_a_message_never_stored_is_refused(backend: impl Backend) {
    let store = backend.store();
    let real = stored(store, message("erin", Some("1"), "hello")).await;
    let refused = store
        .insert_replies(
            real + 1_000,
            &client("erin"),
            vec![reply(ReplyType::Text, "to nobody")],
            at(1),
            true,
        )
        .await;
    assert!(refused.is_err(), "{refused:?}");
    // Nothing of it was kept: the client's stream still starts at 1.
    let first = replied(store, real, "erin", vec![reply(ReplyType::Text, "hi")]).await;
    assert_eq!(first[0].seq, 1);
    assert_eq!(store.latest_seq(&client("erin")).await.expect("read"), 1);
}

async fn the_stream_reads_back_in_order_and_delivered_is_never_overwritten(backend: impl Backend) {
    let store = backend.store();
    let mut seqs = Vec::new();
    for n in 0..5 {
        let id = stored(store, message("erin", Some(&format!("m{n}")), "hi")).await;
        seqs.extend(
            replied(
                store,
                id,
                "erin",
                vec![reply(ReplyType::Text, &format!("r{n}"))],
            )
            .await,
        );
    }
    let after_two = store
        .replies_after(&client("erin"), 2, 2)
        .await
        .expect("read");
    assert_eq!(
        after_two
            .iter()
            .map(|m| (m.reply.seq, m.client_message_id.as_deref()))
            .collect::<Vec<_>>(),
        [(3, Some("m2")), (4, Some("m3"))]
    );

    // Written to a legacy socket, then a late failure: delivered stays delivered.
    store.record_delivery(seqs[0].id, Delivery::Delivered, at(2));
    store.record_delivery(seqs[0].id, Delivery::Failed, at(3));
    // Acknowledged up to 3; the client leaves having acknowledged 3: 4 and 5 failed.
    store.record_received(&client("erin"), 3, at(4));
    store.record_departure(&client("erin"), 3, at(5));
    // A departure that says less does not undo an acknowledgement.
    store.record_departure(&client("erin"), 1, at(6));
    backend.settle().await;
    let replies = store
        .replies_after(&client("erin"), 0, 10)
        .await
        .expect("read");
    let deliveries: Vec<Delivery> = replies.iter().map(|m| m.reply.delivery).collect();
    assert_eq!(
        deliveries,
        [
            Delivery::Delivered,
            Delivery::Delivered,
            Delivery::Delivered,
            Delivery::Failed,
            Delivery::Failed
        ]
    );
    assert_eq!(replies[0].reply.delivered_at, Some(at(2)));
    assert_eq!(replies[2].reply.delivered_at, Some(at(4)));
    assert_eq!(store.acknowledged(&client("erin")).await.expect("read"), 3);
    // An older acknowledgement changes nothing.
    store.record_received(&client("erin"), 2, at(7));
    // Acknowledged on a later connection: failed becomes delivered.
    store.record_received(&client("erin"), 5, at(8));
    backend.settle().await;
    assert_eq!(store.acknowledged(&client("erin")).await.expect("read"), 5);
    let replies = store
        .replies_after(&client("erin"), 0, 10)
        .await
        .expect("read");
    assert!(
        replies
            .iter()
            .all(|m| m.reply.delivery == Delivery::Delivered)
    );
    assert_eq!(replies[3].reply.delivered_at, Some(at(8)));
}

async fn cursor_pages_stay_correct_while_new_messages_arrive(backend: impl Backend) {
    let store = backend.store();
    for n in 0..7 {
        stored(
            store,
            message("fay", Some(&format!("old{n}")), &format!("old{n}")),
        )
        .await;
        stored(store, message("someone-else", Some(&format!("x{n}")), "x")).await;
    }
    let first = store.history(&client("fay"), None, 3).await.expect("read");
    let mut seen: Vec<String> = first.iter().map(|m| m.content.clone()).collect();
    for n in 0..4 {
        stored(
            store,
            message("fay", Some(&format!("new{n}")), &format!("new{n}")),
        )
        .await;
    }
    let mut before = first.last().map(|m| m.id);
    while let Some(cursor) = before {
        let page = store
            .history(&client("fay"), Some(cursor), 3)
            .await
            .expect("read");
        seen.extend(page.iter().map(|m| m.content.clone()));
        before = (page.len() == 3).then(|| page[2].id);
    }
    let expected: Vec<String> = (0..7).rev().map(|n| format!("old{n}")).collect();
    assert_eq!(seen, expected, "no gap, no repeat");

    let (page, total) = store
        .history_by_offset(&client("fay"), 2, 3)
        .await
        .expect("read");
    assert_eq!(total, 11);
    assert_eq!(
        page.iter().map(|m| m.content.as_str()).collect::<Vec<_>>(),
        ["new1", "new0", "old6"]
    );
    let only = all_history(store, "fay").await;
    assert_eq!(only[0].client_timestamp.as_deref(), Some("client clock"));
    assert_eq!(only[0].timezone.name(), "Asia/Tokyo");
}

async fn unfinished_messages_survive_an_unclean_stop(backend: impl Durable) {
    let store = backend.store();
    let done = stored(store, message("gus", Some("done"), "answered")).await;
    replied(store, done, "gus", vec![reply(ReplyType::Text, "yes")]).await;
    let waiting = stored(store, message("gus", Some("waiting"), "not yet")).await;
    let mut rejected = message("gus", Some("no"), "rejected");
    rejected.status = MessageStatus::Rejected;
    stored(store, rejected).await;
    let backend = backend.crash_and_reopen().await;
    let store = backend.store();
    let unfinished = store.unfinished_messages().await.expect("read");
    assert_eq!(
        unfinished.iter().map(|m| m.id).collect::<Vec<_>>(),
        [waiting]
    );
    // The reply the stopped run never got to its client counts as not delivered.
    let replies = store
        .replies_after(&client("gus"), 0, 10)
        .await
        .expect("read");
    assert_eq!(replies[0].reply.delivery, Delivery::Failed);
    // New ids continue after the old ones.
    assert!(stored(store, message("gus", Some("next"), "x")).await > waiting);
}

async fn close_writes_everything_sent_before_it(backend: impl Durable) {
    let store = backend.store();
    let id = stored(store, message("hal", Some("m"), "x")).await;
    let replies = replied(store, id, "hal", vec![reply(ReplyType::Text, "r")]).await;
    store.record_received(&client("hal"), replies[0].seq, at(9));
    let backend = backend.close_and_reopen().await;
    let read = backend
        .store()
        .replies_after(&client("hal"), 0, 10)
        .await
        .expect("read");
    assert_eq!(read[0].reply.delivery, Delivery::Delivered);
    assert!(
        backend
            .store()
            .insert_message(message("hal", Some("m"), "x"))
            .await
            .is_ok_and(|inserted| matches!(inserted, Inserted::Duplicate(_)))
    );
}

async fn a_failed_batchs_delivery_updates_are_written_by_a_later_one(backend: impl Durable) {
    let store = backend.store();
    let id = stored(store, message("ida", Some("m"), "x")).await;
    let replies = replied(
        store,
        id,
        "ida",
        vec![reply(ReplyType::Text, "r"), reply(ReplyType::Voice, "v")],
    )
    .await;
    backend.refuse_reply_updates(true).await;
    store.record_delivery(replies[0].id, Delivery::Delivered, at(10));
    store.record_received(&client("ida"), replies[1].seq, at(11));
    // The batch that holds them fails.
    while !backend.has_refused().await {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    backend.refuse_reply_updates(false).await;
    // Whatever writes next writes them too.
    stored(store, message("ida", Some("n"), "y")).await;
    backend.settle().await;
    let read = store
        .replies_after(&client("ida"), 0, 10)
        .await
        .expect("read");
    assert_eq!(
        read.iter()
            .map(|m| (m.reply.delivery, m.reply.delivered_at))
            .collect::<Vec<_>>(),
        [
            (Delivery::Delivered, Some(at(10))),
            (Delivery::Delivered, Some(at(11)))
        ]
    );
    assert_eq!(
        store.acknowledged(&client("ida")).await.expect("read"),
        replies[1].seq
    );
}

/// A negative stream position can only be a corrupt row: reading it is an error that says so,
/// never a position.
async fn a_negative_stream_position_reads_as_corrupt(backend: impl Durable) {
    let store = backend.store();
    let id = stored(store, message("jan", Some("m"), "x")).await;
    replied(store, id, "jan", vec![reply(ReplyType::Text, "r")]).await;
    backend
        .tamper("UPDATE replies SET seq = -1 WHERE client_id = 'jan'")
        .await;
    fn corrupt<T>(read: &Result<T, StoreError>) -> bool {
        matches!(read, Err(StoreError::Corrupt(what)) if what == "reply seq -1")
    }
    let latest = store.latest_seq(&client("jan")).await;
    assert!(corrupt(&latest), "{latest:?}");
    let history = store.history(&client("jan"), None, 10).await;
    assert!(corrupt(&history), "{history:?}");
    // A job processed twice is answered with the replies stored before, read as every read
    // reads them: the writer's error names the same value. (Through the writer's batch it is
    // a failed write, not `Corrupt`.)
    let again = store
        .insert_replies(
            id,
            &client("jan"),
            vec![reply(ReplyType::Text, "r")],
            at(1),
            true,
        )
        .await;
    assert!(
        matches!(&again, Err(err) if err.to_string().contains("reply seq -1")),
        "{again:?}"
    );
}

macro_rules! contract {
    ($backend:ident, $name:ident $(, durable: $($durable:ident),*)?) => {
        mod $name {
            use super::*;

            #[tokio::test]
            async fn ids_follow_the_order_of_the_calls() {
                super::ids_follow_the_order_of_the_calls($backend::open().await).await;
            }

            #[tokio::test]
            async fn a_native_resend_returns_the_first_message() {
                super::a_native_resend_returns_the_first_message($backend::open().await).await;
            }

            #[tokio::test]
            async fn replies_are_stored_once_per_type_and_numbered_per_client() {
                super::replies_are_stored_once_per_type_and_numbered_per_client(
                    $backend::open().await,
                )
                .await;
            }

            #[tokio::test]
            async fn one_reply_set_sent_twice_at_once_is_stored_once() {
                super::one_reply_set_sent_twice_at_once_is_stored_once($backend::open().await).await;
            }

            #[tokio::test]
            async fn stream_ends_read_at_once_are_each_their_clients_own() {
                super::stream_ends_read_at_once_are_each_their_clients_own(
                    $backend::open().await,
                )
                .await;
            }

            #[tokio::test]
            async fn a_reply_to_a_message_never_stored_is_refused() {
                super::a_reply_to_a_message_never_stored_is_refused($backend::open().await).await;
            }

            #[tokio::test]
            async fn the_stream_reads_back_in_order_and_delivered_is_never_overwritten() {
                super::the_stream_reads_back_in_order_and_delivered_is_never_overwritten(
                    $backend::open().await,
                )
                .await;
            }

            #[tokio::test]
            async fn cursor_pages_stay_correct_while_new_messages_arrive() {
                super::cursor_pages_stay_correct_while_new_messages_arrive($backend::open().await)
                    .await;
            }

            $($(
                #[tokio::test]
                async fn $durable() {
                    super::$durable($backend::open().await).await;
                }
            )*)?
        }
    };
}

contract!(Memory, memory);
contract!(
    Sqlite,
    sqlite,
    durable: unfinished_messages_survive_an_unclean_stop,
    close_writes_everything_sent_before_it,
    a_failed_batchs_delivery_updates_are_written_by_a_later_one,
    a_negative_stream_position_reads_as_corrupt
);
contract!(
    Postgres,
    postgres,
    durable: unfinished_messages_survive_an_unclean_stop,
    close_writes_everything_sent_before_it,
    a_failed_batchs_delivery_updates_are_written_by_a_later_one,
    a_negative_stream_position_reads_as_corrupt
);

/// Delivery marks and acknowledgements wait for a batch of messages or replies to ride with, on
/// either database: on their own they were a third of a writer's commits at a few hundred
/// messages a second. Alone, they go once the wait is over; a departure takes them at once; a
/// store dropped without a close still writes them.
mod updates_wait {
    use super::*;
    use std::collections::HashMap;
    use std::time::{Duration, Instant};

    /// An hour: what goes at once cannot pass for having waited it.
    pub(super) const AN_HOUR: Duration = Duration::from_secs(3600);

    /// A store whose updates wait `wait`, and a message of `name`'s with its two replies.
    pub(super) async fn answered<B: Waiting>(name: &str, wait: Duration) -> (B, Vec<StoredReply>) {
        let backend = B::open_waiting(wait).await;
        let id = stored(backend.store(), message(name, Some("m1"), "hello")).await;
        let replies = vec![reply(ReplyType::Text, "hi"), reply(ReplyType::Voice, "hum")];
        let replies = replied(backend.store(), id, name, replies).await;
        (backend, replies)
    }

    /// The delivery of each of `name`'s replies, as the store reads it back.
    async fn deliveries(store: &dyn Store, name: &str) -> HashMap<i64, Delivery> {
        all_history(store, name)
            .await
            .into_iter()
            .flat_map(|stored| stored.replies)
            .map(|reply| (reply.id, reply.delivery))
            .collect()
    }

    /// Polls until reply `id` of `name`'s reads as `expected`, for at most ten seconds.
    async fn wait_for(store: &dyn Store, name: &str, id: i64, expected: Delivery) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = deliveries(store, name).await.get(&id).copied();
            if now == Some(expected) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "reply {id} is {now:?}, not {expected:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub(super) async fn they_ride_with_the_next_write<B: Waiting>() {
        let (backend, replies) = answered::<B>("ann", AN_HOUR).await;
        let store = backend.store();
        store.record_delivery(replies[0].id, Delivery::Delivered, at(2));
        store.record_received(&client("ann"), replies[1].seq, at(3));
        // Time for the writer to have written them, had they not waited (microseconds).
        // Nothing can be waited for instead: waiting is the point.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let waiting = deliveries(store, "ann").await;
        assert!(
            waiting
                .values()
                .all(|delivery| *delivery == Delivery::Pending),
            "{waiting:?}"
        );
        assert_eq!(store.acknowledged(&client("ann")).await.expect("read"), 0);

        stored(store, message("ann", Some("m2"), "and then")).await;
        let written = deliveries(store, "ann").await;
        assert!(
            replies
                .iter()
                .all(|reply| written[&reply.id] == Delivery::Delivered),
            "{written:?}"
        );
        assert_eq!(
            store.acknowledged(&client("ann")).await.expect("read"),
            replies[1].seq
        );
        store.close().await;
    }

    pub(super) async fn alone_they_go_once_the_wait_is_over<B: Waiting>() {
        let (backend, replies) = answered::<B>("bob", Duration::from_millis(20)).await;
        let store = backend.store();
        store.record_delivery(replies[0].id, Delivery::Delivered, at(2));
        wait_for(store, "bob", replies[0].id, Delivery::Delivered).await;
        store.close().await;
    }

    pub(super) async fn a_departure_goes_at_once_and_takes_what_waits_with_it<B: Waiting>() {
        let (backend, replies) = answered::<B>("cat", AN_HOUR).await;
        let store = backend.store();
        store.record_delivery(replies[0].id, Delivery::Delivered, at(2));
        // The client saw the first reply and left before the second.
        store.record_departure(&client("cat"), replies[0].seq, at(3));
        wait_for(store, "cat", replies[1].id, Delivery::Failed).await;
        assert_eq!(
            deliveries(store, "cat").await[&replies[0].id],
            Delivery::Delivered
        );
        store.close().await;
    }

    pub(super) async fn a_store_dropped_without_closing_writes_what_waits<B: Waiting>() {
        let (backend, replies) = answered::<B>("dan", AN_HOUR).await;
        backend
            .store()
            .record_delivery(replies[0].id, Delivery::Delivered, at(2));
        let reopened = backend.crash_and_reopen().await;
        wait_for(reopened.store(), "dan", replies[0].id, Delivery::Delivered).await;
        reopened.store().close().await;
    }

    macro_rules! updates_wait {
        ($backend:ident, $name:ident) => {
            mod $name {
                use super::super::$backend;

                #[tokio::test]
                async fn they_ride_with_the_next_write() {
                    super::they_ride_with_the_next_write::<$backend>().await;
                }

                #[tokio::test]
                async fn alone_they_go_once_the_wait_is_over() {
                    super::alone_they_go_once_the_wait_is_over::<$backend>().await;
                }

                #[tokio::test]
                async fn a_departure_goes_at_once_and_takes_what_waits_with_it() {
                    super::a_departure_goes_at_once_and_takes_what_waits_with_it::<$backend>()
                        .await;
                }

                #[tokio::test]
                async fn a_store_dropped_without_closing_writes_what_waits() {
                    super::a_store_dropped_without_closing_writes_what_waits::<$backend>().await;
                }
            }
        };
    }

    updates_wait!(Sqlite, sqlite);
    updates_wait!(Postgres, postgres);
}

/// What only a store that several processes share does: keep the in-flight limit for all of
/// them, and hand each stuck message to one sweeper.
mod shared_postgres {
    use super::*;
    use std::time::Duration;

    async fn shared(database: &test_postgres::TestDatabase, max_in_flight: u32) -> PgStore {
        admitting(database, max_in_flight, None).await
    }

    /// A gateway's store: its messages carry its id.
    async fn admitting(
        database: &test_postgres::TestDatabase,
        max_in_flight: u32,
        gateway: Option<&str>,
    ) -> PgStore {
        let options = PgOptions {
            shared: Some(PgShared {
                max_in_flight,
                admitted_by: gateway.map(Into::into),
            }),
            ..PgOptions::default()
        };
        PgStore::connect(&database.url, options)
            .await
            .expect("the PostgreSQL store opens")
    }

    /// The ids of the messages a sweeper claimed.
    fn ids_of(claimed: Result<Vec<StoredMessage>, StoreError>) -> Vec<i64> {
        claimed
            .expect("claimed")
            .into_iter()
            .map(|message| message.id)
            .collect()
    }

    #[tokio::test]
    async fn the_in_flight_limit_holds_across_processes_and_frees_up_as_replies_are_stored() {
        let database = test_postgres::TestDatabase::create().await;
        let (a, b) = tokio::join!(shared(&database, 5), shared(&database, 5));
        // 40 accepted messages at once, half through each process.
        let sent = (0..40).map(|i| {
            let store = if i % 2 == 0 { &a } else { &b };
            store.insert_message(message(&format!("c{i}"), None, "hello"))
        });
        let outcomes: Vec<Inserted> = join_all(sent)
            .await
            .into_iter()
            .map(|outcome| outcome.expect("answered"))
            .collect();
        let new: Vec<i64> = outcomes
            .iter()
            .filter_map(|outcome| match outcome {
                Inserted::New(id) => Some(*id),
                _ => None,
            })
            .collect();
        let busy = outcomes
            .iter()
            .filter(|outcome| **outcome == Inserted::Busy)
            .count();
        assert_eq!((new.len(), busy), (5, 35), "{outcomes:?}");
        assert_eq!(a.in_flight().await.expect("counted"), 5);

        // A rejected message holds no slot.
        let mut rejected = message("late", None, "too late");
        rejected.status = MessageStatus::Rejected;
        assert!(matches!(
            b.insert_message(rejected).await.expect("answered"),
            Inserted::New(_)
        ));
        assert_eq!(
            a.insert_message(message("c99", None, "one more"))
                .await
                .expect("answered"),
            Inserted::Busy
        );
        // A reply set that completes a message frees its slot, for either process.
        // Which five got in depends on which process's batch locked the count first.
        let (index, first) = outcomes
            .iter()
            .enumerate()
            .find_map(|(i, outcome)| match outcome {
                Inserted::New(id) => Some((i, *id)),
                _ => None,
            })
            .expect("five were admitted");
        replied(
            &a,
            first,
            &format!("c{index}"),
            vec![reply(ReplyType::Text, "hi")],
        )
        .await;
        assert!(matches!(
            b.insert_message(message("c99", None, "one more"))
                .await
                .expect("answered"),
            Inserted::New(_)
        ));
        let completed = b.message(first).await.expect("read").expect("stored");
        assert_eq!(completed.status, MessageStatus::Replied);
        // A sweep updates the accepted messages without changing the count.
        let swept = a.claim_stuck(Duration::ZERO, 100).await.expect("swept");
        assert_eq!(swept.len(), 5);
        // The kept count against the rows themselves.
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&database.url)
            .await
            .expect("connected");
        // As kaiwa reads a message's status: a reply set completes it without rewriting its
        // row (PostgreSQL migration 11).
        let accepted = format!(
            "{} = 'accepted'",
            <sqlx::Postgres as super::super::read::Dialect>::status_of("m")
        );
        let counted: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT COUNT(*) FROM messages AS m WHERE {accepted}"
        )))
        .fetch_one(&mut conn)
        .await
        .expect("counted");
        assert_eq!(
            u64::try_from(counted).expect("a count"),
            a.in_flight().await.expect("read")
        );
        assert_eq!(counted, 5);
        // And the table that recovery and the sweepers read holds those same messages.
        let mut ids = Vec::new();
        for query in [
            "SELECT message_id FROM unfinished ORDER BY 1".to_owned(),
            format!("SELECT m.id FROM messages AS m WHERE {accepted} ORDER BY 1"),
        ] {
            let listed: Vec<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(query))
                .fetch_all(&mut conn)
                .await
                .expect("listed");
            ids.push(listed);
        }
        assert_eq!(ids[0], ids[1]);
        a.close().await;
        b.close().await;
    }

    /// Admission in the insert: accepted messages go in in the order they came while there is
    /// room, and a rejected one among them goes in regardless.
    #[tokio::test]
    async fn the_room_left_goes_to_the_first_accepted_messages_in_order() {
        let database = test_postgres::TestDatabase::create().await;
        let store = shared(&database, 2).await;
        let mut rejected = message("r", None, "too late");
        rejected.status = MessageStatus::Rejected;
        let sent = vec![
            message("a", None, "first"),
            rejected,
            message("b", None, "second"),
            message("c", None, "third"),
        ];
        let outcomes: Vec<Inserted> = join_all(sent.into_iter().map(|m| store.insert_message(m)))
            .await
            .into_iter()
            .map(|outcome| outcome.expect("answered"))
            .collect();
        let admitted: Vec<bool> = outcomes
            .iter()
            .map(|outcome| matches!(outcome, Inserted::New(_)))
            .collect();
        assert_eq!(admitted, [true, true, true, false], "{outcomes:?}");
        assert_eq!(outcomes[3], Inserted::Busy, "{outcomes:?}");
        assert_eq!(store.in_flight().await.expect("counted"), 2);
        store.close().await;
    }

    /// A batch locks the count before it inserts any row: a row inserted while it waits for
    /// the lock could be waited for in turn by the batch that holds it (the same client message
    /// id in both), a deadlock that stalls every gateway's admission. Fails with the count read
    /// by the first accepted row's comparison (2bc84a8): the holder's insert then waits on the
    /// batch's rejected row until its lock timeout.
    #[tokio::test]
    async fn a_batch_waiting_for_the_count_has_inserted_nothing() {
        let database = test_postgres::TestDatabase::create().await;
        let store = Arc::new(shared(&database, 10).await);
        let mut watcher = database.connect().await;
        // The writer is kept on a batch of its own, held by a table lock, so that the two
        // messages below wait in its channel and are taken as one batch: sent while it is
        // idle, its thread may wake between them and take the rejected row alone.
        let mut blocker = database.connect().await;
        let blocker_pid = run(&mut blocker, "BEGIN; LOCK TABLE messages IN SHARE MODE").await;
        let mut early = message("cx", Some("X"), "early");
        early.status = MessageStatus::Rejected;
        let early = tokio::spawn(store.insert_message(early));
        wait_until_blocked_by(&mut watcher, blocker_pid).await;
        let mut holder = database.connect().await;
        let holder_pid = run(
            &mut holder,
            "BEGIN; SELECT accepted FROM in_flight WHERE shard = 0 FOR UPDATE",
        )
        .await;
        let mut rejected = message("cy", Some("Y"), "too late");
        rejected.status = MessageStatus::Rejected;
        // Sent now, while the writer waits: one batch, the rejected row first.
        let batch = tokio::spawn(join_all([
            store.insert_message(rejected),
            store.insert_message(message("cz", Some("Z"), "hello")),
        ]));
        run(&mut blocker, "COMMIT").await;
        assert!(matches!(
            early.await.expect("the early batch ends"),
            Ok(Inserted::New(_))
        ));
        wait_until_blocked_by(&mut watcher, holder_pid).await;
        // The same client message id, from the lock's holder: nothing of the batch's to wait for.
        run(&mut holder, "SET lock_timeout = '500ms'").await;
        sqlx::query(
            "INSERT INTO messages (client_id, client_msg_id, message_type, content, timezone, \
                 status, received_at) \
             VALUES ('cy', 'Y', 'text', 'first', 'UTC', 'rejected', now()) ON CONFLICT DO NOTHING",
        )
        .execute(&mut holder)
        .await
        .expect("the holder's insert does not wait for the batch that waits for it");
        run(&mut holder, "COMMIT").await;
        let outcomes: Vec<Inserted> = batch
            .await
            .expect("the batch ends")
            .into_iter()
            .map(|outcome| outcome.expect("answered"))
            .collect();
        assert!(
            matches!(&outcomes[0], Inserted::Duplicate(existing) if existing.status == MessageStatus::Rejected),
            "{outcomes:?}"
        );
        assert!(matches!(outcomes[1], Inserted::New(_)), "{outcomes:?}");
    }

    /// Runs statements on `conn` (no parameters) and returns its backend's pid.
    async fn run(conn: &mut sqlx::PgConnection, statements: &'static str) -> i32 {
        use sqlx::Executor;
        conn.execute(statements).await.expect("ran");
        sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(conn)
            .await
            .expect("read")
    }

    /// Waits until some backend waits for a lock that backend `pid` holds.
    async fn wait_until_blocked_by(watcher: &mut sqlx::PgConnection, pid: i32) {
        for _ in 0..1000 {
            let blocked: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
            )
            .bind(pid)
            .fetch_one(&mut *watcher)
            .await
            .expect("read");
            if blocked > 0 {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("nothing ever waited for backend {pid}'s lock");
    }

    /// The count's shards after completions (shards 1 to 8 below zero) and an operator's
    /// TRUNCATE: zero in all, and the limit as before.
    #[tokio::test]
    async fn a_truncate_leaves_the_count_at_zero_and_the_limit_exact() {
        let database = test_postgres::TestDatabase::create().await;
        let store = shared(&database, 3).await;
        for i in 0..3 {
            let id = stored(&store, message(&format!("t{i}"), None, "hello")).await;
            if i == 0 {
                replied(&store, id, "t0", vec![reply(ReplyType::Text, "hi")]).await;
            }
        }
        assert_eq!(store.in_flight().await.expect("counted"), 2);
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&database.url)
            .await
            .expect("connected");
        sqlx::query("TRUNCATE messages")
            .execute(&mut conn)
            .await
            .expect("truncated");
        assert_eq!(store.in_flight().await.expect("counted"), 0);
        let unfinished: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM unfinished")
            .fetch_one(&mut conn)
            .await
            .expect("counted");
        assert_eq!(unfinished, 0);
        // Shards 1 to 8 were left as they were (one below zero), shard 0 made up for them.
        let below: i64 = sqlx::query_scalar("SELECT MIN(accepted) FROM in_flight WHERE shard <> 0")
            .fetch_one(&mut conn)
            .await
            .expect("read");
        assert_eq!(below, -1);
        let outcomes: Vec<Inserted> = join_all(
            (0..5).map(|i| store.insert_message(message(&format!("u{i}"), None, "again"))),
        )
        .await
        .into_iter()
        .map(|outcome| outcome.expect("answered"))
        .collect();
        let busy = outcomes.iter().filter(|o| **o == Inserted::Busy).count();
        assert_eq!(busy, 2, "{outcomes:?}");
        store.close().await;
    }

    #[tokio::test]
    async fn a_stuck_message_is_claimed_by_one_sweeper_at_a_time() {
        let database = test_postgres::TestDatabase::create().await;
        let (a, b) = tokio::join!(shared(&database, 500), shared(&database, 500));
        let mut ids = Vec::new();
        for i in 0..30 {
            // Received long ago: stuck for any timeout.
            ids.push(stored(&a, message(&format!("c{i}"), None, "hello")).await);
        }
        let done = ids[0];
        replied(&a, done, "c0", vec![reply(ReplyType::Text, "hi")]).await;
        let after = Duration::from_secs(60);
        let (by_a, by_b) = tokio::join!(a.claim_stuck(after, 20), b.claim_stuck(after, 20));
        let mut claimed = ids_of(by_a);
        claimed.extend(ids_of(by_b));
        claimed.sort_unstable();
        assert_eq!(
            claimed,
            ids[1..],
            "each unfinished message once, by one of the two"
        );
        assert!(
            a.claim_stuck(after, 100).await.expect("claimed").is_empty(),
            "a claimed message waits `after` before anyone claims it again"
        );
        a.close().await;
        b.close().await;
    }

    /// A completion takes the message out of `unfinished` without touching its row
    /// (PostgreSQL migration 11): until it commits, a sweeper must not claim the message and
    /// queue it again; if it rolls back, the message is stuck as before.
    #[tokio::test]
    async fn a_message_whose_completion_is_under_way_is_not_claimed() {
        let database = test_postgres::TestDatabase::create().await;
        let store = shared(&database, 500).await;
        let id = stored(&store, message("c1", None, "hello")).await;
        let mut completing = database.connect().await;
        // What `write_batch` does to complete a message, held open.
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "BEGIN; DELETE FROM unfinished WHERE message_id = {id};"
        )))
        .execute(&mut completing)
        .await
        .expect("a completion under way");
        assert!(
            ids_of(store.claim_stuck(Duration::ZERO, 100).await).is_empty(),
            "claimed while its completion was under way"
        );
        sqlx::raw_sql("ROLLBACK")
            .execute(&mut completing)
            .await
            .expect("the completion rolled back");
        assert_eq!(ids_of(store.claim_stuck(Duration::ZERO, 100).await), [id]);
        store.close().await;
    }

    #[tokio::test]
    async fn the_messages_of_a_gateway_whose_lease_ended_are_claimed_at_once_and_once() {
        let database = test_postgres::TestDatabase::create().await;
        let (dead, alive) = tokio::join!(
            admitting(&database, 500, Some("gw-dead")),
            admitting(&database, 500, Some("gw-alive"))
        );
        let mut conn = database.connect().await;
        sqlx::query(
            "INSERT INTO gateways (id, started_at, lease_until) VALUES \
             ('gw-dead', now(), now() - interval '1 second'), \
             ('gw-alive', now(), now() + interval '1 hour')",
        )
        .execute(&mut conn)
        .await
        .expect("the gateways");
        let left = stored(&dead, message("d1", None, "hello")).await;
        let answered = stored(&dead, message("d2", None, "hello")).await;
        replied(&dead, answered, "d2", vec![reply(ReplyType::Text, "hi")]).await;
        stored(&alive, message("a1", None, "hello")).await;
        let claimed = ids_of(alive.claim_orphaned(100).await);
        assert_eq!(
            claimed,
            [left],
            "only the unanswered message of the gateway whose lease ended"
        );
        assert!(
            dead.claim_orphaned(100).await.expect("claimed").is_empty(),
            "claimed once: the next pass leaves it to the stuck sweep"
        );
        dead.close().await;
        alive.close().await;
    }

    #[tokio::test]
    async fn a_gateway_back_under_its_id_claims_what_its_last_run_left_at_once_and_once() {
        let database = test_postgres::TestDatabase::create().await;
        let (last_run, other) = tokio::join!(
            admitting(&database, 500, Some("gw-back")),
            admitting(&database, 500, Some("gw-other"))
        );
        let left = stored(&last_run, message("l1", None, "hello")).await;
        let answered = stored(&last_run, message("l2", None, "hello")).await;
        replied(
            &last_run,
            answered,
            "l2",
            vec![reply(ReplyType::Text, "hi")],
        )
        .await;
        stored(&other, message("o1", None, "hello")).await;
        // The new run begins; what it admits from then on is its own, not left.
        let started = at(30);
        let mut own = message("n1", None, "hello");
        own.received_at = at(31);
        stored(&last_run, own).await;
        let gateway = crate::domain::GatewayId::new("gw-back");
        let claimed = ids_of(other.claim_left_by(&gateway, started, 100).await);
        assert_eq!(
            claimed,
            [left],
            "only the unanswered message the gateway admitted before its new run began"
        );
        assert!(
            other
                .claim_left_by(&gateway, started, 100)
                .await
                .expect("claimed")
                .is_empty(),
            "claimed once: the next pass leaves it to the stuck sweep"
        );
        last_run.close().await;
        other.close().await;
    }
}

/// What only the PostgreSQL store's writer has: its batch is one call of `write_batch`
/// (migration 10), whose plans are made once per connection and kept.
mod postgres_plans {
    use super::*;
    use std::time::{Duration, Instant};

    /// The tables that grow with every message.
    const GROWING: [&str; 3] = ["messages", "replies", "reply_streams"];

    /// One of each thing a batch writes: a message, its replies (which complete it), a
    /// delivery mark, an acknowledgement and a departure, each of them seen through to the
    /// database (the writer takes commands in order, so a message stored after an update was
    /// written with it or after it).
    async fn one_of_each(store: &PgStore, round: u32) {
        let name = format!("c{round}");
        let id = stored(store, message(&name, Some(&format!("m{round}")), "hello")).await;
        let replies = replied(
            store,
            id,
            &name,
            vec![reply(ReplyType::Text, "hi"), reply(ReplyType::Voice, "hum")],
        )
        .await;
        store.record_delivery(replies[0].id, Delivery::Delivered, at(2));
        store.record_received(&client(&name), replies[1].seq, at(3));
        store.record_departure(&client(&name), replies[0].seq, at(4));
        stored(store, message(&name, None, "and then")).await;
    }

    /// (rows read, rows inserted) per growing table, as the statistics have them now: rows
    /// read by sequential scans and index entries read by index scans (with sequential scans
    /// off, a plan that reads a whole table does it through an index).
    async fn scans(conn: &mut sqlx::PgConnection) -> Vec<(String, i64, i64)> {
        sqlx::query("SELECT pg_stat_clear_snapshot()")
            .execute(&mut *conn)
            .await
            .expect("a fresh snapshot");
        sqlx::query_as(
            "SELECT t.relname::text, t.seq_tup_read + COALESCE((SELECT SUM(i.idx_tup_read) \
                 FROM pg_stat_user_indexes AS i WHERE i.relid = t.relid), 0)::bigint, \
                 t.n_tup_ins \
             FROM pg_stat_user_tables AS t WHERE t.relname = ANY($1) ORDER BY t.relname",
        )
        .bind(&GROWING[..])
        .fetch_all(&mut *conn)
        .await
        .expect("statistics")
    }

    /// A database of the test's own (dropped with it), a connection of the test's to it, and
    /// a store of one process on it.
    async fn own_database() -> (test_postgres::TestDatabase, sqlx::PgConnection, PgStore) {
        let database = test_postgres::TestDatabase::create().await;
        let conn = database.connect().await;
        let store = PgStore::connect(&database.url, PgOptions::default())
            .await
            .expect("the PostgreSQL store opens");
        (database, conn, store)
    }

    /// The plans are made while the tables are empty, and kept as the tables grow, with no
    /// statistics to say so (autovacuum off for them, nothing analyzed): had any of them scanned
    /// a table whole, each batch would now read 100,000 rows.
    #[tokio::test]
    async fn plans_made_on_empty_tables_scan_no_table_once_it_has_grown() {
        let (_database, mut conn, store) = own_database().await;
        // Statistics that say the tables are empty, as a fresh database's first analysis does
        // (never analyzed, the planner would assume ten pages of rows instead), and kept so.
        sqlx::raw_sql(
            "ALTER TABLE messages SET (autovacuum_enabled = false); \
             ALTER TABLE replies SET (autovacuum_enabled = false); \
             ALTER TABLE reply_streams SET (autovacuum_enabled = false); \
             ANALYZE messages, replies, reply_streams;",
        )
        .execute(&mut conn)
        .await
        .expect("analyzed empty, autovacuum off");
        for round in 0..3 {
            one_of_each(&store, round).await;
        }
        sqlx::raw_sql(
            "INSERT INTO messages (client_id, message_type, content, timezone, status, \
                 received_at) \
             SELECT 'bulk' || (g % 1000), 'text', 'x', 'UTC', 'replied', now() \
             FROM generate_series(1, 100000) AS g; \
             INSERT INTO replies (message_id, client_id, seq, reply_type, content, delivery, \
                 created_at) \
             SELECT id, client_id, id, 'text', 'y', 'delivered', now() FROM messages \
             WHERE client_id LIKE 'bulk%'; \
             INSERT INTO reply_streams (client_id, acknowledged) \
             SELECT DISTINCT client_id, 0 FROM messages WHERE client_id LIKE 'bulk%';",
        )
        .execute(&mut conn)
        .await
        .expect("tables grown");

        // Every insert so far counted (the growth's and the three rounds' two messages each):
        // the counts that come after are the next round's alone.
        let grown = wait_for_inserts(&mut conn, 100_006).await;
        one_of_each(&store, 3).await;
        let after = wait_for_inserts(&mut conn, inserted(&grown) + 2).await;
        // A round reads a few rows of each table; a table read whole is 100,000.
        for ((table, read_before, _), (_, read_after, _)) in grown.iter().zip(&after) {
            assert!(
                read_after - read_before < 1_000,
                "the writer's batches read {} rows of {table}",
                read_after - read_before
            );
        }
        store.close().await;
    }

    /// The sweeps (one process's, and the cluster's three claims) with statistics that say
    /// `unfinished` holds 100,000 rows while it holds three, as after a backlog: had any of
    /// them joined `messages` to it the planner's way, it would read all 100,000 messages.
    #[tokio::test]
    async fn sweeps_read_unfinished_messages_by_id_whatever_the_statistics_say() {
        let (_database, mut conn, store) = own_database().await;
        sqlx::raw_sql(
            "ALTER TABLE messages SET (autovacuum_enabled = false); \
             ALTER TABLE unfinished SET (autovacuum_enabled = false); \
             INSERT INTO messages (client_id, message_type, content, timezone, status, \
                 received_at) \
             SELECT 'bulk' || (g % 1000), 'text', 'x', 'UTC', \
                 CASE WHEN g <= 3 THEN 'accepted' ELSE 'replied' END, now() - interval '1 hour' \
             FROM generate_series(1, 100000) AS g; \
             INSERT INTO unfinished (message_id) SELECT -g FROM generate_series(1, 100000) AS g; \
             ANALYZE messages, unfinished; \
             DELETE FROM unfinished WHERE message_id < 0;",
        )
        .execute(&mut conn)
        .await
        .expect("a backlog's statistics");
        let before = messages_read(&mut conn).await;

        let swept = store.unfinished_messages().await.expect("the sweep reads");
        assert_eq!(swept.len(), 3);
        let claimed = store
            .claim_stuck(Duration::from_secs(60), 100)
            .await
            .expect("claimed");
        assert_eq!(claimed.len(), 3);
        for claim in [
            store.claim_orphaned(100).await,
            store
                .claim_left_by(&crate::domain::GatewayId::new("gone"), Utc::now(), 100)
                .await,
        ] {
            assert!(claim.expect("claimed").is_empty());
        }

        let after = messages_read_once_closed(store, &mut conn).await;
        assert!(
            after.1 - before.1 < 1_000,
            "the sweeps read {} rows of messages ({} scans)",
            after.1 - before.1,
            after.0 - before.0
        );
    }

    /// Looking for orphans (every second in every process of a cluster) costs nothing while
    /// every gateway's lease runs: before, it looked up every unfinished message, up to
    /// `--max-in-flight` of them, to find none whose gateway's lease had ended.
    #[tokio::test]
    async fn looking_for_orphans_reads_no_message_while_every_lease_runs() {
        let (_database, mut conn, store) = own_database().await;
        sqlx::raw_sql(
            "INSERT INTO gateways (id, started_at, lease_until) \
                 VALUES ('gw-alive', now(), now() + interval '1 hour'); \
             INSERT INTO messages (client_id, message_type, content, timezone, status, \
                 received_at, admitted_by) \
             SELECT 'c' || g, 'text', 'x', 'UTC', 'accepted', now() - interval '1 hour', \
                 'gw-alive' \
             FROM generate_series(1, 100) AS g;",
        )
        .execute(&mut conn)
        .await
        .expect("unfinished messages of a live gateway");
        let before = messages_read(&mut conn).await;
        for _ in 0..3 {
            assert!(store.claim_orphaned(100).await.expect("looked").is_empty());
        }
        let after = messages_read_once_closed(store, &mut conn).await;
        assert_eq!(
            (after.0 - before.0, after.1 - before.1),
            (0, 0),
            "scans and rows of messages read"
        );
    }

    /// `messages_read` once `store` is closed: a backend's counts reach the statistics when
    /// it exits, if not before, so once the store's connections are gone they are all there.
    async fn messages_read_once_closed(
        store: PgStore,
        conn: &mut sqlx::PgConnection,
    ) -> (i64, i64) {
        store.close().await;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let others: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND backend_type = 'client backend' AND pid <> pg_backend_pid()",
            )
            .fetch_one(&mut *conn)
            .await
            .expect("the database's connections");
            if others == 0 {
                return messages_read(conn).await;
            }
            assert!(
                Instant::now() < deadline,
                "the store's connections never closed"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// (scans, rows read) of `messages` as the statistics have them now, by sequential and
    /// index scans together.
    async fn messages_read(conn: &mut sqlx::PgConnection) -> (i64, i64) {
        sqlx::query("SELECT pg_stat_clear_snapshot()")
            .execute(&mut *conn)
            .await
            .expect("a fresh snapshot");
        sqlx::query_as(
            "SELECT (seq_scan + COALESCE(idx_scan, 0))::bigint, \
                 (seq_tup_read + COALESCE(idx_tup_fetch, 0))::bigint \
             FROM pg_stat_user_tables WHERE relname = 'messages'",
        )
        .fetch_one(&mut *conn)
        .await
        .expect("statistics")
    }

    /// Rows inserted into `messages`, as counted in `rows`.
    fn inserted(rows: &[(String, i64, i64)]) -> i64 {
        rows.iter()
            .find(|(table, _, _)| table == "messages")
            .map_or(0, |(_, _, inserts)| *inserts)
    }

    /// The statistics once they count `floor` rows inserted into `messages`: a backend's
    /// counts reach them within seconds of its transaction, not at once.
    async fn wait_for_inserts(
        conn: &mut sqlx::PgConnection,
        floor: i64,
    ) -> Vec<(String, i64, i64)> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let now = scans(conn).await;
            if inserted(&now) >= floor {
                return now;
            }
            assert!(
                Instant::now() < deadline,
                "the statistics never counted the inserts: {now:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// On PostgreSQL, the updates that waited are written by the very transaction of the write they
/// rode with (`updates_wait` sees only that they were written by the time it was answered).
mod postgres_updates {
    use super::*;
    use std::time::Duration;

    /// The reply's delivery, and the transaction that last wrote its row.
    async fn delivery(conn: &mut sqlx::PgConnection, reply_id: i64) -> (String, String) {
        sqlx::query_as("SELECT delivery, xmin::text FROM replies WHERE id = $1")
            .bind(reply_id)
            .fetch_one(conn)
            .await
            .expect("the reply")
    }

    #[tokio::test]
    async fn delivery_marks_and_acknowledgements_ride_with_the_next_message() {
        let (ann, replies) = updates_wait::answered::<Postgres>("ann", updates_wait::AN_HOUR).await;
        let mut conn = ann.database.connect().await;
        ann.store
            .record_delivery(replies[0].id, Delivery::Delivered, at(2));
        ann.store
            .record_received(&client("ann"), replies[1].seq, at(3));
        // Time for the writer, idle on its own thread, to take the updates as a batch of their
        // own (microseconds): sent right after them, the message could join them in one batch
        // whether updates wait or not. Nothing can be waited for instead: waiting is the point.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let next = stored(ann.store.as_ref(), message("ann", Some("m2"), "and then")).await;

        let message_written_by: String =
            sqlx::query_scalar("SELECT xmin::text FROM messages WHERE id = $1")
                .bind(next)
                .fetch_one(&mut conn)
                .await
                .expect("the message");
        for reply in &replies {
            assert_eq!(
                delivery(&mut conn, reply.id).await,
                ("delivered".to_owned(), message_written_by.clone()),
                "reply {} was marked in the message's transaction",
                reply.id
            );
        }
        let acknowledged: (i64, String) = sqlx::query_as(
            "SELECT acknowledged, xmin::text FROM reply_streams WHERE client_id = 'ann'",
        )
        .fetch_one(&mut conn)
        .await
        .expect("the stream");
        assert_eq!(
            acknowledged,
            (
                i64::try_from(replies[1].seq).expect("a seq"),
                message_written_by
            )
        );
        ann.store.close().await;
    }
}

/// Under steady traffic the PostgreSQL writer's small batches wait until
/// `PgOptions::write_interval` after the call before began, and go together; the first write,
/// and a batch of 64 commands, go at once.
mod postgres_write_interval {
    use super::*;
    use std::time::Duration;

    async fn store_with(interval: Duration) -> (test_postgres::TestDatabase, PgStore) {
        let database = test_postgres::TestDatabase::create().await;
        let options = PgOptions {
            write_interval: interval,
            ..PgOptions::default()
        };
        let store = PgStore::connect(&database.url, options)
            .await
            .expect("the PostgreSQL store opens");
        (database, store)
    }

    /// The transaction that wrote each message.
    async fn written_by(database: &test_postgres::TestDatabase, ids: &[i64]) -> Vec<String> {
        let mut conn = database.connect().await;
        let mut writers = Vec::new();
        for id in ids {
            let xmin: String = sqlx::query_scalar("SELECT xmin::text FROM messages WHERE id = $1")
                .bind(id)
                .fetch_one(&mut conn)
                .await
                .expect("the message");
            writers.push(xmin);
        }
        writers
    }

    /// Long enough that the third message below comes within it on a busy machine.
    const INTERVAL: Duration = Duration::from_secs(2);
    /// An hour: what must go at once cannot pass for having waited it.
    const AN_HOUR: Duration = Duration::from_secs(3600);
    /// A bound for what goes at once, far below [`AN_HOUR`].
    const AT_ONCE: Duration = Duration::from_secs(60);

    #[tokio::test]
    async fn writes_that_come_within_the_interval_go_together() {
        let (database, store) = store_with(INTERVAL).await;
        let first = stored(&store, message("ann", Some("m1"), "one")).await;
        // The writer is idle when the second comes, and would take it alone; the third comes
        // after that would have been written (milliseconds). Nothing can be waited for
        // instead: the wait is the point.
        let (second, third) =
            tokio::join!(stored(&store, message("ann", Some("m2"), "two")), async {
                tokio::time::sleep(Duration::from_millis(100)).await;
                stored(&store, message("ann", Some("m3"), "three")).await
            });
        let writers = written_by(&database, &[first, second, third]).await;
        assert_ne!(writers[0], writers[1], "the first went alone");
        assert_eq!(writers[1], writers[2], "the two after it went together");
        store.close().await;
    }

    #[tokio::test]
    async fn the_first_write_and_a_full_batch_go_at_once() {
        let (database, store) = store_with(AN_HOUR).await;
        let first =
            tokio::time::timeout(AT_ONCE, stored(&store, message("bob", Some("m0"), "first")))
                .await
                .expect("the first write went at once");
        let many = join_all((1..=64).map(|n| {
            let store = &store;
            async move { stored(store, message("bob", Some(&format!("m{n}")), "more")).await }
        }));
        let many = tokio::time::timeout(AT_ONCE, many)
            .await
            .expect("64 messages went at once");
        let writers = written_by(&database, &many).await;
        assert!(
            writers.iter().all(|w| *w == writers[0]),
            "one batch: {writers:?}"
        );
        assert_ne!(written_by(&database, &[first]).await[0], writers[0]);
        tokio::time::timeout(AT_ONCE, store.close())
            .await
            .expect("the close went at once");
    }

    #[tokio::test]
    async fn a_departure_goes_at_once_and_takes_what_waits_with_it() {
        let (database, store) = store_with(AN_HOUR).await;
        let id = stored(&store, message("cat", Some("m1"), "hello")).await;
        // The reply waits for the hour; the client leaves before it got it, and its departure
        // takes the reply along at once.
        let replied = replied(&store, id, "cat", vec![reply(ReplyType::Text, "hi")]);
        let left = async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            store.record_departure(&client("cat"), 0, at(3));
        };
        let (replies, ()) = tokio::time::timeout(AT_ONCE, async { tokio::join!(replied, left) })
            .await
            .expect("the departure went at once, with the reply");
        let mut conn = database.connect().await;
        let delivery: String = sqlx::query_scalar("SELECT delivery FROM replies WHERE id = $1")
            .bind(replies[0].id)
            .fetch_one(&mut conn)
            .await
            .expect("the reply");
        assert_eq!(delivery, "failed");
        tokio::time::timeout(AT_ONCE, store.close())
            .await
            .expect("the close went at once");
    }
}
