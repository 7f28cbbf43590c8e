//! An LVM SR's volumes on this host: its metadata volume and pool made active (after a
//! reboot nothing is: lvm2 does not know the pool), the thin ids of the pool, and the
//! device-mapper devices of attached VDIs. Everything here is idempotent where a crash
//! may have left it half done: activating what is active, deleting an id already gone,
//! removing a device already removed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::command::Lvm;
use super::dm::{Dm, udev_runs};
use super::layout::{self, BLOCK_BYTES, MGT_LV, POOL_DATA_LV, POOL_META_LV};
use super::mgt::MetadataVolume;
use super::pool::{Message, PoolStatus, pool_table, thin_table};
use crate::model::SrRecord;
use crate::{Code, Error, Result};

/// Where LVM SRs' locks and template proxies' sockets are: short (a unix socket's
/// path has 107 bytes at most), root's own, one per host.
pub const RUN_DIR: &str = "/run/thinline";

/// An LVM SR's home on this host: the VG on the metadata volume of which its records
/// are, and the devices lvm2 is limited to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LvmHome {
    pub uuid: Uuid,
    pub vg: String,
    pub devices: Vec<PathBuf>,
}

/// The lock of `what` of the VG `vg` on this host (`sr`: an LVM SR's records;
/// `metadata-snap`: its pool's metadata snapshot; `activate`: its pool's activation),
/// taken (waiting for its holder).
pub fn lvm_lock(vg: &str, what: &str) -> Result<std::fs::File> {
    layout::check_vg_name(vg)?;
    crate::lockfile::private_dir(Path::new(RUN_DIR))?;
    crate::lockfile::exclusive(&Path::new(RUN_DIR).join(format!("lvm-{vg}.{what}.lock")))
}

/// `/dev/VG/LV`.
pub fn lv_path(vg: &str, lv: &str) -> PathBuf {
    PathBuf::from(format!("/dev/{vg}/{lv}"))
}

/// The metadata volume of the SR `home` names, its LV made active if it is not.
pub fn metadata_volume(home: &LvmHome) -> Result<MetadataVolume> {
    layout::check_vg_name(&home.vg)?;
    let path = lv_path(&home.vg, MGT_LV);
    if !path.exists() {
        let lvm = Lvm::new(&home.devices, udev_runs())?;
        lvm.run("lvchange", &["-ay", &format!("{}/{MGT_LV}", home.vg)])
            .map_err(|e| {
                Error::new(
                    Code::SrNotFound,
                    format!(
                        "the metadata volume of SR {} (VG {} on {}) cannot be activated: {}",
                        home.uuid,
                        home.vg,
                        shown_devices(&home.devices),
                        e.message
                    ),
                )
            })?;
    }
    MetadataVolume::open(&path)
}

fn shown_devices(devices: &[PathBuf]) -> String {
    let names: Vec<String> = devices.iter().map(|d| d.display().to_string()).collect();
    names.join(", ")
}

/// The raw LV of the preallocated VDI `vdi`.
pub fn raw_lv_name(vdi: Uuid) -> String {
    format!("{RAW_PREFIX}{}", vdi.simple())
}

const RAW_PREFIX: &str = "thinline_raw_";

/// Whether `name` is a raw LV's name as [`raw_lv_name`] makes it.
pub fn is_raw_lv_name(name: &str) -> bool {
    name.strip_prefix(RAW_PREFIX).is_some_and(|u| {
        u.len() == 32
            && u.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    })
}

/// The `/dev/mapper` name lvm2 gives LV `lv` of VG `vg` (dashes doubled).
fn mapper_name(vg: &str, lv: &str) -> String {
    format!("{}-{}", vg.replace('-', "--"), lv.replace('-', "--"))
}

/// An LVM SR's pool and thin devices.
#[derive(Debug, Clone)]
pub struct Pool {
    lvm: Lvm,
    dm: Dm,
    sr: Uuid,
    vg: String,
    data_bytes: u64,
    when_full: super::pool::WhenFull,
}

