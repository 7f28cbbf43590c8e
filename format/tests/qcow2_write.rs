//! Writing qcow2 images: random operation sequences against a byte model, with
//! `qemu-img check` and `qemu-img compare` as the judges; images qemu wrote (zero
//! clusters, compressed clusters, extended L2, internal snapshots) written further;
//! create, resize, repair and locking.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use thinline_format::qcow2::{self, CreateOptions, ZeroMode};
use thinline_format::{Format, Image, OpenOptions};
use thinline_test_support::rng::Rng;

fn open_rw(path: &Path) -> (Image, std::sync::Arc<qcow2::Qcow2Writer>) {
    Image::open_writable(path, &OpenOptions::default())
        .unwrap_or_else(|e| panic!("open {} for writing: {}", path.display(), e.detail()))
}

/// `qemu-img check` of `path`: panics on any error or leak.
fn qemu_check_clean(path: &Path) {
    let out = std::process::Command::new("qemu-img")
        .args(["check", "--output=json", s(path)])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "qemu-img check {}: {text} {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    for key in ["corruptions", "leaks", "check-errors"] {
        assert_eq!(
            v.get(key).and_then(|x| x.as_u64()).unwrap_or(0),
            0,
            "qemu-img check {key}: {text}"
        );
    }
}

/// What qemu reads from `path`, compared with `model`.
fn qemu_reads(path: &Path, model: &[u8], what: &str) {
    let got = qemu_raw(path, "qcow2");
    assert_eq!(got.len(), model.len(), "{what}: size");
    if let Some(i) = got.iter().zip(model).position(|(a, b)| a != b) {
        panic!(
            "{what}: qemu reads byte {i} as {:#x}, the model has {:#x}",
            got[i], model[i]
        );
    }
}

fn thinline_reads(image: &Image, model: &[u8], what: &str) {
    let got = read_all(image, 1 << 20, 0);
    if let Some(i) = got.iter().zip(model).position(|(a, b)| a != b) {
        panic!(
            "{what}: Thinline reads byte {i} as {:#x}, the model has {:#x}",
            got[i], model[i]
        );
    }
}

/// One configuration of the random workload.
struct Config {
    cluster_size: u64,
    extended: bool,
    size: u64,
    /// A raw backing file of this size (random content), if any.
    backing: Option<u64>,
    ops: usize,
}

/// The bytes a trim of `[off, off + len)` zeroes: whole granules (clusters, or
/// subclusters with extended L2) inside it; a granule cut by the image's end counts
/// as whole.
fn trimmed(off: u64, len: u64, granule: u64, size: u64) -> Option<(u64, u64)> {
    let first = off.div_ceil(granule) * granule;
    let end = off + len;
    let last = if end == size {
        end
    } else {
        end / granule * granule
    };
    (last > first).then_some((first, last))
}

