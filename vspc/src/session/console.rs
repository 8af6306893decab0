//! One client on a VM's console: a person with a telnet client, or a
//! program that speaks no telnet at all (gdb on a kgdb or gdbserver serial
//! line, socat, nc, scripts).
//!
//! # Telling them apart
//!
//! With [`ConsoleProtocol::Auto`] (the console ports' default) the first
//! byte the client sends decides: IAC (255) means a telnet client, anything
//! else a raw one. A client that says nothing for [`DETECT_WINDOW`] is
//! offered telnet (the opening negotiation below), because a telnet client
//! started with an explicit port waits for the server to negotiate; its
//! output then waits up to [`ANSWER_WAIT`] more for the answer, and after
//! that flows raw until the client speaks (a telnet client always answers
//! an offer, so one that stays silent is a raw reader). Output is held, not
//! lost, until the decision. [`ConsoleProtocol::Telnet`] and
//! [`ConsoleProtocol::Raw`] skip the guess (the admin port's sessions are
//! always telnet: vspc-client and vSPC.py's client speak it).
//!
//! # Telnet clients
//!
//! The session offers character-at-a-time binary mode (WILL ECHO, WILL SGA,
//! WILL BINARY, DO BINARY, DO SGA). Output is byte-exact unless the client
//! refuses BINARY, in which case NVT rules apply in that direction only: a
//! bare CR goes out as CR NUL, and CR NUL or CR LF coming in becomes CR
//! (Enter, as a terminal sends it to a getty).
//!
//! # Raw clients
//!
//! Bytes pass untouched both ways: no 0xFF doubling, no IAC parsing, NUL
//! and CR as they are, and the first bytes go to the VM at once.

use super::{Flow, Session, WaitFuture};
use crate::hub::{Access, AttachError, Attached, ConsoleProtocol, Hub, LockMode, Replay, Vm};
use crate::outbox::Encoding;
use crate::wire::{encode, opt, Change, Decoder, Event, Negotiator, OptionSet, IAC};
use bytes::Bytes;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

const LOCAL_OK: OptionSet = OptionSet::of(&[opt::BINARY, opt::SGA, opt::ECHO]);
const REMOTE_OK: OptionSet = OptionSet::of(&[opt::BINARY, opt::SGA]);

/// Console input may queue this much for the VM before the console waits.
pub const INPUT_HIGH_WATER: usize = 64 * 1024;

/// Console input resumes when the VM's queue is down to this.
const INPUT_LOW_WATER: usize = 16 * 1024;

/// How long a silent client has to speak first before it is offered
/// telnet. Programs that speak first (gdb, PuTTY) decide at once; a person
/// does not notice a third of a second at connect.
pub const DETECT_WINDOW: Duration = Duration::from_millis(300);

/// How long output waits for the answer to the telnet offer before it
/// flows raw.
pub const ANSWER_WAIT: Duration = Duration::from_secs(1);

/// Where the session is in telling the client apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Nothing sent either way yet; output is held.
    Silent,
    /// The telnet opening went out; output is held until the answer or
    /// [`ANSWER_WAIT`], then flows raw until the client speaks.
    Offered,
    Telnet,
    Raw,
}

/// A console's session.
pub struct ConsoleSession {
    hub: Arc<Hub>,
    vm: Arc<Vm>,
    peer: Attached,
    decoder: Decoder,
    neg: Negotiator,
    mode: Mode,
    /// The next step of telling the client apart, while one is due.
    detect_at: Option<Instant>,
    /// What the console was granted; a read-only console's input is
    /// discarded.
    access: Access,
    /// The client refused BINARY for its input: undo NVT CR NUL / CR LF.
    nvt_in: bool,
    after_cr: bool,
    /// Scratch: input collected during one read.
    input: Vec<u8>,
    out: Vec<u8>,
    closing: bool,
    /// Disconnected for taking no output (counted as a stall, not a
    /// close, in the metrics).
    stalled: bool,
    /// Input is not read until the VM's queue for console input drains.
    wait: Option<WaitFuture>,
    /// The VM's recent output: held back for a console still being told
    /// apart (a telnet client gets it ahead of live output, a raw one
    /// never), or handed to the door ([`ConsoleSession::take_history`]).
    past: Option<Box<[u8]>>,
    /// The session's audit record: its end line is logged (with the bytes
    /// each way) when the session closes. `None` until the caller, which
    /// knows who the client is, starts it.
    audit: Option<crate::audit::Guard>,
}

