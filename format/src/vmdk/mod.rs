//! The VMDK format: a descriptor (a text file, or text embedded in a hosted sparse
//! file) listing extents laid end to end in guest space.
//!
//! Extents are FLAT/VMFS (a byte range of a file), ZERO, SPARSE (hosted "KDMV",
//! including both streamOptimized layouts) and VMFSSPARSE ("COWD"); RDM/raw-device and
//! seSparse extents are refused. A delta disk names its parent with
//! `parentFileNameHint` and records the parent's `CID` as `parentCID`, which the chain
//! checks against the parent's [`Layer::identity`].
//!
//! Access words: RW and RDONLY extents are both served (the disk is read-only here
//! anyway). qemu *drops* every non-RW line of a separate descriptor (and ZERO lines),
//! which shifts the following extents and shrinks the disk; Thinline keeps them in
//! place, as VMware does. NOACCESS extents cannot be read and are refused. The
//! extent lines of an embedded descriptor are ignored, as qemu does: the sparse
//! header's capacity is the disk (python3-vmdkstream writes an `RDONLY` line there).

mod descriptor;
mod sparse;

use std::collections::HashMap;
use std::sync::Arc;

use crate::layer::{
    Backing, CheckReport, Fetch, Format, Layer, LayerInfo, OpenContext, ParentIdentity, Segment,
    SegmentKind,
};
use crate::storage::{Storage, read_exact, read_vec};
use crate::{Error, Result};

use descriptor::{Access, Descriptor, MAX_DESCRIPTOR_BYTES, NO_PARENT_CID};
use sparse::{MAX_CAPACITY_SECTORS, SparseExtent, SparseFormat};

const SECTOR: u64 = 512;

/// createTypes naming raw devices or partitions, which a template server must not read.
const DEVICE_CREATE_TYPES: &[&str] = &[
    "fullDevice",
    "partitionedDevice",
    "vmfsRaw",
    "vmfsRawDeviceMap",
    "vmfsPassthroughRawDeviceMap",
    "vmfsPreallocated",
];

/// Where an extent's bytes are.
#[derive(Debug)]
enum ExtentKind {
    /// `files[file]` from byte `offset` on.
    Flat { file: usize, offset: u64 },
    /// Reads as zeroes.
    Zero,
    /// A sparse extent file.
    Sparse(Box<SparseExtent>),
}

#[derive(Debug)]
struct Extent {
    /// Guest offset of the first byte.
    start: u64,
    /// Bytes.
    length: u64,
    access: Access,
    /// The type word of the descriptor line (`SPARSE` for a monolithic file).
    type_name: String,
    file_name: String,
    kind: ExtentKind,
}

/// An opened VMDK disk (descriptor plus extents).
#[derive(Debug)]
pub struct VmdkLayer {
    files: Vec<Arc<dyn Storage>>,
    extents: Vec<Extent>,
    size: u64,
    descriptor: Descriptor,
    /// The descriptor is embedded in the (single) sparse extent.
    embedded: bool,
    backing: Option<Backing>,
}

fn invalid(storage: &dyn Storage, reason: impl Into<String>) -> Error {
    Error::invalid(storage.name(), "vmdk", reason)
}

/// Opens a vmdk image: a descriptor file, or a hosted sparse file.
pub fn open(storage: Arc<dyn Storage>, ctx: &OpenContext) -> Result<Box<dyn Layer>> {
    Ok(Box::new(VmdkLayer::open(storage, ctx)?))
}

impl VmdkLayer {
    /// Opens `storage` as a VMDK disk.
    pub fn open(storage: Arc<dyn Storage>, ctx: &OpenContext) -> Result<VmdkLayer> {
        if storage.size() < 4 {
            return Err(invalid(
                &*storage,
                format!("the file is only {} bytes long", storage.size()),
            ));
        }
        let mut magic = [0u8; 4];
        read_exact(&*storage, "VMDK magic", &mut magic, 0)?;
        match &magic {
            b"KDMV" => Self::open_monolithic(storage, ctx),
            b"COWD" => Err(Error::unsupported(
                storage.name(),
                "vmdk",
                "a COWD (vmfsSparse) extent opened without its descriptor; open the descriptor file",
            )),
            [0xbe, 0xba, 0xfe, 0xca] => Err(Error::unsupported(
                storage.name(),
                "vmdk",
                "a seSparse extent opened without its descriptor; seSparse is not supported",
            )),
            _ => Self::open_descriptor_file(storage, ctx),
        }
    }

