//! The copy-on-read proxy (`thinline proxy`) and cache (`thinline serve --cache-dir`)
//! against real components: nbdkit as the upstream (its log filter counts every read
//! that reaches it, its error filter fails reads on demand, its delay filter adds
//! latency), libnbd clients, nbdcopy, nbdinfo, nginx, a tmpfs that fills up.

mod common;

use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Served, SmallFs, has_python_nbd, require, run, thinline};

const MIB: u64 = 1 << 20;
const CHUNK: u64 = 64 * 1024;

/// A template: random data in some places, holes elsewhere. Returns its bytes.
fn template(path: &Path, size: u64, data: &[(u64, u64)]) -> Vec<u8> {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut bytes = vec![0u8; size as usize];
    let mut random = std::fs::File::open("/dev/urandom").unwrap();
    for &(off, len) in data {
        let slot = &mut bytes[off as usize..(off + len) as usize];
        random.read_exact(slot).unwrap();
        f.write_all_at(slot, off).unwrap();
    }
    bytes
}

/// nbdkit serving a file, with its log filter outermost (every read is logged).
struct Nbdkit {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
    /// The command, to start it again.
    args: Vec<String>,
}

impl Nbdkit {
    /// `nbdkit --filter=log [FILTERS] file IMAGE [PARAMS]`.
    fn start(dir: &Path, image: &Path, filters: &[&str], params: &[&str]) -> Nbdkit {
        let socket = dir.join("upstream.sock");
        let log = dir.join("upstream.log");
        let mut args: Vec<String> = vec!["-f".into(), "--exit-with-parent".into(), "-U".into()];
        args.push(socket.display().to_string());
        args.push("--filter=log".into());
        args.extend(filters.iter().map(|f| format!("--filter={f}")));
        args.extend(["file".to_owned(), image.display().to_string()]);
        args.push(format!("logfile={}", log.display()));
        // Restarts append to the same log, so every read stays counted.
        args.push("logappend=true".into());
        args.extend(params.iter().map(|p| p.to_string()));
        let child = Nbdkit::spawn(&socket, &args);
        Nbdkit {
            child,
            socket,
            log,
            args,
        }
    }

    fn spawn(socket: &Path, args: &[String]) -> Child {
        let _ = std::fs::remove_file(socket);
        let child = common::spawn(
            Command::new("nbdkit").args(args),
            Stdio::null(),
            Stdio::inherit(),
        );
        let start = Instant::now();
        while !socket.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "nbdkit did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        child
    }

    /// Starts nbdkit again if it died: nbdkit 1.32 sometimes aborts (an assertion in
    /// connections.c) when a client vanishes with requests in flight, as a killed proxy
    /// does.
    fn keep_running(&mut self) {
        // The abort comes shortly after the client goes: give it the time to show.
        std::thread::sleep(Duration::from_millis(300));
        let answers = std::os::unix::net::UnixStream::connect(&self.socket).is_ok();
        if self.child.try_wait().unwrap().is_some() || !answers {
            let _ = self.child.kill();
            let _ = self.child.wait();
            self.child = Nbdkit::spawn(&self.socket, &self.args);
        }
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    /// Every read that reached nbdkit so far: `(offset, length)`.
    fn reads(&self) -> Vec<(u64, u64)> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines()
            .filter(|l| l.contains(" Read id=") && !l.contains("...Read"))
            .map(|l| {
                let field = |name: &str| {
                    let v = l
                        .split(name)
                        .nth(1)
                        .unwrap()
                        .split_whitespace()
                        .next()
                        .unwrap();
                    u64::from_str_radix(v.trim_start_matches("0x"), 16).unwrap()
                };
                (field("offset="), field("count="))
            })
            .collect()
    }
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The arguments of `thinline proxy` after the subcommand: `--upstream UPSTREAM --cache
/// CACHE --socket SOCKET EXTRA…`.
fn proxy_args<'a>(
    upstream: &'a str,
    cache: &'a Path,
    socket: &'a Path,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec![
        "--upstream",
        upstream,
        "--cache",
        cache.to_str().unwrap(),
        "--socket",
        socket.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    args
}