impl ConsoleSession {
    /// The opening negotiation for a new console.
    pub fn opening() -> (Negotiator, Vec<u8>) {
        let mut neg = Negotiator::new(LOCAL_OK, REMOTE_OK);
        let mut out = Vec::new();
        offer(&mut neg, &mut out);
        (neg, out)
    }

    /// Open a console on `vm`: queue the opening negotiation for a telnet
    /// session, and what the VM said before as `replay` asks; then join the
    /// fan-out with the lock `mode` asks for. A console still being told
    /// apart (`Auto`) gets the history only once it turns out to speak
    /// telnet. Nothing is written to the peer until the caller starts
    /// serving the session, so protocol answers can go first.
    pub fn join(
        hub: &Arc<Hub>,
        vm: &Arc<Vm>,
        mode: LockMode,
        replay: Replay<'_>,
        protocol: ConsoleProtocol,
    ) -> Result<ConsoleSession, AttachError> {
        Self::join_at(hub, vm, mode, replay, protocol, Instant::now())
    }

    /// [`ConsoleSession::join`] at time `now` (the clock is read by the
    /// caller, so the detection timers can be driven with synthetic time).
    pub fn join_at(
        hub: &Arc<Hub>,
        vm: &Arc<Vm>,
        mode: LockMode,
        replay: Replay<'_>,
        protocol: ConsoleProtocol,
        now: Instant,
    ) -> Result<ConsoleSession, AttachError> {
        let (encoding, start) = match protocol {
            ConsoleProtocol::Auto => (Encoding::Hold, Mode::Silent),
            ConsoleProtocol::Telnet => (Encoding::Telnet, Mode::Telnet),
            ConsoleProtocol::Raw => (Encoding::Raw, Mode::Raw),
        };
        let peer = hub.new_peer(hub.config().console_queue, encoding);
        let mut neg = Negotiator::new(LOCAL_OK, REMOTE_OK);
        if start == Mode::Telnet {
            let mut opening = Vec::new();
            offer(&mut neg, &mut opening);
            peer.outbox.push_control(opening.into());
        }
        // Told apart later: the history waits in the session.
        let replay = match replay {
            Replay::Show(fallback) if start == Mode::Silent => Replay::Return(fallback),
            other => other,
        };
        let (access, past) = hub.attach_console(vm, peer.clone(), mode, replay)?;
        Ok(ConsoleSession {
            hub: hub.clone(),
            vm: vm.clone(),
            peer,
            decoder: Decoder::default(),
            neg,
            mode: start,
            detect_at: (start == Mode::Silent).then(|| now + DETECT_WINDOW),
            access,
            nvt_in: false,
            after_cr: false,
            input: Vec::new(),
            out: Vec::new(),
            closing: false,
            stalled: false,
            wait: None,
            past: (!past.is_empty()).then(|| past.into_boxed_slice()),
            audit: None,
        })
    }

    /// The history handed back by a [`Replay::Return`] join (for a door
    /// that sends it its own way); empty if there was none.
    pub fn take_history(&mut self) -> Vec<u8> {
        self.past.take().map(Vec::from).unwrap_or_default()
    }

    /// How long this console's socket may take nothing while output waits
    /// (the hub's `--console-stall-timeout`).
    pub fn stall_timeout(&self) -> Option<Duration> {
        self.hub.config().console_stall
    }

    /// Start the session's audit record (see [`crate::audit`]): the start
    /// line now, the end line with the bytes each way when it closes.
    /// Bytes to the VM are the input handed to it (after telnet decoding);
    /// bytes from it are what went out on the client's connection.
    pub fn audit(
        &mut self,
        kind: crate::audit::Kind,
        peer: Option<std::net::SocketAddr>,
        user: Option<String>,
    ) {
        let mut guard = crate::audit::start(
            &self.hub,
            crate::audit::Start {
                kind,
                peer,
                user,
                vm: &self.vm,
                access: self.access,
            },
        );
        guard.count_output(self.peer.outbox.clone());
        self.audit = Some(guard);
    }

    /// The session's number in its audit lines, once [`Self::audit`] ran.
    pub fn audit_id(&self) -> Option<u64> {
        self.audit.as_ref().map(|g| g.id())
    }