    fn open_monolithic(storage: Arc<dyn Storage>, ctx: &OpenContext) -> Result<VmdkLayer> {
        let (header, gd_at_end) = sparse::read_hosted_header(&*storage)?;
        let extent = SparseExtent::open_hosted(storage.clone(), 0, header, gd_at_end, ctx)?;
        let descriptor = match extent.descriptor_range()? {
            Some((offset, length)) => {
                let text = read_vec(&*storage, "embedded descriptor", offset, length)?;
                descriptor::parse(storage.name(), &text)?
            }
            None => Descriptor::default(),
        };
        let size = extent.capacity;
        let extents = vec![Extent {
            start: 0,
            length: size,
            access: Access::Rw,
            type_name: "SPARSE".to_owned(),
            file_name: storage.name().to_owned(),
            kind: ExtentKind::Sparse(Box::new(extent)),
        }];
        Ok(VmdkLayer {
            backing: backing_of(&descriptor),
            files: vec![storage],
            extents,
            size,
            descriptor,
            embedded: true,
        })
    }

    fn open_descriptor_file(storage: Arc<dyn Storage>, ctx: &OpenContext) -> Result<VmdkLayer> {
        let s = &*storage;
        if s.size() > MAX_DESCRIPTOR_BYTES {
            return Err(invalid(
                s,
                format!(
                    "no sparse header, and at {} bytes the file is too large to be a descriptor \
                     (at most {MAX_DESCRIPTOR_BYTES} bytes)",
                    s.size()
                ),
            ));
        }
        let text = read_vec(s, "descriptor", 0, s.size())?;
        let descriptor = descriptor::parse(s.name(), &text)?;
        let Some(create_type) = descriptor.create_type.as_deref() else {
            return Err(invalid(
                s,
                "no sparse header and no createType: not a VMDK descriptor",
            ));
        };
        if DEVICE_CREATE_TYPES.contains(&create_type) {
            return Err(Error::unsupported(
                s.name(),
                "vmdk",
                format!("createType {create_type:?} maps a raw device, which is not served"),
            ));
        }
        if descriptor.extents.is_empty() {
            return Err(invalid(s, "the descriptor lists no extents"));
        }
        let mut files = vec![storage.clone()];
        let mut by_name: HashMap<String, usize> = HashMap::new();
        let mut extents = Vec::with_capacity(descriptor.extents.len());
        let mut start = 0u64;
        for line in &descriptor.extents {
            let text = &line.text;
            if line.access == Access::Noaccess {
                return Err(Error::unsupported(
                    s.name(),
                    "vmdk",
                    format!("extent {text:?} is NOACCESS: its data cannot be read"),
                ));
            }
            let length = line
                .sectors
                .checked_mul(SECTOR)
                .filter(|_| line.sectors <= MAX_CAPACITY_SECTORS)
                .ok_or_else(|| invalid(s, format!("extent {text:?} is larger than 64 TiB")))?;
            let mut open_file = |name: &str| -> Result<usize> {
                if let Some(&i) = by_name.get(name) {
                    return Ok(i);
                }
                let opened = storage.open_related(name)?;
                files.push(opened);
                by_name.insert(name.to_owned(), files.len() - 1);
                Ok(files.len() - 1)
            };
            let need_file = || {
                line.file
                    .as_deref()
                    .ok_or_else(|| invalid(s, format!("extent {text:?} names no file")))
            };
            let kind = match line.kind.as_str() {
                "FLAT" | "VMFS" => {
                    let file = open_file(need_file()?)?;
                    let offset = line
                        .offset
                        .unwrap_or(0)
                        .checked_mul(SECTOR)
                        .ok_or_else(|| invalid(s, format!("extent {text:?}: offset overflows")))?;
                    ExtentKind::Flat { file, offset }
                }
                "ZERO" => ExtentKind::Zero,
                "SPARSE" | "VMFSSPARSE" => {
                    let file = open_file(need_file()?)?;
                    let fs = files[file].clone();
                    let mut m = [0u8; 4];
                    if fs.size() >= 4 {
                        read_exact(&*fs, "sparse extent magic", &mut m, 0)?;
                    }
                    let extent = match &m {
                        b"KDMV" => {
                            let (header, at_end) = sparse::read_hosted_header(&*fs)?;
                            SparseExtent::open_hosted(fs.clone(), file, header, at_end, ctx)?
                        }
                        b"COWD" => SparseExtent::open_cowd(fs.clone(), file, ctx)?,
                        _ => {
                            return Err(invalid(
                                &*fs,
                                format!(
                                    "extent {text:?} names a file with neither a KDMV nor a COWD header"
                                ),
                            ));
                        }
                    };
                    if extent.capacity != length {
                        return Err(invalid(
                            s,
                            format!(
                                "extent {text:?} is {} sectors but its sparse header says {} sectors",
                                line.sectors,
                                extent.capacity / SECTOR
                            ),
                        ));
                    }
                    ExtentKind::Sparse(Box::new(extent))
                }
                "SESPARSE" => {
                    return Err(Error::unsupported(
                        s.name(),
                        "vmdk",
                        format!("extent {text:?}: seSparse extents are not supported"),
                    ));
                }
                other => {
                    return Err(Error::unsupported(
                        s.name(),
                        "vmdk",
                        format!("extent {text:?}: extent type {other} is not supported"),
                    ));
                }
            };
            extents.push(Extent {
                start,
                length,
                access: line.access,
                type_name: line.kind.clone(),
                file_name: line.file.clone().unwrap_or_default(),
                kind,
            });
            start = start
                .checked_add(length)
                .filter(|&total| total <= MAX_CAPACITY_SECTORS * SECTOR)
                .ok_or_else(|| invalid(s, "the extents add up to more than 64 TiB"))?;
        }
        Ok(VmdkLayer {
            backing: backing_of(&descriptor),
            files,
            extents,
            size: start,
            descriptor,
            embedded: false,
        })
    }

