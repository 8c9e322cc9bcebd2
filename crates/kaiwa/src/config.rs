//! Configuration: command-line flags, each with a `KAIWA_*` environment variable; `main` loads a
//! `.env` file into the environment first. Every value is validated at start.

use crate::admission::{ContentLimits, Windows, parse_bytes};
use crate::domain::{Networks, Timezone};
use crate::flags::{Secret, parse_seconds, parse_seconds_within};
use crate::store::{DEFAULT_SQLITE_CACHE_MIB, Durability};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    name = "kaiwa",
    version,
    // A later flag overrides an earlier one, so wrappers can append to a base command line.
    args_override_self = true,
    about = "A real-time chat backend: WebSocket sessions, time windows, durable history, replies.",
    long_about = "A real-time chat backend: WebSocket sessions, time windows, durable history, replies.\n\n\
        Every flag can also be set with the environment variable shown beside it, or in a .env \
        file in the working directory."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the chat server: gateway and workers in one process.
    Serve(Box<ServeConfig>),
    /// Run a gateway of a cluster: WebSocket sessions, admission and the HTTP API, over a
    /// PostgreSQL database and RabbitMQ shared with the cluster's other processes.
    Gateway(Box<ServeConfig>),
    /// Run a worker of a cluster: takes jobs from RabbitMQ, stores replies in PostgreSQL and
    /// sends them to the gateway that holds the client. Serves /health and /metrics only.
    Worker(Box<ServeConfig>),
    /// Apply pending database migrations, then exit.
    Migrate(StoreConfig),
    /// Copy the SQLite database (SQLite's online backup: consistent while the server runs and
    /// writes) and the media files it names into a new directory, itself a data directory.
    /// For PostgreSQL, use pg_dump and copy the media directory (README, Backups).
    Backup(BackupArgs),
    /// Copy a backup into a data directory that has no database yet, then exit; start kaiwa
    /// on it.
    Restore(RestoreArgs),
    /// Print a token for a client, signed with the configured secret (for development and
    /// tests).
    Token(crate::auth::TokenArgs),
}

#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Storage")]
pub struct StoreConfig {
    /// Directory for media files, logs and the SQLite database (unless --database-url names
    /// another database).
    #[arg(long, env = "KAIWA_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// Where messages and replies are kept: postgres://user[:password]@host[:port]/database, or
    /// sqlite://path/to/file.db. Default: the SQLite file kaiwa.db in --data-dir, which needs
    /// no server. DATABASE_URL is read when KAIWA_DATABASE_URL is unset. The URL is never
    /// printed: prefer the environment or .env when it holds a password.
    // Read as a secret and checked later: clap would repeat an invalid value in its error.
    #[arg(long, env = "KAIWA_DATABASE_URL", hide_env_values = true, value_parser = parse_secret)]
    pub database_url: Option<Secret>,

    /// How hard the SQLite database syncs: `full` (an acked message survives a power cut) or
    /// `normal` (it survives the process crashing; faster).
    #[arg(long = "sqlite-synchronous", env = "KAIWA_SQLITE_SYNCHRONOUS", value_enum, default_value_t = Durability::Full)]
    pub durability: Durability,

    /// The page cache of SQLite's writer, in MiB: the hot pages of the tables and indexes. Its
    /// 4 read connections share as much again. Each fills up to its size and stays there.
    #[arg(long = "sqlite-cache-mib", env = "KAIWA_SQLITE_CACHE_MIB", default_value_t = DEFAULT_SQLITE_CACHE_MIB, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub sqlite_cache_mib: u32,
}

impl StoreConfig {
    /// The database to use: `--database-url`, else `DATABASE_URL`, else the SQLite file in the
    /// data directory.
    pub fn database(&self) -> Result<Database, ConfigError> {
        if let Some(url) = self
            .database_url
            .as_ref()
            .filter(|url| !url.expose().is_empty())
        {
            return Database::parse(url.expose())
                .map_err(|err| ConfigError::DatabaseUrl("--database-url", err));
        }
        match std::env::var("DATABASE_URL") {
            Ok(raw) if !raw.trim().is_empty() => {
                Database::parse(&raw).map_err(|err| ConfigError::DatabaseUrl("DATABASE_URL", err))
            }
            _ => Ok(Database::Sqlite(self.data_dir.join("kaiwa.db"))),
        }
    }
}

/// Which database holds messages and replies.
#[derive(Clone, PartialEq, Eq)]
pub enum Database {
    /// A SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL server. The URL may hold a password: it is never printed whole.
    Postgres(Secret),
}

