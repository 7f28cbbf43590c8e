//! The crate's error type: what failed, where, and which NBD error value a client sees.

use std::io;
use std::path::PathBuf;

use crate::proto::errno;

/// Errors of `thinline-nbd`. Messages name the thing and the operation; the cause is
/// the `source`, printed by whoever walks the chain.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A request failed in the backing store.
    #[error("{op} of {length} bytes at offset {offset} on {path} failed")]
    Io {
        /// Operation (`read`, `write`, `flush`, `trim`, `write zeroes`, …).
        op: &'static str,
        /// File or device.
        path: PathBuf,
        /// Byte offset of the operation.
        offset: u64,
        /// Length of the operation.
        length: u64,
        /// The system error.
        #[source]
        source: io::Error,
    },
    /// The backing store shrank under the export: a read inside the export hit its end.
    #[error(
        "{path} is shorter than the export ({size} bytes): a read from offset {offset} reached its end"
    )]
    ShortRead {
        /// File or device.
        path: PathBuf,
        /// Where the read that hit the end started.
        offset: u64,
        /// The export's size.
        size: u64,
    },
    /// `write_zeroes` with `fast` would have to write zeroes slowly.
    #[error("zeroing {length} bytes at offset {offset} cannot be done fast on {path}")]
    FastZeroUnsupported {
        /// File or device.
        path: PathBuf,
        /// Byte offset of the operation.
        offset: u64,
        /// Length of the operation.
        length: u64,
    },
    /// The export is read-only.
    #[error("{path} is served read-only")]
    ReadOnly {
        /// File or device.
        path: PathBuf,
    },
    /// An image could not be opened.
    #[error("cannot open {path}")]
    Open {
        /// The image path.
        path: PathBuf,
        /// The system error.
        #[source]
        source: io::Error,
    },
    /// A write to a raw image whose format was detected would make the next detection
    /// find another format (a guest writing an image header).
    #[error(
        "refusing a write at offset {offset} of {path}: the raw image would be detected as {format} at the next start (its format was detected, not given; serve it with --format raw to allow this)"
    )]
    FormatChangeRefused {
        /// The image path.
        path: PathBuf,
        /// Byte offset of the write.
        offset: u64,
        /// The format detection would find.
        format: &'static str,
    },
    /// Two exports were given the same name.
    #[error("export name {name:?} is used twice")]
    DuplicateExport {
        /// The name.
        name: String,
    },
    /// An export name is not acceptable on the wire.
    #[error("export name {name:?} is invalid: {reason}")]
    InvalidExportName {
        /// The name.
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// An image could not be opened, mapped or decoded.
    #[error(transparent)]
    Format(#[from] thinline_format::Error),
    /// A template source (a remote object read by ranges, an upstream server) failed;
    /// its own error says what and where.
    #[error(transparent)]
    Source(thinline_format::data_path::RangeError),
    /// No exports were configured.
    #[error("no exports configured")]
    NoExports,
    /// A listening socket could not be set up.
    #[error("cannot listen on {address}")]
    Listen {
        /// The address or socket path.
        address: String,
        /// The system error.
        #[source]
        source: io::Error,
    },
    /// The unix socket path is taken by something that is not a stale socket.
    #[error("cannot listen on {path}: {reason}")]
    SocketPathInUse {
        /// The socket path.
        path: PathBuf,
        /// What is there.
        reason: &'static str,
    },
    /// A read or block-status request to a layer below failed (the copy-on-read
    /// cache's upstream); every reader waiting on it gets this error.
    #[error("{op} of {length} bytes at offset {offset} from {upstream} failed: {reason}")]
    Upstream {
        /// The upstream, without credentials.
        upstream: String,
        /// `read` or `block status`.
        op: &'static str,
        /// Offset of the request.
        offset: u64,
        /// Length of the request.
        length: u64,
        /// The NBD error value clients receive.
        errno: u32,
        /// Why, with the upstream's own message.
        reason: String,
    },
}

impl Error {
    /// The NBD error value a client receives for this error.
    pub fn nbd_errno(&self) -> u32 {
        match self {
            Error::Io { source, .. } => io_errno(source),
            Error::FastZeroUnsupported { .. } => errno::ENOTSUP,
            Error::ReadOnly { .. } | Error::FormatChangeRefused { .. } => errno::EPERM,
            Error::Upstream { errno, .. } => *errno,
            Error::Format(thinline_format::Error::Io { source, .. }) => io_errno(source),
            _ => errno::EIO,
        }
    }

    /// The byte offset the error happened at, if it is tied to one.
    pub fn offset(&self) -> Option<u64> {
        match self {
            Error::Io { offset, .. }
            | Error::ShortRead { offset, .. }
            | Error::Upstream { offset, .. } => Some(*offset),
            _ => None,
        }
    }
}

/// Maps a system error to the closest NBD error value, as the spec asks (`EDQUOT` and
/// `EFBIG` become `ENOSPC`, anything unknown becomes `EIO`).
pub fn io_errno(e: &io::Error) -> u32 {
    match e.raw_os_error() {
        Some(libc::EPERM | libc::EACCES | libc::EROFS) => errno::EPERM,
        Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => errno::ENOSPC,
        Some(libc::EINVAL) => errno::EINVAL,
        Some(libc::ENOMEM) => errno::ENOMEM,
        Some(libc::EOVERFLOW) => errno::EOVERFLOW,
        Some(libc::EOPNOTSUPP) => errno::ENOTSUP,
        Some(libc::ESHUTDOWN) => errno::ESHUTDOWN,
        _ => errno::EIO,
    }
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_errors_reach_clients_as_enospc() {
        assert_eq!(
            io_errno(&io::Error::from_raw_os_error(libc::EDQUOT)),
            errno::ENOSPC
        );
        assert_eq!(
            io_errno(&io::Error::from_raw_os_error(libc::EFBIG)),
            errno::ENOSPC
        );
    }

    #[test]
    fn unknown_system_errors_reach_clients_as_eio() {
        assert_eq!(
            io_errno(&io::Error::from_raw_os_error(libc::ENOLINK)),
            errno::EIO
        );
    }
}
