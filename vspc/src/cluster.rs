//! Cluster mode (`--cluster`): this node's view of the cluster and its
//! doors to the other nodes.
//!
//! - The control plane ([`vspc_cluster::registry`], Redis) records which
//!   node holds which VM under which epoch and hands out console ports
//!   unique across the cluster. The hub asks for a port through
//!   [`ClusterHooks::claim`] when a VM identifies; while Redis is down the
//!   registry's outage rule (`offline_claim`) gives one, and the heartbeat
//!   re-asserts what this node holds when Redis is back.
//! - Every node listens on every cluster VM's console port
//!   ([`ClusterPorts`]); a console whose VM another node holds is relayed
//!   over the node link ([`vspc_cluster::link`]) to the holding node, where
//!   it becomes an ordinary console session (`session::open::open`, served
//!   over a pipe): locks, the client limit, raw/telnet detection, audit and
//!   flow control are the holding node's own. A console whose VM moves to
//!   another node (a newer connection there, a vMotion) is re-opened there
//!   by the node that holds the client's socket: the client keeps its
//!   connection.
//!
//! Without `--cluster` none of this exists: the hub's hook is unset and
//! console ports are the single node's own listeners.

use crate::audit::Kind;
use crate::hub::{
    Access, AttachError, ClusterHooks, ConsoleProtocol, HookFuture, Hub, ListenerGuard, LockMode,
    PortOpener, RemoteError, RemoteOpened, RemotePeer, RemoteSpec, RemoteVm, Vm,
};
use crate::metrics::Door;
use crate::net::acceptor::{self, Acceptor, Registration};
use crate::net::conn::{serve_console_over_pipe, PIPE_BYTES};
use crate::net::listen::BACKLOG;
use crate::session::open::{self, Find, History, OpenError, Request};
use bytes::Bytes;
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify};
use vspc_backend_api::VmRecord;
use vspc_cluster::link::{
    Directory, Handed, Incoming, IncomingHandoff, IncomingOpen, Link, LinkConfig, LinkTls,
    OpenRequest, Protocol, Recv, Secret, Stream,
};
use vspc_cluster::registry::{
    Event, HeldVm, NodeEntry, ReassertReport, Registry, RegistryConfig, TakeTicket, VmEntry,
};

/// How long a vMotion destination waits for the source's ticket to show
/// in Redis (the source stores it before it answers GOAHEAD, unless that
/// took longer than [`TICKET_STORE_WAIT`]).
const TICKET_WAIT: Duration = Duration::from_secs(3);

/// How long GOAHEAD waits for the vMotion's ticket to be stored.
const TICKET_STORE_WAIT: Duration = Duration::from_millis(500);

/// The reason a holding node gives when it ends a console because its VM
/// moved to another node: the console's own node re-opens it there.
const MOVED: &str = "vspc:moved";

/// How long the view of the cluster is trusted before it is fetched again.
const REFRESH_EVERY: Duration = Duration::from_secs(1);

/// The least time between two fetches of the view.
const REFRESH_GAP: Duration = Duration::from_millis(50);

/// How long a console whose VM moved waits for the new holder to show.
const MOVE_WAIT: Duration = Duration::from_secs(10);

/// How many times one console follows its VM to another node.
const MAX_MOVES: usize = 64;

/// How long a console following its VM here waits for the node the VM
/// came from to say where the VM's output stood (the hand-off's answer),
/// so that it resumes at its next byte.
const TAKEOVER_WAIT: Duration = Duration::from_secs(2);

/// What cluster mode needs, checked at start-up.
pub struct ClusterSettings {
    /// `--cluster`: `redis://` or `rediss://`.
    pub url: String,
    /// `--cluster-name`.
    pub name: String,
    /// `--node-name`.
    pub node: String,
    /// `--cluster-iface`:`--cluster-port`.
    pub listen: SocketAddr,
    /// `--cluster-advertise`.
    pub advertise: String,
    pub secret: Secret,
    /// The link's TLS (`--cert`/`--key`).
    pub tls: Option<LinkTls>,
    pub port_range_start: u16,
    pub vm_expire: Duration,
    pub vmotion_timeout: Duration,
}

/// The cluster as the last listing showed it.
#[derive(Default)]
struct View {
    vms: Vec<VmEntry>,
    nodes: Vec<NodeEntry>,
    /// When it was fetched.
    at: Option<SystemTime>,
}

/// Counters for `/metrics`.
#[derive(Default)]
struct Counters {
    /// Consoles relayed to another node, opened and refused.
    relayed: AtomicU64,
    relay_failed: AtomicU64,
    /// Consoles that followed their VM to another node.
    followed: AtomicU64,
    /// VMs let go because another node took them.
    taken: AtomicU64,
    /// Cross-node vMotions: completed here (destination), failed here,
    /// and handed to another node (source).
    vmotion_in: AtomicU64,
    vmotion_in_failed: AtomicU64,
    vmotion_out: AtomicU64,
}

/// Cluster mode's settings (`--cluster`), with everything that can fail
/// without Redis checked: the secret file and its mode, the node name, the
/// link's address and TLS files. `None` without `--cluster`.
pub fn settings(cfg: &crate::config::Config) -> Result<Option<ClusterSettings>, String> {
    let Some(url) = &cfg.cluster else {
        return Ok(None);
    };
    let secret_file = cfg.cluster_secret_file.as_deref().ok_or(
        "--cluster needs --cluster-secret-file FILE (the secret every node shares, mode 0600)",
    )?;
    let secret = vspc_cluster::link::Secret::from_file(secret_file)?;
    let node = match &cfg.node_name {
        Some(n) => n.clone(),
        None => {
            let h = std::fs::read_to_string("/proc/sys/kernel/hostname").map_err(|e| {
                format!("cannot read the host name for --node-name: {e}; give --node-name")
            })?;
            h.trim().to_string()
        }
    };
    let iface = cfg.cluster_iface.unwrap_or(cfg.proxy_iface);
    let listen = std::net::SocketAddr::new(iface, cfg.cluster_port);
    let advertise = match &cfg.cluster_advertise {
        Some(a) => {
            check_advertise(a)?;
            a.clone()
        }
        None if iface.is_unspecified() => {
            return Err(format!(
                "the node link listens on the wildcard {iface} (--cluster-iface, or --proxy-iface by default): give --cluster-advertise HOST:PORT, the address other nodes dial to reach this one"
            ))
        }
        None => listen.to_string(),
    };
    let tls = match &cfg.cert {
        Some(cert) => Some(vspc_cluster::link::LinkTls::from_pem(
            cert,
            cfg.key.as_deref(),
        )?),
        None => None,
    };
    Ok(Some(ClusterSettings {
        url: url.clone(),
        name: cfg.cluster_name.clone(),
        node,
        listen,
        advertise,
        secret,
        tls,
        port_range_start: cfg.port_range_start,
        vm_expire: cfg.expire(),
        vmotion_timeout: cfg.vmotion_timeout,
    }))
}

/// `--cluster-advertise` is HOST:PORT with a port that is not 0.
fn check_advertise(a: &str) -> Result<(), String> {
    let bad =
        || format!("--cluster-advertise {a:?} is not HOST:PORT (e.g. vspc-2.example.com:13373)");
    let (host, port) = a.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() || port == 0 {
        return Err(bad());
    }
    Ok(())
}

