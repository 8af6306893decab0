//! Runs each backend on its own OS thread, fed by a queue in event order.
//!
//! Backends may block (disk, network, a plugin's own locks); console traffic
//! must not. Hooks are queued and the daemon goes on. Console-data events
//! are counted while queued: past [`DATA_QUEUE_LIMIT`] further ones for that
//! backend are dropped, with a counter and a rate-limited warning. Mapping
//! events (connect, rename, disconnect, expiry, console attach/detach) are
//! never dropped. Queries (listing rows, seed data) get their answer through
//! a oneshot channel. When a backend's queue runs empty it gets `idle()`, so
//! it can write batched state.
//!
//! Every call goes through the backend's stable-ABI object, built-in or
//! plugin alike; panics are caught on the backend's side of that boundary.

use bytes::Bytes;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;
use tokio::sync::oneshot;
use vspc_backend_api::abi_stable::std_types::{RSlice, RStr, RVec};
use vspc_backend_api::ffi::{BackendBox, FfiRecord};
use vspc_backend_api::VmRecord;

/// Console-data events that may wait in one backend's queue before new ones
/// are dropped.
pub const DATA_QUEUE_LIMIT: usize = 4096;

enum Job {
    Connected(FfiRecord),
    Renamed(FfiRecord, String),
    Disconnected(FfiRecord),
    Expired(FfiRecord),
    ConsoleAttached(FfiRecord),
    ConsoleDetached(FfiRecord),
    Data(FfiRecord, Bytes),
    ListRows(Vec<VmRecord>, oneshot::Sender<Vec<VmRecord>>),
    Seed(FfiRecord, oneshot::Sender<Vec<u8>>),
    Reopen,
    Shutdown(std::sync::mpsc::Sender<()>),
}

/// The daemon's handle on one backend thread.
struct Host {
    name: String,
    tx: mpsc::Sender<Job>,
    wants_data: bool,
    /// Data events queued and not yet handled.
    queued_data: Arc<AtomicUsize>,
    /// Data events dropped because the queue was full.
    dropped: AtomicU64,
}

impl Host {
    fn spawn(backend: BackendBox) -> std::io::Result<Host> {
        let name = backend.name().to_string();
        let wants_data = backend.wants_console_data();
        let (tx, rx) = mpsc::channel();
        let queued_data = Arc::new(AtomicUsize::new(0));
        let counter = queued_data.clone();
        std::thread::Builder::new()
            .name(format!("backend-{name}"))
            .spawn(move || run(backend, rx, counter))?;
        Ok(Host {
            name,
            tx,
            wants_data,
            queued_data,
            dropped: AtomicU64::new(0),
        })
    }

    fn send(&self, job: Job) {
        if self.tx.send(job).is_err() {
            tracing::error!(backend = %self.name, "backend thread is gone; event lost");
        }
    }

    fn data(&self, vm: &FfiRecord, data: &Bytes) {
        if !self.wants_data {
            return;
        }
        if self.queued_data.load(Ordering::Relaxed) >= DATA_QUEUE_LIMIT {
            let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::warn!(
                    backend = %self.name,
                    dropped = n,
                    "backend queue full: console data for it is being dropped"
                );
            }
            return;
        }
        self.queued_data.fetch_add(1, Ordering::Relaxed);
        self.send(Job::Data(vm.clone(), data.clone()));
    }
}

/// Every configured backend, in `--backend` order.
pub struct Backends {
    hosts: Vec<Host>,
    wants_data: bool,
}

impl Backends {
    /// Start each backend on its own thread. Call after `configure` and
    /// `load_map`, which run on the caller's thread so their errors can stop
    /// start-up.
    pub fn spawn(backends: Vec<BackendBox>) -> std::io::Result<Backends> {
        let mut hosts = Vec::with_capacity(backends.len());
        for b in backends {
            hosts.push(Host::spawn(b)?);
        }
        let wants_data = hosts.iter().any(|h| h.wants_data);
        Ok(Backends { hosts, wants_data })
    }

