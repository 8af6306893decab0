//! The daemon's heap figures, for the admin port's `stats` command.
//!
//! The `vspc` binary runs on jemalloc and installs a reader of its
//! statistics at start-up; the library itself (and so the tests that run
//! the hub in-process) has no reader, and `stats` then says `null`.

use std::sync::OnceLock;

/// What the allocator reports, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heap {
    /// Bytes the program has allocated and not freed.
    pub allocated: u64,
    /// Bytes in pages the allocator holds resident (what it has not yet
    /// given back to the system).
    pub resident: u64,
}

static READER: OnceLock<fn() -> Option<Heap>> = OnceLock::new();

/// Install the reader (once; later calls are ignored).
pub fn install(reader: fn() -> Option<Heap>) {
    let _ = READER.set(reader);
}

/// The current figures, if a reader is installed and it could read them.
pub fn heap() -> Option<Heap> {
    READER.get().and_then(|read| read())
}
