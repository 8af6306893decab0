//! vspc's built-in backends. Each implements the same
//! [`vspc_backend_api::Backend`] trait a plugin does, and the daemon reaches
//! them through the same stable-ABI object.

mod file;
mod logging;
mod memory;

pub use file::FileBackend;
pub use logging::LoggingBackend;
pub use memory::MemoryBackend;

use vspc_backend_api::Backend;

/// The names of the built-in backends, for `--backend-help`.
pub const BUILTIN: &[&str] = &["Memory", "File", "Logging"];

/// A built-in backend by (case-insensitive) name.
pub fn builtin(name: &str) -> Option<Box<dyn Backend>> {
    match name.to_ascii_lowercase().as_str() {
        "memory" => Some(Box::new(MemoryBackend)),
        "file" => Some(Box::new(FileBackend::default())),
        "logging" => Some(Box::new(LoggingBackend::default())),
        _ => None,
    }
}
