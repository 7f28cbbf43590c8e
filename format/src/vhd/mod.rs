//! The VHD format (qemu calls it `vpc`): fixed, dynamic and differencing disks, read-only.
//!
//! Layout (Microsoft "Virtual Hard Disk Image Format Specification" 1.0):
//! - **Fixed**: the guest data is the raw bytes `[0, size)` followed by a 512-byte footer
//!   (`conectix`); there is no header at offset 0. Mapped byte for byte; a hole in the
//!   file is data that reads as zero (`raw: false`), as qemu's `vpc` driver reports it.
//! - **Dynamic / differencing**: a copy of the footer at offset 0, a 1024-byte dynamic
//!   header (`cxsparse`) at `footer.data_offset`, a BAT of big-endian u32 sector numbers
//!   (`0xFFFFFFFF` = unallocated) and blocks, each a sector bitmap (MSB first, bit 7 of
//!   byte 0 is sector 0; padded to 512 bytes) followed by `block_size` bytes of data, then
//!   the footer again at the end of the file. In a dynamic disk an unallocated block or a
//!   sector whose bit is 0 reads as zeroes provided by this layer (qemu reports it as
//!   present and zero at the top layer); in a differencing disk it comes from the parent,
//!   found through the parent locators and checked by the parent's footer UUID.
//!
//! Both checksums (footer and dynamic header) are verified: a mismatch refuses the image.
//! The footer copy at offset 0 is used when it is valid (as qemu does), else the one at
//! the end; if both are valid but one says fixed and the other does not, the image is
//! refused rather than guessed (a fixed disk's first sector is guest data). As in qemu,
//! a block (bitmap and data) running past the end of the file refuses the image.
//!
//! **Virtual size** (qemu 10's `vpc_ignore_current_size()`, the Feb-2025 Azure patch):
//! images whose creator application is `vpc ` (Virtual PC) or `qemu` (qemu without
//! `force_size`) are sized by their CHS geometry, `cylinders × heads × sectors × 512`,
//! unless the geometry is the maximum 65535/16/255, which means "use `current_size`".
//! Every other creator (`win ` Hyper-V, `qem2` qemu with `force_size`, `d2v `, `tap\0`,
//! `CTXS`, Azure's `wa\0\0`, …) is sized by `current_size` (rounded down to a sector).

mod header;
mod locator;

use std::sync::Arc;

use crate::cache::MetadataCache;
use crate::layer::{
    Backing, CheckReport, Fetch, Format, Layer, LayerInfo, OpenContext, ParentIdentity, Segment,
    SegmentKind, push_segment,
};
use crate::storage::{Storage, read_exact, read_vec};
use crate::{Error, Result};

use header::{
    DiskType, DynamicHeader, FOOTER_SIZE, Footer, FooterError, HEADER_SIZE, HeaderError, SECTOR,
    UNALLOCATED, format_code, format_timestamp, format_uuid,
};
use locator::{LocatorKind, MAX_LOCATOR_LENGTH, decode_locator, decode_parent_name};

const FMT: &str = "vhd";

/// Largest virtual size: qemu's `VHD_MAX_SECTORS` (0xff000000 sectors = 2040 GiB).
const MAX_VIRTUAL_SIZE: u64 = 0xff00_0000 * SECTOR;
/// The CHS geometry 65535/16/255, which tells readers to use `current_size`.
const MAX_GEOMETRY_SECTORS: u64 = 65_535 * 16 * 255;
/// BAT entries accepted (a 32 MiB BAT, loaded at open): enough for 2040 GiB in 256 KiB
/// blocks; real writers use 2 MiB (qemu, Hyper-V) or 512 KiB blocks.
const MAX_TABLE_ENTRIES: u32 = 1 << 23;
/// Largest block size accepted: 256 MiB (its bitmap is 64 KiB).
const MAX_BLOCK_SIZE: u32 = 256 << 20;
/// Segments one `map` call pushes before returning (the chain calls again).
const MAX_SEGMENTS_PER_MAP: usize = 256;
/// Problems listed one by one in a check report before summarising the rest.
const MAX_REPORTED: usize = 100;

