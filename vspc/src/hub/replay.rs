//! What a VM said before you came: a ring of its most recent output, kept
//! per VM for every backend (`--replay-bytes`).
//!
//! The ring holds what was *delivered* to the VM's consoles and backends,
//! fed by [`Hub::deliver`] under the VM's lock, and a console joining takes
//! its copy under that same lock: what is in the ring it gets as history,
//! what comes after it gets live, so no byte is shown twice or missed at
//! the seam. It is kept with the VM's entry (reconnects and vMotions keep
//! it) and freed when the mapping expires. It is allocated at the first
//! output, and grows with what the VM says up to its size, so a VM that
//! never speaks costs one pointer.
//!
//! The ring holds output as the VM sent it after telnet decoding, so no
//! telnet sequence can be cut; a replay starts after the first line break
//! in its first [`LINE_SEEK`] bytes (a terminal then never sees half an
//! escape sequence or half a line), else after any UTF-8 continuation
//! bytes at its start, so it never begins inside a character.

use std::collections::VecDeque;

/// A place in a VM's output: `said` bytes delivered since the count began
/// at `origin`. A node counts each VM it takes in from its first byte under
/// a fresh random origin, except when the VM comes from another node in a
/// vMotion: then it goes on with that node's origin and count, so a
/// console that followed the VM can say exactly which byte it had reached
/// and the ring supplies the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub origin: u64,
    pub said: u64,
}

impl Position {
    /// `ORIGIN.SAID` (hex origin), as it travels in a console's resume
    /// token.
    pub fn token(&self) -> String {
        format!("{:x}.{}", self.origin, self.said)
    }

    /// The inverse of [`Position::token`]; `None` for anything else.
    pub fn parse(token: &str) -> Option<Position> {
        let (origin, said) = token.split_once('.')?;
        Some(Position {
            origin: u64::from_str_radix(origin, 16).ok()?,
            said: said.parse().ok()?,
        })
    }
}

/// A fresh origin for a count of a VM's output.
pub fn new_origin() -> u64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        // Unique enough within one process: a clock reading.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        return t.as_nanos() as u64;
    }
    u64::from_ne_bytes(b)
}

/// Of output counted up to `said`, whose last `ring.len()` bytes the ring
/// holds: the bytes from `from` on that it still has, and how many before
/// them it has lost.
pub fn since(ring: Option<&Ring>, said: u64, from: u64) -> (Vec<u8>, u64) {
    let held = ring.map_or(0, Ring::len) as u64;
    let start = said.saturating_sub(held);
    if from >= said {
        return (Vec::new(), 0);
    }
    let lost = start.saturating_sub(from);
    let skip = from.saturating_sub(start) as usize;
    let bytes = ring.map_or_else(Vec::new, |r| r.bytes.range(skip..).copied().collect());
    (bytes, lost)
}

/// How far into the ring a replay looks for a line break to start after.
pub const LINE_SEEK: usize = 1024;

/// The line after a replay on interactive doors, so people know where
/// history ends and live output begins.
pub const MARKER: &[u8] = b"\r\n-- live --\r\n";

/// The most recent output of one VM, `cap` bytes at most.
#[derive(Debug, Default)]
pub struct Ring {
    bytes: VecDeque<u8>,
    /// Older output was dropped: the first byte held may be mid-line or
    /// mid-character.
    cut: bool,
    /// The last byte dropped: a line break there means the ring starts
    /// at a line's start after all.
    before: u8,
}

impl Ring {
    /// Keep `data` as the newest output, dropping the oldest beyond `cap`.
    pub fn push(&mut self, data: &[u8], cap: usize) {
        if data.len() >= cap {
            if data.len() > cap {
                self.before = data[data.len() - cap - 1];
            } else if let Some(&last) = self.bytes.back() {
                self.before = last;
            }
            self.cut |= !self.bytes.is_empty() || data.len() > cap;
            self.bytes.clear();
            self.bytes.extend(&data[data.len() - cap..]);
            return;
        }
        let over = (self.bytes.len() + data.len()).saturating_sub(cap);
        if over > 0 {
            self.cut = true;
            self.before = self.bytes[over - 1];
        }
        self.bytes.drain(..over);
        self.bytes.extend(data);
    }

    /// Put `older` output (said before everything held, e.g. on the node
    /// a VM came from) in front, keeping the newest `cap` bytes.
    pub fn prepend(&mut self, older: &[u8], cap: usize) {
        let room = cap.saturating_sub(self.bytes.len());
        let keep = older.len().min(room);
        let dropped = older.len() - keep;
        if dropped > 0 {
            self.cut = true;
            self.before = older[dropped - 1];
        }
        for &b in older[dropped..].iter().rev() {
            self.bytes.push_front(b);
        }
    }

    /// Bytes held.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Everything held (the last `cap` bytes the VM sent).
    pub fn contents(&self) -> Vec<u8> {
        self.bytes.iter().copied().collect()
    }

