//! A small blocking raw NBD client for protocol-level tests.
//!
//! Written from the NBD specification (`doc/proto.md` and the extended-headers
//! extension), not from the server's own `proto` module, so that a test checks the bytes
//! on the wire rather than a shared encoder. Nothing here hides misbehaviour: option
//! data, lengths and request headers can be sent as lies, and replies are parsed into
//! plain structs ([`OptReply`], [`Chunk`], [`Reply`]) that tests assert on.
//!
//! ```text
//!   Client::unix(path) ─► greeting() ─► send_client_flags() ─► option()/go()/… ─► send()/read_reply()
//! ```
//!
//! A client made [`Client::with_tls`] says `NBD_OPT_STARTTLS` once its flags are sent
//! ([`Client::start`], [`Client::enter_tls`]), runs the TLS handshake (rustls, trusting
//! the test CA) and does everything after it inside TLS: the same calls, the same lies,
//! now as TLS records.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

/// `NBDMAGIC`, the first 8 bytes of the server's greeting.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second half of the greeting, and the magic of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Compact (28-byte) request magic.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Extended (32-byte) request magic.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Simple (16-byte) reply magic.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Structured (20-byte) reply chunk magic.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Extended (32-byte) reply chunk magic.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// Handshake flags (server → client, 16 bits).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags (client → server, 32 bits).
pub const C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const C_NO_ZEROES: u32 = 1 << 1;

/// Option numbers.
pub mod opt {
    pub const EXPORT_NAME: u32 = 1;
    pub const ABORT: u32 = 2;
    pub const LIST: u32 = 3;
    pub const STARTTLS: u32 = 5;
    pub const INFO: u32 = 6;
    pub const GO: u32 = 7;
    pub const STRUCTURED_REPLY: u32 = 8;
    pub const LIST_META_CONTEXT: u32 = 9;
    pub const SET_META_CONTEXT: u32 = 10;
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types.
pub mod rep {
    pub const ACK: u32 = 1;
    pub const SERVER: u32 = 2;
    pub const INFO: u32 = 3;
    pub const META_CONTEXT: u32 = 4;
    pub const ERR_UNSUP: u32 = (1 << 31) | 1;
    pub const ERR_POLICY: u32 = (1 << 31) | 2;
    pub const ERR_INVALID: u32 = (1 << 31) | 3;
    pub const ERR_PLATFORM: u32 = (1 << 31) | 4;
    pub const ERR_TLS_REQD: u32 = (1 << 31) | 5;
    pub const ERR_UNKNOWN: u32 = (1 << 31) | 6;
    pub const ERR_SHUTDOWN: u32 = (1 << 31) | 7;
    pub const ERR_BLOCK_SIZE_REQD: u32 = (1 << 31) | 8;
    pub const ERR_TOO_BIG: u32 = (1 << 31) | 9;
    pub const ERR_EXT_HEADER_REQD: u32 = (1 << 31) | 10;

    /// True for error replies (bit 31).
    pub fn is_error(t: u32) -> bool {
        t & (1 << 31) != 0
    }
}

/// `NBD_INFO_*` items.
pub mod info {
    pub const EXPORT: u16 = 0;
    pub const NAME: u16 = 1;
    pub const DESCRIPTION: u16 = 2;
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags.
pub mod tflag {
    pub const HAS_FLAGS: u16 = 1 << 0;
    pub const READ_ONLY: u16 = 1 << 1;
    pub const SEND_FLUSH: u16 = 1 << 2;
    pub const SEND_FUA: u16 = 1 << 3;
    pub const ROTATIONAL: u16 = 1 << 4;
    pub const SEND_TRIM: u16 = 1 << 5;
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    pub const SEND_DF: u16 = 1 << 7;
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    pub const SEND_RESIZE: u16 = 1 << 9;
    pub const SEND_CACHE: u16 = 1 << 10;
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
    pub const BLOCK_STATUS_PAYLOAD: u16 = 1 << 12;
}

/// Command types.
pub mod cmd {
    pub const READ: u16 = 0;
    pub const WRITE: u16 = 1;
    pub const DISC: u16 = 2;
    pub const FLUSH: u16 = 3;
    pub const TRIM: u16 = 4;
    pub const CACHE: u16 = 5;
    pub const WRITE_ZEROES: u16 = 6;
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags.
pub mod cflag {
    pub const FUA: u16 = 1 << 0;
    pub const NO_HOLE: u16 = 1 << 1;
    pub const DF: u16 = 1 << 2;
    pub const REQ_ONE: u16 = 1 << 3;
    pub const FAST_ZERO: u16 = 1 << 4;
    pub const PAYLOAD_LEN: u16 = 1 << 5;
}

/// Reply chunk types and flags.
pub mod chunk {
    pub const FLAG_DONE: u16 = 1 << 0;
    pub const NONE: u16 = 0;
    pub const OFFSET_DATA: u16 = 1;
    pub const OFFSET_HOLE: u16 = 2;
    pub const BLOCK_STATUS: u16 = 5;
    pub const BLOCK_STATUS_EXT: u16 = 6;
    pub const ERROR: u16 = (1 << 15) | 1;
    pub const ERROR_OFFSET: u16 = (1 << 15) | 2;
}

/// Error values on the wire.
pub mod errno {
    pub const EPERM: u32 = 1;
    pub const EIO: u32 = 5;
    pub const ENOMEM: u32 = 12;
    pub const EINVAL: u32 = 22;
    pub const ENOSPC: u32 = 28;
    pub const EOVERFLOW: u32 = 75;
    pub const ENOTSUP: u32 = 95;
    pub const ESHUTDOWN: u32 = 108;
}

/// `base:allocation` status bits.
pub mod state {
    pub const HOLE: u64 = 1 << 0;
    pub const ZERO: u64 = 1 << 1;
}

/// Largest reply payload this client accepts before calling the server broken (the
/// spec's maximum payload is 32 MiB; leave room for headers and block-status lists).
const MAX_REPLY_PAYLOAD: u64 = 64 * 1024 * 1024 + 4096;

/// How long any single read may block unless a test says otherwise: a server that
/// hangs makes the test fail instead of hang.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// A connected socket.
#[derive(Debug)]
pub enum Socket {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Socket {
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Socket::Unix(s) => s.set_read_timeout(t),
            Socket::Tcp(s) => s.set_read_timeout(t),
        }
    }

    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Socket::Unix(s) => s.set_write_timeout(t),
            Socket::Tcp(s) => s.set_write_timeout(t),
        }
    }

