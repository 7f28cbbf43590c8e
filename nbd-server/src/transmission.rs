//! The transmission phase: read requests, run them concurrently, reply out of order.
//!
//! ```text
//!   socket ─► reader loop ──validate──► spawn(request task) ──► export
//!                 │                              │ reply (encoded chunks)
//!                 │ refusals                     ▼
//!                 └────────────────────────► writer task ─► socket (batched writes)
//! ```
//!
//! The reader never waits for a reply: each valid request runs in its own task, so
//! many requests are in flight and replies go out as they complete. Memory is bounded
//! by a per-connection and a server-wide byte budget acquired before a payload is read
//! or a read buffer is allocated, and released only when the reply is written, and by
//! a per-connection cap on requests (and replies) in flight. On shutdown new
//! requests get `ESHUTDOWN`, requests in flight finish, and the connection closes
//! after a grace period (or when the client disconnects).

use std::future::Future;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::export::{Extent, ReadChunk, StatusQuery};
use crate::handshake::Session;
use crate::proto::{self, ReplyMode, RequestHeader, errno, reply};
use crate::read_buffer::{self, ReadBuffer};
use crate::request::{self, Command, SessionLimits, Verdict};
use crate::shared::Shared;
use crate::spin::SpinPolicy;

/// Requests in flight per connection; the reader waits when this many are running.
const MAX_IN_FLIGHT: u32 = 128;

/// Memory one connection may hold in payloads and read buffers (KiB): one maximum
/// payload of 32 MiB always fits, and many connections share the server-wide budget.
const CONNECTION_BUDGET_KIB: u64 = 64 * 1024;

/// How long a closing connection may take to deliver its last replies.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Most extents sent in one block-status chunk.
const MAX_EXTENTS_PER_CHUNK: usize = 1 << 16;

/// One encoded reply (possibly several chunks), written as a unit.
struct Reply {
    segments: Vec<Bytes>,
    /// The request's in-flight slot and memory budget, released once the reply has
    /// been handed to the socket: a client that does not read its replies stops its
    /// own reader, not the server.
    _hold: Hold,
}

/// Permits a request holds until its reply is written.
#[derive(Default)]
struct Hold {
    _slot: Option<OwnedSemaphorePermit>,
    _connection_budget: Option<OwnedSemaphorePermit>,
    _server_budget: Option<OwnedSemaphorePermit>,
}

/// Builds the chunks of one reply in the negotiated mode.
struct ReplyBuilder {
    mode: ReplyMode,
    cookie: u64,
    /// The request's offset, echoed in extended headers.
    offset: u64,
    segments: Vec<Bytes>,
    header: BytesMut,
}

impl ReplyBuilder {
    fn new(mode: ReplyMode, cookie: u64, offset: u64) -> Self {
        ReplyBuilder {
            mode,
            cookie,
            offset,
            segments: Vec::new(),
            header: BytesMut::new(),
        }
    }

    fn push_header(&mut self, bytes: Vec<u8>) {
        self.header.extend_from_slice(&bytes);
    }

    fn push_data(&mut self, data: Bytes) {
        if !self.header.is_empty() {
            self.segments.push(self.header.split().freeze());
        }
        self.segments.push(data);
    }

    fn chunk(&mut self, flags: u16, chunk_type: u16, payload_head: &[u8], data: Option<Bytes>) {
        let len = payload_head.len() as u64 + data.as_ref().map_or(0, |d| d.len() as u64);
        let mut h = Vec::with_capacity(32 + payload_head.len());
        proto::encode_chunk_header(
            &mut h,
            self.mode,
            flags,
            chunk_type,
            self.cookie,
            self.offset,
            len,
        );
        h.extend_from_slice(payload_head);
        self.push_header(h);
        if let Some(d) = data {
            self.push_data(d);
        }
    }

