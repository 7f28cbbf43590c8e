//! The LVM SR's volumes: their names, how the VG's space is split between them, and
//! the steps that make them (the VG on the SR's devices, the tagged LVs, the pool
//! built on them) and take them down. Every LV made here carries the SR's tag, and
//! nothing here touches an LV without it.

use std::path::PathBuf;

use uuid::Uuid;

use super::command::{Lvm, owner_tag};
use super::dm::Dm;
use super::pool::{WhenFull, pool_table};
use crate::{Code, Error, Result};

/// The agent's metadata LV.
pub const MGT_LV: &str = "thinline_mgt";
/// The pool's metadata and data LVs (lvm2 reserves names containing `_tmeta`/`_tdata`).
pub const POOL_META_LV: &str = "thinline_pmeta";
pub const POOL_DATA_LV: &str = "thinline_pdata";
/// Bytes of the metadata LV.
pub const MGT_BYTES: u64 = 4 << 20;
/// The pool's block size (dm-thin's and lvm2's default): the unit of allocation and of
/// copy-on-write from an external origin, and the template cache's chunk.
pub const BLOCK_BYTES: u64 = 64 << 10;
/// Bytes of pool metadata per data block: dm-thin needs about 64 (lvm2's estimate);
/// twice that leaves room for snapshots sharing blocks.
const METADATA_PER_BLOCK: u64 = 128;
const MIN_POOL_METADATA: u64 = 8 << 20;
const MAX_POOL_METADATA: u64 = 16 << 30;
/// The data the largest pool metadata maps.
pub const MAX_POOL_DATA: u64 = MAX_POOL_METADATA / METADATA_PER_BLOCK * BLOCK_BYTES;

/// The most data a pool whose metadata LV holds `metadata` bytes maps.
pub fn data_mapped_by(metadata: u64) -> u64 {
    (metadata / METADATA_PER_BLOCK * BLOCK_BYTES).min(MAX_POOL_DATA)
}

/// Refuses a VG name lvm2 would not take, or one that could name a path: `A-Za-z0-9+_.-`,
/// not starting with `-`, not `.` or `..`, at most 127 characters.
pub fn check_vg_name(vg: &str) -> Result<()> {
    let ok = !vg.is_empty()
        && vg.len() <= 127
        && !vg.starts_with('-')
        && vg != "."
        && vg != ".."
        && vg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+_.-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(Error::new(
            Code::InvalidArgument,
            format!("{vg:?} is not a volume group name (letters, digits and +_.- only)"),
        ))
    }
}

/// The device-mapper name of an SR's pool.
pub fn pool_name(sr: Uuid) -> String {
    format!("thinline-{}-pool", sr.simple())
}

/// How an SR's VG is split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizes {
    /// The pool's metadata LV.
    pub pool_metadata: u64,
    /// The pool's data LV.
    pub pool_data: u64,
}

/// Splits `free` bytes of a VG with extents of `extent` bytes: the metadata LV, then
/// the pool's metadata LV (128 bytes per data block, 8 MiB to 16 GiB) and as much
/// again left free (lvm2's repair of pool metadata writes a new copy), `reserve`
/// bytes left free for the user (preallocated VDIs), and the rest for the pool's data,
/// up to [`MAX_POOL_DATA`] (8 TiB).
pub fn sizes(free: u64, extent: u64, reserve: u64) -> Result<Sizes> {
    if extent == 0 || !extent.is_multiple_of(BLOCK_BYTES) && !BLOCK_BYTES.is_multiple_of(extent) {
        return Err(Error::new(
            Code::SrBackendFailure,
            format!("the VG's extent size ({extent} bytes) does not fit 64 KiB blocks"),
        ));
    }
    let round_up = |n: u64| n.div_ceil(extent) * extent;
    let round_down = |n: u64| n / extent * extent;
    let mgt = round_up(MGT_BYTES);
    let usable = free.saturating_sub(mgt).saturating_sub(reserve);
    // Sized for all of `usable` as data: a little more than the data left needs.
    let metadata = round_up(
        (usable / BLOCK_BYTES * METADATA_PER_BLOCK).clamp(MIN_POOL_METADATA, MAX_POOL_METADATA),
    );
    // What the largest metadata maps (8 TiB at 64 KiB blocks); beyond that the VG's
    // space stays free.
    let data = round_down(usable.saturating_sub(2 * metadata)).min(MAX_POOL_DATA);
    let data = data / BLOCK_BYTES * BLOCK_BYTES;
    if data < 16 * BLOCK_BYTES {
        return Err(Error::new(
            Code::SrFull,
            format!(
                "{free} free bytes (less {reserve} reserved) leave no room for a thin pool: it needs its metadata ({metadata} bytes, twice) and data"
            ),
        ));
    }
    Ok(Sizes {
        pool_metadata: metadata,
        pool_data: data,
    })
}

