//! The native admin protocol, for scripts and `vspc-client`.
//!
//! One command per line (LF or CR LF; arguments split like a shell does,
//! so `connect "my vm" write` works); every answer is one JSON object on one
//! line with `"ok": true` or `"ok": false` plus `"code"` and `"error"`:
//!
//! | command | answer |
//! | --- | --- |
//! | `list` | `{"ok":true,"vms":[{"name","uuid","port","vm_connected","consoles"}]}`, sorted by name |
//! | `connect VM [MODE [PROTOCOL]]` | `{"ok":true,"vm":{…},"mode":"free-for-all"}`, then the connection is a console of VM (recent output first): telnet, or with PROTOCOL `raw` bytes untouched both ways |
//! | `clear VM` | `{"ok":true,"cleared":N}`: every console of VM disconnected |
//! | `stats` | `{"ok":true,"vms","vms_connected","consoles","heap_allocated_bytes","heap_resident_bytes"}` (the heap figures are `null` where the allocator gives none) |
//! | `version` | `{"ok":true,"version":"0.1.0","protocol":1}` |
//! | `help` | `{"ok":true,"commands":[…]}` |
//! | `quit` | closes the connection |
//!
//! VM is a name or a uuid in any spelling. MODE is `exclusive`, `write`,
//! `free-for-all` or `free-for-all-fallback` (the default; read-only while
//! someone holds a write lock). Error codes: `bad_command`, `vm_not_found`
//! (with `"known"`: the VM names), `lock_invalid`, `lock_failed`.

use crate::config::shell_words;
use crate::hub::{ConsoleProtocol, Hub, LockMode, RemoteError, RemoteVm};
use crate::net::conn::{serve_console, Stream};
use crate::session::console::ConsoleSession;
use crate::session::open::{self, Find, History, Opened, Request};
use crate::session::Session;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use vspc_backend_api::VmRecord;

/// The version of this protocol.
pub const PROTOCOL: u32 = 1;
/// Longest command line accepted.
const MAX_LINE: usize = 4096;
/// A client idle this long in command mode is disconnected.
const IDLE: Duration = Duration::from_secs(300);

const COMMANDS: &[&str] = &[
    "list",
    "connect VM [exclusive|write|free-for-all|free-for-all-fallback [telnet|raw]]",
    "clear VM",
    "stats",
    "version",
    "help",
    "quit",
];

/// One command line, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Command {
    List,
    Connect {
        vm: String,
        /// An unknown mode is answered (`lock_invalid`) only once the VM is
        /// found: an unknown VM is reported first.
        mode: Result<LockMode, Reject>,
        protocol: ConsoleProtocol,
    },
    Clear {
        vm: String,
    },
    Stats,
    Version,
    Help,
    /// `quit` or `exit`.
    Quit,
}

/// An error answer: `{"ok":false,"code":…,"error":…}`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Reject {
    code: &'static str,
    message: String,
}

impl Reject {
    fn new(code: &'static str, message: String) -> Reject {
        Reject { code, message }
    }

    fn answer(&self) -> Value {
        error(self.code, &self.message)
    }
}

/// Read one command line: `Ok(None)` for a blank line (no answer). The
/// command word and the protocol word are case-insensitive; words after
/// those a command uses are ignored.
fn parse(line: &str) -> Result<Option<Command>, Reject> {
    let words = shell_words(line);
    let Some(cmd) = words.first().map(|w| w.to_ascii_lowercase()) else {
        return Ok(None);
    };
    let vm = || {
        words
            .get(1)
            .cloned()
            .ok_or_else(|| Reject::new("bad_command", format!("'{cmd}' needs a VM name or uuid")))
    };
    let command = match cmd.as_str() {
        "list" => Command::List,
        "version" => Command::Version,
        "help" => Command::Help,
        "stats" => Command::Stats,
        "quit" | "exit" => Command::Quit,
        "clear" => Command::Clear { vm: vm()? },
        "connect" => Command::Connect {
            vm: vm()?,
            protocol: parse_protocol(words.get(3))?,
            mode: parse_mode(words.get(2)),
        },
        _ => {
            return Err(Reject::new(
                "bad_command",
                format!("unknown command '{cmd}' (try 'help')"),
            ))
        }
    };
    Ok(Some(command))
}

