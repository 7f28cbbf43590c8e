//! `thinline sr` and `thinline vdi` on directory SRs, through the command line as an
//! orchestrator drives them: the JSON contract and the exit status of every error code,
//! templates kept read-only, clones and snapshots whose bytes qemu reads back, kill -9
//! at every step of every multi-step operation, and eight agents at once on one SR.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Seek, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use thinline_test_support::servers::Nginx;
use thinline_test_support::{require, run};

/// One test's SR registry and scratch directory.
struct Agent {
    dir: tempfile::TempDir,
}

/// What a command printed and how it ended.
#[derive(Debug)]
struct Ran {
    /// The exit status; `None` when a signal ended it.
    code: Option<i32>,
    json: Value,
    stderr: String,
}

impl Agent {
    fn new() -> Agent {
        Agent {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(common::thinline());
        c.args(args)
            .env("THINLINE_SR_REGISTRY", self.path("registry.json"))
            .env_remove("THINLINE_SR_CRASH_AT");
        c
    }

    /// Runs `thinline ARGS --json`.
    fn run_env(&self, args: &[&str], env: &[(&str, &str)]) -> Ran {
        let mut c = self.command(args);
        c.arg("--json").envs(env.iter().copied());
        let out = c.output().expect("run thinline");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let json = if stdout.trim().is_empty() {
            Value::Null
        } else {
            assert_eq!(
                stdout.trim().lines().count(),
                1,
                "{args:?}: --json prints one line: {stdout}"
            );
            serde_json::from_str(stdout.trim())
                .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {stdout}"))
        };
        Ran {
            code: out.status.code(),
            json,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    fn run(&self, args: &[&str]) -> Ran {
        self.run_env(args, &[])
    }

    /// Runs a command that must succeed; returns its JSON.
    fn ok(&self, args: &[&str]) -> Value {
        let r = self.run(args);
        assert_eq!(r.code, Some(0), "{args:?} failed: {r:?}");
        r.json
    }

    /// Runs a command that must fail with `code` and exit status `status`.
    fn fails(&self, args: &[&str], code: &str, status: i32) -> String {
        let r = self.run(args);
        assert_eq!(r.code, Some(status), "{args:?}: {r:?}");
        assert_eq!(r.json["error"]["code"], code, "{args:?}: {r:?}");
        assert!(
            !r.stderr.contains("error"),
            "{args:?}: with --json the error is printed once, on stdout: {r:?}"
        );
        let message = r.json["error"]["message"].as_str().unwrap_or("").to_owned();
        assert!(!message.is_empty(), "{args:?}: an error message");
        message
    }

    fn new_sr(&self, name: &str) -> (String, PathBuf) {
        let path = self.path(name);
        let v = self.ok(&["sr", "create", "--type", "file", path.to_str().unwrap()]);
        (v["uuid"].as_str().unwrap().to_owned(), path)
    }

    /// A new directory for nginx to serve.
    fn www(&self) -> PathBuf {
        let root = self.path("www");
        std::fs::create_dir(&root).unwrap();
        root
    }

    /// An SR named `sr` with [`qcow2_template`] introduced: (SR, its path, template).
    fn sr_with_template(&self) -> (String, PathBuf, String) {
        let (sr, path) = self.new_sr("sr");
        let template = qcow2_template(self.dir.path());
        let t = uuid(&self.ok(&["vdi", "introduce", "--sr", &sr, s(&template)]));
        (sr, path, t)
    }

    /// Attaches `vdi` of `sr`; returns its NBD URI.
    fn attach_uri(&self, sr: &str, vdi: &str) -> String {
        self.ok(&["vdi", "attach", "--sr", sr, vdi])["nbd_uri"]
            .as_str()
            .expect("an NBD URI")
            .to_owned()
    }

    /// The remote-template tests' start: an SR (its name, its path) and nginx serving
    /// the directory `www` (returned too, empty); `None` when a tool is missing
    /// outside CI.
    fn with_nginx(&self) -> Option<(String, PathBuf, PathBuf, Nginx)> {
        if !require(&["qemu-img", "qemu-io"]) || !thinline_test_support::servers::require_nginx() {
            return None;
        }
        let (sr, path) = self.new_sr("sr");
        let root = self.www();
        let nginx = Nginx::start(&root);
        Some((sr, path, root, nginx))
    }

    fn vdis(&self, sr: &Path) -> Vec<Value> {
        self.ok(&["vdi", "list", "--sr", sr.to_str().unwrap()])["vdis"]
            .as_array()
            .unwrap()
            .clone()
    }
}

impl Drop for Agent {
    /// Stops any SR daemon a test started (a failing test must not leave one running).
    fn drop(&mut self) {
        use std::io::Write;
        let Ok(entries) = std::fs::read_dir(self.dir.path()) else {
            return;
        };
        for e in entries.flatten() {
            let control = e.path().join(".thinline-sr/run/control.sock");
            if let Ok(mut stream) = std::os::unix::net::UnixStream::connect(control) {
                let _ = stream.write_all(b"\"shutdown\"\n");
            }
        }
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn uuid(v: &Value) -> String {
    v["uuid"].as_str().unwrap().to_owned()
}

/// A qcow2 template of 16 MiB: 0x42 in its first MiB, the rest unallocated.
fn qcow2_template(dir: &Path) -> PathBuf {
    let path = dir.join("template.qcow2");
    thinline_test_support::qemu::qemu_img(dir, &["create", "-q", "-f", "qcow2", s(&path), "16M"]);
    thinline_test_support::qemu::qemu_io(dir, "qcow2", s(&path), &["write -q -P 0x42 0 1M"]);
    path
}

/// Runs one qemu-io command on `target` (a file of `format`, or an NBD URI with raw);
/// reads open it read-only.
fn qemu_io_once(format: &str, target: &std::ffi::OsStr, command: &str) -> std::process::Output {
    let mut c = Command::new("qemu-io");
    if command.starts_with("read") {
        c.arg("-r");
    }
    c.args(["-f", format, "-c", command])
        .arg(target)
        .output()
        .unwrap()
}

/// Whether qemu-io reads `pattern` in `[offset, offset + len)` of `target`.
fn reads(format: &str, target: &std::ffi::OsStr, offset: u64, len: u64, pattern: u8) -> bool {
    let out = qemu_io_once(
        format,
        target,
        &format!("read -P {pattern:#x} {offset} {len}"),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    out.status.success() && !text.contains("Pattern verification failed") && text.contains("read ")
}

/// Whether qemu reads `pattern` in `[offset, offset + len)` of the qcow2 `file`.
fn qemu_reads(file: &Path, offset: u64, len: u64, pattern: u8) -> bool {
    reads("qcow2", file.as_os_str(), offset, len, pattern)
}

fn qemu_write(file: &Path, offset: u64, len: u64, pattern: u8) {
    let command = format!("write -P {pattern:#x} {offset} {len}");
    let out = qemu_io_once("qcow2", file.as_os_str(), &command);
    assert!(
        out.status.success(),
        "qemu-io write into {}: {out:?}",
        file.display()
    );
}

/// `qemu-img check` of every qcow2 file in `dir` must be clean.
fn qemu_check_all(dir: &Path) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "qcow2") {
            run(Command::new("qemu-img")
                .args(["check", "-q", "-f", "qcow2", "-U"])
                .arg(&path));
        }
    }
}

fn sha(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

#[test]
fn sr_commands_print_one_json_object_and_every_error_has_its_code_and_exit_status() {
    let a = Agent::new();
    let (uuid_, path) = a.new_sr("sr1");
    let v = a.ok(&["sr", "stat", "--sr", &uuid_]);
    for key in [
        "uuid",
        "name_label",
        "type",
        "path",
        "total_space",
        "free_space",
        "physical_utilisation",
        "vdi_count",
        "health",
    ] {
        assert!(v.get(key).is_some(), "sr stat lacks {key}: {v}");
    }
    assert_eq!(v["type"], "file");
    assert_eq!(v["name_label"], "sr1");
    assert_eq!(v["health"], "healthy");
    assert_eq!(v["vdi_count"], 0);
    assert!(v["free_space"].as_u64().unwrap() > 0);
    // By path too.
    assert_eq!(
        a.ok(&["sr", "stat", "--sr", s(&path)])["uuid"],
        uuid_.as_str()
    );
    let listed = a.ok(&["sr", "list"]);
    assert!(
        listed["srs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["uuid"] == uuid_.as_str()),
        "{listed}"
    );
    // Probe: an SR, and a directory without one.
    assert_eq!(
        a.ok(&["sr", "probe", s(&path)])["sr"]["uuid"],
        uuid_.as_str()
    );
    std::fs::create_dir(a.path("plain")).unwrap();
    assert!(a.ok(&["sr", "probe", s(&a.path("plain"))])["sr"].is_null());

    // Errors, with --json and without.
    a.fails(
        &["sr", "create", "--type", "file", s(&path)],
        "SR_EXISTS",
        17,
    );
    a.fails(
        &["sr", "stat", "--sr", s(&a.path("plain"))],
        "SR_NOT_FOUND",
        10,
    );
    a.fails(
        &["sr", "stat", "--sr", "6a1f0000-0000-4000-8000-000000000000"],
        "SR_NOT_FOUND",
        10,
    );
    let out = a
        .command(&["sr", "stat", "--sr", s(&a.path("missing"))])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(10));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("SR_NOT_FOUND") && err.contains("missing"),
        "{err}"
    );
    a.fails(
        &["vdi", "create", "--sr", s(&path), "0"],
        "INVALID_ARGUMENT",
        2,
    );
    let usage = a
        .command(&["vdi", "create", "--sr", s(&path), "ten"])
        .output()
        .unwrap();
    assert_eq!(usage.status.code(), Some(2), "a bad size is a usage error");
    assert!(
        usage.stdout.is_empty(),
        "without --json, clap's usage on stderr"
    );
    // With --json, usage errors too are one JSON object.
    let msg = a.fails(
        &["vdi", "create", "--sr", s(&path), "ten"],
        "INVALID_ARGUMENT",
        2,
    );
    assert!(msg.contains("ten"), "{msg}");
    a.fails(&["vdi", "resize", "--sr", s(&path)], "INVALID_ARGUMENT", 2);

    // Forget and introduce again: same UUID, VDIs kept, files untouched.
    let disk = uuid(&a.ok(&["vdi", "create", "--sr", s(&path), "1M", "--name-label", "d"]));
    a.ok(&["sr", "forget", "--sr", &uuid_]);
    assert!(a.ok(&["sr", "list"])["srs"].as_array().unwrap().is_empty());
    a.fails(&["sr", "stat", "--sr", &uuid_], "SR_NOT_FOUND", 10);
    assert!(path.join("d.qcow2").is_file());
    let again = a.ok(&["sr", "introduce", s(&path)]);
    assert_eq!(again["uuid"], uuid_.as_str());
    assert_eq!(
        a.ok(&["vdi", "stat", "--sr", &uuid_, &disk])["file"],
        "d.qcow2"
    );

    // Destroy: refused while a disk exists, then with --force; the directory goes.
    a.fails(&["sr", "destroy", "--sr", &uuid_], "SR_NOT_EMPTY", 14);
    a.ok(&["sr", "destroy", "--sr", &uuid_, "--force"]);
    assert!(
        !path.exists(),
        "sr create made the directory; destroy removes it"
    );
    a.fails(&["sr", "stat", "--sr", &uuid_], "SR_NOT_FOUND", 10);
}

#[test]
fn an_introduced_directory_keeps_the_files_the_agent_does_not_own() {
    let a = Agent::new();
    let dir = a.path("images");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("web.qcow2"), b"not ours").unwrap();
    std::fs::write(dir.join("notes.txt"), b"mine").unwrap();
    let sr = uuid(&a.ok(&["sr", "introduce", s(&dir), "--name-label", "images"]));
    // A label whose name is taken by a foreign file gets a suffix.
    let v = a.ok(&["vdi", "create", "--sr", &sr, "1M", "--name-label", "web"]);
    assert_eq!(v["file"], "web-1.qcow2");
    let odd = a.ok(&[
        "vdi",
        "create",
        "--sr",
        &sr,
        "1M",
        "--name-label",
        "../x y/.z",
    ]);
    assert_eq!(
        odd["file"], "_x_y_.z.qcow2",
        "labels never leave the directory"
    );
    assert!(dir.join("_x_y_.z.qcow2").is_file());
    a.ok(&["sr", "destroy", "--sr", &sr, "--force"]);
    assert_eq!(std::fs::read(dir.join("web.qcow2")).unwrap(), b"not ours");
    assert_eq!(std::fs::read(dir.join("notes.txt")).unwrap(), b"mine");
    assert!(!dir.join("web-1.qcow2").exists());
    assert!(!dir.join(".thinline-sr").exists());
}

#[test]
fn templates_stay_read_only_and_clones_read_the_template_plus_their_own_writes() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    let a = Agent::new();
    let (sr, path) = a.new_sr("sr");
    let template = qcow2_template(a.dir.path());
    let before = sha(&template);
    let t = a.ok(&[
        "vdi",
        "introduce",
        "--sr",
        &sr,
        s(&template),
        "--name-label",
        "base",
    ]);
    assert_eq!(t["type"], "template");
    assert_eq!(t["is_template"], true);
    assert_eq!(t["read_only"], true);
    assert_eq!(t["format"], "qcow2");
    assert_eq!(t["virtual_size"], 16 << 20);
    assert_eq!(t["uri"], s(&template));
    assert!(t["parent"].is_null() && t["file"].is_null());
    let t = uuid(&t);
    for key in [
        "uuid",
        "name_label",
        "type",
        "sr",
        "virtual_size",
        "physical_utilisation",
    ] {
        assert!(
            a.ok(&["vdi", "stat", "--sr", &sr, &t]).get(key).is_some(),
            "{key}"
        );
    }

    // Two clones, each with its own writes.
    let c1 = a.ok(&["vdi", "clone", "--sr", &sr, &t, "--name-label", "web1"]);
    let c2 = a.ok(&["vdi", "clone", "--sr", &sr, &t, "--name-label", "web2"]);
    assert_eq!(c1["type"], "disk");
    assert_eq!(c1["parent"], t.as_str());
    assert_eq!(c1["read_only"], false);
    let (f1, f2) = (path.join("web1.qcow2"), path.join("web2.qcow2"));
    qemu_write(&f1, 2 << 20, 1 << 20, 0x11);
    qemu_write(&f2, 2 << 20, 1 << 20, 0x22);
    assert!(qemu_reads(&f1, 0, 1 << 20, 0x42) && qemu_reads(&f1, 2 << 20, 1 << 20, 0x11));
    assert!(qemu_reads(&f2, 0, 1 << 20, 0x42) && qemu_reads(&f2, 2 << 20, 1 << 20, 0x22));
    assert_eq!(sha(&template), before, "the template never changes");

    // A template only clones, snapshots and is forgotten.
    a.fails(
        &["vdi", "resize", "--sr", &sr, &t, "32M"],
        "VDI_IS_TEMPLATE",
        12,
    );
    a.fails(&["vdi", "destroy", "--sr", &sr, &t], "VDI_IS_TEMPLATE", 12);
    a.fails(
        &["vdi", "set-name-label", "--sr", &sr, &t, "x"],
        "VDI_IS_TEMPLATE",
        12,
    );
    let t2 = a.ok(&["vdi", "snapshot", "--sr", &sr, &t]);
    assert_eq!(t2["type"], "template");
    assert_eq!(t2["uri"], s(&template));

    // A clone of a writable disk: both stay writable and keep their bytes.
    let d1 = uuid(&c1);
    let c3 = a.ok(&["vdi", "clone", "--sr", &sr, &d1, "--name-label", "web3"]);
    assert_eq!(
        (c3["type"].as_str(), c3["parent"].as_str()),
        (Some("disk"), Some(d1.as_str()))
    );
    let f3 = path.join("web3.qcow2");
    assert!(qemu_reads(&f3, 2 << 20, 1 << 20, 0x11) && qemu_reads(&f3, 0, 1 << 20, 0x42));
    qemu_write(&f1, 4 << 20, 1 << 20, 0x13);
    qemu_write(&f3, 4 << 20, 1 << 20, 0x33);
    assert!(qemu_reads(&f1, 4 << 20, 1 << 20, 0x13) && qemu_reads(&f1, 2 << 20, 1 << 20, 0x11));
    assert!(qemu_reads(&f3, 4 << 20, 1 << 20, 0x33));

    // A snapshot keeps the disk as it was; the disk goes on.
    let snap = a.ok(&[
        "vdi",
        "snapshot",
        "--sr",
        &sr,
        &d1,
        "--name-label",
        "before",
    ]);
    assert_eq!(snap["type"], "snapshot");
    assert_eq!(snap["read_only"], true);
    assert_eq!(snap["parent"], d1.as_str());
    let fs = path.join(snap["file"].as_str().unwrap());
    qemu_write(&f1, 4 << 20, 1 << 20, 0x14);
    assert!(
        qemu_reads(&fs, 4 << 20, 1 << 20, 0x13),
        "the snapshot is the past"
    );
    assert!(qemu_reads(&f1, 4 << 20, 1 << 20, 0x14), "the disk goes on");
    let snap = uuid(&snap);
    a.fails(
        &["vdi", "resize", "--sr", &sr, &snap, "32M"],
        "VDI_READ_ONLY",
        18,
    );
    a.fails(
        &["vdi", "forget", "--sr", &sr, &snap],
        "INVALID_ARGUMENT",
        2,
    );

    // Resize grows only; set-name-label keeps the file.
    let grown = a.ok(&["vdi", "resize", "--sr", &sr, &d1, "32M"]);
    assert_eq!(grown["virtual_size"], 32 << 20);
    assert!(
        qemu_reads(&f1, 20 << 20, 1 << 20, 0),
        "the new tail reads as zeroes"
    );
    a.fails(
        &["vdi", "resize", "--sr", &sr, &d1, "8M"],
        "INVALID_ARGUMENT",
        2,
    );
    let renamed = a.ok(&["vdi", "set-name-label", "--sr", &sr, &d1, "web1-old"]);
    assert_eq!(renamed["name_label"], "web1-old");
    assert_eq!(renamed["file"], "web1.qcow2");
    a.fails(
        &[
            "vdi",
            "stat",
            "--sr",
            &sr,
            "6a1f0000-0000-4000-8000-000000000000",
        ],
        "VDI_NOT_FOUND",
        11,
    );

    // Layers are not VDIs; every file qemu checks clean; sr check is clean.
    let listed = a.vdis(&path);
    assert!(listed.iter().all(|v| v["type"] != "layer"), "{listed:?}");
    assert_eq!(
        listed.len(),
        6,
        "2 templates, 3 disks, 1 snapshot: {listed:?}"
    );
    qemu_check_all(&path);
    assert_eq!(a.ok(&["sr", "check", "--sr", &sr])["clean"], true);

    // Forgetting the template: refused while clones read from it, then forced.
    a.fails(&["vdi", "forget", "--sr", &sr, &t], "VDI_IN_USE", 13);
    let forgot = a.ok(&["vdi", "forget", "--sr", &sr, &t, "--force"]);
    let orphaned: BTreeSet<&str> = forgot["orphaned"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(orphaned.contains(uuid(&c2).as_str()), "{forgot}");
    let check = a.run(&["sr", "check", "--sr", &sr]);
    assert_eq!(check.code, Some(3), "{check:?}");
    assert!(
        check.json["findings"]
            .to_string()
            .contains("missing_backing"),
        "{check:?}"
    );
    assert_eq!(sha(&template), before);
    // The forgotten template (and its other record, the snapshot of it) is not followed
    // through the path in the clone's header: the clone cannot be opened until the
    // template is introduced again.
    a.ok(&["vdi", "forget", "--sr", &sr, &uuid(&t2)]);
    let c2 = uuid(&c2);
    let refused = a.run(&["vdi", "resize", "--sr", &sr, &c2, "32M"]);
    assert_ne!(refused.code, Some(0), "{refused:?}");
    assert!(
        refused
            .json
            .to_string()
            .contains("not a template of this SR"),
        "{refused:?}"
    );
    a.ok(&["vdi", "introduce", "--sr", &sr, s(&template)]);
    a.ok(&["vdi", "resize", "--sr", &sr, &c2, "32M"]);
    assert!(
        qemu_reads(&f2, 0, 1 << 20, 0x42),
        "the template's bytes again"
    );
}

#[test]
fn template_credentials_stay_out_of_the_metadata_and_the_images() {
    let a = Agent::new();
    let Some((sr, path, root, nginx)) = a.with_nginx() else {
        return;
    };
    let template = qcow2_template(&root);
    let url = nginx
        .url("template.qcow2")
        .replace("http://", "http://user:s3cret@");
    let t = a.ok(&["vdi", "introduce", "--sr", &sr, &url]);
    assert_eq!(t["format"], "qcow2");
    assert_eq!(t["virtual_size"], 16 << 20);
    assert_eq!(t["name_label"], "template.qcow2");
    let shown = t["uri"].as_str().unwrap().to_owned();
    assert!(!shown.contains("s3cret"), "{shown}");
    let clone = a.ok(&["vdi", "clone", "--sr", &sr, &uuid(&t), "--name-label", "c"]);
    let metadata = std::fs::read_to_string(path.join(".thinline-sr/sr.json")).unwrap();
    assert!(!metadata.contains("s3cret"), "{metadata}");
    let overlay = std::fs::read(path.join(clone["file"].as_str().unwrap())).unwrap();
    assert!(
        !overlay.windows(6).any(|w| w == b"s3cret"),
        "the header holds no secret"
    );
    let creds = path.join(".thinline-sr/credentials.json");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&creds).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "credentials are for the owner only");
    assert!(std::fs::read_to_string(&creds).unwrap().contains("s3cret"));
    // Killed before its record is written: the credentials it kept are found and
    // removed, the others stay.
    let kept = std::fs::read_to_string(&creds).unwrap();
    crash(
        &a,
        &["vdi", "introduce", "--sr", &sr, &url],
        "write:sr.json",
    );
    assert_ne!(std::fs::read_to_string(&creds).unwrap(), kept);
    let found = ["orphan_credentials", "temporary_file"];
    repaired(&a, &sr, &found, &[], "introduce killed");
    assert_eq!(std::fs::read_to_string(&creds).unwrap(), kept);
    // Resizing the clone opens its chain: the template through the recorded URI.
    a.ok(&["vdi", "resize", "--sr", &sr, &uuid(&clone), "20M"]);
    drop(template);
    // An unreachable template: its URI names the reason.
    let msg = a.fails(
        &["vdi", "introduce", "--sr", &sr, &nginx.url("missing.qcow2")],
        "TEMPLATE_UNREACHABLE",
        16,
    );
    assert!(msg.contains("missing.qcow2"), "{msg}");
}

