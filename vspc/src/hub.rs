//! The registry of VMs: key -> entry (name, port, VM connection, consoles,
//! pending vMotion, idle-since). Port allocation and expiry live here.
//!
//! Locks are taken in one order only: the registry, then a VM's state, then
//! the vMotion table. Console fan-out takes just the VM's own lock, so VMs
//! never contend with each other. Nothing here touches a socket: connections
//! are [`Peer`]s (an id and an [`Outbox`]), and console listeners are opened
//! through the [`PortOpener`] the network layer installs.
//!
//! Fan-out is where the flow-control rules are decided ([`Hub::vm_output`]):
//! every console gets every chunk; a console past an eighth of its queue
//! makes the VM's reader wait for it while it reads at least
//! [`LAG_PROGRESS`] per [`LAG_WAIT`] (or, if only the daemon is behind, up
//! to [`BUSY_WAIT`]); a lossless backend over its byte budget makes the
//! reader wait until it has caught up.

use crate::backend_host::Backends;
use crate::metrics::{Disconnect, Metrics, Vmotion};
use crate::outbox::{Encoding, Outbox};
use crate::session::WaitFuture;
use bytes::Bytes;
use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime};
use vspc_backend_api::ffi::FfiRecord;
use vspc_backend_api::VmRecord;

/// Identifies one connection for the life of the process.
pub type ConnId = u64;

/// A connection as the hub sees it.
#[derive(Debug, Clone)]
pub struct Peer {
    pub id: ConnId,
    pub outbox: Arc<Outbox>,
}

/// Opens console listeners; implemented by the network layer.
pub trait PortOpener: Send + Sync {
    /// Listen on `port` and serve consoles of `vm`. The returned guard stops
    /// the listener (and frees the port) when dropped.
    fn open(&self, vm: Arc<Vm>, port: u16) -> std::io::Result<ListenerGuard>;

    /// Failed accepts on the console ports so far.
    fn accept_errors(&self) -> u64 {
        0
    }
}

/// Stops a console listener when dropped (whatever the opener put inside
/// closes it on drop).
pub struct ListenerGuard(pub Box<dyn Send + Sync>);

/// Settings the hub needs.
#[derive(Debug, Clone)]
pub struct HubConfig {
    pub port_range_start: u16,
    /// Open per-VM console ports at all (`--no-vm-ports` turns this off).
    pub vm_ports: bool,
    pub interface: IpAddr,
    pub expire: Duration,
    pub vmotion_timeout: Duration,
    pub client_limit: Option<usize>,
    /// Bytes of output a console may be behind before the oldest is skipped.
    pub console_queue: usize,
    /// How a console port's client is served (telnet, raw, or told apart).
    pub console_protocol: ConsoleProtocol,
    /// A console whose socket takes nothing for this long while output
    /// waits is disconnected (`None`: never).
    pub console_stall: Option<Duration>,
}

/// How console clients are served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ConsoleProtocol {
    /// Tell telnet clients and raw clients apart by what they send first.
    Auto,
    /// Always telnet: negotiate at once, escape 0xFF, parse IAC.
    Telnet,
    /// Always raw: bytes pass untouched both ways; no negotiation.
    Raw,
}

/// How long a VM's reader waits for a lagging console before it looks at
/// how that console is doing, and so the longest it waits for one that
/// cannot keep up. A second is long enough that a client sharing a busy
/// machine (thousands of sockets, every core taken) shows its real rate
/// rather than a scheduling hiccup, and short enough that a guest printing
/// to its serial port barely notices.
pub const LAG_WAIT: Duration = Duration::from_secs(1);

/// A lagging console that takes at least this much output from its socket
/// per [`LAG_WAIT`] (320 KiB/s) is reading, and the VM keeps waiting for it;
/// one that takes less, while its socket is full, cannot keep up and is
/// given up on. So no console slows a VM below 320 KiB/s, some 28 times
/// what a 115,200-baud serial line carries, and a console that reads at
/// least that fast never loses a byte, however busy the daemon or the
/// machine the client runs on.
pub const LAG_PROGRESS: u64 = 320 * 1024;

/// The longest a VM's reader waits for lagging consoles whose sockets take
/// everything the daemon writes: then the lag is the daemon's own (every
/// core busy), not the client's. Past this the console is given up on all
/// the same.
pub const BUSY_WAIT: Duration = Duration::from_secs(5);

/// What became of a VM's output.
pub enum Fanout {
    /// The connection no longer carries the VM: nothing was sent.
    Retired,
    /// Sent; read on.
    Sent,
    /// Sent; wait for this before reading more.
    Wait(WaitFuture),
}

/// Console input held during a vMotion, at most.
const HELD_LIMIT: usize = 1 << 20;

/// One VM serial port as the hub knows it.
pub struct Vm {
    /// Registry key: 32 hex digits of the VC UUID (plus `_uri` with
    /// multi-console).
    pub key: String,
    /// The uuid as admin listings show it (vSPC.py's form).
    pub uuid: String,
    /// The console port; fixed for the life of the entry.
    pub port: Option<u16>,
    /// Serial output bytes read from the VM (for the HTTP API and the
    /// metrics: one relaxed add per read, no lock).
    bytes_out: AtomicU64,
    /// Console input bytes accepted for the VM.
    bytes_in: AtomicU64,
    state: Mutex<VmState>,
}

/// One VM as the HTTP API shows it.
#[derive(Debug, Clone)]
pub struct VmStatus {
    /// Name, uuid and port, as the admin listing has them.
    pub record: VmRecord,
    /// An ESXi connection carries the VM now.
    pub vm_connected: bool,
    /// Since when the current ESXi connection carries the VM (kept across
    /// a vMotion).
    pub connected_since: Option<SystemTime>,
    /// Where the VM's current connection comes from.
    pub peer: Option<SocketAddr>,
    /// Consoles attached now.
    pub consoles: usize,
    /// Serial output read from the VM since the entry was made.
    pub bytes_from_vm: u64,
    /// Console input accepted for the VM since the entry was made.
    pub bytes_to_vm: u64,
}

