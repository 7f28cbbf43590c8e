//! The connection's read buffer, which hands write payloads over without copying them.
//!
//! A buffered reader refills with everything the socket holds, so a write's header
//! arrives together with much of its payload (and often the next request's). Copying
//! that payload out of the buffer cost 6% of the server's CPU at 64 KiB writes. Here the
//! buffer is a [`BytesMut`]: a payload already buffered is split off as [`Bytes`], and a
//! payload that is only partly there takes the buffer over, reads its rest into the same
//! allocation, and leaves the capacity behind it to the next requests.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};
use tokio_util::io::poll_read_buf;

/// Room for a 64 KiB write and its header. About the size of the buffered reader it
/// replaced, so a thousand idle connections cost no more than before.
const CAPACITY: usize = 68 * 1024;
/// A refill with less free room than this first moves to a fresh allocation. Buffered
/// payloads shorter than this are copied out, so a small write never holds a whole
/// buffer alive; a longer one is counted by the memory budget as a whole buffer
/// ([`memory_held`]).
const MIN_READ: usize = 16 * 1024;

/// The most memory a write payload of `length` bytes can keep allocated while it is in
/// flight: what the memory budget must count for it. A short payload has its own
/// allocation; a longer one may share (and keep alive) a whole buffer.
pub(crate) fn memory_held(length: u64) -> u64 {
    if length < MIN_READ as u64 {
        length
    } else {
        length.max(CAPACITY as u64)
    }
}

/// A socket's read side with a buffer in front of it (see the module docs).
#[derive(Debug)]
pub(crate) struct ReadBuffer<R> {
    inner: R,
    buf: BytesMut,
}

impl<R: AsyncRead + Unpin> ReadBuffer<R> {
    pub(crate) fn new(inner: R) -> Self {
        Self {
            inner,
            buf: BytesMut::new(),
        }
    }

    /// Whether bytes were read from the socket and not consumed yet.
    pub(crate) fn has_buffered(&self) -> bool {
        !self.buf.is_empty()
    }

    /// Whether at least `n` bytes are buffered: a read of `n` bytes will not wait.
    pub(crate) fn buffered_at_least(&self, n: usize) -> bool {
        self.buf.len() >= n
    }

    /// The socket, for a caller that checked nothing is buffered ([`Self::has_buffered`]).
    pub(crate) fn into_inner(self) -> R {
        self.inner
    }

