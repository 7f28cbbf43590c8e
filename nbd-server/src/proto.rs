//! The NBD wire format: constants, option and request decoding, reply encoding.
//!
//! Everything here is sans-IO: decoders take byte slices and return typed values or a
//! typed reason for refusal, encoders append to a `Vec<u8>`. The async handshake and
//! transmission code drive these functions, and the fuzz target calls them directly.
//! Names and values follow NetworkBlockDevice `doc/proto.md`, including the
//! extended-headers extension.

use std::fmt;

/// `NBDMAGIC`, the first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`, sent by the server after `NBDMAGIC` and before every client option.
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

/// Size of a compact request header.
pub const COMPACT_REQUEST_LEN: usize = 28;
/// Size of an extended request header.
pub const EXTENDED_REQUEST_LEN: usize = 32;

/// Handshake flags sent by the server.
pub mod handshake_flags {
    /// The server speaks fixed newstyle.
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    /// The server can skip the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
    pub const NO_ZEROES: u16 = 1 << 1;
}

/// Client flags sent in reply to the server's greeting.
pub mod client_flags {
    /// The client speaks fixed newstyle.
    pub const C_FIXED_NEWSTYLE: u32 = 1 << 0;
    /// The client does not want the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
    pub const C_NO_ZEROES: u32 = 1 << 1;
    /// Every flag this server knows; any other bit closes the connection.
    pub const KNOWN: u32 = C_FIXED_NEWSTYLE | C_NO_ZEROES;
}

