//! The client's side of the fixed-newstyle handshake: structured replies, the
//! `base:allocation` context, `NBD_OPT_GO` with block sizes (`NBD_OPT_EXPORT_NAME` if
//! `GO` is unknown). The socket code here reads and writes; `proto` decodes.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::debug;

use super::error::Peer;
use super::{BlockSizes, ClientOptions, Error, Result};
use crate::proto::{
    self, BASE_ALLOCATION, EXPORT_NAME_REPLY_LEN, IHAVEOPT, InfoReply, MAX_STRING_LEN, NBDMAGIC,
    OPTION_REPLY_HEADER_LEN, be_u16, be_u64, client_flags, handshake_flags, info, is_error_reply,
    opt, rep, reply_name, sanitize,
};

/// The greeting magic of the oldstyle handshake (refused).
const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;

/// Bytes of zeroes after the reply to `NBD_OPT_EXPORT_NAME` unless `NO_ZEROES` was agreed.
const EXPORT_NAME_PADDING: usize = 124;

/// What the handshake established.
#[derive(Debug, Clone)]
pub(super) struct Negotiated {
    pub(super) size: u64,
    pub(super) flags: u16,
    pub(super) block_sizes: Option<BlockSizes>,
    pub(super) structured: bool,
    pub(super) base_allocation: Option<u32>,
}

/// Turns a handshake read/write failure into an error that says what was going on.
/// The connection broke rather than the protocol: [`Error::ConnectionLost`].
fn hs_io(peer: &Peer, during: &str, e: &std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        peer.lost(format!(
            "the server closed the connection during the handshake ({during})"
        ))
    } else {
        peer.lost(format!("handshake failed during {during}: {e}"))
    }
}

struct OptionReply {
    kind: u32,
    data: Vec<u8>,
}

async fn send_option<W: AsyncWrite + Unpin>(
    w: &mut W,
    peer: &Peer,
    option: u32,
    data: &[u8],
) -> Result<()> {
    if u32::try_from(data.len()).is_err() {
        return Err(peer.handshake("option data too long"));
    }
    let mut buf = Vec::with_capacity(16 + data.len());
    proto::encode_option(&mut buf, option, data);
    let during = format!("sending {}", proto::option_name(option));
    w.write_all(&buf)
        .await
        .map_err(|e| hs_io(peer, &during, &e))?;
    w.flush().await.map_err(|e| hs_io(peer, &during, &e))
}

async fn read_option_reply<R: AsyncRead + Unpin>(
    r: &mut R,
    peer: &Peer,
    option: u32,
) -> Result<OptionReply> {
    let during = format!("the reply to {}", proto::option_name(option));
    let mut head = [0u8; OPTION_REPLY_HEADER_LEN];
    r.read_exact(&mut head)
        .await
        .map_err(|e| hs_io(peer, &during, &e))?;
    let header = proto::decode_option_reply_header(&head, option)
        .map_err(|invalid| peer.handshake(invalid.0))?;
    // The decoder bounded the length by MAX_OPTION_REPLY_LEN.
    let mut data = vec![0u8; header.length as usize];
    r.read_exact(&mut data)
        .await
        .map_err(|e| hs_io(peer, &during, &e))?;
    Ok(OptionReply {
        kind: header.reply_type,
        data,
    })
}

fn refused(peer: &Peer, option: u32, reply: &OptionReply) -> Error {
    let message = if reply.data.is_empty() {
        "(no message)".to_owned()
    } else {
        sanitize(&reply.data)
    };
    Error::OptionRefused {
        server: peer.server.clone(),
        export: peer.export.clone(),
        option: proto::option_name(option),
        reply: reply_name(reply.kind),
        code: reply.kind,
        message,
    }
}

fn valid_block_sizes(b: BlockSizes) -> bool {
    b.minimum.is_power_of_two()
        && b.minimum <= 64 * 1024
        && b.preferred.is_power_of_two()
        && b.preferred >= b.minimum
        && b.maximum >= b.minimum
}

