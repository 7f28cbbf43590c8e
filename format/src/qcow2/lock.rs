//! Image locking compatible with qemu's: open file description (OFD) locks on single
//! bytes of the image file, so qemu and Thinline never both write one image.
//!
//! qemu (block/file-posix.c) takes a shared lock on byte `100 + p` for each permission
//! `p` it holds and on byte `200 + p` for each permission it refuses to share, and
//! before that tests whether anyone else holds `200 + p` for a permission it wants or
//! `100 + p` for one it refuses to share. A writer of a qcow2 image holds
//! consistent-read, write and resize, and shares neither write nor resize — exactly
//! what qemu-nbd and qemu do for a writable qcow2 node, so each refuses the other, and
//! a read-only `qemu-img info` (which refuses to share write) is refused too.

use std::fs::{File, Metadata};
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::storage::{Allow, open_checked};
use crate::{Error, Result};

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;
const CONSISTENT_READ: i64 = 0;
const WRITE: i64 = 1;
const RESIZE: i64 = 3;
const PERM_NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];

/// Locks held on an image open for writing (released when its file is closed).
#[derive(Debug)]
pub struct ImageLock {
    _private: (),
}

fn flock(kind: libc::c_short, byte: i64) -> libc::flock {
    // SAFETY: `flock` is a plain C struct for which all-zero bytes are valid.
    let mut l: libc::flock = unsafe { std::mem::zeroed() };
    l.l_type = kind;
    l.l_whence = libc::SEEK_SET as libc::c_short;
    l.l_start = byte;
    l.l_len = 1;
    l
}

/// Whether another open file description holds a lock conflicting with an exclusive
/// lock of `byte`.
fn held_by_other(file: &File, byte: i64) -> std::io::Result<bool> {
    let mut l = flock(libc::F_WRLCK as libc::c_short, byte);
    // SAFETY: `fd` is open for the duration of the call and `l` is a valid flock.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut l) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(l.l_type != libc::F_UNLCK as libc::c_short)
}

fn lock_shared(file: &File, byte: i64) -> std::io::Result<()> {
    let l = flock(libc::F_RDLCK as libc::c_short, byte);
    // SAFETY: `fd` is open for the duration of the call and `l` is a valid flock.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &l) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The other processes that have `file` open, named for an error message (best effort:
/// OFD locks do not record their owner, so `/proc/*/fd` is searched for the file).
fn holders(file: &File) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = file.metadata() else {
        return Vec::new();
    };
    let me = std::process::id();
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        let open = fds.flatten().any(|fd| {
            std::fs::metadata(fd.path())
                .is_ok_and(|m| (m.dev(), m.ino()) == (meta.dev(), meta.ino()))
        });
        if open {
            let comm = std::fs::read_to_string(p.path().join("comm"))
                .map(|c| c.trim().to_owned())
                .unwrap_or_default();
            out.push(format!("{comm} (pid {pid})"));
        }
    }
    out
}

/// Opens the image at `path` (`name` in messages) read-write, a regular file or a block
/// device as the operator may name, and takes the writer's locks on it.
pub fn open_locked(path: &Path, name: &str) -> Result<(File, Metadata, ImageLock)> {
    let (file, meta) =
        open_checked(path, true, Allow::BlockDevices).map_err(|source| Error::Open {
            path: name.to_owned(),
            source,
        })?;
    let lock = lock_for_writing(&file, name)?;
    Ok((file, meta, lock))
}

/// Takes the locks of a qcow2 writer on `file`, or fails naming what conflicts.
pub fn lock_for_writing(file: &File, name: &str) -> Result<ImageLock> {
    let io = |source| Error::io_at(name, "lock image", 0, 0)(source);
    let conflict = |perm: i64, theirs: bool| {
        let who = holders(file);
        let holder = if who.is_empty() {
            "another process (qemu, qemu-nbd or thinline)".to_owned()
        } else {
            who.join(", ")
        };
        let what = if theirs {
            format!("it holds the {} permission", PERM_NAMES[perm as usize])
        } else {
            format!(
                "it does not share the {} permission",
                PERM_NAMES[perm as usize]
            )
        };
        Error::Locked {
            path: name.to_owned(),
            reason: format!("in use by {holder}: {what}"),
        }
    };
    let wanted = [CONSISTENT_READ, WRITE, RESIZE];
    let unshared = [WRITE, RESIZE];
    let test = || -> Result<()> {
        for &p in &wanted {
            if held_by_other(file, SHARED_BASE + p).map_err(io)? {
                return Err(conflict(p, false));
            }
        }
        for &p in &unshared {
            if held_by_other(file, PERM_BASE + p).map_err(io)? {
                return Err(conflict(p, true));
            }
        }
        Ok(())
    };
    test()?;
    for &p in &wanted {
        lock_shared(file, PERM_BASE + p).map_err(io)?;
    }
    for &p in &unshared {
        lock_shared(file, SHARED_BASE + p).map_err(io)?;
    }
    // Someone may have taken a lock between the test and ours: test again.
    test()?;
    Ok(ImageLock { _private: () })
}
