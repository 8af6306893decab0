//! vspc's built-in backends. Each implements the same
//! [`vspc_backend_api::Backend`] trait a plugin does.

mod memory;

pub use memory::MemoryBackend;

use vspc_backend_api::Backend;

/// The names of the built-in backends, for `--backend-help`.
pub const BUILTIN: &[&str] = &["Memory"];

/// A built-in backend by (case-insensitive) name.
pub fn builtin(name: &str) -> Option<Box<dyn Backend>> {
    match name.to_ascii_lowercase().as_str() {
        "memory" => Some(Box::new(MemoryBackend)),
        _ => None,
    }
}
