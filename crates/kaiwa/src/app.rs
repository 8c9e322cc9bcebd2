//! The application: builds every component from the configuration, serves HTTP and WebSocket,
//! and shuts down in order.

use crate::admission::{Admission, InFlight, Sweeper};
use crate::auth::{Access, AdminAccess, AuthError, Authenticator};
use crate::clock::Clock;
use crate::config::{Database, ServeConfig, StoreConfig};
use crate::gateway::{self, Gateway, GatewaySettings};
use crate::http::{self, HttpState};
use crate::presence::LocalPresence;
use crate::queue::{GatewayId, MemoryQueue, Queue};
use crate::replies::model::{ModelError, ModelResponder};
use crate::replies::{BuiltinResponder, ReplyMaker, TextResponder};
use crate::store::{
    MediaStore, PgStore, SqliteOptions, SqliteStore, Store, StoreError, StoredMessage,
};
use crate::telemetry;
use crate::worker::{Delays, Worker};
use axum::Router;
use axum::serve::ListenerExt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Past the grace period, how long tasks get to wind down before the process stops waiting.
const HARD_STOP: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("could not listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{database}: {source}")]
    Open {
        database: String,
        source: StoreError,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("the HTTP server failed: {0}")]
    Serve(std::io::Error),
    #[error(transparent)]
    Queue(#[from] crate::queue::QueueError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Auth(#[from] AuthError),
}

/// The language model when an API key is configured, else the built-in responder; says which.
fn text_responder(config: &ServeConfig) -> Result<Arc<dyn TextResponder>, AppError> {
    let model = &config.model;
    match model.api_key() {
        Some(key) => {
            let responder = ModelResponder::new(model, key)?;
            tracing::info!(
                model = %model.model,
                endpoint = responder.endpoint(),
                streaming = model.stream,
                context_turns = model.history_turns,
                "text replies come from a language model"
            );
            Ok(Arc::new(responder))
        }
        None => {
            tracing::info!(
                "no API key (KAIWA_OPENAI_API_KEY or OPENAI_API_KEY): text replies come from the built-in responder"
            );
            Ok(Arc::new(BuiltinResponder))
        }
    }
}

/// Opens the database the configuration names, applying pending migrations.
pub async fn open_store(config: &StoreConfig) -> Result<Arc<dyn Store>, AppError> {
    let database = config.database()?;
    let opened: Result<Arc<dyn Store>, StoreError> = match &database {
        Database::Sqlite(path) => {
            let options = SqliteOptions {
                durability: config.durability,
            };
            SqliteStore::open(path, options)
                .await
                .map(|store| Arc::new(store) as Arc<dyn Store>)
        }
        Database::Postgres(url) => PgStore::connect(url.expose())
            .await
            .map(|store| Arc::new(store) as Arc<dyn Store>),
    };
    let store = opened.map_err(|source| AppError::Open {
        database: database.describe(),
        source,
    })?;
    tracing::info!(database = %database.describe(), "store open");
    Ok(store)
}

/// Applies the pending migrations of the database the configuration names; returns the
/// database and how many were applied.
pub async fn migrate(config: &StoreConfig) -> Result<(String, usize), AppError> {
    let database = config.database()?;
    let applied = match &database {
        Database::Sqlite(path) => SqliteStore::migrate(path).await,
        Database::Postgres(url) => PgStore::migrate(url.expose()).await,
    };
    let applied = applied.map_err(|source| AppError::Open {
        database: database.describe(),
        source,
    })?;
    Ok((database.describe(), applied))
}

/// A built, bound, not yet running kaiwa.
pub struct Application {
    listener: TcpListener,
    /// The admin address's listener and router (`--admin-bind`), if there is one.
    admin: Option<(TcpListener, Router)>,
    router: Router,
    gateway: Arc<Gateway>,
    admission: Arc<Admission>,
    store: Arc<dyn Store>,
    queue: Arc<dyn Queue>,
    /// The name events for this gateway's clients are routed by.
    gateway_id: GatewayId,
    worker: Worker,
    tracker: TaskTracker,
    shutdown_grace: Duration,
    /// How long an accepted message may go without a worker before the sweeper queues it again.
    requeue_after: Duration,
    /// Accepted but never replied to by the last run, read before this run takes a message.
    unfinished: Vec<StoredMessage>,
}

