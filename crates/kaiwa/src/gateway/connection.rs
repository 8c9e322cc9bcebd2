//! One connection's life, in phases: the handshake of a stranger ([`introduce`]), the client
//! slots and the reply stream's start ([`admit`]), the client id, here and across the cluster
//! ([`claim`]), the session ([`run`]), then the client's departure and the close handshake
//! ([`depart`]). A phase that turns the client away says why with a [`Refusal`].

use super::Gateway;
use super::cluster::ClusterSlot;
use super::handshake::{self, Credentials, HandshakeError, Hello, Opening, Resume};
use super::outbox::{Closing, Frames, Outbox, Writer};
use super::refusal::{CLOSE_REPLY_TIMEOUT, Refusal};
use super::registry::{Duplicate, Liveness, SessionHandle};
use super::session::{Ending, Session};
use super::strangers::Pass;
use super::stream::ReplyStream;
use super::wire::{About, Protocol, close_frame};
use crate::admission::ConnectionSlot;
use crate::auth::Claims;
use crate::config::DuplicatePolicy;
use crate::domain::ClientId;
use crate::listener::Peer;
use crate::presence::{Claim, PresenceError};
use crate::store::StoreError;
use axum::extract::ws::{Message, Utf8Bytes, WebSocket};
use futures::stream::SplitStream;
use futures::{FutureExt, Stream, StreamExt};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The longest a duplicate connection waits to learn whether the live one still answers.
const LIVENESS_PROBE: Duration = Duration::from_secs(3);
/// What a probe of a connection on another gateway may take besides the ping itself: the
/// broker both ways.
const PROBE_ROUND_TRIP: Duration = Duration::from_secs(1);
/// How long the claim is made again after the holder closed a connection that did not answer.
const RELEASE_WAIT: Duration = Duration::from_secs(2);

/// An upgraded connection, as the upgrade request left it.
pub(crate) struct Arrival {
    /// How it says who it is: with a first frame (and whether it chose `kaiwa.v1`), or with
    /// its URL (the path dialect).
    pub opening: Opening,
    /// The connection as the listener accepted it: its address and its read allowance.
    /// `None` only when the router is served by something else than kaiwa's listener.
    pub peer: Option<Arc<Peer>>,
    /// Its place in the strangers' pool, until its handshake frame is read.
    pub pass: Pass,
    /// What the upgrade request's token says, checked (auth on).
    pub verified: Option<Claims>,
}

/// Serves one upgraded connection from handshake to close. The client gets a client slot only
/// once its handshake is verified: until then it is a stranger, in a pool of its own.
///
/// The socket comes boxed, and `run` takes it boxed, for the memory of an idle connection: an
/// async fn keeps a by-value argument's bytes for its whole life beside the local it is moved
/// into, and the session's task lives as long as the connection.
pub(crate) async fn serve(gateway: Arc<Gateway>, mut socket: Box<WebSocket>, arrival: Arrival) {
    let peer = arrival.peer.clone();
    let Some(hello) = introduce(&gateway, &mut socket, arrival).await else {
        return;
    };
    // Verified: the client may send what clients may.
    if let Some(peer) = &peer {
        peer.unlimit_reads();
    }
    let claimed = match admit(&gateway, &hello).await {
        Ok(admitted) => claim(&gateway, &hello, admitted).await,
        Err(refused) => Err(refused),
    };
    let claimed = match claimed {
        Ok(claimed) => claimed,
        Err(Refused { refusal, slots }) => {
            refuse(&mut socket, hello.protocol, refusal).await;
            drop(slots);
            return;
        }
    };
    // A task of its own, so that what the phases above kept does not stay with the connection
    // for its life (an async fn's frame holds every local any of its awaits needed). `then`
    // keeps the two phases in one place of the task's memory: the session's is gone when the
    // departure's begins.
    let tracker = gateway.tracker.clone();
    tracker.spawn(run(gateway, socket, hello, claimed).then(depart));
}

