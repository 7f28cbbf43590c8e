//! A small NFSv3 server that lies: MOUNT (EXPORT, MNT) and NFS (GETATTR, LOOKUP,
//! FSINFO, READ) over ONC RPC on TCP, on one port of 127.0.0.1 for both programs, so a
//! URI `nfs://127.0.0.1:PORT/export/NAME?mountport=PORT` needs no portmapper.
//!
//! It exports `/export` with one file per [`NfsFile`], all [`NFS_FILE_SIZE`] bytes of
//! [`nfs_pattern`]. Opening (LOOKUP, GETATTR) is always honest; every READ of a file
//! misbehaves the way its [`Lie`] says, so a test can check what the client makes of it.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use thinline_test_support::Acceptor;

pub const NFS_FILE_SIZE: u64 = 4 << 20;
const FILE_ID_BASE: u64 = 1000;
const MTIME: (u32, u32) = (1_700_000_000, 123);

/// The byte served at `offset` of every file.
pub fn nfs_byte(offset: u64) -> u8 {
    (offset.wrapping_mul(13) ^ (offset >> 11)) as u8 | 1
}

pub fn nfs_pattern(offset: u64, len: u64) -> Vec<u8> {
    (offset..offset + len).map(nfs_byte).collect()
}

/// How a file's READ replies misbehave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lie {
    /// None: correct replies.
    Honest,
    /// 512 bytes more data than asked for (count and opaque agree).
    LongerThanAsked,
    /// Half of what was asked for, without eof (allowed: the client continues).
    ShortWithoutEof,
    /// The file ends at half its size: reads there get short data with eof, then
    /// none.
    ShortWithEof,
    /// No data and no eof.
    EmptyWithoutEof,
    /// One byte per reply, without eof (allowed, but a read would take a million calls).
    OneByteAtATime,
    /// The count field is one less than the opaque data's length.
    CountDisagrees,
    /// An opaque length of 4 GiB − 1 in a small record.
    OpaqueOf4GiB,
    /// A record mark announcing a 2 GiB fragment, then silence.
    HugeFragment,
    /// The whole reply announced, then one byte every 100 ms, forever.
    Trickle,
    /// Half the reply, then silence.
    Stall,
    /// The reply carries the xid of another call.
    WrongXid,
    /// The post-op attributes carry another size.
    SizeChanges,
    /// The post-op attributes carry another mtime.
    MtimeChanges,
    /// The post-op attributes carry another file id.
    FileIdChanges,
    /// A valid RPC header followed by results that are not XDR of READ3res.
    GarbageXdr,
    /// 1 KiB fragments without the last-fragment bit, forever.
    NoLastFragment,
}

/// One file of the export.
#[derive(Debug, Clone)]
pub struct NfsFile {
    pub name: String,
    pub lie: Lie,
}

/// What the connections of a [`HostileNfs`] share.
#[derive(Debug)]
struct Shared {
    files: Vec<NfsFile>,
    reads: AtomicU64,
}

/// A running server; stops accepting when dropped (connections end when the client
/// closes them).
#[derive(Debug)]
pub struct HostileNfs {
    pub port: u16,
    shared: Arc<Shared>,
    _acceptor: Acceptor,
}

impl HostileNfs {
    pub fn start(files: Vec<NfsFile>) -> HostileNfs {
        let shared = Arc::new(Shared {
            files,
            reads: AtomicU64::default(),
        });
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let acceptor = Acceptor::serve_each(listener, &shared, |conn, shared, stop| {
            let _ = serve(conn, &shared.files, &shared.reads, stop);
        });
        HostileNfs {
            port: acceptor.port,
            shared,
            _acceptor: acceptor,
        }
    }

    /// The URI of file `name`.
    pub fn uri(&self, name: &str) -> String {
        format!(
            "nfs://127.0.0.1:{port}/export/{name}?mountport={port}",
            port = self.port
        )
    }

    /// READ calls received so far.
    pub fn reads(&self) -> u64 {
        self.shared.reads.load(Ordering::SeqCst)
    }
}

/// XDR encoder.
#[derive(Default)]
struct Enc(Vec<u8>);

impl Enc {
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }

    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }

    fn opaque(&mut self, bytes: &[u8]) -> &mut Self {
        self.u32(bytes.len() as u32);
        self.0.extend_from_slice(bytes);
        self.0.resize(self.0.len() + (4 - bytes.len() % 4) % 4, 0);
        self
    }

    fn fattr3(&mut self, ftype: u32, size: u64, fileid: u64, mtime: (u32, u32)) -> &mut Self {
        self.u32(ftype).u32(0o644).u32(1).u32(0).u32(0);
        self.u64(size).u64(size).u32(0).u32(0).u64(1).u64(fileid);
        self.u32(mtime.0).u32(mtime.1); // atime
        self.u32(mtime.0).u32(mtime.1); // mtime
        self.u32(mtime.0).u32(mtime.1) // ctime
    }
}

/// XDR decoder of a call; `None` when it runs out.
struct Dec<'a>(&'a [u8]);

