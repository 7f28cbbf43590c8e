//! Fixed-newstyle negotiation: greeting, option haggling, and the choice of export,
//! reply mode and metadata contexts that the transmission phase then uses.
//!
//! Every option is read whole (or skipped when too long) before it is answered, so an
//! unknown or malformed option never desynchronises the session: it gets an error reply
//! and haggling goes on. Only the cases the spec mandates end the connection (unknown
//! client flags, a bad option magic, `NBD_OPT_EXPORT_NAME` that cannot be satisfied).

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::debug;

use crate::export::Export;
use crate::proto::{
    self, ClientOption, InfoRequest, MetaContextRequest, ReplyMode, client_flags, handshake_flags,
    info, opt, rep, tflags,
};
use crate::shared::{ExportSet, Shared};
use crate::tls::TlsMode;

/// Option data longer than this closes the connection instead of being skipped.
const MAX_SKIPPED_OPTION_LEN: u32 = 32 * 1024 * 1024;

/// The negotiated state handed to the transmission phase.
#[derive(Debug)]
pub(crate) struct Session {
    /// Canonical export name (for logs).
    pub export_name: String,
    /// The export.
    pub export: Arc<dyn Export>,
    /// Reply mode.
    pub mode: ReplyMode,
    /// Selected metadata contexts: the context id is the position, the value the
    /// index into `export.meta_contexts()`.
    pub contexts: Vec<usize>,
}

/// What negotiation ended with.
#[derive(Debug)]
pub(crate) enum Negotiated {
    /// The transmission phase's session.
    Session(Session),
    /// STARTTLS was acknowledged: run the TLS handshake, then negotiate again inside
    /// TLS with these client flags ([`negotiate`]'s `resume`).
    StartTls(ClientFlags),
}

/// What the client said in its flags, kept across STARTTLS.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClientFlags {
    fixed: bool,
    no_zeroes: bool,
}

/// Why negotiation ended without a session.
#[derive(Debug)]
pub(crate) enum HandshakeEnd {
    /// The client aborted or disconnected, or was refused; nothing to report.
    Closed(String),
    /// The client broke a rule the spec says ends the connection.
    Violation(String),
    /// I/O error on the socket.
    Io(std::io::Error),
}

impl From<std::io::Error> for HandshakeEnd {
    fn from(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            HandshakeEnd::Closed("client disconnected during the handshake".into())
        } else {
            HandshakeEnd::Io(e)
        }
    }
}

/// Why every option of this connection is refused, if it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Serve normally.
    None,
    /// Over `--max-connections`: answer every option with `NBD_REP_ERR_POLICY`.
    TooManyConnections(usize),
}

struct Negotiation<'a> {
    shared: &'a Shared,
    refusal: Refusal,
    /// The connection runs inside TLS.
    tls_active: bool,
    fixed: bool,
    no_zeroes: bool,
    mode: ReplyMode,
    /// Export index and context indices chosen by the last `NBD_OPT_SET_META_CONTEXT`.
    meta: Option<(usize, Vec<usize>)>,
    out: Vec<u8>,
}

