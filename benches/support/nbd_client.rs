//! A minimal hand-written NBD client of an in-process server, shared by the criterion
//! benchmarks that time whole requests (`request.rs`, `read_latency.rs`).
//!
//! [`Client::new`] serves one export with `Server::serve_connection` over
//! `tokio::io::duplex` and does the handshake once (fixed newstyle,
//! `NBD_OPT_STRUCTURED_REPLY`, `NBD_OPT_GO`); [`Client::run`] then times requests at
//! queue depth 1: request header encoding, the server reading and validating it, the
//! export, the reply encoder and writer, and this client reading the whole reply.

use std::sync::Arc;
use std::time::{Duration, Instant};

use thinline_nbd::export::Export;
use thinline_nbd::proto::{
    self, IHAVEOPT, NBDMAGIC, OPTION_REPLY_MAGIC, ReplyMode, RequestHeader, SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC, client_flags, cmd, opt, rep, reply,
};
use thinline_nbd::server::{ExportSet, Server, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};
use tokio::runtime::Runtime;

/// Bytes per request.
pub const IO_SIZE: u32 = 4096;

/// Consecutive requests are this many blocks apart (modulo the export's blocks): a
/// prime, so every block is visited once per cycle, and about 31 MiB, so consecutive
/// requests share no cluster, grain or table of an image.
const STRIDE_BLOCKS: u64 = 7919;

/// A client connected to an in-process server, past the handshake, with the runtime
/// that runs both.
pub struct Client {
    rt: Runtime,
    conn: Conn,
    /// 4 KiB blocks in the export.
    blocks: u64,
}

/// The client's end of the connection.
struct Conn {
    reader: ReadHalf<DuplexStream>,
    writer: WriteHalf<DuplexStream>,
    cookie: u64,
    request: Vec<u8>,
    payload: Vec<u8>,
    buf: Vec<u8>,
}

impl Client {
    /// Serves `export` (opened inside `rt` if it registers with a runtime) as the
    /// default export on `rt` and connects to it.
    pub fn new(rt: Runtime, export: Arc<dyn Export>) -> Client {
        let guard = rt.enter();
        let blocks = export.size() / u64::from(IO_SIZE);
        assert!(blocks > 0, "the export is smaller than one request");
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
        };
        drop(guard);
        Client { rt, conn, blocks }
    }

    /// Times `iters` sequential requests (queue depth 1) of [`IO_SIZE`] bytes, each
    /// [`STRIDE_BLOCKS`] blocks after the last. One `block_on` for the whole batch, so
    /// its own cost is not measured.
    pub fn run(&mut self, command: u16, iters: u64) -> Duration {
        let conn = &mut self.conn;
        let blocks = self.blocks;
        self.rt.block_on(async {
            let start = Instant::now();
            for i in 0..iters {
                let offset = (i * STRIDE_BLOCKS % blocks) * u64::from(IO_SIZE);
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

/// `len` bytes of a fixed non-zero pattern.
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8 | 1).collect()
}

/// Reads one reply (simple, or structured chunks until `DONE`); returns the bytes of
/// data and holes it carried.
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
                    reply::OFFSET_HOLE => {
                        data += u32::from_be_bytes(buf[8..12].try_into().unwrap()) as usize;
                    }
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

/// How a benchmark runs client and server.
pub type MakeRuntime = fn() -> Runtime;

/// The runtimes the round-trip rows are measured on, by the name that ends their id:
/// `current_thread` (client and server on one thread: the CPU cost of the path) and
/// `multi_thread` (2 workers run the server, the bench thread the client: adds the
/// cross-thread wake-ups a real socket has).
pub const RUNTIMES: [(&str, MakeRuntime); 2] = [
    ("current_thread", current_thread),
    ("multi_thread", multi_thread),
];

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