impl Dec<'_> {
    fn u32(&mut self) -> Option<u32> {
        let (head, rest) = self.0.split_at_checked(4)?;
        self.0 = rest;
        Some(u32::from_be_bytes(head.try_into().unwrap()))
    }

    fn u64(&mut self) -> Option<u64> {
        Some((u64::from(self.u32()?) << 32) | u64::from(self.u32()?))
    }

    fn opaque(&mut self) -> Option<Vec<u8>> {
        let len = self.u32()? as usize;
        let padded = len.checked_add((4 - len % 4) % 4)?;
        let (head, rest) = self.0.split_at_checked(padded)?;
        self.0 = rest;
        Some(head[..len].to_vec())
    }
}

const ROOT_FH: &[u8] = b"hostile-root";

fn file_fh(index: usize) -> Vec<u8> {
    format!("hostile-file-{index}").into_bytes()
}

fn file_of(fh: &[u8], files: &[NfsFile]) -> Option<usize> {
    (0..files.len()).find(|&i| file_fh(i) == fh)
}

/// Reads one call (all fragments; at most 64 KiB); `None` at the end of the stream.
fn read_call(s: &mut TcpStream) -> io::Result<Option<Vec<u8>>> {
    let mut body = Vec::new();
    loop {
        let mut mark = [0u8; 4];
        match s.read_exact(&mut mark) {
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            r => r?,
        }
        let mark = u32::from_be_bytes(mark);
        let len = (mark & 0x7fff_ffff) as usize;
        if body.len() + len > 65536 {
            return Err(io::Error::other("call too large"));
        }
        let start = body.len();
        body.resize(start + len, 0);
        s.read_exact(&mut body[start..])?;
        if mark & 0x8000_0000 != 0 {
            return Ok(Some(body));
        }
    }
}

/// The head of an accepted, successful reply to `xid`.
fn reply_head(xid: u32) -> Enc {
    let mut e = Enc::default();
    e.u32(xid).u32(1).u32(0).u32(0).u32(0).u32(0);
    e
}

