//! The image export: a qcow2, VHD, VMDK or raw image and its backing chain, served
//! as the raw disk it describes: read-only, or for a qcow2 image opened with
//! [`ImageExport::open_writable`], read-write (writes, zeroes, trims and flushes run
//! the format's [`Qcow2Writer`] on the request's thread, at most
//! [`WRITE_CONCURRENCY`] at once; the layers below stay read-only). A write that needs
//! no I/O but its data's `pwrite` runs on the request's task itself
//! ([`Qcow2Writer::try_write`]) until one such write takes longer than a copy into the
//! page cache should (the kernel throttles writers when too much of it is dirty).
//!
//! `thinline-format` maps each request into a plan (host ranges, compressed units,
//! zeroes); this module executes it. Mapping is first tried from the metadata cache on
//! the request's task ([`Fetch::CachedOnly`]); a miss maps again on the blocking pool,
//! which may read tables (concurrent misses of one table wait for a single read, see
//! [`thinline_format::MetadataCache`]; the pool's size is the runtime builder's choice,
//! and `thinline serve` bounds it). Data ranges in local files are read like the raw export does
//! (inline `RWF_NOWAIT` for page-cache hits, then io_uring or threads); a compressed
//! unit alone in a request, of a local file or a remote store, is read the same way (or
//! through the store's range reader) and decoded in the request's own task, longer runs
//! and other sources on the blocking pool; zero and unallocated ranges are sent as holes
//! without any I/O.
//!
//! Block status answers `base:allocation` through the whole chain and
//! `qemu:allocation-depth` (0 = in no layer, 1 = the top image, 2 = its backing, …),
//! the way `qemu-nbd -A` does.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use bytes::BytesMut;
use thinline_format::qcow2::{Qcow2Writer, ZeroMode};
use thinline_format::{
    Allocation, DataPath, Extent, Fetch, Image, OpenOptions, Place, RangeReader,
};

use crate::decoded::{DecodedUnits, Lookup, UnitKey};
use crate::export::{Capabilities, Export, Extent as NbdExtent, ReadChunk, StatusQuery, ZeroFlags};
use crate::proto::{ALLOCATION_DEPTH, BASE_ALLOCATION, state};
use crate::raw::IoEngine;
use crate::uring::{self, IoUringEngine};
use crate::{DataError, Error, Result, fileio};

const CONTEXTS: [&str; 2] = [BASE_ALLOCATION, ALLOCATION_DEPTH];

/// Writes of one image running at once. Buffered writes to one
/// file serialize on its inode lock, so more threads only add context switches: a few
/// keep the disk and the page cache busy. `THINLINE_WRITE_CONCURRENCY` overrides it
/// (for benchmarks).
pub const WRITE_CONCURRENCY: usize = 4;

fn write_concurrency() -> usize {
    std::env::var("THINLINE_WRITE_CONCURRENCY")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(WRITE_CONCURRENCY)
}

/// Largest write tried on the request's task ([`Qcow2Writer::try_write`]).
const INLINE_WRITE_MAX: usize = 1 << 20;
/// Compressed units up to this size are decoded in the request's task (at most about
/// 200 µs of one worker's time); larger ones, and runs of several, on the blocking pool.
const INLINE_DECODE_MAX: u64 = 128 << 10;
/// An inline write may take this long, plus [`INLINE_NS_PER_KIB`] per KiB, before
/// writes go off the task for [`INLINE_COOLDOWN`].
const INLINE_BASE: Duration = Duration::from_millis(1);
const INLINE_NS_PER_KIB: u64 = 1_000;
const INLINE_COOLDOWN: Duration = Duration::from_secs(1);

/// Whether writes may run on the request's own task. A `pwrite` into the page cache
/// takes microseconds, and running it in place saves the thread hand-off of
/// [`tokio::task::block_in_place`] (64 KiB random writes at queue depth 32: 1.4× the
/// throughput). But buffered writes cannot be asked not to block (ext4 refuses
/// `RWF_NOWAIT` for them), and the kernel throttles writers when too much of the page
/// cache is dirty: so once an inline write takes longer than a page-cache copy
/// should, every write goes off the task for a while.
#[derive(Debug)]
struct InlineWrites {
    epoch: Instant,
    /// Nanoseconds since `epoch` until which writes do not run inline.
    off_until: AtomicU64,
}

