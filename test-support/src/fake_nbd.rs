//! A fake NBD server that negotiates like a real one and then answers requests with
//! whatever bytes a test's [`Responder`] makes: correct replies, or replies that break
//! the protocol in a chosen way.
//!
//! Shared by the client library's tests (`nbd-server/tests/client.rs`, in process over
//! socket pairs) and the end-to-end tests of `thinline serve nbd://…`
//! (`tests/hostile_upstreams.rs`, over TCP with [`FakeNbdTcp`]). Behind the `nbd`
//! feature: it speaks through the server's `proto` module and runs on tokio.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use thinline_nbd::proto::{
    self, IHAVEOPT, NBDMAGIC, ReplyMode, RequestHeader, cmd, opt, rep, reply, tflags,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The byte a fake server serves at `offset`.
pub fn pat(offset: u64) -> u8 {
    (offset.wrapping_mul(7) ^ (offset >> 9)) as u8
}

pub fn pattern(offset: u64, len: u64) -> Vec<u8> {
    (offset..offset + len).map(pat).collect()
}

pub const FAKE_SIZE: u64 = 1 << 20;
pub const CONTEXT_ID: u32 = 7;

#[derive(Debug, Clone)]
pub struct FakeConfig {
    pub structured: bool,
    pub min_block: u32,
    /// When this option arrives, send these bytes instead of the normal reply.
    pub sabotage: Option<(u32, Vec<u8>)>,
}

impl Default for FakeConfig {
    fn default() -> Self {
        FakeConfig {
            structured: true,
            min_block: 1,
            sabotage: None,
        }
    }
}

/// Decides the reply bytes for the requests received so far (`None`: wait for more);
/// `true` closes the connection after sending.
pub type Responder = Box<dyn FnMut(&[RequestHeader]) -> Option<(Vec<u8>, bool)> + Send>;

pub fn option_reply(option: u32, kind: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    proto::encode_option_reply(&mut out, option, kind, data);
    out
}

/// Serves one connection: an export of [`FAKE_SIZE`] bytes answered by `respond`.
pub async fn fake_server<S>(s: S, config: FakeConfig, respond: Responder)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut respond = Some(respond);
    serve_fake(s, config, move |_| respond.take().map(|r| (FAKE_SIZE, r))).await;
}

/// Serves one connection; `pick` gives the size and responder of the export the client
/// asks for (`None`: no such export).
pub async fn serve_fake<S>(
    mut s: S,
    config: FakeConfig,
    mut pick: impl FnMut(&str) -> Option<(u64, Responder)>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut greeting = Vec::new();
    greeting.extend_from_slice(&NBDMAGIC.to_be_bytes());
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&3u16.to_be_bytes());
    if s.write_all(&greeting).await.is_err() {
        return;
    }
    let mut flags = [0u8; 4];
    if s.read_exact(&mut flags).await.is_err() {
        return;
    }
    let mut respond = loop {
        let mut head = [0u8; 16];
        if s.read_exact(&mut head).await.is_err() {
            return;
        }
        let option = u32::from_be_bytes(head[8..12].try_into().unwrap());
        let len = u32::from_be_bytes(head[12..16].try_into().unwrap());
        if len > 65536 {
            return;
        }
        let mut data = vec![0u8; len as usize];
        if s.read_exact(&mut data).await.is_err() {
            return;
        }
        if let Some((_, bytes)) = config.sabotage.as_ref().filter(|(o, _)| *o == option) {
            if bytes.is_empty() {
                // Close instead of answering.
                return;
            }
            let _ = s.write_all(bytes).await;
            continue;
        }
        let out = match option {
            opt::STRUCTURED_REPLY if config.structured => option_reply(option, rep::ACK, &[]),
            opt::SET_META_CONTEXT => {
                let mut o = option_reply(
                    option,
                    rep::META_CONTEXT,
                    &proto::rep_meta_context(CONTEXT_ID, proto::BASE_ALLOCATION),
                );
                o.extend(option_reply(option, rep::ACK, &[]));
                o
            }
            opt::GO => {
                let name_len = data
                    .get(..4)
                    .map_or(0, |b| u32::from_be_bytes(b.try_into().unwrap()) as usize);
                let name = data
                    .get(4..4 + name_len)
                    .map(|n| String::from_utf8_lossy(n).into_owned())
                    .unwrap_or_default();
                let Some((size, respond)) = pick(&name) else {
                    let o = option_reply(option, rep::ERR_UNKNOWN, b"no such export");
                    if s.write_all(&o).await.is_err() {
                        return;
                    }
                    continue;
                };
                let mut o = option_reply(
                    option,
                    rep::INFO,
                    &proto::info_block_size(config.min_block, 4096, 1 << 20),
                );
                o.extend(option_reply(
                    option,
                    rep::INFO,
                    &proto::info_export(size, tflags::HAS_FLAGS | tflags::READ_ONLY),
                ));
                o.extend(option_reply(option, rep::ACK, &[]));
                if s.write_all(&o).await.is_err() {
                    return;
                }
                break respond;
            }
            _ => option_reply(option, rep::ERR_UNSUP, b"not here"),
        };
        if s.write_all(&out).await.is_err() {
            return;
        }
    };
    let mut requests = Vec::new();
    loop {
        let mut buf = [0u8; proto::COMPACT_REQUEST_LEN];
        if s.read_exact(&mut buf).await.is_err() {
            return;
        }
        let req = proto::decode_request(ReplyMode::Structured, &buf).unwrap();
        if req.command == cmd::DISC {
            return;
        }
        requests.push(req);
        if let Some((bytes, close)) = respond(&requests) {
            requests.clear();
            if s.write_all(&bytes).await.is_err() || close {
                return;
            }
        }
    }
}

