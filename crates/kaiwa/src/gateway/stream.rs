//! A native client's reply stream on one connection. Replies go out in `seq` order, each once,
//! whether they arrive live from the workers or are read back from the store: on resume, on
//! `sync`, or when a live reply went missing on its way here. The client says where it stopped
//! (`after`), and the stream goes on from there with no gap and no duplicate at the seam between
//! replayed and live replies: that is what makes every reply arrive exactly once across
//! reconnects.

use super::outbox::Outbox;
use super::wire::{About, Protocol};
use crate::domain::ClientId;
use crate::queue::MessageRef;
use crate::store::{MissedReply, Store, StoredReply};
use kaiwa_protocol::{ErrorCode, MessageStatus};
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::task::TaskTracker;

/// Replies read from the store at a time.
const PAGE: u32 = 200;
/// How long a live reply that came ahead of its turn waits for the one before it, before that
/// one is read from the store. Two workers that finish together report their replies in either
/// order, so the missing one is usually a moment behind; one that does not come at all (its
/// event was lost, or went to the client's previous connection) costs this much latency once.
const GAP_WAIT: Duration = Duration::from_millis(100);
/// Live replies held ahead of their turn, at most; past that, the stream reads from the store
/// at once instead of holding more.
const MAX_AHEAD: usize = 256;
/// Reads that may find nothing although a reply is known to be stored (it was committed before
/// it was announced, so this means a store that lags): then the client is told to `sync`.
const MAX_EMPTY_READS: u32 = 10;

/// How many finished messages a stream remembers, to send each one's `replied` once: a
/// redelivered job reports again within seconds, while a client has at most its in-flight
/// allowance of messages finishing meanwhile.
const FINISHED_KEPT: usize = 256;

/// A reply reported by a worker; `last` marks the end of its message's reply set.
#[derive(Debug)]
pub(crate) struct Live {
    pub message: MessageRef,
    pub reply: StoredReply,
    pub last: bool,
}

pub(crate) struct ReplyStream {
    client_id: ClientId,
    outbox: Outbox,
    store: Arc<dyn Store>,
    /// Where catch-up tasks run, so shutdown waits for them.
    tracker: TaskTracker,
    state: Mutex<State>,
    /// Wakes a catch-up task that waits for a gap to close: a live reply closed it, a replay
    /// was asked for, or too many replies wait ahead.
    wake: Notify,
}

struct State {
    /// The `seq` of the last reply handed to the outbox: the stream's position.
    sent: u64,
    /// The replies after `began` (the position the connection began at) up to `sent_here`
    /// went out on this connection, in order. A `sync` that goes back over them sends them
    /// again without their statuses: those went out once on this connection with the replies,
    /// and [`State::finished`] may have forgotten them since.
    began: u64,
    sent_here: u64,
    /// The highest `seq` known to be stored (from live replies): a catch-up runs until it has
    /// sent at least that far.
    known: u64,
    /// Live replies that came before their turn, by `seq`.
    ahead: BTreeMap<u64, Live>,
    catch_up: CatchUp,
    /// The replay the client asked for (resume or `sync`): the replies it has sent. It ends
    /// with `synced`.
    replay: Option<u32>,
    /// Replies the client said it had (resuming, or with `sync`): the `replied` of the set each
    /// ends, if it ends one, goes out before the replay. A connection that ended between that
    /// reply and the status left the client without it, and the store says whether it is owed.
    /// Usually empty, and then it holds no memory.
    had: Vec<u64>,
    /// Bumped when the client moves the position (`sync` with `after`), so that a page read
    /// from the old position is not sent.
    generation: u64,
    /// Messages whose `processing` status went out. A reply read back from the store can
    /// overtake its message's `processing` on the way here: the status then goes out before
    /// it, and the late event is dropped. An entry lives until the live event of the message's
    /// last reply, which comes after every other event of the message.
    started: HashSet<i64>,
    /// Messages whose `replied` status went out lately. A job handed to a second worker (the
    /// first died before telling the queue it was done) reports its stored replies again, and
    /// with them the end of the message: its `replied` must not go out twice.
    finished: VecDeque<i64>,
}

impl State {
    /// Whether reply `seq` went out on this connection already.
    fn sent_here_before(&self, seq: u64) -> bool {
        self.began < seq && seq <= self.sent_here
    }

