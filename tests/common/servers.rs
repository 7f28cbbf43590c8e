//! Real servers for the remote-source tests, started on loopback: nginx (Debian) for
//! HTTP, moto's server mode for S3.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::free_port;

fn wait_for_port(port: u16, what: &str, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited with {status} before listening");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} did not listen on port {port}");
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
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
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
    listen 127.0.0.1:{port};
    root {root};
    location /noranges/ {{ max_ranges 0; }}
  }}
}}
",
            root = root.display()
        );
        std::fs::create_dir_all(dir.path().join("tmp")).unwrap();
        let conf = dir.path().join("nginx.conf");
        std::fs::write(&conf, config).unwrap();
        let mut child = Command::new(nginx_binary())
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn nginx");
        wait_for_port(port, "nginx", &mut child);
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
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// nginx is in /usr/sbin, which is not on every PATH.
pub fn nginx_binary() -> PathBuf {
    super::which("nginx").unwrap_or_else(|| PathBuf::from("/usr/sbin/nginx"))
}

/// Whether nginx is installed (a skip outside CI, a failure in CI).
pub fn require_nginx() -> bool {
    if nginx_binary().is_file() {
        return true;
    }
    let msg = "missing test tool nginx: run tests/scripts/install-deps.sh as root";
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{msg}");
    }
    eprintln!("SKIP: {msg}");
    false
}