/// Option numbers (`NBD_OPT_*`).
pub mod opt {
    /// Select an export and enter transmission (cannot return an error).
    pub const EXPORT_NAME: u32 = 1;
    /// Soft disconnect during haggling.
    pub const ABORT: u32 = 2;
    /// List exports.
    pub const LIST: u32 = 3;
    /// Withdrawn; answered as unknown.
    pub const PEEK_EXPORT: u32 = 4;
    /// Upgrade to TLS.
    pub const STARTTLS: u32 = 5;
    /// Describe an export without entering transmission.
    pub const INFO: u32 = 6;
    /// Describe an export and enter transmission.
    pub const GO: u32 = 7;
    /// Use structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List metadata contexts.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Select metadata contexts for `NBD_CMD_BLOCK_STATUS`.
    pub const SET_META_CONTEXT: u32 = 10;
    /// Use 32-byte request and reply headers with 64-bit lengths.
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types (`NBD_REP_*`).
pub mod rep {
    /// Final reply of a successful option.
    pub const ACK: u32 = 1;
    /// One export in reply to `NBD_OPT_LIST`.
    pub const SERVER: u32 = 2;
    /// One `NBD_INFO_*` item in reply to `NBD_OPT_INFO`/`NBD_OPT_GO`.
    pub const INFO: u32 = 3;
    /// One metadata context.
    pub const META_CONTEXT: u32 = 4;
    const ERR: u32 = 1 << 31;
    /// The option is unknown to this server.
    pub const ERR_UNSUP: u32 = ERR | 1;
    /// The option is known but refused by policy.
    pub const ERR_POLICY: u32 = ERR | 2;
    /// The option was malformed or sent at the wrong time.
    pub const ERR_INVALID: u32 = ERR | 3;
    /// The option is not supported on this platform.
    pub const ERR_PLATFORM: u32 = ERR | 4;
    /// TLS is required first.
    pub const ERR_TLS_REQD: u32 = ERR | 5;
    /// The export does not exist.
    pub const ERR_UNKNOWN: u32 = ERR | 6;
    /// The server is shutting down.
    pub const ERR_SHUTDOWN: u32 = ERR | 7;
    /// The client must request block sizes first.
    pub const ERR_BLOCK_SIZE_REQD: u32 = ERR | 8;
    /// The request or its reply is too large.
    pub const ERR_TOO_BIG: u32 = ERR | 9;
    /// Extended headers must be negotiated first, or already were.
    pub const ERR_EXT_HEADER_REQD: u32 = ERR | 10;
}

/// `NBD_INFO_*` item types.
pub mod info {
    /// Size and transmission flags (always sent).
    pub const EXPORT: u16 = 0;
    /// Canonical export name.
    pub const NAME: u16 = 1;
    /// Human-readable description.
    pub const DESCRIPTION: u16 = 2;
    /// Minimum, preferred and maximum-payload block sizes.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags (`NBD_FLAG_*`).
pub mod tflags {
    /// Always set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// The export is read-only.
    pub const READ_ONLY: u16 = 1 << 1;
    /// `NBD_CMD_FLUSH` is supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// `NBD_CMD_FLAG_FUA` is supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// The export has rotational latency characteristics.
    pub const ROTATIONAL: u16 = 1 << 4;
    /// `NBD_CMD_TRIM` is supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// `NBD_CMD_WRITE_ZEROES` (and `NO_HOLE`) is supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// `NBD_CMD_FLAG_DF` is supported (only with structured replies).
    pub const SEND_DF: u16 = 1 << 7;
    /// Several connections see one consistent export.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// `NBD_CMD_CACHE` is supported.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// `NBD_CMD_FLAG_FAST_ZERO` is supported.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
    /// `NBD_CMD_BLOCK_STATUS` accepts a payload selecting contexts (extended headers).
    pub const BLOCK_STATUS_PAYLOAD: u16 = 1 << 12;
}

/// Command types (`NBD_CMD_*`).
pub mod cmd {
    /// Read.
    pub const READ: u16 = 0;
    /// Write (carries a payload).
    pub const WRITE: u16 = 1;
    /// Soft disconnect.
    pub const DISC: u16 = 2;
    /// Flush written data to stable storage.
    pub const FLUSH: u16 = 3;
    /// Discard a range (a hint).
    pub const TRIM: u16 = 4;
    /// Prefetch a range (a hint).
    pub const CACHE: u16 = 5;
    /// Write zeroes, possibly by punching holes.
    pub const WRITE_ZEROES: u16 = 6;
    /// Query metadata contexts over a range.
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags (`NBD_CMD_FLAG_*`).
pub mod cmd_flags {
    /// Force unit access: reply only once the effect is durable.
    pub const FUA: u16 = 1 << 0;
    /// `WRITE_ZEROES` must not punch holes.
    pub const NO_HOLE: u16 = 1 << 1;
    /// `READ` must be answered in one data chunk.
    pub const DF: u16 = 1 << 2;
    /// `BLOCK_STATUS` wants one extent only.
    pub const REQ_ONE: u16 = 1 << 3;
    /// `WRITE_ZEROES` must fail with `ENOTSUP` unless it is fast.
    pub const FAST_ZERO: u16 = 1 << 4;
    /// Extended headers: `length` is the payload length.
    pub const PAYLOAD_LEN: u16 = 1 << 5;
    /// Every flag this server knows.
    pub const KNOWN: u16 = FUA | NO_HOLE | DF | REQ_ONE | FAST_ZERO | PAYLOAD_LEN;
}

/// Structured reply chunk types (`NBD_REPLY_TYPE_*`) and flags.
pub mod reply {
    /// Last chunk of a reply.
    pub const FLAG_DONE: u16 = 1 << 0;
    /// No payload (used with `FLAG_DONE`).
    pub const NONE: u16 = 0;
    /// Offset plus data.
    pub const OFFSET_DATA: u16 = 1;
    /// Offset plus a length that reads as zeroes.
    pub const OFFSET_HOLE: u16 = 2;
    /// Context id plus 32-bit extents.
    pub const BLOCK_STATUS: u16 = 5;
    /// Context id, count plus 64-bit extents (extended headers).
    pub const BLOCK_STATUS_EXT: u16 = 6;
    /// Error with a message.
    pub const ERROR: u16 = (1 << 15) | 1;
    /// Error with a message and the offset where it happened.
    pub const ERROR_OFFSET: u16 = (1 << 15) | 2;
}

/// Error values sent on the wire.
pub mod errno {
    /// Operation not permitted (read-only export).
    pub const EPERM: u32 = 1;
    /// Input/output error.
    pub const EIO: u32 = 5;
    /// Out of memory.
    pub const ENOMEM: u32 = 12;
    /// Invalid request.
    pub const EINVAL: u32 = 22;
    /// No space left (write past the end, or the backing store is full).
    pub const ENOSPC: u32 = 28;
    /// Request too large for `DF` or without payload.
    pub const EOVERFLOW: u32 = 75;
    /// `FAST_ZERO` cannot be fast.
    pub const ENOTSUP: u32 = 95;
    /// The server is shutting down.
    pub const ESHUTDOWN: u32 = 108;
}

/// `base:allocation` state bits.
pub mod state {
    /// The range is a hole (not allocated).
    pub const HOLE: u32 = 1 << 0;
    /// The range reads as zeroes.
    pub const ZERO: u32 = 1 << 1;
}

/// The one standard metadata context.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// qemu's metadata context: per extent, the depth in the backing chain that allocates
/// it (0 = none, 1 = the top image, 2 = its backing, …).
pub const ALLOCATION_DEPTH: &str = "qemu:allocation-depth";

/// Longest string the spec allows (export names, queries, messages).
pub const MAX_STRING_LEN: usize = 4096;

/// Option data longer than this is skipped without being kept in memory and refused
/// with `NBD_REP_ERR_TOO_BIG`. Big enough for a meta-context request listing many queries.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;

/// Why an option's data was refused (`NBD_REP_ERR_INVALID` with this message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidOption(pub String);

impl fmt::Display for InvalidOption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The data of `NBD_OPT_INFO` and `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// Export name (`""` is the default export).
    pub name: String,
    /// Requested `NBD_INFO_*` items, in the client's order.
    pub items: Vec<u16>,
}

/// The data of `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    /// Export the contexts are for.
    pub export: String,
    /// Queries (context names or namespace wildcards like `base:`).
    pub queries: Vec<String>,
}

/// A decoded client option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    /// `NBD_OPT_EXPORT_NAME` with the export's name.
    ExportName(String),
    /// `NBD_OPT_ABORT`.
    Abort,
    /// `NBD_OPT_LIST`.
    List,
    /// `NBD_OPT_STARTTLS`.
    StartTls,
    /// `NBD_OPT_INFO`.
    Info(InfoRequest),
    /// `NBD_OPT_GO`.
    Go(InfoRequest),
    /// `NBD_OPT_STRUCTURED_REPLY`.
    StructuredReply,
    /// `NBD_OPT_LIST_META_CONTEXT`.
    ListMetaContext(MetaContextRequest),
    /// `NBD_OPT_SET_META_CONTEXT`.
    SetMetaContext(MetaContextRequest),
    /// `NBD_OPT_EXTENDED_HEADERS`.
    ExtendedHeaders,
    /// Any option this server does not implement (answered `NBD_REP_ERR_UNSUP`).
    Unknown(u32),
}

/// Decodes an option's data. An `Err` is answered with `NBD_REP_ERR_INVALID`; the
/// session stays in sync because the caller has already consumed exactly `data`.
pub fn parse_option(option: u32, data: &[u8]) -> Result<ClientOption, InvalidOption> {
    let no_data = |o: ClientOption, name: &str| {
        if data.is_empty() {
            Ok(o)
        } else {
            Err(InvalidOption(format!("{name} takes no data")))
        }
    };
    match option {
        opt::EXPORT_NAME => {
            // EXPORT_NAME cannot be answered with an error: the caller disconnects.
            Ok(ClientOption::ExportName(parse_string(data, "export name")?))
        }
        // ABORT with data is still an abort (the spec asks servers to ACK it anyway).
        opt::ABORT => Ok(ClientOption::Abort),
        opt::LIST => no_data(ClientOption::List, "NBD_OPT_LIST"),
        opt::STARTTLS => no_data(ClientOption::StartTls, "NBD_OPT_STARTTLS"),
        opt::INFO => Ok(ClientOption::Info(parse_info_request(data)?)),
        opt::GO => Ok(ClientOption::Go(parse_info_request(data)?)),
        opt::STRUCTURED_REPLY => no_data(ClientOption::StructuredReply, "NBD_OPT_STRUCTURED_REPLY"),
        opt::LIST_META_CONTEXT => Ok(ClientOption::ListMetaContext(parse_meta_request(data)?)),
        opt::SET_META_CONTEXT => Ok(ClientOption::SetMetaContext(parse_meta_request(data)?)),
        opt::EXTENDED_HEADERS => no_data(ClientOption::ExtendedHeaders, "NBD_OPT_EXTENDED_HEADERS"),
        other => Ok(ClientOption::Unknown(other)),
    }
}

/// A cursor over option data that turns every short read into a clear refusal.
struct Cursor<'a> {
    data: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], InvalidOption> {
        if self.data.len() < n {
            return Err(InvalidOption(format!(
                "option data ends inside the {what} ({} of {n} bytes left)",
                self.data.len()
            )));
        }
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        Ok(head)
    }

    fn u16(&mut self, what: &str) -> Result<u16, InvalidOption> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, what: &str) -> Result<u32, InvalidOption> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A 32-bit length followed by that many bytes of UTF-8.
    fn string(&mut self, what: &str) -> Result<String, InvalidOption> {
        let len = self.u32(what)? as usize;
        if len > MAX_STRING_LEN {
            return Err(InvalidOption(format!(
                "{what} is {len} bytes, longer than {MAX_STRING_LEN}"
            )));
        }
        let bytes = self.take(len, what)?;
        parse_string(bytes, what)
    }

    fn finish(&self, what: &str) -> Result<(), InvalidOption> {
        if self.data.is_empty() {
            Ok(())
        } else {
            Err(InvalidOption(format!(
                "{} unexpected bytes after the {what}",
                self.data.len()
            )))
        }
    }
}