    /// Reply `seq` went out: the stream stands there.
    fn advance(&mut self, seq: u64) {
        self.sent = seq;
        self.sent_here = self.sent_here.max(seq);
    }
}

/// The one task that may read the stream back from the store, and what it is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CatchUp {
    Idle,
    /// Waiting (at most [`GAP_WAIT`]) for a live reply to close a gap.
    Waiting,
    /// Reading from the store and sending, at the client's pace.
    Reading,
}

impl std::fmt::Debug for ReplyStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplyStream")
            .field("client_id", &self.client_id)
            .field("sent", &self.sent())
            .finish_non_exhaustive()
    }
}

impl ReplyStream {
    /// A stream whose client has everything up to `position`.
    pub(crate) fn new(
        client_id: ClientId,
        outbox: Outbox,
        store: Arc<dyn Store>,
        tracker: TaskTracker,
        position: u64,
    ) -> Arc<Self> {
        Arc::new(Self {
            client_id,
            outbox,
            store,
            tracker,
            state: Mutex::new(State {
                sent: position,
                began: position,
                sent_here: position,
                known: position,
                ahead: BTreeMap::new(),
                catch_up: CatchUp::Idle,
                replay: None,
                had: Vec::new(),
                generation: 0,
                started: HashSet::new(),
                // Grown as messages finish: most connections finish few or none, and 256 ids
                // up front were a fifth of an idle connection's heap.
                finished: VecDeque::new(),
            }),
            wake: Notify::new(),
        })
    }

    /// The `seq` of the last reply handed to the outbox.
    pub(crate) fn sent(&self) -> u64 {
        self.lock().sent
    }

    /// The highest `seq` this connection was offered or sent.
    pub(crate) fn known(&self) -> u64 {
        let state = self.lock();
        state.known.max(state.sent)
    }

    /// Replies up to `seq` are stored, and some may have been offered to the client's previous
    /// connection instead of this one: they are read back from the store unless sent already.
    pub(crate) fn expect(self: &Arc<Self>, seq: u64) {
        let mut state = self.lock();
        if seq <= state.known.max(state.sent) {
            return;
        }
        state.known = seq;
        if state.catch_up == CatchUp::Idle {
            state.catch_up = CatchUp::Reading;
            self.spawn(false);
        }
        // A task already waiting or reading goes on until it has sent up to `known`.
    }

    /// A worker took a message: its `processing` status, unless a reply of it went out already.
    pub(crate) fn processing(&self, message: &MessageRef) {
        let mut state = self.lock();
        self.start(&mut state, message);
    }

    /// A message's processing failed: nothing more of it is coming.
    pub(crate) fn forget(&self, message_id: i64) {
        self.lock().started.remove(&message_id);
    }

    /// A reply from a worker. In its turn it goes out at once; ahead of its turn it waits for
    /// the ones before it, which are read from the store if they do not come soon. False if the
    /// outbox is full (the client is then disconnected as slow, and resumes).
    pub(crate) fn offer(self: &Arc<Self>, live: Live) -> bool {
        let mut state = self.lock();
        let seq = live.reply.seq;
        state.known = state.known.max(seq);
        if seq <= state.sent {
            // Sent already, read back from the store: only the status that follows it is owed.
            return !live.last || self.finish(&mut state, &live.message);
        }
        if seq == state.sent + 1 {
            let pushed = self.push_live(&mut state, live);
            self.take_ahead(&mut state);
            if state.ahead.is_empty() && state.catch_up == CatchUp::Waiting {
                self.wake.notify_waiters();
            }
            return pushed;
        }
        if state.ahead.len() < MAX_AHEAD {
            state.ahead.insert(seq, live);
        } else {
            // The store has it; reading from it now beats holding more.
            self.wake.notify_waiters();
        }
        if state.catch_up == CatchUp::Idle {
            state.catch_up = CatchUp::Waiting;
            self.spawn(true);
        }
        true
    }

    /// Sends every reply after `after` (default: after the last one sent), in order, then
    /// `synced`. Live replies that arrive meanwhile take their turn in the same order. The
    /// client had the reply at `after`, if given: see [`State::had`].
    pub(crate) fn replay(self: &Arc<Self>, after: Option<u64>) {
        self.begin_replay(after, after);
    }

