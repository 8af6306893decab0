//! The registry: VMs by key, their names and console ports (allocated from
//! `--port-range-start`, sticky per uuid), VM connections coming and going,
//! and look-ups by name or uuid.

use super::*;

impl Hub {
    /// Create the entries the backend persisted, reserving their ports and
    /// opening their listeners before any VM connects. Returns how many
    /// ports could not be reopened.
    pub fn preload(&self, records: Vec<VmRecord>, now: Instant) -> usize {
        let mut reg = self.reg();
        let mut failed = 0;
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

    pub(super) fn open_port(&self, vm: &Arc<Vm>, port: u16) -> std::io::Result<ListenerGuard> {
        match self.opener.get() {
            Some(o) => o.open(vm.clone(), port),
            None => Err(std::io::Error::other("no network layer installed")),
        }
    }

    /// Create a VM entry with the lowest free console port.
    pub(super) fn create(&self, reg: &mut Registry, id: &Identity) -> Result<Arc<Vm>, AttachError> {
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

    /// Create a VM entry on console port `port` exactly (cluster mode: the
    /// port the cluster gave it).
    pub(super) fn create_at(
        &self,
        reg: &mut Registry,
        id: &Identity,
        port: u16,
    ) -> Result<Arc<Vm>, AttachError> {
        if reg.ports.contains(&port) {
            return Err(AttachError::PortFailed {
                port,
                why: "another VM here holds it".into(),
            });
        }
        let vm = new_vm(
            id.key.clone(),
            id.uuid.clone(),
            Some(port),
            id.name.clone(),
            None,
        );
        let guard = self
            .open_port(&vm, port)
            .map_err(|e| AttachError::PortFailed {
                port,
                why: e.to_string(),
            })?;
        vm.lock().listener = Some(guard);
        reg.ports.insert(port);
        Ok(vm)
    }

    /// Make `peer` the connection of the VM `id` names, creating the entry
    /// (and its console port) on first sight. A connection the VM had
    /// before is closed: the newest one wins (a host restart leaves the old
    /// socket half-open).
    pub fn attach_vm(&self, id: &Identity, peer: Attached) -> Result<Arc<Vm>, AttachError> {
        self.attach_vm_at(id, peer, None)
    }

    /// [`Hub::attach_vm`], with the console port the cluster gave the VM
    /// (`Some`): an entry here on another port is replaced by one on it.
    pub fn attach_vm_at(
        &self,
        id: &Identity,
        peer: Attached,
        port: Option<u16>,
    ) -> Result<Arc<Vm>, AttachError> {
        let addr = self.addr_of(peer.id);
        let mut reg = self.reg();
        let existing = reg.vms.get(&id.key).cloned();
        if let (Some(old), Some(port)) = (&existing, port) {
            if old.port != Some(port) {
                reg.vms.remove(&id.key);
                if let Some(p) = old.port {
                    reg.ports.remove(&p);
                }
                self.retire(
                    old,
                    &format!(
                        "this VM's console port moved to {port} (a cluster conflict was settled)"
                    ),
                    false,
                );
            }
        }
        let (vm, renamed) = match reg.vms.get(&id.key) {
            Some(vm) => (vm.clone(), vm.name() != id.name),
            None => {
                let vm = match port {
                    Some(p) => self.create_at(&mut reg, id, p)?,
                    None => self.create(&mut reg, id)?,
                };
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
    pub fn detach_vm(&self, vm: &Vm, conn: ConnId, now: Instant) {
        let mut st = vm.lock();
        if st.active.as_ref().map(|p| p.id) != Some(conn) {
            return;
        }
        st.active = None;
        st.connected_since = None;
        st.peer_addr = None;
        if st.consoles.is_empty() && st.vmotion.is_none() {
            st.idle_since = Some(now);
        }
        drop(st);
        let rec = vm.record();
        tracing::info!(vm = %rec.name, "VM disconnected; its port and consoles stay");
        if let Some(c) = self.cluster.get() {
            c.disconnected(&rec.uuid);
        }
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
        if let Some(c) = self.cluster.get() {
            c.renamed(&vm.uuid, name);
        }
        self.backend.vm_renamed(vm.record(), old);
    }

    /// Every VM the hub knows, as listing rows; in cluster mode, the VMs
    /// other nodes hold too.
    pub fn records(&self) -> Vec<VmRecord> {
        let vms: Vec<Arc<Vm>> = self.reg().vms.values().cloned().collect();
        let mut rows: Vec<VmRecord> = vms.iter().map(|v| v.record()).collect();
        if let Some(c) = self.cluster.get() {
            let here: std::collections::HashSet<&str> =
                vms.iter().map(|v| v.uuid.as_str()).collect();
            let remote: Vec<VmRecord> = c
                .remote_vms()
                .into_iter()
                .filter(|r| !here.contains(r.record.uuid.as_str()))
                .map(|r| r.record)
                .collect();
            rows.extend(remote);
        }
        rows.sort_by(|a, b| a.name.cmp(&b.name).then(a.uuid.cmp(&b.uuid)));
        rows
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
}

pub(super) fn new_vm(
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

pub(super) fn new_state(name: String, rec: Arc<FfiRecord>, idle_since: Option<Instant>) -> VmState {
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
        replay: None,
        said: 0,
        origin: replay::new_origin(),
        base: 0,
        left_at: None,
    }
}
