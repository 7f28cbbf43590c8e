//! The VMDK format: qemu-img fixtures of every hosted subformat and create option,
//! delta chains, hand-written descriptors, VMware-layout streams (python3-vmdkstream
//! and a builder written from the spec, cross-checked with libvmdk), and refusals.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use thinline_format::{Error, Format, Image, OpenOptions};
use thinline_test_support::qemu::qemu_convert;

const SECTOR: usize = 512;
const GRAIN: usize = 65536;

/// Reads and maps like qemu.
fn like_qemu(path: &Path) {
    assert_reads_like_qemu(path, "vmdk", None);
    assert_map_like_qemu(path, "vmdk", None);
}

/// Like [`like_qemu`] for disks too large to hold in memory twice: compares in chunks
/// against `qemu-img convert -O raw` written to a (sparse) scratch file.
fn big_like_qemu(path: &Path) {
    use std::os::unix::fs::FileExt;
    let dir = path.parent().unwrap();
    let raw = pb(dir, "expected-big.raw");
    qemu_img(
        dir,
        &["convert", "-f", "vmdk", "-O", "raw", s(path), s(&raw)],
    );
    let expected = std::fs::File::open(&raw).unwrap();
    let image = open(path, None);
    assert_eq!(image.size(), expected.metadata().unwrap().len());
    let chunk = 8 << 20;
    let mut ours = vec![0u8; chunk];
    let mut theirs = vec![0u8; chunk];
    let mut pos = 0u64;
    // Odd-sized first read so later reads straddle grain and extent boundaries.
    let mut len = 777_777usize;
    while pos < image.size() {
        let n = len.min((image.size() - pos) as usize);
        image.read(pos, &mut ours[..n]).unwrap();
        expected.read_exact_at(&mut theirs[..n], pos).unwrap();
        // memcmp first: the byte-by-byte search is slow in debug builds.
        if ours[..n] != theirs[..n] {
            assert_same_bytes(
                &format!("{} at {pos}", path.display()),
                &ours[..n],
                &theirs[..n],
            );
        }
        pos += n as u64;
        len = chunk;
    }
    std::fs::remove_file(&raw).unwrap();
}

/// `qemu-img convert -O vmdk -o subformat=SUB FROM TO` in `dir`.
fn convert_vmdk(dir: &Path, from: &Path, sub: &str, to: &Path) {
    qemu_convert(dir, s(from), "vmdk", &format!("subformat={sub}"), s(to));
}

fn info_detail(image: &Image, key: &str) -> Option<String> {
    image.info()[0]
        .details
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
}

fn open_err(path: &Path) -> Error {
    Image::open(path, &OpenOptions::default()).expect_err("the image must be refused")
}

/// Writes at odd offsets, a zero write and a discard (a no-op for vmdk in qemu).
const WRITES: &[&str] = &[
    "write -P 0x11 0 64k",
    "write -P 0x22 1000001 70001",
    "write -P 0x33 3145216 1025",
    "write -z 10M 128k",
    "discard 20M 64k",
];

#[test]
fn qemu_subformats_read_and_map_like_qemu() {
    with_tools(&["qemu-img", "qemu-io"], |d| {
        let base = make_base_raw(d);
        for sub in [
            "monolithicSparse",
            "monolithicFlat",
            "twoGbMaxExtentSparse",
            "twoGbMaxExtentFlat",
        ] {
            // Created empty, then written.
            let created = p(d, &format!("c-{sub}.vmdk"));
            qemu_create(d, "vmdk", &format!("subformat={sub}"), &created, "64M");
            qemu_io(d, "vmdk", &created, WRITES);
            like_qemu(Path::new(&created));
            // Converted from the base image, then written.
            let converted = p(d, &format!("v-{sub}.vmdk"));
            convert_vmdk(d, &base, sub, Path::new(&converted));
            like_qemu(Path::new(&converted));
            qemu_io(d, "vmdk", &converted, WRITES);
            like_qemu(Path::new(&converted));
            let image = open(Path::new(&converted), None);
            assert_eq!(image.info()[0].subformat.as_deref(), Some(sub));
        }
    });
}

