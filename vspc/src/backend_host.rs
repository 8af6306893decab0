//! Runs each backend on its own OS thread, fed by a queue in event order.
//!
//! Backends may block (disk, network, a plugin's own locks); console traffic
//! must not wait for a backend that does not need every byte. Hooks are
//! queued and the daemon goes on. Console data is counted in bytes while
//! queued, against a budget per backend (`--backend-queue`):
//!
//! - a backend that needs every byte ([`Backend::needs_every_byte`], a
//!   transcript) never loses any: over its budget, the VMs whose output
//!   waits for it stop being read ([`Backends::over_budget`] hands them a
//!   wait) until it is back under half its budget, so TCP pushes back to
//!   ESXi, which holds the data. Queued memory stays within the budget plus
//!   one read per VM.
//! - any other backend has console data dropped while it is over its
//!   budget, with a counter and a rate-limited warning.
//!
//! Mapping events (connect, rename, disconnect, expiry, console
//! attach/detach) and audit events (console sessions starting and ending)
//! are never dropped. Queries (listing rows, seed data, the
//! tail of a transcript for the HTTP API) get their answer through a
//! oneshot channel. When a backend's queue runs empty it gets `idle()`, so
//! it can write batched state.
//!
//! [`Backend::needs_every_byte`]: vspc_backend_api::Backend::needs_every_byte
//!
//! Every call goes through the backend's stable-ABI object, built-in or
//! plugin alike; panics are caught on the backend's side of that boundary.

use crate::wait::WaitFuture;
use bytes::Bytes;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;
use tokio::sync::{oneshot, Notify};
use vspc_backend_api::abi_stable::std_types::{RSlice, RStr, RVec};
use vspc_backend_api::ffi::{BackendBox, FfiRecord, FfiSessionEvent};
use vspc_backend_api::{SessionEvent, VmRecord};

/// Default byte budget of console data queued for one backend.
pub const DEFAULT_QUEUE_BYTES: usize = 32 << 20;

enum Job {
    Connected(FfiRecord),
    Renamed(FfiRecord, String),
    Disconnected(FfiRecord),
    Expired(FfiRecord),
    ConsoleAttached(FfiRecord),
    ConsoleDetached(FfiRecord),
    SessionStarted(FfiSessionEvent),
    SessionEnded(FfiSessionEvent),
    Data(Arc<FfiRecord>, Bytes),
    ListRows(Vec<VmRecord>, oneshot::Sender<Vec<VmRecord>>),
    Seed(FfiRecord, oneshot::Sender<Vec<u8>>),
    ConsoleLog(FfiRecord, usize, oneshot::Sender<Option<Vec<u8>>>),
    Reopen,
    Shutdown(std::sync::mpsc::Sender<()>),
}

/// Console data queued for one backend, in bytes, and the producers
/// waiting for it to shrink. Shared by the daemon's side and the backend's
/// thread.
struct Level {
    queued: AtomicUsize,
    /// Over budget, producers should wait until the queue is down to this.
    low: usize,
    /// A producer waits (or is about to) for the queue to reach `low`.
    blocked: AtomicBool,
    room: Notify,
}

impl Level {
    /// The backend handled `n` queued bytes: wake waiting producers once
    /// the queue is low enough.
    fn handled(&self, n: usize) {
        let left = self.queued.fetch_sub(n, Ordering::SeqCst) - n;
        if left <= self.low && self.blocked.load(Ordering::SeqCst) {
            self.blocked.store(false, Ordering::SeqCst);
            self.room.notify_waiters();
        }
    }

    /// Wait until the queue is down to `low`. The flag is raised before the
    /// level is read, so the backend's thread, which lowers the level before
    /// it reads the flag, cannot miss this waiter.
    async fn drained(self: Arc<Self>) {
        loop {
            let notified = self.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            self.blocked.store(true, Ordering::SeqCst);
            if self.queued.load(Ordering::SeqCst) <= self.low {
                return;
            }
            notified.await;
        }
    }
}

