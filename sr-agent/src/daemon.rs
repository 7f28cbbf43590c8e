//! The SR's serving daemon (`thinline sr serve`): one long-lived process per SR that
//! serves every attached VDI over NBD, each on its own unix socket in
//! `.thinline-sr/run/`, and takes attach and detach requests on a control socket there.
//! A snapshot, clone or resize of a VDI it serves is made here too, while that VDI's
//! export is paused ([`crate::pausable`]): nothing is in flight, every acknowledged
//! write is flushed, and the image is closed while its files change.
//!
//! One daemon per SR rather than a process per attach: a template's copy-on-read cache
//! must have exactly one owner and be shared by every clone of it, and a daemon that
//! owns all of them is that owner; a VDI's writer (and its qcow2 lock) lives in one
//! known process; and `vdi detach` stops one VDI's server inside it without touching
//! the others. The attach state is in the SR's metadata, so a daemon that starts (after
//! a crash, or a reboot through its systemd unit) serves every attached VDI again: what
//! a clone wrote and flushed is in its qcow2 file and survives.
//!
//! Control protocol: one JSON request per line, one JSON response per line
//! (`{"ok": …}` or `{"error": {"code", "message"}}`).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use thinline_format::OpenOptions;
use thinline_nbd::image::{ImageExport, ImageOptions};
use thinline_nbd::server::{ExportSet, Listener, Server, ServerConfig};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::model::{Attached, DaemonStatus, VdiType};
use crate::pausable::PausableExport;
use crate::store::{DIR, Sr};
use crate::template::Templates;
use crate::{Code, Error, Result};

/// The daemon's directory inside the agent's: sockets, its lock, its log.
pub const RUN_DIR: &str = "run";
const CONTROL: &str = "control.sock";
const DAEMON_LOCK: &str = "daemon.lock";
/// The log of a daemon `vdi attach` started.
pub const LOG: &str = "daemon.log";

/// Where `sr`'s daemon keeps its sockets.
pub fn run_dir(sr: &Path) -> PathBuf {
    sr.join(DIR).join(RUN_DIR)
}

/// The NBD socket of VDI `uuid` (named by the first 12 hex digits of its UUID: a unix
/// socket's path is limited to 107 bytes).
pub fn socket_of(sr: &Path, uuid: Uuid) -> PathBuf {
    run_dir(sr).join(format!("{}.sock", &uuid.simple().to_string()[..12]))
}

/// Longest path a unix socket can have.
const MAX_SOCKET_PATH: usize = 107;

/// Whether a daemon runs for `sr` (it holds `run/daemon.lock`), whether or not it
/// answers.
pub fn running(sr: &Path) -> bool {
    let Ok(f) = std::fs::File::open(run_dir(sr).join(DAEMON_LOCK)) else {
        return false;
    };
    rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockShared).is_err()
}

/// The NBD URI of VDI `uuid` (its export is named by its UUID).
pub fn nbd_uri(sr: &Path, uuid: Uuid) -> String {
    format!(
        "nbd+unix:///{uuid}?socket={}",
        socket_of(sr, uuid).display()
    )
}

/// A request to the daemon.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    /// Serve a VDI (again: attaching an attached VDI answers its URI).
    Attach { vdi: Uuid },
    /// Stop serving a VDI.
    Detach { vdi: Uuid },
    /// The daemon's pid and what it serves.
    Status,
    /// Stop serving everything and exit (the attach state stays recorded).
    Shutdown,
    /// Make `change` to a VDI this daemon may be serving; answers the new VDI's view.
    Change { vdi: Uuid, change: Change },
    /// Close the cache of a forgotten template (its URI as shown).
    ForgetTemplate { uri: String },
}

/// A change to a disk's files that its open image must not see happen.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    /// `vdi snapshot` or `vdi clone`: the disk's file becomes the snapshot, or a layer
    /// under the disk and the clone; the disk goes on in a new overlay.
    Copy {
        kind: CopyKind,
        name_label: Option<String>,
    },
    /// `vdi resize`: the disk grows to `size` bytes.
    Resize { size: u64 },
}

