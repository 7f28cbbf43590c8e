//! The raw export: a regular file or a block device served byte for byte.
//!
//! Reads of data already in the page cache are done inline with `preadv2(RWF_NOWAIT)`,
//! which never blocks. Buffered writes up to 1 MiB are done inline too (with
//! `RWF_NOWAIT` where the filesystem supports it, else a plain `pwrite`), until one of
//! them stalls for 10 ms: then writes go to the engine for 200 ms. The rest of the data
//! path (cache misses, FUA writes, large writes, flushes) goes to the [`IoEngine`]:
//! io_uring when the kernel allows it, so the request task submits the I/O itself and
//! no thread is handed anything, or else tokio's blocking pool with positional I/O.
//!
//! Allocation comes from `SEEK_DATA`/`SEEK_HOLE` (regular files; reads of 64 KiB or
//! more probe for a leading hole with one `SEEK_DATA`), trims punch holes (or
//! `BLKDISCARD` on block devices), zeroing punches or uses `FALLOC_FL_ZERO_RANGE` /
//! `BLKZEROOUT` depending on `NO_HOLE`, and flush is `fdatasync`. All connections share
//! the one file description, so the kernel's page cache makes a flush on any connection
//! cover writes acknowledged on every connection: the export is multi-conn safe.

use std::fs::File;
use std::io::{self, IoSlice};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use rustix::fs::{FallocateFlags, SeekFrom};
use rustix::io::{Errno, ReadWriteFlags};

use tracing::debug;

use thinline_format::Format;
use thinline_format::chain::{
    PROBE_HEAD_LEN, PROBE_TAIL_FROM_END, PROBE_TAIL_LEN, PROBE_TAIL_MIN_SIZE, Probed, probe,
};

use crate::export::{BlockSizes, Capabilities, Export, Extent, ReadChunk, StatusQuery, ZeroFlags};
use crate::fileio;
use crate::proto::{ALLOCATION_DEPTH, BASE_ALLOCATION, state};
use crate::uring::{self, IoUringEngine};
use crate::{DataError, Error, Result};

/// The engine for I/O the inline `RWF_NOWAIT` path cannot do: page-cache misses, writes
/// that would block, FUA writes and flushes. Trims, zeroing and cache hints always run
/// on the blocking pool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum IoEngine {
    /// io_uring if the kernel allows it (5.6 or later, not disabled by sysctl or
    /// seccomp), else the thread pool.
    #[default]
    Auto,
    /// io_uring; opening the export fails if it is unavailable.
    IoUring,
    /// tokio's blocking thread pool with `pread`/`pwrite`/`fdatasync`.
    Threads,
}

/// How to open a raw export.
#[derive(Debug, Clone, Default)]
pub struct RawOptions {
    /// Open read-only and refuse every write.
    pub read_only: bool,
    /// Advertise this minimum block size instead of the natural one (1 for files, the
    /// logical sector size for block devices). Must be a power of two up to 64 KiB.
    pub minimum_block_size: Option<u32>,
    /// How I/O that cannot be done inline is run.
    pub io_engine: IoEngine,
    /// The format was detected from the content, not given: refuse (EPERM) writes that
    /// would make the next detection find another format, such as a guest writing a
    /// qcow2 header naming a host file as its backing file.
    pub guard_probed_format: bool,
}

/// Keeps a raw image whose format was *probed* raw. A guest owns the bytes of its disk:
/// if it could write a qcow2, VMDK or VHD signature where detection looks, the next
/// start with the same command line would open the file as that format, and a header
/// naming a backing file such as `/etc/shadow` would serve a host file to the guest
/// (qemu's CVE-2008-2004). So writes that would make detection find anything but raw
/// are refused with EPERM and a log line. Writes to the probed bytes are serialized
/// (rare: the first 64 bytes and 8 bytes 512 from the end), so two writes cannot each
/// pass the check and together form a signature; zeroing needs no check, since no
/// signature contains a zero byte.
#[derive(Debug, Default)]
struct ProbeGuard {
    serialize: tokio::sync::Mutex<()>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    RegularFile,
    BlockDevice,
}

