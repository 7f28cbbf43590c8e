//! The real Linux kernel as an NBD client: a Debian kernel booted under qemu software
//! emulation attaches /dev/nbd0 to `thinline serve` with nbd-client (one connection,
//! then four), makes and checks an ext4 filesystem, discards, and the image is compared
//! byte for byte. The harness lives in tests/kernel/ (see its README).

mod common;

use std::process::Command;

#[test]
fn kernel_nbd_client_runs_ext4_on_thinline_serve() {
    if !common::require(&["qemu-system-x86_64", "nbd-client"]) {
        return;
    }
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/kernel/test-nbd-kernel.sh"
    );
    let status = Command::new("bash")
        .arg(script)
        .env("THINLINE_BIN", common::thinline())
        .status()
        .expect("run the kernel test harness");
    assert!(
        status.success(),
        "kernel test failed ({status}); see the console log printed above"
    );
}