struct VmState {
    name: String,
    /// The record as backends get it with console data, kept so that
    /// output costs no string copies.
    rec: Arc<FfiRecord>,
    /// The connection from ESXi that currently carries this serial port.
    active: Option<Peer>,
    consoles: Vec<Console>,
    /// Cookie of the pending vMotion, if any.
    vmotion: Option<Vec<u8>>,
    /// Console input held while a vMotion is pending (escaped).
    held: Vec<Bytes>,
    held_bytes: usize,
    /// Since when nothing is connected; `None` while anything is.
    idle_since: Option<Instant>,
    /// The console listener; dropping it closes the port.
    listener: Option<ListenerGuard>,
    /// When the VM's connection attached (`None` while not connected).
    connected_since: Option<SystemTime>,
    /// The address the VM's current connection comes from, as the network
    /// layer saw it at accept.
    peer_addr: Option<SocketAddr>,
    /// Removed from the registry (expired); late arrivals are turned away.
    gone: bool,
}

impl Vm {
    fn lock(&self) -> MutexGuard<'_, VmState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The VM's current name.
    pub fn name(&self) -> String {
        self.lock().name.clone()
    }

    fn set_name(&self, st: &mut VmState, name: String) -> String {
        st.rec = Arc::new(FfiRecord {
            uuid: self.uuid.as_str().into(),
            name: name.as_str().into(),
            port: self.port.into(),
        });
        std::mem::replace(&mut st.name, name)
    }

    /// The record backends and listings see.
    pub fn record(&self) -> VmRecord {
        VmRecord {
            uuid: self.uuid.clone(),
            name: self.name(),
            port: self.port,
        }
    }

    /// Number of consoles attached.
    pub fn console_count(&self) -> usize {
        self.lock().consoles.len()
    }

    /// True while an ESXi connection carries this port.
    pub fn vm_connected(&self) -> bool {
        self.lock().active.is_some()
    }

    /// Serial output bytes read from this VM so far.
    pub fn bytes_from_vm(&self) -> u64 {
        self.bytes_out.load(Ordering::Relaxed)
    }

    /// Console input bytes accepted for this VM so far.
    pub fn bytes_to_vm(&self) -> u64 {
        self.bytes_in.load(Ordering::Relaxed)
    }

    /// Everything the HTTP API shows about this VM.
    pub fn status(&self) -> VmStatus {
        let st = self.lock();
        VmStatus {
            record: VmRecord {
                uuid: self.uuid.clone(),
                name: st.name.clone(),
                port: self.port,
            },
            vm_connected: st.active.is_some(),
            connected_since: st.connected_since,
            peer: st.peer_addr,
            consoles: st.consoles.len(),
            bytes_from_vm: self.bytes_from_vm(),
            bytes_to_vm: self.bytes_to_vm(),
        }
    }
}

/// Counts over every VM, read at scrape time.
#[derive(Debug, Clone, Copy, Default)]
pub struct Totals {
    /// VM entries known (each holds its console port).
    pub vms: u64,
    /// VM entries an ESXi connection carries now.
    pub vms_connected: u64,
    /// Consoles attached now, over all VMs.
    pub consoles: u64,
    /// Output bytes read from VMs, expired ones included.
    pub bytes_out: u64,
    /// Console input bytes for VMs, expired ones included.
    pub bytes_in: u64,
}

/// A console and what it may do.
struct Console {
    peer: Peer,
    access: Access,
}

/// The lock a console asks for (vSPC.py's modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Nobody else reads or writes.
    Exclusive,
    /// Nobody else writes; others may watch.
    Write,
    /// Everyone may write, while nobody holds exclusive or write.
    FreeForAll,
    /// Free-for-all, or read-only while someone holds a write lock.
    FreeForAllOrReadOnly,
    /// Watch only, whoever writes: what a read-only HTTP token's browser
    /// console gets. No lock name parses to it ([`LockMode::parse`]): the
    /// admin port's clients never ask for it.
    ReadOnly,
}

impl LockMode {
    /// Parse vSPC.py's names (`free_for_all_or_readonly`) and the client's
    /// (`free-for-all-fallback`).
    pub fn parse(s: &str) -> Option<LockMode> {
        match s.to_ascii_lowercase().replace('_', "-").as_str() {
            "exclusive" => Some(LockMode::Exclusive),
            "write" => Some(LockMode::Write),
            "free-for-all" | "ffa" => Some(LockMode::FreeForAll),
            "free-for-all-fallback" | "free-for-all-or-readonly" => {
                Some(LockMode::FreeForAllOrReadOnly)
            }
            _ => None,
        }
    }
}

/// What a console was granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Exclusive,
    Write,
    FreeForAll,
    /// Sees output; its input is discarded.
    ReadOnly,
}

impl Access {
    /// The name the native admin protocol uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Access::Exclusive => "exclusive",
            Access::Write => "write",
            Access::FreeForAll => "free-for-all",
            Access::ReadOnly => "read-only",
        }
    }

    fn writes(self) -> bool {
        self != Access::ReadOnly
    }
}

struct Pending {
    vm: Arc<Vm>,
    seq: Vec<u8>,
    source: ConnId,
    dest: Option<Peer>,
    started: Instant,
}

#[derive(Default)]
struct Registry {
    vms: HashMap<String, Arc<Vm>>,
    ports: BTreeSet<u16>,
}

/// What identified a VM connection.
#[derive(Debug, Clone)]
pub struct Identity {
    pub key: String,
    pub uuid: String,
    pub name: String,
}

/// Why a VM or console could not be attached.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttachError {
    #[error("no free console port from {start} upward")]
    NoPort { start: u16 },
    #[error("VM {name} already has {limit} consoles, the limit")]
    Full { name: String, limit: usize },
    #[error("VM {name}: {why}")]
    LockFailed { name: String, why: &'static str },
    #[error("VM {name} expired")]
    Gone { name: String },
}

/// Answer to VMOTION-BEGIN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begin {
    GoAhead(Vec<u8>),
    NotNow(&'static str),
}

/// The hub. One per daemon.
pub struct Hub {
    cfg: HubConfig,
    backend: Backends,
    reg: Mutex<Registry>,
    vmotions: Mutex<HashMap<Vec<u8>, Pending>>,
    next_id: AtomicU64,
    opener: OnceLock<Box<dyn PortOpener>>,
    /// Counters for `/metrics`, bumped where things happen.
    metrics: Metrics,
    /// Where each open VM-side connection comes from, noted by the network
    /// layer at accept ([`Hub::note_addr`]) and copied into the VM's state
    /// when the connection attaches; taken only then and at close, never
    /// on the data path.
    addrs: Mutex<HashMap<ConnId, SocketAddr>>,
}

impl Hub {
    pub fn new(cfg: HubConfig, backend: Backends) -> Arc<Hub> {
        Arc::new(Hub {
            cfg,
            backend,
            reg: Mutex::new(Registry::default()),
            vmotions: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            opener: OnceLock::new(),
            metrics: Metrics::default(),
            addrs: Mutex::new(HashMap::new()),
        })
    }

