//! Property tests for the byte-level codecs: the telnet layer (`wire`), the
//! VMware extension messages (`vmware::Msg`), the admin port's pickle reader
//! and writer (`admin::pickle`) and the native protocol's line splitter
//! (`words::shell_words`).
//!
//! Every stream property feeds the decoder in pieces cut at proptest-chosen
//! points, because a real socket may split anything anywhere. Case counts are
//! capped (`CASES`) so CI stays fast; `PROPTEST_CASES` can raise them locally.

use proptest::prelude::*;
use proptest::sample::Index;
use vspc_codec::pickle::{self, PickleError, Value};
use vspc_codec::vmware::{code, Msg};
use vspc_codec::wire::OwnedEvent as Ev;
use vspc_codec::wire::{encode, opt, DecodeError, Decoder, Event, Verb, IAC, SE};
use vspc_codec::words::{shell_quote, shell_words};

const CASES: u32 = 256;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: CASES,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// `bytes` cut at the given points (any number, any order, duplicates ok).
fn split<'a>(bytes: &'a [u8], cuts: &[Index]) -> Vec<&'a [u8]> {
    let mut at: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
    at.sort_unstable();
    let mut parts = Vec::with_capacity(at.len() + 1);
    let mut start = 0;
    for cut in at {
        parts.push(&bytes[start..cut]);
        start = cut;
    }
    parts.push(&bytes[start..]);
    parts
}

/// Decode `parts` in order with one decoder, merging adjacent data runs.
fn decode_parts(limit: usize, parts: &[&[u8]]) -> Result<Vec<Ev>, DecodeError> {
    let mut d = Decoder::new(limit);
    let mut out: Vec<Ev> = Vec::new();
    for part in parts {
        d.decode(part, |e| {
            if let Event::Data(b) = &e {
                assert!(!b.is_empty(), "decoder emitted an empty data run");
            }
            Ev::push_merged(&mut out, e)
        })?;
    }
    assert!(d.is_idle(), "decoder left mid-command after a whole stream");
    Ok(out)
}

/// Adjacent data events merged, empty ones dropped.
fn merge_data(events: Vec<Ev>) -> Vec<Ev> {
    let mut out: Vec<Ev> = Vec::new();
    for e in events {
        match (out.last_mut(), e) {
            (_, Ev::Data(d)) if d.is_empty() => {}
            (Some(Ev::Data(prev)), Ev::Data(d)) => prev.extend_from_slice(&d),
            (_, e) => out.push(e),
        }
    }
    out
}

fn cuts() -> impl Strategy<Value = Vec<Index>> {
    prop::collection::vec(any::<Index>(), 0..8)
}

fn verb() -> impl Strategy<Value = Verb> {
    prop_oneof![
        Just(Verb::Will),
        Just(Verb::Wont),
        Just(Verb::Do),
        Just(Verb::Dont)
    ]
}

/// Bytes with 0xFF (and the other command bytes) over-represented.
fn telnet_bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop_oneof![
            3 => any::<u8>(),
            1 => Just(IAC),
            1 => 0xF0u8..=0xFE,
        ],
        0..max,
    )
}

// ---------------------------------------------------------------------------
// (a) data round trip, (b) mixed event streams
// ---------------------------------------------------------------------------

/// Two-byte commands that are neither negotiation, SB, SE nor IAC.
fn plain_command() -> impl Strategy<Value = u8> {
    prop_oneof![0u8..SE, 0xF1u8..=0xF9]
}

fn event() -> impl Strategy<Value = Ev> {
    prop_oneof![
        3 => telnet_bytes(40).prop_map(Ev::Data),
        1 => (verb(), any::<u8>()).prop_map(|(v, o)| Ev::Negotiate(v, o)),
        2 => (any::<u8>(), telnet_bytes(40)).prop_map(|(o, p)| Ev::Subneg(o, p)),
        1 => plain_command().prop_map(Ev::Command),
    ]
}

