//! Sparse extents: the hosted "KDMV" extent (monolithicSparse, twoGbMaxExtentSparse,
//! streamOptimized in qemu's and VMware's layouts) and the ESX "COWD" extent
//! (vmfsSparse). Both map a grain directory (GD) → grain tables (GT) → grains.
//!
//! The GD is read at open; grain tables, and for compressed extents the grain
//! markers of a table, go through the chain's [`MetadataCache`] so a cached lookup is
//! a hash probe and an array read.

use std::sync::Arc;

use crate::cache::MetadataCache;
use crate::layer::{
    CheckReport, Compression, Fetch, OpenContext, Segment, SegmentKind, push_segment,
};
use crate::storage::{Storage, read_exact, read_vec};
use crate::{Error, Result};

use super::descriptor::MAX_DESCRIPTOR_BYTES;

const SECTOR: u64 = 512;

/// Largest grain accepted: 16 MiB (qemu refuses 1 GiB; VMware writes 64 KiB). Bounds
/// the decompression buffer of a compressed grain.
pub const MAX_GRAIN_SECTORS: u64 = 32768;

/// Largest grain table of a hosted extent, in entries (qemu's limit).
pub const MAX_HOSTED_GTES: u32 = 512;

/// Entries of a COWD grain table (fixed by the format).
pub const COWD_GTES: u32 = 4096;

/// Largest grain directory loaded at open: 32 Mi entries (128 MiB, qemu's limit),
/// and it must lie inside the file besides.
pub const MAX_GD_ENTRIES: u64 = 32 << 20;

/// Largest extent (and disk) accepted: 64 TiB, above VMware's 62 TiB maximum.
pub const MAX_CAPACITY_SECTORS: u64 = (64u64 << 40) / SECTOR;

/// `gdOffset` of a streamOptimized header whose real header is the footer.
pub const GD_AT_END: u64 = u64::MAX;

/// Header flags.
pub const FLAG_NEWLINE_TEST: u32 = 1 << 0;
pub const FLAG_REDUNDANT_GD: u32 = 1 << 1;
pub const FLAG_ZERO_GRAIN: u32 = 1 << 2;
pub const FLAG_COMPRESSED: u32 = 1 << 16;
pub const FLAG_MARKERS: u32 = 1 << 17;

/// Stream marker types (`{value u64, size 0 u32, type u32}`).
pub const MARKER_EOS: u32 = 0;
pub const MARKER_GT: u32 = 1;
pub const MARKER_GD: u32 = 2;
pub const MARKER_FOOTER: u32 = 3;

/// A grain marker's header: `{lba u64, size u32}` before the zlib data.
pub const GRAIN_MARKER_BYTES: u64 = 12;

/// Bytes of one cached marker entry: lba u64 + size u32.
const MARKER_ENTRY: usize = 12;

fn le32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// The fields of a 512-byte KDMV header (little-endian).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostedHeader {
    pub version: u32,
    pub flags: u32,
    pub capacity: u64,
    pub grain_sectors: u64,
    pub descriptor_offset: u64,
    pub descriptor_size: u64,
    pub gtes_per_gt: u32,
    pub rgd_offset: u64,
    pub gd_offset: u64,
    pub overhead: u64,
    pub unclean_shutdown: bool,
    pub newline_bytes: [u8; 4],
    pub compress_algorithm: u16,
}

impl HostedHeader {
    /// Parses a header sector; `None` if the magic is not `KDMV`.
    pub fn parse(b: &[u8; 512]) -> Option<Self> {
        if &b[0..4] != b"KDMV" {
            return None;
        }
        Some(HostedHeader {
            version: le32(b, 4),
            flags: le32(b, 8),
            capacity: le64(b, 12),
            grain_sectors: le64(b, 20),
            descriptor_offset: le64(b, 28),
            descriptor_size: le64(b, 36),
            gtes_per_gt: le32(b, 44),
            rgd_offset: le64(b, 48),
            gd_offset: le64(b, 56),
            overhead: le64(b, 64),
            unclean_shutdown: b[72] != 0,
            newline_bytes: [b[73], b[74], b[75], b[76]],
            compress_algorithm: u16::from_le_bytes([b[77], b[78]]),
        })
    }
}

/// A parsed stream marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Marker {
    pub value: u64,
    pub size: u32,
    pub kind: u32,
}

