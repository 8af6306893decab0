//! The audit trail of console sessions: one log line when a session
//! starts and one when it ends, and the same two events for the backends
//! ([`vspc_backend_api::Backend::session_started`] and `session_ended`,
//! queued like mapping events, never dropped).
//!
//! Every way to a console calls [`start`] once the session is granted and
//! keeps the returned [`Guard`] for as long as the session lasts; dropping
//! the guard logs the end with the duration and the bytes each way. The
//! console ports, the admin port (both protocols) and the browser console
//! hand the guard to their [`crate::session::console::ConsoleSession`],
//! which counts the bytes; a front door that moves bytes itself (SSH)
//! counts them with [`Guard::to_vm`] and [`Guard::from_vm`]. The SSH front
//! door calls `session.audit(Kind::Ssh, Some(peer), Some(ssh_user(comment,
//! fingerprint)))` on its console session, or [`start`] with [`Kind::Ssh`].
//!
//! ```text
//! INFO audit: console session started session=7 kind=console-port vm="web-1" uuid=… access=free-for-all peer=10.1.2.3:51234 user=""
//! INFO audit: console session ended session=7 kind=console-port vm="web-1" uuid=… access=free-for-all peer=10.1.2.3:51234 user="" duration_s=12.500 bytes_to_vm=42 bytes_from_vm=18230
//! ```
//!
//! VM names and SSH key comments are untrusted text, so they are logged
//! quoted and escaped: a name cannot forge a log line.

use crate::hub::{Access, Hub, Vm};
use crate::outbox::Outbox;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use vspc_backend_api::SessionEvent;

/// How a console was reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A VM's own console port.
    ConsolePort,
    /// The admin port's native line protocol (`connect VM`).
    AdminNative,
    /// The admin port's vSPC.py query protocol.
    AdminVspc,
    /// The browser console (the HTTP port's WebSocket).
    Web,
    /// The SSH front door.
    Ssh,
}

impl Kind {
    /// The name in log lines and backend events.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::ConsolePort => "console-port",
            Kind::AdminNative => "admin-native",
            Kind::AdminVspc => "admin-vspc",
            Kind::Web => "web",
            Kind::Ssh => "ssh",
        }
    }

    /// The inverse of [`Kind::as_str`].
    pub fn parse(s: &str) -> Option<Kind> {
        [
            Kind::ConsolePort,
            Kind::AdminNative,
            Kind::AdminVspc,
            Kind::Web,
            Kind::Ssh,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

/// What is known about a session when it starts.
pub struct Start<'a> {
    /// How the console was reached.
    pub kind: Kind,
    /// Where the client connects from (its address and port).
    pub peer: Option<SocketAddr>,
    /// Who the client proved to be beyond its address: an HTTP token's
    /// name, an SSH key's comment and fingerprint.
    pub user: Option<String>,
    /// The VM the console is attached to.
    pub vm: &'a Vm,
    /// What the session was granted.
    pub access: Access,
}

/// A running session's audit record; dropping it logs the end line and
/// queues the end event. Boxed, so a console task grows by one pointer.
pub struct Guard(Box<Inner>);

struct Inner {
    /// Whose backends get the events.
    hub: Arc<Hub>,
    /// The start event; the end event is this plus duration and bytes.
    ev: SessionEvent,
    /// When the session started, for its duration.
    started: Instant,
    /// Bytes counted so far towards the VM.
    to_vm: u64,
    /// Bytes counted so far towards the client.
    from_vm: u64,
    /// The session's outbox, whose written-byte counter is the bytes to
    /// the client (console sessions); read when the session ends.
    output: Option<Arc<Outbox>>,
}

/// Who an SSH client is, for [`Start::user`] (or
/// [`crate::session::console::ConsoleSession::audit`]): the key's comment
/// and fingerprint as the SSH front door read them, e.g.
/// `alice@laptop SHA256:Rz3…`. The comment is the client's own text; it is
/// logged quoted and escaped.
pub fn ssh_user(comment: &str, fingerprint: &str) -> String {
    if comment.is_empty() {
        fingerprint.to_string()
    } else {
        format!("{comment} {fingerprint}")
    }
}

/// One audit line: the fields every line has (the session and who, what,
/// how), then the line's own.
macro_rules! audit_line {
    ($ev:expr, $msg:literal $(, $key:ident = $value:expr)*) => {
        tracing::info!(
            session = $ev.id,
            kind = %$ev.kind,
            vm = ?$ev.vm.name,
            uuid = %$ev.vm.uuid,
            access = %$ev.access,
            peer = %$ev.peer,
            user = ?$ev.user,
            $($key = $value,)*
            $msg
        )
    };
}

/// Log the start of a session and queue the event for the backends; keep
/// the guard until the session ends.
pub fn start(hub: &Arc<Hub>, s: Start<'_>) -> Guard {
    let ev = SessionEvent {
        id: hub.new_id(),
        kind: s.kind.as_str().to_string(),
        peer: s.peer.map(|p| p.to_string()).unwrap_or_default(),
        user: s.user.unwrap_or_default(),
        vm: s.vm.record(),
        access: s.access.as_str().to_string(),
        duration_ms: 0,
        bytes_to_vm: 0,
        bytes_from_vm: 0,
    };
    audit_line!(ev, "audit: console session started");
    hub.backend().session_started(&ev);
    Guard(Box::new(Inner {
        hub: hub.clone(),
        ev,
        started: Instant::now(),
        to_vm: 0,
        from_vm: 0,
        output: None,
    }))
}

impl Guard {
    /// The session's number (in both of its lines and events).
    pub fn id(&self) -> u64 {
        self.0.ev.id
    }

    /// The client sent `n` bytes towards the VM.
    pub fn to_vm(&mut self, n: usize) {
        self.0.to_vm += n as u64;
    }

    /// `n` bytes went to the client.
    pub fn from_vm(&mut self, n: usize) {
        self.0.from_vm += n as u64;
    }

    /// Count what `outbox`'s writer puts on the wire as bytes to the
    /// client, read when the session ends.
    pub fn count_output(&mut self, outbox: Arc<Outbox>) {
        self.0.output = Some(outbox);
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let inner = &mut *self.0;
        let took = inner.started.elapsed();
        let from_vm = inner.from_vm + inner.output.as_ref().map_or(0, |o| o.sent());
        let ev = &mut inner.ev;
        ev.duration_ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX);
        ev.bytes_to_vm = inner.to_vm;
        ev.bytes_from_vm = from_vm;
        let duration_s = format!("{:.3}", took.as_secs_f64());
        audit_line!(
            ev,
            "audit: console session ended",
            duration_s = tracing::field::display(&duration_s),
            bytes_to_vm = ev.bytes_to_vm,
            bytes_from_vm = ev.bytes_from_vm
        );
        inner.hub.backend().session_ended(ev);
    }
}
