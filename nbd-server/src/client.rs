//! The client half of NBD: reads a template that lives behind another NBD server.
//!
//! Thinline serves templates from files, HTTP, S3 … and from other NBD servers
//! (`nbd://host[:port]/export`, `nbd+unix:///export?socket=PATH`), and the copy-on-read
//! proxy reads its upstream over NBD as well. This module is that client: the URI
//! syntax of NetworkBlockDevice `doc/uri.md`, the fixed-newstyle handshake
//! (`NBD_OPT_STRUCTURED_REPLY`, `NBD_OPT_SET_META_CONTEXT "base:allocation"`,
//! `NBD_OPT_GO` with `NBD_INFO_BLOCK_SIZE`, `NBD_OPT_EXPORT_NAME` if `GO` is unknown),
//! and read-only transmission with many requests in flight on one connection.
//!
//! ```text
//!   Client::read ─┐                        ┌─► writer task ─► socket (request headers, batched)
//!   Client::read ─┼─► cookie + oneshot ────┤
//!   block_status ─┘   in the pending map   └─◄ reader task ◄─ socket (replies, any order)
//!                                                  │ routes each reply by cookie,
//!                                                  └ assembles chunks, validates everything
//! ```
//!
//! Everything the server sends is checked: magics, cookies, chunk types, lengths,
//! offsets, overlap and coverage of read chunks, extents. A server that breaks the
//! protocol loses the connection (the request it was answering fails with
//! [`Error::NbdProtocol`], the others with [`Error::NbdConnectionLost`]); nothing the
//! server sends can make the client panic, allocate more than the request asked for,
//! or wait forever once the connection is gone. A request that gets no reply within
//! [`ClientOptions::request_timeout`] abandons the connection, since a server that
//! stopped answering one request cannot be trusted with the others.
//!
//! Not supported: TLS (`nbds://` is refused), oldstyle negotiation, extended headers,
//! writes (the client is read-only by design), abstract unix sockets.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::proto::{
    self, BASE_ALLOCATION, IHAVEOPT, MAX_STRING_LEN, NBDMAGIC, OPTION_REPLY_MAGIC, ReplyMode,
    RequestHeader, client_flags, cmd, errno, handshake_flags, info, opt, rep, reply, tflags,
};
use crate::{Error, Result};

/// The IANA port of NBD, used when a `nbd://` URI names none.
pub const DEFAULT_PORT: u16 = 10809;

/// The greeting magic of the oldstyle handshake (refused).
const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;

/// Largest option reply the client accepts (INFO items, contexts and messages are far smaller).
const MAX_OPTION_REPLY: u32 = 64 * 1024;

/// Most extents accepted in one `NBD_REPLY_TYPE_BLOCK_STATUS` chunk (the spec's SHOULD limit).
const MAX_EXTENTS: u32 = 1 << 20;

/// Largest message accepted in an error chunk (the spec's string limit).
const MAX_ERROR_MESSAGE: u32 = MAX_STRING_LEN as u32;

/// Default cap on one request's payload when the server advertises nothing smaller.
pub const DEFAULT_MAX_REQUEST: u32 = 32 << 20;

/// How long `disconnect` waits for the server to finish requests in flight and close.
const DISCONNECT_GRACE: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------
// URIs
// ---------------------------------------------------------------------------------------

/// How to reach an NBD server.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Transport {
    /// TCP to `host:port` (`host` is an IPv6 literal without brackets, an IPv4 literal
    /// or a name).
    Tcp {
        /// Host name or address.
        host: String,
        /// Port.
        port: u16,
    },
    /// A unix socket at a path.
    Unix {
        /// The socket's path.
        socket: PathBuf,
    },
}

/// A parsed `nbd://host[:port]/export` or `nbd+unix:///export?socket=PATH` URI
/// (NetworkBlockDevice `doc/uri.md`).
///
/// User info and query parameters other than `socket` are accepted and dropped: the
/// [`Display`](fmt::Display) form shows only the transport and the export, so it can go
/// into logs and error messages.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NbdUri {
    /// Where the server is.
    pub transport: Transport,
    /// The export name, percent-decoded (`""` is the server's default export).
    pub export: String,
}

impl NbdUri {
    /// Parses an NBD URI. `nbds://` and `nbds+unix://` are refused (no TLS), as are
    /// other transports (`nbd+vsock://`, `nbd+ssh://`).
    pub fn parse(text: &str) -> Result<NbdUri> {
        let fail = |reason: String| Error::NbdUri {
            uri: redact(text),
            reason,
        };
        let Some((scheme, rest)) = text.split_once("://") else {
            return Err(fail(
                "expected nbd://host[:port]/export or nbd+unix:///export?socket=PATH".into(),
            ));
        };
        let unix = match scheme.to_ascii_lowercase().as_str() {
            "nbd" | "nbd+tcp" => false,
            "nbd+unix" => true,
            "nbds" | "nbds+unix" | "nbds+tcp" | "nbds+vsock" => {
                return Err(fail(format!(
                    "TLS is not supported: {scheme}:// requires TLS; use nbd:// or nbd+unix://"
                )));
            }
            s if s.starts_with("nbd") => {
                return Err(fail(format!(
                    "the {scheme}:// transport is not supported (only nbd:// and nbd+unix://)"
                )));
            }
            _ => return Err(fail(format!("{scheme}:// is not an NBD URI"))),
        };
        // Fragment, then query, then authority and path.
        let rest = rest.split_once('#').map_or(rest, |(r, _)| r);
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        // User info (`user@`) means nothing without TLS or ssh: drop it.
        let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        let export = percent_decode(path.strip_prefix('/').unwrap_or(path))
            .ok_or_else(|| fail("the export name is not valid percent-encoded UTF-8".into()))?;
        if export.len() > MAX_STRING_LEN {
            return Err(fail(format!(
                "the export name is {} bytes, longer than {MAX_STRING_LEN}",
                export.len()
            )));
        }
        let mut socket = None;
        for param in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = param.split_once('=').unwrap_or((param, ""));
            if key == "socket" {
                let value = percent_decode(value).ok_or_else(|| {
                    fail("the socket path is not valid percent-encoded UTF-8".into())
                })?;
                socket = Some(value);
            }
            // Anything else (tls-*, …) is ignored, as libnbd ignores unknown parameters.
        }
        let transport = if unix {
            if !authority.is_empty() {
                return Err(fail(
                    "nbd+unix:// URIs name no host: use nbd+unix:///export?socket=PATH".into(),
                ));
            }
            let socket = socket.filter(|s| !s.is_empty()).ok_or_else(|| {
                fail("nbd+unix:// needs the socket path: nbd+unix:///export?socket=PATH".into())
            })?;
            if socket.starts_with('\0') {
                return Err(fail("abstract unix sockets are not supported".into()));
            }
            if socket.contains('\0') {
                return Err(fail("the socket path contains a NUL byte".into()));
            }
            Transport::Unix {
                socket: PathBuf::from(socket),
            }
        } else {
            if socket.is_some() {
                return Err(fail(
                    "socket= is only valid with nbd+unix:// (nbd:// is TCP)".into(),
                ));
            }
            let (host, port) = split_host_port(authority).map_err(fail)?;
            Transport::Tcp { host, port }
        };
        Ok(NbdUri { transport, export })
    }

    /// The server, for messages: `host:port` (`[v6]:port`) or the socket path.
    pub fn server(&self) -> String {
        match &self.transport {
            Transport::Tcp { host, port } if host.contains(':') => format!("[{host}]:{port}"),
            Transport::Tcp { host, port } => format!("{host}:{port}"),
            Transport::Unix { socket } => socket.display().to_string(),
        }
    }
}