/// The handshake of a connection that is not yet a client: it ends with a verified hello, or
/// with the connection refused (and `None`). A stranger is closed when its deadline passes,
/// when it sends more than its allowance, or when a newer stranger takes its place. A path
/// dialect client has said who it is in its URL: it is verified at once, without a frame.
async fn introduce(gateway: &Gateway, socket: &mut WebSocket, arrival: Arrival) -> Option<Hello> {
    let Arrival {
        opening,
        pass,
        verified,
        ..
    } = arrival;
    let sessions = &gateway.settings.sessions;
    let credentials = Credentials {
        auth: gateway.settings.auth.clone(),
        upgrade: verified,
        clock: gateway.clock.clone(),
    };
    let (guess, received) = match opening {
        Opening::Path(intro) => (
            Protocol::Path,
            handshake::from_path(&intro, &credentials, sessions.default_timezone),
        ),
        Opening::Frame { native } => {
            let guess = Protocol::chosen_at_upgrade(native);
            let timeout = sessions.handshake_timeout;
            // A draining server takes no new sessions: a handshake in progress (or one that
            // begins after the drain did) ends at once.
            let received = tokio::select! {
                received = handshake::receive(socket, native, timeout, &credentials) => received,
                () = pass.crowded_out() => Err(HandshakeError::CrowdedOut),
                () = gateway.draining.cancelled() => Err(HandshakeError::ShuttingDown),
            };
            (guess, received)
        }
    };
    // Whatever came of it, the connection is no longer a stranger in the pool.
    drop(pass);
    let (protocol, refusal) = match received {
        Ok(hello) if !gateway.is_draining() => return Some(hello),
        Ok(hello) => (hello.protocol, Refusal::ShuttingDown),
        Err(err) => {
            let (protocol, refusal) = Refusal::of_handshake(err)?;
            (protocol.unwrap_or(guess), refusal)
        }
    };
    refuse(socket, protocol, refusal).await;
    None
}

/// What a verified client holds before its id is claimed.
struct Admitted {
    /// One of this gateway's client slots, held until dropped.
    slot: ConnectionSlot,
    /// One of the cluster's client slots (the client id joins it in [`claim`]).
    cluster_slot: ClusterSlot,
    conn_id: u64,
    /// The `seq` its reply stream starts after.
    position: u64,
}

/// A verified client turned away, with the client slots it held: they are given back only once
/// the refusal is sent and answered, so that the limit counts every verified socket the server
/// still holds.
struct Refused {
    refusal: Refusal,
    slots: (Option<ConnectionSlot>, Option<ClusterSlot>),
}

impl Refusal {
    fn holding(self, slot: Option<ConnectionSlot>, cluster_slot: Option<ClusterSlot>) -> Refused {
        Refused {
            refusal: self,
            slots: (slot, cluster_slot),
        }
    }
}

/// Takes a client slot here and one in the cluster (the limit is the whole cluster's), and
/// reads where the client's reply stream starts.
async fn admit(gateway: &Gateway, hello: &Hello) -> Result<Admitted, Refused> {
    let max_clients = gateway.settings.max_clients;
    let Some(slot) = gateway.slots.try_acquire() else {
        let full = Refusal::Full {
            whole: "server",
            max_clients,
        };
        return Err(full.holding(None, None));
    };
    let conn_id = gateway.next_conn_id();
    let cluster_slot = match gateway.cluster.take_slot(conn_id, max_clients).await {
        Ok(Some(slot)) => slot,
        Ok(None) => {
            let full = Refusal::Full {
                whole: "the cluster",
                max_clients,
            };
            return Err(full.holding(Some(slot), None));
        }
        Err(err) => {
            tracing::error!(%err, "could not take a cluster client slot");
            return Err(Refusal::Unavailable.holding(Some(slot), None));
        }
    };
    let position = match start_position(gateway, hello).await {
        Ok(position) => position,
        Err(err) => {
            tracing::error!(client_id = %hello.client_id, %err, "could not read the client's reply stream");
            return Err(Refusal::StreamUnreadable.holding(Some(slot), Some(cluster_slot)));
        }
    };
    Ok(Admitted {
        slot,
        cluster_slot,
        conn_id,
        position,
    })
}