    /// Success without payload.
    fn ok(mut self) -> Vec<Bytes> {
        match self.mode {
            ReplyMode::Extended => self.chunk(reply::FLAG_DONE, reply::NONE, &[], None),
            _ => {
                let mut h = Vec::with_capacity(16);
                proto::encode_simple_reply(&mut h, 0, self.cookie);
                self.push_header(h);
            }
        }
        self.finish()
    }

    /// An error reply; `at` is the offset it happened at, for reads.
    fn error(mut self, errno: u32, message: &str, at: Option<u64>) -> Vec<Bytes> {
        match self.mode {
            ReplyMode::Simple => {
                let mut h = Vec::with_capacity(16);
                proto::encode_simple_reply(&mut h, errno, self.cookie);
                self.push_header(h);
            }
            _ => {
                let msg = &message.as_bytes()[..message.len().min(proto::MAX_STRING_LEN)];
                let mut p = Vec::with_capacity(6 + msg.len() + 8);
                p.extend_from_slice(&errno.to_be_bytes());
                p.extend_from_slice(&(msg.len() as u16).to_be_bytes());
                p.extend_from_slice(msg);
                let kind = if let Some(off) = at {
                    p.extend_from_slice(&off.to_be_bytes());
                    reply::ERROR_OFFSET
                } else {
                    reply::ERROR
                };
                self.chunk(reply::FLAG_DONE, kind, &p, None);
            }
        }
        self.finish()
    }

    fn finish(mut self) -> Vec<Bytes> {
        if !self.header.is_empty() {
            self.segments.push(self.header.freeze());
        }
        self.segments
    }
}

/// Zeroes used to materialise holes in replies that cannot carry them.
static ZEROES: [u8; 64 * 1024] = [0; 64 * 1024];

fn push_zeroes(b: &mut ReplyBuilder, mut n: u64) {
    while n > 0 {
        let c = n.min(ZEROES.len() as u64) as usize;
        b.push_data(Bytes::from_static(&ZEROES[..c]));
        n -= c as u64;
    }
}

/// State shared by the reader and the request tasks of one connection.
struct Connection {
    session: Session,
    limits: SessionLimits,
    replies: mpsc::UnboundedSender<Reply>,
    /// This connection's share of the memory budget (KiB units).
    budget: Arc<Semaphore>,
    peer: String,
    metrics: Option<crate::metrics::ConnectionMetrics>,
}

