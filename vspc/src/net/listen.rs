//! Listening: bind a socket with a deep accept queue, and the one accept
//! loop every front door runs (the console ports, idle nearly all their
//! lives, have their own thread instead: [`super::acceptor`]).
//!
//! The loop counts each accept and each failure under the door's
//! `listener` label in `/metrics`, backs off when `accept()` fails (out of
//! descriptors: existing connections go on), and hands each connection to
//! the door's `on_conn`, which decides whether to take it (allow-lists,
//! connection limits) and spawns what serves it.

use super::acceptor;
use crate::hub::Hub;
use crate::metrics::Door;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use tokio::net::{TcpListener, TcpStream};

/// Connections the kernel may queue for accept on each listener. The
/// default (128) overflows when many ESXi hosts reconnect at once, and the
/// dropped ones wait a whole second to retry; the kernel caps this at
/// `net.core.somaxconn`.
pub const BACKLOG: i32 = 4096;

/// Listen on `addr` with a deep accept queue (must run inside the runtime).
pub fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::from_std(acceptor::listen_std(addr, BACKLOG)?)
}

/// [`listen`], with an error that names the port it was for.
pub fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener, String> {
    listen(addr).map_err(|e| format!("cannot listen on {what} {addr}: {e}"))
}

/// Accept connections on `listener` for `door` until the task is dropped.
pub async fn accept_loop<F>(listener: TcpListener, door: Door, hub: Arc<Hub>, mut on_conn: F)
where
    F: FnMut(TcpStream, SocketAddr) + Send + 'static,
{
    let mut last_warn: Option<Instant> = None;
    loop {
        match listener.accept().await {
            Ok((tcp, addr)) => {
                hub.metrics().accepted(door);
                on_conn(tcp, addr);
            }
            Err(e) => {
                hub.metrics().accept_error(door);
                let pause = acceptor::accept_failed(door.port_name(), &e, &mut last_warn);
                tokio::time::sleep(pause).await;
            }
        }
    }
}
