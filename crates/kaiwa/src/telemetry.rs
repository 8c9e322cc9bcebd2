//! Logs and metrics. Logs go to standard output (text or JSON) and, unless `--log-files false`,
//! as JSON lines to one file per component under `<data-dir>/logs`, rotated daily by default:
//! `gateway.<date>.log` (sessions, admission, HTTP), `worker.<date>.log` (processing, replies,
//! queue) and `kaiwa.<date>.log` (everything).

use crate::config::{LogConfig, LogFormat, LogRotation};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};
use std::io::IsTerminal;
use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::Level;
use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_appender::rolling::{RollingFileAppender, Rotation};
use tracing_subscriber::filter::{EnvFilter, FilterExt, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry, fmt};

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
    #[error("cannot open the log file {component} in {dir}: {source}")]
    LogFile {
        component: &'static str,
        dir: String,
        source: tracing_appender::rolling::InitError,
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
    let (layers, guards) = layers(config, data_dir)?;
    tracing_subscriber::registry()
        .with(layers)
        .try_init()
        .map_err(|_| TelemetryError::AlreadyInstalled)?;
    Ok(TelemetryGuard { _files: guards })
}

/// Standard output's layer and the log files', each with one filter: its own and the caps
/// combined with `and`, which tells tracing the least verbose level any output wants, so that
/// a disabled `debug!` or `trace!` is skipped where it is written. (Filters nested as two
/// `with_filter`s instead left every callsite enabled at TRACE, and every frame tungstenite
/// logged went through each output's target matching: a fifth of `kaiwa serve`'s CPU under
/// load.)
fn layers(
    config: &LogConfig,
    data_dir: &Path,
) -> Result<(Vec<FileLayer>, Vec<WorkerGuard>), TelemetryError> {
    let filter = EnvFilter::try_new(&config.filter).map_err(|source| TelemetryError::Filter {
        filter: config.filter.clone(),
        source,
    })?;
    let stdout = match config.log_format {
        LogFormat::Text => fmt::layer()
            .with_target(true)
            .with_ansi(std::io::stdout().is_terminal())
            .with_filter(filter.and(caps()))
            .boxed(),
        LogFormat::Json => fmt::layer()
            .json()
            .flatten_event(true)
            .with_filter(filter.and(caps()))
            .boxed(),
    };
    let (files, guards) = file_layers(config, data_dir)?;
    let mut layers = vec![stdout];
    layers.extend(files);
    Ok((layers, guards))
}

/// Caps on every output, whatever the filter asks: tungstenite logs every frame it reads at
/// TRACE, tokens and messages included, so it never goes below DEBUG; lapin warns of every
/// message the broker returns, whole (a reply's text included), and kaiwa publishes events as
/// mandatory so that returns happen, and handles each one. A filter of its own, not directives
/// in the first: a directive there would also turn these targets *on* at that level.
fn caps() -> Targets {
    Targets::new()
        .with_default(LevelFilter::TRACE)
        .with_target("tungstenite::protocol", LevelFilter::DEBUG)
        .with_target("lapin::returned_messages", LevelFilter::ERROR)
}

/// Lines each log file's writer thread may have waiting; past it, lines are dropped rather than
/// holding up the thread that logs. The channel's slots are allocated, and written, when it is
/// made: tracing-appender's default of 128,000 lines kept 4 MB resident per file (12 MB for the
/// three) in a server that logs a line per connection. A burst of reconnecting clients logs
/// a few thousand lines, which the writer drains in milliseconds.
const BUFFERED_LINES: usize = 8_192;

/// A layer that writes one log file.
type FileLayer = Box<dyn Layer<Registry> + Send + Sync>;

