//! End-to-end tests with REAL client programs on a VM's console port.
//!
//! Each test starts the real `vspc` daemon on random loopback ports (see
//! `common`), connects one simulated ESXi serial port ([`SimVm`]) and
//! attaches an unmodified client program to the VM's console port
//! (`127.0.0.1:PORT`). Bytes are asserted exactly, in both directions.
//!
//! The programs (Debian packages in brackets; `.ci/run` installs them, and a
//! test fails naming the package when one is missing):
//!
//! - `gdb` [gdb] and `gdbserver` [gdbserver]: gdbserver speaks the GDB remote
//!   protocol over its stdin/stdout (`gdbserver - /bin/cat`) and plays the
//!   VM's serial line: its stdout is the VM's output, the console input that
//!   reaches the VM is its stdin (pumped in-process through [`SimVm`]). gdb
//!   does `target remote 127.0.0.1:PORT`, writes 0xFF and friends with a
//!   binary `X` packet, reads them back, and copies files holding every byte
//!   value with `remote put` / `remote get`. gdb's first byte is not IAC, so
//!   it is a raw client: nothing may be doubled or rewritten either way.
//! - `socat` [socat]: a raw TCP client. Both ways at once it must get
//!   exactly the other side's bytes (all 256 values, CR NUL, CR LF, IAC IAC).
//!   With `--console-protocol raw` a socat that only reads gets exactly the
//!   VM's output and no telnet negotiation; in the default (auto) mode a
//!   silent one is offered telnet (the 15-byte opening) and then, when it
//!   does not answer, gets the VM's output raw.
//! - `telnet` [inetutils-telnet]: a real telnet client, run on a
//!   pseudo-terminal with `script` [bsdutils]. It answers the daemon's
//!   offer (BINARY both ways, character mode, as its `toggle options` trace
//!   shows); what is typed (8-bit too) reaches the VM exactly, Enter as a
//!   bare CR, and the VM's output (8-bit too) shows on its terminal.
//! - `busybox telnet` [busybox]: a telnet client that refuses BINARY (an NVT
//!   client) and sends CR LF for Enter; the VM must get a bare CR.
//!
//! Every process a test starts is killed when the test ends (a guard kills
//! it and its descendants), every wait is bounded, and each test runs its
//! own daemon, so the tests run in parallel with each other and the rest of
//! the suite.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::common::*;

use vspc_testkit::sim::{Identity, SimVm};

/// The daemon's opening telnet negotiation to a console that stays silent:
/// IAC WILL ECHO, IAC WILL SGA, IAC WILL BINARY, IAC DO BINARY, IAC DO SGA.
const OFFER: &[u8] = b"\xff\xfb\x01\xff\xfb\x03\xff\xfb\x00\xff\xfd\x00\xff\xfd\x03";

/// The most a gdb session may take (it takes well under a second when no
/// byte is stalled).
const GDB_LIMIT: Duration = Duration::from_secs(20);

/// The most any one test may take, whatever happens (each step has its own,
/// shorter limit; this is the backstop against a hang).
const TEST_LIMIT: Duration = Duration::from_secs(60);

/// Run a test's steps within [`TEST_LIMIT`]. When it runs out, the steps are
/// dropped, and with them every process guard (which kills its process).
async fn bounded(steps: impl std::future::Future<Output = ()>) {
    if tokio::time::timeout(TEST_LIMIT, steps).await.is_err() {
        panic!("the test did not finish within {TEST_LIMIT:?}");
    }
}

// ---------------------------------------------------------------------------
// Programs.

/// The path of `program`, or a failure naming the package to install.
fn require(program: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path).chain(["/usr/sbin", "/sbin"].map(PathBuf::from));
    for dir in dirs {
        let candidate = dir.join(program);
        let executable = std::fs::metadata(&candidate)
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false);
        if executable {
            return candidate;
        }
    }
    panic!(
        "`{program}` is not installed, and this test runs the real program: \
         install the Debian package `{package}` (apt-get install -y {package}; \
         .ci/run does this in CI)"
    );
}

/// The busybox binary, checked to have the `telnet` applet.
fn require_busybox_telnet() -> PathBuf {
    let busybox = require("busybox", "busybox");
    let list = Command::new(&busybox)
        .arg("--list")
        .output()
        .expect("run busybox --list");
    let has_telnet = String::from_utf8_lossy(&list.stdout)
        .lines()
        .any(|l| l.trim() == "telnet");
    assert!(
        has_telnet,
        "{} has no telnet applet: install the Debian package `busybox`",
        busybox.display()
    );
    busybox
}