/// How the virtual size was chosen (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SizeRule {
    /// `vpc ` / `qemu` creator: cylinders × heads × sectors × 512.
    Chs,
    /// `vpc ` / `qemu` creator with the maximum geometry: `current_size`.
    MaxGeometry,
    /// Any other creator: `current_size`.
    CurrentSize,
}

impl SizeRule {
    fn of(footer: &Footer) -> SizeRule {
        if &footer.creator_app != b"vpc " && &footer.creator_app != b"qemu" {
            SizeRule::CurrentSize
        } else if footer.chs_sectors() == MAX_GEOMETRY_SECTORS {
            SizeRule::MaxGeometry
        } else {
            SizeRule::Chs
        }
    }

    fn size(self, footer: &Footer) -> u64 {
        match self {
            SizeRule::Chs => footer.chs_sectors() * SECTOR,
            SizeRule::MaxGeometry | SizeRule::CurrentSize => footer.current_size / SECTOR * SECTOR,
        }
    }

    fn describe(self, footer: &Footer) -> String {
        let creator = format_code(&footer.creator_app);
        match self {
            SizeRule::Chs => format!("CHS geometry (creator {creator:?})"),
            SizeRule::MaxGeometry => {
                format!("current_size (creator {creator:?}, maximum CHS geometry)")
            }
            SizeRule::CurrentSize => format!("current_size (creator {creator:?})"),
        }
    }
}

/// The sparse part of a dynamic or differencing disk.
#[derive(Debug)]
struct Sparse {
    header_offset: u64,
    header: DynamicHeader,
    /// The BAT, host-endian.
    bat: Vec<u32>,
    block_size: u64,
    bitmap_size: u64,
    /// Decoded parent locators (index, platform code, text), for `info`.
    locators: Vec<(usize, [u8; 4], String)>,
    parent_name: Option<String>,
    cache: Arc<MetadataCache>,
    owner: u64,
}

/// An open VHD image.
#[derive(Debug)]
pub struct VhdLayer {
    files: [Arc<dyn Storage>; 1],
    footer: Footer,
    disk_type: DiskType,
    size_rule: SizeRule,
    virtual_size: u64,
    sparse: Option<Sparse>,
    backing: Option<Backing>,
    /// Footer problems found at open that did not prevent it (for `check`).
    footer_problems: Vec<String>,
}

fn invalid(storage: &dyn Storage, reason: impl Into<String>) -> Error {
    Error::invalid(storage.name(), FMT, reason)
}

fn beyond_end(storage: &dyn Storage, what: &str, offset: u64) -> Error {
    invalid(
        storage,
        format!(
            "{what} at offset {offset} lies beyond the end of the file ({} bytes)",
            storage.size()
        ),
    )
}