#[test]
fn qemu_stream_optimized_reads_like_qemu() {
    with_tools(&["qemu-img"], |d| {
        let base = make_base_raw(d);
        let so = pb(d, "so.vmdk");
        convert_vmdk(d, &base, "streamOptimized", &so);
        like_qemu(&so);
        let image = open(&so, None);
        let info = &image.info()[0];
        assert_eq!(info.subformat.as_deref(), Some("streamOptimized"));
        assert_eq!(info.cluster_size, Some(65536));
        assert!(info.features.iter().any(|f| f == "compressed"));
        assert_eq!(
            info_detail(&image, "sparse header flags").as_deref(),
            Some("0x30003")
        );
        let report = &image.check()[0].1.as_ref().unwrap().clone();
        assert!(
            report.errors.is_empty() && report.warnings.is_empty(),
            "{report:?}"
        );

        // A size that is not a multiple of the grain: qemu compresses only the bytes of
        // the last grain that lie inside the disk.
        let odd = pb(d, "odd.raw");
        qemu_img(d, &["create", "-f", "raw", s(&odd), "1053184"]);
        qemu_io(d, "raw", s(&odd), &["write -P 0x5c 0 1053184"]);
        let odd_so = pb(d, "odd-so.vmdk");
        convert_vmdk(d, &odd, "streamOptimized", &odd_so);
        like_qemu(&odd_so);
    });
}

#[test]
fn qemu_create_options() {
    with_tools(&["qemu-img", "qemu-io"], |d| {
        // Zeroed grains: `write -z` sets GTE 1.
        let zg = p(d, "zg.vmdk");
        qemu_create(d, "vmdk", "zeroed_grain=on", &zg, "64M");
        qemu_io(
            d,
            "vmdk",
            &zg,
            &[
                "write -P 0x44 0 1M",
                "write -z 128k 256k",
                "write -z 5M 1M",
                "write -P 0x45 777 3",
            ],
        );
        like_qemu(Path::new(&zg));
        let image = open(Path::new(&zg), None);
        assert!(image.info()[0].features.iter().any(|f| f == "zeroed_grain"));
        let report = image.check()[0].1.as_ref().unwrap().clone();
        assert!(report.errors.is_empty(), "{report:?}");
        assert!(
            report
                .stats
                .iter()
                .any(|(k, v)| k == "zeroed grains" && *v > 0),
            "{report:?}"
        );

        let c6 = p(d, "c6.vmdk");
        qemu_create(d, "vmdk", "compat6=on", &c6, "64M");
        qemu_io(d, "vmdk", &c6, WRITES);
        like_qemu(Path::new(&c6));
        assert_eq!(
            info_detail(&open(Path::new(&c6), None), "ddb.virtualHWVersion").as_deref(),
            Some("6")
        );

        let ddb = p(d, "ddb.vmdk");
        qemu_create(
            d,
            "vmdk",
            "adapter_type=lsilogic,hwversion=10,toolsversion=4242",
            &ddb,
            "64M",
        );
        qemu_io(d, "vmdk", &ddb, WRITES);
        like_qemu(Path::new(&ddb));
        let image = open(Path::new(&ddb), None);
        assert_eq!(
            info_detail(&image, "ddb.adapterType").as_deref(),
            Some("lsilogic")
        );
        assert_eq!(
            info_detail(&image, "ddb.virtualHWVersion").as_deref(),
            Some("10")
        );
        assert_eq!(
            info_detail(&image, "ddb.toolsVersion").as_deref(),
            Some("4242")
        );
        assert!(info_detail(&image, "CID").is_some());
    });
}

