//! Criterion benchmarks of in-process request handling.
//!
//! - `roundtrip/*`: one 4 KiB request at queue depth 1 through the whole server path:
//!   request header encoding (client side), `Server::serve_connection` reading and
//!   validating it, the export, the reply encoder and writer, and the client reading
//!   the reply, over `tokio::io::duplex`. The handshake (fixed newstyle,
//!   `NBD_OPT_STRUCTURED_REPLY`, `NBD_OPT_GO`) is done once in setup by a minimal
//!   hand-written client. Variants: memory export or `RawExport` on a temporary file;
//!   a current-thread runtime (client and server on one thread: the CPU cost of the
//!   path) or a 2-worker multi-thread runtime (server on the workers, client on the
//!   bench thread: adds the cross-thread wake-ups a real socket has).
//! - `decode/*`: the sans-IO pieces on their own: `proto::decode_request`,
//!   `request::check` and both together.
//!
//! Run: `cargo bench -p thinline-nbd --bench request` (add `-- --quick` for a fast pass,
//! or a filter such as `-- roundtrip/mem`).

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use thinline_nbd::export::{
    BlockSizes, Capabilities, Export, Extent, ReadChunk, StatusQuery, ZeroFlags,
};
use thinline_nbd::proto::{
    self, IHAVEOPT, NBDMAGIC, OPTION_REPLY_MAGIC, ReplyMode, RequestHeader, SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC, client_flags, cmd, opt, rep, reply,
};
use thinline_nbd::raw::{RawExport, RawOptions};
use thinline_nbd::request::{self, SessionLimits, Verdict};
use thinline_nbd::server::{ExportSet, Server, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};
use tokio::runtime::Runtime;

const EXPORT_SIZE: usize = 16 << 20;
const IO_SIZE: u32 = 4096;

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

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8 | 1).collect()
}

/// A client connected to an in-process server, past the handshake, with the runtime
/// that runs both.
struct Client {
    rt: Runtime,
    conn: Conn,
}

/// The client's end of the connection.
struct Conn {
    reader: ReadHalf<DuplexStream>,
    writer: WriteHalf<DuplexStream>,
    cookie: u64,
    request: Vec<u8>,
    payload: Vec<u8>,
    buf: Vec<u8>,
    /// Directory of the raw export's image, removed when the connection goes.
    _image_dir: Option<tempfile::TempDir>,
}

impl Client {
    fn new(rt: Runtime, raw_file: bool) -> Client {
        // Exports may register with the runtime when they are opened.
        let guard = rt.enter();
        let (export, image_dir): (Arc<dyn Export>, _) = if raw_file {
            let dir = tempfile::tempdir().expect("temporary directory");
            let path = dir.path().join("disk.img");
            std::fs::write(&path, pattern(EXPORT_SIZE)).expect("write the image");
            let export = RawExport::open(&path, &RawOptions::default()).expect("open the image");
            (Arc::new(export), Some(dir))
        } else {
            let export = MemExport {
                data: pattern(EXPORT_SIZE),
            };
            (Arc::new(export), None)
        };
        let mut exports = ExportSet::new();
        exports.add("disk", export).expect("add the export");
        let server = Server::new(exports, ServerConfig::default()).expect("server");
        let (client_end, server_end) = tokio::io::duplex(1 << 20);
        let (server_r, server_w) = tokio::io::split(server_end);
        rt.spawn(async move {
            server
                .serve_connection(server_r, server_w, "bench".into())
                .await;
        });
        let (mut reader, mut writer) = tokio::io::split(client_end);
        rt.block_on(handshake(&mut reader, &mut writer));
        let conn = Conn {
            reader,
            writer,
            cookie: 0,
            request: Vec::with_capacity(proto::EXTENDED_REQUEST_LEN),
            payload: pattern(IO_SIZE as usize),
            buf: vec![0u8; 1 << 20],
            _image_dir: image_dir,
        };
        drop(guard);
        Client { rt, conn }
    }

    /// Times `iters` sequential requests (queue depth 1), rotating over the export.
    /// One `block_on` for the whole batch, so its own cost is not measured.
    fn run(&mut self, command: u16, iters: u64) -> Duration {
        let conn = &mut self.conn;
        self.rt.block_on(async {
            let blocks = (EXPORT_SIZE as u64) / u64::from(IO_SIZE);
            let start = Instant::now();
            for i in 0..iters {
                let offset = (i * 7919 % blocks) * u64::from(IO_SIZE);
                conn.round_trip(command, offset).await;
            }
            start.elapsed()
        })
    }
}

impl Conn {
    /// Sends one request at `offset` and waits for its whole reply.
    async fn round_trip(&mut self, command: u16, offset: u64) {
        self.cookie += 1;
        self.request.clear();
        proto::encode_request(
            &mut self.request,
            ReplyMode::Structured,
            &RequestHeader {
                flags: 0,
                command,
                cookie: self.cookie,
                offset,
                length: u64::from(IO_SIZE),
            },
        );
        if command == cmd::WRITE {
            self.request.extend_from_slice(&self.payload);
        }
        self.writer.write_all(&self.request).await.expect("send");
        let received = read_reply(&mut self.reader, &mut self.buf, self.cookie).await;
        let expected = if command == cmd::READ {
            IO_SIZE as usize
        } else {
            0
        };
        assert_eq!(
            received, expected,
            "reply carried an unexpected amount of data"
        );
    }
}

