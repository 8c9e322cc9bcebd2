//! A crash under load (issue 8): the real `kaiwa` process is killed with SIGKILL while native
//! clients send texts and images as fast as their acks come back, then started again on the
//! same data directory. Whatever moment the kill lands on, an ack is a promise: every acked
//! message is stored exactly once, gets its whole reply set once the restarted server has
//! processed what the crash left unfinished, and its file is the one that was sent. A message
//! whose ack never came is resent with the same id after the restart and is stored once too.
//!
//! The moment of the kill depends on timing (it is given as a number of acks seen); what the
//! test checks does not.

mod support;

use futures::SinkExt;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use support::{Socket, files, send, send_file};
use tokio::process::Child;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;

/// Native clients sending at once, each under its own client id.
const CLIENTS: usize = 6;
/// Messages a client keeps sent but not yet acked: it sends the next one as each ack arrives.
const WINDOW: usize = 4;
/// A bound on each client's messages, far above what any kill point needs.
const MAX_PER_CLIENT: usize = 1_000;
/// How long the restarted server gets to process what the crash left unfinished.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);
#[tokio::test]
async fn a_kill_after_the_first_few_acks_loses_and_duplicates_no_message() {
    crash_and_check(10).await;
}

#[tokio::test]
async fn a_kill_in_the_middle_of_the_load_loses_and_duplicates_no_message() {
    crash_and_check(150).await;
}

#[tokio::test]
async fn a_kill_late_in_the_load_loses_and_duplicates_no_message() {
    crash_and_check(1_000).await;
}

/// Runs the load, kills the server once `kill_after` acks have arrived in all, restarts it,
/// resends what was not acked, and checks the history of every client.
async fn crash_and_check(kill_after: usize) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let png = Arc::new(files::png());

    let server = Server::start(dir.path()).await;
    let (acks, mut acked_so_far) = watch::channel(0usize);
    let acks = Arc::new(acks);
    let mut load = JoinSet::new();
    for n in 0..CLIENTS {
        load.spawn(send_until_cut_off(
            server.addr,
            Ledger::new(format!("crash-{n}"), png.clone()),
            acks.clone(),
        ));
    }
    tokio::time::timeout(
        support::START_TIMEOUT,
        acked_so_far.wait_for(|acked| *acked >= kill_after),
    )
    .await
    .expect("the acks come in time")
    .expect("a client is still sending");
    server.kill().await;
    let mut ledgers = load.join_all().await;
    ledgers.sort_by(|a, b| a.client_id.cmp(&b.client_id));

    let server = Server::start(dir.path()).await;
    let mut after = JoinSet::new();
    for ledger in ledgers {
        after.spawn(resend_after_restart(server.addr, ledger));
    }
    let mut results = after.join_all().await;
    results.sort_by(|a, b| a.0.client_id.cmp(&b.0.client_id));

    let histories = settle(&server, &results).await;
    let mut tally = Tally::default();
    for ((ledger, resent), history) in results.iter().zip(&histories) {
        check_history(&server, ledger, history).await;
        tally.add(ledger, resent);
    }
    tally.image_files = support::files_under(&dir.path().join("media/images")).len();
    eprintln!("killed after {kill_after} acks: {tally:?}");
    assert!(
        tally.acked_before_the_kill >= kill_after,
        "the kill came after {kill_after} acks: {tally:?}"
    );
}

/// What one client sent, and what the server answered.
struct Ledger {
    client_id: String,
    /// The base picture; each image message sends it with its own trailer, so that no two
    /// files are alike and a file stored under the wrong message would show.
    png: Arc<Vec<u8>>,
    /// Every message the client began to write, in order, whether or not it got through.
    sent: Vec<Outgoing>,
    /// The stored id of each acked message, by client message id.
    acked: BTreeMap<String, i64>,
}

#[derive(Clone)]
struct Outgoing {
    id: String,
    body: Body,
}

#[derive(Clone)]
enum Body {
    Text(String),
    /// A PNG, in base64 in the `send` frame or as the binary frame that follows it.
    Image {
        bytes: Vec<u8>,
        binary: bool,
    },
}

impl Body {
    fn message_type(&self) -> &'static str {
        match self {
            Body::Text(_) => "text",
            Body::Image { .. } => "image",
        }
    }

    /// The reply types a message of this kind gets, in order.
    fn reply_types(&self) -> &'static [&'static str] {
        match self {
            Body::Text(_) => &["text"],
            Body::Image { .. } => &["text", "voice", "image"],
        }
    }
}

