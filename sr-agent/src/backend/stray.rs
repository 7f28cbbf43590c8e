//! What a crash can leave in the agent's directory besides half-made volumes: a
//! temporary JSON file not yet renamed into place, credentials of a template whose
//! record was never written (or was removed), a template cache no record uses any
//! more (its template forgotten), and the NBD socket of a VDI that is not attached
//! (its daemon died between serving it and recording it) with nobody listening. `sr check` reports them and `--repair` removes
//! them, with positive evidence only: the agent's own names in the agent's own
//! directories.

use std::path::PathBuf;

use uuid::Uuid;

use super::Finding;
use crate::Result;
use crate::store::{DIR, Sr, remove_if_present};
use crate::template;

/// The JSON files the agent replaces through `NAME.tmp`.
const REPLACED: [&str; 2] = ["sr.json", "credentials.json"];

/// Temporary files of interrupted metadata writes.
fn temporary_files(sr: &Sr) -> Vec<PathBuf> {
    REPLACED
        .iter()
        .map(|name| sr.path.join(DIR).join(format!("{name}.tmp")))
        .filter(|p| p.is_file())
        .collect()
}

/// Credentials whose template has no record.
fn orphan_credentials(sr: &Sr) -> Result<Vec<Uuid>> {
    Ok(template::credentials(&sr.path)?
        .into_keys()
        .filter(|u| !sr.md.get(*u).is_some_and(|v| v.is_template()))
        .collect())
}

fn caches_dir(sr: &Sr) -> PathBuf {
    sr.path.join(DIR).join(crate::cached::CACHES)
}

/// The cache file a template record reads through.
fn cache_name(uri: &str, identity: &str) -> String {
    thinline_cor::cache::cache_file_name(uri, identity)
}

/// Cache files no template record reads through. A record without an identity (made
/// before identities were recorded) reads through a cache named from the identity its
/// template has when the daemon opens it: every cache of its URI counts as used.
fn unused_caches(sr: &Sr) -> Vec<PathBuf> {
    let dir = caches_dir(sr);
    let mut used: Vec<String> = Vec::new();
    for v in sr.md.vdis.iter().filter(|v| v.is_template()) {
        let Some(uri) = v.uri.as_deref() else {
            continue;
        };
        match v.identity.as_deref() {
            Some(identity) => used.push(cache_name(uri, identity)),
            None => used.extend(
                thinline_cor::cache::other_caches_of(&dir, uri, "")
                    .iter()
                    .filter_map(|p| Some(p.file_name()?.to_str()?.to_owned())),
            ),
        }
    }
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|e| e.file_name().into_string().ok().map(|n| (e.path(), n)))
        .filter(|(_, n)| n.ends_with(".cache") && !used.contains(n))
        .map(|(p, _)| p)
        .collect();
    out.sort();
    out
}

/// How old a socket must be to be stale: one being set up for an attach is bound a
/// moment before it is listened on.
const SOCKET_SETUP: std::time::Duration = std::time::Duration::from_secs(30);

/// Sockets in the daemon's directory, of VDIs not attached, that nobody listens on and
/// that are older than [`SOCKET_SETUP`].
fn stale_sockets(sr: &Sr) -> Vec<PathBuf> {
    let attached: Vec<PathBuf> = sr
        .md
        .vdis
        .iter()
        .filter(|v| v.attached)
        .map(|v| crate::daemon::socket_of(&sr.path, v.uuid))
        .collect();
    let Ok(entries) = std::fs::read_dir(crate::daemon::run_dir(&sr.path)) else {
        return Vec::new();
    };
    let ours = |n: &str| {
        n.strip_suffix(".sock")
            .is_some_and(|h| h.len() == 12 && h.bytes().all(|b| b.is_ascii_hexdigit()))
    };
    let mut out: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_name().to_str().is_some_and(ours))
        .map(|e| e.path())
        .filter(|p| !attached.contains(p))
        .filter(|p| {
            std::fs::symlink_metadata(p)
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > SOCKET_SETUP))
        })
        .filter(|p| std::os::unix::net::UnixStream::connect(p).is_err())
        .collect();
    out.sort();
    out
}

