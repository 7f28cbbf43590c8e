//! Image exports end to end: qcow2, VHD, VMDK and raw images (and chains across them)
//! made by qemu-img, served by `thinline serve` and checked with real clients against
//! qemu: `qemu-img compare` for the bytes, `nbdinfo --map` against `qemu-nbd -A` for
//! where data lives, plus the CLI (`thinline image …`), read-only guarantees and a
//! randomised property test.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::qemu_nbd::{QemuNbd, assert_same_map, nbd_map};
use common::*;
use thinline_test_support::qemu::*;
use thinline_test_support::rng::Rng;

const TOOLS: &[&str] = &["qemu-img", "qemu-io", "qemu-nbd", "nbdinfo"];

/// `thinline image convert -O raw` and `qemu-img convert -O raw` of `img` into `dir`;
/// asserts they are byte for byte equal and returns (thinline's, qemu's) output.
fn convert_like_qemu(dir: &Path, img: &Img) -> (PathBuf, PathBuf) {
    let ours = dir.join(format!("{}.thinline.raw", img.name));
    let theirs = dir.join(format!("{}.qemu.raw", img.name));
    run(Command::new(thinline())
        .args(["image", "convert", "-O", "raw"])
        .arg(&img.path)
        .arg(&ours));
    let (path, out) = (img.path.to_str().unwrap(), theirs.to_str().unwrap());
    qemu_img(
        dir,
        &["convert", "-f", img.qemu_fmt, "-O", "raw", path, out],
    );
    assert!(
        read_file(&ours) == read_file(&theirs),
        "{}: thinline image convert differs from qemu-img convert",
        img.name
    );
    (ours, theirs)
}

/// Serves `images` in one `thinline serve` and checks each against qemu: `qemu-img
/// compare` through NBD, `nbdinfo --map` and `--map=qemu:allocation-depth` against
/// `qemu-nbd -r -A`, and `thinline image convert` against `qemu-img convert`.
fn check_served_like_qemu(dir: &Path, images: &[Img]) {
    let specs: Vec<String> = images
        .iter()
        .map(|i| format!("{}={}", i.name, i.path.display()))
        .collect();
    let spec_refs: Vec<&str> = specs.iter().map(String::as_str).collect();
    let served = Served::unix(dir, &[], &spec_refs);
    for (n, img) in images.iter().enumerate() {
        let uri = served.uri(&img.name);
        let out = run(Command::new("qemu-img")
            .args(["compare", "-f", img.qemu_fmt, "-F", "raw"])
            .arg(&img.path)
            .arg(&uri));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("identical"),
            "{}: {:?}",
            img.name,
            out
        );
        let qemu = QemuNbd::start(&img.path, img.qemu_fmt, dir.join(format!("q{n}.sock")));
        for context in ["", "qemu:allocation-depth"] {
            let label = if context.is_empty() {
                "base:allocation"
            } else {
                context
            };
            assert_same_map(
                &format!("{} {label}", img.name),
                &nbd_map(&uri, context),
                &nbd_map(&qemu.uri(), context),
                context.is_empty(),
            );
        }
        drop(qemu);
        let (ours, theirs) = convert_like_qemu(dir, img);
        std::fs::remove_file(ours).unwrap();
        std::fs::remove_file(theirs).unwrap();
    }
}

#[test]
fn served_images_match_qemu_bytes_and_maps() {
    if !require(TOOLS) {
        return;
    }
    let (dir, images) = in_tempdir(fixtures);
    check_served_like_qemu(dir.path(), &images);
}