impl InlineWrites {
    fn new() -> InlineWrites {
        InlineWrites {
            epoch: Instant::now(),
            off_until: AtomicU64::new(0),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn allowed(&self, len: usize) -> bool {
        len <= INLINE_WRITE_MAX && self.now() >= self.off_until.load(Ordering::Relaxed)
    }

    /// Records that an inline write of `len` bytes started at `started` (nanoseconds).
    fn took(&self, started: u64, len: usize) {
        let now = self.now();
        let budget = INLINE_BASE.as_nanos() as u64 + (len as u64 / 1024) * INLINE_NS_PER_KIB;
        if now.saturating_sub(started) > budget {
            let until = now + INLINE_COOLDOWN.as_nanos() as u64;
            self.off_until.fetch_max(until, Ordering::Relaxed);
        }
    }
}

/// Most extents computed for one block-status request; clients ask again for the rest.
const MAX_EXTENTS: usize = 1 << 16;

/// How to open an image export.
#[derive(Debug, Clone, Default)]
pub struct ImageOptions {
    /// Format detection, chain depth, metadata cache budget.
    pub open: OpenOptions,
    /// How reads that miss the page cache are run.
    pub io_engine: IoEngine,
}

/// An export of an image chain (read-only unless opened writable).
#[derive(Debug)]
pub struct ImageExport {
    image: Arc<Image>,
    /// The top image's writer, when served read-write.
    writer: Option<Arc<Qcow2Writer>>,
    /// Bounds the writes running at once (see [`WRITE_CONCURRENCY`]).
    write_slots: Arc<tokio::sync::Semaphore>,
    inline_writes: InlineWrites,
    name: String,
    /// `paths[layer][file]`: how each storage's data bytes are read, chosen at open.
    paths: Vec<Vec<DataPath>>,
    nowait_reads: AtomicBool,
    uring: Option<IoUringEngine>,
    /// Compressed units decoded lately (see [`Self::decode_inline`]).
    decoded: DecodedUnits,
}

impl ImageExport {
    /// Opens the image at `path` (and its backing chain).
    pub fn open(path: &Path, options: &ImageOptions) -> Result<Self> {
        let image = Image::open(path, &options.open)?;
        Self::from_image(image, options.io_engine)
    }

    /// Serves an already opened image.
    pub fn from_image(image: Image, io_engine: IoEngine) -> Result<Self> {
        let name = image.layers()[0].files()[0].name().to_owned();
        let paths = image
            .layers()
            .iter()
            .map(|layer| layer.files().iter().map(|s| s.data_path()).collect())
            .collect();
        let uring =
            match io_engine {
                IoEngine::Threads => None,
                IoEngine::IoUring => Some(IoUringEngine::new(uring::DEFAULT_DEPTH).map_err(
                    |e| Error::Open {
                        path: name.clone().into(),
                        source: e.into_io(),
                    },
                )?),
                IoEngine::Auto => IoUringEngine::new(uring::DEFAULT_DEPTH).ok(),
            };
        Ok(ImageExport {
            image: Arc::new(image),
            writer: None,
            write_slots: Arc::new(tokio::sync::Semaphore::new(write_concurrency())),
            inline_writes: InlineWrites::new(),
            name,
            paths,
            nowait_reads: AtomicBool::new(true),
            uring,
            decoded: DecodedUnits::default(),
        })
    }

    /// Opens the qcow2 image at `path` read-write (locked against other writers, qemu
    /// included); its backing chain is opened read-only.
    pub fn open_writable(path: &Path, options: &ImageOptions) -> Result<Self> {
        let (image, writer) = Image::open_writable(path, &options.open)?;
        let mut export = Self::from_image(image, options.io_engine)?;
        export.writer = Some(writer);
        Ok(export)
    }

    /// Runs `op` with the writer and the image (for reads below the top). On a
    /// multi-threaded runtime it runs in place ([`tokio::task::block_in_place`]: the
    /// worker's other tasks move to another thread), which saves the two thread
    /// wake-ups of a blocking-pool task (4 KiB writes at queue depth 1 went from 0.9–1.05×
    /// to 1.6–1.7× of qemu-nbd); each request is its own task, so only this request
    /// waits. Elsewhere it runs on the blocking pool.
    async fn write_op(
        &self,
        op: impl FnOnce(&Qcow2Writer, &Image) -> thinline_format::Result<()> + Send + 'static,
    ) -> Result<()> {
        let Some(writer) = self.writer.clone() else {
            return Err(self.refuse_write());
        };
        let image = Arc::clone(&self.image);
        let _slot = self.write_slots.acquire().await;
        if tokio::runtime::Handle::current().runtime_flavor()
            == tokio::runtime::RuntimeFlavor::MultiThread
        {
            return tokio::task::block_in_place(|| Ok(op(&writer, &image)?));
        }
        blocking(move || Ok(op(&writer, &image)?)).await
    }

    /// The image being served.
    pub fn image(&self) -> &Image {
        &self.image
    }

    /// What pins this template's bytes, for caches keyed by it: the format and size,
    /// then one line per file of the chain: its name and identity (a local file's
    /// device, inode, size and modification time; a remote object's size and ETag,
    /// version or modification time). Any change to any layer changes the string.
    pub fn template_identity(&self) -> String {
        use std::os::unix::fs::MetadataExt;
        let mut out = format!(
            "{} image, {} bytes",
            self.image.layers()[0].format(),
            self.image.size()
        );
        for (layer, paths) in self.image.layers().iter().zip(&self.paths) {
            for (storage, path) in layer.files().iter().zip(paths) {
                let local = path.file().and_then(|f| f.metadata().ok()).map(|m| {
                    format!(
                        " size {} mtime {}.{:09}",
                        m.size(),
                        m.mtime(),
                        m.mtime_nsec()
                    )
                });
                out.push_str(&format!(
                    "\n{}: {}{}",
                    storage.name(),
                    storage.identity(),
                    local.unwrap_or_default()
                ));
            }
        }
        out
    }

    /// Maps a whole read, from the cache inline or on the blocking pool on a miss.
    async fn map(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        let mut extents = Vec::new();
        match self
            .image
            .map(offset, length, Fetch::CachedOnly, usize::MAX, &mut extents)
        {
            Ok(_) => return Ok(extents),
            Err(thinline_format::Error::NotCached) => {}
            Err(e) => return Err(e.into()),
        }
        let image = Arc::clone(&self.image);
        blocking(move || {
            let mut extents = Vec::new();
            image.map(offset, length, Fetch::Allowed, usize::MAX, &mut extents)?;
            Ok(extents)
        })
        .await
    }

    async fn allocation(&self, offset: u64, length: u64, max: usize) -> Result<Vec<Allocation>> {
        match self
            .image
            .allocation(offset, length, Fetch::CachedOnly, max)
        {
            Ok(a) => return Ok(a),
            Err(thinline_format::Error::NotCached) => {}
            Err(e) => return Err(e.into()),
        }
        let image = Arc::clone(&self.image);
        blocking(move || Ok(image.allocation(offset, length, Fetch::Allowed, max)?)).await
    }

    /// Reads `length` bytes at `offset` of a layer's local file the fast way
    /// ([`fileio`]); an error names the file and `op`.
    async fn read_local(
        &self,
        f: &Arc<std::fs::File>,
        (layer, file): (usize, usize),
        op: &'static str,
        offset: u64,
        length: usize,
    ) -> Result<BytesMut> {
        fileio::read_exact(f, self.uring.as_ref(), &self.nowait_reads, offset, length)
            .await
            .map_err(|source| {
                Error::Format(thinline_format::Error::Io {
                    path: self.image.layers()[layer].files()[file].name().to_owned(),
                    op,
                    offset,
                    length: length as u64,
                    source,
                })
            })
    }

    /// Reads one compressed extent of a local file or a remote store: its input the fast
    /// way (a local file as [`Self::read_local`] does, a remote store through its range
    /// reader), then decodes it in this request's own task (no hand-off to the blocking
    /// pool and back, which at queue depth 1 cost as much as the decoding). The task
    /// first yields, so the connection's reader goes on to the next request and another
    /// worker may take this one: requests in flight together still decode in parallel.
    ///
    /// Units of read-only layers are kept in [`DecodedUnits`] for the reads of their other
    /// blocks: a read that finds its bytes there slices them.
    async fn decode_inline(
        &self,
        extent: &Extent,
        skip: usize,
        source: UnitSource<'_>,
    ) -> Result<ReadChunk> {
        let input = self.image.compressed_input(extent)?;
        let end = input.decoded_len();
        // The writable top layer's clusters change place as they are written: not kept.
        let key = (input.layer > 0 || self.writer.is_none()).then_some(UnitKey {
            layer: input.layer,
            file: input.file,
            offset: input.offset,
            length: input.length,
        });
        // The whole unit is decoded to be kept when its neighbours are being read, or when
        // that costs no more than the part this read needs.
        let decode_whole = match key.map(|key| self.decoded.get(key, skip, end)) {
            Some(Lookup::Hit(bytes)) => return Ok(ReadChunk::Data(bytes)),
            Some(Lookup::Shorter) => true,
            Some(Lookup::Miss) => !input.partial_decode_is_cheaper(),
            None => false,
        };
        let bytes = match source {
            UnitSource::File(f) => {
                let at = (input.layer, input.file);
                self.read_local(f, at, "read compressed data", input.offset, input.length)
                    .await?
                    .freeze()
            }
            UnitSource::Ranges(reader) => reader
                .read_range(input.offset, input.length as u64)
                .await
                .map_err(DataError::source)?,
        };
        tokio::task::yield_now().await;
        // A unit whose stream ends early fails to decode whole; its prefix still serves.
        let whole = decode_whole
            .then(|| self.image.decode_unit(&input.whole_unit(), &bytes).ok())
            .flatten();
        let (unit, kept) = match whole {
            Some(whole) => {
                let whole = Bytes::from(whole);
                (whole.clone(), whole)
            }
            // A partial prefix is not worth keeping (random reads rarely come back, and a
            // buffer kept is one the next decode cannot reuse while it is warm): an empty
            // one marks the unit as read, so that the next read of it decodes it whole.
            None => (
                Bytes::from(self.image.decode_unit(&input, &bytes)?),
                Bytes::new(),
            ),
        };
        if let Some(key) = key {
            self.decoded.keep(key, kept);
        }
        Ok(ReadChunk::Data(unit.slice(skip..end)))
    }

    /// Reads a run of extents: zeroes without I/O, data in local files through
    /// [`fileio`] and in remote stores through their range readers, one compressed unit
    /// of either in this task ([`Self::decode_inline`]), anything else (several
    /// compressed units, storage with blocking reads only) on the blocking pool in one
    /// task.
    async fn read_run(&self, run: &[Extent]) -> Result<ReadChunk> {
        if let [extent] = run {
            match extent.place {
                Place::Zero { .. } | Place::Unallocated => {
                    return Ok(ReadChunk::Zero(extent.length));
                }
                Place::Data {
                    layer,
                    file,
                    offset,
                    ..
                } => match &self.paths[layer][file] {
                    DataPath::File(f) => {
                        let length = extent.length as usize;
                        let data = self
                            .read_local(f, (layer, file), "read", offset, length)
                            .await?;
                        return Ok(ReadChunk::Data(data.freeze()));
                    }
                    DataPath::Ranges(reader) => {
                        return reader
                            .read_range(offset, extent.length)
                            .await
                            .map(ReadChunk::Data)
                            .map_err(|e| DataError::source(e).into());
                    }
                    DataPath::Blocking => {}
                },
                Place::Compressed {
                    layer,
                    file,
                    unit_size,
                    skip,
                    ..
                } if unit_size <= INLINE_DECODE_MAX => {
                    let source = match &self.paths[layer][file] {
                        DataPath::File(f) => Some(UnitSource::File(f)),
                        DataPath::Ranges(reader) => Some(UnitSource::Ranges(&**reader)),
                        DataPath::Blocking => None,
                    };
                    if let Some(source) = source {
                        return self.decode_inline(extent, skip as usize, source).await;
                    }
                }
                _ => {}
            }
        }
        let batch = run.to_vec();
        let image = Arc::clone(&self.image);
        blocking(move || {
            let total = batch.iter().map(|e| e.length as usize).sum();
            let mut buf = BytesMut::zeroed(total);
            let mut pos = 0;
            for extent in &batch {
                let len = extent.length as usize;
                image.read_extent(extent, &mut buf[pos..pos + len])?;
                pos += len;
            }
            Ok(ReadChunk::Data(buf.freeze()))
        })
        .await
    }
}

/// Where [`ImageExport::decode_inline`] reads a unit's compressed bytes from.
#[derive(Clone, Copy)]
enum UnitSource<'a> {
    File(&'a Arc<std::fs::File>),
    Ranges(&'a dyn RangeReader),
}

impl Drop for ImageExport {
    /// A writable image is flushed when its last connection and the server let go.
    fn drop(&mut self) {
        if let Some(writer) = &self.writer
            && let Err(e) = writer.flush()
        {
            tracing::error!(image = %self.name, error = %e.detail(), "flush on close failed");
        }
    }
}

/// Runs format code that may block on the blocking pool.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|join| {
        Err(Error::Format(thinline_format::Error::Io {
            path: String::new(),
            op: "mapping",
            offset: 0,
            length: 0,
            source: std::io::Error::other(join.to_string()),
        }))
    })
}

