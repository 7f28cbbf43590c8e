//! The VHD format: qemu-made fixed and dynamic images compared with qemu, and
//! differencing chains built here from the spec (qemu cannot create them and misreads
//! them) compared with an in-memory model and with libvhdi (`vhdiinfo`, `vhdimount`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use thinline_format::{Format, Image, OpenOptions};

const SECTOR: usize = 512;

fn qemu_virtual_size(path: &Path) -> u64 {
    let out = qemu_img(
        path.parent().unwrap(),
        &["info", "--output=json", "-f", "vpc", s(path)],
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["virtual-size"].as_u64().unwrap()
}

/// qemu reports a whole allocated block of a dynamic VHD as data that is not zero (it
/// does not ask the file about holes for `vpc`), while Thinline refines allocated data
/// over file holes to "data, reads as zero" (true, and what qemu does for formats that
/// recurse). So for dynamic images the zero flag of data runs is not compared; the
/// bytes are compared separately by `assert_reads_like_qemu`.
fn assert_dynamic_map_like_qemu(path: &Path) {
    let image = open(path, Some(Format::Vhd));
    let normalize = |runs: Vec<(u64, u64, MapClass)>| {
        let mut out: Vec<(u64, u64, MapClass)> = Vec::new();
        for (start, len, mut class) in runs {
            if class.data {
                class.zero = false;
            }
            match out.last_mut() {
                Some(last) if last.2 == class && last.0 + last.1 == start => last.1 += len,
                _ => out.push((start, len, class)),
            }
        }
        out
    };
    let ours = normalize(our_map(&image));
    let theirs = normalize(qemu_map(path, "vpc"));
    assert_eq!(
        ours,
        theirs,
        "{}: map differs from qemu-img map",
        path.display()
    );
}

/// Writes at odd offsets, across a block boundary, zero writes and a discard.
const QEMU_IO_OPS: &[&str] = &[
    "write -P 0x11 1000 5000",
    "write -P 0x22 3M 1M",
    "write -z 3500k 64k",
    "write -P 0x33 4194000 1000",
    "discard 3M 64k",
    "write -P 0x44 40000001 777",
];

/// Makes `{sub}-{force}.vhd` (created, then written by qemu-io) and
/// `conv-{sub}-{force}.vhd` (converted from the base raw image) for both `force_size`
/// settings, and checks each against qemu.
fn check_qemu_made(sub: &str) {
    let dir = scratch();
    let d = dir.path();
    let base = make_base_raw(d);
    let mut made = Vec::new();
    for force in ["off", "on"] {
        let opts = format!("subformat={sub},force_size={force}");
        let created = p(d, &format!("{sub}-{force}.vhd"));
        qemu_create(d, "vpc", &opts, &created, "64M");
        qemu_io(d, "vpc", &created, QEMU_IO_OPS);
        let conv = p(d, &format!("conv-{sub}-{force}.vhd"));
        let base = s(&base);
        qemu_img(
            d,
            &[
                "convert", "-f", "raw", "-O", "vpc", "-o", &opts, base, &conv,
            ],
        );
        made.extend([PathBuf::from(created), PathBuf::from(conv)]);
    }
    for path in &made {
        assert_reads_like_qemu(path, "vpc", Some(Format::Vhd));
        if sub == "fixed" {
            assert_map_like_qemu(path, "vpc", Some(Format::Vhd));
        } else {
            assert_dynamic_map_like_qemu(path);
        }
        // Detected from the content (a fixed VHD by its footer), sized as qemu does:
        // 64M is 67125248 bytes by CHS without force_size, exactly 64 MiB with it.
        let image = open(path, None);
        let what = path.display();
        assert_eq!(image.layers()[0].format(), Format::Vhd, "{what}");
        assert_eq!(image.info()[0].subformat.as_deref(), Some(sub), "{what}");
        assert_eq!(image.size(), qemu_virtual_size(path), "{what}");
    }
    assert_eq!(open(&made[0], None).size(), 67_125_248);
    assert_eq!(open(&made[2], None).size(), 64 << 20);
}

#[test]
fn qemu_made_dynamic_images_read_and_map_like_qemu() {
    if have("qemu-img") && have("qemu-io") {
        check_qemu_made("dynamic");
    }
}

#[test]
fn qemu_made_fixed_images_read_and_map_like_qemu() {
    if have("qemu-img") && have("qemu-io") {
        check_qemu_made("fixed");
    }
}

#[test]
fn large_chs_rounded_sizes_match_qemu() {
    with_tools(&["qemu-img"], |d| {
        for (name, size, opts) in [
            ("1g.vhd", "1G", "subformat=dynamic"),
            ("1g-exact.vhd", "1G", "subformat=dynamic,force_size=on"),
            ("odd.vhd", "1234567k", "subformat=dynamic"),
        ] {
            let path = pb(d, name);
            qemu_create(d, "vpc", opts, s(&path), size);
            let image = open(&path, None);
            assert_eq!(image.size(), qemu_virtual_size(&path), "{name}");
            assert_dynamic_map_like_qemu(&path);
        }
        assert_eq!(open(&pb(d, "1g.vhd"), None).size(), 1_073_995_776);
    });
}

// ---------------------------------------------------------------------------------
// A VHD writer from the spec, for dynamic and differencing disks.

fn checksum(buf: &[u8], at: usize) -> u32 {
    let sum = buf
        .iter()
        .enumerate()
        .filter(|(i, _)| !(at..at + 4).contains(i))
        .fold(0u32, |s, (_, &b)| s.wrapping_add(u32::from(b)));
    !sum
}

fn put(buf: &mut [u8], at: usize, bytes: &[u8]) {
    buf[at..at + bytes.len()].copy_from_slice(bytes);
}

/// The spec's CHS algorithm (appendix "CHS Calculation").
fn chs(size: u64) -> (u16, u8, u8) {
    let total = (size / 512).min(65535 * 16 * 255);
    let (spt, heads, cth);
    if total >= 65535 * 16 * 63 {
        spt = 255;
        heads = 16;
        cth = total / spt;
    } else {
        let mut s = 17;
        let mut c = total / s;
        let mut h = c.div_ceil(1024).max(4);
        if c >= h * 1024 || h > 16 {
            s = 31;
            h = 16;
            c = total / s;
        }
        if c >= h * 1024 {
            s = 63;
            h = 16;
            c = total / s;
        }
        spt = s;
        heads = h;
        cth = c;
    }
    ((cth / heads) as u16, heads as u8, spt as u8)
}

fn utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

/// Where a differencing disk's parent is.
#[derive(Clone, Default)]
struct ParentRef {
    uuid: [u8; 16],
    unicode_name: String,
    w2ru: Option<String>,
    w2ku: Option<String>,
    macx: Option<String>,
}

/// One layer of the model: its bytes and which sectors it holds.
#[derive(Clone)]
struct LayerModel {
    data: Vec<u8>,
    present: Vec<bool>,
}

impl LayerModel {
    fn new(size: usize) -> LayerModel {
        LayerModel {
            data: vec![0; size],
            present: vec![false; size / SECTOR],
        }
    }

    /// Marks `[start, start + len)` (sector-aligned) as held here, filled by `pattern`.
    fn write(&mut self, start: usize, len: usize, pattern: u8) {
        for (i, b) in self.data[start..start + len].iter_mut().enumerate() {
            *b = pattern ^ ((start + i) as u8 & 0x0f);
        }
        for s in start / SECTOR..(start + len) / SECTOR {
            self.present[s] = true;
        }
    }
}

struct VhdSpec<'a> {
    layer: &'a LayerModel,
    block_size: u32,
    uuid: [u8; 16],
    /// `Some` makes a differencing disk.
    parent: Option<ParentRef>,
}

