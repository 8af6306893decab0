//! Per-connection state machines. They turn decoded telnet events into hub
//! calls and replies on their own outbox; the network layer feeds them bytes
//! and timer ticks and never looks inside.

pub mod console;
pub mod vm;

use crate::outbox::Outbox;
use std::sync::Arc;
use std::time::Instant;

/// What the connection should do after a session handled input.
#[derive(Debug, Clone)]
pub enum Flow {
    Continue,
    /// Stop reading until this outbox drains (input backpressure).
    Wait(Arc<Outbox>),
    /// Flush what is queued, then close.
    Close,
}

/// The interface the network layer drives.
pub trait Session: Send {
    /// Bytes from the peer.
    fn on_input(&mut self, data: &[u8]) -> Flow;
    /// When [`Session::on_deadline`] should next run, if ever.
    fn deadline(&self) -> Option<Instant>;
    fn on_deadline(&mut self, now: Instant) -> Flow;
    /// The connection is gone (either side closed it).
    fn on_close(&mut self);
}
