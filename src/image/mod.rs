//! `thinline image`: inspect, map, check and convert disk images (qcow2, VHD, VMDK,
//! raw) without a server. Everything here opens images strictly read-only, but for
//! `check --repair`, `create` and `resize` (in `write`).

mod write;

use std::fs::{File, OpenOptions as FsOpenOptions};
use std::io::{IsTerminal, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use serde::Serialize;
use thinline_format::{
    BackingOpener, Fetch, Format, Image, LayerInfo, OpenOptions, UndeclaredBacking,
};

use crate::size::parse_size;

/// Inspect, map, check, convert, create and resize disk images.
#[derive(Debug, Args)]
pub struct ImageArgs {
    #[command(subcommand)]
    command: ImageCommand,
}

#[derive(Debug, Subcommand)]
enum ImageCommand {
    Info(InfoArgs),
    Map(MapArgs),
    Check(CheckArgs),
    Convert(ConvertArgs),
    Create(write::CreateArgs),
    Resize(write::ResizeArgs),
}

/// A format name for `--format` (qemu's `vpc` is accepted for VHD).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    /// Detect from the content (the top image only; backing formats come from the image).
    Auto,
    Raw,
    Qcow2,
    #[value(alias = "vpc")]
    Vhd,
    Vmdk,
}

impl FormatArg {
    /// The forced format, or `None` to detect.
    pub fn format(self) -> Option<Format> {
        match self {
            FormatArg::Auto => None,
            FormatArg::Raw => Some(Format::Raw),
            FormatArg::Qcow2 => Some(Format::Qcow2),
            FormatArg::Vhd => Some(Format::Vhd),
            FormatArg::Vmdk => Some(Format::Vmdk),
        }
    }
}

/// `--undeclared-backing` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum UndeclaredBackingArg {
    /// Refuse the chain (formats are never guessed from content).
    Refuse,
    /// Treat the backing file as raw, as old qemu did.
    Raw,
}

/// Options shared by every command that opens an image.
#[derive(Debug, Clone, Args)]
pub struct OpenArgs {
    /// The top image's format; backing formats always come from the images themselves.
    #[arg(short = 'f', long, value_enum, value_name = "FORMAT", default_value_t = FormatArg::Auto)]
    pub format: FormatArg,

    /// What to do with a qcow2 backing file whose format the overlay does not record.
    #[arg(long, value_enum, value_name = "POLICY", default_value_t = UndeclaredBackingArg::Refuse)]
    pub undeclared_backing: UndeclaredBackingArg,

    /// Memory for metadata tables (L2 tables, bitmaps, grain tables) per image chain, in
    /// bytes or with a K, M or G suffix; least recently used tables are dropped beyond it.
    #[arg(long, value_name = "SIZE", default_value = "32M", value_parser = parse_size)]
    pub metadata_cache: usize,

    /// Follow backing files that images name by URI when the URI starts with PREFIX
    /// (repeatable; e.g. `https://templates.example.com/`). Without it, an image naming a
    /// URI as its backing is refused: an image alone never makes the host fetch from an
    /// address it chose. The prefix must end at a `/` (or be the whole URI), URIs with
    /// `..` segments are refused, and so are `socket=`, `tls-certificates=` and
    /// `tls-psk-file=` after the prefix (the host's sockets and keys are the prefix's).
    #[arg(long = "allow-backing", value_name = "PREFIX")]
    pub allow_backing: Vec<String>,

    #[command(flatten)]
    pub remote: crate::remote::RemoteArgs,
}

impl OpenArgs {
    /// The library options these arguments ask for.
    pub fn options(&self) -> OpenOptions {
        OpenOptions {
            format: self.format.format(),
            undeclared_backing: match self.undeclared_backing {
                UndeclaredBackingArg::Refuse => UndeclaredBacking::Refuse,
                UndeclaredBackingArg::Raw => UndeclaredBacking::Raw,
            },
            cache_budget: self.metadata_cache,
            backing_opener: self.backing_opener(),
            ..OpenOptions::default()
        }
    }

    /// Opens backing URIs under the `--allow-backing` prefixes through the template
    /// sources (same remote options as the image itself).
    fn backing_opener(&self) -> Option<BackingOpener> {
        if self.allow_backing.is_empty() {
            return None;
        }
        let prefixes = self.allow_backing.clone();
        let remote = self.remote.clone();
        Some(BackingOpener(std::sync::Arc::new(move |name: &str| {
            if !backing_allowed(&prefixes, name) {
                return None;
            }
            let fail = |e: String| thinline_format::Error::chain(name, e);
            let opened = (|| -> anyhow::Result<_> {
                let source = thinline_source::parse(name)?;
                let runtime = crate::remote::runtime()?;
                Ok(source.open(&remote.config()?, runtime.handle())?)
            })();
            Some(opened.map_err(|e| fail(format!("{e:#}"))))
        })))
    }
}

