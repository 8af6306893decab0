//! A resumable telnet decoder.
//!
//! The decoder keeps its state between calls, so a command may be split across
//! any number of reads. Runs of plain data are handed out as slices of the
//! caller's buffer (no copy); the scan for IAC uses `memchr`, so data without
//! IAC costs one vectorised search per read. A subnegotiation is collected up
//! to a hard limit: a peer that never sends IAC SE gets an error, not our
//! memory.

use super::{Verb, IAC, SB, SE};

/// What the decoder found in the stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// Data bytes, unescaped (an `IAC IAC` pair arrives as a one-byte run).
    Data(&'a [u8]),
    /// `IAC WILL/WONT/DO/DONT option`.
    Negotiate(Verb, u8),
    /// `IAC SB option payload IAC SE`, with `IAC IAC` in the payload unescaped.
    Subneg { option: u8, payload: &'a [u8] },
    /// Any other two-byte command (`IAC NOP`, `IAC BRK`, ...): the command byte.
    Command(u8),
    /// Something a well-behaved peer never sends; the decoder has recovered.
    Malformed(Malformed),
}

/// An owned copy of an [`Event`], for collecting and comparing whole
/// streams (tests, fuzzing, tools).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnedEvent {
    Data(Vec<u8>),
    Negotiate(Verb, u8),
    Subneg(u8, Vec<u8>),
    Command(u8),
    Malformed(Malformed),
}

impl OwnedEvent {
    /// Append `ev` to `out`, merging data into a preceding data run: where
    /// a stream was split into reads is not part of its meaning.
    pub fn push_merged(out: &mut Vec<OwnedEvent>, ev: Event<'_>) {
        let owned = match ev {
            Event::Data(b) => {
                if let Some(OwnedEvent::Data(prev)) = out.last_mut() {
                    prev.extend_from_slice(b);
                    return;
                }
                OwnedEvent::Data(b.to_vec())
            }
            Event::Negotiate(v, o) => OwnedEvent::Negotiate(v, o),
            Event::Subneg { option, payload } => OwnedEvent::Subneg(option, payload.to_vec()),
            Event::Command(c) => OwnedEvent::Command(c),
            Event::Malformed(m) => OwnedEvent::Malformed(m),
        };
        out.push(owned);
    }
}

/// Recoverable protocol violations, reported so the caller can log them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    /// `IAC SE` with no subnegotiation open.
    SeOutsideSubneg,
    /// `IAC SB IAC SE`: a subnegotiation with no option byte.
    EmptySubneg,
    /// `IAC x` inside a subnegotiation, x not IAC or SE: the subnegotiation
    /// is dropped and `IAC x` is handled as a command.
    IacInSubneg(u8),
}

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Malformed::SeOutsideSubneg => write!(f, "IAC SE outside a subnegotiation"),
            Malformed::EmptySubneg => write!(f, "subnegotiation without an option byte"),
            Malformed::IacInSubneg(b) => {
                write!(f, "IAC 0x{b:02x} inside a subnegotiation (dropped it)")
            }
        }
    }
}

/// Errors after which the connection cannot go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("subnegotiation for option {option} longer than {limit} bytes without IAC SE")]
    SubnegTooLong { option: u8, limit: usize },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Data,
    Iac,
    Negotiate(Verb),
    /// After `IAC SB`, waiting for the option byte.
    SubnegOption,
    /// `IAC SB IAC`: an IAC where the option byte should be.
    SubnegOptionIac,
    Subneg(u8),
    SubnegIac(u8),
}

/// Default cap on one subnegotiation's payload.
pub const DEFAULT_SUBNEG_LIMIT: usize = 64 * 1024;

/// Capacity above which the subnegotiation buffer is freed after use, so one
/// large message does not pin memory for the life of the connection.
const KEEP_CAPACITY: usize = 1024;

/// The decoder's state; one per connection direction.
#[derive(Debug)]
pub struct Decoder {
    state: State,
    sb: Vec<u8>,
    limit: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new(DEFAULT_SUBNEG_LIMIT)
    }
}

impl Decoder {
    /// A decoder that refuses subnegotiations longer than `limit` bytes.
    pub fn new(limit: usize) -> Decoder {
        Decoder {
            state: State::Data,
            sb: Vec::new(),
            limit,
        }
    }

    /// True when the decoder is between commands (no partial command held).
    pub fn is_idle(&self) -> bool {
        self.state == State::Data
    }