/// A raw file or block device export.
#[derive(Debug)]
pub struct RawExport {
    file: Arc<File>,
    path: PathBuf,
    kind: Kind,
    size: u64,
    read_only: bool,
    block_sizes: BlockSizes,
    rotational: bool,
    /// Cleared the first time `RWF_NOWAIT` turns out to be unsupported.
    nowait_reads: AtomicBool,
    nowait_writes: AtomicBool,
    /// Blocking buffered writes may run inline (see `MAX_INLINE_WRITE`).
    inline_writes: AtomicBool,
    /// Until this instant (nanoseconds after `opened`), buffered writes are not done inline.
    offload_writes_until: AtomicU64,
    opened: Instant,
    /// The io_uring engine, or `None` for the thread pool.
    uring: Option<IoUringEngine>,
    /// Present when the format was probed (see [`ProbeGuard`]).
    probe_guard: Option<ProbeGuard>,
}

/// Buffered writes up to this size are done inline on the connection's task: the page
/// cache takes them in microseconds, and handing them to another thread costs more than
/// the write (measured: 4 KiB random writes at queue depth 32 ran 2-3x faster inline).
const MAX_INLINE_WRITE: usize = 1 << 20;

/// An inline write slower than this (dirty-page throttling, a journal commit) sends
/// writes to the I/O engine for `INLINE_WRITE_BACKOFF`, so a stalling disk cannot keep
/// blocking the runtime's worker threads.
const SLOW_INLINE_WRITE: Duration = Duration::from_millis(10);
const INLINE_WRITE_BACKOFF: Duration = Duration::from_millis(200);

/// Reads at least this long look for a leading hole (sent as `OFFSET_HOLE`).
const HOLE_PROBE_MIN: u32 = 64 * 1024;

/// Largest zero-filled buffer used when zeroes must really be written.
const ZERO_WRITE_CHUNK: u64 = 1 << 20;

/// Most extents computed for one block-status or read request; a client asks again
/// for the rest.
const MAX_EXTENTS: usize = 1 << 16;

