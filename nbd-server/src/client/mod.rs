//! The client half of NBD: reads a template that lives behind another NBD server.
//!
//! Thinline serves templates from files, HTTP, S3 … and from other NBD servers
//! (`nbd://host[:port]/export`, `nbd+unix:///export?socket=PATH`), and the copy-on-read
//! proxy reads its upstream over NBD as well. This module is that client: the URI
//! syntax of NetworkBlockDevice `doc/uri.md`, the fixed-newstyle handshake
//! (`NBD_OPT_STRUCTURED_REPLY`, `NBD_OPT_SET_META_CONTEXT "base:allocation"`,
//! `NBD_OPT_GO` with `NBD_INFO_BLOCK_SIZE`, `NBD_OPT_EXPORT_NAME` if `GO` is unknown),
//! and read-only transmission with many requests in flight on one connection.
//!
//! ```text
//!   Client::read ─┐                        ┌─► writer task ─► socket (request headers, batched)
//!   Client::read ─┼─► cookie + oneshot ────┤
//!   block_status ─┘   in the pending map   └─◄ reader task ◄─ socket (replies, any order)
//!                                                  │ routes each reply by cookie,
//!                                                  └ assembles chunks, validates everything
//! ```
//!
//! Everything the server sends is checked: magics, cookies, chunk types, lengths,
//! offsets, overlap and coverage of read chunks, extents. A server that breaks the
//! protocol loses the connection (the request it was answering fails with
//! [`Error::Protocol`], the others with [`Error::ConnectionLost`]); nothing the
//! server sends can make the client panic, allocate more than the request asked for,
//! or wait forever once the connection is gone. A request that gets no reply within
//! [`ClientOptions::request_timeout`] abandons the connection, since a server that
//! stopped answering one request cannot be trusted with the others.
//!
//! With `nbds://` and `nbds+unix://` the negotiation goes on inside TLS after
//! `NBD_OPT_STARTTLS` (`tls`: certificates or a pre-shared key).
//!
//! Not supported: oldstyle negotiation, extended headers,
//! writes (the client is read-only by design), abstract unix sockets.
//!
//! The wire format (encoders, decoders, checks of every reply against its request) is
//! in [`crate::proto`]; this module does the I/O around it:
//!
//! - `uri`: [`NbdUri`] parsing and display.
//! - `handshake`: option haggling.
//! - `tls`: the TLS handshake's client side.
//! - `connection`: the state the client and its tasks share.
//! - `reader`, `writer`: the tasks that read replies and write requests.
//! - `error`: [`Error`], what users see when something fails.

mod connection;
mod error;
mod handshake;
mod reader;
#[cfg(test)]
mod tests;
mod tls;
mod uri;
mod writer;

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::proto::{self, ReplyMode, RequestHeader, cmd, tflags};
use connection::{Op, Out, Pending, Reply, Shared, State};
use error::Peer;
pub use error::{Error, Result, errno_text};
use handshake::Negotiated;
use tls::ClientTls;
pub use uri::{NbdUri, TlsParams, Transport};

/// The IANA port of NBD, used when a `nbd://` URI names none.
pub const DEFAULT_PORT: u16 = 10809;

/// Default cap on one request's payload when the server advertises nothing smaller.
pub const DEFAULT_MAX_REQUEST: u32 = 32 << 20;

/// How long `disconnect` waits for the server to finish requests in flight and close.
const DISCONNECT_GRACE: Duration = Duration::from_secs(5);

/// Settings of one client connection.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Limit for connecting plus the whole handshake.
    pub connect_timeout: Duration,
    /// A request without its complete reply by then fails and abandons the connection
    /// (all other requests on it fail too). `None` waits for as long as the connection
    /// stays up.
    pub request_timeout: Option<Duration>,
    /// Ask for structured replies (sparse reads, error messages, block status).
    pub structured_replies: bool,
    /// Ask for the `base:allocation` metadata context (needs structured replies).
    pub block_status: bool,
    /// Largest payload of one request; reads are split further if the server's maximum
    /// is smaller.
    pub max_request: u32,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_timeout: Duration::from_secs(10),
            request_timeout: None,
            structured_replies: true,
            block_status: true,
            max_request: DEFAULT_MAX_REQUEST,
        }
    }
}

