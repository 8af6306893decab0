//! The node-to-node link: console bytes and hand-offs between the nodes of
//! a cluster, never through Redis.
//!
//! One TCP connection (TLS when the daemon has a certificate) per pair of
//! nodes carries many streams. A connection starts with the mutual
//! handshake of [`handshake`]; then frames ([`frame`]) flow both ways:
//!
//! - **Streams** (a console on one node, its VM on another): `Open` ->
//!   `Accept`/`Refuse`, `Data` both ways, `Shutdown` (half-close), `Close`.
//!   The dialer numbers its streams odd, the acceptor even.
//! - **Credit**: each side grants the other a window per stream and more
//!   as its consumer takes bytes ([`StreamReader::recv`]); a sender with
//!   no credit waits ([`StreamWriter::send`]). A slow console far away thus
//!   pushes back on its VM as a local one does, and a stream buffers at
//!   most its window. A peer sending past its credit is cut off.
//! - **Hand-off** (vMotion across nodes) and **console-log fetch**:
//!   request/answer pairs.
//! - **Ping/Pong**: a connection with no frame for `dead_after` is dropped
//!   and its streams are told.
//!
//! Frames from a peer that break the rules (oversize, unknown type,
//! malformed, data past credit, a handshake frame later on) end the
//! connection with a log line naming the peer's address; a frame for a
//! stream that is not open is dropped and logged. Nothing a peer sends can
//! panic the node or grow its memory past the windows and a bounded
//! control queue.
//!
//! The daemon opens streams with [`Link::open`] and serves the peers'
//! requests from the receiver [`Link::new`] returns ([`Incoming`]).

pub mod frame;
pub mod handshake;

use bytes::{Bytes, BytesMut};
pub use frame::Protocol;
use frame::{Frame, FrameError, MAX_DATA, MAX_FRAME, MAX_LOG};
pub use handshake::Secret;
use handshake::{HandshakeError, Me, Role};
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch, Notify, Semaphore};
use tokio::task::JoinHandle;

/// A boxed future, for the [`Directory`] trait.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Who the nodes of the cluster are: the registry, or a fixed table.
pub trait Directory: Send + Sync + 'static {
    /// Whether `node` is a registered, live node of this cluster.
    fn is_member<'a>(&'a self, node: &'a str) -> BoxFuture<'a, bool>;
    /// The address (`HOST:PORT`) to dial `node` at.
    fn address<'a>(&'a self, node: &'a str) -> BoxFuture<'a, Option<String>>;
}

impl Directory for crate::registry::Registry {
    fn is_member<'a>(&'a self, node: &'a str) -> BoxFuture<'a, bool> {
        Box::pin(crate::registry::Registry::is_member(self, node))
    }
    fn address<'a>(&'a self, node: &'a str) -> BoxFuture<'a, Option<String>> {
        Box::pin(async move { self.node_addr(node).await.ok().flatten() })
    }
}

/// A fixed node table (name -> address): tests, and clusters without
/// discovery.
#[derive(Debug, Clone, Default)]
pub struct StaticDirectory(pub HashMap<String, String>);

impl Directory for StaticDirectory {
    fn is_member<'a>(&'a self, node: &'a str) -> BoxFuture<'a, bool> {
        Box::pin(async move { self.0.contains_key(node) })
    }
    fn address<'a>(&'a self, node: &'a str) -> BoxFuture<'a, Option<String>> {
        Box::pin(async move { self.0.get(node).cloned() })
    }
}

/// TLS for the link, from the daemon's certificate and key. The peer's
/// certificate is not checked against a CA (nodes often have self-signed
/// ones): the handshake's proof, bound to the TLS session, authenticates
/// both sides. TLS 1.3 only.
#[derive(Clone)]
pub struct LinkTls {
    acceptor: tokio_rustls::TlsAcceptor,
    connector: tokio_rustls::TlsConnector,
}

impl LinkTls {
    /// From PEM files (`--cert`, `--key`; the key may be in the
    /// certificate file).
    pub fn from_pem(cert: &Path, key: Option<&Path>) -> Result<LinkTls, String> {
        let (certs, key) = vspc_tls::load_pem(cert, key)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| format!("TLS setup failed: {e}"))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| {
                format!(
                    "TLS certificate {} and key do not work together: {e}",
                    cert.display()
                )
            })?;
        let client = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| format!("TLS setup failed: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(vspc_tls::AnyServerCert(provider)))
            .with_no_client_auth();
        Ok(LinkTls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
            connector: tokio_rustls::TlsConnector::from(Arc::new(client)),
        })
    }
}

/// The link's settings.
#[derive(Clone)]
pub struct LinkConfig {
    /// `--cluster-name`: a peer of another cluster is refused.
    pub cluster: String,
    /// `--node-name`.
    pub node: String,
    /// `--cluster-secret-file`.
    pub secret: Secret,
    /// TLS with the daemon's `--cert`/`--key`, or plain TCP.
    pub tls: Option<LinkTls>,
    /// Deadline for the whole handshake (a half-sent one is dropped).
    pub handshake_timeout: Duration,
    /// Deadline for dialing a peer.
    pub connect_timeout: Duration,
    /// How long an open, hand-off or log request waits for its answer.
    pub request_timeout: Duration,
    /// How often a connection is pinged.
    pub ping_interval: Duration,
    /// A connection with no frame from the peer for this long is dead.
    pub dead_after: Duration,
    /// Bytes a stream's sender may have unread at the receiver.
    pub window: u32,
    /// Most streams one connection carries.
    pub max_streams: usize,
    /// Most connections being handshaken at once.
    pub max_pending: usize,
}

impl LinkConfig {
    /// Defaults: 5 s handshake and dial, 10 s requests, ping every 5 s,
    /// dead after 15 s, 256 KiB windows, 4096 streams per connection.
    pub fn new(cluster: &str, node: &str, secret: Secret) -> LinkConfig {
        LinkConfig {
            cluster: cluster.to_string(),
            node: node.to_string(),
            secret,
            tls: None,
            handshake_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(5),
            dead_after: Duration::from_secs(15),
            window: 256 * 1024,
            max_streams: 4096,
            max_pending: 64,
        }
    }
}