#[test]
fn two_gb_extents_over_two_gib() {
    with_tools(&["qemu-img", "qemu-io"], |d| {
        for sub in ["twoGbMaxExtentSparse", "twoGbMaxExtentFlat"] {
            let path = p(d, &format!("{sub}.vmdk"));
            qemu_create(d, "vmdk", &format!("subformat={sub}"), &path, "4200M");
            qemu_io(
                d,
                "vmdk",
                &path,
                &[
                    "write -P 0x61 0 64k",
                    // Across the first extent boundary (2 GiB).
                    "write -P 0x62 2147482000 9000",
                    "write -P 0x63 4294967295 1",
                    "write -P 0x64 4404010000 4096",
                ],
            );
            let image = open(Path::new(&path), None);
            assert_eq!(
                image.layers()[0].files().len(),
                4,
                "descriptor + 3 extent files"
            );
            big_like_qemu(Path::new(&path));
            assert_map_like_qemu(Path::new(&path), "vmdk", None);
        }
    });
}

#[test]
fn delta_children_and_chains() {
    with_tools(&["qemu-img", "qemu-io"], |d| {
        let base = make_base_raw(d);
        let parent = p(d, "parent.vmdk");
        qemu_img(d, &["convert", "-O", "vmdk", s(&base), &parent]);
        for sub in [
            "monolithicSparse",
            "twoGbMaxExtentSparse",
            "streamOptimized",
        ] {
            let child = p(d, &format!("child-{sub}.vmdk"));
            qemu_img(
                d,
                &[
                    "create",
                    "-f",
                    "vmdk",
                    "-o",
                    &format!("subformat={sub}"),
                    "-b",
                    "parent.vmdk",
                    "-F",
                    "vmdk",
                    &child,
                ],
            );
            if sub != "streamOptimized" {
                qemu_io(
                    d,
                    "vmdk",
                    &child,
                    &[
                        "write -P 0x71 65536 100000",
                        "write -z 10M 64k",
                        "write -P 0x72 33554943 9",
                    ],
                );
            }
            like_qemu(Path::new(&child));
            let image = open(Path::new(&child), None);
            assert_eq!(image.layers().len(), 2);
            assert_eq!(
                info_detail(&image, "parentFileNameHint").as_deref(),
                Some("parent.vmdk")
            );
        }
        // Three levels.
        let mid = p(d, "mid.vmdk");
        qemu_img(
            d,
            &[
                "create",
                "-f",
                "vmdk",
                "-b",
                "parent.vmdk",
                "-F",
                "vmdk",
                &mid,
            ],
        );
        qemu_io(
            d,
            "vmdk",
            &mid,
            &["write -P 0x81 0 100k", "write -P 0x82 12M 3333"],
        );
        let top = p(d, "top.vmdk");
        qemu_img(
            d,
            &["create", "-f", "vmdk", "-b", "mid.vmdk", "-F", "vmdk", &top],
        );
        qemu_io(
            d,
            "vmdk",
            &top,
            &["write -P 0x91 50k 100k", "write -P 0x92 33554000 2000"],
        );
        like_qemu(Path::new(&top));
        assert_eq!(open(Path::new(&top), None).layers().len(), 3);

        // A write to the parent changes its CID: the children no longer match it.
        qemu_io(d, "vmdk", &mid, &["write -P 0x83 0 512"]);
        let e = open_err(Path::new(&top)).to_string();
        assert!(
            e.contains("not the image this one was made from") && e.contains("VmdkCid"),
            "{e}"
        );

        // A missing parent is named.
        std::fs::rename(&parent, pb(d, "elsewhere.vmdk")).unwrap();
        let e = open_err(&pb(d, "child-monolithicSparse.vmdk")).to_string();
        assert!(e.contains("parent.vmdk"), "{e}");
    });
}

fn write_file(path: &Path, data: &[u8]) {
    std::fs::write(path, data).unwrap();
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u32)
                .wrapping_mul(2654435761)
                .rotate_left(seed as u32 % 31) as u8
                ^ seed
        })
        .collect()
}

