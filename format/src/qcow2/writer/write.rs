//! Data writes: in place, into newly allocated clusters, or copy-on-write from
//! the backing (whole clusters, or subclusters with extended L2).

use crate::cache::Fetch;
use crate::compress::decompress;
use crate::qcow2::live::Kind;
use crate::qcow2::{COMPRESSED, COPIED, OFFSET_MASK, SUBCLUSTERS, ZERO_FLAG};
use crate::{Error, Result};

use super::locks::ClusterGuard;
use super::{Below, DIRTY_LIMIT, MAX_RUN, NeverRead, Qcow2Writer, get64, put64};

impl Qcow2Writer {
    /// Writes `data` at guest `offset`; durable before returning if `fua`.
    pub fn write(&self, below: &dyn Below, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        {
            let _r = self.read_lock();
            self.write_with(below, offset, data, Fetch::Allowed)?;
        }
        self.after_change(fua)
    }

    /// Writes `data` at guest `offset` if that takes no I/O but the `pwrite` of the data
    /// itself: the tables it changes are in memory, no other write holds its clusters,
    /// and no byte of a cluster has to come from the backing or from a shared or
    /// compressed cluster. Otherwise it fails with [`Error::NotCached`], and the caller
    /// calls [`Qcow2Writer::write`] where blocking is fine: clusters this call already
    /// wrote and linked are then written again in place with the same bytes.
    ///
    /// It never flushes and never writes metadata back: the caller checks
    /// [`Qcow2Writer::write_back_due`].
    pub fn try_write(&self, offset: u64, data: &[u8]) -> Result<()> {
        let Ok(_r) = self.resizing.try_read() else {
            return Err(Error::NotCached);
        };
        self.write_with(&NeverRead, offset, data, Fetch::CachedOnly)
    }

    /// Whether enough metadata is dirty that it should be written back now (see
    /// [`Qcow2Writer::write_back_if_due`]).
    pub fn write_back_due(&self) -> bool {
        self.live.lock().dirty_bytes > DIRTY_LIMIT
    }

    /// Writes metadata back if [`Qcow2Writer::write_back_due`].
    pub fn write_back_if_due(&self) -> Result<()> {
        if self.write_back_due() {
            let _r = self.read_lock();
            self.write_back()?;
        }
        Ok(())
    }

    fn write_with(&self, below: &dyn Below, offset: u64, data: &[u8], fetch: Fetch) -> Result<()> {
        {
            self.check_range(offset, data.len() as u64)?;
            let cs = self.geo.cluster_size;
            let mut pos = offset;
            let mut rest = data;
            while !rest.is_empty() {
                let whole = (rest.len() as u64 / cs) as usize;
                if pos.is_multiple_of(cs) && whole > 1 {
                    // Whole clusters: allocated together, written in runs.
                    let n = whole.min(MAX_RUN);
                    let len = n * cs as usize;
                    self.write_clusters(pos, &rest[..len], fetch)?;
                    pos += len as u64;
                    rest = &rest[len..];
                    continue;
                }
                let cluster_end = (pos & !(cs - 1)) + cs;
                let n = ((cluster_end - pos) as usize).min(rest.len());
                self.write_in_cluster(below, pos, &rest[..n], fetch)?;
                pos += n as u64;
                rest = &rest[n..];
            }
        }
        Ok(())
    }

    /// Flushes if asked (FUA), else writes metadata back once too much is dirty.
    pub(super) fn after_change(&self, fua: bool) -> Result<()> {
        if fua {
            return self.flush();
        }
        if self.write_back_due() {
            self.write_back()?;
        }
        Ok(())
    }

    /// The L2 entry (and extended bitmap) of guest cluster `guest` in the table at
    /// `l2` (which is in memory or read now).
    pub(super) fn entry(&self, l2: u64, guest: u64) -> Result<(u64, u64)> {
        self.entry_with(l2, guest, Fetch::Allowed)
    }

    fn entry_with(&self, l2: u64, guest: u64, fetch: Fetch) -> Result<(u64, u64)> {
        let table = self.live.block(l2, "L2 table", fetch)?;
        let at = self.geo.entry_at(guest);
        let bitmap = if self.geo.extended {
            get64(&table, at + 8)
        } else {
            0
        };
        Ok((get64(&table, at), bitmap))
    }