/// What went wrong on the link.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LinkError {
    #[error("node {0:?} has no address (not a live node of the cluster)")]
    NoRoute(String),
    #[error("cannot reach node {node:?} at {addr}: {detail}")]
    Connect {
        node: String,
        addr: String,
        detail: String,
    },
    #[error("link handshake with node {node:?} at {addr} failed: {detail}")]
    Handshake {
        node: String,
        addr: String,
        detail: String,
    },
    #[error("node {node:?} refused: {reason}")]
    Refused { node: String, reason: String },
    #[error("the link to node {node:?} closed: {reason}")]
    Closed { node: String, reason: String },
    #[error("node {0:?} did not answer in time")]
    Timeout(String),
    #[error("{0} bytes is more than the link carries in one request ({MAX_LOG})")]
    TooLarge(usize),
}

/// A console's request to attach to a VM another node holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenRequest {
    pub uuid: String,
    /// Lock mode as the admin port spells it.
    pub mode: String,
    pub protocol: Protocol,
    /// The console client's address, for the owner's audit line.
    pub client: String,
}

/// Counters for `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Connections open now.
    pub connections: usize,
    /// Stream payload bytes sent and received.
    pub bytes_out: u64,
    pub bytes_in: u64,
    pub handshakes_ok: u64,
    /// Handshakes that failed (wrong secret, not a member, deadline...).
    pub handshakes_failed: u64,
    /// Connections ended by a peer breaking the protocol.
    pub violations: u64,
}

#[derive(Default)]
struct Counters {
    bytes_out: AtomicU64,
    bytes_in: AtomicU64,
    handshakes_ok: AtomicU64,
    handshakes_failed: AtomicU64,
    violations: AtomicU64,
}

/// What a node that let go of a VM in a hand-off tells the new holder:
/// where the VM's output stood when it let go, so that consoles following
/// the VM resume at the byte they had reached.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Handed {
    /// The count's identity (see the daemon's output positions).
    pub origin: u64,
    /// Output bytes counted since `origin`, up to the hand-off.
    pub said: u64,
    /// Console input it held since GOAHEAD (escaped, as it goes to the
    /// VM), for the VM's new connection before any other.
    pub input: Bytes,
    /// The last of the output (with `input`, at most [`MAX_LOG`] bytes).
    pub recent: Bytes,
}

/// A request from a peer, for the daemon to answer.
pub enum Incoming {
    Open(IncomingOpen),
    Handoff(IncomingHandoff),
    Log(IncomingLog),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Most control frames (credit, pong, answers) queued for one connection:
/// past it the peer is not reading and is cut off.
const MAX_CONTROL_QUEUE: usize = 65536;

/// One node's end of the link: its listener and its connections.
#[derive(Clone)]
pub struct Link(Arc<Inner>);

struct Inner {
    cfg: LinkConfig,
    /// Who may connect, and where peers are dialed.
    dir: Arc<dyn Directory>,
    /// Live connections per peer (normally one; two while a simultaneous
    /// dial settles). The newest is used for new streams.
    conns: Mutex<HashMap<String, Vec<Arc<Conn>>>>,
    /// One dial at a time per peer.
    dialing: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The peers' requests, for the daemon (bounded: past it, refused).
    incoming: mpsc::Sender<Incoming>,
    counters: Counters,
    /// Handshakes in progress (bounded: unauthenticated peers cost little).
    pending: Arc<Semaphore>,
}

impl Link {
    /// A link for this node; the receiver gets the peers' requests (serve
    /// it, or they are refused as busy once 1024 wait).
    pub fn new(cfg: LinkConfig, dir: Arc<dyn Directory>) -> (Link, mpsc::Receiver<Incoming>) {
        let (tx, rx) = mpsc::channel(1024);
        let pending = Arc::new(Semaphore::new(cfg.max_pending));
        (
            Link(Arc::new(Inner {
                cfg,
                dir,
                conns: Mutex::new(HashMap::new()),
                dialing: Mutex::new(HashMap::new()),
                incoming: tx,
                counters: Counters::default(),
                pending,
            })),
            rx,
        )
    }

    /// Listen on `addr` (`--cluster-iface`:`--cluster-port`) and serve the
    /// peers that connect. Returns the bound address and the accept task.
    pub async fn listen(&self, addr: SocketAddr) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
        let l = TcpListener::bind(addr).await?;
        let bound = l.local_addr()?;
        let me = self.clone();
        let task = tokio::spawn(async move { me.accept_loop(l).await });
        Ok((bound, task))
    }

