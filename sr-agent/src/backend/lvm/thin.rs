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
use super::pool::MAX_THIN_ID;
use crate::backend::{Backend, Finding};
use crate::model::{SrType, VdiRecord, VdiType};
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
        if fill.is_some() {
            return Err(Error::new(
                Code::InvalidArgument,
                "a preallocated VDI on an LVM SR (a raw LV) is not built yet: create a thin one",
            ));
        }
        add_thin(
            sr,
            "vdi create",
            VdiRecord::new(VdiType::Disk, label, size),
            None,
        )
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
        let journal = Journal {
            operation: "vdi destroy".into(),
            thin_dropped: target.thin_id.into_iter().collect(),
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
        let id = thin_id_of(&v)?;
        // Recorded first: a crash before the device grows leaves a device that grows at
        // its next attach, never one larger than its record.
        sr.md.get_mut(vdi).expect("found").virtual_size = size;
        sr.save()?;
        Pool::of(&sr.md.sr)?.resize_attached(vdi, id, size)
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
        Ok(done)
    }
}

/// Thin ids of the pool that no record uses and no interrupted operation names.
fn unknown_ids(sr: &Sr, ids: &BTreeMap<u32, u64>) -> Vec<u32> {
    // An interrupted operation's ids are undone or finished by its recovery.
    let in_progress = sr
        .md
        .journal
        .iter()
        .flat_map(|j| j.thin_made.iter().chain(&j.thin_dropped));
    let known: Vec<u32> = sr
        .md
        .vdis
        .iter()
        .filter_map(|v| v.thin_id)
        .chain(in_progress.copied())
        .collect();
    ids.keys()
        .filter(|id| !known.contains(id))
        .copied()
        .collect()
}