impl Pool {
    /// The pool of the LVM SR `sr`.
    pub fn of(sr: &SrRecord) -> Result<Pool> {
        let lvm = sr.lvm.as_ref().ok_or_else(|| {
            Error::new(
                Code::SrBackendFailure,
                format!("SR {} is not an LVM SR", sr.uuid),
            )
        })?;
        layout::check_vg_name(&lvm.vg)?;
        let udev = udev_runs();
        Ok(Pool {
            lvm: Lvm::new(&lvm.devices, udev)?,
            dm: Dm::new(udev),
            sr: sr.uuid,
            vg: lvm.vg.clone(),
            data_bytes: lvm.pool_data_bytes,
            when_full: lvm.when_full,
        })
    }

    /// The pool's device-mapper name.
    pub fn name(&self) -> String {
        layout::pool_name(self.sr)
    }

    /// lvm2, limited to the SR's devices.
    pub fn lvm(&self) -> &Lvm {
        &self.lvm
    }

    pub fn dm(&self) -> &Dm {
        &self.dm
    }

    /// Makes the pool active if it is not: its LVs active, its metadata checked with
    /// `thin_check` (damaged metadata is never activated), the pool device made. An
    /// active pool smaller than recorded (a growth killed between its record and the
    /// reload) gets its recorded size.
    pub fn activate(&self) -> Result<()> {
        let pool = self.name();
        if self.dm.exists(&pool) {
            return self.reload_if_smaller();
        }
        // One activation at a time: commands that only read do not hold the SR's lock,
        // and metadata being activated must not be checked meanwhile.
        let _activating = lvm_lock(&self.vg, "activate")?;
        if self.dm.exists(&pool) {
            return Ok(());
        }
        let meta = lv_path(&self.vg, POOL_META_LV);
        let data = lv_path(&self.vg, POOL_DATA_LV);
        if !meta.exists() || !data.exists() {
            self.lvm.run(
                "lvchange",
                &[
                    "-ay",
                    &format!("{}/{POOL_META_LV}", self.vg),
                    &format!("{}/{POOL_DATA_LV}", self.vg),
                ],
            )?;
        }
        let mut check = std::process::Command::new("thin_check");
        check.env("LC_ALL", "C").arg("-q").arg(&meta);
        super::output_of(check, &format!("thin_check {}", meta.display())).map_err(|e| {
            Error::new(
                Code::SrBackendFailure,
                format!(
                    "the pool metadata of SR {} is damaged, so the pool is not activated: {} (`thin_repair` makes a repaired copy)",
                    self.sr, e.message
                ),
            )
        })?;
        let table = pool_table(
            &meta.display().to_string(),
            &data.display().to_string(),
            self.data_bytes,
            BLOCK_BYTES,
            0,
            self.when_full,
        )?;
        self.dm.create(&pool, &table)
    }

