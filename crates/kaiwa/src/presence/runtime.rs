//! A runtime of its own, on one thread, for presence's round trips to PostgreSQL. In a storm a
//! gateway's runtime has tens of thousands of session tasks ready at once: a statement's task
//! waiting there for its turn held its pool connection for seconds, so that others waited to
//! acquire one and sqlx warned of slow statements that PostgreSQL had answered in
//! milliseconds, and the lease's renewal could come late. Presence's connections are opened
//! on this runtime and used only there; a caller hands its work over and waits for the answer,
//! and while it waits for its turn to read it, nothing of the database waits with it.

use super::PresenceError;
use std::future::Future;
use tokio::runtime::{Handle, Runtime};

pub(super) struct OwnRuntime {
    handle: Handle,
    /// Taken by `drop`, which shuts it down without waiting.
    runtime: Option<Runtime>,
}

impl OwnRuntime {
    pub(super) fn start(name: &str) -> Result<Self, PresenceError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(name)
            .enable_all()
            .build()
            .map_err(|err| {
                PresenceError::Unavailable(format!("could not start presence's runtime: {err}"))
            })?;
        Ok(Self {
            handle: runtime.handle().clone(),
            runtime: Some(runtime),
        })
    }

    /// Runs `work` there and returns what it returned.
    pub(super) async fn run<T: Send + 'static>(
        &self,
        work: impl Future<Output = T> + Send + 'static,
    ) -> Result<T, PresenceError> {
        self.handle.spawn(work).await.map_err(|err| {
            if err.is_panic() {
                PresenceError::Database(format!("presence's work panicked: {err}"))
            } else {
                PresenceError::Unavailable("presence's runtime has stopped".into())
            }
        })
    }

    /// Starts `work` there without waiting for it.
    pub(super) fn spawn(&self, work: impl Future<Output = ()> + Send + 'static) {
        drop(self.handle.spawn(work));
    }

    pub(super) fn handle(&self) -> Handle {
        self.handle.clone()
    }
}

impl Drop for OwnRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            // Dropped within another runtime (as it is), a runtime may not block to wait for
            // its tasks. What presence gives back at the end it gave back before this: the
            // lease's task leaves the cluster when the gateway stops.
            runtime.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::OwnRuntime;
    use std::time::Duration;

    /// The caller's runtime has one thread, and it is blocked until the work is done: work run
    /// there, or needing its timer, would never finish, and the wait fails after 10 s.
    #[tokio::test]
    async fn work_goes_on_while_the_callers_runtime_is_blocked() {
        let runtime = OwnRuntime::start("test-presence").expect("started");
        let (done, finished) = std::sync::mpsc::channel();
        let mut answer = Box::pin(runtime.run(async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            done.send(()).expect("the test waits");
            42
        }));
        // Polled once: handed over.
        assert!(futures::FutureExt::now_or_never(&mut answer).is_none());
        finished
            .recv_timeout(Duration::from_secs(10))
            .expect("the work finished while this runtime's one thread was blocked");
        assert_eq!(answer.await.expect("answered"), 42);
    }

    #[tokio::test]
    async fn work_that_panics_is_an_error_and_the_runtime_goes_on() {
        let runtime = OwnRuntime::start("test-presence").expect("started");
        let failed = runtime
            .run(async {
                if true {
                    panic!("a bug");
                }
            })
            .await
            .expect_err("the panic is an error");
        assert!(!failed.is_transient(), "{failed}");
        assert_eq!(runtime.run(async { 7 }).await.expect("answered"), 7);
    }
}
