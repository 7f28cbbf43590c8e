//! ONC RPC (RFC 5531) calls over TCP: record marking and fragmented replies, one call at
//! a time per connection ([`Conn`], from a reserved port when allowed), the pool of
//! connections an NFS mount shares ([`Rpc`]), the timeouts that bound every reply, and
//! the AUTH_SYS and AUTH_NONE credentials.

use std::hash::{BuildHasher, Hasher};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::Range;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;

use super::xdr::{Dec, Enc, Fail, malformed};
use crate::RemoteConfig;

/// Largest reply accepted for calls other than READ (an export list may be long).
pub(super) const MAX_REPLY: usize = 1 << 20;

pub(super) const NFS_PROG: u32 = 100_003;
pub(super) const NFS_VERS: u32 = 3;
pub(super) const AUTH_NONE: u32 = 0;
pub(super) const AUTH_SYS: u32 = 1;

/// An AUTH_SYS credential (flavor and body) for `uid` and `gid`, else this process's.
pub(super) fn credential(uid: Option<u32>, gid: Option<u32>) -> Vec<u8> {
    let uid = uid.unwrap_or_else(|| rustix::process::getuid().as_raw());
    let gid = gid.unwrap_or_else(|| rustix::process::getgid().as_raw());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host = host.trim();
    let host = host.get(..host.len().min(255)).unwrap_or("thinline");
    let mut body = Enc::default();
    body.u32(0); // stamp
    body.opaque(host.as_bytes());
    body.u32(uid);
    body.u32(gid);
    body.u32(1);
    body.u32(gid);
    let mut cred = Enc::default();
    cred.u32(AUTH_SYS);
    cred.opaque(&body.0);
    cred.0
}

/// The empty credential, for the portmapper and servers that take no other.
pub(super) fn auth_none() -> Vec<u8> {
    let mut cred = Enc::default();
    cred.u32(AUTH_NONE);
    cred.u32(0);
    cred.0
}

/// The waits of a [`RemoteConfig`], as every connect, call and reply uses them.
#[derive(Debug, Clone, Copy)]
pub(super) struct Timeouts {
    pub(super) connect: Duration,
    first_byte: Duration,
    idle: Duration,
    /// For a whole reply: the first byte's wait plus one idle pause, as NBD's request
    /// timeout (a READ is at most 1 MiB).
    reply: Duration,
}

impl From<&RemoteConfig> for Timeouts {
    fn from(c: &RemoteConfig) -> Self {
        Timeouts {
            connect: c.connect_timeout,
            first_byte: c.first_byte_timeout,
            idle: c.idle_timeout,
            reply: c.first_byte_timeout + c.idle_timeout,
        }
    }
}

/// NFS calls over a pool of connections to one server.
pub(super) struct Rpc {
    addr: SocketAddr,
    cred: Vec<u8>,
    timeouts: Timeouts,
    idle: Mutex<Vec<Conn>>,
    permits: Semaphore,
}

impl Rpc {
    pub(super) fn new(
        addr: SocketAddr,
        cred: Vec<u8>,
        timeouts: Timeouts,
        connections: usize,
    ) -> Rpc {
        Rpc {
            addr,
            cred,
            timeouts,
            idle: Mutex::new(Vec::new()),
            permits: Semaphore::new(connections),
        }
    }

    /// One NFSv3 call on an idle connection (or a new one). The connection goes back
    /// to the pool only after a complete, successful exchange; a failed or cancelled
    /// call drops it.
    pub(super) async fn call(
        &self,
        proc: u32,
        args: &[u8],
        max_reply: usize,
    ) -> Result<Reply, Fail> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| Fail::transient("the connection pool is closed"))?;
        let mut conn = loop {
            let idle = self.idle.lock().ok().and_then(|mut v| v.pop());
            match idle {
                // The server may have closed an idle connection meanwhile.
                Some(c) if c.is_open() => break c,
                Some(_) => continue,
                None => break Conn::connect(self.addr, &self.timeouts).await?,
            }
        };
        let reply = conn
            .call(
                NFS_PROG,
                NFS_VERS,
                proc,
                &self.cred,
                args,
                max_reply,
                &self.timeouts,
            )
            .await?;
        if let Ok(mut idle) = self.idle.lock() {
            idle.push(conn);
        }
        Ok(reply)
    }
}

