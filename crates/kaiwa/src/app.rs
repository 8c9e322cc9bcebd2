//! The application: builds every component from the configuration, serves HTTP and WebSocket,
//! and shuts down in order.

use crate::admission::{Admission, InFlight, SlotEnds};
use crate::auth::{Access, AdminAccess, AuthError, Authenticator};
use crate::clock::Clock;
use crate::config::{Database, ServeConfig, StoreConfig};
use crate::domain::GatewayId;
use crate::gateway::{self, ClusterLink, Gateway, GatewaySettings};
use crate::http::{self, HttpState, Node};
use crate::listener::{self, Listener, Tls, TlsError};
use crate::presence::{LocalPresence, PgPresence, Presence, PresenceError};
use crate::queue::{AmqpOptions, AmqpQueue, MemoryQueue, Queue};
use crate::recovery::{ClusterSweeper, Recovery, Sweeper};
use crate::replies::model::{ModelError, ModelResponder};
use crate::replies::{BuiltinResponder, ReplyMaker, TextResponder};
use crate::store::{
    DiskMedia, MediaStore, PgOptions, PgShared, PgStore, SqliteOptions, SqliteStore, Store,
    StoreError, StuckClaims,
};
use crate::telemetry;
use crate::worker::{Delays, Worker};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
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
    #[error(transparent)]
    Presence(#[from] PresenceError),
    #[error("a cluster keeps its state in PostgreSQL: this process needs a PostgreSQL store")]
    ClusterStore,
    #[error(transparent)]
    Tls(#[from] TlsError),
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
                cache_mib: config.sqlite_cache_mib,
                ..SqliteOptions::default()
            };
            SqliteStore::open(path, options)
                .await
                .map(|store| Arc::new(store) as Arc<dyn Store>)
        }
        Database::Postgres(url) => PgStore::connect(url.expose(), PgOptions::default())
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
    listener: Listener,
    /// The admin address's listener and router (`--admin-bind`), if there is one.
    admin: Option<(Listener, Router)>,
    router: Router,
    node: Node,
    store: Arc<dyn Store>,
    queue: Arc<dyn Queue>,
    /// Sessions and admission, unless this process is a worker only.
    gateway: Option<Arc<Gateway>>,
    /// Processing, unless this process is a gateway only.
    worker: Option<Worker>,
    /// What brings back messages whose processing was lost or failed.
    recovery: Box<dyn Recovery>,
    /// The cluster's client limit, which the gateway's lease keeps slots for.
    max_clients: u32,
    tracker: TaskTracker,
    /// The Prometheus recorder, whose histograms this process drains.
    metrics: Option<PrometheusHandle>,
    /// Cancelled when shutdown begins (`/health` says `draining`).
    draining: CancellationToken,
    shutdown_grace: Duration,
}

/// The implementations behind the seams where one process and a process of a cluster differ,
/// picked once, here: nothing outside this module asks which of the two it is.
struct Seams {
    /// This gateway's id: `local` when the process is the whole of kaiwa.
    id: GatewayId,
    queue: Arc<dyn Queue>,
    presence: Arc<dyn Presence>,
    /// Where a message's in-flight slot on its gateway ends: alone, at its last reply; in a
    /// cluster, once queued (the shared store keeps the limit).
    slot_ends: SlotEnds,
    /// How stuck messages are found: alone, by this process's own slots, the last run's
    /// unfinished messages first; in a cluster, by claims in the shared database.
    stuck: StuckMessages,
}

/// How stuck messages are found.
enum StuckMessages {
    OwnSlots,
    Claimed(Arc<dyn StuckClaims>),
}

impl Seams {
    /// One process, the whole of kaiwa: an in-process queue, and presence of one gateway.
    fn alone(config: &ServeConfig) -> Self {
        let id = GatewayId::new("local");
        Self {
            queue: Arc::new(MemoryQueue::new(config.limits.max_in_flight as usize)),
            presence: Arc::new(LocalPresence::new(id.clone())),
            id,
            slot_ends: SlotEnds::AtLastReply,
            stuck: StuckMessages::OwnSlots,
        }
    }
}

