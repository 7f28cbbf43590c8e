//! The real Linux kernel, booted under qemu software emulation (the harness lives in
//! tests/kernel/, see its README):
//!
//! - as an NBD client: /dev/nbd0 attached to `thinline serve` with nbd-client (one
//!   connection, then four), an ext4 filesystem made and checked on it, discards, and the
//!   image compared byte for byte; then over TLS (`--tls require --tls-ca`, loopback TCP,
//!   certificates made by openssl on the host): read back, written, and the clients without
//!   TLS, trusting another CA or without a client certificate refused;
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
    if !common::require(&["qemu-system-x86_64", "nbd-client", "openssl"]) {
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
        "fio",
        "nginx",
        "mkfs.ext4",
    ]) {
        return;
    }
    run_kernel_test("test-cor-dmthin.sh");
}

#[test]
#[ignore = "runs inside the kernel VM (tests/kernel/lvm-blocks.sh), on its loop devices"]
fn in_guest_the_lvm_srs_building_blocks_work_with_lvm2_dm_thin_and_thin_check() {
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::path::{Path, PathBuf};
    use thinline_sr::Code;
    use thinline_sr::backend::lvm::command::{Lvm, owner_tag};
    use thinline_sr::backend::lvm::dm::{Dm, udev_runs};
    use thinline_sr::backend::lvm::layout::{self, BLOCK_BYTES, MGT_BYTES};
    use thinline_sr::backend::lvm::mgt::MetadataVolume;
    use thinline_sr::backend::lvm::pool::{Message, PoolMode, WhenFull, thin_table};

    let env =
        |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name}: set by lvm-blocks.sh"));
    let devices: Vec<PathBuf> = env("THINLINE_LVM_DEVICES")
        .split(',')
        .map(PathBuf::from)
        .collect();
    let foreign = PathBuf::from(env("THINLINE_LVM_FOREIGN"));
    let sr = uuid::Uuid::new_v4();
    let tag = owner_tag(sr);
    let dm = Dm::new(udev_runs());

    // A device that holds something (here the user's PV) is refused, untouched.
    let lvm_foreign = Lvm::new(std::slice::from_ref(&foreign), false).unwrap();
    let refused = layout::create(
        &lvm_foreign,
        &dm,
        &[foreign],
        "tlbad",
        sr,
        0,
        WhenFull::Error,
    )
    .unwrap_err();
    assert_eq!(refused.code, Code::SrExists, "{refused:?}");
    assert!(refused.message.contains("LVM2_member"), "{refused:?}");

    // The SR's VG, its tagged LVs and its pool, on exactly its devices: the user's VG
    // on another disk is not seen (but its name is not taken twice).
    let lvm = Lvm::new(&devices, false).unwrap();
    let clash = layout::create(&lvm, &dm, &devices, "uservg", sr, 0, WhenFull::Error).unwrap_err();
    assert_eq!(clash.code, Code::SrExists, "{clash:?}");
    assert!(lvm.vgs().unwrap().is_empty(), "nothing made: {clash:?}");
    let made = layout::create(&lvm, &dm, &devices, "tlsr", sr, 0, WhenFull::Error).unwrap();
    let vgs = lvm.vgs().unwrap();
    assert_eq!(vgs.len(), 1, "only the SR's VG is seen: {vgs:?}");
    assert_eq!(
        (vgs[0].name.as_str(), vgs[0].pv_count),
        ("tlsr", devices.len() as u64)
    );
    assert_eq!(vgs[0].tags, std::slice::from_ref(&tag));
    let lvs = lvm.lvs("tlsr").unwrap();
    let size_of = |name: &str| lvs.iter().find(|lv| lv.name == name).map(|lv| lv.size);
    assert_eq!(size_of(layout::MGT_LV), Some(MGT_BYTES), "{lvs:?}");
    assert_eq!(
        size_of(layout::POOL_META_LV),
        Some(made.sizes.pool_metadata)
    );
    assert_eq!(size_of(layout::POOL_DATA_LV), Some(made.sizes.pool_data));
    assert!(
        lvs.iter().all(|lv| lv.tags == [tag.clone()] && lv.active()),
        "{lvs:?}"
    );
    // The metadata LV and the pool's spare room are left free, and little else.
    assert!(vgs[0].free >= made.sizes.pool_metadata, "{vgs:?} {made:?}");

    // The metadata volume on its LV: empty, then each record read back.
    let mgt = MetadataVolume::open(&made.mgt).unwrap();
    assert_eq!(mgt.capacity(), MGT_BYTES / 2 - 4096);
    assert_eq!(mgt.read().unwrap(), None);
    assert_eq!(mgt.write(br#"{"sr": "first"}"#).unwrap(), 1);
    assert_eq!(mgt.write(br#"{"sr": "second"}"#).unwrap(), 2);
    drop(mgt);
    let again = MetadataVolume::open(&made.mgt)
        .unwrap()
        .read()
        .unwrap()
        .unwrap();
    assert_eq!(
        (again.generation, again.payload.as_slice()),
        (2, &br#"{"sr": "second"}"#[..])
    );

    // A thin device in the pool; what it provisions, the transaction id, a snapshot.
    let pool_dev = format!("/dev/mapper/{}", made.pool);
    dm.message(&pool_dev, Message::CreateThin(1)).unwrap();
    let thin = thin_table(&pool_dev, 1, 32 << 20, None).unwrap();
    dm.create("tlthin", &thin).unwrap();
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
    let status = dm.pool_status(&made.pool).unwrap();
    assert_eq!(status.mode, PoolMode::ReadWrite, "{status:?}");
    assert!(
        status.error_if_no_space && !status.needs_check,
        "{status:?}"
    );
    let blocks = made.sizes.pool_data / BLOCK_BYTES;
    assert_eq!(
        (status.data_used, status.data_total),
        (16, blocks),
        "{status:?}"
    );
    assert_eq!(status.transaction_id, 0);
    dm.message(&pool_dev, Message::SetTransactionId(0, 1))
        .unwrap();
    assert_eq!(dm.pool_status(&made.pool).unwrap().transaction_id, 1);
    dm.suspend("tlthin").unwrap();
    dm.message(&pool_dev, Message::CreateSnap(2, 1)).unwrap();
    dm.resume("tlthin").unwrap();
    dm.message(&pool_dev, Message::Delete(2)).unwrap();

    // Taken down and checked, then made again from its metadata: the data is there.
    dm.remove("tlthin").unwrap();
    dm.remove(&made.pool).unwrap();
    let meta = format!("/dev/tlsr/{}", layout::POOL_META_LV);
    let check = Command::new("thin_check").arg(&meta).output().unwrap();
    assert!(check.status.success(), "thin_check: {check:?}");
    dm.create(&made.pool, &made.pool_table).unwrap();
    dm.create("tlthin", &thin).unwrap();
    let mut back = vec![0u8; pattern.len()];
    let mut dev = std::fs::File::open("/dev/mapper/tlthin").unwrap();
    dev.seek(SeekFrom::Start(4 << 20)).unwrap();
    dev.read_exact(&mut back).unwrap();
    assert!(
        back == pattern,
        "the thin device's data after re-creating the pool"
    );
    drop(dev);
    dm.remove("tlthin").unwrap();

    // An LV the SR did not make stops its destroy; without it, everything goes.
    lvm.run("lvcreate", &["-y", "-L", "4m", "-n", "users", "tlsr"])
        .unwrap();
    let kept = layout::destroy(&lvm, &dm, &devices, "tlsr", sr).unwrap_err();
    assert_eq!(kept.code, Code::SrNotEmpty, "{kept:?}");
    assert!(kept.message.contains("users"), "{kept:?}");
    assert!(!dm.exists(&made.pool), "the pool was taken down first");
    lvm.run("lvremove", &["-y", "tlsr/users"]).unwrap();
    layout::destroy(&lvm, &dm, &devices, "tlsr", sr).unwrap();
    assert!(lvm.vgs().unwrap().is_empty());
    assert!(
        devices
            .iter()
            .all(|d| layout::signature(Path::new(d)).unwrap().is_none())
    );
}