/// inetutils' telnet (another `telnet` on PATH does not count).
pub(crate) fn require_inetutils_telnet() -> PathBuf {
    let telnet = require("telnet", "inetutils-telnet");
    let version = Command::new(&telnet)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .expect("run telnet --version");
    assert!(
        String::from_utf8_lossy(&version.stdout).contains("inetutils"),
        "{} is not inetutils' telnet: install the Debian package `inetutils-telnet`",
        telnet.display()
    );
    telnet
}

/// Every process id below `pid` (children first found, then theirs).
fn descendants(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let Ok(children) = std::fs::read_to_string(task.path().join("children")) else {
                continue;
            };
            for child in children.split_whitespace().filter_map(|c| c.parse().ok()) {
                found.push(child);
                todo.push(child);
            }
        }
    }
    found
}

/// A child process that is killed, with everything it started, when the
/// guard is dropped. Its stdout (unless taken) and stderr are collected by
/// threads.
pub(crate) struct Proc {
    what: String,
    child: Child,
    stdin: Option<ChildStdin>,
    /// Taken by [`Proc::start_raw`]'s caller; collected otherwise.
    stdout: Option<ChildStdout>,
    out: Arc<Mutex<Vec<u8>>>,
    err: Arc<Mutex<Vec<u8>>>,
    readers: Vec<JoinHandle<()>>,
    started: Instant,
}

impl Proc {
    /// Start `cmd` with piped stdio, collecting stdout and stderr.
    fn start(what: &str, cmd: &mut Command) -> Proc {
        let mut p = Proc::start_raw(what, cmd);
        if let Some(stdout) = p.stdout.take() {
            p.readers.push(collect_bytes(stdout, p.out.clone()));
        }
        p
    }

    /// Start `cmd` with piped stdio, collecting stderr only: the caller
    /// takes `stdout`.
    fn start_raw(what: &str, cmd: &mut Command) -> Proc {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let err = Arc::new(Mutex::new(Vec::new()));
        let mut readers = Vec::new();
        if let Some(stderr) = child.stderr.take() {
            readers.push(collect_bytes(stderr, err.clone()));
        }
        Proc {
            what: what.into(),
            stdin: child.stdin.take(),
            stdout: child.stdout.take(),
            child,
            out: Arc::new(Mutex::new(Vec::new())),
            err,
            readers,
            started: Instant::now(),
        }
    }

    /// Write to the program's stdin (small writes: the pipe holds 64 KiB).
    pub(crate) fn write(&mut self, bytes: &[u8]) {
        let stdin = self.stdin.as_mut().expect("stdin still open");
        stdin
            .write_all(bytes)
            .and_then(|()| stdin.flush())
            .unwrap_or_else(|e| panic!("writing to {}'s stdin: {e}", self.what));
    }