fn send_record(s: &mut TcpStream, body: &[u8]) -> io::Result<()> {
    let mut out = (0x8000_0000 | body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(body);
    s.write_all(&out)
}

/// Waits until the client closes the connection (reading and dropping anything).
fn hold(s: &mut TcpStream, stop: &AtomicBool) {
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::SeqCst) {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

fn serve(
    mut s: TcpStream,
    files: &[NfsFile],
    reads: &AtomicU64,
    stop: &AtomicBool,
) -> io::Result<()> {
    while let Some(call) = read_call(&mut s)? {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let mut d = Dec(&call);
        let bad = || io::Error::other("malformed call");
        let xid = d.u32().ok_or_else(bad)?;
        let (_call, _rpcvers) = (d.u32().ok_or_else(bad)?, d.u32().ok_or_else(bad)?);
        let (prog, _vers, proc) = (
            d.u32().ok_or_else(bad)?,
            d.u32().ok_or_else(bad)?,
            d.u32().ok_or_else(bad)?,
        );
        for _ in 0..2 {
            // Credential and verifier.
            d.u32().ok_or_else(bad)?;
            d.opaque().ok_or_else(bad)?;
        }
        let mut r = reply_head(xid);
        match (prog, proc) {
            (_, 0) => {}
            // MOUNT EXPORT: one export, no groups.
            (100_005, 5) => {
                r.u32(1).opaque(b"/export").u32(0).u32(0);
            }
            // MOUNT MNT.
            (100_005, 1) => {
                if d.opaque().ok_or_else(bad)? == b"/export" {
                    r.u32(0).opaque(ROOT_FH).u32(1).u32(1);
                } else {
                    r.u32(2);
                }
            }
            // NFS GETATTR.
            (100_003, 1) => {
                let fh = d.opaque().ok_or_else(bad)?;
                if fh == ROOT_FH {
                    r.u32(0).fattr3(2, 4096, 1, MTIME);
                } else if let Some(i) = file_of(&fh, files) {
                    r.u32(0)
                        .fattr3(1, NFS_FILE_SIZE, FILE_ID_BASE + i as u64, MTIME);
                } else {
                    r.u32(70);
                }
            }
            // NFS LOOKUP.
            (100_003, 3) => {
                let dir = d.opaque().ok_or_else(bad)?;
                let name = d.opaque().ok_or_else(bad)?;
                let found = files.iter().position(|f| f.name.as_bytes() == name);
                match found.filter(|_| dir == ROOT_FH) {
                    Some(i) => {
                        r.u32(0).opaque(&file_fh(i)).u32(1);
                        r.fattr3(1, NFS_FILE_SIZE, FILE_ID_BASE + i as u64, MTIME);
                        r.u32(0);
                    }
                    None => {
                        r.u32(2).u32(0);
                    }
                }
            }
            // NFS FSINFO: rtmax 1 MiB.
            (100_003, 19) => {
                r.u32(0).u32(0);
                r.u32(1 << 20).u32(1 << 20).u32(4096);
                r.u32(1 << 20).u32(1 << 20).u32(4096).u32(4096);
                r.u64(u64::MAX).u32(0).u32(1).u32(0x1b);
            }
            // NFS READ.
            (100_003, 6) => {
                reads.fetch_add(1, Ordering::SeqCst);
                let fh = d.opaque().ok_or_else(bad)?;
                let offset = d.u64().ok_or_else(bad)?;
                let count = d.u32().ok_or_else(bad)?;
                let Some(i) = file_of(&fh, files) else {
                    r.u32(70).u32(0);
                    send_record(&mut s, &r.0)?;
                    continue;
                };
                if !read_reply(&mut s, xid, r, i, files[i].lie, offset, count, stop)? {
                    // The lie left the connection in no state to go on.
                    hold(&mut s, stop);
                    return Ok(());
                }
                continue;
            }
            _ => {
                // PROC_UNAVAIL.
                r.0.truncate(r.0.len() - 4);
                r.u32(3);
            }
        }
        send_record(&mut s, &r.0)?;
    }
    Ok(())
}

/// Answers a READ as `lie` says; `false` if the connection cannot be used any more.
#[allow(clippy::too_many_arguments)]
fn read_reply(
    s: &mut TcpStream,
    xid: u32,
    mut r: Enc,
    index: usize,
    lie: Lie,
    offset: u64,
    count: u32,
    stop: &AtomicBool,
) -> io::Result<bool> {
    let fileid = FILE_ID_BASE + index as u64;
    let (mut size, mut mtime, mut id) = (NFS_FILE_SIZE, MTIME, fileid);
    let mut end = NFS_FILE_SIZE;
    match lie {
        Lie::SizeChanges => size += 4096,
        Lie::MtimeChanges => mtime.1 += 1,
        Lie::FileIdChanges => id += 1,
        Lie::ShortWithEof => end = NFS_FILE_SIZE / 2,
        _ => {}
    }
    let available = end.saturating_sub(offset);
    let mut n = u64::from(count).min(available);
    match lie {
        Lie::LongerThanAsked => n = u64::from(count) + 512,
        Lie::ShortWithoutEof => n = n.div_ceil(2),
        Lie::EmptyWithoutEof => n = 0,
        Lie::OneByteAtATime => n = n.min(1),
        _ => {}
    }
    let eof = match lie {
        Lie::EmptyWithoutEof | Lie::ShortWithoutEof | Lie::OneByteAtATime => false,
        _ => offset + n >= end,
    };
    let data = nfs_pattern(offset, n);
    r.u32(0).u32(1).fattr3(1, size, id, mtime);
    match lie {
        Lie::CountDisagrees => r
            .u32((n as u32).wrapping_sub(1))
            .u32(u32::from(eof))
            .opaque(&data),
        Lie::OpaqueOf4GiB => r
            .u32(u32::MAX)
            .u32(0)
            .u32(u32::MAX)
            .opaque(&data[..data.len().min(64)]),
        Lie::GarbageXdr => {
            // post_op_attr's boolean is 7, then noise.
            let mut g = reply_head(xid);
            g.u32(0).u32(7);
            g.0.extend((0..256u32).map(|i| (i * 151 % 256) as u8));
            r = g;
            &mut r
        }
        _ => r.u32(n as u32).u32(u32::from(eof)).opaque(&data),
    };
    match lie {
        Lie::WrongXid => {
            r.0[..4].copy_from_slice(&xid.wrapping_add(1).to_be_bytes());
            send_record(s, &r.0)?;
            Ok(true)
        }
        Lie::HugeFragment => {
            s.write_all(&0x7fff_ffffu32.to_be_bytes())?;
            s.write_all(&r.0[..64])?;
            Ok(false)
        }
        Lie::Stall => {
            s.write_all(&(0x8000_0000 | r.0.len() as u32).to_be_bytes())?;
            s.write_all(&r.0[..r.0.len() / 2])?;
            Ok(false)
        }
        Lie::Trickle => {
            s.write_all(&(0x8000_0000 | r.0.len() as u32).to_be_bytes())?;
            for byte in &r.0 {
                if stop.load(Ordering::SeqCst) || s.write_all(&[*byte]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = s.shutdown(Shutdown::Both);
            Ok(false)
        }
        Lie::NoLastFragment => {
            let fragment = [0u8; 1024];
            let mut first = r.0.clone();
            first.truncate(1024);
            let mut out = (first.len() as u32).to_be_bytes().to_vec();
            out.extend_from_slice(&first);
            s.write_all(&out)?;
            while !stop.load(Ordering::SeqCst) {
                let mut out = 1024u32.to_be_bytes().to_vec();
                out.extend_from_slice(&fragment);
                if s.write_all(&out).is_err() {
                    break;
                }
            }
            let _ = s.shutdown(Shutdown::Both);
            Ok(false)
        }
        _ => {
            send_record(s, &r.0)?;
            Ok(true)
        }
    }
}

/// Files named after their lies, one per [`Lie`], plus `honest`.
pub fn one_file_per_lie(lies: &[Lie]) -> Vec<NfsFile> {
    lies.iter()
        .map(|&lie| NfsFile {
            name: format!("{lie:?}").to_lowercase(),
            lie,
        })
        .collect()
}