/// The layers that write the log files, with the guards that flush them; none with
/// `--log-files false` (and then no `logs` directory is made).
fn file_layers(
    config: &LogConfig,
    data_dir: &Path,
) -> Result<(Vec<FileLayer>, Vec<WorkerGuard>), TelemetryError> {
    if !config.files {
        return Ok((Vec::new(), Vec::new()));
    }
    let dir = data_dir.join("logs");
    std::fs::create_dir_all(&dir).map_err(|source| TelemetryError::LogDir {
        path: dir.display().to_string(),
        source,
    })?;
    let info = |targets: &[&'static str]| {
        Targets::new().with_targets(targets.iter().map(|target| (*target, Level::INFO)))
    };
    let components = [
        ("gateway", info(&GATEWAY_TARGETS)),
        ("worker", info(&WORKER_TARGETS)),
        (
            "kaiwa",
            Targets::new()
                .with_target("kaiwa", Level::INFO)
                .with_default(Level::WARN),
        ),
    ];
    let mut layers = Vec::new();
    let mut guards = Vec::new();
    for (component, targets) in components {
        let (writer, guard) = NonBlockingBuilder::default()
            .buffered_lines_limit(BUFFERED_LINES)
            .thread_name(&format!("log-{component}"))
            .finish(file_appender(&dir, component, config)?);
        guards.push(guard);
        layers.push(
            fmt::layer()
                .json()
                .flatten_event(true)
                .with_writer(writer)
                .with_filter(targets.and(caps()))
                .boxed(),
        );
    }
    Ok((layers, guards))
}