    fn addrs(&self) -> MutexGuard<'_, HashMap<ConnId, SocketAddr>> {
        self.addrs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The VM-side connection `conn` comes from `addr` (until
    /// [`Hub::forget_addr`]).
    pub fn note_addr(&self, conn: ConnId, addr: SocketAddr) {
        self.addrs().insert(conn, addr);
    }

    /// The connection `conn` closed.
    pub fn forget_addr(&self, conn: ConnId) {
        self.addrs().remove(&conn);
    }

    fn addr_of(&self, conn: ConnId) -> Option<SocketAddr> {
        self.addrs().get(&conn).copied()
    }

    /// The counters `/metrics` shows.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn config(&self) -> &HubConfig {
        &self.cfg
    }

    pub fn backend(&self) -> &Backends {
        &self.backend
    }

    /// Install the network layer's listener factory (once, at start-up).
    pub fn set_opener(&self, opener: Box<dyn PortOpener>) {
        if self.opener.set(opener).is_err() {
            tracing::error!("port opener installed twice; keeping the first");
        }
    }

    fn reg(&self) -> MutexGuard<'_, Registry> {
        self.reg.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn vmotions(&self) -> MutexGuard<'_, HashMap<Vec<u8>, Pending>> {
        self.vmotions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A fresh connection id.
    pub fn new_id(&self) -> ConnId {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// A new peer with an outbox of `limit` bytes.
    pub fn new_peer(&self, limit: usize, encoding: Encoding) -> Peer {
        Peer {
            id: self.new_id(),
            outbox: Arc::new(Outbox::new(limit, encoding)),
        }
    }

    /// Create the entries the backend persisted, reserving their ports and
    /// opening their listeners before any VM connects. Returns how many
    /// ports could not be reopened.
    pub fn preload(&self, records: Vec<VmRecord>) -> usize {
        let mut reg = self.reg();
        let mut failed = 0;
        let now = Instant::now();
        for rec in records {
            let key = match crate::vmware::VmUuid::key_of(&rec.uuid) {
                Some(k) => k,
                None => rec.uuid.clone(),
            };
            if reg.vms.contains_key(&key) {
                continue;
            }
            let vm = new_vm(
                key.clone(),
                rec.uuid.clone(),
                rec.port.filter(|_| self.cfg.vm_ports),
                rec.name.clone(),
                Some(now),
            );
            if let Some(port) = vm.port {
                if reg.ports.contains(&port) {
                    tracing::warn!(vm = %rec.name, port, "persisted port is taken twice; not reopening it");
                    failed += 1;
                    continue;
                }
                match self.open_port(&vm, port) {
                    Ok(guard) => vm.lock().listener = Some(guard),
                    Err(e) => {
                        tracing::warn!(vm = %rec.name, port, error = %e, "cannot reopen persisted console port");
                        failed += 1;
                        continue;
                    }
                }
                reg.ports.insert(port);
            }
            reg.vms.insert(key, vm);
        }
        failed
    }

    fn open_port(&self, vm: &Arc<Vm>, port: u16) -> std::io::Result<ListenerGuard> {
        match self.opener.get() {
            Some(o) => o.open(vm.clone(), port),
            None => Err(std::io::Error::other("no network layer installed")),
        }
    }

    /// Create a VM entry with the lowest free console port.
    fn create(&self, reg: &mut Registry, id: &Identity) -> Result<Arc<Vm>, AttachError> {
        if !self.cfg.vm_ports {
            return Ok(new_vm(
                id.key.clone(),
                id.uuid.clone(),
                None,
                id.name.clone(),
                None,
            ));
        }
        let start = self.cfg.port_range_start;
        for port in start..=u16::MAX {
            if reg.ports.contains(&port) {
                continue;
            }
            let vm = new_vm(
                id.key.clone(),
                id.uuid.clone(),
                Some(port),
                id.name.clone(),
                None,
            );
            match self.open_port(&vm, port) {
                Ok(guard) => {
                    vm.lock().listener = Some(guard);
                    reg.ports.insert(port);
                    return Ok(vm);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
                Err(e) => {
                    tracing::warn!(port, error = %e, "cannot open console port; trying the next");
                    continue;
                }
            }
        }
        Err(AttachError::NoPort { start })
    }

    /// Make `peer` the connection of the VM `id` names, creating the entry
    /// (and its console port) on first sight. A connection the VM had
    /// before is closed: the newest one wins (a host restart leaves the old
    /// socket half-open).
    pub fn attach_vm(&self, id: &Identity, peer: Peer) -> Result<Arc<Vm>, AttachError> {
        let addr = self.addr_of(peer.id);
        let mut reg = self.reg();
        let vm = match reg.vms.get(&id.key) {
            Some(vm) => vm.clone(),
            None => {
                let vm = self.create(&mut reg, id)?;
                reg.vms.insert(id.key.clone(), vm.clone());
                vm
            }
        };
        let mut st = vm.lock();
        let old_name = if st.name == id.name {
            id.name.clone()
        } else {
            vm.set_name(&mut st, id.name.clone())
        };
        if let Some(old) = st.active.replace(peer) {
            match (st.peer_addr, addr) {
                // A live connection taken over from another address: a
                // host restart on a new address, or someone claiming the
                // VM's uuid (see --proxy-allow).
                (Some(was), Some(now)) if was.ip() != now.ip() => tracing::warn!(
                    vm = %id.name,
                    uuid = %id.uuid,
                    "VM connection from {now} replaces its live connection from {was}; closing the old one"
                ),
                _ => {
                    tracing::info!(vm = %id.name, "VM reconnected; closing its previous connection")
                }
            }
            old.outbox.close(None);
        }
        st.connected_since = Some(SystemTime::now());
        st.peer_addr = addr;
        st.idle_since = None;
        drop(st);
        drop(reg);
        let rec = vm.record();
        tracing::info!(vm = %rec.name, uuid = %rec.uuid, port = ?rec.port, "VM connected");
        if old_name != id.name && !old_name.is_empty() {
            self.backend.vm_renamed(rec.clone(), old_name);
        }
        self.backend.vm_connected(rec);
        Ok(vm)
    }

    /// The VM's connection `conn` closed.
    pub fn detach_vm(&self, vm: &Vm, conn: ConnId) {
        let mut st = vm.lock();
        if st.active.as_ref().map(|p| p.id) != Some(conn) {
            return;
        }
        st.active = None;
        st.connected_since = None;
        st.peer_addr = None;
        if st.consoles.is_empty() && st.vmotion.is_none() {
            st.idle_since = Some(Instant::now());
        }
        drop(st);
        let rec = vm.record();
        tracing::info!(vm = %rec.name, "VM disconnected; its port and consoles stay");
        self.backend.vm_disconnected(rec);
    }

    /// The VM sent a (new) name on connection `conn`.
    pub fn rename(&self, vm: &Vm, conn: ConnId, name: &str) {
        let mut st = vm.lock();
        if st.active.as_ref().map(|p| p.id) != Some(conn) || st.name == name {
            return;
        }
        let old = vm.set_name(&mut st, name.to_string());
        drop(st);
        tracing::info!(vm = %name, old = %old, "VM renamed");
        self.backend.vm_renamed(vm.record(), old);
    }

    /// Serial output from the VM on connection `conn` (one call per read):
    /// to every console and the backends. Says whether the VM's reader
    /// should wait before reading more: for consoles past an eighth of
    /// their queue that it has not given up on ([`wait_for_lagging`]), and
    /// for a lossless backend over its budget (until it catches up).
    pub fn vm_output(&self, vm: &Vm, conn: ConnId, data: Bytes) -> Fanout {
        let st = vm.lock();
        if st.active.as_ref().map(|p| p.id) != Some(conn) {
            return Fanout::Retired;
        }
        vm.bytes_out.fetch_add(data.len() as u64, Ordering::Relaxed);
        let mut lagging = Vec::new();
        for c in &st.consoles {
            let outbox = &c.peer.outbox;
            if let Some(queued) = outbox.push(data.clone()) {
                if outbox.lags_at(queued) {
                    lagging.push(outbox.clone());
                }
            }
        }
        let backend_wait = if self.backend.wants_data() {
            let rec = st.rec.clone();
            drop(st);
            self.backend.console_data(&rec, data)
        } else {
            None
        };
        if lagging.is_empty() && backend_wait.is_none() {
            return Fanout::Sent;
        }
        Fanout::Wait(Box::pin(async move {
            if let Some(w) = backend_wait {
                w.await;
            }
            wait_for_lagging(lagging).await;
        }))
    }

    /// Attach a console to `vm` with the lock it asks for, unless the VM is
    /// full or gone or the lock cannot be had. Returns what was granted.
    pub fn attach_console(
        &self,
        vm: &Vm,
        peer: Peer,
        mode: LockMode,
    ) -> Result<Access, AttachError> {
        let mut st = vm.lock();
        let name = st.name.clone();
        if st.gone {
            return Err(AttachError::Gone { name });
        }
        if let Some(limit) = self.cfg.client_limit {
            if st.consoles.len() >= limit {
                return Err(AttachError::Full { name, limit });
            }
        }
        let held = |a: Access| st.consoles.iter().any(|c| c.access == a);
        let fail = |why| {
            Err(AttachError::LockFailed {
                name: name.clone(),
                why,
            })
        };
        if held(Access::Exclusive) {
            return fail("someone holds an exclusive lock on it");
        }
        let access = match mode {
            LockMode::Exclusive if !st.consoles.is_empty() => {
                return fail("an exclusive lock needs no other console attached")
            }
            LockMode::Exclusive => Access::Exclusive,
            LockMode::Write if st.consoles.iter().any(|c| c.access.writes()) => {
                return fail("someone else may write to it (a write lock needs no other writer)")
            }
            LockMode::Write => Access::Write,
            LockMode::FreeForAll if held(Access::Write) => {
                return fail("someone holds a write lock on it")
            }
            LockMode::FreeForAll => Access::FreeForAll,
            LockMode::FreeForAllOrReadOnly if held(Access::Write) => Access::ReadOnly,
            LockMode::FreeForAllOrReadOnly => Access::FreeForAll,
            LockMode::ReadOnly => Access::ReadOnly,
        };
        st.consoles.push(Console { peer, access });
        st.idle_since = None;
        drop(st);
        self.backend.console_attached(vm.record());
        Ok(access)
    }

    /// Disconnect every console of `vm` (vSPC.py's "port clear"), telling
    /// each why. Returns how many there were.
    pub fn clear_consoles(&self, vm: &Vm, msg: &[u8]) -> usize {
        let mut st = vm.lock();
        let gone: Vec<Console> = std::mem::take(&mut st.consoles);
        if st.active.is_none() && st.vmotion.is_none() {
            st.idle_since.get_or_insert_with(Instant::now);
        }
        let name = st.name.clone();
        drop(st);
        for c in &gone {
            c.peer.outbox.close(Some(Bytes::copy_from_slice(msg)));
            self.metrics.disconnect(Disconnect::Cleared);
            self.backend.console_detached(vm.record());
        }
        tracing::info!(vm = %name, consoles = gone.len(), "consoles cleared");
        gone.len()
    }

    /// A console of `vm` went away.
    pub fn detach_console(&self, vm: &Vm, conn: ConnId) {
        self.detach_console_for(vm, conn, Disconnect::Closed);
    }

    /// A console of `vm` went away, for `reason` (as the metrics count it;
    /// a console already cleared is not counted again).
    pub fn detach_console_for(&self, vm: &Vm, conn: ConnId, reason: Disconnect) {
        let mut st = vm.lock();
        let before = st.consoles.len();
        st.consoles.retain(|c| c.peer.id != conn);
        let removed = st.consoles.len() != before;
        if st.consoles.is_empty() && st.active.is_none() && st.vmotion.is_none() {
            st.idle_since.get_or_insert_with(Instant::now);
        }
        drop(st);
        if removed {
            self.metrics.disconnect(reason);
            self.backend.console_detached(vm.record());
        }
    }

    /// Console input for the VM. Returns the outbox it was queued on, so the
    /// console can wait for room; `None` if it was held (vMotion) or dropped
    /// (no VM connection).
    pub fn console_input(&self, vm: &Vm, data: &[u8]) -> Option<Arc<Outbox>> {
        let escaped = Bytes::copy_from_slice(data);
        let mut st = vm.lock();
        if st.vmotion.is_some() {
            if st.held_bytes + escaped.len() > HELD_LIMIT {
                tracing::warn!(vm = %st.name, "console input held during vMotion exceeds 1 MiB; dropping");
                return None;
            }
            vm.bytes_in.fetch_add(data.len() as u64, Ordering::Relaxed);
            st.held_bytes += escaped.len();
            st.held.push(escaped);
            return None;
        }
        let active = st.active.as_ref()?;
        vm.bytes_in.fetch_add(data.len() as u64, Ordering::Relaxed);
        active.outbox.push_always(escaped);
        Some(active.outbox.clone())
    }

    /// VMOTION-BEGIN on the VM's connection `conn`.
    pub fn vmotion_begin(&self, vm: &Arc<Vm>, conn: ConnId, seq: &[u8]) -> Begin {
        let started = Instant::now();
        let answer = self.vmotion_answer(vm, conn, seq, started);
        match &answer {
            Begin::GoAhead(_) => self.metrics.goahead.observe(started.elapsed()),
            Begin::NotNow(_) => self.metrics.vmotion(Vmotion::NotNow),
        }
        answer
    }

    fn vmotion_answer(&self, vm: &Arc<Vm>, conn: ConnId, seq: &[u8], started: Instant) -> Begin {
        let mut st = vm.lock();
        let Some(active) = st.active.clone().filter(|p| p.id == conn) else {
            return Begin::NotNow("the connection does not carry the VM");
        };
        if st.vmotion.is_some() {
            return Begin::NotNow("another vMotion of this port is pending");
        }
        let mut secret = [0u8; 8];
        if let Err(e) = getrandom::fill(&mut secret) {
            tracing::error!(error = %e, "no random bytes for a vMotion secret");
            return Begin::NotNow("no random bytes for a secret");
        }
        let mut cookie = seq.to_vec();
        cookie.extend_from_slice(&secret);
        // Input not yet written to the source waits for the winner.
        let backlog = active.outbox.take_data();
        st.held_bytes += backlog.iter().map(|b| b.len()).sum::<usize>();
        st.held.splice(0..0, backlog);
        st.vmotion = Some(cookie.clone());
        self.vmotions().insert(
            cookie.clone(),
            Pending {
                vm: vm.clone(),
                seq: seq.to_vec(),
                source: conn,
                dest: None,
                started,
            },
        );
        Begin::GoAhead(cookie)
    }

    /// VMOTION-PEER on a new connection: the VM and sequence if the cookie
    /// is pending.
    pub fn vmotion_peer(&self, cookie: &[u8], dest: Peer) -> Option<(Arc<Vm>, Vec<u8>)> {
        let mut table = self.vmotions();
        let Some(p) = table.get_mut(cookie) else {
            drop(table);
            self.metrics.vmotion(Vmotion::RefusedPeer);
            return None;
        };
        if let Some(old) = p.dest.replace(dest) {
            tracing::warn!("a second destination for one vMotion; dropping the first");
            old.outbox.close(None);
        }
        Some((p.vm.clone(), p.seq.clone()))
    }

    /// VMOTION-COMPLETE on the destination `dest`: it becomes the VM's
    /// connection, held input goes to it, and the source is closed.
    pub fn vmotion_complete(&self, vm: &Vm, cookie: &[u8], seq: &[u8], dest: &Peer) -> bool {
        let addr = self.addr_of(dest.id);
        let mut st = vm.lock();
        if st.vmotion.as_deref() != Some(cookie) {
            return false;
        }
        let started = {
            let mut table = self.vmotions();
            let started = match table.get(cookie) {
                Some(p) if p.seq == seq && p.dest.as_ref().map(|d| d.id) == Some(dest.id) => {
                    p.started
                }
                _ => return false,
            };
            table.remove(cookie);
            started
        };
        self.metrics.vmotion(Vmotion::Complete);
        self.metrics.complete.observe(started.elapsed());
        st.vmotion = None;
        let old = st.active.replace(dest.clone());
        st.connected_since.get_or_insert_with(SystemTime::now);
        st.peer_addr = addr;
        st.idle_since = None;
        for chunk in st.held.drain(..) {
            dest.outbox.push_always(chunk);
        }
        st.held_bytes = 0;
        let name = st.name.clone();
        drop(st);
        if let Some(old) = old {
            old.outbox.close(None);
        }
        tracing::info!(vm = %name, "vMotion complete; the destination now carries the VM");
        true
    }

    /// VMOTION-ABORT on connection `conn`: the source keeps the VM.
    pub fn vmotion_abort(&self, vm: &Vm, conn: ConnId) -> bool {
        let mut st = vm.lock();
        if st.active.as_ref().map(|p| p.id) != Some(conn) {
            return false;
        }
        let Some(cookie) = st.vmotion.take() else {
            return false;
        };
        if let Some(p) = self.vmotions().remove(&cookie) {
            if let Some(d) = p.dest {
                d.outbox.close(None);
            }
        }
        flush_held(&mut st);
        self.metrics.vmotion(Vmotion::Abort);
        tracing::info!(vm = %st.name, "vMotion aborted; the source keeps the VM");
        true
    }

    /// A destination connection closed before COMPLETE.
    pub fn vmotion_dest_closed(&self, cookie: &[u8], conn: ConnId) {
        if let Some(p) = self.vmotions().get_mut(cookie) {
            if p.dest.as_ref().map(|d| d.id) == Some(conn) {
                p.dest = None;
            }
        }
    }

    /// Every VM the hub knows, as listing rows.
    pub fn records(&self) -> Vec<VmRecord> {
        let vms: Vec<Arc<Vm>> = self.reg().vms.values().cloned().collect();
        let mut rows: Vec<VmRecord> = vms.iter().map(|v| v.record()).collect();
        rows.sort_by(|a, b| a.name.cmp(&b.name).then(a.uuid.cmp(&b.uuid)));
        rows
    }

    /// The rows the admin listing shows (the backend may edit them).
    pub async fn listing(&self) -> Vec<VmRecord> {
        self.backend.list_rows(self.records()).await
    }

    /// Failed accepts on the console ports so far (counted by the network
    /// layer's accepting thread).
    pub fn console_accept_errors(&self) -> u64 {
        self.opener.get().map_or(0, |o| o.accept_errors())
    }

    /// Every VM the hub knows, sorted by name.
    pub fn vms(&self) -> Vec<Arc<Vm>> {
        let mut vms: Vec<(String, Arc<Vm>)> = self
            .reg()
            .vms
            .values()
            .map(|v| (v.name(), v.clone()))
            .collect();
        vms.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.uuid.cmp(&b.1.uuid)));
        vms.into_iter().map(|(_, v)| v).collect()
    }

