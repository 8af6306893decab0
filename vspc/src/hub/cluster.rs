//! The hub's side of cluster mode (`--cluster`): a narrow hook the cluster
//! module installs once. Without it (a single node) nothing here runs and
//! every path is the one it always was.
//!
//! The hub tells the hook what happens to its VMs (claimed, disconnected,
//! renamed, expired, a vMotion begun or ended) and asks it for the VMs
//! other nodes hold (listings). The hook tells the hub, through the
//! methods below, when a VM was taken by another node or its port moved.

use super::*;
use std::future::Future;
use std::pin::Pin;

/// A boxed future the hook returns.
pub type HookFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A VM another node of the cluster holds, as listings show it.
#[derive(Debug, Clone)]
pub struct RemoteVm {
    pub record: VmRecord,
    /// The node holding it.
    pub node: String,
    /// Its ESXi connection is up (on that node).
    pub connected: bool,
}

/// A vMotion whose source is another node, as its ticket says.
#[derive(Debug, Clone)]
pub struct RemotePeer {
    pub uuid: String,
    /// The source node.
    pub node: String,
    /// The sequence to answer PEER-OK and expect COMPLETE with.
    pub seq: Vec<u8>,
}

/// How a door asks for a console of a VM another node holds.
#[derive(Debug, Clone)]
pub struct RemoteSpec {
    /// The lock asked for.
    pub mode: LockMode,
    /// How the door's client speaks.
    pub protocol: ConsoleProtocol,
    /// The VM's recent output first, then a marker line (as the door
    /// gives it for a local VM).
    pub history: bool,
    /// The door (`audit::Kind::as_str`), its client and user, for the
    /// holding node's audit line.
    pub door: &'static str,
    pub client: Option<SocketAddr>,
    pub user: Option<String>,
}

/// A console opened on the node holding its VM. The door serves `pipe`
/// as its console (bytes both ways, as a local session's pipe); the
/// console follows the VM to other nodes, and the pipe ends when the
/// console does.
pub struct RemoteOpened {
    pub vm: RemoteVm,
    /// The lock the holding node granted.
    pub access: Access,
    pub pipe: tokio::io::DuplexStream,
}

/// Why a console of another node's VM could not be opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoteError {
    /// No other node holds a VM of that name or uuid.
    NotFound,
    /// More VMs than one have that name (their uuids).
    Ambiguous(Vec<String>),
    /// The holding node refused (a lock, its client limit) or cannot be
    /// reached: the reason.
    Refused(String),
}

/// The VM of `vms` (other nodes') that `what` names: its uuid in any of
/// VMware's spellings, or a name only one of them has, as the hub's
/// lookup finds local ones.
pub fn find_remote(vms: Vec<RemoteVm>, what: &str) -> Result<RemoteVm, RemoteError> {
    let key = crate::vmware::VmUuid::key_of(what);
    let same = |v: &RemoteVm| {
        v.record.uuid == what
            || key.is_some() && crate::vmware::VmUuid::key_of(&v.record.uuid) == key
    };
    if let Some(v) = vms.iter().find(|v| same(v)) {
        return Ok(v.clone());
    }
    let mut named: Vec<RemoteVm> = vms.into_iter().filter(|v| v.record.name == what).collect();
    match named.len() {
        0 => Err(RemoteError::NotFound),
        1 => Ok(named.remove(0)),
        _ => {
            let mut uuids: Vec<String> = named.into_iter().map(|v| v.record.uuid).collect();
            uuids.sort();
            Err(RemoteError::Ambiguous(uuids))
        }
    }
}

