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
//!
//! The engine's state is owned by `state` (the shared parts and the counters); each
//! concern owns its own part and is the only code that changes it: `in_flight` (one
//! fetch per unit, fetch slots), `fetch` (one unit's upstream reads and cache writes),
//! `speculation` (readahead, fetch-around, the link estimate), `allocation` (the
//! upstream's block status, learnt once), `durability` (the batcher, pass-through) and
//! [`prefetch`] (background hydration, the demand gate). This file is the public
//! handle and the read path.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use thinline_nbd::export::{Capabilities, Export, Extent, ReadChunk, StatusQuery};
use thinline_nbd::proto::{ALLOCATION_DEPTH, BASE_ALLOCATION};
use thinline_nbd::{DataError, Error, Result};

use crate::cache::{CacheFile, CacheOptions, DEFAULT_CHUNK_SIZE, OnMismatch};
use crate::upstream::Upstream;

mod allocation;
mod durability;
mod fetch;
mod in_flight;
pub mod prefetch;
mod speculation;
mod state;
#[cfg(test)]
mod tests;

use durability::{Durability, batcher};
use in_flight::InFlight;
use prefetch::PrefetchOptions;
use state::Inner;
pub use state::Status;

const CONTEXTS: [&str; 2] = [BASE_ALLOCATION, ALLOCATION_DEPTH];

