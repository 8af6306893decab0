//! Safe pickle reader: arbitrary bytes through `pickle::decode` and through
//! the incremental `pickle::Decoder` fed every prefix must agree; no panic;
//! memory is bounded by libFuzzer's `-rss_limit_mb`/`-malloc_limit_mb`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vspc_codec::pickle::{self, PickleError, Value};

type Outcome = Result<Option<(Value, usize)>, PickleError>;

/// Values may hold NaN, so compare by their Debug form.
fn show(r: &Outcome) -> String {
    format!("{r:?}")
}

fuzz_target!(|input: &[u8]| {
    let Some((&sel, data)) = input.split_first() else {
        return;
    };
    // Small limits make TooLarge reachable; 0 is a legal (useless) limit.
    let max_len = match sel % 4 {
        0 => usize::from(sel),
        1 => 4096,
        2 => 64 * 1024,
        _ => usize::MAX,
    };

    let whole = pickle::decode(data, max_len);
    if let Ok(Some((_, used))) = &whole {
        assert!(*used >= 1 && *used <= data.len() && *used <= max_len);
    }

    // Incremental, one more byte each call (the contract: same bytes again
    // plus more), until it answers something other than "need more".
    let mut inc = pickle::Decoder::new(max_len);
    let mut last: Outcome = Ok(None);
    for k in 0..=data.len() {
        last = inc.decode(&data[..k]);
        if !matches!(last, Ok(None)) {
            // The first answer must be what decode gives on that prefix,
            // and a prefix's final answer is also the whole buffer's.
            assert_eq!(show(&last), show(&pickle::decode(&data[..k], max_len)));
            break;
        }
    }
    assert_eq!(show(&last), show(&whole), "incremental != whole");

    // Split in two at a point from the data: also the same.
    if !data.is_empty() {
        let cut = usize::from(data[data.len() - 1]) % (data.len() + 1);
        let mut two = pickle::Decoder::new(max_len);
        let first = two.decode(&data[..cut]);
        let r = if matches!(first, Ok(None)) {
            two.decode(data)
        } else {
            first
        };
        assert_eq!(show(&r), show(&whole), "split at {cut}");
    }

    // Whatever decodes re-encodes to a pickle that decodes to the same value.
    if let Ok(Some((v, _))) = whole {
        match pickle::decode(&pickle::encode(&v), usize::MAX) {
            Ok(Some((again, _))) => {
                assert_eq!(format!("{again:?}"), format!("{:?}", v.read_back()));
            }
            // Memo sharing can make a value whose unshared form is bigger.
            Err(PickleError::TooComplex(_)) => {}
            other => panic!("re-encoded {v:?} decoded to {other:?}"),
        }
    }
});