impl Database {
    /// Reads a database URL. The error never repeats the URL (it may hold a password).
    pub fn parse(raw: &str) -> Result<Self, String> {
        let raw = raw.trim();
        let Some((scheme, rest)) = raw.split_once(':') else {
            return Err(
                "a database URL starts with postgres:// or sqlite:// (the value is not shown)"
                    .into(),
            );
        };
        match scheme.to_ascii_lowercase().as_str() {
            "postgres" | "postgresql" => {
                crate::store::PgStore::check_url(raw)?;
                Ok(Self::Postgres(Secret::new(raw)))
            }
            "sqlite" => {
                let path = rest.strip_prefix("//").unwrap_or(rest);
                let path = path.split('?').next().unwrap_or_default();
                if path.is_empty() {
                    return Err(
                        "a sqlite:// URL needs a file path, e.g. sqlite://data/kaiwa.db".into(),
                    );
                }
                Ok(Self::Sqlite(PathBuf::from(path)))
            }
            other => Err(format!(
                "unsupported database URL scheme {:?}: use postgres://... or sqlite://...",
                other.chars().take(20).collect::<String>()
            )),
        }
    }

    /// The database for logs and messages: the SQLite file, or PostgreSQL's user, host, port
    /// and database without the password.
    pub fn describe(&self) -> String {
        match self {
            Self::Sqlite(path) => format!("SQLite {}", path.display()),
            Self::Postgres(url) => crate::store::PgStore::describe_url(url.expose()),
        }
    }
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

#[derive(Debug, Clone, Args)]
pub struct ServeConfig {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, env = "KAIWA_BIND", default_value = "127.0.0.1:8082")]
    pub bind: SocketAddr,

    #[command(flatten)]
    pub listener: ListenerConfig,

    #[command(flatten)]
    pub store: StoreConfig,

    #[command(flatten)]
    pub limits: LimitsConfig,

    #[command(flatten)]
    pub sessions: SessionConfig,

    #[command(flatten)]
    pub content: ContentLimits,

    #[command(flatten)]
    pub windows: Windows,

    /// Multiplier for the reply delays (text 0–1 s, voice 1–2 s, video and image 2–3 s);
    /// 0 turns them off.
    #[arg(long, env = "KAIWA_REPLY_DELAY_SCALE", default_value = "1.0", value_parser = parse_scale, help_heading = "Replies")]
    pub reply_delay_scale: f64,

    /// Seconds an accepted message may go without a worker on it (its processing failed, for
    /// example on a full disk) before it is queued again, without waiting for a restart.
    #[arg(long, env = "KAIWA_REQUEUE_AFTER", default_value = "30", value_parser = parse_seconds, help_heading = "Replies")]
    pub requeue_after: Duration,

    /// Seconds to let messages in flight finish their replies on shutdown before closing.
    #[arg(long, env = "KAIWA_SHUTDOWN_GRACE", default_value = "10", value_parser = parse_seconds, help_heading = "Sessions")]
    pub shutdown_grace: Duration,

    #[command(flatten)]
    pub model: ModelConfig,

    #[command(flatten)]
    pub log: LogConfig,

    #[command(flatten)]
    pub auth: crate::auth::AuthConfig,

    #[command(flatten)]
    pub cluster: ClusterConfig,

    /// What this process runs: set by the subcommand, not a flag.
    #[arg(skip)]
    pub role: Role,
}

/// The parts of kaiwa a process runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Role {
    /// Gateway and worker in one process (`kaiwa serve`).
    #[default]
    All,
    /// Sessions, admission and the HTTP API (`kaiwa gateway`).
    Gateway,
    /// Processing (`kaiwa worker`).
    Worker,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Self::All => "serve",
            Self::Gateway => "gateway",
            Self::Worker => "worker",
        }
    }

    pub fn runs_gateway(self) -> bool {
        self != Self::Worker
    }

    pub fn runs_worker(self) -> bool {
        self != Self::Gateway
    }
}

/// How processes find each other in a cluster.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Cluster")]
pub struct ClusterConfig {
    /// RabbitMQ, which carries jobs to workers and replies back to gateways:
    /// amqp://user:password@host:port/vhost. Required by `gateway` and `worker`; without it
    /// `serve` keeps its queue in the process. Never printed.
    #[arg(long, env = "KAIWA_QUEUE_URL", hide_env_values = true, value_parser = parse_secret)]
    pub queue_url: Option<Secret>,

