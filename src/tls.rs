//! The `--tls*` options of `serve` and `proxy`: NBD's STARTTLS with x509 certificates
//! (see `thinline_nbd::tls`).

use std::path::PathBuf;

use anyhow::bail;
use clap::{Args, ValueEnum};
use thinline_nbd::tls::{TlsMode, TlsSettings};

/// Whether the server speaks TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Tls {
    /// Plain NBD; STARTTLS is refused.
    Off,
    /// STARTTLS is offered; clients may also stay in clear.
    On,
    /// Only STARTTLS and ABORT are answered in clear.
    Require,
}

#[derive(Debug, Args)]
pub struct TlsArgs {
    /// TLS (NBD STARTTLS): off, on (offered) or require (nothing but STARTTLS in clear;
    /// exports are listed only inside TLS). on and require need --tls-cert and --tls-key.
    #[arg(long, value_enum, default_value_t = Tls::Off)]
    tls: Tls,
    /// The server's certificate chain (PEM).
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// The server's private key (PEM), readable and writable by its owner only.
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// Require client certificates signed by these CAs (PEM), and check them.
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
}

impl TlsArgs {
    /// The server's TLS settings (`None` for `--tls off`).
    pub fn settings(&self) -> anyhow::Result<Option<TlsSettings>> {
        let mode = match self.tls {
            Tls::Off => {
                if self.tls_cert.is_some() || self.tls_key.is_some() || self.tls_ca.is_some() {
                    bail!("--tls-cert, --tls-key and --tls-ca need --tls on or --tls require");
                }
                return Ok(None);
            }
            Tls::On => TlsMode::On,
            Tls::Require => TlsMode::Require,
        };
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            bail!("--tls on and --tls require need --tls-cert and --tls-key");
        };
        Ok(Some(TlsSettings::from_files(
            mode,
            cert,
            key,
            self.tls_ca.as_deref(),
        )?))
    }
}