/// Starts `thinline proxy --json --upstream UPSTREAM --cache CACHE --socket
/// DIR/proxy.sock EXTRA`.
fn proxy(dir: &Path, upstream: &str, cache: &Path, extra: &[&str]) -> Served {
    let socket = dir.join("proxy.sock");
    Served::spawn("proxy", &proxy_args(upstream, cache, &socket, extra), &[])
}

/// Runs `thinline ARGS`, expecting failure; returns stderr.
fn fails(args: &[&str]) -> String {
    let out = Command::new(thinline())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "thinline {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `thinline proxy --upstream UPSTREAM --cache CACHE --socket DIR/refused.sock EXTRA`,
/// expecting failure; returns stderr.
fn proxy_fails(dir: &Path, upstream: &str, cache: &Path, extra: &[&str]) -> String {
    let socket = dir.join("refused.sock");
    let mut args = vec!["proxy"];
    args.extend(proxy_args(upstream, cache, &socket, extra));
    fails(&args)
}

/// `thinline proxy status --json SOCKET`: the one export's status.
fn status(socket: &Path) -> serde_json::Value {
    let out = run(Command::new(thinline())
        .args(["proxy", "status", "--json"])
        .arg(socket));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["exports"]
        .as_object()
        .unwrap()
        .values()
        .next()
        .unwrap()
        .clone()
}

/// Waits until the proxy has no upstream fetch in flight. Their presence marks may
/// still be queued: only a graceful stop (SIGTERM) waits for those.
fn settle(socket: &Path) {
    let start = Instant::now();
    while status(socket)["in_flight"] != 0 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "fetches still in flight: {}",
            status(socket)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads the whole export with nbdcopy.
fn read_all(uri: &str, dir: &Path) -> Vec<u8> {
    let out = dir.join("copy.raw");
    let _ = std::fs::remove_file(&out);
    run(Command::new("nbdcopy").arg(uri).arg(&out));
    let bytes = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    bytes
}

/// The presence map of a cache file, read from disk: one bool per chunk.
fn marked(cache: &Path, size: u64) -> Vec<bool> {
    let f = std::fs::File::open(cache).unwrap();
    let meta = size.div_ceil(MIB) * MIB;
    let chunks = size.div_ceil(CHUNK) as usize;
    let mut map = vec![0u8; chunks.div_ceil(8)];
    f.read_exact_at(&mut map, meta + 8192).unwrap();
    (0..chunks)
        .map(|i| map[i / 8] & (1 << (i % 8)) != 0)
        .collect()
}

/// True if `[off, off + len)` touches a chunk set in `map`.
fn touches(map: &[bool], off: u64, len: u64) -> bool {
    (off / CHUNK..(off + len).div_ceil(CHUNK)).any(|i| map[i as usize])
}

/// Random reads by several threads, each on its own connection, compared with the
/// template (libnbd in Python). With `tolerate_disconnect`, a lost server ends a thread
/// quietly (for kill -9 runs); a wrong byte never does.
const RANDOM_READER: &str = r#"
import nbd, random, sys, threading
uri, template, seed, count, threads, tolerate = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6] == "1"
data = open(template, "rb").read()
size = len(data)
bad = []
def worker(k):
    r = random.Random(seed * 1000 + k)
    try:
        h = nbd.NBD()
        h.connect_uri(uri)
        for _ in range(count):
            n = r.choice([512, 4096, 65536, 200000, 1 << 20, 3 << 20])
            off = r.randrange(0, size - n)
            got = h.pread(n, off)
            if got != data[off:off + n]:
                bad.append((off, n))
                return
        h.shutdown()
    except nbd.Error as e:
        if not tolerate:
            bad.append(str(e))
ts = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
for t in ts: t.start()
for t in ts: t.join()
if bad:
    print("MISMATCH", bad)
    sys.exit(1)
print("OK")
"#;

fn random_reader(
    uri: &str,
    template: &Path,
    seed: u32,
    count: u32,
    threads: u32,
    tolerate: bool,
) -> Command {
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.arg("-c")
        .arg(RANDOM_READER)
        .arg(uri)
        .arg(template)
        .arg(seed.to_string())
        .arg(count.to_string())
        .arg(threads.to_string())
        .arg(if tolerate { "1" } else { "0" });
    cmd
}

fn tools() -> bool {
    require(&["nbdkit", "nbdcopy", "nbdinfo", "nbdsh"]) && has_python_nbd()
}

/// A temp dir with a template `t.raw` of `size` bytes (random data at `data`), or
/// `None` when the test's tools are missing outside CI.
fn setup(size: u64, data: &[(u64, u64)]) -> Option<(tempfile::TempDir, PathBuf, Vec<u8>)> {
    if !tools() {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("t.raw");
    let bytes = template(&image, size, data);
    Some((dir, image, bytes))
}

#[test]
fn concurrent_clients_read_exactly_the_template_and_each_range_is_fetched_once() {
    let size = 48 * MIB;
    let data = [(0, 20 * MIB), (24 * MIB + 4096, 10 * MIB), (47 * MIB, MIB)];
    let Some((dir, image, bytes)) = setup(size, &data) else {
        return;
    };
    let up = Nbdkit::start(dir.path(), &image, &["delay"], &["rdelay=5ms"]);
    let p = proxy(dir.path(), &up.uri(), &dir.path().join("c.cache"), &[]);
    let uri = p.uri("");
    // Three processes of four threads each, plus nbdcopy's parallel connections.
    let mut readers: Vec<Child> = (0..3)
        .map(|seed| {
            random_reader(&uri, &image, seed, 60, 4, false)
                .spawn()
                .unwrap()
        })
        .collect();
    assert_eq!(
        read_all(&uri, dir.path()),
        bytes,
        "nbdcopy through the proxy"
    );
    for r in &mut readers {
        assert!(
            r.wait().unwrap().success(),
            "a random reader saw wrong bytes"
        );
    }
    // No byte was fetched twice: in-flight fetches are shared, fetched chunks marked.
    let mut reads = up.reads();
    reads.sort_unstable();
    for w in reads.windows(2) {
        assert!(
            w[0].0 + w[0].1 <= w[1].0,
            "upstream read {:?} overlaps {:?}",
            w[0],
            w[1]
        );
    }
    // Holes were never read: everything fetched lies in the data ranges' chunks.
    let fetched: u64 = reads.iter().map(|r| r.1).sum();
    assert!(
        fetched <= 31 * MIB + 2 * CHUNK,
        "fetched {fetched} bytes of 31 MiB of data"
    );
    let s = status(&p.socket.clone().unwrap());
    assert_eq!(s["chunks_present"], s["chunks"], "{s}");
    assert_eq!(s["complete"], true, "{s}");
}

#[test]
fn kill_9_while_fetching_never_serves_an_unmarked_chunk_or_refetches_a_marked_one() {
    let size = 64 * MIB;
    let Some((dir, image, bytes)) = setup(size, &[(0, 60 * MIB)]) else {
        return;
    };
    let cache = dir.path().join("c.cache");
    // No delay filter here: nbdkit 1.32 aborts when a client vanishes during a delay.
    let mut up = Nbdkit::start(dir.path(), &image, &[], &[]);
    let mut previous = vec![false; size.div_ceil(CHUNK) as usize];
    let mut seen_reads = 0;
    for round in 0..6u32 {
        up.keep_running();
        let mut p = proxy(dir.path(), &up.uri(), &cache, &[]);
        let mut reader = random_reader(&p.uri(""), &image, round, 400, 4, true)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(150 + 120 * u64::from(round)));
        p.child.kill().unwrap();
        p.child.wait().unwrap();
        assert!(
            reader.wait().unwrap().success(),
            "round {round}: a reader saw wrong bytes"
        );
        // The upstream never saw a read of a chunk marked before this round.
        let reads = up.reads();
        for &(off, len) in &reads[seen_reads..] {
            assert!(
                !touches(&previous, off, len),
                "round {round}: marked range {off}+{len} fetched again"
            );
        }
        seen_reads = reads.len();
        // Every marked chunk holds the template's bytes on disk...
        let now = marked(&cache, size);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&cache)
            .unwrap();
        let mut buf = vec![0u8; CHUNK as usize];
        for (i, &m) in now.iter().enumerate() {
            let off = i as u64 * CHUNK;
            if m {
                f.read_exact_at(&mut buf, off).unwrap();
                assert!(
                    buf[..] == bytes[off as usize..(off + CHUNK) as usize],
                    "round {round}: marked chunk {i} is wrong on disk"
                );
            } else {
                // ...and every unmarked one is scribbled over: serving it would show.
                f.write_all_at(&[0xee; CHUNK as usize], off).unwrap();
            }
        }
        assert!(
            now.iter().zip(&previous).all(|(n, p)| *n || !*p),
            "a mark was lost"
        );
        previous = now;
    }
    let marked_before = previous.iter().filter(|&&m| m).count();
    assert!(
        marked_before > 0,
        "no chunk was ever marked: the rounds were too short to test anything"
    );
    up.keep_running();
    let p = proxy(dir.path(), &up.uri(), &cache, &[]);
    assert_eq!(read_all(&p.uri(""), dir.path()), bytes);
    for &(off, len) in &up.reads()[seen_reads..] {
        assert!(
            !touches(&previous, off, len),
            "final run: marked range {off}+{len} fetched again"
        );
    }
}