/// One image per create option the format notes list (qcow2, VHD, VMDK), each written
/// with data, zeroes and discards at odd offsets.
fn option_fixtures(d: &Path) -> Vec<Img> {
    let p = |n: &str| d.join(n).to_str().unwrap().to_owned();
    let mut out = Vec::new();
    let writes = [
        "write -P 0x61 0 64k",
        "write -P 0x62 1000001 70001",
        "write -z 3M 128k",
        "write -P 0x63 5M 1536",
        "discard 5M 512",
        "write -P 0x64 7340031 5000",
    ];
    let mut make = |name: &str, fmt: &'static str, opts: &str| {
        let path = p(name);
        let mut args = vec!["create", "-q", "-f", fmt];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([path.as_str(), "8M"]);
        qemu_img(d, &args);
        let ops: Vec<&str> = writes
            .iter()
            .copied()
            .filter(|w| fmt == "qcow2" || !w.starts_with("discard"))
            .collect();
        qemu_io(d, fmt, &path, &ops);
        out.push(Img {
            path: d.join(name),
            name: name.to_owned(),
            qemu_fmt: fmt,
        });
    };
    for (i, opts) in [
        "compat=0.10",
        "compat=1.1",
        "cluster_size=512",
        "cluster_size=4k",
        "cluster_size=2M",
        "refcount_bits=1",
        "refcount_bits=2",
        "refcount_bits=8",
        "refcount_bits=32",
        "refcount_bits=64",
        "lazy_refcounts=on",
        "extended_l2=on",
        "extended_l2=on,cluster_size=2M",
        "compression_type=zstd",
        "preallocation=metadata",
        "preallocation=falloc",
        "preallocation=full",
    ]
    .iter()
    .enumerate()
    {
        make(&format!("opt{i}.qcow2"), "qcow2", opts);
    }
    let data = p("ext.data");
    make("datafile.qcow2", "qcow2", &format!("data_file={data}"));
    let raw_data = p("extraw.data");
    make(
        "datafileraw.qcow2",
        "qcow2",
        &format!("data_file={raw_data},data_file_raw=on"),
    );
    for sub in ["dynamic", "fixed"] {
        for force in ["off", "on"] {
            make(
                &format!("{sub}-{force}.vhd"),
                "vpc",
                &format!("subformat={sub},force_size={force}"),
            );
        }
    }
    for (i, opts) in [
        "subformat=monolithicSparse",
        "subformat=monolithicFlat",
        "subformat=twoGbMaxExtentSparse",
        "subformat=twoGbMaxExtentFlat",
        "zeroed_grain=on",
        "compat6=on",
        "adapter_type=lsilogic,hwversion=4",
    ]
    .iter()
    .enumerate()
    {
        make(&format!("opt{i}.vmdk"), "vmdk", opts);
    }
    // Converted (compressed, stream) images of a written raw base.
    make("src.raw", "raw", "");
    let src = p("src.raw");
    for (name, args) in [
        ("comp-512.qcow2", "-c -O qcow2 -o cluster_size=512"),
        ("comp-2m.qcow2", "-c -O qcow2 -o cluster_size=2M"),
        ("comp-zstd.qcow2", "-c -O qcow2 -o compression_type=zstd"),
        ("comp-v2.qcow2", "-c -O qcow2 -o compat=0.10"),
        (
            "comp-el2.qcow2",
            "-c -O qcow2 -o extended_l2=on,cluster_size=128k,compression_type=zstd",
        ),
        ("stream.vmdk", "-O vmdk -o subformat=streamOptimized"),
        ("conv.vhd", "-O vpc -o subformat=dynamic"),
    ] {
        let mut v = vec!["convert".to_owned()];
        v.extend(args.split(' ').map(str::to_owned));
        v.extend([src.clone(), p(name)]);
        qemu_img(d, &v.iter().map(String::as_str).collect::<Vec<_>>());
        let fmt = if name.ends_with(".qcow2") {
            "qcow2"
        } else if name.ends_with(".vmdk") {
            "vmdk"
        } else {
            "vpc"
        };
        out.push(Img {
            path: d.join(name),
            name: name.to_owned(),
            qemu_fmt: fmt,
        });
    }
    // State fixtures: snapshots, bitmaps, a dirty image, the corrupt bit, ZERO_ALLOC.
    qemu_img(d, &["create", "-q", "-f", "qcow2", &p("snap.qcow2"), "8M"]);
    qemu_io(d, "qcow2", &p("snap.qcow2"), &["write -P 0x71 0 1M"]);
    qemu_img(d, &["snapshot", "-c", "s1", &p("snap.qcow2")]);
    qemu_io(d, "qcow2", &p("snap.qcow2"), &["write -P 0x72 512k 1M"]);
    qemu_img(d, &["snapshot", "-c", "s2", &p("snap.qcow2")]);
    qemu_io(d, "qcow2", &p("snap.qcow2"), &["write -z 0 64k"]);
    qemu_img(
        d,
        &["create", "-q", "-f", "qcow2", &p("bitmaps.qcow2"), "8M"],
    );
    qemu_img(
        d,
        &[
            "bitmap",
            "--add",
            "--granularity",
            "64k",
            &p("bitmaps.qcow2"),
            "bm0",
        ],
    );
    qemu_io(
        d,
        "qcow2",
        &p("bitmaps.qcow2"),
        &["write -P 0x73 100k 300k"],
    );
    dirty_qcow2(d, "dirty.qcow2");
    qemu_img(
        d,
        &["create", "-q", "-f", "qcow2", &p("corrupt.qcow2"), "8M"],
    );
    qemu_io(d, "qcow2", &p("corrupt.qcow2"), &["write -P 0x74 0 64k"]);
    let mut c = read_file(&d.join("corrupt.qcow2"));
    c[79] |= 0x02;
    std::fs::write(d.join("corrupt.qcow2"), c).unwrap();
    qemu_img(
        d,
        &["create", "-q", "-f", "qcow2", &p("zalloc.qcow2"), "8M"],
    );
    qemu_io(
        d,
        "qcow2",
        &p("zalloc.qcow2"),
        &["write -P 0x55 0 128k", "write -z 0 64k"],
    );
    for name in [
        "snap.qcow2",
        "bitmaps.qcow2",
        "dirty.qcow2",
        "corrupt.qcow2",
        "zalloc.qcow2",
    ] {
        out.push(Img {
            path: d.join(name),
            name: name.to_owned(),
            qemu_fmt: "qcow2",
        });
    }
    // Children: a VMDK delta, a v2 qcow2 overlay, a 4-level chain across formats.
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-b",
            "opt0.vmdk",
            "-F",
            "vmdk",
            &p("delta.vmdk"),
            "8M",
        ],
    );
    qemu_io(d, "vmdk", &p("delta.vmdk"), &["write -P 0x75 2M 100k"]);
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            "-b",
            "src.raw",
            "-F",
            "raw",
            &p("v2ovl.qcow2"),
            "8M",
        ],
    );
    qemu_io(
        d,
        "qcow2",
        &p("v2ovl.qcow2"),
        &["write -P 0x76 123457 4000"],
    );
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "dynamic-on.vhd",
            "-F",
            "vpc",
            &p("c1.qcow2"),
            "8M",
        ],
    );
    qemu_io(
        d,
        "qcow2",
        &p("c1.qcow2"),
        &["write -P 0x77 6M 300k", "write -z 0 4k"],
    );
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "-b",
            "c1.qcow2",
            "-F",
            "qcow2",
            &p("c2.qcow2"),
            "8M",
        ],
    );
    qemu_io(
        d,
        "qcow2",
        &p("c2.qcow2"),
        &["write -P 0x78 6100k 10k", "discard 1M 64k"],
    );
    for (name, fmt) in [
        ("delta.vmdk", "vmdk"),
        ("v2ovl.qcow2", "qcow2"),
        ("c2.qcow2", "qcow2"),
    ] {
        out.push(Img {
            path: d.join(name),
            name: name.to_owned(),
            qemu_fmt: fmt,
        });
    }
    out
}

