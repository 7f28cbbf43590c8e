//! Unit tests of the qcow2 reader on images built in memory: mapping of every entry kind,
//! the check, and damaged headers and tables (each an error, never a panic).

use std::collections::BTreeMap;
use std::io::Write;

use super::check::refcount_entry;
use super::*;
use crate::chain::{Image, OpenOptions};
use crate::storage::MemoryStorage;
use crate::test_util::{assert_cached_only_needs_a_read, check_report, mentions};

const CS: usize = 4096;
const L1: usize = CS;
const REFTABLE: usize = 2 * CS;
const REFBLOCK: usize = 3 * CS;
const L2: usize = 4 * CS;
const COMPRESSED_AT: usize = 7 * CS + 100;

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

/// Writes a header extension at `at`: its type, its length and `data`.
fn put_extension(b: &mut [u8], at: usize, kind: u32, data: &[u8]) {
    put32(b, at, kind);
    put32(b, at + 4, data.len() as u32);
    b[at + 8..at + 8 + data.len()].copy_from_slice(data);
}

fn unit() -> Vec<u8> {
    (0..CS).map(|i| (i * 7 % 251) as u8).collect()
}

/// A version 3 header (104 bytes, no extensions, 16-bit refcounts) at the start of `b`:
/// clusters of `1 << cluster_bits` bytes, `size` bytes of guest disk, an L1 table of
/// `l1_size` entries and a one-cluster refcount table, at the byte offsets `tables`.
fn v3_header(b: &mut [u8], cluster_bits: u32, size: u64, l1_size: u32, tables: [usize; 2]) {
    b[..4].copy_from_slice(b"QFI\xfb");
    put32(b, 4, 3);
    put32(b, 20, cluster_bits);
    put64(b, 24, size);
    put32(b, 36, l1_size);
    put64(b, 40, tables[0] as u64);
    put64(b, 48, tables[1] as u64);
    put32(b, 56, 1);
    put32(b, 96, 4);
    put32(b, 100, 104);
}

/// A consistent 4 MiB v3 image with 4 KiB clusters. Guest clusters: 0 and 1 data
/// (host-contiguous), 2 compressed, 3 ZERO_PLAIN, 4 ZERO_ALLOC over stale 0x55 bytes,
/// the rest unallocated.
fn image() -> Vec<u8> {
    let mut b = vec![0u8; 9 * CS];
    v3_header(&mut b, 12, 4 << 20, 2, [L1, REFTABLE]);
    put64(&mut b, L1, COPIED | L2 as u64);
    put64(&mut b, REFTABLE, REFBLOCK as u64);
    for c in 0..9 {
        b[REFBLOCK + 2 * c + 1] = 1;
    }
    put64(&mut b, L2, COPIED | (5 * CS) as u64);
    put64(&mut b, L2 + 8, COPIED | (6 * CS) as u64);
    b[5 * CS..6 * CS].fill(0xab);
    b[6 * CS..7 * CS].fill(0xcd);
    let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
    e.write_all(&unit()).unwrap();
    let stream = e.finish().unwrap();
    b[COMPRESSED_AT..COMPRESSED_AT + stream.len()].copy_from_slice(&stream);
    let sectors = ((COMPRESSED_AT + stream.len() - 1) >> 9) - (COMPRESSED_AT >> 9);
    put64(
        &mut b,
        L2 + 16,
        COMPRESSED | ((sectors as u64) << 58) | COMPRESSED_AT as u64,
    );
    put64(&mut b, L2 + 24, ZERO_FLAG);
    put64(&mut b, L2 + 32, COPIED | (8 * CS) as u64 | ZERO_FLAG);
    b[8 * CS..9 * CS].fill(0x55);
    b
}

fn open_image(data: Vec<u8>) -> Result<Image> {
    let options = OpenOptions {
        format: Some(Format::Qcow2),
        ..OpenOptions::default()
    };
    Image::open_storage(MemoryStorage::open("t.qcow2", data), &options)
}

fn layer_of(data: Vec<u8>) -> Result<Box<dyn Layer>> {
    let ctx = OpenContext {
        cache: MetadataCache::new(1 << 20),
    };
    open(MemoryStorage::open("t.qcow2", data), &ctx)
}

fn segments(layer: &dyn Layer, offset: u64, length: u64) -> Result<Vec<Segment>> {
    let mut out = Vec::new();
    layer.map(offset, length, Fetch::Allowed, &mut out)?;
    Ok(out)
}

fn err_text(r: Result<impl std::fmt::Debug>) -> String {
    r.expect_err("must fail").to_string()
}