/// Whether `name` is a URI under one of `prefixes`: the prefix ends at a `/` of the name
/// (or is all of it), and the name has no `..` segment to climb out of it.
pub fn backing_allowed(prefixes: &[String], name: &str) -> bool {
    if !thinline_format::storage::looks_like_uri(name)
        || name.split(['/', '?', '#']).any(|seg| seg == "..")
    {
        return false;
    }
    prefixes.iter().any(|p| {
        name.strip_prefix(p.as_str()).is_some_and(|rest| {
            (p.ends_with('/') || rest.is_empty() || rest.starts_with('/'))
                && !names_a_local_path(rest)
        })
    })
}

/// Query parameters that make the NBD client open a local path: a unix socket, TLS
/// certificates, a pre-shared key file.
const LOCAL_PATH_PARAMETERS: [&str; 3] = ["socket", "tls-certificates", "tls-psk-file"];

/// Whether the part of a backing URI after its allowed prefix sets a parameter that
/// names a local path: an image may choose what to read under the prefix, never which
/// socket or key of the host's is used (that must be in the prefix itself).
fn names_a_local_path(rest: &str) -> bool {
    rest.split(['?', '&']).skip(1).any(|param| {
        let key = param.split_once('=').map_or(param, |(k, _)| k);
        LOCAL_PATH_PARAMETERS.contains(&key)
    })
}

/// The image a read-only subcommand opens, and how to open it.
#[derive(Debug, Args)]
struct ImageArg {
    #[command(flatten)]
    open: OpenArgs,
    /// The image: a path, a file:///path URI or a remote URI (http(s)://, s3://, nfs://,
    /// nbd://, nbd+unix://, or a scheme with a handler).
    image: String,
}

impl ImageArg {
    fn open(&self) -> anyhow::Result<Image> {
        open(&self.image, &self.open)
    }
}

/// Show an image's format, size, features and whole backing chain.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  thinline image info disk.qcow2\n  thinline image info --json template.vmdk | jq '.chain[].path'"
)]
struct InfoArgs {
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    image: ImageArg,
}

/// Show where an image's data lives, like `qemu-img map`.
///
/// Each run has a start, a length, a depth (0 = the top image, 1 = its backing, …; for
/// ranges present nowhere, the bottom of the chain), whether it is present in any
/// layer, reads as zeroes, holds data, is compressed, and the host offset of
/// uncompressed data.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  thinline image map disk.qcow2\n  thinline image map --json overlay.qcow2 > map.json"
)]
struct MapArgs {
    /// Print a JSON array like `qemu-img map --output=json`.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    image: ImageArg,
}

/// Check an image's metadata for consistency (read-only, nothing is repaired).
///
/// Exit status: 0 clean, 1 the check could not run, 3 only leaks or other harmless
/// findings, 4 errors that affect data. With --repair (qcow2), refcounts are rebuilt
/// from the references (leaked clusters are freed), COPIED flags and the dirty bit
/// fixed, then the image is checked again: the status is that of the second check.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  thinline image check disk.qcow2\n  thinline image check --json child.vhd\n  thinline image check --repair clone.qcow2"
)]
struct CheckArgs {
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Repair a local qcow2 image (taking its lock): rebuild refcounts, free leaks.
    #[arg(long)]
    repair: bool,
    #[command(flatten)]
    image: ImageArg,
}

/// Output formats of `image convert`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OutputFormat {
    Raw,
}

/// Convert an image (and its backing chain) to a sparse raw file.
///
/// Zero and unallocated ranges, and data blocks that hold only zeroes, are left as
/// holes in OUTPUT.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  thinline image convert -O raw template.qcow2 template.raw\n  thinline image convert -O raw --progress disk.vmdk /srv/disk.img"
)]
struct ConvertArgs {
    /// Output format.
    #[arg(short = 'O', long = "output-format", value_enum, value_name = "FORMAT")]
    output_format: OutputFormat,
    /// Show progress on stderr.
    #[arg(short, long)]
    progress: bool,
    /// Print a JSON summary on stdout when done.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    open: OpenArgs,
    /// The image to read: a path, a file:///path URI or a remote URI.
    image: String,
    /// The file to write (created or truncated).
    output: PathBuf,
}

