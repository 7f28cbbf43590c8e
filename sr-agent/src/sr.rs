//! The SR operations, one function per `thinline sr` command, each with its options.

use std::path::{Path, PathBuf};

use serde::Serialize;
use uuid::Uuid;

use crate::backend::{Backend, Finding, for_type};
use crate::model::{SrRecord, SrType, SrView, TemplateError, VdiType};
use crate::registry;
use crate::store::{self, Sr};
use crate::template::Templates;
use crate::{Code, Error, Result};

/// How `sr` is shown.
pub fn view(sr: &Sr, backend: &dyn Backend) -> Result<SrView> {
    let (total_space, free_space) = backend.space(sr)?;
    let healthy = sr.md.journal.is_none() && backend.check(sr).is_empty();
    Ok(SrView {
        uuid: sr.md.sr.uuid,
        name_label: sr.md.sr.name_label.clone(),
        kind: sr.md.sr.kind,
        path: sr.path.display().to_string(),
        total_space,
        free_space,
        physical_utilisation: sr.md.vdis.iter().map(|v| backend.utilisation(sr, v)).sum(),
        vdi_count: sr
            .md
            .vdis
            .iter()
            .filter(|v| v.kind != VdiType::Layer)
            .count(),
        health: if healthy { "healthy" } else { "needs_repair" },
        daemon: crate::daemon::request(&sr.path, &crate::daemon::Request::Status)
            .and_then(|r| r.ok())
            .and_then(|v| serde_json::from_value(v).ok()),
        template_errors: Vec::new(),
    })
}

fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path)
        .map_err(|e| Error::io(format!("cannot resolve {}", path.display()), &e))
}

fn default_label(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "sr".to_owned())
}

/// `sr create`.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub path: PathBuf,
    pub kind: SrType,
    pub name_label: Option<String>,
}

/// Makes an SR in a new (or empty) directory.
pub fn create(o: &CreateOptions) -> Result<SrView> {
    let path = absolute(&o.path)?;
    let made_directory = match std::fs::create_dir(&path) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let mut entries = std::fs::read_dir(&path)
                .map_err(|e| Error::io(format!("cannot read {}", path.display()), &e))?;
            if entries.next().is_some() {
                return Err(Error::new(
                    Code::SrExists,
                    format!(
                        "{} is not empty: `sr create` owns a new directory; adopt this one with `sr introduce`",
                        path.display()
                    ),
                ));
            }
            false
        }
        Err(e) => return Err(Error::io(format!("cannot create {}", path.display()), &e)),
    };
    let record = SrRecord {
        uuid: Uuid::new_v4(),
        name_label: o.name_label.clone().unwrap_or_else(|| default_label(&path)),
        kind: o.kind,
        made_directory,
    };
    let sr = Sr::create(&path, record)?;
    // A crash here leaves an SR that commands reach by its path, and that `sr
    // introduce` registers (`sr create` again refuses the directory, and says so).
    store::crash_point("registering");
    registry::add(sr.md.sr.uuid, &path)?;
    view(&sr, for_type(o.kind).as_ref())
}

/// `sr introduce`.
#[derive(Debug, Clone)]
pub struct IntroduceOptions {
    pub path: PathBuf,
    pub name_label: Option<String>,
}

/// Adopts an existing directory: an SR already there keeps its UUID and VDIs (and
/// is registered again); otherwise a new SR is made beside the files it holds.
pub fn introduce(o: &IntroduceOptions) -> Result<SrView> {
    let path = absolute(&o.path)?;
    if !path.is_dir() {
        return Err(Error::new(
            Code::SrNotFound,
            format!("{} is not a directory", path.display()),
        ));
    }
    let sr = if store::is_sr(&path) {
        let mut sr = Sr::open(&path)?;
        if let Some(label) = &o.name_label {
            sr.md.sr.name_label = label.clone();
            sr.save()?;
        }
        sr
    } else {
        Sr::create(
            &path,
            SrRecord {
                uuid: Uuid::new_v4(),
                name_label: o.name_label.clone().unwrap_or_else(|| default_label(&path)),
                kind: SrType::File,
                made_directory: false,
            },
        )?
    };
    registry::add(sr.md.sr.uuid, &path)?;
    view(&sr, for_type(sr.md.sr.kind).as_ref())
}

