//! The metadata of a qcow2 image open for writing, shared by the reader (mapping) and
//! the writer: the L1 table, the refcount table, and the L2 tables and refcount blocks
//! in memory, clean or dirty. This file owns that state; nothing else touches it.
//!
//! Tables are `Arc<[u8]>` blocks keyed by host offset. A clean table may be dropped
//! (least recently used first, within the budget) because the file holds the same
//! bytes; a dirty one stays until [`super::writer`] has written it back. The lock is
//! never held during I/O: a table missing from memory is read without it, and the
//! result is kept only if no table was written back meanwhile (`written` epoch), so a
//! slow reader can never put an older copy of a table in place of a newer one.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::cache::Fetch;
use crate::lru::Lru;
use crate::{Error, Result};

/// What a cached block is, for write-back ordering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    L2,
    Refblock,
}

/// A dirty block: its bytes and the generation of its last change.
#[derive(Debug)]
pub(super) struct Dirty {
    pub data: Arc<[u8]>,
    pub kind: Kind,
    pub generation: u64,
}

/// Everything behind the lock.
#[derive(Debug)]
pub(super) struct Meta {
    /// The active L1 table.
    pub l1: Vec<u64>,
    /// Generation of the last L1 change not yet written (0: clean).
    pub l1_dirty: u64,
    /// The refcount table.
    pub reftable: Vec<u64>,
    /// Generation of the last refcount-table change not yet written (0: clean).
    pub reftable_dirty: u64,
    /// Where the L1 table and the refcount table are in the file.
    pub l1_offset: u64,
    pub reftable_offset: u64,
    /// One past the highest cluster ever allocated (or the file's end at open).
    pub alloc_end: u64,
    clean: Lru<u64, Arc<[u8]>>,
    pub dirty: HashMap<u64, Dirty>,
    pub dirty_bytes: usize,
    generation: u64,
    /// Bumped whenever a block is written back to the file (see the module doc).
    written: u64,
    /// Lowest cluster index that may be free.
    pub free_hint: u64,
    /// Host clusters whose last reference was removed but whose refcount may only drop
    /// once that removal is durable.
    pub pending_free: Vec<u64>,
    /// Host clusters that hold the image's own metadata: header, L1 and refcount
    /// tables, active L2 tables, refcount blocks, the snapshot table and snapshots' L1
    /// tables, bitmap directory and tables. Guest data is never written there and no
    /// allocation lands there, whatever a crafted table says.
    metadata: ClusterRanges,
    cluster_bits: u32,
}

/// A set of cluster indices as disjoint, non-touching half-open ranges (start → end),
/// so a crafted table claiming gigabytes costs one entry, not one per cluster.
#[derive(Debug, Default)]
struct ClusterRanges(BTreeMap<u64, u64>);

impl ClusterRanges {
    fn insert(&mut self, mut start: u64, mut end: u64) {
        if start >= end {
            return;
        }
        if let Some((&s, &e)) = self.0.range(..=start).next_back()
            && e >= start
        {
            start = s;
            end = end.max(e);
            self.0.remove(&s);
        }
        while let Some((&s, &e)) = self.0.range(start..=end).next() {
            end = end.max(e);
            self.0.remove(&s);
        }
        self.0.insert(start, end);
    }

    fn remove(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        if let Some((&s, &e)) = self.0.range(..start).next_back()
            && e > start
        {
            self.0.insert(s, start);
            if e > end {
                self.0.insert(end, e);
            }
        }
        let inside: Vec<(u64, u64)> = self.0.range(start..end).map(|(&s, &e)| (s, e)).collect();
        for (s, e) in inside {
            self.0.remove(&s);
            if e > end {
                self.0.insert(end, e);
            }
        }
    }

    /// The first index of the set in `[start, end)`.
    fn first_in(&self, start: u64, end: u64) -> Option<u64> {
        if start >= end {
            return None;
        }
        if let Some((_, &e)) = self.0.range(..=start).next_back()
            && e > start
        {
            return Some(start);
        }
        self.0.range(start..end).next().map(|(&s, _)| s)
    }
}

impl Meta {
    /// A fresh generation number for a change.
    pub fn next_generation(&mut self) -> u64 {
        self.generation += 1;
        self.generation
    }

    /// The block at `offset` if it is in memory.
    pub fn get(&mut self, offset: u64) -> Option<Arc<[u8]>> {
        if let Some(d) = self.dirty.get(&offset) {
            return Some(d.data.clone());
        }
        self.clean.get(&offset).cloned()
    }

