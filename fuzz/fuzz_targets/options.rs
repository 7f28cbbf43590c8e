//! Fuzzes the option decoder of the handshake (`proto::parse_option`).
//!
//! The input is used twice:
//! 1. as one option: a big-endian `u32` option number followed by its data;
//! 2. as a whole option stream, the way the handshake reads it: 16-byte headers
//!    (`IHAVEOPT` magic, option, length) each followed by `length` bytes of data
//!    (truncated at the end of the input).
//!
//! Besides "never panics", every successful decode is checked against the wire format:
//! strings are at most 4096 bytes without NUL, the data of an INFO/GO request is
//! exactly accounted for (re-encoding it gives the same bytes), options without data
//! refuse data, and decoding is deterministic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use thinline_nbd::proto::{
    self, ClientOption, InfoRequest, MAX_OPTION_LEN, MAX_STRING_LEN, MetaContextRequest, opt,
};

fuzz_target!(|data: &[u8]| {
    if data.len() >= 4 {
        let option = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
        check_one(option, &data[4..]);
        // The same data under each known option, so every decoder sees every input.
        for known in opt::EXPORT_NAME..=opt::EXTENDED_HEADERS + 1 {
            check_one(known, &data[4..]);
        }
    }
    stream(data);
});

/// Splits `data` into option headers and data, as the handshake does.
fn stream(mut data: &[u8]) {
    while data.len() >= 16 {
        let magic = u64::from_be_bytes(data[..8].try_into().unwrap());
        let option = u32::from_be_bytes(data[8..12].try_into().unwrap());
        let length = u32::from_be_bytes(data[12..16].try_into().unwrap());
        data = &data[16..];
        let _ = magic == proto::IHAVEOPT; // the server would hang up on a bad magic
        let _ = proto::option_name(option);
        if length > MAX_OPTION_LEN {
            // Skipped by the server without being decoded.
            data = &data[data.len().min(length as usize)..];
            continue;
        }
        let n = data.len().min(length as usize);
        check_one(option, &data[..n]);
        data = &data[n..];
    }
}

fn check_one(option: u32, data: &[u8]) {
    let parsed = proto::parse_option(option, data);
    assert_eq!(
        parsed,
        proto::parse_option(option, data),
        "not deterministic"
    );
    let _ = proto::option_name(option);

    let takes_no_data = matches!(
        option,
        opt::LIST | opt::STARTTLS | opt::STRUCTURED_REPLY | opt::EXTENDED_HEADERS
    );
    match parsed {
        Err(e) => {
            // The message becomes an NBD_REP_ERR_INVALID reply: keep it short and printable.
            assert!(!e.0.is_empty(), "empty refusal for option {option}");
            assert!(
                e.0.len() <= 2 * MAX_STRING_LEN,
                "refusal too long: {}",
                e.0.len()
            );
            let mut out = Vec::new();
            proto::encode_option_reply(&mut out, option, proto::rep::ERR_INVALID, e.0.as_bytes());
            assert_eq!(out.len(), 20 + e.0.len());
        }
        Ok(parsed) => {
            if takes_no_data {
                assert!(
                    data.is_empty(),
                    "option {option} accepted {} bytes",
                    data.len()
                );
            }
            // Decoded as `code`, with data that re-encodes as the request.
            let info = |code, req: &InfoRequest| {
                assert_eq!(option, code);
                check_info(req, data);
            };
            let meta = |code, req: &MetaContextRequest| {
                assert_eq!(option, code);
                check_meta(req, data);
            };
            match parsed {
                ClientOption::ExportName(name) => {
                    assert_eq!(option, opt::EXPORT_NAME);
                    assert_eq!(name.as_bytes(), data);
                    check_string(&name);
                }
                ClientOption::Abort => assert_eq!(option, opt::ABORT),
                ClientOption::List => assert_eq!(option, opt::LIST),
                ClientOption::StartTls => assert_eq!(option, opt::STARTTLS),
                ClientOption::StructuredReply => assert_eq!(option, opt::STRUCTURED_REPLY),
                ClientOption::ExtendedHeaders => assert_eq!(option, opt::EXTENDED_HEADERS),
                ClientOption::Info(req) => info(opt::INFO, &req),
                ClientOption::Go(req) => info(opt::GO, &req),
                ClientOption::ListMetaContext(req) => meta(opt::LIST_META_CONTEXT, &req),
                ClientOption::SetMetaContext(req) => meta(opt::SET_META_CONTEXT, &req),
                ClientOption::Unknown(n) => {
                    assert_eq!(n, option);
                    assert!(
                        !(opt::EXPORT_NAME..=opt::EXTENDED_HEADERS).contains(&n)
                            || n == opt::PEEK_EXPORT,
                        "known option {n} decoded as unknown"
                    );
                }
            }
        }
    }
}

fn check_string(s: &str) {
    assert!(
        s.len() <= MAX_STRING_LEN,
        "string of {} bytes accepted",
        s.len()
    );
    assert!(!s.contains('\0'), "string with NUL accepted");
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// The start of a request naming an export (checked as a string), re-encoded: the name, then
/// `count`, the encoded number of items that follow.
fn named_request(name: &str, count: &[u8]) -> Vec<u8> {
    check_string(name);
    let mut again = Vec::new();
    put_string(&mut again, name);
    again.extend_from_slice(count);
    again
}

/// The decoded request must account for every byte: re-encoding gives the input.
fn check_info(req: &InfoRequest, data: &[u8]) {
    let mut again = named_request(&req.name, &(req.items.len() as u16).to_be_bytes());
    for i in &req.items {
        again.extend_from_slice(&i.to_be_bytes());
    }
    assert_eq!(
        again, data,
        "INFO/GO request does not re-encode to its data"
    );
}

fn check_meta(req: &MetaContextRequest, data: &[u8]) {
    let mut again = named_request(&req.export, &(req.queries.len() as u32).to_be_bytes());
    for q in &req.queries {
        check_string(q);
        put_string(&mut again, q);
    }
    assert_eq!(
        again, data,
        "meta-context request does not re-encode to its data"
    );
}
