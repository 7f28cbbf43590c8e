//! The files TLS reads: PEM certificates, and private keys (x509 or pre-shared), which
//! must be their owner's alone.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use crate::{Error, Result};

/// The certificates of PEM file `path` (at least one).
pub(crate) fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let bad = |reason: String| Error::Tls {
        path: path.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(e.to_string()))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not a PEM certificate file ({e})")))?;
    if certs.is_empty() {
        return Err(bad("holds no certificate".into()));
    }
    Ok(certs)
}

/// Refuses a key file others may change or read.
pub(crate) fn check_private(path: &Path) -> Result<()> {
    let mode = std::fs::metadata(path)
        .map_err(|e| Error::Tls {
            path: path.to_owned(),
            reason: e.to_string(),
        })?
        .permissions()
        .mode();
    let reason = if mode & 0o022 != 0 {
        "it is group- or world-writable"
    } else if mode & 0o004 != 0 {
        "it is world-readable"
    } else {
        return Ok(());
    };
    Err(Error::Tls {
        path: path.to_owned(),
        reason: format!(
            "{reason} (mode {:o}): a private key must be its owner's (chmod 600)",
            mode & 0o777
        ),
    })
}
