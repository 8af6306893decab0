//! Listeners: the proxy port (TCP or TLS), the admin port and the HTTP
//! port ([`crate::http`]) on the tokio runtime, the per-VM console ports
//! on one accepting thread ([`acceptor`]); one task per connection
//! ([`conn::Conn`]). Also the periodic sweep and the signals (SIGTERM/SIGINT
//! stop, SIGHUP reopens backend files). Accepts, accept errors and failed
//! TLS handshakes are counted in the hub's [`crate::metrics::Metrics`].

pub mod acceptor;
pub mod conn;
pub mod tls;

use crate::hub::{Access, AttachError, Hub, ListenerGuard, LockMode, PortOpener, Vm};
use crate::metrics::Listener;
use crate::outbox::Encoding;
use crate::session::console::ConsoleSession;
use crate::session::vm::{VmSession, VmSessionConfig};
use conn::{say_and_close, Conn, Stream};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

/// How often idle VMs and stale vMotions are looked for.
const SWEEP_EVERY: Duration = Duration::from_millis(250);

/// Outbox limit for a VM connection (input waits long before this).
const VM_OUTBOX_LIMIT: usize = 16 << 20;

/// What the server needs beyond the hub.
#[derive(Clone)]
pub struct ServerConfig {
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub tls: Option<TlsAcceptor>,
    pub vm: VmSessionConfig,
    pub vm_tx_rate: Option<u64>,
    /// The HTTP API and `/metrics`; `None` with `--no-http`.
    pub http: Option<crate::http::HttpConfig>,
    /// Who may connect to the proxy port (`--proxy-allow`): anyone else
    /// is closed at accept, so only the ESXi hosts' networks can claim to
    /// be a VM.
    pub proxy_allow: crate::cidr::AllowList,
    /// The SSH front door (`--ssh-port`); `None` when off.
    pub ssh: Option<crate::ssh::SshConfig>,
    /// Who may connect to the admin port (`--admin-allow`).
    pub admin_allow: crate::cidr::AllowList,
    /// Most VM connections open and not yet identified
    /// (`--max-unidentified`).
    pub max_unidentified: usize,
}

/// Why the configuration may not be served as it is, or what an operator
/// should be warned of: the admin port beyond loopback without an
/// allow-list is refused; the proxy port beyond loopback without one is
/// allowed (ESXi hosts are many) but warned about.
pub fn check_exposure(
    admin: SocketAddr,
    admin_allow: &crate::cidr::AllowList,
    proxy: SocketAddr,
    proxy_allow: &crate::cidr::AllowList,
) -> Result<(), String> {
    if !admin.ip().is_loopback() && admin_allow.is_open() {
        return Err(format!(
            "--admin-iface {} is not a loopback address, and the admin port attaches and clears consoles without authentication: give --admin-allow CIDR (the admin hosts' networks; 0.0.0.0/0 for anyone) or listen on 127.0.0.1",
            admin.ip()
        ));
    }
    if !proxy.ip().is_loopback() && proxy_allow.is_open() {
        tracing::warn!(
            %proxy,
            "the proxy port listens beyond loopback and takes VM connections from anyone: anyone who can reach it can claim to be a VM; give --proxy-allow CIDR with the ESXi hosts' networks"
        );
    }
    Ok(())
}

/// TCP keepalive on VM connections, as ESXi sets it on its side: probes
/// after 300 s of silence, then every [`KEEPALIVE_INTERVAL`], so a host
/// that died without closing (power loss, a cut link) is noticed and its
/// VMs show as disconnected rather than stay attached to a dead socket.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(300);

/// Time between unanswered keepalive probes.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);

/// Unanswered probes before the connection counts as dead (about 7
/// minutes after the last sign of life, in all).
pub const KEEPALIVE_PROBES: u32 = 4;

/// Turn on [`KEEPALIVE_IDLE`]-style keepalive on a VM connection.
fn keepalive(tcp: &TcpStream) -> io::Result<()> {
    use rustix::net::sockopt;
    sockopt::set_socket_keepalive(tcp, true)?;
    sockopt::set_tcp_keepidle(tcp, KEEPALIVE_IDLE)?;
    sockopt::set_tcp_keepintvl(tcp, KEEPALIVE_INTERVAL)?;
    sockopt::set_tcp_keepcnt(tcp, KEEPALIVE_PROBES)?;
    Ok(())
}

/// Connections the kernel may queue for accept on each listener. The
/// default (128) overflows when many ESXi hosts reconnect at once, and the
/// dropped ones wait a whole second to retry; the kernel caps this at
/// `net.core.somaxconn`.
const BACKLOG: i32 = 4096;

/// Listen on `addr` with a deep accept queue (must run inside the runtime).
pub fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::from_std(acceptor::listen_std(addr, BACKLOG)?)
}

