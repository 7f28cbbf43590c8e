//! Live status of a copy-on-read export, as JSON over a unix socket: a client connects,
//! reads one JSON document and the server closes. `thinline proxy status` is that client.

use std::path::{Path, PathBuf};

use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::export::{CorExport, Inner};
use crate::prefetch::state_name;

/// A snapshot of a copy-on-read export.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Status {
    /// The upstream (no credentials).
    pub upstream: String,
    /// The cache file or device.
    pub cache: PathBuf,
    /// Template size in bytes.
    pub size: u64,
    /// Presence granularity.
    pub chunk_size: u64,
    /// Chunks in the template.
    pub chunks: u64,
    /// Chunks present (durable).
    pub chunks_present: u64,
    /// `chunks_present / chunks`, in percent.
    pub percent_present: f64,
    /// Completion recorded: the cache holds the whole template.
    pub complete: bool,
    /// Client reads served wholly from the cache.
    pub hits: u64,
    /// Client reads that needed the upstream (or waited for a fetch).
    pub misses: u64,
    /// Bytes read by clients.
    pub bytes_served: u64,
    /// Reads sent to the upstream.
    pub upstream_reads: u64,
    /// Data bytes received from the upstream.
    pub bytes_from_upstream: u64,
    /// Upstream reads that failed.
    pub upstream_errors: u64,
    /// Cached chunks whose data did not match their checksum (fetched again).
    #[serde(default)]
    pub checksum_errors: u64,
    /// Fetches started ahead of client reads (sequential readahead and the
    /// neighbours of a miss, `--fetch-around`).
    #[serde(default)]
    pub speculative_fetches: u64,
    /// Units a miss fetches on each side now: `--fetch-around`, or fewer when the
    /// upstream moves fewer units than that in one round trip.
    #[serde(default)]
    pub fetch_around: u64,
    /// Fetches started whose data has not arrived yet (waiting for a fetch slot included).
    pub in_flight: usize,
    /// The cache cannot be written (full or failing): reads pass through.
    pub passthrough: bool,
    /// `off`, `running`, `done` or `failed`.
    pub prefetch: String,
    /// Bytes prefetch has fetched or asked for.
    pub prefetch_bytes: u64,
    /// Bytes prefetch marked as zero without fetching.
    pub prefetch_zero_bytes: u64,
}

impl Status {
    pub(crate) fn of(inner: &Inner) -> Status {
        let s = &inner.stats;
        let c = &inner.cache;
        let present = c.present_chunks();
        Status {
            upstream: inner.upstream.name().to_owned(),
            cache: c.path().to_owned(),
            size: c.size(),
            chunk_size: c.chunk_size(),
            chunks: c.chunks(),
            chunks_present: present,
            percent_present: if c.chunks() == 0 {
                100.0
            } else {
                (1000.0 * present as f64 / c.chunks() as f64).floor() / 10.0
            },
            complete: c.is_complete(),
            hits: s.hits.load(Ordering::Relaxed),
            misses: s.misses.load(Ordering::Relaxed),
            bytes_served: s.bytes_served.load(Ordering::Relaxed),
            upstream_reads: s.upstream_reads.load(Ordering::Relaxed),
            bytes_from_upstream: s.upstream_bytes.load(Ordering::Relaxed),
            upstream_errors: s.upstream_errors.load(Ordering::Relaxed),
            checksum_errors: s.checksum_errors.load(Ordering::Relaxed),
            speculative_fetches: s.speculative_fetches.load(Ordering::Relaxed),
            fetch_around: inner.fetch_around_now(),
            in_flight: s.in_flight.load(Ordering::Relaxed),
            passthrough: inner.passthrough.load(Ordering::Relaxed),
            prefetch: state_name(inner.prefetch.state.load(Ordering::Relaxed)).to_owned(),
            prefetch_bytes: inner.prefetch.bytes.load(Ordering::Relaxed),
            prefetch_zero_bytes: inner.prefetch.zero_bytes.load(Ordering::Relaxed),
        }
    }
}

/// Binds the status socket at `path` with mode 0660 (owner and group may read the
/// status), replacing a stale socket and refusing a live one or any other file.
pub fn bind(
    path: &Path,
) -> std::result::Result<tokio::net::UnixListener, Box<thinline_nbd::Error>> {
    let listener = thinline_nbd::server::bind_unix_socket(path, 0o660)?;
    let listen_err = |source| thinline_nbd::Error::Listen {
        address: path.display().to_string(),
        source,
    };
    listener.set_nonblocking(true).map_err(listen_err)?;
    Ok(tokio::net::UnixListener::from_std(listener).map_err(listen_err)?)
}

/// Answers status requests on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::UnixListener,
    exports: Vec<(String, CorExport)>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let exports = Arc::new(exports);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => {
                let Ok((mut stream, _)) = accepted else { continue };
                let exports = Arc::clone(&exports);
                tokio::spawn(async move {
                    let doc: serde_json::Map<String, serde_json::Value> = exports
                        .iter()
                        .map(|(name, e)| (name.clone(), serde_json::to_value(e.status()).unwrap_or_default()))
                        .collect();
                    let mut text = serde_json::to_string(&serde_json::json!({ "exports": doc }))
                        .unwrap_or_default();
                    text.push('\n');
                    let _ = stream.write_all(text.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        }
    }
}

/// Asks the status socket at `path`: `{"exports": {NAME: Status, …}}`.
pub async fn query(path: &Path) -> std::io::Result<serde_json::Value> {
    let mut stream = tokio::net::UnixStream::connect(path).await?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await?;
    serde_json::from_str(&text).map_err(std::io::Error::other)
}