/// Which copy [`Change::Copy`] makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CopyKind {
    /// A read-only point-in-time copy.
    Snapshot,
    /// A writable disk.
    Clone,
}

/// How the daemon makes a [`Change`] to the SR it has locked: the SR's own operations,
/// handed to [`run`] by its caller (so this module does not depend on them). Answers
/// what the command prints.
pub type Apply = Arc<dyn Fn(&mut Sr, Uuid, &Change) -> Result<serde_json::Value> + Send + Sync>;

/// Sends `request` to the daemon of `sr`; `None` if no daemon took it (see
/// [`running`] to tell a daemon that is not there from one that does not listen). A
/// daemon that took it and then stopped (or timed out) before answering is an error:
/// what it did is unknown, so the caller must not do it again in its place.
pub fn request(sr: &Path, request: &Request) -> Option<Result<serde_json::Value>> {
    let wait = match request {
        // Answered at once by a daemon that runs: never wait long for it.
        Request::Status | Request::Shutdown => Duration::from_secs(5),
        Request::Attach { .. }
        | Request::Detach { .. }
        | Request::Change { .. }
        | Request::ForgetTemplate { .. } => Duration::from_secs(120),
    };
    let stream = UnixStream::connect(run_dir(sr).join(CONTROL)).ok()?;
    let _ = stream.set_read_timeout(Some(wait));
    let mut line = serde_json::to_string(request).expect("serializes");
    line.push('\n');
    (&stream).write_all(line.as_bytes()).ok()?;
    let mut answer = String::new();
    let read = BufReader::new(&stream).read_line(&mut answer);
    let Some(v) = read
        .ok()
        .and_then(|_| serde_json::from_str::<serde_json::Value>(&answer).ok())
    else {
        return Some(Err(Error::new(
            Code::SrBackendFailure,
            format!(
                "the SR daemon of {} took the request but stopped before answering (it may have died while working on it): `thinline sr check` says what state the SR is in",
                sr.display()
            ),
        )));
    };
    if let Some(ok) = v.get("ok") {
        return Some(Ok(ok.clone()));
    }
    let code = v["error"]["code"]
        .as_str()
        .and_then(Code::parse)
        .unwrap_or(Code::SrBackendFailure);
    let message = v["error"]["message"]
        .as_str()
        .unwrap_or("the daemon failed");
    Some(Err(Error::new(code, message)))
}