fn footer_bytes(disk_type: u32, size: u64, uuid: [u8; 16]) -> Vec<u8> {
    let mut f = vec![0u8; 512];
    put(&mut f, 0, b"conectix");
    put(&mut f, 8, &2u32.to_be_bytes());
    put(&mut f, 12, &0x0001_0000u32.to_be_bytes());
    put(&mut f, 16, &512u64.to_be_bytes());
    put(&mut f, 24, &0x2e00_0000u32.to_be_bytes());
    put(&mut f, 28, b"win ");
    put(&mut f, 32, &0x000a_0000u32.to_be_bytes());
    put(&mut f, 36, b"Wi2k");
    put(&mut f, 40, &size.to_be_bytes());
    put(&mut f, 48, &size.to_be_bytes());
    let (c, h, s) = chs(size);
    put(&mut f, 56, &c.to_be_bytes());
    f[58] = h;
    f[59] = s;
    put(&mut f, 60, &disk_type.to_be_bytes());
    put(&mut f, 68, &uuid);
    let sum = checksum(&f, 64);
    put(&mut f, 64, &sum.to_be_bytes());
    f
}

/// Builds a dynamic or differencing VHD holding `spec.layer`: blocks with any present
/// sector are allocated, their bitmaps mark the present sectors, and the sectors not
/// present hold stale filler (0xEE) that a reader ignoring the bitmap would expose.
fn build_vhd(spec: &VhdSpec) -> Vec<u8> {
    let size = spec.layer.data.len();
    let block = spec.block_size as usize;
    let sectors_per_block = block / SECTOR;
    let bitmap_size = sectors_per_block.div_ceil(8).next_multiple_of(SECTOR);
    let entries = size.div_ceil(block);
    let disk_type = if spec.parent.is_some() { 4 } else { 3 };
    let footer = footer_bytes(disk_type, size as u64, spec.uuid);

    let mut header = vec![0u8; 1024];
    put(&mut header, 0, b"cxsparse");
    put(&mut header, 8, &u64::MAX.to_be_bytes());
    let bat_at = 1536usize;
    put(&mut header, 16, &(bat_at as u64).to_be_bytes());
    put(&mut header, 24, &0x0001_0000u32.to_be_bytes());
    put(&mut header, 28, &(entries as u32).to_be_bytes());
    put(&mut header, 32, &spec.block_size.to_be_bytes());
    let bat_len = (entries * 4).next_multiple_of(SECTOR);
    let mut next = bat_at + bat_len;
    let mut locator_data = Vec::new();
    if let Some(parent) = &spec.parent {
        put(&mut header, 40, &parent.uuid);
        put(&mut header, 56, &0x2e00_0000u32.to_be_bytes());
        for (i, u) in parent.unicode_name.encode_utf16().enumerate() {
            put(&mut header, 64 + 2 * i, &u.to_be_bytes());
        }
        let mut locators: Vec<(&[u8; 4], Vec<u8>)> = Vec::new();
        if let Some(p) = &parent.w2ku {
            locators.push((b"W2ku", utf16le(p)));
        }
        if let Some(p) = &parent.w2ru {
            locators.push((b"W2ru", utf16le(p)));
        }
        if let Some(p) = &parent.macx {
            locators.push((b"MacX", p.as_bytes().to_vec()));
        }
        for (i, (code, data)) in locators.into_iter().enumerate() {
            let at = 576 + 24 * i;
            let space = data.len().next_multiple_of(SECTOR);
            put(&mut header, at, code);
            put(&mut header, at + 4, &(space as u32).to_be_bytes());
            put(&mut header, at + 8, &(data.len() as u32).to_be_bytes());
            put(&mut header, at + 16, &(next as u64).to_be_bytes());
            let mut padded = data;
            padded.resize(space, 0);
            locator_data.extend(padded);
            next += space;
        }
    }
    let sum = checksum(&header, 36);
    put(&mut header, 36, &sum.to_be_bytes());

    let mut bat = vec![0xFFu8; bat_len];
    let mut blocks = Vec::new();
    for b in 0..entries {
        let first = b * sectors_per_block;
        let last = ((b + 1) * sectors_per_block).min(size / SECTOR);
        if !spec.layer.present[first..last].iter().any(|&p| p) {
            continue;
        }
        put(&mut bat, 4 * b, &((next / SECTOR) as u32).to_be_bytes());
        let mut bitmap = vec![0u8; bitmap_size];
        let mut data = vec![0xEEu8; block];
        for s in first..last {
            if spec.layer.present[s] {
                let i = s - first;
                bitmap[i / 8] |= 0x80 >> (i % 8);
                data[i * SECTOR..(i + 1) * SECTOR]
                    .copy_from_slice(&spec.layer.data[s * SECTOR..(s + 1) * SECTOR]);
            }
        }
        blocks.extend(bitmap);
        blocks.extend(data);
        next += bitmap_size + block;
    }
    let mut image = footer.clone();
    image.extend(header);
    image.extend(bat);
    image.extend(locator_data);
    image.extend(blocks);
    image.extend(footer);
    image
}

