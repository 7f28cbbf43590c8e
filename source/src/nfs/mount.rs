//! Finding and mounting the export: portmap (RFC 1833) GETPORT for the ports of the
//! services, and MOUNT v3 (RFC 1813, appendix I) EXPORT and MNT, which give the export
//! that holds a path, its root file handle and the authentication flavor to use.

use std::net::SocketAddr;

use bytes::Bytes;

use super::rpc::{AUTH_NONE, AUTH_SYS, Conn, MAX_REPLY, Timeouts, auth_none};
use super::uri::{components, normalize, within};
use super::xdr::{Dec, Enc, FHSIZE3, Fail, malformed};
use crate::FetchErrorKind;

pub(super) const PMAP_PORT: u16 = 111;
const PMAP_PROG: u32 = 100_000;
const PMAP_VERS: u32 = 2;
const PMAPPROC_GETPORT: u32 = 3;
const IPPROTO_TCP: u32 = 6;
pub(super) const MOUNT_PROG: u32 = 100_005;
pub(super) const MOUNT_VERS: u32 = 3;
const MOUNTPROC3_MNT: u32 = 1;
const MOUNTPROC3_EXPORT: u32 = 5;

/// Asks the portmapper at `addr` for the TCP port of `prog`/`vers`.
pub(super) async fn getport(
    addr: SocketAddr,
    prog: u32,
    vers: u32,
    t: &Timeouts,
) -> Result<u16, Fail> {
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
pub(super) async fn mount(
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

/// The export of `exports` to mount for `path`: the longest that contains it.
fn best_export<'a>(exports: &'a [String], path: &str) -> Option<&'a str> {
    exports
        .iter()
        .filter(|e| e.starts_with('/') && within(e, path))
        .max_by_key(|e| components(e).len())
        .map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }
}
