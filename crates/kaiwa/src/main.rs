//! The `kaiwa` binary: parses the command line and runs the chosen command.

use anyhow::Context;
use clap::Parser;
use kaiwa::clock::SystemClock;
use kaiwa::config::{Cli, Command, Role, ServeConfig};
use kaiwa::store::backup;
use kaiwa::{Application, shutdown, telemetry};
use std::process::ExitCode;
use std::sync::Arc;

/// The settings file, read from the working directory only: a `.env` in a parent directory
/// belongs to something else (another project, a home directory), never to this server.
const ENV_FILE: &str = ".env";

/// jemalloc, for SQLite's allocations as well as Rust's: with glibc's allocator the resident
/// memory of a busy server crept up by a few bytes for every message it handled, in pages
/// freed but never given back (bench/soak.sh; the heap itself stayed flat).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    // Before parsing, so that `.env` values fill in flags like any environment variable.
    let env_file = match dotenvy::from_path(ENV_FILE) {
        Ok(()) => Some(std::path::PathBuf::from(ENV_FILE)),
        Err(dotenvy::Error::Io(err)) if err.kind() == std::io::ErrorKind::NotFound => None,
        // The line itself is not shown: it may hold a secret.
        Err(dotenvy::Error::LineParse(_, at)) => {
            eprintln!("error: {ENV_FILE}: a line could not be read (at character {at})");
            return ExitCode::FAILURE;
        }
        Err(err) => {
            eprintln!("error: {ENV_FILE}: {err}");
            return ExitCode::FAILURE;
        }
    };
    let cli = Cli::parse();
    match run(cli, env_file) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // The whole cause chain on one line, without a backtrace: these are operator errors
            // (a bad flag, a busy port, a locked data directory), not bugs.
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli, env_file: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async move {
        match cli.command {
            Command::Serve(config) => serve(*config, Role::All, env_file).await?,
            Command::Gateway(config) => serve(*config, Role::Gateway, env_file).await?,
            Command::Worker(config) => serve(*config, Role::Worker, env_file).await?,
            Command::Migrate(store) => {
                let (database, applied) = kaiwa::app::migrate(&store).await?;
                println!("{applied} migration(s) applied to {database}");
            }
            Command::Token(args) => println!("{}", kaiwa::auth::issue(&args)?),
            Command::Backup(args) => {
                let copied = tokio::task::spawn_blocking(move || backup::backup(&args))
                    .await
                    .context("the backup stopped")??;
                println!("backup written to {copied}");
            }
            Command::Restore(args) => {
                let copied = tokio::task::spawn_blocking(move || backup::restore(&args))
                    .await
                    .context("the restore stopped")??;
                println!("restored {copied}");
            }
        }
        Ok(())
    })
}

/// Runs kaiwa in `role` until a shutdown signal.
async fn serve(
    mut config: ServeConfig,
    role: Role,
    env_file: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
    config.role = role;
    config.validate()?;
    let _telemetry = telemetry::init(&config.log, &config.store.data_dir)?;
    if let Some(path) = env_file {
        tracing::info!(path = %path.display(), "settings read from .env");
    }
    let app = Application::build(config, Arc::new(SystemClock)).await?;
    #[cfg(feature = "jemalloc")]
    let memory = tokio::spawn(report_memory());
    let ran = app.run_until(shutdown::signal()).await;
    #[cfg(feature = "jemalloc")]
    memory.abort();
    Ok(ran?)
}

/// Publishes what the allocator holds, as gauges, every few seconds: the heap in use
/// (`kaiwa_memory_allocated_bytes`, what grows if something leaks) and the pages it keeps
/// (`kaiwa_memory_resident_bytes`).
#[cfg(feature = "jemalloc")]
async fn report_memory() {
    let mut ticks = tokio::time::interval(telemetry::METRICS_UPKEEP);
    loop {
        ticks.tick().await;
        // jemalloc's statistics are a snapshot, refreshed when the epoch advances.
        if tikv_jemalloc_ctl::epoch::advance().is_err() {
            return;
        }
        let (Ok(allocated), Ok(resident)) = (
            tikv_jemalloc_ctl::stats::allocated::read(),
            tikv_jemalloc_ctl::stats::resident::read(),
        ) else {
            return;
        };
        metrics::gauge!("kaiwa_memory_allocated_bytes").set(allocated as f64);
        metrics::gauge!("kaiwa_memory_resident_bytes").set(resident as f64);
    }
}