/// One node's part in the cluster.
pub struct Cluster {
    me: Weak<Cluster>,
    reg: Arc<Registry>,
    link: Link,
    node: String,
    hub: OnceLock<Weak<Hub>>,
    ports: OnceLock<Arc<ClusterPorts>>,
    /// The VMs this node holds: what the heartbeat re-asserts.
    held: Mutex<HashMap<String, HeldVm>>,
    view: Mutex<View>,
    /// VMs let go because they live on another node now (uuid -> when):
    /// their consoles follow them.
    moved: Mutex<HashMap<String, Instant>>,
    /// VMs taken over in a vMotion whose source has not yet said where
    /// their output stood (uuid -> told when it has).
    taking_over: Mutex<HashMap<String, Arc<Notify>>>,
    /// Wakes the view's refresher at once.
    refresh: Notify,
    /// A write-back of what this node holds is pending
    /// ([`Cluster::settle_later`]).
    settling: std::sync::atomic::AtomicBool,
    vmotion_timeout: Duration,
    counters: Counters,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn to_link(p: ConsoleProtocol) -> Protocol {
    match p {
        ConsoleProtocol::Auto => Protocol::Auto,
        ConsoleProtocol::Telnet => Protocol::Telnet,
        ConsoleProtocol::Raw => Protocol::Raw,
    }
}

fn from_link(p: Protocol) -> ConsoleProtocol {
    match p {
        Protocol::Auto => ConsoleProtocol::Auto,
        Protocol::Telnet => ConsoleProtocol::Telnet,
        Protocol::Raw => ConsoleProtocol::Raw,
    }
}

/// Who serves a console port's connection.
enum Holder {
    Here(Arc<Vm>),
    Node {
        node: String,
        uuid: String,
        name: String,
    },
    Nobody,
}

impl Cluster {
    /// Connect to Redis (refusing to start when it cannot: unreachable, bad
    /// credentials, the node name held by a live node, another port range)
    /// and listen for the other nodes.
    pub async fn connect(
        s: ClusterSettings,
    ) -> Result<(Arc<Cluster>, mpsc::Receiver<Incoming>), String> {
        let mut rc =
            RegistryConfig::new(&s.url, &s.name, &s.node, &s.advertise, s.port_range_start);
        rc.vm_expire = s.vm_expire;
        let reg = Registry::connect_with(rc)
            .await
            .map_err(|e| format!("--cluster: {e}"))?;
        let mut lc = LinkConfig::new(&s.name, &s.node, s.secret);
        let tls = s.tls.is_some();
        lc.tls = s.tls;
        let dir: Arc<dyn Directory> = reg.clone();
        let (link, incoming) = Link::new(lc, dir);
        let (bound, _task) = link.listen(s.listen).await.map_err(|e| {
            format!(
                "cannot listen for the other cluster nodes on {} (--cluster-iface, --cluster-port): {e}",
                s.listen
            )
        })?;
        tracing::info!(node = %s.node, cluster = %s.name, link = %bound, advertise = %s.advertise, tls, "cluster node link listening");
        let node = s.node.clone();
        let vmotion_timeout = s.vmotion_timeout;
        let c = Arc::new_cyclic(|me| Cluster {
            me: me.clone(),
            reg,
            link,
            node,
            hub: OnceLock::new(),
            ports: OnceLock::new(),
            held: Mutex::new(HashMap::new()),
            view: Mutex::new(View::default()),
            moved: Mutex::new(HashMap::new()),
            taking_over: Mutex::new(HashMap::new()),
            refresh: Notify::new(),
            settling: std::sync::atomic::AtomicBool::new(false),
            vmotion_timeout,
            counters: Counters::default(),
        });
        Ok((c, incoming))
    }

    /// The console-port opener for the hub in cluster mode (install it
    /// before the hub opens any port).
    pub fn opener(self: &Arc<Self>, interface: IpAddr) -> std::io::Result<Box<dyn PortOpener>> {
        let ports = ClusterPorts::start(self.me.clone(), interface)?;
        let _ = self.ports.set(ports.clone());
        Ok(Box::new(ClusterOpener(ports)))
    }

    /// Start serving: the hub's hook, what this node name held before a
    /// restart, the heartbeat and its events, the other nodes' requests,
    /// and the view's refresher. Runs until the runtime stops.
    pub fn start(self: &Arc<Self>, hub: &Arc<Hub>, incoming: mpsc::Receiver<Incoming>) {
        let _ = self.hub.set(Arc::downgrade(hub));
        let hooks: Arc<dyn ClusterHooks> = self.clone();
        hub.set_cluster(hooks);
        // VMs this node name held before it restarted: ours again,
        // disconnected, with their ports open.
        let inherited = self.reg.inherited();
        if !inherited.is_empty() {
            let records: Vec<VmRecord> = inherited
                .iter()
                .map(|v| VmRecord {
                    uuid: v.uuid.clone(),
                    name: v.name.clone(),
                    port: Some(v.port),
                })
                .collect();
            {
                let mut held = lock(&self.held);
                for v in &inherited {
                    held.insert(v.uuid.clone(), v.to_held());
                }
            }
            hub.preload(records, Instant::now());
        }
        let me = self.me.clone();
        let held_fn: vspc_cluster::registry::HeldFn = Arc::new(move || {
            me.upgrade()
                .map(|c| lock(&c.held).values().cloned().collect())
                .unwrap_or_default()
        });
        let (_beat, events) = self.reg.spawn_heartbeat(held_fn);
        tokio::spawn(self.clone().events(events));
        tokio::spawn(self.clone().serve_incoming(incoming));
        tokio::spawn(self.clone().refresher());
    }

    fn hub(&self) -> Option<Arc<Hub>> {
        self.hub.get().and_then(Weak::upgrade)
    }

    /// Leave the cluster on a clean stop (the node's key goes at once).
    pub async fn leave(&self) {
        if let Err(e) = self.reg.leave().await {
            tracing::info!(error = %e, "could not leave the cluster cleanly; its key expires by itself");
        }
    }

    fn mark_moved(&self, uuid: &str) {
        let mut m = lock(&self.moved);
        let now = Instant::now();
        m.retain(|_, t| now.duration_since(*t) < Duration::from_secs(60));
        m.insert(uuid.to_string(), now);
    }

    fn was_moved(&self, uuid: &str) -> bool {
        lock(&self.moved)
            .get(uuid)
            .is_some_and(|t| t.elapsed() < Duration::from_secs(60))
    }

    /// Another node holds `uuid` now: let go of it here; its consoles
    /// follow it.
    fn lose(&self, uuid: &str, by: &str) {
        lock(&self.held).remove(uuid);
        self.mark_moved(uuid);
        if let Some(hub) = self.hub() {
            if hub
                .let_go(uuid, &format!("the VM connected to node {by}"), true)
                .is_some()
            {
                self.counters.taken.fetch_add(1, Ordering::Relaxed);
                tracing::info!(uuid, node = %by, "VM taken by another node (the newest connection wins); closed its connection here");
            }
        }
        self.refresh.notify_one();
    }

    /// A VM of this node got another port (a conflict lost): its entry
    /// goes; ESXi reconnects and is given the new port.
    fn port_moved(&self, uuid: &str, from: u16, to: u16) {
        if let Some(h) = lock(&self.held).get_mut(uuid) {
            h.port = to;
        }
        if let Some(hub) = self.hub() {
            hub.let_go(
                uuid,
                &format!("the VM's console port moved from {from} to {to} (a cluster conflict was settled); connect to port {to}"),
                false,
            );
        }
        tracing::warn!(
            uuid,
            from,
            to,
            "VM's console port moved (a cluster conflict was settled against it)"
        );
        self.refresh.notify_one();
    }

    async fn events(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<Event>) {
        while let Some(ev) = rx.recv().await {
            match ev {
                Event::RedisDown { detail } => {
                    tracing::warn!(%detail, "cluster: Redis is down; serving what this node holds, locally")
                }
                Event::RedisUp => tracing::info!("cluster: Redis is back"),
                Event::Reasserted(r) => self.apply_report(r),
                Event::VmTaken { uuid, by, epoch } => {
                    let ours = lock(&self.held).get(&uuid).map(|h| h.epoch);
                    if ours.is_none_or(|e| e < epoch) {
                        self.lose(&uuid, &by);
                    }
                }
                Event::PortMoved { uuid, from, to, .. } => self.port_moved(&uuid, from, to),
                Event::Expired(v) => {
                    tracing::info!(vms = v.len(), "cluster: dead nodes' VMs expired")
                }
                Event::NameStolen { instance } => tracing::error!(
                    %instance,
                    "cluster: another vspc registered this node's name; give every node its own --node-name"
                ),
                // A VM new to the cluster on another node: the refresh
                // below opens its console port here now.
                Event::Changed { .. } => {}
                Event::ClockSkew { offset_ms } => {
                    tracing::warn!(offset_ms, "cluster: this node's clock differs from Redis's")
                }
            }
            self.refresh.notify_one();
        }
    }

    /// Act on a re-assertion: VMs another node holds at a newer epoch are
    /// let go; VMs that lost a port conflict move.
    fn apply_report(&self, r: ReassertReport) {
        tracing::info!(
            kept = r.kept,
            lost = r.lost.len(),
            moved = r.moved.len(),
            displaced = r.displaced.len(),
            "cluster: re-asserted this node's VMs"
        );
        for l in r.lost {
            self.lose(&l.uuid, &l.node);
        }
        for m in r.moved {
            self.port_moved(&m.uuid, m.from, m.to);
        }
        for u in r.no_port {
            tracing::error!(uuid = %u, "cluster: no port left for a VM of this node");
        }
    }

