//! vspc: a virtual Serial Port Concentrator for VMware ESXi.
//!
//! Imports point one way: [`server`] (the composition root) -> [`doors`]
//! (proxy, console ports, admin, HTTP and the browser console, SSH) ->
//! [`session`] and [`net`] -> [`hub`], [`outbox`], [`wait`], [`metrics`],
//! [`backend_host`]. Bytes flow socket -> [`net::conn`] -> [`wire`] ->
//! [`session`] -> [`hub`] -> other connections' outboxes, with the backends
//! beside the hub receiving events. Nothing in [`wire`] knows about VMs;
//! nothing below the doors knows which door it serves.

#![forbid(unsafe_code)]

pub mod argv;
pub mod audit;
pub mod backend_host;
pub mod backend_setup;
pub mod check_config;
pub mod cidr;
pub mod cluster;
pub mod config;
pub mod doors;
pub mod hub;
pub mod import_cmd;
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