impl FromStr for NbdUri {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        NbdUri::parse(s)
    }
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let export = percent_encode(&self.export, b"/:@!$'()*+,;=");
        match &self.transport {
            Transport::Tcp { .. } => write!(f, "nbd://{}/{export}", self.server()),
            Transport::Unix { socket } => {
                let socket = percent_encode(&socket.to_string_lossy(), b"/:@!$'()*+,;");
                write!(f, "nbd+unix:///{export}?socket={socket}")
            }
        }
    }
}

fn split_host_port(authority: &str) -> std::result::Result<(String, u16), String> {
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| "an IPv6 address lacks its closing ']'".to_owned())?;
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("[{host}] is not an IPv6 address"));
        }
        match after {
            "" => (host, None),
            p => match p.strip_prefix(':') {
                Some(p) => (host, Some(p)),
                None => return Err(format!("unexpected {p:?} after the IPv6 address")),
            },
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err("nbd:// needs a host: nbd://host[:port]/export".into());
    }
    if !authority.starts_with('[') && host.contains(':') {
        return Err("IPv6 addresses must be in brackets: nbd://[::1]/export".into());
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => n,
            _ => return Err(format!("invalid port {p:?}")),
        },
    };
    Ok((host.to_owned(), port))
}

fn percent_decode(s: &str) -> Option<String> {
    thinline_format::storage::percent_decode(s)
}

fn percent_encode(s: &str, keep: &[u8]) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || keep.contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A URI for messages about a URI that did not parse: scheme, host and path only
/// (no user info, query or fragment).
fn redact(text: &str) -> String {
    let text = text.split(['?', '#']).next().unwrap_or("");
    match text.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = match rest.find('/') {
                Some(i) => rest.split_at(i),
                None => (rest, ""),
            };
            let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            format!("{scheme}://{host}{path}")
        }
        None => text.to_owned(),
    }
}

// ---------------------------------------------------------------------------------------
// Options and export information
// ---------------------------------------------------------------------------------------

/// Settings of one client connection.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Limit for connecting plus the whole handshake.
    pub connect_timeout: Duration,
    /// A request without its complete reply by then fails and abandons the connection
    /// (all other requests on it fail too). `None` waits for as long as the connection
    /// stays up.
    pub request_timeout: Option<Duration>,
    /// Ask for structured replies (sparse reads, error messages, block status).
    pub structured_replies: bool,
    /// Ask for the `base:allocation` metadata context (needs structured replies).
    pub block_status: bool,
    /// Largest payload of one request; reads are split further if the server's maximum
    /// is smaller.
    pub max_request: u32,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_timeout: Duration::from_secs(10),
            request_timeout: None,
            structured_replies: true,
            block_status: true,
            max_request: DEFAULT_MAX_REQUEST,
        }
    }
}

/// Block size constraints (`NBD_INFO_BLOCK_SIZE`), or the spec's defaults when the
/// server advertised none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    /// Requests are aligned to this (a power of two, ≤ 64 KiB).
    pub minimum: u32,
    /// The server prefers requests of this size.
    pub preferred: u32,
    /// The largest payload of one request.
    pub maximum: u32,
}

impl Default for BlockSizes {
    fn default() -> Self {
        BlockSizes {
            minimum: 1,
            preferred: 4096,
            maximum: DEFAULT_MAX_REQUEST,
        }
    }
}

/// What the handshake established.
#[derive(Debug, Clone)]
struct Negotiated {
    size: u64,
    flags: u16,
    block_sizes: Option<BlockSizes>,
    structured: bool,
    base_allocation: Option<u32>,
}

/// Names a server and export in errors.
#[derive(Debug, Clone)]
struct Peer {
    server: String,
    export: String,
}

impl Peer {
    fn handshake(&self, reason: impl Into<String>) -> Error {
        Error::NbdHandshake {
            server: self.server.clone(),
            export: self.export.clone(),
            reason: reason.into(),
        }
    }

    fn lost(&self, reason: impl Into<String>) -> Error {
        Error::NbdConnectionLost {
            server: self.server.clone(),
            export: self.export.clone(),
            reason: reason.into(),
        }
    }

    fn protocol(&self, reason: impl Into<String>) -> Error {
        Error::NbdProtocol {
            server: self.server.clone(),
            export: self.export.clone(),
            reason: reason.into(),
        }
    }

