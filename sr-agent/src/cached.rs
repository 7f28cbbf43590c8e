//! Templates behind their copy-on-read caches, for the daemon's chains: every clone of a
//! template attached in the SR reads it through one cache (`.thinline-sr/caches/`), so a
//! block is fetched from the template's store once, whichever clone asked, and stays
//! local across restarts. The daemon is the caches' one owner.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use thinline_cor::{CorExport, CorOptions, cache_dir};
use thinline_format::{BackingOpener, Storage};
use thinline_nbd::DataError;
use thinline_nbd::export::{Capabilities, Export, Extent, ReadChunk, StatusQuery};
use tokio::runtime::Handle;

use crate::template::{TemplateRef, Templates};

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
///
/// The caches and their templates run on a runtime of their own. A clone's reads wait
/// for its template on threads of the daemon's blocking pool; if the template's reads
/// needed that same pool, enough clone reads at once (nbdcopy keeps hundreds in
/// flight) would hold every thread and wait forever for reads that cannot start.
#[derive(Debug)]
pub struct Caches {
    dir: PathBuf,
    /// The daemon's remote settings, on the caches' runtime.
    templates: Templates,
    runtime: Option<tokio::runtime::Runtime>,
    /// The caches opened (by the name overlays give their template), for their status.
    cors: Mutex<Vec<(String, CorExport)>>,
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
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("thinline-cache")
            .enable_all()
            .build()
            .map_err(|e| crate::Error::io("cannot start the caches' runtime", &e))?;
        let templates = Templates {
            handle: runtime.handle().clone(),
            ..templates
        };
        Ok(Caches {
            dir,
            templates,
            runtime: Some(runtime),
            cors: Mutex::new(Vec::new()),
            open: Mutex::new(HashMap::new()),
        })
    }

    /// The template named `shown` behind its cache, opened on first use. A template
    /// that cannot be opened, or is no longer the object that was introduced, is
    /// served from what its cache holds: every other read fails with EIO and says
    /// why. Call from a thread that may block.
    fn get(
        &self,
        shown: &str,
        template: &TemplateRef,
    ) -> thinline_format::Result<Arc<dyn Storage>> {
        if let Some(s) = self.open.lock().expect("not poisoned").get(shown) {
            return Ok(Arc::clone(s));
        }
        let fail = |e: String| thinline_format::Error::chain(shown, e);
        let gone = |reason: String| -> thinline_format::Result<(Arc<dyn Export>, String)> {
            let pinned = template
                .identity
                .clone()
                .ok_or_else(|| fail(reason.clone()))?;
            tracing::error!(template = %shown, reason = %reason, "only the cached blocks of the template can be read");
            Ok((
                Arc::new(Gone {
                    size: template.size,
                    reason,
                }),
                pinned,
            ))
        };
        let changed = |pinned: &Option<String>, now: &str| match crate::template::changed(
            shown,
            pinned.as_deref(),
            now,
        ) {
            Some(reason) => Err(crate::Error::new(crate::Code::TemplateUnreachable, reason)),
            None => Ok(()),
        };
        // One small request first; then every file of the chain, as opened.
        let opened = self.templates.pin(shown, &template.full).and_then(|now| {
            changed(&template.pin, &now)?;
            let (export, identity) = self.templates.open_decoded(shown, &template.full, None)?;
            changed(&template.identity, &identity)?;
            Ok((export, identity))
        });
        let (upstream, identity) = match opened {
            Ok(opened) => opened,
            Err(e) => gone(e.message)?,
        };
        let cor = {
            let _enter = self.templates.handle.enter();
            cache_dir::open_cached(
                &self.dir,
                upstream,
                shown,
                identity.clone(),
                &CorOptions::default(),
            )
            .map_err(|e| fail(format!("cannot open its cache: {e}")))?
        };
        self.cors
            .lock()
            .expect("not poisoned")
            .push((shown.to_owned(), cor.clone()));
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

    /// Waits (up to 10 s) for every cache's fetches in flight to be marked, so a graceful
    /// stop keeps what was fetched; then closes the caches.
    pub async fn close(&self) {
        let cors = std::mem::take(&mut *self.cors.lock().expect("not poisoned"));
        for (_, cor) in &cors {
            cor.settle(std::time::Duration::from_secs(10)).await;
        }
        self.open.lock().expect("not poisoned").clear();
    }

    /// Upstream fetches the caches have in flight (demanded and speculative).
    pub fn fetches_in_flight(&self) -> usize {
        let cors = self.cors.lock().expect("not poisoned");
        cors.iter().map(|(_, c)| c.status().in_flight).sum()
    }

    /// The templates whose caches are open (by the name overlays give them).
    pub fn open_templates(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .cors
            .lock()
            .expect("not poisoned")
            .iter()
            .map(|(shown, _)| shown.clone())
            .collect();
        names.sort();
        names
    }

    /// Closes the cache of the template `shown` (forgotten: its file is removed), after
    /// its fetches in flight settle, so a template introduced again at that URI gets a
    /// cache of its own.
    pub async fn forget(&self, shown: &str) {
        let gone: Vec<CorExport> = {
            let mut cors = self.cors.lock().expect("not poisoned");
            let (gone, kept) = std::mem::take(&mut *cors)
                .into_iter()
                .partition(|(s, _)| s == shown);
            *cors = kept;
            gone.into_iter().map(|(_, c)| c).collect()
        };
        self.open.lock().expect("not poisoned").remove(shown);
        for cor in &gone {
            cor.settle(std::time::Duration::from_secs(10)).await;
        }
    }

    /// A backing opener like [`Templates::opener`], with templates read through their
    /// caches.
    pub fn opener(self: &Arc<Self>, names: BTreeMap<String, TemplateRef>) -> BackingOpener {
        let caches = Arc::clone(self);
        crate::template::chain_opener(names, move |shown, t| caches.get(shown, t))
    }
}

/// Stands in for a template that cannot be read any more (unreachable when the daemon
/// opened it, or replaced since it was introduced): every read fails with `reason`,
/// so a clone reads only what the template's cache holds, and its own writes.
#[derive(Debug)]
struct Gone {
    size: u64,
    reason: String,
}

#[async_trait::async_trait]
impl Export for Gone {
    fn size(&self) -> u64 {
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::READ_ONLY
    }

    async fn read(&self, _: u64, _: u32) -> thinline_nbd::Result<Vec<ReadChunk>> {
        Err(DataError::source(self.reason.clone()).into())
    }

    async fn block_status(&self, _: StatusQuery) -> thinline_nbd::Result<Vec<Extent>> {
        Err(DataError::source(self.reason.clone()).into())
    }
}

impl Drop for Caches {
    fn drop(&mut self) {
        // Without blocking: the daemon's async code drops this (after `close`).
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}