    fn sparse_extents(&self) -> impl Iterator<Item = &SparseExtent> {
        self.extents.iter().filter_map(|e| match &e.kind {
            ExtentKind::Sparse(s) => Some(&**s),
            _ => None,
        })
    }
}

/// The parent a descriptor names, if it has one (`parentCID` other than ffffffff and a
/// `parentFileNameHint`).
fn backing_of(d: &Descriptor) -> Option<Backing> {
    let parent_cid = d.parent_cid.filter(|&c| c != NO_PARENT_CID)?;
    let hint = d.parent_hint.clone()?;
    Some(Backing {
        names: vec![hint],
        format: Some(Format::Vmdk),
        expect: Some(ParentIdentity::VmdkCid(parent_cid)),
    })
}

impl Layer for VmdkLayer {
    fn format(&self) -> Format {
        Format::Vmdk
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn files(&self) -> &[Arc<dyn Storage>] {
        &self.files
    }

    fn backing(&self) -> Option<&Backing> {
        self.backing.as_ref()
    }

    fn identity(&self) -> Option<ParentIdentity> {
        self.descriptor.cid.map(ParentIdentity::VmdkCid)
    }

    fn info(&self) -> LayerInfo {
        let first_sparse = self.sparse_extents().next();
        let subformat = self.descriptor.create_type.clone().or_else(|| {
            first_sparse.map(|s| {
                if s.compressed {
                    "streamOptimized".to_owned()
                } else {
                    "monolithicSparse".to_owned()
                }
            })
        });
        let mut features = Vec::new();
        let mut details: Vec<(String, String)> = Vec::new();
        let d = &self.descriptor;
        if let Some(v) = d.version {
            details.push(("descriptor version".into(), v.to_string()));
        }
        details.push((
            "descriptor".into(),
            if self.embedded {
                "embedded"
            } else {
                "separate file"
            }
            .into(),
        ));
        if let Some(cid) = d.cid {
            details.push(("CID".into(), format!("{cid:08x}")));
        }
        if let Some(cid) = d.parent_cid {
            details.push(("parentCID".into(), format!("{cid:08x}")));
        }
        if let Some(hint) = &d.parent_hint {
            details.push(("parentFileNameHint".into(), hint.clone()));
        }
        if let Some(s) = first_sparse {
            if let Some(h) = s.header {
                details.push(("sparse header version".into(), h.version.to_string()));
                details.push(("sparse header flags".into(), format!("{:#x}", h.flags)));
            }
            let mut add = |on: bool, name: &str| {
                if on && !features.iter().any(|f| f == name) {
                    features.push(name.to_owned());
                }
            };
            for s in self.sparse_extents() {
                add(s.compressed, "compressed");
                add(s.markers, "markers");
                add(s.zero_grain, "zeroed_grain");
                add(s.rgd_offset.is_some(), "redundant_gd");
                add(s.gd_at_end, "gd_at_end");
                add(s.format == SparseFormat::Cowd, "cowd");
            }
        }
        for (i, e) in self.extents.iter().enumerate() {
            details.push((
                format!("extent {i}"),
                format!(
                    "{} {} {} {:?} ({} bytes)",
                    e.access.name(),
                    e.length / SECTOR,
                    e.type_name,
                    e.file_name,
                    e.length
                ),
            ));
        }
        for (k, v) in &d.ddb {
            details.push((k.clone(), v.clone()));
        }
        LayerInfo {
            format: Format::Vmdk,
            subformat,
            path: self.files[0].name().to_owned(),
            virtual_size: self.size,
            file_size: self.files.iter().map(|f| f.size()).sum(),
            cluster_size: first_sparse.map(|s| s.grain),
            features,
            dirty: self
                .sparse_extents()
                .any(|s| s.header.is_some_and(|h| h.unclean_shutdown)),
            corrupt: false,
            details,
        }
    }

    fn map(&self, offset: u64, length: u64, fetch: Fetch, out: &mut Vec<Segment>) -> Result<()> {
        let index = self
            .extents
            .partition_point(|e| e.start <= offset)
            .checked_sub(1);
        let Some(extent) = index.and_then(|i| self.extents.get(i)) else {
            return Err(invalid(
                &*self.files[0],
                format!("guest offset {offset} lies in no extent"),
            ));
        };
        let rel = offset - extent.start;
        if rel >= extent.length {
            return Err(invalid(
                &*self.files[0],
                format!("guest offset {offset} lies beyond the last extent"),
            ));
        }
        let length = length.min(extent.length - rel);
        match &extent.kind {
            ExtentKind::Zero => out.push(Segment {
                length,
                kind: SegmentKind::Zero,
            }),
            ExtentKind::Flat { file, offset: base } => {
                let host = base + rel;
                let file_size = self.files[*file].size();
                // Past the end of a short flat file: zeroes, as qemu reads them.
                let inside = file_size.saturating_sub(host).min(length);
                if inside > 0 {
                    out.push(Segment {
                        length: inside,
                        // Like qemu: a hole of the file is data that reads as zero.
                        kind: SegmentKind::Data {
                            file: *file,
                            offset: host,
                            raw: false,
                        },
                    });
                }
                if inside < length {
                    out.push(Segment {
                        length: length - inside,
                        kind: SegmentKind::Zero,
                    });
                }
            }
            ExtentKind::Sparse(s) => s.map(rel, length, extent.start, fetch, out)?,
        }
        Ok(())
    }

    fn check(&self, report: &mut CheckReport) -> Result<()> {
        for e in &self.extents {
            match &e.kind {
                ExtentKind::Flat { file, offset } => {
                    let f = &self.files[*file];
                    let end = offset + e.length;
                    if f.size() < end {
                        report.errors.push(format!(
                            "{}: the flat extent file is {} bytes, shorter than the extent's end at {end} \
                             (the rest reads as zeroes)",
                            f.name(),
                            f.size()
                        ));
                    }
                }
                ExtentKind::Zero => {}
                ExtentKind::Sparse(s) => s.check(report, e.start)?,
            }
        }
        report
            .stats
            .push(("extents".into(), self.extents.len() as u64));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::io::Write;

    use super::*;
    use crate::cache::MetadataCache;
    use crate::storage::MemoryStorage;
    use crate::test_util::{assert_cached_only_needs_a_read, assert_check_error, check_report};
    use crate::{Image, OpenOptions};

    const GD_SECTOR: usize = 3;
    const GT_SECTOR: usize = 4;
    const GRAIN_SECTORS: usize = 8;

    fn ctx() -> OpenContext {
        OpenContext {
            cache: MetadataCache::new(1 << 20),
        }
    }

    fn put32(b: &mut [u8], at: usize, v: u32) {
        b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn put64(b: &mut [u8], at: usize, v: u64) {
        b[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }

    /// A monolithic sparse image: 4 KiB grains, 512-entry tables, `grains` data grains
    /// stored in order (grain i holds byte i + 1), GD entry for table 0 only.
    fn image(capacity_sectors: u64, grains: usize, descriptor: &str) -> Vec<u8> {
        let data_start = 8usize; // sectors: header, descriptor (2), GD, GT (4)
        let mut b = vec![0u8; (data_start + grains * GRAIN_SECTORS) * 512];
        b[0..4].copy_from_slice(b"KDMV");
        put32(&mut b, 4, 1);
        put32(&mut b, 8, FLAG_NEWLINE);
        put64(&mut b, 12, capacity_sectors);
        put64(&mut b, 20, GRAIN_SECTORS as u64);
        put64(&mut b, 28, 1);
        put64(&mut b, 36, 2);
        put32(&mut b, 44, 512);
        put64(&mut b, 56, GD_SECTOR as u64);
        put64(&mut b, 64, data_start as u64);
        b[73..77].copy_from_slice(b"\n \r\n");
        b[512..512 + descriptor.len()].copy_from_slice(descriptor.as_bytes());
        put32(&mut b, GD_SECTOR * 512, GT_SECTOR as u32);
        for g in 0..grains {
            let sector = data_start + g * GRAIN_SECTORS;
            put32(&mut b, GT_SECTOR * 512 + g * 4, sector as u32);
            b[sector * 512..(sector + GRAIN_SECTORS) * 512].fill(g as u8 + 1);
        }
        b
    }

    const FLAG_NEWLINE: u32 = sparse::FLAG_NEWLINE_TEST;
    const DESC: &str = "# Disk DescriptorFile\nversion=1\nCID=11111111\nparentCID=ffffffff\n\
                        createType=\"monolithicSparse\"\nRW 2048 SPARSE \"m.vmdk\"\n";

    fn open_mem(data: Vec<u8>) -> Result<VmdkLayer> {
        VmdkLayer::open(MemoryStorage::open("m.vmdk", data), &ctx())
    }

    fn map_all(layer: &VmdkLayer) -> Result<Vec<Segment>> {
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < layer.virtual_size() {
            let before = out.len();
            layer.map(pos, layer.virtual_size() - pos, Fetch::Allowed, &mut out)?;
            pos += out[before..].iter().map(|s| s.length).sum::<u64>();
        }
        Ok(out)
    }

    fn err_of(r: Result<VmdkLayer>) -> String {
        r.expect_err("must fail").to_string()
    }

    #[test]
    fn maps_and_merges_contiguous_grains() {
        let layer = open_mem(image(2048, 3, DESC)).unwrap();
        assert_eq!(layer.virtual_size(), 1 << 20);
        assert_eq!(layer.identity(), Some(ParentIdentity::VmdkCid(0x11111111)));
        assert!(layer.backing().is_none());
        let mut out = Vec::new();
        layer.map(100, 1 << 20, Fetch::Allowed, &mut out).unwrap();
        assert_eq!(
            out,
            vec![
                Segment {
                    length: 3 * 4096 - 100,
                    kind: SegmentKind::Data {
                        file: 0,
                        offset: 8 * 512 + 100,
                        raw: false
                    }
                },
                Segment {
                    length: (1 << 20) - 3 * 4096,
                    kind: SegmentKind::Backing
                },
            ]
        );
        let report = check_report(&layer);
        assert!(report.errors.is_empty(), "{report:?}");
        assert!(report.stats.contains(&("allocated grains".into(), 3)));
        let image = Image::open_storage(
            MemoryStorage::open("m.vmdk", image(2048, 3, DESC)),
            &OpenOptions::default(),
        )
        .unwrap();
        let mut buf = vec![0u8; 3 * 4096 + 10];
        image.read(0, &mut buf).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 1));
        assert!(buf[2 * 4096..3 * 4096].iter().all(|&b| b == 3));
        assert!(buf[3 * 4096..].iter().all(|&b| b == 0));
    }

    type Damage = Box<dyn Fn(&mut Vec<u8>)>;

    #[test]
    fn damaged_headers_are_refused() {
        let base = image(2048, 3, DESC);
        let cases: Vec<(Damage, &str)> = vec![
            (Box::new(|b| put32(b, 44, 513)), "numGTEsPerGT 513"),
            (Box::new(|b| put32(b, 44, 0)), "numGTEsPerGT 0"),
            (Box::new(|b| put64(b, 20, 3)), "not a power of two"),
            (Box::new(|b| put64(b, 20, 0)), "not a power of two"),
            (Box::new(|b| put64(b, 20, 1 << 40)), "not a power of two"),
            (Box::new(|b| put64(b, 12, u64::MAX / 2)), "64 TiB"),
            (
                Box::new(|b| put64(b, 56, 1 << 40)),
                "grain directory at offset",
            ),
            (Box::new(|b| put64(b, 56, u64::MAX / 4)), "overflows"),
            (Box::new(|b| put64(b, 64, 1 << 30)), "truncated"),
            (Box::new(|b| put32(b, 4, 4)), "version 4"),
            (Box::new(|b| b[75] = b'\n'), "newline"),
            (Box::new(|b| b[77] = 2), "compressAlgorithm 2"),
            (Box::new(|b| put64(b, 36, 1 << 20)), "embedded descriptor"),
            (
                Box::new(|b| b.truncate(300)),
                "shorter than a sparse extent header",
            ),
            (Box::new(|b| b.truncate(2)), "only 2 bytes"),
            (Box::new(|b| put64(b, 56, u64::MAX)), "footer"),
            (
                Box::new(|b| b[512..520].copy_from_slice(b"CID=zz\n\n")),
                "not a 32-bit hexadecimal",
            ),
        ];
        for (damage, expect) in cases {
            let mut b = base.clone();
            damage(&mut b);
            let e = err_of(open_mem(b));
            assert!(e.contains(expect), "expected {expect:?} in {e}");
        }
    }

    #[test]
    fn tables_and_grains_beyond_the_end_fail_on_map() {
        // GT beyond the end.
        let mut b = image(2048, 3, DESC);
        put32(&mut b, GD_SECTOR * 512, 1 << 20);
        let layer = open_mem(b).unwrap();
        let e = map_all(&layer).unwrap_err().to_string();
        assert!(
            e.contains("grain table at offset 536870912 lies beyond the end"),
            "{e}"
        );
        let report = check_report(&layer);
        assert!(report.errors[0].contains("grain table 0"), "{report:?}");
        // Grain beyond the end.
        let mut b = image(2048, 3, DESC);
        put32(&mut b, GT_SECTOR * 512 + 4, 0x7fff_0000);
        let layer = open_mem(b).unwrap();
        let e = map_all(&layer).unwrap_err().to_string();
        assert!(
            e.contains("grain for guest offset 4096") && e.contains("beyond the end"),
            "{e}"
        );
        assert_check_error(&layer, "beyond the end");
        // A grain inside the metadata is reported by check.
        let mut b = image(2048, 3, DESC);
        put32(&mut b, GT_SECTOR * 512 + 4, GT_SECTOR as u32);
        let layer = open_mem(b).unwrap();
        assert_check_error(&layer, "overlaps metadata");
    }

    fn compressed_image(lba: u64) -> Vec<u8> {
        let mut b = image(2048, 0, DESC);
        put32(&mut b, 4, 3);
        put32(
            &mut b,
            8,
            FLAG_NEWLINE | sparse::FLAG_COMPRESSED | sparse::FLAG_MARKERS,
        );
        b[77] = 1;
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(&[0x42u8; 4096]).unwrap();
        let z = z.finish().unwrap();
        let at = b.len();
        put32(&mut b, GT_SECTOR * 512 + 2 * 4, (at / 512) as u32);
        b.extend_from_slice(&lba.to_le_bytes());
        b.extend_from_slice(&(z.len() as u32).to_le_bytes());
        b.extend_from_slice(&z);
        b.resize(b.len().div_ceil(512) * 512, 0);
        b
    }

    #[test]
    fn compressed_grains_and_marker_lba() {
        let layer = open_mem(compressed_image(16)).unwrap();
        let mut out = Vec::new();
        layer.map(8192 + 5, 100, Fetch::Allowed, &mut out).unwrap();
        assert!(matches!(
            out[0].kind,
            SegmentKind::Compressed {
                unit_size: 4096,
                skip: 5,
                compression: crate::Compression::Zlib,
                ..
            }
        ));
        let image = Image::open_storage(
            MemoryStorage::open("m.vmdk", compressed_image(16)),
            &OpenOptions::default(),
        )
        .unwrap();
        let mut buf = [0u8; 10];
        image.read(8192 + 4090, &mut buf).unwrap();
        assert_eq!(buf, [0x42, 0x42, 0x42, 0x42, 0x42, 0x42, 0, 0, 0, 0]);
        let layer = open_mem(compressed_image(17)).unwrap();
        let e = map_all(&layer).unwrap_err().to_string();
        assert!(e.contains("says LBA 17") && e.contains("sector 16"), "{e}");
        assert_check_error(&layer, "LBA 17");
        // A marker size beyond the file.
        let mut b = compressed_image(16);
        let at = b.len() - 512 + 8;
        put32(&mut b, at, 3000);
        let e = map_all(&open_mem(b).unwrap()).unwrap_err().to_string();
        assert!(e.contains("beyond the end"), "{e}");
    }

    #[test]
    fn delta_child_names_its_parent_and_chain_checks_the_cid() {
        let child_desc = "# Disk DescriptorFile\nversion=1\nCID=22222222\nparentCID=11111111\n\
                          createType=\"monolithicSparse\"\nparentFileNameHint=\"m.vmdk\"\n";
        let child = image(2048, 1, child_desc);
        let layer = open_mem(child.clone()).unwrap();
        assert_eq!(
            layer.backing(),
            Some(&Backing {
                names: vec!["m.vmdk".into()],
                format: Some(Format::Vmdk),
                expect: Some(ParentIdentity::VmdkCid(0x11111111)),
            })
        );
        let mut files = BTreeMap::new();
        files.insert("c.vmdk".to_owned(), child.clone());
        files.insert("m.vmdk".to_owned(), image(2048, 3, DESC));
        let storage = MemoryStorage::with_files("c.vmdk", files.clone()).unwrap();
        let image_ok = Image::open_storage(storage, &OpenOptions::default()).unwrap();
        let mut buf = vec![0u8; 8192];
        image_ok.read(0, &mut buf).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 1), "child grain");
        assert!(buf[4096..].iter().all(|&b| b == 2), "parent grain");
        // Another CID in the parent: refused.
        files.insert(
            "m.vmdk".to_owned(),
            image(2048, 3, &DESC.replace("11111111", "33333333")),
        );
        let storage = MemoryStorage::with_files("c.vmdk", files.clone()).unwrap();
        let e = Image::open_storage(storage, &OpenOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("not the image this one was made from"), "{e}");
        files.remove("m.vmdk");
        let storage = MemoryStorage::with_files("c.vmdk", files).unwrap();
        let e = Image::open_storage(storage, &OpenOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("m.vmdk"), "{e}");
    }