/// Picks the footer: the copy at offset 0 if valid, else the one at the end. Returns it
/// with the problems worth reporting in `check`.
fn choose_footer(storage: &dyn Storage) -> Result<(Footer, Vec<String>)> {
    let size = storage.size();
    if size < FOOTER_SIZE as u64 {
        return Err(invalid(
            storage,
            format!("the file is {size} bytes, too small for a {FOOTER_SIZE}-byte footer"),
        ));
    }
    let mut head_raw = [0u8; FOOTER_SIZE];
    read_exact(storage, "VHD footer copy", &mut head_raw, 0)?;
    let mut tail_raw = [0u8; FOOTER_SIZE];
    let tail_at = size - FOOTER_SIZE as u64;
    read_exact(storage, "VHD footer", &mut tail_raw, tail_at)?;
    let head = Footer::parse(&head_raw);
    let tail = Footer::parse(&tail_raw);
    let checksum_error = |what: &str, stored: u32, computed: u32| {
        invalid(
            storage,
            format!(
                "{what}: footer checksum mismatch: stored {stored:#010x}, computed {computed:#010x}"
            ),
        )
    };
    let mut problems = Vec::new();
    let footer = match (head, tail) {
        // A fixed disk has no copy at 0: a fixed "footer" there is guest data (or, in
        // a 512-byte file, the footer itself).
        (Ok(h), Ok(t)) if h.kind() == Some(DiskType::Fixed) && t.kind() == h.kind() => t,
        (Ok(h), Ok(t))
            if (h.kind() == Some(DiskType::Fixed) || t.kind() == Some(DiskType::Fixed))
                && tail_at != 0 =>
        {
            return Err(invalid(
                storage,
                format!(
                    "the footer copy at offset 0 says disk_type {} but the footer at offset {tail_at} \
                     says disk_type {}; refusing to guess which one is guest data",
                    h.disk_type, t.disk_type
                ),
            ));
        }
        (Ok(h), Ok(t)) => {
            let fields = h.differences(&t);
            if !fields.is_empty() {
                problems.push(format!(
                    "the footer copies at offset 0 and {tail_at} disagree in {}; the copy at 0 is used",
                    fields.join(", ")
                ));
            }
            h
        }
        (Ok(h), Err(FooterError::NoCookie)) => {
            if h.kind() != Some(DiskType::Fixed) {
                problems.push(format!(
                    "no footer at the end of the file (offset {tail_at}): truncated or not closed"
                ));
                h
            } else {
                return Err(invalid(
                    storage,
                    "the footer at offset 0 says fixed but the file does not end with a footer",
                ));
            }
        }
        (Ok(h), Err(FooterError::Checksum { stored, computed })) => {
            if h.kind() == Some(DiskType::Fixed) {
                return Err(checksum_error(
                    &format!("footer at offset {tail_at}"),
                    stored,
                    computed,
                ));
            }
            problems.push(format!(
                "the footer at offset {tail_at} has a bad checksum (stored {stored:#010x}, \
                 computed {computed:#010x}); the copy at 0 is used"
            ));
            h
        }
        (Err(FooterError::Checksum { stored, computed }), Ok(t)) => {
            if t.kind() != Some(DiskType::Fixed) {
                problems.push(format!(
                    "the footer copy at offset 0 has a bad checksum (stored {stored:#010x}, \
                     computed {computed:#010x}); the footer at offset {tail_at} is used"
                ));
            }
            t
        }
        (Err(FooterError::NoCookie), Ok(t)) => {
            if t.kind() != Some(DiskType::Fixed) {
                problems.push(
                    "no footer copy at offset 0 (required for dynamic and differencing disks); \
                     the footer at the end is used"
                        .to_owned(),
                );
            }
            t
        }
        (Err(FooterError::Checksum { stored, computed }), Err(_)) => {
            return Err(checksum_error("footer copy at offset 0", stored, computed));
        }
        (Err(FooterError::NoCookie), Err(FooterError::Checksum { stored, computed })) => {
            return Err(checksum_error(
                &format!("footer at offset {tail_at}"),
                stored,
                computed,
            ));
        }
        (Err(FooterError::NoCookie), Err(FooterError::NoCookie)) => {
            return Err(invalid(
                storage,
                "no VHD footer (cookie \"conectix\") at offset 0 or at the end of the file",
            ));
        }
    };
    Ok((footer, problems))
}

/// Opens a VHD image.
pub fn open(storage: Arc<dyn Storage>, ctx: &OpenContext) -> Result<Box<dyn Layer>> {
    Ok(Box::new(VhdLayer::open(storage, ctx)?))
}

