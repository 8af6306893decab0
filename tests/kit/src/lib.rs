//! What vspc's tests, its load tool (`vspc-bench`) and `vspc-fake-vm` share,
//! kept out of the daemon's package:
//!
//! - [`sim`]: simulated peers of the daemon: an ESXi serial-port connection
//!   ([`sim::SimVm`]), a telnet user on a console port ([`sim::SimConsole`])
//!   and the admin port's listing ([`sim::list_vms`]);
//! - the launcher ([`Daemon`]): start the real `vspc` binary on private
//!   loopback ports, capture its log, stop it; plus port picking, admin
//!   queries, a TLS client, a raw socket client and test data.

#![forbid(unsafe_code)]

mod daemon;
pub mod sim;

pub use daemon::*;
