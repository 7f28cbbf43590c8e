//! The VMDK text descriptor: disk identity (CID, parentCID), createType, the parent
//! hint, extent lines and a few disk-database entries.
//!
//! The same text is found in a separate descriptor file (monolithicFlat, twoGbMax*,
//! vmfs…) or embedded in a hosted sparse extent. Parsing is line based and lenient
//! about what it does not use (comments, unknown keys, CRLF), strict about what it
//! does (CID values, extent lines).

use crate::{Error, Result};

/// Largest descriptor read, separate or embedded (qemu reads at most 1 MiB too); real
/// descriptors are a few hundred bytes.
pub const MAX_DESCRIPTOR_BYTES: u64 = 1 << 20;

/// Most extent lines accepted: 4096 twoGbMaxExtent files make an 8 TiB disk, the
/// largest hosted VMware disk; every distinct extent file stays open.
pub const MAX_EXTENTS: usize = 4096;

/// `parentCID` of a disk without a parent.
pub const NO_PARENT_CID: u32 = 0xffff_ffff;

/// Who may access an extent, from the first word of its line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Rw,
    Rdonly,
    Noaccess,
}

impl Access {
    pub fn name(self) -> &'static str {
        match self {
            Access::Rw => "RW",
            Access::Rdonly => "RDONLY",
            Access::Noaccess => "NOACCESS",
        }
    }
}

/// One extent line: `ACCESS SECTORS TYPE ["file" [offset]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentLine {
    pub access: Access,
    pub sectors: u64,
    /// Upper-case type word (`FLAT`, `SPARSE`, `ZERO`, `VMFS`, …).
    pub kind: String,
    pub file: Option<String>,
    /// Offset in sectors (flat extents).
    pub offset: Option<u64>,
    /// The line as written, for messages.
    pub text: String,
}

/// A parsed descriptor.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Descriptor {
    pub version: Option<u32>,
    pub cid: Option<u32>,
    pub parent_cid: Option<u32>,
    pub create_type: Option<String>,
    pub parent_hint: Option<String>,
    pub extents: Vec<ExtentLine>,
    /// `ddb.*` entries worth showing, in file order.
    pub ddb: Vec<(String, String)>,
}

/// Disk-database keys kept for `image info`.
const DDB_KEYS: &[&str] = &[
    "ddb.adapterType",
    "ddb.virtualHWVersion",
    "ddb.uuid",
    "ddb.longContentID",
    "ddb.toolsVersion",
    "ddb.thinProvisioned",
    "ddb.geometry.cylinders",
    "ddb.geometry.heads",
    "ddb.geometry.sectors",
];

fn unquote(value: &str) -> &str {
    let v = value.trim();
    v.strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(v)
}

fn parse_cid(path: &str, key: &str, value: &str) -> Result<u32> {
    let v = unquote(value);
    u32::from_str_radix(v, 16).map_err(|_| {
        Error::invalid(
            path,
            "vmdk",
            format!("descriptor field {key}={v:?} is not a 32-bit hexadecimal number"),
        )
    })
}

fn parse_access(word: &str) -> Option<Access> {
    match word {
        "RW" => Some(Access::Rw),
        "RDONLY" => Some(Access::Rdonly),
        "NOACCESS" => Some(Access::Noaccess),
        _ => None,
    }
}

fn parse_extent(path: &str, line: &str, access: Access, rest: &str) -> Result<ExtentLine> {
    let bad =
        |why: &str| Error::invalid(path, "vmdk", format!("invalid extent line {line:?}: {why}"));
    let rest = rest.trim_start();
    let (sectors, rest) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    let sectors: u64 = sectors
        .parse()
        .map_err(|_| bad("the size is not a number of sectors"))?;
    if sectors == 0 {
        return Err(bad("the size is 0 sectors"));
    }
    let rest = rest.trim_start();
    let (kind, rest) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    if kind.is_empty() {
        return Err(bad("no extent type"));
    }
    let rest = rest.trim();
    let (file, rest) = if let Some(quoted) = rest.strip_prefix('"') {
        let end = quoted
            .find('"')
            .ok_or_else(|| bad("the file name has no closing quote"))?;
        (Some(quoted[..end].to_owned()), quoted[end + 1..].trim())
    } else if rest.is_empty() {
        (None, "")
    } else {
        // Unquoted name (seen in hand-written files): one word.
        let (name, rest) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
        (Some(name.to_owned()), rest.trim())
    };
    let offset = match rest {
        "" => None,
        o => Some(
            o.parse::<u64>()
                .map_err(|_| bad("the offset is not a number of sectors"))?,
        ),
    };
    if file.as_deref() == Some("") {
        return Err(bad("the file name is empty"));
    }
    Ok(ExtentLine {
        access,
        sectors,
        kind: kind.to_owned(),
        file,
        offset,
        text: line.to_owned(),
    })
}

