//! The dm-thin pool as the LVM SR drives it with dmsetup: the tables of the pool and
//! of its thin devices, the messages that create and delete thin ids, and the pool's
//! status. lvm2 cannot take a device that is not an LV of the VG (the template's NBD
//! device) as a thin volume's external origin, and its transaction ids would fight
//! messages sent by hand, so the agent builds the pool itself on two LVs it creates
//! (metadata and data) and keeps thin ids in its own metadata (see `docs/lvm-sr.md`).

use crate::{Code, Error, Result};

/// Bytes per sector, the unit of device-mapper tables.
pub const SECTOR: u64 = 512;
/// Thin device ids are 24 bits.
pub const MAX_THIN_ID: u32 = (1 << 24) - 1;

/// What the pool does when its data device is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Writes fail at once with ENOSPC (`SR_FULL` for the agent's own writes).
    Error,
    /// Writes wait (up to the kernel's `no_space_timeout`) for the pool to grow.
    Queue,
}

/// The thin-pool target's table: `data_bytes` of data on `data_dev`, mapped by
/// `metadata_dev`, in blocks of `block_bytes`. Block zeroing stays on (a new block
/// never shows another volume's old data) and discards are passed down.
pub fn pool_table(
    metadata_dev: &str,
    data_dev: &str,
    data_bytes: u64,
    block_bytes: u64,
    low_water_blocks: u64,
    when_full: WhenFull,
) -> Result<String> {
    // 64 KiB to 1 GiB, a multiple of 64 KiB (dm-thin's rule).
    if !(64 << 10..=1 << 30).contains(&block_bytes) || !block_bytes.is_multiple_of(64 << 10) {
        return Err(Error::new(
            Code::InvalidArgument,
            format!(
                "a thin pool's block size must be a multiple of 64 KiB up to 1 GiB, not {block_bytes} bytes"
            ),
        ));
    }
    if data_bytes == 0 || !data_bytes.is_multiple_of(block_bytes) {
        return Err(Error::new(
            Code::InvalidArgument,
            format!(
                "the pool's data ({data_bytes} bytes) must be a whole number of {block_bytes}-byte blocks"
            ),
        ));
    }
    let features = match when_full {
        WhenFull::Error => " 1 error_if_no_space",
        WhenFull::Queue => " 0",
    };
    Ok(format!(
        "0 {} thin-pool {metadata_dev} {data_dev} {} {low_water_blocks}{features}",
        data_bytes / SECTOR,
        block_bytes / SECTOR
    ))
}

/// A thin device's table: thin id `id` of `pool_dev`, `size` bytes, reading what it
/// never wrote from `external_origin` (a read-only device: the template) if given.
pub fn thin_table(
    pool_dev: &str,
    id: u32,
    size: u64,
    external_origin: Option<&str>,
) -> Result<String> {
    check_id(id)?;
    if size == 0 || !size.is_multiple_of(SECTOR) {
        return Err(Error::new(
            Code::InvalidArgument,
            format!("a thin device's size must be a positive multiple of 512 bytes, not {size}"),
        ));
    }
    let origin = external_origin.map(|o| format!(" {o}")).unwrap_or_default();
    Ok(format!("0 {} thin {pool_dev} {id}{origin}", size / SECTOR))
}

fn check_id(id: u32) -> Result<()> {
    if id > MAX_THIN_ID {
        return Err(Error::new(
            Code::SrBackendFailure,
            format!("thin id {id} is beyond dm-thin's 24 bits"),
        ));
    }
    Ok(())
}

/// A message to the pool (`dmsetup message POOL 0 MESSAGE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message {
    CreateThin(u32),
    /// A snapshot `0` of thin id `1` (the origin must be suspended first if active).
    CreateSnap(u32, u32),
    Delete(u32),
    /// Compare-and-swap of the pool's transaction id.
    SetTransactionId(u64, u64),
    ReserveMetadataSnap,
    ReleaseMetadataSnap,
}

