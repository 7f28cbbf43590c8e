//! The qcow2 header and what it points to that is small enough to load at open: header
//! extensions, the snapshot table and the bitmap directory. Everything is validated here
//! so that mapping only has to check per-entry offsets.

use crate::storage::{Storage, read_exact, read_vec};
use crate::{Error, Result};

pub(super) const FORMAT: &str = "qcow2";

const MAGIC: [u8; 4] = *b"QFI\xfb";
const V2_HEADER_LENGTH: u32 = 72;
const V3_MIN_HEADER_LENGTH: u32 = 104;
/// Smallest cluster (512 B), by the spec.
const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster qemu opens (2 MiB).
const MAX_CLUSTER_BITS: u32 = 21;
/// Extended L2 entries need clusters of at least 16 KiB.
const MIN_EXTENDED_L2_CLUSTER_BITS: u32 = 14;
/// qemu's limit on the active L1 table (and any snapshot's): 32 MiB.
pub(super) const MAX_L1_BYTES: u64 = 32 << 20;
/// qemu's limit on the refcount table: 8 MiB.
pub(super) const MAX_REFCOUNT_TABLE_BYTES: u64 = 8 << 20;
/// qemu's limit on the number of internal snapshots.
const MAX_SNAPSHOTS: u32 = 65536;
/// qemu's limit on the extra data of one snapshot entry.
const MAX_SNAPSHOT_EXTRA: u32 = 1024;
/// qemu's limit on the whole snapshot table (1 KiB per snapshot).
const MAX_SNAPSHOT_TABLE_BYTES: u64 = 64 << 20;
/// The spec's limit on the backing file name.
const MAX_BACKING_NAME: u32 = 1023;
/// qemu's limit on the number of bitmaps.
const MAX_BITMAPS: u32 = 65535;
/// qemu's limit on the bitmap directory (1 KiB per bitmap).
const MAX_BITMAP_DIRECTORY_BYTES: u64 = 64 << 20;

pub(super) const INCOMPAT_DIRTY: u64 = 1 << 0;
pub(super) const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub(super) const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub(super) const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub(super) const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 = 0x1f;
pub(super) const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
pub(super) const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
pub(super) const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
const EXT_BITMAPS: u32 = 0x2385_2875;
const EXT_CRYPTO: u32 = 0x0537_be77;
const EXT_DATA_FILE: u32 = 0x4441_5441;

/// The fixed header fields (v2 images read zeroes for the v3 ones).
#[derive(Debug, Clone, Copy)]
pub(super) struct RawHeader {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible: u64,
    pub compatible: u64,
    pub autoclear: u64,
    pub refcount_order: u32,
    pub header_length: u32,
}

fn be16(b: &[u8], at: usize) -> u16 {
    let mut v = [0; 2];
    if let Some(s) = b.get(at..at + 2) {
        v.copy_from_slice(s);
    }
    u16::from_be_bytes(v)
}

pub(super) fn be32(b: &[u8], at: usize) -> u32 {
    let mut v = [0; 4];
    if let Some(s) = b.get(at..at + 4) {
        v.copy_from_slice(s);
    }
    u32::from_be_bytes(v)
}

/// The big-endian u64 at `at`, or 0 if `b` is too short (callers size-check first).
pub(super) fn be64(b: &[u8], at: usize) -> u64 {
    let mut v = [0; 8];
    if let Some(s) = b.get(at..at + 8) {
        v.copy_from_slice(s);
    }
    u64::from_be_bytes(v)
}

impl RawHeader {
    fn parse(b: &[u8; 104]) -> RawHeader {
        let version = be32(b, 4);
        let v3 = version >= 3;
        RawHeader {
            version,
            backing_file_offset: be64(b, 8),
            backing_file_size: be32(b, 16),
            cluster_bits: be32(b, 20),
            size: be64(b, 24),
            crypt_method: be32(b, 32),
            l1_size: be32(b, 36),
            l1_table_offset: be64(b, 40),
            refcount_table_offset: be64(b, 48),
            refcount_table_clusters: be32(b, 56),
            nb_snapshots: be32(b, 60),
            snapshots_offset: be64(b, 64),
            incompatible: if v3 { be64(b, 72) } else { 0 },
            compatible: if v3 { be64(b, 80) } else { 0 },
            autoclear: if v3 { be64(b, 88) } else { 0 },
            refcount_order: if v3 { be32(b, 96) } else { 4 },
            header_length: if v3 { be32(b, 100) } else { V2_HEADER_LENGTH },
        }
    }
}

