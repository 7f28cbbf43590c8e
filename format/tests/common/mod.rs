//! Shared helpers for the format tests: fixtures made with qemu-img/qemu-io at test
//! time, and comparisons of what Thinline reads and maps against what qemu says. The
//! tool checks and qemu runners are `thinline-test-support`'s.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use thinline_format::{Fetch, Image, OpenOptions};
pub use thinline_test_support::qemu::{qemu_img, qemu_io};

/// True if `tool` is on PATH. Outside CI a missing tool skips the test (with a
/// message); in CI (`CI=true`) it fails it, because the test command installs it.
pub fn have(tool: &str) -> bool {
    thinline_test_support::require(&[tool])
}

/// Runs `program ARGS` in `cwd`, panicking with its output if it fails.
pub fn run(program: &str, args: &[&str], cwd: &Path) -> Output {
    thinline_test_support::run(Command::new(program).args(args).current_dir(cwd))
}

/// `qemu-img create -f FMT -o OPTIONS PATH SIZE` in `dir`.
pub fn qemu_create(dir: &Path, fmt: &str, options: &str, path: &str, size: &str) {
    qemu_img(dir, &["create", "-f", fmt, "-o", options, path, size]);
}

/// What qemu reads: `qemu-img convert -f FMT -O raw`.
pub fn qemu_raw(path: &Path, fmt: &str) -> Vec<u8> {
    let out = tempfile::NamedTempFile::new().unwrap();
    let out_path = out.path().to_str().unwrap().to_owned();
    let dir = path.parent().unwrap();
    qemu_img(
        dir,
        &["convert", "-f", fmt, "-O", "raw", s(path), &out_path],
    );
    std::fs::read(&out_path).unwrap()
}

/// Opens `path` with default options (format detected unless given).
pub fn open(path: &Path, format: Option<thinline_format::Format>) -> Image {
    let options = OpenOptions {
        format,
        ..OpenOptions::default()
    };
    Image::open(path, &options).unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// Every byte of the image, read in `chunk`-sized pieces at chunk-aligned offsets
/// shifted by `skew` (so reads straddle cluster boundaries).
pub fn read_all(image: &Image, chunk: usize, skew: usize) -> Vec<u8> {
    let size = image.size() as usize;
    let mut data = vec![0; size];
    let mut pos = 0;
    let mut first = skew.min(size);
    if first == 0 {
        first = chunk.min(size);
    }
    while pos < size {
        let len = first.min(size - pos);
        image
            .read(pos as u64, &mut data[pos..pos + len])
            .unwrap_or_else(|e| panic!("read {len} at {pos}: {e}"));
        pos += len;
        first = chunk;
    }
    data
}

/// Panics naming the first differing offset.
pub fn assert_same_bytes(what: &str, ours: &[u8], theirs: &[u8]) {
    assert_eq!(ours.len(), theirs.len(), "{what}: sizes differ");
    if let Some(i) = ours.iter().zip(theirs).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i}: thinline {:#04x}, qemu {:#04x}",
            ours[i], theirs[i]
        );
    }
}

/// The image read through Thinline equals `qemu-img convert -O raw`, with reads of
/// several sizes and alignments.
pub fn assert_reads_like_qemu(
    path: &Path,
    qemu_fmt: &str,
    format: Option<thinline_format::Format>,
) {
    let expected = qemu_raw(path, qemu_fmt);
    let image = open(path, format);
    assert_reads_as(&image, &path.display().to_string(), &expected, &CHUNKINGS);
}

/// Read sizes and first-read skews ([`read_all`]) that straddle cluster and block
/// boundaries in different ways.
pub const CHUNKINGS: [(usize, usize); 3] = [(1 << 20, 0), (4096 + 512, 777), (65536 * 3, 511)];

/// `image` has the size of `expected` and reads as `expected` in each of `chunkings`
/// (chunk, skew); `what` names it in failures.
pub fn assert_reads_as(image: &Image, what: &str, expected: &[u8], chunkings: &[(usize, usize)]) {
    assert_eq!(
        image.size() as usize,
        expected.len(),
        "{what}: virtual size"
    );
    for &(chunk, skew) in chunkings {
        assert_same_bytes(
            &format!("{what} (chunk {chunk}, skew {skew})"),
            &read_all(image, chunk, skew),
            expected,
        );
    }
}