    /// Where the session stands with its client, for a session that takes
    /// the client over (cluster mode: its VM moved to another node): `raw`,
    /// `telnet-LR` (L, R: BINARY agreed out and in, `1` or `0`),
    /// `offered` (a silent client was offered telnet and has not answered
    /// yet), `offered-raw` (it did not answer in time and is served raw
    /// until its first byte), or empty while nothing was offered yet.
    pub fn resume_token(&self) -> String {
        match self.mode {
            Mode::Raw => "raw".into(),
            Mode::Telnet => format!(
                "telnet-{}{}",
                u8::from(self.neg.local(opt::BINARY)),
                u8::from(self.neg.remote(opt::BINARY))
            ),
            Mode::Offered if self.detect_at.is_none() => "offered-raw".into(),
            Mode::Offered => "offered".into(),
            Mode::Silent => String::new(),
        }
    }

    /// [`Self::resume_token`], and once the VM was let go here (cluster
    /// mode), `@` and where its output stood then
    /// ([`crate::hub::replay::Position::token`]): all the console was
    /// given, so the session that takes the client over on the VM's next
    /// node goes on from the next byte.
    pub fn follow_token(&self) -> String {
        let mut t = self.resume_token();
        if let Some(p) = self.hub.left_at(&self.vm) {
            t.push('@');
            t.push_str(&p.token());
        }
        t
    }

    /// Take over a client another session served, in the state
    /// [`Self::resume_token`] gave: nothing is negotiated again (a telnet
    /// client does not answer offers of what is on already). Call right
    /// after joining with [`ConsoleProtocol::Auto`]; an unknown or empty
    /// token leaves the session as it is, and a position after `@` (see
    /// [`Self::follow_token`]) is for the join, not for this.
    pub fn resume(&mut self, token: &str) {
        let mode = token.split_once('@').map_or(token, |(m, _)| m);
        let (local, remote) = match mode {
            // Offered already: not again (a silent client would see the
            // offer twice); its answer, if it comes, is still taken. Still
            // waiting for it, the join's detection deadline serves as the
            // rest of the wait.
            "offered" | "offered-raw" => {
                let mut scratch = Vec::new();
                offer(&mut self.neg, &mut scratch);
                self.mode = Mode::Offered;
                if mode == "offered-raw" {
                    self.past = None;
                    self.detect_at = None;
                    self.peer.outbox.set_encoding(Encoding::Raw);
                }
                return;
            }
            "raw" => {
                self.mode = Mode::Raw;
                self.past = None;
                self.detect_at = None;
                self.peer.outbox.set_encoding(Encoding::Raw);
                return;
            }
            "telnet-11" => (true, true),
            "telnet-10" => (true, false),
            "telnet-01" => (false, true),
            "telnet-00" => (false, false),
            _ => return,
        };
        // The offer as the first session made it, answered as the client
        // answered it; every reply is dropped (the client has had them).
        let mut scratch = Vec::new();
        offer(&mut self.neg, &mut scratch);
        use crate::wire::Verb;
        for (verb, o) in [
            (Verb::Do, opt::ECHO),
            (Verb::Do, opt::SGA),
            (if local { Verb::Do } else { Verb::Dont }, opt::BINARY),
            (if remote { Verb::Will } else { Verb::Wont }, opt::BINARY),
            (Verb::Will, opt::SGA),
        ] {
            let _ = self.neg.receive(verb, o, &mut scratch);
        }
        self.mode = Mode::Telnet;
        self.past = None;
        self.detect_at = None;
        self.nvt_in = !remote;
        self.peer.outbox.set_encoding(if local {
            Encoding::Telnet
        } else {
            Encoding::Nvt
        });
    }

    /// What the console was granted.
    pub fn access(&self) -> Access {
        self.access
    }

    /// The console's outbox (what the network layer writes out).
    pub fn outbox(&self) -> Arc<crate::outbox::Outbox> {
        self.peer.outbox.clone()
    }

    /// Queue a text line for this console.
    pub fn tell(&self, text: &str) {
        self.peer
            .outbox
            .push_always(Bytes::copy_from_slice(text.as_bytes()));
    }

