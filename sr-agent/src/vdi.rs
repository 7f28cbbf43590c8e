//! The VDI operations, one function per `thinline vdi` command, each with its options.
//! The rules every backend shares are checked here, before the backend works: a
//! template only clones, snapshots and is forgotten; a snapshot is never written; a
//! volume something else reads from is never destroyed.

use std::path::Path;

use uuid::Uuid;

use crate::backend::{Backend, for_type};
use crate::daemon::{self, Change, CopyKind};
use crate::model::{SrType, VdiRecord, VdiType, VdiView};
use crate::registry;
use crate::store::Sr;
use crate::template::{self, Templates};
use crate::{Code, Error, Result};

/// Opens the SR named `name` (path or UUID) for changes.
pub fn open_sr(name: &str) -> Result<(Sr, Box<dyn Backend>)> {
    let path = registry::resolve(name)?;
    let sr = Sr::open(&path)?;
    let backend = for_type(sr.md.sr.kind);
    Ok((sr, backend))
}

/// How `v` is shown.
pub fn view(sr: &Sr, backend: &dyn Backend, v: &VdiRecord) -> VdiView {
    VdiView {
        uuid: v.uuid,
        name_label: v.name_label.clone(),
        kind: v.kind,
        sr: sr.md.sr.uuid,
        virtual_size: v.virtual_size,
        physical_utilisation: backend.utilisation(sr, v),
        read_only: v.read_only(),
        is_template: v.is_template(),
        parent: v.parent,
        uri: v.uri.clone(),
        format: v.format,
        file: v.file.clone(),
        thin_id: v.thin_id,
        lv: v.lv.clone(),
        attached: v.attached,
        device: v.device.clone(),
        origin: None,
        template_error: None,
    }
}

fn refuse_template(v: &VdiRecord, op: &str) -> Result<()> {
    if v.is_template() {
        return Err(Error::new(
            Code::VdiIsTemplate,
            format!(
                "VDI {} ({}) is a template: it can only be cloned, snapshotted or forgotten, not {op}",
                v.uuid, v.name_label
            ),
        ));
    }
    Ok(())
}

/// `size` rounded up to a whole number of sectors.
fn rounded_size(size: u64) -> Result<u64> {
    size.checked_next_multiple_of(512)
        .ok_or_else(|| Error::new(Code::InvalidArgument, format!("size {size} is too large")))
}

fn refuse_attached(v: &VdiRecord, op: &str) -> Result<()> {
    if v.attached {
        return Err(Error::new(
            Code::VdiInUse,
            format!(
                "cannot {op} VDI {} ({}) while it is attached; `vdi detach` it first",
                v.uuid, v.name_label
            ),
        ));
    }
    Ok(())
}

fn refuse_dependents(sr: &Sr, v: &VdiRecord, op: &str) -> Result<()> {
    let users: Vec<String> = sr
        .md
        .dependents(v.uuid)
        .map(|d| {
            if d.kind == VdiType::Layer {
                format!("a layer ({})", d.file.as_deref().unwrap_or("?"))
            } else {
                d.shown()
            }
        })
        .collect();
    if users.is_empty() {
        return Ok(());
    }
    Err(Error::new(
        Code::VdiInUse,
        format!(
            "cannot {op} VDI {} ({}): {} read from it: {}",
            v.uuid,
            v.name_label,
            users.len(),
            users.join(", ")
        ),
    ))
}

/// `vdi introduce`.
#[derive(Debug, Clone)]
pub struct IntroduceOptions {
    pub sr: String,
    /// A path or URI `thinline serve` accepts.
    pub uri: String,
    pub name_label: Option<String>,
}

