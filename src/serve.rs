//! `thinline serve`: export images over NBD on a unix socket and/or TCP.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use serde::Serialize;
use thinline_format::Format;
use thinline_nbd::export::Export;
use thinline_nbd::raw::{IoEngine, RawOptions};
use thinline_source::open::{OpenExportOptions, OpenedExport, open_export};

use crate::cache::StatusSocket;
use crate::image::OpenArgs;
use crate::systemd::PassedSocket;
use thinline_nbd::server::{ExportSet, Listener, Server, ServerConfig};
use thinline_nbd::tls::{TlsMode, TlsSettings};
use thinline_source::Source;

/// Serve disk images (raw, qcow2, VHD, VMDK) and block devices over NBD.
///
/// Each IMAGE becomes one export; `NAME=IMAGE` names it (otherwise its file name is
/// used), and the first image is also the default export "". The format is detected
/// from the content unless --format says otherwise. Local raw images and block devices
/// are served read-write (unless -r); when their format was detected rather than given,
/// writes that would make them detect as another format (a qcow2, VMDK or VHD header
/// written by a guest) are refused with EPERM: give --format raw to allow them. qcow2, VHD
/// and VMDK images are served read-only (qcow2 read-write with -w) as the raw disk they
/// describe, backing chain included, with block status in
/// `base:allocation` and `qemu:allocation-depth`. Remote templates (http://, https://,
/// s3://, nfs://, nbd://, nbd+unix://, or any scheme with a handler) are served
/// read-only, fetched by ranges as clients read them; with --cache-dir, through a
/// persistent copy-on-read cache. Without IMAGE, a sparse 1 GiB
/// sample image is created (or reused) in $TMPDIR and served.
#[derive(Debug, Args)]
#[command(after_long_help = EXAMPLES)]
pub struct ServeArgs {
    /// Images to export: image files or block devices (a path or a file:///path URI) or
    /// remote templates (a URI), optionally named NAME=IMAGE.
    #[arg(value_name = "[NAME=]IMAGE")]
    images: Vec<String>,

    /// Listen on a unix socket (mode 0660; a stale socket is replaced, anything else
    /// at PATH is refused), besides any socket systemd passes.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,

    /// Listen on TCP (default 127.0.0.1:10809 when neither --socket is given nor a
    /// socket passed by systemd).
    #[arg(long, value_name = "HOST:PORT")]
    listen: Option<String>,

    /// Serve every export read-only.
    #[arg(short, long, conflicts_with = "writable")]
    read_only: bool,

    /// Serve qcow2 images read-write (their backing files stay read-only). The image is
    /// locked the way qemu locks it, so qemu and Thinline never both write it; other
    /// image formats and remote templates are refused.
    #[arg(short, long, conflicts_with = "cache_dir")]
    writable: bool,

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
    idle_spin: IdleSpinArgs,

    /// Drop a client that has not finished the handshake after SECS seconds.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    handshake_timeout: f64,

    /// Advertise this minimum block size (a power of two up to 65536) and refuse
    /// misaligned requests; default 1 for files, the sector size for block devices.
    #[arg(long, value_name = "BYTES")]
    min_block_size: Option<u32>,

    /// Print the exports and their NBD URIs as one JSON object on stdout once listening.
    #[arg(long)]
    json: bool,

    /// How reads that miss the page cache, writes that would block, FUA writes and
    /// flushes are run: io-uring, a thread pool, or auto (io-uring when the kernel
    /// allows it, else threads). Page-cache hits are always served inline.
    #[arg(long, value_enum, value_name = "ENGINE", default_value_t = IoEngineArg::Auto)]
    io_engine: IoEngineArg,

    /// Put a copy-on-read cache in front of each image: DIR/NAME-HASH-HASH.cache keeps
    /// every block fetched, durable and checksummed, so later reads (and later runs) are
    /// local. The name hashes the location and the pinned version (ETag, version id,
    /// mtime…): each version of a template gets its own cache (older ones are left in
    /// place and logged). DIR is created private (0700); a symbolic link inside it is
    /// refused. Exports become read-only.
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,

