//! Growing and shrinking the guest size; the L1 table moves when it must grow.

use std::sync::atomic::Ordering;

use crate::Result;
use crate::qcow2::{COMPRESSED, OFFSET_MASK, SUBCLUSTERS, ZERO_FLAG};

use super::{Below, HEADER_L1_SIZE, HEADER_SIZE, Qcow2Writer, ZeroMode, put64};

impl Qcow2Writer {
    /// Changes the guest size. Growing makes the new tail read as zeroes (even over a
    /// longer backing); shrinking is refused unless nothing past the new end is
    /// allocated in this image.
    pub fn resize(&self, below: &dyn Below, new_size: u64) -> Result<()> {
        let old_size = self.live.size();
        if new_size == old_size {
            return Ok(());
        }
        let cs = self.geo.cluster_size;
        if new_size < old_size {
            self.check_unallocated_tail(new_size, old_size)?;
        }
        {
            let _w = self.resizing.write().unwrap_or_else(|e| e.into_inner());
            let per_l1 = 1u64 << self.geo.l1_bits;
            let entries = new_size.div_ceil(per_l1);
            let current = self.live.lock().l1.len() as u64;
            if entries > current {
                self.grow_l1(entries)?;
            }
            self.write_back()?;
            let mut bytes = new_size.to_be_bytes().to_vec();
            self.pwrite("write header", &bytes, HEADER_SIZE)?;
            bytes.clear();
            self.sync()?;
            self.live.size.store(new_size, Ordering::Release);
        }
        if new_size > old_size && below.size() > old_size {
            // The backing is longer than the old end: hide it with zero clusters.
            let from = old_size;
            let to = below.size().min(new_size);
            let aligned = from.div_ceil(cs) * cs;
            if aligned > from {
                let zeroes = vec![0u8; (aligned.min(to) - from) as usize];
                self.write(below, from, &zeroes, false)?;
            }
            if to > aligned {
                self.write_zeroes(below, aligned, to - aligned, ZeroMode::default(), false)?;
            }
        }
        self.flush()
    }

    fn check_unallocated_tail(&self, new_size: u64, old_size: u64) -> Result<()> {
        let cs = self.geo.cluster_size;
        let mut pos = new_size;
        while pos < old_size {
            let start = pos & !(cs - 1);
            let index = (start >> self.geo.l1_bits) as usize;
            let l1e = self.live.lock().l1.get(index).copied().unwrap_or(0);
            let l2 = l1e & OFFSET_MASK;
            if l2 == 0 {
                pos = ((index as u64) + 1) << self.geo.l1_bits;
                continue;
            }
            let (entry, bitmap) = self.entry(l2, start)?;
            let allocated = if self.geo.extended && entry & COMPRESSED == 0 {
                let first = ((pos - start) / (cs / SUBCLUSTERS)) as u32;
                let mask = u32::MAX << first;
                (bitmap as u32 | (bitmap >> 32) as u32) & mask != 0
            } else {
                entry & (OFFSET_MASK | COMPRESSED | ZERO_FLAG) != 0
            };
            if allocated {
                return Err(self.invalid(format!(
                    "cannot shrink to {new_size} bytes: guest offset {pos} (cluster at {start}) holds data; \
                     discard it first or convert the image"
                )));
            }
            pos = start + cs;
        }
        Ok(())
    }

    /// Moves the L1 table to a larger one with `entries` entries (durable at once).
    fn grow_l1(&self, entries: u64) -> Result<()> {
        let cs = self.geo.cluster_size;
        let bytes = entries * 8;
        if bytes > crate::qcow2::header::MAX_L1_BYTES {
            return Err(self.invalid(format!(
                "the new size needs an L1 table of {bytes} bytes, over qemu's limit of {}",
                crate::qcow2::header::MAX_L1_BYTES
            )));
        }
        let clusters = bytes.div_ceil(cs);
        let first = self.alloc_run(clusters)?;
        let (old_offset, old_len, mut l1) = {
            let m = self.live.lock();
            (m.l1_offset, m.l1.len() as u64, m.l1.clone())
        };
        // Tables the old L1 points at must be on disk before the new L1 is.
        self.write_back()?;
        l1.resize(entries as usize, 0);
        let mut data = vec![0u8; (clusters * cs) as usize];
        for (i, e) in l1.iter().enumerate() {
            put64(&mut data, i * 8, *e);
        }
        self.pwrite("write L1 table", &data, first)?;
        self.write_refblocks()?;
        self.sync()?;
        let mut header = [0u8; 12];
        header[..4].copy_from_slice(&(entries as u32).to_be_bytes());
        header[4..].copy_from_slice(&first.to_be_bytes());
        self.pwrite("write header", &header, HEADER_L1_SIZE)?;
        self.sync()?;
        let mut m = self.live.lock();
        m.unprotect(old_offset, old_len * 8);
        m.protect(first, clusters * cs);
        m.l1 = l1;
        m.l1_offset = first;
        for c in 0..(old_len * 8).div_ceil(cs) {
            m.pending_free.push(old_offset + c * cs);
        }
        Ok(())
    }
}
