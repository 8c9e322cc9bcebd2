//! Runs the message scenarios (`spec`, `throughput`, and any `--rate`): plans the clients,
//! starts them, shows the live progress bar, and merges what they counted into a [`Summary`]
//! (and the [`Chart`] that `--plot` draws).

use crate::auth::Minter;
use crate::client::{self, StartLine};
use crate::connect::{self, Shared};
use crate::gaps::Timeline;
use crate::ledger::Mode;
use crate::media::{MediaError, Samples};
use crate::plan::{self, Mix, Pace};
use crate::plot::Chart;
use crate::report::{Live, RunInfo, Summary, Tally, UrlShare, millis};
use crate::windows::Windows;
use chrono::{SecondsFormat, Utc};
use futures::{SinkExt, StreamExt};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kaiwa_protocol::native;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// Everything a message scenario needs to know.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    pub scenario: String,
    pub label: Option<String>,
    /// The servers' endpoints (gateways of a cluster, or one server); client i keeps to
    /// `urls[i % urls.len()]`.
    pub urls: Vec<String>,
    pub mode: Mode,
    pub clients: usize,
    /// Messages in all; with neither this nor `duration`, the scenario's default applies.
    pub messages: Option<u64>,
    pub duration: Option<Duration>,
    /// Offered messages per second over all clients (open loop); `None` for closed loop.
    pub rate: Option<f64>,
    /// Closed loop: unanswered messages per client (capped by the server's own limit).
    pub window: usize,
    pub mix: Mix,
    pub seed: u64,
    /// After a client's last send, how long its answers may take before they count as lost.
    pub drain_timeout: Duration,
    /// The whole run stops after this, whatever is left.
    pub timeout: Duration,
    pub progress: bool,
    /// Clients reconnect and resume when a connection ends under them (native only), and the
    /// report says what that took.
    pub reconnect: bool,
    /// Signs each client's token, when the server has auth on.
    pub auth: Option<Arc<Minter>>,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Media(#[from] MediaError),
    #[error("--clients must be at least 1")]
    NoClients,
    #[error("at least one --url is needed")]
    NoUrls,
    #[error("--rate must be a positive number of messages per second")]
    BadRate,
    #[error("--reconnect needs the native protocol: only it resumes a reply stream")]
    ReconnectNeedsNative,
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthError),
    #[error("a client task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Runs the scenario and returns its summary; the caller decides what a failure means.
pub async fn run(config: LoadConfig) -> Result<Summary, LoadError> {
    run_charted(config).await.map(|(summary, _)| summary)
}

/// Runs the scenario and returns its summary and its chart, for `--plot`.
pub async fn run_charted(config: LoadConfig) -> Result<(Summary, Chart), LoadError> {
    if config.clients == 0 {
        return Err(LoadError::NoClients);
    }
    let Some(first_url) = config.urls.first() else {
        return Err(LoadError::NoUrls);
    };
    if config
        .rate
        .is_some_and(|rate| !(rate > 0.0 && rate.is_finite()))
    {
        return Err(LoadError::BadRate);
    }
    if config.reconnect && config.mode != Mode::Native {
        return Err(LoadError::ReconnectNeedsNative);
    }
    let started_at = Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true);
    let began = Instant::now();
    let samples = Arc::new(Samples::generate()?);
    let live = Arc::new(Live {
        replies: Timeline::new(config.timeout),
        ..Live::default()
    });
    let stop = CancellationToken::new();
    let timer = tokio::spawn({
        let stop = stop.clone();
        let timeout = config.timeout;
        async move {
            tokio::time::sleep(timeout).await;
            stop.cancel();
        }
    });

    // Legacy and path frames carry no windows; a native probe asks the server for its own. The
    // gateways of a cluster share one configuration, so the first speaks for all.
    let windows = match config.mode {
        Mode::Legacy | Mode::Path => Some(
            probe_windows(first_url, config.seed, config.auth.as_deref())
                .await
                .unwrap_or_default(),
        ),
        Mode::Native | Mode::Echo => None,
    };

    let run_id = plan::run_id(config.seed);
    let mut total = config.messages;
    if let (Some(rate), Some(duration), None) = (config.rate, config.duration, total) {
        total = Some((rate * duration.as_secs_f64()).round() as u64);
    }
    let mut plans = plan::clients(config.clients, total, config.seed, &run_id);
    if let Some(minter) = &config.auth {
        for plan in &mut plans {
            plan.token = Some(minter.token(&plan.client_id)?);
        }
    }
    if let (Some(_), Some(total)) = (config.rate, total) {
        // An even share each, so the offered rate stays even over the run.
        let n = config.clients as u64;
        for plan in &mut plans {
            plan.messages = Some(total / n + u64::from((plan.index as u64) < total % n));
        }
    }
    let deadline = match (config.rate, config.duration) {
        (None, Some(duration)) => Some(Instant::now() + duration),
        _ => None,
    };
    let shared = Shared {
        urls: config.urls.clone().into(),
        mode: config.mode,
        mix: config.mix.clone(),
        samples,
        live: live.clone(),
        stop: stop.clone(),
        windows,
        drain_timeout: config.drain_timeout,
        deadline,
        reconnect: config.reconnect,
    };

    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
    let (start_tx, start_rx) = watch::channel(None);
    let mut tasks = Vec::with_capacity(plans.len());
    for plan in plans {
        let (pace, start) = match config.rate {
            Some(rate) => (
                Pace::open(rate, config.clients, plan.index),
                Some(StartLine {
                    ready: ready_tx.clone(),
                    start: start_rx.clone(),
                }),
            ),
            None => (
                Pace::Closed {
                    window: config.window,
                },
                None,
            ),
        };
        let endpoint = plan::endpoint(plan.index, config.urls.len());
        tasks.push((
            endpoint,
            tokio::spawn(client::run(shared.clone(), plan, pace, start)),
        ));
    }
    drop(ready_tx);
    if config.rate.is_some() {
        // Open loop: every schedule starts at the same instant, once all clients are in.
        let mut answered = 0;
        while answered < config.clients {
            tokio::select! {
                ready = ready_rx.recv() => match ready {
                    Some(_) => answered += 1,
                    None => break,
                },
                () = stop.cancelled() => break,
            }
        }
        start_tx
            .send(Some(Instant::now() + Duration::from_millis(20)))
            .ok();
    }

    let progress = Progress::start(&config, total, live.clone());
    let mut tally = Tally::default();
    let mut by_url = vec![Tally::default(); config.urls.len()];
    for (endpoint, task) in tasks {
        let client = task.await?;
        tally.merge(&client);
        if let Some(share) = by_url.get_mut(endpoint) {
            share.merge(&client);
        }
    }
    progress.finish();
    timer.abort();

    let info = RunInfo {
        scenario: config.scenario.clone(),
        label: config.label.clone(),
        protocol: config.mode.name().to_owned(),
        urls: config.urls.clone(),
        started_at,
        offered_rate: config.rate,
        elapsed: began.elapsed(),
        max_concurrent: Live::get(&live.max_concurrent),
    };
    let mut summary = Summary::new(info, &tally);
    summary.run_id = Some(run_id);
    summary.reconnect = config.reconnect;
    // The sending phase: from the first message due to the last client's last new message (or
    // the end, for clients the run stopped first).
    let sending_done = tally.sending_done.filter(|_| !tally.still_sending);
    let ended = std::time::Instant::now();
    let phase = tally
        .first_send
        .map(|first| (first, sending_done.unwrap_or(ended)));
    summary.longest_silence_ms =
        phase.and_then(|(from, to)| live.replies.longest_silence(from, to).map(millis));
    summary.by_url = config
        .urls
        .iter()
        .zip(&by_url)
        .map(|(url, share)| UrlShare::from_tally(url, share))
        .collect();
    let chart = Chart::of(&summary, &tally, &live, phase, ended);
    Ok((summary, chart))
}