/// What a cluster does for the hub.
pub trait ClusterHooks: Send + Sync {
    /// This node's name (`--node-name`).
    fn node(&self) -> &str;
    /// A VM identified here: its port, unique across the cluster (the
    /// control plane's, or a local one while it is down).
    fn claim(
        &self,
        uuid: &str,
        name: &str,
        preferred: Option<u16>,
    ) -> HookFuture<Result<u16, String>>;
    /// The VM's ESXi connection closed here.
    fn disconnected(&self, uuid: &str);
    /// The VM sent a new name.
    fn renamed(&self, uuid: &str, name: &str);
    /// The VM expired here.
    fn expired(&self, uuid: &str);
    /// VMOTION-BEGIN is to be answered with GOAHEAD `cookie` (sequence +
    /// secret): ready once the cluster knows the vMotion (or gave up
    /// trying), so that a destination on any node that presents the cookie
    /// is recognised at once. GOAHEAD waits for it.
    fn vmotion_begun(&self, uuid: &str, seq: &[u8], secret: &[u8]) -> HookFuture<()>;
    /// The vMotion of `seq` ended (complete, aborted, timed out).
    fn vmotion_ended(&self, uuid: &str, seq: &[u8]);
    /// A VMOTION-PEER whose cookie no local vMotion has: the vMotion of
    /// another node it names, if that node stored a ticket for it.
    fn remote_peer(&self, cookie: &[u8]) -> HookFuture<Result<Option<RemotePeer>, String>>;
    /// VMOTION-COMPLETE of such a vMotion: the VM is claimed for this node
    /// (name and port).
    fn claim_moved(&self, uuid: &str) -> HookFuture<Result<(String, u16), String>>;
    /// The VM `uuid` attached here after a vMotion from node `from`: that
    /// node lets go of it and hands over the console input it held.
    fn took_over(&self, uuid: &str, from: &str);
    /// The VMs other nodes hold (not this one).
    fn remote_vms(&self) -> Vec<RemoteVm>;
    /// The cluster's nodes, for `GET /api/v1/cluster`.
    fn describe(&self) -> serde_json::Value;
    /// The cluster's lines of `/metrics` (Prometheus text).
    fn metrics_text(&self) -> String;
    /// The recent console output of a VM another node holds (`None`: no
    /// such VM elsewhere, or no log).
    fn remote_log(&self, uuid: &str, max: usize) -> HookFuture<Result<Option<Vec<u8>>, String>>;
    /// Open a console of the VM named `what` (name or uuid) that another
    /// node holds, for a door (the admin port's `connect`, SSH, the
    /// browser).
    fn open_remote(
        &self,
        what: &str,
        spec: RemoteSpec,
    ) -> HookFuture<Result<RemoteOpened, RemoteError>>;
}

impl Hub {
    /// Install the cluster's hook (once, at start-up).
    pub fn set_cluster(&self, hooks: Arc<dyn ClusterHooks>) {
        if self.cluster.set(hooks).is_err() {
            tracing::error!("cluster hook installed twice; keeping the first");
        }
    }

    /// The cluster's hook, in cluster mode.
    pub fn cluster(&self) -> Option<&Arc<dyn ClusterHooks>> {
        self.cluster.get()
    }

    /// In cluster mode, the claim of `id`'s port to wait for before
    /// [`Hub::attach_vm_at`]; `None` on a single node (attach at once).
    pub fn cluster_claim(&self, id: &Identity) -> Option<HookFuture<Result<u16, String>>> {
        let c = self.cluster.get()?;
        if !self.cfg.vm_ports {
            return None;
        }
        let preferred = self.reg().vms.get(&id.key).and_then(|v| v.port);
        Some(c.claim(&id.uuid, &id.name, preferred))
    }

    /// The local VM on console port `port`.
    pub fn vm_on_port(&self, port: u16) -> Option<Arc<Vm>> {
        let reg = self.reg();
        if !reg.ports.contains(&port) {
            return None;
        }
        reg.vms.values().find(|v| v.port == Some(port)).cloned()
    }

    /// Whether a local VM holds console port `port`.
    pub fn port_in_use(&self, port: u16) -> bool {
        self.reg().ports.contains(&port)
    }

    /// Take the console input held for `uuid`'s pending vMotion (escaped,
    /// as it goes to the VM).
    pub fn take_held_input(&self, uuid: &str) -> Vec<u8> {
        let Some(vm) = self.find(uuid) else {
            return Vec::new();
        };
        let mut st = vm.lock();
        st.held_bytes = 0;
        st.held.drain(..).flat_map(|b| b.to_vec()).collect()
    }

