//! The interface between the vspc daemon and its backends.
//!
//! A backend implements [`Backend`], a plain Rust trait: the hooks the daemon
//! fires as VMs come and go, the port map it starts from, the rows the admin
//! listing shows and the context a new console is shown first. Built-in
//! backends and plugins are reached the same way: through the stable-ABI
//! object in [`ffi`], which [`export_backend!`] produces for a plugin and
//! [`ffi::BackendBox`]`::new` for a built-in. Every call crosses a
//! `catch_unwind`, so a panicking backend is logged, not fatal.
//!
//! Every method runs on the backend's own thread, fed by a queue in event
//! order, so a backend may block without stalling console traffic.

pub mod ffi;
pub mod log;

pub use abi_stable;

use std::fmt;

/// What the daemon knows about one VM serial port.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VmRecord {
    /// The VM's identity as admin tools show it (vSPC.py's form,
    /// `0123456789abcdef-fedcba9800000000`, plus `_uri` with multi-console).
    pub uuid: String,
    /// The VM's display name. Untrusted text from ESXi: never use it in a
    /// path without sanitising it.
    pub name: String,
    /// The console port, when the VM has one.
    pub port: Option<u16>,
}

/// A console session starting or ending: who attached to which VM, how,
/// from where, and (at the end) for how long and how many bytes each way.
/// The daemon logs the same events as its `audit:` lines.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SessionEvent {
    /// The session's number, the same in its start and end events (and in
    /// the daemon's audit lines), so the two can be paired.
    pub id: u64,
    /// How the console was reached: `console-port`, `admin-native`,
    /// `admin-vspc`, `web` or `ssh`.
    pub kind: String,
    /// The client's address (`ip:port`), or empty when it has none.
    pub peer: String,
    /// Who the client proved to be beyond its address: an HTTP token's
    /// name (`token#2`, or its `name=`), an SSH key's comment and
    /// fingerprint; empty when nothing more is known.
    pub user: String,
    /// The VM the console is attached to.
    pub vm: VmRecord,
    /// What the session was granted (`exclusive`, `write`, `free-for-all`,
    /// `read-only`).
    pub access: String,
    /// Milliseconds the session lasted (0 in the start event).
    pub duration_ms: u64,
    /// Bytes the client sent towards the VM (0 in the start event).
    pub bytes_to_vm: u64,
    /// Bytes written to the client (0 in the start event).
    pub bytes_from_vm: u64,
}

/// An error a backend reports; the message names the problem and the fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendError(pub String);

impl BackendError {
    pub fn new(msg: impl Into<String>) -> BackendError {
        BackendError(msg.into())
    }
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BackendError {}

/// One command-line option a backend takes. The daemon routes matching
/// arguments to the backend and prints these in `--backend-help`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OptionSpec {
    /// Long name without dashes (`logdir` for `--logdir`); the key
    /// [`Backend::configure`] receives.
    pub long: String,
    /// Optional one-letter form (`l` for `-l`).
    pub short: Option<char>,
    /// Name of the value (`DIR`); `None` for a flag without a value.
    pub value: Option<String>,
    /// Shown in help; the backend applies its own defaults.
    pub default: Option<String>,
    pub help: String,
}

impl OptionSpec {
    /// An option taking a value.
    pub fn value(long: &str, short: Option<char>, value: &str, help: &str) -> OptionSpec {
        OptionSpec {
            long: long.into(),
            short,
            value: Some(value.into()),
            default: None,
            help: help.into(),
        }
    }

    /// A flag (no value).
    pub fn flag(long: &str, short: Option<char>, help: &str) -> OptionSpec {
        OptionSpec {
            long: long.into(),
            short,
            value: None,
            default: None,
            help: help.into(),
        }
    }

    /// The same option with a default shown in help.
    pub fn with_default(mut self, default: &str) -> OptionSpec {
        self.default = Some(default.into());
        self
    }
}

/// Options as the daemon hands them to [`Backend::configure`]: long name and
/// value (`None` for flags), in command-line order.
pub type Options = [(String, Option<String>)];

