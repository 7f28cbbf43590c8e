//! Transmission replies (server → client): the server's encoders and the client's
//! decoders of simple replies and structured reply chunks.

use std::collections::BTreeMap;
use std::ops::Range;

use super::{
    EXTENDED_REPLY_MAGIC, InvalidReply, MAX_STRING_LEN, ReplyMode, SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC, be_u16, be_u32, be_u64, cmd, command_name, reply, sanitize,
};

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

// The client's side: reply headers and chunk payloads in, each checked against the request.

/// Length of a reply's magic, read first to learn which header follows.
pub const REPLY_MAGIC_LEN: usize = 4;
/// Length of a simple reply header after its magic (`error, cookie`).
pub const SIMPLE_REPLY_REST_LEN: usize = 12;
/// Length of a structured chunk header after its magic (`flags, type, cookie, length`).
pub const CHUNK_HEADER_REST_LEN: usize = 16;
/// Length of an `OFFSET_DATA` chunk's offset, before its data.
pub const DATA_OFFSET_LEN: usize = 8;
/// Length of an `OFFSET_HOLE` chunk's payload.
pub const HOLE_LEN: usize = 12;

/// Most extents accepted in one `NBD_REPLY_TYPE_BLOCK_STATUS` chunk (the spec's SHOULD limit).
pub const MAX_EXTENTS: u32 = 1 << 20;

/// Largest message accepted in an error chunk (the spec's string limit).
const MAX_ERROR_MESSAGE: u32 = MAX_STRING_LEN as u32;

/// The header that follows a reply magic. The client never negotiates extended headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeaderKind {
    /// A simple reply: [`SIMPLE_REPLY_REST_LEN`] more bytes.
    Simple,
    /// A structured reply chunk: [`CHUNK_HEADER_REST_LEN`] more bytes.
    Structured,
}

/// Decodes a reply magic.
pub fn decode_reply_magic(magic: [u8; REPLY_MAGIC_LEN]) -> Result<ReplyHeaderKind, InvalidReply> {
    match u32::from_be_bytes(magic) {
        SIMPLE_REPLY_MAGIC => Ok(ReplyHeaderKind::Simple),
        STRUCTURED_REPLY_MAGIC => Ok(ReplyHeaderKind::Structured),
        EXTENDED_REPLY_MAGIC => Err(InvalidReply(
            "extended reply header, but extended headers were not negotiated".into(),
        )),
        other => Err(InvalidReply(format!("bad reply magic {other:#010x}"))),
    }
}

/// A simple reply header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReplyHeader {
    /// The error value (0 = success).
    pub error: u32,
    /// The request's cookie.
    pub cookie: u64,
}

/// Decodes a simple reply header after its magic.
pub fn decode_simple_reply(rest: &[u8; SIMPLE_REPLY_REST_LEN]) -> SimpleReplyHeader {
    SimpleReplyHeader {
        error: be_u32(&rest[0..4]),
        cookie: be_u64(&rest[4..12]),
    }
}

/// A structured reply chunk header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    /// `NBD_REPLY_FLAG_*`.
    pub flags: u16,
    /// `NBD_REPLY_TYPE_*`.
    pub chunk_type: u16,
    /// The request's cookie.
    pub cookie: u64,
    /// Payload length, not yet checked.
    pub length: u32,
}

impl ChunkHeader {
    /// Whether this is the reply's last chunk.
    pub fn done(&self) -> bool {
        self.flags & reply::FLAG_DONE != 0
    }
}

/// Decodes a structured reply chunk header after its magic.
pub fn decode_chunk_header(rest: &[u8; CHUNK_HEADER_REST_LEN]) -> ChunkHeader {
    ChunkHeader {
        flags: be_u16(&rest[0..2]),
        chunk_type: be_u16(&rest[2..4]),
        cookie: be_u64(&rest[4..12]),
        length: be_u32(&rest[12..16]),
    }
}

/// The request a reply answers, as the client sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestedRange {
    /// `NBD_CMD_READ` or `NBD_CMD_BLOCK_STATUS` (other commands expect no payload).
    pub command: u16,
    /// Offset of the request.
    pub offset: u64,
    /// Length of the request.
    pub length: u32,
}

impl RequestedRange {
    /// End of the requested range (saturated: the client's requests never reach it).
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(u64::from(self.length))
    }

    /// `[start, start + length)` if it lies inside the request.
    fn inside(&self, start: u64, length: u64) -> Option<Range<u64>> {
        let end = start.checked_add(length)?;
        (start >= self.offset && end <= self.end()).then_some(start..end)
    }
}

/// What follows a simple reply header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimpleReplyPayload {
    /// An error reply: nothing follows.
    Error(u32),
    /// A successful read without structured replies: the request's length of data follows.
    Data(u32),
    /// A success without payload.
    Done,
}