/// A client whose id is its connection's, here and in the cluster: the parts of its session,
/// as the registry holds them, and the outbox's frames for the writer.
struct Claimed {
    admitted: Admitted,
    handle: SessionHandle,
    frames: Frames,
}

/// Registers the session under the client's id here, then claims the id across the cluster.
/// The welcome is queued before the session is registered, so that no reply can overtake it.
async fn claim(gateway: &Gateway, hello: &Hello, admitted: Admitted) -> Result<Claimed, Refused> {
    let (outbox, frames) = Outbox::new(gateway.settings.outbox);
    outbox.push(hello.protocol.welcome(
        hello.client_id.as_str(),
        hello.timezone.name(),
        gateway.clock.now(),
        &gateway.settings,
        hello.token.as_ref().map(|claims| claims.expires_at),
    ));
    let stream = (hello.protocol == Protocol::Native).then(|| {
        ReplyStream::new(
            hello.client_id.clone(),
            outbox.clone(),
            gateway.store.clone(),
            gateway.tracker.clone(),
            admitted.position,
        )
    });
    let liveness = Arc::new(Liveness::default());
    // The handshake frame was the first word from the client.
    liveness.heard();
    let conn_id = admitted.conn_id;
    let mut claimed = Claimed {
        admitted,
        handle: SessionHandle {
            conn_id,
            protocol: hello.protocol,
            outbox,
            stream,
            replaced: CancellationToken::new(),
            moved: Arc::new(AtomicBool::new(false)),
            liveness,
        },
        frames,
    };
    let duplicate = |elsewhere| Refusal::Duplicate {
        client_id: hello.client_id.clone(),
        elsewhere,
    };
    let refusal = if register(gateway, hello, claimed.handle.clone())
        .await
        .is_err()
    {
        duplicate(None)
    } else {
        let replace = gateway.settings.sessions.duplicate_connection == DuplicatePolicy::Replace;
        let across = claim_across(
            gateway,
            &mut claimed.admitted.cluster_slot,
            &hello.client_id,
            replace,
        )
        .await;
        let refusal = match across {
            Ok(Claim::Claimed { .. }) => return Ok(claimed),
            Ok(Claim::Held { gateway, .. }) => duplicate(Some(gateway)),
            Err(err) => {
                tracing::error!(client_id = %hello.client_id, %err, "could not claim the client id in the cluster");
                Refusal::Unavailable
            }
        };
        gateway.registry.remove(&hello.client_id, conn_id);
        refusal
    };
    let Admitted {
        slot, cluster_slot, ..
    } = claimed.admitted;
    Err(refusal.holding(Some(slot), Some(cluster_slot)))
}

/// A session that ended, with what its departure needs.
struct Ended {
    session: Session,
    ending: Ending,
    /// The client slots, given back as the departure begins.
    admitted: Admitted,
    /// Set by the registry when the client's id moved to a connection on another gateway.
    moved: Arc<AtomicBool>,
    /// To the writer: how to close.
    to_writer: oneshot::Sender<Closing>,
    /// What is still read from the client: its close frame, in return for ours.
    frames_in: SplitStream<WebSocket>,
    writer: JoinHandle<()>,
}

