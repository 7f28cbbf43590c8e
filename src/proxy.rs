//! `thinline proxy`: the copy-on-read proxy between a template's NBD server and the
//! clients of its clones, `thinline proxy status` and `thinline proxy scrub`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde::Serialize;
use thinline_cor::{CorExport, NbdUpstream};
use thinline_nbd::export::Export;
use thinline_nbd::server::{ExportSet, Listener, Server, ServerConfig};

use crate::cache::StatusSocket;

use crate::cache::CacheArgs;
use crate::remote::RemoteArgs;

/// Cache a template's NBD export on local storage: fetch each block once, serve it
/// locally forever after.
///
/// The proxy reads the template from --upstream (any NBD server: `thinline serve`,
/// qemu-nbd, nbdkit) and serves it read-only on --socket (and/or --listen), typically
/// to the kernel's nbd-client as the external origin of dm-thin clones. Every block it
/// fetches is written to --cache (a sparse file or a block device, such as a thin
/// volume, holding the template at its own offsets plus a presence map after it) and
/// marked present once durable; later reads, by any clone, come from the cache. A
/// restart reuses every marked block. The cache is keyed by the template's identity
/// (upstream URI, size, --template-id): a cache of another template is refused.
///
/// Every chunk carries a CRC32C, checked the first time the proxy reads it from disk;
/// a chunk that does not match is logged and fetched again (`thinline proxy scrub`
/// checks them all). Data that is not a cache is never overwritten, whatever
/// --cache-mismatch says; --cache is opened without following a symbolic link, except
/// one to a block device (such as /dev/VG/LV).
///
/// Of the remote-template options, --fetch-unit (bytes fetched per miss),
/// --max-in-flight (upstream fetches at once), --retries and the timeouts apply to the
/// upstream.
#[derive(Debug, Args)]
#[command(
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    after_long_help = EXAMPLES
)]
pub struct ProxyArgs {
    #[command(subcommand)]
    action: Option<ProxyAction>,

    /// The template's NBD server: nbd://HOST:PORT/EXPORT (the port defaults to 10809) or
    /// nbd+unix:///EXPORT?socket=PATH.
    #[arg(long, value_name = "URI", required = true)]
    upstream: Option<String>,

    /// The cache: a file (created sparse if missing) or a block device, at least the
    /// template's size rounded up to 1 MiB plus 8 KiB, one bit and 4 bytes per chunk
    /// (each rounded up to 4 KiB). A symbolic link is followed only to a block device.
    #[arg(long, value_name = "PATH", required = true)]
    cache: Option<PathBuf>,

    /// Listen on a unix socket (a stale socket is replaced).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,

    /// Listen on TCP (default 127.0.0.1:10809 when neither --socket is given nor a
    /// socket passed by systemd).
    #[arg(long, value_name = "HOST:PORT")]
    listen: Option<String>,

    /// The export name served (it is also the default export "").
    #[arg(long, value_name = "NAME", default_value = "")]
    name: String,

    /// The template's version as the caller knows it (an ETag, a version id, a
    /// digest): part of the cache's identity, so a cache of another version is
    /// refused. NBD itself carries no version.
    #[arg(long, value_name = "ID")]
    template_id: Option<String>,

    #[command(flatten)]
    tls: crate::tls::TlsArgs,

    /// Serve Prometheus metrics (text format) over HTTP at http://ADDR/metrics: requests,
    /// bytes, errors and latency per export, the caches, the fetch engines, memory.
    #[arg(long, value_name = "HOST:PORT")]
    metrics_listen: Option<String>,

    /// Refuse further connections (politely, during the handshake) beyond N.
    #[arg(long, value_name = "N")]
    max_connections: Option<usize>,

    #[command(flatten)]
    idle_spin: crate::serve::IdleSpinArgs,

    /// Print the export, cache and status socket as one JSON object once listening.
    #[arg(long)]
    json: bool,