/// Checks a simple reply against the request it answers and says what follows it.
pub fn check_simple_reply(
    request: &RequestedRange,
    structured: bool,
    error: u32,
) -> Result<SimpleReplyPayload, InvalidReply> {
    if error != 0 {
        return Ok(SimpleReplyPayload::Error(error));
    }
    match request.command {
        cmd::READ if !structured => Ok(SimpleReplyPayload::Data(request.length)),
        cmd::READ => Err(InvalidReply(
            "simple reply with data although structured replies were negotiated".into(),
        )),
        cmd::BLOCK_STATUS => Err(InvalidReply(
            "simple success reply carries no block status".into(),
        )),
        _ => Ok(SimpleReplyPayload::Done),
    }
}

/// What follows a structured chunk header, once its length fits the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkPayload {
    /// `NBD_REPLY_TYPE_NONE`: nothing.
    None,
    /// `OFFSET_DATA`: a [`DATA_OFFSET_LEN`]-byte offset ([`decode_data_offset`]), then
    /// `data_len` bytes, at most the request's length.
    Data {
        /// Bytes of data after the offset.
        data_len: u32,
    },
    /// `OFFSET_HOLE`: [`HOLE_LEN`] bytes for [`decode_hole`].
    Hole,
    /// `BLOCK_STATUS`: `length` bytes for [`decode_block_status`].
    BlockStatus {
        /// Payload length.
        length: u32,
    },
    /// An error chunk: `length` bytes for [`decode_error_chunk`].
    Error {
        /// Payload length.
        length: u32,
    },
}

/// Checks a chunk header's type and payload length against the request, before the
/// caller reads (and allocates) the payload.
pub fn check_chunk_header(
    request: &RequestedRange,
    header: &ChunkHeader,
) -> Result<ChunkPayload, InvalidReply> {
    let length = header.length;
    let fail = |s: String| Err(InvalidReply(s));
    match (header.chunk_type, request.command) {
        (reply::NONE, _) => {
            if length != 0 {
                return fail(format!(
                    "NBD_REPLY_TYPE_NONE with {length} bytes of payload"
                ));
            }
            if !header.done() {
                return fail("NBD_REPLY_TYPE_NONE without NBD_REPLY_FLAG_DONE".into());
            }
            Ok(ChunkPayload::None)
        }
        (reply::OFFSET_DATA, cmd::READ) => {
            if length < 8 || length - 8 > request.length {
                return fail(format!(
                    "OFFSET_DATA chunk of {length} bytes for a read of {} bytes",
                    request.length
                ));
            }
            Ok(ChunkPayload::Data {
                data_len: length - 8,
            })
        }
        (reply::OFFSET_HOLE, cmd::READ) => {
            if length as usize != HOLE_LEN {
                return fail(format!("OFFSET_HOLE chunk of {length} bytes instead of 12"));
            }
            Ok(ChunkPayload::Hole)
        }
        (reply::BLOCK_STATUS, cmd::BLOCK_STATUS) => {
            // Every extent covers at least one byte of the request.
            let most = MAX_EXTENTS.min(request.length);
            if length < 12 || !(length - 4).is_multiple_of(8) || (length - 4) / 8 > most {
                return fail(format!("BLOCK_STATUS chunk of {length} bytes"));
            }
            Ok(ChunkPayload::BlockStatus { length })
        }
        (reply::OFFSET_DATA | reply::OFFSET_HOLE | reply::BLOCK_STATUS, command) => fail(format!(
            "chunk type {} in reply to {}",
            header.chunk_type,
            command_name(command)
        )),
        (k, _) if k & (1 << 15) != 0 => {
            let max = 6 + MAX_ERROR_MESSAGE + 8;
            if !(6..=max).contains(&length) {
                return fail(format!("error chunk of {length} bytes"));
            }
            Ok(ChunkPayload::Error { length })
        }
        (k, _) => fail(format!("unknown reply chunk type {k}")),
    }
}

/// Decodes an `OFFSET_DATA` chunk's offset: the range its `data_len` bytes of data
/// fill, inside the request.
pub fn decode_data_offset(
    request: &RequestedRange,
    data_len: u32,
    offset: &[u8; DATA_OFFSET_LEN],
) -> Result<Range<u64>, InvalidReply> {
    let start = be_u64(offset);
    let n = u64::from(data_len);
    request.inside(start, n).ok_or_else(|| {
        InvalidReply(format!(
            "OFFSET_DATA chunk at {start}+{n} lies outside the request"
        ))
    })
}

/// Decodes an `OFFSET_HOLE` chunk's payload: the range that reads as zeroes, inside the
/// request.
pub fn decode_hole(
    request: &RequestedRange,
    payload: &[u8; HOLE_LEN],
) -> Result<Range<u64>, InvalidReply> {
    let start = be_u64(&payload[0..8]);
    let n = u64::from(be_u32(&payload[8..12]));
    if n == 0 {
        return Err(InvalidReply(format!(
            "OFFSET_HOLE chunk at {start} of length 0"
        )));
    }
    request.inside(start, n).ok_or_else(|| {
        InvalidReply(format!(
            "OFFSET_HOLE chunk at {start}+{n} lies outside the request"
        ))
    })
}

