//! The VHD on-disk structures: the 512-byte footer (`conectix`) and the 1024-byte
//! dynamic-disk header (`cxsparse`), both big-endian and protected by a one's-complement
//! byte-sum checksum, parsed into small typed structs.

/// Size of the footer and of its copy at offset 0.
pub const FOOTER_SIZE: usize = 512;
/// Size of the dynamic-disk header.
pub const HEADER_SIZE: usize = 1024;
/// Sector size that BAT entries, bitmaps and CHS geometry count in.
pub const SECTOR: u64 = 512;
/// A BAT entry for a block that is not allocated.
pub const UNALLOCATED: u32 = 0xFFFF_FFFF;
/// Number of parent locator entries in the dynamic header.
pub const LOCATORS: usize = 8;

const FOOTER_COOKIE: &[u8; 8] = b"conectix";
const HEADER_COOKIE: &[u8; 8] = b"cxsparse";
const CHECKSUM_AT: usize = 64;
const HEADER_CHECKSUM_AT: usize = 36;

/// The footer's `disk_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskType {
    /// Raw data followed by the footer.
    Fixed,
    /// Sparse blocks through a BAT; no parent.
    Dynamic,
    /// Sparse blocks over a parent VHD.
    Differencing,
}

impl DiskType {
    /// The name `image info` shows (qemu's subformat names plus `differencing`).
    pub fn name(self) -> &'static str {
        match self {
            DiskType::Fixed => "fixed",
            DiskType::Dynamic => "dynamic",
            DiskType::Differencing => "differencing",
        }
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    let mut a = [0; 2];
    a.copy_from_slice(&b[at..at + 2]);
    u16::from_be_bytes(a)
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut a = [0; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

fn array<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut a = [0; N];
    a.copy_from_slice(&b[at..at + N]);
    a
}

/// The one's complement of the byte sum of `buf`, with the 4 bytes at `checksum_at`
/// counted as zero.
pub fn checksum(buf: &[u8], checksum_at: usize) -> u32 {
    let sum = buf.iter().enumerate().fold(0u32, |sum, (i, &b)| {
        if (checksum_at..checksum_at + 4).contains(&i) {
            sum
        } else {
            sum.wrapping_add(u32::from(b))
        }
    });
    !sum
}

/// Why 512 bytes are not a usable footer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FooterError {
    /// No `conectix` cookie: not a footer at all.
    NoCookie,
    /// The cookie is there but the checksum is wrong.
    Checksum {
        /// The value in the footer.
        stored: u32,
        /// The value of the bytes.
        computed: u32,
    },
}

/// The hard disk footer (also copied at offset 0 of dynamic and differencing disks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    /// The 512 bytes as read, to compare the two copies.
    pub raw: [u8; FOOTER_SIZE],
    /// Bit 0: temporary; bit 1: reserved, always set.
    pub features: u32,
    /// Format version, 0x00010000.
    pub version: u32,
    /// Offset of the dynamic header (all ones for fixed disks).
    pub data_offset: u64,
    /// Seconds since 2000-01-01 00:00:00 UTC.
    pub timestamp: u32,
    /// The application that created the image (`vpc `, `qemu`, `win `, …).
    pub creator_app: [u8; 4],
    /// Its version, major in the high 16 bits.
    pub creator_version: u32,
    /// The host OS (`Wi2k`, `Mac `).
    pub creator_os: [u8; 4],
    /// Size at creation.
    pub original_size: u64,
    /// Current size.
    pub current_size: u64,
    /// CHS geometry: cylinders.
    pub cylinders: u16,
    /// CHS geometry: heads.
    pub heads: u8,
    /// CHS geometry: sectors per track.
    pub sectors: u8,
    /// Raw `disk_type` (2 fixed, 3 dynamic, 4 differencing).
    pub disk_type: u32,
    /// The stored checksum.
    pub checksum: u32,
    /// The image's UUID (a differencing child records its parent's).
    pub uuid: [u8; 16],
    /// Non-zero if the VM was in a saved state.
    pub saved_state: u8,
}

