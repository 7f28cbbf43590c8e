//! Changing the backing file an image names, in place (what qemu calls an unsafe
//! rebase: the caller makes sure the guest reads the same through the new backing,
//! for example after copying into the image what the old backing held and the new
//! one does not). The header's backing fields, its extensions and the name are
//! rewritten with one `pwrite` of the header cluster's front, under the image's lock.

use std::os::unix::fs::FileExt;
use std::path::Path;

use super::header::{FORMAT, be32, be64};
use super::lock;
use crate::{Error, Format, Result};

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;

/// Makes the qcow2 image at `path` name `backing` (a name and its format) as its
/// backing file, or none. Version 3 images only.
pub fn set_backing(path: &Path, backing: Option<(&str, Format)>) -> Result<()> {
    let name = path.display().to_string();
    let invalid = |reason: String| Error::invalid(&name, FORMAT, reason);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|source| Error::Open {
            path: name.clone(),
            source,
        })?;
    let _lock = lock::lock_for_writing(&file, &name)?;
    let io = |op| Error::io_at(&name, op, 0, 0);
    let mut fixed = [0u8; 104];
    file.read_exact_at(&mut fixed, 0)
        .map_err(io("read header"))?;
    if &fixed[0..4] != b"QFI\xfb" || be32(&fixed, 4) != 3 {
        return Err(invalid("only qcow2 version 3 images are rebased".into()));
    }
    let bits = be32(&fixed, 20);
    if !(9..=21).contains(&bits) {
        return Err(invalid(format!("cluster_bits {bits} out of range")));
    }
    let cs = 1usize << bits;
    let mut first = vec![0u8; cs];
    file.read_exact_at(&mut first, 0)
        .map_err(io("read header"))?;
    let header_length = be32(&first, 100) as usize;
    if !(104..=cs).contains(&header_length) || !header_length.is_multiple_of(8) {
        return Err(invalid(format!("header_length {header_length} is invalid")));
    }
    // The extensions to keep (all but the backing format), and where the old ones end.
    let mut kept = Vec::new();
    let mut pos = header_length;
    loop {
        if pos + 8 > cs {
            return Err(invalid("the header extensions have no end marker".into()));
        }
        let kind = be32(&first, pos);
        let len = be32(&first, pos + 4) as usize;
        if kind == EXT_END {
            pos += 8;
            break;
        }
        let end = pos + 8 + len.div_ceil(8) * 8;
        if end > cs {
            return Err(invalid(format!(
                "header extension {kind:#010x} runs past the header cluster"
            )));
        }
        if kind != EXT_BACKING_FORMAT {
            kept.extend_from_slice(&first[pos..end]);
        }
        pos = end;
    }
    let old_name_end = match be64(&first, 8) {
        0 => 0,
        at => (at as usize).saturating_add(be32(&first, 16) as usize),
    };
    let old_end = pos.max(old_name_end).min(cs);
    let mut out = first[..header_length].to_vec();
    out.extend_from_slice(&kept);
    if let Some((_, format)) = backing {
        let fmt = format.name().as_bytes();
        out.extend_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
        out.extend_from_slice(&(fmt.len() as u32).to_be_bytes());
        out.extend_from_slice(fmt);
        out.resize(out.len().next_multiple_of(8), 0);
    }
    out.extend_from_slice(&[0u8; 8]);
    let (offset, length) = match backing {
        Some((b, _)) => {
            if b.is_empty() || b.len() > 1023 {
                return Err(invalid(format!(
                    "the backing name {b:?} is empty or too long"
                )));
            }
            let at = out.len();
            out.extend_from_slice(b.as_bytes());
            (at as u64, b.len() as u32)
        }
        None => (0, 0),
    };
    if out.len() > cs {
        return Err(invalid(
            "the new backing name does not fit in the header cluster".into(),
        ));
    }
    out[8..16].copy_from_slice(&offset.to_be_bytes());
    out[16..20].copy_from_slice(&length.to_be_bytes());
    // Zeroes over what the old extensions and name used beyond the new ones.
    out.resize(out.len().max(old_end), 0);
    file.write_all_at(&out, 0).map_err(io("write header"))?;
    file.sync_data().map_err(io("sync"))
}