    #[command(flatten)]
    cache_args: CacheArgs,

    // Last: these start their own help heading.
    #[command(flatten)]
    remote: RemoteArgs,
}

#[derive(Debug, Subcommand)]
enum ProxyAction {
    Status(StatusArgs),
    Scrub(ScrubArgs),
}

/// Check every cached chunk of a stopped proxy's cache against its checksum.
///
/// Reads the whole cached data. Takes the cache's lock: a cache in use is refused,
/// naming its holder. Exit status: 0 every present chunk matches, 4 bad chunks were
/// found (with --repair, also forgotten: the next proxy fetches them again), 1 the
/// cache cannot be checked.
#[derive(Debug, Args)]
#[command(after_long_help = SCRUB_EXAMPLES)]
struct ScrubArgs {
    /// The cache file or block device.
    #[arg(value_name = "CACHE")]
    cache: PathBuf,

    /// Clear the presence bits of bad chunks, so they are fetched again.
    #[arg(long)]
    repair: bool,

    /// The template's size in bytes (K, M, G suffixes): needed for a block device; a
    /// file's is found from its length.
    #[arg(long, value_name = "SIZE", value_parser = crate::size::parse_size)]
    size: Option<usize>,

    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// Show a running proxy's (or `serve --cache-dir`'s) cache counters and hydration.
#[derive(Debug, Args)]
#[command(after_long_help = STATUS_EXAMPLES)]
struct StatusArgs {
    /// The status socket (--status-socket; for `proxy`, default SOCKET.status), or the
    /// proxy's NBD socket.
    #[arg(value_name = "SOCKET")]
    socket: PathBuf,

    /// Print JSON: {"exports": {NAME: {...}}}.
    #[arg(long)]
    json: bool,
}

const EXAMPLES: &str = "\
Examples:
  # The original design's data path: template server → proxy → nbd-client → dm-thin
  thinline serve --socket /run/thinline/up.sock s3://templates/debian-12.qcow2
  thinline proxy --upstream 'nbd+unix:///?socket=/run/thinline/up.sock' \\
      --cache /var/lib/thinline/debian-12.cache --socket /run/thinline/tmpl.sock
  nbd-client -unix /run/thinline/tmpl.sock /dev/nbd0 -b 4096 -readonly
  dmsetup create clone1 --table \"0 $SECTORS thin /dev/mapper/pool 1 /dev/nbd0\"

  # A thin volume as the cache, hydrated in the background at 50 MB/s
  thinline proxy --upstream nbd://tmplhost/debian-12 --cache /dev/vg/debian-12-cache \\
      --socket /run/thinline/tmpl.sock --prefetch --prefetch-rate 50M

  # The upstream inside TLS (its CA in DIR/ca-cert.pem), served with a pre-shared key
  thinline proxy --upstream 'nbds://tmplhost/debian-12?tls-certificates=/etc/pki/thinline' \\
      --cache /var/lib/thinline/debian-12.cache --socket /run/thinline/tmpl.sock \\
      --listen 0.0.0.0:10809 --tls require --tls-psk /etc/thinline/tls/keys.psk

  # Hydration progress
  thinline proxy status /run/thinline/tmpl.sock
  nbdinfo --map=qemu:allocation-depth 'nbd+unix:///?socket=/run/thinline/tmpl.sock'