    #[test]
    fn descriptor_file_extents() {
        let mut files = BTreeMap::new();
        files.insert(
            "d.vmdk".to_owned(),
            b"# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\ncreateType=\"custom\"\n\
              RW 2 FLAT \"f\" 1\nRW 4 ZERO\nRDONLY 2048 SPARSE \"m.vmdk\"\nRW 4 FLAT \"f\" 0\n"
                .to_vec(),
        );
        files.insert(
            "f".to_owned(),
            (0..2048u32).map(|i| (i / 512) as u8 + 10).collect(),
        );
        files.insert("m.vmdk".to_owned(), image(2048, 3, DESC));
        let storage = MemoryStorage::with_files("d.vmdk", files.clone()).unwrap();
        let layer = VmdkLayer::open(storage, &ctx()).unwrap();
        assert_eq!(layer.files().len(), 3);
        assert_eq!(layer.virtual_size(), (2 + 4 + 2048 + 4) * 512);
        let mut out = Vec::new();
        layer.map(0, 5000, Fetch::Allowed, &mut out).unwrap();
        assert_eq!(
            out,
            vec![Segment {
                length: 1024,
                kind: SegmentKind::Data {
                    file: 1,
                    offset: 512,
                    raw: false
                }
            }]
        );
        out.clear();
        layer.map(1024, 100, Fetch::Allowed, &mut out).unwrap();
        assert_eq!(out[0].kind, SegmentKind::Zero);
        out.clear();
        layer.map(3072, 100, Fetch::Allowed, &mut out).unwrap();
        assert!(matches!(
            out[0].kind,
            SegmentKind::Data {
                file: 2,
                offset: 4096,
                ..
            }
        ));
        // The last flat extent runs 0..2048 of "f": exactly the file.
        out.clear();
        let last = layer.virtual_size() - 2048;
        layer.map(last, 2048, Fetch::Allowed, &mut out).unwrap();
        assert_eq!(out.len(), 1);
        // A flat extent past the end of its file: zeroes after the file, and check says so.
        files.insert("f".to_owned(), vec![7; 700]);
        let storage = MemoryStorage::with_files("d.vmdk", files).unwrap();
        let layer = VmdkLayer::open(storage, &ctx()).unwrap();
        out.clear();
        layer.map(0, 1024, Fetch::Allowed, &mut out).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].length, 188);
        assert_eq!(out[1].kind, SegmentKind::Zero);
        assert_check_error(&layer, "shorter");
    }

    #[test]
    fn redundant_directory_differences_are_warnings() {
        let mut b = image(2048, 3, DESC);
        let rgd = b.len() / 512;
        b.resize(b.len() + 5 * 512, 0);
        put32(&mut b, rgd * 512, (rgd + 1) as u32);
        let gt: Vec<u8> = b[GT_SECTOR * 512..GT_SECTOR * 512 + 2048].to_vec();
        b[(rgd + 1) * 512..(rgd + 1) * 512 + 2048].copy_from_slice(&gt);
        put32(&mut b, 8, FLAG_NEWLINE | sparse::FLAG_REDUNDANT_GD);
        put64(&mut b, 48, rgd as u64);
        let layer = open_mem(b.clone()).unwrap();
        let report = check_report(&layer);
        assert!(
            report.warnings.is_empty() && report.errors.is_empty(),
            "{report:?}"
        );
        put32(&mut b, (rgd + 1) * 512 + 4, 0);
        let layer = open_mem(b).unwrap();
        let report = check_report(&layer);
        assert!(
            report.warnings[0].contains("redundant grain table 0 differs"),
            "{report:?}"
        );
        // Mapping still uses the primary directory.
        let mut out = Vec::new();
        layer.map(4096, 4096, Fetch::Allowed, &mut out).unwrap();
        assert!(matches!(out[0].kind, SegmentKind::Data { .. }));
    }

    #[test]
    fn cached_only_mapping_needs_the_table() {
        let cache = MetadataCache::new(1 << 20);
        let layer = VmdkLayer::open(
            MemoryStorage::open("m.vmdk", image(2048, 3, DESC)),
            &OpenContext {
                cache: cache.clone(),
            },
        )
        .unwrap();
        assert_cached_only_needs_a_read(&layer);
    }

    #[test]
    fn bit_flips_never_panic() {
        let images = [image(2048, 3, DESC), compressed_image(16)];
        for base in images {
            for at in (0..80)
                .chain(512..560)
                .chain(GD_SECTOR * 512..GD_SECTOR * 512 + 4)
                .chain(GT_SECTOR * 512..GT_SECTOR * 512 + 16)
            {
                for v in [0u8, 1, 0x7f, 0x80, 0xff] {
                    let mut b = base.clone();
                    b[at] = v;
                    if let Ok(layer) = open_mem(b) {
                        let _ = map_all(&layer);
                        let _ = layer.check(&mut CheckReport::default());
                        let _ = layer.info();
                    }
                }
            }
        }
    }
}