/// [`listen`], with an error that says which port it was for.
pub fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener, String> {
    listen(addr).map_err(|e| format!("cannot listen on {what} {addr}: {e}"))
}

/// Opens console listeners for the hub; one thread accepts on all of them.
struct ConsoleOpener {
    interface: IpAddr,
    acceptor: acceptor::Acceptor<Arc<Vm>>,
}

impl ConsoleOpener {
    fn start(hub: Weak<Hub>, interface: IpAddr) -> io::Result<ConsoleOpener> {
        let rt = tokio::runtime::Handle::current();
        let acceptor = acceptor::Acceptor::start("console port", move |vm: &Arc<Vm>, tcp| {
            if let Some(hub) = hub.upgrade() {
                hub.metrics().accepted(Listener::Console);
                rt.spawn(console_port(hub, vm.clone(), tcp));
            }
        })?;
        Ok(ConsoleOpener {
            interface,
            acceptor,
        })
    }
}

impl PortOpener for ConsoleOpener {
    fn open(&self, vm: Arc<Vm>, port: u16) -> io::Result<ListenerGuard> {
        let listener = acceptor::listen_std(SocketAddr::new(self.interface, port), BACKLOG)?;
        Ok(ListenerGuard(Box::new(self.acceptor.add(listener, vm)?)))
    }

    fn accept_errors(&self) -> u64 {
        self.acceptor.errors()
    }
}

/// Run the server until SIGTERM or SIGINT. The listeners are bound (and the
/// backend's persisted ports reopened) before this returns `Ok` from start.
pub async fn run(
    hub: Arc<Hub>,
    cfg: ServerConfig,
    preload: Vec<vspc_backend_api::VmRecord>,
) -> Result<(), String> {
    let opener = ConsoleOpener::start(Arc::downgrade(&hub), hub.config().interface)
        .map_err(|e| format!("cannot start accepting console connections: {e}"))?;
    hub.set_opener(Box::new(opener));
    let failed = hub.preload(preload);
    if failed > 0 {
        tracing::warn!(failed, "some persisted console ports could not be reopened");
    }
    let proxy = bind(cfg.proxy, "proxy port")?;
    let admin = bind(cfg.admin, "admin port")?;
    let http = match &cfg.http {
        None => None,
        Some(h) => match bind(h.addr, "HTTP port") {
            Ok(l) => Some((l, h.clone())),
            Err(e) if h.required => return Err(e),
            Err(e) => {
                tracing::warn!(
                    "{e}; serving no HTTP API (choose a port with --http-port, or --no-http)"
                );
                None
            }
        },
    };
    let ssh = match &cfg.ssh {
        None => None,
        Some(s) => {
            tracing::info!(ssh = %s.addr, "SSH front door listening");
            Some((bind(s.addr, "SSH port")?, s.state.clone()))
        }
    };
    if !cfg.proxy_allow.is_open() {
        tracing::info!(allow = %cfg.proxy_allow, "the proxy port accepts VMs only from these networks");
    }
    tracing::info!(proxy = %cfg.proxy, admin = %cfg.admin, http = ?http.as_ref().map(|(_, h)| h.addr), tls = cfg.tls.is_some(), vms = hub.len(), "vspc listening");

    let h = hub.clone();
    let c = cfg.clone();
    tokio::spawn(accept_loop(
        proxy,
        "proxy port",
        hub.clone(),
        Listener::Proxy,
        move |tcp, addr| {
            serve_vm(&h, &c, tcp, addr);
        },
    ));
    let h = hub.clone();
    let admin_allow = cfg.admin_allow.clone();
    tokio::spawn(accept_loop(
        admin,
        "admin port",
        hub.clone(),
        Listener::Admin,
        move |tcp, addr| {
            if !admin_allow.allows(addr.ip()) {
                tracing::warn!(%addr, "admin port: refused a connection from {}: not in --admin-allow", addr.ip());
                return;
            }
            tokio::spawn(crate::admin::serve_admin(h.clone(), tcp));
        },
    ));
    if let Some((listener, http_cfg)) = http {
        tokio::spawn(crate::http::serve(listener, hub.clone(), http_cfg));
    }
    let ssh_state = ssh.as_ref().map(|(_, state)| state.clone());
    if let Some((listener, state)) = ssh {
        tokio::spawn(crate::ssh::serve(listener, hub.clone(), state));
    }
    let h = hub.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(SWEEP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            h.sweep(Instant::now());
        }
    });
    wait_for_signals(&hub, ssh_state.as_deref()).await
}

