//! A remote object as a `thinline_format::Storage`, so the format code reads headers
//! and tables of remote images through the fetch engine unchanged.
//!
//! The format code is synchronous; each read is handed to the async runtime and the
//! calling (blocking-pool or main) thread waits for it. The NBD server's data path
//! skips this adapter: the storage's [`DataPath`] is the engine itself, awaited there.

use std::io;
use std::sync::Arc;

use thinline_format::data_path::RangeRead;
use thinline_format::storage::looks_like_uri;
use thinline_format::{DataPath, RangeReader, Storage};
use tokio::runtime::Handle;

use crate::RemoteConfig;
use crate::fetch::FetchEngine;

/// A remote object read through its fetch engine.
#[derive(Debug)]
pub struct RemoteStorage {
    engine: Arc<FetchEngine>,
    handle: Handle,
    config: Arc<RemoteConfig>,
    identity: String,
}

impl RemoteStorage {
    /// Wraps `engine`; reads run on the runtime of `handle`.
    pub fn new(engine: Arc<FetchEngine>, handle: Handle, config: Arc<RemoteConfig>) -> Self {
        let identity = format!("{}#{}", engine.backend().uri(), engine.backend().identity());
        RemoteStorage {
            engine,
            handle,
            config,
            identity,
        }
    }

    /// The engine, for async callers.
    pub fn engine(&self) -> &Arc<FetchEngine> {
        &self.engine
    }

    fn wait<T: Send + 'static>(
        &self,
        future: impl Future<Output = T> + Send + 'static,
    ) -> Option<T> {
        block_on(&self.handle, future)
    }
}

/// Runs `future` on the runtime of `handle` and waits for it on this thread, which
/// must not be one of the runtime's worker threads. `None` if the runtime shut down.
pub fn block_on<T: Send + 'static>(
    handle: &Handle,
    future: impl Future<Output = T> + Send + 'static,
) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    handle.spawn(async move {
        let _ = tx.send(future.await);
    });
    rx.recv().ok()
}

impl Storage for RemoteStorage {
    fn name(&self) -> &str {
        self.engine.backend().uri()
    }

    fn size(&self) -> u64 {
        self.engine.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let size = self.size();
        if offset >= size || buf.is_empty() {
            return Ok(0);
        }
        let length = (size - offset).min(buf.len() as u64);
        let engine = Arc::clone(&self.engine);
        let bytes = self
            .wait(async move { engine.read(offset, length).await })
            .ok_or_else(|| io::Error::other("the async runtime is shutting down"))?
            .map_err(io::Error::other)?;
        buf[..bytes.len()].copy_from_slice(&bytes);
        Ok(bytes.len())
    }

    fn open_related(&self, name: &str) -> thinline_format::Result<Arc<dyn Storage>> {
        let refuse = |reason: String| thinline_format::Error::chain(self.name(), reason);
        if looks_like_uri(name) {
            return Err(refuse(format!(
                "{name:?} is a URI or json: specification, not a file name; only names relative to the image are followed"
            )));
        }
        if name.is_empty() {
            return Err(refuse("an empty file name".to_owned()));
        }
        let backend = Arc::clone(self.engine.backend());
        let owned = name.to_owned();
        let related = self
            .wait(async move { backend.open_related(&owned).await })
            .ok_or_else(|| refuse("the async runtime is shutting down".to_owned()))?
            .map_err(|e| refuse(e.to_string()))?;
        let engine = FetchEngine::new(related, &self.config);
        Ok(Arc::new(RemoteStorage::new(
            engine,
            self.handle.clone(),
            Arc::clone(&self.config),
        )))
    }

    fn identity(&self) -> String {
        self.identity.clone()
    }

    fn data_path(&self) -> DataPath {
        DataPath::Ranges(Arc::new(EngineReader(Arc::clone(&self.engine))))
    }
}

/// The fetch engine as a storage's data path: exports await it directly.
#[derive(Debug)]
struct EngineReader(Arc<FetchEngine>);

impl RangeReader for EngineReader {
    fn read_range(&self, offset: u64, length: u64) -> RangeRead<'_> {
        Box::pin(async move { Ok(self.0.read(offset, length).await?) })
    }
}
