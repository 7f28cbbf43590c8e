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

use std::collections::HashMap;
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
        Live {
            name,
            file,
            cluster_size,
            size: AtomicU64::new(size),
            file_size,
            meta: Mutex::new(Meta {
                l1: tables.l1,
                l1_dirty: 0,
                reftable: tables.reftable,
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
            }),
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
