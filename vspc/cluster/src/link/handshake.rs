//! The link's handshake: both sides prove the cluster secret to each other
//! without sending it, then each checks the other is a registered node of
//! the same cluster.
//!
//! Both sides send `Hello` (version, cluster, node name, 32 fresh random
//! bytes), then `Proof`: HMAC-SHA256, keyed by the secret, over a label,
//! the prover's role (dialer or acceptor), the cluster, the prover's and
//! the verifier's names, the prover's and the verifier's nonces, and the
//! TLS channel binding (RFC 5705 exporter; empty over plain TCP). A proof
//! is good for that one exchange only: the verifier's fresh nonce is in it
//! (an old handshake replayed fails), the roles and the order of the names
//! differ between the two proofs (one cannot be reflected as the other),
//! and under TLS the binding ties it to the TLS session (a man in the
//! middle holding two TLS sessions cannot relay it). Then each side sends
//! its `Verdict` and reads the other's; the whole exchange has a deadline.

use super::frame::{Frame, FrameError, MAX_HANDSHAKE_FRAME, NONCE_LEN};
use super::Directory;
use bytes::BytesMut;
use ring::hmac;
use std::path::Path;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Link protocol version in `Hello`.
pub const VERSION: u8 = 2;

/// The cluster secret (`--cluster-secret-file`), as an HMAC key. Its bytes
/// never leave the process.
#[derive(Clone)]
pub struct Secret(hmac::Key);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Fewest bytes a secret may have.
pub const MIN_SECRET: usize = 16;

impl Secret {
    /// A secret from bytes (at least [`MIN_SECRET`]).
    pub fn new(bytes: &[u8]) -> Result<Secret, String> {
        if bytes.len() < MIN_SECRET {
            return Err(format!(
                "the cluster secret has {} bytes; it needs at least {MIN_SECRET} (e.g. `head -c 32 /dev/urandom | base64`)",
                bytes.len()
            ));
        }
        Ok(Secret(hmac::Key::new(hmac::HMAC_SHA256, bytes)))
    }

    /// Read `--cluster-secret-file`: refused if group- or world-readable
    /// or -writable, or shorter than [`MIN_SECRET`] bytes once a trailing
    /// newline is cut.
    pub fn from_file(path: &Path) -> Result<Secret, String> {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path)
            .map_err(|e| format!("cannot read cluster secret {}: {e}", path.display()))?;
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(format!(
                "cluster secret {} is open to others (mode {:o}); chmod 600 it",
                path.display(),
                mode & 0o777
            ));
        }
        let mut bytes = std::fs::read(path)
            .map_err(|e| format!("cannot read cluster secret {}: {e}", path.display()))?;
        while matches!(bytes.last(), Some(b'\n' | b'\r')) {
            bytes.pop();
        }
        Secret::new(&bytes).map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// Which end of the TCP connection a side is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Dialer,
    Acceptor,
}

impl Role {
    fn label(self) -> &'static [u8] {
        match self {
            Role::Dialer => b"dialer",
            Role::Acceptor => b"acceptor",
        }
    }
    fn other(self) -> Role {
        match self {
            Role::Dialer => Role::Acceptor,
            Role::Acceptor => Role::Dialer,
        }
    }
}

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("connection failed during the handshake: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad handshake frame: {0}")]
    Frame(#[from] FrameError),
    #[error("the peer sent {0} where the handshake expected another frame")]
    Unexpected(&'static str),
    #[error(
        "the peer speaks link version {0}, this node {VERSION}; run the same vspc on every node"
    )]
    Version(u8),
    #[error("the peer belongs to cluster {theirs:?}, this node to {ours:?}; give both the same --cluster-name")]
    WrongCluster { theirs: String, ours: String },
    #[error("the peer calls itself {0:?}, the name of this node")]
    SameName(String),
    #[error("dialed node {expected:?} but the peer is {got:?}; is its --cluster-advertise right?")]
    WrongPeer { expected: String, got: String },
    #[error("the peer {0:?} could not prove the cluster secret; check --cluster-secret-file on both nodes")]
    WrongSecret(String),
    #[error("the peer {0:?} is not a registered node of this cluster")]
    NotMember(String),
    #[error("the peer refused this node: {0}")]
    RefusedByPeer(String),
    #[error("the peer closed the connection during the handshake")]
    Closed,
}

/// Reads one handshake frame (small frames only) into `buf`.
async fn read_frame<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
) -> Result<Frame, HandshakeError> {
    loop {
        if let Some(f) = Frame::decode(buf, MAX_HANDSHAKE_FRAME)? {
            return Ok(f);
        }
        buf.reserve(512);
        if io.read_buf(buf).await? == 0 {
            return Err(HandshakeError::Closed);
        }
    }
}

async fn send<S: AsyncWrite + Unpin>(io: &mut S, f: &Frame) -> Result<(), HandshakeError> {
    let mut b = BytesMut::new();
    f.encode(&mut b);
    io.write_all(&b).await?;
    io.flush().await?;
    Ok(())
}

/// The message `prover` (in `role`) signs for `verifier`: every field
/// length-prefixed, so no two field lists make the same bytes.
#[allow(clippy::too_many_arguments)]
fn proof_msg(
    role: Role,
    cluster: &str,
    prover: &str,
    verifier: &str,
    prover_nonce: &[u8],
    verifier_nonce: &[u8],
    binding: &[u8],
) -> Vec<u8> {
    let mut m = Vec::with_capacity(160);
    for b in [
        b"vspc-link-proof-1".as_slice(),
        role.label(),
        cluster.as_bytes(),
        prover.as_bytes(),
        verifier.as_bytes(),
        prover_nonce,
        verifier_nonce,
        binding,
    ] {
        m.extend_from_slice(&(b.len() as u32).to_be_bytes());
        m.extend_from_slice(b);
    }
    m
}

