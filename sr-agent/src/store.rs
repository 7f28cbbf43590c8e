//! An SR's metadata: one file, `PATH/.thinline-sr/sr.json`, replaced atomically
//! (temporary file, fsync, rename, fsync of the directory), changed only under the
//! SR's lock, and the journal that makes a multi-step operation crash-safe. An LVM
//! SR's records are on its VG's metadata volume instead ([`crate::backend::lvm::mgt`]:
//! two slots, the same atomicity); its directory here is a home on this host
//! (`lvm.json` names the VG and its devices) for what is local: tasks, credentials,
//! the lock is `/run/thinline/lvm-VG.sr.lock`, one per VG on the host.
//!
//! A multi-step operation records its intent first: the files it will make (all in
//! `.thinline-sr/new/`) and the renames it will do. Then it works, commits the new
//! records, and finishes (moves the new files to their names, deletes files no record
//! names any more). Whoever takes the lock next and finds a journal undoes an
//! operation that never committed and finishes one that did. Only files a journal
//! names are ever deleted: positive evidence, never guesswork.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::backend::lvm::host::{LvmHome, lvm_lock, metadata_volume};
use crate::model::{SrRecord, VdiRecord, VdiType};
use crate::{Code, Error, Result};

/// The agent's directory inside an SR.
pub const DIR: &str = ".thinline-sr";
/// Where an operation makes its new files before it commits.
pub const NEW_DIR: &str = "new";
const METADATA: &str = "sr.json";
/// In an LVM SR's home: which VG holds its records.
const LVM_HOME: &str = "lvm.json";
const LOCK: &str = "lock";
/// The metadata format this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// Everything an SR records.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Metadata {
    pub format_version: u32,
    pub sr: SrRecord,
    pub vdis: Vec<VdiRecord>,
    /// An operation in progress (see the module doc).
    #[serde(default)]
    pub journal: Option<Journal>,
}

impl Metadata {
    /// The record with `uuid`.
    pub fn get(&self, uuid: uuid::Uuid) -> Option<&VdiRecord> {
        self.vdis.iter().find(|v| v.uuid == uuid)
    }

    pub fn get_mut(&mut self, uuid: uuid::Uuid) -> Option<&mut VdiRecord> {
        self.vdis.iter_mut().find(|v| v.uuid == uuid)
    }

    /// Records whose volume reads from `uuid`'s.
    pub fn dependents(&self, uuid: uuid::Uuid) -> impl Iterator<Item = &VdiRecord> {
        self.vdis.iter().filter(move |v| v.backing == Some(uuid))
    }
}

/// A rename inside the SR directory (paths relative to it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Move {
    pub from: String,
    pub to: String,
}

/// A change of the backing file an image names (see [`thinline_format::qcow2::set_backing`]),
/// done before the commit and undone (back to `from`) if the commit never comes. Both
/// backings read the same for that image when it is done, so either state is sound.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rebase {
    /// The image, relative to the SR directory.
    pub file: String,
    pub from: Option<(String, thinline_format::Format)>,
    pub to: Option<(String, thinline_format::Format)>,
}

/// Points `file` of the SR at `backing`.
fn set_backing(
    sr: &Path,
    file: &str,
    backing: &Option<(String, thinline_format::Format)>,
) -> Result<()> {
    let path = sr.join(file);
    thinline_format::qcow2::set_backing(&path, backing.as_ref().map(|(n, f)| (n.as_str(), *f)))
        .map_err(|e| {
            Error::format(
                format!("cannot change the backing of {}", path.display()),
                &e,
            )
        })
}

