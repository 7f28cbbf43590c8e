//! NFSv3 template source: `nfs://server[:port]/export/path/to/image`, read with a
//! userspace client.
//!
//! Templates often live on a NAS. Mounting it with the kernel needs root, a mount point
//! per server and a kernel that hangs reads when the server goes away; this client
//! needs none of that: it speaks MOUNT v3 and NFSv3 (RFC 1813) over TCP itself and
//! turns every failure into a [`FetchError`] the fetch engine can retry or report.
//!
//! # URIs
//!
//! `nfs://[user@]host[:port]/path[?param=value&…]`, the libnfs form. `port` is the NFS
//! port; parameters: `nfsport=N` (the same), `mountport=N` (the MOUNT service),
//! `uid=N`, `gid=N` (the AUTH_SYS identity; default: this process's), `version=3`.
//! A port that is not given is asked from the server's portmapper (port 111); without
//! a portmapper the NFS port defaults to 2049 and `mountport` must be given. The path
//! is %-decoded. User information is ignored (AUTH_SYS has no secrets) and, like the
//! query, never appears in messages.
//!
//! # Export and path
//!
//! The URI does not say where the export ends and the path inside it begins. Like
//! libnfs, the MOUNT service's export list is asked and the longest export that is a
//! whole-component prefix of the path is mounted. A server that hides its export list
//! (or lists nothing that fits) is asked to mount the file's directory, then each
//! parent in turn up to `/`. The rest of the path is resolved with LOOKUP, following
//! symbolic links (at most 40) as long as they stay inside the export.
//!
//! # Pinning and change detection
//!
//! GETATTR at open pins size, mtime and file id: [`RangeBackend::identity`] is
//! `mtime:SECS.NSECS,fileid:N`. READ replies carry the file's attributes; a reply whose
//! size, mtime or file id differs from the pinned ones fails with
//! [`FetchErrorKind::Changed`], as does a file that ends early. Servers that omit the
//! attributes cannot be checked.
//!
//! # Reads and connections
//!
//! A read is split at the server's largest read size (FSINFO `rtmax`, at most 1 MiB)
//! and the pieces are read in parallel over a small pool of TCP connections (one call
//! at a time each, at most [`MAX_CONNECTIONS`]), shared by every object opened from the
//! same mount. Short READ replies are continued, up to 64 READs for one piece. Every
//! reply must arrive whole within the first-byte plus the idle timeout, however slowly
//! it trickles in. A connection that fails, times out or is abandoned by a cancelled
//! read is dropped, never reused; the next call opens a new one. As root the client
//! connects from a reserved port (600–1023), which Linux's `nfsd` requires by default;
//! otherwise from any port.
//!
//! # Errors
//!
//! Connection refused or reset, timeouts, RPC `SYSTEM_ERR`, `NFS3ERR_JUKEBOX`, `_IO`
//! and `_SERVERFAULT` are [`FetchErrorKind::Transient`]; `NFS3ERR_NOENT`, `_ACCES`,
//! `_STALE` (the file was deleted or replaced), refused credentials, a missing export
//! and malformed replies are [`FetchErrorKind::Permanent`].
//!
//! # Wire format
//!
//! ONC RPC (RFC 5531) with record marking and the XDR of the eight procedures used are
//! written here rather than taken from a crate: the crates.io clients checked (nfs3_client
//! 0.7–0.9 with nfs3_types) panic on or reject fragmented replies, allocate whatever
//! length a reply announces before checking it, and need Rust 1.88. Here every length
//! from the server is bounded before anything is allocated.

use std::collections::VecDeque;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use thinline_format::storage::percent_decode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::{FetchError, FetchErrorKind, RangeBackend, RemoteConfig};
use crate::source::redact;

/// Most TCP connections to one mount, whatever `max_in_flight` says.
pub const MAX_CONNECTIONS: usize = 4;
/// Largest READ issued, whatever the server allows.
const MAX_READ: u32 = 1 << 20;
/// READ size when the server reports none.
const DEFAULT_READ: u32 = 32 << 10;
/// Largest reply accepted for calls other than READ (an export list may be long).
const MAX_REPLY: usize = 1 << 20;
/// Room for the RPC header and attributes of a READ reply besides the data.
const READ_OVERHEAD: usize = 4096;
/// READ calls for one span of at most `rtmax` bytes: short replies are continued, but a
/// server that answers a byte at a time must not hold a read for a million calls.
const MAX_READS_PER_SPAN: usize = 64;
/// Symbolic links followed while resolving one path.
const MAX_SYMLINKS: usize = 40;
/// NFSv3 file handles are at most 64 bytes.
const FHSIZE3: usize = 64;

const PMAP_PORT: u16 = 111;
const DEFAULT_NFS_PORT: u16 = 2049;
const PMAP_PROG: u32 = 100_000;
const PMAP_VERS: u32 = 2;
const PMAPPROC_GETPORT: u32 = 3;
const IPPROTO_TCP: u32 = 6;
const MOUNT_PROG: u32 = 100_005;
const MOUNT_VERS: u32 = 3;
const MOUNTPROC3_MNT: u32 = 1;
const MOUNTPROC3_EXPORT: u32 = 5;
const NFS_PROG: u32 = 100_003;
const NFS_VERS: u32 = 3;
const NFSPROC3_GETATTR: u32 = 1;
const NFSPROC3_LOOKUP: u32 = 3;
const NFSPROC3_READLINK: u32 = 5;
const NFSPROC3_READ: u32 = 6;
const NFSPROC3_FSINFO: u32 = 19;
const AUTH_NONE: u32 = 0;
const AUTH_SYS: u32 = 1;
const NF3REG: u32 = 1;
const NF3DIR: u32 = 2;
const NF3LNK: u32 = 5;

/// Opens `uri` (`nfs://…`), pinning the file's size, mtime and file id.
pub async fn open(uri: &str, config: &RemoteConfig) -> Result<Arc<dyn RangeBackend>, FetchError> {
    let shown = redact(uri);
    let fail = |f: Fail| FetchError::new(f.kind, "open", &shown, None, f.message);
    let target = parse_uri(uri).map_err(|m| fail(Fail::permanent(m)))?;
    let session = Session::connect(&target, config).await.map_err(fail)?;
    let backend = session
        .open_path(&target.path, shown.clone())
        .await
        .map_err(fail)?;
    Ok(Arc::new(backend))
}

