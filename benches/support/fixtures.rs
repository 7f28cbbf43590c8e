//! Image fixtures of the criterion benchmarks that read images (`formats.rs`,
//! `read_latency.rs`): a raw base image of compressible text, and each format made
//! from it by `qemu-img convert`; plus the part of criterion's command line that says
//! which fixtures to make.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// One fixture: a bench id and the `qemu-img convert` arguments that make it.
pub struct Fixture {
    pub name: &'static str,
    /// `None`: the raw base image itself.
    pub convert: Option<&'static [&'static str]>,
}

impl Fixture {
    const fn new(name: &'static str, convert: Option<&'static [&'static str]>) -> Fixture {
        Fixture { name, convert }
    }
}

#[rustfmt::skip] // a table: one fixture a line
pub const FIXTURES: &[Fixture] = &[
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
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
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
pub fn warm_page_cache(path: &Path) -> io::Result<()> {
    let mut file = File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    while file.read(&mut buf)? != 0 {}
    Ok(())
}

/// Whether `qemu-img` runs; without it only the `raw` fixture can be made.
pub fn qemu_img_works() -> bool {
    Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A temporary directory (under `TMPDIR`, removed on drop) with the base image, where
/// fixtures are made. Messages start with the bench's name.
pub struct Workdir {
    bench: &'static str,
    dir: tempfile::TempDir,
    base: PathBuf,
}

impl Workdir {
    /// Writes a base image of `THINLINE_BENCH_MIB` MiB, else of `default_mib`.
    pub fn new(bench: &'static str, default_mib: u64) -> Result<Workdir, String> {
        let mib: u64 = match std::env::var("THINLINE_BENCH_MIB") {
            Ok(v) => match v.parse() {
                Ok(n) if n >= 1 => n,
                _ => return Err("THINLINE_BENCH_MIB must be a positive number of MiB".into()),
            },
            Err(_) => default_mib,
        };
        let dir = tempfile::Builder::new()
            .prefix(&format!("thinline-{bench}"))
            .tempdir()
            .map_err(|e| format!("cannot create a temporary directory: {e}"))?;
        let base = dir.path().join("base.raw");
        let started = Instant::now();
        write_base(&base, mib << 20).map_err(|e| format!("cannot write the base image: {e}"))?;
        eprintln!(
            "{bench}: wrote a {mib} MiB base image in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        Ok(Workdir { bench, dir, base })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The raw base image.
    pub fn base(&self) -> &Path {
        &self.base
    }

    /// Makes `fixture` from the base image with qemu-img (the base itself for `raw`);
    /// returns its path.
    pub fn make(&self, fixture: &Fixture) -> Result<PathBuf, String> {
        let Some(args) = fixture.convert else {
            return Ok(self.base.clone());
        };
        let out = self.path().join(fixture.name);
        let started = Instant::now();
        let status = Command::new("qemu-img")
            .args(["convert", "-q", "-f", "raw"])
            .args(args)
            .arg(&self.base)
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
            "{}: made {} in {:.1} s ({} MiB on disk)",
            self.bench,
            fixture.name,
            started.elapsed().as_secs_f64(),
            std::fs::metadata(&out).map_or(0, |m| m.len() >> 20)
        );
        Ok(out)
    }
}

/// What the command line asks for, as far as fixture building is concerned.
pub struct Args {
    /// `--list`: print the names, make nothing.
    pub list: bool,
    /// Test mode (`cargo test --benches`, or `--test`): run each bench once.
    pub test: bool,
    /// The filter, when it is plain text (a regex filter makes every fixture).
    filter: Option<String>,
    exact: bool,
}

impl Args {
    pub fn parse() -> Args {
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

    /// Whether the bench `id` (`group/name`) is selected.
    pub fn wants(&self, id: &str) -> bool {
        match &self.filter {
            None => true,
            Some(f) if self.exact => id == f,
            Some(f) => id.contains(f.as_str()),
        }
    }
}
