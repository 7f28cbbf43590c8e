//! Templates behind their copy-on-read caches, for the daemon's chains: every clone of a
//! template attached in the SR reads it through one cache (`.thinline-sr/caches/`), so a
//! block is fetched from the template's store once, whichever clone asked, and stays
//! local across restarts. The daemon is the caches' one owner.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use thinline_cor::{CorOptions, cache_dir};
use thinline_format::{BackingOpener, Storage};
use thinline_nbd::export::{Export, ReadChunk};
use thinline_source::open::{OpenExportOptions, open_export};
use tokio::runtime::Handle;

use crate::template::Templates;

/// Where an SR's template caches live.
pub const CACHES: &str = "caches";

/// A template's copy-on-read export seen as the raw bytes of a backing file.
#[derive(Debug)]
struct CachedTemplate {
    export: Arc<dyn Export>,
    name: String,
    identity: String,
    size: u64,
    handle: Handle,
}

/// Largest read asked of the export at once.
const MAX_READ: u64 = 32 << 20;

impl Storage for CachedTemplate {
    fn name(&self) -> &str {
        &self.name
    }

    fn size(&self) -> u64 {
        self.size
    }

    /// Reads through the cache. Runs on a thread that may block (the blocking pool, or
    /// a writer inside `block_in_place`), never on an async task.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if offset >= self.size {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(self.size - offset).min(MAX_READ) as usize;
        let chunks = self
            .handle
            .block_on(self.export.read(offset, n as u32))
            .map_err(|e| io::Error::other(format!("{}: {e}", self.name)))?;
        let mut at = 0usize;
        for chunk in chunks {
            let len = (chunk.len() as usize).min(n - at);
            match chunk {
                ReadChunk::Data(bytes) => buf[at..at + len].copy_from_slice(&bytes[..len]),
                ReadChunk::Zero(_) => buf[at..at + len].fill(0),
            }
            at += len;
        }
        if at != n {
            return Err(io::Error::other(format!(
                "{}: the cache answered {at} of {n} bytes",
                self.name
            )));
        }
        Ok(n)
    }

    fn open_related(&self, name: &str) -> thinline_format::Result<Arc<dyn Storage>> {
        Err(thinline_format::Error::chain(
            &self.name,
            format!("a cached template names no other file ({name:?})"),
        ))
    }

    fn identity(&self) -> String {
        self.identity.clone()
    }

    fn decoded(&self) -> bool {
        true
    }
}

/// The SR's template caches, opened as clones need them.
#[derive(Debug)]
pub struct Caches {
    dir: PathBuf,
    templates: Templates,
    /// By the name overlays give the template (its URI as shown).
    open: Mutex<HashMap<String, Arc<dyn Storage>>>,
}

impl Caches {
    /// The caches in `dir` (made if missing, mode 0700).
    pub fn new(dir: PathBuf, templates: Templates) -> crate::Result<Caches> {
        cache_dir::create_cache_dir(&dir).map_err(|e| {
            crate::Error::new(
                crate::Code::SrBackendFailure,
                format!("cannot create {}: {e}", dir.display()),
            )
        })?;
        Ok(Caches {
            dir,
            templates,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// The template named `shown` (at `full`) behind its cache, opened on first use.
    /// Call from a thread that may block.
    fn get(&self, shown: &str, full: &str) -> thinline_format::Result<Arc<dyn Storage>> {
        if let Some(s) = self.open.lock().expect("not poisoned").get(shown) {
            return Ok(Arc::clone(s));
        }
        let fail = |e: String| thinline_format::Error::chain(shown, e);
        let source = thinline_source::parse(full).map_err(|e| fail(e.to_string()))?;
        let opened = open_export(
            &source,
            &OpenExportOptions {
                as_template: true,
                ..OpenExportOptions::default()
            },
            Some(&self.templates.remote),
            &self.templates.handle,
        )
        .map_err(|e| fail(e.to_string()))?;
        let identity = opened
            .identity
            .ok_or_else(|| fail("the template has no identity to key a cache by".into()))?;
        let cor = {
            let _enter = self.templates.handle.enter();
            cache_dir::open_cached(
                &self.dir,
                opened.export,
                shown,
                identity.clone(),
                &CorOptions::default(),
            )
            .map_err(|e| fail(format!("cannot open its cache: {e}")))?
        };
        let storage: Arc<dyn Storage> = Arc::new(CachedTemplate {
            size: cor.size(),
            export: Arc::new(cor),
            name: shown.to_owned(),
            identity: format!("cache of {identity}"),
            handle: self.templates.handle.clone(),
        });
        let mut open = self.open.lock().expect("not poisoned");
        Ok(Arc::clone(open.entry(shown.to_owned()).or_insert(storage)))
    }

    /// A backing opener like [`Templates::opener`], with templates read through their
    /// caches.
    pub fn opener(self: &Arc<Self>, names: BTreeMap<String, String>) -> BackingOpener {
        let caches = Arc::clone(self);
        crate::template::chain_opener(names, move |shown, full| caches.get(shown, full))
    }
}
