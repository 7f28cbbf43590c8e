//! Attaching an LVM SR's VDIs: a thin VDI becomes a device-mapper thin device (read-only
//! for a snapshot), a preallocated one its raw LV made active; a VDI built on a template
//! reads what it never wrote from the template's external origin: its proxy
//! ([`super::origin`]) or, once the template is local, its cache volume
//! ([`super::pivot`]); made with its first attached VDI and removed with its last.
//!
//! A VDI is recorded as attached before its device is made, so a crash leaves a record
//! `vdi detach` cleans up, never a device no record names; attaching an attached VDI
//! answers its device.

use std::path::{Path, PathBuf};

use uuid::Uuid;

use super::host::Pool;
use super::origin;
use crate::model::{Attached, VdiRecord};
use crate::store::Sr;
use crate::{Code, Error, Result};

/// The template `v` reads from, if any.
fn template_of(sr: &Sr, v: &VdiRecord) -> Option<VdiRecord> {
    v.backing
        .and_then(|b| sr.md.get(b))
        .filter(|t| t.is_template())
        .cloned()
}

fn attached(vdi: Uuid, device: &Path) -> Attached {
    Attached {
        uuid: vdi,
        nbd_uri: None,
        socket: None,
        device: Some(device.display().to_string()),
    }
}

/// Attaches `vdi` (the SR open for changes); `exe` runs a template's proxy.
pub fn attach(sr: &mut Sr, vdi: Uuid, exe: &Path) -> Result<Attached> {
    let v = sr.vdi(vdi)?;
    let pool = Pool::of(&sr.md.sr)?;
    if let Some(lv) = &v.lv {
        sr.md.get_mut(vdi).expect("found").attached = true;
        sr.save()?;
        let device = pool.activate_raw(lv)?;
        sr.md.get_mut(vdi).expect("found").device = Some(device.display().to_string());
        sr.save()?;
        return Ok(attached(vdi, &device));
    }
    let id = v.thin_id.ok_or_else(|| {
        Error::new(
            Code::SrBackendFailure,
            format!("VDI {} has no thin id recorded", v.shown()),
        )
    })?;
    pool.activate()?;
    let template = template_of(sr, &v);
    if let (Some(b), None) = (v.backing, &template) {
        // Its unwritten blocks would read as zeroes: refused, not attached wrong.
        return Err(Error::new(
            Code::TemplateUnreachable,
            format!(
                "VDI {} reads from template {b}, which was forgotten: it cannot be attached",
                v.shown()
            ),
        ));
    }
    let origin = match &template {
        Some(t) => match template_origin(sr, &pool, t, v.virtual_size, exe) {
            Ok(device) => Some(device),
            Err(e) => {
                // Nothing left running for a template no attached VDI reads.
                if let Err(undo) = release_origin(sr, &pool, t.uuid) {
                    tracing::warn!(template = %t.uuid, error = %undo, "cannot stop the template's proxy");
                }
                return Err(e);
            }
        },
        None => None,
    };
    let rec = sr.md.get_mut(vdi).expect("found");
    rec.attached = true;
    rec.device = Some(format!("/dev/mapper/{}", pool.device_name(vdi)));
    let made = sr
        .save()
        .and_then(|()| pool.attach(vdi, id, v.virtual_size, v.read_only(), origin.as_deref()));
    match made {
        Ok(device) => Ok(attached(vdi, &device)),
        Err(e) if !v.attached => {
            // Attached by this call only: left as it was, with nothing running for it.
            let rec = sr.md.get_mut(vdi).expect("found");
            rec.attached = false;
            rec.device = None;
            let undone = sr.save().and_then(|()| match &template {
                Some(t) => release_origin(sr, &pool, t.uuid),
                None => Ok(()),
            });
            if let Err(undo) = undone {
                tracing::warn!(%vdi, error = %undo, "cannot undo a failed attach");
            }
            Err(e)
        }
        Err(e) => Err(e),
    }
}

