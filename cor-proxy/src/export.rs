//! The copy-on-read export: reads served from the cache when present, else fetched
//! from the upstream once (whatever the number of readers), returned, written to the
//! cache and marked present once durable.
//!
//! ```text
//!  read ─► per fetch unit: all chunks present? ──yes──► pread the cache
//!                 │ no
//!                 ▼
//!          in-flight map[unit] ─► exists: wait for it   (one fetch per unit, all clients)
//!                 │ absent: create, spawn the fetch
//!                 ▼
//!          upstream read of the absent chunk runs ─► waiters get the bytes
//!                 ▼
//!          pwrite (holes: punched) ─► batcher: fsync, set bits, write map pages,
//!                                     drop the in-flight entry
//! ```
//!
//! Until a chunk's bit is set, readers get its bytes from the in-flight entry in
//! memory, never from the cache file, so a chunk is served from the cache only once its
//! data is durable. Each chunk's checksum is written with its data; a chunk this
//! process did not fetch is checked against it the first time it is read from disk,
//! and one that does not match is logged, forgotten and fetched again (the client gets
//! the upstream's bytes). The export is read-only: it is a dm-thin external origin and the
//! cache holds the template, never a clone's writes.
//!
//! A cache that cannot be written (ENOSPC, EDQUOT, an I/O error) turns the export into a
//! pass-through: reads still fetch (and share fetches), nothing more is written, and
//! the condition is logged once. A failed upstream read fails the reads waiting for it
//! with the upstream's errno and is never marked; the next read fetches again.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use thinline_nbd::export::{BlockSizes, Capabilities, Export, Extent, ReadChunk};
use thinline_nbd::proto::{ALLOCATION_DEPTH, BASE_ALLOCATION, errno};
use thinline_nbd::{Error, LocalFileReader, Result};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};

use crate::cache::{CacheFile, CacheOptions, DEFAULT_CHUNK_SIZE, OnMismatch};
use crate::prefetch::{PrefetchOptions, PrefetchProgress};
use crate::status::Status;
use crate::upstream::Upstream;

const CONTEXTS: [&str; 2] = [BASE_ALLOCATION, ALLOCATION_DEPTH];

/// Default fetch unit: one upstream read fills this many bytes of chunks.
pub const DEFAULT_FETCH_UNIT: u64 = 1 << 20;
/// Default number of upstream fetches in flight (demand and prefetch together).
pub const DEFAULT_MAX_FETCHES: usize = 16;
/// Default number of units fetched on each side of a missed one.
pub const DEFAULT_FETCH_AROUND: u64 = 4;
/// Filled units wait at most this long for the fsync that makes them present.
const SYNC_INTERVAL: Duration = Duration::from_millis(20);
/// Most filled units made durable by one fsync.
const SYNC_BATCH: usize = 256;

/// How to open a copy-on-read export.
#[derive(Debug, Clone)]
pub struct CorOptions {
    /// Presence granularity of a new cache.
    pub chunk_size: u64,
    /// Bytes fetched per miss (a power of two, at least the chunk size).
    pub fetch_unit: u64,
    /// Upstream fetches in flight at most.
    pub max_fetches: usize,
    /// Units fetched at most on each side of a missed unit, in parallel with it and
    /// only while fetch slots are free: file systems keep related blocks close, and on
    /// a high-latency upstream a neighbour fetched now costs bandwidth, not a round
    /// trip later. Fewer when the upstream moves fewer units in one round trip (as
    /// measured by the misses); 0 turns it off.
    pub fetch_around: u64,
    /// What to do with a cache made for another template version.
    pub on_mismatch: OnMismatch,
    /// Who opens the cache, recorded for a refused second owner.
    pub holder: String,
    /// Hydrate the whole template in the background.
    pub prefetch: Option<PrefetchOptions>,
    /// Follow a cache path that is a symbolic link to a block device (`/dev/VG/LV`).
    pub follow_device_links: bool,
}

impl Default for CorOptions {
    fn default() -> Self {
        CorOptions {
            chunk_size: DEFAULT_CHUNK_SIZE,
            fetch_unit: DEFAULT_FETCH_UNIT,
            max_fetches: DEFAULT_MAX_FETCHES,
            fetch_around: DEFAULT_FETCH_AROUND,
            on_mismatch: OnMismatch::Refuse,
            holder: format!("pid {}", std::process::id()),
            prefetch: None,
            follow_device_links: false,
        }
    }
}

/// Counters, for `status` and the log.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) hits: AtomicU64,
    pub(crate) misses: AtomicU64,
    pub(crate) bytes_served: AtomicU64,
    pub(crate) upstream_reads: AtomicU64,
    pub(crate) upstream_bytes: AtomicU64,
    pub(crate) upstream_errors: AtomicU64,
    pub(crate) checksum_errors: AtomicU64,
    /// Fetches started ahead of a read: readahead and neighbours of a miss.
    pub(crate) speculative_fetches: AtomicU64,
    pub(crate) in_flight: AtomicUsize,
}

/// What one fetch produced: the absent chunk runs of a unit, in order.
#[derive(Debug)]
struct Fetched {
    pieces: Vec<(u64, ReadChunk)>,
}

type Outcome = std::result::Result<Arc<Fetched>, Arc<Error>>;
/// Where a fetch announces its outcome, and where readers wait for it.
type OutcomeTx = watch::Sender<Option<Outcome>>;
type OutcomeRx = watch::Receiver<Option<Outcome>>;
/// Byte ranges `(offset, length)`.
type Runs = Vec<(u64, u64)>;

/// A unit being fetched, or fetched and waiting to become durable.
#[derive(Debug)]
struct InFlight {
    done: watch::Receiver<Option<Outcome>>,
    /// The fetch unit's `(offset, length)`, for errors.
    range: (u64, u64),
    /// For a fetch a client read started: the chunk-aligned `[start, end)` that read
    /// needed, fetched by its own upstream requests, and their outcome, so readers
    /// inside it do not wait for the rest of the unit to arrive.
    first: Option<((u64, u64), OutcomeRx)>,
}

/// What asking for a unit's fetch found.
enum UnitFetch {
    /// Every chunk of the unit is present.
    Present,
    /// A fetch was already in flight.
    Joined(Arc<InFlight>),
    /// This call started the fetch.
    Started(Arc<InFlight>),
}

impl UnitFetch {
    /// The fetch to wait for, if any.
    fn entry(self) -> Option<Arc<InFlight>> {
        match self {
            UnitFetch::Present => None,
            UnitFetch::Joined(e) | UnitFetch::Started(e) => Some(e),
        }
    }
}

/// Filled chunks waiting for the fsync that makes them present.
#[derive(Debug)]
struct Filled {
    /// The in-flight entry to drop once marked (`None` for prefetched holes).
    unit: Option<u64>,
    /// Chunk ranges `[first, end)`.
    chunks: Vec<(u64, u64)>,
    /// Held until durable, which bounds the memory of fetched-but-unmarked units.
    _permit: Option<OwnedSemaphorePermit>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) upstream: Arc<dyn Upstream>,
    pub(crate) cache: Arc<CacheFile>,
    reader: LocalFileReader,
    pub(crate) unit: u64,
    in_flight: Mutex<HashMap<u64, Arc<InFlight>>>,
    permits: Arc<Semaphore>,
    filled: mpsc::UnboundedSender<Filled>,
    pub(crate) stats: Stats,
    /// Set when the cache cannot be written: reads pass through.
    pub(crate) passthrough: AtomicBool,
    /// Demand reads waiting for a fetch; prefetch waits while this is non-zero.
    pub(crate) demand_waiting: AtomicUsize,
    pub(crate) demand_idle: tokio::sync::Notify,
    pub(crate) prefetch: PrefetchProgress,
    description: String,
    /// Sequential miss streams: (next unit expected, readahead window in units).
    streams: Mutex<Vec<(u64, u64)>>,
    max_fetches: usize,
    fetch_around: u64,
    /// Round trip and transfer time of the upstream, for `fetch_around`.
    link: Mutex<LinkEstimate>,
    /// The upstream's allocation as far as it was asked (NBD upstreams).
    known: Mutex<KnownAllocation>,
    /// Held while asking the upstream's block status, so one question is asked once.
    asking: tokio::sync::Mutex<()>,
}

