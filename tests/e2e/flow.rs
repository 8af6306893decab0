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
//!   override the guess.
//!
//! The VMs write with [`SimVm::into_raw`] streams, so nothing in the test
//! process throttles them, and the consoles read with plain sockets.

use std::time::{Duration, Instant};

use crate::common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
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

/// What a reading console saw.
struct Read {
    /// Kept open, so the console stays attached until the test is done.
    _console: TcpStream,
    bytes: u64,
    /// When the first `mark` bytes had arrived.
    at_mark: Option<Duration>,
    done: Duration,
}

/// Read `total` pattern bytes from `c`, checking each against the pattern;
/// records when `mark` bytes had arrived.
fn spawn_reader(
    mut c: TcpStream,
    total: u64,
    mark: u64,
    limit: Duration,
) -> tokio::task::JoinHandle<Result<Read, String>> {
    tokio::spawn(async move {
        let t0 = Instant::now();
        let block = reference();
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        let mut at_mark = None;
        while got < total {
            let n = match tokio::time::timeout(limit, c.read(&mut buf)).await {
                Err(_) => return Err(format!("stalled at {got} of {total} bytes")),
                Ok(Err(e)) => return Err(format!("read failed at {got}: {e}")),
                Ok(Ok(0)) => return Err(format!("closed at {got} of {total} bytes")),
                Ok(Ok(n)) => n,
            };
            if got + n as u64 > total {
                return Err(format!("more than {total} bytes"));
            }
            if !matches(&block, got, &buf[..n]) {
                return Err(format!("wrong bytes in {n} at offset {got}"));
            }
            got += n as u64;
            if at_mark.is_none() && got >= mark {
                at_mark = Some(t0.elapsed());
            }
        }
        Ok(Read {
            _console: c,
            bytes: got,
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

/// Until `n` consoles are attached to the VM on `port`.
async fn wait_consoles(d: &Daemon, name: &str, n: usize) {
    let deadline = Instant::now() + T;
    loop {
        let out = admin_line(d, "list").await;
        let row = out.split("},{").find(|r| r.contains(name)).unwrap_or("");
        if row.contains(&format!("\"consoles\":{n}")) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{n} consoles never attached: {out}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One native admin command's answer line.
async fn admin_line(d: &Daemon, cmd: &str) -> String {
    let mut s = TcpStream::connect(d.admin).await.expect("admin port");
    s.write_all(format!("{cmd}\n").as_bytes())
        .await
        .expect("admin write");
    let mut out = Vec::new();
    let mut b = [0u8; 4096];
    while !out.ends_with(b"\n") {
        let n = tokio::time::timeout(T, s.read(&mut b))
            .await
            .expect("admin answer in time")
            .expect("admin read");
        assert!(n > 0, "admin port closed");
        out.extend_from_slice(&b[..n]);
    }
    String::from_utf8_lossy(&out).into_owned()
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
    eprintln!(
        "64 MiB to one console in {:?} (VM done writing after {wrote:?})",
        seen[0].done
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_reaches_ten_fast_consoles_whole_beside_a_stuck_one() {
    let (seen, wrote) = burst(64 * MIB, 10, 1, 902).await;
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

    // Read slowly (about 100 KiB/s, below the 320 KiB/s a VM waits for)
    // and account for every byte: pattern data in order, with notices
    // standing for what was skipped.
    let block = reference();
    let mut stream = Vec::new();
    let mut offset = 0u64;
    let mut notices = 0;
    let mut buf = vec![0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(60);
    while offset < TOTAL {
        assert!(
            Instant::now() < deadline,
            "slow console at {offset} of {TOTAL}"
        );
        let n = tokio::time::timeout(Duration::from_secs(10), slow.read(&mut buf))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "the slow console was starved at {offset} of {TOTAL} ({notices} notices, {} unparsed bytes)\n{}",
                    stream.len(),
                    d.log()
                )
            })
            .expect("slow console read");
        assert!(
            n > 0,
            "the slow console was disconnected at {offset}\n{}",
            d.log()
        );
        stream.extend_from_slice(&buf[..n]);
        // Consume whole pieces: pattern bytes up to a notice, or a notice.
        loop {
            if let Some(at) = find(&stream, NOTICE_HEAD) {
                let (data, rest) = stream.split_at(at);
                assert!(
                    matches(&block, offset, data),
                    "wrong bytes before a notice at {offset}"
                );
                offset += data.len() as u64;
                let Some(end) = find(rest, NOTICE_TAIL) else {
                    stream = rest.to_vec();
                    break;
                };
                let count = std::str::from_utf8(&rest[NOTICE_HEAD.len()..end])
                    .ok()
                    .and_then(|t| t.parse::<u64>().ok())
                    .expect("a byte count in the notice");
                assert!(count > 0);
                offset += count;
                notices += 1;
                stream = rest[end + NOTICE_TAIL.len()..].to_vec();
            } else {
                // Keep a tail that could be the start of a notice.
                let keep = (1..NOTICE_HEAD.len().min(stream.len() + 1))
                    .rev()
                    .find(|&k| stream.ends_with(&NOTICE_HEAD[..k]))
                    .unwrap_or(0);
                let cut = stream.len() - keep;
                assert!(
                    matches(&block, offset, &stream[..cut]),
                    "wrong bytes at {offset}"
                );
                offset += cut as u64;
                stream.drain(..cut);
                break;
            }
        }
        // Slow until the VM is done (by then the console has skipped, or
        // the VM waited for it); the rest is read at full speed, only to
        // account for every byte sooner.
        if !writer.is_finished() {
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
    }
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
        drop(vm);
    }
    // Every transcript fills up to the last byte (the backend flushes when
    // its queue runs dry, and again as each VM disconnects).
    let block = reference();
    for i in 0..VMS {
        let path = dir
            .path()
            .join(format!("{}.log", Identity::numbered(910 + i).name));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            if len >= EACH || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
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

/// Every byte value, `reps` times, starting at 0x00.
fn every_byte(reps: usize) -> Vec<u8> {
    (0..256 * reps).map(|i| i as u8).collect()
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
    let bad = admin_line(&d, &format!("connect {} write ascii", id.name)).await;
    assert!(bad.contains("unknown console protocol 'ascii'"), "{bad}");
}

/// A SimVm is needed by name only to keep the import honest when the raw
/// helpers are all a test uses.
#[allow(dead_code)]
fn _uses(_: &SimVm) {}
