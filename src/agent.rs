//! What `thinline sr` and `thinline vdi` share: printing a result (one JSON object with
//! `--json`, text otherwise), printing an agent error with its code, and the exit
//! status each code has (see `docs/sr-agent.md`).

use std::io::Write;

use clap::Args;
use serde::Serialize;
use thinline_sr::Error;
use thinline_sr::model::{SrView, VdiView};

/// The SR a command acts on, and how it prints.
#[derive(Debug, Args)]
pub struct OnSr {
    /// The SR: its directory, or its UUID (see `sr list`).
    #[arg(long, value_name = "SR")]
    pub sr: String,
    /// Print one JSON object (failures too: {"error": {"code", "message"}}).
    #[arg(long)]
    pub json: bool,
}

/// Prints `result` (or its error) and returns the exit status.
pub fn finish<T: Serialize>(
    result: thinline_sr::Result<T>,
    json: bool,
    text: impl FnOnce(&T, &mut dyn Write) -> std::io::Result<()>,
) -> anyhow::Result<u8> {
    match result {
        Ok(value) => {
            crate::print_report(&value, json, |out| text(&value, out))?;
            Ok(0)
        }
        Err(e) => {
            print_error(&e, json)?;
            Ok(e.code.exit_status())
        }
    }
}

/// `{"error": {"code", "message"}}` on stdout with `--json`, a line on stderr without.
pub fn print_error(e: &Error, json: bool) -> anyhow::Result<()> {
    if json {
        let mut out = std::io::stdout().lock();
        serde_json::to_writer(
            &mut out,
            &serde_json::json!({ "error": { "code": e.code.as_str(), "message": e.message } }),
        )?;
        writeln!(out)?;
        out.flush()?;
    } else {
        eprintln!("thinline: error: {} ({})", e.message, e.code.as_str());
    }
    Ok(())
}

/// One SR as text.
pub fn sr_text(v: &SrView, out: &mut dyn Write) -> std::io::Result<()> {
    writeln!(out, "uuid:        {}", v.uuid)?;
    writeln!(out, "name-label:  {}", v.name_label)?;
    writeln!(out, "path:        {}", v.path)?;
    if let Some(vg) = &v.vg {
        writeln!(out, "vg:          {vg}")?;
    }
    if let Some(h) = v.hydrate {
        let h = match h {
            thinline_sr::model::Hydrate::Background => "background",
            thinline_sr::model::Hydrate::OnPivot => "on-pivot (vdi pivot)",
        };
        writeln!(out, "hydrate:     {h}")?;
    }
    writeln!(
        out,
        "space:       {} free of {}, {} used by {} VDIs",
        crate::image::human_size(v.free_space),
        crate::image::human_size(v.total_space),
        crate::image::human_size(v.physical_utilisation),
        v.vdi_count
    )?;
    writeln!(out, "health:      {}", v.health)?;
    if let Some(p) = &v.pool {
        writeln!(
            out,
            "pool:        data {:.1}% used, metadata {:.1}% used, {:?}{}",
            p.data_percent,
            p.metadata_percent,
            p.mode,
            if p.needs_check { ", needs check" } else { "" }
        )?;
    }
    for t in &v.template_errors {
        writeln!(out, "template {} ({}): {}", t.uuid, t.uri, t.error)?;
    }
    Ok(())
}

/// The header of a VDI table.
pub fn vdi_header(out: &mut dyn Write) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<36}  {:<8}  {:>10}  {:>10}  NAME-LABEL",
        "UUID", "TYPE", "SIZE", "USED"
    )
}

/// One VDI as a table row.
pub fn vdi_row(v: &VdiView, out: &mut dyn Write) -> std::io::Result<()> {
    let kind = match v.kind {
        thinline_sr::VdiType::Template => "template",
        thinline_sr::VdiType::Disk => "disk",
        thinline_sr::VdiType::Snapshot => "snapshot",
        thinline_sr::VdiType::Layer => "layer",
    };
    writeln!(
        out,
        "{:<36}  {:<8}  {:>10}  {:>10}  {}",
        v.uuid,
        kind,
        crate::image::human_size(v.virtual_size),
        crate::image::human_size(v.physical_utilisation),
        v.name_label
    )
}

/// One VDI as text.
pub fn vdi_text(v: &VdiView, out: &mut dyn Write) -> std::io::Result<()> {
    vdi_header(out)?;
    vdi_row(v, out)?;
    if let Some(uri) = &v.uri {
        writeln!(out, "template: {uri}")?;
    }
    if let Some(file) = &v.file {
        writeln!(out, "file: {file}")?;
    }
    if let Some(parent) = &v.parent {
        writeln!(out, "parent: {parent}")?;
    }
    if let Some(origin) = &v.origin {
        writeln!(out, "origin: {origin}")?;
    }
    if let Some(error) = &v.template_error {
        writeln!(out, "template cannot be read: {error}")?;
    }
    Ok(())
}

/// A flag Ctrl-C (SIGINT) sets, for long operations that stop cleanly between steps.
pub fn interrupted_on_ctrl_c() -> anyhow::Result<std::sync::Arc<std::sync::atomic::AtomicBool>> {
    let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let set = flag.clone();
    let runtime = crate::remote::runtime()?;
    let _enter = runtime.enter();
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    runtime.spawn(async move {
        if sigint.recv().await.is_some() {
            set.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    });
    Ok(flag)
}

/// How a task's progress is shown: JSON records on stderr with `--json`, a line that
/// updates itself when stderr is a terminal, nothing otherwise.
pub fn progress_reporter(json: bool) -> impl FnMut(&str, f64) {
    use std::io::IsTerminal;
    let tty = std::io::stderr().is_terminal();
    let mut shown = -1i64;
    move |task: &str, done: f64| {
        let percent = (done * 100.0).floor() as i64;
        if percent == shown {
            return;
        }
        shown = percent;
        let mut err = std::io::stderr().lock();
        if json {
            let _ = writeln!(
                err,
                "{}",
                serde_json::json!({ "task": task, "progress": done })
            );
        } else if tty {
            let _ = write!(err, "\rtask {task}: {percent:3}% (Ctrl-C cancels)");
            let _ = err.flush();
        }
    }
}

/// Ends a progress line on a terminal.
pub fn end_progress(json: bool) {
    use std::io::IsTerminal;
    if !json && std::io::stderr().is_terminal() {
        eprintln!();
    }
}

/// Templates opened with the default remote settings (commands that open a chain
/// only to merge or check it).
pub fn default_templates() -> anyhow::Result<thinline_sr::template::Templates> {
    Ok(thinline_sr::template::Templates {
        remote: std::sync::Arc::new(thinline_source::RemoteConfig::default()),
        handle: crate::remote::runtime()?.handle().clone(),
    })
}