impl Ledger {
    fn new(client_id: String, png: Arc<Vec<u8>>) -> Self {
        Self {
            client_id,
            png,
            sent: Vec::new(),
            acked: BTreeMap::new(),
        }
    }

    /// The next message: two texts, then an image, with every other image sent as binary.
    fn next_message(&mut self) -> Outgoing {
        let n = self.sent.len();
        let id = format!("m{n}");
        let body = if n % 3 == 2 {
            let mut bytes = self.png.as_ref().clone();
            // Decoders stop at IEND, and kaiwa recognises a PNG by its first bytes.
            bytes.extend_from_slice(format!("{}/{id}", self.client_id).as_bytes());
            Body::Image {
                bytes,
                binary: n % 6 == 5,
            }
        } else {
            Body::Text(format!("{} says {id}: still there?", self.client_id))
        };
        let outgoing = Outgoing { id, body };
        self.sent.push(outgoing.clone());
        outgoing
    }

    fn body(&self, id: &str) -> Option<&Body> {
        self.sent.iter().find(|m| m.id == id).map(|m| &m.body)
    }
}

/// Sends with `WINDOW` messages unacked until the connection is cut (the kill), counting acks
/// in `acks`.
async fn send_until_cut_off(
    addr: SocketAddr,
    mut ledger: Ledger,
    acks: Arc<watch::Sender<usize>>,
) -> Ledger {
    let mut client = support::native_at(addr, &ledger.client_id).await;
    let mut unacked = BTreeSet::new();
    loop {
        while unacked.len() < WINDOW && ledger.sent.len() < MAX_PER_CLIENT {
            // Recorded as sent before it is written: a frame cut off halfway may or may not
            // have reached the server, and is resent either way.
            let message = ledger.next_message();
            unacked.insert(message.id.clone());
            if write(&mut client.ws, &message).await.is_err() {
                return ledger;
            }
        }
        let Ok(frame) = client.next().await else {
            return ledger;
        };
        match frame["type"].as_str() {
            Some("ack") => {
                let id = frame["id"].as_str().expect("an ack names its message");
                assert!(unacked.remove(id), "an ack for {id}, not awaited: {frame}");
                assert_eq!(frame["status"], "accepted", "{frame}");
                assert_eq!(frame.get("duplicate"), None, "a first send: {frame}");
                let message_id = frame["message_id"].as_i64().expect("a stored id");
                ledger.acked.insert(id.to_owned(), message_id);
                acks.send_modify(|count| *count += 1);
            }
            Some("error") => panic!("{}: an error under load: {frame}", ledger.client_id),
            _ => {}
        }
    }
}

/// What the client did after the restart.
#[derive(Debug, Default)]
struct Resent {
    /// Sent before the kill, not acked, resent: acked now as new (the first copy never got
    /// stored) or as a duplicate (it was stored, its ack lost in the crash).
    fresh: usize,
    duplicate: usize,
}

/// After the restart: resends every unacked message with its id, resends the last acked one
/// (which must come back as a duplicate of itself), and sends a new text and image, so that ids
/// given out after the crash are checked too.
async fn resend_after_restart(addr: SocketAddr, mut ledger: Ledger) -> (Ledger, Resent) {
    let mut client = support::native_at(addr, &ledger.client_id).await;
    let unacked: Vec<Outgoing> = ledger
        .sent
        .iter()
        .filter(|m| !ledger.acked.contains_key(&m.id))
        .cloned()
        .collect();
    let last_acked = ledger.sent.iter().rev().find_map(|m| {
        let message_id = *ledger.acked.get(&m.id)?;
        Some((m.clone(), message_id))
    });
    let mut awaited: BTreeSet<String> = unacked.iter().map(|m| m.id.clone()).collect();
    for message in &unacked {
        write(&mut client.ws, message).await.expect("resent");
    }
    if let Some((message, _)) = &last_acked {
        write(&mut client.ws, message).await.expect("resent");
        awaited.insert(message.id.clone());
    }
    // Any three in a row are two texts and an image.
    let new: Vec<Outgoing> = std::iter::repeat_with(|| ledger.next_message())
        .take(3)
        .collect();
    for message in &new {
        write(&mut client.ws, message).await.expect("sent");
        awaited.insert(message.id.clone());
    }

    let mut resent = Resent::default();
    while !awaited.is_empty() {
        let frame = client.next_json().await;
        match frame["type"].as_str() {
            Some("ack") => {}
            Some("error") => panic!("{}: an error after the restart: {frame}", ledger.client_id),
            _ => continue,
        }
        let id = frame["id"].as_str().expect("an ack names its message");
        assert!(awaited.remove(id), "an ack for {id}, not awaited: {frame}");
        let message_id = frame["message_id"].as_i64().expect("a stored id");
        let duplicate = frame["duplicate"] == true;
        if let Some((message, first)) = last_acked.as_ref().filter(|(m, _)| m.id == id) {
            assert!(duplicate, "{}: acked before the kill: {frame}", message.id);
            assert_eq!(message_id, *first, "the same message as before: {frame}");
            assert!(
                frame["status"] == "accepted" || frame["status"] == "replied",
                "{frame}"
            );
            continue;
        }
        if new.iter().any(|m| m.id == id) {
            assert!(!duplicate, "a new id: {frame}");
            assert_eq!(frame["status"], "accepted", "{frame}");
        } else if duplicate {
            assert!(
                frame["status"] == "accepted" || frame["status"] == "replied",
                "{frame}"
            );
            resent.duplicate += 1;
        } else {
            assert_eq!(frame["status"], "accepted", "{frame}");
            resent.fresh += 1;
        }
        ledger.acked.insert(id.to_owned(), message_id);
    }
    client.close().await;
    (ledger, resent)
}

