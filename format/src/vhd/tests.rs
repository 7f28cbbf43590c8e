//! Unit tests: images built in memory, damaged on purpose, opened through
//! `MemoryStorage`; each must read correctly or fail with an error naming the problem.

use std::collections::BTreeMap;

use super::*;
use crate::chain::{Image, OpenOptions};
use crate::storage::MemoryStorage;
use crate::test_util::{assert_check_error, check_report};

const BLOCK: u32 = 4096; // 8 sectors per block, bitmap padded to 512 bytes

fn put(buf: &mut [u8], at: usize, bytes: &[u8]) {
    buf[at..at + bytes.len()].copy_from_slice(bytes);
}

fn seal(buf: &mut [u8], checksum_at: usize) {
    let sum = header::checksum(buf, checksum_at);
    put(buf, checksum_at, &sum.to_be_bytes());
}

fn footer(disk_type: u32, creator: &[u8; 4], size: u64, chs: (u16, u8, u8), uuid: u8) -> Vec<u8> {
    let mut f = vec![0u8; 512];
    put(&mut f, 0, b"conectix");
    put(&mut f, 8, &2u32.to_be_bytes());
    put(&mut f, 12, &0x0001_0000u32.to_be_bytes());
    let data_offset: u64 = if disk_type == 2 { u64::MAX } else { 512 };
    put(&mut f, 16, &data_offset.to_be_bytes());
    put(&mut f, 28, creator);
    put(&mut f, 36, b"Wi2k");
    put(&mut f, 40, &size.to_be_bytes());
    put(&mut f, 48, &size.to_be_bytes());
    put(&mut f, 56, &chs.0.to_be_bytes());
    f[58] = chs.1;
    f[59] = chs.2;
    put(&mut f, 60, &disk_type.to_be_bytes());
    put(&mut f, 68, &[uuid; 16]);
    seal(&mut f, 64);
    f
}

/// A sparse image: `blocks[i]` is `None` (unallocated) or (bitmap byte, data fill).
struct Sparse {
    disk_type: u32,
    size: u64,
    uuid: u8,
    parent_uuid: u8,
    blocks: Vec<Option<(u8, u8)>>,
    locators: Vec<([u8; 4], Vec<u8>)>,
    parent_name: &'static str,
}

impl Sparse {
    fn dynamic(blocks: Vec<Option<(u8, u8)>>) -> Sparse {
        Sparse {
            disk_type: 3,
            size: blocks.len() as u64 * u64::from(BLOCK),
            uuid: 1,
            parent_uuid: 0,
            blocks,
            locators: Vec::new(),
            parent_name: "",
        }
    }

    /// Returns the image and the offset of its BAT.
    fn build(&self) -> (Vec<u8>, usize) {
        let foot = footer(
            self.disk_type,
            b"qem2",
            self.size,
            (65535, 16, 255),
            self.uuid,
        );
        let mut img = foot.clone();
        let mut hdr = vec![0u8; 1024];
        put(&mut hdr, 0, b"cxsparse");
        put(&mut hdr, 8, &u64::MAX.to_be_bytes());
        let bat_at = 1536usize;
        put(&mut hdr, 16, &(bat_at as u64).to_be_bytes());
        put(&mut hdr, 24, &0x0001_0000u32.to_be_bytes());
        put(&mut hdr, 28, &(self.blocks.len() as u32).to_be_bytes());
        put(&mut hdr, 32, &BLOCK.to_be_bytes());
        put(&mut hdr, 40, &[self.parent_uuid; 16]);
        for (i, u) in self.parent_name.encode_utf16().enumerate() {
            put(&mut hdr, 64 + 2 * i, &u.to_be_bytes());
        }
        let bat_len = (self.blocks.len() * 4).next_multiple_of(512);
        let mut next = bat_at + bat_len;
        let mut loc_data = Vec::new();
        for (i, (code, data)) in self.locators.iter().enumerate() {
            let at = 576 + 24 * i;
            put(&mut hdr, at, code);
            let space = data.len().next_multiple_of(512);
            put(&mut hdr, at + 4, &(space as u32).to_be_bytes());
            put(&mut hdr, at + 8, &(data.len() as u32).to_be_bytes());
            put(&mut hdr, at + 16, &(next as u64).to_be_bytes());
            let mut padded = data.clone();
            padded.resize(space, 0);
            loc_data.extend(padded);
            next += space;
        }
        seal(&mut hdr, 36);
        img.extend(hdr);
        let mut bat = vec![0xFFu8; bat_len];
        let mut blocks = Vec::new();
        for (i, b) in self.blocks.iter().enumerate() {
            if let Some((bits, fill)) = b {
                put(&mut bat, 4 * i, &((next / 512) as u32).to_be_bytes());
                let mut bitmap = vec![0u8; 512];
                bitmap[0] = *bits;
                blocks.extend(bitmap);
                blocks.extend(vec![*fill; BLOCK as usize]);
                next += 512 + BLOCK as usize;
            }
        }
        img.extend(bat);
        img.extend(loc_data);
        img.extend(blocks);
        img.extend(foot);
        (img, bat_at)
    }
}

