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

mod mount;
mod rpc;
mod uri;
mod xdr;

use std::collections::VecDeque;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use tokio::task::JoinSet;

use crate::redact::redact;
use crate::{FetchError, FetchErrorKind, RangeBackend, RemoteConfig};

use mount::{MOUNT_PROG, MOUNT_VERS, PMAP_PORT, getport, mount};
use rpc::{AUTH_SYS, MAX_REPLY, NFS_PROG, NFS_VERS, Rpc, Timeouts, auth_none, credential, resolve};
use uri::{Target, components, normalize, parse_uri, within};
use xdr::{Attr, Enc, FHSIZE3, Fail, malformed};

/// Most TCP connections to one mount, whatever `max_in_flight` says.
pub const MAX_CONNECTIONS: usize = 4;
/// Largest READ issued, whatever the server allows.
const MAX_READ: u32 = 1 << 20;
/// READ size when the server reports none.
const DEFAULT_READ: u32 = 32 << 10;
/// Room for the RPC header and attributes of a READ reply besides the data.
const READ_OVERHEAD: usize = 4096;
/// READ calls for one span of at most `rtmax` bytes: short replies are continued, but a
/// server that answers a byte at a time must not hold a read for a million calls.
const MAX_READS_PER_SPAN: usize = 64;
/// Symbolic links followed while resolving one path.
const MAX_SYMLINKS: usize = 40;

const DEFAULT_NFS_PORT: u16 = 2049;
const NFSPROC3_GETATTR: u32 = 1;
const NFSPROC3_LOOKUP: u32 = 3;
const NFSPROC3_READLINK: u32 = 5;
const NFSPROC3_READ: u32 = 6;
const NFSPROC3_FSINFO: u32 = 19;
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
        let cred = credential(target.uid, target.gid);
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
