//! Fuzzes a whole server connection in process: `Server::serve_connection` over
//! `tokio::io::duplex`, with in-memory exports.
//!
//! The first input byte picks how the rest is sent:
//! - bits 0-2, the prelude the harness sends before the rest:
//!   - 0: none, the rest is the client's whole byte stream (handshake fuzzing);
//!   - 1: GO in simple mode; 2: `NBD_OPT_EXPORT_NAME`;
//!   - 3: structured replies, GO; 4: structured replies, `SET_META_CONTEXT`, GO;
//!   - 5: extended headers, `SET_META_CONTEXT`, GO; 6: extended headers, GO;
//!   - 7: `LIST_META_CONTEXT`, `INFO`, `LIST`, structured replies, `SET_META_CONTEXT`, GO.
//! - bit 3: use the second export (`ro`: read-only, odd size, minimum block 1, two
//!   metadata contexts, extents that need normalising) instead of the default one.
//! - bit 4: after a prelude, the rest is a list of 12-byte request records that the
//!   harness turns into well-framed requests (right magic, truthful payloads unless
//!   the record asks otherwise, see `requests`); without it, the rest is sent verbatim.
//! - bit 5: start a graceful server shutdown while the client is talking.
//!
//! The client writes everything, closes its write half and reads until the server
//! closes. Time is paused (tokio `start_paused`), so timers cost nothing; if the
//! connection has not ended after an hour of virtual time, the server hangs: panic.
//!
//! With request records, an oracle also checks everything the server sent: the option
//! replies of the prelude (all succeed), then, if every payload was sent truthfully,
//! each reply: magics of the negotiated mode, known cookies, one completion per request
//! (every request answered unless shutting down), no chunk after `DONE`, the offset
//! echoed in extended headers, read chunks inside the request, not overlapping,
//! covering it exactly and a single one with `DF`, no simple reply to a READ once
//! structured replies are on, block-status chunks of the right type for known context
//! ids with non-empty extents within the requested length (one with `REQ_ONE`), and
//! well-formed error chunks (offsets inside the request).

#![no_main]

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use thinline_nbd::export::{
    BlockSizes, Capabilities, Export, Extent, ReadChunk, StatusQuery, ZeroFlags,
};
use thinline_nbd::proto::{
    self, BASE_ALLOCATION, IHAVEOPT, ReplyMode, RequestHeader, client_flags, cmd, cmd_flags, info,
    opt, rep, reply, state,
};
use thinline_nbd::server::{ExportSet, Server, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Bytes per allocation granule of the memory export (a granule of zeroes is a hole).
const GRANULE: u64 = 4096;

/// An export kept in memory. Reads report all-zero granules as holes; one region fails
/// with EIO, to exercise error replies.
#[derive(Debug)]
struct MemExport {
    data: Mutex<Vec<u8>>,
    read_only: bool,
    minimum: u32,
    contexts: &'static [&'static str],
    /// Answer block status with untidy extents (empty, overlong) the server must clean up.
    untidy_extents: bool,
    /// Reads and writes touching `[bad, bad + GRANULE)` fail.
    bad: u64,
}

/// Initial contents: every third granule holds data, the rest are holes. Built once
/// and copied, as filling a megabyte byte by byte on every run is slow under ASan.
fn template(size: usize) -> Vec<u8> {
    static TEMPLATE: OnceLock<Vec<u8>> = OnceLock::new();
    let t = TEMPLATE.get_or_init(|| {
        (0..2 << 20)
            .map(|i: u64| {
                if (i / GRANULE) % 3 == 1 {
                    (i % 251) as u8 | 1
                } else {
                    0
                }
            })
            .collect()
    });
    t[..size].to_vec()
}

/// Whether a piece of at most one granule is all zeroes (one `bcmp`, not a loop the
/// coverage instrumentation would slow down byte by byte).
fn is_zero(piece: &[u8]) -> bool {
    static ZERO: [u8; GRANULE as usize] = [0; GRANULE as usize];
    piece == &ZERO[..piece.len()]
}