/// One internal snapshot.
#[derive(Debug, Clone)]
pub(super) struct Snapshot {
    pub l1_offset: u64,
    pub l1_size: u32,
    pub id: String,
    pub name: String,
}

/// One persistent dirty bitmap.
#[derive(Debug, Clone)]
pub(super) struct Bitmap {
    pub table_offset: u64,
    pub table_size: u32,
    pub name: String,
}

/// Where the bitmap directory is.
#[derive(Debug, Clone, Copy)]
pub(super) struct BitmapDirectory {
    pub offset: u64,
    pub size: u64,
}

/// A validated header with its extensions.
#[derive(Debug, Clone)]
pub(super) struct Header {
    pub raw: RawHeader,
    pub cluster_size: u64,
    /// 1 for zstd, 0 for deflate.
    pub compression_type: u8,
    pub backing_name: Option<String>,
    pub backing_format: Option<String>,
    pub data_file: Option<String>,
    pub bitmap_directory: Option<BitmapDirectory>,
    pub bitmaps: Vec<Bitmap>,
    pub snapshots: Vec<Snapshot>,
    /// Bytes of the snapshot table.
    pub snapshot_table_len: u64,
    /// Header extensions found, by name, in file order.
    pub extensions: Vec<String>,
}

fn invalid(s: &dyn Storage, reason: impl Into<String>) -> Error {
    Error::invalid(s.name(), FORMAT, reason)
}

fn unsupported(s: &dyn Storage, reason: impl Into<String>) -> Error {
    Error::unsupported(s.name(), FORMAT, reason)
}

/// Fails unless `[offset, offset + length)` lies inside the file.
pub(super) fn inside_file(s: &dyn Storage, what: &str, offset: u64, length: u64) -> Result<()> {
    if offset.checked_add(length).is_none_or(|end| end > s.size()) {
        return Err(invalid(
            s,
            format!(
                "{what} at offset {offset} ({length} bytes) lies beyond the end of the file ({} bytes)",
                s.size()
            ),
        ));
    }
    Ok(())
}