    /// Changes the block at `offset` (which must be in memory) through `f`, marking it
    /// dirty. Returns false if it is not in memory.
    pub fn modify(&mut self, offset: u64, kind: Kind, f: impl FnOnce(&mut [u8])) -> bool {
        let generation = self.next_generation();
        if let Some(d) = self.dirty.get_mut(&offset) {
            if Arc::get_mut(&mut d.data).is_none() {
                d.data = Arc::from(&d.data[..]);
            }
            f(Arc::get_mut(&mut d.data).expect("just made unique"));
            d.generation = generation;
            return true;
        }
        let Some(data) = self.clean.remove(&offset) else {
            return false;
        };
        let mut owned: Vec<u8> = data.to_vec();
        f(&mut owned);
        self.dirty_bytes += owned.len();
        self.dirty.insert(
            offset,
            Dirty {
                data: owned.into(),
                kind,
                generation,
            },
        );
        true
    }

    /// Puts a new block (a freshly allocated table) in memory, dirty.
    pub fn insert_new(&mut self, offset: u64, kind: Kind, data: Vec<u8>) {
        let generation = self.next_generation();
        self.clean.remove(&offset);
        self.dirty_bytes += data.len();
        if let Some(old) = self.dirty.insert(
            offset,
            Dirty {
                data: data.into(),
                kind,
                generation,
            },
        ) {
            self.dirty_bytes -= old.data.len();
        }
    }

    /// The clusters `[offset, offset + len)` touches, as a half-open range of indices.
    fn clusters(&self, offset: u64, len: u64) -> (u64, u64) {
        let size = 1u64 << self.cluster_bits;
        let end = offset.saturating_add(len).div_ceil(size);
        (offset >> self.cluster_bits, end)
    }

    /// Records `[offset, offset + len)` as metadata (see [`Meta::metadata`]).
    pub fn protect(&mut self, offset: u64, len: u64) {
        let (start, end) = self.clusters(offset, len);
        self.metadata.insert(start, end);
    }

    /// `[offset, offset + len)` holds metadata no longer.
    pub fn unprotect(&mut self, offset: u64, len: u64) {
        let (start, end) = self.clusters(offset, len);
        self.metadata.remove(start, end);
    }

    /// The host offset of the first metadata cluster in `[offset, offset + len)`.
    pub fn metadata_in(&self, offset: u64, len: u64) -> Option<u64> {
        let (start, end) = self.clusters(offset, len);
        self.metadata
            .first_in(start, end)
            .map(|c| c << self.cluster_bits)
    }

    /// Marks blocks written back at `generation` clean (those changed since stay dirty).
    pub fn written_back(&mut self, blocks: &[(u64, u64)]) {
        self.written += 1;
        for &(offset, generation) in blocks {
            if self
                .dirty
                .get(&offset)
                .is_some_and(|d| d.generation == generation)
            {
                let d = self.dirty.remove(&offset).expect("checked");
                self.dirty_bytes -= d.data.len();
                let len = d.data.len();
                self.clean.insert(offset, d.data, len);
            }
        }
    }
}

/// The tables loaded at open.
#[derive(Debug)]
pub(super) struct Tables {
    pub l1: Vec<u64>,
    pub l1_offset: u64,
    pub reftable: Vec<u64>,
    pub reftable_offset: u64,
    pub alloc_end: u64,
    /// Byte ranges of every other piece of metadata (header, snapshot table and L1
    /// tables, bitmap directory and tables); the L1 and refcount tables and what they
    /// point at are added from the fields above.
    pub metadata: Vec<(u64, u64)>,
}

/// The shared state of one writable qcow2 image.
#[derive(Debug)]
pub(super) struct Live {
    pub name: String,
    pub file: Arc<File>,
    pub cluster_size: u64,
    /// Guest size in bytes (changes with resize).
    pub size: AtomicU64,
    /// Bytes of the file known to exist (grows as clusters are written).
    pub file_size: Arc<AtomicU64>,
    meta: Mutex<Meta>,
}

