//! The directory SR: every disk, snapshot and layer is a qcow2 file in the SR
//! directory; a clone of a template is an overlay whose backing is the template's
//! location (opened through the agent's records, never because a header names it).
//!
//! - clone of a template, snapshot or layer: a new overlay on it;
//! - clone of a writable disk: its file becomes a read-only layer (`layer-DISK.qcow2`),
//!   and the disk and the clone each get a new overlay on it;
//! - snapshot of a disk: its file becomes the snapshot, and the disk gets a new
//!   overlay on it;
//! - destroy: the file, and every layer nothing else reads from any more.
//!
//! Every step goes through the SR's journal ([`crate::store`]), so kill -9 at any
//! point leaves the old or the new state.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use thinline_format::qcow2::{self, CreateOptions};
use thinline_format::{Fetch, Format, Image, OpenOptions};
use uuid::Uuid;

use super::{Backend, Finding};
use crate::model::{SrType, VdiRecord, VdiType};
use crate::naming;
use crate::store::{Journal, Move, NEW_DIR, Rebase, Sr};
use crate::template::{self, Templates};
use crate::{Code, Error, Result};

/// The directory backend.
#[derive(Debug, Clone, Copy)]
pub struct FileBackend;

/// Whether `name` is used in the SR: a file there, or a record's.
fn taken(sr: &Sr, name: &str) -> bool {
    sr.file(name).symlink_metadata().is_ok()
        || sr.md.vdis.iter().any(|v| v.file.as_deref() == Some(name))
}

fn new_name(uuid: Uuid) -> String {
    format!("{uuid}.qcow2")
}

/// Makes an overlay in `new/` over `backing` (a name as the header records it).
fn overlay(sr: &Sr, tmp: &str, size: u64, backing: Option<(String, Format)>) -> Result<()> {
    let path = sr.new_file(tmp);
    qcow2::create(
        &path,
        &CreateOptions {
            size,
            backing,
            ..CreateOptions::default()
        },
    )
    .map_err(|e| Error::format(format!("cannot create {}", path.display()), &e))
}

fn record(sr: &Sr, uuid: Uuid) -> Result<VdiRecord> {
    sr.md.get(uuid).cloned().ok_or_else(|| {
        Error::new(
            Code::VdiNotFound,
            format!("no VDI {uuid} in SR {}", sr.md.sr.uuid),
        )
    })
}

/// Chunk of zeroes written per step of a preallocation.
const FILL_CHUNK: usize = 4 << 20;

/// Adds `rec` with its file: a new overlay of `rec.virtual_size` bytes over `backing`,
/// made in `new/` under `rec`'s UUID and moved to `rec.file` once recorded. With
/// `fill`, every cluster is then allocated and zeroed through the qcow2 writer (the
/// space is really taken), `fill` getting the progress between steps.
fn add_overlay(
    sr: &mut Sr,
    operation: &str,
    rec: VdiRecord,
    backing: Option<(String, Format)>,
    fill: Option<&mut dyn FnMut(f64) -> Result<()>>,
) -> Result<()> {
    let tmp = new_name(rec.uuid);
    let journal = Journal {
        operation: operation.into(),
        creates: vec![tmp.clone()],
        finish: vec![Move {
            from: tmp.clone(),
            to: file_of(&rec)?,
        }],
        ..Journal::default()
    };
    let size = rec.virtual_size;
    sr.run(
        journal,
        |sr| {
            overlay(sr, &tmp, size, backing)?;
            match fill {
                Some(fill) => zero_fill(&sr.new_file(&tmp), size, fill),
                None => Ok(()),
            }
        },
        |md| md.vdis.push(rec),
    )
}

/// Writes zeroes over the whole of the qcow2 image at `path`.
fn zero_fill(path: &Path, size: u64, fill: &mut dyn FnMut(f64) -> Result<()>) -> Result<()> {
    let what = format!("cannot preallocate {}", path.display());
    let (image, writer) = Image::open_writable(path, &OpenOptions::default())
        .map_err(|e| Error::format(&what, &e))?;
    let zeroes = vec![0u8; FILL_CHUNK];
    let mut offset = 0u64;
    fill(0.0)?;
    while offset < size {
        let n = (size - offset).min(FILL_CHUNK as u64) as usize;
        writer
            .write(&image, offset, &zeroes[..n], false)
            .map_err(|e| Error::format(&what, &e))?;
        offset += n as u64;
        fill(offset as f64 / size as f64)?;
    }
    writer.flush().map_err(|e| Error::format(&what, &e))
}

