//! Streaming phases shared by `fanout`, `burst` and `latency`: every VM
//! sends its own deterministic pattern, every console checks each byte
//! against the regenerated pattern, and the phase is timed from the first
//! byte sent to the last byte the measured consoles verified.
//!
//! The pattern uses the byte values 0x00..=0xFE only by default: no 0xFF,
//! so telnet escaping is a no-op and the daemon moves exactly the bytes the
//! bare relay moves (it still scans for IAC in both directions, which is
//! part of what is measured). With [`PatternKind::AllBytes`] it uses every
//! byte value: a VM doubles each 0xFF on the wire as ESXi does, the daemon
//! undoubles it and doubles it again for each telnet console, and the
//! console's telnet decoder undoubles it before the check (the bare relay
//! passes the VM's doubled bytes through, so its consoles decode the same).
//!
//! A console reads its stream as its kind does ([`WireKind`]): telnet
//! decoded, answering any negotiation if it is a telnet client that waited
//! for the server (silent-telnet), or raw, with no decoding at all, after
//! the daemon's telnet offer to a client that stayed silent (silent-raw).
//! A phase with a deadline gives up at that time on the consoles reading
//! at full speed that have not received their last byte (`unfinished`);
//! without one, or once they are done, it gives up on every console still
//! reading when none has verified a byte for the stall time.
//!
//! The daemon never drops a console that reads. A console more than
//! `--console-queue` behind loses the oldest output instead and is told so
//! in-band, on a line of its own ([`NOTICE_HEAD`] N [`NOTICE_TAIL`]); the
//! [`Verifier`] recognises that notice, checks that the stream goes on
//! exactly N bytes later, and counts it. Whether a skip is a failure is the
//! mode's call: `fanout` fails, `burst` reports the count for its slow and
//! stuck consoles, `latency` fails at once.
//!
//! Each VM is one writer task and each console one reader task, with a
//! reused buffer and one slice compare per run of data, so the bench costs
//! as little CPU as it can next to the server it measures.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinSet;
use vspc_codec::wire::{encode, Decoder, Event, Negotiator};
use vspc_testkit::sim::{console_negotiator, RawConn};

use super::fanout::peak_rss_kib;
use super::kinds::{tally, ConsoleKind};
use super::{cpu_s, identity, Failure, PROGRESS_EVERY};

/// The pattern's period: a prime, so whole-chunk losses never line up.
pub(crate) const PERIOD: usize = 1_048_573;
/// A console's read buffer.
const READ_BUF: usize = 32 * 1024;
/// Most bytes shown from a mismatching read.
const SHOW: usize = 48;
/// A rate-limited console reads at most this fraction of a second's worth
/// at a time, so its reads stay small and evenly spread.
const PACE_SLICES_PER_S: u64 = 50;
/// The start of the daemon's in-band skip notice:
/// `\r\n[vspc: skipped N bytes of output; this console fell behind]\r\n`.
pub(crate) const NOTICE_HEAD: &[u8] = b"\r\n[vspc: skipped ";
/// The end of the skip notice, after the count.
pub(crate) const NOTICE_TAIL: &[u8] = b" bytes of output; this console fell behind]\r\n";
/// Most digits of a notice's count (`u64::MAX` has 20).
const NOTICE_DIGITS: usize = 20;
/// Verified bytes kept to look back into when a notice is found: its first
/// bytes may have happened to equal the pattern.
const LOOKBACK: usize = NOTICE_HEAD.len() - 1;

// ---------------------------------------------------------------------------
// The pattern.

/// Which byte values a [`Pattern`] uses (`fanout --pattern`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum PatternKind {
    /// 0x00..=0xFE: no 0xFF, so telnet escaping is a no-op.
    #[default]
    NoFf,
    /// Every value 0x00..=0xFF, evenly (0xFF is 1 byte in 256): escaped by
    /// the VMs, unescaped and escaped again by the daemon, unescaped by the
    /// consoles.
    AllBytes,
}

/// Every VM's stream is the same pseudo-random table of bytes (of the
/// values its [`PatternKind`] allows) with period [`PERIOD`], read from a
/// VM-specific starting point. The table is stored twice over, so any piece
/// up to a period long is one slice: sending and checking are slice writes
/// (after escaping, for 0xFF) and slice compares.
pub(crate) struct Pattern {
    table: Vec<u8>,
    kind: PatternKind,
}

impl Pattern {
    /// The default pattern, 0x00..=0xFE.
    pub(crate) fn new() -> Pattern {
        Pattern::of(PatternKind::default())
    }

    pub(crate) fn of(kind: PatternKind) -> Pattern {
        let mut table = Vec::with_capacity(2 * PERIOD);
        let mut x = 0x5eed_u64;
        while table.len() < PERIOD {
            x = splitmix64(x);
            for b in x.to_le_bytes() {
                if table.len() < PERIOD {
                    table.push(match kind {
                        PatternKind::NoFf => (u32::from(b) * 255 / 256) as u8,
                        PatternKind::AllBytes => b,
                    });
                }
            }
        }
        table.extend_from_within(..PERIOD);
        Pattern { table, kind }
    }

    /// What the report's `pattern` field says.
    pub(crate) fn describe(&self) -> &'static str {
        match self.kind {
            PatternKind::NoFf => "0x00-0xFE (no 0xFF, telnet escaping is a no-op)",
            PatternKind::AllBytes => {
                "0x00-0xFF (every byte value; 0xFF escaped by the VMs and for the consoles)"
            }
        }
    }

    /// [`Pattern::piece`] as a VM writes it on its telnet connection: with
    /// every 0xFF doubled (into `scratch`), or the piece itself when it
    /// has no 0xFF.
    pub(crate) fn wire<'a>(
        &'a self,
        vm: usize,
        offset: u64,
        len: usize,
        scratch: &'a mut Vec<u8>,
    ) -> &'a [u8] {
        let piece = self.piece(vm, offset, len);
        match self.kind {
            PatternKind::NoFf => piece,
            PatternKind::AllBytes => {
                scratch.clear();
                encode::data(piece, scratch);
                scratch
            }
        }
    }

    /// Bytes `offset .. offset + len` of VM `vm`'s stream; `len` ≤ PERIOD.
    pub(crate) fn piece(&self, vm: usize, offset: u64, len: usize) -> &[u8] {
        let start = (vm as u64).wrapping_mul(0x9e37_79b9) % PERIOD as u64;
        let at = ((start + offset % PERIOD as u64) % PERIOD as u64) as usize;
        &self.table[at..at + len.min(PERIOD)]
    }

    /// Compare `data` with VM `vm`'s stream from `offset` on: `None` if
    /// equal, else the first differing index (in `data`).
    pub(crate) fn first_difference(&self, vm: usize, offset: u64, data: &[u8]) -> Option<usize> {
        let mut done = 0;
        while done < data.len() {
            let len = (data.len() - done).min(PERIOD);
            let want = self.piece(vm, offset + done as u64, len);
            let got = &data[done..done + len];
            if got != want {
                let at = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
                return Some(done + at);
            }
            done += len;
        }
        None
    }
}

pub(crate) fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

// ---------------------------------------------------------------------------
// Checking a console's bytes.