fn ctx() -> OpenContext {
    OpenContext {
        cache: MetadataCache::new(1 << 20),
    }
}

fn open_bytes(data: Vec<u8>) -> Result<VhdLayer> {
    VhdLayer::open(MemoryStorage::open("t.vhd", data), &ctx())
}

fn open_err(data: Vec<u8>) -> String {
    match open_bytes(data) {
        Ok(_) => panic!("opened a damaged image"),
        Err(e) => e.to_string(),
    }
}

fn map_all(layer: &VhdLayer) -> Vec<Segment> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < layer.virtual_size() {
        let start = out.len();
        layer
            .map(pos, layer.virtual_size() - pos, Fetch::Allowed, &mut out)
            .unwrap();
        pos += out[start..].iter().map(|s| s.length).sum::<u64>();
    }
    out
}

fn read_image(files: BTreeMap<String, Vec<u8>>, top: &str) -> Vec<u8> {
    let storage = MemoryStorage::with_files(top, files).unwrap();
    let options = OpenOptions {
        format: Some(Format::Vhd),
        ..OpenOptions::default()
    };
    let image = Image::open_storage(storage, &options).unwrap();
    let mut buf = vec![0u8; image.size() as usize];
    image.read(0, &mut buf).unwrap();
    buf
}

#[test]
fn bit_runs_match_a_bit_by_bit_scan() {
    let mut bitmap = vec![0u8; 64];
    let mut x: u32 = 12345;
    for (i, b) in bitmap.iter_mut().enumerate() {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        *b = match i % 7 {
            0 => 0,
            1 | 2 => 0xFF,
            _ => (x >> 16) as u8,
        };
    }
    let bit = |i: usize| bitmap[i / 8] & (0x80 >> (i % 8)) != 0;
    let bits = bitmap.len() * 8;
    for start in 0..bits {
        for end in [
            start + 1,
            (start + 9).min(bits),
            (start + 100).min(bits),
            bits,
        ] {
            let mut n = 0;
            while start + n < end && bit(start + n) == bit(start) {
                n += 1;
            }
            assert_eq!(
                bit_run(&bitmap, start, end),
                (bit(start), n),
                "{start}..{end}"
            );
        }
    }
}

#[test]
fn fixed_disk_is_raw_with_qemu_size_rules() {
    // qemu without force_size: CHS 4/16/17 = 1088 sectors.
    let chs_size = 4 * 16 * 17 * 512;
    let mut img = vec![7u8; chs_size];
    img.extend(footer(2, b"qemu", chs_size as u64 + 4096, (4, 16, 17), 9));
    let layer = open_bytes(img.clone()).unwrap();
    assert_eq!(layer.virtual_size(), chs_size as u64);
    assert_eq!(
        map_all(&layer),
        vec![Segment {
            length: chs_size as u64,
            kind: SegmentKind::Data {
                file: 0,
                offset: 0,
                raw: false
            }
        }]
    );
    assert_eq!(layer.identity(), Some(ParentIdentity::VhdUuid([9; 16])));
    assert_eq!(layer.info().subformat.as_deref(), Some("fixed"));

    // Any other creator: current_size.
    let mut img = vec![0u8; 5000];
    img.extend(footer(2, b"wa\0\0", 4608, (4, 16, 17), 9));
    assert_eq!(open_bytes(img).unwrap().virtual_size(), 4608);
    // qemu creator with the maximum geometry: current_size.
    let mut img = vec![0u8; 5120];
    img.extend(footer(2, b"qemu", 5120, (65535, 16, 255), 9));
    assert_eq!(open_bytes(img).unwrap().virtual_size(), 5120);
    // Guest data that looks like a footer at offset 0 does not fool the reader: a
    // damaged one is data, a valid fixed one is data, a valid dynamic one is ambiguous.
    let with_first_sector = |first: Vec<u8>| {
        let mut img = first;
        img.extend(vec![0u8; 512]);
        img.extend(footer(2, b"win ", 1024, (0, 0, 0), 9));
        img
    };
    let mut damaged = footer(3, b"qemu", 1024, (4, 16, 17), 8);
    damaged[70] ^= 1;
    for first in [damaged, footer(2, b"win ", 1024, (0, 0, 0), 8)] {
        let layer = open_bytes(with_first_sector(first)).unwrap();
        assert_eq!(layer.identity(), Some(ParentIdentity::VhdUuid([9; 16])));
    }
    let dynamic = footer(3, b"win ", 1024, (0, 0, 0), 8);
    let e = open_err(with_first_sector(dynamic));
    assert!(e.contains("refusing to guess"), "{e}");
    // A size that does not fit in the file is refused.
    let mut img = vec![0u8; 1024];
    img.extend(footer(2, b"win ", 4096, (0, 0, 0), 9));
    let e = open_err(img);
    assert!(e.contains("does not fit"), "{e}");
}