/// Reads the whole image through Thinline in a few chunkings and compares to `model`.
fn assert_reads_model(path: &Path, model: &[u8]) {
    let image = open(path, None);
    let what = format!("{} vs model", path.display());
    assert_reads_as(&image, &what, model, &CHUNKINGS[..2]);
}

#[test]
fn hand_written_descriptors() {
    with_tools(&["qemu-img", "qemu-io"], |d| {
        let flat_a = pattern(3 * 1024 * 1024, 7);
        write_file(&pb(d, "a.flat"), &flat_a);
        // A sparse flat file with a hole in the middle.
        let b_path = pb(d, "b flat.img");
        qemu_img(d, &["create", "-f", "raw", s(&b_path), "2M"]);
        qemu_io(
            d,
            "raw",
            s(&b_path),
            &["write -P 0x5b 0 64k", "write -P 0x5c 1M 4k"],
        );
        let flat_b = std::fs::read(&b_path).unwrap();

        // vmfs: VMFS extents (no offset), CRLF line ends and comments. qemu accepts it.
        let vmfs = pb(d, "vmfs.vmdk");
        write_file(
            &vmfs,
            b"# Disk DescriptorFile\r\n# a comment\r\nversion=1\r\nencoding=\"UTF-8\"\r\nCID=abcdef01\r\n\
              parentCID=ffffffff\r\ncreateType=\"vmfs\"\r\n\r\n# Extent description\r\n\
              RW 6144 VMFS \"a.flat\"\r\nRW 4096 VMFS \"b flat.img\"\r\n\r\n# The Disk Data Base\r\n#DDB\r\n\
              ddb.adapterType = \"lsilogic\"\r\nddb.thinProvisioned = \"1\"\r\n",
        );
        like_qemu(&vmfs);
        let image = open(&vmfs, None);
        assert_eq!(image.layers()[0].files().len(), 3);
        assert_eq!(
            info_detail(&image, "ddb.adapterType").as_deref(),
            Some("lsilogic")
        );
        let model: Vec<u8> = [flat_a.clone(), flat_b.clone()].concat();
        assert_reads_model(&vmfs, &model);

        // vmfsThin is not a createType qemu opens: compare with the model. FLAT extents at
        // sector offsets, one file used twice.
        let thin = pb(d, "thin.vmdk");
        write_file(
            &thin,
            b"# Disk DescriptorFile\nversion=1\nCID=00000001\nparentCID=ffffffff\ncreateType=\"vmfsThin\"\n\
              RW 2048 FLAT \"a.flat\" 2048\nRW 1024 FLAT \"a.flat\" 0\nRW 4096 FLAT \"b flat.img\" 0\n",
        );
        let model: Vec<u8> =
            [&flat_a[1 << 20..2 << 20], &flat_a[..512 << 10], &flat_b[..]].concat();
        assert_reads_model(&thin, &model);
        assert_eq!(
            open(&thin, None).layers()[0].files().len(),
            3,
            "a.flat opened once"
        );

        // FLAT + ZERO + SPARSE + RDONLY: qemu drops ZERO and non-RW lines (shifting what
        // follows), so compare with the model.
        let sp = p(d, "sp.vmdk");
        qemu_img(d, &["create", "-f", "vmdk", &sp, "1M"]);
        qemu_io(
            d,
            "vmdk",
            &sp,
            &["write -P 0x99 4096 5000", "write -P 0x9a 600k 64k"],
        );
        let sp_bytes = qemu_raw(Path::new(&sp), "vmdk");
        let mixed = pb(d, "mixed.vmdk");
        write_file(
            &mixed,
            b"# Disk Descriptor File\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"custom\"\n\
              RW 1024 FLAT \"a.flat\" 0\nRW 3000 ZERO\nRDONLY 2048 SPARSE \"sp.vmdk\"\nRW 8 FLAT \"b flat.img\" 2048\n",
        );
        let model: Vec<u8> = [
            &flat_a[..512 << 10],
            &vec![0u8; 3000 * SECTOR][..],
            &sp_bytes[..],
            &flat_b[1 << 20..(1 << 20) + 4096],
        ]
        .concat();
        assert_reads_model(&mixed, &model);
        let image = open(&mixed, None);
        // The ZERO extent reads as zero at this layer; unallocated sparse grains are holes.
        let alloc = image
            .allocation(
                (512 << 10) as u64,
                3000 * 512,
                thinline_format::Fetch::Allowed,
                100,
            )
            .unwrap();
        assert_eq!(alloc.len(), 1);
        assert!(alloc[0].zero && alloc[0].hole && alloc[0].depth == 1);
        let check = image.check();
        assert!(check[0].1.as_ref().unwrap().errors.is_empty());
    });
}

