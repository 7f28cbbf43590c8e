//! The qcow2 format (v2 and v3): guest ranges are mapped through the L1 table (loaded
//! at open) and L2 tables (through the shared metadata cache) into data, compressed,
//! zero and backing segments. Encrypted images and unknown incompatible features are
//! refused; dirty and corrupt images are served read-only.
//!
//! An image opened with [`open_writable`] maps through the metadata it shares with its
//! [`Qcow2Writer`] (the `live` module) instead, so reads see every write at once; [`create`]
//! makes new images and [`repair`] rebuilds refcounts.

mod check;
mod create;
mod header;
mod live;
mod lock;
mod rebase;
mod repair;
mod writer;

pub use create::{CreateOptions, create};
pub use lock::ImageLock;
pub use rebase::set_backing;
pub use repair::{RepairReport, repair};
pub use writer::{Below, DIRTY_LIMIT, NoBacking, Qcow2Writer, ZeroMode};

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::cache::MetadataCache;
use crate::data_path::DataPath;
use crate::layer::{
    Backing, CheckReport, Compression, Fetch, Format, Layer, LayerInfo, OpenContext, Segment,
    SegmentKind, push_segment,
};
use crate::storage::{FileStorage, Storage, read_vec};
use crate::{Error, Result};

use header::{
    AUTOCLEAR_DATA_FILE_RAW, COMPAT_LAZY_REFCOUNTS, FORMAT, Header, INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY, INCOMPAT_EXTENDED_L2, be64,
};
use live::Live;
use writer::Geometry;

/// Bits 9..=55 of L1 and L2 entries: a cluster-aligned host offset.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Refcount table entries: bits 9..=63 are the block offset.
const REFTABLE_MASK: u64 = 0xffff_ffff_ffff_fe00;
/// L2 entry bit 62: the cluster is compressed.
const COMPRESSED: u64 = 1 << 62;
/// L1/L2 entry bit 63: the refcount is exactly one.
const COPIED: u64 = 1 << 63;
/// Standard descriptor bit 0: the cluster reads as zeroes (v3 without extended L2).
const ZERO_FLAG: u64 = 1;
/// Subclusters per cluster with extended L2 entries.
const SUBCLUSTERS: u64 = 32;

/// Where one run of guest bytes inside a cluster is, before EOF handling and merging.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Run {
    Data { file: usize, host: u64 },
    Zero,
    Backing,
}

/// An opened qcow2 image.
#[derive(Debug)]
pub struct Qcow2Layer {
    files: Vec<Arc<dyn Storage>>,
    header: Header,
    cluster_bits: u32,
    cluster_size: u64,
    /// log2 of the guest bytes one L2 table maps.
    l1_bits: u32,
    /// Bytes per L2 entry: 8, or 16 with extended L2 entries.
    entry_size: usize,
    extended: bool,
    /// Index into `files` of the data (1 with an external data file).
    data_index: usize,
    compression: Compression,
    l1: Vec<u64>,
    cache: Arc<MetadataCache>,
    owner: u64,
    backing: Option<Backing>,
    /// The metadata shared with the writer, for an image open for writing.
    live: Option<Arc<Live>>,
}

/// Opens a qcow2 image.
pub fn open(storage: Arc<dyn Storage>, ctx: &OpenContext) -> Result<Box<dyn Layer>> {
    Ok(Box::new(Qcow2Layer::open(storage, ctx)?))
}

impl Qcow2Layer {
    /// Parses the header, loads the L1 table and opens the external data file if any.
    pub fn open(storage: Arc<dyn Storage>, ctx: &OpenContext) -> Result<Qcow2Layer> {
        let header = Header::read(&*storage)?;
        Self::from_header(storage, header, ctx, None)
    }

