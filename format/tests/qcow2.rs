//! qcow2 images made by qemu-img/qemu-io at test time: bytes and allocation map compared
//! with qemu's, our check compared with `qemu-img check`, and refusals.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use thinline_format::{CheckReport, Error, Format, Image, LayerInfo, OpenOptions};

/// qemu's partial writes, zero writes and discards used on most fixtures.
const WRITES: &[&str] = &[
    "write -P 0x11 12345 3000",
    "write -P 0x22 5M 64k",
    "write -z 10M 64k",
    "write -z -u 11M 128k",
    "discard 12M 1M",
    "write -P 0x33 15M 4097",
];

/// `qemu-img create -f qcow2 -o OPTS name SIZE` (options may be empty).
fn create(dir: &Path, name: &str, opts: &str, extra: &[&str], size: &str) -> PathBuf {
    let path = pb(dir, name);
    let mut args = vec!["create", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend(extra);
    args.push(s(&path));
    args.push(size);
    qemu_img(dir, &args);
    path
}

/// `qemu-img create -f qcow2 -o OPTS -b BACKING -F BACKING_FMT name 64M`.
fn overlay(dir: &Path, name: &str, opts: &str, backing: &Path, backing_fmt: &str) -> PathBuf {
    create(
        dir,
        name,
        opts,
        &["-b", s(backing), "-F", backing_fmt],
        "64M",
    )
}

/// `qemu-img convert [-c] -O qcow2 -o OPTS base.raw name`.
fn convert(dir: &Path, base: &Path, name: &str, opts: &str, compress: bool) -> PathBuf {
    let path = pb(dir, name);
    let mut args = vec!["convert"];
    if compress {
        args.push("-c");
    }
    args.extend(["-f", "raw", "-O", "qcow2"]);
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.push(s(base));
    args.push(s(&path));
    qemu_img(dir, &args);
    path
}

fn io(path: &Path, commands: &[&str]) {
    qemu_io(path.parent().unwrap(), "qcow2", s(path), commands);
}

/// Our check of every layer of `path`.
fn our_check(path: &Path) -> Vec<(String, CheckReport)> {
    let image = open(path, None);
    image
        .check()
        .into_iter()
        .map(|(name, r)| {
            let report = r.unwrap_or_else(|e| panic!("check {name}: {e}"));
            (name, report)
        })
        .collect()
}

/// True when `qemu-img check` finds nothing at all on the top image.
fn qemu_check_clean(path: &Path) -> bool {
    let out = std::process::Command::new("qemu-img")
        .args(["check", "--output=json", "-f", "qcow2", s(path)])
        .output()
        .unwrap();
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
        return false;
    };
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    out.status.success() && n("corruptions") == 0 && n("leaks") == 0 && n("check-errors") == 0
}

/// Bytes and map like qemu; where `qemu-img check` is clean, our check is clean too.
fn verify(path: &Path) {
    assert_reads_like_qemu(path, "qcow2", None);
    assert_map_like_qemu(path, "qcow2", None);
    assert_clean_where_qemu_is(path);
}

/// Where `qemu-img check` is clean on the top image, our check is clean too.
fn assert_clean_where_qemu_is(path: &Path) {
    if qemu_check_clean(path) {
        let top = &our_check(path)[0];
        assert!(
            top.1.errors.is_empty() && top.1.warnings.is_empty(),
            "{}: qemu-img check is clean but ours says {:?}",
            path.display(),
            top.1
        );
    }
}

/// Like `assert_map_like_qemu`, after `adjust` rewrote our runs (for a known, explained
/// difference) and adjacent equal runs were merged again.
fn assert_map_like_qemu_except(path: &Path, adjust: impl Fn(u64, &mut MapClass)) {
    let mut ours: Vec<(u64, u64, MapClass)> = Vec::new();
    for (start, len, mut class) in our_map(&open(path, None)) {
        adjust(start, &mut class);
        match ours.last_mut() {
            Some(last) if last.2 == class => last.1 += len,
            _ => ours.push((start, len, class)),
        }
    }
    assert_eq!(ours, qemu_map(path, "qcow2"), "{}", path.display());
}

/// Reads like qemu; maps like qemu except that qemu does not look for holes in an
/// external data file (it only probes holes when it detects metadata preallocation in
/// the image file itself), so where we report "data, reads as zero" it says "data".
fn verify_data_file(path: &Path) {
    assert_reads_like_qemu(path, "qcow2", None);
    assert_map_like_qemu_except(path, |_, class| {
        if class.data {
            class.zero = false;
        }
    });
    assert_clean_where_qemu_is(path);
}

