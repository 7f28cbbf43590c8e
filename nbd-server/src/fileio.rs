//! Positional reads from a local file the fast way, shared by the raw and image exports.
//!
//! Page-cache hits are read inline with `preadv2(RWF_NOWAIT)`, which never blocks the
//! runtime; whatever is left goes to io_uring (the request task submits the read itself)
//! or, without io_uring, to tokio's blocking pool.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::BytesMut;
use rustix::io::Errno;

use crate::uring::IoUringEngine;

/// Reads exactly `length` bytes at `offset`; `UnexpectedEof` if the file ends first.
/// `nowait` is cleared the first time the kernel says `RWF_NOWAIT` is unsupported.
pub(crate) async fn read_exact(
    file: &Arc<File>,
    uring: Option<&IoUringEngine>,
    nowait: &AtomicBool,
    offset: u64,
    length: usize,
) -> io::Result<BytesMut> {
    // The inline read fills the buffer's spare capacity, so it is not zeroed first: zeroing
    // a buffer the read overwrites cost 5% of a 1 MiB read's CPU time.
    let mut buf = BytesMut::with_capacity(length);
    if nowait.load(Ordering::Relaxed) {
        while buf.len() < length {
            let at = offset + buf.len() as u64;
            match read_nowait_appending(file, &mut buf, length, at) {
                Ok(0) => break,
                Ok(_) => {}
                Err(Errno::AGAIN) => break,
                Err(Errno::INTR) => {}
                Err(Errno::OPNOTSUPP | Errno::INVAL | Errno::NOSYS) => {
                    nowait.store(false, Ordering::Relaxed);
                    break;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    let done = buf.len();
    if done == length {
        return Ok(buf);
    }
    // The engines read into initialised memory: zero only what is left for them.
    buf.resize(length, 0);
    let start = offset + done as u64;
    let rest = buf.split_off(done);
    let rest = match uring {
        Some(engine) => engine.read_exact_at(file, rest, start).await?,
        None => {
            let file = Arc::clone(file);
            tokio::task::spawn_blocking(move || {
                let mut rest = rest;
                read_exact_blocking(&file, &mut rest, start)?;
                Ok::<_, io::Error>(rest)
            })
            .await
            .map_err(|join| io::Error::other(join.to_string()))??
        }
    };
    buf.unsplit(rest);
    Ok(buf)
}

/// `preadv2(RWF_NOWAIT)` into the spare capacity of `buf`, which grows by the bytes read;
/// `buf` never grows past `length` bytes.
fn read_nowait_appending(
    file: &File,
    buf: &mut BytesMut,
    length: usize,
    offset: u64,
) -> Result<usize, Errno> {
    let room = length.saturating_sub(buf.len());
    let spare = &mut buf.spare_capacity_mut()[..room];
    let iov = libc::iovec {
        iov_base: spare.as_mut_ptr().cast(),
        iov_len: spare.len(),
    };
    let Ok(offset) = libc::off_t::try_from(offset) else {
        return Err(Errno::OVERFLOW);
    };
    // SAFETY: the one iovec points into `buf`'s own spare capacity, `room` bytes that are
    // valid for writes and stay borrowed for the whole call; the kernel writes only there.
    let n = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, offset, libc::RWF_NOWAIT) };
    let Ok(n) = usize::try_from(n) else {
        return Err(Errno::from_io_error(&io::Error::last_os_error()).unwrap_or(Errno::IO));
    };
    let n = n.min(room);
    // SAFETY: the kernel initialised the first `n` (at most `room`) bytes of the spare
    // capacity, which follow the buffer's initialised part.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

/// `pread` until `buf` is full; `UnexpectedEof` if the file ends first.
pub(crate) fn read_exact_blocking(
    file: &File,
    mut buf: &mut [u8],
    mut offset: u64,
) -> io::Result<()> {
    while !buf.is_empty() {
        match file.read_at(buf, offset) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A local file read the fast way (the inline page-cache path of the raw export, then
/// io_uring or the blocking pool), for layers above this crate such as the
/// copy-on-read cache.
#[derive(Debug)]
pub struct LocalFileReader {
    file: Arc<File>,
    uring: Option<IoUringEngine>,
    nowait: AtomicBool,
}

impl LocalFileReader {
    /// Reads `file` with io_uring when the kernel allows it, else with threads.
    pub fn new(file: Arc<File>) -> Self {
        LocalFileReader {
            file,
            uring: IoUringEngine::new(crate::uring::DEFAULT_DEPTH).ok(),
            nowait: AtomicBool::new(true),
        }
    }

    /// The file being read.
    pub fn file(&self) -> &Arc<File> {
        &self.file
    }

    /// Reads exactly `length` bytes at `offset`; `UnexpectedEof` if the file ends first.
    pub async fn read_exact(&self, offset: u64, length: usize) -> io::Result<BytesMut> {
        read_exact(
            &self.file,
            self.uring.as_ref(),
            &self.nowait,
            offset,
            length,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A file of `len` bytes, each its offset's low byte mixed with its page number.
    fn patterned_file(len: usize) -> (tempfile::NamedTempFile, Vec<u8>) {
        let bytes: Vec<u8> = (0..len).map(|i| (i as u8) ^ ((i / 4096) as u8)).collect();
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(&bytes).unwrap();
        file.as_file().sync_all().unwrap();
        (file, bytes)
    }

    /// Drops `[offset, offset + len)` of `file` from the page cache (its pages are clean).
    fn evict(file: &File, offset: u64, len: u64) {
        rustix::fs::fadvise(
            file,
            offset,
            std::num::NonZeroU64::new(len),
            rustix::fs::Advice::DontNeed,
        )
        .unwrap();
    }

    async fn read_all_ways(file: &Arc<File>, offset: u64, length: usize) -> Vec<Vec<u8>> {
        let uring = IoUringEngine::new(crate::uring::DEFAULT_DEPTH).ok();
        let mut results = Vec::new();
        for (engine, nowait) in [
            (None, true),
            (None, false),
            (uring.as_ref(), true),
            (uring.as_ref(), false),
        ] {
            let nowait = AtomicBool::new(nowait);
            let got = read_exact(file, engine, &nowait, offset, length)
                .await
                .unwrap();
            results.push(got.to_vec());
        }
        results
    }

    #[tokio::test]
    async fn a_read_returns_the_file_bytes_from_the_page_cache_and_from_the_engines() {
        let (tmp, bytes) = patterned_file(256 * 1024);
        let file = Arc::new(File::open(tmp.path()).unwrap());
        for (offset, length) in [(0, 4096), (4095, 3), (8192, 200 * 1024), (0, 256 * 1024)] {
            for got in read_all_ways(&file, offset as u64, length).await {
                assert_eq!(got, bytes[offset..offset + length]);
            }
        }
    }

    #[tokio::test]
    async fn a_read_with_its_second_half_evicted_from_the_page_cache_returns_the_file_bytes() {
        let (tmp, bytes) = patterned_file(1024 * 1024);
        let file = Arc::new(File::open(tmp.path()).unwrap());
        for _ in 0..3 {
            // The first half cached, the second not: an inline read stops at the gap
            // (or, if readahead was quick, goes on), and an engine reads the rest.
            let mut head = vec![0u8; 512 * 1024];
            file.read_exact_at(&mut head, 0).unwrap();
            evict(&file, 512 * 1024, 512 * 1024);
            for got in read_all_ways(&file, 0, bytes.len()).await {
                assert_eq!(got, bytes);
                evict(&file, 512 * 1024, 512 * 1024);
            }
        }
    }

    #[tokio::test]
    async fn a_read_past_the_end_of_the_file_is_unexpected_eof() {
        let (tmp, _) = patterned_file(8192);
        let file = Arc::new(File::open(tmp.path()).unwrap());
        let nowait = AtomicBool::new(true);
        let err = read_exact(&file, None, &nowait, 4096, 8192)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
