//! What an SR records about itself and its VDIs (stored), and what commands print
//! about them (views: the output contract of `docs/sr-agent.md`).

use serde::{Deserialize, Serialize};
use thinline_format::Format;
use uuid::Uuid;

/// The kind of storage an SR is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SrType {
    /// A directory of qcow2 files.
    File,
    /// An LVM volume group with a dm-thin pool (see `docs/lvm-sr.md`).
    Lvm,
}

/// What a VDI is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VdiType {
    /// A read-only image registered by URI.
    Template,
    /// A writable thin disk.
    Disk,
    /// A read-only point-in-time copy of a disk.
    Snapshot,
    /// A read-only volume the agent made so that a disk and its clone can both stay
    /// writable; not a VDI of its own (never listed, never named by users).
    Layer,
}

/// An SR's own record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SrRecord {
    pub uuid: Uuid,
    pub name_label: String,
    #[serde(rename = "type")]
    pub kind: SrType,
    /// Whether the agent made the directory (`sr create`), so `sr destroy` removes it.
    pub made_directory: bool,
    /// LVM SRs: the volume group and the pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lvm: Option<LvmRecord>,
}

/// An LVM SR's volume group and thin pool, as recorded on its metadata volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LvmRecord {
    pub vg: String,
    /// The physical volumes: lvm2 runs limited to them.
    pub devices: Vec<std::path::PathBuf>,
    /// Whether `sr create` made the VG (so `sr destroy` removes it).
    pub owns_vg: bool,
    /// Bytes of the pool's data LV.
    pub pool_data_bytes: u64,
    pub when_full: crate::backend::lvm::pool::WhenFull,
    /// When a template's proxy fetches the whole template (so that its clones can
    /// pivot onto the local cache).
    #[serde(default)]
    pub hydrate: Hydrate,
    /// Bytes of the VG the pool never grows into by itself (`sr create --reserve`).
    #[serde(default)]
    pub reserve_bytes: u64,
    /// The most bytes the pool's data grows to by itself; `None`: as far as the VG's
    /// free space beyond the reserve goes.
    #[serde(default)]
    pub autoextend_max: Option<u64>,
    /// The thin id the next volume gets (ids are never reused).
    pub next_thin_id: u32,
}

/// When an LVM SR's template proxies fetch the whole template, not only what clones read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Hydrate {
    /// In the background from the first attach, yielding to the clones' reads.
    #[default]
    Background,
    /// Only when `vdi pivot` asks for it.
    OnPivot,
}

/// One VDI (or layer) as recorded.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VdiRecord {
    pub uuid: Uuid,
    pub name_label: String,
    #[serde(rename = "type")]
    pub kind: VdiType,
    pub virtual_size: u64,
    /// The VDI this one was cloned or snapshotted from.
    pub parent: Option<Uuid>,
    /// The record whose volume this one's unwritten blocks read from.
    pub backing: Option<Uuid>,
    /// Templates: where the image is, without credentials.
    pub uri: Option<String>,
    /// Templates: the image's format.
    pub format: Option<Format>,
    /// Disks, snapshots and layers: the file name in the SR directory.
    pub file: Option<String>,
    /// Served by the SR's daemon (`vdi attach`); a daemon that starts serves it again.
    #[serde(default)]
    pub attached: bool,
    /// Templates: the identity of every file of the template's chain when it was
    /// introduced (what its cache is keyed by); a template that is no longer that is
    /// not read (its cached blocks still are).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// Templates: the object's size and ETag, version or mtime when it was
    /// introduced, compared in one small request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin: Option<String>,
    /// The kernel block device connected to it (`vdi attach --device`; on an LVM SR,
    /// its device-mapper device).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// LVM SRs: the dm-thin id of its thin volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thin_id: Option<u32>,
    /// LVM SRs: a preallocated disk's raw LV (`thinline_raw_UUID`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lv: Option<String>,
    /// LVM SRs' templates: its cache is complete and checked, and its clones read it
    /// from there (pivoted), not through its proxy.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub local: bool,
    /// LVM SRs' templates: a pivot onto the complete, scrubbed cache began (clones may
    /// already read it); any later pivot or attach finishes it, without the proxy.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pivoting: bool,
}

impl VdiRecord {
    /// A new record of `kind` with a new UUID, and no parent, backing or volume yet.
    pub fn new(kind: VdiType, name_label: &str, virtual_size: u64) -> VdiRecord {
        VdiRecord {
            uuid: Uuid::new_v4(),
            name_label: name_label.to_owned(),
            kind,
            virtual_size,
            parent: None,
            backing: None,
            uri: None,
            format: None,
            file: None,
            attached: false,
            device: None,
            identity: None,
            pin: None,
            thin_id: None,
            lv: None,
            local: false,
            pivoting: false,
        }
    }

