//! The engine's state, owned here and nowhere else: what every part of the export
//! shares (the cache, the upstream, the unit) and one handle to each concern's own
//! state. The concerns live around it, each owning its part:
//!
//! | state                                   | owner              |
//! |-----------------------------------------|--------------------|
//! | cache, upstream, reader, unit, counters | `state.rs`         |
//! | in-flight map and fetch slots           | `in_flight.rs`     |
//! | miss streams and link estimate          | `speculation.rs`   |
//! | the upstream's allocation, as learnt    | `allocation.rs`    |
//! | filled-chunk queue and pass-through     | `durability.rs`    |
//! | demand gate and prefetch progress       | `prefetch.rs`      |
//!
//! Fields are private: other files get the shared parts and the concerns' state through
//! accessors, and change a concern's state only through that concern's methods.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use serde::{Deserialize, Serialize};
use thinline_nbd::LocalFileReader;

use super::allocation::Allocation;
use super::durability::Durability;
use super::in_flight::InFlightMap;
use super::prefetch::{Demand, PrefetchProgress};
use super::speculation::Speculation;
use super::{CacheFile, CorOptions, Upstream};

/// The state of one copy-on-read export, shared by its reads and background tasks.
#[derive(Debug)]
pub(super) struct Inner {
    upstream: Arc<dyn Upstream>,
    cache: Arc<CacheFile>,
    reader: LocalFileReader,
    /// Bytes one fetch fills.
    unit: u64,
    description: String,
    stats: Stats,
    in_flight: InFlightMap,
    speculation: Speculation,
    allocation: Allocation,
    durability: Durability,
    demand: Demand,
    prefetch: PrefetchProgress,
}

impl Inner {
    /// The state of a new export; `durability` is the sending end of its batcher.
    pub(super) fn new(
        upstream: Arc<dyn Upstream>,
        cache: Arc<CacheFile>,
        unit: u64,
        options: &CorOptions,
        durability: Durability,
    ) -> Inner {
        let description = format!(
            "copy-on-read cache {} of {}",
            cache.path().display(),
            upstream.name()
        );
        Inner {
            reader: LocalFileReader::new(Arc::clone(cache.file())),
            upstream,
            cache,
            unit,
            description,
            stats: Stats::default(),
            in_flight: InFlightMap::new(options.max_fetches),
            speculation: Speculation::new(options.max_fetches, options.fetch_around),
            allocation: Allocation::default(),
            durability,
            demand: Demand::default(),
            prefetch: PrefetchProgress::default(),
        }
    }

    pub(super) fn upstream(&self) -> &Arc<dyn Upstream> {
        &self.upstream
    }

    pub(super) fn cache(&self) -> &Arc<CacheFile> {
        &self.cache
    }

    pub(super) fn reader(&self) -> &LocalFileReader {
        &self.reader
    }

    /// Bytes one fetch fills.
    pub(super) fn unit(&self) -> u64 {
        self.unit
    }

    pub(super) fn description(&self) -> &str {
        &self.description
    }

    pub(super) fn stats(&self) -> &Stats {
        &self.stats
    }

    pub(super) fn in_flight(&self) -> &InFlightMap {
        &self.in_flight
    }

    pub(super) fn speculation(&self) -> &Speculation {
        &self.speculation
    }

    pub(super) fn allocation(&self) -> &Allocation {
        &self.allocation
    }

    pub(super) fn durability(&self) -> &Durability {
        &self.durability
    }

    pub(super) fn demand(&self) -> &Demand {
        &self.demand
    }

    pub(super) fn prefetch_progress(&self) -> &PrefetchProgress {
        &self.prefetch
    }

    pub(super) fn chunk(&self) -> u64 {
        self.cache.chunk_size()
    }

    /// `[first, end)` chunk indexes of `[offset, offset + length)`.
    pub(super) fn chunk_range(&self, offset: u64, length: u64) -> (u64, u64) {
        let c = self.chunk();
        (offset / c, (offset + length).div_ceil(c))
    }