/// Registers a template: opens it once (before taking the SR's lock) for its format
/// and size.
pub fn introduce(o: &IntroduceOptions, templates: &Templates) -> Result<VdiView> {
    let path = registry::resolve(&o.sr)?;
    let probed = templates.probe(&o.uri)?;
    // Pinned: a clone never reads a template that was replaced under its URI.
    let pin = templates.pin(&probed.shown, &probed.full)?;
    let (_, identity) = templates.open_decoded(&probed.shown, &probed.full, Some(probed.format))?;
    if templates.pin(&probed.shown, &probed.full)? != pin {
        return Err(Error::new(
            Code::TemplateUnreachable,
            format!(
                "template {} changed while it was introduced; try again",
                probed.shown
            ),
        ));
    }
    let mut sr = Sr::open(&path)?;
    let backend = for_type(sr.md.sr.kind);
    // Overlays name their template by its URI as shown: two templates must never
    // share that name, or clones of one would read the other.
    let creds = template::credentials(&sr.path)?;
    if let Some(other) = sr.md.vdis.iter().find(|v| {
        v.is_template()
            && v.uri.as_deref() == Some(probed.shown.as_str())
            && creds
                .get(&v.uuid)
                .map_or(v.uri.as_deref(), |f| Some(f.as_str()))
                != Some(probed.full.as_str())
    }) {
        return Err(Error::new(
            Code::InvalidArgument,
            format!(
                "template {} ({}) is shown as {} too: two templates whose locations differ only in credentials or query cannot share an SR",
                other.uuid, other.name_label, probed.shown
            ),
        ));
    }
    let uuid = Uuid::new_v4();
    let label = o.name_label.clone().unwrap_or_else(|| {
        probed
            .shown
            .rsplit('/')
            .find(|s| !s.is_empty())
            .unwrap_or("template")
            .to_owned()
    });
    if probed.full != probed.shown {
        let mut creds = template::credentials(&sr.path)?;
        creds.insert(uuid, probed.full.clone());
        template::save_credentials(&sr.path, &creds)?;
    }
    let rec = VdiRecord {
        uuid,
        uri: Some(probed.shown),
        format: Some(probed.format),
        identity: Some(identity),
        pin: Some(pin),
        ..VdiRecord::new(VdiType::Template, &label, probed.size)
    };
    sr.md.vdis.push(rec.clone());
    sr.save()?;
    Ok(view(&sr, backend.as_ref(), &rec))
}

/// `vdi create`.
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    pub sr: String,
    /// Bytes; rounded up to a multiple of 512.
    pub size: u64,
    pub name_label: Option<String>,
    /// Allocate and zero every block now, as a task (progress, cancel).
    pub preallocate: bool,
    /// Set (by Ctrl-C) to cancel a preallocation.
    pub interrupted: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// Makes an empty thin disk, or with `preallocate` a fully allocated one: then
/// `progress` is called with the task's id and its progress (0 to 1) as it goes.
pub fn create(o: &CreateOptions, progress: &mut dyn FnMut(&str, f64)) -> Result<VdiView> {
    if o.size == 0 {
        return Err(Error::new(
            Code::InvalidArgument,
            "a VDI needs a size above 0",
        ));
    }
    let size = rounded_size(o.size)?;
    let (mut sr, backend) = open_sr(&o.sr)?;
    let label = o.name_label.clone().unwrap_or_else(|| "disk".to_owned());
    let uuid = if o.preallocate {
        let mut task = crate::task::Task::start(
            &sr.path,
            "vdi create --preallocate",
            None,
            o.interrupted.clone(),
        )?;
        let id = task.id().to_owned();
        let mut fill = |done: f64| {
            progress(&id, done);
            task.progress(done)
        };
        backend.create(&mut sr, &label, size, Some(&mut fill))?
    } else {
        backend.create(&mut sr, &label, size, None)?
    };
    let rec = sr.vdi(uuid)?;
    Ok(view(&sr, backend.as_ref(), &rec))
}

/// `vdi clone` and `vdi snapshot`: the source and the new VDI's name-label.
#[derive(Debug, Clone)]
pub struct CopyOptions {
    pub sr: String,
    pub vdi: Uuid,
    /// Defaults to the source's.
    pub name_label: Option<String>,
}

/// A writable disk with the content of a template, disk or snapshot.
pub fn clone(o: &CopyOptions) -> Result<VdiView> {
    copy(o, CopyKind::Clone)
}

/// A read-only point-in-time copy. Of an attached disk, it holds every write
/// acknowledged before it (the daemon serving the disk makes it).
pub fn snapshot(o: &CopyOptions) -> Result<VdiView> {
    copy(o, CopyKind::Snapshot)
}

fn copy(o: &CopyOptions, kind: CopyKind) -> Result<VdiView> {
    let path = registry::resolve(&o.sr)?;
    let name_label = o.name_label.clone();
    if let Some(view) = through_daemon(&path, o.vdi, Change::Copy { kind, name_label })? {
        return Ok(view);
    }
    copy_here(
        &mut unserved(&path, o.vdi)?,
        o.vdi,
        kind,
        o.name_label.as_deref(),
    )
}

