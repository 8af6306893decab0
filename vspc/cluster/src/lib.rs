//! The building blocks of a cluster of vspc nodes, without the daemon:
//!
//! - [`registry`]: the control plane in Redis: which node holds which VM
//!   under which epoch, console ports unique cluster-wide, vMotion tickets,
//!   node heartbeats, re-assertion after Redis comes back.
//! - [`link`]: the direct node-to-node connection: mutual authentication by
//!   a shared secret, many console streams with credit-based flow control,
//!   vMotion hand-offs and console-log fetches on one connection per pair.
//!
//! Redis carries no console byte: it is the record of who holds what; the
//! link carries the bytes. The daemon drives both from its hub with plain
//! async calls and plain data.

#![forbid(unsafe_code)]

pub mod error;
pub mod link;
pub mod registry;

pub use error::Error;