fn parse_string(bytes: &[u8], what: &str) -> Result<String, InvalidOption> {
    if bytes.len() > MAX_STRING_LEN {
        return Err(InvalidOption(format!(
            "{what} is {} bytes, longer than {MAX_STRING_LEN}",
            bytes.len()
        )));
    }
    if bytes.contains(&0) {
        return Err(InvalidOption(format!("{what} contains a NUL byte")));
    }
    String::from_utf8(bytes.to_vec()).map_err(|_| InvalidOption(format!("{what} is not UTF-8")))
}

fn parse_info_request(data: &[u8]) -> Result<InfoRequest, InvalidOption> {
    let mut c = Cursor { data };
    let name = c.string("export name")?;
    let count = c.u16("information request count")?;
    let mut items = Vec::with_capacity(usize::from(count).min(c.data.len() / 2));
    for _ in 0..count {
        items.push(c.u16("information request list")?);
    }
    c.finish("information request list")?;
    Ok(InfoRequest { name, items })
}

fn parse_meta_request(data: &[u8]) -> Result<MetaContextRequest, InvalidOption> {
    let mut c = Cursor { data };
    let export = c.string("export name")?;
    let count = c.u32("query count")?;
    // Every query takes at least 4 bytes, which bounds the allocation by the data size.
    let mut queries = Vec::with_capacity((count as usize).min(c.data.len() / 4));
    for _ in 0..count {
        queries.push(c.string("meta context query")?);
    }
    c.finish("meta context queries")?;
    Ok(MetaContextRequest { export, queries })
}