#[test]
fn every_create_option_serves_like_qemu() {
    if !require(TOOLS) {
        return;
    }
    let (dir, images) = in_tempdir(option_fixtures);
    assert!(images.len() > 45, "{} fixtures", images.len());
    check_served_like_qemu(dir.path(), &images);
}

#[test]
fn image_cli_converts_maps_and_checks_like_qemu() {
    if !require(TOOLS) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for img in fixtures(dir.path()) {
        let (ours, theirs) = convert_like_qemu(dir.path(), &img);
        // Sparse: no more blocks allocated than qemu's output.
        use std::os::unix::fs::MetadataExt;
        let (a, b) = (
            std::fs::metadata(&ours).unwrap().blocks(),
            std::fs::metadata(&theirs).unwrap().blocks(),
        );
        assert!(
            a <= b + 8,
            "{}: output not sparse ({a} blocks, qemu {b})",
            img.name
        );

        let info: serde_json::Value = serde_json::from_str(&stdout(
            Command::new(thinline())
                .args(["image", "info", "--json"])
                .arg(&img.path),
        ))
        .unwrap();
        let qinfo: serde_json::Value = serde_json::from_str(&stdout(
            Command::new("qemu-img")
                .args([
                    "info",
                    "--output=json",
                    "--backing-chain",
                    "-f",
                    img.qemu_fmt,
                ])
                .arg(&img.path),
        ))
        .unwrap();
        let qchain = qinfo.as_array().unwrap();
        assert_eq!(
            info["virtual_size"], qchain[0]["virtual-size"],
            "{}: virtual size",
            img.name
        );
        assert_eq!(
            info["chain"].as_array().unwrap().len(),
            qchain.len(),
            "{}: chain length",
            img.name
        );

        let map: serde_json::Value = serde_json::from_str(&stdout(
            Command::new(thinline())
                .args(["image", "map", "--json"])
                .arg(&img.path),
        ))
        .unwrap();
        let total = mapped_length(&map);
        // A range reported as zero (or as a hole) reads as zeroes.
        let bytes = read_file(&ours);
        for e in map.as_array().unwrap() {
            if e["zero"].as_bool().unwrap() || !e["data"].as_bool().unwrap() {
                let start = e["start"].as_u64().unwrap() as usize;
                let len = e["length"].as_u64().unwrap() as usize;
                assert!(
                    bytes[start..start + len].iter().all(|&b| b == 0),
                    "{}: {e} is reported zero but holds data",
                    img.name
                );
            }
        }
        assert_eq!(
            total,
            info["virtual_size"].as_u64().unwrap(),
            "{}: map covers the disk",
            img.name
        );

        let status = Command::new(thinline())
            .args(["image", "check"])
            .arg(&img.path)
            .status()
            .unwrap();
        assert_eq!(
            status.code(),
            Some(0),
            "{}: check of a clean image",
            img.name
        );
    }
}