fn aligned(s: &dyn Storage, what: &str, offset: u64, cluster_size: u64) -> Result<()> {
    if offset & (cluster_size - 1) != 0 {
        return Err(invalid(
            s,
            format!("{what} offset {offset:#x} is not aligned to the cluster size {cluster_size}"),
        ));
    }
    Ok(())
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn feature_name(table: &[(u8, u8, String)], kind: u8, bit: u32) -> String {
    table
        .iter()
        .find(|(k, b, _)| *k == kind && u32::from(*b) == bit)
        .map(|(_, _, name)| format!("{name:?} (bit {bit})"))
        .unwrap_or_else(|| format!("bit {bit}"))
}

impl Header {
    /// Reads and validates the header of `s`.
    pub fn read(s: &dyn Storage) -> Result<Header> {
        let mut fixed = [0u8; 104];
        let n = s.size().min(104) as usize;
        if n < V2_HEADER_LENGTH as usize {
            return Err(invalid(
                s,
                format!(
                    "the file ({} bytes) is shorter than a qcow2 header (72 bytes)",
                    s.size()
                ),
            ));
        }
        read_exact(s, "qcow2 header", &mut fixed[..n], 0)?;
        if fixed[..4] != MAGIC {
            return Err(invalid(s, "no qcow2 magic (QFI\\xfb) at offset 0"));
        }
        let version = be32(&fixed, 4);
        match version {
            1 => {
                return Err(unsupported(
                    s,
                    "qcow (version 1) images are not supported; convert with `qemu-img convert -O qcow2`",
                ));
            }
            2 | 3 => {}
            v => {
                return Err(unsupported(
                    s,
                    format!("qcow2 version {v} is not supported (only 2 and 3)"),
                ));
            }
        }
        if version == 3 && n < V3_MIN_HEADER_LENGTH as usize {
            return Err(invalid(
                s,
                format!(
                    "the file ({} bytes) is shorter than a v3 header (104 bytes)",
                    s.size()
                ),
            ));
        }
        let raw = RawHeader::parse(&fixed);
        if raw.cluster_bits < MIN_CLUSTER_BITS {
            return Err(invalid(
                s,
                format!(
                    "cluster_bits {} is below the minimum of {MIN_CLUSTER_BITS}",
                    raw.cluster_bits
                ),
            ));
        }
        if raw.cluster_bits > MAX_CLUSTER_BITS {
            return Err(unsupported(
                s,
                format!(
                    "cluster_bits {} (clusters over 2 MiB) is not supported; qemu refuses it too",
                    raw.cluster_bits
                ),
            ));
        }
        let cluster_size = 1u64 << raw.cluster_bits;
        match raw.crypt_method {
            0 => {}
            1 => {
                return Err(unsupported(
                    s,
                    "the image is AES-encrypted (crypt_method 1); Thinline never serves ciphertext",
                ));
            }
            2 => {
                return Err(unsupported(
                    s,
                    "the image is LUKS-encrypted (crypt_method 2); Thinline never serves ciphertext",
                ));
            }
            m => {
                return Err(unsupported(
                    s,
                    format!(
                        "the image is encrypted (unknown crypt_method {m}); Thinline never serves ciphertext"
                    ),
                ));
            }
        }
        if version == 3 {
            let hl = raw.header_length;
            if hl < V3_MIN_HEADER_LENGTH || !hl.is_multiple_of(8) || u64::from(hl) > cluster_size {
                return Err(invalid(
                    s,
                    format!(
                        "header_length {hl} must be a multiple of 8 between 104 and the cluster size {cluster_size}"
                    ),
                ));
            }
            if raw.refcount_order > 6 {
                return Err(invalid(
                    s,
                    format!(
                        "refcount_order {} exceeds 6 (64-bit refcounts)",
                        raw.refcount_order
                    ),
                ));
            }
        }

        // The first cluster holds the header, the extensions and the backing name.
        let first_len = cluster_size.min(s.size());
        let first = read_vec(s, "qcow2 header cluster", 0, first_len)?;
        let compression_type = if raw.header_length > 104 {
            first.get(104).copied().unwrap_or(0)
        } else {
            0
        };

        let ext_end = if raw.backing_file_offset != 0 {
            raw.backing_file_offset.min(first_len)
        } else {
            first_len
        };
        let mut pos = u64::from(raw.header_length);
        let mut feature_table: Vec<(u8, u8, String)> = Vec::new();
        let mut backing_format = None;
        let mut data_file = None;
        let mut bitmaps_ext = None;
        let mut extensions = Vec::new();
        while pos + 8 <= ext_end {
            let p = pos as usize;
            let kind = be32(&first, p);
            let len = u64::from(be32(&first, p + 4));
            if kind == EXT_END {
                break;
            }
            let data_start = pos + 8;
            let data_end = data_start + len;
            if data_end > ext_end {
                return Err(invalid(
                    s,
                    format!(
                        "header extension {kind:#010x} at offset {pos} ({len} bytes) runs past the end of the header area ({ext_end} bytes)"
                    ),
                ));
            }
            let data = &first[data_start as usize..data_end as usize];
            match kind {
                EXT_BACKING_FORMAT => {
                    extensions.push("backing_format".to_owned());
                    backing_format = Some(text(data));
                }
                EXT_FEATURE_TABLE => {
                    extensions.push("feature_table".to_owned());
                    for e in data.chunks_exact(48) {
                        let name_bytes = &e[2..];
                        let end = name_bytes
                            .iter()
                            .position(|&c| c == 0)
                            .unwrap_or(name_bytes.len());
                        feature_table.push((e[0], e[1], text(&name_bytes[..end])));
                    }
                }
                EXT_BITMAPS => {
                    extensions.push("bitmaps".to_owned());
                    if data.len() < 24 {
                        return Err(invalid(
                            s,
                            format!("the bitmaps extension is {} bytes, below 24", data.len()),
                        ));
                    }
                    bitmaps_ext = Some((be32(data, 0), be64(data, 8), be64(data, 16)));
                }
                EXT_CRYPTO => extensions.push("crypto_header".to_owned()),
                EXT_DATA_FILE => {
                    extensions.push("data_file".to_owned());
                    data_file = Some(text(data));
                }
                other => extensions.push(format!("unknown {other:#010x}")),
            }
            pos = data_end.next_multiple_of(8);
        }

        let unknown = raw.incompatible & !INCOMPAT_KNOWN;
        if unknown != 0 {
            let names: Vec<String> = (0..64)
                .filter(|b| unknown & (1u64 << b) != 0)
                .map(|b| feature_name(&feature_table, 0, b))
                .collect();
            return Err(unsupported(
                s,
                format!(
                    "unknown incompatible feature {} (incompatible_features {:#x})",
                    names.join(", "),
                    raw.incompatible
                ),
            ));
        }
        if raw.incompatible & INCOMPAT_COMPRESSION != 0 && compression_type == 0 {
            return Err(invalid(
                s,
                "the compression-type feature bit is set but compression_type is 0 or absent",
            ));
        }
        if raw.incompatible & INCOMPAT_COMPRESSION == 0 && compression_type != 0 {
            return Err(invalid(
                s,
                format!(
                    "compression_type {compression_type} without the compression-type feature bit"
                ),
            ));
        }
        if compression_type > 1 {
            return Err(unsupported(
                s,
                format!("compression_type {compression_type} is unknown (0 = deflate, 1 = zstd)"),
            ));
        }
        if raw.incompatible & INCOMPAT_EXTENDED_L2 != 0
            && raw.cluster_bits < MIN_EXTENDED_L2_CLUSTER_BITS
        {
            return Err(invalid(
                s,
                format!(
                    "extended L2 entries need clusters of at least 16 KiB (cluster_bits {})",
                    raw.cluster_bits
                ),
            ));
        }
        if version == 2 {
            let v3_only = [
                (data_file.is_some(), "an external data file extension"),
                (bitmaps_ext.is_some(), "a bitmaps extension"),
            ];
            if let Some((_, what)) = v3_only.iter().find(|(set, _)| *set) {
                return Err(unsupported(
                    s,
                    format!("a version 2 image with {what}, which only version 3 defines"),
                ));
            }
        }
        let has_data_file_bit = raw.incompatible & INCOMPAT_DATA_FILE != 0;
        match (&data_file, has_data_file_bit) {
            (None, true) => {
                return Err(unsupported(
                    s,
                    "the image uses an external data file but does not name it (no data file extension)",
                ));
            }
            (Some(name), false) => {
                return Err(invalid(
                    s,
                    format!("a data file name {name:?} without the external data file feature bit"),
                ));
            }
            (Some(name), true) if name.is_empty() => {
                return Err(invalid(s, "the external data file name is empty"));
            }
            _ => {}
        }
        if has_data_file_bit && raw.nb_snapshots != 0 {
            return Err(invalid(
                s,
                format!(
                    "{} internal snapshots in an image with an external data file",
                    raw.nb_snapshots
                ),
            ));
        }

        // Backing file name: inside the first cluster, at most 1023 bytes.
        let backing_name = if raw.backing_file_offset != 0 && raw.backing_file_size != 0 {
            let off = raw.backing_file_offset;
            let len = raw.backing_file_size;
            if len > MAX_BACKING_NAME {
                return Err(invalid(
                    s,
                    format!("backing_file_size {len} exceeds {MAX_BACKING_NAME} bytes"),
                ));
            }
            if off
                .checked_add(u64::from(len))
                .is_none_or(|end| end > cluster_size)
            {
                return Err(invalid(
                    s,
                    format!(
                        "the backing file name at offset {off} ({len} bytes) does not lie inside the first cluster ({cluster_size} bytes)"
                    ),
                ));
            }
            if off + u64::from(len) > first_len {
                return Err(invalid(
                    s,
                    format!(
                        "the backing file name at offset {off} lies beyond the end of the file ({} bytes)",
                        s.size()
                    ),
                ));
            }
            let bytes = &first[off as usize..(off + u64::from(len)) as usize];
            Some(
                String::from_utf8(bytes.to_vec())
                    .map_err(|_| invalid(s, "the backing file name is not valid UTF-8"))?,
            )
        } else {
            None
        };

        // Active L1 table: bounded, aligned, inside the file, large enough.
        let l1_bytes = u64::from(raw.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(unsupported(
                s,
                format!(
                    "l1_size {} exceeds qemu's limit of 32 MiB of L1 table",
                    raw.l1_size
                ),
            ));
        }
        let entry_bits = if raw.incompatible & INCOMPAT_EXTENDED_L2 != 0 {
            4
        } else {
            3
        };
        let l1_bits = raw.cluster_bits * 2 - entry_bits;
        let needed = raw.size.div_ceil(1u64 << l1_bits);
        if u64::from(raw.l1_size) < needed {
            return Err(invalid(
                s,
                format!(
                    "l1_size {} is too small for the virtual size {} ({needed} entries needed)",
                    raw.l1_size, raw.size
                ),
            ));
        }
        if raw.l1_size > 0 {
            aligned(s, "L1 table", raw.l1_table_offset, cluster_size)?;
            inside_file(s, "L1 table", raw.l1_table_offset, l1_bytes)?;
        }

        let refcount_table_bytes = u64::from(raw.refcount_table_clusters) << raw.cluster_bits;
        if refcount_table_bytes > MAX_REFCOUNT_TABLE_BYTES {
            return Err(unsupported(
                s,
                format!(
                    "refcount_table_clusters {} exceeds qemu's limit of 8 MiB of refcount table",
                    raw.refcount_table_clusters
                ),
            ));
        }
        aligned(s, "refcount table", raw.refcount_table_offset, cluster_size)?;

        let (snapshots, snapshot_table_len) = read_snapshots(s, &raw, cluster_size)?;
        let (bitmap_directory, bitmaps) = match bitmaps_ext {
            // Without the autoclear bit the extension is stale: qemu ignores it too.
            Some(ext) if raw.autoclear & AUTOCLEAR_BITMAPS != 0 => {
                read_bitmaps(s, ext, cluster_size)?
            }
            _ => (None, Vec::new()),
        };

        Ok(Header {
            raw,
            cluster_size,
            compression_type,
            backing_name,
            backing_format,
            data_file,
            bitmap_directory,
            bitmaps,
            snapshots,
            snapshot_table_len,
            extensions,
        })
    }
}

fn read_snapshots(
    s: &dyn Storage,
    raw: &RawHeader,
    cluster_size: u64,
) -> Result<(Vec<Snapshot>, u64)> {
    let count = raw.nb_snapshots;
    if count == 0 {
        return Ok((Vec::new(), 0));
    }
    if count > MAX_SNAPSHOTS {
        return Err(invalid(
            s,
            format!("nb_snapshots {count} exceeds {MAX_SNAPSHOTS}"),
        ));
    }
    aligned(s, "snapshot table", raw.snapshots_offset, cluster_size)?;
    let start = raw.snapshots_offset;
    let mut pos = start;
    let mut out = Vec::new();
    for i in 0..count {
        inside_file(s, "snapshot table entry", pos, 40)?;
        let mut fixed = [0u8; 40];
        read_exact(s, "snapshot table entry", &mut fixed, pos)?;
        let l1_offset = be64(&fixed, 0);
        let l1_size = be32(&fixed, 8);
        let id_len = u64::from(be16(&fixed, 12));
        let name_len = u64::from(be16(&fixed, 14));
        let extra = be32(&fixed, 36);
        if extra > MAX_SNAPSHOT_EXTRA {
            return Err(invalid(
                s,
                format!("snapshot {i} has {extra} bytes of extra data, over {MAX_SNAPSHOT_EXTRA}"),
            ));
        }
        let rest = u64::from(extra) + id_len + name_len;
        let var = read_vec(s, "snapshot table entry", pos + 40, rest)?;
        let id_start = extra as usize;
        let id = text(&var[id_start..id_start + id_len as usize]);
        let name = text(&var[id_start + id_len as usize..]);
        out.push(Snapshot {
            l1_offset,
            l1_size,
            id,
            name,
        });
        pos = (pos + 40 + rest).next_multiple_of(8);
        if pos - start > MAX_SNAPSHOT_TABLE_BYTES {
            return Err(invalid(s, "the snapshot table exceeds 64 MiB"));
        }
    }
    Ok((out, pos - start))
}

type BitmapsExt = (u32, u64, u64);

fn read_bitmaps(
    s: &dyn Storage,
    (count, dir_size, dir_offset): BitmapsExt,
    cluster_size: u64,
) -> Result<(Option<BitmapDirectory>, Vec<Bitmap>)> {
    if count == 0 || count > MAX_BITMAPS {
        return Err(invalid(
            s,
            format!("nb_bitmaps {count} must be 1 to {MAX_BITMAPS}"),
        ));
    }
    if dir_size > MAX_BITMAP_DIRECTORY_BYTES {
        return Err(invalid(
            s,
            format!("bitmap_directory_size {dir_size} exceeds {MAX_BITMAP_DIRECTORY_BYTES}"),
        ));
    }
    aligned(s, "bitmap directory", dir_offset, cluster_size)?;
    inside_file(s, "bitmap directory", dir_offset, dir_size)?;
    let dir = read_vec(s, "bitmap directory", dir_offset, dir_size)?;
    let mut pos = 0usize;
    let mut out = Vec::new();
    for i in 0..count {
        let fixed = dir.get(pos..pos + 24).ok_or_else(|| {
            invalid(
                s,
                format!("bitmap directory entry {i} runs past the directory ({dir_size} bytes)"),
            )
        })?;
        let table_offset = be64(fixed, 0);
        let table_size = be32(fixed, 8);
        let name_len = be16(fixed, 18) as usize;
        let extra = be32(fixed, 20) as usize;
        let name_start = pos + 24 + extra;
        let name = dir.get(name_start..name_start + name_len).ok_or_else(|| {
            invalid(
                s,
                format!("bitmap directory entry {i} runs past the directory ({dir_size} bytes)"),
            )
        })?;
        out.push(Bitmap {
            table_offset,
            table_size,
            name: text(name),
        });
        pos = (name_start + name_len).next_multiple_of(8);
    }
    Ok((
        Some(BitmapDirectory {
            offset: dir_offset,
            size: dir_size,
        }),
        out,
    ))
}
