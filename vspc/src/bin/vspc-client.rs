//! `vspc-client`: list a vspc daemon's VMs, clear a VM's consoles, or open a
//! VM's console, over the daemon's native admin protocol (see
//! `vspc::admin::native`). The successor of vSPC.py's `vSPCClient`.
//!
//! With no VM it prints the listing as `name:uuid:port` lines. With a VM it
//! sends `connect VM MODE`; after the one-line JSON answer the same TCP
//! connection is a telnet console, bridged to stdin and stdout.
//!
//! When stdin is a terminal it is put in raw mode for the session and its
//! saved settings are restored on every way out: quitting, the server
//! closing, errors, SIGTERM, SIGHUP or SIGINT (caught, so the process returns
//! normally) and panics (a `Drop` guard, plus a panic hook that restores
//! before the message is printed). Ctrl-] then opens a small command menu.
//! When stdin is not a terminal the terminal settings are never touched and
//! bytes pass through untouched (no escape character), so files and
//! scripts can be piped in; end of input ends the session.

#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use rustix::termios::{self, OptionalActions, SpecialCodeIndex, Termios};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use vspc::config::shell_quote;
use vspc::wire::{encode, opt, Decoder, Event, Negotiator, OptionSet};

/// Exit status: an error (connection, protocol, unknown VM).
const EXIT_ERROR: u8 = 1;
/// Exit status: the server refused the lock (2 is clap's usage error).
const EXIT_LOCK: u8 = 3;

/// Ctrl-]: opens the command menu (terminal sessions only).
const ESCAPE: u8 = 0x1d;
/// Limit for the TCP connection to the admin port.
const CONNECT_WAIT: Duration = Duration::from_secs(10);
/// Limit for the server's one-line answer.
const ANSWER_WAIT: Duration = Duration::from_secs(30);
/// Longest answer line accepted (a listing of very many VMs fits).
const MAX_ANSWER: usize = 64 << 20;
/// Longest wait for the stdin reader to switch to cooked reads before the
/// escape prompt is shown anyway (it needs at most VTIME, 0.1 s).
const PROMPT_WAIT: Duration = Duration::from_millis(300);
/// Stop reading stdin while this much input waits for the socket.
const INFLIGHT_LIMIT: usize = 256 * 1024;
/// After we stop sending, how long to wait for queued input to go out and
/// for the server to close its side.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Options we perform when the server asks (DO).
const LOCAL_OK: OptionSet = OptionSet::of(&[opt::BINARY, opt::SGA]);
/// Options we let the server perform (WILL).
const REMOTE_OK: OptionSet = OptionSet::of(&[opt::BINARY, opt::SGA, opt::ECHO]);

const AFTER_HELP: &str = "\
Exit status:
  0  success; also when the session ends by `quit`, end of input, or the server closing it
  1  error: cannot connect, protocol error, or no such VM
  2  usage error
  3  the server refused the requested lock
  128+N  ended by signal N (SIGHUP, SIGINT, SIGTERM), terminal restored

In a session on a terminal, Ctrl-] opens a prompt: `continue` (`c` or an
empty line) returns to the console, `print-escape` sends a Ctrl-] to the VM,
`quit` (`q`) leaves. When stdin is not a terminal, input is passed through
byte for byte (no escape character) and end of input ends the session.";

#[derive(Parser)]
#[command(
    name = "vspc-client",
    version,
    about = "List the VMs of a vspc daemon, or open a VM's serial console",
    after_help = AFTER_HELP
)]
struct Cli {
    /// The vspc server.
    #[arg(
        short = 's',
        long = "server",
        value_name = "HOST",
        default_value = "127.0.0.1"
    )]
    server: String,
    /// Its admin port.
    #[arg(
        short = 'a',
        long = "admin-port",
        value_name = "PORT",
        default_value_t = 13371
    )]
    admin_port: u16,
    /// The lock to ask for on the VM's console.
    #[arg(
        long = "client-lock-mode",
        value_name = "MODE",
        value_enum,
        default_value_t = LockMode::FreeForAllFallback
    )]
    lock_mode: LockMode,
    /// Disconnect every console of VM (a name or uuid), then exit.
    #[arg(long, value_name = "VM", conflicts_with_all = ["vm", "json"])]
    clear: Option<String>,
    /// With no VM: print the server's VM list as one line of JSON.
    #[arg(long, conflicts_with = "vm")]
    json: bool,
    /// The VM (name or uuid) whose console to open; without it, list the VMs.
    #[arg(value_name = "VM")]
    vm: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LockMode {
    /// Nobody else may watch or type.
    Exclusive,
    /// Nobody else may type; others may watch.
    Write,
    /// Everybody may type (fails while someone holds a write lock).
    FreeForAll,
    /// free-for-all, or read-only while someone holds a write lock.
    FreeForAllFallback,
}