/// Decodes a `BLOCK_STATUS` chunk's payload for the context `context_id`: `(length,
/// flags)` extents from the request's offset, the last one clipped to the request.
pub fn decode_block_status(
    request: &RequestedRange,
    payload: &[u8],
    context_id: Option<u32>,
) -> Result<Vec<(u64, u32)>, InvalidReply> {
    let fail = |s: &str| Err(InvalidReply(s.into()));
    if payload.len() < 12 || !(payload.len() - 4).is_multiple_of(8) {
        return Err(InvalidReply(format!(
            "BLOCK_STATUS chunk of {} bytes",
            payload.len()
        )));
    }
    let id = be_u32(&payload[0..4]);
    if Some(id) != context_id {
        return Err(InvalidReply(format!(
            "BLOCK_STATUS chunk for unknown context id {id}"
        )));
    }
    let mut pos = request.offset;
    let end = request.end();
    let mut extents = Vec::with_capacity((payload.len() - 4) / 8);
    for e in payload[4..].chunks_exact(8) {
        let len = u64::from(be_u32(&e[0..4]));
        let flags = be_u32(&e[4..8]);
        if len == 0 {
            return fail("a block status extent of length 0");
        }
        if pos >= end {
            return fail("block status extents continue past the requested range");
        }
        // Only the last extent may reach past the request: clip it.
        let len = len.min(end - pos);
        pos += len;
        extents.push((len, flags));
    }
    Ok(extents)
}

/// Decodes an error chunk's payload: the error value and the message (sanitized, with
/// the offset of an `ERROR_OFFSET` chunk, which must lie inside the request).
pub fn decode_error_chunk(
    request: &RequestedRange,
    chunk_type: u16,
    payload: &[u8],
) -> Result<(u32, String), InvalidReply> {
    let length = payload.len();
    if length < 6 {
        return Err(InvalidReply(format!("error chunk of {length} bytes")));
    }
    let value = be_u32(&payload[0..4]);
    let msg_len = usize::from(be_u16(&payload[4..6]));
    let expected = match chunk_type {
        reply::ERROR => Some(6 + msg_len),
        reply::ERROR_OFFSET => Some(6 + msg_len + 8),
        _ => None,
    };
    if 6 + msg_len > length || expected.is_some_and(|e| e != length) {
        return Err(InvalidReply(format!(
            "error chunk of {length} bytes with a {msg_len}-byte message"
        )));
    }
    if value == 0 {
        return Err(InvalidReply("error chunk with error value 0".into()));
    }
    let mut message = sanitize(&payload[6..6 + msg_len]);
    if chunk_type == reply::ERROR_OFFSET {
        let at = be_u64(&payload[6 + msg_len..]);
        if at < request.offset || at >= request.end() {
            return Err(InvalidReply(format!(
                "ERROR_OFFSET at {at} lies outside the request"
            )));
        }
        if message.is_empty() {
            message = format!("at offset {at}");
        } else {
            message = format!("{message} (at offset {at})");
        }
    }
    Ok((value, message))
}

/// The parts of a read that data and hole chunks have filled so far, merged, so that
/// overlapping chunks and incomplete replies show.
#[derive(Debug, Clone, Default)]
pub struct ReadCoverage {
    /// start → end of each filled range, neighbours merged.
    ranges: BTreeMap<u64, u64>,
}

impl ReadCoverage {
    /// Records `range` as filled; `false` (and nothing recorded) if it overlaps what is.
    pub fn cover(&mut self, range: Range<u64>) -> bool {
        let (mut start, mut end) = (range.start, range.end);
        let before = self
            .ranges
            .range(..=start)
            .next_back()
            .map(|(&s, &e)| (s, e));
        let after = self.ranges.range(start..).next().map(|(&s, _)| s);
        if before.is_some_and(|(_, e)| e > start) || after.is_some_and(|s| s < end) {
            return false;
        }
        if let Some((s, _)) = before.filter(|&(_, e)| e == start) {
            self.ranges.remove(&s);
            start = s;
        }
        if let Some(e) = self.ranges.remove(&end) {
            end = e;
        }
        self.ranges.insert(start, end);
        true
    }

    /// Whether exactly `range` is filled.
    pub fn is_whole(&self, range: Range<u64>) -> bool {
        self.ranges.len() == 1 && self.ranges.get(&range.start) == Some(&range.end)
    }

    /// Bytes filled.
    pub fn bytes(&self) -> u64 {
        self.ranges.iter().map(|(s, e)| e - s).sum()
    }
}
