//! A fault-injecting HTTP proxy for the remote-source tests: sits between thinline and
//! a real server (nginx, the S3 server) and, per request, adds latency, answers 503
//! (or S3's SlowDown), resets the connection, or cuts the body short.
//!
//! It understands just enough HTTP/1.1 (request heads, `Content-Length` bodies) to
//! apply a fault to exactly one request on a keep-alive connection.

use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::Acceptor;

/// What to do to one request.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Answer with this status and body instead of forwarding.
    Status(u16, &'static str),
    /// Close the connection with a TCP reset instead of answering.
    Reset,
    /// Forward the response head and half of the body, then close.
    Truncate,
}

/// S3's throttling answer.
pub const SLOW_DOWN: Fault = Fault::Status(
    503,
    "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>",
);

#[derive(Debug, Default)]
struct Faults {
    latency: Duration,
    queue: VecDeque<Fault>,
    /// Applied to every request while set (after the queue is empty).
    always: Option<Fault>,
}

/// What the connections of a [`FaultProxy`] share.
#[derive(Debug, Default)]
struct Shared {
    faults: Mutex<Faults>,
    requests: AtomicU64,
    injected: AtomicU64,
}

/// A running proxy; stops when dropped.
#[derive(Debug)]
pub struct FaultProxy {
    pub port: u16,
    shared: Arc<Shared>,
    _acceptor: Acceptor,
}

impl FaultProxy {
    /// Proxies 127.0.0.1:`upstream`.
    pub fn start(upstream: u16) -> FaultProxy {
        FaultProxy::start_on(TcpListener::bind("127.0.0.1:0").unwrap(), upstream)
    }

    /// Proxies 127.0.0.1:`upstream` for the clients of `listener` (the latency proxy
    /// of `examples/latency-proxy.rs` listens on a port it is given).
    pub fn start_on(listener: TcpListener, upstream: u16) -> FaultProxy {
        let shared = Arc::<Shared>::default();
        let acceptor = Acceptor::serve_each(listener, &shared, move |client, shared, _| {
            let _ = serve(client, upstream, shared);
        });
        FaultProxy {
            port: acceptor.port,
            shared,
            _acceptor: acceptor,
        }
    }

    /// `http://127.0.0.1:PORT/path`.
    pub fn url(&self, path: &str) -> String {
        format!(
            "http://127.0.0.1:{}/{}",
            self.port,
            path.trim_start_matches('/')
        )
    }

    /// Delay before every response head.
    pub fn set_latency(&self, latency: Duration) {
        self.shared.faults.lock().unwrap().latency = latency;
    }

    /// Applies `fault` to the next `count` requests.
    pub fn inject(&self, fault: Fault, count: usize) {
        let mut f = self.shared.faults.lock().unwrap();
        f.queue.extend(std::iter::repeat_n(fault, count));
    }

    /// Applies `fault` to every request until [`FaultProxy::clear`].
    pub fn always(&self, fault: Fault) {
        self.shared.faults.lock().unwrap().always = Some(fault);
    }

    /// Removes every fault (latency included).
    pub fn clear(&self) {
        *self.shared.faults.lock().unwrap() = Faults::default();
    }

    /// Requests seen so far.
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// Faults applied so far.
    pub fn injected(&self) -> u64 {
        self.shared.injected.load(Ordering::SeqCst)
    }

    /// Faults still queued.
    pub fn queued(&self) -> usize {
        self.shared.faults.lock().unwrap().queue.len()
    }
}

/// Reads an HTTP head (through the blank line); `None` at a clean end of stream.
fn read_head(r: &mut impl BufRead) -> io::Result<Option<Vec<u8>>> {
    let mut head = Vec::new();
    loop {
        let before = head.len();
        let n = r.read_until(b'\n', &mut head)?;
        if n == 0 {
            return if head.is_empty() {
                Ok(None)
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
        if &head[before..] == b"\r\n" || &head[before..] == b"\n" {
            return Ok(Some(head));
        }
    }
}

fn header(head: &[u8], name: &str) -> Option<String> {
    String::from_utf8_lossy(head).lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_owned())
    })
}

fn reset(stream: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket fd and a correctly sized `linger` struct.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    let _ = stream.shutdown(Shutdown::Both);
}

/// Sends `head`, then copies `n` body bytes (fewer if the upstream ends first) straight
/// out of the reader's buffer: one `send` per buffer fill, where `io::copy` through `take`
/// would send 8 KiB at a time. A small first piece goes out in the same `send` as the
/// head, so the client wakes once for a small response.
fn copy_body(
    from: &mut BufReader<TcpStream>,
    to: &mut TcpStream,
    head: &[u8],
    mut n: u64,
) -> io::Result<()> {
    let mut head = Some(head);
    while n > 0 {
        let buf = from.fill_buf()?;
        if buf.is_empty() {
            break;
        }
        let k = buf.len().min(usize::try_from(n).unwrap_or(usize::MAX));
        match head.take() {
            Some(h) if k <= 64 << 10 => to.write_all(&[h, &buf[..k]].concat())?,
            Some(h) => {
                to.write_all(h)?;
                to.write_all(&buf[..k])?;
            }
            None => to.write_all(&buf[..k])?,
        }
        from.consume(k);
        n -= k as u64;
    }
    if let Some(h) = head {
        to.write_all(h)?;
    }
    Ok(())
}