impl LockMode {
    fn name(self) -> &'static str {
        match self {
            LockMode::Exclusive => "exclusive",
            LockMode::Write => "write",
            LockMode::FreeForAll => "free-for-all",
            LockMode::FreeForAllFallback => "free-for-all-fallback",
        }
    }
}

/// Why the client stops with a non-zero status: the message (printed after
/// `vspc-client: `, may span lines) and the status.
#[derive(Debug)]
struct Failure {
    code: u8,
    message: String,
}

fn failure(code: u8, message: impl Into<String>) -> Failure {
    Failure {
        code,
        message: message.into(),
    }
}

/// Write to stderr, ignoring failures (a hung-up terminal must not panic us).
fn say(text: &str) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(text.as_bytes());
    let _ = err.flush();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut term = Terminal::new();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            say(&format!("vspc-client: cannot start the runtime: {e}\n"));
            return ExitCode::from(EXIT_ERROR);
        }
    };
    let result = runtime.block_on(run(&cli, &mut term));
    // Restore before any message, whatever happened.
    term.restore();
    drop(runtime);
    match result {
        Ok(code) => ExitCode::from(code),
        Err(f) => {
            say(&format!("vspc-client: {}\n", f.message));
            ExitCode::from(f.code)
        }
    }
}

async fn run(cli: &Cli, term: &mut Terminal) -> Result<u8, Failure> {
    for name in cli.vm.iter().chain(cli.clear.iter()) {
        if name.contains(['\n', '\r']) {
            return Err(failure(2, "a VM name cannot contain a line break"));
        }
    }
    let server = Server::new(&cli.server, cli.admin_port);
    if let Some(vm) = &cli.clear {
        return clear(&server, vm).await;
    }
    match &cli.vm {
        None => list(&server, cli.json).await,
        Some(vm) => console(&server, vm, cli.lock_mode, term).await,
    }
}

// ---------------------------------------------------------------------------
// The admin conversation.

/// Where the admin port is.
struct Server {
    host: String,
    port: u16,
}

impl Server {
    fn new(host: &str, port: u16) -> Server {
        Server {
            host: host.to_string(),
            port,
        }
    }

    /// `host:port`, with brackets around an IPv6 address.
    fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Connect, send `command`, and read the one-line answer. Returns the
    /// stream, the answer, and whatever arrived after the answer line.
    async fn ask(&self, command: &str) -> Result<(TcpStream, Value, Vec<u8>), Failure> {
        let addr = self.addr();
        let host = self.host.trim_start_matches('[').trim_end_matches(']');
        let mut sock =
            match tokio::time::timeout(CONNECT_WAIT, TcpStream::connect((host, self.port))).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    return Err(failure(
                        EXIT_ERROR,
                        format!("cannot connect to {addr}: {e}"),
                    ))
                }
                Err(_) => {
                    return Err(failure(
                        EXIT_ERROR,
                        format!("cannot connect to {addr}: no answer within {CONNECT_WAIT:?}"),
                    ))
                }
            };
        let _ = sock.set_nodelay(true);
        let line = format!("{command}\n");
        sock.write_all(line.as_bytes())
            .await
            .map_err(|e| failure(EXIT_ERROR, format!("cannot send to {addr}: {e}")))?;
        let mut buf = Vec::new();
        let answer = tokio::time::timeout(ANSWER_WAIT, read_answer(&mut sock, &mut buf, &addr))
            .await
            .map_err(|_| {
                failure(
                    EXIT_ERROR,
                    format!("no answer from {addr} within {ANSWER_WAIT:?}"),
                )
            })??;
        Ok((sock, answer, buf))
    }
}

