//! A certificate chain and its private key, read from PEM files for
//! rustls (`--cert`, `--key`; the key may sit in the certificate file).
//! Every failure names the file and what was expected of it. The daemon's
//! proxy and HTTP listeners and the cluster's node link read them the same
//! way through [`load`].

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;

/// The chain in `cert` and the key in `key` (or in `cert` when `key` is
/// `None`).
pub fn load(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bad_file_is_named_with_what_was_wrong() {
        let dir = std::env::temp_dir().join(format!("vspc-pem-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let missing = dir.join("missing.pem");
        let e = load(&missing, None).expect_err("a missing file");
        assert!(
            e.contains("cannot read TLS certificate") && e.contains("missing.pem"),
            "{e}"
        );
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not pem at all\n").expect("write");
        let e = load(&empty, None).expect_err("no certificate");
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
        let e = load(&cert, None).expect_err("no key in the certificate file");
        assert!(
            e.contains("no usable private key") && e.contains("cert.pem"),
            "{e}"
        );
        let e = load(&cert, Some(&missing)).expect_err("a missing key file");
        assert!(
            e.contains("cannot read TLS key") && e.contains("missing.pem"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
