//! The SRs this user created or introduced, so commands can name an SR by UUID and
//! `sr list` can show them: a small JSON file replaced atomically under a lock.
//! `THINLINE_SR_REGISTRY` names the file; the default is `/var/lib/thinline/srs.json`
//! for root (the host's SRs, whether a shell or a system service asks: services have no
//! home), else `$XDG_STATE_HOME/thinline/srs.json` (or `~/.local/state/thinline/srs.json`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{Code, Error, Result};

/// One registered SR.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub uuid: Uuid,
    /// The SR's directory; an LVM SR's home on this host.
    pub path: PathBuf,
    /// An LVM SR's volume group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vg: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct File {
    srs: Vec<Entry>,
}

/// The registry file in use.
pub fn location() -> PathBuf {
    if let Some(p) = std::env::var_os("THINLINE_SR_REGISTRY") {
        return PathBuf::from(p);
    }
    if rustix::process::geteuid().is_root() {
        return PathBuf::from("/var/lib/thinline/srs.json");
    }
    let state = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(|| PathBuf::from("/var/lib"));
    state.join("thinline").join("srs.json")
}

fn read(path: &Path) -> Result<File> {
    crate::store::read_json(path)
}

/// Changes the registry under its lock.
fn change(f: impl FnOnce(&mut Vec<Entry>)) -> Result<()> {
    let path = location();
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::io(format!("cannot create {}", dir.display()), &e))?;
    let _lock = crate::lockfile::exclusive(&path.with_extension("lock"))?;
    let mut file = read(&path)?;
    f(&mut file.srs);
    crate::store::write_json(&path, &file, 0o644)
}

/// Registers (or re-registers at a new path) the SR `uuid` at `path`; an LVM SR with
/// its VG `vg`.
pub fn add(uuid: Uuid, path: &Path, vg: Option<&str>) -> Result<()> {
    change(|srs| {
        srs.retain(|e| e.uuid != uuid && e.path != path);
        srs.push(Entry {
            uuid,
            path: path.to_owned(),
            vg: vg.map(str::to_owned),
        });
    })
}

/// Where the LVM SR `uuid` has its home on this host (beside the registry file).
pub fn lvm_home(uuid: Uuid) -> PathBuf {
    let registry = location();
    let dir = registry.parent().unwrap_or(Path::new("."));
    dir.join("lvm").join(uuid.to_string())
}

/// Forgets the SR `uuid`.
pub fn remove(uuid: Uuid) -> Result<()> {
    change(|srs| srs.retain(|e| e.uuid != uuid))
}

/// Every registered SR.
pub fn list() -> Result<Vec<Entry>> {
    Ok(read(&location())?.srs)
}

/// The SR directory `name` means: a directory holding an SR, a registered UUID, or the
/// VG of a registered LVM SR (its home).
pub fn resolve(name: &str) -> Result<PathBuf> {
    let path = Path::new(name);
    if crate::store::is_sr(path) {
        return std::path::absolute(path)
            .map_err(|e| Error::io(format!("cannot resolve {name}"), &e));
    }
    if let Ok(uuid) = Uuid::parse_str(name) {
        if let Some(e) = list()?.into_iter().find(|e| e.uuid == uuid) {
            return Ok(e.path);
        }
        return Err(Error::new(
            Code::SrNotFound,
            format!("no SR with UUID {uuid} is registered (see `thinline sr list`)"),
        ));
    }
    if let Some(e) = list()?
        .into_iter()
        .find(|e| e.vg.as_deref() == Some(name) && !name.contains('/'))
    {
        return Ok(e.path);
    }
    Err(Error::new(
        Code::SrNotFound,
        format!(
            "{name} is neither a directory holding an SR, nor an SR's UUID, nor the VG of a registered LVM SR"
        ),
    ))
}