/// Read one line and parse it as JSON; `buf` keeps what follows the line.
async fn read_answer(
    sock: &mut TcpStream,
    buf: &mut Vec<u8>,
    addr: &str,
) -> Result<Value, Failure> {
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        if let Some(pos) = memchr::memchr(b'\n', buf) {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            return serde_json::from_slice(&line).map_err(|e| {
                failure(
                    EXIT_ERROR,
                    format!("{addr} answered something that is not JSON ({e}); is it a vspc admin port?"),
                )
            });
        }
        if buf.len() > MAX_ANSWER {
            return Err(failure(
                EXIT_ERROR,
                format!("{addr} sent an answer longer than {MAX_ANSWER} bytes"),
            ));
        }
        match sock.read(&mut chunk).await {
            Ok(0) => {
                return Err(failure(
                    EXIT_ERROR,
                    format!("{addr} closed the connection without answering"),
                ))
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(failure(EXIT_ERROR, format!("reading from {addr}: {e}"))),
        }
    }
}

/// The answer's error, as a failure: an unknown VM lists the known ones.
fn refused(server: &Server, vm: &str, lock: Option<LockMode>, answer: &Value) -> Failure {
    let code = answer.get("code").and_then(Value::as_str).unwrap_or("");
    let error = answer
        .get("error")
        .and_then(Value::as_str)
        .unwrap_or("the server gave no reason");
    match (code, lock) {
        ("vm_not_found", _) => {
            let known: Vec<&str> = answer
                .get("known")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let mut known = known;
            known.sort_unstable();
            let mut msg = format!("no VM called '{vm}' on {}", server.host);
            if known.is_empty() {
                msg.push_str("; no VMs are known");
            } else {
                msg.push_str("; known VMs:");
                for name in known {
                    msg.push('\n');
                    msg.push_str(name);
                }
            }
            failure(EXIT_ERROR, msg)
        }
        ("lock_failed", Some(mode)) => failure(
            EXIT_LOCK,
            format!("cannot get a {} lock on {vm}: {error}", mode.name()),
        ),
        _ => failure(EXIT_ERROR, format!("the server said: {error}")),
    }
}

fn is_ok(answer: &Value) -> bool {
    answer.get("ok").and_then(Value::as_bool) == Some(true)
}

async fn list(server: &Server, json: bool) -> Result<u8, Failure> {
    let (_, answer, _) = server.ask("list").await?;
    if !is_ok(&answer) {
        return Err(refused(server, "", None, &answer));
    }
    let Some(vms) = answer.get("vms").and_then(Value::as_array) else {
        return Err(failure(EXIT_ERROR, "the server's listing has no 'vms'"));
    };
    let mut text = String::new();
    if json {
        text = Value::Array(vms.clone()).to_string();
        text.push('\n');
    } else {
        let field = |vm: &Value, key: &str| -> String {
            match vm.get(key) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => String::new(),
                Some(other) => other.to_string(),
            }
        };
        let mut rows: Vec<(String, String, Option<String>)> = vms
            .iter()
            .map(|vm| {
                let port = match vm.get("port") {
                    None | Some(Value::Null) => None,
                    Some(_) => Some(field(vm, "port")),
                };
                (field(vm, "name"), field(vm, "uuid"), port)
            })
            .collect();
        rows.sort();
        for (name, uuid, port) in rows {
            match port {
                Some(p) => text.push_str(&format!("{name}:{uuid}:{p}\n")),
                None => text.push_str(&format!("{name}:{uuid}\n")),
            }
        }
    }
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| failure(EXIT_ERROR, format!("cannot write to stdout: {e}")))?;
    Ok(0)
}

async fn clear(server: &Server, vm: &str) -> Result<u8, Failure> {
    let (_, answer, _) = server.ask(&format!("clear {}", shell_quote(vm))).await?;
    if !is_ok(&answer) {
        return Err(refused(server, vm, None, &answer));
    }
    let n = answer.get("cleared").and_then(Value::as_u64).unwrap_or(0);
    write_stdout(format!("cleared {n} console(s) of {vm}\n").as_bytes())?;
    Ok(0)
}

