//! The LVM SR's VDIs as dm-thin volumes of the SR's pool:
//!
//! - create: a new thin id (`create_thin`);
//! - clone and snapshot of a disk or snapshot: a dm-thin internal snapshot
//!   (`create_snap`), which shares blocks with its origin and is writable, so both go
//!   on as they were and neither reads from the other: no layers, nothing to coalesce;
//! - clone of a template: an empty thin id whose unwritten blocks read from the
//!   template (its external origin when attached);
//! - destroy: `delete` of the thin id (dm-thin frees the blocks nothing else shares).
//!
//! A thin id is recorded in the SR's journal before the message that makes it, and one
//! being deleted after the commit that drops its record, so kill -9 anywhere leaves
//! either the old state or the new, and never an id that nothing records.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use uuid::Uuid;

use super::host::Pool;
use super::layout::BLOCK_BYTES;
use super::pool::{MAX_THIN_ID, PoolMode, WhenFull};
use crate::backend::{Backend, Finding};
use crate::model::{PoolHealth, SrType, VdiRecord, VdiType};
use crate::store::{Journal, Sr};
use crate::template::Templates;
use crate::{Code, Error, Result};

/// The LVM backend. It remembers, for one command, the blocks each thin id maps.
#[derive(Debug, Default)]
pub struct ThinBackend {
    mapped: OnceLock<BTreeMap<u32, u64>>,
}

fn record(sr: &Sr, uuid: Uuid) -> Result<VdiRecord> {
    sr.md.get(uuid).cloned().ok_or_else(|| {
        Error::new(
            Code::VdiNotFound,
            format!("no VDI {uuid} in SR {}", sr.md.sr.uuid),
        )
    })
}

fn thin_id_of(v: &VdiRecord) -> Result<u32> {
    if v.lv.is_some() {
        return Err(Error::new(
            Code::InvalidArgument,
            format!(
                "VDI {} is preallocated (a raw LV): dm-thin snapshots and clones are of thin VDIs only",
                v.shown()
            ),
        ));
    }
    v.thin_id.ok_or_else(|| {
        Error::new(
            Code::SrBackendFailure,
            format!("VDI {} has no thin id recorded", v.shown()),
        )
    })
}

/// Takes the SR's next thin id (recorded with the journal that uses it).
fn next_thin_id(sr: &mut Sr) -> Result<u32> {
    let uuid = sr.md.sr.uuid;
    let lvm = sr.md.sr.lvm.as_mut().ok_or_else(|| {
        Error::new(
            Code::SrBackendFailure,
            format!("SR {uuid} is not an LVM SR"),
        )
    })?;
    let id = lvm.next_thin_id;
    if id > MAX_THIN_ID {
        return Err(Error::new(
            Code::SrFull,
            format!("SR {uuid} has used all of dm-thin's 2^24 thin ids"),
        ));
    }
    lvm.next_thin_id = id + 1;
    Ok(id)
}

/// Adds `rec` with a new thin id: empty, or a snapshot of thin id `origin` (of
/// `origin_vdi`), under the journal of `operation`.
fn add_thin(
    sr: &mut Sr,
    operation: &str,
    mut rec: VdiRecord,
    origin: Option<(u32, Uuid)>,
) -> Result<Uuid> {
    let pool = Pool::of(&sr.md.sr)?;
    pool.activate()?;
    let id = next_thin_id(sr)?;
    rec.thin_id = Some(id);
    let uuid = rec.uuid;
    let journal = Journal {
        operation: operation.into(),
        thin_made: vec![id],
        ..Journal::default()
    };
    sr.run(
        journal,
        |_| match origin {
            None => pool.create_thin(id),
            Some((origin, vdi)) => pool.create_snap(id, origin, vdi),
        },
        |md| md.vdis.push(rec),
    )?;
    Ok(uuid)
}

/// Step of a preallocation: bytes zeroed between progress reports and cancel checks.
const ZERO_STEP: u64 = 64 << 20;

