//! TLS for the proxy and HTTP ports: rustls with the ring provider,
//! certificates and keys read as PEM. Every failure names the file.

use std::path::Path;
use std::sync::Arc;
use tokio_rustls::TlsAcceptor;

/// Build the acceptor from a PEM certificate chain and key (the key may sit
/// in the certificate file).
pub fn acceptor(cert: &Path, key: Option<&Path>) -> Result<TlsAcceptor, String> {
    let key_path = key.unwrap_or(cert);
    let (certs, key) = vspc_tls::load_pem(cert, key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup failed: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            format!(
                "TLS certificate {} and key {} do not work together: {e}",
                cert.display(),
                key_path.display()
            )
        })?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The TLS handshake of a connection accepted on `door`, within `limit`;
/// `None` (logged at `debug` and counted) when it fails or times out, so a
/// scanner or a client that never speaks costs one task for `limit` at most.
pub async fn handshake(
    acceptor: &TlsAcceptor,
    tcp: tokio::net::TcpStream,
    limit: std::time::Duration,
    peer: std::net::SocketAddr,
    door: crate::metrics::Door,
    metrics: &crate::metrics::Metrics,
) -> Option<tokio_rustls::server::TlsStream<tokio::net::TcpStream>> {
    let why = match tokio::time::timeout(limit, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => return Some(tls),
        Ok(Err(e)) => format!("failed: {e}"),
        Err(_) => format!("timed out after {limit:?}"),
    };
    metrics.tls_failure(door);
    match door {
        // A VM that cannot connect is worth a warning; a browser or a
        // scanner on the HTTP port is not.
        crate::metrics::Door::Proxy => {
            tracing::warn!(%peer, "{}: TLS handshake {why}", door.port_name())
        }
        _ => tracing::debug!(%peer, "{}: TLS handshake {why}", door.port_name()),
    }
    None
}