/// What an operation in progress will do or has done (see the module doc).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Journal {
    /// The operation, for messages (`vdi clone`).
    pub operation: String,
    /// Files made in `.thinline-sr/new/` before the commit.
    pub creates: Vec<String>,
    /// Renames done before the commit.
    pub moves: Vec<Move>,
    /// Backing changes done before the commit (after the moves).
    #[serde(default)]
    pub rebases: Vec<Rebase>,
    /// Whether the new records are on disk.
    pub committed: bool,
    /// After the commit: new files (`from` in `new/`) moved to their names.
    pub finish: Vec<Move>,
    /// After the commit: files no record names any more.
    pub deletes: Vec<String>,
    /// LVM SRs: thin ids created before the commit (deleted if it never comes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub thin_made: Vec<u32>,
    /// LVM SRs: thin ids no record uses after the commit (deleted then).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub thin_dropped: Vec<u32>,
    /// LVM SRs: raw LVs created before the commit (wiped and removed if it never comes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lvs_made: Vec<String>,
    /// LVM SRs: raw LVs no record uses after the commit (wiped and removed then).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lvs_dropped: Vec<String>,
}

/// Where an open SR's records are written.
#[derive(Debug)]
enum Keeper {
    /// `.thinline-sr/sr.json`.
    File,
    /// An LVM SR's metadata volume.
    Volume(crate::backend::lvm::mgt::MetadataVolume),
    /// Closed (its LV is being removed): nothing is written any more.
    Closed,
}

/// An SR opened for a command: its path and metadata, and (for changes) its lock.
#[derive(Debug)]
pub struct Sr {
    /// The SR's directory; an LVM SR's home.
    pub path: PathBuf,
    pub md: Metadata,
    keeper: Keeper,
    /// Held for as long as the SR is open for changes.
    _lock: Option<File>,
    /// What recovery did when the SR was opened (undone or finished operations).
    pub recovered: Vec<String>,
}

fn agent_dir(path: &Path) -> PathBuf {
    path.join(DIR)
}

/// Removes what a crash left of an agent directory being made (`.thinline-sr.new-…`)
/// or removed (`.thinline-sr.gone-…`): only the agent names directories so.
fn remove_leftovers(path: &Path) {
    let Ok(entries) = std::fs::read_dir(path) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        let ours = [".new-", ".gone-"].iter().any(|k| {
            name.strip_prefix(DIR)
                .and_then(|r| r.strip_prefix(k))
                .is_some_and(|u| uuid::Uuid::parse_str(u).is_ok())
        });
        if ours && e.file_type().is_ok_and(|t| t.is_dir()) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Whether `path` holds an SR (or an LVM SR's home).
pub fn is_sr(path: &Path) -> bool {
    agent_dir(path).join(METADATA).is_file() || agent_dir(path).join(LVM_HOME).is_file()
}

/// The LVM SR whose home `path` is, if it is one.
pub fn lvm_home(path: &Path) -> Result<Option<LvmHome>> {
    let file = agent_dir(path).join(LVM_HOME);
    if !file.is_file() {
        return Ok(None);
    }
    read_json::<Option<LvmHome>>(&file)
}

/// Reads the SR's records at `path`, from its file or its metadata volume.
fn read_metadata(path: &Path) -> Result<(Metadata, Keeper)> {
    let Some(home) = lvm_home(path)? else {
        return Ok((read_metadata_file(path)?, Keeper::File));
    };
    let volume = metadata_volume(&home)?;
    let md = lvm_records(&home, &volume)?;
    // The devices lvm2 is limited to come from this host's home; records that name
    // others (damaged, or written elsewhere) are not acted on.
    let recorded = md.sr.lvm.as_ref().map(|l| (&l.vg, &l.devices));
    if recorded != Some((&home.vg, &home.devices)) {
        return Err(Error::new(
            Code::SrBackendFailure,
            format!(
                "the metadata volume of VG {} does not name that VG on {:?}, where the home {} says it is (`sr introduce --type lvm {}` adopts it as it is now)",
                home.vg,
                home.devices,
                path.display(),
                home.vg
            ),
        ));
    }
    Ok((md, Keeper::Volume(volume)))
}

/// The records on `volume`, the metadata volume of the LVM SR `home` names (before it
/// has a home here: `sr introduce`, `sr probe`).
pub fn lvm_records(
    home: &LvmHome,
    volume: &crate::backend::lvm::mgt::MetadataVolume,
) -> Result<Metadata> {
    let shown = format!("the metadata volume of VG {}", home.vg);
    let record = volume.read()?.ok_or_else(|| {
        Error::new(
            Code::SrNotFound,
            format!("{shown} holds no records: the SR was not made, or was destroyed"),
        )
    })?;
    let md = parse_metadata(&shown, &record.payload)?;
    if md.sr.uuid != home.uuid {
        return Err(Error::new(
            Code::SrBackendFailure,
            format!(
                "{shown} is damaged: it holds SR {}, and the VG's tag names SR {}",
                md.sr.uuid, home.uuid
            ),
        ));
    }
    Ok(md)
}

/// Makes the new directory `path`, an LVM SR's home naming `home`'s VG and devices: made
/// under a temporary name and renamed into place, so it is whole or absent.
fn make_home(path: &Path, home: &LvmHome) -> Result<()> {
    let parent = path.parent().unwrap_or(Path::new("/"));
    let io = |what: &Path| {
        let what = what.display().to_string();
        move |e: std::io::Error| Error::io(format!("cannot create {what}"), &e)
    };
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    let tmp = parent.join(format!(".new-{}", home.uuid));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(agent_dir(&tmp)).map_err(io(&tmp))?;
    write_json(&agent_dir(&tmp).join(LVM_HOME), home, 0o644)?;
    rename_noreplace(&tmp, path).map_err(io(path))?;
    sync_dir(parent)
}

/// `bytes` as metadata this build reads (`shown` names where they are, in errors).
fn parse_metadata(shown: &str, bytes: &[u8]) -> Result<Metadata> {
    let md: Metadata = serde_json::from_slice(bytes)
        .map_err(|e| Error::new(Code::SrBackendFailure, format!("{shown} is damaged: {e}")))?;
    if md.format_version != FORMAT_VERSION {
        return Err(Error::new(
            Code::SrBackendFailure,
            format!(
                "{shown} has metadata format {}, this thinline reads format {FORMAT_VERSION}",
                md.format_version
            ),
        ));
    }
    check_names(shown, &md)?;
    Ok(md)
}

fn read_metadata_file(path: &Path) -> Result<Metadata> {
    let file = agent_dir(path).join(METADATA);
    let bytes = std::fs::read(&file).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::new(
                Code::SrNotFound,
                format!("{} holds no SR (no {DIR}/{METADATA})", path.display()),
            )
        } else {
            Error::io(format!("cannot read {}", file.display()), &e)
        }
    })?;
    parse_metadata(&file.display().to_string(), &bytes)
}

