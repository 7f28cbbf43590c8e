//! Writing a qcow2 image: allocation, copy-on-write, zeroing and discarding, flushes
//! and growth, in an order that survives a crash at any point.
//!
//! The invariants that make a crash harmless (the worst outcome is leaked clusters):
//!
//! - a refcount in memory is never below the number of references on disk: a cluster's
//!   refcount rises before any table points at it, and drops only once the table that
//!   stopped pointing at it is durable ([`Meta::pending_free`]); so refcount blocks may
//!   be written at any time;
//! - an L2 entry reaches the file only after the data it points at and the refcount
//!   that covers it are durable: write-back writes refcount blocks, syncs, then writes
//!   L2 tables (and syncs again before an L1 entry points at a new L2 table);
//! - a freed cluster is reused only after the unlink is durable, so no cluster is ever
//!   used twice, not even across a crash.
//!
//! Concurrency: each guest cluster being changed is locked on its own
//! ([`ClusterLocks`]); metadata is changed in memory under the short lock of
//! [`Live`], never held during I/O. Data of clusters already allocated to the guest
//! (refcount 1) is written in place without any metadata change.
//!
//! Reads of the backing chain (to fill a partial cluster) go through [`Below`], which
//! the caller provides: the rest of the chain, or an export it opened.

use std::collections::HashSet;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, RwLock};

use crate::cache::Fetch;
use crate::compress::decompress;
use crate::layer::Compression;
use crate::{Error, Result};

use super::check::refcount_entry;
use super::live::{Kind, Live, Meta, read_full};
use super::lock::ImageLock;
use super::{COMPRESSED, COPIED, OFFSET_MASK, REFTABLE_MASK, SUBCLUSTERS, ZERO_FLAG};

/// Most whole clusters one write allocates and links as a batch.
const MAX_RUN: usize = 256;
/// Dirty metadata kept in memory before it is written back without a flush.
pub const DIRTY_LIMIT: usize = 8 << 20;

/// The guest bytes below the image being written: its backing chain.
pub trait Below: Send + Sync {
    /// The backing's guest size: bytes at or past it read as zeroes. 0 without one.
    fn size(&self) -> u64;
    /// Reads `buf.len()` bytes at `offset` (zeroes past [`Below::size`]).
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
}

/// For writes that must not read below ([`Qcow2Writer::try_write`]): every read fails
/// with [`Error::NotCached`], so a missed check can never stand in zeroes for data.
struct NeverRead;

impl Below for NeverRead {
    fn size(&self) -> u64 {
        0
    }

    fn read(&self, _offset: u64, _buf: &mut [u8]) -> Result<()> {
        Err(Error::NotCached)
    }
}

/// No backing: everything below reads as zeroes.
#[derive(Debug, Clone, Copy)]
pub struct NoBacking;

impl Below for NoBacking {
    fn size(&self) -> u64 {
        0
    }

    fn read(&self, _offset: u64, buf: &mut [u8]) -> Result<()> {
        buf.fill(0);
        Ok(())
    }
}

/// How a range is zeroed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroMode {
    /// Keep the range allocated (`NBD_CMD_FLAG_NO_HOLE`).
    pub no_hole: bool,
    /// Fail with [`Error::NotFast`] rather than write zero bytes.
    pub fast: bool,
    /// A discard (TRIM): partial clusters are left alone.
    pub trim: bool,
}

/// The image's fixed geometry.
#[derive(Debug, Clone, Copy)]
pub(super) struct Geometry {
    pub cluster_bits: u32,
    pub cluster_size: u64,
    pub extended: bool,
    pub entry_size: usize,
    /// log2 of the guest bytes one L2 table maps.
    pub l1_bits: u32,
    pub refcount_order: u32,
    pub version: u32,
    pub compression: Compression,
}

impl Geometry {
    fn refcounts_per_block(&self) -> u64 {
        (self.cluster_size * 8) >> self.refcount_order
    }

    fn max_refcount(&self) -> u64 {
        if self.refcount_order >= 6 {
            u64::MAX
        } else {
            (1u64 << (1u64 << self.refcount_order)) - 1
        }
    }

    fn entry_at(&self, guest: u64) -> usize {
        let index_mask = (1u64 << (self.l1_bits - self.cluster_bits)) - 1;
        ((guest >> self.cluster_bits) & index_mask) as usize * self.entry_size
    }

