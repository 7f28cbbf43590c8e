//! Criterion benchmarks of in-process image reads: 4 KiB random reads through
//! [`Image::read`] for every format Thinline serves, from a warm page cache.
//!
//! At start the bench writes one raw base image filled with compressible text (words
//! drawn from a 256-word vocabulary: zlib packs a 64 KiB cluster about 3×; random
//! bytes would make qemu store "compressed" clusters uncompressed), then makes each
//! fixture from it with `qemu-img convert`:
//!
//! | Bench id | qemu-img convert arguments |
//! |---|---|
//! | `read-4k/raw` | (the base image itself: the baseline) |
//! | `read-4k/qcow2` | `-O qcow2` |
//! | `read-4k/qcow2-zlib` | `-O qcow2 -c -o compression_type=zlib` |
//! | `read-4k/qcow2-zstd` | `-O qcow2 -c -o compression_type=zstd` |
//! | `read-4k/qcow2-extl2` | `-O qcow2 -o extended_l2=on,cluster_size=128k` |
//! | `read-4k/vhd-dynamic` | `-O vpc -o subformat=dynamic,force_size=on` |
//! | `read-4k/vmdk-sparse` | `-O vmdk -o subformat=monolithicSparse` |
//! | `read-4k/vmdk-stream` | `-O vmdk -o subformat=streamOptimized` |
//!
//! Each fixture is opened with [`Image::open`], checked against the base image on a
//! few blocks, its file read once (warm page cache) and its metadata tables loaded
//! (one read per MiB). Each iteration then reads 4 KiB at the next offset of a
//! precomputed list of pseudo-random 4 KiB-aligned offsets, so the RNG is not
//! measured. Compressed formats decompress a whole cluster or grain (64 KiB) per read,
//! as qemu does.
//!
//! A fixture that qemu-img cannot make, or that Thinline cannot open or reads wrongly,
//! is reported on stderr and skipped; without qemu-img the bench measures nothing.
//! Fixtures go to a temporary directory (`TMPDIR`), removed at the end. A plain-text
//! filter builds only the fixtures it selects (`-- vmdk` makes just the two VMDKs).
//!
//! Environment: `THINLINE_BENCH_MIB` sets the base image size in MiB (default 256;
//! 16 under `cargo test`).
//!
//! Run: `cargo bench -p thinline-format --bench formats` (about 2 minutes, a third of
//! it making fixtures), `-- --quick` for a fast pass, or a filter such as
//! `-- read-4k/qcow2-zstd`.

use std::fs::File;
use std::hint::black_box;
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use thinline_format::{Image, OpenOptions};

const GROUP: &str = "read-4k";
const READ_SIZE: usize = 4096;
/// Offsets in the precomputed list (cycled through).
const OFFSETS: usize = 1 << 16;
/// Blocks compared with the base image before a fixture is benchmarked.
const CHECKED_BLOCKS: usize = 64;

/// One fixture: a bench id and the `qemu-img convert` arguments that make it.
struct Fixture {
    name: &'static str,
    /// `None`: the raw base image itself.
    convert: Option<&'static [&'static str]>,
}