/// Adds a preallocated disk: a raw LV from the VG's free space, every byte zeroed
/// (its extents may hold what an earlier LV left), `fill` told the progress between
/// steps; a cancellation removes it. Its size is the LV's (whole extents).
fn add_raw(
    sr: &mut Sr,
    mut rec: VdiRecord,
    fill: &mut dyn FnMut(f64) -> Result<()>,
) -> Result<Uuid> {
    let pool = Pool::of(&sr.md.sr)?;
    let name = super::host::raw_lv_name(rec.uuid);
    rec.lv = Some(name.clone());
    let uuid = rec.uuid;
    let journal = Journal {
        operation: "vdi create --preallocate".into(),
        lvs_made: vec![name.clone()],
        ..Journal::default()
    };
    let size = std::cell::Cell::new(rec.virtual_size);
    sr.run(
        journal,
        |_| {
            let made = pool.create_raw(&name, size.get())?;
            size.set(made);
            fill(0.0)?;
            let mut offset = 0;
            while offset < made {
                let n = (made - offset).min(ZERO_STEP);
                pool.zero_raw(&name, offset, n)?;
                offset += n;
                fill(offset as f64 / made as f64)?;
            }
            pool.deactivate_raw(&name)
        },
        |md| {
            rec.virtual_size = size.get();
            md.vdis.push(rec);
        },
    )?;
    Ok(uuid)
}

/// The thin id of template `template`'s cache volume, made (empty) unless it has one.
pub fn cache_volume(sr: &mut Sr, pool: &Pool, template: Uuid) -> Result<u32> {
    if let Some(id) = record(sr, template)?.thin_id {
        return Ok(id);
    }
    let id = next_thin_id(sr)?;
    let journal = Journal {
        operation: "template cache volume".into(),
        thin_made: vec![id],
        ..Journal::default()
    };
    sr.run(
        journal,
        |_| pool.create_thin(id),
        |md| md.get_mut(template).expect("found").thin_id = Some(id),
    )?;
    Ok(id)
}

impl Backend for ThinBackend {
    fn sr_type(&self) -> SrType {
        SrType::Lvm
    }

    fn space(&self, sr: &Sr) -> Result<(u64, u64)> {
        let pool = Pool::of(&sr.md.sr)?;
        pool.activate()?;
        let status = pool.status()?;
        let total = status.data_total.saturating_mul(BLOCK_BYTES);
        let used = status.data_used.saturating_mul(BLOCK_BYTES);
        Ok((total, total.saturating_sub(used)))
    }

