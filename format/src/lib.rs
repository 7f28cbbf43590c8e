//! Disk image formats for Thinline: raw, qcow2, VHD and VMDK, read; qcow2, written.
//!
//! The crate has no async runtime and does no guest-data I/O of its own. Each format
//! parses its metadata through the [`Storage`] trait and answers [`Layer::map`] with a
//! plan: which host bytes (or compressed units) hold a guest range, which ranges are
//! zero, and which belong to the backing layer. [`Image`] strings layers into a chain
//! and resolves plans through it; the NBD server executes them with its own I/O, and
//! [`Image::read`] executes them synchronously for tools and tests.
//!
//! ```text
//!   Image ── layers[0] (qcow2) ──backing──► layers[1] (vhd) ──parent──► layers[2] (raw)
//!     │map(offset, len)
//!     ▼
//!   [Data{layer 0, host X}, Zero{layer 0}, Data{layer 2, host Y}, Compressed{…}, Unallocated]
//! ```
//!
//! Metadata tables are cached in one bounded [`MetadataCache`] per chain.

pub mod cache;
pub mod chain;
pub mod compress;
pub mod data_path;
pub mod error;
pub mod layer;
pub mod lru;
pub mod qcow2;
pub mod raw;
pub mod storage;
#[cfg(test)]
mod test_util;
pub mod vhd;
pub mod vmdk;

pub use cache::{CacheStats, MetadataCache};
pub use chain::{
    Allocation, BackingOpener, CompressedInput, Extent, Image, MAX_CHAIN_DEPTH, OpenOptions, Place,
    UndeclaredBacking, detect,
};
pub use data_path::{DataPath, RangeReader};
pub use error::{Error, Result};
pub use layer::{
    Backing, CheckReport, Compression, Fetch, Format, Layer, LayerInfo, OpenContext,
    ParentIdentity, Segment, SegmentKind,
};
pub use storage::{FileStorage, MemoryStorage, Storage};
