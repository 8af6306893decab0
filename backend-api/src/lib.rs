//! The interface between the vspc daemon and its backends.
//!
//! The daemon reaches every backend through [`Backend`] and nothing else: the
//! hooks it fires as VMs come and go, the port map it starts from, the rows
//! the admin listing shows and the context a new console is shown first.
//! Every method runs on the backend's own thread (see the daemon's
//! `backend_host`), so a backend may block without stalling console traffic.

use std::fmt;

/// What the daemon knows about one VM serial port.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VmRecord {
    /// The VM's identity key as admin tools show it (vSPC.py's form,
    /// `0123456789abcdef-fedcba9800000000`, plus `_uri` with multi-console).
    pub uuid: String,
    /// The VM's display name (untrusted text from ESXi).
    pub name: String,
    /// The console port, when the VM has one.
    pub port: Option<u16>,
}

/// An error a backend reports; the message names the problem and the fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendError(pub String);

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BackendError {}

/// A vspc backend. Hooks have empty defaults, so a backend implements only
/// what it needs.
pub trait Backend: Send {
    /// Short name, as given to `--backend`.
    fn name(&self) -> &str;

    /// The backend's version, for logs and `--backend-help`.
    fn version(&self) -> &str {
        "0"
    }

    /// Help text for the backend's own options.
    fn help(&self) -> String {
        String::new()
    }

    /// Apply the backend's options; a bad option is an error naming it.
    fn configure(&mut self, args: &[String]) -> Result<(), BackendError> {
        match args.first() {
            None => Ok(()),
            Some(a) => Err(BackendError(format!(
                "backend {} takes no options (got '{a}')",
                self.name()
            ))),
        }
    }

    /// The persisted port map the daemon starts from: these ports are
    /// reserved before any VM connects.
    fn load_map(&mut self) -> Result<Vec<VmRecord>, BackendError> {
        Ok(Vec::new())
    }

    /// True if the backend wants [`Backend::console_data`] calls at all;
    /// when false the daemon skips copying console output for it.
    fn wants_console_data(&self) -> bool {
        false
    }

    fn vm_connected(&mut self, _vm: &VmRecord) {}
    fn vm_renamed(&mut self, _vm: &VmRecord, _old_name: &str) {}
    fn vm_disconnected(&mut self, _vm: &VmRecord) {}
    /// The mapping expired: the port went back to the pool.
    fn vm_expired(&mut self, _vm: &VmRecord) {}
    /// Bytes the VM wrote to its serial port.
    fn console_data(&mut self, _vm: &VmRecord, _data: &[u8]) {}
    fn console_attached(&mut self, _vm: &VmRecord) {}
    fn console_detached(&mut self, _vm: &VmRecord) {}

    /// Bytes a new console of this VM is shown first (recent context).
    fn seed_data(&mut self, _vm: &VmRecord) -> Vec<u8> {
        Vec::new()
    }

    /// The rows the admin listing shows, given the daemon's own; a backend
    /// may add or hide VMs.
    fn list_rows(&mut self, rows: Vec<VmRecord>) -> Vec<VmRecord> {
        rows
    }

    /// Reopen files (SIGHUP), e.g. after logrotate moved them.
    fn reopen(&mut self) {}
}
