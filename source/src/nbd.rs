//! Templates behind another NBD server: `nbd://host[:port]/export` and
//! `nbd+unix:///export?socket=PATH`, read through `thinline_nbd::client`.
//!
//! [`NbdBackend`] keeps a small pool of connections (up to [`MAX_CONNECTIONS`], only
//! one unless the server sets `NBD_FLAG_CAN_MULTI_CONN`), opened lazily and
//! replaced when one dies. Requests go round-robin over the pool, and each
//! connection carries many requests at once.
//!
//! NBD has no ETag: the identity pinned at open is the export's size, and a
//! reconnection that finds another size reports [`FetchErrorKind::Changed`].
//!
//! How failures are classified:
//!
//! | Failure | Kind |
//! |---|---|
//! | connect refused/reset, EOF or reset (handshake or transmission), timeouts | Transient |
//! | `NBD_REP_ERR_SHUTDOWN` at open, `ESHUTDOWN` on a request | Transient |
//! | `EIO` on a request | Transient (see below) |
//! | `ENOMEM` on a request | Transient |
//! | other option refusals (unknown export, TLS required, policy, …) | Permanent |
//! | `EINVAL`, `EPERM`, `ENOSPC`, `EOVERFLOW`, `ENOTSUP`, unknown values | Permanent |
//! | protocol violations by the server, bad URIs, reads past the end | Permanent |
//!
//! `EIO` is retried because an NBD server that is itself a proxy (nbdkit-curl,
//! qemu-nbd over an http or NBD backing file, another Thinline) reports every failure of
//! *its* upstream — a 503, a reset — as `EIO`, and a flaky disk sector fails again
//! quickly. Retries are bounded by `RemoteConfig::attempts`, so a persistent `EIO`
//! costs a few backoff delays before the read fails. A protocol violation is not
//! retried: a server that sends garbage once will do it again.

use std::error::Error as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use bytes::Bytes;

use thinline_nbd::client::{Client, ClientOptions, Error, NbdUri};
use thinline_nbd::proto::{errno, rep};

use crate::{FetchError, FetchErrorKind, RangeBackend, RemoteConfig};

/// Most connections kept to one export.
pub const MAX_CONNECTIONS: usize = 4;

/// An NBD export read by ranges.
#[derive(Debug)]
pub struct NbdBackend {
    /// The URI without user info or unknown query parameters.
    display: String,
    uri: NbdUri,
    options: ClientOptions,
    size: u64,
    identity: String,
    slots: Vec<tokio::sync::Mutex<Option<Arc<Client>>>>,
    next: AtomicUsize,
}

/// Opens `uri` (`nbd://…` or `nbd+unix://…`) as a range backend.
pub async fn open(uri: &str, config: &RemoteConfig) -> Result<Arc<dyn RangeBackend>, FetchError> {
    Ok(Arc::new(NbdBackend::open(uri, config).await?))
}

impl NbdBackend {
    /// Parses `uri`, connects once to pin the export's size and learn whether several
    /// connections are allowed.
    pub async fn open(uri: &str, config: &RemoteConfig) -> Result<NbdBackend, FetchError> {
        Self::open_with(uri, config, false).await
    }

    /// [`open`](Self::open), also negotiating `base:allocation` so that
    /// [`block_status`](Self::block_status) reports the server's holes.
    pub async fn open_with_block_status(
        uri: &str,
        config: &RemoteConfig,
    ) -> Result<NbdBackend, FetchError> {
        Self::open_with(uri, config, true).await
    }

    async fn open_with(
        uri: &str,
        config: &RemoteConfig,
        block_status: bool,
    ) -> Result<NbdBackend, FetchError> {
        let parsed = NbdUri::parse(uri).map_err(|e| {
            let shown = match &e {
                Error::Uri { uri, .. } => uri.clone(),
                _ => String::new(),
            };
            FetchError::new(FetchErrorKind::Permanent, "open", &shown, None, message(&e))
        })?;
        let display = parsed.to_string();
        let options = ClientOptions {
            connect_timeout: config.connect_timeout,
            // NBD has no separate first byte: a reply arrives whole, so allow both.
            request_timeout: Some(config.first_byte_timeout + config.idle_timeout),
            structured_replies: true,
            block_status,
            ..ClientOptions::default()
        };
        let first = Client::connect(&parsed, &options)
            .await
            .map_err(|e| fetch_error("open", &display, None, &e))?;
        let size = first.size();
        super::check_size(&display, size)?;
        let count = if first.can_multi_conn() {
            MAX_CONNECTIONS.min(config.max_in_flight.max(1))
        } else {
            1
        };
        let mut slots = Vec::with_capacity(count);
        slots.push(tokio::sync::Mutex::new(Some(Arc::new(first))));
        slots.resize_with(count, || tokio::sync::Mutex::new(None));
        Ok(NbdBackend {
            display,
            uri: parsed,
            options,
            size,
            identity: format!("size:{size}"),
            slots,
            next: AtomicUsize::new(0),
        })
    }

    /// Connections the pool may hold (1 unless the server allows multi-conn).
    pub fn max_connections(&self) -> usize {
        self.slots.len()
    }

