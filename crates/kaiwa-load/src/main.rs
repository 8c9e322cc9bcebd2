//! The `kaiwa-load` binary: parses the command line, runs a scenario, prints its table (and
//! writes its JSON and its plot), and exits non-zero when anything was lost or wrong.

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use kaiwa_load::auth::{AUTH_SECRET_ENV, AuthError, Minter, TokenSettings};
use kaiwa_load::connections::{self, ConnectionsConfig};
use kaiwa_load::delay::{self, DelayProxy};
use kaiwa_load::plan::Mix;
use kaiwa_load::strangers::{self, StrangersConfig};
use kaiwa_load::table::{self, Report};
use kaiwa_load::{LoadConfig, Mode, Summary};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    name = "kaiwa-load",
    version,
    about = "Simulates kaiwa clients, checks every answer, and measures throughput, latency and memory."
)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// The exercise's scenario: 100 clients in random timezones, 2,000 mixed messages with media,
    /// every client sending at least one; clients refused with a close code that says to come
    /// back (1013 when the server is full) wait and retry for their turn.
    Spec(MessageArgs),
    /// Clients sending as fast as answers come back (or at --rate); reports messages per second.
    Throughput(MessageArgs),
    /// Opens and holds idle connections; reports each server's resident memory per connection.
    Connections(ConnectionArgs),
    /// Connections that never say who they are (upgrades that send nothing, first frames of tens
    /// of megabytes, HTTP headers that never end) and one real client among them: how the
    /// server ended each stranger, how long the client took, the server's memory.
    Strangers(StrangerArgs),
    /// A TCP proxy that holds every chunk of bytes --delay-ms before passing it on, each way:
    /// a one-way latency, as between machines, not a pause per chunk. Runs until killed.
    DelayProxy(DelayArgs),
    /// Prints one table from the --json reports of several runs (used by bench/run.sh).
    Table {
        /// JSON reports, in the order to print them.
        files: Vec<PathBuf>,
        /// A run's own p99 target at 1,000 msg/s, as LABEL=MS (repeatable; the others are
        /// held to 10 ms).
        #[arg(long = "p99-target")]
        p99_targets: Vec<table::P99Target>,
    },
    /// One client process's share of `connections` (started by the tool itself).
    #[command(hide = true)]
    ConnectionsPart {
        #[arg(long, required = true)]
        url: Vec<String>,
        #[arg(long)]
        first: usize,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        run_id: String,
        #[arg(long, value_enum, default_value = "native")]
        dialect: Dialect,
        #[command(flatten)]
        auth: AuthArgs,
    },
}

/// Tokens for the clients, when the server has auth on.
#[derive(Debug, Args)]
#[command(next_help_heading = "Auth")]
struct AuthArgs {
    /// The server's --auth-secret: each client then sends a token of its own, signed with it
    /// (HS256, sub = its client id). Read from KAIWA_AUTH_SECRET like the server's; never
    /// printed.
    #[arg(
        long = "auth-secret",
        env = AUTH_SECRET_ENV,
        hide_env_values = true
    )]
    secret: Option<String>,
    /// The `aud` of the tokens: the server's --auth-audience.
    #[arg(long = "auth-audience", default_value = "kaiwa")]
    audience: String,
    /// Seconds each token is good for.
    #[arg(long = "token-ttl", default_value = "86400", value_parser = seconds)]
    ttl: Duration,
}

impl AuthArgs {
    fn settings(&self) -> Option<TokenSettings> {
        self.secret
            .as_ref()
            .filter(|secret| !secret.trim().is_empty())
            .map(|secret| TokenSettings {
                secret: secret.trim().to_owned(),
                audience: self.audience.clone(),
                ttl: self.ttl,
            })
    }

    /// What signs the clients' tokens, when a secret is given.
    fn minter(&self) -> Result<Option<Arc<Minter>>, AuthError> {
        self.settings()
            .map(|settings| settings.minter().map(Arc::new))
            .transpose()
    }
}

