//! Per-connection state machines. They turn decoded telnet events into hub
//! calls and replies on their own outbox; the network layer feeds them bytes
//! and timer ticks and never looks inside.

pub mod console;
pub mod open;
pub mod vm;

use std::task::{Context, Poll};
use std::time::Instant;

pub use crate::wait::WaitFuture;

/// What the connection should do after a session handled input.
pub enum Flow {
    Continue,
    /// Flush what is queued, then close.
    Close,
}

/// The interface the network layer drives.
pub trait Session: Send {
    /// Bytes from the peer, read at `now`.
    fn on_input(&mut self, data: &[u8], now: Instant) -> Flow;
    /// Drive the session's own waits (backpressure: the VM's queue for
    /// console input; the VM's consoles and lossless backends for its
    /// output); `Ready` when it may be handed more input. The connection
    /// calls this before every read, so a wait's wake-up is the
    /// connection's.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<()> {
        Poll::Ready(())
    }
    /// When [`Session::on_deadline`] should next run, if ever.
    fn deadline(&self) -> Option<Instant>;
    fn on_deadline(&mut self, now: Instant) -> Flow;
    /// The connection is gone (either side closed it), noticed at `now`.
    fn on_close(&mut self, now: Instant);
    /// The connection is being closed because its socket took no output
    /// for the stall timeout (before [`Session::on_close`]).
    fn on_stall(&mut self) {}
}