    async fn accept_loop(self, l: TcpListener) {
        loop {
            let (sock, addr) = match l.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "cluster link: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = self.0.pending.clone().try_acquire_owned() else {
                tracing::warn!(peer = %addr, "cluster link: too many handshakes at once; connection closed");
                continue;
            };
            let me = self.clone();
            tokio::spawn(async move {
                let r = me.accepted(sock, addr).await;
                drop(permit);
                if let Err(e) = r {
                    me.0.counters
                        .handshakes_failed
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(peer = %addr, error = %e, "cluster link: peer refused");
                }
            });
        }
    }

    async fn accepted(&self, sock: TcpStream, addr: SocketAddr) -> Result<(), HandshakeError> {
        let _ = sock.set_nodelay(true);
        let cfg = &self.0.cfg;
        let deadline = cfg.handshake_timeout;
        let fut = async {
            let mut buf = BytesMut::new();
            let (mut io, binding): (Box<dyn Io>, Vec<u8>) = match &cfg.tls {
                Some(t) => {
                    let s = t.acceptor.accept(sock).await?;
                    let b = export(
                        s.get_ref()
                            .1
                            .export_keying_material([0u8; 32], EXPORTER, None),
                    );
                    (Box::new(s), b)
                }
                None => (Box::new(sock), Vec::new()),
            };
            let me = Me {
                cluster: &cfg.cluster,
                node: &cfg.node,
                secret: &cfg.secret,
                role: Role::Acceptor,
                expected: None,
                binding: &binding,
            };
            let peer = handshake::run(&mut io, &mut buf, &me, self.0.dir.as_ref()).await?;
            Ok::<_, HandshakeError>((io, buf, peer))
        };
        let (io, buf, peer) = match tokio::time::timeout(deadline, fut).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(HandshakeError::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("handshake not done within {deadline:?}"),
                )))
            }
        };
        self.0
            .counters
            .handshakes_ok
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!(peer = %addr, node = %peer, "cluster link: peer connected");
        self.start(io, buf, peer, addr, false);
        Ok(())
    }

    /// The newest live connection to `node`, dialing one if there is none.
    async fn conn(&self, node: &str) -> Result<Arc<Conn>, LinkError> {
        if let Some(c) = self.live(node) {
            return Ok(c);
        }
        let gate = lock(&self.0.dialing)
            .entry(node.to_string())
            .or_default()
            .clone();
        let _g = gate.lock().await;
        if let Some(c) = self.live(node) {
            return Ok(c);
        }
        let addr = self
            .0
            .dir
            .address(node)
            .await
            .ok_or_else(|| LinkError::NoRoute(node.to_string()))?;
        let cfg = &self.0.cfg;
        let connect_err = |detail: String| LinkError::Connect {
            node: node.to_string(),
            addr: addr.clone(),
            detail,
        };
        let sock = match tokio::time::timeout(cfg.connect_timeout, TcpStream::connect(&addr)).await
        {
            Err(_) => {
                return Err(connect_err(format!(
                    "no answer within {:?}",
                    cfg.connect_timeout
                )))
            }
            Ok(Err(e)) => return Err(connect_err(e.to_string())),
            Ok(Ok(s)) => s,
        };
        let _ = sock.set_nodelay(true);
        let peer_addr = sock.peer_addr().map_err(|e| connect_err(e.to_string()))?;
        let hs_err = |detail: String| LinkError::Handshake {
            node: node.to_string(),
            addr: addr.clone(),
            detail,
        };
        let fut = async {
            let mut buf = BytesMut::new();
            let (mut io, binding): (Box<dyn Io>, Vec<u8>) = match &cfg.tls {
                Some(t) => {
                    let name = rustls::pki_types::ServerName::try_from("vspc-link")
                        .map_err(|e| HandshakeError::Io(std::io::Error::other(e.to_string())))?;
                    let s = t.connector.connect(name, sock).await?;
                    let b = export(
                        s.get_ref()
                            .1
                            .export_keying_material([0u8; 32], EXPORTER, None),
                    );
                    (Box::new(s), b)
                }
                None => (Box::new(sock), Vec::new()),
            };
            let me = Me {
                cluster: &cfg.cluster,
                node: &cfg.node,
                secret: &cfg.secret,
                role: Role::Dialer,
                expected: Some(node),
                binding: &binding,
            };
            let peer = handshake::run(&mut io, &mut buf, &me, self.0.dir.as_ref()).await?;
            Ok::<_, HandshakeError>((io, buf, peer))
        };
        let (io, buf, peer) = match tokio::time::timeout(cfg.handshake_timeout, fut).await {
            Err(_) => {
                self.0
                    .counters
                    .handshakes_failed
                    .fetch_add(1, Ordering::Relaxed);
                return Err(hs_err(format!(
                    "not done within {:?}",
                    cfg.handshake_timeout
                )));
            }
            Ok(Err(e)) => {
                self.0
                    .counters
                    .handshakes_failed
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(peer = %peer_addr, node, error = %e, "cluster link: handshake failed");
                return Err(hs_err(e.to_string()));
            }
            Ok(Ok(x)) => x,
        };
        self.0
            .counters
            .handshakes_ok
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!(peer = %peer_addr, node = %peer, "cluster link: connected to peer");
        Ok(self.start(io, buf, peer, peer_addr, true))
    }

    fn live(&self, node: &str) -> Option<Arc<Conn>> {
        let mut conns = lock(&self.0.conns);
        let v = conns.get_mut(node)?;
        v.retain(|c| !c.is_closed());
        v.last().cloned()
    }

    /// Start the tasks of an authenticated connection.
    fn start(
        &self,
        io: Box<dyn Io>,
        buf: BytesMut,
        peer: String,
        addr: SocketAddr,
        dialer: bool,
    ) -> Arc<Conn> {
        let (rd, wr) = tokio::io::split(io);
        let (data_tx, data_rx) = mpsc::channel(64);
        let (ctrl_tx, ctrl_rx) = mpsc::unbounded_channel();
        let (stop_tx, stop_rx) = watch::channel(false);
        let conn = Arc::new(Conn {
            link: Arc::downgrade(&self.0),
            peer: peer.clone(),
            addr,
            dialer,
            data: data_tx,
            ctrl: ctrl_tx,
            ctrl_len: AtomicUsize::new(0),
            state: Mutex::new(ConnState::default()),
            next_id: AtomicU32::new(if dialer { 1 } else { 2 }),
            opening: Mutex::new(()),
            next_req: AtomicU32::new(1),
            stop: stop_tx,
            closed: AtomicBool::new(false),
            last_rx: Mutex::new(Instant::now()),
        });
        lock(&self.0.conns)
            .entry(peer)
            .or_default()
            .push(conn.clone());
        tokio::spawn(writer(conn.clone(), wr, data_rx, ctrl_rx, stop_rx.clone()));
        tokio::spawn(reader(conn.clone(), rd, buf, stop_rx.clone()));
        tokio::spawn(keepalive(
            conn.clone(),
            self.0.cfg.ping_interval,
            self.0.cfg.dead_after,
            stop_rx,
        ));
        conn
    }

    /// Open a console on `node`'s VM. The stream is ready to carry bytes
    /// when this returns; a refusal carries the owner's reason.
    pub async fn open(&self, node: &str, req: OpenRequest) -> Result<Stream, LinkError> {
        let conn = self.conn(node).await?;
        let window = self.0.cfg.window;
        // The peer takes stream ids in increasing order only: the id is
        // drawn and its Open queued under one lock, or two opens at once
        // could go out the other way round (and the peer would close the
        // connection, with every stream on it).
        let (id, credit, rx, orx) = {
            let _opening = lock(&conn.opening);
            let id = conn.next_id.fetch_add(2, Ordering::Relaxed);
            let (tx, rx) = mpsc::unbounded_channel();
            let credit = Arc::new(SendCredit::default());
            let (otx, orx) = oneshot::channel();
            {
                let mut st = lock(&conn.state);
                if let Some(r) = &st.closed {
                    return Err(LinkError::Closed {
                        node: node.to_string(),
                        reason: r.clone(),
                    });
                }
                st.streams.insert(
                    id,
                    Slot {
                        tx,
                        allowance: u64::from(window),
                        credit: credit.clone(),
                    },
                );
                st.opens.insert(id, otx);
            }
            conn.control(Frame::Open {
                stream: id,
                uuid: req.uuid,
                mode: req.mode,
                protocol: req.protocol,
                client: req.client,
                window,
            });
            (id, credit, rx, orx)
        };
        let answer = match tokio::time::timeout(self.0.cfg.request_timeout, orx).await {
            Ok(Ok(a)) => a,
            Ok(Err(_)) => Err(conn.close_reason()),
            Err(_) => {
                conn.forget_stream(id, "no answer to the open in time");
                return Err(LinkError::Timeout(node.to_string()));
            }
        };
        match answer {
            Ok(granted) => Ok(Stream::new(conn, id, credit, rx, window, granted)),
            Err(reason) => {
                lock(&conn.state).streams.remove(&id);
                Err(LinkError::Refused {
                    node: node.to_string(),
                    reason,
                })
            }
        }
    }

    /// vMotion hand-off: tell `node` that the VM `uuid` lives here now at
    /// `epoch`, with the console input held since GOAHEAD. The answer says
    /// where the VM's output stood on `node` when it let go.
    pub async fn handoff(
        &self,
        node: &str,
        uuid: &str,
        epoch: u64,
        input: Bytes,
    ) -> Result<Handed, LinkError> {
        if input.len() > MAX_LOG {
            return Err(LinkError::TooLarge(input.len()));
        }
        let conn = self.conn(node).await?;
        let id = conn.next_req.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&conn.state).handoffs.insert(id, tx);
        conn.control(Frame::Handoff {
            id,
            uuid: uuid.to_string(),
            epoch,
            input,
        });
        match tokio::time::timeout(self.0.cfg.request_timeout, rx).await {
            Ok(Ok(Ok(handed))) => Ok(handed),
            Ok(Ok(Err(reason))) => Err(LinkError::Refused {
                node: node.to_string(),
                reason,
            }),
            Ok(Err(_)) => Err(LinkError::Closed {
                node: node.to_string(),
                reason: conn.close_reason(),
            }),
            Err(_) => {
                lock(&conn.state).handoffs.remove(&id);
                Err(LinkError::Timeout(node.to_string()))
            }
        }
    }

    /// The last `max` bytes (at most [`MAX_LOG`]) of the console output
    /// `node` keeps for `uuid`; `None` if it has none.
    pub async fn console_log(
        &self,
        node: &str,
        uuid: &str,
        max: usize,
    ) -> Result<Option<Bytes>, LinkError> {
        let conn = self.conn(node).await?;
        let id = conn.next_req.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&conn.state).logs.insert(id, (tx, max.min(MAX_LOG)));
        conn.control(Frame::LogRequest {
            id,
            uuid: uuid.to_string(),
            max: max.min(MAX_LOG) as u32,
        });
        match tokio::time::timeout(self.0.cfg.request_timeout, rx).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(_)) => Err(LinkError::Closed {
                node: node.to_string(),
                reason: conn.close_reason(),
            }),
            Err(_) => {
                lock(&conn.state).logs.remove(&id);
                Err(LinkError::Timeout(node.to_string()))
            }
        }
    }

    /// The peers with a live connection now.
    pub fn peers(&self) -> Vec<String> {
        let conns = lock(&self.0.conns);
        let mut v: Vec<String> = conns
            .iter()
            .filter(|(_, cs)| cs.iter().any(|c| !c.is_closed()))
            .map(|(n, _)| n.clone())
            .collect();
        v.sort();
        v
    }

    /// Drop the connections to `node` (it left the cluster, or a test cuts
    /// the link); its streams are told.
    pub fn disconnect(&self, node: &str, reason: &str) {
        let cs = lock(&self.0.conns).remove(node).unwrap_or_default();
        for c in cs {
            c.shut(reason);
        }
    }

    /// Counters for `/metrics`.
    pub fn stats(&self) -> LinkStats {
        let c = &self.0.counters;
        let connections = lock(&self.0.conns)
            .values()
            .map(|v| v.iter().filter(|c| !c.is_closed()).count())
            .sum();
        LinkStats {
            connections,
            bytes_out: c.bytes_out.load(Ordering::Relaxed),
            bytes_in: c.bytes_in.load(Ordering::Relaxed),
            handshakes_ok: c.handshakes_ok.load(Ordering::Relaxed),
            handshakes_failed: c.handshakes_failed.load(Ordering::Relaxed),
            violations: c.violations.load(Ordering::Relaxed),
        }
    }
}

