//! Flow control end to end: every byte to every console that reads and to
//! every transcript, against the real `vspc` binary.
//!
//! - fast consoles get whole bursts written at full speed, alone, ten at a
//!   time, and beside a console that never reads (which must not slow them);
//! - a console that reads slower than the VM writes stays connected, skips
//!   the oldest output past its queue and is told in-band how much;
//! - a console whose socket takes nothing for the stall timeout is told why
//!   (when it can still take that) and disconnected;
//! - the Logging backend keeps every byte of a flood even with a tiny
//!   backend budget: the daemon stops reading the VMs instead of dropping;
//! - consoles are told apart by their first byte: raw clients get raw bytes
//!   both ways and their first input at once; silent ones are offered
//!   telnet; `--console-protocol` and the admin port's `connect … raw`
//!   override the guess;
//! - pacing by the fastest reader: consoles that never speak first (as
//!   `nc`, `socat -u` and `telnet HOST PORT` do) get every byte of a burst
//!   that starts while they are still being told apart, alone, beside a
//!   stuck console, and a hundred VMs at a time; a lone slow console is
//!   waited for, never skipped; a console that takes (almost) nothing
//!   holds its VM no longer than the stall timeout; a VM whose consoles
//!   hold it back still answers VMOTION-BEGIN at once.
//!
//! The VMs write with [`SimVm::into_raw`] streams, so nothing in the test
//! process throttles them, and the consoles read with plain sockets.

use std::time::{Duration, Instant};

use crate::common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use vspc_codec::vmware::Msg;
use vspc_testkit::sim::{Identity, SimVm};

/// The pattern's period: 251 is prime and below 255, so the pattern has no
/// 0xFF (the VM's raw stream needs no escaping) and never lines up with a
/// power-of-two chunk.
const PERIOD: usize = 251;

/// The pattern's bytes from `offset` on, `len` of them.
fn pattern(offset: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((offset + i as u64) % PERIOD as u64) as u8)
        .collect()
}

/// One period-aligned block of the pattern, long enough to compare any
/// read against with one slice comparison.
fn reference() -> Vec<u8> {
    pattern(0, 256 * 1024 + PERIOD)
}

/// True if `got` is the pattern starting at `offset`.
fn matches(reference: &[u8], offset: u64, got: &[u8]) -> bool {
    let start = (offset % PERIOD as u64) as usize;
    got.chunks(256 * 1024).enumerate().all(|(k, piece)| {
        let s = (start + k * 256 * 1024) % PERIOD;
        &reference[s..s + piece.len()] == piece
    })
}

/// A VM identified with the daemon whose serial output we write raw, at
/// full speed.
async fn raw_vm(d: &Daemon, index: u32) -> (TcpStream, u16) {
    let id = Identity::numbered(index);
    let (vm, port) = vm_up(d, &id).await;
    let raw = vm
        .into_raw::<TcpStream>()
        .await
        .expect("take the VM's stream back");
    assert!(raw.data.is_empty(), "console input before any console");
    (raw.stream, port)
}

/// Write `total` bytes of the pattern as fast as the socket takes them.
fn spawn_writer(mut vm: TcpStream, total: u64) -> tokio::task::JoinHandle<(TcpStream, Duration)> {
    tokio::spawn(async move {
        let t0 = Instant::now();
        let block = reference();
        let mut sent = 0u64;
        while sent < total {
            let start = (sent % PERIOD as u64) as usize;
            let n = (total - sent).min(64 * 1024) as usize;
            vm.write_all(&block[start..start + n])
                .await
                .expect("VM write");
            sent += n as u64;
        }
        (vm, t0.elapsed())
    })
}

/// Close a VM's raw stream as ESXi does: send FIN, then read what the
/// daemon still sends until it closes too. Dropping a socket with unread
/// bytes in it (the daemon's late refusal of an option, say) makes the
/// kernel send RST, and RST discards whatever the daemon had not read yet:
/// output that was never the daemon's to lose.
async fn hang_up(mut vm: TcpStream) {
    let _ = vm.shutdown().await;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), vm.read_to_end(&mut rest)).await;
}

/// What a reading console saw.
struct Read {
    /// Kept open, so the console stays attached until the test is done.
    _console: TcpStream,
    /// Data bytes received, in order, plus bytes the daemon said it
    /// skipped.
    bytes: u64,
    /// Bytes the daemon said it skipped, in how many notices.
    skipped: u64,
    notices: u64,
    /// When the first `mark` bytes had arrived.
    at_mark: Option<Duration>,
    done: Duration,
}

