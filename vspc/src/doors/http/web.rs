//! The browser console: a VM's console over a WebSocket, and two small
//! pages that use it, served on the HTTP listener ([`crate::doors::http`]).
//!
//! | route | what |
//! | --- | --- |
//! | `GET /` | a page listing the VMs: name, state, consoles, a link to each console |
//! | `GET /vms/{vm}` | a page with an in-browser terminal (xterm.js) on the VM's console |
//! | `GET /api/v1/vms/{vm}/console` | the console itself, as a WebSocket (`?mode=` a lock mode) |
//! | `GET /static/{file}` | the pages' scripts and styles (xterm.js vendored in `vspc/web/vendor/`), compiled into the binary; needs no token |
//!
//! # The WebSocket
//!
//! A browser console is an ordinary console of the VM: a
//! [`crate::session::console::ConsoleSession`] with [`ConsoleProtocol::Raw`], joined to the hub with
//! the lock `?mode=` asks for (as the admin port's `connect`), shown the
//! backend's recent output first. It is served by the same connection
//! driver as every console ([`crate::net::conn`]) over an in-process pipe
//! ([`serve_console_over_pipe`]); the adapter here ([`pump`]) moves bytes between the
//! pipe and the WebSocket. So output reaches it through the console's
//! outbox, with the same fan-out, skip-and-tell and stall rules, and its
//! input waits while the VM's queue is full (the adapter then stops reading
//! the WebSocket, and TCP pushes back on the browser).
//!
//! Frames: binary frames carry raw bytes both ways (no telnet: every byte
//! value as it is); a text frame from the browser is taken as its UTF-8
//! bytes. Text frames from the daemon are JSON: first
//! `{"vm":NAME,"uuid":UUID,"access":ACCESS,"vm_connected":BOOL}`, then
//! `{"vm_connected":BOOL}` whenever the VM's connection comes or goes (the
//! session stays, as on a console port). A refused lock gets
//! `{"error":MESSAGE,"code":"lock_failed"}` (`vm_full` past
//! `--client-limit`, `vm_gone` for a VM that just expired) and a close with
//! code [`LOCK_FAILED`]. A read-only token gets a read-only session, whatever
//! `?mode=` says (its input is discarded by the session); it may not ask
//! for `exclusive` or `write` (403). A browser's request from a page of
//! another site (its `Origin` is not this server) is refused (403).
//! Every session is audited ([`crate::audit`]) with the browser's address
//! and the name of the token it came with.

use super::{Caller, TokenRight};
use crate::hub::{Access, AttachError, ConsoleProtocol, Hub, LockMode, RemoteError, RemoteVm, Vm};
use crate::net::conn::{serve_console_over_pipe, PIPE_BYTES};
use crate::session::open::{self, Find, History, OpenError, Request};
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use bytes::{Buf, Bytes};
use serde_json::json;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

/// The largest message the browser may send (a paste); larger ones close
/// the session.
const MAX_MESSAGE: usize = 1 << 20;

/// How often the adapter looks whether the VM's connection came or went.
const STATUS_EVERY: Duration = Duration::from_millis(250);

/// The close code for a refused console: the lock, or a full or gone VM
/// (the private-use range, 4000-4999).
pub const LOCK_FAILED: u16 = 4409;

/// The vendored xterm.js (see `vspc/web/vendor/README.md`).
const XTERM_JS: &str = include_str!("../../../web/vendor/xterm.js");
const XTERM_CSS: &str = include_str!("../../../web/vendor/xterm.css");
const FIT_JS: &str = include_str!("../../../web/vendor/addon-fit.js");
/// The pages' own script and style.
const CONSOLE_JS: &str = include_str!("../../../web/console.js");
const INDEX_JS: &str = include_str!("../../../web/index.js");
const PAGE_CSS: &str = include_str!("../../../web/vspc.css");
const INDEX_HTML: &str = include_str!("../../../web/index.html");
const CONSOLE_HTML: &str = include_str!("../../../web/console.html");