pub fn chunk(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    proto::encode_chunk_header(
        &mut out,
        ReplyMode::Structured,
        flags,
        kind,
        cookie,
        0,
        payload.len() as u64,
    );
    out.extend_from_slice(payload);
    out
}

pub fn data_chunk(cookie: u64, offset: u64, len: u64, done: bool) -> Vec<u8> {
    let mut payload = offset.to_be_bytes().to_vec();
    payload.extend(pattern(offset, len));
    chunk(u16::from(done), reply::OFFSET_DATA, cookie, &payload)
}

pub fn hole_chunk(cookie: u64, offset: u64, len: u32, done: bool) -> Vec<u8> {
    let mut payload = offset.to_be_bytes().to_vec();
    payload.extend_from_slice(&len.to_be_bytes());
    chunk(u16::from(done), reply::OFFSET_HOLE, cookie, &payload)
}

pub fn error_chunk(kind: u16, cookie: u64, value: u32, msg: &str, at: Option<u64>) -> Vec<u8> {
    let mut payload = value.to_be_bytes().to_vec();
    payload.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    payload.extend_from_slice(msg.as_bytes());
    if let Some(at) = at {
        payload.extend_from_slice(&at.to_be_bytes());
    }
    chunk(reply::FLAG_DONE, kind, cookie, &payload)
}

/// The correct reply to `r`: a read in two data chunks sent in reverse order, or one
/// all-data extent for block status.
pub fn good_reply(r: &RequestHeader) -> Vec<u8> {
    if r.command == cmd::BLOCK_STATUS {
        let mut p = CONTEXT_ID.to_be_bytes().to_vec();
        p.extend_from_slice(&(r.length as u32).to_be_bytes());
        p.extend_from_slice(&0u32.to_be_bytes());
        return chunk(reply::FLAG_DONE, reply::BLOCK_STATUS, r.cookie, &p);
    }
    let half = r.length / 2;
    let mut out = data_chunk(r.cookie, r.offset + half, r.length - half, false);
    if half > 0 {
        out.extend(data_chunk(r.cookie, r.offset, half, false));
    }
    out.extend(chunk(reply::FLAG_DONE, reply::NONE, r.cookie, &[]));
    out
}

/// Answers every request correctly ([`good_reply`]).
pub fn good() -> Responder {
    Box::new(|reqs| Some((good_reply(&reqs[0]), false)))
}

/// Answers every request with the bytes `f` makes for it.
pub fn each(f: impl Fn(&RequestHeader) -> Vec<u8> + Send + 'static) -> Responder {
    Box::new(move |reqs| Some((f(&reqs[0]), false)))
}

/// Makes the size and responder of export `name` for its `n`th connection (from 0);
/// `None` refuses the export.
pub type Picker = dyn Fn(&str, u32) -> Option<(u64, Responder)> + Send + Sync;

/// Fake NBD servers on a TCP port of 127.0.0.1, one per connection, in a runtime of
/// their own; stopped when dropped.
#[derive(Debug)]
pub struct FakeNbdTcp {
    pub port: u16,
    /// Connections that negotiated each export so far.
    connections: Arc<Mutex<HashMap<String, u32>>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl FakeNbdTcp {
    pub fn start(
        pick: impl Fn(&str, u32) -> Option<(u64, Responder)> + Send + Sync + 'static,
    ) -> FakeNbdTcp {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
        let pick: Arc<Picker> = Arc::new(pick);
        let counts = Arc::clone(&connections);
        runtime.spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (pick, counts) = (Arc::clone(&pick), Arc::clone(&counts));
                tokio::spawn(serve_fake(stream, FakeConfig::default(), move |name| {
                    let n = {
                        let mut counts = counts.lock().unwrap();
                        let n = counts.entry(name.to_owned()).or_insert(0);
                        *n += 1;
                        *n - 1
                    };
                    pick(name, n)
                }));
            }
        });
        FakeNbdTcp {
            port,
            connections,
            runtime: Some(runtime),
        }
    }

    /// `nbd://127.0.0.1:PORT/EXPORT`.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{export}", self.port)
    }

    /// Connections that negotiated `export` so far.
    pub fn connections(&self, export: &str) -> u32 {
        self.connections
            .lock()
            .unwrap()
            .get(export)
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for FakeNbdTcp {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}