/// Every file of every fixture, with its bytes and mtime.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>, std::time::SystemTime)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && p.extension().is_none_or(|e| e != "sock"))
        .map(|p| {
            let m = std::fs::metadata(&p).unwrap().modified().unwrap();
            let bytes = read_file(&p);
            (p, bytes, m)
        })
        .collect();
    files.sort_by(|a, b| a.0.cmp(&b.0));
    files
}

#[test]
fn inspecting_and_serving_never_changes_a_template() {
    if !require(TOOLS) {
        return;
    }
    let (dir, images) = in_tempdir(fixtures);
    // Make the dirty/corrupt cases too: a dirty lazy-refcount image and a corrupt one.
    let before = snapshot(dir.path());
    let out = tempfile::tempdir().unwrap();
    for img in &images {
        for args in [&["info", "--json"][..], &["map"][..], &["check"][..]] {
            let _ = Command::new(thinline())
                .arg("image")
                .args(args)
                .arg(&img.path)
                .stdout(Stdio::null())
                .status()
                .unwrap();
        }
        let raw = out.path().join("x.raw");
        run(Command::new(thinline())
            .args(["image", "convert", "-O", "raw"])
            .arg(&img.path)
            .arg(&raw));
    }
    let specs: Vec<String> = images
        .iter()
        .map(|i| format!("{}={}", i.name, i.path.display()))
        .collect();
    let spec_refs: Vec<&str> = specs.iter().map(String::as_str).collect();
    {
        let sock_dir = tempfile::tempdir().unwrap();
        let mut served = Served::unix(sock_dir.path(), &["-r"], &spec_refs);
        for img in &images {
            let uri = served.uri(&img.name);
            run(Command::new("nbdcopy").arg(&uri).arg("null:"));
            // Writes are refused: templates are read-only.
            let w = Command::new("qemu-io")
                .args(["-f", "raw", "-c", "write 0 4k", &uri])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&w.stdout).to_string()
                + &String::from_utf8_lossy(&w.stderr);
            assert!(
                !w.status.success()
                    || text.contains("read-only")
                    || text.contains("Operation not permitted"),
                "{}: write was not refused: {text}",
                img.name
            );
        }
        served.terminate(Duration::from_secs(10));
    }
    let after = snapshot(dir.path());
    assert_eq!(before.len(), after.len());
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(b.0, a.0);
        assert!(b.1 == a.1, "{} changed", b.0.display());
        assert_eq!(b.2, a.2, "{} mtime changed", b.0.display());
    }
}

#[test]
fn refused_images_name_the_file_and_reason_and_serve_nothing() {
    if !require(TOOLS) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = |n: &str| d.join(n).to_str().unwrap().to_owned();
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            "secret,id=sec0,data=pass",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0",
            &p("luks.qcow2"),
            "16M",
        ],
    );
    qemu_img(d, &["create", "-q", "-f", "qcow2", &p("a.qcow2"), "16M"]);
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "a.qcow2",
            "-F",
            "qcow2",
            &p("b.qcow2"),
            "16M",
        ],
    );
    qemu_img(
        d,
        &[
            "rebase",
            "-u",
            "-b",
            "b.qcow2",
            "-F",
            "qcow2",
            "-f",
            "qcow2",
            &p("a.qcow2"),
        ],
    );
    qemu_img(d, &["create", "-q", "-f", "raw", &p("base.raw"), "16M"]);
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "missing.raw",
            "-F",
            "raw",
            "-u",
            &p("orphan.qcow2"),
            "16M",
        ],
    );
    for (image, words) in [
        ("luks.qcow2", &["luks.qcow2", "encrypt"][..]),
        ("a.qcow2", &["loop"][..]),
        ("orphan.qcow2", &["orphan.qcow2", "missing.raw"][..]),
    ] {
        for cmd in [&["image", "info"][..], &["serve", "--socket"][..]] {
            let mut c = Command::new(thinline());
            c.args(cmd);
            if cmd[0] == "serve" {
                c.arg(d.join("refused.sock"));
            }
            let out = c.arg(d.join(image)).stdin(Stdio::null()).output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
            assert_eq!(out.status.code(), Some(1), "{image} {cmd:?}: {err}");
            for w in words {
                assert!(
                    err.contains(&w.to_lowercase()),
                    "{image} {cmd:?}: error does not mention {w:?}: {err}"
                );
            }
            assert!(
                !d.join("refused.sock").exists(),
                "{image}: nothing is served"
            );
        }
    }
}