impl VhdLayer {
    /// Opens `storage` as a VHD image, validating its footer, header and BAT.
    pub fn open(storage: Arc<dyn Storage>, ctx: &OpenContext) -> Result<VhdLayer> {
        let s = &*storage;
        let (footer, footer_problems) = choose_footer(s)?;
        let disk_type = footer.kind().ok_or_else(|| {
            Error::unsupported(
                s.name(),
                FMT,
                format!(
                    "disk_type {} is not fixed (2), dynamic (3) or differencing (4)",
                    footer.disk_type
                ),
            )
        })?;
        let size_rule = SizeRule::of(&footer);
        let virtual_size = size_rule.size(&footer);
        if virtual_size > MAX_VIRTUAL_SIZE {
            return Err(invalid(
                s,
                format!(
                    "virtual size {virtual_size} (by {}) exceeds the VHD limit of {MAX_VIRTUAL_SIZE} bytes (2040 GiB)",
                    size_rule.describe(&footer)
                ),
            ));
        }
        let mut layer = VhdLayer {
            files: [storage.clone()],
            footer,
            disk_type,
            size_rule,
            virtual_size,
            sparse: None,
            backing: None,
            footer_problems,
        };
        if disk_type == DiskType::Fixed {
            let data_end = s.size() - FOOTER_SIZE as u64;
            if virtual_size > data_end {
                return Err(invalid(
                    s,
                    format!(
                        "virtual size {virtual_size} (by {}) does not fit in the {data_end} bytes \
                         before the footer",
                        size_rule.describe(&layer.footer)
                    ),
                ));
            }
            return Ok(layer);
        }
        let sparse = open_sparse(s, &layer.footer, virtual_size, ctx)?;
        if disk_type == DiskType::Differencing {
            let decoded: Vec<(LocatorKind, String)> = sparse
                .locators
                .iter()
                .filter_map(|(_, code, text)| {
                    LocatorKind::from_code(code).map(|kind| (kind, text.clone()))
                })
                .collect();
            layer.backing = Some(Backing {
                names: locator::parent_names(&decoded, sparse.parent_name.as_deref()),
                format: Some(Format::Vhd),
                expect: Some(ParentIdentity::VhdUuid(sparse.header.parent_uuid)),
            });
        }
        layer.sparse = Some(sparse);
        Ok(layer)
    }
}