    /// Counts over every VM (for `/metrics`). Taken under the registry
    /// lock, so an entry expiring meanwhile is counted exactly once.
    pub fn totals(&self) -> Totals {
        let reg = self.reg();
        let mut t = Totals {
            vms: reg.vms.len() as u64,
            bytes_out: self.metrics.retired_out.load(Ordering::Relaxed),
            bytes_in: self.metrics.retired_in.load(Ordering::Relaxed),
            ..Totals::default()
        };
        for vm in reg.vms.values() {
            let st = vm.lock();
            t.vms_connected += u64::from(st.active.is_some());
            t.consoles += st.consoles.len() as u64;
            drop(st);
            t.bytes_out += vm.bytes_from_vm();
            t.bytes_in += vm.bytes_to_vm();
        }
        t
    }

    /// A VM by name, display uuid or any spelling of its uuid.
    pub fn find(&self, what: &str) -> Option<Arc<Vm>> {
        let reg = self.reg();
        if let Some(vm) = crate::vmware::VmUuid::key_of(what).and_then(|k| reg.vms.get(&k)) {
            return Some(vm.clone());
        }
        reg.vms
            .values()
            .find(|v| v.uuid == what || v.key == what || v.name() == what)
            .cloned()
    }

    /// Number of VMs known.
    pub fn len(&self) -> usize {
        self.reg().vms.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Expire idle VMs and stale vMotions. Run periodically.
    pub fn sweep(&self, now: Instant) {
        let stale: Vec<(Vec<u8>, Pending)> = {
            let mut table = self.vmotions();
            let keys: Vec<Vec<u8>> = table
                .iter()
                .filter(|(_, p)| now.duration_since(p.started) >= self.cfg.vmotion_timeout)
                .map(|(k, _)| k.clone())
                .collect();
            keys.into_iter()
                .filter_map(|k| table.remove(&k).map(|p| (k, p)))
                .collect()
        };
        for (cookie, p) in stale {
            let mut st = p.vm.lock();
            if st.vmotion.as_deref() == Some(&cookie[..]) {
                st.vmotion = None;
                flush_held(&mut st);
                self.metrics.vmotion(Vmotion::Timeout);
                if st.active.is_none() && st.consoles.is_empty() {
                    st.idle_since = Some(now);
                }
                tracing::warn!(vm = %st.name, source = p.source, "pending vMotion timed out; dropped it");
            }
            if let Some(d) = p.dest {
                d.outbox.close(None);
            }
        }

        let mut expired = Vec::new();
        {
            let mut reg = self.reg();
            let mut gone_keys = Vec::new();
            for (key, vm) in reg.vms.iter() {
                let mut st = vm.lock();
                if let Some(since) = st.idle_since {
                    if now.duration_since(since) >= self.cfg.expire {
                        st.gone = true;
                        st.listener = None;
                        gone_keys.push(key.clone());
                    }
                }
            }
            for key in gone_keys {
                if let Some(vm) = reg.vms.remove(&key) {
                    // Still under the registry lock: see `totals`.
                    let m = &self.metrics;
                    m.retired_out
                        .fetch_add(vm.bytes_from_vm(), Ordering::Relaxed);
                    m.retired_in.fetch_add(vm.bytes_to_vm(), Ordering::Relaxed);
                    if let Some(port) = vm.port {
                        reg.ports.remove(&port);
                    }
                    expired.push(vm);
                }
            }
        }
        for vm in expired {
            let rec = vm.record();
            tracing::info!(vm = %rec.name, port = ?rec.port, "VM mapping expired; port returned to the pool");
            self.backend.vm_expired(rec);
        }
    }
}

/// Wait until every console in `lagging` has drained to its low-water
/// mark, looking at each every [`LAG_WAIT`]: one that took less than
/// [`LAG_PROGRESS`] from its full socket in that time is given up on (it
/// skips output once its queue is full, and is not waited for again until
/// it has caught up); one that is reading is waited for; one whose socket
/// takes everything is only behind because the daemon is, and is waited
/// for up to [`BUSY_WAIT`].
async fn wait_for_lagging(lagging: Vec<Arc<Outbox>>) {
    let start = tokio::time::Instant::now();
    let mut lagging: Vec<(Arc<Outbox>, u64)> =
        lagging.into_iter().map(|o| (o.clone(), o.sent())).collect();
    while !lagging.is_empty() {
        let deadline = tokio::time::Instant::now() + LAG_WAIT;
        for (o, _) in &lagging {
            if tokio::time::timeout_at(deadline, o.drained(o.low_water()))
                .await
                .is_err()
            {
                break;
            }
        }
        let busy_too_long = start.elapsed() >= BUSY_WAIT;
        lagging.retain_mut(|(o, mark)| {
            if o.queued() <= o.low_water() || o.is_closed() {
                return false;
            }
            let sent = o.sent();
            let reading = sent - *mark >= LAG_PROGRESS;
            *mark = sent;
            if reading || (!o.is_full() && !busy_too_long) {
                return true;
            }
            tracing::debug!(
                queued = o.queued(),
                socket_full = o.is_full(),
                "a console cannot keep up; the VM goes on without waiting for it"
            );
            o.set_behind();
            false
        });
    }
}

fn new_vm(
    key: String,
    uuid: String,
    port: Option<u16>,
    name: String,
    idle_since: Option<Instant>,
) -> Arc<Vm> {
    let rec = Arc::new(FfiRecord {
        uuid: uuid.as_str().into(),
        name: name.as_str().into(),
        port: port.into(),
    });
    Arc::new(Vm {
        key,
        uuid,
        port,
        bytes_out: AtomicU64::new(0),
        bytes_in: AtomicU64::new(0),
        state: Mutex::new(new_state(name, rec, idle_since)),
    })
}

fn new_state(name: String, rec: Arc<FfiRecord>, idle_since: Option<Instant>) -> VmState {
    VmState {
        name,
        rec,
        active: None,
        consoles: Vec::new(),
        vmotion: None,
        held: Vec::new(),
        held_bytes: 0,
        idle_since,
        listener: None,
        connected_since: None,
        peer_addr: None,
        gone: false,
    }
}

/// Send held console input to the VM's connection, or drop it if none.
fn flush_held(st: &mut VmState) {
    let held = std::mem::take(&mut st.held);
    st.held_bytes = 0;
    if let Some(active) = &st.active {
        for chunk in held {
            active.outbox.push_always(chunk);
        }
    } else if !held.is_empty() {
        tracing::info!(vm = %st.name, "dropping console input held for a VM that is not connected");
    }
}

#[cfg(test)]
mod tests {
    //! The hub's rules with synthetic time: [`Hub::sweep`] takes the time,
    //! so expiry and vMotion timeouts need no sleeping.
    use super::*;
    use crate::outbox::Encoding;