/// The server's greeting and the client's flags: the start of every handshake. Returns
/// whether the server's replies to `NBD_OPT_EXPORT_NAME` come without padding.
pub(super) async fn greet<R, W>(r: &mut R, w: &mut W, peer: &Peer) -> Result<bool>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if peer.export.len() > MAX_STRING_LEN {
        return Err(peer.handshake(format!(
            "the export name is longer than {MAX_STRING_LEN} bytes"
        )));
    }
    let mut greeting = [0u8; 18];
    r.read_exact(&mut greeting[..16])
        .await
        .map_err(|e| hs_io(peer, "the greeting", &e))?;
    let magic = be_u64(&greeting[0..8]);
    if magic != NBDMAGIC {
        return Err(peer.handshake(format!(
            "not an NBD server (greeting starts with {magic:#018x})"
        )));
    }
    match be_u64(&greeting[8..16]) {
        IHAVEOPT => {}
        OLDSTYLE_MAGIC => {
            return Err(
                peer.handshake("the server speaks the oldstyle handshake, which is not supported")
            );
        }
        other => {
            return Err(peer.handshake(format!(
                "unknown handshake magic {other:#018x} after NBDMAGIC"
            )));
        }
    }
    r.read_exact(&mut greeting[16..18])
        .await
        .map_err(|e| hs_io(peer, "the greeting", &e))?;
    let hflags = be_u16(&greeting[16..18]);
    if hflags & handshake_flags::FIXED_NEWSTYLE == 0 {
        return Err(peer
            .handshake("the server does not offer fixed newstyle negotiation, which is required"));
    }
    let no_zeroes = hflags & handshake_flags::NO_ZEROES != 0;
    let mut cflags = client_flags::C_FIXED_NEWSTYLE;
    if no_zeroes {
        cflags |= client_flags::C_NO_ZEROES;
    }
    w.write_all(&cflags.to_be_bytes())
        .await
        .map_err(|e| hs_io(peer, "sending client flags", &e))?;
    Ok(no_zeroes)
}

/// `NBD_OPT_STARTTLS`: after its acknowledgement the TLS handshake starts. A server
/// that refuses it is an error: TLS was asked for, so nothing goes on in clear.
pub(super) async fn starttls<R, W>(r: &mut R, w: &mut W, peer: &Peer) -> Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    send_option(w, peer, opt::STARTTLS, &[]).await?;
    let reply = read_option_reply(r, peer, opt::STARTTLS).await?;
    match reply.kind {
        rep::ACK if reply.data.is_empty() => Ok(()),
        k if is_error_reply(k) => Err(Error::Tls {
            server: peer.server.clone(),
            reason: format!(
                "the server does not offer TLS ({} to NBD_OPT_STARTTLS)",
                reply_name(k)
            ),
        }),
        k => Err(peer.handshake(format!("unexpected {} to NBD_OPT_STARTTLS", reply_name(k)))),
    }
}

