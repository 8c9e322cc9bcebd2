//! The thread presence talks to PostgreSQL on, with a runtime of its own, as the store's writer
//! has. When 50,000 clients leave a gateway at once, its runtime has tens of thousands of
//! connection tasks to run: a statement's answer waited behind them for over a second, though
//! PostgreSQL had answered within 200 ms. The lease's renewal, the batches of claims and
//! departures and the slot fetches and give-backs then held pool connections that long, made
//! others wait for one, and were logged as slow. Here they are polled as soon as their answer
//! comes, and the pool's connections are opened here, so their sockets are driven here too.

use super::PresenceError;
use std::future::Future;
use tokio::runtime::{Builder, Handle, Runtime};

pub(super) struct PresenceThread {
    /// Taken only when it is shut down, on drop.
    runtime: Option<Runtime>,
    handle: Handle,
}

impl PresenceThread {
    pub(super) fn start() -> Result<Self, PresenceError> {
        let runtime = Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("kaiwa-presence")
            .enable_all()
            .build()
            .map_err(|err| {
                PresenceError::Database(format!("could not start presence's thread: {err}"))
            })?;
        let handle = runtime.handle().clone();
        Ok(Self {
            runtime: Some(runtime),
            handle,
        })
    }

    pub(super) fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Runs `work` on this thread and waits for it (see [`run_on`]).
    pub(super) async fn run<T, F>(&self, work: F) -> Result<T, PresenceError>
    where
        F: Future<Output = Result<T, PresenceError>> + Send + 'static,
        T: Send + 'static,
    {
        run_on(&self.handle, work).await
    }
}

/// Runs `work` on presence's thread, whose runtime `thread` is, and waits for it. A caller that
/// stops waiting does not stop the work: a statement sent is carried through, and what it
/// leaves is the next renewal's to tidy, as when its connection dropped.
pub(super) async fn run_on<T, F>(thread: &Handle, work: F) -> Result<T, PresenceError>
where
    F: Future<Output = Result<T, PresenceError>> + Send + 'static,
    T: Send + 'static,
{
    thread
        .spawn(work)
        .await
        .map_err(|err| PresenceError::Unavailable(format!("presence's thread stopped: {err}")))?
}

impl Drop for PresenceThread {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            // Dropping a runtime waits for its tasks, which an async caller may not do; what
            // runs there then is a statement whose answer nobody is waiting for.
            runtime.shutdown_background();
        }
    }
}
