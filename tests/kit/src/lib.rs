//! What vspc's tests, its load tool (`vspc-bench`) and `vspc-fake-vm` share,
//! kept out of the daemon's package:
//!
//! - [`sim`]: simulated peers of the daemon: an ESXi serial-port connection
//!   ([`sim::SimVm`]), a telnet user on a console port ([`sim::SimConsole`])
//!   and the admin port's listing ([`sim::list_vms`]);
//! - the launcher ([`Daemon`], built on [`Process`]): start the real `vspc`
//!   binary on private loopback ports (or given ones), capture its log,
//!   stop it (SIGKILL, or SIGTERM and wait); plus port picking, admin
//!   queries, a TLS client, a raw socket client and test data. The load
//!   tool starts its daemons through it too, and its bare relay as a
//!   [`Process`].

#![forbid(unsafe_code)]

mod daemon;
mod process;
pub mod sim;

pub use daemon::*;
pub use process::{collect_bytes, LogTo, Process};