impl Fixture {
    const fn new(name: &'static str, convert: Option<&'static [&'static str]>) -> Fixture {
        Fixture { name, convert }
    }
}

#[rustfmt::skip] // a table: one fixture a line
const FIXTURES: &[Fixture] = &[
    Fixture::new("raw", None),
    Fixture::new("qcow2", Some(&["-O", "qcow2"])),
    Fixture::new("qcow2-zlib", Some(&["-O", "qcow2", "-c", "-o", "compression_type=zlib"])),
    Fixture::new("qcow2-zstd", Some(&["-O", "qcow2", "-c", "-o", "compression_type=zstd"])),
    Fixture::new("qcow2-extl2", Some(&["-O", "qcow2", "-o", "extended_l2=on,cluster_size=128k"])),
    // force_size: keep the exact size instead of rounding it up to a CHS geometry.
    Fixture::new("vhd-dynamic", Some(&["-O", "vpc", "-o", "subformat=dynamic,force_size=on"])),
    Fixture::new("vmdk-sparse", Some(&["-O", "vmdk", "-o", "subformat=monolithicSparse"])),
    Fixture::new("vmdk-stream", Some(&["-O", "vmdk", "-o", "subformat=streamOptimized"])),
];

/// xorshift64*: deterministic, fast, good enough for data and offsets.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Writes `size` bytes of text: words of 2–9 letters from a 256-word vocabulary,
/// each followed by a space (about 3× compressible per 64 KiB, like real text).
fn write_base(path: &Path, size: u64) -> io::Result<()> {
    let mut rng = Rng(0x7468_696e_6c69_6e65);
    let vocabulary: Vec<Vec<u8>> = (0..256)
        .map(|_| {
            let len = 2 + (rng.next() % 8) as usize;
            let mut word: Vec<u8> = (0..len).map(|_| b'a' + (rng.next() % 26) as u8).collect();
            word.push(b' ');
            word
        })
        .collect();
    let mut out = BufWriter::with_capacity(1 << 20, File::create(path)?);
    let mut chunk = Vec::with_capacity((1 << 20) + 16);
    let mut written = 0u64;
    while written < size {
        chunk.clear();
        while chunk.len() < 1 << 20 {
            for byte in rng.next().to_le_bytes() {
                chunk.extend_from_slice(&vocabulary[usize::from(byte)]);
            }
        }
        let n = (size - written).min(1 << 20) as usize;
        out.write_all(&chunk[..n])?;
        written += n as u64;
    }
    out.into_inner().map_err(|e| e.into_error())?.sync_all()
}

/// Reads the whole file so its pages are in the page cache.
fn warm_page_cache(path: &Path) -> io::Result<()> {
    let mut file = File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    while file.read(&mut buf)? != 0 {}
    Ok(())
}

/// Pseudo-random 4 KiB-aligned offsets below `size`.
fn offsets(size: u64, seed: u64) -> Vec<u64> {
    let blocks = size / READ_SIZE as u64;
    let mut rng = Rng(seed | 1);
    (0..OFFSETS)
        .map(|_| (rng.next() % blocks) * READ_SIZE as u64)
        .collect()
}

/// What the command line asks for, as far as fixture building is concerned.
struct Args {
    /// `--list`: print the names, make nothing.
    list: bool,
    /// Test mode (`cargo test --benches`, or `--test`): run each bench once.
    test: bool,
    /// The filter, when it is plain text (a regex filter makes every fixture).
    filter: Option<String>,
    exact: bool,
}

impl Args {
    fn parse() -> Args {
        // Criterion options that take a value; their value is not the filter.
        const WITH_VALUE: &[&str] = &[
            "-c",
            "--color",
            "-s",
            "--save-baseline",
            "-b",
            "--baseline",
            "--baseline-lenient",
            "--format",
            "--profile-time",
            "--load-baseline",
            "--sample-size",
            "--warm-up-time",
            "--measurement-time",
            "--nresamples",
            "--noise-threshold",
            "--confidence-level",
            "--significance-level",
            "--plotting-backend",
            "--output-format",
        ];
        let mut args = Args {
            list: false,
            test: false,
            filter: None,
            exact: false,
        };
        let mut bench = false;
        let mut all = std::env::args().skip(1);
        while let Some(arg) = all.next() {
            match arg.as_str() {
                "--list" => args.list = true,
                "--test" => args.test = true,
                "--bench" => bench = true,
                "--exact" => args.exact = true,
                a if WITH_VALUE.contains(&a) => {
                    all.next();
                }
                a if a.starts_with('-') => {}
                a => args.filter = Some(a.to_owned()),
            }
        }
        args.test |= !bench;
        if let Some(f) = &args.filter
            && !args.exact
            && f.contains(|c: char| r"\.^$|?*+()[]{}".contains(c))
        {
            args.filter = None;
        }
        args
    }