    /// This process's name in the cluster: replies for its clients are routed by it, and it
    /// shows in logs, /health and metrics. Letters, digits, `.`, `_` and `-`. Default: the
    /// host name and the process id.
    #[arg(long, env = "KAIWA_GATEWAY_ID", value_parser = parse_node_id)]
    pub gateway_id: Option<String>,

    #[command(flatten)]
    pub media: MediaDirConfig,

    /// Seconds a gateway's clients keep their slots and ids after it last renewed its lease:
    /// how long the clients of a gateway that died stay counted. Renewed every third of it.
    #[arg(long, env = "KAIWA_LEASE", default_value = "10", value_parser = parse_seconds)]
    pub lease: Duration,

    /// Jobs a worker takes from RabbitMQ before it finishes one (its prefetch).
    #[arg(long, env = "KAIWA_WORKER_PREFETCH", default_value = "512", value_parser = clap::value_parser!(u16).range(1..))]
    pub prefetch: u16,

    /// Seconds from the start of one PostgreSQL write of this process to the next, when the
    /// next holds fewer than 64 messages, replies and updates: under steady traffic small
    /// writes wait and grow instead of multiplying, and the shared database does fewer of them;
    /// a write after a quiet spell goes at once. 0 writes each batch as soon as the one before
    /// is done, as `kaiwa serve` alone does. Default: 0.002 for a worker, 0.008 for a process
    /// that runs a gateway.
    #[arg(long, env = "KAIWA_WRITE_INTERVAL", value_parser = parse_interval)]
    pub write_interval: Option<Duration>,
}

/// A gateway's messages come from many clients at any moment, and 8 ms gathers a few of them
/// per write (docs/architecture.md, "Writes at a steady rate").
const GATEWAY_WRITE_INTERVAL: Duration = Duration::from_millis(8);
/// A worker's jobs come in bursts, one AMQP message of them per gateway write, and its writes
/// are the replies clients wait for: 2 ms gathers a burst's replies, where 8 ms made every
/// reply wait 4 ms more on average (docs/architecture.md, "A worker's shorter interval").
const WORKER_WRITE_INTERVAL: Duration = Duration::from_millis(2);

impl ClusterConfig {
    /// `--write-interval`, else the default of what the process runs: a process that runs a
    /// gateway writes its clients' messages.
    pub fn write_interval(&self, role: Role) -> Duration {
        self.write_interval.unwrap_or(match role {
            Role::Worker => WORKER_WRITE_INTERVAL,
            Role::Gateway | Role::All => GATEWAY_WRITE_INTERVAL,
        })
    }

    /// `--gateway-id`, else the host name and process id.
    pub fn node_id(&self) -> String {
        self.gateway_id.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .or_else(|| std::env::var("HOSTNAME").ok())
                .map(|host| {
                    host.trim()
                        .chars()
                        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
                        .take(64)
                        .collect::<String>()
                })
                .filter(|host| !host.is_empty())
                .unwrap_or_else(|| "kaiwa".to_owned());
            format!("{host}-{}", std::process::id())
        })
    }

    /// The directory of uploaded files.
    pub fn media_dir(&self, data_dir: &std::path::Path) -> PathBuf {
        self.media.resolve(data_dir)
    }
}

/// Where uploaded files are: read by `serve` and `gateway`, and by `backup` and `restore`.
#[derive(Debug, Clone, Args)]
pub struct MediaDirConfig {
    /// Where uploaded files are kept. Every gateway of a cluster must see the same directory
    /// (a mounted volume). Default: media/ in --data-dir.
    #[arg(long, env = "KAIWA_MEDIA_DIR")]
    pub media_dir: Option<PathBuf>,
}

impl MediaDirConfig {
    /// `--media-dir`, else `media/` in the data directory.
    pub fn resolve(&self, data_dir: &std::path::Path) -> PathBuf {
        self.media_dir
            .clone()
            .unwrap_or_else(|| data_dir.join("media"))
    }
}

/// `kaiwa backup`: the server's own storage flags (or their environment variables, or its
/// `.env`) say what to copy.
#[derive(Debug, Clone, Args)]
pub struct BackupArgs {
    #[command(flatten)]
    pub store: StoreConfig,

    #[command(flatten)]
    pub media: MediaDirConfig,

    /// The directory to write the backup to: it must not exist yet, or be empty. It is made
    /// as DIR.partial beside it and renamed when complete.
    #[arg(long, value_name = "DIR")]
    pub to: PathBuf,
}