    // Last: the remote and cache options start their own help headings.
    #[command(flatten)]
    open: OpenArgs,

    #[command(flatten)]
    cache: crate::cache::CacheArgs,
}

/// `--idle-spin`, shared by `serve` and `proxy`.
#[derive(Debug, Args)]
pub struct IdleSpinArgs {
    /// Microseconds a connection with nothing in flight polls for the client's next
    /// request before it sleeps: a client at queue depth 1 then gets its next answer
    /// without a thread wake-up (about twice the IOPS), for CPU time spent polling while it
    /// sends. Polling backs off for clients that do not send that fast; 0 never polls.
    #[arg(long, value_name = "MICROSECONDS", default_value_t = thinline_nbd::server::DEFAULT_IDLE_SPIN.as_micros() as u64)]
    idle_spin: u64,
}

impl IdleSpinArgs {
    /// `ServerConfig::idle_spin`.
    pub fn duration(&self) -> Duration {
        Duration::from_micros(self.idle_spin)
    }
}

/// `--io-engine` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum IoEngineArg {
    Auto,
    IoUring,
    Threads,
}

impl From<IoEngineArg> for IoEngine {
    fn from(arg: IoEngineArg) -> Self {
        match arg {
            IoEngineArg::Auto => IoEngine::Auto,
            IoEngineArg::IoUring => IoEngine::IoUring,
            IoEngineArg::Threads => IoEngine::Threads,
        }
    }
}

const EXAMPLES: &str = "\
Examples:
  # Serve a disk image on a unix socket, read-write
  thinline serve --socket /run/thinline/disk.sock disk.img
  nbdinfo 'nbd+unix:///?socket=/run/thinline/disk.sock'

  # Two named exports on TCP, read-only, at most 8 clients
  thinline serve --listen 0.0.0.0:10809 -r --max-connections 8 base=base.img data=/dev/vg/data
  qemu-img info nbd://127.0.0.1:10809/base

  # A qcow2 template with its backing chain, read-only, with allocation depth
  thinline serve --socket /run/thinline/tmpl.sock template.qcow2
  nbdinfo --map=qemu:allocation-depth 'nbd+unix:///?socket=/run/thinline/tmpl.sock'

  # A writable qcow2 overlay over a template (reads of unwritten clusters go to it)
  thinline image create -f qcow2 --backing template.qcow2 --backing-format qcow2 clone.qcow2
  thinline serve -w --socket /run/thinline/clone.sock clone.qcow2

  # Force the format (a raw disk that happens to start with a qcow2 magic)
  thinline serve --format raw --socket /run/thinline/disk.sock disk.img

  # A qcow2 template on an HTTP server (fetched by 1 MiB ranges, never copied first)
  thinline serve --socket /run/thinline/tmpl.sock https://images.example.com/debian-12.qcow2

  # A template in S3 (credentials from the standard AWS chain), pinned to one version
  AWS_REGION=eu-west-1 thinline serve --socket /run/thinline/tmpl.sock \\
      's3://templates/debian-12.qcow2?versionId=3HL4kqtJlcpXroDTDmJ'

  # The same from an S3-compatible store (path-style addressing)
  thinline serve --s3-endpoint http://minio.lan:9000 --socket /run/t.sock s3://templates/t.vmdk

  # NFS without a kernel mount, and another NBD server as the source
  thinline serve --socket /run/t.sock nfs://filer/export/templates/t.vhd
  thinline serve --socket /run/t.sock 'nbd+unix:///tmpl?socket=/run/upstream.sock'

  # TLS required, with a certificate, or with psktool's pre-shared keys
  thinline serve --listen 0.0.0.0:10809 --tls require \\
      --tls-cert /etc/thinline/tls/cert.pem --tls-key /etc/thinline/tls/key.pem disk.img
  thinline serve --listen 0.0.0.0:10809 --tls require --tls-psk /etc/thinline/tls/keys.psk disk.img
  nbdinfo 'nbds://alice@server/disk.img?tls-psk-file=/etc/thinline/tls/keys.psk'

  # Another NBD server's template, read inside TLS (its CA in DIR/ca-cert.pem)
  thinline serve --socket /run/t.sock 'nbds://tmplhost/tmpl?tls-certificates=/etc/pki/thinline'

  # A copy-on-read cache in front of a remote template: every block fetched once,
  # kept in /var/cache/thinline, reused by later reads and later runs
  thinline serve --cache-dir /var/cache/thinline --status-socket /run/t.status \\
      --socket /run/t.sock https://images.example.com/debian-12.qcow2
  thinline proxy status /run/t.status

  # Attach with the kernel client (4 connections: the exports are multi-conn safe)
  nbd-client -unix /run/thinline/disk.sock /dev/nbd0 -b 4096 -C 4

  # Started by systemd (socket activation, thinline-serve@.socket), or the same by hand:
  # the passed sockets are served, no --socket or --listen needed
  systemd-socket-activate -l /run/thinline/disk.sock -- thinline serve disk.img

