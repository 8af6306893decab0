//! VMware extension messages: decode an arbitrary subnegotiation payload;
//! whatever decodes must re-encode to a frame that the telnet decoder turns
//! back into one option-232 subnegotiation decoding to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vspc_codec::vmware::Msg;
use vspc_codec::wire::{opt, Decoder, Event};

fuzz_target!(|payload: &[u8]| {
    let Ok(msg) = Msg::decode(payload) else {
        return;
    };
    assert_eq!(msg.code(), payload[0]);
    let frame = msg.to_bytes();
    let mut dec = Decoder::default();
    let mut seen = 0;
    dec.decode(&frame, |e| match e {
        Event::Subneg { option, payload: p } => {
            assert_eq!(option, opt::VMWARE_EXT);
            assert_eq!(Msg::decode(p), Ok(msg));
            seen += 1;
        }
        other => panic!("unexpected event {other:?}"),
    })
    .expect("re-encoded frame must decode");
    assert_eq!(seen, 1);
    assert!(dec.is_idle());
});