/// `connect`'s third word; free-for-all-fallback when absent.
fn parse_mode(word: Option<&String>) -> Result<LockMode, Reject> {
    let Some(word) = word else {
        return Ok(LockMode::FreeForAllOrReadOnly);
    };
    LockMode::parse(word).ok_or_else(|| {
        Reject::new(
            "lock_invalid",
            format!("unknown lock mode '{word}' (use exclusive, write, free-for-all or free-for-all-fallback)"),
        )
    })
}

/// `connect`'s fourth word; telnet when absent.
fn parse_protocol(word: Option<&String>) -> Result<ConsoleProtocol, Reject> {
    let Some(word) = word else {
        return Ok(ConsoleProtocol::Telnet);
    };
    match word.to_ascii_lowercase().as_str() {
        "telnet" => Ok(ConsoleProtocol::Telnet),
        "raw" => Ok(ConsoleProtocol::Raw),
        _ => Err(Reject::new(
            "bad_command",
            format!("unknown console protocol '{word}' (use telnet or raw)"),
        )),
    }
}

/// What a command leads to.
enum Outcome {
    /// Answer, and read the next command.
    Answer(Value),
    /// Close the connection without an answer.
    Close,
    /// Answer, then the connection is this console.
    /// (Boxed: the session is large, and this happens once per connection.)
    Console(Box<ConsoleSession>, Value),
    /// Answer, then the connection is this console of a VM another node
    /// of the cluster holds (the pipe to it).
    Remote(tokio::io::DuplexStream, Value),
}

/// Run one command.
async fn run(hub: &Arc<Hub>, peer: Option<SocketAddr>, cmd: Command) -> Outcome {
    let answer = match cmd {
        Command::List => json!({ "ok": true, "vms": listing(hub).await }),
        Command::Version => json!({
            "ok": true,
            "version": env!("CARGO_PKG_VERSION"),
            "protocol": PROTOCOL,
        }),
        Command::Help => json!({ "ok": true, "commands": COMMANDS }),
        Command::Stats => stats(hub),
        Command::Quit => return Outcome::Close,
        Command::Clear { vm } => clear(hub, &vm),
        Command::Connect { vm, mode, protocol } => {
            return run_connect(hub, peer, &vm, mode, protocol).await
        }
    };
    Outcome::Answer(answer)
}

fn clear(hub: &Hub, name: &str) -> Value {
    let vm = match hub.lookup(name) {
        Ok(vm) => vm,
        Err(e) => return not_found(hub, name, &e),
    };
    let n = hub.clear_consoles(&vm, super::CLEARED_MSG, std::time::Instant::now());
    json!({ "ok": true, "cleared": n })
}

async fn run_connect(
    hub: &Arc<Hub>,
    peer: Option<SocketAddr>,
    name: &str,
    mode: Result<LockMode, Reject>,
    protocol: ConsoleProtocol,
) -> Outcome {
    let mode = match mode {
        Ok(mode) => mode,
        Err(reject) => return Outcome::Answer(reject.answer()),
    };
    let vm = match hub.lookup(name) {
        Ok(vm) => vm,
        Err(crate::hub::Lookup::NotFound) if hub.cluster().is_some() => {
            return connect_remote(hub, peer, name, mode, protocol).await
        }
        Err(e) => return Outcome::Answer(not_found(hub, name, &e)),
    };
    let request = Request {
        vm: Find::Vm(vm.clone()),
        mode,
        protocol,
        history: History::Inline,
        door: crate::audit::Kind::AdminNative,
        peer,
        user: None,
    };
    match open::open(hub, request).await {
        Ok(Opened { session, .. }) => {
            let answer = json!({
                "ok": true,
                "vm": row(hub, &vm.record()),
                "mode": session.access().as_str(),
            });
            Outcome::Console(Box::new(session), answer)
        }
        Err(e) => Outcome::Answer(error("lock_failed", &e.to_string())),
    }
}