/// A vspc backend. Only `name` is required; hooks default to doing nothing.
pub trait Backend: Send {
    /// Short name, as given to `--backend` (case-insensitive).
    fn name(&self) -> &str;

    /// The backend's version, for logs and `--backend-help`.
    fn version(&self) -> &str {
        "0"
    }

    /// One line saying what the backend does.
    fn description(&self) -> &str {
        ""
    }

    /// The options the backend takes.
    fn options(&self) -> Vec<OptionSpec> {
        Vec::new()
    }

    /// Apply options (only ones declared in [`Backend::options`] arrive); a
    /// bad value is an error naming the option and the fix.
    fn configure(&mut self, options: &Options) -> Result<(), BackendError> {
        match options.first() {
            None => Ok(()),
            Some((k, _)) => Err(BackendError(format!(
                "backend {} takes no option --{k}",
                self.name()
            ))),
        }
    }

    /// True if this backend stores the port map ([`Backend::load_map`]).
    /// With several backends, the first that persists owns the map.
    fn persists(&self) -> bool {
        false
    }

    /// The stored port map the daemon starts from: these ports are reserved
    /// before any VM connects. An unreadable or corrupt store is an error
    /// naming the file; start-up stops and nothing is overwritten.
    fn load_map(&mut self) -> Result<Vec<VmRecord>, BackendError> {
        Ok(Vec::new())
    }

    /// True if the backend wants [`Backend::console_data`] at all; when
    /// false the daemon does not copy console output for it.
    fn wants_console_data(&self) -> bool {
        false
    }

    /// True if the backend must see every output byte (a transcript):
    /// rather than drop output for it, the daemon stops reading from the
    /// VMs whose output waits for it while it is more than its byte budget
    /// behind (`--backend-queue`), so ESXi holds the data. False (the
    /// default) lets the daemon drop console data for it under load, and
    /// count what it dropped; VMs never wait for it.
    fn needs_every_byte(&self) -> bool {
        false
    }

    fn vm_connected(&mut self, _vm: &VmRecord) {}
    fn vm_renamed(&mut self, _vm: &VmRecord, _old_name: &str) {}
    fn vm_disconnected(&mut self, _vm: &VmRecord) {}
    /// The mapping expired: the port went back to the pool.
    fn vm_expired(&mut self, _vm: &VmRecord) {}
    /// Bytes the VM wrote to its serial port, exactly as sent.
    fn console_data(&mut self, _vm: &VmRecord, _data: &[u8]) {}
    fn console_attached(&mut self, _vm: &VmRecord) {}
    fn console_detached(&mut self, _vm: &VmRecord) {}

    /// Bytes a new console of this VM is shown first (recent context).
    fn seed_data(&mut self, _vm: &VmRecord) -> Vec<u8> {
        Vec::new()
    }

    /// The last `max` bytes (at most) of this VM's transcript, for the
    /// HTTP API's `/console_log`; `None` if this backend keeps none for it.
    /// The daemon never reads transcript files itself: a backend that
    /// writes them answers (flushing what it holds first).
    fn console_log(&mut self, _vm: &VmRecord, _max: usize) -> Option<Vec<u8>> {
        None
    }

    /// The rows the admin listing shows, given the daemon's own; a backend
    /// may add or hide VMs.
    fn list_rows(&mut self, rows: Vec<VmRecord>) -> Vec<VmRecord> {
        rows
    }

    /// Reopen files (SIGHUP), e.g. after logrotate moved them.
    fn reopen(&mut self) {}

    /// The event queue is empty for now: a good moment to write batched
    /// state (called after each burst of events).
    fn idle(&mut self) {}

    /// The daemon is stopping: flush and close.
    fn shutdown(&mut self) {}

    /// A console session started (an audit event; never dropped).
    fn session_started(&mut self, _ev: &SessionEvent) {}

    /// A console session ended, with its duration and byte counts (an
    /// audit event; never dropped).
    fn session_ended(&mut self, _ev: &SessionEvent) {}
}