#[test]
fn random_chains_with_random_writes_read_like_qemu() {
    if !require(TOOLS) {
        return;
    }
    let mut rng = Rng::from_env();
    let seed = rng.0;
    const SIZE: u64 = 16 << 20;
    for round in 0..6 {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let depth = 1 + rng.below(4);
        // The bottom layer's format, then overlays: qcow2 over anything, vmdk over vmdk.
        let mut layers: Vec<(String, &'static str)> = Vec::new();
        let mut history = String::new();
        for level in 0..depth {
            let (name, fmt) = if level == 0 {
                match rng.below(4) {
                    0 => ("l0.raw".to_owned(), "raw"),
                    1 => ("l0.qcow2".to_owned(), "qcow2"),
                    2 => ("l0.vhd".to_owned(), "vpc"),
                    _ => ("l0.vmdk".to_owned(), "vmdk"),
                }
            } else if layers.last().unwrap().1 == "vmdk" && rng.below(2) == 0 {
                (format!("l{level}.vmdk"), "vmdk")
            } else {
                (format!("l{level}.qcow2"), "qcow2")
            };
            let path = d.join(&name).to_str().unwrap().to_owned();
            let size = SIZE.to_string();
            let mut args = vec!["create", "-q", "-f", fmt];
            let cluster = format!("cluster_size={}", 512u64 << rng.below(12));
            if fmt == "vpc" {
                args.extend(["-o", "force_size=on"]);
            }
            if fmt == "qcow2" {
                args.extend(["-o", cluster.as_str()]);
            }
            let below;
            if let Some((parent, pfmt)) = layers.last() {
                below = parent.clone();
                args.extend(["-b", below.as_str(), "-F", pfmt]);
            }
            args.extend([path.as_str(), size.as_str()]);
            qemu_img(d, &args);
            history.push_str(&format!("{args:?}\n"));
            let mut cmds = Vec::new();
            for _ in 0..(1 + rng.below(12)) {
                let off = rng.below(SIZE - 1);
                let len = (1 + rng.below(300_000)).min(SIZE - off);
                let (off, len) = if fmt == "raw" || rng.below(2) == 0 {
                    (off, len)
                } else {
                    (off & !511, (len + 511) & !511)
                };
                let len = len.min(SIZE - off);
                cmds.push(match rng.below(5) {
                    0 if fmt == "qcow2" => format!("write -z {off} {len}"),
                    1 if fmt == "qcow2" => format!(
                        "discard {} {}",
                        off & !511,
                        ((len + 511) & !511).min(SIZE - (off & !511))
                    ),
                    _ => format!("write -P {} {off} {len}", 1 + rng.below(254)),
                });
            }
            let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
            history.push_str(&format!("{cmds:?}\n"));
            qemu_io(d, fmt, &path, &refs);
            layers.push((name, fmt));
        }
        let (top, fmt) = layers.last().unwrap();
        let top = d.join(top);
        let ours = d.join("ours.raw");
        let theirs = d.join("theirs.raw");
        let out = Command::new(thinline())
            .args(["image", "convert", "-O", "raw"])
            .arg(&top)
            .arg(&ours)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "round {round} (seed {seed}): convert failed: {}\n{history}",
            String::from_utf8_lossy(&out.stderr)
        );
        qemu_img(
            d,
            &[
                "convert",
                "-f",
                fmt,
                "-O",
                "raw",
                top.to_str().unwrap(),
                theirs.to_str().unwrap(),
            ],
        );
        let (a, b) = (read_file(&ours), read_file(&theirs));
        if a != b {
            let i = a.iter().zip(&b).position(|(x, y)| x != y).unwrap_or(0);
            panic!(
                "round {round} (seed {seed}): byte {i} differs: thinline {:#x}, qemu {:#x}\n{history}",
                a.get(i).copied().unwrap_or(0),
                b.get(i).copied().unwrap_or(0)
            );
        }
    }
}