    /// The replay a resumed connection begins with, from the position the stream was made
    /// with, which live replies may have moved on since: `had` is the reply the client said it
    /// had (none when its cursor went beyond the stream and was cut back to its end).
    pub(crate) fn resume(self: &Arc<Self>, had: Option<u64>) {
        self.begin_replay(None, had);
    }

    fn begin_replay(self: &Arc<Self>, after: Option<u64>, had: Option<u64>) {
        let mut state = self.lock();
        if let Some(after) = after
            && after != state.sent
        {
            state.sent = after;
            state.generation += 1;
            self.take_ahead(&mut state);
        }
        state.replay.get_or_insert(0);
        if let Some(had) = had.filter(|&seq| seq > 0) {
            state.had.push(had);
        }
        match state.catch_up {
            CatchUp::Idle => {
                state.catch_up = CatchUp::Reading;
                self.spawn(false);
            }
            CatchUp::Waiting => {
                state.catch_up = CatchUp::Reading;
                self.wake.notify_waiters();
            }
            CatchUp::Reading => {}
        }
    }

    fn spawn(self: &Arc<Self>, wait_for_gap: bool) {
        let stream = self.clone();
        self.tracker
            .spawn(async move { stream.catch_up(wait_for_gap).await });
    }

    /// The catch-up task: waits for a gap to close if asked to, else reads the stream back from
    /// the store until everything known to be stored is sent; ends when nothing is left to do.
    async fn catch_up(self: Arc<Self>, mut wait_for_gap: bool) {
        loop {
            if wait_for_gap {
                let woken = self.wake.notified();
                tokio::pin!(woken);
                // Registered before the check, so a wake between the two is not missed.
                woken.as_mut().enable();
                if self.lock().catch_up == CatchUp::Waiting {
                    tokio::select! {
                        () = tokio::time::sleep(GAP_WAIT) => {}
                        () = woken => {}
                    }
                }
                let mut state = self.lock();
                let gap = !state.ahead.is_empty() || state.known > state.sent;
                match state.catch_up {
                    CatchUp::Reading => {}
                    _ if !gap => {
                        state.catch_up = CatchUp::Idle;
                        return;
                    }
                    _ => state.catch_up = CatchUp::Reading,
                }
            }
            let Some(read_up_to) = self.read_from_store().await else {
                let mut state = self.lock();
                state.catch_up = CatchUp::Idle;
                state.replay = None;
                return;
            };
            let mut state = self.lock();
            if state.generation != read_up_to || !state.had.is_empty() {
                // A replay was asked for after the read ended: it is this task's to do.
                wait_for_gap = false;
                continue;
            }
            self.take_ahead(&mut state);
            if let Some(replies) = state.replay.take()
                && let Some(frame) = Protocol::Native.synced(replies, state.sent)
            {
                self.outbox.push(frame);
            }
            if state.ahead.is_empty() {
                state.catch_up = CatchUp::Idle;
                return;
            }
            // Live replies came in beyond a new gap while this task read.
            state.catch_up = CatchUp::Waiting;
            wait_for_gap = true;
        }
    }