fn encode_events(events: &[Ev]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in events {
        match e {
            Ev::Data(d) => encode::data(d, &mut out),
            Ev::Negotiate(v, o) => encode::negotiate(*v, *o, &mut out),
            Ev::Subneg(o, p) => encode::subneg(*o, p, &mut out),
            Ev::Command(c) => out.extend_from_slice(&[IAC, *c]),
            Ev::Malformed(_) => unreachable!("never generated"),
        }
    }
    out
}

proptest! {
    #![proptest_config(config())]

    /// (a) Escaped data decodes to exactly the data, however it is split.
    #[test]
    fn data_round_trips(data in telnet_bytes(512), cuts in cuts()) {
        let wire = encode::escaped(&data);
        let mut appended = Vec::new();
        encode::data(&data, &mut appended);
        prop_assert_eq!(&wire, &appended);
        let events = decode_parts(64, &split(&wire, &cuts)).unwrap();
        prop_assert_eq!(events, merge_data(vec![Ev::Data(data)]));
    }

    /// (b) Data, negotiations, commands and subnegotiations (any option, any
    /// payload, 0xFF included) come back as the same events.
    #[test]
    fn event_streams_round_trip(
        events in prop::collection::vec(event(), 0..12),
        cuts in cuts(),
    ) {
        let wire = encode_events(&events);
        let decoded = decode_parts(64, &split(&wire, &cuts)).unwrap();
        prop_assert_eq!(decoded, merge_data(events));
    }

    /// Arbitrary bytes: same events whole, split and byte by byte; no
    /// subnegotiation payload above the limit; never more data than input.
    #[test]
    fn arbitrary_input_is_split_invariant(
        input in telnet_bytes(200),
        cuts in cuts(),
        limit in 0usize..48,
    ) {
        let whole = decode_prefix(limit, &[&input]);
        prop_assert_eq!(&whole, &decode_prefix(limit, &split(&input, &cuts)));
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        prop_assert_eq!(&whole, &decode_prefix(limit, &bytes));
        let data: usize = whole.0.iter().map(|e| match e {
            Ev::Data(d) => d.len(),
            _ => 0,
        }).sum();
        prop_assert!(data <= input.len());
        for e in &whole.0 {
            if let Ev::Subneg(_, p) = e {
                prop_assert!(p.len() <= limit);
            }
        }
    }
}

/// Like [`decode_parts`] but stopping at the first error and returning the
/// events before it, and without the idle check (input may end anywhere).
fn decode_prefix(limit: usize, parts: &[&[u8]]) -> (Vec<Ev>, Option<DecodeError>) {
    let mut d = Decoder::new(limit);
    let mut out: Vec<Ev> = Vec::new();
    for part in parts {
        let r = d.decode(part, |e| Ev::push_merged(&mut out, e));
        if let Err(e) = r {
            return (merge_data(out), Some(e));
        }
    }
    (merge_data(out), None)
}

#[test]
fn subneg_limit_is_exact_for_escaped_payloads() {
    // 0xFF counts once (unescaped) against the limit.
    let payload = [IAC; 8];
    let mut wire = Vec::new();
    encode::subneg(opt::VMWARE_EXT, &payload, &mut wire);
    assert_eq!(
        decode_parts(8, &[&wire]),
        Ok(vec![Ev::Subneg(opt::VMWARE_EXT, payload.to_vec())])
    );
    assert_eq!(
        decode_parts(7, &[&wire]),
        Err(DecodeError::SubnegTooLong {
            option: opt::VMWARE_EXT,
            limit: 7
        })
    );
}

// ---------------------------------------------------------------------------
// (c) VMware extension messages
// ---------------------------------------------------------------------------

/// Owned description of one message: variant number, payload, byte.
#[derive(Debug, Clone)]
struct MsgSpec {
    variant: u8,
    payload: Vec<u8>,
    byte: u8,
}