#[test]
fn maps_every_entry_kind() {
    let layer = layer_of(image()).unwrap();
    let segs = segments(&*layer, 0, 4 << 20).unwrap();
    assert_eq!(
        segs[0],
        Segment {
            length: 2 * CS as u64,
            kind: SegmentKind::Data {
                file: 0,
                offset: 5 * CS as u64,
                raw: false
            }
        },
        "host-contiguous clusters merge"
    );
    assert!(matches!(
        segs[1].kind,
        SegmentKind::Compressed {
            offset,
            skip: 0,
            unit_size: 4096,
            compression: Compression::Deflate,
            ..
        } if offset == COMPRESSED_AT as u64
    ));
    assert_eq!(
        segs[2],
        Segment {
            length: 2 * CS as u64,
            kind: SegmentKind::Zero
        },
        "ZERO_PLAIN and ZERO_ALLOC"
    );
    assert_eq!(segs[3].kind, SegmentKind::Backing);
    assert_eq!(
        segs.iter().map(|s| s.length).sum::<u64>(),
        2 << 20,
        "stops at the L2 table end"
    );
    let segs = segments(&*layer, 2 * CS as u64 + 10, 100).unwrap();
    assert!(matches!(
        segs[0].kind,
        SegmentKind::Compressed { skip: 10, .. }
    ));
    assert_eq!(segs[0].length, 100);
    assert_eq!(
        segments(&*layer, 3 << 20, 4096).unwrap()[0].kind,
        SegmentKind::Backing
    );
}

#[test]
fn reads_every_entry_kind() {
    let image = open_image(image()).unwrap();
    let mut buf = vec![0xeeu8; 6 * CS];
    image.read(0, &mut buf).unwrap();
    assert!(buf[..CS].iter().all(|&b| b == 0xab));
    assert!(buf[CS..2 * CS].iter().all(|&b| b == 0xcd));
    assert_eq!(&buf[2 * CS..3 * CS], &unit()[..]);
    assert!(
        buf[3 * CS..].iter().all(|&b| b == 0),
        "zero clusters hide stale bytes"
    );
}

#[test]
fn check_of_a_consistent_image_is_clean() {
    let layer = layer_of(image()).unwrap();
    let report = check_report(&*layer);
    assert!(
        report.errors.is_empty() && report.warnings.is_empty(),
        "{report:?}"
    );
    assert!(
        report
            .stats
            .contains(&("compressed clusters".to_owned(), 1))
    );
}

#[test]
fn check_finds_refcount_errors_and_leaks() {
    let mut b = image();
    b[REFBLOCK + 2 * 5 + 1] = 0; // data cluster 5 unreferenced in the refcounts
    b[REFBLOCK + 2 * 8 + 1] = 2; // cluster 8 over-counted
    b[REFBLOCK + 2 * 9 + 1] = 0;
    let layer = layer_of(b.clone()).unwrap();
    let report = check_report(&*layer);
    let unreferenced = ["cluster 5", "referenced 1 times, refcount 0"];
    assert!(mentions(&report.errors, &unreferenced), "{report:?}");
    assert!(
        mentions(&report.warnings, &["cluster 8", "leaked"]),
        "{report:?}"
    );
    // Dirty: the same mismatches are only warnings.
    b[79] |= 1;
    let layer = layer_of(b).unwrap();
    assert!(layer.info().dirty);
    let report = check_report(&*layer);
    assert!(report.errors.is_empty(), "{report:?}");
    assert!(report.warnings.iter().any(|w| w.contains("dirty")));
}

#[test]
fn refcount_widths() {
    let block = [
        0b1011_0110u8,
        0x12,
        0x34,
        0x56,
        0x78,
        0x9a,
        0xbc,
        0xde,
        0xf0,
    ];
    assert_eq!(refcount_entry(&block, 0, 0), 0);
    assert_eq!(refcount_entry(&block, 0, 1), 1);
    assert_eq!(refcount_entry(&block, 1, 1), 0b01);
    assert_eq!(refcount_entry(&block, 1, 3), 0b10);
    assert_eq!(refcount_entry(&block, 2, 0), 0b0110);
    assert_eq!(refcount_entry(&block, 3, 1), 0x12);
    assert_eq!(refcount_entry(&block, 4, 1), 0x3456);
    assert_eq!(refcount_entry(&block, 5, 1), 0x789a_bcde);
    assert_eq!(refcount_entry(&block, 6, 1), 0, "past the block reads 0");
    assert_eq!(refcount_entry(&block, 6, 0), 0xb612_3456_789a_bcde);
}

