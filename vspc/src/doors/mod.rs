//! The front doors: each turns one kind of client into sessions, and
//! imports only downwards (the sessions, the network layer, the hub).
//!
//! | door | who comes in |
//! | --- | --- |
//! | [`proxy`] | ESXi hosts, one connection per VM serial port |
//! | [`console_port`] | people and tools on a VM's own port |
//! | [`admin`] | `vspc-client`, vSPC.py's clients, scripts |
//! | [`http`] | the HTTP API, `/metrics`, the browser console ([`http::web`]) |
//! | [`ssh`] | OpenSSH clients |
//!
//! A door that opens a console goes through
//! [`crate::session::open::open`] and maps its one error type to its own
//! reply; one that listens runs [`crate::net::listen::accept_loop`].

pub mod admin;
pub mod console_port;
pub mod http;
pub mod proxy;
pub mod ssh;
