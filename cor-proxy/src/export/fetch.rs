//! One unit's fetch: the upstream reads (the part a client read needs first, on its
//! own), the answer to the waiters, then the cache writes and the hand-over to the
//! batcher. Kept apart from the in-flight map so the map's rules (one entry per unit,
//! removed only once marked) read in one place and the I/O in another.

use std::sync::Arc;
use std::time::Duration;

use thinline_nbd::export::ReadChunk;
use thinline_nbd::proto::errno;
use thinline_nbd::{DataError, Error, Result};

use super::Inner;
use super::error_chain;
use super::in_flight::OutcomeTx;

/// What one fetch produced: the absent chunk runs of a unit, in order.
#[derive(Debug)]
pub(super) struct Fetched {
    pub(super) pieces: Vec<(u64, ReadChunk)>,
}

/// Byte ranges `(offset, length)`.
type Runs = Vec<(u64, u64)>;

/// `runs` split at `[lo, hi)`: the parts inside it, and the rest.
pub(super) fn split_runs(runs: &[(u64, u64)], (lo, hi): (u64, u64)) -> (Runs, Runs) {
    let (mut inside, mut rest) = (Vec::new(), Vec::new());
    for &(off, len) in runs {
        let end = off + len;
        let (a, b) = (off.max(lo), end.min(hi));
        if a >= b {
            rest.push((off, len));
            continue;
        }
        if off < a {
            rest.push((off, a - off));
        }
        inside.push((a, b - a));
        if b < end {
            rest.push((b, end - b));
        }
    }
    (inside, rest)
}

/// Reads `runs` from the upstream, one request each (zero ranges skipped), as
/// `(offset, chunk)` pieces in order.
async fn read_runs(inner: &Inner, runs: &[(u64, u64)]) -> Result<Vec<(u64, ReadChunk)>> {
    let results = futures_util::future::try_join_all(runs.iter().map(|&(off, len)| async move {
        let chunks = inner.read_skipping_zeroes(off, len).await?;
        let got: u64 = chunks.iter().map(ReadChunk::len).sum();
        if got != len {
            return Err(Error::from(DataError::upstream(
                inner.upstream().name(),
                "read",
                off,
                len,
                errno::EIO,
                format!("returned {got} bytes instead of {len}"),
            )));
        }
        Ok((off, chunks))
    }))
    .await?;
    let mut pieces = Vec::new();
    for (mut off, chunks) in results {
        for chunk in chunks {
            let len = chunk.len();
            pieces.push((off, chunk));
            off += len;
        }
    }
    Ok(pieces)
}

