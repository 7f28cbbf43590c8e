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

#[test]
fn images_may_not_name_devices() {
    if !have("qemu-img") {
        return;
    }
    let dir = scratch();
    let d = dir.path();
    let top = pb(d, "top.qcow2");
    qemu_img(
        d,
        &[
            "create",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "/dev/null",
            "-F",
            "raw",
            top.to_str().unwrap(),
            "1M",
        ],
    );
    let err = thinline_format::Image::open(&top, &thinline_format::OpenOptions::default())
        .expect_err("a backing device must be refused")
        .detail();
    assert!(
        err.contains("/dev/null") && err.contains("not a regular file"),
        "{err}"
    );
}
