//! The raw format and the chain machinery on raw files.

mod common;

use common::*;

#[test]
fn raw_reads_and_maps_like_qemu() {
    if !have("qemu-img") {
        return;
    }
    let dir = scratch();
    let base = make_base_raw(dir.path());
    assert_reads_like_qemu(&base, "raw", None);
    assert_map_like_qemu(&base, "raw", None);
}