    const EXPIRE: Duration = Duration::from_secs(60);
    const VMOTION: Duration = Duration::from_secs(30);

    fn hub() -> Arc<Hub> {
        crate::testing::hub(EXPIRE, VMOTION, 4096)
    }

    fn id(n: u32) -> Identity {
        Identity {
            key: format!("{n:032x}"),
            uuid: format!("uuid-{n}"),
            name: format!("vm-{n}"),
        }
    }

    fn peer(h: &Hub) -> Peer {
        h.new_peer(1 << 20, Encoding::Raw)
    }

    use crate::testing::written;

    fn output(h: &Hub, vm: &Vm, conn: ConnId, data: &'static [u8]) {
        match h.vm_output(vm, conn, Bytes::from_static(data)) {
            Fanout::Sent => {}
            Fanout::Wait(_) => panic!("waited with nothing lagging"),
            Fanout::Retired => panic!("the connection lost its VM"),
        }
    }

    #[test]
    fn the_newest_connection_of_a_vm_wins() {
        let h = hub();
        let (a, b) = (peer(&h), peer(&h));
        let vm = h.attach_vm(&id(1), a.clone()).expect("attach");
        let again = h.attach_vm(&id(1), b.clone()).expect("reattach");
        assert!(Arc::ptr_eq(&vm, &again), "a reconnect must keep the entry");
        assert!(a.outbox.is_closed(), "the old connection must be closed");
        // The old connection's data and its close no longer count.
        assert!(matches!(
            h.vm_output(&vm, a.id, Bytes::from_static(b"x")),
            Fanout::Retired
        ));
        h.detach_vm(&vm, a.id);
        assert!(vm.vm_connected());
        h.detach_vm(&vm, b.id);
        assert!(!vm.vm_connected());
    }

