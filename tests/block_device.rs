//! The raw export on a real block device (a loop device over a file): size and sector
//! size from the device, writes, BLKDISCARD for TRIM, BLKZEROOUT / zero-out punches for
//! WRITE_ZEROES, and the backing file holding exactly the bytes written. Needs root for
//! losetup (CI runs as root); elsewhere the test is skipped with a message.

mod common;

use std::os::unix::fs::FileExt;
use std::process::Command;

use common::{Fixture, Served, require, stdout};

const MIB: u64 = 1 << 20;

struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn block_device_export_uses_device_size_sectors_discard_and_zeroout() {
    if !require(&["losetup", "qemu-io", "nbdinfo"]) {
        return;
    }
    if !is_root() {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "CI runs as root: loop devices must be testable"
        );
        eprintln!("SKIP: loop devices need root");
        return;
    }
    let fx = Fixture::new(64 * MIB);
    // Fill the ranges the test discards and zeroes, so that the result is visible.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&fx.image)
        .unwrap();
    f.write_all_at(&vec![0x5a; 8 * MIB as usize], 4 * MIB)
        .unwrap();
    f.sync_all().unwrap();
    let dev = stdout(
        Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&fx.image),
    )
    .trim()
    .to_owned();
    let _loop = Loop(dev.clone());

    let served = Served::unix(fx.dir.path(), &[], &[&format!("dev={dev}")]);
    let info = serde_json::from_str::<serde_json::Value>(&stdout(
        Command::new("nbdinfo").args(["--json", &served.uri("")]),
    ))
    .unwrap();
    let e = &info["exports"][0];
    assert_eq!(e["export-size"], 64 * MIB);
    assert_eq!(
        e["block_size_minimum"], 512,
        "the device's logical sector size"
    );
    let rotational = std::fs::read_to_string(format!(
        "/sys/block/{}/queue/rotational",
        dev.trim_start_matches("/dev/")
    ))
    .unwrap();
    assert_eq!(e["is_rotational"], rotational.trim() == "1");
    assert_eq!(e["description"], format!("block device {dev}"));

    common::qemu_io_raw(
        &served.uri(""),
        &[
            "write -P 0xaa 1M 64k",
            "read -P 0xaa 1M 64k",
            "discard 4M 1M",
            "read -P 0 4M 1M",
            "write -z 8M 64k",
            "read -P 0 8M 64k",
            "write -z -u 9M 64k",
            "read -P 0 9M 64k",
            "write -f -P 0xbb 12M 4k",
            "flush",
        ],
    );
    drop(served);
    drop(_loop);

    let img = common::read_file(&fx.image);
    let at = |o: u64, n: u64| &img[o as usize..(o + n) as usize];
    assert!(at(MIB, 65536).iter().all(|&b| b == 0xaa));
    assert!(
        at(4 * MIB, MIB).iter().all(|&b| b == 0),
        "discarded range reads as zeroes"
    );
    assert!(
        at(5 * MIB, 3 * MIB).iter().all(|&b| b == 0x5a),
        "untouched data stays"
    );
    assert!(at(8 * MIB, 65536).iter().all(|&b| b == 0));
    assert!(at(8 * MIB + 65536, MIB - 65536).iter().all(|&b| b == 0x5a));
    assert!(at(9 * MIB, 65536).iter().all(|&b| b == 0));
    assert!(at(12 * MIB, 4096).iter().all(|&b| b == 0xbb));
}
