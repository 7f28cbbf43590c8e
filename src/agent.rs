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
    writeln!(
        out,
        "space:       {} free of {}, {} used by {} VDIs",
        crate::image::human_size(v.free_space),
        crate::image::human_size(v.total_space),
        crate::image::human_size(v.physical_utilisation),
        v.vdi_count
    )?;
    writeln!(out, "health:      {}", v.health)
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
    Ok(())
}