const VARIANTS: u8 = 23;

fn msg_spec() -> impl Strategy<Value = MsgSpec> {
    (0..VARIANTS, telnet_bytes(48), any::<u8>()).prop_map(|(variant, payload, byte)| MsgSpec {
        variant,
        payload,
        byte,
    })
}

/// The message a spec describes; `None` for an `Unknown` whose code is known.
fn msg(s: &MsgSpec) -> Option<Msg<'_>> {
    let p = s.payload.as_slice();
    Some(match s.variant {
        0 => Msg::KnownSuboptions1(p),
        1 => Msg::KnownSuboptions2(p),
        2 => Msg::UnknownSuboptionRcvd1(s.byte),
        3 => Msg::UnknownSuboptionRcvd2(s.byte),
        4 => Msg::VmotionBegin(p),
        5 => Msg::VmotionGoahead(p),
        6 => Msg::VmotionNotNow(p),
        7 => Msg::VmotionPeer(p),
        8 => Msg::VmotionPeerOk(p),
        9 => Msg::VmotionComplete(p),
        10 => Msg::VmotionAbort,
        11 => Msg::DoProxy {
            direction: s.byte,
            uri: p,
        },
        12 => Msg::WillProxy,
        13 => Msg::WontProxy,
        14 => Msg::VmVcUuid(p),
        15 => Msg::GetVmVcUuid,
        16 => Msg::VmName(p),
        17 => Msg::GetVmName,
        18 => Msg::VmBiosUuid(p),
        19 => Msg::GetVmBiosUuid,
        20 => Msg::VmLocationUuid(p),
        21 => Msg::GetVmLocationUuid,
        _ => {
            let m = Msg::Unknown {
                code: s.byte,
                payload: p,
            };
            return matches!(Msg::decode(&[s.byte]), Ok(Msg::Unknown { .. })).then_some(m);
        }
    })
}

/// Variant number of a message: an exhaustive match, so a new variant fails
/// to compile here until [`msg`] generates it too.
fn variant(m: &Msg) -> u8 {
    match m {
        Msg::KnownSuboptions1(_) => 0,
        Msg::KnownSuboptions2(_) => 1,
        Msg::UnknownSuboptionRcvd1(_) => 2,
        Msg::UnknownSuboptionRcvd2(_) => 3,
        Msg::VmotionBegin(_) => 4,
        Msg::VmotionGoahead(_) => 5,
        Msg::VmotionNotNow(_) => 6,
        Msg::VmotionPeer(_) => 7,
        Msg::VmotionPeerOk(_) => 8,
        Msg::VmotionComplete(_) => 9,
        Msg::VmotionAbort => 10,
        Msg::DoProxy { .. } => 11,
        Msg::WillProxy => 12,
        Msg::WontProxy => 13,
        Msg::VmVcUuid(_) => 14,
        Msg::GetVmVcUuid => 15,
        Msg::VmName(_) => 16,
        Msg::GetVmName => 17,
        Msg::VmBiosUuid(_) => 18,
        Msg::GetVmBiosUuid => 19,
        Msg::VmLocationUuid(_) => 20,
        Msg::GetVmLocationUuid => 21,
        Msg::Unknown { .. } => 22,
    }
}

