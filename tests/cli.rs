//! Command-line contract of `thinline serve` and `thinline image`: help, usage errors (exit 2),
//! start-up failures that name the file and the reason (exit 1), `image check` statuses.

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