#[test]
fn refusals_name_the_problem() {
    in_scratch(|d| {
        write_file(&pb(d, "f.img"), &[0u8; 4096]);
        let cases: &[(&str, &str, &str)] = &[
            (
                "rdm.vmdk",
                "createType=\"vmfsRawDeviceMap\"\nRW 8 VMFSRDM \"f.img\"\n",
                "raw device",
            ),
            (
                "rdm2.vmdk",
                "createType=\"custom\"\nRW 8 VMFSRDM \"f.img\"\n",
                "VMFSRDM",
            ),
            (
                "raw.vmdk",
                "createType=\"custom\"\nRW 8 VMFSRAW \"f.img\"\n",
                "VMFSRAW",
            ),
            (
                "noacc.vmdk",
                "createType=\"custom\"\nNOACCESS 8 FLAT \"f.img\" 0\n",
                "NOACCESS",
            ),
            (
                "missing.vmdk",
                "createType=\"monolithicFlat\"\nRW 8 FLAT \"nope.img\" 0\n",
                "nope.img",
            ),
            (
                "noext.vmdk",
                "createType=\"monolithicFlat\"\n",
                "no extents",
            ),
            ("notext.vmdk", "hello\n", "createType"),
            (
                "sparse-flat.vmdk",
                "createType=\"custom\"\nRW 8 SPARSE \"f.img\"\n",
                "neither a KDMV nor a COWD",
            ),
            (
                "seq.vmdk",
                "createType=\"seSparse\"\nRW 8 SESPARSE \"f.img\"\n",
                "seSparse",
            ),
            (
                "huge.vmdk",
                "createType=\"custom\"\nRW 999999999999999 ZERO\n",
                "64 TiB",
            ),
        ];
        for (name, text, expect) in cases {
            let path = pb(d, name);
            write_file(
                &path,
                format!("# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\n{text}")
                    .as_bytes(),
            );
            let options = OpenOptions {
                format: Some(Format::Vmdk),
                ..OpenOptions::default()
            };
            let e = Image::open(&path, &options).expect_err(name).to_string();
            assert!(e.contains(expect), "{name}: {e}");
        }
        if !have("qemu-img") {
            return;
        }
        // A sparse extent whose header capacity disagrees with the extent line.
        qemu_img(d, &["create", "-f", "vmdk", &p(d, "s.vmdk"), "1M"]);
        let path = pb(d, "sizes.vmdk");
        write_file(&path, b"# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\ncreateType=\"twoGbMaxExtentSparse\"\nRW 4096 SPARSE \"s.vmdk\"\n");
        let e = open_err(&path).to_string();
        assert!(
            e.contains("4096 sectors") && e.contains("2048 sectors"),
            "{e}"
        );
    });
}

/// How the spec builder stores one grain.
#[derive(Clone, Copy, PartialEq)]
enum GrainMode {
    Absent,
    Stored,
}

fn marker(value: u64, kind: u32) -> Vec<u8> {
    let mut m = vec![0u8; SECTOR];
    m[0..8].copy_from_slice(&value.to_le_bytes());
    m[12..16].copy_from_slice(&kind.to_le_bytes());
    m
}