/// Runs the transmission phase until the client disconnects, the connection breaks,
/// or the server shuts down.
pub(crate) async fn run<R, W>(
    session: Session,
    mut reader: ReadBuffer<R>,
    writer: W,
    shared: Arc<Shared>,
    peer: String,
) where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    let broken = CancellationToken::new();
    let mut writer_task = tokio::spawn(write_replies(writer, rx, broken.clone()));
    let b = session.export.block_sizes();
    let limits = SessionLimits {
        size: session.export.size(),
        minimum_block: b.minimum,
        maximum_payload: b.maximum_payload,
        capabilities: session.export.capabilities(),
        mode: session.mode,
        meta_contexts: session.contexts.len(),
        shutting_down: false,
    };
    let metrics = shared
        .config
        .metrics
        .as_ref()
        .map(|m| m.connection(&session.export_name));
    let conn = Arc::new(Connection {
        metrics,
        session,
        limits,
        replies: tx,
        budget: Arc::new(Semaphore::new(CONNECTION_BUDGET_KIB as usize)),
        peer,
    });
    let mut spin = SpinPolicy::new(shared.config.idle_spin);
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT as usize));
    let grace = shared.config.shutdown_grace;

    let mut deadline: Option<tokio::time::Instant> = None;
    let ended = loop {
        let shutting_down = deadline.is_some();
        let next = next_request(
            &mut reader,
            &conn,
            &shared,
            &in_flight,
            shutting_down,
            &mut spin,
        );
        tokio::pin!(next);
        let step = loop {
            tokio::select! {
                step = &mut next => break step,
                () = broken.cancelled() => break Step::End("the reply stream broke".into()),
                () = shared.shutdown.cancelled(), if deadline.is_none() => {
                    deadline = Some(tokio::time::Instant::now() + grace);
                }
                () = sleep_until(deadline), if deadline.is_some() => {
                    break Step::End("the server is shutting down".into());
                }
            }
        };
        match step {
            Step::Continue => {}
            Step::End(why) => break why,
        }
    };
    debug!(peer = %conn.peer, export = %conn.session.export_name, reason = %ended, "closing connection");
    // Let requests in flight finish and their replies go out, but never wait forever
    // for a client that does not read: after the drain time the socket is dropped.
    let drain = if shared.shutdown.is_cancelled() {
        grace
    } else {
        DRAIN_TIMEOUT
    };
    let start = tokio::time::Instant::now();
    let drained = tokio::time::timeout(drain, in_flight.acquire_many(MAX_IN_FLIGHT))
        .await
        .is_ok();
    let peer = conn.peer.clone();
    drop(conn);
    let left = drain.saturating_sub(start.elapsed());
    if !drained || tokio::time::timeout(left, &mut writer_task).await.is_err() {
        writer_task.abort();
        warn!(%peer, "replies could not be delivered in time (client not reading); connection dropped");
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

enum Step {
    Continue,
    End(String),
}

/// Reads one request (and its payload) and starts it, or answers it directly.
async fn next_request<R: AsyncRead + Unpin>(
    reader: &mut ReadBuffer<R>,
    conn: &Arc<Connection>,
    shared: &Arc<Shared>,
    in_flight: &Arc<Semaphore>,
    shutting_down: bool,
    spin: &mut SpinPolicy,
) -> Step {
    let mode = conn.session.mode;
    let mut raw = [0u8; proto::EXTENDED_REQUEST_LEN];
    let raw = &mut raw[..mode.request_len()];
    if let Err(e) = read_request(reader, in_flight, spin, raw).await {
        return Step::End(if e.kind() == std::io::ErrorKind::UnexpectedEof {
            "client closed the connection".into()
        } else {
            format!("read failed: {e}")
        });
    }
    let header = match proto::decode_request(mode, raw) {
        Ok(h) => h,
        Err(bad) => {
            warn!(peer = %conn.peer, magic = format!("{:#x}", bad.0), "bad request magic; closing the connection");
            return Step::End("bad request magic".into());
        }
    };
    // Shutdown may have begun while this request was on its way.
    let limits = SessionLimits {
        shutting_down: shutting_down || shared.shutdown.is_cancelled(),
        ..conn.limits
    };
    let mut verdict = request::check(&header, &limits);

    // A block-status payload is read first, then its effect range checked.
    let mut selected: Option<Vec<u32>> = None;
    if let Verdict::Run(Command::BlockStatusWithPayload {
        offset,
        payload_len,
        req_one,
    }) = verdict
    {
        let mut payload = vec![0u8; payload_len as usize];
        if let Err(e) = reader.read_exact(&mut payload).await {
            return Step::End(format!("read of a BLOCK_STATUS payload failed: {e}"));
        }
        verdict = match request::parse_block_status_payload(&payload, conn.session.contexts.len()) {
            Ok((length, ids)) => {
                selected = Some(ids);
                request::check_block_status_range(offset, length, req_one, &limits)
            }
            Err(reason) => Verdict::Refuse {
                errno: errno::EINVAL,
                reason,
                skip: 0,
            },
        };
    }

    match verdict {
        Verdict::Disconnect(reason) => {
            warn!(peer = %conn.peer, command = %proto::command_name(header.command), %reason, "closing the connection");
            Step::End(reason)
        }
        Verdict::Refuse {
            errno,
            reason,
            skip,
        } => {
            if skip > 0
                && let Err(e) = discard(reader, skip).await
            {
                return Step::End(format!("client went away inside a payload: {e}"));
            }
            if errno != proto::errno::ESHUTDOWN {
                info!(peer = %conn.peer, command = %proto::command_name(header.command), offset = header.offset,
                      length = header.length, errno, %reason, "request refused");
            }
            // Refusals take an in-flight slot too, so that a client sending bad requests
            // without reading the answers cannot queue replies without bound.
            let Ok(slot) = Arc::clone(in_flight).acquire_owned().await else {
                return Step::End("connection closing".into());
            };
            let b = ReplyBuilder::new(conn.session.mode, header.cookie, header.offset);
            let hold = Hold {
                _slot: Some(slot),
                ..Hold::default()
            };
            let _ = conn.replies.send(Reply {
                segments: b.error(errno, &reason, None),
                _hold: hold,
            });
            Step::Continue
        }
        Verdict::Run(Command::Disconnect) => Step::End("client sent NBD_CMD_DISC".into()),
        Verdict::Run(command) => {
            let Ok(slot) = Arc::clone(in_flight).acquire_owned().await else {
                return Step::End("connection closing".into());
            };
            let budget_bytes = match command {
                Command::Read { length, .. } => u64::from(length),
                Command::Write { length, .. } => read_buffer::memory_held(u64::from(length)),
                _ => 0,
            };
            let connection_budget = if budget_bytes > 0 {
                let units = budget_bytes.div_ceil(1024).min(CONNECTION_BUDGET_KIB) as u32;
                Arc::clone(&conn.budget)
                    .acquire_many_owned(units)
                    .await
                    .ok()
            } else {
                None
            };
            let hold = Hold {
                _slot: Some(slot),
                _connection_budget: connection_budget,
                _server_budget: shared.budget(budget_bytes).await,
            };
            let mut payload = None;
            if let Command::Write { length, .. } = command {
                match reader.read_payload(length as usize).await {
                    Ok(bytes) => payload = Some(bytes),
                    Err(e) => {
                        return Step::End(format!(
                            "client went away inside a {length}-byte write payload: {e}"
                        ));
                    }
                }
            }
            let conn = Arc::clone(conn);
            let mut request = Box::pin(async move {
                let segments = execute(&conn, header, command, payload, selected).await;
                let _ = conn.replies.send(Reply {
                    segments,
                    _hold: hold,
                });
            });
            // Run the request here until it first waits: page-cache reads and buffered
            // writes finish without ever leaving this task (no hand-off to another
            // worker thread). Only a request that really waits gets a task of its own.
            let finished =
                std::future::poll_fn(|cx| Poll::Ready(request.as_mut().poll(cx).is_ready())).await;
            if !finished {
                tokio::spawn(request);
            }
            Step::Continue
        }
    }
}

/// Reads a request header into `raw`. After a request that came alone (nothing else in
/// flight, and the only one read since the last wait), it polls for the next one for a
/// while before parking (see [`crate::spin`]): such a client sends its next request as
/// soon as it has the reply.
/// The polling yields to the runtime between polls, which is also when the writer task
/// sends that reply.
async fn read_request<R: AsyncRead + Unpin>(
    reader: &mut ReadBuffer<R>,
    in_flight: &Semaphore,
    spin: &mut SpinPolicy,
    raw: &mut [u8],
) -> std::io::Result<()> {
    let budget = if reader.buffered_at_least(raw.len()) {
        None
    } else {
        spin.next()
    };
    let read = reader.read_exact(raw);
    let read = match budget {
        None => read.await,
        Some(budget) => {
            let (read, arrived) = crate::spin::spin_then_await(read, budget).await;
            spin.found(arrived);
            read
        }
    };
    spin.arrived(in_flight.available_permits() == MAX_IN_FLIGHT as usize);
    read.map(drop)
}

async fn discard<R: AsyncRead + Unpin>(reader: &mut R, mut n: u64) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    while n > 0 {
        let c = n.min(buf.len() as u64) as usize;
        reader.read_exact(&mut buf[..c]).await?;
        n -= c as u64;
    }
    Ok(())
}