#[test]
fn damaged_metadata_fails_that_read_only_and_the_server_stays_up() {
    if !require(TOOLS) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("damaged.qcow2");
    let path = img.to_str().unwrap();
    qemu_img(d, &["create", "-q", "-f", "qcow2", path, "64M"]);
    qemu_io(
        d,
        "qcow2",
        path,
        &["write -P 0x5a 0 64k", "write -P 0xa5 32M 64k"],
    );
    // Point the L2 entry of the cluster at 32 MiB far beyond the end of the file.
    let mut bytes = read_file(&img);
    let be64 = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    let l1 = be64(&bytes, 40) as usize;
    let l2 = (be64(&bytes, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let entry = l2 + (32 << 20) / 65536 * 8;
    assert_ne!(be64(&bytes, entry), 0, "the fixture has data at 32 MiB");
    bytes[entry..entry + 8].copy_from_slice(&0x8000_0100_0000_0000u64.to_be_bytes());
    std::fs::write(&img, &bytes).unwrap();

    let served = Served::unix(d, &[], &[path]);
    let uri = served.uri("");
    let bad = Command::new("qemu-io")
        .args(["-f", "raw", "-r", "-c", "read 32M 4k", &uri])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&bad.stdout).to_string() + &String::from_utf8_lossy(&bad.stderr);
    assert!(
        text.contains("Input/output error"),
        "the damaged cluster must fail with EIO: {text}"
    );
    // Other reads still work, on a new connection too.
    let good =
        stdout(Command::new("qemu-io").args(["-f", "raw", "-r", "-c", "read -P 0x5a 0 64k", &uri]));
    assert!(!good.contains("Pattern verification failed"), "{good}");
    // The error line, naming the reason, may reach the log just after the reply
    // reached the client.
    served.assert_logs("beyond", Duration::from_secs(10));
    let log = served.log();
    assert!(
        log.contains("damaged.qcow2"),
        "the log names the file:\n{log}"
    );
}

#[test]
fn damaged_compressed_clusters_fail_that_read_only_and_the_server_stays_up() {
    if !require(TOOLS) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let raw = d.join("base.raw");
    let text: Vec<u8> = (0..4u32 << 20)
        .map(|i| b"thin clone "[(i % 11) as usize])
        .collect();
    std::fs::write(&raw, &text).unwrap();
    let be64 = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    for compression in ["zlib", "zstd"] {
        let img = d.join(format!("damaged-{compression}.qcow2"));
        let path = img.to_str().unwrap();
        let option = format!("compression_type={compression}");
        qemu_img(
            d,
            &[
                "convert",
                "-q",
                "-c",
                "-O",
                "qcow2",
                "-o",
                &option,
                raw.to_str().unwrap(),
                path,
            ],
        );
        // The compressed entry of the cluster at 1 MiB (64 KiB clusters: the host offset
        // is in bits 0..54); its stream starts with bytes no decoder accepts (only 16:
        // the streams of this text are short, and the next cluster's follows at once).
        let mut bytes = read_file(&img);
        let l1 = be64(&bytes, 40) as usize;
        let l2 = (be64(&bytes, l1) & 0x00ff_ffff_ffff_fe00) as usize;
        let entry = be64(&bytes, l2 + 16 * 8);
        assert_ne!(
            entry & 1 << 62,
            0,
            "{compression}: the fixture's cluster is compressed"
        );
        let host = (entry & ((1 << 54) - 1)) as usize;
        bytes[host..host + 16].fill(0xff);
        std::fs::write(&img, &bytes).unwrap();

        let served = Served::unix(d, &[], &[path]);
        let uri = served.uri("");
        // One cluster alone is decoded in the request's task, a run of several on the
        // blocking pool: both paths.
        for read in [
            "read 1M 4k",
            "read 1056768 4k",
            "read 1M 64k",
            "read 983040 128k",
        ] {
            let bad = Command::new("qemu-io")
                .args(["-f", "raw", "-r", "-c", read, &uri])
                .output()
                .unwrap();
            let out = String::from_utf8_lossy(&bad.stdout).to_string()
                + &String::from_utf8_lossy(&bad.stderr);
            assert!(
                out.contains("Input/output error"),
                "{compression}: `{read}` of the damaged cluster must fail with EIO: {out}"
            );
        }
        // The clusters around it still read right, on a new connection too.
        for (offset, length) in [
            ((1usize << 20) - (64 << 10), 64usize << 10),
            (1 << 20 | 64 << 10, 64 << 10),
        ] {
            let good = stdout(Command::new("qemu-io").args([
                "-f",
                "raw",
                "-r",
                "-c",
                &format!("read -v {offset} {length}"),
                &uri,
            ]));
            let dumped: Vec<u8> = good
                .lines()
                .filter_map(|l| l.split_once(":  ").map(|(_, rest)| rest))
                .flat_map(|rest| rest.split_whitespace().take(16))
                .map(|h| u8::from_str_radix(h, 16).unwrap())
                .collect();
            assert!(
                dumped == text[offset..offset + length],
                "{compression}: {length} bytes at {offset} read wrong"
            );
        }
        served.assert_logs("is damaged", Duration::from_secs(10));
        let log = served.log();
        assert!(
            log.contains(path),
            "{compression}: the log names the file:\n{log}"
        );
    }
}

#[test]
fn compressed_images_read_block_by_block_in_any_order_match_their_source() {
    if !require(TOOLS)
        || !require(&["nbdsh"])
        || !common::has_python_nbd()
        || !thinline_test_support::servers::require_nginx()
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Every 512 bytes differ from every other (their offset, then text), so a block served
    // from another unit, or from another place in its unit, reads wrong.
    let raw = d.join("source.raw");
    let mut source = Vec::with_capacity(2 << 20);
    for sector in 0..(2u64 << 20) / 512 {
        let mut s = format!("sector {sector:08} of a compressed template ").into_bytes();
        s.resize(512, b'.');
        source.extend_from_slice(&s);
    }
    std::fs::write(&raw, &source).unwrap();
    let mut exports = Vec::new();
    let mut names = Vec::new();
    for (name, args) in [
        (
            "zlib.qcow2",
            &["-c", "-O", "qcow2", "-o", "compression_type=zlib"][..],
        ),
        (
            "zstd.qcow2",
            &["-c", "-O", "qcow2", "-o", "compression_type=zstd"][..],
        ),
        (
            "stream.vmdk",
            &["-O", "vmdk", "-o", "subformat=streamOptimized"][..],
        ),
    ] {
        let img = d.join(name);
        let mut all = vec!["convert", "-q"];
        all.extend_from_slice(args);
        all.extend([raw.to_str().unwrap(), img.to_str().unwrap()]);
        qemu_img(d, &all);
        names.push(name);
    }
    // The same images local and over HTTP (their units read through the fetch engine).
    let nginx = thinline_test_support::servers::Nginx::start(d);
    let mut uris = Vec::new();
    for name in names {
        let export = name.replace('.', "-");
        exports.push(format!("{export}={}", d.join(name).display()));
        exports.push(format!("{export}-http={}", nginx.url(name)));
        uris.push(export.clone());
        uris.push(format!("{export}-http"));
    }
    let served = Served::unix(
        d,
        &[],
        &exports.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    // Sequential 4 KiB reads (a unit decoded first in part, then whole, then sliced),
    // the same shuffled, then reads of odd sizes and places that straddle units.
    let script = format!(
        r#"
import random
source = open({raw:?}, "rb").read()
def check(h, name, reads):
    for off, n in reads:
        got = h.pread(n, off)
        if got != source[off:off + n]:
            raise SystemExit(f"{{name}}: {{n}} bytes at {{off}} read wrong")
blocks = [(off, 4096) for off in range(0, len(source), 4096)]
shuffled = list(blocks)
random.Random(7).shuffle(shuffled)
odd = [(off, n) for off, n in ((random.Random(off).randrange(0, len(source) - 70000), random.Random(off + 1).randrange(1, 70000)) for off in range(200))]
for name, uri in {uris:?}:
    h = nbd.NBD()
    h.connect_uri(uri)
    check(h, name, blocks)
    check(h, name, shuffled)
    check(h, name, odd)
    check(h, name, blocks)
    h.shutdown()
print("ok")
"#,
        raw = raw.to_str().unwrap(),
        uris = uris
            .iter()
            .map(|name| (name.as_str(), served.uri(name)))
            .collect::<Vec<_>>(),
    );
    let out = common::nbdsh(&served.uri(""), &script);
    assert_eq!(out.trim(), "ok", "{}", served.log());
}

/// Runs `thinline ARGS` with a deadline; returns the exit code (`None`: killed by a
/// signal, which is a crash) and stderr.
fn run_bounded(
    args: &[&str],
    image: &Path,
    extra: &[&Path],
    deadline: Duration,
) -> (Option<i32>, String) {
    let mut child = spawn(
        Command::new(thinline()).args(args).arg(image).args(extra),
        Stdio::null(),
        Stdio::piped(),
    );
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return (status.code(), err);
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            panic!(
                "thinline {args:?} {} hung for {deadline:?}",
                image.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn damaged_images_give_errors_never_crashes_or_hangs() {
    if !require(TOOLS) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let images = fixtures(d);
    let out = d.join("out.raw");
    let mut rng = Rng(0x5eed_d00d);
    let mut outcomes = [0usize; 2];
    for img in images.iter().filter(|i| i.qemu_fmt != "raw") {
        let original = read_file(&img.path);
        for variant in 0..24 {
            let mut bytes = original.clone();
            match variant % 3 {
                // Truncated anywhere.
                0 => bytes.truncate(rng.below(bytes.len() as u64) as usize),
                // Bit flips in the first 64 KiB (headers, tables, descriptors).
                1 => {
                    for _ in 0..1 + rng.below(8) {
                        let at = rng.below(bytes.len().min(65536) as u64) as usize;
                        bytes[at] ^= 1 << rng.below(8);
                    }
                }
                // A 64-bit field anywhere in the first 4 KiB set to a huge or tiny value.
                _ => {
                    let at = (rng.below(bytes.len().min(4096) as u64 - 8) & !7) as usize;
                    let v = [u64::MAX, 1 << 62, 0x7fff_ffff, 0][rng.below(4) as usize];
                    bytes[at..at + 8].copy_from_slice(&v.to_be_bytes());
                }
            }
            let damaged = d.join(format!("damaged-{variant}-{}", img.name));
            std::fs::write(&damaged, &bytes).unwrap();
            for args in [
                &["image", "convert", "-O", "raw"][..],
                &["image", "check"][..],
            ] {
                let extra: &[&Path] = if args[1] == "convert" {
                    &[out.as_path()]
                } else {
                    &[]
                };
                let (code, err) = run_bounded(args, &damaged, extra, Duration::from_secs(120));
                assert!(
                    matches!(code, Some(0 | 1 | 3 | 4)),
                    "{args:?} on {} (variant {variant}) crashed ({code:?}): {err}",
                    img.name
                );
                assert!(!err.contains("panicked"), "{args:?} {}: {err}", img.name);
                if code == Some(1) {
                    // The error names a file of the chain.
                    assert!(
                        err.contains(".qcow2")
                            || err.contains(".vhd")
                            || err.contains(".vmdk")
                            || err.contains(".raw"),
                        "{args:?} {}: {err}",
                        img.name
                    );
                    outcomes[1] += 1;
                } else {
                    outcomes[0] += 1;
                }
            }
            std::fs::remove_file(&damaged).unwrap();
        }
    }
    eprintln!(
        "damaged images: {} opened and read, {} refused with an error",
        outcomes[0], outcomes[1]
    );
    assert!(outcomes[1] > 0, "some damage must be detected");
}

#[test]
fn tiny_metadata_cache_under_concurrent_clients_reads_like_qemu() {
    if !require(&["qemu-img", "qemu-io", "nbdcopy", "nbdinfo"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = |n: &str| d.join(n).to_str().unwrap().to_owned();
    // 512-byte clusters: every 32 KiB of guest space has its own L2 table, so a 4 KiB
    // cache (8 tables) is evicted constantly while four connections read in parallel.
    qemu_img(d, &["create", "-q", "-f", "raw", &p("base.raw"), "64M"]);
    qemu_io(d, "raw", &p("base.raw"), &["write -P 0x31 0 64M"]);
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512",
            "-b",
            "base.raw",
            "-F",
            "raw",
            &p("top.qcow2"),
            "64M",
        ],
    );
    let mut cmds = Vec::new();
    for i in 0..200u64 {
        cmds.push(format!(
            "write -P {} {} {}",
            1 + i % 250,
            i * 327_673 % (63 << 20),
            512 + i * 97 % 20_000
        ));
    }
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(d, "qcow2", &p("top.qcow2"), &refs);
    let served = Served::unix(d, &["--metadata-cache", "4K"], &[&p("top.qcow2")]);
    let ours = d.join("ours.raw");
    run(Command::new("nbdcopy")
        .args(["--connections=4", "--requests=16", "--request-size=65536"])
        .arg(served.uri(""))
        .arg(&ours));
    qemu_img(
        d,
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            &p("top.qcow2"),
            &p("theirs.raw"),
        ],
    );
    assert!(
        read_file(&ours) == read_file(&d.join("theirs.raw")),
        "bytes differ from qemu-img convert"
    );
    let bad = Command::new(thinline())
        .args(["image", "info", "--metadata-cache", "12Q", &p("top.qcow2")])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2), "a bad size is a usage error");
}
