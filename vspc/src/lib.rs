//! vspc: a virtual Serial Port Concentrator for VMware ESXi.
//!
//! Data flows one way: socket -> [`wire`] -> [`session`] -> [`hub`] -> other
//! sockets, with [`backend_host`] beside the hub receiving events. Nothing
//! below [`net`] knows about sockets; nothing in [`wire`] knows about VMs.
//! [`http`] serves the HTTP API and the [`metrics`] the hub and the network
//! layer count; [`web`] the browser console and its pages.

#![forbid(unsafe_code)]

pub mod admin;
pub mod argv;
pub mod audit;
pub mod backend_host;
pub mod backend_setup;
pub mod check_config;
pub mod cidr;
pub mod config;
pub mod http;
pub mod hub;
pub mod import_cmd;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod net;
pub mod outbox;
pub mod plugins;
pub mod session;
pub mod shown;
pub mod ssh;
#[cfg(test)]
mod testing;
pub mod wait;
pub mod web;

pub use vspc_codec::{vmware, wire};