/// Sequential streams tracked for readahead.
const STREAMS: usize = 8;
/// Largest readahead window, in fetch units.
const MAX_READAHEAD_UNITS: u64 = 16;

/// A template's copy-on-read export (cheap to clone: a handle).
#[derive(Debug, Clone)]
pub struct CorExport {
    inner: Arc<Inner>,
}

impl CorExport {
    /// Opens (or creates) the cache at `cache_path` in front of `upstream`. Call from
    /// within a tokio runtime: the durability batcher (and prefetch) run as tasks.
    pub fn open(
        upstream: Arc<dyn Upstream>,
        cache_path: &Path,
        options: &CorOptions,
    ) -> crate::Result<CorExport> {
        let cache = CacheFile::open(
            cache_path,
            &CacheOptions {
                size: upstream.size(),
                identity: upstream.identity().to_owned(),
                chunk_size: options.chunk_size,
                on_mismatch: options.on_mismatch,
                holder: options.holder.clone(),
                follow_device_links: options.follow_device_links,
            },
        )?;
        let chunk = cache.chunk_size();
        if !options.fetch_unit.is_power_of_two() || options.fetch_unit > 32 << 20 {
            return Err(crate::Error::Invalid(format!(
                "the fetch unit must be a power of two up to 32 MiB, not {}",
                options.fetch_unit
            )));
        }
        let unit = options.fetch_unit.max(chunk);
        let cache = Arc::new(cache);
        let (filled, rx) = mpsc::unbounded_channel();
        let description = format!(
            "copy-on-read cache {} of {}",
            cache.path().display(),
            upstream.name()
        );
        let inner = Arc::new(Inner {
            reader: LocalFileReader::new(Arc::clone(cache.file())),
            upstream,
            cache: Arc::clone(&cache),
            unit,
            in_flight: Mutex::new(HashMap::new()),
            permits: Arc::new(Semaphore::new(options.max_fetches.max(1))),
            filled,
            stats: Stats::default(),
            passthrough: AtomicBool::new(false),
            demand_waiting: AtomicUsize::new(0),
            demand_idle: tokio::sync::Notify::new(),
            prefetch: PrefetchProgress::default(),
            description,
            streams: Mutex::new(Vec::new()),
            max_fetches: options.max_fetches.max(1),
            fetch_around: options.fetch_around,
            link: Mutex::new(LinkEstimate::default()),
            known: Mutex::new(KnownAllocation::default()),
            asking: tokio::sync::Mutex::new(()),
        });
        tracing::info!(
            cache = %cache.path().display(),
            upstream = %inner.upstream.name(),
            present = cache.present_chunks(),
            chunks = cache.chunks(),
            chunk_size = chunk,
            complete = cache.is_complete(),
            "copy-on-read cache open"
        );
        tokio::spawn(batcher(cache, Arc::downgrade(&inner), rx));
        let export = CorExport { inner };
        if let Some(p) = &options.prefetch {
            tokio::spawn(crate::prefetch::run(Arc::clone(&export.inner), p.clone()));
        }
        if !export.inner.cache.is_complete() && !export.inner.upstream.reads_report_holes() {
            tokio::spawn(learn_allocation(Arc::downgrade(&export.inner)));
        }
        Ok(export)
    }

    /// The cache.
    pub fn cache(&self) -> &CacheFile {
        &self.inner.cache
    }

    /// The upstream.
    pub fn upstream(&self) -> &Arc<dyn Upstream> {
        &self.inner.upstream
    }

    /// A snapshot of the counters and progress.
    pub fn status(&self) -> Status {
        Status::of(&self.inner)
    }