/// True if `layer` has the detail `key` with a value `ok` accepts.
fn has_detail(layer: &LayerInfo, key: &str, ok: impl Fn(&str) -> bool) -> bool {
    layer.details.iter().any(|(k, v)| k == key && ok(v))
}

fn open_err(path: &Path) -> Error {
    Image::open(path, &OpenOptions::default()).expect_err("open must fail")
}

#[test]
fn created_images_with_every_option() {
    with_tools(&["qemu-img", "qemu-io"], |d| {
        let cases: &[(&str, &str)] = &[
            ("v2.qcow2", "compat=0.10"),
            ("v3.qcow2", "compat=1.1"),
            ("c512.qcow2", "cluster_size=512"),
            ("c4k.qcow2", "cluster_size=4k"),
            ("c64k.qcow2", "cluster_size=64k"),
            ("c2m.qcow2", "cluster_size=2M"),
            ("rc1.qcow2", "refcount_bits=1"),
            ("rc2.qcow2", "refcount_bits=2"),
            ("rc4.qcow2", "refcount_bits=4"),
            ("rc8.qcow2", "refcount_bits=8"),
            ("rc16.qcow2", "refcount_bits=16"),
            ("rc32.qcow2", "refcount_bits=32"),
            ("rc64.qcow2", "refcount_bits=64"),
            ("lazy.qcow2", "lazy_refcounts=on"),
            ("zstd.qcow2", "compression_type=zstd"),
            ("pre-meta.qcow2", "preallocation=metadata"),
            ("pre-falloc.qcow2", "preallocation=falloc"),
            ("pre-full.qcow2", "preallocation=full"),
            ("el2-16k.qcow2", "extended_l2=on,cluster_size=16k"),
            ("el2-64k.qcow2", "extended_l2=on"),
            ("el2-2m.qcow2", "extended_l2=on,cluster_size=2M"),
        ];
        for (name, opts) in cases {
            let path = create(d, name, opts, &[], "16M");
            if name.starts_with("pre") {
                verify(&path);
            }
            io(&path, WRITES);
            if name.starts_with("el2") {
                io(
                    &path,
                    &[
                        "write -P 0xcc 4k 4k",
                        "write -z 1M 64k",
                        "write -z -u 2M 128k",
                    ],
                );
            }
            verify(&path);
        }
        let info = open(&pb(d, "el2-64k.qcow2"), None).info();
        assert_eq!(info[0].subformat.as_deref(), Some("v3"));
        assert!(info[0].features.contains(&"extended_l2".to_owned()));
        let info = open(&pb(d, "v2.qcow2"), None).info();
        assert_eq!(info[0].subformat.as_deref(), Some("v2"));
        let info = open(&pb(d, "rc64.qcow2"), None).info();
        assert!(has_detail(&info[0], "refcount bits", |v| v == "64"));
    });
}

#[test]
fn converted_and_compressed_images() {
    with_tools(&["qemu-img", "qemu-io"], |d| {
        let base = make_base_raw(d);
        let cases: &[(&str, &str, bool)] = &[
            ("conv.qcow2", "", false),
            ("conv-v2.qcow2", "compat=0.10", false),
            ("el2data.qcow2", "extended_l2=on,cluster_size=128k", false),
            ("comp-zlib.qcow2", "", true),
            ("comp-zstd.qcow2", "compression_type=zstd", true),
            ("comp-v2.qcow2", "compat=0.10", true),
            ("comp-512.qcow2", "cluster_size=512", true),
            (
                "comp-512-zstd.qcow2",
                "cluster_size=512,compression_type=zstd",
                true,
            ),
            ("comp-2m.qcow2", "cluster_size=2M", true),
            (
                "comp-2m-zstd.qcow2",
                "cluster_size=2M,compression_type=zstd",
                true,
            ),
            (
                "comp-el2-zstd.qcow2",
                "extended_l2=on,cluster_size=128k,compression_type=zstd",
                true,
            ),
        ];
        for (name, opts, compress) in cases {
            let path = convert(d, &base, name, opts, *compress);
            verify(&path);
        }
        io(
            &pb(d, "el2data.qcow2"),
            &[
                "write -P 0xcc 4k 4k",
                "write -z 1M 64k",
                "write -z -u 2M 128k",
            ],
        );
        verify(&pb(d, "el2data.qcow2"));
        // Writes into a compressed image: new clusters next to compressed ones.
        io(&pb(d, "comp-zlib.qcow2"), WRITES);
        verify(&pb(d, "comp-zlib.qcow2"));
        let info = open(&pb(d, "comp-zstd.qcow2"), None).info();
        assert!(info[0].features.contains(&"zstd".to_owned()));
    });
}

