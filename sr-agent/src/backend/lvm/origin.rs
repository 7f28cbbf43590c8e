//! A template's external origin on an LVM SR: the template's copy-on-read proxy, one
//! process per template (`thinline sr origin`), whose cache is a thin volume of the
//! SR's pool (the template's `thin_id`), served on a unix socket in the SR's home and
//! connected by the kernel's nbd client as `/dev/nbdN`; every attached clone of the
//! template is a thin device with that device as its external origin, so a block is
//! fetched once whichever clone reads it, and the VM's I/O stays in the kernel.
//!
//! The proxy holds `/run/thinline/origin-SR-TEMPLATE.lock` (its pid inside) for as long
//! as it runs: that lock, not a pid file's content, says whether it runs. Its sockets are
//! beside it (short paths: a unix socket's is limited): the NBD export, and a status
//! socket ([`status`], [`request_hydration`]); its log is in the SR's home.
//!
//! The proxy hydrates its template (in the background, or when `vdi pivot` asks: the
//! SR's `hydrate` setting); once its cache is complete it scrubs it (every chunk
//! against its checksum: a bad one is fetched again) and says it is ready; hydrating in
//! the background, it then runs `thinline vdi pivot --if-ready` itself, which moves the
//! clones onto the cache and stops it (see [`super::pivot`]); otherwise the `vdi
//! pivot` that asked does.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use thinline_cor::{
    CorExport, CorOptions, DEFAULT_CHUNK_SIZE, ExportUpstream, PrefetchOptions, cache_data_end,
    cache_len,
};
use thinline_nbd::server::{ExportSet, Listener, Server, ServerConfig};
use uuid::Uuid;

use super::host::{Pool, RUN_DIR};
use super::layout::BLOCK_BYTES;
use crate::model::Hydrate;
use crate::store::{DIR, Sr};
use crate::template::Templates;
use crate::{Code, Error, Result};

/// The home's directory of the proxies' logs.
fn log_dir(home: &Path) -> PathBuf {
    home.join(DIR).join("run")
}

fn short(uuid: Uuid) -> String {
    uuid.simple().to_string()[..12].to_owned()
}

/// `/run/thinline/origin-SR-TEMPLATE.EXT`.
fn runtime_file(sr: Uuid, template: Uuid, ext: &str) -> PathBuf {
    Path::new(RUN_DIR).join(format!("origin-{}-{}.{ext}", short(sr), short(template)))
}

/// The unix socket the proxy of `template` of SR `sr` serves it on.
pub fn socket_of(sr: Uuid, template: Uuid) -> PathBuf {
    runtime_file(sr, template, "sock")
}

fn lock_of(sr: Uuid, template: Uuid) -> PathBuf {
    runtime_file(sr, template, "lock")
}

fn status_socket_of(sr: Uuid, template: Uuid) -> PathBuf {
    runtime_file(sr, template, "status")
}

/// What a running proxy says of itself.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct OriginStatus {
    /// Its cache's counters and progress.
    pub cache: thinline_cor::Status,
    /// The cache is complete and was scrubbed without a bad chunk: clones may pivot.
    pub ready: bool,
}

/// What the proxy of `template` says, if it runs and answers within 5 s.
pub fn status(sr: Uuid, template: Uuid) -> Option<OriginStatus> {
    ask(sr, template, b"").ok()
}

/// Asks the proxy of `template` to hydrate its template (it goes on in the
/// background); an error if it does not answer.
pub fn request_hydration(sr: Uuid, template: Uuid) -> Result<OriginStatus> {
    ask(sr, template, b"hydrate").map_err(|e| {
        Error::new(
            Code::SrBackendFailure,
            format!("the proxy of template {template} does not answer: {e}"),
        )
    })
}

/// One request on the status socket: `request` (empty, or `hydrate`), then the
/// proxy's [`OriginStatus`].
fn ask(sr: Uuid, template: Uuid, request: &[u8]) -> std::io::Result<OriginStatus> {
    let mut stream = std::os::unix::net::UnixStream::connect(status_socket_of(sr, template))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(request)?;
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut text = String::new();
    stream.take(1 << 20).read_to_string(&mut text)?;
    serde_json::from_str(&text).map_err(std::io::Error::other)
}