fn pad_to_sector(v: &mut Vec<u8>) {
    let r = v.len() % SECTOR;
    if r != 0 {
        v.resize(v.len() + SECTOR - r, 0);
    }
}

/// A VMware-layout streamOptimized file written from the VMDK 1.1 spec: header with
/// gdOffset = GD_AT_END, embedded descriptor, compressed grains with grain markers,
/// each grain table after its grains behind a GT marker, the GD behind a GD marker,
/// then a footer marker, the footer (the header with the real gdOffset) and an EOS
/// marker. `mode(g)` decides which grains are stored; a grain table with no stored
/// grain is left out (GD entry 0).
fn build_vmware_stream(data: &[u8], mode: impl Fn(usize) -> GrainMode) -> Vec<u8> {
    assert_eq!(data.len() % SECTOR, 0);
    let capacity = (data.len() / SECTOR) as u64;
    let grains = data.len().div_ceil(GRAIN);
    let tables = grains.div_ceil(512);
    let descriptor = format!(
        "# Disk DescriptorFile\nversion=1\nCID=1234abcd\nparentCID=ffffffff\ncreateType=\"streamOptimized\"\n\n\
         # Extent description\nRW {capacity} SPARSE \"stream.vmdk\"\n\n# The Disk Data Base\n#DDB\n\n\
         ddb.adapterType = \"lsilogic\"\nddb.virtualHWVersion = \"4\"\n"
    );
    let desc_sectors = 2u64;
    let overhead = 128u64;
    let header = |gd_offset: u64| {
        let mut h = vec![0u8; SECTOR];
        h[0..4].copy_from_slice(b"KDMV");
        h[4..8].copy_from_slice(&3u32.to_le_bytes());
        h[8..12].copy_from_slice(&0x30001u32.to_le_bytes());
        h[12..20].copy_from_slice(&capacity.to_le_bytes());
        h[20..28].copy_from_slice(&128u64.to_le_bytes());
        h[28..36].copy_from_slice(&1u64.to_le_bytes());
        h[36..44].copy_from_slice(&desc_sectors.to_le_bytes());
        h[44..48].copy_from_slice(&512u32.to_le_bytes());
        h[56..64].copy_from_slice(&gd_offset.to_le_bytes());
        h[64..72].copy_from_slice(&overhead.to_le_bytes());
        h[73..77].copy_from_slice(b"\n \r\n");
        h[77..79].copy_from_slice(&1u16.to_le_bytes());
        h
    };
    let mut out = header(u64::MAX);
    let mut desc = descriptor.into_bytes();
    desc.resize(desc_sectors as usize * SECTOR, 0);
    out.extend_from_slice(&desc);
    out.resize(overhead as usize * SECTOR, 0);
    let mut gd = vec![0u32; tables];
    for (t, gd_entry) in gd.iter_mut().enumerate() {
        let mut gt = vec![0u32; 512];
        for (slot, gte) in gt.iter_mut().enumerate() {
            let g = t * 512 + slot;
            if g >= grains || mode(g) == GrainMode::Absent {
                continue;
            }
            // The last grain may be partial: compress a full grain, zero-padded.
            let mut grain = data[g * GRAIN..((g + 1) * GRAIN).min(data.len())].to_vec();
            grain.resize(GRAIN, 0);
            let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
            z.write_all(&grain).unwrap();
            let z = z.finish().unwrap();
            *gte = (out.len() / SECTOR) as u32;
            out.extend_from_slice(&((g * GRAIN / SECTOR) as u64).to_le_bytes());
            out.extend_from_slice(&(z.len() as u32).to_le_bytes());
            out.extend_from_slice(&z);
            pad_to_sector(&mut out);
        }
        if gt.iter().all(|&e| e == 0) {
            continue;
        }
        out.extend_from_slice(&marker(4, 1));
        *gd_entry = (out.len() / SECTOR) as u32;
        for e in gt {
            out.extend_from_slice(&e.to_le_bytes());
        }
    }
    let gd_sectors = (tables * 4).div_ceil(SECTOR) as u64;
    out.extend_from_slice(&marker(gd_sectors, 2));
    let gd_offset = (out.len() / SECTOR) as u64;
    for e in &gd {
        out.extend_from_slice(&e.to_le_bytes());
    }
    pad_to_sector(&mut out);
    out.extend_from_slice(&marker(1, 3));
    out.extend_from_slice(&header(gd_offset));
    out.extend_from_slice(&marker(0, 0));
    out
}

