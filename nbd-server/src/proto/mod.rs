//! The NBD wire format, shared by the server and the client: constants, names, and the
//! decoders and encoders of options, requests and replies.
//!
//! Everything here is sans-IO: decoders take byte slices and return typed values or a
//! typed reason for refusal, encoders append to a `Vec<u8>`. The async handshake,
//! transmission and client code drive these functions, and the fuzz targets call them
//! directly. Names and values follow NetworkBlockDevice `doc/proto.md`, including the
//! extended-headers extension.
//!
//! - [`options`]: option data and option replies.
//! - [`requests`]: request headers.
//! - [`replies`]: simple replies and structured reply chunks.

pub mod options;
pub mod replies;
pub mod requests;
#[cfg(test)]
mod tests;

pub use options::*;
pub use replies::*;
pub use requests::*;

use std::fmt;

/// Why a server's reply was refused: the description the client puts in its error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidReply(pub String);

impl fmt::Display for InvalidReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

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

/// Name of an option reply type (`NBD_REP_*`), for messages.
pub fn reply_name(reply_type: u32) -> String {
    let name = match reply_type {
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

/// Whether an option reply type is an error (`NBD_REP_ERR_*`: bit 31 set).
pub fn is_error_reply(reply_type: u32) -> bool {
    reply_type & (1 << 31) != 0
}

/// Peer text made safe for logs: lossy UTF-8, control characters escaped, at most 512
/// characters.
pub fn sanitize(bytes: &[u8]) -> String {
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

/// Appends a string as the wire carries it: a 32-bit length, then the bytes.
pub fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&len_u32(s.len()).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Converts a length that is bounded by construction (a string, a reply) to the wire's u32.
fn len_u32(len: usize) -> u32 {
    u32::try_from(len).expect("reply payloads are bounded well below 4 GiB")
}

/// The big-endian u16 at the start of `b` (at least 2 bytes, checked by the caller).
pub(crate) fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

/// The big-endian u32 at the start of `b` (at least 4 bytes, checked by the caller).
pub(crate) fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// The big-endian u64 at the start of `b` (at least 8 bytes, checked by the caller).
pub(crate) fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}
