//! End-to-end tests of the admin port: the native line protocol, vSPC.py's
//! pickle query protocol (through `tests/vspc_session.py` and a small Rust
//! client), console sessions opened through both, the per-VM locks, `clear`,
//! `--no-vm-ports`, and hostile input. Every test starts its own daemon; the
//! daemon's log is printed when a test fails.

use std::io::{self, BufRead, BufReader};
use std::path::Path;
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::{json, Value as Json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use vspc_codec::pickle::{self, Value};
use vspc_codec::wire::{opt, Verb};
use vspc_testkit::sim::{hex, ConsoleOptions, Identity, Received, SimConsole, SimVm};

/// What `clear` tells every console.
const CLEARED: &str = "vspc: this console was cleared by an administrator.";
/// Part of what a read-only port console is told.
const READ_ONLY_NOTICE: &str = "this console is read-only";

// ---------------------------------------------------------------------------
// Helpers: a stream that replays bytes already read.

/// A TCP stream whose reads first return `head`: bytes a protocol reader
/// took from the socket beyond its last message, which belong to the telnet
/// session that follows.
struct Prefixed {
    head: Vec<u8>,
    inner: TcpStream,
}

impl AsyncRead for Prefixed {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.head.is_empty() {
            let n = this.head.len().min(buf.remaining());
            buf.put_slice(&this.head[..n]);
            this.head.drain(..n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A simulated telnet user on `stream` (after an admin protocol's answer),
/// once the daemon's BINARY offers have been answered.
async fn console_on(stream: TcpStream, leftover: Vec<u8>) -> SimConsole {
    let console = SimConsole::start(
        Prefixed {
            head: leftover,
            inner: stream,
        },
        &ConsoleOptions::default(),
    );
    console
        .wait_negotiated(T)
        .await
        .unwrap_or_else(|e| panic!("admin console session: no telnet opening: {e}"));
    console
}

// ---------------------------------------------------------------------------
// Helpers: the native protocol.

/// A native-protocol admin connection.
struct Native {
    stream: TcpStream,
    /// Received bytes not yet consumed as answer lines.
    buf: Vec<u8>,
}

impl Native {
    async fn connect(d: &Daemon) -> Native {
        let stream = TcpStream::connect(d.admin)
            .await
            .unwrap_or_else(|e| panic!("connect to the admin port {}: {e}", d.admin));
        stream.set_nodelay(true).expect("nodelay");
        Native {
            stream,
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream
            .write_all(bytes)
            .await
            .expect("write to the admin port");
    }

    /// The next answer line as JSON; `None` if the daemon closed first.
    async fn next_answer(&mut self, limit: Duration) -> Option<Json> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                let text = String::from_utf8(line).expect("answer lines are UTF-8");
                let value = serde_json::from_str(text.trim_end())
                    .unwrap_or_else(|e| panic!("answer {text:?} is not JSON: {e}"));
                return Some(value);
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => panic!(
                    "no answer line within {limit:?}; pending {:?}",
                    String::from_utf8_lossy(&self.buf)
                ),
                Ok(Ok(0)) | Ok(Err(_)) => return None,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    async fn answer(&mut self) -> Json {
        self.next_answer(T)
            .await
            .expect("the daemon closed the connection instead of answering")
    }

    /// Send `cmd` and a newline; the answer.
    async fn ask(&mut self, cmd: &str) -> Json {
        self.send(format!("{cmd}\n").as_bytes()).await;
        self.answer().await
    }

    /// Whether the daemon closes the connection within `limit`; what it
    /// sends meanwhile is kept in `buf`.
    async fn closes(&mut self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// The connection after a successful `connect`: a telnet console.
    async fn into_console(self) -> SimConsole {
        console_on(self.stream, self.buf).await
    }
}

/// Assert an error answer with `code` and a message.
fn assert_error(answer: &Json, code: &str, what: &str) {
    assert_eq!(answer["ok"], json!(false), "{what}: {answer}");
    assert_eq!(answer["code"], json!(code), "{what}: {answer}");
    assert!(
        answer["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{what}: no error message in {answer}"
    );
}

/// The native `list` rows.
async fn native_list(d: &Daemon) -> Vec<Json> {
    let mut c = Native::connect(d).await;
    let answer = c.ask("list").await;
    assert_eq!(answer["ok"], json!(true), "list: {answer}");
    answer["vms"]
        .as_array()
        .unwrap_or_else(|| panic!("list without a vms array: {answer}"))
        .clone()
}

/// The native `list` row of the VM called `name`, if listed.
async fn native_row(d: &Daemon, name: &str) -> Option<Json> {
    native_vm(d.admin, name).await
}

/// `connect VM [MODE]` on a new connection: the answer and the console, or
/// the error answer.
pub(crate) async fn native_connect(
    d: &Daemon,
    vm: &str,
    mode: Option<&str>,
) -> Result<(Json, SimConsole), Json> {
    let mut c = Native::connect(d).await;
    let cmd = match mode {
        Some(m) => format!("connect {vm} {m}"),
        None => format!("connect {vm}"),
    };
    let answer = c.ask(&cmd).await;
    if answer["ok"] == json!(true) {
        Ok((answer, c.into_console().await))
    } else {
        Err(answer)
    }
}

// ---------------------------------------------------------------------------
// Helpers: the pickle protocol, from Rust.

/// A query-protocol connection reading back-to-back pickles.
struct PickleConn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl PickleConn {
    async fn connect(d: &Daemon) -> PickleConn {
        let stream = TcpStream::connect(d.admin)
            .await
            .unwrap_or_else(|e| panic!("connect to the admin port {}: {e}", d.admin));
        stream.set_nodelay(true).expect("nodelay");
        PickleConn {
            stream,
            buf: Vec::new(),
        }
    }

    /// Write `bytes`; a failure (the daemon already closed) is ignored.
    async fn send(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes).await;
    }

    /// The next pickle; `None` once the daemon has closed the connection.
    async fn next(&mut self) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + T;
        loop {
            if !self.buf.is_empty() {
                match pickle::decode(&self.buf, 1 << 20) {
                    Ok(Some((value, used))) => {
                        self.buf.drain(..used);
                        return Some(value);
                    }
                    Ok(None) => {}
                    Err(e) => panic!("the daemon sent a bad pickle: {e}"),
                }
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => panic!("no pickle from the daemon within {T:?}"),
                Ok(Ok(0)) | Ok(Err(_)) => {
                    assert!(
                        self.buf.is_empty(),
                        "the daemon closed in the middle of a pickle: {:02x?}",
                        self.buf
                    );
                    return None;
                }
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Every pickle until the daemon closes.
    async fn rest(&mut self) -> Vec<Value> {
        let mut all = Vec::new();
        while let Some(v) = self.next().await {
            all.push(v);
        }
        all
    }
}

/// How a query-protocol request for a console went.
pub(crate) enum PickleAnswer {
    /// `vm_found`, the applied mode, the seed, and the console session.
    Found {
        mode: String,
        seed: String,
        console: SimConsole,
    },
    /// Any other status and whatever followed it.
    Other(String, Vec<Value>),
}

async fn next_str(c: &mut PickleConn) -> String {
    match c.next().await {
        Some(Value::Str(s)) => s,
        other => panic!("after vm_found: {other:?}, wanted a str"),
    }
}

/// Ask for a console on `vm` with lock `mode`, as vSPCClient does.
pub(crate) async fn pickle_session(d: &Daemon, vm: &str, mode: &str) -> PickleAnswer {
    let mut c = PickleConn::connect(d).await;
    let mut ask = PICKLE_VERSION_3.to_vec();
    ask.extend(pickle_str(vm));
    ask.extend(pickle_str(mode));
    c.send(&ask).await;
    assert_eq!(c.next().await, Some(Value::Int(3)), "server version");
    let status = match c.next().await {
        Some(Value::Str(s)) => s,
        other => panic!("status for {vm:?}/{mode:?}: {other:?}"),
    };
    if status != "vm_found" {
        let rest = c.rest().await;
        return PickleAnswer::Other(status, rest);
    }
    let mode = next_str(&mut c).await;
    let seed = next_str(&mut c).await;
    let console = console_on(c.stream, c.buf).await;
    PickleAnswer::Found {
        mode,
        seed,
        console,
    }
}

// ---------------------------------------------------------------------------
// Helpers: the Python client.

fn have_python() -> bool {
    Command::new("python3")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `tests/vspc_session.py`, running; killed when dropped.
pub(crate) struct PySession {
    child: std::process::Child,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    /// Every line so far (stderr lines prefixed `stderr: `).
    seen: Vec<String>,
}

impl PySession {
    pub(crate) fn start(d: &Daemon, vm: &str, mode: &str, seconds: u32, send: &[u8]) -> PySession {
        let mut cmd = Command::new("python3");
        cmd.arg(repo_root().join("tests/vspc_session.py"))
            .arg(d.admin.ip().to_string())
            .arg(d.admin.port().to_string())
            .arg(vm)
            .arg(mode)
            .arg(seconds.to_string());
        if !send.is_empty() {
            cmd.arg("--send").arg(hex(send));
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run python3 tests/vspc_session.py");
        let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
        let out = child.stdout.take().expect("stdout");
        let err = child.stderr.take().expect("stderr");
        let tx2 = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                if tx2.send(format!("stderr: {line}")).is_err() {
                    break;
                }
            }
        });
        PySession {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Take one more line; false when the script's output has ended.
    async fn pull(&mut self, deadline: tokio::time::Instant) -> bool {
        match tokio::time::timeout_at(deadline, self.lines.recv()).await {
            Ok(Some(line)) => {
                self.seen.push(line);
                true
            }
            Ok(None) => false,
            Err(_) => panic!(
                "vspc_session.py: nothing new within {T:?}; output so far:\n{}",
                self.seen.join("\n")
            ),
        }
    }

    /// The rest of the first line starting with `prefix`.
    pub(crate) async fn line(&mut self, prefix: &str) -> String {
        let deadline = tokio::time::Instant::now() + T;
        loop {
            if let Some(l) = self.seen.iter().find(|l| l.starts_with(prefix)) {
                return l[prefix.len()..].to_string();
            }
            if !self.pull(deadline).await {
                panic!(
                    "vspc_session.py ended without a {prefix:?} line; output:\n{}",
                    self.seen.join("\n")
                );
            }
        }
    }

    /// Every console data byte the script has printed.
    fn data(&self) -> Vec<u8> {
        self.seen
            .iter()
            .filter_map(|l| l.strip_prefix("data="))
            .flat_map(unhex)
            .collect()
    }

    /// Wait until at least `n` data bytes arrived; all of them.
    pub(crate) async fn data_at_least(&mut self, n: usize) -> Vec<u8> {
        let deadline = tokio::time::Instant::now() + T;
        while self.data().len() < n {
            if !self.pull(deadline).await {
                break;
            }
        }
        self.data()
    }

    /// Every line, after the script has exited.
    async fn finish(mut self) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + T;
        while self.pull(deadline).await {}
        let _ = self.child.wait();
        std::mem::take(&mut self.seen)
    }
}

impl Drop for PySession {
    fn drop(&mut self) {
        // Only our own child, by its handle.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn unhex(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2), "odd hex {s:?}");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

// ---------------------------------------------------------------------------
// Other helpers.

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("vspc-admin-")
        .tempdir()
        .expect("temp dir")
}

/// Wait until the Logging backend's transcript of `name` in `dir` holds
/// `needle`: from then on it is in the context new consoles are shown.
async fn wait_transcript(dir: &Path, name: &str, needle: &[u8]) {
    let path = dir.join(format!("{name}.log"));
    let held = |bytes: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    assert!(
        eventually(T, || file_holds(&path, held)).await,
        "{} never held {needle:?}",
        path.display()
    );
}

/// A marker no other call returns.
fn marker(what: &str) -> Vec<u8> {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("<{what} {}>", N.fetch_add(1, Ordering::Relaxed)).into_bytes()
}

/// Type `data` and an `IAC DO 99` on `console`, and wait for the daemon's
/// `WONT 99`: from then on the daemon has handled `data`.
async fn type_and_sync(console: &SimConsole, data: &[u8]) {
    let wont = Received::Negotiate(Verb::Wont, 99);
    let before = console.events().iter().filter(|e| **e == wont).count();
    let mut bytes = vspc_codec::wire::encode::escaped(data);
    bytes.extend_from_slice(&[0xff, 0xfd, 99]);
    console.send_raw(&bytes).await.expect("console write");
    let answered = || console.events().iter().filter(|e| **e == wont).count() > before;
    assert!(
        eventually(T, answered).await,
        "the daemon never answered IAC DO 99"
    );
}

/// Input typed on `console` reaches `vm` exactly.
async fn input_reaches(vm: &SimVm, console: &SimConsole, what: &str) {
    let m = marker(what);
    console.send(&m).await.expect("console write");
    let got = vm
        .read_exact_data(m.len(), T)
        .await
        .unwrap_or_else(|e| panic!("{what}: input did not reach the VM: {e}"));
    assert_eq!(got, m, "{what}: the VM got other input");
}

/// Output of `vm` reaches `console` exactly.
async fn output_reaches(vm: &SimVm, console: &SimConsole, what: &str) {
    let m = marker(what);
    vm.send(&m).await.expect("VM write");
    let got = console
        .read_until(&m, T)
        .await
        .unwrap_or_else(|e| panic!("{what}: VM output did not reach the console: {e}"));
    assert!(got.ends_with(&m), "{what}: {got:?}");
}

// ---------------------------------------------------------------------------
// 1. The native protocol's commands and errors.

#[tokio::test]
async fn native_listing_and_errors() {
    let d = Daemon::start(&[]);
    let a = Identity::numbered(101);
    let b = Identity::numbered(102);
    let (vm_a, port_a) = vm_up(&d, &a).await;
    let (_vm_b, port_b) = vm_up(&d, &b).await;
    let port_console = console_synced(&vm_a, &d, port_a).await;

    let mut c = Native::connect(&d).await;
    assert_eq!(
        c.ask("version").await,
        json!({"ok": true, "version": env!("CARGO_PKG_VERSION"), "protocol": 1})
    );
    // Two VMs, both connected, one console; the daemon's allocator says
    // how much it holds.
    let stats = c.ask("stats").await;
    assert_eq!(
        (
            &stats["ok"],
            &stats["vms"],
            &stats["vms_connected"],
            &stats["consoles"]
        ),
        (&json!(true), &json!(2), &json!(2), &json!(1)),
        "{stats}"
    );
    let allocated = stats["heap_allocated_bytes"].as_u64();
    let resident = stats["heap_resident_bytes"].as_u64();
    assert!(
        matches!((allocated, resident), (Some(a), Some(r)) if a > 0 && a <= r),
        "{stats}"
    );
    let help = c.ask("help").await;
    assert_eq!(help["ok"], json!(true), "{help}");
    let commands: Vec<&str> = help["commands"]
        .as_array()
        .unwrap_or_else(|| panic!("help without commands: {help}"))
        .iter()
        .filter_map(Json::as_str)
        .collect();
    for word in [
        "list", "connect", "clear", "stats", "version", "help", "quit",
    ] {
        assert!(
            commands.iter().any(|c| c.split(' ').next() == Some(word)),
            "help lacks {word}: {commands:?}"
        );
    }
    assert_eq!(
        c.ask("list").await,
        json!({"ok": true, "vms": [
            {"name": a.name, "uuid": a.uuid_display(), "port": port_a,
             "vm_connected": true, "consoles": 1},
            {"name": b.name, "uuid": b.uuid_display(), "port": port_b,
             "vm_connected": true, "consoles": 0},
        ]})
    );

    assert_error(
        &c.ask("frobnicate now").await,
        "bad_command",
        "unknown command",
    );
    assert_error(&c.ask("connect").await, "bad_command", "connect without VM");
    assert_error(&c.ask("clear").await, "bad_command", "clear without VM");
    let nf = c.ask("connect nosuch").await;
    assert_error(&nf, "vm_not_found", "connect nosuch");
    let mut known: Vec<&str> = nf["known"]
        .as_array()
        .unwrap_or_else(|| panic!("vm_not_found without known: {nf}"))
        .iter()
        .filter_map(Json::as_str)
        .collect();
    known.sort();
    assert_eq!(known, [a.name.as_str(), b.name.as_str()]);
    assert_error(&c.ask("clear nosuch").await, "vm_not_found", "clear nosuch");
    assert_error(
        &c.ask(&format!("connect {} sideways", a.name)).await,
        "lock_invalid",
        "bad lock mode",
    );
    // A refused lock leaves the connection in command mode.
    assert_error(
        &c.ask(&format!("connect {} exclusive", a.name)).await,
        "lock_failed",
        "exclusive while a port console is attached",
    );
    // Blank lines get no answer; CR LF ends a line too; pipelined commands
    // are answered in order.
    c.send(b"\n\r\n   \n\t\nversion\r\nlist\n").await;
    assert_eq!(c.answer().await["protocol"], json!(1));
    assert!(c.answer().await["vms"].is_array());
    c.send(b"quit\n").await;
    assert!(c.closes(T).await, "quit did not close the connection");
    assert!(c.buf.is_empty(), "quit answered {:?}", c.buf);

    // The VM by uuid, in the listing's form and in ESXi's spaced form.
    for spelling in [a.uuid_display(), format!("\"{}\"", a.uuid_text())] {
        let (answer, console) = native_connect(&d, &spelling, Some("free-for-all"))
            .await
            .unwrap_or_else(|e| panic!("connect {spelling}: {e}"));
        assert_eq!(answer["mode"], json!("free-for-all"), "{answer}");
        assert_eq!(answer["vm"]["name"], json!(a.name), "{answer}");
        console.close().await;
    }

    // Over-long lines: an error, then the connection closes.
    let mut long = Native::connect(&d).await;
    long.send(&[b'x'; 5000]).await;
    assert_error(&long.answer().await, "bad_command", "5000 bytes without LF");
    assert!(long.closes(T).await, "still open after an over-long line");

    // Still serving.
    assert_eq!(native_list(&d).await.len(), 2);
    input_reaches(&vm_a, &port_console, "port console after admin traffic").await;

    // The same with the LF inside the 5000 bytes: still over the limit.
    let mut long = Native::connect(&d).await;
    let mut line = b"list ".to_vec();
    line.resize(4999, b'y');
    line.push(b'\n');
    long.send(&line).await;
    let answer = long.answer().await;
    assert_eq!(
        answer["ok"],
        json!(false),
        "a 5000-byte line (longer than the 4096-byte limit) was executed: {}",
        answer.to_string().chars().take(200).collect::<String>()
    );
    assert!(long.closes(T).await, "still open after an over-long line");
}

// ---------------------------------------------------------------------------
// 2. A native console session is byte-exact both ways.

#[tokio::test]
async fn native_session_byte_exact() {
    let dir = tempdir();
    let logdir = dir.path().to_str().expect("UTF-8 temp path");
    let d = Daemon::start(&["--backend", "Logging", "-l", logdir]);
    let id = Identity::numbered(201);
    let (vm, port) = vm_up(&d, &id).await;
    let seed = b"boot: recent output\r\n";
    vm.send(seed).await.expect("VM write");
    wait_transcript(dir.path(), &id.name, seed).await;

    // The default mode is free-for-all-fallback: free-for-all when nobody
    // holds a write lock.
    let (answer, console) = native_connect(&d, &id.name, None)
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"));
    assert_eq!(
        answer,
        json!({"ok": true, "mode": "free-for-all", "vm": {
            "name": id.name, "uuid": id.uuid_display(), "port": port,
            "vm_connected": true, "consoles": 1}})
    );
    // The telnet opening comes first, in this order.
    eventually(T, || console.events().len() >= 5).await;
    let opening = [
        Received::Negotiate(Verb::Will, opt::ECHO),
        Received::Negotiate(Verb::Will, opt::SGA),
        Received::Negotiate(Verb::Will, opt::BINARY),
        Received::Negotiate(Verb::Do, opt::BINARY),
        Received::Negotiate(Verb::Do, opt::SGA),
    ];
    assert_eq!(console.events().get(..5), Some(&opening[..]), "opening");
    // Then the recent output, then live output.
    let got = console.read_exact_data(seed.len(), T).await.expect("seed");
    assert_eq!(got, seed, "seed");
    let marker = console
        .read_exact_data(LIVE.len(), T)
        .await
        .expect("marker");
    assert_eq!(marker, LIVE, "the end of the replay is marked");
    sync_console(&vm, &console).await;
    assert!(console.binary(), "the console should be in BINARY mode");

    let data = all_bytes(2);
    vm.send(&data).await.expect("VM write");
    let got = console
        .read_exact_data(data.len(), T)
        .await
        .expect("VM output");
    assert_eq!(hex(&got), hex(&data), "VM -> native console");
    console.send(&data).await.expect("console write");
    let got = vm.read_exact_data(data.len(), T).await.expect("input");
    assert_eq!(hex(&got), hex(&data), "native console -> VM");
    assert!(vm.recv_data(SHORT).await.is_empty(), "extra input");
    assert!(console.recv_data(SHORT).await.is_empty(), "extra output");

    console.close().await;
    wait_consoles(&d, &id.name, 0).await;
    assert!(vm.closed().is_none(), "the VM connection ended");
}

// ---------------------------------------------------------------------------
// 3. The lock matrix.

/// Who asks for a console: an admin session with a lock mode, or a telnet
/// user on the VM's console port (which asks for free-for-all-fallback).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Side {
    Exclusive,
    Write,
    FreeForAll,
    Fallback,
    Port,
}

const SIDES: [Side; 5] = [
    Side::Exclusive,
    Side::Write,
    Side::FreeForAll,
    Side::Fallback,
    Side::Port,
];

#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    /// Granted with this access (the native protocol's name).
    Granted(&'static str),
    /// Attached, but input is discarded.
    ReadOnly,
    Refused,
}

impl Side {
    fn mode(self) -> &'static str {
        match self {
            Side::Exclusive => "exclusive",
            Side::Write => "write",
            Side::FreeForAll => "free-for-all",
            Side::Fallback => "free-for-all-fallback",
            Side::Port => "(port console)",
        }
    }

    /// What it gets on a VM without consoles.
    fn alone(self) -> Outcome {
        match self {
            Side::Exclusive => Outcome::Granted("exclusive"),
            Side::Write => Outcome::Granted("write"),
            _ => Outcome::Granted("free-for-all"),
        }
    }
}

/// What `req` gets while `held` (granted alone) is attached.
fn expected(held: Side, req: Side) -> Outcome {
    use Side::*;
    match (held, req) {
        // Exclusive: nobody else; and it needs nobody else.
        (Exclusive, _) | (_, Exclusive) => Outcome::Refused,
        (Write, Write | FreeForAll) => Outcome::Refused,
        (Write, Fallback | Port) => Outcome::ReadOnly,
        // A free-for-all console (port consoles included) may write.
        (_, Write) => Outcome::Refused,
        _ => Outcome::Granted("free-for-all"),
    }
}

/// Ask for a console on `id`'s VM as `side`.
async fn open(
    d: &Daemon,
    vm: &SimVm,
    id: &Identity,
    port: u16,
    side: Side,
) -> (Outcome, Option<SimConsole>) {
    if side == Side::Port {
        let console = SimConsole::connect(d.console(port))
            .await
            .unwrap_or_else(|e| panic!("port console: {e}"));
        // What the daemon says at attach time comes before this marker.
        let m = marker("attach");
        vm.send(&m).await.expect("VM write");
        return match console.read_until(&m, T).await {
            Ok(before) => {
                let text = String::from_utf8_lossy(&before).into_owned();
                if text.contains(READ_ONLY_NOTICE) {
                    (Outcome::ReadOnly, Some(console))
                } else {
                    assert!(!text.contains("vspc:"), "port console was told {text:?}");
                    (Outcome::Granted("free-for-all"), Some(console))
                }
            }
            Err(_) => {
                let (rest, closed) = console.read_to_end(T).await;
                let text = String::from_utf8_lossy(&rest);
                assert!(closed, "port console neither saw output nor closed");
                assert!(
                    text.contains("lock"),
                    "refused port console was told {text:?}"
                );
                (Outcome::Refused, None)
            }
        };
    }
    match native_connect(d, &id.name, Some(side.mode())).await {
        Ok((answer, console)) => {
            let outcome = match answer["mode"].as_str() {
                Some("exclusive") => Outcome::Granted("exclusive"),
                Some("write") => Outcome::Granted("write"),
                Some("free-for-all") => Outcome::Granted("free-for-all"),
                Some("read-only") => Outcome::ReadOnly,
                _ => panic!("connect {}: answer {answer}", side.mode()),
            };
            (outcome, Some(console))
        }
        Err(answer) => {
            assert_error(&answer, "lock_failed", side.mode());
            (Outcome::Refused, None)
        }
    }
}

async fn close_all(consoles: impl IntoIterator<Item = Option<SimConsole>>) {
    for c in consoles.into_iter().flatten() {
        c.close().await;
    }
}

#[tokio::test]
async fn lock_matrix_native() {
    let d = Daemon::start(&[]);
    let id = Identity::numbered(301);
    let (vm, port) = vm_up(&d, &id).await;
    let mut wrong = Vec::new();
    for held in SIDES {
        for req in SIDES {
            let (got_held, holder) = open(&d, &vm, &id, port, held).await;
            assert_eq!(got_held, held.alone(), "{held:?} on a VM without consoles");
            let (got, extra) = open(&d, &vm, &id, port, req).await;
            if got != expected(held, req) {
                wrong.push(format!(
                    "held {held:?}, asked {req:?}: got {got:?}, wanted {:?}",
                    expected(held, req)
                ));
            }
            wait_consoles(&d, &id.name, 1 + usize::from(extra.is_some())).await;
            let refused_or_limited = got != req.alone();
            close_all([holder, extra]).await;
            wait_consoles(&d, &id.name, 0).await;
            if refused_or_limited {
                // Locks end with their session: the same request now works.
                let (again, c) = open(&d, &vm, &id, port, req).await;
                if again != req.alone() {
                    wrong.push(format!(
                        "after {held:?} left, asked {req:?}: got {again:?}, wanted {:?}",
                        req.alone()
                    ));
                }
                close_all([c]).await;
                wait_consoles(&d, &id.name, 0).await;
            }
        }
    }
    drain_vm(&vm).await;
    assert!(wrong.is_empty(), "lock matrix:\n{}", wrong.join("\n"));
}

/// Read and drop the VM's pending console input.
async fn drain_vm(vm: &SimVm) {
    while !vm.recv_data(Duration::from_millis(50)).await.is_empty() {}
}

#[tokio::test]
async fn read_only_input_is_discarded() {
    let d = Daemon::start(&[]);
    let id = Identity::numbered(302);
    let (vm, port) = vm_up(&d, &id).await;

    let (answer, writer) = native_connect(&d, &id.name, Some("write"))
        .await
        .unwrap_or_else(|e| panic!("write lock: {e}"));
    assert_eq!(answer["mode"], json!("write"));
    let (answer, ro_native) = native_connect(&d, &id.name, Some("free-for-all-fallback"))
        .await
        .unwrap_or_else(|e| panic!("fallback: {e}"));
    assert_eq!(answer["mode"], json!("read-only"));
    let (outcome, ro_port) = open(&d, &vm, &id, port, Side::Port).await;
    assert_eq!(outcome, Outcome::ReadOnly);
    let ro_port = ro_port.expect("read-only port console");
    let ro_pickle = match pickle_session(&d, &id.name, "free_for_all_or_readonly").await {
        PickleAnswer::Found { mode, console, .. } => {
            assert_eq!(mode, "free_for_all_or_readonly");
            console
        }
        PickleAnswer::Other(status, rest) => panic!("pickle fallback: {status} {rest:?}"),
    };
    wait_consoles(&d, &id.name, 4).await;
    drain_vm(&vm).await;

    // Read-only input is handled and dropped; the writer's arrives alone.
    for (c, what) in [
        (&ro_native, "read-only native"),
        (&ro_port, "read-only port"),
        (&ro_pickle, "read-only pickle"),
    ] {
        type_and_sync(c, format!("typed on {what} \u{ff}\r\n").as_bytes()).await;
        output_reaches(&vm, c, what).await;
    }
    let input = b"from the writer \xff\x00\r\n";
    writer.send(input).await.expect("writer");
    assert_eq!(
        vm.read_exact_data(input.len(), T).await.expect("writer"),
        input
    );
    let extra = vm.recv_data(SHORT).await;
    assert!(
        extra.is_empty(),
        "read-only input reached the VM: {:?}",
        String::from_utf8_lossy(&extra)
    );

    // Read-only consoles are not writers: once the writer leaves, a new
    // write lock is granted beside them, and free-for-all is refused again.
    writer.close().await;
    wait_consoles(&d, &id.name, 3).await;
    let (answer, writer2) = native_connect(&d, &id.name, Some("write"))
        .await
        .unwrap_or_else(|e| panic!("write lock after the writer left: {e}"));
    assert_eq!(answer["mode"], json!("write"));
    assert_error(
        &native_connect(&d, &id.name, Some("free-for-all"))
            .await
            .err()
            .expect("free-for-all under a write lock"),
        "lock_failed",
        "free-for-all under write",
    );
    input_reaches(&vm, &writer2, "second writer").await;
    close_all([
        Some(writer2),
        Some(ro_native),
        Some(ro_port),
        Some(ro_pickle),
    ])
    .await;
    wait_consoles(&d, &id.name, 0).await;
}

// ---------------------------------------------------------------------------
// 4. vSPC.py's protocol through a Python client.

#[tokio::test]
async fn pickle_protocol_sessions() {
    if !have_python() {
        eprintln!("note: python3 not found; pickle_protocol_sessions skipped");
        return;
    }
    let dir = tempdir();
    let logdir = dir.path().to_str().expect("UTF-8 temp path");
    let d = Daemon::start(&["--backend", "Logging", "-l", logdir]);
    let id = Identity::numbered(401);
    let (vm, port) = vm_up(&d, &id).await;
    let seed = b"seed: login prompt\r\n";
    vm.send(seed).await.expect("VM write");
    wait_transcript(dir.path(), &id.name, seed).await;

    // free_for_all: granted; the seed travels as a pickle, then telnet.
    let input = b"typed \xff through pickle \x00\r\n";
    let mut first = PySession::start(&d, &id.name, "free_for_all", 30, input);
    assert_eq!(first.line("status=").await, "vm_found");
    assert_eq!(first.line("mode=").await, "free_for_all");
    assert_eq!(first.line("seed=").await, hex(seed));
    first.line("ready").await;
    assert_eq!(
        vm.read_exact_data(input.len(), T).await.expect("input"),
        input
    );
    let data = all_bytes(2);
    vm.send(&data).await.expect("VM write");
    let got = first.data_at_least(data.len()).await;
    assert_eq!(hex(&got), hex(&data), "VM -> pickle session (nothing else)");
    wait_consoles(&d, &id.name, 1).await;

    // exclusive while free_for_all is held.
    let out = PySession::start(&d, &id.name, "exclusive", 5, b"")
        .finish()
        .await;
    assert!(out.contains(&"status=lock_failed".into()), "{out:?}");
    // An unknown lock string.
    let out = PySession::start(&d, &id.name, "bogus", 5, b"")
        .finish()
        .await;
    assert!(out.contains(&"status=lock_invalid".into()), "{out:?}");
    // An unknown VM: the listing.
    let out = PySession::start(&d, "nosuch", "free_for_all_or_readonly", 5, b"")
        .finish()
        .await;
    assert_eq!(
        out,
        [
            "status=vm_not_found".to_string(),
            "count=1".into(),
            format!("vm={}:{}:{port}", id.name, id.uuid_display()),
        ]
    );
    // By uuid, beside the free-for-all session.
    let mut by_uuid = PySession::start(&d, &id.uuid_display(), "free_for_all_or_readonly", 30, b"");
    assert_eq!(by_uuid.line("status=").await, "vm_found");
    assert_eq!(by_uuid.line("mode=").await, "free_for_all");
    wait_consoles(&d, &id.name, 2).await;
    drop(by_uuid);
    drop(first);
    wait_consoles(&d, &id.name, 0).await;

    // A write lock held through the native protocol.
    let (answer, writer) = native_connect(&d, &id.name, Some("write"))
        .await
        .unwrap_or_else(|e| panic!("write lock: {e}"));
    assert_eq!(answer["mode"], json!("write"));
    let mut ro = PySession::start(&d, &id.name, "free_for_all_or_readonly", 30, b"ro input");
    assert_eq!(ro.line("status=").await, "vm_found");
    assert_eq!(ro.line("mode=").await, "free_for_all_or_readonly");
    ro.line("ready").await;
    vm.send(b"to everyone").await.expect("VM write");
    let got = ro.data_at_least(11).await;
    assert_eq!(got, b"to everyone", "read-only session's output");
    input_reaches(&vm, &writer, "writer beside a read-only pickle session").await;
    assert!(
        vm.recv_data(SHORT).await.is_empty(),
        "read-only pickle input reached the VM"
    );
    for mode in ["free_for_all", "write", "exclusive"] {
        let out = PySession::start(&d, &id.name, mode, 5, b"").finish().await;
        assert!(
            out.contains(&"status=lock_failed".into()),
            "{mode} under a write lock: {out:?}"
        );
    }
    drop(ro);
    writer.close().await;
    wait_consoles(&d, &id.name, 0).await;

    // And exclusive once nobody is attached.
    let mut ex = PySession::start(&d, &id.name, "exclusive", 30, b"");
    assert_eq!(ex.line("mode=").await, "exclusive");
    let out = PySession::start(&d, &id.name, "free_for_all_or_readonly", 5, b"")
        .finish()
        .await;
    assert!(out.contains(&"status=lock_failed".into()), "{out:?}");
    drop(ex);
    wait_consoles(&d, &id.name, 0).await;
}

// ---------------------------------------------------------------------------
// 5. `clear`.

#[tokio::test]
async fn clear_disconnects_all() {
    let d = Daemon::start(&[]);
    let id = Identity::numbered(501);
    let (vm, port) = vm_up(&d, &id).await;
    let p1 = console_synced(&vm, &d, port).await;
    let p2 = console_synced(&vm, &d, port).await;
    let (_, native) = native_connect(&d, &id.name, Some("free-for-all"))
        .await
        .unwrap_or_else(|e| panic!("native: {e}"));
    let pickled = match pickle_session(&d, &id.name, "free_for_all").await {
        PickleAnswer::Found {
            mode,
            seed,
            console,
        } => {
            assert_eq!(mode, "free_for_all");
            assert_eq!(seed, "", "the Memory backend keeps no recent output");
            console
        }
        PickleAnswer::Other(status, rest) => panic!("pickle session: {status} {rest:?}"),
    };
    wait_consoles(&d, &id.name, 4).await;

    let mut admin = Native::connect(&d).await;
    assert_eq!(
        admin.ask(&format!("clear {}", id.name)).await,
        json!({"ok": true, "cleared": 4})
    );
    for (c, what) in [
        (p1, "port console 1"),
        (p2, "port console 2"),
        (native, "native session"),
        (pickled, "pickle session"),
    ] {
        let (data, closed) = c.read_to_end(T).await;
        assert!(closed, "{what} was not disconnected");
        let text = String::from_utf8_lossy(&data);
        assert!(text.contains(CLEARED), "{what} was told {text:?}");
    }
    wait_consoles(&d, &id.name, 0).await;
    let row = native_row(&d, &id.name).await.expect("still listed");
    assert_eq!(row["vm_connected"], json!(true), "{row}");
    assert!(vm.closed().is_none(), "clear closed the VM connection");
    // Clearing nothing is fine.
    assert_eq!(
        admin.ask(&format!("clear {}", id.name)).await,
        json!({"ok": true, "cleared": 0})
    );

    // A new console works both ways.
    drain_vm(&vm).await;
    let fresh = console_synced(&vm, &d, port).await;
    output_reaches(&vm, &fresh, "console after clear").await;
    input_reaches(&vm, &fresh, "console after clear").await;
}

// ---------------------------------------------------------------------------
// 6. --no-vm-ports.

#[tokio::test]
async fn no_vm_ports_mode() {
    let d = Daemon::start(&["--no-vm-ports"]);
    let id = Identity::numbered(601);
    let vm = SimVm::connect(d.proxy, &id)
        .await
        .unwrap_or_else(|e| panic!("VM: {e}"));
    let row = wait_for(T, "VM listed", async || {
        native_row(&d, &id.name).await.ok_or("not yet".to_string())
    })
    .await;
    assert_eq!(
        row,
        json!({"name": id.name, "uuid": id.uuid_display(), "port": null,
               "vm_connected": true, "consoles": 0})
    );
    assert_eq!(
        list_vms(d.admin).await,
        [(id.name.clone(), id.uuid_display(), None)]
    );
    for p in d.range_start..d.range_start + 4 {
        let r = TcpStream::connect(d.console(p)).await;
        assert!(
            r.as_ref()
                .is_err_and(|e| e.kind() == io::ErrorKind::ConnectionRefused),
            "port {p} in the -r range: {r:?}"
        );
    }

    let (answer, console) = native_connect(&d, &id.name, Some("write"))
        .await
        .unwrap_or_else(|e| panic!("native session: {e}"));
    assert_eq!(answer["mode"], json!("write"));
    assert_eq!(answer["vm"]["port"], json!(null));
    sync_console(&vm, &console).await;
    let data = all_bytes(1);
    vm.send(&data).await.expect("VM write");
    assert_eq!(
        console
            .read_exact_data(data.len(), T)
            .await
            .expect("output"),
        data
    );
    console.send(&data).await.expect("console write");
    assert_eq!(
        vm.read_exact_data(data.len(), T).await.expect("input"),
        data
    );
    // Locks apply.
    assert_error(
        &native_connect(&d, &id.name, Some("exclusive"))
            .await
            .err()
            .expect("exclusive beside a writer"),
        "lock_failed",
        "exclusive beside a writer",
    );
    match pickle_session(&d, &id.name, "free_for_all_or_readonly").await {
        PickleAnswer::Found { mode, console, .. } => {
            assert_eq!(mode, "free_for_all_or_readonly");
            console.close().await;
        }
        PickleAnswer::Other(status, rest) => panic!("pickle session: {status} {rest:?}"),
    }
    console.close().await;
    wait_consoles(&d, &id.name, 0).await;
}

// ---------------------------------------------------------------------------
// 7. Pickles that would run code.

/// `os.system(cmd)` pickled with protocol 0, as Python writes it.
fn evil_protocol0(cmd: &str) -> Vec<u8> {
    format!("cos\nsystem\n(S'{cmd}'\ntR.").into_bytes()
}

/// `os.system(cmd)` with protocol 0's INST opcode (MARK, args, INST).
fn evil_inst(cmd: &str) -> Vec<u8> {
    format!("(S'{cmd}'\nios\nsystem\n.").into_bytes()
}

/// `os.system(cmd)` with protocol 2 (GLOBAL, BINUNICODE, TUPLE1, REDUCE).
fn evil_protocol2(cmd: &str) -> Vec<u8> {
    let mut b = b"\x80\x02cposix\nsystem\nq\x00X".to_vec();
    b.extend_from_slice(&(cmd.len() as u32).to_le_bytes());
    b.extend_from_slice(cmd.as_bytes());
    b.extend_from_slice(b"q\x01\x85q\x02Rq\x03.");
    b
}

#[tokio::test]
async fn malicious_pickle_refused() {
    let d = Daemon::start(&[]);
    let id = Identity::numbered(701);
    let (_vm, _port) = vm_up(&d, &id).await;
    let mut salt = [0u8; 8];
    getrandom::fill(&mut salt).expect("random");
    let target = std::env::temp_dir().join(format!(
        "vspc-admin-pwned-{}-{}",
        std::process::id(),
        hex(&salt)
    ));
    let cmd = format!("touch {}", target.display());
    assert!(!target.exists());

    let pickles = [
        ("protocol 0 GLOBAL+REDUCE", evil_protocol0(&cmd)),
        ("protocol 0 INST", evil_inst(&cmd)),
        ("protocol 2", evil_protocol2(&cmd)),
    ];
    for (what, evil) in &pickles {
        let places: [(&str, Vec<u8>); 3] = [
            ("as the version", evil.clone()),
            (
                "as the VM name",
                [PICKLE_VERSION_3, evil, &pickle_str("free_for_all")].concat(),
            ),
            (
                "as the lock mode",
                [PICKLE_VERSION_3, &pickle_str(&id.name), evil].concat(),
            ),
        ];
        for (place, bytes) in places {
            if bytes[0].is_ascii_lowercase() {
                // Protocol 0's GLOBAL is `c`: a lowercase first byte picks
                // the native protocol, where it is just an unknown command.
                let got = garbage_exchange(&d, &bytes, &format!("{what} {place}")).await;
                let text = String::from_utf8_lossy(&got);
                assert!(!text.is_empty(), "{what} {place}: no answer");
                for line in text.lines() {
                    let v: Json = serde_json::from_str(line)
                        .unwrap_or_else(|e| panic!("{what} {place}: {line:?}: {e}"));
                    assert_error(&v, "bad_command", &format!("{what} {place}"));
                }
                assert!(!target.exists(), "{what} {place}: the pickle ran a command");
                continue;
            }
            let mut c = PickleConn::connect(&d).await;
            c.send(&bytes).await;
            let answers = c.rest().await;
            assert_eq!(
                answers.first(),
                Some(&Value::Int(3)),
                "{what} {place}: {answers:?}"
            );
            assert!(
                answers[1..]
                    .iter()
                    .all(|v| matches!(v, Value::Exception(_))),
                "{what} {place}: answered {answers:?}"
            );
            assert!(!target.exists(), "{what} {place}: the pickle ran a command");
        }
    }
    // Still serving, both protocols.
    assert_eq!(native_list(&d).await.len(), 1);
    assert_eq!(list_vms(d.admin).await.len(), 1);
    assert!(
        !eventually(SHORT, || target.exists()).await,
        "a pickle ran a command"
    );
}

// ---------------------------------------------------------------------------
// 8. Garbage on the admin port.

/// Send `bytes`, end our side, and read until the daemon closes; what it
/// sent. Panics if it keeps the connection open.
async fn garbage_exchange(d: &Daemon, bytes: &[u8], what: &str) -> Vec<u8> {
    let mut stream = TcpStream::connect(d.admin).await.expect("connect");
    let (mut rd, mut wr) = stream.split();
    let write = async {
        let _ = wr.write_all(bytes).await;
        let _ = wr.shutdown().await;
    };
    let read = async {
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match tokio::time::timeout(T, rd.read(&mut chunk)).await {
                Err(_) => panic!("{what}: the daemon kept the connection open"),
                Ok(Ok(0)) | Ok(Err(_)) => return got,
                Ok(Ok(n)) => got.extend_from_slice(&chunk[..n]),
            }
        }
    };
    let ((), got) = tokio::join!(write, read);
    got
}

#[tokio::test]
async fn garbage_on_admin_port() {
    let d = Daemon::start(&[]);
    let id = Identity::numbered(801);
    let (vm, port) = vm_up(&d, &id).await;
    let console = console_synced(&vm, &d, port).await;

    let mut rng = XorShift::new(0x5eed_ad31);
    for round in 0..24 {
        let len = 1 + (rng.next_u64() % 3000) as usize;
        let mut bytes = rng.bytes(len);
        let native = round % 2 == 0;
        if native {
            bytes[0] = b'a' + (bytes[0] % 26);
        } else if bytes[0].is_ascii_lowercase() {
            bytes[0] = bytes[0].to_ascii_uppercase();
        }
        let what = format!("round {round} ({len} bytes, first {:#04x})", bytes[0]);
        let got = garbage_exchange(&d, &bytes, &what).await;
        if native {
            // Only complete JSON error lines (a random line is no command).
            let text = String::from_utf8(got.clone())
                .unwrap_or_else(|_| panic!("{what}: non-UTF-8 answer {got:02x?}"));
            assert!(text.is_empty() || text.ends_with('\n'), "{what}: {text:?}");
            for line in text.lines() {
                let v: Json = serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("{what}: answer {line:?}: {e}"));
                assert_eq!(v["ok"], json!(false), "{what}: {line}");
            }
        } else {
            assert!(
                got.starts_with(PICKLE_VERSION_3),
                "{what}: the daemon did not send its version first: {got:02x?}"
            );
            let rest = &got[PICKLE_VERSION_3.len()..];
            if !rest.is_empty() {
                let v = pickle::decode(rest, 1 << 20);
                assert!(
                    matches!(v, Ok(Some((Value::Exception(_), _)))),
                    "{what}: answered {v:?}"
                );
            }
        }
    }

    // Very long lines in both protocols.
    let got = garbage_exchange(&d, &vec![b'z'; 200_000], "200 kB native line").await;
    let text = String::from_utf8_lossy(&got);
    let v: Json = serde_json::from_str(text.trim_end())
        .unwrap_or_else(|e| panic!("200 kB line: answer {text:?}: {e}"));
    assert_error(&v, "bad_command", "200 kB native line");
    let got = garbage_exchange(&d, &vec![b'Z'; 200_000], "200 kB non-pickle").await;
    assert!(got.starts_with(PICKLE_VERSION_3), "{got:02x?}");
    let mut huge = PICKLE_VERSION_3.to_vec();
    huge.extend_from_slice(b"\x80\x02X\x00\x00\x10\x00");
    huge.extend(std::iter::repeat_n(b'q', 200_000));
    let got = garbage_exchange(&d, &huge, "pickle string of 1 MiB").await;
    assert!(got.starts_with(PICKLE_VERSION_3), "{got:02x?}");

    // A silent client: after half a second the daemon speaks first.
    let mut silent = TcpStream::connect(d.admin).await.expect("connect");
    let started = Instant::now();
    let mut first = [0u8; 5];
    tokio::time::timeout(T, silent.read_exact(&mut first))
        .await
        .expect("the daemon never spoke to a silent client")
        .expect("read");
    assert_eq!(first, PICKLE_VERSION_3, "first bytes to a silent client");
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "the daemon spoke after {:?}, before waiting for a native client",
        started.elapsed()
    );
    drop(silent);

    // Still serving.
    let rows = native_list(&d).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["consoles"], json!(1));
    assert_eq!(list_vms(d.admin).await.len(), 1);
    input_reaches(&vm, &console, "console after garbage").await;
}
