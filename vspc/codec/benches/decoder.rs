//! Telnet decoder and data-escaping throughput.
//!
//! `cargo bench -p vspc --bench decoder`. Inputs are 64 KiB: plain data
//! without IAC (the fast path: one memchr and one callback per read), and
//! the same with an `IAC IAC` pair about every KiB.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use vspc_codec::wire::{encode, Decoder, Event};

const LEN: usize = 64 * 1024;

/// Deterministic pseudo-random bytes with every 0xFF replaced.
fn plain() -> Vec<u8> {
    let mut x: u32 = 0x1234_5678;
    (0..LEN)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            match x as u8 {
                0xff => b'.',
                b => b,
            }
        })
        .collect()
}

/// `plain()` with an `IAC IAC` pair (an escaped 0xFF) every 1 KiB; still
/// 64 KiB long.
fn with_iac() -> Vec<u8> {
    let mut v = plain();
    for at in (1000..LEN - 1).step_by(1024) {
        v[at] = 0xff;
        v[at + 1] = 0xff;
    }
    v
}

/// Unescaped data with one 0xFF every 1 KiB, for the encoder.
fn raw_with_ff() -> Vec<u8> {
    let mut v = plain();
    for at in (1000..LEN).step_by(1024) {
        v[at] = 0xff;
    }
    v
}

fn decode_all(d: &mut Decoder, input: &[u8]) -> usize {
    let mut n = 0;
    d.decode(input, |e| {
        if let Event::Data(b) = e {
            n += b.len();
        }
    })
    .unwrap();
    n
}

fn decoder(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Bytes(LEN as u64));
    for (name, input) in [("no_iac", plain()), ("iac_per_kib", with_iac())] {
        let mut d = Decoder::default();
        g.bench_function(name, |b| b.iter(|| decode_all(&mut d, black_box(&input))));
    }
    g.finish();
}

fn encoder(c: &mut Criterion) {
    let mut g = c.benchmark_group("encode_data");
    g.throughput(Throughput::Bytes(LEN as u64));
    for (name, input) in [("no_iac", plain()), ("ff_per_kib", raw_with_ff())] {
        let mut out = Vec::with_capacity(2 * LEN);
        g.bench_function(name, |b| {
            b.iter(|| {
                out.clear();
                encode::data(black_box(&input), &mut out);
                out.len()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, decoder, encoder);
criterion_main!(benches);
