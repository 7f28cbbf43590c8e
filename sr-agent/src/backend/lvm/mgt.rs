//! The LVM SR's metadata volume (the `MGT` LV): the agent's records (template URIs,
//! parents, name-labels, thin device ids, attach state, the journal) written
//! atomically to a block device that has no file system and no rename.
//!
//! The volume holds two slots, each a 4 KiB header and a payload. A write goes to the
//! slot that does not hold the newest record, with the next generation, and is synced;
//! a read takes the valid slot with the highest generation. A slot is valid when its
//! header's magic, version and checksum match and its payload's checksum does: a write
//! torn by a crash or a power cut leaves an invalid slot and the previous record in
//! the other one, so a reader sees the old state or the new, never a mix. A slot of
//! another format version (a newer Thinline's) is an error for reads and writes:
//! never read past, never written over. A new SR's volume is [`MetadataVolume::format`]ted
//! first, since an LV may hold an older SR's records where its extents were before.
//!
//! Header (big-endian, 48 bytes, the rest of the 4 KiB zero):
//!
//! ```text
//!   0  magic          8  "THLNMGT\0"
//!   8  version        4  1
//!  12  slot           4  0 or 1 (where it was written: a copied slot is not valid)
//!  16  generation     8  1, 2, …
//!  24  payload_len    8  bytes of payload after the header
//!  32  payload_crc    4  CRC-32C of the payload
//!  36  reserved       8  zero
//!  44  header_crc     4  CRC-32C of bytes 0..44
//! ```

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::{Code, Error, Result};

const MAGIC: [u8; 8] = *b"THLNMGT\0";
const VERSION: u32 = 1;
/// Bytes of a slot's header: one page, so payloads start aligned.
pub const HEADER_LEN: u64 = 4096;
const HEADER_USED: usize = 48;

/// A slot's header, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    version: u32,
    slot: u32,
    generation: u64,
    payload_len: u64,
    payload_crc: u32,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_USED] {
        let mut b = [0u8; HEADER_USED];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&self.version.to_be_bytes());
        b[12..16].copy_from_slice(&self.slot.to_be_bytes());
        b[16..24].copy_from_slice(&self.generation.to_be_bytes());
        b[24..32].copy_from_slice(&self.payload_len.to_be_bytes());
        b[32..36].copy_from_slice(&self.payload_crc.to_be_bytes());
        let crc = crc32c::crc32c(&b[..44]);
        b[44..48].copy_from_slice(&crc.to_be_bytes());
        b
    }

    /// The header in `b`, or why it is not one (`None`: an empty, all-zero header).
    fn decode(b: &[u8; HEADER_USED]) -> std::result::Result<Option<Header>, String> {
        if b.iter().all(|&x| x == 0) {
            return Ok(None);
        }
        let u32_at = |o: usize| u32::from_be_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_be_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        if b[0..8] != MAGIC {
            return Err("no metadata magic".into());
        }
        if u32_at(44) != crc32c::crc32c(&b[..44]) {
            return Err("header checksum mismatch".into());
        }
        Ok(Some(Header {
            version: u32_at(8),
            slot: u32_at(12),
            generation: u64_at(16),
            payload_len: u64_at(24),
            payload_crc: u32_at(32),
        }))
    }
}

/// What a read found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub generation: u64,
    pub payload: Vec<u8>,
    /// The other slot's state: `None` when it holds the previous record or nothing,
    /// else why it is invalid (a torn write, for `sr check` to report).
    pub other_slot_damage: Option<String>,
}

/// The metadata volume at `path` (the MGT LV's device, or a file in tests).
#[derive(Debug)]
pub struct MetadataVolume {
    path: PathBuf,
    file: File,
    slot_len: u64,
}

/// What a slot holds.
enum Slot {
    Empty,
    Valid(Header, Vec<u8>),
    Damaged(String),
}