/// The SR at `path`, locked, for a change of `vdi` made here: refused (`VDI_IN_USE`)
/// if a daemon may have its image open (it was attached since [`through_daemon`]
/// looked). A daemon opens images only under this lock, so none can start meanwhile.
fn unserved(path: &Path, vdi: Uuid) -> Result<Sr> {
    let sr = Sr::open(path)?;
    let v = sr.vdi(vdi)?;
    if v.attached && v.kind == VdiType::Disk && daemon::running(path) {
        return Err(Error::new(
            Code::VdiInUse,
            format!(
                "VDI {vdi} ({}) was attached meanwhile; try again",
                v.name_label
            ),
        ));
    }
    Ok(sr)
}

fn copy_here(sr: &mut Sr, vdi: Uuid, kind: CopyKind, name_label: Option<&str>) -> Result<VdiView> {
    let backend = for_type(sr.md.sr.kind);
    let src = sr.vdi(vdi)?;
    let label = name_label.unwrap_or(&src.name_label).to_owned();
    let uuid = match kind {
        CopyKind::Snapshot => backend.snapshot(sr, src.uuid, &label)?,
        CopyKind::Clone => backend.clone(sr, src.uuid, &label)?,
    };
    let rec = sr.vdi(uuid)?;
    Ok(view(sr, backend.as_ref(), &rec))
}

/// A change to an attached disk is made by the daemon that serves it, with its image
/// paused and closed; `None` if the VDI is not an attached disk, or no daemon runs
/// (then its files are open nowhere and the change is made here).
fn through_daemon(path: &Path, vdi: Uuid, change: Change) -> Result<Option<VdiView>> {
    let sr = Sr::read(path)?;
    let v = sr.vdi(vdi)?;
    // An LVM SR's disks are device-mapper devices: changed here, with no daemon.
    if !(v.attached && v.kind == VdiType::Disk) || sr.md.sr.kind == SrType::Lvm {
        return Ok(None);
    }
    match daemon::request(path, &daemon::Request::Change { vdi, change }) {
        Some(answer) => from_daemon(answer?).map(Some),
        None if daemon::running(path) => Err(no_answer(path)),
        None => Ok(None),
    }
}

/// Makes `change` to `vdi` of the SR at `path` here: what the SR's daemon runs while
/// the VDI is paused (see [`daemon::Apply`]).
pub fn apply(sr: &mut Sr, vdi: Uuid, change: &Change, templates: &Templates) -> Result<VdiView> {
    match change {
        Change::Copy { kind, name_label } => copy_here(sr, vdi, *kind, name_label.as_deref()),
        Change::Resize { size } => resize_here(sr, vdi, *size, templates),
    }
}

/// `vdi destroy`, `vdi stat`: one VDI.
#[derive(Debug, Clone)]
pub struct VdiRef {
    pub sr: String,
    pub vdi: Uuid,
}

/// Deletes a disk or snapshot. A snapshot that one volume reads from is merged into it
/// (coalesce); one that several read from becomes a layer, deleted with the last of
/// them. A layer left with one reader after a destroy is merged into it, so chains
/// stay short however many snapshots come and go.
pub fn destroy(o: &VdiRef, templates: &Templates) -> Result<()> {
    let (mut sr, backend) = open_sr(&o.sr)?;
    let v = sr.vdi(o.vdi)?;
    refuse_template(&v, "destroyed (use `vdi forget`)")?;
    refuse_attached(&v, "destroy")?;
    let readers = sr.md.dependents(v.uuid).count();
    match (v.kind, readers) {
        (_, 0) => {
            let before = sr.md.clone();
            backend.destroy(&mut sr, v.uuid)?;
            // The first volume below that is still there.
            let mut below = v.backing;
            while let Some(b) = below {
                if sr.md.get(b).is_some() {
                    break;
                }
                below = before.get(b).and_then(|r| r.backing);
            }
            merge_layers(&mut sr, backend.as_ref(), below, templates);
            Ok(())
        }
        (VdiType::Snapshot, 1) => backend.coalesce(&mut sr, v.uuid, templates),
        (VdiType::Snapshot, _) => {
            let rec = sr.md.get_mut(v.uuid).expect("found");
            rec.kind = VdiType::Layer;
            rec.name_label = format!("layer (was snapshot {})", v.name_label);
            sr.save()
        }
        _ => refuse_dependents(&sr, &v, "destroy"),
    }
}

