//! The built-in remote sources (HTTP(S), S3, NFS, NBD), chosen by scheme, and a remote
//! object opened as a `thinline_format::Storage` behind its fetch engine.

use std::sync::Arc;

use thinline_format::Storage;
use tokio::runtime::Handle;

use crate::fetch::FetchEngine;
use crate::storage::{RemoteStorage, block_on};
use crate::{Error, FetchError, FetchErrorKind, RangeBackend, RemoteConfig, Result};
use crate::{http, nbd, nfs, retry, s3};

/// The schemes served by built-in sources.
pub const BUILT_IN_SCHEMES: [&str; 8] = [
    "http",
    "https",
    "s3",
    "nfs",
    "nbd",
    "nbd+unix",
    "nbds",
    "nbds+unix",
];

/// Opens the object at `uri` with the built-in source for its scheme, retrying
/// transient failures like reads are retried.
pub async fn open(uri: &str, config: &RemoteConfig) -> Result<Arc<dyn RangeBackend>, FetchError> {
    let scheme = uri
        .split_once("://")
        .map(|(s, _)| s.to_ascii_lowercase())
        .unwrap_or_default();
    let scheme = scheme.as_str();
    retry::run(
        config.attempts,
        &retry::Backoff::from_config(config),
        |_| async move {
            match scheme {
                "http" | "https" => http::open(uri, config).await,
                "nbd" | "nbd+unix" | "nbds" | "nbds+unix" => nbd::open(uri, config).await,
                "nfs" => nfs::open(uri, config).await,
                "s3" => s3::open(uri, config).await,
                _ => Err(FetchError::new(
                    FetchErrorKind::Permanent,
                    "open",
                    &crate::redact::redact(uri),
                    None,
                    format!("no built-in source for the {scheme:?} scheme"),
                )),
            }
        },
        |e, attempt| {
            tracing::warn!("{e}; retrying (attempt {attempt} of {})", config.attempts);
        },
    )
    .await
}

/// Opens a built-in remote object and puts a fetch engine in front of it.
pub fn open_storage(
    uri: &str,
    config: &Arc<RemoteConfig>,
    handle: &Handle,
) -> Result<Arc<dyn Storage>> {
    let owned = uri.to_owned();
    let cfg = Arc::clone(config);
    let backend =
        block_on(handle, async move { open(&owned, &cfg).await }).ok_or_else(|| {
            Error::UnsupportedSource {
                uri: crate::redact::redact(uri),
                reason: "the async runtime is shutting down".to_owned(),
            }
        })??;
    let engine = FetchEngine::new(backend, config);
    Ok(Arc::new(RemoteStorage::new(
        engine,
        handle.clone(),
        Arc::clone(config),
    )))
}
