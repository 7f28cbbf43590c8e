//! Real servers for the remote-source tests, started on loopback: nginx (Debian) for
//! HTTP, moto's server mode for S3, nfs-ganesha for NFSv3.
//!
//! nginx and moto get a listening socket bound by the test ([`crate::ports`]), so their
//! ports cannot race with other tests'.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::ports::{LISTEN_FD, loopback_listener, pass_listener};
use crate::{run, skip};

/// Waits until the HTTP server on `port` answers a request. Its socket listens from the
/// start (inherited), so a connection alone says nothing: the server must have read the
/// request.
fn wait_for_http(port: u16, what: &str, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
            let mut byte = [0u8; 1];
            if s.write_all(b"HEAD / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
                .is_ok()
                && s.read(&mut byte).is_ok_and(|n| n == 1)
            {
                return;
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited with {status} before serving");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} did not answer on port {port}");
}

/// Starts the HTTP server `cmd` on `listener` (passed as [`LISTEN_FD`]) with stdin and
/// stdout closed and the given stderr, and waits until it answers.
fn start_http(cmd: &mut Command, listener: TcpListener, stderr: Stdio, what: &str) -> Child {
    let port = listener.local_addr().unwrap().port();
    pass_listener(cmd, &listener);
    let mut child = crate::spawn(cmd, Stdio::null(), stderr);
    drop(listener);
    wait_for_http(port, what, &mut child);
    child
}

/// nginx serving `root` on 127.0.0.1 with byte ranges, plus `/noranges/` (the same
/// files under `root/noranges`) with ranges disabled.
#[derive(Debug)]
pub struct Nginx {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Nginx {
    pub fn start(root: &Path) -> Nginx {
        Nginx::start_with(root, None, loopback_listener())
    }

    /// nginx on `port` (of an nginx that stopped: a server that comes back).
    pub fn start_at(root: &Path, port: u16) -> Nginx {
        let listener = std::net::TcpListener::bind(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("bind 127.0.0.1:{port}: {e}"));
        Nginx::start_with(root, None, listener)
    }

    /// nginx with TLS and HTTP/2 (`cert`, `key`: PEM files).
    pub fn start_tls(root: &Path, cert: &Path, key: &Path) -> Nginx {
        Nginx::start_with(root, Some((cert, key)), loopback_listener())
    }

    /// nginx adopts an inherited socket (listed in $NGINX) whose address matches a
    /// `listen` directive instead of binding one: `listener`.
    fn start_with(
        root: &Path,
        tls: Option<(&Path, &Path)>,
        listener: std::net::TcpListener,
    ) -> Nginx {
        let dir = tempfile::tempdir().unwrap();
        // nginx keeps an inherited socket's mode, and its workers all wait for the same
        // listening socket: a blocking one leaves the workers that lose the race for a
        // connection asleep in accept(), with every request they hold stalled until the
        // next connection arrives (30 s first-byte timeouts in the remote tests).
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let d = dir.path().display();
        let config = format!(
            "user root;
daemon off;
worker_processes 2;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 1024; }}
http {{
  access_log {d}/access.log;
  client_body_temp_path {d}/tmp;
  proxy_temp_path {d}/tmp;
  fastcgi_temp_path {d}/tmp;
  uwsgi_temp_path {d}/tmp;
  scgi_temp_path {d}/tmp;
  keepalive_requests 100000;
  server {{
    listen 127.0.0.1:{port}{tls_listen};
    {tls_files}
    root {root};
    location /noranges/ {{ max_ranges 0; }}
  }}
}}
",
            root = root.display(),
            tls_listen = if tls.is_some() { " ssl http2" } else { "" },
            tls_files = tls.map_or(String::new(), |(cert, key)| format!(
                "ssl_certificate {};\n    ssl_certificate_key {};",
                cert.display(),
                key.display()
            )),
        );
        std::fs::create_dir_all(dir.path().join("tmp")).unwrap();
        let conf = dir.path().join("nginx.conf");
        std::fs::write(&conf, config).unwrap();
        let child = start_http(
            Command::new(nginx_binary())
                .arg("-c")
                .arg(&conf)
                .env("NGINX", format!("{LISTEN_FD};")),
            listener,
            Stdio::inherit(),
            "nginx",
        );
        Nginx {
            child,
            port,
            _dir: dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!(
            "http://127.0.0.1:{}/{}",
            self.port,
            path.trim_start_matches('/')
        )
    }

    /// Range requests in the access log so far.
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("access.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its workers (SIGKILL would orphan them).
        crate::signal(&self.child, libc::SIGTERM);
        if crate::wait_timeout(&mut self.child, Duration::from_secs(10)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// nginx is in /usr/sbin, which is not on every PATH.
pub fn nginx_binary() -> PathBuf {
    crate::which("nginx").unwrap_or_else(|| PathBuf::from("/usr/sbin/nginx"))
}

/// Whether nginx is installed (a skip outside CI, a failure in CI).
pub fn require_nginx() -> bool {
    if nginx_binary().is_file() {
        return true;
    }
    skip("missing test tool nginx: run tests/scripts/install-deps.sh as root")
}

/// Where install-deps.sh puts moto's venv.
pub const MOTO_VENV: &str = "/var/cache/thinline/moto";

/// moto's server binary: $THINLINE_MOTO_SERVER, the install-deps venv, or PATH.
pub fn moto_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("THINLINE_MOTO_SERVER") {
        return Some(PathBuf::from(p));
    }
    let venv = Path::new(MOTO_VENV).join("bin/moto_server");
    if venv.is_file() {
        return Some(venv);
    }
    crate::which("moto_server")
}

/// Whether moto is installed (a skip outside CI, a failure in CI).
pub fn require_moto() -> bool {
    if moto_binary().is_some() {
        return true;
    }
    skip("missing test tool moto_server: run tests/scripts/install-deps.sh as root")
}

/// moto's S3 server (a real HTTP implementation of the S3 API, from PyPI) on 127.0.0.1.
/// It accepts any credentials; objects are uploaded with plain HTTP PUTs.
#[derive(Debug)]
pub struct Moto {
    child: Child,
    pub port: u16,
}

impl Moto {
    pub fn start() -> Moto {
        // moto serves with werkzeug's run_simple, which takes over the socket in
        // $WERKZEUG_SERVER_FD when it believes a reloader started it
        // (WERKZEUG_RUN_MAIN=true); no reloader runs. `-p` still names the port, which
        // moto uses in the URLs it makes.
        let listener = loopback_listener();
        let port = listener.local_addr().unwrap().port();
        let child = start_http(
            Command::new(moto_binary().expect("moto_server"))
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .env("WERKZEUG_RUN_MAIN", "true")
                .env("WERKZEUG_SERVER_FD", LISTEN_FD.to_string()),
            listener,
            Stdio::null(),
            "moto_server",
        );
        Moto { child, port }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn curl(&self, args: &[&str]) -> String {
        // moto does not check signatures, but refuses some anonymous overwrites.
        let auth = "Authorization: AWS4-HMAC-SHA256 Credential=AKIATESTKEY/20260101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=0";
        crate::stdout(
            Command::new("curl")
                .args([
                    "-sSf",
                    "-H",
                    "Expect:",
                    "-H",
                    "Content-Type: application/octet-stream",
                ])
                .args(["-H", auth])
                .args(args),
        )
    }

    /// Creates `bucket`, with versioning if asked.
    pub fn create_bucket(&self, bucket: &str, versioning: bool) {
        self.curl(&["-X", "PUT", &format!("{}/{bucket}", self.endpoint())]);
        if versioning {
            self.curl(&[
                "-X",
                "PUT",
                "--data-binary",
                "<VersioningConfiguration xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Status>Enabled</Status></VersioningConfiguration>",
                &format!("{}/{bucket}?versioning", self.endpoint()),
            ]);
        }
    }

    /// Uploads `file` as `bucket/key`; returns the version id, if versioning is on.
    pub fn put(&self, bucket: &str, key: &str, file: &Path) -> Option<String> {
        let headers = self.curl(&[
            "-X",
            "PUT",
            "-D",
            "-",
            "-o",
            "/dev/null",
            "--data-binary",
            &format!("@{}", file.display()),
            &format!("{}/{bucket}/{key}", self.endpoint()),
        ]);
        headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("x-amz-version-id")
                .then(|| v.trim().to_owned())
                .filter(|v| v != "null")
        })
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// nfs-ganesha exporting a directory read-only over NFSv3 on 127.0.0.1
/// (tests/scripts/nfs-server.sh; needs root). Ganesha cannot take an inherited socket:
/// the script picks its ports, and serialises starts with a lock.
#[derive(Debug)]
pub struct NfsServer {
    state: PathBuf,
    export: PathBuf,
    pub nfs_port: u16,
    pub mount_port: u16,
}

fn nfs_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/scripts/nfs-server.sh")
}

/// Whether the NFS test server can run (a skip outside CI, a failure in CI).
pub fn require_nfs_server() -> bool {
    let missing: Vec<&str> = ["ganesha.nfsd", "rpcbind", "rpcinfo", "flock"]
        .into_iter()
        .filter(|t| crate::which(t).is_none() && !Path::new("/usr/sbin").join(t).is_file())
        .collect();
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let msg = if !missing.is_empty() {
        format!("missing test tools {missing:?}: run tests/scripts/install-deps.sh as root")
    } else if !root {
        "the NFS test server (nfs-ganesha, VFS export) needs root".to_owned()
    } else {
        return true;
    };
    skip(&msg)
}

impl NfsServer {
    /// Exports `dir` (which must outlive the server).
    pub fn start(dir: &Path) -> NfsServer {
        let state = dir.with_extension("nfs-state");
        run(Command::new(nfs_script())
            .env("NFS_SERVER_OWNER", std::process::id().to_string())
            .env(
                "PATH",
                format!(
                    "/usr/sbin:/sbin:{}",
                    std::env::var("PATH").unwrap_or_default()
                ),
            )
            .arg("start")
            .arg(dir)
            .arg(&state));
        let text = std::fs::read_to_string(&state).unwrap();
        let get = |key: &str| -> String {
            text.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
                .unwrap_or_else(|| panic!("no {key} in {text}"))
                .to_owned()
        };
        NfsServer {
            nfs_port: get("nfs_port").parse().unwrap(),
            mount_port: get("mount_port").parse().unwrap(),
            export: PathBuf::from(get("export")),
            state,
        }
    }

    /// `nfs://127.0.0.1:PORT/EXPORT/NAME?mountport=M`.
    pub fn uri(&self, name: &str) -> String {
        format!(
            "nfs://127.0.0.1:{}{}/{name}?mountport={}",
            self.nfs_port,
            self.export.display(),
            self.mount_port
        )
    }
}

impl NfsServer {
    /// Stops the server (it vanishes under its clients); dropping it does too.
    pub fn stop(&self) {
        let _ = Command::new(nfs_script())
            .arg("stop")
            .arg(&self.state)
            .status();
    }
}

impl Drop for NfsServer {
    fn drop(&mut self) {
        self.stop();
    }
}
