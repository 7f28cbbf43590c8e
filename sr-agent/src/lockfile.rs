//! Lock files: one `flock`ed file per thing only one process may change at a time (an
//! SR, the registry, an LVM SR's pool activation). The lock goes with the process, so
//! kill -9 never leaves one held.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::{Error, Result};

/// Takes the exclusive lock of `path` (made if missing), waiting for its holder; held
/// until the file is dropped.
pub fn exclusive(path: &Path) -> Result<File> {
    let f = open(path)?;
    rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| Error::io(format!("cannot lock {}", path.display()), &e.into()))?;
    Ok(f)
}

/// The exclusive lock of `path` (made if missing) if nobody holds it: a process that
/// runs only once (a daemon, a template's proxy) holds it for its whole life.
pub fn try_exclusive(path: &Path) -> Result<Option<File>> {
    let f = open(path)?;
    let taken = rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive);
    Ok(taken.is_ok().then_some(f))
}

fn open(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(path)
        .map_err(|e| Error::io(format!("cannot open {}", path.display()), &e))
}