/// `connect` for a VM another node of the cluster holds: the console is
/// opened there, with the same lock rules.
async fn connect_remote(
    hub: &Arc<Hub>,
    peer: Option<SocketAddr>,
    name: &str,
    mode: LockMode,
    protocol: ConsoleProtocol,
) -> Outcome {
    let Some(c) = hub.cluster() else {
        return Outcome::Answer(not_found(hub, name, &crate::hub::Lookup::NotFound));
    };
    let spec = crate::hub::RemoteSpec {
        mode,
        protocol,
        history: true,
        door: crate::audit::Kind::AdminNative.as_str(),
        client: peer,
        user: None,
    };
    match c.open_remote(name, spec).await {
        Ok(opened) => {
            let mut remote = HashMap::new();
            remote.insert(opened.vm.record.uuid.clone(), opened.vm.clone());
            let answer = json!({
                "ok": true,
                "vm": row_with(hub, &opened.vm.record, &remote),
                "mode": opened.access.as_str(),
            });
            Outcome::Remote(opened.pipe, answer)
        }
        Err(RemoteError::NotFound) => {
            Outcome::Answer(not_found(hub, name, &crate::hub::Lookup::NotFound))
        }
        Err(RemoteError::Ambiguous(uuids)) => {
            Outcome::Answer(not_found(hub, name, &crate::hub::Lookup::Ambiguous(uuids)))
        }
        Err(RemoteError::Refused(why)) => Outcome::Answer(error("lock_failed", &why)),
    }
}

/// Serve one native-protocol connection.
pub async fn serve(hub: Arc<Hub>, mut tcp: TcpStream) {
    let peer = tcp.peer_addr().ok();
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let line = match read_line(&mut tcp, &mut buf).await {
            Ok(Some(l)) => l,
            Ok(None) => return,
            Err(msg) => {
                let _ = reply(&mut tcp, &error("bad_command", &msg)).await;
                return;
            }
        };
        let outcome = match parse(&line) {
            Ok(None) => continue,
            Ok(Some(cmd)) => run(&hub, peer, cmd).await,
            Err(reject) => Outcome::Answer(reject.answer()),
        };
        match outcome {
            Outcome::Answer(answer) => {
                if reply(&mut tcp, &answer).await.is_err() {
                    return;
                }
            }
            Outcome::Close => return,
            Outcome::Console(session, answer) => {
                return hand_over(*session, &answer, tcp, buf).await;
            }
            Outcome::Remote(pipe, answer) => {
                return relay(pipe, &answer, tcp, buf).await;
            }
        }
    }
}

/// Answer `connect`, then serve the connection as the console (with what
/// the client sent after the command line).
async fn hand_over(
    mut session: ConsoleSession,
    answer: &Value,
    mut tcp: TcpStream,
    leftover: Vec<u8>,
) {
    if reply(&mut tcp, answer).await.is_err() {
        session.on_close(std::time::Instant::now());
        return;
    }
    run_console(session, tcp, leftover).await;
}

/// The connection after `connect` to another node's VM: its bytes both
/// ways through the pipe to the relay, until either side ends.
async fn relay(
    mut pipe: tokio::io::DuplexStream,
    answer: &Value,
    mut tcp: TcpStream,
    leftover: Vec<u8>,
) {
    if reply(&mut tcp, answer).await.is_err() {
        return;
    }
    if !leftover.is_empty() && pipe.write_all(&leftover).await.is_err() {
        return;
    }
    tracing::info!("admin console session (native protocol) for another node's VM");
    let _ = tokio::io::copy_bidirectional(&mut tcp, &mut pipe).await;
}

async fn run_console(mut session: ConsoleSession, tcp: TcpStream, leftover: Vec<u8>) {
    if !leftover.is_empty() {
        session.on_input(&leftover, std::time::Instant::now());
    }
    tracing::info!(
        access = session.access().as_str(),
        "admin console session (native protocol)"
    );
    serve_console(Stream::Tcp(tcp), &mut session).await;
}

/// The `stats` answer: the hub's counts and the allocator's figures.
fn stats(hub: &Hub) -> Value {
    let (mut connected, mut consoles) = (0, 0);
    for r in hub.records() {
        if let Some(vm) = hub.find(&r.uuid) {
            connected += usize::from(vm.vm_connected());
            consoles += vm.console_count();
        }
    }
    let heap = crate::memory::heap();
    json!({
        "ok": true,
        "vms": hub.len(),
        "vms_connected": connected,
        "consoles": consoles,
        "heap_allocated_bytes": heap.map(|h| h.allocated),
        "heap_resident_bytes": heap.map(|h| h.resident),
    })
}

/// A listing row with what the hub knows beyond the record.
fn row(hub: &Hub, r: &VmRecord) -> Value {
    let remote: HashMap<String, RemoteVm> = HashMap::new();
    row_with(hub, r, &remote)
}