/// Runs one validated command and encodes its reply.
/// Runs one request and returns its reply, counted in the connection's metrics if it
/// has them.
async fn execute(
    conn: &Connection,
    header: RequestHeader,
    command: Command,
    payload: Option<Bytes>,
    selected: Option<Vec<u32>>,
) -> Vec<Bytes> {
    let Some(metrics) = &conn.metrics else {
        return run_command(conn, header, command, payload, selected)
            .await
            .0;
    };
    let started = std::time::Instant::now();
    let (replies, ok) = run_command(conn, header, command, payload, selected).await;
    metrics.observe(&command, ok, started.elapsed());
    replies
}

/// Runs one request: its reply, and whether it succeeded.
async fn run_command(
    conn: &Connection,
    header: RequestHeader,
    command: Command,
    payload: Option<Bytes>,
    selected: Option<Vec<u32>>,
) -> (Vec<Bytes>, bool) {
    let export = &conn.session.export;
    let b = ReplyBuilder::new(conn.session.mode, header.cookie, header.offset);
    let result = match command {
        Command::Read { offset, length, df } => match export.read(offset, length).await {
            Ok(chunks) => return (encode_read(b, offset, chunks, df), true),
            Err(e) => Err(e),
        },
        Command::Write { offset, fua, .. } => {
            export.write(offset, payload.unwrap_or_default(), fua).await
        }
        Command::Flush => export.flush().await,
        Command::Trim {
            offset,
            length,
            fua,
        } => export.trim(offset, length, fua).await,
        Command::Cache { offset, length } => export.cache(offset, length).await,
        Command::WriteZeroes {
            offset,
            length,
            flags,
        } => export.write_zeroes(offset, length, flags).await,
        Command::BlockStatus {
            offset,
            length,
            req_one,
        } => match block_status(conn, b, offset, length, req_one, selected).await {
            Ok(segments) => return (segments, true),
            Err((b, e)) => return (report_error(conn, b, &header, &e), false),
        },
        Command::BlockStatusWithPayload { .. } | Command::Disconnect => {
            unreachable!("resolved by the reader")
        }
    };
    match result {
        Ok(()) => (b.ok(), true),
        Err(e) => (report_error(conn, b, &header, &e), false),
    }
}

