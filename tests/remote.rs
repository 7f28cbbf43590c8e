//! Remote templates end to end, against real servers on loopback: nginx for HTTP
//! (with a fault-injecting proxy in between), and scheme handlers.
//!
//! Every format fixture served from a remote source must read exactly like
//! `qemu-img` reads the local file; an object replaced under a running export must
//! fail reads with a clear error and never mix versions; faults within the retry
//! budget must be invisible, beyond it they fail that one read and the next succeeds.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::faults::{Fault, FaultProxy};
use common::images::{Img, fixtures, q};
use common::servers::{Nginx, require_nginx};
use common::*;

const TOOLS: &[&str] = &["qemu-img", "qemu-io", "nbdinfo", "nbdcopy"];

/// More fixtures than the chain set: a fixed VHD (footer at the end) and a VMDK made of
/// a descriptor and extent files (related files fetched relative to the descriptor).
fn remote_fixtures(dir: &Path) -> Vec<Img> {
    let mut images = fixtures(dir);
    let p = |n: &str| dir.join(n).to_str().unwrap().to_owned();
    q(
        dir,
        &[
            "convert",
            "-O",
            "vpc",
            "-o",
            "subformat=fixed",
            &p("base.raw"),
            &p("fixed.vhd"),
        ],
    );
    q(
        dir,
        &[
            "convert",
            "-O",
            "vmdk",
            "-o",
            "subformat=twoGbMaxExtentSparse",
            &p("base.raw"),
            &p("split.vmdk"),
        ],
    );
    for (name, fmt) in [("fixed.vhd", "vpc"), ("split.vmdk", "vmdk")] {
        images.push(Img {
            name: name.to_owned(),
            path: dir.join(name),
            qemu_fmt: fmt,
        });
    }
    images
}

/// `qemu-img compare` of the local image with what an NBD URI serves.
fn assert_identical(img: &Img, uri: &str) {
    let out = run(Command::new("qemu-img")
        .args(["compare", "-f", img.qemu_fmt, "-F", "raw"])
        .arg(&img.path)
        .arg(uri));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("identical"),
        "{}: {out:?}",
        img.name
    );
}

/// Runs an nbdsh script connected to `uri` (`errno` imported).
fn sh(uri: &str, script: &str) -> String {
    nbdsh(uri, &format!("import errno\nh.connect_uri(URI)\n{script}"))
}

/// One read with qemu-io.
fn qemu_io_read(uri: &str, offset: u64, length: u64) -> std::process::Output {
    Command::new("qemu-io")
        .args([
            "-r",
            "-f",
            "raw",
            "-c",
            &format!("read {offset} {length}"),
            uri,
        ])
        .output()
        .unwrap()
}

#[test]
fn http_templates_of_every_format_read_like_qemu() {
    if !require(TOOLS) || !require_nginx() {
        return;
    }
    let www = tempfile::tempdir().unwrap();
    let images = remote_fixtures(www.path());
    let nginx = Nginx::start(www.path());
    let specs: Vec<String> = images
        .iter()
        .map(|i| format!("{}={}", i.name, nginx.url(&i.name)))
        .collect();
    let spec_refs: Vec<&str> = specs.iter().map(String::as_str).collect();
    let dir = tempfile::tempdir().unwrap();
    let served = Served::unix(dir.path(), &[], &spec_refs);
    for img in &images {
        assert_identical(img, &served.uri(&img.name));
    }
    // The CLI reads remote images too: convert one over HTTP like qemu-img does locally.
    let ours = dir.path().join("ours.raw");
    let theirs = dir.path().join("theirs.raw");
    run(Command::new(thinline())
        .args([
            "image",
            "convert",
            "-O",
            "raw",
            &nginx.url("over-vhd.qcow2"),
        ])
        .arg(&ours));
    q(
        www.path(),
        &[
            "convert",
            "-O",
            "raw",
            "over-vhd.qcow2",
            theirs.to_str().unwrap(),
        ],
    );
    assert!(read_file(&ours) == read_file(&theirs));
    let info = stdout(Command::new(thinline()).args([
        "image",
        "info",
        "--json",
        &nginx.url("over-vhd.qcow2"),
    ]));
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["chain"].as_array().unwrap().len(), 2, "{info}");
}

#[test]
fn small_reads_become_unit_sized_requests_and_repeat_reads_stay_in_memory() {
    if !require(TOOLS) || !require_nginx() {
        return;
    }
    let www = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..(8u32 << 20)).map(|i| (i % 251) as u8).collect();
    std::fs::write(www.path().join("t.raw"), &data).unwrap();
    let nginx = Nginx::start(www.path());
    let proxy = FaultProxy::start(nginx.port);
    let dir = tempfile::tempdir().unwrap();
    let spec = format!("t={}", proxy.url("t.raw"));
    let served = Served::unix(dir.path(), &["--readahead", "0"], &[&spec]);
    let opened = proxy.requests();
    // 64 reads of 4 KiB inside the same 1 MiB unit, then the same again.
    let mut script = String::new();
    for round in 0..2 {
        for i in 0..64u64 {
            let offset = (3 << 20) + i * 4096 + round;
            script.push_str(&format!(
                "assert h.pread(4096, {offset}) == bytes(((({offset} + j) % 251) for j in range(4096)))\n"
            ));
        }
    }
    sh(&served.uri("t"), &script);
    assert_eq!(
        proxy.requests() - opened,
        1,
        "one 1 MiB request serves every 4 KiB read of that unit"
    );
}