/// Parses descriptor text (`bytes` may be NUL-padded, as embedded descriptors are).
pub fn parse(path: &str, bytes: &[u8]) -> Result<Descriptor> {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    let text = String::from_utf8_lossy(&bytes[..end]);
    let mut d = Descriptor::default();
    for raw in text.split('\n') {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (first, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        if let Some(access) = parse_access(first) {
            if d.extents.len() >= MAX_EXTENTS {
                return Err(Error::unsupported(
                    path,
                    "vmdk",
                    format!("the descriptor lists more than {MAX_EXTENTS} extents"),
                ));
            }
            d.extents.push(parse_extent(path, line, access, rest)?);
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let key = key.trim();
        match key {
            "version" => {
                let v = unquote(value);
                let version = v.parse::<u32>().ok().filter(|v| (1..=3).contains(v));
                match version {
                    Some(version) => d.version = Some(version),
                    None => {
                        return Err(Error::unsupported(
                            path,
                            "vmdk",
                            format!("descriptor version={v:?} (only 1, 2 and 3 exist)"),
                        ));
                    }
                }
            }
            "CID" => d.cid = Some(parse_cid(path, key, value)?),
            "parentCID" => d.parent_cid = Some(parse_cid(path, key, value)?),
            "createType" => d.create_type = Some(unquote(value).to_owned()),
            "parentFileNameHint" => {
                let hint = unquote(value);
                if !hint.is_empty() {
                    d.parent_hint = Some(hint.to_owned());
                }
            }
            k if DDB_KEYS.contains(&k) => d.ddb.push((k.to_owned(), unquote(value).to_owned())),
            _ => {}
        }
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemu_descriptor_with_crlf_and_comments() {
        let text = b"# Disk DescriptorFile\r\nversion=1\r\nCID=fec1eb72\r\nparentCID=ffffffff\r\n\
            createType=\"twoGbMaxExtentSparse\"\r\n# comment RW 1 FLAT \"x\" 0\r\n\r\n\
            RW 4194304 SPARSE \"tg-s001.vmdk\"\r\nRDONLY 8 FLAT \"a b.img\" 16\r\nRW 8 ZERO\r\n\
            ddb.adapterType = \"lsilogic\"\r\nddb.virtualHWVersion = \"4\"\r\n\0\0\0garbage";
        let d = parse("t", text).unwrap();
        assert_eq!(d.version, Some(1));
        assert_eq!(d.cid, Some(0xfec1eb72));
        assert_eq!(d.parent_cid, Some(NO_PARENT_CID));
        assert_eq!(d.create_type.as_deref(), Some("twoGbMaxExtentSparse"));
        assert_eq!(d.extents.len(), 3);
        assert_eq!(d.extents[0].kind, "SPARSE");
        assert_eq!(d.extents[0].file.as_deref(), Some("tg-s001.vmdk"));
        assert_eq!(d.extents[1].access, Access::Rdonly);
        assert_eq!(d.extents[1].file.as_deref(), Some("a b.img"));
        assert_eq!(d.extents[1].offset, Some(16));
        assert_eq!(d.extents[2].kind, "ZERO");
        assert_eq!(d.extents[2].file, None);
        assert_eq!(d.ddb[0], ("ddb.adapterType".into(), "lsilogic".into()));
    }

    #[test]
    fn rejects_bad_values() {
        for (text, what) in [
            (&b"CID=xyz\n"[..], "CID"),
            (b"version=7\n", "version"),
            (b"RW abc FLAT \"f\" 0\n", "size"),
            (b"RW 0 FLAT \"f\" 0\n", "0 sectors"),
            (b"RW 8 FLAT \"f 0\n", "closing quote"),
            (b"RW 8 FLAT \"f\" x\n", "offset"),
        ] {
            let e = parse("t", text).unwrap_err().to_string();
            assert!(e.contains(what), "{e}");
        }
        let many = "RW 1 ZERO\n".repeat(MAX_EXTENTS + 1);
        let e = parse("t", many.as_bytes()).unwrap_err().to_string();
        assert!(e.contains("more than"), "{e}");
    }
}
