//! Logs and metrics. Logs go to standard output (text or JSON) and, as JSON lines, to one file
//! per component under `<data-dir>/logs`: `gateway.log` (sessions, admission, HTTP),
//! `worker.log` (processing, replies, queue) and `kaiwa.log` (everything).

use crate::config::{LogConfig, LogFormat};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};
use std::io::IsTerminal;
use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::Level;
use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, fmt};

/// Keeps the log files' writer threads alive; dropping it flushes them.
#[must_use]
pub struct TelemetryGuard {
    _files: Vec<WorkerGuard>,
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("invalid log filter {filter:?}: {source}")]
    Filter {
        filter: String,
        source: tracing_subscriber::filter::ParseError,
    },
    #[error("cannot create the log directory {path}: {source}")]
    LogDir {
        path: String,
        source: std::io::Error,
    },
    #[error("a global logger is already installed")]
    AlreadyInstalled,
}

const GATEWAY_TARGETS: [&str; 6] = [
    "kaiwa::gateway",
    "kaiwa::presence",
    "kaiwa::admission",
    "kaiwa::recovery",
    "kaiwa::http",
    "kaiwa::app",
];
const WORKER_TARGETS: [&str; 3] = ["kaiwa::worker", "kaiwa::replies", "kaiwa::queue"];

/// Installs the global logger. Call once, from the binary.
pub fn init(config: &LogConfig, data_dir: &Path) -> Result<TelemetryGuard, TelemetryError> {
    let filter = EnvFilter::try_new(&config.filter).map_err(|source| TelemetryError::Filter {
        filter: config.filter.clone(),
        source,
    })?;
    // Caps, whatever the filter asks: tungstenite logs every frame it reads at TRACE, tokens
    // and messages included, so it never goes below DEBUG; lapin warns of every message the
    // broker returns, whole (a reply's text included), and kaiwa publishes events as mandatory
    // so that returns happen, and handles each one. A second filter, not directives in the
    // first: a directive there would also turn these targets *on* at that level.
    let caps = Targets::new()
        .with_default(LevelFilter::TRACE)
        .with_target("tungstenite::protocol", LevelFilter::DEBUG)
        .with_target("lapin::returned_messages", LevelFilter::ERROR);
    let stdout = match config.log_format {
        LogFormat::Text => fmt::layer()
            .with_target(true)
            .with_ansi(std::io::stdout().is_terminal())
            .with_filter(filter)
            .with_filter(caps)
            .boxed(),
        LogFormat::Json => fmt::layer()
            .json()
            .flatten_event(true)
            .with_filter(filter)
            .with_filter(caps)
            .boxed(),
    };

    let dir = data_dir.join("logs");
    std::fs::create_dir_all(&dir).map_err(|source| TelemetryError::LogDir {
        path: dir.display().to_string(),
        source,
    })?;
    let mut guards = Vec::new();
    let mut file_layer = |name: &str, targets: Targets| {
        let appender = tracing_appender::rolling::never(&dir, name);
        let (writer, guard) = tracing_appender::non_blocking(appender);
        guards.push(guard);
        fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(writer)
            .with_filter(targets)
            .boxed()
    };
    let info = |targets: &[&'static str]| {
        Targets::new().with_targets(targets.iter().map(|target| (*target, Level::INFO)))
    };
    let gateway = file_layer("gateway.log", info(&GATEWAY_TARGETS));
    let worker = file_layer("worker.log", info(&WORKER_TARGETS));
    let all = file_layer(
        "kaiwa.log",
        Targets::new()
            .with_target("kaiwa", Level::INFO)
            .with_default(Level::WARN),
    );

    tracing_subscriber::registry()
        .with(vec![stdout, gateway, worker, all])
        .try_init()
        .map_err(|_| TelemetryError::AlreadyInstalled)?;
    Ok(TelemetryGuard { _files: guards })
}

/// How often the recorder folds recent histogram samples into their buckets. Until then every
/// sample is kept, 8 bytes each: a server nobody scrapes would grow with every store batch.
pub const METRICS_UPKEEP: Duration = Duration::from_secs(5);

/// Bucket bounds of every `_seconds` histogram: 100 µs to 10 s.
const SECONDS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 10.0,
];
/// Bucket bounds of the time to a message's last reply, which the reply delays put at 0 to 3 s
/// by design: fine around the objectives (`deploy/prometheus/rules/kaiwa.yml`), up to a minute.
const REPLY_SECONDS: [f64; 16] = [
    0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 7.5, 10.0, 30.0, 60.0,
];
/// Bucket bounds of the store's batch sizes (commands per commit).
const BATCH_SIZES: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0];

/// The recorder's settings. Histograms have fixed buckets rather than the exporter's default
/// summaries: a bucket count per bound takes the same memory whatever is recorded (a summary's
/// sketch grew with the range of values seen, up to half a megabyte per 20 s window), and
/// Prometheus can aggregate buckets across processes, which quantiles it cannot.
pub fn metrics_builder() -> Result<PrometheusBuilder, BuildError> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS)?
        // A full name outranks a suffix.
        .set_buckets_for_metric(
            Matcher::Full("kaiwa_message_reply_seconds".into()),
            &REPLY_SECONDS,
        )?
        .set_buckets_for_metric(Matcher::Full("kaiwa_store_batch_size".into()), &BATCH_SIZES)
}

/// The Prometheus recorder, installed on first use. `None` if another recorder was installed
/// first in this process. It keeps histogram samples until [`keep_metrics`] drains them.
pub fn metrics_handle() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| metrics_builder().ok()?.install_recorder().ok())
        .clone()
}

/// Drains the recorder's histogram samples every `every` until `stop`. `install_recorder`
/// leaves this to its caller (only the exporter's own HTTP listener does it by itself), and a
/// scrape does it only as often as someone scrapes.
pub async fn keep_metrics(handle: PrometheusHandle, every: Duration, stop: CancellationToken) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => handle.run_upkeep(),
        }
    }
}