    pub fn shutdown(&self, how: std::net::Shutdown) -> io::Result<()> {
        match self {
            Socket::Unix(s) => s.shutdown(how),
            Socket::Tcp(s) => s.shutdown(how),
        }
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Unix(s) => s.read(buf),
            Socket::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Socket::Unix(s) => s.write(buf),
            Socket::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Socket::Unix(s) => s.flush(),
            Socket::Tcp(s) => s.flush(),
        }
    }
}

/// What a client speaks through: its socket, in clear or, once [`Stream::enter_tls`]
/// ran, inside TLS (the timeouts stay the socket's).
#[derive(Debug)]
pub struct Stream {
    socket: Socket,
    tls: Option<rustls::ClientConnection>,
}

impl Stream {
    fn new(socket: Socket) -> Stream {
        Stream { socket, tls: None }
    }

    /// Runs the TLS handshake as `tls`'s client; everything after it goes inside TLS.
    fn enter_tls(&mut self, tls: &TlsClient) -> io::Result<()> {
        let mut conn = tls.connection();
        while conn.is_handshaking() {
            conn.complete_io(&mut self.socket)?;
        }
        self.tls = Some(conn);
        Ok(())
    }

    /// True once the TLS handshake is done.
    pub fn in_tls(&self) -> bool {
        self.tls.is_some()
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.socket.set_read_timeout(t)
    }

    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.socket.set_write_timeout(t)
    }

    /// Shuts the socket down (under TLS too: no close_notify is sent).
    pub fn shutdown(&self, how: std::net::Shutdown) -> io::Result<()> {
        self.socket.shutdown(how)
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.tls {
            Some(conn) => rustls::Stream::new(conn, &mut self.socket).read(buf),
            None => self.socket.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.tls {
            Some(conn) => rustls::Stream::new(conn, &mut self.socket).write(buf),
            None => self.socket.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.tls {
            Some(conn) => rustls::Stream::new(conn, &mut self.socket).flush(),
            None => self.socket.flush(),
        }
    }
}

/// The client side of TLS: the CA certificates a client trusts and the name it expects
/// in the server's certificate.
#[derive(Debug, Clone)]
pub struct TlsClient {
    config: Arc<rustls::ClientConfig>,
    server_name: ServerName<'static>,
}

impl TlsClient {
    /// A client that trusts the certificates of PEM file `ca` and expects a server
    /// certificate for `server_name` (a DNS name or an IP address).
    pub fn new(ca: &Path, server_name: &str) -> TlsClient {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca).expect("CA certificate file") {
            roots
                .add(cert.expect("PEM certificate"))
                .expect("CA certificate");
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS 1.2 and 1.3")
            .with_root_certificates(roots)
            .with_no_client_auth();
        TlsClient {
            config: Arc::new(config),
            server_name: ServerName::try_from(server_name.to_owned()).expect("server name"),
        }
    }

    fn connection(&self) -> rustls::ClientConnection {
        rustls::ClientConnection::new(Arc::clone(&self.config), self.server_name.clone())
            .expect("a TLS client connection")
    }

    /// The first bytes a client sends in its TLS handshake: a ClientHello record.
    pub fn client_hello(&self) -> Vec<u8> {
        let mut conn = self.connection();
        let mut hello = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut hello).unwrap();
        }
        hello
    }
}

/// Which request and reply headers the client uses after negotiation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Compact requests, simple replies.
    Simple,
    /// Compact requests, structured replies.
    Structured,
    /// 32-byte requests and replies.
    Extended,
}

/// One option reply: `magic(8) option(4) type(4) length(4) data`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptReply {
    pub option: u32,
    pub reply_type: u32,
    pub data: Vec<u8>,
}

impl OptReply {
    pub fn is_error(&self) -> bool {
        rep::is_error(self.reply_type)
    }

