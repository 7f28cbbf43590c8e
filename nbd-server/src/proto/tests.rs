//! Unit tests of the wire codec.

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

#[test]
fn coverage_rejects_overlaps_and_merges_neighbours() {
    let mut c = ReadCoverage::default();
    assert!(c.cover(50..60));
    assert!(c.cover(0..10));
    assert!(!c.cover(55..58));
    assert!(!c.cover(5..12));
    assert!(!c.cover(45..51));
    assert!(c.cover(10..50));
    assert!(c.cover(60..100));
    assert!(c.is_whole(0..100));
    assert_eq!(c.bytes(), 100);
}

// The client's decoders.

fn read_of(offset: u64, length: u32) -> RequestedRange {
    RequestedRange {
        command: cmd::READ,
        offset,
        length,
    }
}

fn block_status_of(offset: u64, length: u32) -> RequestedRange {
    RequestedRange {
        command: cmd::BLOCK_STATUS,
        offset,
        length,
    }
}

fn chunk(chunk_type: u16, flags: u16, length: u32) -> ChunkHeader {
    ChunkHeader {
        flags,
        chunk_type,
        cookie: 7,
        length,
    }
}

fn option_reply_head(option: u32, reply_type: u32, length: u32) -> [u8; OPTION_REPLY_HEADER_LEN] {
    let mut out = Vec::new();
    encode_option_reply(&mut out, option, reply_type, &[]);
    out[16..20].copy_from_slice(&length.to_be_bytes());
    out.try_into().unwrap()
}

#[test]
fn an_option_reply_header_from_the_server_encoder_decodes() {
    let head = option_reply_head(opt::GO, rep::INFO, 12);
    assert_eq!(
        decode_option_reply_header(&head, opt::GO),
        Ok(OptionReplyHeader {
            reply_type: rep::INFO,
            length: 12
        })
    );
}

#[test]
fn an_option_reply_for_another_option_is_refused() {
    let head = option_reply_head(opt::LIST, rep::ACK, 0);
    let e = decode_option_reply_header(&head, opt::GO).unwrap_err();
    assert_eq!(e.0, "the reply to NBD_OPT_GO names NBD_OPT_LIST instead");
}

#[test]
fn an_option_reply_longer_than_the_limit_is_refused_before_its_data_is_read() {
    let head = option_reply_head(opt::GO, rep::INFO, MAX_OPTION_REPLY_LEN + 1);
    let e = decode_option_reply_header(&head, opt::GO).unwrap_err();
    assert!(e.0.contains("carries 65537 bytes"), "{e}");
}

#[test]
fn an_option_reply_with_a_bad_magic_is_refused() {
    let mut head = option_reply_head(opt::GO, rep::ACK, 0);
    head[0] ^= 1;
    let e = decode_option_reply_header(&head, opt::GO).unwrap_err();
    assert!(e.0.starts_with("bad option reply magic"), "{e}");
}

#[test]
fn info_replies_from_the_server_encoders_decode() {
    assert_eq!(
        decode_info_reply(&info_export(1 << 30, 3)),
        Ok(InfoReply::Export {
            size: 1 << 30,
            flags: 3
        })
    );
    assert_eq!(
        decode_info_reply(&info_block_size(512, 4096, 1 << 20)),
        Ok(InfoReply::BlockSize {
            minimum: 512,
            preferred: 4096,
            maximum: 1 << 20
        })
    );
    assert_eq!(
        decode_info_reply(&info_string(info::NAME, "disk")),
        Ok(InfoReply::Other(info::NAME))
    );
}

#[test]
fn an_info_export_of_the_wrong_size_is_refused() {
    let mut data = info_export(1, 0);
    data.push(0);
    let e = decode_info_reply(&data).unwrap_err();
    assert_eq!(e.0, "NBD_INFO_EXPORT of 13 bytes instead of 12");
    assert!(decode_info_reply(&[0]).is_err());
}

#[test]
fn a_meta_context_reply_carries_its_id_and_name() {
    let data = rep_meta_context(9, BASE_ALLOCATION);
    assert_eq!(
        decode_meta_context_reply(&data),
        Ok((9, BASE_ALLOCATION.as_bytes()))
    );
    assert!(decode_meta_context_reply(&[0, 0, 1]).is_err());
}

