//! File names from name-labels: what an operator reads in the SR directory. The
//! characters LVM allows in names (`A-Za-z0-9._-`, `+` aside) are kept, others become
//! `_`; a suffix (`-1`, `-2`, …) makes the name unique, as vfat does.

/// Longest stem kept from a label (bytes).
const MAX_STEM: usize = 64;

/// The file-name stem for `label`: safe characters only, never hidden, never empty.
pub fn stem(label: &str) -> String {
    let mut s: String = label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let kept = s.trim_start_matches(['.', '-']).len();
    s.drain(..s.len() - kept);
    s.truncate(MAX_STEM);
    while s.ends_with('.') {
        s.pop();
    }
    if s.is_empty() { "vdi".to_owned() } else { s }
}

/// `stem.ext`, or `stem-N.ext` with the smallest N ≥ 1 that `taken` does not refuse.
pub fn unique(label: &str, ext: &str, taken: impl Fn(&str) -> bool) -> String {
    let stem = stem(label);
    let first = format!("{stem}.{ext}");
    if !taken(&first) {
        return first;
    }
    (1u64..)
        .map(|n| format!("{stem}-{n}.{ext}"))
        .find(|name| !taken(name))
        .expect("some suffix is free")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_become_safe_visible_names() {
        assert_eq!(stem("Debian 12 (web)"), "Debian_12__web_");
        assert_eq!(stem("../../etc/passwd"), "_.._etc_passwd");
        assert_eq!(stem(".hidden"), "hidden");
        assert_eq!(stem("--rf"), "rf");
        assert_eq!(stem(""), "vdi");
        assert_eq!(stem("..."), "vdi");
        assert_eq!(stem("日本"), "__");
        assert_eq!(stem(&"x".repeat(300)).len(), MAX_STEM);
    }

    #[test]
    fn a_suffix_makes_names_unique() {
        let taken = ["web.qcow2", "web-1.qcow2"];
        assert_eq!(
            unique("web", "qcow2", |n| taken.contains(&n)),
            "web-2.qcow2"
        );
        assert_eq!(unique("db", "qcow2", |n| taken.contains(&n)), "db.qcow2");
    }
}