impl MetadataVolume {
    /// Opens the volume at `path` for reading and writing.
    pub fn open(path: &Path) -> Result<MetadataVolume> {
        let io = |e: std::io::Error| Error::io(format!("cannot open {}", path.display()), &e);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io)?;
        let size = device_size(&file).map_err(io)?;
        // Two slots, each a whole number of pages.
        let slot_len = size / 2 / HEADER_LEN * HEADER_LEN;
        if slot_len < 2 * HEADER_LEN {
            return Err(Error::new(
                Code::SrBackendFailure,
                format!(
                    "{} is {size} bytes: a metadata volume needs at least {} bytes",
                    path.display(),
                    4 * HEADER_LEN
                ),
            ));
        }
        Ok(MetadataVolume {
            path: path.to_owned(),
            file,
            slot_len,
        })
    }

    /// Empties both slots (a new SR's volume: an LV may hold an older SR's records
    /// where its extents were before), synced.
    pub fn format(&self) -> Result<()> {
        let zero = [0u8; HEADER_USED];
        for index in 0..2u64 {
            self.file
                .write_all_at(&zero, index * self.slot_len)
                .map_err(|e| self.io_err("write", &e))?;
        }
        self.file.sync_data().map_err(|e| self.io_err("write", &e))
    }

    /// The largest payload a slot holds.
    pub fn capacity(&self) -> u64 {
        self.slot_len - HEADER_LEN
    }

    fn slot(&self, index: u32) -> Result<Slot> {
        let base = u64::from(index) * self.slot_len;
        let mut head = [0u8; HEADER_USED];
        self.file
            .read_exact_at(&mut head, base)
            .map_err(|e| self.io_err("read", &e))?;
        let header = match Header::decode(&head) {
            Ok(None) => return Ok(Slot::Empty),
            Ok(Some(h)) => h,
            Err(why) => return Ok(Slot::Damaged(why)),
        };
        if header.version != VERSION {
            // Written by another Thinline: neither read past nor written over.
            return Err(Error::new(
                Code::SrBackendFailure,
                format!(
                    "{}: slot {index} holds metadata format {}, this thinline reads format {VERSION}",
                    self.path.display(),
                    header.version
                ),
            ));
        }
        if header.slot != index {
            return Ok(Slot::Damaged(format!(
                "written for slot {}, found in slot {index}",
                header.slot
            )));
        }
        if header.payload_len > self.capacity() {
            return Ok(Slot::Damaged(format!(
                "payload of {} bytes does not fit a slot of {}",
                header.payload_len,
                self.capacity()
            )));
        }
        let len = usize::try_from(header.payload_len).expect("fits the slot");
        let mut payload = vec![0u8; len];
        self.file
            .read_exact_at(&mut payload, base + HEADER_LEN)
            .map_err(|e| self.io_err("read", &e))?;
        if crc32c::crc32c(&payload) != header.payload_crc {
            return Ok(Slot::Damaged(
                "payload checksum mismatch (a torn write?)".into(),
            ));
        }
        Ok(Slot::Valid(header, payload))
    }

    /// The newest valid record; `None` on a volume never written. Both slots damaged
    /// is an error: the metadata is lost, and nothing may write over it.
    pub fn read(&self) -> Result<Option<Record>> {
        let slots = [self.slot(0)?, self.slot(1)?];
        let mut best: Option<(usize, &Header, &Vec<u8>)> = None;
        for (i, s) in slots.iter().enumerate() {
            if let Slot::Valid(h, p) = s
                && best.is_none_or(|(_, b, _)| h.generation > b.generation)
            {
                best = Some((i, h, p));
            }
        }
        let damage = |s: &Slot| match s {
            Slot::Damaged(why) => Some(why.clone()),
            _ => None,
        };
        match best {
            Some((i, h, p)) => Ok(Some(Record {
                generation: h.generation,
                payload: p.clone(),
                other_slot_damage: damage(&slots[1 - i]),
            })),
            None if slots.iter().all(|s| matches!(s, Slot::Empty)) => Ok(None),
            None => Err(Error::new(
                Code::SrBackendFailure,
                format!(
                    "{}: no valid metadata in either slot ({}; {})",
                    self.path.display(),
                    damage(&slots[0]).unwrap_or_else(|| "empty".into()),
                    damage(&slots[1]).unwrap_or_else(|| "empty".into())
                ),
            )),
        }
    }

    /// Writes `payload` as the next record: into the slot that does not hold the
    /// newest one, synced before this returns. Returns its generation.
    pub fn write(&self, payload: &[u8]) -> Result<u64> {
        if payload.len() as u64 > self.capacity() {
            return Err(Error::new(
                Code::SrFull,
                format!(
                    "{}: {} bytes of metadata do not fit its {} bytes",
                    self.path.display(),
                    payload.len(),
                    self.capacity()
                ),
            ));
        }
        let (generation, target) = match self.read()? {
            None => (1, 0),
            Some(r) => {
                let newest = if self.holds(0, r.generation)? { 0 } else { 1 };
                let next = r.generation.checked_add(1).ok_or_else(|| {
                    Error::new(
                        Code::SrBackendFailure,
                        format!(
                            "{}: the metadata generation is exhausted",
                            self.path.display()
                        ),
                    )
                })?;
                (next, 1 - newest)
            }
        };
        let header = Header {
            version: VERSION,
            slot: target,
            generation,
            payload_len: payload.len() as u64,
            payload_crc: crc32c::crc32c(payload),
        };
        let mut block = vec![0u8; HEADER_LEN as usize + payload.len()];
        block[..HEADER_USED].copy_from_slice(&header.encode());
        block[HEADER_LEN as usize..].copy_from_slice(payload);
        let base = u64::from(target) * self.slot_len;
        self.file
            .write_all_at(&block, base)
            .and_then(|()| self.file.sync_data())
            .map_err(|e| self.io_err("write", &e))?;
        Ok(generation)
    }

    fn holds(&self, index: u32, generation: u64) -> Result<bool> {
        Ok(matches!(self.slot(index)?, Slot::Valid(h, _) if h.generation == generation))
    }

    fn io_err(&self, op: &str, e: &std::io::Error) -> Error {
        Error::io(format!("cannot {op} {}", self.path.display()), e)
    }
}

