//! The NBD client against real servers (qemu-nbd, nbdkit, Thinline's own server in
//! process) and against fake servers on unix socket pairs that break the protocol at
//! every stage.
//!
//! Tools are checked with `require` (from `thinline-test-support`): outside CI a missing tool skips the test with a
//! message; with `CI=true` it fails (tests/scripts/install-deps.sh installs them).
//! Every test runs under a tokio timeout, so a hang is a failure, not a stuck run.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use thinline_nbd::client::Error;
use thinline_nbd::client::{Client, ClientOptions, NbdUri};
use thinline_nbd::proto::{
    self, IHAVEOPT, NBDMAGIC, OPTION_REPLY_MAGIC, ReplyMode, RequestHeader, cmd, errno, info, opt,
    rep, reply, state,
};
use thinline_nbd::raw::{RawExport, RawOptions};
use thinline_nbd::server::{ExportSet, Listener, Server, ServerConfig};
use thinline_test_support::KillOnDrop;
use thinline_test_support::fake_nbd::{
    CONTEXT_ID, FAKE_SIZE, FakeConfig, Responder, chunk, data_chunk, each, error_chunk,
    fake_server, good, hole_chunk, option_reply, pattern,
};
use thinline_test_support::nbd_servers::{Nbdkit, connect_when_up, unix_uri, within};
use thinline_test_support::ports::{loopback_listener, socket_activated};
use thinline_test_support::require;
use thinline_test_support::rng::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

// ---------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------

/// A sparse image with data in a few places (pattern bytes) and holes elsewhere.
struct Image {
    _dir: tempfile::TempDir,
    path: PathBuf,
    bytes: Vec<u8>,
}

/// Data ranges written by [`image`]: `(offset, length)`.
const DATA: [(u64, u64); 4] = [
    (0, 65536),
    (1 << 20, 3 * 65536),
    (5 << 20, 65536 + 4096),
    ((16 << 20) - 65536, 65536),
];
const IMAGE_SIZE: u64 = 16 << 20;

fn image() -> Image {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(IMAGE_SIZE).unwrap();
    let mut bytes = vec![0u8; IMAGE_SIZE as usize];
    for (i, &(off, len)) in DATA.iter().enumerate() {
        let block: Vec<u8> = (0..len)
            .map(|x| ((x * 31 + i as u64 * 17) % 251) as u8 | 1)
            .collect();
        f.write_all_at(&block, off).unwrap();
        bytes[off as usize..(off + len) as usize].copy_from_slice(&block);
    }
    f.sync_all().unwrap();
    Image {
        _dir: dir,
        path,
        bytes,
    }
}