    /// What a console is shown: [`Ring::contents`] from a clean start (see
    /// the module doc).
    pub fn replay(&self) -> Vec<u8> {
        let mut all = self.contents();
        let start = if self.cut && self.before != b'\n' {
            clean_start(&all)
        } else {
            0
        };
        all.drain(..start);
        all
    }
}

/// Where a replay of `held` begins: after the first line break in its first
/// [`LINE_SEEK`] bytes, else after the UTF-8 continuation bytes it starts
/// with (three at most).
pub fn clean_start(held: &[u8]) -> usize {
    let seek = &held[..held.len().min(LINE_SEEK)];
    if let Some(i) = seek.iter().position(|&b| b == b'\n') {
        return i + 1;
    }
    held.iter()
        .take(3)
        .take_while(|&&b| (0x80..0xC0).contains(&b))
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_travel_as_tokens_and_nothing_else_parses() {
        let p = Position {
            origin: u64::MAX,
            said: 12_345_678_901,
        };
        assert_eq!(Position::parse(&p.token()), Some(p));
        for bad in [
            "",
            ".",
            "x.1",
            "1.",
            "1.-2",
            "1.2.3",
            "ffffffffffffffffff.1",
            "1",
        ] {
            assert_eq!(Position::parse(bad), None, "{bad:?}");
        }
        assert_ne!(new_origin(), new_origin());
    }

    #[test]
    fn since_gives_what_the_ring_holds_from_a_position_and_counts_the_rest_lost() {
        let mut r = Ring::default();
        r.push(b"0123456789", 8); // holds "23456789", said 10
        assert_eq!(since(Some(&r), 10, 10), (Vec::new(), 0), "up to date");
        assert_eq!(since(Some(&r), 10, 7), (b"789".to_vec(), 0));
        assert_eq!(since(Some(&r), 10, 2), (b"23456789".to_vec(), 0));
        assert_eq!(
            since(Some(&r), 10, 0),
            (b"23456789".to_vec(), 2),
            "two lost"
        );
        assert_eq!(since(Some(&r), 10, 99), (Vec::new(), 0), "from the future");
        assert_eq!(since(None, 10, 4), (Vec::new(), 6), "no ring");
        assert_eq!(since(None, 0, 0), (Vec::new(), 0));
    }

    #[test]
    fn keeps_exactly_the_last_cap_bytes() {
        let mut r = Ring::default();
        let data: Vec<u8> = (0..=255u8).cycle().take(1 << 20).collect();
        for chunk in data.chunks(7000) {
            r.push(chunk, 16384);
        }
        assert_eq!(r.len(), 16384);
        assert_eq!(r.contents(), &data[data.len() - 16384..]);
        // One push larger than the ring.
        let mut big = Ring::default();
        big.push(&data, 1000);
        assert_eq!(big.contents(), &data[data.len() - 1000..]);
    }

    #[test]
    fn a_replay_starts_after_a_near_line_break() {
        let mut r = Ring::default();
        r.push(b"older output\r\n", 29);
        r.push(b"tail of a line\r\nkernel panic\r\n", 29);
        assert_eq!(r.contents(), b"ail of a line\r\nkernel panic\r\n");
        assert_eq!(r.replay(), b"kernel panic\r\n");
        // Cut just after a line break: the first line is whole.
        let mut r = Ring::default();
        r.push(b"older output\r\n", 25);
        r.push(b"first line\r\n", 25);
        r.push(b"second line\r\n", 25);
        assert_eq!(r.replay(), b"first line\r\nsecond line\r\n");
        // Nothing dropped yet: the VM's first line is whole, and kept.
        let mut r = Ring::default();
        r.push(b"first\r\nsecond\r\n", 1000);
        assert_eq!(r.replay(), b"first\r\nsecond\r\n");
        // No line break near the start: the whole ring, minus a cut
        // character's continuation bytes.
        let mut r = Ring::default();
        r.push("é".repeat(10).as_bytes(), 19);
        assert_eq!(r.contents()[0], 0xA9, "the cap cut a character");
        assert_eq!(r.replay(), "é".repeat(9).as_bytes());
        let far = [vec![b'x'; LINE_SEEK], b"\nrest".to_vec()].concat();
        let mut r = Ring::default();
        r.push(b"dropped", 4096);
        r.push(&far, far.len());
        assert_eq!(r.replay(), far, "a line break too far in is not sought");
    }

    #[test]
    fn older_output_goes_in_front_within_the_cap() {
        let mut r = Ring::default();
        r.push(b"new\r\n", 16);
        r.prepend(b"old line\r\n", 16);
        assert_eq!(r.contents(), b"old line\r\nnew\r\n");
        // Only what fits: the newest of the older output.
        let mut r = Ring::default();
        r.push(b"0123456789", 12);
        r.prepend(b"abc\ndef", 12);
        assert_eq!(r.contents(), b"ef0123456789");
        assert_eq!(r.replay(), b"ef0123456789", "no line break near the start");
    }

    #[test]
    fn an_empty_ring_replays_nothing() {
        let r = Ring::default();
        assert!(r.is_empty());
        assert!(r.replay().is_empty());
    }
}
