//! Where a differencing disk's parent is: the parent locators (Windows relative and
//! absolute paths in UTF-16LE, Mac `file://` URLs in UTF-8) and the parent's unicode
//! name in the dynamic header, turned into an ordered list of names to try relative
//! to the child's directory.

use crate::storage::percent_decode;

/// Longest locator payload read: a Windows path is at most 32767 UTF-16 units.
pub const MAX_LOCATOR_LENGTH: u32 = 65_536;

/// How a locator's payload is encoded and what it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocatorKind {
    /// `W2ru`: a path relative to the child, UTF-16LE.
    WindowsRelative,
    /// `W2ku`: an absolute Windows path, UTF-16LE.
    WindowsAbsolute,
    /// `Wi2r`: deprecated relative path.
    LegacyRelative,
    /// `Wi2k`: deprecated absolute path.
    LegacyAbsolute,
    /// `MacX`: a `file://` URL, UTF-8.
    MacUrl,
}

impl LocatorKind {
    /// The kind of a platform code; `None` for empty entries and Mac OS aliases
    /// (`Mac `), which only the Mac OS alias manager can resolve.
    pub fn from_code(code: &[u8; 4]) -> Option<LocatorKind> {
        match code {
            b"W2ru" => Some(LocatorKind::WindowsRelative),
            b"W2ku" => Some(LocatorKind::WindowsAbsolute),
            b"Wi2r" => Some(LocatorKind::LegacyRelative),
            b"Wi2k" => Some(LocatorKind::LegacyAbsolute),
            b"MacX" => Some(LocatorKind::MacUrl),
            _ => None,
        }
    }

    /// Order of preference: relative paths first (they survive moving the pair of
    /// files together), then absolute ones, then Mac URLs.
    fn rank(self) -> u8 {
        match self {
            LocatorKind::WindowsRelative => 0,
            LocatorKind::LegacyRelative => 1,
            LocatorKind::WindowsAbsolute => 2,
            LocatorKind::LegacyAbsolute => 3,
            LocatorKind::MacUrl => 4,
        }
    }
}

/// Decodes UTF-16 code units up to the first NUL; `None` if they are not valid UTF-16.
fn utf16_until_nul(units: impl Iterator<Item = u16>) -> Option<String> {
    char::decode_utf16(units.take_while(|&u| u != 0))
        .collect::<Result<String, _>>()
        .ok()
}

/// The parent unicode name field (UTF-16BE, NUL-padded).
pub fn decode_parent_name(raw: &[u8; 512]) -> Option<String> {
    let name = utf16_until_nul(
        raw.chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]])),
    )?;
    (!name.is_empty()).then_some(name)
}

/// Decodes a locator payload into the text it holds.
pub fn decode_locator(kind: LocatorKind, data: &[u8]) -> Option<String> {
    let text = match kind {
        LocatorKind::MacUrl => {
            let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
            String::from_utf8(data[..end].to_vec()).ok()?
        }
        LocatorKind::LegacyRelative | LocatorKind::LegacyAbsolute
            if data.len() % 2 == 1 || data.get(1).is_some_and(|&b| b != 0) =>
        {
            // Old Virtual PC wrote these in the system code page: take them as UTF-8.
            let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
            String::from_utf8(data[..end].to_vec()).ok()?
        }
        _ => utf16_until_nul(
            data.chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]])),
        )?,
    };
    (!text.is_empty()).then_some(text)
}

/// A name as the child's storage can open it, or (for paths only meaningful on the
/// Windows machine that wrote them) the file name to try beside the child instead.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Candidate {
    /// Try this name (relative names resolve against the child's directory).
    Name(String),
    /// A drive-letter or UNC path: cannot be opened here; only its file name is
    /// worth trying, after everything else.
    FileNameOnly(String),
}

/// Turns a Windows path into a name for this host: `\` becomes `/`, a leading `.\`
/// goes, and paths on a drive or a UNC share are reduced to their file name.
fn windows_path(path: &str) -> Option<Candidate> {
    let path = path.trim_end_matches('\0').replace('\\', "/");
    let bytes = path.as_bytes();
    let on_drive = bytes.len() >= 2 && bytes[0].is_ascii_alphabetic() && bytes[1] == b':';
    let unc = path.starts_with("//");
    let mut rest = path.as_str();
    while let Some(stripped) = rest.strip_prefix("./") {
        rest = stripped;
    }
    if rest.is_empty() || rest.ends_with('/') {
        return None;
    }
    if on_drive || unc {
        let file = rest.rsplit('/').next().unwrap_or(rest);
        let file = file.rsplit(':').next().unwrap_or(file);
        return (!file.is_empty()).then(|| Candidate::FileNameOnly(file.to_owned()));
    }
    Some(Candidate::Name(rest.to_owned()))
}