/// Waits until the restarted server has processed everything: no message of any client is
/// still `accepted` and nothing is in flight. Returns every client's history, oldest first.
async fn settle(server: &Server, results: &[(Ledger, Resent)]) -> Vec<Vec<Value>> {
    let deadline = tokio::time::Instant::now() + SETTLE_TIMEOUT;
    loop {
        let mut histories = Vec::new();
        for (ledger, _) in results {
            histories.push(server.history(&ledger.client_id).await);
        }
        let unfinished: Vec<&Value> = histories
            .iter()
            .flatten()
            .filter(|m| m["status"] == "accepted")
            .collect();
        let health = server.get_json("/health").await;
        if unfinished.is_empty() && health["in_flight"] == 0 && health["queue_depth"] == 0 {
            return histories;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still unprocessed after {SETTLE_TIMEOUT:?}: {health}, {} message(s) accepted: {unfinished:?}",
            unfinished.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every acked message stored once under its ack's id, with its content, its file and its
/// whole reply set; nothing stored that was never sent.
async fn check_history(server: &Server, ledger: &Ledger, history: &[Value]) {
    let who = &ledger.client_id;
    let mut stored: BTreeMap<&str, Vec<&Value>> = BTreeMap::new();
    for message in history {
        let id = message["client_message_id"]
            .as_str()
            .unwrap_or_else(|| panic!("{who}: a stored message without its client id: {message}"));
        stored.entry(id).or_default().push(message);
    }
    let twice: Vec<_> = stored.iter().filter(|(_, m)| m.len() > 1).collect();
    assert!(twice.is_empty(), "{who}: stored more than once: {twice:?}");
    let missing: Vec<_> = ledger
        .acked
        .iter()
        .filter(|(id, _)| !stored.contains_key(id.as_str()))
        .collect();
    assert!(missing.is_empty(), "{who}: acked, not stored: {missing:?}");
    // Everything sent was resent until acked, so nothing else may be there.
    let unknown: Vec<_> = stored
        .keys()
        .filter(|id| !ledger.acked.contains_key(**id))
        .collect();
    assert!(
        unknown.is_empty(),
        "{who}: stored, never acked: {unknown:?}"
    );

    for (id, message_id) in &ledger.acked {
        let message = stored[id.as_str()][0];
        let body = ledger.body(id).expect("every acked message was sent");
        assert_eq!(
            message["id"], *message_id,
            "{who}/{id}: the acked id: {message}"
        );
        assert_eq!(
            message["message_type"],
            body.message_type(),
            "{who}/{id}: {message}"
        );
        assert_eq!(message["status"], "replied", "{who}/{id}: {message}");
        let replies: Vec<&str> = message["replies"]
            .as_array()
            .expect("replies")
            .iter()
            .map(|r| r["reply_type"].as_str().expect("a reply type"))
            .collect();
        assert_eq!(
            replies,
            body.reply_types(),
            "{who}/{id}: the reply set: {message}"
        );
        match body {
            Body::Text(text) => assert_eq!(message["content"], *text, "{who}/{id}"),
            Body::Image { bytes, .. } => {
                assert_eq!(message["size_bytes"], bytes.len(), "{who}/{id}: {message}");
                let url = message["content"].as_str().expect("the file's URL");
                let file = server.download(url).await;
                assert!(
                    file == *bytes,
                    "{who}/{id}: the stored file {url} ({} bytes) is not the {} bytes sent",
                    file.len(),
                    bytes.len()
                );
            }
        }
    }
}

/// Counts over all clients, printed for whoever reads the test output.
#[derive(Debug, Default)]
struct Tally {
    acked_before_the_kill: usize,
    unacked_stored_before_the_kill: usize,
    unacked_stored_after_the_restart: usize,
    messages: usize,
    images: usize,
    /// Files under `media/images`: more than `images` means files saved for messages the kill
    /// cut off before their commit (orphans, harmless).
    image_files: usize,
}

impl Tally {
    fn add(&mut self, ledger: &Ledger, resent: &Resent) {
        // The last three of each client were new after the restart, and one acked message
        // was acked again.
        self.acked_before_the_kill += ledger.acked.len() - 3 - resent.fresh - resent.duplicate;
        self.unacked_stored_before_the_kill += resent.duplicate;
        self.unacked_stored_after_the_restart += resent.fresh;
        self.messages += ledger.acked.len();
        self.images += ledger
            .sent
            .iter()
            .filter(|m| matches!(m.body, Body::Image { .. }) && ledger.acked.contains_key(&m.id))
            .count();
    }
}

/// Writes one message's frames; fails once the server is gone.
async fn write(
    ws: &mut Socket,
    message: &Outgoing,
) -> Result<(), tokio_tungstenite::tungstenite::Error> {
    let id = &message.id;
    match &message.body {
        Body::Text(text) => {
            ws.send(Message::text(send(id, "text", text).to_string()))
                .await
        }
        Body::Image {
            bytes,
            binary: false,
        } => {
            let frame = send_file(id, "image", &format!("{id}.png"), bytes);
            ws.send(Message::text(frame.to_string())).await
        }
        Body::Image {
            bytes,
            binary: true,
        } => {
            let frame = json!({"type": "send", "id": id, "message_type": "image", "filename": format!("{id}.png"), "binary": true});
            ws.feed(Message::text(frame.to_string())).await?;
            ws.send(Message::binary(bytes.clone())).await
        }
    }
}

/// The real `kaiwa` binary, serving on a port of its choosing.
struct Server {
    child: Child,
    addr: SocketAddr,
    http: reqwest::Client,
}

impl Server {
    /// Starts `kaiwa serve` on `data_dir` and waits for it to listen.
    async fn start(data_dir: &Path) -> Server {
        let mut command = support::serve_command(data_dir);
        command.args([
            "--bind",
            "127.0.0.1:0",
            // Short delays: at the kill, many acked messages still wait for their replies.
            "--reply-delay-scale",
            "0.05",
            // Texts are accepted at any hour, so that no message is rejected by the clock.
            "--text-window",
            "00:00-24:00",
        ]);
        let support::Listening { child, addr, .. } =
            support::start_listening("kaiwa", &mut command, data_dir).await;
        Server {
            child,
            addr,
            http: reqwest::Client::new(),
        }
    }

    /// SIGKILL: no drain, no flush, no last commit.
    async fn kill(mut self) {
        let running = self.child.try_wait().expect("its state");
        assert!(running.is_none(), "kaiwa died before the kill: {running:?}");
        self.child.kill().await.expect("kaiwa is killed");
        let status = self.child.wait().await.expect("its exit status");
        assert_eq!(status.signal(), Some(9), "{status:?}");
    }

    async fn get_json(&self, path: &str) -> Value {
        let response = self
            .http
            .get(format!("http://{}{path}", self.addr))
            .send()
            .await
            .expect("HTTP works");
        assert!(response.status().is_success(), "{path}: {response:?}");
        response.json().await.expect("a JSON body")
    }

    async fn download(&self, path: &str) -> Vec<u8> {
        let response = self
            .http
            .get(format!("http://{}{path}", self.addr))
            .send()
            .await
            .expect("HTTP works");
        assert!(response.status().is_success(), "{path}: {response:?}");
        response.bytes().await.expect("a body").to_vec()
    }

    /// Every message of `client_id`, oldest first, all pages of the cursor API.
    async fn history(&self, client_id: &str) -> Vec<Value> {
        let mut messages = Vec::new();
        let mut before = String::new();
        loop {
            let page = self
                .get_json(&format!(
                    "/api/v1/clients/{client_id}/messages?limit=100&before={before}"
                ))
                .await;
            messages.extend(
                page["messages"]
                    .as_array()
                    .expect("messages")
                    .iter()
                    .cloned(),
            );
            match page["next_cursor"].as_str() {
                Some(next) => before = next.to_owned(),
                None => break,
            }
        }
        messages.reverse();
        messages
    }
}
