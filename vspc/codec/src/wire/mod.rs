//! The telnet layer, sans-IO: bytes in, events out; events in, bytes out.
//!
//! Nothing here knows about sockets or VMs. [`Decoder`] turns a byte stream
//! (split anywhere) into [`Event`]s, [`encode`] writes data and commands with
//! the escaping RFC 854 demands, and [`Negotiator`] runs RFC 1143's "Q method"
//! so option negotiation can never loop.

mod decoder;
pub mod encode;
mod options;

pub use decoder::{DecodeError, Decoder, Event, Malformed, OwnedEvent};
pub use options::{Change, Negotiator, OptionSet};

/// Interpret As Command.
pub const IAC: u8 = 0xFF;
pub const DONT: u8 = 0xFE;
pub const DO: u8 = 0xFD;
pub const WONT: u8 = 0xFC;
pub const WILL: u8 = 0xFB;
/// Subnegotiation Begin.
pub const SB: u8 = 0xFA;
/// Subnegotiation End.
pub const SE: u8 = 0xF0;
pub const NOP: u8 = 0xF1;

/// Telnet option codes this project cares about.
pub mod opt {
    pub const BINARY: u8 = 0;
    pub const ECHO: u8 = 1;
    pub const SGA: u8 = 3;
    pub const AUTHENTICATION: u8 = 37;
    pub const COM_PORT: u8 = 44;
    pub const VMWARE_EXT: u8 = 232;
}

/// One of the four negotiation verbs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Will,
    Wont,
    Do,
    Dont,
}

impl Verb {
    /// The command byte that follows IAC for this verb.
    pub fn byte(self) -> u8 {
        match self {
            Verb::Will => WILL,
            Verb::Wont => WONT,
            Verb::Do => DO,
            Verb::Dont => DONT,
        }
    }

    fn from_byte(b: u8) -> Option<Verb> {
        match b {
            WILL => Some(Verb::Will),
            WONT => Some(Verb::Wont),
            DO => Some(Verb::Do),
            DONT => Some(Verb::Dont),
            _ => None,
        }
    }
}
