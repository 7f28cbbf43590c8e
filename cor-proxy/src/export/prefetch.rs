//! Background hydration: fetch the whole template into the cache, skipping what the
//! upstream reports as zero, at a bounded rate, and only while no demand read waits.
//!
//! Prefetch goes through the same in-flight map as demand reads, so a client reading a
//! unit being prefetched waits for that fetch instead of starting another. Zero ranges
//! are punched in the cache and marked without any upstream read. When every chunk is
//! present the cache records completion (see `export::batcher`), which tells the agent
//! it may swap dm-thin's external origin to the cache.
//!
//! Owns the demand gate (demand reads waiting for a fetch, which prefetch yields to)
//! and prefetch's progress.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use thinline_nbd::DataError;
use thinline_nbd::proto::state;

use super::Inner;

/// Bytes asked of the upstream's block status at a time.
const REGION: u64 = 64 << 20;
/// Prefetch fetches in flight at most (demand reads get the rest of the permits).
const PREFETCH_PARALLEL: usize = 4;
/// How often progress is logged.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// How to prefetch.
#[derive(Debug, Clone, Default)]
pub struct PrefetchOptions {
    /// Most bytes per second fetched from the upstream by prefetch (`None`: no limit).
    pub rate: Option<u64>,
}

/// Demand reads waiting for a fetch; prefetch waits while there is any.
#[derive(Debug, Default)]
pub(super) struct Demand {
    waiting: AtomicUsize,
    idle: tokio::sync::Notify,
}

impl Demand {
    /// A demand read starts waiting for a fetch, until the returned guard is dropped
    /// (also when the read is cancelled: its client went away).
    pub(super) fn enter(&self) -> DemandWait<'_> {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        DemandWait(self)
    }

    /// A demand read stopped waiting; the last one wakes prefetch.
    fn leave(&self) {
        if self.waiting.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.idle.notify_waiters();
        }
    }

    /// Returns once no demand read waits (checking at least every 50 ms).
    async fn idle(&self) {
        while self.waiting.load(Ordering::SeqCst) > 0 {
            let idle = self.idle.notified();
            if self.waiting.load(Ordering::SeqCst) == 0 {
                break;
            }
            let _ = tokio::time::timeout(Duration::from_millis(50), idle).await;
        }
    }
}

/// A demand read waiting for a fetch; prefetch yields while one exists.
#[derive(Debug)]
pub(super) struct DemandWait<'a>(&'a Demand);

impl Drop for DemandWait<'_> {
    fn drop(&mut self) {
        self.0.leave();
    }
}

/// Where prefetch is, for `status`.
#[derive(Debug, Default)]
pub(super) struct PrefetchProgress {
    /// 0 off, 1 running, 2 done, 3 failed.
    state: AtomicU8,
    bytes: AtomicU64,
    zero_bytes: AtomicU64,
}

impl PrefetchProgress {
    /// The state as shown: `off`, `running`, `done` or `failed`.
    pub(super) fn state_name(&self) -> &'static str {
        match self.state.load(Ordering::Relaxed) {
            1 => "running",
            2 => "done",
            3 => "failed",
            _ => "off",
        }
    }

    /// Marks a hydration as running unless one runs; whether it was not.
    pub(super) fn try_start(&self) -> bool {
        self.state
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
                (s != 1).then_some(1)
            })
            .is_ok()
    }

    /// Bytes fetched or asked for.
    pub(super) fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Bytes marked as zero without fetching.
    pub(super) fn zero_bytes(&self) -> u64 {
        self.zero_bytes.load(Ordering::Relaxed)
    }
}

/// Hydrates the whole template in the background (spawned by `CorExport::start_prefetch`).
pub(super) async fn run(inner: Arc<Inner>, options: PrefetchOptions) {
    let progress = inner.prefetch_progress();
    progress.state.store(1, Ordering::Relaxed);
    let started = Instant::now();
    tracing::info!(
        cache = %inner.cache().path().display(),
        rate = ?options.rate,
        "prefetch started"
    );
    match hydrate_all(&inner, &options, started).await {
        Ok(()) => {
            progress.state.store(2, Ordering::Relaxed);
            tracing::info!(
                cache = %inner.cache().path().display(),
                fetched_bytes = progress.bytes(),
                zero_bytes = progress.zero_bytes(),
                seconds = started.elapsed().as_secs_f64(),
                "prefetch finished"
            );
        }
        Err(e) => {
            progress.state.store(3, Ordering::Relaxed);
            tracing::error!(
                cache = %inner.cache().path().display(),
                error = %e,
                "prefetch stopped; demand reads still fetch what they need"
            );
        }
    }
}