    /// Reads the next `length` bytes as one [`Bytes`]: split off the buffer when they are
    /// there (copied if short), else what is buffered and the rest straight from the
    /// socket into the same allocation.
    pub(crate) async fn read_payload(&mut self, length: usize) -> io::Result<Bytes> {
        let mut payload = if length < MIN_READ {
            let mut small = BytesMut::with_capacity(length);
            let n = self.buf.len().min(length);
            small.extend_from_slice(&self.buf[..n]);
            self.buf.advance(n);
            small
        } else if self.buf.len() >= length {
            return Ok(self.buf.split_to(length).freeze());
        } else {
            let mut large = std::mem::take(&mut self.buf);
            if large.capacity() < length {
                // Its own allocation of exactly its size (never a grown buffer, whose
                // spare room would outlive it): what is buffered (< 68 KiB) is copied.
                let mut own = BytesMut::with_capacity(length);
                own.extend_from_slice(&large);
                large = own;
            }
            large
        };
        let missing = (length - payload.len()) as u64;
        let mut rest = (&mut self.inner).take(missing);
        while payload.len() < length {
            if rest.read_buf(&mut payload).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        // The read buffer's own allocation goes on serving reads after the payload; a
        // payload's own allocation does not.
        if self.buf.is_empty() && payload.capacity() > length && length <= CAPACITY {
            self.buf = payload.split_off(length);
        }
        Ok(payload.freeze())
    }

    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < MIN_READ {
            self.buf.reserve(CAPACITY);
        }
        poll_read_buf(Pin::new(&mut self.inner), cx, &mut self.buf)
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for ReadBuffer<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.buf.is_empty() {
            if out.remaining() >= CAPACITY {
                return Pin::new(&mut this.inner).poll_read(cx, out);
            }
            if ready!(this.poll_fill(cx))? == 0 {
                return Poll::Ready(Ok(()));
            }
        }
        let n = out.remaining().min(this.buf.len());
        out.put_slice(&this.buf[..n]);
        this.buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A pipe whose writer sends `chunks` one by one, so reads see them separately.
    async fn reader_of(chunks: Vec<Vec<u8>>) -> ReadBuffer<tokio::io::DuplexStream> {
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        tokio::spawn(async move {
            for c in chunks {
                tx.write_all(&c).await.unwrap();
                tokio::task::yield_now().await;
            }
        });
        ReadBuffer::new(rx)
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    #[tokio::test]
    async fn headers_and_payloads_of_every_size_come_out_in_order_and_intact() {
        // Requests: an 8-byte "header", then a payload of each size, sent in odd pieces.
        let sizes = [0, 1, 512, 4096, 65536, 65536 + 7, 200_000, 1 << 20, 3];
        let mut stream = Vec::new();
        for (i, &len) in sizes.iter().enumerate() {
            stream.extend_from_slice(&(len as u64).to_be_bytes());
            stream.extend(pattern(len, i as u8));
        }
        let chunks = stream.chunks(50_001).map(<[u8]>::to_vec).collect();
        let mut reader = reader_of(chunks).await;
        let mut held = Vec::new();
        for (i, &len) in sizes.iter().enumerate() {
            let mut header = [0u8; 8];
            reader.read_exact(&mut header).await.unwrap();
            assert_eq!(u64::from_be_bytes(header), len as u64, "header {i}");
            let payload = reader.read_payload(len).await.unwrap();
            assert_eq!(payload.len(), len, "payload {i}");
            assert!(
                payload[..] == pattern(len, i as u8)[..],
                "payload {i} differs"
            );
            held.push((i, payload));
        }
        // Payloads stay intact while later reads reuse the buffer's allocation.
        for (i, payload) in held {
            assert!(
                payload[..] == pattern(sizes[i], i as u8)[..],
                "payload {i} changed"
            );
        }
        let mut end = [0u8; 1];
        assert_eq!(reader.read(&mut end).await.unwrap(), 0, "end of stream");
    }

    #[tokio::test]
    async fn the_buffer_never_keeps_more_than_its_capacity_whatever_the_payload_sizes() {
        // Payloads over the buffer's size, growing by a third each time (a grown
        // allocation would double and leave its spare room behind): each must get its
        // own allocation, and the buffer must not keep a grown one.
        let sizes: Vec<usize> = (0..16)
            .map(|k| CAPACITY * 4usize.pow(k) / 3usize.pow(k) + 7)
            .collect();
        let mut stream = Vec::new();
        for (i, &len) in sizes.iter().enumerate() {
            stream.extend_from_slice(&[i as u8; 8]);
            stream.extend(pattern(len, i as u8));
        }
        let chunks = stream.chunks(40_000).map(<[u8]>::to_vec).collect();
        let mut reader = reader_of(chunks).await;
        for (i, &len) in sizes.iter().enumerate() {
            let mut header = [0u8; 8];
            reader.read_exact(&mut header).await.unwrap();
            let payload = reader.read_payload(len).await.unwrap();
            assert!(payload[..] == pattern(len, i as u8)[..], "payload {i}");
            assert!(
                reader.buf.capacity() <= CAPACITY,
                "after a {len}-byte payload the buffer holds {} bytes",
                reader.buf.capacity()
            );
        }
        assert_eq!(memory_held(100), 100);
        assert_eq!(memory_held(16 << 10), CAPACITY as u64);
        assert_eq!(memory_held(1 << 20), 1 << 20);
    }

    #[tokio::test]
    async fn a_payload_cut_short_by_the_peer_is_an_unexpected_eof() {
        let mut reader = reader_of(vec![vec![1; 1000]]).await;
        let err = reader.read_payload(4096).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
