//! One telnet user on a VM's console port.
//!
//! The session offers character-at-a-time binary mode (WILL ECHO, WILL SGA,
//! WILL BINARY, DO BINARY, DO SGA). Output is byte-exact unless the client
//! refuses BINARY, in which case NVT rules apply in that direction only:
//! a bare CR goes out as CR NUL, and CR NUL coming in becomes CR. Clients
//! that speak no telnet at all (socat, nc) get raw bytes.

use super::{Flow, Session};
use crate::hub::{Access, AttachError, Hub, LockMode, Peer, Vm};
use crate::wire::{encode, opt, Change, Decoder, Event, Negotiator, OptionSet};
use bytes::Bytes;
use std::sync::Arc;
use std::time::Instant;

const LOCAL_OK: OptionSet = OptionSet::of(&[opt::BINARY, opt::SGA, opt::ECHO]);
const REMOTE_OK: OptionSet = OptionSet::of(&[opt::BINARY, opt::SGA]);

/// Console input may queue this much for the VM before the console waits.
pub const INPUT_HIGH_WATER: usize = 64 * 1024;

/// A console's session.
pub struct ConsoleSession {
    hub: Arc<Hub>,
    vm: Arc<Vm>,
    peer: Peer,
    decoder: Decoder,
    neg: Negotiator,
    /// What the console was granted; a read-only console's input is
    /// discarded.
    access: Access,
    /// The client refused BINARY for its input: undo NVT CR NUL.
    nvt_in: bool,
    after_cr: bool,
    /// Scratch: input collected during one read.
    input: Vec<u8>,
    out: Vec<u8>,
    closing: bool,
}

impl ConsoleSession {
    /// The opening negotiation for a new console.
    pub fn opening() -> (Negotiator, Vec<u8>) {
        let mut neg = Negotiator::new(LOCAL_OK, REMOTE_OK);
        let mut out = Vec::new();
        neg.enable_local(opt::ECHO, &mut out);
        neg.enable_local(opt::SGA, &mut out);
        neg.enable_local(opt::BINARY, &mut out);
        neg.enable_remote(opt::BINARY, &mut out);
        neg.enable_remote(opt::SGA, &mut out);
        (neg, out)
    }

    /// Open a console on `vm`: queue the telnet opening (and `seed`, the
    /// recent output, when it travels in the stream), then join the fan-out
    /// with the lock `mode` asks for. Nothing is written to the peer until
    /// the caller starts serving the session, so protocol answers can go
    /// first.
    pub fn join(
        hub: &Arc<Hub>,
        vm: &Arc<Vm>,
        mode: LockMode,
        seed: Option<&[u8]>,
    ) -> Result<ConsoleSession, AttachError> {
        let peer = hub.new_peer(hub.config().console_queue);
        let (neg, opening) = ConsoleSession::opening();
        peer.outbox.push_control(opening.into());
        if let Some(seed) = seed.filter(|s| !s.is_empty()) {
            peer.outbox.push_always(encode::escaped(seed).into());
        }
        let access = hub.attach_console(vm, peer.clone(), mode)?;
        Ok(ConsoleSession {
            hub: hub.clone(),
            vm: vm.clone(),
            peer,
            decoder: Decoder::default(),
            neg,
            access,
            nvt_in: false,
            after_cr: false,
            input: Vec::new(),
            out: Vec::new(),
            closing: false,
        })
    }

    /// What the console was granted.
    pub fn access(&self) -> Access {
        self.access
    }

    /// The console's outbox (what the network layer writes out).
    pub fn outbox(&self) -> Arc<crate::outbox::Outbox> {
        self.peer.outbox.clone()
    }

    /// Queue a text line for this console (IAC escaped).
    pub fn tell(&self, text: &str) {
        self.peer
            .outbox
            .push_always(encode::escaped(text.as_bytes()).into());
    }

    fn handle(&mut self, ev: Event<'_>) {
        match ev {
            Event::Data(_) if self.access == Access::ReadOnly => {}
            Event::Data(d) => {
                if self.nvt_in {
                    encode::nvt_receive(d, &mut self.after_cr, &mut self.input);
                } else {
                    self.input.extend_from_slice(d);
                }
            }
            Event::Negotiate(verb, option) => match self.neg.receive(verb, option, &mut self.out) {
                Some(Change::LocalDisabled(opt::BINARY)) => self.peer.outbox.set_nvt(true),
                Some(Change::LocalEnabled(opt::BINARY)) => self.peer.outbox.set_nvt(false),
                Some(Change::RemoteDisabled(opt::BINARY)) => self.nvt_in = true,
                Some(Change::RemoteEnabled(opt::BINARY)) => self.nvt_in = false,
                _ => {}
            },
            Event::Subneg { option, .. } => {
                tracing::debug!(
                    conn = self.peer.id,
                    option,
                    "ignoring console subnegotiation"
                )
            }
            Event::Command(c) => {
                tracing::trace!(conn = self.peer.id, command = c, "console telnet command")
            }
            Event::Malformed(m) => {
                tracing::debug!(conn = self.peer.id, "malformed telnet from console: {m}")
            }
        }
    }
}

impl Session for ConsoleSession {
    fn on_input(&mut self, data: &[u8]) -> Flow {
        let mut decoder = std::mem::take(&mut self.decoder);
        let result = decoder.decode(data, |ev| self.handle(ev));
        self.decoder = decoder;
        if let Err(e) = result {
            tracing::info!(conn = self.peer.id, "closing console: {e}");
            self.closing = true;
        }
        if !self.out.is_empty() {
            self.peer
                .outbox
                .push_control(Bytes::from(std::mem::take(&mut self.out)));
        }
        let mut flow = Flow::Continue;
        if !self.input.is_empty() {
            if let Some(vm_outbox) = self.hub.console_input(&self.vm, &self.input) {
                if vm_outbox.queued() > INPUT_HIGH_WATER {
                    flow = Flow::Wait(vm_outbox);
                }
            }
            self.input.clear();
            if self.input.capacity() > 64 * 1024 {
                self.input = Vec::new();
            }
        }
        if self.closing {
            Flow::Close
        } else {
            flow
        }
    }

    fn deadline(&self) -> Option<Instant> {
        None
    }

    fn on_deadline(&mut self, _now: Instant) -> Flow {
        Flow::Continue
    }

    fn on_close(&mut self) {
        self.hub.detach_console(&self.vm, self.peer.id);
        tracing::info!(vm = %self.vm.name(), "console disconnected");
    }
}