impl MemExport {
    fn new(size: usize, read_only: bool, minimum: u32) -> Self {
        MemExport {
            data: Mutex::new(template(size)),
            read_only,
            minimum,
            contexts: &[BASE_ALLOCATION],
            untidy_extents: false,
            bad: (size as u64 / 2) & !(GRANULE - 1),
        }
    }

    fn io_error(&self, op: &'static str, offset: u64, length: u64) -> thinline_nbd::Error {
        thinline_nbd::DataError::io(
            op,
            "mem",
            offset.max(self.bad),
            length,
            std::io::Error::from_raw_os_error(5),
        )
        .into()
    }

    fn hits_bad(&self, offset: u64, length: u64) -> bool {
        offset < self.bad + GRANULE && self.bad < offset + length
    }

    fn check(&self, offset: u64, length: u64) {
        let size = self.size();
        assert!(
            offset.checked_add(length).is_some_and(|e| e <= size),
            "export called out of range: {offset}+{length} > {size}"
        );
        let m = u64::from(self.minimum);
        assert_eq!(
            offset % m,
            0,
            "export called with a misaligned offset {offset}"
        );
    }
}

#[async_trait]
impl Export for MemExport {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            read_only: self.read_only,
            flush: true,
            fua: true,
            trim: !self.read_only,
            write_zeroes: !self.read_only,
            fast_zero: !self.read_only,
            cache: true,
            multi_conn: true,
            rotational: false,
        }
    }

    fn block_sizes(&self) -> BlockSizes {
        BlockSizes {
            minimum: self.minimum,
            preferred: 4096,
            maximum_payload: 64 * 1024,
        }
    }

    fn description(&self) -> Option<String> {
        Some("fuzz memory export".into())
    }

    fn meta_contexts(&self) -> &[&'static str] {
        self.contexts
    }

    async fn read(&self, offset: u64, length: u32) -> thinline_nbd::Result<Vec<ReadChunk>> {
        self.check(offset, u64::from(length));
        assert!(length > 0 && length <= self.block_sizes().maximum_payload);
        if self.hits_bad(offset, u64::from(length)) {
            return Err(self.io_error("read", offset, u64::from(length)));
        }
        let data = self.data.lock().unwrap();
        let end = offset + u64::from(length);
        let mut chunks: Vec<ReadChunk> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let next = ((pos / GRANULE + 1) * GRANULE).min(end);
            let piece = &data[pos as usize..next as usize];
            let zero = is_zero(piece);
            match (chunks.last_mut(), zero) {
                (Some(ReadChunk::Zero(n)), true) => *n += next - pos,
                (_, true) => chunks.push(ReadChunk::Zero(next - pos)),
                _ => chunks.push(ReadChunk::Data(Bytes::copy_from_slice(piece))),
            }
            pos = next;
        }
        Ok(chunks)
    }

    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> thinline_nbd::Result<()> {
        assert!(!self.read_only, "write on a read-only export");
        self.check(offset, data.len() as u64);
        if self.hits_bad(offset, data.len() as u64) {
            return Err(self.io_error("write", offset, data.len() as u64));
        }
        let mut d = self.data.lock().unwrap();
        d[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        Ok(())
    }

    async fn flush(&self) -> thinline_nbd::Result<()> {
        Ok(())
    }

    async fn trim(&self, offset: u64, length: u64, _fua: bool) -> thinline_nbd::Result<()> {
        assert!(!self.read_only, "trim on a read-only export");
        self.check(offset, length);
        Ok(())
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        length: u64,
        flags: ZeroFlags,
    ) -> thinline_nbd::Result<()> {
        assert!(!self.read_only, "write zeroes on a read-only export");
        self.check(offset, length);
        if flags.fast && flags.no_hole {
            return Err(thinline_nbd::DataError::not_fast("mem", offset, length).into());
        }
        let mut d = self.data.lock().unwrap();
        d[offset as usize..(offset + length) as usize].fill(0);
        Ok(())
    }

    async fn cache(&self, offset: u64, length: u64) -> thinline_nbd::Result<()> {
        self.check(offset, length);
        Ok(())
    }

    async fn block_status(&self, q: StatusQuery) -> thinline_nbd::Result<Vec<Extent>> {
        let (offset, length) = (q.offset, q.length);
        assert!(
            q.context < self.contexts.len(),
            "unknown context index {}",
            q.context
        );
        assert!(q.max_extents > 0);
        assert!(length > 0);
        self.check(offset, length);
        if self.untidy_extents {
            // Zero-length and overlong extents, one flag repeated: the server normalises.
            return Ok(match offset % 3 {
                0 => vec![],
                1 => vec![
                    Extent {
                        length: 0,
                        flags: 1,
                    },
                    Extent {
                        length: 1,
                        flags: 1,
                    },
                    Extent {
                        length: 1,
                        flags: 1,
                    },
                    Extent {
                        length: u64::MAX,
                        flags: 2,
                    },
                ],
                _ => vec![Extent {
                    length: length * 2 + 7,
                    flags: q.context as u64,
                }],
            });
        }
        let data = self.data.lock().unwrap();
        let end = offset + length;
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end && out.len() < q.max_extents {
            let next = ((pos / GRANULE + 1) * GRANULE).min(end);
            let zero = is_zero(&data[pos as usize..next as usize]);
            let flags = if zero {
                u64::from(state::HOLE | state::ZERO)
            } else {
                0
            };
            match out.last_mut() {
                Some(e) if e.flags == flags => e.length += next - pos,
                _ => out.push(Extent {
                    length: next - pos,
                    flags,
                }),
            }
            pos = next;
        }
        Ok(out)
    }
}

