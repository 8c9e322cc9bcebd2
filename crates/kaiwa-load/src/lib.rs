//! kaiwa-load: simulates many kaiwa clients, checks every answer they get, and measures how
//! fast the server is.
//!
//! - [`plan`]: who the clients are (ids, random IANA timezones) and what they send, at what pace.
//! - [`connect`]: opening a client's connection and its handshake, and what every client of a
//!   run shares; [`client`]: one client's run over it, its writer and reader; [`resume`]:
//!   coming back after a connection ends under it (`--reconnect`).
//! - [`ledger`]: the accounting of every message: what it must get back, and what it got.
//! - [`windows`]: predicts from the server's `welcome` which messages must be rejected.
//! - [`report`]: counters, latency histograms, the final table and JSON; [`gaps`]: how long
//!   replies stopped coming; [`series`]: the run second by second, which [`plot`] draws as SVG
//!   (`--plot`).
//! - [`run`]: the message scenarios (`spec`, `throughput`, `--rate`); [`connections`]: idle
//!   connections and the server's memory per connection.
//! - [`auth`]: the clients' tokens, when the server has auth on; [`strangers`]: connections
//!   that never say who they are, against which one real client must still get in.
//! - [`echo`]: the bare WebSocket echo server used as the ceiling; [`table`]: the benchmark
//!   table over several runs' reports.
//! - [`delay`]: a TCP proxy that delays every byte by a fixed one-way latency (`delay-proxy`),
//!   the network between machines simulated on one host.

pub mod auth;
pub mod client;
pub mod connect;
pub mod connections;
pub mod delay;
pub mod echo;
pub mod gaps;
mod latency;
pub mod ledger;
pub mod media;
pub mod plan;
pub mod plot;
pub mod report;
pub mod resume;
pub mod run;
pub mod series;
pub mod strangers;
pub mod table;
pub mod windows;

pub use ledger::Mode;
pub use report::Summary;
pub use run::{LoadConfig, LoadError, run, run_charted};