    /// Close the program's stdin (end of input).
    fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// What the program wrote to stdout so far.
    pub(crate) fn out(&self) -> Vec<u8> {
        self.out.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// What the program wrote to stderr so far, as text.
    fn err(&self) -> String {
        String::from_utf8_lossy(&self.err.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }

    /// Wait until `done(stdout so far)` holds; false after `limit`.
    async fn wait_out(&self, limit: Duration, done: impl Fn(&[u8]) -> bool) -> bool {
        eventually(limit, || done(&self.out())).await
    }

    /// Wait until stdout holds `needle`; false after `limit`.
    pub(crate) async fn wait_for(&self, needle: &[u8], limit: Duration) -> bool {
        self.wait_for_since(0, needle, limit).await
    }

    /// Wait until stdout holds `needle` after its first `from` bytes; false
    /// after `limit`.
    pub(crate) async fn wait_for_since(&self, from: usize, needle: &[u8], limit: Duration) -> bool {
        self.wait_out(limit, |out| {
            contains(out.get(from..).unwrap_or(&[]), needle)
        })
        .await
    }

    /// How many bytes of stdout there are so far (for [`Proc::wait_for_since`]).
    pub(crate) fn mark(&self) -> usize {
        self.out.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Type `keys` until the program exits, every half second (a terminal
    /// program switching its terminal's mode may flush what was typed just
    /// before); `None` if it is still running after `limit`.
    async fn keys_until_exit(&mut self, keys: &[u8], limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(stdin) = self.stdin.as_mut() {
                // It may be gone already: then the write fails, harmlessly.
                let _ = stdin.write_all(keys).and_then(|()| stdin.flush());
            }
            if let Some(status) = self.wait_exit(ms(500)).await {
                return Some(status);
            }
        }
        None
    }

    /// Wait for the program to exit; `None` if it is still running after
    /// `limit` (it is then left to the guard).
    async fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let status = child_exit(&mut self.child, limit).await?;
        // Everything it wrote is in once the readers reach EOF (bounded: a
        // descendant could still hold a pipe).
        eventually(T, || self.readers.iter().all(|r| r.is_finished())).await;
        Some(status)
    }

    /// Kill the program and everything it started, and reap it.
    fn kill(&mut self) {
        let pids: Vec<String> = descendants(self.child.id())
            .iter()
            .map(u32::to_string)
            .collect();
        if !pids.is_empty() {
            // The shell's kill builtin: no procps needed. Only ids of
            // processes this guard's child started.
            let _ = Command::new("sh")
                .args(["-c", "kill -KILL \"$@\" 2>/dev/null", "sh"])
                .args(&pids)
                .status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.stdin = None;
    }

    /// A description for failure messages.
    pub(crate) fn transcript(&self) -> String {
        format!(
            "{} (running {:?}): stdout {} bytes: {:?}\nstderr: {}",
            self.what,
            self.started.elapsed(),
            self.out().len(),
            String::from_utf8_lossy(&self.out()),
            self.err()
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        // The readers end at EOF, which the kill brings; none is waited for
        // here, so a pipe held open elsewhere cannot hang the test.
        self.readers.clear();
    }
}

/// A client program on a pseudo-terminal: `script` gives it one, copies what
/// the test writes to its stdin onto the terminal and the terminal's output
/// to its stdout.
pub(crate) fn on_pty(what: &str, argv: &[&str]) -> Proc {
    let script = require("script", "bsdutils");
    let quoted: Vec<String> = argv.iter().map(|a| format!("'{a}'")).collect();
    Proc::start(
        what,
        Command::new(script)
            .args([
                "-q",
                "-f",
                "-e",
                "-c",
                &format!("exec {}", quoted.join(" ")),
                "/dev/null",
            ])
            .env("SHELL", "/bin/sh")
            .env("TERM", "dumb")
            .env_remove("TELNET_ESCAPE"),
    )
}

// ---------------------------------------------------------------------------
// Data and comparisons.

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    memchr::memmem::find(hay, needle).is_some()
}

/// Assert `got == want` with a readable message: lengths, the first
/// difference and the bytes around it.
fn assert_same_bytes(what: &str, got: &[u8], want: &[u8]) {
    if got == want {
        return;
    }
    let first = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    let around = |v: &[u8]| {
        let from = first.saturating_sub(8);
        let to = (first + 24).min(v.len());
        vspc_testkit::sim::hex(&v[from.min(to)..to])
    };
    panic!(
        "{what}: got {} bytes, wanted {}; first difference at offset {first}\n  \
         got    [{}]\n  wanted [{}]\n(from offset {})",
        got.len(),
        want.len(),
        around(got),
        around(want),
        first.saturating_sub(8)
    );
}

// ---------------------------------------------------------------------------
// The daemon's admin port.

// ---------------------------------------------------------------------------
// A process as the VM's serial line.

/// Pumps bytes between a program's stdio and a simulated VM: the program's
/// stdout is the VM's output, console input reaching the VM goes to its
/// stdin. Both directions are recorded.
struct Bridge {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Everything the program wrote (the VM's output).
    vm_output: Arc<Mutex<Vec<u8>>>,
    /// Everything the VM received from consoles (the program's input).
    vm_input: Arc<Mutex<Vec<u8>>>,
}

impl Bridge {
    fn start(vm: Arc<SimVm>, mut stdout: ChildStdout, mut stdin: ChildStdin) -> Bridge {
        let vm_output = Arc::new(Mutex::new(Vec::new()));
        let vm_input = Arc::new(Mutex::new(Vec::new()));
        // Program -> VM output: a thread reads the pipe, a task sends.
        let (out_tx, mut out_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
        std::thread::spawn(move || {
            let mut buf = [0u8; 16 * 1024];
            loop {
                match stdout.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if out_tx.send(buf[..n].to_vec()).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        let (vm1, log) = (vm.clone(), vm_output.clone());
        let to_vm = tokio::spawn(async move {
            while let Some(chunk) = out_rx.recv().await {
                log.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend_from_slice(&chunk);
                if vm1.send(&chunk).await.is_err() {
                    return;
                }
            }
        });
        // VM input -> program: a task receives, a thread writes the pipe.
        let (in_tx, in_rx) = std::sync::mpsc::channel::<Vec<u8>>();
        std::thread::spawn(move || {
            for chunk in in_rx {
                if stdin
                    .write_all(&chunk)
                    .and_then(|()| stdin.flush())
                    .is_err()
                {
                    return;
                }
            }
        });
        let log = vm_input.clone();
        let from_vm = tokio::spawn(async move {
            loop {
                let data = vm.recv_data(ms(200)).await;
                if data.is_empty() {
                    if vm.closed().is_some() {
                        return;
                    }
                    continue;
                }
                log.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend_from_slice(&data);
                if in_tx.send(data).is_err() {
                    return;
                }
            }
        });
        Bridge {
            tasks: vec![to_vm, from_vm],
            vm_output,
            vm_input,
        }
    }

    fn summary(&self) -> String {
        let show = |v: &Arc<Mutex<Vec<u8>>>| {
            let v = v.lock().unwrap_or_else(|e| e.into_inner());
            let head = &v[..v.len().min(120)];
            format!(
                "{} bytes, starting {:?}",
                v.len(),
                String::from_utf8_lossy(head)
            )
        };
        format!(
            "VM output (gdbserver's stdout): {}\nVM input (gdbserver's stdin): {}",
            show(&self.vm_output),
            show(&self.vm_input)
        )
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

// ---------------------------------------------------------------------------
// gdb and gdbserver.

/// gdb against gdbserver on the VM's serial line: a binary X packet with
/// 0xFF, CR NUL, CR LF and IAC IAC in it, read back; then `remote put` and
/// `remote get` of files with every byte value, compared byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gdb_remote_protocol_through_a_console() {
    bounded(gdb_remote_protocol_through_a_console_steps()).await;
}

async fn gdb_remote_protocol_through_a_console_steps() {
    let gdb = require("gdb", "gdb");
    let gdbserver = require("gdbserver", "gdbserver");
    let cat = require("cat", "coreutils");
    let dir = tempfile::tempdir().expect("temporary directory");

    let d = Daemon::builder().start();
    let id = Identity::numbered(1);
    let (vm, port) = vm_up(&d, &id).await;
    let vm = Arc::new(vm);

    // The VM: gdbserver speaking the remote protocol on stdin/stdout; the
    // inferior (cat) stays stopped at its first instruction.
    let mut server = Proc::start_raw(
        "gdbserver",
        Command::new(&gdbserver)
            .arg("-")
            .arg(&cat)
            .current_dir(dir.path()),
    );
    let bridge = Bridge::start(
        vm.clone(),
        server.stdout.take().expect("gdbserver stdout"),
        server.stdin.take().expect("gdbserver stdin"),
    );

    // Three files with every byte value, then different random bytes each.
    let mut files = Vec::new();
    for round in 1..=3u64 {
        let mut data = all_bytes(32);
        data.extend(XorShift::new(round).bytes(4096));
        let src = dir.path().join(format!("src-{round}.bin"));
        std::fs::write(&src, &data).expect("write source file");
        let remote = dir.path().join(format!("remote-{round}.bin"));
        let got = dir.path().join(format!("got-{round}.bin"));
        files.push((data, src, remote, got));
    }
    let path = |p: &Path| p.to_str().expect("utf-8 temp path").to_string();

    // Memory order: ff 00 ff ff 0d 00 0d 0a, then ff at +8.
    let mut script: Vec<String> = [
        "set pagination off",
        "set confirm off",
        "set sysroot /",
        // Reads of the stack must go to the target, not gdb's cache.
        "set stack-cache off",
        "set remote X-packet on",
        "set remotetimeout 10",
    ]
    .iter()
    .map(|c| format!("-iex={c}"))
    .collect();
    let commands = [
        format!("target remote 127.0.0.1:{port}"),
        "set debug remote 1".into(),
        "set {unsigned long long}($sp - 64) = 0x0a0d000dffff00ff".into(),
        "set {unsigned char}($sp - 56) = 0xff".into(),
        "set debug remote 0".into(),
        "print/x *(unsigned char (*)[9])($sp - 64)".into(),
    ];
    script.extend(commands.iter().map(|c| format!("-ex={c}")));
    for (_, src, remote, got) in &files {
        script.push(format!("-ex=remote put {} {}", path(src), path(remote)));
        script.push(format!("-ex=remote get {} {}", path(remote), path(got)));
    }
    script.push("-ex=echo GDB-DONE\\n".into());
    script.push("-ex=kill".into());

    let started = Instant::now();
    let mut client = Proc::start(
        "gdb",
        Command::new(&gdb)
            .args(["-batch", "-nx", "-q"])
            .args(&script)
            .arg(&cat)
            .current_dir(dir.path()),
    );
    client.close_stdin();
    let status = client.wait_exit(GDB_LIMIT).await;
    let elapsed = started.elapsed();
    eprintln!("gdb session through vspc took {elapsed:?}");
    let report = || {
        format!(
            "{}\n{}\n{}",
            client.transcript(),
            server.transcript(),
            bridge.summary()
        )
    };
    let Some(status) = status else {
        panic!(
            "gdb did not finish within {GDB_LIMIT:?} (stalled?)\n{}",
            report()
        );
    };
    assert!(status.success(), "gdb exited with {status}\n{}", report());

    let out = String::from_utf8_lossy(&client.out()).into_owned();
    let err = client.err();
    assert!(
        out.contains("$1 = {0xff, 0x0, 0xff, 0xff, 0xd, 0x0, 0xd, 0xa, 0xff}"),
        "the bytes written with X did not read back\n{}",
        report()
    );
    assert!(
        err.contains("Sending packet: $X") && !err.contains("Sending packet: $M"),
        "gdb should have written memory with binary X packets\n{}",
        report()
    );
    assert!(out.contains("GDB-DONE"), "gdb stopped early\n{}", report());
    assert!(
        !err.contains("Ignoring packet error") && !err.contains("Remote connection closed"),
        "gdb saw a damaged or closed link\n{}",
        report()
    );
    for (data, _, remote, got) in &files {
        let put = std::fs::read(remote).unwrap_or_else(|e| {
            panic!("remote put left no {}: {e}\n{}", remote.display(), report())
        });
        assert_same_bytes("file written by `remote put`", &put, data);
        let back = std::fs::read(got)
            .unwrap_or_else(|e| panic!("remote get left no {}: {e}\n{}", got.display(), report()));
        assert_same_bytes("file read by `remote get`", &back, data);
    }
    assert!(
        elapsed < GDB_LIMIT,
        "gdb took {elapsed:?}, something stalled\n{}",
        report()
    );
    // The X packets reached gdbserver byte for byte (gdb escapes only
    // `#$}*` in binary data): IAC, IAC IAC, CR NUL and CR LF untouched.
    let vm_input = bridge
        .vm_input
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    for packet in [&b",8:\xff\x00\xff\xff\x0d\x00\x0d\x0a#"[..], b",1:\xff#"] {
        assert!(
            contains(&vm_input, packet),
            "gdbserver's input lacks the X packet data [{}]\n{}",
            vspc_testkit::sim::hex(packet),
            report()
        );
    }
    // gdbserver itself stays up for the next gdb; the guard stops it.
}

// ---------------------------------------------------------------------------
// socat.

/// socat both ways at once: its first bytes are data (not IAC), so it is a
/// raw client, and each side gets exactly what the other sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socat_raw_both_ways_every_byte_value() {
    bounded(socat_raw_both_ways_every_byte_value_steps()).await;
}

async fn socat_raw_both_ways_every_byte_value_steps() {
    let socat = require("socat", "socat");
    let d = Daemon::builder().start();
    let id = Identity::numbered(2);
    let (vm, port) = vm_up(&d, &id).await;

    let up = all_bytes(16); // console -> VM; starts with NUL
    let down = all_bytes_down(16); // VM -> console; starts with 0xFF
    let started = Instant::now();
    let mut client = Proc::start(
        "socat",
        Command::new(&socat).args(["-", &format!("TCP:127.0.0.1:{port}")]),
    );
    // socat sends these as soon as it is connected.
    client.write(&up[..256]);
    let first = vm.read_exact_data(256, T).await.unwrap_or_else(|e| {
        panic!(
            "VM did not get socat's first bytes: {e}\n{}",
            client.transcript()
        )
    });
    eprintln!(
        "socat's first 256 bytes reached the VM {:?} after socat started",
        started.elapsed()
    );
    assert_same_bytes("socat's first bytes at the VM", &first, &up[..256]);

    // Both directions at once, in pieces with a pause between them, so
    // that they cross (the pauses are the test, not a wait).
    let mut stdin = client.stdin.take().expect("socat stdin");
    let rest = up[256..].to_vec();
    let writer = tokio::task::spawn_blocking(move || {
        for piece in rest.chunks(500) {
            stdin.write_all(piece).and_then(|()| stdin.flush())?;
            std::thread::sleep(ms(2));
        }
        Ok::<_, std::io::Error>(stdin)
    });
    for piece in down.chunks(700) {
        vm.send(piece).await.expect("VM send");
        tokio::time::sleep(ms(2)).await;
    }
    let stdin = writer
        .await
        .expect("writer task")
        .expect("writing to socat's stdin");
    let got = vm
        .read_exact_data(up.len() - 256, T)
        .await
        .unwrap_or_else(|e| panic!("VM did not get all of socat's bytes: {e}"));
    assert_same_bytes("console -> VM", &[first, got].concat(), &up);
    let arrived = client.wait_out(T, |o| o.len() >= down.len()).await;
    assert!(arrived, "socat got too few bytes\n{}", client.transcript());
    client.wait_out(SHORT, |o| o.len() > down.len()).await;
    assert_same_bytes("VM -> socat", &client.out(), &down);
    let extra = vm.recv_data(ms(100)).await;
    assert!(
        extra.is_empty(),
        "VM got extra bytes [{}]",
        vspc_testkit::sim::hex(&extra)
    );

    // End of input: socat shuts its side down and exits.
    drop(stdin);
    let status = client.wait_exit(T).await;
    assert!(status.is_some(), "socat did not exit after its input ended");
}

/// `--console-protocol raw`: a socat that never sends anything gets exactly
/// the VM's bytes, and never a telnet negotiation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socat_read_only_with_console_protocol_raw() {
    bounded(socat_read_only_with_console_protocol_raw_steps()).await;
}

async fn socat_read_only_with_console_protocol_raw_steps() {
    let socat = require("socat", "socat");
    let d = Daemon::builder()
        .args(&["--console-protocol", "raw"])
        .start();
    let id = Identity::numbered(3);
    let (vm, port) = vm_up(&d, &id).await;

    let client = Proc::start(
        "socat",
        Command::new(&socat).args(["-u", &format!("TCP:127.0.0.1:{port}"), "-"]),
    );
    wait_consoles(&d, &id.name, 1).await;
    // Nothing, well past the time a silent console would be offered telnet.
    assert!(
        !client.wait_out(DETECT_WINDOW * 2, |o| !o.is_empty()).await,
        "a raw-mode console was sent something before the VM spoke\n{}",
        client.transcript()
    );
    let down = all_bytes_down(8);
    vm.send(&down).await.expect("VM send");
    let arrived = client.wait_out(T, |o| o.len() >= down.len()).await;
    assert!(arrived, "socat got too few bytes\n{}", client.transcript());
    client.wait_out(SHORT, |o| o.len() > down.len()).await;
    assert_same_bytes("VM -> read-only socat (raw mode)", &client.out(), &down);
}

/// The default (auto) mode with a socat that never sends anything: after
/// 0.3 s of silence it is offered telnet (the 15-byte opening); it never
/// answers, so the VM's output then reaches it raw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socat_silent_console_is_offered_telnet_then_served_raw() {
    bounded(socat_silent_console_is_offered_telnet_then_served_raw_steps()).await;
}

async fn socat_silent_console_is_offered_telnet_then_served_raw_steps() {
    let socat = require("socat", "socat");
    let d = Daemon::builder().start();
    let id = Identity::numbered(4);
    let (vm, port) = vm_up(&d, &id).await;

    let client = Proc::start(
        "socat",
        Command::new(&socat).args(["-u", &format!("TCP:127.0.0.1:{port}"), "-"]),
    );
    wait_consoles(&d, &id.name, 1).await;
    let offered = client.wait_out(T, |o| o.len() >= OFFER.len()).await;
    assert!(
        offered,
        "no telnet offer to a silent console\n{}",
        client.transcript()
    );
    let down = all_bytes_down(4);
    vm.send(&down).await.expect("VM send");
    // Held for at most a second, waiting for an answer that never comes.
    let limit = Duration::from_secs(3);
    let arrived = client
        .wait_out(limit, |o| o.len() >= OFFER.len() + down.len())
        .await;
    assert!(
        arrived,
        "the VM's output did not reach the silent console within {limit:?}\n{}",
        client.transcript()
    );
    client
        .wait_out(SHORT, |o| o.len() > OFFER.len() + down.len())
        .await;
    assert_same_bytes(
        "silent console: the offer, then the VM's bytes raw",
        &client.out(),
        &[OFFER, &down].concat(),
    );
}

/// The commonest ways to capture a console never send a byte: `socat -u
/// TCP:HOST:PORT FILE` and `nc HOST PORT > FILE` (netcat-openbsd, with its
/// stdin at EOF and -d so it does not read it). A 4 MiB burst that starts
/// the moment they connect, while they are still being told apart, reaches
/// each whole: the offer, then every byte raw, nothing skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socat_and_nc_that_never_speak_get_every_byte_of_a_burst_at_connect() {
    bounded(socat_and_nc_that_never_speak_get_every_byte_of_a_burst_at_connect_steps()).await;
}

async fn socat_and_nc_that_never_speak_get_every_byte_of_a_burst_at_connect_steps() {
    let socat = require("socat", "socat");
    let nc = require("nc", "netcat-openbsd");
    let d = Daemon::builder().start();
    let down: Vec<u8> = (0..4 << 20).map(|i: u32| (i % 251) as u8).collect();
    for (k, program) in ["socat", "nc"].into_iter().enumerate() {
        let id = Identity::numbered(40 + k as u32);
        let (vm, port) = vm_up(&d, &id).await;
        let target = format!("TCP:127.0.0.1:{port}");
        let port_s = port.to_string();
        let client = match program {
            "socat" => Proc::start("socat -u", Command::new(&socat).args(["-u", &target, "-"])),
            _ => Proc::start("nc", Command::new(&nc).args(["-d", "127.0.0.1", &port_s])),
        };
        wait_consoles(&d, &id.name, 1).await;
        // At once: inside the 0.3 s detection window.
        vm.send(&down).await.expect("VM send");
        let want = OFFER.len() + down.len();
        let arrived = client
            .wait_out(Duration::from_secs(20), |o| o.len() >= want)
            .await;
        assert!(
            arrived,
            "{program}: {} of {want} bytes arrived\n{}",
            client.out().len(),
            d.log()
        );
        client.wait_out(SHORT, |o| o.len() > want).await;
        assert_same_bytes(
            &format!("{program}: the offer, then every byte raw"),
            &client.out(),
            &[OFFER, &down].concat(),
        );
    }
    assert!(!d.log().contains("skipped"), "{}", d.log());
}

// ---------------------------------------------------------------------------
// Telnet clients on a terminal.

/// inetutils telnet: it answers the offer, so it is served telnet; BINARY
/// is agreed both ways (its `toggle options` trace shows it). The VM's
/// output, 8-bit bytes included, shows on its terminal; what is typed
/// (8-bit too) reaches the VM exactly, Enter as a bare CR.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inetutils_telnet_binary_session() {
    bounded(inetutils_telnet_binary_session_steps()).await;
}

async fn inetutils_telnet_binary_session_steps() {
    let telnet = require_inetutils_telnet();
    let d = Daemon::builder().start();
    let id = Identity::numbered(5);
    let (vm, port) = vm_up(&d, &id).await;
    let telnet = telnet.to_str().expect("utf-8 path").to_string();
    // Start at telnet's prompt, so its option processing can be shown.
    let mut client = on_pty("telnet", &[&telnet]);
    assert!(
        client.wait_for(b"telnet> ", T).await,
        "no telnet> prompt\n{}",
        client.transcript()
    );
    client.write(b"toggle options\r");
    assert!(
        client.wait_for(b"option processing", T).await,
        "`toggle options` not taken\n{}",
        client.transcript()
    );
    client.write(format!("open 127.0.0.1 {port}\r").as_bytes());
    assert!(
        client.wait_for(b"Escape character is", T).await,
        "telnet did not connect\n{}",
        client.transcript()
    );
    wait_consoles(&d, &id.name, 1).await;
    // The offer, answered: both ways BINARY, as telnet's trace shows.
    for line in [
        &b"RCVD WILL BINARY"[..],
        b"SENT DO BINARY",
        b"RCVD DO BINARY",
        b"SENT WILL BINARY",
        b"RCVD WILL ECHO",
        b"SENT DO ECHO",
    ] {
        assert!(
            client.wait_for(line, T).await,
            "telnet did not report {:?}\n{}",
            String::from_utf8_lossy(line),
            client.transcript()
        );
    }
    // telnet switched its terminal to character mode while taking the offer;
    // the VM's output comes after it.
    let hello = b"hello from the VM \xc3\xa9\xff\xfe\r\n";
    vm.send(hello).await.expect("VM send");
    assert!(
        client.wait_for(hello, T).await,
        "the VM's output (8-bit bytes included) did not reach telnet's terminal\n{}",
        client.transcript()
    );

    // 8-bit input: UTF-8 and 0xFF (which telnet sends as IAC IAC).
    let typed = b"echo h\xc3\xa9\xff";
    client.write(typed);
    let got = vm
        .read_exact_data(typed.len(), T)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "VM did not get telnet's typing: {e}\n{}",
                client.transcript()
            )
        });
    assert_same_bytes("typed in telnet, at the VM", &got, typed);
    // Enter: a binary-mode telnet sends the terminal's CR as it is.
    client.write(b"\r");
    let got = vm
        .read_exact_data(1, T)
        .await
        .unwrap_or_else(|e| panic!("VM did not get Enter: {e}\n{}", client.transcript()));
    assert_same_bytes("Enter in telnet, at the VM", &got, b"\r");
    let extra = vm.recv_data(SHORT).await;
    assert!(
        extra.is_empty(),
        "VM got extra bytes after Enter: [{}]",
        vspc_testkit::sim::hex(&extra)
    );

    // Ctrl-] then `quit`: telnet leaves.
    let mark = client.mark();
    client.write(b"\x1d");
    assert!(
        client.wait_for_since(mark, b"telnet>", T).await,
        "no telnet> prompt after Ctrl-]\n{}",
        client.transcript()
    );
    let status = client.keys_until_exit(b"quit\n", T).await;
    assert!(
        status.is_some(),
        "telnet did not quit\n{}",
        client.transcript()
    );
    let extra = vm.recv_data(ms(100)).await;
    assert!(
        extra.is_empty(),
        "VM got [{}] from telnet's quit",
        vspc_testkit::sim::hex(&extra)
    );
}

/// `--console-replay`: inetutils telnet run as users run it
/// (`telnet HOST PORT`, silent until the daemon's offer) is shown what the
/// VM printed before it came, then the marker, then live output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inetutils_telnet_is_shown_the_recent_output_with_console_replay() {
    bounded(inetutils_telnet_is_shown_the_recent_output_with_console_replay_steps()).await;
}

