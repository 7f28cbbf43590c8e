//! Real NBD servers for client tests: nbdkit on a unix socket, and waiting until a
//! server answers (its socket file exists before it listens).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use thinline_nbd::client::{Client, ClientOptions, NbdUri};

use crate::{KillOnDrop, require};

/// `nbdkit -f --exit-with-parent -U SOCK ARGS…`, killed when dropped.
pub fn nbdkit(sock: &Path, args: &[&str]) -> KillOnDrop {
    KillOnDrop::spawn(
        Command::new("nbdkit")
            .args(["-f", "--exit-with-parent", "-U", sock.to_str().unwrap()])
            .args(args),
    )
}

/// nbdkit on a socket in a temporary directory of its own, killed when dropped.
#[derive(Debug)]
pub struct Nbdkit {
    process: KillOnDrop,
    pub sock: PathBuf,
    /// The temporary directory, for other files a test needs (trigger files).
    pub dir: tempfile::TempDir,
}

impl Nbdkit {
    /// `nbdkit ARGS`; None where nbdkit is missing (a skip, or a failure in CI: see
    /// [`require`]).
    pub fn start(args: &[&str]) -> Option<Nbdkit> {
        if !require(&["nbdkit"]) {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("nbdkit.sock");
        Some(Nbdkit {
            process: nbdkit(&sock, args),
            sock,
            dir,
        })
    }

    /// nbdkit serving `size` zero bytes whose reads at or beyond `eio_from` fail with
    /// EIO (the message "EIO injected failure").
    pub fn eio_from(size: u64, eio_from: u64) -> Option<Nbdkit> {
        Nbdkit::start(&[
            "eval",
            &format!("get_size=echo {size}"),
            &format!(
                "pread=if [ $4 -ge {eio_from} ]; then echo 'EIO injected failure' >&2; exit 1; fi; head -c $3 /dev/zero"
            ),
        ])
    }

    /// The `nbd+unix://` URI of its export.
    pub fn uri(&self) -> String {
        unix_uri("", &self.sock)
    }

    /// A client with default options, once nbdkit answers.
    pub async fn client(&self) -> Client {
        connect_when_up(&self.uri(), &ClientOptions::default()).await
    }

    /// Kills nbdkit now and removes its socket.
    pub fn kill(&mut self) {
        self.process.kill();
        let _ = std::fs::remove_file(&self.sock);
    }

    /// Kills nbdkit and starts `nbdkit ARGS` on the same socket.
    pub fn restart(&mut self, args: &[&str]) {
        self.kill();
        self.process = nbdkit(&self.sock, args);
    }
}

/// The `nbd+unix://` URI of `export` on the server at `sock`.
pub fn unix_uri(export: &str, sock: &Path) -> String {
    format!("nbd+unix:///{export}?socket={}", sock.display())
}

/// Runs `f` under a deadline: a hang fails the test.
pub async fn within<T>(secs: u64, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .unwrap_or_else(|_| panic!("test did not finish within {secs} s"))
}

/// Connects until the server answers (15 s at most).
pub async fn connect_when_up(uri: &str, options: &ClientOptions) -> Client {
    let uri = NbdUri::parse(uri).unwrap();
    let start = Instant::now();
    loop {
        match Client::connect(&uri, options).await {
            Ok(c) => return c,
            Err(e) if start.elapsed() > Duration::from_secs(15) => {
                panic!("server at {uri} never answered: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}
