//! How an export reads a storage's *data* bytes, chosen once when the storage is
//! opened (as crosvm's `to_async_disk` converts a disk explicitly, never by a downcast).
//!
//! The format code reads headers and tables through [`Storage::read_at`](crate::Storage)
//! only. An async server reading guest data wants more: positional reads of the file
//! itself (page cache first, io_uring), or the remote object's own async reader. Each
//! storage says which with [`Storage::data_path`](crate::Storage::data_path); the
//! format crate itself stays free of any async runtime (a boxed future is only a type).

use std::fmt;
use std::fs::File;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;

/// Why a [`RangeReader`] failed: its own error, shown as it is.
pub type RangeError = Box<dyn std::error::Error + Send + Sync>;

/// A read of a range, as a future the caller awaits on its own runtime.
pub type RangeRead<'a> = Pin<Box<dyn Future<Output = Result<Bytes, RangeError>> + Send + 'a>>;

/// A store read asynchronously by byte ranges (a remote object behind its fetch engine).
pub trait RangeReader: Send + Sync + fmt::Debug {
    /// Reads exactly `length` bytes at `offset` (inside the store).
    fn read_range(&self, offset: u64, length: u64) -> RangeRead<'_>;
}

/// How a storage's data bytes are read.
#[derive(Debug, Clone)]
pub enum DataPath {
    /// A local file or block device: positional reads on the file itself.
    File(Arc<File>),
    /// An asynchronous range reader.
    Ranges(Arc<dyn RangeReader>),
    /// Only [`Storage::read_at`](crate::Storage::read_at), run where blocking is allowed.
    Blocking,
}

impl DataPath {
    /// The local file, if the data path is one.
    pub fn file(&self) -> Option<&File> {
        match self {
            DataPath::File(file) => Some(file),
            _ => None,
        }
    }
}
