//! Image fixtures made by qemu-img and qemu-io at test time, so that the images under
//! test are qemu's own (the reference the formats are checked against), shared by the
//! format, image and remote tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::run;

/// `qemu-img ARGS` in `dir`, panicking with its output if it fails.
pub fn qemu_img(dir: &Path, args: &[&str]) -> Output {
    run(Command::new("qemu-img").args(args).current_dir(dir))
}

/// `qemu-io -f FMT -c CMD… PATH` in `dir` (each command a separate `-c`).
pub fn qemu_io(dir: &Path, fmt: &str, path: &str, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", fmt]).current_dir(dir);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(path);
    run(&mut c);
}

/// `qemu-img convert -O FMT -o OPTIONS FROM TO` in `dir`: `from` copied into `to` in
/// another format.
pub fn qemu_convert(dir: &Path, from: &str, fmt: &str, options: &str, to: &str) {
    let p = |n: &str| dir.join(n).to_str().unwrap().to_owned();
    qemu_img(
        dir,
        &["convert", "-O", fmt, "-o", options, &p(from), &p(to)],
    );
}

/// `qemu-img create -q -f qcow2 OPTIONS… -b BACKING -F BACKING_FMT NAME 64M` in `dir`: a
/// 64 MiB qcow2 overlay named `name` whose backing file is `backing`.
pub fn qcow2_overlay(dir: &Path, options: &[&str], backing: &str, backing_fmt: &str, name: &str) {
    let path = dir.join(name).to_str().unwrap().to_owned();
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    args.extend_from_slice(options);
    args.extend(["-b", backing, "-F", backing_fmt, &path, "64M"]);
    qemu_img(dir, &args);
}

/// An 8 MiB qcow2 image `name` in `dir` with lazy refcounts, left dirty: qemu-io writes
/// 64 KiB into it and is killed by its `abort` command (SIGABRT) with the dirty bit
/// still set and the refcounts stale.
pub fn dirty_qcow2(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    let p = path.to_str().unwrap();
    let mut args = vec!["create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on"];
    args.extend([p, "8M"]);
    qemu_img(dir, &args);
    let _ = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x5a 0 64k", "-c", "abort", p])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let header = std::fs::read(&path).unwrap();
    assert_eq!(header[79] & 1, 1, "the dirty bit of {p} is set");
    path
}

/// One fixture: a path and its qemu format name.
#[derive(Debug)]
pub struct Img {
    pub name: String,
    pub path: PathBuf,
    pub qemu_fmt: &'static str,
}

/// Fixtures across formats and chains, in `dir`.
pub fn fixtures(dir: &Path) -> Vec<Img> {
    let p = |n: &str| dir.join(n).to_str().unwrap().to_owned();
    qemu_img(dir, &["create", "-q", "-f", "raw", &p("base.raw"), "64M"]);
    qemu_io(
        dir,
        "raw",
        &p("base.raw"),
        &[
            "write -P 0xaa 0 1M",
            "write -P 0xbb 10M 3M",
            "write -z 20M 1M",
            "write -P 0xcd 33554943 70001",
        ],
    );
    // qcow2 overlay over raw: data, zero (both kinds), discard, odd partial writes.
    qcow2_overlay(dir, &[], "base.raw", "raw", "ovl.qcow2");
    qemu_io(
        dir,
        "qcow2",
        &p("ovl.qcow2"),
        &[
            "write -P 0x11 0 64k",
            "write -z 64k 64k",
            "write -z -u 128k 64k",
            "discard 10M 64k",
            "write -P 0x22 12345 3000",
            "write -P 0x33 40M 1M",
        ],
    );
    // Compressed qcow2 and a VHD, a VMDK sparse and a streamOptimized VMDK of the base.
    qemu_img(
        dir,
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            &p("base.raw"),
            &p("comp.qcow2"),
        ],
    );
    qemu_convert(
        dir,
        "base.raw",
        "vpc",
        "subformat=dynamic,force_size=on",
        "dyn.vhd",
    );
    qemu_convert(
        dir,
        "base.raw",
        "vmdk",
        "subformat=monolithicSparse",
        "sparse.vmdk",
    );
    qemu_convert(
        dir,
        "base.raw",
        "vmdk",
        "subformat=streamOptimized",
        "stream.vmdk",
    );
    // A chain across formats: qcow2 over VHD over raw, and qcow2 over VMDK.
    qcow2_overlay(dir, &[], "dyn.vhd", "vpc", "over-vhd.qcow2");
    qemu_io(
        dir,
        "qcow2",
        &p("over-vhd.qcow2"),
        &["write -P 0x44 1M 2M", "write -z 11M 128k"],
    );
    qcow2_overlay(dir, &[], "sparse.vmdk", "vmdk", "over-vmdk.qcow2");
    qemu_io(
        dir,
        "qcow2",
        &p("over-vmdk.qcow2"),
        &["write -P 0x55 30M 100k"],
    );
    // Extended L2 over a backing file, and a backing file shorter than its overlay.
    qcow2_overlay(
        dir,
        &["-o", "extended_l2=on,cluster_size=128k"],
        "base.raw",
        "raw",
        "el2.qcow2",
    );
    qemu_io(
        dir,
        "qcow2",
        &p("el2.qcow2"),
        &[
            "write -P 0xcc 4k 4k",
            "write -z 1M 64k",
            "write -z -u 10M 128k",
        ],
    );
    qemu_img(dir, &["create", "-q", "-f", "raw", &p("small.raw"), "10M"]);
    qemu_io(dir, "raw", &p("small.raw"), &["write -P 0x66 0 10M"]);
    qcow2_overlay(dir, &[], "small.raw", "raw", "short.qcow2");
    qemu_io(
        dir,
        "qcow2",
        &p("short.qcow2"),
        &["write -P 0x77 5M 64k", "write -P 0x78 30M 64k"],
    );
    let img = |name: &'static str, qemu_fmt: &'static str| Img {
        name: name.to_owned(),
        path: dir.join(name),
        qemu_fmt,
    };
    vec![
        img("base.raw", "raw"),
        img("ovl.qcow2", "qcow2"),
        img("comp.qcow2", "qcow2"),
        img("dyn.vhd", "vpc"),
        img("sparse.vmdk", "vmdk"),
        img("stream.vmdk", "vmdk"),
        img("over-vhd.qcow2", "qcow2"),
        img("over-vmdk.qcow2", "qcow2"),
        img("el2.qcow2", "qcow2"),
        img("short.qcow2", "qcow2"),
    ]
}
