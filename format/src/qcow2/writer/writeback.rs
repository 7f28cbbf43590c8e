//! Write-back of dirty metadata in crash-safe order (refcount blocks, sync, L2
//! tables, sync, L1 and refcount table), and flushes.

use std::sync::Arc;

use crate::Result;
use crate::qcow2::live::{Kind, Meta};

use super::Qcow2Writer;

impl Qcow2Writer {
    /// Writes every dirty refcount block (always safe: see the writer's module doc).
    pub(super) fn write_refblocks(&self) -> Result<()> {
        let blocks: Vec<(u64, Arc<[u8]>, u64)> = {
            let m = self.live.lock();
            m.dirty
                .iter()
                .filter(|(_, d)| d.kind == Kind::Refblock)
                .map(|(&o, d)| (o, d.data.clone(), d.generation))
                .collect()
        };
        for (offset, data, _) in &blocks {
            self.pwrite("write refcount block", data, *offset)?;
        }
        let done: Vec<(u64, u64)> = blocks.iter().map(|&(o, _, g)| (o, g)).collect();
        self.live.lock().written_back(&done);
        Ok(())
    }

    /// Makes every write acknowledged so far durable, data and metadata.
    pub fn flush(&self) -> Result<()> {
        let _r = self.read_lock();
        self.write_back()
    }

    /// Writes dirty metadata back in crash-safe order and syncs.
    pub(super) fn write_back(&self) -> Result<()> {
        let _wb = self.writeback.lock().unwrap_or_else(|e| e.into_inner());
        let snapshot = {
            let mut m = self.live.lock();
            Snapshot::take(&mut m)
        };
        let result = self.write_snapshot(&snapshot);
        let mut m = self.live.lock();
        match result {
            Ok(()) => {
                let done: Vec<(u64, u64)> = snapshot
                    .refblocks
                    .iter()
                    .chain(&snapshot.l2)
                    .map(|&(o, _, g)| (o, g))
                    .collect();
                m.written_back(&done);
                if snapshot.l1.as_ref().is_some_and(|(_, g)| *g == m.l1_dirty) {
                    m.l1_dirty = 0;
                }
                if snapshot
                    .reftable
                    .as_ref()
                    .is_some_and(|(_, g)| *g == m.reftable_dirty)
                {
                    m.reftable_dirty = 0;
                }
                drop(m);
                if snapshot.pending.is_empty() {
                    return Ok(());
                }
                // The unlinks are durable: the clusters may now be counted down, and
                // the lower counts written (any time is safe for refcount blocks).
                for offset in snapshot.pending {
                    self.adjust(offset, -1)?;
                }
                self.write_refblocks()?;
                self.sync()
            }
            Err(e) => {
                m.pending_free.extend(snapshot.pending);
                Err(e)
            }
        }
    }

    fn write_snapshot(&self, s: &Snapshot) -> Result<()> {
        for (offset, data, _) in &s.refblocks {
            self.pwrite("write refcount block", data, *offset)?;
        }
        self.sync()?;
        if let Some((table, _)) = &s.reftable {
            self.pwrite("write refcount table", table, s.reftable_offset)?;
            self.sync()?;
        }
        if s.l2.is_empty() && s.l1.is_none() {
            return Ok(());
        }
        for (offset, data, _) in &s.l2 {
            self.pwrite("write L2 table", data, *offset)?;
        }
        if let Some((l1, _)) = &s.l1 {
            self.sync()?;
            self.pwrite("write L1 table", l1, s.l1_offset)?;
        }
        self.sync()
    }
}

/// What one write-back writes, taken under the lock in one go.
struct Snapshot {
    refblocks: Vec<(u64, Arc<[u8]>, u64)>,
    l2: Vec<(u64, Arc<[u8]>, u64)>,
    l1: Option<(Vec<u8>, u64)>,
    l1_offset: u64,
    reftable: Option<(Vec<u8>, u64)>,
    reftable_offset: u64,
    pending: Vec<u64>,
}

impl Snapshot {
    fn take(m: &mut Meta) -> Snapshot {
        let mut refblocks = Vec::new();
        let mut l2 = Vec::new();
        for (&offset, d) in &m.dirty {
            let item = (offset, d.data.clone(), d.generation);
            match d.kind {
                Kind::Refblock => refblocks.push(item),
                Kind::L2 => l2.push(item),
            }
        }
        let encode = |v: &[u64]| {
            let mut b = Vec::with_capacity(v.len() * 8);
            for e in v {
                b.extend_from_slice(&e.to_be_bytes());
            }
            b
        };
        Snapshot {
            refblocks,
            l2,
            l1: (m.l1_dirty != 0).then(|| (encode(&m.l1), m.l1_dirty)),
            l1_offset: m.l1_offset,
            reftable: (m.reftable_dirty != 0).then(|| (encode(&m.reftable), m.reftable_dirty)),
            reftable_offset: m.reftable_offset,
            pending: std::mem::take(&mut m.pending_free),
        }
    }
}
