//! The fetch engine in front of every remote object: reads become few, large,
//! parallel, retried range requests.
//!
//! - A read is rounded out to whole *fetch units* (default 1 MiB), so a 4 KiB read is
//!   never a 4 KiB request; adjacent missing units are merged into one request (up to
//!   [`MAX_MERGED_UNITS`]).
//! - A unit being fetched is never fetched twice: later readers (any connection) wait
//!   for the same request.
//! - Fetched units stay in a bounded LRU memory ([`RemoteConfig::memory_budget`]), so
//!   format metadata, compressed grains and neighbouring reads are served from memory.
//! - Sequential streams (up to [`MAX_STREAMS`] at once) get readahead with a window
//!   that doubles up to [`RemoteConfig::max_readahead`].
//! - At most [`RemoteConfig::max_in_flight`] requests run at once, shared by every
//!   connection of the export; demand reads queue fairly with readahead.
//! - Transient failures are retried with exponential backoff and jitter; when the
//!   attempts run out only that read fails, and the next read tries again. An object
//!   that changed under the export fails every later fetch (units already in memory
//!   are of the pinned version and still served).
//!
//! The state lock is never held across an await or any I/O.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use futures_util::future::Shared;
use thinline_format::lru::Lru;
use tokio::sync::Semaphore;

use crate::retry::{self, Backoff};
use crate::{FetchError, FetchErrorKind, RangeBackend, RemoteConfig};

/// Most fetch units one request fetches (adjacent misses and readahead merge up to it).
pub const MAX_MERGED_UNITS: u64 = 4;

/// Most sequential streams tracked for readahead.
pub const MAX_STREAMS: usize = 8;

/// Blocks (the granularity of memory and in-flight tracking) per fetch unit.
const BLOCKS_PER_UNIT: u64 = 64;

/// Every this many random misses, one is fetched at the other size to keep both
/// timings current.
const PROBE_EVERY: u64 = 16;

/// The least time ratio (whole unit ÷ block) above which random misses fetch blocks;
/// the actual bound is higher when memory can hold much of the object (see
/// [`FetchEngine::new`]).
const MIN_UNIT_COST_RATIO: f64 = 1.5;

type FetchFuture = Shared<Pin<Box<dyn Future<Output = Result<Bytes, FetchError>> + Send>>>;

/// Counters of one engine, for logs and status output.
#[derive(Debug, Default)]
pub struct FetchStats {
    /// Reads answered entirely from memory.
    pub hits: AtomicU64,
    /// Range requests sent (attempts, retries included).
    pub requests: AtomicU64,
    /// Requests that were retries.
    pub retries: AtomicU64,
    /// Bytes received from the backend.
    pub bytes_fetched: AtomicU64,
    /// Blocks fetched by readahead.
    pub readahead_blocks: AtomicU64,
}

/// One fetch engine alive in this process, as [`live_engines`] reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineCounters {
    /// The object's URI, without credentials or query.
    pub uri: String,
    /// Range requests sent (attempts, retries included).
    pub requests: u64,
    /// Requests that were retries.
    pub retries: u64,
    /// Bytes received from the backend.
    pub bytes_fetched: u64,
    /// Reads answered entirely from memory.
    pub memory_hits: u64,
    /// Requests running now.
    pub in_flight: u64,
}

/// An engine as the process-wide list holds it: nothing that keeps it alive.
#[derive(Debug)]
struct LiveEngine {
    uri: String,
    stats: Weak<FetchStats>,
    permits: Weak<Semaphore>,
    max_in_flight: usize,
}

/// Every engine created and not yet dropped (dead entries are pruned as it is used),
/// for metrics: engines are made deep inside opened images, where no caller sees them.
static LIVE: Mutex<Vec<LiveEngine>> = Mutex::new(Vec::new());

fn live() -> std::sync::MutexGuard<'static, Vec<LiveEngine>> {
    let mut list = LIVE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    list.retain(|e| e.stats.strong_count() > 0);
    list
}