    fn invalid(&self, op: &'static str, offset: u64, length: u64, reason: String) -> Error {
        Error::NbdInvalidRequest {
            server: self.server.clone(),
            export: self.export.clone(),
            op,
            offset,
            length,
            reason,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------------------

/// Turns a handshake read/write failure into an error that says what was going on.
/// The connection broke rather than the protocol: [`Error::NbdConnectionLost`].
fn hs_io(peer: &Peer, during: &str, e: &std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        peer.lost(format!(
            "the server closed the connection during the handshake ({during})"
        ))
    } else {
        peer.lost(format!("handshake failed during {during}: {e}"))
    }
}

struct OptionReply {
    kind: u32,
    data: Vec<u8>,
}

async fn send_option<W: AsyncWrite + Unpin>(
    w: &mut W,
    peer: &Peer,
    option: u32,
    data: &[u8],
) -> Result<()> {
    let mut buf = Vec::with_capacity(16 + data.len());
    buf.extend_from_slice(&IHAVEOPT.to_be_bytes());
    buf.extend_from_slice(&option.to_be_bytes());
    let len = u32::try_from(data.len()).map_err(|_| peer.handshake("option data too long"))?;
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(data);
    let during = format!("sending {}", proto::option_name(option));
    w.write_all(&buf)
        .await
        .map_err(|e| hs_io(peer, &during, &e))?;
    w.flush().await.map_err(|e| hs_io(peer, &during, &e))
}

async fn read_option_reply<R: AsyncRead + Unpin>(
    r: &mut R,
    peer: &Peer,
    option: u32,
) -> Result<OptionReply> {
    let during = format!("the reply to {}", proto::option_name(option));
    let mut head = [0u8; 20];
    r.read_exact(&mut head)
        .await
        .map_err(|e| hs_io(peer, &during, &e))?;
    let magic = u64::from_be_bytes(head[0..8].try_into().expect("8 bytes"));
    let echoed = u32::from_be_bytes(head[8..12].try_into().expect("4 bytes"));
    let kind = u32::from_be_bytes(head[12..16].try_into().expect("4 bytes"));
    let len = u32::from_be_bytes(head[16..20].try_into().expect("4 bytes"));
    if magic != OPTION_REPLY_MAGIC {
        return Err(peer.handshake(format!("bad option reply magic {magic:#018x} in {during}")));
    }
    if echoed != option {
        return Err(peer.handshake(format!(
            "{during} names {} instead",
            proto::option_name(echoed)
        )));
    }
    if len > MAX_OPTION_REPLY {
        return Err(peer.handshake(format!(
            "{during} carries {len} bytes (more than {MAX_OPTION_REPLY})"
        )));
    }
    let mut data = vec![0u8; len as usize];
    r.read_exact(&mut data)
        .await
        .map_err(|e| hs_io(peer, &during, &e))?;
    Ok(OptionReply { kind, data })
}

fn is_error_reply(kind: u32) -> bool {
    kind & (1 << 31) != 0
}

/// Name of an option reply type, for messages.
fn reply_name(kind: u32) -> String {
    let name = match kind {
        rep::ACK => "NBD_REP_ACK",
        rep::SERVER => "NBD_REP_SERVER",
        rep::INFO => "NBD_REP_INFO",
        rep::META_CONTEXT => "NBD_REP_META_CONTEXT",
        rep::ERR_UNSUP => "NBD_REP_ERR_UNSUP",
        rep::ERR_POLICY => "NBD_REP_ERR_POLICY",
        rep::ERR_INVALID => "NBD_REP_ERR_INVALID",
        rep::ERR_PLATFORM => "NBD_REP_ERR_PLATFORM",
        rep::ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD",
        rep::ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN",
        rep::ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN",
        rep::ERR_BLOCK_SIZE_REQD => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        rep::ERR_TOO_BIG => "NBD_REP_ERR_TOO_BIG",
        rep::ERR_EXT_HEADER_REQD => "NBD_REP_ERR_EXT_HEADER_REQD",
        k if is_error_reply(k) => return format!("error reply {k:#x}"),
        k => return format!("reply type {k}"),
    };
    name.to_owned()
}

/// Server text made safe for logs: lossy UTF-8, control characters escaped, bounded.
fn sanitize(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::new();
    for (i, c) in text.trim_end().chars().enumerate() {
        if i == 512 {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

fn refused(peer: &Peer, option: u32, reply: &OptionReply) -> Error {
    let message = if reply.data.is_empty() {
        "(no message)".to_owned()
    } else {
        sanitize(&reply.data)
    };
    Error::NbdOptionRefused {
        server: peer.server.clone(),
        export: peer.export.clone(),
        option: proto::option_name(option),
        reply: reply_name(reply.kind),
        code: reply.kind,
        message,
    }
}

fn put_string(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u32).to_be_bytes());
    buf.extend_from_slice(s.as_bytes());
}

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

fn valid_block_sizes(b: BlockSizes) -> bool {
    b.minimum.is_power_of_two()
        && b.minimum <= 64 * 1024
        && b.preferred.is_power_of_two()
        && b.preferred >= b.minimum
        && b.maximum >= b.minimum
}

async fn handshake<R, W>(
    r: &mut R,
    w: &mut W,
    peer: &Peer,
    options: &ClientOptions,
) -> Result<Negotiated>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let export = peer.export.as_str();
    if export.len() > MAX_STRING_LEN {
        return Err(peer.handshake(format!(
            "the export name is longer than {MAX_STRING_LEN} bytes"
        )));
    }
    let mut greeting = [0u8; 18];
    r.read_exact(&mut greeting[..16])
        .await
        .map_err(|e| hs_io(peer, "the greeting", &e))?;
    let magic = be_u64(&greeting[0..8]);
    if magic != NBDMAGIC {
        return Err(peer.handshake(format!(
            "not an NBD server (greeting starts with {magic:#018x})"
        )));
    }
    match be_u64(&greeting[8..16]) {
        IHAVEOPT => {}
        OLDSTYLE_MAGIC => {
            return Err(
                peer.handshake("the server speaks the oldstyle handshake, which is not supported")
            );
        }
        other => {
            return Err(peer.handshake(format!(
                "unknown handshake magic {other:#018x} after NBDMAGIC"
            )));
        }
    }
    r.read_exact(&mut greeting[16..18])
        .await
        .map_err(|e| hs_io(peer, "the greeting", &e))?;
    let hflags = be_u16(&greeting[16..18]);
    if hflags & handshake_flags::FIXED_NEWSTYLE == 0 {
        return Err(peer
            .handshake("the server does not offer fixed newstyle negotiation, which is required"));
    }
    let no_zeroes = hflags & handshake_flags::NO_ZEROES != 0;
    let mut cflags = client_flags::C_FIXED_NEWSTYLE;
    if no_zeroes {
        cflags |= client_flags::C_NO_ZEROES;
    }
    w.write_all(&cflags.to_be_bytes())
        .await
        .map_err(|e| hs_io(peer, "sending client flags", &e))?;

    // Structured replies: optional, simple replies otherwise.
    let mut structured = false;
    if options.structured_replies {
        send_option(w, peer, opt::STRUCTURED_REPLY, &[]).await?;
        let reply = read_option_reply(r, peer, opt::STRUCTURED_REPLY).await?;
        match reply.kind {
            rep::ACK if reply.data.is_empty() => structured = true,
            k if is_error_reply(k) => {
                debug!(server = %peer.server, reply = %reply_name(k), message = %sanitize(&reply.data),
                    "structured replies refused; using simple replies");
            }
            k => {
                return Err(peer.handshake(format!(
                    "unexpected {} to NBD_OPT_STRUCTURED_REPLY",
                    reply_name(k)
                )));
            }
        }
    }

    // base:allocation: optional.
    let mut base_allocation = None;
    if structured && options.block_status {
        let mut data = Vec::new();
        put_string(&mut data, export);
        data.extend_from_slice(&1u32.to_be_bytes());
        put_string(&mut data, BASE_ALLOCATION);
        send_option(w, peer, opt::SET_META_CONTEXT, &data).await?;
        loop {
            let reply = read_option_reply(r, peer, opt::SET_META_CONTEXT).await?;
            match reply.kind {
                rep::META_CONTEXT => {
                    if reply.data.len() < 4 {
                        return Err(peer.handshake("NBD_REP_META_CONTEXT shorter than 4 bytes"));
                    }
                    let id = be_u32(&reply.data);
                    let name = &reply.data[4..];
                    if name != BASE_ALLOCATION.as_bytes() {
                        return Err(peer.handshake(format!(
                            "the server selected the metadata context {:?}, which was not asked for",
                            sanitize(name)
                        )));
                    }
                    if base_allocation.replace(id).is_some() {
                        return Err(peer.handshake("base:allocation was selected twice"));
                    }
                }
                rep::ACK => break,
                k if is_error_reply(k) => {
                    debug!(server = %peer.server, reply = %reply_name(k), message = %sanitize(&reply.data),
                        "base:allocation refused; no block status");
                    base_allocation = None;
                    break;
                }
                k => {
                    return Err(peer.handshake(format!(
                        "unexpected {} to NBD_OPT_SET_META_CONTEXT",
                        reply_name(k)
                    )));
                }
            }
        }
    }

    // GO, asking for block sizes.
    let mut data = Vec::new();
    put_string(&mut data, export);
    data.extend_from_slice(&1u16.to_be_bytes());
    data.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
    send_option(w, peer, opt::GO, &data).await?;
    let mut export_info = None;
    let mut block_sizes = None;
    loop {
        let reply = read_option_reply(r, peer, opt::GO).await?;
        match reply.kind {
            rep::INFO => {
                let d = &reply.data;
                if d.len() < 2 {
                    return Err(peer.handshake("NBD_REP_INFO shorter than 2 bytes"));
                }
                match be_u16(d) {
                    info::EXPORT => {
                        if d.len() != 12 {
                            return Err(peer.handshake(format!(
                                "NBD_INFO_EXPORT of {} bytes instead of 12",
                                d.len()
                            )));
                        }
                        export_info = Some((be_u64(&d[2..10]), be_u16(&d[10..12])));
                    }
                    info::BLOCK_SIZE => {
                        if d.len() != 14 {
                            return Err(peer.handshake(format!(
                                "NBD_INFO_BLOCK_SIZE of {} bytes instead of 14",
                                d.len()
                            )));
                        }
                        let b = BlockSizes {
                            minimum: be_u32(&d[2..6]),
                            preferred: be_u32(&d[6..10]),
                            maximum: be_u32(&d[10..14]),
                        };
                        if !valid_block_sizes(b) {
                            return Err(peer.handshake(format!(
                                "invalid block sizes: minimum {}, preferred {}, maximum {}",
                                b.minimum, b.preferred, b.maximum
                            )));
                        }
                        block_sizes = Some(b);
                    }
                    // NAME, DESCRIPTION and unknown items are not needed.
                    _ => {}
                }
            }
            rep::ACK => break,
            rep::ERR_UNSUP => {
                debug!(server = %peer.server, "NBD_OPT_GO unsupported; trying NBD_OPT_EXPORT_NAME");
                export_info = Some(export_name(r, w, peer, no_zeroes).await?);
                break;
            }
            k if is_error_reply(k) => return Err(refused(peer, opt::GO, &reply)),
            k => {
                return Err(peer.handshake(format!("unexpected {} to NBD_OPT_GO", reply_name(k))));
            }
        }
    }
    let Some((size, flags)) = export_info else {
        return Err(peer.handshake("NBD_OPT_GO succeeded without NBD_INFO_EXPORT"));
    };
    if size > i64::MAX as u64 {
        return Err(peer.handshake(format!("export size {size} is out of range")));
    }
    Ok(Negotiated {
        size,
        flags,
        block_sizes,
        structured,
        base_allocation,
    })
}

async fn export_name<R, W>(r: &mut R, w: &mut W, peer: &Peer, no_zeroes: bool) -> Result<(u64, u16)>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    send_option(w, peer, opt::EXPORT_NAME, peer.export.as_bytes()).await?;
    let len = if no_zeroes { 10 } else { 10 + 124 };
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            peer.handshake(
                "the server closed the connection after NBD_OPT_EXPORT_NAME \
                 (the export probably does not exist; this option cannot report errors)",
            )
        } else {
            hs_io(peer, "the reply to NBD_OPT_EXPORT_NAME", &e)
        }
    })?;
    Ok((be_u64(&buf[0..8]), be_u16(&buf[8..10])))
}