const DISK_SIZE: usize = 1 << 20;
const RO_SIZE: usize = (1 << 18) + 1001;

fn server() -> Server {
    let mut exports = ExportSet::new();
    exports
        .add("disk", Arc::new(MemExport::new(DISK_SIZE, false, 512)))
        .unwrap();
    let mut ro = MemExport::new(RO_SIZE, true, 1);
    ro.contexts = &[BASE_ALLOCATION, "qemu:dirty-bitmap:fuzz"];
    ro.untidy_extents = true;
    exports.add("ro", Arc::new(ro)).unwrap();
    let config = ServerConfig {
        handshake_timeout: Duration::from_secs(10),
        shutdown_grace: Duration::from_millis(500),
        ..ServerConfig::default()
    };
    Server::new(exports, config).unwrap()
}

fn option(out: &mut Vec<u8>, option: u32, data: &[u8]) {
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

fn string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn info_request(name: &str) -> Vec<u8> {
    let mut d = Vec::new();
    string(&mut d, name);
    let items = [info::NAME, info::DESCRIPTION, info::BLOCK_SIZE];
    d.extend_from_slice(&(items.len() as u16).to_be_bytes());
    for i in items {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

fn meta_request(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = Vec::new();
    string(&mut d, name);
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        string(&mut d, q);
    }
    d
}

/// What the harness sent before transmission.
struct Prelude {
    mode: ReplyMode,
    /// Options sent, in order (their replies are checked in records mode).
    options: Vec<u32>,
}

/// The client's handshake for prelude `kind`.
fn prelude(out: &mut Vec<u8>, kind: u8, name: &str) -> Prelude {
    out.extend_from_slice(
        &(client_flags::C_FIXED_NEWSTYLE | client_flags::C_NO_ZEROES).to_be_bytes(),
    );
    let contexts: &[&str] = &[BASE_ALLOCATION, "qemu:dirty-bitmap:fuzz"];
    let (mode, options): (ReplyMode, Vec<(u32, Vec<u8>)>) = match kind {
        1 => (ReplyMode::Simple, vec![(opt::GO, info_request(name))]),
        2 => (
            ReplyMode::Simple,
            vec![(opt::EXPORT_NAME, name.as_bytes().to_vec())],
        ),
        // Structured (3, 4) or extended (5, 6) replies, with (4, 5) or without (3, 6) a
        // metadata context, then GO.
        3..=6 => {
            let (mode, enable) = if kind <= 4 {
                (ReplyMode::Structured, opt::STRUCTURED_REPLY)
            } else {
                (ReplyMode::Extended, opt::EXTENDED_HEADERS)
            };
            let mut options = vec![(enable, vec![])];
            if kind == 4 || kind == 5 {
                options.push((opt::SET_META_CONTEXT, meta_request(name, contexts)));
            }
            options.push((opt::GO, info_request(name)));
            (mode, options)
        }
        _ => (
            ReplyMode::Structured,
            vec![
                (
                    opt::LIST_META_CONTEXT,
                    meta_request(name, &["base:", "qemu:"]),
                ),
                (opt::INFO, info_request(name)),
                (opt::LIST, vec![]),
                (opt::STRUCTURED_REPLY, vec![]),
                (
                    opt::SET_META_CONTEXT,
                    meta_request(name, &[BASE_ALLOCATION]),
                ),
                (opt::GO, info_request(name)),
            ],
        ),
    };
    for (o, data) in &options {
        option(out, *o, data);
    }
    Prelude {
        mode,
        options: options.into_iter().map(|(o, _)| o).collect(),
    }
}

/// One request the harness sent; its cookie is its index + 1.
#[derive(Debug, Clone, Copy)]
struct Sent {
    command: u16,
    flags: u16,
    offset: u64,
    length: u64,
    /// Effect length of an extended block-status request with a payload.
    effect: Option<u64>,
}

/// The requests the harness sent, and whether every payload was sent truthfully (so
/// the server must stay in sync and answer each request exactly once).
struct SentRequests {
    requests: Vec<Sent>,
    truthful: bool,
}

/// Largest payload the harness sends.
const MAX_SENT_PAYLOAD: u64 = 128 * 1024;

/// Turns 12-byte records into requests:
/// `ctl:u8 command:u8 flags:u16 offset:u32 length:u32` (big-endian). `ctl` bits:
/// 0 offset in units of 512 bytes, 1 offset in the high 32 bits, 2 length in units of
/// 512 bytes, 3 length in the high 32 bits (extended only), 4 send no payload (lie),
/// 5 send half the payload, 6 raw command number instead of `command % 8`.
fn requests(out: &mut Vec<u8>, records: &[u8], mode: ReplyMode) -> SentRequests {
    let extended = mode == ReplyMode::Extended;
    let mut sent = SentRequests {
        requests: Vec::new(),
        truthful: true,
    };
    for (n, r) in records.chunks_exact(12).enumerate() {
        let ctl = r[0];
        let command = if ctl & 64 != 0 {
            u16::from(r[1])
        } else {
            u16::from(r[1] % 8)
        };
        let flags = u16::from_be_bytes([r[2], r[3]]);
        let raw_off = u64::from(u32::from_be_bytes([r[4], r[5], r[6], r[7]]));
        let raw_len = u64::from(u32::from_be_bytes([r[8], r[9], r[10], r[11]]));
        let mut offset = if ctl & 1 != 0 {
            (raw_off & 0xffff) * 512
        } else {
            raw_off
        };
        if ctl & 2 != 0 {
            offset |= raw_off << 32;
        }
        let mut length = if ctl & 4 != 0 {
            (raw_len & 0xffff) * 512
        } else {
            raw_len
        };
        if extended && ctl & 8 != 0 {
            length |= raw_len << 32;
        }
        let header = RequestHeader {
            flags,
            command,
            cookie: n as u64 + 1,
            offset,
            length,
        };
        proto::encode_request(out, mode, &header);
        let mut request = Sent {
            command,
            flags,
            offset,
            length,
            effect: None,
        };
        let has_payload =
            command == cmd::WRITE || (extended && flags & cmd_flags::PAYLOAD_LEN != 0);
        if has_payload {
            let mut len = length.min(MAX_SENT_PAYLOAD);
            if ctl & 16 != 0 {
                len = 0;
            } else if ctl & 32 != 0 {
                len /= 2;
            }
            sent.truthful &= len == length;
            if command == cmd::BLOCK_STATUS && len >= 8 {
                // Effect length, then context ids 0, 1, 2, 0, …
                let effect = raw_len & 0xffff_ff00;
                request.effect = Some(effect);
                out.extend_from_slice(&effect.to_be_bytes());
                for i in 0..(len - 8) / 4 {
                    out.extend_from_slice(&(i as u32 % 3).to_be_bytes());
                }
                out.extend(std::iter::repeat_n(0xa5, ((len - 8) % 4) as usize));
            } else {
                out.extend(std::iter::repeat_n(n as u8 | 0x80, len as usize));
            }
        }
        sent.requests.push(request);
    }
    sent
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let kind = sel & 7;
    let name = if sel & 8 != 0 { "ro" } else { "" };
    let shutdown = sel & 32 != 0;
    let mut client = Vec::with_capacity(data.len() + 256);
    if kind == 0 {
        client.extend_from_slice(rest);
        run(&client, shutdown);
        return;
    }
    let prelude = prelude(&mut client, kind, name);
    if sel & 16 == 0 {
        client.extend_from_slice(rest);
        run(&client, shutdown);
        return;
    }
    let sent = requests(&mut client, rest, prelude.mode);
    // A clean disconnect, unless the records ended mid-way.
    if rest.len() % 12 == 0 {
        let disc = RequestHeader {
            flags: 0,
            command: cmd::DISC,
            cookie: 0,
            offset: 0,
            length: 0,
        };
        proto::encode_request(&mut client, prelude.mode, &disc);
    }
    let replies = run(&client, shutdown);
    Oracle {
        r: Replies {
            buf: &replies,
            pos: 0,
        },
        mode: prelude.mode,
        export_size: if name == "ro" { RO_SIZE } else { DISK_SIZE } as u64,
        contexts: 0,
    }
    .check(&prelude, &sent, shutdown);
});

/// Runs one connection; returns everything the server sent.
fn run(client: &[u8], shutdown: bool) -> Vec<u8> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async {
        let server = server();
        let (client_end, server_end) = tokio::io::duplex(64 * 1024);
        let (server_r, server_w) = tokio::io::split(server_end);
        let (mut client_r, mut client_w) = tokio::io::split(client_end);

        let serve = server.serve_connection(server_r, server_w, "fuzz".into());
        let write = async move {
            // Several writes, so the server sees data arrive in pieces.
            for piece in client.chunks(4096) {
                if client_w.write_all(piece).await.is_err() {
                    break; // the server hung up
                }
                tokio::task::yield_now().await;
            }
            let _ = client_w.shutdown().await;
            // Keep the half alive until the end: only the other branch finishes.
            std::future::pending::<()>().await;
        };
        let read = async move {
            let mut received = Vec::new();
            let _ = client_r.read_to_end(&mut received).await;
            received
        };
        let stop = async {
            if shutdown {
                tokio::time::sleep(Duration::from_millis(1)).await;
                server.shutdown();
            }
        };
        let all = async {
            tokio::select! {
                ((), received, ()) = async { tokio::join!(serve, read, stop) } => received,
                () = write => unreachable!("the writer never finishes"),
            }
        };
        match tokio::time::timeout(Duration::from_secs(3600), all).await {
            Ok(received) => received,
            Err(_) => panic!(
                "the connection did not end within an hour (virtual time) after the client closed"
            ),
        }
    })
}

