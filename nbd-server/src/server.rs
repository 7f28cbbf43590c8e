//! The daemon: listeners, the connection limit, graceful shutdown.
//!
//! `Server::run(listeners, shutdown)` accepts on every listener until `shutdown`
//! completes, then stops accepting, lets each connection finish its requests in flight
//! (new ones get `ESHUTDOWN`), flushes every export and returns. Connections over
//! `max_connections` get a polite refusal during the handshake instead of a reset.

use std::future::Future;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::read_buffer::ReadBuffer;
use tokio::net::{TcpListener, UnixListener};
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::handshake::{self, HandshakeEnd, Negotiated, Refusal};
use crate::shared::Shared;
pub use crate::shared::{DEFAULT_IDLE_SPIN, ExportSet, ServerConfig};
use crate::socket::SocketReader;
use crate::tls::Acceptor;
use crate::{Error, Result, transmission};

/// The send buffer of a TLS connection on a unix socket (the kernel caps it at
/// `net.core.wmem_max`, then doubles it): 1 MiB reads inside TLS measured 22% faster than
/// with the default, 4 KiB reads the same.
const TLS_UNIX_SEND_BUFFER: usize = 512 * 1024;

/// A listening socket.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// A unix socket; the path is removed when the server stops.
    Unix(UnixListener, PathBuf),
    /// A unix socket someone else bound (a service manager's socket activation): left
    /// in place when the server stops.
    UnixPassed(UnixListener, PathBuf),
}

impl Listener {
    /// Binds a TCP address (`host:port`).
    pub async fn bind_tcp(address: &str) -> Result<Listener> {
        let l = TcpListener::bind(address)
            .await
            .map_err(|source| Error::Listen {
                address: address.to_owned(),
                source,
            })?;
        Ok(Listener::Tcp(l))
    }

    /// Binds a unix socket with mode 0660 (see [`bind_unix_socket`]).
    pub fn bind_unix(path: &Path) -> Result<Listener> {
        let l = bind_unix_socket(path, 0o660)?;
        let listen_err = |source| Error::Listen {
            address: path.display().to_string(),
            source,
        };
        l.set_nonblocking(true).map_err(listen_err)?;
        let l = UnixListener::from_std(l).map_err(listen_err)?;
        Ok(Listener::Unix(l, path.to_owned()))
    }

    /// A listening TCP socket made elsewhere (a service manager's socket activation).
    pub fn from_std_tcp(l: std::net::TcpListener) -> Result<Listener> {
        let address = l
            .local_addr()
            .map_or_else(|_| "passed TCP socket".into(), |a| a.to_string());
        let listen_err = |source| Error::Listen { address, source };
        l.set_nonblocking(true)
            .and_then(|()| TcpListener::from_std(l))
            .map(Listener::Tcp)
            .map_err(listen_err)
    }

    /// A listening unix socket made elsewhere (a service manager's socket activation),
    /// left in place when the server stops.
    pub fn from_std_unix(l: std::os::unix::net::UnixListener) -> Result<Listener> {
        let path = l
            .local_addr()
            .ok()
            .and_then(|a| a.as_pathname().map(Path::to_owned))
            .unwrap_or_else(|| PathBuf::from("passed unix socket"));
        let listen_err = |source| Error::Listen {
            address: path.display().to_string(),
            source,
        };
        l.set_nonblocking(true).map_err(listen_err)?;
        let l = UnixListener::from_std(l).map_err(listen_err)?;
        Ok(Listener::UnixPassed(l, path))
    }

    /// A printable address (for logs and NBD URIs).
    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map_or_else(|_| "tcp".into(), |a| a.to_string()),
            Listener::Unix(_, p) | Listener::UnixPassed(_, p) => p.display().to_string(),
        }
    }
}

