//! Speculation: fetches started ahead of client reads, sequential readahead per miss
//! stream and the neighbours of a miss, sized by what the fetches measured of the link
//! (round trip, and the time a fetch unit takes on top of it). Owns the stream table
//! and the link estimate; only takes fetch slots while enough stay free for demand.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::Inner;
use super::in_flight::UnitFetch;

/// Sequential streams tracked for readahead.
const STREAMS: usize = 8;
/// Largest readahead window, in fetch units.
const MAX_READAHEAD_UNITS: u64 = 16;

/// What speculation knows: the miss streams and the link.
#[derive(Debug)]
pub(super) struct Speculation {
    /// Sequential miss streams: (next unit expected, readahead window in units).
    streams: Mutex<Vec<(u64, u64)>>,
    max_fetches: usize,
    fetch_around: u64,
    /// Round trip and transfer time of the upstream, for `fetch_around`.
    link: Mutex<LinkEstimate>,
}

impl Speculation {
    pub(super) fn new(max_fetches: usize, fetch_around: u64) -> Speculation {
        Speculation {
            streams: Mutex::new(Vec::new()),
            max_fetches: max_fetches.max(1),
            fetch_around,
            link: Mutex::new(LinkEstimate::default()),
        }
    }

    /// Records one demand fetch's timing (see [`LinkEstimate::record`]).
    pub(super) fn record_link(&self, round_trip: Duration, transfer: Duration, units: f64) {
        self.link
            .lock()
            .expect("link lock")
            .record(round_trip, transfer, units);
    }

    /// The readahead window after a miss of units `[first, last]`: grown if the miss
    /// continues a stream, 0 otherwise.
    fn window(&self, first: u64, last: u64) -> u64 {
        let mut streams = self.streams.lock().expect("streams lock");
        if let Some(i) = streams.iter().position(|&(next, _)| first == next) {
            // The stream moved on to the next unit: widen its window.
            let (_, w) = streams.remove(i);
            let w = (w * 2).clamp(1, MAX_READAHEAD_UNITS);
            streams.push((last + 1, w));
            w
        } else if streams.iter().any(|&(next, _)| first + 1 == next) {
            // More of the unit a stream is in (or another reader of it): no change.
            0
        } else {
            if streams.len() == STREAMS {
                streams.remove(0);
            }
            streams.push((last + 1, 0));
            0
        }
    }
}

impl Inner {
    /// After a miss of units `[first, last]`: if it continues a sequential stream, grow
    /// that stream's window and start fetching the absent units ahead of it (without
    /// waiting), while enough fetch permits are free for demand reads.
    pub(super) fn read_ahead(self: &Arc<Self>, first: u64, last: u64) {
        let window = self.speculation().window(first, last);
        let units = self.cache().size().div_ceil(self.unit());
        self.speculate(last + 1..(last + 1 + window).min(units));
    }

    /// After a miss of units `[first, last]`: fetch `fetch_around` units on each side,
    /// nearest first, the following ones before the preceding ones.
    pub(super) fn fetch_around(self: &Arc<Self>, first: u64, last: u64) {
        let k = self.fetch_around_now();
        if k == 0 {
            return;
        }
        let units = self.cache().size().div_ceil(self.unit());
        let after = last + 1..(last + 1 + k).min(units);
        let before = (first.saturating_sub(k)..first).rev();
        self.speculate(after.chain(before));
    }

    /// Units fetched on each side of a miss now: `fetch_around`, fewer when moving a
    /// unit takes the upstream longer than a round trip divided by that many.
    pub(super) fn fetch_around_now(&self) -> u64 {
        let s = self.speculation();
        s.link
            .lock()
            .expect("link lock")
            .units_per_round_trip()
            .map_or(s.fetch_around, |n| n.min(s.fetch_around))
    }

    /// Starts fetches of `units` that are not cached or in flight, without waiting,
    /// while more than a quarter of the fetch slots stay free for demand reads.
    fn speculate(self: &Arc<Self>, units: impl Iterator<Item = u64>) {
        let max_fetches = self.speculation().max_fetches;
        for u in units {
            if self.in_flight().free_permits() <= max_fetches / 4 {
                break;
            }
            if matches!(self.fetch_for(u, None), UnitFetch::Started(_)) {
                self.stats().speculative();
            }
        }
    }
}

/// What the fetches measured of the upstream: how long a round trip takes, and how
/// long moving one fetch unit takes on top of it (moving averages).
#[derive(Debug, Default)]
pub(super) struct LinkEstimate {
    round_trip_s: f64,
    unit_transfer_s: f64,
    samples: u32,
}

impl LinkEstimate {
    /// Weight of a new sample in the averages.
    const WEIGHT: f64 = 0.25;

    /// One demand fetch: its small first request took `round_trip`, the rest of the
    /// unit (`units` fetch units of data) arrived `transfer` after it.
    pub(super) fn record(&mut self, round_trip: Duration, transfer: Duration, units: f64) {
        let rtt = round_trip.as_secs_f64();
        let per_unit = transfer.as_secs_f64() / units.max(f64::MIN_POSITIVE);
        if self.samples == 0 {
            (self.round_trip_s, self.unit_transfer_s) = (rtt, per_unit);
        } else {
            self.round_trip_s += Self::WEIGHT * (rtt - self.round_trip_s);
            self.unit_transfer_s += Self::WEIGHT * (per_unit - self.unit_transfer_s);
        }
        self.samples = self.samples.saturating_add(1);
    }

    /// How many units the upstream moves in one round trip (`None` before the first
    /// measurement): fetching that many more per miss costs less than the round trip
    /// of a later miss it may save.
    pub(super) fn units_per_round_trip(&self) -> Option<u64> {
        if self.samples == 0 {
            return None;
        }
        if self.unit_transfer_s <= 0.0 {
            return Some(u64::MAX);
        }
        // Float to integer casts saturate.
        Some((self.round_trip_s / self.unit_transfer_s) as u64)
    }
}
