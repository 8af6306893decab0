//! Tokio listeners: the proxy port (TCP or TLS), the per-VM console ports
//! and the admin port; one task per connection. Also the periodic sweep and
//! the signals (SIGTERM/SIGINT stop, SIGHUP reopens backend files).

pub mod conn;
pub mod tls;

use crate::hub::{Access, AttachError, Hub, ListenerGuard, LockMode, PortOpener, Vm};
use crate::session::console::ConsoleSession;
use crate::session::vm::{VmSession, VmSessionConfig};
use conn::{say_and_close, serve, Stream};
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
}

/// Connections the kernel may queue for accept on each listener. The
/// default (128) overflows when many ESXi hosts reconnect at once, and the
/// dropped ones wait a whole second to retry; the kernel caps this at
/// `net.core.somaxconn`.
const BACKLOG: u32 = 4096;

/// Listen on `addr` with a deep accept queue (must run inside the runtime).
pub fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// [`listen`], with an error that says which port it was for.
pub fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener, String> {
    listen(addr).map_err(|e| format!("cannot listen on {what} {addr}: {e}"))
}

/// Opens console listeners for the hub.
struct ConsoleOpener {
    hub: Weak<Hub>,
    interface: IpAddr,
    rt: tokio::runtime::Handle,
}

impl PortOpener for ConsoleOpener {
    fn open(&self, vm: Arc<Vm>, port: u16) -> io::Result<ListenerGuard> {
        let _guard = self.rt.enter();
        let listener = listen(SocketAddr::new(self.interface, port))?;
        let hub = self.hub.clone();
        let task = self
            .rt
            .spawn(accept_loop(listener, "console port", move |tcp, _| {
                if let Some(hub) = hub.upgrade() {
                    tokio::spawn(serve_console(hub, vm.clone(), tcp));
                }
            }));
        Ok(ListenerGuard(task.abort_handle()))
    }
}

/// Run the server until SIGTERM or SIGINT. The listeners are bound (and the
/// backend's persisted ports reopened) before this returns `Ok` from start.
pub async fn run(
    hub: Arc<Hub>,
    cfg: ServerConfig,
    preload: Vec<vspc_backend_api::VmRecord>,
) -> Result<(), String> {
    hub.set_opener(Box::new(ConsoleOpener {
        hub: Arc::downgrade(&hub),
        interface: hub.config().interface,
        rt: tokio::runtime::Handle::current(),
    }));
    let failed = hub.preload(preload);
    if failed > 0 {
        tracing::warn!(failed, "some persisted console ports could not be reopened");
    }
    let proxy = bind(cfg.proxy, "proxy port")?;
    let admin = bind(cfg.admin, "admin port")?;
    tracing::info!(proxy = %cfg.proxy, admin = %cfg.admin, tls = cfg.tls.is_some(), vms = hub.len(), "vspc listening");

    let h = hub.clone();
    let c = cfg.clone();
    tokio::spawn(accept_loop(proxy, "proxy port", move |tcp, addr| {
        tokio::spawn(serve_vm(h.clone(), c.clone(), tcp, addr));
    }));
    let h = hub.clone();
    tokio::spawn(accept_loop(admin, "admin port", move |tcp, _| {
        tokio::spawn(crate::admin::serve_admin(h.clone(), tcp));
    }));
    let h = hub.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(SWEEP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            h.sweep(Instant::now());
        }
    });
    wait_for_signals(&hub).await
}

async fn wait_for_signals(hub: &Hub) -> Result<(), String> {
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
            }
        }
    }
}

/// Accept connections forever. Accept errors back off; running out of file
/// descriptors is logged (once a second at most) and existing connections
/// go on.
async fn accept_loop<F>(listener: TcpListener, what: &'static str, mut on_conn: F)
where
    F: FnMut(TcpStream, SocketAddr) + Send + 'static,
{
    let mut last_warn: Option<Instant> = None;
    loop {
        match listener.accept().await {
            Ok((tcp, addr)) => on_conn(tcp, addr),
            Err(e) => {
                // EMFILE (24) and ENFILE (23): the process or system is out of descriptors.
                let out_of_fds = matches!(e.raw_os_error(), Some(24) | Some(23));
                if last_warn.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                    last_warn = Some(Instant::now());
                    if out_of_fds {
                        tracing::error!("{what}: out of file descriptors; refusing new connections until some close");
                    } else {
                        tracing::warn!("{what}: accept failed: {e}");
                    }
                }
                tokio::time::sleep(Duration::from_millis(if out_of_fds { 100 } else { 10 })).await;
            }
        }
    }
}

async fn serve_vm(hub: Arc<Hub>, cfg: ServerConfig, tcp: TcpStream, addr: SocketAddr) {
    tracing::debug!(%addr, "VM connection");
    let stream = match &cfg.tls {
        None => Stream::Tcp(tcp),
        Some(acceptor) => {
            match tokio::time::timeout(cfg.vm.handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => Stream::Tls(Box::new(tls)),
                Ok(Err(e)) => {
                    tracing::warn!(%addr, "TLS handshake failed: {e}");
                    return;
                }
                Err(_) => {
                    tracing::warn!(%addr, "TLS handshake timed out");
                    return;
                }
            }
        }
    };
    let peer = hub.new_peer(VM_OUTBOX_LIMIT);
    let outbox = peer.outbox.clone();
    let mut session = VmSession::new(hub, peer, cfg.vm.clone(), Instant::now());
    serve(stream, &mut session, outbox, cfg.vm_tx_rate).await;
    tracing::debug!(%addr, "VM connection closed");
}

async fn serve_console(hub: Arc<Hub>, vm: Arc<Vm>, tcp: TcpStream) {
    // Recent context first; the session queues it before joining the
    // fan-out, so live output always follows it.
    let seed = hub.backend().seed_data(vm.record()).await;
    let mut session =
        match ConsoleSession::join(&hub, &vm, LockMode::FreeForAllOrReadOnly, Some(&seed)) {
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
    let outbox = session.outbox();
    serve(Stream::Tcp(tcp), &mut session, outbox, None).await;
    tracing::info!(vm = %vm.name(), "console disconnected");
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
            },
            crate::backend_host::Backends::spawn(vec![]).unwrap(),
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
        };
        let f = serve_vm(hub.clone(), cfg, a, l.local_addr().unwrap());
        let vm_task = std::mem::size_of_val(&f);
        assert!(
            vm_task <= 2048,
            "VM connection task grew to {vm_task} bytes"
        );
        drop(f);
        let b = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let id = crate::hub::Identity {
            key: "k".into(),
            uuid: "u".into(),
            name: "n".into(),
        };
        let vm = hub.attach_vm(&id, hub.new_peer(10)).unwrap();
        let f = serve_console(hub.clone(), vm.clone(), b);
        let console_task = std::mem::size_of_val(&f);
        assert!(
            console_task <= 1792,
            "console task grew to {console_task} bytes"
        );
        drop(f);
        let f = accept_loop(l, "x", move |_t, _a| {});
        let listener_task = std::mem::size_of_val(&f);
        assert!(
            listener_task <= 512,
            "console listener task grew to {listener_task} bytes"
        );
    }
}
