//! The client's errors: what failed, on which server and export, in words a user can act on.

use std::io;
use std::time::Duration;

use crate::proto::errno;

/// Errors of the NBD client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An `nbd://` or `nbd+unix://` URI could not be parsed or is not supported.
    #[error("invalid NBD URI {uri}: {reason}")]
    Uri {
        /// The URI without user info, query or fragment.
        uri: String,
        /// Why.
        reason: String,
    },
    /// The NBD client could not reach the server.
    #[error("cannot connect to NBD server {server}")]
    Connect {
        /// `host:port` or the unix socket path.
        server: String,
        /// The system error.
        #[source]
        source: io::Error,
    },
    /// TLS with the NBD server could not be set up: its files, or the TLS handshake.
    #[error("TLS with NBD server {server} failed: {reason}")]
    Tls {
        /// `host:port` or the unix socket path.
        server: String,
        /// Why (a file, a refused certificate or key, the server not offering TLS).
        reason: String,
    },
    /// The NBD server's handshake broke the protocol or offered nothing usable.
    #[error("NBD handshake with {server} for export {export:?} failed: {reason}")]
    Handshake {
        /// `host:port` or the unix socket path.
        server: String,
        /// The export asked for.
        export: String,
        /// What went wrong.
        reason: String,
    },
    /// The NBD server refused an option with an `NBD_REP_ERR_*` reply.
    #[error("NBD server {server} refused {option} for export {export:?} with {reply}: {message}")]
    OptionRefused {
        /// `host:port` or the unix socket path.
        server: String,
        /// The export asked for.
        export: String,
        /// The option (`NBD_OPT_GO`, …).
        option: String,
        /// The error reply (`NBD_REP_ERR_UNKNOWN`, …).
        reply: String,
        /// Its numeric value (`proto::rep::ERR_*`).
        code: u32,
        /// The server's message (control characters replaced).
        message: String,
    },
    /// Connecting or a handshake, or a request, took longer than allowed.
    #[error("NBD server {server}, export {export:?}: {what} timed out after {after:?}")]
    Timeout {
        /// `host:port` or the unix socket path.
        server: String,
        /// The export.
        export: String,
        /// What timed out (`connect and handshake`, `READ of 4096 bytes at offset 0`).
        what: String,
        /// The limit.
        after: Duration,
    },
    /// The connection to the NBD server is gone; requests in flight on it failed.
    #[error("connection to NBD server {server} (export {export:?}) lost: {reason}")]
    ConnectionLost {
        /// `host:port` or the unix socket path.
        server: String,
        /// The export.
        export: String,
        /// Why (end of stream, reset, protocol violation, client shutdown, …).
        reason: String,
    },
    /// The NBD server sent something the protocol does not allow in transmission.
    #[error("NBD server {server} (export {export:?}) broke the protocol: {reason}")]
    Protocol {
        /// `host:port` or the unix socket path.
        server: String,
        /// The export.
        export: String,
        /// What it sent.
        reason: String,
    },
    /// The NBD server answered a request with an error.
    #[error(
        "NBD server {server} failed {op} of {length} bytes at offset {offset} of export {export:?}: {}{message}",
        errno_text(*errno)
    )]
    Request {
        /// `host:port` or the unix socket path.
        server: String,
        /// The export.
        export: String,
        /// `READ` or `BLOCK_STATUS`.
        op: &'static str,
        /// Offset of the request.
        offset: u64,
        /// Length of the request.
        length: u64,
        /// The NBD error value (`EIO` = 5, …).
        errno: u32,
        /// The server's message, prefixed with `": "`, or empty.
        message: String,
    },
    /// A request the client refuses to send (outside the export, or unsupported).
    #[error(
        "cannot send {op} of {length} bytes at offset {offset} to NBD export {export:?} on {server}: {reason}"
    )]
    InvalidRequest {
        /// `host:port` or the unix socket path.
        server: String,
        /// The export.
        export: String,
        /// `READ` or `BLOCK_STATUS`.
        op: &'static str,
        /// Offset of the request.
        offset: u64,
        /// Length of the request.
        length: u64,
        /// Why.
        reason: String,
    },
}

/// Result alias for the NBD client.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Text for an NBD error value: `EIO (input/output error)`.
pub fn errno_text(value: u32) -> String {
    let text = match value {
        errno::EPERM => "EPERM (operation not permitted)",
        errno::EIO => "EIO (input/output error)",
        errno::ENOMEM => "ENOMEM (out of memory)",
        errno::EINVAL => "EINVAL (invalid argument)",
        errno::ENOSPC => "ENOSPC (no space left)",
        errno::EOVERFLOW => "EOVERFLOW (value too large)",
        errno::ENOTSUP => "ENOTSUP (operation not supported)",
        errno::ESHUTDOWN => "ESHUTDOWN (server shutting down)",
        other => return format!("error {other} (unknown, treated as EINVAL)"),
    };
    text.to_owned()
}

/// Names a server and export in errors.
#[derive(Debug, Clone)]
pub(super) struct Peer {
    pub(super) server: String,
    pub(super) export: String,
}

impl Peer {
    pub(super) fn handshake(&self, reason: impl Into<String>) -> Error {
        Error::Handshake {
            server: self.server.clone(),
            export: self.export.clone(),
            reason: reason.into(),
        }
    }

    pub(super) fn lost(&self, reason: impl Into<String>) -> Error {
        Error::ConnectionLost {
            server: self.server.clone(),
            export: self.export.clone(),
            reason: reason.into(),
        }
    }

    pub(super) fn protocol(&self, reason: impl Into<String>) -> Error {
        Error::Protocol {
            server: self.server.clone(),
            export: self.export.clone(),
            reason: reason.into(),
        }
    }

    pub(super) fn invalid(
        &self,
        op: &'static str,
        offset: u64,
        length: u64,
        reason: String,
    ) -> Error {
        Error::InvalidRequest {
            server: self.server.clone(),
            export: self.export.clone(),
            op,
            offset,
            length,
            reason,
        }
    }
}
