//! The crate's error type: which location could not be opened or served, and why.

use crate::FetchError;

/// Errors of `thinline-source`. Locations in messages never show credentials.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A template location names a source that cannot be served.
    #[error("cannot serve {uri}: {reason}")]
    UnsupportedSource {
        /// The location, without credentials or query.
        uri: String,
        /// Why.
        reason: String,
    },
    /// A remote template could not be opened or read.
    #[error(transparent)]
    Remote(#[from] FetchError),
    /// An image could not be opened, mapped or decoded.
    #[error(transparent)]
    Format(#[from] thinline_format::Error),
    /// The opened location could not be made an export.
    #[error(transparent)]
    Export(Box<thinline_nbd::Error>),
}

impl From<thinline_nbd::Error> for Error {
    fn from(e: thinline_nbd::Error) -> Self {
        Error::Export(Box::new(e))
    }
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