    /// A live connection of slot `i`, reconnecting if it died.
    /// `base:allocation` of `[offset, offset + length)` as `(length, flags)` extents
    /// covering a prefix of the range; one "data" extent when the server does not
    /// answer block status. One attempt, no retries.
    pub async fn block_status(
        &self,
        offset: u64,
        length: u64,
    ) -> Result<Vec<(u64, u32)>, FetchError> {
        let range = (offset, length);
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let client = self.client(i, range).await?;
        if !client.has_block_status() {
            return Ok(vec![(length, 0)]);
        }
        client
            .block_status(offset, length)
            .await
            .map_err(|e| fetch_error("block status", &self.display, Some(range), &e))
    }

    /// The URI as shown in messages (no credentials).
    pub fn shown(&self) -> &str {
        &self.display
    }

    async fn client(&self, i: usize, range: (u64, u64)) -> Result<Arc<Client>, FetchError> {
        let mut slot = self.slots[i].lock().await;
        if let Some(c) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(Arc::clone(c));
        }
        *slot = None;
        let c = Client::connect(&self.uri, &self.options)
            .await
            .map_err(|e| fetch_error("read", &self.display, Some(range), &e))?;
        if c.size() != self.size {
            return Err(FetchError::new(
                FetchErrorKind::Changed,
                "read",
                &self.display,
                Some(range),
                format!(
                    "the export's size changed from {} to {} bytes since it was opened",
                    self.size,
                    c.size()
                ),
            ));
        }
        let c = Arc::new(c);
        *slot = Some(Arc::clone(&c));
        Ok(c)
    }
}

#[async_trait]
impl RangeBackend for NbdBackend {
    fn uri(&self) -> &str {
        &self.display
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn identity(&self) -> &str {
        &self.identity
    }

    async fn read(&self, offset: u64, length: u64) -> Result<Bytes, FetchError> {
        let range = (offset, length);
        if offset.checked_add(length).is_none_or(|end| end > self.size) {
            return Err(FetchError::new(
                FetchErrorKind::Permanent,
                "read",
                &self.display,
                Some(range),
                format!("the range ends beyond the export's {} bytes", self.size),
            ));
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let client = self.client(i, range).await?;
        client
            .read(offset, length)
            .await
            .map_err(|e| fetch_error("read", &self.display, Some(range), &e))
    }

    async fn open_related(&self, name: &str) -> Result<Arc<dyn RangeBackend>, FetchError> {
        Err(FetchError::new(
            FetchErrorKind::Permanent,
            "open",
            &self.display,
            None,
            format!("an NBD export names no related files (asked for {name:?})"),
        ))
    }
}

/// The error and its causes in one line.
fn message(e: &Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// How a client error should be handled (see the module documentation).
pub fn classify(e: &Error) -> FetchErrorKind {
    match e {
        Error::Connect { .. } | Error::Timeout { .. } | Error::ConnectionLost { .. } => {
            FetchErrorKind::Transient
        }
        Error::OptionRefused { code, .. } if *code == rep::ERR_SHUTDOWN => {
            FetchErrorKind::Transient
        }
        Error::Request { errno: value, .. }
            if matches!(*value, errno::EIO | errno::ESHUTDOWN | errno::ENOMEM) =>
        {
            FetchErrorKind::Transient
        }
        _ => FetchErrorKind::Permanent,
    }
}

fn fetch_error(op: &'static str, uri: &str, range: Option<(u64, u64)>, e: &Error) -> FetchError {
    FetchError::new(classify(e), op, uri, range, message(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request_error(value: u32) -> Error {
        Error::Request {
            server: "s".into(),
            export: "e".into(),
            op: "READ",
            offset: 0,
            length: 1,
            errno: value,
            message: String::new(),
        }
    }

    #[test]
    fn eio_and_shutdown_are_transient_einval_and_eperm_are_not() {
        assert_eq!(
            classify(&request_error(errno::EIO)),
            FetchErrorKind::Transient
        );
        assert_eq!(
            classify(&request_error(errno::ESHUTDOWN)),
            FetchErrorKind::Transient
        );
        assert_eq!(
            classify(&request_error(errno::EINVAL)),
            FetchErrorKind::Permanent
        );
        assert_eq!(
            classify(&request_error(errno::EPERM)),
            FetchErrorKind::Permanent
        );
        assert_eq!(classify(&request_error(9999)), FetchErrorKind::Permanent);
    }

    #[test]
    fn lost_connections_are_transient_protocol_violations_permanent() {
        let lost = Error::ConnectionLost {
            server: "s".into(),
            export: "e".into(),
            reason: "eof".into(),
        };
        assert_eq!(classify(&lost), FetchErrorKind::Transient);
        let bad = Error::Protocol {
            server: "s".into(),
            export: "e".into(),
            reason: "bad magic".into(),
        };
        assert_eq!(classify(&bad), FetchErrorKind::Permanent);
    }

    #[tokio::test]
    async fn bad_uris_are_permanent_and_redacted() {
        let e = open("nbds://bob:pw@h:0/x?k=secret", &RemoteConfig::default())
            .await
            .unwrap_err();
        assert_eq!(e.kind, FetchErrorKind::Permanent);
        let text = e.to_string();
        assert!(text.contains("invalid port"), "{text}");
        assert!(!text.contains("pw") && !text.contains("secret"), "{text}");
    }

    #[tokio::test]
    async fn unreachable_server_is_transient() {
        let dir = tempfile::tempdir().unwrap();
        let uri = format!(
            "nbd+unix:///x?socket={}",
            dir.path().join("none.sock").display()
        );
        let e = open(&uri, &RemoteConfig::default()).await.unwrap_err();
        assert_eq!(e.kind, FetchErrorKind::Transient, "{e}");
        assert!(e.to_string().contains("none.sock"), "{e}");
    }
}
