//! A read-only consistency check like `qemu-img check` (without repair): every cluster
//! the metadata references is counted and the counts are compared with the stored
//! refcounts; references outside the file, misaligned tables and bad entries are errors.

use crate::Result;
use crate::layer::CheckReport;

use super::header::{INCOMPAT_DIRTY, be64};
use super::{COMPRESSED, COPIED, OFFSET_MASK, Qcow2Layer, REFTABLE_MASK, ZERO_FLAG};

/// Largest image checked: one computed and one stored count (2 bytes each) per host
/// cluster, so 64 Mi clusters (4 TiB of 64 KiB clusters) need 256 MiB.
const MAX_CHECK_CLUSTERS: u64 = 1 << 26;
/// Messages kept per list; the rest are only counted.
const MAX_MESSAGES: usize = 1000;

struct Findings {
    errors: Vec<String>,
    warnings: Vec<String>,
    more_errors: u64,
    more_warnings: u64,
    /// Dirty image: refcount mismatches are expected and only warned about.
    dirty: bool,
}

impl Findings {
    fn error(&mut self, m: String) {
        if self.errors.len() < MAX_MESSAGES {
            self.errors.push(m);
        } else {
            self.more_errors += 1;
        }
    }

    fn warning(&mut self, m: String) {
        if self.warnings.len() < MAX_MESSAGES {
            self.warnings.push(m);
        } else {
            self.more_warnings += 1;
        }
    }

    /// A refcount inconsistency: an error, or a warning in a dirty image.
    fn refcount(&mut self, m: String) {
        if self.dirty {
            self.warning(m);
        } else {
            self.error(m);
        }
    }
}

struct Walk<'a> {
    layer: &'a Qcow2Layer,
    cs: u64,
    clusters: u64,
    file_size: u64,
    computed: Vec<u16>,
    stored: Vec<u16>,
    f: Findings,
    stats: Stats,
    /// Compare with stored refcounts (false when only counting references).
    compare: bool,
}

#[derive(Default)]
struct Stats {
    l2_tables: u64,
    allocated: u64,
    compressed: u64,
    zero: u64,
}