    fn from_header(
        storage: Arc<dyn Storage>,
        header: Header,
        ctx: &OpenContext,
        live: Option<Arc<Live>>,
    ) -> Result<Qcow2Layer> {
        let raw = header.raw;
        let extended = raw.incompatible & INCOMPAT_EXTENDED_L2 != 0;
        let entry_size = if extended { 16 } else { 8 };
        let l1_bits = raw.cluster_bits * 2 - if extended { 4 } else { 3 };
        let l1_bytes = u64::from(raw.l1_size) * 8;
        let l1_raw = read_vec(&*storage, "L1 table", raw.l1_table_offset, l1_bytes)?;
        let l1 = l1_raw.chunks_exact(8).map(|c| be64(c, 0)).collect();
        let backing = match &header.backing_name {
            None => None,
            Some(name) => {
                let format = match &header.backing_format {
                    None => None,
                    Some(f) => Some(Format::from_name(f).ok_or_else(|| {
                        Error::unsupported(
                            storage.name(),
                            FORMAT,
                            format!("the backing file {name:?} has the unknown format {f:?}"),
                        )
                    })?),
                };
                Some(Backing {
                    names: vec![name.clone()],
                    format,
                    expect: None,
                })
            }
        };
        let mut files = vec![storage.clone()];
        if let Some(name) = &header.data_file {
            let data = storage.open_related(name).map_err(|e| {
                Error::invalid(
                    storage.name(),
                    FORMAT,
                    format!("cannot open the external data file {name:?}: {e}"),
                )
            })?;
            files.push(data);
        }
        let compression = if header.compression_type == 1 {
            Compression::Zstd
        } else {
            Compression::Deflate
        };
        Ok(Qcow2Layer {
            data_index: files.len() - 1,
            files,
            cluster_bits: raw.cluster_bits,
            cluster_size: header.cluster_size,
            l1_bits,
            entry_size,
            extended,
            compression,
            l1,
            cache: ctx.cache.clone(),
            owner: ctx.cache.owner(),
            backing,
            header,
            live,
        })
    }

    fn name(&self) -> &str {
        self.files[0].name()
    }

    fn invalid(&self, reason: String) -> Error {
        Error::invalid(self.name(), FORMAT, reason)
    }

    fn has_data_file(&self) -> bool {
        self.data_index != 0
    }

    /// The L2 table at `l2_offset` (from the active L1 entry `l1_index`).
    fn l2_table(&self, l2_offset: u64, l1_index: u64, fetch: Fetch) -> Result<Arc<[u8]>> {
        let cs = self.cluster_size;
        if l2_offset & (cs - 1) != 0 {
            return Err(self.invalid(format!(
                "L2 table offset {l2_offset:#x} (L1 index {l1_index}) is not cluster aligned"
            )));
        }
        if let Some(live) = &self.live {
            return live.block(l2_offset, "L2 table", fetch);
        }
        let size = self.files[0].size();
        if l2_offset.checked_add(cs).is_none_or(|end| end > size) {
            return Err(self.invalid(format!(
                "L2 table at offset {l2_offset} (L1 index {l1_index}) lies beyond the end of the file ({size} bytes)"
            )));
        }
        let file = &*self.files[0];
        self.cache.load(self.owner, l2_offset, fetch, || {
            read_vec(file, "L2 table", l2_offset, cs)
        })
    }

    /// The host cluster of a standard (uncompressed) L2 entry, or `None` if it has none.
    fn host_cluster(&self, entry: u64, guest_cluster: u64) -> Result<Option<u64>> {
        let host = entry & OFFSET_MASK;
        if host == 0 && !(self.has_data_file() && entry & COPIED != 0) {
            return Ok(None);
        }
        if host & (self.cluster_size - 1) != 0 {
            return Err(self.invalid(format!(
                "the data cluster of guest offset {guest_cluster} is at unaligned host offset {host:#x}"
            )));
        }
        if self.has_data_file() && host != guest_cluster {
            return Err(self.invalid(format!(
                "the data file offset {host:#x} of guest offset {guest_cluster:#x} differs from it"
            )));
        }
        Ok(Some(host))
    }

