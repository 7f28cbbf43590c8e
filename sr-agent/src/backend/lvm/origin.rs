//! A template's external origin on an LVM SR: the template's copy-on-read proxy, one
//! process per template (`thinline sr origin`), whose cache is a thin volume of the
//! SR's pool (the template's `thin_id`), served on a unix socket in the SR's home and
//! connected by the kernel's nbd client as `/dev/nbdN`; every attached clone of the
//! template is a thin device with that device as its external origin, so a block is
//! fetched once whichever clone reads it, and the VM's I/O stays in the kernel.
//!
//! The proxy holds `/run/thinline/origin-SR-TEMPLATE.lock` (its pid inside) for as long
//! as it runs: that lock, not a pid file's content, says whether it runs. Its socket is
//! beside it (short paths: a unix socket's is limited), its log in the SR's home.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use thinline_cor::{CorExport, CorOptions, DEFAULT_CHUNK_SIZE, ExportUpstream, cache_len};
use thinline_nbd::server::{ExportSet, Listener, Server, ServerConfig};
use uuid::Uuid;

use super::host::{Pool, RUN_DIR};
use super::layout::BLOCK_BYTES;
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
/// `shutdown`: the body of `thinline sr origin`. Refused if its proxy already runs.
pub async fn serve(
    home: PathBuf,
    template: Uuid,
    templates: Templates,
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
    let listener = Listener::bind_unix(&socket_of(sr, template)).map_err(serve_err)?;
    tracing::info!(template = %opened.shown, cache = %opened.cache.display(), "origin served");
    let served = server.run(vec![listener], shutdown).await;
    // What was fetched is kept: wait for its durability before exiting.
    cor.settle(Duration::from_secs(10)).await;
    let _ = std::fs::remove_file(socket_of(sr, template));
    served.map_err(serve_err)
}

/// What the proxy serves: the template, opened and checked, and its cache device.
struct Opened {
    export: Arc<dyn thinline_nbd::export::Export>,
    shown: String,
    identity: String,
    cache: PathBuf,
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
    let id = t.thin_id.ok_or_else(|| {
        Error::new(
            Code::SrBackendFailure,
            format!("template {} has no cache volume recorded", t.shown()),
        )
    })?;
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
    let (export, identity) = templates.open_decoded(&shown, &full)?;
    changed(&t.identity, &identity)?;
    let pool = Pool::of(&sr.md.sr)?;
    pool.activate()?;
    let cache = pool.attach(template, id, cache_bytes(t.virtual_size)?, false, None)?;
    Ok(Opened {
        export,
        shown,
        identity,
        cache,
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