/// What the chain `layers` (top first) reads: the topmost layer holding each sector.
fn model_bytes(layers: &[&LayerModel]) -> Vec<u8> {
    let size = layers[0].data.len();
    let mut out = vec![0u8; size];
    for s in 0..size / SECTOR {
        if let Some(l) = layers.iter().find(|l| l.present.get(s) == Some(&true)) {
            out[s * SECTOR..(s + 1) * SECTOR]
                .copy_from_slice(&l.data[s * SECTOR..(s + 1) * SECTOR]);
        }
    }
    out
}

/// The map the chain should report: sectors held by layer i are data at depth i (qemu
/// numbering, 0 = top); the rest are zeroes provided by the bottom (dynamic) layer.
fn model_map(layers: &[&LayerModel]) -> Vec<(u64, u64, MapClass)> {
    let sectors = layers[0].data.len() / SECTOR;
    let mut runs: Vec<(u64, u64, MapClass)> = Vec::new();
    for s in 0..sectors {
        let class = match layers.iter().position(|l| l.present.get(s) == Some(&true)) {
            Some(depth) => MapClass {
                present: true,
                zero: false,
                data: true,
                depth: Some(depth as u32),
            },
            None => MapClass {
                present: true,
                zero: true,
                data: false,
                depth: Some(layers.len() as u32 - 1),
            },
        };
        let start = (s * SECTOR) as u64;
        match runs.last_mut() {
            Some(last) if last.2 == class => last.1 += SECTOR as u64,
            _ => runs.push((start, SECTOR as u64, class)),
        }
    }
    runs
}