async fn console(
    server: &Server,
    vm: &str,
    mode: LockMode,
    term: &mut Terminal,
) -> Result<u8, Failure> {
    let command = format!("connect {} {}", shell_quote(vm), mode.name());
    let (sock, answer, leftover) = server.ask(&command).await?;
    if !is_ok(&answer) {
        return Err(refused(server, vm, Some(mode), &answer));
    }
    let name = answer
        .get("vm")
        .and_then(|v| v.get("name"))
        .and_then(Value::as_str)
        .unwrap_or(vm);
    if answer.get("mode").and_then(Value::as_str) == Some("read-only") {
        say(&format!(
            "vspc-client: someone holds a write lock on {name}; this session is read-only (your input is discarded)\n"
        ));
    }
    let mut signals =
        Signals::new().map_err(|e| failure(EXIT_ERROR, format!("cannot catch signals: {e}")))?;
    let stdin = spawn_stdin_reader(term.shared())
        .map_err(|e| failure(EXIT_ERROR, format!("cannot read stdin: {e}")))?;
    let escape = term.is_tty().then_some(ESCAPE);
    term.raw().map_err(|e| {
        failure(
            EXIT_ERROR,
            format!("cannot set the terminal to raw mode: {e}"),
        )
    })?;
    let (rd, wr) = sock.into_split();
    let mut session = Session::new(rd, wr, stdin, term, escape, server.addr());
    let end = session.run(&leftover, &mut signals).await;
    let end = match end {
        Ok(end) => end,
        Err(f) => {
            session.term.restore();
            return Err(f);
        }
    };
    match end {
        End::ServerClosed => {
            session.term.restore();
            say("\r\nvspc-client: connection closed by the server\n");
            Ok(0)
        }
        End::StdinClosed => {
            session.finish(true).await;
            session.term.restore();
            Ok(0)
        }
        End::Quit => {
            session.finish(false).await;
            session.term.restore();
            Ok(0)
        }
        End::Signal(n, what) => {
            session.term.restore();
            say(&format!("\r\nvspc-client: {what}, leaving\n"));
            Ok(128 + n)
        }
    }
}

// ---------------------------------------------------------------------------
// The terminal.

/// Stdin's terminal settings: saved at start, raw during the session,
/// restored on drop.
///
/// Raw mode uses VMIN=0, VTIME=1: a read returns what is there, or nothing
/// after 0.1 s. A read keeps the rules of the mode it started in, so a read
/// begun in raw mode would swallow the end-of-file key (Ctrl-D) typed at the
/// escape prompt. With VTIME the reader thread starts a fresh read within
/// 0.1 s, and the prompt is shown once it has (see [`ReadState`]).
struct Terminal {
    saved: Option<Termios>,
    shared: Arc<ReadState>,
}

/// What the terminal and the stdin reader thread share.
#[derive(Default)]
struct ReadState {
    /// Raw mode is on (set before entering it, cleared after leaving it), so
    /// an empty read may be the VTIME timeout rather than end of input.
    raw: AtomicBool,
    /// The reader has started a read in cooked mode.
    cooked_read: AtomicBool,
}

impl Terminal {
    /// Look at stdin; save its settings if it is a terminal. Installs a panic
    /// hook that puts them back before the panic message is printed.
    fn new() -> Terminal {
        let stdin = std::io::stdin();
        let saved = if termios::isatty(&stdin) {
            termios::tcgetattr(&stdin).ok()
        } else {
            None
        };
        if let Some(saved) = saved.clone() {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                let _ = termios::tcsetattr(std::io::stdin(), OptionalActions::Now, &saved);
                previous(info);
            }));
        }
        Terminal {
            saved,
            shared: Arc::default(),
        }
    }

    fn is_tty(&self) -> bool {
        self.saved.is_some()
    }

    /// Raw mode: no echo, no line editing, no signal keys, no CR/NL
    /// translation, 8-bit characters, reads return what has been typed.
    fn raw(&mut self) -> std::io::Result<()> {
        let Some(saved) = &self.saved else {
            return Ok(());
        };
        let mut t = saved.clone();
        t.make_raw();
        t.special_codes[SpecialCodeIndex::VMIN] = 0;
        t.special_codes[SpecialCodeIndex::VTIME] = 1;
        self.shared.raw.store(true, Ordering::SeqCst);
        if let Err(e) = termios::tcsetattr(std::io::stdin(), OptionalActions::Now, &t) {
            self.shared.raw.store(false, Ordering::SeqCst);
            return Err(e.into());
        }
        Ok(())
    }

    /// Back to the saved settings (if they were changed).
    fn restore(&mut self) {
        if let (true, Some(saved)) = (self.shared.raw.load(Ordering::SeqCst), &self.saved) {
            let _ = termios::tcsetattr(std::io::stdin(), OptionalActions::Now, saved);
            self.shared.raw.store(false, Ordering::SeqCst);
        }
    }

    /// Back to the saved settings for a prompt, and wait (briefly) until
    /// the reader thread reads in cooked mode, so the prompt's answer,
    /// Ctrl-D included, is read with cooked rules.
    async fn cooked_for_prompt(&mut self) {
        if !self.shared.raw.load(Ordering::SeqCst) {
            return;
        }
        self.shared.cooked_read.store(false, Ordering::SeqCst);
        self.restore();
        let deadline = Instant::now() + PROMPT_WAIT;
        while !self.shared.cooked_read.load(Ordering::SeqCst) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// What the stdin reader thread needs to know.
    fn shared(&self) -> Arc<ReadState> {
        self.shared.clone()
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        self.restore();
    }
}

