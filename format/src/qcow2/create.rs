//! Creating qcow2 images (version 3, like `qemu-img create -f qcow2`), and laying out
//! fresh refcount structures for a set of cluster counts — which is also how
//! [`super::repair`] rebuilds the refcounts of a damaged or leaking image.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::layer::Format;
use crate::{Error, Result};

use super::header::{FORMAT, MAX_L1_BYTES, MAX_REFCOUNT_TABLE_BYTES};
use super::writer::set_refcount_entry;

/// Header length written: the v3 fields plus the compression type byte, padded.
const HEADER_LENGTH: u32 = 112;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
/// Where `refcount_table_offset` and `refcount_table_clusters` are in the header.
const HEADER_REFTABLE: u64 = 48;

/// What [`create`] makes.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Guest size in bytes.
    pub size: u64,
    /// Cluster size in bytes: a power of two from 512 B to 2 MiB (64 KiB by default).
    pub cluster_size: u64,
    /// Extended L2 entries (32 subclusters per cluster; clusters of 16 KiB or more).
    pub extended_l2: bool,
    /// The backing file name (a path or a URI, recorded as given) and its format.
    pub backing: Option<(String, Format)>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            cluster_size: 64 << 10,
            extended_l2: false,
            backing: None,
        }
    }
}

fn invalid(path: &str, reason: String) -> Error {
    Error::invalid(path, FORMAT, reason)
}

/// Creates a new qcow2 image at `path` (which must not exist). Nothing is left behind
/// if creation fails.
pub fn create(path: &Path, options: &CreateOptions) -> Result<()> {
    let name = path.display().to_string();
    let cs = options.cluster_size;
    if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
        return Err(invalid(
            &name,
            format!("cluster size {cs} is not a power of two from 512 to 2097152"),
        ));
    }
    if options.extended_l2 && cs < 16 << 10 {
        return Err(invalid(
            &name,
            format!("extended L2 entries need clusters of at least 16384 bytes, not {cs}"),
        ));
    }
    let cluster_bits = cs.trailing_zeros();
    let entry_size = if options.extended_l2 { 16 } else { 8 };
    let per_l2 = cs / entry_size;
    let l1_entries = options.size.div_ceil(cs * per_l2);
    if l1_entries * 8 > MAX_L1_BYTES || options.size > 1 << 63 {
        return Err(invalid(
            &name,
            format!(
                "a size of {} bytes needs an L1 table over qemu's limit with {cs}-byte clusters",
                options.size
            ),
        ));
    }
    let mut header = vec![0u8; cs as usize];
    header[0..4].copy_from_slice(b"QFI\xfb");
    header[4..8].copy_from_slice(&3u32.to_be_bytes());
    header[20..24].copy_from_slice(&cluster_bits.to_be_bytes());
    header[24..32].copy_from_slice(&options.size.to_be_bytes());
    header[36..40].copy_from_slice(&(l1_entries as u32).to_be_bytes());
    header[40..48].copy_from_slice(&cs.to_be_bytes());
    let incompatible = if options.extended_l2 {
        INCOMPAT_EXTENDED_L2
    } else {
        0
    };
    header[72..80].copy_from_slice(&incompatible.to_be_bytes());
    header[96..100].copy_from_slice(&4u32.to_be_bytes());
    header[100..104].copy_from_slice(&HEADER_LENGTH.to_be_bytes());
    let mut at = HEADER_LENGTH as usize;
    if let Some((backing, format)) = &options.backing {
        let fmt = format.name().as_bytes();
        header[at..at + 4].copy_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
        header[at + 4..at + 8].copy_from_slice(&(fmt.len() as u32).to_be_bytes());
        header[at + 8..at + 8 + fmt.len()].copy_from_slice(fmt);
        at += 8 + fmt.len().div_ceil(8) * 8;
        // The end-of-extensions marker (8 zero bytes), then the name.
        at += 8;
        let b = backing.as_bytes();
        if b.is_empty() || b.len() > 1023 || at + b.len() > cs as usize {
            return Err(invalid(
                &name,
                format!(
                    "the backing name {backing:?} is empty, longer than 1023 bytes or does not fit in the header cluster"
                ),
            ));
        }
        header[at..at + b.len()].copy_from_slice(b);
        header[8..16].copy_from_slice(&(at as u64).to_be_bytes());
        header[16..20].copy_from_slice(&(b.len() as u32).to_be_bytes());
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|source| Error::Open {
            path: name.clone(),
            source,
        })?;
    let result = (|| {
        let io = |op| Error::io_at(&name, op, 0, cs);
        file.write_all_at(&header, 0).map_err(io("write header"))?;
        let l1_clusters = (l1_entries * 8).div_ceil(cs);
        file.set_len((1 + l1_clusters) * cs)
            .map_err(io("write L1 table"))?;
        let counts = vec![1u16; (1 + l1_clusters) as usize];
        write_refcounts(&file, &name, cs, 4, &counts)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(path);
    }
    result
}

