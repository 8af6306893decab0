//! The proxy port: where ESXi hosts connect each VM's serial port (telnet,
//! or TLS with `--ssl`). Admission first (`--proxy-allow`,
//! `--max-unidentified`), then TCP keepalive as ESXi sets it and the TLS
//! handshake, then a [`VmSession`] driven by its own task.

use crate::hub::Hub;
use crate::metrics::Door;
use crate::net::conn::{Conn, Stream};
use crate::outbox::Encoding;
use crate::session::vm::{VmSession, VmSessionConfig};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

/// Outbox limit for a VM connection (input waits long before this).
const VM_OUTBOX_LIMIT: usize = 16 << 20;

/// The proxy door's settings.
#[derive(Clone)]
pub struct ProxyConfig {
    /// `--ssl`: the handshake every VM connection starts with.
    pub tls: Option<TlsAcceptor>,
    /// The VM sessions' timers and `--multi-console`.
    pub vm: VmSessionConfig,
    /// `--vm-tx-rate`: bytes a second to each VM, if limited.
    pub vm_tx_rate: Option<u64>,
    /// Who may connect (`--proxy-allow`): anyone else is closed at accept,
    /// so only the ESXi hosts' networks can claim to be a VM.
    pub allow: crate::cidr::AllowList,
    /// Most VM connections open and not yet identified
    /// (`--max-unidentified`).
    pub max_unidentified: usize,
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

/// Connections closed at accept because too many were unidentified.
static UNIDENTIFIED_REFUSALS: AtomicU64 = AtomicU64::new(0);

/// Serve a VM connection: after the TLS handshake, if any, the connection
/// gets a task of its own that holds nothing else.
pub fn serve_vm(hub: &Arc<Hub>, cfg: &ProxyConfig, tcp: TcpStream, addr: SocketAddr) {
    if !cfg.allow.allows(addr.ip()) {
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
        let n = UNIDENTIFIED_REFUSALS.fetch_add(1, Ordering::Relaxed) + 1;
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
        let limit = cfg.vm.handshake_timeout;
        let metrics = hub.metrics();
        if let Some(tls) =
            crate::net::tls::handshake(&acceptor, tcp, limit, addr, Door::Proxy, metrics).await
        {
            tokio::spawn(vm_conn(hub.clone(), &cfg, Stream::Tls(Box::new(tls)), addr));
        }
    });
}

fn vm_conn(hub: Arc<Hub>, cfg: &ProxyConfig, stream: Stream, addr: SocketAddr) -> Conn<VmSession> {
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

#[cfg(test)]
mod size_budget {
    //! Per-connection task sizes (debug build): budgets against bloat.
    use super::*;
    use crate::hub::LockMode;
    use crate::session::console::ConsoleSession;
    use tokio::net::TcpListener;

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
                replay_bytes: 16384,
                console_replay: false,
            },
            crate::backend_host::Backends::spawn(vec![], 1 << 20).unwrap(),
        );
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let cfg = ProxyConfig {
            tls: None,
            vm: VmSessionConfig {
                handshake_timeout: Duration::from_secs(1),
                identify_timeout: Duration::from_secs(1),
                multi_console: false,
            },
            vm_tx_rate: None,
            allow: Default::default(),
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
            crate::hub::Replay::None,
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
    use tokio::net::TcpListener;

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
