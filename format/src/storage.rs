//! Where image bytes come from: a small synchronous positional-read trait.
//!
//! Format code reads headers and tables through [`Storage`] and never does I/O any other
//! way, so the same parser works on a local file, an HTTP object or an NBD upstream (the
//! async layers implement the trait for those). Files named inside an image (backing
//! files, external data files, VMDK extents) are opened *relative to the storage that
//! names them* with [`Storage::open_related`], never relative to the process's working
//! directory.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustix::fs::SeekFrom;
use rustix::io::Errno;

use crate::data_path::DataPath;
use crate::{Error, Result};

/// A read-only, fixed-size byte store.
pub trait Storage: Send + Sync + fmt::Debug {
    /// The name used in errors and reports: a path or a URI without credentials.
    fn name(&self) -> &str;

    /// Size in bytes, pinned when the storage was opened.
    fn size(&self) -> u64;

    /// Reads up to `buf.len()` bytes at `offset`; returns fewer only at the end.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;

    /// The first offset at or after `offset` that holds data (`None`: only holes
    /// follow). Stores without hole information say `Some(offset)`.
    fn next_data(&self, offset: u64) -> io::Result<Option<u64>> {
        Ok((offset < self.size()).then_some(offset))
    }

    /// The first offset at or after `offset` that is a hole (the size if none).
    fn next_hole(&self, offset: u64) -> io::Result<u64> {
        let _ = offset;
        Ok(self.size())
    }

    /// Opens a file named inside this one (a backing file, a data file, an extent):
    /// relative names are resolved against this storage's directory.
    fn open_related(&self, name: &str) -> Result<Arc<dyn Storage>>;

    /// A key that is equal for two storages exactly when they are the same object
    /// (device and inode for files), for backing-loop detection.
    fn identity(&self) -> String;

    /// How an export reads this storage's data bytes (see [`DataPath`]); the default
    /// is [`read_at`](Storage::read_at) on a blocking thread.
    fn data_path(&self) -> DataPath {
        DataPath::Blocking
    }

    /// Whether this storage already is the guest's view of an image (a copy-on-read
    /// cache of a template, say), so that a child naming it as a backing file reads it
    /// as raw whatever format the child records. Only storages a caller hands to a
    /// [`crate::BackingOpener`] say so; files and remote objects never do.
    fn decoded(&self) -> bool {
        false
    }
}

/// Reads exactly `buf.len()` bytes at `offset`, or fails naming `what` and the file.
pub fn read_exact(
    storage: &dyn Storage,
    what: &'static str,
    buf: &mut [u8],
    offset: u64,
) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match storage.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                return Err(Error::Io {
                    path: storage.name().to_owned(),
                    op: what,
                    offset,
                    length: buf.len() as u64,
                    source: io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("the file ends at {} bytes", storage.size()),
                    ),
                });
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(Error::Io {
                    path: storage.name().to_owned(),
                    op: what,
                    offset,
                    length: buf.len() as u64,
                    source,
                });
            }
        }
    }
    Ok(())
}

/// Reads `length` bytes at `offset` into a new buffer, refusing ranges that do not lie
/// inside the file (so no allocation is sized from an untrusted field beyond the file).
pub fn read_vec(
    storage: &dyn Storage,
    what: &'static str,
    offset: u64,
    length: u64,
) -> Result<Vec<u8>> {
    let end = offset.checked_add(length);
    if end.is_none_or(|end| end > storage.size()) {
        return Err(Error::Io {
            path: storage.name().to_owned(),
            op: what,
            offset,
            length,
            source: io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "the range lies beyond the end of the file ({} bytes)",
                    storage.size()
                ),
            ),
        });
    }
    let mut buf = vec![0; length as usize];
    read_exact(storage, what, &mut buf, offset)?;
    Ok(buf)
}

/// Percent-decodes a URL path (`%20` → space); `None` on a malformed escape or bytes
/// that are not UTF-8. Shared by VHD `MacX` locators and the server's `file://` URIs.
pub fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A local file (or block device) opened read-only.
#[derive(Debug)]
pub struct FileStorage {
    file: Arc<File>,
    path: PathBuf,
    name: String,
    size: u64,
    identity: String,
    regular: bool,
}