const EXPORTER: &[u8] = b"EXPORTER-vspc-cluster-link";

fn export<E>(r: Result<[u8; 32], E>) -> Vec<u8> {
    // A TLS 1.3 session always exports; if it ever did not, the proofs
    // would fail (the two sides would disagree), never pass wrongly.
    r.map(|b| b.to_vec()).unwrap_or_default()
}

/// Anything a connection runs over (TCP, or TLS on TCP).
trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// What a stream's reader is handed.
enum StreamEvent {
    Data(Bytes),
    Eof,
    Closed(String),
}

/// The sender's credit on one stream.
#[derive(Default)]
struct SendCredit {
    /// Bytes the peer has room for.
    avail: Mutex<u64>,
    /// Wakes the (single) writer waiting for credit.
    notify: Notify,
    /// The stream is over: the writer stops waiting.
    closed: AtomicBool,
}

impl SendCredit {
    fn add(&self, n: u64) {
        let mut a = lock(&self.avail);
        *a = a.saturating_add(n).min(u64::from(u32::MAX) * 4);
        drop(a);
        self.notify.notify_one();
    }
    fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        self.notify.notify_one();
    }
    /// Up to `max` bytes of credit, waiting for some; `None` once closed.
    async fn take(&self, max: usize) -> Option<usize> {
        loop {
            if self.closed.load(Ordering::Relaxed) {
                return None;
            }
            {
                let mut a = lock(&self.avail);
                if *a > 0 {
                    let n = (*a).min(max as u64);
                    *a -= n;
                    return Some(n as usize);
                }
            }
            self.notify.notified().await;
        }
    }
}

/// A stream as the reader task keeps it.
struct Slot {
    tx: mpsc::UnboundedSender<StreamEvent>,
    /// Bytes the peer may still send (granted, not yet received).
    allowance: u64,
    credit: Arc<SendCredit>,
}

