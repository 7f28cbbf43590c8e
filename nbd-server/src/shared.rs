//! What every connection of one server shares: the exports, the settings, the memory
//! budget, the connection slots and the shutdown signal. The server creates it; the
//! handshake and transmission phases read it.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::export::Export;
use crate::{Error, Result};

/// How long connections get to disconnect after shutdown starts, by default.
pub(crate) const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// How long a quiet connection polls for its next request by default (see
/// `crate::spin`): a client at queue depth 1 sends it well within this.
pub const DEFAULT_IDLE_SPIN: Duration = Duration::from_micros(100);

/// The exports of one daemon, in order; the first is also the default export `""`.
#[derive(Debug, Default)]
pub struct ExportSet {
    exports: Vec<(String, Arc<dyn Export>)>,
}

impl ExportSet {
    /// An empty set.
    pub fn new() -> Self {
        ExportSet::default()
    }

    /// Adds an export under `name`.
    pub fn add(&mut self, name: &str, export: Arc<dyn Export>) -> Result<()> {
        if name.len() > crate::proto::MAX_STRING_LEN {
            return Err(Error::InvalidExportName {
                name: name.into(),
                reason: "longer than 4096 bytes",
            });
        }
        if name.contains('\0') {
            return Err(Error::InvalidExportName {
                name: name.into(),
                reason: "contains a NUL byte",
            });
        }
        if self.exports.iter().any(|(n, _)| n == name) {
            return Err(Error::DuplicateExport { name: name.into() });
        }
        self.exports.push((name.to_owned(), export));
        Ok(())
    }

    /// Exports in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Arc<dyn Export>)> {
        self.exports.iter().map(|(n, e)| (n.as_str(), e))
    }

    /// Number of exports.
    pub fn len(&self) -> usize {
        self.exports.len()
    }

    /// True if there are no exports.
    pub fn is_empty(&self) -> bool {
        self.exports.is_empty()
    }

    /// Finds an export by name; `""` is the first export. Returns its index, canonical
    /// name and the export.
    pub fn lookup(&self, name: &str) -> Option<(usize, &str, &Arc<dyn Export>)> {
        let index = if name.is_empty() {
            (!self.exports.is_empty()).then_some(0)
        } else {
            self.exports.iter().position(|(n, _)| n == name)
        }?;
        let (n, e) = &self.exports[index];
        Some((index, n.as_str(), e))
    }
}

/// Server-wide settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Connections beyond this are refused politely during the handshake.
    pub max_connections: Option<usize>,
    /// A client that has not finished the handshake by then is dropped.
    pub handshake_timeout: Duration,
    /// After shutdown starts, connections get this long to disconnect.
    pub shutdown_grace: Duration,
    /// Bytes of request payloads and read buffers held at once, across connections.
    pub memory_budget: u64,
    /// Where requests and connections are counted, if anywhere.
    pub metrics: Option<Arc<crate::metrics::ServerMetrics>>,
    /// TLS (STARTTLS), if the server offers it.
    pub tls: Option<crate::tls::TlsSettings>,
    /// How long a connection with nothing in flight polls for its next request before
    /// parking (zero: never). See `crate::spin`.
    pub idle_spin: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_connections: None,
            handshake_timeout: Duration::from_secs(10),
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            memory_budget: 1 << 30,
            metrics: None,
            tls: None,
            idle_spin: DEFAULT_IDLE_SPIN,
        }
    }
}

/// Budget units are KiB so that the semaphore's permit count stays small.
const BUDGET_UNIT: u64 = 1024;

/// Refused connections kept open at once for their polite refusal; beyond this they
/// are closed straight away.
const MAX_PENDING_REFUSALS: usize = 256;

/// State shared by all connections.
#[derive(Debug)]
pub(crate) struct Shared {
    pub exports: ExportSet,
    pub config: ServerConfig,
    pub shutdown: CancellationToken,
    budget: Arc<Semaphore>,
    budget_units: u64,
    /// Slots for connections, when their number is limited.
    pub connections: Option<Arc<Semaphore>>,
    /// Slots for connections kept open for their polite refusal.
    pub refusals: Arc<Semaphore>,
}

impl Shared {
    /// The state of a server about to serve `exports`.
    pub(crate) fn new(exports: ExportSet, config: ServerConfig) -> Shared {
        let budget_units = (config.memory_budget / BUDGET_UNIT).max(64 * 1024);
        let connections = config.max_connections.map(|n| Arc::new(Semaphore::new(n)));
        Shared {
            exports,
            budget: Arc::new(Semaphore::new(budget_units as usize)),
            budget_units,
            connections,
            refusals: Arc::new(Semaphore::new(MAX_PENDING_REFUSALS)),
            shutdown: CancellationToken::new(),
            config,
        }
    }

    /// Waits until `bytes` of memory budget are free and holds them.
    pub(crate) async fn budget(&self, bytes: u64) -> Option<OwnedSemaphorePermit> {
        if bytes == 0 {
            return None;
        }
        let units = bytes.div_ceil(BUDGET_UNIT).min(self.budget_units) as u32;
        Arc::clone(&self.budget)
            .acquire_many_owned(units)
            .await
            .ok()
    }
}
