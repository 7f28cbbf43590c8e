//! Fuzzes request decoding and validation (`proto::decode_request`, `request::check`,
//! `request::parse_block_status_payload`, `request::check_block_status_range`).
//!
//! Input layout: 6 bytes choose the session (export size, minimum block, maximum payload,
//! capabilities, reply mode, number of metadata contexts, shutting down), the next
//! 32 bytes are a request header and the rest is a block-status payload. The header is
//! decoded as received in both compact and extended modes, and a second time with the
//! magic forced to the right value so that validation sees every header.
//!
//! Invariants checked on every verdict: a command that runs is inside the export,
//! aligned, permitted and within the maximum payload; a refusal never skips more than
//! `MAX_SKIPPABLE_PAYLOAD` and skips exactly the payload that follows the header, so
//! the stream stays in sync; the connection is only closed when a payload is too big
//! to skip; nothing but `NBD_CMD_DISC` runs while shutting down.

#![no_main]

use libfuzzer_sys::fuzz_target;
use thinline_nbd::export::Capabilities;
use thinline_nbd::proto::{
    self, COMPACT_REQUEST_LEN, EXTENDED_REQUEST_LEN, EXTENDED_REQUEST_MAGIC, REQUEST_MAGIC,
    ReplyMode, RequestHeader, cmd, cmd_flags, errno,
};
use thinline_nbd::request::{self, Command, MAX_SKIPPABLE_PAYLOAD, SessionLimits, Verdict};

const SIZES: [u64; 16] = [
    0,
    1,
    511,
    512,
    4096,
    1 << 20,
    (1 << 20) + 1000,
    1 << 30,
    (1 << 32) - 1,
    1 << 32,
    (1 << 32) + 512,
    1 << 40,
    1 << 63,
    u64::MAX - 511,
    u64::MAX - 1,
    u64::MAX,
];
const MIN_BLOCKS: [u32; 8] = [0, 1, 2, 512, 4096, 65536, 3, 1 << 31];
const MAX_PAYLOADS: [u32; 8] = [0, 1, 512, 4096, 65536, 32 << 20, 1 << 31, u32::MAX];
const MODES: [ReplyMode; 3] = [
    ReplyMode::Simple,
    ReplyMode::Structured,
    ReplyMode::Extended,
];

fuzz_target!(|data: &[u8]| {
    if data.len() < 6 {
        return;
    }
    let (sel, rest) = data.split_at(6);
    let (raw, payload) = rest.split_at(rest.len().min(EXTENDED_REQUEST_LEN));
    let mut header = [0u8; EXTENDED_REQUEST_LEN];
    header[..raw.len()].copy_from_slice(raw);

    let caps = sel[3];
    let base = SessionLimits {
        size: SIZES[usize::from(sel[0] & 15)],
        minimum_block: MIN_BLOCKS[usize::from(sel[1] & 7)],
        maximum_payload: MAX_PAYLOADS[usize::from(sel[2] & 7)],
        capabilities: Capabilities {
            read_only: caps & 1 != 0,
            flush: caps & 2 != 0,
            fua: caps & 4 != 0,
            trim: caps & 8 != 0,
            write_zeroes: caps & 16 != 0,
            fast_zero: caps & 32 != 0,
            cache: caps & 64 != 0,
            multi_conn: caps & 128 != 0,
            rotational: false,
        },
        mode: MODES[usize::from(sel[4] % 3)],
        meta_contexts: usize::from(sel[5] & 3),
        shutting_down: sel[5] & 4 != 0,
    };

    // The session the input chose, and the same session in every reply mode.
    for mode in MODES {
        let limits = SessionLimits { mode, ..base };
        let len = mode.request_len();
        let buf = &header[..len];
        let expected_magic = if mode == ReplyMode::Extended {
            EXTENDED_REQUEST_MAGIC
        } else {
            REQUEST_MAGIC
        };

        // As received: decodes exactly when the magic matches.
        let magic = u32::from_be_bytes(buf[..4].try_into().unwrap());
        match proto::decode_request(mode, buf) {
            Ok(h) => {
                assert_eq!(magic, expected_magic);
                round_trip(mode, buf, &h);
                check_one(&h, &limits, payload);
            }
            Err(bad) => {
                assert_ne!(magic, expected_magic);
                assert_eq!(bad.0, magic);
            }
        }

        // With the right magic, so validation sees every header.
        let mut fixed = buf.to_vec();
        fixed[..4].copy_from_slice(&expected_magic.to_be_bytes());
        let h = proto::decode_request(mode, &fixed).expect("right magic decodes");
        round_trip(mode, &fixed, &h);
        check_one(&h, &limits, payload);
        // And the other variants of the session.
        for variant in variants(&limits) {
            check_one(&h, &variant, payload);
        }
    }
});