fn random_workload(dir: &Path, c: &Config, rng: &mut Rng) {
    let image_path = dir.join(format!(
        "w-{}-{}-{}.qcow2",
        c.cluster_size,
        c.extended,
        c.backing.is_some()
    ));
    let mut model = vec![0u8; c.size as usize];
    let backing = c.backing.map(|len| {
        let p = dir.join(format!("base-{len}.raw"));
        let bytes = rng.bytes(len as usize);
        std::fs::write(&p, &bytes).unwrap();
        let n = (len.min(c.size)) as usize;
        model[..n].copy_from_slice(&bytes[..n]);
        p
    });
    qcow2::create(
        &image_path,
        &CreateOptions {
            size: c.size,
            cluster_size: c.cluster_size,
            extended_l2: c.extended,
            backing: backing.as_ref().map(|p| (s(p).to_owned(), Format::Raw)),
        },
    )
    .unwrap();
    qemu_check_clean(&image_path);
    let granule = if c.extended {
        c.cluster_size / 32
    } else {
        c.cluster_size
    };
    let (mut image, mut writer) = open_rw(&image_path);
    // Writes done by `try_write` alone, and those it left to `write`.
    let (mut tried, mut left) = (0, 0);
    for op in 0..c.ops {
        let cs = c.cluster_size;
        // Offsets near cluster boundaries and lengths of a few clusters, often unaligned.
        let off = match rng.below(3) {
            0 => rng.below(c.size),
            1 => rng.below(c.size / cs) * cs,
            _ => (rng.below(c.size / cs) * cs + cs - rng.below(600)).min(c.size - 1),
        };
        let max = (c.size - off).min(cs * 4);
        let len = match rng.below(3) {
            0 => 1 + rng.below(max),
            1 => max.min(cs),
            _ => max.min(1 + rng.below(4096)),
        };
        let what = format!("op {op}");
        match rng.below(10) {
            0..=4 => {
                let data = rng.bytes(len as usize);
                let fua = rng.below(8) == 0;
                // Half the writes first try the path without I/O, as the NBD export does.
                match (!fua && rng.below(2) == 0).then(|| writer.try_write(off, &data)) {
                    Some(Ok(())) => tried += 1,
                    Some(Err(thinline_format::Error::NotCached)) => {
                        left += 1;
                        writer.write(&image, off, &data, fua).unwrap();
                    }
                    Some(Err(e)) => panic!("{what}: try_write at {off}+{len}: {}", e.detail()),
                    None => writer.write(&image, off, &data, fua).unwrap(),
                }
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            5 | 6 => {
                let mode = ZeroMode {
                    no_hole: rng.below(2) == 0,
                    fast: false,
                    trim: false,
                };
                writer.write_zeroes(&image, off, len, mode, false).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            7 => {
                let mode = ZeroMode {
                    trim: true,
                    ..ZeroMode::default()
                };
                writer.write_zeroes(&image, off, len, mode, false).unwrap();
                if let Some((a, b)) = trimmed(off, len, granule, c.size) {
                    model[a as usize..b as usize].fill(0);
                }
            }
            8 => writer.flush().unwrap(),
            _ => {
                // Reopen: everything flushed must be there.
                writer.flush().unwrap();
                drop(image);
                drop(writer);
                qemu_check_clean(&image_path);
                (image, writer) = open_rw(&image_path);
                thinline_reads(&image, &model, &format!("{what}: after reopening"));
            }
        }
        if op % 16 == 0 {
            let mut buf = vec![0u8; len as usize];
            image.read(off, &mut buf).unwrap();
            assert!(
                buf == model[off as usize..(off + len) as usize],
                "{what}: read back at {off}+{len} differs"
            );
        }
    }
    thinline_reads(&image, &model, "end");
    writer.flush().unwrap();
    drop(image);
    drop(writer);
    qemu_check_clean(&image_path);
    qemu_reads(&image_path, &model, "end");
    assert!(
        tried > 0 && left > 0,
        "try_write finished {tried} writes and left {left}: both paths must be exercised"
    );
}

#[test]
fn random_operations_match_a_byte_model_and_qemu_img_check_is_clean() {
    with_tools(&["qemu-img"], |d| {
        let mut rng = Rng::from_env();
        let configs = [
            Config {
                cluster_size: 64 << 10,
                extended: false,
                size: 8 << 20,
                backing: None,
                ops: 300,
            },
            Config {
                cluster_size: 64 << 10,
                extended: false,
                size: 8 << 20,
                backing: Some(6 << 20),
                ops: 300,
            },
            Config {
                cluster_size: 64 << 10,
                extended: true,
                size: 8 << 20,
                backing: Some(10 << 20),
                ops: 300,
            },
            // Tiny clusters: many refcount blocks and L2 tables, refcount table growth.
            Config {
                cluster_size: 512,
                extended: false,
                size: 3 << 20,
                backing: Some(1 << 20),
                ops: 400,
            },
        ];
        for c in &configs {
            random_workload(d, c, &mut rng);
        }
    });
}

#[test]
fn try_write_does_only_what_needs_no_read_and_leaves_the_rest_untouched() {
    with_tools(&["qemu-img"], |d| {
        let mut rng = Rng::from_env();
        let base = d.join("base.raw");
        let base_bytes = rng.bytes(1 << 20);
        std::fs::write(&base, &base_bytes).unwrap();
        let cs = 64u64 << 10;
        for extended in [false, true] {
            let path = d.join(format!("try-{extended}.qcow2"));
            qcow2::create(
                &path,
                &CreateOptions {
                    size: 1 << 20,
                    cluster_size: cs,
                    extended_l2: extended,
                    backing: Some((s(&base).to_owned(), Format::Raw)),
                },
            )
            .unwrap();
            let not_cached = |r: thinline_format::Result<()>, what: &str| match r {
                Err(thinline_format::Error::NotCached) => {}
                other => panic!("extended {extended}: {what}: expected NotCached, got {other:?}"),
            };
            let mut model = base_bytes.clone();
            let (image, writer) = open_rw(&path);
            // A partial cluster over the backing needs the backing's bytes: refused, and
            // nothing changed.
            not_cached(writer.try_write(100, &[1; 300]), "a partial cluster");
            thinline_reads(
                &image,
                &model,
                &format!("extended {extended}: after a refused write"),
            );
            // A whole new cluster needs a refcount, whose block is not in memory yet.
            let whole = rng.bytes(cs as usize);
            not_cached(
                writer.try_write(cs, &whole),
                "a refcount block not in memory",
            );
            thinline_reads(
                &image,
                &model,
                &format!("extended {extended}: after a refused write"),
            );
            // A write that may read loads it; then a whole new cluster needs nothing but
            // its own pwrite.
            writer.write(&image, 8 * cs, &whole, false).unwrap();
            model[8 * cs as usize..9 * cs as usize].copy_from_slice(&whole);
            writer.try_write(cs, &whole).unwrap();
            model[cs as usize..2 * cs as usize].copy_from_slice(&whole);
            // Inside a cluster the image owns: written in place.
            writer.try_write(cs + 100, &[7; 300]).unwrap();
            model[(cs + 100) as usize..(cs + 400) as usize].fill(7);
            if extended {
                // Whole subclusters (2 KiB) of a new cluster: nothing to read either.
                writer.try_write(4 * cs + 2048, &[9; 4096]).unwrap();
                model[(4 * cs + 2048) as usize..(4 * cs + 6144) as usize].fill(9);
            } else {
                not_cached(
                    writer.try_write(4 * cs + 2048, &[9; 4096]),
                    "part of a new cluster",
                );
            }
            thinline_reads(
                &image,
                &model,
                &format!("extended {extended}: after try_write"),
            );
            writer.flush().unwrap();
            drop((image, writer));
            qemu_check_clean(&path);
            qemu_reads(&path, &model, &format!("extended {extended}"));
            // Reopened, neither the L2 table nor the refcount block is in memory: refused
            // until a write that may read has loaded them.
            let (image, writer) = open_rw(&path);
            not_cached(writer.try_write(2 * cs, &whole), "tables not in memory");
            writer.write(&image, 9 * cs, &whole, false).unwrap();
            writer.try_write(2 * cs, &whole).unwrap();
            model[9 * cs as usize..10 * cs as usize].copy_from_slice(&whole);
            model[2 * cs as usize..3 * cs as usize].copy_from_slice(&whole);
            writer.flush().unwrap();
            drop((image, writer));
            qemu_check_clean(&path);
            qemu_reads(&path, &model, &format!("extended {extended}: reopened"));
        }
    });
}

/// The big-endian u64 at `at` in the file.
fn file_be64(path: &Path, at: u64) -> u64 {
    use std::os::unix::fs::FileExt;
    let mut b = [0u8; 8];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut b, at)
        .unwrap();
    u64::from_be_bytes(b)
}

fn file_bytes(path: &Path, at: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut b = vec![0u8; len];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut b, at)
        .unwrap();
    b
}

