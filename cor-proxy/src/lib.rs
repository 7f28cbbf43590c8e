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
//! - [`export`]: the copy-on-read export: shared in-flight fetches, speculation,
//!   durability batches, pass-through when the cache is full, block status; its state is
//!   owned in one place (`export/state.rs`), each concern in a module around it.
//! - [`upstream`]: where misses are read from.
//! - [`prefetch`]: background hydration with a rate limit, yielding to demand reads
//!   (part of [`export`], whose in-flight map it shares).
//! - [`status`]: the status socket, serving the export's [`Status`] snapshots.
//!
//! Why the cache holds the template and never the clone: see docs/design.md ("Why the cache
//! holds the template, never the clone"). In short, dm-thin has no "write only if still unprovisioned",
//! so writing fetched template data into a clone can overwrite a guest write.

#![warn(missing_docs)]

pub mod cache;
pub mod cache_dir;
mod error;
pub mod export;
pub use export::prefetch;
pub mod status;
pub mod upstream;

pub use cache::{
    CacheFile, CacheOptions, DEFAULT_CHUNK_SIZE, ExistingOptions, OnMismatch, ScrubReport,
    cache_data_end, cache_len,
};
pub use error::{Error, Result};
pub use export::{CorExport, CorOptions};
pub use prefetch::PrefetchOptions;
pub use status::Status;
pub use upstream::{ExportUpstream, NbdUpstream, Upstream};