Stop with SIGTERM or Ctrl-C: requests in flight finish, data is flushed, exit status 0.
Sockets passed by systemd (LISTEN_FDS) are served; one named \"status\" is the status
socket. With NOTIFY_SOCKET set, READY=1 is sent once serving and STOPPING=1 at a stop.";

/// An export opened from the command line, as the report shows it.
#[derive(Debug, Serialize)]
struct Opened {
    name: String,
    /// The file, or the URI without credentials or query.
    path: String,
    format: Format,
    /// Files of the backing chain below the image, top first.
    backing_chain: Vec<String>,
    size: u64,
    read_only: bool,
    /// The copy-on-read cache in front of it (`--cache-dir`).
    #[serde(skip_serializing_if = "Option::is_none")]
    cache: Option<PathBuf>,
}

/// Size of the sample image created when no image is given.
const SAMPLE_SIZE: u64 = 1 << 30;

#[derive(Debug, Serialize)]
struct ExportReport<'a> {
    #[serde(flatten)]
    export: &'a Opened,
    uris: Vec<String>,
}

#[derive(Debug, Serialize)]
struct ServeReport<'a> {
    listening: Vec<String>,
    exports: Vec<ExportReport<'a>>,
    /// Where `/metrics` is served (`--metrics-listen`), as bound.
    #[serde(skip_serializing_if = "Option::is_none")]
    metrics: Option<String>,
}

/// Splits `NAME=IMAGE`; an `=` inside a path (after a `/`) is part of the path.
fn parse_image_spec(spec: &str) -> (Option<&str>, &str) {
    match spec.split_once('=') {
        Some((name, path)) if !name.contains('/') => (Some(name), path),
        _ => (None, spec),
    }
}