fn patch(path: &Path, at: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

#[test]
fn a_crafted_table_never_makes_the_writer_overwrite_the_images_metadata() {
    with_tools(&["qemu-img"], |d| {
        let cs = 64u64 << 10;
        let craft = |name: &str| {
            let path = d.join(name);
            create_qcow2(d, &["-o", "cluster_size=65536", s(&path), "1M"]);
            qemu_io(d, "qcow2", s(&path), &["write -P 0x11 0 64k"]);
            let l1 = file_be64(&path, 40);
            let reftable = file_be64(&path, 48);
            (path, l1, reftable)
        };
        // L2 entries that say "guest cluster 1 is yours, at the L1 table" and "guest cluster
        // 2 is yours, at the refcount table": writing there, in whole or in part, is refused
        // and changes nothing.
        let (path, l1, reftable) = craft("l2-points-at-tables.qcow2");
        let l2 = file_be64(&path, l1) & 0x00ff_ffff_ffff_fe00;
        patch(&path, l2 + 8, &(l1 | 1 << 63).to_be_bytes());
        patch(&path, l2 + 16, &(reftable | 1 << 63).to_be_bytes());
        let before = file_bytes(&path, 0, 4 * cs as usize);
        let (image, writer) = open_rw(&path);
        for (off, len) in [(cs, cs), (cs + 10, 100), (2 * cs, cs), (2 * cs + 512, 4096)] {
            let data = vec![0xaa; len as usize];
            let err = writer
                .write(&image, off, &data, false)
                .expect_err("a write over metadata must fail");
            assert!(
                err.detail().contains("metadata"),
                "write at {off}+{len}: {}",
                err.detail()
            );
            match writer.try_write(off, &data) {
                Err(thinline_format::Error::NotCached) => {}
                Err(e) => assert!(e.detail().contains("metadata"), "{}", e.detail()),
                Ok(()) => panic!("try_write at {off}+{len} wrote over metadata"),
            }
        }
        writer.flush().unwrap();
        drop((image, writer));
        assert!(
            file_bytes(&path, 0, 4 * cs as usize) == before,
            "the header, refcount table, refcount block or L1 table changed"
        );
        // A refcount block that calls the L1 table's cluster free: new clusters go elsewhere.
        let (path, l1, reftable) = craft("l1-counted-free.qcow2");
        let refblock = file_be64(&path, reftable);
        patch(&path, refblock + 2 * (l1 / cs), &[0, 0]);
        let l1_before = file_bytes(&path, l1, cs as usize);
        let (image, writer) = open_rw(&path);
        let data = vec![0x5c; (3 * cs) as usize];
        writer.write(&image, 2 * cs, &data, false).unwrap();
        writer
            .write(&image, 6 * cs + 100, &data[..5000], false)
            .unwrap();
        writer.flush().unwrap();
        let mut back = vec![0u8; data.len()];
        image.read(2 * cs, &mut back).unwrap();
        assert!(
            back == data,
            "data written past the crafted refcount reads back"
        );
        drop((image, writer));
        assert!(
            file_bytes(&path, l1, cs as usize) == l1_before,
            "an allocation landed on the L1 table"
        );
    });
}

#[test]
fn created_images_record_the_backing_format_and_qemu_agrees() {
    with_tools(&["qemu-img"], |d| {
        let base = d.join("base.qcow2");
        create_qcow2(d, &[s(&base), "5M"]);
        let top = d.join("top.qcow2");
        qcow2::create(
            &top,
            &CreateOptions {
                size: 5 << 20,
                backing: Some(("base.qcow2".to_owned(), Format::Qcow2)),
                ..CreateOptions::default()
            },
        )
        .unwrap();
        let out = qemu_img(d, &["info", "--output=json", s(&top)]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["backing-filename-format"], "qcow2", "{v}");
        assert_eq!(v["backing-filename"], "base.qcow2", "{v}");
        assert_eq!(v["virtual-size"], 5 << 20, "{v}");
        qemu_check_clean(&top);
        // An existing file is never overwritten.
        let err = qcow2::create(&top, &CreateOptions::default()).unwrap_err();
        assert!(err.detail().contains("exists"), "{}", err.detail());
        // Bad geometry is refused by name.
        let err = qcow2::create(
            &d.join("x.qcow2"),
            &CreateOptions {
                cluster_size: 4096,
                extended_l2: true,
                size: 1 << 20,
                ..CreateOptions::default()
            },
        )
        .unwrap_err();
        assert!(err.detail().contains("16384"), "{}", err.detail());
        assert!(!d.join("x.qcow2").exists());
    });
}

/// `qemu-img create -q -f qcow2 ARGS…` in `dir`.
fn create_qcow2(dir: &Path, args: &[&str]) {
    let mut all = vec!["create", "-q", "-f", "qcow2"];
    all.extend(args);
    qemu_img(dir, &all);
}

/// A qemu-made image with every kind of cluster, and the raw bytes it holds.
fn qemu_made(dir: &Path, name: &str, opts: &str, size: u64) -> (PathBuf, Vec<u8>) {
    let path = dir.join(name);
    create_qcow2(dir, &["-o", opts, s(&path), &size.to_string()]);
    qemu_io(
        dir,
        "qcow2",
        s(&path),
        &[
            "write -P 0x11 0 256k",
            "write -c -P 0x22 1M 128k",
            "write -z 2M 64k",
            "write -P 0x33 3M 64k",
            "discard 3M 64k",
            "write -P 0x44 4M 8k",
        ],
    );
    let bytes = qemu_raw(&path, "qcow2");
    (path, bytes)
}

#[test]
fn images_qemu_wrote_read_exactly_and_stay_writable() {
    with_tools(&["qemu-img", "qemu-io"], |d| {
        let mut rng = Rng::from_env();
        for (name, opts) in [
            ("plain.qcow2", "cluster_size=65536"),
            ("ext.qcow2", "cluster_size=65536,extended_l2=on"),
            ("zstd.qcow2", "compression_type=zstd"),
            ("v2.qcow2", "compat=0.10"),
        ] {
            let (path, mut model) = qemu_made(d, name, opts, 6 << 20);
            if name == "plain.qcow2" {
                // An internal snapshot: its clusters have refcount 2 and are copied on write.
                qemu_img(d, &["snapshot", "-c", "snap1", s(&path)]);
            }
            let (image, writer) = open_rw(&path);
            thinline_reads(&image, &model, name);
            // Writes over compressed, zero, shared and discarded clusters.
            for &(off, len) in &[
                (1 << 20, 4096u64),
                ((1 << 20) + 100_000, 70_000),
                ((2 << 20) + 512, 512),
                ((3 << 20) + 1000, 3000),
                (100, 200_000),
                ((4 << 20) + 4096, 65536),
            ] {
                let data = rng.bytes(len as usize);
                writer.write(&image, off, &data, false).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            writer
                .write_zeroes(&image, 128 << 10, 64 << 10, ZeroMode::default(), false)
                .unwrap();
            model[(128 << 10)..(192 << 10)].fill(0);
            thinline_reads(&image, &model, name);
            writer.flush().unwrap();
            drop(image);
            drop(writer);
            qemu_check_clean(&path);
            qemu_reads(&path, &model, name);
            if name == "plain.qcow2" {
                // The snapshot still holds what qemu wrote before it.
                let snap = d.join("snap.raw");
                qemu_img(
                    d,
                    &["convert", "-l", "snap1", "-O", "raw", s(&path), s(&snap)],
                );
                let old = std::fs::read(&snap).unwrap();
                assert_eq!(&old[..256 << 10], &vec![0x11u8; 256 << 10][..]);
            }
        }
    });
}

#[test]
fn resize_grows_with_a_zero_tail_over_a_longer_backing_and_refuses_cutting_data() {
    with_tools(&["qemu-img"], |d| {
        let base = d.join("base.raw");
        std::fs::write(&base, vec![0x5au8; 4 << 20]).unwrap();
        let top = d.join("top.qcow2");
        qcow2::create(
            &top,
            &CreateOptions {
                size: (1 << 20) + 1000,
                backing: Some((s(&base).to_owned(), Format::Raw)),
                ..CreateOptions::default()
            },
        )
        .unwrap();
        let (image, writer) = open_rw(&top);
        // Grow past 512 MiB: the L1 table moves too.
        writer.resize(&image, 600 << 20).unwrap();
        let mut buf = vec![0u8; 8 << 20];
        image.read(0, &mut buf).unwrap();
        assert!(buf[..(1 << 20) + 1000].iter().all(|&b| b == 0x5a));
        assert!(
            buf[(1 << 20) + 1000..].iter().all(|&b| b == 0),
            "the backing shows through the new tail"
        );
        writer
            .write(&image, (600 << 20) - 5, b"tail!", false)
            .unwrap();
        // Shrinking over data is refused; over an unallocated tail it works.
        let err = writer.resize(&image, 100 << 20).unwrap_err();
        assert!(err.detail().contains("holds data"), "{}", err.detail());
        writer
            .write_zeroes(&image, 599 << 20, 1 << 20, ZeroMode::default(), false)
            .unwrap();
        writer.flush().unwrap();
        drop(image);
        drop(writer);
        qemu_check_clean(&top);
        let out = qemu_img(d, &["info", "--output=json", s(&top)]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["virtual-size"], 600u64 << 20, "{v}");
    });
}

#[test]
fn repair_frees_leaked_clusters_and_clears_the_dirty_bit() {
    with_tools(&["qemu-img", "qemu-io"], |d| {
        let (path, model) = qemu_made(d, "leaky.qcow2", "lazy_refcounts=on", 6 << 20);
        // A leak: grow the file, count one of its new clusters as used, and set dirty.
        let header = std::fs::read(&path).unwrap();
        let be64 = |at: usize| u64::from_be_bytes(header[at..at + 8].try_into().unwrap());
        let reftable = be64(48) as usize;
        let block = u64::from_be_bytes(header[reftable..reftable + 8].try_into().unwrap()) as usize;
        let clusters = header.len() / 65536;
        let mut bytes = header.clone();
        bytes.resize((clusters + 2) * 65536, 0);
        let leak = clusters + 1;
        bytes[block + leak * 2..block + leak * 2 + 2].copy_from_slice(&1u16.to_be_bytes());
        bytes[79] |= 1; // incompatible features: dirty
        std::fs::write(&path, &bytes).unwrap();
        let err = Image::open_writable(&path, &OpenOptions::default()).unwrap_err();
        assert!(
            err.detail().contains("thinline image check --repair"),
            "{}",
            err.detail()
        );
        let report = qcow2::repair(&path).unwrap();
        assert!(report.dirty_cleared, "{report:?}");
        assert!(report.leaks_fixed >= 1, "{report:?}");
        // Lazy refcounts stay on (qemu's choice too), so a writable open is still refused
        // until the feature is turned off; qemu agrees the image is clean.
        qemu_check_clean(&path);
        qemu_reads(&path, &model, "repaired");
    });
}

#[test]
fn a_second_writer_is_refused_and_qemu_is_refused_while_thinline_writes() {
    with_tools(&["qemu-img", "qemu-io"], |d| {
        let path = d.join("locked.qcow2");
        qcow2::create(
            &path,
            &CreateOptions {
                size: 1 << 20,
                ..CreateOptions::default()
            },
        )
        .unwrap();
        let (image, writer) = open_rw(&path);
        let err = Image::open_writable(&path, &OpenOptions::default()).unwrap_err();
        assert!(err.detail().contains("in use by"), "{}", err.detail());
        let out = std::process::Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "write 0 4k", s(&path)])
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "qemu-io wrote an image Thinline holds"
        );
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("lock"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        drop(image);
        drop(writer);
        // Released with the file: qemu may write now, and then Thinline is refused.
        let mut qemu = std::process::Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "sleep 3000", s(&path)])
            .spawn()
            .unwrap();
        let inode = {
            use std::os::unix::fs::MetadataExt;
            format!(":{} ", std::fs::metadata(&path).unwrap().ino())
        };
        let start = std::time::Instant::now();
        while !std::fs::read_to_string("/proc/locks")
            .unwrap()
            .lines()
            .any(|l| l.contains(&inode))
        {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(20),
                "qemu-io never took its locks"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let refused = Image::open_writable(&path, &OpenOptions::default())
            .unwrap_err()
            .detail();
        qemu.kill().unwrap();
        qemu.wait().unwrap();
        assert!(refused.contains("in use by"), "{refused}");
        assert!(
            refused.contains("qemu-io"),
            "the holder is named: {refused}"
        );
    });
}