/// One file on an NFSv3 export.
pub struct NfsBackend {
    uri: String,
    identity: String,
    session: Arc<Session>,
    fh: Bytes,
    pinned: Attr,
    /// The directory of the path as named (textually normalised), for related names.
    dir: String,
}

impl fmt::Debug for NfsBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NfsBackend")
            .field("uri", &self.uri)
            .field("identity", &self.identity)
            .field("size", &self.pinned.size)
            .field("export", &self.session.export)
            .field("rtmax", &self.session.rtmax)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl RangeBackend for NfsBackend {
    fn uri(&self) -> &str {
        &self.uri
    }

    fn size(&self) -> u64 {
        self.pinned.size
    }

    fn identity(&self) -> &str {
        &self.identity
    }

    async fn read(&self, offset: u64, length: u64) -> Result<Bytes, FetchError> {
        let range = Some((offset, length));
        let fail = |f: Fail| FetchError::new(f.kind, "read", &self.uri, range, f.message);
        if length == 0 {
            return Ok(Bytes::new());
        }
        if offset
            .checked_add(length)
            .is_none_or(|end| end > self.pinned.size)
        {
            return Err(fail(Fail::permanent(format!(
                "the range ends beyond the file's {} bytes",
                self.pinned.size
            ))));
        }
        let chunk = u64::from(self.session.rtmax);
        if length <= chunk {
            return read_span(&self.session, &self.fh, &self.pinned, offset, length)
                .await
                .map_err(fail);
        }
        // Pieces of at most rtmax bytes, read in parallel; the pool bounds how many are
        // on the wire. Dropping the set (a cancelled read) aborts them all.
        let count = length.div_ceil(chunk);
        let mut tasks = JoinSet::new();
        for i in 0..count {
            let (session, fh, pinned) = (self.session.clone(), self.fh.clone(), self.pinned);
            let start = offset + i * chunk;
            let len = chunk.min(offset + length - start);
            tasks.spawn(async move { (i, read_span(&session, &fh, &pinned, start, len).await) });
        }
        let mut parts: Vec<Bytes> = vec![Bytes::new(); count as usize];
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok((i, Ok(bytes))) => parts[i as usize] = bytes,
                Ok((_, Err(f))) => return Err(fail(f)),
                Err(e) => return Err(fail(Fail::transient(format!("read task failed: {e}")))),
            }
        }
        let mut out = BytesMut::with_capacity(length as usize);
        for part in parts {
            out.extend_from_slice(&part);
        }
        Ok(out.freeze())
    }

    async fn open_related(&self, name: &str) -> Result<Arc<dyn RangeBackend>, FetchError> {
        // Inside this export of this server only: a name cannot reach another server,
        // another export, or climb above this one.
        let refuse = |reason: String| {
            FetchError::new(
                FetchErrorKind::Permanent,
                "open",
                &self.uri,
                None,
                format!("refusing the related name {}: {reason}", redact(name)),
            )
        };
        let path = super::related::resolve(&format!("{}/_", self.dir), name).map_err(refuse)?;
        if !within(&self.session.export, &path) {
            return Err(refuse(format!(
                "it resolves to {path:?}, outside the export {:?}",
                self.session.export
            )));
        }
        let uri = self.session.uri_for(&path);
        let backend = self
            .session
            .open_path(&path, uri.clone())
            .await
            .map_err(|f| FetchError::new(f.kind, "open", &uri, None, f.message))?;
        Ok(Arc::new(backend))
    }
}

/// Reads `length` bytes at `offset`, continuing short replies, checking the attributes
/// of every reply against the pinned ones.
async fn read_span(
    session: &Session,
    fh: &[u8],
    pinned: &Attr,
    offset: u64,
    length: u64,
) -> Result<Bytes, Fail> {
    let mut parts: Vec<Bytes> = Vec::new();
    let mut done = 0u64;
    while done < length {
        if parts.len() >= MAX_READS_PER_SPAN {
            return Err(Fail::transient(format!(
                "the server returned {done} of {length} bytes in {MAX_READS_PER_SPAN} short READs"
            )));
        }
        let want = (length - done).min(u64::from(session.rtmax)) as u32;
        let reply = session.read(fh, offset + done, want).await?;
        if let Some(attr) = &reply.attr {
            check_unchanged(pinned, attr)?;
        }
        let got = reply.data.len() as u64;
        if got > u64::from(want) {
            return Err(Fail::permanent(format!(
                "malformed reply: READ of {want} bytes returned {got}"
            )));
        }
        if got == 0 {
            return Err(if reply.eof {
                Fail::changed(format!(
                    "the file ends at {}, before the {} bytes it had when opened",
                    offset + done,
                    pinned.size
                ))
            } else {
                Fail::transient(format!("READ at {} returned no data", offset + done))
            });
        }
        done += got;
        parts.push(reply.data);
    }
    if parts.len() == 1 {
        return Ok(parts.pop().unwrap_or_default());
    }
    let mut out = BytesMut::with_capacity(length as usize);
    for part in parts {
        out.extend_from_slice(&part);
    }
    Ok(out.freeze())
}

fn check_unchanged(pinned: &Attr, now: &Attr) -> Result<(), Fail> {
    if now.fileid != pinned.fileid {
        return Err(Fail::changed(format!(
            "the file id changed from {} to {}",
            pinned.fileid, now.fileid
        )));
    }
    if now.size != pinned.size {
        return Err(Fail::changed(format!(
            "the size changed from {} to {} bytes",
            pinned.size, now.size
        )));
    }
    if now.mtime != pinned.mtime {
        return Err(Fail::changed(format!(
            "the modification time changed from {} to {}",
            time_text(pinned.mtime),
            time_text(now.mtime)
        )));
    }
    Ok(())
}

fn time_text((secs, nsecs): (u32, u32)) -> String {
    format!("{secs}.{nsecs:09}")
}

// ---------------------------------------------------------------------------------------
// Failures

/// A failure without its operation and URI, which the public entry points add.
#[derive(Debug)]
struct Fail {
    kind: FetchErrorKind,
    message: String,
}

impl Fail {
    fn transient(message: impl Into<String>) -> Fail {
        Fail {
            kind: FetchErrorKind::Transient,
            message: message.into(),
        }
    }

    fn permanent(message: impl Into<String>) -> Fail {
        Fail {
            kind: FetchErrorKind::Permanent,
            message: message.into(),
        }
    }

    fn changed(message: impl Into<String>) -> Fail {
        Fail {
            kind: FetchErrorKind::Changed,
            message: message.into(),
        }
    }

