//! What every remote source implements ([`RangeBackend`]: one attempt at one range of
//! an object pinned at open), how failures are classified ([`FetchError`]), the
//! settings shared by all sources ([`RemoteConfig`]), and the bounded body reader
//! every HTTP-like source uses.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

/// One remote object, read by ranges.
///
/// Implementations make exactly one attempt per call and classify failures; retrying,
/// coalescing and limits live in the fetch engine.
#[async_trait]
pub trait RangeBackend: Send + Sync + fmt::Debug + 'static {
    /// The object's URI without credentials or query, for messages.
    fn uri(&self) -> &str;

    /// Size in bytes, pinned at open.
    fn size(&self) -> u64;

    /// What was pinned at open besides the size (`etag:"…"`, `version:…`,
    /// `mtime:…`), for reports and persistent caches.
    fn identity(&self) -> &str;

    /// Reads exactly `length` bytes at `offset` (`offset + length <= size`). A body of
    /// any other length is a [`FetchErrorKind::Transient`] error (short body).
    async fn read(&self, offset: u64, length: u64) -> Result<Bytes, FetchError>;

    /// Opens an object named inside this one (a backing file, an extent), resolved
    /// relative to this object's location the way a relative path would be.
    async fn open_related(&self, name: &str) -> Result<Arc<dyn RangeBackend>, FetchError>;
}

/// How a failed attempt should be handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchErrorKind {
    /// Worth retrying: 5xx, 429, SlowDown, timeouts, resets, short bodies.
    Transient,
    /// The object is no longer the one pinned at open (ETag, version or size changed).
    Changed,
    /// Retrying cannot help: 4xx, refused credentials, unsupported server.
    Permanent,
}

/// A failed attempt at opening or reading a remote object.
///
/// The message never contains credentials or query signatures: `uri` is redacted by
/// whoever builds the error.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{op} {uri}{}: {message}", range_text(*.range))]
pub struct FetchError {
    /// What to do about it.
    pub kind: FetchErrorKind,
    /// `open`, `read`, …
    pub op: &'static str,
    /// The object, redacted.
    pub uri: String,
    /// `(offset, length)` of the failed read.
    pub range: Option<(u64, u64)>,
    /// The cause, in words (status line, system error, timeout, …).
    pub message: String,
}

fn range_text(range: Option<(u64, u64)>) -> String {
    match range {
        Some((offset, length)) if length > 0 => {
            format!(" bytes {offset}-{}", offset + length - 1)
        }
        Some((offset, _)) => format!(" at {offset}"),
        None => String::new(),
    }
}

impl FetchError {
    /// An error of `kind` for `op` on `uri`.
    pub fn new(
        kind: FetchErrorKind,
        op: &'static str,
        uri: &str,
        range: Option<(u64, u64)>,
        message: impl Into<String>,
    ) -> Self {
        FetchError {
            kind,
            op,
            uri: uri.to_owned(),
            range,
            message: message.into(),
        }
    }

    /// Whether another attempt may succeed.
    pub fn is_transient(&self) -> bool {
        self.kind == FetchErrorKind::Transient
    }
}