/// Whether `name` is a plain name of a file in the SR directory: one component, not
/// hidden (the agent's own directory is `.thinline-sr`), nothing that leaves the SR.
pub fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && !name.contains('/')
        && !name.contains('\0')
        && name.len() <= 255
}

/// Refuses metadata naming a file outside the SR directory (a crafted or damaged
/// `sr.json` must not make the agent delete, move or serve anything else).
fn check_names(shown: &str, md: &Metadata) -> Result<()> {
    let bad = |name: &str| {
        Error::new(
            Code::SrBackendFailure,
            format!(
                "{shown} is damaged: it names {name:?}, which is not a file of the SR directory"
            ),
        )
    };
    let new_name = |name: &str| {
        name.strip_suffix(".qcow2")
            .is_some_and(|u| uuid::Uuid::parse_str(u).is_ok())
    };
    for v in &md.vdis {
        if let Some(f) = &v.file
            && !plain_name(f)
        {
            return Err(bad(f));
        }
        if let Some(lv) = &v.lv
            && !crate::backend::lvm::host::is_raw_lv_name(lv)
        {
            return Err(bad(lv));
        }
    }
    if let Some(j) = &md.journal {
        for c in &j.creates {
            if !new_name(c) {
                return Err(bad(c));
            }
        }
        for m in j.moves.iter() {
            if !plain_name(&m.from) || !plain_name(&m.to) {
                return Err(bad(&format!("{} -> {}", m.from, m.to)));
            }
        }
        for m in &j.finish {
            if !new_name(&m.from) || !plain_name(&m.to) {
                return Err(bad(&format!("{} -> {}", m.from, m.to)));
            }
        }
        for lv in j.lvs_made.iter().chain(&j.lvs_dropped) {
            if !crate::backend::lvm::host::is_raw_lv_name(lv) {
                return Err(bad(lv));
            }
        }
        for d in j.deletes.iter().chain(j.rebases.iter().map(|r| &r.file)) {
            if !plain_name(d) {
                return Err(bad(d));
            }
        }
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(format!("cannot sync {}", dir.display()), &e))
}

