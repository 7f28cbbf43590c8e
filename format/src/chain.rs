//! An opened image: the top layer and its backing chain, mapped and read as one disk.
//!
//! [`Image::open`] detects the top image's format (or takes it from the caller), then
//! follows backing references: the parent's format comes from the child (qcow2's
//! backing-format extension; VHD and VMDK parents are their own format), never from
//! the parent's content; relative names resolve against the child's directory; loops,
//! chains deeper than [`MAX_CHAIN_DEPTH`] and parents whose identity does not match
//! what the child recorded (VHD UUID, VMDK CID) are refused.
//!
//! [`Image::map`] resolves a guest range through the chain into [`Extent`]s: the plan
//! the I/O layers execute. [`Image::read`] executes it synchronously (for `convert`,
//! tests and fuzzing); [`Image::allocation`] turns it into block status.

use std::collections::HashSet;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

use crate::cache::{DEFAULT_BUDGET, MetadataCache};
use crate::compress::decompress;
use crate::layer::{
    CheckReport, Compression, Fetch, Format, Layer, LayerInfo, OpenContext, Segment, SegmentKind,
};
use crate::storage::{FileStorage, Storage, read_exact};
use crate::{Error, Result, qcow2, raw, vhd, vmdk};

/// Clean tables a writable image keeps in memory at most (dirty ones come on top,
/// up to [`qcow2::DIRTY_LIMIT`]).
pub const WRITER_TABLE_BUDGET: usize = 16 << 20;

/// Longest backing chain opened (the top image counts): deep enough for any real
/// snapshot chain, short enough that a hostile chain cannot exhaust file descriptors.
pub const MAX_CHAIN_DEPTH: usize = 16;

/// What to do with a qcow2 backing file whose format the overlay does not declare.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum UndeclaredBacking {
    /// Refuse to open the chain (the default): guessing the format from the backing
    /// file's content lets a guest that wrote a qcow2 header into a raw disk make the
    /// host read arbitrary files, and treating a qcow2 backing as raw serves metadata
    /// as data. `qemu-img rebase -u -F FORMAT` fixes the image.
    #[default]
    Refuse,
    /// Treat the backing file as raw, as qemu did before it required `-F`.
    Raw,
}

/// Opens backing names that are URIs under prefixes the operator registered
/// (`--allow-backing`, or an agent's own records). It returns `None` for a name it does
/// not take; such names are opened by the child's storage, which refuses URIs: an image
/// alone never makes the host fetch from an address it chose.
#[derive(Clone)]
#[allow(clippy::type_complexity)]
pub struct BackingOpener(pub Arc<dyn Fn(&str) -> Option<Result<Arc<dyn Storage>>> + Send + Sync>);

impl fmt::Debug for BackingOpener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BackingOpener")
    }
}

/// How to open an image.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// The top image's format; `None` detects it from the content.
    pub format: Option<Format>,
    /// Longest chain accepted.
    pub max_depth: usize,
    /// Bytes of metadata tables kept in memory for the whole chain.
    pub cache_budget: usize,
    /// Policy for qcow2 backing files without a declared format.
    pub undeclared_backing: UndeclaredBacking,
    /// Backing names (URIs) the operator allowed, opened before the child's storage is
    /// asked.
    pub backing_opener: Option<BackingOpener>,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            format: None,
            max_depth: MAX_CHAIN_DEPTH,
            cache_budget: DEFAULT_BUDGET,
            undeclared_backing: UndeclaredBacking::Refuse,
            backing_opener: None,
        }
    }
}

/// Where the bytes of one [`Extent`] are, resolved through the chain. `layer` indexes
/// [`Image::layers`] (0 is the top image).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// Stored as-is at `offset` in `layers[layer].files()[file]`.
    Data {
        /// The layer holding the data.
        layer: usize,
        /// Index into that layer's files.
        file: usize,
        /// Host offset.
        offset: u64,
        /// Holes of the file are holes of the image (see [`SegmentKind::Data`]).
        raw: bool,
    },
    /// Inside a compressed unit; see [`SegmentKind::Compressed`].
    Compressed {
        /// The layer holding the data.
        layer: usize,
        /// Index into that layer's files.
        file: usize,
        /// Host offset of the compressed stream.
        offset: u64,
        /// Upper bound of the stream's length.
        compressed_length: u64,
        /// Encoding.
        compression: Compression,
        /// Decompressed unit size.
        unit_size: u64,
        /// Offset of the extent inside the decompressed unit.
        skip: u64,
    },
    /// Reads as zeroes because `layer` says so.
    Zero {
        /// The layer providing the zeroes.
        layer: usize,
    },
    /// Allocated in no layer: reads as zeroes.
    Unallocated,
}