/// A connected TCP or unix socket, split into owned halves without a lock between them.
trait Socket: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    type Reader: AsyncRead + Unpin + Send + 'static;
    type Writer: AsyncWrite + Unpin + Send + 'static;
    fn into_halves(self) -> (Self::Reader, Self::Writer);
}

impl Socket for tokio::net::TcpStream {
    type Reader = tokio::net::tcp::OwnedReadHalf;
    type Writer = tokio::net::tcp::OwnedWriteHalf;
    fn into_halves(self) -> (Self::Reader, Self::Writer) {
        self.into_split()
    }
}

impl Socket for tokio::net::UnixStream {
    type Reader = tokio::net::unix::OwnedReadHalf;
    type Writer = tokio::net::unix::OwnedWriteHalf;
    fn into_halves(self) -> (Self::Reader, Self::Writer) {
        self.into_split()
    }
}

/// Block size constraints (`NBD_INFO_BLOCK_SIZE`), or the spec's defaults when the
/// server advertised none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    /// Requests are aligned to this (a power of two, ≤ 64 KiB).
    pub minimum: u32,
    /// The server prefers requests of this size.
    pub preferred: u32,
    /// The largest payload of one request.
    pub maximum: u32,
}

impl Default for BlockSizes {
    fn default() -> Self {
        BlockSizes {
            minimum: 1,
            preferred: 4096,
            maximum: DEFAULT_MAX_REQUEST,
        }
    }
}

/// One connection to an NBD export, read-only, with any number of requests in flight.
///
/// Dropping the client closes the connection; requests still waiting fail.
pub struct Client {
    shared: Arc<Shared>,
    reader: Mutex<Option<JoinHandle<()>>>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("server", &self.shared.peer.server)
            .field("export", &self.shared.peer.export)
            .field("size", &self.shared.negotiated.size)
            .field("flags", &self.shared.negotiated.flags)
            .field("structured", &self.shared.negotiated.structured)
            .finish_non_exhaustive()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.shared.stop.cancel();
    }
}

impl Client {
    /// Connects to the server named by `uri` and negotiates its export (inside TLS for
    /// `nbds://` and `nbds+unix://`), all within `options.connect_timeout`.
    pub async fn connect(uri: &NbdUri, options: &ClientOptions) -> Result<Client> {
        let server = uri.server();
        let tls = match &uri.tls {
            Some(params) => Some(ClientTls::new(params, &uri.transport, &server)?),
            None => None,
        };
        let timeout = options.connect_timeout;
        let connect_error = |source| Error::Connect {
            server: server.clone(),
            source,
        };
        let attempt = async {
            match &uri.transport {
                Transport::Tcp { host, port } => {
                    let stream = tokio::net::TcpStream::connect((host.as_str(), *port))
                        .await
                        .map_err(connect_error)?;
                    let _ = stream.set_nodelay(true);
                    Client::handshake_over(stream, tls.as_ref(), &server, &uri.export, options)
                        .await
                }
                Transport::Unix { socket } => {
                    let stream = tokio::net::UnixStream::connect(socket)
                        .await
                        .map_err(connect_error)?;
                    Client::handshake_over(stream, tls.as_ref(), &server, &uri.export, options)
                        .await
                }
            }
        };
        tokio::time::timeout(timeout, attempt)
            .await
            .unwrap_or_else(|_| {
                Err(Error::Timeout {
                    server: server.clone(),
                    export: uri.export.clone(),
                    what: "connecting and the handshake".into(),
                    after: timeout,
                })
            })
    }

