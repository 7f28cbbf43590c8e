//! Hostile upstream servers end to end: `thinline serve` reads templates from an NFS
//! server ([`common::hostile_nfs`]) and an NBD server ([`thinline_test_support::fake_nbd`]) that lie
//! in their replies, and a real NBD client (nbdsh) reads from the daemon.
//!
//! For every lie: the read fails with EIO or returns the right bytes (never a wrong
//! one), no read hangs (the daemon runs with short remote timeouts and one retry), the
//! daemon stays up and keeps serving a healthy local export next to the hostile ones,
//! and its memory stays bounded (nothing allocates what a lying length announces).
//! Each server serves one export per lie, so the lies cannot disturb one another.

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::hostile_nfs::{HostileNfs, Lie, NFS_FILE_SIZE, nfs_pattern, one_file_per_lie};
use common::*;
use thinline_nbd::proto::{self, RequestHeader, cmd, errno, reply};
use thinline_test_support::fake_nbd::{
    FakeNbdTcp, Responder, chunk, data_chunk, error_chunk, good_reply, hole_chunk, pattern,
};

/// Short timeouts and one retry: a lie costs a few seconds at most.
const REMOTE: &[&str] = &[
    "-f",
    "raw",
    "--connect-timeout",
    "2",
    "--first-byte-timeout",
    "1",
    "--idle-timeout",
    "1",
    "--retries",
    "1",
];

/// Longest a single read through the daemon may take before the test calls it a hang.
const HANG: Duration = Duration::from_secs(30);

/// What an NBD client got from one read.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Data(Vec<u8>),
    /// The read failed with this errno (its name, `EIO`).
    Errno(String),
}

/// Reads `length` bytes at `offset` of `uri` with nbdsh (libnbd); panics if the read
/// takes longer than [`HANG`].
fn read_with_nbdsh(uri: &str, offset: u64, length: u64, dir: &Path) -> Outcome {
    let out = dir.join("read.bin");
    let _ = std::fs::remove_file(&out);
    let program = format!(
        "import nbd\nh.connect_uri({uri:?})\ntry:\n    d = h.pread({length}, {offset})\n    \
         open({out:?}, 'wb').write(d)\n    print('ok')\nexcept nbd.Error as e:\n    \
         print('errno', e.errno, e.string)\n",
        out = out.to_str().unwrap()
    );
    let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
    let mut child = spawn(
        Command::new("nbdsh")
            .env("PATH", path)
            .arg("-c")
            .arg(program),
        Stdio::piped(),
        Stdio::piped(),
    );
    let Some(status) = wait_timeout(&mut child, HANG) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("reading {length} bytes at {offset} of {uri} hung for {HANG:?}");
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(status.success(), "nbdsh failed on {uri}: {stderr}");
    match stdout.split_whitespace().collect::<Vec<_>>()[..] {
        ["ok"] => Outcome::Data(std::fs::read(&out).unwrap()),
        ["errno", e, ..] => {
            eprintln!("{uri} {offset}+{length}: {stdout}");
            Outcome::Errno(e.to_owned())
        }
        _ => panic!("unexpected nbdsh output for {uri}: {stdout}\n{stderr}"),
    }
}

/// A daemon serving `specs` (NAME=URI) plus `healthy`, a local file, on a unix socket.
struct Daemon {
    served: Served,
    dir: tempfile::TempDir,
    healthy: Vec<u8>,
    rss_at_start: u64,
}

impl Daemon {
    fn start(specs: &[String]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let healthy: Vec<u8> = (0..1u32 << 20).map(|i| (i * 31 % 253) as u8).collect();
        let file = dir.path().join("healthy.raw");
        std::fs::write(&file, &healthy).unwrap();
        let healthy_spec = format!("healthy={}", file.display());
        let mut args: Vec<&str> = REMOTE.to_vec();
        args.extend(specs.iter().map(String::as_str));
        args.push(&healthy_spec);
        let served = Served::unix(dir.path(), &args, &[]);
        let rss_at_start = rss_kib(served.pid());
        Daemon {
            served,
            dir,
            healthy,
            rss_at_start,
        }
    }

