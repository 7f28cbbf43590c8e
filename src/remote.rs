//! Options for remote templates (HTTP, S3, NFS, NBD, scheme handlers), shared by
//! `serve` and `image`, and the async runtime their reads run on.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use thinline_source::RemoteConfig;

use crate::size::parse_size;

/// How remote templates are fetched.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Remote templates (http, https, s3, nfs, nbd, handlers)")]
pub struct RemoteArgs {
    /// Reads are rounded out to this unit (a power of two; K, M suffixes): a 4 KiB read
    /// fetches the whole unit, and later reads of it come from memory.
    #[arg(long, value_name = "SIZE", default_value = "1M", value_parser = parse_size)]
    pub fetch_unit: usize,

    /// Requests in flight to one object at most, shared by all connections.
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub max_in_flight: usize,

    /// Largest sequential readahead window (0 turns readahead off).
    #[arg(long, value_name = "SIZE", default_value = "32M", value_parser = parse_size)]
    pub readahead: usize,

    /// Memory for fetched units per object, least recently used dropped beyond it.
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = parse_size)]
    pub fetch_memory: usize,

    /// Retries of a failed range request (5xx, 429/503 SlowDown, resets, timeouts,
    /// short bodies) with exponential backoff and jitter, before that read gets EIO.
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub retries: u32,

    /// Seconds to establish a connection.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub connect_timeout: f64,

    /// Seconds from sending a request to the first byte of its response.
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    pub first_byte_timeout: f64,

    /// Seconds a response body may stall.
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    pub idle_timeout: f64,

    /// HTTP and S3: the slowest accepted transfer (bytes per second; K, M suffixes): a
    /// request must be complete within --first-byte-timeout plus its length at this
    /// rate, else it is retried (then that read gets EIO), so a server that trickles
    /// cannot hold a read for long. (An NBD request must be answered within
    /// --first-byte-timeout plus --idle-timeout.)
    #[arg(long, value_name = "RATE", default_value = "64K", value_parser = parse_size)]
    pub min_rate: usize,

    /// HTTP: also follow redirects to HOST (`host`, `host:port`, `*.domain`, or `*` for
    /// any host but link-local and cloud metadata addresses); by default only redirects
    /// within the template's own scheme, host and port are followed. Credentials are
    /// never sent to another host. Repeatable.
    #[arg(long, value_name = "HOST")]
    pub allow_redirect: Vec<String>,

    /// HTTP: credentials for Basic authentication from a netrc file (`machine HOST login
    /// USER password PASS`; mode 600 or stricter), so they stay off the command line,
    /// which every local user can read. Credentials in the URI take precedence.
    #[arg(long, value_name = "FILE", env = "THINLINE_NETRC_FILE")]
    pub netrc_file: Option<PathBuf>,

    /// S3: endpoint of an S3-compatible store (path-style addressing); else
    /// $AWS_ENDPOINT_URL, else AWS.
    #[arg(long, value_name = "URL")]
    pub s3_endpoint: Option<String>,

    /// S3: region; else the standard AWS configuration ($AWS_REGION, profile).
    #[arg(long, value_name = "REGION")]
    pub s3_region: Option<String>,

    /// Directory of scheme handlers: a URI of any other scheme S runs `DIR/S attach URI`
    /// (see thinline-storage-handler(7)).
    #[arg(
        long,
        value_name = "DIR",
        env = "THINLINE_HANDLER_DIR",
        default_value = "/usr/libexec/thinline/storage"
    )]
    pub handler_dir: PathBuf,
}

fn seconds(name: &str, value: f64) -> anyhow::Result<Duration> {
    if !(value > 0.0 && value.is_finite()) {
        anyhow::bail!("--{name} must be a positive number of seconds");
    }
    Ok(Duration::from_secs_f64(value))
}

impl RemoteArgs {
    /// The library configuration these arguments ask for.
    pub fn config(&self) -> anyhow::Result<Arc<RemoteConfig>> {
        if !self.fetch_unit.is_power_of_two() || !(4096..=(64 << 20)).contains(&self.fetch_unit) {
            anyhow::bail!("--fetch-unit must be a power of two between 4K and 64M");
        }
        if self.max_in_flight == 0 {
            anyhow::bail!("--max-in-flight must be at least 1");
        }
        if self.min_rate == 0 {
            anyhow::bail!("--min-rate must be at least 1 byte per second");
        }
        let http_credentials = match &self.netrc_file {
            Some(path) => Some(Arc::new(
                thinline_source::credentials::Netrc::load(path)
                    .map_err(|e| anyhow::anyhow!("--netrc-file: {e}"))?,
            )),
            None => None,
        };
        Ok(Arc::new(RemoteConfig {
            fetch_unit: self.fetch_unit as u64,
            max_in_flight: self.max_in_flight,
            max_readahead: self.readahead as u64,
            memory_budget: self.fetch_memory as u64,
            attempts: self.retries.saturating_add(1),
            connect_timeout: seconds("connect-timeout", self.connect_timeout)?,
            first_byte_timeout: seconds("first-byte-timeout", self.first_byte_timeout)?,
            idle_timeout: seconds("idle-timeout", self.idle_timeout)?,
            min_rate: self.min_rate as u64,
            redirect_hosts: self.allow_redirect.clone(),
            http_credentials,
            s3_endpoint: self.s3_endpoint.clone(),
            s3_region: self.s3_region.clone(),
            handler_dir: self.handler_dir.clone(),
            ..RemoteConfig::default()
        }))
    }
}

/// Threads of the runtime's blocking pool, at most: metadata-cache misses of image
/// exports, compressed clusters, the thread I/O engine's reads and writes and the
/// copy-on-read cache's writes and syncs run there. Tokio's default (512) lets a server
/// under random reads of a large qcow2 grow to hundreds of threads, one per miss that
/// found no idle thread; 32 keeps one queue depth of 32 blocking at once (remote
/// metadata misses wait on the network) and queues the rest.
const MAX_BLOCKING_THREADS: usize = 32;

/// The process's async runtime: remote reads, and the server when serving.
pub fn runtime() -> anyhow::Result<&'static tokio::runtime::Runtime> {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    if let Some(r) = RUNTIME.get() {
        return Ok(r);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .thread_name("thinline")
        .build()
        .context("cannot start the async runtime")?;
    Ok(RUNTIME.get_or_init(|| runtime))
}
