//! Runs a backend on its own OS thread, fed by a queue in event order.
//!
//! Backends may block (disk, network, a plugin's own locks); console traffic
//! must not. Hooks are queued and the daemon goes on. Console-data events are
//! counted while queued: past [`DATA_QUEUE_LIMIT`] further ones are dropped,
//! with a counter and a rate-limited warning. Mapping events (connect,
//! rename, disconnect, expiry) are never dropped. Queries (listing rows,
//! seed data) get their answer through a oneshot channel.

use bytes::Bytes;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use tokio::sync::oneshot;
use vspc_backend_api::{Backend, VmRecord};

/// Console-data events that may wait in the queue before new ones are dropped.
pub const DATA_QUEUE_LIMIT: usize = 4096;

enum Job {
    Connected(VmRecord),
    Renamed(VmRecord, String),
    Disconnected(VmRecord),
    Expired(VmRecord),
    ConsoleAttached(VmRecord),
    ConsoleDetached(VmRecord),
    Data(VmRecord, Bytes),
    ListRows(Vec<VmRecord>, oneshot::Sender<Vec<VmRecord>>),
    Seed(VmRecord, oneshot::Sender<Vec<u8>>),
    Reopen,
}

/// The daemon's handle on one backend thread.
pub struct BackendHost {
    name: String,
    tx: mpsc::Sender<Job>,
    wants_data: bool,
    /// Data events queued and not yet handled.
    queued_data: Arc<AtomicUsize>,
    /// Data events dropped because the queue was full.
    dropped: AtomicU64,
}

impl BackendHost {
    /// Start `backend` on its own thread. Call after `configure` and
    /// `load_map`, which run on the caller's thread so their errors can
    /// stop start-up.
    pub fn spawn(backend: Box<dyn Backend>) -> std::io::Result<BackendHost> {
        let name = backend.name().to_string();
        let wants_data = backend.wants_console_data();
        let (tx, rx) = mpsc::channel();
        let queued_data = Arc::new(AtomicUsize::new(0));
        let counter = queued_data.clone();
        let thread_name = format!("backend-{name}");
        std::thread::Builder::new()
            .name(thread_name)
            .spawn(move || run(backend, rx, counter))?;
        Ok(BackendHost {
            name,
            tx,
            wants_data,
            queued_data,
            dropped: AtomicU64::new(0),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn send(&self, job: Job) {
        if self.tx.send(job).is_err() {
            tracing::error!(backend = %self.name, "backend thread is gone; event lost");
        }
    }

    pub fn vm_connected(&self, vm: VmRecord) {
        self.send(Job::Connected(vm));
    }
    pub fn vm_renamed(&self, vm: VmRecord, old_name: String) {
        self.send(Job::Renamed(vm, old_name));
    }
    pub fn vm_disconnected(&self, vm: VmRecord) {
        self.send(Job::Disconnected(vm));
    }
    pub fn vm_expired(&self, vm: VmRecord) {
        self.send(Job::Expired(vm));
    }
    pub fn console_attached(&self, vm: VmRecord) {
        self.send(Job::ConsoleAttached(vm));
    }
    pub fn console_detached(&self, vm: VmRecord) {
        self.send(Job::ConsoleDetached(vm));
    }
    pub fn reopen(&self) {
        self.send(Job::Reopen);
    }

    /// True if the backend wants console output at all.
    pub fn wants_data(&self) -> bool {
        self.wants_data
    }

    /// Console output for the backend; dropped (and counted) when the
    /// backend is too far behind.
    pub fn console_data(&self, vm: &VmRecord, data: Bytes) {
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
        self.send(Job::Data(vm.clone(), data));
    }

    /// Data events dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// The rows the admin listing shows.
    pub async fn list_rows(&self, rows: Vec<VmRecord>) -> Vec<VmRecord> {
        let (tx, rx) = oneshot::channel();
        let fallback = rows.clone();
        self.send(Job::ListRows(rows, tx));
        rx.await.unwrap_or(fallback)
    }

    /// Bytes a new console is shown first.
    pub async fn seed_data(&self, vm: VmRecord) -> Vec<u8> {
        let (tx, rx) = oneshot::channel();
        self.send(Job::Seed(vm, tx));
        rx.await.unwrap_or_default()
    }
}

fn run(mut backend: Box<dyn Backend>, rx: mpsc::Receiver<Job>, queued_data: Arc<AtomicUsize>) {
    let name = backend.name().to_string();
    while let Ok(job) = rx.recv() {
        let what = match &job {
            Job::Data(..) => {
                queued_data.fetch_sub(1, Ordering::Relaxed);
                "console_data"
            }
            Job::Connected(_) => "vm_connected",
            Job::Renamed(..) => "vm_renamed",
            Job::Disconnected(_) => "vm_disconnected",
            Job::Expired(_) => "vm_expired",
            Job::ConsoleAttached(_) => "console_attached",
            Job::ConsoleDetached(_) => "console_detached",
            Job::ListRows(..) => "list_rows",
            Job::Seed(..) => "seed_data",
            Job::Reopen => "reopen",
        };
        let b = &mut backend;
        let result = catch_unwind(AssertUnwindSafe(move || match job {
            Job::Connected(vm) => b.vm_connected(&vm),
            Job::Renamed(vm, old) => b.vm_renamed(&vm, &old),
            Job::Disconnected(vm) => b.vm_disconnected(&vm),
            Job::Expired(vm) => b.vm_expired(&vm),
            Job::ConsoleAttached(vm) => b.console_attached(&vm),
            Job::ConsoleDetached(vm) => b.console_detached(&vm),
            Job::Data(vm, data) => b.console_data(&vm, &data),
            Job::ListRows(rows, reply) => {
                let _ = reply.send(b.list_rows(rows));
            }
            Job::Seed(vm, reply) => {
                let _ = reply.send(b.seed_data(&vm));
            }
            Job::Reopen => b.reopen(),
        }));
        if result.is_err() {
            tracing::error!(backend = %name, hook = what, "backend panicked in a hook; it keeps running");
        }
    }
}