async fn inetutils_telnet_is_shown_the_recent_output_with_console_replay_steps() {
    let telnet = require_inetutils_telnet();
    let http_port = free_port();
    let http = std::net::SocketAddr::from(([127, 0, 0, 1], http_port));
    let d = Daemon::builder()
        .args(&["--console-replay", "--http-port", &http_port.to_string()])
        .start();
    let id = Identity::numbered(7);
    let (vm, port) = vm_up(&d, &id).await;
    let past = b"kernel panic before anyone came\r\n";
    vm.send(past).await.expect("VM send");
    let recent = format!("/api/v1/vms/{}/recent", id.name);
    let in_ring = async || crate::http::get(http, &recent).await.body.ends_with(past);
    assert!(
        eventually_async(T, in_ring).await,
        "the VM's output never reached its replay ring"
    );
    let telnet = telnet.to_str().expect("utf-8 path").to_string();
    let port_s = port.to_string();
    let client = on_pty("telnet", &[&telnet, "127.0.0.1", &port_s]);
    let shown = [&past[..], LIVE].concat();
    assert!(
        client.wait_for(&shown, T).await,
        "telnet was not shown the recent output, then the marker\n{}",
        client.transcript()
    );
    let mark = client.mark();
    vm.send(b"live now\r\n").await.expect("VM send");
    assert!(
        client.wait_for_since(mark, b"live now\r\n", T).await,
        "live output did not follow\n{}",
        client.transcript()
    );
    assert_eq!(
        memchr::memmem::find_iter(&client.out(), past).count(),
        1,
        "the recent output was shown more than once\n{}",
        client.transcript()
    );
}

