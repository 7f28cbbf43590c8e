//! Durability: filled chunks are made durable in batches (one fsync, then the bits,
//! then the map pages), completion is recorded, and a cache that cannot be written
//! turns the export into a pass-through.

use super::*;

/// Stops writing to the cache after a write or sync failure; logged once.
pub(super) fn enter_passthrough(inner: &Inner, e: &std::io::Error, op: &str) {
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
