//! Cache file names in a cache directory: one file per template version, found again
//! by its location.

use std::path::{Path, PathBuf};

/// The file name of a template's cache in a cache directory: a readable part of the
/// template's last path component, a hash of its location (`shown`, without
/// credentials) and a hash of its pinned identity (size, ETag, version id, mtime…), so
/// two templates, or two versions of one (two S3 version ids, two pre-signed URLs of
/// one key, a file changed in place), never share a file.
pub fn cache_file_name(shown: &str, identity: &str) -> String {
    format!(
        "{}-{}.cache",
        location_prefix(shown),
        short_hash(&format!("{shown}\n{identity}"))
    )
}

/// Caches in `dir` of the location `shown` other than `current`: those of other
/// versions of the template (or of an older naming), which are left in place.
pub fn other_caches_of(dir: &Path, shown: &str, current: &str) -> Vec<PathBuf> {
    let prefix = location_prefix(shown);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&prefix) && n.ends_with(".cache") && n != current)
        .map(|n| dir.join(n))
        .collect();
    out.sort();
    out
}

fn short_hash(s: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(s.as_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// `BASE-HASH` of a location: what every cache of it is named after.
fn location_prefix(shown: &str) -> String {
    let hash = short_hash(shown);
    let base = shown
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or("")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect::<String>();
    let base = base.trim_start_matches('.');
    if base.is_empty() {
        hash
    } else {
        format!("{base}-{hash}")
    }
}

#[cfg(test)]
mod name_tests {
    #[test]
    fn cache_names_are_readable_distinct_and_safe() {
        let a = super::cache_file_name("https://h/t/debian-12.qcow2", "etag 1");
        let b = super::cache_file_name("https://other/t/debian-12.qcow2", "etag 1");
        assert!(
            a.starts_with("debian-12.qcow2-") && a.ends_with(".cache"),
            "{a}"
        );
        assert_ne!(a, b);
        assert!(!super::cache_file_name("s3://b/../..", "v").contains('/'));
        assert!(super::cache_file_name("nbd+unix:///?socket=/x", "v").ends_with(".cache"));
    }

    #[test]
    fn two_versions_of_one_location_get_two_caches_and_each_finds_the_other() {
        let shown = "s3://bucket/t/debian-12.qcow2";
        let v1 = super::cache_file_name(shown, "s3 object, version id 111");
        let v2 = super::cache_file_name(shown, "s3 object, version id 222");
        assert_ne!(v1, v2);
        let dir = tempfile::tempdir().unwrap();
        for n in [&v1, &v2] {
            std::fs::write(dir.path().join(n), b"").unwrap();
        }
        let other = super::cache_file_name("s3://bucket/t/debian-11.qcow2", "v");
        std::fs::write(dir.path().join(&other), b"").unwrap();
        assert_eq!(
            super::other_caches_of(dir.path(), shown, &v2),
            [dir.path().join(&v1)]
        );
    }
}
