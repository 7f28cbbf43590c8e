//! Harness of the repository's integration tests: start `thinline serve`, run real
//! clients. Helpers other test crates need too (tool checks, servers, fixtures, proxies)
//! are in the `thinline-test-support` crate and re-exported here where tests expect them.
//!
//! Tools a test needs are checked with [`require`]: outside CI a missing tool skips the
//! test with a message; with `CI=true` it fails, because the test command installs
//! everything (tests/scripts/install-deps.sh).

#![allow(dead_code)]

pub mod hostile_http;
pub mod hostile_nfs;
pub mod qemu_nbd;
pub mod wire;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

// Each test binary uses its own subset.
#[allow(unused_imports)]
pub use thinline_test_support::{require, run, signal, skip, spawn, stdout, wait_timeout, which};

/// The bytes a JSON map covers (`nbdinfo --map --json`, `thinline image map --json`):
/// the sum of its entries' lengths.
pub fn mapped_length(map: &serde_json::Value) -> u64 {
    map.as_array()
        .unwrap()
        .iter()
        .map(|e| e["length"].as_u64().unwrap())
        .sum()
}

/// A new temporary directory and what `make` made in it (fixtures).
pub fn in_tempdir<T>(make: impl FnOnce(&Path) -> T) -> (tempfile::TempDir, T) {
    let dir = tempfile::tempdir().unwrap();
    let made = make(dir.path());
    (dir, made)
}

/// A temporary directory with a sparse raw image in it.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub image: PathBuf,
    pub size: u64,
}

impl Fixture {
    /// A sparse image of `size` bytes with a pattern written at a few places.
    pub fn new(size: u64) -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("disk.img");
        let f = std::fs::File::create(&image).unwrap();
        f.set_len(size).unwrap();
        use std::os::unix::fs::FileExt;
        for (i, (off, _)) in data_ranges(size).into_iter().enumerate() {
            let block: Vec<u8> = (0..65536u32)
                .map(|x| (x as u8) ^ (i as u8 * 37 + 1))
                .collect();
            f.write_all_at(&block, off).unwrap();
        }
        Fixture { dir, image, size }
    }

    /// Where `new` wrote data: `(offset, length)`, 64 KiB each.
    pub fn data_ranges(&self) -> Vec<(u64, u64)> {
        data_ranges(self.size)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn data_ranges(size: u64) -> Vec<(u64, u64)> {
    vec![
        (0, 65536),
        ((size / 3) & !0xffff, 65536),
        (size - 65536, 65536),
    ]
}

/// A running `thinline serve`.
pub struct Served {
    pub child: Child,
    pub socket: Option<PathBuf>,
    pub tcp: Option<String>,
    /// The server's stderr (logs), collected in the background.
    pub log: Arc<Mutex<String>>,
    /// What it printed with --json once listening.
    pub report: serde_json::Value,
}

pub fn thinline() -> &'static str {
    env!("CARGO_BIN_EXE_thinline")
}

impl Served {
    /// Starts `thinline serve --json ARGS` and waits until it listens.
    pub fn start(args: &[&str]) -> Served {
        Served::start_env(args, &[])
    }

    /// [`Served::start`] with extra environment variables.
    pub fn start_env(args: &[&str], env: &[(&str, &str)]) -> Served {
        Served::spawn("serve", args, env)
    }

    /// Starts `thinline SUBCOMMAND --json ARGS` (`serve` or `proxy`) and waits until it
    /// listens (its first line on stdout, kept in `report`).
    pub fn spawn(subcommand: &str, args: &[&str], env: &[(&str, &str)]) -> Served {
        Served::try_spawn(subcommand, args, env).unwrap_or_else(|why| panic!("{why}"))
    }

