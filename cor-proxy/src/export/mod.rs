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

mod allocation;
mod durability;
mod link;
#[cfg(test)]
mod tests;

pub(crate) use allocation::KnownAllocation;
use allocation::learn_allocation;
pub(crate) use durability::queue_zeroed;
use durability::{batcher, enter_passthrough};
use link::LinkEstimate;

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
        Ok(thinline_nbd::export::merge_zero_runs(
            parts.into_iter().flatten(),
        ))
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