    /// A VM was claimed without Redis (it was down, or did not answer in
    /// time): write back everything this node holds as soon as Redis
    /// answers, whether or not the heartbeat saw an outage (one slow call
    /// is not one). All of it at once, so that a VM moved off a conflict
    /// never lands on another of this node's ports; one task at a time.
    fn settle_later(&self) {
        if self.settling.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.me.clone();
        tokio::spawn(async move {
            let mut wait = Duration::from_millis(200);
            loop {
                tokio::time::sleep(wait).await;
                let Some(c) = me.upgrade() else { return };
                // Claims from now on start another round.
                c.settling.store(false, Ordering::Release);
                let held: Vec<HeldVm> = lock(&c.held).values().cloned().collect();
                match c.reg.reassert(&held).await {
                    Ok(r) => {
                        c.apply_report(r);
                        c.refresh.notify_one();
                        return;
                    }
                    Err(_) => {
                        if c.settling.swap(true, Ordering::AcqRel) {
                            // A newer round is under way.
                            return;
                        }
                        wait = (wait * 2).min(Duration::from_secs(5));
                    }
                }
            }
        });
    }

    async fn refresher(self: Arc<Self>) {
        loop {
            let _ = tokio::time::timeout(REFRESH_EVERY, self.refresh.notified()).await;
            self.refresh_now().await;
            // Hints arriving meanwhile wait for one refresh after this
            // gap, however many there are (60 VMs joining at once cost two
            // listings, not sixty).
            tokio::time::sleep(REFRESH_GAP).await;
        }
    }

    /// Fetch the cluster's VMs and nodes, and listen on the ports of the
    /// VMs other nodes hold.
    async fn refresh_now(&self) {
        let (vms, nodes) = match tokio::try_join!(self.reg.list_vms(), self.reg.list_nodes()) {
            Ok(v) => v,
            Err(e) => {
                tracing::debug!(error = %e, "cluster: cannot list the cluster; keeping the last view");
                return;
            }
        };
        let remote: HashSet<u16> = vms
            .iter()
            .filter(|v| v.node != self.node)
            .map(|v| v.port)
            .collect();
        {
            let mut view = lock(&self.view);
            view.vms = vms;
            view.nodes = nodes;
            view.at = Some(SystemTime::now());
        }
        if let Some(p) = self.ports.get() {
            p.set_remote(&remote);
        }
    }

    /// Who serves console port `port`.
    fn holder_of_port(&self, hub: &Hub, port: u16) -> Holder {
        if let Some(vm) = hub.vm_on_port(port) {
            return Holder::Here(vm);
        }
        let view = lock(&self.view);
        match view
            .vms
            .iter()
            .find(|v| v.port == port && v.node != self.node)
        {
            Some(v) => Holder::Node {
                node: v.node.clone(),
                uuid: v.uuid.clone(),
                name: v.name.clone(),
            },
            None => Holder::Nobody,
        }
    }

    /// Who holds `uuid`, asking Redis (the view may be a second old).
    async fn holder_of_uuid(&self, hub: &Hub, uuid: &str) -> Holder {
        if let Some(vm) = hub.find(uuid) {
            return Holder::Here(vm);
        }
        match self.reg.vm(uuid).await {
            Ok(Some(v)) if v.node != self.node => Holder::Node {
                node: v.node,
                uuid: v.uuid,
                name: v.name,
            },
            _ => Holder::Nobody,
        }
    }