    /// Host offset and byte length of a compressed cluster's stream (rounded to sectors).
    fn compressed_span(&self, entry: u64) -> (u64, u64) {
        let x = 62 - (self.cluster_bits - 8);
        let offset = entry & ((1u64 << x) - 1);
        let sectors = ((entry & (COMPRESSED - 1)) >> x) + 1;
        (offset, sectors * 512 - (offset & 511))
    }

    /// The host clusters an entry references (that lose a reference when it goes).
    fn referenced(&self, entry: u64) -> Vec<u64> {
        if entry & COMPRESSED != 0 {
            let (offset, length) = self.compressed_span(entry);
            let first = offset >> self.cluster_bits;
            let last = (offset + length - 1) >> self.cluster_bits;
            return (first..=last).map(|c| c << self.cluster_bits).collect();
        }
        match entry & OFFSET_MASK {
            0 => Vec::new(),
            host => vec![host],
        }
    }
}

/// Writes `value` as entry `i` of a refcount block of `1 << order`-bit entries.
pub(super) fn set_refcount_entry(block: &mut [u8], order: u32, i: usize, value: u64) {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let shift = (i % per_byte) * bits;
            let mask = (((1u16 << bits) - 1) as u8) << shift;
            let b = &mut block[i / per_byte];
            *b = (*b & !mask) | (((value as u8) << shift) & mask);
        }
        3 => block[i] = value as u8,
        4 => block[i * 2..i * 2 + 2].copy_from_slice(&(value as u16).to_be_bytes()),
        5 => block[i * 4..i * 4 + 4].copy_from_slice(&(value as u32).to_be_bytes()),
        _ => block[i * 8..i * 8 + 8].copy_from_slice(&value.to_be_bytes()),
    }
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

fn get64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Guest clusters being changed, each locked on its own.
#[derive(Debug, Default)]
struct ClusterLocks {
    busy: Mutex<HashSet<u64>>,
    freed: Condvar,
}

struct ClusterGuard<'a> {
    locks: &'a ClusterLocks,
    cluster: u64,
}

impl ClusterLocks {
    fn lock(&self, cluster: u64) -> ClusterGuard<'_> {
        let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        while !busy.insert(cluster) {
            busy = self.freed.wait(busy).unwrap_or_else(|e| e.into_inner());
        }
        ClusterGuard {
            locks: self,
            cluster,
        }
    }

    /// Locks `cluster`, waiting for another write that holds it only if `fetch`
    /// allows blocking; else [`Error::NotCached`].
    fn lock_for(&self, cluster: u64, fetch: Fetch) -> Result<ClusterGuard<'_>> {
        if fetch == Fetch::Allowed {
            return Ok(self.lock(cluster));
        }
        let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        if !busy.insert(cluster) {
            return Err(Error::NotCached);
        }
        Ok(ClusterGuard {
            locks: self,
            cluster,
        })
    }
}

impl Drop for ClusterGuard<'_> {
    fn drop(&mut self) {
        let mut busy = self.locks.busy.lock().unwrap_or_else(|e| e.into_inner());
        busy.remove(&self.cluster);
        self.locks.freed.notify_all();
    }
}

/// Where the header fields the writer changes live.
const HEADER_SIZE: u64 = 24;
const HEADER_L1_SIZE: u64 = 36;
const HEADER_REFTABLE: u64 = 48;

/// A qcow2 image open for writing. Its reads go through the [`super::Qcow2Layer`]
/// opened with it (which shares the metadata); dropping the writer does not flush:
/// call [`Qcow2Writer::flush`] first.
#[derive(Debug)]
pub struct Qcow2Writer {
    live: Arc<Live>,
    geo: Geometry,
    locks: ClusterLocks,
    /// One write-back (or table relocation) at a time.
    writeback: Mutex<()>,
    /// Taken for writing by resize; every other operation holds it for reading.
    resizing: RwLock<()>,
    /// Serializes the creation or copy of L2 tables (rare: once per L1 entry).
    new_tables: Mutex<()>,
    _lock: ImageLock,
}

impl Qcow2Writer {
    pub(super) fn new(live: Arc<Live>, geo: Geometry, lock: ImageLock) -> Qcow2Writer {
        Qcow2Writer {
            live,
            geo,
            locks: ClusterLocks::default(),
            writeback: Mutex::new(()),
            resizing: RwLock::new(()),
            new_tables: Mutex::new(()),
            _lock: lock,
        }
    }

