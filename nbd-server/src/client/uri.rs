//! `nbd://`, `nbd+unix://`, `nbds://` and `nbds+unix://` URIs (NetworkBlockDevice
//! `doc/uri.md`, with libnbd's `tls-*` query parameters): parsing, and a display form
//! without secrets for logs and messages.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use super::{DEFAULT_PORT, Error, Result};
use crate::proto::MAX_STRING_LEN;

/// How to reach an NBD server.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Transport {
    /// TCP to `host:port` (`host` is an IPv6 literal without brackets, an IPv4 literal
    /// or a name).
    Tcp {
        /// Host name or address.
        host: String,
        /// Port.
        port: u16,
    },
    /// A unix socket at a path.
    Unix {
        /// The socket's path.
        socket: PathBuf,
    },
}

/// How an `nbds://` or `nbds+unix://` URI asks for TLS (libnbd's query parameters).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct TlsParams {
    /// `tls-certificates=DIR`: `ca-cert.pem` (the CAs the server's certificate must
    /// chain to; the system's CAs without it), and `client-cert.pem` with
    /// `client-key.pem` if the server asks for a client certificate.
    pub certificates: Option<PathBuf>,
    /// `tls-psk-file=FILE`: a psktool file; TLS with a pre-shared key instead of
    /// certificates.
    pub psk_file: Option<PathBuf>,
    /// The PSK user: the URI's user info or `tls-username=`; the login name without.
    pub username: Option<String>,
    /// `tls-hostname=NAME`: the name the server's certificate must carry (the URI's host
    /// by default, `localhost` on unix sockets).
    pub hostname: Option<String>,
}

/// A parsed `nbd[s]://host[:port]/export` or `nbd[s]+unix:///export?socket=PATH` URI
/// (NetworkBlockDevice `doc/uri.md`).
///
/// Query parameters other than `socket` and `tls-*` are accepted and dropped, as is user
/// info without TLS: the [`Display`](fmt::Display) form shows only the scheme, the
/// transport and the export, so it can go into logs and error messages.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NbdUri {
    /// Where the server is.
    pub transport: Transport,
    /// The export name, percent-decoded (`""` is the server's default export).
    pub export: String,
    /// TLS (`nbds://`, `nbds+unix://`), or none.
    pub tls: Option<TlsParams>,
}