#[test]
fn dynamic_disk_maps_bitmaps_and_reads_zeroes_elsewhere() {
    // Block 0: sectors 0-3 present; block 1 unallocated; block 2 fully present.
    let image = Sparse::dynamic(vec![Some((0xF0, 0xAA)), None, Some((0xFF, 0xBB))]);
    let (img, _) = image.build();
    let layer = open_bytes(img.clone()).unwrap();
    let segments = map_all(&layer);
    let block0 = 1536 + 512 + 512; // BAT sector, then bitmap
    let block2 = block0 + 4096 + 512;
    assert_eq!(
        segments,
        vec![
            Segment {
                length: 2048,
                kind: SegmentKind::Data {
                    file: 0,
                    offset: block0 as u64,
                    raw: false
                }
            },
            Segment {
                length: 2048 + 4096,
                kind: SegmentKind::Zero
            },
            Segment {
                length: 4096,
                kind: SegmentKind::Data {
                    file: 0,
                    offset: block2 as u64,
                    raw: false
                }
            },
        ]
    );
    let data = read_image(BTreeMap::from([("t.vhd".to_owned(), img)]), "t.vhd");
    let mut expected = vec![0xAAu8; 2048];
    expected.extend(vec![0u8; 2048 + 4096]);
    expected.extend(vec![0xBBu8; 4096]);
    assert_eq!(data, expected);

    let report = check_report(&layer);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert!(
        report
            .stats
            .contains(&("sectors present".to_owned(), 4 + 8))
    );
    assert_eq!(layer.info().cluster_size, Some(4096));
}

#[test]
fn map_of_uncached_bitmap_without_fetch_says_not_cached() {
    let (img, _) = Sparse::dynamic(vec![None, Some((0xFF, 1))]).build();
    let layer = open_bytes(img).unwrap();
    let mut out = Vec::new();
    let r = layer.map(4096, 4096, Fetch::CachedOnly, &mut out);
    assert!(matches!(r, Err(Error::NotCached)));
    // With something mapped first, it returns that much.
    out.clear();
    layer.map(0, 8192, Fetch::CachedOnly, &mut out).unwrap();
    assert_eq!(
        out,
        vec![Segment {
            length: 4096,
            kind: SegmentKind::Zero
        }]
    );
    layer.map(4096, 4096, Fetch::Allowed, &mut out).unwrap();
    out.clear();
    layer.map(4096, 512, Fetch::CachedOnly, &mut out).unwrap();
    assert_eq!(out.len(), 1);
}

fn utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