    /// Appends `length` bytes at `run`, splitting data at the end of the file and merging
    /// with the previous segment of this call (index `first` onwards) when contiguous.
    fn push(
        &self,
        out: &mut Vec<Segment>,
        first: usize,
        guest: u64,
        length: u64,
        run: Run,
    ) -> Result<()> {
        let kind = match run {
            Run::Data { file, host } => {
                let size = self.files[file].size();
                if host >= size {
                    return Err(self.invalid(format!(
                        "the data of guest offset {guest} at host offset {host} lies beyond the end of {} ({size} bytes)",
                        self.files[file].name()
                    )));
                }
                if host + length > size {
                    // qemu reads zeroes past the end of the file inside a cluster.
                    let inside = size - host;
                    self.push(out, first, guest, inside, run)?;
                    return self.push(out, first, guest + inside, length - inside, Run::Zero);
                }
                SegmentKind::Data {
                    file,
                    offset: host,
                    raw: false,
                }
            }
            Run::Zero => SegmentKind::Zero,
            Run::Backing => SegmentKind::Backing,
        };
        push_segment(out, first, Segment { length, kind });
        Ok(())
    }

    /// Maps `[pos, end)` (inside one cluster) of an extended L2 entry `(entry, bitmap)`.
    fn map_subclusters(
        &self,
        (entry, bitmap): (u64, u64),
        (cluster_start, mut pos, end): (u64, u64, u64),
        first: usize,
        out: &mut Vec<Segment>,
    ) -> Result<()> {
        let alloc = bitmap as u32;
        let zero = (bitmap >> 32) as u32;
        if alloc & zero != 0 {
            return Err(self.invalid(format!(
                "the extended L2 entry of guest offset {cluster_start} marks subclusters both allocated and zero (bitmap {bitmap:#018x})"
            )));
        }
        let host = self.host_cluster(entry, cluster_start)?;
        if host.is_none() && alloc != 0 {
            return Err(self.invalid(format!(
                "the extended L2 entry of guest offset {cluster_start} allocates subclusters but has no host offset"
            )));
        }
        let sub = self.cluster_size / SUBCLUSTERS;
        while pos < end {
            let index = (pos - cluster_start) / sub;
            let bit = 1u32 << index;
            // The run continues while the next subclusters have the same state.
            let state = (alloc & bit != 0, zero & bit != 0);
            let mut next = index + 1;
            while next < SUBCLUSTERS && ((alloc >> next) & 1 != 0, (zero >> next) & 1 != 0) == state
            {
                next += 1;
            }
            let run_end = (cluster_start + next * sub).min(end);
            let run = match (state, host) {
                ((_, true), _) => Run::Zero,
                ((true, _), Some(h)) => Run::Data {
                    file: self.data_index,
                    host: h + (pos - cluster_start),
                },
                _ => Run::Backing,
            };
            self.push(out, first, pos, run_end - pos, run)?;
            pos = run_end;
        }
        Ok(())
    }
}

impl Layer for Qcow2Layer {
    fn format(&self) -> Format {
        Format::Qcow2
    }

    fn virtual_size(&self) -> u64 {
        match &self.live {
            Some(live) => live.size(),
            None => self.header.raw.size,
        }
    }

    fn files(&self) -> &[Arc<dyn Storage>] {
        &self.files
    }

    fn backing(&self) -> Option<&Backing> {
        self.backing.as_ref()
    }