/// The daemon's handle on one backend thread.
struct Host {
    name: String,
    tx: mpsc::Sender<Job>,
    wants_data: bool,
    /// Never drop console data for it; make VMs wait instead.
    lossless: bool,
    /// Most bytes of console data queued before it counts as behind.
    budget: usize,
    level: Arc<Level>,
    /// Data events dropped because the backend was over its budget.
    dropped: AtomicU64,
    /// Times VMs were made to wait for it.
    waits: AtomicU64,
}

impl Host {
    fn spawn(backend: BackendBox, budget: usize) -> std::io::Result<Host> {
        let name = backend.name().to_string();
        let wants_data = backend.wants_console_data();
        let lossless = wants_data && backend.needs_every_byte();
        let (tx, rx) = mpsc::channel();
        let level = Arc::new(Level {
            queued: AtomicUsize::new(0),
            low: budget / 2,
            blocked: AtomicBool::new(false),
            room: Notify::new(),
        });
        let for_thread = level.clone();
        std::thread::Builder::new()
            .name(format!("backend-{name}"))
            .spawn(move || run(backend, rx, for_thread))?;
        Ok(Host {
            name,
            tx,
            wants_data,
            lossless,
            budget,
            level,
            dropped: AtomicU64::new(0),
            waits: AtomicU64::new(0),
        })
    }

    fn send(&self, job: Job) -> bool {
        if self.tx.send(job).is_err() {
            tracing::error!(backend = %self.name, "backend thread is gone; event lost");
            return false;
        }
        true
    }

    /// Queue console data (dropped and counted for a lossy backend over
    /// its budget; a lossless one takes it all, see [`Host::over_budget`]).
    fn data(&self, vm: &Arc<FfiRecord>, data: &Bytes) {
        if !self.wants_data {
            return;
        }
        let n = data.len();
        if !self.lossless && self.level.queued.load(Ordering::Relaxed) + n > self.budget {
            let d = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if d.is_power_of_two() {
                tracing::warn!(
                    backend = %self.name,
                    dropped = d,
                    "backend is over its --backend-queue budget: console data for it is being dropped"
                );
            }
            return;
        }
        self.level.queued.fetch_add(n, Ordering::SeqCst);
        if !self.send(Job::Data(vm.clone(), data.clone())) {
            self.level.handled(n);
        }
    }

    /// A wait until this backend is back under half its budget, if it needs
    /// every byte and is over its budget now.
    fn over_budget(&self) -> Option<WaitFuture> {
        let queued = self.level.queued.load(Ordering::SeqCst);
        if self.lossless && queued > self.budget {
            let w = self.waits.fetch_add(1, Ordering::Relaxed) + 1;
            if w.is_power_of_two() {
                tracing::info!(
                    backend = %self.name,
                    queued,
                    times = w,
                    "backend is behind its --backend-queue budget: pausing the VMs that write until it catches up"
                );
            }
            return Some(Box::pin(self.level.clone().drained()));
        }
        None
    }
}

/// Every configured backend, in `--backend` order.
pub struct Backends {
    hosts: Vec<Host>,
    wants_data: bool,
}