/// A run of bytes classified the way `qemu-img map --output=json` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapClass {
    pub present: bool,
    pub zero: bool,
    pub data: bool,
    /// 0 = top image (qemu's numbering), only meaningful when present.
    pub depth: Option<u32>,
}

fn merge(runs: Vec<(u64, u64, MapClass)>) -> Vec<(u64, u64, MapClass)> {
    let mut out: Vec<(u64, u64, MapClass)> = Vec::new();
    for (start, len, class) in runs {
        if len == 0 {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.2 == class && last.0 + last.1 == start => last.1 += len,
            _ => out.push((start, len, class)),
        }
    }
    out
}

/// `qemu-img map --output=json` as classified runs.
pub fn qemu_map(path: &Path, qemu_fmt: &str) -> Vec<(u64, u64, MapClass)> {
    let out = qemu_img(
        path.parent().unwrap(),
        &["map", "--output=json", "-f", qemu_fmt, s(path)],
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let runs = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let present = e["present"].as_bool().unwrap();
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                MapClass {
                    present,
                    zero: e["zero"].as_bool().unwrap(),
                    data: e["data"].as_bool().unwrap(),
                    depth: present.then(|| e["depth"].as_u64().unwrap() as u32),
                },
            )
        })
        .collect();
    merge(runs)
}

/// Thinline's block status as classified runs.
pub fn our_map(image: &Image) -> Vec<(u64, u64, MapClass)> {
    let mut runs = Vec::new();
    let mut pos = 0;
    while pos < image.size() {
        let allocation = image
            .allocation(pos, image.size() - pos, Fetch::Allowed, 4096)
            .unwrap();
        for a in allocation {
            runs.push((
                pos,
                a.length,
                MapClass {
                    present: a.depth > 0,
                    zero: a.zero,
                    data: !a.hole,
                    depth: (a.depth > 0).then(|| a.depth - 1),
                },
            ));
            pos += a.length;
        }
    }
    merge(runs)
}

/// Thinline's allocation map agrees with `qemu-img map` (present, zero, data, depth).
pub fn assert_map_like_qemu(path: &Path, qemu_fmt: &str, format: Option<thinline_format::Format>) {
    let image = open(path, format);
    let ours = our_map(&image);
    let theirs = qemu_map(path, qemu_fmt);
    if ours != theirs {
        let i = ours
            .iter()
            .zip(&theirs)
            .position(|(a, b)| a != b)
            .unwrap_or(ours.len().min(theirs.len()));
        panic!(
            "{}: map differs from qemu-img map at run {i}:\n thinline {:?}\n qemu     {:?}\nfull thinline: {ours:?}\nfull qemu: {theirs:?}",
            path.display(),
            ours.get(i),
            theirs.get(i)
        );
    }
}

/// A scratch directory for fixtures.
pub fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("thinline-fmt-")
        .tempdir()
        .unwrap()
}

/// Runs `test` in a fresh scratch directory, removed afterwards.
pub fn in_scratch(test: impl FnOnce(&Path)) {
    let dir = scratch();
    test(dir.path());
}

/// Runs `test` in a fresh scratch directory if every tool in `tools` is on PATH; see
/// [`have`] for what a missing tool does.
pub fn with_tools(tools: &[&str], test: impl FnOnce(&Path)) {
    if tools.iter().all(|tool| have(tool)) {
        in_scratch(test);
    }
}

/// The path as a string (the tests' paths are UTF-8).
pub fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// `dir/name` as a string.
pub fn p(dir: &Path, name: &str) -> String {
    dir.join(name).to_str().unwrap().to_owned()
}

/// `dir/name` as a path.
pub fn pb(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

/// The base image used by most fixtures: 64 MiB raw with data, a written-zero range
/// and holes (the notes' recipe), plus a partial write at an odd offset.
pub fn make_base_raw(dir: &Path) -> PathBuf {
    let base = pb(dir, "base.raw");
    qemu_img(dir, &["create", "-f", "raw", s(&base), "64M"]);
    qemu_io(
        dir,
        "raw",
        s(&base),
        &[
            "write -P 0xaa 0 1M",
            "write -P 0xbb 10M 3M",
            "write -z 20M 1M",
            "write -P 0xcd 33554943 70001",
        ],
    );
    base
}