#[async_trait]
impl Export for ImageExport {
    fn size(&self) -> u64 {
        self.image.size()
    }

    fn capabilities(&self) -> Capabilities {
        if self.writer.is_some() {
            Capabilities {
                read_only: false,
                flush: true,
                fua: true,
                trim: true,
                write_zeroes: true,
                fast_zero: true,
                ..Capabilities::READ_ONLY
            }
        } else {
            Capabilities::READ_ONLY
        }
    }

    fn description(&self) -> Option<String> {
        let top = &self.image.layers()[0];
        let file = Path::new(&self.name)
            .file_name()
            .map_or_else(|| self.name.clone(), |n| n.to_string_lossy().into_owned());
        let depth = self.image.layers().len();
        Some(if depth > 1 {
            format!("{} image {file} (chain of {depth})", top.format())
        } else {
            format!("{} image {file}", top.format())
        })
    }

    fn meta_contexts(&self) -> &[&'static str] {
        &CONTEXTS
    }

    async fn read(&self, offset: u64, length: u32) -> Result<Vec<ReadChunk>> {
        let extents = self.map(offset, u64::from(length)).await?;
        // Consecutive compressed extents are decoded together in one blocking task;
        // the runs are read concurrently (remote units are fetched in parallel).
        let mut runs = Vec::new();
        let mut rest = &extents[..];
        while !rest.is_empty() {
            let n = rest
                .iter()
                .take_while(|e| matches!(e.place, Place::Compressed { .. }))
                .count()
                .max(1);
            runs.push(&rest[..n]);
            rest = &rest[n..];
        }
        let produced = if let [run] = runs.as_slice() {
            vec![self.read_run(run).await?]
        } else {
            futures_util::future::try_join_all(runs.iter().map(|run| self.read_run(run))).await?
        };
        Ok(crate::export::merge_zero_runs(produced))
    }