    /// Grows the pool's data by `by` bytes (whole extents, at least one; with
    /// `partial`, by as much of it as there is room for, else `SR_FULL` without all of
    /// it), within the VG's free space less `keep_free` and the data its metadata maps:
    /// `lvextend`
    /// of the data LV, then `record` with the new size (what activation builds the
    /// pool's table from), then the active pool's table reloaded. A crash in between
    /// leaves a data LV larger than recorded (taken up by the next growth, which asks the
    /// VG only for the rest) or a pool recorded larger than its live table (reloaded at
    /// the recorded size by the next [`Pool::activate`]). Returns the new size, or
    /// `None` when there is no room.
    pub fn grow_data(
        &self,
        by: u64,
        keep_free: u64,
        partial: bool,
        record: impl FnOnce(u64) -> Result<()>,
    ) -> Result<Option<u64>> {
        let vg = self
            .lvm
            .vgs()?
            .into_iter()
            .find(|v| v.name == self.vg)
            .ok_or_else(|| Error::new(Code::SrNotFound, format!("VG {} is not found", self.vg)))?;
        let lvs = self.lvm.lvs(&self.vg)?;
        let size_of = |name: &str| lvs.iter().find(|l| l.name == name).map(|l| l.size);
        let (Some(data_lv), Some(meta_lv)) = (size_of(POOL_DATA_LV), size_of(POOL_META_LV)) else {
            return Err(Error::new(
                Code::SrBackendFailure,
                format!("the pool's LVs of VG {} are missing", self.vg),
            ));
        };
        let extent = vg.extent_size.max(1);
        let room = vg.free.saturating_sub(keep_free) / extent * extent;
        let mapped = layout::data_mapped_by(meta_lv).saturating_sub(data_lv) / extent * extent;
        let asked = by.max(1).div_ceil(extent).saturating_mul(extent);
        // What a call killed after its lvextend added to the data LV is taken up first.
        let extended = data_lv.saturating_sub(self.data_bytes);
        let needed = asked.saturating_sub(extended);
        if !partial && needed > room.min(mapped) {
            return Err(Error::new(
                Code::SrFull,
                format!(
                    "the pool cannot grow by {asked} bytes: VG {} has {} bytes free{}, and the pool's metadata maps {mapped} bytes more",
                    self.vg,
                    vg.free,
                    if keep_free > 0 {
                        format!(" ({keep_free} kept free)")
                    } else {
                        String::new()
                    },
                ),
            ));
        }
        let grow = needed.min(room).min(mapped);
        let new = (data_lv + grow) / BLOCK_BYTES * BLOCK_BYTES;
        if new <= self.data_bytes {
            return Ok(None);
        }
        if grow > 0 {
            let size = format!("{}b", data_lv + grow);
            self.lvm.run(
                "lvextend",
                &["-y", "-L", &size, &format!("{}/{POOL_DATA_LV}", self.vg)],
            )?;
            crate::crash::point("data-extended");
        }
        record(new)?;
        crate::crash::point("grow-recorded");
        if self.dm.exists(&self.name()) {
            self.reload_data(new)?;
        }
        Ok(Some(new))
    }

    /// The active pool's table loaded again with `data_bytes` of data.
    fn reload_data(&self, data_bytes: u64) -> Result<()> {
        let pool = self.name();
        let table = pool_table(
            &lv_path(&self.vg, POOL_META_LV).display().to_string(),
            &lv_path(&self.vg, POOL_DATA_LV).display().to_string(),
            data_bytes,
            BLOCK_BYTES,
            0,
            self.when_full,
        )?;
        self.dm.run(&["reload", &pool, "--table", &table])?;
        self.dm.resume(&pool)
    }