#[test]
fn upstream_eio_reaches_the_client_marks_nothing_and_a_later_read_succeeds() {
    let Some((dir, image, bytes)) = setup(8 * MIB, &[(0, 8 * MIB)]) else {
        return;
    };
    let trigger = dir.path().join("fail-now");
    std::fs::write(&trigger, b"").unwrap();
    let up = Nbdkit::start(
        dir.path(),
        &image,
        &["error"],
        &[
            "error=EIO",
            "error-pread-rate=1",
            &format!("error-file={}", trigger.display()),
        ],
    );
    let p = proxy(
        dir.path(),
        &up.uri(),
        &dir.path().join("c.cache"),
        &["--retries", "1"],
    );
    let out = common::nbdsh(
        &p.uri(""),
        "h.connect_uri(URI)\ntry:\n    h.pread(4096, 2 << 20)\n    print('no error')\nexcept nbd.Error as e:\n    print('errno', e.errnum)",
    );
    assert_eq!(out.trim(), format!("errno {}", libc::EIO), "{}", p.log());
    let s = status(&p.socket.clone().unwrap());
    assert_eq!(s["chunks_present"], 0, "{s}");
    assert!(s["upstream_errors"].as_u64().unwrap() >= 1, "{s}");
    p.assert_logs("upstream read failed", Duration::from_secs(10));
    std::fs::remove_file(&trigger).unwrap();
    let out = common::nbdsh(
        &p.uri(""),
        "h.connect_uri(URI)\nimport hashlib\nprint(hashlib.sha256(h.pread(4096, 2 << 20)).hexdigest())",
    );
    let want = {
        use std::fmt::Write;
        let d = sha256(&bytes[2 << 20..(2 << 20) + 4096]);
        d.iter().fold(String::new(), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
    };
    assert_eq!(out.trim(), want);
    assert_eq!(read_all(&p.uri(""), dir.path()), bytes);
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// SHA-256 through coreutils (the tests crate has no hashing dependency).
fn sha256(data: &[u8]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("d");
    std::fs::write(&f, data).unwrap();
    let out = run(Command::new("sha256sum").arg(&f));
    let hex = String::from_utf8(out.stdout).unwrap();
    (0..32)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect()
}

#[test]
fn a_changed_template_gets_its_own_cache_in_a_cache_dir_and_the_proxy_refuses_another_version() {
    let Some((dir, image, bytes)) = setup(4 * MIB, &[(0, 4 * MIB)]) else {
        return;
    };
    let cache_dir = dir.path().join("cache");
    let socket = dir.path().join("s.sock");
    let serve = |extra: &[&str]| -> Vec<String> {
        let mut args = vec![
            "--socket",
            socket.to_str().unwrap(),
            "--cache-dir",
            cache_dir.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        args.push(image.to_str().unwrap());
        args.into_iter().map(str::to_owned).collect()
    };

    {
        let mut s = Served::start(&strs(&serve(&[])));
        assert!(s.report["exports"][0]["cache"].is_string(), "{}", s.report);
        assert_eq!(read_all(&s.uri(""), dir.path()), bytes);
        s.terminate(Duration::from_secs(20));
    }
    // The template changes (same size, new bytes and mtime).
    std::thread::sleep(Duration::from_millis(20));
    overwrite(&image, MIB, b"changed!");
    // With --cache-dir the new version gets a cache of its own; the old one is left,
    // and named in the log.
    let old: Vec<_> = std::fs::read_dir(&cache_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(old.len(), 1, "{old:?}");
    let mut s = Served::start(&strs(&serve(&[])));
    let now = std::fs::read(&image).unwrap();
    assert_ne!(now, bytes);
    assert_eq!(read_all(&s.uri(""), dir.path()), now);
    assert_ne!(s.report["exports"][0]["cache"], old[0].to_str().unwrap());
    s.assert_logs(old[0].to_str().unwrap(), Duration::from_secs(10));
    s.terminate(Duration::from_secs(20));
    assert_eq!(std::fs::read_dir(&cache_dir).unwrap().count(), 2);

    // The proxy: the same upstream under another --template-id is another version.
    let mut up = Nbdkit::start(dir.path(), &image, &[], &[]);
    let cache = dir.path().join("p.cache");
    drop(proxy(
        dir.path(),
        &up.uri(),
        &cache,
        &["--template-id", "v1"],
    ));
    up.keep_running();
    let err = proxy_fails(dir.path(), &up.uri(), &cache, &["--template-id", "v2"]);
    assert!(
        err.contains("another template or version") && err.contains("v1"),
        "{err}"
    );
}

/// `thinline proxy scrub ARGS`: exit code and stdout.
fn scrub(args: &[&str]) -> (i32, String) {
    let out = Command::new(thinline())
        .args(["proxy", "scrub"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let code = out.status.code().unwrap();
    assert!(
        code == 0 || code == 4,
        "scrub {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (code, stdout)
}

/// `thinline proxy scrub ARGS`; asserts that it exits with `code` and that its output
/// says `words`.
fn scrub_says(args: &[&str], code: i32, words: &str) {
    let (got, out) = scrub(args);
    assert_eq!(got, code, "{out}");
    assert!(out.contains(words), "{words:?} missing from:\n{out}");
}

/// Writes `bytes` at `offset` of the existing file `path`, in place.
fn overwrite(path: &Path, offset: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
}

#[test]
fn a_scribbled_chunk_is_fetched_again_after_a_restart_and_scrub_finds_and_repairs_it() {
    let size = 8 * MIB;
    let Some((dir, image, bytes)) = setup(size, &[(0, 8 * MIB)]) else {
        return;
    };
    let cache = dir.path().join("c.cache");
    let cache_s = cache.to_str().unwrap();
    let up = Nbdkit::start(dir.path(), &image, &[], &[]);
    let mut p = proxy(dir.path(), &up.uri(), &cache, &[]);
    assert_eq!(read_all(&p.uri(""), dir.path()), bytes);
    settle(&p.socket.clone().unwrap());
    // A scrub of a cache in use is refused, naming the holder.
    let err = fails(&["proxy", "scrub", cache_s]);
    assert!(
        err.contains("in use by") && err.contains("thinline proxy"),
        "{err}"
    );
    p.terminate(Duration::from_secs(20));
    scrub_says(&[cache_s], 0, "128 of 128 chunks present, 0 bad");

    // Bit rot in chunk 10 of the stopped proxy's cache.
    overwrite(&cache, 10 * CHUNK + 999, b"scribble");
    scrub_says(
        &[cache_s],
        4,
        &format!("bad chunk 10 at offset {}", 10 * CHUNK),
    );
    let (_, json) = scrub(&["--json", cache_s]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["bad"], serde_json::json!([[10, 10 * CHUNK]]), "{v}");

    // A restarted proxy serves the template's bytes and asks the upstream again.
    let before = up.reads().len();
    let mut p = proxy(dir.path(), &up.uri(), &cache, &[]);
    assert_eq!(read_all(&p.uri(""), dir.path()), bytes);
    let again = up.reads()[before..].to_vec();
    assert!(
        again
            .iter()
            .any(|&(o, l)| o <= 10 * CHUNK && 11 * CHUNK <= o + l),
        "chunk 10 was not fetched again: {again:?}"
    );
    assert!(
        again
            .iter()
            .all(|&(o, l)| o < 11 * CHUNK && 10 * CHUNK < o + l),
        "good chunks fetched again: {again:?}"
    );
    settle(&p.socket.clone().unwrap());
    let s = status(&p.socket.clone().unwrap());
    assert_eq!(s["checksum_errors"], 1, "{s}");
    p.assert_logs("does not match its checksum", Duration::from_secs(10));
    // A clean stop persists the presence mark of the chunk fetched again (a
    // kill -9 may lose it, which only costs a later fetch).
    p.terminate(Duration::from_secs(20));
    // The chunk fetched again is right on disk.
    scrub_says(&[cache_s], 0, "128 of 128 chunks present, 0 bad");

    // --repair forgets a bad chunk; the scrub after it is clean.
    overwrite(&cache, 77 * CHUNK, b"scribble");
    scrub_says(&["--repair", cache_s], 4, "bad chunk 77 at offset");
    scrub_says(&[cache_s], 0, "127 of 128 chunks present, 0 bad");
    assert!(!marked(&cache, size)[77] && marked(&cache, size)[76]);
}

#[test]
fn symlinked_and_foreign_caches_are_refused_with_discard_too_and_left_unchanged() {
    let Some((dir, image, _bytes)) = setup(2 * MIB, &[(0, MIB)]) else {
        return;
    };
    let up = Nbdkit::start(dir.path(), &image, &[], &[]);
    let victim = dir.path().join("victim");
    let content: Vec<u8> = (0..3 * MIB).map(|i| (i % 253) as u8).collect();
    std::fs::write(&victim, &content).unwrap();
    let link = dir.path().join("link.cache");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    for cache in [&link, &victim] {
        for mode in ["refuse", "discard"] {
            let err = proxy_fails(dir.path(), &up.uri(), cache, &["--cache-mismatch", mode]);
            let why = if cache == &link {
                "symbolic link to something other than a block device"
            } else {
                "not a Thinline cache"
            };
            assert!(err.contains(why), "{err}");
            assert!(std::fs::read(&victim).unwrap() == content, "victim changed");
        }
    }

    // serve --cache-dir: the directory is made private; a link planted at a cache's
    // name is refused.
    let cache_dir = dir.path().join("caches");
    let socket = dir.path().join("s.sock");
    let args = [
        "--socket",
        socket.to_str().unwrap(),
        "--cache-dir",
        cache_dir.to_str().unwrap(),
        "--cache-mismatch",
        "discard",
        image.to_str().unwrap(),
    ];
    let mut s = Served::start(&args);
    s.terminate(Duration::from_secs(20));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&cache_dir).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
    let name = std::fs::read_dir(&cache_dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::remove_file(&name).unwrap();
    std::os::unix::fs::symlink(&victim, &name).unwrap();
    let mut serve = vec!["serve"];
    serve.extend_from_slice(&args);
    let err = fails(&serve);
    assert!(err.contains("symbolic link"), "{err}");
    assert!(std::fs::read(&victim).unwrap() == content, "victim changed");
}

#[test]
fn a_second_proxy_on_the_same_cache_is_refused_naming_the_holder() {
    let Some((dir, image, _bytes)) = setup(2 * MIB, &[(0, MIB)]) else {
        return;
    };
    let up = Nbdkit::start(dir.path(), &image, &[], &[]);
    let cache = dir.path().join("c.cache");
    let first = proxy(dir.path(), &up.uri(), &cache, &[]);
    let err = proxy_fails(dir.path(), &up.uri(), &cache, &[]);
    assert!(
        err.contains("in use by")
            && err.contains(&format!("pid {}", first.pid()))
            && err.contains("thinline proxy"),
        "{err}"
    );
}

#[test]
fn a_second_clone_reads_what_the_first_fetched_without_upstream_traffic() {
    let Some((dir, image, bytes)) = setup(32 * MIB, &[(0, 32 * MIB)]) else {
        return;
    };
    let up = Nbdkit::start(dir.path(), &image, &[], &[]);
    let cache = dir.path().join("c.cache");
    let boot = "h.connect_uri(URI)\nfor off in [0, 5 << 20, 9 << 20, 17 << 20, (31 << 20) + 4096]:\n    h.pread(65536, off)\nprint('ok')";
    let mut p = proxy(dir.path(), &up.uri(), &cache, &[]);
    common::nbdsh(&p.uri(""), boot); // clone 1
    // Its reads also started fetches of neighbouring units: let them finish and be
    // marked present. A read of a unit not marked yet is a miss, and a miss fetches
    // around again (the width and the free slots may differ by then).
    let socket = p.socket.clone().unwrap();
    settle(&socket);
    let start = Instant::now();
    loop {
        let s = status(&socket);
        // All data: what was fetched is whole chunks of the template.
        if s["chunks_present"].as_u64().unwrap() * CHUNK
            == s["bytes_from_upstream"].as_u64().unwrap()
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "marks still queued: {s}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let after_first = up.reads().len();
    assert!(after_first > 0);
    common::nbdsh(&p.uri(""), boot); // clone 2, same blocks
    assert_eq!(
        up.reads().len(),
        after_first,
        "the second clone's reads went upstream"
    );
    // After a restart (warm cache) still nothing goes upstream for those blocks.
    p.terminate(Duration::from_secs(20));
    let p = proxy(dir.path(), &up.uri(), &cache, &[]);
    common::nbdsh(&p.uri(""), boot);
    assert_eq!(
        up.reads().len(),
        after_first,
        "the warm cache went upstream"
    );
    let s = status(&p.socket.clone().unwrap());
    assert_eq!(s["bytes_from_upstream"], 0, "{s}");
    assert_eq!(s["misses"], 0, "{s}");
    assert_eq!(read_all(&p.uri(""), dir.path()), bytes);
}

#[test]
fn the_export_is_read_only_and_allocation_depth_shows_hydration() {
    let Some((dir, image, _bytes)) = setup(8 * MIB, &[(0, 2 * MIB), (6 * MIB, MIB)]) else {
        return;
    };
    let up = Nbdkit::start(dir.path(), &image, &[], &[]);
    // No speculation: the map below must show exactly the unit the read fetched.
    let p = proxy(
        dir.path(),
        &up.uri(),
        &dir.path().join("c.cache"),
        &["--fetch-around", "0"],
    );
    let uri = p.uri("");
    let out = common::nbdsh(
        &uri,
        "h.set_strict_mode(0)\nh.connect_uri(URI)\nprint(h.is_read_only())\nfor op in (lambda: h.pwrite(b'x' * 4096, 0), lambda: h.trim(4096, 0), lambda: h.zero(4096, 0)):\n    try:\n        op()\n        print('allowed')\n    except nbd.Error as e:\n        print(e.errnum)",
    );
    let eperm = libc::EPERM.to_string();
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["True", &eperm, &eperm, &eperm],
        "{out}"
    );
    common::nbdsh(&uri, "h.connect_uri(URI)\nh.pread(4096, 0)");
    // Marks follow the data's fsync (batched): wait for the unit's 16 chunks.
    let socket = p.socket.clone().unwrap();
    let start = Instant::now();
    while status(&socket)["chunks_present"] != 16 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{}",
            status(&socket)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let map = common::stdout(Command::new("nbdinfo").args([
        "--map=qemu:allocation-depth",
        "--json",
        &uri,
    ]));
    let map: serde_json::Value = serde_json::from_str(&map).unwrap();
    let first = &map[0];
    assert_eq!(
        (
            first["offset"].as_u64(),
            first["length"].as_u64(),
            first["type"].as_u64()
        ),
        (Some(0), Some(MIB), Some(1)),
        "{map}"
    );
    assert_eq!(map[1]["type"], 2, "{map}");
    // base:allocation is the template's.
    let base = |u: &str| common::stdout(Command::new("nbdinfo").args(["--map", "--totals", u]));
    assert_eq!(base(&uri), base(&up.uri()));
}

#[test]
fn prefetch_hydrates_the_data_skips_the_holes_keeps_the_rate_and_records_completion() {
    let size = 64 * MIB;
    let Some((dir, image, bytes)) = setup(size, &[(0, 4 * MIB), (40 * MIB, 4 * MIB)]) else {
        return;
    };
    let up = Nbdkit::start(dir.path(), &image, &[], &[]);
    let cache = dir.path().join("c.cache");
    let started = Instant::now();
    let p = proxy(
        dir.path(),
        &up.uri(),
        &cache,
        &["--prefetch", "--prefetch-rate", "2M"],
    );
    let socket = p.socket.clone().unwrap();
    let s = loop {
        let s = status(&socket);
        if s["complete"] == true {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "prefetch did not finish: {s}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    // 8 MiB of data at 2 MiB/s cannot take less than ~3 s (a lower bound only).
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "the rate limit was not applied"
    );
    let fetched: u64 = up.reads().iter().map(|r| r.1).sum();
    assert!(
        fetched <= 8 * MIB,
        "prefetch fetched {fetched} bytes for 8 MiB of data: {s}"
    );
    assert!(
        s["prefetch_zero_bytes"].as_u64().unwrap() >= 56 * MIB,
        "{s}"
    );
    p.assert_logs("cache complete", Duration::from_secs(5));
    drop(p);
    // Completion is recorded in the cache itself.
    let p = proxy(dir.path(), &up.uri(), &cache, &[]);
    assert_eq!(p.report["complete"], true, "{}", p.report);
    assert_eq!(read_all(&p.uri(""), dir.path()), bytes);
    assert_eq!(up.reads().iter().map(|r| r.1).sum::<u64>(), fetched);
}

#[test]
fn a_full_cache_passes_reads_through_and_never_returns_partial_data() {
    let Some((dir, image, bytes)) = setup(32 * MIB, &[(0, 32 * MIB)]) else {
        return;
    };
    let Some(fs) = SmallFs::mount(&dir.path().join("small"), "6m") else {
        return;
    };
    let up = Nbdkit::start(dir.path(), &image, &[], &[]);
    let p = proxy(dir.path(), &up.uri(), &fs.0.join("c.cache"), &[]);
    assert_eq!(read_all(&p.uri(""), dir.path()), bytes);
    let s = status(&p.socket.clone().unwrap());
    assert_eq!(s["passthrough"], true, "{s}");
    assert!(
        s["chunks_present"].as_u64().unwrap() < s["chunks"].as_u64().unwrap(),
        "{s}"
    );
    let log = p.log();
    assert_eq!(log.matches("reads now pass through").count(), 1, "{log}");
    // Reads keep working, the cached part included.
    assert_eq!(read_all(&p.uri(""), dir.path()), bytes);
    drop(p);
}

/// A loop device over a sparse file, detached on drop.
struct LoopDevice(PathBuf);

impl LoopDevice {
    fn attach(backing: &Path, size: u64) -> Option<LoopDevice> {
        common::sparse_file(backing, size);
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(backing)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(LoopDevice(PathBuf::from(
                String::from_utf8(o.stdout).unwrap().trim(),
            ))),
            _ => {
                let msg = "cannot attach a loop device (the block-device cache test needs root)";
                if std::env::var("CI").is_ok_and(|v| v == "true") {
                    panic!("{msg}");
                }
                eprintln!("SKIP: {msg}");
                None
            }
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

#[test]
fn a_block_device_is_a_cache_too_and_one_too_small_is_refused() {
    let Some((dir, image, bytes)) = setup(8 * MIB, &[(0, 8 * MIB)]) else {
        return;
    };
    let Some(dev) = LoopDevice::attach(&dir.path().join("dev.img"), 10 * MIB) else {
        return;
    };
    let up = Nbdkit::start(dir.path(), &image, &[], &[]);
    let mut p = proxy(dir.path(), &up.uri(), &dev.0, &[]);
    assert_eq!(read_all(&p.uri(""), dir.path()), bytes);
    p.terminate(Duration::from_secs(20));
    // The template's bytes sit at their own offsets on the device.
    let mut on_device = vec![0u8; bytes.len()];
    std::fs::File::open(&dev.0)
        .unwrap()
        .read_exact_at(&mut on_device, 0)
        .unwrap();
    assert!(on_device == bytes);
    let fetched = up.reads().len();
    // A link to a block device (as LVM's /dev/VG/LV is) is followed.
    let link = dir.path().join("lv");
    std::os::unix::fs::symlink(&dev.0, &link).unwrap();
    let p = proxy(dir.path(), &up.uri(), &link, &[]);
    assert_eq!(p.report["complete"], true, "{}", p.report);
    assert_eq!(read_all(&p.uri(""), dir.path()), bytes);
    assert_eq!(
        up.reads().len(),
        fetched,
        "a warm block-device cache went upstream"
    );
    drop(p);
    // A device's template size is not known from its length: scrub asks for it.
    let err = fails(&["proxy", "scrub", dev.0.to_str().unwrap()]);
    assert!(err.contains("--size"), "{err}");
    scrub_says(
        &["--size", "8M", link.to_str().unwrap()],
        0,
        "128 of 128 chunks present, 0 bad",
    );

    let Some(small) = LoopDevice::attach(&dir.path().join("small.img"), 8 * MIB) else {
        return;
    };
    let err = proxy_fails(dir.path(), &up.uri(), &small.0, &[]);
    assert!(err.contains("needs at least"), "{err}");
}