    fn refuse_write(&self) -> Error {
        DataError::read_only(&self.name).into()
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        if let Some(writer) = &self.writer
            && !fua
            && self.inline_writes.allowed(data.len())
        {
            let tried = {
                let _slot = self.write_slots.acquire().await;
                let started = self.inline_writes.now();
                let tried = writer.try_write(offset, &data);
                self.inline_writes.took(started, data.len());
                tried
            };
            match tried {
                Ok(()) => {
                    if writer.write_back_due() {
                        self.write_op(|w, _| w.write_back_if_due()).await?;
                    }
                    return Ok(());
                }
                // Needs a read or a wait first: done in full below.
                Err(thinline_format::Error::NotCached) => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.write_op(move |w, image| w.write(image, offset, &data, fua))
            .await
    }

    async fn flush(&self) -> Result<()> {
        if self.writer.is_none() {
            return Ok(());
        }
        self.write_op(|w, _| w.flush()).await
    }

    async fn trim(&self, offset: u64, length: u64, fua: bool) -> Result<()> {
        let mode = ZeroMode {
            trim: true,
            ..ZeroMode::default()
        };
        self.write_op(move |w, image| w.write_zeroes(image, offset, length, mode, fua))
            .await
    }

    async fn write_zeroes(&self, offset: u64, length: u64, flags: ZeroFlags) -> Result<()> {
        let mode = ZeroMode {
            no_hole: flags.no_hole,
            fast: flags.fast,
            trim: false,
        };
        self.write_op(move |w, image| w.write_zeroes(image, offset, length, mode, flags.fua))
            .await
    }

    async fn block_status(&self, q: StatusQuery) -> Result<Vec<NbdExtent>> {
        let (offset, length) = (q.offset, q.length);
        let allocation = self
            .allocation(offset, length, q.max_extents.clamp(1, MAX_EXTENTS))
            .await?;
        Ok(allocation
            .into_iter()
            .map(|a| NbdExtent {
                length: a.length,
                flags: if q.context == 0 {
                    u64::from(
                        (if a.hole { state::HOLE } else { 0 })
                            | (if a.zero { state::ZERO } else { 0 }),
                    )
                } else {
                    u64::from(a.depth)
                },
            })
            .collect())
    }
}
