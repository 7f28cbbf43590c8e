//! Helpers shared by Thinline's test crates (`tests/`, `nbd-server/tests`, `format/tests`).
//!
//! They lived as copies in each test crate; one crate keeps them in step. What is here:
//!
//! - [`require`] and friends: a test that needs an external tool skips with a message
//!   when it is missing, except in CI (`CI=true`), where the test command installs
//!   everything (tests/scripts/install-deps.sh) and a missing tool is a failure.
//! - [`ports`]: servers a test starts listen on a socket the test bound to port 0 and
//!   hands over, so tests running in parallel never race for a port.
//! - [`servers`]: real servers started on loopback (nginx, moto's S3, nfs-ganesha).
//! - [`qemu`]: image fixtures made with qemu-img and qemu-io.
//! - [`faults`]: the fault-injecting HTTP and TCP proxies.
//! - [`rng`]: a deterministic generator for test data and random ranges.
//! - `fake_nbd` (feature `nbd`): a fake NBD server that breaks the protocol on demand;
//!   `nbd_servers` (feature `nbd`): nbdkit, and waiting until a server answers.
//! - Process helpers: [`run`], [`stdout`], [`signal`], [`wait_timeout`], [`KillOnDrop`];
//!   [`Acceptor`], the accept loop of the loopback servers.

#[cfg(feature = "nbd")]
pub mod fake_nbd;
pub mod faults;
#[cfg(feature = "nbd")]
pub mod nbd_servers;
pub mod ports;
pub mod qemu;
pub mod rng;
pub mod servers;

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// True when running in CI (`CI=true`), where a missing tool fails a test.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Reports that a test cannot run here: a panic in CI, a visible `SKIP:` line elsewhere.
/// Returns false, for `if !ok { return skip(…) }`-style checks.
pub fn skip(msg: &str) -> bool {
    if in_ci() {
        panic!("{msg}");
    }
    eprintln!("SKIP: {msg}");
    false
}

/// True if every tool is on PATH. In CI a missing tool is a failure, elsewhere a skip.
pub fn require(tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| which(t).is_none())
        .collect();
    if missing.is_empty() {
        return true;
    }
    skip(&format!(
        "missing test tools {missing:?}: run tests/scripts/install-deps.sh as root"
    ))
}

/// Where `tool` is on PATH, if it is.
pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// Runs a command, panicking with its output if it fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// [`run`], returning its stdout as text.
pub fn stdout(cmd: &mut Command) -> String {
    String::from_utf8(run(cmd).stdout).unwrap()
}

/// Sends `sig` to a child process.
pub fn signal(child: &Child, sig: i32) {
    let pid = i32::try_from(child.id()).unwrap();
    // SAFETY: kill(2) with a pid we spawned and a valid signal number has no memory effects.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Waits at most `timeout` for a child to exit.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Starts `cmd` with stdin closed and the given stdout and stderr, panicking if it
/// cannot start.
pub fn spawn(cmd: &mut Command, stdout: Stdio, stderr: Stdio) -> Child {
    cmd.stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"))
}

/// Accepts connections on `listener` in a thread of its own and hands each to
/// `handle`, until `stop` is set: it is checked as each connection arrives, so whoever
/// sets it then connects once to end the loop.
fn accept_until_stopped(
    listener: TcpListener,
    stop: Arc<AtomicBool>,
    mut handle: impl FnMut(TcpStream) + Send + 'static,
) {
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let Ok(conn) = conn else { continue };
            handle(conn);
        }
    });
}

/// The accepting side of a loopback test server: a thread that accepts connections on
/// its listener and hands them on, until the `Acceptor` is dropped.
#[derive(Debug)]
pub struct Acceptor {
    pub port: u16,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
}

impl Acceptor {
    /// Hands each connection accepted on `listener` (on 127.0.0.1) to `handle`, in the
    /// accepting thread.
    pub fn start(
        listener: TcpListener,
        handle: impl FnMut(TcpStream) + Send + 'static,
    ) -> Acceptor {
        Acceptor::with_stop(listener, Arc::default(), handle)
    }

    /// Serves each connection accepted on `listener` (on 127.0.0.1) in a thread of its
    /// own: `serve(connection, state, stopped)`, where `stopped` is set once the acceptor
    /// is dropped, for connections that would otherwise go on.
    pub fn serve_each<S: Send + Sync + 'static>(
        listener: TcpListener,
        state: &Arc<S>,
        serve: impl Fn(TcpStream, &S, &AtomicBool) + Send + Sync + 'static,
    ) -> Acceptor {
        let stop = Arc::<AtomicBool>::default();
        let (state, stopped, serve) = (Arc::clone(state), Arc::clone(&stop), Arc::new(serve));
        Acceptor::with_stop(listener, stop, move |conn| {
            let (state, stopped, serve) =
                (Arc::clone(&state), Arc::clone(&stopped), Arc::clone(&serve));
            std::thread::spawn(move || serve(conn, &state, &stopped));
        })
    }

    fn with_stop(
        listener: TcpListener,
        stop: Arc<AtomicBool>,
        mut handle: impl FnMut(TcpStream) + Send + 'static,
    ) -> Acceptor {
        let acceptor = Acceptor {
            port: listener.local_addr().unwrap().port(),
            stop,
            accepted: Arc::default(),
        };
        let accepted = Arc::clone(&acceptor.accepted);
        accept_until_stopped(listener, Arc::clone(&acceptor.stop), move |conn| {
            accepted.fetch_add(1, Ordering::SeqCst);
            handle(conn);
        });
        acceptor
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Stops accepting: sets the stop flag, then connects once so that the accepting
    /// thread sees it. Only the first call does anything.
    pub fn stop(&self) {
        if !self.stop.swap(true, Ordering::SeqCst) {
            let _ = TcpStream::connect(("127.0.0.1", self.port));
        }
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A child process (a server), killed and reaped when dropped.
#[derive(Debug)]
pub struct KillOnDrop(pub Child);

impl KillOnDrop {
    /// Starts `cmd` with stdin and stdout closed and stderr inherited.
    pub fn spawn(cmd: &mut Command) -> KillOnDrop {
        KillOnDrop(spawn(cmd, Stdio::null(), Stdio::inherit()))
    }

    /// Kills the process now and waits for it.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.kill();
    }
}
