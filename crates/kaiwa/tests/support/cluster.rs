//! A cluster of real `kaiwa gateway` and `kaiwa worker` processes for a test: a PostgreSQL
//! database and a RabbitMQ vhost of the test's own (created here, removed when the cluster is
//! dropped), a media directory the gateways share, and the processes, each started with the
//! flags the test gives and stopped or killed when it says.
//!
//! RabbitMQ is the machine's (`KAIWA_TEST_AMQP`, default `amqp://guest:guest@127.0.0.1:5672`),
//! with vhosts made by `rabbitmqctl`: a test that cannot reach either fails and says how to start
//! RabbitMQ; it is never skipped.

#![allow(dead_code, unreachable_pub)]

use super::postgres::TestDatabase;
use serde_json::Value;
use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::time::Duration;
use tempfile::TempDir;
use tokio::process::{Child, Command};

const DEFAULT_BROKER: &str = "amqp://guest:guest@127.0.0.1:5672";
const RABBIT_START: &str = "rabbitmq-server -detached";
fn broker() -> String {
    std::env::var("KAIWA_TEST_AMQP").unwrap_or_else(|_| DEFAULT_BROKER.to_owned())
}

/// Runs `rabbitmqctl` with `args`; panics with the command to run when it cannot.
pub fn rabbitmqctl(args: &[&str]) -> String {
    super::tool(
        "rabbitmqctl",
        args,
        "rabbitmq-server",
        &format!("Is RabbitMQ running? Start it with `{RABBIT_START}`."),
    )
}

/// A RabbitMQ vhost of the test's own.
pub struct TestVhost {
    pub name: String,
    /// The URL of the vhost.
    pub url: String,
}

impl TestVhost {
    pub fn create() -> TestVhost {
        let name = format!("kaiwa_test_{}", uuid::Uuid::new_v4().simple());
        rabbitmqctl(&["add_vhost", &name]);
        rabbitmqctl(&["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"]);
        let url = format!("{}/{name}", broker().trim_end_matches('/'));
        TestVhost { name, url }
    }

    /// Messages ready in a queue of the vhost.
    pub fn ready(&self, queue: &str) -> u64 {
        rabbitmqctl(&[
            "list_queues",
            "-p",
            &self.name,
            "--quiet",
            "name",
            "messages_ready",
        ])
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            (fields.next() == Some(queue)).then(|| fields.next()?.parse().ok())?
        })
        .next()
        .unwrap_or(0)
    }

    /// Drops every job waiting in the vhost's job queue: jobs lost as if with a broker.
    pub fn purge_jobs(&self) {
        rabbitmqctl(&["purge_queue", "-p", &self.name, "kaiwa.jobs"]);
    }
}

impl Drop for TestVhost {
    fn drop(&mut self) {
        let deleted = std::process::Command::new("rabbitmqctl")
            .args(["delete_vhost", &self.name])
            .output();
        if !deleted.is_ok_and(|output| output.status.success()) {
            eprintln!("could not delete the test vhost {}", self.name);
        }
    }
}

/// The shared parts of a test cluster, and the processes started on them.
pub struct Cluster {
    pub database: TestDatabase,
    pub vhost: TestVhost,
    /// Data directories of the processes, and the media directory the gateways share.
    pub dir: TempDir,
    http: reqwest::Client,
}

impl Cluster {
    pub async fn create() -> Cluster {
        let database = TestDatabase::create().await;
        let vhost = TestVhost::create();
        // The schema first, once, as an operator would: processes starting together then do
        // not all wait on the migration lock.
        let migrated = Command::new(env!("CARGO_BIN_EXE_kaiwa"))
            .args(["migrate", "--database-url", &database.url])
            .output()
            .await
            .expect("kaiwa migrate runs");
        assert!(migrated.status.success(), "{migrated:?}");
        Cluster {
            database,
            vhost,
            dir: tempfile::tempdir().expect("a temporary directory"),
            http: reqwest::Client::new(),
        }
    }

    /// Where RabbitMQ listens, from the vhost's URL.
    pub fn broker_addr(&self) -> std::net::SocketAddr {
        let rest = self.vhost.url.split_once('@').expect("user@host").1;
        let host_port = rest.split('/').next().expect("host:port");
        host_port.parse().expect("an IP address and port")
    }