    /// Waits (at most `limit`) until no fetch is in flight or waiting to be marked, so
    /// a graceful stop keeps what was fetched. Returns false on timeout.
    pub async fn settle(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if self
                .inner
                .in_flight
                .lock()
                .expect("in-flight lock")
                .is_empty()
            {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Fetches whatever of `[offset, offset + length)` is not cached yet and waits
    /// until it is (or the fetch fails).
    pub async fn hydrate(&self, offset: u64, length: u64) -> Result<()> {
        self.inner.hydrate(offset, length, true).await
    }
}

impl Inner {
    fn chunk(&self) -> u64 {
        self.cache.chunk_size()
    }

    /// `[first, end)` chunk indexes of `[offset, offset + length)`.
    fn chunk_range(&self, offset: u64, length: u64) -> (u64, u64) {
        let c = self.chunk();
        (offset / c, (offset + length).div_ceil(c))
    }

    /// Absent chunk runs of unit `u`, as byte ranges clamped to the template.
    fn absent_runs(&self, u: u64) -> Vec<(u64, u64)> {
        let c = self.chunk();
        let size = self.cache.size();
        let start = u * self.unit;
        let (first, end) = self.chunk_range(start, self.unit.min(size - start));
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for i in first..end {
            if self.cache.is_present(i) {
                continue;
            }
            let off = i * c;
            let len = c.min(size - off);
            match runs.last_mut() {
                Some((o, l)) if *o + *l == off => *l += len,
                _ => runs.push((off, len)),
            }
        }
        runs
    }

    /// The in-flight entry of unit `u`, created (and its fetch spawned) if needed;
    /// `None` when every chunk of the unit is present.
    fn fetch(self: &Arc<Self>, u: u64) -> Option<Arc<InFlight>> {
        self.fetch_for(u, None).entry()
    }

    /// [`Self::fetch`] for a client read of `[offset, end)` in unit `u`: a new fetch
    /// requests the chunks that read needs first, on their own.
    fn fetch_for(self: &Arc<Self>, u: u64, read: Option<(u64, u64)>) -> UnitFetch {
        let mut map = self.in_flight.lock().expect("in-flight lock");
        if let Some(f) = map.get(&u) {
            return UnitFetch::Joined(Arc::clone(f));
        }
        // Bits are set before entries are removed, so this sees the marks of any entry
        // that is gone.
        let runs = self.absent_runs(u);
        if runs.is_empty() {
            return UnitFetch::Present;
        }
        let (tx, rx) = watch::channel(None);
        let start = u * self.unit;
        let c = self.chunk();
        // The read's chunks, when they are not the whole unit's absent part anyway.
        let first = read
            .map(|(lo, hi)| {
                (
                    lo / c * c,
                    hi.div_ceil(c).saturating_mul(c).min(self.cache.size()),
                )
            })
            .filter(|&(lo, hi)| {
                runs.first().is_some_and(|&(o, _)| o < lo)
                    || runs.last().is_some_and(|&(o, l)| o + l > hi)
            })
            .map(|range| (range, watch::channel(None)));
        let entry = Arc::new(InFlight {
            done: rx,
            range: (start, self.unit.min(self.cache.size() - start)),
            first: first.as_ref().map(|(range, (_, rx))| (*range, rx.clone())),
        });
        map.insert(u, Arc::clone(&entry));
        drop(map);
        let first = first.map(|(range, (tx, _))| (range, tx));
        // Counted from now (waiting for a fetch slot included) until its data arrives.
        self.stats.in_flight.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(fetch_unit(Arc::clone(self), u, runs, first, tx));
        UnitFetch::Started(entry)
    }

    fn forget(&self, u: u64) {
        self.in_flight.lock().expect("in-flight lock").remove(&u);
    }

    /// Waits for an in-flight fetch; demand waits hold prefetch back.
    async fn wait(
        &self,
        entry: &InFlight,
        demand: bool,
    ) -> std::result::Result<Arc<Fetched>, Error> {
        self.wait_on(entry, entry.done.clone(), demand).await
    }

    /// Waits for the part of an in-flight fetch that covers `[offset, end)`: the
    /// read's own first requests when they cover it, else the whole unit.
    async fn wait_for_range(
        &self,
        entry: &InFlight,
        offset: u64,
        end: u64,
    ) -> std::result::Result<Arc<Fetched>, Error> {
        let rx = match &entry.first {
            Some(((lo, hi), rx)) if *lo <= offset && end <= *hi => rx.clone(),
            _ => entry.done.clone(),
        };
        self.wait_on(entry, rx, true).await
    }

    async fn wait_on(
        &self,
        entry: &InFlight,
        mut rx: OutcomeRx,
        demand: bool,
    ) -> std::result::Result<Arc<Fetched>, Error> {
        if demand {
            self.demand_waiting.fetch_add(1, Ordering::SeqCst);
        }
        let outcome = rx.wait_for(Option::is_some).await.map(|v| v.clone());
        if demand && self.demand_waiting.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.demand_idle.notify_waiters();
        }
        match outcome {
            Ok(Some(Ok(f))) => Ok(f),
            Ok(Some(Err(e))) => Err(Error::Upstream {
                upstream: self.upstream.name().to_owned(),
                op: "fetch",
                offset: entry.range.0,
                length: entry.range.1,
                errno: e.nbd_errno(),
                reason: error_chain(&e),
            }),
            _ => Err(Error::Upstream {
                upstream: self.upstream.name().to_owned(),
                op: "fetch",
                offset: entry.range.0,
                length: entry.range.1,
                errno: errno::EIO,
                reason: "the fetch was abandoned (shutting down)".into(),
            }),
        }
    }

    async fn cache_read(&self, offset: u64, length: u64) -> Result<ReadChunk> {
        self.cache_bytes(offset, length).await.map(ReadChunk::Data)
    }

    async fn cache_bytes(&self, offset: u64, length: u64) -> Result<Bytes> {
        self.reader
            .read_exact(offset, length as usize)
            .await
            .map(|b| b.freeze())
            .map_err(|source| Error::Io {
                op: "read cache",
                path: self.cache.path().to_owned(),
                offset,
                length,
                source,
            })
    }

    /// Reads `[offset, offset + length)` inside a unit whose fetch is `entry` (`None`:
    /// every chunk of the unit is present).
    async fn read_in_unit(
        &self,
        entry: Option<Arc<InFlight>>,
        offset: u64,
        length: u64,
    ) -> Result<Vec<ReadChunk>> {
        let Some(entry) = entry else {
            return self.read_verified(offset, length).await;
        };
        let fetched = self.wait_for_range(&entry, offset, offset + length).await?;
        let mut out = Vec::new();
        let end = offset + length;
        let mut pos = offset;
        for (start, piece) in &fetched.pieces {
            let piece_end = start + piece.len();
            if piece_end <= pos || *start >= end {
                continue;
            }
            if *start > pos {
                // Present before the fetch began: durable, read from the cache.
                out.extend(self.read_verified(pos, start - pos).await?);
                pos = *start;
            }
            let hi = piece_end.min(end);
            let (a, b) = ((pos - start) as usize, (hi - start) as usize);
            out.push(match piece {
                ReadChunk::Data(d) => ReadChunk::Data(d.slice(a..b)),
                ReadChunk::Zero(_) => ReadChunk::Zero((b - a) as u64),
            });
            pos = hi;
        }
        if pos < end {
            out.extend(self.read_verified(pos, end - pos).await?);
        }
        Ok(out)
    }

    /// Reads a range that was present from the cache if its chunks are verified; else
    /// (one was found bad meanwhile and is being fetched again) from the upstream.
    async fn read_verified(&self, offset: u64, length: u64) -> Result<Vec<ReadChunk>> {
        let (first, end) = self.chunk_range(offset, length);
        if self.cache.all_verified(first, end) {
            return Ok(vec![self.cache_read(offset, length).await?]);
        }
        self.stats.upstream_reads.fetch_add(1, Ordering::Relaxed);
        self.read_skipping_zeroes(offset, length).await
    }

    /// Checks the present chunks of `[offset, offset + length)` (chunks `[first, end)`)
    /// not yet read from disk by this process against their checksums, reading the
    /// chunks whole; a bad one is logged and forgotten (its bit cleared in memory and on
    /// disk), so it is fetched again. Returns the range's bytes when every chunk of it
    /// is present and good, so the read needs no second pass.
    async fn verify(
        &self,
        offset: u64,
        length: u64,
        (first, end): (u64, u64),
    ) -> Result<Option<Bytes>> {
        let c = self.chunk();
        let start = first * c;
        let span = (end * c).min(self.cache.size()) - start;
        let data = self.cache_bytes(start, span).await?;
        let mut bad = Vec::new();
        let mut whole = true;
        for i in first..end {
            if !self.cache.is_present(i) {
                whole = false;
                continue;
            }
            if self.cache.is_verified(i) {
                continue;
            }
            let lo = ((i - first) * c) as usize;
            let hi = (lo + c as usize).min(data.len());
            if !self.cache.check_chunk(i, &data[lo..hi]) {
                bad.push((i, i * c));
            }
        }
        if bad.is_empty() {
            let lo = (offset - start) as usize;
            return Ok(whole.then(|| data.slice(lo..lo + length as usize)));
        }
        let cache = Arc::clone(&self.cache);
        let chunks: Vec<u64> = bad.iter().map(|&(i, _)| i).collect();
        tokio::task::spawn_blocking(move || cache.clear_chunks(&chunks))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))
            .and_then(|r| r.map_err(std::io::Error::other))
            .map_err(|source| Error::Io {
                op: "forget bad chunks",
                path: self.cache.path().to_owned(),
                offset: start,
                length: span,
                source,
            })?;
        for &(chunk, offset) in &bad {
            self.stats.checksum_errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                cache = %self.cache.path().display(),
                chunk,
                offset,
                length = self.chunk(),
                "cached chunk does not match its checksum (bit rot, a scribbled file or a \
                 forged presence map): forgotten and fetched again"
            );
        }
        Ok(None)
    }

    /// After a miss of units `[first, last]`: if it continues a sequential stream, grow
    /// that stream's window and start fetching the absent units ahead of it (without
    /// waiting), while enough fetch permits are free for demand reads.
    fn read_ahead(self: &Arc<Self>, first: u64, last: u64) {
        let window = {
            let mut streams = self.streams.lock().expect("streams lock");
            if let Some(i) = streams.iter().position(|&(next, _)| first == next) {
                // The stream moved on to the next unit: widen its window.
                let (_, w) = streams.remove(i);
                let w = (w * 2).clamp(1, MAX_READAHEAD_UNITS);
                streams.push((last + 1, w));
                w
            } else if streams.iter().any(|&(next, _)| first + 1 == next) {
                // More of the unit a stream is in (or another reader of it): no change.
                0
            } else {
                if streams.len() == STREAMS {
                    streams.remove(0);
                }
                streams.push((last + 1, 0));
                0
            }
        };
        let units = self.cache.size().div_ceil(self.unit);
        self.speculate(last + 1..(last + 1 + window).min(units));
    }

    /// After a miss of units `[first, last]`: fetch `fetch_around` units on each side,
    /// nearest first, the following ones before the preceding ones.
    fn fetch_around(self: &Arc<Self>, first: u64, last: u64) {
        let k = self.fetch_around_now();
        if k == 0 {
            return;
        }
        let units = self.cache.size().div_ceil(self.unit);
        let after = last + 1..(last + 1 + k).min(units);
        let before = (first.saturating_sub(k)..first).rev();
        self.speculate(after.chain(before));
    }

    /// Units fetched on each side of a miss now: `fetch_around`, fewer when moving a
    /// unit takes the upstream longer than a round trip divided by that many.
    pub(crate) fn fetch_around_now(&self) -> u64 {
        self.link
            .lock()
            .expect("link lock")
            .units_per_round_trip()
            .map_or(self.fetch_around, |n| n.min(self.fetch_around))
    }

    /// Starts fetches of `units` that are not cached or in flight, without waiting,
    /// while more than a quarter of the fetch slots stay free for demand reads.
    fn speculate(self: &Arc<Self>, units: impl Iterator<Item = u64>) {
        for u in units {
            if self.permits.available_permits() <= self.max_fetches / 4 {
                break;
            }
            if matches!(self.fetch_for(u, None), UnitFetch::Started(_)) {
                self.stats
                    .speculative_fetches
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Fetches the absent parts of `[offset, offset + length)` and waits for them.
    pub(crate) async fn hydrate(
        self: &Arc<Self>,
        offset: u64,
        length: u64,
        demand: bool,
    ) -> Result<()> {
        if length == 0 {
            return Ok(());
        }
        let (first, last) = (offset / self.unit, (offset + length - 1) / self.unit);
        let entries: Vec<_> = (first..=last).filter_map(|u| self.fetch(u)).collect();
        for e in entries {
            self.wait(&e, demand).await?;
        }
        Ok(())
    }
}

/// The whole error chain as one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// True for write errors that mean "the cache is full".
fn is_full(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG)
    )
}

