//! Criterion benchmarks of read latency for every kind of export Thinline serves, in
//! process, from the client's request encoder to its reply decoder.
//!
//! Each row `read_latency/<kind>/<runtime>` times one 4 KiB read at queue depth 1
//! through the whole server path: the request header encoded by a minimal hand-written
//! client (`support/nbd_client.rs`, shared with `request.rs`), `Server::serve_connection`
//! reading and validating it over `tokio::io::duplex`, the export, the reply encoder
//! and writer, and the client reading the whole reply. Consecutive reads are 7919
//! blocks apart (modulo the image's blocks): every block is read once per cycle, and no
//! two consecutive reads share a cluster, grain or table. The exports are opened the
//! way `thinline serve` opens them (`thinline_source::open::open_export`, default
//! options) and served by `Server` with its default configuration.
//!
//! | `<kind>` | The export |
//! |---|---|
//! | `raw` | the raw base image: `RawExport` (format detected, as `serve disk.raw`) |
//! | `qcow2`, `qcow2-zlib`, `qcow2-zstd`, `qcow2-extl2`, `vhd-dynamic`, `vmdk-sparse`, `vmdk-stream` | an `ImageExport` of the base made into that format by `qemu-img convert` (the table of `support/fixtures.rs`, shared with `formats.rs`); compressed clusters and grains (64 KiB) are decoded for every read: reads 7919 blocks apart never find theirs among the 16 units an export keeps decoded |
//! | `cor-hit` | a copy-on-read export whose cache holds the whole template (a hit): the raw base opened as a template, put behind its cache as `serve --cache-dir` does (`cache_dir::open_cached`, default `CorOptions`), hydrated before the run; every read is served from the cache file |
//! | `remote-mem-hit` | a remote template whose blocks are all in its fetch engine's memory (the "memory hits" of `thinline_source::fetch`): the raw base as a remote object read through `FetchEngine` → `RemoteStorage` → `ImageExport`, what `serve http://…` builds, with the default `RemoteConfig` (256 MiB of memory per object: a larger `THINLINE_BENCH_MIB` makes misses, and a warning); no request reaches the object during the run |
//!
//! The remote object is an in-process memory `RangeBackend` (a slice of the base image
//! per request): on a memory hit the engine never calls its backend, so HTTP, S3 or NBD
//! would measure the same; only the warm-up pass, which fills the memory, fetches from it.
//!
//! `<runtime>`: `current_thread` (client and server on one thread: the CPU cost of the
//! path) or `multi_thread` (2 workers run the server, the bench thread the client: adds
//! the cross-thread wake-ups a real socket has).
//!
//! Setup: a raw base image of compressible text (64 MiB; `THINLINE_BENCH_MIB` sets
//! another size; 16 MiB under `cargo test --benches`) in a temporary directory
//! (`TMPDIR`), each format made from it. Before a row is timed, one pass reads the
//! whole export in 1 MiB reads (straight from the export, no NBD) and compares every
//! byte with the base image: it fills the page cache, the metadata tables, the
//! copy-on-read cache's verification and the fetch engine's memory. After a
//! `cor-hit` or `remote-mem-hit` row the bench prints its hit and miss counters, and a
//! warning if anything missed while it was timed. Without qemu-img the format rows
//! are skipped with a message (`raw`, `cor-hit` and `remote-mem-hit` still run); a kind
//! that cannot be made, opened or reads wrong data is skipped with a message.
//!
//! Run: `cargo bench -p thinline --bench read_latency` (20 rows of about 4 s: about
//! 1.5 min), `-- --quick` for a fast pass (about 40 s), or a plain-text filter such as `-- qcow2-zstd` or
//! `-- current_thread` (only the kinds it selects are set up).

#[path = "support/fixtures.rs"]
mod fixtures;
#[path = "support/nbd_client.rs"]
mod nbd_client;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use thinline_cor::{CorExport, CorOptions};
use thinline_format::{Format, Image, OpenOptions};
use thinline_nbd::export::{Export, ReadChunk};
use thinline_nbd::image::ImageExport;
use thinline_nbd::proto::cmd;
use thinline_nbd::raw::IoEngine;
use thinline_source::fetch::FetchEngine;
use thinline_source::open::{OpenExportOptions, open_export};
use thinline_source::storage::RemoteStorage;
use thinline_source::{FetchError, FetchErrorKind, RangeBackend, RemoteConfig};
use tokio::runtime::Runtime;