/// What [`open_checked`] may open besides regular files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allow {
    /// Regular files only (names written inside images).
    RegularFiles,
    /// Regular files and block devices (what the operator names).
    BlockDevices,
}

/// Opens `path` (read-only, or read-write with `write`) after checking its type without
/// opening it: a FIFO would block the open forever, and opening a device can have side
/// effects (a tape rewinds), so anything but a regular file (or, with
/// [`Allow::BlockDevices`], a block device) is refused by name before `open`. The open
/// itself is non-blocking and the descriptor's type and inode must match what was
/// checked, so swapping a FIFO in between cannot hang or fool it.
pub fn open_checked(
    path: &Path,
    write: bool,
    allow: Allow,
) -> io::Result<(File, std::fs::Metadata)> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let allowed =
        |t: std::fs::FileType| t.is_file() || (allow == Allow::BlockDevices && t.is_block_device());
    let refuse = |t: std::fs::FileType| {
        let what = if t.is_dir() {
            "a directory"
        } else if t.is_fifo() {
            "a FIFO (named pipe)"
        } else if t.is_socket() {
            "a socket"
        } else if t.is_char_device() {
            "a character device"
        } else if t.is_block_device() {
            "a block device"
        } else {
            "an unknown kind of file"
        };
        let wanted = match allow {
            Allow::RegularFiles => "not a regular file",
            Allow::BlockDevices => "not a regular file or a block device",
        };
        io::Error::new(io::ErrorKind::InvalidInput, format!("{what}, {wanted}"))
    };
    let checked = std::fs::metadata(path)?;
    if !allowed(checked.file_type()) {
        return Err(refuse(checked.file_type()));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)?;
    let meta = file.metadata()?;
    if !allowed(meta.file_type()) {
        return Err(refuse(meta.file_type()));
    }
    if (meta.dev(), meta.ino()) != (checked.dev(), checked.ino()) {
        return Err(io::Error::other(
            "the file was replaced while it was being opened",
        ));
    }
    // Regular files and block devices ignore O_NONBLOCK for I/O; clear it anyway so the
    // descriptor behaves like any other.
    let flags = rustix::fs::fcntl_getfl(&file)?;
    rustix::fs::fcntl_setfl(&file, flags - rustix::fs::OFlags::NONBLOCK)?;
    Ok((file, meta))
}

impl FileStorage {
    /// Opens `path` read-only: a regular file or a block device. Opening never changes
    /// the file or its times.
    pub fn open(path: &Path) -> Result<Arc<dyn Storage>> {
        Ok(Arc::new(Self::open_file(path)?))
    }

    /// Like [`FileStorage::open`], returning the concrete type.
    pub fn open_file(path: &Path) -> Result<Self> {
        Self::open_allowing(path, Allow::BlockDevices)
    }

    fn open_allowing(path: &Path, allow: Allow) -> Result<Self> {
        let name = path.display().to_string();
        let open_err = |source| Error::Open {
            path: name.clone(),
            source,
        };
        let (file, meta) = open_checked(path, false, allow).map_err(open_err)?;
        let regular = meta.file_type().is_file();
        let size = if regular {
            meta.len()
        } else {
            rustix::fs::seek(&file, SeekFrom::End(0)).map_err(|e| open_err(e.into()))?
        };
        Ok(FileStorage {
            file: Arc::new(file),
            path: path.to_owned(),
            name,
            size,
            identity: format!("{}:{}", meta.dev(), meta.ino()),
            regular,
        })
    }

    /// The path the file was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Names that are URIs or qemu `json:` specifications rather than file names: a file
/// storage refuses to treat them as paths.
pub fn looks_like_uri(name: &str) -> bool {
    name.starts_with("json:")
        || name.split_once("://").is_some_and(|(scheme, _)| {
            !scheme.is_empty()
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
        })
}

impl Storage for FileStorage {
    fn name(&self) -> &str {
        &self.name
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if offset >= self.size {
            return Ok(0);
        }
        let len = buf
            .len()
            .min(usize::try_from(self.size - offset).unwrap_or(usize::MAX));
        self.file.read_at(&mut buf[..len], offset)
    }