/// How far a (possibly partial) skip notice has been read.
#[derive(Debug, PartialEq, Eq)]
enum Notice {
    /// Consistent so far; more bytes needed.
    Partial,
    /// Whole: the count of skipped bytes.
    Complete(u64),
    /// Not a notice.
    Invalid,
}

/// Parse the bytes of a notice read so far (fed one byte at a time, so
/// nothing follows its end).
fn parse_notice(b: &[u8]) -> Notice {
    if b.len() <= NOTICE_HEAD.len() {
        return if NOTICE_HEAD.starts_with(b) {
            Notice::Partial
        } else {
            Notice::Invalid
        };
    }
    let Some(rest) = b.strip_prefix(NOTICE_HEAD) else {
        return Notice::Invalid;
    };
    let digits = rest.iter().take_while(|c| c.is_ascii_digit()).count();
    if digits == rest.len() {
        return if digits <= NOTICE_DIGITS {
            Notice::Partial
        } else {
            Notice::Invalid
        };
    }
    let tail = &rest[digits..];
    if digits == 0 || !NOTICE_TAIL.starts_with(tail) {
        return Notice::Invalid;
    }
    if tail.len() < NOTICE_TAIL.len() {
        return Notice::Partial;
    }
    // ASCII digits, at most 20 of them: only the value can be out of range.
    std::str::from_utf8(&rest[..digits])
        .ok()
        .and_then(|n| n.parse().ok())
        .map_or(Notice::Invalid, Notice::Complete)
}

/// Checks one console's data against its VM's pattern, skip notices
/// included.
pub(crate) struct Verifier {
    pub(crate) vm: usize,
    /// Position in the VM's stream: bytes verified plus bytes skipped.
    pub(crate) got: u64,
    /// Data bytes received and verified.
    pub(crate) received: u64,
    /// Bytes the daemon announced it skipped, in `notices` notices.
    pub(crate) skipped: u64,
    pub(crate) notices: u64,
    /// How many the VM sends (`None`: no end).
    pub(crate) expect: Option<u64>,
    /// Whether a skip notice is counted (else it is an error at once).
    counting_skips: bool,
    /// The bytes of a notice being read.
    notice: Option<Vec<u8>>,
    /// The last verified bytes, at most [`LOOKBACK`] (none across a notice).
    recent: Vec<u8>,
    pattern: Arc<Pattern>,
}

impl Verifier {
    /// A verifier for which a skip notice is an error.
    pub(crate) fn new(vm: usize, expect: Option<u64>, pattern: Arc<Pattern>) -> Verifier {
        Verifier {
            vm,
            got: 0,
            received: 0,
            skipped: 0,
            notices: 0,
            expect,
            counting_skips: false,
            notice: None,
            recent: Vec::with_capacity(2 * LOOKBACK),
            pattern,
        }
    }

    /// Count skip notices instead of failing at the first.
    pub(crate) fn counting_skips(mut self) -> Verifier {
        self.counting_skips = true;
        self
    }

    pub(crate) fn done(&self) -> bool {
        self.notice.is_none() && self.expect.is_some_and(|e| self.got >= e)
    }

    /// Check one run of data bytes.
    pub(crate) fn data(&mut self, mut d: &[u8]) -> Result<(), String> {
        while !d.is_empty() {
            if let Some(notice) = self.notice.as_mut() {
                // A notice is short: take it a byte at a time until whole.
                let mut whole = None;
                let mut used = 0;
                for &b in d {
                    notice.push(b);
                    used += 1;
                    match parse_notice(notice) {
                        Notice::Partial => {}
                        Notice::Complete(n) => {
                            whole = Some(n);
                            break;
                        }
                        Notice::Invalid => {
                            return Err(format!(
                                "byte {} differs from the pattern, and what follows is not a \
                                 skip notice: {:?}",
                                self.got,
                                String::from_utf8_lossy(notice)
                            ))
                        }
                    }
                }
                d = &d[used..];
                if let Some(n) = whole {
                    self.notice = None;
                    self.skip(n)?;
                }
                continue;
            }
            let left = self.expect.map_or(u64::MAX, |e| e.saturating_sub(self.got));
            let len = d.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            // Past the end, every byte is a difference.
            let at = if len == 0 {
                0
            } else {
                match self.pattern.first_difference(self.vm, self.got, &d[..len]) {
                    Some(at) => at,
                    None => {
                        self.accept(&d[..len]);
                        d = &d[len..];
                        continue;
                    }
                }
            };
            match self.notice_start(&d[..at], &d[at..]) {
                Some(back) if back <= at => {
                    self.accept(&d[..at - back]);
                    self.recent.clear();
                    self.notice = Some(Vec::new());
                    d = &d[at - back..];
                }
                Some(back) => {
                    // The notice began in an earlier run: take back the
                    // bytes of it that had passed for pattern.
                    let before = back - at;
                    let taken = self.recent.split_off(self.recent.len() - before);
                    self.got -= before as u64;
                    self.received -= before as u64;
                    self.recent.clear();
                    self.notice = Some(taken);
                    // d[..at] equals the notice too: feed it from the start.
                }
                None if len == 0 => {
                    return Err(format!(
                        "received {} bytes more than the {} its VM sent: {:?}",
                        d.len(),
                        self.got,
                        String::from_utf8_lossy(&d[..d.len().min(SHOW)])
                    ));
                }
                None => {
                    let want = self.pattern.piece(self.vm, self.got + at as u64, 1);
                    let shown = &d[at..(at + SHOW).min(d.len())];
                    let skipped = if self.skipped > 0 {
                        format!(" (after {} bytes announced as skipped)", self.skipped)
                    } else {
                        String::new()
                    };
                    return Err(format!(
                        "byte {} differs from the pattern (0x{:02x}, expected 0x{:02x}){skipped}; \
                         received from there: {:?}",
                        self.got + at as u64,
                        d[at],
                        want.first().copied().unwrap_or(0),
                        String::from_utf8_lossy(shown)
                    ));
                }
            }
        }
        Ok(())
    }

    /// Where a skip notice starts, as a count of bytes before the first
    /// byte that differs from the pattern (`matched` passed for pattern,
    /// `rest` starts at the difference); `None` if no notice starts there.
    fn notice_start(&self, matched: &[u8], rest: &[u8]) -> Option<usize> {
        let behind = matched.len() + self.recent.len();
        (0..=LOOKBACK.min(behind)).find(|&back| {
            // The `back` bytes before the difference, then what follows.
            let mut head = Vec::with_capacity(back + NOTICE_HEAD.len());
            if back > matched.len() {
                let from_recent = back - matched.len();
                head.extend_from_slice(&self.recent[self.recent.len() - from_recent..]);
                head.extend_from_slice(matched);
            } else {
                head.extend_from_slice(&matched[matched.len() - back..]);
            }
            head.extend_from_slice(&rest[..rest.len().min(NOTICE_HEAD.len())]);
            head.truncate(NOTICE_HEAD.len());
            NOTICE_HEAD.starts_with(&head)
        })
    }

    /// `d` matched the pattern.
    fn accept(&mut self, d: &[u8]) {
        self.got += d.len() as u64;
        self.received += d.len() as u64;
        if d.len() >= LOOKBACK {
            self.recent.clear();
            self.recent.extend_from_slice(&d[d.len() - LOOKBACK..]);
        } else {
            self.recent.extend_from_slice(d);
            let excess = self.recent.len().saturating_sub(LOOKBACK);
            self.recent.drain(..excess);
        }
    }