/// `length` guest bytes at one [`Place`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Bytes covered.
    pub length: u64,
    /// Where they are.
    pub place: Place,
}

impl Extent {
    /// The `qemu:allocation-depth` of the extent: 1 for the top image, 2 for its
    /// backing, …, 0 when no layer allocates it.
    pub fn depth(&self) -> u32 {
        match self.place {
            Place::Data { layer, .. } | Place::Compressed { layer, .. } | Place::Zero { layer } => {
                layer as u32 + 1
            }
            Place::Unallocated => 0,
        }
    }

    /// True if the extent reads as zeroes without any I/O.
    pub fn is_zero(&self) -> bool {
        matches!(self.place, Place::Zero { .. } | Place::Unallocated)
    }
}

/// Largest decompressed unit accepted (qcow2 clusters are at most 2 MiB, VMDK grains
/// far less); a plan naming a larger one is refused.
pub const MAX_UNIT_SIZE: u64 = 64 << 20;

/// How to decode one [`Place::Compressed`] extent, checked against its unit: read
/// `length` bytes at `offset` in `layers[layer].files()[file]`, then hand them to
/// [`Image::decode_unit`] (see [`Image::compressed_input`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompressedInput {
    /// The layer holding the data.
    pub layer: usize,
    /// Index into that layer's files.
    pub file: usize,
    /// Host offset of the compressed stream.
    pub offset: u64,
    /// Bytes to read: the stream's bound, cut at the end of the file.
    pub length: usize,
    compression: Compression,
    /// Bytes of the unit to decode: up to the extent's end.
    decoded: usize,
    /// Bytes of the whole unit.
    unit: usize,
}

impl CompressedInput {
    /// Bytes [`Image::decode_unit`] produces for this input.
    pub fn decoded_len(&self) -> usize {
        self.decoded
    }

    /// Whether decoding only up to the extent's end costs less than decoding the whole
    /// unit: true for deflate, which stops where it is told; false for zstd, which decodes
    /// a whole block (a qcow2 cluster is one) before it hands out any of it.
    pub fn partial_decode_is_cheaper(&self) -> bool {
        !matches!(self.compression, Compression::Zstd)
    }

    /// The same input decoding its whole unit instead of stopping at the extent's end,
    /// for a caller that keeps the unit to serve reads of its other blocks. A unit whose
    /// stream ends before the unit does (which a partial decode may never notice) fails
    /// to decode this way.
    pub fn whole_unit(&self) -> CompressedInput {
        CompressedInput {
            decoded: self.unit,
            ..*self
        }
    }
}

/// Block status of a range: `base:allocation` flags plus allocation depth.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Allocation {
    /// Bytes covered.
    pub length: u64,
    /// No storage is allocated (`NBD_STATE_HOLE`).
    pub hole: bool,
    /// Reads as zeroes (`NBD_STATE_ZERO`).
    pub zero: bool,
    /// 0 = allocated in no layer, 1 = the top image, 2 = its backing, …
    pub depth: u32,
}

/// An image and its backing chain, opened read-only.
#[derive(Debug)]
pub struct Image {
    layers: Vec<Box<dyn Layer>>,
    cache: Arc<MetadataCache>,
}

/// Format detection reads this many bytes at offset 0.
pub const PROBE_HEAD_LEN: u64 = 64;
/// ... and, in files of at least [`PROBE_TAIL_MIN_SIZE`] bytes, this many at
/// `size - PROBE_TAIL_FROM_END` (a fixed VHD's footer).
pub const PROBE_TAIL_LEN: u64 = 8;
/// Where the tail probe starts, counted from the end.
pub const PROBE_TAIL_FROM_END: u64 = 512;
/// Smallest file whose tail is probed.
pub const PROBE_TAIL_MIN_SIZE: u64 = 1024;

/// What format detection makes of a file's probed bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probed {
    /// A format Thinline reads ([`Format::Raw`] when nothing else matched).
    Format(Format),
    /// A format Thinline refuses: its name and why.
    Refused(&'static str, &'static str),
}

