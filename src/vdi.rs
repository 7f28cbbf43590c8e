//! `thinline vdi …`: templates, thin disks and snapshots in an SR. Each subcommand
//! fills the library's options and prints its result (see `docs/sr-agent.md` for the
//! output contract and exit statuses).

use std::io::Write;

use clap::{Args, Subcommand};
use thinline_sr::template::Templates;
use thinline_sr::vdi;
use uuid::Uuid;

use crate::agent::{OnSr, finish, vdi_header, vdi_row, vdi_text};
use crate::remote::RemoteArgs;
use crate::size::parse_size;

/// Virtual disks: templates registered by URI, thin disks, snapshots.
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  thinline vdi introduce --sr /srv/thinline/sr1 https://images.example.com/debian-12.qcow2
  thinline vdi clone --sr /srv/thinline/sr1 3f0c…  --name-label web1
  thinline vdi list --sr /srv/thinline/sr1 --json")]
pub struct VdiArgs {
    #[command(subcommand)]
    command: VdiCommand,
}

#[derive(Debug, Subcommand)]
enum VdiCommand {
    Introduce(IntroduceArgs),
    Create(CreateArgs),
    Clone(CopyArgs),
    Snapshot(SnapshotArgs),
    /// Delete a disk or snapshot that nothing reads from (VDI_IN_USE otherwise).
    #[command(after_help = "Example:\n  thinline vdi destroy --sr /srv/thinline/sr1 UUID")]
    Destroy(RefArgs),
    Forget(ForgetArgs),
    Resize(ResizeArgs),
    /// Show one VDI.
    #[command(after_help = "Example:\n  thinline vdi stat --sr /srv/thinline/sr1 UUID --json")]
    Stat(RefArgs),
    List(ListArgs),
    SetNameLabel(LabelArgs),
    /// Serve a disk (read-write) or snapshot (read-only) over NBD and print its URI.
    /// The SR's daemon serves it (started in the background if none runs); attaching
    /// an attached VDI prints the same URI. With --device, the kernel's nbd client
    /// also connects a /dev/nbdN to it and that path is printed (DEVICE_UNAVAILABLE
    /// on a host without the nbd driver or nbd-client).
    #[command(after_help = "Examples:
  thinline vdi attach --sr /srv/thinline/sr1 UUID --json
  qemu-img info \"$(thinline vdi attach --sr /srv/thinline/sr1 UUID --json | jq -r .nbd_uri)\"
  thinline vdi attach --sr /srv/thinline/sr1 UUID --device   # prints /dev/nbd0")]
    Attach(AttachArgs),
    /// Stop serving a VDI: its export and socket are gone when this returns (the
    /// daemon goes on serving the others).
    #[command(after_help = "Example:\n  thinline vdi detach --sr /srv/thinline/sr1 UUID")]
    Detach(RefArgs),
    Pivot(PivotArgs),
}

/// Register a read-only template by URI: any location `thinline serve` accepts (a
/// path, file://, http(s)://, s3://, nfs://, nbd://, a scheme handler), in any format
/// it reads. The template is opened once for its format and size; credentials in
/// the URI are kept in a file only its owner reads, never shown.
#[derive(Debug, Args)]
#[command(after_help = "Example:
  thinline vdi introduce --sr /srv/thinline/sr1 --name-label debian-12 \\
      https://images.example.com/debian-12.qcow2")]
struct IntroduceArgs {
    #[command(flatten)]
    on: OnSr,
    /// A name for people (default: the last part of the URI).
    #[arg(long, value_name = "LABEL")]
    name_label: Option<String>,
    #[command(flatten)]
    remote: RemoteArgs,
    /// The template's location.
    uri: String,
}

/// Make an empty thin disk; with --preallocate, allocate and zero every block now (a
/// task: progress on a terminal, progress records on stderr with --json, cancellable
/// with Ctrl-C or `thinline task cancel`, leaving nothing half-made).
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  thinline vdi create --sr /srv/thinline/sr1 20G --name-label data
  thinline vdi create --sr /srv/thinline/sr1 100G --preallocate --json")]
struct CreateArgs {
    /// Allocate and zero every block now (the space is taken; no allocation later).
    #[arg(long)]
    preallocate: bool,
    #[command(flatten)]
    on: OnSr,
    /// A name for people (default: disk); the file is named after it.
    #[arg(long, value_name = "LABEL")]
    name_label: Option<String>,
    /// The size: bytes, or with a K, M, G or T suffix.
    #[arg(value_parser = parse_size)]
    size: usize,
}

/// Make a writable thin disk with the content of a template, disk or snapshot. A
/// cloned disk stays writable: both become overlays of a read-only layer.
#[derive(Debug, Args)]
#[command(after_help = "Example:
  thinline vdi clone --sr /srv/thinline/sr1 --name-label web1 UUID")]
struct CopyArgs {
    #[command(flatten)]
    on: OnSr,
    /// A name for people (default: the source's).
    #[arg(long, value_name = "LABEL")]
    name_label: Option<String>,
    /// The VDI to copy.
    vdi: Uuid,
}

