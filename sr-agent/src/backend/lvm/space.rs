//! Room in an LVM SR's pool: growing its data by hand (`sr grow`), and by itself when
//! it is [`AUTOEXTEND_PERCENT`] full (`sr monitor`, `sr check --repair`) from the VG's
//! free space beyond the SR's reserve, up to its `autoextend_max`. lvm2's dmeventd
//! does this for pools lvm2 knows; it does not know this one (see `docs/lvm-sr.md`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::host::Pool;
use crate::store::Sr;
use crate::{Code, Error, Result};

/// Data use, in percent, from which the pool grows by itself.
pub const AUTOEXTEND_PERCENT: f64 = 80.0;
/// Each growth adds this share of the data (at least one extent).
const AUTOEXTEND_SHARE: f64 = 0.2;

/// Grows the pool's data of `sr` (open for changes) by `by` bytes from the VG's free
/// space (the reserve included: an operator's choice); `SR_FULL` without the room.
/// Returns the new size.
pub fn grow(sr: &mut Sr, by: u64) -> Result<u64> {
    let pool = Pool::of(&sr.md.sr)?;
    pool.activate()?;
    let grown = grow_pool(sr, &pool, by, 0, false)?;
    grown.ok_or_else(|| {
        Error::new(
            Code::SrFull,
            format!(
                "VG {} has no free space for the pool to grow into (vgextend it, then `sr introduce --type lvm` it so that the SR knows the new device)",
                pool_vg(sr)
            ),
        )
    })
}

fn pool_vg(sr: &Sr) -> String {
    sr.md
        .sr
        .lvm
        .as_ref()
        .map(|l| l.vg.clone())
        .unwrap_or_default()
}

/// Grows `pool` by `by` bytes (`partial`: as much of it as there is room for) keeping
/// `keep_free` bytes of the VG free; the new size recorded on the metadata volume
/// before the pool uses it.
fn grow_pool(
    sr: &mut Sr,
    pool: &Pool,
    by: u64,
    keep_free: u64,
    partial: bool,
) -> Result<Option<u64>> {
    pool.grow_data(by, keep_free, partial, |new| {
        sr.md.sr.lvm.as_mut().expect("an LVM SR").pool_data_bytes = new;
        sr.save()
    })
}

/// Grows the pool of `sr` (open for changes) by a fifth if its data is at least
/// [`AUTOEXTEND_PERCENT`] full, within the VG's free space beyond the SR's reserve and
/// up to its `autoextend_max`; returns the new size if it grew.
pub fn autoextend(sr: &mut Sr) -> Result<Option<u64>> {
    let Some(lvm) = sr.md.sr.lvm.clone() else {
        return Ok(None);
    };
    let pool = Pool::of(&sr.md.sr)?;
    pool.activate()?;
    if pool.status()?.data_percent() < AUTOEXTEND_PERCENT {
        return Ok(None);
    }
    let limit = lvm.autoextend_max.unwrap_or(u64::MAX);
    let step = (lvm.pool_data_bytes as f64 * AUTOEXTEND_SHARE) as u64;
    let by = step.min(limit.saturating_sub(lvm.pool_data_bytes));
    if by == 0 {
        return Ok(None);
    }
    let grown = grow_pool(sr, &pool, by, lvm.reserve_bytes, true)?;
    if let Some(new) = grown {
        tracing::info!(vg = %lvm.vg, from = lvm.pool_data_bytes, to = new, "pool grown");
    }
    Ok(grown)
}

/// Watches the pool of the SR at `home` every `interval` until `stop`, growing it as
/// [`autoextend`] says (the SR's lock taken only then): what lets a pool that queues
/// writes when full (`--when-full queue`) go on without failing them.
pub fn monitor(home: &std::path::Path, interval: Duration, stop: &AtomicBool) -> Result<()> {
    let sr = Sr::read(home)?;
    let pool = Pool::of(&sr.md.sr)?;
    pool.activate()?;
    tracing::info!(sr = %sr.md.sr.uuid, "watching the pool");
    while !stop.load(Ordering::Relaxed) {
        let full = pool
            .status()
            .map(|s| s.data_percent() >= AUTOEXTEND_PERCENT)
            .unwrap_or(false);
        if full && let Err(e) = Sr::open(home).and_then(|mut sr| autoextend(&mut sr)) {
            tracing::warn!(error = %e.message, "cannot grow the pool");
        }
        let mut left = interval;
        while !left.is_zero() && !stop.load(Ordering::Relaxed) {
            let nap = left.min(Duration::from_millis(100));
            std::thread::sleep(nap);
            left -= nap;
        }
    }
    Ok(())
}