/// Default fetch unit: one upstream read fills this many bytes of chunks.
pub const DEFAULT_FETCH_UNIT: u64 = 1 << 20;
/// Default number of upstream fetches in flight (demand and prefetch together).
pub const DEFAULT_MAX_FETCHES: usize = 16;
/// Default number of units fetched on each side of a missed one.
pub const DEFAULT_FETCH_AROUND: u64 = 4;

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
        let (durability, rx) = Durability::new();
        let inner = Arc::new(Inner::new(
            upstream,
            Arc::clone(&cache),
            unit,
            options,
            durability,
        ));
        tracing::info!(
            cache = %cache.path().display(),
            upstream = %inner.upstream().name(),
            present = cache.present_chunks(),
            chunks = cache.chunks(),
            chunk_size = chunk,
            complete = cache.is_complete(),
            "copy-on-read cache open"
        );
        tokio::spawn(batcher(Arc::clone(&cache), Arc::downgrade(&inner), rx));
        let export = CorExport { inner };
        if let Some(p) = &options.prefetch {
            export.start_prefetch(p.clone());
        }
        if !cache.is_complete() && !export.inner.upstream().reads_report_holes() {
            tokio::spawn(allocation::learn_allocation(Arc::downgrade(&export.inner)));
        }
        Ok(export)
    }

    /// The cache.
    pub fn cache(&self) -> &CacheFile {
        self.inner.cache()
    }

    /// The upstream.
    pub fn upstream(&self) -> &Arc<dyn Upstream> {
        self.inner.upstream()
    }

    /// A snapshot of the counters and progress.
    pub fn status(&self) -> Status {
        self.inner.status()
    }

    /// Waits (at most `limit`) until no fetch is in flight or waiting to be marked, so
    /// a graceful stop keeps what was fetched. Returns false on timeout.
    pub async fn settle(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if self.inner.in_flight().is_empty() {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Starts hydrating the whole template in the background (what
    /// [`CorOptions::prefetch`] does at open) unless a hydration runs; one that ended
    /// (done or failed) starts again and fetches only what is still missing. Returns
    /// whether it started one. Call from within a tokio runtime.
    pub fn start_prefetch(&self, options: PrefetchOptions) -> bool {
        if !self.inner.prefetch_progress().try_start() {
            return false;
        }
        tokio::spawn(prefetch::run(Arc::clone(&self.inner), options));
        true
    }

    /// Fetches whatever of `[offset, offset + length)` is not cached yet and waits
    /// until it is (or the fetch fails).
    pub async fn hydrate(&self, offset: u64, length: u64) -> Result<()> {
        self.inner.hydrate(offset, length, true).await
    }
}

/// The read path: the cache, verified, or the bytes of a fetch in flight.
impl Inner {
    async fn cache_read(&self, offset: u64, length: u64) -> Result<ReadChunk> {
        self.cache_bytes(offset, length).await.map(ReadChunk::Data)
    }

    async fn cache_bytes(&self, offset: u64, length: u64) -> Result<Bytes> {
        self.reader()
            .read_exact(offset, length as usize)
            .await
            .map(|b| b.freeze())
            .map_err(|source| {
                Error::from(DataError::io(
                    "read cache",
                    self.cache().path().display(),
                    offset,
                    length,
                    source,
                ))
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
        if self.cache().all_verified(first, end) {
            return Ok(vec![self.cache_read(offset, length).await?]);
        }
        self.stats().upstream_read(1, 0);
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
        let span = (end * c).min(self.cache().size()) - start;
        let data = self.cache_bytes(start, span).await?;
        let mut bad = Vec::new();
        let mut whole = true;
        for i in first..end {
            if !self.cache().is_present(i) {
                whole = false;
                continue;
            }
            if self.cache().is_verified(i) {
                continue;
            }
            let lo = ((i - first) * c) as usize;
            let hi = (lo + c as usize).min(data.len());
            if !self.cache().check_chunk(i, &data[lo..hi]) {
                bad.push((i, i * c));
            }
        }
        if bad.is_empty() {
            let lo = (offset - start) as usize;
            return Ok(whole.then(|| data.slice(lo..lo + length as usize)));
        }
        let cache = Arc::clone(self.cache());
        let chunks: Vec<u64> = bad.iter().map(|&(i, _)| i).collect();
        tokio::task::spawn_blocking(move || cache.clear_chunks(&chunks))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))
            .and_then(|r| r.map_err(std::io::Error::other))
            .map_err(|source| {
                Error::from(DataError::io(
                    "forget bad chunks",
                    self.cache().path().display(),
                    start,
                    span,
                    source,
                ))
            })?;
        for &(chunk, offset) in &bad {
            self.stats().checksum_error();
            tracing::error!(
                cache = %self.cache().path().display(),
                chunk,
                offset,
                length = self.chunk(),
                "cached chunk does not match its checksum (bit rot, a scribbled file or a \
                 forged presence map): forgotten and fetched again"
            );
        }
        Ok(None)
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

#[async_trait]
impl Export for CorExport {
    fn size(&self) -> u64 {
        self.inner.cache().size()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            cache: true,
            ..Capabilities::READ_ONLY
        }
    }

    fn description(&self) -> Option<String> {
        Some(self.inner.description().to_owned())
    }

    fn meta_contexts(&self) -> &[&'static str] {
        &CONTEXTS
    }

    async fn read(&self, offset: u64, length: u32) -> Result<Vec<ReadChunk>> {
        let inner = &self.inner;
        let length = u64::from(length);
        inner.stats().served(length);
        let (cf, ce) = inner.chunk_range(offset, length);
        let mut hit = inner.cache().all_verified(cf, ce);
        if !hit && inner.cache().needs_verify(cf, ce) {
            // Chunks read from disk the first time are checked; bad ones are fetched.
            if let Some(data) = inner.verify(offset, length, (cf, ce)).await? {
                inner.stats().hit();
                return Ok(vec![ReadChunk::Data(data)]);
            }
            hit = inner.cache().all_verified(cf, ce);
        }
        if hit {
            inner.stats().hit();
            return Ok(vec![inner.cache_read(offset, length).await?]);
        }
        inner.stats().miss();
        let end = offset + length;
        let unit = inner.unit();
        let (first, last) = (offset / unit, (end - 1) / unit);
        // The read's own units first, so their requests go out ahead of speculation.
        let spans: Vec<_> = (first..=last)
            .map(|u| {
                let (lo, hi) = (offset.max(u * unit), end.min((u + 1) * unit));
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
        DataError::read_only(self.inner.cache().path().display()).into()
    }

    async fn cache(&self, offset: u64, length: u64) -> Result<()> {
        self.inner.hydrate(offset, length, true).await
    }

    async fn block_status(&self, q: StatusQuery) -> Result<Vec<Extent>> {
        let (offset, length) = (q.offset, q.length);
        let inner = &self.inner;
        if q.context == 0 {
            return inner.upstream().allocation(offset, length).await;
        }
        // qemu:allocation-depth: 1 = in the cache, 2 = only upstream.
        let c = inner.chunk();
        let end = offset + length;
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let i = pos / c;
            let hi = ((i + 1) * c).min(end);
            let depth = if inner.cache().is_present(i) { 1 } else { 2 };
            match out.last_mut() {
                Some(e) if e.flags == depth => e.length += hi - pos,
                _ => {
                    if out.len() == q.max_extents.max(1) {
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
