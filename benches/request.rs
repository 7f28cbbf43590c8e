//! Criterion benchmarks of in-process request handling.
//!
//! - `roundtrip/*`: one 4 KiB request at queue depth 1 through the whole server path:
//!   request header encoding (client side), `Server::serve_connection` reading and
//!   validating it, the export, the reply encoder and writer, and the client reading
//!   the reply, over `tokio::io::duplex`. The handshake (fixed newstyle,
//!   `NBD_OPT_STRUCTURED_REPLY`, `NBD_OPT_GO`) is done once in setup by a minimal
//!   hand-written client (`support/nbd_client.rs`, shared with `read_latency.rs`,
//!   which has a row per export kind). Variants: memory export or `RawExport` on a temporary file;
//!   a current-thread runtime (client and server on one thread: the CPU cost of the
//!   path) or a 2-worker multi-thread runtime (server on the workers, client on the
//!   bench thread: adds the cross-thread wake-ups a real socket has).
//! - `decode/*`: the sans-IO pieces on their own: `proto::decode_request`,
//!   `request::check` and both together.
//!
//! Run: `cargo bench -p thinline-nbd --bench request` (add `-- --quick` for a fast pass,
//! or a filter such as `-- roundtrip/mem`).

#[path = "support/nbd_client.rs"]
mod nbd_client;

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use thinline_nbd::export::{
    BlockSizes, Capabilities, Export, Extent, ReadChunk, StatusQuery, ZeroFlags,
};
use thinline_nbd::proto::{self, ReplyMode, RequestHeader, cmd};
use thinline_nbd::raw::{RawExport, RawOptions};
use thinline_nbd::request::{self, SessionLimits, Verdict};

use nbd_client::{Client, IO_SIZE, RUNTIMES, pattern};

const EXPORT_SIZE: usize = 16 << 20;

/// A memory export: the baseline with no storage cost at all.
#[derive(Debug)]
struct MemExport {
    data: Vec<u8>,
}

#[async_trait]
impl Export for MemExport {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            read_only: false,
            flush: true,
            fua: true,
            trim: false,
            write_zeroes: false,
            fast_zero: false,
            cache: false,
            multi_conn: false,
            rotational: false,
        }
    }

    async fn read(&self, offset: u64, length: u32) -> thinline_nbd::Result<Vec<ReadChunk>> {
        let start = offset as usize;
        Ok(vec![ReadChunk::Data(Bytes::copy_from_slice(
            &self.data[start..start + length as usize],
        ))])
    }

    async fn write(&self, _offset: u64, _data: Bytes, _fua: bool) -> thinline_nbd::Result<()> {
        // Accepted and dropped: the write benchmark measures the request path.
        Ok(())
    }

    async fn flush(&self) -> thinline_nbd::Result<()> {
        Ok(())
    }

    async fn trim(&self, _offset: u64, _length: u64, _fua: bool) -> thinline_nbd::Result<()> {
        Ok(())
    }

    async fn write_zeroes(&self, _: u64, _: u64, _: ZeroFlags) -> thinline_nbd::Result<()> {
        Ok(())
    }

    async fn cache(&self, _offset: u64, _length: u64) -> thinline_nbd::Result<()> {
        Ok(())
    }

    async fn block_status(&self, query: StatusQuery) -> thinline_nbd::Result<Vec<Extent>> {
        let StatusQuery {
            context: _,
            offset: _,
            length,
            max_extents: _,
        } = query;
        Ok(vec![Extent { length, flags: 0 }])
    }
}

/// The export of a `roundtrip` row: the memory export, or a `RawExport` of a temporary
/// file (returned with its directory, which must outlive it). Call inside the runtime:
/// exports may register with it when they are opened.
fn export(raw_file: bool) -> (Arc<dyn Export>, Option<tempfile::TempDir>) {
    if !raw_file {
        let export = MemExport {
            data: pattern(EXPORT_SIZE),
        };
        return (Arc::new(export), None);
    }
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("disk.img");
    std::fs::write(&path, pattern(EXPORT_SIZE)).expect("write the image");
    let export = RawExport::open(&path, &RawOptions::default()).expect("open the image");
    (Arc::new(export), Some(dir))
}

fn roundtrip(c: &mut Criterion) {
    let mut g = c.benchmark_group("roundtrip");
    g.sample_size(50)
        .noise_threshold(0.05)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Bytes(u64::from(IO_SIZE)));
    for (kind, raw_file) in [("mem", false), ("raw", true)] {
        for (runtime_name, runtime) in RUNTIMES {
            let rt = runtime();
            let (export, _image_dir) = {
                let _guard = rt.enter();
                export(raw_file)
            };
            let mut client = Client::new(rt, export);
            let name = format!("{kind}/{runtime_name}");
            g.bench_function(format!("read4k_qd1/{name}"), |b| {
                b.iter_custom(|iters| client.run(cmd::READ, iters));
            });
            if !raw_file {
                g.bench_function(format!("write4k_qd1/{name}"), |b| {
                    b.iter_custom(|iters| client.run(cmd::WRITE, iters));
                });
            }
        }
    }
    g.finish();
}

fn limits(mode: ReplyMode) -> SessionLimits {
    SessionLimits {
        size: 1 << 30,
        minimum_block: 512,
        maximum_payload: BlockSizes::DEFAULT_MAX_PAYLOAD,
        capabilities: MemExport { data: Vec::new() }.capabilities(),
        mode,
        meta_contexts: 1,
        shutting_down: false,
    }
}

fn encoded(mode: ReplyMode, command: u16, length: u64) -> Vec<u8> {
    let mut buf = Vec::new();
    proto::encode_request(
        &mut buf,
        mode,
        &RequestHeader {
            flags: 0,
            command,
            cookie: 42,
            offset: 1 << 20,
            length,
        },
    );
    buf
}

fn decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode");
    g.sample_size(100)
        .noise_threshold(0.03)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for (name, mode) in [
        ("compact", ReplyMode::Structured),
        ("extended", ReplyMode::Extended),
    ] {
        let read = encoded(mode, cmd::READ, 4096);
        let l = limits(mode);
        g.bench_function(format!("decode_request/{name}"), |b| {
            b.iter(|| proto::decode_request(mode, black_box(&read)).expect("decodes"));
        });
        g.bench_function(format!("decode_and_check/read4k/{name}"), |b| {
            b.iter(|| {
                let h = proto::decode_request(mode, black_box(&read)).expect("decodes");
                let v = request::check(&h, black_box(&l));
                assert!(matches!(v, Verdict::Run(_)));
                v
            });
        });
    }
    let l = limits(ReplyMode::Structured);
    let read = proto::decode_request(
        ReplyMode::Structured,
        &encoded(ReplyMode::Structured, cmd::READ, 4096),
    )
    .expect("decodes");
    let bad = RequestHeader {
        offset: u64::MAX - 100,
        ..read
    };
    g.bench_function("check/read4k", |b| {
        b.iter(|| request::check(black_box(&read), black_box(&l)));
    });
    // The refusal path formats a message: what a misbehaving client costs.
    g.bench_function("check/read_out_of_range", |b| {
        b.iter(|| request::check(black_box(&bad), black_box(&l)));
    });
    g.bench_function("encode_request/compact", |b| {
        let mut out = Vec::with_capacity(32);
        b.iter(|| {
            out.clear();
            proto::encode_request(&mut out, ReplyMode::Structured, black_box(&read));
            out.len()
        });
    });
    g.finish();
}

criterion_group!(benches, decode, roundtrip);
criterion_main!(benches);