// ---------------------------------------------------------------------------------------
// Transmission
// ---------------------------------------------------------------------------------------

/// Text for an NBD error value: `EIO (input/output error)`.
pub fn errno_text(value: u32) -> String {
    let text = match value {
        errno::EPERM => "EPERM (operation not permitted)",
        errno::EIO => "EIO (input/output error)",
        errno::ENOMEM => "ENOMEM (out of memory)",
        errno::EINVAL => "EINVAL (invalid argument)",
        errno::ENOSPC => "ENOSPC (no space left)",
        errno::EOVERFLOW => "EOVERFLOW (value too large)",
        errno::ENOTSUP => "ENOTSUP (operation not supported)",
        errno::ESHUTDOWN => "ESHUTDOWN (server shutting down)",
        other => return format!("error {other} (unknown, treated as EINVAL)"),
    };
    text.to_owned()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Read,
    BlockStatus,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Read => "READ",
            Op::BlockStatus => "BLOCK_STATUS",
        }
    }
}

/// What a completed request hands back.
enum Reply {
    Data(Vec<u8>),
    Extents(Vec<(u64, u32)>),
}

/// A request waiting for (the rest of) its reply.
struct Pending {
    op: Op,
    offset: u64,
    length: u32,
    tx: oneshot::Sender<Result<Reply>>,
    /// Read data, allocated at the first data chunk.
    data: Option<Vec<u8>>,
    /// Ranges covered by data and hole chunks so far (start → end, merged).
    covered: BTreeMap<u64, u64>,
    extents: Option<Vec<(u64, u32)>>,
    /// The first error chunk's value and message.
    error: Option<(u32, String)>,
    chunks: u32,
}

impl Pending {
    fn end(&self) -> u64 {
        self.offset + u64::from(self.length)
    }

    /// Records `[start, end)` as covered; `false` if it overlaps what is.
    fn cover(&mut self, start: u64, end: u64) -> bool {
        let before = self
            .covered
            .range(..=start)
            .next_back()
            .map(|(&s, &e)| (s, e));
        let after = self.covered.range(start..).next().map(|(&s, _)| s);
        if before.is_some_and(|(_, e)| e > start) || after.is_some_and(|s| s < end) {
            return false;
        }
        let mut start = start;
        let mut end = end;
        if let Some((s, _)) = before.filter(|&(_, e)| e == start) {
            self.covered.remove(&s);
            start = s;
        }
        if let Some(e) = self.covered.remove(&end) {
            end = e;
        }
        self.covered.insert(start, end);
        true
    }
}

enum Out {
    Request([u8; proto::COMPACT_REQUEST_LEN]),
    Disconnect([u8; proto::COMPACT_REQUEST_LEN]),
}

#[derive(Default)]
struct State {
    pending: HashMap<u64, Pending>,
    next_cookie: u64,
    /// Why the connection is gone; set once.
    closed: Option<String>,
    /// Why no new requests are accepted although the connection is still up (the
    /// server announced its shutdown, or the client is disconnecting).
    draining: Option<String>,
}

struct Shared {
    peer: Peer,
    negotiated: Negotiated,
    block_sizes: BlockSizes,
    max_request: u32,
    request_timeout: Option<Duration>,
    out: mpsc::UnboundedSender<Out>,
    state: Mutex<State>,
    stop: CancellationToken,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the map inconsistent in a way
        // that matters more than failing: keep going with the data.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks the connection dead and fails every pending request with `reason`.
    fn fail_all(&self, reason: String) {
        let drained: Vec<Pending> = {
            let mut st = self.state();
            if st.closed.is_none() {
                debug!(server = %self.peer.server, export = %self.peer.export, %reason, "NBD connection closed");
                st.closed = Some(reason);
            }
            st.pending.drain().map(|(_, p)| p).collect()
        };
        let reason = self.closed_reason();
        for p in drained {
            let _ = p.tx.send(Err(self.peer.lost(reason.clone())));
        }
        self.stop.cancel();
    }

    fn closed_reason(&self) -> String {
        self.state()
            .closed
            .clone()
            .unwrap_or_else(|| "the connection was closed".into())
    }

    fn take(&self, cookie: u64) -> Option<Pending> {
        self.state().pending.remove(&cookie)
    }

    /// Puts a partly answered request back, unless the connection died meanwhile (then
    /// dropping it fails the waiter).
    fn put_back(&self, cookie: u64, p: Pending) {
        let mut st = self.state();
        if st.closed.is_none() {
            st.pending.insert(cookie, p);
        }
    }

    /// Completes a request whose reply carried an error.
    fn complete_with_error(&self, p: Pending) {
        let (value, message) = p.error.clone().unwrap_or((errno::EIO, String::new()));
        if value == errno::ESHUTDOWN {
            // The spec asks clients to disconnect: take no new requests here.
            self.state()
                .draining
                .get_or_insert_with(|| "the server is shutting down".into());
        }
        let error = Error::NbdRequest {
            server: self.peer.server.clone(),
            export: self.peer.export.clone(),
            op: p.op.name(),
            offset: p.offset,
            length: u64::from(p.length),
            errno: value,
            message: if message.is_empty() {
                String::new()
            } else {
                format!(": {message}")
            },
        };
        let _ = p.tx.send(Err(error));
    }
}

/// Problems while reading replies.
enum ReadFail {
    /// The connection broke (EOF, reset).
    Io(String),
    /// The server broke the protocol.
    Violation(String),
}

fn io_fail(e: &std::io::Error) -> ReadFail {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        ReadFail::Io("the server closed the connection in the middle of a reply".into())
    } else {
        ReadFail::Io(format!("reading from the server failed: {e}"))
    }
}

async fn reader_task<R: AsyncRead + Unpin>(shared: Arc<Shared>, r: R) {
    let mut r = BufReader::with_capacity(64 * 1024, r);
    let reason = tokio::select! {
        biased;
        () = shared.stop.cancelled() => "the client closed the connection".to_owned(),
        reason = read_replies(&shared, &mut r) => reason,
    };
    shared.fail_all(reason);
}