    /// Reads the stream after the last reply sent and sends it, waiting for room in the outbox
    /// before each reply (a long replay goes at the client's pace and leaves room for live
    /// frames), until the store has nothing more and everything known is sent: then the
    /// generation it read for. `None` if the connection is gone or the store fails.
    async fn read_from_store(&self) -> Option<u64> {
        let mut empty_reads = 0;
        loop {
            let had = std::mem::take(&mut self.lock().had);
            for had in had {
                self.owed_replied(had).await?;
            }
            let (after, generation, replaying) = {
                let state = self.lock();
                (state.sent, state.generation, state.replay.is_some())
            };
            // Reads for a replay are the protocol working; reads for a gap in a live stream
            // mean reply events arrive out of order or go missing.
            metrics::counter!("kaiwa_reply_stream_reads_total", "why" => if replaying { "replay" } else { "gap" })
                .increment(1);
            let page = self.read_page(after, PAGE).await?;
            if page.is_empty() {
                {
                    let state = self.lock();
                    if state.generation != generation {
                        continue;
                    }
                    if state.known <= state.sent {
                        return Some(generation);
                    }
                }
                // A reply is announced only after its commit, so the next read finds it.
                empty_reads += 1;
                if empty_reads > MAX_EMPTY_READS {
                    tracing::error!(client_id = %self.client_id, after, "a reply announced as stored cannot be read back");
                    self.tell_to_sync();
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(10) * empty_reads).await;
                continue;
            }
            for MissedReply {
                reply,
                client_message_id,
                completes,
            } in page
            {
                if !self.outbox.room().await {
                    return None;
                }
                let mut state = self.lock();
                if state.generation != generation {
                    break;
                }
                let seq = reply.seq;
                if seq <= state.sent {
                    // Sent live while this task waited for room.
                    continue;
                }
                let live = state.ahead.remove(&seq);
                let message = self.message_ref(reply.message_id, client_message_id);
                let replayed = state.replay.is_some();
                let again = state.sent_here_before(seq);
                // The message's `processing` comes first, in a replay too: one may carry the
                // replies of a message sent on this very connection, whose live `processing`
                // then comes too late to go out (after `replied`).
                if !again {
                    self.start(&mut state, &message);
                }
                if !self
                    .outbox
                    .push(Protocol::Native.reply(&message, reply, replayed))
                {
                    return None;
                }
                state.advance(seq);
                if let Some(count) = state.replay.as_mut() {
                    *count += 1;
                }
                // The store says whether the message is complete, so its `replied` goes out
                // even if the live event that would have carried it was lost (in an outage of
                // the broker, say); a replay sends it for the messages it covers, but not for
                // replies this connection sent before, whose statuses went out with them.
                if !again && (completes || live.is_some_and(|live| live.last)) {
                    self.finish(&mut state, &message);
                }
            }
        }
    }

    /// Replies after `after`, at most `limit`; `None` (the client told to `sync`) if the store
    /// fails.
    async fn read_page(&self, after: u64, limit: u32) -> Option<Vec<MissedReply>> {
        match self
            .store
            .replies_after(&self.client_id, after, limit)
            .await
        {
            Ok(page) => Some(page),
            Err(err) => {
                tracing::error!(client_id = %self.client_id, %err, "could not read replies back from the store");
                self.tell_to_sync();
                None
            }
        }
    }

    /// Sends the `replied` of the set that reply `had` ends, if it ends one and this connection
    /// did not send that reply (and with it the status).
    async fn owed_replied(&self, had: u64) -> Option<()> {
        if self.lock().sent_here_before(had) {
            return Some(());
        }
        let page = self.read_page(had - 1, 1).await?;
        if let Some(last) = page.into_iter().next()
            && last.reply.seq == had
            && last.completes
        {
            let message = self.message_ref(last.reply.message_id, last.client_message_id);
            self.finish(&mut self.lock(), &message);
        }
        Some(())
    }

    fn message_ref(&self, message_id: i64, client_message_id: Option<String>) -> MessageRef {
        MessageRef {
            client_id: self.client_id.clone(),
            message_id,
            client_message_id,
            receipt: None,
        }
    }

    /// Sends the live replies that are now in their turn, and forgets those already sent
    /// (keeping the status owed after them).
    fn take_ahead(&self, state: &mut State) {
        while let Some(entry) = state.ahead.first_entry() {
            let seq = *entry.key();
            if seq > state.sent + 1 {
                break;
            }
            let live = entry.remove();
            if seq <= state.sent {
                if live.last {
                    self.finish(state, &live.message);
                }
            } else {
                self.push_live(state, live);
            }
        }
    }

    fn push_live(&self, state: &mut State, live: Live) -> bool {
        let Live {
            message,
            reply,
            last,
        } = live;
        let seq = reply.seq;
        let again = state.sent_here_before(seq);
        if !again {
            self.start(state, &message);
        }
        if !self
            .outbox
            .push(Protocol::Native.reply(&message, reply, false))
        {
            return false;
        }
        state.advance(seq);
        !last || again || self.finish(state, &message)
    }

    /// Sends a message's `processing` status, once, before anything else of it.
    fn start(&self, state: &mut State, message: &MessageRef) {
        if !state.finished.contains(&message.message_id)
            && state.started.insert(message.message_id)
            && let Some(frame) = Protocol::Native.status(message, MessageStatus::Processing)
        {
            self.outbox.push(frame);
        }
    }

