//! Remote templates end to end, against real servers on loopback: nginx for HTTP, moto
//! for S3 (both with a fault-injecting proxy in between where faults are tested),
//! nfs-ganesha for NFS, qemu-nbd for NBD, and scheme handlers.
//!
//! Every format fixture served from a remote source must read exactly like
//! `qemu-img` reads the local file; an object replaced under a running export must
//! fail reads with a clear error and never mix versions; faults within the retry
//! budget must be invisible, beyond it they fail that one read and the next succeeds.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use thinline_test_support::KillOnDrop;
use thinline_test_support::faults::{Fault, FaultProxy, TcpFaultProxy};
use thinline_test_support::ports::{loopback_listener, socket_activated};
use thinline_test_support::qemu::{Img, fixtures, qemu_convert, qemu_img};
use thinline_test_support::servers::{
    Moto, NfsServer, Nginx, require_moto, require_nfs_server, require_nginx,
};

const TOOLS: &[&str] = &["qemu-img", "qemu-io", "nbdinfo", "nbdcopy"];

/// More fixtures than the chain set: a fixed VHD (footer at the end) and a VMDK made of
/// a descriptor and extent files (related files fetched relative to the descriptor).
fn remote_fixtures(dir: &Path) -> Vec<Img> {
    let mut images = fixtures(dir);
    qemu_convert(dir, "base.raw", "vpc", "subformat=fixed", "fixed.vhd");
    qemu_convert(
        dir,
        "base.raw",
        "vmdk",
        "subformat=twoGbMaxExtentSparse",
        "split.vmdk",
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
    let (www, images) = in_tempdir(remote_fixtures);
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
    qemu_img(
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
fn http_templates_through_a_cache_dir_read_like_qemu_and_a_restart_fetches_nothing() {
    if !require(TOOLS) || !require_nginx() {
        return;
    }
    let (www, images) = in_tempdir(remote_fixtures);
    let nginx = Nginx::start(www.path());
    let specs: Vec<String> = images
        .iter()
        .map(|i| format!("{}={}", i.name, nginx.url(&i.name)))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let cache_dir = dir.path().join("cache");
    let status_socket = dir.path().join("status.sock");
    let mut args = vec![
        "--cache-dir",
        cache_dir.to_str().unwrap(),
        "--status-socket",
        status_socket.to_str().unwrap(),
    ];
    args.extend(specs.iter().map(String::as_str));
    let status = || -> serde_json::Value {
        let out = run(Command::new(thinline())
            .args(["proxy", "status", "--json"])
            .arg(&status_socket));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    for round in 0..2 {
        let mut served = Served::unix(dir.path(), &args, &[]);
        for img in &images {
            assert_identical(img, &served.uri(&img.name));
        }
        let s = status();
        for img in &images {
            let e = &s["exports"][&img.name];
            let fetched = e["bytes_from_upstream"].as_u64().unwrap();
            if round == 0 {
                assert!(fetched > 0, "{}: {e}", img.name);
            } else {
                // Everything qemu-img read is in the cache from the first run.
                assert_eq!(fetched, 0, "{}: {e}", img.name);
                assert_eq!(e["misses"], 0, "{}: {e}", img.name);
            }
        }
        served.terminate(Duration::from_secs(20));
    }
    let caches = std::fs::read_dir(&cache_dir).unwrap().count();
    assert_eq!(caches, images.len(), "one cache per template");
}

/// A test CA and a certificate for 127.0.0.1 signed by it, made with openssl in `dir`:
/// (ca.pem, cert.pem, key.pem).
fn test_certificates(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let p = |n: &str| dir.join(n);
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    run(Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-days",
            "2",
            "-subj",
            "/CN=thinline-test-ca",
        ])
        .args(ec)
        .arg("-keyout")
        .arg(p("ca.key"))
        .arg("-out")
        .arg(p("ca.pem")));
    run(Command::new("openssl")
        .args(["req", "-subj", "/CN=127.0.0.1"])
        .args(ec)
        .arg("-keyout")
        .arg(p("key.pem"))
        .arg("-out")
        .arg(p("leaf.csr")));
    std::fs::write(
        p("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(Command::new("openssl")
        .args(["x509", "-req", "-days", "2", "-CAcreateserial"])
        .arg("-in")
        .arg(p("leaf.csr"))
        .arg("-CA")
        .arg(p("ca.pem"))
        .arg("-CAkey")
        .arg(p("ca.key"))
        .arg("-extfile")
        .arg(p("ext.cnf"))
        .arg("-out")
        .arg(p("cert.pem")));
    (p("ca.pem"), p("cert.pem"), p("key.pem"))
}

#[test]
fn https_templates_use_http2_and_untrusted_certificates_are_refused() {
    if !require(&["qemu-img", "qemu-io", "nbdinfo", "openssl"]) || !require_nginx() {
        return;
    }
    let www = tempfile::tempdir().unwrap();
    let images: Vec<Img> = fixtures(www.path())
        .into_iter()
        .filter(|i| ["ovl.qcow2", "stream.vmdk"].contains(&i.name.as_str()))
        .collect();
    let certs = tempfile::tempdir().unwrap();
    let (ca, cert, key) = test_certificates(certs.path());
    let nginx = Nginx::start_tls(www.path(), &cert, &key);
    let base = format!("https://127.0.0.1:{}", nginx.port);
    // SSL_CERT_FILE adds the test CA to the trusted roots (as for any system CA bundle).
    let served = serve_and_compare(
        &images,
        |name| format!("{base}/{name}"),
        &[],
        &[("SSL_CERT_FILE", ca.to_str().unwrap())],
    );
    drop(served);
    let log = nginx.access_log();
    assert!(log.contains("\"GET /ovl.qcow2 HTTP/2.0\" 206"), "{log}");
    assert!(log.contains("\"GET /base.raw HTTP/2.0\" 206"), "{log}");
    // Without the CA the certificate is refused at once (no retries), clearly.
    let out = Command::new(thinline())
        .args(["image", "info", &format!("{base}/ovl.qcow2")])
        .env_remove("SSL_CERT_FILE")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("certificate") && !err.contains("retrying"),
        "{err}"
    );
}

/// nginx serving a new temporary directory that holds one file, `name`, of `data`.
fn nginx_serving(name: &str, data: &[u8]) -> (tempfile::TempDir, Nginx) {
    let www = tempfile::tempdir().unwrap();
    std::fs::write(www.path().join(name), data).unwrap();
    let nginx = Nginx::start(www.path());
    (www, nginx)
}

#[test]
fn small_reads_become_unit_requests_shared_by_every_connection() {
    if !require(TOOLS) || !require_nginx() {
        return;
    }
    let data: Vec<u8> = (0..(8u32 << 20)).map(|i| (i % 251) as u8).collect();
    let (_www, nginx) = nginx_serving("t.raw", &data);
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
    // Four connections copying the whole image share fetches: no unit is fetched twice
    // (7 units were never read; the 8th is in memory).
    let before = proxy.requests();
    let copy = dir.path().join("copy.raw");
    run(Command::new("nbdcopy")
        .args(["--connections=4", "--requests=16"])
        .arg(served.uri("t"))
        .arg(&copy));
    assert!(read_file(&copy) == data);
    let fetched = proxy.requests() - before;
    assert!((1..=7).contains(&fetched), "{fetched} requests for 7 units");
}

#[test]
fn fetch_engine_metrics_count_what_the_template_server_sent() {
    if !require(TOOLS) || !require_nginx() {
        return;
    }
    let data: Vec<u8> = (0..(4u32 << 20)).map(|i| (i % 251) as u8).collect();
    let (_www, nginx) = nginx_serving("t.raw", &data);
    let dir = tempfile::tempdir().unwrap();
    let url = format!("http://127.0.0.1:{}/t.raw", nginx.port);
    let spec = format!("t={url}");
    let mut served = Served::unix(dir.path(), &["--metrics-listen", "127.0.0.1:0"], &[&spec]);
    let address = served.report["metrics"].as_str().unwrap().to_owned();
    let Some(_) = scrape(&address) else { return };
    let copy = dir.path().join("copy.raw");
    run(Command::new("nbdcopy").arg(served.uri("t")).arg(&copy));
    assert!(read_file(&copy) == data);
    let m = scrape(&address).unwrap();
    let get = |name: &str| {
        let key = format!(r#"{name}{{template="{url}"}}"#);
        m.get(&key)
            .copied()
            .unwrap_or_else(|| panic!("{key} missing from {m:?}"))
    };
    assert_eq!(
        get("thinline_fetch_bytes_total"),
        data.len() as f64,
        "each byte fetched once"
    );
    assert!(get("thinline_fetch_requests_total") >= 1.0);
    assert_eq!(get("thinline_fetch_retries_total"), 0.0);
    assert_eq!(get("thinline_fetch_in_flight"), 0.0);
    assert_eq!(
        m[r#"thinline_export_read_bytes_total{export="t"}"#],
        data.len() as f64
    );
    assert!(served.terminate(Duration::from_secs(20)).success());
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
    let (www, nginx) = nginx_serving("t.raw", &vec![0x11u8; 4 << 20]);
    let path = www.path().join("t.raw");
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
    served.assert_logs("changed since it was opened", Duration::from_secs(10));
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
    let data: Vec<u8> = (0..(24u32 << 20)).map(|i| (i * 31 % 253) as u8).collect();
    let (_www, nginx) = nginx_serving("t.raw", &data);
    let proxy = FaultProxy::start(nginx.port);
    proxy.set_latency(Duration::from_millis(5));
    let dir = tempfile::tempdir().unwrap();
    let spec = format!("t={}", proxy.url("t.raw"));
    let served = Served::unix(dir.path(), &["--retries", "6"], &[&spec]);
    for fault in [
        Fault::Status(503, "busy"),
        thinline_test_support::faults::SLOW_DOWN,
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
    served.assert_logs("retrying", Duration::from_secs(10));
}

#[test]
fn faults_beyond_the_budget_fail_one_read_and_the_next_succeeds() {
    if !require(TOOLS) || !require_nginx() {
        return;
    }
    let (_www, nginx) = nginx_serving("t.raw", &vec![0x5au8; 8 << 20]);
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
    // The log line may be collected just after the reply reached the client.
    served.wait_for_log("bytes 5242880-6291455", Duration::from_secs(10));
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
    let (_www, nginx) = nginx_serving("t.raw", &vec![1u8; 1 << 20]);
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
    let (store, images) = in_tempdir(fixtures);
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

/// Credentials and settings for moto (which accepts any key), isolated from the host's
/// AWS configuration.
const S3_ENV: [(&str, &str); 5] = [
    ("AWS_ACCESS_KEY_ID", "AKIATESTKEY"),
    ("AWS_SECRET_ACCESS_KEY", "s3cr3tTESTvalue"),
    ("AWS_EC2_METADATA_DISABLED", "true"),
    ("AWS_CONFIG_FILE", "/nonexistent/aws-config"),
    (
        "AWS_SHARED_CREDENTIALS_FILE",
        "/nonexistent/aws-credentials",
    ),
];

/// Uploads every file of `dir` to `bucket` under `prefix/`.
fn upload_dir(moto: &Moto, bucket: &str, prefix: &str, dir: &Path) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            let name = path.file_name().unwrap().to_str().unwrap();
            moto.put(bucket, &format!("{prefix}/{name}"), &path);
        }
    }
}

/// Serves every fixture from `uri_of(name)` in one `thinline serve` and compares each
/// with what qemu-img reads from the local file.
fn serve_and_compare(
    images: &[Img],
    uri_of: impl Fn(&str) -> String,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Served {
    let specs: Vec<String> = images
        .iter()
        .map(|i| format!("{}={}", i.name, uri_of(&i.name)))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    let mut args = vec!["--socket", sock.to_str().unwrap()];
    args.extend_from_slice(extra);
    args.extend(specs.iter().map(String::as_str));
    let served = Served::start_env(&args, env);
    for img in images {
        assert_identical(img, &served.uri(&img.name));
    }
    std::mem::forget(dir); // the socket lives as long as the server
    served
}

#[test]
fn s3_templates_of_every_format_read_like_qemu_through_faults() {
    if !require(TOOLS) || !require_moto() {
        return;
    }
    let (store, images) = in_tempdir(remote_fixtures);
    let moto = Moto::start();
    moto.create_bucket("templates", false);
    upload_dir(&moto, "templates", "golden/v1", store.path());
    let proxy = FaultProxy::start(moto.port);
    for fault in [
        thinline_test_support::faults::SLOW_DOWN,
        Fault::Reset,
        Fault::Truncate,
    ] {
        proxy.inject(fault, 2);
    }
    let endpoint = format!("http://127.0.0.1:{}", proxy.port);
    let served = serve_and_compare(
        &images,
        |name| format!("s3://templates/golden/v1/{name}"),
        &["--s3-endpoint", &endpoint],
        &S3_ENV,
    );
    assert_eq!(proxy.queued(), 0, "every injected fault was hit");
    served.assert_logs("503", Duration::from_secs(10));
    let log = served.log();
    assert!(
        !log.contains("s3cr3t") && !log.contains("AKIATESTKEY"),
        "credentials leaked: {log}"
    );
}

#[test]
fn s3_replaced_objects_fail_and_pinned_versions_hold() {
    if !require(TOOLS) || !require_moto() {
        return;
    }
    let moto = Moto::start();
    moto.create_bucket("versioned", true);
    let dir = tempfile::tempdir().unwrap();
    let v1_file = dir.path().join("v1.raw");
    let v2_file = dir.path().join("v2.raw");
    std::fs::write(&v1_file, vec![0x11u8; 4 << 20]).unwrap();
    std::fs::write(&v2_file, vec![0x22u8; 4 << 20]).unwrap();
    let v1 = moto
        .put("versioned", "t.raw", &v1_file)
        .expect("moto returns a version id when versioning is on");
    let endpoint = moto.endpoint();
    let latest = "latest=s3://versioned/t.raw".to_owned();
    let pinned = format!("pinned=s3://versioned/t.raw?versionId={v1}");
    let served = Served::start_env(
        &[
            "--socket",
            dir.path().join("nbd.sock").to_str().unwrap(),
            "--s3-endpoint",
            &endpoint,
            "--readahead",
            "0",
            &latest,
            &pinned,
        ],
        &S3_ENV,
    );
    for export in ["latest", "pinned"] {
        sh(
            &served.uri(export),
            "assert h.pread(4096, 0) == b'\\x11' * 4096\n",
        );
    }
    let v2 = moto.put("versioned", "t.raw", &v2_file).unwrap();
    assert_ne!(v1, v2);
    // The export pinned to the ETag seen at open fails on data it has not fetched yet.
    sh(
        &served.uri("latest"),
        "try:\n    h.pread(4096, 1 << 20)\n    assert False, 'read of new data succeeded'\n\
         except nbd.Error as e:\n    assert e.errnum == errno.EIO, e\n",
    );
    served.assert_logs("changed since it was opened", Duration::from_secs(10));
    // The export pinned to a version keeps reading that version.
    sh(
        &served.uri("pinned"),
        "assert h.pread(4096, 1 << 20) == b'\\x11' * 4096\n\
         assert h.pread(4096, 2 << 20) == b'\\x11' * 4096\n",
    );
    let report = stdout(
        Command::new(thinline())
            .args([
                "image",
                "info",
                "--json",
                "--s3-endpoint",
                &endpoint,
                &pinned[7..],
            ])
            .envs(S3_ENV),
    );
    assert!(report.contains(&format!("versionId={v1}")), "{report}");
}

#[test]
fn two_versions_of_one_s3_key_get_their_own_caches_and_serve_at_once() {
    if !require(TOOLS) || !require_moto() {
        return;
    }
    let moto = Moto::start();
    moto.create_bucket("twoversions", true);
    let dir = tempfile::tempdir().unwrap();
    let (v1_file, v2_file) = (dir.path().join("v1.raw"), dir.path().join("v2.raw"));
    std::fs::write(&v1_file, vec![0x11u8; 2 << 20]).unwrap();
    std::fs::write(&v2_file, vec![0x22u8; 2 << 20]).unwrap();
    let v1 = moto.put("twoversions", "t.raw", &v1_file).unwrap();
    let v2 = moto.put("twoversions", "t.raw", &v2_file).unwrap();
    assert_ne!(v1, v2);
    let cache_dir = dir.path().join("cache");
    let one = format!("one=s3://twoversions/t.raw?versionId={v1}");
    let two = format!("two=s3://twoversions/t.raw?versionId={v2}");
    let served = Served::start_env(
        &[
            "--socket",
            dir.path().join("nbd.sock").to_str().unwrap(),
            "--s3-endpoint",
            &moto.endpoint(),
            "--cache-dir",
            cache_dir.to_str().unwrap(),
            &one,
            &two,
        ],
        &S3_ENV,
    );
    sh(
        &served.uri("one"),
        "assert h.pread(1 << 20, 1 << 20) == b'\\x11' * (1 << 20)\n",
    );
    sh(
        &served.uri("two"),
        "assert h.pread(1 << 20, 1 << 20) == b'\\x22' * (1 << 20)\n",
    );
    let caches: Vec<_> = served.report["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["cache"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(caches.len(), 2);
    assert_ne!(caches[0], caches[1]);
    assert_eq!(std::fs::read_dir(&cache_dir).unwrap().count(), 2);
}

#[test]
fn s3_throttling_beyond_the_budget_fails_one_read_and_recovers() {
    if !require(TOOLS) || !require_moto() {
        return;
    }
    let moto = Moto::start();
    moto.create_bucket("tmpl", false);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("t.raw");
    std::fs::write(&file, vec![0x5au8; 4 << 20]).unwrap();
    moto.put("tmpl", "t.raw", &file);
    let proxy = FaultProxy::start(moto.port);
    let endpoint = format!("http://127.0.0.1:{}", proxy.port);
    let served = Served::start_env(
        &[
            "--socket",
            dir.path().join("nbd.sock").to_str().unwrap(),
            "--s3-endpoint",
            &endpoint,
            "--retries",
            "2",
            "--readahead",
            "0",
            "t=s3://tmpl/t.raw",
        ],
        &S3_ENV,
    );
    proxy.always(thinline_test_support::faults::SLOW_DOWN);
    sh(
        &served.uri("t"),
        "try:\n    h.pread(4096, 2 << 20)\n    assert False, 'read succeeded'\n\
         except nbd.Error as e:\n    assert e.errnum == errno.EIO, e\n",
    );
    served.wait_for_log("bytes 2097152-3145727", Duration::from_secs(10));
    let log = served.log();
    assert!(
        log.contains("s3://tmpl/t.raw bytes 2097152-3145727") && log.contains("SlowDown"),
        "{log}"
    );
    proxy.clear();
    sh(
        &served.uri("t"),
        "assert h.pread(4096, 2 << 20) == b'\\x5a' * 4096\n",
    );
}

#[test]
fn nfs_templates_of_every_format_read_like_qemu() {
    if !require(TOOLS) || !require_nfs_server() {
        return;
    }
    let (store, images) = in_tempdir(remote_fixtures);
    let nfs = NfsServer::start(store.path());
    serve_and_compare(&images, |name| nfs.uri(name), &[], &[]);
}

#[test]
fn nfs_connection_resets_during_a_copy_are_retried_invisibly() {
    if !require(TOOLS) || !require_nfs_server() {
        return;
    }
    let store = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..(32u32 << 20)).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(store.path().join("t.raw"), &data).unwrap();
    let nfs = NfsServer::start(store.path());
    let proxy = TcpFaultProxy::start(nfs.nfs_port);
    let uri = nfs.uri("t.raw").replacen(
        &format!("127.0.0.1:{}/", nfs.nfs_port),
        &format!("127.0.0.1:{}/", proxy.port),
        1,
    );
    let dir = tempfile::tempdir().unwrap();
    let spec = format!("t={uri}");
    let served = Served::unix(dir.path(), &["--fetch-unit", "256K"], &[&spec]);
    copy_while_resetting(&served, &proxy, dir.path(), &data);
}

#[test]
fn nbd_templates_read_like_qemu_and_chains_are_refused() {
    if !require(&["qemu-img", "qemu-io", "qemu-nbd", "nbdinfo"]) {
        return;
    }
    let store = tempfile::tempdir().unwrap();
    let images: Vec<Img> = remote_fixtures(store.path())
        .into_iter()
        .filter(|i| {
            [
                "base.raw",
                "comp.qcow2",
                "dyn.vhd",
                "fixed.vhd",
                "sparse.vmdk",
                "stream.vmdk",
            ]
            .contains(&i.name.as_str())
        })
        .collect();
    // Each file's bytes, exported raw by qemu-nbd: thinline reads the format through NBD.
    let mut upstreams = Vec::new();
    for img in images.iter().chain(std::iter::once(&Img {
        name: "ovl.qcow2".into(),
        path: store.path().join("ovl.qcow2"),
        qemu_fmt: "qcow2",
    })) {
        let sock = store.path().join(format!("{}.sock", img.name));
        let child = Command::new("qemu-nbd")
            .args(["-r", "-t", "-e", "4", "-f", "raw", "-k"])
            .arg(&sock)
            .arg(&img.path)
            .spawn()
            .unwrap();
        upstreams.push(KillOnDrop(child));
        let uri = format!("nbd+unix:///?socket={}", sock.display());
        assert!(wait_until(|| Command::new("nbdinfo")
            .args(["--size", &uri])
            .output()
            .is_ok_and(|o| o.status.success())));
    }
    let sock_of = |name: &str| store.path().join(format!("{name}.sock"));
    serve_and_compare(
        &images,
        |name| format!("nbd+unix:///?socket={}", sock_of(name).display()),
        &[],
        &[],
    );
    // An NBD export names no related files: a qcow2 with a backing file is refused.
    let out = Command::new(thinline())
        .args(["image", "info"])
        .arg(format!(
            "nbd+unix:///?socket={}",
            sock_of("ovl.qcow2").display()
        ))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("names no related files"), "{err}");
}

#[test]
fn nbd_connection_resets_during_a_copy_are_retried_invisibly() {
    if !require(&["qemu-nbd", "nbdinfo", "nbdcopy"]) {
        return;
    }
    let store = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..(32u32 << 20)).map(|i| (i * 13 % 249) as u8).collect();
    let path = store.path().join("t.raw");
    std::fs::write(&path, &data).unwrap();
    // qemu-nbd gets its listening socket by socket activation: the port is ours from
    // the start, so no other test can take it.
    let listener = loopback_listener();
    let port = listener.local_addr().unwrap().port();
    let _upstream = KillOnDrop(
        socket_activated("qemu-nbd", &listener)
            .args(["-r", "-t", "-e", "8", "-f", "raw"])
            .arg(&path)
            .spawn()
            .unwrap(),
    );
    drop(listener);
    let direct = format!("nbd://127.0.0.1:{port}/");
    assert!(wait_until(|| Command::new("nbdinfo")
        .args(["--size", &direct])
        .output()
        .is_ok_and(|o| o.status.success())));
    let proxy = TcpFaultProxy::start(port);
    let dir = tempfile::tempdir().unwrap();
    let spec = format!("t=nbd://127.0.0.1:{}/", proxy.port);
    let served = Served::unix(dir.path(), &["--fetch-unit", "256K"], &[&spec]);
    copy_while_resetting(&served, &proxy, dir.path(), &data);
}

/// Copies export `t` with nbdcopy while resetting every proxied connection every 30 ms,
/// and checks that every byte arrived and that connections were really reset.
fn copy_while_resetting(served: &Served, proxy: &TcpFaultProxy, dir: &Path, data: &[u8]) {
    let copy = dir.join("copy.raw");
    let mut nbdcopy = Command::new("nbdcopy")
        .arg(served.uri("t"))
        .arg(&copy)
        .spawn()
        .unwrap();
    let mut resets = 0;
    while nbdcopy.try_wait().unwrap().is_none() && resets < 20 {
        std::thread::sleep(Duration::from_millis(30));
        proxy.reset_all();
        resets += 1;
    }
    assert!(nbdcopy.wait().unwrap().success(), "{}", served.log());
    assert!(
        read_file(&copy) == data,
        "the copy differs from the template"
    );
    assert!(
        proxy.accepted() > 1,
        "the connections were reset and reopened"
    );
}

fn wait_until(mut ready: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        if ready() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}