impl Live {
    pub fn new(
        name: String,
        file: Arc<File>,
        cluster_size: u64,
        size: u64,
        file_size: Arc<AtomicU64>,
        tables: Tables,
        budget: usize,
    ) -> Live {
        let mut meta = Meta {
            l1_dirty: 0,
            reftable_dirty: 0,
            l1_offset: tables.l1_offset,
            reftable_offset: tables.reftable_offset,
            alloc_end: tables.alloc_end,
            clean: Lru::new(budget),
            dirty: HashMap::new(),
            dirty_bytes: 0,
            generation: 0,
            written: 0,
            free_hint: 0,
            pending_free: Vec::new(),
            metadata: ClusterRanges::default(),
            cluster_bits: cluster_size.trailing_zeros(),
            l1: Vec::new(),
            reftable: Vec::new(),
        };
        for &(offset, len) in &tables.metadata {
            meta.protect(offset, len);
        }
        meta.protect(tables.l1_offset, tables.l1.len() as u64 * 8);
        meta.protect(tables.reftable_offset, tables.reftable.len() as u64 * 8);
        for e in &tables.l1 {
            if e & super::OFFSET_MASK != 0 {
                meta.protect(e & super::OFFSET_MASK, cluster_size);
            }
        }
        for e in &tables.reftable {
            if e & super::REFTABLE_MASK != 0 {
                meta.protect(e & super::REFTABLE_MASK, cluster_size);
            }
        }
        meta.l1 = tables.l1;
        meta.reftable = tables.reftable;
        Live {
            name,
            file,
            cluster_size,
            size: AtomicU64::new(size),
            file_size,
            meta: Mutex::new(meta),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, Meta> {
        // The state is updated in place by short, non-panicking sections; a panic
        // elsewhere while holding the lock leaves nothing half-changed that matters.
        self.meta.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// The active L1 entry `index` (0 beyond the table).
    pub fn l1_entry(&self, index: u64) -> u64 {
        self.lock().l1.get(index as usize).copied().unwrap_or(0)
    }

    /// The block (L2 table or refcount block) at `offset`, from memory or the file.
    pub fn block(&self, offset: u64, what: &'static str, fetch: Fetch) -> Result<Arc<[u8]>> {
        loop {
            let epoch = {
                let mut m = self.lock();
                if let Some(b) = m.get(offset) {
                    return Ok(b);
                }
                m.written
            };
            if fetch == Fetch::CachedOnly {
                return Err(Error::NotCached);
            }
            let mut buf = vec![0u8; self.cluster_size as usize];
            read_full(&self.file, &mut buf, offset).map_err(Error::io_at(
                &self.name,
                what,
                offset,
                self.cluster_size,
            ))?;
            let mut m = self.lock();
            if let Some(b) = m.get(offset) {
                return Ok(b);
            }
            if m.written != epoch {
                // A write-back happened while we read: our copy may be older than the
                // file now is. Read again.
                continue;
            }
            let data: Arc<[u8]> = buf.into();
            let len = data.len();
            m.clean.insert(offset, data.clone(), len);
            return Ok(data);
        }
    }
}

/// Reads `buf.len()` bytes at `offset`; bytes past the end of the file read as zeroes
/// (a table allocated but not yet written back is never read from the file: it is
/// dirty in memory).
pub(super) fn read_full(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::ClusterRanges;

    /// The set as a sorted list of indices (all below 80), to compare with a model.
    fn members(r: &ClusterRanges) -> Vec<u64> {
        (0..80)
            .filter(|&c| r.first_in(c, c + 1).is_some())
            .collect()
    }

    #[test]
    fn cluster_ranges_match_a_set_of_indices_under_random_inserts_and_removes() {
        let mut rng = thinline_test_support::rng::Rng::from_env();
        for _ in 0..200 {
            let mut ranges = ClusterRanges::default();
            let mut model = std::collections::BTreeSet::new();
            for _ in 0..30 {
                let a = rng.below(60);
                let b = a + rng.below(8);
                if rng.below(3) == 0 {
                    ranges.remove(a, b);
                    (a..b).for_each(|c| {
                        model.remove(&c);
                    });
                } else {
                    ranges.insert(a, b);
                    model.extend(a..b);
                }
                assert_eq!(members(&ranges), model.iter().copied().collect::<Vec<_>>());
                let (x, y) = (rng.below(64), rng.below(64));
                let (x, y) = (x.min(y), x.max(y));
                assert_eq!(ranges.first_in(x, y), model.range(x..y).next().copied());
                // Disjoint and not touching: every range is as large as it can be.
                let spans: Vec<(u64, u64)> = ranges.0.iter().map(|(&s, &e)| (s, e)).collect();
                assert!(spans.windows(2).all(|w| w[0].1 < w[1].0), "{spans:?}");
            }
        }
    }
}