// ---------------------------------------------------------------------------
// Input: a thread does the blocking reads of stdin.

/// An empty read this long after it started, in raw mode, is the VTIME
/// timeout; a quicker one is end of input (a hung-up terminal).
const VTIME_MIN: Duration = Duration::from_millis(50);

/// Chunks of stdin; closed at end of input (or a read error). `state` is
/// shared with the [`Terminal`].
fn spawn_stdin_reader(state: Arc<ReadState>) -> std::io::Result<mpsc::Receiver<Vec<u8>>> {
    let (tx, rx) = mpsc::channel::<Vec<u8>>(4);
    std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            let mut stdin = std::io::stdin();
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let raw_before = state.raw.load(Ordering::SeqCst);
                if !raw_before {
                    state.cooked_read.store(true, Ordering::SeqCst);
                }
                let started = Instant::now();
                let got = stdin.read(&mut buf);
                let raw_after = state.raw.load(Ordering::SeqCst);
                match got {
                    Ok(0) if (raw_before || raw_after) && started.elapsed() >= VTIME_MIN => {
                        if tx.is_closed() {
                            return;
                        }
                    }
                    Ok(0) => return,
                    Ok(n) => {
                        if tx.blocking_send(buf[..n].to_vec()).is_err() {
                            return;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => return,
                }
            }
        })?;
    Ok(rx)
}

/// The signals that end a session cleanly.
struct Signals {
    term: Signal,
    hup: Signal,
    int: Signal,
}

impl Signals {
    fn new() -> std::io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// The next signal: its number and name.
    async fn recv(&mut self) -> (u8, &'static str) {
        tokio::select! {
            Some(()) = self.term.recv() => (15, "SIGTERM"),
            Some(()) = self.hup.recv() => (1, "SIGHUP"),
            Some(()) = self.int.recv() => (2, "SIGINT"),
            else => std::future::pending().await,
        }
    }
}

// ---------------------------------------------------------------------------
// Output to the server: a task owns the write half, so the session never
// blocks on a slow server while the server has output for us.

struct Outgoing {
    tx: mpsc::UnboundedSender<Vec<u8>>,
    inflight: Arc<AtomicUsize>,
}

impl Outgoing {
    fn start(wr: OwnedWriteHalf) -> (Outgoing, Arc<Notify>, JoinHandle<std::io::Result<()>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let inflight = Arc::new(AtomicUsize::new(0));
        let drained = Arc::new(Notify::new());
        let task = tokio::spawn(write_loop(wr, rx, inflight.clone(), drained.clone()));
        (Outgoing { tx, inflight }, drained, task)
    }

    fn send(&self, bytes: Vec<u8>) {
        if bytes.is_empty() {
            return;
        }
        self.inflight.fetch_add(bytes.len(), Ordering::SeqCst);
        // A closed channel means the writer failed; the session notices.
        let _ = self.tx.send(bytes);
    }

    fn has_room(&self) -> bool {
        self.inflight.load(Ordering::SeqCst) < INFLIGHT_LIMIT
    }
}

async fn write_loop(
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Vec<u8>>,
    inflight: Arc<AtomicUsize>,
    drained: Arc<Notify>,
) -> std::io::Result<()> {
    while let Some(bytes) = rx.recv().await {
        wr.write_all(&bytes).await?;
        inflight.fetch_sub(bytes.len(), Ordering::SeqCst);
        drained.notify_one();
    }
    // Every sender is gone: we are done sending; tell the server.
    wr.shutdown().await
}