/// Appends an option reply (`magic, option, type, length, data`).
pub fn encode_option_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, data: &[u8]) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&len_u32(data.len()).to_be_bytes());
    out.extend_from_slice(data);
}

/// Converts a length that is bounded by construction (a string, a reply) to the wire's u32.
fn len_u32(len: usize) -> u32 {
    u32::try_from(len).expect("reply payloads are bounded well below 4 GiB")
}

/// Data of an `NBD_REP_INFO` carrying `NBD_INFO_EXPORT`.
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut d = Vec::with_capacity(12);
    d.extend_from_slice(&info::EXPORT.to_be_bytes());
    d.extend_from_slice(&size.to_be_bytes());
    d.extend_from_slice(&flags.to_be_bytes());
    d
}

/// Data of an `NBD_REP_INFO` carrying `NBD_INFO_NAME` or `NBD_INFO_DESCRIPTION`.
pub fn info_string(item: u16, text: &str) -> Vec<u8> {
    let mut d = Vec::with_capacity(2 + text.len());
    d.extend_from_slice(&item.to_be_bytes());
    d.extend_from_slice(text.as_bytes());
    d
}

/// Data of an `NBD_REP_INFO` carrying `NBD_INFO_BLOCK_SIZE`.
pub fn info_block_size(minimum: u32, preferred: u32, maximum: u32) -> Vec<u8> {
    let mut d = Vec::with_capacity(14);
    d.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
    d.extend_from_slice(&minimum.to_be_bytes());
    d.extend_from_slice(&preferred.to_be_bytes());
    d.extend_from_slice(&maximum.to_be_bytes());
    d
}

/// Data of an `NBD_REP_SERVER` (one export in a list).
pub fn rep_server(name: &str) -> Vec<u8> {
    let mut d = Vec::with_capacity(4 + name.len());
    d.extend_from_slice(&len_u32(name.len()).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d
}

/// Data of an `NBD_REP_META_CONTEXT`.
pub fn rep_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut d = Vec::with_capacity(4 + name.len());
    d.extend_from_slice(&id.to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d
}

/// Which request and reply headers a connection uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ReplyMode {
    /// Simple replies only (no structured replies negotiated).
    Simple,
    /// Structured replies with compact headers.
    Structured,
    /// Extended headers (structured replies with 32-byte headers, 64-bit lengths).
    Extended,
}