    /// [`Served::spawn`], or what the server said (its exit status and log) when it
    /// exited before listening.
    pub fn try_spawn(
        subcommand: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Served, String> {
        let mut child = spawn(
            Command::new(thinline())
                .arg(subcommand)
                .arg("--json")
                .args(args)
                .env("RUST_LOG", "debug")
                .envs(env.iter().copied()),
            Stdio::piped(),
            Stdio::piped(),
        );
        let log = Arc::new(Mutex::new(String::new()));
        let mut stderr = child.stderr.take().unwrap();
        let sink = Arc::clone(&log);
        let log_reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        if line.is_empty() {
            let status = child.wait().unwrap();
            // The log thread ends at the end of the process's stderr.
            let _ = log_reader.join();
            return Err(format!(
                "thinline {subcommand} exited ({status}) before listening:\n{}",
                log.lock().unwrap()
            ));
        }
        let report: serde_json::Value =
            serde_json::from_str(&line).expect("--json prints one JSON line");
        let mut socket = None;
        let mut tcp = None;
        for l in report["listening"].as_array().unwrap() {
            let l = l.as_str().unwrap();
            if l.starts_with('/') {
                socket = Some(PathBuf::from(l));
            } else {
                tcp = Some(l.to_owned());
            }
        }
        Ok(Served {
            child,
            socket,
            tcp,
            log,
            report,
        })
    }

    /// Serves `image` on a unix socket in `dir` with extra args.
    pub fn unix(dir: &Path, extra: &[&str], images: &[&str]) -> Served {
        let sock = dir.join("nbd.sock");
        let mut args = vec!["--socket", sock.to_str().unwrap()];
        args.extend_from_slice(extra);
        args.extend_from_slice(images);
        Served::start(&args)
    }

    /// Serves on TCP on a loopback port the kernel chooses when the server binds (read
    /// back from its report), so servers started in parallel cannot race for one.
    pub fn tcp(extra: &[&str], images: &[&str]) -> Served {
        let mut args = vec!["--listen", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        args.extend_from_slice(images);
        Served::start(&args)
    }

    /// NBD URI of `export` on the unix socket (or TCP if there is no socket).
    pub fn uri(&self, export: &str) -> String {
        match (&self.socket, &self.tcp) {
            (Some(s), _) => format!("nbd+unix:///{export}?socket={}", s.display()),
            (None, Some(t)) => format!("nbd://{t}/{export}"),
            _ => unreachable!(),
        }
    }

    pub fn tcp_uri(&self, export: &str) -> String {
        format!(
            "nbd://{}/{export}",
            self.tcp.as_ref().expect("listening on TCP")
        )
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Sends SIGTERM and returns the exit status (waiting at most `timeout`).
    pub fn terminate(&mut self, timeout: Duration) -> std::process::ExitStatus {
        signal(&self.child, libc::SIGTERM);
        wait_timeout(&mut self.child, timeout).unwrap_or_else(|| {
            let _ = self.child.kill();
            panic!(
                "thinline did not exit within {timeout:?} of SIGTERM:\n{}",
                self.log()
            );
        })
    }

    /// Waits for a log line containing `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if self.log().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Asserts that a log line containing `needle` appears within `timeout`; a failure
    /// shows the log.
    pub fn assert_logs(&self, needle: &str, timeout: Duration) {
        assert!(
            self.wait_for_log(needle, timeout),
            "no {needle:?} in the log:\n{}",
            self.log()
        );
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs an `nbdsh` script (libnbd's Python shell) with `URI` defined. nbdsh runs
/// `python3 -m nbd`, so Debian's python (with the bindings) must come first on PATH.
pub fn nbdsh(uri: &str, script: &str) -> String {
    let program = format!("URI = {uri:?}\n{script}\n");
    let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
    stdout(
        Command::new("nbdsh")
            .env("PATH", path)
            .arg("-c")
            .arg(program),
    )
}

/// Runs `qemu-io -f raw URI -c CMD…` (every command on one connection) and asserts that
/// none of them failed: qemu-io exits with 0 even when a read does not match its pattern.
/// Returns its output.
pub fn qemu_io_raw(uri: &str, cmds: &[&str]) -> String {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", uri]);
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    let out = String::from_utf8(run(&mut cmd).stdout).unwrap();
    assert!(!out.contains("failed"), "{out}");
    out
}

pub fn has_python_nbd() -> bool {
    if Command::new("/usr/bin/python3")
        .args(["-c", "import nbd"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return true;
    }
    skip("python3-libnbd is missing: run tests/scripts/install-deps.sh as root")
}

/// Resident set size of a process in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A test CA and a server certificate it signed for localhost and 127.0.0.1, made by
/// openssl in `dir` with P-256 keys (fast to make): `ca-cert.pem`, `server-cert.pem` and
/// `server-key.pem` (mode 0600, as `--tls-key` wants it).
pub fn tls_certificates(dir: &Path) {
    let out = run(Command::new("sh")
        .arg("-ec")
        .arg(
            "key='-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes'
            openssl req -x509 $key -keyout ca-key.pem -out ca-cert.pem -days 30 \\
              -subj '/CN=thinline test CA' 2>/dev/null
            openssl req $key -keyout server-key.pem -out server.csr -subj '/CN=localhost' \\
              2>/dev/null
            printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\\n' >server.ext
            openssl x509 -req -in server.csr -CA ca-cert.pem -CAkey ca-key.pem \\
              -CAcreateserial -out server-cert.pem -days 30 -extfile server.ext 2>/dev/null
            chmod 600 server-key.pem",
        )
        .current_dir(dir));
    assert!(out.status.success(), "{out:?}");
}

/// Creates (or truncates) `path` as a file of `size` bytes that is all hole.
pub fn sparse_file(path: &Path, size: u64) {
    std::fs::File::create(path).unwrap().set_len(size).unwrap();
}

pub fn read_file(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

/// A tmpfs mounted for one test, unmounted on drop.
pub struct SmallFs(pub PathBuf);

impl SmallFs {
    pub fn mount(dir: &Path, size: &str) -> Option<SmallFs> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let msg = "cannot mount a tmpfs (the ENOSPC test needs root)";
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("{msg}");
            }
            eprintln!("SKIP: {msg}");
            return None;
        }
        Some(SmallFs(dir.to_owned()))
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Scrapes `http://ADDRESS/metrics` and parses it with the Prometheus project's Python
/// parser (an independent one): each sample as `name{label="value",…}` (labels sorted)
/// with its value. `None` when the parser is not installed (outside CI: a skip).
pub fn scrape(address: &str) -> Option<std::collections::BTreeMap<String, f64>> {
    const PARSE: &str = r#"
import json, sys, urllib.request
from prometheus_client.parser import text_string_to_metric_families
with urllib.request.urlopen("http://" + sys.argv[1] + "/metrics") as r:
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain; version=0.0.4"), r.headers
    text = r.read().decode()
out = {}
for family in text_string_to_metric_families(text):
    for s in family.samples:
        labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
        out[f"{s.name}{{{labels}}}"] = s.value
print(json.dumps(out))
"#;
    let probe = Command::new("/usr/bin/python3")
        .args(["-c", "import prometheus_client"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        skip("python3-prometheus-client is missing: run tests/scripts/install-deps.sh");
        return None;
    }
    let out = run(Command::new("/usr/bin/python3").args(["-c", PARSE, address]));
    assert!(out.status.success(), "{out:?}");
    Some(serde_json::from_slice(&out.stdout).unwrap())
}
