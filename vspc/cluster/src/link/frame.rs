//! The link's frames on the wire, without I/O.
//!
//! A frame is a 4-byte big-endian length (of what follows), a 1-byte type
//! and the type's fields: integers big-endian, strings as a 2-byte length
//! and UTF-8, and the last byte field of a frame (data, input, a log) as
//! the rest of the frame. A decoder refuses a length over its limit before
//! it buffers anything, an unknown type, a field cut short, bytes left over
//! and invalid UTF-8.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The largest frame after the handshake (length field excluded): a data
/// chunk or a console log of [`MAX_LOG`] and its header.
pub const MAX_FRAME: usize = MAX_LOG + 1024;
/// The largest frame during the handshake.
pub const MAX_HANDSHAKE_FRAME: usize = 1024;
/// The most console bytes in one data frame.
pub const MAX_DATA: usize = 64 * 1024;
/// The most bytes of a console log fetched over the link.
pub const MAX_LOG: usize = 1024 * 1024;
/// Length of a handshake nonce and of an HMAC-SHA256 proof.
pub const NONCE_LEN: usize = 32;

/// How a console asks to be served (the daemon's `--console-protocol` for
/// the far console).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Tell telnet and raw clients apart by what they send first.
    Auto = 0,
    Telnet = 1,
    Raw = 2,
}

impl Protocol {
    fn from_u8(b: u8) -> Option<Protocol> {
        match b {
            0 => Some(Protocol::Auto),
            1 => Some(Protocol::Telnet),
            2 => Some(Protocol::Raw),
            _ => None,
        }
    }
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// First frame of each side: who it is, and its fresh nonce.
    Hello {
        version: u8,
        cluster: String,
        node: String,
        nonce: [u8; NONCE_LEN],
    },
    /// HMAC-SHA256 over both nonces, both names, the cluster and the TLS
    /// channel binding: proves the secret without sending it.
    Proof {
        mac: [u8; NONCE_LEN],
    },
    /// The handshake's outcome as this side sees it.
    Verdict {
        ok: bool,
        reason: String,
    },
    /// Open a console on a VM this peer holds.
    Open {
        stream: u32,
        uuid: String,
        /// Lock mode as the admin port spells it (`free-for-all`, ...).
        mode: String,
        protocol: Protocol,
        /// The console client's address, for the owner's audit line.
        client: String,
        /// Bytes the opener may receive before it grants more.
        window: u32,
    },
    /// The console is attached; the acceptor's receive window, and what
    /// it granted (the lock, for the door that asked).
    Accept {
        stream: u32,
        window: u32,
        granted: String,
    },
    /// The console was refused (lock, client limit, unknown VM...).
    Refuse {
        stream: u32,
        reason: String,
    },
    Data {
        stream: u32,
        data: Bytes,
    },
    /// The receiver took `bytes` more: the sender may send them.
    Credit {
        stream: u32,
        bytes: u32,
    },
    /// The sender sends no more on this stream (half-close).
    Shutdown {
        stream: u32,
    },
    /// The stream is over both ways.
    Close {
        stream: u32,
        reason: String,
    },
    /// vMotion hand-off: the VM now lives on the sender at `epoch`, and
    /// `input` is console input held since GOAHEAD.
    Handoff {
        id: u32,
        uuid: String,
        epoch: u64,
        input: Bytes,
    },
    /// The answer to a `Handoff`; when it let go of the VM, the sender's
    /// place in the VM's output (`said` bytes counted since `origin`,
    /// `recent` the last of them: its replay ring) and the console input
    /// it held since GOAHEAD, for the VM's new connection.
    HandoffDone {
        id: u32,
        ok: bool,
        reason: String,
        origin: u64,
        said: u64,
        input: Bytes,
        recent: Bytes,
    },
    /// Fetch up to `max` bytes of a VM's recent console output.
    LogRequest {
        id: u32,
        uuid: String,
        max: u32,
    },
    LogResponse {
        id: u32,
        found: bool,
        data: Bytes,
    },
    Ping {
        n: u64,
    },
    Pong {
        n: u64,
    },
}

