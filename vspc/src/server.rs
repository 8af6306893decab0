//! The composition root: [`run`] serves every door on listeners bound by
//! the caller until a shutdown future completes. It binds nothing and
//! installs no signal handler itself (start-up does both), so a test can
//! run a whole server in-process.

use crate::doors::console_port::ConsoleOpener;
use crate::doors::{admin, http, proxy, ssh};
use crate::hub::Hub;
use crate::metrics::Door;
use crate::net::listen::{accept_loop, bind};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

/// How often idle VMs and stale vMotions are looked for.
const SWEEP_EVERY: Duration = Duration::from_millis(250);

/// What the server needs beyond the hub.
#[derive(Clone)]
pub struct ServerConfig {
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    /// The proxy door's settings.
    pub vms: proxy::ProxyConfig,
    /// The HTTP API and `/metrics`; `None` with `--no-http`.
    pub http: Option<http::HttpConfig>,
    /// The SSH front door (`--ssh-port`); `None` when off.
    pub ssh: Option<ssh::SshConfig>,
    /// Who may connect to the admin port (`--admin-allow`).
    pub admin_allow: crate::cidr::AllowList,
}

/// Every door's listening socket, bound before anything is served.
pub struct Listeners {
    pub proxy: TcpListener,
    pub admin: TcpListener,
    pub http: Option<TcpListener>,
    pub ssh: Option<TcpListener>,
    /// Cluster mode: this node's part (connected, its link listening) and
    /// the other nodes' requests.
    pub cluster: Option<(
        Arc<crate::cluster::Cluster>,
        tokio::sync::mpsc::Receiver<vspc_cluster::link::Incoming>,
    )>,
}