#[test]
fn differencing_disk_reads_through_its_parent() {
    let parent = Sparse {
        uuid: 0x11,
        ..Sparse::dynamic(vec![Some((0xFF, 0x50)), Some((0xFF, 0x51))])
    };
    let child = Sparse {
        disk_type: 4,
        uuid: 0x22,
        parent_uuid: 0x11,
        locators: vec![
            (*b"W2ku", utf16le(r"C:\vms\parent.vhd")),
            (*b"W2ru", utf16le(r".\parent.vhd")),
        ],
        parent_name: "parent.vhd",
        ..Sparse::dynamic(vec![Some((0x0F, 0xC0)), None])
    };
    let (child_img, _) = child.build();
    let layer = open_bytes(child_img.clone()).unwrap();
    let backing = layer.backing().unwrap();
    assert_eq!(backing.names, vec!["parent.vhd"]);
    assert_eq!(backing.format, Some(Format::Vhd));
    assert_eq!(backing.expect, Some(ParentIdentity::VhdUuid([0x11; 16])));
    let files = BTreeMap::from([
        ("parent.vhd".to_owned(), parent.build().0),
        ("child.vhd".to_owned(), child_img.clone()),
    ]);
    let data = read_image(files, "child.vhd");
    let mut expected = vec![0x50u8; 2048];
    expected.extend(vec![0xC0u8; 2048]);
    expected.extend(vec![0x51u8; 4096]);
    assert_eq!(data, expected);

    // A parent with another UUID is refused by the chain, naming both.
    let impostor = Sparse {
        uuid: 0x33,
        ..Sparse::dynamic(vec![None, None])
    };
    let files = BTreeMap::from([
        ("parent.vhd".to_owned(), impostor.build().0),
        ("child.vhd".to_owned(), child_img),
    ]);
    let storage = MemoryStorage::with_files("child.vhd", files).unwrap();
    let options = OpenOptions {
        format: Some(Format::Vhd),
        ..OpenOptions::default()
    };
    let e = Image::open_storage(storage, &options)
        .unwrap_err()
        .to_string();
    assert!(e.contains("expected") && e.contains("found"), "{e}");
}

#[test]
fn damaged_footers() {
    let (good, _) = Sparse::dynamic(vec![Some((0xFF, 1)), None]).build();
    let len = good.len();

    // Both copies with a bad checksum: refused, naming stored and computed values.
    let mut img = good.clone();
    img[100] ^= 1;
    img[len - 512 + 100] ^= 1;
    let e = open_err(img);
    assert!(e.contains("footer checksum mismatch: stored 0x"), "{e}");
    assert!(e.contains("computed 0x"), "{e}");

    // Only the copy at 0 is damaged: the end is used and check reports it.
    let mut img = good.clone();
    img[100] ^= 1;
    let layer = open_bytes(img).unwrap();
    let report = check_report(&layer);
    assert!(report.errors[0].contains("copy at offset 0"), "{report:?}");

    // Copies that disagree: the copy at 0 is used, check reports the field.
    let mut img = good.clone();
    img[len - 512 + 28..len - 512 + 32].copy_from_slice(b"win ");
    seal(&mut img[len - 512..], 64);
    let layer = open_bytes(img).unwrap();
    let report = check_report(&layer);
    assert!(report.errors[0].contains("creator_app"), "{report:?}");

    // No trailing footer.
    let mut img = good.clone();
    img[len - 512..].fill(0);
    let layer = open_bytes(img).unwrap();
    let report = check_report(&layer);
    assert!(
        report.errors[0].contains("no footer at the end"),
        "{report:?}"
    );

    // A dynamic copy at 0 over a fixed footer at the end is ambiguous.
    let mut img = good.clone();
    img[len - 512 + 63] = 2;
    seal(&mut img[len - 512..], 64);
    let e = open_err(img);
    assert!(e.contains("refusing to guess"), "{e}");

    // Unknown disk type.
    let mut img = good.clone();
    img[63] = 6;
    seal(&mut img[..512], 64);
    img[len - 512 + 63] = 6;
    seal(&mut img[len - 512..], 64);
    let e = open_err(img);
    assert!(e.contains("disk_type 6"), "{e}");

    // Neither copy.
    let e = open_err(vec![0u8; 4096]);
    assert!(e.contains("no VHD footer"), "{e}");
}

/// Rewrites a header field of a built image and fixes the header checksum.
fn patch_header(img: &mut [u8], at: usize, bytes: &[u8]) {
    put(img, 512 + at, bytes);
    seal(&mut img[512..1536], 36);
}