fn assert_chain_like_model(top: &Path, layers: &[&LayerModel]) {
    let image = open(top, None);
    assert_eq!(image.layers().len(), layers.len(), "chain length");
    let expected = model_bytes(layers);
    assert_reads_as(&image, &top.display().to_string(), &expected, &CHUNKINGS);
    assert_eq!(our_map(&image), model_map(layers), "{}: map", top.display());
}

const MIB: usize = 1 << 20;
/// Not a multiple of any block size, to exercise the short last block.
const CHAIN_SIZE: usize = 5 * MIB + 3 * SECTOR;
const PARENT_UUID: [u8; 16] = [0x11; 16];
const CHILD_UUID: [u8; 16] = [
    0x6f, 0x2c, 0x91, 0x3a, 0x54, 0x0b, 0x4e, 0x8d, 0x9a, 0x31, 0x07, 0xc2, 0xde, 0x55, 0x10, 0x02,
];
const GRANDCHILD_UUID: [u8; 16] = [0x33; 16];

fn parent_model() -> LayerModel {
    let mut m = LayerModel::new(CHAIN_SIZE);
    m.write(0, 3 * MIB, 0xA0);
    m.write(4 * MIB + 8 * SECTOR, 16 * SECTOR, 0xA8);
    m.write(CHAIN_SIZE - 2 * SECTOR, 2 * SECTOR, 0xAF);
    m
}