/// Turns a `MacX` URL (`file://localhost/Users/x/p.vhd`, `file:///p.vhd`, or blktap's
/// `file://./p.vhd`) into a path.
fn mac_url(url: &str) -> Option<Candidate> {
    let path = match url.strip_prefix("file://") {
        // blktap writes `file://` followed by a relative path.
        Some(rest) => percent_decode(match rest.strip_prefix("localhost/") {
            Some(_) => &rest["localhost".len()..],
            None => rest,
        })?,
        None => url.to_owned(),
    };
    let mut rest = path.as_str();
    while let Some(stripped) = rest.strip_prefix("./") {
        rest = stripped;
    }
    (!rest.is_empty() && !rest.ends_with('/')).then(|| Candidate::Name(rest.to_owned()))
}

/// The names to try for the parent, best first, without duplicates: relative locators,
/// absolute locators, Mac URLs, the parent unicode name, and last the bare file names
/// of Windows drive/UNC paths (which cannot be opened on this host as written, but the
/// parent is often simply beside the child).
pub fn parent_names(locators: &[(LocatorKind, String)], unicode_name: Option<&str>) -> Vec<String> {
    let mut ordered: Vec<&(LocatorKind, String)> = locators.iter().collect();
    ordered.sort_by_key(|(kind, _)| kind.rank());
    let mut candidates: Vec<Candidate> = ordered
        .into_iter()
        .filter_map(|(kind, text)| match kind {
            LocatorKind::MacUrl => mac_url(text),
            _ => windows_path(text),
        })
        .collect();
    if let Some(name) = unicode_name.and_then(windows_path) {
        candidates.push(name);
    }
    let mut names: Vec<String> = Vec::new();
    let direct = candidates.iter().filter_map(|c| match c {
        Candidate::Name(n) => Some(n),
        Candidate::FileNameOnly(_) => None,
    });
    let fallback = candidates.iter().filter_map(|c| match c {
        Candidate::FileNameOnly(n) => Some(n),
        Candidate::Name(_) => None,
    });
    for name in direct.chain(fallback) {
        if !names.contains(name) {
            names.push(name.clone());
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utf16le(s: &str) -> Vec<u8> {
        s.encode_utf16().flat_map(u16::to_le_bytes).collect()
    }

    #[test]
    fn order_and_conversion() {
        let locators = vec![
            (
                LocatorKind::WindowsAbsolute,
                r"C:\images\base disk.vhd".to_owned(),
            ),
            (
                LocatorKind::MacUrl,
                "file://localhost/Users/me/base%20disk.vhd".to_owned(),
            ),
            (
                LocatorKind::WindowsRelative,
                r".\sub\base disk.vhd".to_owned(),
            ),
        ];
        let names = parent_names(&locators, Some("base disk.vhd"));
        assert_eq!(
            names,
            vec![
                "sub/base disk.vhd",
                "/Users/me/base disk.vhd",
                "base disk.vhd"
            ]
        );
    }

    #[test]
    fn unc_and_rooted_paths() {
        let locators = vec![
            (
                LocatorKind::WindowsAbsolute,
                r"\\server\share\p.vhd".to_owned(),
            ),
            (LocatorKind::LegacyAbsolute, r"\images\p2.vhd".to_owned()),
        ];
        assert_eq!(
            parent_names(&locators, None),
            vec!["/images/p2.vhd", "p.vhd"]
        );
    }

    #[test]
    fn decoding() {
        assert_eq!(
            decode_locator(
                LocatorKind::WindowsRelative,
                &[utf16le(r".\p.vhd"), vec![0, 0, 0xff]].concat()
            )
            .as_deref(),
            Some(r".\p.vhd")
        );
        // An unpaired surrogate is not a name.
        assert_eq!(
            decode_locator(LocatorKind::WindowsRelative, &[0x00, 0xd8, b'a', 0]),
            None
        );
        assert_eq!(
            decode_locator(LocatorKind::MacUrl, b"file:///p.vhd\0\0").as_deref(),
            Some("file:///p.vhd")
        );
        assert_eq!(
            decode_locator(LocatorKind::LegacyRelative, b".\\old.vhd").as_deref(),
            Some(".\\old.vhd")
        );
        let mut raw = [0u8; 512];
        for (i, u) in "p.vhd".encode_utf16().enumerate() {
            raw[2 * i..2 * i + 2].copy_from_slice(&u.to_be_bytes());
        }
        assert_eq!(decode_parent_name(&raw).as_deref(), Some("p.vhd"));
        assert_eq!(decode_parent_name(&[0; 512]), None);
        assert_eq!(mac_url("file://x/%zz"), None);
    }
}