/// Replaces `path` with `value` as JSON, atomically: a temporary file of `mode`,
/// fsync, rename, fsync of the directory.
pub fn write_json(path: &Path, value: &impl Serialize, mode: u32) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut bytes = serde_json::to_vec_pretty(value).expect("serializes");
    bytes.push(b'\n');
    let io = |e: std::io::Error| Error::io(format!("cannot write {}", tmp.display()), &e);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(&bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    drop(f);
    if let Some(name) = path.file_name() {
        crate::crash::point(&format!("write:{}", name.to_string_lossy()));
    }
    std::fs::rename(&tmp, path)
        .map_err(|e| Error::io(format!("cannot replace {}", path.display()), &e))?;
    sync_dir(dir)
}

/// Reads the JSON file `path`, or the default if there is none.
pub fn read_json<T: serde::de::DeserializeOwned + Default>(path: &Path) -> Result<T> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
            Error::new(
                Code::SrBackendFailure,
                format!("{} is damaged: {e}", path.display()),
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(e) => Err(Error::io(format!("cannot read {}", path.display()), &e)),
    }
}

/// Writes `md` to `path`'s metadata file atomically.
fn write_metadata(path: &Path, md: &Metadata) -> Result<()> {
    write_json(&agent_dir(path).join(METADATA), md, 0o644)
}

/// The SR's lock: `.thinline-sr/lock`, or for an LVM SR the lock of its VG.
fn lock(path: &Path) -> Result<File> {
    match lvm_home(path)? {
        None => crate::lockfile::exclusive(&agent_dir(path).join(LOCK)),
        Some(home) => lvm_lock(&home.vg, "sr"),
    }
}

/// Renames `from` to `to` unless `to` exists (never replaces a file).
fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    rustix::fs::renameat_with(
        rustix::fs::CWD,
        from,
        rustix::fs::CWD,
        to,
        rustix::fs::RenameFlags::NOREPLACE,
    )
    .map_err(Into::into)
}

/// Removes the file `path`; one already gone is fine.
pub(crate) fn remove_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("cannot remove {}", path.display()), &e)),
    }
}

impl Sr {
    /// The record `uuid`, which must be a VDI (layers are not).
    pub fn vdi(&self, uuid: Uuid) -> Result<VdiRecord> {
        match self.md.get(uuid) {
            Some(v) if v.kind != VdiType::Layer => Ok(v.clone()),
            _ => Err(Error::new(
                Code::VdiNotFound,
                format!(
                    "no VDI {uuid} in SR {} ({})",
                    self.md.sr.uuid,
                    self.path.display()
                ),
            )),
        }
    }

    /// Makes a new SR in the existing directory `path` (which holds none). The agent's
    /// directory is built under a temporary name and renamed into place, so a crash
    /// leaves either no SR or a whole one.
    pub fn create(path: &Path, sr: SrRecord) -> Result<Sr> {
        remove_leftovers(path);
        let dir = agent_dir(path);
        if dir.exists() {
            return Err(Error::new(
                Code::SrExists,
                format!("{} already holds an SR ({DIR} exists)", path.display()),
            ));
        }
        let tmp = path.join(format!("{DIR}.new-{}", sr.uuid));
        let io = |what: &Path| {
            let what = what.display().to_string();
            move |e: std::io::Error| Error::io(format!("cannot create {what}"), &e)
        };
        std::fs::create_dir(&tmp).map_err(io(&tmp))?;
        std::fs::create_dir(tmp.join(NEW_DIR)).map_err(io(&tmp))?;
        let md = Metadata {
            format_version: FORMAT_VERSION,
            sr,
            vdis: Vec::new(),
            journal: None,
        };
        write_json(&tmp.join(METADATA), &md, 0o644)?;
        if let Err(e) = rename_noreplace(&tmp, &dir) {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(if e.kind() == std::io::ErrorKind::AlreadyExists {
                Error::new(
                    Code::SrExists,
                    format!("{} already holds an SR ({DIR} exists)", path.display()),
                )
            } else {
                Error::io(format!("cannot create {}", dir.display()), &e)
            });
        }
        sync_dir(path)?;
        let lock = lock(path)?;
        Ok(Sr {
            path: path.to_owned(),
            md,
            keeper: Keeper::File,
            _lock: Some(lock),
            recovered: Vec::new(),
        })
    }

