//! One accepted connection as its requests see it, and the allowance of bytes it may send
//! before it is verified: the socket is read through [`Metered`], which stops at the allowance.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The allowance of a connection that has none.
const UNLIMITED: usize = usize::MAX;

/// An accepted connection: where it comes from, and what it may still send. Every request
/// carries it as an extension.
#[derive(Debug)]
pub struct Peer {
    addr: SocketAddr,
    /// Requests read on this connection: the first is timed by the header-read timeout, the
    /// later ones by the idle timeout.
    requests: AtomicU32,
    /// Bytes the connection may still read, or [`UNLIMITED`]. Only an upgraded connection
    /// that has not yet said who it is has a limit.
    allowance: AtomicUsize,
}

impl Peer {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            requests: AtomicU32::new(0),
            allowance: AtomicUsize::new(UNLIMITED),
        }
    }

    /// The remote address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// From now on the connection reads at most `bytes` more; past them every read fails with
    /// an error that [`is_over_allowance`] recognises.
    pub fn limit_reads(&self, bytes: usize) {
        self.allowance
            .store(bytes.min(UNLIMITED - 1), Ordering::Release);
    }

    /// Lifts the limit: the connection has been verified.
    pub fn unlimit_reads(&self) {
        self.allowance.store(UNLIMITED, Ordering::Release);
    }

    pub(super) fn count_request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn requests(&self) -> u32 {
        self.requests.load(Ordering::Relaxed)
    }
}

/// The error of a read past a connection's allowance.
#[derive(Debug, thiserror::Error)]
#[error("the connection sent more than it may before it is verified")]
struct OverAllowance;

/// Whether `err`, or an error it was caused by, is a read past the connection's allowance.
pub fn is_over_allowance(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(err);
    while let Some(err) = cause {
        let over = err
            .downcast_ref::<io::Error>()
            .and_then(io::Error::get_ref)
            .is_some_and(|inner| inner.is::<OverAllowance>());
        if over {
            return true;
        }
        cause = err.source();
    }
    false
}

/// A socket read within its peer's allowance.
pub(super) struct Metered<S> {
    inner: S,
    peer: Arc<Peer>,
}

impl<S> Metered<S> {
    pub(super) fn new(inner: S, peer: Arc<Peer>) -> Self {
        Self { inner, peer }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let allowance = this.peer.allowance.load(Ordering::Acquire);
        if allowance == UNLIMITED {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        if allowance == 0 {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                OverAllowance,
            )));
        }
        // Never more than the allowance from the socket: what is not read costs no memory.
        let room = buf.remaining().min(allowance);
        let mut limited = ReadBuf::new(buf.initialize_unfilled_to(room));
        ready!(Pin::new(&mut this.inner).poll_read(cx, &mut limited))?;
        let read = limited.filled().len();
        buf.advance(read);
        // Never over a lift: a verified connection stays unlimited whoever lifted it meanwhile.
        let _ = this
            .peer
            .allowance
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                (left != UNLIMITED).then(|| left.saturating_sub(read))
            });
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn peer() -> Arc<Peer> {
        Arc::new(Peer::new(SocketAddr::from(([127, 0, 0, 1], 9))))
    }

    #[tokio::test]
    async fn a_limited_connection_reads_no_byte_past_its_allowance() {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let peer = peer();
        let mut metered = Metered::new(server, peer.clone());
        client.write_all(&[7; 10_000]).await.expect("written");
        peer.limit_reads(100);
        let mut buf = vec![0; 10_000];
        let mut read = 0;
        let err = loop {
            match metered.read(&mut buf[read..]).await {
                Ok(n) => read += n,
                Err(err) => break err,
            }
        };
        assert_eq!(read, 100);
        assert!(is_over_allowance(&err), "{err}");
        // Verified: the rest comes.
        peer.unlimit_reads();
        let n = metered.read(&mut buf).await.expect("read");
        assert!(n > 0);
    }

    #[tokio::test]
    async fn an_unlimited_connection_reads_everything() {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let mut metered = Metered::new(server, peer());
        client.write_all(&[1; 50_000]).await.expect("written");
        drop(client);
        let mut all = Vec::new();
        metered.read_to_end(&mut all).await.expect("read");
        assert_eq!(all.len(), 50_000);
    }

    #[test]
    fn other_errors_are_not_taken_for_an_allowance() {
        let err = io::Error::new(io::ErrorKind::InvalidData, "something else");
        assert!(!is_over_allowance(&err));
    }
}