/// A libvmdk FUSE mount, unmounted on drop.
struct FuseMount(PathBuf);

impl Drop for FuseMount {
    fn drop(&mut self) {
        for tool in ["fusermount", "fusermount3"] {
            if Command::new(tool)
                .arg("-u")
                .arg(&self.0)
                .status()
                .is_ok_and(|s| s.success())
            {
                return;
            }
        }
    }
}

#[test]
fn vmware_layout_streams() {
    with_tools(&["qemu-img"], |d| {
        // (a) python3-vmdkstream (Debian's python, not the pyenv one on PATH).
        let base = make_base_raw(d);
        if Path::new("/usr/bin/python3").exists() {
            let vs = pb(d, "vs.vmdk");
            let out = Command::new("/usr/bin/python3")
                .args([
                    "-c",
                    "import VMDKstream; VMDKstream.convert_to_stream('base.raw','vs.vmdk')",
                ])
                .current_dir(d)
                .output()
                .unwrap();
            if out.status.success() {
                like_qemu(&vs);
                assert_same_bytes(
                    "vmdkstream vs base",
                    &read_all(&open(&vs, None), 1 << 20, 0),
                    &std::fs::read(&base).unwrap(),
                );
                let image = open(&vs, None);
                assert!(image.info()[0].features.iter().any(|f| f == "gd_at_end"));
                let report = image.check()[0].1.as_ref().unwrap().clone();
                assert!(report.errors.is_empty(), "{report:?}");
            } else {
                eprintln!(
                    "python3-vmdkstream unavailable: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }

        // (b) the spec builder: 96 MiB + 7 sectors (partial last grain), data in the first
        // and last grain tables, the middle table absent, zero grains both absent and
        // stored.
        let size = (96 << 20) + 7 * SECTOR;
        let mut model = vec![0u8; size];
        model[..300_000].copy_from_slice(&pattern(300_000, 3));
        model[5 * GRAIN + 100..5 * GRAIN + 200].fill(0xee);
        let tail = size - 3 * GRAIN - 1000;
        model[tail..].copy_from_slice(&pattern(size - tail, 9));
        let stored_zero = 7usize; // an all-zero grain stored compressed
        let grains = size.div_ceil(GRAIN);
        let model_ref = &model;
        let stream = build_vmware_stream(&model, |g| {
            let chunk = &model_ref[g * GRAIN..((g + 1) * GRAIN).min(size)];
            if g == stored_zero || chunk.iter().any(|&b| b != 0) {
                GrainMode::Stored
            } else {
                GrainMode::Absent
            }
        });
        assert!(grains > 1024);
        let path = pb(d, "stream.vmdk");
        write_file(&path, &stream);
        assert_reads_model(&path, &model);
        like_qemu(&path);
        let image = open(&path, None);
        let report = image.check()[0].1.as_ref().unwrap().clone();
        assert!(
            report.errors.is_empty() && report.warnings.is_empty(),
            "{report:?}"
        );
        assert_eq!(info_detail(&image, "CID").as_deref(), Some("1234abcd"));

        // libvmdk recognises it and reads the same bytes.
        if have("vmdkinfo") && have("vmdkmount") && Path::new("/dev/fuse").exists() {
            let info = run("vmdkinfo", &[s(&path)], d);
            let text = String::from_utf8_lossy(&info.stdout);
            assert!(
                text.contains("Stream optimized") || text.contains("streamOptimized"),
                "{text}"
            );
            let mnt = pb(d, "mnt");
            std::fs::create_dir(&mnt).unwrap();
            run("vmdkmount", &[s(&path), s(&mnt)], d);
            let guard = FuseMount(mnt.clone());
            let theirs = std::fs::read(mnt.join("vmdk1")).unwrap();
            drop(guard);
            assert_same_bytes("libvmdk vs model", &theirs, &model);
        }

        // Truncated: the footer is gone.
        let cut = pb(d, "cut.vmdk");
        write_file(&cut, &stream[..stream.len() - 1024]);
        let e = open_err(&cut).to_string();
        assert!(e.contains("footer"), "{e}");
    });
}

/// A COWD (vmfsSparse) extent written from qemu's VMDK3 header layout: 4096-entry
/// grain tables, granularity in sectors.
fn build_cowd(data: &[u8], granularity: usize, stored: impl Fn(usize) -> bool) -> Vec<u8> {
    let grain = granularity * SECTOR;
    let capacity = data.len() / SECTOR;
    let grains = data.len().div_ceil(grain);
    let tables = grains.div_ceil(4096);
    let mut out = vec![0u8; SECTOR];
    out[0..4].copy_from_slice(b"COWD");
    out[4..8].copy_from_slice(&1u32.to_le_bytes());
    out[8..12].copy_from_slice(&3u32.to_le_bytes());
    out[12..16].copy_from_slice(&(capacity as u32).to_le_bytes());
    out[16..20].copy_from_slice(&(granularity as u32).to_le_bytes());
    out[20..24].copy_from_slice(&1u32.to_le_bytes()); // GD at sector 1
    out[24..28].copy_from_slice(&(tables as u32).to_le_bytes());
    let gd_at = out.len();
    out.resize(out.len() + tables * 4, 0);
    pad_to_sector(&mut out);
    for t in 0..tables {
        let gt_at = out.len();
        out[gd_at + t * 4..gd_at + t * 4 + 4]
            .copy_from_slice(&((gt_at / SECTOR) as u32).to_le_bytes());
        out.resize(out.len() + 4096 * 4, 0);
        for slot in 0..4096 {
            let g = t * 4096 + slot;
            if g >= grains || !stored(g) {
                continue;
            }
            let at = out.len();
            out[gt_at + slot * 4..gt_at + slot * 4 + 4]
                .copy_from_slice(&((at / SECTOR) as u32).to_le_bytes());
            let mut chunk = data[g * grain..((g + 1) * grain).min(data.len())].to_vec();
            chunk.resize(grain, 0);
            out.extend_from_slice(&chunk);
        }
    }
    out
}

#[test]
fn vmfs_sparse_cowd_extent() {
    with_tools(&["qemu-img"], |d| {
        let size = 20 << 20;
        let mut model = pattern(size, 5);
        // Unstored grains read as zeroes (no parent).
        let granularity = 8; // 4 KiB grains: 16 MiB per grain table, so two tables
        let stored = |g: usize| g % 3 != 1;
        for g in 0..size / (granularity * SECTOR) {
            if !stored(g) {
                model[g * 4096..(g + 1) * 4096].fill(0);
            }
        }
        let cowd = build_cowd(&model, granularity, stored);
        write_file(&pb(d, "delta.cowd"), &cowd);
        let path = pb(d, "vmfssparse.vmdk");
        write_file(
            &path,
            format!(
                "# Disk DescriptorFile\nversion=1\nCID=22222222\nparentCID=ffffffff\ncreateType=\"vmfsSparse\"\n\
                 RW {} VMFSSPARSE \"delta.cowd\"\n",
                size / SECTOR
            )
            .as_bytes(),
        );
        assert_reads_model(&path, &model);
        like_qemu(&path);
        let image = open(&path, None);
        assert!(image.info()[0].features.iter().any(|f| f == "cowd"));
        let report = image.check()[0].1.as_ref().unwrap().clone();
        assert!(report.errors.is_empty(), "{report:?}");
    });
}
