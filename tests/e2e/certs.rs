//! The TLS test certificates in `tests/certs/` are checked in so the suite
//! needs no tools. This ignored test makes them anew:
//! `cargo test -p vspc --test certs -- --ignored`.
//! The other test here checks the checked-in pair is usable.

use std::path::PathBuf;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/certs")
}

#[test]
#[ignore = "rewrites tests/certs; run by hand"]
fn regenerate_test_certificates() {
    let names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    let ck = rcgen::generate_simple_self_signed(names).expect("generate certificate");
    std::fs::write(dir().join("server.crt"), ck.cert.pem()).expect("write server.crt");
    std::fs::write(dir().join("server.key"), ck.signing_key.serialize_pem())
        .expect("write server.key");
}

#[test]
fn checked_in_certificates_load() {
    let cert = dir().join("server.crt");
    let key = dir().join("server.key");
    vspc::net::tls::acceptor(&cert, Some(&key)).expect("test certificate and key load");
}