/// One TCP connection, one call at a time.
pub(super) struct Conn {
    stream: TcpStream,
    addr: SocketAddr,
    xid: u32,
}

impl Conn {
    pub(super) async fn connect(addr: SocketAddr, t: &Timeouts) -> Result<Conn, Fail> {
        let what = format!("connecting to {addr}");
        let stream = match tokio::time::timeout(t.connect, connect_reserved(addr)).await {
            Err(_) => return Err(Fail::transient(format!("{what}: timed out"))),
            Ok(Err(e)) => return Err(Fail::io(&what, &e)),
            Ok(Ok(s)) => s,
        };
        let _ = stream.set_nodelay(true);
        Ok(Conn {
            stream,
            addr,
            xid: random() as u32,
        })
    }

    /// False if the server closed the connection (or sent something unasked).
    fn is_open(&self) -> bool {
        let mut byte = [0u8; 1];
        matches!(self.stream.try_read(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Sends one call and reads its reply (all fragments). Returns the reply with the
    /// decoder positioned at the procedure's results.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn call(
        &mut self,
        prog: u32,
        vers: u32,
        proc: u32,
        cred: &[u8],
        args: &[u8],
        max_reply: usize,
        t: &Timeouts,
    ) -> Result<Reply, Fail> {
        let xid = self.xid;
        self.xid = self.xid.wrapping_add(1);
        let mut msg = Enc(Vec::with_capacity(48 + cred.len() + args.len()));
        msg.u32(0); // record mark, below
        msg.u32(xid);
        msg.u32(0); // CALL
        msg.u32(2); // RPC version
        msg.u32(prog);
        msg.u32(vers);
        msg.u32(proc);
        msg.0.extend_from_slice(cred);
        msg.u32(AUTH_NONE); // verifier
        msg.u32(0);
        msg.0.extend_from_slice(args);
        let mark = 0x8000_0000 | (msg.0.len() - 4) as u32;
        msg.0[..4].copy_from_slice(&mark.to_be_bytes());
        match tokio::time::timeout(t.idle, self.stream.write_all(&msg.0)).await {
            Err(_) => return Err(Fail::transient("sending a call timed out")),
            Ok(Err(e)) => return Err(Fail::io("sending a call", &e)),
            Ok(Ok(())) => {}
        }

        // The whole reply, not just each piece of it, has a deadline: a server that
        // trickles one byte just inside the idle timeout would hold the call forever.
        let body = match tokio::time::timeout(t.reply, self.receive(max_reply, t)).await {
            Err(_) => {
                return Err(Fail::transient(format!(
                    "the reply did not arrive whole within {:?}",
                    t.reply
                )));
            }
            Ok(body) => body?,
        };
        let mut d = Dec::new(&body);
        if d.u32()? != xid {
            return Err(malformed("the reply is for another call"));
        }
        if d.u32()? != 1 {
            return Err(malformed("not a reply"));
        }
        match d.u32()? {
            0 => {
                d.u32()?; // verifier flavor
                d.opaque(400)?;
                match d.u32()? {
                    0 => {}
                    1 => {
                        return Err(Fail::permanent(format!(
                            "{} does not serve RPC program {prog}",
                            self.addr
                        )));
                    }
                    2 => {
                        let (low, high) = (d.u32()?, d.u32()?);
                        return Err(Fail::permanent(format!(
                            "{} does not serve version {vers} of RPC program {prog} \
                             (it has {low}..{high})",
                            self.addr
                        )));
                    }
                    3 => {
                        return Err(Fail::permanent(format!(
                            "procedure {proc} of program {prog} is not available"
                        )));
                    }
                    4 => return Err(Fail::permanent("the server could not decode the call")),
                    5 => return Err(Fail::transient("RPC system error on the server")),
                    other => return Err(malformed(&format!("accept status {other}"))),
                }
            }
            1 => {
                return Err(match d.u32()? {
                    0 => Fail::permanent("the server does not speak RPC version 2"),
                    1 => {
                        let stat = d.u32()?;
                        let why = match stat {
                            1 => "bad credential",
                            2 => "credential rejected",
                            3 => "bad verifier",
                            4 => "verifier rejected",
                            5 => "credential too weak (privileged port or Kerberos needed?)",
                            _ => "authentication failed",
                        };
                        Fail::permanent(format!("the server refused the call: {why} ({stat})"))
                    }
                    other => malformed(&format!("reject status {other}")),
                });
            }
            other => return Err(malformed(&format!("reply status {other}"))),
        }
        let start = d.pos;
        Ok(Reply {
            body: Bytes::from(body),
            start,
        })
    }

    /// Reads one reply record (all its fragments, at most `max_reply` bytes).
    async fn receive(&mut self, max_reply: usize, t: &Timeouts) -> Result<Vec<u8>, Fail> {
        let mut body = Vec::new();
        let mut first = true;
        let mut fragments = 0;
        loop {
            fragments += 1;
            if fragments > 4096 {
                return Err(malformed("a reply in more than 4096 fragments"));
            }
            let mut mark = [0u8; 4];
            let wait = if first { t.first_byte } else { t.idle };
            self.read_full(&mut mark, wait, t.idle).await?;
            first = false;
            let mark = u32::from_be_bytes(mark);
            let len = (mark & 0x7fff_ffff) as usize;
            if body.len() + len > max_reply {
                return Err(malformed(&format!(
                    "a reply of more than {max_reply} bytes"
                )));
            }
            let start = body.len();
            body.resize(start + len, 0);
            self.read_full(&mut body[start..], t.idle, t.idle).await?;
            if mark & 0x8000_0000 != 0 {
                break;
            }
        }
        Ok(body)
    }

    /// Fills `buf`, waiting at most `first` for the first bytes and `idle` between reads.
    async fn read_full(
        &mut self,
        buf: &mut [u8],
        first: Duration,
        idle: Duration,
    ) -> Result<(), Fail> {
        let mut filled = 0;
        while filled < buf.len() {
            let wait = if filled == 0 { first } else { idle };
            match tokio::time::timeout(wait, self.stream.read(&mut buf[filled..])).await {
                Err(_) => return Err(Fail::transient("timed out waiting for the server's reply")),
                Ok(Err(e)) => return Err(Fail::io("reading a reply", &e)),
                Ok(Ok(0)) => return Err(Fail::transient("the server closed the connection")),
                Ok(Ok(n)) => filled += n,
            }
        }
        Ok(())
    }
}

/// The address of `host` (an address as it is, or a name resolved within `timeout`).
pub(super) async fn resolve(host: &str, timeout: Duration) -> Result<IpAddr, Fail> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(ip);
    }
    let lookup = tokio::net::lookup_host((host, 0));
    match tokio::time::timeout(timeout, lookup).await {
        Err(_) => Err(Fail::transient(format!("resolving {host:?} timed out"))),
        Ok(Err(e)) => Err(Fail::io(&format!("resolving {host:?}"), &e)),
        Ok(Ok(mut addrs)) => addrs
            .next()
            .map(|a| a.ip())
            .ok_or_else(|| Fail::permanent(format!("{host:?} has no address"))),
    }
}