/// Binds a unix socket at `path` that never has more permissions than `mode`.
///
/// A stale socket file (nobody listening) is replaced; a live socket or any other file
/// at `path` is refused. Linux creates a socket file with the socket's own inode mode
/// less the umask, so the mode is set on the socket before `bind` (the file appears with
/// `mode` less the umask, never more) and the file is then given exactly `mode`. A
/// permissive umask cannot open a window for another user, no process-wide umask is
/// changed under other threads, and the socket keeps its own path (as `ss -x` and
/// `/proc/net/unix` show it).
pub fn bind_unix_socket(path: &Path, mode: u32) -> Result<std::os::unix::net::UnixListener> {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let listen_err = |source| Error::Listen {
        address: path.display().to_string(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(Error::SocketPathInUse {
                    path: path.to_owned(),
                    reason: "another server is listening there",
                });
            }
            std::fs::remove_file(path).map_err(listen_err)?;
        }
        Ok(_) => {
            return Err(Error::SocketPathInUse {
                path: path.to_owned(),
                reason: "a file that is not a socket is there",
            });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(listen_err(e)),
    }
    let bind = || -> std::io::Result<std::os::unix::net::UnixListener> {
        let fd = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::STREAM,
            SocketFlags::CLOEXEC,
            None,
        )?;
        rustix::fs::fchmod(&fd, rustix::fs::Mode::from_raw_mode(mode))?;
        rustix::net::bind(&fd, &SocketAddrUnix::new(path)?)?;
        // Give back what the umask took (never more than `mode`).
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
        rustix::net::listen(&fd, 1024)?;
        Ok(std::os::unix::net::UnixListener::from(fd))
    };
    bind().map_err(listen_err)
}

/// An NBD server over a set of exports.
#[derive(Debug)]
pub struct Server {
    shared: Arc<Shared>,
}

impl Server {
    /// Creates a server.
    pub fn new(exports: ExportSet, config: ServerConfig) -> Result<Server> {
        if exports.is_empty() {
            return Err(Error::NoExports);
        }
        if let Some(metrics) = &config.metrics {
            // Every export's series exist from the start, at zero.
            for (name, _) in exports.iter() {
                metrics.declare(name);
            }
        }
        Ok(Server {
            shared: Arc::new(Shared::new(exports, config)),
        })
    }

    /// Serves until `shutdown` completes, then drains connections and flushes exports.
    pub async fn run(
        self,
        listeners: Vec<Listener>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<()> {
        let tracker = TaskTracker::new();
        let mut unix_paths = Vec::new();
        for listener in listeners {
            let shared = Arc::clone(&self.shared);
            let t = tracker.clone();
            let unix = match listener {
                Listener::Tcp(l) => {
                    tracker.spawn(async move {
                        loop {
                            tokio::select! {
                                () = shared.shutdown.cancelled() => break,
                                accepted = l.accept() => match accepted {
                                    Ok((stream, addr)) => {
                                        let _ = stream.set_nodelay(true);
                                        let (r, w) = stream.into_split();
                                        let r = SocketReader::new(r);
                                        spawn_connection(&t, &shared, r, w, addr.to_string());
                                    }
                                    Err(e) => accept_failed(&e).await,
                                },
                            }
                        }
                    });
                    continue;
                }
                Listener::Unix(l, path) => {
                    unix_paths.push(path);
                    l
                }
                Listener::UnixPassed(l, _) => l,
            };
            tracker.spawn(async move {
                let mut n = 0u64;
                loop {
                    tokio::select! {
                        () = shared.shutdown.cancelled() => break,
                        accepted = unix.accept() => match accepted {
                            Ok((stream, _)) => {
                                if shared.config.tls.is_some() {
                                    widen_send_buffer(&stream);
                                }
                                n += 1;
                                let (r, w) = stream.into_split();
                                let r = SocketReader::new(r);
                                spawn_connection(&t, &shared, r, w, format!("unix#{n}"));
                            }
                            Err(e) => accept_failed(&e).await,
                        },
                    }
                }
            });
        }
        shutdown.await;
        info!("shutting down: no new connections, finishing requests in flight");
        self.shared.shutdown.cancel();
        tracker.close();
        tracker.wait().await;
        for path in unix_paths {
            let _ = std::fs::remove_file(path);
        }
        let mut result = Ok(());
        for (name, export) in self.shared.exports.iter() {
            if let Err(e) = export.flush().await {
                error!(export = %name, error = %e, "final flush failed");
                result = Err(e);
            }
        }
        info!("stopped");
        result
    }

    /// Serves one already-connected stream (used by tests and benchmarks).
    pub async fn serve_connection<R, W>(&self, reader: R, writer: W, peer: String)
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        connection(Arc::clone(&self.shared), reader, writer, peer, None).await;
    }

