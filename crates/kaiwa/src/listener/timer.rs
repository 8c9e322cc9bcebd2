//! hyper's one HTTP/1 deadline, told apart into the header-read timeout of a connection's
//! first request and the idle timeout of a kept-alive one.
//!
//! hyper arms a single timer, `header_read_timeout` from the moment it starts waiting for a
//! request head: when the connection opens, and again after every response. For the first
//! request that is how long a client may take to send its headers; after a response it is also
//! how long a kept-alive connection may sit idle. Those want different values (a few seconds
//! for headers; longer before a browser's kept-alive connection is dropped), so hyper is given
//! the header-read timeout, and this timer moves each deadline hyper asks for once the
//! connection has served a request. The timing itself is tokio's, through hyper-util.

use super::peer::Peer;
use hyper::rt::{Sleep, Timer};
use hyper_util::rt::TokioTimer;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone)]
pub(super) struct ConnectionTimer {
    peer: Arc<Peer>,
    /// What hyper is given as its header-read timeout.
    header: Duration,
    /// What a kept-alive connection gets instead.
    idle: Duration,
    tokio: TokioTimer,
}

impl ConnectionTimer {
    pub(super) fn new(peer: Arc<Peer>, header: Duration, idle: Duration) -> Self {
        Self {
            peer,
            header,
            idle,
            tokio: TokioTimer::new(),
        }
    }

    /// The deadline hyper asked for (`header` from now), or, once a request was served, the
    /// same moment counted with the idle timeout instead.
    fn deadline(&self, asked: Instant) -> Instant {
        if self.peer.requests() == 0 {
            return asked;
        }
        asked
            .checked_sub(self.header)
            .map_or(asked, |start| start + self.idle)
    }
}

impl Timer for ConnectionTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Sleep>> {
        self.tokio.sleep(duration)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn Sleep>> {
        self.tokio.sleep_until(self.deadline(deadline))
    }

    fn now(&self) -> Instant {
        self.tokio.now()
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn Sleep>>, new_deadline: Instant) {
        self.tokio.reset(sleep, self.deadline(new_deadline));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    #[test]
    fn the_first_request_gets_the_header_timeout_and_later_ones_the_idle_timeout() {
        let peer = Arc::new(Peer::new(SocketAddr::from(([127, 0, 0, 1], 9))));
        let timer = ConnectionTimer::new(
            peer.clone(),
            Duration::from_secs(5),
            Duration::from_secs(15),
        );
        let now = Instant::now();
        let asked = now + Duration::from_secs(5);
        assert_eq!(timer.deadline(asked), asked);
        peer.count_request();
        assert_eq!(timer.deadline(asked), now + Duration::from_secs(15));
    }
}
