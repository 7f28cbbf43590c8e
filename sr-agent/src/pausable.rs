//! An export the SR daemon can pause: requests in flight finish, new ones wait, the
//! image underneath is flushed and closed, the agent changes its files (a snapshot or
//! clone turns the disk's file into a read-only layer; a resize grows it), and the
//! export resumes on the image as it is now. NBD clients stay connected throughout
//! and never see the change, only a pause.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use thinline_nbd::DataError;
use thinline_nbd::export::{
    BlockSizes, Capabilities, Export, Extent, ReadChunk, StatusQuery, ZeroFlags,
};
use tokio::sync::{RwLock, RwLockWriteGuard};

/// What the server asks between requests: the current export's answers.
#[derive(Debug, Clone)]
struct Shape {
    size: u64,
    capabilities: Capabilities,
    block_sizes: BlockSizes,
    description: Option<String>,
}

impl Shape {
    fn of(e: &dyn Export) -> Shape {
        Shape {
            size: e.size(),
            capabilities: e.capabilities(),
            block_sizes: e.block_sizes(),
            description: e.description(),
        }
    }
}

/// An export whose image can be closed and opened again while it is served.
#[derive(Debug)]
pub struct PausableExport {
    /// Each request holds it for reading; a pause holds it for writing.
    current: RwLock<Arc<dyn Export>>,
    shape: Mutex<Shape>,
    contexts: Vec<&'static str>,
}

/// A paused export: nothing is in flight and its image is closed. Resume it with the
/// image reopened; dropped without [`Paused::resume`], every request fails with EIO.
#[derive(Debug)]
pub struct Paused<'a> {
    current: RwLockWriteGuard<'a, Arc<dyn Export>>,
    shape: &'a Mutex<Shape>,
}

impl PausableExport {
    pub fn new(export: Arc<dyn Export>) -> PausableExport {
        PausableExport {
            shape: Mutex::new(Shape::of(export.as_ref())),
            contexts: export.meta_contexts().to_vec(),
            current: RwLock::new(export),
        }
    }

    /// Waits for the requests in flight, holds new ones, flushes every acknowledged
    /// write and closes the image. A failed flush leaves the export as it was.
    pub async fn pause(&self) -> thinline_nbd::Result<Paused<'_>> {
        let mut current = self.current.write().await;
        current.flush().await?;
        let closed: Arc<dyn Export> = Arc::new(Closed(self.contexts.clone()));
        drop(std::mem::replace(&mut *current, closed));
        Ok(Paused {
            current,
            shape: &self.shape,
        })
    }

    fn now(&self) -> Shape {
        self.shape.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Paused<'_> {
    /// Serves `export` from now on; the requests that waited run on it.
    pub fn resume(mut self, export: Arc<dyn Export>) {
        *self.shape.lock().unwrap_or_else(|e| e.into_inner()) = Shape::of(export.as_ref());
        *self.current = export;
    }
}

/// Stands in while the image is closed: only a pause that was never resumed lets a
/// request reach it.
#[derive(Debug)]
struct Closed(Vec<&'static str>);

impl Closed {
    fn error() -> thinline_nbd::Error {
        DataError::source(
            "the VDI's image could not be opened again after a snapshot, clone or resize",
        )
        .into()
    }
}

#[async_trait]
impl Export for Closed {
    fn size(&self) -> u64 {
        0
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::READ_ONLY
    }

    fn meta_contexts(&self) -> &[&'static str] {
        &self.0
    }

    async fn read(&self, _: u64, _: u32) -> thinline_nbd::Result<Vec<ReadChunk>> {
        Err(Closed::error())
    }

    fn refuse_write(&self) -> thinline_nbd::Error {
        Closed::error()
    }

    async fn flush(&self) -> thinline_nbd::Result<()> {
        Err(Closed::error())
    }

    async fn block_status(&self, _: StatusQuery) -> thinline_nbd::Result<Vec<Extent>> {
        Err(Closed::error())
    }
}

#[async_trait]
impl Export for PausableExport {
    fn size(&self) -> u64 {
        self.now().size
    }

    fn capabilities(&self) -> Capabilities {
        self.now().capabilities
    }

    fn block_sizes(&self) -> BlockSizes {
        self.now().block_sizes
    }

    fn description(&self) -> Option<String> {
        self.now().description
    }

    fn meta_contexts(&self) -> &[&'static str] {
        &self.contexts
    }

    async fn read(&self, offset: u64, length: u32) -> thinline_nbd::Result<Vec<ReadChunk>> {
        self.current.read().await.read(offset, length).await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> thinline_nbd::Result<()> {
        self.current.read().await.write(offset, data, fua).await
    }

    async fn flush(&self) -> thinline_nbd::Result<()> {
        self.current.read().await.flush().await
    }

    async fn trim(&self, offset: u64, length: u64, fua: bool) -> thinline_nbd::Result<()> {
        self.current.read().await.trim(offset, length, fua).await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        length: u64,
        flags: ZeroFlags,
    ) -> thinline_nbd::Result<()> {
        let current = self.current.read().await;
        current.write_zeroes(offset, length, flags).await
    }

    async fn cache(&self, offset: u64, length: u64) -> thinline_nbd::Result<()> {
        self.current.read().await.cache(offset, length).await
    }

    async fn block_status(&self, query: StatusQuery) -> thinline_nbd::Result<Vec<Extent>> {
        self.current.read().await.block_status(query).await
    }
}