impl RawExport {
    /// Opens `path` (a regular file or a block device).
    pub fn open(path: &Path, options: &RawOptions) -> Result<Self> {
        let open_err = |source| Error::Open {
            path: path.to_owned(),
            source,
        };
        // Checked before opening: a FIFO at PATH must not hang the start.
        let (file, meta) = thinline_format::storage::open_checked(
            path,
            !options.read_only,
            thinline_format::storage::Allow::BlockDevices,
        )
        .map_err(open_err)?;
        let file_type = meta.file_type();
        let (kind, size, logical, physical, rotational) = if file_type.is_file() {
            (Kind::RegularFile, meta.len(), 1, 4096, false)
        } else if file_type.is_block_device() {
            let size = rustix::fs::seek(&file, SeekFrom::End(0)).map_err(|e| open_err(e.into()))?;
            let logical = rustix::fs::ioctl_blksszget(&file).unwrap_or(512);
            let physical = rustix::fs::ioctl_blkpbszget(&file).unwrap_or(logical);
            (
                Kind::BlockDevice,
                size,
                logical,
                physical,
                is_rotational(meta.rdev()),
            )
        } else {
            return Err(open_err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file or a block device",
            )));
        };
        let minimum = options.minimum_block_size.unwrap_or(logical).max(1);
        let preferred = physical.max(minimum).max(4096);
        let uring = match options.io_engine {
            IoEngine::Threads => None,
            IoEngine::IoUring => {
                Some(IoUringEngine::new(uring::DEFAULT_DEPTH).map_err(|e| open_err(e.into_io()))?)
            }
            IoEngine::Auto => match IoUringEngine::new(uring::DEFAULT_DEPTH) {
                Ok(engine) => Some(engine),
                Err(e) => {
                    tracing::debug!(
                        path = %path.display(),
                        cause = %e.cause(),
                        "io_uring is unavailable; using the thread pool for I/O"
                    );
                    None
                }
            },
        };
        Ok(RawExport {
            file: Arc::new(file),
            path: path.to_owned(),
            kind,
            size,
            read_only: options.read_only,
            block_sizes: BlockSizes {
                minimum,
                preferred,
                maximum_payload: BlockSizes::DEFAULT_MAX_PAYLOAD,
            },
            rotational,
            nowait_reads: AtomicBool::new(true),
            nowait_writes: AtomicBool::new(true),
            inline_writes: AtomicBool::new(true),
            offload_writes_until: AtomicU64::new(0),
            opened: Instant::now(),
            uring,
            probe_guard: options.guard_probed_format.then(ProbeGuard::default),
        })
    }

    /// The engine in use: [`IoEngine::IoUring`] or [`IoEngine::Threads`].
    pub fn io_engine(&self) -> IoEngine {
        if self.uring.is_some() {
            IoEngine::IoUring
        } else {
            IoEngine::Threads
        }
    }

    /// The path this export serves.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io_error(&self, op: &'static str, offset: u64, length: u64, source: io::Error) -> Error {
        DataError::io(op, self.path.display(), offset, length, source).into()
    }

    /// Runs `f` on the blocking pool with the file.
    async fn blocking<T: Send + 'static>(
        &self,
        op: &'static str,
        offset: u64,
        length: u64,
        f: impl FnOnce(&File) -> io::Result<T> + Send + 'static,
    ) -> Result<T> {
        let file = Arc::clone(&self.file);
        match tokio::task::spawn_blocking(move || f(&file)).await {
            Ok(r) => r.map_err(|e| self.io_error(op, offset, length, e)),
            Err(join) => Err(self.io_error(op, offset, length, io::Error::other(join.to_string()))),
        }
    }

    /// Reads exactly `length` bytes at `offset`, inline if the page cache has them.
    async fn read_data(&self, offset: u64, length: usize) -> Result<Bytes> {
        fileio::read_exact(
            &self.file,
            self.uring.as_ref(),
            &self.nowait_reads,
            offset,
            length,
        )
        .await
        .map(BytesMut::freeze)
        .map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                DataError::short_read(self.path.display(), offset, self.size).into()
            } else {
                self.io_error("read", offset, length as u64, e)
            }
        })
    }

    fn since_opened(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn inline_writes_allowed(&self, len: usize) -> bool {
        self.inline_writes.load(Ordering::Relaxed)
            && len <= MAX_INLINE_WRITE
            && self.since_opened() >= self.offload_writes_until.load(Ordering::Relaxed)
    }

    fn note_inline_write(&self, took: Duration) {
        if took > SLOW_INLINE_WRITE {
            let until = self.since_opened() + INLINE_WRITE_BACKOFF.as_nanos() as u64;
            self.offload_writes_until.store(until, Ordering::Relaxed);
            debug!(path = %self.path.display(), took_us = took.as_micros() as u64,
                   "slow inline write: offloading writes for a while");
        }
    }

    /// Where data starts in `[offset, end)` (`end` if nowhere); `offset` for block
    /// devices and filesystems without hole support.
    fn first_data(&self, offset: u64, end: u64) -> io::Result<u64> {
        if self.kind == Kind::BlockDevice {
            return Ok(offset);
        }
        match rustix::fs::seek(&*self.file, SeekFrom::Data(offset)) {
            Ok(d) => Ok(d.clamp(offset, end)),
            Err(Errno::NXIO) => Ok(end),
            Err(Errno::INVAL | Errno::OPNOTSUPP) => Ok(offset),
            Err(e) => Err(e.into()),
        }
    }

    /// Data and hole extents of `[offset, end)` (holes only exist in regular files).
    fn allocation(&self, offset: u64, end: u64, max: usize) -> io::Result<Vec<(u64, bool)>> {
        if self.kind == Kind::BlockDevice {
            return Ok(vec![(end - offset, false)]);
        }
        allocation_extents(&self.file, offset, end, max)
    }

    /// Writes `data` at `offset`: inline when the page cache takes it at once, else on
    /// the I/O engine.
    async fn write_data(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        let length = data.len() as u64;
        let mut done = 0;
        if !fua && self.nowait_writes.load(Ordering::Relaxed) {
            while done < data.len() {
                let iov = [IoSlice::new(&data[done..])];
                match rustix::io::pwritev2(
                    &*self.file,
                    &iov,
                    offset + done as u64,
                    ReadWriteFlags::NOWAIT,
                ) {
                    Ok(n) => done += n,
                    Err(Errno::AGAIN) => break,
                    Err(Errno::INTR) => {}
                    Err(Errno::OPNOTSUPP | Errno::INVAL | Errno::NOSYS) => {
                        self.nowait_writes.store(false, Ordering::Relaxed);
                        break;
                    }
                    Err(e) => return Err(self.io_error("write", offset, length, e.into())),
                }
            }
            if done == data.len() {
                return Ok(());
            }
        }
        let rest = data.slice(done..);
        let start = offset + done as u64;
        if !fua && self.inline_writes_allowed(rest.len()) {
            let began = Instant::now();
            let result = self.file.write_all_at(&rest, start);
            self.note_inline_write(began.elapsed());
            return result.map_err(|e| self.io_error("write", offset, length, e));
        }
        if let Some(engine) = &self.uring {
            // FUA is `RWF_DSYNC` on this write: durable, as NBD asks, without syncing
            // everything else dirty in the file.
            return engine
                .write_all_at(&self.file, rest, start, fua)
                .await
                .map_err(|e| self.io_error("write", offset, length, e));
        }
        self.blocking("write", offset, length, move |file| {
            file.write_all_at(&rest, start)?;
            if fua {
                file.sync_data()?;
            }
            Ok(())
        })
        .await
    }

    /// True if a write of `length` bytes at `offset` changes bytes format detection reads.
    fn touches_probed_bytes(&self, offset: u64, length: u64) -> bool {
        let end = offset + length;
        let overlaps = |start: u64, len: u64| offset < start + len && start < end;
        overlaps(0, PROBE_HEAD_LEN)
            || (self.size >= PROBE_TAIL_MIN_SIZE
                && overlaps(self.size - PROBE_TAIL_FROM_END, PROBE_TAIL_LEN))
    }

    /// Fails with [`Error::FormatChangeRefused`] if the image, with `data` written at
    /// `offset`, would be detected as anything but raw. Call with the guard held.
    async fn refuse_format_change(&self, offset: u64, data: &[u8]) -> Result<()> {
        let head_len = PROBE_HEAD_LEN.min(self.size);
        let mut head = self.read_data(0, head_len as usize).await?.to_vec();
        overlay(&mut head, 0, offset, data);
        let tail = if self.size >= PROBE_TAIL_MIN_SIZE {
            let at = self.size - PROBE_TAIL_FROM_END;
            let mut tail = self.read_data(at, PROBE_TAIL_LEN as usize).await?.to_vec();
            overlay(&mut tail, at, offset, data);
            Some(tail)
        } else {
            None
        };
        let found = match probe(&head, tail.as_deref()) {
            Probed::Format(Format::Raw) => return Ok(()),
            Probed::Format(format) => format.name(),
            Probed::Refused(name, _) => name,
        };
        tracing::warn!(
            path = %self.path.display(),
            offset,
            length = data.len(),
            "refused a write that would make this raw image (its format was detected, not given) detect as {found}; serve it with --format raw to allow such writes"
        );
        Err(DataError::format_change(self.path.display(), offset, found).into())
    }
}