const T_HELLO: u8 = 1;
const T_PROOF: u8 = 2;
const T_VERDICT: u8 = 3;
const T_OPEN: u8 = 10;
const T_ACCEPT: u8 = 11;
const T_REFUSE: u8 = 12;
const T_DATA: u8 = 13;
const T_CREDIT: u8 = 14;
const T_SHUTDOWN: u8 = 15;
const T_CLOSE: u8 = 16;
const T_HANDOFF: u8 = 20;
const T_HANDOFF_DONE: u8 = 21;
const T_LOG_REQUEST: u8 = 22;
const T_LOG_RESPONSE: u8 = 23;
const T_PING: u8 = 30;
const T_PONG: u8 = 31;

/// Why bytes are not a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes is over the limit of {max}")]
    Oversize { len: usize, max: usize },
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    #[error("frame type {ty} is malformed: {why}")]
    Malformed { ty: u8, why: &'static str },
}

fn put_str(b: &mut BytesMut, s: &str) {
    // Strings are names, uuids, reasons: cut at 65535 bytes on a char
    // boundary rather than fail.
    let mut end = s.len().min(u16::MAX as usize);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    b.put_u16(end as u16);
    b.put_slice(&s.as_bytes()[..end]);
}

impl Frame {
    /// Append the frame, length first, to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        let at = out.len();
        out.put_u32(0);
        match self {
            Frame::Hello {
                version,
                cluster,
                node,
                nonce,
            } => {
                out.put_u8(T_HELLO);
                out.put_u8(*version);
                put_str(out, cluster);
                put_str(out, node);
                out.put_slice(nonce);
            }
            Frame::Proof { mac } => {
                out.put_u8(T_PROOF);
                out.put_slice(mac);
            }
            Frame::Verdict { ok, reason } => {
                out.put_u8(T_VERDICT);
                out.put_u8(u8::from(*ok));
                put_str(out, reason);
            }
            Frame::Open {
                stream,
                uuid,
                mode,
                protocol,
                client,
                window,
            } => {
                out.put_u8(T_OPEN);
                out.put_u32(*stream);
                put_str(out, uuid);
                put_str(out, mode);
                out.put_u8(*protocol as u8);
                put_str(out, client);
                out.put_u32(*window);
            }
            Frame::Accept {
                stream,
                window,
                granted,
            } => {
                out.put_u8(T_ACCEPT);
                out.put_u32(*stream);
                out.put_u32(*window);
                put_str(out, granted);
            }
            Frame::Refuse { stream, reason } => {
                out.put_u8(T_REFUSE);
                out.put_u32(*stream);
                put_str(out, reason);
            }
            Frame::Data { stream, data } => {
                out.put_u8(T_DATA);
                out.put_u32(*stream);
                out.put_slice(data);
            }
            Frame::Credit { stream, bytes } => {
                out.put_u8(T_CREDIT);
                out.put_u32(*stream);
                out.put_u32(*bytes);
            }
            Frame::Shutdown { stream } => {
                out.put_u8(T_SHUTDOWN);
                out.put_u32(*stream);
            }
            Frame::Close { stream, reason } => {
                out.put_u8(T_CLOSE);
                out.put_u32(*stream);
                put_str(out, reason);
            }
            Frame::Handoff {
                id,
                uuid,
                epoch,
                input,
            } => {
                out.put_u8(T_HANDOFF);
                out.put_u32(*id);
                put_str(out, uuid);
                out.put_u64(*epoch);
                out.put_slice(input);
            }
            Frame::HandoffDone {
                id,
                ok,
                reason,
                origin,
                said,
                input,
                recent,
            } => {
                out.put_u8(T_HANDOFF_DONE);
                out.put_u32(*id);
                out.put_u8(u8::from(*ok));
                put_str(out, reason);
                out.put_u64(*origin);
                out.put_u64(*said);
                out.put_u32(input.len() as u32);
                out.put_slice(input);
                out.put_slice(recent);
            }
            Frame::LogRequest { id, uuid, max } => {
                out.put_u8(T_LOG_REQUEST);
                out.put_u32(*id);
                put_str(out, uuid);
                out.put_u32(*max);
            }
            Frame::LogResponse { id, found, data } => {
                out.put_u8(T_LOG_RESPONSE);
                out.put_u32(*id);
                out.put_u8(u8::from(*found));
                out.put_slice(data);
            }
            Frame::Ping { n } => {
                out.put_u8(T_PING);
                out.put_u64(*n);
            }
            Frame::Pong { n } => {
                out.put_u8(T_PONG);
                out.put_u64(*n);
            }
        }
        let len = (out.len() - at - 4) as u32;
        out[at..at + 4].copy_from_slice(&len.to_be_bytes());
    }

    /// Take one frame off the front of `buf`: `Ok(None)` while it is
    /// incomplete. A length over `max` is refused as soon as the length is
    /// read, before the frame is buffered.
    pub fn decode(buf: &mut BytesMut, max: usize) -> Result<Option<Frame>, FrameError> {
        if buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len > max {
            return Err(FrameError::Oversize { len, max });
        }
        if len == 0 {
            return Err(FrameError::Malformed {
                ty: 0,
                why: "empty frame",
            });
        }
        if buf.len() < 4 + len {
            return Ok(None);
        }
        buf.advance(4);
        let body = buf.split_to(len).freeze();
        Self::parse(body).map(Some)
    }

    fn parse(mut b: Bytes) -> Result<Frame, FrameError> {
        let ty = b.get_u8();
        let mut r = Reader { b: &mut b, ty };
        let f = match ty {
            T_HELLO => Frame::Hello {
                version: r.u8()?,
                cluster: r.str()?,
                node: r.str()?,
                nonce: r.array()?,
            },
            T_PROOF => Frame::Proof { mac: r.array()? },
            T_VERDICT => Frame::Verdict {
                ok: r.bool()?,
                reason: r.str()?,
            },
            T_OPEN => Frame::Open {
                stream: r.u32()?,
                uuid: r.str()?,
                mode: r.str()?,
                protocol: Protocol::from_u8(r.u8()?).ok_or(FrameError::Malformed {
                    ty,
                    why: "unknown console protocol",
                })?,
                client: r.str()?,
                window: r.u32()?,
            },
            T_ACCEPT => Frame::Accept {
                stream: r.u32()?,
                window: r.u32()?,
                granted: r.str()?,
            },
            T_REFUSE => Frame::Refuse {
                stream: r.u32()?,
                reason: r.str()?,
            },
            T_DATA => Frame::Data {
                stream: r.u32()?,
                data: r.rest(),
            },
            T_CREDIT => Frame::Credit {
                stream: r.u32()?,
                bytes: r.u32()?,
            },
            T_SHUTDOWN => Frame::Shutdown { stream: r.u32()? },
            T_CLOSE => Frame::Close {
                stream: r.u32()?,
                reason: r.str()?,
            },
            T_HANDOFF => Frame::Handoff {
                id: r.u32()?,
                uuid: r.str()?,
                epoch: r.u64()?,
                input: r.rest(),
            },
            T_HANDOFF_DONE => Frame::HandoffDone {
                id: r.u32()?,
                ok: r.bool()?,
                reason: r.str()?,
                origin: r.u64()?,
                said: r.u64()?,
                input: r.blob()?,
                recent: r.rest(),
            },
            T_LOG_REQUEST => Frame::LogRequest {
                id: r.u32()?,
                uuid: r.str()?,
                max: r.u32()?,
            },
            T_LOG_RESPONSE => Frame::LogResponse {
                id: r.u32()?,
                found: r.bool()?,
                data: r.rest(),
            },
            T_PING => Frame::Ping { n: r.u64()? },
            T_PONG => Frame::Pong { n: r.u64()? },
            other => return Err(FrameError::UnknownType(other)),
        };
        if r.b.has_remaining() {
            return Err(FrameError::Malformed {
                ty,
                why: "bytes left over",
            });
        }
        Ok(f)
    }
}