impl Walk<'_> {
    /// Counts one reference to each cluster of `[offset, offset + length)`.
    fn reference(&mut self, what: &str, offset: u64, length: u64) -> bool {
        if length == 0 {
            return true;
        }
        let first = offset / self.cs;
        let last = offset.saturating_add(length - 1) / self.cs;
        if last >= self.clusters {
            self.f.error(format!(
                "{what} at offset {offset} ({length} bytes) lies beyond the end of the file ({} bytes)",
                self.file_size
            ));
            return false;
        }
        for c in first..=last {
            let n = &mut self.computed[c as usize];
            *n = n.saturating_add(1);
        }
        true
    }

    fn aligned(&mut self, what: &str, offset: u64) -> bool {
        if !offset.is_multiple_of(self.cs) {
            self.f.error(format!(
                "{what} at offset {offset:#x} is not cluster aligned"
            ));
            return false;
        }
        true
    }

    fn stored(&self, offset: u64) -> u16 {
        self.stored
            .get((offset / self.cs) as usize)
            .copied()
            .unwrap_or(0)
    }

    /// Checks the COPIED flag of an active-table entry against the stored refcount.
    fn copied(&mut self, what: &str, offset: u64, entry: u64) {
        if !self.compare {
            return;
        }
        let one = self.stored(offset) == 1;
        if one != (entry & COPIED != 0) {
            self.f.refcount(format!(
                "{what} at offset {offset:#x}: COPIED flag is {} but the refcount is {}",
                u8::from(entry & COPIED != 0),
                self.stored(offset)
            ));
        }
    }

    fn walk_l1(&mut self, l1: &[u64], active: bool, label: &str) {
        let layer = self.layer;
        let entries_per_l2 = 1u64 << (layer.l1_bits - layer.cluster_bits);
        for (i, &l1e) in l1.iter().enumerate() {
            let l2_offset = l1e & OFFSET_MASK;
            if l2_offset == 0 {
                continue;
            }
            let what = format!("{label} L2 table (L1 index {i})");
            if !self.aligned(&what, l2_offset) || !self.reference(&what, l2_offset, self.cs) {
                continue;
            }
            self.stats.l2_tables += u64::from(active);
            if active {
                self.copied(&what, l2_offset, l1e);
            }
            let l2 = match layer.read_meta("L2 table", l2_offset, self.cs) {
                Ok(t) => t,
                Err(e) => {
                    self.f.error(format!("{what}: {e}"));
                    continue;
                }
            };
            for j in 0..entries_per_l2 {
                let at = j as usize * layer.entry_size;
                let entry = be64(&l2, at);
                let guest = (i as u64 * entries_per_l2 + j) * self.cs;
                self.walk_entry(entry, be64(&l2, at + 8), guest, active, label);
            }
        }
    }

    fn walk_entry(&mut self, entry: u64, bitmap: u64, guest: u64, active: bool, label: &str) {
        let layer = self.layer;
        if entry & COMPRESSED != 0 {
            if active {
                self.stats.compressed += 1;
            }
            if layer.has_data_file() {
                self.f.error(format!(
                    "{label} compressed cluster at guest offset {guest:#x} in an image with an external data file"
                ));
                return;
            }
            let (offset, _) = layer.compressed_extent(entry);
            let x = 62 - (layer.cluster_bits - 8);
            let sectors = ((entry & (COMPRESSED - 1)) >> x) + 1;
            self.reference(
                &format!("{label} compressed cluster of guest offset {guest:#x}"),
                offset & !511,
                sectors * 512,
            );
            return;
        }
        let host = entry & OFFSET_MASK;
        if layer.extended {
            let (alloc, zero) = (bitmap as u32, (bitmap >> 32) as u32);
            if alloc & zero != 0 {
                self.f.error(format!(
                    "{label} L2 entry of guest offset {guest:#x}: subclusters both allocated and zero (bitmap {bitmap:#018x})"
                ));
            }
            if host == 0 && alloc != 0 && !layer.has_data_file() {
                self.f.error(format!(
                    "{label} L2 entry of guest offset {guest:#x}: allocated subclusters without a host offset"
                ));
            }
            if active && zero == u32::MAX {
                self.stats.zero += 1;
            }
        } else if entry & ZERO_FLAG != 0 {
            if layer.header.raw.version < 3 {
                self.f.error(format!(
                    "{label} zero cluster entry at guest offset {guest:#x} in a version 2 image"
                ));
            }
            if active {
                self.stats.zero += 1;
            }
        }
        if host == 0 {
            return;
        }
        if active {
            self.stats.allocated += 1;
        }
        let what = format!("{label} data cluster of guest offset {guest:#x}");
        if layer.has_data_file() {
            // Data clusters of an external data file are not refcounted.
            if host != guest {
                self.f.error(format!(
                    "{what}: data file offset {host:#x} differs from it"
                ));
            }
            return;
        }
        if self.aligned(&what, host) && self.reference(&what, host, self.cs) && active {
            self.copied(&what, host, entry);
        }
    }
}

/// Reads the stored refcount of every cluster (saturated at `u16::MAX`).
fn read_refcounts(w: &mut Walk<'_>) {
    let layer = w.layer;
    let raw = layer.header.raw;
    let table_len = u64::from(raw.refcount_table_clusters) * w.cs;
    if !w.reference("refcount table", raw.refcount_table_offset, table_len) {
        return;
    }
    let table = match layer.read_meta("refcount table", raw.refcount_table_offset, table_len) {
        Ok(t) => t,
        Err(e) => {
            w.f.error(format!("refcount table: {e}"));
            return;
        }
    };
    let bits = 1u64 << raw.refcount_order;
    let per_block = w.cs * 8 / bits;
    for (k, chunk) in table.chunks_exact(8).enumerate() {
        let block_offset = be64(chunk, 0) & REFTABLE_MASK;
        if block_offset == 0 {
            continue;
        }
        let what = format!("refcount block (table index {k})");
        if !w.aligned(&what, block_offset) || !w.reference(&what, block_offset, w.cs) {
            continue;
        }
        let block = match layer.read_meta("refcount block", block_offset, w.cs) {
            Ok(b) => b,
            Err(e) => {
                w.f.error(format!("{what}: {e}"));
                continue;
            }
        };
        let base = k as u64 * per_block;
        for i in 0..per_block {
            let cluster = base + i;
            if cluster >= w.clusters {
                break;
            }
            let value = refcount_entry(&block, raw.refcount_order, i as usize);
            w.stored[cluster as usize] = value.min(u64::from(u16::MAX)) as u16;
        }
    }
}