/// What one side knows going in.
pub struct Me<'a> {
    pub cluster: &'a str,
    pub node: &'a str,
    pub secret: &'a Secret,
    pub role: Role,
    /// The node a dialer meant to reach.
    pub expected: Option<&'a str>,
    /// TLS exporter bytes, or empty.
    pub binding: &'a [u8],
}

/// Run the handshake on `io`; `buf` keeps bytes read past it (the peer's
/// first frames). Returns the peer's node name.
pub async fn run<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
    me: &Me<'_>,
    dir: &dyn Directory,
) -> Result<String, HandshakeError> {
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::fill(&mut nonce).map_err(|e| std::io::Error::other(e.to_string()))?;
    send(
        io,
        &Frame::Hello {
            version: VERSION,
            cluster: me.cluster.to_string(),
            node: me.node.to_string(),
            nonce,
        },
    )
    .await?;
    let (peer, peer_nonce) = match read_frame(io, buf).await? {
        Frame::Hello {
            version,
            cluster,
            node,
            nonce,
        } => {
            let problem = if version != VERSION {
                Some(HandshakeError::Version(version))
            } else if cluster != me.cluster {
                Some(HandshakeError::WrongCluster {
                    theirs: cluster,
                    ours: me.cluster.to_string(),
                })
            } else if node == me.node {
                Some(HandshakeError::SameName(node.clone()))
            } else if me.expected.is_some_and(|x| x != node) {
                Some(HandshakeError::WrongPeer {
                    expected: me.expected.unwrap_or_default().to_string(),
                    got: node.clone(),
                })
            } else {
                None
            };
            if let Some(p) = problem {
                let _ = send(
                    io,
                    &Frame::Verdict {
                        ok: false,
                        reason: p.to_string(),
                    },
                )
                .await;
                return Err(p);
            }
            (node, nonce)
        }
        Frame::Verdict { reason, .. } => return Err(HandshakeError::RefusedByPeer(reason)),
        _ => return Err(HandshakeError::Unexpected("a non-Hello frame")),
    };
    let mine = proof_msg(
        me.role,
        me.cluster,
        me.node,
        &peer,
        &nonce,
        &peer_nonce,
        me.binding,
    );
    let mut mac = [0u8; NONCE_LEN];
    mac.copy_from_slice(hmac::sign(&me.secret.0, &mine).as_ref());
    send(io, &Frame::Proof { mac }).await?;
    let theirs = match read_frame(io, buf).await? {
        Frame::Proof { mac } => mac,
        Frame::Verdict { reason, .. } => return Err(HandshakeError::RefusedByPeer(reason)),
        _ => return Err(HandshakeError::Unexpected("a non-Proof frame")),
    };
    // What the peer must have signed, checked in constant time.
    let expected = proof_msg(
        me.role.other(),
        me.cluster,
        &peer,
        me.node,
        &peer_nonce,
        &nonce,
        me.binding,
    );
    let verdict = if hmac::verify(&me.secret.0, &expected, &theirs).is_err() {
        Err(HandshakeError::WrongSecret(peer.clone()))
    } else if !dir.is_member(&peer).await {
        Err(HandshakeError::NotMember(peer.clone()))
    } else {
        Ok(())
    };
    let (ok, reason) = match &verdict {
        Ok(()) => (true, String::new()),
        Err(e) => (false, e.to_string()),
    };
    send(io, &Frame::Verdict { ok, reason }).await?;
    verdict?;
    match read_frame(io, buf).await? {
        Frame::Verdict { ok: true, .. } => Ok(peer),
        Frame::Verdict { ok: false, reason } => Err(HandshakeError::RefusedByPeer(reason)),
        _ => Err(HandshakeError::Unexpected("a non-Verdict frame")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_two_proofs_of_one_exchange_differ_and_bind_everything() {
        let tag = |r, c, p, v, pn: [u8; 32], vn: [u8; 32], bnd: &[u8]| {
            proof_msg(r, c, p, v, &pn, &vn, bnd)
        };
        let b = tag(Role::Dialer, "c", "a", "b", [1; 32], [2; 32], b"");
        assert_ne!(b, tag(Role::Acceptor, "c", "a", "b", [1; 32], [2; 32], b""));
        assert_ne!(b, tag(Role::Dialer, "d", "a", "b", [1; 32], [2; 32], b""));
        assert_ne!(b, tag(Role::Dialer, "c", "b", "a", [1; 32], [2; 32], b""));
        assert_ne!(b, tag(Role::Dialer, "c", "a", "b", [2; 32], [1; 32], b""));
        assert_ne!(b, tag(Role::Dialer, "c", "a", "b", [1; 32], [3; 32], b""));
        assert_ne!(b, tag(Role::Dialer, "c", "a", "b", [1; 32], [2; 32], b"x"));
        // Length prefixes: moving a byte between names changes the message.
        assert_ne!(
            tag(Role::Dialer, "c", "ab", "c", [1; 32], [2; 32], b""),
            tag(Role::Dialer, "c", "a", "bc", [1; 32], [2; 32], b"")
        );
    }

    #[test]
    fn secrets_are_long_enough_and_private() {
        assert!(Secret::new(b"short").is_err());
        let dir = std::env::temp_dir().join(format!("vspc-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("secret");
        std::fs::write(&p, b"0123456789abcdef-long-enough\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Secret::from_file(&p).unwrap_err();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(Secret::from_file(&p).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
