//! RFC 1143 option negotiation (the "Q method").
//!
//! Each option has a state for our side ("us": WILL/WONT) and the peer's
//! side ("him": DO/DONT). A request we make moves the state to WANTYES or
//! WANTNO, and the peer's answer settles it without a reply, so an answer is
//! never answered and two correct peers can never loop. Only options that
//! were ever touched take memory.

use super::{encode, Verb};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Q {
    No,
    Yes,
    WantNo,
    /// WANTNO with the opposite request queued.
    WantNoOpposite,
    WantYes,
    /// WANTYES with the opposite request queued.
    WantYesOpposite,
}

/// A set of option codes (a 256-bit bitmap).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OptionSet([u64; 4]);

impl OptionSet {
    /// The set holding `options`.
    pub const fn of(options: &[u8]) -> OptionSet {
        let mut bits = [0u64; 4];
        let mut i = 0;
        while i < options.len() {
            let o = options[i] as usize;
            bits[o / 64] |= 1 << (o % 64);
            i += 1;
        }
        OptionSet(bits)
    }

    pub fn contains(&self, option: u8) -> bool {
        let o = option as usize;
        self.0[o / 64] & (1 << (o % 64)) != 0
    }
}

/// What a received command changed, for the session to act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// We now perform the option (the peer said DO).
    LocalEnabled(u8),
    LocalDisabled(u8),
    /// The peer now performs the option (it said WILL).
    RemoteEnabled(u8),
    /// The peer stopped performing the option, or refused our DO.
    RemoteDisabled(u8),
    /// The peer asked for something we refused.
    Refused(Verb, u8),
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    option: u8,
    us: Q,
    him: Q,
}

/// Per-connection negotiation state.
#[derive(Debug, Clone)]
pub struct Negotiator {
    /// Options we agree to perform when asked (DO).
    local_ok: OptionSet,
    /// Options we agree to let the peer perform (WILL).
    remote_ok: OptionSet,
    entries: Vec<Entry>,
}

impl Negotiator {
    pub fn new(local_ok: OptionSet, remote_ok: OptionSet) -> Negotiator {
        Negotiator {
            local_ok,
            remote_ok,
            entries: Vec::new(),
        }
    }

    fn entry(&mut self, option: u8) -> &mut Entry {
        let idx = match self.entries.iter().position(|e| e.option == option) {
            Some(i) => i,
            None => {
                self.entries.push(Entry {
                    option,
                    us: Q::No,
                    him: Q::No,
                });
                self.entries.len() - 1
            }
        };
        &mut self.entries[idx]
    }

    fn get(&self, option: u8) -> Option<&Entry> {
        self.entries.iter().find(|e| e.option == option)
    }

    /// True when we perform `option`.
    pub fn local(&self, option: u8) -> bool {
        self.get(option).is_some_and(|e| e.us == Q::Yes)
    }

    /// True when the peer performs `option`.
    pub fn remote(&self, option: u8) -> bool {
        self.get(option).is_some_and(|e| e.him == Q::Yes)
    }

    /// True while our DO for `option` awaits an answer.
    pub fn remote_pending(&self, option: u8) -> bool {
        self.get(option)
            .is_some_and(|e| matches!(e.him, Q::WantYes | Q::WantYesOpposite))
    }

    /// Ask to perform `option` ourselves (send WILL unless already on or asked).
    pub fn enable_local(&mut self, option: u8, out: &mut Vec<u8>) {
        let e = self.entry(option);
        e.us = request_enable(e.us, Verb::Will, option, out);
    }

    /// Ask the peer to perform `option` (send DO unless already on or asked).
    pub fn enable_remote(&mut self, option: u8, out: &mut Vec<u8>) {
        let e = self.entry(option);
        e.him = request_enable(e.him, Verb::Do, option, out);
    }

    /// Stop performing `option` ourselves (send WONT if it is on or asked).
    pub fn disable_local(&mut self, option: u8, out: &mut Vec<u8>) {
        let e = self.entry(option);
        e.us = request_disable(e.us, Verb::Wont, option, out);
    }

    /// Ask the peer to stop performing `option` (send DONT if on or asked).
    pub fn disable_remote(&mut self, option: u8, out: &mut Vec<u8>) {
        let e = self.entry(option);
        e.him = request_disable(e.him, Verb::Dont, option, out);
    }