    /// A whole notice said `n` bytes were skipped: the stream goes on `n`
    /// bytes later.
    fn skip(&mut self, n: u64) -> Result<(), String> {
        if let Some(expect) = self.expect {
            if self.got + n > expect {
                return Err(format!(
                    "a skip notice at byte {} says {n} bytes were skipped, but the VM sent only \
                     {} more",
                    self.got,
                    expect - self.got
                ));
            }
        }
        if !self.counting_skips {
            return Err(format!(
                "the daemon skipped {n} bytes of this console's output at byte {} (it fell \
                 behind)",
                self.got
            ));
        }
        self.got += n;
        self.skipped += n;
        self.notices += 1;
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Reading a console.

/// How far each console of one VM has verified, so the VM's sender can
/// stay within `--window` of the slowest.
pub(crate) struct Flow {
    verified: Vec<AtomicU64>,
    /// Wakes the sender after a console made progress.
    progress: tokio::sync::Notify,
}

impl Flow {
    fn new(consoles: usize) -> Flow {
        Flow {
            verified: (0..consoles).map(|_| AtomicU64::new(0)).collect(),
            progress: tokio::sync::Notify::new(),
        }
    }

    fn slowest(&self) -> u64 {
        self.verified
            .iter()
            .map(|v| v.load(Ordering::Relaxed))
            .min()
            .unwrap_or(u64::MAX)
    }

    /// Console `j` has verified `got` bytes.
    fn report(&self, j: usize, got: u64) {
        if let Some(v) = self.verified.get(j) {
            v.store(got, Ordering::Relaxed);
            self.progress.notify_one();
        }
    }
}

/// Where a console reader reports what it verified.
#[derive(Clone, Default)]
pub(crate) struct Progress {
    /// Data bytes verified by all the consoles of a phase (progress lines,
    /// the stall check).
    all: Arc<AtomicU64>,
    /// This console's bytes received and skipped so far, read if the phase
    /// stalls.
    mine: Option<Arc<[AtomicU64; 2]>>,
    /// Its VM's flow and its slot there (`--window`).
    flow: Option<(Arc<Flow>, usize)>,
}

impl Progress {
    /// Report only into the total `all`.
    pub(crate) fn counting(all: Arc<AtomicU64>) -> Progress {
        Progress {
            all,
            ..Progress::default()
        }
    }
}

/// How a console's bytes are read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WireKind {
    /// Telnet, decoded; negotiation is not answered (a console that
    /// negotiated before it was handed over, and the bare relay's, which
    /// get none).
    Telnet,
    /// Telnet, decoded, and every negotiation answered the way the
    /// simulator's console answers (BINARY both ways and SGA accepted): a
    /// telnet client that waited for the server to negotiate.
    TelnetAnswering,
    /// No telnet at all: exactly these bytes first (the daemon's telnet
    /// offer to a client that stayed silent), then the VM's bytes as they
    /// are, 0xFF undoubled.
    Raw(&'static [u8]),
}

/// Where a console's reader is in its stream.
enum WireState {
    Telnet {
        decoder: Decoder,
        /// Answers the server's negotiation ([`WireKind::TelnetAnswering`]).
        answer: Option<Negotiator>,
    },
    Raw {
        prefix: &'static [u8],
        /// Bytes of `prefix` received so far.
        matched: usize,
    },
}

/// Turns the bytes off a console's socket into data for its [`Verifier`]
/// (and answers to negotiation), as its [`WireKind`] says.
pub(crate) struct Wire {
    state: WireState,
}

impl Wire {
    /// `decoder` goes on from where the simulation left a telnet stream.
    pub(crate) fn new(kind: WireKind, decoder: Decoder) -> Wire {
        let state = match kind {
            WireKind::Telnet => WireState::Telnet {
                decoder,
                answer: None,
            },
            WireKind::TelnetAnswering => WireState::Telnet {
                decoder,
                answer: Some(console_negotiator(true)),
            },
            WireKind::Raw(prefix) => WireState::Raw { prefix, matched: 0 },
        };
        Wire { state }
    }

    /// Check the next bytes off the socket: the data goes to `v`; answers
    /// to the server's negotiation, if this console answers, to `replies`.
    pub(crate) fn feed(
        &mut self,
        bytes: &[u8],
        v: &mut Verifier,
        replies: &mut Vec<u8>,
    ) -> Result<(), String> {
        match &mut self.state {
            WireState::Telnet { decoder, answer } => {
                let mut bad = Ok(());
                decoder
                    .decode(bytes, |ev| match ev {
                        Event::Data(d) if bad.is_ok() => bad = v.data(d),
                        Event::Negotiate(verb, option) => {
                            if let Some(neg) = answer.as_mut() {
                                neg.receive(verb, option, replies);
                            }
                        }
                        _ => {}
                    })
                    .map_err(|e| format!("telnet decode error: {e}"))?;
                bad
            }
            WireState::Raw { prefix, matched } => {
                let mut d = bytes;
                if *matched < prefix.len() {
                    let want = &prefix[*matched..];
                    let n = want.len().min(d.len());
                    if let Some(i) = (0..n).find(|&i| d[i] != want[i]) {
                        return Err(format!(
                            "expected the daemon's {}-byte telnet offer first (a console \
                             silent for 0.3 s gets it before any output), but byte {} of the \
                             stream is 0x{:02x}, not 0x{:02x}; received from there: {:?}",
                            prefix.len(),
                            *matched + i,
                            d[i],
                            want[i],
                            String::from_utf8_lossy(&d[i..(i + SHOW).min(d.len())])
                        ));
                    }
                    *matched += n;
                    d = &d[n..];
                }
                if d.is_empty() {
                    Ok(())
                } else {
                    v.data(d)
                }
            }
        }
    }

    /// Where a stream that ended early was, beyond the data: inside the
    /// expected offer.
    fn unfinished_prefix(&self) -> Option<String> {
        match self.state {
            WireState::Raw { prefix, matched } if matched < prefix.len() => Some(format!(
                " (after {matched} of the {}-byte telnet offer it expected first)",
                prefix.len()
            )),
            _ => None,
        }
    }
}

/// Read a console's stream until its VM's bytes are all accounted for
/// (forever without `expect`), at most `pace` bytes per second if given,
/// reading it as `wire` says. Returns when the last byte was verified, and
/// the stream.
pub(crate) async fn verify_console(
    conn: RawConn<TcpStream>,
    wire: WireKind,
    v: &mut Verifier,
    pace: Option<u64>,
    progress: &Progress,
) -> Result<(Instant, TcpStream), String> {
    let RawConn {
        mut stream,
        data,
        decoder,
        ..
    } = conn;
    let mut wire = Wire::new(wire, decoder);
    let mut replies = Vec::new();
    let report = |v: &Verifier, before: u64| {
        progress
            .all
            .fetch_add(v.received.saturating_sub(before), Ordering::Relaxed);
        if let Some(mine) = &progress.mine {
            mine[0].store(v.received, Ordering::Relaxed);
            mine[1].store(v.skipped, Ordering::Relaxed);
        }
        if let Some((flow, j)) = &progress.flow {
            flow.report(*j, v.got);
        }
    };
    v.data(&data)?;
    report(v, 0);
    let mut buf = vec![0u8; READ_BUF];
    let (started, mut on_wire) = (tokio::time::Instant::now(), 0u64);
    while !v.done() {
        let want = match pace {
            None => buf.len(),
            Some(rate) => {
                // Sleep until the bytes read so far are due at `rate`.
                let due = Duration::from_secs_f64(on_wire as f64 / rate.max(1) as f64);
                tokio::time::sleep_until(started + due).await;
                let slice = (rate / PACE_SLICES_PER_S).max(1);
                buf.len().min(usize::try_from(slice).unwrap_or(usize::MAX))
            }
        };
        let n = match stream.read(&mut buf[..want]).await {
            Ok(0) => {
                let inside = if v.notice.is_some() {
                    " (inside a skip notice)".to_string()
                } else {
                    wire.unfinished_prefix().unwrap_or_default()
                };
                return Err(format!(
                    "closed by the other side after {} data bytes{}{inside}",
                    v.received,
                    v.expect.map_or(String::new(), |e| format!(" of {e}"))
                ));
            }
            Ok(n) => n,
            Err(e) => return Err(format!("read error after {} data bytes: {e}", v.received)),
        };
        on_wire += n as u64;
        let before = v.received;
        wire.feed(&buf[..n], v, &mut replies)?;
        if !replies.is_empty() {
            stream.write_all(&replies).await.map_err(|e| {
                format!(
                    "answering the server's negotiation after {} data bytes: {e}",
                    v.received
                )
            })?;
            replies.clear();
        }
        report(v, before);
    }
    Ok((Instant::now(), stream))
}

/// Send `shape.total` bytes of VM `vm`'s pattern in writes of up to
/// `shape.chunk` bytes once `gate` opens, never more than `shape.window`
/// bytes (0: no limit) ahead of the slowest console in `flow`; returns the
/// stream (kept open until the phase ends).
async fn send_pattern(
    mut stream: TcpStream,
    vm: usize,
    shape: Shape,
    flow: Arc<Flow>,
    pattern: Arc<Pattern>,
    mut gate: watch::Receiver<bool>,
) -> Result<TcpStream, String> {
    if gate.wait_for(|open| *open).await.is_err() {
        return Err("internal error: start gate dropped".into());
    }
    let (total, window) = (shape.total, shape.window);
    let mut sent = 0u64;
    let mut scratch = Vec::new();
    while sent < total {
        let mut room = total - sent;
        if window > 0 {
            loop {
                let ahead = sent.saturating_sub(flow.slowest());
                if ahead < window {
                    room = room.min(window - ahead);
                    break;
                }
                // A console's report after the check leaves a permit.
                flow.progress.notified().await;
            }
        }
        let len = shape.chunk.min(usize::try_from(room).unwrap_or(usize::MAX));
        stream
            .write_all(pattern.wire(vm, sent, len, &mut scratch))
            .await
            .map_err(|e| format!("VM {vm} writing at byte {sent}: {e}"))?;
        sent += len as u64;
    }
    Ok(stream)
}

// ---------------------------------------------------------------------------
// A streaming phase.

/// A console's connection, its VM, its number among that VM's consoles,
/// its kind, and how its bytes are read.
pub(crate) struct RawConsole {
    pub(crate) vm: usize,
    pub(crate) index: usize,
    /// `None` for the bare relay's consoles, which all read alike.
    pub(crate) kind: Option<ConsoleKind>,
    pub(crate) wire: WireKind,
    pub(crate) conn: RawConn<TcpStream>,
}

/// How a console reads during a phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reading {
    /// As fast as it can; the phase's time ends at the last such console's
    /// last byte, and these are what a VM's `--window` waits for.
    Fast,
    /// At most this many bytes per second (a slow link): the daemon must
    /// neither drop it nor let it slow the others.
    Limited(u64),
    /// Not at all until every fast console is done (it never reads during
    /// the measured time), then as fast as it can, to see what the daemon
    /// kept for it and what it skipped.
    Stuck,
}

/// What one phase sends.
#[derive(Clone, Copy)]
pub(crate) struct Shape {
    /// Bytes each VM sends.
    pub(crate) total: u64,
    /// Size of each VM write.
    pub(crate) chunk: usize,
    /// Most bytes a VM runs ahead of its slowest fast console (0: no limit).
    pub(crate) window: u64,
    /// The phase ends, every unfinished console failing, when no console
    /// verifies a byte for this long (once every fast console is done,
    /// with a `deadline`).
    pub(crate) stall: Duration,
    /// The fast consoles still reading this long after the first byte was
    /// sent are given up on (unfinished); instead of `stall` while any is.
    pub(crate) deadline: Option<Duration>,
}

/// How one console's stream ended.
pub(crate) struct ConsoleEnd {
    pub(crate) vm: usize,
    pub(crate) index: usize,
    pub(crate) kind: Option<ConsoleKind>,
    pub(crate) reading: Reading,
    /// Data bytes received and verified.
    pub(crate) received: u64,
    /// Bytes the daemon announced it skipped, in how many notices.
    pub(crate) skipped: u64,
    pub(crate) notices: u64,
    /// Why it did not get to the end of its VM's stream (a wrong byte, a
    /// close, a stall, bytes after the end).
    pub(crate) error: Option<String>,
    /// Still reading when the phase gave up on it (its deadline, or a
    /// stall): it had not received its last byte.
    pub(crate) unfinished: bool,
    /// Still connected when the phase ended.
    pub(crate) connected: bool,
    stream: Option<TcpStream>,
}

impl ConsoleEnd {
    /// "console J of VM I (sim-vm-0000I+1, KIND)".
    pub(crate) fn who(&self) -> String {
        format!(
            "console {} of VM {} ({}{})",
            self.index,
            self.vm,
            identity(self.vm).name,
            self.kind
                .map_or(String::new(), |k| format!(", {}", k.name()))
        )
    }