/// Settings shared by every remote source of a process.
#[derive(Debug, Clone)]
pub struct RemoteConfig {
    /// Reads are rounded out to multiples of this (a power of two).
    pub fetch_unit: u64,
    /// Most requests in flight to one object, shared by all connections.
    pub max_in_flight: usize,
    /// Largest sequential readahead window.
    pub max_readahead: u64,
    /// Memory for fetched units kept for later reads, per object.
    pub memory_budget: u64,
    /// Attempts per range before the read fails (1 = no retries).
    pub attempts: u32,
    /// First retry delay; doubles each time, with jitter, up to `backoff_max`.
    pub backoff_base: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
    /// Timeout for establishing a connection.
    pub connect_timeout: Duration,
    /// Timeout from sending a request to the first byte of the response.
    pub first_byte_timeout: Duration,
    /// Longest pause while a body is streaming.
    pub idle_timeout: Duration,
    /// Slowest accepted transfer, in bytes per second: a request must be complete
    /// within `first_byte_timeout` plus its length at this rate, or it fails as a
    /// transient error (retried, then EIO). A body that trickles cannot hold a read
    /// (or a fetch slot) for longer than that.
    pub min_rate: u64,
    /// HTTP: hosts (`host` or `host:port`) redirects may lead to besides the object's
    /// own origin (scheme, host and port). Credentials are never sent to them.
    pub redirect_hosts: Vec<String>,
    /// HTTP: credentials by host (a netrc file), used when the URI carries none.
    pub http_credentials: Option<Arc<crate::credentials::Netrc>>,
    /// S3: endpoint URL of an S3-compatible store (path-style addressing).
    pub s3_endpoint: Option<String>,
    /// S3: region (else the standard configuration chain decides).
    pub s3_region: Option<String>,
    /// Directory of scheme handler executables.
    pub handler_dir: std::path::PathBuf,
}

impl Default for RemoteConfig {
    fn default() -> Self {
        RemoteConfig {
            fetch_unit: 1 << 20,
            max_in_flight: 16,
            max_readahead: 32 << 20,
            memory_budget: 256 << 20,
            attempts: 6,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(10),
            first_byte_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(30),
            min_rate: 64 * 1024,
            redirect_hosts: Vec::new(),
            http_credentials: None,
            s3_endpoint: None,
            s3_region: None,
            handler_dir: "/usr/libexec/thinline/storage".into(),
        }
    }
}

impl RemoteConfig {
    /// How long a request for `length` bytes may take from sending it to the last byte
    /// of its body: the first-byte timeout plus the length at `min_rate`.
    pub fn request_deadline(&self, length: u64) -> Duration {
        let transfer = Duration::from_secs_f64(length as f64 / self.min_rate.max(1) as f64);
        self.first_byte_timeout.saturating_add(transfer)
    }
}

/// Largest object served: NBD sizes are 64-bit, but files (`off_t`), qemu and the
/// kernel's block layer stop at `i64::MAX`.
pub const MAX_OBJECT_SIZE: u64 = i64::MAX as u64;

/// Refuses, at open, an object larger than [`MAX_OBJECT_SIZE`]: a server that claims
/// one is wrong or hostile, and offsets past it overflow everywhere downstream.
pub(crate) fn check_size(uri: &str, size: u64) -> Result<(), FetchError> {
    if size > MAX_OBJECT_SIZE {
        return Err(FetchError::new(
            FetchErrorKind::Permanent,
            "open",
            uri,
            None,
            format!(
                "the server says the object is {size} bytes, more than the largest size files and NBD clients can address ({MAX_OBJECT_SIZE})"
            ),
        ));
    }
    Ok(())
}

/// A response body that arrives in chunks (an HTTP response, an S3 byte stream).
#[async_trait]
pub(crate) trait BodyChunks: Send {
    /// The next chunk, `None` at the end, or why the body broke off.
    async fn next_chunk(&mut self) -> Result<Option<Bytes>, String>;
}