    /// Queue console input (escaped) for `uuid`'s connection here: what
    /// another node held during a vMotion to this one.
    pub fn deliver_held_input(&self, uuid: &str, data: Bytes) -> bool {
        let Some(vm) = self.find(uuid) else {
            return false;
        };
        let st = vm.lock();
        match &st.active {
            Some(a) => a.outbox.push_always(data),
            None => false,
        }
    }

    /// The VM `uuid` is another node's now (a newer connection there, or
    /// a vMotion to it): its connection here is closed, and its entry
    /// goes, with its consoles told `why` (or, `quiet`, closed without a
    /// word: they follow the VM). Returns where its output stood then and
    /// its ring (for the node that took it), if it was here.
    pub fn let_go(
        &self,
        uuid: &str,
        why: &str,
        quiet: bool,
    ) -> Option<(replay::Position, Vec<u8>)> {
        let vm = {
            let mut reg = self.reg();
            let key = reg
                .vms
                .iter()
                .find(|(_, v)| v.uuid == uuid)
                .map(|(k, _)| k.clone())?;
            let vm = reg.vms.remove(&key)?;
            if let Some(port) = vm.port {
                reg.ports.remove(&port);
            }
            let m = &self.metrics;
            m.retired_out
                .fetch_add(vm.bytes_from_vm(), Ordering::Relaxed);
            m.retired_in.fetch_add(vm.bytes_to_vm(), Ordering::Relaxed);
            vm
        };
        self.retire(&vm, why, quiet);
        let st = vm.lock();
        let ring = st
            .replay
            .as_deref()
            .map(replay::Ring::contents)
            .unwrap_or_default();
        Some((
            replay::Position {
                origin: st.origin,
                said: st.said,
            },
            ring,
        ))
    }

    /// Where `vm`'s output stood when it was let go here: what every
    /// console it had then was given, for the resume token of a console
    /// that follows it to its next node. `None` while it is here.
    pub fn left_at(&self, vm: &Vm) -> Option<replay::Position> {
        let st = vm.lock();
        st.left_at.map(|said| replay::Position {
            origin: st.origin,
            said,
        })
    }

    /// VM `uuid` came here from another node, whose count of its output
    /// stood at `at` with `recent` its last bytes: count on from there
    /// (after what was said here already) and put them in front of the
    /// ring, so that consoles following it resume where they were.
    pub fn adopt_output(&self, uuid: &str, at: replay::Position, recent: &[u8]) {
        let Some(vm) = self.find(uuid) else {
            return;
        };
        let cap = self.cfg.replay_bytes;
        let mut st = vm.lock();
        if st.base != 0 || st.origin == at.origin {
            return; // taken over already
        }
        st.origin = at.origin;
        st.base = at.said;
        st.said += at.said;
        if cap > 0 && !recent.is_empty() {
            st.replay
                .get_or_insert_with(Default::default)
                .prepend(recent, cap);
        }
    }

    /// Close everything `vm` had: its connection, its consoles (told
    /// `why`), its listener.
    pub(super) fn retire(&self, vm: &Vm, why: &str, quiet: bool) {
        let mut st = vm.lock();
        st.gone = true;
        st.listener = None;
        let active = st.active.take();
        let consoles = std::mem::take(&mut st.consoles);
        // The consoles had everything up to here; what the VM said that
        // they had no room for yet goes to the ring only, for the node
        // the VM goes to (its consoles follow it there).
        st.left_at = Some(st.said);
        let cap = self.cfg.replay_bytes;
        while let Some(piece) = st.backlog.pop_front() {
            st.said += piece.len() as u64;
            if cap > 0 {
                st.replay
                    .get_or_insert_with(Default::default)
                    .push(&piece, cap);
            }
        }
        vm.held.store(0, Ordering::SeqCst);
        st.vmotion = None;
        st.held.clear();
        st.held_bytes = 0;
        let name = st.name.clone();
        drop(st);
        if let Some(a) = active {
            a.outbox.close(None);
        }
        let msg = (!quiet).then(|| Bytes::from(format!("\r\nvspc: {why}; disconnecting.\r\n")));
        for c in &consoles {
            c.peer.outbox.close(msg.clone());
            self.backend.console_detached(vm.record());
        }
        tracing::info!(vm = %name, consoles = consoles.len(), "{why}; let go of the VM here");
    }
}
