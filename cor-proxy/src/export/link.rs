//! The link estimate: what the fetches measured of the upstream (round trip, and the
//! time a fetch unit takes on top of it), which decides how many units a miss fetches
//! around itself.

use super::*;

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
