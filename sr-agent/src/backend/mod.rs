//! What an SR's volumes live on. Every backend keeps the same records and the same
//! rules (checked by [`crate::vdi`] before a backend is called: templates only clone,
//! snapshot and forget; nothing is destroyed while another record reads from it), and
//! does the work its own way: the directory SR ([`crate::backend::file`]) with qcow2 overlays;
//! the LVM SR ([`crate::backend::lvm::thin`]) with dm-thin volumes and internal snapshots.

pub mod file;
pub mod lvm;
mod stray;

use uuid::Uuid;

use crate::Result;
use crate::model::{SrType, VdiRecord};
use crate::store::Sr;
use crate::template::Templates;

/// One thing `sr check` found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Finding {
    /// A short stable name (`missing_file`, `unused_layer`, `leftover_file`, …).
    pub kind: &'static str,
    pub message: String,
    /// Whether `sr check --repair` fixes it.
    pub repairable: bool,
}

/// The volume side of an SR. Methods that change things take the SR open for changes
/// (locked) and leave its metadata committed.
pub trait Backend: std::fmt::Debug {
    fn sr_type(&self) -> SrType;
    /// The SR storage's total and free bytes.
    fn space(&self, sr: &Sr) -> Result<(u64, u64)>;
    /// Bytes `vdi`'s own volume takes (0 for a template).
    fn utilisation(&self, sr: &Sr, vdi: &VdiRecord) -> u64;
    /// Makes an empty writable disk; returns its UUID. With `fill`, every block is
    /// allocated and written with zeroes first (preallocation), and `fill` is called
    /// with the progress (0 to 1) between steps: an error from it (a cancellation)
    /// stops the work and leaves nothing made.
    fn create(
        &self,
        sr: &mut Sr,
        label: &str,
        size: u64,
        fill: Option<&mut dyn FnMut(f64) -> Result<()>>,
    ) -> Result<Uuid>;
    /// Makes a writable disk with `src`'s content; both stay as writable as they were.
    fn clone(&self, sr: &mut Sr, src: Uuid, label: &str) -> Result<Uuid>;
    /// Makes a read-only point-in-time copy of `src`.
    fn snapshot(&self, sr: &mut Sr, src: Uuid, label: &str) -> Result<Uuid>;
    /// Deletes `vdi`'s volume (nothing reads from it) and the layers only it used.
    fn destroy(&self, sr: &mut Sr, vdi: Uuid) -> Result<()>;
    /// Merges `vdi` (a snapshot or a layer) into the one record that reads from it, and
    /// deletes it: that record's content does not change, and its chain gets shorter.
    fn coalesce(&self, sr: &mut Sr, vdi: Uuid, templates: &Templates) -> Result<()>;
    /// Grows `vdi` to `size` bytes (the caller checked it grows).
    fn resize(&self, sr: &mut Sr, vdi: Uuid, size: u64, templates: &Templates) -> Result<()>;
    /// Compares the records with the storage.
    fn check(&self, sr: &Sr) -> Vec<Finding>;
    /// Fixes what [`Backend::check`] reports as repairable; returns what it did.
    fn repair(&self, sr: &mut Sr, templates: &Templates) -> Result<Vec<String>>;
}

/// The operation a crash interrupted, if the SR's journal holds one (every backend's
/// first finding: the next change, or `sr check --repair`, undoes or finishes it).
fn interrupted(sr: &Sr) -> Option<Finding> {
    let j = sr.md.journal.as_ref()?;
    Some(Finding {
        kind: "interrupted_operation",
        message: format!(
            "a {} was interrupted ({})",
            j.operation,
            if j.committed {
                "committed: repair finishes it"
            } else {
                "not committed: repair undoes it"
            }
        ),
        repairable: true,
    })
}

/// The backend of an SR of type `kind`.
pub fn for_type(kind: SrType) -> Box<dyn Backend> {
    match kind {
        SrType::File => Box::new(file::FileBackend),
        SrType::Lvm => Box::<lvm::thin::ThinBackend>::default(),
    }
}

/// Records `snap` (made by the caller from `src`, a template) as another record of the
/// same template: a template never changes, so that is its snapshot.
fn snapshot_template(sr: &mut Sr, src: &VdiRecord, mut snap: VdiRecord) -> Result<()> {
    snap.kind = crate::model::VdiType::Template;
    snap.backing = None;
    snap.uri = src.uri.clone();
    snap.format = src.format;
    snap.identity = src.identity.clone();
    snap.pin = src.pin.clone();
    let mut creds = crate::template::credentials(&sr.path)?;
    if let Some(full) = creds.get(&src.uuid).cloned() {
        creds.insert(snap.uuid, full);
        crate::template::save_credentials(&sr.path, &creds)?;
    }
    sr.md.vdis.push(snap);
    sr.save()
}

/// Removes what the SR keeps of `template` once its record is gone: its credentials
/// and its cache. A crash here leaves stray files that `sr check --repair` removes.
fn template_gone(sr: &Sr, template: &VdiRecord) -> Result<()> {
    let mut creds = crate::template::credentials(&sr.path)?;
    if creds.remove(&template.uuid).is_some() {
        crate::template::save_credentials(&sr.path, &creds)?;
    }
    if let (Some(uri), Some(identity)) = (&template.uri, &template.identity) {
        stray::remove_cache_of(sr, uri, identity)?;
    }
    Ok(())
}