/// `GET /static/{file}`: the pages' scripts and styles.
pub fn asset(file: &str) -> Response {
    let (body, kind) = match file {
        "xterm.js" => (XTERM_JS, "text/javascript; charset=utf-8"),
        "xterm.css" => (XTERM_CSS, "text/css; charset=utf-8"),
        "addon-fit.js" => (FIT_JS, "text/javascript; charset=utf-8"),
        "console.js" => (CONSOLE_JS, "text/javascript; charset=utf-8"),
        "index.js" => (INDEX_JS, "text/javascript; charset=utf-8"),
        "vspc.css" => (PAGE_CSS, "text/css; charset=utf-8"),
        _ => return not_found_page("no such file"),
    };
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// Text for HTML: `<`, `>`, `&` and quotes escaped.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encode everything but RFC 3986's unreserved characters.
pub fn percent(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// A page: `template` with `{{KEY}}` replaced by the (already escaped)
/// values, in order (so a value from a VM goes last).
fn page(template: &str, values: &[(&str, &str)]) -> Response {
    let mut html = template.to_string();
    for (k, v) in values {
        html = html.replace(&format!("{{{{{k}}}}}"), v);
    }
    (
        [(header::CACHE_CONTROL, "no-store")],
        Html(html).into_response(),
    )
        .into_response()
}

/// A small HTML error page.
fn error_page(status: StatusCode, msg: &str) -> Response {
    let body = format!(
        "<!doctype html><meta charset=\"utf-8\"><title>vspc: {code}</title>\
         <link rel=\"stylesheet\" href=\"/static/vspc.css\">\
         <main class=\"page\"><h1>vspc</h1><p class=\"error\">{msg}</p>\
         <p><a href=\"/\">All VMs</a></p></main>\n",
        code = status.as_u16(),
        msg = escape(msg)
    );
    (status, Html(body)).into_response()
}

fn not_found_page(msg: &str) -> Response {
    error_page(StatusCode::NOT_FOUND, msg)
}

/// The 401 a page gets: browsers cannot send a header on a link, so say
/// how to give the token.
pub fn unauthorized_page(msg: &str) -> Response {
    error_page(
        StatusCode::UNAUTHORIZED,
        &format!("{msg}. Open this page with ?token=TOKEN added to its address."),
    )
}

/// `GET /`: every VM, with a link to its console. `token` is the `?token=`
/// the page was opened with, passed on in the links.
pub fn index(hub: &Hub, token: Option<&str>) -> Response {
    let suffix = token.map_or(String::new(), |t| format!("?token={}", percent(t)));
    let mut rows = String::new();
    let vms = hub.vms();
    for vm in &vms {
        let s = vm.status();
        let (state, class) = if s.vm_connected {
            ("connected", "up")
        } else {
            ("not connected", "down")
        };
        let _ = writeln!(
            rows,
            "<tr><td><a href=\"/vms/{uuid_url}{suffix}\">{name}</a></td>\
             <td class=\"{class}\">{state}</td><td>{consoles}</td>\
             <td><code>{uuid}</code></td><td>{port}</td></tr>",
            uuid_url = percent(&s.record.uuid),
            name = escape(&s.record.name),
            consoles = s.consoles,
            uuid = escape(&s.record.uuid),
            port = s.record.port.map_or("-".to_string(), |p| p.to_string()),
        );
    }
    if vms.is_empty() {
        rows.push_str("<tr><td colspan=\"5\">No VM has connected yet.</td></tr>\n");
    }
    let count = vms.len().to_string();
    page(
        INDEX_HTML,
        // The rows last: a VM's name is never read as a placeholder.
        &[
            ("COUNT", &count),
            ("VERSION", env!("CARGO_PKG_VERSION")),
            ("ROWS", &rows),
        ],
    )
}

/// `GET /vms/{vm}`: the terminal page; 404 for an unknown VM.
pub fn console_page(hub: &Hub, what: &str) -> Response {
    let (uuid, name) = match hub.lookup(what) {
        Ok(vm) => (vm.uuid.clone(), vm.name()),
        Err(why @ crate::hub::Lookup::Ambiguous(_)) => {
            return error_page(StatusCode::CONFLICT, &format!("{}.", why.explain(what)))
        }
        Err(crate::hub::Lookup::NotFound) => match remote(hub, what) {
            Ok(v) => (v.record.uuid, v.record.name),
            Err(RemoteError::Ambiguous(uuids)) => {
                let why = crate::hub::Lookup::Ambiguous(uuids);
                return error_page(StatusCode::CONFLICT, &format!("{}.", why.explain(what)));
            }
            Err(_) => return not_found_page(&format!("No VM named or with uuid {what:?}.")),
        },
    };
    page(
        CONSOLE_HTML,
        &[("UUID", &escape(&uuid)), ("NAME", &escape(&name))],
    )
}

/// The VM another node of the cluster holds that `what` names.
fn remote(hub: &Hub, what: &str) -> Result<RemoteVm, RemoteError> {
    match hub.cluster() {
        Some(c) => crate::hub::find_remote(c.remote_vms(), what),
        None => Err(RemoteError::NotFound),
    }
}

/// The VM a browser console is for.
enum Target {
    Local(Arc<Vm>),
    /// Another node of the cluster holds it: the console is relayed there.
    Remote(Box<RemoteVm>),
}

/// A JSON error, as the API answers them.
fn api_error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "error": msg.into() }))).into_response()
}

