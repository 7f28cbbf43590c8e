//! In-flight sharing: one fetch per fetch unit, whatever the number of readers (demand,
//! speculation, prefetch), and the slots that bound the fetches running at once.
//!
//! An entry lives from the fetch's start until its chunks are durable and marked (the
//! batcher removes it), so a reader never reads a chunk from the cache before its bit
//! is set. Why this is not thinline-source's fetch engine's in-flight map: see
//! docs/design.md, "Two in-flight maps, on purpose".

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use thinline_nbd::proto::errno;
use thinline_nbd::{DataError, Error, Result};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use super::Inner;
use super::error_chain;
use super::fetch::{Fetched, fetch_unit};

pub(super) type Outcome = std::result::Result<Arc<Fetched>, Arc<Error>>;
/// Where a fetch announces its outcome, and where readers wait for it.
pub(super) type OutcomeTx = watch::Sender<Option<Outcome>>;
type OutcomeRx = watch::Receiver<Option<Outcome>>;

/// The units being fetched or waiting to be marked, and the fetch slots.
#[derive(Debug)]
pub(super) struct InFlightMap {
    map: Mutex<HashMap<u64, Arc<InFlight>>>,
    permits: Arc<Semaphore>,
}

impl InFlightMap {
    pub(super) fn new(max_fetches: usize) -> InFlightMap {
        InFlightMap {
            map: Mutex::new(HashMap::new()),
            permits: Arc::new(Semaphore::new(max_fetches.max(1))),
        }
    }

    /// True when no unit is being fetched or waiting to be marked.
    pub(super) fn is_empty(&self) -> bool {
        self.map.lock().expect("in-flight lock").is_empty()
    }

    /// Drops the entries of `units`: their chunks are marked (or will not be).
    pub(super) fn remove(&self, units: impl IntoIterator<Item = u64>) {
        let mut map = self.map.lock().expect("in-flight lock");
        for u in units {
            map.remove(&u);
        }
    }

    /// Waits for a fetch slot (`None` once the semaphore is closed, which it never is).
    pub(super) async fn permit(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.permits).acquire_owned().await.ok()
    }

    /// Fetch slots free now.
    pub(super) fn free_permits(&self) -> usize {
        self.permits.available_permits()
    }
}

/// A unit being fetched, or fetched and waiting to become durable.
#[derive(Debug)]
pub(super) struct InFlight {
    done: OutcomeRx,
    /// The fetch unit's `(offset, length)`, for errors.
    range: (u64, u64),
    /// For a fetch a client read started: the chunk-aligned `[start, end)` that read
    /// needed, fetched by its own upstream requests, and their outcome, so readers
    /// inside it do not wait for the rest of the unit to arrive.
    first: Option<((u64, u64), OutcomeRx)>,
}

/// What asking for a unit's fetch found.
pub(super) enum UnitFetch {
    /// Every chunk of the unit is present.
    Present,
    /// A fetch was already in flight.
    Joined(Arc<InFlight>),
    /// This call started the fetch.
    Started(Arc<InFlight>),
}

impl UnitFetch {
    /// The fetch to wait for, if any.
    pub(super) fn entry(self) -> Option<Arc<InFlight>> {
        match self {
            UnitFetch::Present => None,
            UnitFetch::Joined(e) | UnitFetch::Started(e) => Some(e),
        }
    }
}

impl Inner {
    /// The in-flight entry of unit `u`, created (and its fetch spawned) if needed;
    /// `None` when every chunk of the unit is present.
    fn fetch(self: &Arc<Self>, u: u64) -> Option<Arc<InFlight>> {
        self.fetch_for(u, None).entry()
    }