    fn wants(&self, id: &str) -> bool {
        match &self.filter {
            None => true,
            Some(f) if self.exact => id == f,
            Some(f) => id.contains(f.as_str()),
        }
    }
}

/// An opened fixture, ready to be read.
struct Opened {
    name: &'static str,
    image: Image,
    offsets: Vec<u64>,
}

/// Makes (with qemu-img), opens, checks and warms one fixture.
fn prepare(fixture: &Fixture, base: &Path, dir: &Path, seed: u64) -> Result<Opened, String> {
    let path: PathBuf = match fixture.convert {
        None => base.to_owned(),
        Some(args) => {
            let out = dir.join(fixture.name);
            let started = Instant::now();
            let status = Command::new("qemu-img")
                .args(["convert", "-q", "-f", "raw"])
                .args(args)
                .arg(base)
                .arg(&out)
                .status()
                .map_err(|e| format!("cannot run qemu-img: {e}"))?;
            if !status.success() {
                return Err(format!(
                    "qemu-img convert {} failed: {status}",
                    args.join(" ")
                ));
            }
            eprintln!(
                "formats: made {} in {:.1} s ({} MiB on disk)",
                fixture.name,
                started.elapsed().as_secs_f64(),
                std::fs::metadata(&out).map_or(0, |m| m.len() >> 20)
            );
            out
        }
    };
    let image = Image::open(&path, &OpenOptions::default())
        .map_err(|e| format!("Image::open failed: {e}"))?;
    let base_file = File::open(base).map_err(|e| format!("cannot open the base image: {e}"))?;
    let base_size = base_file.metadata().map_err(|e| e.to_string())?.len();
    if image.size() != base_size {
        return Err(format!(
            "virtual size {} differs from the base image's {base_size}",
            image.size()
        ));
    }
    warm_page_cache(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    // Load the metadata tables (the steady state of a server): one read per MiB.
    let mut buf = vec![0u8; READ_SIZE];
    for offset in (0..image.size()).step_by(1 << 20) {
        image
            .read(offset, &mut buf)
            .map_err(|e| format!("read at {offset} failed: {e}"))?;
    }
    let offsets = offsets(image.size(), seed);
    let mut expected = vec![0u8; READ_SIZE];
    for &offset in offsets.iter().take(CHECKED_BLOCKS) {
        image
            .read(offset, &mut buf)
            .map_err(|e| format!("read at {offset} failed: {e}"))?;
        base_file
            .read_exact_at(&mut expected, offset)
            .map_err(|e| format!("cannot read the base image: {e}"))?;
        if buf != expected {
            return Err(format!("the 4 KiB at {offset} differ from the base image"));
        }
    }
    Ok(Opened {
        name: fixture.name,
        image,
        offsets,
    })
}

fn qemu_img_works() -> bool {
    Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn bench_formats(c: &mut Criterion) {
    let args = Args::parse();
    let mut group = c.benchmark_group(GROUP);
    group.throughput(Throughput::Bytes(READ_SIZE as u64));
    if args.list {
        for fixture in FIXTURES {
            group.bench_function(fixture.name, |b| b.iter(|| ()));
        }
        return;
    }
    let wanted: Vec<&Fixture> = FIXTURES
        .iter()
        .filter(|f| args.wants(&format!("{GROUP}/{}", f.name)))
        .collect();
    if wanted.is_empty() {
        return;
    }
    if !qemu_img_works() {
        eprintln!("formats: qemu-img not found; it makes the fixtures, so nothing is benchmarked");
        return;
    }
    let mib: u64 = match std::env::var("THINLINE_BENCH_MIB") {
        Ok(v) => match v.parse() {
            Ok(n) if n >= 1 => n,
            _ => {
                eprintln!("formats: THINLINE_BENCH_MIB must be a positive number of MiB");
                return;
            }
        },
        Err(_) if args.test => 16,
        Err(_) => 256,
    };
    let dir = match tempfile::Builder::new()
        .prefix("thinline-formats")
        .tempdir()
    {
        Ok(d) => d,
        Err(e) => {
            eprintln!("formats: cannot create a temporary directory: {e}");
            return;
        }
    };
    let base = dir.path().join("base.raw");
    let started = Instant::now();
    if let Err(e) = write_base(&base, mib << 20) {
        eprintln!("formats: cannot write the base image: {e}");
        return;
    }
    eprintln!(
        "formats: wrote a {mib} MiB base image in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let mut opened = Vec::new();
    for (i, fixture) in wanted.iter().enumerate() {
        match prepare(fixture, &base, dir.path(), 0x9e37_79b9 + i as u64) {
            Ok(o) => opened.push(o),
            Err(e) => eprintln!("formats: skipping {}: {e}", fixture.name),
        }
    }
    for o in &opened {
        // Warm again: making later fixtures may have pushed these pages out.
        for layer in o.image.layers() {
            for storage in layer.files() {
                let _ = warm_page_cache(Path::new(storage.name()));
            }
        }
        let mut buf = vec![0u8; READ_SIZE];
        let mut next = 0usize;
        group.bench_function(o.name, |b| {
            b.iter(|| {
                let offset = o.offsets[next];
                next = (next + 1) % o.offsets.len();
                o.image.read(black_box(offset), &mut buf).expect("read");
                black_box(&buf);
            });
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30);
    targets = bench_formats
}
criterion_main!(benches);