    /// A connection to console port `port`: served here if this node holds
    /// the VM, else relayed to the node that does; either way through this
    /// task, which owns the client's socket, so that the console follows
    /// its VM to another node.
    async fn serve_port(self: Arc<Self>, port: u16, tcp: std::net::TcpStream) {
        let Some(hub) = self.hub() else { return };
        let tcp = match TcpStream::from_std(tcp) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(port, "cannot serve a console: {e}");
                return;
            }
        };
        let _ = tcp.set_nodelay(true);
        let cfg = hub.config();
        let spec = Spec {
            mode: LockMode::FreeForAllOrReadOnly,
            protocol: cfg.console_protocol,
            history: if cfg.console_replay {
                History::TelnetOnly
            } else {
                History::None
            },
            door: Kind::ConsolePort,
            client: tcp.peer_addr().ok(),
            user: None,
        };
        let holder = self.holder_of_port(&hub, port);
        let (rd, wr) = tcp.into_split();
        self.serve_client(rd, wr, holder, spec, None, Some(port))
            .await;
    }

    /// Serve a console client (its two halves) as `spec` asks: on this node
    /// while it holds the VM, else relayed to the node that does (over
    /// `opened`, if the relay was opened already), following the VM from
    /// node to node until the client or the console ends.
    async fn serve_client<R, W>(
        self: Arc<Self>,
        mut rd: R,
        mut wr: W,
        mut holder: Holder,
        mut spec: Spec,
        mut opened: Option<Stream>,
        port: Option<u16>,
    ) where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let Some(hub) = self.hub() else { return };
        let mut carry: Option<Bytes> = None;
        let mut uuid: Option<String> = None;
        let mut last_node: Option<String> = None;
        let mut moves = 0;
        // How the client was served, for the session that takes it over
        // when its VM moves (see `ConsoleSession::resume_token`).
        let mut resume: Option<String> = None;
        let mut first: Option<u8> = None;
        loop {
            let ended = match holder {
                Holder::Nobody => {
                    let msg = match (&uuid, port) {
                        (Some(u), _) => format!("vspc: VM {u} is held by no live node now.\r\n"),
                        (None, Some(port)) => {
                            format!("vspc: no VM of the cluster has console port {port}.\r\n")
                        }
                        (None, None) => "vspc: no node of the cluster holds the VM.\r\n".into(),
                    };
                    let _ = wr.write_all(msg.as_bytes()).await;
                    break;
                }
                Holder::Here(vm) => {
                    uuid = Some(vm.uuid.clone());
                    match self.open_here(&hub, &vm, &spec, resume.as_deref()).await {
                        Err(msg) => {
                            let _ = wr.write_all(msg.as_bytes()).await;
                            break;
                        }
                        Ok(mut session) => {
                            // Wherever it follows the VM, the console keeps
                            // what it was granted.
                            spec.mode = LockMode::Keep(session.access());
                            let mut end = Ended::Client;
                            serve_console_over_pipe(&mut session, |pipe| async {
                                end =
                                    pump_pipe(&mut rd, &mut wr, pipe, &mut carry, &mut first).await;
                            })
                            .await;
                            match end {
                                // The session ended from this side: its VM
                                // moved away, or it was cleared, stalled...
                                Ended::Moved(_) if self.was_moved(&vm.uuid) => {
                                    Ended::Moved(session.follow_token())
                                }
                                Ended::Moved(_) => Ended::Closed,
                                e => e,
                            }
                        }
                    }
                }
                Holder::Node {
                    node,
                    uuid: u,
                    name,
                } => {
                    uuid = Some(u.clone());
                    last_node = Some(node.clone());
                    let req = OpenRequest {
                        uuid: u.clone(),
                        mode: spec.encode(resume.as_deref()),
                        protocol: to_link(spec.protocol),
                        client: spec.client.map(|a| a.to_string()).unwrap_or_default(),
                    };
                    let stream = match opened.take() {
                        Some(s) => Ok(s),
                        None => self.link.open(&node, req).await,
                    };
                    match stream {
                        Ok(stream) => {
                            if let Some(a) = Access::parse(stream.granted()) {
                                spec.mode = LockMode::Keep(a);
                            }
                            self.counters.relayed.fetch_add(1, Ordering::Relaxed);
                            tracing::info!(vm = %name, node = %node, "console relayed to the node holding its VM");
                            pump_link(&mut rd, &mut wr, stream, &mut carry, &mut first).await
                        }
                        Err(vspc_cluster::link::LinkError::Refused { reason, .. })
                            if reason == MOVED || reason.contains("not held") =>
                        {
                            Ended::Moved(String::new())
                        }
                        // Following its VM, the console found its node
                        // unreachable: it may show up on another node.
                        Err(e)
                            if moves > 0
                                && !matches!(e, vspc_cluster::link::LinkError::Refused { .. }) =>
                        {
                            tracing::info!(vm = %name, node = %node, error = %e, "console not relayed; waiting for the VM on another node");
                            Ended::Unreachable
                        }
                        Err(e) => {
                            self.counters.relay_failed.fetch_add(1, Ordering::Relaxed);
                            tracing::info!(vm = %name, node = %node, error = %e, "console not relayed");
                            let msg = match e {
                                vspc_cluster::link::LinkError::Refused { reason, .. } => {
                                    format!("vspc: {reason}.\r\n")
                                }
                                e => format!(
                                    "vspc: VM {name} is held by node {node}, which cannot be reached now: {e}.\r\n"
                                ),
                            };
                            let _ = wr.write_all(msg.as_bytes()).await;
                            break;
                        }
                    }
                }
            };
            match ended {
                Ended::Client | Ended::Closed => break,
                Ended::Moved(_) | Ended::Lost | Ended::Unreachable => {
                    moves += 1;
                    let Some(u) = uuid.clone() else { break };
                    if moves > MAX_MOVES {
                        break;
                    }
                    let mut token = next_resume(&ended, resume.take(), first);
                    // A lost link may be a blip: the VM's node is asked
                    // again; one that cannot be reached is not.
                    let old = matches!(ended, Ended::Unreachable)
                        .then(|| last_node.clone())
                        .flatten();
                    holder = self.wait_new_holder(&hub, &u, old.as_deref()).await;
                    if matches!(holder, Holder::Nobody) {
                        let msg = format!("\r\nvspc: lost the node holding VM {u}; it did not come back on another node.\r\n");
                        let _ = wr.write_all(msg.as_bytes()).await;
                        break;
                    }
                    let same_node = matches!(&holder, Holder::Node { node, .. } if Some(node) == last_node.as_ref());
                    if matches!(ended, Ended::Lost | Ended::Unreachable) && same_node {
                        // Back to the node whose link dropped: what it
                        // sent before is not known here, so none of its
                        // past output is given again (no byte twice).
                        token.truncate(token.find('@').unwrap_or(token.len()));
                    }
                    resume = Some(token);
                    self.counters.followed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let _ = wr.shutdown().await;
    }

    /// Once VM `uuid`, taken over here in a vMotion, has its output count
    /// from the node it left (at once if it is not being taken over), or
    /// [`TAKEOVER_WAIT`] passed.
    async fn taken_over(&self, uuid: &str) {
        let Some(told) = lock(&self.taking_over).get(uuid).cloned() else {
            return;
        };
        let wait = told.notified();
        tokio::pin!(wait);
        wait.as_mut().enable();
        // Told between the look above and `enable`: not waiting any more.
        if !lock(&self.taking_over).contains_key(uuid) {
            return;
        }
        if tokio::time::timeout(TAKEOVER_WAIT, wait).await.is_err() {
            tracing::warn!(%uuid, "vMotion: the node the VM left did not say where its output stood; a console following it starts at the VM's arrival here");
        }
    }

    /// After a move: the VM's holder, once Redis names one that serves it
    /// (and is not `not`, the node whose link was lost).
    async fn wait_new_holder(&self, hub: &Hub, uuid: &str, not: Option<&str>) -> Holder {
        let deadline = Instant::now() + MOVE_WAIT;
        // A VM whose node died usually reconnects elsewhere within a few
        // milliseconds: look again soon, then less and less often (every
        // following console asks Redis, so a node's death with thousands
        // of consoles must not become a storm).
        let mut pause = Duration::from_millis(2);
        loop {
            let h = self.holder_of_uuid(hub, uuid).await;
            let stale = match &h {
                Holder::Nobody => true,
                Holder::Node { node, .. } => Some(node.as_str()) == not,
                Holder::Here(_) => false,
            };
            if !stale {
                return h;
            }
            if Instant::now() >= deadline {
                return Holder::Nobody;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }

    /// Open a console session here on `vm`, as a console port would; the
    /// error is what the client is told.
    async fn open_here(
        &self,
        hub: &Arc<Hub>,
        vm: &Arc<Vm>,
        spec: &Spec,
        resume: Option<&str>,
    ) -> Result<crate::session::console::ConsoleSession, String> {
        let resume = resume.filter(|t| !t.is_empty());
        let protocol = match resume {
            // Told apart already: the token says how.
            Some(_) => ConsoleProtocol::Auto,
            None => spec.protocol,
        };
        let history = match resume {
            // `MODE@POSITION`: following the VM (the position, when
            // known, says from which byte); `MODE` alone: taken over with
            // no output given again.
            Some(t) => match t.split_once('@') {
                Some((_, p)) => {
                    let at = crate::hub::replay::Position::parse(p);
                    if at.is_some() {
                        self.taken_over(&vm.uuid).await;
                    }
                    History::Follow(at)
                }
                None => History::None,
            },
            None => spec.history,
        };
        let request = Request {
            vm: Find::Vm(vm.clone()),
            mode: spec.mode,
            protocol,
            history,
            door: spec.door,
            peer: spec.client,
            user: spec.user.clone(),
        };
        match open::open(hub, request).await {
            Ok(opened) => {
                let mut session = opened.session;
                if let Some(t) = resume {
                    session.resume(t);
                }
                if session.access() == Access::ReadOnly
                    && spec.door == Kind::ConsolePort
                    && resume.is_none()
                {
                    session.tell(
                        "vspc: someone holds a write lock on this VM; this console is read-only.\r\n",
                    );
                }
                tracing::info!(vm = %vm.name(), consoles = vm.console_count(), access = session.access().as_str(), "console connected");
                Ok(session)
            }
            Err(e) => {
                tracing::info!(vm = %vm.name(), "console refused: {e}");
                Err(match e {
                    OpenError::Refused(AttachError::Full { .. }) => {
                        format!("vspc: {e}; the VM is full, try again later.\r\n")
                    }
                    _ => format!("vspc: {e}.\r\n"),
                })
            }
        }
    }

    async fn serve_incoming(self: Arc<Self>, mut rx: mpsc::Receiver<Incoming>) {
        while let Some(req) = rx.recv().await {
            let me = self.clone();
            match req {
                Incoming::Open(o) => {
                    tokio::spawn(me.serve_open(o));
                }
                Incoming::Handoff(h) => {
                    tokio::spawn(me.serve_handoff(h));
                }
                Incoming::Log(l) => {
                    tokio::spawn(async move {
                        let log = me.local_log(&l.uuid, l.max).await;
                        l.reply(log.map(Bytes::from));
                    });
                }
            }
        }
    }

    /// A console another node relays to one of this node's VMs.
    async fn serve_open(self: Arc<Self>, o: IncomingOpen) {
        let Some(hub) = self.hub() else {
            o.refuse("the node is stopping");
            return;
        };
        let uuid = o.request.uuid.clone();
        let Some(vm) = hub.find(&uuid) else {
            if self.was_moved(&uuid) {
                o.refuse(MOVED);
            } else {
                o.refuse(&format!("VM {uuid} is not held by node {}", self.node));
            }
            return;
        };
        let client: Option<SocketAddr> = o.request.client.parse().ok();
        let (spec, resume) = Spec::decode(
            &o.request.mode,
            from_link(o.request.protocol),
            client,
            hub.config().console_replay,
        );
        let mut session = match self.open_here(&hub, &vm, &spec, resume.as_deref()).await {
            Ok(s) => s,
            Err(msg) => {
                o.refuse(msg.trim_start_matches("vspc: ").trim_end_matches(".\r\n"));
                return;
            }
        };
        let from = o.from.clone();
        let stream = match o.accept_granting(session.access().as_str()) {
            Ok(s) => s,
            Err(e) => {
                tracing::info!(node = %from, error = %e, "relayed console gone before it started");
                use crate::session::Session;
                session.on_close(Instant::now());
                return;
            }
        };
        tracing::info!(vm = %vm.name(), node = %from, "console relayed from another node");
        let (reader, writer) = stream.split();
        serve_console_over_pipe(&mut session, |pipe| pump_far(pipe, reader, &writer)).await;
        if self.was_moved(&uuid) {
            writer.close(&format!("{MOVED}:{}", session.follow_token()));
        } else {
            let _ = writer.shutdown().await;
            writer.close("the console ended");
        }
    }

    /// A hand-off from another node: either it took one of this node's
    /// VMs over (a vMotion to it: a newer epoch), and this node lets go and
    /// sends it the console input it held; or it is that input, for a VM
    /// this node took over (the epoch this node holds it at).
    async fn serve_handoff(self: Arc<Self>, h: IncomingHandoff) {
        let Some(hub) = self.hub() else {
            h.done(Err("the node is stopping".into()));
            return;
        };
        let ours = lock(&self.held).get(&h.uuid).map(|v| v.epoch);
        if ours == Some(h.epoch) {
            if !h.input.is_empty() && !hub.deliver_held_input(&h.uuid, h.input.clone()) {
                tracing::warn!(uuid = %h.uuid, bytes = h.input.len(), "vMotion: console input held by the source could not be delivered (the VM's connection is gone)");
            }
            h.done(Ok(Handed::default()));
            return;
        }
        if ours.is_some_and(|e| e > h.epoch) {
            let why = format!("node {} holds VM {} at a newer epoch", self.node, h.uuid);
            h.done(Err(why));
            return;
        }
        let input = hub.take_held_input(&h.uuid);
        lock(&self.held).remove(&h.uuid);
        self.mark_moved(&h.uuid);
        let left = hub.let_go(
            &h.uuid,
            &format!("the VM moved to node {} (vMotion)", h.from),
            true,
        );
        // Where its output stood: the consoles it had were given all of
        // it, and follow it to the new node, which goes on counting from
        // here.
        let mut handed = left.map_or_else(Handed::default, |(at, recent)| Handed {
            origin: at.origin,
            said: at.said,
            input: Bytes::new(),
            recent: Bytes::from(recent),
        });
        handed.input = Bytes::from(input);
        self.counters.vmotion_out.fetch_add(1, Ordering::Relaxed);
        tracing::info!(uuid = %h.uuid, node = %h.from, held = handed.input.len(), "vMotion to another node complete; its consoles follow the VM");
        h.done(Ok(handed));
        self.refresh.notify_one();
    }

    /// The recent output of a VM this node holds.
    async fn local_log(&self, uuid: &str, max: usize) -> Option<Vec<u8>> {
        let hub = self.hub()?;
        let vm = hub.find(uuid)?;
        hub.console_log(&vm, max).await
    }

    /// `GET /api/v1/cluster`.
    pub fn describe(&self) -> serde_json::Value {
        let view = lock(&self.view);
        let nodes: Vec<serde_json::Value> = view
            .nodes
            .iter()
            .map(|n| {
                serde_json::json!({
                    "name": n.name,
                    "advertise": n.advertise,
                    "alive": n.alive,
                    "last_heartbeat": crate::doors::http::rfc3339(UNIX_EPOCH + Duration::from_millis(n.last_heartbeat_ms)),
                    "vms": n.vms,
                })
            })
            .collect();
        serde_json::json!({
            "cluster": self.reg.cluster(),
            "node": self.node,
            "redis_up": self.reg.redis_up(),
            "link_peers": self.link.peers(),
            "nodes": nodes,
        })
    }
}

/// How a client asked for a console, wherever its VM is: what the node
/// holding the VM opens the session with.
#[derive(Debug, Clone)]
struct Spec {
    mode: LockMode,
    protocol: ConsoleProtocol,
    /// For the first session (one that follows its VM is given what it
    /// missed instead).
    history: History,
    door: Kind,
    client: Option<SocketAddr>,
    user: Option<String>,
}

impl Spec {
    /// As it travels in a link open's `mode`:
    /// `LOCK;door=KIND;history=inline|telnet|none[;user=HEX][;resume=TOKEN]`.
    fn encode(&self, resume: Option<&str>) -> String {
        let history = match self.history {
            History::Inline | History::Apart => "inline",
            History::TelnetOnly => "telnet",
            History::None | History::Follow(_) => "none",
        };
        let mut m = format!(
            "{};door={};history={history}",
            self.mode.name(),
            self.door.as_str()
        );
        if let Some(u) = &self.user {
            m.push_str(";user=");
            m.push_str(&hex(u.as_bytes()));
        }
        if let Some(t) = resume {
            m.push_str(";resume=");
            m.push_str(t);
        }
        m
    }

    /// The inverse of [`Spec::encode`], and the resume token. A part this
    /// node does not know is ignored; what is missing is what a relayed
    /// console port asks for (free-for-all-or-read-only, history as
    /// `--console-replay` says).
    fn decode(
        mode: &str,
        protocol: ConsoleProtocol,
        client: Option<SocketAddr>,
        console_replay: bool,
    ) -> (Spec, Option<String>) {
        let mut spec = Spec {
            mode: LockMode::FreeForAllOrReadOnly,
            protocol,
            history: if console_replay {
                History::TelnetOnly
            } else {
                History::None
            },
            door: Kind::ConsolePort,
            client,
            user: None,
        };
        let mut resume = None;
        let mut parts = mode.split(';');
        match parts.next() {
            Some("read-only") => spec.mode = LockMode::ReadOnly,
            Some(m) => match m.strip_prefix("keep-").and_then(Access::parse) {
                Some(a) => spec.mode = LockMode::Keep(a),
                None => spec.mode = LockMode::parse(m).unwrap_or(spec.mode),
            },
            None => {}
        }
        for part in parts {
            match part.split_once('=') {
                Some(("door", d)) => spec.door = Kind::parse(d).unwrap_or(spec.door),
                Some(("history", "inline")) => spec.history = History::Inline,
                Some(("history", "telnet")) => spec.history = History::TelnetOnly,
                Some(("history", "none")) => spec.history = History::None,
                Some(("user", u)) => {
                    spec.user = unhex(u).and_then(|b| String::from_utf8(b).ok());
                }
                Some(("resume", t)) => resume = Some(t.to_string()),
                _ => {}
            }
        }
        (spec, resume)
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The resume token for a console's next session after `ended` (its VM
/// moved, or the link to its node was lost): the one the ended session
/// gave; else `MODE@POSITION` from the previous token's mode (or a guess
/// from what the client sent first: IAC is telnet, in binary as this
/// daemon's clients agree to) and its position only if the console was
/// given nothing since (the VM moved again before the console was opened
/// on it). A token without a position still says "following": the new
/// session gives what the VM said since it came to its node.
fn next_resume(ended: &Ended, previous: Option<String>, first: Option<u8>) -> String {
    if let Ended::Moved(t) = ended {
        if !t.is_empty() {
            return t.clone();
        }
    }
    let previous = previous.unwrap_or_default();
    let (mode, at) = previous.split_once('@').unwrap_or((&previous, ""));
    let mode = match (mode, first) {
        ("", Some(crate::wire::IAC)) => "telnet-11",
        ("", Some(_)) => "raw",
        (m, _) => m,
    };
    let at = match ended {
        Ended::Moved(_) => at,
        _ => "",
    };
    format!("{mode}@{at}")
}

/// What ended a console's connection to its serving side.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ended {
    /// The client went.
    Client,
    /// The serving side ended it (cleared, stalled, refused input).
    Closed,
    /// Its VM moved to another node: open it there (resuming the state
    /// the ended session gave, if any).
    Moved(String),
    /// The link to the VM's node was lost: follow the VM (on its node
    /// again, or another one soon).
    Lost,
    /// The VM's node could not be reached while following the VM: wait
    /// for it on another node.
    Unreachable,
}

/// Where a console client's input goes: a local session's pipe, or a link
/// stream to the node holding the VM.
trait Upstream {
    /// Hand `data` on; false once the other side is gone.
    fn send(&mut self, data: Bytes) -> impl std::future::Future<Output = bool> + Send;
    /// The client sends no more.
    fn finish(&mut self) -> impl std::future::Future<Output = ()> + Send;
}

impl Upstream for tokio::io::WriteHalf<tokio::io::DuplexStream> {
    async fn send(&mut self, data: Bytes) -> bool {
        self.write_all(&data).await.is_ok()
    }
    async fn finish(&mut self) {
        // The console reads the end, as from a socket.
        let _ = self.shutdown().await;
    }
}

impl Upstream for &vspc_cluster::link::StreamWriter {
    async fn send(&mut self, data: Bytes) -> bool {
        vspc_cluster::link::StreamWriter::send(self, data)
            .await
            .is_ok()
    }
    async fn finish(&mut self) {
        let _ = self.shutdown().await;
    }
}

/// A console client <-> where it is served: its input goes `to` the
/// serving side, and `down` (the serving side's output to the client)
/// says how the serving side ended. Input read from the client and not
/// yet handed on is left in `carry`, for the next session.
async fn pump<R, U, D>(
    rd: &mut R,
    mut to: U,
    down: D,
    carry: &mut Option<Bytes>,
    first: &mut Option<u8>,
) -> Ended
where
    R: AsyncRead + Unpin,
    U: Upstream,
    D: std::future::Future<Output = Ended>,
{
    // Set while input is being handed on: then it must not be dropped
    // half-sent (see the end).
    let handing = std::sync::atomic::AtomicBool::new(false);
    let up = async {
        let mut buf = vec![0u8; PIPE_BYTES];
        loop {
            // What was read stays in `carry` until the other side has it.
            let data = match carry.clone() {
                Some(b) => b,
                None => match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => {
                        to.finish().await;
                        return true;
                    }
                    Ok(n) => {
                        first.get_or_insert(buf[0]);
                        let b = Bytes::copy_from_slice(&buf[..n]);
                        *carry = Some(b.clone());
                        b
                    }
                },
            };
            handing.store(true, Ordering::Relaxed);
            let sent = to.send(data).await;
            handing.store(false, Ordering::Relaxed);
            if !sent {
                return false;
            }
            *carry = None;
        }
    };
    tokio::pin!(up, down);
    tokio::select! {
        end = &mut down => {
            // Reading the client may be dropped (what it read is in
            // `carry`); handing input on ends soon, the other side gone.
            if handing.load(Ordering::Relaxed) {
                let _ = tokio::time::timeout(Duration::from_millis(200), &mut up).await;
            }
            end
        }
        client_gone = &mut up => {
            // The client sends no more: its output goes on until the
            // serving side ends.
            let end = down.await;
            if client_gone {
                Ended::Client
            } else {
                end
            }
        }
    }
}

/// Client socket <-> a local console session's pipe, until either ends.
async fn pump_pipe<R, W>(
    rd: &mut R,
    wr: &mut W,
    pipe: tokio::io::DuplexStream,
    carry: &mut Option<Bytes>,
    first: &mut Option<u8>,
) -> Ended
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (mut from_console, to_console) = tokio::io::split(pipe);
    let down = async {
        let mut buf = vec![0u8; PIPE_BYTES];
        loop {
            match from_console.read(&mut buf).await {
                // The session ended from its side (its VM moved away, or
                // it was cleared, stalled...).
                Ok(0) | Err(_) => return Ended::Moved(String::new()),
                Ok(n) => {
                    if wr.write_all(&buf[..n]).await.is_err() {
                        return Ended::Client;
                    }
                }
            }
        }
    };
    pump(rd, to_console, down, carry, first).await
}

/// Client socket <-> a link stream to the holding node.
async fn pump_link<R, W>(
    rd: &mut R,
    wr: &mut W,
    stream: Stream,
    carry: &mut Option<Bytes>,
    first: &mut Option<u8>,
) -> Ended
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (mut reader, writer) = stream.split();
    let down = async {
        loop {
            match reader.recv().await {
                Recv::Data(b) => {
                    if wr.write_all(&b).await.is_err() {
                        return Ended::Client;
                    }
                }
                Recv::Eof => return Ended::Closed,
                Recv::Closed(r) if r.starts_with(MOVED) => {
                    let token = r.strip_prefix(MOVED).unwrap_or_default();
                    return Ended::Moved(token.trim_start_matches(':').to_string());
                }
                // The link to the node died (the node with it, maybe):
                // the VM may come back on another node.
                Recv::Closed(_) => return Ended::Lost,
            }
        }
    };
    let end = pump(rd, &writer, down, carry, first).await;
    writer.close("the console ended");
    end
}

/// The holding node's end: a relayed console's pipe <-> its link stream.
async fn pump_far(
    pipe: tokio::io::DuplexStream,
    mut reader: vspc_cluster::link::StreamReader,
    writer: &vspc_cluster::link::StreamWriter,
) {
    let (mut from_console, mut to_console) = tokio::io::split(pipe);
    let up = async {
        loop {
            match reader.recv().await {
                Recv::Data(b) => {
                    if to_console.write_all(&b).await.is_err() {
                        return;
                    }
                }
                Recv::Eof | Recv::Closed(_) => {
                    let _ = to_console.shutdown().await;
                    return;
                }
            }
        }
    };
    let down = async {
        let mut buf = vec![0u8; PIPE_BYTES];
        loop {
            match from_console.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if writer
                        .send(Bytes::copy_from_slice(&buf[..n]))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    };
    tokio::pin!(up, down);
    tokio::select! {
        _ = &mut down => {}
        _ = &mut up => { down.await; }
    }
}

impl ClusterHooks for Cluster {
    fn node(&self) -> &str {
        &self.node
    }

    fn claim(
        &self,
        uuid: &str,
        name: &str,
        preferred: Option<u16>,
    ) -> HookFuture<Result<u16, String>> {
        let (uuid, name) = (uuid.to_string(), name.to_string());
        let me = self.me.clone();
        Box::pin(async move {
            let c = me.upgrade().ok_or("the node is stopping")?;
            lock(&c.moved).remove(&uuid);
            match c.reg.claim_vm(&uuid, &name, preferred).await {
                Ok(claim) => {
                    lock(&c.held).insert(uuid.clone(), HeldVm::from_claim(&uuid, &name, &claim));
                    c.refresh.notify_one();
                    Ok(claim.port)
                }
                Err(e) if e.is_unavailable() => {
                    // Redis is down: the port it has here, else the
                    // registry's outage rule.
                    let mut held = lock(&c.held);
                    if let Some(h) = held.get_mut(&uuid) {
                        if preferred.is_none_or(|p| p == h.port) {
                            h.connected = true;
                            h.disconnected_since_ms = 0;
                            tracing::info!(
                                uuid,
                                port = h.port,
                                "Redis is down: the VM keeps its port here, to re-assert later"
                            );
                            let port = h.port;
                            drop(held);
                            c.settle_later();
                            return Ok(port);
                        }
                    }
                    let hub = c.hub();
                    let remote = c.ports.get().cloned();
                    let in_use = move |p: u16| {
                        hub.as_ref().is_some_and(|h| h.port_in_use(p))
                            || remote.as_ref().is_some_and(|r| r.is_remote(p))
                    };
                    let claim = c.reg.offline_claim(&in_use).ok_or_else(|| {
                        format!("Redis is down and no console port is free here: {e}")
                    })?;
                    tracing::info!(
                        uuid,
                        port = claim.port,
                        "Redis is down: provisional port, re-asserted when Redis is back"
                    );
                    held.insert(uuid.clone(), HeldVm::from_claim(&uuid, &name, &claim));
                    drop(held);
                    c.settle_later();
                    Ok(claim.port)
                }
                Err(e) => Err(e.to_string()),
            }
        })
    }

    fn disconnected(&self, uuid: &str) {
        let epoch = {
            let mut held = lock(&self.held);
            let Some(h) = held.get_mut(uuid) else { return };
            h.connected = false;
            h.disconnected_since_ms = now_ms();
            h.epoch
        };
        let reg = self.reg.clone();
        let uuid = uuid.to_string();
        tokio::spawn(async move {
            if let Err(e) = reg.mark_disconnected(&uuid, epoch).await {
                tracing::debug!(%uuid, error = %e, "cluster: disconnect not recorded (re-asserted later)");
            }
        });
    }

    fn renamed(&self, uuid: &str, name: &str) {
        let epoch = {
            let mut held = lock(&self.held);
            let Some(h) = held.get_mut(uuid) else { return };
            h.name = name.to_string();
            h.epoch
        };
        let (reg, uuid, name) = (self.reg.clone(), uuid.to_string(), name.to_string());
        tokio::spawn(async move {
            let _ = reg.rename(&uuid, epoch, &name).await;
        });
    }

    fn expired(&self, uuid: &str) {
        let Some(h) = lock(&self.held).remove(uuid) else {
            return;
        };
        let (reg, uuid) = (self.reg.clone(), uuid.to_string());
        let refresh = self.me.clone();
        tokio::spawn(async move {
            let _ = reg.expire(&uuid, h.epoch).await;
            if let Some(c) = refresh.upgrade() {
                c.refresh.notify_one();
            }
        });
    }

    fn vmotion_begun(&self, uuid: &str, seq: &[u8], secret: &[u8]) -> HookFuture<()> {
        let (reg, uuid, seq, secret) = (
            self.reg.clone(),
            uuid.to_string(),
            seq.to_vec(),
            secret.to_vec(),
        );
        let ttl = self.vmotion_timeout;
        // Stored before GOAHEAD goes out, so the destination's PEER, which
        // ESXi sends only after the source has GOAHEAD, finds it on any
        // node at the first look. Bounded: with Redis slow or down GOAHEAD
        // goes out anyway (a destination on this node needs no ticket).
        let store = tokio::spawn(async move {
            if let Err(e) = reg.put_ticket(&seq, &secret, &uuid, ttl).await {
                tracing::warn!(%uuid, error = %e, "cluster: vMotion ticket not stored; a destination on another node will not be recognised");
            }
        });
        Box::pin(async move {
            if tokio::time::timeout(TICKET_STORE_WAIT, store)
                .await
                .is_err()
            {
                tracing::warn!("cluster: storing a vMotion ticket takes more than {TICKET_STORE_WAIT:?}; GOAHEAD sent without waiting for it");
            }
        })
    }

    fn vmotion_ended(&self, uuid: &str, seq: &[u8]) {
        let (reg, uuid, seq) = (self.reg.clone(), uuid.to_string(), seq.to_vec());
        tokio::spawn(async move {
            let _ = reg.drop_ticket(&seq, &uuid).await;
        });
    }

    fn remote_peer(&self, cookie: &[u8]) -> HookFuture<Result<Option<RemotePeer>, String>> {
        let reg = self.reg.clone();
        let cookie = cookie.to_vec();
        let node = self.node.clone();
        Box::pin(async move {
            // The cookie is the sequence and an 8-byte secret.
            if cookie.len() <= crate::hub::SECRET_LEN {
                return Ok(None);
            }
            let (seq, secret) = cookie.split_at(cookie.len() - crate::hub::SECRET_LEN);
            let deadline = Instant::now() + TICKET_WAIT;
            loop {
                match reg
                    .take_ticket(seq, secret)
                    .await
                    .map_err(|e| e.to_string())?
                {
                    TakeTicket::Taken(t) if t.node == node => return Ok(None),
                    TakeTicket::Taken(t) => {
                        return Ok(Some(RemotePeer {
                            uuid: t.uuid,
                            node: t.node,
                            seq: seq.to_vec(),
                        }))
                    }
                    TakeTicket::WrongSecret => return Ok(None),
                    TakeTicket::Unknown if Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(5)).await
                    }
                    TakeTicket::Unknown => return Ok(None),
                }
            }
        })
    }

    fn claim_moved(&self, uuid: &str) -> HookFuture<Result<(String, u16), String>> {
        let me = self.me.clone();
        let uuid = uuid.to_string();
        Box::pin(async move {
            let c = me.upgrade().ok_or("the node is stopping")?;
            let entry = c
                .reg
                .vm(&uuid)
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("VM {uuid} has no record in the cluster"))?;
            let claim = c
                .reg
                .claim_vm(&uuid, &entry.name, Some(entry.port))
                .await
                .map_err(|e| e.to_string())?;
            lock(&c.moved).remove(&uuid);
            lock(&c.held).insert(uuid.clone(), HeldVm::from_claim(&uuid, &entry.name, &claim));
            Ok((entry.name, claim.port))
        })
    }

    fn took_over(&self, uuid: &str, from: &str) {
        let Some(epoch) = lock(&self.held).get(uuid).map(|h| h.epoch) else {
            return;
        };
        let told = Arc::new(Notify::new());
        lock(&self.taking_over).insert(uuid.to_string(), told.clone());
        let (link, uuid, from) = (self.link.clone(), uuid.to_string(), from.to_string());
        let me = self.me.clone();
        tokio::spawn(async move {
            let result = link.handoff(&from, &uuid, epoch, Bytes::new()).await;
            let Some(c) = me.upgrade() else { return };
            match result {
                Ok(handed) => {
                    // The input held since GOAHEAD goes to the VM first;
                    // where its output stood on the node it left, and its
                    // last bytes: consoles following it go on from there
                    // (they wait for this, so their input comes after).
                    if let Some(hub) = c.hub() {
                        if !handed.input.is_empty()
                            && !hub.deliver_held_input(&uuid, handed.input.clone())
                        {
                            tracing::warn!(%uuid, bytes = handed.input.len(), "vMotion: console input held by the source could not be delivered (the VM's connection is gone)");
                        }
                        let at = crate::hub::replay::Position {
                            origin: handed.origin,
                            said: handed.said,
                        };
                        hub.adopt_output(&uuid, at, &handed.recent);
                    }
                    c.counters.vmotion_in.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(%uuid, source = %from, "vMotion from another node complete; the VM lives here now")
                }
                Err(e) => {
                    c.counters.vmotion_in_failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%uuid, source = %from, error = %e, "vMotion: the source node did not let go (it is told by the control plane)")
                }
            }
            {
                let mut waiting = lock(&c.taking_over);
                if waiting.get(&uuid).is_some_and(|t| Arc::ptr_eq(t, &told)) {
                    waiting.remove(&uuid);
                }
            }
            told.notify_waiters();
            c.refresh.notify_one();
        });
    }

    fn remote_vms(&self) -> Vec<RemoteVm> {
        lock(&self.view)
            .vms
            .iter()
            .filter(|v| v.node != self.node)
            .map(|v| RemoteVm {
                record: VmRecord {
                    uuid: v.uuid.clone(),
                    name: v.name.clone(),
                    port: Some(v.port),
                },
                node: v.node.clone(),
                connected: v.connected,
            })
            .collect()
    }

    fn describe(&self) -> serde_json::Value {
        Cluster::describe(self)
    }

    fn metrics_text(&self) -> String {
        let view = lock(&self.view);
        let alive = view.nodes.iter().filter(|n| n.alive).count();
        drop(view);
        let l = self.link.stats();
        let c = &self.counters;
        let s = self.reg.stats();
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, rows: &[(&str, u64)]| {
            out.push_str(&format!(
                "# HELP vspc_{name} {help}\n# TYPE vspc_{name} {kind}\n"
            ));
            for (labels, v) in rows {
                out.push_str(&format!("vspc_{name}{labels} {v}\n"));
            }
        };
        metric(
            "cluster_nodes",
            "gauge",
            "Live nodes of the cluster.",
            &[("", alive as u64)],
        );
        metric(
            "cluster_redis_up",
            "gauge",
            "Whether the last call to Redis answered.",
            &[("", u64::from(s.redis_up))],
        );
        metric(
            "cluster_link_bytes_total",
            "counter",
            "Console bytes over the node link.",
            &[
                ("{direction=\"out\"}", l.bytes_out),
                ("{direction=\"in\"}", l.bytes_in),
            ],
        );
        metric(
            "cluster_link_connections",
            "gauge",
            "Node link connections open.",
            &[("", l.connections as u64)],
        );
        metric(
            "cluster_consoles_relayed_total",
            "counter",
            "Consoles relayed to the node holding their VM, by outcome.",
            &[
                ("{outcome=\"opened\"}", c.relayed.load(Ordering::Relaxed)),
                (
                    "{outcome=\"failed\"}",
                    c.relay_failed.load(Ordering::Relaxed),
                ),
                ("{outcome=\"followed\"}", c.followed.load(Ordering::Relaxed)),
            ],
        );
        metric(
            "cluster_vmotions_total",
            "counter",
            "Cross-node vMotions, by outcome (destination side: completed or failed here; source side: moved away; refused PEERs).",
            &[
                ("{outcome=\"completed_here\"}", c.vmotion_in.load(Ordering::Relaxed)),
                ("{outcome=\"failed_here\"}", c.vmotion_in_failed.load(Ordering::Relaxed)),
                ("{outcome=\"moved_away\"}", c.vmotion_out.load(Ordering::Relaxed)),
                ("{outcome=\"ticket_wrong_secret\"}", s.tickets_wrong_secret),
                ("{outcome=\"ticket_unknown\"}", s.tickets_unknown),
            ],
        );
        metric(
            "cluster_vms_taken_total",
            "counter",
            "VMs let go because another node took them.",
            &[("", c.taken.load(Ordering::Relaxed))],
        );
        out
    }

    fn remote_log(&self, uuid: &str, max: usize) -> HookFuture<Result<Option<Vec<u8>>, String>> {
        let me = self.me.clone();
        let uuid = uuid.to_string();
        Box::pin(async move {
            let c = me.upgrade().ok_or("the node is stopping")?;
            let node = {
                let view = lock(&c.view);
                view.vms
                    .iter()
                    .find(|v| v.uuid == uuid && v.node != c.node)
                    .map(|v| v.node.clone())
            };
            let Some(node) = node else { return Ok(None) };
            c.link
                .console_log(&node, &uuid, max)
                .await
                .map(|o| o.map(|b| b.to_vec()))
                .map_err(|e| e.to_string())
        })
    }

    fn open_remote(
        &self,
        what: &str,
        spec: RemoteSpec,
    ) -> HookFuture<Result<RemoteOpened, RemoteError>> {
        let me = self.me.clone();
        let what = what.to_string();
        Box::pin(async move {
            let c = me
                .upgrade()
                .ok_or_else(|| RemoteError::Refused("the node is stopping".into()))?;
            let vm = crate::hub::find_remote(ClusterHooks::remote_vms(&*c), &what)?;
            let spec = Spec {
                mode: spec.mode,
                protocol: spec.protocol,
                history: if spec.history {
                    History::Inline
                } else {
                    History::None
                },
                door: Kind::parse(spec.door).unwrap_or(Kind::AdminNative),
                client: spec.client,
                user: spec.user,
            };
            let req = OpenRequest {
                uuid: vm.record.uuid.clone(),
                mode: spec.encode(None),
                protocol: to_link(spec.protocol),
                client: spec.client.map(|a| a.to_string()).unwrap_or_default(),
            };
            let name = vm.record.name.clone();
            let stream = c.link.open(&vm.node, req).await.map_err(|e| {
                c.counters.relay_failed.fetch_add(1, Ordering::Relaxed);
                RemoteError::Refused(match e {
                    vspc_cluster::link::LinkError::Refused { reason, .. } => reason,
                    e => format!(
                        "VM {name} is held by node {}, which cannot be reached now: {e}",
                        vm.node
                    ),
                })
            })?;
            c.counters.relayed.fetch_add(1, Ordering::Relaxed);
            // The holder names the lock it granted; an older answer without
            // it is taken for the least.
            let access = Access::parse(stream.granted()).unwrap_or(Access::ReadOnly);
            tracing::info!(vm = %name, node = %vm.node, door = spec.door.as_str(), access = access.as_str(), "console relayed to the node holding its VM");
            let (door_end, ours) = tokio::io::duplex(PIPE_BYTES);
            let (rd, wr) = tokio::io::split(ours);
            let holder = Holder::Node {
                node: vm.node.clone(),
                uuid: vm.record.uuid.clone(),
                name,
            };
            tokio::spawn(
                c.clone()
                    .serve_client(rd, wr, holder, spec, Some(stream), None),
            );
            Ok(RemoteOpened {
                vm,
                access,
                pipe: door_end,
            })
        })
    }
}

