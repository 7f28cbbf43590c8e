//! A bounded cache of metadata tables (qcow2 L2 tables, VHD bitmaps, VMDK grain tables).
//!
//! One cache serves a whole chain. Tables are kept as immutable byte blocks behind an
//! `Arc`, keyed by (owner, host offset); the least recently used are dropped once the
//! byte budget is exceeded, so a 2 TiB image never needs its whole L2 in memory. The
//! lock is held only to look up or insert, never during I/O: two threads missing the
//! same table may both read it, and the second insert simply replaces the first.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;

use crate::lru::Lru;
use crate::{Error, Result};

/// Whether mapping may read metadata that is not cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetch {
    /// Read what is missing (blocking I/O through [`Storage`](crate::Storage)).
    Allowed,
    /// Fail with [`crate::Error::NotCached`] instead of reading.
    CachedOnly,
}

/// Default budget: 32 MiB maps 256 GiB of a qcow2 image with 64 KiB clusters.
pub const DEFAULT_BUDGET: usize = 32 << 20;

type Key = (u64, u64);

/// Tables by (owner, host offset); each costs its length in bytes.
type Inner = Lru<Key, Arc<[u8]>>;

/// Counters for benchmarks and `--json` reports.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct CacheStats {
    /// Lookups answered from the cache.
    pub hits: u64,
    /// Lookups that had to read.
    pub misses: u64,
    /// Tables dropped to stay within the budget.
    pub evictions: u64,
    /// Bytes held now.
    pub bytes: u64,
    /// The budget.
    pub budget: u64,
}

/// A bounded, shared cache of metadata blocks.
#[derive(Debug)]
pub struct MetadataCache {
    budget: usize,
    inner: Mutex<Inner>,
    next_owner: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
}

impl MetadataCache {
    /// A cache holding at most `budget` bytes of tables (at least one table is always
    /// kept, whatever its size, so progress is possible).
    pub fn new(budget: usize) -> Arc<Self> {
        Arc::new(MetadataCache {
            budget,
            inner: Mutex::new(Lru::new(budget)),
            next_owner: AtomicU64::new(1),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
        })
    }

    /// A fresh owner id; each layer (or each file of a layer) takes one so keys of
    /// different files never collide.
    pub fn owner(&self) -> u64 {
        self.next_owner.fetch_add(1, Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the maps half-updated in a way
        // that matters (worst case an entry is missing from the map's age order), so
        // recover.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The cached block at (`owner`, `offset`), if present.
    pub fn get(&self, owner: u64, offset: u64) -> Option<Arc<[u8]>> {
        self.lock().get(&(owner, offset)).cloned()
    }

    /// The block at (`owner`, `offset`): from the cache, or from `load` (called
    /// without the lock held) if `fetch` allows it, else [`Error::NotCached`].
    pub fn load(
        &self,
        owner: u64,
        offset: u64,
        fetch: Fetch,
        load: impl FnOnce() -> Result<Vec<u8>>,
    ) -> Result<Arc<[u8]>> {
        if let Some(data) = self.get(owner, offset) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(data);
        }
        if fetch == Fetch::CachedOnly {
            return Err(Error::NotCached);
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let data: Arc<[u8]> = load()?.into();
        self.insert(owner, offset, data.clone());
        Ok(data)
    }

    fn insert(&self, owner: u64, offset: u64, data: Arc<[u8]>) {
        let len = data.len();
        let evicted = self.lock().insert((owner, offset), data, len);
        self.evictions.fetch_add(evicted as u64, Ordering::Relaxed);
    }

    /// Current counters.
    pub fn stats(&self) -> CacheStats {
        let bytes = self.lock().cost() as u64;
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            bytes,
            budget: self.budget as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stays_within_budget_and_evicts_least_recent() {
        let cache = MetadataCache::new(3 * 1024);
        let owner = cache.owner();
        for i in 0..3u64 {
            cache
                .load(owner, i, Fetch::Allowed, || Ok(vec![i as u8; 1024]))
                .unwrap();
        }
        // Touch 0 so 1 is the oldest.
        assert!(cache.get(owner, 0).is_some());
        cache
            .load(owner, 3, Fetch::Allowed, || Ok(vec![3; 1024]))
            .unwrap();
        assert!(
            cache.get(owner, 1).is_none(),
            "least recently used is evicted"
        );
        assert!(cache.get(owner, 0).is_some());
        assert!(cache.get(owner, 3).is_some());
        let stats = cache.stats();
        assert!(stats.bytes <= 3 * 1024);
        assert_eq!(stats.evictions, 1);
    }

    #[test]
    fn cached_only_does_not_load() {
        let cache = MetadataCache::new(1024);
        let owner = cache.owner();
        let r = cache.load(owner, 0, Fetch::CachedOnly, || panic!("must not load"));
        assert!(matches!(r, Err(Error::NotCached)));
        cache
            .load(owner, 0, Fetch::Allowed, || Ok(vec![1; 8]))
            .unwrap();
        let data = cache
            .load(owner, 0, Fetch::CachedOnly, || panic!("must not load"))
            .unwrap();
        assert_eq!(&data[..], &[1; 8]);
    }

    #[test]
    fn oversized_block_is_kept_alone() {
        let cache = MetadataCache::new(10);
        let owner = cache.owner();
        cache
            .load(owner, 0, Fetch::Allowed, || Ok(vec![0; 100]))
            .unwrap();
        assert!(cache.get(owner, 0).is_some());
        cache
            .load(owner, 1, Fetch::Allowed, || Ok(vec![0; 100]))
            .unwrap();
        assert!(cache.get(owner, 0).is_none());
        assert!(cache.get(owner, 1).is_some());
    }
}
