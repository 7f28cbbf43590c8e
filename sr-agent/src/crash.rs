//! Crash tests: `THINLINE_SR_CRASH_AT=STEP` kills the process (abort, as kill -9
//! would) at that step of every multi-step operation: `intent` (journal written),
//! `moved` (renames done), `made` (new files or volumes made), `committed` (new records
//! written), `finished` (files moved and deleted, journal not yet cleared); `resized` (a
//! disk's image grown, its record not yet); `registering` (an SR made, not yet
//! registered); `unregistering` (an SR destroyed, its registry entry not yet removed);
//! `vg-removed` (an LVM SR's VG removed, its home not yet); `suspended` (an attached
//! disk's device suspended for a dm-thin snapshot); `pivoted` (a template's attached
//! clones moved onto its local origin, its proxy not yet stopped); `write:NAME` (the new content of the
//! JSON file `NAME`, e.g. `sr.json`, written beside it but not yet renamed over it) and
//! `write:mgt` (an LVM SR's records about to be written to its metadata volume).

/// Aborts the process if `THINLINE_SR_CRASH_AT` names `step`.
pub(crate) fn point(step: &str) {
    if std::env::var_os("THINLINE_SR_CRASH_AT").is_some_and(|v| v == step) {
        std::process::abort();
    }
}
