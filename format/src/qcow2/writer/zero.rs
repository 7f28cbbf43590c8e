//! Zeroes and discards: zero clusters or subclusters where a backing would show
//! through, deallocation where nothing would.

use crate::cache::Fetch;
use crate::qcow2::{COMPRESSED, COPIED, OFFSET_MASK, SUBCLUSTERS, ZERO_FLAG};
use crate::{Error, Result};

use super::{Below, Qcow2Writer, ZeroMode};

impl Qcow2Writer {
    /// Makes `[offset, offset + length)` read as zeroes (or discards it, with
    /// `mode.trim`: then partial clusters are left as they are).
    pub fn write_zeroes(
        &self,
        below: &dyn Below,
        offset: u64,
        length: u64,
        mode: ZeroMode,
        fua: bool,
    ) -> Result<()> {
        {
            let _r = self.read_lock();
            self.check_range(offset, length)?;
            let cs = self.geo.cluster_size;
            let size = self.live.size();
            let end = offset + length;
            let mut pos = offset;
            while pos < end {
                let start = pos & !(cs - 1);
                let piece_end = (start + cs).min(end);
                let whole = pos == start && (piece_end == start + cs || piece_end == size);
                if self.geo.extended {
                    self.zero_subclusters(below, start, pos, piece_end, mode)?;
                } else if whole {
                    self.zero_cluster(below, start, mode)?;
                } else if !mode.trim && !self.reads_zero(below, start)? {
                    if mode.fast {
                        return Err(Error::NotFast {
                            path: self.live.name.clone(),
                            offset: pos,
                        });
                    }
                    let zeroes = vec![0u8; (piece_end - pos) as usize];
                    self.write_in_cluster(below, pos, &zeroes, Fetch::Allowed)?;
                }
                pos = piece_end;
            }
        }
        self.after_change(fua)
    }

    /// Whether the cluster at `start` already reads as zeroes without any I/O.
    fn reads_zero(&self, below: &dyn Below, start: u64) -> Result<bool> {
        let index = (start >> self.geo.l1_bits) as usize;
        let l1e = self.live.lock().l1.get(index).copied().unwrap_or(0);
        let l2 = l1e & OFFSET_MASK;
        let shows = below.size() > start;
        if l2 == 0 {
            return Ok(!shows);
        }
        let (entry, _) = self.entry(l2, start)?;
        Ok(entry & COMPRESSED == 0
            && (entry & ZERO_FLAG != 0 && self.geo.version >= 3
                || entry & OFFSET_MASK == 0 && !shows))
    }

    fn zero_cluster(&self, below: &dyn Below, start: u64, mode: ZeroMode) -> Result<()> {
        let shows = below.size() > start;
        if self.geo.version < 3 && (shows || mode.no_hole) {
            // No zero flag in version 2: zero bytes must be written.
            if mode.trim {
                return Ok(());
            }
            if mode.fast {
                return Err(Error::NotFast {
                    path: self.live.name.clone(),
                    offset: start,
                });
            }
            let zeroes = vec![0u8; self.geo.cluster_size as usize];
            return self.write_in_cluster(below, start, &zeroes, Fetch::Allowed);
        }
        let _g = self.locks.lock(start >> self.geo.cluster_bits);
        let index = (start >> self.geo.l1_bits) as usize;
        let l1e = self.live.lock().l1.get(index).copied().unwrap_or(0);
        if l1e & OFFSET_MASK == 0 && !shows && !mode.no_hole {
            return Ok(());
        }
        let l2 = self.own_l2(start, Fetch::Allowed)?;
        let (entry, _) = self.entry(l2, start)?;
        let host = entry & OFFSET_MASK;
        let keep = mode.no_hole && entry & COMPRESSED == 0 && host != 0 && entry & COPIED != 0;
        let (new, unref) = if keep {
            (host | COPIED | ZERO_FLAG, Vec::new())
        } else if shows || mode.no_hole {
            (ZERO_FLAG, self.geo.referenced(entry))
        } else {
            (0, self.geo.referenced(entry))
        };
        if new == entry {
            return Ok(());
        }
        self.link(l2, start, new, 0, unref)
    }