    fn info(&self) -> LayerInfo {
        let h = &self.header;
        let raw = &h.raw;
        let mut features = Vec::new();
        let mut add = |on: bool, name: &str| {
            if on {
                features.push(name.to_owned());
            }
        };
        add(
            raw.compatible & COMPAT_LAZY_REFCOUNTS != 0,
            "lazy_refcounts",
        );
        add(self.extended, "extended_l2");
        add(h.compression_type == 1, "zstd");
        add(self.has_data_file(), "external_data_file");
        add(
            raw.autoclear & AUTOCLEAR_DATA_FILE_RAW != 0,
            "data_file_raw",
        );
        add(!h.bitmaps.is_empty(), "bitmaps");
        add(!h.snapshots.is_empty(), "snapshots");
        let mut details = vec![
            (
                "refcount bits".to_owned(),
                (1u64 << raw.refcount_order).to_string(),
            ),
            ("L1 entries".to_owned(), raw.l1_size.to_string()),
            (
                "compression type".to_owned(),
                if h.compression_type == 1 {
                    "zstd"
                } else {
                    "deflate"
                }
                .to_owned(),
            ),
        ];
        if !h.snapshots.is_empty() {
            details.push(("snapshots".to_owned(), h.snapshots.len().to_string()));
            let names: Vec<String> = h
                .snapshots
                .iter()
                .map(|s| format!("{} (id {})", s.name, s.id))
                .collect();
            details.push(("snapshot names".to_owned(), names.join(", ")));
        }
        if !h.bitmaps.is_empty() {
            details.push(("bitmaps".to_owned(), h.bitmaps.len().to_string()));
            let names: Vec<&str> = h.bitmaps.iter().map(|b| b.name.as_str()).collect();
            details.push(("bitmap names".to_owned(), names.join(", ")));
        }
        if let Some(name) = &h.data_file {
            details.push(("data file".to_owned(), name.clone()));
        }
        if let Some(name) = &h.backing_name {
            details.push(("backing file".to_owned(), name.clone()));
            details.push((
                "backing format".to_owned(),
                h.backing_format
                    .clone()
                    .unwrap_or_else(|| "(not declared)".to_owned()),
            ));
        }
        if !h.extensions.is_empty() {
            details.push(("header extensions".to_owned(), h.extensions.join(", ")));
        }
        LayerInfo {
            format: Format::Qcow2,
            subformat: Some(if raw.version == 2 { "v2" } else { "v3" }.to_owned()),
            path: self.name().to_owned(),
            virtual_size: self.virtual_size(),
            file_size: self.files[0].size(),
            cluster_size: Some(self.cluster_size),
            features,
            dirty: raw.incompatible & INCOMPAT_DIRTY != 0,
            corrupt: raw.incompatible & INCOMPAT_CORRUPT != 0,
            details,
        }
    }

    fn map(&self, offset: u64, length: u64, fetch: Fetch, out: &mut Vec<Segment>) -> Result<()> {
        let l1_index = offset >> self.l1_bits;
        let table_end = (l1_index + 1) << self.l1_bits;
        let size = self.virtual_size();
        let end = offset.saturating_add(length).min(table_end).min(size);
        if end <= offset {
            return Err(self.invalid(format!(
                "mapping at guest offset {offset} beyond the virtual size {size}"
            )));
        }
        let l1_entry = match &self.live {
            Some(live) => live.l1_entry(l1_index),
            None => self.l1.get(l1_index as usize).copied().unwrap_or(0),
        };
        let l2_offset = l1_entry & OFFSET_MASK;
        if l2_offset == 0 {
            out.push(Segment {
                length: end - offset,
                kind: SegmentKind::Backing,
            });
            return Ok(());
        }
        let l2 = self.l2_table(l2_offset, l1_index, fetch)?;
        let cs = self.cluster_size;
        let index_mask = (1u64 << (self.l1_bits - self.cluster_bits)) - 1;
        let first = out.len();
        let mut pos = offset;
        while pos < end {
            let cluster_start = pos & !(cs - 1);
            let cluster_end = (cluster_start + cs).min(end);
            let at = ((pos >> self.cluster_bits) & index_mask) as usize * self.entry_size;
            let entry = be64(&l2, at);
            if entry & COMPRESSED != 0 {
                self.push_compressed(entry, cluster_start, pos, cluster_end, out)?;
            } else if self.extended {
                let bitmap = be64(&l2, at + 8);
                let span = (cluster_start, pos, cluster_end);
                self.map_subclusters((entry, bitmap), span, first, out)?;
            } else {
                let run = if entry & ZERO_FLAG != 0 {
                    if self.header.raw.version < 3 {
                        return Err(self.invalid(format!(
                            "zero cluster entry at guest offset {cluster_start} in a \
                             version 2 image (L2 table {l2_offset:#x})"
                        )));
                    }
                    Run::Zero
                } else {
                    match self.host_cluster(entry, cluster_start)? {
                        None => Run::Backing,
                        Some(host) => Run::Data {
                            file: self.data_index,
                            host: host + (pos - cluster_start),
                        },
                    }
                };
                self.push(out, first, pos, cluster_end - pos, run)?;
            }
            pos = cluster_end;
        }
        Ok(())
    }