/// `kaiwa restore`: the storage flags name the data directory to restore into.
#[derive(Debug, Clone, Args)]
pub struct RestoreArgs {
    /// The backup: a directory written by `kaiwa backup`.
    #[arg(long, value_name = "DIR")]
    pub from: PathBuf,

    #[command(flatten)]
    pub store: StoreConfig,

    #[command(flatten)]
    pub media: MediaDirConfig,
}

/// A node id is part of RabbitMQ queue names and of log lines: kept short and plain.
fn parse_node_id(raw: &str) -> Result<String, String> {
    let id = raw.trim();
    let plain = !id.is_empty()
        && id.len() <= 100
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if plain {
        Ok(id.to_owned())
    } else {
        Err("use 1 to 100 letters, digits, '.', '_' or '-'".to_owned())
    }
}

/// The language model that writes text replies (R10). Without an API key, the built-in
/// responder answers instead.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Language model (text replies)")]
pub struct ModelConfig {
    /// API key of the OpenAI-compatible provider; OPENAI_API_KEY is read too. Prefer the
    /// environment or .env over the command line, where other users can see it.
    #[arg(long = "openai-api-key", env = "KAIWA_OPENAI_API_KEY", hide_env_values = true, value_parser = parse_secret)]
    pub api_key: Option<Secret>,

    /// Base URL of the chat-completions API (OpenAI, Azure-style gateways, Ollama, llama.cpp,
    /// vLLM...).
    #[arg(
        long = "model-base-url",
        env = "KAIWA_MODEL_BASE_URL",
        default_value = "https://api.openai.com/v1"
    )]
    pub base_url: String,

    /// Model name sent to the provider.
    #[arg(long = "model", env = "KAIWA_MODEL", default_value = "gpt-4o-mini")]
    pub model: String,

    /// Sampling temperature.
    #[arg(long = "model-temperature", env = "KAIWA_MODEL_TEMPERATURE", default_value = "0.7", value_parser = parse_temperature)]
    pub temperature: f32,

    /// Longest reply, in tokens.
    #[arg(long = "model-max-tokens", env = "KAIWA_MODEL_MAX_TOKENS", default_value = "300", value_parser = clap::value_parser!(u32).range(1..=32_768))]
    pub max_tokens: u32,

    /// Stream replies (server-sent events) and forward them to native clients as they grow.
    #[arg(long = "model-stream", env = "KAIWA_MODEL_STREAM", default_value_t = true, action = clap::ArgAction::Set)]
    pub stream: bool,

    /// Seconds to open a connection to the provider.
    #[arg(long = "model-connect-timeout", env = "KAIWA_MODEL_CONNECT_TIMEOUT", default_value = "5", value_parser = parse_seconds)]
    pub connect_timeout: Duration,

    /// Seconds from sending a request to the first piece of the reply.
    #[arg(long = "model-first-token-timeout", env = "KAIWA_MODEL_FIRST_TOKEN_TIMEOUT", default_value = "15", value_parser = parse_seconds)]
    pub first_token_timeout: Duration,

    /// Seconds a reply may take in all, retries included; then the fallback reply is sent.
    #[arg(long = "model-total-timeout", env = "KAIWA_MODEL_TOTAL_TIMEOUT", default_value = "45", value_parser = parse_seconds)]
    pub total_timeout: Duration,

    /// Retries after a timeout, a connection error, a 5xx or a 429.
    #[arg(long = "model-retries", env = "KAIWA_MODEL_RETRIES", default_value = "2", value_parser = clap::value_parser!(u32).range(0..=10))]
    pub retries: u32,

    /// Calls to the provider at the same time; more wait their turn.
    #[arg(long = "model-concurrency", env = "KAIWA_MODEL_CONCURRENCY", default_value = "16", value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub concurrency: u32,

    /// System prompt template; may use {timezone}, {local_time}, {local_date}, {weekday},
    /// {message_type} and {client_id}.
    #[arg(
        long = "system-prompt",
        env = "KAIWA_SYSTEM_PROMPT",
        conflicts_with = "system_prompt_file"
    )]
    pub system_prompt: Option<String>,

    /// File holding the system prompt template (same placeholders).
    #[arg(long = "system-prompt-file", env = "KAIWA_SYSTEM_PROMPT_FILE")]
    pub system_prompt_file: Option<PathBuf>,

    /// Earlier turns of the client's history sent along as context.
    #[arg(long = "history-turns", env = "KAIWA_HISTORY_TURNS", default_value = "6", value_parser = clap::value_parser!(u32).range(0..=100))]
    pub history_turns: u32,
}