#[test]
fn the_client_option_encoders_produce_what_the_server_parses() {
    let mut out = Vec::new();
    encode_option(
        &mut out,
        opt::GO,
        &info_request("disk", &[info::BLOCK_SIZE]),
    );
    assert_eq!(be_u64(&out), IHAVEOPT);
    assert_eq!(
        parse_option(opt::GO, &out[16..]),
        Ok(ClientOption::Go(InfoRequest {
            name: "disk".into(),
            items: vec![info::BLOCK_SIZE]
        }))
    );
    assert_eq!(
        parse_option(
            opt::SET_META_CONTEXT,
            &meta_context_request("disk", &[BASE_ALLOCATION])
        ),
        Ok(ClientOption::SetMetaContext(MetaContextRequest {
            export: "disk".into(),
            queries: vec![BASE_ALLOCATION.into()]
        }))
    );
}

#[test]
fn reply_headers_from_the_server_encoders_decode() {
    let mut out = Vec::new();
    encode_simple_reply(&mut out, errno::EIO, 42);
    assert_eq!(
        decode_reply_magic(out[..4].try_into().unwrap()),
        Ok(ReplyHeaderKind::Simple)
    );
    assert_eq!(
        decode_simple_reply(out[4..].try_into().unwrap()),
        SimpleReplyHeader {
            error: errno::EIO,
            cookie: 42
        }
    );
    out.clear();
    encode_chunk_header(
        &mut out,
        ReplyMode::Structured,
        reply::FLAG_DONE,
        reply::OFFSET_HOLE,
        42,
        0,
        12,
    );
    assert_eq!(
        decode_reply_magic(out[..4].try_into().unwrap()),
        Ok(ReplyHeaderKind::Structured)
    );
    let header = decode_chunk_header(out[4..].try_into().unwrap());
    assert_eq!(
        header,
        ChunkHeader {
            cookie: 42,
            ..chunk(reply::OFFSET_HOLE, reply::FLAG_DONE, 12)
        }
    );
    assert!(header.done());
}

#[test]
fn an_extended_reply_header_is_a_protocol_violation_since_the_client_never_asks_for_it() {
    let e = decode_reply_magic(EXTENDED_REPLY_MAGIC.to_be_bytes()).unwrap_err();
    assert!(e.0.contains("extended headers were not negotiated"), "{e}");
    assert!(decode_reply_magic([0; 4]).is_err());
}

#[test]
fn a_simple_read_reply_carries_exactly_the_requested_length_without_structured_replies() {
    let read = read_of(4096, 512);
    assert_eq!(
        check_simple_reply(&read, false, 0),
        Ok(SimpleReplyPayload::Data(512))
    );
    assert_eq!(
        check_simple_reply(&read, true, errno::EIO),
        Ok(SimpleReplyPayload::Error(errno::EIO))
    );
    assert!(check_simple_reply(&read, true, 0).is_err());
    assert!(check_simple_reply(&block_status_of(0, 512), true, 0).is_err());
}

#[test]
fn a_structured_read_chunk_longer_than_the_request_is_refused_before_allocation() {
    let e =
        check_chunk_header(&read_of(0, 4096), &chunk(reply::OFFSET_DATA, 0, 8 + 4097)).unwrap_err();
    assert_eq!(
        e.0,
        "OFFSET_DATA chunk of 4105 bytes for a read of 4096 bytes"
    );
    assert_eq!(
        check_chunk_header(&read_of(0, 4096), &chunk(reply::OFFSET_DATA, 0, 8 + 4096)),
        Ok(ChunkPayload::Data { data_len: 4096 })
    );
}

#[test]
fn a_structured_read_chunk_outside_the_request_is_a_protocol_violation() {
    let read = read_of(4096, 4096);
    let e = decode_data_offset(&read, 512, &0u64.to_be_bytes()).unwrap_err();
    assert!(e.0.contains("lies outside the request"), "{e}");
    assert!(decode_data_offset(&read, 512, &7681u64.to_be_bytes()).is_err());
    assert!(decode_data_offset(&read, 512, &u64::MAX.to_be_bytes()).is_err());
    assert_eq!(
        decode_data_offset(&read, 512, &7168u64.to_be_bytes()),
        Ok(7168..7680)
    );
}

#[test]
fn a_hole_of_length_zero_or_outside_the_request_is_a_protocol_violation() {
    let read = read_of(0, 4096);
    let hole = |at: u64, len: u32| {
        let mut b = [0u8; HOLE_LEN];
        b[..8].copy_from_slice(&at.to_be_bytes());
        b[8..].copy_from_slice(&len.to_be_bytes());
        b
    };
    assert_eq!(decode_hole(&read, &hole(1024, 1024)), Ok(1024..2048));
    assert!(decode_hole(&read, &hole(1024, 0)).is_err());
    assert!(decode_hole(&read, &hole(4000, 100)).is_err());
    assert!(
        check_chunk_header(&read, &chunk(reply::OFFSET_HOLE, 0, 13)).is_err(),
        "a hole chunk is 12 bytes"
    );
}