fn child_model() -> LayerModel {
    let mut m = LayerModel::new(CHAIN_SIZE);
    m.write(0, 8 * SECTOR, 0xC0); // the start of block 0, rest from the parent
    m.write(100 * SECTOR, 3 * SECTOR, 0xC1);
    m.write(MIB - SECTOR, 2 * SECTOR, 0xC2); // across a 512 KiB block boundary
    m.write(2 * MIB + 77 * SECTOR, 200 * SECTOR, 0xC3);
    m.write(3 * MIB + 5 * SECTOR, 4 * SECTOR, 0xC4); // over nothing in the parent
    m
}

fn grandchild_model() -> LayerModel {
    let mut m = LayerModel::new(CHAIN_SIZE);
    m.write(4 * SECTOR, 8 * SECTOR, 0xD0); // half over the child, half over the parent
    m.write(2 * MIB + 100 * SECTOR, 10 * SECTOR, 0xD1);
    m.write(CHAIN_SIZE - SECTOR, SECTOR, 0xD2);
    m
}

/// A reference to PARENT_UUID under these names: the Unicode name and the W2ru, W2ku
/// and MacX locators (None: no such locator).
fn parent_named(unicode_name: &str, [w2ru, w2ku, macx]: [Option<&str>; 3]) -> ParentRef {
    ParentRef {
        uuid: PARENT_UUID,
        unicode_name: unicode_name.to_owned(),
        w2ru: w2ru.map(str::to_owned),
        w2ku: w2ku.map(str::to_owned),
        macx: macx.map(str::to_owned),
    }
}

/// A differencing disk over `layer` (CHILD_UUID, 512 KiB blocks) whose parent is `parent`.
fn child_spec(layer: &LayerModel, parent: ParentRef) -> VhdSpec<'_> {
    VhdSpec {
        layer,
        block_size: 512 * 1024,
        uuid: CHILD_UUID,
        parent: Some(parent),
    }
}

fn parent_ref(uuid: [u8; 16], file: &str) -> ParentRef {
    ParentRef {
        uuid,
        unicode_name: file.to_owned(),
        w2ru: Some(format!(".\\{file}")),
        w2ku: Some(format!("C:\\Hyper-V\\disks\\{file}")),
        macx: Some(format!("file://./{file}")),
    }
}

/// Writes parent.vhd (dynamic), child.vhd and grandchild.vhd (differencing) into `dir`.
fn write_chain(dir: &Path) -> (LayerModel, LayerModel, LayerModel) {
    let (parent, child, grandchild) = (parent_model(), child_model(), grandchild_model());
    let files = [
        ("parent.vhd", &parent, 2 * MIB as u32, PARENT_UUID, None),
        (
            "child.vhd",
            &child,
            512 * 1024,
            CHILD_UUID,
            Some(parent_ref(PARENT_UUID, "parent.vhd")),
        ),
        (
            "grandchild.vhd",
            &grandchild,
            2 * MIB as u32,
            GRANDCHILD_UUID,
            Some(parent_ref(CHILD_UUID, "child.vhd")),
        ),
    ];
    for (name, layer, block_size, uuid, parent) in files {
        let spec = VhdSpec {
            layer,
            block_size,
            uuid,
            parent,
        };
        std::fs::write(dir.join(name), build_vhd(&spec)).unwrap();
    }
    (parent, child, grandchild)
}

