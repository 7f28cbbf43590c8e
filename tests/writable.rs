//! Writable qcow2 overlays served with `thinline serve -w`, driven by real NBD clients:
//! several connections writing into the same clusters at once, whole-cluster zeroes and
//! discards, fio with verification, kill -9 in the middle of heavy writes, and a full
//! file system. qemu is the judge: `qemu-img check` and `qemu-img compare` against a raw
//! reference that received the same operations.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::qemu_nbd::{QemuNbd, assert_same_map, nbd_map};
use common::{Served, SmallFs, has_python_nbd, require, run, thinline};
use thinline_test_support::rng::Rng;

const TOOLS: &[&str] = &["qemu-img", "qemu-nbd", "nbdinfo", "nbdsh", "nbdcopy"];

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A raw template of `size` bytes (a pattern that differs per 4 KiB), a copy of it as the
/// reference, and a qcow2 overlay of it made with `thinline image create`.
fn overlay(dir: &Path, size: u64, extra: &[&str]) -> (PathBuf, PathBuf) {
    let base = dir.join("base.raw");
    let bytes: Vec<u8> = (0..size)
        .map(|i| ((i / 4096) * 7 + i % 251) as u8)
        .collect();
    std::fs::write(&base, &bytes).unwrap();
    let reference = dir.join("reference.raw");
    std::fs::write(&reference, &bytes).unwrap();
    let clone = dir.join("clone.qcow2");
    let mut args = vec!["image", "create", "-f", "qcow2", "--backing", "base.raw"];
    args.extend_from_slice(extra);
    args.push(s(&clone));
    run(Command::new(thinline()).args(&args));
    (clone, reference)
}