/// Compressible pseudo-random data: compressed streams of 512-byte clusters have odd
/// lengths, so they start mid-sector and cross host cluster boundaries.
#[test]
fn compressed_streams_cross_host_clusters() {
    with_tools(&["qemu-img"], |d| {
        let raw = pb(d, "noise.raw");
        let mut x = 0x1234_5678u32;
        let data: Vec<u8> = (0..4 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                b"abcdefgh"[(x % 8) as usize]
            })
            .collect();
        std::fs::write(&raw, &data).unwrap();
        for (name, opts) in [
            ("n512.qcow2", "cluster_size=512"),
            ("n512z.qcow2", "cluster_size=512,compression_type=zstd"),
            ("n4k.qcow2", "cluster_size=4k"),
        ] {
            let path = convert(d, &raw, name, opts, true);
            verify(&path);
        }
        let ours = read_all(&open(&pb(d, "n512.qcow2"), None), 1 << 20, 0);
        assert_same_bytes("noise", &ours, &data);
    });
}

#[test]
fn external_data_files() {
    with_tools(&["qemu-img", "qemu-io"], |d| {
        let data = p(d, "ext.data");
        let path = create(d, "ext.qcow2", &format!("data_file={data}"), &[], "16M");
        io(&path, WRITES);
        verify_data_file(&path);
        let info = open(&path, None).info();
        assert!(info[0].features.contains(&"external_data_file".to_owned()));

        let data = p(d, "extraw.data");
        let path = create(
            d,
            "extraw.qcow2",
            &format!("data_file={data},data_file_raw=on"),
            &[],
            "16M",
        );
        io(&path, WRITES);
        verify_data_file(&path);
        let info = open(&path, None).info();
        assert!(info[0].features.contains(&"data_file_raw".to_owned()));

        // A relative name: qemu resolves it against its working directory, so create it
        // from the image's directory; we resolve against the image's directory.
        let sub = pb(d, "sub");
        std::fs::create_dir(&sub).unwrap();
        qemu_img(
            &sub,
            &[
                "create",
                "-f",
                "qcow2",
                "-o",
                "data_file=rel.data",
                "rel.qcow2",
                "16M",
            ],
        );
        qemu_io(&sub, "qcow2", "rel.qcow2", &["write -P 0x77 1M 1M"]);
        let image = open(&sub.join("rel.qcow2"), None);
        let mut buf = vec![0; 1 << 20];
        image.read(1 << 20, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0x77));
        let theirs = common::run(
            "qemu-img",
            &["convert", "-O", "raw", "rel.qcow2", s(&pb(d, "rel.raw"))],
            &sub,
        );
        drop(theirs);
        let expected = std::fs::read(pb(d, "rel.raw")).unwrap();
        assert_same_bytes(
            "relative data file",
            &read_all(&image, 1 << 20, 0),
            &expected,
        );
    });
}

#[test]
fn overlays_and_chains() {
    with_tools(&["qemu-img", "qemu-io"], |d| {
        let base = make_base_raw(d);
        let ovl = overlay(d, "ovl-raw.qcow2", "", &base, "raw");
        verify(&ovl);
        io(
            &ovl,
            &[
                "write -P 0x11 0 64k",
                "write -z 64k 64k",
                "write -z -u 128k 64k",
                "discard 10M 64k",
                "write -P 0x11 12345 3000",
            ],
        );
        verify(&ovl);
        let v2 = overlay(d, "ovl-v2.qcow2", "compat=0.10", &base, "raw");
        io(&v2, WRITES);
        verify(&v2);
        let el2 = overlay(
            d,
            "ovl-el2.qcow2",
            "extended_l2=on,cluster_size=128k",
            &base,
            "raw",
        );
        io(
            &el2,
            &[
                "write -P 0xcc 4k 4k",
                "write -z 1M 64k",
                "write -z -u 2M 128k",
                "write -P 0x44 10M 5000",
            ],
        );
        verify(&el2);

        // qcow2 over qcow2, and a chain of four levels.
        let mid = convert(d, &base, "mid.qcow2", "", false);
        let l1 = overlay(d, "l1.qcow2", "", &mid, "qcow2");
        io(&l1, WRITES);
        let l2 = overlay(d, "l2.qcow2", "cluster_size=4k", &l1, "qcow2");
        io(
            &l2,
            &[
                "write -P 0x99 3M 1M",
                "write -z 5M 4k",
                "write -P 0x98 11M 1000",
            ],
        );
        let l3 = overlay(d, "l3.qcow2", "compat=0.10", Path::new("l2.qcow2"), "qcow2");
        io(&l3, &["write -P 0x97 40M 3M", "discard 0 64k"]);
        verify(&l1);
        verify(&l2);
        verify(&l3);
        assert_eq!(open(&l3, None).layers().len(), 4);

        // A backing file shorter than the overlay, written in both.
        let small = pb(d, "small.raw");
        qemu_img(d, &["create", "-f", "raw", s(&small), "10M"]);
        qemu_io(d, "raw", s(&small), &["write -P 0x5a 0 10M"]);
        let big = overlay(d, "big.qcow2", "", &small, "raw");
        io(&big, &["write -P 0x6b 9M 2M", "write -P 0x6c 30M 1M"]);
        assert_reads_like_qemu(&big, "qcow2", None);
        // Past the end of the shorter backing file qemu 10 reports "not allocated"; the
        // chain (chain.rs) reports zeroes allocated at the backing layer's depth.
        assert_map_like_qemu_except(&big, |start, class| {
            if start >= 10 << 20 && class.depth == Some(1) && class.zero {
                *class = MapClass {
                    present: false,
                    zero: true,
                    data: false,
                    depth: None,
                };
            }
        });
    });
}

