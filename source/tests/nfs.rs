//! The NFSv3 template source against a real server: nfs-ganesha exporting a temp
//! directory on 127.0.0.1 (tests/scripts/nfs-server.sh).
//!
//! Needs root and the packages of tests/scripts/install-deps.sh (nfs-ganesha,
//! nfs-ganesha-vfs, rpcbind). Outside CI a missing tool skips the test with a message;
//! with `CI=true` it fails.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use thinline_source::nfs;
use thinline_source::{FetchError, FetchErrorKind, RangeBackend, RemoteConfig};
use thinline_test_support::rng::Rng;
use thinline_test_support::servers::{NfsServer, require_nfs_server};

/// A running ganesha exporting a temp directory that has a `sub` directory; stopped on
/// drop, before the directory is removed.
struct Server {
    nfs: NfsServer,
    dir: tempfile::TempDir,
}

impl Server {
    fn start() -> Option<Server> {
        if !require_nfs_server() {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        Some(Server {
            nfs: NfsServer::start(dir.path()),
            dir,
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The URI of `name` (relative to the exported directory).
    fn uri(&self, name: &str) -> String {
        self.nfs.uri(name)
    }

    fn stop(&self) {
        self.nfs.stop();
    }
}

fn write_file(path: &Path, data: &[u8]) {
    std::fs::write(path, data).unwrap();
}

/// A sparse file of `size` bytes with data at a few places; returns its contents.
fn write_sparse(path: &Path, size: u64, rng: &mut Rng) -> Vec<u8> {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut expected = vec![0u8; size as usize];
    for off in [0, 5 << 20, 17 << 20, size - 70_000] {
        let block = rng.bytes(70_000.min((size - off) as usize));
        f.write_all_at(&block, off).unwrap();
        expected[off as usize..off as usize + block.len()].copy_from_slice(&block);
    }
    expected
}

async fn open(uri: &str) -> Arc<dyn RangeBackend> {
    nfs::open(uri, &RemoteConfig::default())
        .await
        .unwrap_or_else(|e| panic!("open {uri}: {e}"))
}

/// Asserts that `err` is of `kind` and that its message says `words`.
fn assert_error(err: &FetchError, kind: FetchErrorKind, words: &str) {
    assert_eq!(err.kind, kind, "{err}");
    assert!(
        err.to_string().contains(words),
        "{words:?} missing from: {err}"
    );
}

async fn check_reads(backend: &dyn RangeBackend, expected: &[u8], rng: &mut Rng, count: usize) {
    let size = expected.len() as u64;
    assert_eq!(backend.size(), size);
    for i in 0..count {
        // Small, unaligned ranges and ranges of several MiB (split at rtmax, read in
        // parallel).
        let max = if i % 3 == 0 { size } else { 100_000.min(size) };
        let length = 1 + rng.below(max);
        let offset = rng.below(size - length + 1);
        let got = backend.read(offset, length).await.unwrap();
        assert!(
            got[..] == expected[offset as usize..(offset + length) as usize],
            "bytes {offset}+{length} of {} differ",
            backend.uri()
        );
    }
    let all = backend.read(0, size).await.unwrap();
    assert!(
        all[..] == expected[..],
        "the whole of {} differs",
        backend.uri()
    );
    assert!(backend.read(size, 0).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_match_the_files() {
    let Some(server) = Server::start() else {
        return;
    };
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let disk = rng.bytes((5 << 20) + 12_345);
    write_file(&server.path("sub/disk.img"), &disk);
    let sparse = write_sparse(&server.path("sub/sparse.img"), 40 << 20, &mut rng);
    std::os::unix::fs::symlink("disk.img", server.path("sub/latest.img")).unwrap();

    let backend = open(&server.uri("sub/disk.img")).await;
    eprintln!("{backend:?}");
    let meta = std::fs::metadata(server.path("sub/disk.img")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        backend.identity(),
        format!(
            "mtime:{}.{:09},fileid:{}",
            meta.mtime(),
            meta.mtime_nsec(),
            meta.ino()
        )
    );
    assert!(!backend.uri().contains("mountport"), "{}", backend.uri());
    check_reads(&*backend, &disk, &mut rng, 40).await;

    check_reads(
        &*open(&server.uri("sub/sparse.img")).await,
        &sparse,
        &mut rng,
        12,
    )
    .await;

    // A symbolic link is followed; parallel reads from several tasks share the pool.
    let latest = open(&server.uri("sub/latest.img")).await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..8u64 {
        let (latest, disk) = (latest.clone(), disk.clone());
        tasks.spawn(async move {
            let off = i * 600_000;
            let got = latest.read(off, 700_000).await.unwrap();
            assert!(got[..] == disk[off as usize..off as usize + 700_000]);
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn related_names_resolve_next_to_the_image() {
    let Some(server) = Server::start() else {
        return;
    };
    let mut rng = Rng(42);
    let base = rng.bytes(300_000);
    let top = rng.bytes(1000);
    write_file(&server.path("sub/disk.img"), &rng.bytes(4096));
    write_file(&server.path("sub/base.img"), &base);
    write_file(&server.path("top.img"), &top);

    let disk = open(&server.uri("sub/disk.img")).await;
    let sibling = disk.open_related("base.img").await.unwrap();
    check_reads(&*sibling, &base, &mut rng, 5).await;
    assert!(
        sibling.uri().ends_with("/sub/base.img"),
        "{}",
        sibling.uri()
    );

    let up = disk.open_related("../top.img").await.unwrap();
    check_reads(&*up, &top, &mut rng, 5).await;

    let absolute = server.path("sub/base.img").canonicalize().unwrap();
    let abs = disk.open_related(absolute.to_str().unwrap()).await.unwrap();
    check_reads(&*abs, &base, &mut rng, 5).await;

    // Names that would leave the export, or the server, are refused without a lookup.
    for (name, reason) in [
        ("../../../etc/passwd", "outside the export"),
        ("/etc/passwd", "outside the export"),
        ("nfs://127.0.0.2/srv/base.img", "scheme"),
        ("//127.0.0.2/srv/base.img", "network-path"),
    ] {
        let refused = disk.open_related(name).await.unwrap_err();
        assert_eq!(refused.kind, FetchErrorKind::Permanent, "{refused}");
        assert!(refused.to_string().contains(reason), "{name}: {refused}");
    }

    let missing = disk.open_related("nope.img").await.unwrap_err();
    assert_error(&missing, FetchErrorKind::Permanent, "nope.img");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_file_is_a_permanent_error_naming_the_uri() {
    let Some(server) = Server::start() else {
        return;
    };
    let uri = server.uri("sub/nope.img");
    let with_user = uri.replace("nfs://", "nfs://secret@");
    let err = nfs::open(&with_user, &RemoteConfig::default())
        .await
        .unwrap_err();
    let text = err.to_string();
    eprintln!("{text}");
    assert_eq!(err.kind, FetchErrorKind::Permanent, "{text}");
    let shown = uri.split('?').next().unwrap();
    assert_eq!(err.uri, shown);
    assert!(text.contains(shown), "{text}");
    assert!(text.contains("NOENT"), "{text}");
    assert!(
        !text.contains("secret") && !text.contains("mountport"),
        "{text}"
    );

    // A directory is not an image.
    let err = nfs::open(&server.uri("sub"), &RemoteConfig::default())
        .await
        .unwrap_err();
    assert_error(&err, FetchErrorKind::Permanent, "directory");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewritten_file_is_changed() {
    let Some(server) = Server::start() else {
        return;
    };
    let mut rng = Rng(7);
    let grown = server.path("sub/grown.img");
    let touched = server.path("sub/touched.img");
    let data = rng.bytes(2 << 20);
    write_file(&grown, &data);
    write_file(&touched, &data);
    let a = open(&server.uri("sub/grown.img")).await;
    let b = open(&server.uri("sub/touched.img")).await;
    assert!(a.read(0, 4096).await.unwrap()[..] == data[..4096]);
    assert!(b.read(0, 4096).await.unwrap()[..] == data[..4096]);

    // Rewritten in place with another size.
    write_file(&grown, &rng.bytes(3 << 20));
    let err = a.read(0, 4096).await.unwrap_err();
    assert_error(&err, FetchErrorKind::Changed, "size changed");

    // Same size and bytes, another mtime.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&touched)
        .unwrap();
    f.set_modified(SystemTime::now() + Duration::from_secs(3600))
        .unwrap();
    drop(f);
    let err = b.read(1 << 20, 8192).await.unwrap_err();
    assert_error(&err, FetchErrorKind::Changed, "modification time");
    assert_eq!(err.range, Some((1 << 20, 8192)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_server_is_transient() {
    let Some(server) = Server::start() else {
        return;
    };
    let data = Rng(3).bytes(100_000);
    write_file(&server.path("sub/disk.img"), &data);
    let backend = open(&server.uri("sub/disk.img")).await;
    assert!(backend.read(0, 100).await.unwrap()[..] == data[..100]);
    server.stop();
    let err = backend.read(0, 100).await.unwrap_err();
    assert_eq!(err.kind, FetchErrorKind::Transient, "{err}");
    let err = nfs::open(&server.uri("sub/disk.img"), &RemoteConfig::default())
        .await
        .unwrap_err();
    assert_eq!(err.kind, FetchErrorKind::Transient, "{err}");
}