impl Footer {
    /// Parses and verifies a footer.
    pub fn parse(raw: &[u8; FOOTER_SIZE]) -> Result<Footer, FooterError> {
        if &raw[..8] != FOOTER_COOKIE {
            return Err(FooterError::NoCookie);
        }
        let stored = be32(raw, CHECKSUM_AT);
        let computed = checksum(raw, CHECKSUM_AT);
        if stored != computed {
            return Err(FooterError::Checksum { stored, computed });
        }
        Ok(Footer {
            raw: *raw,
            features: be32(raw, 8),
            version: be32(raw, 12),
            data_offset: be64(raw, 16),
            timestamp: be32(raw, 24),
            creator_app: array(raw, 28),
            creator_version: be32(raw, 32),
            creator_os: array(raw, 36),
            original_size: be64(raw, 40),
            current_size: be64(raw, 48),
            cylinders: be16(raw, 56),
            heads: raw[58],
            sectors: raw[59],
            disk_type: be32(raw, 60),
            checksum: stored,
            uuid: array(raw, 68),
            saved_state: raw[84],
        })
    }

    /// The disk type, if it is one this reader knows.
    pub fn kind(&self) -> Option<DiskType> {
        match self.disk_type {
            2 => Some(DiskType::Fixed),
            3 => Some(DiskType::Dynamic),
            4 => Some(DiskType::Differencing),
            _ => None,
        }
    }

    /// Sectors described by the CHS geometry.
    pub fn chs_sectors(&self) -> u64 {
        u64::from(self.cylinders) * u64::from(self.heads) * u64::from(self.sectors)
    }

    /// Names of the fields in which `other` differs from this footer.
    pub fn differences(&self, other: &Footer) -> Vec<&'static str> {
        let mut fields = Vec::new();
        let mut diff = |same: bool, name| {
            if !same {
                fields.push(name);
            }
        };
        diff(self.features == other.features, "features");
        diff(self.version == other.version, "version");
        diff(self.data_offset == other.data_offset, "data_offset");
        diff(self.timestamp == other.timestamp, "timestamp");
        diff(self.creator_app == other.creator_app, "creator_app");
        diff(
            self.creator_version == other.creator_version,
            "creator_version",
        );
        diff(self.creator_os == other.creator_os, "creator_os");
        diff(self.original_size == other.original_size, "original_size");
        diff(self.current_size == other.current_size, "current_size");
        diff(
            (self.cylinders, self.heads, self.sectors)
                == (other.cylinders, other.heads, other.sectors),
            "geometry",
        );
        diff(self.disk_type == other.disk_type, "disk_type");
        diff(self.uuid == other.uuid, "uuid");
        diff(self.saved_state == other.saved_state, "saved_state");
        if fields.is_empty() && self.raw != other.raw {
            fields.push("reserved bytes");
        }
        fields
    }
}

/// One parent locator entry of the dynamic header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Locator {
    /// Platform code (`W2ku`, `W2ru`, `Wi2k`, `Wi2r`, `MacX`, `Mac `), or zeroes.
    pub platform: [u8; 4],
    /// Space reserved for the locator (sectors per the spec, bytes in Windows images).
    pub data_space: u32,
    /// Bytes of locator data.
    pub data_length: u32,
    /// Where the data is in the file.
    pub data_offset: u64,
}

/// The dynamic-disk header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynamicHeader {
    /// Next structure (unused, all ones).
    pub data_offset: u64,
    /// Offset of the BAT.
    pub table_offset: u64,
    /// Header version, 0x00010000.
    pub version: u32,
    /// Number of BAT entries.
    pub max_table_entries: u32,
    /// Bytes of guest data per block.
    pub block_size: u32,
    /// The stored checksum.
    pub checksum: u32,
    /// The parent's footer UUID (differencing disks).
    pub parent_uuid: [u8; 16],
    /// The parent's modification time, seconds since 2000-01-01 UTC.
    pub parent_timestamp: u32,
    /// The parent's file name, UTF-16BE, NUL-padded.
    pub parent_name: [u8; 512],
    /// The parent locators.
    pub locators: [Locator; LOCATORS],
}