    /// Negotiates `export` over an already connected stream (`server` names it in
    /// messages). Used by tests and by callers with their own transports; the
    /// handshake is not under `options.connect_timeout` here.
    pub async fn from_stream<S>(
        stream: S,
        server: &str,
        export: &str,
        options: &ClientOptions,
    ) -> Result<Client>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (r, w) = tokio::io::split(stream);
        Client::handshake_on(r, w, server, export, options).await
    }

    /// The handshake on a connected socket, inside TLS if `tls` says so.
    async fn handshake_over<S: Socket>(
        stream: S,
        tls: Option<&ClientTls>,
        server: &str,
        export: &str,
        options: &ClientOptions,
    ) -> Result<Client> {
        match tls {
            Some(tls) => Client::handshake_in_tls(stream, tls, server, export, options).await,
            None => {
                let (r, w) = stream.into_halves();
                Client::handshake_on(r, w, server, export, options).await
            }
        }
    }

    async fn handshake_on<R, W>(
        mut r: R,
        mut w: W,
        server: &str,
        export: &str,
        options: &ClientOptions,
    ) -> Result<Client>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let peer = Peer {
            server: server.to_owned(),
            export: export.to_owned(),
        };
        let no_zeroes = handshake::greet(&mut r, &mut w, &peer).await?;
        let negotiated = handshake::negotiate(&mut r, &mut w, &peer, options, no_zeroes).await?;
        Ok(Client::start(r, w, peer, negotiated, options))
    }

    /// The greeting and `NBD_OPT_STARTTLS` in clear, the TLS handshake, then the rest of
    /// the negotiation inside TLS.
    async fn handshake_in_tls<S>(
        stream: S,
        tls: &ClientTls,
        server: &str,
        export: &str,
        options: &ClientOptions,
    ) -> Result<Client>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let peer = Peer {
            server: server.to_owned(),
            export: export.to_owned(),
        };
        let (mut r, mut w) = tokio::io::split(stream);
        let no_zeroes = handshake::greet(&mut r, &mut w, &peer).await?;
        handshake::starttls(&mut r, &mut w, &peer).await?;
        let stream = r.unsplit(w);
        let failed = |reason: String| Error::Tls {
            server: server.to_owned(),
            reason,
        };
        match tls {
            ClientTls::X509 { connector, name } => {
                let stream = connector
                    .connect(name.clone(), stream)
                    .await
                    .map_err(|e| failed(format!("TLS handshake failed: {e}")))?;
                Client::negotiate_in(stream, peer, options, no_zeroes).await
            }
            ClientTls::Psk(connector) => {
                let stream = connector
                    .connect(stream)
                    .await
                    .map_err(|e| failed(e.to_string()))?;
                Client::negotiate_in(stream, peer, options, no_zeroes).await
            }
        }
    }

    /// Option haggling on an established TLS `stream`.
    async fn negotiate_in<S>(
        stream: S,
        peer: Peer,
        options: &ClientOptions,
        no_zeroes: bool,
    ) -> Result<Client>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (mut r, mut w) = tokio::io::split(stream);
        let negotiated = handshake::negotiate(&mut r, &mut w, &peer, options, no_zeroes).await?;
        Ok(Client::start(r, w, peer, negotiated, options))
    }

    /// A client of a negotiated session: starts its reader and writer tasks.
    fn start<R, W>(
        r: R,
        w: W,
        peer: Peer,
        negotiated: Negotiated,
        options: &ClientOptions,
    ) -> Client
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let block_sizes = negotiated.block_sizes.unwrap_or_default();
        let min = block_sizes.minimum;
        let max_request = block_sizes.maximum.min(options.max_request.max(min));
        // A whole number of minimum blocks, at least one.
        let max_request = (max_request / min * min).max(min);
        debug!(
            server = %peer.server, export = %peer.export, size = negotiated.size,
            flags = negotiated.flags, structured = negotiated.structured,
            base_allocation = negotiated.base_allocation.is_some(), ?block_sizes,
            "NBD export negotiated"
        );
        let (out, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            peer,
            negotiated,
            block_sizes,
            max_request,
            request_timeout: options.request_timeout,
            out,
            state: Mutex::new(State::default()),
            stop: CancellationToken::new(),
        });
        let reader = tokio::spawn(reader::reader_task(Arc::clone(&shared), r));
        tokio::spawn(writer::writer_task(Arc::clone(&shared), w, rx));
        Client {
            shared,
            reader: Mutex::new(Some(reader)),
        }
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.shared.negotiated.size
    }

    /// The transmission flags (`NBD_FLAG_*`).
    pub fn flags(&self) -> u16 {
        self.shared.negotiated.flags
    }

    /// Whether the server exports the disk read-only.
    pub fn read_only(&self) -> bool {
        self.flags() & tflags::READ_ONLY != 0
    }

    /// Whether several connections to this export see the same data
    /// (`NBD_FLAG_CAN_MULTI_CONN`).
    pub fn can_multi_conn(&self) -> bool {
        self.flags() & tflags::CAN_MULTI_CONN != 0
    }

    /// Block size constraints: the server's, or the spec's defaults.
    pub fn block_sizes(&self) -> BlockSizes {
        self.shared.block_sizes
    }

    /// Whether the server advertised block sizes.
    pub fn advertised_block_sizes(&self) -> bool {
        self.shared.negotiated.block_sizes.is_some()
    }

    /// Whether structured replies were negotiated.
    pub fn structured_replies(&self) -> bool {
        self.shared.negotiated.structured
    }

    /// Whether [`block_status`](Self::block_status) is available (`base:allocation`
    /// was negotiated).
    pub fn has_block_status(&self) -> bool {
        self.shared.negotiated.base_allocation.is_some()
    }

    /// The server (`host:port` or socket path).
    pub fn server(&self) -> &str {
        &self.shared.peer.server
    }

    /// The export name.
    pub fn export(&self) -> &str {
        &self.shared.peer.export
    }

    /// Whether the connection is gone or takes no new requests.
    pub fn is_closed(&self) -> bool {
        let st = self.shared.state();
        st.closed.is_some() || st.draining.is_some()
    }

    /// Requests waiting for replies.
    pub fn in_flight(&self) -> usize {
        self.shared.state().pending.len()
    }

    fn check_range(&self, op: &'static str, offset: u64, length: u64) -> Result<()> {
        let size = self.size();
        if offset.checked_add(length).is_none_or(|end| end > size) {
            return Err(self.shared.peer.invalid(
                op,
                offset,
                length,
                format!("the range ends beyond the export's {size} bytes"),
            ));
        }
        Ok(())
    }

    /// Registers and sends one request; the returned receiver gets its reply.
    fn send(&self, op: Op, offset: u64, length: u32) -> Result<oneshot::Receiver<Result<Reply>>> {
        let (tx, rx) = oneshot::channel();
        let cookie = {
            let mut st = self.shared.state();
            if let Some(reason) = st.closed.as_ref().or(st.draining.as_ref()) {
                return Err(self.shared.peer.lost(reason.clone()));
            }
            let cookie = st.next_cookie;
            st.next_cookie = st.next_cookie.wrapping_add(1);
            st.pending
                .insert(cookie, Pending::new(op, offset, length, tx));
            cookie
        };
        let header = request_header(op.command(), cookie, offset, length);
        if self.shared.out.send(Out::Request(header)).is_err() {
            // The writer is gone: the connection is (being) closed.
            self.shared.fail_all("the connection was closed".into());
        }
        Ok(rx)
    }

    /// Waits for a reply, under the request timeout.
    async fn wait(
        &self,
        rx: oneshot::Receiver<Result<Reply>>,
        op: Op,
        offset: u64,
        length: u32,
    ) -> Result<Reply> {
        let shared = &self.shared;
        let wait = async {
            match rx.await {
                Ok(r) => r,
                Err(_) => Err(shared.peer.lost(shared.closed_reason())),
            }
        };
        let Some(limit) = shared.request_timeout else {
            return wait.await;
        };
        match tokio::time::timeout(limit, wait).await {
            Ok(r) => r,
            Err(_) => {
                let what = format!("{} of {length} bytes at offset {offset}", op.name());
                shared.fail_all(format!(
                    "no reply to {what} within {limit:?}; connection abandoned"
                ));
                Err(Error::Timeout {
                    server: shared.peer.server.clone(),
                    export: shared.peer.export.clone(),
                    what,
                    after: limit,
                })
            }
        }
    }

    /// The aligned range `[start, end)` around `[offset, offset + length)`: start
    /// rounded down and end rounded up to the minimum block size, capped at the size.
    fn align(&self, offset: u64, length: u64) -> (u64, u64) {
        let min = u64::from(self.shared.block_sizes.minimum);
        let start = offset / min * min;
        let end = (offset + length).div_ceil(min).saturating_mul(min);
        (start, end.min(self.size()))
    }

    /// Reads `length` bytes at `offset` (within the export). Reads larger than the
    /// server's maximum payload (at most [`ClientOptions::max_request`]) are split into
    /// requests that are all in flight at once; unaligned reads are widened to the
    /// server's minimum block size.
    pub async fn read(&self, offset: u64, length: u64) -> Result<Bytes> {
        self.check_range("READ", offset, length)?;
        if length == 0 {
            return Ok(Bytes::new());
        }
        let total = usize::try_from(length).map_err(|_| {
            self.shared
                .peer
                .invalid("READ", offset, length, "too large for memory".into())
        })?;
        let (start, end) = self.align(offset, length);
        let step = u64::from(self.shared.max_request);
        let mut requests = Vec::new();
        let mut at = start;
        while at < end {
            let n = (end - at).min(step) as u32;
            requests.push((at, n, self.send(Op::Read, at, n)?));
            at += u64::from(n);
        }
        if requests.len() == 1 && start == offset && end == offset + length {
            let (at, n, rx) = requests.pop().expect("one request");
            return match self.wait(rx, Op::Read, at, n).await? {
                Reply::Data(d) => Ok(Bytes::from(d)),
                Reply::Extents(_) => unreachable!("reads get data"),
            };
        }
        let mut out = BytesMut::with_capacity(total);
        for (at, n, rx) in requests {
            let Reply::Data(d) = self.wait(rx, Op::Read, at, n).await? else {
                unreachable!("reads get data");
            };
            // The part of [at, at + n) inside [offset, offset + length).
            let lo = offset.max(at);
            let hi = (offset + length).min(at + u64::from(n));
            if lo < hi {
                out.extend_from_slice(&d[(lo - at) as usize..(hi - at) as usize]);
            }
        }
        debug_assert_eq!(out.len(), total);
        Ok(out.freeze())
    }

    /// `base:allocation` status of the range at `offset`: `(length, flags)` extents
    /// (flags: [`proto::state::HOLE`], [`proto::state::ZERO`]) covering a prefix of the
    /// range, which may be shorter than asked for. Needs
    /// [`has_block_status`](Self::has_block_status).
    pub async fn block_status(&self, offset: u64, length: u64) -> Result<Vec<(u64, u32)>> {
        self.check_range("BLOCK_STATUS", offset, length)?;
        if !self.has_block_status() {
            return Err(self.shared.peer.invalid(
                "BLOCK_STATUS",
                offset,
                length,
                "the server did not agree to the base:allocation metadata context".into(),
            ));
        }
        if length == 0 {
            return Ok(Vec::new());
        }
        let (start, end) = self.align(offset, length);
        let min = u64::from(self.shared.block_sizes.minimum);
        let most = u64::from(u32::MAX) / min * min;
        let n = (end - start).min(most) as u32;
        let rx = self.send(Op::BlockStatus, start, n)?;
        let Reply::Extents(extents) = self.wait(rx, Op::BlockStatus, start, n).await? else {
            unreachable!("block status gets extents");
        };
        // Trim to [offset, offset + length).
        let want_end = offset + length;
        let mut out = Vec::with_capacity(extents.len());
        let mut pos = start;
        for (len, flags) in extents {
            let lo = pos.max(offset);
            let hi = (pos + len).min(want_end);
            if lo < hi {
                out.push((hi - lo, flags));
            }
            pos += len;
        }
        if out.is_empty() {
            // Only possible when the server's answer ended before `offset` (inside the
            // widened first block): report that as a protocol problem.
            return Err(self.shared.peer.protocol(format!(
                "BLOCK_STATUS at offset {start} reported nothing past offset {offset}"
            )));
        }
        Ok(out)
    }

    /// Sends `NBD_CMD_DISC` and closes the connection once the server has answered the
    /// requests in flight (waiting a few seconds at most). New requests fail at once.
    pub async fn disconnect(&self) {
        {
            let mut st = self.shared.state();
            if st.closed.is_some() {
                return;
            }
            st.draining
                .get_or_insert_with(|| "the client disconnected".into());
        }
        let header = request_header(cmd::DISC, u64::MAX, 0, 0);
        let _ = self.shared.out.send(Out::Disconnect(header));
        let reader = self.reader.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(reader) = reader {
            let _ = tokio::time::timeout(DISCONNECT_GRACE, reader).await;
        }
        self.shared.fail_all("the client disconnected".into());
    }
}

/// A compact request header, as the client sends them (no flags).
fn request_header(
    command: u16,
    cookie: u64,
    offset: u64,
    length: u32,
) -> [u8; proto::COMPACT_REQUEST_LEN] {
    let mut header = Vec::with_capacity(proto::COMPACT_REQUEST_LEN);
    proto::encode_request(
        &mut header,
        ReplyMode::Structured,
        &RequestHeader {
            flags: 0,
            command,
            cookie,
            offset,
            length: u64::from(length),
        },
    );
    header
        .try_into()
        .expect("compact request headers are 28 bytes")
}
