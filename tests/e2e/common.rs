//! What every test module uses: the test kit.

pub use vspc_testkit::*;