type LogWaiter = (oneshot::Sender<Option<Bytes>>, usize);

#[derive(Default)]
struct ConnState {
    /// Open streams (and ones being opened or accepted).
    streams: HashMap<u32, Slot>,
    /// Opens waiting for Accept or Refuse.
    opens: HashMap<u32, oneshot::Sender<Result<String, String>>>,
    /// Hand-offs waiting for their answer.
    handoffs: HashMap<u32, oneshot::Sender<Result<Handed, String>>>,
    /// Log fetches waiting, with the most bytes asked for.
    logs: HashMap<u32, LogWaiter>,
    /// Highest stream id the peer opened: ids only grow.
    peer_max_id: u32,
    /// Frames for unknown streams logged so far (warn once, then debug).
    unknown_logged: bool,
    /// Why the connection ended, once it has.
    closed: Option<String>,
}

/// One authenticated connection to a peer.
struct Conn {
    /// Weak: a connection does not keep its link alive.
    link: Weak<Inner>,
    /// The peer's node name, as its proof established.
    peer: String,
    /// The peer's socket address, for log lines.
    addr: SocketAddr,
    /// This side dialed: it numbers its streams odd.
    dialer: bool,
    /// Data frames (bounded: senders wait).
    data: mpsc::Sender<Frame>,
    /// Control frames (credit, answers, pongs): never waited on, so the
    /// reader never blocks on the writer; bounded by [`MAX_CONTROL_QUEUE`].
    ctrl: mpsc::UnboundedSender<Frame>,
    /// Control frames queued and not yet written.
    ctrl_len: AtomicUsize,
    state: Mutex<ConnState>,
    /// The next stream id this side opens (steps of 2).
    next_id: AtomicU32,
    /// Held while a stream id is drawn and its Open queued.
    opening: Mutex<()>,
    /// The next hand-off or log request id.
    next_req: AtomicU32,
    /// Tells the writer, reader and keepalive tasks to stop.
    stop: watch::Sender<bool>,
    closed: AtomicBool,
    /// When the peer last sent a frame (the keepalive's dead-peer check).
    last_rx: Mutex<Instant>,
}

impl Conn {
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    fn close_reason(&self) -> String {
        lock(&self.state)
            .closed
            .clone()
            .unwrap_or_else(|| "connection closed".into())
    }

    fn counters(&self) -> Option<Arc<Inner>> {
        self.link.upgrade()
    }