    /// Sets the L2 entry of `guest` and queues the clusters it no longer references.
    pub(super) fn link(
        &self,
        l2: u64,
        guest: u64,
        entry: u64,
        bitmap: u64,
        unref: Vec<u64>,
    ) -> Result<()> {
        let at = self.geo.entry_at(guest);
        let extended = self.geo.extended;
        loop {
            {
                let mut m = self.live.lock();
                if m.modify(l2, Kind::L2, |t| {
                    put64(t, at, entry);
                    if extended {
                        put64(t, at + 8, bitmap);
                    }
                }) {
                    m.pending_free.extend(unref);
                    return Ok(());
                }
            }
            // Dropped from memory (it was clean): read it back and retry.
            self.live.block(l2, "L2 table", Fetch::Allowed)?;
        }
    }

    /// Makes the active L1 entry of `guest` point at an L2 table this image alone
    /// references (creating or copying one), and returns its offset.
    pub(super) fn own_l2(&self, guest: u64, fetch: Fetch) -> Result<u64> {
        let index = (guest >> self.geo.l1_bits) as usize;
        let l1e = {
            let m = self.live.lock();
            *m.l1.get(index).ok_or_else(|| {
                self.invalid(format!("guest offset {guest} lies beyond the L1 table"))
            })?
        };
        if l1e & OFFSET_MASK != 0 && l1e & COPIED != 0 {
            return Ok(l1e & OFFSET_MASK);
        }
        let _g = match fetch {
            Fetch::Allowed => self.new_tables.lock().unwrap_or_else(|e| e.into_inner()),
            Fetch::CachedOnly => self.new_tables.try_lock().map_err(|_| Error::NotCached)?,
        };
        let l1e = self.live.lock().l1[index];
        let old = l1e & OFFSET_MASK;
        if old != 0 && l1e & COPIED != 0 {
            return Ok(old);
        }
        let table = if old == 0 {
            vec![0u8; self.geo.cluster_size as usize]
        } else {
            // Shared with an internal snapshot: copy it (the clusters it points at are
            // counted once per snapshot already, so their refcounts stay).
            self.live.block(old, "L2 table", fetch)?.to_vec()
        };
        let new = self.alloc_cluster(fetch)?;
        let cs = self.geo.cluster_size;
        let mut m = self.live.lock();
        m.insert_new(new, Kind::L2, table);
        m.protect(new, cs);
        m.l1[index] = new | COPIED;
        m.l1_dirty = m.next_generation();
        if old != 0 {
            m.unprotect(old, cs);
            m.pending_free.push(old);
        }
        Ok(new)
    }

    pub(super) fn write_in_cluster(
        &self,
        below: &dyn Below,
        pos: u64,
        data: &[u8],
        fetch: Fetch,
    ) -> Result<()> {
        let cs = self.geo.cluster_size;
        let start = pos & !(cs - 1);
        let off = (pos - start) as usize;
        let _g = self.locks.lock_for(start >> self.geo.cluster_bits, fetch)?;
        let l2 = self.own_l2(start, fetch)?;
        let (entry, bitmap) = self.entry_with(l2, start, fetch)?;
        let host = entry & OFFSET_MASK;
        if entry & COMPRESSED == 0 && self.geo.extended {
            return self.write_subclusters(below, l2, (entry, bitmap), pos, data, fetch);
        }
        if entry & COMPRESSED == 0 && host != 0 && entry & COPIED != 0 && entry & ZERO_FLAG == 0 {
            return self.pwrite_data("write data", data, host + off as u64);
        }
        let whole = off == 0 && data.len() as u64 == cs;
        if !whole && fetch == Fetch::CachedOnly {
            // The rest of the cluster has to be read first.
            return Err(Error::NotCached);
        }
        let reuse = entry & COMPRESSED == 0 && host != 0 && entry & COPIED != 0;
        let target = if reuse {
            host
        } else {
            self.alloc_cluster(fetch)?
        };
        let filled;
        let buf: &[u8] = if whole {
            data
        } else {
            let content = self.content(below, start, entry, bitmap);
            filled = content.map(|mut b| {
                b[off..off + data.len()].copy_from_slice(data);
                b
            });
            match &filled {
                Ok(b) => b,
                Err(_) => {
                    if !reuse {
                        self.release(target);
                    }
                    return filled.map(|_| ());
                }
            }
        };
        if let Err(e) = self.pwrite_data("write data", buf, target) {
            if !reuse {
                self.release(target);
            }
            return Err(e);
        }
        let unref = if reuse {
            Vec::new()
        } else {
            self.geo.referenced(entry)
        };
        let full = if self.geo.extended {
            u64::from(u32::MAX)
        } else {
            0
        };
        self.link(l2, start, target | COPIED, full, unref)
    }