    fn read(&self, export: &str, offset: u64, length: u64) -> Outcome {
        read_with_nbdsh(&self.served.uri(export), offset, length, self.dir.path())
    }

    /// The daemon still runs, serves the healthy export right, and has not grown by
    /// more than a few fetch units per export.
    fn assert_up_and_bounded(&mut self, exports: usize) {
        assert!(
            self.served.child.try_wait().unwrap().is_none(),
            "the daemon exited:\n{}",
            self.served.log()
        );
        assert_eq!(
            self.read("healthy", 4096, 65536),
            Outcome::Data(self.healthy[4096..4096 + 65536].to_vec()),
            "the healthy export"
        );
        let rss = rss_kib(self.served.pid());
        let bound = self.rss_at_start + 64 * 1024 + exports as u64 * 4 * 1024;
        assert!(
            rss < bound,
            "the daemon grew from {} KiB to {rss} KiB (bound {bound} KiB)",
            self.rss_at_start
        );
    }
}

fn require_tools() -> bool {
    require(&["nbdsh"]) && has_python_nbd()
}

fn eio() -> Outcome {
    Outcome::Errno("EIO".into())
}

#[test]
fn every_lie_of_a_hostile_nfs_server_fails_the_read_with_eio_or_reads_right_and_the_daemon_stays_up()
 {
    if !require_tools() {
        return;
    }
    let lies = [
        Lie::Honest,
        Lie::LongerThanAsked,
        Lie::ShortWithoutEof,
        Lie::ShortWithEof,
        Lie::EmptyWithoutEof,
        Lie::OneByteAtATime,
        Lie::CountDisagrees,
        Lie::OpaqueOf4GiB,
        Lie::HugeFragment,
        Lie::Trickle,
        Lie::Stall,
        Lie::WrongXid,
        Lie::SizeChanges,
        Lie::MtimeChanges,
        Lie::FileIdChanges,
        Lie::GarbageXdr,
        Lie::NoLastFragment,
    ];
    let files = one_file_per_lie(&lies);
    let nfs = HostileNfs::start(files.clone());
    let specs: Vec<String> = files
        .iter()
        .map(|f| format!("{}={}", f.name, nfs.uri(&f.name)))
        .collect();
    let mut daemon = Daemon::start(&specs);
    // An unaligned read in the second MiB, and (for the file that ends early) one in
    // the first MiB, which the file still has.
    let (offset, length) = ((1 << 20) + 12_345, 100_000);
    let right = Outcome::Data(nfs_pattern(offset, length));
    for file in &files {
        let reads_before = nfs.reads();
        let got = daemon.read(&file.name, offset, length);
        assert!(
            nfs.reads() > reads_before,
            "{:?}: the server saw no READ",
            file.lie
        );
        match file.lie {
            Lie::Honest | Lie::ShortWithoutEof => {
                assert!(
                    got == right,
                    "{:?}: wrong data or error: {:?}",
                    file.lie,
                    errno_of(&got)
                );
            }
            Lie::ShortWithEof => {
                // The first MiB is fetched whole and intact.
                assert!(got == right, "{:?}: {:?}", file.lie, errno_of(&got));
                let late = NFS_FILE_SIZE - 100_000;
                assert_eq!(
                    daemon.read(&file.name, late, 50_000),
                    eio(),
                    "{:?}: a read past where the file now ends",
                    file.lie
                );
            }
            _ => assert_eq!(got, eio(), "{:?}", file.lie),
        }
        if let Some(reason) = nfs_reason(file.lie) {
            assert_logged(&daemon, &format!("/export/{}", file.name), reason);
        }
    }
    // Lies leave nothing behind: the honest file still reads right.
    assert!(daemon.read("honest", 3 << 20, 4096) == Outcome::Data(nfs_pattern(3 << 20, 4096)));
    daemon.assert_up_and_bounded(files.len());
}