    fn control(&self, f: Frame) {
        if self.ctrl_len.fetch_add(1, Ordering::Relaxed) >= MAX_CONTROL_QUEUE {
            self.ctrl_len.fetch_sub(1, Ordering::Relaxed);
            self.violation("the peer does not read: its control queue is full");
            return;
        }
        if self.ctrl.send(f).is_err() {
            self.ctrl_len.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn violation(&self, what: &str) {
        if let Some(l) = self.counters() {
            l.counters.violations.fetch_add(1, Ordering::Relaxed);
        }
        tracing::warn!(peer = %self.addr, node = %self.peer, "cluster link: {what}; closing the connection");
        self.shut(what);
    }

    /// End the connection: every stream and request is told.
    fn shut(&self, reason: &str) {
        if self.closed.swap(true, Ordering::Relaxed) {
            return;
        }
        let _ = self.stop.send(true);
        let mut st = lock(&self.state);
        st.closed = Some(reason.to_string());
        for (_, s) in st.streams.drain() {
            s.credit.close();
            let _ = s.tx.send(StreamEvent::Closed(format!(
                "link to {} lost: {reason}",
                self.peer
            )));
        }
        for (_, o) in st.opens.drain() {
            let _ = o.send(Err(format!("link lost: {reason}")));
        }
        for (_, h) in st.handoffs.drain() {
            let _ = h.send(Err(format!("link lost: {reason}")));
        }
        st.logs.clear();
        drop(st);
        if let Some(l) = self.link.upgrade() {
            let mut conns = lock(&l.conns);
            if let Some(v) = conns.get_mut(&self.peer) {
                v.retain(|c| !c.is_closed());
                if v.is_empty() {
                    conns.remove(&self.peer);
                }
            }
        }
        tracing::info!(peer = %self.addr, node = %self.peer, reason, "cluster link: connection closed");
    }

    /// Remove a stream here and tell the peer.
    fn forget_stream(&self, id: u32, reason: &str) {
        let had = {
            let mut st = lock(&self.state);
            st.opens.remove(&id);
            st.streams.remove(&id).is_some()
        };
        if had && !self.is_closed() {
            // Behind the stream's data when there is room (what was sent
            // before the close arrives first); else ahead of it.
            let f = Frame::Close {
                stream: id,
                reason: reason.to_string(),
            };
            if let Err(mpsc::error::TrySendError::Full(f)) = self.data.try_send(f) {
                self.control(f);
            }
        }
    }

    /// Whether `id` is one the peer numbers (the dialer odd, the acceptor
    /// even).
    fn peers_id(&self, id: u32) -> bool {
        (id % 2 == 1) != self.dialer
    }

    /// Handle one frame from the peer.
    fn dispatch(self: &Arc<Self>, f: Frame) {
        match f {
            Frame::Data { stream, data } => {
                let n = data.len() as u64;
                let mut st = lock(&self.state);
                let Some(slot) = st.streams.get_mut(&stream) else {
                    drop(st);
                    self.unknown_stream(stream, "data");
                    return;
                };
                if n > slot.allowance {
                    drop(st);
                    self.violation("data past the credit granted");
                    return;
                }
                slot.allowance -= n;
                let _ = slot.tx.send(StreamEvent::Data(data));
                drop(st);
                if let Some(l) = self.counters() {
                    l.counters.bytes_in.fetch_add(n, Ordering::Relaxed);
                }
            }
            Frame::Credit { stream, bytes } => {
                let st = lock(&self.state);
                match st.streams.get(&stream) {
                    Some(s) => s.credit.add(u64::from(bytes)),
                    None => {
                        drop(st);
                        self.unknown_stream(stream, "credit");
                    }
                }
            }
            Frame::Shutdown { stream } => {
                let st = lock(&self.state);
                match st.streams.get(&stream) {
                    Some(s) => {
                        let _ = s.tx.send(StreamEvent::Eof);
                    }
                    None => {
                        drop(st);
                        self.unknown_stream(stream, "shutdown");
                    }
                }
            }
            Frame::Close { stream, reason } => {
                let mut st = lock(&self.state);
                if let Some(o) = st.opens.remove(&stream) {
                    let _ = o.send(Err(reason.clone()));
                }
                if let Some(s) = st.streams.remove(&stream) {
                    s.credit.close();
                    let _ = s.tx.send(StreamEvent::Closed(reason));
                }
            }
            Frame::Open {
                stream,
                uuid,
                mode,
                protocol,
                client,
                window,
            } => self.incoming_open(
                stream,
                window,
                OpenRequest {
                    uuid,
                    mode,
                    protocol,
                    client,
                },
            ),
            Frame::Accept {
                stream,
                window,
                granted,
            } => {
                let mut st = lock(&self.state);
                let Some(o) = st.opens.remove(&stream) else {
                    drop(st);
                    self.unknown_stream(stream, "accept");
                    return;
                };
                if let Some(s) = st.streams.get(&stream) {
                    s.credit.add(u64::from(window));
                }
                let _ = o.send(Ok(granted));
            }
            Frame::Refuse { stream, reason } => {
                let mut st = lock(&self.state);
                st.streams.remove(&stream);
                match st.opens.remove(&stream) {
                    Some(o) => {
                        let _ = o.send(Err(reason));
                    }
                    None => {
                        drop(st);
                        self.unknown_stream(stream, "refuse");
                    }
                }
            }
            Frame::Handoff {
                id,
                uuid,
                epoch,
                input,
            } => {
                let req = IncomingHandoff {
                    from: self.peer.clone(),
                    uuid,
                    epoch,
                    input,
                    conn: self.clone(),
                    id,
                    answered: false,
                };
                self.deliver(Incoming::Handoff(req));
            }
            Frame::HandoffDone {
                id,
                ok,
                reason,
                origin,
                said,
                input,
                recent,
            } => {
                if recent.len() + input.len() > MAX_LOG {
                    self.violation("a hand-off answer larger than the link carries");
                    return;
                }
                if let Some(h) = lock(&self.state).handoffs.remove(&id) {
                    let _ = h.send(if ok {
                        Ok(Handed {
                            origin,
                            said,
                            input,
                            recent,
                        })
                    } else {
                        Err(reason)
                    });
                }
            }
            Frame::LogRequest { id, uuid, max } => {
                let req = IncomingLog {
                    from: self.peer.clone(),
                    uuid,
                    max: (max as usize).min(MAX_LOG),
                    conn: self.clone(),
                    id,
                    answered: false,
                };
                self.deliver(Incoming::Log(req));
            }
            Frame::LogResponse { id, found, data } => {
                if let Some((tx, max)) = lock(&self.state).logs.remove(&id) {
                    if data.len() > max {
                        self.violation("a console log larger than asked for");
                        return;
                    }
                    let _ = tx.send(found.then_some(data));
                }
            }
            Frame::Ping { n } => self.control(Frame::Pong { n }),
            Frame::Pong { .. } => {}
            Frame::Hello { .. } | Frame::Proof { .. } | Frame::Verdict { .. } => {
                self.violation("a handshake frame after the handshake")
            }
        }
    }

    fn unknown_stream(&self, id: u32, what: &str) {
        let mut st = lock(&self.state);
        let never = if self.peers_id(id) {
            id > st.peer_max_id
        } else {
            id >= self.next_id.load(Ordering::Relaxed)
        };
        let first = !st.unknown_logged;
        st.unknown_logged = true;
        drop(st);
        if never || first {
            tracing::warn!(peer = %self.addr, node = %self.peer, stream = id,
                "cluster link: {what} for a stream that is not open; dropped");
        } else {
            tracing::debug!(peer = %self.addr, stream = id, "cluster link: late {what} for a closed stream");
        }
    }

    fn incoming_open(self: &Arc<Self>, id: u32, window: u32, request: OpenRequest) {
        let max_streams = self.counters().map_or(0, |l| l.cfg.max_streams);
        let refuse = |reason: &str| {
            self.control(Frame::Refuse {
                stream: id,
                reason: reason.to_string(),
            })
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let credit = Arc::new(SendCredit::default());
        {
            let mut st = lock(&self.state);
            if !self.peers_id(id) || id <= st.peer_max_id {
                drop(st);
                self.violation("a stream id out of order or of the wrong parity");
                return;
            }
            st.peer_max_id = id;
            if st.streams.len() >= max_streams {
                drop(st);
                refuse("too many consoles over this link");
                return;
            }
            // Nothing may come before Accept: allowance 0 until then.
            st.streams.insert(
                id,
                Slot {
                    tx,
                    allowance: 0,
                    credit: credit.clone(),
                },
            );
        }
        credit.add(u64::from(window));
        let req = IncomingOpen {
            from: self.peer.clone(),
            client_of: self.addr,
            request,
            conn: self.clone(),
            id,
            parts: Some((credit, rx)),
        };
        self.deliver(Incoming::Open(req));
    }

    fn deliver(&self, req: Incoming) {
        let Some(l) = self.link.upgrade() else { return };
        if let Err(e) = l.incoming.try_send(req) {
            // Dropping the request answers it with a refusal.
            let why = match e {
                mpsc::error::TrySendError::Full(_) => "busy",
                mpsc::error::TrySendError::Closed(_) => "not serving",
            };
            tracing::warn!(node = %self.peer, "cluster link: a peer's request refused: this node is {why}");
        }
    }
}

async fn writer(
    conn: Arc<Conn>,
    mut wr: tokio::io::WriteHalf<Box<dyn Io>>,
    mut data: mpsc::Receiver<Frame>,
    mut ctrl: mpsc::UnboundedReceiver<Frame>,
    mut stop: watch::Receiver<bool>,
) {
    let mut buf = BytesMut::with_capacity(256 * 1024);
    loop {
        let first = tokio::select! {
            biased;
            _ = stop.changed() => break,
            Some(f) = ctrl.recv() => { conn.ctrl_len.fetch_sub(1, Ordering::Relaxed); f }
            Some(f) = data.recv() => f,
            else => break,
        };
        buf.clear();
        first.encode(&mut buf);
        // Batch what is queued already into one write.
        while buf.len() < 256 * 1024 {
            if let Ok(f) = ctrl.try_recv() {
                conn.ctrl_len.fetch_sub(1, Ordering::Relaxed);
                f.encode(&mut buf);
            } else if let Ok(f) = data.try_recv() {
                f.encode(&mut buf);
            } else {
                break;
            }
        }
        let write = wr.write_all(&buf);
        let r = tokio::select! {
            _ = stop.changed() => break,
            r = write => r,
        };
        if let Err(e) = r {
            conn.shut(&format!("write failed: {e}"));
            break;
        }
    }
    let _ = wr.shutdown().await;
}

async fn reader(
    conn: Arc<Conn>,
    mut rd: tokio::io::ReadHalf<Box<dyn Io>>,
    mut buf: BytesMut,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        loop {
            match Frame::decode(&mut buf, MAX_FRAME) {
                Ok(Some(f)) => {
                    *lock(&conn.last_rx) = Instant::now();
                    conn.dispatch(f);
                }
                Ok(None) => break,
                Err(e) => {
                    let what = match e {
                        FrameError::Oversize { .. } => format!("oversize frame ({e})"),
                        FrameError::UnknownType(_) => format!("unknown frame ({e})"),
                        FrameError::Malformed { .. } => format!("malformed frame ({e})"),
                    };
                    conn.violation(&what);
                    return;
                }
            }
            if conn.is_closed() {
                return;
            }
        }
        buf.reserve(64 * 1024);
        let r = tokio::select! {
            _ = stop.changed() => return,
            r = rd.read_buf(&mut buf) => r,
        };
        match r {
            Ok(0) => {
                conn.shut("the peer closed the connection");
                return;
            }
            Ok(_) => {}
            Err(e) => {
                conn.shut(&format!("read failed: {e}"));
                return;
            }
        }
    }
}

async fn keepalive(
    conn: Arc<Conn>,
    every: Duration,
    dead_after: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
        let silent = lock(&conn.last_rx).elapsed();
        if silent >= dead_after {
            tracing::warn!(peer = %conn.addr, node = %conn.peer, "cluster link: no frame from the peer for {silent:?}");
            conn.shut(&format!("no frame from the peer for {silent:?}"));
            return;
        }
        n += 1;
        conn.control(Frame::Ping { n });
    }
}

/// A console the peer asks this node to attach to one of its VMs.
pub struct IncomingOpen {
    /// The peer node.
    pub from: String,
    /// The peer node's link address (the console client's own address is in
    /// the request).
    pub client_of: SocketAddr,
    pub request: OpenRequest,
    conn: Arc<Conn>,
    id: u32,
    parts: Option<(Arc<SendCredit>, mpsc::UnboundedReceiver<StreamEvent>)>,
}

impl IncomingOpen {
    /// Attach: the stream carries the console from now on.
    pub fn accept(self) -> Result<Stream, LinkError> {
        self.accept_granting("")
    }