#[test]
fn a_server_without_range_support_is_refused_clearly() {
    if !require(TOOLS) || !require_nginx() {
        return;
    }
    let www = tempfile::tempdir().unwrap();
    std::fs::create_dir(www.path().join("noranges")).unwrap();
    std::fs::write(www.path().join("noranges/t.raw"), vec![7u8; 1 << 20]).unwrap();
    let nginx = Nginx::start(www.path());
    let out = Command::new(thinline())
        .args(["serve", "--socket", "/nonexistent/never.sock"])
        .arg(nginx.url("noranges/t.raw"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("does not support range requests") && err.contains("/noranges/t.raw"),
        "{err}"
    );
    let out = Command::new(thinline())
        .args(["image", "info"])
        .arg(nginx.url("missing.qcow2"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("404") && err.contains("missing.qcow2"),
        "{err}"
    );
}

#[test]
fn a_replaced_object_fails_reads_clearly_and_never_mixes_versions() {
    if !require(TOOLS) || !require_nginx() {
        return;
    }
    let www = tempfile::tempdir().unwrap();
    let path = www.path().join("t.raw");
    std::fs::write(&path, vec![0x11u8; 4 << 20]).unwrap();
    let nginx = Nginx::start(www.path());
    let dir = tempfile::tempdir().unwrap();
    let spec = format!("t={}", nginx.url("t.raw"));
    let served = Served::unix(dir.path(), &["--readahead", "0"], &[&spec]);
    let uri = served.uri("t");
    sh(&uri, "assert h.pread(4096, 0) == b'\\x11' * 4096\n");
    // Replace the object: same size, new content and ETag (mtime moves forward).
    std::thread::sleep(Duration::from_millis(1100));
    let new = www.path().join("t.new");
    std::fs::write(&new, vec![0x22u8; 4 << 20]).unwrap();
    std::fs::rename(&new, &path).unwrap();
    let out = qemu_io_read(&uri, 2 << 20, 4096);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success() || text.contains("error") || text.contains("failed"),
        "a read of the replaced object must fail: {text}"
    );
    assert!(
        served.wait_for_log("changed since it was opened", Duration::from_secs(10)),
        "{}",
        served.log()
    );
    assert!(
        served.log().contains("/t.raw bytes 2097152-"),
        "{}",
        served.log()
    );
    // Data fetched before the change is still the pinned version (format detection
    // also read the last unit); nothing new leaks in.
    sh(
        &uri,
        "assert h.pread(4096, 0) == b'\\x11' * 4096\n\
         try:\n    h.pread(4096, 1 << 20)\n    assert False, 'read of new data succeeded'\n\
         except nbd.Error as e:\n    assert e.errnum == errno.EIO, e\n\
         assert h.pread(4096, (4 << 20) - 4096) == b'\\x11' * 4096\n",
    );
}

#[test]
fn faults_within_the_retry_budget_are_invisible() {
    if !require(TOOLS) || !require_nginx() {
        return;
    }
    let www = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..(24u32 << 20)).map(|i| (i * 31 % 253) as u8).collect();
    std::fs::write(www.path().join("t.raw"), &data).unwrap();
    let nginx = Nginx::start(www.path());
    let proxy = FaultProxy::start(nginx.port);
    proxy.set_latency(Duration::from_millis(5));
    let dir = tempfile::tempdir().unwrap();
    let spec = format!("t={}", proxy.url("t.raw"));
    let served = Served::unix(dir.path(), &["--retries", "6"], &[&spec]);
    for fault in [
        Fault::Status(503, "busy"),
        common::faults::SLOW_DOWN,
        Fault::Status(429, "slow"),
        Fault::Reset,
        Fault::Truncate,
    ] {
        proxy.inject(fault, 2);
    }
    let out = dir.path().join("copy.raw");
    run(Command::new("nbdcopy").arg(served.uri("t")).arg(&out));
    assert!(
        read_file(&out) == data,
        "the copy differs from the template"
    );
    assert_eq!(proxy.queued(), 0, "every injected fault was hit");
    assert!(served.log().contains("retrying"), "{}", served.log());
}