/// Merges layers from `below` down while each has exactly one reader that is not
/// attached. Best effort: the destroy that asked for it has already succeeded, and
/// `sr check --repair` merges what is left.
pub fn merge_layers(
    sr: &mut Sr,
    backend: &dyn Backend,
    mut below: Option<Uuid>,
    templates: &Templates,
) {
    while let Some(b) = below {
        let Some(rec) = sr.md.get(b).cloned() else {
            return;
        };
        let readers: Vec<&VdiRecord> = sr.md.dependents(b).collect();
        if rec.kind != VdiType::Layer || readers.len() != 1 || readers[0].attached {
            return;
        }
        if let Err(e) = backend.coalesce(sr, b, templates) {
            tracing::warn!(layer = %b, error = %e, "cannot merge a layer into its one reader");
            return;
        }
        below = rec.backing;
    }
}

/// `vdi forget`.
#[derive(Debug, Clone)]
pub struct ForgetOptions {
    pub sr: String,
    pub vdi: Uuid,
    /// Forget a template even though clones read from it: they keep their files but
    /// cannot be opened (attached, resized) until the template is introduced again.
    pub force: bool,
}

/// What `vdi forget` did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Forgotten {
    pub uuid: Uuid,
    /// VDIs built on the template, which cannot be opened until it is introduced again.
    pub orphaned: Vec<Uuid>,
}

/// Unregisters a template.
pub fn forget(o: &ForgetOptions) -> Result<Forgotten> {
    let (mut sr, backend) = open_sr(&o.sr)?;
    let v = sr.vdi(o.vdi)?;
    if !v.is_template() {
        return Err(Error::new(
            Code::InvalidArgument,
            format!(
                "VDI {} ({}) is a {}: only templates are forgotten; use `vdi destroy`",
                v.uuid,
                v.name_label,
                match v.kind {
                    VdiType::Snapshot => "snapshot",
                    _ => "disk",
                }
            ),
        ));
    }
    // Every VDI whose chain reaches the template (through layers too).
    let reaches = |mut at: Option<Uuid>| {
        while let Some(u) = at {
            if u == v.uuid {
                return true;
            }
            at = sr.md.get(u).and_then(|r| r.backing);
        }
        false
    };
    let orphaned: Vec<Uuid> = sr
        .md
        .vdis
        .iter()
        .filter(|d| d.kind != VdiType::Layer && d.uuid != v.uuid && reaches(d.backing))
        .map(|d| d.uuid)
        .collect();
    let attached: Vec<String> = orphaned
        .iter()
        .filter_map(|u| sr.md.get(*u))
        .filter(|d| d.attached)
        .map(|d| d.shown())
        .collect();
    if !attached.is_empty() {
        // Even with --force: its cache goes with it, and they read through it.
        return Err(Error::new(
            Code::VdiInUse,
            format!(
                "cannot forget template {} ({}): attached VDIs read from it: {}; detach them first",
                v.uuid,
                v.name_label,
                attached.join(", ")
            ),
        ));
    }
    if !o.force {
        refuse_dependents(&sr, &v, "forget")
            .map_err(|e| Error::new(e.code, format!("{} (--force forgets it anyway: they keep their files but cannot be opened until the template is introduced again)", e.message)))?;
    }
    backend.destroy(&mut sr, v.uuid)?;
    // A running daemon lets go of the cache it may hold open (its file is gone), unless
    // another record of the same template still reads through it.
    if let Some(uri) = &v.uri
        && !sr.md.vdis.iter().any(|o| o.is_template() && o.uri == v.uri)
        && let Some(Err(e)) = daemon::request(
            &sr.path,
            &daemon::Request::ForgetTemplate { uri: uri.clone() },
        )
    {
        tracing::warn!(template = %uri, error = %e, "the SR daemon did not close the forgotten template's cache");
    }
    Ok(Forgotten {
        uuid: v.uuid,
        orphaned,
    })
}

/// `vdi resize`.
#[derive(Debug, Clone)]
pub struct ResizeOptions {
    pub sr: String,
    pub vdi: Uuid,
    /// The new size in bytes; rounded up to a multiple of 512; never smaller.
    pub size: u64,
}

/// Grows a disk. An attached disk grows while it is served: connections made after
/// the resize see the new size (an NBD connection's size never changes).
pub fn resize(o: &ResizeOptions, templates: &Templates) -> Result<VdiView> {
    let path = registry::resolve(&o.sr)?;
    let change = Change::Resize { size: o.size };
    if let Some(view) = through_daemon(&path, o.vdi, change)? {
        return Ok(view);
    }
    resize_here(&mut unserved(&path, o.vdi)?, o.vdi, o.size, templates)
}

