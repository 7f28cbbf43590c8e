//! Host cluster allocation and refcounts, including growth of the refcount table.

use std::sync::atomic::Ordering;

use crate::cache::Fetch;
use crate::qcow2::REFTABLE_MASK;
use crate::qcow2::check::refcount_entry;
use crate::qcow2::live::Kind;
use crate::{Error, Result};

use super::{HEADER_REFTABLE, Qcow2Writer, set_refcount_entry};

impl Qcow2Writer {
    /// Allocates one host cluster (refcount 0 → 1) and returns its offset.
    pub(super) fn alloc_cluster(&self, fetch: Fetch) -> Result<u64> {
        let rpb = self.geo.refcounts_per_block();
        let cs = self.geo.cluster_size;
        let order = self.geo.refcount_order;
        loop {
            let need = {
                let mut m = self.live.lock();
                let c = m.free_hint;
                let k = c / rpb;
                if k as usize >= m.reftable.len() {
                    Need::Table(k)
                } else {
                    let block = m.reftable[k as usize] & REFTABLE_MASK;
                    if block == 0 {
                        if m.metadata_in(c * cs, cs).is_some() {
                            m.free_hint = c + 1;
                            continue;
                        }
                        // No block covers this range: nothing in it is used. The new
                        // block takes its first free cluster and counts itself.
                        let mut data = vec![0u8; cs as usize];
                        set_refcount_entry(&mut data, order, (c % rpb) as usize, 1);
                        m.insert_new(c * cs, Kind::Refblock, data);
                        m.protect(c * cs, cs);
                        m.reftable[k as usize] = c * cs;
                        m.reftable_dirty = m.next_generation();
                        m.free_hint = c + 1;
                        m.alloc_end = m.alloc_end.max(c + 1);
                        continue;
                    }
                    match m.get(block) {
                        None => Need::Block(block),
                        Some(data) => {
                            // A cluster whose refcount says free but that holds metadata
                            // (a corrupt refcount) is never handed out.
                            let free = (c % rpb..rpb).find(|&i| {
                                refcount_entry(&data, order, i as usize) == 0
                                    && m.metadata_in((k * rpb + i) * cs, cs).is_none()
                            });
                            // Ours must be the only reference for `modify` to change the
                            // block in place instead of copying it.
                            drop(data);
                            match free {
                                Some(i) => {
                                    let found = k * rpb + i;
                                    m.modify(block, Kind::Refblock, |b| {
                                        set_refcount_entry(b, order, i as usize, 1);
                                    });
                                    m.free_hint = found + 1;
                                    m.alloc_end = m.alloc_end.max(found + 1);
                                    return Ok(found * cs);
                                }
                                None => {
                                    m.free_hint = (k + 1) * rpb;
                                    continue;
                                }
                            }
                        }
                    }
                }
            };
            match need {
                Need::Block(offset) => {
                    self.live.block(offset, "refcount block", fetch)?;
                }
                Need::Table(_) if fetch == Fetch::CachedOnly => return Err(Error::NotCached),
                Need::Table(k) => self.grow_reftable(k)?,
            }
        }
    }

    /// Adds `delta` (±1) to the refcount of the host cluster at `offset`.
    pub(super) fn adjust(&self, offset: u64, delta: i64) -> Result<()> {
        let rpb = self.geo.refcounts_per_block();
        let order = self.geo.refcount_order;
        let c = offset >> self.geo.cluster_bits;
        let k = (c / rpb) as usize;
        let i = (c % rpb) as usize;
        let max = self.geo.max_refcount();
        loop {
            let block = {
                let mut m = self.live.lock();
                let block = m.reftable.get(k).copied().unwrap_or(0) & REFTABLE_MASK;
                if block == 0 {
                    return Err(self.invalid(format!(
                        "no refcount block covers cluster {c} (offset {offset:#x})"
                    )));
                }
                let mut bad = None;
                let done = m.modify(block, Kind::Refblock, |b| {
                    let v = refcount_entry(b, order, i);
                    let n = if delta < 0 {
                        v.checked_sub(1)
                    } else {
                        v.checked_add(1).filter(|&n| n <= max)
                    };
                    match n {
                        Some(n) => set_refcount_entry(b, order, i, n),
                        None => bad = Some(v),
                    }
                });
                if done {
                    if delta < 0 && bad.is_none() {
                        m.free_hint = m.free_hint.min(c);
                    }
                    if let Some(v) = bad {
                        return Err(self.invalid(format!(
                            "refcount of cluster {c} (offset {offset:#x}) is {v} and cannot change by {delta}"
                        )));
                    }
                    return Ok(());
                }
                block
            };
            self.live.block(block, "refcount block", Fetch::Allowed)?;
        }
    }