    #[test]
    fn metrics_follow_traffic_vmotions_and_consoles_and_survive_expiry() {
        let h = hub();
        let (from, to): (SocketAddr, SocketAddr) = (
            "192.0.2.5:4000".parse().expect("addr"),
            "192.0.2.6:4001".parse().expect("addr"),
        );
        let p = peer(&h);
        h.note_addr(p.id, from);
        let vm = h.attach_vm(&id(10), p.clone()).expect("attach");
        let s = vm.status();
        assert_eq!(s.peer, Some(from));
        assert!(s.vm_connected && s.connected_since.is_some());
        output(&h, &vm, p.id, b"12345");
        let c = peer(&h);
        h.attach_console(&vm, c.clone(), LockMode::FreeForAll)
            .expect("console");
        h.console_input(&vm, b"ab");
        let t = h.totals();
        assert_eq!(
            (t.vms, t.vms_connected, t.consoles, t.bytes_out, t.bytes_in),
            (1, 1, 1, 5, 2)
        );

        let Begin::GoAhead(cookie) = h.vmotion_begin(&vm, p.id, b"q") else {
            panic!("no GOAHEAD");
        };
        assert!(matches!(h.vmotion_begin(&vm, p.id, b"r"), Begin::NotNow(_)));
        assert!(h.vmotion_peer(b"no such cookie", peer(&h)).is_none());
        let dest = peer(&h);
        h.note_addr(dest.id, to);
        h.vmotion_peer(&cookie, dest.clone()).expect("PEER");
        assert!(h.vmotion_complete(&vm, &cookie, b"q", &dest));
        assert_eq!(vm.status().peer, Some(to), "the destination's address");
        h.forget_addr(p.id);

        assert_eq!(h.clear_consoles(&vm, b"bye"), 1);
        h.detach_console(&vm, c.id);
        let text = crate::metrics::render(&h);
        for line in [
            "vspc_vmotions_total{outcome=\"complete\"} 1",
            "vspc_vmotions_total{outcome=\"notnow\"} 1",
            "vspc_vmotions_total{outcome=\"refused_peer\"} 1",
            "vspc_vmotions_total{outcome=\"abort\"} 0",
            "vspc_vmotion_goahead_seconds_count 1",
            "vspc_vmotion_complete_seconds_count 1",
            "vspc_console_disconnects_total{reason=\"cleared\"} 1",
            "vspc_console_disconnects_total{reason=\"closed\"} 0",
            "vspc_vm_to_console_bytes_total 5",
            "vspc_console_to_vm_bytes_total 2",
            "vspc_vms 1",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }

        // Expiry forgets the VM but not what it sent.
        h.detach_vm(&vm, dest.id);
        h.forget_addr(dest.id);
        h.sweep(Instant::now() + EXPIRE + Duration::from_secs(1));
        assert_eq!(h.len(), 0);
        let t = h.totals();
        assert_eq!((t.vms, t.bytes_out, t.bytes_in), (0, 5, 2));
        assert!(h.addrs().is_empty(), "addresses of closed connections kept");
    }

