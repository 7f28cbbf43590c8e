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
use thinline_nbd::export::Export;
use thinline_source::open::{OpenExportOptions, open_export};
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

/// Why a template whose identity was `pinned` at introduce and is `now` may not be read
/// any more: `None` while it is the same object (or nothing was pinned).
pub fn changed(shown: &str, pinned: Option<&str>, now: &str) -> Option<String> {
    let pinned = pinned?;
    (pinned != now).then(|| {
        format!(
            "template {shown} changed since it was introduced (it was {pinned}, it is {now}): blocks not cached yet cannot be read"
        )
    })
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

    /// What was pinned of the object at `full` (`shown` in messages) when it is
    /// opened: its size and ETag, version or mtime (one small request, no reads of
    /// the image): recorded at introduce, and compared before a template is read.
    pub fn pin(&self, shown: &str, full: &str) -> Result<String> {
        let source = thinline_source::parse(full).map_err(|e| unreachable(shown, e))?;
        let storage = source
            .open(&self.remote, &self.handle)
            .map_err(|e| unreachable(shown, e))?;
        Ok(format!("size:{},{}", storage.size(), storage.identity()))
    }

    /// The template at `full` (`shown` in messages) as its copy-on-read cache reads
    /// it: its decoded bytes as an export, and the identity of every file of its chain
    /// (ETags, versions, mtimes), which keys the cache. `format`: the format recorded
    /// when it was introduced (its content is pinned by its identity), so that opening
    /// it again reads no data to detect it; `None` detects it.
    pub fn open_decoded(
        &self,
        shown: &str,
        full: &str,
        format: Option<thinline_format::Format>,
    ) -> Result<(Arc<dyn Export>, String)> {
        let source = thinline_source::parse(full).map_err(|e| unreachable(shown, e))?;
        let options = OpenExportOptions {
            as_template: true,
            format,
            ..OpenExportOptions::default()
        };
        let opened = open_export(&source, &options, Some(&self.remote), &self.handle)
            .map_err(|e| unreachable(shown, e))?;
        let identity = opened
            .identity
            .ok_or_else(|| unreachable(shown, "it has no identity to pin"))?;
        Ok((opened.export, identity))
    }

    /// Whether template `v` of the SR at `sr` can be opened now and is still the
    /// object that was introduced: `None` if so, else why not.
    pub fn trouble(&self, sr: &Path, v: &crate::model::VdiRecord) -> Option<String> {
        let shown = v.uri.as_deref()?;
        let full = match credentials(sr) {
            Ok(creds) => creds
                .get(&v.uuid)
                .cloned()
                .unwrap_or_else(|| shown.to_owned()),
            Err(e) => return Some(e.message),
        };
        match self.pin(shown, &full) {
            Err(e) => Some(e.message),
            Ok(now) => changed(shown, v.pin.as_deref(), &now),
        }
    }

    /// A backing opener for a chain of the SR (see [`chain_opener`]), templates opened
    /// straight from their recorded location.
    pub fn opener(&self, names: BTreeMap<String, TemplateRef>) -> BackingOpener {
        let remote = self.remote.clone();
        let handle = self.handle.clone();
        chain_opener(names, move |name, t| {
            thinline_source::parse(&t.full)
                .and_then(|s| s.open(&remote, &handle))
                .map_err(|e| thinline_format::Error::chain(name, e.to_string()))
        })
    }
}

/// A template as a clone's chain reaches it.
#[derive(Debug, Clone)]
pub struct TemplateRef {
    /// Its location, credentials included.
    pub full: String,
    /// Its identity when it was introduced (none for templates introduced before
    /// identities were recorded).
    pub identity: Option<String>,
    /// Its size when it was introduced.
    pub size: u64,
    /// What was pinned of the object when it was introduced (see [`Templates::pin`]).
    pub pin: Option<String>,
}

/// A backing opener for a chain of the SR: the templates named in `names` (as shown
/// in a header) are opened by `open(shown, template)`; plain file names
/// (the SR's own layers and snapshots) are left to the image's directory; any other
/// name (a forgotten template, a path elsewhere) is refused.
pub fn chain_opener(
    names: BTreeMap<String, TemplateRef>,
    open: impl Fn(&str, &TemplateRef) -> thinline_format::Result<Arc<dyn thinline_format::Storage>>
    + Send
    + Sync
    + 'static,
) -> BackingOpener {
    BackingOpener(Arc::new(move |name: &str| {
        let Some(template) = names.get(name) else {
            if crate::store::plain_name(name) {
                return None;
            }
            return Some(Err(thinline_format::Error::chain(
                name,
                "not a template of this SR (forgotten?) nor a file of it",
            )));
        };
        Some(open(name, template))
    }))
}

/// The names the SR's templates have in overlay headers (their URIs as shown), and
/// what they open: what a clone's chain may follow, and nothing else.
pub fn header_names(sr: &crate::store::Sr) -> Result<BTreeMap<String, TemplateRef>> {
    let creds = credentials(&sr.path)?;
    Ok(sr
        .md
        .vdis
        .iter()
        .filter(|v| v.is_template())
        .filter_map(|v| {
            let shown = v.uri.clone()?;
            let full = creds.get(&v.uuid).cloned().unwrap_or_else(|| shown.clone());
            let identity = v.identity.clone();
            let (size, pin) = (v.virtual_size, v.pin.clone());
            Some((
                shown,
                TemplateRef {
                    full,
                    identity,
                    size,
                    pin,
                },
            ))
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