    fn utilisation(&self, sr: &Sr, vdi: &VdiRecord) -> u64 {
        if vdi.lv.is_some() {
            return vdi.virtual_size;
        }
        let Some(id) = vdi.thin_id else { return 0 };
        let mapped = self.mapped.get_or_init(|| {
            let read = Pool::of(&sr.md.sr).and_then(|pool| {
                pool.activate()?;
                pool.thin_ids()
            });
            read.unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot read the pool's thin ids");
                BTreeMap::new()
            })
        });
        mapped.get(&id).map_or(0, |blocks| blocks * BLOCK_BYTES)
    }

    fn create(
        &self,
        sr: &mut Sr,
        label: &str,
        size: u64,
        fill: Option<&mut dyn FnMut(f64) -> Result<()>>,
    ) -> Result<Uuid> {
        let rec = VdiRecord::new(VdiType::Disk, label, size);
        match fill {
            Some(fill) => add_raw(sr, rec, fill),
            None => add_thin(sr, "vdi create", rec, None),
        }
    }

    fn clone(&self, sr: &mut Sr, src: Uuid, label: &str) -> Result<Uuid> {
        let src = record(sr, src)?;
        let mut rec = VdiRecord::new(VdiType::Disk, label, src.virtual_size);
        rec.parent = Some(src.uuid);
        if src.is_template() {
            // Empty: what it never wrote is the template's.
            rec.backing = Some(src.uuid);
            return add_thin(sr, "vdi clone", rec, None);
        }
        rec.backing = src.backing;
        let origin = (thin_id_of(&src)?, src.uuid);
        add_thin(sr, "vdi clone", rec, Some(origin))
    }

    fn snapshot(&self, sr: &mut Sr, src: Uuid, label: &str) -> Result<Uuid> {
        let src = record(sr, src)?;
        let mut rec = VdiRecord::new(VdiType::Snapshot, label, src.virtual_size);
        rec.parent = Some(src.uuid);
        if src.is_template() {
            let uuid = rec.uuid;
            crate::backend::snapshot_template(sr, &src, rec)?;
            return Ok(uuid);
        }
        rec.backing = src.backing;
        let origin = (thin_id_of(&src)?, src.uuid);
        add_thin(sr, "vdi snapshot", rec, Some(origin))
    }

    fn destroy(&self, sr: &mut Sr, vdi: Uuid) -> Result<()> {
        let target = record(sr, vdi)?;
        if target.is_template() {
            // Its cache volume is deleted after the commit: never while it is in use.
            let pool = Pool::of(&sr.md.sr)?;
            if super::origin::running(sr.md.sr.uuid, vdi).is_some() || pool.device_exists(&target) {
                return Err(Error::new(
                    Code::VdiInUse,
                    format!(
                        "template {}'s proxy or cache device is still up: detach its clones (or run `sr check --repair`) first",
                        target.shown()
                    ),
                ));
            }
        }
        let journal = Journal {
            operation: "vdi destroy".into(),
            thin_dropped: target.thin_id.into_iter().collect(),
            lvs_dropped: target.lv.iter().cloned().collect(),
            ..Journal::default()
        };
        sr.run(
            journal,
            |_| Ok(()),
            |md| {
                md.vdis.retain(|v| v.uuid != vdi);
                for v in &mut md.vdis {
                    if v.parent == Some(vdi) {
                        v.parent = None;
                    }
                }
            },
        )?;
        if target.is_template() {
            crate::backend::template_gone(sr, &target)?;
        }
        Ok(())
    }

    fn coalesce(&self, sr: &mut Sr, vdi: Uuid, _templates: &Templates) -> Result<()> {
        Err(Error::new(
            Code::SrBackendFailure,
            format!(
                "SR {}: VDI {vdi} has a reader, but thin volumes never read from each other",
                sr.md.sr.uuid
            ),
        ))
    }

    fn resize(&self, sr: &mut Sr, vdi: Uuid, size: u64, _templates: &Templates) -> Result<()> {
        let v = record(sr, vdi)?;
        if let Some(lv) = &v.lv {
            // The LV grows (its new extents zeroed) before its record: until then the
            // record is smaller than the LV, which is safe.
            let grown = Pool::of(&sr.md.sr)?.extend_raw(lv, v.virtual_size, size)?;
            sr.md.get_mut(vdi).expect("found").virtual_size = grown;
            return sr.save();
        }
        let id = thin_id_of(&v)?;
        // Recorded first: a crash before the device grows leaves a device that grows at
        // its next attach, never one larger than its record.
        sr.md.get_mut(vdi).expect("found").virtual_size = size;
        sr.save()?;
        let pool = Pool::of(&sr.md.sr)?;
        // A clone of a local template that outgrows its cache's data reads the
        // template through the linear local origin from now on.
        let local = v
            .backing
            .and_then(|b| sr.md.get(b))
            .filter(|t| t.is_local());
        match local {
            Some(t) if v.attached => {
                let origin = super::origin::local_origin(&pool, t, size)?;
                pool.set_origin(vdi, id, size, &origin)
            }
            _ => pool.resize_attached(vdi, id, size),
        }
    }

    fn check(&self, sr: &Sr) -> Vec<Finding> {
        let mut findings: Vec<Finding> = crate::backend::interrupted(sr).into_iter().collect();
        let ids = match Pool::of(&sr.md.sr).and_then(|pool| {
            pool.activate()?;
            pool.thin_ids()
        }) {
            Ok(ids) => ids,
            Err(e) => {
                findings.push(Finding {
                    kind: "pool_unreadable",
                    message: e.message,
                    repairable: false,
                });
                return findings;
            }
        };
        for v in &sr.md.vdis {
            if let Some(id) = v.thin_id
                && !ids.contains_key(&id)
            {
                findings.push(Finding {
                    kind: "missing_thin_id",
                    message: format!("VDI {}: thin id {id} is not in the pool", v.shown()),
                    repairable: false,
                });
            }
        }
        findings.extend(raw_findings(sr));
        for t in sr.md.vdis.iter().filter(|t| t.pivoting) {
            findings.push(Finding {
                kind: "pivot_unfinished",
                message: format!(
                    "the pivot of template {} onto its local cache was interrupted: `sr check --repair` or `vdi pivot` finishes it",
                    t.shown()
                ),
                repairable: true,
            });
        }
        if let Ok(pool) = Pool::of(&sr.md.sr) {
            for v in sr.md.vdis.iter().filter(|v| v.attached) {
                if !pool.device_exists(v) {
                    findings.push(Finding {
                        kind: "device_missing",
                        message: format!(
                            "VDI {} is recorded as attached but its device is gone (the host restarted?): `sr check --repair` or `vdi attach` attaches it again",
                            v.shown()
                        ),
                        repairable: true,
                    });
                }
            }
        }
        if let Some(health) = pool_health(sr) {
            findings.extend(pool_findings(&health));
        }
        for id in unknown_ids(sr, &ids) {
            findings.push(Finding {
                kind: "unknown_thin_id",
                message: format!("thin id {id} of the pool belongs to no VDI"),
                repairable: true,
            });
        }
        findings
    }

    fn repair(&self, sr: &mut Sr, _templates: &Templates) -> Result<Vec<String>> {
        let pool = Pool::of(&sr.md.sr)?;
        pool.activate()?;
        let ids = pool.thin_ids()?;
        let mut done = std::mem::take(&mut sr.recovered);
        for id in unknown_ids(sr, &ids) {
            pool.delete_thin(id)?;
            done.push(format!("deleted thin id {id}, which belonged to no VDI"));
        }
        for lv in unknown_lvs(sr, &pool.raw_lvs()?) {
            pool.remove_raw(&lv, true)?;
            done.push(format!(
                "wiped and removed LV {lv}, which belonged to no VDI"
            ));
        }
        // A pool that cannot grow is reported by the check; the rest of the repair
        // (attaching VDIs again at boot) goes on.
        match super::space::autoextend(sr) {
            Ok(Some(new)) => done.push(format!("grew the pool's data to {new} bytes")),
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e.message, "cannot grow the pool"),
        }
        Ok(done)
    }
}

