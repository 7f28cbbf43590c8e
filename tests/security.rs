//! Thinline against attackers: a template's author (names inside an image), a guest
//! (the bytes of its own disk), a hostile HTTP server (bodies, sizes, redirects) and
//! another local user (sockets, argv). Each test reproduces a hole found in a review
//! and asserts it stays closed; the cache's cases are in `tests/cor.rs`.

mod common;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::hostile_http::{self, HostileHttp, Next};
use common::{Served, nbdsh, require};
use thinline_test_support::qemu::qemu_img;

/// What a finished `thinline` run printed.
struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    took: Duration,
}

impl Run {
    /// Asserts that thinline failed and that its stderr says `words`.
    fn assert_failed_saying(&self, words: &str) {
        assert!(!self.status.success(), "{}", self.stdout);
        assert!(
            self.stderr.contains(words),
            "{words:?} missing from:\n{}",
            self.stderr
        );
    }
}

/// Runs `thinline ARGS` and kills it (failing the test) if it runs longer than `limit`:
/// every case here must end on its own, quickly.
fn thinline_within(limit: Duration, args: &[&str], env: &[(&str, &str)]) -> Run {
    let started = Instant::now();
    let mut child = common::spawn(
        Command::new(common::thinline())
            .args(args)
            .envs(env.iter().copied()),
        Stdio::piped(),
        Stdio::piped(),
    );
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let Some(status) = common::wait_timeout(&mut child, limit) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "thinline {args:?} still ran after {limit:?}:\n{}",
            err.join().unwrap()
        );
    };
    Run {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
        took: started.elapsed(),
    }
}

/// A qcow2 overlay of `size` bytes whose backing file is named `backing` (raw), made
/// without opening the backing, as an attacker would.
fn overlay_naming(dir: &Path, backing: &str, size: &str) -> Vec<u8> {
    qemu_img(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            backing,
            "-F",
            "raw",
            "top.qcow2",
            size,
        ],
    );
    std::fs::read(dir.join("top.qcow2")).unwrap()
}

// ---------------------------------------------------------------------------------------
// Names inside a template
// ---------------------------------------------------------------------------------------

#[test]
fn backing_names_that_leave_the_templates_origin_are_refused_and_the_other_host_gets_nothing() {
    if !require(&["qemu-img"]) {
        return;
    }
    let other = HostileHttp::start(|_, s| hostile_http::status(s, 404, "Not Found"));
    let dir = tempfile::tempdir().unwrap();
    let b = other.port;
    for (backing, reason) in [
        (format!("//127.0.0.1:{b}/base.raw"), "network-path"),
        (format!("\\\\127.0.0.1:{b}\\base.raw"), "backslash"),
        (format!("https:127.0.0.1:{b}/base.raw"), "scheme"),
        (format!("http:/127.0.0.1:{b}/base.raw"), "scheme"),
        ("../../base.raw".to_owned(), "climbs above"),
    ] {
        let top = overlay_naming(dir.path(), &backing, "1M");
        let template = HostileHttp::files(BTreeMap::from([("/t/top.qcow2".to_owned(), top)]));
        let uri = format!(
            "http://alice:pw-of-alice@127.0.0.1:{}/t/top.qcow2",
            template.port
        );
        let run = thinline_within(Duration::from_secs(30), &["image", "info", &uri], &[]);
        assert!(!run.status.success(), "{backing}: {}", run.stdout);
        assert!(
            run.stderr.contains("refusing the related name") && run.stderr.contains(reason),
            "{backing}: {}",
            run.stderr
        );
        assert!(!run.stderr.contains("pw-of-alice"), "{}", run.stderr);
        // Only the template itself was asked for, with alice's credentials.
        assert!(
            template
                .requests()
                .iter()
                .all(|r| r.path() == "/t/top.qcow2"),
            "{:?}",
            template.requests()
        );
    }
    assert_eq!(other.connections(), 0, "{:?}", other.requests());
}