/// `GET /api/v1/vms/{vm}/console`: check the VM, the mode and the token's
/// right, then upgrade and serve the console.
pub fn console(
    hub: Arc<Hub>,
    what: &str,
    mode: Option<&str>,
    (right, caller): (TokenRight, Caller),
    headers: &HeaderMap,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    if !same_origin(headers) {
        return api_error(
            StatusCode::FORBIDDEN,
            "a page from another site may not open a console (the Origin is not this server)",
        );
    }
    let vm = match hub.lookup(what) {
        Ok(vm) => Target::Local(vm),
        Err(crate::hub::Lookup::NotFound) => match remote(&hub, what) {
            Ok(v) => Target::Remote(Box::new(v)),
            Err(RemoteError::Ambiguous(uuids)) => {
                return crate::doors::http::lookup_failed(
                    what,
                    crate::hub::Lookup::Ambiguous(uuids),
                )
            }
            Err(_) => return crate::doors::http::lookup_failed(what, crate::hub::Lookup::NotFound),
        },
        Err(why) => return crate::doors::http::lookup_failed(what, why),
    };
    let asked = match mode.filter(|m| !m.is_empty()) {
        None => LockMode::FreeForAllOrReadOnly,
        Some(m) => match LockMode::parse(m) {
            Some(mode) => mode,
            None => {
                return api_error(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "unknown lock mode {m:?} (use exclusive, write, free-for-all or free-for-all-fallback)"
                    ),
                )
            }
        },
    };
    let mode = match (right, asked) {
        (TokenRight::All, mode) => mode,
        (TokenRight::Get, LockMode::Exclusive | LockMode::Write) => {
            return api_error(
                StatusCode::FORBIDDEN,
                "this token is read-only; an exclusive or write lock needs a read-write token",
            )
        }
        (TokenRight::Get, _) => LockMode::ReadOnly,
    };
    let upgrade = match upgrade {
        Ok(u) => u,
        Err(rejection) => return rejection.into_response(),
    };
    upgrade
        .max_message_size(MAX_MESSAGE)
        .max_frame_size(MAX_MESSAGE)
        .on_upgrade(move |ws| async move {
            match vm {
                Target::Local(vm) => run(ws, hub, vm, mode, caller).await,
                Target::Remote(v) => run_remote(ws, hub, *v, mode, caller).await,
            }
        })
}

/// Browsers let any page open a WebSocket to any address, and send its
/// `Origin`: refuse one from another site, so that a web page cannot type
/// into a console on a loopback daemon without a token file. Clients that
/// are not browsers send no `Origin`.
pub(crate) fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let authority = origin
        .to_str()
        .ok()
        .and_then(|o| o.split_once("://"))
        .map(|(_, rest)| rest.trim_end_matches('/'));
    matches!((authority, host), (Some(a), Some(h)) if a.eq_ignore_ascii_case(h.trim()))
}