/// The counters of every fetch engine alive in this process.
pub fn live_engines() -> Vec<EngineCounters> {
    live()
        .iter()
        .filter_map(|e| {
            let stats = e.stats.upgrade()?;
            let available = e
                .permits
                .upgrade()
                .map_or(e.max_in_flight, |p| p.available_permits());
            Some(EngineCounters {
                uri: e.uri.clone(),
                requests: stats.requests.load(Ordering::Relaxed),
                retries: stats.retries.load(Ordering::Relaxed),
                bytes_fetched: stats.bytes_fetched.load(Ordering::Relaxed),
                memory_hits: stats.hits.load(Ordering::Relaxed),
                in_flight: e.max_in_flight.saturating_sub(available) as u64,
            })
        })
        .collect()
}

/// A block that is being fetched: the request's future and where the block starts in
/// its body.
#[derive(Clone)]
struct Pending {
    fetch: FetchFuture,
    /// Byte offset of the block inside the request's body.
    skip: usize,
    /// Which request registered it, so a failed request only clears its own blocks.
    request: u64,
}

/// A sequential reader: where it will read next and how far ahead to fetch.
#[derive(Debug, Clone, Copy)]
struct Stream {
    /// The block after the last one read.
    next_block: u64,
    /// Readahead window in blocks (0 until the stream proves sequential).
    window: u64,
    /// Blocks below this are already fetched or requested by readahead.
    requested_until: u64,
    last_used: u64,
}

/// Exponentially weighted mean request durations, by size class (seconds).
#[derive(Debug, Default, Clone, Copy)]
struct Timings {
    block: Option<f64>,
    unit: Option<f64>,
}

impl Timings {
    fn record(slot: &mut Option<f64>, seconds: f64) {
        *slot = Some(slot.map_or(seconds, |mean| 0.8 * mean + 0.2 * seconds));
    }
}

#[derive(Default)]
struct State {
    /// Fetched blocks by block index, each costing one block of the memory budget.
    ready: Lru<u64, Bytes>,
    pending: HashMap<u64, Pending>,
    streams: Vec<Stream>,
    clock: u64,
    next_request: u64,
    random_misses: u64,
    timings: Timings,
    /// Set once the object changed; every later fetch fails with it.
    changed: Option<FetchError>,
}

impl State {
    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    fn get_ready(&mut self, block: u64) -> Option<Bytes> {
        self.ready.get(&block).cloned()
    }

    fn insert_ready(&mut self, block: u64, bytes: Bytes) {
        self.ready.insert(block, bytes, 1);
    }

    fn known(&self, block: u64) -> bool {
        self.ready.contains_key(&block) || self.pending.contains_key(&block)
    }
}

/// Where one block of a read comes from.
enum Piece {
    Ready(Bytes),
    Pending(Pending),
}

/// Reads of one remote object, coalesced, shared, cached and retried.
pub struct FetchEngine {
    backend: Arc<dyn RangeBackend>,
    /// Granularity of memory and in-flight tracking.
    block: u64,
    /// Blocks per fetch unit.
    unit_blocks: u64,
    blocks: u64,
    max_readahead_blocks: u64,
    /// Random misses fetch blocks once a unit takes longer than this many blocks.
    unit_cost_ratio: f64,
    attempts: u32,
    backoff: Backoff,
    permits: Arc<Semaphore>,
    state: Mutex<State>,
    stats: Arc<FetchStats>,
}

impl fmt::Debug for FetchEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FetchEngine")
            .field("uri", &self.backend.uri())
            .field("unit", &self.unit())
            .finish_non_exhaustive()
    }
}

