//! Opening a template location as an export: location → format (given, or detected
//! from the content) → image chain → export. One composition for `thinline serve` and,
//! next, the agent's attach, so the rules live in one place: a detected raw file is
//! guarded against becoming another format, images and remote templates are served
//! read-only, and a template's identity is known for the caches keyed by it.

use std::sync::Arc;

use thinline_format::{FileStorage, Format, detect};
use tokio::runtime::Handle;

use thinline_nbd::export::Export;
use thinline_nbd::image::{ImageExport, ImageOptions};
use thinline_nbd::raw::{RawExport, RawOptions};

use crate::{RemoteConfig, Result, Source};

/// How to open a location.
#[derive(Debug, Clone, Default)]
pub struct OpenExportOptions {
    /// The top image's format; `None` detects it from the content.
    pub format: Option<Format>,
    /// Chain options (depth, metadata cache, undeclared backing formats); its `format`
    /// is replaced by the one given or detected.
    pub image: thinline_format::OpenOptions,
    /// How local raw files and block devices are served as they are (read-only or not,
    /// block sizes, the I/O engine; `guard_probed_format` is set here).
    pub raw: RawOptions,
    /// Open every location as a template (through the image layer, read-only, with an
    /// identity), as a copy-on-read cache's upstream needs, raw files included.
    pub as_template: bool,
    /// Serve a local qcow2 image read-write (`serve -w`); other image formats and
    /// remote templates are refused rather than served read-only.
    pub writable: bool,
}

/// An opened location, ready to be served.
#[derive(Debug)]
pub struct OpenedExport {
    /// The export.
    pub export: Arc<dyn Export>,
    /// The top image's format.
    pub format: Format,
    /// The files below the top image, top first.
    pub backing_chain: Vec<String>,
    /// The template's identity (every file of the chain); `None` for a raw file or
    /// device served as it is.
    pub identity: Option<String>,
}

/// Opens `source`. Remote sources read through `remote` (the defaults if `None`), on
/// the runtime behind `handle`; call this from a thread that is not one of its workers.
pub fn open_export(
    source: &Source,
    options: &OpenExportOptions,
    remote: Option<&Arc<RemoteConfig>>,
    handle: &Handle,
) -> Result<OpenedExport> {
    let shown = source.shown();
    let image_options = |format| ImageOptions {
        open: thinline_format::OpenOptions {
            format: Some(format),
            ..options.image.clone()
        },
        io_engine: options.raw.io_engine,
    };
    let template = |export: ImageExport, format| {
        let backing_chain = export.image().layers()[1..]
            .iter()
            .map(|l| l.files()[0].name().to_owned())
            .collect();
        let identity = Some(export.template_identity());
        OpenedExport {
            export: Arc::new(export),
            format,
            backing_chain,
            identity,
        }
    };
    match source {
        Source::File(path) => {
            let format = match options.format {
                Some(format) => format,
                None => detect(&*FileStorage::open(path)?)?,
            };
            if format == Format::Raw && !options.as_template {
                // A detected raw format must stay raw (see RawOptions).
                let raw = RawOptions {
                    guard_probed_format: options.format.is_none(),
                    ..options.raw.clone()
                };
                return Ok(OpenedExport {
                    export: Arc::new(RawExport::open(path, &raw)?),
                    format,
                    backing_chain: Vec::new(),
                    identity: None,
                });
            }
            if options.writable && !options.as_template {
                if format != Format::Qcow2 {
                    return Err(crate::Error::UnsupportedSource {
                        uri: shown.clone(),
                        reason: format!(
                            "only qcow2 images are served writable, and this is a {format} image; \
                             make a writable overlay with `thinline image create -f qcow2 --backing IMAGE`"
                        ),
                    });
                }
                let export = ImageExport::open_writable(path, &image_options(format))?;
                let mut opened = template(export, format);
                opened.identity = None;
                return Ok(opened);
            }
            let export = ImageExport::open(path, &image_options(format))?;
            if !options.raw.read_only && !options.as_template {
                tracing::info!(image = %shown, %format, "{format} images are served read-only");
            }
            Ok(template(export, format))
        }
        _ if options.writable && !options.as_template => Err(crate::Error::UnsupportedSource {
            uri: shown.clone(),
            reason: "remote templates are read-only; make a local writable overlay with \
                     `thinline image create -f qcow2 --backing URI`"
                .to_owned(),
        }),
        _ => {
            let default;
            let config = match remote {
                Some(config) => config,
                None => {
                    default = Arc::new(RemoteConfig::default());
                    &default
                }
            };
            let storage = source.open(config, handle)?;
            let format = match options.format {
                Some(format) => format,
                None => detect(&*storage)?,
            };
            let image = thinline_format::Image::open_storage(storage, &image_options(format).open)?;
            let export = ImageExport::from_image(image, options.raw.io_engine)?;
            if !options.raw.read_only && !options.as_template {
                tracing::info!(image = %shown, "remote templates are served read-only");
            }
            Ok(template(export, format))
        }
    }
}
