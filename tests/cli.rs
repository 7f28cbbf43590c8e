//! Command-line contract of `thinline serve` and `thinline image`: help, usage errors (exit 2),
//! start-up failures that name the file and the reason (exit 1), `image check` statuses; and
//! `serve` and `proxy` as systemd services: socket activation (by systemd-socket-activate,
//! as systemd does it) and readiness notification.

mod common;

use std::process::{Command, Output};

fn thinline(args: &[&str]) -> Output {
    Command::new(common::thinline())
        .args(args)
        .output()
        .expect("run thinline")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts that thinline exited with `code` and that its stderr says `words`.
fn assert_fails_saying(o: &Output, code: i32, words: &str) {
    assert_eq!(o.status.code(), Some(code), "{}", stderr(o));
    assert!(
        stderr(o).contains(words),
        "{words:?} missing from:\n{}",
        stderr(o)
    );
}

#[test]
fn serve_help_lists_every_option_and_examples() {
    let o = thinline(&["serve", "--help"]);
    assert!(o.status.success());
    let help = String::from_utf8(o.stdout).unwrap();
    for option in [
        "--socket",
        "--listen",
        "--read-only",
        "--max-connections",
        "--handshake-timeout",
        "--min-block-size",
        "--json",
        "--io-engine",
        "--fetch-unit",
        "--max-in-flight",
        "--readahead",
        "--fetch-memory",
        "--retries",
        "--connect-timeout",
        "--first-byte-timeout",
        "--idle-timeout",
        "--min-rate",
        "--allow-redirect",
        "--netrc-file",
        "--s3-endpoint",
        "--s3-region",
        "--handler-dir",
        "s3://",
        "Examples:",
    ] {
        assert!(help.contains(option), "{option} missing from:\n{help}");
    }
    // Serving options are not listed under the remote-template heading.
    let heading = help
        .find("Remote templates (http, https, s3, nfs, nbd, handlers):")
        .expect("a remote heading");
    for option in [
        "--socket <PATH>",
        "--json",
        "--read-only",
        "--metadata-cache",
    ] {
        assert!(
            help.find(option).unwrap() < heading,
            "{option} under the remote heading:\n{help}"
        );
    }
}

#[test]
fn unknown_option_is_a_usage_error_with_exit_status_2() {
    let o = thinline(&["serve", "--no-such-option"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

#[test]
fn missing_image_fails_with_exit_status_1_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.img");
    let sock = dir.path().join("s.sock");
    let o = thinline(&[
        "serve",
        "--socket",
        sock.to_str().unwrap(),
        missing.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.contains(missing.to_str().unwrap()), "{err}");
    assert!(err.contains("No such file"), "{err}");
}

#[test]
fn a_directory_is_not_an_image() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let o = thinline(&[
        "serve",
        "--socket",
        sock.to_str().unwrap(),
        "-r",
        dir.path().to_str().unwrap(),
    ]);
    assert_fails_saying(&o, 1, "not a regular file or a block device");
}

#[test]
fn duplicate_export_names_are_refused() {
    let fx = common::Fixture::new(1 << 20);
    let sock = fx.path("s.sock");
    let a = format!("same={}", fx.image.display());
    let o = thinline(&["serve", "--socket", sock.to_str().unwrap(), &a, &a]);
    assert_fails_saying(&o, 1, "\"same\" is used twice");
}

#[test]
fn min_block_size_must_be_a_power_of_two() {
    let o = thinline(&["serve", "--min-block-size", "3000", "x.img"]);
    assert_fails_saying(&o, 1, "power of two");
}

#[test]
fn image_help_lists_every_command_with_examples() {
    let o = thinline(&["image", "--help"]);
    assert!(o.status.success());
    let help = String::from_utf8_lossy(&o.stdout).to_string();
    for cmd in ["info", "map", "check", "convert"] {
        assert!(help.contains(cmd), "{cmd} missing from:\n{help}");
        let o = thinline(&["image", cmd, "--help"]);
        let sub = String::from_utf8_lossy(&o.stdout).to_string();
        assert!(
            o.status.success() && sub.contains("Examples:"),
            "{cmd}:\n{sub}"
        );
        assert!(sub.contains("--format"), "{cmd} has --format:\n{sub}");
    }
    let serve = String::from_utf8_lossy(&thinline(&["serve", "--help"]).stdout).to_string();
    assert!(
        serve.contains("--format") && serve.contains("--undeclared-backing"),
        "{serve}"
    );
}

fn qemu_img(args: &[&str]) {
    common::run(Command::new("qemu-img").args(args));
}

#[test]
fn image_check_exit_status_says_clean_or_warnings() {
    if !common::require(&["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let clean = dir.path().join("clean.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", clean.to_str().unwrap(), "8M"]);
    let dirty = thinline_test_support::qemu::dirty_qcow2(dir.path(), "dirty.qcow2");
    let o = thinline(&["image", "check", clean.to_str().unwrap()]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let o = thinline(&["image", "check", "--json", dirty.to_str().unwrap()]);
    assert_eq!(
        o.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["clean"], false);
    assert_eq!(report["errors"], 0);
    assert!(report["warnings"].as_u64().unwrap() > 0);
}

#[test]
fn forced_format_that_does_not_match_is_refused() {
    let fx = common::Fixture::new(1 << 20);
    let sock = fx.path("s.sock");
    let img = fx.image.to_str().unwrap();
    for (format, words) in [
        ("qcow2", "no qcow2 magic"),
        ("vhd", "conectix"),
        ("vmdk", "vmdk"),
    ] {
        let o = thinline(&[
            "serve",
            "--format",
            format,
            "--socket",
            sock.to_str().unwrap(),
            img,
        ]);
        assert_eq!(o.status.code(), Some(1), "{format}");
        assert!(
            stderr(&o).contains(img) && stderr(&o).contains(words),
            "{format}: {}",
            stderr(&o)
        );
        assert!(!sock.exists());
    }
}

#[test]
fn convert_refuses_to_overwrite_its_input() {
    let fx = common::Fixture::new(1 << 20);
    let img = fx.image.to_str().unwrap();
    let before = std::fs::read(&fx.image).unwrap();
    let o = thinline(&["image", "convert", "-O", "raw", img, img]);
    assert_fails_saying(&o, 1, "refusing to overwrite");
    assert!(
        std::fs::read(&fx.image).unwrap() == before,
        "the input is unchanged"
    );
}

#[test]
fn file_uris_are_local_images_and_unreachable_remotes_fail_without_secrets() {
    let fx = common::Fixture::new(1 << 20);
    let uri = format!("file://{}", fx.image.display());
    let o = thinline(&["image", "info", "--json", &uri]);
    assert!(o.status.success(), "{}", stderr(&o));
    let info: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(info["virtual_size"], 1 << 20);
    let sock = fx.path("s.sock");
    // Bound but not listening: connections are refused, and no server can take it.
    let closed_port = thinline_test_support::ports::ClosedPort::new();
    let closed = closed_port.port;
    let unreachable = format!("https://user:secret@127.0.0.1:{closed}/t.qcow2?X-Amz-Signature=abc");
    let handlers = tempfile::tempdir().unwrap();
    for (bad, expected) in [
        (
            unreachable.as_str(),
            format!("https://127.0.0.1:{closed}/t.qcow2"),
        ),
        (
            "smb://user:secret@filer/t.vhd",
            "no built-in source".to_owned(),
        ),
    ] {
        for cmd in [
            &["image", "info"][..],
            &["serve", "--socket", sock.to_str().unwrap()][..],
        ] {
            let mut args = cmd.to_vec();
            args.extend([
                "--retries",
                "0",
                "--handler-dir",
                handlers.path().to_str().unwrap(),
                bad,
            ]);
            let o = thinline(&args);
            assert_eq!(o.status.code(), Some(1), "{args:?}");
            let err = stderr(&o);
            assert!(err.contains(&expected), "{err}");
            assert!(
                !err.contains("secret") && !err.contains("Signature"),
                "{err}"
            );
            assert!(!sock.exists());
        }
    }
}

#[test]
fn proxy_help_lists_every_option_and_examples() {
    for args in [&["proxy", "--help"][..], &["proxy", "status", "--help"][..]] {
        let o = thinline(args);
        assert!(o.status.success(), "{}", stderr(&o));
        let help = String::from_utf8(o.stdout).unwrap();
        assert!(help.contains("Examples:"), "{help}");
    }
    let help = String::from_utf8(thinline(&["proxy", "--help"]).stdout).unwrap();
    for option in [
        "--upstream",
        "--cache <PATH>",
        "--socket",
        "--listen",
        "--template-id",
        "--chunk-size",
        "--cache-mismatch",
        "--prefetch",
        "--prefetch-rate",
        "--status-socket",
        "--retries",
        "--json",
        "dmsetup create",
    ] {
        assert!(help.contains(option), "{option} missing from:\n{help}");
    }
}

#[test]
fn proxy_without_upstream_or_cache_is_a_usage_error() {
    let o = thinline(&["proxy", "--cache", "/tmp/x.cache"]);
    assert_fails_saying(&o, 2, "--upstream");
    let o = thinline(&["proxy", "--upstream", "nbd://127.0.0.1/x"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

#[test]
fn proxy_refuses_a_non_nbd_upstream_and_points_to_serve_cache_dir() {
    let o = thinline(&[
        "proxy",
        "--upstream",
        "https://example.invalid/t.qcow2",
        "--cache",
        "/nonexistent/c.cache",
    ]);
    assert_fails_saying(&o, 1, "--cache-dir");
}

#[test]
fn proxy_status_of_nothing_fails_naming_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("none.sock");
    let o = thinline(&["proxy", "status", missing.to_str().unwrap()]);
    assert_fails_saying(&o, 1, "none.sock");
}

/// A 1 MiB raw image of a byte pattern in `dir`, and its bytes.
fn pattern_image(dir: &std::path::Path) -> (std::path::PathBuf, Vec<u8>) {
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    let path = dir.join("disk.raw");
    std::fs::write(&path, &data).unwrap();
    (path, data)
}

/// Waits until systemd-socket-activate (`child`, its stderr piped) says it listens on
/// `sockets` sockets, then drains its stderr (and the service's, after the exec) in the
/// background.
fn wait_listening(child: &mut std::process::Child, sockets: usize) {
    use std::io::BufRead;
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = 0;
    while seen < sockets {
        let line = lines
            .next()
            .expect("systemd-socket-activate exited before listening")
            .unwrap();
        if line.starts_with("Listening on ") {
            seen += 1;
        }
    }
    std::thread::spawn(move || lines.for_each(drop));
}

/// Reads the first line `child` printed on stdout, as JSON.
fn first_json_line(child: &mut std::process::Child) -> serde_json::Value {
    use std::io::BufRead;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
}

#[test]
fn serve_started_by_socket_activation_serves_the_passed_socket_and_leaves_it_in_place() {
    if !common::require(&["systemd-socket-activate", "nbdcopy"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (image, data) = pattern_image(dir.path());
    let sock = dir.path().join("activated.sock");
    // No --socket or --listen: the socket is the one passed (fd 3, LISTEN_FDS=1).
    let mut child = common::spawn(
        Command::new("systemd-socket-activate")
            .arg("-l")
            .arg(&sock)
            .args(["--", common::thinline(), "serve", "--json"])
            .arg(&image),
        std::process::Stdio::piped(),
        std::process::Stdio::piped(),
    );
    wait_listening(&mut child, 1);
    let copied = dir.path().join("copy.raw");
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let out = common::run(Command::new("nbdcopy").arg(&uri).arg(&copied));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(std::fs::read(&copied).unwrap(), data);
    let report = first_json_line(&mut child);
    assert_eq!(
        report["listening"],
        serde_json::json!([sock.display().to_string()])
    );
    common::signal(&child, libc::SIGTERM);
    let status = common::wait_timeout(&mut child, std::time::Duration::from_secs(20))
        .expect("serve exits on SIGTERM");
    assert!(status.success(), "{status}");
    assert!(
        sock.exists(),
        "a passed socket belongs to the service manager: left in place"
    );
}

#[test]
fn proxy_tells_its_passed_sockets_apart_by_name_nbd_and_status() {
    if !common::require(&["systemd-socket-activate", "nbdinfo"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (image, _) = pattern_image(dir.path());
    let upstream = common::Served::unix(dir.path(), &[], &[image.to_str().unwrap()]);
    let nbd = dir.path().join("proxy.sock");
    let status = dir.path().join("proxy.status");
    let mut child = common::spawn(
        Command::new("systemd-socket-activate")
            .arg("-l")
            .arg(&nbd)
            .arg("-l")
            .arg(&status)
            .arg("--fdname=nbd:status")
            .args(["--", common::thinline(), "proxy", "--json", "--upstream"])
            .arg(upstream.uri(""))
            .arg("--cache")
            .arg(dir.path().join("t.cache")),
        std::process::Stdio::piped(),
        std::process::Stdio::piped(),
    );
    wait_listening(&mut child, 2);
    let out = common::run(
        Command::new("nbdinfo")
            .arg("--size")
            .arg(format!("nbd+unix:///?socket={}", nbd.display())),
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "1048576",
        "{out:?}"
    );
    let report = first_json_line(&mut child);
    assert_eq!(
        report["listening"],
        serde_json::json!([nbd.display().to_string()])
    );
    assert_eq!(report["status_socket"], status.display().to_string());
    let answer = thinline(&["proxy", "status", status.to_str().unwrap(), "--json"]);
    assert!(answer.status.success(), "{}", stderr(&answer));
    let answer: serde_json::Value = serde_json::from_slice(&answer.stdout).unwrap();
    assert_eq!(answer["exports"][""]["size"], 1 << 20, "{answer}");
    common::signal(&child, libc::SIGTERM);
    let exit = common::wait_timeout(&mut child, std::time::Duration::from_secs(20))
        .expect("proxy exits on SIGTERM");
    assert!(exit.success(), "{exit}");
    assert!(
        nbd.exists() && status.exists(),
        "passed sockets are left in place"
    );
}

#[test]
fn serve_says_ready_once_it_listens_and_stopping_on_sigterm_on_notify_socket() {
    let dir = tempfile::tempdir().unwrap();
    let (image, _) = pattern_image(dir.path());
    let notify = dir.path().join("notify");
    let receiver = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    receiver
        .set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let sock = dir.path().join("nbd.sock");
    let mut served = common::Served::start_env(
        &["--socket", sock.to_str().unwrap(), image.to_str().unwrap()],
        &[("NOTIFY_SOCKET", notify.to_str().unwrap())],
    );
    let mut buf = [0u8; 256];
    let n = receiver.recv(&mut buf).expect("READY=1 within 20 s");
    assert_eq!(&buf[..n], b"READY=1");
    assert!(
        served
            .terminate(std::time::Duration::from_secs(20))
            .success()
    );
    let n = receiver.recv(&mut buf).expect("STOPPING=1 on SIGTERM");
    assert_eq!(&buf[..n], b"STOPPING=1");
}

#[test]
fn log_format_json_writes_every_log_line_and_the_final_error_as_one_json_object() {
    if !common::require(&["nbdinfo"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (image, _) = pattern_image(dir.path());
    let mut served = common::Served::unix(
        dir.path(),
        &["--log-format", "json"],
        &[image.to_str().unwrap()],
    );
    let out = common::run(Command::new("nbdinfo").arg("--size").arg(served.uri("")));
    assert!(out.status.success(), "{out:?}");
    assert!(served.wait_for_log("client disconnected", std::time::Duration::from_secs(20)));
    assert!(
        served
            .terminate(std::time::Duration::from_secs(20))
            .success()
    );
    let log = served.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: not JSON: {l:?}")))
        .collect();
    assert!(
        lines
            .iter()
            .all(|l| l["level"].is_string() && l["fields"]["message"].is_string()),
        "{log}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l["fields"]["message"] == "client connected"),
        "{log}"
    );
    let missing = dir.path().join("missing.raw");
    let failed = thinline(&["--log-format", "json", "serve", missing.to_str().unwrap()]);
    assert_eq!(failed.status.code(), Some(1));
    let error: serde_json::Value = serde_json::from_str(stderr(&failed).trim()).unwrap();
    assert_eq!(error["level"], "ERROR");
    assert!(
        error["fields"]["error"]
            .as_str()
            .unwrap()
            .contains("missing.raw"),
        "{error}"
    );
}

#[test]
fn serve_metrics_count_what_fio_and_nbdcopy_read_while_they_run() {
    if !common::require(&["fio", "nbdcopy"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (image, _) = pattern_image(dir.path());
    let mut served = common::Served::unix(
        dir.path(),
        &["--metrics-listen", "127.0.0.1:0"],
        &[image.to_str().unwrap()],
    );
    let address = served.report["metrics"].as_str().unwrap().to_owned();
    let Some(before) = common::scrape(&address) else {
        return;
    };
    let read = |m: &std::collections::BTreeMap<String, f64>, key: &str| {
        m.get(key)
            .copied()
            .unwrap_or_else(|| panic!("{key} missing from {m:?}"))
    };
    let read_bytes = r#"thinline_export_read_bytes_total{export="disk.raw"}"#;
    let reads = r#"thinline_export_requests_total{command="read",export="disk.raw"}"#;
    assert_eq!(read(&before, read_bytes), 0.0);
    // fio's nbd engine reads for 3 s; the metrics are scraped while it runs.
    let mut fio = common::spawn(
        Command::new("fio")
            .args([
                "--name=m",
                "--ioengine=nbd",
                "--rw=randread",
                "--bs=4k",
                "--iodepth=4",
            ])
            .args(["--time_based", "--runtime=3", "--output-format=json"])
            .arg(format!("--uri={}", served.uri(""))),
        std::process::Stdio::piped(),
        std::process::Stdio::piped(),
    );
    // Scraped until the counters move, each scrape checked to end while fio still runs.
    let during = loop {
        let m = common::scrape(&address).unwrap();
        assert!(
            fio.try_wait().unwrap().is_none(),
            "fio ended before a scrape saw a read"
        );
        if read(&m, read_bytes) > 0.0 {
            break m;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let out = fio.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    // fio's nbd engine may print a line of its own before the JSON.
    let text = String::from_utf8_lossy(&out.stdout);
    let json = &text[text.find('{').expect("fio printed JSON")..];
    let report: serde_json::Value = serde_json::from_str(json).unwrap();
    let fio_bytes = report["jobs"][0]["read"]["io_bytes"].as_f64().unwrap();
    let fio_reads = report["jobs"][0]["read"]["total_ios"].as_f64().unwrap();
    let after_fio = common::scrape(&address).unwrap();
    assert!(read(&during, read_bytes) > 0.0 && read(&during, read_bytes) <= fio_bytes);
    assert_eq!(read(&after_fio, read_bytes), fio_bytes, "{after_fio:?}");
    assert_eq!(read(&after_fio, reads), fio_reads);
    let histogram =
        r#"thinline_export_request_duration_seconds_count{command="read",export="disk.raw"}"#;
    assert_eq!(read(&after_fio, histogram), fio_reads);
    // nbdcopy then reads the whole image once more.
    let copy = common::run(
        Command::new("nbdcopy")
            .arg(served.uri(""))
            .arg(dir.path().join("c.raw")),
    );
    assert!(copy.status.success(), "{copy:?}");
    let after = common::scrape(&address).unwrap();
    assert_eq!(read(&after, read_bytes), fio_bytes + f64::from(1u32 << 20));
    assert_eq!(
        read(
            &after,
            r#"thinline_export_errors_total{command="read",export="disk.raw"}"#
        ),
        0.0
    );
    // A connection is counted until the server has closed it, a moment after the
    // client left.
    let connections = r#"thinline_export_connections{export="disk.raw"}"#;
    let start = std::time::Instant::now();
    while read(&common::scrape(&address).unwrap(), connections) != 0.0 {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "connections stay open"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(
        read(
            &after,
            r#"thinline_export_connections_opened_total{export="disk.raw"}"#
        ) >= 2.0
    );
    assert!(read(&after, "process_resident_memory_bytes{}") > 0.0);
    assert!(
        served
            .terminate(std::time::Duration::from_secs(20))
            .success()
    );
}

#[test]
fn proxy_metrics_say_what_the_cache_fetched_and_served() {
    if !common::require(&["nbdcopy"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (image, _) = pattern_image(dir.path());
    let upstream = common::Served::unix(dir.path(), &[], &[image.to_str().unwrap()]);
    let cache = dir.path().join("t.cache");
    let sock = dir.path().join("proxy.sock");
    let upstream_uri = upstream.uri("");
    let mut proxy = common::Served::spawn(
        "proxy",
        &[
            "--upstream",
            &upstream_uri,
            "--cache",
            cache.to_str().unwrap(),
            "--socket",
            sock.to_str().unwrap(),
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        &[],
    );
    let address = proxy.report["metrics"].as_str().unwrap().to_owned();
    let Some(_) = common::scrape(&address) else {
        return;
    };
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let copy = |name: &str| {
        let out = common::run(Command::new("nbdcopy").arg(&uri).arg(dir.path().join(name)));
        assert!(out.status.success(), "{out:?}");
    };
    let value = |m: &std::collections::BTreeMap<String, f64>, key: &str| {
        m.get(key)
            .copied()
            .unwrap_or_else(|| panic!("{key} missing from {m:?}"))
    };
    let present = r#"thinline_cache_chunks_present{export=""}"#;
    let reads = r#"thinline_export_requests_total{command="read",export=""}"#;
    // The replay: the whole template read twice, the second time once the cache holds it
    // (chunks are marked present after their data is durable, a moment after the read).
    copy("a.raw");
    let start = std::time::Instant::now();
    let first = loop {
        let m = common::scrape(&address).unwrap();
        if value(&m, present) == value(&m, r#"thinline_cache_chunks{export=""}"#) {
            break m;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "{m:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(
        value(&first, r#"thinline_cache_hits_total{export=""}"#),
        0.0
    );
    copy("b.raw");
    let m = common::scrape(&address).unwrap();
    let get = |key: &str| value(&m, key);
    assert_eq!(
        get(r#"thinline_cache_hits_total{export=""}"#),
        get(reads) - value(&first, reads),
        "every read of the second pass is a hit"
    );
    let exported = get(r#"thinline_export_read_bytes_total{export=""}"#);
    assert_eq!(exported, f64::from(2u32 << 20));
    assert_eq!(
        get(r#"thinline_cache_served_bytes_total{export=""}"#),
        exported,
        "bytes read equal bytes served"
    );
    assert_eq!(
        get(r#"thinline_cache_upstream_bytes_total{export=""}"#),
        f64::from(1u32 << 20),
        "each byte fetched once"
    );
    assert_eq!(
        get(r#"thinline_cache_chunks_present{export=""}"#),
        get(r#"thinline_cache_chunks{export=""}"#)
    );
    assert_eq!(get(r#"thinline_cache_hydration_ratio{export=""}"#), 1.0);
    assert!(get(r#"thinline_cache_misses_total{export=""}"#) > 0.0);
    assert_eq!(
        get(r#"thinline_cache_upstream_errors_total{export=""}"#),
        0.0
    );
    assert!(
        proxy
            .terminate(std::time::Duration::from_secs(20))
            .success()
    );
}

#[test]
fn completions_are_generated_for_each_shell_with_every_subcommand() {
    for (shell, marker) in [
        ("bash", "_thinline()"),
        ("zsh", "#compdef thinline"),
        ("fish", "complete -c thinline"),
    ] {
        let o = thinline(&["completions", shell]);
        assert!(o.status.success(), "{}", stderr(&o));
        let script = String::from_utf8(o.stdout).unwrap();
        assert!(script.contains(marker), "{shell}: {marker} missing");
        for sub in ["serve", "proxy", "vdi", "sr", "image"] {
            assert!(script.contains(sub), "{shell}: {sub} missing");
        }
    }
    assert_eq!(thinline(&["completions", "tcsh"]).status.code(), Some(2));
}

#[test]
fn the_metrics_endpoint_serves_eight_clients_at_once_and_drops_one_silent_past_ten_seconds() {
    use std::io::{Read, Write};
    if !common::require(&["nbdinfo"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (image, _) = pattern_image(dir.path());
    let served = common::Served::unix(
        dir.path(),
        &["--metrics-listen", "127.0.0.1:0"],
        &[image.to_str().unwrap()],
    );
    let address = served.report["metrics"].as_str().unwrap().to_owned();
    // Eight clients that never send a request take every slot.
    let mut silent: Vec<std::net::TcpStream> = (0..8)
        .map(|_| std::net::TcpStream::connect(&address).unwrap())
        .collect();
    let opened = std::time::Instant::now();
    // A ninth is answered, but only once a silent one is dropped at the header timeout.
    let mut ninth = std::net::TcpStream::connect(&address).unwrap();
    ninth
        .set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    ninth
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    // Meanwhile the NBD side is unaffected.
    let sock = served.socket.as_ref().unwrap();
    let info = Command::new("nbdinfo")
        .arg("--size")
        .arg(format!("nbd+unix:///?socket={}", sock.display()))
        .output()
        .unwrap();
    assert!(info.status.success(), "{info:?}");
    let mut answer = String::new();
    ninth.read_to_string(&mut answer).unwrap();
    let waited = opened.elapsed();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.contains("thinline_export_requests_total"),
        "{answer}"
    );
    assert!(
        waited >= std::time::Duration::from_secs(9),
        "the ninth client waited for a slot: answered after {waited:?}"
    );
    // Every silent client was dropped (end of stream, or a 408 then the end).
    for s in &mut silent {
        s.set_read_timeout(Some(std::time::Duration::from_secs(60)))
            .unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        assert!(
            rest.is_empty() || rest.starts_with(b"HTTP/1.1 408"),
            "{:?}",
            String::from_utf8_lossy(&rest)
        );
    }
}