fn variants(l: &SessionLimits) -> [SessionLimits; 4] {
    let mut read_only = *l;
    read_only.capabilities.read_only = !l.capabilities.read_only;
    let mut shutting = *l;
    shutting.shutting_down = !l.shutting_down;
    let mut contexts = *l;
    contexts.meta_contexts = if l.meta_contexts == 0 { 2 } else { 0 };
    let mut small = *l;
    small.size = 1 << 20;
    small.minimum_block = 512;
    small.maximum_payload = 1 << 16;
    [read_only, shutting, contexts, small]
}

fn round_trip(mode: ReplyMode, buf: &[u8], h: &RequestHeader) {
    assert_eq!(buf.len(), mode.request_len());
    if mode != ReplyMode::Extended {
        assert_eq!(buf.len(), COMPACT_REQUEST_LEN);
        assert!(h.length <= u64::from(u32::MAX));
    }
    let mut again = Vec::new();
    proto::encode_request(&mut again, mode, h);
    assert_eq!(again, buf, "request header does not round-trip");
}

/// Payload bytes that follow this header on the wire, whatever the verdict.
fn payload_len(h: &RequestHeader, l: &SessionLimits) -> u64 {
    let extended = l.mode == ReplyMode::Extended;
    if h.command == cmd::WRITE || (extended && h.flags & cmd_flags::PAYLOAD_LEN != 0) {
        h.length
    } else {
        0
    }
}

fn in_range(offset: u64, length: u64, size: u64) -> bool {
    offset.checked_add(length).is_some_and(|end| end <= size)
}

fn aligned(offset: u64, length: u64, l: &SessionLimits) -> bool {
    let m = u64::from(l.minimum_block.max(1));
    offset.is_multiple_of(m) && (length.is_multiple_of(m) || offset + length == l.size)
}

fn check_one(h: &RequestHeader, l: &SessionLimits, bs_payload: &[u8]) {
    let verdict = request::check(h, l);
    assert_eq!(verdict, request::check(h, l), "not deterministic");
    let payload = payload_len(h, l);
    let caps = &l.capabilities;
    if h.command == cmd::DISC {
        assert_eq!(verdict, Verdict::Run(Command::Disconnect));
        return;
    }
    if h.flags & !cmd_flags::KNOWN != 0 || l.shutting_down {
        assert!(
            !matches!(verdict, Verdict::Run(_)),
            "{h:?} {l:?} ran: {verdict:?}"
        );
    }
    match verdict {
        Verdict::Run(command) => {
            assert!(!l.shutting_down);
            assert_eq!(h.flags & !cmd_flags::KNOWN, 0);
            if h.flags & cmd_flags::PAYLOAD_LEN != 0 {
                assert_eq!(l.mode, ReplyMode::Extended);
            }
            match command {
                Command::Read { offset, length, df } => {
                    assert_eq!(h.command, cmd::READ);
                    assert_eq!(payload, 0, "a read with a payload ran");
                    assert_eq!(offset, h.offset);
                    assert_eq!(u64::from(length), h.length, "read length truncated");
                    assert!(length > 0);
                    assert!(length <= l.maximum_payload, "read over the maximum payload");
                    assert!(
                        in_range(offset, u64::from(length), l.size),
                        "read out of range"
                    );
                    assert!(aligned(offset, u64::from(length), l), "misaligned read ran");
                    assert_eq!(df, h.flags & cmd_flags::DF != 0);
                    if df {
                        assert_ne!(l.mode, ReplyMode::Simple);
                    }
                }
                Command::Write {
                    offset,
                    length,
                    fua,
                } => {
                    assert_eq!(h.command, cmd::WRITE);
                    assert!(!caps.read_only, "write on a read-only export");
                    assert_eq!(offset, h.offset);
                    assert_eq!(u64::from(length), h.length, "write length truncated");
                    assert_eq!(u64::from(length), payload);
                    assert!(length > 0);
                    assert!(
                        length <= l.maximum_payload,
                        "write over the maximum payload"
                    );
                    assert!(
                        in_range(offset, u64::from(length), l.size),
                        "write out of range"
                    );
                    assert!(
                        aligned(offset, u64::from(length), l),
                        "misaligned write ran"
                    );
                    assert_eq!(fua, h.flags & cmd_flags::FUA != 0);
                }
                Command::Flush => {
                    assert_eq!(h.command, cmd::FLUSH);
                    assert_eq!(payload, 0);
                }
                Command::Trim { offset, length, .. } => {
                    assert_eq!(h.command, cmd::TRIM);
                    assert!(!caps.read_only && caps.trim);
                    range_command(h, l, offset, length, payload);
                }
                Command::Cache { offset, length } => {
                    assert_eq!(h.command, cmd::CACHE);
                    range_command(h, l, offset, length, payload);
                }
                Command::WriteZeroes {
                    offset,
                    length,
                    flags,
                } => {
                    assert_eq!(h.command, cmd::WRITE_ZEROES);
                    assert!(!caps.read_only && caps.write_zeroes);
                    if flags.fast {
                        assert!(caps.fast_zero);
                    }
                    assert_eq!(flags.no_hole, h.flags & cmd_flags::NO_HOLE != 0);
                    range_command(h, l, offset, length, payload);
                }
                Command::BlockStatus {
                    offset,
                    length,
                    req_one,
                } => {
                    assert_eq!(h.command, cmd::BLOCK_STATUS);
                    assert!(l.meta_contexts > 0);
                    assert_eq!(payload, 0);
                    assert_eq!(req_one, h.flags & cmd_flags::REQ_ONE != 0);
                    block_status_range(l, offset, length);
                }
                Command::BlockStatusWithPayload {
                    offset,
                    payload_len,
                    req_one,
                } => {
                    assert_eq!(h.command, cmd::BLOCK_STATUS);
                    assert_eq!(l.mode, ReplyMode::Extended);
                    assert!(l.meta_contexts > 0);
                    assert_eq!(u64::from(payload_len), payload);
                    assert!(payload_len >= 12 && payload_len.is_multiple_of(4));
                    assert!(u64::from(payload_len) <= 8 + 4 * l.meta_contexts as u64);
                    // What the transmission loop does next: read and decode the payload.
                    let mut p = bs_payload.to_vec();
                    p.resize(payload_len as usize, 0);
                    block_status_payload(&p, l, offset, req_one);
                }
                Command::Disconnect => unreachable!("DISC handled above"),
            }
        }
        Verdict::Refuse {
            errno,
            reason,
            skip,
        } => {
            assert!(!reason.is_empty());
            assert!(
                matches!(
                    errno,
                    errno::EPERM
                        | errno::EINVAL
                        | errno::ENOSPC
                        | errno::EOVERFLOW
                        | errno::ENOTSUP
                        | errno::ESHUTDOWN
                ),
                "unexpected errno {errno}"
            );
            // A payload too long to skip safely closes the connection instead.
            assert!(skip <= MAX_SKIPPABLE_PAYLOAD, "skip of {skip} bytes");
            // Skipping anything but the whole payload desynchronises the stream.
            assert_eq!(
                skip, payload,
                "{h:?} {l:?}: skip {skip} but payload {payload}"
            );
            if l.shutting_down {
                assert_eq!(errno, errno::ESHUTDOWN);
            }
        }
        Verdict::Disconnect(reason) => {
            assert!(!reason.is_empty());
            assert!(
                payload > MAX_SKIPPABLE_PAYLOAD,
                "{h:?} {l:?}: closed although the {payload}-byte payload could be skipped: {reason}"
            );
        }
    }
    // The payload decoder on its own, with any context count.
    block_status_payload(bs_payload, l, h.offset, h.flags & cmd_flags::REQ_ONE != 0);
}