/// BusyBox telnet refuses BINARY (NVT rules) and sends CR LF for Enter; the
/// VM must get a bare CR. The VM's output shows on its terminal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busybox_telnet_enter_is_a_bare_cr() {
    bounded(busybox_telnet_enter_is_a_bare_cr_steps()).await;
}

async fn busybox_telnet_enter_is_a_bare_cr_steps() {
    let busybox = require_busybox_telnet();
    let d = Daemon::builder().start();
    let id = Identity::numbered(6);
    let (vm, port) = vm_up(&d, &id).await;
    let busybox = busybox.to_str().expect("utf-8 path").to_string();
    let mut client = on_pty(
        "busybox telnet",
        &[&busybox, "telnet", "127.0.0.1", &port.to_string()],
    );

    assert!(
        client.wait_for(b"Connected to", T).await,
        "busybox telnet did not connect\n{}",
        client.transcript()
    );
    wait_consoles(&d, &id.name, 1).await;
    // It has taken the offer (and answered it, IAC first, so it is a telnet
    // client) before anything is typed.
    assert!(
        client.wait_for(b"Entering character mode", T).await,
        "busybox telnet was not offered telnet (character mode)\n{}",
        client.transcript()
    );
    vm.send(b"hello from the VM\r\n").await.expect("VM send");
    assert!(
        client.wait_for(b"hello from the VM\r\n", T).await,
        "the VM's output did not reach busybox telnet's terminal\n{}",
        client.transcript()
    );

    client.write(b"echo hi\r");
    let got = vm.read_exact_data(8, T).await.unwrap_or_else(|e| {
        panic!(
            "VM did not get busybox's line: {e}\n{}",
            client.transcript()
        )
    });
    let extra = vm.recv_data(SHORT).await;
    assert_same_bytes(
        "`echo hi` + Enter in busybox telnet, at the VM",
        &[got, extra].concat(),
        b"echo hi\r",
    );

    // Ctrl-] then `e`: busybox telnet exits.
    client.write(b"\x1d");
    assert!(
        client.wait_for(b"Console escape", T).await,
        "no escape menu after Ctrl-]\n{}",
        client.transcript()
    );
    let status = client.keys_until_exit(b"e", T).await;
    assert!(
        status.is_some(),
        "busybox telnet did not exit\n{}",
        client.transcript()
    );
}