    /// Writes whole clusters from `start` (cluster aligned): clusters the image owns are
    /// written in place, the others get new clusters, allocated one after the other so
    /// that they are mostly contiguous, and each run of contiguous host clusters is
    /// written with one `pwrite`; then the entries are linked.
    fn write_clusters(&self, start: u64, data: &[u8], fetch: Fetch) -> Result<()> {
        let cs = self.geo.cluster_size;
        let n = data.len() / cs as usize;
        let first = start >> self.geo.cluster_bits;
        let _guards = (first..first + n as u64)
            .map(|c| self.locks.lock_for(c, fetch))
            .collect::<Result<Vec<ClusterGuard<'_>>>>()?;
        // (guest, host, l2, old entry, newly allocated)
        let mut plan: Vec<(u64, u64, u64, u64, bool)> = Vec::with_capacity(n);
        let release_all = |plan: &[(u64, u64, u64, u64, bool)]| {
            for &(_, host, _, _, fresh) in plan {
                if fresh {
                    self.release(host);
                }
            }
        };
        for i in 0..n as u64 {
            let guest = start + i * cs;
            let step = self.own_l2(guest, fetch).and_then(|l2| {
                let (entry, bitmap) = self.entry_with(l2, guest, fetch)?;
                let host = entry & OFFSET_MASK;
                let owned = entry & COMPRESSED == 0 && host != 0 && entry & COPIED != 0;
                let in_place = owned
                    && if self.geo.extended {
                        bitmap as u32 == u32::MAX
                    } else {
                        entry & ZERO_FLAG == 0
                    };
                if in_place {
                    return Ok((guest, host, l2, entry, false));
                }
                if owned {
                    // A zero cluster (or partly allocated one) with its own host cluster.
                    return Ok((guest, host, l2, entry, false));
                }
                Ok((guest, self.alloc_cluster(fetch)?, l2, entry, true))
            });
            match step {
                Ok(p) => plan.push(p),
                Err(e) => {
                    release_all(&plan);
                    return Err(e);
                }
            }
        }
        let mut i = 0;
        while i < n {
            let mut j = i + 1;
            while j < n && plan[j].1 == plan[j - 1].1 + cs {
                j += 1;
            }
            let bytes = &data[i * cs as usize..j * cs as usize];
            if let Err(e) = self.pwrite_data("write data", bytes, plan[i].1) {
                release_all(&plan);
                return Err(e);
            }
            i = j;
        }
        let full = if self.geo.extended {
            u64::from(u32::MAX)
        } else {
            0
        };
        for (guest, host, l2, entry, fresh) in plan {
            let linked = host | COPIED;
            if !fresh && entry == linked && (!self.geo.extended || self.entry(l2, guest)?.1 == full)
            {
                continue;
            }
            let unref = if fresh {
                self.geo.referenced(entry)
            } else {
                Vec::new()
            };
            self.link(l2, guest, linked, full, unref)?;
        }
        Ok(())
    }