impl Drop for FetchEngine {
    fn drop(&mut self) {
        let s = &self.stats;
        tracing::info!(
            uri = %self.backend.uri(),
            requests = s.requests.load(Ordering::Relaxed),
            retries = s.retries.load(Ordering::Relaxed),
            bytes_fetched = s.bytes_fetched.load(Ordering::Relaxed),
            memory_hits = s.hits.load(Ordering::Relaxed),
            readahead_blocks = s.readahead_blocks.load(Ordering::Relaxed),
            "remote object closed"
        );
    }
}

impl FetchEngine {
    /// An engine for `backend` with the unit, limits and retry policy of `config`.
    pub fn new(backend: Arc<dyn RangeBackend>, config: &RemoteConfig) -> Arc<Self> {
        let unit = config.fetch_unit.max(4096).next_power_of_two();
        let block = (unit / BLOCKS_PER_UNIT).max(4096).min(unit);
        let size = backend.size();
        let capacity_blocks = usize::try_from(config.memory_budget / block)
            .unwrap_or(usize::MAX)
            .max((2 * MAX_MERGED_UNITS * unit / block) as usize);
        let stats = Arc::new(FetchStats::default());
        let max_in_flight = config.max_in_flight.max(1);
        let permits = Arc::new(Semaphore::new(max_in_flight));
        live().push(LiveEngine {
            uri: backend.uri().to_owned(),
            stats: Arc::downgrade(&stats),
            permits: Arc::downgrade(&permits),
            max_in_flight,
        });
        Arc::new(FetchEngine {
            block,
            unit_blocks: unit / block,
            blocks: size.div_ceil(block),
            max_readahead_blocks: config.max_readahead / block,
            // A unit pays off when its other blocks are read later from memory: with a
            // fraction `h` of the object fitting in memory, a random read hits memory
            // about `h` of the time, so units are worth up to 1 / (1 - h) blocks' time.
            // An object that fits entirely always gets whole units.
            unit_cost_ratio: if config.memory_budget >= size {
                f64::INFINITY
            } else {
                (1.0 / (1.0 - config.memory_budget as f64 / size as f64)).max(MIN_UNIT_COST_RATIO)
            },
            attempts: config.attempts.max(1),
            backoff: Backoff::from_config(config),
            permits,
            state: Mutex::new(State {
                ready: Lru::new(capacity_blocks),
                ..State::default()
            }),
            stats,
            backend,
        })
    }

    /// The object behind the engine.
    pub fn backend(&self) -> &Arc<dyn RangeBackend> {
        &self.backend
    }

    /// The object's size.
    pub fn size(&self) -> u64 {
        self.backend.size()
    }

    /// The fetch unit in bytes.
    pub fn unit(&self) -> u64 {
        self.block * self.unit_blocks
    }

    /// The engine's counters.
    pub fn stats(&self) -> &FetchStats {
        &self.stats
    }

    /// Reads `length` bytes at `offset`; the range must lie inside the object.
    pub async fn read(self: &Arc<Self>, offset: u64, length: u64) -> Result<Bytes, FetchError> {
        let size = self.size();
        if length == 0 {
            return Ok(Bytes::new());
        }
        if offset.checked_add(length).is_none_or(|end| end > size) {
            return Err(FetchError::new(
                FetchErrorKind::Permanent,
                "read",
                self.backend.uri(),
                Some((offset, length)),
                format!("the range is outside the object ({size} bytes)"),
            ));
        }
        let first = offset / self.block;
        let last = (offset + length - 1) / self.block;
        let pieces = self.plan(first, last)?;
        let mut parts = Vec::with_capacity(pieces.len());
        for piece in pieces {
            parts.push(match piece {
                Piece::Ready(bytes) => bytes,
                Piece::Pending(p) => {
                    let body = p.fetch.await?;
                    let end = (p.skip + self.block as usize).min(body.len());
                    body.slice(p.skip..end)
                }
            });
        }
        let start = (offset - first * self.block) as usize;
        if let [only] = parts.as_slice() {
            return Ok(only.slice(start..start + length as usize));
        }
        let mut out = BytesMut::with_capacity(length as usize);
        let mut skip = start;
        let mut left = length as usize;
        for part in &parts {
            let take = (part.len() - skip).min(left);
            out.extend_from_slice(&part[skip..skip + take]);
            left -= take;
            skip = 0;
        }
        Ok(out.freeze())
    }

