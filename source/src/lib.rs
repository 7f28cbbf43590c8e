//! `thinline-source`: where templates come from, and how their bytes are fetched.
//!
//! ```text
//!   location (path, file://, http(s)://, s3://, nfs://, nbd://, other schemes)
//!      │ parse                                   │ handler (an executable per scheme)
//!      ▼                                         ▼
//!   builtin ─► http │ s3 │ nfs │ nbd  ──►  RangeBackend (one attempt at one range)
//!                                              │
//!                                  fetch::FetchEngine (units, coalescing, readahead,
//!                                              │        in-flight sharing, retry, LRU)
//!                                              ▼
//!              storage::RemoteStorage: a thinline_format::Storage whose data path is
//!              the engine itself (DataPath::Ranges), so the image export awaits it
//! ```
//!
//! - [`location`]: a template location as the operator names it ([`Source`]).
//! - [`redact`]: locations as messages show them, without secrets.
//! - [`backend`]: the [`RangeBackend`] trait, [`FetchError`], [`RemoteConfig`].
//! - [`builtin`]: the built-in sources by scheme; [`http`], [`s3`], [`nfs`], [`nbd`].
//! - [`handler`]: scheme handlers, the extension point for other schemes.
//! - [`fetch`]: the fetch engine in front of every remote object; [`retry`] its backoff.
//! - [`related`]: the one rule for names inside remote images (backing files, extents).
//! - [`credentials`]: netrc credentials for HTTP(S).
//! - [`open`]: a location opened as a servable export, the composition `serve`, the
//!   proxy and the agent share.
//!
//! The crate depends on `thinline-format` (it implements `Storage`) and on
//! `thinline-nbd` (its NBD client for `nbd://` templates, its exports for [`open`]);
//! neither depends on it, so the server and the fuzz targets do not compile the AWS
//! SDK or reqwest.

#![warn(missing_docs)]

pub mod backend;
pub mod builtin;
pub mod credentials;
mod error;
pub mod fetch;
pub mod handler;
pub mod http;
pub mod location;
pub mod nbd;
pub mod nfs;
pub mod open;
pub mod redact;
pub mod related;
pub mod retry;
pub mod s3;
pub mod storage;

pub(crate) use backend::{BodyChunks, check_size, read_body};
pub use backend::{FetchError, FetchErrorKind, MAX_OBJECT_SIZE, RangeBackend, RemoteConfig};
pub use error::{Error, Result};
pub use location::{Source, parse};