    /// A write at guest `pos`, inside one cluster of an image with extended L2 entries
    /// (subclusters); `entry` and `bitmap` are the cluster's, in the L2 table at `l2`.
    fn write_subclusters(
        &self,
        below: &dyn Below,
        l2: u64,
        (entry, bitmap): (u64, u64),
        pos: u64,
        data: &[u8],
        fetch: Fetch,
    ) -> Result<()> {
        let cs = self.geo.cluster_size;
        let start = pos & !(cs - 1);
        let off = (pos - start) as usize;
        let sub = (cs / SUBCLUSTERS) as usize;
        let (mut alloc, mut zero) = (bitmap as u32, (bitmap >> 32) as u32);
        let first = off / sub;
        let last = (off + data.len()).div_ceil(sub);
        let mask = (((1u64 << (last - first)) - 1) << first) as u32;
        let mut host = entry & OFFSET_MASK;
        let copied = entry & COPIED != 0;
        if host != 0 && copied && alloc & mask == mask {
            return self.pwrite_data("write data", data, host + off as u64);
        }
        let covered = off.is_multiple_of(sub) && (off + data.len()).is_multiple_of(sub);
        if fetch == Fetch::CachedOnly && (!covered || (host != 0 && !copied && alloc != 0)) {
            // Bytes of the subclusters (or of a shared cluster) have to be read first.
            return Err(Error::NotCached);
        }
        let mut unref = Vec::new();
        let mut fresh = None;
        if host == 0 || !copied {
            let new = self.alloc_cluster(fetch)?;
            fresh = Some(new);
            if host != 0 && alloc != 0 {
                // Shared with a snapshot: copy what is allocated first.
                let mut old = vec![0u8; cs as usize];
                self.pread("copy shared cluster", &mut old, host)
                    .and_then(|()| self.pwrite_data("copy shared cluster", &old, new))
                    .inspect_err(|_| self.release(new))?;
            }
            if host != 0 {
                unref.push(host);
            }
            host = new;
        }
        let span = first * sub..last * sub;
        let mut buf = vec![0u8; span.len()];
        for s in first..last {
            let lo = s * sub;
            let covered = off <= lo && lo + sub <= off + data.len();
            if covered {
                continue;
            }
            let piece = &mut buf[lo - span.start..lo - span.start + sub];
            let bit = 1u32 << s;
            let filled = if alloc & bit != 0 {
                self.pread("read subcluster", piece, host + lo as u64)
            } else if zero & bit != 0 {
                Ok(())
            } else {
                below.read(start + lo as u64, piece)
            };
            if let Err(e) = filled {
                if let Some(new) = fresh {
                    self.release(new);
                }
                return Err(e);
            }
        }
        buf[off - span.start..off - span.start + data.len()].copy_from_slice(data);
        if let Err(e) = self.pwrite_data("write data", &buf, host + span.start as u64) {
            if let Some(new) = fresh {
                self.release(new);
            }
            return Err(e);
        }
        alloc |= mask;
        zero &= !mask;
        let bitmap = u64::from(alloc) | (u64::from(zero) << 32);
        self.link(l2, start, host | COPIED, bitmap, unref)
    }

    /// The whole current content of the cluster at `start` (standard or compressed
    /// entry, or an extended one), for a partial write.
    pub(super) fn content(
        &self,
        below: &dyn Below,
        start: u64,
        entry: u64,
        bitmap: u64,
    ) -> Result<Vec<u8>> {
        let cs = self.geo.cluster_size;
        let mut buf = vec![0u8; cs as usize];
        let host = entry & OFFSET_MASK;
        if entry & COMPRESSED != 0 {
            let (offset, length) = self.geo.compressed_span(entry);
            let mut input = vec![0u8; length as usize];
            self.pread("read compressed cluster", &mut input, offset)?;
            decompress(self.geo.compression, &input, &mut buf).map_err(|reason| {
                Error::Decompress {
                    path: self.live.name.clone(),
                    offset,
                    reason,
                }
            })?;
        } else if self.geo.extended {
            let sub = (cs / SUBCLUSTERS) as usize;
            let (alloc, zero) = (bitmap as u32, (bitmap >> 32) as u32);
            for s in 0..SUBCLUSTERS as usize {
                let piece = &mut buf[s * sub..(s + 1) * sub];
                if alloc & (1 << s) != 0 {
                    self.pread("read subcluster", piece, host + (s * sub) as u64)?;
                } else if zero & (1 << s) == 0 {
                    below.read(start + (s * sub) as u64, piece)?;
                }
            }
        } else if entry & ZERO_FLAG != 0 {
        } else if host != 0 {
            self.pread("read cluster", &mut buf, host)?;
        } else {
            below.read(start, &mut buf)?;
        }
        Ok(buf)
    }
}