#[derive(Debug, Args)]
struct Common {
    /// The server's WebSocket endpoint. Give it once per gateway of a cluster (or once, for
    /// HAProxy's port): client i connects, and reconnects, to the (i mod n)th.
    #[arg(long, default_value = "ws://127.0.0.1:8082/ws")]
    url: Vec<String>,
    /// Write the summary as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// A name for this run in tables and JSON.
    #[arg(long)]
    label: Option<String>,
    /// Random seed: the same seed gives the same clients, timezones and messages.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    auth: AuthArgs,
}

#[derive(Debug, Args)]
struct MessageArgs {
    #[command(flatten)]
    common: Common,
    /// Simulated clients [spec: 100, throughput: 50].
    #[arg(long)]
    clients: Option<usize>,
    /// Messages in all [spec: 2000]; every client sends at least one.
    #[arg(long)]
    messages: Option<u64>,
    /// Send for this many seconds instead of a number of messages [throughput: 10].
    #[arg(long, value_parser = seconds)]
    duration: Option<Duration>,
    /// Offered messages per second over all clients, on a fixed schedule (open loop): latency
    /// is measured from each message's scheduled time, so a slow server cannot hide it.
    #[arg(long)]
    rate: Option<f64>,
    /// Speak the Python server's frames (one message outstanding per client); the same as
    /// --dialect legacy.
    #[arg(long, conflicts_with = "echo")]
    legacy: bool,
    /// Expect every frame back unchanged (against kaiwa-echo, the baseline); the same as
    /// --dialect echo.
    #[arg(long)]
    echo: bool,
    /// The protocol the clients speak [default: native]. `path` is the second Python system's:
    /// each client connects to the --url with `/<client id>?timezone=<its zone>` added (to
    /// `ws://host/ws` or to the server's root), sends no handshake frame, and keeps one message
    /// outstanding.
    #[arg(long, value_enum, conflicts_with_all = ["legacy", "echo"])]
    dialect: Option<Dialect>,
    /// Without --rate: unanswered messages per client (the server's own limit caps it).
    #[arg(long, default_value_t = 32)]
    window: usize,
    /// Message types and weights [spec: text=4,voice=2,video=2,image=2; throughput: text].
    #[arg(long)]
    mix: Option<Mix>,
    /// Seconds a client waits for the answers still due after its last send; what has not
    /// come by then counts as lost.
    #[arg(long, default_value = "30", value_parser = seconds)]
    drain_timeout: Duration,
    /// Seconds after which the whole run stops, whatever is left.
    #[arg(long, default_value = "900", value_parser = seconds)]
    timeout: Duration,
    /// When a connection ends under a client (no close frame, or a close code that says come
    /// back), reconnect to the same URL with backoff and resume: replies missed are replayed,
    /// unacked messages sent again under the same id. Reports reconnects, resends and the
    /// longest time without replies; anything acked but not fully replied is still lost.
    #[arg(long, conflicts_with_all = ["legacy", "echo"])]
    reconnect: bool,
    /// Draw the run to this SVG file: messages completed per second and p50/p99 latency to the
    /// last reply over the run (one-second buckets), and the distribution of that latency by
    /// message type. With --reconnect, reconnects and the times no client got a reply (250 ms
    /// or more) are marked on the time axis.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
}

/// What `--dialect` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Dialect {
    /// `kaiwa.v1`.
    Native,
    /// The first Python server's frames on `/ws`.
    Legacy,
    /// The second Python system's: the client id in the URL.
    Path,
    /// kaiwa-echo, the baseline.
    Echo,
}

impl Dialect {
    fn mode(self) -> Mode {
        match self {
            Self::Native => Mode::Native,
            Self::Legacy => Mode::Legacy,
            Self::Path => Mode::Path,
            Self::Echo => Mode::Echo,
        }
    }
}