/// Open the console and serve it until either side ends.
async fn run(mut ws: WebSocket, hub: Arc<Hub>, vm: Arc<Vm>, mode: LockMode, caller: Caller) {
    let request = Request {
        vm: Find::Vm(vm.clone()),
        mode,
        protocol: ConsoleProtocol::Raw,
        history: History::Inline,
        door: crate::audit::Kind::Web,
        peer: caller.peer,
        user: caller.token,
    };
    let mut session = match open::open(&hub, request).await {
        Ok(opened) => opened.session,
        Err(e) => {
            tracing::info!(vm = %vm.name(), "browser console refused: {e}");
            let code = match e {
                OpenError::Refused(AttachError::Full { .. }) => "vm_full",
                OpenError::Refused(AttachError::Gone { .. }) | OpenError::NotFound(_) => "vm_gone",
                OpenError::Refused(_) | OpenError::Ambiguous { .. } => "lock_failed",
            };
            return refuse(ws, e.to_string(), code).await;
        }
    };
    let access = session.access();
    tracing::info!(vm = %vm.name(), access = access.as_str(), "browser console session");
    let hello = json!({
        "vm": vm.name(),
        "uuid": vm.uuid,
        "access": access.as_str(),
        "vm_connected": vm.vm_connected(),
    });
    if ws.send(Message::text(hello.to_string())).await.is_err() {
        use crate::session::Session;
        session.on_close(std::time::Instant::now());
        return;
    }
    // The browser going ends the adapter; a console that ends first
    // (cleared, stalled) gives it a moment to pass on the last bytes and
    // the close, then the socket goes, even if the browser takes nothing.
    let connected = || vm.vm_connected();
    serve_console_over_pipe(&mut session, |pipe| pump(ws, pipe, connected, access)).await;
}

/// Tell the browser the console was refused, with the code its page
/// understands, and close.
async fn refuse(mut ws: WebSocket, error: String, code: &str) {
    let msg = json!({ "error": error, "code": code });
    let _ = ws.send(Message::text(msg.to_string())).await;
    let _ = ws
        .send(Message::Close(Some(CloseFrame {
            code: LOCK_FAILED,
            reason: "lock refused".into(),
        })))
        .await;
}

/// [`run`] for a VM another node of the cluster holds: the console is
/// opened there under the same lock rules and relayed; it follows the VM
/// if it moves.
async fn run_remote(mut ws: WebSocket, hub: Arc<Hub>, v: RemoteVm, mode: LockMode, caller: Caller) {
    let Some(cluster) = hub.cluster().cloned() else {
        return refuse(ws, "the VM is gone".into(), "vm_gone").await;
    };
    let spec = crate::hub::RemoteSpec {
        mode,
        protocol: ConsoleProtocol::Raw,
        history: true,
        door: crate::audit::Kind::Web.as_str(),
        client: caller.peer,
        user: caller.token,
    };
    let opened = match cluster.open_remote(&v.record.uuid, spec).await {
        Ok(o) => o,
        Err(e) => {
            tracing::info!(vm = %v.record.name, node = %v.node, "browser console of another node's VM refused: {e:?}");
            let (error, code) = match e {
                RemoteError::Refused(why) if why.contains("full") => (why, "vm_full"),
                RemoteError::Refused(why) => (why, "lock_failed"),
                _ => ("the VM is gone".into(), "vm_gone"),
            };
            return refuse(ws, error, code).await;
        }
    };
    let access = opened.access;
    tracing::info!(vm = %v.record.name, node = %v.node, access = access.as_str(), "browser console session for another node's VM");
    let hello = json!({
        "vm": v.record.name,
        "uuid": v.record.uuid,
        "access": access.as_str(),
        "vm_connected": v.connected,
        "node": v.node,
    });
    if ws.send(Message::text(hello.to_string())).await.is_err() {
        return;
    }
    let uuid = v.record.uuid.clone();
    // The VM's connection as the cluster's view has it (wherever the VM
    // is now: here after a vMotion, or on another node).
    let connected = || {
        hub.find(&uuid)
            .map(|vm| vm.vm_connected())
            .unwrap_or_else(|| {
                cluster
                    .remote_vms()
                    .iter()
                    .any(|r| r.record.uuid == uuid && r.connected)
            })
    };
    pump(ws, opened.pipe, connected, access).await;
}