/// The file of one component in `dir`, rotated as configured: `<component>.<date>.log` (the
/// date to the hour with hourly rotation), or `<component>.log` with none. The oldest files
/// past `--log-keep` are deleted now and at each rotation.
fn file_appender(
    dir: &Path,
    component: &'static str,
    config: &LogConfig,
) -> Result<RollingFileAppender, TelemetryError> {
    let rotation = match config.rotation {
        LogRotation::Daily => Rotation::DAILY,
        LogRotation::Hourly => Rotation::HOURLY,
        LogRotation::Never => Rotation::NEVER,
    };
    RollingFileAppender::builder()
        .rotation(rotation)
        .filename_prefix(component)
        .filename_suffix("log")
        // 0 turns pruning off, as --log-keep 0 says.
        .max_log_files(config.keep)
        .build(dir)
        .map_err(|source| TelemetryError::LogFile {
            component,
            dir: dir.display().to_string(),
            source,
        })
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn config(args: &[&str]) -> LogConfig {
        crate::ServeConfig::from_args(args.iter().copied())
            .expect("valid flags")
            .log
    }

    #[test]
    fn the_log_files_never_get_what_the_caps_hold_back() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let config = config(&["--log-rotation", "never"]);
        let (layers, guards) = file_layers(&config, dir.path()).expect("the file layers");
        let subscriber = tracing_subscriber::registry().with(layers);
        tracing::subscriber::with_default(subscriber, || {
            // What lapin logs of a returned event: the whole message, a reply's text included.
            tracing::warn!(target: "lapin::returned_messages", "a reply's secret text");
            tracing::warn!(target: "lapin::channel", "a warning of lapin's own");
        });
        drop(guards);
        let all = std::fs::read_to_string(dir.path().join("logs/kaiwa.log")).expect("kaiwa.log");
        assert!(all.contains("a warning of lapin's own"), "{all}");
        assert!(!all.contains("secret"), "{all}");
    }

    #[test]
    fn a_disabled_level_is_skipped_before_any_output_is_asked() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (layers, _guards) =
            layers(&config(&["--log", "warn"]), dir.path()).expect("the layers");
        let subscriber = tracing_subscriber::registry().with(layers);
        // The log files take INFO of kaiwa's own targets; nothing takes DEBUG or TRACE.
        assert_eq!(
            tracing::Subscriber::max_level_hint(&subscriber),
            Some(LevelFilter::INFO)
        );
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .expect("a directory")
            .map(|entry| {
                entry
                    .expect("an entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        names.sort();
        names
    }

    /// The name of the file a line written now goes to: the date (or hour) is taken before and
    /// after the write, so a test running across midnight sees one of the two.
    fn written_now(
        dir: &Path,
        component: &'static str,
        config: &LogConfig,
        format: &str,
    ) -> String {
        let before = chrono::Utc::now().format(format).to_string();
        let mut appender = file_appender(dir, component, config).expect("an appender");
        appender
            .write_all(b"{\"message\":\"hello\"}\n")
            .expect("written");
        let after = chrono::Utc::now().format(format).to_string();
        let names = names(dir);
        let name = names
            .iter()
            .find(|name| {
                [&before, &after]
                    .iter()
                    .any(|date| **name == format!("{component}.{date}.log"))
            })
            .unwrap_or_else(|| panic!("no {component} file of {before} or {after}: {names:?}"));
        name.clone()
    }

    #[test]
    fn files_are_rotated_daily_by_default_and_named_by_their_day() {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = config(&[]);
        assert!(config.files);
        assert_eq!((config.rotation, config.keep), (LogRotation::Daily, 7));
        let name = written_now(dir.path(), "gateway", &config, "%Y-%m-%d");
        let text = std::fs::read_to_string(dir.path().join(name)).expect("readable");
        assert_eq!(text, "{\"message\":\"hello\"}\n");
    }

    #[test]
    fn hourly_rotation_names_each_file_by_its_hour() {
        let dir = tempfile::tempdir().expect("temp dir");
        written_now(
            dir.path(),
            "worker",
            &config(&["--log-rotation", "hourly"]),
            "%Y-%m-%d-%H",
        );
    }

    #[test]
    fn without_rotation_each_component_keeps_its_one_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = config(&["--log-rotation", "never"]);
        file_appender(dir.path(), "kaiwa", &config)
            .expect("an appender")
            .write_all(b"{}\n")
            .expect("written");
        assert_eq!(names(dir.path()), ["kaiwa.log"]);
    }

    /// Files of a component dated `days` (oldest first), created in that order: the appender
    /// deletes by creation time, and two files made within one tick of the file system's
    /// clock would tie, so each is made again until its time is later than the one before.
    fn dated_files(dir: &Path, component: &str, days: &[&str]) {
        let mut last = None;
        for day in days {
            let path = dir.join(format!("{component}.{day}.log"));
            loop {
                std::fs::write(&path, day).expect("written");
                let created = std::fs::metadata(&path)
                    .and_then(|meta| meta.created())
                    .ok();
                // Without creation times the appender orders files by the date in their name.
                if created.is_none() || created > last {
                    last = created;
                    break;
                }
                std::fs::remove_file(&path).expect("removed");
            }
        }
    }

    #[test]
    fn past_log_keep_the_oldest_files_of_the_component_are_deleted() {
        let dir = tempfile::tempdir().expect("temp dir");
        let days = [
            "2026-01-01",
            "2026-01-02",
            "2026-01-03",
            "2026-01-04",
            "2026-01-05",
        ];
        dated_files(dir.path(), "gateway", &days);
        dated_files(dir.path(), "worker", &days[..2]);
        std::fs::write(dir.path().join("notes.txt"), "an operator's").expect("written");
        let config = config(&["--log-keep", "3"]);
        let today = written_now(dir.path(), "gateway", &config, "%Y-%m-%d");
        let mut expected = vec![
            "gateway.2026-01-04.log".to_owned(),
            "gateway.2026-01-05.log".to_owned(),
            today,
            "notes.txt".to_owned(),
            "worker.2026-01-01.log".to_owned(),
            "worker.2026-01-02.log".to_owned(),
        ];
        expected.sort();
        assert_eq!(
            names(dir.path()),
            expected,
            "three gateway files, the newest"
        );
    }

    #[test]
    fn log_keep_0_deletes_nothing() {
        let dir = tempfile::tempdir().expect("temp dir");
        let days = ["2026-01-01", "2026-01-02", "2026-01-03"];
        dated_files(dir.path(), "kaiwa", &days);
        written_now(
            dir.path(),
            "kaiwa",
            &config(&["--log-keep", "0"]),
            "%Y-%m-%d",
        );
        assert_eq!(names(dir.path()).len(), 4);
    }

    #[test]
    fn with_log_files_false_nothing_is_written_to_the_data_directory() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (layers, guards) =
            file_layers(&config(&["--log-files", "false"]), dir.path()).expect("no files");
        assert!(layers.is_empty() && guards.is_empty());
        assert!(names(dir.path()).is_empty(), "no logs directory");

        let (layers, _guards) = file_layers(&config(&[]), dir.path()).expect("files");
        assert_eq!(layers.len(), 3);
        assert_eq!(names(&dir.path().join("logs")).len(), 3);
    }
}