/// `qemu-img check` exit status (0 clean, 3 leaks only, 2 corruptions) and its output.
fn qemu_check(path: &Path) -> (i32, String) {
    let out = Command::new("qemu-img")
        .args(["check", s(path)])
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn assert_clean(path: &Path) {
    let (code, out) = qemu_check(path);
    assert_eq!(code, 0, "qemu-img check {}: {out}", path.display());
}

/// `qemu-img compare` of the overlay (through qemu's own qcow2 driver) with `reference`.
fn assert_same(clone: &Path, reference: &Path) {
    run(Command::new("qemu-img").args([
        "compare",
        "-f",
        "qcow2",
        "-F",
        "raw",
        s(clone),
        s(reference),
    ]));
}

/// Starts `nbdsh -c SCRIPT` (libnbd's Python shell) with `URI` and the given variables.
fn nbdsh_spawn(uri: &str, vars: &[(&str, String)], script: &str) -> std::process::Child {
    let mut program = format!("URI = {uri:?}\n");
    for (k, v) in vars {
        program.push_str(&format!("{k} = {v}\n"));
    }
    program.push_str(script);
    let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
    Command::new("nbdsh")
        .env("PATH", path)
        .arg("-c")
        .arg(program)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn wait_ok(child: std::process::Child, what: &str) -> String {
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Connection ME of N writes, zeroes and trims inside its own 16 KiB units (units
/// interleave, so the connections share every 64 KiB cluster), mirroring each change
/// into the reference file. A trim never covers a whole cluster here, so it changes
/// nothing.
const STRIPED: &str = r#"
import os, random
rng = random.Random(SEED)
fd = os.open(REF, os.O_RDWR)
h.connect_uri(URI)
UNIT = 16384
units = SIZE // UNIT
for i in range(OPS):
    u = rng.randrange(ME, units, N)
    base = u * UNIT
    off = base + rng.randrange(UNIT)
    ln = 1 + rng.randrange(base + UNIT - off)
    k = rng.random()
    if k < 0.6:
        data = bytes(rng.getrandbits(8) for _ in range(ln))
        h.pwrite(data, off, nbd.CMD_FLAG_FUA if rng.random() < 0.1 else 0)
        os.pwrite(fd, data, off)
    elif k < 0.8:
        h.zero(ln, off, nbd.CMD_FLAG_NO_HOLE if rng.random() < 0.5 else 0)
        os.pwrite(fd, bytes(ln), off)
    elif k < 0.9:
        h.trim(ln, off)
    else:
        h.flush()
h.flush()
print("ok")
"#;

/// One connection: whole-cluster and multi-cluster zeroes, discards and writes, and a
/// fast zero that must be refused where it would write.
const CLUSTERS: &str = r#"
import errno, os, random
rng = random.Random(SEED)
fd = os.open(REF, os.O_RDWR)
h.connect_uri(URI)
CS = 65536
clusters = SIZE // CS
for i in range(OPS):
    c = rng.randrange(clusters)
    n = 1 + rng.randrange(min(4, clusters - c))
    head = rng.choice([0, 0, 512, 4096, 30000])
    off = c * CS + head
    ln = n * CS - head - rng.choice([0, 0, 1000])
    k = rng.random()
    if k < 0.3:
        h.trim(ln, off)
        first = (off + CS - 1) // CS * CS
        last = (off + ln) // CS * CS
        if last > first:
            os.pwrite(fd, bytes(last - first), first)
    elif k < 0.6:
        h.zero(ln, off, nbd.CMD_FLAG_NO_HOLE if rng.random() < 0.5 else 0)
        os.pwrite(fd, bytes(ln), off)
    elif k < 0.8:
        data = bytes([rng.randrange(1, 256)]) * ln
        h.pwrite(data, off)
        os.pwrite(fd, data, off)
    else:
        h.zero(CS, c * CS, nbd.CMD_FLAG_FAST_ZERO)
        os.pwrite(fd, bytes(CS), c * CS)
# A fast zero of part of a cluster holding data would write: refused, nothing changed.
h.pwrite(b"\x77" * CS, 0)
os.pwrite(fd, b"\x77" * CS, 0)
try:
    h.zero(4096, 8192, nbd.CMD_FLAG_FAST_ZERO)
    raise SystemExit("a fast zero inside a data cluster was not refused")
except nbd.Error as e:
    assert e.errnum == errno.ENOTSUP, e
h.flush()
print("ok")
"#;

#[test]
fn several_clients_writing_into_shared_clusters_match_a_raw_reference_and_qemu_checks_clean() {
    if !require(TOOLS) || !has_python_nbd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size: u64 = 8 << 20;
    let (clone, reference) = overlay(dir.path(), size, &["--backing-format", "raw"]);
    let served = Served::unix(dir.path(), &["-w"], &[s(&clone)]);
    assert_eq!(
        served.report["exports"][0]["read_only"], false,
        "{}",
        served.report
    );
    let mut rng = Rng::from_env();
    let n = 4;
    let clients: Vec<_> = (0..n)
        .map(|me| {
            nbdsh_spawn(
                &served.uri(""),
                &[
                    ("SEED", rng.next_u64().to_string()),
                    ("REF", format!("{:?}", s(&reference))),
                    ("SIZE", size.to_string()),
                    ("OPS", "250".to_owned()),
                    ("N", n.to_string()),
                    ("ME", me.to_string()),
                ],
                STRIPED,
            )
        })
        .collect();
    for (i, c) in clients.into_iter().enumerate() {
        wait_ok(c, &format!("client {i}"));
    }
    let c = nbdsh_spawn(
        &served.uri(""),
        &[
            ("SEED", rng.next_u64().to_string()),
            ("REF", format!("{:?}", s(&reference))),
            ("SIZE", size.to_string()),
            ("OPS", "120".to_owned()),
        ],
        CLUSTERS,
    );
    wait_ok(c, "whole-cluster client");
    // What Thinline serves is the reference, byte for byte.
    let copy = dir.path().join("copy.raw");
    run(Command::new("nbdcopy").arg(served.uri("")).arg(&copy));
    assert!(
        std::fs::read(&copy).unwrap() == std::fs::read(&reference).unwrap(),
        "Thinline serves other bytes than the reference"
    );
    let mut served = served;
    assert!(served.terminate(Duration::from_secs(20)).success());
    assert_clean(&clone);
    assert_same(&clone, &reference);
    // qemu-nbd serves the same bytes, and Thinline's block status (read-only now)
    // agrees with qemu-nbd -A on what is allocated where and what reads as zero.
    let qemu = QemuNbd::start(&clone, "qcow2", dir.path().join("q.sock"));
    let from_qemu = dir.path().join("from-qemu.raw");
    run(Command::new("nbdcopy").arg(qemu.uri()).arg(&from_qemu));
    assert!(std::fs::read(&from_qemu).unwrap() == std::fs::read(&reference).unwrap());
    let ours = Served::unix(dir.path(), &["-r"], &[s(&clone)]);
    for context in ["", "qemu:allocation-depth"] {
        assert_same_map(
            &format!("written overlay {context}"),
            &nbd_map(&ours.uri(""), context),
            &nbd_map(&qemu.uri(), context),
            false,
        );
    }
}

#[test]
fn fio_with_verification_and_qemu_io_agree_on_a_writable_overlay() {
    if !require(&["qemu-img", "qemu-io", "fio", "nbdcopy"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (clone, _) = overlay(dir.path(), 16 << 20, &["--extended-l2"]);
    let served = Served::unix(dir.path(), &["-w"], &[s(&clone)]);
    let uri = served.uri("");
    // fio writes random blocks of mixed sizes with checksums, then reads them back.
    run(Command::new("fio").current_dir(dir.path()).args([
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randwrite",
        "--bsrange=512-128k",
        "--bs_unaligned=1",
        "--size=16m",
        "--iodepth=16",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--verify_state_save=0",
        "--do_verify=1",
        "--randrepeat=0",
    ]));
    // qemu-io over NBD: partial writes over the template, zeroes, discards.
    run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x61 70000 3000",
        "-c",
        "write -z 1M 200k",
        "-c",
        "discard 3M 1M",
        "-c",
        "read -P 0x61 70000 3000",
        "-c",
        "read -P 0 1M 200k",
        "-c",
        "flush",
        &uri,
    ]));
    let live = dir.path().join("live.raw");
    run(Command::new("nbdcopy").arg(&uri).arg(&live));
    let mut served = served;
    assert!(served.terminate(Duration::from_secs(20)).success());
    assert_clean(&clone);
    // qemu reads the bytes Thinline served.
    assert_same(&clone, &live);
}

/// Writes ops to the log before sending them and `flushed N` once the first N are
/// durable; runs until killed.
const HEAVY: &str = r#"
import os, random
rng = random.Random(SEED)
log = open(LOG, "w", buffering=1)
h.connect_uri(URI)
j = 0
while True:
    off = rng.randrange(SIZE - 200000)
    ln = rng.choice([512, 4096, 65536, 100000, 131072])
    b = rng.randrange(1, 256)
    log.write(f"op {off} {ln} {b}\n")
    h.pwrite(bytes([b]) * ln, off, nbd.CMD_FLAG_FUA if rng.random() < 0.05 else 0)
    j += 1
    if rng.random() < 0.1:
        h.flush()
        log.write(f"flushed {j}\n")
"#;

#[test]
fn kill_9_during_heavy_writes_keeps_every_flushed_write_and_repair_fixes_the_leaks() {
    if !require(TOOLS) || !has_python_nbd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size: u64 = 8 << 20;
    let (clone, _) = overlay(dir.path(), size, &["--backing-format", "raw"]);
    let mut expected = std::fs::read(dir.path().join("base.raw")).unwrap();
    let mut rng = Rng::from_env();
    let rounds = std::env::var("THINLINE_KILL_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(20u32);
    let mut total_flushed = 0;
    for round in 0..rounds {
        let served = Served::unix(dir.path(), &["-w"], &[s(&clone)]);
        let log = dir.path().join(format!("ops-{round}.log"));
        let writer = nbdsh_spawn(
            &served.uri(""),
            &[
                ("SEED", rng.next_u64().to_string()),
                ("LOG", format!("{:?}", s(&log))),
                ("SIZE", size.to_string()),
            ],
            HEAVY,
        );
        std::thread::sleep(Duration::from_millis(100 + rng.below(400)));
        let mut served = served;
        served.child.kill().unwrap();
        served.child.wait().unwrap();
        let _ = writer.wait_with_output();

        // Consistent (leaks allowed), then repaired to clean.
        let (code, out) = qemu_check(&clone);
        assert!(code == 0 || code == 3, "round {round}: {out}");
        run(Command::new(thinline()).args(["image", "check", "--repair", s(&clone)]));
        assert_clean(&clone);

        // Every byte whose last write was flushed holds it.
        let text = std::fs::read_to_string(&log).unwrap();
        let mut ops = Vec::new();
        let mut flushed = 0;
        for line in text.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            match f[0] {
                "op" if f.len() == 4 => ops.push((
                    f[1].parse::<usize>().unwrap(),
                    f[2].parse::<usize>().unwrap(),
                    f[3].parse::<u8>().unwrap(),
                )),
                "flushed" => flushed = f[1].parse().unwrap(),
                _ => {} // a line cut by the kill
            }
        }
        total_flushed += flushed;
        const NONE: u32 = u32::MAX;
        let mut last = vec![NONE; size as usize];
        for (i, &(off, len, _)) in ops.iter().enumerate() {
            last[off..off + len].fill(i as u32);
        }
        let raw = dir.path().join("now.raw");
        common::run(Command::new("qemu-img").args([
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            s(&clone),
            s(&raw),
        ]));
        let now = std::fs::read(&raw).unwrap();
        for (pos, &l) in last.iter().enumerate() {
            let want = match l {
                NONE => Some(expected[pos]),
                i if (i as usize) < flushed => Some(ops[i as usize].2),
                _ => None, // not flushed: old or new bytes are both right
            };
            if let Some(w) = want {
                assert_eq!(
                    now[pos],
                    w,
                    "round {round}: byte {pos} lost (last write op {l}, {flushed} flushed of {})",
                    ops.len()
                );
            }
        }
        expected = now;
    }
    // The rounds did write and flush before being killed (else they proved nothing).
    assert!(
        total_flushed >= rounds as usize,
        "only {total_flushed} flushed writes in {rounds} rounds"
    );
}

#[test]
fn a_full_file_system_fails_writes_with_enospc_keeps_earlier_data_and_writing_resumes() {
    if !require(TOOLS) || !has_python_nbd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Some(fs) = SmallFs::mount(&dir.path().join("small"), "6m") else {
        return;
    };
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![0x5au8; 32 << 20]).unwrap();
    let clone = fs.0.join("clone.qcow2");
    run(Command::new(thinline()).args([
        "image",
        "create",
        "-f",
        "qcow2",
        "--backing",
        s(&base),
        "--backing-format",
        "raw",
        s(&clone),
    ]));
    let filler = fs.0.join("filler");
    std::fs::write(&filler, vec![1u8; 2 << 20]).unwrap();
    let served = Served::unix(dir.path(), &["-w"], &[s(&clone)]);
    let out = common::nbdsh(
        &served.uri(""),
        &format!(
            r#"
import errno
h.connect_uri(URI)
done = 0
try:
    for i in range(32):
        h.pwrite(bytes([i + 1]) * (1 << 20), i << 20)
        done = i + 1
    raise SystemExit("32 MiB fit in a 6 MiB file system")
except nbd.Error as e:
    assert e.errnum == errno.ENOSPC, e
for i in range(done):
    assert h.pread(1 << 20, i << 20) == bytes([i + 1]) * (1 << 20), i
assert h.pread(4096, 31 << 20) == b"\x5a" * 4096
print(done)
# Space comes back: writing resumes on the same connection.
import os
os.unlink({filler:?})
h.pwrite(b"\x99" * (1 << 20), done << 20)
h.flush()
assert h.pread(1 << 20, done << 20) == b"\x99" * (1 << 20)
print("resumed")
"#,
            filler = s(&filler)
        ),
    );
    let mut lines = out.lines();
    let done: u64 = lines.next().unwrap().trim().parse().unwrap();
    assert!(done >= 1, "{out}");
    assert_eq!(lines.next(), Some("resumed"), "{out}");
    let mut served = served;
    assert!(served.terminate(Duration::from_secs(20)).success());
    let (code, report) = qemu_check(&clone);
    assert!(code == 0 || code == 3, "{report}");
    // Every acknowledged write is in the image.
    let raw = dir.path().join("after.raw");
    run(Command::new("qemu-img").args(["convert", "-O", "raw", s(&clone), s(&raw)]));
    let after = std::fs::read(&raw).unwrap();
    for i in 0..done as usize {
        assert!(
            after[i << 20..(i + 1) << 20]
                .iter()
                .all(|&b| b == i as u8 + 1),
            "MiB {i}"
        );
    }
    let d = done as usize;
    assert!(after[d << 20..(d + 1) << 20].iter().all(|&b| b == 0x99));
}

#[test]
fn a_backing_uri_is_followed_only_under_a_prefix_the_operator_allowed() {
    use thinline_test_support::servers::{Nginx, require_nginx};
    if !require(TOOLS) || !require_nginx() {
        return;
    }
    let www = tempfile::tempdir().unwrap();
    let base: Vec<u8> = (0..4u32 << 20).map(|i| (i % 253) as u8).collect();
    std::fs::create_dir(www.path().join("templates")).unwrap();
    std::fs::write(www.path().join("templates/base.raw"), &base).unwrap();
    let nginx = Nginx::start(www.path());
    let dir = tempfile::tempdir().unwrap();
    let clone = dir.path().join("clone.qcow2");
    let uri = nginx.url("templates/base.raw");
    // The operator names the URI: create follows it (for its size) and records it.
    run(Command::new(thinline()).args([
        "image",
        "create",
        "-f",
        "qcow2",
        "--backing",
        &uri,
        "--backing-format",
        "raw",
        s(&clone),
    ]));
    let fetched = nginx.access_log().lines().count();
    // The image alone, or a prefix the URI is not under, is not enough.
    for extra in [
        vec![],
        vec!["--allow-backing".to_owned(), nginx.url("other/")],
        vec!["--allow-backing".to_owned(), nginx.url("templ")],
    ] {
        let sock = dir.path().join("refused.sock");
        let out = Command::new(thinline())
            .args(["serve", "-w", "--socket", s(&sock)])
            .args(&extra)
            .arg(&clone)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{extra:?}: {err}");
        assert!(err.contains("--allow-backing"), "{extra:?}: {err}");
    }
    assert_eq!(
        nginx.access_log().lines().count(),
        fetched,
        "a refused backing URI was fetched"
    );
    // Under an allowed prefix: served, read from the template, written locally.
    let prefix = nginx.url("templates/");
    let served = Served::unix(
        dir.path(),
        &["-w", "--allow-backing", &prefix],
        &[s(&clone)],
    );
    let out = common::nbdsh(
        &served.uri(""),
        "h.connect_uri(URI)\nh.pwrite(b'x' * 5000, 100000)\nh.flush()\nprint(h.pread(4096, 2 << 20).hex())",
    );
    assert_eq!(out.trim(), hex(&base[2 << 20..(2 << 20) + 4096]));
    let mut served = served;
    assert!(served.terminate(Duration::from_secs(20)).success());
    // qemu here has no HTTP driver: check the overlay alone.
    let spec = format!(
        r#"json:{{"driver":"qcow2","file":{{"driver":"file","filename":{:?}}},"backing":null}}"#,
        s(&clone)
    );
    run(Command::new("qemu-img").args(["check", &spec]));
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