    /// Final reply of an option: `ACK` or an error.
    pub fn is_final(&self) -> bool {
        self.reply_type == rep::ACK || self.is_error()
    }

    /// The data as text (error messages).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }
}

/// What `NBD_OPT_GO`/`NBD_OPT_INFO` told about an export.
#[derive(Debug, Clone, Default)]
pub struct ExportInfo {
    pub size: u64,
    pub flags: u16,
    /// `(minimum, preferred, maximum payload)` if the server sent `NBD_INFO_BLOCK_SIZE`.
    pub block_size: Option<(u32, u32, u32)>,
    pub name: Option<String>,
    pub description: Option<String>,
    /// Every reply, in order (the last is the `ACK`).
    pub replies: Vec<OptReply>,
}

/// Option data of `NBD_OPT_GO` / `NBD_OPT_INFO`.
pub fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

/// Option data of `NBD_OPT_{LIST,SET}_META_CONTEXT`.
pub fn meta_data(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(export.len() as u32).to_be_bytes());
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

/// Metadata contexts selected or listed: `(context id, name)`.
pub type Contexts = Vec<(u32, String)>;

/// A request header. In compact form `length` must fit 32 bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub typ: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u64,
}

impl Request {
    pub fn new(typ: u16, cookie: u64, offset: u64, length: u64) -> Request {
        Request {
            flags: 0,
            typ,
            cookie,
            offset,
            length,
        }
    }

    pub fn flags(mut self, flags: u16) -> Request {
        self.flags = flags;
        self
    }

    /// `magic(4) flags(2) type(2) cookie(8) offset(8) length(4)` = 28 bytes.
    pub fn compact(&self) -> Vec<u8> {
        let len = u32::try_from(self.length).expect("compact requests carry 32-bit lengths");
        let mut b = Vec::with_capacity(28);
        b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&self.flags.to_be_bytes());
        b.extend_from_slice(&self.typ.to_be_bytes());
        b.extend_from_slice(&self.cookie.to_be_bytes());
        b.extend_from_slice(&self.offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b
    }

    /// `magic(4) flags(2) type(2) cookie(8) offset(8) length(8)` = 32 bytes.
    pub fn extended(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(32);
        b.extend_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&self.flags.to_be_bytes());
        b.extend_from_slice(&self.typ.to_be_bytes());
        b.extend_from_slice(&self.cookie.to_be_bytes());
        b.extend_from_slice(&self.offset.to_be_bytes());
        b.extend_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// One reply message: a simple reply, a structured chunk or an extended chunk.
#[derive(Clone, PartialEq, Eq)]
pub struct Chunk {
    /// `SIMPLE_REPLY_MAGIC`, `STRUCTURED_REPLY_MAGIC` or `EXTENDED_REPLY_MAGIC`.
    pub magic: u32,
    /// Reply flags (0 for a simple reply).
    pub flags: u16,
    /// Chunk type (0 for a simple reply).
    pub typ: u16,
    pub cookie: u64,
    /// The extended header's offset field (`None` otherwise).
    pub offset: Option<u64>,
    /// A simple reply's error field (0 for chunks).
    pub error: u32,
    /// Chunk payload, or a simple reply's read data.
    pub payload: Vec<u8>,
}

/// The payload of an `ERROR`/`ERROR_OFFSET` chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorChunk {
    pub errno: u32,
    pub message: String,
    pub offset: Option<u64>,
}

/// A `BLOCK_STATUS` or `BLOCK_STATUS_EXT` chunk: context id and `(length, flags)` extents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockStatus {
    pub context: u32,
    pub extents: Vec<(u64, u64)>,
}

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// Shows at most 16 payload bytes, so that failed assertions stay readable.
impl std::fmt::Debug for Chunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.magic {
            SIMPLE_REPLY_MAGIC => "simple",
            STRUCTURED_REPLY_MAGIC => "structured",
            EXTENDED_REPLY_MAGIC => "extended",
            _ => "?",
        };
        let shown = &self.payload[..self.payload.len().min(16)];
        f.debug_struct("Chunk")
            .field("kind", &kind)
            .field("flags", &self.flags)
            .field("typ", &self.typ)
            .field("cookie", &self.cookie)
            .field("offset", &self.offset)
            .field("error", &self.error)
            .field("payload_len", &self.payload.len())
            .field("payload_head", &shown)
            .finish()
    }
}

impl Chunk {
    pub fn is_simple(&self) -> bool {
        self.magic == SIMPLE_REPLY_MAGIC
    }

    pub fn is_extended(&self) -> bool {
        self.magic == EXTENDED_REPLY_MAGIC
    }

    pub fn is_done(&self) -> bool {
        self.is_simple() || self.flags & chunk::FLAG_DONE != 0
    }

    /// An error chunk (type bit 15) or a simple reply with a nonzero error.
    pub fn is_error(&self) -> bool {
        if self.is_simple() {
            self.error != 0
        } else {
            self.typ & 0x8000 != 0
        }
    }