/// Exit status of `thinline image check` when only warnings were found.
pub const CHECK_WARNINGS: u8 = 3;
/// Exit status of `thinline image check` when errors were found.
pub const CHECK_ERRORS: u8 = 4;

/// Runs an `image` subcommand; returns the exit status.
pub fn run(args: ImageArgs) -> anyhow::Result<u8> {
    match args.command {
        ImageCommand::Info(a) => info(&a).map(|()| 0),
        ImageCommand::Map(a) => map(&a).map(|()| 0),
        ImageCommand::Check(a) => check(&a),
        ImageCommand::Convert(a) => convert(&a).map(|()| 0),
        ImageCommand::Create(a) => write::create(&a).map(|()| 0),
        ImageCommand::Resize(a) => write::resize(&a).map(|()| 0),
    }
}

pub fn open(location: &str, args: &OpenArgs) -> anyhow::Result<Image> {
    let source = thinline_source::parse(location)?;
    if let thinline_source::Source::File(path) = &source {
        return Ok(Image::open(path, &args.options())?);
    }
    let runtime = crate::remote::runtime()?;
    let storage = source.open(&args.remote.config()?, runtime.handle())?;
    Ok(Image::open_storage(storage, &args.options())?)
}

#[derive(Debug, Serialize)]
struct InfoReport {
    image: String,
    format: Format,
    virtual_size: u64,
    chain: Vec<LayerInfo>,
}

/// Bytes for people: `20 GiB`, `1.5 KiB`.
pub(crate) fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        return format!("{bytes} B");
    }
    let value = format!("{value:.2}");
    format!(
        "{} {}",
        value.trim_end_matches('0').trim_end_matches('.'),
        UNITS[unit]
    )
}

fn info(args: &InfoArgs) -> anyhow::Result<()> {
    let image = args.image.open()?;
    let chain = image.info();
    let report = InfoReport {
        image: chain[0].path.clone(),
        format: chain[0].format,
        virtual_size: image.size(),
        chain,
    };
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
        return Ok(());
    }
    for (depth, layer) in report.chain.iter().enumerate() {
        if depth > 0 {
            writeln!(out)?;
            writeln!(out, "backing image (depth {depth}):")?;
        }
        let sub = layer
            .subformat
            .as_deref()
            .map(|s| format!(" ({s})"))
            .unwrap_or_default();
        writeln!(out, "image:          {}", layer.path)?;
        writeln!(out, "format:         {}{sub}", layer.format)?;
        let size = human_size(layer.virtual_size);
        writeln!(out, "virtual size:   {size} ({} bytes)", layer.virtual_size)?;
        writeln!(out, "file size:      {} bytes", layer.file_size)?;
        if let Some(c) = layer.cluster_size {
            writeln!(out, "cluster size:   {c}")?;
        }
        if !layer.features.is_empty() {
            writeln!(out, "features:       {}", layer.features.join(", "))?;
        }
        writeln!(
            out,
            "dirty:          {}",
            if layer.dirty { "yes" } else { "no" }
        )?;
        writeln!(
            out,
            "corrupt:        {}",
            if layer.corrupt {
                "yes (served read-only)"
            } else {
                "no"
            }
        )?;
        for (k, v) in &layer.details {
            writeln!(out, "{:<15} {v}", format!("{k}:"))?;
        }
    }
    Ok(())
}

#[derive(Debug, Serialize)]
struct MapRun {
    start: u64,
    length: u64,
    depth: u32,
    present: bool,
    zero: bool,
    data: bool,
    compressed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    file: Option<String>,
}

fn map(args: &MapArgs) -> anyhow::Result<()> {
    let image = args.image.open()?;
    let bottom = image.layers().len() as u32 - 1;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if args.json {
        write!(out, "[")?;
    } else {
        writeln!(
            out,
            "{:<20} {:<20} {:<6} {:<24} {:<20} File",
            "Start", "Length", "Depth", "State", "Offset"
        )?;
    }
    let mut first = true;
    let mut pos = 0;
    while pos < image.size() {
        let entries = image.map_entries(pos, image.size() - pos, Fetch::Allowed, 1 << 16)?;
        for e in &entries {
            let run = MapRun {
                start: e.start,
                length: e.length,
                depth: if e.depth > 0 { e.depth - 1 } else { bottom },
                present: e.depth > 0,
                zero: e.zero,
                data: !e.hole,
                compressed: e.compressed,
                offset: e.location.map(|(_, _, o)| o),
                file: e
                    .location
                    .map(|(l, f, _)| image.layers()[l].files()[f].name().to_owned()),
            };
            if args.json {
                write!(
                    out,
                    "{}\n{}",
                    if first { "" } else { "," },
                    serde_json::to_string(&run)?
                )?;
            } else {
                let state = match (run.present, run.data, run.zero, run.compressed) {
                    (false, ..) => "unallocated",
                    (true, _, _, true) => "data, compressed",
                    (true, true, true, _) => "data, reads as zero",
                    (true, true, false, _) => "data",
                    (true, false, true, _) => "zero",
                    (true, false, false, _) => "hole",
                };
                writeln!(
                    out,
                    "{:<20} {:<20} {:<6} {:<24} {:<20} {}",
                    run.start,
                    run.length,
                    run.depth,
                    state,
                    run.offset
                        .map(|o| o.to_string())
                        .unwrap_or_else(|| "-".into()),
                    run.file.as_deref().unwrap_or("-")
                )?;
            }
            first = false;
        }
        pos += entries.iter().map(|e| e.length).sum::<u64>();
    }
    if args.json {
        writeln!(out, "]")?;
    }
    out.flush()?;
    Ok(())
}

