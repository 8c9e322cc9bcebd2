//! What operators look at, against the real thing: a real Prometheus (Debian's package) scrapes
//! a `kaiwa serve` on SQLite and a cluster gateway and worker on PostgreSQL and RabbitMQ, all
//! real processes, through a short kaiwa-load run with every message type. Then every query of
//! the Grafana dashboard (`deploy/grafana/dashboards/`) and every rule of
//! `deploy/prometheus/rules/` (as Prometheus loaded it from the file) is evaluated through
//! Prometheus's HTTP API: a query that errors, or answers nothing, fails the test.
//!
//! An alert's condition is empty when nothing is wrong, so each comparison in it is evaluated
//! with `bool` (`up == 0` as `up == bool 0`): that answers 0 or 1 for every series the alert
//! looks at, so the series it watches must exist, with the labels its other side matches. The
//! run must also leave no alert firing.

mod support;

use kaiwa_load::plan::Mix;
use kaiwa_load::{LoadConfig, Mode};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use support::cluster::Cluster;
use tokio::process::{Child, Command};

/// How long every query has to answer with data once the load is over: the scrapes and rule
/// evaluations after it (each every second) must have happened.
const SETTLE: Duration = Duration::from_secs(60);

/// What the dashboard's variables stand for here: every role and instance, and a window of
/// many scrapes.
const VARIABLES: [(&str, &str); 3] = [
    ("$__rate_interval", "1m"),
    ("$role", ".*"),
    ("$instance", ".*"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_and_rule_answers_with_data_from_a_real_prometheus() {
    let prometheus_bin = prometheus_binary();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let flags = [
        support::ANY_HOUR.as_slice(),
        &["--reply-delay-scale", "0.05"],
    ]
    .concat();

    let dir = tempfile::tempdir().expect("a temporary directory");
    let serve_dir = dir.path().join("serve");
    std::fs::create_dir_all(&serve_dir).expect("a data directory");
    let mut command = support::serve_command(&serve_dir);
    command.args(["--bind", "127.0.0.1:0"]).args(&flags);
    let serve = support::start_listening("serve", &mut command, &serve_dir).await;
    let cluster = Cluster::create().await;
    let gateway = cluster.gateway("gw-1", &flags).await;
    let worker = cluster.worker("wk-1", &flags).await;

    let targets = [
        ("serve", serve.addr),
        ("gateway", gateway.addr),
        ("worker", worker.addr),
    ];
    let prometheus = Prometheus::start(&prometheus_bin, &repo, dir.path(), &targets).await;
    prometheus
        .wait_for(
            "every target is scraped",
            "up{job=\"kaiwa\"} == 1",
            |result| result.len() == targets.len(),
        )
        .await;

    let config = LoadConfig {
        scenario: "throughput".into(),
        label: None,
        urls: vec![
            format!("ws://{}/ws", serve.addr),
            format!("ws://{}/ws", gateway.addr),
        ],
        mode: Mode::Native,
        clients: 8,
        messages: Some(200),
        duration: None,
        rate: None,
        window: 8,
        mix: "text,voice,video,image".parse::<Mix>().expect("a mix"),
        seed: 22,
        drain_timeout: Duration::from_secs(60),
        timeout: Duration::from_secs(120),
        progress: false,
        reconnect: false,
        auth: None,
    };
    let summary = kaiwa_load::run(config).await.expect("the run completes");
    assert!(summary.ok, "{}", summary.table());
    // Every message processed is in Prometheus: what follows sees the whole run.
    let completed = summary.completed as f64;
    prometheus
        .wait_for(
            "the run's messages are scraped",
            "sum(kaiwa_messages_processed_total{job=\"kaiwa\"})",
            |result| value(result).is_some_and(|processed| processed >= completed),
        )
        .await;

    // Every type was timed, to its ack and to its last reply.
    for histogram in ["kaiwa_message_ack_seconds", "kaiwa_message_reply_seconds"] {
        let promql = format!("sum by (type) ({histogram}_count{{job=\"kaiwa\"}}) > 0");
        prometheus
            .wait_for(&format!("{histogram} of every type"), &promql, |result| {
                let mut types: Vec<&str> = result
                    .iter()
                    .filter_map(|series| series["metric"]["type"].as_str())
                    .collect();
                types.sort_unstable();
                types == ["image", "text", "video", "voice"]
            })
            .await;
    }

    let mut queries = dashboard_queries(&repo.join("deploy/grafana/dashboards"));
    assert!(queries.len() > 20, "the dashboard's queries: {queries:?}");
    let rules = prometheus.rules().await;
    assert!(
        rules.iter().any(|rule| rule.alert) && rules.iter().any(|rule| !rule.alert),
        "recording rules and alerts are loaded from deploy/prometheus/rules: {rules:?}"
    );
    queries.extend(rules.iter().map(Rule::query));

    // A query Prometheus refuses fails at once; one without data yet is asked again until the
    // rules have been evaluated and the scrapes are in.
    let deadline = Instant::now() + SETTLE;
    let mut failures = Vec::new();
    let mut waiting = queries.clone();
    while !waiting.is_empty() {
        let mut empty = Vec::new();
        for query in waiting {
            match prometheus.check(&query).await {
                Ok(()) => {}
                Err(failure) if failure.error || Instant::now() > deadline => {
                    failures.push(failure)
                }
                Err(_) => empty.push(query),
            }
        }
        waiting = empty;
        if !waiting.is_empty() {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} queries failed:\n{}",
        failures.len(),
        queries.len(),
        failures
            .iter()
            .map(|failure| format!("- {}\n  {}", failure.query.what, failure.why))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // Every rule evaluates without an error, and a healthy run fires no alert.
    for rule in prometheus.rules().await {
        assert_eq!(rule.health, "ok", "{rule:?}");
    }
    let firing = prometheus
        .query("ALERTS{alertstate=\"firing\"}")
        .await
        .expect("ALERTS answers");
    assert!(
        firing.is_empty(),
        "alerts fire on a healthy run: {firing:?}"
    );
}

/// Debian's `prometheus` (or the binary `KAIWA_TEST_PROMETHEUS` names): the test fails, and
/// says how to install it, when it cannot run.
fn prometheus_binary() -> PathBuf {
    let binary = PathBuf::from(
        std::env::var("KAIWA_TEST_PROMETHEUS").unwrap_or_else(|_| "prometheus".into()),
    );
    match std::process::Command::new(&binary)
        .arg("--version")
        .output()
    {
        Ok(output) if output.status.success() => binary,
        other => panic!(
            "Prometheus cannot run ({other:?}): this test needs {} (Debian package prometheus: \
             apt-get install prometheus; scripts/test.sh installs it)",
            binary.display()
        ),
    }
}

/// A query to evaluate, and where it comes from.
#[derive(Debug, Clone)]
struct Query {
    /// The panel or rule, and the expression as written.
    what: String,
    /// The PromQL sent to Prometheus.
    promql: String,
    /// For a variable's `label_values(..., label)`: the label every series must carry.
    label: Option<String>,
}

#[derive(Debug)]
struct Failure {
    query: Query,
    why: String,
    /// Prometheus refused the query: no amount of waiting mends that.
    error: bool,
}

/// Every query of every dashboard in `dir`: panel targets (rows' panels too) and variables.
fn dashboard_queries(dir: &Path) -> Vec<Query> {
    let mut queries = Vec::new();
    let entries = std::fs::read_dir(dir).expect("deploy/grafana/dashboards");
    for entry in entries {
        let path = entry.expect("a dashboard").path();
        if path.extension().is_none_or(|ext| ext != "json") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("the dashboard");
        let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut panels: Vec<&Value> = Vec::new();
        for panel in dashboard["panels"].as_array().expect("panels") {
            panels.push(panel);
            panels.extend(panel["panels"].as_array().into_iter().flatten());
        }
        for panel in panels {
            for target in panel["targets"].as_array().into_iter().flatten() {
                let expr = target["expr"].as_str().expect("every target has an expr");
                queries.push(Query {
                    what: format!("{name}: panel {}: {expr}", panel["title"]),
                    promql: substitute(expr),
                    label: None,
                });
            }
        }
        for variable in dashboard["templating"]["list"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let Some(definition) = variable["definition"].as_str() else {
                continue;
            };
            let (expr, label) = label_values(definition).unwrap_or_else(|| {
                panic!(
                    "variable {:?} is not label_values(query, label)",
                    variable["name"]
                )
            });
            queries.push(Query {
                what: format!("{name}: variable {}: {definition}", variable["name"]),
                promql: substitute(expr),
                label: Some(label.to_owned()),
            });
        }
    }
    queries
}

fn substitute(expr: &str) -> String {
    VARIABLES
        .iter()
        .fold(expr.to_owned(), |expr, (name, value)| {
            expr.replace(name, value)
        })
}

/// `label_values(query, label)` split into its query and label.
fn label_values(definition: &str) -> Option<(&str, &str)> {
    let inner = definition
        .trim()
        .strip_prefix("label_values(")?
        .strip_suffix(')')?;
    let (expr, label) = inner.rsplit_once(',')?;
    Some((expr.trim(), label.trim()))
}

/// `expr` with `bool` after each comparison outside label matchers, ranges and strings: it
/// then answers for every series it compares, true or not.
fn with_bool(expr: &str) -> String {
    let mut out = String::with_capacity(expr.len() + 16);
    let mut chars = expr.char_indices().peekable();
    let (mut braces, mut brackets) = (0usize, 0usize);
    let mut quote: Option<char> = None;
    while let Some((at, c)) = chars.next() {
        out.push(c);
        if let Some(open) = quote {
            if c == '\\' {
                if let Some((_, escaped)) = chars.next() {
                    out.push(escaped);
                }
            } else if c == open {
                quote = None;
            }
            continue;
        }
        match c {
            '"' | '\'' | '`' => quote = Some(c),
            '{' => braces += 1,
            '}' => braces = braces.saturating_sub(1),
            '[' => brackets += 1,
            ']' => brackets = brackets.saturating_sub(1),
            '=' | '!' | '>' | '<' if braces == 0 && brackets == 0 => {
                let next = chars.peek().map(|(_, next)| *next);
                let operator = match (c, next) {
                    ('=' | '!' | '>' | '<', Some('=')) => {
                        if let Some((_, next)) = chars.next() {
                            out.push(next);
                        }
                        true
                    }
                    ('>' | '<', _) => true,
                    _ => false,
                };
                let rest = expr[at..]
                    .trim_start_matches(['=', '!', '>', '<'])
                    .trim_start();
                if operator && !rest.starts_with("bool") {
                    out.push_str(" bool");
                }
            }
            _ => {}
        }
    }
    out
}

/// A rule as Prometheus loaded it.
#[derive(Debug)]
struct Rule {
    name: String,
    query: String,
    alert: bool,
    health: String,
}

impl Rule {
    fn query(&self) -> Query {
        let kind = if self.alert {
            "alert"
        } else {
            "recording rule"
        };
        Query {
            what: format!("{kind} {}: {}", self.name, self.query),
            promql: if self.alert {
                with_bool(&self.query)
            } else {
                self.query.clone()
            },
            label: None,
        }
    }
}

/// The single value of an instant vector of one series.
fn value(result: &[Value]) -> Option<f64> {
    match result {
        [series] => series["value"][1].as_str()?.parse().ok(),
        _ => None,
    }
}

/// A Prometheus of the test's own: its configuration and storage in the test's directory, on a
/// free port of this machine (Prometheus cannot listen on port 0).
struct Prometheus {
    addr: SocketAddr,
    http: reqwest::Client,
    _child: Child,
}

impl Prometheus {
    async fn start(
        binary: &Path,
        repo: &Path,
        dir: &Path,
        targets: &[(&str, SocketAddr)],
    ) -> Prometheus {
        let rules = repo.join("deploy/prometheus/rules");
        let rules = rules.canonicalize().expect("deploy/prometheus/rules");
        let static_configs: String = targets
            .iter()
            .map(|(role, addr)| {
                format!("      - targets: [\"{addr}\"]\n        labels: {{role: {role}}}\n")
            })
            .collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {}/*.yml\n\
             scrape_configs:\n  - job_name: kaiwa\n    static_configs:\n{static_configs}",
            rules.display()
        );
        let config_file = dir.join("prometheus.yml");
        std::fs::write(&config_file, config).expect("the configuration is written");
        let http = reqwest::Client::new();
        // A port free a moment ago may be taken by the time Prometheus binds it: then it exits,
        // and another is tried.
        for attempt in 0..5 {
            let addr = free_port();
            let log = dir.join(format!("prometheus-{attempt}.log"));
            let log_file = std::fs::File::create(&log).expect("a log file");
            let mut child = Command::new(binary)
                .arg(format!("--config.file={}", config_file.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.join("tsdb").display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .arg("--log.level=warn")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log_file)
                .kill_on_drop(true)
                .spawn()
                .expect("Prometheus starts");
            let ready = format!("http://{addr}/-/ready");
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(30) {
                if let Ok(Some(status)) = child.try_wait() {
                    let log = std::fs::read_to_string(&log).unwrap_or_default();
                    eprintln!("Prometheus on {addr} exited ({status}):\n{log}");
                    break;
                }
                let answered = http.get(&ready).send().await;
                if answered.is_ok_and(|response| response.status().is_success()) {
                    return Prometheus {
                        addr,
                        http,
                        _child: child,
                    };
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            child.kill().await.ok();
        }
        panic!("Prometheus did not start: see its logs above");
    }

    /// The result of an instant query, or why there is none.
    async fn query(&self, promql: &str) -> Result<Vec<Value>, (String, bool)> {
        let url = reqwest::Url::parse_with_params(
            &format!("http://{}/api/v1/query", self.addr),
            [("query", promql)],
        )
        .expect("a query URL");
        let response = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|err| (format!("Prometheus did not answer: {err}"), true))?;
        let body: Value = response
            .json()
            .await
            .map_err(|err| (format!("not JSON: {err}"), true))?;
        if body["status"] != "success" {
            return Err((format!("{}: {}", body["errorType"], body["error"]), true));
        }
        if body["data"]["resultType"] != "vector" {
            return Err((format!("not an instant vector: {}", body["data"]), true));
        }
        Ok(body["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    async fn check(&self, query: &Query) -> Result<(), Failure> {
        let fail = |why: String, error: bool| Failure {
            query: query.clone(),
            why: format!("{why} (sent: {})", query.promql),
            error,
        };
        let result = self
            .query(&query.promql)
            .await
            .map_err(|(why, error)| fail(why, error))?;
        if result.is_empty() {
            return Err(fail("no data".into(), false));
        }
        if let Some(label) = &query.label
            && let Some(series) = result
                .iter()
                .find(|series| series["metric"][label].is_null())
        {
            return Err(fail(format!("a series without {label}: {series}"), true));
        }
        Ok(())
    }

    /// Waits until `promql` answers what `done` wants.
    async fn wait_for(&self, what: &str, promql: &str, done: impl Fn(&[Value]) -> bool) {
        let started = Instant::now();
        let mut last = None;
        while started.elapsed() < SETTLE {
            match self.query(promql).await {
                Ok(result) if done(&result) => return,
                answer => last = Some(answer),
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!("{what}: not within {SETTLE:?} ({promql} answered {last:?})");
    }

    /// Every rule Prometheus loaded, once each has been evaluated.
    async fn rules(&self) -> Vec<Rule> {
        let started = Instant::now();
        loop {
            let body: Value = self
                .http
                .get(format!("http://{}/api/v1/rules", self.addr))
                .send()
                .await
                .expect("Prometheus answers")
                .json()
                .await
                .expect("JSON");
            let rules: Vec<Rule> = body["data"]["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|group| group["rules"].as_array().into_iter().flatten())
                .map(|rule| Rule {
                    name: rule["name"].as_str().unwrap_or_default().to_owned(),
                    query: rule["query"].as_str().unwrap_or_default().to_owned(),
                    alert: rule["type"] == "alerting",
                    health: rule["health"].as_str().unwrap_or_default().to_owned(),
                })
                .collect();
            let evaluated = !rules.is_empty() && rules.iter().all(|rule| rule.health != "unknown");
            if evaluated || started.elapsed() > SETTLE {
                return rules;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// A port nothing listens on now.
fn free_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().expect("its address")
}

#[test]
fn comparisons_outside_matchers_get_bool() {
    assert_eq!(
        with_bool("up{job=\"kaiwa\"} == 0"),
        "up{job=\"kaiwa\"} == bool 0"
    );
    assert_eq!(
        with_bool("a{x!=\"1\",y=~\"a>b\"} > 0.9 and rate(b[5m]) <= 2"),
        "a{x!=\"1\",y=~\"a>b\"} > bool 0.9 and rate(b[5m]) <= bool 2"
    );
    assert_eq!(with_bool("a > bool 1"), "a > bool 1");
    assert_eq!(
        with_bool("label_replace(a, \"x\", \">\", \"\", \"\") != 3"),
        "label_replace(a, \"x\", \">\", \"\", \"\") != bool 3"
    );
}
