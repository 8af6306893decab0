//! `words::shell_words` (the native admin protocol's line splitter): never
//! panics, and its words, re-quoted, split back to the same words.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vspc_codec::words::{shell_quote, shell_words};

fuzz_target!(|line: &str| {
    let words = shell_words(line);
    let requoted: Vec<String> = words.iter().map(|w| shell_quote(w)).collect();
    assert_eq!(shell_words(&requoted.join(" ")), words);
});