/// Makes sure a daemon serves `sr`: if none answers, starts `exe sr serve --sr SR` in
/// the background (its own session, output to `run/daemon.log`) and waits for it.
pub fn ensure(sr: &Path, exe: &Path) -> Result<()> {
    let control = run_dir(sr).join(CONTROL);
    // The control socket, and the VDIs' next to it, must fit a unix socket's path.
    if control.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(Error::new(
            Code::InvalidArgument,
            format!(
                "the SR's sockets ({}) would be longer than the {MAX_SOCKET_PATH} bytes a unix socket may have: put the SR at a shorter path",
                control.display()
            ),
        ));
    }
    if request(sr, &Request::Status).is_some_and(|r| r.is_ok()) {
        return Ok(());
    }
    if running(sr) {
        // Starting (or busy): wait for it rather than start another.
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if request(sr, &Request::Status).is_some_and(|r| r.is_ok()) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        return Err(Error::new(
            Code::SrBackendFailure,
            format!("the SR daemon of {} runs but does not answer", sr.display()),
        ));
    }
    let run = run_dir(sr);
    std::fs::create_dir_all(&run)
        .map_err(|e| Error::io(format!("cannot create {}", run.display()), &e))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(run.join(LOG))
        .map_err(|e| Error::io(format!("cannot open {}", run.join(LOG).display()), &e))?;
    let err_log = log
        .try_clone()
        .map_err(|e| Error::io("cannot duplicate the log", &e))?;
    use std::os::unix::process::CommandExt;
    let mut child = std::process::Command::new(exe)
        .args(["sr", "serve", "--sr"])
        .arg(sr)
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(err_log)
        .process_group(0)
        .spawn()
        .map_err(|e| Error::io(format!("cannot start {} sr serve", exe.display()), &e))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if request(sr, &Request::Status).is_some_and(|r| r.is_ok()) {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait()
            && !running(sr)
        {
            // (Exited because another agent's daemon won the race: wait for that one.)
            return Err(Error::new(
                Code::SrBackendFailure,
                format!(
                    "the SR daemon exited ({status}) before it served; see {}",
                    run.join(LOG).display()
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(Error::new(
        Code::SrBackendFailure,
        format!(
            "the SR daemon did not answer within 30 s; see {}",
            run.join(LOG).display()
        ),
    ))
}

/// One VDI being served.
#[derive(Debug)]
struct Served {
    export: Arc<PausableExport>,
    stop: CancellationToken,
    /// Ends when the server has drained and flushed; its error, if the flush failed.
    task: tokio::task::JoinHandle<std::result::Result<(), String>>,
}

/// The daemon's state, owned here.
struct Daemon {
    sr: PathBuf,
    /// The SR's templates behind their copy-on-read caches (this daemon owns them).
    caches: Arc<crate::cached::Caches>,
    served: Mutex<HashMap<Uuid, Served>>,
    /// Serializes attach, detach and changes (each takes the SR's lock, then changes
    /// `served`).
    changes: tokio::sync::Mutex<()>,
    apply: Apply,
    stop: CancellationToken,
}

fn blocking_err(e: tokio::task::JoinError) -> Error {
    Error::new(Code::SrBackendFailure, format!("a daemon task failed: {e}"))
}

impl Daemon {
    async fn attach(&self, vdi: Uuid, record_it: bool) -> Result<Attached> {
        let _turn = self.changes.lock().await;
        let socket = socket_of(&self.sr, vdi);
        let answer = Attached {
            uuid: vdi,
            nbd_uri: Some(nbd_uri(&self.sr, vdi)),
            socket: Some(socket.display().to_string()),
            device: None,
        };
        if self.served.lock().expect("not poisoned").contains_key(&vdi) {
            return Ok(answer);
        }
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(Error::new(
                Code::InvalidArgument,
                format!(
                    "the NBD socket {} would be longer than the {MAX_SOCKET_PATH} bytes a unix socket may have: put the SR at a shorter path",
                    socket.display()
                ),
            ));
        }
        let export = self.open_served(vdi).await?;
        let mut exports = ExportSet::new();
        let serve_err = |e: thinline_nbd::Error| {
            Error::new(
                Code::SrBackendFailure,
                format!("cannot serve VDI {vdi}: {e}"),
            )
        };
        let export = Arc::new(PausableExport::new(Arc::new(export)));
        exports
            .add(
                &vdi.to_string(),
                Arc::clone(&export) as Arc<dyn thinline_nbd::export::Export>,
            )
            .map_err(serve_err)?;
        let server = Server::new(exports, ServerConfig::default()).map_err(serve_err)?;
        let listener = Listener::bind_unix(&socket).map_err(serve_err)?;
        let stop = self.stop.child_token();
        let until = stop.clone();
        let task = tokio::spawn(async move {
            server
                .run(vec![listener], until.cancelled_owned())
                .await
                .map_err(|e| {
                    tracing::error!(%vdi, error = %e, "serving the VDI ended with an error");
                    e.to_string()
                })
        });
        // Recorded only once it is served: a failure above leaves it detached.
        if record_it {
            let sr_path = self.sr.clone();
            let recorded = tokio::task::spawn_blocking(move || -> Result<()> {
                let mut sr = Sr::open(&sr_path)?;
                let rec = sr.md.get_mut(vdi).ok_or_else(|| {
                    Error::new(
                        Code::VdiNotFound,
                        format!("VDI {vdi} went away while it was being attached"),
                    )
                })?;
                if !rec.attached {
                    rec.attached = true;
                    sr.save()?;
                }
                Ok(())
            })
            .await
            .map_err(blocking_err)
            .and_then(|r| r);
            if let Err(e) = recorded {
                stop.cancel();
                let _ = task.await;
                return Err(e);
            }
        }
        tracing::info!(%vdi, uri = answer.nbd_uri.as_deref().unwrap_or_default(), "attached");
        self.served
            .lock()
            .expect("not poisoned")
            .insert(vdi, Served { export, stop, task });
        Ok(answer)
    }

    async fn detach(&self, vdi: Uuid) -> Result<serde_json::Value> {
        let _turn = self.changes.lock().await;
        let served = self.served.lock().expect("not poisoned").remove(&vdi);
        let mut flushed = Ok(());
        if let Some(s) = served {
            s.stop.cancel();
            flushed = s.task.await.map_err(|e| e.to_string()).and_then(|r| r);
        }
        let sr_path = self.sr.clone();
        tokio::task::spawn_blocking(move || detach_record(&sr_path, vdi))
            .await
            .map_err(blocking_err)??;
        tracing::info!(%vdi, "detached");
        flushed.map_err(|e| {
            Error::new(
                Code::SrBackendFailure,
                format!("VDI {vdi} is detached, but its last flush failed: {e}"),
            )
        })?;
        Ok(serde_json::json!({ "uuid": vdi }))
    }

    /// Opens `vdi` for serving, on a thread that may block.
    async fn open_served(&self, vdi: Uuid) -> Result<ImageExport> {
        let path = self.sr.clone();
        let caches = Arc::clone(&self.caches);
        // With the SR's lock: a change made without a daemon is never half seen.
        tokio::task::spawn_blocking(move || open_served(&Sr::open(&path)?, &caches, vdi))
            .await
            .map_err(blocking_err)?
    }

    /// Makes `change` to `vdi`. A VDI served here is paused first (requests in flight
    /// finish, acknowledged writes are flushed, its image closed) and served again on
    /// its files as they are after the change, whether it was made or refused.
    async fn change(&self, vdi: Uuid, change: Change) -> Result<serde_json::Value> {
        let _turn = self.changes.lock().await;
        let served = self
            .served
            .lock()
            .expect("not poisoned")
            .get(&vdi)
            .map(|s| Arc::clone(&s.export));
        // The SR's lock before the pause, held until the VDI is served again: a command
        // that holds the lock may be waiting for this VDI (flushing its device), which
        // a pause would stall.
        let path = self.sr.clone();
        let mut sr = tokio::task::spawn_blocking(move || Sr::open(&path))
            .await
            .map_err(blocking_err)??;
        let (apply, caches) = (Arc::clone(&self.apply), Arc::clone(&self.caches));
        let Some(export) = served else {
            return tokio::task::spawn_blocking(move || apply(&mut sr, vdi, &change))
                .await
                .map_err(blocking_err)?;
        };
        let paused = export.pause().await.map_err(|e| {
            Error::new(
                Code::SrBackendFailure,
                format!("nothing was changed: VDI {vdi} could not be flushed: {e}"),
            )
        })?;
        let (made, reopened) = tokio::task::spawn_blocking(move || {
            let made = apply(&mut sr, vdi, &change);
            (made, open_served(&sr, &caches, vdi))
        })
        .await
        .map_err(blocking_err)?;
        match reopened {
            Ok(image) => paused.resume(Arc::new(image)),
            Err(e) => {
                tracing::error!(%vdi, error = %e, "cannot serve the VDI again after a change");
                let done = if made.is_ok() { "was made" } else { "failed" };
                return Err(Error::new(
                    e.code,
                    format!(
                        "the change {done}, but VDI {vdi} cannot be served again (its clients get EIO; detach and attach it): {}",
                        e.message
                    ),
                ));
            }
        }
        made
    }

    async fn handle(&self, request: Request) -> Result<serde_json::Value> {
        fn json(v: impl Serialize) -> serde_json::Value {
            serde_json::to_value(v).expect("serializes")
        }
        match request {
            Request::Attach { vdi } => self.attach(vdi, true).await.map(|a| json(&a)),
            Request::Detach { vdi } => self.detach(vdi).await,
            Request::Change { vdi, change } => self.change(vdi, change).await,
            Request::ForgetTemplate { uri } => {
                self.caches.forget(&uri).await;
                Ok(serde_json::json!({}))
            }
            Request::Status => {
                let mut serving: Vec<Uuid> = self
                    .served
                    .lock()
                    .expect("not poisoned")
                    .keys()
                    .copied()
                    .collect();
                serving.sort();
                Ok(json(&DaemonStatus {
                    pid: std::process::id(),
                    serving,
                    fetches_in_flight: self.caches.fetches_in_flight(),
                    caches: self.caches.open_templates(),
                }))
            }
            Request::Shutdown => {
                self.stop.cancel();
                Ok(serde_json::json!({}))
            }
        }
    }
}

/// Opens VDI `vdi` of the SR `sr` (locked) for serving: a disk read-write, a snapshot
/// read-only, templates under it through their copy-on-read caches.
fn open_served(sr: &Sr, caches: &Arc<crate::cached::Caches>, vdi: Uuid) -> Result<ImageExport> {
    let rec = sr.vdi(vdi)?;
    if rec.is_template() {
        return Err(Error::new(
            Code::VdiIsTemplate,
            format!(
                "VDI {vdi} ({}) is a template: clone it and attach the clone",
                rec.name_label
            ),
        ));
    }
    let file = sr.file(rec.file.as_deref().unwrap_or_default());
    let options = ImageOptions {
        open: OpenOptions {
            backing_opener: Some(caches.opener(crate::template::header_names(sr)?)),
            ..OpenOptions::default()
        },
        ..ImageOptions::default()
    };
    let what = format!("cannot serve {}", file.display());
    if rec.kind == VdiType::Disk {
        ImageExport::open_writable(&file, &options)
    } else {
        ImageExport::open(&file, &options)
    }
    .map_err(|e| Error::new(Code::SrBackendFailure, format!("{what}: {e}")))
}

/// Kernel devices recorded for this SR's VDIs were connected to a daemon that is gone
/// (after a crash or a reboot): each is disconnected if it can be, and forgotten, so
/// `vdi attach --device` connects a live one and never answers a stale one.
fn forget_devices(sr_path: &Path) {
    let Ok(mut sr) = Sr::open(sr_path) else {
        return;
    };
    let mut changed = false;
    for v in sr.md.vdis.iter_mut() {
        let Some(dev) = v.device.take() else {
            continue;
        };
        changed = true;
        let path = Path::new(&dev);
        if crate::device::is_nbd(path)
            && let Err(e) = crate::device::disconnect(path)
        {
            tracing::warn!(vdi = %v.uuid, device = %dev, error = %e, "a device of the previous daemon stays connected");
        }
    }
    if changed && let Err(e) = sr.save() {
        tracing::error!(error = %e, "cannot forget the previous daemon's devices");
    }
}

/// Marks `vdi` detached in `sr`'s metadata and removes its socket.
pub fn detach_record(sr_path: &Path, vdi: Uuid) -> Result<()> {
    let mut sr = Sr::open(sr_path)?;
    sr.vdi(vdi)?;
    let socket = socket_of(sr_path, vdi);
    if socket.exists() {
        std::fs::remove_file(&socket)
            .map_err(|e| Error::io(format!("cannot remove {}", socket.display()), &e))?;
    }
    let rec = sr.md.get_mut(vdi).expect("found");
    if rec.attached {
        rec.attached = false;
        sr.save()?;
    }
    Ok(())
}

/// Runs the daemon of the SR at `sr` until `shutdown` completes or a `Shutdown`
/// request comes: serves every VDI recorded as attached, then takes requests (`ready`
/// is called once its control socket accepts them).
pub async fn run(
    sr: PathBuf,
    templates: Templates,
    apply: Apply,
    ready: impl FnOnce(),
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    if crate::store::lvm_home(&sr)?.is_some() {
        return Err(Error::new(
            Code::InvalidArgument,
            format!(
                "{} is an LVM SR: its VDIs are attached as device-mapper devices, with no daemon",
                sr.display()
            ),
        ));
    }
    let run = run_dir(&sr);
    std::fs::create_dir_all(&run)
        .map_err(|e| Error::io(format!("cannot create {}", run.display()), &e))?;
    let lock = crate::lockfile::try_exclusive(&run.join(DAEMON_LOCK))?.ok_or_else(|| {
        Error::new(
            Code::VdiInUse,
            format!("another daemon already serves the SR at {}", sr.display()),
        )
    })?;
    let control_path = run.join(CONTROL);
    let control = thinline_nbd::server::bind_unix_socket(&control_path, 0o600)
        .and_then(|l| {
            l.set_nonblocking(true)
                .map_err(|e| thinline_nbd::Error::Listen {
                    address: control_path.display().to_string(),
                    source: e,
                })?;
            tokio::net::UnixListener::from_std(l).map_err(|e| thinline_nbd::Error::Listen {
                address: control_path.display().to_string(),
                source: e,
            })
        })
        .map_err(|e| Error::new(Code::SrBackendFailure, e.to_string()))?;
    let caches = crate::cached::Caches::new(sr.join(DIR).join(crate::cached::CACHES), templates)?;
    let daemon = Arc::new(Daemon {
        sr: sr.clone(),
        caches: Arc::new(caches),
        served: Mutex::new(HashMap::new()),
        changes: tokio::sync::Mutex::new(()),
        apply,
        stop: CancellationToken::new(),
    });
    forget_devices(&sr);
    // Serve again what was attached when the last daemon stopped, while requests are
    // already answered (status never waits for it).
    let attached: Vec<Uuid> = {
        let sr = Sr::read(&sr)?;
        sr.md
            .vdis
            .iter()
            .filter(|v| v.attached)
            .map(|v| v.uuid)
            .collect()
    };
    let again = Arc::clone(&daemon);
    tokio::spawn(async move {
        for vdi in attached {
            if let Err(e) = again.attach(vdi, false).await {
                tracing::error!(%vdi, error = %e, "cannot serve an attached VDI again");
            }
        }
    });
    tracing::info!(sr = %sr.display(), control = %control_path.display(), "serving");
    ready();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            () = daemon.stop.cancelled() => break,
            accepted = control.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let daemon = Arc::clone(&daemon);
                tokio::spawn(async move {
                    let (r, mut w) = stream.into_split();
                    let mut lines = tokio::io::BufReader::new(r).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        let answer = match serde_json::from_str::<Request>(&line) {
                            Ok(req) => daemon.handle(req).await,
                            Err(e) => Err(Error::new(Code::InvalidArgument, format!("bad request: {e}"))),
                        };
                        let v = match answer {
                            Ok(ok) => serde_json::json!({ "ok": ok }),
                            Err(e) => serde_json::json!({ "error": { "code": e.code.as_str(), "message": e.message } }),
                        };
                        let mut out = v.to_string();
                        out.push('\n');
                        if w.write_all(out.as_bytes()).await.is_err() {
                            break;
                        }
                    }
                });
            }
        }
    }
    tracing::info!("stopping: every VDI's server drains and flushes");
    daemon.stop.cancel();
    let served: Vec<Served> = daemon
        .served
        .lock()
        .expect("not poisoned")
        .drain()
        .map(|(_, s)| s)
        .collect();
    for s in served {
        let _ = s.task.await;
    }
    daemon.caches.close().await;
    let _ = std::fs::remove_file(&control_path);
    drop(lock);
    Ok(())
}
