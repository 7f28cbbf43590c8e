//! `qemu-nbd` as the reference server: start it on an image, and compare block-status
//! maps with Thinline's.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use thinline_test_support::{spawn, stdout};

/// `qemu-nbd -r -A` serving one image on a unix socket.
pub struct QemuNbd {
    child: Child,
    socket: PathBuf,
}

impl QemuNbd {
    pub fn start(image: &Path, qemu_fmt: &str, socket: PathBuf) -> QemuNbd {
        let child = spawn(
            Command::new("qemu-nbd")
                .args(["-r", "-A", "-t", "-f", qemu_fmt, "-k"])
                .arg(&socket)
                .arg(image),
            Stdio::null(),
            Stdio::inherit(),
        );
        let q = QemuNbd { child, socket };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let ok = Command::new("nbdinfo")
                .args(["--size", &q.uri()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return q;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("qemu-nbd did not start serving {}", image.display());
    }

    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `nbdinfo --map[=CONTEXT] --json` as merged `(offset, length, type)` runs.
pub fn nbd_map(uri: &str, context: &str) -> Vec<(u64, u64, u64)> {
    let map_arg = if context.is_empty() {
        "--map".to_owned()
    } else {
        format!("--map={context}")
    };
    let out = stdout(Command::new("nbdinfo").args([map_arg.as_str(), "--json", uri]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut runs: Vec<(u64, u64, u64)> = Vec::new();
    for e in v.as_array().unwrap() {
        let (offset, length, kind) = (
            e["offset"].as_u64().unwrap(),
            e["length"].as_u64().unwrap(),
            e["type"].as_u64().unwrap(),
        );
        match runs.last_mut() {
            Some(last) if last.2 == kind && last.0 + last.1 == offset => last.1 += length,
            _ => runs.push((offset, length, kind)),
        }
    }
    runs
}

/// Compares two block-status maps range by range. `relaxed_zero`: Thinline may add
/// `ZERO` to data that qemu reports without it (allocated data over a hole of the host
/// file reads as zero; qemu does not ask the host file for every format) — the reverse,
/// or any difference in `HOLE` or depth, is a failure.
pub fn assert_same_map(
    what: &str,
    ours: &[(u64, u64, u64)],
    theirs: &[(u64, u64, u64)],
    relaxed_zero: bool,
) {
    let ends = |runs: &[(u64, u64, u64)]| runs.last().map_or(0, |r| r.0 + r.1);
    assert_eq!(
        ends(ours),
        ends(theirs),
        "{what}: maps cover different sizes\nthinline: {ours:?}\nqemu-nbd: {theirs:?}"
    );
    let (mut i, mut j, mut pos) = (0, 0, 0);
    while i < ours.len() && j < theirs.len() {
        let (a, b) = (ours[i], theirs[j]);
        let ok = a.2 == b.2 || (relaxed_zero && a.2 == 2 && b.2 == 0);
        assert!(
            ok,
            "{what}: at offset {pos}: thinline {a:?}, qemu-nbd {b:?}\nthinline: {ours:?}\nqemu-nbd: {theirs:?}"
        );
        let next = (a.0 + a.1).min(b.0 + b.1);
        pos = next;
        if a.0 + a.1 == next {
            i += 1;
        }
        if b.0 + b.1 == next {
            j += 1;
        }
    }
}
