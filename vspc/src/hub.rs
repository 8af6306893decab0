//! The registry of VMs: key -> entry (name, port, VM connection, consoles,
//! pending vMotion, idle-since). Port allocation and expiry live here.
//!
//! Locks are taken in one order only: the registry, then a VM's state, then
//! the vMotion table. Console fan-out takes just the VM's own lock, so VMs
//! never contend with each other. Nothing here touches a socket: connections
//! are [`Peer`]s (an id and an [`Outbox`]), and console listeners are opened
//! through the [`PortOpener`] the network layer installs.
//!
//! Fan-out is where the flow-control rule lives ([`Hub::vm_output`]): a
//! VM's output goes to every console and backend, as fast as its
//! **fastest** reading console (and any lossless backend) takes it. Output
//! read while they are full waits in the VM's backlog. A console whose
//! queue fills is waited for while the lag is the daemon's (its socket
//! takes more), and for at most [`PATIENCE`] while its client is behind;
//! then it skips the oldest output and is told. A console not yet told
//! apart (raw or telnet) is never skipped: the VM waits for it. A console
//! that takes (next to) nothing at all is the network layer's business
//! (its stall timeout), and once dropped it no longer paces anyone.

use crate::backend_host::Backends;
use crate::metrics::{Disconnect, Metrics, Vmotion};
use crate::outbox::{Encoding, Outbox};
use crate::wait::WaitFuture;
use bytes::Bytes;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::Notify;
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

/// Output a VM's reader may hold beyond what its consoles have room for
/// before it stops reading: while it holds less, it goes on reading and
/// decoding, so the VM's control messages (VMOTION-BEGIN, with VMware's
/// 5 s limit) are answered even while its consoles hold its output back.
pub const VM_HOLD: usize = 1 << 20;

/// The longest a console may hold its VM back while its queue is full and
/// its client behind, without catching up to its high-water mark: a reader
/// descheduled for a moment catches up well within it and loses nothing.
/// One that has not caught up by then is behind: it skips, and is told,
/// and is not waited for again until it has caught up. Not a rate: it
/// compares the console with the fastest one (which has caught up), and
/// any reader that keeps pace with it, however slowly it goes, is never
/// behind it; a console that never reads costs its VM this once.
pub const PATIENCE: Duration = Duration::from_secs(1);

/// Largest piece of output handed to the consoles at once (the VM's read
/// slice at most; larger pieces, such as output held before the VM was
/// identified, are cut to this).
const PIECE: usize = 64 * 1024;

/// What became of a VM's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fanout {
    /// The connection no longer carries the VM: nothing was sent.
    Retired,
    /// Sent to every console and backend; read on.
    Sent,
    /// Some of it waits in the VM's backlog for the consoles (or a lossless
    /// backend) to take it: drive [`Hub::pace`] until it is out, and read
    /// more only while [`Vm::holds_too_much`] says no.
    Held,
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
    /// Bytes in the backlog (kept beside it so a reader can look without
    /// the lock).
    held: AtomicUsize,
    /// Told when a console may have stopped holding this VM's output back
    /// (see [`Outbox::pace_with`]), and when output was delivered from the
    /// backlog, so every task waiting for room looks again.
    pace: Arc<Notify>,
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
    /// Output read from the VM that no console or backend has yet (they had
    /// no room), oldest first; [`Vm::held`] bytes, about [`VM_HOLD`] at
    /// most.
    backlog: VecDeque<Bytes>,
    /// After the last piece went out, every console certainly had room for
    /// another (see [`Hub::deliver`]): the next piece needs no look at each
    /// console. Only ever too cautious: consoles drain, join empty, are
    /// decided or close, none of which takes room away.
    room: bool,
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

    /// The connection that carries this port now, if any.
    pub fn active_conn(&self) -> Option<ConnId> {
        self.lock().active.as_ref().map(|p| p.id)
    }

    /// Serial output bytes read from this VM so far.
    pub fn bytes_from_vm(&self) -> u64 {
        self.bytes_out.load(Ordering::Relaxed)
    }

    /// Console input bytes accepted for this VM so far.
    pub fn bytes_to_vm(&self) -> u64 {
        self.bytes_in.load(Ordering::Relaxed)
    }

    /// Output bytes read from the VM that wait for room in its consoles.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::SeqCst)
    }

    /// The reader should stop reading until the backlog shrinks.
    pub fn holds_too_much(&self) -> bool {
        self.held() >= VM_HOLD
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

/// Why [`Hub::lookup`] found no VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    NotFound,
    /// More VMs than one have that name: these uuids (ask by uuid).
    Ambiguous(Vec<String>),
}