#[test]
fn backing_names_inside_the_origin_are_followed_with_the_templates_credentials() {
    if !require(&["qemu-img"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(dir.path().join("base.raw"), &base).unwrap();
    let top = overlay_naming(dir.path(), "../b/base.raw", "1M");
    let server = HostileHttp::files(BTreeMap::from([
        ("/t/top.qcow2".to_owned(), top),
        ("/b/base.raw".to_owned(), base),
    ]));
    let uri = format!("http://alice:pw@127.0.0.1:{}/t/top.qcow2", server.port);
    let run = thinline_within(
        Duration::from_secs(30),
        &["image", "info", "--json", &uri],
        &[],
    );
    assert!(run.status.success(), "{}", run.stderr);
    let requests = server.requests();
    assert!(
        requests.iter().any(|r| r.path() == "/b/base.raw"),
        "{requests:?}"
    );
    // "alice:pw" in Basic authentication, on every request to the same origin.
    assert!(
        requests
            .iter()
            .all(|r| r.header("authorization") == Some("Basic YWxpY2U6cHc=")),
        "{requests:?}"
    );
}

#[test]
fn a_fifo_or_a_device_named_as_a_backing_file_is_refused_at_once() {
    if !require(&["qemu-img"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo reads a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    for (backing, what) in [
        ("fifo", "FIFO (named pipe)"),
        ("/dev/zero", "character device"),
    ] {
        overlay_naming(dir.path(), backing, "1M");
        let top = dir.path().join("top.qcow2");
        let run = thinline_within(
            Duration::from_secs(20),
            &["image", "info", top.to_str().unwrap()],
            &[],
        );
        assert!(!run.status.success());
        assert!(
            run.stderr.contains(&format!("{what}, not a regular file")),
            "{backing}: {}",
            run.stderr
        );
    }
    // Named on the command line, a FIFO is refused the same way, without blocking.
    let run = thinline_within(
        Duration::from_secs(20),
        &[
            "serve",
            "--format",
            "raw",
            "--socket",
            dir.path().join("s").to_str().unwrap(),
            fifo.to_str().unwrap(),
        ],
        &[],
    );
    run.assert_failed_saying("FIFO");
}

// ---------------------------------------------------------------------------------------
// A guest's own bytes
// ---------------------------------------------------------------------------------------

#[test]
fn a_guest_cannot_turn_a_probed_raw_image_into_another_format() {
    if !require(&["nbdsh", "qemu-img"]) || !common::has_python_nbd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    common::sparse_file(&disk, 4 << 20);
    // The header of a qcow2 whose backing file is a host file.
    let header = overlay_naming(dir.path(), "/etc/passwd", "4M");
    std::fs::write(dir.path().join("header"), &header[..4096]).unwrap();
    let header = dir.path().join("header");
    let sock = dir.path().join("s");
    let args = ["--socket", sock.to_str().unwrap(), disk.to_str().unwrap()];
    let served = Served::start(&args);
    let out = nbdsh(
        &served.uri(""),
        &format!(
            r##"
h.connect_uri(URI)
def refused(data, offset):
    try:
        h.pwrite(data, offset)
    except nbd.Error as e:
        assert "EPERM" in str(e), e
        return True
    return False
header = open({header:?}, "rb").read()
size = h.get_size()
print("qcow2", refused(header, 0))
print("vmdk", refused(b"KDMV" + bytes(508), 0))
print("descriptor", refused(b"# Disk DescriptorFile\n", 0))
print("vhd footer", refused(b"conectix", size - 512))
print("luks", refused(b"LUKS\xba\xbe", 0))
# Two writes that each look harmless and together form the signature.
print("first half", refused(b"QF", 0))
print("second half", refused(b"I\xfb", 2))
# Ordinary writes to the same sectors go through.
print("boot sector", refused(b"\xeb\x63\x90" + bytes(509), 0))
print("last sector", refused(bytes(range(256)) * 2, size - 512))
"##
        ),
    );
    for (what, refused) in [
        ("qcow2", true),
        ("vmdk", true),
        ("descriptor", true),
        ("vhd footer", true),
        ("luks", true),
        ("first half", false),
        ("second half", true),
        ("boot sector", false),
        ("last sector", false),
    ] {
        assert!(
            out.contains(&format!(
                "{what} {}",
                if refused { "True" } else { "False" }
            )),
            "{what}: {out}"
        );
    }
    // Logged before the refusal was answered; the log reaches the test through a pipe.
    served.assert_logs("refused a write", Duration::from_secs(10));
    drop(served);
    // Restarted with the same command line, it is still the raw disk it was.
    let again = Served::start(&args);
    assert_eq!(
        again.report["exports"][0]["format"], "raw",
        "{}",
        again.report
    );
    drop(again);
    // Given --format raw, the operator allows any bytes.
    let mut forced = args.to_vec();
    forced.insert(0, "--format=raw");
    let served = Served::start(&forced);
    let out = nbdsh(
        &served.uri(""),
        &format!(
            "h.connect_uri(URI)\nh.pwrite(open({header:?}, 'rb').read(), 0)\nprint('written')"
        ),
    );
    assert!(out.contains("written"), "{out}");
}

// ---------------------------------------------------------------------------------------
// A hostile HTTP server
// ---------------------------------------------------------------------------------------

#[test]
fn an_endless_body_to_the_opening_probe_fails_the_open_at_once() {
    let server = HostileHttp::start(|req, s| hostile_http::endless_body(s, req, 1 << 20, 1 << 30));
    let run = thinline_within(
        Duration::from_secs(20),
        &["image", "info", &server.url("/t.raw")],
        &[],
    );
    run.assert_failed_saying("longer than the 1 bytes asked for");
}

#[test]
fn a_probe_body_that_never_arrives_fails_the_open_at_the_idle_timeout() {
    let server = HostileHttp::start(|req, s| {
        use std::io::Write;
        let (a, b) = req.range().unwrap_or((0, 0));
        write!(
            s,
            "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {a}-{b}/1048576\r\nContent-Length: 1\r\n\r\n"
        )?;
        std::thread::sleep(Duration::from_secs(15));
        Ok(Next::Close)
    });
    let run = thinline_within(
        Duration::from_secs(12),
        &[
            "image",
            "info",
            "--idle-timeout",
            "1",
            "--retries",
            "0",
            &server.url("/t.raw"),
        ],
        &[],
    );
    run.assert_failed_saying("stalled");
}

#[test]
fn a_trickling_body_fails_at_the_min_rate_deadline() {
    let data: Vec<u8> = (0..65536u32).map(|i| i as u8).collect();
    let server = HostileHttp::start(move |req, s| {
        if req.range() == Some((0, 0)) {
            hostile_http::range_response(s, req, &data)
        } else {
            // One byte every 50 ms: never idle for a second, and 55 minutes for 64 KiB.
            hostile_http::trickle(s, req, &data, Duration::from_millis(50))
        }
    });
    let run = thinline_within(
        Duration::from_secs(20),
        &[
            "image",
            "info",
            "--min-rate",
            "64K",
            "--first-byte-timeout",
            "2",
            "--retries",
            "0",
            &server.url("/t.raw"),
        ],
        &[],
    );
    run.assert_failed_saying("arrived too slowly");
    assert!(run.stderr.contains("--min-rate"), "{}", run.stderr);
    // The deadline is 2 s plus 64 KiB at 64 KiB/s.
    assert!(run.took >= Duration::from_secs(3), "{:?}", run.took);
}

#[test]
fn objects_larger_than_the_largest_file_are_refused_at_open() {
    let server = HostileHttp::start(|req, s| {
        use std::io::Write;
        let (a, b) = req.range().unwrap_or((0, 0));
        write!(
            s,
            "HTTP/1.1 206 Partial Content\r\nETag: \"v1\"\r\nContent-Range: bytes {a}-{b}/{}\r\nContent-Length: {}\r\n\r\n",
            u64::MAX,
            b - a + 1
        )?;
        s.write_all(&vec![0u8; (b - a + 1) as usize])?;
        Ok(Next::KeepAlive)
    });
    let run = thinline_within(
        Duration::from_secs(20),
        &["image", "info", "--json", &server.url("/huge.raw")],
        &[],
    );
    run.assert_failed_saying("more than the largest size");
}

#[test]
fn redirects_leave_the_origin_only_to_allowed_hosts_and_never_carry_credentials_or_referer() {
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 253) as u8).collect();
    let elsewhere = HostileHttp::files(BTreeMap::from([("/t.raw".to_owned(), data.clone())]));
    let target = elsewhere.url("/t.raw");
    let origin = HostileHttp::start(move |req, s| match req.path() {
        // A same-origin hop first, from a pre-signed URL, then away.
        "/signed" => hostile_http::redirect(s, "/away"),
        "/away" => hostile_http::redirect(s, &target),
        _ => hostile_http::status(s, 404, "Not Found"),
    });
    let uri = format!(
        "http://alice:pw@127.0.0.1:{}/signed?X-Amz-Signature=secret-sig",
        origin.port
    );
    let run = thinline_within(Duration::from_secs(20), &["image", "info", &uri], &[]);
    assert!(!run.status.success());
    assert!(
        run.stderr.contains("redirect to another origin")
            && run.stderr.contains("--allow-redirect"),
        "{}",
        run.stderr
    );
    assert_eq!(elsewhere.connections(), 0);
    // The same-origin hop was followed, without a Referer (which would carry the query).
    let hops = origin.requests();
    assert!(hops.iter().any(|r| r.path() == "/away"), "{hops:?}");
    assert!(
        hops.iter().all(|r| r.header("referer").is_none()),
        "{hops:?}"
    );
    assert!(!run.stderr.contains("secret-sig") && !run.stderr.contains(":pw"));

    // Allowed by name, the other host serves the object, without alice's credentials.
    let allowed = format!("127.0.0.1:{}", elsewhere.port);
    let run = thinline_within(
        Duration::from_secs(20),
        &[
            "image",
            "info",
            "--json",
            "--allow-redirect",
            &allowed,
            &uri,
        ],
        &[],
    );
    assert!(run.status.success(), "{}", run.stderr);
    let there = elsewhere.requests();
    assert!(!there.is_empty());
    assert!(
        there
            .iter()
            .all(|r| r.header("authorization").is_none() && r.header("referer").is_none()),
        "{there:?}"
    );
}

#[test]
fn passwords_never_appear_in_errors_whatever_characters_they_hold() {
    for password in ["pa/ss-word", "pa?ss-word", "pa#ss-word"] {
        let uri = format!("http://alice:{password}@127.0.0.1:9/t.raw");
        let run = thinline_within(
            Duration::from_secs(20),
            &[
                "image",
                "info",
                "--connect-timeout",
                "1",
                "--retries",
                "0",
                &uri,
            ],
            &[],
        );
        assert!(!run.status.success());
        assert!(!run.stderr.contains("ss-word"), "{}", run.stderr);
    }
}

#[test]
fn netrc_credentials_authenticate_without_the_command_line_and_loose_files_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    let data = vec![7u8; 1 << 20];
    let server = HostileHttp::start(move |req, s| {
        // "alice:s3cr/t?#" in Basic authentication.
        if req.header("authorization") == Some("Basic YWxpY2U6czNjci90PyM=") {
            hostile_http::range_response(s, req, &data)
        } else {
            hostile_http::status(s, 401, "Unauthorized")
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let netrc = dir.path().join("netrc");
    std::fs::write(&netrc, "machine 127.0.0.1 login alice password s3cr/t?#\n").unwrap();
    std::fs::set_permissions(&netrc, std::fs::Permissions::from_mode(0o600)).unwrap();
    let url = server.url("/t.raw");
    let info = ["image", "info", "--json", url.as_str()];
    let denied = thinline_within(Duration::from_secs(20), &info, &[]);
    denied.assert_failed_saying("401");
    let run = thinline_within(
        Duration::from_secs(20),
        &info,
        &[("THINLINE_NETRC_FILE", netrc.to_str().unwrap())],
    );
    assert!(run.status.success(), "{}", run.stderr);
    std::fs::set_permissions(&netrc, std::fs::Permissions::from_mode(0o644)).unwrap();
    let loose = thinline_within(
        Duration::from_secs(20),
        &[
            "image",
            "info",
            "--netrc-file",
            netrc.to_str().unwrap(),
            &url,
        ],
        &[],
    );
    loose.assert_failed_saying("chmod 600");
}

// ---------------------------------------------------------------------------------------
// Other local users
// ---------------------------------------------------------------------------------------

#[test]
fn sockets_never_have_more_than_mode_0660_whatever_the_umask() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    common::sparse_file(&image, 1 << 20);
    let (sock, status) = (dir.path().join("nbd.sock"), dir.path().join("status.sock"));
    // Watch both paths from before the daemon starts: every mode ever seen must be 0660.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (sock, status, stop) = (sock.clone(), status.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut seen = std::collections::BTreeSet::new();
            let mut last = false;
            while !last {
                // One more look after the daemon said it listens.
                last = stop.load(std::sync::atomic::Ordering::SeqCst);
                for p in [&sock, &status] {
                    if let Ok(m) = std::fs::symlink_metadata(p)
                        && m.file_type().is_socket()
                    {
                        seen.insert((p.clone(), m.permissions().mode() & 0o777));
                    }
                }
            }
            seen
        })
    };
    let cmd = format!(
        "umask 000; exec {} serve --json --socket {} --cache-dir {} --status-socket {} {}",
        common::thinline(),
        sock.display(),
        dir.path().join("cache").display(),
        status.display(),
        image.display()
    );
    let mut child = Command::new("sh")
        .args(["-c", &cmd])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert!(line.contains("listening"), "{line}");
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let seen = watcher.join().unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let modes: Vec<u32> = seen.iter().map(|(_, m)| *m).collect();
    assert!(seen.iter().any(|(p, _)| *p == sock), "{seen:?}");
    assert!(seen.iter().any(|(p, _)| *p == status), "{seen:?}");
    assert!(modes.iter().all(|m| *m == 0o660), "{seen:?}");
}

#[test]
fn a_sample_image_planted_by_another_user_is_never_served() {
    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    std::os::unix::fs::symlink(&victim, tmp.join("thinline-sample.img")).unwrap();
    let sock = dir.path().join("s");
    let run = thinline_within(
        Duration::from_secs(20),
        &["serve", "--socket", sock.to_str().unwrap()],
        &[("TMPDIR", tmp.to_str().unwrap())],
    );
    run.assert_failed_saying("not a regular file owned by this user");
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    // Without anything planted, the sample is made private to its owner.
    std::fs::remove_file(tmp.join("thinline-sample.img")).unwrap();
    let mut served = Served::start_env(
        &["--socket", sock.to_str().unwrap()],
        &[("TMPDIR", tmp.to_str().unwrap())],
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(tmp.join("thinline-sample.img"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(served.terminate(Duration::from_secs(10)).success());
}
