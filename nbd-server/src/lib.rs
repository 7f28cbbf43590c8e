//! `thinline-nbd`: the NBD protocol, server and exports of Thinline.
//!
//! ```text
//!   server ─► handshake ─► transmission ─► request (validation) ─► Export
//!                  │              │                                  │
//!                  └──── proto (wire format, sans-IO) ───┘            raw (files, block devices)
//! ```
//!
//! - [`proto`]: constants and encoders/decoders of the wire format (fuzzed).
//! - [`request`]: turns request headers into commands or the spec's error.
//! - [`export`]: the [`Export`](export::Export) trait every served disk implements.
//! - [`raw`]: raw files and block devices.
//! - [`image`]: qcow2, VHD, VMDK and raw images with backing chains, read-only, through
//!   `thinline-format`'s mapping plans.
//! - [`server`]: listeners, connection limits, graceful shutdown.
//! - [`client`]: an NBD client, for templates behind another NBD server and for the
//!   copy-on-read proxy's upstream; it shares [`proto`] with the server.
//!
//! Template locations and remote sources (HTTP(S), S3, NFS, `nbd://`, scheme handlers)
//! live in `thinline-source`, which depends on this crate, never the reverse: an image
//! layer's bytes are read through the `DataPath` its storage chose at open (a local
//! file, an async range reader, or blocking reads), so the image export needs no source
//! types.
//!
//! Serving a file takes a few lines:
//!
//! ```no_run
//! # async fn demo() -> thinline_nbd::Result<()> {
//! use std::sync::Arc;
//! use thinline_nbd::raw::{RawExport, RawOptions};
//! use thinline_nbd::server::{ExportSet, Listener, Server, ServerConfig};
//!
//! let mut exports = ExportSet::new();
//! exports.add("disk", Arc::new(RawExport::open("disk.img".as_ref(), &RawOptions::default())?))?;
//! let listener = Listener::bind_unix("/run/disk.sock".as_ref())?;
//! Server::new(exports, ServerConfig::default())?
//!     .run(vec![listener], async { let _ = tokio::signal::ctrl_c().await; })
//!     .await
//! # }
//! ```

#![warn(missing_docs)]

pub mod client;
mod decoded;
mod error;
pub mod export;
mod fileio;
mod handshake;
pub mod image;
mod keyfile;
pub mod metrics;
pub mod proto;
pub mod psk;
pub mod raw;
mod read_buffer;
pub mod request;
pub mod server;
mod shared;
mod socket;
mod spin;
pub mod tls;
mod transmission;
mod uring;

pub use error::{DataError, DataErrorKind, Error, Result, io_errno};
pub use fileio::LocalFileReader;