async fn hydrate_all(
    inner: &Arc<Inner>,
    options: &PrefetchOptions,
    started: Instant,
) -> thinline_nbd::Result<()> {
    let size = inner.cache().size();
    let chunk = inner.cache().chunk_size();
    let mut last_log = Instant::now();
    let mut region = 0;
    while region < size {
        let region_end = (region + REGION).min(size);
        let (rf, re) = (region / chunk, region_end.div_ceil(chunk));
        if inner.cache().all_present(rf, re) {
            region = region_end;
            continue;
        }
        let mut pos = region;
        while pos < region_end {
            let extents = inner.upstream().allocation(pos, region_end - pos).await?;
            for e in extents {
                let hi = (pos + e.length).min(region_end);
                if e.flags & u64::from(state::ZERO) != 0 {
                    zero_range(inner, pos, hi).map_err(|e| *e)?;
                } else {
                    fetch_range(inner, options, pos, hi, started).await?;
                }
                pos = hi;
                if pos >= region_end {
                    break;
                }
            }
            if last_log.elapsed() >= LOG_EVERY {
                last_log = Instant::now();
                let present = inner.cache().present_chunks();
                tracing::info!(
                    cache = %inner.cache().path().display(),
                    percent = format!("{:.1}", 100.0 * present as f64 / inner.cache().chunks().max(1) as f64),
                    fetched_mib = inner.prefetch_progress().bytes() >> 20,
                    "prefetch progress"
                );
            }
        }
        region = region_end;
    }
    Ok(())
}

/// Marks the absent chunks lying wholly inside `[lo, hi)` as zero, without fetching.
fn zero_range(inner: &Inner, lo: u64, hi: u64) -> Result<(), Box<thinline_nbd::Error>> {
    let chunk = inner.cache().chunk_size();
    let first = lo.div_ceil(chunk);
    // The template's last chunk may be short: it is whole if the range reaches the end.
    let end = if hi == inner.cache().size() {
        hi.div_ceil(chunk)
    } else {
        hi / chunk
    };
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for i in first..end {
        if inner.cache().is_present(i) {
            continue;
        }
        match runs.last_mut() {
            Some((_, e)) if *e == i => *e += 1,
            _ => runs.push((i, i + 1)),
        }
    }
    if runs.is_empty() {
        return Ok(());
    }
    for &(f, e) in &runs {
        let off = f * chunk;
        let len = (e * chunk).min(inner.cache().size()) - off;
        inner.cache().write_zeroes(off, len).map_err(|source| {
            Box::new(thinline_nbd::Error::from(DataError::io(
                "zero cache",
                inner.cache().path().display(),
                off,
                len,
                source,
            )))
        })?;
        inner
            .prefetch_progress()
            .zero_bytes
            .fetch_add(len, Ordering::Relaxed);
    }
    let sums: Vec<(u64, u32)> = runs
        .iter()
        .flat_map(|&(f, e)| f..e)
        .map(|i| (i, inner.cache().zero_sum_of(i)))
        .collect();
    inner.cache().write_sums(&sums).map_err(|source| {
        Box::new(thinline_nbd::Error::from(DataError::io(
            "write cache checksums",
            inner.cache().path().display(),
            runs[0].0 * chunk,
            0,
            source,
        )))
    })?;
    inner.queue_zeroed(runs);
    Ok(())
}

/// Fetches the absent units overlapping `[lo, hi)`, a few at a time, yielding to
/// demand reads and keeping under the rate limit.
async fn fetch_range(
    inner: &Arc<Inner>,
    options: &PrefetchOptions,
    lo: u64,
    hi: u64,
    started: Instant,
) -> thinline_nbd::Result<()> {
    let unit = inner.unit();
    let mut pending = futures_util::stream::FuturesUnordered::new();
    use futures_util::StreamExt;
    for u in lo / unit..hi.div_ceil(unit) {
        if inner.durability().is_passthrough() {
            return Err(thinline_nbd::Error::from(DataError::io(
                "prefetch",
                inner.cache().path().display(),
                u * unit,
                unit,
                std::io::Error::other("the cache cannot be written (see above)"),
            )));
        }
        let start = u * unit;
        let len = unit.min(inner.cache().size() - start);
        let (f, e) = (
            start / inner.cache().chunk_size(),
            (start + len).div_ceil(inner.cache().chunk_size()),
        );
        if inner.cache().all_present(f, e) {
            continue;
        }
        // Demand first: wait while any client read waits for a fetch.
        inner.demand().idle().await;
        if let Some(rate) = options.rate.filter(|&r| r > 0) {
            let due =
                Duration::from_secs_f64(inner.prefetch_progress().bytes() as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
        while pending.len() >= PREFETCH_PARALLEL {
            pending.next().await.expect("not empty")?;
        }
        inner
            .prefetch_progress()
            .bytes
            .fetch_add(len, Ordering::Relaxed);
        let inner = Arc::clone(inner);
        pending.push(async move { inner.hydrate(start, len, false).await });
    }
    while let Some(r) = pending.next().await {
        r?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_cancelled_demand_read_does_not_keep_prefetch_waiting() {
        let demand = Demand::default();
        let mut read = Box::pin(async {
            let _waiting = demand.enter();
            std::future::pending::<()>().await;
        });
        tokio::select! {
            biased;
            _ = read.as_mut() => unreachable!("the read never finishes"),
            _ = async {} => {}
        }
        assert!(
            tokio::time::timeout(Duration::from_millis(100), demand.idle())
                .await
                .is_err(),
            "prefetch must yield while a demand read waits"
        );
        drop(read);
        tokio::time::timeout(Duration::from_secs(5), demand.idle())
            .await
            .expect("prefetch went on waiting for a read whose client is gone");
    }
}
