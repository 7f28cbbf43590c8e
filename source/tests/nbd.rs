//! The `nbd://` template source against real NBD servers: nbdkit (errors, restarts,
//! a changed size) and Thinline's own server in process. The client underneath is
//! tested on its own in `nbd-server/tests/client.rs`.
//!
//! Tools are checked with `require`: outside CI a missing tool skips the test with a
//! message; with `CI=true` it fails (tests/scripts/install-deps.sh installs them).

use std::sync::Arc;

use thinline_nbd::raw::{RawExport, RawOptions};
use thinline_nbd::server::{ExportSet, Listener, Server, ServerConfig};
use thinline_source::nbd::NbdBackend;
use thinline_source::{FetchErrorKind, RangeBackend, RemoteConfig};
use thinline_test_support::nbd_servers::{Nbdkit, unix_uri, within};
use thinline_test_support::rng::Rng;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_eio_reply_is_a_transient_fetch_error() {
    let Some(eio) = Nbdkit::eio_from(1 << 20, 524_288) else {
        return;
    };
    within(60, async {
        drop(eio.client().await);
        let backend = NbdBackend::open(&eio.uri(), &RemoteConfig::default())
            .await
            .unwrap();
        assert!(backend.read(0, 4096).await.unwrap().iter().all(|&b| b == 0));
        let e = backend.read(524_288, 4096).await.unwrap_err();
        assert_eq!(e.kind, FetchErrorKind::Transient, "{e}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_reconnects_after_the_server_restarts_and_sees_size_changes() {
    let Some(mut server) = Nbdkit::start(&["pattern", "size=1M"]) else {
        return;
    };
    let uri = server.uri();
    within(60, async {
        drop(server.client().await);
        let backend = NbdBackend::open(&uri, &RemoteConfig::default())
            .await
            .unwrap();
        assert_eq!(backend.size(), 1 << 20);
        assert_eq!(backend.identity(), "size:1048576");
        assert_eq!(
            backend.max_connections(),
            4,
            "nbdkit pattern allows multi-conn"
        );
        assert_eq!(backend.uri(), uri);
        let e = backend.open_related("base.qcow2").await.unwrap_err();
        assert_eq!(e.kind, FetchErrorKind::Permanent);
        assert!(e.to_string().contains("names no related files"), "{e}");
        // Use every slot.
        for i in 0..8 {
            let d = backend.read(i * 8, 8).await.unwrap();
            assert_eq!(&d[..], &(i * 8).to_be_bytes());
        }
        server.kill();
        let e = backend.read(0, 8).await.unwrap_err();
        assert_eq!(e.kind, FetchErrorKind::Transient, "{e}");
        let beyond = backend.read(1 << 20, 1).await.unwrap_err();
        assert_eq!(beyond.kind, FetchErrorKind::Permanent);

        server.restart(&["pattern", "size=1M"]);
        drop(server.client().await);
        for i in 0..8 {
            let d = backend.read(4096 + i * 8, 8).await.unwrap();
            assert_eq!(&d[..], &(4096 + i * 8).to_be_bytes());
        }
        server.restart(&["pattern", "size=2M"]);
        drop(server.client().await);
        let mut changed = false;
        for i in 0..4 {
            if let Err(e) = backend.read(i * 8, 8).await {
                assert_eq!(e.kind, FetchErrorKind::Changed, "{e}");
                changed = true;
            }
        }
        assert!(changed, "the new size went unnoticed");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thinline_s_own_server_is_read_with_its_size_as_identity() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.img");
    let bytes = Rng(0x9e37_79b9_7f4a_7c15).bytes(4 << 20);
    std::fs::write(&file, &bytes).unwrap();
    let mut exports = ExportSet::new();
    exports
        .add(
            "disk",
            Arc::new(RawExport::open(&file, &RawOptions::default()).unwrap()),
        )
        .unwrap();
    let sock = dir.path().join("thinline.sock");
    let listener = Listener::bind_unix(&sock).unwrap();
    let server = Server::new(exports, ServerConfig::default()).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(vec![listener], async {
        let _ = stopped.await;
    }));
    within(60, async {
        let backend = NbdBackend::open(&unix_uri("disk", &sock), &RemoteConfig::default())
            .await
            .unwrap();
        assert_eq!(backend.identity(), format!("size:{}", 4 << 20));
        let d = backend.read(1 << 20, 65536).await.unwrap();
        assert!(d == bytes[1 << 20..(1 << 20) + 65536]);
    })
    .await;
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
}