impl ModelConfig {
    /// The key from the flag or `KAIWA_OPENAI_API_KEY`, else from `OPENAI_API_KEY`; an empty
    /// value counts as none.
    pub fn api_key(&self) -> Option<Secret> {
        self.api_key
            .clone()
            .or_else(|| std::env::var("OPENAI_API_KEY").ok().map(Secret::new))
            .filter(|key| !key.expose().trim().is_empty())
    }
}

fn parse_secret(raw: &str) -> Result<Secret, String> {
    Ok(Secret::new(raw.trim()))
}

fn parse_temperature(raw: &str) -> Result<f32, String> {
    let value: f32 = raw
        .trim()
        .parse()
        .map_err(|_| format!("{raw:?} is not a number"))?;
    if !(0.0..=2.0).contains(&value) {
        return Err(format!("{raw} is out of range: use 0 to 2"));
    }
    Ok(value)
}

/// The listening socket: what any connection may cost before it says who it is, and TLS.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Connections")]
pub struct ListenerConfig {
    /// HTTP connections open at once. A WebSocket connection stops counting once upgraded (the
    /// handshake limits and --max-clients count it then). Past the cap, new connections wait
    /// in the kernel's backlog until one closes.
    #[arg(long = "max-http-connections", env = "KAIWA_MAX_HTTP_CONNECTIONS", default_value = "1024", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections: u32,

    /// HTTP connections open at once from one address (an IPv6 /64 counts as one; the
    /// addresses of --proxy-address are not capped); past it a new one is closed at once.
    /// 0 turns this cap off.
    #[arg(long = "max-http-connections-per-address", env = "KAIWA_MAX_HTTP_CONNECTIONS_PER_ADDRESS", default_value = "64", value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub max_connections_per_address: u32,

    /// Addresses or networks that many clients share, such as a proxy in front of kaiwa
    /// (comma-separated, e.g. 10.0.0.5,192.168.0.0/16): neither their handshakes nor their HTTP
    /// connections are capped per address. `none` caps every address.
    #[arg(long, env = "KAIWA_PROXY_ADDRESS", default_value = "127.0.0.0/8,::1", value_parser = Networks::parse)]
    pub proxy_address: Networks,

    /// Seconds a new connection has to send its first request's headers (and, with TLS, to
    /// finish the TLS handshake before that); then it is closed.
    #[arg(long = "http-header-timeout", env = "KAIWA_HTTP_HEADER_TIMEOUT", default_value = "5", value_parser = parse_seconds)]
    pub header_timeout: Duration,

    /// Seconds a kept-alive connection may wait for its next request (until its headers are
    /// in); then it is closed.
    #[arg(long = "http-idle-timeout", env = "KAIWA_HTTP_IDLE_TIMEOUT", default_value = "15", value_parser = parse_seconds)]
    pub idle_timeout: Duration,

    /// Serve TLS (https://, wss://) with this certificate chain (PEM). Read again when the file
    /// changes, so a renewed certificate needs no restart.
    #[arg(long = "tls-cert", env = "KAIWA_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The private key of --tls-cert (PEM; PKCS#8, PKCS#1 or SEC1). Never printed.
    #[arg(long = "tls-key", env = "KAIWA_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

impl ListenerConfig {
    /// The certificate and key files, when TLS is on.
    pub fn tls_files(&self) -> Option<(&std::path::Path, &std::path::Path)> {
        self.tls_cert.as_deref().zip(self.tls_key.as_deref())
    }
}

#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Limits")]
pub struct LimitsConfig {
    /// Clients connected at the same time (R13); the next one is refused with close code 1013.
    #[arg(long, env = "KAIWA_MAX_CLIENTS", default_value = "50", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_clients: u32,

    /// Messages between acceptance and their last reply, across all clients (R14).
    #[arg(long, env = "KAIWA_MAX_IN_FLIGHT", default_value = "500", value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub max_in_flight: u32,

    /// Messages in flight for one client; past it the server stops reading from that client.
    #[arg(long, env = "KAIWA_MAX_IN_FLIGHT_PER_CLIENT", default_value = "32", value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_in_flight_per_client: u32,

    /// Seconds a message waits for a free in-flight slot before the client is told to retry.
    #[arg(long, env = "KAIWA_IN_FLIGHT_WAIT", default_value = "10", value_parser = parse_seconds)]
    pub in_flight_wait: Duration,