/// The SR as a set: every VDI (uuid, type, label) and every file in its directory.
fn state(a: &Agent, path: &Path) -> (BTreeSet<(String, String, String)>, BTreeSet<String>) {
    let vdis = a
        .vdis(path)
        .iter()
        .map(|v| {
            (
                uuid(v),
                v["type"].as_str().unwrap().to_owned(),
                v["name_label"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let files = std::fs::read_dir(path)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n != ".thinline-sr")
        .collect();
    (vdis, files)
}

#[test]
fn kill_9_at_every_step_of_every_operation_leaves_the_old_or_the_new_state() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    let steps = ["intent", "moved", "made", "committed", "finished"];
    let ops = [
        "create",
        "clone-template",
        "clone-disk",
        "snapshot-disk",
        "destroy-disk",
        "destroy-snapshot",
    ];
    for op in ops {
        for step in steps {
            let a = Agent::new();
            let (sr, path, t) = a.sr_with_template();
            let d = uuid(&a.ok(&["vdi", "clone", "--sr", &sr, &t, "--name-label", "disk"]));
            qemu_write(&path.join("disk.qcow2"), 2 << 20, 1 << 20, 0x5d);
            let snap = if op == "destroy-snapshot" {
                // The snapshot holds the 0x5d; destroying it merges it into the disk.
                let snap = uuid(&a.ok(&["vdi", "snapshot", "--sr", &sr, &d]));
                qemu_write(&path.join("disk.qcow2"), 6 << 20, 1 << 20, 0x6d);
                snap
            } else {
                String::new()
            };
            let before = state(&a, &path);
            let args: Vec<&str> = match op {
                "create" => vec!["vdi", "create", "--sr", &sr, "4M", "--name-label", "new"],
                "clone-template" => vec!["vdi", "clone", "--sr", &sr, &t, "--name-label", "new"],
                "clone-disk" => vec!["vdi", "clone", "--sr", &sr, &d, "--name-label", "new"],
                "snapshot-disk" => vec!["vdi", "snapshot", "--sr", &sr, &d, "--name-label", "new"],
                "destroy-snapshot" => vec!["vdi", "destroy", "--sr", &sr, &snap],
                _ => vec!["vdi", "destroy", "--sr", &sr, &d],
            };
            let crashed = a.run_env(&args, &[("THINLINE_SR_CRASH_AT", step)]);
            let what = format!("{op} killed at {step}");
            assert_eq!(crashed.code, None, "{what}: a signal ends it: {crashed:?}");
            // Found by a check, and repaired.
            let check = a.run(&["sr", "check", "--sr", &sr]);
            assert_eq!(check.code, Some(3), "{what}: {check:?}");
            assert!(
                check.json["findings"]
                    .to_string()
                    .contains("interrupted_operation"),
                "{what}: {check:?}"
            );
            let repaired = a.ok(&["sr", "check", "--sr", &sr, "--repair"]);
            assert_eq!(repaired["clean"], true, "{what}: {repaired}");
            assert!(
                std::fs::read_dir(path.join(".thinline-sr/new"))
                    .unwrap()
                    .next()
                    .is_none(),
                "{what}: nothing left in new/"
            );
            // The old state or the new one, depending on whether it committed.
            let after = state(&a, &path);
            let committed = matches!(step, "committed" | "finished");
            if committed {
                assert_ne!(after.0, before.0, "{what}: the new records");
            } else {
                assert_eq!(after, before, "{what}: the old state");
            }
            let disk_file = path.join("disk.qcow2");
            if op == "destroy-disk" && committed {
                assert!(!disk_file.exists(), "{what}");
            } else {
                assert!(
                    qemu_reads(&disk_file, 2 << 20, 1 << 20, 0x5d),
                    "{what}: the disk's data"
                );
                assert!(
                    qemu_reads(&disk_file, 0, 1 << 20, 0x42),
                    "{what}: the template's"
                );
                if op == "destroy-snapshot" {
                    assert!(
                        qemu_reads(&disk_file, 6 << 20, 1 << 20, 0x6d),
                        "{what}: its own"
                    );
                }
            }
            // Every record's file exists, every file belongs to a record, qemu agrees.
            let vdis = a.vdis(&path);
            for v in &vdis {
                if let Some(f) = v["file"].as_str() {
                    assert!(path.join(f).is_file(), "{what}: {f} of {v}");
                }
            }
            qemu_check_all(&path);
            // And the SR works on.
            a.ok(&["vdi", "create", "--sr", &sr, "1M", "--name-label", "later"]);
            assert_eq!(a.ok(&["sr", "check", "--sr", &sr])["clean"], true, "{what}");
        }
    }
}

/// Runs `args` with `THINLINE_SR_CRASH_AT=step` (inherited by a daemon it starts);
/// something must die there: the command itself (a signal), or the daemon it asked
/// (an error saying so).
fn crash(a: &Agent, args: &[&str], step: &str) -> Ran {
    let r = a.run_env(args, &[("THINLINE_SR_CRASH_AT", step)]);
    assert_ne!(r.code, Some(0), "{args:?} killed at {step}: {r:?}");
    r
}

/// `sr check` finds what a crash left (`found`, in any order) and `--repair` removes
/// all of it but `left`.
fn repaired(a: &Agent, sr: &str, found: &[&str], left: &[&str], what: &str) {
    let kinds = |r: &Value| -> BTreeSet<String> {
        r["findings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["kind"].as_str().unwrap().to_owned())
            .collect()
    };
    let set = |k: &[&str]| -> BTreeSet<String> { k.iter().map(|s| (*s).to_owned()).collect() };
    let check = a.run(&["sr", "check", "--sr", sr]);
    assert_eq!(check.code, Some(3), "{what}: {check:?}");
    assert_eq!(kinds(&check.json), set(found), "{what}: {check:?}");
    let r = a.run(&["sr", "check", "--sr", sr, "--repair"]);
    assert_eq!(kinds(&r.json), set(left), "{what}: {r:?}");
    assert_eq!(
        r.code,
        Some(if left.is_empty() { 0 } else { 3 }),
        "{what}: {r:?}"
    );
}

/// The NBD socket the SR daemon serves VDI `vdi` on.
fn daemon_socket(sr: &Path, vdi: &str) -> PathBuf {
    let hex: String = vdi.chars().filter(|c| *c != '-').take(12).collect();
    sr.join(".thinline-sr/run").join(format!("{hex}.sock"))
}

fn cache_files(path: &Path) -> Vec<String> {
    std::fs::read_dir(path.join(".thinline-sr/caches"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().into_string().unwrap())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn kill_9_during_single_step_commands_sr_changes_and_the_daemons_work_leaves_the_old_or_the_new_state()
 {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    let a = Agent::new();
    let (sr, path, t) = a.sr_with_template();
    let d = uuid(&a.ok(&["vdi", "create", "--sr", &sr, "8M", "--name-label", "d"]));

    // One metadata write each: the old state, and its temporary file found and removed.
    std::fs::create_dir(a.path("more")).unwrap();
    let other = qcow2_template(&a.path("more"));
    for args in [
        vec!["vdi", "introduce", "--sr", &sr, s(&other)],
        vec!["vdi", "set-name-label", "--sr", &sr, &d, "renamed"],
        vec!["vdi", "snapshot", "--sr", &sr, &t],
    ] {
        let before = state(&a, &path);
        crash(&a, &args, "write:sr.json");
        assert!(path.join(".thinline-sr/sr.json.tmp").exists(), "{args:?}");
        assert_eq!(state(&a, &path), before, "{args:?}: the old state");
        repaired(&a, &sr, &["temporary_file"], &[], &format!("{args:?}"));
        assert!(!path.join(".thinline-sr/sr.json.tmp").exists(), "{args:?}");
        a.ok(&args);
        assert_ne!(state(&a, &path), before, "{args:?} again: the new state");
    }

    // The daemon killed while it attaches: not attached, its socket found and removed;
    // attaching again serves the disk.
    let r = crash(&a, &["vdi", "attach", "--sr", &sr, &d], "write:sr.json");
    assert!(
        r.json["error"]["message"].to_string().contains("daemon"),
        "{r:?}"
    );
    assert_eq!(a.ok(&["vdi", "stat", "--sr", &sr, &d])["attached"], false);
    // A socket counts as stale once it is older than an attach takes to set one up.
    let socket = daemon_socket(&path, &d);
    let young = a.run(&["sr", "check", "--sr", &sr]);
    assert!(
        !young.json.to_string().contains("stale_socket"),
        "{young:?}"
    );
    run(Command::new("touch").args(["-h", "-d", "2 minutes ago", s(&socket)]));
    repaired(&a, &sr, &["stale_socket", "temporary_file"], &[], "attach");
    assert!(!socket.exists());
    let uri = a.attach_uri(&sr, &d);
    assert!(nbd_write(&uri, 1 << 20, 1 << 20, 0x3c).status.success());

    // Detach killed with no daemon left to ask: still attached, and detached again.
    let pid = daemon_pid(&a, &sr).expect("a daemon runs");
    // SAFETY: kill(2) with a pid and a signal number has no memory effects.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    wait_gone(pid, 10, "the daemon did not die");
    crash(&a, &["vdi", "detach", "--sr", &sr, &d], "write:sr.json");
    assert_eq!(a.ok(&["vdi", "stat", "--sr", &sr, &d])["attached"], true);
    assert!(!socket.exists(), "the socket went first");
    a.ok(&["vdi", "detach", "--sr", &sr, &d]);
    assert_eq!(a.ok(&["sr", "check", "--sr", &sr])["clean"], true);
    assert!(qemu_reads(&path.join("d.qcow2"), 1 << 20, 1 << 20, 0x3c));

    // A snapshot the daemon makes of the disk it serves, killed before and after its
    // commit: the old state or the new, the disk served again with its writes.
    for (step, made) in [("intent", false), ("committed", true)] {
        let what = format!("snapshot of an attached disk killed at {step}");
        if let Some(pid) = daemon_pid(&a, &sr) {
            // SAFETY: as above.
            assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
            wait_gone(pid, 10, "the daemon did not die");
        }
        // The daemon this attach starts carries the crash point; the attach passes it.
        let uri = a.run_env(
            &["vdi", "attach", "--sr", &sr, &d],
            &[("THINLINE_SR_CRASH_AT", step)],
        );
        assert_eq!(uri.code, Some(0), "{what}: {uri:?}");
        let uri = uri.json["nbd_uri"].as_str().unwrap().to_owned();
        let pattern = if made { 0x5e } else { 0x4e };
        assert!(nbd_write(&uri, 2 << 20, 1 << 20, pattern).status.success());
        let before = state(&a, &path);
        let r = a.run(&["vdi", "snapshot", "--sr", &sr, &d, "--name-label", step]);
        assert_ne!(r.code, Some(0), "{what}: the daemon died: {r:?}");
        // Committed: the disk's new file is still in new/, which repair moves.
        let found = ["daemon_down", "interrupted_operation", "missing_file"];
        let found = if made { &found[..] } else { &found[..2] };
        repaired(&a, &sr, found, &["daemon_down"], &what);
        let after = state(&a, &path);
        if made {
            assert_eq!(after.0.len(), before.0.len() + 1, "{what}: {after:?}");
        } else {
            assert_eq!(after, before, "{what}");
        }
        let uri = a.attach_uri(&sr, &d);
        assert!(nbd_reads(&uri, 2 << 20, 1 << 20, pattern), "{what}");
        assert!(nbd_reads(&uri, 1 << 20, 1 << 20, 0x3c), "{what}");
        a.ok(&["vdi", "detach", "--sr", &sr, &d]);
        qemu_check_all(&path);
        assert_eq!(a.ok(&["sr", "check", "--sr", &sr])["clean"], true, "{what}");
    }

    // Forgetting a template removes its cache; killed before that, the cache is found
    // unused and removed.
    let c = uuid(&a.ok(&["vdi", "clone", "--sr", &sr, &t]));
    a.ok(&["vdi", "attach", "--sr", &sr, &c]);
    a.ok(&["vdi", "detach", "--sr", &sr, &c]);
    a.ok(&["vdi", "destroy", "--sr", &sr, &c]);
    assert_eq!(cache_files(&path).len(), 1, "the template's cache");
    let t_uri = a.ok(&["vdi", "stat", "--sr", &sr, &t])["uri"].clone();
    let snapshot_of_t = a
        .vdis(&path)
        .into_iter()
        .find(|v| uuid(v) != t && v["uri"] == t_uri);
    let copy = uuid(&snapshot_of_t.expect("the template's snapshot record"));
    a.ok(&["vdi", "forget", "--sr", &sr, &copy]);
    assert_eq!(
        cache_files(&path).len(),
        1,
        "kept: the template reads through it"
    );
    crash(&a, &["vdi", "forget", "--sr", &sr, &t], "finished");
    repaired(
        &a,
        &sr,
        &["interrupted_operation", "unused_cache"],
        &[],
        "forget",
    );
    assert!(cache_files(&path).is_empty(), "{:?}", cache_files(&path));
    assert!(a.vdis(&path).iter().all(|v| uuid(v) != t), "forgotten");
    // Forgotten without a crash, the daemon lets go of the cache it held open, and a
    // template introduced again at that URI gets a cache file of its own.
    let daemon_caches = || daemon_status(&path)["caches"].clone();
    let template_path = a.path("template.qcow2");
    for round in ["first", "again"] {
        let t = uuid(&a.ok(&["vdi", "introduce", "--sr", &sr, s(&template_path)]));
        let c = uuid(&a.ok(&["vdi", "clone", "--sr", &sr, &t]));
        let uri = a.attach_uri(&sr, &c);
        assert!(nbd_reads(&uri, 0, 1 << 20, 0x42), "{round}");
        a.ok(&["vdi", "detach", "--sr", &sr, &c]);
        a.ok(&["vdi", "destroy", "--sr", &sr, &c]);
        assert_eq!(cache_files(&path).len(), 1, "{round}");
        assert_eq!(daemon_caches().as_array().map(Vec::len), Some(1), "{round}");
        a.ok(&["vdi", "forget", "--sr", &sr, &t]);
        assert_eq!(daemon_caches(), serde_json::json!([]), "{round}");
        assert!(cache_files(&path).is_empty(), "{round}");
    }

    // sr forget: still registered; sr create: reached by its path, and introduced.
    let registered = |u: &str| {
        a.ok(&["sr", "list"])["srs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["uuid"] == u)
    };
    crash(&a, &["sr", "forget", "--sr", &sr], "write:registry.json");
    assert!(registered(&sr), "sr forget killed: still registered");
    let fresh = a.path("fresh");
    crash(&a, &["sr", "create", s(&fresh)], "registering");
    let made = a.ok(&["sr", "probe", s(&fresh)])["sr"]["uuid"]
        .as_str()
        .expect("an SR is there")
        .to_owned();
    assert!(!registered(&made));
    a.ok(&["vdi", "create", "--sr", s(&fresh), "1M"]);
    let msg = a.fails(&["sr", "create", s(&fresh)], "SR_EXISTS", 17);
    assert!(msg.contains("sr introduce"), "{msg}");
    assert_eq!(a.ok(&["sr", "introduce", s(&fresh)])["uuid"], made.as_str());
    assert!(registered(&made));
    // sr introduce of a plain directory, killed before it registers: introduced again,
    // the same SR.
    let adopted = a.path("adopted");
    std::fs::create_dir(&adopted).unwrap();
    std::fs::write(adopted.join("foreign.img"), b"not ours").unwrap();
    crash(&a, &["sr", "introduce", s(&adopted)], "write:registry.json");
    let made = a.ok(&["sr", "probe", s(&adopted)])["sr"]["uuid"].clone();
    assert_eq!(a.ok(&["sr", "introduce", s(&adopted)])["uuid"], made);
    assert!(registered(made.as_str().unwrap()));
    assert_eq!(
        std::fs::read(adopted.join("foreign.img")).unwrap(),
        b"not ours"
    );

    // sr destroy killed after removing the metadata: `sr destroy` (or `sr forget`)
    // finishes it.
    for finish in ["destroy", "forget"] {
        let (u, p) = a.new_sr(finish);
        crash(&a, &["sr", "destroy", "--sr", &u], "unregistering");
        assert!(!p.join(".thinline-sr").exists(), "{finish}");
        let listed = a.ok(&["sr", "list"]);
        assert!(listed.to_string().contains("unreachable"), "{listed}");
        a.ok(&["sr", finish, "--sr", &u]);
        assert!(!registered(&u), "{finish}");
    }
}

#[test]
fn a_resize_killed_before_its_record_is_written_is_found_and_repaired_by_sr_check() {
    if !require(&["qemu-img"]) {
        return;
    }
    let a = Agent::new();
    let (sr, path) = a.new_sr("sr");
    let d = uuid(&a.ok(&["vdi", "create", "--sr", &sr, "8M", "--name-label", "d"]));
    let resize = ["vdi", "resize", "--sr", &sr, &d, "32M"];
    let crashed = a.run_env(&resize, &[("THINLINE_SR_CRASH_AT", "resized")]);
    assert_eq!(crashed.code, None, "a signal ends it: {crashed:?}");
    assert_eq!(
        a.ok(&["vdi", "stat", "--sr", &sr, &d])["virtual_size"],
        8 << 20
    );
    let check = a.run(&["sr", "check", "--sr", &sr]);
    assert_eq!(check.code, Some(3), "{check:?}");
    assert!(
        check.json["findings"].to_string().contains("size_mismatch"),
        "{check:?}"
    );
    let repaired = a.ok(&["sr", "check", "--sr", &sr, "--repair"]);
    assert_eq!(repaired["clean"], true, "{repaired}");
    assert_eq!(
        a.ok(&["vdi", "stat", "--sr", &sr, &d])["virtual_size"],
        32 << 20
    );
    qemu_check_all(&path);
}

#[test]
fn eight_agents_at_once_on_one_sr_leave_it_consistent() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    let a = Agent::new();
    let (sr, path, t) = a.sr_with_template();
    let a = &a;
    let survivors: Vec<(String, u8)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8u8)
            .map(|i| {
                let (sr, t, path) = (sr.clone(), t.clone(), path.clone());
                scope.spawn(move || {
                    let label = format!("agent{i}");
                    let mine = a.ok(&["vdi", "clone", "--sr", &sr, &t, "--name-label", &label]);
                    let file = path.join(mine["file"].as_str().unwrap());
                    let pattern = 0x60 + i;
                    qemu_write(&file, 3 << 20, 1 << 20, pattern);
                    let copy = uuid(&a.ok(&["vdi", "clone", "--sr", &sr, &uuid(&mine)]));
                    let snap = uuid(&a.ok(&["vdi", "snapshot", "--sr", &sr, &copy]));
                    let scratch = uuid(&a.ok(&["vdi", "create", "--sr", &sr, "2M"]));
                    // Attached and detached while the others work (the first ones race
                    // to start the SR's daemon).
                    let uri = a.attach_uri(&sr, &scratch);
                    assert!(nbd_write(&uri, 0, 4096, pattern).status.success());
                    assert!(nbd_reads(&uri, 0, 4096, pattern));
                    a.ok(&["vdi", "detach", "--sr", &sr, &scratch]);
                    a.ok(&["vdi", "destroy", "--sr", &sr, &scratch]);
                    a.ok(&[
                        "vdi",
                        "set-name-label",
                        "--sr",
                        &sr,
                        &copy,
                        &format!("copy{i}"),
                    ]);
                    vec![(uuid(&mine), pattern), (copy, pattern), (snap, pattern)]
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    assert_eq!(a.ok(&["sr", "check", "--sr", &sr])["clean"], true);
    let vdis = a.vdis(&path);
    assert_eq!(vdis.len(), 1 + survivors.len(), "{vdis:?}");
    for (u, pattern) in survivors {
        let v = a.ok(&["vdi", "stat", "--sr", &sr, &u]);
        let file = path.join(v["file"].as_str().unwrap());
        assert!(qemu_reads(&file, 3 << 20, 1 << 20, pattern), "{v}");
        assert!(qemu_reads(&file, 0, 1 << 20, 0x42), "{v}");
    }
    qemu_check_all(&path);
}

/// Every `sr`, `vdi` and `task` command.
const AGENT_COMMANDS: [(&str, &[&str]); 3] = [
    (
        "sr",
        &[
            "create",
            "introduce",
            "forget",
            "destroy",
            "probe",
            "stat",
            "list",
            "check",
            "serve",
        ],
    ),
    (
        "vdi",
        &[
            "introduce",
            "create",
            "clone",
            "snapshot",
            "destroy",
            "forget",
            "resize",
            "stat",
            "list",
            "set-name-label",
            "attach",
            "detach",
        ],
    ),
    ("task", &["list", "cancel"]),
];

#[test]
fn every_sr_and_vdi_command_has_help_that_ends_with_an_example() {
    let a = Agent::new();
    for (group, commands) in AGENT_COMMANDS {
        for c in commands {
            let out = a.command(&[group, c, "--help"]).output().unwrap();
            assert!(out.status.success(), "{group} {c} --help");
            let help = String::from_utf8_lossy(&out.stdout);
            let example = help
                .rfind("Example")
                .unwrap_or_else(|| panic!("{group} {c}: {help}"));
            assert!(
                help[example..].contains(&format!("thinline {group} {c}")),
                "{group} {c}: the example shows the command: {help}"
            );
            // The daemon prints logs, not a result.
            if (group, *c) != ("sr", "serve") {
                assert!(help.contains("--json"), "{group} {c}: --json");
            }
        }
    }
}

/// Whether qemu-io reads `pattern` at `[offset, offset + len)` of the raw disk `uri`.
fn nbd_reads(uri: &str, offset: u64, len: u64, pattern: u8) -> bool {
    reads("raw", uri.as_ref(), offset, len, pattern)
}

fn nbd_write(uri: &str, offset: u64, len: u64, pattern: u8) -> std::process::Output {
    qemu_io_once(
        "raw",
        uri.as_ref(),
        &format!("write -P {pattern:#x} {offset} {len}"),
    )
}

fn daemon_pid(a: &Agent, sr: &str) -> Option<i32> {
    a.ok(&["sr", "stat", "--sr", sr])["daemon"]["pid"]
        .as_i64()
        .map(|p| p as i32)
}

/// Waits up to `secs` seconds for process `pid` to end; panics with `what` otherwise.
fn wait_gone(pid: i32, secs: u64, what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while !process_gone(pid) {
        assert!(std::time::Instant::now() < deadline, "{what}");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

fn process_gone(pid: i32) -> bool {
    // A zombie (our child was not reaped: it is not ours) counts as gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| {
        s.rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z'))
    })
}

#[test]
fn attached_vdis_are_served_over_nbd_come_back_after_a_daemon_crash_and_detach_leaves_nothing() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    let a = Agent::new();
    let (sr, path, t) = a.sr_with_template();
    let c = uuid(&a.ok(&["vdi", "clone", "--sr", &sr, &t, "--name-label", "vm"]));
    let d = uuid(&a.ok(&["vdi", "create", "--sr", &sr, "8M", "--name-label", "data"]));
    a.fails(&["vdi", "attach", "--sr", &sr, &t], "VDI_IS_TEMPLATE", 12);
    {
        // An SR path too long for a unix socket under it: refused, and not recorded.
        let deep = a.path(&"d".repeat(100));
        let long_sr = uuid(&a.ok(&["sr", "create", s(&deep)]));
        let v = uuid(&a.ok(&["vdi", "create", "--sr", &long_sr, "1M"]));
        let msg = a.fails(
            &["vdi", "attach", "--sr", &long_sr, &v],
            "INVALID_ARGUMENT",
            2,
        );
        assert!(msg.contains("107 bytes"), "{msg}");
        assert_eq!(
            a.ok(&["vdi", "stat", "--sr", &long_sr, &v])["attached"],
            false
        );
        a.ok(&["vdi", "destroy", "--sr", &long_sr, &v]);
        a.ok(&["sr", "destroy", "--sr", &long_sr]);
    }

    // Attach: the daemon starts, the URI serves the clone read-write.
    let attached = a.ok(&["vdi", "attach", "--sr", &sr, &c]);
    let uri = attached["nbd_uri"].as_str().unwrap().to_owned();
    let socket = PathBuf::from(attached["socket"].as_str().unwrap());
    assert!(
        uri.starts_with("nbd+unix:///") && uri.contains(s(&socket)),
        "{uri}"
    );
    assert!(socket.exists());
    assert_eq!(
        a.ok(&["vdi", "attach", "--sr", &sr, &c])["nbd_uri"],
        uri.as_str(),
        "attaching twice answers the same URI"
    );
    assert!(nbd_reads(&uri, 0, 1 << 20, 0x42), "the template's bytes");
    let w = nbd_write(&uri, 4 << 20, 1 << 20, 0x77);
    assert!(w.status.success(), "{w:?}");
    assert_eq!(a.ok(&["vdi", "stat", "--sr", &sr, &c])["attached"], true);

    // What an attached VDI refuses.
    a.fails(&["vdi", "destroy", "--sr", &sr, &c], "VDI_IN_USE", 13);
    a.fails(&["sr", "destroy", "--sr", &sr, "--force"], "VDI_IN_USE", 13);

    // --device: where it cannot be done (this host has no nbd driver; the kernel VM
    // test connects a real /dev/nbdN) a clear error that leaves each VDI as it was;
    // where it can, a device that detach disconnects.
    for (v, was) in [(&d, false), (&c, true)] {
        let r = a.run(&["vdi", "attach", "--sr", &sr, v, "--device"]);
        if r.code == Some(0) {
            let dev = r.json["device"].as_str().expect("a device").to_owned();
            assert!(dev.starts_with("/dev/nbd"), "{r:?}");
            a.ok(&["vdi", "detach", "--sr", &sr, v]);
            if was {
                a.ok(&["vdi", "attach", "--sr", &sr, v]);
            }
        } else {
            assert_eq!(r.code, Some(21), "{r:?}");
            assert_eq!(r.json["error"]["code"], "DEVICE_UNAVAILABLE", "{r:?}");
        }
        let now = a.ok(&["vdi", "stat", "--sr", &sr, v]);
        assert_eq!(now["attached"], was, "{now}");
        assert_eq!(now["device"], Value::Null, "{now}");
    }
    assert!(nbd_reads(&uri, 4 << 20, 1 << 20, 0x77), "still served");

    // A second VDI; detaching it leaves the first served.
    let second = a.ok(&["vdi", "attach", "--sr", &sr, &d]);
    let second_socket = PathBuf::from(second["socket"].as_str().unwrap());
    a.ok(&["vdi", "detach", "--sr", &sr, &d]);
    assert!(!second_socket.exists(), "detach leaves no socket");
    assert_eq!(a.ok(&["vdi", "stat", "--sr", &sr, &d])["attached"], false);
    assert!(
        nbd_reads(&uri, 4 << 20, 1 << 20, 0x77),
        "the other VDI is still served"
    );

    // kill -9 of the daemon: sr check says so; attaching again serves it again, with
    // everything written (and flushed: qemu-io flushes when it exits).
    let pid = daemon_pid(&a, &sr).expect("a daemon runs");
    // SAFETY: kill(2) with a pid and a signal number has no memory effects.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    wait_gone(pid, 10, "the daemon did not die");
    let check = a.run(&["sr", "check", "--sr", &sr]);
    assert_eq!(check.code, Some(3), "{check:?}");
    assert!(
        check.json["findings"].to_string().contains("daemon_down"),
        "{check:?}"
    );
    assert_eq!(
        a.ok(&["vdi", "attach", "--sr", &sr, &c])["nbd_uri"],
        uri.as_str()
    );
    assert_ne!(daemon_pid(&a, &sr), Some(pid), "a new daemon");
    assert!(
        nbd_reads(&uri, 4 << 20, 1 << 20, 0x77),
        "written before the crash"
    );
    assert!(nbd_reads(&uri, 0, 1 << 20, 0x42));

    // A snapshot is served read-only.
    a.ok(&["vdi", "detach", "--sr", &sr, &c]);
    let snap = uuid(&a.ok(&["vdi", "snapshot", "--sr", &sr, &c]));
    let snap_uri = a.attach_uri(&sr, &snap);
    assert!(nbd_reads(&snap_uri, 4 << 20, 1 << 20, 0x77));
    assert!(
        !nbd_write(&snap_uri, 0, 4096, 0x01).status.success(),
        "read-only"
    );
    a.ok(&["vdi", "detach", "--sr", &sr, &snap]);

    // Detached: no socket, the files check clean, and the SR goes with its daemon.
    assert!(!socket.exists(), "detach leaves no socket");
    qemu_check_all(&path);
    let pid = daemon_pid(&a, &sr).expect("the daemon goes on while the SR exists");
    a.ok(&["sr", "destroy", "--sr", &sr, "--force"]);
    wait_gone(pid, 10, "sr destroy stops the daemon");
}

/// Connects the `nbd` crate's client to an attached VDI (its export is named by its UUID).
fn nbd_connect(attached: &Value) -> (UnixStream, nbd::client::Export) {
    let mut stream = UnixStream::connect(attached["socket"].as_str().unwrap()).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(120)))
        .unwrap();
    let name = attached["uuid"].as_str().unwrap();
    let export = nbd::client::handshake(&mut stream, name.as_bytes()).expect("handshake");
    (stream, export)
}

/// The writes of [`WriteLog`]: write `j` fills block `j % BLOCKS` with `pattern(j)`.
const BLOCK: u64 = 64 << 10;
const BLOCKS: u64 = 160;
const FIRST: u64 = 2 << 20;

fn pattern(j: u64) -> u8 {
    // 251 is prime: two rounds over the same block never write the same byte.
    (j % 251 + 1) as u8
}

/// The byte each block holds after the first `k` writes (0: never written; the
/// template reads as zeroes there).
fn after_writes(k: u64) -> Vec<u8> {
    let mut state = vec![0u8; BLOCKS as usize];
    for j in k.saturating_sub(BLOCKS)..k {
        state[(j % BLOCKS) as usize] = pattern(j);
    }
    state
}

/// Reads the blocks of an attached VDI through a new connection; panics on a block
/// that is not one byte repeated (a torn write).
fn blocks_of(attached: &Value) -> Vec<u8> {
    let (mut stream, export) = nbd_connect(attached);
    let mut client = nbd::client::NbdClient::new(&mut stream, &export);
    let mut all = vec![0u8; (BLOCKS * BLOCK) as usize];
    client.seek(std::io::SeekFrom::Start(FIRST)).unwrap();
    client.read_exact(&mut all).unwrap();
    all.chunks(BLOCK as usize)
        .enumerate()
        .map(|(b, block)| {
            assert!(
                block.iter().all(|&x| x == block[0]),
                "block {b} of {} is torn",
                attached["uuid"]
            );
            block[0]
        })
        .collect()
}

/// The number of writes a copy holds: it must be the state after some `k` writes
/// with `acked_before <= k <= acked_after + 1` (the one write in flight may be in).
fn writes_held(copy: &[u8], acked_before: u64, acked_after: u64, what: &str) -> u64 {
    (acked_before..=acked_after + 1)
        .find(|&k| after_writes(k) == copy)
        .unwrap_or_else(|| {
            panic!(
                "{what} is not the state after any prefix of the writes acknowledged \
                 between {acked_before} and {acked_after}: {copy:?}"
            )
        })
}

#[test]
fn snapshots_clones_and_resizes_of_an_attached_disk_hold_every_acknowledged_write_while_its_client_stays_connected()
 {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let a = Agent::new();
    let (sr, path, t) = a.sr_with_template();
    let c = uuid(&a.ok(&["vdi", "clone", "--sr", &sr, &t, "--name-label", "vm"]));
    let attached = a.ok(&["vdi", "attach", "--sr", &sr, &c]);

    // One client writes block after block, round after round, on one connection that
    // stays open through every change below; `acked` counts acknowledged writes.
    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (acked, stop, attached) = (Arc::clone(&acked), Arc::clone(&stop), attached.clone());
        std::thread::spawn(move || {
            let (mut stream, export) = nbd_connect(&attached);
            let mut client = nbd::client::NbdClient::new(&mut stream, &export);
            let mut j = 0;
            while !stop.load(Ordering::Acquire) {
                let block = vec![pattern(j); BLOCK as usize];
                client
                    .seek(std::io::SeekFrom::Start(FIRST + (j % BLOCKS) * BLOCK))
                    .unwrap();
                client
                    .write_all(&block)
                    .expect("every write is acknowledged");
                j += 1;
                acked.store(j, Ordering::Release);
            }
            export.size
        })
    };
    let wait_for = |n: u64| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while acked.load(Ordering::Acquire) < n {
            assert!(std::time::Instant::now() < deadline, "the writer is stuck");
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        acked.load(Ordering::Acquire)
    };

    // A snapshot while writes go on: every write acknowledged before it is in it.
    let before = wait_for(20);
    let snap = a.ok(&["vdi", "snapshot", "--sr", &sr, &c, "--name-label", "live"]);
    let after = acked.load(Ordering::Acquire);
    assert_eq!(snap["type"], "snapshot");
    let snap_attached = a.ok(&["vdi", "attach", "--sr", &sr, &uuid(&snap)]);
    let in_snapshot = writes_held(&blocks_of(&snap_attached), before, after, "the snapshot");

    // A clone likewise, after more writes.
    let before = wait_for(after + 20);
    let clone = a.ok(&["vdi", "clone", "--sr", &sr, &c, "--name-label", "copy"]);
    let after = acked.load(Ordering::Acquire);
    let clone_attached = a.ok(&["vdi", "attach", "--sr", &sr, &uuid(&clone)]);
    let in_clone = writes_held(&blocks_of(&clone_attached), before, after, "the clone");
    assert!(
        in_clone > in_snapshot,
        "the clone is newer than the snapshot"
    );

    // A refused change pauses nothing for good; a resize grows the disk for new
    // connections while the old one goes on at its size.
    let before = wait_for(after + 20);
    a.fails(
        &["vdi", "resize", "--sr", &sr, &c, "8M"],
        "INVALID_ARGUMENT",
        2,
    );
    let grown = a.ok(&["vdi", "resize", "--sr", &sr, &c, "64M"]);
    assert_eq!(grown["virtual_size"], 64u64 << 20);
    wait_for(before + 20);
    stop.store(true, Ordering::Release);
    let old_size = writer.join().expect("the writer never failed");
    assert_eq!(
        old_size,
        16 << 20,
        "a connection keeps the size it was given"
    );
    let total = acked.load(Ordering::Acquire);

    // The disk holds every write; the copies did not change after they were made.
    assert_eq!(blocks_of(&attached), after_writes(total), "the disk");
    assert_eq!(blocks_of(&snap_attached), after_writes(in_snapshot));
    assert_eq!(blocks_of(&clone_attached), after_writes(in_clone));
    let (stream, export) = nbd_connect(&attached);
    assert_eq!(export.size, 64 << 20, "a new connection sees the new size");
    drop(stream);
    let w = nbd_write(
        attached["nbd_uri"].as_str().unwrap(),
        40 << 20,
        1 << 20,
        0x5a,
    );
    assert!(w.status.success(), "{w:?}");
    assert!(nbd_reads(
        attached["nbd_uri"].as_str().unwrap(),
        40 << 20,
        1 << 20,
        0x5a
    ));
    assert!(
        nbd_reads(attached["nbd_uri"].as_str().unwrap(), 0, 1 << 20, 0x42),
        "the template's bytes"
    );

    for v in [&c, &uuid(&snap), &uuid(&clone)] {
        a.ok(&["vdi", "detach", "--sr", &sr, v]);
    }
    qemu_check_all(&path);
}

#[test]
fn every_shipped_unit_passes_systemd_analyze_verify() {
    if !require(&["systemd-analyze"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut instances = Vec::new();
    for (unit, instance, command) in [
        (
            "thinline-sr@.service",
            "thinline-sr@srv-sr1.service",
            "ExecStart=/usr/bin/thinline sr serve --sr %f",
        ),
        (
            "thinline-lvm-sr@.service",
            "thinline-lvm-sr@vms.service",
            "ExecStart=/usr/bin/thinline sr check --sr %i --repair",
        ),
        (
            "thinline-lvm-monitor@.service",
            "thinline-lvm-monitor@vms.service",
            "ExecStart=/usr/bin/thinline sr monitor --sr %i",
        ),
        (
            "thinline-serve@.service",
            "thinline-serve@t1.service",
            "ExecStart=/usr/bin/thinline serve --log-format json $THINLINE_SERVE_ARGS",
        ),
        (
            "thinline-serve@.socket",
            "thinline-serve@t1.socket",
            "FileDescriptorName=nbd",
        ),
        (
            "thinline-proxy@.service",
            "thinline-proxy@t1.service",
            "ExecStart=/usr/bin/thinline proxy --log-format json $THINLINE_PROXY_ARGS",
        ),
        (
            "thinline-proxy@.socket",
            "thinline-proxy@t1.socket",
            "FileDescriptorName=nbd",
        ),
        (
            "thinline-proxy-status@.socket",
            "thinline-proxy-status@t1.socket",
            "FileDescriptorName=status",
        ),
    ] {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("packaging/systemd")
                .join(unit),
        )
        .unwrap();
        assert!(text.contains(command), "{unit}: {text}");
        // An instance running the binary under test (every one written before any is
        // verified: a service names its sockets).
        let path = dir.path().join(instance);
        std::fs::write(&path, text.replace("/usr/bin/thinline", common::thinline())).unwrap();
        instances.push((unit, path));
    }
    for (unit, path) in instances {
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&path)
            .output()
            .unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && said.trim().is_empty(),
            "{unit}: {said}"
        );
    }
}

#[test]
fn the_sr_daemon_says_ready_once_it_takes_requests_and_stopping_on_sigterm() {
    let a = Agent::new();
    let (sr, _) = a.new_sr("sr1");
    let notify = a.path("notify");
    let receiver = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    receiver
        .set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let mut daemon = common::spawn(
        a.command(&["sr", "serve", "--sr", &sr])
            .env("NOTIFY_SOCKET", &notify),
        std::process::Stdio::null(),
        std::process::Stdio::null(),
    );
    let mut buf = [0u8; 64];
    let n = receiver.recv(&mut buf).expect("READY=1 within 20 s");
    assert_eq!(&buf[..n], b"READY=1");
    // Ready means requests are answered.
    assert_eq!(
        a.ok(&["sr", "stat", "--sr", &sr])["daemon"]["pid"],
        daemon.id()
    );
    common::signal(&daemon, libc::SIGTERM);
    let status = common::wait_timeout(&mut daemon, std::time::Duration::from_secs(20))
        .expect("the daemon exits on SIGTERM");
    assert!(status.success(), "{status}");
    let n = receiver.recv(&mut buf).expect("STOPPING=1 on SIGTERM");
    assert_eq!(&buf[..n], b"STOPPING=1");
}

/// Starts `thinline quickstart --dir DIR --json` and returns it with the JSON line it
/// printed once serving.
fn quickstart(a: &Agent, dir: &Path) -> (std::process::Child, Value) {
    use std::io::BufRead;
    let mut child = a
        .command(&["quickstart", "--dir", s(dir), "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    match serde_json::from_str(&line) {
        Ok(ready) => (child, ready),
        Err(e) => panic!(
            "quickstart printed {line:?} ({e}): {:?}",
            child.wait_with_output()
        ),
    }
}

/// SIGINT to `child`, which must then exit 0.
fn interrupt(mut child: std::process::Child) {
    // SAFETY: kill(2) with a pid and a signal number has no memory effects.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let status = child.wait().unwrap();
    assert!(status.success(), "quickstart after Ctrl-C: {status}");
}

#[test]
fn quickstart_serves_a_clone_whose_file_system_independent_tools_read_and_reuses_it() {
    if !require(&[
        "qemu-img", "qemu-io", "nbdcopy", "e2fsck", "debugfs", "mke2fs",
    ]) {
        return;
    }
    let a = Agent::new();
    let dir = a.path("thinline-data");
    let (child, ready) = quickstart(&a, &dir);
    let uri = ready["nbd_uri"].as_str().unwrap().to_owned();
    assert!(
        uri.starts_with("nbd+unix:///") && uri.contains("socket=/"),
        "{uri}"
    );
    // The whole disk, copied by libnbd's nbdcopy: the partition's file system is clean
    // and holds the sample files.
    let raw = a.path("clone.raw");
    let copied = Command::new("nbdcopy")
        .arg(&uri)
        .arg(&raw)
        .output()
        .unwrap();
    assert!(copied.status.success(), "{copied:?}");
    let disk = std::fs::read(&raw).unwrap();
    assert_eq!(&disk[510..512], &[0x55, 0xaa], "an MBR");
    let fs = a.path("fs.img");
    std::fs::write(&fs, &disk[1 << 20..]).unwrap();
    let fsck = Command::new("e2fsck")
        .args(["-n", "-f"])
        .arg(&fs)
        .output()
        .unwrap();
    assert!(fsck.status.success(), "e2fsck: {fsck:?}");
    for (name, content) in thinline_sr::sample::FILES {
        let cat = Command::new("debugfs")
            .args(["-R", &format!("cat /{name}")])
            .arg(&fs)
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&cat.stdout), content, "{name}");
    }
    let template = dir.join("templates/sample.qcow2");
    let compare = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "qcow2", &uri])
        .arg(&template)
        .output()
        .unwrap();
    assert!(
        compare.status.success(),
        "the clone reads as its template: {compare:?}"
    );
    // Writes go to the clone only.
    assert!(nbd_write(&uri, 40 << 20, 1 << 20, 0x3c).status.success());
    let socket = PathBuf::from(ready["socket"].as_str().unwrap());
    interrupt(child);
    assert!(!socket.exists(), "Ctrl-C detaches the clone");
    // Again: the same SR, template and clone, with what was written.
    let (child, again) = quickstart(&a, &dir);
    for key in ["sr", "template", "vdi", "nbd_uri"] {
        assert_eq!(again[key], ready[key], "{key} is reused");
    }
    assert!(
        nbd_reads(&uri, 40 << 20, 1 << 20, 0x3c),
        "what was written is there"
    );
    assert!(
        reads("qcow2", template.as_os_str(), 40 << 20, 1 << 20, 0),
        "the template is not written"
    );
    interrupt(child);
}