    /// Gives the active pool its recorded size if its live table is smaller.
    fn reload_if_smaller(&self) -> Result<()> {
        let live = self.dm.run(&["table", &self.name()])?;
        let sectors: u64 = live
            .split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| {
                Error::new(
                    Code::SrBackendFailure,
                    format!("the pool's table is not a thin pool's: {}", live.trim()),
                )
            })?;
        if sectors.saturating_mul(512) < self.data_bytes {
            let _activating = lvm_lock(&self.vg, "activate")?;
            self.reload_data(self.data_bytes)?;
        }
        Ok(())
    }

    /// The pool's status (it must be active).
    pub fn status(&self) -> Result<PoolStatus> {
        self.dm.pool_status(&self.name())
    }

    pub fn create_thin(&self, id: u32) -> Result<()> {
        self.dm.message(&self.name(), Message::CreateThin(id))
    }

    /// Makes thin id `id` a snapshot of `origin`; an active origin (`origin_vdi`'s
    /// device) is suspended meanwhile, as dm-thin requires, which also flushes it.
    pub fn create_snap(&self, id: u32, origin: u32, origin_vdi: Uuid) -> Result<()> {
        let device = self.device_name(origin_vdi);
        let active = self.dm.exists(&device);
        if active {
            self.dm.suspend(&device)?;
            crate::crash::point("suspended");
        }
        let made = self
            .dm
            .message(&self.name(), Message::CreateSnap(id, origin));
        if active {
            self.dm.resume(&device)?;
        }
        made
    }

    /// Resumes every device of the SR left suspended (a snapshot killed between the
    /// suspend of its origin and the resume: the VM's I/O would wait forever).
    pub fn resume_suspended(&self) -> Result<()> {
        let out = self.dm.run(&[
            "info",
            "-c",
            "--noheadings",
            "-o",
            "name,suspended",
            "--separator",
            " ",
        ])?;
        let ours = format!("thinline-{}-", self.sr.simple());
        for line in out.lines() {
            let mut words = line.split_whitespace();
            if let (Some(name), Some("Suspended")) = (words.next(), words.next())
                && name.starts_with(&ours)
            {
                self.dm.resume(name)?;
            }
        }
        Ok(())
    }

    /// Deletes thin id `id`; one that does not exist is fine.
    pub fn delete_thin(&self, id: u32) -> Result<()> {
        match self.dm.message(&self.name(), Message::Delete(id)) {
            Ok(()) => Ok(()),
            // dm-thin answers ENODATA for an id it does not have.
            Err(e) if e.message.contains("No data available") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Every thin id in the pool with the blocks it maps, read from a reserved
    /// metadata snapshot (the live metadata is never read while the pool runs).
    pub fn thin_ids(&self) -> Result<BTreeMap<u32, u64>> {
        let pool = self.name();
        // One reader at a time (commands that only read do not hold the SR's lock).
        let _snap = lvm_lock(&self.vg, "metadata-snap")?;
        // One left reserved by a crash is released first.
        let _ = self.dm.message(&pool, Message::ReleaseMetadataSnap);
        self.dm.message(&pool, Message::ReserveMetadataSnap)?;
        let meta = lv_path(&self.vg, POOL_META_LV);
        let mut dump = std::process::Command::new("thin_dump");
        // The devices' details only: their mappings are not read.
        dump.env("LC_ALL", "C")
            .args(["-m", "--skip-mappings"])
            .arg(&meta);
        let dumped = super::output_of(dump, &format!("thin_dump -m {}", meta.display()));
        let released = self.dm.message(&pool, Message::ReleaseMetadataSnap);
        let ids = parse_thin_dump(&dumped?)?;
        released?;
        Ok(ids)
    }

    /// The device-mapper name of `vdi`'s thin device.
    pub fn device_name(&self, vdi: Uuid) -> String {
        format!("thinline-{}-{}", self.sr.simple(), vdi.simple())
    }

    /// The device `vdi`'s thin id `id` is attached as: made (read-only when asked; with
    /// `origin`, a read-only device, as its external origin) unless it exists. Returns
    /// its path.
    pub fn attach(
        &self,
        vdi: Uuid,
        id: u32,
        size: u64,
        read_only: bool,
        origin: Option<&Path>,
    ) -> Result<PathBuf> {
        let name = self.device_name(vdi);
        if !self.dm.exists(&name) {
            let origin = origin.map(|o| o.display().to_string());
            let pool = format!("/dev/mapper/{}", self.name());
            let table = thin_table(&pool, id, size, origin.as_deref())?;
            let mut args = vec!["create", name.as_str(), "--table", table.as_str()];
            if read_only {
                args.push("--readonly");
            }
            self.dm.run(&args)?;
        }
        Ok(Path::new("/dev/mapper").join(name))
    }

    /// Whether the device of `v` (a VDI of this SR) exists on this host.
    pub fn device_exists(&self, v: &crate::model::VdiRecord) -> bool {
        match &v.lv {
            Some(lv) => Path::new("/dev/mapper")
                .join(mapper_name(&self.vg, lv))
                .exists(),
            None => self.dm.exists(&self.device_name(v.uuid)),
        }
    }

    /// Removes `vdi`'s device, if it exists; a device still open is refused (VDI_IN_USE).
    pub fn detach(&self, vdi: Uuid) -> Result<()> {
        let name = self.device_name(vdi);
        if !self.dm.exists(&name) {
            return Ok(());
        }
        self.dm.remove(&name).map_err(|e| {
            if e.message.contains("busy") {
                Error::new(
                    Code::VdiInUse,
                    format!(
                        "VDI {vdi}'s device /dev/mapper/{name} is open: close it first ({})",
                        e.message
                    ),
                )
            } else {
                e
            }
        })
    }

    /// Gives `vdi`'s device, if attached, its new size (`id`'s table reloaded).
    pub fn resize_attached(&self, vdi: Uuid, id: u32, size: u64) -> Result<()> {
        let name = self.device_name(vdi);
        if !self.dm.exists(&name) {
            return Ok(());
        }
        // The external origin, if any, stays: the sixth word of the live table.
        let live = self.dm.run(&["table", &name])?;
        let origin = live.split_whitespace().nth(5).map(str::to_owned);
        self.reload(&name, id, size, origin.as_deref())
    }

    /// Makes `origin` the external origin of `vdi`'s device, if attached (`id`, `size`
    /// bytes): its table reloaded, its I/O waiting only while the tables are swapped.
    pub fn set_origin(&self, vdi: Uuid, id: u32, size: u64, origin: &Path) -> Result<()> {
        let name = self.device_name(vdi);
        if !self.dm.exists(&name) {
            return Ok(());
        }
        self.reload(&name, id, size, Some(&origin.display().to_string()))
    }

    /// Loads the thin table of `id` into device `name`, then swaps it in: a failed load
    /// leaves the live table, and the device is never left suspended by this call. A
    /// read-only device stays read-only (a table loaded without the flag would make it
    /// writable).
    fn reload(&self, name: &str, id: u32, size: u64, origin: Option<&str>) -> Result<()> {
        let pool = format!("/dev/mapper/{}", self.name());
        let table = thin_table(&pool, id, size, origin)?;
        let mut args = vec!["reload", name, "--table", table.as_str()];
        if self.is_read_only(name)? {
            args.push("--readonly");
        }
        self.dm.run(&args)?;
        self.dm.resume(name)
    }

    /// Whether device `name` is read-only now (`/sys/block/dm-MINOR/ro`).
    fn is_read_only(&self, name: &str) -> Result<bool> {
        let minor = self
            .dm
            .run(&["info", "-c", "--noheadings", "-o", "minor", name])?;
        let path = format!("/sys/block/dm-{}/ro", minor.trim());
        let ro = std::fs::read_to_string(&path)
            .map_err(|e| Error::io(format!("cannot read {path}"), &e))?;
        Ok(ro.trim() == "1")
    }

    /// Makes `vdi`'s device, if it exists, read-only (its live table loaded again with
    /// the read-only flag).
    pub fn make_read_only(&self, vdi: Uuid) -> Result<()> {
        let name = self.device_name(vdi);
        if !self.dm.exists(&name) || self.is_read_only(&name)? {
            return Ok(());
        }
        let table = self.dm.run(&["table", &name])?;
        self.dm
            .run(&["reload", &name, "--readonly", "--table", table.trim()])?;
        self.dm.resume(&name)
    }

    /// The device-mapper name of template `template`'s local origin.
    fn local_origin_name(&self, template: Uuid) -> String {
        format!("{}-local", self.device_name(template))
    }

    /// Template `template`'s local origin: the first `size` bytes of its complete cache
    /// volume `cache` (which holds the template at its own offsets), read-only, made
    /// unless it exists. Returns its path.
    pub fn attach_local_origin(&self, template: Uuid, cache: &Path, size: u64) -> Result<PathBuf> {
        let name = self.local_origin_name(template);
        if !self.dm.exists(&name) {
            let table = local_origin_table(cache, size)?;
            self.dm
                .run(&["create", &name, "--readonly", "--table", &table])?;
        }
        Ok(Path::new("/dev/mapper").join(name))
    }

    /// Removes template `template`'s local origin, if it exists.
    pub fn detach_local_origin(&self, template: Uuid) -> Result<()> {
        let name = self.local_origin_name(template);
        if self.dm.exists(&name) {
            self.dm.remove(&name)?;
        }
        Ok(())
    }
}

/// The linear table of a local origin: `size` bytes (whole sectors: a partial last
/// sector reads the cache's zeroes) of `cache` from its start.
fn local_origin_table(cache: &Path, size: u64) -> Result<String> {
    if size == 0 {
        return Err(Error::new(
            Code::InvalidArgument,
            "a template of 0 bytes has no local origin",
        ));
    }
    Ok(format!(
        "0 {} linear {} 0",
        size.div_ceil(512),
        cache.display()
    ))
}

/// Raw LVs: preallocated VDIs, plain LVs from the VG's free space.
impl Pool {
    fn raw_lv(&self, name: &str) -> Result<Option<super::command::LvInfo>> {
        Ok(self
            .lvm
            .lvs(&self.vg)?
            .into_iter()
            .find(|lv| lv.name == name))
    }

    /// Makes raw LV `name` of at least `size` bytes (whole extents) from the VG's free
    /// space, tagged, active; returns its size. `SR_FULL` when the VG lacks the room.
    pub fn create_raw(&self, name: &str, size: u64) -> Result<u64> {
        let tag = super::command::owner_tag(self.sr);
        let bytes = format!("{size}b");
        self.lvm
            .run(
                "lvcreate",
                &["-y", "-Zn", "--addtag", &tag, "-L", &bytes, "-n", name, &self.vg],
            )
            .map_err(|e| {
                if e.message.contains("nsufficient free space") {
                    Error::new(
                        Code::SrFull,
                        format!(
                            "VG {} has no room for a {size}-byte preallocated VDI outside its pool (make room with `sr create --reserve`, or add a device to the VG): {}",
                            self.vg, e.message
                        ),
                    )
                } else {
                    e
                }
            })?;
        let made = self
            .raw_lv(name)?
            .ok_or_else(|| Error::new(Code::SrBackendFailure, format!("LV {name} was not made")))?;
        Ok(made.size)
    }

    /// The device of raw LV `name`, made active.
    pub fn activate_raw(&self, name: &str) -> Result<PathBuf> {
        self.lvm
            .run("lvchange", &["-ay", &format!("{}/{name}", self.vg)])?;
        Ok(Path::new("/dev/mapper").join(mapper_name(&self.vg, name)))
    }

    /// Makes raw LV `name` inactive; one still open is refused (VDI_IN_USE).
    pub fn deactivate_raw(&self, name: &str) -> Result<()> {
        self.lvm
            .run("lvchange", &["-an", &format!("{}/{name}", self.vg)])
            .map(drop)
            .map_err(|e| {
                if e.message.contains("in use") || e.message.contains("open") {
                    Error::new(
                        Code::VdiInUse,
                        format!(
                            "LV {}/{name} is open: close it first ({})",
                            self.vg, e.message
                        ),
                    )
                } else {
                    e
                }
            })
    }

    /// Writes zeroes over `len` bytes of raw LV `name` (active) at `offset`: the
    /// kernel's zero-out, which devices that can do it without writing do so.
    pub fn zero_raw(&self, name: &str, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let device = Path::new("/dev/mapper").join(mapper_name(&self.vg, name));
        let mut c = std::process::Command::new("blkdiscard");
        c.env("LC_ALL", "C")
            .args(["--zeroout", "--offset", &offset.to_string()])
            .args(["--length", &len.to_string()])
            .arg(&device);
        super::output_of(c, &format!("blkdiscard --zeroout {}", device.display())).map(drop)
    }

    /// Grows raw LV `name`, recorded as `recorded` bytes, to at least `size` bytes,
    /// everything past `recorded` zeroed (new extents may hold what an earlier LV left;
    /// an extend a crash interrupted is zeroed again); returns its new size. Stays as
    /// active as it was.
    pub fn extend_raw(&self, name: &str, recorded: u64, size: u64) -> Result<u64> {
        let old = self.raw_lv(name)?.ok_or_else(|| {
            Error::new(
                Code::SrBackendFailure,
                format!("LV {}/{name} is missing", self.vg),
            )
        })?;
        if old.size < size {
            let bytes = format!("{size}b");
            self.lvm.run(
                "lvextend",
                &["-y", "-L", &bytes, &format!("{}/{name}", self.vg)],
            )?;
        }
        let new = self.raw_lv(name)?.map_or(old.size, |lv| lv.size);
        let from = recorded.min(new);
        if !old.active() {
            self.activate_raw(name)?;
        }
        let zeroed = self.zero_raw(name, from, new - from);
        if !old.active() {
            self.deactivate_raw(name)?;
        }
        zeroed.map(|()| new)
    }

    /// Removes raw LV `name`; with `wipe`, its data zeroed first (no later LV reads
    /// it). One already gone is fine; one without the SR's tag is never touched.
    pub fn remove_raw(&self, name: &str, wipe: bool) -> Result<()> {
        let Some(lv) = self.raw_lv(name)? else {
            return Ok(());
        };
        let tag = super::command::owner_tag(self.sr);
        if !lv.tags.contains(&tag) {
            return Err(Error::new(
                Code::SrBackendFailure,
                format!(
                    "LV {}/{name} is not the SR's (no tag {tag}): left as it is",
                    self.vg
                ),
            ));
        }
        if wipe {
            self.activate_raw(name)?;
            self.zero_raw(name, 0, lv.size)?;
        }
        self.lvm
            .run("lvremove", &["-y", &format!("{}/{name}", self.vg)])
            .map(drop)
    }

    /// The SR's raw LVs (tagged, named as [`raw_lv_name`] makes them).
    pub fn raw_lvs(&self) -> Result<Vec<String>> {
        let tag = super::command::owner_tag(self.sr);
        Ok(self
            .lvm
            .lvs(&self.vg)?
            .into_iter()
            .filter(|lv| is_raw_lv_name(&lv.name) && lv.tags.contains(&tag))
            .map(|lv| lv.name)
            .collect())
    }
}

/// The `dev_id` and `mapped_blocks` of every `<device …>` of `thin_dump`'s XML.
fn parse_thin_dump(xml: &str) -> Result<BTreeMap<u32, u64>> {
    let attr = |tag: &str, name: &str| -> Option<u64> {
        let at = tag.find(&format!(" {name}=\""))? + name.len() + 3;
        let end = tag[at..].find('"')? + at;
        tag[at..end].parse().ok()
    };
    let mut ids = BTreeMap::new();
    for tag in xml.split('<').filter(|t| t.starts_with("device ")) {
        let (Some(id), Some(blocks)) = (attr(tag, "dev_id"), attr(tag, "mapped_blocks")) else {
            return Err(Error::new(
                Code::SrBackendFailure,
                format!("thin_dump printed a device without dev_id or mapped_blocks: <{tag}"),
            ));
        };
        let id = u32::try_from(id).map_err(|_| {
            Error::new(
                Code::SrBackendFailure,
                format!("thin_dump printed thin id {id}"),
            )
        })?;
        ids.insert(id, blocks);
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_lv_names_are_made_from_the_vdi_uuid_and_nothing_else_passes_for_one() {
        let u = Uuid::new_v4();
        assert!(is_raw_lv_name(&raw_lv_name(u)));
        for bad in [
            "thinline_raw_",
            "thinline_raw_../x",
            "users",
            "thinline_mgt",
            &format!("thinline_raw_{}", u.hyphenated()),
        ] {
            assert!(!is_raw_lv_name(bad), "{bad}");
        }
        assert_eq!(
            mapper_name("my-vg", "thinline_raw_ab"),
            "my--vg-thinline_raw_ab"
        );
    }

    #[test]
    fn a_local_origin_maps_the_templates_bytes_from_the_start_of_its_cache_in_whole_sectors() {
        let cache = Path::new("/dev/mapper/c");
        assert_eq!(
            local_origin_table(cache, 1 << 20).unwrap(),
            "0 2048 linear /dev/mapper/c 0"
        );
        assert_eq!(
            local_origin_table(cache, 513).unwrap(),
            "0 2 linear /dev/mapper/c 0"
        );
        assert!(local_origin_table(cache, 0).is_err());
    }

    #[test]
    fn thin_dump_xml_gives_each_devices_id_and_mapped_blocks() {
        let xml = r#"<superblock uuid="" time="1" transaction="0" flags="0" version="2" data_block_size="128" nr_data_blocks="1504">
  <device dev_id="1" mapped_blocks="16" transaction="0" creation_time="0" snap_time="1">
    <range_mapping origin_begin="64" data_begin="0" length="16" time="0"/>
  </device>
  <device dev_id="7" mapped_blocks="0" transaction="0" creation_time="1" snap_time="1">
  </device>
</superblock>"#;
        let ids = parse_thin_dump(xml).unwrap();
        assert_eq!(ids.into_iter().collect::<Vec<_>>(), [(1, 16), (7, 0)]);
        assert!(
            parse_thin_dump("<superblock>\n</superblock>")
                .unwrap()
                .is_empty()
        );
        assert!(parse_thin_dump(r#"<device dev_id="x" mapped_blocks="1">"#).is_err());
        assert!(parse_thin_dump(r#"<device dev_id="99999999999" mapped_blocks="1">"#).is_err());
    }
}