    /// Parses an error chunk's payload (or a simple reply's error).
    pub fn error_info(&self) -> Option<ErrorChunk> {
        if self.is_simple() {
            return (self.error != 0).then(|| ErrorChunk {
                errno: self.error,
                message: String::new(),
                offset: None,
            });
        }
        if !self.is_error() {
            return None;
        }
        let p = &self.payload;
        assert!(
            p.len() >= 6,
            "error chunk payload of {} bytes is too short",
            p.len()
        );
        let errno = be_u32(&p[0..4]);
        let msglen = usize::from(be_u16(&p[4..6]));
        assert!(
            p.len() >= 6 + msglen,
            "error chunk message length {msglen} exceeds the payload"
        );
        let message = String::from_utf8_lossy(&p[6..6 + msglen]).into_owned();
        let rest = &p[6 + msglen..];
        let offset = match self.typ {
            chunk::ERROR_OFFSET => {
                assert_eq!(rest.len(), 8, "ERROR_OFFSET must end with a 64-bit offset");
                Some(be_u64(rest))
            }
            chunk::ERROR => {
                assert!(
                    rest.is_empty(),
                    "ERROR chunk has {} trailing bytes",
                    rest.len()
                );
                None
            }
            _ => None,
        };
        Some(ErrorChunk {
            errno,
            message,
            offset,
        })
    }

    /// `OFFSET_DATA`: the offset and the data.
    pub fn data(&self) -> (u64, &[u8]) {
        assert_eq!(
            self.typ,
            chunk::OFFSET_DATA,
            "not an OFFSET_DATA chunk: {self:?}"
        );
        assert!(
            self.payload.len() > 8,
            "OFFSET_DATA must carry at least one byte"
        );
        (be_u64(&self.payload), &self.payload[8..])
    }

    /// `OFFSET_HOLE`: the offset and the hole size.
    pub fn hole(&self) -> (u64, u32) {
        assert_eq!(
            self.typ,
            chunk::OFFSET_HOLE,
            "not an OFFSET_HOLE chunk: {self:?}"
        );
        assert_eq!(
            self.payload.len(),
            12,
            "OFFSET_HOLE payload must be 12 bytes"
        );
        (be_u64(&self.payload), be_u32(&self.payload[8..]))
    }

    /// `BLOCK_STATUS` (32-bit extents) or `BLOCK_STATUS_EXT` (64-bit extents).
    pub fn block_status(&self) -> BlockStatus {
        let p = &self.payload;
        match self.typ {
            chunk::BLOCK_STATUS => {
                assert!(
                    p.len() >= 12 && (p.len() - 4).is_multiple_of(8),
                    "BLOCK_STATUS payload of {} bytes is malformed",
                    p.len()
                );
                let extents = p[4..]
                    .chunks_exact(8)
                    .map(|d| (u64::from(be_u32(d)), u64::from(be_u32(&d[4..]))))
                    .collect();
                BlockStatus {
                    context: be_u32(p),
                    extents,
                }
            }
            chunk::BLOCK_STATUS_EXT => {
                assert!(
                    p.len() >= 24 && (p.len() - 8).is_multiple_of(16),
                    "BLOCK_STATUS_EXT payload of {} bytes is not 8 + a positive multiple of 16",
                    p.len()
                );
                let count = be_u32(&p[4..]) as usize;
                let extents: Vec<(u64, u64)> = p[8..]
                    .chunks_exact(16)
                    .map(|d| (be_u64(d), be_u64(&d[8..])))
                    .collect();
                assert!(
                    count == 0 || count == extents.len(),
                    "BLOCK_STATUS_EXT descriptor count {count} but {} descriptors",
                    extents.len()
                );
                BlockStatus {
                    context: be_u32(p),
                    extents,
                }
            }
            other => panic!("not a block-status chunk (type {other}): {self:?}"),
        }
    }
}

/// Every message answering one request, in arrival order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub cookie: u64,
    pub chunks: Vec<Chunk>,
}

impl Reply {
    pub fn is_simple(&self) -> bool {
        self.chunks.len() == 1 && self.chunks[0].is_simple()
    }

    /// The error value: a simple reply's error, or the first error chunk's (0 = success).
    pub fn errno(&self) -> u32 {
        self.chunks
            .iter()
            .find_map(Chunk::error_info)
            .map_or(0, |e| e.errno)
    }

    /// The first error chunk, if any.
    pub fn error(&self) -> Option<ErrorChunk> {
        self.chunks.iter().find_map(Chunk::error_info)
    }

    /// Chunks carrying read data (`OFFSET_DATA`, `OFFSET_HOLE`).
    pub fn content_chunks(&self) -> Vec<&Chunk> {
        self.chunks
            .iter()
            .filter(|c| {
                !c.is_simple() && (c.typ == chunk::OFFSET_DATA || c.typ == chunk::OFFSET_HOLE)
            })
            .collect()
    }

