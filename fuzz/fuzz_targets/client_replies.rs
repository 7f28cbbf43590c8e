//! Fuzzes the NBD client's reply decoders (`proto::decode_option_reply_header`,
//! `decode_info_reply`, `decode_meta_context_reply`, `decode_export_name_reply`,
//! `decode_reply_magic`, `check_simple_reply`, `check_chunk_header` and the chunk payload
//! decoders), driven the way the client's socket code drives them.
//!
//! Input layout: 1 byte chooses the request's command and whether structured replies
//! were negotiated, 8 bytes its offset, 4 its length (4 more: the `base:allocation`
//! context id); the rest is a stream of records. A record's first byte picks an option
//! reply (the next byte picks the option, then a 20-byte header and its data) or a
//! transmission reply (a 4-byte magic, a header, and the payload the decoders ask for).
//! A short input ends the stream like a closed connection.
//!
//! Invariants checked: no decoder panics; an option reply's data is at most
//! `MAX_OPTION_REPLY_LEN`; every payload length accepted is bounded by what was asked
//! (read data by the request's length, extents by one per requested byte, error chunks
//! by the spec's string limit) before the caller would allocate it; data and holes lie
//! inside the request and never overlap; extents are non-empty and stay inside the
//! request; an `ERROR_OFFSET` lies inside the request.

#![no_main]

use libfuzzer_sys::fuzz_target;
use thinline_nbd::proto::{
    self, CHUNK_HEADER_REST_LEN, ChunkPayload, DATA_OFFSET_LEN, EXPORT_NAME_REPLY_LEN, HOLE_LEN,
    InfoReply, MAX_EXTENTS, MAX_OPTION_REPLY_LEN, MAX_STRING_LEN, OPTION_REPLY_HEADER_LEN,
    REPLY_MAGIC_LEN, ReadCoverage, ReplyHeaderKind, RequestedRange, SIMPLE_REPLY_REST_LEN,
    SimpleReplyPayload, cmd, opt, rep, reply,
};

const COMMANDS: [u16; 4] = [cmd::READ, cmd::BLOCK_STATUS, cmd::READ, cmd::FLUSH];
const OPTIONS: [u32; 4] = [
    opt::GO,
    opt::SET_META_CONTEXT,
    opt::STRUCTURED_REPLY,
    opt::EXPORT_NAME,
];

/// The input as a stream the decoders read from.
struct Stream<'a>(&'a [u8]);

impl<'a> Stream<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N).map(|b| b.try_into().expect("N bytes"))
    }
}

/// What one request's reply has delivered so far.
#[derive(Default)]
struct Assembled {
    coverage: ReadCoverage,
    extents: bool,
}

fuzz_target!(|data: &[u8]| {
    let mut s = Stream(data);
    let (Some([sel]), Some(offset), Some(length), Some(context)) = (
        s.array::<1>(),
        s.array::<8>(),
        s.array::<4>(),
        s.array::<4>(),
    ) else {
        return;
    };
    let length = u32::from_be_bytes(length);
    let request = RequestedRange {
        command: COMMANDS[usize::from(sel & 3)],
        offset: u64::from_be_bytes(offset),
        length,
    };
    let structured = sel & 4 != 0;
    let context_id = (sel & 8 != 0).then(|| u32::from_be_bytes(context));
    let mut assembled = Assembled::default();
    while let Some([tag]) = s.array::<1>() {
        let more = if tag & 1 == 0 {
            option_reply(&mut s, OPTIONS[usize::from(tag >> 1) % OPTIONS.len()])
        } else {
            transmission_reply(&mut s, &request, structured, context_id, &mut assembled)
        };
        if !more {
            break;
        }
    }
});

/// One option reply; `false` when the stream ended.
fn option_reply(s: &mut Stream, option: u32) -> bool {
    if option == opt::EXPORT_NAME {
        let Some(reply) = s.array::<EXPORT_NAME_REPLY_LEN>() else {
            return false;
        };
        let _ = proto::decode_export_name_reply(&reply);
        return true;
    }
    let Some(head) = s.array::<OPTION_REPLY_HEADER_LEN>() else {
        return false;
    };
    let Ok(header) = proto::decode_option_reply_header(&head, option) else {
        return true;
    };
    assert!(header.length <= MAX_OPTION_REPLY_LEN);
    let Some(data) = s.take(header.length as usize) else {
        return false;
    };
    match header.reply_type {
        rep::INFO => {
            if let Ok(info) = proto::decode_info_reply(data) {
                match info {
                    InfoReply::Export { .. } => assert_eq!(data.len(), 12),
                    InfoReply::BlockSize { .. } => assert_eq!(data.len(), 14),
                    InfoReply::Other(_) => assert!(data.len() >= 2),
                }
            }
        }
        rep::META_CONTEXT => {
            if let Ok((_, name)) = proto::decode_meta_context_reply(data) {
                assert_eq!(name.len() + 4, data.len());
            }
        }
        k => {
            let _ = proto::reply_name(k);
            let _ = proto::sanitize(data);
        }
    }
    true
}

