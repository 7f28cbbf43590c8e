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
        vg: sr.md.sr.lvm.as_ref().map(|l| l.vg.clone()),
        devices: sr
            .md
            .sr
            .lvm
            .iter()
            .flat_map(|l| l.devices.iter().map(|d| d.display().to_string()))
            .collect(),
        hydrate: sr.md.sr.lvm.as_ref().map(|l| l.hydrate),
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
        pool: crate::backend::lvm::thin::pool_health(sr),
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
    pub place: Place,
    pub name_label: Option<String>,
}

/// Where `sr create` makes the SR.
#[derive(Debug, Clone)]
pub enum Place {
    /// A directory SR in this new (or empty) directory.
    Directory(PathBuf),
    /// An LVM SR on these empty devices: a new VG (named `vg`, or `thinline-` and the
    /// SR's UUID's first eight digits) with `reserve` bytes left outside the pool.
    Lvm {
        devices: Vec<PathBuf>,
        vg: Option<String>,
        reserve: u64,
        settings: PoolSettings,
    },
}

/// How an LVM SR's pool behaves.
#[derive(Debug, Clone, Copy)]
pub struct PoolSettings {
    /// What the pool does when its data is full.
    pub when_full: crate::backend::lvm::pool::WhenFull,
    /// When template proxies fetch whole templates.
    pub hydrate: crate::model::Hydrate,
    /// The most bytes the pool's data grows to by itself (`None`: as far as the VG's
    /// free space beyond the reserve goes).
    pub autoextend_max: Option<u64>,
}

/// Makes an SR and registers it.
pub fn create(o: &CreateOptions) -> Result<SrView> {
    match &o.place {
        Place::Directory(path) => create_directory(path, o.name_label.as_deref()),
        Place::Lvm {
            devices,
            vg,
            reserve,
            settings,
        } => create_lvm(
            devices,
            vg.as_deref(),
            *reserve,
            *settings,
            o.name_label.as_deref(),
        ),
    }
}

/// Makes a directory SR in a new (or empty) directory.
fn create_directory(path: &Path, name_label: Option<&str>) -> Result<SrView> {
    let path = absolute(path)?;
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
        name_label: name_label
            .map(str::to_owned)
            .unwrap_or_else(|| default_label(&path)),
        kind: SrType::File,
        made_directory,
        lvm: None,
    };
    let sr = Sr::create(&path, record)?;
    // A crash here leaves an SR that commands reach by its path, and that `sr
    // introduce` registers (`sr create` again refuses the directory, and says so).
    crate::crash::point("registering");
    registry::add(sr.md.sr.uuid, &path, None)?;
    view(&sr, for_type(SrType::File).as_ref())
}

/// Makes an LVM SR: its VG, LVs and pool on `devices` (see
/// [`crate::backend::lvm::layout::create`]), its records on the metadata volume, and
/// its home on this host. A failure before the home is made removes the VG again.
fn create_lvm(
    devices: &[PathBuf],
    vg: Option<&str>,
    reserve: u64,
    settings: PoolSettings,
    name_label: Option<&str>,
) -> Result<SrView> {
    use crate::backend::lvm::{command::Lvm, dm, layout};
    let uuid = Uuid::new_v4();
    let vg = vg.map_or_else(
        || format!("thinline-{}", &uuid.simple().to_string()[..8]),
        str::to_owned,
    );
    layout::check_vg_name(&vg)?;
    let devices = devices
        .iter()
        .map(|d| absolute(d))
        .collect::<Result<Vec<_>>>()?;
    let udev = dm::udev_runs();
    let lvm = Lvm::new(&devices, udev)?;
    let dm = dm::Dm::new(udev);
    let made = layout::create(&lvm, &dm, &devices, &vg, uuid, reserve, settings.when_full)?;
    let new = NewLvm {
        uuid,
        vg: &vg,
        devices: &devices,
        owns_vg: true,
        pool_data_bytes: made.sizes.pool_data,
        reserve,
        settings,
    };
    register_lvm(&new, name_label, || {
        layout::destroy(&lvm, &dm, &devices, &vg, uuid)
    })
}

/// An LVM SR whose volumes were just made.
struct NewLvm<'a> {
    uuid: Uuid,
    vg: &'a str,
    devices: &'a [PathBuf],
    owns_vg: bool,
    pool_data_bytes: u64,
    reserve: u64,
    settings: PoolSettings,
}

