//! `image check --repair` for qcow2: rebuilds the refcounts from the references (which
//! frees leaked clusters and fixes counts that are too low), fixes the COPIED flags of
//! the active tables to match, and clears the dirty bit, as `qemu-img check -r all`
//! does. Images with structural errors (tables outside the file, bad entries) are
//! refused: rebuilding counts would not make them safe.

use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::Serialize;

use crate::cache::MetadataCache;
use crate::layer::{CheckReport, Layer, OpenContext};
use crate::storage::FileStorage;
use crate::{Error, Result};

use super::create::write_refcounts;
use super::header::{FORMAT, INCOMPAT_DIRTY, be64};
use super::{COMPRESSED, COPIED, OFFSET_MASK, Qcow2Layer, lock};

/// What a repair did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RepairReport {
    /// Clusters whose refcount was above their references (now freed or lowered).
    pub leaks_fixed: u64,
    /// Clusters whose refcount was below their references (now raised).
    pub refcounts_fixed: u64,
    /// Active L1 and L2 entries whose COPIED flag was corrected.
    pub copied_flags_fixed: u64,
    /// The dirty bit was set and is now cleared.
    pub dirty_cleared: bool,
}

/// Repairs the qcow2 image at `path` (locked for writing while it runs).
pub fn repair(path: &Path) -> Result<RepairReport> {
    let name = path.display().to_string();
    let storage = FileStorage::open(path)?;
    let ctx = OpenContext {
        cache: MetadataCache::new(1 << 20),
    };
    let layer = Qcow2Layer::open(storage, &ctx)?;
    let mut before = CheckReport::default();
    layer.check(&mut before)?;
    let (counts, errors) = super::check::references(&layer)?;
    if !errors.is_empty() {
        return Err(Error::invalid(
            &name,
            FORMAT,
            format!(
                "cannot repair: the image has structural errors ({}); copy its data out with `thinline image convert`",
                errors.join("; ")
            ),
        ));
    }
    let stat = |key: &str| {
        before
            .stats
            .iter()
            .find(|(k, _)| k == key)
            .map_or(0, |(_, v)| *v)
    };
    let mut report = RepairReport {
        leaks_fixed: stat("leaked clusters"),
        refcounts_fixed: stat("refcount errors"),
        copied_flags_fixed: 0,
        dirty_cleared: layer.header.raw.incompatible & INCOMPAT_DIRTY != 0,
    };
    let (file, _, _lock) = lock::open_locked(path, &name)?;
    let io = |op, offset, length| Error::io_at(&name, op, offset, length);
    let cs = layer.cluster_size;
    let raw = layer.header.raw;
    if report.leaks_fixed + report.refcounts_fixed > 0 || report.dirty_cleared {
        write_refcounts(&file, &name, cs, raw.refcount_order, &counts)?;
    }
    // COPIED flags of the active tables follow the (now exact) counts.
    let count = |offset: u64| counts.get((offset / cs) as usize).copied().unwrap_or(0);
    let mut l1 = layer.l1.clone();
    let entries_per_l2 = cs / layer.entry_size as u64;
    for l1e in l1.iter_mut() {
        let l2 = *l1e & OFFSET_MASK;
        if l2 == 0 {
            continue;
        }
        let want = if count(l2) == 1 { COPIED } else { 0 };
        if *l1e & COPIED != want {
            *l1e = (*l1e & !COPIED) | want;
            report.copied_flags_fixed += 1;
        }
        let mut table = vec![0u8; cs as usize];
        file.read_exact_at(&mut table, l2)
            .map_err(io("read L2 table", l2, cs))?;
        let mut changed = false;
        for j in 0..entries_per_l2 as usize {
            let at = j * layer.entry_size;
            let e = be64(&table, at);
            let host = e & OFFSET_MASK;
            if e & COMPRESSED != 0 || host == 0 || layer.has_data_file() {
                continue;
            }
            let want = if count(host) == 1 { COPIED } else { 0 };
            if e & COPIED != want {
                let fixed = (e & !COPIED) | want;
                table[at..at + 8].copy_from_slice(&fixed.to_be_bytes());
                report.copied_flags_fixed += 1;
                changed = true;
            }
        }
        if changed {
            file.write_all_at(&table, l2)
                .map_err(io("write L2 table", l2, cs))?;
        }
    }
    if report.copied_flags_fixed > 0 {
        let mut bytes = Vec::with_capacity(l1.len() * 8);
        for e in &l1 {
            bytes.extend_from_slice(&e.to_be_bytes());
        }
        file.write_all_at(&bytes, raw.l1_table_offset).map_err(io(
            "write L1 table",
            raw.l1_table_offset,
            bytes.len() as u64,
        ))?;
        file.sync_all().map_err(io("sync", 0, 0))?;
    }
    if report.dirty_cleared {
        let incompatible = raw.incompatible & !INCOMPAT_DIRTY;
        file.write_all_at(&incompatible.to_be_bytes(), 72)
            .map_err(io("write header", 72, 8))?;
        file.sync_all().map_err(io("sync", 0, 0))?;
    }
    Ok(report)
}