    #[test]
    fn an_idle_vm_expires_after_the_expire_time_and_not_before() {
        let h = hub();
        let p = peer(&h);
        let vm = h.attach_vm(&id(2), p.clone()).expect("attach");
        let t0 = Instant::now();
        h.detach_vm(&vm, p.id);
        h.sweep(t0 + EXPIRE - Duration::from_secs(1));
        assert_eq!(h.len(), 1, "expired early");
        h.sweep(t0 + EXPIRE + Duration::from_secs(1));
        assert_eq!(h.len(), 0, "never expired");
        // A console arriving late finds the VM gone.
        let c = peer(&h);
        assert!(matches!(
            h.attach_console(&vm, c, LockMode::FreeForAll),
            Err(AttachError::Gone { .. })
        ));
    }

    #[test]
    fn a_console_keeps_a_disconnected_vm_from_expiring() {
        let h = hub();
        let p = peer(&h);
        let vm = h.attach_vm(&id(3), p.clone()).expect("attach");
        let c = peer(&h);
        h.attach_console(&vm, c.clone(), LockMode::FreeForAll)
            .expect("console");
        h.detach_vm(&vm, p.id);
        let t0 = Instant::now();
        h.sweep(t0 + EXPIRE * 10);
        assert_eq!(h.len(), 1, "expired with a console attached");
        h.detach_console(&vm, c.id);
        let t1 = Instant::now();
        h.sweep(t1 + EXPIRE + Duration::from_secs(1));
        assert_eq!(h.len(), 0);
    }

