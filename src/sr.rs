//! `thinline sr …`: storage repositories. Each subcommand fills the library's options
//! and prints its result (see `docs/sr-agent.md` for the output contract and exit
//! statuses).

use std::path::PathBuf;
use std::sync::Arc;

use clap::{Args, Subcommand, ValueEnum};
use thinline_sr::backend::lvm::pool::WhenFull;
use thinline_sr::model::Hydrate;
use thinline_sr::sr;

use crate::agent::{OnSr, finish, sr_text};

/// Storage repositories: directories, or LVM volume groups with a dm-thin pool, that
/// hold templates, thin disks and snapshots.
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  thinline sr create --type file /srv/thinline/sr1 --name-label local
  thinline sr create --type lvm /dev/disk/by-id/nvme-A /dev/disk/by-id/nvme-B
  thinline sr list --json")]
pub struct SrArgs {
    #[command(subcommand)]
    command: SrCommand,
}

#[derive(Debug, Subcommand)]
enum SrCommand {
    Create(CreateArgs),
    Introduce(IntroduceArgs),
    /// Unregister an SR: nothing on disk changes, and `sr introduce` brings it back.
    #[command(after_help = "Example:\n  thinline sr forget --sr /srv/thinline/sr1")]
    Forget(OnSr),
    Destroy(DestroyArgs),
    Probe(ProbeArgs),
    /// Show an SR: its sizes, free space, VDI count and health.
    #[command(after_help = "Example:\n  thinline sr stat --sr /srv/thinline/sr1 --json")]
    Stat(OnSr),
    List(ListArgs),
    Check(CheckArgs),
    Grow(GrowArgs),
    Monitor(MonitorArgs),
    Serve(ServeArgs),
    #[command(hide = true)]
    Origin(OriginArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum WhenFullArg {
    Error,
    Queue,
}

impl WhenFullArg {
    fn setting(self) -> WhenFull {
        match self {
            WhenFullArg::Error => WhenFull::Error,
            WhenFullArg::Queue => WhenFull::Queue,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum HydrateArg {
    /// From a template's first attached clone on, in the background.
    Background,
    /// Only when `vdi pivot` asks.
    OnPivot,
}

impl HydrateArg {
    fn setting(self) -> Hydrate {
        match self {
            HydrateArg::Background => Hydrate::Background,
            HydrateArg::OnPivot => Hydrate::OnPivot,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum TypeArg {
    /// A directory of qcow2 files (no root, no LVM, no kernel module).
    File,
    /// A new LVM volume group on empty devices, with a dm-thin pool (root; lvm2,
    /// dmsetup and thin-provisioning-tools).
    Lvm,
}

/// Make a new SR and register it: a directory SR in a new (or empty) directory, or
/// an LVM SR on empty devices (a new VG, its metadata volume and a dm-thin pool filling
/// it but for --reserve; devices holding anything blkid recognises are refused).
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  thinline sr create --type file /srv/thinline/sr1 --name-label local
  thinline sr create --type lvm /dev/sdb /dev/sdc --vg vms --reserve 20G --json")]
struct CreateArgs {
    /// The kind of SR.
    #[arg(long = "type", value_enum, default_value = "file")]
    kind: TypeArg,
    /// A name for people (default: the directory's name; the VG's).
    #[arg(long, value_name = "LABEL")]
    name_label: Option<String>,
    /// LVM: the new volume group's name (default: thinline- and the SR's UUID's first
    /// eight digits).
    #[arg(long, value_name = "NAME")]
    vg: Option<String>,
    /// LVM: bytes of the VG left outside the thin pool (a pool's data cannot shrink),
    /// e.g. 20G.
    #[arg(long, value_name = "SIZE", value_parser = crate::size::parse_size, default_value = "0")]
    reserve: usize,
    /// LVM: what writes do when the pool's data is full: fail at once with ENOSPC
    /// (error), or wait for the pool to grow (queue; the kernel fails them after its
    /// no_space_timeout, 60 s by default).
    #[arg(long, value_enum, default_value = "error")]
    when_full: WhenFullArg,
    /// LVM: when a template's proxy fetches the whole template, so that its clones
    /// pivot onto the local cache: in the background from the first attach, or only
    /// when `vdi pivot` asks.
    #[arg(long, value_enum, default_value = "background")]
    hydrate: HydrateArg,
    /// LVM: the most the pool's data grows to by itself when it is 80% full (default:
    /// as far as the VG's free space beyond --reserve goes, e.g. after a device is
    /// added to the VG); `thinline sr monitor` grows it, `sr grow` by hand.
    #[arg(long, value_name = "SIZE", value_parser = crate::size::parse_size)]
    autoextend_max: Option<usize>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// The directory to make (file), or the devices (lvm).
    #[arg(required = true, value_name = "PATH|DEVICE")]
    paths: Vec<PathBuf>,
}

/// Adopt an existing directory as an SR (files already in it are left alone), or
/// register again an SR that is already there; with --type lvm, adopt the LVM SR in a
/// VG (forgotten, or moved from another host: its devices are found by a scan), or
/// with --pool-size make one in a VG of yours, beside your LVs.
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  thinline sr introduce /var/lib/images --name-label images
  thinline sr introduce --type lvm vms --json
  thinline sr introduce --type lvm datavg --pool-size 200G")]
struct IntroduceArgs {
    /// The kind of SR.
    #[arg(long = "type", value_enum, default_value = "file")]
    kind: TypeArg,
    /// A name for people (default: the directory's name, or the SR's own).
    #[arg(long, value_name = "LABEL")]
    name_label: Option<String>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// LVM: a VG that holds no SR gets one: its LVs and a thin pool of SIZE bytes
    /// beside the VG's other LVs, which it never touches (e.g. 100G).
    #[arg(long, value_name = "SIZE", value_parser = crate::size::parse_size)]
    pool_size: Option<usize>,
    /// LVM with --pool-size: what writes do when the pool's data is full.
    #[arg(long, value_enum, default_value = "error")]
    when_full: WhenFullArg,
    /// LVM with --pool-size: the most the pool's data grows to by itself when it is 80%
    /// full, from the VG's free space (default: the pool size: it never grows unless
    /// told, `sr grow`).
    #[arg(long, value_name = "SIZE", value_parser = crate::size::parse_size)]
    autoextend_max: Option<usize>,
    /// LVM with --pool-size: when a template's proxy fetches the whole template, so that its clones
    /// pivot onto the local cache: in the background from the first attach, or only
    /// when `vdi pivot` asks.
    #[arg(long, value_enum, default_value = "background")]
    hydrate: HydrateArg,
    /// The directory (file), or the VG (lvm).
    #[arg(value_name = "PATH|VG")]
    path: PathBuf,
}

/// Delete every disk, snapshot and layer of the SR and its metadata; templates are
/// only forgotten; the directory goes too if `sr create` made it and it is empty.
#[derive(Debug, Args)]
#[command(after_help = "Example:
  thinline sr destroy --sr /srv/thinline/sr1 --force")]
struct DestroyArgs {
    #[command(flatten)]
    on: OnSr,
    /// Destroy the SR's disks and snapshots too (refused without it: SR_NOT_EMPTY).
    #[arg(long)]
    force: bool,
}

/// Say whether a directory holds an SR; with --type lvm, which LVM SRs are on some
/// devices (lvm2 limited to them; nothing is changed).
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  thinline sr probe /srv/thinline/sr1 --json
  thinline sr probe --type lvm /dev/sdb /dev/sdc --json")]
struct ProbeArgs {
    /// The kind of SR.
    #[arg(long = "type", value_enum, default_value = "file")]
    kind: TypeArg,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// The directory (file), or the devices (lvm).
    #[arg(required = true, value_name = "PATH|DEVICE")]
    paths: Vec<PathBuf>,
}

/// List the registered SRs.
#[derive(Debug, Args)]
#[command(after_help = "Example:
  thinline sr list --json")]
struct ListArgs {
    /// Print one JSON object ({\"srs\": [...]}).
    #[arg(long)]
    json: bool,
}

/// Compare the SR's metadata with its files; with --repair, finish or undo an
/// interrupted operation and remove what it left behind.
#[derive(Debug, Args)]
#[command(after_help = "Example:
  thinline sr check --sr /srv/thinline/sr1 --repair")]
struct CheckArgs {
    #[command(flatten)]
    on: OnSr,
    /// Fix what can be fixed.
    #[arg(long)]
    repair: bool,
}

/// LVM SRs: grow the thin pool's data by SIZE from the VG's free space (the reserve
/// too; SR_FULL without the room: add a device to the VG first). Online: attached VDIs
/// go on, and a pool that was out of data space takes writes again.
#[derive(Debug, Args)]
#[command(after_help = "Example:
  thinline sr grow --sr vms --by 50G --json")]
struct GrowArgs {
    #[command(flatten)]
    on: OnSr,
    /// How much to add: bytes, or with a K, M, G or T suffix (whole extents).
    #[arg(long, value_name = "SIZE", value_parser = crate::size::parse_size)]
    by: usize,
}

/// LVM SRs: watch the thin pool in the foreground and grow its data by a fifth each
/// time it is 80% full, from the VG's free space beyond the SR's reserve, up to its
/// --autoextend-max (what lvm2's dmeventd does for pools lvm2 knows). With --when-full
/// queue, writes wait for it instead of failing. SIGTERM or Ctrl-C stops it.
#[derive(Debug, Args)]
#[command(after_help = "Example:
  thinline sr monitor --sr vms --interval 5")]
struct MonitorArgs {
    /// The SR: its home, VG or UUID.
    #[arg(long, value_name = "SR")]
    sr: String,
    /// Seconds between two looks at the pool.
    #[arg(long, value_name = "SECONDS", default_value = "5")]
    interval: f64,
}

/// Run the SR's daemon in the foreground: it serves every attached VDI over NBD (one
/// unix socket each, in SR/.thinline-sr/run/) and takes `vdi attach` and `vdi detach`
/// requests. `vdi attach` starts one in the background when none runs; a systemd unit
/// (packaging/systemd/thinline-sr@.service) runs it as a service. On start it serves
/// again every VDI recorded as attached. SIGTERM or Ctrl-C stops it (the VDIs stay
/// recorded as attached, for the next start).
#[derive(Debug, Args)]
#[command(after_help = "Example:
  thinline sr serve --sr /srv/thinline/sr1")]
struct ServeArgs {
    /// The SR: its directory, or its UUID (see `sr list`).
    #[arg(long, value_name = "SR")]
    sr: String,
    /// Accepted for the output contract; the daemon prints logs only.
    #[arg(long, hide = true)]
    json: bool,
    #[command(flatten)]
    remote: crate::remote::RemoteArgs,
}

/// Run the copy-on-read proxy of one template of an LVM SR in the foreground: the
/// external origin of its attached clones, cached on a thin volume of the SR (what
/// `vdi attach` starts, and the last `vdi detach` stops). SIGTERM or Ctrl-C stops it.
#[derive(Debug, Args)]
#[command(after_help = "Example:
  thinline sr origin --sr vms 5f0c…")]
struct OriginArgs {
    /// The SR: its home, VG or UUID.
    #[arg(long, value_name = "SR")]
    sr: String,
    /// The template's UUID.
    template: uuid::Uuid,
    #[command(flatten)]
    remote: crate::remote::RemoteArgs,
}

fn origin(a: OriginArgs) -> anyhow::Result<u8> {
    let path = match thinline_sr::registry::resolve(&a.sr) {
        Ok(p) => p,
        Err(e) => {
            crate::agent::print_error(&e, false)?;
            return Ok(e.code.exit_status());
        }
    };
    let runtime = crate::remote::runtime()?;
    let templates = thinline_sr::template::Templates {
        remote: a.remote.config()?,
        handle: runtime.handle().clone(),
    };
    // The shutdown signal is made inside the runtime (it registers with its reactor).
    let result = runtime.block_on(async move {
        let shutdown = crate::serve::shutdown_signal();
        // After an upgrade replaced the binary, the path names the new one.
        let exe = std::env::current_exe().map_or_else(
            |_| "thinline".into(),
            |p| {
                let shown = p.to_string_lossy();
                shown
                    .strip_suffix(" (deleted)")
                    .map_or(p.clone(), std::path::PathBuf::from)
            },
        );
        thinline_sr::backend::lvm::origin::serve(path, a.template, templates, exe, shutdown).await
    });
    match result {
        Ok(()) => Ok(0),
        Err(e) => {
            crate::agent::print_error(&e, false)?;
            Ok(e.code.exit_status())
        }
    }
}

fn monitor(a: MonitorArgs) -> anyhow::Result<u8> {
    if !(a.interval.is_finite() && (0.1..=3600.0).contains(&a.interval)) {
        return usage("--interval is 0.1 to 3600 seconds", false);
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let runtime = crate::remote::runtime()?;
    let on_term = stop.clone();
    runtime.spawn(async move {
        crate::serve::shutdown_signal().await;
        on_term.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let interval = std::time::Duration::from_secs_f64(a.interval);
    match sr::monitor(&a.sr, interval, &stop) {
        Ok(()) => Ok(0),
        Err(e) => {
            crate::agent::print_error(&e, false)?;
            Ok(e.code.exit_status())
        }
    }
}

fn serve(a: ServeArgs) -> anyhow::Result<u8> {
    let path = match thinline_sr::registry::resolve(&a.sr) {
        Ok(p) => p,
        Err(e) => {
            crate::agent::print_error(&e, a.json)?;
            return Ok(e.code.exit_status());
        }
    };
    let runtime = crate::remote::runtime()?;
    let templates = thinline_sr::template::Templates {
        remote: a.remote.config()?,
        handle: runtime.handle().clone(),
    };
    // Snapshots, clones and resizes of attached disks are made by the daemon, with the
    // same templates as the commands that ask for them.
    let own = templates.clone();
    let apply: thinline_sr::daemon::Apply = Arc::new(move |sr, vdi, change| {
        thinline_sr::vdi::apply(sr, vdi, change, &own)
            .map(|view| serde_json::to_value(view).expect("serializes"))
    });
    let result = runtime.block_on(async move {
        let ready = || crate::systemd::notify("READY=1");
        let shutdown = crate::systemd::notify_stopping(crate::serve::shutdown_signal());
        thinline_sr::daemon::run(path, templates, apply, ready, shutdown).await
    });
    match result {
        Ok(()) => Ok(0),
        Err(e) => {
            crate::agent::print_error(&e, a.json)?;
            Ok(e.code.exit_status())
        }
    }
}

/// Prints an INVALID_ARGUMENT error for `message`; its exit status.
fn usage(message: &str, json: bool) -> anyhow::Result<u8> {
    let e = thinline_sr::Error::new(thinline_sr::Code::InvalidArgument, message);
    crate::agent::print_error(&e, json)?;
    Ok(e.code.exit_status())
}

/// Runs `thinline sr …`; returns the exit status.
pub fn run(args: SrArgs) -> anyhow::Result<u8> {
    match args.command {
        SrCommand::Create(a) => {
            let place = match a.kind {
                TypeArg::File => match <[PathBuf; 1]>::try_from(a.paths) {
                    Ok([path])
                        if a.vg.is_none()
                            && a.reserve == 0
                            && matches!(a.when_full, WhenFullArg::Error)
                            && matches!(a.hydrate, HydrateArg::Background)
                            && a.autoextend_max.is_none() =>
                    {
                        sr::Place::Directory(path)
                    }
                    _ => {
                        return usage(
                            "a directory SR is made in one directory (--vg, --reserve, --when-full, --hydrate and --autoextend-max are for --type lvm)",
                            a.json,
                        );
                    }
                },
                TypeArg::Lvm => sr::Place::Lvm {
                    devices: a.paths,
                    vg: a.vg,
                    reserve: a.reserve as u64,
                    settings: sr::PoolSettings {
                        when_full: a.when_full.setting(),
                        hydrate: a.hydrate.setting(),
                        autoextend_max: a.autoextend_max.map(|s| s as u64),
                    },
                },
            };
            let options = sr::CreateOptions {
                place,
                name_label: a.name_label,
            };
            finish(sr::create(&options), a.json, |v, out| sr_text(v, out))
        }
        SrCommand::Introduce(a) => {
            let target = match a.kind {
                TypeArg::File if a.pool_size.is_none() => sr::Existing::Directory(a.path),
                TypeArg::File => {
                    return usage("--pool-size is for --type lvm", a.json);
                }
                TypeArg::Lvm => sr::Existing::Vg {
                    name: a.path.display().to_string(),
                    pool_size: a.pool_size.map(|s| s as u64),
                    settings: sr::PoolSettings {
                        when_full: a.when_full.setting(),
                        hydrate: a.hydrate.setting(),
                        // A user's VG: the pool stays the size asked unless told.
                        autoextend_max: a.autoextend_max.or(a.pool_size).map(|s| s as u64),
                    },
                },
            };
            let options = sr::IntroduceOptions {
                target,
                name_label: a.name_label,
            };
            finish(sr::introduce(&options), a.json, |v, out| sr_text(v, out))
        }
        SrCommand::Forget(a) => finish(sr::forget(&a.sr), a.json, |f, out| match f {
            sr::Forgotten::Sr(v) => writeln!(
                out,
                "forgot SR {} ({}); its files are untouched",
                v.uuid, v.path
            ),
            sr::Forgotten::Entry { uuid, path } => writeln!(
                out,
                "forgot SR {uuid}, registered at {path}, which holds no SR any more"
            ),
        }),
        SrCommand::Destroy(a) => {
            let options = sr::DestroyOptions {
                sr: a.on.sr,
                force: a.force,
            };
            let result = sr::destroy(&options).map(|uuid| serde_json::json!({ "uuid": uuid }));
            finish(result, a.on.json, |v, out| {
                writeln!(out, "destroyed SR {}", v["uuid"].as_str().unwrap_or("?"))
            })
        }
        SrCommand::Probe(a) => match a.kind {
            TypeArg::File => {
                let [path] = <[PathBuf; 1]>::try_from(a.paths).unwrap_or_default();
                if path.as_os_str().is_empty() {
                    return usage("a directory SR is probed in one directory", a.json);
                }
                finish(sr::probe(&path), a.json, |p, out| match &p.sr {
                    Some(v) => sr_text(v, out),
                    None => writeln!(out, "{} holds no SR", p.path),
                })
            }
            TypeArg::Lvm => finish(sr::probe_lvm(&a.paths), a.json, |p, out| {
                if p.srs.is_empty() {
                    writeln!(out, "no LVM SR on {}", p.devices.join(", "))?;
                }
                for s in &p.srs {
                    writeln!(
                        out,
                        "SR {} ({}) in VG {}: {} VDIs{}",
                        s.uuid,
                        s.name_label,
                        s.vg,
                        s.vdi_count,
                        if s.registered {
                            ""
                        } else {
                            "; not registered here (sr introduce --type lvm VG)"
                        }
                    )?;
                }
                Ok(())
            }),
        },
        SrCommand::Stat(a) => finish(
            sr::stat(&a.sr, &crate::agent::default_templates()?),
            a.json,
            |v, out| sr_text(v, out),
        ),
        SrCommand::List(a) => {
            let result = sr::list().map(|srs| serde_json::json!({ "srs": srs }));
            finish(result, a.json, |v, out| {
                writeln!(out, "{:<36}  {:<12}  PATH", "UUID", "HEALTH")?;
                for s in v["srs"].as_array().into_iter().flatten() {
                    writeln!(
                        out,
                        "{:<36}  {:<12}  {}",
                        s["uuid"].as_str().unwrap_or("?"),
                        s["health"].as_str().unwrap_or("?"),
                        s["path"].as_str().unwrap_or("?")
                    )?;
                }
                Ok(())
            })
        }
        SrCommand::Grow(a) => finish(sr::grow(&a.on.sr, a.by as u64), a.on.json, |v, out| {
            sr_text(v, out)
        }),
        SrCommand::Monitor(a) => monitor(a),
        SrCommand::Serve(a) => serve(a),
        SrCommand::Origin(a) => origin(a),
        SrCommand::Check(a) => {
            let exe = std::env::current_exe()?;
            let result = sr::check(
                &a.on.sr,
                a.repair,
                &crate::agent::default_templates()?,
                &exe,
            );
            let unclean = matches!(&result, Ok(r) if !r.clean);
            let status = finish(result, a.on.json, |r, out| {
                for f in &r.findings {
                    writeln!(out, "{}: {}", f.kind, f.message)?;
                }
                for done in &r.repaired {
                    writeln!(out, "repaired: {done}")?;
                }
                if r.clean {
                    writeln!(out, "SR {} is clean", r.sr)?;
                }
                Ok(())
            })?;
            // A check that finds problems says so in its status, as `image check` does.
            Ok(if status == 0 && unclean { 3 } else { status })
        }
    }
}