    /// Finds each block of `first..=last` in memory or in flight, starts requests for
    /// the missing ones (rounded out to the fetch size, merged) and for readahead, and
    /// returns what to wait for.
    fn plan(self: &Arc<Self>, first: u64, last: u64) -> Result<Vec<Piece>, FetchError> {
        let mut state = self.state.lock().expect("fetch state lock poisoned");
        let sequential = self.track_stream(&mut state, first, last);
        let missing = (first..=last).any(|b| !state.known(b));
        if missing && state.changed.is_none() {
            // Round the read out to the fetch size: whole units for sequential streams
            // and latency-bound links, blocks when whole units cost far more time.
            let group = if sequential || !self.small_random_fetches(&mut state) {
                self.unit_blocks
            } else {
                1
            };
            let from = first / group * group;
            let to = ((last / group + 1) * group).min(self.blocks);
            self.fetch_missing(&mut state, from, to, false);
        }
        let mut pieces = Vec::with_capacity((last - first + 1) as usize);
        let mut all_ready = true;
        for block in first..=last {
            if let Some(bytes) = state.get_ready(block) {
                pieces.push(Piece::Ready(bytes));
            } else if let Some(p) = state.pending.get(&block) {
                all_ready = false;
                pieces.push(Piece::Pending(p.clone()));
            } else {
                // Missing blocks were requested above unless the object changed.
                return Err(state.changed.clone().unwrap_or_else(|| {
                    FetchError::new(
                        FetchErrorKind::Transient,
                        "read",
                        self.backend.uri(),
                        Some((block * self.block, self.block)),
                        "the block was neither fetched nor requested",
                    )
                }));
            }
        }
        if all_ready {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
        }
        if sequential {
            self.readahead(&mut state, last);
        }
        Ok(pieces)
    }

    /// Whether a random miss should fetch single blocks: only when measured whole-unit
    /// requests take more than `unit_cost_ratio` times as long as block requests. Every
    /// [`PROBE_EVERY`]th miss uses the other size, to keep both timings current.
    fn small_random_fetches(&self, state: &mut State) -> bool {
        if self.unit_cost_ratio.is_infinite() {
            return false; // The whole object fits in memory: units always pay off.
        }
        state.random_misses += 1;
        let probe = state.random_misses.is_multiple_of(PROBE_EVERY);
        let small = match (state.timings.block, state.timings.unit) {
            (Some(block), Some(unit)) => unit > self.unit_cost_ratio * block,
            _ => false,
        };
        small != probe
    }

    /// Starts requests for every block of `from..to` that is neither in memory nor in
    /// flight, merging neighbours up to [`MAX_MERGED_UNITS`] units per request.
    fn fetch_missing(self: &Arc<Self>, state: &mut State, from: u64, to: u64, readahead: bool) {
        let max = MAX_MERGED_UNITS * self.unit_blocks;
        let mut block = from;
        while block < to {
            if state.known(block) {
                block += 1;
                continue;
            }
            let mut count = 1;
            while count < max && block + count < to && !state.known(block + count) {
                count += 1;
            }
            if readahead {
                self.stats
                    .readahead_blocks
                    .fetch_add(count, Ordering::Relaxed);
            }
            self.start_fetch(state, block, count);
            block += count;
        }
    }