/// What [`create`] made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Created {
    pub vg: String,
    pub sizes: Sizes,
    /// `/dev/VG/thinline_mgt`.
    pub mgt: PathBuf,
    /// The pool's device-mapper name.
    pub pool: String,
    /// The pool's table: what activates it again from its metadata.
    pub pool_table: String,
}

/// What `blkid` finds on `device` (a file system, a PV, a partition table…), if
/// anything.
pub fn signature(device: &std::path::Path) -> Result<Option<String>> {
    let out = std::process::Command::new("blkid")
        .args(["-p", "-o", "value", "-s", "TYPE", "-s", "PTTYPE"])
        .arg(device)
        .env("LC_ALL", "C")
        .output()
        .map_err(|e| Error::io("cannot run blkid (util-linux)", &e))?;
    match out.status.code() {
        Some(0) => Ok(Some(
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .replace('\n', ", "),
        )),
        // 2: nothing found.
        Some(2) => Ok(None),
        _ => Err(Error::new(
            Code::InvalidArgument,
            format!(
                "cannot probe {}: {}",
                device.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        )),
    }
}

/// Makes SR `sr`'s VG `vg` on `devices` (which the caller's `lvm` is limited to), its
/// tagged LVs and the pool on them. Refuses, changing nothing, a device that holds
/// anything `blkid` recognises (a file system, a PV, a partition table: the SR owns
/// empty devices only); undoes what it made if a later step fails.
pub fn create(
    lvm: &Lvm,
    dm: &Dm,
    devices: &[PathBuf],
    vg: &str,
    sr: Uuid,
    reserve: u64,
    when_full: WhenFull,
) -> Result<Created> {
    for d in devices {
        if let Some(found) = signature(d)? {
            return Err(Error::new(
                Code::SrExists,
                format!(
                    "{} holds {found}: an LVM SR is made on empty devices only (wipe it first if its data is not needed)",
                    d.display()
                ),
            ));
        }
    }
    if vg_name_taken(vg)? {
        return Err(Error::new(
            Code::SrExists,
            format!("a volume group named {vg} exists on this host: choose another name"),
        ));
    }
    let names: Vec<&str> = devices.iter().filter_map(|d| d.to_str()).collect();
    let tag = owner_tag(sr);
    let made = (|| {
        lvm.run("pvcreate", &[&["-y"], names.as_slice()].concat())?;
        lvm.run(
            "vgcreate",
            &[&["--addtag", tag.as_str(), vg], names.as_slice()].concat(),
        )?;
        let info = lvm
            .vgs()?
            .into_iter()
            .find(|v| v.name == vg)
            .ok_or_else(|| Error::new(Code::SrBackendFailure, format!("VG {vg} was not made")))?;
        let sizes = sizes(info.free, info.extent_size, reserve)?;
        make_volumes(lvm, dm, vg, sr, sizes, when_full)
    })();
    if made.is_err() {
        let _ = dm.remove(&pool_name(sr));
        let _ = lvm.run("vgremove", &["-f", vg]);
        let _ = lvm.run("pvremove", &[&["-y"], names.as_slice()].concat());
    }
    made
}

/// Makes SR `sr`'s tagged LVs of `sizes` in `vg` and the pool on them.
fn make_volumes(
    lvm: &Lvm,
    dm: &Dm,
    vg: &str,
    sr: Uuid,
    sizes: Sizes,
    when_full: WhenFull,
) -> Result<Created> {
    let tag = owner_tag(sr);
    for (name, bytes) in [
        (MGT_LV, MGT_BYTES),
        (POOL_META_LV, sizes.pool_metadata),
        (POOL_DATA_LV, sizes.pool_data),
    ] {
        let size = format!("{bytes}b");
        // -Zy: the first 4 KiB zeroed (an empty MGT volume, a pool metadata device
        // dm-thin formats).
        lvm.run(
            "lvcreate",
            &["-y", "-Zy", "--addtag", &tag, "-L", &size, "-n", name, vg],
        )?;
    }
    let mgt = PathBuf::from(format!("/dev/{vg}/{MGT_LV}"));
    super::mgt::MetadataVolume::open(&mgt)?.format()?;
    let pool = pool_name(sr);
    let table = pool_table(
        &format!("/dev/{vg}/{POOL_META_LV}"),
        &format!("/dev/{vg}/{POOL_DATA_LV}"),
        sizes.pool_data,
        BLOCK_BYTES,
        0,
        when_full,
    )?;
    dm.create(&pool, &table)?;
    Ok(Created {
        vg: vg.to_owned(),
        sizes,
        mgt,
        pool,
        pool_table: table,
    })
}

/// Makes SR `sr`'s LVs and pool in the user's VG `vg` (which the caller's `lvm` is
/// limited to): a pool of `pool_data` bytes (rounded up to whole extents and blocks),
/// its metadata sized as [`sizes`] does, and the VG tagged as the SR's. `SR_FULL`
/// when the VG's free space lacks the room; nothing of the user's is touched, and
/// what it made is removed again if a step fails.
pub fn create_in(
    lvm: &Lvm,
    dm: &Dm,
    vg: &str,
    sr: Uuid,
    pool_data: u64,
    when_full: WhenFull,
) -> Result<Created> {
    let info = lvm
        .vgs()?
        .into_iter()
        .find(|v| v.name == vg)
        .ok_or_else(|| Error::new(Code::SrNotFound, format!("no VG {vg} on its devices")))?;
    let extent = info.extent_size;
    let round_up = |n: u64| n.div_ceil(extent) * extent;
    let data = round_up(pool_data.div_ceil(BLOCK_BYTES) * BLOCK_BYTES);
    let metadata = round_up(
        (data / BLOCK_BYTES * METADATA_PER_BLOCK).clamp(MIN_POOL_METADATA, MAX_POOL_METADATA),
    );
    let needed = round_up(MGT_BYTES) + 2 * metadata + data;
    if data == 0 || data > MAX_POOL_DATA || needed > info.free {
        return Err(Error::new(
            Code::SrFull,
            format!(
                "VG {vg} has {} free bytes: a pool of {data} bytes needs {needed} (its metadata twice and the agent's metadata volume), at most {MAX_POOL_DATA}",
                info.free
            ),
        ));
    }
    let sizes = Sizes {
        pool_metadata: metadata,
        pool_data: data,
    };
    let tag = owner_tag(sr);
    let made = lvm
        .run("vgchange", &["--addtag", &tag, vg])
        .and_then(|_| make_volumes(lvm, dm, vg, sr, sizes, when_full));
    if made.is_err() {
        let _ = remove_volumes(lvm, dm, vg, sr);
    }
    made
}

/// Takes SR `sr`'s pool down and removes the LVs with its tag from `vg`, and the VG's
/// tag: an SR living in a user's VG leaves it as it found it.
pub fn remove_volumes(lvm: &Lvm, dm: &Dm, vg: &str, sr: Uuid) -> Result<()> {
    let pool = pool_name(sr);
    if dm.exists(&pool) {
        dm.remove(&pool)?;
    }
    let tag = owner_tag(sr);
    for lv in lvm.lvs(vg)?.into_iter().filter(|lv| lv.tags.contains(&tag)) {
        lvm.run("lvremove", &["-y", &format!("{vg}/{}", lv.name)])?;
    }
    lvm.run("vgchange", &["--deltag", &tag, vg]).map(drop)
}

/// Whether a VG named `vg` exists anywhere on the host: the SR's own lvm commands see
/// only its devices, and two VGs of one name would make lvm2 refuse to activate either
/// by name.
fn vg_name_taken(vg: &str) -> Result<bool> {
    let mut c = std::process::Command::new("vgs");
    c.env("LC_ALL", "C")
        .env("LVM_SUPPRESS_FD_WARNINGS", "1")
        .args(["--noheadings", "-o", "vg_name"]);
    let listed = super::output_of(c, "vgs")?;
    Ok(listed.lines().any(|l| l.trim() == vg))
}

/// Takes SR `sr`'s pool down and removes its VG and PVs (an SR that owns its VG).
pub fn destroy(lvm: &Lvm, dm: &Dm, devices: &[PathBuf], vg: &str, sr: Uuid) -> Result<()> {
    let pool = pool_name(sr);
    if dm.exists(&pool) {
        dm.remove(&pool)?;
    }
    let tag = owner_tag(sr);
    let foreign: Vec<String> = lvm
        .lvs(vg)?
        .into_iter()
        .filter(|lv| !lv.tags.contains(&tag))
        .map(|lv| lv.name)
        .collect();
    if !foreign.is_empty() {
        return Err(Error::new(
            Code::SrNotEmpty,
            format!(
                "VG {vg} holds LVs the SR did not make ({}): it is left as it is",
                foreign.join(", ")
            ),
        ));
    }
    lvm.run("vgremove", &["-f", vg])?;
    let names: Vec<&str> = devices.iter().filter_map(|d| d.to_str()).collect();
    lvm.run("pvremove", &[&["-y"], names.as_slice()].concat())
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn the_vg_is_split_into_metadata_pool_metadata_twice_and_data_in_whole_extents_and_blocks() {
        for (free, extent, reserve) in [
            (192 * MIB - 8 * MIB, 4 * MIB, 0),
            (100 * GIB, 4 * MIB, 10 * GIB),
            (10 * 1024 * GIB, 32 * MIB, 0),
            (512 * MIB, 1 << 16, 0),
        ] {
            let s = sizes(free, extent, reserve).unwrap();
            let mgt = MGT_BYTES.div_ceil(extent) * extent;
            let what = format!("{free} {extent} {reserve}: {s:?}");
            assert!(
                mgt + 2 * s.pool_metadata + s.pool_data + reserve <= free,
                "{what}"
            );
            assert!(
                s.pool_metadata.is_multiple_of(extent) && s.pool_data.is_multiple_of(extent),
                "{what}"
            );
            assert!(s.pool_data.is_multiple_of(BLOCK_BYTES), "{what}");
            assert!(
                (MIN_POOL_METADATA..=MAX_POOL_METADATA).contains(&s.pool_metadata),
                "{what}"
            );
            assert!(
                s.pool_metadata >= s.pool_data / BLOCK_BYTES * METADATA_PER_BLOCK,
                "{what}"
            );
            // Little is left unused (an extent or two of rounding) unless the pool is as
            // large as its metadata can map.
            let left = free - reserve - mgt - 2 * s.pool_metadata - s.pool_data;
            let rounding = left <= 2 * extent + BLOCK_BYTES;
            assert!(
                s.pool_data == MAX_POOL_DATA || rounding,
                "{what}: {left} left"
            );
        }
        // A VG larger than a pool can be: the largest pool, the rest free.
        let big = sizes(40 * 1024 * GIB, 4 * MIB, 0).unwrap();
        assert_eq!(
            (big.pool_metadata, big.pool_data),
            (MAX_POOL_METADATA, MAX_POOL_DATA)
        );
        assert_eq!(MAX_POOL_DATA, 8 * 1024 * GIB);
    }

    #[test]
    fn a_vg_too_small_or_all_reserved_is_sr_full() {
        assert_eq!(sizes(16 * MIB, 4 * MIB, 0).unwrap_err().code, Code::SrFull);
        assert_eq!(sizes(GIB, 4 * MIB, GIB).unwrap_err().code, Code::SrFull);
        assert!(sizes(GIB, 0, 0).is_err());
        assert!(sizes(GIB, 96 << 10, 0).is_err());
    }

    #[test]
    fn vg_names_that_lvm2_refuses_or_that_could_name_a_path_are_refused() {
        for good in ["thinline-sr", "vg_1", "a.b+c"] {
            assert!(check_vg_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "-x",
            ".",
            "..",
            "a/b",
            "../etc",
            "a b",
            "é",
            &"x".repeat(128),
        ] {
            assert_eq!(
                check_vg_name(bad).unwrap_err().code,
                Code::InvalidArgument,
                "{bad}"
            );
        }
    }

    #[test]
    fn names_say_whose_they_are() {
        assert_eq!(
            pool_name(Uuid::nil()),
            "thinline-00000000000000000000000000000000-pool"
        );
    }
}