    /// The image's name (its path).
    pub fn name(&self) -> &str {
        &self.live.name
    }

    /// Guest size in bytes.
    pub fn size(&self) -> u64 {
        self.live.size()
    }

    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.geo.cluster_size
    }

    fn io(
        &self,
        op: &'static str,
        offset: u64,
        length: u64,
    ) -> impl FnOnce(std::io::Error) -> Error + use<> {
        Error::io_at(&self.live.name, op, offset, length)
    }

    fn invalid(&self, reason: String) -> Error {
        Error::invalid(&self.live.name, super::header::FORMAT, reason)
    }

    fn pwrite(&self, op: &'static str, buf: &[u8], offset: u64) -> Result<()> {
        self.live
            .file
            .write_all_at(buf, offset)
            .map_err(self.io(op, offset, buf.len() as u64))?;
        self.live
            .file_size
            .fetch_max(offset + buf.len() as u64, Ordering::AcqRel);
        Ok(())
    }

    /// Writes guest bytes at host `offset`, unless that would overwrite the image's
    /// metadata: a crafted (or corrupt) table may point a guest cluster there.
    fn pwrite_data(&self, op: &'static str, buf: &[u8], offset: u64) -> Result<()> {
        if let Some(at) = self.live.lock().metadata_in(offset, buf.len() as u64) {
            return Err(self.invalid(format!(
                "refusing to {op} at host offset {offset:#x}: the cluster at {at:#x} holds the \
                 image's own metadata (the image is corrupt; `thinline image check` it)"
            )));
        }
        self.pwrite(op, buf, offset)
    }

    fn pread(&self, op: &'static str, buf: &mut [u8], offset: u64) -> Result<()> {
        read_full(&self.live.file, buf, offset).map_err(self.io(op, offset, buf.len() as u64))
    }

    fn sync(&self) -> Result<()> {
        self.live.file.sync_data().map_err(self.io("sync", 0, 0))
    }

    fn read_lock(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.resizing.read().unwrap_or_else(|e| e.into_inner())
    }

    fn check_range(&self, offset: u64, length: u64) -> Result<()> {
        let size = self.live.size();
        if offset.checked_add(length).is_none_or(|end| end > size) {
            return Err(self.invalid(format!(
                "write of {length} bytes at guest offset {offset} beyond the virtual size {size}"
            )));
        }
        Ok(())
    }

    // ---- writes ----

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
    fn after_change(&self, fua: bool) -> Result<()> {
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
    fn entry(&self, l2: u64, guest: u64) -> Result<(u64, u64)> {
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
    fn link(&self, l2: u64, guest: u64, entry: u64, bitmap: u64, unref: Vec<u64>) -> Result<()> {
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
    fn own_l2(&self, guest: u64, fetch: Fetch) -> Result<u64> {
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

    fn write_in_cluster(
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
    fn content(&self, below: &dyn Below, start: u64, entry: u64, bitmap: u64) -> Result<Vec<u8>> {
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

    // ---- zeroes and discards ----

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

    // ---- allocation ----

    /// Allocates one host cluster (refcount 0 → 1) and returns its offset.
    fn alloc_cluster(&self, fetch: Fetch) -> Result<u64> {
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
    fn adjust(&self, offset: u64, delta: i64) -> Result<()> {
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
    fn release(&self, offset: u64) {
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
        if clusters * cs > super::header::MAX_REFCOUNT_TABLE_BYTES {
            return Err(self.invalid(format!(
                "the image would need a refcount table of {} bytes, over qemu's limit of {}",
                clusters * cs,
                super::header::MAX_REFCOUNT_TABLE_BYTES
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

    // ---- write-back ----

    /// Writes every dirty refcount block (always safe: see the module doc).
    fn write_refblocks(&self) -> Result<()> {
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
    fn write_back(&self) -> Result<()> {
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

    // ---- resize ----

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
        if bytes > super::header::MAX_L1_BYTES {
            return Err(self.invalid(format!(
                "the new size needs an L1 table of {bytes} bytes, over qemu's limit of {}",
                super::header::MAX_L1_BYTES
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

    /// Allocates `n` contiguous clusters past everything allocated; returns the first.
    fn alloc_run(&self, n: u64) -> Result<u64> {
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