    /// [`Self::fetch`] for a client read of `[offset, end)` in unit `u`: a new fetch
    /// requests the chunks that read needs first, on their own.
    pub(super) fn fetch_for(self: &Arc<Self>, u: u64, read: Option<(u64, u64)>) -> UnitFetch {
        let mut map = self.in_flight().map.lock().expect("in-flight lock");
        if let Some(f) = map.get(&u) {
            return UnitFetch::Joined(Arc::clone(f));
        }
        // Bits are set before entries are removed, so this sees the marks of any entry
        // that is gone.
        let runs = self.absent_runs(u);
        if runs.is_empty() {
            return UnitFetch::Present;
        }
        let (tx, rx) = watch::channel(None);
        let unit = self.unit();
        let size = self.cache().size();
        let start = u * unit;
        let c = self.chunk();
        // The read's chunks, when they are not the whole unit's absent part anyway.
        let first = read
            .map(|(lo, hi)| (lo / c * c, hi.div_ceil(c).saturating_mul(c).min(size)))
            .filter(|&(lo, hi)| {
                runs.first().is_some_and(|&(o, _)| o < lo)
                    || runs.last().is_some_and(|&(o, l)| o + l > hi)
            })
            .map(|range| (range, watch::channel(None)));
        let entry = Arc::new(InFlight {
            done: rx,
            range: (start, unit.min(size - start)),
            first: first.as_ref().map(|(range, (_, rx))| (*range, rx.clone())),
        });
        map.insert(u, Arc::clone(&entry));
        drop(map);
        let first = first.map(|(range, (tx, _))| (range, tx));
        // Counted from now (waiting for a fetch slot included) until its data arrives.
        self.stats().fetch_started();
        tokio::spawn(fetch_unit(Arc::clone(self), u, runs, first, tx));
        UnitFetch::Started(entry)
    }

    /// Drops unit `u`'s entry: its fetch failed or its chunks will not be marked.
    pub(super) fn forget(&self, u: u64) {
        self.in_flight().remove([u]);
    }

    /// Waits for an in-flight fetch; demand waits hold prefetch back.
    async fn wait(
        &self,
        entry: &InFlight,
        demand: bool,
    ) -> std::result::Result<Arc<Fetched>, Error> {
        self.wait_on(entry, entry.done.clone(), demand).await
    }

    /// Waits for the part of an in-flight fetch that covers `[offset, end)`: the
    /// read's own first requests when they cover it, else the whole unit.
    pub(super) async fn wait_for_range(
        &self,
        entry: &InFlight,
        offset: u64,
        end: u64,
    ) -> std::result::Result<Arc<Fetched>, Error> {
        let rx = match &entry.first {
            Some(((lo, hi), rx)) if *lo <= offset && end <= *hi => rx.clone(),
            _ => entry.done.clone(),
        };
        self.wait_on(entry, rx, true).await
    }

    async fn wait_on(
        &self,
        entry: &InFlight,
        mut rx: OutcomeRx,
        demand: bool,
    ) -> std::result::Result<Arc<Fetched>, Error> {
        let waiting = demand.then(|| self.demand().enter());
        let outcome = rx.wait_for(Option::is_some).await.map(|v| v.clone());
        drop(waiting);
        let upstream = || self.upstream().name().to_owned();
        let (offset, length) = entry.range;
        match outcome {
            Ok(Some(Ok(f))) => Ok(f),
            Ok(Some(Err(e))) => Err(Error::from(DataError::upstream(
                upstream(),
                "fetch",
                offset,
                length,
                e.nbd_errno(),
                error_chain(&e),
            ))),
            _ => Err(Error::from(DataError::upstream(
                upstream(),
                "fetch",
                offset,
                length,
                errno::EIO,
                "the fetch was abandoned (shutting down)".to_owned(),
            ))),
        }
    }

    /// Fetches the absent parts of `[offset, offset + length)` and waits for them.
    pub(super) async fn hydrate(
        self: &Arc<Self>,
        offset: u64,
        length: u64,
        demand: bool,
    ) -> Result<()> {
        if length == 0 {
            return Ok(());
        }
        let unit = self.unit();
        let (first, last) = (offset / unit, (offset + length - 1) / unit);
        let entries: Vec<_> = (first..=last).filter_map(|u| self.fetch(u)).collect();
        for e in entries {
            self.wait(&e, demand).await?;
        }
        Ok(())
    }
}