    /// Makes the home `path` (a new directory) of the LVM SR `sr`, whose VG `home`
    /// names has an empty metadata volume: the records are written there first, then
    /// the home is made.
    pub fn create_lvm(path: &Path, home: &LvmHome, sr: SrRecord) -> Result<Sr> {
        let lock = lvm_lock(&home.vg, "sr")?;
        let volume = metadata_volume(home)?;
        let md = Metadata {
            format_version: FORMAT_VERSION,
            sr,
            vdis: Vec::new(),
            journal: None,
        };
        volume.write(&serde_json::to_vec_pretty(&md).expect("serializes"))?;
        make_home(path, home)?;
        Ok(Sr {
            path: path.to_owned(),
            md,
            keeper: Keeper::Volume(volume),
            _lock: Some(lock),
            recovered: Vec::new(),
        })
    }

    /// Adopts the LVM SR whose VG `home` names (`sr introduce`): its records name the
    /// VG and devices found now (a VG renamed, devices under new names), and its home
    /// `path` is made, or updated, to match; an interrupted operation is recovered.
    pub fn adopt_lvm(path: &Path, home: &LvmHome, name_label: Option<&str>) -> Result<Sr> {
        let lock = lvm_lock(&home.vg, "sr")?;
        let volume = metadata_volume(home)?;
        let mut md = lvm_records(home, &volume)?;
        let shown = format!("the metadata volume of VG {}", home.vg);
        let lvm = md.sr.lvm.as_mut().ok_or_else(|| {
            Error::new(
                Code::SrBackendFailure,
                format!("{shown} is damaged: its SR is not an LVM SR"),
            )
        })?;
        lvm.vg.clone_from(&home.vg);
        lvm.devices.clone_from(&home.devices);
        if let Some(label) = name_label {
            md.sr.name_label = label.to_owned();
        }
        volume.write(&serde_json::to_vec_pretty(&md).expect("serializes"))?;
        if agent_dir(path).is_dir() {
            write_json(&agent_dir(path).join(LVM_HOME), home, 0o644)?;
        } else {
            make_home(path, home)?;
        }
        let mut sr = Sr {
            path: path.to_owned(),
            md,
            keeper: Keeper::Volume(volume),
            _lock: Some(lock),
            recovered: Vec::new(),
        };
        sr.recover()?;
        Ok(sr)
    }

    /// Opens the SR at `path` for changes: takes its lock (waiting for another agent
    /// to finish), reads its metadata and recovers an interrupted operation.
    pub fn open(path: &Path) -> Result<Sr> {
        if !is_sr(path) {
            return Err(Error::new(
                Code::SrNotFound,
                format!("{} holds no SR", path.display()),
            ));
        }
        let lock = lock(path)?;
        let (md, keeper) = read_metadata(path)?;
        let mut sr = Sr {
            path: path.to_owned(),
            md,
            keeper,
            _lock: Some(lock),
            recovered: Vec::new(),
        };
        sr.recover()?;
        Ok(sr)
    }

    /// Reads the SR at `path` without its lock (the file is replaced atomically, so
    /// this is one consistent state; an interrupted operation shows as a journal).
    pub fn read(path: &Path) -> Result<Sr> {
        let (md, keeper) = read_metadata(path)?;
        Ok(Sr {
            path: path.to_owned(),
            md,
            keeper,
            _lock: None,
            recovered: Vec::new(),
        })
    }