/// Largest template an LVM SR caches (the size comes from the template's server).
const MAX_TEMPLATE_BYTES: u64 = 1 << 50;

/// Bytes of the thin volume that caches a `size`-byte template: the cache's layout,
/// in whole pool blocks; a size no pool holds (a lying server) is refused.
pub fn cache_bytes(size: u64) -> Result<u64> {
    if size == 0 || size > MAX_TEMPLATE_BYTES {
        return Err(Error::new(
            Code::TemplateUnreachable,
            format!("a template of {size} bytes cannot be cached (1 byte to 1 PiB)"),
        ));
    }
    Ok(cache_len(size, DEFAULT_CHUNK_SIZE).div_ceil(BLOCK_BYTES) * BLOCK_BYTES)
}

/// The local origin of a `clone_size`-byte clone of the local template `t`: its cache
/// volume's device (made active, read-only, unless it is), which holds the template at
/// its own offsets and zeroes up to [`cache_data_end`], read directly by a clone no
/// larger than that (one device-mapper layer less); for a clone grown beyond it, a
/// read-only linear device of the template's size over it (the cache's metadata
/// follows, and must never be a clone's bytes). Returns its path.
pub fn local_origin(pool: &Pool, t: &crate::model::VdiRecord, clone_size: u64) -> Result<PathBuf> {
    let id = t.thin_id.ok_or_else(|| {
        Error::new(
            Code::SrBackendFailure,
            format!("template {} has no cache volume recorded", t.shown()),
        )
    })?;
    let cache = pool.attach(t.uuid, id, cache_bytes(t.virtual_size)?, true, None)?;
    if t.local {
        // Made writable by a proxy and left so by a pivot that crashed before it ended.
        pool.make_read_only(t.uuid)?;
    }
    if clone_size <= cache_data_end(t.virtual_size) {
        return Ok(cache);
    }
    pool.attach_local_origin(t.uuid, &cache, t.virtual_size)
}

/// Whether the proxy of `template` runs (holds its lock), and its pid (0 while it is
/// starting and has not written it yet).
pub fn running(sr: Uuid, template: Uuid) -> Option<u32> {
    let path = lock_of(sr, template);
    let f = std::fs::File::open(&path).ok()?;
    let free = rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockShared).is_ok();
    if free {
        return None;
    }
    let pid = std::fs::read_to_string(&path).unwrap_or_default();
    Some(pid.trim().parse().unwrap_or(0))
}