    /// Frames queued for one client before it is disconnected as a slow consumer.
    #[arg(long, env = "KAIWA_OUTBOX_CAPACITY", default_value = "256", value_parser = clap::value_parser!(u32).range(8..=65_536))]
    pub outbox_capacity: u32,

    /// Bytes queued for one client before it is disconnected as a slow consumer (e.g. 1MiB): a
    /// client that falls behind on large frames is cut as early as one behind on small ones.
    #[arg(long, env = "KAIWA_OUTBOX_BYTES", default_value = "1MiB", value_parser = parse_bytes)]
    pub outbox_bytes: usize,
}

#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Sessions")]
pub struct SessionConfig {
    /// Seconds between heartbeats (WebSocket pings, and heartbeat frames for legacy clients;
    /// path dialect clients get the frame only).
    #[arg(long, env = "KAIWA_HEARTBEAT_INTERVAL", default_value = "20", value_parser = parse_seconds)]
    pub heartbeat_interval: Duration,

    /// Seconds without any frame from a client before it is disconnected (R2).
    #[arg(long, env = "KAIWA_HEARTBEAT_TIMEOUT", default_value = "60", value_parser = parse_seconds)]
    pub heartbeat_timeout: Duration,

    /// Seconds a client may stay connected without sending a message (R16).
    #[arg(long, env = "KAIWA_FIRST_MESSAGE_TIMEOUT", default_value = "60", value_parser = parse_seconds)]
    pub first_message_timeout: Duration,

    /// Seconds to wait for the handshake frame after the upgrade. Until it is verified a
    /// connection holds no client slot, may send 16 KiB at most, and counts in the handshake
    /// limits below.
    #[arg(long, env = "KAIWA_HANDSHAKE_TIMEOUT", default_value = "5", value_parser = parse_seconds)]
    pub handshake_timeout: Duration,

    /// Connections in their handshake at once (upgraded, not yet verified). When a new one
    /// comes and all are taken, the oldest is closed (4005) to make room for it.
    #[arg(long, env = "KAIWA_MAX_HANDSHAKES", default_value = "1024", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_handshakes: u32,

    /// Connections in their handshake at once from one address (an IPv6 /64 counts as one);
    /// past it the upgrade is refused with HTTP 429. 0 turns this cap off.
    #[arg(long, env = "KAIWA_MAX_HANDSHAKES_PER_ADDRESS", default_value = "16", value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub max_handshakes_per_address: u32,

    /// What a second connection with a live client id gets (R15).
    #[arg(long, env = "KAIWA_DUPLICATE_CONNECTION", value_enum, default_value_t = DuplicatePolicy::Refuse)]
    pub duplicate_connection: DuplicatePolicy,

    /// IANA timezone of clients that do not say theirs: those of the path dialect
    /// (`/<client_id>`) that connect without `?timezone=`. Every other client must name one.
    #[arg(long, env = "KAIWA_DEFAULT_TIMEZONE", default_value = "UTC", value_parser = Timezone::parse)]
    pub default_timezone: Timezone,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DuplicatePolicy {
    /// Refuse the new connection (close code 4509) unless the live one fails a ping; the live
    /// one keeps its session.
    Refuse,
    /// Close the live connection (close code 4510) and keep the new one.
    Replace,
}

#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Logging")]
pub struct LogConfig {
    /// Log filter for standard output, in tracing's EnvFilter syntax (e.g. `info,kaiwa=debug`).
    #[arg(long = "log", env = "KAIWA_LOG", default_value = "info")]
    pub filter: String,

    /// Format of standard output; the files under <data-dir>/logs are always JSON lines.
    #[arg(long, env = "KAIWA_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Also write the logs, as JSON lines, to one file per component under <data-dir>/logs.
    /// `false`: standard output only, which is what a container runtime or systemd's journal
    /// collects (the container image sets it).
    #[arg(long = "log-files", env = "KAIWA_LOG_FILES", default_value_t = true, action = clap::ArgAction::Set)]
    pub files: bool,

    /// When a log file is closed and the next one started: `daily` or `hourly` (at midnight or
    /// on the hour, UTC; each file named by its day or hour, e.g. gateway.2026-12-06.log), or
    /// `never` (one file per component that grows for ever: gateway.log).
    #[arg(long = "log-rotation", env = "KAIWA_LOG_ROTATION", value_enum, default_value_t = LogRotation::Daily)]
    pub rotation: LogRotation,

