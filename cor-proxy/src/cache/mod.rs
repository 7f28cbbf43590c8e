//! The cache file or device: template bytes at their own offsets, then the metadata.
//!
//! ```text
//!   0                         data_end = size rounded up to 1 MiB
//!   ├── template bytes ───────┤ superblock A (4 KiB) │ superblock B (4 KiB) │ presence map … │ checksums …
//! ```
//!
//! Keeping the data at its own offsets means a complete cache *is* the template's raw
//! disk (the agent can point dm-thin's external origin at it); the metadata after it is
//! outside any read of the template.
//!
//! Every chunk has a CRC32C in the checksum table (4 bytes per chunk, little-endian),
//! so bit rot, a scribbled file or a forged presence bit is caught: a chunk is checked
//! the first time this process reads it from disk ([`CacheFile::verify`]) and by a
//! full [`CacheFile::scrub`]; a bad chunk loses its bit and is fetched again.
//!
//! Crash safety rests on one rule, enforced by [`CacheFile`]'s callers: a chunk's bit is
//! written only after its data and its checksum are durable (`write` data and checksum,
//! `fdatasync`, then the map page). Bits only ever go from 0 to 1 (except for a chunk
//! found bad), so a torn map write leaves a mix of old and new bits, each of which is
//! safe. Superblock updates alternate between two slots with a generation number and a
//! CRC, so a torn superblock write leaves the other slot.
//!
//! A cache is keyed by the template's identity and refused (or discarded, by option)
//! when the identity differs. Data that is not a cache is never overwritten, and the
//! cache is opened without following a symbolic link (except, on request, one to a
//! block device such as an LVM volume). It has one owner, enforced with `flock`; the
//! owner records itself in the superblock so a refused second owner can be told who
//! holds it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::error::{Error, Result};

mod files;
mod layout;
mod names;

use files::{device_size, holds_no_data, lock, open_cache_file};
pub(crate) use layout::Geometry;
use layout::{Found, Invalid, Superblock, locate_size, read_holder, truncate};
pub use names::{cache_file_name, other_caches_of};

/// Size of one superblock slot.
const SLOT: u64 = 4096;
/// Data is followed by metadata at the next multiple of this.
const DATA_ALIGN: u64 = 1 << 20;
/// Presence-map pages are written in units of this.
pub(crate) const MAP_PAGE: u64 = 4096;
const MAGIC: &[u8; 8] = b"THLCOR\0\x01";
/// Version 2 added the checksum table; version 1 caches are discarded at open.
const VERSION: u32 = 2;
const IDENTITY_MAX: usize = 3072;
const HOLDER_MAX: usize = 896;
const IDENTITY_AT: usize = 64;
const HOLDER_AT: usize = IDENTITY_AT + IDENTITY_MAX;
const CRC_AT: usize = SLOT as usize - 4;
/// Superblock flag: every chunk is present.
const FLAG_COMPLETE: u32 = 1;

/// Default chunk size: the unit of presence.
pub const DEFAULT_CHUNK_SIZE: u64 = 64 * 1024;

/// Bytes a cache of a `size`-byte template in chunks of `chunk` bytes needs: the data
/// at its own offsets, then the superblocks, presence map and checksums (what a block
/// device given as a cache must hold, such as a thin volume made for it).
pub fn cache_len(size: u64, chunk: u64) -> u64 {
    Geometry::new(size, chunk).total()
}

/// Where the metadata of a cache of a `size`-byte template starts: everything before
/// it is the template's bytes at their own offsets, then zeroes (never written).
pub fn cache_data_end(size: u64) -> u64 {
    Geometry::new(size, DEFAULT_CHUNK_SIZE).meta
}

/// What to do with a cache made for another template version.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OnMismatch {
    /// Refuse to start (the default).
    #[default]
    Refuse,
    /// Drop its contents and start empty.
    Discard,
}