async fn wait_for_signals(hub: &Hub, ssh: Option<&crate::ssh::SshState>) -> Result<(), String> {
    use tokio::signal::unix::{signal, SignalKind};
    let sig = |k: SignalKind| signal(k).map_err(|e| format!("cannot install signal handler: {e}"));
    let mut term = sig(SignalKind::terminate())?;
    let mut int = sig(SignalKind::interrupt())?;
    let mut hup = sig(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); return Ok(()); }
            _ = int.recv() => { tracing::info!("SIGINT: shutting down"); return Ok(()); }
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reopening backend files");
                hub.backend().reopen();
                if let Some(ssh) = ssh {
                    ssh.reload(hub);
                }
            }
        }
    }
}

/// Accept connections forever. Accept errors back off; running out of file
/// descriptors is logged (once a second at most) and existing connections
/// go on.
async fn accept_loop<F>(
    listener: TcpListener,
    what: &'static str,
    hub: Arc<Hub>,
    which: Listener,
    mut on_conn: F,
) where
    F: FnMut(TcpStream, SocketAddr) + Send + 'static,
{
    let mut last_warn: Option<Instant> = None;
    loop {
        match listener.accept().await {
            Ok((tcp, addr)) => {
                hub.metrics().accepted(which);
                on_conn(tcp, addr);
            }
            Err(e) => {
                hub.metrics().accept_error(which);
                tokio::time::sleep(acceptor::accept_failed(what, &e, &mut last_warn)).await;
            }
        }
    }
}

/// Connections closed at accept because too many were unidentified.
static UNIDENTIFIED_REFUSALS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Serve a VM connection: after the TLS handshake, if any, the connection
/// gets a task of its own that holds nothing else.
fn serve_vm(hub: &Arc<Hub>, cfg: &ServerConfig, tcp: TcpStream, addr: SocketAddr) {
    if !cfg.proxy_allow.allows(addr.ip()) {
        hub.metrics().proxy_refused();
        tracing::warn!(
            %addr,
            "proxy port: refused a connection from {}: not in --proxy-allow",
            addr.ip()
        );
        // Dropping the socket closes it.
        return;
    }
    if hub.unidentified() >= cfg.max_unidentified {
        hub.metrics().proxy_refused();
        let n = UNIDENTIFIED_REFUSALS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            tracing::warn!(
                %addr,
                refused = n,
                "proxy port: {} connections are open and not yet identified (--max-unidentified); closing new ones",
                cfg.max_unidentified
            );
        }
        return;
    }
    tracing::debug!(%addr, "VM connection");
    if let Err(e) = keepalive(&tcp) {
        tracing::debug!(%addr, "cannot turn on TCP keepalive: {e}");
    }
    let Some(acceptor) = cfg.tls.clone() else {
        tokio::spawn(vm_conn(hub.clone(), cfg, Stream::Tcp(tcp), addr));
        return;
    };
    let (hub, cfg) = (hub.clone(), cfg.clone());
    tokio::spawn(async move {
        match tokio::time::timeout(cfg.vm.handshake_timeout, acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => {
                tokio::spawn(vm_conn(hub, &cfg, Stream::Tls(Box::new(tls)), addr));
            }
            Ok(Err(e)) => {
                hub.metrics().tls_failure(Listener::Proxy);
                tracing::warn!(%addr, "TLS handshake failed: {e}");
            }
            Err(_) => {
                hub.metrics().tls_failure(Listener::Proxy);
                tracing::warn!(%addr, "TLS handshake timed out");
            }
        }
    });
}

fn vm_conn(hub: Arc<Hub>, cfg: &ServerConfig, stream: Stream, addr: SocketAddr) -> Conn<VmSession> {
    let peer = hub.new_peer(VM_OUTBOX_LIMIT, Encoding::Telnet);
    let outbox = peer.outbox.clone();
    let slice = vm_read_slice(hub.config().console_queue);
    // Kept beside the hub until the connection closes (not in the session,
    // whose size is most of an idle VM's memory).
    hub.note_addr(peer.id, addr);
    let session = VmSession::new(hub, peer, cfg.vm.clone(), Instant::now());
    Conn::new(stream, session, outbox, cfg.vm_tx_rate).read_slice(slice)
}

/// How much of a VM's output to take in one read: a sixteenth of a
/// console's queue (64 KiB with the default queue), so that one read can
/// never fill a console's queue far past the point where the VM waits for
/// it.
pub fn vm_read_slice(console_queue: usize) -> usize {
    (console_queue / 16).clamp(256, 64 * 1024)
}