fn serve(client: TcpStream, upstream_port: u16, shared: &Shared) -> io::Result<()> {
    client.set_nodelay(true)?;
    let mut client_reader = BufReader::new(client.try_clone()?);
    let mut client_writer = client;
    let mut upstream: Option<(BufReader<TcpStream>, TcpStream)> = None;
    while let Some(request) = read_head(&mut client_reader)? {
        shared.requests.fetch_add(1, Ordering::SeqCst);
        let mut body =
            vec![0; header(&request, "content-length").map_or(0, |v| v.parse().unwrap_or(0))];
        client_reader.read_exact(&mut body)?;
        let is_head = request.starts_with(b"HEAD ");
        let (fault, latency) = {
            let mut f = shared.faults.lock().unwrap();
            (f.queue.pop_front().or_else(|| f.always.clone()), f.latency)
        };
        if fault.is_some() {
            shared.injected.fetch_add(1, Ordering::SeqCst);
        }
        std::thread::sleep(latency);
        match fault {
            Some(Fault::Status(code, text)) => {
                let reply = format!(
                    "HTTP/1.1 {code} Injected\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                    text.len()
                );
                client_writer.write_all(reply.as_bytes())?;
                return Ok(());
            }
            Some(Fault::Reset) => {
                reset(&client_writer);
                return Ok(());
            }
            _ => {}
        }
        if upstream.is_none() {
            let s = TcpStream::connect(("127.0.0.1", upstream_port))?;
            s.set_nodelay(true)?;
            // A large buffer: bodies are copied through it, 256 KiB per system call
            // rather than 8 KiB (the bench's latency proxy must not be the bottleneck).
            upstream = Some((BufReader::with_capacity(256 << 10, s.try_clone()?), s));
        }
        let (up_reader, up_writer) = upstream.as_mut().unwrap();
        up_writer.write_all(&request)?;
        up_writer.write_all(&body)?;
        let Some(response) = read_head(up_reader)? else {
            return Ok(());
        };
        let status: u16 = String::from_utf8_lossy(&response)
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let length = if is_head || status == 204 || status == 304 {
            Some(0)
        } else {
            header(&response, "content-length").and_then(|v| v.parse::<u64>().ok())
        };
        match (length, &fault) {
            (Some(n), Some(Fault::Truncate)) => {
                copy_body(up_reader, &mut client_writer, &response, n / 2)?;
                client_writer.flush()?;
                let _ = client_writer.shutdown(Shutdown::Both);
                return Ok(());
            }
            (Some(n), _) => {
                copy_body(up_reader, &mut client_writer, &response, n)?;
            }
            (None, _) => {
                client_writer.write_all(&response)?;
                // No length: the body ends when the upstream closes.
                io::copy(up_reader, &mut client_writer)?;
                return Ok(());
            }
        }
    }
    Ok(())
}

/// A plain TCP proxy for protocols other than HTTP (NFS, NBD): forwards bytes both
/// ways and can reset every connection it carries at once.
#[derive(Debug)]
pub struct TcpFaultProxy {
    pub port: u16,
    connections: Arc<Mutex<Vec<TcpStream>>>,
    accepted: Arc<AtomicU64>,
    acceptor: Acceptor,
}

impl TcpFaultProxy {
    /// Proxies 127.0.0.1:`upstream`.
    pub fn start(upstream: u16) -> TcpFaultProxy {
        let connections = Arc::<Mutex<Vec<TcpStream>>>::default();
        let accepted = Arc::<AtomicU64>::default();
        let (open, carried) = (Arc::clone(&connections), Arc::clone(&accepted));
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let acceptor = Acceptor::start(listener, move |client| {
            let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                reset(&client);
                return;
            };
            carried.fetch_add(1, Ordering::SeqCst);
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            open.lock().unwrap().push(client.try_clone().unwrap());
            for (mut from, mut to) in [
                (client.try_clone().unwrap(), server.try_clone().unwrap()),
                (server, client),
            ] {
                std::thread::spawn(move || {
                    let _ = io::copy(&mut from, &mut to);
                    let _ = to.shutdown(Shutdown::Both);
                    let _ = from.shutdown(Shutdown::Both);
                });
            }
        });
        TcpFaultProxy {
            port: acceptor.port,
            connections,
            accepted,
            acceptor,
        }
    }

    /// Resets every connection open now (the client sees ECONNRESET).
    pub fn reset_all(&self) {
        for c in self.connections.lock().unwrap().drain(..) {
            reset(&c);
        }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for TcpFaultProxy {
    fn drop(&mut self) {
        self.acceptor.stop();
        self.reset_all();
    }
}