    /// The client's first byte decides what it is.
    fn decide(&mut self, first: u8) {
        if first == IAC {
            if self.mode == Mode::Silent {
                let mut out = std::mem::take(&mut self.out);
                offer(&mut self.neg, &mut out);
                self.out = out;
            }
            self.mode = Mode::Telnet;
            if let Some(past) = self.past.take() {
                let shown = [&past[..], crate::hub::replay::MARKER].concat();
                self.peer.outbox.push_front_always(Bytes::from(shown));
            }
            self.peer.outbox.set_encoding(Encoding::Telnet);
            tracing::debug!(conn = self.peer.id, "console speaks telnet");
        } else {
            self.mode = Mode::Raw;
            self.past = None;
            self.peer.outbox.set_encoding(Encoding::Raw);
            tracing::debug!(
                conn = self.peer.id,
                "console speaks no telnet; serving it raw"
            );
        }
        self.detect_at = None;
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
                Some(Change::LocalDisabled(opt::BINARY)) => {
                    self.peer.outbox.set_encoding(Encoding::Nvt)
                }
                Some(Change::LocalEnabled(opt::BINARY)) => {
                    self.peer.outbox.set_encoding(Encoding::Telnet)
                }
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

    /// Queue the collected input for the VM; read no more input while the
    /// VM's queue is full.
    fn send_input(&mut self, data: Option<&[u8]>) {
        let input = data.unwrap_or(&self.input);
        if !input.is_empty() {
            if let Some(a) = self.audit.as_mut() {
                a.to_vm(input.len());
            }
            if let Some(vm_outbox) = self.hub.console_input(&self.vm, input) {
                if vm_outbox.queued() > INPUT_HIGH_WATER {
                    self.wait = Some(Box::pin(
                        async move { vm_outbox.drained(INPUT_LOW_WATER).await },
                    ));
                }
            }
        }
        self.input.clear();
        if self.input.capacity() > 64 * 1024 {
            self.input = Vec::new();
        }
    }

    fn flush_replies(&mut self) {
        if !self.out.is_empty() {
            self.peer
                .outbox
                .push_control(Bytes::from(std::mem::take(&mut self.out)));
        }
    }
}

/// Append the opening offer: WILL ECHO, WILL SGA, WILL BINARY, DO BINARY,
/// DO SGA.
fn offer(neg: &mut Negotiator, out: &mut Vec<u8>) {
    neg.enable_local(opt::ECHO, out);
    neg.enable_local(opt::SGA, out);
    neg.enable_local(opt::BINARY, out);
    neg.enable_remote(opt::BINARY, out);
    neg.enable_remote(opt::SGA, out);
}

impl Session for ConsoleSession {
    fn on_input(&mut self, data: &[u8], _now: Instant) -> Flow {
        if matches!(self.mode, Mode::Silent | Mode::Offered) {
            if let Some(&first) = data.first() {
                self.decide(first);
            }
        }
        if self.mode == Mode::Raw {
            self.flush_replies();
            if self.access == Access::ReadOnly {
                return Flow::Continue;
            }
            self.send_input(Some(data));
            return Flow::Continue;
        }
        let mut decoder = std::mem::take(&mut self.decoder);
        let result = decoder.decode(data, |ev| self.handle(ev));
        self.decoder = decoder;
        if let Err(e) = result {
            tracing::info!(conn = self.peer.id, "closing console: {e}");
            self.closing = true;
        }
        self.flush_replies();
        self.send_input(None);
        if self.closing {
            Flow::Close
        } else {
            Flow::Continue
        }
    }

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if let Some(w) = self.wait.as_mut() {
            std::task::ready!(w.as_mut().poll(cx));
            self.wait = None;
        }
        Poll::Ready(())
    }

    fn deadline(&self) -> Option<Instant> {
        self.detect_at
    }

    fn on_deadline(&mut self, now: Instant) -> Flow {
        match self.mode {
            Mode::Silent => {
                let mut out = std::mem::take(&mut self.out);
                offer(&mut self.neg, &mut out);
                self.out = out;
                self.flush_replies();
                self.mode = Mode::Offered;
                self.detect_at = Some(now + ANSWER_WAIT);
            }
            Mode::Offered => {
                // No answer: not a telnet client. Output flows raw; the
                // client's first byte, whenever it comes, still decides.
                // History is for telnet clients only.
                self.past = None;
                self.peer.outbox.set_encoding(Encoding::Raw);
                self.detect_at = None;
            }
            Mode::Telnet | Mode::Raw => self.detect_at = None,
        }
        Flow::Continue
    }