/// Records the new LVM SR `new` on its metadata volume, makes its home and registers
/// it; `undo` removes its volumes if the records or the home cannot be made.
fn register_lvm(
    new: &NewLvm,
    name_label: Option<&str>,
    undo: impl FnOnce() -> Result<()>,
) -> Result<SrView> {
    let record = SrRecord {
        uuid: new.uuid,
        name_label: name_label.map_or_else(|| new.vg.to_owned(), str::to_owned),
        kind: SrType::Lvm,
        made_directory: true,
        lvm: Some(crate::model::LvmRecord {
            vg: new.vg.to_owned(),
            devices: new.devices.to_vec(),
            owns_vg: new.owns_vg,
            pool_data_bytes: new.pool_data_bytes,
            when_full: new.settings.when_full,
            hydrate: new.settings.hydrate,
            reserve_bytes: new.reserve,
            autoextend_max: new.settings.autoextend_max,
            next_thin_id: 1,
        }),
    };
    let home = crate::backend::lvm::host::LvmHome {
        uuid: new.uuid,
        vg: new.vg.to_owned(),
        devices: new.devices.to_vec(),
    };
    let path = registry::lvm_home(new.uuid);
    let sr = match Sr::create_lvm(&path, &home, record) {
        Ok(sr) => sr,
        Err(e) => {
            if let Err(undone) = undo() {
                tracing::warn!(error = %undone, vg = new.vg, "cannot remove the volumes of an SR not made");
            }
            return Err(e);
        }
    };
    crate::crash::point("registering");
    registry::add(new.uuid, &path, Some(new.vg))?;
    view(&sr, for_type(SrType::Lvm).as_ref())
}

/// `sr introduce`.
#[derive(Debug, Clone)]
pub struct IntroduceOptions {
    pub target: Existing,
    pub name_label: Option<String>,
}

/// What `sr introduce` adopts.
#[derive(Debug, Clone)]
pub enum Existing {
    /// A directory (an SR in it, or files beside which one is made).
    Directory(PathBuf),
    /// A VG: the LVM SR in it (forgotten, or made on another host), or with
    /// `pool_size`, a new SR in a VG of the user's: its LVs and a pool of that many
    /// bytes beside the user's LVs, which it never touches.
    Vg {
        name: String,
        pool_size: Option<u64>,
        settings: PoolSettings,
    },
}

/// Adopts an existing directory or an LVM SR's VG, and registers it.
pub fn introduce(o: &IntroduceOptions) -> Result<SrView> {
    match &o.target {
        Existing::Directory(path) => introduce_directory(path, o.name_label.as_deref()),
        Existing::Vg {
            name,
            pool_size,
            settings,
        } => introduce_lvm(name, *pool_size, *settings, o.name_label.as_deref()),
    }
}

/// The SR a VG's tags name (`thinline.sr.UUID`), if any.
fn sr_of_tags(tags: &[String]) -> Option<Uuid> {
    tags.iter()
        .filter_map(|t| t.strip_prefix("thinline.sr."))
        .find_map(|u| Uuid::parse_str(u).ok())
}

/// Adopts the LVM SR in VG `vg`: its devices found by a scan, its records updated to
/// name them, its home made here, registered. A VG that holds none gets one with
/// `pool_size`.
fn introduce_lvm(
    vg: &str,
    pool_size: Option<u64>,
    settings: PoolSettings,
    name_label: Option<&str>,
) -> Result<SrView> {
    use crate::backend::lvm::{command, dm, layout};
    layout::check_vg_name(vg)?;
    let devices = command::pvs_of(vg)?;
    if devices.is_empty() {
        return Err(Error::new(
            Code::SrNotFound,
            format!("no VG named {vg} is on this host's devices"),
        ));
    }
    let udev = dm::udev_runs();
    let lvm = command::Lvm::new(&devices, udev)?;
    let info = lvm.vgs()?.into_iter().find(|v| v.name == vg);
    let Some(uuid) = info.as_ref().and_then(|v| sr_of_tags(&v.tags)) else {
        let Some(pool_size) = pool_size else {
            return Err(Error::new(
                Code::SrNotFound,
                format!("VG {vg} holds no Thinline SR (--pool-size SIZE makes one in it)"),
            ));
        };
        let uuid = Uuid::new_v4();
        let dm = dm::Dm::new(udev);
        let made = layout::create_in(&lvm, &dm, vg, uuid, pool_size, settings.when_full)?;
        let new = NewLvm {
            uuid,
            vg,
            devices: &devices,
            owns_vg: false,
            pool_data_bytes: made.sizes.pool_data,
            reserve: 0,
            settings,
        };
        return register_lvm(&new, name_label, || {
            layout::remove_volumes(&lvm, &dm, vg, uuid)
        });
    };
    let home = crate::backend::lvm::host::LvmHome {
        uuid,
        vg: vg.to_owned(),
        devices,
    };
    let path = registry::lvm_home(uuid);
    let sr = Sr::adopt_lvm(&path, &home, name_label)?;
    registry::add(uuid, &path, Some(vg))?;
    view(&sr, for_type(SrType::Lvm).as_ref())
}