/// Opens the SR named `name` without its lock.
fn read(name: &str) -> Result<(Sr, Box<dyn Backend>)> {
    let path = registry::resolve(name)?;
    let sr = Sr::read(&path)?;
    let backend = for_type(sr.md.sr.kind);
    Ok((sr, backend))
}

/// The registered UUID `name` whose directory is there without the agent's directory
/// (a destroy interrupted after its metadata was removed) or, with `gone_too`, is not
/// there at all (removed by hand). Only proof counts: a directory that cannot be read
/// (permissions, a file system not mounted yet) is not dangling.
fn dangling(name: &str, gone_too: bool) -> Option<(Uuid, PathBuf)> {
    let uuid = Uuid::parse_str(name).ok()?;
    let entry = registry::list()
        .ok()?
        .into_iter()
        .find(|e| e.uuid == uuid)?;
    let missing = |p: &Path| matches!(std::fs::symlink_metadata(p), Err(e) if e.kind() == std::io::ErrorKind::NotFound);
    let dir_there = std::fs::metadata(&entry.path).is_ok_and(|m| m.is_dir());
    let emptied = dir_there && missing(&entry.path.join(store::DIR));
    (emptied || (gone_too && missing(&entry.path))).then_some((uuid, entry.path))
}

/// What `sr forget` answers.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Forgotten {
    Sr(SrView),
    /// A registry entry whose directory held no SR.
    Entry {
        uuid: Uuid,
        path: String,
    },
}

/// `sr forget`: unregisters the SR; nothing on disk changes.
pub fn forget(name: &str) -> Result<Forgotten> {
    if let Some((uuid, path)) = dangling(name, true) {
        registry::remove(uuid)?;
        let path = path.display().to_string();
        return Ok(Forgotten::Entry { uuid, path });
    }
    let (sr, backend) = read(name)?;
    let shown = view(&sr, backend.as_ref())?;
    registry::remove(sr.md.sr.uuid)?;
    Ok(Forgotten::Sr(shown))
}

/// `sr destroy`.
#[derive(Debug, Clone)]
pub struct DestroyOptions {
    pub sr: String,
    /// Destroy the disks and snapshots too.
    pub force: bool,
}

/// Deletes every volume the SR made and its metadata; the directory too if the agent
/// made it and it is empty. Templates are only forgotten.
pub fn destroy(o: &DestroyOptions) -> Result<Uuid> {
    if let Some((uuid, _)) = dangling(&o.sr, false) {
        // Its metadata is gone: a destroy was interrupted after removing it.
        registry::remove(uuid)?;
        return Ok(uuid);
    }
    let (mut sr, backend) = crate::vdi::open_sr(&o.sr)?;
    let attached: Vec<String> = sr
        .md
        .vdis
        .iter()
        .filter(|v| v.attached)
        .map(|v| v.shown())
        .collect();
    if !attached.is_empty() {
        return Err(Error::new(
            Code::VdiInUse,
            format!(
                "SR {} has attached VDIs: {}; detach them first",
                sr.md.sr.uuid,
                attached.join(", ")
            ),
        ));
    }
    let volumes: Vec<String> = sr
        .md
        .vdis
        .iter()
        .filter(|v| matches!(v.kind, VdiType::Disk | VdiType::Snapshot))
        .map(|v| v.shown())
        .collect();
    if !volumes.is_empty() && !o.force {
        return Err(Error::new(
            Code::SrNotEmpty,
            format!(
                "SR {} holds {} disks and snapshots: {}; destroy them first, or use --force",
                sr.md.sr.uuid,
                volumes.len(),
                volumes.join(", ")
            ),
        ));
    }
    // Leaves first: a record is destroyed once nothing reads from it.
    while let Some(leaf) = sr
        .md
        .vdis
        .iter()
        .find(|v| sr.md.dependents(v.uuid).next().is_none())
        .map(|v| v.uuid)
    {
        backend.destroy(&mut sr, leaf)?;
    }
    if !sr.md.vdis.is_empty() {
        return Err(Error::new(
            Code::SrBackendFailure,
            format!(
                "SR {}: {} records read from each other in a loop; the metadata is damaged",
                sr.md.sr.uuid,
                sr.md.vdis.len()
            ),
        ));
    }
    let uuid = sr.md.sr.uuid;
    let made = sr.md.sr.made_directory;
    let path = sr.path.clone();
    // An idle daemon goes with the SR.
    let _ = crate::daemon::request(&path, &crate::daemon::Request::Shutdown);
    sr.remove_metadata()?;
    // A crash here leaves a registry entry that `sr destroy` (or `sr forget`) removes.
    store::crash_point("unregistering");
    registry::remove(uuid)?;
    if made {
        // Only if empty: files the agent does not own stay, and so does their directory.
        let _ = std::fs::remove_dir(&path);
    }
    Ok(uuid)
}

