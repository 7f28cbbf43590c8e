//! `thinline quickstart`: the whole path on the embedded default, in one command. A
//! directory SR under `./thinline-data`, a small sample template (a qcow2 disk with a
//! partition table and an ext4 file system) introduced by URI, a thin clone of it,
//! attached: its NBD URI is printed on a line of its own, with commands to use it, and
//! it is served until Ctrl-C. Run again, it reuses what exists.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use serde::Serialize;
use thinline_sr::{Error, VdiType, sr, vdi};

/// Make a directory SR with a sample template and a thin clone of it, serve the clone
/// over NBD and print how to use it; serves until Ctrl-C. Running it again reuses the
/// SR, the template and the clone (what you wrote to the clone is still there).
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  thinline quickstart
  thinline quickstart --dir /srv/thinline-demo --json")]
pub struct QuickstartArgs {
    /// Where the SR and the sample template live (made if missing).
    #[arg(long, value_name = "DIR", default_value = "thinline-data")]
    dir: PathBuf,
    /// Print one JSON object (the SR, template and clone UUIDs, the NBD URI) once
    /// serving.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct Ready {
    sr: String,
    template: String,
    vdi: String,
    nbd_uri: String,
    socket: String,
}

/// Runs `thinline quickstart`; returns the exit status.
pub fn run(args: QuickstartArgs) -> anyhow::Result<u8> {
    match prepare(&args) {
        Ok((ready, sr_path)) => serve(args.json, ready, sr_path),
        Err(e) => {
            crate::agent::print_error(&e, args.json)?;
            Ok(e.code.exit_status())
        }
    }
}

/// The SR daemon's answer to an attach lacked `what`.
fn no_answer(what: &str) -> Error {
    Error::new(
        thinline_sr::Code::SrBackendFailure,
        format!("the SR daemon answered no {what}"),
    )
}

fn prepare(args: &QuickstartArgs) -> thinline_sr::Result<(Ready, PathBuf)> {
    let dir = std::path::absolute(&args.dir)
        .map_err(|e| Error::io(format!("cannot resolve {}", args.dir.display()), &e))?;
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::io(format!("cannot create {}", dir.display()), &e))?;
    let sr_path = dir.join("sr");
    let sr_view = if thinline_sr::store::is_sr(&sr_path) {
        sr::introduce(&sr::IntroduceOptions {
            target: sr::Existing::Directory(sr_path.clone()),
            name_label: None,
        })?
    } else {
        sr::create(&sr::CreateOptions {
            place: sr::Place::Directory(sr_path.clone()),
            name_label: Some("quickstart".into()),
        })?
    };
    let sr_name = sr_view.uuid.to_string();
    let sample = dir.join("templates").join("sample.qcow2");
    if !sample.is_file() {
        eprintln!(
            "thinline quickstart: building the sample template {}",
            sample.display()
        );
        thinline_sr::sample::build(&sample)?;
    }
    let vdis = vdi::list(&sr_name)?;
    let shown = sample.display().to_string();
    let template = match vdis
        .iter()
        .find(|v| v.kind == VdiType::Template && v.uri.as_deref() == Some(shown.as_str()))
    {
        Some(t) => t.uuid,
        None => {
            let templates = crate::agent::default_templates()
                .map_err(|e| Error::new(thinline_sr::Code::SrBackendFailure, e.to_string()))?;
            vdi::introduce(
                &vdi::IntroduceOptions {
                    sr: sr_name.clone(),
                    uri: format!("file://{shown}"),
                    name_label: Some("sample".into()),
                },
                &templates,
            )?
            .uuid
        }
    };
    let clone = match vdis.iter().find(|v| {
        v.kind == VdiType::Disk && v.parent == Some(template) && v.name_label == "quickstart"
    }) {
        Some(c) => c.uuid,
        None => {
            vdi::clone(&vdi::CopyOptions {
                sr: sr_name.clone(),
                vdi: template,
                name_label: Some("quickstart".into()),
            })?
            .uuid
        }
    };
    let exe = std::env::current_exe()
        .map_err(|e| Error::io("cannot find the thinline executable", &e))?;
    let attached = vdi::attach(
        &vdi::VdiRef {
            sr: sr_name.clone(),
            vdi: clone,
        },
        &exe,
        false,
    )?;
    Ok((
        Ready {
            sr: sr_name,
            template: template.to_string(),
            vdi: clone.to_string(),
            nbd_uri: attached.nbd_uri.ok_or_else(|| no_answer("NBD URI"))?,
            socket: attached.socket.ok_or_else(|| no_answer("socket"))?,
        },
        sr_path,
    ))
}

fn serve(json: bool, ready: Ready, sr_path: PathBuf) -> anyhow::Result<u8> {
    let uri = ready.nbd_uri.clone();
    crate::print_report(&ready, json, |out| {
        use std::io::Write;
        writeln!(out, "A thin clone of the sample template is served at:")?;
        writeln!(out, "{uri}")?;
        writeln!(out)?;
        writeln!(
            out,
            "Use it (it holds an MBR partition table and an ext4 file system):"
        )?;
        writeln!(out, "  nbdinfo '{uri}'")?;
        writeln!(out, "  qemu-img info '{uri}'")?;
        writeln!(out, "  nbdcopy '{uri}' clone.raw")?;
        writeln!(
            out,
            "  mkdir -p mnt && nbdfuse mnt/ '{uri}' &   # then mnt/nbd is the disk"
        )?;
        writeln!(
            out,
            "  guestfish --ro --format=raw -a '{uri}' -i cat /hello.txt"
        )?;
        writeln!(
            out,
            "  qemu-system-x86_64 -m 1G -drive file='{uri}',format=raw,if=virtio"
        )?;
        writeln!(
            out,
            "  sudo nbd-client -unix {} /dev/nbd0 -N {}   # kernels with the nbd driver",
            ready.socket, ready.vdi
        )?;
        writeln!(out)?;
        writeln!(
            out,
            "SR {} ({}), template {}, clone {}. Serving until Ctrl-C.",
            ready.sr,
            sr_path.display(),
            ready.template,
            ready.vdi
        )
    })?;
    let runtime = crate::remote::runtime()?;
    runtime.block_on(async { crate::serve::shutdown_signal().await });
    let detached = vdi::detach(&vdi::VdiRef {
        sr: ready.sr.clone(),
        vdi: ready.vdi.parse().context("the clone's UUID")?,
    });
    // The daemon goes when it serves nothing else.
    let idle = thinline_sr::daemon::request(&sr_path, &thinline_sr::daemon::Request::Status)
        .and_then(|r| r.ok())
        .and_then(|v| serde_json::from_value::<thinline_sr::model::DaemonStatus>(v).ok())
        .is_some_and(|s| s.serving.is_empty());
    if idle {
        let _ = thinline_sr::daemon::request(&sr_path, &thinline_sr::daemon::Request::Shutdown);
    }
    match detached {
        Ok(()) => {
            eprintln!("thinline quickstart: stopped; run it again to serve the same clone");
            Ok(0)
        }
        Err(e) => {
            // After the JSON object it already printed: the error goes to stderr.
            crate::agent::print_error(&e, false)?;
            Ok(e.code.exit_status())
        }
    }
}