impl Lookup {
    /// One line for a client: what was asked, and what to do.
    pub fn explain(&self, what: &str) -> String {
        match self {
            Lookup::NotFound => {
                format!("no VM named or with uuid \"{}\"", crate::shown::Shown(what))
            }
            Lookup::Ambiguous(uuids) => format!(
                "{} VMs are named \"{}\" (uuids {}); ask for one by its uuid",
                uuids.len(),
                crate::shown::Shown(what),
                uuids.join(", ")
            ),
        }
    }
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
    /// VM connections not yet identified (no DO-PROXY with a uuid, no valid
    /// VMOTION-PEER yet): `--max-unidentified` caps them at accept.
    unidentified: AtomicUsize,
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
            unidentified: AtomicUsize::new(0),
        })
    }

    /// VM connections open but not yet identified.
    pub fn unidentified(&self) -> usize {
        self.unidentified.load(Ordering::Relaxed)
    }

    /// A VM connection opened, not yet identified.
    pub fn unidentified_opened(&self) {
        self.unidentified.fetch_add(1, Ordering::Relaxed);
    }

    /// A VM connection counted by [`Hub::unidentified_opened`] was
    /// identified or closed.
    pub fn unidentified_done(&self) {
        self.unidentified.fetch_sub(1, Ordering::Relaxed);
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
        let (vm, renamed) = match reg.vms.get(&id.key) {
            Some(vm) => (vm.clone(), vm.name() != id.name),
            None => {
                let vm = self.create(&mut reg, id)?;
                reg.vms.insert(id.key.clone(), vm.clone());
                (vm, true)
            }
        };
        // Only a new name can collide (a reconnect storm costs no scan).
        let twins: Vec<String> = if renamed {
            reg.vms
                .values()
                .filter(|v| v.key != id.key && v.vm_connected() && v.name() == id.name)
                .map(|v| v.uuid.clone())
                .collect()
        } else {
            Vec::new()
        };
        if !twins.is_empty() {
            tracing::warn!(
                vm = %id.name,
                uuid = %id.uuid,
                others = ?twins,
                "a VM connection claims the name of a connected VM with another uuid; \
                 the name is ambiguous now (clients must ask by uuid)"
            );
        }
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
    /// to every console and the backends, as far as they have room (see
    /// [`Hub::deliver`]); the rest waits in the VM's backlog, in order.
    pub fn vm_output(&self, vm: &Vm, conn: ConnId, data: Bytes) -> Fanout {
        let mut st = vm.lock();
        if st.active.as_ref().map(|p| p.id) != Some(conn) {
            return Fanout::Retired;
        }
        vm.bytes_out.fetch_add(data.len() as u64, Ordering::Relaxed);
        let mut data = data;
        while !data.is_empty() {
            let piece = data.split_to(data.len().min(PIECE));
            st.backlog.push_back(piece);
        }
        match self.deliver(vm, &mut st) {
            None => Fanout::Sent,
            Some(_) => Fanout::Held,
        }
    }

    /// Hand the backlog's pieces, oldest first, to every console and
    /// backend while there is room ([`consoles_have_room`]): while no
    /// lossless backend is over its budget, no console still being told
    /// apart has more than its high-water mark queued, the fastest decided
    /// console (the one with the least queued) has at most its high-water
    /// mark queued, and no full console is still owed a wait. A slower
    /// console's queue fills meanwhile, and once it is known to be behind
    /// it skips the oldest output and is told; a VM whose consoles all lag
    /// waits for them. Returns what still holds the rest back, if anything
    /// is left.
    fn deliver(&self, vm: &Vm, st: &mut VmState) -> Option<Blocker> {
        let had = vm.held();
        // A few pieces at most (about VM_HOLD / PIECE).
        let mut left: usize = st.backlog.iter().map(Bytes::len).sum();
        let blocker = loop {
            let Some(next) = st.backlog.front().map(Bytes::len) else {
                break None;
            };
            if let Some(w) = self.backend.over_budget() {
                break Some(Blocker::Backend(w));
            }
            if !st.room {
                match consoles_have_room(&st.consoles, next) {
                    Room::Yes => {}
                    Room::No => break Some(Blocker::Consoles(Vec::new())),
                    Room::Laggers(l) => break Some(Blocker::Consoles(l)),
                }
            }
            let Some(piece) = st.backlog.pop_front() else {
                break None;
            };
            left -= piece.len();
            // Whether the next piece will certainly fit, from what each
            // push says is queued now.
            let mut all_fit = true;
            let mut fastest_fits = false;
            let mut decided = false;
            for c in &st.consoles {
                let o = &c.peer.outbox;
                let Some(q) = o.push(piece.clone()) else {
                    continue;
                };
                let high = o.high_water();
                if o.encoding() == Encoding::Hold {
                    all_fit &= q <= high;
                } else {
                    decided = true;
                    fastest_fits |= q <= high;
                }
                all_fit &= q + PIECE <= o.limit();
            }
            st.room = all_fit && (fastest_fits || !decided);
            if self.backend.wants_data() {
                self.backend.console_data(&st.rec, piece);
            }
        };
        vm.held.store(left, Ordering::SeqCst);
        if left < had {
            // Another task may be waiting for the backlog to shrink.
            vm.pace.notify_waiters();
        }
        blocker
    }

    /// Deliver `vm`'s backlog as its consoles and backends make room; ready
    /// when the backlog is empty. Any number of tasks may drive this for
    /// the same VM at once (an old and a new connection, a vMotion's source
    /// and destination): whichever is woken first delivers, under the VM's
    /// lock, in order. Every wait here has its wake-up: a console's outbox
    /// tells `vm.pace` when it drains to its high-water mark, is decided or
    /// closes; attaching a console tells it; a lossless backend's level
    /// wakes its waiters when it drains.
    pub fn pace(self: &Arc<Self>, vm: &Arc<Vm>) -> WaitFuture {
        let (hub, vm) = (self.clone(), vm.clone());
        Box::pin(async move {
            let pace = vm.pace.clone();
            loop {
                let notified = pace.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let blocker = {
                    let mut st = vm.lock();
                    hub.deliver(&vm, &mut st)
                };
                match blocker {
                    None => return,
                    // Another task may deliver meanwhile: look again then.
                    Some(Blocker::Backend(w)) => tokio::select! {
                        _ = w => {}
                        _ = notified => {}
                    },
                    Some(Blocker::Consoles(laggers)) if laggers.is_empty() => notified.await,
                    Some(Blocker::Consoles(laggers)) => {
                        let now = tokio::time::Instant::now();
                        let due = laggers
                            .iter()
                            .map(|l| {
                                tokio::time::Instant::from_std(l.lagging_since(now.into_std()))
                                    + PATIENCE
                            })
                            .min()
                            .unwrap_or(now);
                        tokio::select! {
                            _ = notified => {}
                            _ = tokio::time::sleep_until(due) => {
                                let now = tokio::time::Instant::now().into_std();
                                for l in &laggers {
                                    if l.lagging_since(now) + PATIENCE <= now {
                                        tracing::debug!(
                                            vm = %vm.name(),
                                            "a console held the VM back for the patience time; the VM goes on without it"
                                        );
                                        l.set_behind();
                                    }
                                }
                            }
                        }
                    }
                }
            }
        })
    }

    /// A [`Hub::pace`] for `vm` if output waits in its backlog (for a
    /// connection that now carries the VM and must see it delivered).
    pub fn pace_if_held(self: &Arc<Self>, vm: &Arc<Vm>) -> Option<WaitFuture> {
        (vm.held() > 0).then(|| self.pace(vm))
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
        peer.outbox.pace_with(vm.pace.clone());
        // It may come with output queued already (recent output).
        st.room = false;
        st.consoles.push(Console { peer, access });
        st.idle_since = None;
        drop(st);
        // An empty console is the fastest one: output held back may flow.
        vm.pace.notify_waiters();
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

    /// A VM by any spelling of its uuid, or by its name when exactly one VM
    /// has that name: a name two VMs share (a second VM may claim any name)
    /// finds neither, so a client never lands on an impostor; see
    /// [`Hub::lookup`] to say why.
    pub fn find(&self, what: &str) -> Option<Arc<Vm>> {
        self.lookup(what).ok()
    }

    /// [`Hub::find`], with why nothing was found.
    pub fn lookup(&self, what: &str) -> Result<Arc<Vm>, Lookup> {
        let reg = self.reg();
        if let Some(vm) = crate::vmware::VmUuid::key_of(what).and_then(|k| reg.vms.get(&k)) {
            return Ok(vm.clone());
        }
        if let Some(vm) = reg.vms.values().find(|v| v.uuid == what || v.key == what) {
            return Ok(vm.clone());
        }
        let mut named: Vec<&Arc<Vm>> = reg.vms.values().filter(|v| v.name() == what).collect();
        match named.len() {
            0 => Err(Lookup::NotFound),
            1 => Ok(named.remove(0).clone()),
            _ => {
                let mut uuids: Vec<String> = named.iter().map(|v| v.uuid.clone()).collect();
                uuids.sort();
                Err(Lookup::Ambiguous(uuids))
            }
        }
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
        self.expire_vmotions(now);
        self.expire_vms(now);
    }

    /// Drop the vMotions pending longer than `--vmotion-timeout`: held
    /// console input goes to the source, a bound destination is closed.
    fn expire_vmotions(&self, now: Instant) {
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
    }

    /// Forget the VMs idle (no connection, no console, no vMotion) longer
    /// than `--vm-expire-time`, and return their ports to the pool.
    fn expire_vms(&self, now: Instant) {
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

/// What keeps a VM's backlog from its consoles.
pub enum Blocker {
    /// The fastest console (or one still being told apart) is full; or,
    /// with these in it, consoles are full and their clients behind: the
    /// VM waits [`PATIENCE`] for them at most.
    Consoles(Vec<Arc<Outbox>>),
    /// A lossless backend is over its budget: this completes when it is
    /// back under.
    Backend(WaitFuture),
}

/// Whether the consoles can take another piece of output (of `piece`
/// bytes): no console still being told apart is past its high-water mark;
/// the fastest decided console (the one with the least queued) is not past
/// its own; and no console whose queue is full would have output skipped
/// before it is known to be behind. A full console is waited for if its
/// socket takes more (it is behind only because the daemon has not written
/// to it yet); if its client is behind, it is a lagger, waited for at most
/// [`PATIENCE`] without catching up (the pacer keeps that time), and then
/// it skips the oldest output and is told, and is not waited for again
/// until it has caught up to its high-water mark.
fn consoles_have_room(consoles: &[Console], piece: usize) -> Room {
    let mut fastest: Option<usize> = None;
    let mut room = true;
    let mut laggers = Vec::new();
    for c in consoles {
        let o = &c.peer.outbox;
        let lvl = o.level();
        if lvl.closed {
            continue;
        }
        let past = lvl.queued > o.high_water();
        if lvl.undecided {
            if past {
                return Room::No;
            }
            continue;
        }
        if lvl.queued + piece > o.limit() && !lvl.behind {
            if !o.client_behind() {
                return Room::No;
            }
            laggers.push(o.clone());
        }
        if fastest.is_none_or(|f| lvl.queued < f) {
            fastest = Some(lvl.queued);
            room = !past;
        }
    }
    match (room, laggers.is_empty()) {
        (false, _) => Room::No,
        (true, true) => Room::Yes,
        (true, false) => Room::Laggers(laggers),
    }
}

/// Whether the consoles can take another piece.
enum Room {
    Yes,
    /// The fastest console, one still being told apart, or one the daemon
    /// has not written to yet, is full.
    No,
    /// Only these hold the VM back: full, their clients behind, not yet
    /// behind for [`PATIENCE`].
    Laggers(Vec<Arc<Outbox>>),
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
        held: AtomicUsize::new(0),
        pace: Arc::new(Notify::new()),
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
        backlog: VecDeque::new(),
        room: false,
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
    use std::task::Poll;

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
            Fanout::Held => panic!("held with room in every console"),
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
        let text = crate::doors::http::prometheus::render(&h);
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

    /// A console with the test hub's queue (4096 bytes: high-water mark
    /// 512).
    fn console(h: &Hub, vm: &Vm, encoding: Encoding) -> Peer {
        let c = h.new_peer(h.config().console_queue, encoding);
        h.attach_console(vm, c.clone(), LockMode::FreeForAll)
            .expect("console");
        c
    }

    fn skip_notices(bytes: &[u8]) -> usize {
        bytes
            .windows(b"[vspc: skipped ".len())
            .filter(|w| w == b"[vspc: skipped ")
            .count()
    }

    #[test]
    fn a_lone_console_that_does_not_read_holds_the_vm_and_loses_nothing() {
        let h = hub();
        let p = peer(&h);
        let vm = h.attach_vm(&id(9), p.clone()).expect("attach");
        let c = console(&h, &vm, Encoding::Raw);
        let piece = vec![1u8; 300];
        let mut held = false;
        let mut sent = 0;
        for _ in 0..20 {
            sent += piece.len();
            if h.vm_output(&vm, p.id, Bytes::from(piece.clone())) == Fanout::Held {
                held = true;
            }
        }
        assert!(held, "a console past its high-water mark never held the VM");
        assert!(
            c.outbox.queued() <= 512 + 300,
            "queued {}",
            c.outbox.queued()
        );
        assert_eq!(c.outbox.queued() + vm.held(), sent);
        let (got, _) = written(&c.outbox);
        assert_eq!(skip_notices(&got), 0, "a lone console skipped output");
    }

    /// The fast console reads everything after every piece; the slow one
    /// takes a tenth as much, its socket full. It holds the VM back for
    /// PATIENCE at most, then skips and never holds the VM again.
    #[tokio::test(start_paused = true)]
    async fn the_fastest_console_sets_the_pace_and_a_slow_one_skips() {
        let h = hub();
        let p = peer(&h);
        let vm = h.attach_vm(&id(10), p.clone()).expect("attach");
        let fast = console(&h, &vm, Encoding::Raw);
        let slow = console(&h, &vm, Encoding::Raw);
        slow.outbox.set_full(true);
        let t0 = tokio::time::Instant::now();
        let mut fast_got = Vec::new();
        let mut slow_got = Vec::new();
        let mut held_late = 0;
        for i in 0..1000u32 {
            if h.vm_output(&vm, p.id, Bytes::from(vec![i as u8; 200])) == Fanout::Held {
                if i >= 400 {
                    held_late += 1;
                }
                let mut w = h.pace(&vm);
                let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
                while w.as_mut().poll(&mut cx).is_pending() {
                    fast_got.extend(written(&fast.outbox).0);
                    if let Poll::Ready(crate::outbox::Batch::Data(t)) =
                        crate::testing::poll_once(&slow.outbox, 20)
                    {
                        slow_got.extend(t.into_wire(&mut false).concat());
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            fast_got.extend(written(&fast.outbox).0);
            if let Poll::Ready(crate::outbox::Batch::Data(t)) =
                crate::testing::poll_once(&slow.outbox, 20)
            {
                slow_got.extend(t.into_wire(&mut false).concat());
            }
        }
        assert_eq!(fast_got.len(), 1000 * 200, "the fast console lost bytes");
        assert_eq!(skip_notices(&fast_got), 0);
        assert!(
            skip_notices(&slow_got) > 0,
            "the slow console never skipped"
        );
        assert_eq!(held_late, 0, "a known slow console still held the VM");
        assert!(
            t0.elapsed() < PATIENCE * 3,
            "the VM waited {:?} for a slow console",
            t0.elapsed()
        );
    }

    #[test]
    fn a_console_behind_only_because_the_daemon_is_is_waited_for() {
        let h = hub();
        let p = peer(&h);
        let vm = h.attach_vm(&id(14), p.clone()).expect("attach");
        let fast = console(&h, &vm, Encoding::Raw);
        // Its writer has not run yet, but its socket takes more.
        let lagging = console(&h, &vm, Encoding::Raw);
        let mut held = false;
        for i in 0..100u8 {
            if h.vm_output(&vm, p.id, Bytes::from(vec![i; 200])) == Fanout::Held {
                held = true;
            }
            written(&fast.outbox);
        }
        assert!(held, "the VM never waited for the lagging console");
        assert!(lagging.outbox.queued() <= 4096);
        let (got, _) = written(&lagging.outbox);
        assert_eq!(
            skip_notices(&got),
            0,
            "skipped a console whose client keeps up"
        );
        // Once its client is behind and the VM waited its patience for it,
        // it is not waited for.
        lagging.outbox.set_full(true);
        lagging.outbox.set_behind();
        let mut rounds = 0;
        while vm.held() > 0 {
            written(&fast.outbox);
            let mut st = vm.lock();
            h.deliver(&vm, &mut st);
            rounds += 1;
            assert!(rounds < 1000, "the VM still waits for a console behind");
        }
        written(&fast.outbox);
        for i in 0..100u8 {
            output_owned(&h, &vm, p.id, vec![i; 200]);
            written(&fast.outbox);
        }
        let (got, _) = written(&lagging.outbox);
        assert_eq!(skip_notices(&got), 1);
    }

    /// Consoles that read equally fast on average, taking turns (as readers
    /// on a busy machine do), are waited for: none is skipped, even when
    /// the one that lags has its socket full; one that stayed behind for
    /// the patience time is not waited for any longer.
    #[test]
    fn consoles_that_keep_up_on_average_are_waited_for() {
        let h = hub();
        let p = peer(&h);
        let vm = h.attach_vm(&id(15), p.clone()).expect("attach");
        let a = console(&h, &vm, Encoding::Raw);
        let b = console(&h, &vm, Encoding::Raw);
        // Both sockets are full: their clients are behind now and then.
        a.outbox.set_full(true);
        b.outbox.set_full(true);
        let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
        let mut sent = 0;
        for round in 0..200u32 {
            h.vm_output(&vm, p.id, Bytes::from(vec![round as u8; 300]));
            sent += 300;
            // Each reads only every other stretch of ten rounds.
            if (round / 10) % 2 == 0 {
                got_a.extend(written(&a.outbox).0);
            } else {
                got_b.extend(written(&b.outbox).0);
            }
            let mut st = vm.lock();
            h.deliver(&vm, &mut st);
        }
        while vm.held() > 0 {
            got_a.extend(written(&a.outbox).0);
            got_b.extend(written(&b.outbox).0);
            let mut st = vm.lock();
            h.deliver(&vm, &mut st);
        }
        got_a.extend(written(&a.outbox).0);
        got_b.extend(written(&b.outbox).0);
        assert_eq!(skip_notices(&got_a) + skip_notices(&got_b), 0);
        assert_eq!((got_a.len(), got_b.len()), (sent, sent));
        // b stops; once the VM's pacer has waited its patience: the VM goes
        // on without it.
        b.outbox.set_behind();
        for i in 0..100u8 {
            output_owned(&h, &vm, p.id, vec![i; 300]);
            written(&a.outbox);
        }
        assert_eq!(skip_notices(&written(&b.outbox).0), 1);
    }

    fn output_owned(h: &Hub, vm: &Vm, conn: ConnId, data: Vec<u8>) {
        assert_eq!(h.vm_output(vm, conn, Bytes::from(data)), Fanout::Sent);
    }

    #[test]
    fn a_console_still_being_told_apart_holds_the_vm_and_never_skips() {
        let h = hub();
        let p = peer(&h);
        let vm = h.attach_vm(&id(11), p.clone()).expect("attach");
        let fast = console(&h, &vm, Encoding::Raw);
        let undecided = console(&h, &vm, Encoding::Hold);
        let mut outcome = Fanout::Sent;
        let mut sent = 0;
        while outcome == Fanout::Sent {
            outcome = h.vm_output(&vm, p.id, Bytes::from(vec![5u8; 100]));
            sent += 100;
            written(&fast.outbox);
            assert!(sent < 10_000, "never held for the undecided console");
        }
        assert_eq!(outcome, Fanout::Held);
        assert!(undecided.outbox.queued() <= 512 + 100);
        // Told apart: it is a console like any other, and the fast one
        // sets the pace again.
        undecided.outbox.set_encoding(Encoding::Raw);
        let mut st = vm.lock();
        assert!(h.deliver(&vm, &mut st).is_none(), "backlog not delivered");
        drop(st);
        assert_eq!(vm.held(), 0);
        let (got, _) = written(&undecided.outbox);
        assert_eq!(got.len(), sent, "the undecided console lost output");
        assert_eq!(skip_notices(&got), 0);
    }

    #[test]
    fn the_vm_reader_holds_a_bounded_backlog_then_stops() {
        let h = hub();
        let p = peer(&h);
        let vm = h.attach_vm(&id(12), p.clone()).expect("attach");
        let _stuck = console(&h, &vm, Encoding::Raw);
        let mut n = 0;
        while !vm.holds_too_much() {
            h.vm_output(&vm, p.id, Bytes::from(vec![0u8; 60_000]));
            n += 1;
            assert!(n < 100, "the backlog never filled");
        }
        assert!(vm.held() < VM_HOLD + 60_000);
    }

    /// A console that lags with its client behind is waited for PATIENCE
    /// at most; then the VM goes on without it.
    #[tokio::test(start_paused = true)]
    async fn a_lagger_is_waited_for_its_patience_at_most() {
        let h = hub();
        let p = peer(&h);
        let vm = h.attach_vm(&id(16), p.clone()).expect("attach");
        let fast = console(&h, &vm, Encoding::Raw);
        let stuck = console(&h, &vm, Encoding::Raw);
        stuck.outbox.set_full(true);
        let mut held = false;
        for i in 0..100u8 {
            held |= h.vm_output(&vm, p.id, Bytes::from(vec![i; 300])) == Fanout::Held;
            written(&fast.outbox);
        }
        assert!(held, "never waited for a console behind for the first time");
        let t0 = tokio::time::Instant::now();
        let mut w = h.pace(&vm);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(w.as_mut().poll(&mut cx).is_pending());
        tokio::time::sleep(PATIENCE - Duration::from_millis(10)).await;
        written(&fast.outbox);
        assert!(w.as_mut().poll(&mut cx).is_pending(), "gave up early");
        // Past the patience: the VM goes on, and the stuck one skips.
        let mut rounds = 0;
        while w.as_mut().poll(&mut cx).is_pending() {
            tokio::time::sleep(Duration::from_millis(10)).await;
            written(&fast.outbox);
            rounds += 1;
            assert!(rounds < 100, "waited past its patience");
        }
        assert!(t0.elapsed() >= PATIENCE);
        assert_eq!(skip_notices(&written(&stuck.outbox).0), 1);
    }

    #[tokio::test]
    async fn pacing_resumes_when_a_console_drains_attaches_or_closes() {
        let h = hub();
        let p = peer(&h);
        let vm = h.attach_vm(&id(13), p.clone()).expect("attach");
        let c = console(&h, &vm, Encoding::Raw);
        let fill = |h: &Hub| {
            while h.vm_output(&vm, p.id, Bytes::from(vec![3u8; 300])) == Fanout::Sent {}
        };
        let done = |w: &mut WaitFuture| {
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            w.as_mut().poll(&mut cx).is_ready()
        };
        // Draining the console.
        fill(&h);
        let mut w = h.pace(&vm);
        assert!(!done(&mut w));
        written(&c.outbox);
        tokio::time::timeout(Duration::from_secs(5), &mut w)
            .await
            .expect("draining the console never resumed the VM");
        // A new console arriving: it is the fastest.
        fill(&h);
        let mut w = h.pace(&vm);
        assert!(!done(&mut w));
        let _fresh = console(&h, &vm, Encoding::Raw);
        tokio::time::timeout(Duration::from_secs(5), &mut w)
            .await
            .expect("a new console never resumed the VM");
        assert_eq!(vm.held(), 0);
        // Every console closing.
        fill(&h);
        let mut w = h.pace(&vm);
        assert!(!done(&mut w));
        for con in vm.lock().consoles.iter() {
            con.peer.outbox.close(None);
        }
        tokio::time::timeout(Duration::from_secs(5), &mut w)
            .await
            .expect("closing the consoles never resumed the VM");
    }
}

#[cfg(test)]
mod stress {
    //! The wait/wake protocol between a VM's reader, its backlog, the
    //! consoles' outboxes and their writers, on real threads: a reader that
    //! drives [`Hub::pace`] as a VM connection does, writers that take
    //! batches as a connection does and are "descheduled" at random (their
    //! socket full, then not), a console still being told apart, and a
    //! console that joins and one that leaves mid-stream. Every byte must
    //! reach every console that stays, in order, none skipped, and nothing
    //! may hang: a lost wake-up shows as a run that does not finish.
    use super::*;
    use crate::outbox::{Batch, BATCH_BYTES};
    use std::future::poll_fn;
    use std::task::Poll;

    const PERIOD: usize = 251;
    const TOTAL: usize = 6 << 20;

    /// A tiny deterministic generator (xorshift), one per task.
    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    /// Take batches as a connection's writer does, checking that the bytes
    /// are the pattern from 0 on; now and then the "socket" is full for a
    /// few milliseconds. Returns the bytes received and whether a notice
    /// was seen.
    async fn writer(o: Arc<Outbox>, seed: u64, until: usize) -> (usize, bool) {
        let mut rng = Rng(seed);
        let mut at = 0usize;
        let mut notice = false;
        // To the end of the stream (the outbox closing), or `until` bytes.
        while at < until {
            let batch = poll_fn(|cx| o.poll_batch(cx, BATCH_BYTES)).await;
            let Batch::Data(t) = batch else { break };
            for chunk in t.into_wire(&mut false) {
                for &b in chunk.iter() {
                    if b as usize != at % PERIOD {
                        notice = true;
                    }
                    at += 1;
                }
            }
            match rng.below(8) {
                0 => {
                    o.set_full(true);
                    tokio::time::sleep(Duration::from_micros(rng.below(3000))).await;
                    o.set_full(false);
                }
                1 | 2 => tokio::task::yield_now().await,
                _ => {}
            }
        }
        (at, notice)
    }

    async fn one_run(seed: u64) {
        let h = crate::testing::hub(Duration::from_secs(60), Duration::from_secs(30), 1 << 20);
        let vm_peer = h.new_peer(1 << 20, Encoding::Telnet);
        let id = Identity {
            key: format!("{seed:032x}"),
            uuid: format!("u{seed}"),
            name: format!("stress-{seed}"),
        };
        let vm = h.attach_vm(&id, vm_peer.clone()).expect("attach");
        let join = |enc| {
            let c = h.new_peer(1 << 20, enc);
            h.attach_console(&vm, c.clone(), LockMode::FreeForAll)
                .expect("console");
            c
        };
        let mut writers = Vec::new();
        for k in 0..3u64 {
            let c = join(Encoding::Raw);
            writers.push(tokio::spawn(writer(
                c.outbox.clone(),
                seed * 31 + k + 1,
                usize::MAX,
            )));
        }
        // Told apart a little later, as a silent client is.
        let undecided = join(Encoding::Hold);
        writers.push(tokio::spawn(writer(
            undecided.outbox.clone(),
            seed * 31 + 7,
            usize::MAX,
        )));
        tokio::spawn({
            let o = undecided.outbox.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                o.set_encoding(Encoding::Raw);
            }
        });
        // One leaves mid-stream (its connection closes).
        let leaver = join(Encoding::Raw);
        let leaving = tokio::spawn(writer(leaver.outbox.clone(), seed * 31 + 9, TOTAL / 3));

        // The VM's reader: pieces of random sizes, driving the pace as a VM
        // connection does (read on while the backlog is under VM_HOLD).
        let reader = {
            let (h, vm, id) = (h.clone(), vm.clone(), vm_peer.id);
            tokio::spawn(async move {
                let mut rng = Rng(seed | 1);
                let mut pace: Option<WaitFuture> = None;
                let mut at = 0usize;
                while at < TOTAL {
                    poll_fn(|cx| {
                        if let Some(w) = pace.as_mut() {
                            if w.as_mut().poll(cx).is_ready() {
                                pace = None;
                            } else if vm.holds_too_much() {
                                return Poll::Pending;
                            }
                        }
                        Poll::Ready(())
                    })
                    .await;
                    let n = (1 + rng.below(64 * 1024) as usize).min(TOTAL - at);
                    let piece: Vec<u8> = (at..at + n).map(|i| (i % PERIOD) as u8).collect();
                    at += n;
                    if h.vm_output(&vm, id, Bytes::from(piece)) == Fanout::Held && pace.is_none() {
                        pace = Some(h.pace(&vm));
                    }
                    if rng.below(16) == 0 {
                        tokio::task::yield_now().await;
                    }
                }
                if let Some(w) = pace {
                    w.await;
                }
            })
        };
        let (left_at, _) = leaving.await.expect("leaver");
        h.detach_console(&vm, leaver.id);
        leaver.outbox.close(None);
        assert!(left_at >= TOTAL / 3);
        // A console joining mid-stream gets what follows its join.
        let late = join(Encoding::Raw);
        let late_writer = tokio::spawn(async move {
            let mut got = 0usize;
            while let Batch::Data(t) = poll_fn(|cx| late.outbox.poll_batch(cx, BATCH_BYTES)).await {
                got += t
                    .into_wire(&mut false)
                    .iter()
                    .map(|c| c.len())
                    .sum::<usize>();
            }
            got
        });
        if tokio::time::timeout(Duration::from_secs(30), reader)
            .await
            .is_err()
        {
            let levels: Vec<String> = vm
                .lock()
                .consoles
                .iter()
                .map(|c| {
                    let l = c.peer.outbox.level();
                    format!(
                        "{} queued, undecided {}, behind {}, client behind {}",
                        l.queued,
                        l.undecided,
                        l.behind,
                        c.peer.outbox.client_behind(),
                    )
                })
                .collect();
            panic!(
                "run {seed}: the VM's reader hung with {} bytes held; consoles: {levels:#?}",
                vm.held()
            );
        }
        assert_eq!(vm.held(), 0);
        for c in vm.lock().consoles.iter() {
            c.peer.outbox.close(None);
        }
        for w in writers {
            let (got, notice) = w.await.expect("writer");
            assert!(!notice, "a console that kept up was skipped (seed {seed})");
            assert_eq!(got, TOTAL, "a console lost bytes (seed {seed})");
        }
        assert!(late_writer.await.expect("late") <= TOTAL);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn every_byte_and_no_lost_wake_up_under_random_scheduling() {
        for seed in 1..=20u64 {
            tokio::time::timeout(Duration::from_secs(60), one_run(seed))
                .await
                .unwrap_or_else(|_| panic!("run {seed} hung: a wait was never woken"));
        }
    }
}