/// `runs` split at `[lo, hi)`: the parts inside it, and the rest.
fn split_runs(runs: &[(u64, u64)], (lo, hi): (u64, u64)) -> (Runs, Runs) {
    let (mut inside, mut rest) = (Vec::new(), Vec::new());
    for &(off, len) in runs {
        let end = off + len;
        let (a, b) = (off.max(lo), end.min(hi));
        if a >= b {
            rest.push((off, len));
            continue;
        }
        if off < a {
            rest.push((off, a - off));
        }
        inside.push((a, b - a));
        if b < end {
            rest.push((b, end - b));
        }
    }
    (inside, rest)
}

/// Reads `runs` from the upstream, one request each (zero ranges skipped), as
/// `(offset, chunk)` pieces in order.
async fn read_runs(inner: &Inner, runs: &[(u64, u64)]) -> Result<Vec<(u64, ReadChunk)>> {
    let results = futures_util::future::try_join_all(runs.iter().map(|&(off, len)| async move {
        let chunks = inner.read_skipping_zeroes(off, len).await?;
        let got: u64 = chunks.iter().map(ReadChunk::len).sum();
        if got != len {
            return Err(Error::Upstream {
                upstream: inner.upstream.name().to_owned(),
                op: "read",
                offset: off,
                length: len,
                errno: errno::EIO,
                reason: format!("returned {got} bytes instead of {len}"),
            });
        }
        Ok((off, chunks))
    }))
    .await?;
    let mut pieces = Vec::new();
    for (mut off, chunks) in results {
        for chunk in chunks {
            let len = chunk.len();
            pieces.push((off, chunk));
            off += len;
        }
    }
    Ok(pieces)
}

/// Fetches the absent runs of unit `u` (the part a client read needs, `first`, in
/// requests of its own, sent first and announced as soon as they arrive), hands the
/// bytes to the waiters, writes them to the cache and queues them for marking.
async fn fetch_unit(
    inner: Arc<Inner>,
    u: u64,
    runs: Vec<(u64, u64)>,
    first: Option<((u64, u64), OutcomeTx)>,
    tx: OutcomeTx,
) {
    let permit = Arc::clone(&inner.permits).acquire_owned().await.ok();
    // Counters are updated before the reply they describe is sent, so a status asked
    // after a client got its answer always includes it.
    let count = |requests: usize, fetched: Option<&Vec<(u64, ReadChunk)>>| match fetched {
        Some(pieces) => {
            inner
                .stats
                .upstream_reads
                .fetch_add(requests as u64, Ordering::Relaxed);
            inner
                .stats
                .upstream_bytes
                .fetch_add(data_bytes(pieces), Ordering::Relaxed);
        }
        None => {
            inner.stats.upstream_errors.fetch_add(1, Ordering::Relaxed);
        }
    };
    let results = match first {
        None => {
            let r = read_runs(&inner, &runs).await.map_err(Arc::new);
            count(runs.len(), r.as_ref().ok());
            r
        }
        Some((range, first_tx)) => {
            let (needed, rest) = split_runs(&runs, range);
            let rest_bytes: u64 = rest.iter().map(|r| r.1).sum();
            let started = std::time::Instant::now();
            let mut needed_took = Duration::ZERO;
            let needed = async {
                let r = read_runs(&inner, &needed).await.map_err(Arc::new);
                needed_took = started.elapsed();
                count(needed.len(), r.as_ref().ok());
                let _ = first_tx.send(Some(match &r {
                    Ok(pieces) => Ok(Arc::new(Fetched {
                        pieces: pieces.clone(),
                    })),
                    Err(e) => Err(Arc::clone(e)),
                }));
                r
            };
            let rest = async {
                let r = read_runs(&inner, &rest).await;
                // One failure per unit: a rest that fails after the needed part failed
                // (already counted) is the same failed fetch.
                if let Ok(pieces) = &r {
                    count(rest.len(), Some(pieces));
                }
                r
            };
            let (needed, rest) = tokio::join!(needed, rest);
            if needed.is_ok() && rest.is_err() {
                inner.stats.upstream_errors.fetch_add(1, Ordering::Relaxed);
            }
            match (needed, rest) {
                (Ok(mut pieces), Ok(rest)) => {
                    // Both went out together: the small request took a round trip, the
                    // rest a round trip plus its transfer.
                    if rest_bytes >= inner.unit / 2 {
                        inner.link.lock().expect("link lock").record(
                            needed_took,
                            started.elapsed().saturating_sub(needed_took),
                            rest_bytes as f64 / inner.unit as f64,
                        );
                    }
                    pieces.extend(rest);
                    pieces.sort_unstable_by_key(|(off, _)| *off);
                    Ok(pieces)
                }
                (Err(e), _) => Err(e),
                (_, Err(e)) => Err(Arc::new(e)),
            }
        }
    };
    inner.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
    let pieces = match results {
        Ok(pieces) => pieces,
        Err(e) => {
            tracing::warn!(
                upstream = %inner.upstream.name(),
                offset = u * inner.unit,
                error = %error_chain(&e),
                "upstream read failed; nothing was cached, the next read tries again"
            );
            inner.forget(u);
            let _ = tx.send(Some(Err(e)));
            return;
        }
    };
    let fetched = Arc::new(Fetched { pieces });
    let _ = tx.send(Some(Ok(Arc::clone(&fetched))));

    if inner.passthrough.load(Ordering::Relaxed) {
        inner.forget(u);
        return;
    }
    let cache = Arc::clone(&inner.cache);
    let written = tokio::task::spawn_blocking(move || {
        let sums = chunk_sums(&fetched.pieces, cache.chunk_size(), cache.size());
        for (off, piece) in &fetched.pieces {
            match piece {
                ReadChunk::Data(d) if d.iter().all(|&b| b == 0) => {
                    cache.write_zeroes(*off, d.len() as u64)?;
                }
                ReadChunk::Data(d) => cache.write_data(*off, d)?,
                ReadChunk::Zero(n) => cache.write_zeroes(*off, *n)?,
            }
        }
        // Durable with the data, by the batch's sync, before any bit.
        cache.write_sums(&sums)?;
        Ok::<_, std::io::Error>(())
    })
    .await
    .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
    match written {
        Ok(()) => {
            let chunks = runs
                .iter()
                .map(|&(off, len)| inner.chunk_range(off, len))
                .collect();
            let _ = inner.filled.send(Filled {
                unit: Some(u),
                chunks,
                _permit: permit,
            });
        }
        Err(e) => {
            inner.forget(u);
            enter_passthrough(&inner, &e, "write");
        }
    }
}

