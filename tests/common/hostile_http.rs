//! A scriptable HTTP/1.1 server for the security tests: it records every request head
//! and lets the test answer each one as a hostile or broken server would (endless or
//! trickling bodies, redirects to other hosts, sizes no file can have), or as a correct
//! range server over in-memory files.
//!
//! It listens on 127.0.0.1 only, and every loop that writes a body is bounded in bytes
//! and time, so a test that fails never leaves it sending forever.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use thinline_test_support::Acceptor;

/// One request head as received.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// Path and query, as sent.
    pub target: String,
    pub headers: Vec<(String, String)>,
}

impl Request {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The path without the query.
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }

    /// `Range: bytes=A-B` as `(A, B)`.
    pub fn range(&self) -> Option<(u64, u64)> {
        let spec = self.header("range")?.strip_prefix("bytes=")?;
        let (a, b) = spec.split_once('-')?;
        Some((a.parse().ok()?, b.parse().ok()?))
    }
}

/// How a handler answers: keep the connection for the next request, or close it.
pub enum Next {
    KeepAlive,
    Close,
}

type Handler = dyn Fn(&Request, &mut TcpStream) -> io::Result<Next> + Send + Sync;

/// What the connections of a [`HostileHttp`] share.
struct Shared {
    handler: Box<Handler>,
    requests: Mutex<Vec<Request>>,
}

/// A running server; stops accepting when dropped.
pub struct HostileHttp {
    pub port: u16,
    shared: Arc<Shared>,
    acceptor: Acceptor,
}

impl HostileHttp {
    /// Starts a server whose requests are answered by `handler`.
    pub fn start(
        handler: impl Fn(&Request, &mut TcpStream) -> io::Result<Next> + Send + Sync + 'static,
    ) -> HostileHttp {
        let shared = Arc::new(Shared {
            handler: Box::new(handler),
            requests: Mutex::default(),
        });
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let acceptor = Acceptor::serve_each(listener, &shared, serve_connection);
        HostileHttp {
            port: acceptor.port,
            shared,
            acceptor,
        }
    }

    /// A correct range server over `files` (path → bytes), with a strong ETag per file.
    pub fn files(files: BTreeMap<String, Vec<u8>>) -> HostileHttp {
        HostileHttp::start(move |req, s| match files.get(req.path()) {
            Some(data) => range_response(s, req, data),
            None => status(s, 404, "Not Found"),
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Every request head received so far.
    pub fn requests(&self) -> Vec<Request> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.acceptor.accepted()
    }
}

fn serve_connection(stream: TcpStream, shared: &Shared, stop: &AtomicBool) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut stream = stream;
    while !stop.load(Ordering::SeqCst) {
        let Some(request) = read_head(&mut reader) else {
            return;
        };
        shared.requests.lock().unwrap().push(request.clone());
        match (shared.handler)(&request, &mut stream) {
            Ok(Next::KeepAlive) => {}
            Ok(Next::Close) | Err(_) => {
                let _ = stream.shutdown(Shutdown::Both);
                return;
            }
        }
    }
}

fn read_head(reader: &mut impl BufRead) -> Option<Request> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_owned();
    let target = parts.next()?.to_owned();
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':')?;
        headers.push((name.trim().to_owned(), value.trim().to_owned()));
    }
    Some(Request {
        method,
        target,
        headers,
    })
}

/// A bodiless answer with `code`.
pub fn status(s: &mut TcpStream, code: u16, reason: &str) -> io::Result<Next> {
    write!(s, "HTTP/1.1 {code} {reason}\r\nContent-Length: 0\r\n\r\n")?;
    Ok(Next::KeepAlive)
}

/// A redirect to `location`.
pub fn redirect(s: &mut TcpStream, location: &str) -> io::Result<Next> {
    write!(
        s,
        "HTTP/1.1 302 Found\r\nLocation: {location}\r\nContent-Length: 0\r\n\r\n"
    )?;
    Ok(Next::KeepAlive)
}

/// A correct answer to a range request for `data` (a 416 outside it).
pub fn range_response(s: &mut TcpStream, req: &Request, data: &[u8]) -> io::Result<Next> {
    let size = data.len() as u64;
    let Some((a, b)) = req.range() else {
        write!(
            s,
            "HTTP/1.1 200 OK\r\nETag: \"v1\"\r\nContent-Length: {size}\r\n\r\n"
        )?;
        s.write_all(data)?;
        return Ok(Next::KeepAlive);
    };
    if a >= size || b < a {
        write!(
            s,
            "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{size}\r\nContent-Length: 0\r\n\r\n"
        )?;
        return Ok(Next::KeepAlive);
    }
    let b = b.min(size - 1);
    write!(
        s,
        "HTTP/1.1 206 Partial Content\r\nETag: \"v1\"\r\nContent-Range: bytes {a}-{b}/{size}\r\nContent-Length: {}\r\n\r\n",
        b - a + 1
    )?;
    s.write_all(&data[a as usize..=b as usize])?;
    Ok(Next::KeepAlive)
}

/// A 206 head for `bytes a-b/size` followed by a chunked body that never ends (up to
/// `limit` bytes or 20 s, whichever comes first, then the connection closes).
pub fn endless_body(s: &mut TcpStream, req: &Request, size: u64, limit: u64) -> io::Result<Next> {
    let (a, b) = req.range().unwrap_or((0, 0));
    write!(
        s,
        "HTTP/1.1 206 Partial Content\r\nETag: \"v1\"\r\nContent-Range: bytes {a}-{b}/{size}\r\nTransfer-Encoding: chunked\r\n\r\n"
    )?;
    let chunk = vec![b'x'; 64 * 1024];
    let started = Instant::now();
    let mut sent = 0;
    while sent < limit && started.elapsed() < Duration::from_secs(20) {
        write!(s, "{:x}\r\n", chunk.len())?;
        s.write_all(&chunk)?;
        s.write_all(b"\r\n")?;
        sent += chunk.len() as u64;
    }
    Ok(Next::Close)
}

/// A correct 206 head for the range asked, then its body one byte every `every`
/// (at most 60 s, then the connection closes).
pub fn trickle(s: &mut TcpStream, req: &Request, data: &[u8], every: Duration) -> io::Result<Next> {
    let size = data.len() as u64;
    let (a, b) = req.range().unwrap_or((0, size - 1));
    let b = b.min(size - 1);
    write!(
        s,
        "HTTP/1.1 206 Partial Content\r\nETag: \"v1\"\r\nContent-Range: bytes {a}-{b}/{size}\r\nContent-Length: {}\r\n\r\n",
        b - a + 1
    )?;
    let started = Instant::now();
    for byte in &data[a as usize..=b as usize] {
        if started.elapsed() > Duration::from_secs(60) {
            break;
        }
        s.write_all(&[*byte])?;
        std::thread::sleep(every);
    }
    Ok(Next::Close)
}