/// Fetches the absent runs of unit `u` (the part a client read needs, `first`, in
/// requests of its own, sent first and announced as soon as they arrive), hands the
/// bytes to the waiters, writes them to the cache and queues them for marking.
pub(super) async fn fetch_unit(
    inner: Arc<Inner>,
    u: u64,
    runs: Vec<(u64, u64)>,
    first: Option<((u64, u64), OutcomeTx)>,
    tx: OutcomeTx,
) {
    let permit = inner.in_flight().permit().await;
    let unit = inner.unit();
    // Counters are updated before the reply they describe is sent, so a status asked
    // after a client got its answer always includes it.
    let count = |requests: usize, fetched: Option<&Vec<(u64, ReadChunk)>>| match fetched {
        Some(pieces) => inner
            .stats()
            .upstream_read(requests as u64, data_bytes(pieces)),
        None => inner.stats().upstream_error(),
    };
    let results = match first {
        None => {
            let r = read_runs(&inner, &runs).await.map_err(Arc::new);
            count(runs.len(), r.as_ref().ok());
            r
        }
        Some((range, first_tx)) => {
            let (needed, rest) = split_runs(&runs, range);
            let rest_bytes: u64 = rest.iter().map(|r| r.1).sum();
            let started = std::time::Instant::now();
            let mut needed_took = Duration::ZERO;
            let needed = async {
                let r = read_runs(&inner, &needed).await.map_err(Arc::new);
                needed_took = started.elapsed();
                count(needed.len(), r.as_ref().ok());
                let _ = first_tx.send(Some(match &r {
                    Ok(pieces) => Ok(Arc::new(Fetched {
                        pieces: pieces.clone(),
                    })),
                    Err(e) => Err(Arc::clone(e)),
                }));
                r
            };
            let rest = async {
                let r = read_runs(&inner, &rest).await;
                // One failure per unit: a rest that fails after the needed part failed
                // (already counted) is the same failed fetch.
                if let Ok(pieces) = &r {
                    count(rest.len(), Some(pieces));
                }
                r
            };
            let (needed, rest) = tokio::join!(needed, rest);
            if needed.is_ok() && rest.is_err() {
                inner.stats().upstream_error();
            }
            match (needed, rest) {
                (Ok(mut pieces), Ok(rest)) => {
                    // Both went out together: the small request took a round trip, the
                    // rest a round trip plus its transfer.
                    if rest_bytes >= unit / 2 {
                        inner.speculation().record_link(
                            needed_took,
                            started.elapsed().saturating_sub(needed_took),
                            rest_bytes as f64 / unit as f64,
                        );
                    }
                    pieces.extend(rest);
                    pieces.sort_unstable_by_key(|(off, _)| *off);
                    Ok(pieces)
                }
                (Err(e), _) => Err(e),
                (_, Err(e)) => Err(Arc::new(e)),
            }
        }
    };
    inner.stats().fetch_ended();
    let pieces = match results {
        Ok(pieces) => pieces,
        Err(e) => {
            tracing::warn!(
                upstream = %inner.upstream().name(),
                offset = u * unit,
                error = %error_chain(&e),
                "upstream read failed; nothing was cached, the next read tries again"
            );
            inner.forget(u);
            let _ = tx.send(Some(Err(e)));
            return;
        }
    };
    let fetched = Arc::new(Fetched { pieces });
    let _ = tx.send(Some(Ok(Arc::clone(&fetched))));

    if inner.durability().is_passthrough() {
        inner.forget(u);
        return;
    }
    let cache = Arc::clone(inner.cache());
    let written = tokio::task::spawn_blocking(move || {
        let sums = chunk_sums(&fetched.pieces, cache.chunk_size(), cache.size());
        for (off, piece) in &fetched.pieces {
            match piece {
                ReadChunk::Data(d) if d.iter().all(|&b| b == 0) => {
                    cache.write_zeroes(*off, d.len() as u64)?;
                }
                ReadChunk::Data(d) => cache.write_data(*off, d)?,
                ReadChunk::Zero(n) => cache.write_zeroes(*off, *n)?,
            }
        }
        // Durable with the data, by the batch's sync, before any bit.
        cache.write_sums(&sums)?;
        Ok::<_, std::io::Error>(())
    })
    .await
    .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
    match written {
        Ok(()) => {
            let chunks = runs
                .iter()
                .map(|&(off, len)| inner.chunk_range(off, len))
                .collect();
            inner.queue_filled(u, chunks, permit);
        }
        Err(e) => {
            inner.forget(u);
            inner.enter_passthrough(&e, "write");
        }
    }
}

/// Bytes of data (not holes) in `pieces`.
fn data_bytes(pieces: &[(u64, ReadChunk)]) -> u64 {
    pieces
        .iter()
        .filter(|(_, c)| matches!(c, ReadChunk::Data(_)))
        .map(|(_, c)| c.len())
        .sum()
}

/// The CRC32C of each whole chunk covered by `pieces` (in order, chunk-aligned runs,
/// the last chunk of the template short): `(chunk, crc)`.
pub(super) fn chunk_sums(pieces: &[(u64, ReadChunk)], chunk: u64, size: u64) -> Vec<(u64, u32)> {
    static ZEROES: [u8; 64 << 10] = [0; 64 << 10];
    let mut out = Vec::new();
    // The chunk being summed and its CRC so far.
    let mut cur: Option<(u64, u32)> = None;
    for (off, piece) in pieces {
        let (mut pos, end) = (*off, off + piece.len());
        while pos < end {
            let i = pos / chunk;
            let chunk_end = ((i + 1) * chunk).min(size);
            let hi = chunk_end.min(end);
            let mut crc = match cur {
                Some((c, crc)) if c == i => crc,
                _ => 0,
            };
            match piece {
                ReadChunk::Data(d) => {
                    crc = crc32c::crc32c_append(crc, &d[(pos - off) as usize..(hi - off) as usize]);
                }
                ReadChunk::Zero(_) => {
                    let mut left = hi - pos;
                    while left > 0 {
                        let n = left.min(ZEROES.len() as u64);
                        crc = crc32c::crc32c_append(crc, &ZEROES[..n as usize]);
                        left -= n;
                    }
                }
            }
            if hi == chunk_end {
                out.push((i, crc));
                cur = None;
            } else {
                cur = Some((i, crc));
            }
            pos = hi;
        }
    }
    debug_assert!(cur.is_none(), "pieces end inside a chunk");
    out
}