fn range_command(h: &RequestHeader, l: &SessionLimits, offset: u64, length: u64, payload: u64) {
    assert_eq!(payload, 0);
    assert_eq!((offset, length), (h.offset, h.length));
    assert!(length > 0);
    assert!(
        in_range(offset, length, l.size),
        "{h:?} out of range for {l:?}"
    );
    assert!(aligned(offset, length, l), "{h:?} misaligned for {l:?}");
}

fn block_status_range(l: &SessionLimits, offset: u64, length: u64) {
    assert!(length > 0);
    assert!(
        in_range(offset, length, l.size),
        "block status out of range"
    );
    assert_eq!(offset % u64::from(l.minimum_block.max(1)), 0);
}

fn block_status_payload(p: &[u8], l: &SessionLimits, offset: u64, req_one: bool) {
    match request::parse_block_status_payload(p, l.meta_contexts) {
        Ok((length, ids)) => {
            assert!(p.len() >= 12 && (p.len() - 8).is_multiple_of(4));
            assert_eq!(length, u64::from_be_bytes(p[..8].try_into().unwrap()));
            assert!(!ids.is_empty());
            assert!(ids.len() <= l.meta_contexts);
            for (i, id) in ids.iter().enumerate() {
                assert!((*id as usize) < l.meta_contexts, "unknown context id {id}");
                assert!(!ids[..i].contains(id), "duplicate context id {id}");
            }
            match request::check_block_status_range(offset, length, req_one, l) {
                Verdict::Run(Command::BlockStatus {
                    offset: o,
                    length: n,
                    req_one: r,
                }) => {
                    assert_eq!((o, n, r), (offset, length, req_one));
                    block_status_range(l, o, n);
                }
                Verdict::Run(other) => panic!("block status range check ran {other:?}"),
                Verdict::Refuse { skip, .. } => assert_eq!(skip, 0),
                Verdict::Disconnect(r) => panic!("block status range check closed: {r}"),
            }
        }
        Err(reason) => assert!(!reason.is_empty()),
    }
}