// ---------------------------------------------------------------------------
// The session.

/// How a session ended.
enum End {
    ServerClosed,
    StdinClosed,
    Quit,
    Signal(u8, &'static str),
}

/// What the escape menu decided.
enum Choice {
    Continue,
    SendEscape,
    Quit,
    Signal(u8, &'static str),
}

struct Session<'t> {
    rd: OwnedReadHalf,
    out: Option<Outgoing>,
    drained: Arc<Notify>,
    writer: Option<JoinHandle<std::io::Result<()>>>,
    stdin: mpsc::Receiver<Vec<u8>>,
    term: &'t mut Terminal,
    escape: Option<u8>,
    decoder: Decoder,
    neg: Negotiator,
    /// Menu input read past the end of the command line.
    menu_buf: Vec<u8>,
    addr: String,
}

impl<'t> Session<'t> {
    fn new(
        rd: OwnedReadHalf,
        wr: OwnedWriteHalf,
        stdin: mpsc::Receiver<Vec<u8>>,
        term: &'t mut Terminal,
        escape: Option<u8>,
        addr: String,
    ) -> Session<'t> {
        let (out, drained, writer) = Outgoing::start(wr);
        Session {
            rd,
            out: Some(out),
            drained,
            writer: Some(writer),
            stdin,
            term,
            escape,
            decoder: Decoder::default(),
            neg: Negotiator::new(LOCAL_OK, REMOTE_OK),
            menu_buf: Vec::new(),
            addr,
        }
    }

