//! A bounded cache of metadata tables (qcow2 L2 tables, VHD bitmaps, VMDK grain tables).
//!
//! One cache serves a whole chain. Tables are kept as immutable byte blocks behind an
//! `Arc`, keyed by (owner, host offset); the least recently used are dropped once the
//! byte budget is exceeded, so a 2 TiB image never needs its whole L2 in memory. Each
//! table is charged its length plus [`ENTRY_OVERHEAD`] (the bookkeeping and allocator
//! cost of keeping it), so the budget bounds what the cache really holds. An evicted
//! table nobody else holds any more is kept as a spare (at most 8, and an eighth of the
//! budget, not charged to it) and the next miss of the same size is copied into it: in
//! steady state a cache that misses all the time reuses the same blocks instead of
//! freeing one and allocating another per miss, which with one allocator arena per
//! thread fragments the heap far beyond the budget.
//!
//! The lock is held only to look up or insert, never during I/O. A miss leaves an
//! in-flight marker for its key while it reads: other threads missing the same table
//! wait for that read instead of reading (and holding) their own copy, and callers that
//! may not block ([`Fetch::CachedOnly`]) are told it is not cached. If the read fails
//! (or panics), the marker goes away and each waiter reads for itself, so every caller
//! gets its own error.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

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

/// Default budget: 32 MiB maps 256 GiB of a qcow2 image with 64 KiB clusters (as
/// qemu's default L2 cache does).
pub const DEFAULT_BUDGET: usize = 32 << 20;

/// What holding one table costs beyond its bytes, charged against the budget: the
/// `Arc` header and allocator chunk of the block, the map and age-order entries.
/// Small next to a 64 KiB L2 table, but not next to a 512-byte VHD bitmap.
pub const ENTRY_OVERHEAD: usize = 256;

/// Evicted blocks kept for reuse, at most; a miss needs one, so this covers several
/// concurrent misses.
const MAX_SPARES: usize = 8;

/// Spare blocks, which are not charged to the budget, hold at most this fraction of it.
const SPARE_SHARE: usize = 8;

type Key = (u64, u64);

/// A read in progress: the thread that missed fills `slot`, then wakes the waiters.
#[derive(Debug, Default)]
struct InFlight {
    slot: Mutex<Slot>,
    done: Condvar,
}

#[derive(Debug, Default)]
enum Slot {
    #[default]
    Reading,
    Read(Arc<[u8]>),
    /// The read failed or panicked; waiters read for themselves.
    Failed,
}

impl InFlight {
    fn finish(&self, slot: Slot) {
        *self.slot.lock().unwrap_or_else(|e| e.into_inner()) = slot;
        self.done.notify_all();
    }

    /// The block read by the thread that missed, or `None` if its read failed.
    fn wait(&self) -> Option<Arc<[u8]>> {
        let mut slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            match &*slot {
                Slot::Reading => slot = self.done.wait(slot).unwrap_or_else(|e| e.into_inner()),
                Slot::Read(data) => return Some(data.clone()),
                Slot::Failed => return None,
            }
        }
    }
}

/// Tables by (owner, host offset), each costing its length plus [`ENTRY_OVERHEAD`];
/// the reads in flight; and evicted blocks nothing else refers to, for reuse.
#[derive(Debug)]
struct Inner {
    tables: Lru<Key, Arc<[u8]>>,
    reading: HashMap<Key, Arc<InFlight>>,
    spares: Vec<Arc<[u8]>>,
}

impl Inner {
    /// A spare block of `len` bytes, if any.
    fn spare(&mut self, len: usize) -> Option<Arc<[u8]>> {
        let i = self.spares.iter().position(|s| s.len() == len)?;
        Some(self.spares.swap_remove(i))
    }
}