/// Reads replies until the connection fails; returns why.
async fn read_replies<R: AsyncRead + Unpin>(shared: &Shared, r: &mut R) -> String {
    loop {
        let mut magic = [0u8; 4];
        match r.read_exact(&mut magic).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return "the server closed the connection".into();
            }
            Err(e) => return format!("reading from the server failed: {e}"),
        }
        let result = match u32::from_be_bytes(magic) {
            proto::SIMPLE_REPLY_MAGIC => simple_reply(shared, r).await,
            proto::STRUCTURED_REPLY_MAGIC => structured_chunk(shared, r).await,
            proto::EXTENDED_REPLY_MAGIC => Err(ReadFail::Violation(
                "extended reply header, but extended headers were not negotiated".into(),
            )),
            other => Err(ReadFail::Violation(format!(
                "bad reply magic {other:#010x}"
            ))),
        };
        match result {
            Ok(()) => {}
            Err(ReadFail::Io(reason)) => return reason,
            Err(ReadFail::Violation(reason)) => {
                return format!("the server broke the protocol: {reason}");
            }
        }
    }
}

/// Fails `p` for a protocol violation and passes the failure on to close the connection.
fn violate(shared: &Shared, p: Pending, reason: String) -> ReadFail {
    let _ = p.tx.send(Err(shared.peer.protocol(format!(
        "{reason} (in reply to {} of {} bytes at offset {})",
        p.op.name(),
        p.length,
        p.offset
    ))));
    ReadFail::Violation(reason)
}

async fn simple_reply<R: AsyncRead + Unpin>(
    shared: &Shared,
    r: &mut R,
) -> std::result::Result<(), ReadFail> {
    let mut head = [0u8; 12];
    r.read_exact(&mut head).await.map_err(|e| io_fail(&e))?;
    let error = be_u32(&head[0..4]);
    let cookie = be_u64(&head[4..12]);
    let Some(mut p) = shared.take(cookie) else {
        return Err(ReadFail::Violation(format!(
            "simple reply for unknown cookie {cookie:#x}"
        )));
    };
    if p.chunks > 0 {
        return Err(violate(
            shared,
            p,
            "simple reply after structured chunks".into(),
        ));
    }
    if error != 0 {
        p.error = Some((error, String::new()));
        shared.complete_with_error(p);
        return Ok(());
    }
    match p.op {
        Op::Read if !shared.negotiated.structured => {
            let mut data = vec![0u8; p.length as usize];
            if let Err(e) = r.read_exact(&mut data).await {
                let fail = io_fail(&e);
                let reason = match &fail {
                    ReadFail::Io(s) | ReadFail::Violation(s) => s.clone(),
                };
                let _ = p.tx.send(Err(shared.peer.lost(reason)));
                return Err(fail);
            }
            let _ = p.tx.send(Ok(Reply::Data(data)));
            Ok(())
        }
        Op::Read => Err(violate(
            shared,
            p,
            "simple reply with data although structured replies were negotiated".into(),
        )),
        Op::BlockStatus => Err(violate(
            shared,
            p,
            "simple success reply carries no block status".into(),
        )),
    }
}

async fn structured_chunk<R: AsyncRead + Unpin>(
    shared: &Shared,
    r: &mut R,
) -> std::result::Result<(), ReadFail> {
    let mut head = [0u8; 16];
    r.read_exact(&mut head).await.map_err(|e| io_fail(&e))?;
    let flags = be_u16(&head[0..2]);
    let kind = be_u16(&head[2..4]);
    let cookie = be_u64(&head[4..12]);
    let length = be_u32(&head[12..16]);
    if !shared.negotiated.structured {
        return Err(ReadFail::Violation(
            "structured reply chunk, but structured replies were not negotiated".into(),
        ));
    }
    let Some(mut p) = shared.take(cookie) else {
        return Err(ReadFail::Violation(format!(
            "reply chunk for unknown cookie {cookie:#x}"
        )));
    };
    let done = flags & reply::FLAG_DONE != 0;
    match chunk(shared, r, &mut p, kind, length, done).await {
        Ok(()) => {}
        Err(ReadFail::Violation(reason)) => return Err(violate(shared, p, reason)),
        Err(ReadFail::Io(reason)) => {
            let _ = p.tx.send(Err(shared.peer.lost(reason.clone())));
            return Err(ReadFail::Io(reason));
        }
    }
    p.chunks += 1;
    if !done {
        shared.put_back(cookie, p);
        return Ok(());
    }
    if p.error.is_some() {
        shared.complete_with_error(p);
        return Ok(());
    }
    match p.op {
        Op::Read => {
            let whole = p.covered.len() == 1 && p.covered.get(&p.offset) == Some(&p.end());
            if !whole {
                let got: u64 = p.covered.iter().map(|(s, e)| e - s).sum();
                return Err(violate(
                    shared,
                    p,
                    format!("the reply covers {got} bytes of the read, not all of it"),
                ));
            }
            let data = p
                .data
                .take()
                .unwrap_or_else(|| vec![0u8; p.length as usize]);
            let _ = p.tx.send(Ok(Reply::Data(data)));
        }
        Op::BlockStatus => match p.extents.take() {
            Some(extents) => {
                let _ = p.tx.send(Ok(Reply::Extents(extents)));
            }
            None => {
                return Err(violate(
                    shared,
                    p,
                    "the reply ended without a block status chunk".into(),
                ));
            }
        },
    }
    Ok(())
}