/// Checks a console's stream against the pattern, notices included: data
/// must be the pattern in order, and a notice moves the expected offset on
/// by the bytes it says were skipped.
struct Account {
    block: Vec<u8>,
    /// Pattern offset reached: data received plus bytes skipped.
    offset: u64,
    skipped: u64,
    notices: u64,
    /// Received but not yet accounted for (the start of a notice, maybe).
    pending: Vec<u8>,
}

impl Account {
    fn new() -> Account {
        Account {
            block: reference(),
            offset: 0,
            skipped: 0,
            notices: 0,
            pending: Vec::new(),
        }
    }

    fn feed(&mut self, data: &[u8]) -> Result<(), String> {
        self.pending.extend_from_slice(data);
        loop {
            // The pattern never has CR LF, so where it stops matching is
            // where a notice starts, if anything does.
            let at = first_mismatch(&self.block, self.offset, &self.pending);
            self.offset += at as u64;
            self.pending.drain(..at);
            if self.pending.is_empty() {
                return Ok(());
            }
            let head = NOTICE_HEAD.len().min(self.pending.len());
            if self.pending[..head] != NOTICE_HEAD[..head] {
                return Err(format!("wrong bytes at {}", self.offset));
            }
            let Some(end) = find(&self.pending, NOTICE_TAIL) else {
                return Ok(());
            };
            let count = std::str::from_utf8(&self.pending[NOTICE_HEAD.len()..end])
                .ok()
                .and_then(|t| t.parse::<u64>().ok())
                .filter(|&n| n > 0)
                .ok_or_else(|| format!("a notice without a byte count at {}", self.offset))?;
            self.offset += count;
            self.skipped += count;
            self.notices += 1;
            self.pending.drain(..end + NOTICE_TAIL.len());
        }
    }
}

/// How many bytes of `got` are the pattern from `offset` on (compared a
/// block at a time, so a debug build keeps up with a fast console).
fn first_mismatch(reference: &[u8], offset: u64, got: &[u8]) -> usize {
    let mut done = 0;
    for piece in got.chunks(4096) {
        if matches(reference, offset + done as u64, piece) {
            done += piece.len();
            continue;
        }
        let start = (offset + done as u64) as usize % PERIOD;
        let same = piece
            .iter()
            .zip(&reference[start..])
            .take_while(|(a, b)| a == b)
            .count();
        return done + same;
    }
    done
}

/// Read `total` pattern bytes from `c`, checking each against the pattern
/// (notices included, see [`Account`]); records when `mark` bytes had
/// arrived.
fn spawn_reader(
    c: TcpStream,
    total: u64,
    mark: u64,
    limit: Duration,
) -> tokio::task::JoinHandle<Result<Read, String>> {
    spawn_reader_after(c, b"", b"", total, mark, limit)
}

/// [`spawn_reader`] for a console whose stream starts with `prefix` (the
/// telnet offer a silent client gets); once it has that, it sends `answer`
/// (nothing for a raw client, the telnet answers for a telnet one).
fn spawn_reader_after(
    mut c: TcpStream,
    prefix: &'static [u8],
    answer: &'static [u8],
    total: u64,
    mark: u64,
    limit: Duration,
) -> tokio::task::JoinHandle<Result<Read, String>> {
    tokio::spawn(async move {
        let t0 = Instant::now();
        if !prefix.is_empty() {
            let mut head = vec![0u8; prefix.len()];
            match tokio::time::timeout(limit, c.read_exact(&mut head)).await {
                Err(_) => return Err("no telnet offer".into()),
                Ok(Err(e)) => return Err(format!("reading the offer: {e}")),
                Ok(Ok(_)) if head != prefix => {
                    return Err(format!("the stream starts with {head:x?}, not the offer"))
                }
                Ok(Ok(_)) => {}
            }
            if !answer.is_empty() {
                c.write_all(answer)
                    .await
                    .map_err(|e| format!("answering the offer: {e}"))?;
            }
        }
        let mut account = Account::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut at_mark = None;
        while account.offset < total {
            let got = account.offset;
            let n = match tokio::time::timeout(limit, c.read(&mut buf)).await {
                Err(_) => return Err(format!("stalled at {got} of {total} bytes")),
                Ok(Err(e)) => return Err(format!("read failed at {got}: {e}")),
                Ok(Ok(0)) => return Err(format!("closed at {got} of {total} bytes")),
                Ok(Ok(n)) => n,
            };
            account.feed(&buf[..n])?;
            if account.offset > total {
                return Err(format!("more than {total} bytes"));
            }
            if at_mark.is_none() && account.offset >= mark {
                at_mark = Some(t0.elapsed());
            }
        }
        Ok(Read {
            _console: c,
            bytes: account.offset,
            skipped: account.skipped,
            notices: account.notices,
            at_mark,
            done: t0.elapsed(),
        })
    })
}