/// Reads one reply (simple, or structured chunks until `DONE`); returns the data bytes.
async fn read_reply(reader: &mut ReadHalf<DuplexStream>, buf: &mut [u8], cookie: u64) -> usize {
    let mut data = 0;
    loop {
        let mut magic = [0u8; 4];
        reader.read_exact(&mut magic).await.expect("reply magic");
        match u32::from_be_bytes(magic) {
            SIMPLE_REPLY_MAGIC => {
                let mut h = [0u8; 12];
                reader.read_exact(&mut h).await.expect("simple reply");
                let error = u32::from_be_bytes(h[..4].try_into().unwrap());
                assert_eq!(error, 0, "request failed");
                assert_eq!(u64::from_be_bytes(h[4..].try_into().unwrap()), cookie);
                return data;
            }
            STRUCTURED_REPLY_MAGIC => {
                let mut h = [0u8; 16];
                reader.read_exact(&mut h).await.expect("chunk header");
                let flags = u16::from_be_bytes([h[0], h[1]]);
                let chunk_type = u16::from_be_bytes([h[2], h[3]]);
                assert_eq!(u64::from_be_bytes(h[4..12].try_into().unwrap()), cookie);
                let len = u32::from_be_bytes(h[12..].try_into().unwrap()) as usize;
                reader
                    .read_exact(&mut buf[..len])
                    .await
                    .expect("chunk payload");
                match chunk_type {
                    reply::OFFSET_DATA => data += len - 8,
                    reply::NONE => {}
                    other => panic!("unexpected chunk type {other:#x}"),
                }
                if flags & reply::FLAG_DONE != 0 {
                    return data;
                }
            }
            other => panic!("bad reply magic {other:#x}"),
        }
    }
}

/// Fixed newstyle, `NBD_OPT_STRUCTURED_REPLY`, `NBD_OPT_GO` for the default export.
async fn handshake(reader: &mut ReadHalf<DuplexStream>, writer: &mut WriteHalf<DuplexStream>) {
    let mut greeting = [0u8; 18];
    reader.read_exact(&mut greeting).await.expect("greeting");
    assert_eq!(
        u64::from_be_bytes(greeting[..8].try_into().unwrap()),
        NBDMAGIC
    );
    assert_eq!(
        u64::from_be_bytes(greeting[8..16].try_into().unwrap()),
        IHAVEOPT
    );
    let flags = client_flags::C_FIXED_NEWSTYLE | client_flags::C_NO_ZEROES;
    writer.write_all(&flags.to_be_bytes()).await.expect("flags");

    send_option(writer, opt::STRUCTURED_REPLY, &[]).await;
    let (reply_type, _) = read_option_reply(reader, opt::STRUCTURED_REPLY).await;
    assert_eq!(reply_type, rep::ACK, "structured replies refused");

    // Export name "" (the default export), no information requests.
    send_option(writer, opt::GO, &[0, 0, 0, 0, 0, 0]).await;
    loop {
        match read_option_reply(reader, opt::GO).await {
            (rep::ACK, _) => break,
            (rep::INFO, _) => {}
            (other, data) => panic!(
                "NBD_OPT_GO refused with {other:#x}: {}",
                String::from_utf8_lossy(&data)
            ),
        }
    }
}

async fn send_option(writer: &mut WriteHalf<DuplexStream>, option: u32, data: &[u8]) {
    let mut o = Vec::with_capacity(16 + data.len());
    o.extend_from_slice(&IHAVEOPT.to_be_bytes());
    o.extend_from_slice(&option.to_be_bytes());
    o.extend_from_slice(&(data.len() as u32).to_be_bytes());
    o.extend_from_slice(data);
    writer.write_all(&o).await.expect("send option");
}

async fn read_option_reply(reader: &mut ReadHalf<DuplexStream>, option: u32) -> (u32, Vec<u8>) {
    let mut h = [0u8; 20];
    reader.read_exact(&mut h).await.expect("option reply");
    assert_eq!(
        u64::from_be_bytes(h[..8].try_into().unwrap()),
        OPTION_REPLY_MAGIC
    );
    assert_eq!(u32::from_be_bytes(h[8..12].try_into().unwrap()), option);
    let reply_type = u32::from_be_bytes(h[12..16].try_into().unwrap());
    let len = u32::from_be_bytes(h[16..].try_into().unwrap()) as usize;
    let mut data = vec![0u8; len];
    reader.read_exact(&mut data).await.expect("option data");
    (reply_type, data)
}

fn current_thread() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn multi_thread() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn roundtrip(c: &mut Criterion) {
    let mut g = c.benchmark_group("roundtrip");
    g.sample_size(50)
        .noise_threshold(0.05)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Bytes(u64::from(IO_SIZE)));
    type MakeRuntime = fn() -> Runtime;
    let setups: [(&str, bool, MakeRuntime); 4] = [
        ("mem/current_thread", false, current_thread),
        ("mem/multi_thread", false, multi_thread),
        ("raw/current_thread", true, current_thread),
        ("raw/multi_thread", true, multi_thread),
    ];
    for (name, raw_file, runtime) in setups {
        let mut client = Client::new(runtime(), raw_file);
        g.bench_function(format!("read4k_qd1/{name}"), |b| {
            b.iter_custom(|iters| client.run(cmd::READ, iters));
        });
        if !raw_file {
            g.bench_function(format!("write4k_qd1/{name}"), |b| {
                b.iter_custom(|iters| client.run(cmd::WRITE, iters));
            });
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