#[derive(Debug, Serialize)]
struct LayerCheck {
    path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    failure: Option<String>,
    errors: Vec<String>,
    warnings: Vec<String>,
    stats: Vec<(String, u64)>,
}

fn check(args: &CheckArgs) -> anyhow::Result<u8> {
    let repaired = if args.repair {
        let source = thinline_source::parse(&args.image.image)?;
        let thinline_source::Source::File(path) = &source else {
            bail!(
                "--repair works on local images only, not {}",
                source.shown()
            );
        };
        let report = write::repair(path)?;
        if !args.json {
            println!("repaired {}: {report}", path.display());
        }
        Some(report)
    } else {
        None
    };
    let image = args.image.open()?;
    let mut layers = Vec::new();
    for (path, result) in image.check() {
        layers.push(match result {
            Ok(r) => LayerCheck {
                path,
                failure: None,
                errors: r.errors,
                warnings: r.warnings,
                stats: r.stats,
            },
            Err(e) => LayerCheck {
                path,
                failure: Some(e.detail()),
                errors: Vec::new(),
                warnings: Vec::new(),
                stats: Vec::new(),
            },
        });
    }
    let errors: usize = layers.iter().map(|l| l.errors.len()).sum();
    let warnings: usize = layers.iter().map(|l| l.warnings.len()).sum();
    let failed = layers.iter().any(|l| l.failure.is_some());
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(
            &mut out,
            &serde_json::json!({ "image": layers[0].path, "clean": errors == 0 && warnings == 0 && !failed, "errors": errors, "warnings": warnings, "repaired": repaired, "layers": layers }),
        )?;
        writeln!(out)?;
    } else {
        for l in &layers {
            writeln!(out, "{}:", l.path)?;
            if let Some(f) = &l.failure {
                writeln!(out, "  check failed: {f}")?;
            }
            for e in &l.errors {
                writeln!(out, "  ERROR: {e}")?;
            }
            for w in &l.warnings {
                writeln!(out, "  warning: {w}")?;
            }
            for (k, v) in &l.stats {
                writeln!(out, "  {k}: {v}")?;
            }
            if l.failure.is_none() && l.errors.is_empty() && l.warnings.is_empty() {
                writeln!(out, "  no errors found")?;
            }
        }
    }
    Ok(if failed {
        1
    } else if errors > 0 {
        CHECK_ERRORS
    } else if warnings > 0 {
        CHECK_WARNINGS
    } else {
        0
    })
}

/// Bytes read and written per step of `convert`.
const CONVERT_CHUNK: u64 = 4 << 20;
/// Data blocks of this size that hold only zeroes are left as holes.
const SPARSE_BLOCK: usize = 4096;

#[derive(Debug, Serialize)]
struct ConvertReport {
    input: String,
    output: PathBuf,
    virtual_size: u64,
    bytes_written: u64,
    seconds: f64,
}

