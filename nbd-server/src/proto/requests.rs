//! Request headers (client → server): decoding for the server, encoding for the client.

use super::{
    COMPACT_REQUEST_LEN, EXTENDED_REQUEST_LEN, EXTENDED_REQUEST_MAGIC, REQUEST_MAGIC, be_u16,
    be_u32, be_u64,
};

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
    let u16_at = |i: usize| be_u16(&buf[i..]);
    let u32_at = |i: usize| be_u32(&buf[i..]);
    let u64_at = |i: usize| be_u64(&buf[i..]);
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
