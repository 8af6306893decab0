//! Simulated peers of the proxy, for tests, examples and load tools: an ESXi
//! serial-port connection ([`SimVm`]) and a telnet user on a VM's console
//! port ([`SimConsole`]).
//!
//! Each simulated peer owns two tasks. A reader task decodes everything the
//! proxy sends with [`Decoder`], answers option negotiation the way the real
//! peer does (RFC 1143, via [`Negotiator`]), answers the proxy's questions,
//! records every command in an event log ([`Received`]) and buffers every data
//! byte, so nothing is lost between calls. A writer task sends, in call order;
//! every call (and every automatic answer) is one `write_all`, so bytes built
//! in one call leave in one write, as ESXi's do. Every wait takes a timeout,
//! and nothing the peer sends can make this module panic.
//!
//! Dropping a [`SimVm`] or [`SimConsole`] stops both tasks and closes the
//! connection at once; [`SimVm::close`] / [`SimConsole::close`] first deliver
//! what was queued and then shut the write side down.
//!
//! By job: `link` is the machinery both peers share (the reader and
//! writer tasks, the inbox, [`RawConn`]); `vm` is the ESXi side
//! ([`SimVm`], [`Identity`]); `console` is the telnet user
//! ([`SimConsole`]); [`capture`] reads the captured streams. The admin
//! port's listing is [`crate::try_list_vms`] (also [`list_vms`] here, the
//! name the load tool uses).
//!
//! [`Negotiator`]: vspc_codec::wire::Negotiator

use std::io;
use std::time::Duration;

use vspc_codec::vmware::Msg;
use vspc_codec::wire::{opt, DecodeError, Decoder, Event, Malformed, Verb};

pub mod capture;
mod console;
mod link;
#[cfg(test)]
mod tests;
mod vm;

/// The admin port's VM listing, sorted; the one implementation is
/// [`crate::try_list_vms`].
pub use crate::admin::try_list_vms as list_vms;
pub use console::{console_negotiator, ConsoleOptions, SimConsole};
pub use link::RawConn;
pub use vm::{Identity, Role, SimVm, VmOptions, VmotionReply};

/// The suboption list ESXi sends in KNOWN-SUBOPTIONS-1, in ESXi's order
/// (`tests/captures/stream0.txt`; note `50 51 54 55 56 57 52 53`).
pub const ESXI_KNOWN_SUBOPTIONS: &[u8] = &[
    0x00, 0x01, 0x02, 0x03, 0x28, 0x29, 0x2b, 0x2c, 0x2d, 0x2e, 0x30, 0x46, 0x47, 0x49, 0x50, 0x51,
    0x54, 0x55, 0x56, 0x57, 0x52, 0x53,
];

/// How long a simulated VM waits for KNOWN-SUBOPTIONS-2 after option 232 is
/// on before it sends KNOWN-SUBOPTIONS-1 anyway (the spec has the VM go first).
const KS1_FALLBACK: Duration = Duration::from_millis(500);

/// Default limit for every wait of the simulated peers.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// What can go wrong with a simulated peer.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout { what: String, after: Duration },
    #[error("connection ended ({reason}) while waiting for {what}")]
    Closed { what: String, reason: String },
    #[error("the proxy answered DO-PROXY with WONT-PROXY")]
    WontProxy,
    #[error("unexpected answer from the proxy: {0}")]
    Unexpected(String),
}

pub type Result<T, E = SimError> = std::result::Result<T, E>;

/// One command the proxy sent, owned. Data bytes are not events; they go to
/// the data buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// `IAC WILL/WONT/DO/DONT option`.
    Negotiate(Verb, u8),
    /// A VMware extension (option 232) subnegotiation: the code byte, then
    /// the payload, unescaped. [`Received::msg`] decodes it.
    Vmware(Vec<u8>),
    /// A subnegotiation for any other option (payload unescaped).
    Subneg { option: u8, payload: Vec<u8> },
    /// Any other two-byte command (`IAC NOP`, `IAC GA`, ...).
    Command(u8),
    /// Something malformed the decoder recovered from.
    Malformed(Malformed),
}

impl Received {
    /// The owned form of a decoder event; `None` for data.
    pub fn from_event(ev: &Event<'_>) -> Option<Received> {
        Some(match *ev {
            Event::Data(_) => return None,
            Event::Negotiate(verb, option) => Received::Negotiate(verb, option),
            Event::Subneg {
                option: opt::VMWARE_EXT,
                payload,
            } => Received::Vmware(payload.to_vec()),
            Event::Subneg { option, payload } => Received::Subneg {
                option,
                payload: payload.to_vec(),
            },
            Event::Command(c) => Received::Command(c),
            Event::Malformed(m) => Received::Malformed(m),
        })
    }

    /// The VMware message, if this is a well-formed one.
    pub fn msg(&self) -> Option<Msg<'_>> {
        match self {
            Received::Vmware(body) => Msg::decode(body).ok(),
            _ => None,
        }
    }
}

/// Decode a complete byte stream into its commands and its data (for
/// comparing transcripts). Use one call per direction of one connection.
pub fn decode_events(bytes: &[u8]) -> Result<(Vec<Received>, Vec<u8>), DecodeError> {
    let mut dec = Decoder::default();
    let mut events = Vec::new();
    let mut data = Vec::new();
    dec.decode(bytes, |ev| match ev {
        Event::Data(d) => data.extend_from_slice(d),
        other => events.extend(Received::from_event(&other)),
    })?;
    Ok((events, data))
}

/// Lowercase hex of `bytes`, for messages.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
