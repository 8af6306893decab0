//! A TLS client for the daemon's TLS listeners, and the checked-in test
//! certificates it trusts.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpStream;

use crate::ports::repo_root;

/// `tests/certs/<name>`.
pub fn cert_path(name: &str) -> PathBuf {
    repo_root().join("tests/certs").join(name)
}

/// A TLS client connection to `addr`: trusts `tests/certs/ca.crt` if it
/// exists, otherwise any certificate (ESXi pins a thumbprint; these tests
/// only exercise the transport).
pub async fn tls_connect(
    addr: SocketAddr,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(std::io::Error::other)?;
    let ca = cert_path("ca.crt");
    let config = if ca.exists() {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&ca).map_err(std::io::Error::other)? {
            roots
                .add(cert.map_err(std::io::Error::other)?)
                .map_err(std::io::Error::other)?;
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(vspc_tls::AnyServerCert(provider)))
            .with_no_client_auth()
    };
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from("localhost").map_err(std::io::Error::other)?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
}