/// Connects from a reserved port (600–1023) when allowed, as Linux's nfsd expects by
/// default, else from any port.
async fn connect_reserved(addr: SocketAddr) -> io::Result<TcpStream> {
    let start = random() as u16;
    for i in 0..32u16 {
        let port = 600 + (start.wrapping_add(i) % 424);
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        let local: IpAddr = if addr.is_ipv4() {
            Ipv4Addr::UNSPECIFIED.into()
        } else {
            Ipv6Addr::UNSPECIFIED.into()
        };
        socket.set_reuseaddr(true)?;
        match socket.bind(SocketAddr::new(local, port)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
            // Not root (EACCES): any port will do.
            Err(_) => break,
        }
        match socket.connect(addr).await {
            Ok(stream) => return Ok(stream),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::AddrInUse | io::ErrorKind::AddrNotAvailable
                ) =>
            {
                continue;
            }
            Err(e) => return Err(e),
        }
    }
    TcpStream::connect(addr).await
}

fn random() -> u64 {
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

/// A successful reply: the record and where the procedure's results start.
pub(super) struct Reply {
    body: Bytes,
    start: usize,
}

impl Reply {
    pub(super) fn decoder(&self) -> Dec<'_> {
        let mut d = Dec::new(&self.body);
        d.pos = self.start;
        d
    }

    pub(super) fn slice(&self, range: Range<usize>) -> Bytes {
        self.body.slice(range)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FetchErrorKind;

    /// Listens on a loopback port and runs `serve` on the first connection once the
    /// call's first 8 bytes (record mark and xid) are read; they are `serve`'s second
    /// argument.
    async fn serve_one_call<F>(
        serve: impl FnOnce(TcpStream, [u8; 8]) -> F + Send + 'static,
    ) -> (SocketAddr, tokio::task::JoinHandle<()>)
    where
        F: Future<Output = ()> + Send,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut head = [0u8; 8];
            s.read_exact(&mut head).await.unwrap();
            serve(s, head).await;
        });
        (addr, server)
    }

    /// A server that answers one call in three fragments, echoing the xid.
    #[tokio::test]
    async fn fragmented_replies_are_reassembled() {
        let (addr, server) = serve_one_call(|mut s, head| async move {
            let len = (u32::from_be_bytes(head[..4].try_into().unwrap()) & 0x7fff_ffff) as usize;
            let mut rest = vec![0u8; len - 4];
            s.read_exact(&mut rest).await.unwrap();
            let mut reply = Enc::default();
            reply.0.extend_from_slice(&head[4..8]); // xid
            for v in [1, 0, 0, 0, 0, 0, 0x1234_5678] {
                reply.u32(v);
            }
            let (a, b) = reply.0.split_at(10);
            let (b, c) = b.split_at(7);
            for (part, last) in [(a, false), (b, false), (c, true)] {
                let mark = part.len() as u32 | if last { 0x8000_0000 } else { 0 };
                s.write_all(&mark.to_be_bytes()).await.unwrap();
                s.write_all(part).await.unwrap();
            }
        })
        .await;
        let t = Timeouts::from(&RemoteConfig::default());
        let mut conn = Conn::connect(addr, &t).await.unwrap();
        let reply = conn
            .call(NFS_PROG, NFS_VERS, 0, &auth_none(), &[], 1024, &t)
            .await
            .unwrap();
        let mut d = reply.decoder();
        assert_eq!((d.u32().unwrap(), d.u32().unwrap()), (0, 0x1234_5678));
        server.await.unwrap();
    }

    /// A server that announces a reply and then sends it a byte every 50 ms, well
    /// inside the idle timeout.
    #[tokio::test]
    async fn a_reply_trickled_inside_the_idle_timeout_still_times_out_whole() {
        let (addr, server) = serve_one_call(|mut s, head| async move {
            s.write_all(&(0x8000_0000u32 | 1000).to_be_bytes())
                .await
                .unwrap();
            s.write_all(&head[4..8]).await.unwrap(); // xid
            for _ in 0..996 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if s.write_all(&[0]).await.is_err() {
                    return;
                }
            }
        })
        .await;
        let config = RemoteConfig {
            first_byte_timeout: Duration::from_millis(300),
            idle_timeout: Duration::from_millis(300),
            ..RemoteConfig::default()
        };
        let t = Timeouts::from(&config);
        let mut conn = Conn::connect(addr, &t).await.unwrap();
        // Without a deadline for the whole reply this takes 50 s.
        let cred = auth_none();
        let call = conn.call(NFS_PROG, NFS_VERS, 0, &cred, &[], 4096, &t);
        let failed = tokio::time::timeout(Duration::from_secs(20), call)
            .await
            .expect("the call ended")
            .err()
            .expect("the call failed");
        assert_eq!(failed.kind, FetchErrorKind::Transient);
        assert!(
            failed.message.contains("did not arrive whole"),
            "{}",
            failed.message
        );
        drop(conn);
        server.await.unwrap();
    }
}