/// Recognises a format from the first [`PROBE_HEAD_LEN`] bytes of a file (`head`, fewer
/// if the file is shorter) and, for files of at least [`PROBE_TAIL_MIN_SIZE`] bytes, the
/// [`PROBE_TAIL_LEN`] bytes at `size - PROBE_TAIL_FROM_END` (`tail`). Pure, so a writer
/// can ask what a write would turn a raw file into before making it.
pub fn probe(head: &[u8], tail: Option<&[u8]>) -> Probed {
    if head.starts_with(b"QFI\xfb") {
        return Probed::Format(Format::Qcow2);
    }
    if head.starts_with(b"conectix") {
        return Probed::Format(Format::Vhd);
    }
    if head.starts_with(b"KDMV")
        || head.starts_with(b"COWD")
        || head.starts_with(&0xcafe_babe_u32.to_le_bytes())
        || head.starts_with(b"# Disk DescriptorFile")
        || head.starts_with(b"# Disk Descriptor File")
    {
        return Probed::Format(Format::Vmdk);
    }
    if head.starts_with(b"vhdxfile") {
        return Probed::Refused(
            "vhdx",
            "VHDX images are not supported; convert with `qemu-img convert -O qcow2`",
        );
    }
    if head.starts_with(b"LUKS\xba\xbe") {
        return Probed::Refused(
            "luks",
            "the file is LUKS-encrypted; Thinline never serves ciphertext",
        );
    }
    if tail == Some(b"conectix".as_slice()) {
        return Probed::Format(Format::Vhd);
    }
    Probed::Format(Format::Raw)
}

/// Recognises a format from the first bytes of a file (and the last 512 for fixed VHD).
pub fn detect(storage: &dyn Storage) -> Result<Format> {
    let mut head = [0u8; PROBE_HEAD_LEN as usize];
    let n = (storage.size().min(PROBE_HEAD_LEN)) as usize;
    read_exact(storage, "format magic", &mut head[..n], 0)?;
    let mut tail = [0u8; PROBE_TAIL_LEN as usize];
    let tail = if storage.size() >= PROBE_TAIL_MIN_SIZE {
        read_exact(
            storage,
            "VHD footer",
            &mut tail,
            storage.size() - PROBE_TAIL_FROM_END,
        )?;
        Some(&tail[..])
    } else {
        None
    };
    match probe(&head[..n], tail) {
        Probed::Format(format) => Ok(format),
        Probed::Refused(format, reason) => Err(Error::unsupported(storage.name(), format, reason)),
    }
}

fn open_layer(
    storage: Arc<dyn Storage>,
    format: Format,
    ctx: &OpenContext,
) -> Result<Box<dyn Layer>> {
    Ok(match format {
        Format::Raw => Box::new(raw::RawLayer::open(storage)),
        Format::Qcow2 => qcow2::open(storage, ctx)?,
        Format::Vhd => vhd::open(storage, ctx)?,
        Format::Vmdk => vmdk::open(storage, ctx)?,
    })
}

fn bad_plan(layer: &dyn Layer, offset: u64, why: &str) -> Error {
    Error::invalid(
        layer.files()[0].name(),
        layer.format().name(),
        format!("mapping at guest offset {offset} failed: {why}"),
    )
}

impl Image {
    /// Opens the image at `path` and its backing chain.
    pub fn open(path: &Path, options: &OpenOptions) -> Result<Image> {
        Image::open_storage(FileStorage::open(path)?, options)
    }

    /// Opens the image in `storage` and its backing chain.
    pub fn open_storage(storage: Arc<dyn Storage>, options: &OpenOptions) -> Result<Image> {
        let cache = MetadataCache::new(options.cache_budget);
        let ctx = OpenContext {
            cache: cache.clone(),
        };
        let format = match options.format {
            Some(format) => format,
            None => detect(&*storage)?,
        };
        let top = open_layer(storage, format, &ctx)?;
        Image::from_top(top, ctx, options)
    }