#[test]
fn data_cluster_crossing_the_end_of_the_file() {
    let mut b = image();
    b.truncate(8 * CS + 1000);
    let layer = layer_of(b).unwrap();
    // ZERO_ALLOC still reads zero; a data cluster pointing at the cut cluster reads its
    // bytes up to the end of the file and zeroes after, as qemu does.
    let mut b = image();
    put64(&mut b, L2 + 40, COPIED | (8 * CS) as u64);
    b.truncate(8 * CS + 1000);
    let layer2 = layer_of(b.clone()).unwrap();
    let segs = segments(&*layer2, 5 * CS as u64, CS as u64).unwrap();
    assert_eq!(
        segs,
        vec![
            Segment {
                length: 1000,
                kind: SegmentKind::Data {
                    file: 0,
                    offset: 8 * CS as u64,
                    raw: false
                }
            },
            Segment {
                length: CS as u64 - 1000,
                kind: SegmentKind::Zero
            }
        ]
    );
    let image = open_image(b).unwrap();
    let mut buf = vec![1u8; CS];
    image.read(5 * CS as u64, &mut buf).unwrap();
    assert!(buf[..1000].iter().all(|&x| x == 0x55) && buf[1000..].iter().all(|&x| x == 0));
    drop(layer);
}

#[test]
fn data_cluster_beyond_the_end_of_the_file() {
    let mut b = image();
    put64(&mut b, L2 + 40, COPIED | (40 * CS) as u64);
    let layer = layer_of(b).unwrap();
    let e = err_text(segments(&*layer, 5 * CS as u64, 10));
    assert!(e.contains("beyond the end"), "{e}");
}

/// Changes an image in place.
type Damage = Box<dyn Fn(&mut Vec<u8>)>;

/// Writes big-endian `v` at `at`.
fn set32(at: usize, v: u32) -> Damage {
    Box::new(move |b| put32(b, at, v))
}

/// Writes big-endian `v` at `at`.
fn set64(at: usize, v: u64) -> Damage {
    Box::new(move |b| put64(b, at, v))
}

/// `first`, then `then`.
fn both(first: Damage, then: Damage) -> Damage {
    Box::new(move |b| {
        first(b);
        then(b);
    })
}

#[test]
fn damaged_headers_are_errors() {
    #[rustfmt::skip] // a table: one case a line
    let cases: Vec<(&str, Damage, &str)> = vec![
        ("truncated", Box::new(|b| b.truncate(50)), "shorter than a qcow2 header"),
        ("bad magic", Box::new(|b| b[0] = b'X'), "magic"),
        ("version 1", set32(4, 1), "qcow (version 1)"),
        ("version 4", set32(4, 4), "version 4"),
        ("cluster_bits 40", set32(20, 40), "cluster_bits 40"),
        ("cluster_bits 8", set32(20, 8), "cluster_bits 8"),
        ("AES", set32(32, 1), "AES-encrypted"),
        ("LUKS", set32(32, 2), "LUKS-encrypted"),
        ("l1 huge", set32(36, 0x1000_0000), "l1_size"),
        ("l1 too small", set32(36, 1), "too small for the virtual size"),
        ("l1 beyond eof", set64(40, 1 << 30), "beyond the end of the file"),
        ("l1 unaligned", set64(40, 4097), "not aligned"),
        ("reftable huge", set32(56, 1 << 20), "refcount_table_clusters"),
        ("header_length absurd", set32(100, 0xffff_fff8), "header_length"),
        ("header_length odd", set32(100, 105), "header_length"),
        ("refcount_order 7", set32(96, 7), "refcount_order 7"),
        ("unknown incompatible bit", set64(72, 1 << 9), "incompatible feature bit 9"),
        ("compression bit without type", set64(72, 1 << 3), "compression_type"),
        (
            "compression type 2",
            Box::new(|b| {
                put32(b, 100, 112);
                put64(b, 72, 1 << 3);
                b[104] = 2;
            }),
            "compression_type 2",
        ),
        ("backing name beyond the first cluster", both(set64(8, 4090), set32(16, 20)), "first cluster"),
        ("backing name too long", both(set64(8, 200), set32(16, 2000)), "backing_file_size 2000"),
        (
            "extension overruns the header area",
            both(set32(104, 0x1234_5678), set32(108, 100_000)),
            "runs past the end of the header area",
        ),
        ("data file bit without a name", set64(72, 1 << 2), "does not name it"),
        ("snapshot table beyond eof", both(set32(60, 1), set64(64, 1 << 30)), "beyond the end of the file"),
        ("extended L2 with small clusters", set64(72, 1 << 4), "16 KiB"),
    ];
    for (what, damage, expect) in cases {
        let mut b = image();
        damage(&mut b);
        let e = err_text(open_image(b));
        assert!(e.contains("t.qcow2") && e.contains(expect), "{what}: {e}");
    }
}