/// Every console port of the cluster on this node: one listener per port,
/// whether a local VM holds it (served here) or another node's VM (relayed),
/// so a VM moving between nodes never leaves its port closed.
pub struct ClusterPorts {
    interface: IpAddr,
    acceptor: Acceptor<u16>,
    map: Mutex<HashMap<u16, PortEntry>>,
    /// Ports that could not be opened for remote VMs (logged once each).
    failed: Mutex<HashSet<u16>>,
}

struct PortEntry {
    _listener: Registration<u16>,
    local: bool,
    remote: bool,
}

impl ClusterPorts {
    fn start(cluster: Weak<Cluster>, interface: IpAddr) -> std::io::Result<Arc<ClusterPorts>> {
        let rt = tokio::runtime::Handle::current();
        let acceptor = Acceptor::start(Door::Console.port_name(), move |port: &u16, tcp| {
            if let Some(c) = cluster.upgrade() {
                if let Some(hub) = c.hub() {
                    hub.metrics().accepted(Door::Console);
                }
                rt.spawn(c.serve_port(*port, tcp));
            }
        })?;
        Ok(Arc::new(ClusterPorts {
            interface,
            acceptor,
            map: Mutex::new(HashMap::new()),
            failed: Mutex::new(HashSet::new()),
        }))
    }

