//! A store alone: how many messages per second the SQLite store (or, with `--database-url
//! postgres://...`, the PostgreSQL store) commits with many concurrent writers (group commit,
//! one commit per batch), with no WebSocket in the way. `bench/run.sh` runs it; it prints one
//! JSON line for `kaiwa-load table`.
//!
//!     cargo run --release -p kaiwa --example store_bench -- --messages 200000 --writers 64

use anyhow::Context;
use clap::Parser;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use kaiwa::config::StoreConfig;
use kaiwa::domain::{ClientId, Timezone};
use kaiwa::flags::Secret;
use kaiwa::store::{Durability, Inserted, NewMessage};
use kaiwa_protocol::{MessageStatus, MessageType};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, Parser)]
struct Args {
    /// Messages to store in all.
    #[arg(long, default_value_t = 100_000)]
    messages: u64,
    /// Concurrent writers (think clients), each with up to --depth inserts waiting.
    #[arg(long, default_value_t = 64)]
    writers: u64,
    /// Inserts one writer keeps waiting at once.
    #[arg(long, default_value_t = 16)]
    depth: usize,
    /// Data directory for the SQLite file (a fresh temporary one by default).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// A database to use instead of the SQLite file: postgres://... (it should be empty).
    #[arg(long)]
    database_url: Option<String>,
    #[arg(long)]
    label: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let temp = tempfile::tempdir()?;
    let dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| temp.path().to_owned());
    let config = StoreConfig {
        data_dir: dir,
        database_url: args.database_url.clone().map(Secret::new),
        durability: Durability::Full,
        sqlite_cache_mib: kaiwa::store::DEFAULT_SQLITE_CACHE_MIB,
    };
    let store = kaiwa::app::open_store(&config)
        .await
        .context("opening the store")?;
    let timezone = Timezone::parse("Asia/Ho_Chi_Minh")?;
    let per_writer = args.messages / args.writers.max(1);
    let started = Instant::now();
    let mut writers = Vec::new();
    for writer in 0..args.writers {
        let store = store.clone();
        let client_id = ClientId::parse(&format!("bench-{writer}"))?;
        let depth = args.depth;
        writers.push(tokio::spawn(async move {
            let mut waiting = FuturesUnordered::new();
            let mut stored = 0u64;
            for n in 0..per_writer {
                let message = NewMessage {
                    client_id: client_id.clone(),
                    client_message_id: Some(format!("m{n}")),
                    kind: MessageType::Text,
                    content: format!("benchmark message {n} of writer {writer}"),
                    filename: None,
                    mime_type: None,
                    size_bytes: None,
                    timezone,
                    status: MessageStatus::Accepted,
                    reason: None,
                    client_timestamp: None,
                    received_at: chrono::Utc::now(),
                };
                // The store takes the message now; the future only waits for its commit.
                waiting.push(store.insert_message(message));
                if waiting.len() >= depth
                    && let Some(done) = waiting.next().await
                {
                    stored += u64::from(matches!(done?, Inserted::New(_)));
                }
            }
            while let Some(done) = waiting.next().await {
                stored += u64::from(matches!(done?, Inserted::New(_)));
            }
            Ok::<u64, kaiwa::store::StoreError>(stored)
        }));
    }
    let mut stored = 0;
    for writer in writers {
        stored += writer.await??;
    }
    let seconds = started.elapsed().as_secs_f64();
    store.close().await;
    let report = serde_json::json!({
        "scenario": "store",
        "label": args.label,
        "messages": stored,
        "writers": args.writers,
        "seconds": seconds,
        "messages_per_second": stored as f64 / seconds,
    });
    println!("{report}");
    Ok(())
}