fn file_of(v: &VdiRecord) -> Result<String> {
    v.file.clone().ok_or_else(|| {
        Error::new(
            Code::SrBackendFailure,
            format!("VDI {} has no file recorded", v.uuid),
        )
    })
}

/// What a new overlay on `src` records as its backing.
fn backing_of(src: &VdiRecord) -> Result<(String, Format)> {
    if src.kind == VdiType::Template {
        let uri = src.uri.clone().unwrap_or_default();
        return Ok((uri, src.format.unwrap_or(Format::Raw)));
    }
    Ok((file_of(src)?, Format::Qcow2))
}

impl Backend for FileBackend {
    fn sr_type(&self) -> SrType {
        SrType::File
    }

    fn space(&self, sr: &Sr) -> Result<(u64, u64)> {
        let st = rustix::fs::statvfs(&sr.path)
            .map_err(|e| Error::io(format!("cannot stat {}", sr.path.display()), &e.into()))?;
        Ok((
            st.f_blocks.saturating_mul(st.f_frsize),
            st.f_bavail.saturating_mul(st.f_frsize),
        ))
    }

    fn utilisation(&self, sr: &Sr, vdi: &VdiRecord) -> u64 {
        vdi.file
            .as_deref()
            .and_then(|f| sr.file(f).metadata().ok())
            .map_or(0, |m| m.blocks() * 512)
    }

    fn create(
        &self,
        sr: &mut Sr,
        label: &str,
        size: u64,
        fill: Option<&mut dyn FnMut(f64) -> Result<()>>,
    ) -> Result<Uuid> {
        let uuid = Uuid::new_v4();
        let rec = VdiRecord {
            uuid,
            file: Some(naming::unique(label, "qcow2", |n| taken(sr, n))),
            ..VdiRecord::new(VdiType::Disk, label, size)
        };
        let operation = if fill.is_some() {
            "vdi create --preallocate"
        } else {
            "vdi create"
        };
        add_overlay(sr, operation, rec, None, fill)?;
        Ok(uuid)
    }

    fn clone(&self, sr: &mut Sr, src: Uuid, label: &str) -> Result<Uuid> {
        let src = record(sr, src)?;
        let uuid = Uuid::new_v4();
        let file = naming::unique(label, "qcow2", |n| taken(sr, n));
        let tmp = new_name(uuid);
        let mut clone = VdiRecord {
            uuid,
            parent: Some(src.uuid),
            backing: Some(src.uuid),
            file: Some(file.clone()),
            ..VdiRecord::new(VdiType::Disk, label, src.virtual_size)
        };
        if src.kind != VdiType::Disk {
            // Read-only already: the clone is an overlay on it.
            add_overlay(sr, "vdi clone", clone, Some(backing_of(&src)?), None)?;
            return Ok(uuid);
        }
        // A writable disk: its file becomes a layer under the disk and the clone.
        let disk_file = file_of(&src)?;
        let layer_uuid = Uuid::new_v4();
        let layer_file = naming::unique(
            &format!("layer-{}", naming::stem(&src.name_label)),
            "qcow2",
            |n| taken(sr, n) || n == file,
        );
        let disk_tmp = new_name(Uuid::new_v4());
        let layer = VdiRecord {
            uuid: layer_uuid,
            backing: src.backing,
            file: Some(layer_file.clone()),
            ..VdiRecord::new(
                VdiType::Layer,
                &format!("layer under {}", src.name_label),
                src.virtual_size,
            )
        };
        clone.backing = Some(layer_uuid);
        let journal = Journal {
            operation: "vdi clone".into(),
            creates: vec![tmp.clone(), disk_tmp.clone()],
            moves: vec![Move {
                from: disk_file.clone(),
                to: layer_file.clone(),
            }],
            finish: vec![
                Move {
                    from: disk_tmp.clone(),
                    to: disk_file,
                },
                Move {
                    from: tmp.clone(),
                    to: file,
                },
            ],
            ..Journal::default()
        };
        let size = src.virtual_size;
        let backing = (layer_file, Format::Qcow2);
        sr.run(
            journal,
            |sr| {
                overlay(sr, &disk_tmp, size, Some(backing.clone()))?;
                overlay(sr, &tmp, size, Some(backing.clone()))
            },
            |md| {
                md.get_mut(src.uuid).expect("checked").backing = Some(layer_uuid);
                md.vdis.push(layer);
                md.vdis.push(clone);
            },
        )?;
        Ok(uuid)
    }