    async fn run(&mut self, leftover: &[u8], signals: &mut Signals) -> Result<End, Failure> {
        self.on_server_bytes(leftover)?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let room = self.out.as_ref().is_some_and(Outgoing::has_room);
            let drained = self.drained.clone();
            let writer = &mut self.writer;
            tokio::select! {
                (n, what) = signals.recv() => return Ok(End::Signal(n, what)),
                r = self.rd.read(&mut buf) => match r {
                    Ok(0) => return Ok(End::ServerClosed),
                    Ok(n) => self.on_server_bytes(&buf[..n])?,
                    Err(e) if closed_by_peer(&e) => return Ok(End::ServerClosed),
                    Err(e) => {
                        return Err(failure(EXIT_ERROR, format!("reading from {}: {e}", self.addr)))
                    }
                },
                chunk = self.stdin.recv(), if room => match chunk {
                    None => return Ok(End::StdinClosed),
                    Some(chunk) => match self.on_user_input(chunk, signals).await? {
                        Some(Choice::Quit) => return Ok(End::Quit),
                        Some(Choice::Signal(n, what)) => return Ok(End::Signal(n, what)),
                        _ => {}
                    },
                },
                _ = drained.notified(), if !room => {}
                r = async {
                    match writer.as_mut() {
                        Some(w) => w.await,
                        None => std::future::pending().await,
                    }
                } => {
                    self.writer = None;
                    return match r {
                        Ok(Ok(())) => Ok(End::ServerClosed),
                        Ok(Err(e)) if closed_by_peer(&e) => Ok(End::ServerClosed),
                        Ok(Err(e)) => Err(failure(EXIT_ERROR, format!("writing to {}: {e}", self.addr))),
                        Err(e) => Err(failure(EXIT_ERROR, format!("the writer task failed: {e}"))),
                    };
                }
            }
        }
    }

    /// Decode what the server sent: data to stdout, negotiation answered.
    fn on_server_bytes(&mut self, bytes: &[u8]) -> Result<(), Failure> {
        let mut data: Vec<u8> = Vec::new();
        let mut replies: Vec<u8> = Vec::new();
        let neg = &mut self.neg;
        self.decoder
            .decode(bytes, |ev| match ev {
                Event::Data(d) => data.extend_from_slice(d),
                Event::Negotiate(verb, option) => {
                    neg.receive(verb, option, &mut replies);
                }
                Event::Subneg { .. } | Event::Command(_) | Event::Malformed(_) => {}
            })
            .map_err(|e| failure(EXIT_ERROR, format!("bad telnet from {}: {e}", self.addr)))?;
        if let Some(out) = &self.out {
            out.send(replies);
        }
        if !data.is_empty() {
            write_stdout(&data)?;
        }
        Ok(())
    }

    /// Keyboard input to the server, with IAC doubled.
    fn send_data(&self, bytes: &[u8]) {
        if let (Some(out), false) = (&self.out, bytes.is_empty()) {
            out.send(encode::escaped(bytes));
        }
    }

    /// Send `chunk`, running the menu at each escape character in it.
    async fn on_user_input(
        &mut self,
        chunk: Vec<u8>,
        signals: &mut Signals,
    ) -> Result<Option<Choice>, Failure> {
        let mut work = VecDeque::from([chunk]);
        while let Some(chunk) = work.pop_front() {
            let mut rest: &[u8] = &chunk;
            loop {
                let at = self.escape.and_then(|esc| memchr::memchr(esc, rest));
                let Some(at) = at else {
                    self.send_data(rest);
                    break;
                };
                self.send_data(&rest[..at]);
                match self.menu(signals).await? {
                    Choice::Continue => {}
                    Choice::SendEscape => self.send_data(&[ESCAPE]),
                    other => return Ok(Some(other)),
                }
                let typed_ahead = std::mem::take(&mut self.menu_buf);
                if !typed_ahead.is_empty() {
                    work.push_back(typed_ahead);
                }
                rest = &rest[at + 1..];
            }
        }
        Ok(None)
    }

    /// The escape prompt, in cooked mode; back in raw mode unless quitting.
    async fn menu(&mut self, signals: &mut Signals) -> Result<Choice, Failure> {
        self.term.cooked_for_prompt().await;
        loop {
            write_stdout(b"\r\nvspc> ")?;
            let Some(line) = self.menu_line(signals).await else {
                write_stdout(b"\r\n")?;
                return Ok(Choice::Quit);
            };
            let line = match line {
                Ok(line) => line,
                Err((n, what)) => return Ok(Choice::Signal(n, what)),
            };
            let choice = match line.trim() {
                "quit" | "q" => return Ok(Choice::Quit),
                "continue" | "c" | "" => Choice::Continue,
                "print-escape" => Choice::SendEscape,
                _ => {
                    write_stdout(
                        b"commands:\r\n  continue (c, or an empty line)  back to the console\r\n  \
                          print-escape                    send Ctrl-] to the VM\r\n  \
                          quit (q)                        leave\r\n",
                    )?;
                    continue;
                }
            };
            self.term.raw().map_err(|e| {
                failure(
                    EXIT_ERROR,
                    format!("cannot set the terminal to raw mode: {e}"),
                )
            })?;
            return Ok(choice);
        }
    }

    /// One command line from stdin: `None` at end of input, the signal if
    /// one came first.
    async fn menu_line(
        &mut self,
        signals: &mut Signals,
    ) -> Option<Result<String, (u8, &'static str)>> {
        loop {
            if let Some(pos) = self.menu_buf.iter().position(|&b| b == b'\n' || b == b'\r') {
                let mut line: Vec<u8> = self.menu_buf.drain(..=pos).collect();
                if line.last() == Some(&b'\r') && self.menu_buf.first() == Some(&b'\n') {
                    self.menu_buf.remove(0);
                }
                line.pop();
                return Some(Ok(String::from_utf8_lossy(&line).into_owned()));
            }
            tokio::select! {
                sig = signals.recv() => return Some(Err(sig)),
                chunk = self.stdin.recv() => match chunk {
                    Some(chunk) => self.menu_buf.extend_from_slice(&chunk),
                    None => return None,
                },
            }
        }
    }

    /// End a session we are leaving: let queued input reach the server,
    /// close our sending side, and read until the server closes (so nothing
    /// unread makes our close a reset); `print` shows that last output.
    async fn finish(&mut self, print: bool) {
        self.out = None;
        let writer = self.writer.take();
        let mut buf = vec![0u8; 64 * 1024];
        let _ = tokio::time::timeout(CLOSE_GRACE, async {
            if let Some(w) = writer {
                let _ = w.await;
            }
            loop {
                match self.rd.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) if print => {
                        if self.on_server_bytes(&buf[..n]).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                }
            }
        })
        .await;
    }
}

fn write_stdout(bytes: &[u8]) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .map_err(|e| failure(EXIT_ERROR, format!("cannot write to stdout: {e}")))
}

/// Errors that mean the server went away rather than something broke here.
fn closed_by_peer(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof
    )
}
