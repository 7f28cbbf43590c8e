//! The `--tls*` options of `serve` and `proxy`: NBD's STARTTLS with x509 certificates
//! or pre-shared keys (see `thinline_nbd::tls` and `thinline_nbd::psk`).

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
    /// exports are listed only inside TLS). on and require need --tls-cert and --tls-key,
    /// or --tls-psk.
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
    /// Authenticate clients by pre-shared keys instead of certificates: a psktool file
    /// (`username:hexkey` lines, as qemu-nbd and nbdkit read), readable and writable by
    /// its owner only.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["tls_cert", "tls_key", "tls_ca"])]
    tls_psk: Option<PathBuf>,
}

impl TlsArgs {
    /// The server's TLS settings (`None` for `--tls off`).
    pub fn settings(&self) -> anyhow::Result<Option<TlsSettings>> {
        let mode = match self.tls {
            Tls::Off => {
                if self.tls_cert.is_some()
                    || self.tls_key.is_some()
                    || self.tls_ca.is_some()
                    || self.tls_psk.is_some()
                {
                    bail!(
                        "--tls-cert, --tls-key, --tls-ca and --tls-psk need --tls on or --tls require"
                    );
                }
                return Ok(None);
            }
            Tls::On => TlsMode::On,
            Tls::Require => TlsMode::Require,
        };
        if let Some(psk) = &self.tls_psk {
            return Ok(Some(TlsSettings::from_psk_file(mode, psk)?));
        }
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            bail!("--tls on and --tls require need --tls-cert and --tls-key, or --tls-psk");
        };
        Ok(Some(TlsSettings::from_files(
            mode,
            cert,
            key,
            self.tls_ca.as_deref(),
        )?))
    }
}