/// Raw LVs of the SR that no record uses and no interrupted operation names.
fn unknown_lvs(sr: &Sr, lvs: &[String]) -> Vec<String> {
    unknown(
        sr,
        lvs.iter().cloned(),
        |v| v.lv.clone(),
        |j| j.lvs_made.iter().chain(&j.lvs_dropped).cloned().collect(),
    )
}

/// What the SR has (`found`) that no record (`of_record`) uses and no interrupted
/// operation (`of_journal`) names: those are undone or finished by its recovery.
fn unknown<T: PartialEq>(
    sr: &Sr,
    found: impl Iterator<Item = T>,
    of_record: impl Fn(&VdiRecord) -> Option<T>,
    of_journal: impl Fn(&Journal) -> Vec<T>,
) -> Vec<T> {
    let known: Vec<T> = sr
        .md
        .vdis
        .iter()
        .filter_map(of_record)
        .chain(sr.md.journal.iter().flat_map(of_journal))
        .collect();
    found.filter(|x| !known.contains(x)).collect()
}

/// What `sr check` finds of raw LVs: records whose LV is missing, LVs no record has.
fn raw_findings(sr: &Sr) -> Vec<Finding> {
    let lvs = match Pool::of(&sr.md.sr).and_then(|pool| pool.raw_lvs()) {
        Ok(lvs) => lvs,
        Err(e) => {
            return vec![Finding {
                kind: "pool_unreadable",
                message: e.message,
                repairable: false,
            }];
        }
    };
    let mut out = Vec::new();
    for v in &sr.md.vdis {
        if let Some(lv) = &v.lv
            && !lvs.contains(lv)
        {
            out.push(Finding {
                kind: "missing_lv",
                message: format!("VDI {}: its LV {lv} is missing", v.shown()),
                repairable: false,
            });
        }
    }
    for lv in unknown_lvs(sr, &lvs) {
        out.push(Finding {
            kind: "unknown_lv",
            message: format!("LV {lv} of the SR belongs to no VDI"),
            repairable: true,
        });
    }
    out
}

