//! `thinline-cor`: the copy-on-read cache of a template, shared by every clone of it.
//!
//! ```text
//!   NBD clients (nbd-client → dm-thin external origin, qemu, …)
//!        │ read-only export
//!        ▼
//!   CorExport ── present? ──► cache file/device (template bytes at their offsets
//!        │ no                   + superblocks + presence map)
//!        ▼
//!   Upstream: another NBD server (NbdUpstream) or an export in this process
//! ```
//!
//! - [`cache`]: the on-disk cache: layout, identity, lock, presence map, checksums,
//!   crash rules, scrub.
//! - [`cache_dir`]: templates cached in a directory, one file per template version.
//! - [`export`]: the copy-on-read export: shared in-flight fetches, durability batches,
//!   pass-through when the cache is full, block status.
//! - [`upstream`]: where misses are read from.
//! - [`prefetch`]: background hydration with a rate limit, yielding to demand reads.
//! - [`status`]: counters and progress, and the status socket.
//!
//! Why the cache holds the template and never the clone: see docs/design.md ("Why the cache
//! holds the template, never the clone"). In short, dm-thin has no "write only if still unprovisioned",
//! so writing fetched template data into a clone can overwrite a guest write.

#![warn(missing_docs)]

pub mod cache;
pub mod cache_dir;
mod error;
pub mod export;
pub mod prefetch;
pub mod status;
pub mod upstream;

pub use cache::{CacheFile, CacheOptions, ExistingOptions, OnMismatch, ScrubReport};
pub use error::{Error, Result};
pub use export::{CorExport, CorOptions};
pub use prefetch::PrefetchOptions;
pub use status::Status;
pub use upstream::{ExportUpstream, NbdUpstream, Upstream};