/// One simple reply or structured chunk; `false` when the stream ended or the client
/// would drop the connection.
fn transmission_reply(
    s: &mut Stream,
    request: &RequestedRange,
    structured: bool,
    context_id: Option<u32>,
    assembled: &mut Assembled,
) -> bool {
    let Some(magic) = s.array::<REPLY_MAGIC_LEN>() else {
        return false;
    };
    match proto::decode_reply_magic(magic) {
        Err(_) => false,
        Ok(ReplyHeaderKind::Simple) => {
            let Some(rest) = s.array::<SIMPLE_REPLY_REST_LEN>() else {
                return false;
            };
            let header = proto::decode_simple_reply(&rest);
            match proto::check_simple_reply(request, structured, header.error) {
                Ok(SimpleReplyPayload::Data(n)) => {
                    assert_eq!(n, request.length);
                    assert_eq!(request.command, cmd::READ);
                    assert!(!structured);
                    s.take(n as usize).is_some()
                }
                Ok(SimpleReplyPayload::Error(value)) => {
                    assert_ne!(value, 0);
                    true
                }
                Ok(SimpleReplyPayload::Done) => {
                    assert!(request.command != cmd::READ && request.command != cmd::BLOCK_STATUS);
                    true
                }
                Err(_) => false,
            }
        }
        Ok(ReplyHeaderKind::Structured) => {
            let Some(rest) = s.array::<CHUNK_HEADER_REST_LEN>() else {
                return false;
            };
            let header = proto::decode_chunk_header(&rest);
            let Ok(payload) = proto::check_chunk_header(request, &header) else {
                return false;
            };
            chunk(s, request, &header, payload, context_id, assembled)
        }
    }
}

fn chunk(
    s: &mut Stream,
    request: &RequestedRange,
    header: &proto::ChunkHeader,
    payload: ChunkPayload,
    context_id: Option<u32>,
    assembled: &mut Assembled,
) -> bool {
    let start = u128::from(request.offset);
    let end = start + u128::from(request.length);
    let inside = |r: &std::ops::Range<u64>| {
        start <= u128::from(r.start) && u128::from(r.end) <= end && r.start <= r.end
    };
    match payload {
        ChunkPayload::None => {
            assert_eq!(header.length, 0);
            assert!(header.done());
            true
        }
        ChunkPayload::Data { data_len } => {
            assert_eq!(request.command, cmd::READ);
            assert!(data_len <= request.length);
            assert_eq!(header.length, data_len + 8);
            let Some(offset) = s.array::<DATA_OFFSET_LEN>() else {
                return false;
            };
            let Ok(range) = proto::decode_data_offset(request, data_len, &offset) else {
                return false;
            };
            assert!(inside(&range), "{range:?} outside {request:?}");
            assert_eq!(range.end - range.start, u64::from(data_len));
            if !assembled.coverage.cover(range) {
                return false;
            }
            assert!(assembled.coverage.bytes() <= u64::from(request.length));
            s.take(data_len as usize).is_some()
        }
        ChunkPayload::Hole => {
            assert_eq!(request.command, cmd::READ);
            let Some(hole) = s.array::<HOLE_LEN>() else {
                return false;
            };
            let Ok(range) = proto::decode_hole(request, &hole) else {
                return false;
            };
            assert!(inside(&range), "{range:?} outside {request:?}");
            assert!(range.start < range.end);
            if !assembled.coverage.cover(range) {
                return false;
            }
            assert!(assembled.coverage.bytes() <= u64::from(request.length));
            true
        }
        ChunkPayload::BlockStatus { length } => {
            assert_eq!(request.command, cmd::BLOCK_STATUS);
            let extents_bound = u64::from(MAX_EXTENTS.min(request.length));
            assert!(u64::from(length) <= 4 + 8 * extents_bound);
            let Some(bytes) = s.take(length as usize) else {
                return false;
            };
            let Ok(extents) = proto::decode_block_status(request, bytes, context_id) else {
                return false;
            };
            assert!(!extents.is_empty());
            assert!(extents.iter().all(|&(len, _)| len > 0));
            let total: u128 = extents.iter().map(|&(len, _)| u128::from(len)).sum();
            assert!(
                start + total <= end,
                "extents of {total} bytes for {request:?}"
            );
            if assembled.extents {
                return false;
            }
            assembled.extents = true;
            true
        }
        ChunkPayload::Error { length } => {
            assert!(length >= 6 && length as usize <= 6 + MAX_STRING_LEN + 8);
            let Some(bytes) = s.take(length as usize) else {
                return false;
            };
            match proto::decode_error_chunk(request, header.chunk_type, bytes) {
                Ok((value, message)) => {
                    assert_ne!(value, 0);
                    if header.chunk_type == reply::ERROR_OFFSET {
                        assert!(message.contains("at offset"));
                    }
                    true
                }
                Err(_) => false,
            }
        }
    }
}