    fn next_data(&self, offset: u64) -> io::Result<Option<u64>> {
        if offset >= self.size {
            return Ok(None);
        }
        if !self.regular {
            return Ok(Some(offset));
        }
        match rustix::fs::seek(&self.file, SeekFrom::Data(offset)) {
            Ok(d) if d >= self.size => Ok(None),
            Ok(d) => Ok(Some(d.max(offset))),
            Err(Errno::NXIO) => Ok(None),
            Err(Errno::INVAL | Errno::OPNOTSUPP) => Ok(Some(offset)),
            Err(e) => Err(e.into()),
        }
    }

    fn next_hole(&self, offset: u64) -> io::Result<u64> {
        if offset >= self.size || !self.regular {
            return Ok(self.size);
        }
        match rustix::fs::seek(&self.file, SeekFrom::Hole(offset)) {
            Ok(h) => Ok(h.clamp(offset, self.size)),
            Err(Errno::NXIO | Errno::INVAL | Errno::OPNOTSUPP) => Ok(self.size),
            Err(e) => Err(e.into()),
        }
    }

    fn open_related(&self, name: &str) -> Result<Arc<dyn Storage>> {
        if looks_like_uri(name) {
            return Err(Error::chain(
                &self.name,
                format!(
                    "{name:?} is a URI or json: specification, not a file name; only file names are \
                     followed, and URIs under a prefix the operator allows (`--allow-backing PREFIX`)"
                ),
            ));
        }
        if name.is_empty() {
            return Err(Error::chain(&self.name, "an empty file name"));
        }
        let path = Path::new(name);
        let resolved = if path.is_absolute() {
            path.to_owned()
        } else {
            self.path
                .parent()
                .unwrap_or_else(|| Path::new("."))
                .join(path)
        };
        // An image names other files (backing files, data files, extents); a hostile
        // template must not be able to make the server open a device or a FIFO that way.
        let file = FileStorage::open_allowing(&resolved, Allow::RegularFiles)?;
        Ok(Arc::new(file))
    }

    fn identity(&self) -> String {
        self.identity.clone()
    }

    fn data_path(&self) -> DataPath {
        DataPath::File(Arc::clone(&self.file))
    }
}

/// An in-memory image, for tests and fuzzing. Related files are looked up by name in
/// the map it was built with.
#[derive(Debug, Clone)]
pub struct MemoryStorage {
    name: String,
    data: Arc<Vec<u8>>,
    siblings: Arc<std::collections::BTreeMap<String, Arc<Vec<u8>>>>,
}

impl MemoryStorage {
    /// A storage named `name` holding `data`, with no related files.
    pub fn open(name: &str, data: Vec<u8>) -> Arc<dyn Storage> {
        Arc::new(MemoryStorage {
            name: name.to_owned(),
            data: Arc::new(data),
            siblings: Arc::default(),
        })
    }

    /// A storage named `name` whose related files are `files` (which may include itself).
    pub fn with_files(
        name: &str,
        files: std::collections::BTreeMap<String, Vec<u8>>,
    ) -> Option<Arc<dyn Storage>> {
        let siblings: std::collections::BTreeMap<_, _> =
            files.into_iter().map(|(k, v)| (k, Arc::new(v))).collect();
        let data = siblings.get(name)?.clone();
        Some(Arc::new(MemoryStorage {
            name: name.to_owned(),
            data,
            siblings: Arc::new(siblings),
        }))
    }
}

impl Storage for MemoryStorage {
    fn name(&self) -> &str {
        &self.name
    }

    fn size(&self) -> u64 {
        self.data.len() as u64
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let Ok(start) = usize::try_from(offset) else {
            return Ok(0);
        };
        if start >= self.data.len() {
            return Ok(0);
        }
        let n = buf.len().min(self.data.len() - start);
        buf[..n].copy_from_slice(&self.data[start..start + n]);
        Ok(n)
    }

    fn open_related(&self, name: &str) -> Result<Arc<dyn Storage>> {
        match self.siblings.get(name) {
            Some(data) => Ok(Arc::new(MemoryStorage {
                name: name.to_owned(),
                data: data.clone(),
                siblings: self.siblings.clone(),
            })),
            None => Err(Error::Open {
                path: name.to_owned(),
                source: io::Error::from(io::ErrorKind::NotFound),
            }),
        }
    }

    fn identity(&self) -> String {
        format!("memory:{}", self.name)
    }
}