    /// Handle a received `IAC verb option`; replies go to `out`.
    pub fn receive(&mut self, verb: Verb, option: u8, out: &mut Vec<u8>) -> Option<Change> {
        let (local_ok, remote_ok) = (self.local_ok, self.remote_ok);
        let e = self.entry(option);
        match verb {
            Verb::Will => {
                let was = e.him;
                let (q, change) = on_positive(
                    was,
                    remote_ok.contains(option),
                    option,
                    out,
                    (Verb::Do, Verb::Dont, Change::RemoteEnabled(option)),
                );
                e.him = q;
                refused_or(was, q, Verb::Will, option, change)
            }
            Verb::Do => {
                let was = e.us;
                let (q, change) = on_positive(
                    was,
                    local_ok.contains(option),
                    option,
                    out,
                    (Verb::Will, Verb::Wont, Change::LocalEnabled(option)),
                );
                e.us = q;
                refused_or(was, q, Verb::Do, option, change)
            }
            Verb::Wont => {
                let (q, changed) = on_negative(e.him, option, out, Verb::Dont, Verb::Do);
                e.him = q;
                changed.then_some(Change::RemoteDisabled(option))
            }
            Verb::Dont => {
                let (q, changed) = on_negative(e.us, option, out, Verb::Wont, Verb::Will);
                e.us = q;
                changed.then_some(Change::LocalDisabled(option))
            }
        }
    }
}

/// A request we did not make and turned down is reported as `Refused`.
fn refused_or(was: Q, now: Q, verb: Verb, option: u8, change: Option<Change>) -> Option<Change> {
    if was == Q::No && now == Q::No {
        Some(Change::Refused(verb, option))
    } else {
        change
    }
}

fn request_enable(q: Q, verb: Verb, option: u8, out: &mut Vec<u8>) -> Q {
    match q {
        Q::No => {
            encode::negotiate(verb, option, out);
            Q::WantYes
        }
        Q::WantNo => Q::WantNoOpposite,
        Q::WantYesOpposite => Q::WantYes,
        other => other,
    }
}

fn request_disable(q: Q, verb: Verb, option: u8, out: &mut Vec<u8>) -> Q {
    match q {
        Q::Yes => {
            encode::negotiate(verb, option, out);
            Q::WantNo
        }
        Q::WantYes => Q::WantYesOpposite,
        Q::WantNoOpposite => Q::WantNo,
        other => other,
    }
}

/// A WILL (for "him") or DO (for "us") arrived.
fn on_positive(
    q: Q,
    agree: bool,
    option: u8,
    out: &mut Vec<u8>,
    (yes, no, enabled): (Verb, Verb, Change),
) -> (Q, Option<Change>) {
    match q {
        Q::No if agree => {
            encode::negotiate(yes, option, out);
            (Q::Yes, Some(enabled))
        }
        Q::No => {
            encode::negotiate(no, option, out);
            (Q::No, None)
        }
        Q::Yes => (Q::Yes, None),
        // Our "no" was answered with "yes": a broken peer; settle on no.
        Q::WantNo => (Q::No, None),
        Q::WantNoOpposite => (Q::Yes, Some(enabled)),
        Q::WantYes => (Q::Yes, Some(enabled)),
        Q::WantYesOpposite => {
            encode::negotiate(no, option, out);
            (Q::WantNo, None)
        }
    }
}