    /// Opens the qcow2 image at `path` for writing, and its backing chain read-only.
    /// Returns the image (whose reads see every write at once) and its writer; the
    /// writer reads the chain below the top through the image ([`qcow2::Below`]).
    pub fn open_writable(
        path: &Path,
        options: &OpenOptions,
    ) -> Result<(Image, Arc<qcow2::Qcow2Writer>)> {
        let cache = MetadataCache::new(options.cache_budget);
        let ctx = OpenContext {
            cache: cache.clone(),
        };
        let storage = FileStorage::open(path)?;
        let format = match options.format {
            Some(format) => format,
            None => detect(&*storage)?,
        };
        if format != Format::Qcow2 {
            return Err(Error::unsupported(
                &path.display().to_string(),
                format.name(),
                "only qcow2 images are written (serve raw files as they are; convert other formats to qcow2)",
            ));
        }
        drop(storage);
        let (top, writer) =
            qcow2::open_writable(path, &ctx, options.cache_budget.min(WRITER_TABLE_BUDGET))?;
        let image = Image::from_top(Box::new(top), ctx, options)?;
        Ok((image, Arc::new(writer)))
    }

    /// The chain under `top`, opened by following backing references.
    fn from_top(top: Box<dyn Layer>, ctx: OpenContext, options: &OpenOptions) -> Result<Image> {
        let cache = ctx.cache.clone();
        let mut seen = HashSet::new();
        seen.insert(top.files()[0].identity());
        let mut layers = vec![top];
        loop {
            let child = layers.last().expect("at least the top layer");
            let Some(backing) = child.backing().cloned() else {
                break;
            };
            let child_name = child.files()[0].name().to_owned();
            if layers.len() >= options.max_depth {
                return Err(Error::chain(
                    &child_name,
                    format!(
                        "the chain is deeper than the limit of {} images",
                        options.max_depth
                    ),
                ));
            }
            let format = match (backing.format, options.undeclared_backing) {
                (Some(format), _) => format,
                (None, UndeclaredBacking::Raw) => Format::Raw,
                (None, UndeclaredBacking::Refuse) => {
                    return Err(Error::chain(
                        &child_name,
                        format!(
                            "the backing file {:?} has no declared format and Thinline does not guess \
                             formats from content; declare it with `qemu-img rebase -u -b NAME -F FORMAT`",
                            backing.names.first().map(String::as_str).unwrap_or("")
                        ),
                    ));
                }
            };
            let mut failures = Vec::new();
            let mut parent_storage = None;
            for name in &backing.names {
                let allowed = options.backing_opener.as_ref().and_then(|o| (o.0)(name));
                match allowed.unwrap_or_else(|| child.files()[0].open_related(name)) {
                    Ok(s) => {
                        parent_storage = Some(s);
                        break;
                    }
                    Err(e) => failures.push(e.detail()),
                }
            }
            let Some(parent_storage) = parent_storage else {
                return Err(Error::chain(
                    &child_name,
                    format!(
                        "cannot open the backing file: {}",
                        if failures.is_empty() {
                            "no name recorded".to_owned()
                        } else {
                            failures.join("; ")
                        }
                    ),
                ));
            };
            if !seen.insert(parent_storage.identity()) {
                return Err(Error::chain(
                    &child_name,
                    format!(
                        "backing loop: {} is already in the chain",
                        parent_storage.name()
                    ),
                ));
            }
            let format = if parent_storage.decoded() {
                Format::Raw
            } else {
                format
            };
            let parent = open_layer(parent_storage, format, &ctx)?;
            if let Some(expect) = backing.expect {
                let found = parent.identity();
                if found != Some(expect) {
                    return Err(Error::chain(
                        &child_name,
                        format!(
                            "the parent {} is not the image this one was made from (expected {:?}, found {:?})",
                            parent.files()[0].name(),
                            expect,
                            found
                        ),
                    ));
                }
            }
            layers.push(parent);
        }
        Ok(Image { layers, cache })
    }

    /// The layers, top image first.
    pub fn layers(&self) -> &[Box<dyn Layer>] {
        &self.layers
    }

    /// Guest-visible size (the top image's).
    pub fn size(&self) -> u64 {
        self.layers[0].virtual_size()
    }

    /// The chain's metadata cache.
    pub fn cache(&self) -> &Arc<MetadataCache> {
        &self.cache
    }

    /// Descriptions of every layer, top first.
    pub fn info(&self) -> Vec<LayerInfo> {
        self.layers.iter().map(|l| l.info()).collect()
    }