/// Why [`pump`] stopped.
#[derive(PartialEq, Eq)]
enum End {
    /// The console's connection ended (cleared, stalled, the daemon).
    Console,
    /// The browser closed the WebSocket or went away.
    Browser,
}

/// The adapter: bytes from the pipe (the console's output) go out as
/// binary frames; frames from the browser go into the pipe (the console's
/// input); changes of the VM's connection go out as JSON text frames. The
/// browser is not read while the pipe takes no more input. Dropping the
/// pipe's end tells the connection driver the console is gone.
async fn pump(
    mut ws: WebSocket,
    pipe: DuplexStream,
    vm_connected: impl Fn() -> bool,
    access: Access,
) {
    let (mut from_console, mut to_console) = tokio::io::split(pipe);
    let mut buf = vec![0u8; PIPE_BYTES];
    // Input taken from the browser, not yet in the pipe.
    let mut input = Bytes::new();
    let mut connected = vm_connected();
    let mut tick = tokio::time::interval(STATUS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let end = loop {
        tokio::select! {
            got = from_console.read(&mut buf) => match got {
                Ok(0) | Err(_) => break End::Console,
                Ok(n) => {
                    let frame = Message::binary(Bytes::copy_from_slice(&buf[..n]));
                    if ws.send(frame).await.is_err() {
                        break End::Browser;
                    }
                }
            },
            put = to_console.write(&input), if !input.is_empty() => match put {
                Ok(n) if n > 0 => input.advance(n),
                _ => break End::Console,
            },
            msg = ws.recv(), if input.is_empty() => match msg {
                Some(Ok(Message::Binary(b))) => input = b,
                Some(Ok(Message::Text(t))) => input = Bytes::from(t),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break End::Browser,
            },
            _ = tick.tick() => {
                let now = vm_connected();
                if now != connected {
                    connected = now;
                    let status = json!({ "vm_connected": now }).to_string();
                    if ws.send(Message::text(status)).await.is_err() {
                        break End::Browser;
                    }
                }
            }
        }
    };
    if end == End::Console {
        // Whatever the console was told last (a clear, a stall) went out
        // as data before the end.
        let _ = ws
            .send(Message::Close(Some(CloseFrame {
                code: axum::extract::ws::close_code::NORMAL,
                reason: "the console was closed".into(),
            })))
            .await;
    }
    tracing::debug!(access = access.as_str(), "browser console adapter ended");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_and_percent_encoding() {
        assert_eq!(
            escape("<a href=\"x\">&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;&lt;/a&gt;"
        );
        assert_eq!(percent("a b&c=d/é~"), "a%20b%26c%3Dd%2F%C3%A9~");
    }

    #[test]
    fn only_this_servers_pages_may_open_a_console() {
        let h = |pairs: &[(&'static str, &'static str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.insert(*k, v.parse().expect("header value"));
            }
            m
        };
        assert!(same_origin(&h(&[("host", "127.0.0.1:13372")])));
        assert!(same_origin(&h(&[
            ("host", "127.0.0.1:13372"),
            ("origin", "http://127.0.0.1:13372")
        ])));
        assert!(same_origin(&h(&[
            ("host", "Vspc.example.com"),
            ("origin", "https://vspc.example.com")
        ])));
        assert!(!same_origin(&h(&[
            ("host", "127.0.0.1:13372"),
            ("origin", "https://evil.example")
        ])));
        assert!(!same_origin(&h(&[
            ("host", "127.0.0.1:13372"),
            ("origin", "null")
        ])));
        assert!(!same_origin(&h(&[("origin", "http://127.0.0.1:13372")])));
    }

    #[test]
    fn every_asset_is_served_and_nothing_else() {
        for f in [
            "xterm.js",
            "xterm.css",
            "addon-fit.js",
            "console.js",
            "index.js",
            "vspc.css",
        ] {
            assert_eq!(asset(f).status(), StatusCode::OK, "{f}");
        }
        assert_eq!(asset("../Cargo.toml").status(), StatusCode::NOT_FOUND);
        assert!(XTERM_JS.len() > 100_000, "the vendored xterm.js is there");
    }
}