/// Data or metadata use, in percent, from which `sr check` warns.
pub const NEARLY_FULL_PERCENT: f64 = 90.0;

/// The pool of `sr`, if it is an LVM SR whose pool can be read.
pub fn pool_health(sr: &Sr) -> Option<PoolHealth> {
    sr.md.sr.lvm.as_ref()?;
    let pool = Pool::of(&sr.md.sr).ok()?;
    pool.activate().ok()?;
    let status = pool.status().ok()?;
    Some(PoolHealth {
        data_percent: status.data_percent(),
        metadata_percent: status.metadata_percent(),
        mode: status.mode,
        needs_check: status.needs_check,
        when_full: if status.error_if_no_space {
            WhenFull::Error
        } else {
            WhenFull::Queue
        },
    })
}

/// What the pool's status says needs an operator.
fn pool_findings(health: &PoolHealth) -> Vec<Finding> {
    let mut out = Vec::new();
    let finding = |kind, message: String| Finding {
        kind,
        message,
        repairable: false,
    };
    if health.needs_check {
        out.push(finding(
            "pool_needs_check",
            "the kernel found the pool's metadata damaged: stop its VDIs, then `thin_check` (and `thin_repair`) its metadata LV".into(),
        ));
    }
    if health.mode != PoolMode::ReadWrite {
        out.push(finding(
            "pool_not_writable",
            format!("the pool is {:?}: writes to its VDIs fail or wait: grow the pool (`sr grow`; add a device to the VG first if it has no free space), or free space", health.mode),
        ));
    }
    for (what, percent) in [
        ("data", health.data_percent),
        ("metadata", health.metadata_percent),
    ] {
        if percent >= NEARLY_FULL_PERCENT {
            out.push(finding(
                "pool_nearly_full",
                format!("the pool's {what} is {percent:.1}% used: destroy VDIs or snapshots, or grow the pool (`sr grow`, or `sr monitor` by itself), before writes fail"),
            ));
        }
    }
    out
}

/// Thin ids of the pool that no record uses and no interrupted operation names.
fn unknown_ids(sr: &Sr, ids: &BTreeMap<u32, u64>) -> Vec<u32> {
    unknown(
        sr,
        ids.keys().copied(),
        |v| v.thin_id,
        |j| j.thin_made.iter().chain(&j.thin_dropped).copied().collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(data: f64, metadata: f64, mode: PoolMode, needs_check: bool) -> PoolHealth {
        PoolHealth {
            data_percent: data,
            metadata_percent: metadata,
            mode,
            needs_check,
            when_full: WhenFull::Error,
        }
    }

    fn kinds(h: &PoolHealth) -> Vec<&'static str> {
        pool_findings(h).iter().map(|f| f.kind).collect()
    }

    #[test]
    fn a_pool_nearly_full_damaged_or_not_writable_needs_an_operator_and_a_healthy_one_does_not() {
        let none: [&str; 0] = [];
        assert_eq!(kinds(&health(89.9, 50.0, PoolMode::ReadWrite, false)), none);
        assert_eq!(
            kinds(&health(90.0, 95.0, PoolMode::ReadWrite, false)),
            ["pool_nearly_full", "pool_nearly_full"]
        );
        assert_eq!(
            kinds(&health(100.0, 10.0, PoolMode::OutOfDataSpace, false)),
            ["pool_not_writable", "pool_nearly_full"]
        );
        assert_eq!(
            kinds(&health(1.0, 1.0, PoolMode::ReadOnly, true)),
            ["pool_needs_check", "pool_not_writable"]
        );
        assert!(
            pool_findings(&health(1.0, 1.0, PoolMode::Failed, true))
                .iter()
                .all(|f| !f.repairable)
        );
    }
}