    /// The path of a file named relative to the SR directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Where an operation makes new file `name` before it commits.
    pub fn new_file(&self, name: &str) -> PathBuf {
        agent_dir(&self.path).join(NEW_DIR).join(name)
    }

    /// Writes the metadata as it is now.
    pub fn save(&self) -> Result<()> {
        match &self.keeper {
            Keeper::File => write_metadata(&self.path, &self.md),
            Keeper::Volume(volume) => {
                let bytes = serde_json::to_vec_pretty(&self.md).expect("serializes");
                crate::crash::point("write:mgt");
                volume.write(&bytes).map(drop)
            }
            Keeper::Closed => Err(Error::new(
                Code::SrBackendFailure,
                format!("SR {}: its metadata volume is closed", self.md.sr.uuid),
            )),
        }
    }

    /// Closes the metadata volume (its LV is to be removed); nothing is saved after.
    pub fn close_volume(&mut self) {
        self.keeper = Keeper::Closed;
    }

    /// The LVM SR's home, if this is one.
    pub fn lvm_home(&self) -> Option<LvmHome> {
        let lvm = self.md.sr.lvm.as_ref()?;
        Some(LvmHome {
            uuid: self.md.sr.uuid,
            vg: lvm.vg.clone(),
            devices: lvm.devices.clone(),
        })
    }

    /// Runs a multi-step operation: records `journal`, does its moves, calls `make`
    /// (which makes the files of `journal.creates` in `new/`), applies `commit` to the
    /// records, then finishes. A failure before the commit undoes everything.
    pub fn run(
        &mut self,
        journal: Journal,
        make: impl FnOnce(&Sr) -> Result<()>,
        commit: impl FnOnce(&mut Metadata),
    ) -> Result<()> {
        // One left by an earlier operation whose finish failed is finished (or undone)
        // first: a journal is never written over.
        if self.md.journal.is_some() {
            self.recover()?;
        }
        self.md.journal = Some(journal.clone());
        self.save()?;
        crate::crash::point("intent");
        let worked = (|| {
            for m in &journal.moves {
                rename_noreplace(&self.file(&m.from), &self.file(&m.to))
                    .map_err(|e| Error::io(format!("cannot rename {} to {}", m.from, m.to), &e))?;
            }
            crate::crash::point("moved");
            for r in &journal.rebases {
                set_backing(&self.path, &r.file, &r.to)?;
            }
            make(self)?;
            crate::crash::point("made");
            Ok(())
        })();
        if let Err(e) = worked {
            self.undo(&journal)?;
            self.md.journal = None;
            self.save()?;
            return Err(e);
        }
        commit(&mut self.md);
        let mut done = journal;
        done.committed = true;
        self.md.journal = Some(done.clone());
        self.save()?;
        crate::crash::point("committed");
        // Committed: the operation has happened. What is left (moving the new files to
        // their names, deleting old ones) is finished by the next open if it fails now.
        let finished = self.finish(&done).and_then(|()| {
            crate::crash::point("finished");
            self.md.journal = None;
            self.save()
        });
        if let Err(e) = finished {
            tracing::warn!(error = %e, operation = %done.operation, "committed; the next command finishes it");
        }
        Ok(())
    }

    fn undo(&self, j: &Journal) -> Result<()> {
        self.delete_thin_ids(&j.thin_made)?;
        // Made and never used: nothing of a VDI's is on it.
        self.remove_raw_lvs(&j.lvs_made, false)?;
        for c in &j.creates {
            remove_if_present(&self.new_file(c))?;
        }
        for r in j.rebases.iter().rev() {
            if self.file(&r.file).exists() {
                set_backing(&self.path, &r.file, &r.from)?;
            }
        }
        for m in j.moves.iter().rev() {
            let (from, to) = (self.file(&m.from), self.file(&m.to));
            if to.exists() && !from.exists() {
                std::fs::rename(&to, &from).map_err(|e| {
                    Error::io(format!("cannot move {} back to {}", m.to, m.from), &e)
                })?;
            }
        }
        Ok(())
    }