impl Marker {
    pub fn parse(b: &[u8]) -> Marker {
        Marker {
            value: le64(b, 0),
            size: le32(b, 8),
            kind: le32(b, 12),
        }
    }
}

/// Which sparse format an extent is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SparseFormat {
    /// Hosted sparse (`KDMV`), header version 1–3.
    Hosted,
    /// ESX vmfsSparse redo log (`COWD`).
    Cowd,
}

/// An opened sparse extent.
#[derive(Debug)]
pub struct SparseExtent {
    pub storage: Arc<dyn Storage>,
    /// Index into the layer's files.
    pub file: usize,
    pub format: SparseFormat,
    /// The header used (the footer's for GD_AT_END streams); `None` for COWD.
    pub header: Option<HostedHeader>,
    /// Extent size in bytes.
    pub capacity: u64,
    /// Grain size in bytes (a power of two).
    pub grain: u64,
    grain_shift: u32,
    pub gtes_per_gt: u32,
    /// Host sector of each grain table (0: none).
    pub gd: Vec<u32>,
    pub gd_offset: u64,
    /// Redundant GD byte offset, when the header declares one.
    pub rgd_offset: Option<u64>,
    pub compressed: bool,
    pub markers: bool,
    pub zero_grain: bool,
    /// VMware's stream layout: header copy in a footer, GD/GT after the grains.
    pub gd_at_end: bool,
    cache: Arc<MetadataCache>,
    gt_owner: u64,
    marker_owner: u64,
}

fn invalid(storage: &dyn Storage, reason: String) -> Error {
    Error::invalid(storage.name(), "vmdk", reason)
}

fn beyond_eof(storage: &dyn Storage, what: &str, offset: u64) -> Error {
    invalid(
        storage,
        format!(
            "{what} at offset {offset} lies beyond the end of the file ({} bytes)",
            storage.size()
        ),
    )
}

/// Checks that `[offset, offset + length)` lies inside the file.
fn inside(storage: &dyn Storage, what: &str, offset: u64, length: u64) -> Result<()> {
    match offset.checked_add(length) {
        Some(end) if end <= storage.size() => Ok(()),
        _ => Err(beyond_eof(storage, what, offset)),
    }
}

fn sectors_to_bytes(storage: &dyn Storage, what: &str, sectors: u64) -> Result<u64> {
    sectors.checked_mul(SECTOR).ok_or_else(|| {
        invalid(
            storage,
            format!("{what} of {sectors} sectors overflows a byte offset"),
        )
    })
}

/// Reads the header of a hosted sparse file, taking the footer for GD_AT_END streams.
/// Returns the header used and whether it came from the footer.
pub fn read_hosted_header(storage: &dyn Storage) -> Result<(HostedHeader, bool)> {
    let mut sector = [0u8; 512];
    if storage.size() < 512 {
        return Err(invalid(
            storage,
            format!(
                "the file ({} bytes) is shorter than a sparse extent header",
                storage.size()
            ),
        ));
    }
    read_exact(storage, "sparse extent header", &mut sector, 0)?;
    let header = HostedHeader::parse(&sector)
        .ok_or_else(|| invalid(storage, "no KDMV sparse extent header".to_owned()))?;
    if header.gd_offset != GD_AT_END {
        return Ok((header, false));
    }
    // VMware stream layout: footer marker, footer (the real header), EOS marker.
    let size = storage.size();
    if size < 512 + 1536 {
        return Err(invalid(
            storage,
            format!(
                "gdOffset is GD_AT_END but the file ({size} bytes) is too short to end in a footer"
            ),
        ));
    }
    let mut tail = [0u8; 1536];
    read_exact(storage, "stream footer", &mut tail, size - 1536)?;
    let footer_marker = Marker::parse(&tail[0..16]);
    let eos = Marker::parse(&tail[1024..1040]);
    let mut footer_sector = [0u8; 512];
    footer_sector.copy_from_slice(&tail[512..1024]);
    let footer = HostedHeader::parse(&footer_sector);
    let Some(footer) = footer.filter(|_| {
        footer_marker.size == 0
            && footer_marker.kind == MARKER_FOOTER
            && eos.value == 0
            && eos.size == 0
            && eos.kind == MARKER_EOS
    }) else {
        return Err(invalid(
            storage,
            format!(
                "gdOffset is GD_AT_END but the file does not end in a footer marker, footer and \
                 end-of-stream marker (footer marker type {} size {}, end marker type {} size {}); \
                 the stream may be truncated",
                footer_marker.kind, footer_marker.size, eos.kind, eos.size
            ),
        ));
    };
    if footer.gd_offset == GD_AT_END {
        return Err(invalid(
            storage,
            "the stream footer's gdOffset is GD_AT_END too".to_owned(),
        ));
    }
    Ok((footer, true))
}