/// The agent's stray files, as findings.
pub(crate) fn findings(sr: &Sr) -> Vec<Finding> {
    let mut out = Vec::new();
    for p in temporary_files(sr) {
        out.push(Finding {
            kind: "temporary_file",
            message: format!("{} was left by an interrupted metadata write", p.display()),
            repairable: true,
        });
    }
    match orphan_credentials(sr) {
        Ok(orphans) => out.extend(orphans.into_iter().map(|u| Finding {
            kind: "orphan_credentials",
            message: format!("credentials are kept for {u}, which is no template of the SR"),
            repairable: true,
        })),
        Err(e) => out.push(Finding {
            kind: "damaged_credentials",
            message: e.message,
            repairable: false,
        }),
    }
    for p in stale_sockets(sr) {
        out.push(Finding {
            kind: "stale_socket",
            message: format!(
                "{} is the socket of a VDI that is not attached, and nothing listens on it",
                p.display()
            ),
            repairable: true,
        });
    }
    for p in unused_caches(sr) {
        out.push(Finding {
            kind: "unused_cache",
            message: format!("{} caches a template the SR no longer has", p.display()),
            repairable: true,
        });
    }
    out
}

/// Removes the agent's stray files; says what it did.
pub(crate) fn repair(sr: &Sr) -> Result<Vec<String>> {
    let mut done = Vec::new();
    for p in temporary_files(sr) {
        remove_if_present(&p)?;
        done.push(format!("removed {}", p.display()));
    }
    let orphans = orphan_credentials(sr)?;
    if !orphans.is_empty() {
        let mut creds = template::credentials(&sr.path)?;
        creds.retain(|u, _| !orphans.contains(u));
        template::save_credentials(&sr.path, &creds)?;
        done.extend(
            orphans
                .iter()
                .map(|u| format!("removed the credentials of {u}")),
        );
    }
    for p in stale_sockets(sr) {
        remove_if_present(&p)?;
        done.push(format!("removed the stale socket {}", p.display()));
    }
    for p in unused_caches(sr) {
        remove_if_present(&p)?;
        done.push(format!("removed the unused cache {}", p.display()));
    }
    // A daemon that still holds the cache of a forgotten template (its forget was
    // killed before it asked the daemon) lets go of it.
    let status = crate::daemon::request(&sr.path, &crate::daemon::Request::Status)
        .and_then(|r| r.ok())
        .and_then(|v| serde_json::from_value::<crate::model::DaemonStatus>(v).ok());
    for uri in status.map(|s| s.caches).unwrap_or_default() {
        let known = sr
            .md
            .vdis
            .iter()
            .any(|v| v.is_template() && v.uri.as_deref() == Some(uri.as_str()));
        if !known {
            let forget = crate::daemon::Request::ForgetTemplate { uri: uri.clone() };
            if let Some(answer) = crate::daemon::request(&sr.path, &forget) {
                answer?;
                done.push(format!(
                    "closed the SR daemon's cache of the forgotten template {uri}"
                ));
            }
        }
    }
    Ok(done)
}

/// Removes the cache of a forgotten template record unless another record (a
/// snapshot of the template) reads through it. The daemon may hold it open: it keeps
/// its handle, and the file's space is freed when it lets go.
pub(crate) fn remove_cache_of(sr: &Sr, uri: &str, identity: &str) -> Result<()> {
    let name = cache_name(uri, identity);
    let shared = sr.md.vdis.iter().any(|v| {
        v.is_template() && v.uri.as_deref() == Some(uri) && v.identity.as_deref() == Some(identity)
    });
    if shared {
        return Ok(());
    }
    remove_if_present(&caches_dir(sr).join(name))
}