    /// Registers one request for blocks `first..first + count` and spawns it.
    fn start_fetch(self: &Arc<Self>, state: &mut State, first: u64, count: u64) {
        let request = state.next_request;
        state.next_request += 1;
        let offset = first * self.block;
        let length = (count * self.block).min(self.size() - offset);
        let engine = Arc::clone(self);
        let task = tokio::spawn(async move { engine.fetch(request, first, offset, length).await });
        let uri = self.backend.uri().to_owned();
        let fetch: Pin<Box<dyn Future<Output = _> + Send>> = Box::pin(async move {
            task.await.unwrap_or_else(|e| {
                Err(FetchError::new(
                    FetchErrorKind::Transient,
                    "read",
                    &uri,
                    Some((offset, length)),
                    format!("the fetch task failed: {e}"),
                ))
            })
        });
        let fetch = fetch.shared();
        for i in 0..count {
            state.pending.insert(
                first + i,
                Pending {
                    fetch: fetch.clone(),
                    skip: (i * self.block) as usize,
                    request,
                },
            );
        }
    }

    /// Follows sequential streams: true if the read `first..=last` continues one (its
    /// readahead window grows), false if it starts or restarts one.
    fn track_stream(&self, state: &mut State, first: u64, last: u64) -> bool {
        if self.max_readahead_blocks == 0 {
            return false;
        }
        let now = state.tick();
        let found = state
            .streams
            .iter()
            .position(|s| first == s.next_block || first + 1 == s.next_block);
        match found {
            Some(i) => {
                let unit_blocks = self.unit_blocks;
                let max = self.max_readahead_blocks;
                let s = &mut state.streams[i];
                s.last_used = now;
                if last >= s.next_block {
                    s.next_block = last + 1;
                    s.window = (s.window * 2).max(unit_blocks).min(max);
                }
                true
            }
            None => {
                let s = Stream {
                    next_block: last + 1,
                    window: 0,
                    requested_until: last + 1,
                    last_used: now,
                };
                if state.streams.len() < MAX_STREAMS {
                    state.streams.push(s);
                } else if let Some(oldest) = state.streams.iter_mut().min_by_key(|s| s.last_used) {
                    *oldest = s;
                }
                false
            }
        }
    }

    /// Requests the blocks ahead of the stream that just read up to `last`.
    fn readahead(self: &Arc<Self>, state: &mut State, last: u64) {
        let Some(i) = state.streams.iter().position(|s| s.next_block == last + 1) else {
            return;
        };
        let stream = state.streams[i];
        if state.changed.is_some() || stream.window == 0 {
            return;
        }
        let target = (stream.next_block + stream.window).min(self.blocks);
        let from = stream.requested_until.max(stream.next_block);
        // Top the window up in whole merged requests, not one block at a time.
        let step = (MAX_MERGED_UNITS * self.unit_blocks).min(stream.window);
        if target < from + step && target < self.blocks {
            return;
        }
        state.streams[i].requested_until = target.max(from);
        self.fetch_missing(state, from, target, true);
    }

    /// Runs one request with retries, then files its blocks as ready (or forgets them
    /// on failure so the next read tries again).
    async fn fetch(
        self: Arc<Self>,
        request: u64,
        first: u64,
        offset: u64,
        length: u64,
    ) -> Result<Bytes, FetchError> {
        let result = self.fetch_with_retries(offset, length).await;
        let mut state = self.state.lock().expect("fetch state lock poisoned");
        let count = length.div_ceil(self.block);
        for i in 0..count {
            if state
                .pending
                .get(&(first + i))
                .is_some_and(|p| p.request == request)
            {
                state.pending.remove(&(first + i));
            }
        }
        match &result {
            Ok((body, seconds)) => {
                if count <= 2 {
                    Timings::record(&mut state.timings.block, *seconds);
                } else if count == self.unit_blocks {
                    Timings::record(&mut state.timings.unit, *seconds);
                }
                for i in 0..count {
                    let start = (i * self.block) as usize;
                    let end = (start + self.block as usize).min(body.len());
                    state.insert_ready(first + i, body.slice(start..end));
                }
            }
            Err(e) if e.kind == FetchErrorKind::Changed => {
                if state.changed.is_none() {
                    tracing::error!(
                        "{e}; the export keeps failing reads of data it has not fetched yet"
                    );
                    state.changed = Some(e.clone());
                }
            }
            Err(e) => tracing::error!("{e}; giving up on this read"),
        }
        result.map(|(body, _)| body)
    }