#[test]
fn the_backing_can_come_from_storage_the_caller_opened_instead_of_the_name_in_the_header() {
    use std::sync::Arc;
    use thinline_format::{BackingOpener, MemoryStorage};
    let dir = tempfile::tempdir().unwrap();
    let top = dir.path().join("clone.qcow2");
    qcow2::create(
        &top,
        &CreateOptions {
            size: 1 << 20,
            backing: Some((
                "nbd+unix:///template?socket=/nowhere".to_owned(),
                Format::Raw,
            )),
            ..CreateOptions::default()
        },
    )
    .unwrap();
    // The name alone is never followed.
    let err = Image::open_writable(&top, &OpenOptions::default()).unwrap_err();
    assert!(err.detail().contains("--allow-backing"), "{}", err.detail());
    // The caller's own reader of the template (e.g. the shared copy-on-read cache).
    let template: Vec<u8> = (0..1u32 << 20).map(|i| (i % 249) as u8 + 1).collect();
    let shared = template.clone();
    let options = OpenOptions {
        backing_opener: Some(BackingOpener(Arc::new(move |name: &str| {
            (name == "nbd+unix:///template?socket=/nowhere")
                .then(|| Ok(MemoryStorage::open("template", shared.clone())))
        }))),
        ..OpenOptions::default()
    };
    let (image, writer) = Image::open_writable(&top, &options).unwrap();
    let mut model = template;
    writer.write(&image, 5000, b"clone", false).unwrap();
    model[5000..5005].copy_from_slice(b"clone");
    thinline_reads(&image, &model, "over the caller's backing");
    writer.flush().unwrap();
}