#[test]
fn man_pages_are_generated_for_every_command_with_examples_output_and_exit_statuses() {
    let a = Agent::new();
    let out = a.path("man");
    let made = a.command(&["man", "--out", s(&out)]).output().unwrap();
    assert!(made.status.success(), "{made:?}");
    let page = |name: &str| {
        std::fs::read_to_string(out.join(format!("{name}.1")))
            .unwrap_or_else(|e| panic!("{name}(1): {e}"))
    };
    for (group, commands) in AGENT_COMMANDS {
        for c in commands {
            let name = format!("thinline-{group}-{c}");
            let text = page(&name);
            assert!(text.contains(&format!(".TH {name} 1")), "{name}: a title");
            let examples = text
                .find(".SH EXAMPLES")
                .unwrap_or_else(|| panic!("{name}: examples"));
            assert!(
                text[examples..].contains(&format!("thinline {group} {}", c.replace('-', "\\-"))),
                "{name}: the example shows the command"
            );
            assert!(
                text.contains(".SH OUTPUT") && text.contains(".SH EXIT STATUS"),
                "{name}"
            );
            assert!(
                text.contains("\\fB12\\fR VDI_IS_TEMPLATE"),
                "{name}: every code"
            );
        }
    }
    let root = page("thinline");
    for code in [
        "\\fB10\\fR SR_NOT_FOUND",
        "\\fB18\\fR VDI_READ_ONLY",
        "image check",
    ] {
        assert!(root.contains(code), "thinline(1) lists {code}");
    }
    assert!(
        !out.join("thinline-man.1").exists(),
        "the hidden command has no page"
    );
}