/// The session, from the writer's start to the session's end.
async fn run(
    gateway: Arc<Gateway>,
    socket: Box<WebSocket>,
    hello: Hello,
    claimed: Claimed,
) -> Ended {
    let Claimed {
        admitted,
        handle,
        frames,
    } = claimed;
    let SessionHandle {
        outbox,
        stream,
        replaced,
        moved,
        liveness,
        ..
    } = handle;
    let (conn_id, position) = (admitted.conn_id, admitted.position);
    if let Resume::After(after) = hello.resume
        && position > 0
    {
        // What the client says it processed is what it acknowledges.
        gateway
            .store
            .record_received(&hello.client_id, position, gateway.clock.now());
        tracing::debug!(client_id = %hello.client_id, after, position, "resuming");
    }
    if let Some(stream) = &stream
        && hello.resume != Resume::Fresh
    {
        // The client had the reply at `position`, unless its cursor went beyond the stream
        // (kept from a server since reset) and was cut back to the end.
        let had = match hello.resume {
            Resume::After(after) if after > position => None,
            _ => Some(position),
        };
        stream.resume(had);
    }

    let (sink, mut frames_in) = unbox(socket).split();
    let (to_writer, close_rx) = oneshot::channel();
    let writer = gateway.tracker.spawn(
        Writer {
            sink,
            frames,
            drained: outbox.drained(),
            queued_bytes: outbox.queued_bytes(),
            closing: close_rx,
            store: gateway.store.clone(),
            clock: gateway.clock.clone(),
        }
        .run(),
    );
    tracing::info!(client_id = %hello.client_id, timezone = %hello.timezone, protocol = ?hello.protocol, conn_id, "client connected");
    metrics::gauge!("kaiwa_connections").increment(1.0);

    let mut session = Session::new(gateway, hello, outbox, liveness, replaced, stream, position);
    let ending = session.run(&mut frames_in).await;
    Ended {
        session,
        ending,
        admitted,
        moved,
        to_writer,
        frames_in,
        writer,
    }
}

/// The socket out of its box, the box freed: moved out in place (`(*socket).split()`), the box
/// would stay allocated until the session's task ends, 368 bytes of every idle connection.
fn unbox(socket: Box<WebSocket>) -> WebSocket {
    *socket
}

/// The client's departure: it leaves the registry and the limits at once, replies that came
/// here after it moved to another gateway are handed over, then the close handshake, bounded.
async fn depart(ended: Ended) {
    let Ended {
        session,
        ending,
        admitted,
        moved,
        to_writer,
        mut frames_in,
        writer,
    } = ended;
    let gateway = session.gateway().clone();
    let client_id = session.client_id().clone();
    let conn_id = admitted.conn_id;
    gateway.registry.remove(&client_id, conn_id);
    // The client is gone as far as the limits go; the close handshake below is bounded.
    drop(admitted);
    session.depart();
    if moved.load(Ordering::Relaxed)
        && let Some(stream) = session.stream()
    {
        // Replies may have come here after the client's new connection began.
        let link = gateway.cluster.clone();
        let seq = stream.known();
        let client_id = client_id.clone();
        let stop = gateway.close_sessions.clone();
        gateway
            .tracker
            .spawn(async move { link.hand_over(&client_id, seq, &stop).await });
    }
    let closing = Closing {
        frame: ending.close_frame(&gateway.settings),
        drain: ending.drains(),
    };
    if to_writer.send(closing).is_err() {
        tracing::debug!(conn_id, "the writer ended before the session");
    }
    if ending.awaits_close_reply() {
        // While the writer sends ours: a socket closed before the client's close frame came is
        // reset under it.
        await_close_reply(&mut frames_in, CLOSE_REPLY_TIMEOUT).await;
    }
    if let Err(err) = writer.await {
        tracing::error!(conn_id, %err, "the writer task failed");
    }
    metrics::gauge!("kaiwa_connections").decrement(1.0);
    metrics::counter!("kaiwa_disconnects_total", "reason" => ending.name()).increment(1);
    tracing::info!(%client_id, conn_id, ending = ending.name(), "client disconnected");
}

/// The `seq` the client's reply stream starts after on this connection. A cursor beyond the
/// stored stream (a client that kept one from another server, or from a database since reset)
/// starts at the end of what is stored, so that no later reply is taken as already sent.
async fn start_position(gateway: &Gateway, hello: &Hello) -> Result<u64, StoreError> {
    if hello.protocol != Protocol::Native {
        return Ok(0);
    }
    let store = &gateway.store;
    let latest = store.latest_seq(&hello.client_id).await?;
    Ok(match hello.resume {
        Resume::Fresh => latest,
        Resume::After(after) => after.min(latest),
        Resume::Unacknowledged => store.acknowledged(&hello.client_id).await?.min(latest),
    })
}

