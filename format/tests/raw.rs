//! The raw format and the chain machinery on raw files.

mod common;

use common::*;

#[test]
fn raw_reads_and_maps_like_qemu() {
    with_tools(&["qemu-img"], |d| {
        let base = make_base_raw(d);
        assert_reads_like_qemu(&base, "raw", None);
        assert_map_like_qemu(&base, "raw", None);
    });
}

#[test]
fn images_may_not_name_devices() {
    with_tools(&["qemu-img"], |d| {
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
                s(&top),
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
    });
}