fn resize_here(sr: &mut Sr, vdi: Uuid, size: u64, templates: &Templates) -> Result<VdiView> {
    let backend = for_type(sr.md.sr.kind);
    let v = sr.vdi(vdi)?;
    refuse_template(&v, "resized")?;
    if v.kind == VdiType::Snapshot {
        return Err(Error::new(
            Code::VdiReadOnly,
            format!(
                "VDI {} ({}) is a snapshot: it never changes",
                v.uuid, v.name_label
            ),
        ));
    }
    let size = rounded_size(size)?;
    if size < v.virtual_size {
        return Err(Error::new(
            Code::InvalidArgument,
            format!(
                "VDI {} is {} bytes: it only grows, not to {size}",
                v.uuid, v.virtual_size
            ),
        ));
    }
    if size > v.virtual_size {
        backend.resize(sr, v.uuid, size, templates)?;
    }
    let rec = sr.vdi(v.uuid)?;
    Ok(view(sr, backend.as_ref(), &rec))
}

/// One VDI as it is now; of a template, or a VDI built on one, whether that template
/// can be read (it is opened to find out).
pub fn stat(o: &VdiRef, templates: &Templates) -> Result<VdiView> {
    let path = registry::resolve(&o.sr)?;
    let sr = Sr::read(&path)?;
    let backend = for_type(sr.md.sr.kind);
    let v = sr.vdi(o.vdi)?;
    let mut shown = view(&sr, backend.as_ref(), &v);
    // The template at the bottom of its chain, if any.
    let mut below = Some(v.clone());
    while let Some(rec) = below.take_if(|r| !r.is_template()) {
        below = rec.backing.and_then(|b| sr.md.get(b).cloned());
    }
    if let Some(t) = below {
        shown.template_error = templates.trouble(&sr.path, &t);
    }
    if sr.md.sr.kind == SrType::Lvm {
        shown.origin = Some(crate::backend::lvm::pivot::origin_of(&sr, &v).to_owned());
    }
    Ok(shown)
}