    /// Accept, telling the opener what was granted (the lock).
    pub fn accept_granting(mut self, granted: &str) -> Result<Stream, LinkError> {
        let Some((credit, rx)) = self.parts.take() else {
            return Err(LinkError::Closed {
                node: self.from.clone(),
                reason: "answered twice".into(),
            });
        };
        let window = self.conn.counters().map_or(64 * 1024, |l| l.cfg.window);
        {
            let mut st = lock(&self.conn.state);
            match st.streams.get_mut(&self.id) {
                Some(s) => s.allowance = u64::from(window),
                None => {
                    return Err(LinkError::Closed {
                        node: self.from.clone(),
                        reason: st
                            .closed
                            .clone()
                            .unwrap_or_else(|| "the peer gave up".into()),
                    })
                }
            }
        }
        self.conn.control(Frame::Accept {
            stream: self.id,
            window,
            granted: granted.to_string(),
        });
        Ok(Stream::new(
            self.conn.clone(),
            self.id,
            credit,
            rx,
            window,
            String::new(),
        ))
    }

    /// Refuse, with the reason the console is shown.
    pub fn refuse(mut self, reason: &str) {
        self.parts = None;
        lock(&self.conn.state).streams.remove(&self.id);
        self.conn.control(Frame::Refuse {
            stream: self.id,
            reason: reason.to_string(),
        });
    }
}

impl Drop for IncomingOpen {
    fn drop(&mut self) {
        if self.parts.take().is_some() {
            lock(&self.conn.state).streams.remove(&self.id);
            self.conn.control(Frame::Refuse {
                stream: self.id,
                reason: "the node did not answer".into(),
            });
        }
    }
}

/// A vMotion hand-off from a peer: the VM now lives there.
pub struct IncomingHandoff {
    pub from: String,
    pub uuid: String,
    pub epoch: u64,
    /// Console input held since GOAHEAD, for the VM's new connection.
    pub input: Bytes,
    conn: Arc<Conn>,
    id: u32,
    answered: bool,
}

impl IncomingHandoff {
    /// Answer: `Ok` when this node let go of the VM (with where its output
    /// stood and the input it held; the recent bytes are cut so that both
    /// fit in [`MAX_LOG`]) or took the input; `Err(reason)` otherwise.
    pub fn done(mut self, result: Result<Handed, String>) {
        self.answered = true;
        let (ok, reason, mut handed) = match result {
            Ok(h) => (true, String::new(), h),
            Err(r) => (false, r, Handed::default()),
        };
        if handed.input.len() > MAX_LOG {
            tracing::warn!(
                bytes = handed.input.len(),
                "hand-off: held console input past what the link carries; dropped"
            );
            handed.input = Bytes::new();
        }
        let room = MAX_LOG - handed.input.len();
        if handed.recent.len() > room {
            let cut = handed.recent.len() - room;
            let _ = handed.recent.split_to(cut);
        }
        self.conn.control(Frame::HandoffDone {
            id: self.id,
            ok,
            reason,
            origin: handed.origin,
            said: handed.said,
            input: handed.input,
            recent: handed.recent,
        });
    }
}

impl Drop for IncomingHandoff {
    fn drop(&mut self) {
        if !self.answered {
            self.conn.control(Frame::HandoffDone {
                id: self.id,
                ok: false,
                reason: "the node did not answer".into(),
                origin: 0,
                said: 0,
                input: Bytes::new(),
                recent: Bytes::new(),
            });
        }
    }
}

/// A peer asks for a VM's recent console output.
pub struct IncomingLog {
    pub from: String,
    pub uuid: String,
    /// At most this many bytes (the tail of the log).
    pub max: usize,
    conn: Arc<Conn>,
    id: u32,
    answered: bool,
}

impl IncomingLog {
    /// Answer with the log (its last `max` bytes are sent), or `None`.
    pub fn reply(mut self, log: Option<Bytes>) {
        self.answered = true;
        let (found, data) = match log {
            Some(b) => {
                let cut = b.len().saturating_sub(self.max);
                (true, b.slice(cut..))
            }
            None => (false, Bytes::new()),
        };
        self.conn.control(Frame::LogResponse {
            id: self.id,
            found,
            data,
        });
    }
}

impl Drop for IncomingLog {
    fn drop(&mut self) {
        if !self.answered {
            self.conn.control(Frame::LogResponse {
                id: self.id,
                found: false,
                data: Bytes::new(),
            });
        }
    }
}

/// What a stream's reader got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recv {
    Data(Bytes),
    /// The peer sends no more (it may still read).
    Eof,
    /// The stream is over, with the reason.
    Closed(String),
}