/// Runs the negotiation of a fresh connection (`resume` is `None`: greeting, client
/// flags, options), or its options again inside TLS after STARTTLS (`resume` holds the
/// client's flags; what was negotiated in clear is forgotten, as the spec asks).
pub(crate) async fn negotiate<R, W>(
    reader: &mut R,
    writer: &mut W,
    shared: &Shared,
    refusal: Refusal,
    resume: Option<ClientFlags>,
) -> Result<Negotiated, HandshakeEnd>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let flags = match resume {
        Some(flags) => flags,
        None => {
            let mut greeting = Vec::with_capacity(18);
            greeting.extend_from_slice(&proto::NBDMAGIC.to_be_bytes());
            greeting.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
            greeting.extend_from_slice(
                &(handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES).to_be_bytes(),
            );
            writer.write_all(&greeting).await?;
            writer.flush().await?;
            let client = reader.read_u32().await?;
            if client & !client_flags::KNOWN != 0 {
                return Err(HandshakeEnd::Violation(format!(
                    "unknown client flags {client:#x}"
                )));
            }
            ClientFlags {
                fixed: client & client_flags::C_FIXED_NEWSTYLE != 0,
                no_zeroes: client & client_flags::C_NO_ZEROES != 0,
            }
        }
    };
    let mut n = Negotiation {
        shared,
        refusal,
        tls_active: resume.is_some(),
        fixed: flags.fixed,
        no_zeroes: flags.no_zeroes,
        mode: ReplyMode::Simple,
        meta: None,
        out: Vec::with_capacity(256),
    };

    loop {
        let magic = reader.read_u64().await?;
        if magic != proto::IHAVEOPT {
            return Err(HandshakeEnd::Violation(format!(
                "bad option magic {magic:#x}"
            )));
        }
        let option = reader.read_u32().await?;
        let length = reader.read_u32().await?;
        if !n.fixed && option != opt::EXPORT_NAME {
            return Err(HandshakeEnd::Violation(format!(
                "{} from a client without fixed newstyle",
                proto::option_name(option)
            )));
        }
        if length > proto::MAX_OPTION_LEN {
            if length > MAX_SKIPPED_OPTION_LEN || option == opt::EXPORT_NAME {
                return Err(HandshakeEnd::Violation(format!(
                    "{} with {length} bytes of data",
                    proto::option_name(option)
                )));
            }
            skip(reader, u64::from(length)).await?;
            n.error(
                option,
                rep::ERR_TOO_BIG,
                &format!("option data of {length} bytes is too large"),
            );
            n.send(writer).await?;
            continue;
        }
        let mut data = vec![0u8; length as usize];
        reader.read_exact(&mut data).await?;
        debug!(option = %proto::option_name(option), length, "option");

        if let Some(end) = n.refused(option) {
            n.send(writer).await?;
            return Err(end);
        }
        if !n.out.is_empty() {
            n.send(writer).await?;
            continue;
        }

        let parsed = match proto::parse_option(option, &data) {
            Ok(p) => p,
            Err(e) if option == opt::EXPORT_NAME => {
                return Err(HandshakeEnd::Violation(format!("NBD_OPT_EXPORT_NAME: {e}")));
            }
            Err(e) => {
                n.error(option, rep::ERR_INVALID, &e.0);
                n.send(writer).await?;
                continue;
            }
        };
        let outcome = n.handle(option, parsed);
        n.send(writer).await?;
        match outcome {
            Next::Continue => {}
            Next::Transmission(session) => return Ok(Negotiated::Session(session)),
            Next::StartTls => return Ok(Negotiated::StartTls(flags)),
            Next::End(end) => return Err(end),
        }
    }
}

enum Next {
    Continue,
    Transmission(Session),
    StartTls,
    End(HandshakeEnd),
}

async fn skip<R: AsyncRead + Unpin>(reader: &mut R, mut n: u64) -> std::io::Result<()> {
    let mut buf = [0u8; 8192];
    while n > 0 {
        let chunk = n.min(buf.len() as u64) as usize;
        reader.read_exact(&mut buf[..chunk]).await?;
        n -= chunk as u64;
    }
    Ok(())
}

