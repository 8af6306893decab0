//! The TLS pieces vspc uses in more than one place.
//!
//! - [`load_pem`]: a certificate chain and its private key, read from PEM
//!   files (`--cert`, `--key`; the key may sit in the certificate file),
//!   every failure naming the file and what was expected of it. The
//!   daemon's proxy and HTTP listeners and the cluster's node link read
//!   them this way.
//! - [`AnyServerCert`]: a client-side verifier that takes any server
//!   certificate but still checks the handshake signatures, for peers
//!   authenticated otherwise (the node link's proof, bound to the TLS
//!   session) and for the test kit's clients of self-signed daemons.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;

/// The chain in `cert` and the key in `key` (or in `cert` when `key` is
/// `None`).
pub fn load_pem(
    cert: &Path,
    key: Option<&Path>,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    let key_path = key.unwrap_or(cert);
    std::fs::metadata(cert)
        .map_err(|e| format!("cannot read TLS certificate {}: {e}", cert.display()))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("cannot read TLS certificate {}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("TLS certificate {} is not valid PEM: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "TLS certificate {} holds no certificate (expected a PEM 'BEGIN CERTIFICATE' block)",
            cert.display()
        ));
    }
    std::fs::metadata(key_path)
        .map_err(|e| format!("cannot read TLS key {}: {e}", key_path.display()))?;
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| {
        format!(
            "TLS key {} holds no usable private key (expected PEM; give it with --key): {e}",
            key_path.display()
        )
    })?;
    Ok((certs, key))
}

/// Accepts any server certificate, but checks the handshake signatures
/// with the provider's algorithms, so the TLS session itself is real.
/// Only for peers authenticated some other way.
#[derive(Debug)]
pub struct AnyServerCert(pub Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bad_file_is_named_with_what_was_wrong() {
        let dir = std::env::temp_dir().join(format!("vspc-pem-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let missing = dir.join("missing.pem");
        let e = load_pem(&missing, None).expect_err("a missing file");
        assert!(
            e.contains("cannot read TLS certificate") && e.contains("missing.pem"),
            "{e}"
        );
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not pem at all\n").expect("write");
        let e = load_pem(&empty, None).expect_err("no certificate");
        assert!(
            e.contains("holds no certificate") && e.contains("empty.pem"),
            "{e}"
        );
        let cert = dir.join("cert.pem");
        std::fs::write(
            &cert,
            "-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n",
        )
        .expect("write");
        let e = load_pem(&cert, None).expect_err("no key in the certificate file");
        assert!(
            e.contains("no usable private key") && e.contains("cert.pem"),
            "{e}"
        );
        let e = load_pem(&cert, Some(&missing)).expect_err("a missing key file");
        assert!(
            e.contains("cannot read TLS key") && e.contains("missing.pem"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