fn report_error(
    conn: &Connection,
    b: ReplyBuilder,
    header: &RequestHeader,
    e: &crate::Error,
) -> Vec<Bytes> {
    let errno = e.nbd_errno();
    let message = error_chain(e);
    if errno == proto::errno::ENOTSUP {
        debug!(peer = %conn.peer, %message, "fast zero refused");
    } else {
        warn!(peer = %conn.peer, export = %conn.session.export_name, command = %proto::command_name(header.command),
              offset = header.offset, length = header.length, errno, error = %message, "request failed");
    }
    // ERROR_OFFSET only for reads, and only with an offset inside the request.
    let at = e.offset().filter(|&o| {
        header.command == proto::cmd::READ
            && o >= header.offset
            && o < header.offset.saturating_add(header.length)
    });
    b.error(errno, &message, at)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

fn encode_read(mut b: ReplyBuilder, offset: u64, chunks: Vec<ReadChunk>, df: bool) -> Vec<Bytes> {
    let total: u64 = chunks.iter().map(ReadChunk::len).sum();
    match b.mode {
        ReplyMode::Simple => {
            let mut h = Vec::with_capacity(16);
            proto::encode_simple_reply(&mut h, 0, b.cookie);
            b.push_header(h);
            for c in chunks {
                match c {
                    ReadChunk::Data(d) => b.push_data(d),
                    ReadChunk::Zero(n) => push_zeroes(&mut b, n),
                }
            }
        }
        _ if df && chunks.len() > 1 => {
            // One unfragmented data chunk, holes written out as zeroes.
            let mut h = Vec::with_capacity(40);
            proto::encode_chunk_header(
                &mut h,
                b.mode,
                reply::FLAG_DONE,
                reply::OFFSET_DATA,
                b.cookie,
                b.offset,
                8 + total,
            );
            h.extend_from_slice(&offset.to_be_bytes());
            b.push_header(h);
            for c in chunks {
                match c {
                    ReadChunk::Data(d) => b.push_data(d),
                    ReadChunk::Zero(n) => push_zeroes(&mut b, n),
                }
            }
        }
        _ => {
            let chunks: Vec<ReadChunk> = chunks.into_iter().filter(|c| !c.is_empty()).collect();
            let last = chunks.len().saturating_sub(1);
            let mut pos = offset;
            for (i, c) in chunks.into_iter().enumerate() {
                let flags = if i == last { reply::FLAG_DONE } else { 0 };
                let len = c.len();
                match c {
                    ReadChunk::Data(d) => {
                        b.chunk(flags, reply::OFFSET_DATA, &pos.to_be_bytes(), Some(d));
                    }
                    ReadChunk::Zero(n) => {
                        let mut p = [0u8; 12];
                        p[..8].copy_from_slice(&pos.to_be_bytes());
                        p[8..].copy_from_slice(&(n as u32).to_be_bytes());
                        b.chunk(flags, reply::OFFSET_HOLE, &p, None);
                    }
                }
                pos += len;
            }
        }
    }
    b.finish()
}

/// Answers a block-status request: one chunk per selected context, `DONE` on the last.
async fn block_status(
    conn: &Connection,
    mut b: ReplyBuilder,
    offset: u64,
    length: u64,
    req_one: bool,
    selected: Option<Vec<u32>>,
) -> Result<Vec<Bytes>, (ReplyBuilder, crate::Error)> {
    let ids: Vec<u32> =
        selected.unwrap_or_else(|| (0..conn.session.contexts.len() as u32).collect());
    let max = if req_one { 1 } else { MAX_EXTENTS_PER_CHUNK };
    let minimum = u64::from(conn.limits.minimum_block.max(1));
    let mut answers = Vec::with_capacity(ids.len());
    for &id in &ids {
        let context = conn.session.contexts[id as usize];
        match conn
            .session
            .export
            .block_status(StatusQuery {
                context,
                offset,
                length,
                max_extents: max,
            })
            .await
        {
            Ok(extents) => {
                answers.push((id, normalise_extents(extents, length, max, b.mode, minimum)));
            }
            Err(e) => return Err((b, e)),
        }
    }
    let last = answers.len().saturating_sub(1);
    for (i, (id, extents)) in answers.into_iter().enumerate() {
        let flags = if i == last { reply::FLAG_DONE } else { 0 };
        let mut p = Vec::with_capacity(8 + extents.len() * 16);
        p.extend_from_slice(&id.to_be_bytes());
        if b.mode == ReplyMode::Extended {
            p.extend_from_slice(&(extents.len() as u32).to_be_bytes());
            for e in &extents {
                p.extend_from_slice(&e.length.to_be_bytes());
                p.extend_from_slice(&e.flags.to_be_bytes());
            }
            b.chunk(flags, reply::BLOCK_STATUS_EXT, &p, None);
        } else {
            for e in &extents {
                p.extend_from_slice(&(e.length as u32).to_be_bytes());
                p.extend_from_slice(&(e.flags as u32).to_be_bytes());
            }
            b.chunk(flags, reply::BLOCK_STATUS, &p, None);
        }
    }
    Ok(b.finish())
}

/// Makes an export's extents safe to send: non-empty, merged where flags repeat,
/// within the requested length, at most `max`, and (compact headers) below 4 GiB each.
fn normalise_extents(
    extents: Vec<Extent>,
    length: u64,
    max: usize,
    mode: ReplyMode,
    minimum: u64,
) -> Vec<Extent> {
    let limit = if mode == ReplyMode::Extended {
        u64::MAX
    } else {
        (u64::from(u32::MAX) / minimum) * minimum
    };
    let mut out: Vec<Extent> = Vec::new();
    let mut covered = 0u64;
    for e in extents {
        if e.length == 0 || covered >= length {
            continue;
        }
        let len = e.length.min(length - covered);
        covered += len;
        match out.last_mut() {
            Some(prev) if prev.flags == e.flags && prev.length.saturating_add(len) <= limit => {
                prev.length += len;
            }
            _ => out.push(Extent {
                length: len,
                flags: e.flags,
            }),
        }
    }
    if out.is_empty() {
        // An export that answered nothing: "allocated data" is always a safe answer.
        out.push(Extent {
            length: length.min(limit),
            flags: 0,
        });
    }
    let mut split = Vec::with_capacity(out.len());
    for e in out {
        let mut rest = e.length;
        while rest > 0 {
            let part = rest.min(limit);
            split.push(Extent {
                length: part,
                flags: e.flags,
            });
            rest -= part;
        }
    }
    split.truncate(max);
    split
}

/// Writes replies in arrival order, batching everything queued into one flush.
async fn write_replies<W: AsyncWrite + Unpin>(
    writer: W,
    mut rx: mpsc::UnboundedReceiver<Reply>,
    broken: CancellationToken,
) {
    let mut w = BufWriter::with_capacity(256 * 1024, writer);
    let mut batch = Vec::with_capacity(64);
    while rx.recv_many(&mut batch, 64).await > 0 {
        for r in batch.drain(..) {
            for s in &r.segments {
                if w.write_all(s).await.is_err() {
                    broken.cancel();
                    return;
                }
            }
        }
        if rx.is_empty() && w.flush().await.is_err() {
            broken.cancel();
            return;
        }
    }
    let _ = w.flush().await;
    let _ = w.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_are_clamped_to_the_request_and_merged() {
        let e = vec![
            Extent {
                length: 4096,
                flags: 0,
            },
            Extent {
                length: 4096,
                flags: 0,
            },
            Extent {
                length: 1 << 20,
                flags: 3,
            },
        ];
        let out = normalise_extents(e, 12288, 100, ReplyMode::Structured, 1);
        assert_eq!(
            out,
            vec![
                Extent {
                    length: 8192,
                    flags: 0
                },
                Extent {
                    length: 4096,
                    flags: 3
                }
            ]
        );
    }

    #[test]
    fn compact_extents_never_exceed_32_bits() {
        let e = vec![Extent {
            length: 1 << 33,
            flags: 0,
        }];
        let out = normalise_extents(e, 1 << 33, 100, ReplyMode::Structured, 512);
        assert!(
            out.iter()
                .all(|x| x.length <= u64::from(u32::MAX) && x.length % 512 == 0)
        );
        assert_eq!(out.iter().map(|x| x.length).sum::<u64>(), 1 << 33);
    }

    #[test]
    fn req_one_keeps_a_single_extent() {
        let e = vec![
            Extent {
                length: 512,
                flags: 0,
            },
            Extent {
                length: 512,
                flags: 3,
            },
        ];
        assert_eq!(
            normalise_extents(e, 1024, 1, ReplyMode::Extended, 1),
            vec![Extent {
                length: 512,
                flags: 0
            }]
        );
    }

    #[test]
    fn a_structured_read_marks_only_the_last_chunk_done() {
        let b = ReplyBuilder::new(ReplyMode::Structured, 5, 0);
        let segs = encode_read(
            b,
            0,
            vec![
                ReadChunk::Data(Bytes::from_static(&[1; 512])),
                ReadChunk::Zero(512),
            ],
            false,
        );
        let flat: Vec<u8> = segs.iter().flat_map(|s| s.iter().copied()).collect();
        // First chunk: magic, flags 0, OFFSET_DATA.
        assert_eq!(&flat[4..8], &[0, 0, 0, 1]);
        let second = 20 + 8 + 512;
        assert_eq!(
            &flat[second + 4..second + 8],
            &[0, 1, 0, 2],
            "DONE + OFFSET_HOLE"
        );
    }
}