/// Reads a body that must be exactly `length` bytes, each chunk within `idle` and the
/// whole of it by `deadline`: a stall, a trickle, a break, a longer or a shorter body
/// is a transient failure described in words. Never holds more than `length` bytes.
pub(crate) async fn read_body(
    body: &mut dyn BodyChunks,
    length: u64,
    idle: Duration,
    deadline: tokio::time::Instant,
) -> Result<Bytes, (FetchErrorKind, String)> {
    let transient = |m: String| (FetchErrorKind::Transient, m);
    let too_slow = |got: usize| {
        format!(
            "the body arrived too slowly: {got} of {length} bytes by the request deadline (--min-rate)"
        )
    };
    let capacity =
        usize::try_from(length).map_err(|_| transient("a body too large for memory".into()))?;
    let mut data = bytes::BytesMut::with_capacity(capacity);
    loop {
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Err(transient(too_slow(data.len())));
        }
        let wait = idle.min(deadline - now);
        match tokio::time::timeout(wait, body.next_chunk()).await {
            Ok(Ok(Some(chunk))) => {
                if data.len() + chunk.len() > capacity {
                    return Err(transient(format!(
                        "the body is longer than the {length} bytes asked for"
                    )));
                }
                data.extend_from_slice(&chunk);
            }
            Ok(Ok(None)) => break,
            Ok(Err(e)) => {
                return Err(transient(format!(
                    "the body broke off after {} of {length} bytes: {e}",
                    data.len()
                )));
            }
            Err(_) if wait < idle => return Err(transient(too_slow(data.len()))),
            Err(_) => {
                return Err(transient(format!(
                    "the body stalled for {idle:?} after {} of {length} bytes (idle timeout)",
                    data.len()
                )));
            }
        }
    }
    if data.len() as u64 != length {
        return Err(transient(format!(
            "short body: {} of {length} bytes",
            data.len()
        )));
    }
    Ok(data.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body that yields `chunks`, each after `gap`, then ends.
    struct Slow {
        chunks: std::collections::VecDeque<Bytes>,
        gap: Duration,
    }

    #[async_trait]
    impl BodyChunks for Slow {
        async fn next_chunk(&mut self) -> Result<Option<Bytes>, String> {
            tokio::time::sleep(self.gap).await;
            Ok(self.chunks.pop_front())
        }
    }

    fn slow(count: usize, size: usize, gap_ms: u64) -> Slow {
        Slow {
            chunks: (0..count).map(|_| Bytes::from(vec![1u8; size])).collect(),
            gap: Duration::from_millis(gap_ms),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_trickles_fails_at_its_deadline_though_it_never_stalls() {
        let idle = Duration::from_secs(1);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        // 1000 bytes, one every 500 ms: never idle for 1 s, done after 500 s.
        let (kind, why) = read_body(&mut slow(1000, 1, 500), 1000, idle, deadline)
            .await
            .unwrap_err();
        assert_eq!(kind, FetchErrorKind::Transient);
        assert!(why.contains("too slowly"), "{why}");
        assert_eq!(tokio::time::Instant::now(), deadline);
    }

    #[tokio::test(start_paused = true)]
    async fn bodies_are_bounded_in_length_and_idle_time() {
        let far = tokio::time::Instant::now() + Duration::from_secs(3600);
        let idle = Duration::from_secs(1);
        let ok = read_body(&mut slow(4, 256, 100), 1024, idle, far)
            .await
            .unwrap();
        assert_eq!(ok.len(), 1024);
        let (_, why) = read_body(&mut slow(5, 256, 100), 1024, idle, far)
            .await
            .unwrap_err();
        assert!(why.contains("longer than"), "{why}");
        let (_, why) = read_body(&mut slow(3, 256, 100), 1024, idle, far)
            .await
            .unwrap_err();
        assert!(why.contains("short body"), "{why}");
        let (_, why) = read_body(&mut slow(4, 256, 2000), 1024, idle, far)
            .await
            .unwrap_err();
        assert!(why.contains("stalled"), "{why}");
    }

    #[test]
    fn deadlines_grow_with_the_length_at_the_minimum_rate() {
        let config = RemoteConfig {
            first_byte_timeout: Duration::from_secs(30),
            min_rate: 64 * 1024,
            ..RemoteConfig::default()
        };
        assert_eq!(config.request_deadline(0), Duration::from_secs(30));
        assert_eq!(config.request_deadline(1 << 20), Duration::from_secs(46));
        assert!(check_size("x", MAX_OBJECT_SIZE).is_ok());
        assert!(check_size("x", MAX_OBJECT_SIZE + 1).is_err());
    }
}