/// Copies the part of `data` (written at `offset`) that falls in `buf` (which holds
/// the bytes at `buf_at`) into `buf`.
fn overlay(buf: &mut [u8], buf_at: u64, offset: u64, data: &[u8]) {
    let start = offset.max(buf_at);
    let end = (offset + data.len() as u64).min(buf_at + buf.len() as u64);
    if start < end {
        let (b, d) = ((start - buf_at) as usize, (start - offset) as usize);
        let n = (end - start) as usize;
        buf[b..b + n].copy_from_slice(&data[d..d + n]);
    }
}

/// Walks `SEEK_DATA`/`SEEK_HOLE` over `[offset, end)`; `(length, is_hole)` pairs.
/// Filesystems without hole support report everything as data.
fn allocation_extents(
    file: &File,
    offset: u64,
    end: u64,
    max: usize,
) -> io::Result<Vec<(u64, bool)>> {
    let mut out = Vec::new();
    let mut pos = offset;
    while pos < end && out.len() < max {
        let data = match rustix::fs::seek(file, SeekFrom::Data(pos)) {
            Ok(d) => d.min(end),
            Err(Errno::NXIO) => end, // no data after pos: hole up to the end
            Err(Errno::INVAL | Errno::OPNOTSUPP) => {
                out.push((end - pos, false));
                return Ok(out);
            }
            Err(e) => return Err(e.into()),
        };
        if data > pos {
            out.push((data - pos, true));
            pos = data;
            continue;
        }
        let hole = match rustix::fs::seek(file, SeekFrom::Hole(pos)) {
            Ok(h) => h.min(end),
            Err(Errno::NXIO) => end,
            Err(e) => return Err(e.into()),
        };
        // A hole before pos cannot happen (pos is in data); guard against looping.
        let hole = hole.max(pos + 1).min(end);
        out.push((hole - pos, false));
        pos = hole;
    }
    Ok(out)
}