    /// Reassembles the data of a successful read of `[offset, offset + len)`, checking
    /// the spec's rules: chunks within the request, non-overlapping, covering it all.
    pub fn read_data(&self, offset: u64, len: u64) -> Vec<u8> {
        assert_eq!(self.errno(), 0, "read failed: {:?}", self.error());
        if self.is_simple() {
            assert_eq!(
                self.chunks[0].payload.len() as u64,
                len,
                "simple read data length"
            );
            return self.chunks[0].payload.clone();
        }
        let mut out = vec![0u8; len as usize];
        let mut covered = vec![false; len as usize];
        for c in self.content_chunks() {
            let (at, n, data) = if c.typ == chunk::OFFSET_DATA {
                let (at, d) = c.data();
                (at, d.len() as u64, Some(d))
            } else {
                let (at, n) = c.hole();
                assert!(n > 0, "OFFSET_HOLE of size 0");
                (at, u64::from(n), None)
            };
            assert!(
                at >= offset && at + n <= offset + len,
                "chunk [{at}, {}) outside the request [{offset}, {})",
                at + n,
                offset + len
            );
            let start = (at - offset) as usize;
            let end = start + n as usize;
            assert!(
                covered[start..end].iter().all(|c| !c),
                "chunks overlap at {at}"
            );
            covered[start..end].iter_mut().for_each(|c| *c = true);
            if let Some(d) = data {
                out[start..end].copy_from_slice(d);
            }
        }
        assert!(
            covered.iter().all(|c| *c),
            "the read reply does not cover the whole request"
        );
        out
    }
}

/// A blocking raw NBD client.
#[derive(Debug)]
pub struct Client {
    pub stream: Stream,
    /// How [`Client::start`] enters TLS (`None`: the client stays in clear).
    tls: Option<TlsClient>,
    pub mode: Mode,
    /// Handshake flags of the greeting (set by [`Client::greeting`]).
    pub handshake_flags: u16,
    /// Data length of READs sent in simple mode, by cookie: a simple reply does not
    /// say how much data follows.
    simple_reads: HashMap<u64, u64>,
    /// Chunks of replies not finished yet, by cookie.
    partial: HashMap<u64, Vec<Chunk>>,
    next_cookie: u64,
}

impl Client {
    fn from_socket(socket: Socket) -> io::Result<Client> {
        let stream = Stream::new(socket);
        stream.set_read_timeout(Some(DEFAULT_TIMEOUT))?;
        stream.set_write_timeout(Some(DEFAULT_TIMEOUT))?;
        Ok(Client {
            stream,
            tls: None,
            mode: Mode::Simple,
            handshake_flags: 0,
            simple_reads: HashMap::new(),
            partial: HashMap::new(),
            next_cookie: 1,
        })
    }

    /// Connects to a unix socket; reads nothing yet.
    pub fn unix(path: &Path) -> io::Result<Client> {
        Client::from_socket(Socket::Unix(UnixStream::connect(path)?))
    }

    /// Connects over TCP; reads nothing yet.
    pub fn tcp(addr: &str) -> io::Result<Client> {
        let s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        Client::from_socket(Socket::Tcp(s))
    }

    /// Reads and checks the 18-byte greeting; returns the handshake flags.
    pub fn greeting(&mut self) -> io::Result<u16> {
        let g = self.read_vec(18)?;
        if be_u64(&g) != NBDMAGIC {
            return Err(invalid(format!(
                "greeting starts with {:#x}, not NBDMAGIC",
                be_u64(&g)
            )));
        }
        if be_u64(&g[8..]) != IHAVEOPT {
            return Err(invalid(format!(
                "greeting has {:#x}, not IHAVEOPT",
                be_u64(&g[8..])
            )));
        }
        self.handshake_flags = be_u16(&g[16..]);
        Ok(self.handshake_flags)
    }

    pub fn send_client_flags(&mut self, flags: u32) -> io::Result<()> {
        self.write_raw(&flags.to_be_bytes())
    }

    /// This client enters TLS in [`Client::start`] and [`Client::enter_tls`].
    pub fn with_tls(mut self, tls: TlsClient) -> Client {
        self.tls = Some(tls);
        self
    }

    /// Greeting plus client flags `FIXED_NEWSTYLE | NO_ZEROES`, then, for a client made
    /// [`Client::with_tls`], STARTTLS and the TLS handshake: ready for options.
    pub fn start(&mut self) -> io::Result<()> {
        self.start_in_clear()?;
        self.enter_tls()?.map_err(|r| {
            invalid(format!(
                "NBD_OPT_STARTTLS refused: {:#x} {}",
                r.reply_type,
                r.text()
            ))
        })
    }

    /// Greeting plus client flags `FIXED_NEWSTYLE | NO_ZEROES`, staying in clear.
    pub fn start_in_clear(&mut self) -> io::Result<()> {
        self.greeting()?;
        self.send_client_flags(C_FIXED_NEWSTYLE | C_NO_ZEROES)
    }

    /// For a client made [`Client::with_tls`]: [`Client::starttls`]. A client in clear
    /// does nothing and stays in clear.
    pub fn enter_tls(&mut self) -> io::Result<Result<(), OptReply>> {
        match self.tls.clone() {
            Some(tls) => self.starttls(&tls),
            None => Ok(Ok(())),
        }
    }

    /// `NBD_OPT_STARTTLS`; on its ACK, the TLS handshake as `tls`'s client, after which
    /// everything goes inside TLS. A refusal is returned as it came.
    pub fn starttls(&mut self, tls: &TlsClient) -> io::Result<Result<(), OptReply>> {
        let r = self.option_final(opt::STARTTLS, &[])?;
        if r.reply_type != rep::ACK {
            return Ok(Err(r));
        }
        self.stream.enter_tls(tls)?;
        Ok(Ok(()))
    }