#[test]
fn unknown_feature_is_named_from_the_feature_table() {
    let mut b = image();
    put64(&mut b, 72, 1 << 9);
    // A feature table of one entry: incompatible (type 0) bit 9, named "teleport".
    let mut entry = [0u8; 48];
    entry[1] = 9;
    entry[2..10].copy_from_slice(b"teleport");
    put_extension(&mut b, 104, 0x6803_f857, &entry);
    let e = err_text(open_image(b));
    assert!(
        e.contains("\"teleport\" (bit 9)") && e.contains("unsupported"),
        "{e}"
    );
}

#[test]
fn damaged_tables_are_errors_when_mapped() {
    let mut b = image();
    put64(&mut b, L1 + 8, COPIED | (1 << 30));
    let layer = layer_of(b).unwrap();
    let e = err_text(segments(&*layer, 2 << 20, 4096));
    assert!(
        e.contains("L2 table") && e.contains("beyond the end"),
        "{e}"
    );

    let mut b = image();
    put64(&mut b, L1 + 8, COPIED | (L2 as u64 + 512));
    let layer = layer_of(b).unwrap();
    let e = err_text(segments(&*layer, 2 << 20, 4096));
    assert!(e.contains("not cluster aligned"), "{e}");

    let mut b = image();
    put64(&mut b, L2 + 16, COMPRESSED | (1 << 40));
    let layer = layer_of(b).unwrap();
    let e = err_text(segments(&*layer, 2 * CS as u64, 4096));
    assert!(
        e.contains("compressed") && e.contains("beyond the end"),
        "{e}"
    );

    let mut b = image();
    put64(&mut b, L2, COPIED | ((5 * CS) as u64 + 512));
    let layer = layer_of(b).unwrap();
    let e = err_text(segments(&*layer, 0, 4096));
    assert!(e.contains("unaligned"), "{e}");

    // Damaged compressed data is an error when read, not garbage.
    let mut b = image();
    b[COMPRESSED_AT..COMPRESSED_AT + 64].fill(0xff);
    let image = open_image(b).unwrap();
    let mut buf = vec![0; 4096];
    assert!(image.read(2 * CS as u64, &mut buf).is_err());
}

#[test]
fn version_2_has_no_zero_flag() {
    let mut b = image();
    put32(&mut b, 4, 2);
    b[72..104].fill(0);
    let layer = layer_of(b).unwrap();
    assert_eq!(layer.info().subformat.as_deref(), Some("v2"));
    assert!(segments(&*layer, 0, 8192).is_ok());
    let e = err_text(segments(&*layer, 3 * CS as u64, 10));
    assert!(e.contains("version 2"), "{e}");
}

/// Extended L2 with 16 KiB clusters (512-byte subclusters).
#[test]
fn extended_l2_subclusters() {
    let cs = 16384usize;
    let mut b = vec![0u8; 5 * cs];
    v3_header(&mut b, 14, 1 << 20, 1, [cs, 2 * cs]);
    put64(&mut b, 72, 1 << 4);
    put64(&mut b, cs, COPIED | (3 * cs as u64));
    let l2 = 3 * cs;
    put64(&mut b, l2, COPIED | (4 * cs as u64));
    // Subclusters 0-1 allocated, 2 zero, 3.. backing.
    put64(&mut b, l2 + 8, 0b11 | (0b100 << 32));
    // Cluster 1: unallocated with zero subclusters 0-31.
    put64(&mut b, l2 + 24, 0xffff_ffffu64 << 32);
    // Cluster 2: both bits for subcluster 0.
    put64(&mut b, l2 + 32, COPIED | (4 * cs as u64));
    put64(&mut b, l2 + 40, 1 | (1 << 32));
    // Cluster 3: allocated subclusters without a host offset.
    put64(&mut b, l2 + 56, 1);
    let layer = layer_of(b).unwrap();
    assert!(layer.info().features.contains(&"extended_l2".to_owned()));
    let segs = segments(&*layer, 0, 2 * cs as u64).unwrap();
    assert_eq!(
        segs,
        vec![
            Segment {
                length: 1024,
                kind: SegmentKind::Data {
                    file: 0,
                    offset: 4 * cs as u64,
                    raw: false
                }
            },
            Segment {
                length: 512,
                kind: SegmentKind::Zero
            },
            Segment {
                length: cs as u64 - 1536,
                kind: SegmentKind::Backing
            },
            Segment {
                length: cs as u64,
                kind: SegmentKind::Zero
            },
        ]
    );
    let segs = segments(&*layer, 700, 100).unwrap();
    assert_eq!(segs.len(), 1);
    assert!(
        matches!(segs[0].kind, SegmentKind::Data { offset, .. } if offset == 4 * cs as u64 + 700)
    );
    let e = err_text(segments(&*layer, 2 * cs as u64, 10));
    assert!(e.contains("both allocated and zero"), "{e}");
    let e = err_text(segments(&*layer, 3 * cs as u64, 10));
    assert!(e.contains("no host offset"), "{e}");
}