/// The sample image in `$TMPDIR`, created sparse (mode 0600) if missing. `$TMPDIR` is
/// usually shared: another user could have put a symbolic link to some file of ours
/// there, or a file of theirs, to have it served read-write. Only a regular file this
/// user owns is reused; a new one is created exclusively.
fn sample_image() -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let path = std::env::temp_dir().join("thinline-sample.img");
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    match std::fs::symlink_metadata(&path) {
        Ok(meta) if meta.file_type().is_file() && meta.uid() == me => return Ok(path),
        Ok(_) => bail!(
            "{} exists but is not a regular file owned by this user (a symbolic link or another user's file is never served as the sample); remove it or name an image",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot stat {}", path.display())),
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.set_len(SAMPLE_SIZE)
        .with_context(|| format!("cannot size {}", path.display()))?;
    eprintln!(
        "thinline: created a sparse {} GiB sample image at {}",
        SAMPLE_SIZE >> 30,
        path.display()
    );
    Ok(path)
}

/// Where a daemon listens.
pub(crate) struct Listening {
    /// Its NBD listeners.
    pub nbd: Vec<Listener>,
    /// The status socket systemd passed (named `status`), if it did.
    pub status: Option<std::os::unix::net::UnixListener>,
}

/// The sockets systemd passed (socket activation: one named `status` is the status
/// socket, every other one an NBD listener), then `--socket` and/or `--listen`; TCP
/// 127.0.0.1:10809 when none of these is given.
pub(crate) async fn bind_listeners(
    socket: Option<&std::path::Path>,
    listen: Option<&str>,
) -> anyhow::Result<Listening> {
    let mut listening = Listening {
        nbd: Vec::new(),
        status: None,
    };
    for passed in crate::systemd::listen_fds()? {
        match (passed.name.as_str(), passed.socket) {
            ("status", PassedSocket::Unix(l)) => listening.status = Some(l),
            ("status", PassedSocket::Tcp(_)) => {
                anyhow::bail!(
                    "the socket named \"status\" that systemd passed must be a unix socket"
                )
            }
            (_, PassedSocket::Unix(l)) => listening.nbd.push(Listener::from_std_unix(l)?),
            (_, PassedSocket::Tcp(l)) => listening.nbd.push(Listener::from_std_tcp(l)?),
        }
    }
    if let Some(path) = socket {
        listening.nbd.push(Listener::bind_unix(path)?);
    }
    if listen.is_some() || listening.nbd.is_empty() {
        let address = listen.unwrap_or("127.0.0.1:10809");
        listening.nbd.push(Listener::bind_tcp(address).await?);
    }
    Ok(listening)
}

/// The NBD URI of export `name` on `listener`.
/// The URI of export `name` on `listener`: `nbds…` when the server requires TLS
/// (`tls`), as clients need to know.
pub(crate) fn export_uri(listener: &Listener, name: &str, tls: Option<&TlsSettings>) -> String {
    let scheme = match tls {
        Some(TlsSettings {
            mode: TlsMode::Require,
            ..
        }) => "nbds",
        _ => "nbd",
    };
    match listener {
        Listener::Unix(_, p) | Listener::UnixPassed(_, p) => format!(
            "{scheme}+unix:///{}?socket={}",
            percent_encode(name),
            p.display()
        ),
        Listener::Tcp(_) => format!(
            "{scheme}://{}/{}",
            listener.describe(),
            percent_encode(name)
        ),
    }
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Runs `thinline serve` until SIGTERM/SIGINT.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    if !(args.handshake_timeout > 0.0 && args.handshake_timeout.is_finite()) {
        bail!("--handshake-timeout must be a positive number of seconds");
    }
    if let Some(m) = args.min_block_size
        && (!m.is_power_of_two() || m > 65536)
    {
        bail!("--min-block-size must be a power of two no larger than 65536, not {m}");
    }
    if args.max_connections == Some(0) {
        bail!("--max-connections must be at least 1");
    }
    let images = if args.images.is_empty() {
        vec![sample_image()?.display().to_string()]
    } else {
        args.images.clone()
    };

    let options = RawOptions {
        read_only: args.read_only,
        minimum_block_size: args.min_block_size,
        io_engine: args.io_engine.into(),
        guard_probed_format: false,
    };
    let runtime = crate::remote::runtime()?;
    let mut remote_config = None;
    let mut exports = ExportSet::new();
    let mut opened: Vec<Opened> = Vec::new();
    let mut cached = Vec::new();
    if let Some(dir) = &args.cache_dir {
        thinline_cor::cache_dir::create_cache_dir(dir)
            .with_context(|| format!("cannot create cache directory {}", dir.display()))?;
    }
    let cor_options = args.cache.options(
        args.open.remote.fetch_unit,
        args.open.remote.max_in_flight,
        "thinline serve",
    )?;
    for spec in &images {
        let (name, location) = parse_image_spec(spec);
        let source = thinline_source::parse(location)?;
        let shown = source.shown();
        let name = match name {
            Some(n) => n.to_owned(),
            None => default_export_name(&source).with_context(|| {
                format!("{shown} has no file name to use as the export name; use NAME=IMAGE")
            })?,
        };
        let caching = args.cache_dir.is_some();
        let remote = match &source {
            Source::File(_) => None,
            _ => Some(match &remote_config {
                Some(c) => Arc::clone(c),
                None => {
                    let mut config = args.open.remote.config()?;
                    if caching {
                        // The cache reads ahead itself, and knows what it holds.
                        let mut c = (*config).clone();
                        c.max_readahead = 0;
                        config = Arc::new(c);
                    }
                    Arc::clone(remote_config.insert(config))
                }
            }),
        };
        let OpenedExport {
            export,
            format,
            backing_chain,
            identity,
        } = open_export(
            &source,
            &OpenExportOptions {
                format: args.open.format.format(),
                image: args.open.options(),
                raw: options.clone(),
                as_template: caching,
                writable: args.writable,
            },
            remote.as_ref(),
            runtime.handle(),
        )?;
        let (export, cache) = match (&args.cache_dir, identity) {
            (Some(dir), Some(identity)) => {
                let cor = {
                    let _enter = runtime.enter();
                    thinline_cor::cache_dir::open_cached(
                        dir,
                        export,
                        &shown,
                        identity,
                        &cor_options,
                    )
                    .with_context(|| format!("cannot open the cache of {shown}"))?
                };
                let path = cor.cache().path().to_owned();
                cached.push((name.clone(), cor.clone()));
                (Arc::new(cor) as Arc<dyn Export>, Some(path))
            }
            _ => (export, None),
        };
        opened.push(Opened {
            name: name.clone(),
            path: shown,
            format,
            backing_chain,
            size: export.size(),
            read_only: export.capabilities().read_only,
            cache,
        });
        exports.add(&name, export)?;
    }

    let mut config = ServerConfig {
        idle_spin: args.idle_spin.duration(),
        max_connections: args.max_connections,
        handshake_timeout: Duration::from_secs_f64(args.handshake_timeout),
        tls: args.tls.settings()?,
        ..ServerConfig::default()
    };
    runtime.block_on(async move {
        let metrics = match &args.metrics_listen {
            Some(address) => {
                let listener = crate::metrics::bind(address).await?;
                let (registry, server) = crate::metrics::registry(cached.clone());
                config.metrics = Some(server);
                Some((listener, registry))
            }
            None => None,
        };
        let Listening {
            nbd: listeners,
            status,
        } = bind_listeners(args.socket.as_deref(), args.listen.as_deref()).await?;
        let report = ServeReport {
            listening: listeners.iter().map(Listener::describe).collect(),
            exports: opened
                .iter()
                .enumerate()
                .map(|(i, export)| {
                    let mut uris = Vec::new();
                    for l in &listeners {
                        if i == 0 {
                            uris.push(export_uri(l, "", config.tls.as_ref()));
                        }
                        uris.push(export_uri(l, &export.name, config.tls.as_ref()));
                    }
                    ExportReport { export, uris }
                })
                .collect(),
            metrics: metrics
                .as_ref()
                .and_then(|(l, _)| l.local_addr().ok())
                .map(|a| a.to_string()),
        };
        if let Some((listener, registry)) = metrics {
            tokio::spawn(crate::metrics::serve(listener, registry));
        }
        let settle: Vec<thinline_cor::CorExport> = cached.iter().map(|(_, e)| e.clone()).collect();
        let status = match (status, &args.cache.status_socket) {
            (Some(passed), _) => Some(StatusSocket::Passed(passed)),
            (None, Some(path)) => Some(StatusSocket::Bind(path.clone())),
            (None, None) => None,
        };
        let status = match status {
            Some(s) => Some(crate::cache::spawn_status(s, cached)?),
            None => None,
        };
        // Signals are caught from before the report: whoever starts the daemon may stop
        // it as soon as it says it listens.
        let shutdown = crate::systemd::notify_stopping(shutdown_signal());
        print_report(&report, args.json)?;
        let server = Server::new(exports, config)?;
        crate::systemd::notify("READY=1");
        server.run(listeners, shutdown).await?;
        if let Some((path, true)) = &status {
            let _ = std::fs::remove_file(path);
        }
        for e in &settle {
            if !e.settle(Duration::from_secs(5)).await {
                tracing::warn!(cache = %e.cache().path().display(), "fetches still in flight after 5 s; their chunks will be fetched again");
            }
        }
        Ok(())
    })
}

fn print_report(report: &ServeReport, json: bool) -> anyhow::Result<()> {
    use std::io::Write;
    crate::print_report(report, json, |out| {
        for ExportReport { export: e, .. } in &report.exports {
            let mode = if e.read_only {
                "read-only"
            } else {
                "read-write"
            };
            writeln!(
                out,
                "serving {:?}: {} ({}, {} bytes, {mode})",
                e.name, e.path, e.format, e.size
            )?;
            for b in &e.backing_chain {
                writeln!(out, "  backed by {b}")?;
            }
            if let Some(c) = &e.cache {
                writeln!(out, "  cached in {}", c.display())?;
            }
        }
        let first = &report.exports[0];
        let uri = &first.uris[0];
        writeln!(out, "connect with:")?;
        writeln!(out, "  nbdinfo '{uri}'")?;
        writeln!(out, "  qemu-img info '{uri}'")?;
        if uri.starts_with("nbds") {
            writeln!(
                out,
                "  (inside TLS: add ?tls-certificates=DIR or ?tls-psk-file=FILE for libnbd, \
                 --object tls-creds-… for qemu, -cacertfile FILE -tlshostname NAME for \
                 nbd-client, which has no pre-shared keys)"
            )?;
        }
        for l in &report.listening {
            if l.starts_with('/') {
                writeln!(out, "  nbd-client -unix {l} /dev/nbd0 -b 4096")?;
            } else if let Some((host, port)) = l.rsplit_once(':') {
                writeln!(
                    out,
                    "  nbd-client {host} {port} /dev/nbd0 -N '{}' -b 4096",
                    first.export.name
                )?;
            }
        }
        writeln!(out, "stop with Ctrl-C or SIGTERM")?;
        Ok(())
    })
}

/// The export name used when none is given: the last component of the path.
fn default_export_name(source: &Source) -> Option<String> {
    match source {
        Source::File(path) => path.file_name().map(|n| n.to_string_lossy().into_owned()),
        _ => {
            let shown = source.shown();
            let path = shown.split_once("://").map_or("", |(_, rest)| rest);
            let path = path.split_once('/').map_or("", |(_, p)| p);
            let last = path.rsplit('/').next().unwrap_or("");
            let last = thinline_format::storage::percent_decode(last).unwrap_or_default();
            (!last.is_empty()).then_some(last)
        }
    }
}

/// Resolves at the first SIGTERM or SIGINT. The handlers are installed when this is
/// called (inside the runtime), not when the future is first polled, so a signal that
/// arrives in between is not lost (nor kills the process with its default action).
pub(crate) fn shutdown_signal() -> impl Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let signals = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        let (Ok(mut term), Ok(mut int)) = signals else {
            tracing::error!("cannot install signal handlers; stop with SIGKILL");
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_spec_with_name_is_split() {
        assert_eq!(
            parse_image_spec("base=/srv/base.img"),
            (Some("base"), "/srv/base.img")
        );
    }

    #[test]
    fn equals_sign_inside_a_path_is_not_a_name() {
        assert_eq!(parse_image_spec("/srv/a=b.img"), (None, "/srv/a=b.img"));
    }
}
