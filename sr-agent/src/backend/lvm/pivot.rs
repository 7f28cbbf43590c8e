//! Pivot: once a template's cache is complete and scrubbed, its clones read it from the
//! SR instead of through its proxy. The template's *local origin*, its cache volume
//! (which holds the template at its own offsets; for a clone grown past the cache's
//! data, a read-only linear device over the template's bytes of it: see
//! [`origin::local_origin`]), becomes the external origin of each attached clone (its table
//! reloaded: the same bytes, so nothing a VM reads changes, and its I/O waits only
//! while the tables are swapped); then the nbd device is disconnected and the proxy
//! stopped, and the template is recorded as local: clones attached later read the local
//! origin from the start, and no proxy of it runs again.
//!
//! The template is recorded `pivoting` before the first clone moves (its cache is
//! complete and scrubbed by then) and `local` after the last step; every step is
//! idempotent, so a crash in between leaves clones on the local origin (same bytes) and
//! a pivot that the next `vdi pivot`, or attach of a clone, finishes without a proxy.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::host::Pool;
use super::origin;
use crate::model::{Hydrate, VdiRecord};
use crate::store::Sr;
use crate::{Code, Error, Result};

/// What `vdi pivot` did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Pivoted {
    pub uuid: Uuid,
    /// The template the VDI reads from, if any.
    pub template: Option<Uuid>,
    /// `local` once done; with `--if-ready` before the proxy is ready, `remote` or
    /// `partial`.
    pub origin: &'static str,
    /// The template's local origin device.
    pub device: Option<String>,
    /// The attached clones moved onto it by this call.
    pub clones: Vec<Uuid>,
}

/// How a pivot waits for its template's cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Hydrate the template first (starting its proxy if none runs), reporting progress.
    Hydrate,
    /// Only if the proxy says it is ready; otherwise do nothing (the proxy's own call).
    IfReady,
}

/// The template `v` reads from (itself, for a template); `None` for a VDI of its own.
fn template_of(sr: &Sr, v: &VdiRecord) -> Result<Option<VdiRecord>> {
    if v.is_template() {
        return Ok(Some(v.clone()));
    }
    let Some(b) = v.backing else {
        return Ok(None);
    };
    match sr.md.get(b).filter(|t| t.is_template()) {
        Some(t) => Ok(Some(t.clone())),
        None if sr.md.get(b).is_some() => Ok(None),
        None => Err(Error::new(
            Code::TemplateUnreachable,
            format!(
                "VDI {} reads from template {b}, which was forgotten",
                v.shown()
            ),
        )),
    }
}

/// Where `v` reads what it never wrote from: `local`, `partial` or `remote` (see
/// [`crate::model::VdiView::origin`]).
pub fn origin_of(sr: &Sr, v: &VdiRecord) -> &'static str {
    let t = match template_of(sr, v) {
        Ok(Some(t)) => t,
        Ok(None) => return "local",
        // A forgotten template: what it never wrote cannot be read locally.
        Err(_) => return "remote",
    };
    if t.is_local() {
        return "local";
    }
    match origin::status(sr.md.sr.uuid, t.uuid) {
        Some(s) if s.cache.chunks_present > 0 => "partial",
        _ => "remote",
    }
}

