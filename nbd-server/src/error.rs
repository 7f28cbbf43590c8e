//! The crate's error type: what failed, where, and which NBD error value a client sees.
//!
//! Everything a request can meet is one [`DataError`]: a small [`DataErrorKind`], the
//! operation, what it ran on, the range, the errno a client receives, and the cause as
//! a source. Crates above (template sources, the copy-on-read cache) report their
//! failures through it with their own error as the source, so they never add variants
//! here (as cloud-hypervisor's `BlockError` does for its block crate).

use std::fmt;
use std::io;
use std::path::PathBuf;

use crate::proto::errno;

/// Errors of `thinline-nbd`. Messages name the thing and the operation; the cause is
/// the `source`, printed by whoever walks the chain.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A request on an export failed; the client receives its errno.
    #[error(transparent)]
    Data(#[from] DataError),
    /// An image could not be opened.
    #[error("cannot open {path}")]
    Open {
        /// The image path.
        path: PathBuf,
        /// The system error.
        #[source]
        source: io::Error,
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
    /// A TLS certificate, key or CA file cannot be used.
    #[error("cannot use {path} for TLS: {reason}")]
    Tls {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
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
}

impl Error {
    /// The NBD error value a client receives for this error.
    pub fn nbd_errno(&self) -> u32 {
        match self {
            Error::Data(e) => e.errno(),
            Error::Format(thinline_format::Error::Io { source, .. }) => io_errno(source),
            Error::Format(thinline_format::Error::NotFast { .. }) => errno::ENOTSUP,
            _ => errno::EIO,
        }
    }

    /// The byte offset the error happened at, if it is tied to one.
    pub fn offset(&self) -> Option<u64> {
        match self {
            Error::Data(e) => e.offset(),
            _ => None,
        }
    }
}

/// What kind of failure a request met.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DataErrorKind {
    /// The store failed; the errno comes from the system error.
    Io,
    /// The export is read-only (`EPERM`).
    ReadOnly,
    /// A write to a raw image whose format was detected would make the next detection
    /// find `format` (a guest writing an image header; `EPERM`).
    FormatChange {
        /// The format detection would find.
        format: &'static str,
    },
    /// The store shrank under the export: a read inside the export hit its end at
    /// `size` (`EIO`).
    ShortRead {
        /// The export's size.
        size: u64,
    },
    /// `write_zeroes` with `fast` would have to write zeroes slowly (`ENOTSUP`).
    NotFast,
    /// A template source failed; its own error (the source) says what and where (`EIO`).
    Source,
    /// A layer below (the copy-on-read cache's upstream) failed with `errno`; every
    /// reader waiting on it gets this error.
    Upstream {
        /// The NBD error value clients receive.
        errno: u32,
        /// Why, with the upstream's own message.
        reason: String,
    },
}

/// A failed request: kind, operation, target, range, errno and cause.
#[derive(Debug)]
pub struct DataError {
    kind: DataErrorKind,
    op: &'static str,
    target: String,
    offset: u64,
    length: u64,
    errno: u32,
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl DataError {
    fn new(
        kind: DataErrorKind,
        op: &'static str,
        target: String,
        offset: u64,
        length: u64,
    ) -> Self {
        let errno = match &kind {
            DataErrorKind::Io | DataErrorKind::ShortRead { .. } | DataErrorKind::Source => {
                errno::EIO
            }
            DataErrorKind::ReadOnly | DataErrorKind::FormatChange { .. } => errno::EPERM,
            DataErrorKind::NotFast => errno::ENOTSUP,
            DataErrorKind::Upstream { errno, .. } => *errno,
        };
        DataError {
            kind,
            op,
            target,
            offset,
            length,
            errno,
            source: None,
        }
    }

    /// `op` of `length` bytes at `offset` on `target` (a file or device) failed with
    /// `source`; the errno follows the system error.
    pub fn io(
        op: &'static str,
        target: impl fmt::Display,
        offset: u64,
        length: u64,
        source: io::Error,
    ) -> Self {
        let mut e = Self::new(DataErrorKind::Io, op, target.to_string(), offset, length);
        e.errno = io_errno(&source);
        e.source = Some(Box::new(source));
        e
    }

    /// `target` is served read-only.
    pub fn read_only(target: impl fmt::Display) -> Self {
        Self::new(DataErrorKind::ReadOnly, "write", target.to_string(), 0, 0)
    }

    /// A write at `offset` of `target` would make it detect as `format`.
    pub fn format_change(target: impl fmt::Display, offset: u64, format: &'static str) -> Self {
        Self::new(
            DataErrorKind::FormatChange { format },
            "write",
            target.to_string(),
            offset,
            0,
        )
    }

    /// A read from `offset` reached the end of `target`, shorter than the export's `size`.
    pub fn short_read(target: impl fmt::Display, offset: u64, size: u64) -> Self {
        Self::new(
            DataErrorKind::ShortRead { size },
            "read",
            target.to_string(),
            offset,
            0,
        )
    }

    /// Zeroing `length` bytes at `offset` of `target` cannot be done fast.
    pub fn not_fast(target: impl fmt::Display, offset: u64, length: u64) -> Self {
        Self::new(
            DataErrorKind::NotFast,
            "write zeroes",
            target.to_string(),
            offset,
            length,
        )
    }

    /// A template source failed with `source`, which says what and where.
    pub fn source(source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        let mut e = Self::new(DataErrorKind::Source, "read", String::new(), 0, 0);
        e.source = Some(source.into());
        e
    }

    /// `op` of `length` bytes at `offset` from `upstream` failed with `errno`, for
    /// `reason`.
    pub fn upstream(
        upstream: impl fmt::Display,
        op: &'static str,
        offset: u64,
        length: u64,
        errno: u32,
        reason: String,
    ) -> Self {
        Self::new(
            DataErrorKind::Upstream { errno, reason },
            op,
            upstream.to_string(),
            offset,
            length,
        )
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> &DataErrorKind {
        &self.kind
    }

    /// The NBD error value a client receives.
    pub fn errno(&self) -> u32 {
        self.errno
    }

    /// The operation (`read`, `write`, `flush`, `trim`, `write zeroes`, …).
    pub fn op(&self) -> &'static str {
        self.op
    }

    /// The file, device or upstream, as shown in messages.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The byte offset the failure is tied to, if any.
    pub fn offset(&self) -> Option<u64> {
        match self.kind {
            DataErrorKind::Io
            | DataErrorKind::ShortRead { .. }
            | DataErrorKind::Upstream { .. } => Some(self.offset),
            _ => None,
        }
    }
}

impl fmt::Display for DataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let DataError {
            op,
            target,
            offset,
            length,
            ..
        } = self;
        match &self.kind {
            DataErrorKind::Io => write!(
                f,
                "{op} of {length} bytes at offset {offset} on {target} failed"
            ),
            DataErrorKind::ReadOnly => write!(f, "{target} is served read-only"),
            DataErrorKind::FormatChange { format } => write!(
                f,
                "refusing a write at offset {offset} of {target}: the raw image would be detected as {format} at the next start (its format was detected, not given; serve it with --format raw to allow this)"
            ),
            DataErrorKind::ShortRead { size } => write!(
                f,
                "{target} is shorter than the export ({size} bytes): a read from offset {offset} reached its end"
            ),
            DataErrorKind::NotFast => write!(
                f,
                "zeroing {length} bytes at offset {offset} cannot be done fast on {target}"
            ),
            DataErrorKind::Source => match &self.source {
                Some(source) => fmt::Display::fmt(source, f),
                None => write!(f, "a template source failed"),
            },
            DataErrorKind::Upstream { reason, .. } => write!(
                f,
                "{op} of {length} bytes at offset {offset} from {target} failed: {reason}"
            ),
        }
    }
}

impl std::error::Error for DataError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self.kind {
            // Shown as this error itself: its source is the source's own source.
            DataErrorKind::Source => self.source.as_deref()?.source(),
            _ => self.source.as_deref().map(|s| s as _),
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
