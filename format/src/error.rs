//! The crate's error type. Every variant names the file (or URI) it is about, so an
//! operator reading one line knows which image of a chain is at fault and why.

use std::io;

/// Errors of `thinline-format`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading an image file failed.
    #[error("{path}: {op} of {length} bytes at offset {offset} failed")]
    Io {
        /// File or URI.
        path: String,
        /// What was being read (`header`, `L2 table`, `data`, …).
        op: &'static str,
        /// Byte offset in the file.
        offset: u64,
        /// Bytes requested.
        length: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A file could not be opened.
    #[error("{path}: cannot open")]
    Open {
        /// File or URI.
        path: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The image is malformed: a field out of range, a table outside the file, a bad
    /// checksum, a marker where none can be.
    #[error("{path}: invalid {format} image: {reason}")]
    Invalid {
        /// File or URI.
        path: String,
        /// `qcow2`, `vhd`, `vmdk`, `raw`.
        format: &'static str,
        /// What is wrong, with the offending value.
        reason: String,
    },
    /// The image is well formed but uses something Thinline refuses to serve
    /// (encryption, unknown incompatible features, an unsupported extent type).
    #[error("{path}: unsupported {format} image: {reason}")]
    Unsupported {
        /// File or URI.
        path: String,
        /// `qcow2`, `vhd`, `vmdk`, `raw`.
        format: &'static str,
        /// What is refused and why.
        reason: String,
    },
    /// The backing chain cannot be opened safely: a loop, too deep, a missing or
    /// mismatched parent, a backing file without a declared format.
    #[error("{path}: backing chain: {reason}")]
    Chain {
        /// The image whose backing is at fault.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// Compressed data did not decompress to a full cluster or grain.
    #[error("{path}: compressed data at offset {offset} is damaged: {reason}")]
    Decompress {
        /// File or URI.
        path: String,
        /// Host offset of the compressed data.
        offset: u64,
        /// What the decompressor said.
        reason: String,
    },
    /// The image is in use by another writer (qemu's image locks), or opening it for
    /// writing is refused for a reason an operator can fix.
    #[error("{path}: cannot open for writing: {reason}")]
    Locked {
        /// The image.
        path: String,
        /// Who holds it, or what to do.
        reason: String,
    },
    /// Zeroing the range would mean writing zero bytes, and the caller asked for a fast
    /// zero only (`NBD_CMD_FLAG_FAST_ZERO`).
    #[error("{path}: zeroing at offset {offset} would be as slow as writing")]
    NotFast {
        /// The image.
        path: String,
        /// Guest offset.
        offset: u64,
    },
    /// Mapping needs metadata that is not cached and the caller asked not to do I/O
    /// ([`crate::Fetch::CachedOnly`]). Callers retry with [`crate::Fetch::Allowed`]
    /// somewhere blocking is fine.
    #[error("metadata not cached")]
    NotCached,
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Builds [`Error::Invalid`].
    pub fn invalid(path: &str, format: &'static str, reason: impl Into<String>) -> Self {
        Error::Invalid {
            path: path.to_owned(),
            format,
            reason: reason.into(),
        }
    }

    /// Builds [`Error::Unsupported`].
    pub fn unsupported(path: &str, format: &'static str, reason: impl Into<String>) -> Self {
        Error::Unsupported {
            path: path.to_owned(),
            format,
            reason: reason.into(),
        }
    }

    /// Builds [`Error::Chain`].
    pub fn chain(path: &str, reason: impl Into<String>) -> Self {
        Error::Chain {
            path: path.to_owned(),
            reason: reason.into(),
        }
    }

    /// Turns an I/O error of `op` on `path` at `[offset, offset + length)` into
    /// [`Error::Io`] (for `map_err`).
    pub fn io_at(
        path: &str,
        op: &'static str,
        offset: u64,
        length: u64,
    ) -> impl FnOnce(io::Error) -> Error + use<> {
        let path = path.to_owned();
        move |source| Error::Io {
            path,
            op,
            offset,
            length,
            source,
        }
    }

    /// The message with every cause appended (`a: b: c`), for places that keep only
    /// a string.
    pub fn detail(&self) -> String {
        let mut text = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        text
    }

    /// The `errno` an NBD client should see for this error.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io { source, .. } | Error::Open { source, .. } => {
                source.raw_os_error().unwrap_or(libc::EIO)
            }
            Error::NotFast { .. } => libc::ENOTSUP,
            _ => libc::EIO,
        }
    }
}
