//! The writer task: sends request headers in batches, and the disconnect request last.

use std::sync::Arc;

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::connection::{Out, Shared};
use crate::proto;

pub(super) async fn writer_task<W: AsyncWrite + Unpin>(
    shared: Arc<Shared>,
    mut w: W,
    mut rx: mpsc::UnboundedReceiver<Out>,
) {
    let mut buf = Vec::with_capacity(64 * proto::COMPACT_REQUEST_LEN);
    loop {
        let first = tokio::select! {
            biased;
            () = shared.stop.cancelled() => return,
            m = rx.recv() => m,
        };
        let Some(first) = first else { return };
        buf.clear();
        let mut disconnect = false;
        let mut next = Some(first);
        while let Some(m) = next {
            match m {
                Out::Request(h) => buf.extend_from_slice(&h),
                Out::Disconnect(h) => {
                    buf.extend_from_slice(&h);
                    disconnect = true;
                    break;
                }
            }
            next = if buf.len() < 64 * proto::COMPACT_REQUEST_LEN {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        let written = tokio::select! {
            biased;
            () = shared.stop.cancelled() => return,
            r = async { w.write_all(&buf).await?; w.flush().await } => r,
        };
        if let Err(e) = written {
            shared.fail_all(format!("sending requests failed: {e}"));
            return;
        }
        if disconnect {
            let _ = w.shutdown().await;
            // Keep the write half open until the reader is done: dropping it is fine
            // too, the shutdown already told the server.
            shared.stop.cancelled().await;
            return;
        }
    }
}