/// Shared by a stream's two halves: the stream closes when both are gone.
struct StreamCore {
    conn: Arc<Conn>,
    id: u32,
    credit: Arc<SendCredit>,
    /// Closed already (by either half, or by the peer).
    done: AtomicBool,
}

impl StreamCore {
    fn close(&self, reason: &str) {
        if !self.done.swap(true, Ordering::Relaxed) {
            self.credit.close();
            self.conn.forget_stream(self.id, reason);
        }
    }
}

impl Drop for StreamCore {
    fn drop(&mut self) {
        self.close("closed");
    }
}

/// One console over the link, both ways. Split it to read and write from
/// two tasks.
pub struct Stream {
    pub reader: StreamReader,
    pub writer: StreamWriter,
    /// What the accepting node granted (its answer to the open).
    granted: String,
}

impl Stream {
    fn new(
        conn: Arc<Conn>,
        id: u32,
        credit: Arc<SendCredit>,
        rx: mpsc::UnboundedReceiver<StreamEvent>,
        window: u32,
        granted: String,
    ) -> Stream {
        let core = Arc::new(StreamCore {
            conn,
            id,
            credit,
            done: AtomicBool::new(false),
        });
        Stream {
            reader: StreamReader {
                core: core.clone(),
                rx,
                unacked: 0,
                window,
                ended: None,
            },
            writer: StreamWriter { core },
            granted,
        }
    }

    /// What the accepting node granted (empty when it did not say).
    pub fn granted(&self) -> &str {
        &self.granted
    }

    /// The two halves.
    pub fn split(self) -> (StreamReader, StreamWriter) {
        (self.reader, self.writer)
    }

    /// The peer node.
    pub fn peer(&self) -> &str {
        &self.reader.core.conn.peer
    }
}

/// The receiving half: taking bytes grants the sender more credit.
pub struct StreamReader {
    core: Arc<StreamCore>,
    rx: mpsc::UnboundedReceiver<StreamEvent>,
    /// Bytes taken and not yet credited back.
    unacked: u32,
    /// The window this side granted (credit goes back in quarters of it).
    window: u32,
    /// What ended the stream, repeated to later calls.
    ended: Option<Recv>,
}

impl StreamReader {
    /// The next bytes, or the end of the stream.
    pub async fn recv(&mut self) -> Recv {
        if let Some(e) = &self.ended {
            if matches!(e, Recv::Closed(_)) {
                return e.clone();
            }
        }
        match self.rx.recv().await {
            Some(StreamEvent::Data(b)) => {
                self.unacked += b.len() as u32;
                // Grant in quarters of the window: few credit frames, and
                // the sender never waits on a reader that keeps up.
                if self.unacked >= self.window / 4 || self.rx.is_empty() {
                    self.grant();
                }
                Recv::Data(b)
            }
            Some(StreamEvent::Eof) => {
                self.ended = Some(Recv::Eof);
                Recv::Eof
            }
            Some(StreamEvent::Closed(r)) => {
                self.ended = Some(Recv::Closed(r.clone()));
                Recv::Closed(r)
            }
            None => {
                let r = Recv::Closed(self.core.conn.close_reason());
                self.ended = Some(r.clone());
                r
            }
        }
    }

    fn grant(&mut self) {
        if self.unacked == 0 || self.core.done.load(Ordering::Relaxed) {
            return;
        }
        let n = self.unacked;
        self.unacked = 0;
        let conn = &self.core.conn;
        {
            let mut st = lock(&conn.state);
            match st.streams.get_mut(&self.core.id) {
                Some(s) => s.allowance += u64::from(n),
                None => return,
            }
        }
        conn.control(Frame::Credit {
            stream: self.core.id,
            bytes: n,
        });
    }

    /// The stream id (for logs).
    pub fn id(&self) -> u32 {
        self.core.id
    }
}

/// The sending half: waits for credit.
pub struct StreamWriter {
    core: Arc<StreamCore>,
}

impl StreamWriter {
    /// Send all of `data`, as credit allows (waits while the peer's
    /// consumer is behind).
    pub async fn send(&self, data: Bytes) -> Result<(), LinkError> {
        let mut rest = data;
        while !rest.is_empty() {
            let Some(n) = self.core.credit.take(rest.len().min(MAX_DATA)).await else {
                return Err(self.closed());
            };
            let chunk = rest.split_to(n);
            let frame = Frame::Data {
                stream: self.core.id,
                data: chunk,
            };
            if self.core.conn.data.send(frame).await.is_err() {
                return Err(self.closed());
            }
            if let Some(l) = self.core.conn.counters() {
                l.counters.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Half-close: this side sends no more; the peer reads [`Recv::Eof`].
    pub async fn shutdown(&self) -> Result<(), LinkError> {
        let f = Frame::Shutdown {
            stream: self.core.id,
        };
        self.core.conn.data.send(f).await.map_err(|_| self.closed())
    }

    /// End the stream both ways, with a reason for the peer.
    pub fn close(&self, reason: &str) {
        self.core.close(reason);
    }

    fn closed(&self) -> LinkError {
        LinkError::Closed {
            node: self.core.conn.peer.clone(),
            reason: self.core.conn.close_reason(),
        }
    }
}
