//! The registry of VMs: key -> entry (name, port, VM connection, consoles,
//! pending vMotion, idle-since). Port allocation and expiry live here.
//!
//! Locks are taken in one order only: the registry, then a VM's state, then
//! the vMotion table. Console fan-out takes just the VM's own lock, so VMs
//! never contend with each other. Nothing here touches a socket: connections
//! are [`Attached`]s (an id and an [`Outbox`]), and console listeners are opened
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

mod cluster;
mod consoles;
mod expiry;
mod fanout;
mod registry;
pub mod replay;
mod vmotion;

pub use cluster::{
    find_remote, ClusterHooks, HookFuture, RemoteError, RemoteOpened, RemotePeer, RemoteSpec,
    RemoteVm,
};
use fanout::flush_held;
pub use fanout::Blocker;

/// Identifies one connection for the life of the process.
pub type ConnId = u64;

/// A connection as the hub sees it: its id and the queue its output goes
/// to (who is at the other end, and where, is the door's business).
#[derive(Debug, Clone)]
pub struct Attached {
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
    /// Bytes of each VM's recent output kept for consoles that join later
    /// (`--replay-bytes`; 0: none).
    pub replay_bytes: usize,
    /// Telnet clients on the console ports get the recent output too
    /// (`--console-replay`).
    pub console_replay: bool,
}

/// What a joining console is given of what its VM said before.
#[derive(Debug, Clone, Copy)]
pub enum Replay<'a> {
    /// Nothing.
    None,
    /// Queued ahead of live output and followed by [`replay::MARKER`]: the
    /// VM's replay ring, or these bytes (a backend's scrollback) when the
    /// ring is empty.
    Show(&'a [u8]),
    /// The same bytes, handed back to the caller rather than queued.
    Return(&'a [u8]),
    /// A console following its VM here from another node (cluster mode):
    /// the output it missed on the way, queued as live output (no marker):
    /// from its [`replay::Position`] when that is counted as this node
    /// counts the VM's output, else everything the VM said since it came
    /// to this node. What the ring no longer holds is lost, and logged.
    Follow(Option<replay::Position>),
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

/// Bytes of the random secret at the end of a vMotion cookie (after the
/// sequence ESXi gave).
pub const SECRET_LEN: usize = 8;

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
    active: Option<Attached>,
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
    /// The VM's most recent output ([`replay`]); allocated at its first
    /// output.
    replay: Option<Box<replay::Ring>>,
    /// Where the VM's output stands: `said` bytes delivered, counted since
    /// `origin` (see [`replay::Position`]).
    said: u64,
    origin: u64,
    /// `said` when this entry's own output began (after the count of the
    /// node the VM came from was taken over).
    base: u64,
    /// `said` when the VM was let go here (cluster mode): every console
    /// it had then was given the output up to there.
    left_at: Option<u64>,
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
    peer: Attached,
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
    /// A console following its VM from another node of the cluster: the
    /// access it held there, taken again without the lock checks (its
    /// lock moved with the VM; the consoles that follow re-attach in any
    /// order). No client asks for it.
    Keep(Access),
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

    /// A name for the mode ([`LockMode::parse`] reads each but
    /// `read-only`).
    pub fn name(self) -> &'static str {
        match self {
            LockMode::Exclusive => "exclusive",
            LockMode::Write => "write",
            LockMode::FreeForAll => "free-for-all",
            LockMode::FreeForAllOrReadOnly => "free-for-all-or-readonly",
            LockMode::ReadOnly => "read-only",
            LockMode::Keep(Access::Exclusive) => "keep-exclusive",
            LockMode::Keep(Access::Write) => "keep-write",
            LockMode::Keep(Access::FreeForAll) => "keep-free-for-all",
            LockMode::Keep(Access::ReadOnly) => "keep-read-only",
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
    /// The inverse of [`Access::as_str`].
    pub fn parse(s: &str) -> Option<Access> {
        [
            Access::Exclusive,
            Access::Write,
            Access::FreeForAll,
            Access::ReadOnly,
        ]
        .into_iter()
        .find(|a| a.as_str() == s)
    }

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
    dest: Option<Attached>,
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
    #[error("cannot open console port {port}: {why}")]
    PortFailed { port: u16, why: String },
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
    /// Cluster mode's hook (`--cluster`); unset on a single node.
    cluster: OnceLock<Arc<dyn ClusterHooks>>,
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
            cluster: OnceLock::new(),
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
    pub fn new_peer(&self, limit: usize, encoding: Encoding) -> Attached {
        Attached {
            id: self.new_id(),
            outbox: Arc::new(Outbox::new(limit, encoding)),
        }
    }

    /// The rows the admin listing shows (the backend may edit them).
    pub async fn listing(&self) -> Vec<VmRecord> {
        self.backend.list_rows(self.records()).await
    }

    /// What `vm`'s replay ring holds now, as it was sent (`GET
    /// /api/v1/vms/{vm}/recent`); empty when nothing was said or the ring
    /// is off.
    pub fn recent(&self, vm: &Vm) -> Vec<u8> {
        vm.lock()
            .replay
            .as_deref()
            .map(replay::Ring::contents)
            .unwrap_or_default()
    }

    /// The last `max` bytes of `vm`'s output: a backend's transcript, else
    /// its replay ring; `None` when neither is kept (`/console_log`, here
    /// or fetched by another node).
    pub async fn console_log(&self, vm: &Vm, max: usize) -> Option<Vec<u8>> {
        if let Some(log) = self.backend.console_log(vm.record(), max).await {
            return Some(log);
        }
        if self.cfg.replay_bytes == 0 {
            return None;
        }
        let mut ring = self.recent(vm);
        ring.drain(..ring.len().saturating_sub(max));
        Some(ring)
    }

    /// Whether `vm`'s replay ring holds nothing (then a backend's
    /// scrollback is worth fetching).
    pub fn replay_is_empty(&self, vm: &Vm) -> bool {
        vm.lock()
            .replay
            .as_deref()
            .is_none_or(replay::Ring::is_empty)
    }

    /// Failed accepts on the console ports so far (counted by the network
    /// layer's accepting thread).
    pub fn console_accept_errors(&self) -> u64 {
        self.opener.get().map_or(0, |o| o.accept_errors())
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod stress;