impl ReplyMode {
    /// Length of a request header in this mode.
    pub fn request_len(self) -> usize {
        match self {
            ReplyMode::Extended => EXTENDED_REQUEST_LEN,
            _ => COMPACT_REQUEST_LEN,
        }
    }
}

/// A request header as sent by the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub command: u16,
    /// Opaque cookie echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Effect length, or payload length with `PAYLOAD_LEN`/`WRITE`.
    pub length: u64,
}

/// The header's magic did not match the negotiated mode: the stream is out of sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadRequestMagic(pub u32);

/// Decodes a request header; `buf` must be `mode.request_len()` bytes.
pub fn decode_request(mode: ReplyMode, buf: &[u8]) -> Result<RequestHeader, BadRequestMagic> {
    assert_eq!(buf.len(), mode.request_len(), "caller reads whole headers");
    let u16_at = |i: usize| u16::from_be_bytes([buf[i], buf[i + 1]]);
    let u32_at = |i: usize| u32::from_be_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
    let u64_at = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&buf[i..i + 8]);
        u64::from_be_bytes(b)
    };
    let magic = u32_at(0);
    let expected = if mode == ReplyMode::Extended {
        EXTENDED_REQUEST_MAGIC
    } else {
        REQUEST_MAGIC
    };
    if magic != expected {
        return Err(BadRequestMagic(magic));
    }
    let length = if mode == ReplyMode::Extended {
        u64_at(24)
    } else {
        u64::from(u32_at(24))
    };
    Ok(RequestHeader {
        flags: u16_at(4),
        command: u16_at(6),
        cookie: u64_at(8),
        offset: u64_at(16),
        length,
    })
}

/// Encodes a request header (used by tests, benchmarks and the client side).
pub fn encode_request(out: &mut Vec<u8>, mode: ReplyMode, req: &RequestHeader) {
    if mode == ReplyMode::Extended {
        out.extend_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
    } else {
        out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    }
    out.extend_from_slice(&req.flags.to_be_bytes());
    out.extend_from_slice(&req.command.to_be_bytes());
    out.extend_from_slice(&req.cookie.to_be_bytes());
    out.extend_from_slice(&req.offset.to_be_bytes());
    if mode == ReplyMode::Extended {
        out.extend_from_slice(&req.length.to_be_bytes());
    } else {
        let len = u32::try_from(req.length).expect("compact requests carry 32-bit lengths");
        out.extend_from_slice(&len.to_be_bytes());
    }
}

/// Appends a simple reply header.
pub fn encode_simple_reply(out: &mut Vec<u8>, error: u32, cookie: u64) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
}

/// Appends a structured (compact) or extended chunk header. `offset` is the request's
/// offset, echoed by extended headers only.
pub fn encode_chunk_header(
    out: &mut Vec<u8>,
    mode: ReplyMode,
    flags: u16,
    chunk_type: u16,
    cookie: u64,
    offset: u64,
    payload_len: u64,
) {
    match mode {
        ReplyMode::Extended => {
            out.extend_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
            out.extend_from_slice(&flags.to_be_bytes());
            out.extend_from_slice(&chunk_type.to_be_bytes());
            out.extend_from_slice(&cookie.to_be_bytes());
            out.extend_from_slice(&offset.to_be_bytes());
            out.extend_from_slice(&payload_len.to_be_bytes());
        }
        ReplyMode::Structured | ReplyMode::Simple => {
            out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
            out.extend_from_slice(&flags.to_be_bytes());
            out.extend_from_slice(&chunk_type.to_be_bytes());
            out.extend_from_slice(&cookie.to_be_bytes());
            let len = u32::try_from(payload_len).expect("compact chunks carry < 4 GiB");
            out.extend_from_slice(&len.to_be_bytes());
        }
    }
}

/// Human-readable name of an option, for logs.
pub fn option_name(option: u32) -> String {
    let name = match option {
        opt::EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
        opt::ABORT => "NBD_OPT_ABORT",
        opt::LIST => "NBD_OPT_LIST",
        opt::PEEK_EXPORT => "NBD_OPT_PEEK_EXPORT",
        opt::STARTTLS => "NBD_OPT_STARTTLS",
        opt::INFO => "NBD_OPT_INFO",
        opt::GO => "NBD_OPT_GO",
        opt::STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        opt::LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT",
        opt::SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        opt::EXTENDED_HEADERS => "NBD_OPT_EXTENDED_HEADERS",
        other => return format!("option {other}"),
    };
    name.to_owned()
}