    fn on_close(&mut self, now: Instant) {
        let reason = if self.stalled {
            crate::metrics::Disconnect::Stall
        } else {
            crate::metrics::Disconnect::Closed
        };
        self.hub
            .detach_console_for(&self.vm, self.peer.id, reason, now);
        tracing::info!(vm = %self.vm.name(), "console disconnected");
        // Logs the audit end line.
        self.audit.take();
    }

    fn on_stall(&mut self) {
        self.stalled = true;
    }
}

#[cfg(test)]
mod tests {
    //! The console session in-process, with synthetic time: telling raw and
    //! telnet clients apart, the offer and its wait, NVT, and read-only
    //! input, driven through [`Session`] with a made-up `now`.
    use super::*;
    use crate::hub::{Attached, Identity};
    use crate::testing::written;

    const OFFER: &[u8] = b"\xff\xfb\x01\xff\xfb\x03\xff\xfb\x00\xff\xfd\x00\xff\xfd\x03";

    fn vm() -> (Arc<Hub>, Arc<Vm>, Attached) {
        let h = crate::testing::hub(Duration::from_secs(60), Duration::from_secs(30), 1 << 20);
        let p = h.new_peer(1 << 20, Encoding::Telnet);
        let id = Identity {
            key: "k".into(),
            uuid: "u".into(),
            name: "vm".into(),
        };
        let vm = h.attach_vm(&id, p.clone()).expect("attach");
        (h, vm, p)
    }

    fn join(h: &Arc<Hub>, vm: &Arc<Vm>, p: ConsoleProtocol, t0: Instant) -> ConsoleSession {
        ConsoleSession::join_at(h, vm, LockMode::FreeForAll, Replay::None, p, t0).expect("join")
    }

    #[test]
    fn a_silent_client_is_offered_telnet_then_served_raw() {
        let (h, vm, _) = vm();
        let t0 = Instant::now();
        let mut c = join(&h, &vm, ConsoleProtocol::Auto, t0);
        let out = c.outbox();
        assert_eq!(c.deadline(), Some(t0 + DETECT_WINDOW));
        // Output waits while it is told apart.
        h.vm_output(
            &vm,
            vm_conn(&h, &vm),
            bytes::Bytes::from_static(b"boot\xff"),
        );
        assert_eq!(written(&out).0, b"", "output went out before the decision");
        c.on_deadline(t0 + DETECT_WINDOW);
        assert_eq!(written(&out).0, OFFER, "the offer, and nothing else yet");
        assert_eq!(c.deadline(), Some(t0 + DETECT_WINDOW + ANSWER_WAIT));
        c.on_deadline(t0 + DETECT_WINDOW + ANSWER_WAIT);
        assert_eq!(c.deadline(), None);
        assert_eq!(written(&out).0, b"boot\xff", "raw after no answer");
    }

    #[test]
    fn a_resumed_session_takes_the_client_over_without_negotiating() {
        let (h, vm, vm_peer) = vm();
        let t0 = Instant::now();
        // A telnet client in binary both ways, taken over.
        let mut first = join(&h, &vm, ConsoleProtocol::Telnet, t0);
        for (verb, o) in [
            (b'\xfd', 1u8),
            (b'\xfd', 3),
            (b'\xfd', 0),
            (b'\xfb', 0),
            (b'\xfb', 3),
        ] {
            first.on_input(&[IAC, verb, o], t0);
        }
        assert_eq!(first.resume_token(), "telnet-11");
        let mut next = join(&h, &vm, ConsoleProtocol::Auto, t0);
        next.resume(&first.resume_token());
        assert_eq!(next.deadline(), None, "nothing left to tell apart");
        assert_eq!(written(&next.outbox()).0, b"", "no offer again");
        h.vm_output(
            &vm,
            vm_conn(&h, &vm),
            bytes::Bytes::from_static(b"a\xffb\r"),
        );
        assert_eq!(
            written(&next.outbox()).0,
            b"a\xff\xffb\r",
            "binary telnet output"
        );
        next.on_input(b"x\xff\xffy\r\n", t0);
        assert_eq!(
            written(&vm_peer.outbox).0,
            b"x\xff\xffy\r\n",
            "binary input, IAC undoubled then escaped for the VM"
        );
        // A raw client, taken over: bytes as they are.
        let mut raw = join(&h, &vm, ConsoleProtocol::Auto, t0);
        raw.resume("raw");
        assert_eq!(raw.resume_token(), "raw");
        h.vm_output(&vm, vm_conn(&h, &vm), bytes::Bytes::from_static(b"\xff\r"));
        assert_eq!(written(&raw.outbox()).0, b"\xff\r");
        // Not yet told apart: nothing to resume, told apart as usual.
        let mut silent = join(&h, &vm, ConsoleProtocol::Auto, t0);
        assert_eq!(silent.resume_token(), "");
        // Offered, then served raw for want of an answer: taken over as
        // that, with no second offer.
        silent.on_deadline(t0 + DETECT_WINDOW);
        assert_eq!(silent.resume_token(), "offered");
        silent.on_deadline(t0 + DETECT_WINDOW + ANSWER_WAIT);
        assert_eq!(silent.resume_token(), "offered-raw");
        let mut again = join(&h, &vm, ConsoleProtocol::Auto, t0);
        again.resume("offered-raw@ab.1");
        assert_eq!(again.deadline(), None, "nothing left to wait for");
        h.vm_output(&vm, vm_conn(&h, &vm), bytes::Bytes::from_static(b"\xff\r"));
        assert_eq!(written(&again.outbox()).0, b"\xff\r", "raw, and no offer");
        // Still waiting for the answer: the wait goes on, then raw.
        let mut waiting = join(&h, &vm, ConsoleProtocol::Auto, t0);
        waiting.resume("offered");
        assert_eq!(waiting.resume_token(), "offered");
        waiting.on_deadline(t0 + DETECT_WINDOW);
        assert_eq!(waiting.resume_token(), "offered-raw");
        assert_eq!(written(&waiting.outbox()).0, b"", "no offer");
    }