/// Entry `i` of a refcount block of `1 << order`-bit entries.
pub(super) fn refcount_entry(block: &[u8], order: u32, i: usize) -> u64 {
    let byte = |at: usize| u64::from(block.get(at).copied().unwrap_or(0));
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            (byte(i / per_byte) >> ((i % per_byte) * bits)) & ((1 << bits) - 1)
        }
        3 => byte(i),
        4 => (byte(i * 2) << 8) | byte(i * 2 + 1),
        5 => u64::from(super::header::be32(block, i * 4)),
        _ => be64(block, i * 8),
    }
}

/// A walk over `layer` with empty counts.
fn new_walk(layer: &Qcow2Layer, compare: bool) -> Result<Walk<'_>> {
    let cs = layer.cluster_size;
    let file_size = layer.files[0].size();
    let clusters = file_size.div_ceil(cs);
    if clusters > MAX_CHECK_CLUSTERS {
        return Err(crate::Error::unsupported(
            layer.name(),
            super::FORMAT,
            format!(
                "the file has {clusters} clusters; checking more than {MAX_CHECK_CLUSTERS} is refused (memory bound)"
            ),
        ));
    }
    let raw = layer.header.raw;
    let dirty = raw.incompatible & INCOMPAT_DIRTY != 0;
    Ok(Walk {
        layer,
        cs,
        clusters,
        file_size,
        computed: vec![0; clusters as usize],
        stored: vec![0; clusters as usize],
        f: Findings {
            errors: Vec::new(),
            warnings: Vec::new(),
            more_errors: 0,
            more_warnings: 0,
            dirty,
        },
        stats: Stats::default(),
        compare,
    })
}

/// The references of every cluster of `layer` but its refcount structures, and the
/// errors found on the way (references outside the file, misaligned tables, bad
/// entries), for [`super::repair`].
pub(super) fn references(layer: &Qcow2Layer) -> Result<(Vec<u16>, Vec<String>)> {
    let mut w = new_walk(layer, false)?;
    walk_references(&mut w);
    let mut errors = w.f.errors;
    if w.f.more_errors > 0 {
        errors.push(format!("… and {} more errors", w.f.more_errors));
    }
    Ok((w.computed, errors))
}

pub(super) fn check(layer: &Qcow2Layer, report: &mut CheckReport) -> Result<()> {
    let mut w = new_walk(layer, true)?;
    read_refcounts(&mut w);
    walk_references(&mut w);
    let (cs, clusters) = (w.cs, w.clusters);
    let h = &layer.header;
    let dirty = w.f.dirty;
    check_counts(w, h, dirty, cs, clusters, report);
    Ok(())
}