/// Bytes of data (not holes) in `pieces`.
fn data_bytes(pieces: &[(u64, ReadChunk)]) -> u64 {
    pieces
        .iter()
        .filter(|(_, c)| matches!(c, ReadChunk::Data(_)))
        .map(|(_, c)| c.len())
        .sum()
}

/// The CRC32C of each whole chunk covered by `pieces` (in order, chunk-aligned runs,
/// the last chunk of the template short): `(chunk, crc)`.
fn chunk_sums(pieces: &[(u64, ReadChunk)], chunk: u64, size: u64) -> Vec<(u64, u32)> {
    static ZEROES: [u8; 64 << 10] = [0; 64 << 10];
    let mut out = Vec::new();
    // The chunk being summed and its CRC so far.
    let mut cur: Option<(u64, u32)> = None;
    for (off, piece) in pieces {
        let (mut pos, end) = (*off, off + piece.len());
        while pos < end {
            let i = pos / chunk;
            let chunk_end = ((i + 1) * chunk).min(size);
            let hi = chunk_end.min(end);
            let mut crc = match cur {
                Some((c, crc)) if c == i => crc,
                _ => 0,
            };
            match piece {
                ReadChunk::Data(d) => {
                    crc = crc32c::crc32c_append(crc, &d[(pos - off) as usize..(hi - off) as usize]);
                }
                ReadChunk::Zero(_) => {
                    let mut left = hi - pos;
                    while left > 0 {
                        let n = left.min(ZEROES.len() as u64);
                        crc = crc32c::crc32c_append(crc, &ZEROES[..n as usize]);
                        left -= n;
                    }
                }
            }
            if hi == chunk_end {
                out.push((i, crc));
                cur = None;
            } else {
                cur = Some((i, crc));
            }
            pos = hi;
        }
    }
    debug_assert!(cur.is_none(), "pieces end inside a chunk");
    out
}

/// What the fetches measured of the upstream: how long a round trip takes, and how
/// long moving one fetch unit takes on top of it (moving averages).
#[derive(Debug, Default)]
struct LinkEstimate {
    round_trip_s: f64,
    unit_transfer_s: f64,
    samples: u32,
}

impl LinkEstimate {
    /// Weight of a new sample in the averages.
    const WEIGHT: f64 = 0.25;

    /// One demand fetch: its small first request took `round_trip`, the rest of the
    /// unit (`units` fetch units of data) arrived `transfer` after it.
    fn record(&mut self, round_trip: Duration, transfer: Duration, units: f64) {
        let rtt = round_trip.as_secs_f64();
        let per_unit = transfer.as_secs_f64() / units.max(f64::MIN_POSITIVE);
        if self.samples == 0 {
            (self.round_trip_s, self.unit_transfer_s) = (rtt, per_unit);
        } else {
            self.round_trip_s += Self::WEIGHT * (rtt - self.round_trip_s);
            self.unit_transfer_s += Self::WEIGHT * (per_unit - self.unit_transfer_s);
        }
        self.samples = self.samples.saturating_add(1);
    }

    /// How many units the upstream moves in one round trip (`None` before the first
    /// measurement): fetching that many more per miss costs less than the round trip
    /// of a later miss it may save.
    fn units_per_round_trip(&self) -> Option<u64> {
        if self.samples == 0 {
            return None;
        }
        if self.unit_transfer_s <= 0.0 {
            return Some(u64::MAX);
        }
        // Float to integer casts saturate.
        Some((self.round_trip_s / self.unit_transfer_s) as u64)
    }
}

/// Block status is asked for this much of the template at a time, and remembered.
const ALLOCATION_QUERY: u64 = 1 << 30;

/// What the upstream said about its allocation, remembered (the template never
/// changes): extent start → (length, reads as zero).
#[derive(Debug, Default)]
pub(crate) struct KnownAllocation {
    extents: std::collections::BTreeMap<u64, (u64, bool)>,
}

impl KnownAllocation {
    /// The remembered extent containing `pos`: `(start, length, zero)`.
    fn at(&self, pos: u64) -> Option<(u64, u64, bool)> {
        let (&start, &(len, zero)) = self.extents.range(..=pos).next_back()?;
        (pos < start + len).then_some((start, len, zero))
    }
}

impl Inner {
    /// `[off, off + len)` split into `(offset, length, zero)` runs from the upstream's
    /// block status, asked once per gigabyte and remembered; `None` if it cannot say.
    async fn zero_plan(&self, off: u64, len: u64) -> Option<Vec<(u64, u64, bool)>> {
        let end = off + len;
        let mut plan: Vec<(u64, u64, bool)> = Vec::new();
        let mut pos = off;
        while pos < end {
            let known = self.known.lock().expect("allocation lock").at(pos);
            let Some((start, length, zero)) = known else {
                self.learn_around(pos).await?;
                continue;
            };
            let hi = (start + length).min(end);
            match plan.last_mut() {
                Some((_, l, z)) if *z == zero => *l += hi - pos,
                _ => plan.push((pos, hi - pos, zero)),
            }
            pos = hi;
        }
        Some(plan)
    }

    /// Makes the extent containing `pos` known, asking the upstream unless someone else
    /// did meanwhile: for the whole aligned gigabyte around `pos`, so each is asked once
    /// whoever asks first, then at `pos` if that reply stopped short of it. `None` if
    /// the upstream cannot say.
    async fn learn_around(&self, pos: u64) -> Option<()> {
        let _asking = self.asking.lock().await;
        if self
            .known
            .lock()
            .expect("allocation lock")
            .at(pos)
            .is_some()
        {
            return Some(());
        }
        let base = pos - pos % ALLOCATION_QUERY;
        if self.learn(base).await? <= pos && self.learn(pos).await? <= pos {
            return None;
        }
        Some(())
    }

    /// Asks the upstream's block status from `at` (a gigabyte at most) and remembers
    /// the answer; returns where it ends (`None` if the upstream cannot say).
    async fn learn(&self, at: u64) -> Option<u64> {
        let size = self.cache.size();
        let extents = self
            .upstream
            .allocation(at, (size - at).min(ALLOCATION_QUERY))
            .await
            .ok()?;
        let mut known = self.known.lock().expect("allocation lock");
        let mut p = at;
        for e in extents {
            if e.length == 0 || p >= size {
                break;
            }
            let length = e.length.min(size - p);
            let zero = e.flags & u64::from(thinline_nbd::proto::state::ZERO) != 0;
            // Extents starting inside this one came from a shorter answer: this one
            // covers them, and lookups take the nearest start.
            let inside: Vec<u64> = known
                .extents
                .range(p..p + length)
                .map(|(&k, _)| k)
                .collect();
            for k in inside {
                known.extents.remove(&k);
            }
            known.extents.insert(p, (length, zero));
            p += length;
        }
        Some(p)
    }

    /// Reads `[off, off + len)` from the upstream. When its reads do not report holes,
    /// the remembered block status decides, and ranges that read as zero are not read
    /// (without block status everything is read).
    async fn read_skipping_zeroes(&self, off: u64, len: u64) -> Result<Vec<ReadChunk>> {
        let upstream = &*self.upstream;
        if upstream.reads_report_holes() {
            return upstream.read(off, len).await;
        }
        let plan = match self.zero_plan(off, len).await {
            Some(plan) if plan.iter().any(|&(_, _, zero)| zero) => plan,
            _ => return upstream.read(off, len).await,
        };
        let parts =
            futures_util::future::try_join_all(plan.into_iter().map(|(o, l, zero)| async move {
                if zero {
                    Ok(vec![ReadChunk::Zero(l)])
                } else {
                    upstream.read(o, l).await
                }
            }))
            .await?;
        Ok(parts.into_iter().flatten().collect())
    }
}