    /// Every byte, in order, nothing skipped, still connected.
    pub(crate) fn exact(&self) -> bool {
        self.error.is_none() && self.skipped == 0 && self.connected
    }
}

/// What a streaming phase measured.
pub(crate) struct Phase {
    /// Gate opening to the last fast console's last byte.
    pub(crate) secs: f64,
    /// Bytes the fast consoles received (fast consoles × bytes per VM
    /// unless some were skipped), per second.
    pub(crate) mib_s: f64,
    /// The server's CPU (user + system) over `secs`, and per GiB delivered.
    pub(crate) cpu_s: f64,
    pub(crate) cpu_s_per_gib: f64,
    /// The server's VmHWM at the end of the phase (its whole life).
    pub(crate) rss_peak_kib: u64,
    /// The bench's own CPU over `secs`.
    pub(crate) bench_cpu_s: f64,
    /// Every console, in the order given.
    pub(crate) consoles: Vec<ConsoleEnd>,
}

impl Phase {
    /// The consoles that did not get every byte (not counting skips): an
    /// error naming up to five of them, or `Ok`.
    pub(crate) fn check_errors(&self, what: &str) -> Result<(), String> {
        let bad: Vec<&ConsoleEnd> = self.consoles.iter().filter(|c| c.error.is_some()).collect();
        match bad.first() {
            None => Ok(()),
            Some(_) => Err(format!(
                "{what}: {} of {} consoles did not get every byte: {}",
                bad.len(),
                self.consoles.len(),
                listing(bad.iter().map(|c| format!(
                    "{}: {}",
                    c.who(),
                    c.error.as_deref().unwrap_or("")
                )))
            )),
        }
    }

