//! Units of compressed images decoded lately, kept so that reads of a unit's other blocks
//! (a guest reading a file 4 KiB at a time, in a 64 KiB qcow2 cluster) decode the unit
//! once, not once per block.
//!
//! A deflate unit is first decoded only up to the end of the read that needs it (cheaper,
//! and random reads rarely come back) and kept as an empty prefix, a mark that it was
//! read; a zstd unit is decoded whole at once (zstd decodes a whole block anyway). A read
//! that finds a shorter prefix of its unit kept decodes the whole unit, which later reads
//! of it then slice.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};

use bytes::Bytes;

/// Units kept per export. Only units of at most `INLINE_DECODE_MAX` (128 KiB) are kept,
/// so an export holds at most 2 MiB here.
const KEPT_UNITS: usize = 16;

/// Where a unit's compressed stream lies: in a read-only layer, the same key always
/// decodes to the same bytes (two entries of a crafted image that share a stream's start
/// but not its length are two keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct UnitKey {
    pub layer: usize,
    pub file: usize,
    pub offset: u64,
    pub length: usize,
}

/// What [`DecodedUnits::get`] found.
#[derive(Debug)]
pub(crate) enum Lookup {
    /// The bytes asked for.
    Hit(Bytes),
    /// A prefix of the unit too short for this read: its neighbours are being read.
    Shorter,
    /// Nothing of the unit.
    Miss,
}

/// The last [`KEPT_UNITS`] units decoded, most recent first, each the decoded prefix of
/// its unit (or the whole unit).
#[derive(Debug, Default)]
pub(crate) struct DecodedUnits {
    recent: Mutex<VecDeque<(UnitKey, Bytes)>>,
}

impl DecodedUnits {
    /// Bytes `[skip, end)` of the unit at `key`, if a long enough prefix of it is kept.
    pub(crate) fn get(&self, key: UnitKey, skip: usize, end: usize) -> Lookup {
        let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(i) = recent.iter().position(|(k, _)| *k == key) else {
            return Lookup::Miss;
        };
        let Some(entry) = recent.remove(i) else {
            return Lookup::Miss;
        };
        let found = if skip <= end && end <= entry.1.len() {
            Lookup::Hit(entry.1.slice(skip..end))
        } else {
            Lookup::Shorter
        };
        recent.push_front(entry);
        found
    }

    /// Keeps `decoded`, a prefix of the unit at `key` (or all of it), in place of any
    /// shorter one.
    pub(crate) fn keep(&self, key: UnitKey, decoded: Bytes) {
        let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(i) = recent.iter().position(|(k, _)| *k == key) {
            if recent[i].1.len() >= decoded.len() {
                return;
            }
            recent.remove(i);
        }
        recent.push_front((key, decoded));
        recent.truncate(KEPT_UNITS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(offset: u64) -> UnitKey {
        UnitKey {
            layer: 1,
            file: 0,
            offset,
            length: 9000,
        }
    }

    fn unit(fill: u8, len: usize) -> Bytes {
        Bytes::from(vec![fill; len])
    }

    #[test]
    fn a_kept_unit_serves_any_range_inside_what_was_decoded() {
        let units = DecodedUnits::default();
        units.keep(
            key(4096),
            Bytes::from((0..=255u8).cycle().take(65536).collect::<Vec<_>>()),
        );
        let Lookup::Hit(bytes) = units.get(key(4096), 4096, 8192) else {
            panic!("expected a hit");
        };
        assert_eq!(bytes.len(), 4096);
        assert_eq!(bytes[0], 0);
        assert_eq!(bytes[1], 1);
    }

    #[test]
    fn a_read_past_the_kept_prefix_is_told_a_shorter_prefix_is_kept() {
        let units = DecodedUnits::default();
        units.keep(key(0), unit(7, 4096));
        assert!(matches!(units.get(key(0), 4096, 8192), Lookup::Shorter));
        assert!(matches!(units.get(key(0), 0, 4096), Lookup::Hit(_)));
    }

    #[test]
    fn another_unit_is_a_miss_even_in_the_same_file_or_at_the_same_offset_with_another_length() {
        let units = DecodedUnits::default();
        units.keep(key(0), unit(7, 65536));
        assert!(matches!(units.get(key(65536), 0, 4096), Lookup::Miss));
        let other_layer = UnitKey { layer: 2, ..key(0) };
        assert!(matches!(units.get(other_layer, 0, 4096), Lookup::Miss));
        let other_file = UnitKey { file: 1, ..key(0) };
        assert!(matches!(units.get(other_file, 0, 4096), Lookup::Miss));
        let other_length = UnitKey {
            length: 100,
            ..key(0)
        };
        assert!(matches!(units.get(other_length, 0, 4096), Lookup::Miss));
    }

    #[test]
    fn a_longer_prefix_replaces_a_shorter_one_and_never_the_reverse() {
        let units = DecodedUnits::default();
        units.keep(key(0), unit(1, 4096));
        units.keep(key(0), unit(2, 65536));
        units.keep(key(0), unit(3, 8192));
        let Lookup::Hit(bytes) = units.get(key(0), 0, 65536) else {
            panic!("expected a hit");
        };
        assert!(bytes.iter().all(|&b| b == 2));
    }

    #[test]
    fn the_least_recently_used_unit_goes_first() {
        let units = DecodedUnits::default();
        for i in 0..KEPT_UNITS as u64 {
            units.keep(key(i), unit(i as u8, 4096));
        }
        // Unit 0 is used again, so unit 1 is now the oldest.
        assert!(matches!(units.get(key(0), 0, 4096), Lookup::Hit(_)));
        units.keep(key(1000), unit(9, 4096));
        assert!(matches!(units.get(key(1), 0, 4096), Lookup::Miss));
        assert!(matches!(units.get(key(0), 0, 4096), Lookup::Hit(_)));
        assert!(matches!(units.get(key(1000), 0, 4096), Lookup::Hit(_)));
    }
}
