//! vspc's built-in backends. Each implements the same
//! [`vspc_backend_api::Backend`] trait a plugin does, and the daemon reaches
//! them through the same stable-ABI object.

#![forbid(unsafe_code)]

pub mod file;
mod logging;
mod memory;
pub mod vspcpy;

pub use file::FileBackend;
pub use logging::LoggingBackend;
pub use memory::MemoryBackend;

use vspc_backend_api::ffi::{boxed, BackendBox};

/// The names of the built-in backends, for `--backend-help`.
pub const BUILTIN: &[&str] = &["Memory", "File", "Logging"];

/// A built-in backend by (case-insensitive) name, behind the same
/// stable-ABI object a plugin is.
pub fn builtin(name: &str) -> Option<BackendBox> {
    match name.to_ascii_lowercase().as_str() {
        "memory" => Some(boxed(MemoryBackend)),
        "file" => Some(boxed(FileBackend::default())),
        "logging" => Some(boxed(LoggingBackend::default())),
        _ => None,
    }
}
