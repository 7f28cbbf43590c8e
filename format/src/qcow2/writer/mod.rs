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

mod alloc;
mod locks;
mod resize;
mod write;
mod writeback;
mod zero;

use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};

use crate::layer::Compression;
use crate::{Error, Result};

use super::live::{Live, read_full};
use super::lock::ImageLock;
use super::{COMPRESSED, OFFSET_MASK};
use locks::ClusterLocks;

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
}