/// What `sr probe` found.
#[derive(Debug, Clone, Serialize)]
pub struct Probe {
    pub path: String,
    pub sr: Option<SrView>,
}

/// Whether `path` holds an SR.
pub fn probe(path: &Path) -> Result<Probe> {
    let path = absolute(path)?;
    let sr = if store::is_sr(&path) {
        let sr = Sr::read(&path)?;
        Some(view(&sr, for_type(sr.md.sr.kind).as_ref())?)
    } else {
        None
    };
    Ok(Probe {
        path: path.display().to_string(),
        sr,
    })
}

/// `sr stat`.
/// The SR as it is now, with the templates that cannot be read (each is opened to
/// find out, all at once).
pub fn stat(name: &str, templates: &Templates) -> Result<SrView> {
    let (sr, backend) = read(name)?;
    let mut shown = view(&sr, backend.as_ref())?;
    // Each template object once (a template's snapshots are records of the same one),
    // all at once: a server that does not answer costs its timeout once, not once per
    // template.
    let records: Vec<&crate::model::VdiRecord> =
        sr.md.vdis.iter().filter(|v| v.is_template()).collect();
    let mut objects: Vec<&crate::model::VdiRecord> = Vec::new();
    for v in &records {
        if !objects.iter().any(|o| o.uri == v.uri && o.pin == v.pin) {
            objects.push(v);
        }
    }
    // At most 16 at a time: hundreds of templates must not mean hundreds of threads.
    let mut troubles: Vec<Option<String>> = Vec::with_capacity(objects.len());
    for batch in objects.chunks(16) {
        std::thread::scope(|scope| {
            let checks: Vec<_> = batch
                .iter()
                .map(|v| scope.spawn(|| templates.trouble(&sr.path, v)))
                .collect();
            troubles.extend(checks.into_iter().map(|c| {
                c.join()
                    .unwrap_or_else(|_| Some("checking it failed".to_owned()))
            }));
        });
    }
    shown.template_errors = records
        .iter()
        .filter_map(|v| {
            let at = objects
                .iter()
                .position(|o| o.uri == v.uri && o.pin == v.pin)?;
            Some(TemplateError {
                uuid: v.uuid,
                uri: v.uri.clone().unwrap_or_default(),
                error: troubles[at].clone()?,
            })
        })
        .collect();
    Ok(shown)
}

/// One registered SR in `sr list`: its view, or why it cannot be read.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Listed {
    Sr(SrView),
    Unreachable {
        uuid: Uuid,
        path: String,
        health: &'static str,
        message: String,
    },
}

/// Every registered SR.
pub fn list() -> Result<Vec<Listed>> {
    Ok(registry::list()?
        .into_iter()
        .map(|e| {
            let seen = Sr::read(&e.path).and_then(|sr| view(&sr, for_type(sr.md.sr.kind).as_ref()));
            match seen {
                Ok(v) => Listed::Sr(v),
                Err(err) => Listed::Unreachable {
                    uuid: e.uuid,
                    path: e.path.display().to_string(),
                    health: "unreachable",
                    message: err.message,
                },
            }
        })
        .collect())
}

/// What `sr check` found and did.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    pub sr: Uuid,
    /// Nothing left to report.
    pub clean: bool,
    pub findings: Vec<Finding>,
    pub repaired: Vec<String>,
}

/// `sr check [--repair]`.
pub fn check(
    name: &str,
    repair: bool,
    templates: &crate::template::Templates,
) -> Result<CheckReport> {
    if !repair {
        let (sr, backend) = read(name)?;
        let findings = backend.check(&sr);
        return Ok(CheckReport {
            sr: sr.md.sr.uuid,
            clean: findings.is_empty(),
            findings,
            repaired: Vec::new(),
        });
    }
    let (mut sr, backend) = crate::vdi::open_sr(name)?;
    let repaired = backend.repair(&mut sr, templates)?;
    let findings = backend.check(&sr);
    Ok(CheckReport {
        sr: sr.md.sr.uuid,
        clean: findings.is_empty(),
        findings,
        repaired,
    })
}