/// Reads and validates the dynamic header, the BAT and (for differencing disks) the
/// parent locators.
fn open_sparse(
    s: &dyn Storage,
    footer: &Footer,
    virtual_size: u64,
    ctx: &OpenContext,
) -> Result<Sparse> {
    let size = s.size();
    let header_offset = footer.data_offset;
    if header_offset
        .checked_add(HEADER_SIZE as u64)
        .is_none_or(|end| end > size)
    {
        return Err(beyond_end(s, "the dynamic header", header_offset));
    }
    let mut raw = [0u8; HEADER_SIZE];
    read_exact(s, "VHD dynamic header", &mut raw, header_offset)?;
    let header = match DynamicHeader::parse(&raw) {
        Ok(h) => h,
        Err(HeaderError::NoCookie) => {
            return Err(invalid(
                s,
                format!("no dynamic header (cookie \"cxsparse\") at offset {header_offset}"),
            ));
        }
        Err(HeaderError::Checksum { stored, computed }) => {
            return Err(invalid(
                s,
                format!(
                    "dynamic header checksum mismatch: stored {stored:#010x}, computed {computed:#010x}"
                ),
            ));
        }
    };
    let block_size = header.block_size;
    if !block_size.is_power_of_two() || !(512..=MAX_BLOCK_SIZE).contains(&block_size) {
        return Err(invalid(
            s,
            format!(
                "block_size {block_size} is not a power of two between 512 and {MAX_BLOCK_SIZE}"
            ),
        ));
    }
    let block_size = u64::from(block_size);
    // One bit per sector, rounded up to whole sectors.
    let bitmap_size = (block_size / SECTOR).div_ceil(8).next_multiple_of(SECTOR);
    let entries = header.max_table_entries;
    if entries > MAX_TABLE_ENTRIES {
        return Err(invalid(
            s,
            format!("max_table_entries {entries} exceeds the limit of {MAX_TABLE_ENTRIES}"),
        ));
    }
    if u64::from(entries) * block_size < virtual_size {
        return Err(invalid(
            s,
            format!(
                "max_table_entries {entries} × block_size {block_size} is less than the virtual size {virtual_size}"
            ),
        ));
    }
    let table_offset = header.table_offset;
    let bat_bytes = u64::from(entries) * 4;
    if table_offset
        .checked_add(bat_bytes)
        .is_none_or(|end| end > size)
    {
        return Err(beyond_end(
            s,
            &format!("the BAT ({entries} entries)"),
            table_offset,
        ));
    }
    let raw_bat = read_vec(s, "VHD BAT", table_offset, bat_bytes)?;
    let bat: Vec<u32> = raw_bat
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    // As qemu: every allocated block (bitmap and data) lies inside the file.
    for (index, &entry) in bat.iter().enumerate() {
        if entry == UNALLOCATED {
            continue;
        }
        let start = u64::from(entry) * SECTOR;
        if start + bitmap_size + block_size > size {
            return Err(beyond_end(s, &format!("block {index}"), start));
        }
    }
    let mut locators = Vec::new();
    let mut parent_name = None;
    if footer.kind() == Some(DiskType::Differencing) {
        for (index, loc) in header.locators.iter().enumerate() {
            let Some(kind) = LocatorKind::from_code(&loc.platform) else {
                continue;
            };
            if loc.data_length == 0 {
                continue;
            }
            if loc.data_length > MAX_LOCATOR_LENGTH {
                return Err(invalid(
                    s,
                    format!(
                        "parent locator {index} ({}): data_length {} exceeds the limit of {MAX_LOCATOR_LENGTH}",
                        format_code(&loc.platform),
                        loc.data_length
                    ),
                ));
            }
            let length = u64::from(loc.data_length);
            if loc
                .data_offset
                .checked_add(length)
                .is_none_or(|end| end > size)
            {
                return Err(beyond_end(
                    s,
                    &format!("parent locator {index} data"),
                    loc.data_offset,
                ));
            }
            let data = read_vec(s, "VHD parent locator", loc.data_offset, length)?;
            if let Some(text) = decode_locator(kind, &data) {
                locators.push((index, loc.platform, text));
            }
        }
        parent_name = decode_parent_name(&header.parent_name);
    }
    Ok(Sparse {
        header_offset,
        header,
        bat,
        block_size,
        bitmap_size,
        locators,
        parent_name,
        cache: ctx.cache.clone(),
        owner: ctx.cache.owner(),
    })
}

/// The value of bit `start` of an MSB-first bitmap and how many bits from `start` (up
/// to `end`) share it. Whole bytes and 64-bit words are compared at once.
fn bit_run(bitmap: &[u8], start: usize, end: usize) -> (bool, usize) {
    let value = bitmap
        .get(start / 8)
        .is_some_and(|b| b & (0x80 >> (start % 8)) != 0);
    let fill = if value { 0xFF } else { 0 };
    let mut pos = start;
    while pos < end {
        let byte_index = pos / 8;
        let shift = pos % 8;
        if shift == 0 && end - pos >= 64 {
            let word = bitmap
                .get(byte_index..byte_index + 8)
                .and_then(|w| <[u8; 8]>::try_from(w).ok());
            if word.is_some_and(|w| u64::from_ne_bytes(w) == u64::from_ne_bytes([fill; 8])) {
                pos += 64;
                continue;
            }
        }
        let Some(&byte) = bitmap.get(byte_index) else {
            break;
        };
        // Bits already passed are shifted out; equal bits are zeroes of `diff`.
        let diff = (byte ^ fill) << shift;
        let available = 8 - shift;
        let same = (diff.leading_zeros() as usize).min(available);
        pos += same;
        if same < available {
            break;
        }
    }
    (value, pos.min(end) - start)
}