/// The external origin of a `clone_size`-byte clone of template `t`: once `t` is local,
/// its local origin; else the `/dev/nbdN` of its proxy: its cache volume made if it has
/// none, the proxy started, the kernel's nbd client connected, each unless done already.
fn template_origin(
    sr: &mut Sr,
    pool: &Pool,
    t: &VdiRecord,
    clone_size: u64,
    exe: &Path,
) -> Result<PathBuf> {
    if t.is_local() {
        let device = origin::local_origin(pool, t, clone_size)?;
        let recorded = device.display().to_string();
        if t.device.as_deref() != Some(recorded.as_str()) {
            sr.md.get_mut(t.uuid).expect("found").device = Some(recorded);
            sr.save()?;
        }
        return Ok(device);
    }
    super::thin::cache_volume(sr, pool, t.uuid)?;
    let proxy = origin::ensure(&sr.path, sr.md.sr.uuid, t.uuid, exe)?;
    // The device connected to this proxy, if it still runs: one recorded before it
    // started (a host restart, a proxy that died) may be another's by now.
    let recorded = sr
        .md
        .get(t.uuid)
        .and_then(|t| t.device.clone())
        .map(PathBuf::from)
        .filter(|d| !proxy.started && crate::device::is_nbd(d) && crate::device::connected(d));
    if let Some(device) = recorded {
        return Ok(device);
    }
    let device = crate::device::connect(&proxy.socket, &t.uuid.to_string())?;
    sr.md.get_mut(t.uuid).expect("found").device = Some(device.display().to_string());
    sr.save()?;
    Ok(device)
}

/// Attaches again every VDI recorded as attached whose device is gone (after a host
/// restart: the pool, a template's proxy and nbd device too, as [`attach`] does), and
/// finishes the pivots a crash interrupted; returns what it did.
pub fn reattach(sr: &mut Sr, exe: &Path) -> Result<Vec<String>> {
    let pool = Pool::of(&sr.md.sr)?;
    let missing: Vec<Uuid> = sr
        .md
        .vdis
        .iter()
        .filter(|v| v.attached && !pool.device_exists(v))
        .map(|v| v.uuid)
        .collect();
    let mut done = Vec::new();
    for vdi in missing {
        let device = attach(sr, vdi, exe)?.device.unwrap_or_default();
        done.push(format!("attached VDI {vdi} again as {device}"));
    }
    done.extend(super::pivot::finish_begun(sr)?);
    Ok(done)
}

/// Detaches `vdi` (the SR open for changes): its device removed (refused while it is
/// open), then its record; with the last attached VDI of a template, the template's nbd
/// device, proxy and cache device go too.
pub fn detach(sr: &mut Sr, vdi: Uuid) -> Result<()> {
    let v = sr.vdi(vdi)?;
    let pool = Pool::of(&sr.md.sr)?;
    match &v.lv {
        Some(lv) => pool.deactivate_raw(lv)?,
        None => pool.detach(vdi)?,
    }
    let rec = sr.md.get_mut(vdi).expect("found");
    rec.attached = false;
    rec.device = None;
    sr.save()?;
    let Some(t) = template_of(sr, &v) else {
        return Ok(());
    };
    release_origin(sr, &pool, t.uuid)
}

/// Unless an attached VDI reads from template `template`: its nbd device disconnected,
/// its proxy stopped, its local origin and cache device removed (each if there).
fn release_origin(sr: &mut Sr, pool: &Pool, template: Uuid) -> Result<()> {
    if sr.md.dependents(template).any(|o| o.attached) {
        return Ok(());
    }
    let sr_uuid = sr.md.sr.uuid;
    // Only while its proxy runs is the recorded device this template's (and a path
    // that is not /dev/nbdN, crafted metadata, is only forgotten).
    if let Some(device) = sr.md.get(template).and_then(|t| t.device.clone())
        && origin::running(sr_uuid, template).is_some()
    {
        let device = Path::new(&device);
        if crate::device::is_nbd(device) && crate::device::connected(device) {
            crate::device::disconnect(device)?;
        }
    }
    origin::stop(sr_uuid, template)?;
    pool.detach_local_origin(template)?;
    pool.detach(template)?;
    if let Some(t) = sr.md.get_mut(template)
        && t.device.take().is_some()
    {
        sr.save()?;
    }
    Ok(())
}