impl Application {
    /// Opens the store (applying migrations), builds the components and binds the listener.
    pub async fn build(config: ServeConfig, clock: Arc<dyn Clock>) -> Result<Self, AppError> {
        let store = open_store(&config.store).await?;
        Self::build_with_store(config, clock, store).await
    }

    /// Builds the components around a store that is already open: for tests that wrap the
    /// store (to slow its commits, say) and for embedders with a store of their own.
    pub async fn build_with_store(
        config: ServeConfig,
        clock: Arc<dyn Clock>,
        store: Arc<dyn Store>,
    ) -> Result<Self, AppError> {
        let data_dir = &config.store.data_dir;
        let unfinished = store.unfinished_messages().await?;
        let media = MediaStore::open(data_dir)?;
        let limits = &config.limits;
        let queue: Arc<dyn Queue> = Arc::new(MemoryQueue::new(limits.max_in_flight as usize));
        let admission = Arc::new(Admission::new(
            config.content,
            config.windows,
            InFlight::new(limits.max_in_flight as usize),
            limits.in_flight_wait,
            store.clone(),
            media.clone(),
            queue.clone(),
        ));
        let tracker = TaskTracker::new();
        let auth = Authenticator::start(&config.auth, config.bind)?;
        let settings = GatewaySettings::from_config(&config).with_auth(auth.clone());
        let gateway = Arc::new(Gateway::new(
            settings,
            admission.clone(),
            store.clone(),
            clock.clone(),
            tracker.clone(),
        ));
        let responder = text_responder(&config)?;
        let gateway_id = GatewayId::new("local");
        let worker = Worker::new(
            store.clone(),
            queue.clone(),
            Arc::new(LocalPresence::new(gateway_id.clone())),
            ReplyMaker::new(responder.clone(), store.clone()),
            Delays::new(config.reply_delay_scale),
            clock,
        );
        let http_state = Arc::new(HttpState {
            store: store.clone(),
            gateway: gateway.clone(),
            queue: queue.clone(),
            media: media.clone(),
            started: Instant::now(),
            responder: responder.name(),
            metrics: telemetry::metrics_handle(),
            access: Access {
                tokens: auth.clone(),
                admin: AdminAccess::from_config(&config.auth, auth.is_some()),
            },
        });
        let admin = match config.auth.admin_bind {
            Some(addr) => {
                let listener = TcpListener::bind(addr)
                    .await
                    .map_err(|source| AppError::Bind { addr, source })?;
                Some((listener, http::admin_router(http_state.clone())))
            }
            None => None,
        };
        let router = Router::new()
            .merge(gateway::router(gateway.clone()))
            .merge(http::router(http_state))
            .layer(http::cors::layer(&config.auth, auth.is_some()));
        let listener = TcpListener::bind(config.bind)
            .await
            .map_err(|source| AppError::Bind {
                addr: config.bind,
                source,
            })?;
        Ok(Self {
            listener,
            admin,
            router,
            gateway,
            admission,
            store,
            queue,
            gateway_id,
            worker,
            tracker,
            shutdown_grace: config.shutdown_grace,
            requeue_after: config.requeue_after,
            unfinished,
        })
    }

    /// The admin address actually bound, when `--admin-bind` is given.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin
            .as_ref()
            .and_then(|(listener, _)| listener.local_addr().ok())
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        // A bound listener always has a local address.
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Serves until `shutdown` resolves, then shuts down gracefully: stops accepting, lets
    /// messages in flight finish their replies (up to the grace period), closes every session
    /// with "going away", and flushes the store.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), AppError> {
        let addr = self.local_addr();
        let Self {
            listener,
            admin,
            router,
            gateway,
            admission,
            store,
            queue,
            gateway_id,
            worker,
            tracker,
            shutdown_grace,
            requeue_after,
            unfinished,
        } = self;
        let stop_accepting = CancellationToken::new();
        let stop_workers = CancellationToken::new();
        let stop_delivery = CancellationToken::new();

