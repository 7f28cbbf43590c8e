//! Scheme handlers: the extension point for template locations without a built-in
//! source (`smb://`, a site-specific store, …).
//!
//! For a URI of scheme `S`, the executable `S` in the handler directory (default
//! `/usr/libexec/thinline/storage/`) is run as `S attach URI`. It makes the template
//! reachable and prints, as the first line on stdout, either an absolute local path (a
//! file or block device) or an `nbd://` / `nbd+unix://` URI to read it from, then exits
//! 0. When the export goes away, `S detach URI` runs. A non-zero exit fails the open
//! with the handler's stderr in the message. The contract is documented in
//! `docs/thinline-storage-handler.7.md`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use thinline_format::{FileStorage, Storage};
use tokio::runtime::Handle;

use crate::RemoteConfig;
use crate::builtin::open_storage;
use crate::redact::redact;
use crate::{Error, Result};

/// Longest a handler may take to attach or detach.
pub const HANDLER_TIMEOUT: Duration = Duration::from_secs(300);

/// Runs `scheme attach uri` and opens what it names; the returned storage runs
/// `scheme detach uri` when the last reference to it goes away.
pub fn attach(
    scheme: &str,
    uri: &str,
    config: &Arc<RemoteConfig>,
    handle: &Handle,
) -> Result<Arc<dyn Storage>> {
    let shown = redact(uri);
    let fail = |reason: String| Error::UnsupportedSource {
        uri: shown.clone(),
        reason,
    };
    if scheme.is_empty()
        || !scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
    {
        return Err(fail(format!("{scheme:?} is not a URI scheme")));
    }
    let program = config.handler_dir.join(scheme);
    if !program.is_file() {
        return Err(fail(format!(
            "no built-in source for the {scheme:?} scheme and no handler {} (see thinline-storage-handler(7))",
            program.display()
        )));
    }
    let output = run(&program, "attach", uri).map_err(fail)?;
    let target = output
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("")
        .to_owned();
    let guard = Detach {
        program: program.clone(),
        uri: uri.to_owned(),
    };
    let inner: Arc<dyn Storage> = if ["nbd://", "nbd+unix://", "nbds://", "nbds+unix://"]
        .iter()
        .any(|scheme| target.starts_with(scheme))
    {
        open_storage(&target, config, handle)?
    } else if Path::new(&target).is_absolute() {
        FileStorage::open(Path::new(&target))?
    } else {
        return Err(fail(format!(
            "the handler {} printed {:?}, which is neither an absolute path nor an nbd[s]:// or nbd[s]+unix:// URI",
            program.display(),
            redact(&target)
        )));
    };
    tracing::info!(uri = %shown, target = %redact(&target), "attached through {}", program.display());
    Ok(Arc::new(HandlerStorage {
        inner,
        name: shown,
        _detach: guard,
    }))
}

/// Runs `program op uri` with a timeout; its stdout, or why it failed.
fn run(program: &Path, op: &str, uri: &str) -> std::result::Result<String, String> {
    let shown = redact(uri);
    let mut child = Command::new(program)
        .arg(op)
        .arg(uri)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run the handler {}: {e}", program.display()))?;
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let out_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stdout.read_to_end(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stderr.read_to_end(&mut s);
        s
    });
    let started = std::time::Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() > HANDLER_TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "the handler {} did not finish `{op}` within {HANDLER_TIMEOUT:?}",
                    program.display()
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("waiting for the handler failed: {e}")),
        }
    };
    let stdout = String::from_utf8_lossy(&out_reader.join().unwrap_or_default()).into_owned();
    let mut stderr = String::from_utf8_lossy(&err_reader.join().unwrap_or_default())
        .replace(uri, &shown)
        .trim()
        .to_owned();
    for secret in crate::redact::secrets(uri) {
        stderr = stderr.replace(secret, "<redacted>");
    }
    if !status.success() {
        let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(format!(
            "the handler {} failed `{op}` ({status}){}",
            program.display(),
            if tail.is_empty() {
                String::new()
            } else {
                format!(": {}", tail.join(" / "))
            }
        ));
    }
    Ok(stdout)
}

/// Runs `detach` when dropped.
#[derive(Debug)]
struct Detach {
    program: PathBuf,
    uri: String,
}

impl Drop for Detach {
    fn drop(&mut self) {
        match run(&self.program, "detach", &self.uri) {
            Ok(_) => tracing::info!(uri = %redact(&self.uri), "detached"),
            Err(e) => tracing::error!(uri = %redact(&self.uri), "{e}"),
        }
    }
}

/// The storage a handler made reachable, detached when dropped.
#[derive(Debug)]
struct HandlerStorage {
    inner: Arc<dyn Storage>,
    name: String,
    _detach: Detach,
}

impl Storage for HandlerStorage {
    fn name(&self) -> &str {
        &self.name
    }

    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        self.inner.read_at(buf, offset)
    }

    fn next_data(&self, offset: u64) -> std::io::Result<Option<u64>> {
        self.inner.next_data(offset)
    }

    fn next_hole(&self, offset: u64) -> std::io::Result<u64> {
        self.inner.next_hole(offset)
    }

    fn open_related(&self, name: &str) -> thinline_format::Result<Arc<dyn Storage>> {
        self.inner.open_related(name)
    }

    fn identity(&self) -> String {
        self.inner.identity()
    }

    fn data_path(&self) -> thinline_format::DataPath {
        self.inner.data_path()
    }
}