/// Reads and checks one chunk's payload into `p`.
async fn chunk<R: AsyncRead + Unpin>(
    shared: &Shared,
    r: &mut R,
    p: &mut Pending,
    kind: u16,
    length: u32,
    done: bool,
) -> std::result::Result<(), ReadFail> {
    let v = |s: String| Err(ReadFail::Violation(s));
    match (kind, p.op) {
        (reply::NONE, _) => {
            if length != 0 {
                return v(format!(
                    "NBD_REPLY_TYPE_NONE with {length} bytes of payload"
                ));
            }
            if !done {
                return v("NBD_REPLY_TYPE_NONE without NBD_REPLY_FLAG_DONE".into());
            }
            Ok(())
        }
        (reply::OFFSET_DATA, Op::Read) => {
            if length < 8 || length - 8 > p.length {
                return v(format!(
                    "OFFSET_DATA chunk of {length} bytes for a read of {} bytes",
                    p.length
                ));
            }
            let mut off = [0u8; 8];
            r.read_exact(&mut off).await.map_err(|e| io_fail(&e))?;
            let start = be_u64(&off);
            let n = u64::from(length - 8);
            let end = start.saturating_add(n);
            if start < p.offset || end > p.end() {
                return v(format!(
                    "OFFSET_DATA chunk at {start}+{n} lies outside the request"
                ));
            }
            if !p.cover(start, end) {
                return v(format!(
                    "OFFSET_DATA chunk at {start}+{n} overlaps an earlier chunk"
                ));
            }
            let len = p.length as usize;
            let data = p.data.get_or_insert_with(|| vec![0u8; len]);
            let at = (start - p.offset) as usize;
            r.read_exact(&mut data[at..at + n as usize])
                .await
                .map_err(|e| io_fail(&e))?;
            Ok(())
        }
        (reply::OFFSET_HOLE, Op::Read) => {
            if length != 12 {
                return v(format!("OFFSET_HOLE chunk of {length} bytes instead of 12"));
            }
            let mut b = [0u8; 12];
            r.read_exact(&mut b).await.map_err(|e| io_fail(&e))?;
            let start = be_u64(&b[0..8]);
            let n = u64::from(be_u32(&b[8..12]));
            let end = start.saturating_add(n);
            if n == 0 {
                return v(format!("OFFSET_HOLE chunk at {start} of length 0"));
            }
            if start < p.offset || end > p.end() {
                return v(format!(
                    "OFFSET_HOLE chunk at {start}+{n} lies outside the request"
                ));
            }
            if !p.cover(start, end) {
                return v(format!(
                    "OFFSET_HOLE chunk at {start}+{n} overlaps an earlier chunk"
                ));
            }
            // The buffer starts zeroed: a hole needs no copying.
            Ok(())
        }
        (reply::BLOCK_STATUS, Op::BlockStatus) => {
            if length < 12 || !(length - 4).is_multiple_of(8) || (length - 4) / 8 > MAX_EXTENTS {
                return v(format!("BLOCK_STATUS chunk of {length} bytes"));
            }
            let mut b = vec![0u8; length as usize];
            r.read_exact(&mut b).await.map_err(|e| io_fail(&e))?;
            let id = be_u32(&b[0..4]);
            if Some(id) != shared.negotiated.base_allocation {
                return v(format!("BLOCK_STATUS chunk for unknown context id {id}"));
            }
            if p.extents.is_some() {
                return v("two BLOCK_STATUS chunks for one context".into());
            }
            let mut pos = p.offset;
            let end = p.end();
            let mut extents = Vec::with_capacity((length as usize - 4) / 8);
            for e in b[4..].chunks_exact(8) {
                let len = u64::from(be_u32(&e[0..4]));
                let flags = be_u32(&e[4..8]);
                if len == 0 {
                    return v("a block status extent of length 0".into());
                }
                if pos >= end {
                    return v("block status extents continue past the requested range".into());
                }
                // Only the last extent may reach past the request: clip it.
                let len = len.min(end - pos);
                pos += len;
                extents.push((len, flags));
            }
            p.extents = Some(extents);
            Ok(())
        }
        (reply::OFFSET_DATA | reply::OFFSET_HOLE | reply::BLOCK_STATUS, op) => {
            v(format!("chunk type {kind} in reply to {}", op.name()))
        }
        (k, _) if k & (1 << 15) != 0 => {
            let max = 6 + MAX_ERROR_MESSAGE + 8;
            if !(6..=max).contains(&length) {
                return v(format!("error chunk of {length} bytes"));
            }
            let mut b = vec![0u8; length as usize];
            r.read_exact(&mut b).await.map_err(|e| io_fail(&e))?;
            let value = be_u32(&b[0..4]);
            let msg_len = u32::from(be_u16(&b[4..6]));
            let expected = match k {
                reply::ERROR => Some(6 + msg_len),
                reply::ERROR_OFFSET => Some(6 + msg_len + 8),
                _ => None,
            };
            if 6 + msg_len > length || expected.is_some_and(|e| e != length) {
                return v(format!(
                    "error chunk of {length} bytes with a {msg_len}-byte message"
                ));
            }
            if value == 0 {
                return v("error chunk with error value 0".into());
            }
            let mut message = sanitize(&b[6..6 + msg_len as usize]);
            if k == reply::ERROR_OFFSET {
                let at = be_u64(&b[6 + msg_len as usize..]);
                if at < p.offset || at >= p.end() {
                    return v(format!("ERROR_OFFSET at {at} lies outside the request"));
                }
                if message.is_empty() {
                    message = format!("at offset {at}");
                } else {
                    message = format!("{message} (at offset {at})");
                }
            }
            if p.error.is_none() {
                p.error = Some((value, message));
            }
            Ok(())
        }
        (k, _) => v(format!("unknown reply chunk type {k}")),
    }
}