    /// Consoles that were told bytes were skipped, and the bytes.
    pub(crate) fn skips(&self) -> (u64, u64) {
        self.consoles
            .iter()
            .filter(|c| c.skipped > 0)
            .fold((0, 0), |(n, b), c| (n + 1, b + c.skipped))
    }

    /// The skips to consoles reading at full speed as a failure of the
    /// byte-exact check, if any.
    pub(crate) fn check_skips(&self, what: &str) -> Option<String> {
        let skipped: Vec<&ConsoleEnd> = self
            .consoles
            .iter()
            .filter(|c| c.skipped > 0 && c.reading == Reading::Fast)
            .collect();
        let bytes: u64 = skipped.iter().map(|c| c.skipped).sum();
        (!skipped.is_empty()).then(|| {
            format!(
                "{what}: {} of {} consoles ({}) read at full speed but were told the daemon \
                 skipped {bytes} bytes of their output in all: {}",
                skipped.len(),
                self.consoles.len(),
                tally(skipped.iter().map(|c| c.kind)),
                listing(skipped.iter().map(|c| format!(
                    "{}: {} bytes skipped in {} notice(s), {} received",
                    c.who(),
                    c.skipped,
                    c.notices,
                    c.received
                )))
            )
        })
    }

    /// The consoles reading at full speed that the phase gave up on
    /// before their last byte, as a failure (`when` says when it gave up:
    /// "30 s after the relay finished the same work"), if any.
    pub(crate) fn check_unfinished(&self, what: &str, when: &str) -> Option<String> {
        let late: Vec<&ConsoleEnd> = self
            .consoles
            .iter()
            .filter(|c| c.unfinished && c.reading == Reading::Fast)
            .collect();
        (!late.is_empty()).then(|| {
            format!(
                "{what}: {} of {} consoles ({}) had not received their last byte {when}: {}",
                late.len(),
                self.consoles.len(),
                tally(late.iter().map(|c| c.kind)),
                listing(late.iter().map(|c| format!(
                    "{} {}",
                    c.who(),
                    c.error.as_deref().unwrap_or("")
                )))
            )
        })
    }

