//! Console ports: each VM's own TCP port, where people (telnet) and tools
//! (gdb, socat, scripts: raw) attach. The hub opens and closes the
//! listeners through [`ConsoleOpener`]; one thread accepts on all of them
//! ([`crate::net::acceptor`]), and each connection is opened as a console
//! of its port's VM and driven by a task of its own.

use crate::hub::{Access, AttachError, Hub, ListenerGuard, LockMode, PortOpener, Vm};
use crate::metrics::Door;
use crate::net::acceptor::{self, Acceptor};
use crate::net::conn::{say_and_close, Conn, Stream};
use crate::net::listen::BACKLOG;
use crate::session::open::{self, Find, History, OpenError, Request};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Weak};
use tokio::net::TcpStream;

/// Opens console listeners for the hub; one thread accepts on all of them.
pub struct ConsoleOpener {
    /// `--interface`: where every console port listens.
    interface: IpAddr,
    acceptor: Acceptor<Arc<Vm>>,
}

impl ConsoleOpener {
    /// Start the accepting thread; connections are served on the current
    /// runtime.
    pub fn start(hub: Weak<Hub>, interface: IpAddr) -> io::Result<ConsoleOpener> {
        let rt = tokio::runtime::Handle::current();
        let acceptor = Acceptor::start(Door::Console.port_name(), move |vm: &Arc<Vm>, tcp| {
            if let Some(hub) = hub.upgrade() {
                hub.metrics().accepted(Door::Console);
                rt.spawn(serve(hub, vm.clone(), tcp));
            }
        })?;
        Ok(ConsoleOpener {
            interface,
            acceptor,
        })
    }
}

impl PortOpener for ConsoleOpener {
    fn open(&self, vm: Arc<Vm>, port: u16) -> io::Result<ListenerGuard> {
        let listener = acceptor::listen_std(SocketAddr::new(self.interface, port), BACKLOG)?;
        Ok(ListenerGuard(Box::new(self.acceptor.add(listener, vm)?)))
    }

    fn accept_errors(&self) -> u64 {
        self.acceptor.errors()
    }
}

/// Serve a console-port connection: open the console here (recent output
/// first, queued before the session joins the fan-out, so live output
/// always follows it), then give the connection a task of its own.
async fn serve(hub: Arc<Hub>, vm: Arc<Vm>, tcp: std::net::TcpStream) {
    let tcp = match TcpStream::from_std(tcp) {
        Ok(tcp) => tcp,
        Err(e) => {
            tracing::warn!(vm = %vm.name(), "cannot serve a console: {e}");
            return;
        }
    };
    let request = Request {
        vm: Find::Vm(vm.clone()),
        mode: LockMode::FreeForAllOrReadOnly,
        protocol: hub.config().console_protocol,
        // gdb and scripts must not see old bytes.
        history: if hub.config().console_replay {
            History::TelnetOnly
        } else {
            History::None
        },
        door: crate::audit::Kind::ConsolePort,
        peer: tcp.peer_addr().ok(),
        user: None,
    };
    let session = match open::open(&hub, request).await {
        Ok(opened) => opened.session,
        Err(e) => {
            tracing::info!(vm = %vm.name(), "console refused: {e}");
            let msg = match e {
                OpenError::Refused(AttachError::Full { .. }) => {
                    format!("vspc: {e}; the VM is full, try again later.\r\n")
                }
                _ => format!("vspc: {e}.\r\n"),
            };
            say_and_close(tcp, msg.as_bytes()).await;
            return;
        }
    };
    if session.access() == Access::ReadOnly {
        session.tell("vspc: someone holds a write lock on this VM; this console is read-only.\r\n");
    }
    tracing::info!(vm = %vm.name(), consoles = vm.console_count(), access = session.access().as_str(), "console connected");
    let outbox = session.outbox();
    let stall = hub.config().console_stall;
    tokio::spawn(Conn::new(Stream::Tcp(tcp), session, outbox, None).stall_timeout(stall));
}