impl Application {
    /// Opens the store (applying migrations), connects to the cluster when configured, builds
    /// the components of the process's role and binds the listener.
    pub async fn build(config: ServeConfig, clock: Arc<dyn Clock>) -> Result<Self, AppError> {
        let Some(queue_url) = config.queue_url().cloned() else {
            let store = open_store(&config.store).await?;
            let seams = Seams::alone(&config);
            return Self::assemble(config, clock, store, seams).await;
        };
        let database = config.store.database()?;
        let Database::Postgres(database_url) = &database else {
            return Err(AppError::ClusterStore);
        };
        let id = GatewayId::new(config.cluster.node_id());
        let options = PgOptions {
            shared: Some(PgShared {
                max_in_flight: config.limits.max_in_flight,
                admitted_by: Some(id.as_str().into()),
            }),
            write_interval: config.cluster.write_interval(config.role),
            ..PgOptions::default()
        };
        let pg = PgStore::connect(database_url.expose(), options)
            .await
            .map_err(|source| AppError::Open {
                database: database.describe(),
                source,
            })?;
        let pg = Arc::new(pg);
        tracing::info!(database = %database.describe(), "store open, shared with the cluster");
        let queue = AmqpQueue::connect(
            queue_url.expose(),
            AmqpOptions {
                prefetch: config.cluster.prefetch,
            },
        )
        .await?;
        tracing::info!(broker = %AmqpQueue::describe_url(queue_url.expose()), "connected to RabbitMQ");
        let presence =
            PgPresence::connect(database_url.expose(), id.clone(), config.cluster.lease).await?;
        let seams = Seams {
            id,
            queue: Arc::new(queue),
            presence: Arc::new(presence),
            slot_ends: SlotEnds::WhenQueued,
            stuck: StuckMessages::Claimed(pg.clone()),
        };
        Self::assemble(config, clock, pg, seams).await
    }

    /// Builds the components around a store that is already open: for tests that wrap the
    /// store (to slow its commits, say) and for embedders with a store of their own. One
    /// process only: a cluster process is built by [`Application::build`].
    pub async fn build_with_store(
        config: ServeConfig,
        clock: Arc<dyn Clock>,
        store: Arc<dyn Store>,
    ) -> Result<Self, AppError> {
        if config.queue_url().is_some() {
            return Err(AppError::ClusterStore);
        }
        let seams = Seams::alone(&config);
        Self::assemble(config, clock, store, seams).await
    }