#[test]
fn damaged_headers_and_tables() {
    let (good, bat_at) = Sparse::dynamic(vec![Some((0xFF, 1)), None]).build();
    let len = good.len();

    let mut img = good.clone();
    img[512 + 200] ^= 1;
    let e = open_err(img);
    assert!(
        e.contains("dynamic header checksum mismatch: stored 0x"),
        "{e}"
    );

    let mut img = good.clone();
    patch_header(&mut img, 32, &3000u32.to_be_bytes());
    let e = open_err(img);
    assert!(e.contains("block_size 3000"), "{e}");

    let mut img = good.clone();
    patch_header(&mut img, 32, &(1u32 << 30).to_be_bytes());
    let e = open_err(img);
    assert!(e.contains("block_size 1073741824"), "{e}");

    let mut img = good.clone();
    patch_header(&mut img, 28, &u32::MAX.to_be_bytes());
    let e = open_err(img);
    assert!(e.contains("max_table_entries 4294967295 exceeds"), "{e}");

    let mut img = good.clone();
    patch_header(&mut img, 28, &1u32.to_be_bytes());
    let e = open_err(img);
    assert!(e.contains("less than the virtual size"), "{e}");

    let mut img = good.clone();
    patch_header(&mut img, 16, &(len as u64 - 4).to_be_bytes());
    let e = open_err(img);
    assert!(e.contains("the BAT (2 entries) at offset"), "{e}");
    assert!(e.contains("beyond the end of the file"), "{e}");

    let mut img = good.clone();
    put(&mut img, bat_at + 4, &((len / 512) as u32).to_be_bytes());
    let e = open_err(img);
    assert!(e.contains("block 1 at offset"), "{e}");
    assert!(e.contains("beyond the end of the file"), "{e}");

    // The header offset itself beyond the end.
    let mut img = good.clone();
    put(&mut img, 16, &(len as u64).to_be_bytes());
    seal(&mut img[..512], 64);
    put(&mut img, len - 512 + 16, &(len as u64).to_be_bytes());
    seal(&mut img[len - 512..], 64);
    let e = open_err(img);
    assert!(e.contains("dynamic header at offset"), "{e}");

    // A block overlapping the BAT opens (qemu would too) but check reports it.
    let mut img = good.clone();
    put(&mut img, bat_at + 4, &((bat_at / 512) as u32).to_be_bytes());
    let layer = open_bytes(img).unwrap();
    assert_check_error(&layer, "overlaps the BAT");
}

#[test]
fn locators_beyond_the_end_or_huge_are_refused() {
    let child = Sparse {
        disk_type: 4,
        parent_uuid: 5,
        locators: vec![(*b"W2ru", utf16le("p.vhd"))],
        ..Sparse::dynamic(vec![None])
    };
    let (good, _) = child.build();
    let len = good.len();
    let mut img = good.clone();
    patch_header(&mut img, 576 + 16, &(len as u64).to_be_bytes());
    let e = open_err(img);
    assert!(e.contains("parent locator 0 data at offset"), "{e}");
    let mut img = good;
    patch_header(&mut img, 576 + 8, &u32::MAX.to_be_bytes());
    let e = open_err(img);
    assert!(e.contains("data_length 4294967295 exceeds"), "{e}");
}

#[test]
fn truncated_and_bit_flipped_images_never_panic() {
    let child = Sparse {
        disk_type: 4,
        parent_uuid: 5,
        locators: vec![
            (*b"W2ru", utf16le("p.vhd")),
            (*b"MacX", b"file://p.vhd".to_vec()),
        ],
        parent_name: "p.vhd",
        ..Sparse::dynamic(vec![Some((0xA5, 3)), None, Some((0xFF, 4))])
    };
    let (good, _) = child.build();
    for cut in (0..good.len()).step_by(97) {
        let r = open_bytes(good[..cut].to_vec());
        if let Ok(layer) = r {
            let _ = layer.check(&mut CheckReport::default());
            let mut out = Vec::new();
            let _ = layer.map(0, layer.virtual_size().max(1), Fetch::Allowed, &mut out);
        }
    }
    for i in 0..2048 {
        for bit in [0x01u8, 0x80] {
            let mut img = good.clone();
            img[i] ^= bit;
            if let Ok(layer) = open_bytes(img) {
                let _ = layer.info();
                let _ = layer.check(&mut CheckReport::default());
                let mut pos = 0;
                while pos < layer.virtual_size() {
                    let mut out = Vec::new();
                    match layer.map(pos, layer.virtual_size() - pos, Fetch::Allowed, &mut out) {
                        Ok(()) => pos += out.iter().map(|s| s.length).sum::<u64>(),
                        Err(_) => break,
                    }
                }
            }
        }
    }
}