    /// The VM's connection id (the hub's `vm_output` wants it).
    fn vm_conn(_h: &Hub, vm: &Vm) -> crate::hub::ConnId {
        vm.active_conn().expect("connected")
    }

    #[test]
    fn the_first_byte_decides_telnet_or_raw() {
        let (h, vm, vm_peer) = vm();
        let t0 = Instant::now();
        // IAC: telnet, offered at once, 0xFF doubled from then on.
        let mut telnet = join(&h, &vm, ConsoleProtocol::Auto, t0);
        telnet.on_input(b"\xff\xfd\x03", t0);
        assert_eq!(telnet.deadline(), None);
        assert_eq!(telnet.outbox().encoding(), Encoding::Telnet);
        assert!(written(&telnet.outbox()).0.starts_with(OFFER));
        // Anything else: raw, and the first bytes go to the VM at once.
        let mut raw = join(&h, &vm, ConsoleProtocol::Auto, t0);
        raw.on_input(b"+$qSupported#37", t0);
        assert_eq!(raw.outbox().encoding(), Encoding::Raw);
        assert_eq!(written(&vm_peer.outbox).0, b"+$qSupported#37");
        assert_eq!(
            written(&raw.outbox()).0,
            b"",
            "a raw client saw negotiation"
        );
    }

    #[test]
    fn forced_modes_skip_the_guess() {
        let (h, vm, _) = vm();
        let t0 = Instant::now();
        let telnet = join(&h, &vm, ConsoleProtocol::Telnet, t0);
        assert_eq!(telnet.deadline(), None);
        assert_eq!(written(&telnet.outbox()).0, OFFER);
        let raw = join(&h, &vm, ConsoleProtocol::Raw, t0);
        assert_eq!(raw.deadline(), None);
        assert_eq!(raw.outbox().encoding(), Encoding::Raw);
        assert_eq!(written(&raw.outbox()).0, b"");
    }

    #[test]
    fn a_client_that_refuses_binary_gets_nvt_both_ways() {
        let (h, vm, vm_peer) = vm();
        let t0 = Instant::now();
        let mut c = join(&h, &vm, ConsoleProtocol::Telnet, t0);
        written(&c.outbox());
        // DONT BINARY, WONT BINARY, then Enter as CR NUL and CR LF.
        c.on_input(b"\xff\xfe\x00\xff\xfc\x00a\r\0b\r\n", t0);
        assert_eq!(c.outbox().encoding(), Encoding::Nvt);
        assert_eq!(written(&vm_peer.outbox).0, b"a\rb\r");
    }