    fn check(&self, report: &mut CheckReport) -> Result<()> {
        check::check(self, report)
    }
}

impl Qcow2Layer {
    /// Host offset and length bound of a compressed cluster's stream.
    fn compressed_extent(&self, entry: u64) -> (u64, u64) {
        let x = 62 - (self.cluster_bits - 8);
        let offset = entry & ((1u64 << x) - 1);
        let sectors = (entry & (COMPRESSED - 1)) >> x;
        (offset, (sectors + 1) * 512 - (offset & 511))
    }

    fn push_compressed(
        &self,
        entry: u64,
        cluster_start: u64,
        pos: u64,
        end: u64,
        out: &mut Vec<Segment>,
    ) -> Result<()> {
        if self.has_data_file() {
            return Err(self.invalid(format!(
                "compressed cluster at guest offset {cluster_start} in an image with an external data file"
            )));
        }
        let (offset, compressed_length) = self.compressed_extent(entry);
        let size = self.files[0].size();
        if offset >= size {
            return Err(self.invalid(format!(
                "the compressed cluster of guest offset {cluster_start} at offset {offset} lies beyond the end of the file ({size} bytes)"
            )));
        }
        out.push(Segment {
            length: end - pos,
            kind: SegmentKind::Compressed {
                file: 0,
                offset,
                compressed_length,
                compression: self.compression,
                unit_size: self.cluster_size,
                skip: pos - cluster_start,
            },
        });
        Ok(())
    }

    /// Reads `length` bytes of metadata at `offset` of the image file.
    fn read_meta(&self, what: &'static str, offset: u64, length: u64) -> Result<Vec<u8>> {
        read_vec(&*self.files[0], what, offset, length)
    }
}

/// The file of an image open for writing, as the read side sees it: its size grows as
/// the writer writes, and its data is read from the same descriptor.
#[derive(Debug)]
struct LiveStorage {
    file: Arc<std::fs::File>,
    name: String,
    size: Arc<AtomicU64>,
    /// The same file opened read-only, to resolve related names (the backing file).
    related: FileStorage,
}

impl Storage for LiveStorage {
    fn name(&self) -> &str {
        &self.name
    }

    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        use std::os::unix::fs::FileExt;
        self.file.read_at(buf, offset)
    }

    fn open_related(&self, name: &str) -> Result<Arc<dyn Storage>> {
        self.related.open_related(name)
    }

    fn identity(&self) -> String {
        self.related.identity()
    }

    fn data_path(&self) -> DataPath {
        DataPath::File(Arc::clone(&self.file))
    }
}