/// Bytes of a file or block device.
fn device_size(file: &File) -> std::io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    // A block device's metadata says 0; its end says its size.
    let mut f = file;
    let end = f.seek(SeekFrom::End(0))?;
    f.seek(SeekFrom::Start(0))?;
    Ok(end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volume(size: u64) -> (tempfile::TempDir, PathBuf, MetadataVolume) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mgt");
        std::fs::File::create(&path).unwrap().set_len(size).unwrap();
        let v = MetadataVolume::open(&path).unwrap();
        (dir, path, v)
    }

    fn scribble(path: &Path, offset: u64, bytes: &[u8]) {
        let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        f.write_all_at(bytes, offset).unwrap();
    }

    #[test]
    fn a_new_volume_reads_as_empty_and_each_write_is_read_back_with_the_next_generation() {
        let (_d, _p, v) = volume(1 << 20);
        assert_eq!(v.read().unwrap(), None);
        for g in 1..=5u64 {
            let payload = format!("{{\"generation\": {g}}}").repeat(g as usize);
            assert_eq!(v.write(payload.as_bytes()).unwrap(), g);
            let r = v.read().unwrap().unwrap();
            assert_eq!((r.generation, r.payload), (g, payload.into_bytes()));
            assert_eq!(r.other_slot_damage, None);
        }
    }

    #[test]
    fn a_write_torn_anywhere_leaves_the_previous_record() {
        let (_d, path, v) = volume(64 << 10);
        v.write(b"old state").unwrap();
        let slot_len = v.slot_len;
        // Generation 2 goes to slot 1: tear it in its header, and in its payload.
        for (offset, what) in [
            (slot_len + 20, "header"),
            (slot_len + HEADER_LEN + 3, "payload"),
        ] {
            v.write(b"new state").unwrap();
            scribble(&path, offset, &[0xff]);
            let r = v.read().unwrap().unwrap();
            assert_eq!(r.payload, b"old state", "torn {what}");
            assert!(r.other_slot_damage.is_some(), "torn {what}: reported");
            // The next write replaces the damaged slot, never the good one.
            v.write(b"newer state").unwrap();
            let r = v.read().unwrap().unwrap();
            assert_eq!(r.payload, b"newer state", "after a torn {what}");
            assert_eq!(r.other_slot_damage, None);
            // Start over from one good record in slot 0.
            std::fs::File::create(&path)
                .unwrap()
                .set_len(64 << 10)
                .unwrap();
            v.write(b"old state").unwrap();
        }
    }

    #[test]
    fn both_slots_damaged_is_an_error_and_nothing_is_written_over_them() {
        let (_d, path, v) = volume(64 << 10);
        v.write(b"one").unwrap();
        v.write(b"two").unwrap();
        scribble(&path, 0, b"garbage!");
        scribble(&path, v.slot_len + HEADER_LEN, b"x");
        let err = v.read().unwrap_err();
        assert!(err.message.contains("no valid metadata"), "{}", err.message);
        assert!(v.write(b"three").is_err());
    }

    #[test]
    fn a_slot_copied_over_the_other_is_not_taken_for_a_newer_record() {
        let (_d, path, v) = volume(64 << 10);
        v.write(b"first").unwrap();
        // A copy of slot 0 (header and payload) written into slot 1 by mistake.
        let f = std::fs::File::open(&path).unwrap();
        let mut slot0 = vec![0u8; v.slot_len as usize];
        f.read_exact_at(&mut slot0, 0).unwrap();
        scribble(&path, v.slot_len, &slot0);
        let r = v.read().unwrap().unwrap();
        assert_eq!((r.generation, r.payload.as_slice()), (1, &b"first"[..]));
        assert!(r.other_slot_damage.unwrap().contains("slot 0"));
    }

    #[test]
    fn payloads_larger_than_a_slot_are_refused_and_tiny_volumes_are_not_opened() {
        let (_d, _p, v) = volume(64 << 10);
        let too_big = vec![b'x'; (v.capacity() + 1) as usize];
        assert_eq!(v.write(&too_big).unwrap_err().code, Code::SrFull);
        assert_eq!(v.write(&too_big[1..]).unwrap(), 1, "exactly a slot fits");
        let dir = tempfile::tempdir().unwrap();
        let small = dir.path().join("small");
        std::fs::File::create(&small)
            .unwrap()
            .set_len(8192)
            .unwrap();
        assert!(MetadataVolume::open(&small).is_err());
    }

    #[test]
    fn a_slot_of_another_format_version_is_an_error_for_reads_and_writes() {
        let (_d, path, v) = volume(64 << 10);
        v.write(b"x").unwrap();
        let h = Header {
            version: 2,
            slot: 1,
            generation: 9,
            payload_len: 0,
            payload_crc: crc32c::crc32c(b""),
        }
        .encode();
        scribble(&path, v.slot_len, &h);
        let err = v.read().unwrap_err();
        assert!(err.message.contains("format 2"), "{}", err.message);
        assert!(v.write(b"y").is_err(), "never written over");
    }

    #[test]
    fn format_empties_both_slots_of_a_reused_volume() {
        let (_d, _p, v) = volume(64 << 10);
        v.write(b"an older SR").unwrap();
        v.write(b"its newer record").unwrap();
        v.format().unwrap();
        assert_eq!(v.read().unwrap(), None);
        assert_eq!(v.write(b"new SR").unwrap(), 1);
    }

    #[test]
    fn an_exhausted_generation_is_an_error_not_a_wrap() {
        let (_d, path, v) = volume(64 << 10);
        let h = Header {
            version: VERSION,
            slot: 0,
            generation: u64::MAX,
            payload_len: 0,
            payload_crc: crc32c::crc32c(b""),
        }
        .encode();
        scribble(&path, 0, &h);
        assert_eq!(v.read().unwrap().unwrap().generation, u64::MAX);
        assert!(v.write(b"z").is_err());
    }
}
