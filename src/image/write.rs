//! `thinline image create`, `image resize` and `image check --repair`: the commands
//! that write images. Each fills its options and calls the format library; writing
//! takes the image's lock, so they refuse an image qemu or `thinline serve -w` holds.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;
use serde::Serialize;
use thinline_format::qcow2::{self, CreateOptions};
use thinline_format::{Format, Image};

use super::{FormatArg, OpenArgs, UndeclaredBackingArg};
use crate::size::parse_size;

/// Create a qcow2 image, empty or as a thin overlay of a backing image.
///
/// With --backing, the new image reads everything it does not hold from BACKING: a
/// path (relative paths are relative to OUT's directory, as qemu resolves them) or a
/// URI any `serve` accepts. The backing's format is recorded in the image (detected
/// from its content unless --backing-format is given), so qemu opens the overlay too.
/// SIZE defaults to the backing's size. OUT must not exist.
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  # A 20 GiB empty image
  thinline image create -f qcow2 disk.qcow2 20G

  # A thin clone of a template, served read-write
  thinline image create -f qcow2 --backing template.qcow2 --backing-format qcow2 clone.qcow2
  thinline serve -w --socket /run/thinline/clone.sock clone.qcow2

  # An overlay of a remote template, with subclusters, for scripts
  thinline image create -f qcow2 --extended-l2 --json \\
      --backing https://images.example.com/debian-12.qcow2 vm1.qcow2")]
pub struct CreateArgs {
    /// The format to create (only qcow2 is written).
    #[arg(short = 'f', long, value_name = "FORMAT", default_value = "qcow2")]
    format: String,
    /// The backing image: a path or a URI.
    #[arg(short = 'b', long, value_name = "URI_OR_PATH")]
    backing: Option<String>,
    /// The backing image's format (detected from its content if not given).
    #[arg(
        short = 'F',
        long,
        value_enum,
        value_name = "FORMAT",
        requires = "backing"
    )]
    backing_format: Option<FormatArg>,
    /// Cluster size: a power of two from 512 to 2M (default 64K).
    #[arg(long, value_name = "BYTES", default_value = "64K", value_parser = parse_size)]
    cluster_size: usize,
    /// Extended L2 entries: 32 subclusters per cluster, so small writes over a backing
    /// copy less (clusters of 16K or more).
    #[arg(long)]
    extended_l2: bool,
    /// Print one JSON object describing the new image.
    #[arg(long)]
    json: bool,
    /// How to reach a remote backing (credentials, timeouts).
    #[command(flatten)]
    remote: crate::remote::RemoteArgs,
    /// The image to create.
    output: PathBuf,
    /// Guest size in bytes or with a K, M, G or T suffix.
    #[arg(value_parser = parse_size)]
    size: Option<usize>,
}

#[derive(Debug, Serialize)]
struct Created {
    image: String,
    format: &'static str,
    virtual_size: u64,
    cluster_size: u64,
    extended_l2: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    backing: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    backing_format: Option<Format>,
}

/// Opens a backing named as it will be recorded in `output`.
fn open_backing(name: &str, output: &Path, open: &OpenArgs) -> anyhow::Result<Image> {
    let resolved =
        if thinline_format::storage::looks_like_uri(name) || Path::new(name).is_absolute() {
            name.to_owned()
        } else {
            output
                .parent()
                .unwrap_or(Path::new("."))
                .join(name)
                .display()
                .to_string()
        };
    super::open(&resolved, open).with_context(|| format!("cannot open the backing image {name}"))
}

/// Runs `image create`.
pub fn create(args: &CreateArgs) -> anyhow::Result<()> {
    if args.format != "qcow2" {
        bail!("only qcow2 images are created, not {:?}", args.format);
    }
    let open = OpenArgs {
        format: args.backing_format.unwrap_or(FormatArg::Auto),
        undeclared_backing: UndeclaredBackingArg::Refuse,
        metadata_cache: 32 << 20,
        allow_backing: Vec::new(),
        remote: args.remote.clone(),
    };
    let backing = match &args.backing {
        None => None,
        Some(name) => {
            let image = open_backing(name, &args.output, &open)?;
            let format = image.layers()[0].format();
            Some((name.clone(), format, image.size()))
        }
    };
    let size = match (args.size, &backing) {
        (Some(size), _) => size as u64,
        (None, Some((_, _, size))) => *size,
        (None, None) => bail!("give a SIZE (or a --backing to take its size from)"),
    };
    let options = CreateOptions {
        size,
        cluster_size: args.cluster_size as u64,
        extended_l2: args.extended_l2,
        backing: backing.as_ref().map(|(n, f, _)| (n.clone(), *f)),
    };
    qcow2::create(&args.output, &options).map_err(|e| anyhow::anyhow!(e.detail()))?;
    let created = Created {
        image: args.output.display().to_string(),
        format: "qcow2",
        virtual_size: size,
        cluster_size: options.cluster_size,
        extended_l2: options.extended_l2,
        backing: backing.as_ref().map(|b| b.0.clone()),
        backing_format: backing.as_ref().map(|b| b.1),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&created)?);
    } else {
        print!(
            "created {} (qcow2, {} bytes, {}-byte clusters{})",
            created.image,
            size,
            options.cluster_size,
            if options.extended_l2 {
                ", extended L2"
            } else {
                ""
            }
        );
        match &backing {
            Some((name, format, _)) => println!(" over {name} ({format})"),
            None => println!(),
        }
    }
    Ok(())
}

/// Change the guest size of a qcow2 image.
///
/// Growing makes the new tail read as zeroes, even where the backing image is longer.
/// Shrinking is refused unless nothing past the new end is allocated in the image
/// (discard it first). SIZE may be absolute or relative (+1G, -512M). The image is
/// locked while it is resized.
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  thinline image resize disk.qcow2 40G
  thinline image resize --json clone.qcow2 +10G")]
pub struct ResizeArgs {
    /// Print one JSON object with the old and new sizes.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    open: OpenArgs,
    /// The qcow2 image.
    image: PathBuf,
    /// The new size (bytes or K, M, G, T), or +SIZE / -SIZE relative to the current one.
    #[arg(allow_hyphen_values = true)]
    size: String,
}

/// Runs `image resize`.
pub fn resize(args: &ResizeArgs) -> anyhow::Result<()> {
    let (image, writer) = Image::open_writable(&args.image, &args.open.options())
        .map_err(|e| anyhow::anyhow!(e.detail()))?;
    let old = image.size();
    let new = match args.size.as_bytes().first() {
        Some(b'+') => {
            old.checked_add(parse_size(&args.size[1..]).map_err(anyhow::Error::msg)? as u64)
        }
        Some(b'-') => {
            old.checked_sub(parse_size(&args.size[1..]).map_err(anyhow::Error::msg)? as u64)
        }
        _ => Some(parse_size(&args.size).map_err(anyhow::Error::msg)? as u64),
    }
    .with_context(|| format!("{} is out of range for an image of {old} bytes", args.size))?;
    writer
        .resize(&image, new)
        .map_err(|e| anyhow::anyhow!(e.detail()))?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({ "image": args.image.display().to_string(), "old_size": old, "new_size": new })
        );
    } else {
        println!("resized {} from {old} to {new} bytes", args.image.display());
    }
    Ok(())
}

/// Runs `image check --repair` on a qcow2 image; returns the report as JSON.
pub fn repair(path: &Path) -> anyhow::Result<serde_json::Value> {
    let report = qcow2::repair(path).map_err(|e| anyhow::anyhow!(e.detail()))?;
    Ok(serde_json::to_value(report)?)
}