/// Reads the server's windows from a native `welcome`; `None` if the server does not speak
/// `kaiwa.v1` (a Python server), in which case the defaults apply.
async fn probe_windows(url: &str, seed: u64, auth: Option<&Minter>) -> Option<Windows> {
    let mut ws = connect::open(url, true, None).await.ok()?;
    let client_id = format!("load-probe-{}", plan::run_id(seed));
    let token = match auth {
        Some(minter) => Some(minter.token(&client_id).ok()?),
        None => None,
    };
    let hello = native::ClientFrame::Hello(native::Hello {
        client_id: Some(client_id),
        timezone: Some("UTC".to_owned()),
        resume: false,
        after: None,
        token,
    });
    ws.send(Message::text(serde_json::to_string(&hello).ok()?))
        .await
        .ok()?;
    let windows = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(frame)) = ws.next().await {
            if let Message::Text(text) = frame {
                return match serde_json::from_str::<native::ServerFrame>(&text) {
                    Ok(native::ServerFrame::Welcome(welcome)) => {
                        Windows::from_welcome(&welcome.windows).ok()
                    }
                    _ => None,
                };
            }
        }
        None
    })
    .await
    .ok()
    .flatten();
    ws.close(None).await.ok();
    windows
}

/// The live progress bar: messages settled, rate, problems, connections.
struct Progress {
    bar: ProgressBar,
    task: tokio::task::JoinHandle<()>,
}

impl Progress {
    fn start(config: &LoadConfig, total: Option<u64>, live: Arc<Live>) -> Self {
        let target = if config.progress {
            ProgressDrawTarget::stderr_with_hz(5)
        } else {
            ProgressDrawTarget::hidden()
        };
        let bar = ProgressBar::with_draw_target(total, target);
        let template = if total.is_some() {
            "{spinner} {elapsed_precise} [{bar:30}] {pos}/{len} settled  {msg}"
        } else {
            "{spinner} {elapsed_precise} {pos} settled  {msg}"
        };
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style.progress_chars("=> "));
        }
        let task = tokio::spawn({
            let bar = bar.clone();
            async move {
                let mut tick = tokio::time::interval(Duration::from_millis(200));
                let mut last = (Instant::now(), 0u64);
                let mut rate = 0.0;
                loop {
                    tick.tick().await;
                    let settled = Live::get(&live.settled);
                    let now = Instant::now();
                    let span = now.duration_since(last.0).as_secs_f64();
                    if span >= 1.0 {
                        rate = settled.saturating_sub(last.1) as f64 / span;
                        last = (now, settled);
                    }
                    bar.set_position(settled);
                    bar.set_message(format!(
                        "{rate:.0} msg/s  sent {}  busy {}  refused {}  connected {}  reconnects {}  problems {}",
                        Live::get(&live.sent),
                        Live::get(&live.busy),
                        Live::get(&live.refusals),
                        Live::get(&live.concurrent),
                        Live::get(&live.reconnects),
                        Live::get(&live.problems),
                    ));
                }
            }
        });
        Self { bar, task }
    }

    fn finish(self) {
        self.task.abort();
        self.bar.finish_and_clear();
    }
}