/// Serve a console-port connection: fetch the recent output and join the
/// VM here, then give the connection a task of its own.
async fn console_port(hub: Arc<Hub>, vm: Arc<Vm>, tcp: std::net::TcpStream) {
    let tcp = match TcpStream::from_std(tcp) {
        Ok(tcp) => tcp,
        Err(e) => {
            tracing::warn!(vm = %vm.name(), "cannot serve a console: {e}");
            return;
        }
    };
    // Recent context first; the session queues it before joining the
    // fan-out, so live output always follows it.
    let seed = hub.backend().seed_data(vm.record()).await;
    let protocol = hub.config().console_protocol;
    let mut session = match ConsoleSession::join(
        &hub,
        &vm,
        LockMode::FreeForAllOrReadOnly,
        Some(&seed),
        protocol,
    ) {
        Ok(s) => s,
        Err(e) => {
            tracing::info!(vm = %vm.name(), "console refused: {e}");
            let msg = match e {
                AttachError::Full { .. } => {
                    format!("vspc: {e}; the VM is full, try again later.\r\n")
                }
                _ => format!("vspc: {e}.\r\n"),
            };
            say_and_close(tcp, msg.as_bytes()).await;
            return;
        }
    };
    if session.access() == Access::ReadOnly {
        session.tell("vspc: someone holds a write lock on this VM; this console is read-only.\r\n");
    }
    tracing::info!(vm = %vm.name(), consoles = vm.console_count(), access = session.access().as_str(), "console connected");
    session.audit(crate::audit::Kind::ConsolePort, tcp.peer_addr().ok(), None);
    let outbox = session.outbox();
    let stall = hub.config().console_stall;
    tokio::spawn(Conn::new(Stream::Tcp(tcp), session, outbox, None).stall_timeout(stall));
}

#[cfg(test)]
mod size_budget {
    //! Per-connection task sizes (debug build): budgets against bloat.
    use super::*;

    #[tokio::test]
    async fn connection_tasks_stay_small() {
        let hub = crate::hub::Hub::new(
            crate::hub::HubConfig {
                port_range_start: 1,
                vm_ports: false,
                interface: "127.0.0.1".parse().unwrap(),
                expire: Duration::from_secs(1),
                vmotion_timeout: Duration::from_secs(1),
                client_limit: None,
                console_queue: 1 << 20,
                console_protocol: crate::hub::ConsoleProtocol::Auto,
                console_stall: None,
            },
            crate::backend_host::Backends::spawn(vec![], 1 << 20).unwrap(),
        );
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let cfg = ServerConfig {
            proxy: l.local_addr().unwrap(),
            admin: l.local_addr().unwrap(),
            tls: None,
            vm: VmSessionConfig {
                handshake_timeout: Duration::from_secs(1),
                identify_timeout: Duration::from_secs(1),
                multi_console: false,
            },
            vm_tx_rate: None,
            http: None,
            proxy_allow: Default::default(),
            ssh: None,
            admin_allow: Default::default(),
            max_unidentified: 1024,
        };
        // What stays allocated while a connection is idle: its task's
        // future. (Console listeners have no task: see `acceptor`.)
        let f = vm_conn(hub.clone(), &cfg, Stream::Tcp(a), l.local_addr().unwrap());
        let vm_task = std::mem::size_of_val(&f);
        eprintln!("VM connection future: {vm_task} bytes");
        assert!(vm_task <= 656, "VM connection task grew to {vm_task} bytes");
        drop(f);
        let b = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let id = crate::hub::Identity {
            key: "k".into(),
            uuid: "u".into(),
            name: "n".into(),
        };
        let vm = hub
            .attach_vm(&id, hub.new_peer(10, Encoding::Telnet))
            .unwrap();
        let session = ConsoleSession::join(
            &hub,
            &vm,
            LockMode::FreeForAll,
            None,
            crate::hub::ConsoleProtocol::Auto,
        )
        .unwrap();
        let outbox = session.outbox();
        let f = Conn::new(Stream::Tcp(b), session, outbox, None);
        let console_task = std::mem::size_of_val(&f);
        eprintln!("console connection future: {console_task} bytes");
        assert!(
            console_task <= 416,
            "console task grew to {console_task} bytes"
        );
    }
}

#[cfg(test)]
mod keepalive_tests {
    //! VM connections get ESXi's keepalive settings.
    use super::*;

    #[tokio::test]
    async fn vm_connections_probe_after_300_idle_seconds() {
        use rustix::net::sockopt;
        let l = TcpListener::bind("127.0.0.1:0").await.expect("listen");
        let _client = TcpStream::connect(l.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (tcp, _) = l.accept().await.expect("accept");
        keepalive(&tcp).expect("keepalive");
        assert!(sockopt::socket_keepalive(&tcp).expect("SO_KEEPALIVE"));
        assert_eq!(sockopt::tcp_keepidle(&tcp).expect("idle"), KEEPALIVE_IDLE);
        assert_eq!(
            sockopt::tcp_keepintvl(&tcp).expect("interval"),
            KEEPALIVE_INTERVAL
        );
        assert_eq!(sockopt::tcp_keepcnt(&tcp).expect("count"), KEEPALIVE_PROBES);
    }
}