    fn each(&self, make: impl Fn(FfiRecord) -> Job, vm: &VmRecord) {
        let rec = FfiRecord::from(vm);
        for h in &self.hosts {
            h.send(make(rec.clone()));
        }
    }

    pub fn vm_connected(&self, vm: VmRecord) {
        self.each(Job::Connected, &vm);
    }
    pub fn vm_renamed(&self, vm: VmRecord, old_name: String) {
        self.each(|r| Job::Renamed(r, old_name.clone()), &vm);
    }
    pub fn vm_disconnected(&self, vm: VmRecord) {
        self.each(Job::Disconnected, &vm);
    }
    pub fn vm_expired(&self, vm: VmRecord) {
        self.each(Job::Expired, &vm);
    }
    pub fn console_attached(&self, vm: VmRecord) {
        self.each(Job::ConsoleAttached, &vm);
    }
    pub fn console_detached(&self, vm: VmRecord) {
        self.each(Job::ConsoleDetached, &vm);
    }
    pub fn reopen(&self) {
        for h in &self.hosts {
            h.send(Job::Reopen);
        }
    }

    /// True if any backend wants console output.
    pub fn wants_data(&self) -> bool {
        self.wants_data
    }

    /// Console output for the backends that want it; dropped (and counted)
    /// for a backend that is too far behind.
    pub fn console_data(&self, vm: &VmRecord, data: Bytes) {
        if !self.wants_data {
            return;
        }
        let rec = FfiRecord::from(vm);
        for h in &self.hosts {
            h.data(&rec, &data);
        }
    }

    /// Console-data events dropped so far, over all backends.
    pub fn dropped(&self) -> u64 {
        self.hosts
            .iter()
            .map(|h| h.dropped.load(Ordering::Relaxed))
            .sum()
    }

    /// The rows the admin listing shows: each backend may edit them, in order.
    pub async fn list_rows(&self, mut rows: Vec<VmRecord>) -> Vec<VmRecord> {
        for h in &self.hosts {
            let (tx, rx) = oneshot::channel();
            h.send(Job::ListRows(rows.clone(), tx));
            if let Ok(edited) = rx.await {
                rows = edited;
            }
        }
        rows
    }

    /// Bytes a new console is shown first: the first backend with any.
    pub async fn seed_data(&self, vm: VmRecord) -> Vec<u8> {
        let rec = FfiRecord::from(&vm);
        for h in &self.hosts {
            let (tx, rx) = oneshot::channel();
            h.send(Job::Seed(rec.clone(), tx));
            if let Ok(seed) = rx.await {
                if !seed.is_empty() {
                    return seed;
                }
            }
        }
        Vec::new()
    }

    /// Ask every backend to flush and stop; wait up to `limit` in all.
    pub fn shutdown(&self, limit: Duration) {
        let deadline = std::time::Instant::now() + limit;
        let waits: Vec<(String, mpsc::Receiver<()>)> = self
            .hosts
            .iter()
            .map(|h| {
                let (tx, rx) = mpsc::channel();
                h.send(Job::Shutdown(tx));
                (h.name.clone(), rx)
            })
            .collect();
        for (name, rx) in waits {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if rx.recv_timeout(left).is_err() {
                tracing::warn!(backend = %name, "backend did not finish shutting down in time");
            }
        }
    }
}

fn run(mut backend: BackendBox, rx: mpsc::Receiver<Job>, queued_data: Arc<AtomicUsize>) {
    while let Ok(mut job) = rx.recv() {
        loop {
            if let Job::Shutdown(done) = job {
                backend.shutdown();
                let _ = done.send(());
                return;
            }
            handle(&mut backend, job, &queued_data);
            match rx.try_recv() {
                Ok(next) => job = next,
                Err(_) => break,
            }
        }
        backend.idle();
    }
    backend.shutdown();
}

