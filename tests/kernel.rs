//! The real Linux kernel, booted under qemu software emulation (the harness lives in
//! tests/kernel/, see its README):
//!
//! - as an NBD client: /dev/nbd0 attached to `thinline serve` with nbd-client (one
//!   connection, then four), an ext4 filesystem made and checked on it, discards, and the
//!   image compared byte for byte;
//! - as the consumer of `thinline proxy`: /dev/nbd0 on the copy-on-read proxy is the
//!   external origin of a dm-thin thin volume, and reads and partial writes of uncached
//!   blocks race while the upstream fetches are in flight (the original design's race);
//!   every guest write must survive, and the proxy's cache must hold only the template.

mod common;

use std::process::Command;
use std::sync::Mutex;

/// One VM at a time under `cargo test` too (nextest: `threads-required` in .config/nextest.toml):
/// each takes both cores of a small machine.
static ONE_VM: Mutex<()> = Mutex::new(());

/// Runs a tests/kernel/test-*.sh entry point against our binary; panics unless it passes.
fn run_kernel_test(script: &str) {
    let _vm = ONE_VM
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let path = format!("{}/tests/kernel/{script}", env!("CARGO_MANIFEST_DIR"));
    let status = Command::new("bash")
        .arg(&path)
        .env("THINLINE_BIN", common::thinline())
        .status()
        .expect("run the kernel test harness");
    assert!(
        status.success(),
        "kernel test {script} failed ({status}); see the console log printed above"
    );
}

#[test]
fn kernel_nbd_client_runs_ext4_on_thinline_serve() {
    if !common::require(&["qemu-system-x86_64", "nbd-client"]) {
        return;
    }
    run_kernel_test("test-nbd-kernel.sh");
}

#[test]
fn kernel_dm_thin_clone_over_the_proxy_keeps_every_guest_write() {
    if !common::require(&[
        "qemu-system-x86_64",
        "nbd-client",
        "nbdkit",
        "nbdinfo",
        "dmsetup",
    ]) {
        return;
    }
    run_kernel_test("test-cor-dmthin.sh");
}