    fn io(what: &str, e: &io::Error) -> Fail {
        Fail::transient(format!("{what}: {e}"))
    }
}

fn malformed(what: &str) -> Fail {
    Fail::permanent(format!("malformed reply from the server ({what})"))
}

/// An NFSv3 status other than `NFS3_OK`, as a failure of `what`.
fn nfs_status(stat: u32, what: &str) -> Fail {
    let (name, kind) = match stat {
        1 => ("NFS3ERR_PERM", FetchErrorKind::Permanent),
        2 => (
            "NFS3ERR_NOENT: no such file or directory",
            FetchErrorKind::Permanent,
        ),
        5 => ("NFS3ERR_IO", FetchErrorKind::Transient),
        6 => ("NFS3ERR_NXIO", FetchErrorKind::Permanent),
        13 => (
            "NFS3ERR_ACCES: permission denied",
            FetchErrorKind::Permanent,
        ),
        20 => ("NFS3ERR_NOTDIR: not a directory", FetchErrorKind::Permanent),
        21 => ("NFS3ERR_ISDIR: is a directory", FetchErrorKind::Permanent),
        22 => ("NFS3ERR_INVAL", FetchErrorKind::Permanent),
        63 => ("NFS3ERR_NAMETOOLONG", FetchErrorKind::Permanent),
        70 => (
            "NFS3ERR_STALE: the file was deleted or replaced",
            FetchErrorKind::Permanent,
        ),
        10001 => ("NFS3ERR_BADHANDLE", FetchErrorKind::Permanent),
        10004 => ("NFS3ERR_NOTSUPP", FetchErrorKind::Permanent),
        10006 => ("NFS3ERR_SERVERFAULT", FetchErrorKind::Transient),
        10008 => (
            "NFS3ERR_JUKEBOX: the server is busy, try later",
            FetchErrorKind::Transient,
        ),
        _ => ("NFS error", FetchErrorKind::Permanent),
    };
    Fail {
        kind,
        message: format!("{what}: {name} ({stat})"),
    }
}

fn mount_status(stat: u32, export: &str) -> Fail {
    let name = match stat {
        1 => "MNT3ERR_PERM: not permitted",
        2 => "MNT3ERR_NOENT: no such export or directory",
        5 => "MNT3ERR_IO",
        13 => "MNT3ERR_ACCES: the server does not export it to this client",
        20 => "MNT3ERR_NOTDIR: not a directory",
        22 => "MNT3ERR_INVAL",
        63 => "MNT3ERR_NAMETOOLONG",
        10004 => "MNT3ERR_NOTSUPP",
        10006 => "MNT3ERR_SERVERFAULT",
        _ => "MOUNT error",
    };
    let kind = if matches!(stat, 5 | 10006) {
        FetchErrorKind::Transient
    } else {
        FetchErrorKind::Permanent
    };
    Fail {
        kind,
        message: format!("mounting {export:?}: {name} ({stat})"),
    }
}

// ---------------------------------------------------------------------------------------
// URIs and paths

/// What an `nfs://` URI names.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    /// Host name or address (IPv6 without brackets).
    host: String,
    /// `host[:port]` as written, for the URIs of related objects.
    authority: String,
    nfs_port: Option<u16>,
    mount_port: Option<u16>,
    uid: Option<u32>,
    gid: Option<u32>,
    /// Absolute, %-decoded, normalised path on the server.
    path: String,
}

fn parse_uri(uri: &str) -> Result<Target, String> {
    let rest = match uri.split_once("://") {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("nfs") => rest,
        _ => return Err("not an nfs:// URI".into()),
    };
    let rest = rest.split('#').next().unwrap_or("");
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or("the IPv6 address in the URI has no closing ']'")?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or("unexpected text after ']'")?),
        };
        (host, port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err("the URI names no server".into());
    }
    let parse_port = |p: &str, what: &str| {
        p.parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| format!("{what} {p:?} is not a port number"))
    };
    let mut target = Target {
        host: host.to_owned(),
        authority: authority.to_owned(),
        nfs_port: port
            .filter(|p| !p.is_empty())
            .map(|p| parse_port(p, "the port"))
            .transpose()?,
        mount_port: None,
        uid: None,
        gid: None,
        path: String::new(),
    };
    for param in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = param.split_once('=').unwrap_or((param, ""));
        let number = || {
            value
                .parse::<u32>()
                .map_err(|_| format!("the URI parameter {key} needs a number"))
        };
        match key {
            "nfsport" => target.nfs_port = Some(parse_port(value, "nfsport")?),
            "mountport" => target.mount_port = Some(parse_port(value, "mountport")?),
            "uid" => target.uid = Some(number()?),
            "gid" => target.gid = Some(number()?),
            "version" if value == "3" => {}
            "version" => return Err(format!("NFS version {value:?} is not supported (only 3)")),
            _ => {
                return Err(format!(
                    "unknown URI parameter {key:?} (known: nfsport, mountport, uid, gid, version)"
                ));
            }
        }
    }
    if path.is_empty() || path == "/" {
        return Err("the URI has no path".into());
    }
    let decoded = percent_decode(path).ok_or("a %-escape in the path is malformed")?;
    target.path = normalize(&decoded);
    if target.path == "/" {
        return Err("the URI names the server's root, not a file".into());
    }
    Ok(target)
}

/// `path` made absolute with `.`, `..` and repeated slashes removed (textually, the
/// way a URL is resolved).
fn normalize(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    format!("/{}", parts.join("/"))
}

fn components(path: &str) -> Vec<&str> {
    path.split('/').filter(|c| !c.is_empty()).collect()
}

/// True if `path` is `export` or inside it (whole components).
fn within(export: &str, path: &str) -> bool {
    let (e, p) = (components(export), components(path));
    p.len() >= e.len() && e.iter().zip(&p).all(|(a, b)| a == b)
}

/// The export of `exports` to mount for `path`: the longest that contains it.
fn best_export<'a>(exports: &'a [String], path: &str) -> Option<&'a str> {
    exports
        .iter()
        .filter(|e| e.starts_with('/') && within(e, path))
        .max_by_key(|e| components(e).len())
        .map(String::as_str)
}

// ---------------------------------------------------------------------------------------
// A mounted export

/// One mounted export: addresses, root handle, credential and the connection pool.
struct Session {
    target: Target,
    export: String,
    root_fh: Bytes,
    rtmax: u32,
    rpc: Rpc,
}