#[test]
fn bitmaps_are_invalidated_as_the_spec_asks_before_the_first_write_and_repair_frees_them() {
    with_tools(&["qemu-img", "qemu-io"], |d| {
        let path = d.join("bitmap.qcow2");
        create_qcow2(d, &[s(&path), "4M"]);
        qemu_img(d, &["bitmap", "--add", s(&path), "b0"]);
        qemu_io(d, "qcow2", s(&path), &["write -P 0x11 0 64k"]);
        let (image, writer) = open_rw(&path);
        writer.write(&image, 1 << 20, &[0x22; 4096], false).unwrap();
        writer.flush().unwrap();
        drop(image);
        drop(writer);
        // The autoclear bit is gone: qemu treats the bitmaps as inconsistent, not as valid.
        let header = std::fs::read(&path).unwrap();
        assert_eq!(&header[88..96], &[0; 8], "autoclear features left set");
        let out = std::process::Command::new("qemu-img")
            .args(["check", s(&path)])
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&out.stderr)
                .contains("bitmaps are now considered inconsistent"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report = qcow2::repair(&path).unwrap();
        assert!(report.leaks_fixed > 0, "{report:?}");
        qemu_check_clean(&path);
        let mut model = vec![0u8; 4 << 20];
        model[..64 << 10].fill(0x11);
        model[1 << 20..(1 << 20) + 4096].fill(0x22);
        qemu_reads(&path, &model, "after the bitmaps were dropped");
    });
}