/// Appends `segment` (see [`push_segment`]).
fn push(out: &mut Vec<Segment>, first: usize, segment: Segment) {
    push_segment(out, first, segment);
}

impl VhdLayer {
    /// Maps part of a dynamic or differencing disk.
    fn map_sparse(
        &self,
        sparse: &Sparse,
        offset: u64,
        length: u64,
        fetch: Fetch,
        out: &mut Vec<Segment>,
    ) -> Result<()> {
        let storage = &*self.files[0];
        // Not stored here: the parent's bytes, or this layer's zeroes.
        let absent = if self.disk_type == DiskType::Differencing {
            SegmentKind::Backing
        } else {
            SegmentKind::Zero
        };
        let first = out.len();
        let end = offset + length;
        let mut pos = offset;
        while pos < end && out.len() - first < MAX_SEGMENTS_PER_MAP {
            let index = pos / sparse.block_size;
            let block_start = index * sparse.block_size;
            let block_end = (block_start + sparse.block_size).min(end);
            let entry = usize::try_from(index)
                .ok()
                .and_then(|i| sparse.bat.get(i).copied())
                .ok_or_else(|| {
                    invalid(
                        storage,
                        format!(
                            "guest offset {pos} lies beyond the BAT ({} entries)",
                            sparse.bat.len()
                        ),
                    )
                })?;
            if entry == UNALLOCATED {
                push(
                    out,
                    first,
                    Segment {
                        length: block_end - pos,
                        kind: absent,
                    },
                );
                pos = block_end;
                continue;
            }
            let bitmap_offset = u64::from(entry) * SECTOR;
            let load = || {
                read_vec(
                    storage,
                    "VHD sector bitmap",
                    bitmap_offset,
                    sparse.bitmap_size,
                )
            };
            let bitmap = match sparse.cache.load(sparse.owner, bitmap_offset, fetch, load) {
                Ok(bitmap) => bitmap,
                // Return what is mapped; the caller asks again for the rest.
                Err(Error::NotCached) if out.len() > first => return Ok(()),
                Err(e) => return Err(e),
            };
            let data_offset = bitmap_offset + sparse.bitmap_size;
            let last_sector = (block_end - block_start).div_ceil(SECTOR) as usize;
            while pos < block_end && out.len() - first < MAX_SEGMENTS_PER_MAP {
                let sector = ((pos - block_start) / SECTOR) as usize;
                let (present, run) = bit_run(&bitmap, sector, last_sector);
                if run == 0 {
                    return Err(invalid(
                        storage,
                        format!("the sector bitmap at offset {bitmap_offset} is too short"),
                    ));
                }
                let run_end = (block_start + (sector + run) as u64 * SECTOR).min(block_end);
                let kind = if present {
                    SegmentKind::Data {
                        file: 0,
                        offset: data_offset + (pos - block_start),
                        raw: false,
                    }
                } else {
                    absent
                };
                push(
                    out,
                    first,
                    Segment {
                        length: run_end - pos,
                        kind,
                    },
                );
                pos = run_end;
            }
        }
        Ok(())
    }
}

impl Layer for VhdLayer {
    fn format(&self) -> Format {
        Format::Vhd
    }

    fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    fn files(&self) -> &[Arc<dyn Storage>] {
        &self.files
    }

    fn backing(&self) -> Option<&Backing> {
        self.backing.as_ref()
    }

    fn identity(&self) -> Option<ParentIdentity> {
        Some(ParentIdentity::VhdUuid(self.footer.uuid))
    }

