//! The read side of an accepted socket, which asks the socket itself before the reactor.
//!
//! Tokio reads a socket only once its reactor has seen it become readable, and the
//! reactor looks only when the thread parks or every few dozen tasks. A connection that
//! polls for its next request ([`crate::spin`]) must see bytes as soon as they arrive,
//! so while it polls, a read here first tries `recv(MSG_DONTWAIT)`, and only when that
//! finds nothing falls back to tokio's read, which registers for the wake-up. The same
//! holds inside TLS, whose records are read from this reader. Other reads go to tokio
//! straight away: trying the socket first would cost a system call per wait.
//!
//! Reading behind the reactor's back is safe with its edge-triggered registration: every
//! arrival of data raises an event, so a readiness left stale by a read here costs one
//! `EAGAIN` later, never a lost wake-up.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::pin::Pin;
use std::task::{Context, Poll};

use rustix::io::Errno;
use rustix::net::RecvFlags;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::{tcp, unix};

/// The read half of an accepted tokio socket: it reads, and it names its socket.
pub(crate) trait SocketHalf: AsyncRead + Unpin {
    /// The socket this half reads, open as long as the half lives.
    fn socket(&self) -> BorrowedFd<'_>;
}

impl SocketHalf for tcp::OwnedReadHalf {
    fn socket(&self) -> BorrowedFd<'_> {
        self.as_ref().as_fd()
    }
}

impl SocketHalf for unix::OwnedReadHalf {
    fn socket(&self) -> BorrowedFd<'_> {
        self.as_ref().as_fd()
    }
}

/// A socket's read half that tries the socket before waiting on the reactor.
#[derive(Debug)]
pub(crate) struct SocketReader<R> {
    inner: R,
}

impl<R: SocketHalf> SocketReader<R> {
    /// Wraps the read half of an accepted socket.
    pub(crate) fn new(inner: R) -> Self {
        Self { inner }
    }
}

impl<R: SocketHalf> AsyncRead for SocketReader<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !crate::spin::spinning() {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            // SAFETY: recv only writes into these bytes, and only the ones it wrote are
            // marked initialised below; none is de-initialised.
            let unfilled = unsafe { buf.unfilled_mut() };
            match rustix::net::recv(this.inner.socket(), unfilled, RecvFlags::DONTWAIT) {
                Ok(((received, _), _)) => {
                    let n = received.len();
                    // SAFETY: recv initialised the first `n` bytes of the unfilled part.
                    unsafe { buf.assume_init(n) };
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(Errno::INTR) => {}
                Err(Errno::AGAIN) => return Pin::new(&mut this.inner).poll_read(cx, buf),
                Err(e) => return Poll::Ready(Err(e.into())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixStream;

    #[tokio::test]
    async fn reads_what_is_there_waits_for_what_is_not_and_sees_the_end_of_the_stream() {
        use crate::spin::spin_then_await;
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let (r, _w) = ours.into_split();
        let mut reader = SocketReader::new(r);
        theirs.write_all(b"abc").await.unwrap();
        let mut buf = [0u8; 8];
        // Spinning: asked from the socket, before the reactor has looked.
        let (n, arrived) = spin_then_await(reader.read(&mut buf), Duration::from_secs(5)).await;
        assert_eq!((n.unwrap(), arrived), (3, true));
        assert_eq!(&buf[..3], b"abc");
        // Nothing there within the budget: the read then waits for the reactor's wake-up,
        // although the bytes above were read without it.
        let late = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            theirs.write_all(b"defgh").await.unwrap();
            theirs
        });
        let mut five = [0u8; 5];
        let read = spin_then_await(reader.read_exact(&mut five), Duration::from_micros(200));
        let (n, arrived) = tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .expect("woken when the bytes arrive");
        assert_eq!((n.unwrap(), arrived), (5, false));
        assert_eq!(&five, b"defgh");
        let mut theirs = late.await.unwrap();
        // Outside spins, reads go to tokio as ever.
        theirs.write_all(b"ij").await.unwrap();
        assert_eq!(reader.read(&mut buf).await.unwrap(), 2);
        drop(theirs);
        let (n, _) = spin_then_await(reader.read(&mut buf), Duration::from_secs(5)).await;
        assert_eq!(n.unwrap(), 0, "end of stream");
    }
}