/// Why 1024 bytes are not a usable dynamic header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderError {
    /// No `cxsparse` cookie.
    NoCookie,
    /// The cookie is there but the checksum is wrong.
    Checksum {
        /// The value in the header.
        stored: u32,
        /// The value of the bytes.
        computed: u32,
    },
}

impl DynamicHeader {
    /// Parses and verifies a dynamic header.
    pub fn parse(raw: &[u8; HEADER_SIZE]) -> Result<DynamicHeader, HeaderError> {
        if &raw[..8] != HEADER_COOKIE {
            return Err(HeaderError::NoCookie);
        }
        let stored = be32(raw, HEADER_CHECKSUM_AT);
        let computed = checksum(raw, HEADER_CHECKSUM_AT);
        if stored != computed {
            return Err(HeaderError::Checksum { stored, computed });
        }
        let locators = std::array::from_fn(|i| {
            let at = 576 + i * 24;
            Locator {
                platform: array(raw, at),
                data_space: be32(raw, at + 4),
                data_length: be32(raw, at + 8),
                data_offset: be64(raw, at + 16),
            }
        });
        Ok(DynamicHeader {
            data_offset: be64(raw, 8),
            table_offset: be64(raw, 16),
            version: be32(raw, 24),
            max_table_entries: be32(raw, 28),
            block_size: be32(raw, 32),
            checksum: stored,
            parent_uuid: array(raw, 40),
            parent_timestamp: be32(raw, 56),
            parent_name: array(raw, 64),
            locators,
        })
    }
}

/// A VHD timestamp (seconds since 2000-01-01 UTC) as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn format_timestamp(seconds: u32) -> String {
    const EPOCH_2000_DAYS: i64 = 10_957; // days from 1970-01-01 to 2000-01-01
    let secs = i64::from(seconds);
    let days = EPOCH_2000_DAYS + secs / 86_400;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// A UUID in its usual hyphenated form (bytes in on-disk order).
pub fn format_uuid(uuid: &[u8; 16]) -> String {
    let hex: String = uuid.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// Four code bytes as text, with non-printable bytes escaped (`tap\0` → `tap\x00`).
pub fn format_code(code: &[u8; 4]) -> String {
    code.iter()
        .map(|&b| {
            if b.is_ascii_graphic() || b == b' ' {
                char::from(b).to_string()
            } else {
                format!("\\x{b:02x}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(format_timestamp(0), "2000-01-01T00:00:00Z");
        // 2024-02-29T12:34:56Z
        assert_eq!(format_timestamp(762_525_296), "2024-02-29T12:34:56Z");
    }

    #[test]
    fn footer_checksum_is_verified() {
        let mut raw = [0u8; FOOTER_SIZE];
        raw[..8].copy_from_slice(FOOTER_COOKIE);
        raw[60..64].copy_from_slice(&2u32.to_be_bytes());
        let sum = checksum(&raw, CHECKSUM_AT);
        raw[64..68].copy_from_slice(&sum.to_be_bytes());
        let footer = Footer::parse(&raw).unwrap();
        assert_eq!(footer.kind(), Some(DiskType::Fixed));
        raw[100] = 1;
        assert_eq!(
            Footer::parse(&raw),
            Err(FooterError::Checksum {
                stored: sum,
                computed: sum - 1
            })
        );
        raw[0] = b'x';
        assert_eq!(Footer::parse(&raw), Err(FooterError::NoCookie));
    }

    #[test]
    fn codes_and_uuids() {
        assert_eq!(format_code(b"tap\0"), "tap\\x00");
        assert_eq!(format_code(b"vpc "), "vpc ");
        assert_eq!(
            format_uuid(&[
                0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 1, 2, 3, 4, 5, 6, 7, 8
            ]),
            "12345678-9abc-def0-0102-030405060708"
        );
    }
}
