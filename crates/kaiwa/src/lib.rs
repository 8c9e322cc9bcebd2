//! kaiwa: a real-time chat backend.
//!
//! A message travels through the modules in this order, and each module owns one step:
//!
//! 0. [`listener`]: accepts connections (TLS when configured) and serves HTTP/1 under a cap on
//!    connections, header and idle timeouts, and a byte allowance until a WebSocket is verified.
//! 1. [`gateway`]: WebSocket upgrade, the pool of connections in their handshake, handshake,
//!    one session actor per connection, the registry of connected clients, and the outbox that
//!    writes frames back.
//! 2. [`admission`]: limits (clients, messages in flight), validation of content and media, and
//!    the time windows judged in the client's timezone.
//! 3. [`store`]: durable messages, replies and media files, behind the [`store::Store`] trait:
//!    SQLite in one process, PostgreSQL in one process or shared by a cluster.
//! 4. [`queue`]: hands accepted messages to workers and their events back to the gateway,
//!    behind the [`queue::Queue`] trait: in-process, or RabbitMQ between processes.
//! 5. [`worker`]: processes a message: waits its reply delay, makes the replies, stores them.
//! 6. [`replies`]: what the replies say and contain: text from a [`replies::TextResponder`],
//!    voice clips and generated images.
//!
//! [`presence`] says which gateway holds which client and keeps the cluster-wide client limits,
//! and routes a client's events to its gateway; [`recovery`] queues again the accepted messages
//! no worker holds (the sweepers); [`http`] serves history, health, metrics and media; [`auth`]
//! says who a client is (signed tokens); [`app`] wires it all together, for `kaiwa serve`
//! (every role in one process) or one role of a cluster.
//!
//! Beneath them: [`domain`], the validating identities (client id, timezone, a connection's
//! source, gateway id) and an upload's file format; [`flags`], the flag values several modules
//! read; [`config`], the command line; [`telemetry`], logs and metrics; [`clock`] and
//! [`shutdown`].

pub mod admission;
pub mod app;
pub mod auth;
pub mod clock;
pub mod config;
mod db_thread;
pub mod domain;
pub mod flags;
pub mod gateway;
pub mod http;
pub mod listener;
pub mod presence;
pub mod queue;
pub mod recovery;
pub mod replies;
pub mod shutdown;
pub mod store;
pub mod telemetry;
#[cfg(test)]
mod testing;
mod url;
pub mod worker;

pub use app::Application;
pub use config::ServeConfig;
