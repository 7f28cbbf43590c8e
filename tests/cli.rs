//! Command-line contract of `thinline serve`: help, usage errors (exit 2), start-up
//! failures that name the file and the reason (exit 1).

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
        "Examples:",
    ] {
        assert!(help.contains(option), "{option} missing from:\n{help}");
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
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("not a regular file or a block device"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn duplicate_export_names_are_refused() {
    let fx = common::Fixture::new(1 << 20);
    let sock = fx.path("s.sock");
    let a = format!("same={}", fx.image.display());
    let o = thinline(&["serve", "--socket", sock.to_str().unwrap(), &a, &a]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("\"same\" is used twice"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn min_block_size_must_be_a_power_of_two() {
    let o = thinline(&["serve", "--min-block-size", "3000", "x.img"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("power of two"), "{}", stderr(&o));
}