#[test]
fn faults_beyond_the_budget_fail_one_read_and_the_next_succeeds() {
    if !require(TOOLS) || !require_nginx() {
        return;
    }
    let www = tempfile::tempdir().unwrap();
    std::fs::write(www.path().join("t.raw"), vec![0x5au8; 8 << 20]).unwrap();
    let nginx = Nginx::start(www.path());
    let proxy = FaultProxy::start(nginx.port);
    let dir = tempfile::tempdir().unwrap();
    let spec = format!("t={}", proxy.url("t.raw"));
    let served = Served::unix(
        dir.path(),
        &["--retries", "2", "--readahead", "0"],
        &[&spec],
    );
    proxy.always(Fault::Status(503, "down"));
    let before = proxy.injected();
    sh(
        &served.uri("t"),
        "try:\n    h.pread(4096, 5 << 20)\n    assert False, 'read succeeded'\n\
         except nbd.Error as e:\n    assert e.errnum == errno.EIO, e\n",
    );
    assert_eq!(proxy.injected() - before, 3, "one attempt and two retries");
    let log = served.log();
    assert!(
        log.contains("/t.raw bytes 5242880-6291455") && log.contains("503"),
        "the error names the URI, the range and the cause: {log}"
    );
    proxy.clear();
    sh(
        &served.uri("t"),
        "assert h.pread(4096, 5 << 20) == b'\\x5a' * 4096\n",
    );
}

#[test]
fn credentials_and_signatures_never_appear_in_output() {
    if !require(TOOLS) || !require_nginx() {
        return;
    }
    let www = tempfile::tempdir().unwrap();
    std::fs::write(www.path().join("t.raw"), vec![1u8; 1 << 20]).unwrap();
    let nginx = Nginx::start(www.path());
    let secret_uri = format!(
        "http://alice:hunter2secret@127.0.0.1:{}/t.raw?X-Amz-Signature=sigsecret",
        nginx.port
    );
    let dir = tempfile::tempdir().unwrap();
    let spec = format!("t={secret_uri}");
    let mut served = Served::unix(dir.path(), &[], &[&spec]);
    sh(&served.uri("t"), "assert h.pread(16, 0) == b'\\x01' * 16\n");
    let report = stdout(Command::new(thinline()).args(["image", "info", "--json", &secret_uri]));
    served.terminate(Duration::from_secs(10));
    let bad = format!(
        "http://alice:hunter2secret@127.0.0.1:{}/missing.raw?X-Amz-Signature=sigsecret",
        nginx.port
    );
    let failed = Command::new(thinline())
        .args(["image", "info", &bad])
        .output()
        .unwrap();
    assert!(!failed.status.success());
    for text in [
        served.log(),
        report,
        String::from_utf8_lossy(&failed.stderr).into_owned(),
    ] {
        assert!(
            !text.contains("hunter2") && !text.contains("sigsecret") && !text.contains("alice"),
            "a secret leaked: {text}"
        );
    }
    // Basic authentication was sent (nginx logs the user name).
    assert!(
        nginx.access_log().contains("alice"),
        "{}",
        nginx.access_log()
    );
}

/// Writes an executable handler script `scheme` into `dir`.
fn handler(dir: &Path, scheme: &str, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(scheme);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn scheme_handlers_attach_serve_and_detach() {
    if !require(TOOLS) {
        return;
    }
    let store = tempfile::tempdir().unwrap();
    let images = fixtures(store.path());
    let handlers = tempfile::tempdir().unwrap();
    let log = handlers.path().join("calls.log");
    // `vault://anything/NAME` is the fixture NAME in the store directory.
    handler(
        handlers.path(),
        "vault",
        &format!(
            "echo \"$1 $2\" >> {log}\nname=${{2##*/}}\n[ \"$1\" = attach ] && echo {store}/$name\nexit 0",
            log = log.display(),
            store = store.path().display()
        ),
    );
    handler(
        handlers.path(),
        "broken",
        "echo 'cannot reach the vault for broken://u:pw@x/y' >&2\nexit 3",
    );
    let dir = tempfile::tempdir().unwrap();
    let handler_dir = handlers.path().to_str().unwrap();
    let ovl = images.iter().find(|i| i.name == "over-vhd.qcow2").unwrap();
    let mut served = Served::unix(
        dir.path(),
        &["--handler-dir", handler_dir],
        &["t=vault://store/over-vhd.qcow2"],
    );
    assert_identical(ovl, &served.uri("t"));
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "attach vault://store/over-vhd.qcow2\n"
    );
    assert!(served.terminate(Duration::from_secs(10)).success());
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "attach vault://store/over-vhd.qcow2\ndetach vault://store/over-vhd.qcow2\n"
    );

    let out = Command::new(thinline())
        .args([
            "image",
            "info",
            "--handler-dir",
            handler_dir,
            "broken://u:pw@x/y",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot reach the vault") && err.contains("exit status: 3"),
        "{err}"
    );
    assert!(!err.contains(":pw@"), "{err}");
    let out = Command::new(thinline())
        .args([
            "image",
            "info",
            "--handler-dir",
            handler_dir,
            "nosuch://x/y",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no built-in source") && err.contains("nosuch"),
        "{err}"
    );
}