async fn writer_task<W: AsyncWrite + Unpin>(
    shared: Arc<Shared>,
    mut w: W,
    mut rx: mpsc::UnboundedReceiver<Out>,
) {
    let mut buf = Vec::with_capacity(64 * proto::COMPACT_REQUEST_LEN);
    loop {
        let first = tokio::select! {
            biased;
            () = shared.stop.cancelled() => return,
            m = rx.recv() => m,
        };
        let Some(first) = first else { return };
        buf.clear();
        let mut disconnect = false;
        let mut next = Some(first);
        while let Some(m) = next {
            match m {
                Out::Request(h) => buf.extend_from_slice(&h),
                Out::Disconnect(h) => {
                    buf.extend_from_slice(&h);
                    disconnect = true;
                    break;
                }
            }
            next = if buf.len() < 64 * proto::COMPACT_REQUEST_LEN {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        let written = tokio::select! {
            biased;
            () = shared.stop.cancelled() => return,
            r = async { w.write_all(&buf).await?; w.flush().await } => r,
        };
        if let Err(e) = written {
            shared.fail_all(format!("sending requests failed: {e}"));
            return;
        }
        if disconnect {
            let _ = w.shutdown().await;
            // Keep the write half open until the reader is done: dropping it is fine
            // too, the shutdown already told the server.
            shared.stop.cancelled().await;
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------------------

/// One connection to an NBD export, read-only, with any number of requests in flight.
///
/// Dropping the client closes the connection; requests still waiting fail.
pub struct Client {
    shared: Arc<Shared>,
    reader: Mutex<Option<JoinHandle<()>>>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("server", &self.shared.peer.server)
            .field("export", &self.shared.peer.export)
            .field("size", &self.shared.negotiated.size)
            .field("flags", &self.shared.negotiated.flags)
            .field("structured", &self.shared.negotiated.structured)
            .finish_non_exhaustive()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.shared.stop.cancel();
    }
}

impl Client {
    /// Connects to the server named by `uri` and negotiates its export, all within
    /// `options.connect_timeout`.
    pub async fn connect(uri: &NbdUri, options: &ClientOptions) -> Result<Client> {
        let server = uri.server();
        let timeout = options.connect_timeout;
        let attempt = async {
            match &uri.transport {
                Transport::Tcp { host, port } => {
                    let stream = tokio::net::TcpStream::connect((host.as_str(), *port))
                        .await
                        .map_err(|source| Error::NbdConnect {
                            server: server.clone(),
                            source,
                        })?;
                    let _ = stream.set_nodelay(true);
                    let (r, w) = stream.into_split();
                    Client::handshake_on(r, w, &server, &uri.export, options).await
                }
                Transport::Unix { socket } => {
                    let stream =
                        tokio::net::UnixStream::connect(socket)
                            .await
                            .map_err(|source| Error::NbdConnect {
                                server: server.clone(),
                                source,
                            })?;
                    let (r, w) = stream.into_split();
                    Client::handshake_on(r, w, &server, &uri.export, options).await
                }
            }
        };
        tokio::time::timeout(timeout, attempt)
            .await
            .unwrap_or_else(|_| {
                Err(Error::NbdTimeout {
                    server: server.clone(),
                    export: uri.export.clone(),
                    what: "connecting and the handshake".into(),
                    after: timeout,
                })
            })
    }

    /// Negotiates `export` over an already connected stream (`server` names it in
    /// messages). Used by tests and by callers with their own transports; the
    /// handshake is not under `options.connect_timeout` here.
    pub async fn from_stream<S>(
        stream: S,
        server: &str,
        export: &str,
        options: &ClientOptions,
    ) -> Result<Client>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (r, w) = tokio::io::split(stream);
        Client::handshake_on(r, w, server, export, options).await
    }

    async fn handshake_on<R, W>(
        mut r: R,
        mut w: W,
        server: &str,
        export: &str,
        options: &ClientOptions,
    ) -> Result<Client>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let peer = Peer {
            server: server.to_owned(),
            export: export.to_owned(),
        };
        let negotiated = handshake(&mut r, &mut w, &peer, options).await?;
        let block_sizes = negotiated.block_sizes.unwrap_or_default();
        let min = block_sizes.minimum;
        let max_request = block_sizes.maximum.min(options.max_request.max(min));
        // A whole number of minimum blocks, at least one.
        let max_request = (max_request / min * min).max(min);
        debug!(
            server = %peer.server, export = %peer.export, size = negotiated.size,
            flags = negotiated.flags, structured = negotiated.structured,
            base_allocation = negotiated.base_allocation.is_some(), ?block_sizes,
            "NBD export negotiated"
        );
        let (out, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            peer,
            negotiated,
            block_sizes,
            max_request,
            request_timeout: options.request_timeout,
            out,
            state: Mutex::new(State::default()),
            stop: CancellationToken::new(),
        });
        let reader = tokio::spawn(reader_task(Arc::clone(&shared), r));
        tokio::spawn(writer_task(Arc::clone(&shared), w, rx));
        Ok(Client {
            shared,
            reader: Mutex::new(Some(reader)),
        })
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.shared.negotiated.size
    }

    /// The transmission flags (`NBD_FLAG_*`).
    pub fn flags(&self) -> u16 {
        self.shared.negotiated.flags
    }

    /// Whether the server exports the disk read-only.
    pub fn read_only(&self) -> bool {
        self.flags() & tflags::READ_ONLY != 0
    }

    /// Whether several connections to this export see the same data
    /// (`NBD_FLAG_CAN_MULTI_CONN`).
    pub fn can_multi_conn(&self) -> bool {
        self.flags() & tflags::CAN_MULTI_CONN != 0
    }

    /// Block size constraints: the server's, or the spec's defaults.
    pub fn block_sizes(&self) -> BlockSizes {
        self.shared.block_sizes
    }

    /// Whether the server advertised block sizes.
    pub fn advertised_block_sizes(&self) -> bool {
        self.shared.negotiated.block_sizes.is_some()
    }

    /// Whether structured replies were negotiated.
    pub fn structured_replies(&self) -> bool {
        self.shared.negotiated.structured
    }

    /// Whether [`block_status`](Self::block_status) is available (`base:allocation`
    /// was negotiated).
    pub fn has_block_status(&self) -> bool {
        self.shared.negotiated.base_allocation.is_some()
    }

    /// The server (`host:port` or socket path).
    pub fn server(&self) -> &str {
        &self.shared.peer.server
    }

    /// The export name.
    pub fn export(&self) -> &str {
        &self.shared.peer.export
    }

    /// Whether the connection is gone or takes no new requests.
    pub fn is_closed(&self) -> bool {
        let st = self.shared.state();
        st.closed.is_some() || st.draining.is_some()
    }

    /// Requests waiting for replies.
    pub fn in_flight(&self) -> usize {
        self.shared.state().pending.len()
    }

    fn check_range(&self, op: &'static str, offset: u64, length: u64) -> Result<()> {
        let size = self.size();
        if offset.checked_add(length).is_none_or(|end| end > size) {
            return Err(self.shared.peer.invalid(
                op,
                offset,
                length,
                format!("the range ends beyond the export's {size} bytes"),
            ));
        }
        Ok(())
    }

    /// Registers and sends one request; the returned receiver gets its reply.
    fn send(&self, op: Op, offset: u64, length: u32) -> Result<oneshot::Receiver<Result<Reply>>> {
        let (tx, rx) = oneshot::channel();
        let cookie = {
            let mut st = self.shared.state();
            if let Some(reason) = st.closed.as_ref().or(st.draining.as_ref()) {
                return Err(self.shared.peer.lost(reason.clone()));
            }
            let cookie = st.next_cookie;
            st.next_cookie = st.next_cookie.wrapping_add(1);
            st.pending.insert(
                cookie,
                Pending {
                    op,
                    offset,
                    length,
                    tx,
                    data: None,
                    covered: BTreeMap::new(),
                    extents: None,
                    error: None,
                    chunks: 0,
                },
            );
            cookie
        };
        let command = match op {
            Op::Read => cmd::READ,
            Op::BlockStatus => cmd::BLOCK_STATUS,
        };
        let mut header = Vec::with_capacity(proto::COMPACT_REQUEST_LEN);
        proto::encode_request(
            &mut header,
            ReplyMode::Structured,
            &RequestHeader {
                flags: 0,
                command,
                cookie,
                offset,
                length: u64::from(length),
            },
        );
        let header: [u8; proto::COMPACT_REQUEST_LEN] = header
            .try_into()
            .expect("compact request headers are 28 bytes");
        if self.shared.out.send(Out::Request(header)).is_err() {
            // The writer is gone: the connection is (being) closed.
            self.shared.fail_all("the connection was closed".into());
        }
        Ok(rx)
    }

    /// Waits for a reply, under the request timeout.
    async fn wait(
        &self,
        rx: oneshot::Receiver<Result<Reply>>,
        op: Op,
        offset: u64,
        length: u32,
    ) -> Result<Reply> {
        let shared = &self.shared;
        let wait = async {
            match rx.await {
                Ok(r) => r,
                Err(_) => Err(shared.peer.lost(shared.closed_reason())),
            }
        };
        let Some(limit) = shared.request_timeout else {
            return wait.await;
        };
        match tokio::time::timeout(limit, wait).await {
            Ok(r) => r,
            Err(_) => {
                let what = format!("{} of {length} bytes at offset {offset}", op.name());
                shared.fail_all(format!(
                    "no reply to {what} within {limit:?}; connection abandoned"
                ));
                Err(Error::NbdTimeout {
                    server: shared.peer.server.clone(),
                    export: shared.peer.export.clone(),
                    what,
                    after: limit,
                })
            }
        }
    }

    /// The aligned range `[start, end)` around `[offset, offset + length)`: start
    /// rounded down and end rounded up to the minimum block size, capped at the size.
    fn align(&self, offset: u64, length: u64) -> (u64, u64) {
        let min = u64::from(self.shared.block_sizes.minimum);
        let start = offset / min * min;
        let end = (offset + length).div_ceil(min).saturating_mul(min);
        (start, end.min(self.size()))
    }

    /// Reads `length` bytes at `offset` (within the export). Reads larger than the
    /// server's maximum payload (at most [`ClientOptions::max_request`]) are split into
    /// requests that are all in flight at once; unaligned reads are widened to the
    /// server's minimum block size.
    pub async fn read(&self, offset: u64, length: u64) -> Result<Bytes> {
        self.check_range("READ", offset, length)?;
        if length == 0 {
            return Ok(Bytes::new());
        }
        let total = usize::try_from(length).map_err(|_| {
            self.shared
                .peer
                .invalid("READ", offset, length, "too large for memory".into())
        })?;
        let (start, end) = self.align(offset, length);
        let step = u64::from(self.shared.max_request);
        let mut requests = Vec::new();
        let mut at = start;
        while at < end {
            let n = (end - at).min(step) as u32;
            requests.push((at, n, self.send(Op::Read, at, n)?));
            at += u64::from(n);
        }
        if requests.len() == 1 && start == offset && end == offset + length {
            let (at, n, rx) = requests.pop().expect("one request");
            return match self.wait(rx, Op::Read, at, n).await? {
                Reply::Data(d) => Ok(Bytes::from(d)),
                Reply::Extents(_) => unreachable!("reads get data"),
            };
        }
        let mut out = BytesMut::with_capacity(total);
        for (at, n, rx) in requests {
            let Reply::Data(d) = self.wait(rx, Op::Read, at, n).await? else {
                unreachable!("reads get data");
            };
            // The part of [at, at + n) inside [offset, offset + length).
            let lo = offset.max(at);
            let hi = (offset + length).min(at + u64::from(n));
            if lo < hi {
                out.extend_from_slice(&d[(lo - at) as usize..(hi - at) as usize]);
            }
        }
        debug_assert_eq!(out.len(), total);
        Ok(out.freeze())
    }

    /// `base:allocation` status of the range at `offset`: `(length, flags)` extents
    /// (flags: [`proto::state::HOLE`], [`proto::state::ZERO`]) covering a prefix of the
    /// range, which may be shorter than asked for. Needs
    /// [`has_block_status`](Self::has_block_status).
    pub async fn block_status(&self, offset: u64, length: u64) -> Result<Vec<(u64, u32)>> {
        self.check_range("BLOCK_STATUS", offset, length)?;
        if !self.has_block_status() {
            return Err(self.shared.peer.invalid(
                "BLOCK_STATUS",
                offset,
                length,
                "the server did not agree to the base:allocation metadata context".into(),
            ));
        }
        if length == 0 {
            return Ok(Vec::new());
        }
        let (start, end) = self.align(offset, length);
        let min = u64::from(self.shared.block_sizes.minimum);
        let most = u64::from(u32::MAX) / min * min;
        let n = (end - start).min(most) as u32;
        let rx = self.send(Op::BlockStatus, start, n)?;
        let Reply::Extents(extents) = self.wait(rx, Op::BlockStatus, start, n).await? else {
            unreachable!("block status gets extents");
        };
        // Trim to [offset, offset + length).
        let want_end = offset + length;
        let mut out = Vec::with_capacity(extents.len());
        let mut pos = start;
        for (len, flags) in extents {
            let lo = pos.max(offset);
            let hi = (pos + len).min(want_end);
            if lo < hi {
                out.push((hi - lo, flags));
            }
            pos += len;
        }
        if out.is_empty() {
            // Only possible when the server's answer ended before `offset` (inside the
            // widened first block): report that as a protocol problem.
            return Err(self.shared.peer.protocol(format!(
                "BLOCK_STATUS at offset {start} reported nothing past offset {offset}"
            )));
        }
        Ok(out)
    }

    /// Sends `NBD_CMD_DISC` and closes the connection once the server has answered the
    /// requests in flight (waiting a few seconds at most). New requests fail at once.
    pub async fn disconnect(&self) {
        {
            let mut st = self.shared.state();
            if st.closed.is_some() {
                return;
            }
            st.draining
                .get_or_insert_with(|| "the client disconnected".into());
        }
        let mut header = Vec::with_capacity(proto::COMPACT_REQUEST_LEN);
        proto::encode_request(
            &mut header,
            ReplyMode::Structured,
            &RequestHeader {
                flags: 0,
                command: cmd::DISC,
                cookie: u64::MAX,
                offset: 0,
                length: 0,
            },
        );
        let header: [u8; proto::COMPACT_REQUEST_LEN] = header
            .try_into()
            .expect("compact request headers are 28 bytes");
        let _ = self.shared.out.send(Out::Disconnect(header));
        let reader = self.reader.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(reader) = reader {
            let _ = tokio::time::timeout(DISCONNECT_GRACE, reader).await;
        }
        self.shared.fail_all("the client disconnected".into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16, export: &str) -> NbdUri {
        NbdUri {
            transport: Transport::Tcp {
                host: host.into(),
                port,
            },
            export: export.into(),
        }
    }

    #[test]
    fn tcp_uri_with_and_without_port() {
        assert_eq!(
            NbdUri::parse("nbd://example.com/disk").unwrap(),
            tcp("example.com", DEFAULT_PORT, "disk")
        );
        assert_eq!(
            NbdUri::parse("nbd://127.0.0.1:10810/disk").unwrap(),
            tcp("127.0.0.1", 10810, "disk")
        );
    }

    #[test]
    fn ipv6_host_in_brackets() {
        assert_eq!(
            NbdUri::parse("nbd://[::1]:5000/x").unwrap(),
            tcp("::1", 5000, "x")
        );
        assert_eq!(
            NbdUri::parse("nbd://[::1]/x").unwrap(),
            tcp("::1", DEFAULT_PORT, "x")
        );
        assert_eq!(
            NbdUri::parse("nbd://[::1]:5000/x").unwrap().to_string(),
            "nbd://[::1]:5000/x"
        );
        assert!(NbdUri::parse("nbd://[::1/x").is_err());
        assert!(NbdUri::parse("nbd://[nothost]/x").is_err());
        assert!(NbdUri::parse("nbd://::1/x").is_err());
    }

    #[test]
    fn empty_path_is_the_default_export() {
        assert_eq!(
            NbdUri::parse("nbd://h").unwrap(),
            tcp("h", DEFAULT_PORT, "")
        );
        assert_eq!(
            NbdUri::parse("nbd://h/").unwrap(),
            tcp("h", DEFAULT_PORT, "")
        );
    }

    #[test]
    fn export_name_is_percent_decoded_and_reencoded() {
        let u = NbdUri::parse("nbd://h/my%20disk/a%2Fb").unwrap();
        assert_eq!(u.export, "my disk/a/b");
        assert_eq!(u.to_string(), "nbd://h:10809/my%20disk/a/b");
        assert!(NbdUri::parse("nbd://h/bad%zz").is_err());
        assert!(NbdUri::parse("nbd://h/bad%ff").is_err());
    }

    #[test]
    fn unix_uri_needs_a_socket() {
        let u = NbdUri::parse("nbd+unix:///disk?socket=/run/a%20b.sock").unwrap();
        assert_eq!(
            u.transport,
            Transport::Unix {
                socket: "/run/a b.sock".into()
            }
        );
        assert_eq!(u.export, "disk");
        assert_eq!(u.to_string(), "nbd+unix:///disk?socket=/run/a%20b.sock");
        assert!(NbdUri::parse("nbd+unix:///disk").is_err());
        assert!(NbdUri::parse("nbd+unix:///disk?socket=").is_err());
        assert!(NbdUri::parse("nbd+unix://host/disk?socket=/s").is_err());
        assert!(NbdUri::parse("nbd+unix:///disk?socket=%00abstract").is_err());
        assert!(NbdUri::parse("nbd://h/disk?socket=/s").is_err());
    }

    #[test]
    fn tls_schemes_are_refused_clearly() {
        for u in ["nbds://h/x", "nbds+unix:///x?socket=/s", "NBDS://h/x"] {
            let e = NbdUri::parse(u).unwrap_err().to_string();
            assert!(e.contains("TLS is not supported"), "{e}");
        }
        let e = NbdUri::parse("nbd+vsock://1/x").unwrap_err().to_string();
        assert!(e.contains("not supported"), "{e}");
        assert!(NbdUri::parse("http://h/x").is_err());
        assert!(NbdUri::parse("/just/a/path").is_err());
    }

    #[test]
    fn display_hides_user_info_and_unknown_query() {
        let u = NbdUri::parse("nbd://alice:secret@h:99/x?tls-psk-file=/key&foo=bar#frag").unwrap();
        assert_eq!(u.to_string(), "nbd://h:99/x");
        let u =
            NbdUri::parse("nbd+unix:///x?password=hunter2&socket=/s&tls-certificates=/c").unwrap();
        assert_eq!(u.to_string(), "nbd+unix:///x?socket=/s");
        let e = NbdUri::parse("nbds://alice:secret@h/x?token=abc")
            .unwrap_err()
            .to_string();
        assert!(
            !e.contains("secret") && !e.contains("alice") && !e.contains("abc"),
            "{e}"
        );
    }

    #[test]
    fn bad_ports_are_refused() {
        assert!(NbdUri::parse("nbd://h:0/x").is_err());
        assert!(NbdUri::parse("nbd://h:65536/x").is_err());
        assert!(NbdUri::parse("nbd://h:abc/x").is_err());
        assert!(NbdUri::parse("nbd://:10809/x").is_err());
    }

    #[test]
    fn coverage_rejects_overlaps_and_merges_neighbours() {
        let (tx, _rx) = oneshot::channel();
        let mut p = Pending {
            op: Op::Read,
            offset: 0,
            length: 100,
            tx,
            data: None,
            covered: BTreeMap::new(),
            extents: None,
            error: None,
            chunks: 0,
        };
        assert!(p.cover(50, 60));
        assert!(p.cover(0, 10));
        assert!(!p.cover(55, 58));
        assert!(!p.cover(5, 12));
        assert!(!p.cover(45, 51));
        assert!(p.cover(10, 50));
        assert!(p.cover(60, 100));
        assert_eq!(p.covered.len(), 1);
        assert_eq!(p.covered.get(&0), Some(&100));
    }
}