    /// Checks every layer's metadata.
    pub fn check(&self) -> Vec<(String, Result<CheckReport>)> {
        self.layers
            .iter()
            .map(|l| {
                let mut report = CheckReport::default();
                let r = l.check(&mut report).map(|()| report);
                (l.files()[0].name().to_owned(), r)
            })
            .collect()
    }

    /// Resolves `[offset, offset + length)` through the chain, appending at most about
    /// `max_extents` extents to `out` (merged where contiguous). Returns the number of
    /// bytes covered, which is `length` unless the extent limit was reached.
    pub fn map(
        &self,
        offset: u64,
        length: u64,
        fetch: Fetch,
        max_extents: usize,
        out: &mut Vec<Extent>,
    ) -> Result<u64> {
        let end = offset
            .checked_add(length)
            .filter(|&end| end <= self.size())
            .ok_or_else(|| {
                bad_plan(
                    &*self.layers[0],
                    offset,
                    "the range lies beyond the virtual size",
                )
            })?;
        let start_len = out.len();
        let limit = start_len.saturating_add(max_extents.max(1));
        self.map_layer(0, offset, end - offset, fetch, limit, out)
    }

    fn map_layer(
        &self,
        index: usize,
        offset: u64,
        length: u64,
        fetch: Fetch,
        limit: usize,
        out: &mut Vec<Extent>,
    ) -> Result<u64> {
        let Some(layer) = self.layers.get(index) else {
            push(
                out,
                Extent {
                    length,
                    place: Place::Unallocated,
                },
            );
            return Ok(length);
        };
        let end = offset + length;
        let inside_end = end.min(layer.virtual_size());
        let mut pos = offset;
        let mut segments: Vec<Segment> = Vec::new();
        while pos < inside_end {
            if out.len() >= limit {
                return Ok(pos - offset);
            }
            segments.clear();
            layer.map(pos, inside_end - pos, fetch, &mut segments)?;
            let total: u64 = segments.iter().map(|s| s.length).sum();
            if segments.is_empty()
                || total == 0
                || total > inside_end - pos
                || segments.iter().any(|s| s.length == 0)
            {
                return Err(bad_plan(
                    &**layer,
                    pos,
                    "the format returned an inconsistent plan",
                ));
            }
            for segment in &segments {
                let place = match segment.kind {
                    SegmentKind::Data { file, offset, raw } => Place::Data {
                        layer: index,
                        file,
                        offset,
                        raw,
                    },
                    SegmentKind::Compressed {
                        file,
                        offset,
                        compressed_length,
                        compression,
                        unit_size,
                        skip,
                    } => Place::Compressed {
                        layer: index,
                        file,
                        offset,
                        compressed_length,
                        compression,
                        unit_size,
                        skip,
                    },
                    SegmentKind::Zero => Place::Zero { layer: index },
                    SegmentKind::Backing => {
                        let done =
                            self.map_layer(index + 1, pos, segment.length, fetch, limit, out)?;
                        pos += done;
                        if done < segment.length {
                            return Ok(pos - offset);
                        }
                        continue;
                    }
                };
                push(
                    out,
                    Extent {
                        length: segment.length,
                        place,
                    },
                );
                pos += segment.length;
            }
        }
        if end > pos {
            // Past the end of a backing image shorter than its child: zeroes, counted
            // as allocated at this layer (its end decides them), which is what qemu-nbd
            // reports as allocation depth (`qemu-img map` says "not present" instead).
            push(
                out,
                Extent {
                    length: end - pos,
                    place: Place::Zero { layer: index },
                },
            );
        }
        Ok(length)
    }

    /// Reads `buf.len()` bytes at `offset` of the chain below the top image (zeroes
    /// past the backing's size, or everywhere without a backing).
    pub fn read_below(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut extents = Vec::new();
        let length = buf.len() as u64;
        self.map_layer(1, offset, length, Fetch::Allowed, usize::MAX, &mut extents)?;
        self.read_extents(&extents, buf)
    }