proptest! {
    #![proptest_config(config())]

    /// (c) Every variant, payloads holding 0xFF included, survives
    /// `Msg::encode` -> telnet decoder (any splits) -> `Msg::decode`, also
    /// several messages back to back with data between them.
    #[test]
    fn vmware_messages_round_trip(
        specs in prop::collection::vec(msg_spec(), 1..5),
        data in telnet_bytes(16),
        cuts in cuts(),
    ) {
        let msgs: Vec<Msg> = specs.iter().filter_map(msg).collect();
        let mut wire = Vec::new();
        for m in &msgs {
            m.encode(&mut wire);
            encode::data(&data, &mut wire);
        }
        let events = decode_parts(64 * 1024, &split(&wire, &cuts)).unwrap();
        let frames: Vec<&Vec<u8>> = events
            .iter()
            .filter_map(|e| match e {
                Ev::Subneg(o, p) if *o == opt::VMWARE_EXT => Some(p),
                Ev::Data(_) => None,
                other => panic!("unexpected event {other:?}"),
            })
            .collect();
        prop_assert_eq!(frames.len(), msgs.len());
        for (m, p) in msgs.iter().zip(frames) {
            prop_assert_eq!(Msg::decode(p), Ok(*m));
            prop_assert_eq!(p[0], m.code());
        }
    }

    /// Decoding any payload never panics, and what decodes re-encodes to
    /// the same message.
    #[test]
    fn vmware_decode_any_payload(payload in telnet_bytes(40)) {
        if let Ok(m) = Msg::decode(&payload) {
            prop_assert_eq!(m.code(), payload[0]);
            let wire = m.to_bytes();
            let events = decode_parts(64 * 1024, &[&wire]).unwrap();
            prop_assert_eq!(events.len(), 1);
            match &events[0] {
                Ev::Subneg(o, p) => {
                    prop_assert_eq!(*o, opt::VMWARE_EXT);
                    prop_assert_eq!(Msg::decode(p), Ok(m));
                }
                other => prop_assert!(false, "unexpected {:?}", other),
            }
        }
    }
}

#[test]
fn every_vmware_variant_is_generated() {
    let mut seen = [false; VARIANTS as usize];
    for variant_no in 0..VARIANTS {
        let s = MsgSpec {
            variant: variant_no,
            payload: vec![IAC, 1],
            byte: 0x99,
        };
        let m = msg(&s).expect("0x99 is not a known code");
        seen[usize::from(variant(&m))] = true;
    }
    assert!(seen.iter().all(|&s| s));
    assert!(msg(&MsgSpec {
        variant: 22,
        payload: vec![],
        byte: code::VMOTION_BEGIN,
    })
    .is_none());
}

// ---------------------------------------------------------------------------
// (d) pickle
// ---------------------------------------------------------------------------

fn plain_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::None),
        any::<bool>().prop_map(Value::Bool),
        prop_oneof![
            any::<i64>(),
            -300i64..70_000,
            Just(i64::MIN),
            Just(i64::MAX)
        ]
        .prop_map(Value::Int),
        any::<f64>()
            .prop_filter("NaN never compares equal", |f| !f.is_nan())
            .prop_map(Value::Float),
        any::<String>().prop_map(Value::Str),
        prop::collection::vec(any::<u8>(), 0..300).prop_map(Value::Bytes),
        any::<String>().prop_map(Value::Exception),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::List),
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Tuple),
            prop::collection::vec((inner.clone(), inner), 0..4).prop_map(Value::Dict),
        ]
    })
}

type Outcome = Result<Option<(Value, usize)>, PickleError>;

/// Incremental decoding, one more byte per call, up to the first answer.
fn incremental(bytes: &[u8], max_len: usize) -> Outcome {
    let mut d = pickle::Decoder::new(max_len);
    for k in 0..=bytes.len() {
        let r = d.decode(&bytes[..k]);
        if !matches!(r, Ok(None)) {
            return r;
        }
    }
    Ok(None)
}

/// Compare outcomes by their Debug form (floats may be NaN).
fn same(a: &Outcome, b: &Outcome) -> bool {
    format!("{a:?}") == format!("{b:?}")
}

