//! Moving bytes: [`conn::Conn`] drives one connection (a socket, a TLS
//! stream or an in-process pipe) for one session; [`listen`] binds and runs
//! the one accept loop every door uses; [`acceptor`] accepts on every
//! console port from one thread; [`tls`] loads certificates and runs
//! handshakes with a deadline. Nothing here knows which door it serves.

pub mod acceptor;
pub mod conn;
pub mod listen;
pub mod tls;