/// Human-readable name of a command, for logs.
pub fn command_name(command: u16) -> String {
    let name = match command {
        cmd::READ => "READ",
        cmd::WRITE => "WRITE",
        cmd::DISC => "DISC",
        cmd::FLUSH => "FLUSH",
        cmd::TRIM => "TRIM",
        cmd::CACHE => "CACHE",
        cmd::WRITE_ZEROES => "WRITE_ZEROES",
        cmd::BLOCK_STATUS => "BLOCK_STATUS",
        other => return format!("command {other}"),
    };
    name.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn go_data(name: &str, items: &[u16]) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(items.len() as u16).to_be_bytes());
        for i in items {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    #[test]
    fn go_with_name_and_block_size_request_decodes() {
        let parsed = parse_option(opt::GO, &go_data("disk", &[info::BLOCK_SIZE])).unwrap();
        assert_eq!(
            parsed,
            ClientOption::Go(InfoRequest {
                name: "disk".into(),
                items: vec![info::BLOCK_SIZE]
            })
        );
    }

    #[test]
    fn go_whose_name_length_exceeds_the_data_is_invalid() {
        let mut d = go_data("disk", &[]);
        d[3] = 200; // name length now claims 200 bytes
        assert!(parse_option(opt::GO, &d).is_err());
    }

    #[test]
    fn go_with_trailing_bytes_is_invalid() {
        let mut d = go_data("", &[]);
        d.push(0);
        assert!(parse_option(opt::GO, &d).is_err());
    }

    #[test]
    fn go_with_huge_request_count_is_invalid_without_allocating_it() {
        let mut d = go_data("", &[]);
        let n = d.len();
        d[n - 2..].copy_from_slice(&u16::MAX.to_be_bytes());
        assert!(parse_option(opt::GO, &d).is_err());
    }

    #[test]
    fn export_name_with_nul_is_invalid() {
        assert!(parse_option(opt::EXPORT_NAME, b"a\0b").is_err());
    }

    #[test]
    fn meta_context_query_count_that_lies_is_invalid() {
        let mut d = Vec::new();
        d.extend_from_slice(&0u32.to_be_bytes());
        d.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_option(opt::SET_META_CONTEXT, &d).is_err());
    }

    #[test]
    fn list_with_data_is_invalid() {
        assert!(parse_option(opt::LIST, b"x").is_err());
    }

    #[test]
    fn unknown_option_is_reported_as_unknown() {
        assert_eq!(
            parse_option(0x1234, b"whatever"),
            Ok(ClientOption::Unknown(0x1234))
        );
    }

    #[test]
    fn compact_request_round_trips() {
        let req = RequestHeader {
            flags: 1,
            command: 0,
            cookie: 7,
            offset: 4096,
            length: 512,
        };
        let mut buf = Vec::new();
        encode_request(&mut buf, ReplyMode::Structured, &req);
        assert_eq!(buf.len(), COMPACT_REQUEST_LEN);
        assert_eq!(decode_request(ReplyMode::Structured, &buf), Ok(req));
    }

    #[test]
    fn extended_request_round_trips_64_bit_length() {
        let req = RequestHeader {
            flags: 0,
            command: 7,
            cookie: 9,
            offset: 1,
            length: 1 << 40,
        };
        let mut buf = Vec::new();
        encode_request(&mut buf, ReplyMode::Extended, &req);
        assert_eq!(buf.len(), EXTENDED_REQUEST_LEN);
        assert_eq!(decode_request(ReplyMode::Extended, &buf), Ok(req));
    }

    #[test]
    fn compact_request_in_extended_mode_is_bad_magic() {
        let mut buf = Vec::new();
        encode_request(
            &mut buf,
            ReplyMode::Simple,
            &RequestHeader {
                flags: 0,
                command: 0,
                cookie: 0,
                offset: 0,
                length: 0,
            },
        );
        buf.extend_from_slice(&[0; 4]);
        assert_eq!(
            decode_request(ReplyMode::Extended, &buf),
            Err(BadRequestMagic(REQUEST_MAGIC))
        );
    }
}