    /// Absent chunk runs of unit `u`, as byte ranges clamped to the template.
    pub(super) fn absent_runs(&self, u: u64) -> Vec<(u64, u64)> {
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

    /// A snapshot of the counters and progress.
    pub(super) fn status(&self) -> Status {
        let s = &self.stats;
        let c = &self.cache;
        let present = c.present_chunks();
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Status {
            upstream: self.upstream.name().to_owned(),
            cache: c.path().to_owned(),
            size: c.size(),
            chunk_size: c.chunk_size(),
            chunks: c.chunks(),
            chunks_present: present,
            percent_present: if c.chunks() == 0 {
                100.0
            } else {
                (1000.0 * present as f64 / c.chunks() as f64).floor() / 10.0
            },
            complete: c.is_complete(),
            hits: load(&s.hits),
            misses: load(&s.misses),
            bytes_served: load(&s.bytes_served),
            upstream_reads: load(&s.upstream_reads),
            bytes_from_upstream: load(&s.upstream_bytes),
            upstream_errors: load(&s.upstream_errors),
            checksum_errors: load(&s.checksum_errors),
            speculative_fetches: load(&s.speculative_fetches),
            fetch_around: self.fetch_around_now(),
            in_flight: s.in_flight.load(Ordering::Relaxed),
            passthrough: self.durability.is_passthrough(),
            prefetch: self.prefetch.state_name().to_owned(),
            prefetch_bytes: self.prefetch.bytes(),
            prefetch_zero_bytes: self.prefetch.zero_bytes(),
        }
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

/// Counters, for `status` and the log. Each is bumped before the reply it describes
/// is sent, so a status asked after a client got its answer includes it.
#[derive(Debug, Default)]
pub(super) struct Stats {
    hits: AtomicU64,
    misses: AtomicU64,
    bytes_served: AtomicU64,
    upstream_reads: AtomicU64,
    upstream_bytes: AtomicU64,
    upstream_errors: AtomicU64,
    checksum_errors: AtomicU64,
    /// Fetches started ahead of a read: readahead and neighbours of a miss.
    speculative_fetches: AtomicU64,
    in_flight: AtomicUsize,
}

impl Stats {
    /// A client asked for `bytes`.
    pub(super) fn served(&self, bytes: u64) {
        self.bytes_served.fetch_add(bytes, Ordering::Relaxed);
    }

    /// A client read was served wholly from the cache.
    pub(super) fn hit(&self) {
        self.hits.fetch_add(1, Ordering::Relaxed);
    }

    /// A client read needed the upstream (or a fetch in flight).
    pub(super) fn miss(&self) {
        self.misses.fetch_add(1, Ordering::Relaxed);
    }

    /// `requests` upstream reads succeeded with `data_bytes` of data (holes not counted).
    pub(super) fn upstream_read(&self, requests: u64, data_bytes: u64) {
        self.upstream_reads.fetch_add(requests, Ordering::Relaxed);
        self.upstream_bytes.fetch_add(data_bytes, Ordering::Relaxed);
    }

    /// A fetch from the upstream failed.
    pub(super) fn upstream_error(&self) {
        self.upstream_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// A cached chunk did not match its checksum.
    pub(super) fn checksum_error(&self) {
        self.checksum_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// A fetch was started ahead of any read.
    pub(super) fn speculative(&self) {
        self.speculative_fetches.fetch_add(1, Ordering::Relaxed);
    }

    /// A fetch was started: in flight until its data arrives.
    pub(super) fn fetch_started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// A fetch's data arrived (or its reads failed).
    pub(super) fn fetch_ended(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A snapshot of a copy-on-read export.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Status {
    /// The upstream (no credentials).
    pub upstream: String,
    /// The cache file or device.
    pub cache: PathBuf,
    /// Template size in bytes.
    pub size: u64,
    /// Presence granularity.
    pub chunk_size: u64,
    /// Chunks in the template.
    pub chunks: u64,
    /// Chunks present (durable).
    pub chunks_present: u64,
    /// `chunks_present / chunks`, in percent.
    pub percent_present: f64,
    /// Completion recorded: the cache holds the whole template.
    pub complete: bool,
    /// Client reads served wholly from the cache.
    pub hits: u64,
    /// Client reads that needed the upstream (or waited for a fetch).
    pub misses: u64,
    /// Bytes read by clients.
    pub bytes_served: u64,
    /// Reads sent to the upstream.
    pub upstream_reads: u64,
    /// Data bytes received from the upstream.
    pub bytes_from_upstream: u64,
    /// Upstream reads that failed.
    pub upstream_errors: u64,
    /// Cached chunks whose data did not match their checksum (fetched again).
    #[serde(default)]
    pub checksum_errors: u64,
    /// Fetches started ahead of client reads (sequential readahead and the
    /// neighbours of a miss, `--fetch-around`).
    #[serde(default)]
    pub speculative_fetches: u64,
    /// Units a miss fetches on each side now: `--fetch-around`, or fewer when the
    /// upstream moves fewer units than that in one round trip.
    #[serde(default)]
    pub fetch_around: u64,
    /// Fetches started whose data has not arrived yet (waiting for a fetch slot included).
    pub in_flight: usize,
    /// The cache cannot be written (full or failing): reads pass through.
    pub passthrough: bool,
    /// `off`, `running`, `done` or `failed`.
    pub prefetch: String,
    /// Bytes prefetch has fetched or asked for.
    pub prefetch_bytes: u64,
    /// Bytes prefetch marked as zero without fetching.
    pub prefetch_zero_bytes: u64,
}
