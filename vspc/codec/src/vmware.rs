//! VMware's telnet extension (option 232) as a typed message enum.
//!
//! Every message is `IAC SB 232 <code> <payload> IAC SE`; the telnet layer
//! has already removed the framing and the IAC escaping by the time
//! [`Msg::decode`] sees the payload. Encoding writes the full frame with the
//! payload escaped, which is what keeps a sequence or secret holding 0xFF
//! intact (vSPC.py issue #22).

use crate::wire::{encode, opt::VMWARE_EXT};

/// Suboption codes (`vspc/PROTOCOL.md` §3).
pub mod code {
    pub const KNOWN_SUBOPTIONS_1: u8 = 0x00;
    pub const KNOWN_SUBOPTIONS_2: u8 = 0x01;
    pub const UNKNOWN_SUBOPTION_RCVD_1: u8 = 0x02;
    pub const UNKNOWN_SUBOPTION_RCVD_2: u8 = 0x03;
    pub const VMOTION_BEGIN: u8 = 0x28;
    pub const VMOTION_GOAHEAD: u8 = 0x29;
    pub const VMOTION_NOTNOW: u8 = 0x2B;
    pub const VMOTION_PEER: u8 = 0x2C;
    pub const VMOTION_PEER_OK: u8 = 0x2D;
    pub const VMOTION_COMPLETE: u8 = 0x2E;
    pub const VMOTION_ABORT: u8 = 0x30;
    pub const DO_PROXY: u8 = 0x46;
    pub const WILL_PROXY: u8 = 0x47;
    pub const WONT_PROXY: u8 = 0x49;
    pub const VM_VC_UUID: u8 = 0x50;
    pub const GET_VM_VC_UUID: u8 = 0x51;
    pub const VM_NAME: u8 = 0x52;
    pub const GET_VM_NAME: u8 = 0x53;
    pub const VM_BIOS_UUID: u8 = 0x54;
    pub const GET_VM_BIOS_UUID: u8 = 0x55;
    pub const VM_LOCATION_UUID: u8 = 0x56;
    pub const GET_VM_LOCATION_UUID: u8 = 0x57;
}

/// The codes this proxy supports, sent in KNOWN-SUBOPTIONS-2: byte for byte
/// the list the capture shows ESXi accepting.
pub const PROXY_KNOWN_SUBOPTIONS: &[u8] = &[
    0x00, 0x01, 0x02, 0x03, 0x28, 0x29, 0x2b, 0x2c, 0x2d, 0x2e, 0x30, 0x46, 0x47, 0x49, 0x50, 0x51,
    0x52, 0x53,
];

