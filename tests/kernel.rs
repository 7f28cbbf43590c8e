//! The real Linux kernel, booted under qemu software emulation (the harness lives in
//! tests/kernel/, see its README):
//!
//! - as an NBD client: /dev/nbd0 attached to `thinline serve` with nbd-client (one
//!   connection, then four), an ext4 filesystem made and checked on it, discards, and the
//!   image compared byte for byte;
//! - as the consumer of `thinline proxy`: /dev/nbd0 on the copy-on-read proxy is the
//!   external origin of a dm-thin thin volume, and reads and partial writes of uncached
//!   blocks race while the upstream fetches are in flight (the original design's race);
//!   every guest write must survive, and the proxy's cache must hold only the template;
//!   in the same boot, the LVM SR's building blocks against real lvm2, dm-thin and
//!   thin_check (the ignored test below, which tests/kernel/lvm-blocks.sh runs in the
//!   guest), while a user's VG on another disk stays untouched.

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
        // This test binary, for the tests that run inside the guest.
        .env(
            "KERNEL_TEST_BIN",
            std::env::current_exe().expect("the test binary's path"),
        )
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
        "lvm",
        "thin_check",
    ]) {
        return;
    }
    run_kernel_test("test-cor-dmthin.sh");
}

/// `dmsetup ARGS…` in the guest (no udev: device nodes are made by `mknodes`).
fn dmsetup(args: &[&str]) -> String {
    let out = Command::new("dmsetup")
        .args(args)
        .output()
        .expect("run dmsetup");
    assert!(out.status.success(), "dmsetup {args:?}: {out:?}");
    let _ = Command::new("dmsetup").arg("mknodes").status();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn pool_status(pool: &str) -> thinline_sr::backend::lvm::pool::PoolStatus {
    let line = dmsetup(&["status", pool]);
    thinline_sr::backend::lvm::pool::parse_pool_status(line.trim()).expect("a pool status")
}

#[test]
#[ignore = "runs inside the kernel VM (tests/kernel/lvm-blocks.sh), on its loop devices"]
fn in_guest_the_lvm_srs_building_blocks_work_with_lvm2_dm_thin_and_thin_check() {
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::path::{Path, PathBuf};
    use thinline_sr::backend::lvm::command::{Lvm, owner_tag};
    use thinline_sr::backend::lvm::mgt::MetadataVolume;
    use thinline_sr::backend::lvm::pool::{Message, PoolMode, WhenFull, pool_table, thin_table};

    let devices: Vec<PathBuf> = std::env::var("THINLINE_LVM_DEVICES")
        .expect("THINLINE_LVM_DEVICES: the loop devices lvm-blocks.sh made")
        .split(',')
        .map(PathBuf::from)
        .collect();
    let names: Vec<&str> = devices.iter().map(|d| d.to_str().unwrap()).collect();
    let tag = owner_tag(uuid::Uuid::new_v4());
    let lvm = Lvm::new(&devices, false).unwrap();

    // PVs and a VG on exactly the SR's devices: the user's VG on another disk is not seen.
    lvm.run("pvcreate", &[&["-y"], names.as_slice()].concat())
        .unwrap();
    lvm.run(
        "vgcreate",
        &[&["--addtag", &tag, "tlsr"], names.as_slice()].concat(),
    )
    .unwrap();
    let vgs = lvm.vgs().unwrap();
    assert_eq!(vgs.len(), 1, "only the SR's VG is seen: {vgs:?}");
    assert_eq!(vgs[0].name, "tlsr");
    assert_eq!(vgs[0].pv_count, devices.len() as u64);
    assert_eq!(vgs[0].tags, std::slice::from_ref(&tag));

    // The agent's LVs, tagged.
    for (name, size) in [
        ("thinline_mgt", "4m"),
        ("thinline_pmeta", "8m"),
        ("thinline_pdata", "64m"),
    ] {
        lvm.run(
            "lvcreate",
            &[
                "-y", "-Zy", "--addtag", &tag, "-L", size, "-n", name, "tlsr",
            ],
        )
        .unwrap();
    }
    let lvs = lvm.lvs("tlsr").unwrap();
    assert_eq!(lvs.len(), 3, "{lvs:?}");
    assert!(
        lvs.iter().all(|lv| lv.tags == [tag.clone()] && lv.active()),
        "{lvs:?}"
    );
    let mgt_lv = lvs.iter().find(|lv| lv.name == "thinline_mgt").unwrap();
    assert_eq!(
        (mgt_lv.size, mgt_lv.path.as_str()),
        (4 << 20, "/dev/tlsr/thinline_mgt")
    );

    // The metadata volume on a real LV: empty, then each record read back.
    let mgt = MetadataVolume::open(Path::new(&mgt_lv.path)).unwrap();
    assert_eq!(mgt.capacity(), (2 << 20) - 4096);
    assert_eq!(mgt.read().unwrap(), None);
    assert_eq!(mgt.write(br#"{"sr": "first"}"#).unwrap(), 1);
    assert_eq!(mgt.write(br#"{"sr": "second"}"#).unwrap(), 2);
    let again = MetadataVolume::open(Path::new(&mgt_lv.path))
        .unwrap()
        .read()
        .unwrap()
        .unwrap();
    assert_eq!(
        (again.generation, again.payload.as_slice()),
        (2, &br#"{"sr": "second"}"#[..])
    );
    drop(mgt);

    // The pool, driven with dmsetup on those LVs; a thin device; a snapshot of it.
    let table = pool_table(
        "/dev/tlsr/thinline_pmeta",
        "/dev/tlsr/thinline_pdata",
        64 << 20,
        64 << 10,
        0,
        WhenFull::Error,
    )
    .unwrap();
    dmsetup(&["create", "tlpool", "--table", &table]);
    let message = |m: Message| dmsetup(&["message", "/dev/mapper/tlpool", "0", &m.text().unwrap()]);
    message(Message::CreateThin(1));
    let thin = thin_table("/dev/mapper/tlpool", 1, 32 << 20, None).unwrap();
    dmsetup(&["create", "tlthin", "--table", &thin]);
    let pattern: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
    {
        let mut dev = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/mapper/tlthin")
            .unwrap();
        dev.seek(SeekFrom::Start(4 << 20)).unwrap();
        dev.write_all(&pattern).unwrap();
        dev.sync_all().unwrap();
    }
    let status = pool_status("tlpool");
    assert_eq!(status.mode, PoolMode::ReadWrite, "{status:?}");
    assert!(
        status.error_if_no_space && !status.needs_check,
        "{status:?}"
    );
    assert_eq!(
        (status.data_used, status.data_total),
        (16, 1024),
        "{status:?}"
    );
    assert_eq!(status.transaction_id, 0);
    message(Message::SetTransactionId(0, 1));
    assert_eq!(pool_status("tlpool").transaction_id, 1);
    dmsetup(&["suspend", "tlthin"]);
    message(Message::CreateSnap(2, 1));
    dmsetup(&["resume", "tlthin"]);
    message(Message::Delete(2));

    // Torn down and checked, then re-created from the metadata: the data is there.
    dmsetup(&["remove", "tlthin"]);
    dmsetup(&["remove", "tlpool"]);
    let check = Command::new("thin_check")
        .arg("/dev/tlsr/thinline_pmeta")
        .output()
        .unwrap();
    assert!(check.status.success(), "thin_check: {check:?}");
    dmsetup(&["create", "tlpool", "--table", &table]);
    dmsetup(&["create", "tlthin", "--table", &thin]);
    let mut back = vec![0u8; pattern.len()];
    let mut dev = std::fs::File::open("/dev/mapper/tlthin").unwrap();
    dev.seek(SeekFrom::Start(4 << 20)).unwrap();
    dev.read_exact(&mut back).unwrap();
    assert!(
        back == pattern,
        "the thin device's data after re-creating the pool"
    );
    drop(dev);
    dmsetup(&["remove", "tlthin"]);
    dmsetup(&["remove", "tlpool"]);
    lvm.run("vgremove", &["-f", "tlsr"]).unwrap();
    lvm.run("pvremove", &[&["-y"], names.as_slice()].concat())
        .unwrap();
}