    /// Starts a graceful shutdown of connections served with `serve_connection`.
    pub fn shutdown(&self) {
        self.shared.shutdown.cancel();
    }
}

async fn accept_failed(e: &std::io::Error) {
    // EMFILE and friends: back off instead of spinning.
    warn!(error = %e, "accept failed");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

fn spawn_connection<R, W>(
    tracker: &TaskTracker,
    shared: &Arc<Shared>,
    reader: R,
    writer: W,
    peer: String,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let slot = match &shared.connections {
        None => Some(None),
        Some(sem) => match Arc::clone(sem).try_acquire_owned() {
            Ok(p) => Some(Some(p)),
            Err(_) => None,
        },
    };
    let shared = Arc::clone(shared);
    match slot {
        Some(permit) => {
            tracker.spawn(async move {
                connection(shared, reader, writer, peer, None).await;
                drop(permit);
            });
        }
        None => {
            let Ok(refusal_slot) = Arc::clone(&shared.refusals).try_acquire_owned() else {
                debug!(%peer, "over the connection limit and too many refusals pending: closed");
                return;
            };
            let limit = shared.config.max_connections.unwrap_or(0);
            tracker.spawn(async move {
                connection(shared, reader, writer, peer, Some(limit)).await;
                drop(refusal_slot);
            });
        }
    }
}

/// One connection: handshake, then transmission; after STARTTLS, the TLS handshake and
/// the rest of the handshake inside TLS. The handshake timeout bounds all of the
/// handshake, counted from the connection: a client slow in every step (in clear, the TLS
/// handshake, inside TLS) gets no more time than one slow in one.
async fn connection<R, W>(
    shared: Arc<Shared>,
    reader: R,
    mut writer: W,
    peer: String,
    over_limit: Option<usize>,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let span = info_span!("conn", %peer);
    let deadline = tokio::time::Instant::now() + shared.config.handshake_timeout;
    async move {
        let mut reader = ReadBuffer::new(reader);
        let refusal = over_limit.map_or(Refusal::None, Refusal::TooManyConnections);
        let Some(negotiated) =
            handshake(&shared, &mut reader, &mut writer, refusal, None, deadline).await
        else {
            return;
        };
        let flags = match negotiated {
            Negotiated::Session(session) => {
                return serve(session, reader, writer, &shared, &peer).await;
            }
            Negotiated::StartTls(flags) => flags,
        };
        let Some(tls) = shared.config.tls.clone() else {
            return;
        };
        // The client speaks TLS only once STARTTLS is acknowledged: bytes already here
        // were sent before that, in clear, and would be taken for TLS records.
        if reader.has_buffered() {
            warn!("data sent after NBD_OPT_STARTTLS before its reply; connection closed");
            return;
        }
        let io = tokio::io::join(reader.into_inner(), writer);
        match &tls.acceptor {
            Acceptor::X509(acceptor) => {
                let accepted = tls_handshake(&shared, acceptor.accept(io), deadline).await;
                if let Some(stream) = accepted {
                    in_tls(stream, &shared, &peer, refusal, flags, deadline).await;
                }
            }
            Acceptor::Psk(acceptor) => {
                let accepted = tls_handshake(&shared, acceptor.accept(io), deadline).await;
                if let Some(stream) = accepted {
                    in_tls(stream, &shared, &peer, refusal, flags, deadline).await;
                }
            }
        }
    }
    .instrument(span)
    .await;
}

/// Lets a unix-socket connection of a TLS server queue [`TLS_UNIX_SEND_BUFFER`] bytes for
/// its client. Inside TLS the client's decryption is the slow end of a large read: with the
/// default buffer (208 KiB) the server stopped on a full socket until the client had read
/// part of it, instead of encrypting the next reply. TCP sizes its buffers itself and is
/// left alone.
fn widen_send_buffer(stream: &tokio::net::UnixStream) {
    if let Err(e) = rustix::net::sockopt::set_socket_send_buffer_size(stream, TLS_UNIX_SEND_BUFFER)
    {
        debug!(error = %e, "could not widen the socket's send buffer");
    }
}

/// Runs the TLS handshake `accept` (until `deadline`, the handshake timeout's end);
/// `None`, logged, when it fails.
async fn tls_handshake<S>(
    shared: &Shared,
    accept: impl Future<Output = std::io::Result<S>>,
    deadline: tokio::time::Instant,
) -> Option<S> {
    let timeout = shared.config.handshake_timeout;
    match tokio::time::timeout_at(deadline, accept).await {
        Ok(Ok(stream)) => {
            debug!("TLS established");
            Some(stream)
        }
        Ok(Err(e)) => {
            info!(error = %e, "TLS handshake failed; connection closed");
            None
        }
        Err(_) => {
            info!(
                timeout_secs = timeout.as_secs_f64(),
                "TLS handshake timed out; connection dropped"
            );
            None
        }
    }
}

/// The rest of a session after STARTTLS: option haggling resumes inside TLS, then
/// transmission.
async fn in_tls<S>(
    stream: S,
    shared: &Arc<Shared>,
    peer: &str,
    refusal: Refusal,
    flags: handshake::ClientFlags,
    deadline: tokio::time::Instant,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (reader, mut writer) = tokio::io::split(stream);
    let mut reader = ReadBuffer::new(reader);
    let resumed = handshake(
        shared,
        &mut reader,
        &mut writer,
        refusal,
        Some(flags),
        deadline,
    );
    match resumed.await {
        Some(Negotiated::Session(session)) => {
            serve(session, reader, writer, shared, peer).await;
        }
        // Refused inside TLS (`NBD_REP_ERR_INVALID`): never asked for twice.
        Some(Negotiated::StartTls(_)) | None => {}
    }
}

/// Negotiates (until `deadline`, the handshake timeout's end, and cut short by
/// shutdown); `None`, logged, when the connection ends instead.
async fn handshake<R, W>(
    shared: &Arc<Shared>,
    reader: &mut ReadBuffer<R>,
    writer: &mut W,
    refusal: Refusal,
    resume: Option<handshake::ClientFlags>,
    deadline: tokio::time::Instant,
) -> Option<Negotiated>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let timeout = shared.config.handshake_timeout;
    let negotiated = tokio::select! {
        r = tokio::time::timeout_at(deadline, handshake::negotiate(reader, writer, shared, refusal, resume)) => r,
        () = async {
            shared.shutdown.cancelled().await;
            tokio::time::sleep(shared.config.shutdown_grace).await;
        } => {
            debug!("handshake cut short by shutdown");
            return None;
        }
    };
    match negotiated {
        Err(_) => {
            info!(
                timeout_secs = timeout.as_secs_f64(),
                "handshake timed out; connection dropped"
            );
            None
        }
        Ok(Err(HandshakeEnd::Closed(why))) => {
            debug!(reason = %why, "connection closed during the handshake");
            None
        }
        Ok(Err(HandshakeEnd::Violation(why))) => {
            warn!(reason = %why, "protocol violation during the handshake; connection closed");
            None
        }
        Ok(Err(HandshakeEnd::Io(e))) => {
            info!(error = %e, "connection failed during the handshake");
            None
        }
        Ok(Ok(negotiated)) => Some(negotiated),
    }
}

/// The transmission phase of a negotiated session.
async fn serve<R, W>(
    session: handshake::Session,
    reader: ReadBuffer<R>,
    writer: W,
    shared: &Arc<Shared>,
    peer: &str,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    info!(
        export = %session.export_name,
        mode = ?session.mode,
        contexts = session.contexts.len(),
        "client connected"
    );
    let export_name = session.export_name.clone();
    transmission::run(session, reader, writer, Arc::clone(shared), peer.to_owned()).await;
    info!(export = %export_name, "client disconnected");
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::net::sockopt::socket_send_buffer_size;

    #[tokio::test]
    async fn a_widened_unix_socket_may_queue_more_than_the_default() {
        let (stream, _peer) = tokio::net::UnixStream::pair().unwrap();
        let default = socket_send_buffer_size(&stream).unwrap();
        widen_send_buffer(&stream);
        let widened = socket_send_buffer_size(&stream).unwrap();
        // The kernel caps the request at net.core.wmem_max (212,992 by default), then doubles it.
        assert!(
            widened > default,
            "send buffer {widened} after widening, {default} before"
        );
    }
}
