//! The cache file or device: template bytes at their own offsets, then the metadata.
//!
//! ```text
//!   0                         data_end = size rounded up to 1 MiB
//!   ├── template bytes ───────┤ superblock A (4 KiB) │ superblock B (4 KiB) │ presence map …
//! ```
//!
//! Keeping the data at its own offsets means a complete cache *is* the template's raw
//! disk (the agent can point dm-thin's external origin at it); the metadata after it is
//! outside any read of the template.
//!
//! Crash safety rests on one rule, enforced by [`CacheFile`]'s callers: a chunk's bit is
//! written only after its data is durable (`write`, `fdatasync`, then the map page).
//! Bits only ever go from 0 to 1, so a torn map write leaves a mix of old and new bits,
//! each of which is safe. Superblock updates alternate between two slots with a
//! generation number and a CRC, so a torn superblock write leaves the other slot.
//!
//! A cache is keyed by the template's identity and refused (or discarded, by option)
//! when the identity differs. It has one owner, enforced with `flock`; the owner records
//! itself in the superblock so a refused second owner can be told who holds it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

/// Size of one superblock slot.
const SLOT: u64 = 4096;
/// Data is followed by metadata at the next multiple of this.
const DATA_ALIGN: u64 = 1 << 20;
/// Presence-map pages are written in units of this.
pub(crate) const MAP_PAGE: u64 = 4096;
const MAGIC: &[u8; 8] = b"THLCOR\0\x01";
const VERSION: u32 = 1;
const IDENTITY_MAX: usize = 3072;
const HOLDER_MAX: usize = 896;
const IDENTITY_AT: usize = 64;
const HOLDER_AT: usize = IDENTITY_AT + IDENTITY_MAX;
const CRC_AT: usize = SLOT as usize - 4;
/// Superblock flag: every chunk is present.
const FLAG_COMPLETE: u32 = 1;

/// Default chunk size: the unit of presence.
pub const DEFAULT_CHUNK_SIZE: u64 = 64 * 1024;

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
}

/// One decoded superblock slot.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Superblock {
    generation: u64,
    size: u64,
    chunk_size: u64,
    flags: u32,
    identity: String,
    holder: String,
}

impl Superblock {
    fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; SLOT as usize];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..20].copy_from_slice(&self.generation.to_le_bytes());
        b[20..28].copy_from_slice(&self.size.to_le_bytes());
        b[28..36].copy_from_slice(&self.chunk_size.to_le_bytes());
        b[36..40].copy_from_slice(&self.flags.to_le_bytes());
        let identity = truncate(&self.identity, IDENTITY_MAX);
        let holder = truncate(&self.holder, HOLDER_MAX);
        b[40..42].copy_from_slice(&(identity.len() as u16).to_le_bytes());
        b[42..44].copy_from_slice(&(holder.len() as u16).to_le_bytes());
        b[IDENTITY_AT..IDENTITY_AT + identity.len()].copy_from_slice(identity.as_bytes());
        b[HOLDER_AT..HOLDER_AT + holder.len()].copy_from_slice(holder.as_bytes());
        let crc = crc32fast::hash(&b[..CRC_AT]);
        b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes a slot; `Err` says why it is not a valid superblock.
    fn decode(b: &[u8]) -> std::result::Result<Superblock, String> {
        if b.len() != SLOT as usize {
            return Err("short superblock".into());
        }
        if &b[0..8] != MAGIC {
            return Err("no cache magic".into());
        }
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let u16_at = |i: usize| usize::from(u16::from_le_bytes([b[i], b[i + 1]]));
        if u32_at(CRC_AT) != crc32fast::hash(&b[..CRC_AT]) {
            return Err("superblock checksum mismatch".into());
        }
        if u32_at(8) != VERSION {
            return Err(format!("cache format version {} is unknown", u32_at(8)));
        }
        let (identity_len, holder_len) = (u16_at(40), u16_at(42));
        if identity_len > IDENTITY_MAX || holder_len > HOLDER_MAX {
            return Err("superblock string lengths out of range".into());
        }
        let chunk_size = u64_at(28);
        if !valid_chunk_size(chunk_size) {
            return Err(format!("chunk size {chunk_size} out of range"));
        }
        Ok(Superblock {
            generation: u64_at(12),
            size: u64_at(20),
            chunk_size,
            flags: u32_at(36),
            identity: String::from_utf8_lossy(&b[IDENTITY_AT..IDENTITY_AT + identity_len])
                .into_owned(),
            holder: String::from_utf8_lossy(&b[HOLDER_AT..HOLDER_AT + holder_len]).into_owned(),
        })
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// True for a chunk size this format accepts.
pub fn valid_chunk_size(chunk: u64) -> bool {
    chunk.is_power_of_two() && (4096..=16 << 20).contains(&chunk)
}

/// Where things are in a cache of a template of `size` bytes with `chunk` chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub(crate) size: u64,
    pub(crate) chunk: u64,
    pub(crate) chunks: u64,
    pub(crate) meta: u64,
    pub(crate) map: u64,
    pub(crate) map_bytes: u64,
}