/// Reads random ranges (aligned and not, small and large, around the data) and
/// compares them with `expected`; many reads are in flight at once.
async fn check_random_reads(client: Arc<Client>, expected: Arc<Vec<u8>>, count: usize) {
    let size = expected.len() as u64;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..count {
        let (offset, length) = match i % 4 {
            // Around the data ranges, unaligned.
            0 => {
                let (off, len) = DATA[(rng.next_u64() % DATA.len() as u64) as usize];
                let start = off.saturating_sub(rng.next_u64() % 5000);
                let len = (len + rng.next_u64() % 9000).min(size - start);
                (start, len)
            }
            // Anywhere, small.
            1 => {
                let off = rng.next_u64() % size;
                (off, (rng.next_u64() % 70_000 + 1).min(size - off))
            }
            // Anywhere, aligned.
            2 => {
                let off = (rng.next_u64() % (size / 4096)) * 4096;
                (
                    off,
                    4096 * (1 + rng.next_u64() % 64).min((size - off) / 4096),
                )
            }
            // Large.
            _ => {
                let off = rng.next_u64() % (size / 2);
                (off, (rng.next_u64() % (4 << 20)).max(1))
            }
        };
        let client = Arc::clone(&client);
        let expected = Arc::clone(&expected);
        tasks.spawn(async move {
            let got = client
                .read(offset, length)
                .await
                .unwrap_or_else(|e| panic!("read {offset}+{length}: {e}"));
            assert_eq!(got.len() as u64, length);
            let want = &expected[offset as usize..(offset + length) as usize];
            assert!(got == want, "data differs in {offset}+{length}");
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
}

/// Whole-file block status: data ranges must not be reported as holes, and the big
/// gap between them must read as zeroes.
async fn check_block_status_of_image(client: &Client) {
    assert!(client.has_block_status());
    let mut map = Vec::new();
    let mut pos = 0;
    while pos < client.size() {
        let extents = client.block_status(pos, client.size() - pos).await.unwrap();
        assert!(!extents.is_empty());
        for (len, flags) in extents {
            map.push((pos, len, flags));
            pos += len;
        }
    }
    assert_eq!(pos, client.size());
    let flags_at = |o: u64| {
        map.iter()
            .find(|&&(s, l, _)| s <= o && o < s + l)
            .map(|&(_, _, f)| f)
            .unwrap()
    };
    for (off, len) in DATA {
        for o in [off, off + len - 1] {
            assert_eq!(
                flags_at(o) & state::HOLE,
                0,
                "data at {o} reported as a hole"
            );
            assert_eq!(flags_at(o) & state::ZERO, 0, "data at {o} reported as zero");
        }
    }
    for o in [3 << 20, 8 << 20, 12 << 20] {
        assert_ne!(
            flags_at(o) & state::ZERO,
            0,
            "gap at {o} not reported as zero"
        );
    }
    // An unaligned sub-range starts exactly where asked.
    let extents = client.block_status(100, 1000).await.unwrap();
    assert_eq!(extents.iter().map(|e| e.0).sum::<u64>(), 1000);
}

/// Asserts that `e` is the server's error reply `expected` (an `errno` value) and
/// returns its message.
fn assert_error_reply(e: &Error, expected: u32) -> String {
    let text = e.to_string();
    assert!(
        matches!(e, Error::Request { errno, .. } if *errno == expected),
        "{text}"
    );
    text
}

fn qemu_nbd_unix(file: &Path, format: &str, sock: &Path) -> KillOnDrop {
    KillOnDrop::spawn(Command::new("qemu-nbd").args([
        "-r",
        "-t",
        "-e",
        "8",
        "-f",
        format,
        "-x",
        "disk",
        "-k",
        sock.to_str().unwrap(),
        file.to_str().unwrap(),
    ]))
}

// ---------------------------------------------------------------------------------------
// qemu-nbd
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_nbd_raw_over_unix_socket() {
    if !require(&["qemu-nbd"]) {
        return;
    }
    let img = image();
    let sock = img.path.with_file_name("q.sock");
    let _server = qemu_nbd_unix(&img.path, "raw", &sock);
    within(120, async {
        let options = ClientOptions {
            // Small requests, so big reads are split and pipelined.
            max_request: 1 << 20,
            ..ClientOptions::default()
        };
        let client = connect_when_up(&unix_uri("disk", &sock), &options).await;
        assert_eq!(client.size(), IMAGE_SIZE);
        assert!(client.read_only());
        assert!(client.structured_replies());
        assert!(client.advertised_block_sizes());
        let client = Arc::new(client);
        check_random_reads(Arc::clone(&client), Arc::new(img.bytes.clone()), 200).await;
        let whole = client.read(0, IMAGE_SIZE).await.unwrap();
        assert!(whole == img.bytes[..], "whole-image read differs");
        check_block_status_of_image(&client).await;
        client.disconnect().await;
        assert!(client.is_closed());
        assert!(matches!(
            client.read(0, 512).await,
            Err(Error::ConnectionLost { .. })
        ));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_nbd_qcow2_over_tcp() {
    if !require(&["qemu-nbd", "qemu-img"]) {
        return;
    }
    let img = image();
    let qcow2 = img.path.with_file_name("disk.qcow2");
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&img.path)
        .arg(&qcow2)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    // Socket activation: qemu-nbd serves on a port this test holds from the start.
    let listener = loopback_listener();
    let port = listener.local_addr().unwrap().port();
    let _server = KillOnDrop::spawn(socket_activated("qemu-nbd", &listener).args([
        "-r",
        "-t",
        "-e",
        "4",
        "-f",
        "qcow2",
        "-x",
        "disk",
        qcow2.to_str().unwrap(),
    ]));
    drop(listener);
    within(120, async {
        let client = connect_when_up(
            &format!("nbd://127.0.0.1:{port}/disk"),
            &ClientOptions::default(),
        )
        .await;
        assert_eq!(client.size(), IMAGE_SIZE);
        assert_eq!(client.server(), format!("127.0.0.1:{port}"));
        let client = Arc::new(client);
        check_random_reads(Arc::clone(&client), Arc::new(img.bytes.clone()), 120).await;
        check_block_status_of_image(&client).await;
        // A wrong export name is refused with the server's message, naming the export.
        let uri = NbdUri::parse(&format!("nbd://127.0.0.1:{port}/nope")).unwrap();
        let e = Client::connect(&uri, &ClientOptions::default())
            .await
            .unwrap_err();
        let text = e.to_string();
        assert!(
            matches!(&e, Error::OptionRefused { code, .. } if *code == rep::ERR_UNKNOWN),
            "{text}"
        );
        assert!(
            text.contains("\"nope\"") && text.contains("NBD_OPT_GO"),
            "{text}"
        );
        assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// nbdkit
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdkit_pattern_and_memory_with_and_without_structured_replies() {
    let Some(pattern) = Nbdkit::start(&["pattern", "size=3M"]) else {
        return;
    };
    within(60, async {
        let client = pattern.client().await;
        assert_eq!(client.size(), 3 << 20);
        assert!(client.can_multi_conn());
        // The pattern plugin: every 8 bytes hold their own offset, big-endian.
        let data = client.read(12345, 100_000).await.unwrap();
        for (i, b) in data.iter().enumerate() {
            let o = 12345 + i as u64;
            assert_eq!(*b, ((o & !7).to_be_bytes())[(o % 8) as usize], "byte {o}");
        }
        client.disconnect().await;
    })
    .await;

    let memory = Nbdkit::start(&["--no-sr", "memory", "1M"]).expect("nbdkit is there");
    within(60, async {
        let client = memory.client().await;
        assert!(!client.structured_replies(), "nbdkit --no-sr refuses them");
        assert!(!client.has_block_status());
        let data = client.read(4096, 300_000).await.unwrap();
        assert!(data.iter().all(|&b| b == 0));
        assert!(matches!(
            client.block_status(0, 4096).await,
            Err(Error::InvalidRequest { .. })
        ));
        // Reads past the end are refused locally.
        assert!(matches!(
            client.read((1 << 20) - 10, 11).await,
            Err(Error::InvalidRequest { .. })
        ));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdkit_eio_on_a_range_and_by_trigger_file() {
    let Some(eio) = Nbdkit::eio_from(1 << 20, 524_288) else {
        return;
    };
    within(60, async {
        let client = eio.client().await;
        assert!(client.read(0, 65536).await.unwrap().iter().all(|&b| b == 0));
        let e = client.read(600_000, 4096).await.unwrap_err();
        let text = assert_error_reply(&e, errno::EIO);
        assert!(
            matches!(
                e,
                Error::Request {
                    offset: 600_000,
                    ..
                }
            ),
            "{text}"
        );
        assert!(text.contains("EIO") && text.contains("600000"), "{text}");
        // The connection survives an error reply.
        assert!(!client.is_closed());
        client.read(4096, 4096).await.unwrap();
    })
    .await;

    let img = image();
    let trigger = eio.dir.path().join("trigger");
    let file = Nbdkit::start(&[
        "--filter=error",
        "file",
        img.path.to_str().unwrap(),
        "error-pread=EIO",
        "error-pread-rate=100%",
        &format!("error-pread-file={}", trigger.display()),
    ])
    .expect("nbdkit is there");
    within(60, async {
        let client = file.client().await;
        assert!(client.read(0, 65536).await.unwrap() == img.bytes[..65536]);
        std::fs::write(&trigger, b"").unwrap();
        let e = client.read(0, 65536).await.unwrap_err();
        assert_error_reply(&e, errno::EIO);
        std::fs::remove_file(&trigger).unwrap();
        assert!(client.read(1 << 20, 4096).await.unwrap() == img.bytes[1 << 20..(1 << 20) + 4096]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_killed_mid_request_fails_pending_reads() {
    let Some(mut server) = Nbdkit::start(&["--filter=delay", "pattern", "size=1M", "rdelay=10"])
    else {
        return;
    };
    within(60, async {
        let client = Arc::new(server.client().await);
        let mut reads = tokio::task::JoinSet::new();
        for i in 0..8u64 {
            let c = Arc::clone(&client);
            reads.spawn(async move { c.read(i * 4096, 4096).await });
        }
        // Wait until all are on the wire, then kill the server.
        let start = Instant::now();
        while client.in_flight() < 8 && start.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        server.kill();
        let killed = Instant::now();
        while let Some(r) = reads.join_next().await {
            let e = r.unwrap().unwrap_err();
            assert!(matches!(e, Error::ConnectionLost { .. }), "{e}");
        }
        assert!(
            killed.elapsed() < Duration::from_secs(5),
            "failures took too long"
        );
        assert!(client.is_closed());
        assert!(client.read(0, 1).await.is_err());
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// Thinline's own server, in process
// ---------------------------------------------------------------------------------------

struct InProcess {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<thinline_nbd::Result<()>>,
    tcp: String,
    sock: PathBuf,
}

async fn thinline_server(file: &Path) -> InProcess {
    let mut exports = ExportSet::new();
    exports
        .add(
            "disk",
            Arc::new(RawExport::open(file, &RawOptions::default()).unwrap()),
        )
        .unwrap();
    let sock = file.with_file_name("thinline.sock");
    let unix = Listener::bind_unix(&sock).unwrap();
    let tcp = Listener::bind_tcp("127.0.0.1:0").await.unwrap();
    let tcp_addr = tcp.describe();
    let server = Server::new(exports, ServerConfig::default()).unwrap();
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(vec![unix, tcp], async {
        let _ = rx.await;
    }));
    InProcess {
        stop: Some(stop),
        task,
        tcp: tcp_addr,
        sock,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thinline_server_in_process_over_unix_and_tcp() {
    let img = image();
    let mut server = thinline_server(&img.path).await;
    within(120, async {
        let expected = Arc::new(img.bytes.clone());
        for uri in [
            unix_uri("disk", &server.sock),
            format!("nbd://{}/disk", server.tcp),
        ] {
            let client = Arc::new(connect_when_up(&uri, &ClientOptions::default()).await);
            assert_eq!(client.size(), IMAGE_SIZE);
            assert!(client.structured_replies());
            check_random_reads(Arc::clone(&client), Arc::clone(&expected), 100).await;
            check_block_status_of_image(&client).await;
            client.disconnect().await;
        }
        // Graceful shutdown of the server: the client sees the connection end.
        let client =
            connect_when_up(&unix_uri("disk", &server.sock), &ClientOptions::default()).await;
        server.stop.take().unwrap().send(()).unwrap();
        (&mut server.task).await.unwrap().unwrap();
        let start = Instant::now();
        while !client.is_closed() && start.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(client.read(0, 512).await.is_err());
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// Fake servers (shared with the end-to-end tests of the repository)
// ---------------------------------------------------------------------------------------

/// A client connected to a fake server (or the error of its handshake).
async fn fake(config: FakeConfig, respond: Responder) -> thinline_nbd::client::Result<Client> {
    let (c, s) = UnixStream::pair().unwrap();
    tokio::spawn(fake_server(s, config, respond));
    Client::from_stream(c, "fake-server", "disk", &ClientOptions::default()).await
}

/// A client connected to a fake server with the default configuration that answers
/// each request with the bytes `f` makes for it.
async fn fake_answering(f: impl Fn(&RequestHeader) -> Vec<u8> + Send + 'static) -> Client {
    fake(FakeConfig::default(), each(f)).await.unwrap()
}

#[tokio::test]
async fn fake_out_of_order_and_interleaved_replies_are_assembled() {
    within(20, async {
        // Two requests; the replies come interleaved, the second one first.
        let respond: Responder = Box::new(|reqs| {
            if reqs.len() < 2 {
                return None;
            }
            let (a, b) = (reqs[0], reqs[1]);
            let mut out = data_chunk(b.cookie, b.offset + 100, b.length - 100, false);
            out.extend(data_chunk(a.cookie, a.offset + 10, a.length - 10, false));
            out.extend(hole_chunk(b.cookie, b.offset, 100, true));
            out.extend(data_chunk(a.cookie, a.offset, 10, true));
            Some((out, false))
        });
        let client = fake(FakeConfig::default(), respond).await.unwrap();
        let (a, b) = tokio::join!(client.read(1000, 5000), client.read(70_000, 3000));
        assert_eq!(&a.unwrap()[..], &pattern(1000, 5000)[..]);
        let b = b.unwrap();
        assert!(b[..100].iter().all(|&x| x == 0), "hole not zero-filled");
        assert_eq!(&b[100..], &pattern(70_100, 2900)[..]);
    })
    .await;
}

#[tokio::test]
async fn fake_reads_are_widened_to_the_minimum_block() {
    within(20, async {
        let respond: Responder = Box::new(|reqs| {
            let r = reqs[0];
            if r.offset % 512 != 0 || r.length % 512 != 0 {
                let msg = "misaligned";
                return Some((
                    error_chunk(reply::ERROR, r.cookie, errno::EINVAL, msg, None),
                    false,
                ));
            }
            Some((data_chunk(r.cookie, r.offset, r.length, true), false))
        });
        let config = FakeConfig {
            min_block: 512,
            ..FakeConfig::default()
        };
        let client = fake(config, respond).await.unwrap();
        assert_eq!(client.block_sizes().minimum, 512);
        let got = client.read(700, 1000).await.unwrap();
        assert_eq!(&got[..], &pattern(700, 1000)[..]);
        let got = client.read(FAKE_SIZE - 3, 3).await.unwrap();
        assert_eq!(&got[..], &pattern(FAKE_SIZE - 3, 3)[..]);
    })
    .await;
}

#[tokio::test]
async fn fake_error_chunks_carry_the_servers_message_and_keep_the_connection() {
    within(20, async {
        let client = fake_answering(|r| {
            if r.offset == 0 {
                error_chunk(
                    reply::ERROR_OFFSET,
                    r.cookie,
                    errno::EIO,
                    "disk on fire\x1b[31m",
                    Some(r.offset + 5),
                )
            } else {
                data_chunk(r.cookie, r.offset, r.length, true)
            }
        })
        .await;
        let e = client.read(0, 4096).await.unwrap_err();
        let text = assert_error_reply(&e, errno::EIO);
        assert!(
            text.contains("disk on fire") && text.contains("at offset 5"),
            "{text}"
        );
        assert!(
            !text.contains('\x1b'),
            "control characters must not reach logs: {text}"
        );
        assert!(
            text.contains("fake-server") && text.contains("\"disk\""),
            "{text}"
        );
        let ok = client.read(4096, 4096).await.unwrap();
        assert_eq!(&ok[..], &pattern(4096, 4096)[..]);
    })
    .await;
}

#[tokio::test]
async fn fake_block_status_is_clipped_to_the_request() {
    within(20, async {
        let client = fake_answering(|r| {
            assert_eq!(r.command, cmd::BLOCK_STATUS);
            let mut p = CONTEXT_ID.to_be_bytes().to_vec();
            // 1000 data bytes, then a hole that runs past the request.
            for (len, flags) in [(1000u32, 0u32), (1 << 19, 3)] {
                p.extend_from_slice(&len.to_be_bytes());
                p.extend_from_slice(&flags.to_be_bytes());
            }
            chunk(reply::FLAG_DONE, reply::BLOCK_STATUS, r.cookie, &p)
        })
        .await;
        let e = client.block_status(0, 5000).await.unwrap();
        assert_eq!(e, vec![(1000, 0), (4000, 3)]);
    })
    .await;
}

#[tokio::test]
async fn fake_simple_replies_when_structured_replies_are_refused() {
    within(20, async {
        let config = FakeConfig {
            structured: false,
            ..FakeConfig::default()
        };
        let client = fake(
            config,
            each(|r| {
                let mut out = Vec::new();
                if r.offset == 0 {
                    proto::encode_simple_reply(&mut out, errno::EPERM, r.cookie);
                } else {
                    proto::encode_simple_reply(&mut out, 0, r.cookie);
                    out.extend(pattern(r.offset, r.length));
                }
                out
            }),
        )
        .await
        .unwrap();
        assert!(!client.structured_replies());
        assert!(!client.has_block_status());
        let got = client.read(512, 3000).await.unwrap();
        assert_eq!(&got[..], &pattern(512, 3000)[..]);
        let e = client.read(0, 1).await.unwrap_err();
        assert_error_reply(&e, errno::EPERM);
    })
    .await;
}

/// Replies that break the protocol in transmission: each must fail the read, close
/// the connection and fail later reads, without panicking or hanging.
#[tokio::test]
async fn fake_hostile_replies_fail_cleanly() {
    type Make = fn(&RequestHeader) -> (Vec<u8>, bool);
    let cases: Vec<(&str, Make)> = vec![
        ("bad magic", |_| {
            (vec![0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0], false)
        }),
        ("extended header not negotiated", |r| {
            let mut o = Vec::new();
            proto::encode_chunk_header(&mut o, ReplyMode::Extended, 1, 0, r.cookie, r.offset, 0);
            (o, false)
        }),
        ("unknown cookie", |r| {
            (data_chunk(r.cookie + 1000, r.offset, r.length, true), false)
        }),
        ("chunk beyond the request", |r| {
            (data_chunk(r.cookie, r.offset + 1, r.length, true), false)
        }),
        ("chunk before the request", |r| {
            (data_chunk(r.cookie, r.offset - 1, 10, true), false)
        }),
        ("offset near u64::MAX", |r| {
            let mut p = (u64::MAX - 2).to_be_bytes().to_vec();
            p.extend(vec![0u8; 10]);
            (chunk(1, reply::OFFSET_DATA, r.cookie, &p), false)
        }),
        ("oversized length", |r| {
            let mut o = Vec::new();
            proto::encode_chunk_header(
                &mut o,
                ReplyMode::Structured,
                1,
                reply::OFFSET_DATA,
                r.cookie,
                0,
                u64::from(u32::MAX),
            );
            o.extend(r.offset.to_be_bytes());
            (o, false)
        }),
        ("EOF mid-reply", |r| {
            let mut o = data_chunk(r.cookie, r.offset, r.length, true);
            o.truncate(o.len() / 2);
            (o, true)
        }),
        ("EOF mid-header", |r| {
            let mut o = data_chunk(r.cookie, r.offset, r.length, true);
            o.truncate(9);
            (o, true)
        }),
        ("overlapping chunks", |r| {
            let mut o = data_chunk(r.cookie, r.offset, 100, false);
            o.extend(data_chunk(r.cookie, r.offset + 50, r.length - 50, true));
            (o, false)
        }),
        ("incomplete coverage", |r| {
            let mut o = hole_chunk(r.cookie, r.offset, (r.length / 2) as u32, false);
            o.extend(chunk(reply::FLAG_DONE, reply::NONE, r.cookie, &[]));
            (o, false)
        }),
        ("zero-length hole", |r| {
            (hole_chunk(r.cookie, r.offset, 0, true), false)
        }),
        ("hole chunk of the wrong size", |r| {
            (
                chunk(1, reply::OFFSET_HOLE, r.cookie, &r.offset.to_be_bytes()),
                false,
            )
        }),
        ("simple reply with data in structured mode", |r| {
            let mut o = Vec::new();
            proto::encode_simple_reply(&mut o, 0, r.cookie);
            o.extend(pattern(r.offset, r.length));
            (o, false)
        }),
        ("error message longer than the chunk", |r| {
            let mut p = errno::EIO.to_be_bytes().to_vec();
            p.extend_from_slice(&100u16.to_be_bytes());
            p.extend_from_slice(b"short");
            (chunk(1, reply::ERROR, r.cookie, &p), false)
        }),
        ("error value 0", |r| {
            (error_chunk(reply::ERROR, r.cookie, 0, "", None), false)
        }),
        ("error offset outside the request", |r| {
            (
                error_chunk(
                    reply::ERROR_OFFSET,
                    r.cookie,
                    errno::EIO,
                    "x",
                    Some(r.offset + r.length + 1),
                ),
                false,
            )
        }),
        ("huge error chunk", |r| {
            let mut o = Vec::new();
            proto::encode_chunk_header(
                &mut o,
                ReplyMode::Structured,
                1,
                reply::ERROR,
                r.cookie,
                0,
                1 << 30,
            );
            (o, false)
        }),
        ("unknown chunk type", |r| {
            (chunk(1, 77, r.cookie, b"abc"), false)
        }),
        ("block status chunk to a read", |r| {
            (chunk(1, reply::BLOCK_STATUS, r.cookie, &[0; 12]), false)
        }),
        ("NONE with payload", |r| {
            (chunk(1, reply::NONE, r.cookie, b"x"), false)
        }),
        ("NONE without DONE", |r| {
            (chunk(0, reply::NONE, r.cookie, &[]), false)
        }),
        ("chunk after DONE", |r| {
            let mut o = data_chunk(r.cookie, r.offset, r.length, true);
            o.extend(chunk(1, reply::NONE, r.cookie, &[]));
            (o, false)
        }),
        ("garbage", |_| {
            ((0..200u32).map(|i| (i * 37 % 256) as u8).collect(), false)
        }),
        ("close without reply", |_| (Vec::new(), true)),
    ];
    within(60, async {
        for (name, make) in cases {
            let respond: Responder = Box::new(move |reqs| Some(make(&reqs[0])));
            let client = fake(FakeConfig::default(), respond)
                .await
                .unwrap_or_else(|e| panic!("{name}: handshake failed: {e}"));
            let first = client.read(4096, 1000).await;
            if name == "chunk after DONE" {
                // The read itself was fine; the stray chunk kills the connection.
                assert_eq!(&first.unwrap()[..], &pattern(4096, 1000)[..], "{name}");
            } else {
                let e = first.expect_err(name);
                eprintln!("{name}: {e}");
                assert!(
                    matches!(e, Error::Protocol { .. } | Error::ConnectionLost { .. }),
                    "{name}: {e}"
                );
            }
            let start = Instant::now();
            while !client.is_closed() && start.elapsed() < Duration::from_secs(5) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert!(client.is_closed(), "{name}: connection still open");
            let e = client.read(0, 10).await.expect_err(name);
            assert!(matches!(e, Error::ConnectionLost { .. }), "{name}: {e}");
        }
    })
    .await;
}

#[tokio::test]
async fn fake_hostile_block_status_fails_cleanly() {
    type Make = fn(&RequestHeader) -> Vec<u8>;
    let cases: Vec<(&str, Make)> = vec![
        ("zero-length extent", |r| {
            let mut p = CONTEXT_ID.to_be_bytes().to_vec();
            p.extend_from_slice(&[0; 8]);
            chunk(1, reply::BLOCK_STATUS, r.cookie, &p)
        }),
        ("unknown context", |r| {
            let mut p = 99u32.to_be_bytes().to_vec();
            p.extend_from_slice(&512u32.to_be_bytes());
            p.extend_from_slice(&0u32.to_be_bytes());
            chunk(1, reply::BLOCK_STATUS, r.cookie, &p)
        }),
        ("extents after the end", |r| {
            let mut p = CONTEXT_ID.to_be_bytes().to_vec();
            for _ in 0..2 {
                p.extend_from_slice(&(r.length as u32).to_be_bytes());
                p.extend_from_slice(&0u32.to_be_bytes());
            }
            chunk(1, reply::BLOCK_STATUS, r.cookie, &p)
        }),
        ("ragged length", |r| {
            let mut p = CONTEXT_ID.to_be_bytes().to_vec();
            p.extend_from_slice(&[0, 0, 2, 0, 0]);
            chunk(1, reply::BLOCK_STATUS, r.cookie, &p)
        }),
        ("no status chunk", |r| chunk(1, reply::NONE, r.cookie, &[])),
        ("data chunk to block status", |r| {
            data_chunk(r.cookie, r.offset, 10, true)
        }),
        ("simple success reply", |r| {
            let mut o = Vec::new();
            proto::encode_simple_reply(&mut o, 0, r.cookie);
            o
        }),
    ];
    within(60, async {
        for (name, make) in cases {
            let client = fake(FakeConfig::default(), each(make)).await.unwrap();
            assert!(client.has_block_status());
            let e = client.block_status(0, 65536).await.expect_err(name);
            eprintln!("{name}: {e}");
            assert!(
                matches!(e, Error::Protocol { .. } | Error::ConnectionLost { .. }),
                "{name}: {e}"
            );
        }
    })
    .await;
}

/// Handshakes that break the protocol: each must fail `from_stream` with an error.
#[tokio::test]
async fn fake_hostile_handshakes_fail_cleanly() {
    let greeting = |flags: u16| {
        let mut g = NBDMAGIC.to_be_bytes().to_vec();
        g.extend_from_slice(&IHAVEOPT.to_be_bytes());
        g.extend_from_slice(&flags.to_be_bytes());
        g
    };
    // Raw byte streams sent before any option.
    let raw: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "not NBD",
            b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec(),
            "not an NBD server",
        ),
        (
            "oldstyle",
            {
                let mut g = NBDMAGIC.to_be_bytes().to_vec();
                g.extend_from_slice(&0x0000_4202_8186_1253u64.to_be_bytes());
                g.extend_from_slice(&[0; 16]);
                g
            },
            "oldstyle",
        ),
        (
            "EOF mid-greeting",
            NBDMAGIC.to_be_bytes()[..6].to_vec(),
            "closed the connection",
        ),
        ("no fixed newstyle", greeting(0), "fixed newstyle"),
        (
            "unknown second magic",
            {
                let mut g = NBDMAGIC.to_be_bytes().to_vec();
                g.extend_from_slice(&[1; 10]);
                g
            },
            "handshake magic",
        ),
    ];
    within(60, async {
        for (name, bytes, needle) in raw {
            let (c, mut s) = UnixStream::pair().unwrap();
            tokio::spawn(async move {
                let _ = s.write_all(&bytes).await;
                // Let the client finish; a close right away is one of the cases anyway.
                let mut sink = Vec::new();
                let _ = tokio::time::timeout(Duration::from_millis(300), s.read_to_end(&mut sink))
                    .await;
            });
            let e = Client::from_stream(c, "fake-server", "disk", &ClientOptions::default())
                .await
                .expect_err(name);
            eprintln!("{name}: {e}");
            assert!(e.to_string().contains(needle), "{name}: {e}");
        }

        // Sabotaged option replies.
        let bad_magic = {
            let mut o = option_reply(opt::STRUCTURED_REPLY, rep::ACK, &[]);
            o[0] ^= 0xff;
            o
        };
        let huge = {
            let mut o = OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
            o.extend_from_slice(&opt::GO.to_be_bytes());
            o.extend_from_slice(&rep::INFO.to_be_bytes());
            o.extend_from_slice(&u32::MAX.to_be_bytes());
            o
        };
        let go_refused = option_reply(opt::GO, rep::ERR_UNKNOWN, b"export 'disk' not found\n\x07");
        let ack_only = option_reply(opt::GO, rep::ACK, &[]);
        let short_export = {
            let mut o = option_reply(opt::GO, rep::INFO, &[0, info::EXPORT as u8, 1, 2, 3]);
            o.extend(option_reply(opt::GO, rep::ACK, &[]));
            o
        };
        let bad_block_sizes = {
            let mut o = option_reply(
                opt::GO,
                rep::INFO,
                &proto::info_block_size(3, 4096, 1 << 20),
            );
            o.extend(option_reply(
                opt::GO,
                rep::INFO,
                &proto::info_export(1 << 20, 1),
            ));
            o.extend(option_reply(opt::GO, rep::ACK, &[]));
            o
        };
        let wrong_option = option_reply(opt::LIST, rep::ACK, &[]);
        let other_context = {
            let mut o = option_reply(
                opt::SET_META_CONTEXT,
                rep::META_CONTEXT,
                &proto::rep_meta_context(1, "qemu:dirty-bitmap:x"),
            );
            o.extend(option_reply(opt::SET_META_CONTEXT, rep::ACK, &[]));
            o
        };
        let sabotaged: Vec<(&str, u32, Vec<u8>, &str)> = vec![
            (
                "bad option reply magic",
                opt::STRUCTURED_REPLY,
                bad_magic,
                "magic",
            ),
            ("huge option reply", opt::GO, huge, "bytes"),
            ("GO refused", opt::GO, go_refused, "NBD_REP_ERR_UNKNOWN"),
            (
                "ACK without export info",
                opt::GO,
                ack_only,
                "NBD_INFO_EXPORT",
            ),
            (
                "short export info",
                opt::GO,
                short_export,
                "NBD_INFO_EXPORT",
            ),
            (
                "invalid block sizes",
                opt::GO,
                bad_block_sizes,
                "block sizes",
            ),
            (
                "reply names another option",
                opt::STRUCTURED_REPLY,
                wrong_option,
                "NBD_OPT_LIST",
            ),
            (
                "unasked context",
                opt::SET_META_CONTEXT,
                other_context,
                "dirty-bitmap",
            ),
            (
                "SR answered with INFO",
                opt::STRUCTURED_REPLY,
                option_reply(opt::STRUCTURED_REPLY, rep::INFO, &[0; 12]),
                "unexpected",
            ),
            (
                "close after option",
                opt::GO,
                Vec::new(),
                "closed the connection",
            ),
        ];
        for (name, option, bytes, needle) in sabotaged {
            let config = FakeConfig {
                sabotage: Some((option, bytes.clone())),
                ..FakeConfig::default()
            };
            let e = fake(config, good()).await.expect_err(name);
            eprintln!("{name}: {e}");
            let text = e.to_string();
            assert!(text.contains(needle), "{name}: {text}");
            if name == "GO refused" {
                assert!(
                    text.contains("fake-server") && text.contains("\"disk\""),
                    "{text}"
                );
                assert!(
                    text.contains("not found") && !text.contains('\x07'),
                    "{text}"
                );
            }
        }
    })
    .await;
}

#[tokio::test]
async fn connect_and_request_timeouts() {
    within(30, async {
        // A listener that accepts and never speaks: the handshake times out.
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("mute.sock");
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let held = tokio::spawn(async move {
            let mut conns = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                conns.push(s);
            }
        });
        let options = ClientOptions {
            connect_timeout: Duration::from_millis(300),
            ..ClientOptions::default()
        };
        let uri = NbdUri::parse(&unix_uri("x", &sock)).unwrap();
        let start = Instant::now();
        let e = Client::connect(&uri, &options).await.unwrap_err();
        assert!(matches!(e, Error::Timeout { .. }), "{e}");
        assert!(start.elapsed() < Duration::from_secs(5));
        held.abort();

        // A server that never replies: the request times out and the connection closes.
        let (c, s) = UnixStream::pair().unwrap();
        tokio::spawn(fake_server(s, FakeConfig::default(), Box::new(|_| None)));
        let options = ClientOptions {
            request_timeout: Some(Duration::from_millis(300)),
            ..ClientOptions::default()
        };
        let client = Client::from_stream(c, "fake-server", "disk", &options)
            .await
            .unwrap();
        let (a, b) = tokio::join!(client.read(0, 10), async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            client.read(10, 10).await
        });
        assert!(matches!(a, Err(Error::Timeout { .. })), "{a:?}");
        assert!(b.is_err());
        assert!(client.is_closed());
    })
    .await;
}

#[tokio::test]
async fn dropping_the_client_closes_the_connection() {
    within(20, async {
        let (c, s) = UnixStream::pair().unwrap();
        let server = tokio::spawn(fake_server(s, FakeConfig::default(), good()));
        let client = Client::from_stream(c, "fake-server", "disk", &ClientOptions::default())
            .await
            .unwrap();
        assert_eq!(
            &client.read(0, 100).await.unwrap()[..],
            &pattern(0, 100)[..]
        );
        drop(client);
        // The fake server returns when its connection reaches end of stream.
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the server saw no close")
            .unwrap();
    })
    .await;
}