use fixtures::{Args, FIXTURES, Fixture, Workdir, qemu_img_works, warm_page_cache};
use nbd_client::{Client, IO_SIZE, MakeRuntime, RUNTIMES};

const GROUP: &str = "read_latency";
const COR_HIT: &str = "cor-hit";
const REMOTE_MEM_HIT: &str = "remote-mem-hit";
/// Bytes per read of the warm-up pass.
const WARM_READ: u64 = 1 << 20;

/// A row: the export kind, and the runtime by name and maker.
type Row = (Kind, &'static str, MakeRuntime);

/// What a row serves.
#[derive(Clone, Copy)]
enum Kind {
    /// A local image made by qemu-img (or the raw base itself).
    Image(&'static Fixture),
    /// The copy-on-read export, its cache hydrated.
    CorHit,
    /// The remote template, every block in the fetch engine's memory.
    RemoteMemHit,
}

impl Kind {
    fn all() -> impl Iterator<Item = Kind> {
        FIXTURES
            .iter()
            .map(Kind::Image)
            .chain([Kind::CorHit, Kind::RemoteMemHit])
    }

    fn name(&self) -> &'static str {
        match self {
            Kind::Image(f) => f.name,
            Kind::CorHit => COR_HIT,
            Kind::RemoteMemHit => REMOTE_MEM_HIT,
        }
    }
}

/// Hit and miss counters of the exports that have them, read around a timed row.
enum Counters {
    None,
    Cor(CorExport),
    Remote(Arc<FetchEngine>),
}

impl Counters {
    /// (reads served wholly from the cache or memory, misses): a copy-on-read
    /// export's reads that needed the upstream, a fetch engine's requests to its object.
    fn read(&self) -> Option<(u64, u64)> {
        match self {
            Counters::None => None,
            Counters::Cor(cor) => {
                let s = cor.status();
                Some((s.hits, s.misses))
            }
            Counters::Remote(engine) => {
                let s = engine.stats();
                Some((
                    s.hits.load(Ordering::Relaxed),
                    s.requests.load(Ordering::Relaxed),
                ))
            }
        }
    }
}

/// A remote object held in this process's memory: the backend of the
/// `remote-mem-hit` rows, reached only while the warm-up pass fills the engine.
#[derive(Debug)]
struct MemoryObject {
    data: Bytes,
}

#[async_trait]
impl RangeBackend for MemoryObject {
    fn uri(&self) -> &str {
        "memory://template.raw"
    }

    fn size(&self) -> u64 {
        self.data.len() as u64
    }

    fn identity(&self) -> &str {
        "in-process memory"
    }

    async fn read(&self, offset: u64, length: u64) -> Result<Bytes, FetchError> {
        Ok(self.data.slice(offset as usize..(offset + length) as usize))
    }

    async fn open_related(&self, name: &str) -> Result<Arc<dyn RangeBackend>, FetchError> {
        Err(FetchError::new(
            FetchErrorKind::Permanent,
            "open",
            name,
            None,
            "a memory object has no related objects",
        ))
    }
}

/// What the rows share: the work directory, the base image's bytes (to check reads
/// against, and the remote object's content), the formats made, and the runtime
/// whose thread runs the remote storage's synchronous reads (format detection and
/// headers at open: `RemoteStorage` must not wait on the thread that drives a
/// current-thread runtime).
struct Setup {
    workdir: Workdir,
    base: Bytes,
    /// The path of each image kind made, by name.
    images: Vec<(&'static str, std::path::PathBuf)>,
    opener: Runtime,
}

impl Setup {
    /// The path of the image `fixture`, if it was made.
    fn image(&self, fixture: &Fixture) -> Option<&std::path::Path> {
        self.images
            .iter()
            .find(|(name, _)| *name == fixture.name)
            .map(|(_, path)| path.as_path())
    }

    /// Opens `kind` inside `rt` (`runtime` names it) and checks and warms it.
    fn open(
        &self,
        kind: &Kind,
        runtime: &str,
        rt: &Runtime,
    ) -> Result<(Arc<dyn Export>, Counters), String> {
        let (export, counters) = match kind {
            Kind::Image(fixture) => {
                let path = self.image(fixture).ok_or("not made")?;
                warm_page_cache(path).map_err(|e| format!("cannot read the image: {e}"))?;
                let _guard = rt.enter();
                (self.open_location(path, false, rt)?.0, Counters::None)
            }
            Kind::CorHit => {
                let dir = self.workdir.path().join(format!("cache-{runtime}"));
                thinline_cor::cache_dir::create_cache_dir(&dir).map_err(|e| e.to_string())?;
                let _guard = rt.enter();
                let (template, identity) = self.open_location(self.workdir.base(), true, rt)?;
                let identity = identity.ok_or("a template without an identity")?;
                let shown = self.workdir.base().display().to_string();
                let cor = thinline_cor::cache_dir::open_cached(
                    &dir,
                    template,
                    &shown,
                    identity,
                    &CorOptions::default(),
                )
                .map_err(|e| format!("cannot open the cache: {e}"))?;
                rt.block_on(cor.hydrate(0, cor.cache().size()))
                    .map_err(|e| format!("cannot hydrate the cache: {e}"))?;
                if !rt.block_on(cor.settle(Duration::from_secs(30))) {
                    return Err("the cache did not settle after hydration".into());
                }
                let export: Arc<dyn Export> = Arc::new(cor.clone());
                (export, Counters::Cor(cor))
            }
            Kind::RemoteMemHit => {
                let _guard = rt.enter();
                let config = Arc::new(RemoteConfig::default());
                let backend = Arc::new(MemoryObject {
                    data: self.base.clone(),
                });
                let engine = FetchEngine::new(backend, &config);
                let storage =
                    RemoteStorage::new(Arc::clone(&engine), self.opener.handle().clone(), config);
                let open = OpenOptions {
                    format: Some(Format::Raw),
                    ..OpenOptions::default()
                };
                let image = Image::open_storage(Arc::new(storage), &open)
                    .map_err(|e| format!("cannot open the remote template: {e}"))?;
                let export = ImageExport::from_image(image, IoEngine::default())
                    .map_err(|e| format!("cannot serve the remote template: {e}"))?;
                let export: Arc<dyn Export> = Arc::new(export);
                (export, Counters::Remote(engine))
            }
        };
        rt.block_on(check_all(&*export, &self.base))?;
        Ok((export, counters))
    }

    /// `open_export` of a local path with the defaults of `thinline serve`
    /// (`as_template`: as `serve --cache-dir` opens it); the export and its identity.
    fn open_location(
        &self,
        path: &std::path::Path,
        as_template: bool,
        rt: &Runtime,
    ) -> Result<(Arc<dyn Export>, Option<String>), String> {
        let source = thinline_source::parse(&path.display().to_string())
            .map_err(|e| format!("cannot parse the location: {e}"))?;
        let options = OpenExportOptions {
            as_template,
            ..OpenExportOptions::default()
        };
        let opened = open_export(&source, &options, None, rt.handle())
            .map_err(|e| format!("cannot open the image: {e}"))?;
        Ok((opened.export, opened.identity))
    }
}

/// Reads the whole export in [`WARM_READ`] pieces and compares every byte with `base`.
async fn check_all(export: &dyn Export, base: &[u8]) -> Result<(), String> {
    let size = export.size();
    if size != base.len() as u64 {
        return Err(format!(
            "the export is {size} bytes, the base image {}",
            base.len()
        ));
    }
    for offset in (0..size).step_by(WARM_READ as usize) {
        let length = WARM_READ.min(size - offset);
        let chunks = export
            .read(offset, length as u32)
            .await
            .map_err(|e| format!("read at {offset} failed: {e}"))?;
        let mut at = offset as usize;
        for chunk in chunks {
            let expected = base
                .get(at..at + chunk.len() as usize)
                .ok_or(format!("the read at {offset} returned too much"))?;
            let same = match &chunk {
                ReadChunk::Data(bytes) => bytes[..] == *expected,
                ReadChunk::Zero(_) => expected.iter().all(|&b| b == 0),
            };
            if !same {
                return Err(format!("the read at {offset} differs from the base image"));
            }
            at += chunk.len() as usize;
        }
        if at as u64 != offset + length {
            return Err(format!("the read at {offset} returned too little"));
        }
    }
    Ok(())
}

fn read_latency(c: &mut Criterion) {
    let args = Args::parse();
    let mut group = c.benchmark_group(GROUP);
    group
        .sample_size(50)
        .noise_threshold(0.05)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Bytes(u64::from(IO_SIZE)));
    let rows: Vec<Row> = Kind::all()
        .flat_map(|kind| RUNTIMES.map(|(runtime, make)| (kind, runtime, make)))
        .filter(|(kind, runtime, _)| {
            args.list || args.wants(&format!("{GROUP}/{}/{runtime}", kind.name()))
        })
        .collect();
    if args.list {
        for (kind, runtime, _) in &rows {
            group.bench_function(format!("{}/{runtime}", kind.name()), |b| b.iter(|| ()));
        }
        return;
    }
    if rows.is_empty() {
        return;
    }
    let Some(setup) = prepare(&rows, &args) else {
        return;
    };
    for (kind, runtime, make) in &rows {
        if let Kind::Image(fixture) = kind
            && setup.image(fixture).is_none()
        {
            continue; // not made: `prepare` said why
        }
        let id = format!("{}/{runtime}", kind.name());
        let rt = make();
        let (export, counters) = match setup.open(kind, runtime, &rt) {
            Ok(opened) => opened,
            Err(e) => {
                eprintln!("{GROUP}: skipping {id}: {e}");
                continue;
            }
        };
        let before = counters.read();
        let mut client = Client::new(rt, export);
        group.bench_function(&id, |b| {
            b.iter_custom(|iters| client.run(cmd::READ, iters));
        });
        if let (Some((hits0, misses0)), Some((hits, misses))) = (before, counters.read()) {
            let (hits, misses) = (hits - hits0, misses - misses0);
            eprintln!("{GROUP}: {id}: {hits} reads hit, {misses} missed while timed");
            if misses > 0 {
                eprintln!("{GROUP}: WARNING: {id} is not all hits");
            }
        }
    }
    group.finish();
}

/// Writes the base image and makes the image kinds `rows` ask for; `None` (with a
/// message) if the base cannot be written.
fn prepare(rows: &[Row], args: &Args) -> Option<Setup> {
    let workdir = match Workdir::new(GROUP, if args.test { 16 } else { 64 }) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("{GROUP}: {e}");
            return None;
        }
    };
    let base = match std::fs::read(workdir.base()) {
        Ok(b) => Bytes::from(b),
        Err(e) => {
            eprintln!("{GROUP}: cannot read the base image: {e}");
            return None;
        }
    };
    let mut fixtures: Vec<&'static Fixture> = Vec::new();
    for (kind, _, _) in rows {
        if let Kind::Image(f) = kind
            && !fixtures.iter().any(|g| g.name == f.name)
        {
            fixtures.push(f);
        }
    }
    if !qemu_img_works() {
        let made_by_qemu: Vec<&str> = fixtures
            .iter()
            .filter(|f| f.convert.is_some())
            .map(|f| f.name)
            .collect();
        if !made_by_qemu.is_empty() {
            eprintln!(
                "{GROUP}: qemu-img not found, so these images cannot be made; skipping {}",
                made_by_qemu.join(", ")
            );
        }
        fixtures.retain(|f| f.convert.is_none());
    }
    let mut images = Vec::new();
    for fixture in fixtures {
        match workdir.make(fixture) {
            Ok(path) => images.push((fixture.name, path)),
            Err(e) => eprintln!("{GROUP}: skipping {}: {e}", fixture.name),
        }
    }
    let opener = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    Some(Setup {
        workdir,
        base,
        images,
        opener,
    })
}

criterion_group!(benches, read_latency);
criterion_main!(benches);