/// Counts every reference but those of the refcount structures.
fn walk_references(w: &mut Walk<'_>) {
    let layer = w.layer;
    let raw = layer.header.raw;
    let cs = w.cs;
    w.reference("header", 0, cs);
    w.reference("L1 table", raw.l1_table_offset, u64::from(raw.l1_size) * 8);
    w.walk_l1(&layer.l1, true, "active");

    let h = &layer.header;
    if !h.snapshots.is_empty() {
        w.reference("snapshot table", raw.snapshots_offset, h.snapshot_table_len);
    }
    for (n, snap) in h.snapshots.iter().enumerate() {
        let label = format!("snapshot {:?}", snap.name);
        let bytes = u64::from(snap.l1_size) * 8;
        if bytes > super::header::MAX_L1_BYTES {
            w.f.error(format!("{label}: L1 size {} exceeds 32 MiB", snap.l1_size));
            continue;
        }
        let what = format!("{label} L1 table");
        if !w.aligned(&what, snap.l1_offset) || !w.reference(&what, snap.l1_offset, bytes) {
            continue;
        }
        match layer.read_meta("snapshot L1 table", snap.l1_offset, bytes) {
            Ok(t) => {
                let l1: Vec<u64> = t.chunks_exact(8).map(|c| be64(c, 0)).collect();
                w.walk_l1(&l1, false, &label);
            }
            Err(e) => w.f.error(format!("snapshot {n} L1 table: {e}")),
        }
    }

    if let Some(dir) = h.bitmap_directory {
        w.reference("bitmap directory", dir.offset, dir.size);
        for bm in &h.bitmaps {
            let what = format!("bitmap {:?} table", bm.name);
            let bytes = u64::from(bm.table_size) * 8;
            if bytes > super::header::MAX_L1_BYTES {
                w.f.error(format!("{what}: {} entries is too many", bm.table_size));
                continue;
            }
            if !w.aligned(&what, bm.table_offset) || !w.reference(&what, bm.table_offset, bytes) {
                continue;
            }
            match layer.read_meta("bitmap table", bm.table_offset, bytes) {
                Ok(t) => {
                    for (i, c) in t.chunks_exact(8).enumerate() {
                        let off = be64(c, 0) & OFFSET_MASK;
                        let what = format!("bitmap {:?} data cluster {i}", bm.name);
                        if off != 0 && w.aligned(&what, off) {
                            w.reference(&what, off, cs);
                        }
                    }
                }
                Err(e) => w.f.error(format!("{what}: {e}")),
            }
        }
    }
}

fn check_counts(
    mut w: Walk<'_>,
    h: &super::header::Header,
    dirty: bool,
    cs: u64,
    clusters: u64,
    report: &mut CheckReport,
) {
    let mut leaked = 0u64;
    let mut mismatched = 0u64;
    for c in 0..clusters as usize {
        let (stored, computed) = (w.stored[c], w.computed[c]);
        if stored == computed || (stored == u16::MAX && computed == u16::MAX) {
            continue;
        }
        let offset = c as u64 * cs;
        if stored < computed {
            mismatched += 1;
            w.f.refcount(format!(
                "cluster {c} (offset {offset:#x}) referenced {computed} times, refcount {stored}"
            ));
        } else {
            leaked += 1;
            w.f.warning(format!(
                "cluster {c} (offset {offset:#x}) leaked: refcount {stored}, referenced {computed} times"
            ));
        }
    }
    let mut f = w.f;
    if dirty && (leaked > 0 || mismatched > 0) {
        f.warning(
            "the image is dirty (not closed cleanly with lazy refcounts): stale refcounts are expected; \
             `qemu-img check -r all` rebuilds them"
                .to_owned(),
        );
    }
    if f.more_errors > 0 {
        f.errors
            .push(format!("… and {} more errors", f.more_errors));
    }
    if f.more_warnings > 0 {
        f.warnings
            .push(format!("… and {} more warnings", f.more_warnings));
    }
    report.errors.extend(f.errors);
    report.warnings.extend(f.warnings);
    let s = w.stats;
    report.stats.extend([
        ("clusters".to_owned(), clusters),
        ("L2 tables".to_owned(), s.l2_tables),
        ("allocated clusters".to_owned(), s.allocated),
        ("compressed clusters".to_owned(), s.compressed),
        ("zero clusters".to_owned(), s.zero),
        ("leaked clusters".to_owned(), leaked),
        ("refcount errors".to_owned(), mismatched),
        ("snapshots".to_owned(), h.snapshots.len() as u64),
        ("bitmaps".to_owned(), h.bitmaps.len() as u64),
    ]);
}
