//! TLS as the NBD protocol has it: a client sends `NBD_OPT_STARTTLS` during the
//! handshake, the server acknowledges it, both run a TLS handshake on the connection,
//! and option haggling goes on (then transmission) inside TLS. With [`TlsMode::Require`]
//! every option but `NBD_OPT_STARTTLS` and `NBD_OPT_ABORT` sent before it is refused
//! with `NBD_REP_ERR_TLS_REQD`, so not even the export list leaks in clear.
//!
//! Certificates are rustls's; pre-shared keys are libssl's ([`crate::psk`]).

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject;

use crate::keyfile::{check_private, read_certificates};
use crate::psk::{PskAcceptor, PskKeys};
use crate::{Error, Result};

/// Whether a server offers or demands TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// STARTTLS is accepted; clients may also stay in clear.
    On,
    /// Only STARTTLS and ABORT are answered before TLS.
    Require,
}

/// The server side of the TLS handshake: x509 certificates (rustls) or pre-shared keys
/// (libssl, [`crate::psk`]).
#[derive(Clone)]
pub enum Acceptor {
    /// The server's certificate, and the client certificates it accepts, if it checks them.
    X509(tokio_rustls::TlsAcceptor),
    /// The users and keys of a `psktool` file.
    Psk(PskAcceptor),
}

impl std::fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Acceptor::X509(_) => f.write_str("X509"),
            Acceptor::Psk(psk) => psk.fmt(f),
        }
    }
}

/// A server's TLS: its mode and how it authenticates.
#[derive(Clone)]
pub struct TlsSettings {
    /// Offered or required.
    pub mode: TlsMode,
    /// The TLS handshake's server side.
    pub acceptor: Acceptor,
}

impl std::fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSettings")
            .field("mode", &self.mode)
            .field("acceptor", &self.acceptor)
            .finish()
    }
}

impl TlsSettings {
    /// Settings of `mode` with the rustls server configuration `config`.
    pub fn new(mode: TlsMode, config: Arc<rustls::ServerConfig>) -> TlsSettings {
        TlsSettings {
            mode,
            acceptor: Acceptor::X509(tokio_rustls::TlsAcceptor::from(config)),
        }
    }

    /// Settings of `mode` with the pre-shared keys of `psktool` file `path` (refused if
    /// group- or world-writable, or world-readable).
    pub fn from_psk_file(mode: TlsMode, path: &Path) -> Result<TlsSettings> {
        Ok(TlsSettings {
            mode,
            acceptor: Acceptor::Psk(PskKeys::read(path)?.acceptor()?),
        })
    }
}

impl TlsSettings {
    /// Settings of `mode` from PEM files: the server's certificate chain `cert` and its
    /// private key `key` (refused if group- or world-writable, or world-readable), and,
    /// with `client_ca`, the CAs whose certificates clients must present.
    pub fn from_files(
        mode: TlsMode,
        cert: &Path,
        key: &Path,
        client_ca: Option<&Path>,
    ) -> Result<TlsSettings> {
        let bad = |path: &Path, reason: String| Error::Tls {
            path: path.to_owned(),
            reason,
        };
        check_private(key)?;
        let certs = read_certificates(cert)?;
        let private = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| bad(key, format!("no private key in PEM form ({e})")))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(cert, e.to_string()))?;
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in read_certificates(ca)? {
                    roots.add(c).map_err(|e| bad(ca, e.to_string()))?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .map_err(|e| bad(ca, e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let config = builder
            .with_single_cert(certs, private)
            .map_err(|e| bad(cert, format!("does not go with the key: {e}")))?;
        Ok(TlsSettings::new(mode, Arc::new(config)))
    }
}