impl Session {
    /// Finds the ports, mounts the export holding `target.path`, asks FSINFO.
    async fn connect(target: &Target, config: &RemoteConfig) -> Result<Arc<Session>, Fail> {
        let timeouts = Timeouts::from(config);
        let ip = resolve(&target.host, timeouts.connect).await?;
        let cred = credential(target);
        let portmap = SocketAddr::new(ip, PMAP_PORT);
        let mut portmap_failure = None;
        let nfs_port = match target.nfs_port {
            Some(p) => p,
            None => match getport(portmap, NFS_PROG, NFS_VERS, &timeouts).await {
                Ok(p) => p,
                Err(f) => {
                    portmap_failure = Some(f.message);
                    DEFAULT_NFS_PORT
                }
            },
        };
        let mount_port = match target.mount_port {
            Some(p) => p,
            None => getport(portmap, MOUNT_PROG, MOUNT_VERS, &timeouts)
                .await
                .map_err(|f| Fail {
                    kind: f.kind,
                    message: format!(
                        "cannot find the MOUNT service ({}); give its port as ?mountport=N",
                        portmap_failure.unwrap_or(f.message)
                    ),
                })?,
        };
        let mount_addr = SocketAddr::new(ip, mount_port);
        let (export, root_fh, flavor) = mount(mount_addr, &target.path, &cred, &timeouts).await?;
        let cred = if flavor == AUTH_SYS {
            cred
        } else {
            auth_none()
        };
        let nfs_addr = SocketAddr::new(ip, nfs_port);
        let connections = config.max_in_flight.clamp(1, MAX_CONNECTIONS);
        let mut session = Session {
            target: target.clone(),
            export,
            root_fh,
            rtmax: DEFAULT_READ,
            rpc: Rpc::new(nfs_addr, cred, timeouts, connections),
        };
        session.rtmax = session.fsinfo().await?;
        Ok(Arc::new(session))
    }

    /// The URI of `path` on this server, for messages.
    fn uri_for(&self, path: &str) -> String {
        format!(
            "nfs://{}{}",
            self.target.authority,
            super::related::encode_path(path)
        )
    }

    /// Opens the regular file at `path` (inside this session's export).
    async fn open_path(self: &Arc<Self>, path: &str, uri: String) -> Result<NfsBackend, Fail> {
        let (fh, attr) = self.resolve(path).await?;
        if attr.ftype != NF3REG {
            return Err(Fail::permanent(match attr.ftype {
                NF3DIR => "it is a directory, not a file".to_owned(),
                t => format!("it is not a regular file (NFS type {t})"),
            }));
        }
        if attr.size > super::MAX_OBJECT_SIZE {
            return Err(Fail::permanent(format!(
                "the server says the file is {} bytes, more than the largest size files and NBD clients can address ({})",
                attr.size,
                super::MAX_OBJECT_SIZE
            )));
        }
        let identity = format!("mtime:{},fileid:{}", time_text(attr.mtime), attr.fileid);
        let dir = normalize(&format!("{path}/.."));
        Ok(NfsBackend {
            uri,
            identity,
            session: self.clone(),
            fh,
            pinned: attr,
            dir,
        })
    }

    /// LOOKUPs `path` component by component from the export's root, following
    /// symbolic links that stay inside the export; GETATTRs the result.
    async fn resolve(&self, path: &str) -> Result<(Bytes, Attr), Fail> {
        let mut path = normalize(path);
        let mut links = 0;
        'restart: loop {
            if !within(&self.export, &path) {
                return Err(Fail::permanent(format!(
                    "{path:?} is outside the export {:?}",
                    self.export
                )));
            }
            let all = components(&path);
            let skip = components(&self.export).len();
            let mut fh = self.root_fh.clone();
            let mut walked: Vec<&str> = all[..skip].to_vec();
            let mut rest: VecDeque<&str> = all[skip..].iter().copied().collect();
            while let Some(name) = rest.pop_front() {
                let here = format!("/{}", walked.join("/"));
                let (child, attr) = self.lookup(&fh, name, &here).await?;
                let attr = match attr {
                    Some(a) => a,
                    None => self.getattr(&child).await?,
                };
                if attr.ftype == NF3LNK {
                    links += 1;
                    if links > MAX_SYMLINKS {
                        return Err(Fail::permanent(format!(
                            "more than {MAX_SYMLINKS} symbolic links in {path:?}"
                        )));
                    }
                    let target = self.readlink(&child).await?;
                    let tail: Vec<&str> = rest.iter().copied().collect();
                    let joined = if target.starts_with('/') {
                        format!("{target}/{}", tail.join("/"))
                    } else {
                        format!("{here}/{target}/{}", tail.join("/"))
                    };
                    path = normalize(&joined);
                    continue 'restart;
                }
                if !rest.is_empty() && attr.ftype != NF3DIR {
                    return Err(Fail::permanent(format!(
                        "{:?} is not a directory",
                        format!("{here}/{name}")
                    )));
                }
                walked.push(name);
                fh = child;
                if rest.is_empty() {
                    return Ok((fh, attr));
                }
            }
            // The path is the export itself.
            let attr = self.getattr(&fh).await?;
            return Ok((fh, attr));
        }
    }

    async fn fsinfo(&self) -> Result<u32, Fail> {
        let mut args = Enc::default();
        args.opaque(&self.root_fh);
        let reply = self.rpc.call(NFSPROC3_FSINFO, &args.0, MAX_REPLY).await?;
        let mut d = reply.decoder();
        let stat = d.u32()?;
        if stat != 0 {
            return Err(nfs_status(stat, "FSINFO"));
        }
        d.post_op_attr()?;
        let rtmax = d.u32()?;
        Ok(if rtmax == 0 {
            DEFAULT_READ
        } else {
            rtmax.clamp(512, MAX_READ)
        })
    }

    async fn getattr(&self, fh: &[u8]) -> Result<Attr, Fail> {
        let mut args = Enc::default();
        args.opaque(fh);
        let reply = self.rpc.call(NFSPROC3_GETATTR, &args.0, MAX_REPLY).await?;
        let mut d = reply.decoder();
        match d.u32()? {
            0 => d.fattr3(),
            stat => Err(nfs_status(stat, "GETATTR")),
        }
    }

    async fn lookup(
        &self,
        dir: &[u8],
        name: &str,
        dir_path: &str,
    ) -> Result<(Bytes, Option<Attr>), Fail> {
        let mut args = Enc::default();
        args.opaque(dir);
        args.opaque(name.as_bytes());
        let reply = self.rpc.call(NFSPROC3_LOOKUP, &args.0, MAX_REPLY).await?;
        let mut d = reply.decoder();
        match d.u32()? {
            0 => {
                let fh = d.opaque_range(FHSIZE3)?;
                let attr = d.post_op_attr()?;
                Ok((reply.slice(fh), attr))
            }
            stat => {
                let path = normalize(&format!("{dir_path}/{name}"));
                Err(nfs_status(stat, &format!("looking up {path:?}")))
            }
        }
    }

    async fn readlink(&self, fh: &[u8]) -> Result<String, Fail> {
        let mut args = Enc::default();
        args.opaque(fh);
        let reply = self.rpc.call(NFSPROC3_READLINK, &args.0, MAX_REPLY).await?;
        let mut d = reply.decoder();
        match d.u32()? {
            0 => {
                d.post_op_attr()?;
                let target = d.opaque(4096)?;
                String::from_utf8(target.to_vec())
                    .map_err(|_| Fail::permanent("a symbolic link's target is not UTF-8"))
            }
            stat => Err(nfs_status(stat, "READLINK")),
        }
    }

    async fn read(&self, fh: &[u8], offset: u64, count: u32) -> Result<ReadReply, Fail> {
        let mut args = Enc::default();
        args.opaque(fh);
        args.u64(offset);
        args.u32(count);
        let max = count as usize + READ_OVERHEAD;
        let reply = self.rpc.call(NFSPROC3_READ, &args.0, max).await?;
        let mut d = reply.decoder();
        match d.u32()? {
            0 => {
                let attr = d.post_op_attr()?;
                let n = d.u32()?;
                let eof = d.bool()?;
                let data = d.opaque_range(count as usize)?;
                if data.len() != n as usize {
                    return Err(malformed("READ count differs from the data's length"));
                }
                Ok(ReadReply {
                    attr,
                    eof,
                    data: reply.slice(data),
                })
            }
            stat => Err(nfs_status(stat, "READ")),
        }
    }
}