  # Socket activation (thinline-proxy@.socket and thinline-proxy-status@.socket), by hand
  systemd-socket-activate -l /run/thinline/tmpl.sock -l /run/thinline/tmpl.status \\
      --fdname=nbd:status -- thinline proxy --upstream nbd://tmplhost/debian-12 \\
      --cache /var/lib/thinline/debian-12.cache

The cache is served only for blocks marked present after their data was made durable;
kill -9 at any moment loses at most blocks not yet marked. Stop with SIGTERM or Ctrl-C.
Sockets passed by systemd (LISTEN_FDS) are served; one named \"status\" is the status
socket. With NOTIFY_SOCKET set, READY=1 is sent once serving and STOPPING=1 at a stop.";

const SCRUB_EXAMPLES: &str = "\
Examples:
  thinline proxy scrub /var/lib/thinline/debian-12.cache
  thinline proxy scrub --repair --size 10G /dev/vg/debian-12-cache";

const STATUS_EXAMPLES: &str = "\
Examples:
  thinline proxy status /run/thinline/tmpl.sock
  thinline proxy status --json /run/thinline/tmpl.sock.status | jq '.exports[].percent_present'";

/// The status socket of a proxy listening on `socket`.
pub fn default_status_socket(socket: &Path) -> PathBuf {
    let mut s = socket.as_os_str().to_owned();
    s.push(".status");
    PathBuf::from(s)
}

#[derive(Debug, Serialize)]
struct ProxyReport {
    upstream: String,
    cache: PathBuf,
    size: u64,
    chunks: u64,
    chunks_present: u64,
    complete: bool,
    status_socket: Option<PathBuf>,
    listening: Vec<String>,
    uris: Vec<String>,
    /// Where `/metrics` is served (`--metrics-listen`), as bound.
    #[serde(skip_serializing_if = "Option::is_none")]
    metrics: Option<String>,
}

/// Runs `thinline proxy` (until SIGTERM/SIGINT) or `thinline proxy status`.
pub fn run(args: ProxyArgs) -> anyhow::Result<u8> {
    match args.action {
        Some(ProxyAction::Status(status)) => return show_status(&status),
        Some(ProxyAction::Scrub(scrub)) => return run_scrub(&scrub),
        None => {}
    }
    let Some(upstream_uri) = args.upstream.as_deref() else {
        bail!("--upstream is required (the template's NBD server)");
    };
    let Some(cache_path) = args.cache.as_deref() else {
        bail!("--cache is required (a file or block device for the cached template)");
    };
    if !["nbd://", "nbd+unix://", "nbds://", "nbds+unix://"]
        .iter()
        .any(|scheme| upstream_uri.starts_with(scheme))
    {
        bail!(
            "--upstream must be an NBD URI (nbd[s]://… or nbd[s]+unix://…); to cache an HTTP, \
             S3, NFS or file template without an extra hop use `thinline serve --cache-dir`"
        );
    }
    if args.max_connections == Some(0) {
        bail!("--max-connections must be at least 1");
    }
    // Before the upstream is contacted: a bad certificate or key is the first error.
    let tls = args.tls.settings()?;
    let remote = args.remote.config()?;
    let role = match &args.socket {
        Some(s) => format!("thinline proxy --socket {}", s.display()),
        None => "thinline proxy".to_owned(),
    };
    let mut options =
        args.cache_args
            .options(args.remote.fetch_unit, args.remote.max_in_flight, &role)?;
    // The operator names the cache: an LVM volume's /dev/VG/LV is a link to its device.
    options.follow_device_links = true;
    let runtime = crate::remote::runtime()?;
    runtime.block_on(async move {
        let upstream = NbdUpstream::open(upstream_uri, args.template_id.as_deref(), &remote)
            .await
            .with_context(|| {
                format!(
                    "cannot open upstream {}",
                    thinline_source::redact::redact(upstream_uri)
                )
            })?;
        let export = CorExport::open(Arc::new(upstream), cache_path, &options)
            .with_context(|| format!("cannot open cache {}", cache_path.display()))?;

        let crate::serve::Listening {
            nbd: listeners,
            status,
        } = crate::serve::bind_listeners(args.socket.as_deref(), args.listen.as_deref()).await?;
        let status = match status {
            Some(passed) => Some(StatusSocket::Passed(passed)),
            None => args
                .cache_args
                .status_socket
                .clone()
                .or_else(|| args.socket.as_deref().map(default_status_socket))
                .map(StatusSocket::Bind),
        };
        let status_served = match status {
            Some(s) => Some(crate::cache::spawn_status(
                s,
                vec![(args.name.clone(), export.clone())],
            )?),
            None => None,
        };
        let status_socket = status_served.as_ref().map(|(path, _)| path.clone());
        let metrics = match &args.metrics_listen {
            Some(address) => {
                let listener = crate::metrics::bind(address).await?;
                let (registry, server) =
                    crate::metrics::registry(vec![(args.name.clone(), export.clone())]);
                Some((listener, registry, server))
            }
            None => None,
        };
        let status = export.status();
        let stats = export.clone();
        let report = ProxyReport {
            upstream: status.upstream.clone(),
            cache: status.cache.clone(),
            size: status.size,
            chunks: status.chunks,
            chunks_present: status.chunks_present,
            complete: status.complete,
            status_socket: status_socket.clone(),
            listening: listeners.iter().map(Listener::describe).collect(),
            uris: listeners
                .iter()
                .map(|l| crate::serve::export_uri(l, &args.name, tls.as_ref()))
                .collect(),
            metrics: metrics
                .as_ref()
                .and_then(|(l, _, _)| l.local_addr().ok())
                .map(|a| a.to_string()),
        };
        let server_metrics = match metrics {
            Some((listener, registry, server)) => {
                tokio::spawn(crate::metrics::serve(listener, registry));
                Some(server)
            }
            None => None,
        };
        let shutdown = crate::systemd::notify_stopping(crate::serve::shutdown_signal());
        print_report(&report, args.json)?;

        let mut exports = ExportSet::new();
        // The first export is also the default export "".
        exports.add(&args.name, Arc::new(export) as Arc<dyn Export>)?;
        let config = ServerConfig {
            idle_spin: args.idle_spin.duration(),
            max_connections: args.max_connections,
            handshake_timeout: Duration::from_secs(10),
            metrics: server_metrics,
            tls,
            ..ServerConfig::default()
        };
        let server = Server::new(exports, config)?;
        crate::systemd::notify("READY=1");
        server.run(listeners, shutdown).await?;
        if let Some((path, true)) = &status_served {
            let _ = std::fs::remove_file(path);
        }
        if !stats.settle(Duration::from_secs(5)).await {
            tracing::warn!("fetches still in flight after 5 s; their chunks will be fetched again");
        }
        let s = stats.status();
        tracing::info!(
            hits = s.hits,
            misses = s.misses,
            upstream_reads = s.upstream_reads,
            bytes_from_upstream = s.bytes_from_upstream,
            chunks_present = s.chunks_present,
            chunks = s.chunks,
            "proxy stopped"
        );
        Ok(0)
    })
}

fn print_report(report: &ProxyReport, json: bool) -> anyhow::Result<()> {
    use std::io::Write;
    crate::print_report(report, json, |out| {
        writeln!(
            out,
            "proxying {} ({} bytes) through cache {}: {} of {} chunks present{}",
            report.upstream,
            report.size,
            report.cache.display(),
            report.chunks_present,
            report.chunks,
            if report.complete { " (complete)" } else { "" }
        )?;
        for uri in &report.uris {
            writeln!(out, "serving read-only at {uri}")?;
        }
        if let Some(s) = &report.status_socket {
            writeln!(out, "status: thinline proxy status {}", s.display())?;
        }
        Ok(())
    })
}

#[derive(Debug, Serialize)]
struct ScrubOutput {
    cache: PathBuf,
    #[serde(flatten)]
    report: thinline_cor::ScrubReport,
    repaired: bool,
}

/// `thinline proxy scrub`: 0 clean, 4 bad chunks found.
fn run_scrub(args: &ScrubArgs) -> anyhow::Result<u8> {
    let cache = thinline_cor::CacheFile::open_existing(
        &args.cache,
        &thinline_cor::ExistingOptions {
            size: args.size.map(|s| s as u64),
            writable: args.repair,
            follow_device_links: true,
        },
    )
    .with_context(|| format!("cannot scrub cache {}", args.cache.display()))?;
    let report = cache
        .scrub()
        .with_context(|| format!("cannot scrub cache {}", args.cache.display()))?;
    let bad: Vec<u64> = report.bad.iter().map(|&(c, _)| c).collect();
    if args.repair {
        cache
            .clear_chunks(&bad)
            .with_context(|| format!("cannot repair cache {}", args.cache.display()))?;
    }
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let status = if bad.is_empty() { 0 } else { 4 };
    if args.json {
        let output = ScrubOutput {
            cache: args.cache.clone(),
            report,
            repaired: args.repair && status != 0,
        };
        serde_json::to_writer(&mut out, &output)?;
        writeln!(out)?;
        return Ok(status);
    }
    writeln!(
        out,
        "cache {}: {} of {} chunks present, {} bad",
        args.cache.display(),
        report.present,
        report.chunks,
        bad.len()
    )?;
    for (chunk, offset) in &report.bad {
        writeln!(
            out,
            "bad chunk {chunk} at offset {offset} ({} bytes)",
            cache.chunk_size()
        )?;
    }
    if status != 0 {
        writeln!(
            out,
            "{}",
            if args.repair {
                "their presence bits were cleared: the proxy fetches them again"
            } else {
                "run with --repair to clear their presence bits (a proxy also fetches them again when it reads them)"
            }
        )?;
    }
    Ok(status)
}

fn show_status(args: &StatusArgs) -> anyhow::Result<u8> {
    let runtime = crate::remote::runtime()?;
    // Given the NBD socket, ask its status socket; never wait on an NBD handshake.
    let status_path = default_status_socket(&args.socket);
    let path = if status_path.exists() {
        status_path
    } else {
        args.socket.clone()
    };
    let value = runtime
        .block_on(async {
            tokio::time::timeout(Duration::from_secs(10), thinline_cor::status::query(&path))
                .await
                .unwrap_or_else(|_| {
                    Err(std::io::Error::other(
                        "no answer within 10 s (is it a status socket?)",
                    ))
                })
        })
        .with_context(|| format!("cannot read status from {}", path.display()))?;
    if value.get("exports").is_none() {
        bail!("{} did not answer with a status", path.display());
    }
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer(&mut out, &value)?;
        writeln!(out)?;
        return Ok(0);
    }
    let exports = value["exports"].as_object().cloned().unwrap_or_default();
    for (name, s) in exports {
        let status: thinline_cor::Status = serde_json::from_value(s)?;
        writeln!(
            out,
            "export {name:?}: {} → cache {}",
            status.upstream,
            status.cache.display()
        )?;
        writeln!(
            out,
            "  present: {}% ({} of {} chunks of {} bytes){}",
            status.percent_present,
            status.chunks_present,
            status.chunks,
            status.chunk_size,
            if status.complete { ", complete" } else { "" }
        )?;
        writeln!(
            out,
            "  reads: {} hits, {} misses, {} bytes served; upstream: {} reads, {} bytes, {} errors, {} in flight, {} fetched ahead of reads (now {} units around a miss)",
            status.hits,
            status.misses,
            status.bytes_served,
            status.upstream_reads,
            status.bytes_from_upstream,
            status.upstream_errors,
            status.in_flight,
            status.speculative_fetches,
            status.fetch_around
        )?;
        writeln!(
            out,
            "  checksums: {} cached chunks did not match (fetched again)",
            status.checksum_errors
        )?;
        writeln!(
            out,
            "  prefetch: {} ({} bytes fetched, {} bytes of zeroes skipped){}",
            status.prefetch,
            status.prefetch_bytes,
            status.prefetch_zero_bytes,
            if status.passthrough {
                "; CACHE NOT WRITABLE: reads pass through"
            } else {
                ""
            }
        )?;
    }
    Ok(0)
}