#[test]
fn hand_built_chain_reads_and_maps_like_the_model() {
    in_scratch(|d| {
        let (parent, child, grandchild) = write_chain(d);
        assert_chain_like_model(&pb(d, "parent.vhd"), &[&parent]);
        assert_chain_like_model(&pb(d, "child.vhd"), &[&child, &parent]);
        assert_chain_like_model(&pb(d, "grandchild.vhd"), &[&grandchild, &child, &parent]);

        let image = open(&pb(d, "grandchild.vhd"), None);
        let info = image.info();
        assert_eq!(info[0].subformat.as_deref(), Some("differencing"));
        assert_eq!(info[2].subformat.as_deref(), Some("dynamic"));
        let detail = |i: usize, key: &str| {
            info[i]
                .details
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(
            detail(1, "parent uuid").as_deref(),
            Some("11111111-1111-1111-1111-111111111111")
        );
        assert_eq!(detail(1, "parent name").as_deref(), Some("parent.vhd"));
        assert_eq!(
            detail(0, "size rule").as_deref(),
            Some("current_size (creator \"win \")")
        );
        assert_eq!(info[1].cluster_size, Some(512 * 1024));
        for (name, result) in image.check() {
            let report = result.unwrap();
            assert!(report.errors.is_empty(), "{name}: {:?}", report.errors);
        }
    });
}

#[test]
fn parents_are_found_relative_to_the_child_and_checked_by_uuid() {
    in_scratch(|d| {
        let (parent, child, _) = write_chain(d);
        // A child in a subdirectory naming its parent `..\parent.vhd`: resolved against the
        // child's directory, not the process's (the test's CWD is the crate directory).
        std::fs::create_dir(d.join("sub")).unwrap();
        let relative = child_spec(
            &child,
            parent_named(
                "not-here.vhd",
                [
                    Some("..\\parent.vhd"),
                    Some("C:\\elsewhere\\not-here.vhd"),
                    None,
                ],
            ),
        );
        let sub_child = d.join("sub").join("child.vhd");
        std::fs::write(&sub_child, build_vhd(&relative)).unwrap();
        assert_ne!(std::env::current_dir().unwrap(), d.join("sub"));
        assert_chain_like_model(&sub_child, &[&child, &parent]);

        // Only the file name of an absolute Windows path (tried last) finds the parent.
        let windows_only = VhdSpec {
            parent: Some(parent_named(
                "",
                [None, Some("C:\\Hyper-V\\parent.vhd"), None],
            )),
            ..relative
        };
        let abs_child = d.join("abs-child.vhd");
        std::fs::write(&abs_child, build_vhd(&windows_only)).unwrap();
        assert_chain_like_model(&abs_child, &[&child, &parent]);

        // A parent with another UUID is refused, naming both UUIDs.
        let wrong = child_spec(&child, parent_ref([0x99; 16], "parent.vhd"));
        let wrong_child = d.join("wrong-child.vhd");
        std::fs::write(&wrong_child, build_vhd(&wrong)).unwrap();
        let e = Image::open(&wrong_child, &OpenOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("{:?}", [0x99u8; 16])), "{e}");
        assert!(e.contains(&format!("{:?}", [0x11u8; 16])), "{e}");

        // A missing parent: the error names the locator names tried.
        let missing = VhdSpec {
            parent: Some(parent_named(
                "gone.vhd",
                [
                    Some(".\\lost\\gone.vhd"),
                    Some("D:\\vm\\gone.vhd"),
                    Some("file:///srv/gone.vhd"),
                ],
            )),
            ..relative
        };
        let orphan = d.join("orphan.vhd");
        std::fs::write(&orphan, build_vhd(&missing)).unwrap();
        let e = Image::open(&orphan, &OpenOptions::default())
            .unwrap_err()
            .to_string();
        for name in ["lost/gone.vhd", "/srv/gone.vhd", "gone.vhd"] {
            assert!(e.contains(name), "{name} not in {e}");
        }
    });
}