/// Pivots the template `vdi` reads from (or `vdi`, a template) onto its local cache,
/// with every attached clone of it: see the module's doc. `progress` gets the
/// hydration's progress (0 to 1) while [`Wait::Hydrate`] waits; `interrupted` stops
/// that wait (hydration goes on in the proxy, which pivots by itself when done).
pub fn pivot(
    home: &Path,
    vdi: Uuid,
    exe: &Path,
    wait: Wait,
    progress: &mut dyn FnMut(f64),
    interrupted: &std::sync::atomic::AtomicBool,
) -> Result<Pivoted> {
    let sr = Sr::read(home)?;
    let v = sr.vdi(vdi)?;
    let Some(t) = template_of(&sr, &v)? else {
        return Ok(Pivoted {
            uuid: vdi,
            template: None,
            origin: "local",
            device: None,
            clones: Vec::new(),
        });
    };
    let sr_uuid = sr.md.sr.uuid;
    let background = sr.md.sr.lvm.as_ref().map(|l| l.hydrate) == Some(Hydrate::Background);
    drop(sr);
    let mut asked: Option<Instant> = None;
    loop {
        {
            let mut sr = Sr::open(home)?;
            let t = sr.vdi(t.uuid)?;
            if t.local {
                // Every clone attached before was moved before it was recorded local,
                // every clone attached since was attached onto it: nothing to do.
                return Ok(Pivoted {
                    uuid: vdi,
                    template: Some(t.uuid),
                    origin: "local",
                    device: t.device.clone(),
                    clones: Vec::new(),
                });
            }
            let status = origin::status(sr_uuid, t.uuid);
            if t.pivoting || status.as_ref().is_some_and(|s| s.ready) {
                let (device, clones) = swap(&mut sr, &t)?;
                return Ok(Pivoted {
                    uuid: vdi,
                    template: Some(t.uuid),
                    origin: "local",
                    device: device.map(|d| d.display().to_string()),
                    clones,
                });
            }
            if wait == Wait::IfReady {
                return Ok(Pivoted {
                    uuid: vdi,
                    template: Some(t.uuid),
                    origin: origin_of(&sr, &t),
                    device: None,
                    clones: Vec::new(),
                });
            }
            if status.is_none() {
                // No proxy runs (no clone attached): one that hydrates.
                let pool = Pool::of(&sr.md.sr)?;
                pool.activate()?;
                super::thin::cache_volume(&mut sr, &pool, t.uuid)?;
                origin::ensure(&sr.path, sr_uuid, t.uuid, exe)?;
                asked = None;
            }
            // Asked once, and again every 10 s after a hydration that failed (an
            // upstream error: it goes on from what it fetched).
            let failed = status
                .as_ref()
                .is_some_and(|s| s.cache.prefetch == "failed");
            if asked.is_none_or(|at| failed && at.elapsed() >= Duration::from_secs(10)) {
                origin::request_hydration(sr_uuid, t.uuid)?;
                asked = Some(Instant::now());
            }
        }
        // Without the SR's lock while the template is fetched.
        if let Some(s) = origin::status(sr_uuid, t.uuid) {
            progress(s.cache.percent_present / 100.0);
        }
        if interrupted.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(interrupted_pivot(home, t.uuid, background));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The error of a `vdi pivot` interrupted while it waited for template `template`:
/// hydrating in the background, the proxy goes on and pivots by itself; on request, a
/// proxy no attached clone reads is stopped (what it fetched is kept).
fn interrupted_pivot(home: &Path, template: Uuid, background: bool) -> Error {
    let cancelled = |what: &str| {
        Error::new(
            Code::Cancelled,
            format!("interrupted: template {template} {what}"),
        )
    };
    if background {
        return cancelled("goes on hydrating, and its clones pivot when it is done");
    }
    let stopped = Sr::open(home).and_then(|sr| {
        if sr.md.dependents(template).any(|c| c.attached) {
            return Ok(false);
        }
        origin::stop(sr.md.sr.uuid, template)?;
        Pool::of(&sr.md.sr)?.detach(template)?;
        Ok(true)
    });
    match stopped {
        Ok(true) => cancelled("keeps what was fetched; run vdi pivot again to go on"),
        Ok(false) => cancelled("goes on hydrating; run vdi pivot again to finish"),
        Err(e) => e,
    }
}

/// Finishes every pivot a crash interrupted (the SR open for changes), as `vdi pivot`
/// would; returns what it did.
pub fn finish_begun(sr: &mut Sr) -> Result<Vec<String>> {
    let begun: Vec<VdiRecord> = sr.md.vdis.iter().filter(|t| t.pivoting).cloned().collect();
    let mut done = Vec::new();
    for t in begun {
        let (_, moved) = swap(sr, &t)?;
        done.push(format!(
            "finished the pivot of template {} onto its local cache ({} clones moved)",
            t.uuid,
            moved.len()
        ));
    }
    Ok(done)
}

/// The swap itself (the SR open for changes; the template's cache complete and
/// scrubbed, or its pivot begun): the template recorded `pivoting`, each attached
/// clone's table reloaded onto its local origin, the nbd device disconnected and the
/// proxy stopped (if they are there), the template recorded `local`, then its cache
/// device made read-only (with no clone attached, it and the local origin removed
/// instead). Returns the local origin of a clone of the template's size, if one is
/// attached, and the clones moved.
fn swap(sr: &mut Sr, t: &VdiRecord) -> Result<(Option<PathBuf>, Vec<Uuid>)> {
    let pool = Pool::of(&sr.md.sr)?;
    pool.activate()?;
    if !t.pivoting {
        sr.md.get_mut(t.uuid).expect("found").pivoting = true;
        sr.save()?;
    }
    let mut moved = Vec::new();
    let clones: Vec<VdiRecord> = sr
        .md
        .dependents(t.uuid)
        .filter(|c| c.attached && c.lv.is_none())
        .cloned()
        .collect();
    for c in clones {
        let Some(id) = c.thin_id else { continue };
        let origin = origin::local_origin(&pool, t, c.virtual_size)?;
        pool.set_origin(c.uuid, id, c.virtual_size, &origin)?;
        moved.push(c.uuid);
    }
    crate::crash::point("pivoted");
    let sr_uuid = sr.md.sr.uuid;
    if let Some(nbd) = t.device.as_deref().map(Path::new)
        && origin::running(sr_uuid, t.uuid).is_some()
        && crate::device::is_nbd(nbd)
        && crate::device::connected(nbd)
    {
        crate::device::disconnect(nbd)?;
    }
    origin::stop(sr_uuid, t.uuid)?;
    let device = if moved.is_empty() {
        // No clone reads it now (a pivot asked for before any attach).
        pool.detach_local_origin(t.uuid)?;
        pool.detach(t.uuid)?;
        None
    } else {
        Some(origin::local_origin(&pool, t, t.virtual_size)?)
    };
    let rec = sr.md.get_mut(t.uuid).expect("found");
    rec.local = true;
    rec.pivoting = false;
    rec.device = device.as_ref().map(|d| d.display().to_string());
    sr.save()?;
    // Nothing writes the cache any more; the kernel says so too.
    pool.make_read_only(t.uuid)?;
    if !moved.is_empty() {
        tracing::info!(template = %t.uuid, clones = moved.len(), "pivoted onto the local cache");
    }
    Ok((device, moved))
}