impl NbdUri {
    /// Parses an NBD URI. Other transports (`nbd+vsock://`, `nbd+ssh://`) are refused,
    /// and so is `tls-verify-peer=false`: a server is always authenticated.
    pub fn parse(text: &str) -> Result<NbdUri> {
        let fail = |reason: String| Error::Uri {
            uri: redact(text),
            reason,
        };
        let Some((scheme, rest)) = text.split_once("://") else {
            return Err(fail(
                "expected nbd[s]://host[:port]/export or nbd[s]+unix:///export?socket=PATH".into(),
            ));
        };
        let (unix, tls) = match scheme.to_ascii_lowercase().as_str() {
            "nbd" | "nbd+tcp" => (false, false),
            "nbd+unix" => (true, false),
            "nbds" | "nbds+tcp" => (false, true),
            "nbds+unix" => (true, true),
            s if s.starts_with("nbd") => {
                return Err(fail(format!(
                    "the {scheme}:// transport is not supported \
                     (only nbd://, nbds://, nbd+unix:// and nbds+unix://)"
                )));
            }
            _ => return Err(fail(format!("{scheme}:// is not an NBD URI"))),
        };
        // Fragment, then query, then authority and path.
        let rest = rest.split_once('#').map_or(rest, |(r, _)| r);
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        // User info (`user@`) is the PSK user with TLS, and means nothing without.
        let (user, authority) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let export = percent_decode(path.strip_prefix('/').unwrap_or(path))
            .ok_or_else(|| fail("the export name is not valid percent-encoded UTF-8".into()))?;
        if export.len() > MAX_STRING_LEN {
            return Err(fail(format!(
                "the export name is {} bytes, longer than {MAX_STRING_LEN}",
                export.len()
            )));
        }
        let mut socket = None;
        let mut params = TlsParams::default();
        // `user:password@`: the password (which NBD has no use for) is dropped.
        let user = user.map(|u| u.split_once(':').map_or(u, |(name, _)| name));
        if let Some(user) = user.filter(|u| !u.is_empty()) {
            params.username = Some(
                percent_decode(user)
                    .ok_or_else(|| fail("the user is not valid percent-encoded UTF-8".into()))?,
            );
        }
        for param in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = param.split_once('=').unwrap_or((param, ""));
            let value = || {
                percent_decode(value)
                    .ok_or_else(|| fail(format!("{key}= is not valid percent-encoded UTF-8")))
            };
            match key {
                "socket" => socket = Some(value()?),
                "tls-certificates" => params.certificates = Some(PathBuf::from(value()?)),
                "tls-psk-file" => params.psk_file = Some(PathBuf::from(value()?)),
                "tls-username" => params.username = Some(value()?),
                "tls-hostname" => params.hostname = Some(value()?),
                "tls-verify-peer" if !matches!(value()?.as_str(), "true" | "1" | "yes" | "on") => {
                    return Err(fail(
                        "tls-verify-peer=false is not supported: the server is always \
                         verified (give its CA with tls-certificates=DIR)"
                            .into(),
                    ));
                }
                // Anything else is ignored, as libnbd ignores unknown parameters.
                _ => {}
            }
        }
        if tls && params.certificates.is_some() && params.psk_file.is_some() {
            return Err(fail(
                "tls-certificates= and tls-psk-file= exclude each other: \
                 TLS authenticates with certificates or with a pre-shared key"
                    .into(),
            ));
        }
        let transport = if unix {
            if !authority.is_empty() {
                return Err(fail(
                    "nbd+unix:// URIs name no host: use nbd+unix:///export?socket=PATH".into(),
                ));
            }
            let socket = socket.filter(|s| !s.is_empty()).ok_or_else(|| {
                fail("nbd+unix:// needs the socket path: nbd+unix:///export?socket=PATH".into())
            })?;
            if socket.starts_with('\0') {
                return Err(fail("abstract unix sockets are not supported".into()));
            }
            if socket.contains('\0') {
                return Err(fail("the socket path contains a NUL byte".into()));
            }
            Transport::Unix {
                socket: PathBuf::from(socket),
            }
        } else {
            if socket.is_some() {
                return Err(fail(
                    "socket= is only valid with nbd+unix:// (nbd:// is TCP)".into(),
                ));
            }
            let (host, port) = split_host_port(authority).map_err(fail)?;
            Transport::Tcp { host, port }
        };
        Ok(NbdUri {
            transport,
            export,
            tls: tls.then_some(params),
        })
    }

    /// The server, for messages: `host:port` (`[v6]:port`) or the socket path.
    pub fn server(&self) -> String {
        match &self.transport {
            Transport::Tcp { host, port } if host.contains(':') => format!("[{host}]:{port}"),
            Transport::Tcp { host, port } => format!("{host}:{port}"),
            Transport::Unix { socket } => socket.display().to_string(),
        }
    }
}

impl FromStr for NbdUri {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        NbdUri::parse(s)
    }
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let export = percent_encode(&self.export, b"/:@!$'()*+,;=");
        let scheme = if self.tls.is_some() { "nbds" } else { "nbd" };
        match &self.transport {
            Transport::Tcp { .. } => write!(f, "{scheme}://{}/{export}", self.server()),
            Transport::Unix { socket } => {
                let socket = percent_encode(&socket.to_string_lossy(), b"/:@!$'()*+,;");
                write!(f, "{scheme}+unix:///{export}?socket={socket}")
            }
        }
    }
}

fn split_host_port(authority: &str) -> std::result::Result<(String, u16), String> {
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| "an IPv6 address lacks its closing ']'".to_owned())?;
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("[{host}] is not an IPv6 address"));
        }
        match after {
            "" => (host, None),
            p => match p.strip_prefix(':') {
                Some(p) => (host, Some(p)),
                None => return Err(format!("unexpected {p:?} after the IPv6 address")),
            },
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err("nbd:// needs a host: nbd://host[:port]/export".into());
    }
    if !authority.starts_with('[') && host.contains(':') {
        return Err("IPv6 addresses must be in brackets: nbd://[::1]/export".into());
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => n,
            _ => return Err(format!("invalid port {p:?}")),
        },
    };
    Ok((host.to_owned(), port))
}

fn percent_decode(s: &str) -> Option<String> {
    thinline_format::storage::percent_decode(s)
}

fn percent_encode(s: &str, keep: &[u8]) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || keep.contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A URI for messages about a URI that did not parse: scheme, host and path only
/// (no user info, query or fragment).
fn redact(text: &str) -> String {
    let text = text.split(['?', '#']).next().unwrap_or("");
    match text.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = match rest.find('/') {
                Some(i) => rest.split_at(i),
                None => (rest, ""),
            };
            let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            format!("{scheme}://{host}{path}")
        }
        None => text.to_owned(),
    }
}