/// A cursor over the server's bytes; running out in the middle of a reply is a bug
/// (the server writes whole replies, even when it closes the connection).
struct Replies<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Replies<'a> {
    fn is_empty(&self) -> bool {
        self.pos == self.buf.len()
    }

    fn take(&mut self, n: u64, what: &str) -> &'a [u8] {
        let left = self.buf.len() - self.pos;
        assert!(
            n <= left as u64,
            "server output ends inside {what}: {n} bytes wanted, {left} left"
        );
        let b = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        b
    }

    fn u16(&mut self, what: &str) -> u16 {
        u16::from_be_bytes(self.take(2, what).try_into().unwrap())
    }

    fn u32(&mut self, what: &str) -> u32 {
        u32::from_be_bytes(self.take(4, what).try_into().unwrap())
    }

    fn u64(&mut self, what: &str) -> u64 {
        u64::from_be_bytes(self.take(8, what).try_into().unwrap())
    }
}

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().unwrap())
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

/// Progress of one request's reply.
#[derive(Debug, Default, Clone)]
struct Progress {
    done: bool,
    error: bool,
    /// Read ranges covered by data and hole chunks.
    covered: Vec<(u64, u64)>,
    /// Block-status context ids answered.
    contexts: Vec<u32>,
}

/// Checks what the server sent against the protocol, for a well-framed request stream.
struct Oracle<'a> {
    r: Replies<'a>,
    mode: ReplyMode,
    export_size: u64,
    /// Metadata contexts negotiated.
    contexts: u32,
}

