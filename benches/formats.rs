//! Criterion benchmarks of in-process image reads: 4 KiB random reads through
//! [`Image::read`] for every format Thinline serves, from a warm page cache.
//!
//! At start the bench writes one raw base image filled with compressible text (words
//! drawn from a 256-word vocabulary: zlib packs a 64 KiB cluster about 3×; random
//! bytes would make qemu store "compressed" clusters uncompressed), then makes each
//! fixture from it with `qemu-img convert` (the table and that code are in
//! `support/fixtures.rs`, shared with `read_latency.rs`):
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

#[path = "support/fixtures.rs"]
mod fixtures;

use std::fs::File;
use std::hint::black_box;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use thinline_format::{Image, OpenOptions};

use fixtures::{Args, FIXTURES, Fixture, Rng, Workdir, qemu_img_works, warm_page_cache};

const GROUP: &str = "read-4k";
const READ_SIZE: usize = 4096;
/// Offsets in the precomputed list (cycled through).
const OFFSETS: usize = 1 << 16;
/// Blocks compared with the base image before a fixture is benchmarked.
const CHECKED_BLOCKS: usize = 64;

/// Pseudo-random 4 KiB-aligned offsets below `size`.
fn offsets(size: u64, seed: u64) -> Vec<u64> {
    let blocks = size / READ_SIZE as u64;
    let mut rng = Rng(seed | 1);
    (0..OFFSETS)
        .map(|_| (rng.next() % blocks) * READ_SIZE as u64)
        .collect()
}

/// An opened fixture, ready to be read.
struct Opened {
    name: &'static str,
    image: Image,
    offsets: Vec<u64>,
}

/// Makes (with qemu-img), opens, checks and warms one fixture.
fn prepare(fixture: &Fixture, workdir: &Workdir, seed: u64) -> Result<Opened, String> {
    let path = workdir.make(fixture)?;
    let base = workdir.base();
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
    let workdir = match Workdir::new("formats", if args.test { 16 } else { 256 }) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("formats: {e}");
            return;
        }
    };

    let mut opened = Vec::new();
    for (i, fixture) in wanted.iter().enumerate() {
        match prepare(fixture, &workdir, 0x9e37_79b9 + i as u64) {
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