#[test]
fn chunk_types_that_do_not_answer_the_request_are_protocol_violations() {
    let e = check_chunk_header(&read_of(0, 512), &chunk(reply::BLOCK_STATUS, 0, 12)).unwrap_err();
    assert_eq!(e.0, "chunk type 5 in reply to READ");
    assert!(
        check_chunk_header(&block_status_of(0, 512), &chunk(reply::OFFSET_DATA, 0, 9)).is_err()
    );
    assert!(check_chunk_header(&read_of(0, 512), &chunk(77, 0, 0)).is_err());
    assert!(check_chunk_header(&read_of(0, 512), &chunk(reply::NONE, 0, 0)).is_err());
    assert!(
        check_chunk_header(&read_of(0, 512), &chunk(reply::NONE, reply::FLAG_DONE, 1)).is_err()
    );
    assert_eq!(
        check_chunk_header(&read_of(0, 512), &chunk(reply::NONE, reply::FLAG_DONE, 0)),
        Ok(ChunkPayload::None)
    );
}

#[test]
fn block_status_extents_are_clipped_to_the_request_and_may_not_continue_past_it() {
    let status = block_status_of(1000, 100);
    let payload = |id: u32, extents: &[(u32, u32)]| {
        let mut b = id.to_be_bytes().to_vec();
        for (len, flags) in extents {
            b.extend_from_slice(&len.to_be_bytes());
            b.extend_from_slice(&flags.to_be_bytes());
        }
        b
    };
    assert_eq!(
        decode_block_status(&status, &payload(1, &[(40, 0), (500, 3)]), Some(1)),
        Ok(vec![(40, 0), (60, 3)])
    );
    assert!(decode_block_status(&status, &payload(1, &[(100, 0), (1, 0)]), Some(1)).is_err());
    assert!(decode_block_status(&status, &payload(1, &[(0, 0)]), Some(1)).is_err());
    let e = decode_block_status(&status, &payload(2, &[(1, 0)]), Some(1)).unwrap_err();
    assert_eq!(e.0, "BLOCK_STATUS chunk for unknown context id 2");
}

#[test]
fn a_block_status_chunk_with_more_extents_than_requested_bytes_is_refused_before_allocation() {
    let status = block_status_of(0, 2);
    assert!(check_chunk_header(&status, &chunk(reply::BLOCK_STATUS, 0, 4 + 16)).is_ok());
    let e = check_chunk_header(&status, &chunk(reply::BLOCK_STATUS, 0, 4 + 24)).unwrap_err();
    assert_eq!(e.0, "BLOCK_STATUS chunk of 28 bytes");
}

#[test]
fn error_chunks_carry_their_value_message_and_an_offset_inside_the_request() {
    let read = read_of(4096, 4096);
    let error = |value: u32, message: &str, at: Option<u64>| {
        let mut b = value.to_be_bytes().to_vec();
        b.extend_from_slice(&(message.len() as u16).to_be_bytes());
        b.extend_from_slice(message.as_bytes());
        if let Some(at) = at {
            b.extend_from_slice(&at.to_be_bytes());
        }
        b
    };
    assert_eq!(
        decode_error_chunk(&read, reply::ERROR, &error(errno::EIO, "bad\nsector", None)),
        Ok((errno::EIO, "bad\\nsector".into()))
    );
    assert_eq!(
        decode_error_chunk(
            &read,
            reply::ERROR_OFFSET,
            &error(errno::EIO, "", Some(5000))
        ),
        Ok((errno::EIO, "at offset 5000".into()))
    );
    assert!(decode_error_chunk(&read, reply::ERROR_OFFSET, &error(5, "x", Some(0))).is_err());
    assert!(decode_error_chunk(&read, reply::ERROR, &error(0, "x", None)).is_err());
    let mut long = error(errno::EIO, "abc", None);
    long[5] = 200;
    let e = decode_error_chunk(&read, reply::ERROR, &long).unwrap_err();
    assert_eq!(e.0, "error chunk of 9 bytes with a 200-byte message");
    assert!(check_chunk_header(&read, &chunk(reply::ERROR, 0, 5)).is_err());
    assert!(check_chunk_header(&read, &chunk(reply::ERROR, 0, 6 + 4096 + 9)).is_err());
}

#[test]
fn reply_names_and_sanitized_text_are_readable() {
    assert_eq!(reply_name(rep::ERR_UNKNOWN), "NBD_REP_ERR_UNKNOWN");
    assert_eq!(reply_name((1 << 31) | 99), "error reply 0x80000063");
    assert_eq!(reply_name(77), "reply type 77");
    assert_eq!(sanitize(b"a\x1bb \n"), "a\\u{1b}b");
    assert_eq!(sanitize(&[b'x'; 600]).chars().count(), 513);
}
