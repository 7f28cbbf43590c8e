//! Errors of opening and managing a cache. Errors on the data path are
//! [`thinline_nbd::Error`]s, because that is what an export answers with.

use std::io;
use std::path::PathBuf;

/// Errors of `thinline-cor`: every one names the cache file or device.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A system call on the cache failed.
    #[error("{op} of cache {path} failed")]
    Io {
        /// The cache file or device.
        path: PathBuf,
        /// What was being done (`open`, `read superblock`, `write presence map`, …).
        op: &'static str,
        /// The system error.
        #[source]
        source: io::Error,
    },
    /// Another process owns the cache.
    #[error("cache {path} is in use by {holder}")]
    Locked {
        /// The cache file or device.
        path: PathBuf,
        /// Who holds it, as it recorded itself (pid, command, since when).
        holder: String,
    },
    /// The cache was made for another template or another version of it.
    #[error(
        "cache {path} was made for another template or version of it (cached: {cached}; now: {current}); \
         it is never reused: remove it, or start with --cache-mismatch discard"
    )]
    IdentityMismatch {
        /// The cache file or device.
        path: PathBuf,
        /// The identity recorded in the cache.
        cached: String,
        /// The template's identity now.
        current: String,
    },
    /// The path holds data that is not a Thinline cache.
    #[error(
        "{path} holds data that is not a Thinline cache of this template ({reason}); refusing \
         to overwrite it, whatever --cache-mismatch says (use another path, an empty file or \
         a zeroed device)"
    )]
    NotACache {
        /// The cache file or device.
        path: PathBuf,
        /// What was found.
        reason: String,
    },
    /// The cache path is a symbolic link that is not followed.
    #[error(
        "cache {path}: {reason}; refusing to follow it (caches are opened without following \
         links; `thinline proxy --cache` follows only a link to a block device, such as \
         /dev/VG/LV)"
    )]
    Symlink {
        /// The cache path.
        path: PathBuf,
        /// What the link is.
        reason: String,
    },
    /// A block device too small for the template and its metadata.
    #[error("cache device {path} has {have} bytes; this template needs at least {need}")]
    TooSmall {
        /// The device.
        path: PathBuf,
        /// Bytes needed (template rounded up to 1 MiB, plus metadata).
        need: u64,
        /// Bytes the device has.
        have: u64,
    },
    /// A setting is out of range.
    #[error("{0}")]
    Invalid(String),
    /// The upstream could not be opened or answered wrongly.
    #[error(transparent)]
    Upstream(Box<thinline_nbd::Error>),
}

impl From<thinline_nbd::Error> for Error {
    fn from(e: thinline_nbd::Error) -> Self {
        Error::Upstream(Box::new(e))
    }
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