struct ReadReply {
    attr: Option<Attr>,
    eof: bool,
    data: Bytes,
}

/// The attributes that matter here, from an `fattr3`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Attr {
    ftype: u32,
    size: u64,
    fileid: u64,
    mtime: (u32, u32),
}

async fn resolve(host: &str, timeout: Duration) -> Result<IpAddr, Fail> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(ip);
    }
    let lookup = tokio::net::lookup_host((host, 0));
    match tokio::time::timeout(timeout, lookup).await {
        Err(_) => Err(Fail::transient(format!("resolving {host:?} timed out"))),
        Ok(Err(e)) => Err(Fail::io(&format!("resolving {host:?}"), &e)),
        Ok(Ok(mut addrs)) => addrs
            .next()
            .map(|a| a.ip())
            .ok_or_else(|| Fail::permanent(format!("{host:?} has no address"))),
    }
}

/// Asks the portmapper at `addr` for the TCP port of `prog`/`vers`.
async fn getport(addr: SocketAddr, prog: u32, vers: u32, t: &Timeouts) -> Result<u16, Fail> {
    let mut conn = Conn::connect(addr, t).await?;
    let mut args = Enc::default();
    args.u32(prog);
    args.u32(vers);
    args.u32(IPPROTO_TCP);
    args.u32(0);
    let reply = conn
        .call(
            PMAP_PROG,
            PMAP_VERS,
            PMAPPROC_GETPORT,
            &auth_none(),
            &args.0,
            MAX_REPLY,
            t,
        )
        .await?;
    let port = reply.decoder().u32()?;
    match u16::try_from(port) {
        Ok(0) => Err(Fail::permanent(format!(
            "the portmapper at {addr} knows no program {prog} version {vers} over TCP"
        ))),
        Ok(p) => Ok(p),
        Err(_) => Err(malformed("port number above 65535")),
    }
}

/// Mounts the export holding `path`: returns the export, its root handle and the
/// authentication flavor to use.
async fn mount(
    addr: SocketAddr,
    path: &str,
    cred: &[u8],
    t: &Timeouts,
) -> Result<(String, Bytes, u32), Fail> {
    let mut conn = Conn::connect(addr, t).await?;
    let exports = match conn
        .call(
            MOUNT_PROG,
            MOUNT_VERS,
            MOUNTPROC3_EXPORT,
            cred,
            &[],
            MAX_REPLY,
            t,
        )
        .await
    {
        Ok(reply) => parse_exports(&mut reply.decoder())?,
        Err(f) if f.kind == FetchErrorKind::Transient => return Err(f),
        // A server that does not list its exports: find the mount point by trying.
        Err(_) => {
            conn = Conn::connect(addr, t).await?;
            Vec::new()
        }
    };
    let mut candidates: Vec<String> = Vec::new();
    if let Some(e) = best_export(&exports, path) {
        candidates.push(e.to_owned());
    } else {
        let mut dir = normalize(&format!("{path}/.."));
        loop {
            candidates.push(dir.clone());
            if dir == "/" {
                break;
            }
            dir = normalize(&format!("{dir}/.."));
        }
    }
    let mut last = None;
    for export in candidates {
        let mut args = Enc::default();
        args.opaque(export.as_bytes());
        let reply = conn
            .call(
                MOUNT_PROG,
                MOUNT_VERS,
                MOUNTPROC3_MNT,
                cred,
                &args.0,
                MAX_REPLY,
                t,
            )
            .await?;
        let mut d = reply.decoder();
        let stat = d.u32()?;
        if stat != 0 {
            last = Some(mount_status(stat, &export));
            continue;
        }
        let fh = d.opaque_range(FHSIZE3)?;
        let count = d.u32()?;
        if count > 64 {
            return Err(malformed("too many authentication flavors"));
        }
        let flavors = (0..count).map(|_| d.u32()).collect::<Result<Vec<_>, _>>()?;
        let flavor = if flavors.is_empty() || flavors.contains(&AUTH_SYS) {
            AUTH_SYS
        } else if flavors.contains(&AUTH_NONE) {
            AUTH_NONE
        } else {
            return Err(Fail::permanent(format!(
                "the export {export:?} accepts only authentication flavors {flavors:?} \
                 (Kerberos?); this client speaks AUTH_SYS"
            )));
        };
        return Ok((export, reply.slice(fh), flavor));
    }
    Err(last
        .unwrap_or_else(|| Fail::permanent(format!("no export of the server contains {path:?}"))))
}