    pub fn write_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)?;
        self.stream.flush()
    }

    pub fn read_vec(&mut self, n: usize) -> io::Result<Vec<u8>> {
        let mut v = vec![0u8; n];
        self.stream.read_exact(&mut v)?;
        Ok(v)
    }

    pub fn set_timeout(&self, t: Duration) -> io::Result<()> {
        self.stream.set_read_timeout(Some(t))
    }

    /// An option header with any magic and any (possibly lying) length, no data.
    pub fn send_option_header_with_magic(
        &mut self,
        magic: u64,
        option: u32,
        length: u32,
    ) -> io::Result<()> {
        let mut b = Vec::with_capacity(16);
        b.extend_from_slice(&magic.to_be_bytes());
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&length.to_be_bytes());
        self.write_raw(&b)
    }

    /// An option header announcing `length` bytes of data (which the caller then sends, or not).
    pub fn send_option_header(&mut self, option: u32, length: u32) -> io::Result<()> {
        self.send_option_header_with_magic(IHAVEOPT, option, length)
    }

    /// An option with its data (the header's length is the data's).
    pub fn send_option(&mut self, option: u32, data: &[u8]) -> io::Result<()> {
        let mut b = Vec::with_capacity(16 + data.len());
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.write_raw(&b)
    }

    pub fn read_option_reply(&mut self) -> io::Result<OptReply> {
        let h = self.read_vec(20)?;
        if be_u64(&h) != OPTION_REPLY_MAGIC {
            return Err(invalid(format!("option reply magic {:#x}", be_u64(&h))));
        }
        let len = be_u32(&h[16..]);
        if u64::from(len) > MAX_REPLY_PAYLOAD {
            return Err(invalid(format!("option reply of {len} bytes")));
        }
        Ok(OptReply {
            option: be_u32(&h[8..]),
            reply_type: be_u32(&h[12..]),
            data: self.read_vec(len as usize)?,
        })
    }

    /// Reads replies to `option` up to and including the final one (ACK or error);
    /// every reply must echo the option.
    pub fn option_replies(&mut self, option: u32) -> io::Result<Vec<OptReply>> {
        let mut v = Vec::new();
        loop {
            let r = self.read_option_reply()?;
            if r.option != option {
                return Err(invalid(format!(
                    "reply to option {} while waiting for {option}: {r:?}",
                    r.option
                )));
            }
            let last = r.is_final();
            v.push(r);
            if last {
                return Ok(v);
            }
        }
    }

    /// Sends an option and reads its replies.
    pub fn option(&mut self, option: u32, data: &[u8]) -> io::Result<Vec<OptReply>> {
        self.send_option(option, data)?;
        self.option_replies(option)
    }

    /// Sends an option and returns its final reply, checking there is exactly one reply.
    pub fn option_final(&mut self, option: u32, data: &[u8]) -> io::Result<OptReply> {
        let mut v = self.option(option, data)?;
        if v.len() != 1 {
            return Err(invalid(format!(
                "expected one reply to option {option}, got {v:?}"
            )));
        }
        Ok(v.pop().unwrap())
    }

    /// `NBD_OPT_STRUCTURED_REPLY`; on ACK the client switches to structured replies.
    pub fn structured_reply(&mut self) -> io::Result<OptReply> {
        let r = self.option_final(opt::STRUCTURED_REPLY, &[])?;
        if r.reply_type == rep::ACK {
            self.mode = Mode::Structured;
        }
        Ok(r)
    }

    /// `NBD_OPT_EXTENDED_HEADERS`; on ACK the client switches to extended headers.
    pub fn extended_headers(&mut self) -> io::Result<OptReply> {
        let r = self.option_final(opt::EXTENDED_HEADERS, &[])?;
        if r.reply_type == rep::ACK {
            self.mode = Mode::Extended;
        }
        Ok(r)
    }

    /// `NBD_OPT_SET_META_CONTEXT`: `Ok((id, name))` pairs on success, or the error reply.
    pub fn set_meta_context(
        &mut self,
        export: &str,
        queries: &[&str],
    ) -> io::Result<Result<Contexts, OptReply>> {
        self.meta_context(opt::SET_META_CONTEXT, export, queries)
    }

    pub fn list_meta_context(
        &mut self,
        export: &str,
        queries: &[&str],
    ) -> io::Result<Result<Contexts, OptReply>> {
        self.meta_context(opt::LIST_META_CONTEXT, export, queries)
    }

    fn meta_context(
        &mut self,
        option: u32,
        export: &str,
        queries: &[&str],
    ) -> io::Result<Result<Contexts, OptReply>> {
        let mut replies = self.option(option, &meta_data(export, queries))?;
        let last = replies.pop().unwrap();
        if last.is_error() {
            return Ok(Err(last));
        }
        let mut out = Vec::new();
        for r in replies {
            if r.reply_type != rep::META_CONTEXT || r.data.len() < 4 {
                return Err(invalid(format!(
                    "unexpected reply to a meta-context option: {r:?}"
                )));
            }
            out.push((
                be_u32(&r.data),
                String::from_utf8_lossy(&r.data[4..]).into_owned(),
            ));
        }
        Ok(Ok(out))
    }

    /// `NBD_OPT_GO`: on success the client is in transmission.
    pub fn go(&mut self, name: &str, infos: &[u16]) -> io::Result<Result<ExportInfo, OptReply>> {
        self.info_or_go(opt::GO, name, infos)
    }

    /// `NBD_OPT_INFO`.
    pub fn info(&mut self, name: &str, infos: &[u16]) -> io::Result<Result<ExportInfo, OptReply>> {
        self.info_or_go(opt::INFO, name, infos)
    }

    fn info_or_go(
        &mut self,
        option: u32,
        name: &str,
        infos: &[u16],
    ) -> io::Result<Result<ExportInfo, OptReply>> {
        let replies = self.option(option, &go_data(name, infos))?;
        let last = replies.last().unwrap();
        if last.is_error() {
            return Ok(Err(last.clone()));
        }
        let mut e = ExportInfo::default();
        let mut saw_export = false;
        for r in &replies[..replies.len() - 1] {
            if r.reply_type != rep::INFO || r.data.len() < 2 {
                return Err(invalid(format!("unexpected reply to GO/INFO: {r:?}")));
            }
            let d = &r.data[2..];
            match be_u16(&r.data) {
                info::EXPORT => {
                    if d.len() != 10 {
                        return Err(invalid(format!(
                            "NBD_INFO_EXPORT of {} bytes",
                            r.data.len()
                        )));
                    }
                    e.size = be_u64(d);
                    e.flags = be_u16(&d[8..]);
                    saw_export = true;
                }
                info::BLOCK_SIZE => {
                    if d.len() != 12 {
                        return Err(invalid(format!(
                            "NBD_INFO_BLOCK_SIZE of {} bytes",
                            r.data.len()
                        )));
                    }
                    e.block_size = Some((be_u32(d), be_u32(&d[4..]), be_u32(&d[8..])));
                }
                info::NAME => e.name = Some(String::from_utf8_lossy(d).into_owned()),
                info::DESCRIPTION => e.description = Some(String::from_utf8_lossy(d).into_owned()),
                _ => {}
            }
        }
        if !saw_export {
            return Err(invalid("GO/INFO succeeded without NBD_INFO_EXPORT"));
        }
        e.replies = replies;
        Ok(Ok(e))
    }

    /// `NBD_OPT_EXPORT_NAME`: sends it and reads the 10-byte `size, flags` answer
    /// (the caller reads the 124 zero bytes, if it expects them).
    pub fn export_name(&mut self, name: &str) -> io::Result<(u64, u16)> {
        self.send_option(opt::EXPORT_NAME, name.as_bytes())?;
        let a = self.read_vec(10)?;
        Ok((be_u64(&a), be_u16(&a[8..])))
    }

    /// A fresh cookie.
    pub fn cookie(&mut self) -> u64 {
        let c = self.next_cookie;
        self.next_cookie += 1;
        c
    }

    /// Sends a request in the negotiated header form, followed by `payload`.
    pub fn send(&mut self, req: &Request, payload: &[u8]) -> io::Result<()> {
        if self.mode == Mode::Extended {
            self.send_extended(req, payload)
        } else {
            self.send_compact(req, payload)
        }
    }

    /// Sends a 28-byte request header whatever was negotiated.
    pub fn send_compact(&mut self, req: &Request, payload: &[u8]) -> io::Result<()> {
        self.note_simple_read(req);
        let mut b = req.compact();
        b.extend_from_slice(payload);
        self.write_raw(&b)
    }

    /// Sends a 32-byte request header whatever was negotiated.
    pub fn send_extended(&mut self, req: &Request, payload: &[u8]) -> io::Result<()> {
        self.note_simple_read(req);
        let mut b = req.extended();
        b.extend_from_slice(payload);
        self.write_raw(&b)
    }

    /// Builds several requests (headers and payloads) into one buffer, for pipelining.
    pub fn encode(&mut self, req: &Request, payload: &[u8], into: &mut Vec<u8>) {
        self.note_simple_read(req);
        if self.mode == Mode::Extended {
            into.extend_from_slice(&req.extended());
        } else {
            into.extend_from_slice(&req.compact());
        }
        into.extend_from_slice(payload);
    }

    fn note_simple_read(&mut self, req: &Request) {
        if self.mode == Mode::Simple && req.typ == cmd::READ {
            self.simple_reads.insert(req.cookie, req.length);
        }
    }

    /// Reads one reply message (a simple reply with its data, or one chunk).
    pub fn read_message(&mut self) -> io::Result<Chunk> {
        let magic = be_u32(&self.read_vec(4)?);
        match magic {
            SIMPLE_REPLY_MAGIC => {
                let h = self.read_vec(12)?;
                let error = be_u32(&h);
                let cookie = be_u64(&h[4..]);
                let len = self.simple_reads.remove(&cookie).unwrap_or(0);
                let payload = if error == 0 && len > 0 {
                    self.read_vec(len as usize)?
                } else {
                    Vec::new()
                };
                Ok(Chunk {
                    magic,
                    flags: 0,
                    typ: 0,
                    cookie,
                    offset: None,
                    error,
                    payload,
                })
            }
            STRUCTURED_REPLY_MAGIC => {
                let h = self.read_vec(16)?;
                let len = be_u32(&h[12..]);
                if u64::from(len) > MAX_REPLY_PAYLOAD {
                    return Err(invalid(format!("structured chunk of {len} bytes")));
                }
                Ok(Chunk {
                    magic,
                    flags: be_u16(&h),
                    typ: be_u16(&h[2..]),
                    cookie: be_u64(&h[4..]),
                    offset: None,
                    error: 0,
                    payload: self.read_vec(len as usize)?,
                })
            }
            EXTENDED_REPLY_MAGIC => {
                let h = self.read_vec(28)?;
                let len = be_u64(&h[20..]);
                if len > MAX_REPLY_PAYLOAD {
                    return Err(invalid(format!("extended chunk of {len} bytes")));
                }
                Ok(Chunk {
                    magic,
                    flags: be_u16(&h),
                    typ: be_u16(&h[2..]),
                    cookie: be_u64(&h[4..]),
                    offset: Some(be_u64(&h[12..])),
                    error: 0,
                    payload: self.read_vec(len as usize)?,
                })
            }
            other => Err(invalid(format!("unknown reply magic {other:#x}"))),
        }
    }

    /// Reads messages until one request's reply is complete (a simple reply, or a
    /// chunk with `DONE`); chunks of other requests are kept for later calls.
    pub fn read_reply(&mut self) -> io::Result<Reply> {
        loop {
            let c = self.read_message()?;
            let cookie = c.cookie;
            if c.is_simple() {
                if self.partial.contains_key(&cookie) {
                    return Err(invalid(format!(
                        "simple reply for cookie {cookie} after chunks"
                    )));
                }
                return Ok(Reply {
                    cookie,
                    chunks: vec![c],
                });
            }
            let done = c.is_done();
            self.partial.entry(cookie).or_default().push(c);
            if done {
                let chunks = self.partial.remove(&cookie).unwrap();
                return Ok(Reply { cookie, chunks });
            }
        }
    }

    /// Sends one request and reads its reply (which must carry its cookie).
    pub fn request(&mut self, req: &Request, payload: &[u8]) -> io::Result<Reply> {
        self.send(req, payload)?;
        let r = self.read_reply()?;
        if r.cookie != req.cookie {
            return Err(invalid(format!(
                "reply for cookie {} to request {}",
                r.cookie, req.cookie
            )));
        }
        Ok(r)
    }

    /// READ `[offset, offset + len)`.
    pub fn read(&mut self, offset: u64, len: u64) -> io::Result<Reply> {
        let c = self.cookie();
        self.request(&Request::new(cmd::READ, c, offset, len), &[])
    }

    /// WRITE `data` at `offset` (with `PAYLOAD_LEN` under extended headers, as required).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<Reply> {
        let c = self.cookie();
        let flags = if self.mode == Mode::Extended {
            cflag::PAYLOAD_LEN
        } else {
            0
        };
        self.request(
            &Request::new(cmd::WRITE, c, offset, data.len() as u64).flags(flags),
            data,
        )
    }

    pub fn flush(&mut self) -> io::Result<Reply> {
        let c = self.cookie();
        self.request(&Request::new(cmd::FLUSH, c, 0, 0), &[])
    }

    /// Sends `NBD_CMD_DISC` (there is no reply).
    pub fn disconnect(&mut self) -> io::Result<()> {
        let c = self.cookie();
        self.send(&Request::new(cmd::DISC, c, 0, 0), &[])
    }

    /// Waits up to `timeout` for the server to close the connection. Returns the bytes
    /// received before the close (inside TLS: the plaintext; a close without
    /// close_notify is a close too), or `None` if the connection is still open.
    pub fn wait_closed(&mut self, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.stream.set_read_timeout(Some(left)).ok()?;
            match self.stream.read(&mut buf) {
                Ok(0) => return Some(got),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
                    ) =>
                {
                    return Some(got);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Some(got),
            }
        }
    }
}

/// Connects over a unix socket and negotiates: optional structured replies, extended
/// headers and meta contexts (for export ""), then GO (asking for block sizes).
pub fn negotiate(
    mut c: Client,
    mode: Mode,
    contexts: &[&str],
) -> io::Result<(Client, ExportInfo, Contexts)> {
    c.start()?;
    let fail = |what: &str, r: &OptReply| invalid(format!("{what} refused: {r:?} {}", r.text()));
    match mode {
        Mode::Simple => {}
        Mode::Structured => {
            let r = c.structured_reply()?;
            if r.reply_type != rep::ACK {
                return Err(fail("STRUCTURED_REPLY", &r));
            }
        }
        Mode::Extended => {
            let r = c.extended_headers()?;
            if r.reply_type != rep::ACK {
                return Err(fail("EXTENDED_HEADERS", &r));
            }
        }
    }
    let mut ids = Vec::new();
    if !contexts.is_empty() {
        ids = c
            .set_meta_context("", contexts)?
            .map_err(|r| fail("SET_META_CONTEXT", &r))?;
    }
    let e = c.go("", &[info::BLOCK_SIZE])?.map_err(|r| fail("GO", &r))?;
    Ok((c, e, ids))
}
