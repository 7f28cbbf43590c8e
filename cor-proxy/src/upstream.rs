//! Where a cache's misses go: the template's raw disk, read by ranges.
//!
//! Two upstreams exist: another NBD server (`thinline proxy --upstream nbd+unix://…`),
//! read with thinline-nbd's NBD client and retry policy, exactly the ranges the cache
//! asks for, with block status from the same connections; and an export in the same
//! process (`thinline serve --cache-dir`), such as an image over HTTP or S3, without an
//! extra hop.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use thinline_nbd::export::{Export, Extent, ReadChunk, StatusQuery};
use thinline_nbd::proto::{errno, state};
use thinline_nbd::{DataError, Error, Result};
use thinline_source::nbd::NbdBackend;
use thinline_source::retry;
use thinline_source::{FetchError, RangeBackend, RemoteConfig};

/// The template behind a cache.
#[async_trait]
pub trait Upstream: Send + Sync + fmt::Debug + 'static {
    /// The name used in messages (no credentials).
    fn name(&self) -> &str;

    /// Size in bytes.
    fn size(&self) -> u64;

    /// What pins the template's bytes (source, size, ETag / version / mtime); the cache
    /// is keyed by it.
    fn identity(&self) -> &str;

    /// Reads `[offset, offset + length)` (at most 32 MiB); holes may come back as
    /// [`ReadChunk::Zero`].
    async fn read(&self, offset: u64, length: u64) -> Result<Vec<ReadChunk>>;

    /// `base:allocation` of a prefix of `[offset, offset + length)` (flags
    /// `state::HOLE | state::ZERO`); at least one extent.
    async fn allocation(&self, offset: u64, length: u64) -> Result<Vec<Extent>>;

    /// True if [`read`](Self::read) returns holes as [`ReadChunk::Zero`] by itself;
    /// otherwise the cache asks [`allocation`](Self::allocation) first and never reads
    /// ranges that read as zeroes.
    fn reads_report_holes(&self) -> bool {
        true
    }
}

/// An export in this process as the upstream.
#[derive(Debug)]
pub struct ExportUpstream {
    export: Arc<dyn Export>,
    name: String,
    identity: String,
}

impl ExportUpstream {
    /// Wraps `export` (whose metadata context 0 must be `base:allocation`).
    pub fn new(export: Arc<dyn Export>, name: String, identity: String) -> Self {
        ExportUpstream {
            export,
            name,
            identity,
        }
    }
}

#[async_trait]
impl Upstream for ExportUpstream {
    fn name(&self) -> &str {
        &self.name
    }

    fn size(&self) -> u64 {
        self.export.size()
    }

    fn identity(&self) -> &str {
        &self.identity
    }

    async fn read(&self, offset: u64, length: u64) -> Result<Vec<ReadChunk>> {
        let length = u32::try_from(length).map_err(|_| {
            Error::from(DataError::upstream(
                &self.name,
                "read",
                offset,
                length,
                errno::EINVAL,
                "a read larger than 4 GiB".to_owned(),
            ))
        })?;
        self.export.read(offset, length).await
    }

    async fn allocation(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        self.export
            .block_status(StatusQuery {
                context: 0,
                offset,
                length,
                max_extents: 1 << 16,
            })
            .await
    }
}

/// Another NBD server as the upstream. Reads go to the server exactly as the cache
/// asks for them (never rounded out, so a present chunk is never fetched again), with
/// retries of transient failures (resets, timeouts, `EIO`) and exponential backoff.
#[derive(Debug)]
pub struct NbdUpstream {
    backend: Arc<NbdBackend>,
    config: RemoteConfig,
    name: String,
    identity: String,
}

impl NbdUpstream {
    /// Connects to `uri` (`nbd://…` or `nbd+unix://…`). NBD has no version tag, so the
    /// identity is the URI, the export's size and `template_id` (an ETag or version the
    /// caller knows; without one a changed template of the same size is not detected).
    pub async fn open(uri: &str, template_id: Option<&str>, config: &RemoteConfig) -> Result<Self> {
        let backend = Arc::new(
            NbdBackend::open_with_block_status(uri, config)
                .await
                .map_err(|e| thinline_nbd::Error::from(DataError::source(e)))?,
        );
        let name = backend.shown().to_owned();
        let identity = format!(
            "nbd upstream {name}, {} bytes, template id {}",
            backend.size(),
            template_id.unwrap_or("(none given)")
        );
        Ok(NbdUpstream {
            backend,
            config: config.clone(),
            name,
            identity,
        })
    }

    async fn read_with_retries(
        &self,
        offset: u64,
        length: u64,
    ) -> std::result::Result<bytes::Bytes, FetchError> {
        let backend = &self.backend;
        retry::run(
            self.config.attempts,
            &retry::Backoff::from_config(&self.config),
            move |_| backend.read(offset, length),
            |e, attempt| {
                tracing::debug!(upstream = %self.name, offset, length, attempt, error = %e, "retrying upstream read");
            },
        )
        .await
    }
}

fn upstream_error(name: &str, op: &'static str, offset: u64, length: u64, e: &FetchError) -> Error {
    DataError::upstream(name, op, offset, length, errno::EIO, e.to_string()).into()
}

#[async_trait]
impl Upstream for NbdUpstream {
    fn name(&self) -> &str {
        &self.name
    }

    fn size(&self) -> u64 {
        self.backend.size()
    }

    fn identity(&self) -> &str {
        &self.identity
    }

    async fn read(&self, offset: u64, length: u64) -> Result<Vec<ReadChunk>> {
        let data = self
            .read_with_retries(offset, length)
            .await
            .map_err(|e| upstream_error(&self.name, "read", offset, length, &e))?;
        Ok(vec![ReadChunk::Data(data)])
    }

    fn reads_report_holes(&self) -> bool {
        false
    }

    async fn allocation(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        let extents = self
            .backend
            .block_status(offset, length)
            .await
            .map_err(|e| upstream_error(&self.name, "block status", offset, length, &e))?;
        let out: Vec<Extent> = extents
            .into_iter()
            .map(|(length, flags)| Extent {
                length,
                flags: u64::from(flags & (state::HOLE | state::ZERO)),
            })
            .collect();
        if out.is_empty() {
            return Ok(vec![Extent { length, flags: 0 }]);
        }
        Ok(out)
    }
}