#[test]
fn snapshots_bitmaps_dirty_corrupt() {
    with_tools(&["qemu-img", "qemu-io"], |d| {
        let base = make_base_raw(d);

        let snap = convert(d, &base, "snap.qcow2", "", false);
        qemu_img(d, &["snapshot", "-c", "snap1", s(&snap)]);
        io(&snap, &["write -P 0x41 0 2M", "write -z 10M 1M"]);
        qemu_img(d, &["snapshot", "-c", "snap2", s(&snap)]);
        io(&snap, &["write -P 0x42 1M 2M", "discard 11M 64k"]);
        verify(&snap);
        let info = open(&snap, None).info();
        assert!(info[0].features.contains(&"snapshots".to_owned()));
        let both = |v: &str| v.contains("snap1") && v.contains("snap2");
        assert!(has_detail(&info[0], "snapshot names", both));

        let bm = convert(d, &base, "bm.qcow2", "", false);
        qemu_img(
            d,
            &["bitmap", "--add", "--granularity", "64k", s(&bm), "bm0"],
        );
        qemu_img(d, &["bitmap", "--add", s(&bm), "bm1", "--disable"]);
        verify(&bm);
        let info = open(&bm, None).info();
        assert!(info[0].features.contains(&"bitmaps".to_owned()));
        assert!(has_detail(&info[0], "bitmap names", |v| v == "bm0, bm1"));

        // Dirty: lazy refcounts and an abort before the refcounts are written.
        let dirty = convert(d, &base, "dirty.qcow2", "lazy_refcounts=on", false);
        // qemu-io aborts (exit status from SIGABRT) after the write: ignore the status.
        let status = std::process::Command::new("qemu-io")
            .args([
                "-f",
                "qcow2",
                "-c",
                "write -P 0x5a 30M 64k",
                "-c",
                "abort",
                s(&dirty),
            ])
            .current_dir(d)
            .output()
            .unwrap()
            .status;
        assert!(!status.success());
        let image = open(&dirty, None);
        assert!(image.info()[0].dirty);
        assert_reads_like_qemu(&dirty, "qcow2", None);
        assert_map_like_qemu(&dirty, "qcow2", None);
        let report = &our_check(&dirty)[0].1;
        assert!(report.errors.is_empty(), "dirty: {report:?}");
        assert!(
            report.warnings.iter().any(|w| w.contains("dirty")),
            "dirty: {report:?}"
        );

        // Corrupt bit: served read-only.
        let corrupt = convert(d, &base, "corrupt.qcow2", "", false);
        let mut bytes = std::fs::read(&corrupt).unwrap();
        bytes[79] |= 2;
        std::fs::write(&corrupt, &bytes).unwrap();
        assert!(open(&corrupt, None).info()[0].corrupt);
        assert_reads_like_qemu(&corrupt, "qcow2", None);
        assert_map_like_qemu(&corrupt, "qcow2", None);

        // ZERO_ALLOC: the host cluster keeps its stale bytes.
        let zalloc = create(d, "zalloc.qcow2", "", &[], "64M");
        io(&zalloc, &["write -P 0x55 0 128k", "write -z 0 64k"]);
        verify(&zalloc);
        let mut buf = vec![0xff; 65536];
        open(&zalloc, None).read(0, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
    });
}

#[test]
fn refusals_name_the_file_and_reason() {
    with_tools(&["qemu-img", "qemu-io"], |d| {
        let base = make_base_raw(d);

        let luks = pb(d, "luks.qcow2");
        qemu_img(
            d,
            &[
                "create",
                "-f",
                "qcow2",
                "--object",
                "secret,id=sec0,data=pass",
                "-o",
                "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
                s(&luks),
                "16M",
            ],
        );
        let e = open_err(&luks).to_string();
        assert!(
            e.contains("luks.qcow2") && e.contains("LUKS-encrypted"),
            "{e}"
        );

        // qemu 10 may refuse to create AES images: patch crypt_method instead.
        let aes = pb(d, "aes.qcow2");
        let made = std::process::Command::new("qemu-img")
            .args([
                "create",
                "-f",
                "qcow2",
                "--object",
                "secret,id=sec0,data=0123456789abcdef",
                "-o",
                "encrypt.format=aes,encrypt.key-secret=sec0",
                s(&aes),
                "16M",
            ])
            .current_dir(d)
            .output()
            .unwrap();
        if !made.status.success() {
            create(d, "aes.qcow2", "", &[], "16M");
            let mut bytes = std::fs::read(&aes).unwrap();
            bytes[32..36].copy_from_slice(&1u32.to_be_bytes());
            std::fs::write(&aes, &bytes).unwrap();
        }
        let e = open_err(&aes).to_string();
        assert!(
            e.contains("aes.qcow2") && e.contains("AES-encrypted"),
            "{e}"
        );

        // An unknown incompatible bit.
        let unk = create(d, "unknown.qcow2", "", &[], "16M");
        let mut bytes = std::fs::read(&unk).unwrap();
        bytes[74] |= 0x80; // bit 47 of the big-endian field at 72
        std::fs::write(&unk, &bytes).unwrap();
        let e = open_err(&unk);
        assert!(matches!(e, Error::Unsupported { .. }), "{e}");
        assert!(e.to_string().contains("incompatible feature bit 47"), "{e}");

        // Backing loop: a -> b -> a.
        let a = overlay(d, "a.qcow2", "", &base, "raw");
        let b = overlay(d, "b.qcow2", "", &a, "qcow2");
        qemu_img(d, &["rebase", "-u", "-b", s(&b), "-F", "qcow2", s(&a)]);
        let e = open_err(&b).to_string();
        assert!(e.contains("backing loop"), "{e}");

        // Deeper than MAX_CHAIN_DEPTH.
        let mut prev = base.clone();
        let mut fmt = "raw";
        for i in 0..thinline_format::MAX_CHAIN_DEPTH {
            let next = overlay(d, &format!("deep{i}.qcow2"), "", &prev, fmt);
            prev = next;
            fmt = "qcow2";
        }
        let e = open_err(&prev).to_string();
        assert!(e.contains("deeper than the limit"), "{e}");

        // No backing format: qemu 10 refuses `rebase -u` without -F, so hide the
        // backing-format extension by giving it an unknown type.
        let nofmt = overlay(d, "nofmt.qcow2", "", &base, "raw");
        let mut bytes = std::fs::read(&nofmt).unwrap();
        let at = bytes
            .windows(4)
            .position(|w| w == [0xe2, 0x79, 0x2a, 0xca])
            .expect("backing format extension");
        bytes[at..at + 4].copy_from_slice(&0x1234_5678u32.to_be_bytes());
        std::fs::write(&nofmt, &bytes).unwrap();
        let e = open_err(&nofmt).to_string();
        assert!(
            e.contains("nofmt.qcow2") && e.contains("no declared format"),
            "{e}"
        );
        let lax = OpenOptions {
            undeclared_backing: thinline_format::UndeclaredBacking::Raw,
            ..OpenOptions::default()
        };
        let image = Image::open(&nofmt, &lax).unwrap();
        assert_eq!(image.layers().len(), 2);
        let details = &image.info()[0].details;
        assert!(
            details.iter().any(|(k, _)| k == "header extensions"),
            "{details:?}"
        );

        // Missing backing file.
        let orphan = overlay(d, "orphan.qcow2", "", &base, "raw");
        qemu_img(
            d,
            &["rebase", "-u", "-b", "missing.raw", "-F", "raw", s(&orphan)],
        );
        let e = open_err(&orphan).to_string();
        assert!(
            e.contains("orphan.qcow2") && e.contains("missing.raw"),
            "{e}"
        );

        // Opening a qcow2 as raw still works; opening raw as qcow2 fails cleanly.
        let options = OpenOptions {
            format: Some(Format::Qcow2),
            ..OpenOptions::default()
        };
        let e = Image::open(&base, &options).unwrap_err().to_string();
        assert!(e.contains("magic"), "{e}");
    });
}
