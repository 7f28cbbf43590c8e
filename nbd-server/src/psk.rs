//! TLS with pre-shared keys (RFC 4279, and TLS 1.3's external PSKs), the other way
//! qemu-nbd, nbdkit and libnbd authenticate NBD: no certificates, a secret per user in
//! a `psktool` file (`username:hexkey` per line).
//!
//! rustls has no external PSKs, so this side of TLS is OpenSSL's libssl (through the
//! `openssl` crate): its PSK callbacks interoperate with GnuTLS, which the other NBD
//! tools use, in TLS 1.3 (`psk_dhe_ke`) and TLS 1.2 (`ECDHE-PSK`, `PSK` suites).
//! Certificates stay with rustls ([`crate::tls`]).

use std::fmt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use openssl::ssl::{Ssl, SslContext, SslContextBuilder, SslMethod, SslVerifyMode, SslVersion};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_openssl::SslStream;

use crate::keyfile::check_private;
use crate::{Error, Result};

/// The longest key libssl takes (`PSK_MAX_PSK_LEN`).
const MAX_KEY_LEN: usize = 256;
/// The longest identity libssl takes (`PSK_MAX_IDENTITY_LEN`).
const MAX_IDENTITY_LEN: usize = 128;

/// TLS 1.2 suites with a PSK: ephemeral ECDH first (forward secrecy), then plain PSK
/// (what GnuTLS's `+PSK` offers). No null encryption, no 3DES, no SHA-1 MACs.
const TLS12_CIPHERS: &str = "ECDHE-PSK:PSK:!eNULL:!aNULL:!3DES:!SHA1:@STRENGTH";

/// The keys of a `psktool` file: usernames and their secrets.
#[derive(Clone)]
pub struct PskKeys {
    path: PathBuf,
    keys: Arc<Vec<(String, Vec<u8>)>>,
}

impl fmt::Debug for PskKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Names only: the secrets never reach a log.
        let users: Vec<&str> = self.keys.iter().map(|(u, _)| u.as_str()).collect();
        f.debug_struct("PskKeys")
            .field("path", &self.path)
            .field("users", &users)
            .finish()
    }
}

impl PskKeys {
    /// Reads a `psktool` file (`username:hexkey` lines; blank lines are skipped). The
    /// file is refused if group- or world-writable, or world-readable.
    pub fn read(path: &Path) -> Result<PskKeys> {
        check_private(path)?;
        let bad = |reason: String| Error::Tls {
            path: path.to_owned(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let keys = PskKeys::parse(&text).map_err(bad)?;
        Ok(PskKeys {
            path: path.to_owned(),
            keys: Arc::new(keys),
        })
    }

    /// The `username:hexkey` lines of `text`. Errors name the line, never its key.
    fn parse(text: &str) -> std::result::Result<Vec<(String, Vec<u8>)>, String> {
        let mut keys: Vec<(String, Vec<u8>)> = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() {
                continue;
            }
            let n = n + 1;
            let Some((user, hex)) = line.split_once(':') else {
                return Err(format!("line {n} is not username:hexkey"));
            };
            if user.is_empty() || user.len() > MAX_IDENTITY_LEN {
                return Err(format!(
                    "line {n}: a username has 1 to {MAX_IDENTITY_LEN} bytes"
                ));
            }
            if keys.iter().any(|(u, _)| u == user) {
                return Err(format!("line {n}: the username {user:?} appears twice"));
            }
            let key = decode_hex(hex.trim())
                .ok_or_else(|| format!("line {n}: the key of {user:?} is not hexadecimal"))?;
            if key.is_empty() || key.len() > MAX_KEY_LEN {
                return Err(format!(
                    "line {n}: the key of {user:?} has {} bytes (1 to {MAX_KEY_LEN})",
                    key.len()
                ));
            }
            keys.push((user.to_owned(), key));
        }
        if keys.is_empty() {
            return Err("holds no username:hexkey line".into());
        }
        Ok(keys)
    }

    /// The secret of `user`.
    fn key(&self, user: &[u8]) -> Option<&[u8]> {
        self.keys
            .iter()
            .find(|(u, _)| u.as_bytes() == user)
            .map(|(_, k)| k.as_slice())
    }

    /// The TLS server side: accepts any user of the file with its key.
    pub fn acceptor(&self) -> Result<PskAcceptor> {
        let mut builder = context(self, SslMethod::tls_server())?;
        let keys = self.clone();
        builder.set_psk_server_callback(move |_ssl, identity, out| {
            // An unknown user gets 0 bytes: libssl then fails the handshake.
            Ok(identity
                .and_then(|id| keys.key(id))
                .filter(|key| key.len() <= out.len())
                .map_or(0, |key| {
                    out[..key.len()].copy_from_slice(key);
                    key.len()
                }))
        });
        Ok(PskAcceptor {
            context: builder.build(),
        })
    }

    /// The TLS client side, authenticating as `user` (who must be in the file).
    pub fn connector(&self, user: &str) -> Result<PskConnector> {
        let Some(key) = self.key(user.as_bytes()).map(<[u8]>::to_vec) else {
            return Err(Error::Tls {
                path: self.path.clone(),
                reason: format!("has no key for the user {user:?}"),
            });
        };
        let mut builder = context(self, SslMethod::tls_client())?;
        let identity = user.as_bytes().to_vec();
        builder.set_psk_client_callback(move |_ssl, _hint, id_out, key_out| {
            // The identity is written NUL-terminated.
            if identity.len() >= id_out.len() || key.len() > key_out.len() {
                return Ok(0);
            }
            id_out[..identity.len()].copy_from_slice(&identity);
            id_out[identity.len()] = 0;
            key_out[..key.len()].copy_from_slice(&key);
            Ok(key.len())
        });
        Ok(PskConnector {
            context: builder.build(),
            user: user.to_owned(),
        })
    }
}

/// A libssl context for PSKs only: TLS 1.2 or later, no certificates.
fn context(keys: &PskKeys, method: SslMethod) -> Result<SslContextBuilder> {
    let bad = |e: openssl::error::ErrorStack| Error::Tls {
        path: keys.path.clone(),
        reason: format!("libssl: {e}"),
    };
    let mut builder = SslContext::builder(method).map_err(bad)?;
    builder
        .set_min_proto_version(Some(SslVersion::TLS1_2))
        .map_err(bad)?;
    builder.set_cipher_list(TLS12_CIPHERS).map_err(bad)?;
    builder.set_verify(SslVerifyMode::NONE);
    Ok(builder)
}

/// The server side of a PSK handshake.
#[derive(Clone)]
pub struct PskAcceptor {
    context: SslContext,
}

impl fmt::Debug for PskAcceptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PskAcceptor").finish_non_exhaustive()
    }
}

