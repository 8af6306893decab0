//! Writing telnet: data with IAC doubled, negotiation and subnegotiation
//! commands. Every function appends to a caller-owned buffer.

use super::{Verb, IAC, SB, SE};

/// Append `data` to `out` with every IAC doubled.
pub fn data(data: &[u8], out: &mut Vec<u8>) {
    out.reserve(data.len());
    let mut rest = data;
    while let Some(pos) = memchr::memchr(IAC, rest) {
        out.extend_from_slice(&rest[..=pos]);
        out.push(IAC);
        rest = &rest[pos + 1..];
    }
    out.extend_from_slice(rest);
}

/// `data` escaped into a new buffer.
pub fn escaped(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() + 8);
    data(bytes, &mut out);
    out
}

/// Append `IAC verb option`.
pub fn negotiate(verb: Verb, option: u8, out: &mut Vec<u8>) {
    out.extend_from_slice(&[IAC, verb.byte(), option]);
}

/// Append `IAC SB option payload IAC SE`, with IAC in the payload doubled.
pub fn subneg(option: u8, payload: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&[IAC, SB]);
    data(&[option], out);
    data(payload, out);
    out.extend_from_slice(&[IAC, SE]);
}

/// Append `data` as NVT text (for a peer that refused BINARY): IAC
/// doubled, and a CR not followed by LF sent as CR NUL. `cr_pending`
/// carries "the last byte out was a CR" across calls; the NUL for a CR at
/// the very end of one call is added when the next byte is known.
pub fn nvt_data(data: &[u8], cr_pending: &mut bool, out: &mut Vec<u8>) {
    out.reserve(data.len() + data.len() / 32);
    for &b in data {
        if *cr_pending && b != b'\n' {
            out.push(0);
        }
        *cr_pending = b == b'\r';
        out.push(b);
        if b == IAC {
            out.push(IAC);
        }
    }
}

/// Undo NVT encoding of received data: `CR NUL` and `CR LF` (what a telnet
/// client without BINARY sends for Enter) both become a bare `CR`, which is
/// what a terminal's Enter key gives a getty or shell. `after_cr` carries
/// "the last byte seen was a CR" across calls.
pub fn nvt_receive(bytes: &[u8], after_cr: &mut bool, out: &mut Vec<u8>) {
    for &b in bytes {
        let drop = *after_cr && (b == 0 || b == b'\n');
        *after_cr = b == b'\r';
        if !drop {
            out.push(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_doubles_iac_only() {
        assert_eq!(escaped(b"a\xffb\xff\xff"), b"a\xff\xffb\xff\xff\xff\xff");
        assert_eq!(escaped(b"\x00\r\n"), b"\x00\r\n");
    }

    #[test]
    fn subneg_escapes_payload() {
        let mut out = Vec::new();
        subneg(0xe8, &[0x29, 0x76, 0x19, 0xff, 0xe9], &mut out);
        assert_eq!(out, b"\xff\xfa\xe8\x29\x76\x19\xff\xff\xe9\xff\xf0");
    }

    #[test]
    fn nvt_rules() {
        let mut cr = false;
        let mut out = Vec::new();
        // What a console writer does for a peer without BINARY; the CR rule
        // holds across calls.
        nvt_data(b"a\r", &mut cr, &mut out);
        nvt_data(b"\nb\rc\xff\r", &mut cr, &mut out);
        nvt_data(b"\r", &mut cr, &mut out);
        assert_eq!(out, b"a\r\nb\r\x00c\xff\xff\r\x00\r");
        let mut after = false;
        let mut back = Vec::new();
        nvt_receive(b"x\r", &mut after, &mut back);
        nvt_receive(b"\x00y\r\n\x00z\r", &mut after, &mut back);
        nvt_receive(b"\n\n", &mut after, &mut back);
        // CR NUL and CR LF are both Enter: a bare CR; a lone LF or NUL
        // passes.
        assert_eq!(back, b"x\ry\r\x00z\r\n");
    }
}