    /// One request, retried; the body and how long its successful attempt took.
    async fn fetch_with_retries(
        &self,
        offset: u64,
        length: u64,
    ) -> Result<(Bytes, f64), FetchError> {
        retry::run(
            self.attempts,
            &self.backoff,
            |attempt| async move {
                if attempt > 1 {
                    self.stats.retries.fetch_add(1, Ordering::Relaxed);
                }
                let permit = self
                    .permits
                    .acquire()
                    .await
                    .expect("the semaphore is never closed");
                self.stats.requests.fetch_add(1, Ordering::Relaxed);
                let started = std::time::Instant::now();
                let result = self.backend.read(offset, length).await;
                let seconds = started.elapsed().as_secs_f64();
                drop(permit);
                match result {
                    Ok(body) if body.len() as u64 == length => {
                        self.stats
                            .bytes_fetched
                            .fetch_add(length, Ordering::Relaxed);
                        Ok((body, seconds))
                    }
                    // Backends check lengths; this is a backstop.
                    Ok(body) => Err(FetchError::new(
                        FetchErrorKind::Transient,
                        "read",
                        self.backend.uri(),
                        Some((offset, length)),
                        format!("short body: {} of {length} bytes", body.len()),
                    )),
                    Err(e) => Err(e),
                }
            },
            |e, attempt| {
                tracing::warn!("{e}; retrying (attempt {attempt} of {})", self.attempts);
            },
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use std::sync::atomic::AtomicU32;
    use std::time::Duration;

    /// An in-memory object that records requests and fails on demand.
    #[derive(Debug)]
    struct Recorder {
        data: Bytes,
        requests: Mutex<Vec<(u64, u64)>>,
        failures_left: AtomicU32,
        fail_kind: FetchErrorKind,
        delay: Duration,
    }

    impl Recorder {
        fn new(size: usize) -> Arc<Self> {
            let data: Vec<u8> = (0..size).map(|i| (i * 7 + i / 4096) as u8).collect();
            Arc::new(Recorder {
                data: data.into(),
                requests: Mutex::new(Vec::new()),
                failures_left: AtomicU32::new(0),
                fail_kind: FetchErrorKind::Transient,
                delay: Duration::from_millis(20),
            })
        }
        fn requests(&self) -> Vec<(u64, u64)> {
            self.requests.lock().unwrap().clone()
        }
    }

    #[async_trait]
    impl RangeBackend for Recorder {
        fn uri(&self) -> &str {
            "mem://recorder"
        }
        fn size(&self) -> u64 {
            self.data.len() as u64
        }
        fn identity(&self) -> &str {
            "test"
        }
        async fn read(&self, offset: u64, length: u64) -> Result<Bytes, FetchError> {
            self.requests.lock().unwrap().push((offset, length));
            tokio::time::sleep(self.delay).await;
            if self
                .failures_left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(FetchError::new(
                    self.fail_kind,
                    "read",
                    self.uri(),
                    Some((offset, length)),
                    "injected",
                ));
            }
            Ok(self.data.slice(offset as usize..(offset + length) as usize))
        }
        async fn open_related(&self, _: &str) -> Result<Arc<dyn RangeBackend>, FetchError> {
            unreachable!()
        }
    }

    fn config() -> RemoteConfig {
        RemoteConfig {
            fetch_unit: 64 << 10,
            backoff_base: Duration::from_millis(1),
            backoff_max: Duration::from_millis(5),
            attempts: 3,
            ..RemoteConfig::default()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn small_reads_become_one_unit_request_shared_by_concurrent_readers() {
        let backend = Recorder::new(1 << 20);
        let no_readahead = RemoteConfig {
            max_readahead: 0,
            ..config()
        };
        let engine = FetchEngine::new(backend.clone(), &no_readahead);
        let reads = (0..8).map(|i| {
            let engine = Arc::clone(&engine);
            tokio::spawn(async move { engine.read(100 + i * 4096, 4096).await })
        });
        for (i, r) in futures_util::future::join_all(reads)
            .await
            .into_iter()
            .enumerate()
        {
            let start = 100 + i * 4096;
            assert_eq!(r.unwrap().unwrap(), backend.data.slice(start..start + 4096));
        }
        assert_eq!(backend.requests(), vec![(0, 64 << 10)]);
        // Served from memory afterwards.
        engine.read(5000, 10).await.unwrap();
        assert_eq!(backend.requests().len(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn adjacent_misses_merge_and_the_tail_unit_is_short() {
        let size = (64 << 10) * 5 + 123;
        let backend = Recorder::new(size);
        let engine = FetchEngine::new(backend.clone(), &config());
        let got = engine.read(10, size as u64 - 20).await.unwrap();
        assert_eq!(got, backend.data.slice(10..size - 10));
        let mut requests = backend.requests();
        requests.sort_unstable();
        assert_eq!(
            requests,
            vec![(0, 4 * (64 << 10)), (4 * (64 << 10), (64 << 10) + 123)]
        );
        assert!(engine.read(size as u64 - 5, 10).await.is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn transient_failures_are_retried_then_reported_and_the_next_read_recovers() {
        let backend = Recorder::new(1 << 20);
        backend.failures_left.store(2, Ordering::SeqCst);
        let engine = FetchEngine::new(backend.clone(), &config());
        assert_eq!(engine.read(0, 10).await.unwrap(), backend.data.slice(0..10));
        assert_eq!(backend.requests().len(), 3);

        backend.failures_left.store(3, Ordering::SeqCst);
        let e = engine.read(200 << 10, 10).await.unwrap_err();
        assert!(e.to_string().contains("injected"), "{e}");
        assert!(e.to_string().contains("mem://recorder bytes"), "{e}");
        assert_eq!(
            engine.read(200 << 10, 10).await.unwrap(),
            backend.data.slice((200 << 10)..(200 << 10) + 10)
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_changed_object_fails_every_later_fetch_but_memory_still_serves() {
        let mut backend = Recorder::new(1 << 20);
        Arc::get_mut(&mut backend).unwrap().fail_kind = FetchErrorKind::Changed;
        let engine = FetchEngine::new(backend.clone(), &config());
        engine.read(0, 10).await.unwrap();
        backend.failures_left.store(1, Ordering::SeqCst);
        assert_eq!(
            engine.read(300 << 10, 1).await.unwrap_err().kind,
            FetchErrorKind::Changed
        );
        let before = backend.requests().len();
        assert_eq!(
            engine.read(400 << 10, 1).await.unwrap_err().kind,
            FetchErrorKind::Changed
        );
        assert_eq!(
            backend.requests().len(),
            before,
            "no request after a change"
        );
        engine.read(0, 10).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_live_engine_is_listed_with_its_counters_until_it_is_dropped() {
        #[derive(Debug)]
        struct Named(Arc<Recorder>);
        #[async_trait]
        impl RangeBackend for Named {
            fn uri(&self) -> &str {
                "mem://listed-while-alive"
            }
            fn size(&self) -> u64 {
                self.0.size()
            }
            fn identity(&self) -> &str {
                "listed"
            }
            async fn read(&self, offset: u64, length: u64) -> Result<Bytes, FetchError> {
                self.0.read(offset, length).await
            }
            async fn open_related(&self, _: &str) -> Result<Arc<dyn RangeBackend>, FetchError> {
                unreachable!()
            }
        }
        let ours = || {
            live_engines()
                .into_iter()
                .filter(|e| e.uri == "mem://listed-while-alive")
                .collect::<Vec<_>>()
        };
        let engine = FetchEngine::new(Arc::new(Named(Recorder::new(1 << 20))), &config());
        engine.read(0, 4096).await.unwrap();
        let listed = ours();
        assert_eq!(listed.len(), 1);
        assert_eq!(
            (
                listed[0].requests,
                listed[0].bytes_fetched,
                listed[0].in_flight
            ),
            (1, 64 << 10, 0)
        );
        drop(engine);
        assert!(ours().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sequential_reads_grow_a_readahead_window() {
        let backend = Recorder::new(4 << 20);
        let engine = FetchEngine::new(backend.clone(), &config());
        let unit = 64 << 10;
        for i in 0..8u64 {
            engine.read(i * unit, unit).await.unwrap();
        }
        // Readahead requested units beyond the 8 read.
        let highest = backend.requests().iter().map(|r| r.0 + r.1).max().unwrap();
        assert!(highest > 8 * unit, "{highest}");
        // A random read elsewhere starts no readahead.
        let backend = Recorder::new(4 << 20);
        let engine = FetchEngine::new(backend.clone(), &config());
        engine.read(3 << 20, 10).await.unwrap();
        engine.read(1 << 20, 10).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(backend.requests().len(), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn random_misses_fetch_blocks_when_whole_units_cost_much_more() {
        // A bandwidth-bound link: time grows with size (1 ms per 16 KiB: a unit costs
        // 64 times a block's time, which scheduling noise on a loaded machine cannot hide).
        #[derive(Debug)]
        struct Slow(Recorder);
        #[async_trait]
        impl RangeBackend for Slow {
            fn uri(&self) -> &str {
                "mem://slow"
            }
            fn size(&self) -> u64 {
                self.0.size()
            }
            fn identity(&self) -> &str {
                "slow"
            }
            async fn read(&self, offset: u64, length: u64) -> Result<Bytes, FetchError> {
                tokio::time::sleep(Duration::from_millis(length.div_ceil(16 << 10))).await;
                self.0.requests.lock().unwrap().push((offset, length));
                Ok(self
                    .0
                    .data
                    .slice(offset as usize..(offset + length) as usize))
            }
            async fn open_related(&self, _: &str) -> Result<Arc<dyn RangeBackend>, FetchError> {
                unreachable!()
            }
        }
        let inner = Arc::try_unwrap(Recorder::new(64 << 20)).unwrap();
        let backend = Arc::new(Slow(inner));
        let engine = FetchEngine::new(
            backend.clone(),
            &RemoteConfig {
                fetch_unit: 1 << 20,
                max_readahead: 0,
                memory_budget: 8 << 20,
                ..config()
            },
        );
        // Random 4 KiB reads far apart: first whole units, then (once the probe has
        // timed a block) blocks of 16 KiB.
        for i in 0..48u64 {
            let offset = (i * 7919 % 60) << 20;
            let got = engine.read(offset + 4096, 4096).await.unwrap();
            assert_eq!(
                got,
                backend
                    .0
                    .data
                    .slice((offset + 4096) as usize..(offset + 8192) as usize)
            );
        }
        let requests = backend.0.requests();
        assert_eq!(requests[0].1, 1 << 20, "{requests:?}");
        let last: Vec<u64> = requests[requests.len() - 8..].iter().map(|r| r.1).collect();
        assert!(
            last.iter().filter(|&&l| l == 16 << 10).count() >= 6,
            "{requests:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn memory_stays_within_its_budget() {
        let backend = Recorder::new(4 << 20);
        let engine = FetchEngine::new(
            backend.clone(),
            &RemoteConfig {
                memory_budget: 8 * (64 << 10),
                ..config()
            },
        );
        for i in (0..64u64).rev() {
            engine.read(i * (64 << 10), 1).await.unwrap();
        }
        let blocks = engine.state.lock().unwrap().ready.len() as u64;
        assert!(blocks * engine.block <= 8 * (64 << 10), "{blocks} blocks");
    }
}