#[derive(Debug, Args)]
struct ConnectionArgs {
    #[command(flatten)]
    common: Common,
    /// Idle connections to open and hold.
    #[arg(long, default_value_t = 10_000)]
    clients: usize,
    /// Client processes to spread them over (0: one per 10,000 connections).
    #[arg(long, default_value_t = 0)]
    processes: usize,
    /// The server's process id, to read its resident memory from /proc. With several --url,
    /// one per --url in the same order; memory per connection is then reported per process.
    #[arg(long)]
    server_pid: Vec<u32>,
    /// Seconds to hold the connections before measuring.
    #[arg(long, default_value = "5", value_parser = seconds)]
    hold: Duration,
    /// What the connections speak: `native` (kaiwa.v1), `legacy`, or `path` (the client id in
    /// the URL: give the server's `/ws` as --url).
    #[arg(long, value_enum, default_value = "native")]
    dialect: Dialect,
}

#[derive(Debug, Args)]
struct StrangerArgs {
    /// The server's WebSocket endpoint.
    #[arg(long, default_value = "ws://127.0.0.1:8082/ws")]
    url: String,
    /// Upgrades that never send a frame.
    #[arg(long, default_value_t = 300)]
    silent: usize,
    /// Upgrades whose first frame is --large-bytes long.
    #[arg(long, default_value_t = 8)]
    large: usize,
    #[arg(long, default_value_t = 30_000_000)]
    large_bytes: usize,
    /// HTTP requests whose headers never end.
    #[arg(long, default_value_t = 300)]
    slow_headers: usize,
    /// The server's process id, to read its resident memory from /proc.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Seconds the strangers get to be closed by the server (and the real client to be
    /// answered) before the run gives up on them.
    #[arg(long, default_value = "30", value_parser = seconds)]
    wait: Duration,
    /// Write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    #[command(flatten)]
    auth: AuthArgs,
}

#[derive(Debug, Args)]
struct DelayArgs {
    /// Where to listen, e.g. 127.0.0.1:15432.
    #[arg(long)]
    listen: String,
    /// Where to forward each connection, e.g. 127.0.0.1:5432.
    #[arg(long)]
    to: String,
    /// Milliseconds each chunk is held in each direction (a round trip takes twice this).
    #[arg(long, value_parser = milliseconds)]
    delay_ms: Duration,
}

fn milliseconds(raw: &str) -> Result<Duration, String> {
    duration(raw, "milliseconds", 1000.0)
}

fn seconds(raw: &str) -> Result<Duration, String> {
    duration(raw, "seconds", 1.0)
}

/// A decimal number of `unit`s, of which there are `per_second` in a second.
fn duration(raw: &str, unit: &str, per_second: f64) -> Result<Duration, String> {
    let value: f64 = raw
        .parse()
        .map_err(|_| format!("{raw:?} is not a number of {unit}"))?;
    Duration::try_from_secs_f64(value / per_second).map_err(|e| e.to_string())
}

fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    if let Scenario::DelayProxy(args) = &cli.scenario {
        // Before any thread starts, so that the proxy's threads inherit the slack.
        return delay_proxy(args);
    }
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async move {
        match cli.scenario {
            Scenario::Spec(args) => messages("spec", args).await,
            Scenario::Throughput(args) => messages("throughput", args).await,
            Scenario::Connections(args) => {
                let config = ConnectionsConfig {
                    label: args.common.label.clone(),
                    urls: args.common.url.clone(),
                    clients: args.clients,
                    processes: args.processes,
                    server_pids: args.server_pid.clone(),
                    hold: args.hold,
                    exe: std::env::current_exe().ok(),
                    seed: args.common.seed,
                    auth: args.common.auth.settings(),
                    mode: args.dialect.mode(),
                };
                if !args.common.quiet {
                    eprintln!(
                        "opening {} idle connections to {}…",
                        args.clients,
                        args.common.url.join(", ")
                    );
                }
                let summary = connections::run(config).await?;
                finish(&summary, args.common.json.as_ref())
            }
            Scenario::Strangers(args) => {
                let config = StrangersConfig {
                    url: args.url,
                    silent: args.silent,
                    large: args.large,
                    large_bytes: args.large_bytes,
                    slow_headers: args.slow_headers,
                    auth: args.auth.minter()?,
                    server_pid: args.server_pid,
                    wait: args.wait,
                };
                let report = strangers::run(config).await?;
                print!("{}", report.table());
                if let Some(path) = &args.json {
                    std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")
                        .with_context(|| format!("cannot write {}", path.display()))?;
                }
                let unbounded = report
                    .kinds
                    .iter()
                    .any(|kind| kind.ended.contains_key("open"));
                Ok(if report.client.replied_ms.is_some() && !unbounded {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                })
            }
            Scenario::DelayProxy(args) => delay_proxy(&args),
            Scenario::Table { files, p99_targets } => {
                let mut reports = Vec::new();
                for file in &files {
                    let text = std::fs::read_to_string(file)
                        .with_context(|| format!("cannot read {}", file.display()))?;
                    reports.push(
                        Report::parse(&text)
                            .with_context(|| format!("{} is not a report", file.display()))?,
                    );
                }
                print!("{}", table::render(&reports, &p99_targets));
                Ok(ExitCode::SUCCESS)
            }
            Scenario::ConnectionsPart {
                url,
                first,
                count,
                run_id,
                dialect,
                auth,
            } => {
                let minter = auth.minter()?;
                let report = connections::run_part(
                    &url,
                    first,
                    count,
                    &run_id,
                    minter.as_deref(),
                    dialect.mode(),
                )
                .await;
                println!("{}", serde_json::to_string(&report)?);
                Ok(ExitCode::SUCCESS)
            }
        }
    })
}

/// Runs the proxy on this thread, outside any async runtime (kaiwa_load::delay says why).
fn delay_proxy(args: &DelayArgs) -> anyhow::Result<ExitCode> {
    if let Err(err) = delay::tighten_timer_slack() {
        eprintln!("delay-proxy: {err}; delays may run up to 50 µs long");
    }
    let proxy = DelayProxy::bind(&args.listen, &args.to, args.delay_ms)?;
    eprintln!(
        "delay-proxy: {} -> {}, {:.3} ms each way",
        proxy.local_addr()?,
        args.to,
        args.delay_ms.as_secs_f64() * 1000.0
    );
    proxy.run();
    Ok(ExitCode::SUCCESS)
}

async fn messages(scenario: &str, args: MessageArgs) -> anyhow::Result<ExitCode> {
    let spec = scenario == "spec";
    let mode = match (args.legacy, args.echo, args.dialect) {
        (true, _, _) => Mode::Legacy,
        (_, true, _) => Mode::Echo,
        (_, _, Some(dialect)) => dialect.mode(),
        _ => Mode::Native,
    };
    let (default_clients, default_mix) = if spec {
        (100, Mix::spec())
    } else {
        (50, Mix::text())
    };
    let mut messages = args.messages;
    let mut duration = args.duration;
    if messages.is_none() && duration.is_none() {
        if spec {
            messages = Some(2_000);
        } else {
            duration = Some(Duration::from_secs(10));
        }
    }
    if mode.one_at_a_time() && args.rate.is_some() {
        bail!(
            "--rate needs the native protocol: {} frames name no message, so such a client waits for each answer",
            mode.name()
        );
    }
    let config = LoadConfig {
        scenario: scenario.to_owned(),
        label: args.common.label.clone(),
        urls: args.common.url.clone(),
        mode,
        clients: args.clients.unwrap_or(default_clients),
        messages,
        duration,
        rate: args.rate,
        window: args.window,
        mix: args.mix.unwrap_or(default_mix),
        seed: args.common.seed,
        drain_timeout: args.drain_timeout,
        timeout: args.timeout,
        progress: !args.common.quiet,
        reconnect: args.reconnect,
        auth: args.common.auth.minter()?,
    };
    let (summary, chart) = kaiwa_load::run_charted(config).await?;
    let code = finish(&summary, args.common.json.as_ref())?;
    if let Some(path) = &args.plot {
        chart.write(path)?;
    }
    Ok(code)
}

fn finish(summary: &Summary, json: Option<&PathBuf>) -> anyhow::Result<ExitCode> {
    print!("{}", summary.table());
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(summary)?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(if summary.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
