//! What every image format implements: a [`Layer`] that maps guest ranges to plans.
//!
//! A layer never reads guest data itself. [`Layer::map`] describes where each byte of a
//! range is — at a host offset in one of the layer's files, compressed at a host offset,
//! zero, or not here (ask the backing layer) — and the caller executes that plan with
//! whatever I/O it has (the sync reader of the chain module, io_uring in the NBD server).
//! Only metadata (headers, tables, bitmaps) is read inside the format code, through
//! [`Storage`] and the shared [`MetadataCache`].

use std::fmt;
use std::sync::Arc;

use serde::Serialize;

use crate::Result;
pub use crate::cache::Fetch;
use crate::cache::MetadataCache;
use crate::storage::Storage;

/// The image formats Thinline reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Bytes as they are; allocation from `SEEK_DATA`/`SEEK_HOLE`.
    Raw,
    /// QEMU copy-on-write v2 and v3.
    Qcow2,
    /// Microsoft Virtual Hard Disk (fixed, dynamic, differencing); qemu calls it `vpc`.
    Vhd,
    /// VMware virtual disk (descriptor + extents, sparse, streamOptimized, seSparse).
    Vmdk,
}

impl Format {
    /// The lower-case name (`raw`, `qcow2`, `vhd`, `vmdk`).
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Vhd => "vhd",
            Format::Vmdk => "vmdk",
        }
    }

    /// Parses a format name as qemu spells it too (`vpc` is VHD).
    pub fn from_name(name: &str) -> Option<Format> {
        match name.to_ascii_lowercase().as_str() {
            "raw" | "file" => Some(Format::Raw),
            "qcow2" => Some(Format::Qcow2),
            "vhd" | "vpc" => Some(Format::Vhd),
            "vmdk" => Some(Format::Vmdk),
            _ => None,
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How compressed data is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Raw RFC 1951 deflate, no header (qcow2 compression type 0).
    Deflate,
    /// RFC 1950 zlib stream (VMDK grains).
    Zlib,
    /// A zstd frame (qcow2 compression type 1).
    Zstd,
}

/// Where the bytes of one [`Segment`] are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentKind {
    /// Stored as-is at `offset` in `files()[file]`.
    Data {
        /// Index into [`Layer::files`].
        file: usize,
        /// Host offset of the segment's first byte.
        offset: u64,
        /// The layer is a byte-for-byte view of the file here (raw images, VMDK flat
        /// extents): a hole in the file is a hole of the image. Otherwise a hole under
        /// allocated data reads as zeroes but stays allocated (qemu reports such ranges
        /// as data that reads as zero).
        raw: bool,
    },
    /// Inside a compressed unit (a qcow2 cluster, a VMDK grain): decompress the
    /// `compressed_length` bytes at `offset` in `files()[file]` into `unit_size` bytes
    /// and take this segment from `skip` onwards.
    Compressed {
        /// Index into [`Layer::files`].
        file: usize,
        /// Host offset of the compressed stream.
        offset: u64,
        /// Upper bound of the compressed stream's length (it may run past its end,
        /// never past the end of the file).
        compressed_length: u64,
        /// Encoding.
        compression: Compression,
        /// Size of the decompressed unit.
        unit_size: u64,
        /// Offset of the segment's first byte inside the decompressed unit.
        skip: u64,
    },
    /// Reads as zeroes, provided by this layer (a zero cluster, a zeroed grain, an
    /// unallocated block of a disk that cannot have a parent).
    Zero,
    /// Not allocated in this layer: the bytes come from the backing layer, or read as
    /// zeroes if there is none.
    Backing,
}

/// `length` guest bytes whose location is `kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Bytes covered.
    pub length: u64,
    /// Where they are.
    pub kind: SegmentKind,
}

