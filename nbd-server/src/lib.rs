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
//! - [`source`]: template locations (paths, `file://` URIs, remote URIs, handler schemes).
//! - [`open`]: a location opened as a servable export (format detected or given, the
//!   image chain, the raw-file guard), the composition `serve` and the agent share.
//! - [`remote`]: remote template sources read by byte ranges (HTTP(S), S3, NFS, NBD)
//!   behind one fetch engine (coalescing, readahead, retries, shared in-flight fetches).
//! - [`client`]: an NBD client, for templates behind another NBD server and for the
//!   copy-on-read proxy's upstream.
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
mod error;
pub mod export;
mod fileio;
mod handshake;
pub mod image;
pub mod open;
pub mod proto;
pub mod raw;
pub mod remote;
pub mod request;
pub mod server;
pub mod source;
mod transmission;
mod uring;

pub use error::{Error, Result, io_errno};
pub use fileio::LocalFileReader;