    #[test]
    fn a_pending_vmotion_times_out_and_held_input_goes_to_the_source() {
        let h = hub();
        let src = peer(&h);
        let vm = h.attach_vm(&id(4), src.clone()).expect("attach");
        let Begin::GoAhead(cookie) = h.vmotion_begin(&vm, src.id, b"seq1") else {
            panic!("no GOAHEAD");
        };
        assert_eq!(&cookie[..4], b"seq1");
        assert_eq!(cookie.len(), 12, "sequence plus an 8-byte secret");
        assert_eq!(
            h.vmotion_begin(&vm, src.id, b"seq2"),
            Begin::NotNow("another vMotion of this port is pending")
        );
        // Input typed during the handoff is held, not sent.
        assert!(h.console_input(&vm, b"typed").is_none());
        assert_eq!(written(&src.outbox).0, b"");
        let t0 = Instant::now();
        h.sweep(t0 + VMOTION - Duration::from_secs(1));
        assert!(h.vmotion_peer(&cookie, peer(&h)).is_some(), "dropped early");
        h.sweep(t0 + VMOTION + Duration::from_secs(1));
        assert!(h.vmotion_peer(&cookie, peer(&h)).is_none(), "never dropped");
        assert_eq!(written(&src.outbox).0, b"typed");
        // A new vMotion may start.
        assert!(matches!(
            h.vmotion_begin(&vm, src.id, b"seq3"),
            Begin::GoAhead(_)
        ));
    }

    #[test]
    fn complete_moves_the_vm_and_its_held_input_to_the_destination() {
        let h = hub();
        let src = peer(&h);
        let vm = h.attach_vm(&id(5), src.clone()).expect("attach");
        let Begin::GoAhead(cookie) = h.vmotion_begin(&vm, src.id, b"s") else {
            panic!("no GOAHEAD");
        };
        h.console_input(&vm, b"held");
        // A wrong cookie finds nothing.
        let mut wrong = cookie.clone();
        wrong[1] ^= 1;
        assert!(h.vmotion_peer(&wrong, peer(&h)).is_none());
        let dest = peer(&h);
        let (found, seq) = h.vmotion_peer(&cookie, dest.clone()).expect("PEER");
        assert!(Arc::ptr_eq(&found, &vm));
        assert_eq!(seq, b"s");
        // COMPLETE must name the right sequence on the bound destination.
        assert!(!h.vmotion_complete(&vm, &cookie, b"x", &dest));
        assert!(!h.vmotion_complete(&vm, &cookie, b"s", &peer(&h)));
        assert!(h.vmotion_complete(&vm, &cookie, b"s", &dest));
        assert_eq!(written(&dest.outbox).0, b"held");
        assert!(src.outbox.is_closed(), "the source must be closed");
        // Output now counts only from the destination.
        assert!(matches!(
            h.vm_output(&vm, src.id, Bytes::from_static(b"late")),
            Fanout::Retired
        ));
        output(&h, &vm, dest.id, b"on");
    }

    #[test]
    fn abort_keeps_the_source_and_closes_a_bound_destination() {
        let h = hub();
        let src = peer(&h);
        let vm = h.attach_vm(&id(6), src.clone()).expect("attach");
        let Begin::GoAhead(cookie) = h.vmotion_begin(&vm, src.id, b"q") else {
            panic!("no GOAHEAD");
        };
        let dest = peer(&h);
        h.vmotion_peer(&cookie, dest.clone()).expect("PEER");
        h.console_input(&vm, b"keep");
        assert!(h.vmotion_abort(&vm, src.id));
        assert!(dest.outbox.is_closed());
        assert_eq!(written(&src.outbox).0, b"keep");
        assert!(!h.vmotion_abort(&vm, src.id), "nothing left to abort");
    }

    #[test]
    fn lock_rules_follow_vspc_py() {
        use LockMode::*;
        let h = hub();
        let vm = h.attach_vm(&id(7), peer(&h)).expect("attach");
        let attach = |m| h.attach_console(&vm, peer(&h), m);
        // Writer first: free-for-all is refused, the fallback is read-only,
        // a second writer and exclusive are refused.
        assert_eq!(attach(Write), Ok(Access::Write));
        assert!(attach(FreeForAll).is_err());
        assert_eq!(attach(FreeForAllOrReadOnly), Ok(Access::ReadOnly));
        assert!(attach(Write).is_err());
        assert!(attach(Exclusive).is_err());
        // Watching takes no lock, and is refused only beside exclusive.
        assert_eq!(attach(ReadOnly), Ok(Access::ReadOnly));
        assert_eq!(LockMode::parse("read-only"), None);
        let vm2 = h.attach_vm(&id(8), peer(&h)).expect("attach");
        let attach2 = |m| h.attach_console(&vm2, peer(&h), m);
        assert_eq!(attach2(Exclusive), Ok(Access::Exclusive));
        for m in [Exclusive, Write, FreeForAll, FreeForAllOrReadOnly, ReadOnly] {
            assert!(attach2(m).is_err(), "{m:?} beside an exclusive lock");
        }
    }

    #[test]
    fn fanout_reaches_every_console_and_waits_only_for_one_that_lags() {
        let h = hub();
        let p = peer(&h);
        let vm = h.attach_vm(&id(9), p.clone()).expect("attach");
        let small = |h: &Hub| h.new_peer(h.config().console_queue, Encoding::Raw);
        let (a, b) = (small(&h), small(&h));
        h.attach_console(&vm, a.clone(), LockMode::FreeForAll)
            .expect("a");
        h.attach_console(&vm, b.clone(), LockMode::FreeForAll)
            .expect("b");
        output(&h, &vm, p.id, b"hello");
        assert_eq!(written(&a.outbox).0, b"hello");
        // b does not read: past an eighth of its queue the VM is told to
        // wait.
        assert_eq!(written(&b.outbox).0, b"hello");
        let half = vec![1u8; 513];
        match h.vm_output(&vm, p.id, Bytes::from(half)) {
            Fanout::Wait(_) => {}
            _ => panic!("no wait for a console past an eighth of its queue"),
        }
        // Given up on, it is not waited for again until it caught up.
        b.outbox.set_behind();
        a.outbox.take_data();
        output(&h, &vm, p.id, b"more");
        assert_eq!(written(&a.outbox).0, b"more");
        // A console still being told apart never holds the VM up.
        let held = h.new_peer(256, Encoding::Hold);
        h.attach_console(&vm, held.clone(), LockMode::FreeForAll)
            .expect("held");
        let big: &'static [u8] = &[2u8; 200];
        b.outbox.take_data();
        a.outbox.take_data();
        match h.vm_output(&vm, p.id, Bytes::from_static(big)) {
            Fanout::Sent => {}
            _ => panic!("waited for a console that is not being written"),
        }
        assert_eq!(held.outbox.queued(), 200);
    }
}