    /// Rotated files kept per component, the current one included; older ones are deleted at
    /// each rotation and at start. 0 keeps them all.
    #[arg(long = "log-keep", env = "KAIWA_LOG_KEEP", default_value_t = 7)]
    pub keep: usize,
}

/// How often the log files are rotated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogRotation {
    Daily,
    Hourly,
    Never,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "--heartbeat-timeout ({timeout:?}) must be longer than --heartbeat-interval ({interval:?})"
    )]
    HeartbeatTimeout {
        timeout: Duration,
        interval: Duration,
    },
    #[error("--max-in-flight-per-client ({per_client}) cannot exceed --max-in-flight ({total})")]
    PerClientInFlight { per_client: u32, total: u32 },
    #[error("--system-prompt-file {0} is not a readable file")]
    PromptFile(PathBuf),
    #[error("--model-base-url must start with http:// or https://, not {0:?}")]
    BaseUrl(String),
    #[error("{0}: {1}")]
    DatabaseUrl(&'static str, String),
    #[error(transparent)]
    Parse(#[from] clap::Error),
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthError),
    #[error("{0}")]
    Cluster(String),
}

/// Parses only the `serve` flags, for tests and embedders that build a config from arguments.
#[derive(Debug, Parser)]
#[command(name = "kaiwa-serve", no_binary_name = true, args_override_self = true)]
struct ServeOnly {
    #[command(flatten)]
    config: ServeConfig,
}

impl ServeConfig {
    /// Builds a config from `serve` flags (without the program name), with the same defaults,
    /// environment variables and validation as the command line.
    pub fn from_args<I, T>(args: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let config = ServeOnly::try_parse_from(args)?.config;
        config.validate()?;
        Ok(config)
    }

    /// Checks the rules that span several flags.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let sessions = &self.sessions;
        if sessions.heartbeat_timeout <= sessions.heartbeat_interval {
            return Err(ConfigError::HeartbeatTimeout {
                timeout: sessions.heartbeat_timeout,
                interval: sessions.heartbeat_interval,
            });
        }
        if let Some(path) = &self.model.system_prompt_file
            && !path.is_file()
        {
            return Err(ConfigError::PromptFile(path.clone()));
        }
        if !self.model.base_url.starts_with("http://")
            && !self.model.base_url.starts_with("https://")
        {
            return Err(ConfigError::BaseUrl(self.model.base_url.clone()));
        }
        if self.limits.max_in_flight_per_client > self.limits.max_in_flight {
            return Err(ConfigError::PerClientInFlight {
                per_client: self.limits.max_in_flight_per_client,
                total: self.limits.max_in_flight,
            });
        }
        self.auth.check(self.bind)?;
        self.check_cluster()?;
        Ok(())
    }

    /// The queue URL, if one is set: `amqp://` or `amqps://`.
    pub fn queue_url(&self) -> Option<&Secret> {
        self.cluster
            .queue_url
            .as_ref()
            .filter(|url| !url.expose().is_empty())
    }

    /// A process of a cluster shares PostgreSQL and RabbitMQ with the others; one that could
    /// not (a gateway on a SQLite file, a worker with no queue) fails here, at start.
    fn check_cluster(&self) -> Result<(), ConfigError> {
        let role = self.role.name();
        if let Some(url) = self.queue_url() {
            let scheme = url.expose().split(':').next().unwrap_or_default();
            if !matches!(scheme.to_ascii_lowercase().as_str(), "amqp" | "amqps") {
                return Err(ConfigError::Cluster(
                    "--queue-url must start with amqp:// or amqps:// (the value is not shown)"
                        .to_owned(),
                ));
            }
            crate::queue::AmqpQueue::check_url(url.expose()).map_err(ConfigError::Cluster)?;
        } else if self.role != Role::All {
            return Err(ConfigError::Cluster(format!(
                "kaiwa {role} needs --queue-url amqp://... (or KAIWA_QUEUE_URL): the RabbitMQ that carries jobs between gateways and workers"
            )));
        }
        let clustered = self.queue_url().is_some();
        if clustered && let Database::Sqlite(path) = self.store.database()? {
            let why = if self.role == Role::All {
                "--queue-url makes this process one of a cluster"
            } else {
                "the processes of a cluster share one database"
            };
            return Err(ConfigError::Cluster(format!(
                "kaiwa {role} needs a PostgreSQL --database-url: {why}, and the SQLite file {} belongs to one process",
                path.display()
            )));
        }
        Ok(())
    }
}