#[test]
fn hand_built_child_of_a_qemu_made_parent() {
    with_tools(&["qemu-img", "qemu-io"], |d| {
        let parent_path = p(d, "qparent.vhd");
        let size = CHAIN_SIZE.to_string();
        qemu_create(
            d,
            "vpc",
            "subformat=dynamic,force_size=on",
            &parent_path,
            &size,
        );
        qemu_io(
            d,
            "vpc",
            &parent_path,
            &["write -P 0x5a 0 3M", "write -P 0x5b 4100000 10000"],
        );
        let parent_bytes = std::fs::read(&parent_path).unwrap();
        let uuid: [u8; 16] = parent_bytes[68..84].try_into().unwrap();
        // qemu allocates whole blocks (bitmaps all ones): model it as holding every sector
        // of its allocated blocks, with qemu's own bytes.
        let qemu_view = qemu_raw(Path::new(&parent_path), "vpc");
        assert_eq!(qemu_view.len(), CHAIN_SIZE);
        let parent = LayerModel {
            data: qemu_view,
            present: (0..CHAIN_SIZE / SECTOR)
                .map(|s| s * SECTOR < 4 * MIB)
                .collect(),
        };
        let child = child_model();
        let spec = child_spec(&child, parent_ref(uuid, "qparent.vhd"));
        let child_path = d.join("qchild.vhd");
        std::fs::write(&child_path, build_vhd(&spec)).unwrap();
        let image = open(&child_path, None);
        let expected = model_bytes(&[&child, &parent]);
        assert_same_bytes("qchild", &read_all(&image, 65536 * 3, 511), &expected);
    });
}

#[test]
fn damaged_files_are_refused_without_panics() {
    in_scratch(|d| {
        write_chain(d);
        let good = std::fs::read(d.join("child.vhd")).unwrap();
        let len = good.len();
        let reseal = |img: &mut Vec<u8>, start: usize, size: usize, at: usize| {
            let sum = checksum(&img[start..start + size], at);
            put(img, start + at, &sum.to_be_bytes());
        };
        let try_open = |name: &str, img: &[u8]| -> String {
            let path = d.join(name);
            std::fs::write(&path, img).unwrap();
            match Image::open(&path, &OpenOptions::default()) {
                Ok(_) => panic!("{name}: opened"),
                Err(e) => e.to_string(),
            }
        };
        let mut cases: Vec<(&str, Vec<u8>, &str)> = Vec::new();
        let mut img = good.clone();
        img[40] ^= 0xff; // original_size, both copies
        img[len - 512 + 40] ^= 0xff;
        cases.push(("footer-sum.vhd", img, "footer checksum mismatch"));
        let mut img = good.clone();
        img[512 + 60] ^= 1;
        cases.push(("header-sum.vhd", img, "dynamic header checksum mismatch"));
        let mut img = good.clone();
        for start in [0, len - 512] {
            img[start + 63] = 5;
            reseal(&mut img, start, 512, 64);
        }
        cases.push(("type.vhd", img, "disk_type 5"));
        let mut img = good.clone();
        put(&mut img, 512 + 16, &(len as u64).to_be_bytes());
        reseal(&mut img, 512, 1024, 36);
        cases.push(("bat.vhd", img, "the BAT"));
        let mut img = good.clone();
        put(&mut img, 1536, &((len / 512 - 1) as u32).to_be_bytes());
        cases.push(("block.vhd", img, "block 0 at offset"));
        let mut img = good.clone();
        put(&mut img, 512 + 28, &0x4000_0000u32.to_be_bytes());
        reseal(&mut img, 512, 1024, 36);
        cases.push(("entries.vhd", img, "max_table_entries 1073741824"));
        let mut img = good.clone();
        put(&mut img, 512 + 32, &(3u32 << 18).to_be_bytes());
        reseal(&mut img, 512, 1024, 36);
        cases.push(("bsize.vhd", img, "block_size 786432"));
        for (name, img, needle) in cases {
            let e = try_open(name, &img);
            assert!(e.contains(needle), "{name}: {e}");
        }
        // Truncated anywhere: an error or (when only the trailing footer is lost) an image
        // whose check says so; never a panic.
        for cut in [
            0,
            100,
            511,
            512,
            1000,
            1600,
            3000,
            len / 2,
            len - 513,
            len - 1,
        ] {
            let path = d.join("cut.vhd");
            std::fs::write(&path, &good[..cut]).unwrap();
            let options = OpenOptions {
                format: Some(Format::Vhd),
                ..OpenOptions::default()
            };
            if let Ok(image) = Image::open(&path, &options) {
                let report = image.check().remove(0).1.unwrap();
                assert!(
                    !report.errors.is_empty(),
                    "cut at {cut}: check found nothing"
                );
            }
        }
    });
}