/// Make a read-only point-in-time copy of a disk (the disk goes on in an overlay).
///
/// Of an attached disk, the SR's daemon makes it with the disk paused for a moment:
/// the copy holds every write acknowledged before it, and clients stay connected.
#[derive(Debug, Args)]
#[command(after_help = "Example:
  thinline vdi snapshot --sr /srv/thinline/sr1 --name-label before-upgrade UUID")]
struct SnapshotArgs {
    #[command(flatten)]
    copy: CopyArgs,
}

/// Names one VDI.
#[derive(Debug, Args)]
struct RefArgs {
    #[command(flatten)]
    on: OnSr,
    /// The VDI.
    vdi: Uuid,
}

#[derive(Debug, Args)]
struct AttachArgs {
    #[command(flatten)]
    on: OnSr,
    /// Also connect a kernel block device (/dev/nbdN) to it (needs root, the nbd
    /// driver and nbd-client); `vdi detach` flushes and disconnects it.
    #[arg(long)]
    device: bool,
    /// The VDI.
    vdi: Uuid,
}

/// LVM SRs: make a clone read its template from the SR's complete cache of it instead
/// of through the template's proxy, with every attached clone of that template (their
/// device tables reloaded: the same bytes, I/O paused only for the swap); then the
/// proxy and its nbd device stop, and later clones start local. The template is
/// hydrated first if needed (progress on a terminal, progress records on stderr with
/// --json; Ctrl-C stops waiting: with --hydrate background the hydration goes on and the
/// clones pivot when it is done, else run this again to go on). A clone already local,
/// or a VDI built on no template, is left as it is. With --hydrate background this also
/// happens by itself when a template's cache completes.
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  thinline vdi pivot --sr vms UUID
  thinline vdi stat --sr vms UUID --json | jq -r .origin   # remote, partial or local")]
struct PivotArgs {
    #[command(flatten)]
    on: OnSr,
    /// Only if the template's proxy has a complete, scrubbed cache; otherwise change
    /// nothing (what the proxy runs itself).
    #[arg(long)]
    if_ready: bool,
    /// The clone (or the template).
    vdi: Uuid,
}

/// Unregister a template. Refused while VDIs read from it, unless --force.
#[derive(Debug, Args)]
#[command(after_help = "Example:
  thinline vdi forget --sr /srv/thinline/sr1 UUID")]
struct ForgetArgs {
    #[command(flatten)]
    on: OnSr,
    /// Forget it even though VDIs are built on it: they keep their files but cannot be
    /// opened (attached, resized) until the template is introduced again.
    #[arg(long)]
    force: bool,
    /// The template.
    vdi: Uuid,
}

/// Grow a disk (the new tail reads as zeroes).
///
/// An attached disk grows while it is served: connections made after the resize see the
/// new size (an NBD connection keeps the size it was given).
#[derive(Debug, Args)]
#[command(after_help = "Example:
  thinline vdi resize --sr /srv/thinline/sr1 UUID 40G")]
struct ResizeArgs {
    #[command(flatten)]
    on: OnSr,
    #[command(flatten)]
    remote: RemoteArgs,
    /// The disk.
    vdi: Uuid,
    /// The new size: bytes, or with a K, M, G or T suffix.
    #[arg(value_parser = parse_size)]
    size: usize,
}

/// List the SR's VDIs.
#[derive(Debug, Args)]
#[command(after_help = "Example:
  thinline vdi list --sr /srv/thinline/sr1 --json")]
struct ListArgs {
    #[command(flatten)]
    on: OnSr,
}

/// Rename a VDI (its file keeps its name).
#[derive(Debug, Args)]
#[command(after_help = "Example:
  thinline vdi set-name-label --sr /srv/thinline/sr1 UUID web1-old")]
struct LabelArgs {
    #[command(flatten)]
    on: OnSr,
    /// The VDI.
    vdi: Uuid,
    /// The new name-label.
    label: String,
}

fn templates(remote: &RemoteArgs) -> anyhow::Result<Templates> {
    Ok(Templates {
        remote: remote.config()?,
        handle: crate::remote::runtime()?.handle().clone(),
    })
}