/// Appends `segment` to `out`, merging it into the last segment when that one was
/// pushed by the same `map` call (`out.len() > first`) and `segment` continues it: the
/// same kind, and for data the same file and the next host byte. Every format's `map`
/// uses this, so plans come out as few, long segments.
pub fn push_segment(out: &mut Vec<Segment>, first: usize, segment: Segment) {
    if segment.length == 0 {
        return;
    }
    if out.len() > first
        && let Some(last) = out.last_mut()
    {
        let continues = match (last.kind, segment.kind) {
            (SegmentKind::Zero, SegmentKind::Zero)
            | (SegmentKind::Backing, SegmentKind::Backing) => true,
            (
                SegmentKind::Data {
                    file: f1,
                    offset: o1,
                    raw: r1,
                },
                SegmentKind::Data {
                    file: f2,
                    offset: o2,
                    raw: r2,
                },
            ) => f1 == f2 && r1 == r2 && o1 + last.length == o2,
            _ => false,
        };
        if continues {
            last.length += segment.length;
            return;
        }
    }
    out.push(segment);
}

/// The identity a child expects of its parent, checked when a chain is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ParentIdentity {
    /// A VHD's footer UUID (a differencing child stores its parent's).
    VhdUuid([u8; 16]),
    /// A VMDK descriptor's `CID` (a delta child stores it as `parentCID`).
    VmdkCid(u32),
}

/// A layer's reference to its backing (parent) image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backing {
    /// Names to try in order (VHD parent locators give several); relative names are
    /// relative to the child's directory.
    pub names: Vec<String>,
    /// The parent's format when the child declares it (qcow2's backing-format
    /// extension; implied for VHD and VMDK parents). `None`: not declared.
    pub format: Option<Format>,
    /// What the parent's [`Layer::identity`] must be, if the format records it.
    pub expect: Option<ParentIdentity>,
}

/// A description of one layer for `image info` and `image check`.
#[derive(Debug, Clone, Serialize)]
pub struct LayerInfo {
    /// The image's format.
    pub format: Format,
    /// The sub-format (`dynamic`, `streamOptimized`, `v3`, …), if the format has them.
    pub subformat: Option<String>,
    /// File or URI.
    pub path: String,
    /// Guest-visible size in bytes.
    pub virtual_size: u64,
    /// Size of the file itself.
    pub file_size: u64,
    /// Allocation unit: cluster, grain or block size, in bytes.
    pub cluster_size: Option<u64>,
    /// Named features in use (`lazy_refcounts`, `extended_l2`, `zstd`, …).
    pub features: Vec<String>,
    /// The image was not closed cleanly (qcow2 dirty bit, VMDK uncleanShutdown).
    pub dirty: bool,
    /// The image is marked corrupt (qcow2); it is still served read-only.
    pub corrupt: bool,
    /// Other facts worth showing, as ordered key/value pairs.
    pub details: Vec<(String, String)>,
}

/// What `image check` found in one layer.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CheckReport {
    /// Inconsistencies that make data wrong or unreadable.
    pub errors: Vec<String>,
    /// Inconsistencies that do not affect reads (leaked clusters, stale refcounts).
    pub warnings: Vec<String>,
    /// Counts worth showing (allocated clusters, compressed clusters, …).
    pub stats: Vec<(String, u64)>,
}

/// One image file (plus the files it owns) of a chain.
pub trait Layer: Send + Sync + fmt::Debug {
    /// The format.
    fn format(&self) -> Format;

    /// Guest-visible size in bytes.
    fn virtual_size(&self) -> u64;

    /// The files segments refer to by index; `files()[0]` is the image itself.
    fn files(&self) -> &[Arc<dyn Storage>];

    /// The backing (parent) image, if any.
    fn backing(&self) -> Option<&Backing>;

    /// The identity a child may record for this layer.
    fn identity(&self) -> Option<ParentIdentity> {
        None
    }

    /// A description for `image info`.
    fn info(&self) -> LayerInfo;

    /// Appends segments describing `[offset, offset + length)` (inside the virtual
    /// size, `length > 0`). The segments start at `offset` and are contiguous; they
    /// cover at least one byte and at most `length` (callers loop for the rest).
    fn map(&self, offset: u64, length: u64, fetch: Fetch, out: &mut Vec<Segment>) -> Result<()>;

    /// A read-only consistency check of the layer's metadata.
    fn check(&self, report: &mut CheckReport) -> Result<()>;
}

/// Everything a format's `open` needs besides the file.
#[derive(Debug, Clone)]
pub struct OpenContext {
    /// The chain-wide metadata cache.
    pub cache: Arc<MetadataCache>,
}