impl PskAcceptor {
    /// Runs the server side of the handshake on `io`.
    pub async fn accept<S>(&self, io: S) -> std::io::Result<SslStream<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut stream = ssl_stream(&self.context, io)?;
        Pin::new(&mut stream)
            .accept()
            .await
            .map_err(|e| std::io::Error::other(handshake_failure(&e)))?;
        Ok(stream)
    }
}

/// The client side of a PSK handshake.
#[derive(Clone)]
pub struct PskConnector {
    context: SslContext,
    user: String,
}

impl fmt::Debug for PskConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PskConnector")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl PskConnector {
    /// Runs the client side of the handshake on `io`.
    pub async fn connect<S>(&self, io: S) -> std::io::Result<SslStream<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut stream = ssl_stream(&self.context, io)?;
        Pin::new(&mut stream).connect().await.map_err(|e| {
            let mut why = handshake_failure(&e);
            if why.contains("alert") {
                // A server that refuses a key says only "illegal parameter" or the like.
                why.push_str(&format!(
                    " (the server refused the key of user {:?}: a wrong key or an unknown user)",
                    self.user
                ));
            }
            std::io::Error::other(why)
        })?;
        Ok(stream)
    }
}

/// A TLS stream of `context` over `io`, before its handshake.
fn ssl_stream<S>(context: &SslContext, io: S) -> std::io::Result<SslStream<S>>
where
    S: AsyncRead + AsyncWrite,
{
    let ssl = Ssl::new(context).map_err(std::io::Error::other)?;
    SslStream::new(ssl, io).map_err(std::io::Error::other)
}

/// A handshake error in words (libssl's reason, or the I/O error).
fn handshake_failure(e: &openssl::ssl::Error) -> String {
    if let Some(stack) = e.ssl_error() {
        let reasons: Vec<String> = stack
            .errors()
            .iter()
            .map(|e| e.reason().unwrap_or("unknown").to_owned())
            .collect();
        if !reasons.is_empty() {
            return format!("TLS-PSK handshake failed: {}", reasons.join(", "));
        }
    }
    match e.io_error() {
        Some(io) => format!("TLS-PSK handshake failed: {io}"),
        None => format!("TLS-PSK handshake failed: {e}"),
    }
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psktool_lines_give_each_user_its_key() {
        let keys = PskKeys::parse("alice:00ff10\n\nbob:DEADBEEF\r\n").unwrap();
        assert_eq!(
            keys,
            vec![
                ("alice".to_owned(), vec![0, 0xff, 0x10]),
                ("bob".to_owned(), vec![0xde, 0xad, 0xbe, 0xef]),
            ]
        );
    }

    #[test]
    fn malformed_psk_files_are_refused_without_showing_the_key() {
        for (text, want) in [
            ("", "no username:hexkey"),
            ("alice", "line 1 is not username:hexkey"),
            (":00ff", "line 1: a username"),
            ("alice:0g1f", "not hexadecimal"),
            ("alice:abc", "not hexadecimal"),
            ("alice:", "has 0 bytes"),
            ("alice:00\nalice:11", "appears twice"),
        ] {
            let err = PskKeys::parse(text).unwrap_err();
            assert!(err.contains(want), "{text:?}: {err}");
            assert!(!err.contains("0g1f") && !err.contains("abc\""), "{err}");
        }
        let long = format!("alice:{}", "00".repeat(MAX_KEY_LEN + 1));
        assert!(PskKeys::parse(&long).unwrap_err().contains("257 bytes"));
    }
}
