//! The one way to open a console, whatever the door: find the VM, take
//! what it said before (its replay ring, or a backend's scrollback), join its fan-out under the lock the
//! client asked for, and start the session's audit record. A door turns
//! its client's request into a [`Request`], serves the [`Opened`] session
//! on its own transport, and maps an [`OpenError`] to its wire's reply in
//! one `match`: adding a door means writing that adapter, not another
//! join.

use super::console::ConsoleSession;
use crate::audit::Kind;
use crate::hub::{AttachError, ConsoleProtocol, Hub, LockMode, Lookup, Replay, Vm};
use std::net::SocketAddr;
use std::sync::Arc;

/// Which VM a client asked for.
pub enum Find<'a> {
    /// The door found it already (a console port is one VM's; the SSH door
    /// checks what a key may see).
    Vm(Arc<Vm>),
    /// A name or uuid the client gave, looked up here.
    Named(&'a str),
}

/// Where the VM's recent output (its replay ring, or a backend's
/// scrollback when the ring is empty) goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum History {
    /// Queued ahead of the live output on the console itself, then a
    /// marker line (the browser, SSH, the native admin protocol).
    Inline,
    /// Queued as with `Inline` for a telnet client; a raw client (gdb, a
    /// script) never gets it (console ports with `--console-replay`).
    TelnetOnly,
    /// Handed back in [`Opened::history`] for the door to send its own way
    /// (vSPC.py's query protocol sends it in a pickle).
    Apart,
    /// Not given (console ports by default).
    None,
    /// A console following its VM from another node (cluster mode): the
    /// output it missed, from where it stood (see [`Replay::Follow`]).
    Follow(Option<crate::hub::replay::Position>),
}

/// What a door asks for.
pub struct Request<'a> {
    pub vm: Find<'a>,
    /// The lock asked for.
    pub mode: LockMode,
    /// How the client speaks (telnet, raw, or told apart by its first byte).
    pub protocol: ConsoleProtocol,
    pub history: History,
    /// The door, its client's address and user, for the audit record.
    pub door: Kind,
    pub peer: Option<SocketAddr>,
    pub user: Option<String>,
}

/// An open console.
pub struct Opened {
    pub session: ConsoleSession,
    pub vm: Arc<Vm>,
    /// The recent output, with [`History::Apart`]; empty otherwise.
    pub history: Vec<u8>,
}

/// Why a console could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// No VM has that name or uuid.
    #[error("{}", Lookup::NotFound.explain(.0))]
    NotFound(String),
    /// More VMs than one have that name.
    #[error("{}", Lookup::Ambiguous(.uuids.clone()).explain(.name))]
    Ambiguous { name: String, uuids: Vec<String> },
    /// The VM was found, but the console could not join it (full, locked,
    /// gone).
    #[error(transparent)]
    Refused(#[from] AttachError),
}

/// Open a console as `req` asks.
pub async fn open(hub: &Arc<Hub>, req: Request<'_>) -> Result<Opened, OpenError> {
    let vm = match req.vm {
        Find::Vm(vm) => vm,
        Find::Named(what) => hub.lookup(what).map_err(|e| match e {
            Lookup::NotFound => OpenError::NotFound(what.to_string()),
            Lookup::Ambiguous(uuids) => OpenError::Ambiguous {
                name: what.to_string(),
                uuids,
            },
        })?,
    };
    // A backend's scrollback is asked for only when the ring has nothing.
    let wants_history = matches!(
        req.history,
        History::Inline | History::TelnetOnly | History::Apart
    );
    let scrollback = if wants_history && hub.replay_is_empty(&vm) {
        hub.backend().seed_data(vm.record()).await
    } else {
        Vec::new()
    };
    let replay = match req.history {
        History::None => Replay::None,
        History::Follow(at) => Replay::Follow(at),
        History::Inline => Replay::Show(&scrollback),
        History::TelnetOnly => match req.protocol {
            ConsoleProtocol::Raw => Replay::None,
            ConsoleProtocol::Telnet | ConsoleProtocol::Auto => Replay::Show(&scrollback),
        },
        History::Apart => Replay::Return(&scrollback),
    };
    let mut session = ConsoleSession::join(hub, &vm, req.mode, replay, req.protocol)?;
    session.audit(req.door, req.peer, req.user);
    let history = match req.history {
        History::Apart => session.take_history(),
        _ => Vec::new(),
    };
    Ok(Opened {
        session,
        vm,
        history,
    })
}
