//! vspc: a virtual Serial Port Concentrator for VMware ESXi.
//!
//! Data flows one way: socket -> [`wire`] -> [`session`] -> [`hub`] -> other
//! sockets, with [`backend_host`] beside the hub receiving events. Nothing
//! below [`net`] knows about sockets; nothing in [`wire`] knows about VMs.
//! [`http`] serves the HTTP API and the [`metrics`] the hub and the network
//! layer count; [`web`] the browser console and its pages.

#![forbid(unsafe_code)]

pub mod argv;
pub mod audit;
pub mod backend_host;
pub mod backend_setup;
pub mod cidr;
pub mod config;
pub mod doors;
pub mod hub;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod net;
pub mod outbox;
pub mod plugins;
pub mod server;
pub mod session;
pub mod shown;
#[cfg(test)]
mod testing;
pub mod wait;

pub use vspc_codec::{vmware, wire};