    #[test]
    fn a_read_only_console_types_nothing() {
        let (h, vm, vm_peer) = vm();
        let t0 = Instant::now();
        let _writer = ConsoleSession::join_at(
            &h,
            &vm,
            LockMode::Write,
            Replay::None,
            ConsoleProtocol::Raw,
            t0,
        )
        .expect("writer");
        let mut watcher = ConsoleSession::join_at(
            &h,
            &vm,
            LockMode::FreeForAllOrReadOnly,
            Replay::None,
            ConsoleProtocol::Raw,
            t0,
        )
        .expect("watcher");
        assert_eq!(watcher.access(), Access::ReadOnly);
        watcher.on_input(b"rm -rf /\r", t0);
        assert_eq!(written(&vm_peer.outbox).0, b"");
    }

    /// A console joined with the VM's history shown (as the console ports
    /// do with `--console-replay`).
    fn join_replay(h: &Arc<Hub>, vm: &Arc<Vm>, p: ConsoleProtocol, t0: Instant) -> ConsoleSession {
        ConsoleSession::join_at(h, vm, LockMode::FreeForAll, Replay::Show(b""), p, t0)
            .expect("join")
    }

    #[test]
    fn history_then_the_marker_then_live_output_for_a_telnet_client() {
        let (h, vm, _) = vm();
        let t0 = Instant::now();
        let conn = vm_conn(&h, &vm);
        h.vm_output(&vm, conn, bytes::Bytes::from_static(b"panic: boom\r\n"));
        // Told apart later: nothing, not even the history, goes out yet.
        let mut c = join_replay(&h, &vm, ConsoleProtocol::Auto, t0);
        h.vm_output(&vm, conn, bytes::Bytes::from_static(b"live"));
        assert_eq!(written(&c.outbox()).0, b"");
        c.on_input(b"\xff\xfd\x03", t0);
        let (out, _) = written(&c.outbox());
        let want = [
            OFFER,
            b"panic: boom\r\n",
            crate::hub::replay::MARKER,
            b"live",
        ]
        .concat();
        assert_eq!(out, want, "offer, history, marker, then live");
    }

    #[test]
    fn a_raw_client_never_gets_the_history() {
        let (h, vm, _) = vm();
        let t0 = Instant::now();
        let conn = vm_conn(&h, &vm);
        h.vm_output(&vm, conn, bytes::Bytes::from_static(b"old"));
        // Speaks first, not telnet.
        let mut gdb = join_replay(&h, &vm, ConsoleProtocol::Auto, t0);
        h.vm_output(&vm, conn, bytes::Bytes::from_static(b"new"));
        gdb.on_input(b"+$qSupported#37", t0);
        assert_eq!(written(&gdb.outbox()).0, b"new");
        // Silent, and does not answer the offer.
        let mut nc = join_replay(&h, &vm, ConsoleProtocol::Auto, t0);
        h.vm_output(&vm, conn, bytes::Bytes::from_static(b"newer"));
        nc.on_deadline(t0 + DETECT_WINDOW);
        nc.on_deadline(t0 + DETECT_WINDOW + ANSWER_WAIT);
        assert_eq!(written(&nc.outbox()).0, [OFFER, b"newer"].concat());
        // Its first byte, even IAC, comes too late for the history.
        nc.on_input(b"\xff\xfd\x03", t0 + DETECT_WINDOW + ANSWER_WAIT);
        h.vm_output(&vm, conn, bytes::Bytes::from_static(b"x"));
        assert_eq!(written(&nc.outbox()).0, b"x");
    }

    #[test]
    fn returned_history_is_handed_to_the_door_and_not_queued() {
        let (h, vm, _) = vm();
        let t0 = Instant::now();
        let conn = vm_conn(&h, &vm);
        h.vm_output(&vm, conn, bytes::Bytes::from_static(b"login: "));
        let mut c = ConsoleSession::join_at(
            &h,
            &vm,
            LockMode::FreeForAll,
            Replay::Return(b"scrollback"),
            ConsoleProtocol::Telnet,
            t0,
        )
        .expect("join");
        assert_eq!(
            c.take_history(),
            b"login: ",
            "the ring wins over a backend's scrollback"
        );
        assert_eq!(written(&c.outbox()).0, OFFER);
        // A VM that said nothing yet: the backend's scrollback instead.
        let (h2, vm2, _) = self::vm();
        let mut c2 = ConsoleSession::join_at(
            &h2,
            &vm2,
            LockMode::FreeForAll,
            Replay::Return(b"scrollback"),
            ConsoleProtocol::Telnet,
            t0,
        )
        .expect("join");
        assert_eq!(c2.take_history(), b"scrollback");
    }
}