    fn finish(&self, j: &Journal) -> Result<()> {
        for m in &j.finish {
            let (from, to) = (self.new_file(&m.from), self.file(&m.to));
            if from.exists() {
                // Never over a file that appeared meanwhile: it is not the agent's.
                rename_noreplace(&from, &to).map_err(|e| {
                    Error::io(format!("cannot move new file {} to {}", m.from, m.to), &e)
                })?;
            }
        }
        for d in &j.deletes {
            remove_if_present(&self.file(d))?;
        }
        self.delete_thin_ids(&j.thin_dropped)?;
        self.remove_raw_lvs(&j.lvs_dropped, true)?;
        if !j.finish.is_empty() || !j.deletes.is_empty() {
            sync_dir(&self.path)?;
        }
        Ok(())
    }

    /// Deletes the thin ids `ids` of an LVM SR's pool (ids already gone are fine).
    fn delete_thin_ids(&self, ids: &[u32]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let pool = crate::backend::lvm::host::Pool::of(&self.md.sr)?;
        pool.activate()?;
        // A snapshot killed while its origin was suspended left it so.
        pool.resume_suspended()?;
        ids.iter().try_for_each(|&id| pool.delete_thin(id))
    }

    /// Removes the raw LVs `names` of an LVM SR (ones already gone are fine); with
    /// `wipe`, zeroed first.
    fn remove_raw_lvs(&self, names: &[String], wipe: bool) -> Result<()> {
        if names.is_empty() {
            return Ok(());
        }
        let pool = crate::backend::lvm::host::Pool::of(&self.md.sr)?;
        names.iter().try_for_each(|n| pool.remove_raw(n, wipe))
    }

    /// Undoes or finishes an operation a crash interrupted.
    fn recover(&mut self) -> Result<()> {
        let Some(j) = self.md.journal.clone() else {
            return Ok(());
        };
        if j.committed {
            self.finish(&j)?;
            self.recovered
                .push(format!("finished an interrupted {}", j.operation));
        } else {
            self.undo(&j)?;
            self.recovered
                .push(format!("undid an interrupted {}", j.operation));
        }
        self.md.journal = None;
        self.save()
    }