    pub fn media_dir(&self) -> PathBuf {
        self.dir.path().join("media")
    }

    /// Starts `kaiwa gateway` named `id` with `flags` on top of the cluster's.
    pub async fn gateway(&self, id: &str, flags: &[&str]) -> Process {
        self.gateway_via(id, flags, None).await
    }

    /// The same, reaching RabbitMQ at `broker` (`host:port`, a proxy say) instead.
    pub async fn gateway_via(
        &self,
        id: &str,
        flags: &[&str],
        broker: Option<std::net::SocketAddr>,
    ) -> Process {
        let media = self.media_dir();
        let mut args: Vec<String> = vec!["--media-dir".into(), media.display().to_string()];
        args.extend(flags.iter().map(|flag| (*flag).to_owned()));
        self.start("gateway", id, &args, broker).await
    }

    /// Starts `kaiwa worker` named `id` with `flags` on top of the cluster's.
    pub async fn worker(&self, id: &str, flags: &[&str]) -> Process {
        let args: Vec<String> = flags.iter().map(|flag| (*flag).to_owned()).collect();
        self.start("worker", id, &args, None).await
    }

    async fn start(
        &self,
        role: &str,
        id: &str,
        flags: &[String],
        broker: Option<std::net::SocketAddr>,
    ) -> Process {
        // The vhost's URL with another host and port: everything after the `@` up to the path.
        let queue_url = match broker {
            Some(broker) => {
                let (credentials, rest) = self.vhost.url.split_once('@').expect("user@host");
                let path = rest.find('/').map_or("", |at| &rest[at..]);
                format!("{credentials}@{broker}{path}")
            }
            None => self.vhost.url.clone(),
        };
        let data_dir = self.dir.path().join(id);
        std::fs::create_dir_all(&data_dir).expect("a data directory");
        let mut command = Command::new(env!("CARGO_BIN_EXE_kaiwa"));
        command
            .arg(role)
            .args(["--bind", "127.0.0.1:0", "--gateway-id", id, "--data-dir"])
            .arg(&data_dir)
            .args(["--database-url", &self.database.url])
            .args(["--queue-url", &queue_url])
            .args(super::ANY_HOUR)
            .args([
                "--log-format",
                "json",
                "--log",
                &std::env::var("KAIWA_TEST_CLUSTER_LOG").unwrap_or_else(|_| "info".to_owned()),
                "--openai-api-key",
                "",
            ])
            .args(flags);
        let super::Listening { child, addr, .. } =
            super::start_listening(&format!("{role} {id}"), &mut command, &data_dir).await;
        Process {
            id: id.to_owned(),
            child,
            addr,
            http: self.http.clone(),
        }
    }

    /// Runs SQL on the cluster's database.
    pub async fn sql_scalar(&self, query: &str) -> i64 {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&self.database.url)
            .await
            .expect("the test database answers");
        let value: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(query.to_owned()))
            .fetch_one(&mut conn)
            .await
            .expect("the query runs");
        conn.close().await.ok();
        value
    }
}

/// One kaiwa process of the cluster.
pub struct Process {
    pub id: String,
    child: Child,
    pub addr: SocketAddr,
    http: reqwest::Client,
}

impl Process {
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `GET path` as JSON, whatever the status.
    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let response = self
            .http
            .get(self.url(path))
            .send()
            .await
            .expect("HTTP works");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn health(&self) -> Value {
        self.get_json("/health").await.1
    }

    /// SIGKILL: the process gets no chance to give anything back.
    pub async fn kill(mut self) {
        let running = self.child.try_wait().expect("its state");
        assert!(
            running.is_none(),
            "{} died before the kill: {running:?}",
            self.id
        );
        self.child.kill().await.expect("kaiwa is killed");
        let status = self.child.wait().await.expect("its exit status");
        assert_eq!(status.signal(), Some(9), "{status:?}");
    }

    /// SIGTERM, and waits for the graceful shutdown to end.
    pub async fn stop(mut self) {
        let pid = self.child.id().expect("kaiwa is running");
        let sent = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await
            .expect("kill runs");
        assert!(sent.success(), "SIGTERM to {}", self.id);
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("kaiwa stops within 30 s")
            .expect("its exit status");
        assert!(status.success(), "{}: {status:?}", self.id);
    }
}
