//! What the upstream says of its allocation (block status), asked once per GiB in the
//! background from start-up and remembered, so zero ranges are punched in the cache
//! instead of fetched. Owns what was learnt; the fetches ask it through
//! [`Inner::read_skipping_zeroes`].

use std::sync::Mutex;

use thinline_nbd::Result;
use thinline_nbd::export::ReadChunk;

use super::Inner;

/// Block status is asked for this much of the template at a time, and remembered.
const ALLOCATION_QUERY: u64 = 1 << 30;

/// What the upstream said about its allocation, remembered (the template never
/// changes): extent start → (length, reads as zero).
#[derive(Debug, Default)]
struct KnownAllocation {
    extents: std::collections::BTreeMap<u64, (u64, bool)>,
}

/// The upstream's allocation as far as it was asked (NBD upstreams).
#[derive(Debug, Default)]
pub(super) struct Allocation {
    known: Mutex<KnownAllocation>,
    /// Held while asking the upstream's block status, so one question is asked once.
    asking: tokio::sync::Mutex<()>,
}

impl KnownAllocation {
    /// The remembered extent containing `pos`: `(start, length, zero)`.
    fn at(&self, pos: u64) -> Option<(u64, u64, bool)> {
        let (&start, &(len, zero)) = self.extents.range(..=pos).next_back()?;
        (pos < start + len).then_some((start, len, zero))
    }
}

impl Inner {
    /// `[off, off + len)` split into `(offset, length, zero)` runs from the upstream's
    /// block status, asked once per gigabyte and remembered; `None` if it cannot say.
    async fn zero_plan(&self, off: u64, len: u64) -> Option<Vec<(u64, u64, bool)>> {
        let end = off + len;
        let mut plan: Vec<(u64, u64, bool)> = Vec::new();
        let mut pos = off;
        while pos < end {
            let known = self
                .allocation()
                .known
                .lock()
                .expect("allocation lock")
                .at(pos);
            let Some((start, length, zero)) = known else {
                self.learn_around(pos).await?;
                continue;
            };
            let hi = (start + length).min(end);
            match plan.last_mut() {
                Some((_, l, z)) if *z == zero => *l += hi - pos,
                _ => plan.push((pos, hi - pos, zero)),
            }
            pos = hi;
        }
        Some(plan)
    }

    /// Makes the extent containing `pos` known, asking the upstream unless someone else
    /// did meanwhile: for the whole aligned gigabyte around `pos`, so each is asked once
    /// whoever asks first, then at `pos` if that reply stopped short of it. `None` if
    /// the upstream cannot say.
    async fn learn_around(&self, pos: u64) -> Option<()> {
        let _asking = self.allocation().asking.lock().await;
        if self
            .allocation()
            .known
            .lock()
            .expect("allocation lock")
            .at(pos)
            .is_some()
        {
            return Some(());
        }
        let base = pos - pos % ALLOCATION_QUERY;
        if self.learn(base).await? <= pos && self.learn(pos).await? <= pos {
            return None;
        }
        Some(())
    }

    /// Asks the upstream's block status from `at` (a gigabyte at most) and remembers
    /// the answer; returns where it ends (`None` if the upstream cannot say).
    async fn learn(&self, at: u64) -> Option<u64> {
        let size = self.cache().size();
        let extents = self
            .upstream()
            .allocation(at, (size - at).min(ALLOCATION_QUERY))
            .await
            .ok()?;
        let mut known = self.allocation().known.lock().expect("allocation lock");
        let mut p = at;
        for e in extents {
            if e.length == 0 || p >= size {
                break;
            }
            let length = e.length.min(size - p);
            let zero = e.flags & u64::from(thinline_nbd::proto::state::ZERO) != 0;
            // Extents starting inside this one came from a shorter answer: this one
            // covers them, and lookups take the nearest start.
            let inside: Vec<u64> = known
                .extents
                .range(p..p + length)
                .map(|(&k, _)| k)
                .collect();
            for k in inside {
                known.extents.remove(&k);
            }
            known.extents.insert(p, (length, zero));
            p += length;
        }
        Some(p)
    }

    /// Reads `[off, off + len)` from the upstream. When its reads do not report holes,
    /// the remembered block status decides, and ranges that read as zero are not read
    /// (without block status everything is read).
    pub(super) async fn read_skipping_zeroes(&self, off: u64, len: u64) -> Result<Vec<ReadChunk>> {
        let upstream = &**self.upstream();
        if upstream.reads_report_holes() {
            return upstream.read(off, len).await;
        }
        let plan = match self.zero_plan(off, len).await {
            Some(plan) if plan.iter().any(|&(_, _, zero)| zero) => plan,
            _ => return upstream.read(off, len).await,
        };
        let parts =
            futures_util::future::try_join_all(plan.into_iter().map(|(o, l, zero)| async move {
                if zero {
                    Ok(vec![ReadChunk::Zero(l)])
                } else {
                    upstream.read(o, l).await
                }
            }))
            .await?;
        Ok(parts.into_iter().flatten().collect())
    }
}

/// Asks the upstream's block status for the whole template once the export opens, a
/// gigabyte at a time, so the first misses of a boot do not wait for it. Stops when the
/// export is dropped or the upstream cannot say.
pub(super) async fn learn_allocation(inner: std::sync::Weak<Inner>) {
    let mut base = 0;
    loop {
        let Some(inner) = inner.upgrade() else {
            return;
        };
        if base >= inner.cache().size() || inner.learn_around(base).await.is_none() {
            return;
        }
        base += ALLOCATION_QUERY;
    }
}