proptest! {
    #![proptest_config(config())]

    /// (d) encode -> decode gives the value back, using the whole buffer;
    /// every proper prefix is "need more", whole or incremental; trailing
    /// bytes (the next pickle) are left alone.
    #[test]
    fn pickle_round_trips(v in plain_value(), trailing in telnet_bytes(8)) {
        let bytes = pickle::encode(&v);
        let n = bytes.len();
        let expect = Some((v.read_back(), n));
        prop_assert_eq!(pickle::decode(&bytes, n), Ok(expect.clone()));
        prop_assert_eq!(pickle::decode(&bytes, usize::MAX), Ok(expect.clone()));
        prop_assert_eq!(incremental(&bytes, n), Ok(expect.clone()));
        let mut more = bytes.clone();
        more.extend_from_slice(&trailing);
        prop_assert_eq!(pickle::decode(&more, n), Ok(expect.clone()));
        for k in 0..n {
            prop_assert_eq!(pickle::decode(&bytes[..k], n), Ok(None), "prefix {}", k);
        }
        if n > 1 {
            prop_assert_eq!(
                pickle::decode(&bytes, n - 1),
                Err(PickleError::TooLarge { limit: n - 1 })
            );
        }
    }

    /// Arbitrary bytes never panic, and incremental decoding agrees with
    /// decoding the whole buffer.
    #[test]
    fn pickle_arbitrary_bytes(
        bytes in prop::collection::vec(
            prop_oneof![any::<u8>(), prop::sample::select(b"(.0)]}aeltuKJNXU\x80\x02\x85\x94q".to_vec())],
            0..64,
        ),
        max_len in prop_oneof![0usize..80, Just(4096)],
    ) {
        let whole = pickle::decode(&bytes, max_len);
        prop_assert!(same(&incremental(&bytes, max_len), &whole));
        for k in 0..bytes.len() {
            let r = pickle::decode(&bytes[..k], max_len);
            // A prefix's definite answer is also the whole buffer's.
            if !matches!(r, Ok(None)) {
                prop_assert!(same(&r, &whole), "prefix {}: {:?} vs {:?}", k, r, whole);
                break;
            }
        }
    }
}

/// Fuzzing regression (admin_pickle, first run): protocol-3 `SHORT_BINBYTES`
/// holding valid UTF-8 reads as `Bytes`, but the protocol-2 writer emits
/// bytes as a Python 2 `str`, which reads back as `Str`. Expected behaviour
/// (the harness had to learn it), pinned here.
#[test]
fn pickle_bytes_reencode_as_py2_str() {
    let input = b"C\x00.\x00N";
    assert_eq!(
        pickle::decode(input, 4096),
        Ok(Some((Value::Bytes(vec![]), 3)))
    );
    assert_eq!(
        incremental(input, 4096),
        Ok(Some((Value::Bytes(vec![]), 3)))
    );
    let again = pickle::encode(&Value::Bytes(vec![]));
    assert_eq!(
        pickle::decode(&again, 4096),
        Ok(Some((Value::Str(String::new()), again.len())))
    );
    assert_eq!(
        pickle::decode(&pickle::encode(&Value::Bytes(vec![0xff])), 4096)
            .unwrap()
            .unwrap()
            .0,
        Value::Bytes(vec![0xff])
    );
}

// ---------------------------------------------------------------------------
// (e) native protocol: shell_words
// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    /// Never panics; the words it finds, re-quoted, split back the same.
    #[test]
    fn shell_words_requote(line in "[ a-z\"'\\\\\t\u{a0}é]{0,40}") {
        let words = shell_words(&line);
        let requoted: Vec<String> = words.iter().map(|w| shell_quote(w)).collect();
        prop_assert_eq!(shell_words(&requoted.join(" ")), words);
    }

    /// Simple words, quoted or not, come back as they were.
    #[test]
    fn shell_words_simple(words in prop::collection::vec("[a-zA-Z0-9._:-]{1,12}", 0..6)) {
        prop_assert_eq!(shell_words(&words.join("  ")), words.clone());
        let single: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
        prop_assert_eq!(shell_words(&single.join(" ")), words.clone());
        let double: Vec<String> = words.iter().map(|w| shell_quote(w)).collect();
        prop_assert_eq!(shell_words(&double.join("\t")), words);
    }
}
