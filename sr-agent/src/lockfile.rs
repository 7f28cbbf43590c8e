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

/// Opens (or makes, mode 0600: nobody else can hold it) the lock file `path`, never
/// through a symbolic link.
fn open(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
        .map_err(|e| Error::io(format!("cannot open {}", path.display()), &e))
}

/// Makes `dir` (and its parents) unless it exists, and checks it is this user's own
/// directory that nobody else can write or read (not a link another user planted in a
/// shared directory such as /run/lock): what lock files and sockets go in.
pub fn private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    if let Err(e) = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
    {
        return Err(Error::io(format!("cannot create {}", dir.display()), &e));
    }
    let meta = std::fs::symlink_metadata(dir)
        .map_err(|e| Error::io(format!("cannot stat {}", dir.display()), &e))?;
    let me = rustix::process::geteuid().as_raw();
    if !meta.is_dir() || meta.uid() != me {
        return Err(Error::new(
            crate::Code::SrBackendFailure,
            format!(
                "{} is not a directory of this user's (uid {me}): refusing to use it",
                dir.display()
            ),
        ));
    }
    if meta.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::io(format!("cannot restrict {}", dir.display()), &e))?;
    }
    Ok(())
}