/// Reads `/sys/dev/block/M:m/queue/rotational` (or the parent disk's for a partition).
fn is_rotational(rdev: u64) -> bool {
    let (major, minor) = (rustix::fs::major(rdev), rustix::fs::minor(rdev));
    let base = format!("/sys/dev/block/{major}:{minor}");
    [
        format!("{base}/queue/rotational"),
        format!("{base}/../queue/rotational"),
    ]
    .iter()
    .find_map(|p| std::fs::read_to_string(p).ok())
    .is_some_and(|s| s.trim() == "1")
}

/// `BLKDISCARD`: `_IO(0x12, 119)`, argument `u64[2]` (start, length).
const BLKDISCARD: libc::c_ulong = 0x1277;
/// `BLKZEROOUT`: `_IO(0x12, 127)`, argument `u64[2]`; zeroes without unmapping.
const BLKZEROOUT: libc::c_ulong = 0x127f;

fn block_range_ioctl(
    file: &File,
    request: libc::c_ulong,
    offset: u64,
    length: u64,
) -> io::Result<()> {
    let range: [u64; 2] = [offset, length];
    // SAFETY: BLKDISCARD and BLKZEROOUT read exactly one `u64[2]` through the pointer,
    // which points at a live, properly aligned local array for the whole call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), request, range.as_ptr()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn fallocate(file: &File, flags: FallocateFlags, offset: u64, length: u64) -> io::Result<()> {
    rustix::fs::fallocate(file, flags, offset, length).map_err(io::Error::from)
}

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL | libc::ENOTTY)
    )
}

fn write_zeroes_slowly(file: &File, offset: u64, length: u64) -> io::Result<()> {
    let zeroes = vec![0u8; ZERO_WRITE_CHUNK.min(length) as usize];
    let mut pos = offset;
    let end = offset + length;
    while pos < end {
        let n = (end - pos).min(zeroes.len() as u64) as usize;
        file.write_all_at(&zeroes[..n], pos)?;
        pos += n as u64;
    }
    Ok(())
}

#[async_trait]
impl Export for RawExport {
    fn size(&self) -> u64 {
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        let writable = !self.read_only;
        Capabilities {
            read_only: self.read_only,
            flush: true,
            fua: true,
            trim: writable,
            write_zeroes: writable,
            fast_zero: writable,
            cache: true,
            multi_conn: true,
            rotational: self.rotational,
        }
    }

    fn block_sizes(&self) -> BlockSizes {
        self.block_sizes
    }

    fn description(&self) -> Option<String> {
        let name = self.path.file_name().map_or_else(
            || self.path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        Some(match self.kind {
            Kind::RegularFile => format!("raw image {name}"),
            Kind::BlockDevice => format!("block device {}", self.path.display()),
        })
    }

    async fn read(&self, offset: u64, length: u32) -> Result<Vec<ReadChunk>> {
        // One SEEK_DATA per read: a leading hole goes out as zeroes without being read,
        // the rest is read as data (a hole inside it reads as zeroes). Walking every
        // extent with SEEK_HOLE would scan to the end of the file on ext4 for each read.
        // Reads shorter than `HOLE_PROBE_MIN` skip the probe: a syscall per small read
        // costs more than sending a few KiB of zeroes now and then.
        let end = offset + u64::from(length);
        let data = if length < HOLE_PROBE_MIN {
            offset
        } else {
            self.first_data(offset, end)
                .map_err(|e| self.io_error("seek", offset, u64::from(length), e))?
        };
        let mut chunks = Vec::with_capacity(2);
        if data > offset {
            chunks.push(ReadChunk::Zero(data - offset));
        }
        if data < end {
            chunks.push(ReadChunk::Data(
                self.read_data(data, (end - data) as usize).await?,
            ));
        }
        Ok(chunks)
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        if self.read_only {
            return Err(DataError::read_only(self.path.display()).into());
        }
        if let Some(guard) = &self.probe_guard
            && self.touches_probed_bytes(offset, data.len() as u64)
        {
            let _serialized = guard.serialize.lock().await;
            self.refuse_format_change(offset, &data).await?;
            return self.write_data(offset, data, fua).await;
        }
        self.write_data(offset, data, fua).await
    }

    async fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        if let Some(engine) = &self.uring {
            return engine
                .fdatasync(&self.file)
                .await
                .map_err(|e| self.io_error("flush", 0, self.size, e));
        }
        self.blocking("flush", 0, self.size, |file| file.sync_data())
            .await
    }

