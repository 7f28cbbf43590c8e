//! Durability: filled chunks are made durable in batches (one fsync, then the bits,
//! then the map pages), completion is recorded, and a cache that cannot be written
//! turns the export into a pass-through. Owns the queue of filled chunks and the
//! pass-through flag; the batcher is the only code that sets presence bits.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, mpsc};

use super::{CacheFile, Inner, error_chain};

/// Filled units wait at most this long for the fsync that makes them present.
const SYNC_INTERVAL: Duration = Duration::from_millis(20);
/// Most filled units made durable by one fsync.
const SYNC_BATCH: usize = 256;

/// Filled chunks waiting for the fsync that makes them present.
#[derive(Debug)]
pub(super) struct Filled {
    /// The in-flight entry to drop once marked (`None` for prefetched holes).
    unit: Option<u64>,
    /// Chunk ranges `[first, end)`.
    chunks: Vec<(u64, u64)>,
    /// Held until durable, which bounds the memory of fetched-but-unmarked units.
    _permit: Option<OwnedSemaphorePermit>,
}

/// Where filled chunks go to be made durable, and whether the cache is still written.
#[derive(Debug)]
pub(super) struct Durability {
    filled: mpsc::UnboundedSender<Filled>,
    /// Set when the cache cannot be written: reads pass through.
    passthrough: AtomicBool,
}

impl Durability {
    /// The sending end, and the receiving end for [`batcher`].
    pub(super) fn new() -> (Durability, mpsc::UnboundedReceiver<Filled>) {
        let (filled, rx) = mpsc::unbounded_channel();
        let d = Durability {
            filled,
            passthrough: AtomicBool::new(false),
        };
        (d, rx)
    }

    /// True once the cache cannot be written: reads pass through.
    pub(super) fn is_passthrough(&self) -> bool {
        self.passthrough.load(Ordering::Relaxed)
    }

    fn send(&self, f: Filled) {
        let _ = self.filled.send(f);
    }
}

/// True for write errors that mean "the cache is full".
fn is_full(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG)
    )
}

impl Inner {
    /// Stops writing to the cache after a write or sync failure; logged once.
    pub(super) fn enter_passthrough(&self, e: &std::io::Error, op: &str) {
        if !self.durability().passthrough.swap(true, Ordering::SeqCst) {
            let why = if is_full(e) { "full" } else { "failing" };
            let cache = self.cache();
            tracing::error!(
                cache = %cache.path().display(),
                error = %e,
                present = cache.present_chunks(),
                chunks = cache.chunks(),
                "cache {why} ({op} failed): reads now pass through to the upstream; \
                 chunks already present stay in use"
            );
        }
    }

    /// Queues unit `u`'s chunks, written to the cache, for marking; `permit` (its fetch
    /// slot) is held until they are durable.
    pub(super) fn queue_filled(
        &self,
        u: u64,
        chunks: Vec<(u64, u64)>,
        permit: Option<OwnedSemaphorePermit>,
    ) {
        self.durability().send(Filled {
            unit: Some(u),
            chunks,
            _permit: permit,
        });
    }

    /// Queues chunks already made zero in the cache (prefetched holes) for marking.
    pub(super) fn queue_zeroed(&self, chunks: Vec<(u64, u64)>) {
        self.durability().send(Filled {
            unit: None,
            chunks,
            _permit: None,
        });
    }
}

/// Makes filled chunks durable in batches: one fsync, then the bits, then the map
/// pages, then the in-flight entries go.
pub(super) async fn batcher(
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
                inner.enter_passthrough(e, "sync");
            }
            inner
                .in_flight()
                .remove(batch.iter().filter_map(|f| f.unit));
        }
        drop(batch);
    }
}
