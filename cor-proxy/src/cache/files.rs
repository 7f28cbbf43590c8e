//! Opening a cache file or device safely: no symbolic link followed (except, on request,
//! one to a block device), nothing but a regular file or a block device, one owner
//! (`flock`). Kept apart from [`CacheFile`](super::CacheFile)'s layout and crash rules.

use super::*;

/// Opens `path` without following a final symbolic link, unless `device_links` and it
/// leads to a block device.
pub(super) fn open_no_follow(
    path: &Path,
    writable: bool,
    create: bool,
    device_links: bool,
) -> Result<File> {
    let mut oo = OpenOptions::new();
    oo.read(true).write(writable);
    if create {
        oo.create(true).truncate(false).mode(0o600);
    }
    let refused = |reason: &str| Error::Symlink {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    match oo
        .clone()
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(f) => Ok(f),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            if !device_links {
                return Err(refused("it is a symbolic link"));
            }
            // Never created through a link. Checked before opening (opening a device can
            // have side effects, and a FIFO would block) and again on what was opened.
            let target = std::fs::metadata(path).map_err(|e| {
                refused(&format!(
                    "it is a symbolic link whose target cannot be opened ({e})"
                ))
            })?;
            if !target.file_type().is_block_device() {
                return Err(refused(
                    "it is a symbolic link to something other than a block device",
                ));
            }
            let f = OpenOptions::new()
                .read(true)
                .write(writable)
                .custom_flags(libc::O_CLOEXEC)
                .open(path)
                .map_err(|e| {
                    refused(&format!(
                        "it is a symbolic link whose target cannot be opened ({e})"
                    ))
                })?;
            let is_device = f.metadata().is_ok_and(|m| m.file_type().is_block_device());
            if !is_device {
                return Err(refused(
                    "it is a symbolic link to something other than a block device",
                ));
            }
            Ok(f)
        }
        Err(source) => Err(Error::Io {
            path: path.to_owned(),
            op: "open",
            source,
        }),
    }
}

/// [`open_no_follow`], then checks that what was opened is a regular file or a block
/// device; returns it and its metadata.
pub(super) fn open_cache_file(
    path: &Path,
    writable: bool,
    create: bool,
    device_links: bool,
) -> Result<(File, std::fs::Metadata)> {
    let file = open_no_follow(path, writable, create, device_links)?;
    let meta = file.metadata().map_err(|source| Error::Io {
        path: path.to_owned(),
        op: "stat",
        source,
    })?;
    let block_device = meta.file_type().is_block_device();
    if !block_device && !meta.file_type().is_file() {
        return Err(Error::NotACache {
            path: path.to_owned(),
            reason: "neither a regular file nor a block device".into(),
        });
    }
    Ok((file, meta))
}

/// True if a regular file holds no data: empty, or nothing but holes.
pub(super) fn holds_no_data(file: &File, length: u64) -> bool {
    if length == 0 {
        return true;
    }
    matches!(
        rustix::fs::seek(file, rustix::fs::SeekFrom::Data(0)),
        Err(rustix::io::Errno::NXIO)
    )
}

/// Takes the owner's lock, or says who holds it.
pub(super) fn lock(file: &File, path: &Path, size: Option<u64>) -> Result<()> {
    match rustix::fs::flock(file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::WOULDBLOCK) => {
            let holder = size
                .and_then(|size| read_holder(file, size))
                .unwrap_or_else(|| "another process (it recorded no name)".to_owned());
            Err(Error::Locked {
                path: path.to_owned(),
                holder,
            })
        }
        Err(e) => Err(Error::Io {
            path: path.to_owned(),
            op: "lock",
            source: e.into(),
        }),
    }
}

/// Size of a block device in bytes.
pub(super) fn device_size(file: &File) -> io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = file;
    let size = f.seek(SeekFrom::End(0))?;
    f.seek(SeekFrom::Start(0))?;
    Ok(size)
}