fn parse_exports(d: &mut Dec<'_>) -> Result<Vec<String>, Fail> {
    let mut exports = Vec::new();
    while d.bool()? {
        let dir = d.opaque(1024)?;
        exports.push(String::from_utf8_lossy(dir).into_owned());
        while d.bool()? {
            d.opaque(255)?;
        }
        if exports.len() > 100_000 {
            return Err(malformed("too many exports"));
        }
    }
    Ok(exports)
}

/// An AUTH_SYS credential (flavor and body) for `target`'s uid and gid, else this
/// process's.
fn credential(target: &Target) -> Vec<u8> {
    let uid = target
        .uid
        .unwrap_or_else(|| rustix::process::getuid().as_raw());
    let gid = target
        .gid
        .unwrap_or_else(|| rustix::process::getgid().as_raw());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host = host.trim();
    let host = host.get(..host.len().min(255)).unwrap_or("thinline");
    let mut body = Enc::default();
    body.u32(0); // stamp
    body.opaque(host.as_bytes());
    body.u32(uid);
    body.u32(gid);
    body.u32(1);
    body.u32(gid);
    let mut cred = Enc::default();
    cred.u32(AUTH_SYS);
    cred.opaque(&body.0);
    cred.0
}

fn auth_none() -> Vec<u8> {
    let mut cred = Enc::default();
    cred.u32(AUTH_NONE);
    cred.u32(0);
    cred.0
}

// ---------------------------------------------------------------------------------------
// ONC RPC over TCP

#[derive(Debug, Clone, Copy)]
struct Timeouts {
    connect: Duration,
    first_byte: Duration,
    idle: Duration,
    /// For a whole reply: the first byte's wait plus one idle pause, as NBD's request
    /// timeout (a READ is at most 1 MiB).
    reply: Duration,
}

impl From<&RemoteConfig> for Timeouts {
    fn from(c: &RemoteConfig) -> Self {
        Timeouts {
            connect: c.connect_timeout,
            first_byte: c.first_byte_timeout,
            idle: c.idle_timeout,
            reply: c.first_byte_timeout + c.idle_timeout,
        }
    }
}

/// NFS calls over a pool of connections to one server.
struct Rpc {
    addr: SocketAddr,
    cred: Vec<u8>,
    timeouts: Timeouts,
    idle: Mutex<Vec<Conn>>,
    permits: Semaphore,
}

impl Rpc {
    fn new(addr: SocketAddr, cred: Vec<u8>, timeouts: Timeouts, connections: usize) -> Rpc {
        Rpc {
            addr,
            cred,
            timeouts,
            idle: Mutex::new(Vec::new()),
            permits: Semaphore::new(connections),
        }
    }

    /// One NFSv3 call on an idle connection (or a new one). The connection goes back
    /// to the pool only after a complete, successful exchange; a failed or cancelled
    /// call drops it.
    async fn call(&self, proc: u32, args: &[u8], max_reply: usize) -> Result<Reply, Fail> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| Fail::transient("the connection pool is closed"))?;
        let mut conn = loop {
            let idle = self.idle.lock().ok().and_then(|mut v| v.pop());
            match idle {
                // The server may have closed an idle connection meanwhile.
                Some(c) if c.is_open() => break c,
                Some(_) => continue,
                None => break Conn::connect(self.addr, &self.timeouts).await?,
            }
        };
        let reply = conn
            .call(
                NFS_PROG,
                NFS_VERS,
                proc,
                &self.cred,
                args,
                max_reply,
                &self.timeouts,
            )
            .await?;
        if let Ok(mut idle) = self.idle.lock() {
            idle.push(conn);
        }
        Ok(reply)
    }
}

/// One TCP connection, one call at a time.
struct Conn {
    stream: TcpStream,
    addr: SocketAddr,
    xid: u32,
}

impl Conn {
    async fn connect(addr: SocketAddr, t: &Timeouts) -> Result<Conn, Fail> {
        let what = format!("connecting to {addr}");
        let stream = match tokio::time::timeout(t.connect, connect_reserved(addr)).await {
            Err(_) => return Err(Fail::transient(format!("{what}: timed out"))),
            Ok(Err(e)) => return Err(Fail::io(&what, &e)),
            Ok(Ok(s)) => s,
        };
        let _ = stream.set_nodelay(true);
        Ok(Conn {
            stream,
            addr,
            xid: random() as u32,
        })
    }

