//! Live status of a copy-on-read export, as JSON over a unix socket: a client connects,
//! reads one JSON document and the server closes. `thinline proxy status` is that client.

use std::path::Path;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::export::CorExport;
pub use crate::export::Status;

/// Binds the status socket at `path` with mode 0660 (owner and group may read the
/// status), replacing a stale socket and refusing a live one or any other file.
pub fn bind(
    path: &Path,
) -> std::result::Result<tokio::net::UnixListener, Box<thinline_nbd::Error>> {
    let listener = thinline_nbd::server::bind_unix_socket(path, 0o660)?;
    let listen_err = |source| thinline_nbd::Error::Listen {
        address: path.display().to_string(),
        source,
    };
    listener.set_nonblocking(true).map_err(listen_err)?;
    Ok(tokio::net::UnixListener::from_std(listener).map_err(listen_err)?)
}

/// Answers status requests on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::UnixListener,
    exports: Vec<(String, CorExport)>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let exports = Arc::new(exports);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => {
                let Ok((mut stream, _)) = accepted else { continue };
                let exports = Arc::clone(&exports);
                tokio::spawn(async move {
                    let doc: serde_json::Map<String, serde_json::Value> = exports
                        .iter()
                        .map(|(name, e)| (name.clone(), serde_json::to_value(e.status()).unwrap_or_default()))
                        .collect();
                    let mut text = serde_json::to_string(&serde_json::json!({ "exports": doc }))
                        .unwrap_or_default();
                    text.push('\n');
                    let _ = stream.write_all(text.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        }
    }
}

/// Asks the status socket at `path`: `{"exports": {NAME: Status, …}}`.
pub async fn query(path: &Path) -> std::io::Result<serde_json::Value> {
    let mut stream = tokio::net::UnixStream::connect(path).await?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await?;
    serde_json::from_str(&text).map_err(std::io::Error::other)
}