/// Asserts that the daemon logged `reason` for the object whose URI ends in `object`
/// (waiting for its stderr to be collected).
fn assert_logged(daemon: &Daemon, object: &str, reason: &str) {
    let needle = format!("{object} bytes");
    let logged = || {
        let log = daemon.served.log();
        log.lines()
            .any(|l| l.contains(&needle) && l.contains(reason))
    };
    let start = std::time::Instant::now();
    while !logged() && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        logged(),
        "no {reason:?} logged for {object}:\n{}",
        daemon.served.log()
    );
}

/// Why the client rejects each lie of the NFS server, as logged.
fn nfs_reason(lie: Lie) -> Option<&'static str> {
    Some(match lie {
        Lie::Honest | Lie::ShortWithoutEof => return None,
        Lie::LongerThanAsked => "1049088 bytes where at most 1048576 fit",
        Lie::ShortWithEof => "the file ends at",
        Lie::EmptyWithoutEof => "returned no data",
        Lie::OneByteAtATime => "in 64 short READs",
        Lie::CountDisagrees => "READ count differs",
        Lie::OpaqueOf4GiB => "4294967295 bytes where at most",
        Lie::HugeFragment | Lie::NoLastFragment => "a reply of more than",
        Lie::Trickle => "did not arrive whole",
        Lie::Stall => "timed out waiting",
        Lie::WrongXid => "the reply is for another call",
        Lie::SizeChanges => "the size changed",
        Lie::MtimeChanges => "the modification time changed",
        Lie::FileIdChanges => "the file id changed",
        Lie::GarbageXdr => "a boolean is neither 0 nor 1",
    })
}

fn errno_of(o: &Outcome) -> Option<&str> {
    match o {
        Outcome::Errno(e) => Some(e),
        Outcome::Data(_) => None,
    }
}

// ---------------------------------------------------------------------------------------
// NBD

const NBD_SIZE: u64 = 4 << 20;

/// A lie told in reply to reads of the second MiB and beyond (block status and the
/// first MiB are answered correctly): the reply bytes, and whether to close after.
type NbdLie = fn(&RequestHeader) -> (Vec<u8>, bool);

fn lying(lie: NbdLie) -> Responder {
    Box::new(move |reqs| {
        let r = &reqs[0];
        if r.command != cmd::READ || r.offset < 1 << 20 {
            return Some((good_reply(r), false));
        }
        Some(lie(r))
    })
}

fn honest(r: &RequestHeader) -> (Vec<u8>, bool) {
    (good_reply(r), false)
}

fn close_mid_reply(r: &RequestHeader) -> (Vec<u8>, bool) {
    let mut o = data_chunk(r.cookie, r.offset, r.length, true);
    o.truncate(o.len() / 2);
    (o, true)
}

/// Why the client rejects each lie of the NBD server, as logged.
fn nbd_reason(name: &str) -> Option<&'static str> {
    Some(match name {
        "data-chunk-longer-than-the-request" => {
            "OFFSET_DATA chunk of 1052680 bytes for a read of 1048576 bytes"
        }
        "chunk-length-shorter-than-its-data" => "the reply covers 524288 bytes of the read",
        "wrong-cookie" => "reply chunk for unknown cookie",
        "chunk-outside-the-request" => "lies outside the request",
        "data-and-hole-overlapping" => "OFFSET_HOLE chunk at 1572864+524288 overlaps",
        "reply-that-never-ends" | "error-chunks-that-never-end" => "timed out after 2s",
        "simple-reply-after-structured" => "simple reply with data although structured",
        "size-changes-on-reconnect" => "size changed from 4194304 to 8388608",
        "retried-into-the-right-bytes" => "closed the connection in the middle of a reply",
        _ => return None,
    })
}