/// One VMware extension message. Byte payloads borrow from the decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Msg<'a> {
    KnownSuboptions1(&'a [u8]),
    KnownSuboptions2(&'a [u8]),
    UnknownSuboptionRcvd1(u8),
    UnknownSuboptionRcvd2(u8),
    VmotionBegin(&'a [u8]),
    /// sequence ‖ secret
    VmotionGoahead(&'a [u8]),
    VmotionNotNow(&'a [u8]),
    /// sequence ‖ secret, as given in GOAHEAD
    VmotionPeer(&'a [u8]),
    VmotionPeerOk(&'a [u8]),
    VmotionComplete(&'a [u8]),
    VmotionAbort,
    DoProxy {
        direction: u8,
        uri: &'a [u8],
    },
    WillProxy,
    WontProxy,
    VmVcUuid(&'a [u8]),
    GetVmVcUuid,
    VmName(&'a [u8]),
    GetVmName,
    VmBiosUuid(&'a [u8]),
    GetVmBiosUuid,
    VmLocationUuid(&'a [u8]),
    GetVmLocationUuid,
    /// A code this implementation does not know.
    Unknown {
        code: u8,
        payload: &'a [u8],
    },
}

/// A VMware suboption that cannot be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MsgError {
    #[error("VMware extension subnegotiation without a suboption code")]
    Empty,
    #[error("VMware suboption 0x{code:02x} needs a payload and had none")]
    MissingPayload { code: u8 },
}

impl<'a> Msg<'a> {
    /// Decode a subnegotiation payload for option 232 (code byte first).
    pub fn decode(payload: &'a [u8]) -> Result<Msg<'a>, MsgError> {
        use code::*;
        let (&c, p) = payload.split_first().ok_or(MsgError::Empty)?;
        let first = || {
            p.first()
                .copied()
                .ok_or(MsgError::MissingPayload { code: c })
        };
        Ok(match c {
            KNOWN_SUBOPTIONS_1 => Msg::KnownSuboptions1(p),
            KNOWN_SUBOPTIONS_2 => Msg::KnownSuboptions2(p),
            UNKNOWN_SUBOPTION_RCVD_1 => Msg::UnknownSuboptionRcvd1(first()?),
            UNKNOWN_SUBOPTION_RCVD_2 => Msg::UnknownSuboptionRcvd2(first()?),
            VMOTION_BEGIN => Msg::VmotionBegin(p),
            VMOTION_GOAHEAD => Msg::VmotionGoahead(p),
            VMOTION_NOTNOW => Msg::VmotionNotNow(p),
            VMOTION_PEER => Msg::VmotionPeer(p),
            VMOTION_PEER_OK => Msg::VmotionPeerOk(p),
            VMOTION_COMPLETE => Msg::VmotionComplete(p),
            VMOTION_ABORT => Msg::VmotionAbort,
            DO_PROXY => Msg::DoProxy {
                direction: first()?,
                uri: &p[1..],
            },
            WILL_PROXY => Msg::WillProxy,
            WONT_PROXY => Msg::WontProxy,
            VM_VC_UUID => Msg::VmVcUuid(p),
            GET_VM_VC_UUID => Msg::GetVmVcUuid,
            VM_NAME => Msg::VmName(p),
            GET_VM_NAME => Msg::GetVmName,
            VM_BIOS_UUID => Msg::VmBiosUuid(p),
            GET_VM_BIOS_UUID => Msg::GetVmBiosUuid,
            VM_LOCATION_UUID => Msg::VmLocationUuid(p),
            GET_VM_LOCATION_UUID => Msg::GetVmLocationUuid,
            code => Msg::Unknown { code, payload: p },
        })
    }

    /// The suboption code.
    pub fn code(&self) -> u8 {
        use code::*;
        match self {
            Msg::KnownSuboptions1(_) => KNOWN_SUBOPTIONS_1,
            Msg::KnownSuboptions2(_) => KNOWN_SUBOPTIONS_2,
            Msg::UnknownSuboptionRcvd1(_) => UNKNOWN_SUBOPTION_RCVD_1,
            Msg::UnknownSuboptionRcvd2(_) => UNKNOWN_SUBOPTION_RCVD_2,
            Msg::VmotionBegin(_) => VMOTION_BEGIN,
            Msg::VmotionGoahead(_) => VMOTION_GOAHEAD,
            Msg::VmotionNotNow(_) => VMOTION_NOTNOW,
            Msg::VmotionPeer(_) => VMOTION_PEER,
            Msg::VmotionPeerOk(_) => VMOTION_PEER_OK,
            Msg::VmotionComplete(_) => VMOTION_COMPLETE,
            Msg::VmotionAbort => VMOTION_ABORT,
            Msg::DoProxy { .. } => DO_PROXY,
            Msg::WillProxy => WILL_PROXY,
            Msg::WontProxy => WONT_PROXY,
            Msg::VmVcUuid(_) => VM_VC_UUID,
            Msg::GetVmVcUuid => GET_VM_VC_UUID,
            Msg::VmName(_) => VM_NAME,
            Msg::GetVmName => GET_VM_NAME,
            Msg::VmBiosUuid(_) => VM_BIOS_UUID,
            Msg::GetVmBiosUuid => GET_VM_BIOS_UUID,
            Msg::VmLocationUuid(_) => VM_LOCATION_UUID,
            Msg::GetVmLocationUuid => GET_VM_LOCATION_UUID,
            Msg::Unknown { code, .. } => *code,
        }
    }

    /// Append the whole frame, `IAC SB 232 code payload IAC SE`, escaped.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let one;
        let mut proxy = Vec::new();
        let payload: &[u8] = match *self {
            Msg::KnownSuboptions1(p)
            | Msg::KnownSuboptions2(p)
            | Msg::VmotionBegin(p)
            | Msg::VmotionGoahead(p)
            | Msg::VmotionNotNow(p)
            | Msg::VmotionPeer(p)
            | Msg::VmotionPeerOk(p)
            | Msg::VmotionComplete(p)
            | Msg::VmVcUuid(p)
            | Msg::VmName(p)
            | Msg::VmBiosUuid(p)
            | Msg::VmLocationUuid(p)
            | Msg::Unknown { payload: p, .. } => p,
            Msg::UnknownSuboptionRcvd1(c) | Msg::UnknownSuboptionRcvd2(c) => {
                one = [c];
                &one
            }
            Msg::DoProxy { direction, uri } => {
                proxy.push(direction);
                proxy.extend_from_slice(uri);
                &proxy
            }
            Msg::VmotionAbort
            | Msg::WillProxy
            | Msg::WontProxy
            | Msg::GetVmVcUuid
            | Msg::GetVmName
            | Msg::GetVmBiosUuid
            | Msg::GetVmLocationUuid => &[],
        };
        let mut body = Vec::with_capacity(payload.len() + 1);
        body.push(self.code());
        body.extend_from_slice(payload);
        encode::subneg(VMWARE_EXT, &body, out);
    }

    /// The encoded frame in a new buffer.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }
}

/// A VM's VC UUID, parsed from the text ESXi sends in VM-VC-UUID
/// (`01 23 45 67 89 ab cd ef-fe dc ba 98 00 00 00 00`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VmUuid {
    /// 32 lowercase hex digits: the key lookups compare.
    pub hex: String,
    /// vSPC.py's display form: spaces removed, `-` kept
    /// (`0123456789abcdef-fedcba9800000000`), which admin tools expect.
    pub display: String,
}

impl VmUuid {
    /// Parse ESXi's text. Strict form: 16 hex pairs, `-` after the 8th.
    /// Other text with exactly 32 hex digits (any separators) is accepted
    /// too; anything else is `None`.
    pub fn parse(text: &[u8]) -> Option<VmUuid> {
        let s = std::str::from_utf8(text).ok()?.trim();
        let hex: String = s
            .chars()
            .filter(|c| !matches!(c, ' ' | '-'))
            .map(|c| c.to_ascii_lowercase())
            .collect();
        if hex.len() != 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        let display = format!("{}-{}", &hex[..16], &hex[16..]);
        Some(VmUuid { hex, display })
    }

    /// Normalise something a user typed (any case, spaces, dashes) to the
    /// 32-hex key, if it is a UUID at all.
    pub fn key_of(text: &str) -> Option<String> {
        VmUuid::parse(text.as_bytes()).map(|u| u.hex)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_and_encode_round_trip() {
        let cases: Vec<Msg> = vec![
            Msg::KnownSuboptions2(PROXY_KNOWN_SUBOPTIONS),
            Msg::VmotionBegin(&[0x76, 0x19, 0xff, 0xe9]),
            Msg::VmotionGoahead(&[0x76, 0x19, 0xff, 0xe9, 0x55, 0x21, 0x99, 0x8c]),
            Msg::VmotionAbort,
            Msg::DoProxy {
                direction: b'S',
                uri: b"vSPC.py",
            },
            Msg::UnknownSuboptionRcvd2(0x99),
            Msg::GetVmName,
            Msg::Unknown {
                code: 0x99,
                payload: b"zz",
            },
        ];
        for m in cases {
            let bytes = m.to_bytes();
            let mut dec = crate::wire::Decoder::default();
            let mut seen = 0;
            dec.decode(&bytes, |e| match e {
                crate::wire::Event::Subneg { option, payload } => {
                    assert_eq!(option, VMWARE_EXT);
                    assert_eq!(Msg::decode(payload).unwrap(), m);
                    seen += 1;
                }
                other => panic!("unexpected {other:?}"),
            })
            .unwrap();
            assert_eq!(seen, 1);
        }
    }

    #[test]
    fn capture_bytes() {
        // tests/captures/stream2.txt: GOAHEAD with 0xFF in the sequence, escaped on the wire.
        assert_eq!(
            Msg::VmotionGoahead(&[0x76, 0x19, 0xff, 0xe9, 0x55, 0x21, 0x99, 0x8c]).to_bytes(),
            b"\xff\xfa\xe8\x29\x76\x19\xff\xff\xe9\x55\x21\x99\x8c\xff\xf0"
        );
        assert_eq!(Msg::WillProxy.to_bytes(), b"\xff\xfa\xe8\x47\xff\xf0");
        assert_eq!(Msg::decode(&[0x30]).unwrap(), Msg::VmotionAbort);
        assert_eq!(Msg::decode(&[]), Err(MsgError::Empty));
        assert_eq!(
            Msg::decode(&[0x46]),
            Err(MsgError::MissingPayload { code: 0x46 })
        );
    }

    #[test]
    fn uuid_forms() {
        let u = VmUuid::parse(b"01 23 45 67 89 ab cd ef-fe dc ba 98 00 00 00 00").unwrap();
        assert_eq!(u.hex, "0123456789abcdeffedcba9800000000");
        assert_eq!(u.display, "0123456789abcdef-fedcba9800000000");
        assert_eq!(
            VmUuid::key_of("0123456789ABCDEF-FEDCBA9800000000").as_deref(),
            Some("0123456789abcdeffedcba9800000000")
        );
        assert_eq!(VmUuid::parse(b"not a uuid"), None);
        assert_eq!(VmUuid::parse(b"01 23"), None);
    }
}