/// `vdi pivot`.
#[derive(Debug, Clone, Default)]
pub struct PivotOptions {
    pub sr: String,
    /// A VDI built on a template, or the template.
    pub vdi: Uuid,
    /// Only if the template's proxy says its cache is ready (no hydration, no wait).
    pub if_ready: bool,
    /// Set (by Ctrl-C) to stop waiting for the hydration.
    pub interrupted: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

pub use crate::backend::lvm::pivot::Pivoted;

/// Makes the VDI read its template from the SR's complete cache of it, with every
/// attached clone of the template (an LVM SR's; see `docs/lvm-sr.md`): the template is
/// hydrated first if needed (`progress` told how far), and a VDI already local, or
/// built on no template, is left as it is.
pub fn pivot(o: &PivotOptions, exe: &Path, progress: &mut dyn FnMut(&str, f64)) -> Result<Pivoted> {
    let path = registry::resolve(&o.sr)?;
    if Sr::read(&path)?.md.sr.kind != SrType::Lvm {
        return Err(Error::new(
            Code::InvalidArgument,
            "vdi pivot is for LVM SRs: a directory SR's clones read their template's cache in the SR's daemon",
        ));
    }
    use crate::backend::lvm::pivot::{Wait, pivot};
    let wait = if o.if_ready {
        Wait::IfReady
    } else {
        Wait::Hydrate
    };
    pivot(
        &path,
        o.vdi,
        exe,
        wait,
        &mut |done| progress("hydrate", done),
        &o.interrupted,
    )
}

/// Every VDI of the SR named `sr`.
pub fn list(sr: &str) -> Result<Vec<VdiView>> {
    let path = registry::resolve(sr)?;
    let sr = Sr::read(&path)?;
    let backend = for_type(sr.md.sr.kind);
    Ok(sr
        .md
        .vdis
        .iter()
        .filter(|v| v.kind != VdiType::Layer)
        .map(|v| view(&sr, backend.as_ref(), v))
        .collect())
}

/// `vdi set-name-label`.
#[derive(Debug, Clone)]
pub struct LabelOptions {
    pub sr: String,
    pub vdi: Uuid,
    pub name_label: String,
}

/// Renames a VDI (its file keeps its name).
pub fn set_name_label(o: &LabelOptions) -> Result<VdiView> {
    let (mut sr, backend) = open_sr(&o.sr)?;
    let v = sr.vdi(o.vdi)?;
    refuse_template(&v, "renamed")?;
    sr.md.get_mut(v.uuid).expect("found").name_label = o.name_label.clone();
    sr.save()?;
    let rec = sr.vdi(v.uuid)?;
    Ok(view(&sr, backend.as_ref(), &rec))
}

/// What `vdi attach` answers.
pub use crate::model::Attached;

/// Serves a disk (read-write) or snapshot (read-only) through the SR's daemon,
/// starting the daemon (`exe sr serve`) if none runs; attaching an attached VDI
/// answers the same URI. With `device`, the kernel's nbd client also connects a
/// `/dev/nbdN` to it (one per VDI: attaching again answers the same device).
pub fn attach(o: &VdiRef, exe: &Path, device: bool) -> Result<Attached> {
    let path = registry::resolve(&o.sr)?;
    let sr = Sr::read(&path)?;
    let v = sr.vdi(o.vdi)?;
    refuse_template(&v, "attached (clone it and attach the clone)")?;
    if sr.md.sr.kind == SrType::Lvm {
        drop(sr);
        return crate::backend::lvm::attach::attach(&mut Sr::open(&path)?, o.vdi, exe);
    }
    daemon::ensure(&path, exe)?;
    let answer =
        daemon::request(&path, &daemon::Request::Attach { vdi: o.vdi }).unwrap_or_else(|| {
            Err(Error::new(
                Code::SrBackendFailure,
                "the SR daemon stopped answering",
            ))
        })?;
    let mut attached: Attached = from_daemon(answer)?;
    attached.device = Sr::read(&path)?.vdi(o.vdi)?.device;
    if device {
        // Under the SR's lock, so two attaches never connect two devices to one VDI.
        let mut sr = Sr::open(&path)?;
        // A recorded device the kernel dropped (its daemon died) is connected anew.
        let recorded = (sr.vdi(o.vdi)?.device).filter(|d| {
            crate::device::is_nbd(Path::new(d)) && crate::device::connected(Path::new(d))
        });
        let dev = match recorded {
            Some(dev) => dev,
            None => {
                let export = o.vdi.to_string();
                let socket = attached.socket.clone().unwrap_or_default();
                match crate::device::connect(Path::new(&socket), &export) {
                    Ok(dev) => dev.display().to_string(),
                    Err(e) => {
                        drop(sr);
                        if !v.attached {
                            // Attached by this call only: leave it as it was.
                            let _ = detach(o);
                        }
                        return Err(e);
                    }
                }
            }
        };
        sr.md.get_mut(o.vdi).expect("found").device = Some(dev.clone());
        sr.save()?;
        attached.device = Some(dev);
    }
    Ok(attached)
}

/// Stops serving a VDI: its device (flushed) and its NBD socket and export are gone
/// when this returns (the daemon goes on serving the others). Without a daemon,
/// clears the record.
pub fn detach(o: &VdiRef) -> Result<()> {
    let path = registry::resolve(&o.sr)?;
    if Sr::read(&path)?.md.sr.kind == SrType::Lvm {
        return crate::backend::lvm::attach::detach(&mut Sr::open(&path)?, o.vdi);
    }
    // Without the SR's lock while the device is flushed: a change the daemon makes
    // takes the lock before it pauses the disk those writes go to.
    if let Some(dev) = Sr::read(&path)?.vdi(o.vdi)?.device {
        // A path that is not /dev/nbdN (crafted metadata) is only forgotten.
        if crate::device::is_nbd(Path::new(&dev)) {
            crate::device::disconnect(Path::new(&dev))?;
        }
        let mut sr = Sr::open(&path)?;
        if sr.vdi(o.vdi)?.device.as_deref() == Some(dev.as_str()) {
            sr.md.get_mut(o.vdi).expect("found").device = None;
            sr.save()?;
        }
    }
    let request = daemon::Request::Detach { vdi: o.vdi };
    match daemon::request(&path, &request) {
        Some(answer) => answer.map(|_| ()),
        // Only with proof that no daemon runs: one that is slow may still be writing.
        None if daemon::running(&path) => Err(no_answer(&path)),
        None => daemon::detach_record(&path, o.vdi),
    }
}

/// The daemon's answer as a `T`.
fn from_daemon<T: serde::de::DeserializeOwned>(answer: serde_json::Value) -> Result<T> {
    serde_json::from_value(answer).map_err(|e| {
        Error::new(
            Code::SrBackendFailure,
            format!("the SR daemon answered nonsense: {e}"),
        )
    })
}

fn no_answer(path: &Path) -> Error {
    Error::new(
        Code::SrBackendFailure,
        format!(
            "the SR daemon of {} runs but did not answer; try again",
            path.display()
        ),
    )
}
