//! The export abstraction every NBD-served thing implements.
//!
//! The server validates each request against the export's size, block sizes and
//! capabilities before calling it, so an `Export` only ever sees in-range, well-formed
//! operations. Raw files and block devices implement it here; image formats, remote
//! templates and the copy-on-read proxy implement it in later layers.
//!
//! ```text
//!   client ─► handshake ─► transmission ─► validate ─► Export::{read, write, …}
//!                                                          │
//!                                       RawExport / image exports / CoR proxy
//! ```

use std::fmt;

use async_trait::async_trait;
use bytes::Bytes;

use crate::proto::BASE_ALLOCATION;
use crate::{DataError, Error, Result};

/// What an export can do. The server derives the transmission flags from this and
/// refuses commands the export cannot serve, so the flags are always truthful.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Writes, trims and zeroes are refused with `EPERM`.
    pub read_only: bool,
    /// `flush` makes acknowledged writes durable.
    pub flush: bool,
    /// Writes can be made durable before they are acknowledged.
    pub fua: bool,
    /// `trim` is meaningful.
    pub trim: bool,
    /// `write_zeroes` is implemented (always true for writable exports here).
    pub write_zeroes: bool,
    /// `write_zeroes` with `fast` can report `ENOTSUP` instead of writing slowly.
    pub fast_zero: bool,
    /// `cache` does something useful.
    pub cache: bool,
    /// All connections share one view: a flush on one covers writes acknowledged on any.
    pub multi_conn: bool,
    /// The backing store is a spinning disk.
    pub rotational: bool,
}

/// A block status question: how `[offset, offset + length)` reads in one metadata
/// context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusQuery {
    /// Index into the export's [`Export::meta_contexts`].
    pub context: usize,
    /// Where the range starts.
    pub offset: u64,
    /// Its length in bytes (not 0).
    pub length: u64,
    /// Most extents wanted in the answer (not 0).
    pub max_extents: usize,
}

/// Block-size constraints advertised with `NBD_INFO_BLOCK_SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    /// Requests must be aligned to this (a power of two, at most 64 KiB).
    pub minimum: u32,
    /// The size the export prefers (a power of two, at least `minimum` and 512).
    pub preferred: u32,
    /// Largest READ/WRITE payload accepted.
    pub maximum_payload: u32,
}

impl BlockSizes {
    /// Default maximum payload: 32 MiB, the size the spec says clients may assume.
    pub const DEFAULT_MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
}

impl Default for BlockSizes {
    /// Any alignment, 4 KiB preferred, the default maximum payload.
    fn default() -> Self {
        BlockSizes {
            minimum: 1,
            preferred: 4096,
            maximum_payload: BlockSizes::DEFAULT_MAX_PAYLOAD,
        }
    }
}

impl Capabilities {
    /// A read-only export with one view for every connection (a flush has nothing to
    /// make durable); change what differs with struct update syntax.
    pub const READ_ONLY: Capabilities = Capabilities {
        read_only: true,
        flush: true,
        fua: false,
        trim: false,
        write_zeroes: false,
        fast_zero: false,
        cache: false,
        multi_conn: true,
        rotational: false,
    };
}

/// One piece of a read, in order; together the pieces cover the requested range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadChunk {
    /// Bytes read from the export.
    Data(Bytes),
    /// This many bytes that read as zeroes (sent as `OFFSET_HOLE` when possible).
    Zero(u64),
}

impl ReadChunk {
    /// Number of bytes this chunk covers.
    pub fn len(&self) -> u64 {
        match self {
            ReadChunk::Data(b) => b.len() as u64,
            ReadChunk::Zero(n) => *n,
        }
    }

    /// True if the chunk covers no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `chunks` in order, with adjacent [`ReadChunk::Zero`] runs merged into one, so an
/// answer assembled from pieces sends one hole per run of zeroes.
pub fn merge_zero_runs(chunks: impl IntoIterator<Item = ReadChunk>) -> Vec<ReadChunk> {
    let mut out: Vec<ReadChunk> = Vec::new();
    for chunk in chunks {
        match (out.last_mut(), chunk) {
            (Some(ReadChunk::Zero(n)), ReadChunk::Zero(m)) => *n += m,
            (_, chunk) => out.push(chunk),
        }
    }
    out
}

/// Options of a `write_zeroes` call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// The range must stay allocated (`NBD_CMD_FLAG_NO_HOLE`).
    pub no_hole: bool,
    /// Fail with `ENOTSUP` rather than be slower than a write (`NBD_CMD_FLAG_FAST_ZERO`).
    pub fast: bool,
    /// Reply only once durable (`NBD_CMD_FLAG_FUA`).
    pub fua: bool,
}

/// One extent of a block-status answer: `length` bytes with `flags` in the context's
/// encoding (`base:allocation`: `state::HOLE`, `state::ZERO`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Bytes covered.
    pub length: u64,
    /// Context-specific status bits.
    pub flags: u64,
}

/// A disk that can be served over NBD.
///
/// Every method is called only with ranges inside `[0, size())` that respect
/// `block_sizes().minimum`; reads never exceed `block_sizes().maximum_payload`.
#[async_trait]
pub trait Export: Send + Sync + fmt::Debug + 'static {
    /// Size in bytes.
    fn size(&self) -> u64;

    /// What the export supports.
    fn capabilities(&self) -> Capabilities;

    /// Block-size constraints.
    fn block_sizes(&self) -> BlockSizes {
        BlockSizes::default()
    }

    /// A human-readable description for `NBD_INFO_DESCRIPTION`.
    fn description(&self) -> Option<String> {
        None
    }

    /// Metadata contexts this export can answer `block_status` for; `block_status`
    /// receives an index into this list.
    fn meta_contexts(&self) -> &[&'static str] {
        &[BASE_ALLOCATION]
    }

    /// Reads `length` bytes at `offset`.
    async fn read(&self, offset: u64, length: u32) -> Result<Vec<ReadChunk>>;

    /// The error a read-only export answers every write, trim and zeroing with (EPERM):
    /// the defaults below use it, so a read-only export implements only this, naming what
    /// it serves.
    fn refuse_write(&self) -> Error {
        DataError::read_only(self.description().unwrap_or_default()).into()
    }

    /// Writes `data` at `offset`; durable before returning if `fua`. Read-only exports
    /// keep the default: [`Export::refuse_write`].
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        let _ = (offset, data, fua);
        Err(self.refuse_write())
    }

    /// Makes every acknowledged write durable (nothing to do for read-only exports).
    async fn flush(&self) -> Result<()> {
        Ok(())
    }

    /// Discards a range (a hint: contents afterwards are unspecified). Read-only exports
    /// keep the default: [`Export::refuse_write`].
    async fn trim(&self, offset: u64, length: u64, fua: bool) -> Result<()> {
        let _ = (offset, length, fua);
        Err(self.refuse_write())
    }

    /// Makes a range read as zeroes. Read-only exports keep the default:
    /// [`Export::refuse_write`].
    async fn write_zeroes(&self, offset: u64, length: u64, flags: ZeroFlags) -> Result<()> {
        let _ = (offset, length, flags);
        Err(self.refuse_write())
    }

    /// Prefetches a range (a hint; by default nothing happens).
    async fn cache(&self, offset: u64, length: u64) -> Result<()> {
        let _ = (offset, length);
        Ok(())
    }

    /// Answers `query`. Returns at least one extent; the extents start at the query's
    /// offset, are contiguous, and may cover less than its length (at most its
    /// `max_extents` of them).
    async fn block_status(&self, query: StatusQuery) -> Result<Vec<Extent>>;
}