    async fn assemble(
        config: ServeConfig,
        clock: Arc<dyn Clock>,
        store: Arc<dyn Store>,
        seams: Seams,
    ) -> Result<Self, AppError> {
        let role = config.role;
        let limits = &config.limits;
        let Seams {
            id,
            queue,
            presence,
            slot_ends,
            stuck,
        } = seams;
        let node = Node {
            role,
            id: id.clone(),
            presence: presence.clone(),
        };
        // Read before this run accepts its first message: see `Admission::requeue`.
        let unfinished = match stuck {
            StuckMessages::OwnSlots => store.unfinished_messages().await?,
            StuckMessages::Claimed(_) => Vec::new(),
        };
        let tracker = TaskTracker::new();
        let auth = Authenticator::start(&config.auth, config.bind)?;
        let responder = text_responder(&config)?;
        let media: Arc<dyn MediaStore> = Arc::new(DiskMedia::open(
            &config.cluster.media_dir(&config.store.data_dir),
        )?);

        let gateway = if role.runs_gateway() {
            let admission = Arc::new(
                Admission::new(
                    config.content,
                    config.windows,
                    InFlight::new(limits.max_in_flight as usize, slot_ends),
                    limits.in_flight_wait,
                    store.clone(),
                    media.clone(),
                    queue.clone(),
                )
                .for_gateway(id.clone()),
            );
            let settings = GatewaySettings::from_config(&config).with_auth(auth.clone());
            let link = Arc::new(ClusterLink::new(
                id.clone(),
                presence.clone(),
                queue.clone(),
            ));
            // Joined before the listener opens: the first client finds its slot there.
            presence.join(limits.max_clients).await?;
            Some(Arc::new(Gateway::new(
                settings,
                admission,
                store.clone(),
                clock.clone(),
                tracker.clone(),
                link,
            )))
        } else {
            None
        };
        let worker = role.runs_worker().then(|| {
            Worker::new(
                store.clone(),
                queue.clone(),
                presence.clone(),
                ReplyMaker::new(responder.clone(), store.clone()),
                Delays::new(config.reply_delay_scale),
                clock.clone(),
            )
        });
        let recovery: Box<dyn Recovery> = match (stuck, &gateway) {
            (StuckMessages::Claimed(claims), gateway) => {
                let sweeper = ClusterSweeper::new(claims, queue.clone(), config.requeue_after);
                Box::new(match gateway {
                    Some(_) => sweeper.for_gateway(id.clone(), clock.now()),
                    None => sweeper,
                })
            }
            (StuckMessages::OwnSlots, Some(gateway)) => Box::new(Sweeper::new(
                gateway.admission.clone(),
                store.clone(),
                config.requeue_after,
                unfinished,
            )),
            // Validation keeps a lone process from running without a gateway.
            (StuckMessages::OwnSlots, None) => return Err(AppError::ClusterStore),
        };

        let draining = gateway
            .as_ref()
            .map(|gateway| gateway.draining.clone())
            .unwrap_or_default();
        let metrics = telemetry::metrics_handle();
        let http_state = Arc::new(HttpState {
            store: store.clone(),
            gateway: gateway.clone(),
            node: node.clone(),
            queue: queue.clone(),
            media,
            clock: clock.clone(),
            draining: draining.clone(),
            started: Instant::now(),
            responder: responder.name(),
            metrics: metrics.clone(),
            access: Access {
                tokens: auth.clone(),
                admin: AdminAccess::from_config(&config.auth, auth.is_some()),
            },
        });
        let browsers = http::cors::Browsers::new(&config.auth, auth.is_some());
        let limits = listener::Limits::from_config(&config.listener);
        let admin = match config.auth.admin_bind {
            Some(addr) => {
                if !addr.ip().is_loopback() {
                    tracing::warn!(%addr, "--admin-bind is beyond loopback: /health and /metrics are served there to anyone who reaches it, with no token; keep it on a private network");
                }
                let tcp = TcpListener::bind(addr)
                    .await
                    .map_err(|source| AppError::Bind { addr, source })?;
                let listener = Listener::new(tcp, limits.clone(), None);
                let router = http::admin_router(http_state.clone()).layer(
                    axum::middleware::from_fn_with_state(browsers.clone(), http::cors::guard),
                );
                Some((listener, router))
            }
            None => None,
        };
        let router = match &gateway {
            Some(gateway) => Router::new()
                .merge(gateway::router(gateway.clone()))
                .merge(http::router(http_state))
                .layer(axum::middleware::from_fn_with_state(
                    gateway.clone(),
                    gateway::path_upgrades,
                )),
            // A worker answers operators only, under the same rules as a gateway.
            None => http::operator_router(http_state),
        }
        .layer(http::cors::layer(&config.auth, auth.is_some()))
        .layer(axum::middleware::from_fn_with_state(
            browsers.clone(),
            http::cors::guard,
        ));
        let tls = match config.listener.tls_files() {
            Some((cert, key)) => Some(Arc::new(Tls::load(cert, key)?)),
            None => None,
        };
        if auth.is_some() && tls.is_none() && !config.bind.ip().is_loopback() {
            tracing::warn!(bind = %config.bind, "auth is on but TLS is off on an address beyond loopback: tokens travel in the clear unless a proxy in front terminates TLS (--tls-cert and --tls-key serve it here)");
        }
        let tcp = TcpListener::bind(config.bind)
            .await
            .map_err(|source| AppError::Bind {
                addr: config.bind,
                source,
            })?;
        let listener = Listener::new(tcp, limits, tls);
        Ok(Self {
            listener,
            admin,
            router,
            node,
            store,
            queue,
            gateway,
            worker,
            recovery,
            max_clients: config.limits.max_clients,
            tracker,
            metrics,
            draining,
            shutdown_grace: config.shutdown_grace,
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
            node,
            store,
            queue,
            gateway,
            worker,
            recovery,
            max_clients,
            tracker,
            metrics,
            draining,
            shutdown_grace,
        } = self;
        let stop_accepting = CancellationToken::new();
        let stop_workers = CancellationToken::new();
        let stop_delivery = CancellationToken::new();
        let stop_lease = CancellationToken::new();

        if let Some(handle) = metrics {
            tracker.spawn(telemetry::keep_metrics(
                handle,
                telemetry::METRICS_UPKEEP,
                stop_accepting.clone(),
            ));
        }
        if let Some((listener, router)) = admin {
            // Served until the main listener stops; it holds no sessions to drain.
            tracker.spawn(listener.serve(router, stop_accepting.clone()));
        }
        let delivery = match &gateway {
            Some(gateway) => {
                let events = queue.events(&node.id)?;
                let gateway = gateway.clone();
                let stop = stop_delivery.clone();
                Some(tokio::spawn(async move {
                    gateway.deliver_events(events, stop).await
                }))
            }
            None => None,
        };
        let server = tokio::spawn(listener.serve(router, stop_accepting.clone()));
        let lease_task = gateway.clone().map(|gateway| {
            let stop = stop_lease.clone();
            let presence = node.presence.clone();
            tokio::spawn(async move { presence.keep_lease(max_clients, stop, gateway).await })
        });
        let workers =
            worker.map(|worker| tokio::spawn(worker.run(stop_workers.clone(), tracker.clone())));
        tracker.spawn(recovery.run(stop_workers.clone()));
        tracing::info!(%addr, role = node.role.name(), id = %node.id, "kaiwa is listening");

        let mut server = server;
        let served = tokio::select! {
            () = shutdown => None,
            result = &mut server => Some(result),
        };
        // HTTP keeps serving while draining: /health answers 503 so load balancers move on,
        // history stays readable, and new WebSocket clients are told to go elsewhere.
        tracing::info!("shutting down: draining, no new sessions or messages");
        draining.cancel();
        // Messages in flight get the grace period to finish. In a cluster their slots here end
        // once they are queued: they are the cluster's, and a job this worker leaves unfinished
        // goes to another worker.
        if let Some(gateway) = &gateway {
            let in_flight = &gateway.admission.in_flight;
            if !in_flight.idle_within(shutdown_grace).await {
                tracing::warn!(
                    in_flight = in_flight.current(),
                    "grace period over with messages in flight; they stay accepted and are processed on the next start"
                );
            }
        }
        stop_workers.cancel();
        if let Some(gateway) = &gateway {
            gateway.close_all();
        }
        stop_accepting.cancel();
        tracker.close();
        if tokio::time::timeout(HARD_STOP, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("some sessions or tasks did not finish in time");
        }
        stop_delivery.cancel();
        if let Some(delivery) = delivery
            && let Err(err) = delivery.await
        {
            tracing::error!(%err, "the delivery task failed");
        }
        if let Some(workers) = workers {
            match workers.await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => tracing::error!(%err, "the worker failed"),
                Err(err) => tracing::error!(%err, "the worker task failed"),
            }
        }
        // Leaving gives back this gateway's slots and ids at once, rather than at lease end.
        stop_lease.cancel();
        if let Some(task) = lease_task
            && let Err(err) = task.await
        {
            tracing::error!(%err, "the lease task failed");
        }
        // Jobs taken but not done go back to the broker with the connection.
        queue.close().await;
        // Everything that writes is done: flush before anything else can keep us waiting.
        store.close().await;
        let served = match served {
            Some(result) => result,
            // HTTP requests still open (a download to a client that reads slowly, say) get a
            // moment, then are cut.
            None => match tokio::time::timeout(HARD_STOP, &mut server).await {
                Ok(result) => result,
                Err(_) => {
                    tracing::warn!("HTTP connections still open after the drain; closing them");
                    server.abort();
                    Ok(())
                }
            },
        };
        tracing::info!("kaiwa stopped");
        served.map_err(|join| AppError::Serve(std::io::Error::other(join)))
    }
}