struct Reader<'a> {
    b: &'a mut Bytes,
    ty: u8,
}

impl Reader<'_> {
    fn need(&self, n: usize) -> Result<(), FrameError> {
        if self.b.remaining() < n {
            Err(FrameError::Malformed {
                ty: self.ty,
                why: "cut short",
            })
        } else {
            Ok(())
        }
    }
    fn u8(&mut self) -> Result<u8, FrameError> {
        self.need(1)?;
        Ok(self.b.get_u8())
    }
    fn bool(&mut self) -> Result<bool, FrameError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(FrameError::Malformed {
                ty: self.ty,
                why: "a flag is neither 0 nor 1",
            }),
        }
    }
    fn u32(&mut self) -> Result<u32, FrameError> {
        self.need(4)?;
        Ok(self.b.get_u32())
    }
    fn u64(&mut self) -> Result<u64, FrameError> {
        self.need(8)?;
        Ok(self.b.get_u64())
    }
    fn array(&mut self) -> Result<[u8; NONCE_LEN], FrameError> {
        self.need(NONCE_LEN)?;
        let mut a = [0u8; NONCE_LEN];
        self.b.copy_to_slice(&mut a);
        Ok(a)
    }
    fn str(&mut self) -> Result<String, FrameError> {
        self.need(2)?;
        let n = self.b.get_u16() as usize;
        self.need(n)?;
        let s = self.b.split_to(n);
        String::from_utf8(s.to_vec()).map_err(|_| FrameError::Malformed {
            ty: self.ty,
            why: "a string is not UTF-8",
        })
    }
    fn blob(&mut self) -> Result<Bytes, FrameError> {
        let n = self.u32()? as usize;
        self.need(n)?;
        Ok(self.b.split_to(n))
    }
    fn rest(&mut self) -> Bytes {
        self.b.split_to(self.b.remaining())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_frame() -> Vec<Frame> {
        let all: Bytes = (0..=255u8).collect::<Vec<u8>>().into();
        vec![
            Frame::Hello {
                version: 1,
                cluster: "prod".into(),
                node: "node-ä".into(),
                nonce: [0xff; NONCE_LEN],
            },
            Frame::Proof {
                mac: [7; NONCE_LEN],
            },
            Frame::Verdict {
                ok: false,
                reason: "wrong secret".into(),
            },
            Frame::Open {
                stream: 1,
                uuid: "42 0a".into(),
                mode: "free-for-all-fallback".into(),
                protocol: Protocol::Raw,
                client: "[::1]:5000".into(),
                window: 1 << 18,
            },
            Frame::Accept {
                stream: u32::MAX,
                window: 0,
                granted: "read-only".into(),
            },
            Frame::Refuse {
                stream: 2,
                reason: String::new(),
            },
            Frame::Data {
                stream: 3,
                data: all.clone(),
            },
            Frame::Data {
                stream: 3,
                data: Bytes::new(),
            },
            Frame::Credit {
                stream: 3,
                bytes: 65536,
            },
            Frame::Shutdown { stream: 5 },
            Frame::Close {
                stream: 5,
                reason: "bye".into(),
            },
            Frame::Handoff {
                id: 9,
                uuid: "u".into(),
                epoch: u64::MAX,
                input: all.clone(),
            },
            Frame::HandoffDone {
                id: 9,
                ok: true,
                reason: String::new(),
                origin: u64::MAX,
                said: 1 << 40,
                input: Bytes::from_static(b"\xff\xff typed"),
                recent: all.clone(),
            },
            Frame::LogRequest {
                id: 4,
                uuid: "u".into(),
                max: 1000,
            },
            Frame::LogResponse {
                id: 4,
                found: true,
                data: all,
            },
            Frame::Ping { n: 1 },
            Frame::Pong { n: u64::MAX },
        ]
    }

    #[test]
    fn every_frame_round_trips_one_by_one_and_back_to_back() {
        let mut all = BytesMut::new();
        for f in every_frame() {
            let mut b = BytesMut::new();
            f.encode(&mut b);
            f.encode(&mut all);
            assert_eq!(Frame::decode(&mut b, MAX_FRAME), Ok(Some(f)));
            assert!(b.is_empty());
        }
        for f in every_frame() {
            assert_eq!(Frame::decode(&mut all, MAX_FRAME), Ok(Some(f)));
        }
        assert_eq!(Frame::decode(&mut all, MAX_FRAME), Ok(None));
    }

    #[test]
    fn every_truncation_point_waits_and_then_decodes() {
        for f in every_frame() {
            let mut whole = BytesMut::new();
            f.encode(&mut whole);
            for cut in 0..whole.len() {
                let mut part = BytesMut::from(&whole[..cut]);
                assert_eq!(
                    Frame::decode(&mut part, MAX_FRAME),
                    Ok(None),
                    "{f:?} cut at {cut}"
                );
                assert_eq!(part.len(), cut, "consumed a partial frame");
                part.extend_from_slice(&whole[cut..]);
                assert_eq!(Frame::decode(&mut part, MAX_FRAME), Ok(Some(f.clone())));
            }
        }
    }

    #[test]
    fn a_frame_whose_fields_are_cut_short_inside_its_length_is_malformed() {
        for f in every_frame() {
            let mut whole = BytesMut::new();
            f.encode(&mut whole);
            // Shorten the body while fixing up the length: fields end early.
            for body in 1..whole.len() - 4 {
                let mut b = BytesMut::new();
                b.put_u32(body as u32);
                b.put_slice(&whole[4..4 + body]);
                match Frame::decode(&mut b, MAX_FRAME) {
                    // Trailing byte fields may legally end anywhere.
                    Ok(Some(_)) => {}
                    Err(FrameError::Malformed { .. }) => {}
                    other => panic!("{f:?} body {body}: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn oversize_unknown_and_malformed_frames_are_refused() {
        let mut b = BytesMut::new();
        b.put_u32(MAX_HANDSHAKE_FRAME as u32 + 1);
        assert!(matches!(
            Frame::decode(&mut b, MAX_HANDSHAKE_FRAME),
            Err(FrameError::Oversize { .. })
        ));
        let mut b = BytesMut::new();
        b.put_u32(u32::MAX);
        assert!(matches!(
            Frame::decode(&mut b, MAX_FRAME),
            Err(FrameError::Oversize { .. })
        ));
        let mut b = BytesMut::from(&[0, 0, 0, 1, 99][..]);
        assert_eq!(
            Frame::decode(&mut b, MAX_FRAME),
            Err(FrameError::UnknownType(99))
        );
        let mut b = BytesMut::from(&[0, 0, 0, 0][..]);
        assert!(matches!(
            Frame::decode(&mut b, MAX_FRAME),
            Err(FrameError::Malformed { .. })
        ));
        // Bytes left over after a fixed-size frame.
        let mut b = BytesMut::from(&[0, 0, 0, 10, T_PING, 0, 0, 0, 0, 0, 0, 0, 1, 0][..]);
        assert!(matches!(
            Frame::decode(&mut b, MAX_FRAME),
            Err(FrameError::Malformed { .. })
        ));
        // A string that is not UTF-8.
        let mut b = BytesMut::from(&[0, 0, 0, 8, T_REFUSE, 0, 0, 0, 1, 0, 1, 0xff][..]);
        assert!(matches!(
            Frame::decode(&mut b, MAX_FRAME),
            Err(FrameError::Malformed { .. })
        ));
        // A flag that is not 0 or 1.
        let mut b = BytesMut::from(&[0, 0, 0, 4, T_VERDICT, 2, 0, 0][..]);
        assert!(matches!(
            Frame::decode(&mut b, MAX_FRAME),
            Err(FrameError::Malformed { .. })
        ));
    }
}
