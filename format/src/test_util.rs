//! Helpers shared by the formats' unit tests.

use crate::error::Error;
use crate::layer::{CheckReport, Fetch, Layer};

/// The report of `layer`'s check, which must itself succeed.
pub(crate) fn check_report(layer: &(impl Layer + ?Sized)) -> CheckReport {
    let mut report = CheckReport::default();
    layer.check(&mut report).unwrap();
    report
}

/// `layer`'s check reports an error containing `needle`.
pub(crate) fn assert_check_error(layer: &(impl Layer + ?Sized), needle: &str) {
    let report = check_report(layer);
    assert!(mentions(&report.errors, &[needle]), "{report:?}");
}

/// True if one of `messages` contains every one of `parts`.
pub(crate) fn mentions(messages: &[String], parts: &[&str]) -> bool {
    messages.iter().any(|m| parts.iter().all(|p| m.contains(p)))
}

/// Mapping the first 4 KiB with [`Fetch::CachedOnly`] fails with [`Error::NotCached`]
/// until a mapping that may read has loaded the metadata; then it gives one segment.
pub(crate) fn assert_cached_only_needs_a_read(layer: &(impl Layer + ?Sized)) {
    let mut out = Vec::new();
    let r = layer.map(0, 4096, Fetch::CachedOnly, &mut out);
    assert!(matches!(r, Err(Error::NotCached)));
    layer.map(0, 4096, Fetch::Allowed, &mut out).unwrap();
    out.clear();
    layer.map(0, 4096, Fetch::CachedOnly, &mut out).unwrap();
    assert_eq!(out.len(), 1);
}