    async fn trim(&self, offset: u64, length: u64, fua: bool) -> Result<()> {
        if self.read_only {
            return Err(DataError::read_only(self.path.display()).into());
        }
        let kind = self.kind;
        let sector = u64::from(self.block_sizes.minimum.max(512));
        self.blocking("trim", offset, length, move |file| {
            let result = match kind {
                Kind::RegularFile => fallocate(
                    file,
                    FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
                    offset,
                    length,
                ),
                Kind::BlockDevice => {
                    // Discard only whole sectors inside the range.
                    let start = offset.div_ceil(sector) * sector;
                    let end = (offset + length) / sector * sector;
                    if end > start {
                        block_range_ioctl(file, BLKDISCARD, start, end - start)
                    } else {
                        Ok(())
                    }
                }
            };
            match result {
                // A trim is a hint: a store that cannot discard keeps the data.
                Err(e) if unsupported(&e) => {}
                other => other?,
            }
            if fua {
                file.sync_data()?;
            }
            Ok(())
        })
        .await
    }

    async fn write_zeroes(&self, offset: u64, length: u64, flags: ZeroFlags) -> Result<()> {
        if self.read_only {
            return Err(DataError::read_only(self.path.display()).into());
        }
        let kind = self.kind;
        let done = self
            .blocking("write zeroes", offset, length, move |file| {
                let punch = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
                let zero_range = FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE;
                // Fast paths first. On block devices a punch is a zero-out that may
                // unmap and never falls back to writing.
                if !flags.no_hole {
                    match fallocate(file, punch, offset, length) {
                        Ok(()) => return finish_zeroes(file, flags.fua).map(|()| true),
                        Err(e) if unsupported(&e) => {}
                        Err(e) => return Err(e),
                    }
                }
                if kind == Kind::RegularFile {
                    // Allocated, unwritten extents: fast and keeps the range allocated.
                    match fallocate(file, zero_range, offset, length) {
                        Ok(()) => return finish_zeroes(file, flags.fua).map(|()| true),
                        Err(e) if unsupported(&e) => {}
                        Err(e) => return Err(e),
                    }
                }
                if flags.fast {
                    return Ok(false);
                }
                match kind {
                    Kind::BlockDevice => block_range_ioctl(file, BLKZEROOUT, offset, length)?,
                    Kind::RegularFile => write_zeroes_slowly(file, offset, length)?,
                }
                finish_zeroes(file, flags.fua).map(|()| true)
            })
            .await?;
        if done {
            Ok(())
        } else {
            Err(DataError::not_fast(self.path.display(), offset, length).into())
        }
    }

    async fn cache(&self, offset: u64, length: u64) -> Result<()> {
        self.blocking("cache", offset, length, move |file| {
            let len = std::num::NonZeroU64::new(length);
            rustix::fs::fadvise(file, offset, len, rustix::fs::Advice::WillNeed)
                .map_err(io::Error::from)
        })
        .await
    }

    fn meta_contexts(&self) -> &[&'static str] {
        &[BASE_ALLOCATION, ALLOCATION_DEPTH]
    }

    async fn block_status(&self, q: StatusQuery) -> Result<Vec<Extent>> {
        let (offset, length) = (q.offset, q.length);
        if q.context == 1 {
            // A raw file is one layer that allocates everything, as qemu-nbd -A says.
            return Ok(vec![Extent { length, flags: 1 }]);
        }
        let end = offset + length;
        let extents = self
            .allocation(offset, end, q.max_extents.clamp(1, MAX_EXTENTS))
            .map_err(|e| self.io_error("seek", offset, length, e))?;
        Ok(extents
            .into_iter()
            .map(|(length, hole)| Extent {
                length,
                flags: if hole {
                    u64::from(state::HOLE | state::ZERO)
                } else {
                    0
                },
            })
            .collect())
    }
}