    /// Gives back a cluster allocated for a write that failed (it was never linked).
    pub(super) fn release(&self, offset: u64) {
        let _ = self.adjust(offset, -1);
    }

    /// Moves the refcount table to a larger one covering block index `k` (rare: images
    /// of small clusters that grow far). Written and made durable at once.
    fn grow_reftable(&self, k: u64) -> Result<()> {
        let _wb = self.writeback.lock().unwrap_or_else(|e| e.into_inner());
        let cs = self.geo.cluster_size;
        let rpb = self.geo.refcounts_per_block();
        let order = self.geo.refcount_order;
        let (old_len, old_offset) = {
            let m = self.live.lock();
            if (k as usize) < m.reftable.len() {
                return Ok(());
            }
            (m.reftable.len() as u64, m.reftable_offset)
        };
        // Every block that exists is written first: the new table points at them.
        self.write_refblocks()?;
        let old_clusters = (old_len * 8).div_ceil(cs);
        let needed = ((k + 1) * 8).div_ceil(cs);
        let clusters = needed.max(old_clusters * 2).max(1);
        if clusters * cs > crate::qcow2::header::MAX_REFCOUNT_TABLE_BYTES {
            return Err(self.invalid(format!(
                "the image would need a refcount table of {} bytes, over qemu's limit of {}",
                clusters * cs,
                crate::qcow2::header::MAX_REFCOUNT_TABLE_BYTES
            )));
        }
        // Past what the old table covers every cluster is free: the new table goes
        // there, followed by the blocks that count it and themselves.
        let first = old_len * rpb;
        let mut blocks = 1u64;
        loop {
            let end = first + clusters + blocks;
            let needed_blocks = end.div_ceil(rpb) - first / rpb;
            if needed_blocks <= blocks {
                break;
            }
            blocks = needed_blocks;
        }
        let end = first + clusters + blocks;
        let mut table = self.live.lock().reftable.clone();
        table.resize((clusters * cs / 8) as usize, 0);
        let mut new_blocks = Vec::new();
        for (n, kb) in (first / rpb..end.div_ceil(rpb)).enumerate() {
            let at = first + clusters + n as u64;
            let mut data = vec![0u8; cs as usize];
            for c in (kb * rpb).max(first)..((kb + 1) * rpb).min(end) {
                set_refcount_entry(&mut data, order, (c % rpb) as usize, 1);
            }
            table[kb as usize] = at * cs;
            new_blocks.push((at * cs, data));
        }
        for (offset, data) in &new_blocks {
            self.pwrite("write refcount block", data, *offset)?;
        }
        let mut bytes = Vec::with_capacity(table.len() * 8);
        for e in &table {
            bytes.extend_from_slice(&e.to_be_bytes());
        }
        self.pwrite("write refcount table", &bytes, first * cs)?;
        self.sync()?;
        let mut header = [0u8; 12];
        header[..8].copy_from_slice(&(first * cs).to_be_bytes());
        header[8..].copy_from_slice(&(clusters as u32).to_be_bytes());
        self.pwrite("write header", &header, HEADER_REFTABLE)?;
        self.sync()?;
        let mut m = self.live.lock();
        for (offset, data) in new_blocks {
            m.insert_new(offset, Kind::Refblock, data);
            m.protect(offset, cs);
        }
        m.unprotect(old_offset, old_clusters * cs);
        m.protect(first * cs, clusters * cs);
        m.reftable = table;
        m.reftable_offset = first * cs;
        m.reftable_dirty = 0;
        m.alloc_end = m.alloc_end.max(end);
        for c in 0..old_clusters {
            m.pending_free.push(old_offset + c * cs);
        }
        Ok(())
    }

    /// Allocates `n` contiguous clusters past everything allocated; returns the first.
    pub(super) fn alloc_run(&self, n: u64) -> Result<u64> {
        let cs = self.geo.cluster_size;
        {
            let mut m = self.live.lock();
            let file_end = self.live.file_size.load(Ordering::Acquire).div_ceil(cs);
            m.free_hint = m.alloc_end.max(file_end).max(m.free_hint);
        }
        let mut got: Vec<u64> = Vec::new();
        loop {
            let c = self.alloc_cluster(Fetch::Allowed)?;
            if got.last().is_some_and(|&prev| c != prev + cs) {
                // A refcount block took a cluster of the run: give the run back and start
                // it again here, past the block (releasing lowers the hint; raise it again
                // so the released clusters are not picked up in front of the block).
                for o in got.drain(..) {
                    self.release(o);
                }
                self.live.lock().free_hint = (c >> self.geo.cluster_bits) + 1;
            }
            got.push(c);
            if got.len() as u64 == n {
                return Ok(got[0]);
            }
        }
    }
}

enum Need {
    Block(u64),
    Table(u64),
}