fn handle(b: &mut BackendBox, job: Job, queued_data: &AtomicUsize) {
    match job {
        Job::Connected(vm) => b.vm_connected(&vm),
        Job::Renamed(vm, old) => b.vm_renamed(&vm, RStr::from(old.as_str())),
        Job::Disconnected(vm) => b.vm_disconnected(&vm),
        Job::Expired(vm) => b.vm_expired(&vm),
        Job::ConsoleAttached(vm) => b.console_attached(&vm),
        Job::ConsoleDetached(vm) => b.console_detached(&vm),
        Job::Data(vm, data) => {
            queued_data.fetch_sub(1, Ordering::Relaxed);
            b.console_data(&vm, RSlice::from_slice(&data));
        }
        Job::ListRows(rows, reply) => {
            let ffi: RVec<FfiRecord> = rows.iter().map(FfiRecord::from).collect();
            let out: Vec<VmRecord> = b.list_rows(ffi).iter().map(VmRecord::from).collect();
            let _ = reply.send(out);
        }
        Job::Seed(vm, reply) => {
            let _ = reply.send(b.seed_data(&vm).into_vec());
        }
        Job::Reopen => b.reopen(),
        Job::Shutdown(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use vspc_backend_api::ffi::boxed;
    use vspc_backend_api::Backend;

    /// A backend that is slow on console data and records what it saw.
    struct Slow {
        seen: Arc<Mutex<Vec<String>>>,
    }

    impl Backend for Slow {
        fn name(&self) -> &str {
            "Slow"
        }
        fn wants_console_data(&self) -> bool {
            true
        }
        fn vm_connected(&mut self, vm: &VmRecord) {
            self.seen
                .lock()
                .unwrap()
                .push(format!("connect {}", vm.name));
        }
        fn console_data(&mut self, _vm: &VmRecord, data: &[u8]) {
            std::thread::sleep(Duration::from_micros(200));
            self.seen
                .lock()
                .unwrap()
                .push(format!("data {}", data.len()));
        }
        fn idle(&mut self) {
            self.seen.lock().unwrap().push("idle".into());
        }
    }

    fn vm(name: &str) -> VmRecord {
        VmRecord {
            uuid: format!("uuid-{name}"),
            name: name.into(),
            port: Some(1),
        }
    }

    #[tokio::test]
    async fn full_queue_drops_data_but_never_mapping_events() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen_handle = seen.clone();
        let b = Backends::spawn(vec![boxed(Slow { seen: seen.clone() })]).unwrap();
        let data = Bytes::from_static(b"x");
        for i in 0..(DATA_QUEUE_LIMIT * 3) {
            b.console_data(&vm("a"), data.clone());
            if i % 1000 == 0 {
                b.vm_connected(vm(&format!("vm{i}")));
            }
        }
        assert!(b.dropped() > 0, "nothing was dropped");
        // A query goes through the same queue, so it returns after every
        // event queued before it was handled.
        let rows = b.list_rows(vec![vm("q")]).await;
        assert_eq!(rows, vec![vm("q")]);
        let seen = seen.lock().unwrap().clone();
        let connects: Vec<&String> = seen.iter().filter(|s| s.starts_with("connect")).collect();
        let expected: Vec<String> = (0..DATA_QUEUE_LIMIT * 3)
            .step_by(1000)
            .map(|i| format!("connect vm{i}"))
            .collect();
        assert_eq!(
            connects,
            expected.iter().collect::<Vec<_>>(),
            "mapping events lost or reordered"
        );
        let handled = seen.iter().filter(|s| s.starts_with("data")).count() as u64;
        assert_eq!(handled + b.dropped(), (DATA_QUEUE_LIMIT * 3) as u64);
        // idle() runs once the queue is empty, which is just after the
        // query's reply; shutdown() is queued behind it.
        b.shutdown(Duration::from_secs(5));
        let after = seen_handle.lock().unwrap().clone();
        assert!(after.iter().any(|s| s == "idle"), "idle() never ran");
    }
}