impl Gateway {
    /// How long a connection whose id a new one wants gets to answer a ping.
    pub(super) fn liveness_probe(&self) -> Duration {
        self.settings
            .sessions
            .heartbeat_interval
            .min(LIVENESS_PROBE)
    }
}

/// Registers the session under its client id. Under the `refuse` policy a live session with
/// the same id keeps it only if its client still answers: a client whose network died (and who
/// is now reconnecting) would otherwise be locked out until the heartbeat timeout.
async fn register(
    gateway: &Gateway,
    hello: &Hello,
    handle: SessionHandle,
) -> Result<(), Duplicate> {
    let registry = &gateway.registry;
    let policy = gateway.settings.sessions.duplicate_connection;
    let Err(Duplicate(live)) = registry.register(hello.client_id.clone(), handle.clone(), policy)
    else {
        return Ok(());
    };
    if live
        .liveness
        .answers(&live.outbox, gateway.liveness_probe())
        .await
    {
        return Err(Duplicate(live));
    }
    tracing::info!(client_id = %hello.client_id, stale_conn_id = live.conn_id, "the live connection did not answer a ping; the new one takes over");
    registry.take_over(hello.client_id.clone(), handle, live.conn_id)
}

/// Claims the client's id across the cluster. Held by a connection on another gateway, the
/// id is that gateway's to check, as [`register`] checks one here: it pings its connection and
/// closes it if it does not answer, and the claim is made again once its release lands.
async fn claim_across(
    gateway: &Gateway,
    slot: &mut ClusterSlot,
    client_id: &ClientId,
    replace: bool,
) -> Result<Claim, PresenceError> {
    let claim = slot.claim(client_id, replace).await?;
    let Claim::Held {
        gateway: holder,
        conn_id,
    } = &claim
    else {
        return Ok(claim);
    };
    let probe = gateway.liveness_probe();
    if gateway
        .cluster
        .probe(client_id, holder, *conn_id, probe + PROBE_ROUND_TRIP)
        .await
        != Some(false)
    {
        return Ok(claim);
    }
    // Closed there; its claim goes back as the connection ends.
    let deadline = tokio::time::Instant::now() + RELEASE_WAIT;
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let claim = slot.claim(client_id, replace).await?;
        if matches!(claim, Claim::Claimed { .. }) || tokio::time::Instant::now() >= deadline {
            return Ok(claim);
        }
    }
}

/// Answers a connection that will not get a session: an error frame it can show, then a close
/// frame with the code that says why, waiting as long as the refusal allows for the client's
/// close frame in return.
async fn refuse(socket: &mut WebSocket, protocol: Protocol, refusal: Refusal) {
    if let Some(reason) = refusal.metric() {
        metrics::counter!("kaiwa_connections_refused_total", "reason" => reason).increment(1);
    }
    refusal.log();
    let linger = refusal.linger();
    let (code, detail) = (refusal.close_code(), refusal.detail());
    let frame = close_frame(code, &detail);
    // The same words, whole: a close frame's reason is cut to 123 bytes, an error frame's not.
    let error: Utf8Bytes = protocol.error(
        refusal.error_code(),
        format!("{}: {detail}", code.name()),
        About::nothing(),
        None,
    );
    let send = async {
        socket.send(Message::Text(error)).await?;
        socket.send(Message::Close(Some(frame))).await
    };
    match tokio::time::timeout(linger, send).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => tracing::debug!(%err, "could not send the refusal"),
        Err(_) => tracing::debug!("the refused client did not read its close frame"),
    }
    await_close_reply(socket, linger).await;
}

