//! Templates as the agent sees them: a location (path or URI) opened once at
//! `vdi introduce` for its format and size, and opened again when a clone's chain is
//! opened (the clone's qcow2 header names the template; the agent's own metadata,
//! never the header, decides what that name opens).
//!
//! A URI's credentials (user info, query) never go into `sr.json` or an image header:
//! those hold the URI as shown; the full URI is kept in `.thinline-sr/credentials.json`,
//! readable by its owner only.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use thinline_format::{BackingOpener, Format, Image, OpenOptions};
use thinline_source::{RemoteConfig, Source};
use tokio::runtime::Handle;
use uuid::Uuid;

use crate::store::DIR;
use crate::{Code, Error, Result};

const CREDENTIALS: &str = "credentials.json";

/// What opening a template found.
#[derive(Debug, Clone)]
pub struct Probed {
    /// The location as given, credentials included (absolute for a local path).
    pub full: String,
    /// The location without credentials.
    pub shown: String,
    pub format: Format,
    pub size: u64,
}

/// Opens templates: remote ones through `remote`, on the runtime behind `handle`.
/// Use it from a thread that is not one of that runtime's workers.
#[derive(Debug, Clone)]
pub struct Templates {
    pub remote: Arc<RemoteConfig>,
    pub handle: Handle,
}

fn unreachable(shown: &str, reason: impl std::fmt::Display) -> Error {
    Error::new(
        Code::TemplateUnreachable,
        format!("template {shown}: {reason}"),
    )
}

impl Templates {
    /// The location `spec` as it will be recorded (a local path made absolute).
    pub fn locate(spec: &str) -> Result<(Source, String)> {
        let source = thinline_source::parse(spec)
            .map_err(|e| Error::new(Code::InvalidArgument, e.to_string()))?;
        match source {
            Source::File(path) => {
                let abs = std::path::absolute(&path)
                    .map_err(|e| Error::io(format!("cannot resolve {}", path.display()), &e))?;
                let full = abs.display().to_string();
                Ok((Source::File(abs), full))
            }
            other => Ok((other, spec.to_owned())),
        }
    }

    /// Opens `spec` as an image (its own chain included).
    pub fn open(&self, spec: &str) -> Result<(Image, Probed)> {
        let (source, full) = Self::locate(spec)?;
        let shown = source.shown();
        let options = OpenOptions::default();
        let image = match &source {
            Source::File(path) => Image::open(path, &options),
            _ => {
                let storage = source
                    .open(&self.remote, &self.handle)
                    .map_err(|e| unreachable(&shown, e))?;
                Image::open_storage(storage, &options)
            }
        }
        .map_err(|e| unreachable(&shown, e.detail()))?;
        let probed = Probed {
            full,
            shown,
            format: image.layers()[0].format(),
            size: image.size(),
        };
        Ok((image, probed))
    }

    /// Opens `spec` for its format and size.
    pub fn probe(&self, spec: &str) -> Result<Probed> {
        Ok(self.open(spec)?.1)
    }

    /// A backing opener for a chain of the SR (see [`chain_opener`]), templates opened
    /// straight from their recorded location.
    pub fn opener(&self, names: BTreeMap<String, String>) -> BackingOpener {
        let remote = self.remote.clone();
        let handle = self.handle.clone();
        chain_opener(names, move |name, full| {
            thinline_source::parse(full)
                .and_then(|s| s.open(&remote, &handle))
                .map_err(|e| thinline_format::Error::chain(name, e.to_string()))
        })
    }
}

/// A backing opener for a chain of the SR: the templates named in `names` (as shown
/// in a header → full location) are opened by `open(shown, full)`; plain file names
/// (the SR's own layers and snapshots) are left to the image's directory; any other
/// name (a forgotten template, a path elsewhere) is refused.
pub fn chain_opener(
    names: BTreeMap<String, String>,
    open: impl Fn(&str, &str) -> thinline_format::Result<Arc<dyn thinline_format::Storage>>
    + Send
    + Sync
    + 'static,
) -> BackingOpener {
    BackingOpener(Arc::new(move |name: &str| {
        let Some(full) = names.get(name) else {
            if crate::store::plain_name(name) {
                return None;
            }
            return Some(Err(thinline_format::Error::chain(
                name,
                "not a template of this SR (forgotten?) nor a file of it",
            )));
        };
        Some(open(name, full))
    }))
}

/// The names the SR's templates have in overlay headers (their URIs as shown), and the
/// full locations they open: what a clone's chain may follow, and nothing else.
pub fn header_names(sr: &crate::store::Sr) -> Result<BTreeMap<String, String>> {
    let creds = credentials(&sr.path)?;
    Ok(sr
        .md
        .vdis
        .iter()
        .filter(|v| v.is_template())
        .filter_map(|v| {
            let shown = v.uri.clone()?;
            let full = creds.get(&v.uuid).cloned().unwrap_or_else(|| shown.clone());
            Some((shown, full))
        })
        .collect())
}

/// The full locations of the SR's templates whose URI carries credentials.
pub fn credentials(sr: &Path) -> Result<BTreeMap<Uuid, String>> {
    crate::store::read_json(&sr.join(DIR).join(CREDENTIALS))
}

/// Replaces the credentials file (mode 0600) with `all`.
pub fn save_credentials(sr: &Path, all: &BTreeMap<Uuid, String>) -> Result<()> {
    crate::store::write_json(&sr.join(DIR).join(CREDENTIALS), all, 0o600)
}