/// Asks the upstream's block status for the whole template once the export opens, a
/// gigabyte at a time, so the first misses of a boot do not wait for it. Stops when the
/// export is dropped or the upstream cannot say.
async fn learn_allocation(inner: std::sync::Weak<Inner>) {
    let mut base = 0;
    loop {
        let Some(inner) = inner.upgrade() else {
            return;
        };
        if base >= inner.cache.size() || inner.learn_around(base).await.is_none() {
            return;
        }
        base += ALLOCATION_QUERY;
    }
}

/// Stops writing to the cache after a write or sync failure; logged once.
fn enter_passthrough(inner: &Inner, e: &std::io::Error, op: &str) {
    if !inner.passthrough.swap(true, Ordering::SeqCst) {
        let why = if is_full(e) { "full" } else { "failing" };
        tracing::error!(
            cache = %inner.cache.path().display(),
            error = %e,
            present = inner.cache.present_chunks(),
            chunks = inner.cache.chunks(),
            "cache {why} ({op} failed): reads now pass through to the upstream; \
             chunks already present stay in use"
        );
    }
}

/// Makes filled chunks durable in batches: one fsync, then the bits, then the map
/// pages, then the in-flight entries go.
async fn batcher(
    cache: Arc<CacheFile>,
    inner: Weak<Inner>,
    mut rx: mpsc::UnboundedReceiver<Filled>,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + SYNC_INTERVAL;
        while batch.len() < SYNC_BATCH {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(f)) => batch.push(f),
                _ => break,
            }
        }
        let c = Arc::clone(&cache);
        let ranges: Vec<(u64, u64)> = batch
            .iter()
            .flat_map(|f| f.chunks.iter().copied())
            .collect();
        let synced = tokio::task::spawn_blocking(move || {
            c.sync()?;
            let mut pages = Vec::new();
            for (first, end) in ranges {
                c.set_present(first, end, &mut pages);
            }
            pages.sort_unstable();
            pages.dedup();
            c.persist_pages(&pages)
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
        // Completion is recorded before the batch's units leave the in-flight map, so
        // `settle` (a graceful stop) also waits for it.
        // Not `complete` any more after a bad chunk was forgotten, until fetched again.
        if synced.is_ok() && cache.present_chunks() == cache.chunks() && !cache.is_complete() {
            let c = Arc::clone(&cache);
            match tokio::task::spawn_blocking(move || c.mark_complete()).await {
                Ok(Ok(())) if !cache.is_complete() => {}
                Ok(Ok(())) => tracing::info!(
                    cache = %cache.path().display(),
                    bytes = cache.size(),
                    "cache complete: it holds the whole template and can replace the upstream"
                ),
                Ok(Err(e)) => tracing::warn!(error = %error_chain(&e), "cannot record completion"),
                Err(e) => tracing::warn!(error = %e, "cannot record completion"),
            }
        }
        let strong = inner.upgrade();
        if let Some(inner) = &strong {
            if let Err(e) = &synced {
                enter_passthrough(inner, e, "sync");
            }
            let mut map = inner.in_flight.lock().expect("in-flight lock");
            for f in &batch {
                if let Some(u) = f.unit {
                    map.remove(&u);
                }
            }
        }
        drop(batch);
    }
}

/// Queues chunks already made zero in the cache (prefetched holes) for marking.
pub(crate) fn queue_zeroed(inner: &Inner, chunks: Vec<(u64, u64)>) {
    let _ = inner.filled.send(Filled {
        unit: None,
        chunks,
        _permit: None,
    });
}