    fn snapshot(&self, sr: &mut Sr, src: Uuid, label: &str) -> Result<Uuid> {
        let src = record(sr, src)?;
        let uuid = Uuid::new_v4();
        let mut snap = VdiRecord {
            uuid,
            parent: Some(src.uuid),
            backing: Some(src.uuid),
            ..VdiRecord::new(VdiType::Snapshot, label, src.virtual_size)
        };
        match src.kind {
            VdiType::Template => super::snapshot_template(sr, &src, snap)?,
            VdiType::Snapshot | VdiType::Layer => {
                snap.file = Some(naming::unique(label, "qcow2", |n| taken(sr, n)));
                add_overlay(sr, "vdi snapshot", snap, Some(backing_of(&src)?), None)?;
            }
            VdiType::Disk => {
                // The disk's file becomes the snapshot; the disk goes on in an overlay.
                let disk_file = file_of(&src)?;
                let file = naming::unique(label, "qcow2", |n| taken(sr, n));
                let disk_tmp = new_name(Uuid::new_v4());
                snap.file = Some(file.clone());
                snap.backing = src.backing;
                let journal = Journal {
                    operation: "vdi snapshot".into(),
                    creates: vec![disk_tmp.clone()],
                    moves: vec![Move {
                        from: disk_file.clone(),
                        to: file.clone(),
                    }],
                    finish: vec![Move {
                        from: disk_tmp.clone(),
                        to: disk_file,
                    }],
                    ..Journal::default()
                };
                sr.run(
                    journal,
                    |sr| overlay(sr, &disk_tmp, src.virtual_size, Some((file, Format::Qcow2))),
                    |md| {
                        md.get_mut(src.uuid).expect("checked").backing = Some(uuid);
                        md.vdis.push(snap);
                    },
                )?;
            }
        }
        Ok(uuid)
    }

    fn destroy(&self, sr: &mut Sr, vdi: Uuid) -> Result<()> {
        let target = record(sr, vdi)?;
        // The record, and each layer below it that nothing else reads from.
        let mut gone = vec![target.uuid];
        let mut below = target.backing;
        while let Some(b) = below {
            let Some(rec) = sr.md.get(b) else { break };
            let others = sr.md.dependents(b).any(|d| !gone.contains(&d.uuid));
            if rec.kind != VdiType::Layer || others {
                break;
            }
            gone.push(b);
            below = rec.backing;
        }
        let deletes: Vec<String> = gone
            .iter()
            .filter_map(|u| sr.md.get(*u).and_then(|r| r.file.clone()))
            .collect();
        let journal = Journal {
            operation: "vdi destroy".into(),
            deletes,
            ..Journal::default()
        };
        sr.run(
            journal,
            |_| Ok(()),
            |md| {
                md.vdis.retain(|v| !gone.contains(&v.uuid));
                for v in &mut md.vdis {
                    if v.parent.is_some_and(|p| gone.contains(&p)) {
                        v.parent = None;
                    }
                }
            },
        )?;
        if target.kind == VdiType::Template {
            super::template_gone(sr, &target)?;
        }
        Ok(())
    }

    fn coalesce(&self, sr: &mut Sr, vdi: Uuid, templates: &Templates) -> Result<()> {
        let merged = record(sr, vdi)?;
        let dependents: Vec<VdiRecord> = sr.md.dependents(vdi).cloned().collect();
        let [child] = dependents.as_slice() else {
            return Err(Error::new(
                Code::VdiInUse,
                format!(
                    "{} records read from {vdi}: only a volume with one is merged",
                    dependents.len()
                ),
            ));
        };
        if child.attached {
            return Err(Error::new(
                Code::VdiInUse,
                format!(
                    "VDI {} ({}) reads from {vdi} and is attached: detach it to merge them",
                    child.uuid, child.name_label
                ),
            ));
        }
        let merged_file = file_of(&merged)?;
        let child_file = file_of(child)?;
        // 1. Copy into the child what the merged volume holds and the child does not:
        //    the child reads the same bytes before and after, so a crash here only leaves
        //    clusters the child did not need.
        copy_second_layer(sr, &child_file, templates)?;
        // 2. The child reads from the merged volume's backing; the merged volume goes.
        let to = match merged.backing {
            Some(b) => Some(backing_of(&record(sr, b)?)?),
            None => None,
        };
        let journal = Journal {
            operation: "coalesce".into(),
            rebases: vec![Rebase {
                file: child_file,
                from: Some((merged_file.clone(), Format::Qcow2)),
                to,
            }],
            deletes: vec![merged_file],
            ..Journal::default()
        };
        let child_uuid = child.uuid;
        sr.run(
            journal,
            |_| Ok(()),
            |md| {
                md.get_mut(child_uuid).expect("checked").backing = merged.backing;
                md.vdis.retain(|v| v.uuid != vdi);
                for v in &mut md.vdis {
                    if v.parent == Some(vdi) {
                        v.parent = None;
                    }
                }
            },
        )
    }