/// Starts `vdi create --preallocate SIZE --json` in the background.
fn start_preallocation(a: &Agent, sr: &str, size: &str) -> std::process::Child {
    a.command(&["vdi", "create", "--sr", sr, size, "--preallocate", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits until the SR has a running task that made progress; returns its id.
fn running_task(a: &Agent, sr: &str) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let tasks = a.ok(&["task", "list", "--sr", sr]);
        if let Some(t) = tasks["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["running"] == true && t["progress"].as_f64().unwrap() > 0.0)
        {
            assert_eq!(t["operation"], "vdi create --preallocate");
            return t["id"].as_str().unwrap().to_owned();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no task shows progress: {tasks}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The SR holds exactly what it held before: no VDI, no file, nothing in `new/`.
fn nothing_half_made(a: &Agent, sr: &str, path: &Path, vdis_before: usize) {
    assert_eq!(a.vdis(path).len(), vdis_before);
    let files: Vec<_> = std::fs::read_dir(path)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != ".thinline-sr")
        .collect();
    assert_eq!(files.len(), vdis_before, "{files:?}");
    assert!(
        std::fs::read_dir(path.join(".thinline-sr/new"))
            .unwrap()
            .next()
            .is_none()
    );
    assert_eq!(a.ok(&["sr", "check", "--sr", sr])["clean"], true);
    assert!(
        a.ok(&["task", "list", "--sr", sr])["tasks"]
            .as_array()
            .unwrap()
            .is_empty()
    );
}

#[test]
fn preallocation_reports_progress_and_a_cancel_or_ctrl_c_or_full_disk_leaves_nothing_half_made() {
    if !require(&["qemu-img"]) {
        return;
    }
    let a = Agent::new();
    let (sr, path) = a.new_sr("sr");
    // A small one, to the end: progress records on stderr, every block allocated.
    let out = a
        .command(&[
            "vdi",
            "create",
            "--sr",
            &sr,
            "24M",
            "--preallocate",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v["physical_utilisation"].as_u64().unwrap() >= 24 << 20,
        "{v}"
    );
    let records: Vec<Value> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    assert!(records.len() >= 3, "{records:?}");
    assert_eq!(records.last().unwrap()["progress"], 1.0);
    assert!(
        records
            .windows(2)
            .all(|w| w[0]["progress"].as_f64() <= w[1]["progress"].as_f64())
    );
    qemu_check_all(&path);
    a.fails(
        &["task", "cancel", "--sr", &sr, "nosuchtask"],
        "TASK_NOT_FOUND",
        20,
    );

    // `task cancel` from another shell.
    let child = start_preallocation(&a, &sr, "6G");
    let id = running_task(&a, &sr);
    let cancelled = a.ok(&["task", "cancel", "--sr", &sr, &id]);
    assert_eq!(cancelled["cancel_requested"], true);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(19), "{out:?}");
    let err: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(err["error"]["code"], "CANCELLED");
    nothing_half_made(&a, &sr, &path, 1);

    // Ctrl-C in its own terminal.
    let child = start_preallocation(&a, &sr, "6G");
    running_task(&a, &sr);
    // SAFETY: kill(2) with a pid and a signal number has no memory effects.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(19), "{out:?}");
    nothing_half_made(&a, &sr, &path, 1);

    // A full file system: SR_FULL, and the SR works on once there is room.
    let Some(small) = common::SmallFs::mount(&a.path("small"), "24m") else {
        return;
    };
    let small_sr = small.0.join("sr");
    let sr2 = uuid(&a.ok(&["sr", "create", "--type", "file", s(&small_sr)]));
    a.fails(
        &["vdi", "create", "--sr", &sr2, "64M", "--preallocate"],
        "SR_FULL",
        15,
    );
    nothing_half_made(&a, &sr2, &small_sr, 0);
    a.ok(&["vdi", "create", "--sr", &sr2, "8M", "--preallocate"]);
}

/// The status of the daemon of the SR at `path`, asked on its control socket (`sr stat`
/// would also open the templates).
fn daemon_status(path: &Path) -> Value {
    use std::io::{BufRead, Write};
    let mut stream = UnixStream::connect(path.join(".thinline-sr/run/control.sock")).unwrap();
    stream.write_all(b"\"status\"\n").unwrap();
    let mut line = String::new();
    std::io::BufReader::new(stream)
        .read_line(&mut line)
        .unwrap();
    serde_json::from_str::<Value>(&line).unwrap()["ok"].clone()
}

/// The daemon's log of the SR at `path`.
fn daemon_log(path: &Path) -> String {
    std::fs::read_to_string(path.join(".thinline-sr/run/daemon.log")).unwrap_or_default()
}

#[test]
fn a_replaced_or_unreachable_template_is_read_only_from_its_cache_and_stat_says_why() {
    let a = Agent::new();
    let Some((sr, path, root, nginx)) = a.with_nginx() else {
        return;
    };
    // 64 MiB: data at 0 (read below, so cached) and at 48 MiB (never read before the
    // template changes, and far from the first MiB's fetch-around: not cached).
    let template = root.join("template.qcow2");
    let qemu = thinline_test_support::qemu::qemu_io;
    thinline_test_support::qemu::qemu_img(
        &root,
        &["create", "-q", "-f", "qcow2", s(&template), "64M"],
    );
    qemu(
        &root,
        "qcow2",
        s(&template),
        &["write -q -P 0x42 0 1M", "write -q -P 0x43 48M 4M"],
    );
    let url = nginx.url("template.qcow2");
    let t = uuid(&a.ok(&["vdi", "introduce", "--sr", &sr, &url]));
    let c = uuid(&a.ok(&["vdi", "clone", "--sr", &sr, &t, "--name-label", "vm"]));
    let attach = || a.attach_uri(&sr, &c);
    let uri = attach();
    assert!(nbd_write(&uri, 2 << 20, 1 << 20, 0x11).status.success());
    assert!(nbd_reads(&uri, 0, 1 << 20, 0x42), "cached from now on");
    for v in [&t, &c] {
        let now = a.ok(&["vdi", "stat", "--sr", &sr, v]);
        assert!(now.get("template_error").is_none(), "{now}");
    }
    let stat = a.ok(&["sr", "stat", "--sr", &sr]);
    assert!(stat.get("template_errors").is_none(), "{stat}");

    // What a clone reads now: the cached bytes and its own writes; the blocks at 48
    // MiB, never read, fail (and never show the new object's bytes).
    let reads_what_it_holds = |what: &str| {
        assert!(nbd_reads(&uri, 0, 1 << 20, 0x42), "{what}: cached");
        assert!(nbd_reads(&uri, 2 << 20, 1 << 20, 0x11), "{what}: its write");
        for offset in [48u64 << 20, 50 << 20] {
            let out = qemu_io_once("raw", uri.as_ref(), &format!("read {offset} 65536"));
            assert!(
                !String::from_utf8_lossy(&out.stdout).contains("read 65536/65536"),
                "{what}: the block at {offset} must fail: {out:?}"
            );
        }
    };

    // The template is replaced under its URI (its ETag changes): both stats say so,
    // a daemon that opens it again reads only what the cache holds, and its log says
    // why.
    // New bytes where the clone has not read, and a new cluster, so the file's size
    // (and with it nginx's ETag, whose mtime has whole seconds) changes for sure. The
    // object as introduced is kept (its mtime too, so the same ETag) to come back.
    let original = a.path("original.qcow2");
    run(Command::new("cp").args(["-p", s(&template), s(&original)]));
    let replace = ["write -q -P 0x44 48M 1M", "write -q -P 0x44 56M 1M"];
    qemu(&root, "qcow2", s(&template), &replace);
    for v in [&t, &c] {
        let now = a.ok(&["vdi", "stat", "--sr", &sr, v]);
        let error = now["template_error"].as_str().unwrap_or_default();
        assert!(error.contains("changed since it was introduced"), "{now}");
    }
    let pid = daemon_pid(&a, &sr).expect("a daemon runs");
    // SAFETY: kill(2) with a pid and a signal number has no memory effects.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    wait_gone(pid, 20, "the daemon did not stop");
    assert_eq!(attach(), uri);
    reads_what_it_holds("replaced");
    let log = daemon_log(&path);
    assert!(
        log.contains("only the cached blocks of the template can be read")
            && log.contains("changed since it was introduced"),
        "the daemon's log says why: {log}"
    );

    // The server goes away: both stats say the template cannot be opened.
    drop(nginx);
    let now = a.ok(&["vdi", "stat", "--sr", &sr, &c]);
    let error = now["template_error"].as_str().unwrap_or_default();
    assert!(error.contains("template.qcow2"), "{now}");
    let stat = a.ok(&["sr", "stat", "--sr", &sr]);
    assert_eq!(stat["template_errors"][0]["uuid"], t.as_str(), "{stat}");
    // A daemon that opens it now cannot reach it: the clone is still served.
    let pid = daemon_pid(&a, &sr).expect("a daemon runs");
    // SAFETY: kill(2) with a pid and a signal number has no memory effects.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    wait_gone(pid, 20, "the daemon did not stop");
    assert_eq!(attach(), uri);
    reads_what_it_holds("unreachable");

    // The object as introduced comes back at its URI: the stats are clean, and a daemon
    // that opens it again reads it, blocks never cached included.
    std::fs::rename(&original, &template).unwrap();
    let port = url.rsplit(':').next().unwrap().split('/').next().unwrap();
    let _nginx = Nginx::start_at(&root, port.parse().unwrap());
    for v in [&t, &c] {
        let now = a.ok(&["vdi", "stat", "--sr", &sr, v]);
        assert!(now.get("template_error").is_none(), "came back: {now}");
    }
    let pid = daemon_pid(&a, &sr).expect("a daemon runs");
    // SAFETY: kill(2) with a pid and a signal number has no memory effects.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    wait_gone(pid, 20, "the daemon did not stop");
    assert_eq!(attach(), uri);
    assert!(
        nbd_reads(&uri, 48 << 20, 4 << 20, 0x43),
        "never cached, read now"
    );
    assert!(nbd_reads(&uri, 0, 1 << 20, 0x42));
    assert!(nbd_reads(&uri, 2 << 20, 1 << 20, 0x11), "its own write");
    a.ok(&["vdi", "detach", "--sr", &sr, &c]);
}

#[test]
fn sr_stat_asks_about_every_template_at_once() {
    use common::hostile_http::{self, HostileHttp};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Condvar, Mutex};
    let a = Agent::new();
    let (sr, _) = a.new_sr("sr");
    let names = ["/a.raw", "/b.raw", "/c.raw"];
    let files: std::collections::BTreeMap<String, Vec<u8>> = names
        .iter()
        .enumerate()
        .map(|(i, n)| ((*n).to_owned(), vec![i as u8 + 1; 1 << 20]))
        .collect();
    // Once gated, the server answers no template until it holds a request for each of
    // the three (or gives up after 20 s with a 404): checked one after another, the
    // first would wait alone and be reported broken.
    let gated = Arc::new(AtomicBool::new(false));
    let arrived = Arc::new((Mutex::new(0usize), Condvar::new()));
    let server = {
        let (gated, arrived) = (Arc::clone(&gated), Arc::clone(&arrived));
        HostileHttp::start(move |req, stream| {
            if gated.load(Ordering::SeqCst) {
                let (count, all) = &*arrived;
                let mut n = count.lock().unwrap();
                *n += 1;
                all.notify_all();
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
                while *n < names.len() {
                    let left = deadline.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() {
                        return hostile_http::status(stream, 404, "Not Found");
                    }
                    n = all.wait_timeout(n, left).unwrap().0;
                }
            }
            match files.get(req.path()) {
                Some(data) => hostile_http::range_response(stream, req, data),
                None => hostile_http::status(stream, 404, "Not Found"),
            }
        })
    };
    let mut templates = Vec::new();
    for n in names {
        templates.push(uuid(&a.ok(&[
            "vdi",
            "introduce",
            "--sr",
            &sr,
            &server.url(n),
        ])));
    }
    // Another record of the first template: asked about once, reported as it is.
    a.ok(&["vdi", "snapshot", "--sr", &sr, &templates[0]]);
    gated.store(true, Ordering::SeqCst);
    let stat = a.ok(&["sr", "stat", "--sr", &sr]);
    assert!(stat.get("template_errors").is_none(), "{stat}");
    assert_eq!(*arrived.0.lock().unwrap(), names.len(), "one request each");
}

#[test]
fn clones_of_a_remote_template_share_one_cache_that_fetches_each_block_once_and_stays_warm() {
    let a = Agent::new();
    let Some((sr, path, root, nginx)) = a.with_nginx() else {
        return;
    };
    let template = qcow2_template(&root);
    // Data far from the tables, so that opening the template does not fetch it too.
    thinline_test_support::qemu::qemu_io(&root, "qcow2", s(&template), &["write -q -P 0x43 8M 4M"]);
    let before = sha(&template);
    let t = uuid(&a.ok(&[
        "vdi",
        "introduce",
        "--sr",
        &sr,
        &nginx.url("template.qcow2"),
    ]));
    let c1 = uuid(&a.ok(&["vdi", "clone", "--sr", &sr, &t, "--name-label", "c1"]));
    let c2 = uuid(&a.ok(&["vdi", "clone", "--sr", &sr, &t, "--name-label", "c2"]));
    let attach = |v: &str| a.attach_uri(&sr, v);
    let (u1, u2) = (attach(&c1), attach(&c2));
    assert!(nbd_write(&u1, 2 << 20, 1 << 20, 0x11).status.success());
    assert!(nbd_write(&u2, 2 << 20, 1 << 20, 0x22).status.success());
    let reads_right = |what: &str| {
        assert!(
            nbd_reads(&u1, 0, 1 << 20, 0x42),
            "{what}: c1 reads the template"
        );
        assert!(
            nbd_reads(&u2, 0, 1 << 20, 0x42),
            "{what}: c2 reads the template"
        );
        assert!(
            nbd_reads(&u1, 2 << 20, 1 << 20, 0x11),
            "{what}: c1's own write"
        );
        assert!(
            nbd_reads(&u2, 2 << 20, 1 << 20, 0x22),
            "{what}: c2's own write"
        );
        assert!(
            nbd_reads(&u1, 4 << 20, 1 << 20, 0),
            "{what}: unallocated in both"
        );
        assert!(
            nbd_reads(&u2, 8 << 20, 4 << 20, 0x43),
            "{what}: c2, far in the template"
        );
    };
    // What the first clone reads is fetched once; the second clone reads it from the
    // shared cache.
    let opened = nginx.access_log().lines().count();
    assert!(
        nbd_reads(&u1, 11 << 20, 1 << 20, 0x43),
        "c1 reads the template"
    );
    // The units fetched around c1's miss arrive after its read returns.
    let settled = || {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while daemon_status(&path)["fetches_in_flight"] != 0 {
            assert!(std::time::Instant::now() < deadline, "fetches never settle");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        nginx.access_log().lines().count()
    };
    let fetched = settled();
    assert!(fetched > opened, "c1's read was fetched from nginx");
    assert!(
        nbd_reads(&u2, 11 << 20, 1 << 20, 0x43),
        "c2 reads the template"
    );
    assert_eq!(
        nginx.access_log().lines().count(),
        fetched,
        "c2 read what c1 fetched from the shared cache:\n{}",
        nginx.access_log()
    );
    reads_right("first reads");
    let fetched = settled();
    // The second clone, and the same clone again, read from the shared cache.
    reads_right("again");
    assert_eq!(
        nginx.access_log().lines().count(),
        fetched,
        "nothing fetched twice:\n{}",
        nginx.access_log()
    );
    // A restart of the daemon (as after a crash or a reboot): both are served again,
    // from the cache on disk, and nothing is fetched again.
    let pid = daemon_pid(&a, &sr).expect("a daemon runs");
    // SAFETY: kill(2) with a pid and a signal number has no memory effects.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    wait_gone(pid, 20, "the daemon did not stop");
    assert_eq!(attach(&c1), u1);
    assert_eq!(attach(&c2), u2);
    // Reopening the template checks its identity and reads its qcow2 tables (what the
    // first open fetched before any data); the data comes from the cache on disk.
    let reopened = nginx.access_log().lines().count();
    reads_right("after a restart");
    assert_eq!(
        nginx.access_log().lines().count(),
        reopened,
        "a restarted daemon reads the data from the cache it had:\n{}",
        nginx.access_log()
    );
    assert_eq!(sha(&template), before, "the template is never written");
    a.ok(&["vdi", "detach", "--sr", &sr, &c1]);
    a.ok(&["vdi", "detach", "--sr", &sr, &c2]);
}