/// Counters for benchmarks and `--json` reports.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct CacheStats {
    /// Lookups answered from the cache.
    pub hits: u64,
    /// Lookups that had to read.
    pub misses: u64,
    /// Lookups that waited for another thread's read of the same table.
    pub shared: u64,
    /// Tables dropped to stay within the budget.
    pub evictions: u64,
    /// Bytes charged now (tables plus [`ENTRY_OVERHEAD`] each).
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
    shared: AtomicU64,
    evictions: AtomicU64,
}

/// Removes a miss's in-flight marker however the read ends: with the block (inserted
/// into the cache under the same lock), or failed, by error or by panic.
struct Reading<'a> {
    cache: &'a MetadataCache,
    key: Key,
    marker: Arc<InFlight>,
    completed: bool,
}

impl Reading<'_> {
    /// Caches `bytes` (copied into a spare block if there is one), ends the read and
    /// hands the block to the waiters.
    fn complete(mut self, bytes: Vec<u8>) -> Arc<[u8]> {
        let spare = self.cache.lock().spare(bytes.len());
        let data = match spare {
            // Unique since it was evicted: a spare is only ever in `spares`.
            Some(mut block) => match Arc::get_mut(&mut block) {
                Some(buf) => {
                    buf.copy_from_slice(&bytes);
                    block
                }
                None => bytes.into(),
            },
            None => bytes.into(),
        };
        let cost = data.len() + ENTRY_OVERHEAD;
        let evicted = {
            let mut inner = self.cache.lock();
            inner.reading.remove(&self.key);
            let Inner { tables, spares, .. } = &mut *inner;
            let room = self.cache.budget / SPARE_SHARE;
            tables.insert_with(self.key, data.clone(), cost, |mut old| {
                let held: usize = spares.iter().map(|s| s.len()).sum();
                // Only a block no mapping still reads may be written again.
                if spares.len() < MAX_SPARES
                    && held + old.len() <= room
                    && Arc::get_mut(&mut old).is_some()
                {
                    spares.push(old);
                }
            })
        };
        self.cache
            .evictions
            .fetch_add(evicted as u64, Ordering::Relaxed);
        self.marker.finish(Slot::Read(data.clone()));
        self.completed = true;
        data
    }
}

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        // Dropped without completing: the read failed or panicked.
        if !self.completed {
            self.cache.lock().reading.remove(&self.key);
            self.marker.finish(Slot::Failed);
        }
    }
}