    /// Removes the agent's directory (metadata, lock, `new/`): the SR is gone. It is
    /// renamed away first, so a crash leaves either the whole SR or none.
    pub fn remove_metadata(self) -> Result<()> {
        let dir = agent_dir(&self.path);
        let gone = self.path.join(format!("{DIR}.gone-{}", self.md.sr.uuid));
        std::fs::rename(&dir, &gone)
            .map_err(|e| Error::io(format!("cannot remove {}", dir.display()), &e))?;
        sync_dir(&self.path)?;
        std::fs::remove_dir_all(&gone)
            .map_err(|e| Error::io(format!("cannot remove {}", gone.display()), &e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::SrType;

    fn new_sr(dir: &Path) -> Sr {
        Sr::create(
            dir,
            SrRecord {
                uuid: uuid::Uuid::new_v4(),
                name_label: "t".into(),
                kind: SrType::File,
                made_directory: false,
                lvm: None,
            },
        )
        .unwrap()
    }

    #[test]
    fn metadata_naming_files_outside_the_sr_is_refused_and_nothing_is_touched() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("precious");
        std::fs::write(&outside, b"keep me").unwrap();
        let sr_dir = dir.path().join("sr");
        std::fs::create_dir(&sr_dir).unwrap();
        // Made, then unlocked: what follows is what a crafted sr.json would say.
        let md = new_sr(&sr_dir).md;
        let deleting = |name: &str| Journal {
            operation: "crafted".into(),
            committed: true,
            deletes: vec![name.to_owned()],
            ..Journal::default()
        };
        let creating = Journal {
            operation: "crafted".into(),
            creates: vec!["../../precious".into()],
            ..Journal::default()
        };
        for journal in [
            deleting(&outside.display().to_string()),
            deleting("../precious"),
            deleting(DIR),
            creating,
        ] {
            let mut crafted = md.clone();
            crafted.journal = Some(journal.clone());
            write_metadata(&sr_dir, &crafted).unwrap();
            let err = Sr::open(&sr_dir).unwrap_err();
            assert_eq!(err.code, Code::SrBackendFailure, "{journal:?}");
            assert!(err.message.contains("damaged"), "{}", err.message);
            assert_eq!(std::fs::read(&outside).unwrap(), b"keep me");
            assert!(sr_dir.join(DIR).is_dir());
        }
        let mut crafted = md.clone();
        crafted.vdis.push(crate::model::VdiRecord {
            file: Some("/etc/passwd".into()),
            ..crate::model::VdiRecord::new(crate::model::VdiType::Disk, "x", 512)
        });
        write_metadata(&sr_dir, &crafted).unwrap();
        assert!(Sr::read(&sr_dir).is_err(), "a record's file outside the SR");
    }

    #[test]
    fn a_failed_step_undoes_the_moves_and_removes_what_it_made() {
        let dir = tempfile::tempdir().unwrap();
        let mut sr = new_sr(dir.path());
        std::fs::write(dir.path().join("a.qcow2"), b"disk").unwrap();
        let x = format!("{}.qcow2", uuid::Uuid::new_v4());
        let journal = Journal {
            operation: "test".into(),
            creates: vec![x.clone()],
            moves: vec![Move {
                from: "a.qcow2".into(),
                to: "b.qcow2".into(),
            }],
            finish: vec![Move {
                from: x.clone(),
                to: "a.qcow2".into(),
            }],
            ..Journal::default()
        };
        let err = sr
            .run(
                journal,
                |sr| {
                    std::fs::write(sr.new_file(&x), b"new").unwrap();
                    Err(Error::new(Code::SrFull, "no space"))
                },
                |_| panic!("a failed operation never commits"),
            )
            .unwrap_err();
        assert_eq!(err.code, Code::SrFull);
        assert_eq!(std::fs::read(dir.path().join("a.qcow2")).unwrap(), b"disk");
        assert!(!dir.path().join("b.qcow2").exists());
        assert!(!sr.new_file(&x).exists());
        assert!(Sr::read(dir.path()).unwrap().md.journal.is_none());
    }

    #[test]
    fn a_committed_journal_is_finished_and_an_uncommitted_one_undone_at_the_next_open() {
        let dir = tempfile::tempdir().unwrap();
        let mut sr = new_sr(dir.path());
        let n = format!("{}.qcow2", uuid::Uuid::new_v4());
        let half = format!("{}.qcow2", uuid::Uuid::new_v4());
        std::fs::write(sr.new_file(&n), b"new").unwrap();
        std::fs::write(dir.path().join("gone.qcow2"), b"old").unwrap();
        sr.md.journal = Some(Journal {
            operation: "finish me".into(),
            committed: true,
            finish: vec![Move {
                from: n.clone(),
                to: "n-final.qcow2".into(),
            }],
            deletes: vec!["gone.qcow2".into()],
            ..Journal::default()
        });
        sr.save().unwrap();
        drop(sr);
        let sr = Sr::open(dir.path()).unwrap();
        assert_eq!(sr.recovered, ["finished an interrupted finish me"]);
        assert_eq!(
            std::fs::read(dir.path().join("n-final.qcow2")).unwrap(),
            b"new"
        );
        assert!(!dir.path().join("gone.qcow2").exists());
        let mut sr = sr;
        std::fs::rename(
            dir.path().join("n-final.qcow2"),
            dir.path().join("moved.qcow2"),
        )
        .unwrap();
        std::fs::write(sr.new_file(&half), b"half").unwrap();
        sr.md.journal = Some(Journal {
            operation: "undo me".into(),
            creates: vec![half.clone()],
            moves: vec![Move {
                from: "n-final.qcow2".into(),
                to: "moved.qcow2".into(),
            }],
            ..Journal::default()
        });
        sr.save().unwrap();
        drop(sr);
        let sr = Sr::open(dir.path()).unwrap();
        assert_eq!(sr.recovered, ["undid an interrupted undo me"]);
        assert!(dir.path().join("n-final.qcow2").exists());
        assert!(!dir.path().join("moved.qcow2").exists());
        assert!(!sr.new_file(&half).exists());
        assert!(sr.md.journal.is_none());
    }
}
