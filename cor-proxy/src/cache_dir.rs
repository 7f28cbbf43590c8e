//! Templates cached in a directory: one cache file per template version, named from
//! the location and the identity, in a directory only its owner can write. What
//! `thinline serve --cache-dir` and the agent use to put an opened template behind
//! its copy-on-read cache.

use std::path::Path;
use std::sync::Arc;

use thinline_nbd::export::Export;

use crate::cache::{cache_file_name, other_caches_of};
use crate::{CorExport, CorOptions, Error, ExportUpstream, Result};

/// Creates `dir` (mode 0700, parents included) if it does not exist: other local users
/// must not plant files or links in a cache directory.
pub fn create_cache_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| Error::Io {
            op: "create the directory",
            path: dir.to_owned(),
            source,
        })
}

/// Puts `export` (the template shown as `shown`, pinned by `identity`) behind its cache
/// in `dir`, opening the cache of this version or creating it. Caches of other
/// versions of the template are left in place and logged. Call it inside the runtime
/// the export will be served on.
pub fn open_cached(
    dir: &Path,
    export: Arc<dyn Export>,
    shown: &str,
    identity: String,
    options: &CorOptions,
) -> Result<CorExport> {
    let file_name = cache_file_name(shown, &identity);
    let path = dir.join(&file_name);
    for other in other_caches_of(dir, shown, &file_name) {
        tracing::info!(
            image = %shown,
            cache = %path.display(),
            other = %other.display(),
            "a cache of another version of this template (or of an older Thinline) \
             is left in place; remove it when no longer needed"
        );
    }
    let upstream = ExportUpstream::new(export, shown.to_owned(), identity);
    CorExport::open(Arc::new(upstream), &path, options)
}