/// [`row`], with the VMs other nodes of the cluster hold (by uuid).
fn row_with(hub: &Hub, r: &VmRecord, remote: &HashMap<String, RemoteVm>) -> Value {
    let vm = hub.find(&r.uuid);
    if vm.is_none() {
        if let Some(other) = remote.get(&r.uuid) {
            return json!({
                "name": r.name,
                "uuid": r.uuid,
                "port": r.port,
                "vm_connected": other.connected,
                "consoles": 0,
                "node": other.node,
            });
        }
    }
    json!({
        "name": r.name,
        "uuid": r.uuid,
        "port": r.port,
        "vm_connected": vm.as_ref().is_some_and(|v| v.vm_connected()),
        "consoles": vm.as_ref().map_or(0, |v| v.console_count()),
    })
}

async fn listing(hub: &Hub) -> Vec<Value> {
    let mut rows = hub.listing().await;
    rows.sort_by(|a, b| a.name.cmp(&b.name).then(a.uuid.cmp(&b.uuid)));
    // Cluster mode: other nodes' VMs carry their node.
    let remote: HashMap<String, RemoteVm> = hub
        .cluster()
        .map(|c| {
            c.remote_vms()
                .into_iter()
                .map(|v| (v.record.uuid.clone(), v))
                .collect()
        })
        .unwrap_or_default();
    rows.iter().map(|r| row_with(hub, r, &remote)).collect()
}

fn error(code: &str, msg: &str) -> Value {
    json!({ "ok": false, "code": code, "error": msg })
}

fn not_found(hub: &Hub, name: &str, why: &crate::hub::Lookup) -> Value {
    if let crate::hub::Lookup::Ambiguous(uuids) = why {
        return json!({
            "ok": false,
            "code": "vm_ambiguous",
            "error": why.explain(name),
            "uuids": uuids,
        });
    }
    let mut known: Vec<String> = hub.records().into_iter().map(|r| r.name).collect();
    if let Some(c) = hub.cluster() {
        known.extend(c.remote_vms().into_iter().map(|v| v.record.name));
    }
    json!({
        "ok": false,
        "code": "vm_not_found",
        "error": format!("no VM called '{}'", crate::shown::Shown(name)),
        "known": known,
    })
}

async fn reply(tcp: &mut TcpStream, v: &Value) -> std::io::Result<()> {
    let mut line = v.to_string();
    line.push('\n');
    tcp.write_all(line.as_bytes()).await
}