/// How to open a cache.
#[derive(Debug, Clone)]
pub struct CacheOptions {
    /// The template's size in bytes.
    pub size: u64,
    /// The template's identity (source, size, ETag / version / mtime).
    pub identity: String,
    /// Presence granularity for a new cache (a power of two, 4 KiB to 16 MiB); an
    /// existing cache keeps its own.
    pub chunk_size: u64,
    /// What to do with a cache of another identity.
    pub on_mismatch: OnMismatch,
    /// Who opens it, recorded for a refused second owner ("pid 12 (thinline proxy …)").
    pub holder: String,
    /// Follow `path` if it is a symbolic link to a block device (an LVM volume's
    /// `/dev/VG/LV`); any other link is refused. Off for names Thinline makes itself.
    pub follow_device_links: bool,
}

/// True for a chunk size this format accepts.
pub fn valid_chunk_size(chunk: u64) -> bool {
    chunk.is_power_of_two() && (4096..=16 << 20).contains(&chunk)
}

/// An open, locked cache.
#[derive(Debug)]
pub struct CacheFile {
    path: PathBuf,
    file: std::sync::Arc<File>,
    block_device: bool,
    geometry: Geometry,
    /// One bit per chunk, set only for durable chunks. Written by one task at a time
    /// (the durability batcher); read by everyone.
    bits: Vec<AtomicU64>,
    /// One bit per chunk: present and known good in this process (fetched by it, or
    /// read from disk and checked). Always a subset of `bits`.
    verified: Vec<AtomicU64>,
    /// The checksum table in memory.
    sums: Vec<AtomicU32>,
    /// The checksum of a whole chunk of zeroes.
    zero_sum: u32,
    present: AtomicU64,
    superblock: std::sync::Mutex<Superblock>,
    /// Held while map pages are built and written, so pages land in the order their
    /// contents were taken.
    map_write: std::sync::Mutex<()>,
    identity: String,
}

/// What [`CacheFile::scrub`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ScrubReport {
    /// Chunks in the template.
    pub chunks: u64,
    /// Chunks marked present (and so checked).
    pub present: u64,
    /// Chunks whose data does not match their checksum: `(chunk, offset)`.
    pub bad: Vec<(u64, u64)>,
}

/// How to open an existing cache for [`CacheFile::open_existing`] (`scrub`).
#[derive(Debug, Clone, Default)]
pub struct ExistingOptions {
    /// The template's size; needed for a block device, found from a file's length.
    pub size: Option<u64>,
    /// Open for writing (to clear bad chunks' bits).
    pub writable: bool,
    /// Follow a symbolic link to a block device.
    pub follow_device_links: bool,
}

/// The checksum of `len` zero bytes.
fn zero_sum(len: u64) -> u32 {
    static ZEROES: [u8; 64 << 10] = [0; 64 << 10];
    let mut crc = 0;
    let mut left = len;
    while left > 0 {
        let n = left.min(ZEROES.len() as u64);
        crc = crc32c::crc32c_append(crc, &ZEROES[..n as usize]);
        left -= n;
    }
    crc
}

impl CacheFile {
    /// Opens (or creates) the cache at `path` for the template described by `options`.
    ///
    /// A symbolic link at `path` is refused (unless `follow_device_links` and it leads
    /// to a block device); data that is not a cache is never overwritten, whatever
    /// `on_mismatch` says (an empty file, a file of holes or a device whose superblock
    /// slots are zero counts as empty). A cache of an older format is discarded.
    pub fn open(path: &Path, options: &CacheOptions) -> Result<CacheFile> {
        if !valid_chunk_size(options.chunk_size) {
            return Err(Error::Invalid(format!(
                "the chunk size must be a power of two from 4 KiB to 16 MiB, not {}",
                options.chunk_size
            )));
        }
        let io = |op: &'static str| {
            move |source: io::Error| Error::Io {
                path: path.to_owned(),
                op,
                source,
            }
        };
        let (file, meta) = open_cache_file(path, true, true, options.follow_device_links)?;
        let block_device = meta.file_type().is_block_device();
        lock(&file, path, Some(options.size))?;
        let length = if block_device {
            device_size(&file).map_err(io("size"))?
        } else {
            meta.len()
        };