/// Opens the qcow2 image at `path` for writing: locks it (compatibly with qemu), then
/// returns the layer that reads it (with every write visible at once) and the writer.
/// `budget` bounds the clean metadata tables the writer keeps in memory.
///
/// Refused: images marked corrupt, dirty or with lazy refcounts (`thinline image check
/// --repair` first), external data files, encryption and unknown features. Autoclear
/// features (bitmaps) are cleared before anything is written, as the spec asks of a
/// writer that does not maintain them.
pub fn open_writable(
    path: &Path,
    ctx: &OpenContext,
    budget: usize,
) -> Result<(Qcow2Layer, Qcow2Writer)> {
    let name = path.display().to_string();
    let (file, meta, image_lock) = lock::open_locked(path, &name)?;
    let file = Arc::new(file);
    let len = if meta.file_type().is_file() {
        meta.len()
    } else {
        rustix::fs::seek(&*file, rustix::fs::SeekFrom::End(0)).map_err(|e| Error::Open {
            path: name.clone(),
            source: e.into(),
        })?
    };
    let file_size = Arc::new(AtomicU64::new(len));
    let storage = Arc::new(LiveStorage {
        file: file.clone(),
        name: name.clone(),
        size: file_size.clone(),
        related: FileStorage::open_file(path)?,
    });
    let header = Header::read(&*storage)?;
    let raw = header.raw;
    let refuse = |reason: &str| Error::Locked {
        path: name.clone(),
        reason: reason.to_owned(),
    };
    if raw.incompatible & INCOMPAT_CORRUPT != 0 {
        return Err(refuse(
            "the image is marked corrupt; check it with `thinline image check` and copy its data out",
        ));
    }
    if raw.incompatible & INCOMPAT_DIRTY != 0 || raw.compatible & COMPAT_LAZY_REFCOUNTS != 0 {
        return Err(refuse(
            "the image is dirty or uses lazy refcounts, so its refcounts may be stale; \
             run `thinline image check --repair` on it first",
        ));
    }
    if header.data_file.is_some() {
        return Err(refuse(
            "images with an external data file are served read-only",
        ));
    }
    let cs = header.cluster_size;
    let table = read_vec(
        &*storage,
        "refcount table",
        raw.refcount_table_offset,
        u64::from(raw.refcount_table_clusters) * cs,
    )?;
    let reftable: Vec<u64> = table.chunks_exact(8).map(|c| be64(c, 0)).collect();
    let l1_raw = read_vec(
        &*storage,
        "L1 table",
        raw.l1_table_offset,
        u64::from(raw.l1_size) * 8,
    )?;
    let l1: Vec<u64> = l1_raw.chunks_exact(8).map(|c| be64(c, 0)).collect();
    if raw.autoclear != 0 {
        use std::os::unix::fs::FileExt;
        let io = || Error::io_at(&name, "clear autoclear features", 88, 8);
        file.write_all_at(&[0u8; 8], 88).map_err(io())?;
        file.sync_data().map_err(io())?;
    }
    let extended = raw.incompatible & INCOMPAT_EXTENDED_L2 != 0;
    let geo = Geometry {
        cluster_bits: raw.cluster_bits,
        cluster_size: cs,
        extended,
        entry_size: if extended { 16 } else { 8 },
        l1_bits: raw.cluster_bits * 2 - if extended { 4 } else { 3 },
        refcount_order: raw.refcount_order,
        version: raw.version,
        compression: if header.compression_type == 1 {
            Compression::Zstd
        } else {
            Compression::Deflate
        },
    };
    let live = Arc::new(Live::new(
        name,
        file,
        cs,
        raw.size,
        file_size,
        live::Tables {
            l1,
            l1_offset: raw.l1_table_offset,
            reftable,
            reftable_offset: raw.refcount_table_offset,
            alloc_end: len.div_ceil(cs),
            metadata: metadata_ranges(&header),
        },
        budget,
    ));
    let layer = Qcow2Layer::from_header(storage, header, ctx, Some(live.clone()))?;
    Ok((layer, Qcow2Writer::new(live, geo, image_lock)))
}

/// Where the image's metadata lies besides the active L1 and refcount tables (and what
/// they point at): the header cluster, the snapshot table and every snapshot's L1
/// table, the bitmap directory and every bitmap's table.
fn metadata_ranges(header: &Header) -> Vec<(u64, u64)> {
    let mut ranges = vec![(0, header.cluster_size)];
    if header.snapshot_table_len > 0 {
        ranges.push((header.raw.snapshots_offset, header.snapshot_table_len));
    }
    for s in &header.snapshots {
        ranges.push((s.l1_offset, u64::from(s.l1_size) * 8));
    }
    if let Some(d) = header.bitmap_directory {
        ranges.push((d.offset, d.size));
    }
    for b in &header.bitmaps {
        ranges.push((b.table_offset, u64::from(b.table_size) * 8));
    }
    ranges.retain(|&(_, len)| len > 0);
    ranges
}

#[cfg(test)]
mod tests;
