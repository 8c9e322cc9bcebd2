//! A thread with a runtime of its own for a pool's round trips to PostgreSQL, as the store's
//! writer has one. When 50,000 clients leave a gateway at once, its runtime has tens of
//! thousands of connection tasks to run: a statement's answer waited behind them for over a
//! second, though PostgreSQL had answered within 200 ms, and held its pool connection as long,
//! so that others waited for one. A pool opened here has its sockets driven here, and a
//! statement run here is polled as soon as its answer comes. Presence and the store's reads
//! each have one.

use std::future::Future;
use tokio::runtime::{Builder, Handle, Runtime};
use tokio::task::JoinError;

pub(crate) struct DbThread {
    /// Taken only when it is shut down, on drop.
    runtime: Option<Runtime>,
    handle: Handle,
}

/// The work did not finish on the thread: the thread stopped (the process is shutting down),
/// or the work panicked.
#[derive(Debug)]
pub(crate) struct Stopped(JoinError);

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the work on the database thread did not finish: {}",
            self.0
        )
    }
}

impl DbThread {
    /// Starts a thread named `name`.
    pub(crate) fn start(name: &str) -> std::io::Result<Self> {
        let runtime = Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(name)
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        Ok(Self {
            runtime: Some(runtime),
            handle,
        })
    }

    pub(crate) fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Runs `work` on this thread and waits for it (see [`run_on`]).
    pub(crate) async fn run<T, E, F>(&self, work: F) -> Result<T, E>
    where
        F: Future<Output = Result<T, E>> + Send + 'static,
        T: Send + 'static,
        E: From<Stopped> + Send + 'static,
    {
        run_on(&self.handle, work).await
    }
}

/// Runs `work` on the database thread whose runtime `thread` is, and waits for it. A caller
/// that stops waiting does not stop the work: a statement sent is carried through, as one whose
/// caller went away while its answer was on the wire.
pub(crate) async fn run_on<T, E, F>(thread: &Handle, work: F) -> Result<T, E>
where
    F: Future<Output = Result<T, E>> + Send + 'static,
    T: Send + 'static,
    E: From<Stopped> + Send + 'static,
{
    thread
        .spawn(work)
        .await
        .map_err(|err| E::from(Stopped(err)))?
}

impl Drop for DbThread {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            // Dropping a runtime waits for its tasks, which an async caller may not do; what
            // runs there then is a statement whose answer nobody is waiting for.
            runtime.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    enum Failed {
        Stopped,
    }

    impl From<Stopped> for Failed {
        fn from(_: Stopped) -> Self {
            Self::Stopped
        }
    }

    #[tokio::test]
    async fn work_runs_on_the_thread_whatever_runtime_waits_for_it() {
        let thread = DbThread::start("kaiwa-test-db").expect("a thread");
        let ran_on = thread
            .run(async { Ok::<_, Failed>(std::thread::current().name().map(str::to_owned)) })
            .await
            .expect("ran");
        assert_eq!(ran_on.as_deref(), Some("kaiwa-test-db"));
    }

    fn statement_that_panics() -> Result<(), Failed> {
        panic!("a statement's task panicked")
    }

    #[tokio::test]
    async fn work_that_cannot_finish_there_is_an_error_for_the_caller() {
        let thread = DbThread::start("kaiwa-test-db").expect("a thread");
        let panicked = thread.run(async { statement_that_panics() }).await;
        assert!(matches!(panicked, Err(Failed::Stopped)), "{panicked:?}");
        // The thread goes on with the next.
        assert!(thread.run(async { Ok::<_, Failed>(1) }).await.is_ok());
    }
}