    pub fn is_template(&self) -> bool {
        self.kind == VdiType::Template
    }

    /// A template whose clones read its local cache (pivoted, or a pivot begun).
    pub fn is_local(&self) -> bool {
        self.local || self.pivoting
    }

    pub fn read_only(&self) -> bool {
        self.kind != VdiType::Disk
    }

    /// `UUID (name-label)`, as messages name a VDI.
    pub fn shown(&self) -> String {
        format!("{} ({})", self.uuid, self.name_label)
    }
}

/// An SR as commands print it.
#[derive(Debug, Clone, Serialize)]
pub struct SrView {
    pub uuid: Uuid,
    pub name_label: String,
    #[serde(rename = "type")]
    pub kind: SrType,
    /// The SR's directory; an LVM SR's home on this host.
    pub path: String,
    /// An LVM SR's volume group.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vg: Option<String>,
    /// An LVM SR's devices (its VG's PVs, as recorded: what its lvm2 commands see).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<String>,
    /// An LVM SR's templates are fetched whole: `background` or `on-pivot`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hydrate: Option<Hydrate>,
    pub total_space: u64,
    pub free_space: u64,
    pub physical_utilisation: u64,
    pub vdi_count: usize,
    /// `healthy`, or `needs_repair` when an interrupted operation or a missing file
    /// was found (see `sr check`).
    pub health: &'static str,
    /// The SR's serving daemon, if one runs: its pid and the VDIs it serves.
    pub daemon: Option<DaemonStatus>,
    /// An LVM SR's thin pool, as the kernel reports it now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<PoolHealth>,
    /// `sr stat`: the templates that cannot be read now, and why.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub template_errors: Vec<TemplateError>,
}

/// An LVM SR's thin pool, from its status.
#[derive(Debug, Clone, Serialize)]
pub struct PoolHealth {
    /// Data and metadata use, in percent.
    pub data_percent: f64,
    pub metadata_percent: f64,
    /// `read_write`, `read_only`, `out_of_data_space` or `failed`.
    pub mode: crate::backend::lvm::pool::PoolMode,
    /// The kernel found damaged metadata: `thin_check` before the pool is used again.
    pub needs_check: bool,
    /// What writes do when the data is full: fail at once (`error`, `SR_FULL` for the
    /// agent's own) or wait for it to grow (`queue`).
    pub when_full: crate::backend::lvm::pool::WhenFull,
}

/// A template that cannot be read now.
#[derive(Debug, Clone, Serialize)]
pub struct TemplateError {
    pub uuid: Uuid,
    pub uri: String,
    pub error: String,
}

/// A VDI as commands print it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VdiView {
    pub uuid: Uuid,
    pub name_label: String,
    #[serde(rename = "type")]
    pub kind: VdiType,
    pub sr: Uuid,
    pub virtual_size: u64,
    pub physical_utilisation: u64,
    pub read_only: bool,
    pub is_template: bool,
    pub parent: Option<Uuid>,
    pub uri: Option<String>,
    pub format: Option<Format>,
    pub file: Option<String>,
    /// On an LVM SR: its dm-thin id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thin_id: Option<u32>,
    /// On an LVM SR: a preallocated disk's raw LV.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lv: Option<String>,
    pub attached: bool,
    /// `/dev/nbdN` when attached with `--device`; on an LVM SR, its `/dev/mapper` path
    /// when attached.
    pub device: Option<String>,
    /// `vdi stat` on an LVM SR: where what the VDI never wrote is read from: `remote`
    /// (its template's proxy, which has cached nothing of it yet), `partial` (the proxy,
    /// which has cached part of it) or `local` (the SR: a complete template cache, or
    /// no template).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    /// `vdi stat` of a template, or of a VDI built on one: why that template cannot be
    /// read now (unreachable, or replaced since it was introduced); absent when it can.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_error: Option<String>,
}

/// What `vdi attach` answers (and the SR daemon's `Attach` request).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Attached {
    pub uuid: Uuid,
    /// Where it is served over NBD (every attach on a directory SR).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd_uri: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
    /// `/dev/nbdN` with `--device`; on an LVM SR, always: its `/dev/mapper` path.
    #[serde(default)]
    pub device: Option<String>,
}

/// The SR's serving daemon, as its `Status` request answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DaemonStatus {
    pub pid: u32,
    pub serving: Vec<Uuid>,
    /// Fetches from templates the caches have in flight.
    #[serde(default)]
    pub fetches_in_flight: usize,
    /// The templates (URIs as shown) whose caches the daemon has open.
    #[serde(default)]
    pub caches: Vec<String>,
}