/// A WONT (for "him") or DONT (for "us") arrived. Returns the new state and
/// whether something that was on (or asked for) is now off.
fn on_negative(q: Q, option: u8, out: &mut Vec<u8>, no: Verb, yes: Verb) -> (Q, bool) {
    match q {
        Q::No => (Q::No, false),
        Q::Yes => {
            encode::negotiate(no, option, out);
            (Q::No, true)
        }
        Q::WantNo => (Q::No, false),
        Q::WantNoOpposite => {
            encode::negotiate(yes, option, out);
            (Q::WantYes, false)
        }
        Q::WantYes | Q::WantYesOpposite => (Q::No, true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::opt::*;

    fn server() -> Negotiator {
        Negotiator::new(
            OptionSet::of(&[BINARY, SGA, ECHO]),
            OptionSet::of(&[BINARY, SGA, VMWARE_EXT]),
        )
    }

    #[test]
    fn answers_are_never_answered() {
        let mut n = server();
        let mut out = Vec::new();
        n.enable_local(BINARY, &mut out);
        n.enable_remote(BINARY, &mut out);
        assert_eq!(out, b"\xff\xfb\x00\xff\xfd\x00");
        out.clear();
        assert_eq!(
            n.receive(Verb::Do, BINARY, &mut out),
            Some(Change::LocalEnabled(BINARY))
        );
        assert_eq!(
            n.receive(Verb::Will, BINARY, &mut out),
            Some(Change::RemoteEnabled(BINARY))
        );
        assert!(out.is_empty(), "acknowledged an acknowledgement: {out:?}");
        // A repeated WILL while on is ignored.
        assert_eq!(n.receive(Verb::Will, BINARY, &mut out), None);
        assert!(out.is_empty());
        assert!(n.local(BINARY) && n.remote(BINARY));
    }

    #[test]
    fn unsolicited_requests_get_one_answer() {
        let mut n = server();
        let mut out = Vec::new();
        assert_eq!(
            n.receive(Verb::Will, AUTHENTICATION, &mut out),
            Some(Change::Refused(Verb::Will, AUTHENTICATION))
        );
        assert_eq!(out, b"\xff\xfe\x25");
        out.clear();
        n.receive(Verb::Will, COM_PORT, &mut out);
        assert_eq!(out, b"\xff\xfe\x2c");
        out.clear();
        assert_eq!(
            n.receive(Verb::Will, VMWARE_EXT, &mut out),
            Some(Change::RemoteEnabled(VMWARE_EXT))
        );
        assert_eq!(out, b"\xff\xfd\xe8");
        out.clear();
        n.receive(Verb::Do, 0x18, &mut out);
        assert_eq!(out, b"\xff\xfc\x18");
    }

    #[test]
    fn refusal_of_our_request_is_reported() {
        let mut n = server();
        let mut out = Vec::new();
        n.enable_remote(VMWARE_EXT, &mut out);
        assert!(n.remote_pending(VMWARE_EXT));
        out.clear();
        assert_eq!(
            n.receive(Verb::Wont, VMWARE_EXT, &mut out),
            Some(Change::RemoteDisabled(VMWARE_EXT))
        );
        assert!(out.is_empty());
        assert!(!n.remote(VMWARE_EXT));
    }

    #[test]
    fn disabling_while_enabling_is_queued() {
        let mut n = server();
        let mut out = Vec::new();
        n.enable_remote(SGA, &mut out);
        n.disable_remote(SGA, &mut out);
        assert_eq!(out, b"\xff\xfd\x03");
        out.clear();
        // The WILL settles the first request, then the queued DONT goes out.
        n.receive(Verb::Will, SGA, &mut out);
        assert_eq!(out, b"\xff\xfe\x03");
        out.clear();
        assert_eq!(n.receive(Verb::Wont, SGA, &mut out), None);
        assert!(out.is_empty() && !n.remote(SGA));
    }

    #[test]
    fn peer_turning_option_off_is_acknowledged_once() {
        let mut n = server();
        let mut out = Vec::new();
        n.receive(Verb::Will, SGA, &mut out);
        out.clear();
        assert_eq!(
            n.receive(Verb::Wont, SGA, &mut out),
            Some(Change::RemoteDisabled(SGA))
        );
        assert_eq!(out, b"\xff\xfe\x03");
        out.clear();
        assert_eq!(n.receive(Verb::Wont, SGA, &mut out), None);
        assert!(out.is_empty());
    }

    #[test]
    fn two_negotiators_settle_without_looping() {
        let mut a = server();
        let mut b = Negotiator::new(
            OptionSet::of(&[BINARY, SGA]),
            OptionSet::of(&[BINARY, SGA, ECHO]),
        );
        let mut to_b = Vec::new();
        for o in [BINARY, SGA, ECHO] {
            a.enable_local(o, &mut to_b);
        }
        a.enable_remote(BINARY, &mut to_b);
        a.enable_remote(VMWARE_EXT, &mut to_b);
        let mut rounds = 0;
        while !to_b.is_empty() {
            rounds += 1;
            assert!(rounds < 10, "negotiation loops");
            let mut to_a = Vec::new();
            feed(&mut b, &to_b, &mut to_a);
            to_b.clear();
            feed(&mut a, &to_a, &mut to_b);
        }
        assert!(a.local(BINARY) && a.local(ECHO) && a.remote(BINARY));
        assert!(!a.remote(VMWARE_EXT));
    }

    fn feed(n: &mut Negotiator, bytes: &[u8], out: &mut Vec<u8>) {
        for cmd in bytes.chunks(3) {
            let verb = match cmd[1] {
                0xfb => Verb::Will,
                0xfc => Verb::Wont,
                0xfd => Verb::Do,
                _ => Verb::Dont,
            };
            n.receive(verb, cmd[2], out);
        }
    }
}
