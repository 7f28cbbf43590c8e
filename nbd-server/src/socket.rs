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
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

/// A socket's read half that tries the socket before waiting on the reactor.
#[derive(Debug)]
pub(crate) struct SocketReader<R> {
    inner: R,
    /// The socket `inner` reads: open as long as `inner` lives.
    fd: RawFd,
}

impl<R> SocketReader<R> {
    /// Wraps a read half of a tokio socket (`tcp::OwnedReadHalf`, `unix::OwnedReadHalf`).
    pub(crate) fn new<S: AsRawFd>(inner: R) -> Self
    where
        R: AsRef<S>,
    {
        let fd = inner.as_ref().as_raw_fd();
        Self { inner, fd }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for SocketReader<R> {
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
            // SAFETY: the bytes recv writes are marked initialised below, and only those;
            // no uninitialised byte is read.
            let unfilled = unsafe { buf.unfilled_mut() };
            // SAFETY: `this.fd` is the socket owned by `this.inner`, open while it lives;
            // `unfilled` is writable memory of `unfilled.len()` bytes.
            let n = unsafe {
                libc::recv(
                    this.fd,
                    unfilled.as_mut_ptr().cast(),
                    unfilled.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n >= 0 {
                let n = n as usize;
                // SAFETY: recv initialised the first `n` bytes of the unfilled part.
                unsafe { buf.assume_init(n) };
                buf.advance(n);
                return Poll::Ready(Ok(()));
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => {}
                io::ErrorKind::WouldBlock => return Pin::new(&mut this.inner).poll_read(cx, buf),
                _ => return Poll::Ready(Err(e)),
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