impl Geometry {
    pub(crate) fn new(size: u64, chunk: u64) -> Geometry {
        let chunks = size.div_ceil(chunk);
        let meta = size.div_ceil(DATA_ALIGN) * DATA_ALIGN;
        let map_bytes = chunks.div_ceil(8).div_ceil(MAP_PAGE).max(1) * MAP_PAGE;
        Geometry {
            size,
            chunk,
            chunks,
            meta,
            map: meta + 2 * SLOT,
            map_bytes,
        }
    }

    /// Bytes the cache file or device must have.
    pub(crate) fn total(&self) -> u64 {
        self.map + self.map_bytes
    }
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
    present: AtomicU64,
    superblock: std::sync::Mutex<Superblock>,
    identity: String,
}

impl CacheFile {
    /// Opens (or creates) the cache at `path` for the template described by `options`.
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
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(io("open"))?;
        let meta = file.metadata().map_err(io("stat"))?;
        let block_device = meta.file_type().is_block_device();
        if !block_device && !meta.file_type().is_file() {
            return Err(Error::NotACache {
                path: path.to_owned(),
                reason: "neither a regular file nor a block device".into(),
            });
        }
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                let holder = read_holder(&file, options.size)
                    .unwrap_or_else(|| "another process (it recorded no name)".to_owned());
                return Err(Error::Locked {
                    path: path.to_owned(),
                    holder,
                });
            }
            Err(e) => return Err(io("lock")(e.into())),
        }
        let length = if block_device {
            device_size(&file).map_err(io("size"))?
        } else {
            meta.len()
        };

        let mut cache = CacheFile {
            path: path.to_owned(),
            file: std::sync::Arc::new(file),
            block_device,
            geometry: Geometry::new(options.size, options.chunk_size),
            bits: Vec::new(),
            present: AtomicU64::new(0),
            superblock: std::sync::Mutex::new(Superblock {
                generation: 0,
                size: options.size,
                chunk_size: options.chunk_size,
                flags: 0,
                identity: options.identity.clone(),
                holder: options.holder.clone(),
            }),
            identity: options.identity.clone(),
        };
        let needed = cache.geometry.total();
        if block_device && length < needed {
            return Err(Error::TooSmall {
                path: path.to_owned(),
                need: needed,
                have: length,
            });
        }
        let found = if length == 0 {
            None
        } else {
            match cache.read_superblock(length) {
                Ok(found) => found,
                Err(Error::NotACache { .. }) if options.on_mismatch == OnMismatch::Discard => {
                    tracing::warn!(cache = %path.display(), "overwriting data that is not a cache of this template");
                    Some(Superblock {
                        identity: "(not a cache of this template)".into(),
                        ..cache.superblock.get_mut().expect("not shared yet").clone()
                    })
                }
                Err(e) => return Err(e),
            }
        };
        let fresh = match found {
            Some(sb)
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
                cache.geometry = Geometry::new(options.size, sb.chunk_size);
                *cache.superblock.get_mut().expect("not shared yet") = Superblock {
                    holder: options.holder.clone(),
                    ..sb
                };
                false
            }
            Some(sb) => {
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
            None => true,
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

    /// Reads the newest valid superblock. `Ok(None)` when both slots are zero (a new
    /// device or an empty region); `Err(NotACache)` when they hold something else.
    fn read_superblock(&self, length: u64) -> Result<Option<Superblock>> {
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
        let mut slots = vec![0u8; 2 * SLOT as usize];
        self.file
            .read_exact_at(&mut slots, g.meta)
            .map_err(|source| Error::Io {
                path: self.path.clone(),
                op: "read superblock",
                source,
            })?;
        if slots.iter().all(|&b| b == 0) {
            return Ok(None);
        }
        let (a, b) = slots.split_at(SLOT as usize);
        match (Superblock::decode(a), Superblock::decode(b)) {
            (Ok(a), Ok(b)) => Ok(Some(if a.generation >= b.generation { a } else { b })),
            (Ok(s), Err(_)) | (Err(_), Ok(s)) => Ok(Some(s)),
            (Err(why), Err(_)) => {
                // A file sized for another template keeps its metadata elsewhere: treat
                // any non-cache bytes here as foreign data and refuse to overwrite them.
                Err(Error::NotACache {
                    path: self.path.clone(),
                    reason: format!("at offset {}: {why}", g.meta),
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
        self.bits = (0..g.chunks.div_ceil(64))
            .map(|_| AtomicU64::new(0))
            .collect();
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
        let mut map = vec![0u8; g.map_bytes as usize];
        self.file
            .read_exact_at(&mut map, g.map)
            .map_err(|source| Error::Io {
                path: self.path.clone(),
                op: "read presence map",
                source,
            })?;
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
        self.bits = bits;
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

    /// Sets the bits of `[first, end)` in memory; returns the map pages to persist.
    /// Call only after the chunks' data is durable.
    pub(crate) fn set_present(&self, first: u64, end: u64, pages: &mut Vec<u64>) {
        for i in first..end {
            let word = &self.bits[(i / 64) as usize];
            let old = word.fetch_or(1 << (i % 64), Ordering::Release);
            if old & (1 << (i % 64)) == 0 {
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

    /// Records that every chunk is present (durably).
    pub fn mark_complete(&self) -> Result<()> {
        self.file.sync_data().map_err(|source| Error::Io {
            path: self.path.clone(),
            op: "sync presence map",
            source,
        })?;
        self.write_superblock(|sb| sb.flags |= FLAG_COMPLETE)
    }

    /// Writes template bytes at their offset.
    pub(crate) fn write_data(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.file.write_all_at(data, offset)
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

/// The holder recorded in the newest superblock, for a refused second owner.
fn read_holder(file: &File, size: u64) -> Option<String> {
    let meta = Geometry::new(size, DEFAULT_CHUNK_SIZE).meta;
    let mut slots = vec![0u8; 2 * SLOT as usize];
    file.read_exact_at(&mut slots, meta).ok()?;
    let (a, b) = slots.split_at(SLOT as usize);
    let best = match (Superblock::decode(a), Superblock::decode(b)) {
        (Ok(a), Ok(b)) => {
            if a.generation >= b.generation {
                a
            } else {
                b
            }
        }
        (Ok(s), Err(_)) | (Err(_), Ok(s)) => s,
        _ => return None,
    };
    (!best.holder.is_empty()).then_some(best.holder)
}

/// Size of a block device in bytes.
fn device_size(file: &File) -> io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = file;
    let size = f.seek(SeekFrom::End(0))?;
    f.seek(SeekFrom::Start(0))?;
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(size: u64, identity: &str) -> CacheOptions {
        CacheOptions {
            size,
            identity: identity.into(),
            chunk_size: DEFAULT_CHUNK_SIZE,
            on_mismatch: OnMismatch::Refuse,
            holder: "pid 1 (test)".into(),
        }
    }

    #[test]
    fn superblocks_round_trip_and_reject_damage() {
        let sb = Superblock {
            generation: 7,
            size: 123,
            chunk_size: 65536,
            flags: FLAG_COMPLETE,
            identity: "http://x/t.raw etag \"1\"".into(),
            holder: "pid 9".into(),
        };
        let mut bytes = sb.encode();
        assert_eq!(Superblock::decode(&bytes).unwrap(), sb);
        bytes[100] ^= 1;
        assert!(Superblock::decode(&bytes).unwrap_err().contains("checksum"));
    }

    #[test]
    fn marks_survive_reopen_and_other_identities_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c");
        let size = 10 << 20;
        {
            let c = CacheFile::open(&path, &options(size, "v1")).unwrap();
            assert_eq!(c.chunks(), 160);
            let mut pages = Vec::new();
            c.set_present(3, 70, &mut pages);
            c.persist_pages(&pages).unwrap();
            assert_eq!(c.present_chunks(), 67);
            // A second owner is refused and told who holds it.
            let e = CacheFile::open(&path, &options(size, "v1")).unwrap_err();
            assert!(e.to_string().contains("pid 1 (test)"), "{e}");
        }
        let c = CacheFile::open(&path, &options(size, "v1")).unwrap();
        assert_eq!(c.present_chunks(), 67);
        assert!(c.is_present(3) && c.is_present(69) && !c.is_present(2) && !c.is_present(70));
        drop(c);
        let e = CacheFile::open(&path, &options(size, "v2")).unwrap_err();
        assert!(matches!(e, Error::IdentityMismatch { .. }), "{e}");
        let c = CacheFile::open(
            &path,
            &CacheOptions {
                on_mismatch: OnMismatch::Discard,
                ..options(size, "v2")
            },
        )
        .unwrap();
        assert_eq!(c.present_chunks(), 0);
    }

    #[test]
    fn foreign_data_is_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c");
        std::fs::write(&path, vec![0xabu8; 3 << 20]).unwrap();
        let e = CacheFile::open(&path, &options(1 << 20, "v1")).unwrap_err();
        assert!(matches!(e, Error::NotACache { .. }), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), vec![0xabu8; 3 << 20]);
    }
}

/// The file name of a template's cache in a cache directory: a readable part of the
/// template's last path component plus a hash of its whole location (`shown`, without
/// credentials), so two templates never share a file.
pub fn cache_file_name(shown: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(shown.as_bytes());
    let hash: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    let base = shown
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or("")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect::<String>();
    let base = base.trim_start_matches('.');
    if base.is_empty() {
        format!("{hash}.cache")
    } else {
        format!("{base}-{hash}.cache")
    }
}

#[cfg(test)]
mod name_tests {
    #[test]
    fn cache_names_are_readable_distinct_and_safe() {
        let a = super::cache_file_name("https://h/t/debian-12.qcow2");
        let b = super::cache_file_name("https://other/t/debian-12.qcow2");
        assert!(
            a.starts_with("debian-12.qcow2-") && a.ends_with(".cache"),
            "{a}"
        );
        assert_ne!(a, b);
        assert!(!super::cache_file_name("s3://b/../..").contains('/'));
        assert!(super::cache_file_name("nbd+unix:///?socket=/x").ends_with(".cache"));
    }
}