        // Without TCP_NODELAY, the several small frames of one message wait on delayed ACKs
        // (Nagle), adding ~40 ms to every reply.
        let listener = listener.tap_io(|tcp| {
            if let Err(err) = tcp.set_nodelay(true) {
                tracing::debug!(%err, "could not set TCP_NODELAY");
            }
        });
        if let Some((listener, router)) = admin {
            // Served until the main listener stops; it holds no sessions to drain.
            tracker.spawn(
                axum::serve(listener, router)
                    .with_graceful_shutdown(stop_accepting.clone().cancelled_owned())
                    .into_future(),
            );
        }
        let server = tokio::spawn(
            axum::serve(listener, router)
                .with_graceful_shutdown(stop_accepting.clone().cancelled_owned())
                .into_future(),
        );
        let events = queue.events(&gateway_id)?;
        let delivery = tokio::spawn({
            let gateway = gateway.clone();
            let stop = stop_delivery.clone();
            async move { gateway.deliver_events(events, stop).await }
        });
        let workers = tokio::spawn(worker.run(stop_workers.clone(), tracker.clone()));
        tracker.spawn({
            let sweeper = Sweeper::new(admission.clone(), store.clone(), requeue_after);
            let admission = admission.clone();
            let stop = stop_workers.clone();
            async move {
                match admission.requeue(unfinished, &stop).await {
                    Ok(0) => {}
                    Ok(count) => tracing::info!(
                        messages = count,
                        "unfinished messages from the last run queued again"
                    ),
                    Err(err) => tracing::error!(%err, "could not queue unfinished messages"),
                }
                // From here on, a message whose processing fails is retried in this run.
                sweeper.run(stop).await;
            }
        });
        tracing::info!(%addr, "kaiwa is listening");

        let mut server = server;
        let served = tokio::select! {
            () = shutdown => None,
            result = &mut server => Some(result),
        };
        // HTTP keeps serving while draining: /health answers 503 so load balancers move on,
        // history stays readable, and new WebSocket clients are told to go elsewhere.
        tracing::info!("shutting down: draining, no new sessions or messages");
        gateway.begin_drain();

        let in_flight = &admission.in_flight;
        if !in_flight.idle_within(shutdown_grace).await {
            tracing::warn!(
                in_flight = in_flight.current(),
                "grace period over with messages in flight; they stay accepted and are processed on the next start"
            );
        }
        stop_workers.cancel();
        gateway.close_all();
        stop_accepting.cancel();
        tracker.close();
        if tokio::time::timeout(HARD_STOP, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("some sessions or tasks did not finish in time");
        }
        stop_delivery.cancel();
        if let Err(err) = delivery.await {
            tracing::error!(%err, "the delivery task failed");
        }
        match workers.await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::error!(%err, "the worker failed"),
            Err(err) => tracing::error!(%err, "the worker task failed"),
        }
        // Everything that writes is done: flush before anything else can keep us waiting.
        store.close().await;
        let served = match served {
            Some(result) => result,
            // HTTP requests still open (a client that never finishes its request would hold
            // graceful shutdown forever) get a moment, then are cut.
            None => match tokio::time::timeout(HARD_STOP, &mut server).await {
                Ok(result) => result,
                Err(_) => {
                    tracing::warn!("HTTP connections still open after the drain; closing them");
                    server.abort();
                    Ok(Ok(()))
                }
            },
        };
        tracing::info!("kaiwa stopped");
        match served {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(AppError::Serve(err)),
            Err(join) => Err(AppError::Serve(std::io::Error::other(join))),
        }
    }
}