fn convert(args: &ConvertArgs) -> anyhow::Result<()> {
    let OutputFormat::Raw = args.output_format;
    let image = open(&args.image, &args.open)?;
    let size = image.size();
    if let Ok(meta) = std::fs::metadata(&args.output) {
        for layer in image.layers() {
            for file in layer.files() {
                if let Some(f) = file.data_path().file() {
                    let m = f.metadata()?;
                    if (m.dev(), m.ino()) == (meta.dev(), meta.ino()) {
                        bail!(
                            "{} is part of the image being converted ({}); refusing to overwrite it",
                            args.output.display(),
                            file.name()
                        );
                    }
                }
            }
        }
    }
    let out = FsOpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&args.output)
        .with_context(|| format!("cannot create {}", args.output.display()))?;
    let started = Instant::now();
    let mut written = 0u64;
    let mut buf = vec![0u8; CONVERT_CHUNK as usize];
    let mut pos = 0u64;
    let mut last_percent = u64::MAX;
    let show = args.progress;
    let tty = std::io::stderr().is_terminal();
    while pos < size {
        let len = CONVERT_CHUNK.min(size - pos);
        let mut extents = Vec::new();
        image.map(pos, len, Fetch::Allowed, usize::MAX, &mut extents)?;
        let mut at = pos;
        for extent in &extents {
            if !extent.is_zero() {
                let chunk = &mut buf[..extent.length as usize];
                image.read_extent(extent, chunk)?;
                written += write_sparse(&out, chunk, at)
                    .with_context(|| format!("cannot write {}", args.output.display()))?;
            }
            at += extent.length;
        }
        pos += len;
        if show {
            let percent = pos * 100 / size.max(1);
            if percent != last_percent {
                last_percent = percent;
                if tty {
                    eprint!("\r    ({percent}/100%)");
                } else if percent.is_multiple_of(10) {
                    eprintln!("converting: {percent}%");
                }
            }
        }
    }
    if show && tty {
        eprintln!();
    }
    out.set_len(size)
        .with_context(|| format!("cannot size {}", args.output.display()))?;
    out.sync_all()
        .with_context(|| format!("cannot sync {}", args.output.display()))?;
    if args.json {
        let report = ConvertReport {
            input: image.layers()[0].files()[0].name().to_owned(),
            output: args.output.clone(),
            virtual_size: size,
            bytes_written: written,
            seconds: started.elapsed().as_secs_f64(),
        };
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(())
}

/// Writes the non-zero blocks of `data` at `offset`; returns the bytes written.
fn write_sparse(out: &File, data: &[u8], offset: u64) -> std::io::Result<u64> {
    let mut written = 0;
    let mut run_start: Option<usize> = None;
    let mut i = 0;
    while i < data.len() {
        let end = (i + SPARSE_BLOCK).min(data.len());
        let zero = data[i..end].iter().all(|&b| b == 0);
        match (zero, run_start) {
            (false, None) => run_start = Some(i),
            (true, Some(s)) => {
                out.write_all_at(&data[s..i], offset + s as u64)?;
                written += (i - s) as u64;
                run_start = None;
            }
            _ => {}
        }
        i = end;
    }
    if let Some(s) = run_start {
        out.write_all_at(&data[s..], offset + s as u64)?;
        written += (data.len() - s) as u64;
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backing_uris_are_allowed_only_under_a_prefix_that_ends_at_a_slash() {
        let p = vec![
            "https://t.example.com/templates".to_owned(),
            "nbd://h/".to_owned(),
        ];
        assert!(backing_allowed(
            &p,
            "https://t.example.com/templates/a.qcow2"
        ));
        assert!(backing_allowed(&p, "https://t.example.com/templates"));
        assert!(backing_allowed(&p, "nbd://h/export"));
        // Which socket or key of the host's is used is the prefix's choice, not the image's.
        let tls = vec![
            "nbds://h/".to_owned(),
            "nbds+unix:///t?socket=/run/t.sock&tls-certificates=/etc/pki/t".to_owned(),
        ];
        assert!(backing_allowed(&tls, "nbds://h/export"));
        assert!(!backing_allowed(
            &tls,
            "nbds://h/x?tls-psk-file=/root/k.psk"
        ));
        assert!(!backing_allowed(
            &tls,
            "nbds://h/x?a=b&tls-certificates=/home/u/pki"
        ));
        assert!(!backing_allowed(&p, "nbd://h/x?socket=/run/other.sock"));
        // A prefix that is the whole URI may carry them.
        assert!(backing_allowed(
            &tls,
            "nbds+unix:///t?socket=/run/t.sock&tls-certificates=/etc/pki/t"
        ));
        assert!(!backing_allowed(
            &p,
            "https://t.example.com/templates2/a.qcow2"
        ));
        assert!(!backing_allowed(
            &p,
            "https://t.example.com/templates/../etc/x"
        ));
        assert!(!backing_allowed(
            &p,
            "https://t.example.com.evil/templates/a"
        ));
        assert!(!backing_allowed(&p, "/var/lib/templates/a.qcow2"));
        assert!(!backing_allowed(
            &[],
            "https://t.example.com/templates/a.qcow2"
        ));
    }

    #[test]
    fn sizes_are_human() {
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(64 << 20), "64 MiB");
        assert_eq!(human_size(1536), "1.5 KiB");
    }
}