impl SparseExtent {
    /// Opens a hosted (KDMV) sparse extent whose header has been read.
    pub fn open_hosted(
        storage: Arc<dyn Storage>,
        file: usize,
        header: HostedHeader,
        gd_at_end: bool,
        ctx: &OpenContext,
    ) -> Result<SparseExtent> {
        let s = &*storage;
        if !(1..=3).contains(&header.version) {
            return Err(Error::unsupported(
                s.name(),
                "vmdk",
                format!(
                    "sparse extent header version {} (only 1, 2 and 3 exist)",
                    header.version
                ),
            ));
        }
        if header.flags & FLAG_NEWLINE_TEST != 0 && header.newline_bytes != *b"\n \r\n" {
            return Err(invalid(
                s,
                format!(
                    "the newline test bytes are {:02x?} instead of 0a 20 0d 0a: the file was \
                     damaged, probably by a text-mode transfer",
                    header.newline_bytes
                ),
            ));
        }
        let compressed = match header.compress_algorithm {
            0 => false,
            1 => true,
            other => {
                return Err(Error::unsupported(
                    s.name(),
                    "vmdk",
                    format!("compressAlgorithm {other} (only 0 = none and 1 = deflate exist)"),
                ));
            }
        };
        if header.gtes_per_gt == 0 || header.gtes_per_gt > MAX_HOSTED_GTES {
            return Err(invalid(
                s,
                format!(
                    "numGTEsPerGT {} is outside 1..={MAX_HOSTED_GTES}",
                    header.gtes_per_gt
                ),
            ));
        }
        let overhead = sectors_to_bytes(s, "overHead", header.overhead)?;
        if overhead > s.size() {
            return Err(invalid(
                s,
                format!(
                    "overHead is {overhead} bytes but the file has only {} bytes: the file is truncated",
                    s.size()
                ),
            ));
        }
        let gd_offset = sectors_to_bytes(s, "gdOffset", header.gd_offset)?;
        let rgd_offset = if header.flags & FLAG_REDUNDANT_GD != 0 && header.rgd_offset != 0 {
            Some(sectors_to_bytes(s, "rgdOffset", header.rgd_offset)?)
        } else {
            None
        };
        Self::build(
            storage,
            file,
            SparseFormat::Hosted,
            Some(header),
            header.capacity,
            header.grain_sectors,
            header.gtes_per_gt,
            gd_offset,
            None,
            rgd_offset,
            compressed,
            header.flags & FLAG_MARKERS != 0,
            header.flags & FLAG_ZERO_GRAIN != 0,
            gd_at_end,
            ctx,
        )
    }

