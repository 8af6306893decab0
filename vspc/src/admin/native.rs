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
use crate::hub::{AttachError, ConsoleProtocol, Hub, LockMode, Vm};
use crate::net::conn::{serve as serve_stream, Stream};
use crate::session::console::ConsoleSession;
use crate::session::Session;
use serde_json::{json, Value};
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

/// Serve one native-protocol connection.
pub async fn serve(hub: Arc<Hub>, mut tcp: TcpStream) {
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
        let words = shell_words(&line);
        let Some(cmd) = words.first().map(|w| w.to_ascii_lowercase()) else {
            continue;
        };
        let arg = words.get(1).map(String::as_str);
        let answer = match (cmd.as_str(), arg) {
            ("list", _) => json!({ "ok": true, "vms": listing(&hub).await }),
            ("version", _) => json!({
                "ok": true,
                "version": env!("CARGO_PKG_VERSION"),
                "protocol": PROTOCOL,
            }),
            ("help", _) => json!({ "ok": true, "commands": COMMANDS }),
            ("stats", _) => stats(&hub),
            ("quit", _) | ("exit", _) => return,
            ("clear", Some(name)) => match hub.find(name) {
                Some(vm) => {
                    let n = hub.clear_consoles(&vm, super::CLEARED_MSG);
                    json!({ "ok": true, "cleared": n })
                }
                None => not_found(&hub, name),
            },
            ("connect", Some(name)) => {
                let mode = match words.get(2) {
                    None => Some(LockMode::FreeForAllOrReadOnly),
                    Some(m) => LockMode::parse(m),
                };
                let protocol = match words.get(3).map(|w| w.to_ascii_lowercase()) {
                    None => Some(ConsoleProtocol::Telnet),
                    Some(w) if w == "telnet" => Some(ConsoleProtocol::Telnet),
                    Some(w) if w == "raw" => Some(ConsoleProtocol::Raw),
                    Some(_) => None,
                };
                match (hub.find(name), mode, protocol) {
                    (_, _, None) => error(
                        "bad_command",
                        &format!(
                            "unknown console protocol '{}' (use telnet or raw)",
                            words.get(3).map(String::as_str).unwrap_or_default()
                        ),
                    ),
                    (None, _, _) => not_found(&hub, name),
                    (Some(_), None, _) => error(
                        "lock_invalid",
                        &format!(
                            "unknown lock mode '{}' (use exclusive, write, free-for-all or free-for-all-fallback)",
                            words.get(2).map(String::as_str).unwrap_or_default()
                        ),
                    ),
                    (Some(vm), Some(mode), Some(protocol)) => match connect(&hub, &vm, mode, protocol).await {
                        Ok(session) => {
                            let answer = json!({
                                "ok": true,
                                "vm": row(&hub, &vm.record()),
                                "mode": session.access().as_str(),
                            });
                            if reply(&mut tcp, &answer).await.is_err() {
                                let mut session = session;
                                session.on_close();
                                return;
                            }
                            run_console(session, tcp, buf).await;
                            return;
                        }
                        Err(e) => error("lock_failed", &e.to_string()),
                    },
                }
            }
            ("clear", None) | ("connect", None) => {
                error("bad_command", &format!("'{cmd}' needs a VM name or uuid"))
            }
            _ => error(
                "bad_command",
                &format!("unknown command '{cmd}' (try 'help')"),
            ),
        };
        if reply(&mut tcp, &answer).await.is_err() {
            return;
        }
    }
}

async fn connect(
    hub: &Arc<Hub>,
    vm: &Arc<Vm>,
    mode: LockMode,
    protocol: ConsoleProtocol,
) -> Result<ConsoleSession, AttachError> {
    let seed = hub.backend().seed_data(vm.record()).await;
    ConsoleSession::join(hub, vm, mode, Some(&seed), protocol)
}

async fn run_console(mut session: ConsoleSession, tcp: TcpStream, leftover: Vec<u8>) {
    if !leftover.is_empty() {
        session.on_input(&leftover);
    }
    tracing::info!(
        access = session.access().as_str(),
        "admin console session (native protocol)"
    );
    let outbox = session.outbox();
    let stall = session.stall_timeout();
    serve_stream(Stream::Tcp(tcp), &mut session, outbox, None, stall).await;
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
    let vm = hub.find(&r.uuid);
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
    rows.iter().map(|r| row(hub, r)).collect()
}

fn error(code: &str, msg: &str) -> Value {
    json!({ "ok": false, "code": code, "error": msg })
}

fn not_found(hub: &Hub, name: &str) -> Value {
    let known: Vec<String> = hub.records().into_iter().map(|r| r.name).collect();
    json!({
        "ok": false,
        "code": "vm_not_found",
        "error": format!("no VM called '{name}'"),
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