    /// The consoles reading at full speed that got a wrong byte, more than
    /// their VM sent, or were closed, as a failure, if any.
    pub(crate) fn check_wrong(&self, what: &str) -> Option<String> {
        let bad: Vec<&ConsoleEnd> = self
            .consoles
            .iter()
            .filter(|c| c.error.is_some() && !c.unfinished && c.reading == Reading::Fast)
            .collect();
        (!bad.is_empty()).then(|| {
            format!(
                "{what}: {} of {} consoles ({}) did not get their VM's bytes: {}",
                bad.len(),
                self.consoles.len(),
                tally(bad.iter().map(|c| c.kind)),
                listing(bad.iter().map(|c| format!(
                    "{}: {}",
                    c.who(),
                    c.error.as_deref().unwrap_or("")
                )))
            )
        })
    }
}

/// Up to five items joined with "; ", and how many more.
pub(crate) fn listing(items: impl Iterator<Item = String>) -> String {
    let items: Vec<String> = items.collect();
    let mut text = items.iter().take(5).cloned().collect::<Vec<_>>().join("; ");
    if items.len() > 5 {
        text.push_str(&format!("; and {} more", items.len() - 5));
    }
    text
}

/// Stream every VM's bytes to its consoles through the server with process
/// id `pid` (`what` names it); times it, reads the server's CPU and peak
/// memory, and says how every console ended.
pub(crate) async fn stream_measured(
    what: &str,
    pid: u32,
    vms: Vec<TcpStream>,
    consoles: Vec<(RawConsole, Reading)>,
    shape: Shape,
    pattern: Arc<Pattern>,
) -> Result<Phase, Failure> {
    let phase = stream_phase(what, pid, vms, consoles, shape, pattern).await?;
    eprintln!(
        "vspc-bench: {what}: {:.1} MiB/s ({:.3} s)",
        phase.mib_s, phase.secs
    );
    Ok(phase)
}

/// A console reader's bookkeeping in [`stream_phase`].
struct Slot {
    vm: usize,
    index: usize,
    kind: Option<ConsoleKind>,
    reading: Reading,
    /// Bytes received and skipped, as its reader last reported.
    mine: Arc<[AtomicU64; 2]>,
}

impl Slot {
    /// How the console ended if its reader was still at it when the phase
    /// gave up on it (its deadline, or a stall).
    fn unfinished(&self, shape: Shape) -> ConsoleEnd {
        let (received, skipped) = (
            self.mine[0].load(Ordering::Relaxed),
            self.mine[1].load(Ordering::Relaxed),
        );
        ConsoleEnd {
            vm: self.vm,
            index: self.index,
            kind: self.kind,
            reading: self.reading,
            received,
            skipped,
            notices: 0,
            error: Some(format!(
                "got {received} of {} bytes ({skipped} skipped)",
                shape.total
            )),
            unfinished: true,
            connected: false,
            stream: None,
        }
    }
}

/// What a console reader task returns: its number, its verifier, and how
/// it ended.
type ReaderEnd = (usize, Verifier, Result<(Instant, TcpStream), String>);

/// The readers of a phase, not yet reading (but for the slow ones, which
/// wait for data like the fast ones).
struct Readers {
    slots: Vec<Slot>,
    tasks: JoinSet<ReaderEnd>,
    /// Each reader's task, by console, to give up on it.
    aborts: Vec<tokio::task::AbortHandle>,
    /// Per VM, for its sender's `--window`.
    flows: Vec<Arc<Flow>>,
    fast: usize,
}

/// Start a reader task per console; stuck ones wait for `release`.
fn spawn_readers(
    vms: usize,
    consoles: Vec<(RawConsole, Reading)>,
    shape: Shape,
    pattern: &Arc<Pattern>,
    all: &Arc<AtomicU64>,
    release: &watch::Receiver<bool>,
) -> Readers {
    let fast = |r: &Reading| *r == Reading::Fast;
    let mut per_vm = vec![0usize; vms];
    for (console, reading) in &consoles {
        if let (Some(count), true) = (per_vm.get_mut(console.vm), fast(reading)) {
            *count += 1;
        }
    }
    let fast_total = per_vm.iter().sum::<usize>();
    let flows: Vec<Arc<Flow>> = per_vm.iter().map(|&c| Arc::new(Flow::new(c))).collect();
    let mut slots = Vec::with_capacity(consoles.len());
    let mut aborts = Vec::with_capacity(consoles.len());
    let mut tasks = JoinSet::new();
    for (k, (console, reading)) in consoles.into_iter().enumerate() {
        let RawConsole {
            vm,
            index,
            kind,
            wire,
            conn,
        } = console;
        let mine = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
        let flow = match (flows.get(vm), per_vm.get_mut(vm)) {
            (Some(flow), Some(count)) if fast(&reading) => {
                *count -= 1; // each fast console gets a slot of its own
                             // Without a window nobody waits for the reports.
                (shape.window > 0).then(|| (flow.clone(), *count))
            }
            _ => None,
        };
        let progress = Progress {
            all: all.clone(),
            mine: Some(mine.clone()),
            flow,
        };
        slots.push(Slot {
            vm,
            index,
            kind,
            reading,
            mine,
        });
        let mut v = Verifier::new(vm, Some(shape.total), pattern.clone()).counting_skips();
        let mut release = release.clone();
        aborts.push(tasks.spawn(async move {
            if reading == Reading::Stuck && release.wait_for(|r| *r).await.is_err() {
                return (k, v, Err("internal error: release dropped".to_string()));
            }
            let pace = match reading {
                Reading::Limited(rate) => Some(rate),
                Reading::Fast | Reading::Stuck => None,
            };
            let r = verify_console(conn, wire, &mut v, pace, &progress).await;
            (k, v, r)
        }));
    }
    Readers {
        slots,
        tasks,
        aborts,
        flows,
        fast: fast_total,
    }
}

async fn stream_phase(
    what: &str,
    pid: u32,
    vms: Vec<TcpStream>,
    consoles: Vec<(RawConsole, Reading)>,
    shape: Shape,
    pattern: Arc<Pattern>,
) -> Result<Phase, String> {
    let all_bytes = consoles.len() as u64 * shape.total;
    let all = Arc::new(AtomicU64::new(0));
    let (release, release_rx) = watch::channel(false);
    let Readers {
        slots,
        tasks: mut readers,
        aborts,
        flows,
        fast: fast_total,
    } = spawn_readers(vms.len(), consoles, shape, &pattern, &all, &release_rx);
    let (gate, gate_rx) = watch::channel(false);
    let mut writers = JoinSet::new();
    for (vm, stream) in vms.into_iter().enumerate() {
        writers.spawn(send_pattern(
            stream,
            vm,
            shape,
            flows[vm].clone(),
            pattern.clone(),
            gate_rx.clone(),
        ));
    }
    eprintln!(
        "vspc-bench: {what}: streaming {} MiB to {} consoles ({fast_total} reading at full speed)",
        all_bytes >> 20,
        readers.len()
    );
    let me = std::process::id();
    let (cpu0, me0) = (cpu_s(pid)?, cpu_s(me)?);
    let t0 = Instant::now();
    let _ = gate.send(true);
    // The fast consoles' deadline, while it may still pass.
    let mut deadline = shape
        .deadline
        .map(|d| tokio::time::Instant::from_std(t0 + d));
    let mut fast_left = fast_total;
    let mut last = None::<Instant>;
    // (seconds, server CPU, bench CPU) when the last fast console was done.
    let mut measured = None;
    let mut ends: Vec<Option<ConsoleEnd>> = slots.iter().map(|_| None).collect();
    let mut kept = Vec::new(); // VM streams stay open until the phase ends
    let mut ticker =
        tokio::time::interval_at(tokio::time::Instant::now() + PROGRESS_EVERY, PROGRESS_EVERY);
    let (mut seen, mut since) = (0, Instant::now());
    loop {
        if fast_left == 0 && measured.is_none() {
            let secs = last.map_or(t0.elapsed(), |l| l - t0).as_secs_f64();
            measured = Some((secs, cpu_s(pid)?, cpu_s(me)?));
            deadline = None;
            // The stall clock starts now for the slow and stuck ones.
            since = Instant::now();
            let _ = release.send(true);
            if !readers.is_empty() {
                eprintln!(
                    "vspc-bench: {what}: fast consoles done; {} slow or stuck ones reading to \
                     the end",
                    readers.len()
                );
            }
        }
        if readers.is_empty() {
            break;
        }
        // A disabled branch's future is still built, so it needs some instant.
        let due = deadline.unwrap_or_else(tokio::time::Instant::now);
        tokio::select! {
            joined = readers.join_next() => match joined {
                Some(Ok((k, v, r))) => {
                    let slot = &slots[k];
                    if ends[k].is_some() {
                        // Given up on at the deadline just as it finished.
                        continue;
                    }
                    let (done_at, stream, error) = match r {
                        Ok((at, stream)) => (Some(at), Some(stream), None),
                        Err(e) => (None, None, Some(e)),
                    };
                    if slot.reading == Reading::Fast {
                        fast_left -= 1;
                        if let Some(at) = done_at {
                            last = Some(last.map_or(at, |l| l.max(at)));
                        }
                    }
                    ends[k] = Some(ConsoleEnd {
                        vm: slot.vm,
                        index: slot.index,
                        kind: slot.kind,
                        reading: slot.reading,
                        received: v.received,
                        skipped: v.skipped,
                        notices: v.notices,
                        error,
                        unfinished: false,
                        connected: false,
                        stream,
                    });
                }
                // A reader given up on at the deadline.
                Some(Err(e)) if e.is_cancelled() => {}
                Some(Err(e)) => return Err(format!("{what}: a console task failed: {e}")),
                None => {}
            },
            Some(joined) = writers.join_next() => match joined {
                Ok(Ok(stream)) => kept.push(stream),
                Ok(Err(e)) => return Err(format!("{what}: {e}")),
                Err(e) => return Err(format!("{what}: a VM task failed: {e}")),
            },
            _ = tokio::time::sleep_until(due), if deadline.is_some() => {
                deadline = None;
                let mut late = 0;
                for (k, slot) in slots.iter().enumerate() {
                    if slot.reading == Reading::Fast && ends[k].is_none() {
                        aborts[k].abort();
                        ends[k] = Some(slot.unfinished(shape));
                        fast_left -= 1;
                        late += 1;
                    }
                }
                if late > 0 {
                    // The phase took this long.
                    last = Some(Instant::now());
                }
                eprintln!(
                    "vspc-bench: {what}: {late} consoles had not received their last byte \
                     {:.1} s after the first was sent; giving up on them",
                    shape.deadline.unwrap_or_default().as_secs_f64()
                );
            }
            _ = ticker.tick() => {
                let now = all.load(Ordering::Relaxed);
                eprintln!(
                    "vspc-bench:   {what}: {} / {} MiB verified, {} consoles to go",
                    now >> 20, all_bytes >> 20, readers.len()
                );
                if now != seen {
                    (seen, since) = (now, Instant::now());
                } else if deadline.is_none() && since.elapsed() > shape.stall {
                    eprintln!(
                        "vspc-bench: {what}: no byte verified for {} s; {} consoles not done",
                        shape.stall.as_secs(),
                        readers.len()
                    );
                    readers.abort_all();
                    break;
                }
            }
        }
    }
    let (secs, cpu1, me1) = match measured {
        Some(m) => m,
        None => (t0.elapsed().as_secs_f64(), cpu_s(pid)?, cpu_s(me)?),
    };
    // Consoles still reading had stalled.
    let mut consoles: Vec<ConsoleEnd> = ends
        .into_iter()
        .zip(&slots)
        .map(|(end, slot)| end.unwrap_or_else(|| slot.unfinished(shape)))
        .collect();
    for c in &mut consoles {
        still_connected(c, shape.total);
    }
    // What the fast consoles received: bytes the daemon skipped (a failure
    // in itself) must not count as throughput.
    let delivered: u64 = consoles
        .iter()
        .filter(|c| c.reading == Reading::Fast)
        .map(|c| c.received)
        .sum();
    let gib = delivered as f64 / f64::from(1u32 << 30);
    Ok(Phase {
        secs,
        mib_s: delivered as f64 / f64::from(1u32 << 20) / secs.max(1e-9),
        cpu_s: cpu1 - cpu0,
        cpu_s_per_gib: (cpu1 - cpu0) / gib.max(1e-12),
        rss_peak_kib: peak_rss_kib(pid)?,
        bench_cpu_s: me1 - me0,
        consoles,
    })
}

/// After a console's last byte: is its connection still open, with nothing
/// more on it? (Then closes it.)
fn still_connected(c: &mut ConsoleEnd, total: u64) {
    let Some(stream) = c.stream.take() else {
        return;
    };
    let mut buf = [0u8; SHOW];
    match stream.try_read(&mut buf) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => c.connected = true,
        Ok(0) | Err(_) => c.connected = false,
        Ok(n) => {
            c.connected = true;
            c.error = Some(format!(
                "{n} or more bytes after the {total} its VM sent: {:?}",
                String::from_utf8_lossy(&buf[..n])
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notice(n: u64) -> Vec<u8> {
        let mut b = NOTICE_HEAD.to_vec();
        b.extend_from_slice(n.to_string().as_bytes());
        b.extend_from_slice(NOTICE_TAIL);
        b
    }

    fn stream(p: &Pattern, from: u64, len: usize) -> Vec<u8> {
        p.piece(0, from, len).to_vec()
    }

    /// Feed `bytes` in runs of `run` bytes.
    fn feed(v: &mut Verifier, bytes: &[u8], run: usize) -> Result<(), String> {
        bytes.chunks(run).try_for_each(|c| v.data(c))
    }

    #[test]
    fn all_bytes_go_escaped_and_verify_after_decoding() {
        let p = Arc::new(Pattern::of(PatternKind::AllBytes));
        let plain = p.piece(3, 1000, 64 * 1024);
        let iacs = plain.iter().filter(|&&b| b == 0xff).count();
        // About one in 256, and every value is there.
        assert!((128..=384).contains(&iacs), "{iacs} 0xFF bytes in 64 KiB");
        assert!((0..=255u8).all(|b| plain.contains(&b)));
        let mut scratch = Vec::new();
        let wire = p.wire(3, 1000, 64 * 1024, &mut scratch).to_vec();
        assert_eq!(wire.len(), plain.len() + iacs);
        // Decoded as a console decodes it, split anywhere.
        for run in [1, 2, 255, 4096] {
            let mut v = Verifier::new(3, Some(1000 + plain.len() as u64), p.clone());
            v.got = 1000;
            let mut decoder = vspc_codec::wire::Decoder::default();
            for piece in wire.chunks(run) {
                let mut bad = Ok(());
                decoder
                    .decode(piece, |ev| {
                        if let (Event::Data(d), Ok(())) = (ev, &bad) {
                            bad = v.data(d);
                        }
                    })
                    .expect("decodes");
                bad.unwrap_or_else(|e| panic!("run {run}: {e}"));
            }
            assert!(v.done(), "run {run}");
            assert_eq!(v.received, plain.len() as u64);
        }
        // The default pattern has no 0xFF and goes out as it is.
        let p = Pattern::new();
        assert!(!p.piece(0, 0, PERIOD).contains(&0xff));
        let mut scratch = Vec::new();
        assert_eq!(p.wire(0, 5, 100, &mut scratch), p.piece(0, 5, 100));
    }

    /// Feed `bytes` off the wire in runs of `run` bytes; no answers may
    /// come back.
    fn feed_wire(w: &mut Wire, v: &mut Verifier, bytes: &[u8], run: usize) -> Result<(), String> {
        let mut replies = Vec::new();
        bytes
            .chunks(run)
            .try_for_each(|c| w.feed(c, v, &mut replies))?;
        assert!(replies.is_empty(), "a raw console answered {replies:?}");
        Ok(())
    }

    #[test]
    fn a_silent_raw_console_wants_the_offer_then_the_bytes_as_they_are() {
        use crate::kinds::TELNET_OFFER;
        let p = Arc::new(Pattern::of(PatternKind::AllBytes));
        let data = p.piece(2, 0, 5000).to_vec();
        assert!(data.contains(&0xff), "the test needs 0xFF in the data");
        let raw = WireKind::Raw(TELNET_OFFER);
        let good = [TELNET_OFFER, &data].concat();
        for run in [1, 2, 14, 15, 16, 4096, 1 << 20] {
            let mut v = Verifier::new(2, Some(5000), p.clone());
            let mut w = Wire::new(raw, Decoder::default());
            feed_wire(&mut w, &mut v, &good, run).unwrap_or_else(|e| panic!("run {run}: {e}"));
            assert!(v.done() && v.received == 5000, "run {run}");
        }
        let check = |bytes: &[u8]| {
            let mut v = Verifier::new(2, Some(5000), p.clone());
            let mut w = Wire::new(raw, Decoder::default());
            feed_wire(&mut w, &mut v, bytes, 7)
        };
        // No offer: the output straight away.
        let e = check(&data).unwrap_err();
        assert!(
            e.contains("15-byte telnet offer") && e.contains("byte 0 "),
            "{e}"
        );
        // A wrong byte in the offer.
        let mut bad = good.clone();
        bad[4] = 0xfc; // WONT instead of WILL SGA
        let e = check(&bad).unwrap_err();
        assert!(e.contains("byte 4 of the stream is 0xfc, not 0xfb"), "{e}");
        // A wrong byte in the data.
        let mut bad = good.clone();
        bad[TELNET_OFFER.len() + 1000] ^= 1;
        let e = check(&bad).unwrap_err();
        assert!(e.contains("byte 1000 differs"), "{e}");
        // 0xFF doubled, as for a telnet client, is wrong for a raw one.
        let e = check(&[TELNET_OFFER, &encode::escaped(&data)].concat()).unwrap_err();
        assert!(e.contains("differs"), "{e}");
        // The offer twice.
        let e = check(&[TELNET_OFFER, TELNET_OFFER, &data].concat()).unwrap_err();
        assert!(e.contains("byte 0 differs"), "{e}");
        // With --console-protocol raw there is no offer.
        let mut v = Verifier::new(2, Some(5000), p.clone());
        let mut w = Wire::new(WireKind::Raw(b""), Decoder::default());
        feed_wire(&mut w, &mut v, &data, 100).expect("raw without an offer");
        assert!(v.done());
        let mut w = Wire::new(raw, Decoder::default());
        let mut v = Verifier::new(2, Some(5000), p.clone());
        feed_wire(&mut w, &mut v, &TELNET_OFFER[..9], 4).expect("a start of the offer");
        assert!(w
            .unfinished_prefix()
            .is_some_and(|s| s.contains("after 9 of")));
    }

    #[test]
    fn a_silent_telnet_console_answers_the_offer_and_decodes() {
        use crate::kinds::TELNET_OFFER;
        let p = Arc::new(Pattern::of(PatternKind::AllBytes));
        let data = p.piece(1, 0, 3000).to_vec();
        let mut v = Verifier::new(1, Some(3000), p.clone());
        let mut w = Wire::new(WireKind::TelnetAnswering, Decoder::default());
        let mut replies = Vec::new();
        let stream = [TELNET_OFFER, &encode::escaped(&data)].concat();
        for c in stream.chunks(5) {
            w.feed(c, &mut v, &mut replies)
                .expect("decodes and verifies");
        }
        assert!(v.done());
        // DO ECHO, DO SGA, DO BINARY, WILL BINARY, WILL SGA: as the
        // simulator's console answers.
        assert_eq!(
            replies,
            b"\xff\xfd\x01\xff\xfd\x03\xff\xfd\x00\xff\xfb\x00\xff\xfb\x03"
        );
    }

    /// A connected pair of loopback sockets: (ours, the far end).
    async fn pair(listener: &tokio::net::TcpListener) -> (TcpStream, TcpStream) {
        let addr = listener.local_addr().expect("listener address");
        let (ours, theirs) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (ours.expect("connect"), theirs.expect("accept").0)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_console_short_of_its_last_byte_at_the_deadline_is_unfinished() {
        let port = vspc_testkit::free_port();
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("listen");
        let (vm, mut vm_far) = pair(&listener).await;
        let (whole, mut whole_far) = pair(&listener).await;
        let (short, mut short_far) = pair(&listener).await;
        // The "server": everything to one console, the first 1000 bytes
        // to the other, which then waits forever, connected.
        let server = tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            let mut sent_short = 0usize;
            loop {
                let n = match vm_far.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if whole_far.write_all(&buf[..n]).await.is_err() {
                    break;
                }
                let m = n.min(1000 - sent_short);
                if m > 0 && short_far.write_all(&buf[..m]).await.is_ok() {
                    sent_short += m;
                }
            }
            (whole_far, short_far)
        });
        let raw = |stream| RawConn {
            stream,
            data: Vec::new(),
            decoder: Decoder::default(),
            events: Vec::new(),
            binary: false,
        };
        let console = |index, conn| RawConsole {
            vm: 0,
            index,
            kind: Some(ConsoleKind::SilentRaw),
            wire: WireKind::Raw(b""),
            conn,
        };
        let shape = Shape {
            total: 100_000,
            chunk: 4096,
            window: 0,
            stall: Duration::from_secs(30),
            deadline: Some(Duration::from_millis(300)),
        };
        let started = Instant::now();
        let phase = stream_phase(
            "test",
            std::process::id(),
            vec![vm],
            vec![
                (console(0, raw(whole)), Reading::Fast),
                (console(1, raw(short)), Reading::Fast),
            ],
            shape,
            Arc::new(Pattern::new()),
        )
        .await
        .expect("the phase runs");
        assert!(started.elapsed() < Duration::from_secs(10), "no stall wait");
        server.abort();
        let [done, late] = &phase.consoles[..] else {
            panic!("two consoles");
        };
        assert!(done.exact(), "{:?}", done.error);
        assert!(late.unfinished && !late.exact());
        assert_eq!(late.received, 1000);
        assert!(phase.check_wrong("test").is_none());
        let line = phase
            .check_unfinished("test", "at the deadline")
            .expect("a failure");
        assert_eq!(
            line,
            "test: 1 of 2 consoles (silent-raw 1) had not received their last byte at the \
             deadline: console 1 of VM 0 (sim-vm-00001, silent-raw) got 1000 of 100000 bytes \
             (0 skipped)"
        );
        // The phase took until the deadline.
        assert!(phase.secs >= 0.3, "{}", phase.secs);
    }

    #[test]
    fn parses_notices() {
        let n = notice(1234);
        assert_eq!(parse_notice(&n), Notice::Complete(1234));
        for i in 0..n.len() {
            assert_eq!(parse_notice(&n[..i]), Notice::Partial, "{i}");
        }
        assert_eq!(parse_notice(b"\r\n[vspc: skipped x"), Notice::Invalid);
        assert_eq!(parse_notice(b"\r\n[vspc: skipped  bytes"), Notice::Invalid);
        assert_eq!(parse_notice(b"\r\nvspc: this console"), Notice::Invalid);
    }

    #[test]
    fn a_notice_anywhere_is_counted_and_the_stream_goes_on() {
        let p = Arc::new(Pattern::new());
        for run in [1, 7, 17, 1000, 1 << 20] {
            let mut bytes = stream(&p, 0, 5000);
            bytes.extend(notice(3000));
            bytes.extend(stream(&p, 8000, 2000));
            bytes.extend(notice(10));
            bytes.extend(stream(&p, 10_010, 90));
            let mut v = Verifier::new(0, Some(10_100), p.clone()).counting_skips();
            feed(&mut v, &bytes, run).unwrap_or_else(|e| panic!("run {run}: {e}"));
            assert!(v.done(), "run {run}");
            assert_eq!((v.received, v.skipped, v.notices), (7090, 3010, 2));
        }
    }

    #[test]
    fn a_notice_whose_first_bytes_look_like_pattern_is_found() {
        let p = Arc::new(Pattern::new());
        // A place where the pattern has "\r", and one with "\r\n": the
        // notice's first bytes pass for pattern there.
        for head in [&b"\r"[..], b"\r\n"] {
            let at = (0..PERIOD as u64 - 2)
                .find(|&i| p.piece(0, i, head.len()) == head)
                .expect("the pattern has it somewhere");
            let total = at + 500;
            let mut bytes = stream(&p, 0, at as usize);
            bytes.extend(notice(100));
            bytes.extend(stream(&p, at + 100, 400));
            for run in [1, 3, at as usize + 1, 4096] {
                let mut v = Verifier::new(0, Some(total), p.clone()).counting_skips();
                feed(&mut v, &bytes, run).unwrap_or_else(|e| panic!("{head:?} run {run}: {e}"));
                assert!(v.done());
                assert_eq!(
                    (v.skipped, v.received),
                    (100, total - 100),
                    "{head:?} run {run}"
                );
            }
        }
    }

    #[test]
    fn wrong_bytes_and_false_counts_are_errors() {
        let p = Arc::new(Pattern::new());
        let mut bytes = stream(&p, 0, 100);
        bytes.extend(notice(50));
        bytes.extend(stream(&p, 151, 49)); // one byte off
        let mut v = Verifier::new(0, Some(200), p.clone()).counting_skips();
        let e = feed(&mut v, &bytes, 64).unwrap_err();
        assert!(e.contains("differs"), "{e}");

        let mut v = Verifier::new(0, Some(200), p.clone());
        let e = feed(&mut v, &[stream(&p, 0, 100), notice(100)].concat(), 64).unwrap_err();
        assert!(e.contains("skipped 100 bytes"), "{e}");

        let mut v = Verifier::new(0, Some(200), p.clone()).counting_skips();
        let e = feed(&mut v, &[stream(&p, 0, 100), notice(101)].concat(), 64).unwrap_err();
        assert!(e.contains("sent only 100 more"), "{e}");

        let mut v = Verifier::new(0, Some(200), p.clone()).counting_skips();
        let gone = b"\r\nvspc: this console fell too far behind".to_vec();
        let e = feed(&mut v, &[stream(&p, 0, 100), gone].concat(), 64).unwrap_err();
        assert!(
            e.contains("not a skip notice") || e.contains("differs"),
            "{e}"
        );
    }
}
