//! What an SR's volumes live on. Every backend keeps the same records and the same
//! rules (checked by [`crate::vdi`] before a backend is called: templates only clone,
//! snapshot and forget; nothing is destroyed while another record reads from it), and
//! does the work its own way: the directory SR ([`crate::backend::file`]) with qcow2 overlays;
//! the LVM SR (next) with dm-thin devices, internal snapshots and external origins.

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

/// The backend of an SR of type `kind`.
pub fn for_type(kind: SrType) -> Box<dyn Backend> {
    match kind {
        SrType::File => Box::new(file::FileBackend),
    }
}
