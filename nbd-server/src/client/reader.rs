//! The reader task: reads replies in any order, routes each to its request by cookie,
//! assembles chunks, and fails the connection on anything the protocol does not allow.
//! Headers and payloads are read here; `proto` decodes and checks them.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, BufReader};

use super::connection::{Op, Pending, Reply, Shared};
use crate::proto::{self, ChunkPayload, ReplyHeaderKind, SimpleReplyPayload};

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

pub(super) async fn reader_task<R: AsyncRead + Unpin>(shared: Arc<Shared>, r: R) {
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
        let mut magic = [0u8; proto::REPLY_MAGIC_LEN];
        match r.read_exact(&mut magic).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return "the server closed the connection".into();
            }
            Err(e) => return format!("reading from the server failed: {e}"),
        }
        let result = match proto::decode_reply_magic(magic) {
            Ok(ReplyHeaderKind::Simple) => simple_reply(shared, r).await,
            Ok(ReplyHeaderKind::Structured) => structured_chunk(shared, r).await,
            Err(invalid) => Err(ReadFail::Violation(invalid.0)),
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
    let mut rest = [0u8; proto::SIMPLE_REPLY_REST_LEN];
    r.read_exact(&mut rest).await.map_err(|e| io_fail(&e))?;
    let header = proto::decode_simple_reply(&rest);
    let Some(mut p) = shared.take(header.cookie) else {
        return Err(ReadFail::Violation(format!(
            "simple reply for unknown cookie {:#x}",
            header.cookie
        )));
    };
    if p.chunks > 0 {
        return Err(violate(
            shared,
            p,
            "simple reply after structured chunks".into(),
        ));
    }
    let payload =
        match proto::check_simple_reply(&p.requested(), shared.negotiated.structured, header.error)
        {
            Ok(payload) => payload,
            Err(invalid) => return Err(violate(shared, p, invalid.0)),
        };
    match payload {
        SimpleReplyPayload::Error(value) => {
            p.error = Some((value, String::new()));
            shared.complete_with_error(p);
            Ok(())
        }
        SimpleReplyPayload::Data(length) => {
            // The request's own length, not the server's.
            let mut data = vec![0u8; length as usize];
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
        SimpleReplyPayload::Done => Err(violate(
            shared,
            p,
            "simple success reply carries nothing the request asked for".into(),
        )),
    }
}

async fn structured_chunk<R: AsyncRead + Unpin>(
    shared: &Shared,
    r: &mut R,
) -> std::result::Result<(), ReadFail> {
    let mut rest = [0u8; proto::CHUNK_HEADER_REST_LEN];
    r.read_exact(&mut rest).await.map_err(|e| io_fail(&e))?;
    let header = proto::decode_chunk_header(&rest);
    if !shared.negotiated.structured {
        return Err(ReadFail::Violation(
            "structured reply chunk, but structured replies were not negotiated".into(),
        ));
    }
    let Some(mut p) = shared.take(header.cookie) else {
        return Err(ReadFail::Violation(format!(
            "reply chunk for unknown cookie {:#x}",
            header.cookie
        )));
    };
    match chunk(shared, r, &mut p, &header).await {
        Ok(()) => {}
        Err(ReadFail::Violation(reason)) => return Err(violate(shared, p, reason)),
        Err(ReadFail::Io(reason)) => {
            let _ = p.tx.send(Err(shared.peer.lost(reason.clone())));
            return Err(ReadFail::Io(reason));
        }
    }
    p.chunks += 1;
    if !header.done() {
        shared.put_back(header.cookie, p);
        return Ok(());
    }
    if p.error.is_some() {
        shared.complete_with_error(p);
        return Ok(());
    }
    match p.op {
        Op::Read => {
            let requested = p.requested();
            if !p.coverage.is_whole(requested.offset..requested.end()) {
                let got = p.coverage.bytes();
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

/// Reads one chunk's payload into `p`, after `proto` checked its length against the
/// request; `proto` decodes and checks the payload too.
async fn chunk<R: AsyncRead + Unpin>(
    shared: &Shared,
    r: &mut R,
    p: &mut Pending,
    header: &proto::ChunkHeader,
) -> std::result::Result<(), ReadFail> {
    let violation = |invalid: proto::InvalidReply| ReadFail::Violation(invalid.0);
    let requested = p.requested();
    match proto::check_chunk_header(&requested, header).map_err(violation)? {
        ChunkPayload::None => Ok(()),
        ChunkPayload::Data { data_len } => {
            let mut offset = [0u8; proto::DATA_OFFSET_LEN];
            r.read_exact(&mut offset).await.map_err(|e| io_fail(&e))?;
            let range =
                proto::decode_data_offset(&requested, data_len, &offset).map_err(violation)?;
            if !p.coverage.cover(range.clone()) {
                return Err(ReadFail::Violation(format!(
                    "OFFSET_DATA chunk at {}+{data_len} overlaps an earlier chunk",
                    range.start
                )));
            }
            // The whole request's buffer, which the chunk's range lies in.
            let len = p.length as usize;
            let data = p.data.get_or_insert_with(|| vec![0u8; len]);
            let at = (range.start - p.offset) as usize;
            r.read_exact(&mut data[at..at + data_len as usize])
                .await
                .map_err(|e| io_fail(&e))?;
            Ok(())
        }
        ChunkPayload::Hole => {
            let mut payload = [0u8; proto::HOLE_LEN];
            r.read_exact(&mut payload).await.map_err(|e| io_fail(&e))?;
            let range = proto::decode_hole(&requested, &payload).map_err(violation)?;
            if !p.coverage.cover(range.clone()) {
                return Err(ReadFail::Violation(format!(
                    "OFFSET_HOLE chunk at {}+{} overlaps an earlier chunk",
                    range.start,
                    range.end - range.start
                )));
            }
            // The buffer starts zeroed: a hole needs no copying.
            Ok(())
        }
        ChunkPayload::BlockStatus { length } => {
            let mut payload = vec![0u8; length as usize];
            r.read_exact(&mut payload).await.map_err(|e| io_fail(&e))?;
            let extents =
                proto::decode_block_status(&requested, &payload, shared.negotiated.base_allocation)
                    .map_err(violation)?;
            if p.extents.is_some() {
                return Err(ReadFail::Violation(
                    "two BLOCK_STATUS chunks for one context".into(),
                ));
            }
            p.extents = Some(extents);
            Ok(())
        }
        ChunkPayload::Error { length } => {
            let mut payload = vec![0u8; length as usize];
            r.read_exact(&mut payload).await.map_err(|e| io_fail(&e))?;
            let (value, message) =
                proto::decode_error_chunk(&requested, header.chunk_type, &payload)
                    .map_err(violation)?;
            if p.error.is_none() {
                p.error = Some((value, message));
            }
            Ok(())
        }
    }
}
