//! vspc: a virtual Serial Port Concentrator for VMware ESXi.
//!
//! Data flows one way: socket -> [`wire`] -> [`session`] -> [`hub`] -> other
//! sockets. Nothing below [`net`] knows about sockets; nothing in [`wire`]
//! knows about VMs.

pub mod vmware;
pub mod wire;