    fn resize(&self, sr: &mut Sr, vdi: Uuid, size: u64, templates: &Templates) -> Result<()> {
        let rec = record(sr, vdi)?;
        let path = sr.file(&file_of(&rec)?);
        let options = OpenOptions {
            backing_opener: Some(templates.opener(template::header_names(sr)?)),
            ..OpenOptions::default()
        };
        let what = format!("cannot resize {}", path.display());
        let (image, writer) =
            Image::open_writable(&path, &options).map_err(|e| Error::format(&what, &e))?;
        writer
            .resize(&image, size)
            .and_then(|()| writer.flush())
            .map_err(|e| Error::format(&what, &e))?;
        drop((image, writer));
        // A crash here leaves the image larger than its record: `sr check` finds it.
        crate::crash::point("resized");
        sr.md.get_mut(vdi).expect("checked").virtual_size = size;
        sr.save()
    }

    fn check(&self, sr: &Sr) -> Vec<Finding> {
        let mut out: Vec<Finding> = super::interrupted(sr).into_iter().collect();
        for v in &sr.md.vdis {
            if let Some(f) = &v.file
                && !sr.file(f).is_file()
            {
                out.push(Finding {
                    kind: "missing_file",
                    message: format!(
                        "{} {} ({}): its file {f} is missing",
                        kind_name(v),
                        v.uuid,
                        v.name_label
                    ),
                    repairable: false,
                });
            }
            if let Some(b) = v.backing
                && sr.md.get(b).is_none()
            {
                out.push(Finding {
                    kind: "missing_backing",
                    message: format!(
                        "{} {} ({}) reads from {b}, which the SR no longer knows (a forgotten template?)",
                        kind_name(v),
                        v.uuid,
                        v.name_label
                    ),
                    repairable: false,
                });
            }
            let readers: Vec<&VdiRecord> = sr.md.dependents(v.uuid).collect();
            if v.kind == VdiType::Layer && readers.len() == 1 && !readers[0].attached {
                out.push(Finding {
                    kind: "mergeable_layer",
                    message: format!(
                        "layer {} ({}) has one reader: it can be merged into it",
                        v.uuid,
                        v.file.as_deref().unwrap_or("?")
                    ),
                    repairable: true,
                });
            }
            if v.kind == VdiType::Layer && sr.md.dependents(v.uuid).next().is_none() {
                out.push(Finding {
                    kind: "unused_layer",
                    message: format!(
                        "layer {} ({}) is used by nothing",
                        v.uuid,
                        v.file.as_deref().unwrap_or("?")
                    ),
                    repairable: true,
                });
            }
        }
        for (v, size) in grown(sr) {
            out.push(Finding {
                kind: "size_mismatch",
                message: format!(
                    "disk {} ({}) is {size} bytes, its record says {} (a resize was interrupted): repair records its size",
                    v.uuid, v.name_label, v.virtual_size
                ),
                repairable: true,
            });
        }
        let attached: Vec<&VdiRecord> = sr.md.vdis.iter().filter(|v| v.attached).collect();
        if !attached.is_empty()
            && !matches!(
                crate::daemon::request(&sr.path, &crate::daemon::Request::Status),
                Some(Ok(_))
            )
        {
            for v in attached {
                out.push(Finding {
                    kind: "daemon_down",
                    message: format!(
                        "VDI {} ({}) is attached but no SR daemon serves it: `vdi attach` it again, or start `thinline sr serve`",
                        v.uuid, v.name_label
                    ),
                    repairable: false,
                });
            }
        }
        let journal_names: Vec<&String> = sr.md.journal.iter().flat_map(|j| &j.creates).collect();
        for name in leftovers(sr) {
            if !journal_names.contains(&&name) {
                out.push(Finding {
                    kind: "leftover_file",
                    message: format!("{NEW_DIR}/{name} was left by an interrupted operation"),
                    repairable: true,
                });
            }
        }
        out.extend(super::stray::findings(sr));
        out
    }