impl Listeners {
    /// Bind every door's port as `cfg` says (inside the runtime). An HTTP
    /// port that is busy is a warning unless it was asked for.
    pub fn bind(cfg: &ServerConfig) -> Result<Listeners, String> {
        let proxy = bind(cfg.proxy, Door::Proxy.port_name())?;
        let admin = bind(cfg.admin, Door::Admin.port_name())?;
        let http = match &cfg.http {
            None => None,
            Some(h) => match bind(h.addr, Door::Http.port_name()) {
                Ok(l) => Some(l),
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
            Some(s) => Some(bind(s.addr, Door::Ssh.port_name())?),
        };
        Ok(Listeners {
            proxy,
            admin,
            http,
            ssh,
            cluster: None,
        })
    }
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

/// Serve every door on `listeners` until `shutdown` completes: the console
/// ports (the hub's stored ports reopened first), the proxy, admin, HTTP
/// and SSH ports, and the sweep of idle VMs and stale vMotions. When it
/// returns, no door accepts any more (connections already open are left to
/// the caller's runtime).
pub async fn run(
    hub: Arc<Hub>,
    cfg: ServerConfig,
    listeners: Listeners,
    preload: Vec<vspc_backend_api::VmRecord>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), String> {
    let mut listeners = listeners;
    let cluster = listeners.cluster.take();
    let opener: Box<dyn crate::hub::PortOpener> = match &cluster {
        Some((c, _)) => c.opener(hub.config().interface),
        None => ConsoleOpener::start(Arc::downgrade(&hub), hub.config().interface)
            .map(|o| Box::new(o) as Box<dyn crate::hub::PortOpener>),
    }
    .map_err(|e| format!("cannot start accepting console connections: {e}"))?;
    hub.set_opener(opener);
    let cluster = cluster.map(|(c, incoming)| {
        c.start(&hub, incoming);
        c
    });
    let failed = hub.preload(preload, Instant::now());
    if failed > 0 {
        tracing::warn!(failed, "some persisted console ports could not be reopened");
    }
    if !cfg.vms.allow.is_open() {
        tracing::info!(allow = %cfg.vms.allow, "the proxy port accepts VMs only from these networks");
    }
    if let Some(s) = &cfg.ssh {
        tracing::info!(ssh = %s.addr, "SSH front door listening");
    }
    let http_addr = listeners.http.as_ref().and_then(|l| l.local_addr().ok());
    tracing::info!(proxy = %cfg.proxy, admin = %cfg.admin, http = ?http_addr, tls = cfg.vms.tls.is_some(), vms = hub.len(), "vspc listening");

    // Dropping the set aborts every task in it.
    let mut doors = JoinSet::new();
    let (h, vms) = (hub.clone(), cfg.vms.clone());
    doors.spawn(accept_loop(
        listeners.proxy,
        Door::Proxy,
        hub.clone(),
        move |tcp, addr| proxy::serve_vm(&h, &vms, tcp, addr),
    ));
    let (h, allow) = (hub.clone(), cfg.admin_allow.clone());
    doors.spawn(accept_loop(listeners.admin, Door::Admin, hub.clone(), move |tcp, addr| {
        if !allow.allows(addr.ip()) {
            tracing::warn!(%addr, "admin port: refused a connection from {}: not in --admin-allow", addr.ip());
            return;
        }
        tokio::spawn(admin::serve_admin(h.clone(), tcp));
    }));
    if let (Some(listener), Some(http_cfg)) = (listeners.http, cfg.http) {
        doors.spawn(http::serve(listener, hub.clone(), http_cfg));
    }
    if let (Some(listener), Some(ssh_cfg)) = (listeners.ssh, cfg.ssh) {
        doors.spawn(ssh::serve(listener, hub.clone(), ssh_cfg.state));
    }
    let h = hub.clone();
    doors.spawn(async move {
        let mut tick = tokio::time::interval(SWEEP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            // The clock is read here, at the edge; the hub is given `now`.
            h.sweep(Instant::now());
        }
    });
    shutdown.await;
    doors.shutdown().await;
    if let Some(c) = cluster {
        c.leave().await;
    }
    Ok(())
}

/// What SIGHUP does: backends reopen their files (log rotation), and the
/// SSH door rereads its keys.
pub fn reload(hub: &Hub, ssh: Option<&ssh::SshState>) {
    tracing::info!("SIGHUP: reopening backend files");
    hub.backend().reopen();
    if let Some(ssh) = ssh {
        ssh.reload(hub);
    }
}

#[cfg(test)]
mod tests {
    //! The whole server in-process: listeners bound here, a shutdown future
    //! this test completes.
    use super::*;
    use crate::session::vm::VmSessionConfig;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpStream;

    fn config(proxy: SocketAddr, admin: SocketAddr) -> ServerConfig {
        ServerConfig {
            proxy,
            admin,
            vms: proxy::ProxyConfig {
                tls: None,
                vm: VmSessionConfig {
                    handshake_timeout: Duration::from_secs(5),
                    identify_timeout: Duration::from_secs(5),
                    multi_console: false,
                },
                vm_tx_rate: None,
                allow: Default::default(),
                max_unidentified: 16,
            },
            http: None,
            ssh: None,
            admin_allow: Default::default(),
        }
    }

    #[tokio::test]
    async fn serves_on_given_listeners_until_the_shutdown_future_completes() {
        let hub = crate::testing::hub(Duration::from_secs(60), Duration::from_secs(30), 1 << 20);
        let proxy = TcpListener::bind("127.0.0.1:0").await.expect("proxy");
        let admin = TcpListener::bind("127.0.0.1:0").await.expect("admin");
        let admin_addr = admin.local_addr().expect("admin address");
        let cfg = config(proxy.local_addr().expect("proxy address"), admin_addr);
        let listeners = Listeners {
            proxy,
            admin,
            http: None,
            ssh: None,
            cluster: None,
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(run(hub, cfg, listeners, Vec::new(), async {
            let _ = stopped.await;
        }));

        // The admin door answers on the listener it was given.
        let mut admin = TcpStream::connect(admin_addr).await.expect("connect");
        admin.write_all(b"version\n").await.expect("ask");
        let mut line = String::new();
        BufReader::new(&mut admin)
            .read_line(&mut line)
            .await
            .expect("answer");
        assert!(line.contains("\"version\""), "{line}");

        // Shut down: run returns, and the doors accept no more.
        stop.send(()).expect("the server is running");
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("run returned")
            .expect("no panic")
            .expect("no error");
        assert!(
            TcpStream::connect(admin_addr).await.is_err(),
            "the admin port still accepts after shutdown"
        );
    }
}