/// Adopts an existing directory: an SR already there keeps its UUID and VDIs (and
/// is registered again); otherwise a new SR is made beside the files it holds.
fn introduce_directory(path: &Path, name_label: Option<&str>) -> Result<SrView> {
    let path = absolute(path)?;
    if !path.is_dir() {
        return Err(Error::new(
            Code::SrNotFound,
            format!("{} is not a directory", path.display()),
        ));
    }
    let sr = if store::is_sr(&path) {
        let mut sr = Sr::open(&path)?;
        if let Some(label) = name_label {
            sr.md.sr.name_label = label.to_owned();
            sr.save()?;
        }
        sr
    } else {
        Sr::create(
            &path,
            SrRecord {
                uuid: Uuid::new_v4(),
                name_label: name_label
                    .map(str::to_owned)
                    .unwrap_or_else(|| default_label(&path)),
                kind: SrType::File,
                made_directory: false,
                lvm: None,
            },
        )?
    };
    let vg = sr.md.sr.lvm.as_ref().map(|l| l.vg.clone());
    registry::add(sr.md.sr.uuid, &path, vg.as_deref())?;
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
    (emptied || (gone_too && missing(&entry.path)) || vg_gone(&entry.path))
        .then_some((uuid, entry.path))
}

/// Whether `home` is an LVM SR's home whose VG is gone from its devices (a destroy
/// interrupted after the VG was removed). Only proof counts: every device is there and
/// holds no PV (devices missing or renamed after a reboot prove nothing), and lvm2
/// answers without the VG.
fn vg_gone(home: &Path) -> bool {
    let Ok(Some(lvm_home)) = store::lvm_home(home) else {
        return false;
    };
    let no_pv = |d: &PathBuf| {
        d.exists()
            && crate::backend::lvm::layout::signature(d)
                .is_ok_and(|found| !found.is_some_and(|s| s.contains("LVM2_member")))
    };
    if !lvm_home.devices.iter().all(no_pv) {
        return false;
    }
    let udev = crate::backend::lvm::dm::udev_runs();
    crate::backend::lvm::command::Lvm::new(&lvm_home.devices, udev)
        .and_then(|lvm| lvm.vgs())
        .is_ok_and(|vgs| !vgs.iter().any(|v| v.name == lvm_home.vg))
}

/// Removes an LVM SR's home whose VG is gone (see [`vg_gone`]).
fn remove_gone_home(home: &Path) -> Result<()> {
    if vg_gone(home) {
        std::fs::remove_dir_all(home)
            .map_err(|e| Error::io(format!("cannot remove {}", home.display()), &e))?;
    }
    Ok(())
}

/// What `sr forget` answers.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Forgotten {
    Sr(Box<SrView>),
    /// A registry entry whose directory held no SR.
    Entry {
        uuid: Uuid,
        path: String,
    },
}