    /// False if the server closed the connection (or sent something unasked).
    fn is_open(&self) -> bool {
        let mut byte = [0u8; 1];
        matches!(self.stream.try_read(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Sends one call and reads its reply (all fragments). Returns the reply with the
    /// decoder positioned at the procedure's results.
    #[allow(clippy::too_many_arguments)]
    async fn call(
        &mut self,
        prog: u32,
        vers: u32,
        proc: u32,
        cred: &[u8],
        args: &[u8],
        max_reply: usize,
        t: &Timeouts,
    ) -> Result<Reply, Fail> {
        let xid = self.xid;
        self.xid = self.xid.wrapping_add(1);
        let mut msg = Enc(Vec::with_capacity(48 + cred.len() + args.len()));
        msg.u32(0); // record mark, below
        msg.u32(xid);
        msg.u32(0); // CALL
        msg.u32(2); // RPC version
        msg.u32(prog);
        msg.u32(vers);
        msg.u32(proc);
        msg.0.extend_from_slice(cred);
        msg.u32(AUTH_NONE); // verifier
        msg.u32(0);
        msg.0.extend_from_slice(args);
        let mark = 0x8000_0000 | (msg.0.len() - 4) as u32;
        msg.0[..4].copy_from_slice(&mark.to_be_bytes());
        match tokio::time::timeout(t.idle, self.stream.write_all(&msg.0)).await {
            Err(_) => return Err(Fail::transient("sending a call timed out")),
            Ok(Err(e)) => return Err(Fail::io("sending a call", &e)),
            Ok(Ok(())) => {}
        }

        // The whole reply, not just each piece of it, has a deadline: a server that
        // trickles one byte just inside the idle timeout would hold the call forever.
        let body = match tokio::time::timeout(t.reply, self.receive(max_reply, t)).await {
            Err(_) => {
                return Err(Fail::transient(format!(
                    "the reply did not arrive whole within {:?}",
                    t.reply
                )));
            }
            Ok(body) => body?,
        };
        let mut d = Dec::new(&body);
        if d.u32()? != xid {
            return Err(malformed("the reply is for another call"));
        }
        if d.u32()? != 1 {
            return Err(malformed("not a reply"));
        }
        match d.u32()? {
            0 => {
                d.u32()?; // verifier flavor
                d.opaque(400)?;
                match d.u32()? {
                    0 => {}
                    1 => {
                        return Err(Fail::permanent(format!(
                            "{} does not serve RPC program {prog}",
                            self.addr
                        )));
                    }
                    2 => {
                        let (low, high) = (d.u32()?, d.u32()?);
                        return Err(Fail::permanent(format!(
                            "{} does not serve version {vers} of RPC program {prog} \
                             (it has {low}..{high})",
                            self.addr
                        )));
                    }
                    3 => {
                        return Err(Fail::permanent(format!(
                            "procedure {proc} of program {prog} is not available"
                        )));
                    }
                    4 => return Err(Fail::permanent("the server could not decode the call")),
                    5 => return Err(Fail::transient("RPC system error on the server")),
                    other => return Err(malformed(&format!("accept status {other}"))),
                }
            }
            1 => {
                return Err(match d.u32()? {
                    0 => Fail::permanent("the server does not speak RPC version 2"),
                    1 => {
                        let stat = d.u32()?;
                        let why = match stat {
                            1 => "bad credential",
                            2 => "credential rejected",
                            3 => "bad verifier",
                            4 => "verifier rejected",
                            5 => "credential too weak (privileged port or Kerberos needed?)",
                            _ => "authentication failed",
                        };
                        Fail::permanent(format!("the server refused the call: {why} ({stat})"))
                    }
                    other => malformed(&format!("reject status {other}")),
                });
            }
            other => return Err(malformed(&format!("reply status {other}"))),
        }
        let start = d.pos;
        Ok(Reply {
            body: Bytes::from(body),
            start,
        })
    }

    /// Reads one reply record (all its fragments, at most `max_reply` bytes).
    async fn receive(&mut self, max_reply: usize, t: &Timeouts) -> Result<Vec<u8>, Fail> {
        let mut body = Vec::new();
        let mut first = true;
        let mut fragments = 0;
        loop {
            fragments += 1;
            if fragments > 4096 {
                return Err(malformed("a reply in more than 4096 fragments"));
            }
            let mut mark = [0u8; 4];
            let wait = if first { t.first_byte } else { t.idle };
            self.read_full(&mut mark, wait, t.idle).await?;
            first = false;
            let mark = u32::from_be_bytes(mark);
            let len = (mark & 0x7fff_ffff) as usize;
            if body.len() + len > max_reply {
                return Err(malformed(&format!(
                    "a reply of more than {max_reply} bytes"
                )));
            }
            let start = body.len();
            body.resize(start + len, 0);
            self.read_full(&mut body[start..], t.idle, t.idle).await?;
            if mark & 0x8000_0000 != 0 {
                break;
            }
        }
        Ok(body)
    }

    /// Fills `buf`, waiting at most `first` for the first bytes and `idle` between reads.
    async fn read_full(
        &mut self,
        buf: &mut [u8],
        first: Duration,
        idle: Duration,
    ) -> Result<(), Fail> {
        let mut filled = 0;
        while filled < buf.len() {
            let wait = if filled == 0 { first } else { idle };
            match tokio::time::timeout(wait, self.stream.read(&mut buf[filled..])).await {
                Err(_) => return Err(Fail::transient("timed out waiting for the server's reply")),
                Ok(Err(e)) => return Err(Fail::io("reading a reply", &e)),
                Ok(Ok(0)) => return Err(Fail::transient("the server closed the connection")),
                Ok(Ok(n)) => filled += n,
            }
        }
        Ok(())
    }
}

/// Connects from a reserved port (600–1023) when allowed, as Linux's nfsd expects by
/// default, else from any port.
async fn connect_reserved(addr: SocketAddr) -> io::Result<TcpStream> {
    let start = random() as u16;
    for i in 0..32u16 {
        let port = 600 + (start.wrapping_add(i) % 424);
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        let local: IpAddr = if addr.is_ipv4() {
            Ipv4Addr::UNSPECIFIED.into()
        } else {
            Ipv6Addr::UNSPECIFIED.into()
        };
        socket.set_reuseaddr(true)?;
        match socket.bind(SocketAddr::new(local, port)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
            // Not root (EACCES): any port will do.
            Err(_) => break,
        }
        match socket.connect(addr).await {
            Ok(stream) => return Ok(stream),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::AddrInUse | io::ErrorKind::AddrNotAvailable
                ) =>
            {
                continue;
            }
            Err(e) => return Err(e),
        }
    }
    TcpStream::connect(addr).await
}

fn random() -> u64 {
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

/// A successful reply: the record and where the procedure's results start.
struct Reply {
    body: Bytes,
    start: usize,
}

impl Reply {
    fn decoder(&self) -> Dec<'_> {
        let mut d = Dec::new(&self.body);
        d.pos = self.start;
        d
    }

    fn slice(&self, range: Range<usize>) -> Bytes {
        self.body.slice(range)
    }
}

// ---------------------------------------------------------------------------------------
// XDR

/// XDR encoder.
#[derive(Default)]
struct Enc(Vec<u8>);

impl Enc {
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }

    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }

    fn opaque(&mut self, bytes: &[u8]) {
        self.u32(bytes.len() as u32);
        self.0.extend_from_slice(bytes);
        self.0.resize(self.0.len() + (4 - bytes.len() % 4) % 4, 0);
    }
}

