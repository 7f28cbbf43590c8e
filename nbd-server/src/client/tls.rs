//! The client's TLS (`nbds://`, `nbds+unix://`): the server's certificate checked
//! against `tls-certificates=DIR/ca-cert.pem` (or the system's CAs) and the expected
//! host name, with a client certificate if the directory has one; or a pre-shared key
//! of a psktool file ([`crate::psk`]). A server that does not offer TLS is an error,
//! never a fallback to clear text.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{PrivateKeyDer, ServerName};

use super::uri::{TlsParams, Transport};
use super::{Error, Result};
use crate::keyfile::{check_private, read_certificates};
use crate::psk::{PskConnector, PskKeys};

/// How one connection authenticates its TLS handshake.
pub(super) enum ClientTls {
    /// Certificates: rustls, expecting `name` in the server's certificate.
    X509 {
        connector: tokio_rustls::TlsConnector,
        name: ServerName<'static>,
    },
    /// A pre-shared key.
    Psk(PskConnector),
}

impl ClientTls {
    /// The TLS `params` of a URI whose server is at `transport` (`server` names it in
    /// errors). Reads the key and certificate files.
    pub(super) fn new(
        params: &TlsParams,
        transport: &Transport,
        server: &str,
    ) -> Result<ClientTls> {
        let fail = |reason: String| Error::Tls {
            server: server.to_owned(),
            reason,
        };
        if let Some(psk) = &params.psk_file {
            let user = match &params.username {
                Some(user) => user.clone(),
                None => login_name().ok_or_else(|| {
                    fail("no PSK user: give it as nbds://USER@… or tls-username=USER".into())
                })?,
            };
            let keys = PskKeys::read(psk).map_err(|e| fail(e.to_string()))?;
            return Ok(ClientTls::Psk(
                keys.connector(&user).map_err(|e| fail(e.to_string()))?,
            ));
        }
        let host = match (&params.hostname, transport) {
            (Some(name), _) => name.clone(),
            (None, Transport::Tcp { host, .. }) => host.clone(),
            (None, Transport::Unix { .. }) => "localhost".to_owned(),
        };
        let name = ServerName::try_from(host.clone())
            .map_err(|_| fail(format!("{host:?} is not a host name or address")))?;
        let mut roots = rustls::RootCertStore::empty();
        let dir = params.certificates.as_deref();
        match dir {
            Some(dir) => {
                let ca = dir.join("ca-cert.pem");
                for cert in read_certificates(&ca).map_err(|e| fail(e.to_string()))? {
                    roots
                        .add(cert)
                        .map_err(|e| fail(format!("{}/ca-cert.pem: {e}", dir.display())))?;
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(found.certs);
                if roots.is_empty() {
                    return Err(fail(
                        "the system has no trusted CAs: give the server's CA with \
                         tls-certificates=DIR (DIR/ca-cert.pem)"
                            .into(),
                    ));
                }
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| fail(e.to_string()))?
            .with_root_certificates(roots);
        let client_cert = dir
            .map(|d| (d.join("client-cert.pem"), d.join("client-key.pem")))
            .filter(|(cert, key)| cert.exists() && key.exists());
        let config = match client_cert {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                check_private(&key).map_err(|e| fail(e.to_string()))?;
                let chain = read_certificates(&cert).map_err(|e| fail(e.to_string()))?;
                let key_der = PrivateKeyDer::from_pem_file(&key).map_err(|e| {
                    fail(format!(
                        "{}: no private key in PEM form ({e})",
                        key.display()
                    ))
                })?;
                builder
                    .with_client_auth_cert(chain, key_der)
                    .map_err(|e| fail(format!("{}: {e}", cert.display())))?
            }
        };
        Ok(ClientTls::X509 {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            name,
        })
    }
}

/// The user running this process, as libnbd takes it for the default PSK user.
fn login_name() -> Option<String> {
    ["USER", "LOGNAME"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|u| !u.is_empty()))
}