/// Serves `template` of the LVM SR whose home is `home` behind its cache until
/// `shutdown`: the body of `thinline sr origin` (`exe`: the binary that pivots the
/// clones once the cache is complete). Refused if its proxy already runs.
pub async fn serve(
    home: PathBuf,
    template: Uuid,
    templates: Templates,
    exe: PathBuf,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let sr = crate::store::lvm_home(&home)?
        .ok_or_else(|| {
            Error::new(
                Code::SrNotFound,
                format!("{} is not an LVM SR's home", home.display()),
            )
        })?
        .uuid;
    crate::lockfile::private_dir(Path::new(RUN_DIR))?;
    let lock_path = lock_of(sr, template);
    let mut lock = crate::lockfile::try_exclusive(&lock_path)?.ok_or_else(|| {
        Error::new(
            Code::VdiInUse,
            format!("the proxy of template {template} already runs"),
        )
    })?;
    lock.set_len(0)
        .and_then(|()| write!(lock, "{}", std::process::id()))
        .map_err(|e| Error::io(format!("cannot write {}", lock_path.display()), &e))?;

    let opened = {
        let (home, templates) = (home.clone(), templates.clone());
        tokio::task::spawn_blocking(move || open(&home, template, &templates))
            .await
            .map_err(|e| Error::new(Code::SrBackendFailure, format!("opening failed: {e}")))??
    };
    let cor = CorExport::open(
        Arc::new(ExportUpstream::new(
            opened.export,
            opened.shown.clone(),
            opened.identity,
        )),
        &opened.cache,
        &CorOptions {
            holder: format!("pid {} (thinline sr origin)", std::process::id()),
            // The cache is the thin volume's /dev/mapper node (a link where udev runs).
            follow_device_links: true,
            prefetch: (opened.hydrate == Hydrate::Background).then(PrefetchOptions::default),
            ..CorOptions::default()
        },
    )
    .map_err(|e| {
        Error::new(
            Code::SrBackendFailure,
            format!(
                "cannot open the cache of template {} on {}: {e}",
                opened.shown,
                opened.cache.display()
            ),
        )
    })?;
    let serve_err = |e: thinline_nbd::Error| {
        Error::new(
            Code::SrBackendFailure,
            format!("cannot serve template {}: {e}", opened.shown),
        )
    };
    let mut exports = ExportSet::new();
    exports
        .add(
            &template.to_string(),
            Arc::new(cor.clone()) as Arc<dyn thinline_nbd::export::Export>,
        )
        .map_err(serve_err)?;
    let server = Server::new(exports, ServerConfig::default()).map_err(serve_err)?;
    // The status socket first: `ensure` returns once the NBD socket answers, and its
    // caller may ask the status socket at once.
    let status_listener =
        thinline_cor::status::bind(&status_socket_of(sr, template)).map_err(|e| serve_err(*e))?;
    let listener = Listener::bind_unix(&socket_of(sr, template)).map_err(serve_err)?;
    let ready = Arc::new(AtomicBool::new(false));
    let answering = tokio::spawn(answer_status(status_listener, cor.clone(), ready.clone()));
    // With hydration on request, the `vdi pivot` that asked for it does the swap.
    let pivot_by_itself = (opened.hydrate == Hydrate::Background).then(|| (exe, home.clone()));
    let completing = tokio::spawn(complete_and_pivot(
        cor.clone(),
        ready,
        pivot_by_itself,
        template,
    ));
    tracing::info!(template = %opened.shown, cache = %opened.cache.display(), "origin served");
    let served = server.run(vec![listener], shutdown).await;
    answering.abort();
    completing.abort();
    let _ = std::fs::remove_file(status_socket_of(sr, template));
    // What was fetched is kept: wait for its durability before exiting.
    cor.settle(Duration::from_secs(10)).await;
    let _ = std::fs::remove_file(socket_of(sr, template));
    served.map_err(serve_err)
}