/// A console connection whose kernel receive buffer is `rcvbuf` bytes, so
/// that it stops taking data soon after it stops reading.
async fn small_console(d: &Daemon, port: u16, rcvbuf: u32) -> TcpStream {
    let s = TcpSocket::new_v4().expect("socket");
    s.set_recv_buffer_size(rcvbuf).expect("SO_RCVBUF");
    s.connect(d.console(port)).await.expect("connect console")
}

const MIB: u64 = 1 << 20;

/// A burst of `total` bytes to `fast` reading consoles, with `stuck`
/// consoles attached that never read. Every fast console must get every
/// byte; returns what each saw.
async fn burst(total: u64, fast: usize, stuck: usize, index: u32) -> (Vec<Read>, Duration) {
    let d = Daemon::start(&["--console-protocol", "raw"]);
    let (vm, port) = raw_vm(&d, index).await;
    let mut readers = Vec::new();
    for _ in 0..fast {
        let c = TcpStream::connect(d.console(port)).await.expect("console");
        readers.push(c);
    }
    let mut stuck_ones = Vec::new();
    for _ in 0..stuck {
        stuck_ones.push(small_console(&d, port, 4096).await);
    }
    wait_consoles(&d, &Identity::numbered(index).name, fast + stuck).await;
    let readers: Vec<_> = readers
        .into_iter()
        .map(|c| spawn_reader(c, total, 10 * MIB, Duration::from_secs(10)))
        .collect();
    let writer = spawn_writer(vm, total);
    let mut seen = Vec::new();
    for (i, r) in readers.into_iter().enumerate() {
        match r.await.expect("reader task") {
            Ok(read) => seen.push(read),
            Err(e) => panic!("fast console {i}: {e}\n{}", d.log()),
        }
    }
    let (_vm, wrote) = writer.await.expect("writer task");
    // The consoles that never read are still attached (the stall timeout,
    // 30 s by default, has not passed): lagging is not a reason to go.
    if stuck > 0 {
        wait_consoles(&d, &Identity::numbered(index).name, fast + stuck).await;
    }
    drop(stuck_ones);
    (seen, wrote)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_reaches_one_fast_console_whole() {
    let (seen, wrote) = burst(64 * MIB, 1, 0, 901).await;
    assert_eq!(seen[0].bytes, 64 * MIB);
    assert_eq!(seen[0].skipped, 0, "a lone console skipped output");
    eprintln!(
        "64 MiB to one console in {:?} (VM done writing after {wrote:?})",
        seen[0].done
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_reaches_ten_fast_consoles_whole_beside_a_stuck_one() {
    let (seen, wrote) = burst(64 * MIB, 10, 1, 902).await;
    fastest_whole(&seen);
    for (i, r) in seen.iter().enumerate() {
        assert_eq!(r.bytes, 64 * MIB, "console {i}");
        // The stuck console costs the others at most one bounded wait.
        let first_10 = r.at_mark.expect("10 MiB mark");
        assert!(
            first_10 < Duration::from_secs(5),
            "console {i} needed {first_10:?} for its first 10 MiB"
        );
    }
    eprintln!(
        "64 MiB to ten consoles beside a stuck one: last done after {:?}, VM done after {wrote:?}",
        seen.iter().map(|r| r.done).max()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_reaches_ten_fast_consoles_whole() {
    let (seen, _) = burst(64 * MIB, 10, 0, 903).await;
    assert!(seen.iter().all(|r| r.bytes == 64 * MIB));
    fastest_whole(&seen);
}

/// Consoles that read as fast as they can keep up with the VM on average,
/// even as the test process's readers take turns on two shared cores: each
/// gets every byte, none is told of a skip.
fn fastest_whole(seen: &[Read]) {
    for (i, r) in seen.iter().enumerate() {
        assert_eq!(
            (r.skipped, r.notices),
            (0, 0),
            "fast console {i} skipped output"
        );
    }
}

/// The in-band line a console gets where output was skipped.
const NOTICE_HEAD: &[u8] = b"\r\n[vspc: skipped ";
const NOTICE_TAIL: &[u8] = b" bytes of output; this console fell behind]\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_console_stays_skips_the_oldest_and_is_told_how_much() {
    const TOTAL: u64 = 24 * MIB;
    let d = Daemon::start(&["--console-protocol", "raw", "--console-queue", "65536"]);
    let (vm, port) = raw_vm(&d, 904).await;
    let fast = TcpStream::connect(d.console(port)).await.expect("console");
    let mut slow = small_console(&d, port, 16 * 1024).await;
    wait_consoles(&d, &Identity::numbered(904).name, 2).await;
    let fast = spawn_reader(fast, TOTAL, TOTAL, Duration::from_secs(10));
    let writer = spawn_writer(vm, TOTAL);

    // Read slowly (about 100 KiB/s, far behind the fast console) and
    // account for every byte: pattern data in order, with notices standing
    // for what was skipped.
    let mut account = Account::new();
    let mut buf = vec![0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(60);
    while account.offset < TOTAL {
        let offset = account.offset;
        assert!(
            Instant::now() < deadline,
            "slow console at {offset} of {TOTAL}"
        );
        let n = tokio::time::timeout(Duration::from_secs(10), slow.read(&mut buf))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "the slow console was starved at {offset} of {TOTAL} ({} notices)\n{}",
                    account.notices,
                    d.log()
                )
            })
            .expect("slow console read");
        assert!(
            n > 0,
            "the slow console was disconnected at {offset}\n{}",
            d.log()
        );
        account.feed(&buf[..n]).unwrap_or_else(|e| panic!("{e}"));
        // Slow until the VM is done (by then the console has skipped, or
        // the VM waited for it); the rest is read at full speed, only to
        // account for every byte sooner.
        if !writer.is_finished() {
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
    }
    let (offset, notices) = (account.offset, account.notices);
    assert_eq!(offset, TOTAL, "data plus skipped bytes must add up");
    assert!(notices > 0, "the slow console skipped nothing");
    let fast = fast
        .await
        .expect("fast task")
        .expect("the fast console got everything");
    let (_vm, wrote) = writer.await.expect("writer");
    eprintln!(
        "slow console: {notices} notices; fast console done in {:?}; VM wrote 24 MiB in {wrote:?}",
        fast.done
    );
    // The VM waited for the slow console only briefly.
    assert!(
        wrote < Duration::from_secs(10),
        "the VM was held back: {wrote:?}"
    );
    // Still attached after the burst, and live output follows.
    wait_consoles(&d, &Identity::numbered(904).name, 2).await;
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_console_is_told_and_dropped_after_the_stall_timeout() {
    const TOTAL: u64 = 16 * MIB;
    let d = Daemon::start(&["--console-protocol", "raw", "--console-stall-timeout", "2"]);
    let (vm, port) = raw_vm(&d, 905).await;
    let fast = TcpStream::connect(d.console(port)).await.expect("console");
    let mut stuck = small_console(&d, port, 4096).await;
    wait_consoles(&d, &Identity::numbered(905).name, 2).await;
    let t0 = Instant::now();
    let fast = spawn_reader(fast, TOTAL, 10 * MIB, Duration::from_secs(10));
    let writer = spawn_writer(vm, TOTAL);
    let fast = fast
        .await
        .expect("fast task")
        .expect("the fast console got everything");
    let (_vm, wrote) = writer.await.expect("writer");
    assert!(
        fast.at_mark.expect("10 MiB mark") < Duration::from_secs(5),
        "the stuck console slowed the fast one"
    );
    assert!(
        wrote < Duration::from_secs(5),
        "the stuck console slowed the VM: {wrote:?}"
    );
    // Stuck from the start: given up on two seconds later. Reading now,
    // inside the grace it has for the notice, it gets what its socket held
    // and then the reason.
    tokio::time::sleep_until((t0 + Duration::from_millis(2600)).into()).await;
    let mut got = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), stuck.read_to_end(&mut got)).await;
    assert!(closed.is_ok(), "the stuck console was never closed");
    let tail = String::from_utf8_lossy(&got[got.len().saturating_sub(200)..]).into_owned();
    assert!(
        tail.ends_with(
            "vspc: this console took no output for 2 s while output waited; disconnecting it.\r\n"
        ),
        "no reason at the end: {tail:?}\n{}",
        d.log()
    );
    assert!((got.len() as u64) < TOTAL);
    assert!(d
        .log()
        .contains("disconnecting a console that took no output"));
    wait_consoles(&d, &Identity::numbered(905).name, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logging_keeps_every_byte_of_a_flood_with_a_tiny_budget() {
    const VMS: u32 = 12;
    const EACH: u64 = 4 * MIB;
    let dir = tempfile::tempdir().expect("tempdir");
    let logdir = dir.path().display().to_string();
    let d = Daemon::start(&[
        "--backend",
        "Logging",
        "-l",
        &logdir,
        "--backend-queue",
        "65536",
    ]);
    let mut writers = Vec::new();
    for i in 0..VMS {
        let (vm, _) = raw_vm(&d, 910 + i).await;
        writers.push(spawn_writer(vm, EACH));
    }
    for w in writers {
        let (vm, _) = w.await.expect("writer");
        hang_up(vm).await;
    }
    // Every transcript fills up to the last byte (the backend flushes when
    // its queue runs dry, and again as each VM disconnects).
    let block = reference();
    for i in 0..VMS {
        let path = dir
            .path()
            .join(format!("{}.log", Identity::numbered(910 + i).name));
        eventually(Duration::from_secs(20), || file_len(&path) >= EACH).await;
        let got = std::fs::read(&path).unwrap_or_default();
        assert_eq!(
            got.len() as u64,
            EACH,
            "{} is short\n{}",
            path.display(),
            d.log()
        );
        assert!(
            matches(&block, 0, &got),
            "{} has wrong bytes",
            path.display()
        );
    }
    assert!(
        d.log().contains("pausing the VMs that write"),
        "the budget never made a VM wait, so this test showed nothing\n{}",
        d.log()
    );
    assert!(!d.log().contains("being dropped"));
}

#[tokio::test]
async fn a_raw_client_gets_raw_bytes_both_ways_and_its_first_input_at_once() {
    let d = Daemon::start(&[]);
    let id = Identity::numbered(920);
    let (vm, port) = vm_up(&d, &id).await;
    let mut c = TcpStream::connect(d.console(port)).await.expect("console");
    c.set_nodelay(true).expect("nodelay");
    let typed = every_byte(4);
    let t0 = Instant::now();
    c.write_all(&typed).await.expect("type");
    let got = vm.read_exact_data(typed.len(), T).await.expect("VM input");
    let first = t0.elapsed();
    assert_eq!(got, typed, "the VM got altered input");
    assert!(
        first < Duration::from_millis(250),
        "first input took {first:?}"
    );
    let out = every_byte(4);
    vm.send(&out).await.expect("VM output");
    let mut got = vec![0u8; out.len()];
    tokio::time::timeout(T, c.read_exact(&mut got))
        .await
        .expect("in time")
        .expect("read");
    assert_eq!(got, out, "the raw client got altered output");
    // Nothing else: no negotiation, no doubled 0xFF.
    let mut extra = [0u8; 16];
    let more = tokio::time::timeout(Duration::from_millis(1500), c.read(&mut extra)).await;
    assert!(more.is_err(), "extra bytes after the data: {more:?}");
    assert!(vm.recv_data(Duration::from_millis(100)).await.is_empty());
}

/// The opening a console gets when it is offered telnet.
const OPENING: &[u8] = b"\xff\xfb\x01\xff\xfb\x03\xff\xfb\x00\xff\xfd\x00\xff\xfd\x03";

#[tokio::test]
async fn a_silent_client_is_offered_telnet_then_served_raw() {
    let d = Daemon::start(&[]);
    let id = Identity::numbered(921);
    let (vm, port) = vm_up(&d, &id).await;
    let mut c = TcpStream::connect(d.console(port)).await.expect("console");
    wait_consoles(&d, &id.name, 1).await;
    let t0 = Instant::now();
    vm.send(b"abc\xff\r\0").await.expect("VM output");
    let mut got = vec![0u8; OPENING.len() + 6];
    tokio::time::timeout(T, c.read_exact(&mut got))
        .await
        .expect("in time")
        .expect("read");
    let waited = t0.elapsed();
    assert_eq!(&got[..OPENING.len()], OPENING, "the offer");
    assert_eq!(
        &got[OPENING.len()..],
        b"abc\xff\r\0",
        "output after no answer"
    );
    assert!(
        waited >= Duration::from_millis(1000),
        "output went out raw before the answer could come ({waited:?})"
    );
    c.write_all(b"q\xffz\r\n").await.expect("type");
    assert_eq!(
        vm.read_exact_data(5, T).await.expect("input"),
        b"q\xffz\r\n"
    );
}

#[tokio::test]
async fn forced_raw_consoles_never_see_negotiation() {
    let d = Daemon::start(&["--console-protocol", "raw"]);
    let id = Identity::numbered(922);
    let (vm, port) = vm_up(&d, &id).await;
    let mut c = TcpStream::connect(d.console(port)).await.expect("console");
    wait_consoles(&d, &id.name, 1).await;
    let out = every_byte(2);
    vm.send(&out).await.expect("VM output");
    let mut got = vec![0u8; out.len()];
    tokio::time::timeout(T, c.read_exact(&mut got))
        .await
        .expect("in time")
        .expect("read");
    assert_eq!(got, out);
}

#[tokio::test]
async fn forced_telnet_consoles_are_offered_at_once() {
    let d = Daemon::start(&["--console-protocol", "telnet"]);
    let id = Identity::numbered(923);
    let (vm, port) = vm_up(&d, &id).await;
    let t0 = Instant::now();
    let mut c = TcpStream::connect(d.console(port)).await.expect("console");
    let mut got = vec![0u8; OPENING.len()];
    tokio::time::timeout(T, c.read_exact(&mut got))
        .await
        .expect("in time")
        .expect("read");
    assert_eq!(got, OPENING);
    assert!(t0.elapsed() < Duration::from_millis(250));
    // Not answering does not make it raw: 0xFF goes out doubled.
    vm.send(b"\xff").await.expect("VM output");
    let mut two = [0u8; 2];
    tokio::time::timeout(T, c.read_exact(&mut two))
        .await
        .expect("in time")
        .expect("read");
    assert_eq!(&two, b"\xff\xff");
}

#[tokio::test]
async fn admin_connect_raw_gives_a_raw_session() {
    let d = Daemon::start(&[]);
    let id = Identity::numbered(924);
    let (vm, _) = vm_up(&d, &id).await;
    let mut s = TcpStream::connect(d.admin).await.expect("admin port");
    s.write_all(format!("connect {} free-for-all raw\n", id.name).as_bytes())
        .await
        .expect("connect");
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while !line.ends_with(b"\n") {
        tokio::time::timeout(T, s.read_exact(&mut b))
            .await
            .expect("answer in time")
            .expect("read");
        line.push(b[0]);
    }
    assert!(
        String::from_utf8_lossy(&line).contains("\"ok\":true"),
        "{line:?}"
    );
    let data = every_byte(2);
    s.write_all(&data).await.expect("type");
    assert_eq!(
        vm.read_exact_data(data.len(), T).await.expect("input"),
        data
    );
    vm.send(&data).await.expect("output");
    let mut got = vec![0u8; data.len()];
    tokio::time::timeout(T, s.read_exact(&mut got))
        .await
        .expect("in time")
        .expect("read");
    assert_eq!(got, data);
    let bad = admin_line(d.admin, &format!("connect {} write ascii", id.name)).await;
    assert!(bad.contains("unknown console protocol 'ascii'"), "{bad}");
}

// ---------------------------------------------------------------------------
// Pacing by the fastest reader.

/// What a telnet client that waited for the server answers to the offer:
/// DO ECHO, DO SGA, DO BINARY, WILL BINARY, WILL SGA (as inetutils telnet
/// does; none of them is answered again).
const ANSWER: &[u8] = b"\xff\xfd\x01\xff\xfd\x03\xff\xfd\x00\xff\xfb\x00\xff\xfb\x03";

/// How a test console behaves before it reads.
#[derive(Clone, Copy, Debug)]
enum Kind {
    /// Says nothing, answers nothing (`nc`, `socat -u`): gets the offer,
    /// then raw output.
    SilentRaw,
    /// Says nothing until offered telnet, then answers (`telnet HOST PORT`).
    SilentTelnet,
}

impl Kind {
    fn reader(
        self,
        c: TcpStream,
        total: u64,
        limit: Duration,
    ) -> tokio::task::JoinHandle<Result<Read, String>> {
        let answer: &'static [u8] = match self {
            Kind::SilentRaw => b"",
            Kind::SilentTelnet => ANSWER,
        };
        spawn_reader_after(c, OPENING, answer, total, total, limit)
    }
}

/// A burst of `total` bytes that starts `delay` after a silent console of
/// `kind` connected (with `stuck` silent consoles beside it that never
/// read): the console must get the offer and then every byte.
async fn silent_burst(index: u32, kind: Kind, total: u64, delay: Duration, stuck: usize) {
    let d = Daemon::start(&[]);
    let (vm, port) = raw_vm(&d, index).await;
    let c = TcpStream::connect(d.console(port)).await.expect("console");
    let mut stuck_ones = Vec::new();
    for _ in 0..stuck {
        stuck_ones.push(small_console(&d, port, 4096).await);
    }
    wait_consoles(&d, &Identity::numbered(index).name, 1 + stuck).await;
    tokio::time::sleep(delay).await;
    let reader = kind.reader(c, total, Duration::from_secs(10));
    let writer = spawn_writer(vm, total);
    let read = reader.await.expect("reader task").unwrap_or_else(|e| {
        panic!(
            "{kind:?} console, {total} bytes after {delay:?}: {e}\n{}",
            d.log()
        )
    });
    assert_eq!(read.bytes, total);
    let (_vm, wrote) = writer.await.expect("writer");
    eprintln!(
        "{kind:?} console: {total} bytes from {delay:?} after it connected, {stuck} stuck beside it: done in {:?} (VM {wrote:?})",
        read.done
    );
    drop(stuck_ones);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_raw_console_gets_every_byte_of_a_burst_in_its_first_second() {
    silent_burst(930, Kind::SilentRaw, 4 * MIB, Duration::ZERO, 0).await;
    silent_burst(931, Kind::SilentRaw, 256 * 1024, Duration::ZERO, 0).await;
    silent_burst(
        932,
        Kind::SilentRaw,
        4 * MIB,
        Duration::from_millis(2000),
        0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_telnet_console_gets_every_byte_of_a_burst_in_its_first_second() {
    silent_burst(933, Kind::SilentTelnet, 4 * MIB, Duration::ZERO, 0).await;
    silent_burst(
        934,
        Kind::SilentTelnet,
        4 * MIB,
        Duration::from_millis(700),
        0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_console_beside_a_stuck_one_gets_every_byte() {
    silent_burst(935, Kind::SilentRaw, 10 * MIB, Duration::ZERO, 1).await;
    silent_burst(936, Kind::SilentTelnet, 10 * MIB, Duration::ZERO, 1).await;
}

/// A hundred VMs flood at once, each to one console that never speaks
/// first (raw and telnet ones in turn), from the moment it connected: every
/// console gets every byte, and nothing is skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_a_hundred_vms_reaches_every_silent_console_whole() {
    const VMS: u32 = 100;
    const EACH: u64 = 4 * MIB;
    let d = Daemon::start(&[]);
    let mut vms = Vec::new();
    let mut consoles = Vec::new();
    for i in 0..VMS {
        let (vm, port) = raw_vm(&d, 940 + i).await;
        vms.push(vm);
        consoles.push(TcpStream::connect(d.console(port)).await.expect("console"));
    }
    for i in 0..VMS {
        wait_consoles(&d, &Identity::numbered(940 + i).name, 1).await;
    }
    let t0 = Instant::now();
    let readers: Vec<_> = consoles
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let kind = if i % 2 == 0 {
                Kind::SilentRaw
            } else {
                Kind::SilentTelnet
            };
            (kind, kind.reader(c, EACH, Duration::from_secs(30)))
        })
        .collect();
    let writers: Vec<_> = vms.into_iter().map(|vm| spawn_writer(vm, EACH)).collect();
    let mut failed = Vec::new();
    for (i, (kind, r)) in readers.into_iter().enumerate() {
        match r.await.expect("reader task") {
            Ok(read) if read.skipped == 0 => assert_eq!(read.bytes, EACH),
            Ok(read) => failed.push(format!(
                "console of VM {i} ({kind:?}): {} bytes skipped",
                read.skipped
            )),
            Err(e) => failed.push(format!("console of VM {i} ({kind:?}): {e}")),
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {VMS} consoles did not get every byte:\n{}\n{}",
        failed.len(),
        failed.join("\n"),
        d.log()
    );
    for w in writers {
        w.await.expect("writer");
    }
    eprintln!("100 VMs x 4 MiB to silent consoles: {:?}", t0.elapsed());
    assert!(!d.log().contains("skipped"), "{}", d.log());
}

/// A lone console that reads slowly, with pauses as a descheduled reader
/// has, is waited for: it gets every byte and no notice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_slow_console_is_waited_for_and_never_skipped() {
    const TOTAL: u64 = 3 * MIB;
    let d = Daemon::start(&["--console-protocol", "raw", "--console-queue", "65536"]);
    let (vm, port) = raw_vm(&d, 960).await;
    let mut c = small_console(&d, port, 16 * 1024).await;
    wait_consoles(&d, &Identity::numbered(960).name, 1).await;
    let writer = spawn_writer(vm, TOTAL);
    let block = reference();
    let mut got = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    let mut reads = 0u32;
    while got < TOTAL {
        let n = tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf))
            .await
            .expect("output in time")
            .expect("read");
        assert!(n > 0, "closed at {got}\n{}", d.log());
        assert!(
            matches(&block, got, &buf[..n]),
            "wrong bytes (a notice?) at {got}\n{}",
            d.log()
        );
        got += n as u64;
        reads += 1;
        // Now and then descheduled for 600 ms, as on a busy machine.
        if reads.is_multiple_of(40) {
            tokio::time::sleep(Duration::from_millis(600)).await;
        }
    }
    let (_vm, wrote) = writer.await.expect("writer");
    eprintln!("a lone slow console got 3 MiB; the VM waited for it: {wrote:?}");
    wait_consoles(&d, &Identity::numbered(960).name, 1).await;
}

/// A lone console that says nothing and reads nothing for a while, then
/// starts reading, gets every byte: the VM waited for it (its stall
/// timeout is longer than the pause), and nothing was skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_console_that_starts_reading_late_gets_every_byte() {
    // More than every buffer on the way holds (the VM's socket, the
    // backlog, the console's queue and socket).
    const TOTAL: u64 = 32 * MIB;
    let d = Daemon::start(&["--console-stall-timeout", "4"]);
    let (vm, port) = raw_vm(&d, 963).await;
    let c = small_console(&d, port, 16 * 1024).await;
    wait_consoles(&d, &Identity::numbered(963).name, 1).await;
    let writer = spawn_writer(vm, TOTAL);
    // Reading nothing for a while (under the stall timeout) is the test.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        !writer.is_finished(),
        "the VM was not held for its lone console"
    );
    let read = Kind::SilentRaw
        .reader(c, TOTAL, Duration::from_secs(10))
        .await
        .expect("reader task")
        .unwrap_or_else(|e| panic!("the late reader: {e}\n{}", d.log()));
    assert_eq!((read.bytes, read.skipped), (TOTAL, 0));
    let (_vm, wrote) = writer.await.expect("writer");
    eprintln!("a console that read 2.5 s late got every byte; the VM waited for it ({wrote:?})");
}

/// Consoles that connect and close at once, or send one byte and then stop
/// reading, hold the VM no longer than the stall timeout; so does one that
/// trickles a few hundred bytes a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consoles_that_close_stall_or_trickle_hold_the_vm_no_longer_than_the_stall_timeout() {
    const TOTAL: u64 = 8 * MIB;
    let d = Daemon::start(&["--console-stall-timeout", "2"]);
    let (vm, port) = raw_vm(&d, 961).await;
    let name = Identity::numbered(961).name;
    // Connects and closes at once.
    drop(TcpStream::connect(d.console(port)).await.expect("console"));
    // Sends one byte (so it is raw), then never reads.
    let mut one = small_console(&d, port, 4096).await;
    one.write_all(b"x").await.expect("one byte");
    // Reads 200 bytes every half second: 400 B/s, under the 1 KiB/s floor.
    let trickle = small_console(&d, port, 4096).await;
    let trickler = tokio::spawn(async move {
        let mut trickle = trickle;
        let mut buf = [0u8; 200];
        let mut took = 0usize;
        loop {
            match trickle.read(&mut buf).await {
                Ok(0) | Err(_) => return took,
                Ok(n) => took += n,
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    wait_consoles(&d, &name, 2).await;
    let t0 = Instant::now();
    let (_vm, wrote) = spawn_writer(vm, TOTAL).await.expect("writer");
    assert!(
        wrote < Duration::from_secs(2 + 2 + 3),
        "the VM was held {wrote:?} (stall timeout 2 s)\n{}",
        d.log()
    );
    // Both are told and dropped (the trickler would need seconds more to
    // read what its socket still holds before it sees the close).
    wait_consoles(&d, &name, 0).await;
    assert_eq!(
        d.log()
            .matches("disconnecting a console that took no output")
            .count(),
        2,
        "{}",
        d.log()
    );
    trickler.abort();
    eprintln!(
        "closed, stalled and trickling consoles: the VM wrote 8 MiB in {wrote:?}; both dropped after {:?}",
        t0.elapsed()
    );
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(T, one.read_to_end(&mut rest)).await;
}

/// A VM whose only console does not read goes on reading (into a bounded
/// hold) and answers VMOTION-BEGIN while its output waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vmotion_during_a_flood_to_a_pacing_console_gets_goahead_at_once() {
    let d = Daemon::start(&["--console-protocol", "raw"]);
    let (mut vm, port) = raw_vm(&d, 962).await;
    let mut pacing = small_console(&d, port, 4096).await;
    wait_consoles(&d, &Identity::numbered(962).name, 1).await;
    // More than the console takes before it holds the VM back (an eighth
    // of its queue plus its socket), less than the VM's hold.
    let flood = pattern(0, 768 * 1024);
    vm.write_all(&flood).await.expect("flood");
    // Time for the daemon to take the flood in (nothing to wait for says
    // so), so that the time to GOAHEAD below is the answer's alone.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut begin = Vec::new();
    Msg::VmotionBegin(b"\x01\x02\x03\x04").encode(&mut begin);
    let t0 = Instant::now();
    vm.write_all(&begin).await.expect("BEGIN");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let goahead = b"\xff\xfa\xe8\x29\x01\x02\x03\x04";
    while find(&got, goahead).is_none() {
        let n = tokio::time::timeout(Duration::from_secs(5), vm.read(&mut buf))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "no GOAHEAD while the console holds the VM back\n{}",
                    d.log()
                )
            })
            .expect("VM read");
        assert!(n > 0, "the VM connection closed");
        got.extend_from_slice(&buf[..n]);
    }
    let waited = t0.elapsed();
    eprintln!("GOAHEAD {waited:?} after BEGIN, with the VM's output held back");
    assert!(
        waited < Duration::from_millis(500),
        "GOAHEAD took {waited:?}"
    );
    // The console still gets every byte once it reads.
    let mut out = vec![0u8; flood.len()];
    tokio::time::timeout(T, pacing.read_exact(&mut out))
        .await
        .expect("the held output in time")
        .expect("read");
    assert!(out == flood, "the held output is not the VM's");
}

/// A SimVm is needed by name only to keep the import honest when the raw
/// helpers are all a test uses.
#[allow(dead_code)]
fn _uses(_: &SimVm) {}
