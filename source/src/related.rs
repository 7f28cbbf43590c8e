//! The one rule for names written inside a remote image (a qcow2 backing file, a VMDK
//! extent, a VHD parent locator): they are chosen by whoever made the template, so they
//! are attacker input.
//!
//! A related name is a *path* resolved inside the template's own location: the same
//! scheme, host, port and credentials (HTTP), the same bucket (S3), the same export
//! (NFS). Relative paths resolve against the naming object's directory, absolute paths
//! against the location's root. Refused, with the name and the reason:
//!
//! - network-path references (`//host/x`) and anything with a backslash (`\\host\x`,
//!   which URL parsers turn into `//host/x`);
//! - anything with a scheme or drive prefix before its first `/` (`https:host/x`,
//!   `file:…`, `json:…`, `C:…`);
//! - `..` that climbs above the location's root;
//! - empty names, names ending in `/`, control characters.
//!
//! Each source turns the resolved path into its own address ([`encode_path`] for URLs),
//! so a name can never change the host, the bucket or the export.

/// Resolves `name` against `base`, the absolute `/`-separated path of the object that
/// names it (its last segment is the object itself). Returns the normalised absolute
/// path, or why the name is refused (never quoting the name, which may hold secrets:
/// the caller names it, redacted).
pub fn resolve(base: &str, name: &str) -> Result<String, String> {
    if name.is_empty() {
        return Err("it is empty".to_owned());
    }
    if name.chars().any(char::is_control) {
        return Err("it contains control characters; only paths inside the template's location are followed".to_owned());
    }
    if name.contains('\\') {
        return Err("it contains a backslash (a Windows or UNC path); only paths inside the template's location are followed".to_owned());
    }
    if name.starts_with("//") {
        return Err(
            "it is a network-path reference (//host/…), which would leave the template's location"
                .to_owned(),
        );
    }
    let first = name.split('/').next().unwrap_or("");
    if first.contains(':') {
        return Err("it has a scheme or drive prefix (\"…:\"); only paths inside the template's location are followed".to_owned());
    }
    if name.ends_with('/') {
        return Err("it names a directory, not a file".to_owned());
    }
    let mut parts: Vec<&str> = Vec::new();
    if !name.starts_with('/') {
        parts = base.split('/').filter(|p| !p.is_empty()).collect();
        parts.pop();
    }
    for part in name.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err(
                        "it climbs above the root of the template's location with '..'".to_owned(),
                    );
                }
            }
            p => parts.push(p),
        }
    }
    if parts.is_empty() {
        return Err("it names no file".to_owned());
    }
    Ok(format!("/{}", parts.join("/")))
}

/// `path` with every byte outside RFC 3986's unreserved and sub-delimiter characters
/// (and `/`, `:`, `@`) percent-encoded: a name is a file name, so `?`, `#` and `%` in it
/// are part of the name, never a query, a fragment or an escape.
pub fn encode_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for b in path.bytes() {
        if b.is_ascii_alphanumeric() || b"/-._~!$&'()*+,;=:@".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_and_absolute_paths_resolve_inside_the_location() {
        assert_eq!(resolve("/t/top.qcow2", "base.raw").unwrap(), "/t/base.raw");
        assert_eq!(resolve("/t/top.qcow2", "./b/../base").unwrap(), "/t/base");
        assert_eq!(resolve("/a/b/top", "../c/x").unwrap(), "/a/c/x");
        assert_eq!(resolve("/a/top", "/x/y").unwrap(), "/x/y");
        assert_eq!(resolve("/top", "base").unwrap(), "/base");
        assert_eq!(resolve("/t/top", "dir/a:b.raw").unwrap(), "/t/dir/a:b.raw");
        assert_eq!(resolve("/t/top", "a?b#c").unwrap(), "/t/a?b#c");
    }

    #[test]
    fn names_that_would_leave_the_location_are_refused_with_the_reason() {
        for (name, reason) in [
            ("//host-b/base.raw", "network-path"),
            ("\\\\host-b\\base.raw", "backslash"),
            ("https:host-b/x", "scheme"),
            ("http://host-b/x", "scheme"),
            ("file:////host-b/x", "scheme"),
            ("json:{}", "scheme"),
            ("C:/x", "drive"),
            ("../base", "climbs above"),
            ("a/../../base", "climbs above"),
            ("/..", "climbs above"),
            ("", "empty"),
            ("dir/", "directory"),
            (".", "no file"),
            ("a\nb", "control"),
        ] {
            let e = resolve("/top.qcow2", name).unwrap_err();
            assert!(e.contains(reason), "{name:?}: {e}");
        }
    }

    #[test]
    fn encoded_paths_keep_names_literal() {
        assert_eq!(encode_path("/t/a b?c#d%20"), "/t/a%20b%3Fc%23d%2520");
        assert_eq!(encode_path("/t/base-1.raw"), "/t/base-1.raw");
    }
}