/// Writes a new refcount table and blocks after the `counts.len()` clusters of the
/// file, where `counts[i]` is the refcount of cluster `i` (the new structures count
/// themselves), makes them durable, then points the header at them and syncs again.
/// The old structures, if any, are left unreferenced (refcount 0) in place.
pub(super) fn write_refcounts(
    file: &File,
    name: &str,
    cs: u64,
    order: u32,
    counts: &[u16],
) -> Result<()> {
    let io = |op, offset, length| Error::io_at(name, op, offset, length);
    let n = counts.len() as u64;
    let rpb = (cs * 8) >> order;
    let max = if order >= 6 {
        u64::MAX
    } else {
        (1u64 << (1u64 << order)) - 1
    };
    if let Some(c) = counts.iter().position(|&v| u64::from(v) > max) {
        return Err(invalid(
            name,
            format!(
                "cluster {c} is referenced {} times, more than {}-bit refcounts hold",
                counts[c],
                1u64 << order
            ),
        ));
    }
    let (mut table_clusters, mut blocks) = (1u64, 1u64);
    loop {
        let total = n + table_clusters + blocks;
        let b = total.div_ceil(rpb);
        let t = (b * 8).div_ceil(cs);
        if (b, t) == (blocks, table_clusters) {
            break;
        }
        (blocks, table_clusters) = (b.max(blocks), t.max(table_clusters));
    }
    if table_clusters * cs > MAX_REFCOUNT_TABLE_BYTES {
        return Err(invalid(
            name,
            format!(
                "a refcount table of {} bytes would exceed qemu's limit",
                table_clusters * cs
            ),
        ));
    }
    let table_at = n;
    let blocks_at = n + table_clusters;
    let end = blocks_at + blocks;
    let mut table = vec![0u8; (table_clusters * cs) as usize];
    let mut block = vec![0u8; cs as usize];
    for k in 0..blocks {
        block.fill(0);
        for c in k * rpb..((k + 1) * rpb).min(end) {
            let v = if c < n {
                u64::from(counts[c as usize])
            } else {
                1
            };
            set_refcount_entry(&mut block, order, (c - k * rpb) as usize, v);
        }
        let offset = (blocks_at + k) * cs;
        file.write_all_at(&block, offset)
            .map_err(io("write refcount block", offset, cs))?;
        table[(k * 8) as usize..(k * 8 + 8) as usize].copy_from_slice(&offset.to_be_bytes());
    }
    let offset = table_at * cs;
    file.write_all_at(&table, offset).map_err(io(
        "write refcount table",
        offset,
        table.len() as u64,
    ))?;
    file.sync_all().map_err(io("sync", 0, 0))?;
    let mut fields = [0u8; 12];
    fields[..8].copy_from_slice(&offset.to_be_bytes());
    fields[8..].copy_from_slice(&(table_clusters as u32).to_be_bytes());
    file.write_all_at(&fields, HEADER_REFTABLE)
        .map_err(io("write header", HEADER_REFTABLE, 12))?;
    file.sync_all().map_err(io("sync", 0, 0))
}
