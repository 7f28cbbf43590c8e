//! The state one connection shares between the `Client`, its reader task and its writer
//! task: requests waiting for replies by cookie, and why the connection closed.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::error::Peer;
use super::handshake::Negotiated;
use super::{BlockSizes, Error, Result};
use crate::proto::{self, ReadCoverage, RequestedRange, cmd, errno};

/// The requests the client sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Op {
    Read,
    BlockStatus,
}

impl Op {
    pub(super) fn name(self) -> &'static str {
        match self {
            Op::Read => "READ",
            Op::BlockStatus => "BLOCK_STATUS",
        }
    }

    /// The command on the wire.
    pub(super) fn command(self) -> u16 {
        match self {
            Op::Read => cmd::READ,
            Op::BlockStatus => cmd::BLOCK_STATUS,
        }
    }
}

/// What a completed request hands back.
pub(super) enum Reply {
    Data(Vec<u8>),
    Extents(Vec<(u64, u32)>),
}

/// A request waiting for (the rest of) its reply.
pub(super) struct Pending {
    pub(super) op: Op,
    pub(super) offset: u64,
    pub(super) length: u32,
    pub(super) tx: oneshot::Sender<Result<Reply>>,
    /// Read data, allocated at the first data chunk.
    pub(super) data: Option<Vec<u8>>,
    /// Ranges filled by data and hole chunks so far.
    pub(super) coverage: ReadCoverage,
    pub(super) extents: Option<Vec<(u64, u32)>>,
    /// The first error chunk's value and message.
    pub(super) error: Option<(u32, String)>,
    pub(super) chunks: u32,
}

impl Pending {
    pub(super) fn new(
        op: Op,
        offset: u64,
        length: u32,
        tx: oneshot::Sender<Result<Reply>>,
    ) -> Self {
        Pending {
            op,
            offset,
            length,
            tx,
            data: None,
            coverage: ReadCoverage::default(),
            extents: None,
            error: None,
            chunks: 0,
        }
    }

    /// What the request asked for, as the reply decoders check it.
    pub(super) fn requested(&self) -> RequestedRange {
        RequestedRange {
            command: self.op.command(),
            offset: self.offset,
            length: self.length,
        }
    }
}

/// What the writer task sends.
pub(super) enum Out {
    Request([u8; proto::COMPACT_REQUEST_LEN]),
    Disconnect([u8; proto::COMPACT_REQUEST_LEN]),
}

/// Requests in flight and the connection's fate.
#[derive(Default)]
pub(super) struct State {
    pub(super) pending: HashMap<u64, Pending>,
    pub(super) next_cookie: u64,
    /// Why the connection is gone; set once.
    pub(super) closed: Option<String>,
    /// Why no new requests are accepted although the connection is still up (the
    /// server announced its shutdown, or the client is disconnecting).
    pub(super) draining: Option<String>,
}

/// What the client and its two tasks share.
pub(super) struct Shared {
    pub(super) peer: Peer,
    pub(super) negotiated: Negotiated,
    pub(super) block_sizes: BlockSizes,
    pub(super) max_request: u32,
    pub(super) request_timeout: Option<Duration>,
    pub(super) out: mpsc::UnboundedSender<Out>,
    pub(super) state: Mutex<State>,
    pub(super) stop: CancellationToken,
}

impl Shared {
    pub(super) fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the map inconsistent in a way
        // that matters more than failing: keep going with the data.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks the connection dead and fails every pending request with `reason`.
    pub(super) fn fail_all(&self, reason: String) {
        let drained: Vec<Pending> = {
            let mut st = self.state();
            if st.closed.is_none() {
                debug!(server = %self.peer.server, export = %self.peer.export, %reason, "NBD connection closed");
                st.closed = Some(reason);
            }
            st.pending.drain().map(|(_, p)| p).collect()
        };
        let reason = self.closed_reason();
        for p in drained {
            let _ = p.tx.send(Err(self.peer.lost(reason.clone())));
        }
        self.stop.cancel();
    }

    pub(super) fn closed_reason(&self) -> String {
        self.state()
            .closed
            .clone()
            .unwrap_or_else(|| "the connection was closed".into())
    }

    pub(super) fn take(&self, cookie: u64) -> Option<Pending> {
        self.state().pending.remove(&cookie)
    }

    /// Puts a partly answered request back, unless the connection died meanwhile (then
    /// dropping it fails the waiter).
    pub(super) fn put_back(&self, cookie: u64, p: Pending) {
        let mut st = self.state();
        if st.closed.is_none() {
            st.pending.insert(cookie, p);
        }
    }

    /// Completes a request whose reply carried an error.
    pub(super) fn complete_with_error(&self, p: Pending) {
        let (value, message) = p.error.clone().unwrap_or((errno::EIO, String::new()));
        if value == errno::ESHUTDOWN {
            // The spec asks clients to disconnect: take no new requests here.
            self.state()
                .draining
                .get_or_insert_with(|| "the server is shutting down".into());
        }
        let error = Error::Request {
            server: self.peer.server.clone(),
            export: self.peer.export.clone(),
            op: p.op.name(),
            offset: p.offset,
            length: u64::from(p.length),
            errno: value,
            message: if message.is_empty() {
                String::new()
            } else {
                format!(": {message}")
            },
        };
        let _ = p.tx.send(Err(error));
    }
}