/// Reads and discards until the client's close frame (or the timeout). Reading on keeps the
/// close handshake proper: a socket closed with unread data is reset, and a reset can destroy
/// the close frame before the client reads it.
async fn await_close_reply<S>(stream: &mut S, within: Duration)
where
    S: Stream<Item = Result<Message, axum::Error>> + Unpin,
{
    let drained = tokio::time::timeout(within, async {
        while let Some(Ok(message)) = stream.next().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::debug!("no close frame from the client in time");
    }
}

/// The phases between a verified hello and the session, on the fixture's gateway (the memory
/// store and queue, `LocalPresence`): the client slots, where the reply stream starts, and who
/// gets the client id.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Timezone;
    use crate::store::Store;
    use crate::testing::{Fixture, accepted_text, reply, stored};
    use kaiwa_protocol::ReplyType;

    fn hello(protocol: Protocol, client_id: &str, resume: Resume) -> Hello {
        Hello {
            protocol,
            client_id: ClientId::parse(client_id).expect("an id"),
            timezone: Timezone::parse("UTC").expect("a zone"),
            resume,
            token: None,
        }
    }

    fn native(client_id: &str) -> Hello {
        hello(Protocol::Native, client_id, Resume::Fresh)
    }

    async fn admitted(gateway: &Gateway, hello: &Hello) -> Admitted {
        match admit(gateway, hello).await {
            Ok(admitted) => admitted,
            Err(refused) => panic!("refused: {:?}", refused.refusal),
        }
    }

    async fn claimed(gateway: &Gateway, hello: &Hello) -> Claimed {
        let admitted = admitted(gateway, hello).await;
        match claim(gateway, hello, admitted).await {
            Ok(claimed) => claimed,
            Err(refused) => panic!("refused: {:?}", refused.refusal),
        }
    }

    /// The connection that holds the client id here, if one does.
    fn holder(gateway: &Gateway, client_id: &str) -> Option<u64> {
        let client_id = ClientId::parse(client_id).expect("an id");
        gateway.registry.with(&client_id, |live| live.conn_id)
    }

    #[tokio::test(start_paused = true)]
    async fn past_the_client_limit_a_client_is_refused_until_a_slot_is_given_back() {
        let fixture = Fixture::new(&["--max-clients", "2"]);
        let gateway = &fixture.gateway;
        let first = admitted(gateway, &native("ann")).await;
        let _second = admitted(gateway, &native("bob")).await;
        assert_eq!(gateway.slots.in_use(), 2);
        let Err(refused) = admit(gateway, &native("cid")).await else {
            panic!("a third client was admitted");
        };
        assert!(
            matches!(
                refused.refusal,
                Refusal::Full {
                    whole: "server",
                    max_clients: 2
                }
            ),
            "{:?}",
            refused.refusal
        );
        assert!(refused.slots.0.is_none() && refused.slots.1.is_none());
        drop(first);
        assert_eq!(gateway.slots.in_use(), 1);
        let _third = admitted(gateway, &native("cid")).await;
        assert_eq!(gateway.slots.in_use(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn the_reply_stream_starts_at_the_clients_cursor_but_never_past_what_is_stored() {
        let fixture = Fixture::new(&[]);
        let gateway = &fixture.gateway;
        let store: &dyn Store = fixture.store.as_ref();
        let id = stored(store, accepted_text("ann", Some("m1"), "hi")).await;
        let replies = [ReplyType::Text, ReplyType::Voice, ReplyType::Image]
            .into_iter()
            .map(|reply_type| reply(reply_type, "r"))
            .collect();
        let ann = ClientId::parse("ann").expect("an id");
        store
            .insert_replies(id, &ann, replies, chrono::Utc::now(), true)
            .await
            .expect("stored");
        let cases = [
            (hello(Protocol::Native, "ann", Resume::After(2)), 2),
            // A cursor from elsewhere, beyond the stored stream: no later reply is skipped.
            (hello(Protocol::Native, "ann", Resume::After(10)), 3),
            (hello(Protocol::Native, "ann", Resume::Fresh), 3),
            // Nothing acknowledged yet: every stored reply is sent again.
            (hello(Protocol::Native, "ann", Resume::Unacknowledged), 0),
            // Legacy clients have no stream.
            (hello(Protocol::Legacy, "ann", Resume::Fresh), 0),
        ];
        for (hello, position) in cases {
            let admitted = admitted(gateway, &hello).await;
            assert_eq!(admitted.position, position, "{:?}", hello.resume);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_claimed_client_is_registered_under_its_id_with_the_welcome_queued_first() {
        let fixture = Fixture::new(&[]);
        let gateway = &fixture.gateway;
        let mut ann = claimed(gateway, &native("ann")).await;
        assert_eq!(holder(gateway, "ann"), Some(ann.admitted.conn_id));
        let first = ann.frames.try_recv().expect("a frame queued");
        let Message::Text(text) = first.message() else {
            panic!("{:?}", first.message());
        };
        let welcome: serde_json::Value = serde_json::from_str(text.as_str()).expect("JSON");
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        assert_eq!(welcome["client_id"], "ann");
    }

    #[tokio::test(start_paused = true)]
    async fn a_second_connection_with_a_live_id_is_refused_and_holds_its_slots_until_dropped() {
        let fixture = Fixture::new(&[]);
        let gateway = &fixture.gateway;
        let live = claimed(gateway, &native("ann")).await;
        let admitted = admitted(gateway, &native("ann")).await;
        let Err(refused) = claim(gateway, &native("ann"), admitted).await else {
            panic!("the second connection was claimed");
        };
        assert!(
            matches!(
                &refused.refusal,
                Refusal::Duplicate { client_id, elsewhere: None } if client_id.as_str() == "ann"
            ),
            "{:?}",
            refused.refusal
        );
        assert_eq!(holder(gateway, "ann"), Some(live.admitted.conn_id));
        assert!(!live.handle.replaced.is_cancelled());
        // Given back only once the refusal is sent: the limit counts the socket until then.
        assert!(refused.slots.0.is_some() && refused.slots.1.is_some());
        assert_eq!(gateway.slots.in_use(), 2);
        drop(refused);
        assert_eq!(gateway.slots.in_use(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_live_id_whose_connection_no_longer_answers_is_taken_over() {
        let fixture = Fixture::new(&["--heartbeat-interval", "20", "--heartbeat-timeout", "60"]);
        let gateway = &fixture.gateway;
        let mut dead = claimed(gateway, &native("ann")).await;
        // Silent for longer than the probe: the new connection pings it and waits the probe.
        tokio::time::advance(Duration::from_secs(10)).await;
        let started = tokio::time::Instant::now();
        let new = claimed(gateway, &native("ann")).await;
        assert_eq!(started.elapsed(), gateway.liveness_probe());
        assert_eq!(holder(gateway, "ann"), Some(new.admitted.conn_id));
        assert!(dead.handle.replaced.is_cancelled());
        let pinged = std::iter::from_fn(|| dead.frames.try_recv())
            .any(|frame| matches!(frame.message(), Message::Ping(_)));
        assert!(pinged, "the dead connection was not pinged first");
    }

    #[tokio::test(start_paused = true)]
    async fn a_live_id_that_answers_the_ping_keeps_its_connection() {
        let fixture = Fixture::new(&["--heartbeat-interval", "20", "--heartbeat-timeout", "60"]);
        let gateway = &fixture.gateway;
        let live = claimed(gateway, &native("ann")).await;
        tokio::time::advance(Duration::from_secs(10)).await;
        let liveness = live.handle.liveness.clone();
        // The client answers a second into the probe.
        let answer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            liveness.heard();
        });
        let admitted = admitted(gateway, &native("ann")).await;
        let started = tokio::time::Instant::now();
        assert!(claim(gateway, &native("ann"), admitted).await.is_err());
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(1),
            "refused at the answer"
        );
        assert_eq!(holder(gateway, "ann"), Some(live.admitted.conn_id));
        answer.await.expect("answered");
    }

    #[tokio::test(start_paused = true)]
    async fn with_the_replace_policy_the_newer_connection_takes_the_id_at_once() {
        let fixture = Fixture::new(&["--duplicate-connection", "replace"]);
        let gateway = &fixture.gateway;
        let old = claimed(gateway, &native("ann")).await;
        let started = tokio::time::Instant::now();
        let new = claimed(gateway, &native("ann")).await;
        assert_eq!(started.elapsed(), Duration::ZERO, "no probe under replace");
        assert!(old.handle.replaced.is_cancelled());
        assert_eq!(holder(gateway, "ann"), Some(new.admitted.conn_id));
    }
}