    /// Feed `input`; `sink` is called for each event, in stream order.
    pub fn decode<F>(&mut self, input: &[u8], mut sink: F) -> Result<(), DecodeError>
    where
        F: FnMut(Event<'_>),
    {
        let mut i = 0;
        while i < input.len() {
            match self.state {
                State::Data => match memchr::memchr(IAC, &input[i..]) {
                    None => {
                        sink(Event::Data(&input[i..]));
                        return Ok(());
                    }
                    Some(off) => {
                        if off > 0 {
                            sink(Event::Data(&input[i..i + off]));
                        }
                        i += off + 1;
                        self.state = State::Iac;
                    }
                },
                State::Iac => {
                    let b = input[i];
                    i += 1;
                    self.state = State::Data;
                    self.command(b, &mut sink);
                }
                State::Negotiate(verb) => {
                    sink(Event::Negotiate(verb, input[i]));
                    i += 1;
                    self.state = State::Data;
                }
                State::SubnegOption => {
                    let b = input[i];
                    i += 1;
                    self.state = if b == IAC {
                        State::SubnegOptionIac
                    } else {
                        State::Subneg(b)
                    };
                }
                State::SubnegOptionIac => {
                    let b = input[i];
                    i += 1;
                    match b {
                        // A doubled IAC: option 255.
                        IAC => self.state = State::Subneg(IAC),
                        SE => {
                            self.state = State::Data;
                            sink(Event::Malformed(Malformed::EmptySubneg));
                        }
                        other => {
                            self.state = State::Data;
                            sink(Event::Malformed(Malformed::IacInSubneg(other)));
                            self.command(other, &mut sink);
                        }
                    }
                }
                State::Subneg(option) => {
                    let rest = &input[i..];
                    let take = memchr::memchr(IAC, rest).unwrap_or(rest.len());
                    self.push_sb(option, &rest[..take])?;
                    i += take;
                    if take < rest.len() {
                        i += 1;
                        self.state = State::SubnegIac(option);
                    }
                }
                State::SubnegIac(option) => {
                    let b = input[i];
                    i += 1;
                    match b {
                        IAC => {
                            self.push_sb(option, &[IAC])?;
                            self.state = State::Subneg(option);
                        }
                        SE => {
                            self.state = State::Data;
                            sink(Event::Subneg {
                                option,
                                payload: &self.sb,
                            });
                            self.reset_sb();
                        }
                        other => {
                            self.state = State::Data;
                            self.reset_sb();
                            sink(Event::Malformed(Malformed::IacInSubneg(other)));
                            self.command(other, &mut sink);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Handle the byte after an IAC outside a subnegotiation.
    fn command<F: FnMut(Event<'_>)>(&mut self, b: u8, sink: &mut F) {
        if let Some(verb) = Verb::from_byte(b) {
            self.state = State::Negotiate(verb);
            return;
        }
        match b {
            IAC => sink(Event::Data(&[IAC])),
            SB => self.state = State::SubnegOption,
            SE => sink(Event::Malformed(Malformed::SeOutsideSubneg)),
            other => sink(Event::Command(other)),
        }
    }

    fn push_sb(&mut self, option: u8, bytes: &[u8]) -> Result<(), DecodeError> {
        if self.sb.len() + bytes.len() > self.limit {
            self.reset_sb();
            self.state = State::Data;
            return Err(DecodeError::SubnegTooLong {
                option,
                limit: self.limit,
            });
        }
        self.sb.extend_from_slice(bytes);
        Ok(())
    }

    fn reset_sb(&mut self) {
        if self.sb.capacity() > KEEP_CAPACITY {
            self.sb = Vec::new();
        } else {
            self.sb.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use OwnedEvent as Ev;

    /// Decode `chunks` in order, merging adjacent data runs.
    fn run(chunks: &[&[u8]]) -> Result<Vec<Ev>, DecodeError> {
        let mut d = Decoder::new(64);
        let mut out: Vec<Ev> = Vec::new();
        for c in chunks {
            d.decode(c, |e| Ev::push_merged(&mut out, e))?;
        }
        Ok(out)
    }

    fn every_split(input: &[u8]) -> Vec<Ev> {
        let whole = run(&[input]).unwrap();
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(run(&bytes).unwrap(), whole, "byte by byte");
        for cut in 0..=input.len() {
            let (a, b) = input.split_at(cut);
            assert_eq!(run(&[a, b]).unwrap(), whole, "split at {cut}");
        }
        whole
    }

    #[test]
    fn plain_data_passes_untouched() {
        let all: Vec<u8> = (0u8..0xFF).collect();
        assert_eq!(every_split(&all), vec![Ev::Data(all.clone())]);
    }

    #[test]
    fn doubled_iac_is_one_data_byte() {
        let ev = every_split(b"a\xff\xffb\x00\r\n\r\x00");
        assert_eq!(ev, vec![Ev::Data(b"a\xffb\x00\r\n\r\x00".to_vec())]);
    }

    #[test]
    fn negotiation_and_subnegotiation() {
        let input = b"\xff\xfb\x25x\xff\xfa\xe8\x28\x76\x19\xff\xff\xe9\xff\xf0\xff\xfd\x00";
        assert_eq!(
            every_split(input),
            vec![
                Ev::Negotiate(Verb::Will, 0x25),
                Ev::Data(b"x".to_vec()),
                Ev::Subneg(0xe8, vec![0x28, 0x76, 0x19, 0xff, 0xe9]),
                Ev::Negotiate(Verb::Do, 0),
            ]
        );
    }

    #[test]
    fn other_commands_and_malformed_input() {
        assert_eq!(
            every_split(b"\xff\xf1\xff\xf0a\xff\xfa\xff\xf0b"),
            vec![
                Ev::Command(0xf1),
                Ev::Malformed(Malformed::SeOutsideSubneg),
                Ev::Data(b"a".to_vec()),
                Ev::Malformed(Malformed::EmptySubneg),
                Ev::Data(b"b".to_vec()),
            ]
        );
        // A subnegotiation interrupted by a command: dropped, command kept.
        assert_eq!(
            every_split(b"\xff\xfa\xe8\x50abc\xff\xfb\x01z"),
            vec![
                Ev::Malformed(Malformed::IacInSubneg(0xfb)),
                Ev::Negotiate(Verb::Will, 1),
                Ev::Data(b"z".to_vec()),
            ]
        );
    }

    #[test]
    fn endless_subnegotiation_is_capped() {
        let mut input = b"\xff\xfa\xe8".to_vec();
        input.extend(std::iter::repeat_n(b'a', 100));
        assert_eq!(
            run(&[&input]),
            Err(DecodeError::SubnegTooLong {
                option: 0xe8,
                limit: 64
            })
        );
        // Exactly at the limit is fine.
        let mut ok = b"\xff\xfa\xe8".to_vec();
        ok.extend(std::iter::repeat_n(b'a', 64));
        ok.extend_from_slice(b"\xff\xf0");
        assert_eq!(run(&[&ok]).unwrap(), vec![Ev::Subneg(0xe8, vec![b'a'; 64])]);
    }
}
