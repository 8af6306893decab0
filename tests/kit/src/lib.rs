//! What vspc's tests, its load tool (`vspc-bench`) and `vspc-fake-vm` share,
//! kept out of the daemon's package. One module per job:
//!
//! - [`sim`]: simulated peers of the daemon: an ESXi serial-port connection
//!   ([`sim::SimVm`]) and a telnet user on a console port
//!   ([`sim::SimConsole`]);
//! - [`launcher`]: start the real `vspc` binary ([`Daemon`], built on
//!   [`Process`]) on private loopback ports from [`ports`], capture its
//!   log, stop it (SIGKILL, or SIGTERM and wait); run it to its exit
//!   ([`run_to_exit`]). The load tool starts its daemons through it too,
//!   and its bare relay as a [`Process`];
//! - [`admin`]: the admin port's clients: the VM listing ([`list_vms`]),
//!   a native command ([`admin_line`]), and the waits built on them
//!   ([`wait_for_vm`], [`wait_vm_gone`], [`wait_consoles`]);
//! - [`attach`]: a VM up and listed ([`vm_up`]), a console in step with it
//!   ([`console_synced`]);
//! - [`wait`]: the time constants ([`T`], [`SHORT`], [`POLL`]) and the
//!   waits for a condition ([`eventually`], [`eventually_async`],
//!   [`wait_for`]);
//! - [`data`]: byte patterns ([`all_bytes`], [`every_byte`],
//!   [`all_bytes_down`]) and a seeded generator ([`XorShift`]);
//! - [`tls`] and [`raw`]: a TLS client, and a raw socket that records
//!   every byte the daemon sends.
//!
//! Everything is re-exported at the top, so a test writes
//! `use vspc_testkit::*;` and the simulated peers from [`sim`].

#![forbid(unsafe_code)]

pub mod admin;
pub mod attach;
pub mod data;
pub mod launcher;
pub mod ports;
mod process;
pub mod raw;
pub mod redis;
pub mod sim;
pub mod tls;
pub mod vspcpy;
pub mod wait;

pub use admin::*;
pub use attach::*;
pub use data::*;
pub use launcher::*;
pub use ports::*;
pub use process::{collect_bytes, LogTo, Process};
pub use raw::*;
pub use tls::*;
pub use wait::*;