    /// Zeroes `[pos, end)` inside the cluster at `start` of an extended-L2 image.
    fn zero_subclusters(
        &self,
        below: &dyn Below,
        start: u64,
        pos: u64,
        end: u64,
        mode: ZeroMode,
    ) -> Result<()> {
        let sub = self.geo.cluster_size / SUBCLUSTERS;
        let size = self.live.size();
        let mut partial = Vec::new();
        {
            let _g = self.locks.lock(start >> self.geo.cluster_bits);
            let index = (start >> self.geo.l1_bits) as usize;
            let l1e = self.live.lock().l1.get(index).copied().unwrap_or(0);
            let shows_any = below.size() > pos;
            if l1e & OFFSET_MASK == 0 && !shows_any && !mode.no_hole {
                return Ok(());
            }
            let l2 = self.own_l2(start, Fetch::Allowed)?;
            let (entry, bitmap) = self.entry(l2, start)?;
            if entry & COMPRESSED != 0 {
                // Decompress into a standard cluster first, then zero in it.
                drop(_g);
                let content = {
                    let _g = self.locks.lock(start >> self.geo.cluster_bits);
                    let (entry, bitmap) = self.entry(l2, start)?;
                    if entry & COMPRESSED == 0 {
                        None
                    } else {
                        Some(self.content(below, start, entry, bitmap)?)
                    }
                };
                if let Some(c) = content {
                    self.write_in_cluster(below, start, &c, Fetch::Allowed)?;
                }
                return self.zero_subclusters(below, start, pos, end, mode);
            }
            let host = entry & OFFSET_MASK;
            let (mut alloc, mut zero) = (bitmap as u32, (bitmap >> 32) as u32);
            let mut written_zero = Vec::new();
            let mut s_pos = pos;
            while s_pos < end {
                let s = ((s_pos - start) / sub) as u32;
                let s_start = start + u64::from(s) * sub;
                let s_end = (s_start + sub).min(end);
                let whole = s_pos == s_start && (s_end == s_start + sub || s_end == size);
                let bit = 1u32 << s;
                let shows = below.size() > s_start;
                if !whole {
                    let zero_now = zero & bit != 0 || (alloc & bit == 0 && !shows);
                    if !mode.trim && !zero_now {
                        partial.push((s_pos, s_end));
                    }
                } else if mode.no_hole && alloc & bit != 0 && entry & COPIED != 0 {
                    written_zero.push((s_start, s_end));
                } else if shows || mode.no_hole {
                    alloc &= !bit;
                    zero |= bit;
                } else {
                    alloc &= !bit;
                    zero &= !bit;
                }
                s_pos = s_end;
            }
            if !written_zero.is_empty() && mode.fast {
                return Err(Error::NotFast {
                    path: self.live.name.clone(),
                    offset: written_zero[0].0,
                });
            }
            for &(a, b) in &written_zero {
                let zeroes = vec![0u8; (b - a) as usize];
                self.pwrite_data("write zeroes", &zeroes, host + (a - start))?;
            }
            let (new_entry, unref) = if alloc == 0 && host != 0 {
                (0, vec![host])
            } else {
                (entry, Vec::new())
            };
            let new_bitmap = u64::from(alloc) | (u64::from(zero) << 32);
            if (new_entry, new_bitmap) != (entry, bitmap) {
                self.link(l2, start, new_entry, new_bitmap, unref)?;
            }
        }
        if !partial.is_empty() && mode.fast {
            return Err(Error::NotFast {
                path: self.live.name.clone(),
                offset: partial[0].0,
            });
        }
        for (a, b) in partial {
            let zeroes = vec![0u8; (b - a) as usize];
            self.write_in_cluster(below, a, &zeroes, Fetch::Allowed)?;
        }
        Ok(())
    }
}
