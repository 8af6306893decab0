//! Test data: the byte patterns every byte-exactness test sends, and a
//! seeded generator for reproducible garbage.

/// Every byte value 0..=255, `reps` times, then NUL, CR LF, CR NUL, IAC IAC
/// and a lone CR in the middle.
pub fn all_bytes(reps: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(reps * 256 + 16);
    for _ in 0..reps {
        v.extend(0..=255u8);
    }
    v.extend_from_slice(b"\0\r\n\r\0\xff\xff\rX\xff\0");
    v
}

/// Every byte value, `reps` times over, counting up from 0x00 (no tail):
/// `every_byte(1)` is 0..=255.
pub fn every_byte(reps: usize) -> Vec<u8> {
    (0..256 * reps).map(|i| i as u8).collect()
}

/// Every byte value `reps` times, counting down from 0xFF (so IAC comes
/// first), then IAC IAC, CR LF, CR NUL, NUL, IAC and a lone CR at the end.
pub fn all_bytes_down(reps: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(reps * 256 + 16);
    for _ in 0..reps {
        v.extend((0..=255u8).rev());
    }
    v.extend_from_slice(b"\xff\xff\r\n\r\0\0\xff\r");
    v
}

/// A small seeded PRNG (xorshift64*), so garbage is reproducible.
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> XorShift {
        XorShift(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}