impl MetadataCache {
    /// A cache holding at most `budget` bytes of tables, [`ENTRY_OVERHEAD`] included
    /// (at least one table is always kept, whatever its size, so progress is possible).
    pub fn new(budget: usize) -> Arc<Self> {
        Arc::new(MetadataCache {
            budget,
            inner: Mutex::new(Inner {
                tables: Lru::new(budget),
                reading: HashMap::new(),
                spares: Vec::new(),
            }),
            next_owner: AtomicU64::new(1),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            shared: AtomicU64::new(0),
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
        // that matters (worst case an entry is missing from the map's age order, or a
        // marker stays and its key is read by every miss), so recover.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The cached block at (`owner`, `offset`), if present.
    pub fn get(&self, owner: u64, offset: u64) -> Option<Arc<[u8]>> {
        self.lock().tables.get(&(owner, offset)).cloned()
    }

    /// The block at (`owner`, `offset`): from the cache, or from `load` (called
    /// without the lock held) if `fetch` allows it, else [`Error::NotCached`]. While
    /// one caller's `load` runs, others asking for the same block wait for its result
    /// (or, with [`Fetch::CachedOnly`], get [`Error::NotCached`]); if it fails, they
    /// load for themselves. `load` must not ask this cache for the same block: it
    /// would wait for itself.
    pub fn load(
        &self,
        owner: u64,
        offset: u64,
        fetch: Fetch,
        load: impl FnOnce() -> Result<Vec<u8>>,
    ) -> Result<Arc<[u8]>> {
        let key = (owner, offset);
        let marker = loop {
            let other = {
                let mut inner = self.lock();
                if let Some(data) = inner.tables.get(&key) {
                    self.hits.fetch_add(1, Ordering::Relaxed);
                    return Ok(data.clone());
                }
                if fetch == Fetch::CachedOnly {
                    return Err(Error::NotCached);
                }
                match inner.reading.get(&key) {
                    Some(other) => Arc::clone(other),
                    None => {
                        let marker = Arc::new(InFlight::default());
                        inner.reading.insert(key, Arc::clone(&marker));
                        break marker;
                    }
                }
            };
            if let Some(data) = other.wait() {
                self.shared.fetch_add(1, Ordering::Relaxed);
                return Ok(data);
            }
            // That read failed: look again, and read unless another waiter already is.
        };
        self.misses.fetch_add(1, Ordering::Relaxed);
        let reading = Reading {
            cache: self,
            key,
            marker,
            completed: false,
        };
        Ok(reading.complete(load()?))
    }

    /// How many callers are waiting for the read in flight of (`owner`, `offset`).
    #[cfg(test)]
    fn waiters(&self, owner: u64, offset: u64) -> usize {
        // The map and the reading caller hold one reference each; every waiter another.
        self.lock()
            .reading
            .get(&(owner, offset))
            .map_or(0, |m| Arc::strong_count(m) - 2)
    }

    /// Current counters.
    pub fn stats(&self) -> CacheStats {
        let bytes = self.lock().tables.cost() as u64;
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            shared: self.shared.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            bytes,
            budget: self.budget as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::sync::mpsc;
    use std::thread;

    use super::*;

    const COST: usize = 1024 + ENTRY_OVERHEAD;

    /// A thread running one [`MetadataCache::load`].
    type Loading = thread::JoinHandle<Result<Arc<[u8]>>>;

    /// Table `offset` of `owner`, read as `len` bytes of `byte` on a miss.
    fn filled(cache: &MetadataCache, owner: u64, offset: u64, byte: u8, len: usize) -> Arc<[u8]> {
        cache
            .load(owner, offset, Fetch::Allowed, || Ok(vec![byte; len]))
            .unwrap()
    }

    /// A cache of `budget` bytes, one of its owners, and that owner's tables 0 to
    /// `n - 1` loaded in order (1 KiB each, table `i` filled with `i`).
    fn with_tables(budget: usize, n: u64) -> (Arc<MetadataCache>, u64) {
        let cache = MetadataCache::new(budget);
        let owner = cache.owner();
        for i in 0..n {
            filled(&cache, owner, i, i as u8, 1024);
        }
        (cache, owner)
    }

    #[test]
    fn stays_within_budget_and_evicts_least_recent() {
        let (cache, owner) = with_tables(3 * COST, 3);
        // Touch 0 so 1 is the oldest.
        assert!(cache.get(owner, 0).is_some());
        filled(&cache, owner, 3, 3, 1024);
        assert!(
            cache.get(owner, 1).is_none(),
            "least recently used is evicted"
        );
        assert!(cache.get(owner, 0).is_some());
        assert!(cache.get(owner, 3).is_some());
        let stats = cache.stats();
        assert!(stats.bytes <= 3 * COST as u64);
        assert_eq!(stats.evictions, 1);
    }

    #[test]
    fn each_table_is_charged_its_length_plus_the_entry_overhead() {
        let cache = MetadataCache::new(1 << 20);
        let owner = cache.owner();
        for i in 0..4u64 {
            filled(&cache, owner, i, 0, 512);
        }
        assert_eq!(cache.stats().bytes, 4 * (512 + ENTRY_OVERHEAD) as u64);
    }

    #[test]
    fn tables_that_fit_by_length_but_not_with_overhead_are_evicted() {
        let cache = MetadataCache::new(2 * 1024);
        let owner = cache.owner();
        for i in 0..2u64 {
            filled(&cache, owner, i, 0, 1024);
        }
        assert!(cache.get(owner, 0).is_none());
        assert!(cache.get(owner, 1).is_some());
    }

    #[test]
    fn an_evicted_table_nobody_holds_is_reused_for_the_next_miss() {
        let cache = MetadataCache::new(8 * COST);
        let owner = cache.owner();
        let first = filled(&cache, owner, 0, 0, 1024);
        let block = first.as_ptr();
        drop(first);
        for i in 1..8u64 {
            filled(&cache, owner, i, i as u8, 1024);
        }
        // Evicts table 0 into the spares...
        filled(&cache, owner, 8, 8, 1024);
        assert!(cache.get(owner, 0).is_none());
        assert_eq!(cache.lock().spares.len(), 1);
        // ...and the next miss is copied into it.
        let reused = filled(&cache, owner, 9, 9, 1024);
        assert_eq!(reused.as_ptr(), block);
        assert_eq!(&reused[..], &[9; 1024]);
    }

    #[test]
    fn an_evicted_table_still_held_is_never_written_again() {
        let cache = MetadataCache::new(8 * COST);
        let owner = cache.owner();
        let held = filled(&cache, owner, 0, 0xee, 1024);
        for i in 1..32u64 {
            let table = filled(&cache, owner, i, i as u8, 1024);
            assert_ne!(table.as_ptr(), held.as_ptr());
        }
        assert!(cache.get(owner, 0).is_none());
        assert_eq!(&held[..], &[0xee; 1024]);
    }

    #[test]
    fn spares_never_hold_more_than_an_eighth_of_the_budget() {
        // One table is a quarter of the budget: evicted tables are never kept.
        let (cache, _) = with_tables(4 * COST, 8);
        assert_eq!(cache.stats().evictions, 4);
        assert!(cache.lock().spares.is_empty());
    }

    #[test]
    fn cached_only_does_not_load() {
        let cache = MetadataCache::new(1024);
        let owner = cache.owner();
        let r = cache.load(owner, 0, Fetch::CachedOnly, || panic!("must not load"));
        assert!(matches!(r, Err(Error::NotCached)));
        filled(&cache, owner, 0, 1, 8);
        let data = cache
            .load(owner, 0, Fetch::CachedOnly, || panic!("must not load"))
            .unwrap();
        assert_eq!(&data[..], &[1; 8]);
    }

    #[test]
    fn oversized_block_is_kept_alone() {
        let cache = MetadataCache::new(10);
        let owner = cache.owner();
        filled(&cache, owner, 0, 0, 100);
        assert!(cache.get(owner, 0).is_some());
        filled(&cache, owner, 1, 0, 100);
        assert!(cache.get(owner, 0).is_none());
        assert!(cache.get(owner, 1).is_some());
    }

    /// A 1 MiB cache, one of its owners, a count of reads, the sender that releases the
    /// blocked read and the thread whose load waits for it.
    type Blocked = (
        Arc<MetadataCache>,
        u64,
        Arc<AtomicUsize>,
        mpsc::Sender<Result<Vec<u8>>>,
        Loading,
    );

    /// A load of (owner, 0) on another thread whose read (counted) blocks until the
    /// returned sender gives it its outcome; returns once that read has started.
    fn blocked_read() -> Blocked {
        let cache = MetadataCache::new(1 << 20);
        let owner = cache.owner();
        let loads = Arc::new(AtomicUsize::new(0));
        let (release, outcome) = mpsc::channel::<Result<Vec<u8>>>();
        let (started_tx, started) = mpsc::channel();
        let (reader_cache, reader_loads) = (Arc::clone(&cache), Arc::clone(&loads));
        let reader = thread::spawn(move || {
            reader_cache.load(owner, 0, Fetch::Allowed, || {
                reader_loads.fetch_add(1, Ordering::SeqCst);
                started_tx.send(()).unwrap();
                outcome.recv().unwrap()
            })
        });
        started.recv().unwrap();
        (cache, owner, loads, release, reader)
    }

    /// Starts `n` loads of (`owner`, 0) that count their reads in `loads`; returns once
    /// all of them wait for the read in flight.
    fn waiting_loads(
        cache: &Arc<MetadataCache>,
        owner: u64,
        loads: &Arc<AtomicUsize>,
        n: usize,
    ) -> Vec<Loading> {
        let waiters = (0..n)
            .map(|_| {
                let (cache, loads) = (Arc::clone(cache), Arc::clone(loads));
                thread::spawn(move || {
                    cache.load(owner, 0, Fetch::Allowed, || {
                        loads.fetch_add(1, Ordering::SeqCst);
                        Ok(vec![2; 64])
                    })
                })
            })
            .collect();
        while cache.waiters(owner, 0) < n {
            thread::yield_now();
        }
        waiters
    }

    #[test]
    fn concurrent_misses_of_one_table_read_it_once() {
        let (cache, owner, loads, release, reader) = blocked_read();
        let waiters = waiting_loads(&cache, owner, &loads, 8);
        release.send(Ok(vec![1; 64])).unwrap();
        assert_eq!(&reader.join().unwrap().unwrap()[..], &[1; 64]);
        for w in waiters {
            assert_eq!(&w.join().unwrap().unwrap()[..], &[1; 64]);
        }
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        let stats = cache.stats();
        assert_eq!((stats.misses, stats.shared), (1, 8));
        assert_eq!(cache.waiters(owner, 0), 0, "no marker is left behind");
    }

    #[test]
    fn cached_only_lookups_do_not_wait_for_a_read_in_flight() {
        let (cache, owner, _, release, reader) = blocked_read();
        let r = cache.load(owner, 0, Fetch::CachedOnly, || panic!("must not load"));
        assert!(matches!(r, Err(Error::NotCached)));
        release.send(Ok(vec![1; 8])).unwrap();
        reader.join().unwrap().unwrap();
        assert!(cache.get(owner, 0).is_some());
    }

    #[test]
    fn when_a_shared_read_fails_each_waiter_reads_for_itself() {
        let (cache, owner, loads, release, reader) = blocked_read();
        let waiters = waiting_loads(&cache, owner, &loads, 3);
        let failure = std::io::Error::other("injected");
        release
            .send(Err(Error::Io {
                path: "test".into(),
                op: "L2 table",
                offset: 0,
                length: 64,
                source: failure,
            }))
            .unwrap();
        assert!(matches!(reader.join().unwrap(), Err(Error::Io { .. })));
        for w in waiters {
            assert_eq!(&w.join().unwrap().unwrap()[..], &[2; 64]);
        }
        // The failed read, then one new read shared by whoever waited for it.
        let loads = loads.load(Ordering::SeqCst);
        assert!((2..=4).contains(&loads), "{loads} reads");
        assert!(cache.get(owner, 0).is_some());
    }

    #[test]
    fn a_read_that_panics_leaves_no_marker_and_wakes_its_waiters() {
        let (cache, owner, loads, release, reader) = blocked_read();
        let waiters = waiting_loads(&cache, owner, &loads, 2);
        // Dropping the sender makes the blocked read's `recv().unwrap()` panic.
        drop(release);
        assert!(reader.join().is_err(), "the read panicked");
        for w in waiters {
            assert_eq!(&w.join().unwrap().unwrap()[..], &[2; 64]);
        }
        assert_eq!(cache.waiters(owner, 0), 0);
        assert!(cache.get(owner, 0).is_some());
    }

    #[test]
    fn different_tables_are_read_concurrently() {
        let (cache, owner, _, release, reader) = blocked_read();
        // Another key is read at once, while the first read is still blocked.
        let other = filled(&cache, owner, 1, 5, 8);
        assert_eq!(&other[..], &[5; 8]);
        release.send(Ok(vec![1; 8])).unwrap();
        reader.join().unwrap().unwrap();
        assert_eq!(cache.stats().misses, 2);
    }
}
