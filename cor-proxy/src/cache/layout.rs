//! The on-disk layout (see the module above for the picture): where each part of a
//! cache lies, the superblock slots' encoding, and what can be found from them alone
//! (the holder of a locked cache, the template size of a cache file). Kept apart from
//! [`CacheFile`](super::CacheFile) because it is pure arithmetic and encoding.

use super::*;

/// Where things are in a cache of a template of `size` bytes with `chunk` chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub(crate) size: u64,
    pub(crate) chunk: u64,
    pub(crate) chunks: u64,
    pub(crate) meta: u64,
    pub(crate) map: u64,
    pub(crate) map_bytes: u64,
    /// The checksum table: a CRC32C per chunk.
    pub(crate) sums: u64,
    pub(crate) sums_bytes: u64,
}

impl Geometry {
    pub(crate) fn new(size: u64, chunk: u64) -> Geometry {
        let chunks = size.div_ceil(chunk);
        let meta = size.div_ceil(DATA_ALIGN) * DATA_ALIGN;
        let map_bytes = chunks.div_ceil(8).div_ceil(MAP_PAGE).max(1) * MAP_PAGE;
        let sums_bytes = (chunks * 4).div_ceil(MAP_PAGE).max(1) * MAP_PAGE;
        let map = meta + 2 * SLOT;
        Geometry {
            size,
            chunk,
            chunks,
            meta,
            map,
            map_bytes,
            sums: map + map_bytes,
            sums_bytes,
        }
    }

    /// Bytes the cache file or device must have.
    pub(crate) fn total(&self) -> u64 {
        self.sums + self.sums_bytes
    }

    /// `(offset, length)` of chunk `i`.
    pub(super) fn chunk_span(&self, i: u64) -> (u64, u64) {
        let off = i * self.chunk;
        (off, self.chunk.min(self.size - off))
    }
}

/// Why a superblock slot is not one this version uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Invalid {
    /// A valid superblock of an older format version (a cache; its data cannot be
    /// verified).
    Old(u32),
    /// Anything else, with the reason.
    Other(String),
}

/// What the superblock slots of a cache hold.
#[derive(Debug)]
pub(super) enum Found {
    /// Both slots are zero.
    Empty,
    /// A cache of this format.
    Current(Superblock),
    /// A cache of an older format version.
    Old(u32),
}

/// One decoded superblock slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Superblock {
    pub(super) generation: u64,
    pub(super) size: u64,
    pub(super) chunk_size: u64,
    pub(super) flags: u32,
    pub(super) identity: String,
    pub(super) holder: String,
}

impl Superblock {
    pub(super) fn encode(&self) -> Vec<u8> {
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
    pub(super) fn decode(b: &[u8]) -> std::result::Result<Superblock, Invalid> {
        let other = |why: &str| Err(Invalid::Other(why.to_owned()));
        if b.len() != SLOT as usize {
            return other("short superblock");
        }
        if &b[0..8] != MAGIC {
            return other("no cache magic");
        }
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let u16_at = |i: usize| usize::from(u16::from_le_bytes([b[i], b[i + 1]]));
        if u32_at(CRC_AT) != crc32fast::hash(&b[..CRC_AT]) {
            return other("superblock checksum mismatch");
        }
        match u32_at(8) {
            VERSION => {}
            v @ 1..VERSION => return Err(Invalid::Old(v)),
            v => {
                return Err(Invalid::Other(format!(
                    "cache format version {v} is unknown"
                )));
            }
        }
        let (identity_len, holder_len) = (u16_at(40), u16_at(42));
        if identity_len > IDENTITY_MAX || holder_len > HOLDER_MAX {
            return other("superblock string lengths out of range");
        }
        let chunk_size = u64_at(28);
        if !valid_chunk_size(chunk_size) {
            return Err(Invalid::Other(format!(
                "chunk size {chunk_size} out of range"
            )));
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

/// `s` cut to at most `max` bytes, at a character boundary.
pub(super) fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The holder recorded in the newest superblock, for a refused second owner.
pub(super) fn read_holder(file: &File, size: u64) -> Option<String> {
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

/// The template size of the cache file `file` of `length` bytes: the superblock sits
/// at a 1 MiB boundary a little before the end (the map and checksums follow it), at
/// the one place where its own geometry ends exactly at `length`.
pub(super) fn locate_size(file: &File, path: &Path, length: u64) -> Result<u64> {
    const MIB: u64 = 1 << 20;
    let mut fits = Vec::new();
    let mut slots = vec![0u8; 2 * SLOT as usize];
    let mut k = length / MIB;
    // Metadata takes at most 16 KiB plus a bit and 4 bytes per 4 KiB chunk.
    while k > 0 && length - k * MIB <= 64 * 1024 + k * MIB / 1000 {
        let meta = k * MIB;
        k -= 1;
        if meta + 2 * SLOT > length || file.read_exact_at(&mut slots, meta).is_err() {
            continue;
        }
        let (a, b) = slots.split_at(SLOT as usize);
        for sb in [Superblock::decode(a), Superblock::decode(b)]
            .into_iter()
            .flatten()
        {
            let g = Geometry::new(sb.size, sb.chunk_size);
            if g.meta == meta && g.total() == length && !fits.contains(&sb.size) {
                fits.push(sb.size);
            }
        }
    }
    match fits[..] {
        [size] => Ok(size),
        [] => Err(Error::NotACache {
            path: path.to_owned(),
            reason: format!("no superblock of this format fits a {length}-byte file"),
        }),
        _ => Err(Error::Invalid(format!(
            "{}: superblocks of several template sizes ({fits:?}) fit the file; give the \
             template's size (--size)",
            path.display()
        ))),
    }
}