    fn info(&self) -> LayerInfo {
        let f = &self.footer;
        let mut details = vec![
            ("uuid".to_owned(), format_uuid(&f.uuid)),
            ("size rule".to_owned(), self.size_rule.describe(f)),
            ("current size".to_owned(), f.current_size.to_string()),
            ("original size".to_owned(), f.original_size.to_string()),
            (
                "geometry (C/H/S)".to_owned(),
                format!("{}/{}/{}", f.cylinders, f.heads, f.sectors),
            ),
            (
                "creator application".to_owned(),
                format_code(&f.creator_app),
            ),
            (
                "creator version".to_owned(),
                format!("{}.{}", f.creator_version >> 16, f.creator_version & 0xFFFF),
            ),
            ("creator host OS".to_owned(), format_code(&f.creator_os)),
            ("created".to_owned(), format_timestamp(f.timestamp)),
            (
                "saved state".to_owned(),
                if f.saved_state != 0 { "yes" } else { "no" }.to_owned(),
            ),
        ];
        if let Some(sparse) = &self.sparse {
            let allocated = sparse.bat.iter().filter(|&&e| e != UNALLOCATED).count();
            details.push(("BAT entries".to_owned(), sparse.bat.len().to_string()));
            details.push(("allocated blocks".to_owned(), allocated.to_string()));
            if self.disk_type == DiskType::Differencing {
                let h = &sparse.header;
                details.push(("parent uuid".to_owned(), format_uuid(&h.parent_uuid)));
                if let Some(name) = &sparse.parent_name {
                    details.push(("parent name".to_owned(), name.clone()));
                }
                details.push((
                    "parent modified".to_owned(),
                    format_timestamp(h.parent_timestamp),
                ));
                if let Some(backing) = &self.backing {
                    details.push(("parent names tried".to_owned(), backing.names.join(", ")));
                }
                for (index, code, text) in &sparse.locators {
                    details.push((
                        format!("parent locator {index} ({})", format_code(code)),
                        text.clone(),
                    ));
                }
            }
        }
        let mut features = Vec::new();
        if f.features & 1 != 0 {
            features.push("temporary".to_owned());
        }
        LayerInfo {
            format: Format::Vhd,
            subformat: Some(self.disk_type.name().to_owned()),
            path: self.files[0].name().to_owned(),
            virtual_size: self.virtual_size,
            file_size: self.files[0].size(),
            cluster_size: self.sparse.as_ref().map(|s| s.block_size),
            features,
            dirty: false,
            corrupt: false,
            details,
        }
    }

    fn map(&self, offset: u64, length: u64, fetch: Fetch, out: &mut Vec<Segment>) -> Result<()> {
        match &self.sparse {
            None => {
                out.push(Segment {
                    length,
                    kind: SegmentKind::Data {
                        file: 0,
                        offset,
                        raw: false,
                    },
                });
                Ok(())
            }
            Some(sparse) => self.map_sparse(sparse, offset, length, fetch, out),
        }
    }

    fn check(&self, report: &mut CheckReport) -> Result<()> {
        report.errors.extend(self.footer_problems.iter().cloned());
        let storage = &*self.files[0];
        let size = storage.size();
        let Some(sparse) = &self.sparse else {
            let slack = size - FOOTER_SIZE as u64 - self.virtual_size;
            if slack > 0 {
                report.warnings.push(format!(
                    "{slack} bytes between the end of the disk data and the footer are not part of the disk"
                ));
            }
            return Ok(());
        };
        check_sparse(
            storage,
            &self.footer,
            sparse,
            self.footer_problems.is_empty(),
            report,
        );
        Ok(())
    }
}

/// Adds `problem` to `list`, summarising once [`MAX_REPORTED`] are listed.
fn note(list: &mut Vec<String>, count: &mut usize, problem: String) {
    *count += 1;
    if *count <= MAX_REPORTED {
        list.push(problem);
    }
}