    fn repair(&self, sr: &mut Sr, templates: &Templates) -> Result<Vec<String>> {
        let mut done = std::mem::take(&mut sr.recovered);
        let mergeable: Vec<Uuid> = sr
            .md
            .vdis
            .iter()
            .filter(|v| {
                let readers: Vec<&VdiRecord> = sr.md.dependents(v.uuid).collect();
                v.kind == VdiType::Layer && readers.len() == 1 && !readers[0].attached
            })
            .map(|v| v.uuid)
            .collect();
        for layer in mergeable {
            self.coalesce(sr, layer, templates)?;
            done.push(format!("merged layer {layer} into its one reader"));
        }
        let unused: Vec<Uuid> = sr
            .md
            .vdis
            .iter()
            .filter(|v| v.kind == VdiType::Layer && sr.md.dependents(v.uuid).next().is_none())
            .map(|v| v.uuid)
            .collect();
        for layer in unused {
            self.destroy(sr, layer)?;
            done.push(format!("removed unused layer {layer}"));
        }
        let grown: Vec<(Uuid, u64)> = grown(sr).map(|(v, size)| (v.uuid, size)).collect();
        for (uuid, size) in grown {
            sr.md.get_mut(uuid).expect("listed").virtual_size = size;
            sr.save()?;
            done.push(format!("recorded the size of disk {uuid}: {size} bytes"));
        }
        for name in leftovers(sr) {
            let path = sr.new_file(&name);
            std::fs::remove_file(&path)
                .map_err(|e| Error::io(format!("cannot remove {}", path.display()), &e))?;
            done.push(format!("removed {NEW_DIR}/{name}"));
        }
        done.extend(super::stray::repair(sr)?);
        Ok(done)
    }
}

/// Bytes per copy step of a merge.
const COPY_CHUNK: usize = 4 << 20;

/// Copies into the qcow2 file `file` of the SR every range its backing (the second
/// layer of its chain) holds and it does not.
fn copy_second_layer(sr: &Sr, file: &str, templates: &Templates) -> Result<()> {
    let path = sr.file(file);
    let what = format!("cannot merge into {}", path.display());
    let options = OpenOptions {
        backing_opener: Some(templates.opener(template::header_names(sr)?)),
        ..OpenOptions::default()
    };
    let (image, writer) =
        Image::open_writable(&path, &options).map_err(|e| Error::format(&what, &e))?;
    let size = image.size();
    let mut ranges = Vec::new();
    let mut offset = 0;
    while offset < size {
        let found = image
            .allocation(offset, size - offset, Fetch::Allowed, 1 << 12)
            .map_err(|e| Error::format(&what, &e))?;
        if found.is_empty() {
            break;
        }
        for a in found {
            if a.depth == 2 {
                ranges.push((offset, a.length));
            }
            offset += a.length;
        }
    }
    let mut buf = vec![0u8; COPY_CHUNK];
    for (start, length) in ranges {
        let mut done = 0;
        while done < length {
            let n = (length - done).min(COPY_CHUNK as u64) as usize;
            image
                .read(start + done, &mut buf[..n])
                .and_then(|()| writer.write(&image, start + done, &buf[..n], false))
                .map_err(|e| Error::format(&what, &e))?;
            done += n as u64;
        }
    }
    writer.flush().map_err(|e| Error::format(&what, &e))
}

fn kind_name(v: &VdiRecord) -> &'static str {
    match v.kind {
        VdiType::Template => "template",
        VdiType::Disk => "disk",
        VdiType::Snapshot => "snapshot",
        VdiType::Layer => "layer",
    }
}

/// Files in `new/`: made by operations that never finished (the agent alone writes
/// there, and a finished operation leaves nothing).
/// The disks whose image is larger than their record says (a resize grows the image
/// first), with the image's size.
fn grown(sr: &Sr) -> impl Iterator<Item = (&VdiRecord, u64)> {
    sr.md.vdis.iter().filter_map(|v| {
        let file = v.file.as_deref().filter(|_| v.kind == VdiType::Disk)?;
        let mut header = [0u8; 32];
        let f = std::fs::File::open(sr.file(file)).ok()?;
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut header, 0).ok()?;
        // A qcow2 header: magic, then the guest size at byte 24 (big-endian).
        let size = u64::from_be_bytes(header[24..32].try_into().expect("8 bytes"));
        (header[..4] == *b"QFI\xfb" && size > v.virtual_size).then_some((v, size))
    })
}

fn leftovers(sr: &Sr) -> Vec<String> {
    let dir = sr.new_file("");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}
