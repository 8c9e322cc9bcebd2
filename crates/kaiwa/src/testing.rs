//! Fixtures for the library's own unit tests: a gateway and the HTTP state over an in-memory
//! store and queue, configured by `serve` flags, with no socket and no database file.

use crate::admission::{Admission, InFlight, SlotEnds};
use crate::auth::{Access, AdminAccess, Authenticator};
use crate::clock::SystemClock;
use crate::config::ServeConfig;
use crate::domain::GatewayId;
use crate::gateway::{ClusterLink, Gateway, GatewaySettings};
use crate::http::HttpState;
use crate::presence::LocalPresence;
use crate::queue::MemoryQueue;
use crate::store::{DiskMedia, MediaStore, MemoryStore, Store};
use std::sync::Arc;
use std::time::Instant;
use tokio_util::task::TaskTracker;

pub(crate) struct Fixture {
    pub(crate) gateway: Arc<Gateway>,
    pub(crate) store: Arc<MemoryStore>,
    pub(crate) queue: Arc<MemoryQueue>,
    pub(crate) media: Arc<dyn MediaStore>,
    /// Who may read what over HTTP, from the flags.
    pub(crate) access: Access,
    /// Holds the media folders.
    _dir: tempfile::TempDir,
}

impl Fixture {
    pub(crate) fn new(flags: &[&str]) -> Self {
        let config = ServeConfig::from_args(flags).expect("valid flags");
        let auth = Authenticator::new(
            &config.auth.keys,
            config.auth.leeway,
            config.auth.refresh_grace,
        )
        .expect("valid auth flags")
        .map(Arc::new);
        let access = Access {
            tokens: auth.clone(),
            admin: AdminAccess::from_config(&config.auth, auth.is_some()),
        };
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = Arc::new(MemoryStore::default());
        let max = config.limits.max_in_flight as usize;
        let queue = Arc::new(MemoryQueue::new(max));
        let media: Arc<dyn MediaStore> =
            Arc::new(DiskMedia::open(&dir.path().join("media")).expect("media folders"));
        let admission = Arc::new(Admission::new(
            config.content,
            config.windows,
            InFlight::new(max, SlotEnds::AtLastReply),
            config.limits.in_flight_wait,
            store.clone(),
            media.clone(),
            queue.clone(),
        ));
        let gateway = Arc::new(Gateway::new(
            GatewaySettings::from_config(&config).with_auth(auth),
            admission,
            store.clone(),
            Arc::new(SystemClock),
            TaskTracker::new(),
            Arc::new(ClusterLink::new(
                GatewayId::new("local"),
                Arc::new(LocalPresence::new(GatewayId::new("local"))),
                queue.clone(),
            )),
        ));
        Self {
            gateway,
            store,
            queue,
            media,
            access,
            _dir: dir,
        }
    }

    pub(crate) fn http_state(&self) -> Arc<HttpState> {
        let store: Arc<dyn Store> = self.store.clone();
        Arc::new(HttpState {
            store,
            gateway: Some(self.gateway.clone()),
            node: crate::http::Node {
                role: crate::config::Role::All,
                id: GatewayId::new("local"),
                presence: Arc::new(LocalPresence::new(GatewayId::new("local"))),
            },
            clock: Arc::new(SystemClock),
            draining: tokio_util::sync::CancellationToken::new(),
            queue: self.queue.clone(),
            media: self.media.clone(),
            started: Instant::now(),
            responder: "built-in",
            metrics: None,
            access: self.access.clone(),
        })
    }
}

/// An accepted text message of `client_id`'s in UTC, received now: what the layers above the
/// store see of a message that passed admission.
pub(crate) fn accepted_text(
    client_id: &str,
    client_message_id: Option<&str>,
    content: &str,
) -> crate::store::NewMessage {
    crate::store::NewMessage {
        client_id: crate::domain::ClientId::parse(client_id).expect("a valid client id"),
        client_message_id: client_message_id.map(str::to_owned),
        kind: kaiwa_protocol::MessageType::Text,
        content: content.to_owned(),
        filename: None,
        mime_type: None,
        size_bytes: None,
        timezone: crate::domain::Timezone::parse("UTC").expect("UTC"),
        status: kaiwa_protocol::MessageStatus::Accepted,
        reason: None,
        client_timestamp: None,
        received_at: chrono::Utc::now(),
    }
}

/// Stores `message`, which the test knows is new; its id.
pub(crate) async fn stored(
    store: &dyn crate::store::Store,
    message: crate::store::NewMessage,
) -> i64 {
    match store.insert_message(message).await.expect("stored") {
        crate::store::Inserted::New(id) => id,
        other => panic!("not new: {other:?}"),
    }
}

/// A reply of `reply_type` saying `content`, with no file: what a worker hands the store.
pub(crate) fn reply(
    reply_type: kaiwa_protocol::ReplyType,
    content: &str,
) -> crate::store::NewReply {
    crate::store::NewReply {
        reply_type,
        content: content.to_owned(),
        filename: None,
        mime_type: None,
        fallback: false,
    }
}
