//! Options of the copy-on-read cache, shared by `proxy` and `serve --cache-dir`, and
//! the status socket both can answer.

use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};
use thinline_cor::{CorExport, CorOptions, OnMismatch, PrefetchOptions};

use crate::size::parse_size;

/// How the copy-on-read cache behaves.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Copy-on-read cache")]
pub struct CacheArgs {
    /// Presence granularity of a new cache (a power of two, 4K to 16M); an existing
    /// cache keeps its own.
    #[arg(long, value_name = "SIZE", default_value = "64K", value_parser = parse_size)]
    pub chunk_size: usize,

    /// A cache made for another template or version of it: refuse to start, or
    /// discard its contents and start empty. Data that is not a cache is refused
    /// either way.
    #[arg(long, value_enum, value_name = "WHAT", default_value_t = Mismatch::Refuse)]
    pub cache_mismatch: Mismatch,

    /// On a miss, also fetch up to this many fetch units on each side of it, in
    /// parallel and only while fetch slots are free (file systems keep related blocks
    /// close: on a high-latency upstream a neighbour costs bandwidth now instead of a
    /// round trip later). Fewer when the upstream moves fewer units than that in one
    /// round trip (measured by the misses); 0: never.
    #[arg(long, value_name = "UNITS", default_value_t = thinline_cor::export::DEFAULT_FETCH_AROUND)]
    pub fetch_around: u64,

    /// Hydrate the whole template in the background (skipping zero ranges), yielding
    /// to client reads; the cache records completion when done.
    #[arg(long)]
    pub prefetch: bool,

    /// Most bytes per second prefetch reads from the upstream (K, M, G suffixes; 0: no
    /// limit).
    #[arg(long, value_name = "RATE", default_value = "0", value_parser = parse_size)]
    pub prefetch_rate: usize,

    /// Answer status requests (counters, hydration progress, as JSON) on this unix
    /// socket; read it with `thinline proxy status PATH`.
    #[arg(long, value_name = "PATH")]
    pub status_socket: Option<PathBuf>,
}

/// `--cache-mismatch` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mismatch {
    Refuse,
    Discard,
}

impl CacheArgs {
    /// The library options, with `fetch_unit` from the remote options and `holder`
    /// naming this process.
    pub fn options(
        &self,
        fetch_unit: usize,
        max_fetches: usize,
        role: &str,
    ) -> anyhow::Result<CorOptions> {
        if !thinline_cor::cache::valid_chunk_size(self.chunk_size as u64) {
            anyhow::bail!("--chunk-size must be a power of two between 4K and 16M");
        }
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Ok(CorOptions {
            chunk_size: self.chunk_size as u64,
            fetch_unit: fetch_unit as u64,
            max_fetches,
            fetch_around: self.fetch_around,
            on_mismatch: match self.cache_mismatch {
                Mismatch::Refuse => OnMismatch::Refuse,
                Mismatch::Discard => OnMismatch::Discard,
            },
            holder: format!(
                "pid {} ({role}) since unix time {since}",
                std::process::id()
            ),
            prefetch: self.prefetch.then(|| PrefetchOptions {
                rate: (self.prefetch_rate > 0).then_some(self.prefetch_rate as u64),
            }),
            follow_device_links: false,
        })
    }
}

/// Where the status socket is: a path to bind, or a socket systemd passed.
pub enum StatusSocket {
    Bind(std::path::PathBuf),
    Passed(std::os::unix::net::UnixListener),
}

/// Binds the status socket (or takes the one passed) and answers it in the background
/// until the process exits. Returns its path, and whether it is removed at exit (one
/// bound here is).
pub fn spawn_status(
    socket: StatusSocket,
    exports: Vec<(String, CorExport)>,
) -> anyhow::Result<(std::path::PathBuf, bool)> {
    use anyhow::Context;
    let (listener, path, owned) = match socket {
        StatusSocket::Bind(path) => {
            let l = thinline_cor::status::bind(&path)
                .with_context(|| format!("cannot listen on status socket {}", path.display()))?;
            (l, path, true)
        }
        StatusSocket::Passed(l) => {
            let path = l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(Path::to_owned))
                .unwrap_or_default();
            l.set_nonblocking(true)?;
            (tokio::net::UnixListener::from_std(l)?, path, false)
        }
    };
    tokio::spawn(thinline_cor::status::serve(
        listener,
        exports,
        std::future::pending(),
    ));
    Ok((path, owned))
}