/// The lies, by export name.
fn nbd_lies() -> Vec<(&'static str, NbdLie)> {
    vec![
        ("honest", honest),
        ("data-chunk-longer-than-the-request", |r| {
            let mut payload = r.offset.to_be_bytes().to_vec();
            payload.extend(pattern(r.offset, r.length + 4096));
            (
                chunk(reply::FLAG_DONE, reply::OFFSET_DATA, r.cookie, &payload),
                false,
            )
        }),
        ("chunk-length-shorter-than-its-data", |r| {
            // The header announces half the data, and the rest follows as garbage.
            let mut o = data_chunk(r.cookie, r.offset, r.length, true);
            let half = 8 + r.length / 2;
            o[16..20].copy_from_slice(&(half as u32).to_be_bytes());
            (o, false)
        }),
        ("wrong-cookie", |r| {
            (
                data_chunk(r.cookie ^ 0x5555, r.offset, r.length, true),
                false,
            )
        }),
        ("chunk-outside-the-request", |r| {
            let mut o = data_chunk(r.cookie, r.offset, r.length - 4096, false);
            o.extend(data_chunk(r.cookie, r.offset + r.length, 4096, true));
            (o, false)
        }),
        ("data-and-hole-overlapping", |r| {
            let half = r.length / 2;
            let mut o = data_chunk(r.cookie, r.offset, half + 4096, false);
            o.extend(hole_chunk(r.cookie, r.offset + half, half as u32, true));
            (o, false)
        }),
        ("reply-that-never-ends", |r| {
            // Half the data, never DONE.
            (data_chunk(r.cookie, r.offset, r.length / 2, false), false)
        }),
        ("error-chunks-that-never-end", |r| {
            let mut o = Vec::new();
            for _ in 0..10_000 {
                let mut c = error_chunk(reply::ERROR, r.cookie, errno::EIO, "again", None);
                c[4..6].copy_from_slice(&0u16.to_be_bytes()); // not DONE
                o.extend(c);
            }
            (o, false)
        }),
        ("simple-reply-after-structured", |r| {
            let mut o = Vec::new();
            proto::encode_simple_reply(&mut o, 0, r.cookie);
            o.extend(pattern(r.offset, r.length));
            (o, false)
        }),
        ("size-changes-on-reconnect", close_mid_reply),
        ("retried-into-the-right-bytes", close_mid_reply),
    ]
}

#[test]
fn every_lie_of_a_hostile_nbd_upstream_fails_the_read_with_eio_or_reads_right_and_the_daemon_stays_up()
 {
    if !require_tools() {
        return;
    }
    let lies = nbd_lies();
    let table = lies.clone();
    let fake = FakeNbdTcp::start(move |name, connection| {
        let &(_, lie) = table.iter().find(|(n, _)| *n == name)?;
        Some(match name {
            "size-changes-on-reconnect" if connection > 0 => (NBD_SIZE * 2, lying(honest)),
            "retried-into-the-right-bytes" if connection > 0 => (NBD_SIZE, lying(honest)),
            _ => (NBD_SIZE, lying(lie)),
        })
    });
    let specs: Vec<String> = lies
        .iter()
        .map(|(name, _)| format!("{name}={}", fake.uri(name)))
        .collect();
    let mut daemon = Daemon::start(&specs);
    let (offset, length) = ((1 << 20) + 12_345, 100_000);
    let right = Outcome::Data(pattern(offset, length));
    for &(name, _) in &lies {
        // The first MiB is answered honestly by every export.
        assert!(
            daemon.read(name, 1000, 5000) == Outcome::Data(pattern(1000, 5000)),
            "{name}: the honest part"
        );
        let got = daemon.read(name, offset, length);
        match name {
            "honest" => assert!(got == right, "{name}: {:?}", errno_of(&got)),
            "retried-into-the-right-bytes" => {
                assert!(got == right, "{name}: {:?}", errno_of(&got));
                assert!(fake.connections(name) >= 2, "{name}: no reconnection");
            }
            _ => assert_eq!(got, eio(), "{name}"),
        }
        if let Some(reason) = nbd_reason(name) {
            assert_logged(&daemon, &format!("/{name}"), reason);
        }
    }
    assert!(
        daemon.read("honest", 3 << 20, 4096) == Outcome::Data(pattern(3 << 20, 4096)),
        "the honest export after the lies"
    );
    daemon.assert_up_and_bounded(lies.len());
}