/// Runs `thinline vdi …`; returns the exit status.
pub fn run(args: VdiArgs) -> anyhow::Result<u8> {
    let text = |v: &thinline_sr::VdiView, out: &mut dyn Write| vdi_text(v, out);
    match args.command {
        VdiCommand::Introduce(a) => {
            let options = vdi::IntroduceOptions {
                sr: a.on.sr,
                uri: a.uri,
                name_label: a.name_label,
            };
            finish(
                vdi::introduce(&options, &templates(&a.remote)?),
                a.on.json,
                text,
            )
        }
        VdiCommand::Create(a) => {
            let options = vdi::CreateOptions {
                sr: a.on.sr,
                size: a.size as u64,
                name_label: a.name_label,
                preallocate: a.preallocate,
                interrupted: if a.preallocate {
                    crate::agent::interrupted_on_ctrl_c()?
                } else {
                    Default::default()
                },
            };
            let mut progress = crate::agent::progress_reporter(a.on.json);
            let result = vdi::create(&options, &mut progress);
            crate::agent::end_progress(a.on.json);
            finish(result, a.on.json, text)
        }
        VdiCommand::Clone(a) => finish(vdi::clone(&copy(&a)), a.on.json, text),
        VdiCommand::Snapshot(a) => finish(vdi::snapshot(&copy(&a.copy)), a.copy.on.json, text),
        VdiCommand::Destroy(a) => {
            let r = vdi::VdiRef {
                sr: a.on.sr,
                vdi: a.vdi,
            };
            let result = vdi::destroy(&r, &crate::agent::default_templates()?)
                .map(|()| serde_json::json!({ "uuid": a.vdi }));
            finish(result, a.on.json, |_, out| {
                writeln!(out, "destroyed VDI {}", a.vdi)
            })
        }
        VdiCommand::Forget(a) => {
            let options = vdi::ForgetOptions {
                sr: a.on.sr,
                vdi: a.vdi,
                force: a.force,
            };
            finish(vdi::forget(&options), a.on.json, |f, out| {
                writeln!(out, "forgot template {}", f.uuid)?;
                for o in &f.orphaned {
                    writeln!(
                        out,
                        "VDI {o} cannot be opened until the template is introduced again"
                    )?;
                }
                Ok(())
            })
        }
        VdiCommand::Resize(a) => {
            let options = vdi::ResizeOptions {
                sr: a.on.sr,
                vdi: a.vdi,
                size: a.size as u64,
            };
            finish(
                vdi::resize(&options, &templates(&a.remote)?),
                a.on.json,
                text,
            )
        }
        VdiCommand::Stat(a) => finish(
            vdi::stat(
                &vdi::VdiRef {
                    sr: a.on.sr,
                    vdi: a.vdi,
                },
                &crate::agent::default_templates()?,
            ),
            a.on.json,
            text,
        ),
        VdiCommand::List(a) => {
            let result = vdi::list(&a.on.sr).map(|vdis| ListOut { vdis });
            finish(result, a.on.json, |l, out| {
                vdi_header(out)?;
                l.vdis.iter().try_for_each(|v| vdi_row(v, out))
            })
        }
        VdiCommand::Attach(a) => {
            let exe = std::env::current_exe()?;
            let r = vdi::VdiRef {
                sr: a.on.sr,
                vdi: a.vdi,
            };
            finish(vdi::attach(&r, &exe, a.device), a.on.json, |v, out| {
                if let Some(device) = &v.device {
                    writeln!(out, "{device}")?;
                }
                if let (Some(uri), Some(socket)) = (&v.nbd_uri, &v.socket) {
                    writeln!(out, "{uri}")?;
                    writeln!(out, "  qemu-img info '{uri}'")?;
                    writeln!(out, "  nbdinfo '{uri}'")?;
                    writeln!(out, "  nbd-client -unix {socket} /dev/nbd0 -N {}", v.uuid)?;
                }
                Ok(())
            })
        }
        VdiCommand::Detach(a) => {
            let r = vdi::VdiRef {
                sr: a.on.sr,
                vdi: a.vdi,
            };
            let result = vdi::detach(&r).map(|()| serde_json::json!({ "uuid": a.vdi }));
            finish(result, a.on.json, |_, out| {
                writeln!(out, "detached VDI {}", a.vdi)
            })
        }
        VdiCommand::Pivot(a) => {
            let exe = std::env::current_exe()?;
            let options = vdi::PivotOptions {
                sr: a.on.sr,
                vdi: a.vdi,
                if_ready: a.if_ready,
                interrupted: crate::agent::interrupted_on_ctrl_c()?,
            };
            let mut progress = crate::agent::progress_reporter(a.on.json);
            let result = vdi::pivot(&options, &exe, &mut progress);
            crate::agent::end_progress(a.on.json);
            finish(result, a.on.json, |p, out| match (&p.template, &p.device) {
                (None, _) => writeln!(out, "VDI {} reads no template: nothing to pivot", p.uuid),
                (Some(t), Some(device)) => writeln!(
                    out,
                    "VDI {} reads template {t} from its local cache {device} ({} clones moved now)",
                    p.uuid,
                    p.clones.len()
                ),
                (Some(t), None) if p.origin == "local" => writeln!(
                    out,
                    "VDI {} reads template {t} from its local cache (attached when a clone is)",
                    p.uuid
                ),
                (Some(t), None) => writeln!(
                    out,
                    "template {t}'s cache is not ready: VDI {} stays {}",
                    p.uuid, p.origin
                ),
            })
        }
        VdiCommand::SetNameLabel(a) => {
            let options = vdi::LabelOptions {
                sr: a.on.sr,
                vdi: a.vdi,
                name_label: a.label,
            };
            finish(vdi::set_name_label(&options), a.on.json, text)
        }
    }
}

#[derive(Debug, serde::Serialize)]
struct ListOut {
    vdis: Vec<thinline_sr::VdiView>,
}

fn copy(a: &CopyArgs) -> vdi::CopyOptions {
    vdi::CopyOptions {
        sr: a.on.sr.clone(),
        vdi: a.vdi,
        name_label: a.name_label.clone(),
    }
}