/// The next command line; `None` at end of stream or after idling too long.
async fn read_line(tcp: &mut TcpStream, buf: &mut Vec<u8>) -> Result<Option<String>, String> {
    loop {
        let newline = buf.iter().position(|&b| b == b'\n');
        if newline.unwrap_or(buf.len()) > MAX_LINE {
            return Err(format!("command line longer than {MAX_LINE} bytes"));
        }
        if let Some(pos) = newline {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            let text = String::from_utf8_lossy(&line);
            return Ok(Some(text.trim_end_matches(['\r', '\n']).to_string()));
        }
        let mut chunk = [0u8; 1024];
        match tokio::time::timeout(IDLE, tcp.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return Ok(None),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(line: &str) -> Command {
        match parse(line) {
            Ok(Some(c)) => c,
            other => panic!("{line:?}: expected a command, got {other:?}"),
        }
    }

    fn reject(line: &str) -> Reject {
        match parse(line) {
            Err(r) => r,
            other => panic!("{line:?}: expected an error, got {other:?}"),
        }
    }

    fn connect(vm: &str, mode: LockMode, protocol: ConsoleProtocol) -> Command {
        Command::Connect {
            vm: vm.into(),
            mode: Ok(mode),
            protocol,
        }
    }

    #[test]
    fn every_command() {
        assert_eq!(cmd("list"), Command::List);
        assert_eq!(cmd("stats"), Command::Stats);
        assert_eq!(cmd("version"), Command::Version);
        assert_eq!(cmd("help"), Command::Help);
        assert_eq!(cmd("quit"), Command::Quit);
        assert_eq!(cmd("exit"), Command::Quit);
        assert_eq!(cmd("clear web-1"), Command::Clear { vm: "web-1".into() });
        assert_eq!(
            cmd("connect web-1"),
            connect(
                "web-1",
                LockMode::FreeForAllOrReadOnly,
                ConsoleProtocol::Telnet
            )
        );
        assert_eq!(
            cmd("connect web-1 write"),
            connect("web-1", LockMode::Write, ConsoleProtocol::Telnet)
        );
        assert_eq!(
            cmd("connect web-1 exclusive raw"),
            connect("web-1", LockMode::Exclusive, ConsoleProtocol::Raw)
        );
        assert_eq!(
            cmd("connect web-1 free-for-all telnet"),
            connect("web-1", LockMode::FreeForAll, ConsoleProtocol::Telnet)
        );
        assert_eq!(
            cmd("connect web-1 free_for_all_or_readonly"),
            connect(
                "web-1",
                LockMode::FreeForAllOrReadOnly,
                ConsoleProtocol::Telnet
            )
        );
    }

    #[test]
    fn blank_lines_and_quoting() {
        assert_eq!(parse(""), Ok(None));
        assert_eq!(parse("   \t"), Ok(None));
        assert_eq!(
            cmd(r#"connect "my vm" write"#),
            connect("my vm", LockMode::Write, ConsoleProtocol::Telnet)
        );
        assert_eq!(cmd("clear 'a b'"), Command::Clear { vm: "a b".into() });
        assert_eq!(cmd("  list  "), Command::List);
    }

    #[test]
    fn extra_words_are_ignored() {
        assert_eq!(cmd("list everything"), Command::List);
        assert_eq!(cmd("quit now"), Command::Quit);
        assert_eq!(cmd("clear a b"), Command::Clear { vm: "a".into() });
        assert_eq!(
            cmd("connect a write raw more"),
            connect("a", LockMode::Write, ConsoleProtocol::Raw)
        );
    }

    #[test]
    fn wrong_arity() {
        let needs = |c: &str| Reject::new("bad_command", format!("'{c}' needs a VM name or uuid"));
        assert_eq!(reject("clear"), needs("clear"));
        assert_eq!(reject("connect"), needs("connect"));
        assert_eq!(reject("CONNECT"), needs("connect"));
    }

    #[test]
    fn unknown_commands() {
        assert_eq!(
            reject("frobnicate x"),
            Reject::new(
                "bad_command",
                "unknown command 'frobnicate' (try 'help')".into()
            )
        );
        // The command word is reported lowercased, as it is matched.
        assert_eq!(
            reject("LiSTS"),
            Reject::new("bad_command", "unknown command 'lists' (try 'help')".into())
        );
    }

    #[test]
    fn unknown_lock_mode_waits_for_the_vm() {
        let bad = Reject::new(
            "lock_invalid",
            "unknown lock mode 'Shared' (use exclusive, write, free-for-all or free-for-all-fallback)"
                .into(),
        );
        assert_eq!(
            cmd("connect web-1 Shared"),
            Command::Connect {
                vm: "web-1".into(),
                mode: Err(bad.clone()),
                protocol: ConsoleProtocol::Telnet,
            }
        );
        assert_eq!(
            cmd("connect web-1 Shared raw"),
            Command::Connect {
                vm: "web-1".into(),
                mode: Err(bad.clone()),
                protocol: ConsoleProtocol::Raw,
            }
        );
        assert_eq!(
            bad.answer(),
            json!({
                "ok": false,
                "code": "lock_invalid",
                "error": "unknown lock mode 'Shared' (use exclusive, write, free-for-all or free-for-all-fallback)",
            })
        );
    }

    #[test]
    fn unknown_protocol_word() {
        let bad = |w: &str| {
            Reject::new(
                "bad_command",
                format!("unknown console protocol '{w}' (use telnet or raw)"),
            )
        };
        assert_eq!(reject("connect web-1 write ssh"), bad("ssh"));
        assert_eq!(reject("connect web-1 write SSH"), bad("SSH"));
        // Checked before the lock mode (and before the VM is looked up).
        assert_eq!(reject("connect web-1 bogus ssh"), bad("ssh"));
        assert_eq!(reject("connect web-1 write ''"), bad(""));
    }

    #[test]
    fn case_insensitivity() {
        assert_eq!(cmd("LIST"), Command::List);
        assert_eq!(cmd("Stats"), Command::Stats);
        assert_eq!(cmd("VERSION"), Command::Version);
        assert_eq!(cmd("Help"), Command::Help);
        assert_eq!(cmd("QUIT"), Command::Quit);
        assert_eq!(cmd("Exit"), Command::Quit);
        // The VM name keeps its spelling (the hub matches it).
        assert_eq!(cmd("CLEAR Web-1"), Command::Clear { vm: "Web-1".into() });
        assert_eq!(
            cmd("Connect Web-1 WRITE RAW"),
            connect("Web-1", LockMode::Write, ConsoleProtocol::Raw)
        );
        assert_eq!(
            cmd("connect w Free-For-All Telnet"),
            connect("w", LockMode::FreeForAll, ConsoleProtocol::Telnet)
        );
    }
}