fn finish_zeroes(file: &File, fua: bool) -> io::Result<()> {
    if fua { file.sync_data() } else { Ok(()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sparse_file(len: u64, data_at: &[(u64, &[u8])]) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(len).unwrap();
        for (off, bytes) in data_at {
            f.as_file().write_all_at(bytes, *off).unwrap();
        }
        f
    }

    fn query(offset: u64, length: u64, max_extents: usize) -> StatusQuery {
        StatusQuery {
            context: 0,
            offset,
            length,
            max_extents,
        }
    }

    fn flatten(chunks: &[ReadChunk]) -> Vec<u8> {
        let mut flat = Vec::new();
        for c in chunks {
            match c {
                ReadChunk::Data(b) => flat.extend_from_slice(b),
                ReadChunk::Zero(n) => flat.extend(std::iter::repeat_n(0, *n as usize)),
            }
        }
        flat
    }

    /// How a test's reads and writes reach the file.
    #[derive(Debug, Clone, Copy)]
    enum Via {
        /// The default: `RWF_NOWAIT` inline first, the automatic engine behind it.
        Inline,
        /// Everything through the thread pool (the inline path is turned off).
        Threads,
        /// Everything through io_uring (the inline path is turned off).
        IoUring,
    }

    /// Opens `path` with `options` for the data path `via`; `None` (and a message) if
    /// io_uring is unavailable here.
    fn open_via(path: &Path, via: Via, options: RawOptions) -> Option<RawExport> {
        let io_engine = match via {
            Via::Inline => IoEngine::Auto,
            Via::Threads => IoEngine::Threads,
            Via::IoUring => IoEngine::IoUring,
        };
        let export = match RawExport::open(
            path,
            &RawOptions {
                io_engine,
                ..options
            },
        ) {
            Ok(export) => export,
            Err(e) if matches!(via, Via::IoUring) && matches!(e, Error::Open { .. }) => {
                eprintln!("skipping: {e}: {:?}", std::error::Error::source(&e));
                return None;
            }
            Err(e) => panic!("{e}"),
        };
        if !matches!(via, Via::Inline) {
            export.nowait_reads.store(false, Ordering::Relaxed);
            export.nowait_writes.store(false, Ordering::Relaxed);
            export.inline_writes.store(false, Ordering::Relaxed);
        }
        Some(export)
    }

    /// `open_via`, returning from the test when it skips.
    macro_rules! open {
        ($path:expr, $via:expr) => {
            open!($path, $via, RawOptions::default())
        };
        ($path:expr, $via:expr, $options:expr) => {
            match open_via($path, $via, $options) {
                Some(export) => export,
                None => return,
            }
        };
    }

    /// Defines each test once per data path, in modules `inline`, `threads` and
    /// `io_uring`; the body gets the path as its one argument.
    macro_rules! data_path_tests {
        ($(async fn $name:ident($via:ident: Via) $body:block)*) => {
            mod inline {
                use super::*;
                $(#[tokio::test] async fn $name() { let $via = Via::Inline; $body })*
            }
            mod threads {
                use super::*;
                $(#[tokio::test] async fn $name() { let $via = Via::Threads; $body })*
            }
            mod io_uring {
                use super::*;
                $(#[tokio::test] async fn $name() { let $via = Via::IoUring; $body })*
            }
        };
    }

    data_path_tests! {
        async fn read_returns_written_bytes_and_zero_for_holes(via: Via) {
            let f = sparse_file(4 << 20, &[(1 << 20, &[0xab; 4096])]);
            let export = open!(f.path(), via);
            let chunks = export.read(1 << 20, 8192).await.unwrap();
            let flat = flatten(&chunks);
            assert_eq!(&flat[..4096], &[0xab; 4096][..]);
            assert_eq!(&flat[4096..], &[0u8; 4096][..]);
        }

        async fn block_status_reports_holes_in_a_sparse_file(via: Via) {
            let f = sparse_file(4 << 20, &[(0, &[1; 65536])]);
            let export = open!(f.path(), via);
            let extents = export.block_status(query(0, 4 << 20, 100)).await.unwrap();
            assert_eq!(extents.iter().map(|e| e.length).sum::<u64>(), 4 << 20);
            assert_eq!(extents[0].flags, 0, "the written start is data");
            assert_eq!(
                extents.last().unwrap().flags,
                u64::from(state::HOLE | state::ZERO)
            );
        }

        async fn trim_punches_a_hole_that_reads_as_zeroes(via: Via) {
            let f = sparse_file(1 << 20, &[(0, &[7; 1 << 20])]);
            let export = open!(f.path(), via);
            export.trim(0, 1 << 20, false).await.unwrap();
            let chunks = export.read(0, 4096).await.unwrap();
            assert!(chunks.iter().all(|c| match c {
                ReadChunk::Zero(_) => true,
                ReadChunk::Data(b) => b.iter().all(|&x| x == 0),
            }));
        }

        async fn write_zeroes_with_no_hole_keeps_the_range_allocated(via: Via) {
            let f = sparse_file(1 << 20, &[(0, &[7; 1 << 20])]);
            let export = open!(f.path(), via);
            let flags = ZeroFlags {
                no_hole: true,
                ..ZeroFlags::default()
            };
            export.write_zeroes(0, 65536, flags).await.unwrap();
            let mut buf = vec![1u8; 65536];
            f.as_file().read_exact_at(&mut buf, 0).unwrap();
            assert!(buf.iter().all(|&x| x == 0));
            let extents = export.block_status(query(0, 65536, 10)).await.unwrap();
            assert_eq!(
                extents[0].flags & u64::from(state::HOLE),
                0,
                "no hole was punched"
            );
        }

        async fn writes_to_a_read_only_export_are_refused(via: Via) {
            let f = sparse_file(4096, &[]);
            let options = RawOptions {
                read_only: true,
                ..Default::default()
            };
            let export = open!(f.path(), via, options);
            let err = export
                .write(0, Bytes::from_static(b"x"), false)
                .await
                .unwrap_err();
            assert_eq!(err.nbd_errno(), crate::proto::errno::EPERM);
        }

        async fn a_write_reads_back_across_a_hole_boundary(via: Via) {
            // 3 blocks at 1 MiB - 4 KiB: the first lands in data, the rest in a hole.
            let f = sparse_file(4 << 20, &[(0, &[9; 1 << 20])]);
            let export = open!(f.path(), via);
            let data = Bytes::from((0..3 * 4096u32).map(|i| i as u8).collect::<Vec<u8>>());
            export.write((1 << 20) - 4096, data.clone(), false).await.unwrap();
            let chunks = export.read((1 << 20) - 4096, 3 * 4096).await.unwrap();
            assert_eq!(flatten(&chunks), data);
        }

        async fn a_fua_write_is_in_the_file_when_acknowledged(via: Via) {
            let f = sparse_file(1 << 20, &[]);
            let export = open!(f.path(), via);
            export
                .write(8192, Bytes::from_static(b"forced unit access"), true)
                .await
                .unwrap();
            let mut buf = [0u8; 18];
            f.as_file().read_exact_at(&mut buf, 8192).unwrap();
            assert_eq!(&buf, b"forced unit access");
        }

        async fn flush_after_writes_succeeds(via: Via) {
            let f = sparse_file(1 << 20, &[]);
            let export = open!(f.path(), via);
            export.write(0, Bytes::from(vec![5; 65536]), false).await.unwrap();
            export.flush().await.unwrap();
        }

        async fn reading_past_a_file_that_shrank_is_a_short_read(via: Via) {
            let f = sparse_file(8192, &[(0, &[3; 8192])]);
            let export = open!(f.path(), via);
            f.as_file().set_len(4096).unwrap();
            let err = export.read_data(0, 8192).await.unwrap_err();
            assert!(
                matches!(&err, Error::Data(e) if *e.kind() == crate::DataErrorKind::ShortRead { size: 8192 }),
                "{err:?}"
            );
        }
    }

    #[test]
    fn the_threads_engine_is_used_when_asked_for() {
        let f = sparse_file(4096, &[]);
        let options = RawOptions {
            io_engine: IoEngine::Threads,
            ..Default::default()
        };
        let export = RawExport::open(f.path(), &options).unwrap();
        assert_eq!(export.io_engine(), IoEngine::Threads);
    }

    #[test]
    fn the_io_uring_engine_is_used_when_asked_for() {
        let f = sparse_file(4096, &[]);
        let export = open!(f.path(), Via::IoUring);
        assert_eq!(export.io_engine(), IoEngine::IoUring);
    }

    #[test]
    fn opening_a_directory_is_refused_with_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let err = RawExport::open(dir.path(), &RawOptions::default()).unwrap_err();
        assert!(
            err.to_string().contains(&dir.path().display().to_string()),
            "{err}"
        );
    }
}