/// Option haggling after [`greet`] (and [`starttls`]): structured replies,
/// `base:allocation`, then `NBD_OPT_GO`.
pub(super) async fn negotiate<R, W>(
    r: &mut R,
    w: &mut W,
    peer: &Peer,
    options: &ClientOptions,
    no_zeroes: bool,
) -> Result<Negotiated>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let export = peer.export.as_str();
    // Structured replies: optional, simple replies otherwise.
    let mut structured = false;
    if options.structured_replies {
        send_option(w, peer, opt::STRUCTURED_REPLY, &[]).await?;
        let reply = read_option_reply(r, peer, opt::STRUCTURED_REPLY).await?;
        match reply.kind {
            rep::ACK if reply.data.is_empty() => structured = true,
            k if is_error_reply(k) => {
                debug!(server = %peer.server, reply = %reply_name(k), message = %sanitize(&reply.data),
                    "structured replies refused; using simple replies");
            }
            k => {
                return Err(peer.handshake(format!(
                    "unexpected {} to NBD_OPT_STRUCTURED_REPLY",
                    reply_name(k)
                )));
            }
        }
    }

    // base:allocation: optional.
    let mut base_allocation = None;
    if structured && options.block_status {
        let data = proto::meta_context_request(export, &[BASE_ALLOCATION]);
        send_option(w, peer, opt::SET_META_CONTEXT, &data).await?;
        loop {
            let reply = read_option_reply(r, peer, opt::SET_META_CONTEXT).await?;
            match reply.kind {
                rep::META_CONTEXT => {
                    let (id, name) = proto::decode_meta_context_reply(&reply.data)
                        .map_err(|invalid| peer.handshake(invalid.0))?;
                    if name != BASE_ALLOCATION.as_bytes() {
                        return Err(peer.handshake(format!(
                            "the server selected the metadata context {:?}, which was not asked for",
                            sanitize(name)
                        )));
                    }
                    if base_allocation.replace(id).is_some() {
                        return Err(peer.handshake("base:allocation was selected twice"));
                    }
                }
                rep::ACK => break,
                k if is_error_reply(k) => {
                    debug!(server = %peer.server, reply = %reply_name(k), message = %sanitize(&reply.data),
                        "base:allocation refused; no block status");
                    base_allocation = None;
                    break;
                }
                k => {
                    return Err(peer.handshake(format!(
                        "unexpected {} to NBD_OPT_SET_META_CONTEXT",
                        reply_name(k)
                    )));
                }
            }
        }
    }

    // GO, asking for block sizes.
    let data = proto::info_request(export, &[info::BLOCK_SIZE]);
    send_option(w, peer, opt::GO, &data).await?;
    let mut export_info = None;
    let mut block_sizes = None;
    loop {
        let reply = read_option_reply(r, peer, opt::GO).await?;
        match reply.kind {
            rep::INFO => {
                match proto::decode_info_reply(&reply.data)
                    .map_err(|invalid| peer.handshake(invalid.0))?
                {
                    InfoReply::Export { size, flags } => export_info = Some((size, flags)),
                    InfoReply::BlockSize {
                        minimum,
                        preferred,
                        maximum,
                    } => {
                        let b = BlockSizes {
                            minimum,
                            preferred,
                            maximum,
                        };
                        if !valid_block_sizes(b) {
                            return Err(peer.handshake(format!(
                                "invalid block sizes: minimum {}, preferred {}, maximum {}",
                                b.minimum, b.preferred, b.maximum
                            )));
                        }
                        block_sizes = Some(b);
                    }
                    // NAME, DESCRIPTION and unknown items are not needed.
                    InfoReply::Other(_) => {}
                }
            }
            rep::ACK => break,
            rep::ERR_UNSUP => {
                debug!(server = %peer.server, "NBD_OPT_GO unsupported; trying NBD_OPT_EXPORT_NAME");
                export_info = Some(export_name(r, w, peer, no_zeroes).await?);
                break;
            }
            k if is_error_reply(k) => return Err(refused(peer, opt::GO, &reply)),
            k => {
                return Err(peer.handshake(format!("unexpected {} to NBD_OPT_GO", reply_name(k))));
            }
        }
    }
    let Some((size, flags)) = export_info else {
        return Err(peer.handshake("NBD_OPT_GO succeeded without NBD_INFO_EXPORT"));
    };
    if size > i64::MAX as u64 {
        return Err(peer.handshake(format!("export size {size} is out of range")));
    }
    Ok(Negotiated {
        size,
        flags,
        block_sizes,
        structured,
        base_allocation,
    })
}

async fn export_name<R, W>(r: &mut R, w: &mut W, peer: &Peer, no_zeroes: bool) -> Result<(u64, u16)>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    send_option(w, peer, opt::EXPORT_NAME, peer.export.as_bytes()).await?;
    let mut buf = [0u8; EXPORT_NAME_REPLY_LEN + EXPORT_NAME_PADDING];
    let len = if no_zeroes {
        EXPORT_NAME_REPLY_LEN
    } else {
        buf.len()
    };
    r.read_exact(&mut buf[..len]).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            peer.handshake(
                "the server closed the connection after NBD_OPT_EXPORT_NAME \
                 (the export probably does not exist; this option cannot report errors)",
            )
        } else {
            hs_io(peer, "the reply to NBD_OPT_EXPORT_NAME", &e)
        }
    })?;
    let reply: &[u8; EXPORT_NAME_REPLY_LEN] = buf[..EXPORT_NAME_REPLY_LEN]
        .try_into()
        .expect("the buffer starts with the reply");
    Ok(proto::decode_export_name_reply(reply))
}