    /// Reads `buf.len()` bytes at `offset` (blocking I/O on the calling thread).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut extents = Vec::new();
        let length = buf.len() as u64;
        self.map(offset, length, Fetch::Allowed, usize::MAX, &mut extents)?;
        self.read_extents(&extents, buf)
    }

    /// Executes a plan covering `buf` exactly.
    fn read_extents(&self, extents: &[Extent], buf: &mut [u8]) -> Result<()> {
        let mut pos = 0usize;
        for extent in extents {
            let len = extent.length as usize;
            self.read_extent(extent, &mut buf[pos..pos + len])?;
            pos += len;
        }
        Ok(())
    }

    /// Fills `buf` (exactly `extent.length` bytes) with the extent's bytes.
    pub fn read_extent(&self, extent: &Extent, buf: &mut [u8]) -> Result<()> {
        match extent.place {
            Place::Data {
                layer,
                file,
                offset,
                ..
            } => read_exact(&*self.layers[layer].files()[file], "data", buf, offset),
            Place::Compressed { skip, .. } => {
                let unit = self.decompress_extent(extent)?;
                let skip = skip as usize;
                buf.copy_from_slice(&unit[skip..skip + buf.len()]);
                Ok(())
            }
            Place::Zero { .. } | Place::Unallocated => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    /// Decompresses the unit a compressed extent lies in, up to the extent's end (the
    /// rest of the unit is not needed: decoding stops there, which halves the work of a
    /// random 4 KiB read on average). Reads the compressed input on this thread.
    pub fn decompress_extent(&self, extent: &Extent) -> Result<Vec<u8>> {
        let input = self.compressed_input(extent)?;
        let storage = &*self.layers[input.layer].files()[input.file];
        let mut bytes = vec![0; input.length];
        read_exact(storage, "compressed data", &mut bytes, input.offset)?;
        self.decode_unit(&input, &bytes)
    }

    /// How to decode a compressed extent: which part of which file to read, for a caller
    /// that reads it its own way before [`decode_unit`](Self::decode_unit).
    pub fn compressed_input(&self, extent: &Extent) -> Result<CompressedInput> {
        let Place::Compressed {
            layer,
            file,
            offset,
            compressed_length,
            compression,
            unit_size,
            skip,
        } = extent.place
        else {
            return Err(bad_plan(&*self.layers[0], 0, "not a compressed extent"));
        };
        let storage = &*self.layers[layer].files()[file];
        let bad = |reason: String| Error::Decompress {
            path: storage.name().to_owned(),
            offset,
            reason,
        };
        // Bounded by the format (at most a few MiB); checked again here.
        let end = skip
            .checked_add(extent.length)
            .filter(|&end| end <= unit_size && unit_size <= MAX_UNIT_SIZE);
        let Some(end) = end else {
            return Err(bad(format!(
                "a unit of {unit_size} bytes cannot hold the extent"
            )));
        };
        let available = storage
            .size()
            .saturating_sub(offset)
            .min(compressed_length)
            .min(unit_size * 2 + 4096);
        if available == 0 {
            return Err(bad(
                "the compressed data lies beyond the end of the file".to_owned()
            ));
        }
        Ok(CompressedInput {
            layer,
            file,
            offset,
            length: available as usize,
            compression,
            decoded: end as usize,
            unit: unit_size as usize,
        })
    }

    /// Decodes the unit of a compressed extent from `bytes` (what `input` says to read),
    /// up to the extent's end. Pure computation: no I/O.
    pub fn decode_unit(&self, input: &CompressedInput, bytes: &[u8]) -> Result<Vec<u8>> {
        let mut unit = vec![0; input.decoded];
        decompress(input.compression, bytes, &mut unit).map_err(|reason| Error::Decompress {
            path: self.layers[input.layer].files()[input.file]
                .name()
                .to_owned(),
            offset: input.offset,
            reason,
        })?;
        Ok(unit)
    }

    /// Block status of `[offset, offset + length)`: at most about `max` entries,
    /// contiguous from `offset`, merged where equal.
    pub fn allocation(
        &self,
        offset: u64,
        length: u64,
        fetch: Fetch,
        max: usize,
    ) -> Result<Vec<Allocation>> {
        let mut out: Vec<Allocation> = Vec::new();
        self.classify(offset, length, fetch, max, |e| {
            let a = Allocation {
                length: e.length,
                hole: e.hole,
                zero: e.zero,
                depth: e.depth,
            };
            match out.last_mut() {
                Some(last) if (last.hole, last.zero, last.depth) == (a.hole, a.zero, a.depth) => {
                    last.length += a.length;
                }
                _ => out.push(a),
            }
        })?;
        Ok(out)
    }

    /// Map entries like `qemu-img map --output=json` for `[offset, offset + length)`,
    /// with host locations, merged where flags match and locations continue.
    pub fn map_entries(
        &self,
        offset: u64,
        length: u64,
        fetch: Fetch,
        max: usize,
    ) -> Result<Vec<MapEntry>> {
        let mut out: Vec<MapEntry> = Vec::new();
        self.classify(offset, length, fetch, max, |e| {
            if let Some(last) = out.last_mut() {
                let same = (last.hole, last.zero, last.depth, last.compressed)
                    == (e.hole, e.zero, e.depth, e.compressed)
                    && match (last.location, e.location) {
                        (None, None) => true,
                        (Some((l1, f1, o1)), Some((l2, f2, o2))) => {
                            l1 == l2 && f1 == f2 && o1 + last.length == o2
                        }
                        _ => false,
                    };
                if same {
                    last.length += e.length;
                    return;
                }
            }
            out.push(e);
        })?;
        Ok(out)
    }

    /// Maps a range and calls `emit` with each piece's block status, in order.
    fn classify(
        &self,
        offset: u64,
        length: u64,
        fetch: Fetch,
        max: usize,
        mut emit: impl FnMut(MapEntry),
    ) -> Result<()> {
        let mut extents = Vec::new();
        self.map(offset, length, fetch, max, &mut extents)?;
        let mut start = offset;
        for extent in &extents {
            let depth = extent.depth();
            let plain = |length, hole, zero, compressed| MapEntry {
                start: 0,
                length,
                depth,
                hole,
                zero,
                compressed,
                location: None,
            };
            match extent.place {
                Place::Data {
                    layer,
                    file,
                    offset: host,
                    raw,
                } => {
                    let storage = &*self.layers[layer].files()[file];
                    let end = host + extent.length;
                    let mut pos = host;
                    while pos < end {
                        let io_err = |source| Error::Io {
                            path: storage.name().to_owned(),
                            op: "allocation probe",
                            offset: pos,
                            length: end - pos,
                            source,
                        };
                        let data = storage
                            .next_data(pos)
                            .map_err(io_err)?
                            .unwrap_or(end)
                            .min(end);
                        let (next, hole, zero) = if data > pos {
                            (data, raw, true)
                        } else {
                            let hole = storage.next_hole(pos).map_err(io_err)?.clamp(pos + 1, end);
                            (hole, false, false)
                        };
                        emit(MapEntry {
                            start: start + (pos - host),
                            location: Some((layer, file, pos)),
                            ..plain(next - pos, hole, zero, false)
                        });
                        pos = next;
                    }
                }
                Place::Compressed { .. } => emit(MapEntry {
                    start,
                    ..plain(extent.length, false, false, true)
                }),
                Place::Zero { .. } | Place::Unallocated => emit(MapEntry {
                    start,
                    ..plain(extent.length, true, true, false)
                }),
            }
            start += extent.length;
        }
        Ok(())
    }
}

/// One run of `image map`: block status plus where the bytes are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MapEntry {
    /// Guest offset.
    pub start: u64,
    /// Bytes covered.
    pub length: u64,
    /// 0 = allocated in no layer, 1 = the top image, 2 = its backing, …
    pub depth: u32,
    /// No storage is allocated.
    pub hole: bool,
    /// Reads as zeroes.
    pub zero: bool,
    /// Stored compressed.
    pub compressed: bool,
    /// (layer, file index, host offset) of uncompressed data.
    pub location: Option<(usize, usize, u64)>,
}

/// Appends `extent`, merging it into the previous one when they continue each other.
fn push(out: &mut Vec<Extent>, extent: Extent) {
    if let Some(last) = out.last_mut() {
        let merged = match (&mut last.place, extent.place) {
            (
                Place::Data {
                    layer,
                    file,
                    offset,
                    raw,
                },
                Place::Data {
                    layer: l2,
                    file: f2,
                    offset: o2,
                    raw: r2,
                },
            ) => *layer == l2 && *file == f2 && *raw == r2 && *offset + last.length == o2,
            (Place::Zero { layer }, Place::Zero { layer: l2 }) => *layer == l2,
            (Place::Unallocated, Place::Unallocated) => true,
            _ => false,
        };
        if merged {
            last.length += extent.length;
            return;
        }
    }
    out.push(extent);
}

impl qcow2::Below for Image {
    fn size(&self) -> u64 {
        self.layers.get(1).map_or(0, |l| l.virtual_size())
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read_below(offset, buf)
    }
}