#[test]
fn external_data_file_and_backing() {
    let mut b = image();
    put64(&mut b, 72, 1 << 2);
    // Data file extension, then a backing name with its format.
    put_extension(&mut b, 104, 0x4441_5441, b"d.data");
    put_extension(&mut b, 120, 0xe279_2aca, b"raw");
    put64(&mut b, 8, 200);
    put32(&mut b, 16, 6);
    b[200..206].copy_from_slice(b"b.base");
    // Guest cluster 0 at data file offset 0; cluster 1 must be at offset 4096.
    put64(&mut b, L2, COPIED);
    put64(&mut b, L2 + 8, COPIED | CS as u64);
    put64(&mut b, L2 + 16, 0);
    let mut files = BTreeMap::new();
    files.insert("t.qcow2".to_owned(), b.clone());
    files.insert("d.data".to_owned(), vec![0x42; 3 * CS]);
    let ctx = OpenContext {
        cache: MetadataCache::new(1 << 20),
    };
    let layer = open(
        MemoryStorage::with_files("t.qcow2", files.clone()).unwrap(),
        &ctx,
    )
    .unwrap();
    assert_eq!(layer.files().len(), 2);
    assert_eq!(
        layer.backing(),
        Some(&Backing {
            names: vec!["b.base".to_owned()],
            format: Some(Format::Raw),
            expect: None
        })
    );
    let segs = segments(&*layer, 0, 3 * CS as u64).unwrap();
    assert_eq!(
        segs[0],
        Segment {
            length: 2 * CS as u64,
            kind: SegmentKind::Data {
                file: 1,
                offset: 0,
                raw: false
            }
        }
    );
    let info = layer.info();
    assert!(
        info.details
            .contains(&("data file".to_owned(), "d.data".to_owned()))
    );
    assert!(
        info.details
            .contains(&("backing format".to_owned(), "raw".to_owned()))
    );
    // A data cluster at the wrong data file offset.
    put64(&mut b, L2 + 8, COPIED | (2 * CS as u64));
    files.insert("t.qcow2".to_owned(), b.clone());
    let layer = open(
        MemoryStorage::with_files("t.qcow2", files.clone()).unwrap(),
        &ctx,
    )
    .unwrap();
    let e = err_text(segments(&*layer, CS as u64, 10));
    assert!(e.contains("differs"), "{e}");
    // Unknown backing format name.
    b[128..131].copy_from_slice(b"xyz");
    files.insert("t.qcow2".to_owned(), b.clone());
    let e = err_text(open(
        MemoryStorage::with_files("t.qcow2", files.clone()).unwrap(),
        &ctx,
    ));
    assert!(e.contains("unknown format \"xyz\""), "{e}");
    // Missing data file.
    b[128..131].copy_from_slice(b"raw");
    files.insert("t.qcow2".to_owned(), b);
    files.remove("d.data");
    let e = err_text(open(
        MemoryStorage::with_files("t.qcow2", files).unwrap(),
        &ctx,
    ));
    assert!(e.contains("d.data"), "{e}");
}

#[test]
fn cached_only_mapping_does_not_read() {
    assert_cached_only_needs_a_read(&*layer_of(image()).unwrap());
}

/// Random single-byte damage anywhere in the metadata never panics.
#[test]
fn bit_flips_never_panic() {
    let good = image();
    let mut x = 0x9e37_79b9u32;
    for _ in 0..3000 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let mut b = good.clone();
        let at = (x as usize) % (5 * CS);
        b[at] ^= 1 << (x >> 29);
        if let Ok(layer) = layer_of(b) {
            let _ = segments(&*layer, 0, 4 << 20);
            let _ = segments(&*layer, (x as u64 >> 3) % (4 << 20), 65536);
            let mut report = CheckReport::default();
            let _ = layer.check(&mut report);
            let _ = layer.info();
        }
    }
}
