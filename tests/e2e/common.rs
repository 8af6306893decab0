//! What every test module uses: the test kit.

pub use vspc_testkit::*;

/// The line after a console's replay of recent output, where live output
/// begins (the daemon's `hub::replay::MARKER`).
pub const LIVE: &[u8] = b"\r\n-- live --\r\n";