#[async_trait]
impl Export for CorExport {
    fn size(&self) -> u64 {
        self.inner.cache.size()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            read_only: true,
            flush: true,
            fua: false,
            trim: false,
            write_zeroes: false,
            fast_zero: false,
            cache: true,
            multi_conn: true,
            rotational: false,
        }
    }

    fn block_sizes(&self) -> BlockSizes {
        BlockSizes {
            minimum: 1,
            preferred: 4096,
            maximum_payload: BlockSizes::DEFAULT_MAX_PAYLOAD,
        }
    }

    fn description(&self) -> Option<String> {
        Some(self.inner.description.clone())
    }

    fn meta_contexts(&self) -> &[&'static str] {
        &CONTEXTS
    }

    async fn read(&self, offset: u64, length: u32) -> Result<Vec<ReadChunk>> {
        let inner = &self.inner;
        let length = u64::from(length);
        inner
            .stats
            .bytes_served
            .fetch_add(length, Ordering::Relaxed);
        let (cf, ce) = inner.chunk_range(offset, length);
        let mut hit = inner.cache.all_verified(cf, ce);
        if !hit && inner.cache.needs_verify(cf, ce) {
            // Chunks read from disk the first time are checked; bad ones are fetched.
            if let Some(data) = inner.verify(offset, length, (cf, ce)).await? {
                inner.stats.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(vec![ReadChunk::Data(data)]);
            }
            hit = inner.cache.all_verified(cf, ce);
        }
        if hit {
            inner.stats.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(vec![inner.cache_read(offset, length).await?]);
        }
        inner.stats.misses.fetch_add(1, Ordering::Relaxed);
        let end = offset + length;
        let (first, last) = (offset / inner.unit, (end - 1) / inner.unit);
        // The read's own units first, so their requests go out ahead of speculation.
        let spans: Vec<_> = (first..=last)
            .map(|u| {
                let (lo, hi) = (offset.max(u * inner.unit), end.min((u + 1) * inner.unit));
                (inner.fetch_for(u, Some((lo, hi))).entry(), lo, hi)
            })
            .collect();
        inner.read_ahead(first, last);
        inner.fetch_around(first, last);
        let parts = futures_util::future::try_join_all(
            spans
                .into_iter()
                .map(|(entry, lo, hi)| inner.read_in_unit(entry, lo, hi - lo)),
        )
        .await?;
        let mut out: Vec<ReadChunk> = Vec::new();
        for chunk in parts.into_iter().flatten() {
            match (out.last_mut(), chunk) {
                (Some(ReadChunk::Zero(n)), ReadChunk::Zero(m)) => *n += m,
                (_, chunk) => out.push(chunk),
            }
        }
        Ok(out)
    }

    fn refuse_write(&self) -> Error {
        Error::ReadOnly {
            path: self.inner.cache.path().to_owned(),
        }
    }

    async fn cache(&self, offset: u64, length: u64) -> Result<()> {
        self.inner.hydrate(offset, length, true).await
    }

    async fn block_status(
        &self,
        context: usize,
        offset: u64,
        length: u64,
        max_extents: usize,
    ) -> Result<Vec<Extent>> {
        let inner = &self.inner;
        if context == 0 {
            return inner.upstream.allocation(offset, length).await;
        }
        // qemu:allocation-depth: 1 = in the cache, 2 = only upstream.
        let c = inner.chunk();
        let end = offset + length;
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let i = pos / c;
            let hi = ((i + 1) * c).min(end);
            let depth = if inner.cache.is_present(i) { 1 } else { 2 };
            match out.last_mut() {
                Some(e) if e.flags == depth => e.length += hi - pos,
                _ => {
                    if out.len() == max_extents.max(1) {
                        break;
                    }
                    out.push(Extent {
                        length: hi - pos,
                        flags: depth,
                    });
                }
            }
            pos = hi;
        }
        Ok(out)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let s = &self.stats;
        tracing::info!(
            cache = %self.cache.path().display(),
            hits = s.hits.load(Ordering::Relaxed),
            misses = s.misses.load(Ordering::Relaxed),
            upstream_reads = s.upstream_reads.load(Ordering::Relaxed),
            upstream_bytes = s.upstream_bytes.load(Ordering::Relaxed),
            present = self.cache.present_chunks(),
            chunks = self.cache.chunks(),
            "copy-on-read cache closed"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use super::*;

    /// A template in memory; counts reads, can hold them or fail them.
    #[derive(Debug)]
    struct MemUpstream {
        data: Vec<u8>,
        reads: Mutex<Vec<(u64, u64)>>,
        gate: tokio::sync::Semaphore,
        fail: AtomicBool,
        /// Reads return zeroes as data, block status names this zero range.
        zero_range: Option<(u64, u64)>,
        allocation_calls: AtomicUsize,
    }

    impl MemUpstream {
        fn new(size: usize, open: bool) -> Arc<Self> {
            let data = (0..size).map(|i| (i * 7 + i / 4096) as u8).collect();
            Arc::new(MemUpstream {
                data,
                reads: Mutex::new(Vec::new()),
                gate: tokio::sync::Semaphore::new(if open { 1 << 20 } else { 0 }),
                fail: AtomicBool::new(false),
                zero_range: None,
                allocation_calls: AtomicUsize::new(0),
            })
        }
    }

    #[async_trait]
    impl Upstream for MemUpstream {
        fn name(&self) -> &str {
            "memory"
        }
        fn size(&self) -> u64 {
            self.data.len() as u64
        }
        fn identity(&self) -> &str {
            "memory template v1"
        }
        async fn read(&self, offset: u64, length: u64) -> Result<Vec<ReadChunk>> {
            self.reads.lock().unwrap().push((offset, length));
            let _permit = self.gate.acquire().await.unwrap();
            if self.fail.load(Ordering::SeqCst) {
                return Err(Error::Upstream {
                    upstream: "memory".into(),
                    op: "read",
                    offset,
                    length,
                    errno: errno::EIO,
                    reason: "injected".into(),
                });
            }
            let range = offset as usize..(offset + length) as usize;
            Ok(vec![ReadChunk::Data(Bytes::copy_from_slice(
                &self.data[range],
            ))])
        }
        async fn allocation(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
            self.allocation_calls.fetch_add(1, Ordering::SeqCst);
            let Some((zs, zl)) = self.zero_range else {
                return Ok(vec![Extent { length, flags: 0 }]);
            };
            let zero =
                u64::from(thinline_nbd::proto::state::HOLE | thinline_nbd::proto::state::ZERO);
            let mut out = Vec::new();
            for (s, e, flags) in [(0, zs, 0), (zs, zs + zl, zero), (zs + zl, self.size(), 0)] {
                let (lo, hi) = (s.max(offset), e.min(offset + length));
                if lo < hi {
                    out.push(Extent {
                        length: hi - lo,
                        flags,
                    });
                }
            }
            Ok(out)
        }

        fn reads_report_holes(&self) -> bool {
            self.zero_range.is_none()
        }
    }

    /// Options without speculation, for tests that count upstream reads exactly.
    fn no_speculation() -> CorOptions {
        CorOptions {
            fetch_around: 0,
            ..CorOptions::default()
        }
    }

    async fn read_bytes(e: &CorExport, offset: u64, length: u32) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        for c in e.read(offset, length).await? {
            match c {
                ReadChunk::Data(d) => out.extend_from_slice(&d),
                ReadChunk::Zero(n) => out.resize(out.len() + n as usize, 0),
            }
        }
        Ok(out)
    }

    /// Opens again once the previous owner's background tasks have let go of the lock.
    async fn reopen(up: Arc<MemUpstream>, path: &Path, options: &CorOptions) -> CorExport {
        for _ in 0..200 {
            match CorExport::open(up.clone(), path, options) {
                Err(crate::Error::Locked { .. }) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                other => return other.unwrap(),
            }
        }
        panic!("the cache stayed locked after its export was dropped");
    }

    async fn wait_present(e: &CorExport, n: u64) {
        for _ in 0..500 {
            if e.cache().present_chunks() >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("only {} chunks present", e.cache().present_chunks());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn readers_of_a_unit_being_fetched_share_one_fetch_answered_by_its_first_request() {
        let dir = tempfile::tempdir().unwrap();
        let up = MemUpstream::new(4 << 20, false);
        let e = CorExport::open(up.clone(), &dir.path().join("c"), &no_speculation()).unwrap();
        let readers: Vec<_> = (0..8u64)
            .map(|i| {
                let e = e.clone();
                tokio::spawn(async move { read_bytes(&e, (1 << 20) + i * 4096, 4096).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(100)).await;
        // One fetch of the unit: the chunk the first read needs, on its own and first,
        // then the rest of the unit.
        let (mib, chunk) = (1 << 20, 64 << 10);
        assert_eq!(
            *up.reads.lock().unwrap(),
            [(mib, chunk), (mib + chunk, mib - chunk)]
        );
        // Releasing only the first request answers every reader inside that chunk.
        up.gate.add_permits(1);
        for (i, r) in readers.into_iter().enumerate() {
            let off = (1 << 20) + i * 4096;
            assert_eq!(r.await.unwrap().unwrap(), up.data[off..off + 4096]);
        }
        assert_eq!(
            e.cache().present_chunks(),
            0,
            "marked before the unit arrived"
        );
        up.gate.add_permits(1 << 20);
        assert_eq!(up.reads.lock().unwrap().len(), 2);
        wait_present(&e, 16).await;
        // Marked: later reads come from the cache file.
        assert_eq!(
            read_bytes(&e, 1 << 20, 65536).await.unwrap(),
            up.data[1 << 20..(1 << 20) + 65536]
        );
        assert_eq!(up.reads.lock().unwrap().len(), 2);
    }

    #[test]
    fn speculation_shrinks_when_moving_a_unit_costs_more_than_a_round_trip() {
        let ms = Duration::from_millis;
        let mut link = LinkEstimate::default();
        assert_eq!(link.units_per_round_trip(), None);
        // 20 ms away, 1 MiB in 2 ms (a fast link).
        link.record(ms(20), ms(2), 1.0);
        assert_eq!(link.units_per_round_trip(), Some(10));
        // Then 1 MiB takes 84 ms (100 Mbit/s): the average follows within a few misses.
        for _ in 0..12 {
            link.record(ms(20), ms(84), 1.0);
        }
        assert_eq!(link.units_per_round_trip(), Some(0));
        // Half a unit in 4 ms is 8 ms per unit: two units per 20 ms round trip.
        let mut link = LinkEstimate::default();
        link.record(ms(20), ms(4), 0.5);
        assert_eq!(link.units_per_round_trip(), Some(2));
        link.record(ms(20), Duration::ZERO, 1.0);
        assert!(link.units_per_round_trip().unwrap() >= 2);
    }

    #[test]
    fn runs_split_at_the_needed_range_cover_the_same_bytes() {
        let runs = [(0, 100), (200, 100), (400, 50)];
        let (inside, rest) = split_runs(&runs, (250, 420));
        assert_eq!(inside, [(250, 50), (400, 20)]);
        assert_eq!(rest, [(0, 100), (200, 50), (420, 30)]);
        let (inside, rest) = split_runs(&runs, (100, 200));
        assert!(inside.is_empty());
        assert_eq!(rest, runs);
        let (inside, rest) = split_runs(&runs, (0, 1000));
        assert_eq!(inside, runs);
        assert!(rest.is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_miss_also_fetches_its_neighbours_and_a_hit_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let up = MemUpstream::new(8 << 20, false);
        let options = CorOptions {
            fetch_around: 2,
            ..CorOptions::default()
        };
        let e = CorExport::open(up.clone(), &dir.path().join("c"), &options).unwrap();
        let reader = {
            let e = e.clone();
            tokio::spawn(async move { read_bytes(&e, (4 << 20) + 100, 4096).await })
        };
        for _ in 0..500 {
            if up.reads.lock().unwrap().len() >= 6 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut reads = up.reads.lock().unwrap().clone();
        reads.sort_unstable();
        let (mib, chunk) = (1 << 20, 64 << 10);
        // The missed unit 4 as its needed chunk and the rest; 2, 3, 5 and 6 whole.
        let expected = [
            (2 * mib, mib),
            (3 * mib, mib),
            (4 * mib, chunk),
            (4 * mib + chunk, mib - chunk),
            (5 * mib, mib),
            (6 * mib, mib),
        ];
        assert_eq!(reads, expected);
        up.gate.add_permits(1 << 20);
        let off = (4 << 20) + 100;
        assert_eq!(reader.await.unwrap().unwrap(), up.data[off..off + 4096]);
        assert_eq!(e.status().speculative_fetches, 4);
        // Every chunk of units 2..=6 becomes present; reading them costs nothing more.
        wait_present(&e, 5 * 16).await;
        let off = (2 << 20) + 5;
        assert_eq!(
            read_bytes(&e, off as u64, 3 << 20).await.unwrap(),
            up.data[off..off + (3 << 20)]
        );
        assert_eq!(up.reads.lock().unwrap().len(), 6);
        // A miss at the template's end: neighbours are clamped to the template.
        read_bytes(&e, (8 << 20) - 10, 10).await.unwrap();
        // The read is answered by its own request; the rest of the unit may still be
        // on its way.
        wait_present(&e, 6 * 16).await;
        let mut reads = up.reads.lock().unwrap()[6..].to_vec();
        reads.sort_unstable();
        assert_eq!(
            reads,
            [(7 * mib, mib - chunk), (8 * mib - chunk, chunk)],
            "unit 7 only: 5 and 6 are present, 8 is past the end"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_fetch_fails_its_readers_marks_nothing_and_is_retried() {
        let dir = tempfile::tempdir().unwrap();
        let up = MemUpstream::new(2 << 20, true);
        up.fail.store(true, Ordering::SeqCst);
        let e = CorExport::open(up.clone(), &dir.path().join("c"), &no_speculation()).unwrap();
        let err = read_bytes(&e, 100, 5000).await.unwrap_err();
        assert_eq!(err.nbd_errno(), errno::EIO, "{err}");
        assert!(err.to_string().contains("memory"), "{err}");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(e.cache().present_chunks(), 0);
        up.fail.store(false, Ordering::SeqCst);
        assert_eq!(read_bytes(&e, 100, 5000).await.unwrap(), up.data[100..5100]);
        assert_eq!(e.status().upstream_errors, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_across_cached_and_fetched_units_are_exact_and_present_chunks_are_never_refetched()
     {
        let dir = tempfile::tempdir().unwrap();
        let size = 3 << 20;
        let up = MemUpstream::new(size, true);
        let options = CorOptions {
            fetch_unit: 256 << 10,
            ..no_speculation()
        };
        let e = CorExport::open(up.clone(), &dir.path().join("c"), &options).unwrap();
        // Cache two scattered 64 KiB pieces first (each fetches its 256 KiB unit).
        read_bytes(&e, 300 << 10, 10).await.unwrap();
        read_bytes(&e, (1 << 20) + 5, 10).await.unwrap();
        wait_present(&e, 8).await;
        drop(e);
        // Reopen with another fetch unit: units now straddle present chunks.
        let options = CorOptions {
            fetch_unit: 1 << 20,
            ..no_speculation()
        };
        let e = reopen(up.clone(), &dir.path().join("c"), &options).await;
        up.reads.lock().unwrap().clear();
        let all = read_bytes(&e, 1, (size - 2) as u32).await.unwrap();
        assert!(all == up.data[1..size - 1]);
        let reads = up.reads.lock().unwrap().clone();
        for &(off, len) in &reads {
            let hits_cached = |lo: u64, hi: u64| off < hi && lo < off + len;
            assert!(
                !hits_cached(256 << 10, 512 << 10)
                    && !hits_cached(1 << 20, (1 << 20) + (256 << 10)),
                "present range fetched again: {reads:?}"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn block_status_is_asked_once_and_zero_ranges_are_never_read() {
        let dir = tempfile::tempdir().unwrap();
        let mut up = MemUpstream::new(8 << 20, true);
        let zs = (2 << 20) + 8192;
        Arc::get_mut(&mut up).unwrap().zero_range = Some((zs, 3 << 20));
        Arc::get_mut(&mut up).unwrap().data[zs as usize..(zs + (3 << 20)) as usize].fill(0);
        let e = CorExport::open(up.clone(), &dir.path().join("c"), &no_speculation()).unwrap();
        let all = read_bytes(&e, 0, 8 << 20).await.unwrap();
        assert!(all == up.data);
        assert_eq!(up.allocation_calls.load(Ordering::SeqCst), 1);
        for &(off, len) in up.reads.lock().unwrap().iter() {
            assert!(
                off + len <= zs || off >= zs + (3 << 20),
                "read {off}+{len} of the zero range"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn scribbled_and_forged_chunks_are_detected_fetched_again_and_read_right() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c");
        let size = 2 << 20;
        let up = MemUpstream::new(size, true);
        let e = CorExport::open(up.clone(), &path, &no_speculation()).unwrap();
        assert_eq!(
            read_bytes(&e, 0, 1 << 20).await.unwrap(),
            up.data[..1 << 20]
        );
        wait_present(&e, 16).await;
        drop(e);
        let chunk = DEFAULT_CHUNK_SIZE;
        let g = crate::cache::Geometry::new(size as u64, chunk);
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .unwrap();
            // Bit rot in chunk 5, which was fetched.
            f.write_all_at(b"rot", 5 * chunk + 100).unwrap();
            // A forged bit for chunk 20, never fetched (its bytes read as zeroes).
            let mut b = [0u8; 1];
            f.read_exact_at(&mut b, g.map + 2).unwrap();
            f.write_all_at(&[b[0] | 1 << 4], g.map + 2).unwrap();
        }
        let e = reopen(up.clone(), &path, &no_speculation()).await;
        assert_eq!(e.cache().present_chunks(), 17);
        up.reads.lock().unwrap().clear();
        assert!(read_bytes(&e, 0, size as u32).await.unwrap() == up.data);
        let reads = up.reads.lock().unwrap().clone();
        for bad in [5, 20] {
            let off = bad * chunk;
            assert!(
                reads.iter().any(|&(o, l)| o <= off && off + chunk <= o + l),
                "chunk {bad} was not fetched again: {reads:?}"
            );
        }
        assert!(
            !reads.iter().any(|&(o, _)| o < 5 * chunk),
            "good chunks fetched again: {reads:?}"
        );
        assert_eq!(e.status().checksum_errors, 2);
        wait_present(&e, 32).await;
        // Fetched again, and right on disk now.
        assert!(e.cache().scrub().unwrap().bad.is_empty());
    }

    #[test]
    fn chunk_checksums_cover_data_and_zero_pieces_across_their_boundaries() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        // Chunks of 4096 in a 10000-byte template: the last one is short.
        let pieces = vec![
            (0, ReadChunk::Data(Bytes::copy_from_slice(&data[..5000]))),
            (5000, ReadChunk::Zero(1000)),
            (6000, ReadChunk::Data(Bytes::copy_from_slice(&data[6000..]))),
        ];
        let mut whole = data.clone();
        whole[5000..6000].fill(0);
        let want: Vec<(u64, u32)> = whole
            .chunks(4096)
            .enumerate()
            .map(|(i, c)| (i as u64, crc32c::crc32c(c)))
            .collect();
        assert_eq!(chunk_sums(&pieces, 4096, 10_000), want);
        // A run that starts at a later chunk.
        let pieces = vec![(
            8192,
            ReadChunk::Data(Bytes::copy_from_slice(&whole[8192..])),
        )];
        assert_eq!(chunk_sums(&pieces, 4096, 10_000), want[2..]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_are_refused_with_eperm() {
        let dir = tempfile::tempdir().unwrap();
        let up = MemUpstream::new(1 << 20, true);
        let e = CorExport::open(up, &dir.path().join("c"), &CorOptions::default()).unwrap();
        assert!(e.capabilities().read_only);
        let err = e
            .write(0, Bytes::from_static(b"x"), false)
            .await
            .unwrap_err();
        assert_eq!(err.nbd_errno(), errno::EPERM);
        assert_eq!(
            e.trim(0, 4096, false).await.unwrap_err().nbd_errno(),
            errno::EPERM
        );
    }
}
