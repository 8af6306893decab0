//! The signals that end a console session cleanly (SIGTERM, SIGHUP,
//! SIGINT): caught, so the session can restore the terminal and the process
//! exits with 128 + the signal's number.

use tokio::signal::unix::{signal, Signal, SignalKind};

/// The signals that end a session cleanly.
pub(crate) struct Signals {
    term: Signal,
    hup: Signal,
    int: Signal,
}

impl Signals {
    pub(crate) fn new() -> std::io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// The next signal: its number and name.
    pub(crate) async fn recv(&mut self) -> (u8, &'static str) {
        tokio::select! {
            Some(()) = self.term.recv() => (15, "SIGTERM"),
            Some(()) = self.hup.recv() => (1, "SIGHUP"),
            Some(()) = self.int.recv() => (2, "SIGINT"),
            else => std::future::pending().await,
        }
    }
}