impl Message {
    /// The message's text.
    pub fn text(self) -> Result<String> {
        Ok(match self {
            Message::CreateThin(id) => {
                check_id(id)?;
                format!("create_thin {id}")
            }
            Message::CreateSnap(id, origin) => {
                check_id(id)?;
                check_id(origin)?;
                format!("create_snap {id} {origin}")
            }
            Message::Delete(id) => {
                check_id(id)?;
                format!("delete {id}")
            }
            Message::SetTransactionId(old, new) => format!("set_transaction_id {old} {new}"),
            Message::ReserveMetadataSnap => "reserve_metadata_snap".into(),
            Message::ReleaseMetadataSnap => "release_metadata_snap".into(),
        })
    }
}

/// The pool's mode, from its status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolMode {
    ReadWrite,
    ReadOnly,
    OutOfDataSpace,
    /// The target failed (`Fail`) or reported an error.
    Failed,
}

/// `dmsetup status` of a thin pool, decoded.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PoolStatus {
    pub transaction_id: u64,
    pub metadata_used: u64,
    pub metadata_total: u64,
    pub data_used: u64,
    pub data_total: u64,
    pub mode: PoolMode,
    pub error_if_no_space: bool,
    /// Metadata damage found by the kernel: thin_check/thin_repair before reuse.
    pub needs_check: bool,
}

impl PoolStatus {
    /// Data use in percent (0–100).
    pub fn data_percent(&self) -> f64 {
        percent(self.data_used, self.data_total)
    }

    /// Metadata use in percent (0–100).
    pub fn metadata_percent(&self) -> f64 {
        percent(self.metadata_used, self.metadata_total)
    }
}

fn percent(used: u64, total: u64) -> f64 {
    if total == 0 {
        return 0.0;
    }
    used as f64 * 100.0 / total as f64
}