    /// Sends a message's `replied` status, on the live event of its last reply: nothing more
    /// of the message comes after it, so it is forgotten.
    fn finish(&self, state: &mut State, message: &MessageRef) -> bool {
        state.started.remove(&message.message_id);
        if state.finished.contains(&message.message_id) {
            return true;
        }
        if state.finished.len() == FINISHED_KEPT {
            state.finished.pop_front();
        }
        state.finished.push_back(message.message_id);
        Protocol::Native
            .status(message, MessageStatus::Replied)
            .is_none_or(|frame| self.outbox.push(frame))
    }

    fn tell_to_sync(&self) {
        self.outbox.push(Protocol::Native.error(
            ErrorCode::Internal,
            "could not load replies; send sync to try again".into(),
            About::nothing(),
            None,
        ));
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every change to the state is a few assignments with no await between them.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::OutboxLimits;
    use crate::store::MemoryStore;
    use axum::extract::ws::Message;
    use kaiwa_protocol::{Delivery, ReplyType};

    fn reply(seq: u64) -> StoredReply {
        StoredReply {
            id: i64::try_from(seq).expect("small"),
            message_id: 7,
            seq,
            reply_type: ReplyType::Text,
            content: "hi".into(),
            filename: None,
            mime_type: None,
            fallback: false,
            delivery: Delivery::Pending,
            created_at: chrono::Utc::now(),
            delivered_at: None,
        }
    }

    #[tokio::test]
    async fn a_reply_set_reported_twice_goes_out_once_with_one_replied() {
        let (outbox, mut frames) = Outbox::new(OutboxLimits {
            frames: 64,
            bytes: 1 << 20,
        });
        let client_id = ClientId::parse("twice").expect("an id");
        let stream = ReplyStream::new(
            client_id.clone(),
            outbox,
            Arc::new(MemoryStore::default()),
            TaskTracker::new(),
            0,
        );
        let message = MessageRef {
            client_id,
            message_id: 7,
            client_message_id: Some("m1".into()),
            receipt: None,
        };
        // The first worker's report, then the same again from the worker the job went to next.
        for _ in 0..2 {
            stream.processing(&message);
            assert!(stream.offer(Live {
                message: message.clone(),
                reply: reply(1),
                last: true,
            }));
        }
        let mut sent = Vec::new();
        while let Some(frame) = frames.try_recv() {
            if let Message::Text(text) = frame.message() {
                let value: serde_json::Value = serde_json::from_str(text).expect("JSON");
                sent.push(format!("{}:{}", value["type"], value["status"]));
            }
        }
        assert_eq!(
            sent,
            [
                r#""status":"processing""#,
                r#""reply":null"#,
                r#""status":"replied""#
            ]
        );
    }

    /// A stream over `store`, and what it has put in the outbox so far.
    fn stream_over(store: Arc<MemoryStore>, client_id: &ClientId) -> (Arc<ReplyStream>, Sent) {
        stream_at(store, client_id, 0)
    }

    /// A stream over `store` whose client has everything up to `position`.
    fn stream_at(
        store: Arc<MemoryStore>,
        client_id: &ClientId,
        position: u64,
    ) -> (Arc<ReplyStream>, Sent) {
        let (outbox, frames) = Outbox::new(OutboxLimits {
            frames: 64,
            bytes: 1 << 20,
        });
        let stream = ReplyStream::new(
            client_id.clone(),
            outbox.clone(),
            store,
            TaskTracker::new(),
            position,
        );
        (stream, Sent(frames, outbox))
    }

    /// The frames the stream put in the outbox, taken out as its writer would.
    struct Sent(crate::gateway::outbox::Frames, Outbox);

    impl Sent {
        /// The frames sent so far: `reply:<seq>`, `status:<status>`, `synced:<seq>`, `error:<code>`.
        fn sent(&mut self) -> Vec<String> {
            let mut sent = Vec::new();
            while let Some(frame) = self.0.try_recv() {
                self.1.taken(&frame);
                if let Message::Text(text) = frame.message() {
                    let value: serde_json::Value = serde_json::from_str(text).expect("JSON");
                    let detail = match value["type"].as_str() {
                        Some("reply" | "synced") => value["seq"].to_string(),
                        Some("status") => value["status"].to_string(),
                        Some("error") => value["code"].to_string(),
                        _ => String::new(),
                    };
                    sent.push(format!(
                        "{}:{}",
                        value["type"].as_str().unwrap_or("?"),
                        detail.trim_matches('"')
                    ));
                }
            }
            sent
        }
    }

    /// A message of `client_id` with a text and a voice reply stored (seq 1 and 2), its set
    /// complete.
    async fn answered(store: &MemoryStore, client_id: &ClientId) -> (MessageRef, Vec<StoredReply>) {
        answered_as(store, client_id, "m1").await
    }

    /// [`answered`], under the client's message id `id`.
    async fn answered_as(
        store: &MemoryStore,
        client_id: &ClientId,
        id: &str,
    ) -> (MessageRef, Vec<StoredReply>) {
        use crate::domain::Timezone;
        use crate::store::{Inserted, NewMessage};
        use kaiwa_protocol::MessageType;
        let inserted = store
            .insert_message(NewMessage {
                client_id: client_id.clone(),
                client_message_id: Some(id.into()),
                kind: MessageType::Voice,
                content: "voice.wav".into(),
                filename: Some("note.wav".into()),
                mime_type: Some("audio/wav".into()),
                size_bytes: Some(1),
                timezone: Timezone::parse("UTC").expect("a zone"),
                status: MessageStatus::Accepted,
                reason: None,
                client_timestamp: None,
                received_at: chrono::Utc::now(),
            })
            .await
            .expect("stored");
        let Inserted::New(message_id) = inserted else {
            panic!("not new: {inserted:?}")
        };
        let replies = [ReplyType::Text, ReplyType::Voice]
            .into_iter()
            .map(|reply_type| crate::testing::reply(reply_type, "hi"))
            .collect();
        let stored = store
            .insert_replies(message_id, client_id, replies, chrono::Utc::now(), true)
            .await
            .expect("stored");
        let message = MessageRef {
            client_id: client_id.clone(),
            message_id,
            client_message_id: Some(id.into()),
            receipt: None,
        };
        (message, stored)
    }

    #[tokio::test(start_paused = true)]
    async fn a_reply_ahead_of_its_turn_waits_for_the_one_before_it() {
        let store = Arc::new(MemoryStore::default());
        let client_id = ClientId::parse("patient").expect("an id");
        let (message, replies) = answered(&store, &client_id).await;
        let (stream, mut frames) = stream_over(store, &client_id);
        stream.processing(&message);
        let live = |index: usize| Live {
            message: message.clone(),
            reply: replies[index].clone(),
            last: index == 1,
        };
        assert!(stream.offer(live(1)));
        tokio::time::sleep(GAP_WAIT / 2).await;
        assert_eq!(frames.sent(), ["status:processing"], "2 waits for 1");
        assert!(stream.offer(live(0)));
        tokio::time::sleep(GAP_WAIT * 2).await;
        assert_eq!(frames.sent(), ["reply:1", "reply:2", "status:replied"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reply_that_never_comes_is_read_from_the_store_after_the_gap_wait() {
        let store = Arc::new(MemoryStore::default());
        let client_id = ClientId::parse("gappy").expect("an id");
        let (message, replies) = answered(&store, &client_id).await;
        let (stream, mut frames) = stream_over(store, &client_id);
        // The event of seq 1 (and of `processing`) was lost; seq 2 comes, and ends the set.
        assert!(stream.offer(Live {
            message,
            reply: replies[1].clone(),
            last: true,
        }));
        tokio::time::sleep(GAP_WAIT / 2).await;
        assert!(frames.sent().is_empty(), "2 waits for 1");
        tokio::time::sleep(GAP_WAIT).await;
        assert_eq!(
            frames.sent(),
            ["status:processing", "reply:1", "reply:2", "status:replied"]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_replay_takes_each_message_through_its_statuses_once() {
        let store = Arc::new(MemoryStore::default());
        let client_id = ClientId::parse("returning").expect("an id");
        let (message, _) = answered(&store, &client_id).await;
        let (stream, mut frames) = stream_over(store, &client_id);
        stream.replay(Some(0));
        tokio::time::sleep(Duration::from_millis(10)).await;
        // No live event came: the store says the set is complete.
        assert_eq!(
            frames.sent(),
            [
                "status:processing",
                "reply:1",
                "reply:2",
                "status:replied",
                "synced:2"
            ]
        );
        // The message was sent on this connection, and the replay that began as it connected
        // read its replies before the worker's events came: they add nothing.
        stream.processing(&message);
        assert!(stream.offer(Live {
            message,
            reply: reply(2),
            last: true,
        }));
        assert!(frames.sent().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_sync_over_replies_this_connection_sent_repeats_no_status() {
        let store = Arc::new(MemoryStore::default());
        let client_id = ClientId::parse("rewinding").expect("an id");
        let (stream, mut frames) = stream_over(store.clone(), &client_id);
        // More finished messages than the stream remembers, each sent live with its statuses.
        let messages = FINISHED_KEPT + 4;
        for index in 0..messages {
            let (message, replies) = answered_as(&store, &client_id, &format!("m{index}")).await;
            stream.processing(&message);
            for (position, reply) in replies.into_iter().enumerate() {
                assert!(stream.offer(Live {
                    message: message.clone(),
                    reply,
                    last: position == 1,
                }));
            }
            assert_eq!(frames.sent().len(), 4, "processing, 2 replies, replied");
        }
        // The client asks for everything again: from the start, then from the end of a set
        // (whose `replied` a replay sends first when this connection did not send the reply).
        for after in [0, 4] {
            stream.replay(Some(after));
            let mut replayed = Vec::new();
            while !replayed
                .last()
                .is_some_and(|last: &String| last.starts_with("synced"))
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
                replayed.extend(frames.sent());
            }
            let total = 2 * messages as u64;
            let replies: Vec<_> = ((after + 1)..=total)
                .map(|seq| format!("reply:{seq}"))
                .collect();
            assert_eq!(replayed.len(), replies.len() + 1, "{:?}", &replayed[..8]);
            assert_eq!(
                replayed[..replies.len()],
                replies[..],
                "replies only, no status"
            );
            assert_eq!(
                replayed.last().map(String::as_str),
                Some(&*format!("synced:{total}"))
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_resume_re_sends_the_replied_of_the_set_whose_last_reply_the_client_had() {
        let store = Arc::new(MemoryStore::default());
        let client_id = ClientId::parse("cut-short").expect("an id");
        answered(&store, &client_id).await;
        // The previous connection ended between reply 2 and the `replied` after it.
        let (stream, mut frames) = stream_at(store.clone(), &client_id, 2);
        stream.resume(Some(2));
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(frames.sent(), ["status:replied", "synced:2"]);
        // Asked again on the same connection, it does not repeat itself.
        stream.replay(Some(2));
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(frames.sent(), ["synced:2"]);
        // Reply 1 does not end its set: nothing is owed for it.
        let (stream, mut frames) = stream_at(store.clone(), &client_id, 1);
        stream.resume(Some(1));
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(
            frames.sent(),
            ["status:processing", "reply:2", "status:replied", "synced:2"]
        );
        // A cursor cut back to the end of the stream names no reply the client had.
        let (stream, mut frames) = stream_at(store, &client_id, 2);
        stream.resume(None);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(frames.sent(), ["synced:2"]);
    }

    #[tokio::test(start_paused = true)]
    async fn live_replies_sent_before_a_resume_reads_are_neither_repeated_nor_in_the_way() {
        let store = Arc::new(MemoryStore::default());
        let client_id = ClientId::parse("hurried").expect("an id");
        answered(&store, &client_id).await;
        let (second, replies) = answered_as(&store, &client_id, "m2").await;
        // The client had reply 2, which ended the first set. Reply 3 comes live as the
        // connection begins (it is registered before its replay is asked for).
        let (stream, mut frames) = stream_at(store, &client_id, 2);
        stream.processing(&second);
        assert!(stream.offer(Live {
            message: second,
            reply: replies[0].clone(),
            last: false,
        }));
        stream.resume(Some(2));
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(
            frames.sent(),
            [
                "status:processing",
                "reply:3",
                // The first set's, owed since the last connection.
                "status:replied",
                "reply:4",
                "status:replied",
                "synced:4"
            ]
        );
    }
}