impl Oracle<'_> {
    fn check(mut self, prelude: &Prelude, sent: &SentRequests, shutdown: bool) {
        let r = &mut self.r;
        assert_eq!(r.u64("the greeting"), proto::NBDMAGIC);
        assert_eq!(r.u64("the greeting"), IHAVEOPT);
        r.u16("the greeting");
        for &o in &prelude.options {
            // A shutdown may cut the handshake short (after refusing options with
            // NBD_REP_ERR_SHUTDOWN): nothing more to check then.
            if shutdown && r.is_empty() {
                return;
            }
            if o == opt::EXPORT_NAME {
                assert_eq!(r.u64("the export size"), self.export_size);
                r.u16("the transmission flags");
                continue;
            }
            loop {
                assert_eq!(r.u64("an option reply"), proto::OPTION_REPLY_MAGIC);
                assert_eq!(r.u32("an option reply"), o, "reply to the wrong option");
                let reply_type = r.u32("an option reply");
                let len = r.u32("an option reply");
                let data = r.take(u64::from(len), "option reply data");
                if shutdown && reply_type == rep::ERR_SHUTDOWN {
                    return;
                }
                assert!(
                    reply_type & (1 << 31) == 0,
                    "{} refused with {reply_type:#x}: {}",
                    proto::option_name(o),
                    String::from_utf8_lossy(data)
                );
                match reply_type {
                    rep::ACK => break,
                    rep::META_CONTEXT if o == opt::SET_META_CONTEXT => {
                        assert_eq!(be_u32(data), self.contexts, "context ids not 0, 1, …");
                        self.contexts += 1;
                    }
                    rep::META_CONTEXT if o == opt::LIST_META_CONTEXT => {}
                    rep::SERVER if o == opt::LIST => {}
                    rep::INFO if o == opt::GO || o == opt::INFO => {
                        if be_u16(data) == info::EXPORT {
                            assert_eq!(be_u64(&data[2..]), self.export_size);
                        }
                    }
                    other => panic!("unexpected reply {other:#x} to {}", proto::option_name(o)),
                }
            }
        }
        if !sent.truthful {
            // The server reads payload bytes as headers: nothing to predict.
            return;
        }
        let mut progress = vec![Progress::default(); sent.requests.len()];
        while !self.r.is_empty() {
            self.reply(&sent.requests, &mut progress);
        }
        if !shutdown {
            // NBD_CMD_DISC (whatever its flags) gets no reply, and nothing after it is read.
            let answered = sent
                .requests
                .iter()
                .position(|r| r.command == cmd::DISC)
                .unwrap_or(sent.requests.len());
            for (i, p) in progress.iter().enumerate().take(answered) {
                assert!(
                    p.done,
                    "request {} was never answered: {:?}",
                    i + 1,
                    sent.requests[i]
                );
            }
        }
    }

    /// The start of a chunk header in `mode` (which must be the negotiated one): flags,
    /// type and cookie.
    fn chunk_header(&mut self, mode: ReplyMode) -> (u16, u16, u64) {
        assert_eq!(self.mode, mode, "{mode:?} chunk in {:?} mode", self.mode);
        let flags = self.r.u16("a chunk header");
        let chunk_type = self.r.u16("a chunk header");
        let cookie = self.r.u64("a chunk header");
        (flags, chunk_type, cookie)
    }

    /// Parses and checks one simple reply or chunk.
    fn reply(&mut self, requests: &[Sent], progress: &mut [Progress]) {
        let magic = self.r.u32("a reply");
        let (flags, chunk_type, cookie, payload) = match magic {
            proto::SIMPLE_REPLY_MAGIC => {
                assert_ne!(
                    self.mode,
                    ReplyMode::Extended,
                    "simple reply with extended headers"
                );
                let error = self.r.u32("a simple reply");
                let cookie = self.r.u64("a simple reply");
                let (req, p) = lookup(requests, progress, cookie);
                assert!(!p.done, "second reply to cookie {cookie}");
                p.done = true;
                p.error = error != 0;
                if req.command == cmd::READ {
                    assert_eq!(
                        self.mode,
                        ReplyMode::Simple,
                        "simple reply to a READ with structured replies"
                    );
                    if error == 0 {
                        self.r.take(req.length, "read data");
                    }
                }
                return;
            }
            proto::STRUCTURED_REPLY_MAGIC => {
                let (flags, chunk_type, cookie) = self.chunk_header(ReplyMode::Structured);
                let len = self.r.u32("a chunk header");
                (
                    flags,
                    chunk_type,
                    cookie,
                    self.r.take(u64::from(len), "a chunk"),
                )
            }
            proto::EXTENDED_REPLY_MAGIC => {
                let (flags, chunk_type, cookie) = self.chunk_header(ReplyMode::Extended);
                let offset = self.r.u64("a chunk header");
                let len = self.r.u64("a chunk header");
                let (req, _) = lookup(requests, progress, cookie);
                assert_eq!(
                    offset, req.offset,
                    "extended reply does not echo the offset"
                );
                (flags, chunk_type, cookie, self.r.take(len, "a chunk"))
            }
            other => panic!("bad reply magic {other:#x}"),
        };
        assert_eq!(
            flags & !reply::FLAG_DONE,
            0,
            "unknown chunk flags {flags:#x}"
        );
        let extended = self.mode == ReplyMode::Extended;
        let contexts = self.contexts;
        let (req, p) = lookup(requests, progress, cookie);
        assert!(!p.done, "chunk for cookie {cookie} after its DONE chunk");
        let req_end = req.offset.saturating_add(req.length);
        match chunk_type {
            reply::NONE => {
                assert!(payload.is_empty(), "NONE chunk with a payload");
                assert!(flags & reply::FLAG_DONE != 0, "NONE chunk without DONE");
            }
            reply::OFFSET_DATA | reply::OFFSET_HOLE => {
                assert_eq!(req.command, cmd::READ, "read data for {req:?}");
                let (start, len) = if chunk_type == reply::OFFSET_DATA {
                    assert!(payload.len() > 8, "empty OFFSET_DATA chunk");
                    (be_u64(payload), payload.len() as u64 - 8)
                } else {
                    assert_eq!(
                        payload.len(),
                        12,
                        "OFFSET_HOLE chunk of {} bytes",
                        payload.len()
                    );
                    (be_u64(payload), u64::from(be_u32(&payload[8..])))
                };
                assert!(len > 0, "empty read chunk");
                assert!(
                    start >= req.offset && start + len <= req_end,
                    "read chunk {start}+{len} outside the request {req:?}"
                );
                for &(s, l) in &p.covered {
                    assert!(
                        start + len <= s || s + l <= start,
                        "overlapping read chunks"
                    );
                }
                p.covered.push((start, len));
                if req.flags & cmd_flags::DF != 0 {
                    assert_eq!(p.covered.len(), 1, "DF read answered in several chunks");
                }
            }
            reply::BLOCK_STATUS | reply::BLOCK_STATUS_EXT => {
                assert_eq!(req.command, cmd::BLOCK_STATUS, "block status for {req:?}");
                assert_eq!(
                    chunk_type == reply::BLOCK_STATUS_EXT,
                    extended,
                    "wrong block-status chunk type"
                );
                let id = be_u32(payload);
                assert!(id < contexts, "context id {id} of {contexts}");
                assert!(!p.contexts.contains(&id), "context {id} answered twice");
                p.contexts.push(id);
                let extents: Vec<(u64, u64)> = if extended {
                    let count = be_u32(&payload[4..]) as usize;
                    let body = &payload[8..];
                    assert_eq!(
                        body.len(),
                        count * 16,
                        "extent count does not match the chunk"
                    );
                    body.chunks_exact(16)
                        .map(|e| (be_u64(e), be_u64(&e[8..])))
                        .collect()
                } else {
                    let body = &payload[4..];
                    assert_eq!(body.len() % 8, 0, "ragged compact extents");
                    body.chunks_exact(8)
                        .map(|e| (u64::from(be_u32(e)), u64::from(be_u32(&e[4..]))))
                        .collect()
                };
                assert!(!extents.is_empty(), "block status without extents");
                if req.flags & cmd_flags::REQ_ONE != 0 {
                    assert_eq!(extents.len(), 1, "REQ_ONE answered with several extents");
                }
                let limit = req.effect.unwrap_or(req.length);
                let total = extents.iter().try_fold(0u64, |t, &(l, _)| {
                    assert!(l > 0, "zero-length extent");
                    t.checked_add(l)
                });
                assert!(
                    total.is_some_and(|t| t <= limit),
                    "extents cover {total:?} bytes of a {limit}-byte request"
                );
            }
            reply::ERROR | reply::ERROR_OFFSET => {
                let errno = be_u32(payload);
                assert_ne!(errno, 0, "error chunk with errno 0");
                let msg = usize::from(be_u16(&payload[4..]));
                let extra = if chunk_type == reply::ERROR_OFFSET {
                    8
                } else {
                    0
                };
                assert_eq!(payload.len(), 6 + msg + extra, "error chunk length");
                if chunk_type == reply::ERROR_OFFSET {
                    let at = be_u64(&payload[6 + msg..]);
                    assert!(
                        at >= req.offset && at < req_end,
                        "error offset {at} outside {req:?}"
                    );
                }
                p.error = true;
            }
            other => panic!("unknown chunk type {other:#x}"),
        }
        if flags & reply::FLAG_DONE != 0 {
            p.done = true;
            if !p.error {
                match req.command {
                    cmd::READ => {
                        let covered: u64 = p.covered.iter().map(|c| c.1).sum();
                        assert_eq!(covered, req.length, "read of {req:?} answered partly");
                    }
                    cmd::BLOCK_STATUS => {
                        assert!(
                            !p.contexts.is_empty(),
                            "block status answered without extents"
                        );
                        if req.effect.is_none() {
                            assert_eq!(p.contexts.len() as u32, contexts, "a context is missing");
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}

fn lookup<'a>(
    requests: &'a [Sent],
    progress: &'a mut [Progress],
    cookie: u64,
) -> (&'a Sent, &'a mut Progress) {
    let i = usize::try_from(cookie).ok().and_then(|c| c.checked_sub(1));
    match i.filter(|&i| i < requests.len()) {
        Some(i) => (&requests[i], &mut progress[i]),
        None => panic!("reply with cookie {cookie}, which was never sent"),
    }
}
