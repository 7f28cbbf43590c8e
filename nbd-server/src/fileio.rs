//! Positional reads from a local file the fast way, shared by the raw and image exports.
//!
//! Page-cache hits are read inline with `preadv2(RWF_NOWAIT)`, which never blocks the
//! runtime; whatever is left goes to io_uring (the request task submits the read itself)
//! or, without io_uring, to tokio's blocking pool.

use std::fs::File;
use std::io::{self, IoSliceMut};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::BytesMut;
use rustix::io::{Errno, ReadWriteFlags};

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
    let mut buf = BytesMut::zeroed(length);
    let mut done = 0;
    if nowait.load(Ordering::Relaxed) {
        while done < length {
            let mut iov = [IoSliceMut::new(&mut buf[done..])];
            match rustix::io::preadv2(
                &**file,
                &mut iov,
                offset + done as u64,
                ReadWriteFlags::NOWAIT,
            ) {
                Ok(0) => break,
                Ok(n) => done += n,
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
    if done == length {
        return Ok(buf);
    }
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