/// Decodes one `dmsetup status` line of a thin-pool target, e.g.
/// `0 2097152 thin-pool 1 11/1024 0/16384 - rw discard_passdown queue_if_no_space - 1024`.
pub fn parse_pool_status(line: &str) -> Result<PoolStatus> {
    let bad = |why: &str| {
        Error::new(
            Code::SrBackendFailure,
            format!("thin-pool status {line:?} cannot be read: {why}"),
        )
    };
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words
        .iter()
        .position(|w| *w == "thin-pool")
        .ok_or_else(|| bad("not a thin-pool target"))?;
    let rest = &words[at + 1..];
    if rest.first().is_some_and(|w| *w == "Fail" || *w == "Error") {
        return Ok(PoolStatus {
            transaction_id: 0,
            metadata_used: 0,
            metadata_total: 0,
            data_used: 0,
            data_total: 0,
            mode: PoolMode::Failed,
            error_if_no_space: false,
            needs_check: false,
        });
    }
    if rest.len() < 8 {
        return Err(bad("too few fields"));
    }
    let number = |w: &str| {
        w.parse::<u64>()
            .map_err(|_| bad(&format!("{w:?} is not a number")))
    };
    let fraction = |w: &str| -> Result<(u64, u64)> {
        let (a, b) = w
            .split_once('/')
            .ok_or_else(|| bad(&format!("{w:?} is not used/total")))?;
        Ok((number(a)?, number(b)?))
    };
    let (metadata_used, metadata_total) = fraction(rest[1])?;
    let (data_used, data_total) = fraction(rest[2])?;
    let mode = match rest[4] {
        "rw" => PoolMode::ReadWrite,
        "ro" => PoolMode::ReadOnly,
        "out_of_data_space" => PoolMode::OutOfDataSpace,
        other => return Err(bad(&format!("unknown mode {other:?}"))),
    };
    Ok(PoolStatus {
        transaction_id: number(rest[0])?,
        metadata_used,
        metadata_total,
        data_used,
        data_total,
        mode,
        error_if_no_space: match rest[6] {
            "error_if_no_space" => true,
            "queue_if_no_space" => false,
            other => return Err(bad(&format!("unknown no-space policy {other:?}"))),
        },
        needs_check: rest[7] == "needs_check",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_in_sectors_and_keep_zeroing_on() {
        let t = pool_table(
            "/dev/vg/meta",
            "/dev/vg/data",
            1 << 30,
            64 << 10,
            16,
            WhenFull::Queue,
        )
        .unwrap();
        assert_eq!(t, "0 2097152 thin-pool /dev/vg/meta /dev/vg/data 128 16 0");
        let t = pool_table("/dev/m", "/dev/d", 1 << 30, 1 << 20, 0, WhenFull::Error).unwrap();
        assert_eq!(
            t,
            "0 2097152 thin-pool /dev/m /dev/d 2048 0 1 error_if_no_space"
        );
        assert!(!t.contains("skip_block_zeroing"));
        for (data, block) in [
            (1 << 30, 32 << 10),
            (1 << 30, 96 << 10),
            (1 << 30, 2 << 30),
            (100 << 10, 64 << 10),
            (0, 64 << 10),
        ] {
            assert!(
                pool_table("/m", "/d", data, block, 0, WhenFull::Queue).is_err(),
                "{data} {block}"
            );
        }
        assert_eq!(
            thin_table("/dev/mapper/p", 7, 4 << 20, Some("/dev/nbd0")).unwrap(),
            "0 8192 thin /dev/mapper/p 7 /dev/nbd0"
        );
        assert_eq!(
            thin_table("/dev/mapper/p", 0, 512, None).unwrap(),
            "0 1 thin /dev/mapper/p 0"
        );
        assert!(thin_table("/p", 1, 1000, None).is_err());
        assert!(thin_table("/p", 1 << 24, 512, None).is_err());
    }

    #[test]
    fn messages_spell_what_dm_thin_reads_and_ids_stay_in_24_bits() {
        assert_eq!(Message::CreateThin(3).text().unwrap(), "create_thin 3");
        assert_eq!(Message::CreateSnap(4, 3).text().unwrap(), "create_snap 4 3");
        assert_eq!(
            Message::Delete(MAX_THIN_ID).text().unwrap(),
            "delete 16777215"
        );
        assert_eq!(
            Message::SetTransactionId(5, 6).text().unwrap(),
            "set_transaction_id 5 6"
        );
        assert_eq!(
            Message::ReserveMetadataSnap.text().unwrap(),
            "reserve_metadata_snap"
        );
        assert_eq!(
            Message::ReleaseMetadataSnap.text().unwrap(),
            "release_metadata_snap"
        );
        assert!(Message::CreateThin(MAX_THIN_ID + 1).text().is_err());
        assert!(Message::CreateSnap(1, MAX_THIN_ID + 1).text().is_err());
    }

    #[test]
    fn pool_status_lines_of_every_mode_decode_and_others_are_errors() {
        let s = parse_pool_status(
            "0 2097152 thin-pool 1 11/1024 4/16384 - rw discard_passdown queue_if_no_space - 1024",
        )
        .unwrap();
        assert_eq!(
            (s.transaction_id, s.metadata_used, s.metadata_total),
            (1, 11, 1024)
        );
        assert_eq!(
            (s.data_used, s.data_total, s.mode),
            (4, 16384, PoolMode::ReadWrite)
        );
        assert!(!s.error_if_no_space && !s.needs_check);
        assert!((s.data_percent() - 4.0 * 100.0 / 16384.0).abs() < 1e-9);
        let s = parse_pool_status("0 8 thin-pool 9 5/10 10/10 - out_of_data_space discard_passdown error_if_no_space needs_check 1").unwrap();
        assert_eq!(s.mode, PoolMode::OutOfDataSpace);
        assert!(s.error_if_no_space && s.needs_check);
        assert_eq!(s.data_percent(), 100.0);
        // Kernels before the low-water field.
        let s = parse_pool_status(
            "0 8 thin-pool 0 1/2 0/4 7 ro no_discard_passdown queue_if_no_space -",
        )
        .unwrap();
        assert_eq!(s.mode, PoolMode::ReadOnly);
        assert_eq!(
            parse_pool_status("0 8 thin-pool Fail").unwrap().mode,
            PoolMode::Failed
        );
        for bad in [
            "",
            "0 8 linear",
            "0 8 thin-pool 1 2/3",
            "0 8 thin-pool x 1/2 0/4 - rw d queue_if_no_space -",
            "0 8 thin-pool 1 12 0/4 - rw d queue_if_no_space -",
            "0 8 thin-pool 1 1/2 0/4 - weird d queue_if_no_space -",
        ] {
            assert!(parse_pool_status(bad).is_err(), "{bad:?}");
        }
    }
}