impl Negotiation<'_> {
    fn exports(&self) -> &ExportSet {
        &self.shared.exports
    }

    fn reply(&mut self, option: u32, reply_type: u32, data: &[u8]) {
        proto::encode_option_reply(&mut self.out, option, reply_type, data);
    }

    fn error(&mut self, option: u32, reply_type: u32, message: &str) {
        debug!(option = %proto::option_name(option), reply_type, message, "option refused");
        let mut m = message.as_bytes();
        if m.len() > proto::MAX_STRING_LEN {
            m = &m[..proto::MAX_STRING_LEN];
        }
        self.reply(option, reply_type, m);
    }

    async fn send<W: AsyncWrite + Unpin>(&mut self, writer: &mut W) -> std::io::Result<()> {
        if !self.out.is_empty() {
            writer.write_all(&self.out).await?;
            writer.flush().await?;
            self.out.clear();
        }
        Ok(())
    }

    /// Answers options of a refused or shutting-down connection. Returns `Some` when
    /// the connection must end after sending what was queued.
    fn refused(&mut self, option: u32) -> Option<HandshakeEnd> {
        let tls_required = !self.tls_active
            && self
                .shared
                .config
                .tls
                .as_ref()
                .is_some_and(|t| t.mode == TlsMode::Require);
        let (code, message) = if self.shared.shutdown.is_cancelled() {
            (rep::ERR_SHUTDOWN, "the server is shutting down".to_owned())
        } else if let Refusal::TooManyConnections(limit) = self.refusal {
            (
                rep::ERR_POLICY,
                format!("the server is at its limit of {limit} connections"),
            )
        } else if tls_required && option != opt::STARTTLS {
            (
                rep::ERR_TLS_REQD,
                "this server requires TLS: send NBD_OPT_STARTTLS first".to_owned(),
            )
        } else {
            return None;
        };
        match option {
            opt::ABORT => {
                self.reply(option, rep::ACK, &[]);
                Some(HandshakeEnd::Closed("client aborted".into()))
            }
            // EXPORT_NAME cannot carry an error: the only answer is to hang up.
            opt::EXPORT_NAME => Some(HandshakeEnd::Closed(message)),
            _ => {
                self.error(option, code, &message);
                None
            }
        }
    }

    fn handle(&mut self, option: u32, parsed: ClientOption) -> Next {
        match parsed {
            ClientOption::Abort => {
                self.reply(option, rep::ACK, &[]);
                Next::End(HandshakeEnd::Closed("client aborted".into()))
            }
            ClientOption::List => {
                let names: Vec<String> = self
                    .exports()
                    .iter()
                    .map(|(name, _)| name.to_owned())
                    .collect();
                for name in names {
                    self.reply(option, rep::SERVER, &proto::rep_server(&name));
                }
                self.reply(option, rep::ACK, &[]);
                Next::Continue
            }
            ClientOption::StartTls => {
                if self.tls_active {
                    self.error(option, rep::ERR_INVALID, "TLS is already running");
                    Next::Continue
                } else if self.shared.config.tls.is_none() {
                    self.error(option, rep::ERR_POLICY, "this server does not offer TLS");
                    Next::Continue
                } else {
                    self.reply(option, rep::ACK, &[]);
                    Next::StartTls
                }
            }
            ClientOption::StructuredReply => {
                match self.mode {
                    ReplyMode::Extended => self.error(
                        option,
                        rep::ERR_EXT_HEADER_REQD,
                        "extended headers are already negotiated",
                    ),
                    ReplyMode::Structured => self.error(
                        option,
                        rep::ERR_INVALID,
                        "structured replies are already negotiated",
                    ),
                    ReplyMode::Simple => {
                        self.mode = ReplyMode::Structured;
                        self.reply(option, rep::ACK, &[]);
                    }
                }
                Next::Continue
            }
            ClientOption::ExtendedHeaders => {
                if self.mode == ReplyMode::Extended {
                    self.error(
                        option,
                        rep::ERR_INVALID,
                        "extended headers are already negotiated",
                    );
                } else {
                    self.mode = ReplyMode::Extended;
                    self.reply(option, rep::ACK, &[]);
                }
                Next::Continue
            }
            ClientOption::ListMetaContext(req) => {
                self.meta_context(option, &req, false);
                Next::Continue
            }
            ClientOption::SetMetaContext(req) => {
                // A SET replaces the previous selection, even when it fails.
                self.meta = None;
                if self.mode == ReplyMode::Simple {
                    self.error(
                        option,
                        rep::ERR_INVALID,
                        "structured replies must be negotiated first",
                    );
                } else {
                    self.meta_context(option, &req, true);
                }
                Next::Continue
            }
            ClientOption::Info(req) => {
                self.info(option, &req);
                Next::Continue
            }
            ClientOption::Go(req) => match self.info(option, &req) {
                Some(session) => Next::Transmission(session),
                None => Next::Continue,
            },
            ClientOption::ExportName(name) => self.export_name(&name),
            ClientOption::Unknown(_) => {
                let msg = format!("{} is not supported", proto::option_name(option));
                self.error(option, rep::ERR_UNSUP, &msg);
                Next::Continue
            }
        }
    }

    /// Metadata contexts of export `index` selected for this connection.
    fn contexts_for(&self, index: usize) -> Vec<usize> {
        match &self.meta {
            Some((i, contexts)) if *i == index => contexts.clone(),
            _ => Vec::new(),
        }
    }

    fn transmission_flags(&self, export: &dyn Export, contexts: usize) -> u16 {
        let caps = export.capabilities();
        let writable = !caps.read_only;
        let mut f = tflags::HAS_FLAGS;
        let mut set = |cond: bool, flag: u16| {
            if cond {
                f |= flag;
            }
        };
        set(caps.read_only, tflags::READ_ONLY);
        set(caps.flush, tflags::SEND_FLUSH);
        set(caps.fua, tflags::SEND_FUA);
        set(caps.rotational, tflags::ROTATIONAL);
        set(writable && caps.trim, tflags::SEND_TRIM);
        set(writable && caps.write_zeroes, tflags::SEND_WRITE_ZEROES);
        set(
            writable && caps.write_zeroes && caps.fast_zero,
            tflags::SEND_FAST_ZERO,
        );
        set(self.mode != ReplyMode::Simple, tflags::SEND_DF);
        set(caps.multi_conn, tflags::CAN_MULTI_CONN);
        set(caps.cache, tflags::SEND_CACHE);
        set(
            self.mode == ReplyMode::Extended && contexts > 0,
            tflags::BLOCK_STATUS_PAYLOAD,
        );
        f
    }

    /// `NBD_OPT_INFO` / `NBD_OPT_GO`; returns the session for a successful GO.
    fn info(&mut self, option: u32, req: &InfoRequest) -> Option<Session> {
        let Some((index, name, export)) = self.exports().lookup(&req.name) else {
            let msg = format!("no export named {:?}", req.name);
            self.error(option, rep::ERR_UNKNOWN, &msg);
            return None;
        };
        let (name, export) = (name.to_owned(), Arc::clone(export));
        let contexts = self.contexts_for(index);
        let flags = self.transmission_flags(&*export, contexts.len());
        if req.items.contains(&info::NAME) {
            self.reply(option, rep::INFO, &proto::info_string(info::NAME, &name));
        }
        if req.items.contains(&info::DESCRIPTION)
            && let Some(d) = export.description()
        {
            // At most 4 bytes per char: never over the 4096-byte string limit.
            let d: String = d.chars().take(proto::MAX_STRING_LEN / 4).collect();
            self.reply(
                option,
                rep::INFO,
                &proto::info_string(info::DESCRIPTION, &d),
            );
        }
        // Block sizes are always sent: they are the truth whether or not asked for.
        let b = export.block_sizes();
        self.reply(
            option,
            rep::INFO,
            &proto::info_block_size(b.minimum, b.preferred, b.maximum_payload),
        );
        self.reply(option, rep::INFO, &proto::info_export(export.size(), flags));
        self.reply(option, rep::ACK, &[]);
        if option != opt::GO {
            return None;
        }
        Some(Session {
            export_name: name,
            export,
            mode: self.mode,
            contexts,
        })
    }

    fn export_name(&mut self, name: &str) -> Next {
        if self.mode == ReplyMode::Extended {
            return Next::End(HandshakeEnd::Violation(
                "NBD_OPT_EXPORT_NAME after extended headers were negotiated".into(),
            ));
        }
        let Some((index, canonical, export)) = self.exports().lookup(name) else {
            return Next::End(HandshakeEnd::Closed(format!(
                "NBD_OPT_EXPORT_NAME for unknown export {name:?}"
            )));
        };
        let (canonical, export) = (canonical.to_owned(), Arc::clone(export));
        let contexts = self.contexts_for(index);
        let flags = self.transmission_flags(&*export, contexts.len());
        self.out.extend_from_slice(&export.size().to_be_bytes());
        self.out.extend_from_slice(&flags.to_be_bytes());
        if !self.no_zeroes {
            self.out.extend_from_slice(&[0u8; 124]);
        }
        Next::Transmission(Session {
            export_name: canonical,
            export,
            mode: self.mode,
            contexts,
        })
    }

    fn meta_context(&mut self, option: u32, req: &MetaContextRequest, set: bool) {
        let Some((index, _, export)) = self.exports().lookup(&req.export) else {
            let msg = format!("no export named {:?}", req.export);
            self.error(option, rep::ERR_UNKNOWN, &msg);
            return;
        };
        let available: Vec<&'static str> = export.meta_contexts().to_vec();
        let mut chosen: Vec<usize> = Vec::new();
        if req.queries.is_empty() && !set {
            chosen = (0..available.len()).collect();
        }
        for query in &req.queries {
            for (i, name) in available.iter().enumerate() {
                // A bare namespace ("base:", "qemu:") lists everything in it; SET ignores it.
                let matches = *name == query.as_str()
                    || (!set && query.ends_with(':') && name.starts_with(query.as_str()));
                if matches && !chosen.contains(&i) {
                    chosen.push(i);
                }
            }
        }
        for (id, &i) in chosen.iter().enumerate() {
            let id = if set { id as u32 } else { 0 };
            self.reply(
                option,
                rep::META_CONTEXT,
                &proto::rep_meta_context(id, available[i]),
            );
        }
        self.reply(option, rep::ACK, &[]);
        if set {
            debug!(export = %req.export, contexts = ?chosen.iter().map(|&i| available[i]).collect::<Vec<_>>(), "meta contexts selected");
            self.meta = Some((index, chosen));
        }
    }
}