/// XDR decoder over a received record; every length is checked against the record.
struct Dec<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Dec<'a> {
    fn new(buf: &'a [u8]) -> Dec<'a> {
        Dec { buf, pos: 0 }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Fail> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| malformed("truncated"))?;
        let bytes = &self.buf[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    fn u32(&mut self) -> Result<u32, Fail> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, Fail> {
        Ok((u64::from(self.u32()?) << 32) | u64::from(self.u32()?))
    }

    fn bool(&mut self) -> Result<bool, Fail> {
        match self.u32()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(malformed("a boolean is neither 0 nor 1")),
        }
    }

    /// A variable-length opaque of at most `max` bytes, as a range of the record.
    fn opaque_range(&mut self, max: usize) -> Result<Range<usize>, Fail> {
        let len = self.u32()? as usize;
        if len > max {
            return Err(malformed(&format!("{len} bytes where at most {max} fit")));
        }
        let start = self.pos;
        self.take(len)?;
        self.take((4 - len % 4) % 4)?;
        Ok(start..start + len)
    }

    fn opaque(&mut self, max: usize) -> Result<&'a [u8], Fail> {
        let range = self.opaque_range(max)?;
        Ok(&self.buf[range])
    }

    fn fattr3(&mut self) -> Result<Attr, Fail> {
        let ftype = self.u32()?;
        self.take(16)?; // mode, nlink, uid, gid
        let size = self.u64()?;
        self.take(8 + 8 + 8)?; // used, rdev, fsid
        let fileid = self.u64()?;
        self.take(8)?; // atime
        let mtime = (self.u32()?, self.u32()?);
        self.take(8)?; // ctime
        Ok(Attr {
            ftype,
            size,
            fileid,
            mtime,
        })
    }

    fn post_op_attr(&mut self) -> Result<Option<Attr>, Fail> {
        if self.bool()? {
            self.fattr3().map(Some)
        } else {
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_split_into_host_ports_and_path() {
        let t = parse_uri("nfs://user@nas:2049/srv/img/a%20b.qcow2?mountport=635&uid=7").unwrap();
        assert_eq!(t.host, "nas");
        assert_eq!(t.authority, "nas:2049");
        assert_eq!(
            (t.nfs_port, t.mount_port, t.uid, t.gid),
            (Some(2049), Some(635), Some(7), None)
        );
        assert_eq!(t.path, "/srv/img/a b.qcow2");
        let t = parse_uri("NFS://[::1]:20490//a/./b/../c").unwrap();
        assert_eq!(
            (t.host.as_str(), t.nfs_port, t.path.as_str()),
            ("::1", Some(20490), "/a/c")
        );
        let t = parse_uri("nfs://h/x?nfsport=1&version=3").unwrap();
        assert_eq!(t.nfs_port, Some(1));
        for bad in [
            "nfs:///x",
            "nfs://h",
            "nfs://h/",
            "nfs://h/..",
            "nfs://h:99999/x",
            "nfs://h/x?bogus=1",
            "nfs://h/x?version=4",
            "nfs://h/%zz",
            "http://h/x",
        ] {
            assert!(parse_uri(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_longest_containing_export_wins() {
        let exports: Vec<String> = ["/", "/srv", "/srv/img", "/srv/im"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(best_export(&exports, "/srv/img/a.qcow2"), Some("/srv/img"));
        assert_eq!(best_export(&exports, "/srv/images/a"), Some("/srv"));
        assert_eq!(best_export(&exports, "/other"), Some("/"));
        assert_eq!(best_export(&exports[1..], "/other"), None);
        assert!(within("/srv/img/", "/srv/img"));
        assert!(!within("/srv/img", "/srv/imgs/x"));
    }

    #[test]
    fn paths_normalise_without_climbing_above_the_root() {
        assert_eq!(normalize("a/../../b/"), "/b");
    }

    #[test]
    fn decoder_bounds_every_length() {
        let mut e = Enc::default();
        e.opaque(b"abcde");
        e.u32(0xffff_ffff);
        let mut d = Dec::new(&e.0);
        assert_eq!(d.opaque(8).unwrap(), b"abcde");
        assert!(d.opaque(usize::MAX).is_err());
        let mut d = Dec::new(&e.0);
        assert!(d.opaque(4).is_err());
    }

    /// A server that answers one call in three fragments, echoing the xid.
    #[tokio::test]
    async fn fragmented_replies_are_reassembled() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut head = [0u8; 8];
            s.read_exact(&mut head).await.unwrap();
            let len = (u32::from_be_bytes(head[..4].try_into().unwrap()) & 0x7fff_ffff) as usize;
            let mut rest = vec![0u8; len - 4];
            s.read_exact(&mut rest).await.unwrap();
            let mut reply = Enc::default();
            reply.0.extend_from_slice(&head[4..8]); // xid
            for v in [1, 0, 0, 0, 0, 0, 0x1234_5678] {
                reply.u32(v);
            }
            let (a, b) = reply.0.split_at(10);
            let (b, c) = b.split_at(7);
            for (part, last) in [(a, false), (b, false), (c, true)] {
                let mark = part.len() as u32 | if last { 0x8000_0000 } else { 0 };
                s.write_all(&mark.to_be_bytes()).await.unwrap();
                s.write_all(part).await.unwrap();
            }
        });
        let t = Timeouts::from(&RemoteConfig::default());
        let mut conn = Conn::connect(addr, &t).await.unwrap();
        let reply = conn
            .call(NFS_PROG, NFS_VERS, 0, &auth_none(), &[], 1024, &t)
            .await
            .unwrap();
        let mut d = reply.decoder();
        assert_eq!((d.u32().unwrap(), d.u32().unwrap()), (0, 0x1234_5678));
        server.await.unwrap();
    }

    /// A server that announces a reply and then sends it a byte every 50 ms, well
    /// inside the idle timeout.
    #[tokio::test]
    async fn a_reply_trickled_inside_the_idle_timeout_still_times_out_whole() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut head = [0u8; 8];
            s.read_exact(&mut head).await.unwrap();
            s.write_all(&(0x8000_0000u32 | 1000).to_be_bytes())
                .await
                .unwrap();
            s.write_all(&head[4..8]).await.unwrap(); // xid
            for _ in 0..996 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if s.write_all(&[0]).await.is_err() {
                    return;
                }
            }
        });
        let config = RemoteConfig {
            first_byte_timeout: Duration::from_millis(300),
            idle_timeout: Duration::from_millis(300),
            ..RemoteConfig::default()
        };
        let t = Timeouts::from(&config);
        let mut conn = Conn::connect(addr, &t).await.unwrap();
        // Without a deadline for the whole reply this takes 50 s.
        let cred = auth_none();
        let call = conn.call(NFS_PROG, NFS_VERS, 0, &cred, &[], 4096, &t);
        let failed = tokio::time::timeout(Duration::from_secs(20), call)
            .await
            .expect("the call ended")
            .err()
            .expect("the call failed");
        assert_eq!(failed.kind, FetchErrorKind::Transient);
        assert!(
            failed.message.contains("did not arrive whole"),
            "{}",
            failed.message
        );
        drop(conn);
        server.await.unwrap();
    }
}