    fn listen(&self, port: u16) -> std::io::Result<Registration<u16>> {
        let l = acceptor::listen_std(SocketAddr::new(self.interface, port), BACKLOG)?;
        self.acceptor.add(l, port)
    }

    fn is_remote(&self, port: u16) -> bool {
        lock(&self.map).get(&port).is_some_and(|e| e.remote)
    }

    /// Listen on exactly these ports for other nodes' VMs (and no longer
    /// on the others, unless a local VM holds them).
    fn set_remote(&self, ports: &HashSet<u16>) {
        let mut map = lock(&self.map);
        map.retain(|p, e| {
            e.remote = ports.contains(p);
            e.local || e.remote
        });
        for &p in ports {
            if let Some(e) = map.get_mut(&p) {
                e.remote = true;
                continue;
            }
            match self.listen(p) {
                Ok(r) => {
                    lock(&self.failed).remove(&p);
                    map.insert(
                        p,
                        PortEntry {
                            _listener: r,
                            local: false,
                            remote: true,
                        },
                    );
                }
                Err(e) => {
                    if lock(&self.failed).insert(p) {
                        tracing::warn!(port = p, error = %e, "cannot listen on another node's VM's console port here");
                    }
                }
            }
        }
    }
}

/// The hub's opener in cluster mode.
struct ClusterOpener(Arc<ClusterPorts>);