// ---------------------------------------------------------------------------------
// libvhdi as an independent reader.

/// Unmounts a FUSE mount point when dropped, whatever happened in between.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        for tool in ["fusermount3", "fusermount"] {
            let ok = Command::new(tool)
                .arg("-u")
                .arg(&self.0)
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return;
            }
        }
    }
}

/// libvhdi 20210425 reads a VHD bitmap bit as `byte >> (7 - bit)` without masking
/// (libvhdi_block_descriptor.c, `libvhdi_block_descriptor_read_sector_bitmap_data`),
/// so a sector whose bit is 0 counts as present when an earlier bit of the same byte is
/// set. It agrees with the spec (and with Thinline) on MSB-first order; only sectors
/// where that bug changes some layer's answer are left out of the comparison.
fn libvhdi_misreads(layers: &[&LayerModel], sector: usize) -> bool {
    layers.iter().any(|l| {
        let byte_start = sector & !7;
        let buggy = l.present[byte_start..=sector].iter().any(|&p| p);
        buggy != l.present[sector]
    })
}

fn format_uuid(u: &[u8; 16]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

#[test]
fn libvhdi_agrees_with_the_hand_built_images() {
    with_tools(&["vhdiinfo"], |d| {
        let (parent, child, grandchild) = write_chain(d);
        let out = run("vhdiinfo", &[&p(d, "child.vhd")], d);
        let text = String::from_utf8_lossy(&out.stdout).to_lowercase();
        assert!(text.contains("differential"), "{text}");
        assert!(text.contains(&format_uuid(&PARENT_UUID)), "{text}");
        assert!(text.contains("parent.vhd"), "{text}");
        assert!(text.contains(&format_uuid(&CHILD_UUID)), "{text}");
        assert!(text.contains(&CHAIN_SIZE.to_string()), "{text}");
        let out = run("vhdiinfo", &[&p(d, "parent.vhd")], d);
        assert!(String::from_utf8_lossy(&out.stdout).contains("Dynamic"));

        if !have("vhdimount") || !Path::new("/dev/fuse").exists() {
            return;
        }
        // vhdimount opens the parents named in the headers, beside each child, and shows
        // the chain as vhdi1 (the bottom parent) … vhdiN (the image given).
        for (top, layers) in [
            ("child.vhd", vec![&child, &parent]),
            ("grandchild.vhd", vec![&grandchild, &child, &parent]),
        ] {
            let mnt = d.join(format!("mnt-{top}"));
            std::fs::create_dir(&mnt).unwrap();
            run("vhdimount", &[&p(d, top), s(&mnt)], d);
            let _unmount = Unmount(mnt.clone());
            let theirs = std::fs::read(mnt.join(format!("vhdi{}", layers.len()))).unwrap();
            let expected = model_bytes(&layers);
            let ours = read_all(&open(&pb(d, top), None), 1 << 20, 0);
            assert_same_bytes(&format!("thinline {top}"), &ours, &expected);
            assert_eq!(theirs.len(), expected.len(), "vhdimount {top}: size");
            let mut compared = 0;
            for s in 0..expected.len() / SECTOR {
                if libvhdi_misreads(&layers, s) {
                    continue;
                }
                compared += 1;
                let range = s * SECTOR..(s + 1) * SECTOR;
                assert_same_bytes(
                    &format!("vhdimount {top} sector {s}"),
                    &theirs[range.clone()],
                    &expected[range],
                );
            }
            assert!(
                compared > expected.len() / SECTOR * 9 / 10,
                "{top}: {compared} sectors compared"
            );
        }
    });
}