impl Backends {
    /// Start each backend on its own thread, each with a budget of
    /// `queue_bytes` of console data. Call after `configure` and
    /// `load_map`, which run on the caller's thread so their errors can stop
    /// start-up.
    pub fn spawn(backends: Vec<BackendBox>, queue_bytes: usize) -> std::io::Result<Backends> {
        let mut hosts = Vec::with_capacity(backends.len());
        for b in backends {
            hosts.push(Host::spawn(b, queue_bytes.max(1))?);
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

    /// Names of the backends that need every output byte.
    pub fn lossless(&self) -> Vec<&str> {
        self.hosts
            .iter()
            .filter(|h| h.lossless)
            .map(|h| h.name.as_str())
            .collect()
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
    /// A console session started (the audit event, for every backend).
    pub fn session_started(&self, ev: &SessionEvent) {
        let ev = FfiSessionEvent::from(ev);
        for h in &self.hosts {
            h.send(Job::SessionStarted(ev.clone()));
        }
    }
    /// A console session ended.
    pub fn session_ended(&self, ev: &SessionEvent) {
        let ev = FfiSessionEvent::from(ev);
        for h in &self.hosts {
            h.send(Job::SessionEnded(ev.clone()));
        }
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

    /// Console output for the backends that want it: dropped (and counted)
    /// for a lossy backend over its budget; a lossless one takes it all,
    /// and the caller asks [`Backends::over_budget`] before handing it more.
    pub fn console_data(&self, vm: &Arc<FfiRecord>, data: Bytes) {
        if !self.wants_data {
            return;
        }
        for h in &self.hosts {
            h.data(vm, &data);
        }
    }

    /// A wait until every backend that needs every byte is back under half
    /// its budget, if one is over its budget now: the VMs that write must
    /// not hand it more until then.
    pub fn over_budget(&self) -> Option<WaitFuture> {
        self.hosts.iter().find_map(Host::over_budget)
    }

    /// Bytes of console data queued over all backends.
    pub fn queued_bytes(&self) -> usize {
        self.hosts
            .iter()
            .map(|h| h.level.queued.load(Ordering::Relaxed))
            .sum()
    }

    /// Times VMs were made to wait for a lossless backend.
    pub fn waits(&self) -> u64 {
        self.hosts
            .iter()
            .map(|h| h.waits.load(Ordering::Relaxed))
            .sum()
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

    /// The tail of the VM's transcript, at most `max` bytes: the first
    /// backend that keeps one answers. Queued behind the events before it,
    /// so output already read from the VM is in it.
    pub async fn console_log(&self, vm: VmRecord, max: usize) -> Option<Vec<u8>> {
        let rec = FfiRecord::from(&vm);
        for h in &self.hosts {
            let (tx, rx) = oneshot::channel();
            h.send(Job::ConsoleLog(rec.clone(), max, tx));
            if let Ok(Some(log)) = rx.await {
                return Some(log);
            }
        }
        None
    }

    /// Each backend's name, console output queued for it (bytes) and
    /// console-data events dropped for it, for `/metrics`.
    pub fn stats(&self) -> Vec<(String, u64, u64)> {
        self.hosts
            .iter()
            .map(|h| {
                (
                    h.name.clone(),
                    h.level.queued.load(Ordering::Relaxed) as u64,
                    h.dropped.load(Ordering::Relaxed),
                )
            })
            .collect()
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

fn run(mut backend: BackendBox, rx: mpsc::Receiver<Job>, level: Arc<Level>) {
    while let Ok(mut job) = rx.recv() {
        loop {
            if let Job::Shutdown(done) = job {
                backend.shutdown();
                let _ = done.send(());
                return;
            }
            handle(&mut backend, job, &level);
            match rx.try_recv() {
                Ok(next) => job = next,
                Err(_) => break,
            }
        }
        backend.idle();
    }
    backend.shutdown();
}

fn handle(b: &mut BackendBox, job: Job, level: &Level) {
    match job {
        Job::Connected(vm) => b.vm_connected(&vm),
        Job::Renamed(vm, old) => b.vm_renamed(&vm, RStr::from(old.as_str())),
        Job::Disconnected(vm) => b.vm_disconnected(&vm),
        Job::Expired(vm) => b.vm_expired(&vm),
        Job::ConsoleAttached(vm) => b.console_attached(&vm),
        Job::ConsoleDetached(vm) => b.console_detached(&vm),
        Job::SessionStarted(ev) => b.session_started(&ev),
        Job::SessionEnded(ev) => b.session_ended(&ev),
        Job::Data(vm, data) => {
            b.console_data(&vm, RSlice::from_slice(&data));
            level.handled(data.len());
        }
        Job::ListRows(rows, reply) => {
            let ffi: RVec<FfiRecord> = rows.iter().map(FfiRecord::from).collect();
            let out: Vec<VmRecord> = b.list_rows(ffi).iter().map(VmRecord::from).collect();
            let _ = reply.send(out);
        }
        Job::Seed(vm, reply) => {
            let _ = reply.send(b.seed_data(&vm).into_vec());
        }
        Job::ConsoleLog(vm, max, reply) => {
            let log = b.console_log(&vm, max as u64).into_option();
            let _ = reply.send(log.map(RVec::into_vec));
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
        lossless: bool,
    }

    impl Backend for Slow {
        fn name(&self) -> &str {
            "Slow"
        }
        fn wants_console_data(&self) -> bool {
            true
        }
        fn needs_every_byte(&self) -> bool {
            self.lossless
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

    const EVENTS: usize = 3000;
    const BUDGET: usize = 1000;

    #[tokio::test]
    async fn lossy_backend_over_budget_drops_data_but_never_mapping_events() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen_handle = seen.clone();
        let slow = Slow {
            seen: seen.clone(),
            lossless: false,
        };
        let b = Backends::spawn(vec![boxed(slow)], BUDGET).unwrap();
        let rec = Arc::new(FfiRecord::from(&vm("a")));
        let data = Bytes::from_static(b"x");
        for i in 0..EVENTS {
            b.console_data(&rec, data.clone());
            assert!(b.over_budget().is_none(), "a lossy backend made a VM wait");
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
        let expected: Vec<String> = (0..EVENTS)
            .step_by(1000)
            .map(|i| format!("connect vm{i}"))
            .collect();
        assert_eq!(
            connects,
            expected.iter().collect::<Vec<_>>(),
            "mapping events lost or reordered"
        );
        let handled = seen.iter().filter(|s| s.starts_with("data")).count() as u64;
        assert_eq!(handled + b.dropped(), EVENTS as u64);
        assert_eq!(b.queued_bytes(), 0);
        // idle() runs once the queue is empty, which is just after the
        // query's reply; shutdown() is queued behind it.
        b.shutdown(Duration::from_secs(5));
        let after = seen_handle.lock().unwrap().clone();
        assert!(after.iter().any(|s| s == "idle"), "idle() never ran");
    }

    #[tokio::test]
    async fn lossless_backend_over_budget_makes_the_writer_wait_and_loses_nothing() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let slow = Slow {
            seen: seen.clone(),
            lossless: true,
        };
        let b = Backends::spawn(vec![boxed(slow)], BUDGET).unwrap();
        assert_eq!(b.lossless(), vec!["Slow"]);
        let rec = Arc::new(FfiRecord::from(&vm("a")));
        let chunk = Bytes::from(vec![7u8; 100]);
        let mut waited = 0;
        let mut most = 0;
        for _ in 0..EVENTS / 10 {
            b.console_data(&rec, chunk.clone());
            if let Some(w) = b.over_budget() {
                waited += 1;
                // Past the budget: the writer waits until half of it is left.
                tokio::time::timeout(Duration::from_secs(10), w)
                    .await
                    .expect("a lossless backend never let its writer go on");
                assert!(b.queued_bytes() <= BUDGET / 2 + chunk.len());
            }
            most = most.max(b.queued_bytes());
        }
        assert!(waited > 0, "the writer never waited");
        assert!(most <= BUDGET + chunk.len(), "queue grew to {most} bytes");
        let _ = b.list_rows(Vec::new()).await;
        let handled = seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.starts_with("data"))
            .count();
        assert_eq!(handled, EVENTS / 10, "console data was lost");
        assert_eq!(b.dropped(), 0);
        assert_eq!(b.waits(), waited);
        b.shutdown(Duration::from_secs(5));
    }
}