/// A local VM's hold on its port: the listener stays while another node's
/// VM needs it.
struct LocalPort {
    ports: Weak<ClusterPorts>,
    port: u16,
}

impl Drop for LocalPort {
    fn drop(&mut self) {
        if let Some(p) = self.ports.upgrade() {
            let mut map = lock(&p.map);
            if let Some(e) = map.get_mut(&self.port) {
                e.local = false;
                if !e.remote {
                    map.remove(&self.port);
                }
            }
        }
    }
}

impl PortOpener for ClusterOpener {
    fn open(&self, _vm: Arc<Vm>, port: u16) -> std::io::Result<ListenerGuard> {
        let mut map = lock(&self.0.map);
        match map.get_mut(&port) {
            Some(e) if e.local => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    "a VM here holds the port",
                ))
            }
            Some(e) => e.local = true,
            None => {
                let r = self.0.listen(port)?;
                map.insert(
                    port,
                    PortEntry {
                        _listener: r,
                        local: true,
                        remote: false,
                    },
                );
            }
        }
        Ok(ListenerGuard(Box::new(LocalPort {
            ports: Arc::downgrade(&self.0),
            port,
        })))
    }

    fn accept_errors(&self) -> u64 {
        self.0.acceptor.errors()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_following_console_carries_its_mode_and_position_only_while_they_hold() {
        let iac = Some(crate::wire::IAC);
        // The ended session's own token wins.
        let moved = Ended::Moved("telnet-11@ab.42".into());
        assert_eq!(next_resume(&moved, None, iac), "telnet-11@ab.42");
        // Moved before it was opened on the VM's node: it was given nothing
        // since its last token, so that position still holds.
        let early = Ended::Moved(String::new());
        assert_eq!(
            next_resume(&early, Some("raw@ab.42".into()), iac),
            "raw@ab.42"
        );
        // A lost link: output was given since, so the position goes.
        assert_eq!(
            next_resume(&Ended::Lost, Some("telnet-10@ab.42".into()), None),
            "telnet-10@"
        );
        assert_eq!(
            next_resume(&Ended::Unreachable, Some("raw@ab.1".into()), iac),
            "raw@"
        );
        // No session ever told the client apart: a guess from its first
        // byte, or nothing.
        assert_eq!(next_resume(&Ended::Lost, None, iac), "telnet-11@");
        assert_eq!(next_resume(&Ended::Lost, None, Some(b'x')), "raw@");
        assert_eq!(next_resume(&Ended::Lost, None, None), "@");
        assert_eq!(next_resume(&early, Some("@ab.3".into()), None), "@ab.3");
    }

    #[test]
    fn a_console_spec_travels_whole_and_odd_parts_fall_back() {
        let spec = Spec {
            mode: LockMode::Keep(Access::Write),
            protocol: ConsoleProtocol::Raw,
            history: History::Inline,
            door: Kind::Ssh,
            client: None,
            user: Some("alice; SHA256:x=y".into()),
        };
        let wire = spec.encode(Some("telnet-11@ab.3"));
        assert!(
            !wire.contains("alice"),
            "the user travels hex-encoded: {wire}"
        );
        let (back, resume) = Spec::decode(&wire, ConsoleProtocol::Raw, None, false);
        assert_eq!(back.mode, LockMode::Keep(Access::Write));
        assert_eq!(back.history, History::Inline);
        assert_eq!(back.door, Kind::Ssh);
        assert_eq!(back.user.as_deref(), Some("alice; SHA256:x=y"));
        assert_eq!(resume.as_deref(), Some("telnet-11@ab.3"));
        // What an older relay sent, and nonsense: a console port's defaults.
        for odd in ["free_for_all_or_readonly", "", "bogus;door=nope;user=zz;x"] {
            let (d, r) = Spec::decode(odd, ConsoleProtocol::Auto, None, true);
            assert_eq!(d.mode, LockMode::FreeForAllOrReadOnly, "{odd}");
            assert_eq!(d.door, Kind::ConsolePort, "{odd}");
            assert_eq!(d.history, History::TelnetOnly, "{odd}");
            assert_eq!((d.user, r), (None, None), "{odd}");
        }
    }
}