/// Seconds from 0 (none) to 1: longer would hold every message's acknowledgement that long.
fn parse_interval(raw: &str) -> Result<Duration, String> {
    parse_seconds_within(raw, 0.0..=1.0)
}

fn parse_scale(raw: &str) -> Result<f64, String> {
    let scale: f64 = raw
        .trim()
        .parse()
        .map_err(|_| format!("{raw:?} is not a number"))?;
    if !(0.0..=100.0).contains(&scale) {
        return Err(format!("{raw} is out of range: use 0 (no delay) to 100"));
    }
    Ok(scale)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::parse_bytes;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults_follow_the_spec() {
        let config = ServeConfig::from_args(Vec::<String>::new()).expect("defaults are valid");
        assert_eq!(config.bind.port(), 8082);
        assert_eq!(config.limits.max_clients, 50);
        assert_eq!(config.limits.max_in_flight, 500);
        assert_eq!(config.content.max_image_bytes, 5 << 20);
        assert_eq!(config.content.max_video_bytes, 25 << 20);
        assert_eq!(
            config.sessions.duplicate_connection,
            DuplicatePolicy::Refuse
        );
        assert_eq!(config.windows.voice.to_string(), "08:00-12:00");
    }

    #[test]
    fn invalid_values_fail_with_a_message_naming_the_flag() {
        let err = ServeConfig::from_args(["--max-clients", "0"]).expect_err("0 clients is invalid");
        assert!(err.to_string().contains("--max-clients"), "{err}");

        let err =
            ServeConfig::from_args(["--heartbeat-interval", "30", "--heartbeat-timeout", "10"])
                .expect_err("timeout shorter than interval");
        assert!(err.to_string().contains("--heartbeat-timeout"), "{err}");

        let err =
            ServeConfig::from_args(["--voice-window", "25:00-26:00"]).expect_err("bad window");
        assert!(err.to_string().contains("--voice-window"), "{err}");

        let err = ServeConfig::from_args(["--auth-refresh-grace", "301"])
            .expect_err("a grace over five minutes");
        assert!(err.to_string().contains("--auth-refresh-grace"), "{err}");
        assert!(ServeConfig::from_args(["--auth-refresh-grace", "300"]).is_ok());

        let err = ServeConfig::from_args(["--tls-cert", "cert.pem"]).expect_err("no key");
        assert!(err.to_string().contains("--tls-key"), "{err}");
    }

    #[test]
    fn the_write_interval_defaults_by_role_and_the_flag_overrides_it() {
        let config = ServeConfig::from_args(Vec::<String>::new()).expect("defaults are valid");
        let interval = |role| config.cluster.write_interval(role);
        assert_eq!(interval(Role::Gateway), Duration::from_millis(8));
        assert_eq!(interval(Role::All), Duration::from_millis(8));
        assert_eq!(interval(Role::Worker), Duration::from_millis(2));
        let config = ServeConfig::from_args(["--write-interval", "0.005"]).expect("valid");
        assert_eq!(
            config.cluster.write_interval(Role::Worker),
            Duration::from_millis(5)
        );
    }

    #[test]
    fn the_api_key_never_shows_in_debug_output() {
        let config = ServeConfig::from_args(["--openai-api-key", "sk-very-secret"]).expect("valid");
        let shown = format!("{config:?}");
        assert!(!shown.contains("sk-very-secret"), "{shown}");
        assert_eq!(
            config.model.api_key().map(|k| k.expose().to_owned()),
            Some("sk-very-secret".into())
        );
    }

    #[test]
    fn sizes_and_seconds_parse_with_units() {
        assert_eq!(parse_bytes("5MiB"), Ok(5 << 20));
        assert_eq!(parse_bytes("512 KiB"), Ok(512 << 10));
        assert_eq!(parse_bytes("1048576"), Ok(1 << 20));
        assert!(parse_bytes("5 parsecs").is_err());
        assert!(parse_bytes("0").is_err());
        assert_eq!(parse_seconds("0.25"), Ok(Duration::from_millis(250)));
        assert!(parse_seconds("-1").is_err());
        assert_eq!(parse_interval("0"), Ok(Duration::ZERO));
        assert_eq!(parse_interval("0.008"), Ok(Duration::from_millis(8)));
        assert!(parse_interval("2").is_err());
        assert!(parse_interval("-0.001").is_err());
        assert_eq!(parse_scale("0"), Ok(0.0));
        assert!(parse_scale("-0.5").is_err());
    }
}