    /// Opens a COWD (vmfsSparse) extent.
    pub fn open_cowd(
        storage: Arc<dyn Storage>,
        file: usize,
        ctx: &OpenContext,
    ) -> Result<SparseExtent> {
        let s = &*storage;
        let mut b = [0u8; 44];
        if s.size() < 512 {
            return Err(invalid(
                s,
                format!(
                    "the file ({} bytes) is shorter than a COWD header",
                    s.size()
                ),
            ));
        }
        read_exact(s, "COWD header", &mut b, 0)?;
        if &b[0..4] != b"COWD" {
            return Err(invalid(s, "no COWD sparse extent header".to_owned()));
        }
        let capacity = u64::from(le32(&b, 12));
        let granularity = u64::from(le32(&b, 16));
        let gd_offset = u64::from(le32(&b, 20)) * SECTOR;
        let gd_size = u64::from(le32(&b, 24));
        Self::build(
            storage,
            file,
            SparseFormat::Cowd,
            None,
            capacity,
            granularity,
            COWD_GTES,
            gd_offset,
            Some(gd_size),
            None,
            false,
            false,
            false,
            false,
            ctx,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        storage: Arc<dyn Storage>,
        file: usize,
        format: SparseFormat,
        header: Option<HostedHeader>,
        capacity_sectors: u64,
        grain_sectors: u64,
        gtes_per_gt: u32,
        gd_offset: u64,
        declared_gd_entries: Option<u64>,
        rgd_offset: Option<u64>,
        compressed: bool,
        markers: bool,
        zero_grain: bool,
        gd_at_end: bool,
        ctx: &OpenContext,
    ) -> Result<SparseExtent> {
        let s = &*storage;
        if capacity_sectors > MAX_CAPACITY_SECTORS {
            return Err(Error::unsupported(
                s.name(),
                "vmdk",
                format!(
                    "capacity of {capacity_sectors} sectors is more than the {MAX_CAPACITY_SECTORS} \
                     sectors (64 TiB) accepted"
                ),
            ));
        }
        if grain_sectors == 0
            || !grain_sectors.is_power_of_two()
            || grain_sectors > MAX_GRAIN_SECTORS
        {
            return Err(invalid(
                s,
                format!(
                    "grain size of {grain_sectors} sectors is not a power of two between 1 and \
                     {MAX_GRAIN_SECTORS}"
                ),
            ));
        }
        let grain = grain_sectors * SECTOR;
        let capacity = capacity_sectors * SECTOR;
        let gt_span = grain * u64::from(gtes_per_gt);
        let gd_entries = capacity.div_ceil(gt_span);
        if gd_entries > MAX_GD_ENTRIES {
            return Err(invalid(
                s,
                format!(
                    "the grain directory would have {gd_entries} entries, more than the \
                     {MAX_GD_ENTRIES} accepted"
                ),
            ));
        }
        if let Some(declared) = declared_gd_entries
            && declared < gd_entries
        {
            return Err(invalid(
                s,
                format!(
                    "the grain directory has {declared} entries but {gd_entries} are needed for \
                     {capacity_sectors} sectors"
                ),
            ));
        }
        let gd_bytes = gd_entries * 4;
        inside(s, "the grain directory", gd_offset, gd_bytes)?;
        let raw = read_vec(s, "grain directory", gd_offset, gd_bytes)?;
        let gd: Vec<u32> = raw.chunks_exact(4).map(|c| le32(c, 0)).collect();
        Ok(SparseExtent {
            file,
            format,
            header,
            capacity,
            grain,
            grain_shift: grain.trailing_zeros(),
            gtes_per_gt,
            gd,
            gd_offset,
            rgd_offset,
            compressed,
            markers,
            zero_grain,
            gd_at_end,
            cache: ctx.cache.clone(),
            gt_owner: ctx.cache.owner(),
            marker_owner: ctx.cache.owner(),
            storage,
        })
    }

    fn gt_bytes(&self) -> u64 {
        u64::from(self.gtes_per_gt) * 4
    }

    /// The byte range of the embedded descriptor, if the header declares one inside
    /// the bound.
    pub fn descriptor_range(&self) -> Result<Option<(u64, u64)>> {
        let Some(h) = self.header else {
            return Ok(None);
        };
        if h.descriptor_offset == 0 || h.descriptor_size == 0 {
            return Ok(None);
        }
        let s = &*self.storage;
        let offset = sectors_to_bytes(s, "descriptorOffset", h.descriptor_offset)?;
        let size = sectors_to_bytes(s, "descriptorSize", h.descriptor_size)?;
        if size > MAX_DESCRIPTOR_BYTES {
            return Err(invalid(
                s,
                format!(
                    "the embedded descriptor is {size} bytes, more than the {MAX_DESCRIPTOR_BYTES} accepted"
                ),
            ));
        }
        inside(s, "the embedded descriptor", offset, size)?;
        Ok(Some((offset, size)))
    }

    /// The grain table at host sector `sector`, through the cache.
    fn table(&self, sector: u32, fetch: Fetch) -> Result<Arc<[u8]>> {
        let offset = u64::from(sector) * SECTOR;
        let length = self.gt_bytes();
        let s = &*self.storage;
        inside(s, "grain table", offset, length)?;
        self.cache.load(self.gt_owner, offset, fetch, || {
            read_vec(s, "grain table", offset, length)
        })
    }

    /// The grain markers (lba, size) of every allocated grain of a table, through the
    /// cache; entries whose marker cannot be read are zero and rechecked by the caller.
    fn markers_of(&self, sector: u32, table: &[u8], fetch: Fetch) -> Result<Arc<[u8]>> {
        let s = &*self.storage;
        self.cache
            .load(self.marker_owner, u64::from(sector) * SECTOR, fetch, || {
                let mut out = vec![0u8; table.len() / 4 * MARKER_ENTRY];
                for (i, entry) in table.chunks_exact(4).enumerate() {
                    let gte = le32(entry, 0);
                    if gte == 0 || (gte == 1 && self.zero_grain) {
                        continue;
                    }
                    let at = u64::from(gte) * SECTOR;
                    if at.saturating_add(GRAIN_MARKER_BYTES) > s.size() {
                        continue;
                    }
                    let slot = &mut out[i * MARKER_ENTRY..(i + 1) * MARKER_ENTRY];
                    read_exact(s, "grain marker", slot, at)?;
                }
                Ok(out)
            })
    }

    /// Appends segments for `[rel, rel + length)` of this extent (extent-relative bytes;
    /// `base` is the extent's guest offset, used to check marker LBAs). Stops at the end
    /// of a grain table.
    pub fn map(
        &self,
        rel: u64,
        length: u64,
        base: u64,
        fetch: Fetch,
        out: &mut Vec<Segment>,
    ) -> Result<()> {
        let gt_span = self.grain * u64::from(self.gtes_per_gt);
        let gd_index = rel / gt_span;
        let table_end = ((gd_index + 1) * gt_span).min(self.capacity);
        let end = rel.saturating_add(length).min(table_end);
        let first = out.len();
        let sector = self.gd.get(gd_index as usize).copied().unwrap_or(0);
        if sector == 0 {
            push(out, first, end - rel, SegmentKind::Backing);
            return Ok(());
        }
        let table = self.table(sector, fetch)?;
        let markers = if self.compressed && self.markers {
            Some(self.markers_of(sector, &table, fetch)?)
        } else {
            None
        };
        let file_size = self.storage.size();
        let mut pos = rel;
        while pos < end {
            let grain_index = pos >> self.grain_shift;
            let in_grain = pos & (self.grain - 1);
            let grain_start = grain_index << self.grain_shift;
            let seg_end = (grain_start + self.grain).min(end);
            let len = seg_end - pos;
            let slot = (grain_index % u64::from(self.gtes_per_gt)) as usize;
            let gte = le32(&table, slot * 4);
            pos = seg_end;
            if gte == 0 {
                push(out, first, len, SegmentKind::Backing);
                continue;
            }
            if gte == 1 && self.zero_grain {
                push(out, first, len, SegmentKind::Zero);
                continue;
            }
            let host = u64::from(gte) * SECTOR;
            if host >= file_size {
                return Err(beyond_eof(
                    &*self.storage,
                    &format!("the grain for guest offset {}", base + grain_start),
                    host,
                ));
            }
            if !self.compressed {
                let data_end = host + in_grain + len;
                if data_end <= file_size {
                    push(
                        out,
                        first,
                        len,
                        SegmentKind::Data {
                            file: self.file,
                            offset: host + in_grain,
                            raw: false,
                        },
                    );
                } else {
                    // A grain cut short by the end of the file reads as zeroes past it
                    // (as in qemu); stop after this grain so the plan stays simple.
                    let inside_len = file_size.saturating_sub(host + in_grain).min(len);
                    if inside_len > 0 {
                        push(
                            out,
                            first,
                            inside_len,
                            SegmentKind::Data {
                                file: self.file,
                                offset: host + in_grain,
                                raw: false,
                            },
                        );
                    }
                    push(out, first, len - inside_len, SegmentKind::Zero);
                }
                continue;
            }
            let unit_size = self.grain.min(self.capacity - grain_start);
            let (offset, compressed_length) = match &markers {
                Some(m) => {
                    let entry = &m[slot * MARKER_ENTRY..(slot + 1) * MARKER_ENTRY];
                    let lba = le64(entry, 0);
                    let size = u64::from(le32(entry, 8));
                    if host + GRAIN_MARKER_BYTES > file_size {
                        return Err(beyond_eof(&*self.storage, "a grain marker", host));
                    }
                    let expect = grain_start / SECTOR;
                    if lba != expect && lba != (base + grain_start) / SECTOR {
                        return Err(invalid(
                            &*self.storage,
                            format!(
                                "the grain marker at offset {host} says LBA {lba}, but the grain \
                                 table maps it at sector {expect}"
                            ),
                        ));
                    }
                    if size == 0 || size > 2 * self.grain {
                        return Err(invalid(
                            &*self.storage,
                            format!(
                                "the grain marker at offset {host} gives a compressed size of {size} bytes \
                                 (grain size {})",
                                self.grain
                            ),
                        ));
                    }
                    let data = host + GRAIN_MARKER_BYTES;
                    if data + size > file_size {
                        return Err(beyond_eof(&*self.storage, "compressed grain data", data));
                    }
                    (data, size)
                }
                None => (host, (2 * self.grain).min(file_size - host)),
            };
            out.push(Segment {
                length: len,
                kind: SegmentKind::Compressed {
                    file: self.file,
                    offset,
                    compressed_length,
                    compression: Compression::Zlib,
                    unit_size,
                    skip: in_grain,
                },
            });
        }
        Ok(())
    }

    /// Read-only consistency check of the extent's metadata.
    pub fn check(&self, report: &mut CheckReport, base: u64) -> Result<()> {
        let s = &*self.storage;
        let size = s.size();
        let name = s.name();
        let gt_bytes = self.gt_bytes();
        // Metadata ranges that grains must not overlap.
        let mut meta: Vec<(u64, u64)> = vec![(0, SECTOR)];
        if let Ok(Some((o, l))) = self.descriptor_range() {
            meta.push((o, o + l));
        }
        meta.push((self.gd_offset, self.gd_offset + self.gd.len() as u64 * 4));
        if self.gd_at_end {
            meta.push((size.saturating_sub(1536), size));
        }
        let rgd = match self.rgd_offset {
            Some(o) => {
                let len = self.gd.len() as u64 * 4;
                if o.checked_add(len).is_none_or(|e| e > size) {
                    report.errors.push(format!(
                        "{name}: the redundant grain directory at offset {o} lies beyond the end of the file ({size} bytes)"
                    ));
                    None
                } else {
                    meta.push((o, o + len));
                    let raw = read_vec(s, "redundant grain directory", o, len)?;
                    Some(
                        raw.chunks_exact(4)
                            .map(|c| le32(c, 0))
                            .collect::<Vec<u32>>(),
                    )
                }
            }
            None => None,
        };
        if let Some(h) = self.header
            && (h.flags & FLAG_COMPRESSED != 0) != self.compressed
        {
            report.warnings.push(format!(
                "{name}: the compressed flag ({:#x}) disagrees with compressAlgorithm {}",
                h.flags, h.compress_algorithm
            ));
        }
        let mut tables = Vec::new();
        for (i, &sector) in self.gd.iter().enumerate() {
            if sector == 0 {
                continue;
            }
            let o = u64::from(sector) * SECTOR;
            if o + gt_bytes > size {
                report.errors.push(format!(
                    "{name}: grain table {i} at offset {o} lies beyond the end of the file ({size} bytes)"
                ));
                continue;
            }
            meta.push((o, o + gt_bytes));
            tables.push((i, sector));
        }
        if let Some(rgd) = &rgd {
            for &sector in rgd.iter().filter(|&&x| x != 0) {
                let o = u64::from(sector) * SECTOR;
                meta.push((o, o.saturating_add(gt_bytes)));
            }
        }
        meta.sort_unstable();
        let overlaps = |start: u64, end: u64| {
            let i = meta.partition_point(|&(_, e)| e <= start);
            meta.get(i).is_some_and(|&(b, _)| b < end)
        };
        // Stream markers before the GD and each GT (VMware layout only: qemu's
        // preallocated tables have none).
        if self.gd_at_end && self.markers {
            let gd_sectors = (self.gd.len() as u64 * 4).div_ceil(SECTOR);
            self.check_marker(
                report,
                self.gd_offset,
                MARKER_GD,
                gd_sectors,
                "grain directory",
            )?;
        }
        let (mut allocated, mut zeroed, mut compressed) = (0u64, 0u64, 0u64);
        let grains_total = self.capacity.div_ceil(self.grain);
        for &(i, sector) in &tables {
            let o = u64::from(sector) * SECTOR;
            if self.gd_at_end && self.markers {
                self.check_marker(
                    report,
                    o,
                    MARKER_GT,
                    gt_bytes.div_ceil(SECTOR),
                    "grain table",
                )?;
            }
            let table = self.table(sector, Fetch::Allowed)?;
            for (slot, entry) in table.chunks_exact(4).enumerate() {
                let gte = le32(entry, 0);
                let grain_index = i as u64 * u64::from(self.gtes_per_gt) + slot as u64;
                if gte == 0 {
                    continue;
                }
                if grain_index >= grains_total {
                    report.warnings.push(format!(
                        "{name}: grain table {i} has entry {slot} set beyond the capacity"
                    ));
                    continue;
                }
                if gte == 1 && self.zero_grain {
                    zeroed += 1;
                    continue;
                }
                allocated += 1;
                let host = u64::from(gte) * SECTOR;
                let guest = grain_index * self.grain;
                let grain_end = if self.compressed && self.markers {
                    compressed += 1;
                    if host + GRAIN_MARKER_BYTES > size {
                        report.errors.push(format!(
                            "{name}: the grain for offset {guest} at {host} lies beyond the end of the file ({size} bytes)"
                        ));
                        continue;
                    }
                    let mut m = [0u8; 12];
                    read_exact(s, "grain marker", &mut m, host)?;
                    let lba = le64(&m, 0);
                    let csize = u64::from(le32(&m, 8));
                    if lba != guest / SECTOR && lba != (base + guest) / SECTOR {
                        report.errors.push(format!(
                            "{name}: the grain marker at {host} says LBA {lba}, expected {}",
                            guest / SECTOR
                        ));
                    }
                    if csize == 0 || csize > 2 * self.grain {
                        report.errors.push(format!(
                            "{name}: the grain marker at {host} has a compressed size of {csize} bytes"
                        ));
                    }
                    host + GRAIN_MARKER_BYTES + csize
                } else if self.compressed {
                    compressed += 1;
                    host + SECTOR
                } else {
                    host + self.grain
                };
                if grain_end > size {
                    report.errors.push(format!(
                        "{name}: the grain for offset {guest} at {host} lies beyond the end of the file ({size} bytes)"
                    ));
                } else if overlaps(host, grain_end) {
                    report.errors.push(format!(
                        "{name}: the grain for offset {guest} at {host} overlaps metadata"
                    ));
                }
            }
        }
        if let Some(rgd) = &rgd {
            let mut differ = 0u64;
            for (i, (&a, &b)) in self.gd.iter().zip(rgd).enumerate() {
                let same = match (a, b) {
                    (0, 0) => true,
                    (0, _) | (_, 0) => false,
                    (a, b) => {
                        let bo = u64::from(b) * SECTOR;
                        if bo + gt_bytes > size {
                            false
                        } else {
                            let ta = self.table(a, Fetch::Allowed);
                            let tb = read_vec(s, "redundant grain table", bo, gt_bytes)?;
                            ta.is_ok_and(|ta| ta[..] == tb[..])
                        }
                    }
                };
                if !same {
                    differ += 1;
                    if differ <= 8 {
                        report.warnings.push(format!(
                            "{name}: redundant grain table {i} differs from the primary one"
                        ));
                    }
                }
            }
            report
                .stats
                .push(("redundant grain tables differing".into(), differ));
        }
        report
            .stats
            .push(("grain tables".into(), tables.len() as u64));
        report.stats.push(("allocated grains".into(), allocated));
        report.stats.push(("zeroed grains".into(), zeroed));
        report.stats.push(("compressed grains".into(), compressed));
        Ok(())
    }

    fn check_marker(
        &self,
        report: &mut CheckReport,
        table_offset: u64,
        kind: u32,
        sectors: u64,
        what: &str,
    ) -> Result<()> {
        let s = &*self.storage;
        let Some(at) = table_offset.checked_sub(SECTOR) else {
            report.errors.push(format!(
                "{}: the {what} at offset 0 has no marker",
                s.name()
            ));
            return Ok(());
        };
        let mut b = [0u8; 16];
        read_exact(s, "stream marker", &mut b, at)?;
        let m = Marker::parse(&b);
        if m.size != 0 || m.kind != kind || m.value != sectors {
            report.errors.push(format!(
                "{}: the marker before the {what} at offset {table_offset} is {{sectors {}, size {}, type {}}}, \
                 expected {{sectors {sectors}, size 0, type {kind}}}",
                s.name(),
                m.value,
                m.size,
                m.kind
            ));
        }
        Ok(())
    }
}

/// Pushes a segment (see [`push_segment`]).
fn push(out: &mut Vec<Segment>, first: usize, length: u64, kind: SegmentKind) {
    push_segment(out, first, Segment { length, kind });
}