fn check_sparse(
    storage: &dyn Storage,
    footer: &Footer,
    sparse: &Sparse,
    footers_fine: bool,
    report: &mut CheckReport,
) {
    let size = storage.size();
    let block_bytes = sparse.bitmap_size + sparse.block_size;
    let h = &sparse.header;
    // Metadata ranges a block must not overlap.
    let mut metadata: Vec<(u64, u64, String)> = vec![
        (0, FOOTER_SIZE as u64, "the footer copy".to_owned()),
        (
            sparse.header_offset,
            sparse.header_offset + HEADER_SIZE as u64,
            "the dynamic header".to_owned(),
        ),
        (
            h.table_offset,
            h.table_offset + (sparse.bat.len() as u64 * 4).next_multiple_of(SECTOR),
            "the BAT".to_owned(),
        ),
    ];
    let trailing = size - FOOTER_SIZE as u64;
    let mut tail = [0u8; FOOTER_SIZE];
    let trailing_ok = read_exact(storage, "VHD footer", &mut tail, trailing).is_ok()
        && Footer::parse(&tail).is_ok();
    if trailing_ok {
        metadata.push((trailing, size, "the trailing footer".to_owned()));
    }
    if footer.kind() == Some(DiskType::Differencing) {
        for (index, loc) in h.locators.iter().enumerate() {
            if LocatorKind::from_code(&loc.platform).is_some() && loc.data_length > 0 {
                metadata.push((
                    loc.data_offset,
                    loc.data_offset.saturating_add(u64::from(loc.data_length)),
                    format!("parent locator {index}"),
                ));
            }
        }
    }
    let mut errors = 0;
    metadata.sort();
    for pair in metadata.windows(2) {
        if pair[1].0 < pair[0].1 {
            note(
                &mut report.errors,
                &mut errors,
                format!("{} overlaps {}", pair[0].2, pair[1].2),
            );
        }
    }
    let mut blocks: Vec<(u64, usize)> = sparse
        .bat
        .iter()
        .enumerate()
        .filter(|&(_, &e)| e != UNALLOCATED)
        .map(|(i, &e)| (u64::from(e) * SECTOR, i))
        .collect();
    blocks.sort_unstable();
    for pair in blocks.windows(2) {
        if pair[1].0 < pair[0].0 + block_bytes {
            note(
                &mut report.errors,
                &mut errors,
                format!(
                    "block {} at offset {} overlaps block {} at offset {}",
                    pair[0].1, pair[0].0, pair[1].1, pair[1].0
                ),
            );
        }
    }
    for (start, end, what) in &metadata {
        // Blocks that start before `end` and end after `start`.
        let upto = blocks.partition_point(|&(b, _)| b < *end);
        for &(b, index) in blocks[..upto].iter().rev() {
            if b + block_bytes <= *start {
                break;
            }
            note(
                &mut report.errors,
                &mut errors,
                format!("block {index} at offset {b} overlaps {what} at offset {start}"),
            );
        }
    }
    let mut bitmap = vec![0u8; sparse.bitmap_size as usize];
    let mut present: u64 = 0;
    for &(offset, index) in &blocks {
        match read_exact(storage, "VHD sector bitmap", &mut bitmap, offset) {
            Ok(()) => {
                present += bitmap
                    .iter()
                    .map(|b| u64::from(b.count_ones()))
                    .sum::<u64>();
            }
            Err(e) => note(
                &mut report.errors,
                &mut errors,
                format!(
                    "the sector bitmap of block {index} cannot be read: {}",
                    e.detail()
                ),
            ),
        }
    }
    if errors > MAX_REPORTED {
        report
            .errors
            .push(format!("… and {} more problems", errors - MAX_REPORTED));
    }
    if !trailing_ok && footers_fine {
        report.errors.push(format!(
            "the file does not end with a copy of the footer (offset {trailing})"
        ));
    }
    report
        .stats
        .push(("BAT entries".to_owned(), sparse.bat.len() as u64));
    report
        .stats
        .push(("allocated blocks".to_owned(), blocks.len() as u64));
    report.stats.push(("sectors present".to_owned(), present));
}

#[cfg(test)]
mod tests;
