//! Telnet decoder: arbitrary bytes, fed whole and split in two at a point
//! taken from the input's first bytes, must give the same events; no panic,
//! no subnegotiation payload above the limit, never more data out than in.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vspc_codec::wire::OwnedEvent as Ev;
use vspc_codec::wire::{DecodeError, Decoder, Event};

/// Decode `parts` in order (stopping at the first error), with adjacent
/// data runs merged; checks the per-event invariants on the way.
fn run(limit: usize, parts: &[&[u8]]) -> (Vec<Ev>, Option<DecodeError>, usize) {
    let mut d = Decoder::new(limit);
    let mut out: Vec<Ev> = Vec::new();
    let mut data_out = 0usize;
    for part in parts {
        let r = d.decode(part, |e| {
            match &e {
                Event::Data(b) => {
                    assert!(!b.is_empty(), "empty data event");
                    data_out += b.len();
                }
                Event::Subneg { payload, .. } => {
                    assert!(payload.len() <= limit, "payload over the limit");
                }
                _ => {}
            }
            Ev::push_merged(&mut out, e)
        });
        if let Err(e) = r {
            return (out, Some(e), data_out);
        }
    }
    (out, None, data_out)
}

fuzz_target!(|input: &[u8]| {
    if input.len() < 3 {
        return;
    }
    // Byte 0: subnegotiation limit (small, so the cap is reached often);
    // bytes 1-2: the split point.
    let limit = usize::from(input[0]);
    let cut = usize::from(u16::from_le_bytes([input[1], input[2]]));
    let data = &input[3..];
    let cut = cut % (data.len() + 1);
    let (a, b) = data.split_at(cut);

    let whole = run(limit, &[data]);
    let split = run(limit, &[a, b]);
    assert!(whole.2 <= data.len(), "more data out than in");
    assert_eq!(whole, split, "split at {cut} changed the events");
    if data.len() <= 64 {
        let bytes: Vec<&[u8]> = data.chunks(1).collect();
        assert_eq!(whole, run(limit, &bytes), "byte-by-byte changed the events");
    }
});