/// Answers the status socket: reads a request (at most 64 bytes, until the client
/// shuts its side, 5 s at most), starts a hydration if it is `hydrate`, then writes
/// the [`OriginStatus`].
async fn answer_status(listener: tokio::net::UnixListener, cor: CorExport, ready: Arc<AtomicBool>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let (cor, ready) = (cor.clone(), ready.clone());
        tokio::spawn(async move {
            let mut request = Vec::new();
            let mut limited = (&mut stream).take(64);
            let read = limited.read_to_end(&mut request);
            if tokio::time::timeout(Duration::from_secs(5), read)
                .await
                .is_err()
            {
                return;
            }
            if request == b"hydrate" && cor.start_prefetch(PrefetchOptions::default()) {
                tracing::info!("hydration asked for");
            }
            let doc = OriginStatus {
                cache: cor.status(),
                ready: ready.load(Ordering::Acquire),
            };
            let text = serde_json::to_string(&doc).unwrap_or_default();
            let _ = stream.write_all(text.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

/// Waits for the cache to be complete (a failed hydration started again every
/// minute), scrubs it (bad chunks are forgotten and fetched again), says it is ready, and with `pivot_by_itself` (`(exe, home)`) runs `exe vdi
/// pivot --if-ready` until the pivot stops this proxy (again a minute after a pivot
/// that failed).
async fn complete_and_pivot(
    cor: CorExport,
    ready: Arc<AtomicBool>,
    pivot_by_itself: Option<(PathBuf, PathBuf)>,
    template: Uuid,
) {
    let mut retried = Instant::now();
    loop {
        if !cor.cache().is_complete() {
            // A hydration an upstream error stopped starts again a minute later, from
            // what it fetched.
            if cor.status().prefetch == "failed" && retried.elapsed() >= Duration::from_secs(60) {
                retried = Instant::now();
                cor.start_prefetch(PrefetchOptions::default());
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        let scrubbing = cor.clone();
        let report = tokio::task::spawn_blocking(move || scrubbing.cache().scrub()).await;
        match report {
            Ok(Ok(r)) if r.bad.is_empty() => break,
            Ok(Ok(r)) => {
                tracing::warn!(
                    bad = r.bad.len(),
                    "scrub found bad chunks: fetching them again"
                );
                let bad: Vec<u64> = r.bad.iter().map(|&(chunk, _)| chunk).collect();
                if let Err(e) = cor.cache().clear_chunks(&bad) {
                    tracing::error!(error = %e, "cannot forget the bad chunks");
                    tokio::time::sleep(Duration::from_secs(60)).await;
                }
                cor.start_prefetch(PrefetchOptions::default());
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot scrub the cache");
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
            Err(_) => return,
        }
    }
    ready.store(true, Ordering::Release);
    let Some((exe, home)) = pivot_by_itself else {
        tracing::info!("the cache is complete and scrubbed: ready for vdi pivot");
        return;
    };
    tracing::info!("the cache is complete and scrubbed: pivoting the clones onto it");
    loop {
        let mut pivot = std::process::Command::new(&exe);
        pivot
            .args(["vdi", "pivot", "--if-ready", "--sr"])
            .arg(&home)
            .arg(template.to_string())
            .stdin(std::process::Stdio::null());
        // Its output goes to this proxy's log; it stops this proxy when it is done
        // (never waited for by a blocking thread, which would hold up that stop).
        match pivot.spawn() {
            Ok(mut child) => loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                match child.try_wait() {
                    Ok(None) => continue,
                    Ok(Some(status)) => {
                        tracing::warn!(%status, "the pivot left this proxy running");
                    }
                    Err(e) => tracing::error!(error = %e, "cannot wait for the pivot"),
                }
                break;
            },
            Err(e) => tracing::error!(error = %e, "cannot run {}", exe.display()),
        }
        tokio::time::sleep(Duration::from_secs(60)).await;
    }
}

/// What the proxy serves: the template, opened and checked, and its cache device.
struct Opened {
    export: Arc<dyn thinline_nbd::export::Export>,
    shown: String,
    identity: String,
    cache: PathBuf,
    hydrate: Hydrate,
}

/// Opens `template` (refused if it is no longer what was introduced) and makes its
/// cache volume's device active.
fn open(home: &Path, template: Uuid, templates: &Templates) -> Result<Opened> {
    let sr = Sr::read(home)?;
    let t = sr
        .md
        .get(template)
        .filter(|t| t.is_template())
        .ok_or_else(|| {
            Error::new(
                Code::VdiNotFound,
                format!("no template {template} in SR {}", sr.md.sr.uuid),
            )
        })?;
    if t.is_local() {
        // Its clones read the cache directly: nothing may write it any more.
        return Err(Error::new(
            Code::VdiInUse,
            format!(
                "template {} is local (or being pivoted): it needs no proxy",
                t.shown()
            ),
        ));
    }
    let id = t.thin_id.ok_or_else(|| {
        Error::new(
            Code::SrBackendFailure,
            format!("template {} has no cache volume recorded", t.shown()),
        )
    })?;
    let hydrate = sr.md.sr.lvm.as_ref().map(|l| l.hydrate).unwrap_or_default();
    let shown = t.uri.clone().unwrap_or_default();
    let creds = crate::template::credentials(home)?;
    let full = creds
        .get(&template)
        .cloned()
        .unwrap_or_else(|| shown.clone());
    let now = templates.pin(&shown, &full)?;
    let changed = |pinned: &Option<String>, now: &str| match crate::template::changed(
        &shown,
        pinned.as_deref(),
        now,
    ) {
        Some(reason) => Err(Error::new(Code::TemplateUnreachable, reason)),
        None => Ok(()),
    };
    changed(&t.pin, &now)?;
    let (export, identity) = templates.open_decoded(&shown, &full, t.format)?;
    changed(&t.identity, &identity)?;
    let pool = Pool::of(&sr.md.sr)?;
    pool.activate()?;
    let cache = pool.attach(template, id, cache_bytes(t.virtual_size)?, false, None)?;
    Ok(Opened {
        export,
        shown,
        identity,
        cache,
        hydrate,
    })
}

/// A running proxy's socket, and whether this call started it (then no nbd device
/// connected before belongs to it).
#[derive(Debug)]
pub struct Running {
    pub socket: PathBuf,
    pub started: bool,
}

/// Starts the proxy of `template` of SR `sr` (home `home`; `exe sr origin`) unless it
/// runs, and waits until its socket answers.
pub fn ensure(home: &Path, sr: Uuid, template: Uuid, exe: &Path) -> Result<Running> {
    let socket = socket_of(sr, template);
    let answers = || std::os::unix::net::UnixStream::connect(&socket).is_ok();
    if running(sr, template).is_some() && answers() {
        return Ok(Running {
            socket,
            started: false,
        });
    }
    crate::lockfile::private_dir(Path::new(RUN_DIR))?;
    let run = log_dir(home);
    std::fs::create_dir_all(&run)
        .map_err(|e| Error::io(format!("cannot create {}", run.display()), &e))?;
    let log_path = run.join(format!("origin-{}.log", short(template)));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| Error::io(format!("cannot open {}", log_path.display()), &e))?;
    let err_log = log
        .try_clone()
        .map_err(|e| Error::io("cannot duplicate the log", &e))?;
    let mut child = None;
    if running(sr, template).is_none() {
        use std::os::unix::process::CommandExt;
        child = Some(
            std::process::Command::new(exe)
                .args(["sr", "origin", "--sr"])
                .arg(home)
                .arg(template.to_string())
                // A crash test's step is the agent's, not the proxy's or its pivot's.
                .env_remove("THINLINE_SR_CRASH_AT")
                .stdin(std::process::Stdio::null())
                .stdout(log)
                .stderr(err_log)
                .process_group(0)
                .spawn()
                .map_err(|e| Error::io(format!("cannot start {} sr origin", exe.display()), &e))?,
        );
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if answers() {
            return Ok(Running {
                socket,
                started: true,
            });
        }
        if let Some(Ok(Some(status))) = child.as_mut().map(|c| c.try_wait()) {
            let said = std::fs::read_to_string(&log_path).unwrap_or_default();
            let last = said
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("");
            return Err(Error::new(
                Code::TemplateUnreachable,
                format!("the proxy of template {template} exited ({status}): {last}"),
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(Error::new(
        Code::SrBackendFailure,
        format!(
            "the proxy of template {template} did not answer on {} within 60 s (see {})",
            socket.display(),
            log_path.display()
        ),
    ))
}

/// Stops the proxy of `template` (SIGTERM; it keeps what it fetched) and waits for it.
pub fn stop(sr: Uuid, template: Uuid) -> Result<()> {
    let deadline_start = Instant::now() + Duration::from_secs(5);
    let pid = loop {
        match running(sr, template) {
            None => return Ok(()),
            Some(0) if Instant::now() < deadline_start => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Some(pid) => break pid,
        }
    };
    let pid = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .ok_or_else(|| {
            Error::new(
                Code::SrBackendFailure,
                format!("the proxy of template {template} wrote no pid"),
            )
        })?;
    let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if running(sr, template).is_none() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(Error::new(
        Code::SrBackendFailure,
        format!("the proxy of template {template} did not stop within 30 s"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cache_volume_holds_the_template_and_its_map_in_whole_blocks_and_absurd_sizes_are_refused()
    {
        for size in [1, 4096, 1 << 20, (1 << 30) + 7] {
            let bytes = cache_bytes(size).unwrap();
            assert!(bytes >= cache_len(size, DEFAULT_CHUNK_SIZE), "{size}");
            assert!(bytes.is_multiple_of(BLOCK_BYTES), "{size}");
        }
        for size in [0, MAX_TEMPLATE_BYTES + 1, u64::MAX] {
            assert_eq!(
                cache_bytes(size).unwrap_err().code,
                Code::TemplateUnreachable
            );
        }
    }
}