        let mut cache = CacheFile::new(
            path,
            file,
            block_device,
            Geometry::new(options.size, options.chunk_size),
            Superblock {
                generation: 0,
                size: options.size,
                chunk_size: options.chunk_size,
                flags: 0,
                identity: options.identity.clone(),
                holder: options.holder.clone(),
            },
        );
        let needed = cache.geometry.total();
        if block_device && length < needed {
            return Err(Error::TooSmall {
                path: path.to_owned(),
                need: needed,
                have: length,
            });
        }
        let found = if !block_device && holds_no_data(&cache.file, length) {
            Found::Empty
        } else {
            let found = match cache.read_superblock(length) {
                // A cache of another size of the template keeps its superblock elsewhere.
                Err(Error::NotACache { .. }) if !block_device => {
                    match locate_size(&cache.file, path, length) {
                        Ok(size) => cache
                            .read_superblock_at(Geometry::new(size, DEFAULT_CHUNK_SIZE).meta)?,
                        Err(_) => cache.read_superblock(length)?,
                    }
                }
                other => other?,
            };
            match found {
                Found::Empty if !block_device => {
                    return Err(Error::NotACache {
                        path: path.to_owned(),
                        reason: format!(
                            "no cache superblock at offset {}, and the file holds data",
                            cache.geometry.meta
                        ),
                    });
                }
                found => found,
            }
        };
        let fresh = match found {
            Found::Current(sb)
                if sb.size == options.size
                    && sb.identity == truncate(&options.identity, IDENTITY_MAX) =>
            {
                if sb.chunk_size != options.chunk_size {
                    tracing::info!(
                        cache = %path.display(),
                        chunk_size = sb.chunk_size,
                        "the cache keeps the chunk size it was made with"
                    );
                }
                cache.set_geometry(Geometry::new(options.size, sb.chunk_size));
                *cache.superblock.get_mut().expect("not shared yet") = Superblock {
                    holder: options.holder.clone(),
                    ..sb
                };
                false
            }
            Found::Current(sb) => {
                if options.on_mismatch == OnMismatch::Refuse {
                    return Err(Error::IdentityMismatch {
                        path: path.to_owned(),
                        cached: one_line(&sb.identity),
                        current: one_line(&options.identity),
                    });
                }
                tracing::warn!(
                    cache = %path.display(),
                    cached = %one_line(&sb.identity),
                    "discarding a cache made for another template version"
                );
                true
            }
            Found::Old(version) => {
                tracing::warn!(
                    cache = %path.display(),
                    version,
                    "discarding a cache of an older format (version {version}, without \
                     checksums): its data cannot be verified; it is fetched again"
                );
                true
            }
            Found::Empty => true,
        };
        let geometry = cache.geometry;
        if block_device && length < geometry.total() {
            return Err(Error::TooSmall {
                path: path.to_owned(),
                need: geometry.total(),
                have: length,
            });
        }
        if fresh {
            cache.reset(length)?;
        } else {
            cache.load_map()?;
        }
        // Record the new holder (and bump the generation) in the other slot.
        cache.write_superblock(|_| {})?;
        Ok(cache)
    }

    /// Opens an existing cache of this format as it is, to [`scrub`](Self::scrub) it
    /// while no one else uses it: takes the owner's lock but records no holder and
    /// changes nothing. The template's size comes from `options.size`, or for a file
    /// from its length (refused if more than one layout fits).
    pub fn open_existing(path: &Path, options: &ExistingOptions) -> Result<CacheFile> {
        let io = |op: &'static str| {
            move |source: io::Error| Error::Io {
                path: path.to_owned(),
                op,
                source,
            }
        };
        let (file, meta) =
            open_cache_file(path, options.writable, false, options.follow_device_links)?;
        let block_device = meta.file_type().is_block_device();
        let length = if block_device {
            device_size(&file).map_err(io("size"))?
        } else {
            meta.len()
        };
        let size = match options.size {
            Some(size) => size,
            None if block_device => {
                return Err(Error::Invalid(format!(
                    "{} is a block device: give the template's size (--size)",
                    path.display()
                )));
            }
            None => locate_size(&file, path, length)?,
        };
        lock(&file, path, Some(size))?;
        let placeholder = Superblock {
            generation: 0,
            size,
            chunk_size: DEFAULT_CHUNK_SIZE,
            flags: 0,
            identity: String::new(),
            holder: String::new(),
        };
        let mut cache = CacheFile::new(
            path,
            file,
            block_device,
            Geometry::new(size, DEFAULT_CHUNK_SIZE),
            placeholder,
        );
        let sb = match cache.read_superblock(length)? {
            Found::Current(sb) if sb.size == size => sb,
            Found::Current(sb) => {
                return Err(Error::NotACache {
                    path: path.to_owned(),
                    reason: format!("a cache of a {}-byte template, not {size}", sb.size),
                });
            }
            Found::Old(v) => {
                return Err(Error::NotACache {
                    path: path.to_owned(),
                    reason: format!(
                        "a cache of the older format version {v}, without checksums (it is \
                         discarded when a proxy opens it)"
                    ),
                });
            }
            Found::Empty => {
                return Err(Error::NotACache {
                    path: path.to_owned(),
                    reason: format!("no superblock at offset {}", cache.geometry.meta),
                });
            }
        };
        let geometry = Geometry::new(size, sb.chunk_size);
        if length < geometry.total() {
            return Err(Error::TooSmall {
                path: path.to_owned(),
                need: geometry.total(),
                have: length,
            });
        }
        cache.identity = sb.identity.clone();
        cache.set_geometry(geometry);
        *cache.superblock.get_mut().expect("not shared yet") = sb;
        cache.load_map()?;
        Ok(cache)
    }

    fn new(
        path: &Path,
        file: File,
        block_device: bool,
        geometry: Geometry,
        superblock: Superblock,
    ) -> CacheFile {
        CacheFile {
            path: path.to_owned(),
            file: std::sync::Arc::new(file),
            block_device,
            geometry,
            bits: Vec::new(),
            verified: Vec::new(),
            sums: Vec::new(),
            zero_sum: zero_sum(geometry.chunk),
            present: AtomicU64::new(0),
            identity: superblock.identity.clone(),
            superblock: std::sync::Mutex::new(superblock),
            map_write: std::sync::Mutex::new(()),
        }
    }

    fn set_geometry(&mut self, geometry: Geometry) {
        self.geometry = geometry;
        self.zero_sum = zero_sum(geometry.chunk);
    }

    /// Reads the newest valid superblock. `Empty` when both slots are zero (a new
    /// device or an empty region); `Err(NotACache)` when they hold something else.
    fn read_superblock(&self, length: u64) -> Result<Found> {
        let g = self.geometry;
        if length < g.meta + 2 * SLOT {
            return Err(Error::NotACache {
                path: self.path.clone(),
                reason: format!(
                    "{length} bytes, too short to be a cache of a {}-byte template \
                     (perhaps a cache of another size of it)",
                    g.size
                ),
            });
        }
        self.read_superblock_at(g.meta)
    }

    /// [`Self::read_superblock`] of the slots at `meta`.
    fn read_superblock_at(&self, meta: u64) -> Result<Found> {
        let mut slots = vec![0u8; 2 * SLOT as usize];
        self.file
            .read_exact_at(&mut slots, meta)
            .map_err(|source| Error::Io {
                path: self.path.clone(),
                op: "read superblock",
                source,
            })?;
        if slots.iter().all(|&b| b == 0) {
            return Ok(Found::Empty);
        }
        let (a, b) = slots.split_at(SLOT as usize);
        match (Superblock::decode(a), Superblock::decode(b)) {
            (Ok(a), Ok(b)) => Ok(Found::Current(if a.generation >= b.generation {
                a
            } else {
                b
            })),
            (Ok(s), Err(_)) | (Err(_), Ok(s)) => Ok(Found::Current(s)),
            (Err(Invalid::Old(v)), _) | (_, Err(Invalid::Old(v))) => Ok(Found::Old(v)),
            (Err(Invalid::Other(a_why)), Err(Invalid::Other(b_why))) => {
                let why = if &slots[SLOT as usize..SLOT as usize + 8] == MAGIC {
                    b_why
                } else {
                    a_why
                };
                // A file sized for another template keeps its metadata elsewhere: treat
                // any non-cache bytes here as foreign data and refuse to overwrite them.
                Err(Error::NotACache {
                    path: self.path.clone(),
                    reason: format!("at offset {meta}: {why}"),
                })
            }
        }
    }

    /// Starts empty: a file is cut to zero and regrown sparse (old data gone); a device
    /// keeps its data, which no bit covers.
    fn reset(&mut self, length: u64) -> Result<()> {
        let g = self.geometry;
        let io = |op| {
            let path = self.path.clone();
            move |source| Error::Io { path, op, source }
        };
        if self.block_device {
            self.file
                .write_all_at(&vec![0u8; (2 * SLOT + g.map_bytes) as usize], g.meta)
                .map_err(io("clear metadata"))?;
        } else {
            if length > 0 {
                self.file.set_len(0).map_err(io("truncate"))?;
            }
            self.file.set_len(g.total()).map_err(io("extend"))?;
        }
        let words = g.chunks.div_ceil(64);
        self.bits = (0..words).map(|_| AtomicU64::new(0)).collect();
        self.verified = (0..words).map(|_| AtomicU64::new(0)).collect();
        self.sums = (0..g.chunks).map(|_| AtomicU32::new(0)).collect();
        self.present.store(0, Ordering::Relaxed);
        let sb = self.superblock.get_mut().expect("not shared yet");
        sb.flags = 0;
        sb.generation = 0;
        sb.chunk_size = g.chunk;
        self.file.sync_all().map_err(io("sync"))?;
        Ok(())
    }

    fn load_map(&mut self) -> Result<()> {
        let g = self.geometry;
        let io = |op| {
            let path = self.path.clone();
            move |source| Error::Io { path, op, source }
        };
        let mut map = vec![0u8; g.map_bytes as usize];
        self.file
            .read_exact_at(&mut map, g.map)
            .map_err(io("read presence map"))?;
        let words = g.chunks.div_ceil(64) as usize;
        let mut present = 0u64;
        let mut bits = Vec::with_capacity(words);
        for i in 0..words {
            let mut w = [0u8; 8];
            let start = i * 8;
            let end = (start + 8).min(map.len());
            w[..end - start].copy_from_slice(&map[start..end]);
            let mut word = u64::from_le_bytes(w);
            if i == words - 1 && !g.chunks.is_multiple_of(64) {
                // Bits past the last chunk mean nothing; ignore them.
                word &= (1u64 << (g.chunks % 64)) - 1;
            }
            present += u64::from(word.count_ones());
            bits.push(AtomicU64::new(word));
        }
        let mut table = vec![0u8; (g.chunks * 4) as usize];
        self.file
            .read_exact_at(&mut table, g.sums)
            .map_err(io("read checksums"))?;
        self.sums = table
            .chunks_exact(4)
            .map(|b| AtomicU32::new(u32::from_le_bytes(b.try_into().expect("4 bytes"))))
            .collect();
        self.bits = bits;
        self.verified = (0..words).map(|_| AtomicU64::new(0)).collect();
        self.present.store(present, Ordering::Relaxed);
        Ok(())
    }

    /// Writes the superblock (after `change`) to the older slot, then syncs.
    fn write_superblock(&self, change: impl FnOnce(&mut Superblock)) -> Result<()> {
        let mut sb = self.superblock.lock().expect("superblock lock");
        change(&mut sb);
        sb.generation += 1;
        let slot = sb.generation % 2;
        let bytes = sb.encode();
        let io = |op| {
            let path = self.path.clone();
            move |source| Error::Io { path, op, source }
        };
        self.file
            .write_all_at(&bytes, self.geometry.meta + slot * SLOT)
            .map_err(io("write superblock"))?;
        self.file.sync_data().map_err(io("sync superblock"))
    }

    /// The path of the cache.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file or device.
    pub fn file(&self) -> &std::sync::Arc<File> {
        &self.file
    }

    /// True when the cache is a block device.
    pub fn is_block_device(&self) -> bool {
        self.block_device
    }

    /// The template's identity this cache holds.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Template size.
    pub fn size(&self) -> u64 {
        self.geometry.size
    }

    /// Presence granularity.
    pub fn chunk_size(&self) -> u64 {
        self.geometry.chunk
    }

    /// Number of chunks in the template.
    pub fn chunks(&self) -> u64 {
        self.geometry.chunks
    }

    /// Number of chunks present.
    pub fn present_chunks(&self) -> u64 {
        self.present.load(Ordering::Relaxed)
    }

    /// True when the completion flag is recorded.
    pub fn is_complete(&self) -> bool {
        self.superblock.lock().expect("superblock lock").flags & FLAG_COMPLETE != 0
    }

    /// True if chunk `i` is present (durable).
    pub fn is_present(&self, i: u64) -> bool {
        self.bits[(i / 64) as usize].load(Ordering::Acquire) & (1 << (i % 64)) != 0
    }

    /// True if every chunk in `[first, end)` is present.
    pub fn all_present(&self, first: u64, end: u64) -> bool {
        (first..end).all(|i| self.is_present(i))
    }

    /// True if chunk `i` is present and known good in this process.
    pub fn is_verified(&self, i: u64) -> bool {
        self.verified[(i / 64) as usize].load(Ordering::Acquire) & (1 << (i % 64)) != 0
    }

    /// True if every chunk in `[first, end)` is present and known good: the hit path,
    /// one atomic load per chunk.
    pub fn all_verified(&self, first: u64, end: u64) -> bool {
        (first..end).all(|i| self.is_verified(i))
    }

    /// Checks `data`, the bytes of present chunk `i` read from disk, against its
    /// checksum; marks the chunk verified if it matches.
    pub(crate) fn check_chunk(&self, i: u64, data: &[u8]) -> bool {
        let good = crc32c::crc32c(data) == self.sums[i as usize].load(Ordering::Relaxed);
        if good {
            self.verified[(i / 64) as usize].fetch_or(1 << (i % 64), Ordering::Release);
        }
        good
    }

    /// True if a chunk of `[first, end)` is present but not verified yet.
    pub fn needs_verify(&self, first: u64, end: u64) -> bool {
        (first..end).any(|i| self.is_present(i) && !self.is_verified(i))
    }

    /// Sets the bits of `[first, end)` in memory; returns the map pages to persist.
    /// Call only after the chunks' data and checksums are durable. The chunks count as
    /// verified: their checksums were computed from the bytes this process wrote.
    pub(crate) fn set_present(&self, first: u64, end: u64, pages: &mut Vec<u64>) {
        for i in first..end {
            let (w, bit) = ((i / 64) as usize, 1 << (i % 64));
            let old = self.bits[w].fetch_or(bit, Ordering::Release);
            self.verified[w].fetch_or(bit, Ordering::Release);
            if old & bit == 0 {
                self.present.fetch_add(1, Ordering::Relaxed);
            }
        }
        let first_page = first / 8 / MAP_PAGE;
        let last_page = (end - 1) / 8 / MAP_PAGE;
        for p in first_page..=last_page {
            if pages.last() != Some(&p) {
                pages.push(p);
            }
        }
    }

    /// Writes map pages from memory (no sync: a lost mark only costs a re-fetch).
    pub(crate) fn persist_pages(&self, pages: &[u64]) -> io::Result<()> {
        let _order = self.map_write.lock().expect("map write lock");
        for &p in pages {
            let mut buf = vec![0u8; MAP_PAGE as usize];
            let first_word = (p * MAP_PAGE / 8) as usize;
            for (k, out) in buf.chunks_exact_mut(8).enumerate() {
                if let Some(w) = self.bits.get(first_word + k) {
                    out.copy_from_slice(&w.load(Ordering::Acquire).to_le_bytes());
                }
            }
            self.file
                .write_all_at(&buf, self.geometry.map + p * MAP_PAGE)?;
        }
        Ok(())
    }

    /// Records that every chunk is present (durably), if they still all are (a bad
    /// chunk may have been forgotten meanwhile: see [`Self::clear_chunks`]).
    pub fn mark_complete(&self) -> Result<()> {
        self.file.sync_data().map_err(|source| Error::Io {
            path: self.path.clone(),
            op: "sync presence map",
            source,
        })?;
        self.write_superblock(|sb| {
            if self.present_chunks() == self.chunks() {
                sb.flags |= FLAG_COMPLETE;
            }
        })
    }

    /// Writes template bytes at their offset.
    pub(crate) fn write_data(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.file.write_all_at(data, offset)
    }

    /// The checksum of chunk `i` read as zeroes.
    pub(crate) fn zero_sum_of(&self, i: u64) -> u32 {
        match self.geometry.chunk_span(i) {
            (_, len) if len == self.geometry.chunk => self.zero_sum,
            (_, len) => zero_sum(len),
        }
    }

    /// Records the checksums of absent chunks `(chunk, crc)` (sorted) in memory and in
    /// the table (no sync: the batch's sync makes them durable before any bit).
    pub(crate) fn write_sums(&self, sums: &[(u64, u32)]) -> io::Result<()> {
        let mut run: Vec<u8> = Vec::new();
        let mut run_first = 0;
        let flush = |first: u64, run: &mut Vec<u8>| {
            if run.is_empty() {
                return Ok(());
            }
            let r = self.file.write_all_at(run, self.geometry.sums + first * 4);
            run.clear();
            r
        };
        for (k, &(i, crc)) in sums.iter().enumerate() {
            self.sums[i as usize].store(crc, Ordering::Relaxed);
            if k > 0 && sums[k - 1].0 + 1 != i {
                flush(run_first, &mut run)?;
            }
            if run.is_empty() {
                run_first = i;
            }
            run.extend_from_slice(&crc.to_le_bytes());
        }
        flush(run_first, &mut run)
    }

    /// Checks the present chunks of `[first, end)` not yet verified in this process
    /// against their checksums, reading them from disk; marks the good ones verified
    /// and returns the bad ones (`(chunk, offset)`), which stay marked: see
    /// [`Self::clear_chunks`].
    pub fn verify(&self, first: u64, end: u64) -> io::Result<Vec<(u64, u64)>> {
        self.check(first, end, false)
    }

    /// Checks every present chunk against its checksum (a full read of the cached
    /// data), before handing the cache to another user (such as dm-thin as an external
    /// origin) or on an operator's request. Bad chunks stay marked: see
    /// [`Self::clear_chunks`].
    pub fn scrub(&self) -> Result<ScrubReport> {
        let bad = self
            .check(0, self.geometry.chunks, true)
            .map_err(|source| Error::Io {
                path: self.path.clone(),
                op: "scrub",
                source,
            })?;
        Ok(ScrubReport {
            chunks: self.geometry.chunks,
            present: self.present_chunks(),
            bad,
        })
    }

    fn check(&self, first: u64, end: u64, all: bool) -> io::Result<Vec<(u64, u64)>> {
        // Most bytes read at once.
        const READ: u64 = 8 << 20;
        let g = self.geometry;
        let mut bad = Vec::new();
        let mut buf = Vec::new();
        let mut i = first;
        while i < end {
            let todo = |i: u64| self.is_present(i) && (all || !self.is_verified(i));
            if !todo(i) {
                i += 1;
                continue;
            }
            let mut j = i + 1;
            while j < end && todo(j) && (j - i + 1) * g.chunk <= READ {
                j += 1;
            }
            let off = i * g.chunk;
            let len = (j * g.chunk).min(g.size) - off;
            buf.resize(len as usize, 0);
            self.file.read_exact_at(&mut buf, off)?;
            for (k, data) in buf.chunks(g.chunk as usize).enumerate() {
                let c = i + k as u64;
                if crc32c::crc32c(data) == self.sums[c as usize].load(Ordering::Relaxed) {
                    self.verified[(c / 64) as usize].fetch_or(1 << (c % 64), Ordering::Release);
                } else {
                    bad.push((c, c * g.chunk));
                }
            }
            i = j;
        }
        Ok(bad)
    }

    /// Forgets `chunks` (found bad): clears their bits in memory and on disk (synced),
    /// and the completion flag, so they are fetched again.
    pub fn clear_chunks(&self, chunks: &[u64]) -> Result<()> {
        if chunks.is_empty() {
            return Ok(());
        }
        let mut pages = Vec::new();
        for &i in chunks {
            let (w, bit) = ((i / 64) as usize, 1u64 << (i % 64));
            self.verified[w].fetch_and(!bit, Ordering::AcqRel);
            if self.bits[w].fetch_and(!bit, Ordering::AcqRel) & bit != 0 {
                self.present.fetch_sub(1, Ordering::Relaxed);
            }
            pages.push(i / 8 / MAP_PAGE);
        }
        pages.sort_unstable();
        pages.dedup();
        let io = |op| {
            let path = self.path.clone();
            move |source| Error::Io { path, op, source }
        };
        self.persist_pages(&pages)
            .map_err(io("write presence map"))?;
        self.file.sync_data().map_err(io("sync presence map"))?;
        // `present` dropped above, so a `mark_complete` from now on leaves the flag
        // alone; one that ran before set it, and it is cleared here.
        if self.is_complete() {
            self.write_superblock(|sb| sb.flags &= !FLAG_COMPLETE)?;
        }
        Ok(())
    }

    /// Makes `[offset, offset + length)` read as zeroes.
    pub(crate) fn write_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        use rustix::fs::FallocateFlags;
        match rustix::fs::fallocate(
            &*self.file,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            length,
        ) {
            Ok(()) => Ok(()),
            Err(rustix::io::Errno::OPNOTSUPP) => {
                let zeroes = vec![0u8; length.min(1 << 20) as usize];
                let mut done = 0;
                while done < length {
                    let n = (length - done).min(zeroes.len() as u64);
                    self.file
                        .write_all_at(&zeroes[..n as usize], offset + done)?;
                    done += n;
                }
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Makes written data (and hole punches) durable.
    pub(crate) fn sync(&self) -> io::Result<()> {
        self.file.sync_all()
    }
}

/// The first line of an identity, for messages.
fn one_line(identity: &str) -> String {
    let mut lines = identity.lines();
    let first = lines.next().unwrap_or("").to_owned();
    match lines.next() {
        Some(second) => format!(
            "{first}; {second}{}",
            if lines.next().is_some() { "; …" } else { "" }
        ),
        None => first,
    }
}

#[cfg(test)]
mod tests;