/// `sr forget`: unregisters the SR; nothing on disk changes.
pub fn forget(name: &str) -> Result<Forgotten> {
    if let Some((uuid, path)) = dangling(name, true) {
        remove_gone_home(&path)?;
        registry::remove(uuid)?;
        let path = path.display().to_string();
        return Ok(Forgotten::Entry { uuid, path });
    }
    let (sr, backend) = read(name)?;
    let shown = view(&sr, backend.as_ref())?;
    registry::remove(sr.md.sr.uuid)?;
    Ok(Forgotten::Sr(Box::new(shown)))
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
    if let Some((uuid, path)) = dangling(&o.sr, false) {
        // Its metadata is gone: a destroy was interrupted after removing it.
        remove_gone_home(&path)?;
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
    if let Some(lvm) = &sr.md.sr.lvm {
        // The pool, the LVs and (if the SR made it) the VG: its records go with them.
        // A crash after this leaves a home whose VG is gone, which `sr destroy` and
        // `sr forget` remove.
        let (vg, devices, owns_vg) = (lvm.vg.clone(), lvm.devices.clone(), lvm.owns_vg);
        let pool = crate::backend::lvm::host::Pool::of(&sr.md.sr)?;
        sr.close_volume();
        // No command that only reads activates the pool again meanwhile.
        let _activating = crate::backend::lvm::host::lvm_lock(&vg, "activate")?;
        if owns_vg {
            crate::backend::lvm::layout::destroy(pool.lvm(), pool.dm(), &devices, &vg, uuid)?;
        } else {
            // A user's VG: only what the SR made goes.
            crate::backend::lvm::layout::remove_volumes(pool.lvm(), pool.dm(), &vg, uuid)?;
        }
        crate::crash::point("vg-removed");
    }
    sr.remove_metadata()?;
    // A crash here leaves a registry entry that `sr destroy` (or `sr forget`) removes.
    crate::crash::point("unregistering");
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

/// What `sr probe --type lvm` found on some devices.
#[derive(Debug, Clone, Serialize)]
pub struct LvmProbe {
    pub devices: Vec<String>,
    pub srs: Vec<ProbedLvm>,
}

/// An LVM SR found on the probed devices.
#[derive(Debug, Clone, Serialize)]
pub struct ProbedLvm {
    pub uuid: Uuid,
    pub vg: String,
    pub name_label: String,
    pub vdi_count: usize,
    /// Whether this host's registry has it (else `sr introduce --type lvm VG` adopts it).
    pub registered: bool,
}

/// The LVM SRs on `devices` (lvm2 limited to them): each VG tagged as an SR's, with
/// what its metadata volume records. Nothing is changed but the metadata LV made
/// active to be read.
pub fn probe_lvm(devices: &[PathBuf]) -> Result<LvmProbe> {
    use crate::backend::lvm::{command::Lvm, dm, host};
    let devices = devices
        .iter()
        .map(|d| absolute(d))
        .collect::<Result<Vec<_>>>()?;
    let lvm = Lvm::new(&devices, dm::udev_runs())?;
    let registered = registry::list()?;
    let mut srs = Vec::new();
    for vg in lvm.vgs()? {
        let Some(uuid) = sr_of_tags(&vg.tags) else {
            continue;
        };
        let home = crate::backend::lvm::host::LvmHome {
            uuid,
            vg: vg.name.clone(),
            devices: devices.clone(),
        };
        let md = store::lvm_records(&home, &host::metadata_volume(&home)?)?;
        srs.push(ProbedLvm {
            uuid,
            vg: vg.name,
            name_label: md.sr.name_label,
            vdi_count: md.vdis.iter().filter(|v| v.kind != VdiType::Layer).count(),
            registered: registered.iter().any(|e| e.uuid == uuid),
        });
    }
    Ok(LvmProbe {
        devices: devices.iter().map(|d| d.display().to_string()).collect(),
        srs,
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

/// The LVM SR named `name`, open for changes; `INVALID_ARGUMENT` for another kind.
fn open_lvm(name: &str, what: &str) -> Result<Sr> {
    let sr = Sr::open(&registry::resolve(name)?)?;
    if sr.md.sr.kind != SrType::Lvm {
        return Err(Error::new(
            Code::InvalidArgument,
            format!("{what} is for LVM SRs: a directory SR has no pool"),
        ));
    }
    Ok(sr)
}

/// `sr grow`: the pool's data grown by `by` bytes from its VG's free space (the
/// reserve too); `SR_FULL` without the room. The SR as it is then.
pub fn grow(name: &str, by: u64) -> Result<SrView> {
    let mut sr = open_lvm(name, "sr grow")?;
    crate::backend::lvm::space::grow(&mut sr, by)?;
    view(&sr, for_type(SrType::Lvm).as_ref())
}

/// `sr monitor`: grows the pool of the LVM SR named `name` by itself (see
/// [`crate::backend::lvm::space::monitor`]) until `stop` is set.
pub fn monitor(
    name: &str,
    interval: std::time::Duration,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<()> {
    let home = open_lvm(name, "sr monitor")?.path.clone();
    crate::backend::lvm::space::monitor(&home, interval, stop)
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

/// `sr check [--repair]`; `exe` (this program) runs a template's proxy when an LVM
/// SR's VDIs are attached again.
pub fn check(
    name: &str,
    repair: bool,
    templates: &crate::template::Templates,
    exe: &Path,
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
    let mut repaired = backend.repair(&mut sr, templates)?;
    if sr.md.sr.kind == SrType::Lvm {
        repaired.extend(crate::backend::lvm::attach::reattach(&mut sr, exe)?);
    }
    let findings = backend.check(&sr);
    Ok(CheckReport {
        sr: sr.md.sr.uuid,
        clean: findings.is_empty(),
        findings,
        repaired,
    })
}