#[test]
fn set_backing_rewrites_the_name_and_format_and_keeps_the_other_header_extensions() {
    with_tools(&["qemu-img"], |d| {
        let base = rng_file(d, "a.raw", 1 << 20);
        std::fs::copy(&base, d.join("b.raw")).unwrap();
        let overlay = d.join("o.qcow2");
        create_qcow2(d, &["-b", "a.raw", "-F", "raw", s(&overlay)]);
        qemu_io(d, "qcow2", s(&overlay), &["write -q -P 0x61 4096 8192"]);
        let before = qemu_raw(&overlay, "qcow2");
        let info = |p: &Path| -> serde_json::Value {
            let out = std::process::Command::new("qemu-img")
                .args(["info", "--output=json", "-U", s(p)])
                .output()
                .unwrap();
            serde_json::from_slice(&out.stdout).unwrap()
        };
        assert!(
            info(&overlay)["format-specific"]["data"]
                .get("compat")
                .is_some()
        );
        // The same bytes under another name: qemu reads the same, the check is clean.
        qcow2::set_backing(&overlay, Some(("b.raw", Format::Raw))).unwrap();
        let v = info(&overlay);
        assert_eq!(v["backing-filename"], "b.raw");
        assert_eq!(v["backing-filename-format"], "raw");
        qemu_check_clean(&overlay);
        assert!(
            qemu_raw(&overlay, "qcow2") == before,
            "the content is the same"
        );
        // A longer name of the same file, then none (after copying the backing's bytes in).
        qcow2::set_backing(&overlay, Some(("./b.raw", Format::Raw))).unwrap();
        assert_eq!(info(&overlay)["backing-filename"], "./b.raw");
        let (image, writer) = open_rw(&overlay);
        writer.write(&image, 0, &before, false).unwrap();
        writer.flush().unwrap();
        drop((image, writer));
        qcow2::set_backing(&overlay, None).unwrap();
        let v = info(&overlay);
        assert!(v.get("backing-filename").is_none(), "{v}");
        qemu_check_clean(&overlay);
        assert!(qemu_raw(&overlay, "qcow2") == before);
        // Thinline reads it the same too, and refuses to rebase an image another holds.
        let image = Image::open(&overlay, &OpenOptions::default()).unwrap();
        assert!(read_all(&image, 1 << 16, 0) == before);
        let (_image, _writer) = open_rw(&overlay);
        let err = qcow2::set_backing(&overlay, Some(("a.raw", Format::Raw))).unwrap_err();
        assert!(
            matches!(err, thinline_format::Error::Locked { .. }),
            "{err:?}"
        );
    });
}

/// A file of `len` random bytes in `dir`.
fn rng_file(dir: &Path, name: &str, len: usize) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, Rng::from_env().bytes(len)).unwrap();
    p
}
