//! `kaiwa-echo`: the bare WebSocket echo server that `bench/run.sh` measures kaiwa against.

use anyhow::Context;
use clap::Parser;
use std::net::SocketAddr;

/// A bare WebSocket echo server on /ws (no storage, no parsing): the throughput ceiling.
#[derive(Debug, Parser)]
#[command(name = "kaiwa-echo", version)]
struct Cli {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8090")]
    bind: SocketAddr,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let listener = tokio::net::TcpListener::bind(cli.bind)
        .await
        .with_context(|| format!("cannot listen on {}", cli.bind))?;
    println!("kaiwa-echo listening on {}", listener.local_addr()?);
    kaiwa_load::echo::serve(listener, async {
        tokio::signal::ctrl_c().await.ok();
    })
    .await
    .context("the echo server failed")
}
