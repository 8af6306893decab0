//! The HTTP API and `/metrics`: one listener (`--http-port`, 13372, on
//! `--http-iface`, 127.0.0.1) on the daemon's own tokio runtime, served by
//! axum, optionally over TLS (`--http-cert`/`--http-key`, the same rustls
//! ring provider as the proxy port).
//!
//! | route | what |
//! | --- | --- |
//! | `GET /healthz` | 200 while the daemon's listeners are up |
//! | `GET /metrics` | Prometheus text ([`crate::metrics`]) |
//! | `GET /api/v1/vms` | every VM, as the admin listing plus connection facts |
//! | `GET /api/v1/vms/{vm}` | one VM, by name or uuid in any spelling |
//! | `POST /api/v1/vms/{vm}/clear` | disconnect the VM's consoles (a write) |
//! | `GET /api/v1/vms/{vm}/recent` | the VM's recent output (its replay ring, `--replay-bytes`), any backend |
//! | `GET /console_log/{uuid}?bytes=N` | the tail of the VM's transcript, from the backends, else its replay ring |
//! | `GET /api/v1/vms/{vm}/console` | the VM's console as a WebSocket ([`crate::doors::http::web`]) |
//! | `GET /`, `GET /vms/{vm}`, `GET /static/{file}` | the browser pages ([`crate::doors::http::web`]) |
//!
//! With `--http-token-file`, every route but `/healthz` and `/static/`
//! needs `Authorization: Bearer TOKEN`, or `?token=TOKEN` in the address
//! (browsers can set no header on a link or a WebSocket); a read-only
//! (`ro`) token may only read, and gets read-only browser consoles.
//! Errors are JSON `{"error": "..."}`: 401 for a missing or unknown token,
//! 403 for a read-only token on a write, 404 for an unknown VM or route.
//! Listening beyond loopback without a token file is refused at start-up
//! ([`check_exposure`]). The HTTP code never opens files: transcripts come
//! from the backends ([`crate::backend_host::Backends::console_log`]).
//!
//! In front of every route ([`guard`]): a request whose `Host` is not an IP
//! address, `localhost` or an `--http-host` name gets 421 (DNS
//! rebinding, [`host_allowed`]); a request that changes state from
//! another site's page, or with a form's content type, gets 403
//! ([`cross_site`]); every answer carries `nosniff`, `X-Frame-Options` and a
//! Content-Security-Policy. Connections are served by hyper directly
//! ([`serve`]): a header-read timeout, and at most `--http-max-connections`
//! at once. At most [`MAX_LOG_REQUESTS`] `/console_log` answers are in
//! flight (503 past that).

pub mod prometheus;
pub mod web;

use crate::hub::{Hub, VmStatus};
use crate::metrics::Door;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, Extension, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hyper::body::Incoming;
use hyper::server::conn::http1::Builder as Http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{json, Value};
use std::net::{IpAddr, SocketAddr};
use std::path::Path as FsPath;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;

/// The HTTP port when `--http-port` is not given.
pub const DEFAULT_PORT: u16 = 13372;

/// How many transcript bytes `/console_log` returns without `?bytes=`.
pub const DEFAULT_LOG_BYTES: usize = 100 * 1024;

/// The most `/console_log` returns at once (`?bytes=` is capped here), so
/// a request cannot make the daemon read a whole large transcript into
/// memory.
pub const MAX_LOG_BYTES: usize = 16 << 20;

/// What a token allows (`ro` or `rw` in the token file). Not a console's
/// lock: a `Get` token opens consoles read-only, an `All` token with the
/// lock asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRight {
    /// GET only (`ro`).
    Get,
    /// Everything (`rw`).
    All,
}

/// The bearer tokens of `--http-token-file`.
#[derive(Clone)]
pub struct Tokens {
    /// Each token, what it allows and its name for the audit lines (its
    /// `name=` or `token#N`, N its position in the file), in file order.
    list: Vec<(String, TokenRight, String)>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secrets themselves.
        write!(f, "Tokens({} tokens)", self.list.len())
    }
}

impl Tokens {
    /// Read a token file: one token per line, `TOKEN`, `TOKEN rw` (the
    /// same) or `TOKEN ro`; `#` starts a comment; blank lines are skipped.
    /// A file others may write is refused, one others may read is warned
    /// about ([`check_token_file_mode`]).
    pub fn load(path: &FsPath) -> Result<Tokens, String> {
        check_token_file_mode(path)?;
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read HTTP token file {}: {e}", path.display()))?;
        Tokens::parse(&text, &path.display().to_string())
    }

    /// Parse a token file's text; errors name `file` and the line.
    pub fn parse(text: &str, file: &str) -> Result<Tokens, String> {
        let mut list = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let at = |why: String| format!("HTTP token file {file}, line {}: {why}", i + 1);
            let line = strip_comment(raw).trim();
            if line.is_empty() {
                continue;
            }
            // `name=NAME` anywhere after the token names it in audit lines.
            let mut name = None;
            let mut words: Vec<&str> = Vec::new();
            for (k, w) in line.split_whitespace().enumerate() {
                match w.strip_prefix("name=") {
                    Some(n) if k > 0 && !n.is_empty() => name = Some(n.to_string()),
                    Some(_) if k > 0 => return Err(at("name= needs a name".into())),
                    _ => words.push(w),
                }
            }
            let (token, right) = match words.as_slice() {
                [t] => (*t, TokenRight::All),
                [t, "rw"] => (*t, TokenRight::All),
                [t, "ro"] => (*t, TokenRight::Get),
                [_, other] => {
                    return Err(at(format!(
                        "unknown access {other:?} (write TOKEN, TOKEN ro or TOKEN rw)"
                    )))
                }
                _ => {
                    return Err(at(format!(
                        "{} words; expected TOKEN, TOKEN ro or TOKEN rw",
                        words.len()
                    )))
                }
            };
            if !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(at(
                    "the token has characters an HTTP header cannot carry (use printable ASCII)"
                        .into(),
                ));
            }
            if token.len() < MIN_TOKEN_LEN {
                return Err(at(format!(
                    "the token is {} characters long; a token needs at least {MIN_TOKEN_LEN} \
                     (a short one can be guessed; `#` starts a comment only at the start of a \
                     line or after a space)",
                    token.len()
                )));
            }
            let name = name.unwrap_or_else(|| format!("token#{}", list.len() + 1));
            list.push((token.to_string(), right, name));
        }
        if list.is_empty() {
            return Err(format!("HTTP token file {file} holds no token"));
        }
        Ok(Tokens { list })
    }

    /// What `presented` allows, if it is one of the tokens. Every token is
    /// compared in full, whatever matches, so timing tells nothing.
    pub fn check(&self, presented: &str) -> Option<TokenRight> {
        self.check_named(presented).map(|(right, _)| right)
    }

    /// What `presented` allows and the token's name (for audit lines).
    pub fn check_named(&self, presented: &str) -> Option<(TokenRight, &str)> {
        let mut found = None;
        for (token, right, name) in &self.list {
            if same_bytes(token.as_bytes(), presented.as_bytes()) && found.is_none() {
                found = Some((*right, name.as_str()));
            }
        }
        found
    }
}

/// The shortest token a token file may hold.
pub const MIN_TOKEN_LEN: usize = 16;

/// A token-file line without its comment: `#` starts one at the start of
/// the line or after whitespace, so a `#` inside a token is part of it.
fn strip_comment(line: &str) -> &str {
    let mut after_space = true;
    for (i, c) in line.char_indices() {
        if c == '#' && after_space {
            return &line[..i];
        }
        after_space = c.is_whitespace();
    }
    line
}

/// A token file that others may write could hand them a token: refuse a
/// group- or world-writable one. Warn (but start) when others may read it,
/// or when its folder is group- or world-writable (without the sticky
/// bit), so that it could be replaced.
pub fn check_token_file_mode(path: &FsPath) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let shown = path.display();
    let meta =
        std::fs::metadata(path).map_err(|e| format!("cannot read HTTP token file {shown}: {e}"))?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        let who = if mode & 0o002 != 0 { "world" } else { "group" };
        return Err(format!(
            "HTTP token file {shown} is {who}-writable (mode {mode:04o}): whoever can change it \
             can give themselves a token; make it writable by its owner only (chmod go-w {shown})"
        ));
    }
    if mode & 0o004 != 0 {
        tracing::warn!(
            "HTTP token file {shown} is world-readable (mode {mode:04o}): every local user can \
             read the tokens; chmod o-r {shown} (0600 or 0640)"
        );
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => FsPath::new("."),
    };
    if let Ok(d) = std::fs::metadata(dir) {
        let dmode = d.permissions().mode() & 0o7777;
        if dmode & 0o022 != 0 && dmode & 0o1000 == 0 {
            tracing::warn!(
                "the folder {} of HTTP token file {shown} is group- or world-writable (mode \
                 {dmode:04o}): whoever can write there can replace the file",
                dir.display()
            );
        }
    }
    Ok(())
}

/// Constant-time comparison for equal lengths.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Refuse to serve beyond loopback without tokens: the API lists every VM
/// and its consoles' traffic, and `clear` disconnects people.
pub fn check_exposure(iface: IpAddr, tokens: bool) -> Result<(), String> {
    if iface.is_loopback() || tokens {
        return Ok(());
    }
    Err(format!(
        "--http-iface {iface} is not a loopback address, and without --http-token-file FILE \
         anyone who can reach it could read every VM's console log and clear its consoles; \
         give a token file, listen on 127.0.0.1, or turn HTTP off with --no-http"
    ))
}

/// Everything the HTTP listener needs.
#[derive(Clone)]
pub struct HttpConfig {
    /// `--http-iface` and `--http-port`.
    pub addr: SocketAddr,
    /// `None`: no token needed (loopback only, see [`check_exposure`]).
    pub tokens: Option<Arc<Tokens>>,
    /// `--http-cert`/`--http-key`: serve HTTPS.
    pub tls: Option<TlsAcceptor>,
    /// Time a TLS client has to finish its handshake.
    pub handshake_timeout: Duration,
    /// The port was chosen (flag or config file): failing to bind it stops
    /// start-up. The default port is best effort, so that several vspc
    /// instances on one host (which never had an HTTP port) still start.
    pub required: bool,
    /// `--http-host`: names requests may carry in `Host` besides IP
    /// addresses and `localhost` (lowercase, no trailing dot).
    pub hosts: Vec<String>,
    /// `--http-header-timeout`: time a client has to send a request's
    /// header.
    pub header_timeout: Duration,
    /// `--http-max-connections`: connections open at once, at most.
    pub max_connections: usize,
}

/// The routes' shared state.
#[derive(Clone)]
struct App {
    /// Everything the API shows comes from here.
    hub: Arc<Hub>,
    /// `None`: no token needed.
    tokens: Option<Arc<Tokens>>,
    /// `--http-host` names (see [`host_allowed`]).
    hosts: Arc<[String]>,
    /// `/console_log` requests being answered, at most
    /// [`MAX_LOG_REQUESTS`]: each may hold [`MAX_LOG_BYTES`] until its
    /// answer is sent.
    log_slots: Arc<Semaphore>,
}

/// `/console_log` requests answered at once; more get 503.
pub const MAX_LOG_REQUESTS: usize = 4;

/// `/console_log` answers go out in pieces of this size.
const LOG_CHUNK: usize = 64 * 1024;

/// An error answer: `{"error": "..."}` with its status.
fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(json!({ "error": msg.into() }))).into_response()
}

/// The routes, with the token check in front of them, and the Host and
/// cross-site checks ([`guard`]) in front of everything.
pub fn router(hub: Arc<Hub>, tokens: Option<Arc<Tokens>>, hosts: &[String]) -> Router {
    let app = App {
        hub,
        tokens,
        hosts: hosts.into(),
        log_slots: Arc::new(Semaphore::new(MAX_LOG_REQUESTS)),
    };
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/api/v1/vms", get(list_vms))
        .route("/api/v1/cluster", get(cluster_nodes))
        .route("/api/v1/vms/{vm}", get(one_vm))
        .route("/api/v1/vms/{vm}/clear", post(clear_vm))
        .route("/api/v1/vms/{vm}/recent", get(recent))
        .route("/console_log/{uuid}", get(console_log))
        .route("/api/v1/vms/{vm}/console", get(console_ws))
        .route("/", get(index_page))
        .route("/vms/{vm}", get(console_page))
        .route("/static/{file}", get(asset))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this endpoint",
            )
        })
        .layer(middleware::from_fn_with_state(app.clone(), authorize))
        .layer(middleware::from_fn_with_state(app.clone(), guard))
        .with_state(app)
}

/// Whether `value` (a `Host` header, or the authority of an absolute
/// request target) names this server: an IP address (`192.0.2.1`,
/// `[2001:db8::1]`), `localhost`, or one of the `--http-host` names, each
/// with or without a port. Any other name may be a DNS-rebinding attack: a
/// name of the attacker's, made to resolve to this host, so that a page of
/// the attacker's counts as this server's own (same origin).
pub fn host_allowed(value: &str, names: &[String]) -> bool {
    let port_ok = |p: &str| !p.is_empty() && p.len() <= 5 && p.parse::<u16>().is_ok();
    let value = value.trim();
    if let Some(rest) = value.strip_prefix('[') {
        let Some((ip, after)) = rest.split_once(']') else {
            return false;
        };
        let after_ok = after.is_empty() || after.strip_prefix(':').is_some_and(port_ok);
        return after_ok && ip.parse::<std::net::Ipv6Addr>().is_ok();
    }
    let name = match value.split_once(':') {
        Some((name, port)) if port_ok(port) => name,
        Some(_) => return false,
        None => value,
    };
    if name.parse::<std::net::Ipv4Addr>().is_ok() {
        return true;
    }
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    !name.is_empty() && (name == "localhost" || names.contains(&name))
}

/// The host a request is for, if this server answers it; else why not,
/// naming the host and the flag that would allow it (for the 421).
fn checked_host(req: &Request, names: &[String]) -> Result<String, String> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let header = hosts.next();
    if hosts.next().is_some() {
        return Err("the request has more than one Host header".into());
    }
    let header = match header.map(|h| h.to_str()) {
        None => None,
        Some(Ok(h)) => Some(h.trim().to_string()),
        Some(Err(_)) => return Err("the request's Host header is not readable text".into()),
    };
    let target = req.uri().authority().map(|a| a.as_str().to_string());
    let Some(host) = target.clone().or(header.clone()) else {
        return Err(
            "the request has no Host header (HTTP/1.0 without Host is not answered): \
             send Host: ADDRESS:PORT"
                .into(),
        );
    };
    for h in [target, header].into_iter().flatten() {
        if !host_allowed(&h, names) {
            let name = match h.rsplit_once(':') {
                Some((n, p))
                    if !p.is_empty()
                        && p.bytes().all(|b| b.is_ascii_digit())
                        && (n.ends_with(']') || !n.contains(':')) =>
                {
                    n
                }
                _ => h.as_str(),
            };
            return Err(format!(
                "this server does not answer for the host {h:?}: it answers requests for its IP \
                 addresses, localhost and the names given with --http-host (a guard against DNS \
                 rebinding); if {name:?} is a name of this server, start vspc with \
                 --http-host {name} (http-host in the config file)"
            ));
        }
    }
    Ok(host)
}

/// Why a request that changes state (any method but GET, HEAD and
/// OPTIONS) is refused as cross-site, if it is: an `Origin` that is not
/// this server, or a body type an HTML form can send (which needs no CORS
/// preflight) without `X-Vspc: 1` or `Authorization: Bearer`, which no
/// form or simple request can carry.
fn cross_site(req: &Request) -> Option<String> {
    if matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
        return None;
    }
    let headers = req.headers();
    if let Some(origin) = headers.get(header::ORIGIN) {
        if !crate::doors::http::web::same_origin(headers) {
            return Some(format!(
                "a page of another site (Origin {:?}) may not make this request; only this \
                 server's own pages, or clients that send no Origin (curl), may",
                String::from_utf8_lossy(origin.as_bytes())
            ));
        }
    }
    let kind = headers
        .get(header::CONTENT_TYPE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).to_ascii_lowercase())
        .unwrap_or_default();
    let kind = kind.split(';').next().unwrap_or("").trim().to_string();
    let form = matches!(
        kind.as_str(),
        "application/x-www-form-urlencoded" | "multipart/form-data" | "text/plain"
    );
    let custom = headers
        .get("x-vspc")
        .is_some_and(|v| v.as_bytes().trim_ascii() == b"1");
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .is_some_and(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"));
    if form && !custom && !bearer {
        return Some(format!(
            "a request that changes state may not have the content type {kind:?}, which any web \
             page's form can send; send no Content-Type (as curl -X POST does), or add the \
             header X-Vspc: 1"
        ));
    }
    None
}

/// The Content-Security-Policy of every answer: nothing from elsewhere,
/// no framing, no inline script; inline styles for xterm.js (it sizes the
/// terminal with `<style>` elements); the console's WebSocket on `host`.
fn content_security_policy(host: Option<&str>) -> String {
    let connect = host.map_or(String::new(), |h| format!(" ws://{h} wss://{h}"));
    format!(
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
         connect-src 'self'{connect}; frame-ancestors 'none'; base-uri 'none'; \
         form-action 'none'"
    )
}

/// The headers every answer carries: no content sniffing, no framing
/// (clickjacking), and the [`content_security_policy`].
fn secure_headers(mut r: Response, host: Option<&str>) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    let csp = HeaderValue::from_str(&content_security_policy(host))
        .or_else(|_| HeaderValue::from_str(&content_security_policy(None)));
    if let Ok(csp) = csp {
        h.insert(header::CONTENT_SECURITY_POLICY, csp);
    }
    r
}

/// In front of every route, before the token check: answer only requests
/// for this server's own names ([`checked_host`], 421), refuse cross-site
/// requests that change state ([`cross_site`], 403), and add
/// [`secure_headers`] to every answer.
async fn guard(State(app): State<App>, req: Request, next: Next) -> Response {
    let host = match checked_host(&req, &app.hosts) {
        Ok(h) => h.to_ascii_lowercase(),
        Err(why) => {
            tracing::debug!("HTTP request refused (421): {why}");
            return secure_headers(error(StatusCode::MISDIRECTED_REQUEST, why), None);
        }
    };
    if let Some(why) = cross_site(&req) {
        tracing::info!(path = %req.uri().path(), "cross-site HTTP request refused: {why}");
        return secure_headers(error(StatusCode::FORBIDDEN, why), Some(&host));
    }
    secure_headers(next.run(req).await, Some(&host))
}

/// `?token=` in an address.
#[derive(Debug, serde::Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

/// The token a request presents: `Authorization: Bearer TOKEN`, else
/// `?token=TOKEN`.
fn presented_token(req: &Request) -> Option<String> {
    let from_header = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| token.trim().to_string())
        });
    from_header.or_else(|| {
        Query::<TokenQuery>::try_from_uri(req.uri())
            .ok()
            .and_then(|q| q.0.token)
    })
}

/// The client's address as the listener reports it, handed to the routes
/// as connection info.
#[derive(Debug, Clone, Copy)]
struct PeerAddr(SocketAddr);

/// Who made a request, for the audit lines of browser consoles.
#[derive(Debug, Clone, Default)]
pub struct Caller {
    /// The client's address (absent only when the router is served
    /// without connection info, as in unit tests).
    pub peer: Option<SocketAddr>,
    /// The name of the token it presented (`token#N` or its `name=`).
    pub token: Option<String>,
}

/// A browser page rather than the API (its 401 is a page too).
fn is_page(path: &str) -> bool {
    path == "/" || path.starts_with("/vms/")
}

/// The token check: `/healthz` and `/static/` are open; every other route
/// needs a token when a token file is configured, and a read-write one
/// unless it reads. The token's [`TokenRight`] goes to the routes as a request
/// extension (read-write when no token file is configured).
async fn authorize(State(app): State<App>, mut req: Request, next: Next) -> Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<PeerAddr>>()
        .map(|ConnectInfo(PeerAddr(a))| *a);
    let Some(tokens) = &app.tokens else {
        req.extensions_mut().insert(Caller { peer, token: None });
        req.extensions_mut().insert(TokenRight::All);
        return next.run(req).await;
    };
    let path = req.uri().path();
    if path == "/healthz" || path.starts_with("/static/") {
        return next.run(req).await;
    }
    let page = is_page(path);
    let unauthorized = |msg: &str| {
        let mut r = if page {
            crate::doors::http::web::unauthorized_page(msg)
        } else {
            error(StatusCode::UNAUTHORIZED, msg)
        };
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        r
    };
    let Some(presented) = presented_token(&req) else {
        return unauthorized(
            "this endpoint needs a token: Authorization: Bearer TOKEN, or ?token=TOKEN",
        );
    };
    match tokens.check_named(&presented) {
        None => unauthorized("the token is not valid"),
        Some((TokenRight::Get, _)) if !matches!(*req.method(), Method::GET | Method::HEAD) => {
            error(
                StatusCode::FORBIDDEN,
                "this token is read-only; this request needs a read-write token",
            )
        }
        Some((right, name)) => {
            let token = Some(name.to_string());
            req.extensions_mut().insert(Caller { peer, token });
            req.extensions_mut().insert(right);
            next.run(req).await
        }
    }
}

async fn healthz(State(app): State<App>) -> Response {
    Json(json!({ "status": "ok", "vms": app.hub.len() })).into_response()
}

async fn metrics(State(app): State<App>) -> Response {
    let mut text = prometheus::render(&app.hub);
    if let Some(c) = app.hub.cluster() {
        let extra = c.metrics_text();
        match text.rfind("# EOF") {
            Some(at) => text.insert_str(at, &extra),
            None => text.push_str(&extra),
        }
    }
    ([(header::CONTENT_TYPE, prometheus::CONTENT_TYPE)], text).into_response()
}

/// One VM as JSON: the admin listing's fields and the connection's facts.
fn vm_json(s: &VmStatus) -> Value {
    json!({
        "name": s.record.name,
        "uuid": s.record.uuid,
        "port": s.record.port,
        "vm_connected": s.vm_connected,
        "connected_since": s.connected_since.map(rfc3339),
        "peer": s.peer.map(|a| a.to_string()),
        "consoles": s.consoles,
        "bytes_from_vm": s.bytes_from_vm,
        "bytes_to_vm": s.bytes_to_vm,
    })
}

async fn list_vms(State(app): State<App>) -> Response {
    let Some(cluster) = app.hub.cluster() else {
        let vms: Vec<Value> = app.hub.vms().iter().map(|v| vm_json(&v.status())).collect();
        return Json(json!({ "vms": vms })).into_response();
    };
    // Cluster mode: every VM of the cluster, each with its node.
    let local = app.hub.vms();
    let here: std::collections::HashSet<&str> = local.iter().map(|v| v.uuid.as_str()).collect();
    let mut rows: Vec<(String, String, Value)> = local
        .iter()
        .map(|v| {
            let s = v.status();
            let mut j = vm_json(&s);
            j["node"] = json!(cluster.node());
            (s.record.name, s.record.uuid, j)
        })
        .collect();
    for r in cluster.remote_vms() {
        if here.contains(r.record.uuid.as_str()) {
            continue;
        }
        let j = json!({
            "name": r.record.name,
            "uuid": r.record.uuid,
            "port": r.record.port,
            "vm_connected": r.connected,
            "node": r.node,
        });
        rows.push((r.record.name, r.record.uuid, j));
    }
    rows.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));
    let vms: Vec<Value> = rows.into_iter().map(|r| r.2).collect();
    Json(json!({ "vms": vms })).into_response()
}

/// `GET /api/v1/cluster`: the cluster's nodes (404 on a single node).
async fn cluster_nodes(State(app): State<App>) -> Response {
    match app.hub.cluster() {
        Some(c) => Json(c.describe()).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            "this vspc is a single node (start it with --cluster to join a cluster)",
        ),
    }
}

fn unknown_vm(what: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!("no VM named or with uuid {what:?}"),
    )
}

/// 404 for an unknown VM; 409 for a name more than one VM has, with their
/// uuids (ask by uuid).
pub fn lookup_failed(what: &str, why: crate::hub::Lookup) -> Response {
    let error = why.explain(what);
    match why {
        crate::hub::Lookup::NotFound => unknown_vm(what),
        crate::hub::Lookup::Ambiguous(uuids) => (
            StatusCode::CONFLICT,
            Json(json!({ "error": error, "uuids": uuids })),
        )
            .into_response(),
    }
}

async fn one_vm(State(app): State<App>, Path(vm): Path<String>) -> Response {
    match app.hub.lookup(&vm) {
        Ok(v) => {
            let mut j = vm_json(&v.status());
            if let Some(c) = app.hub.cluster() {
                j["node"] = json!(c.node());
            }
            Json(j).into_response()
        }
        Err(crate::hub::Lookup::NotFound) => {
            // Cluster mode: a VM another node holds, by uuid or name.
            let key = crate::vmware::VmUuid::key_of(&vm);
            let other = app.hub.cluster().and_then(|c| {
                c.remote_vms().into_iter().find(|r| {
                    r.record.uuid == vm
                        || (key.is_some() && crate::vmware::VmUuid::key_of(&r.record.uuid) == key)
                        || r.record.name == vm
                })
            });
            match other {
                Some(r) => Json(json!({
                    "name": r.record.name,
                    "uuid": r.record.uuid,
                    "port": r.record.port,
                    "vm_connected": r.connected,
                    "node": r.node,
                }))
                .into_response(),
                None => lookup_failed(&vm, crate::hub::Lookup::NotFound),
            }
        }
        Err(why) => lookup_failed(&vm, why),
    }
}

async fn clear_vm(State(app): State<App>, Path(vm): Path<String>) -> Response {
    let v = match app.hub.lookup(&vm) {
        Ok(v) => v,
        Err(why) => return lookup_failed(&vm, why),
    };
    let n = app.hub.clear_consoles(
        &v,
        b"\r\nvspc: this console was cleared through the HTTP API; disconnecting.\r\n",
        Instant::now(),
    );
    Json(json!({ "cleared": n })).into_response()
}

/// The VM's replay ring: its last `--replay-bytes` of output, as it sent
/// them, whatever the backends.
async fn recent(State(app): State<App>, Path(vm): Path<String>) -> Response {
    let v = match app.hub.lookup(&vm) {
        Ok(v) => v,
        Err(why) => return lookup_failed(&vm, why),
    };
    (
        [(header::CONTENT_TYPE, "application/octet-stream")],
        app.hub.recent(&v),
    )
        .into_response()
}

/// `?bytes=N` of `/console_log`.
#[derive(Debug, serde::Deserialize)]
struct LogQuery {
    /// Kept as text, so a bad value gets a JSON error rather than axum's.
    bytes: Option<String>,
}

async fn console_log(
    State(app): State<App>,
    Path(uuid): Path<String>,
    Query(q): Query<LogQuery>,
) -> Response {
    // Each answer may hold MAX_LOG_BYTES, read on a backend's thread: only
    // a few at once, each slot held until its answer is sent.
    let Ok(slot) = app.log_slots.clone().try_acquire_owned() else {
        let mut r = error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "{MAX_LOG_REQUESTS} /console_log requests are being answered already; \
                 try again in a moment"
            ),
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return r;
    };
    let max = match q.bytes.as_deref().map(str::parse::<usize>) {
        None => DEFAULT_LOG_BYTES,
        Some(Ok(n)) if n > 0 => n.min(MAX_LOG_BYTES),
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bytes must be a positive whole number",
            )
        }
    };
    let Some(vm) = app.hub.find(&uuid) else {
        // Cluster mode: the node holding the VM answers, over the link.
        if let Some(c) = app.hub.cluster() {
            return match c.remote_log(&uuid, max).await {
                Ok(Some(log)) => (
                    [(header::CONTENT_TYPE, "application/octet-stream")],
                    axum::body::Body::new(LogBody {
                        rest: bytes::Bytes::from(log),
                        _slot: slot,
                    }),
                )
                    .into_response(),
                Ok(None) => unknown_vm(&uuid),
                Err(e) => error(
                    StatusCode::BAD_GATEWAY,
                    format!("the node holding VM {uuid:?} did not answer: {e}"),
                ),
            };
        }
        return unknown_vm(&uuid);
    };
    match app.hub.console_log(&vm, max).await {
        Some(log) => (
            [(header::CONTENT_TYPE, "application/octet-stream")],
            axum::body::Body::new(LogBody {
                rest: bytes::Bytes::from(log),
                _slot: slot,
            }),
        )
            .into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            format!(
                "no transcript of VM {:?} (the backends keep none and --replay-bytes is 0: use --backend Logging)",
                vm.name()
            ),
        ),
    }
}

/// A `/console_log` answer: sent in [`LOG_CHUNK`] pieces, holding its
/// slot (of [`MAX_LOG_REQUESTS`]) until the last piece is taken or the
/// client goes.
struct LogBody {
    rest: bytes::Bytes,
    _slot: OwnedSemaphorePermit,
}

impl http_body::Body for LogBody {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        if self.rest.is_empty() {
            return std::task::Poll::Ready(None);
        }
        let n = self.rest.len().min(LOG_CHUNK);
        let piece = self.rest.split_to(n);
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(piece))))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.rest.len() as u64)
    }
}

/// `?mode=` of the console WebSocket.
#[derive(Debug, serde::Deserialize)]
struct ConsoleQuery {
    mode: Option<String>,
}

async fn console_ws(
    State(app): State<App>,
    Path(vm): Path<String>,
    Query(q): Query<ConsoleQuery>,
    right: Option<Extension<TokenRight>>,
    caller: Option<Extension<Caller>>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    // No extension only on an open route, which this is not: least right.
    let right = right.map_or(TokenRight::Get, |Extension(r)| r);
    let caller = caller.map(|Extension(c)| c).unwrap_or_default();
    crate::doors::http::web::console(
        app.hub,
        &vm,
        q.mode.as_deref(),
        (right, caller),
        &headers,
        upgrade,
    )
}

async fn index_page(State(app): State<App>, Query(q): Query<TokenQuery>) -> Response {
    crate::doors::http::web::index(&app.hub, q.token.as_deref())
}

async fn console_page(State(app): State<App>, Path(vm): Path<String>) -> Response {
    crate::doors::http::web::console_page(&app.hub, &vm)
}

async fn asset(Path(file): Path<String>) -> Response {
    crate::doors::http::web::asset(&file)
}

/// RFC 3339 in UTC, to the second (`2026-11-30T12:00:00Z`).
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days, for days since 1970-01-01.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// A connection's stream, holding its place among the
/// `--http-max-connections` for as long as it lives: through the TLS
/// handshake, the requests, and a WebSocket it is upgraded to.
struct Held<S> {
    io: S,
    _slot: OwnedSemaphorePermit,
}

impl<S: AsyncRead + Unpin> AsyncRead for Held<S> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Held<S> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Serve HTTP/1 on one connection (upgrades to WebSocket included), with
/// the client's address handed to the routes.
async fn serve_connection<S>(http1: Http1, app: Router, io: S, peer: SocketAddr)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let routes = tower::ServiceExt::map_request(app, move |mut req: Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(PeerAddr(peer)));
        req
    });
    let service = hyper_util::service::TowerToHyperService::new(routes);
    let conn = http1
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    if let Err(e) = conn.await {
        // A header not sent in time, a client gone, a malformed request.
        tracing::debug!(%peer, "HTTP connection ended: {e}");
    }
}

/// Serve the API on `listener` (bound by the caller) until the process
/// stops. Each connection is served by hyper in a task of its own (a TLS
/// handshake first, within `handshake_timeout`); a client gets
/// `header_timeout` to send each request's header, and at most
/// `max_connections` are open at once (a connection past that is closed
/// at once, and counted).
pub async fn serve(listener: TcpListener, hub: Arc<Hub>, cfg: HttpConfig) {
    let app = router(hub.clone(), cfg.tokens.clone(), &cfg.hosts);
    let slots = Arc::new(Semaphore::new(cfg.max_connections));
    let mut http1 = Http1::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.header_timeout);
    let mut last_full = None::<Instant>;
    let h = hub.clone();
    crate::net::listen::accept_loop(listener, Door::Http, hub, move |tcp, peer| {
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            h.metrics().http_refused();
            if last_full.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                last_full = Some(Instant::now());
                tracing::warn!(
                    %peer,
                    "HTTP connection closed at once: {} are open (--http-max-connections)",
                    cfg.max_connections
                );
            }
            drop(tcp);
            return;
        };
        let (app, http1, hub) = (app.clone(), http1.clone(), h.clone());
        let (tls, limit) = (cfg.tls.clone(), cfg.handshake_timeout);
        tokio::spawn(async move {
            let Some(acceptor) = tls else {
                let io = Held {
                    io: tcp,
                    _slot: slot,
                };
                return serve_connection(http1, app, io, peer).await;
            };
            let metrics = hub.metrics();
            if let Some(tls) =
                crate::net::tls::handshake(&acceptor, tcp, limit, peer, Door::Http, metrics).await
            {
                let io = Held {
                    io: tls,
                    _slot: slot,
                };
                serve_connection(http1, app, io, peer).await;
            }
        });
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tokens of the length a token file needs, for the tests.
    const A: &str = "alpha-0123456789";
    const B: &str = "beta-0123456789a";
    const G: &str = "gamma-0123456789";

    #[test]
    fn token_files_parse_with_rights_and_comments() {
        let text = format!("# operators\n{A}\n{B} rw   # the CI\n\n  {G} ro\r\n");
        let t = Tokens::parse(&text, "t.txt").expect("valid");
        assert_eq!(t.check(A), Some(TokenRight::All));
        assert_eq!(t.check(B), Some(TokenRight::All));
        assert_eq!(t.check(G), Some(TokenRight::Get));
        assert_eq!(t.check(&G[..G.len() - 1]), None);
        assert_eq!(t.check(""), None);
        assert!(!format!("{t:?}").contains(A), "tokens must not be printed");
    }

    #[test]
    fn tokens_are_named_for_the_audit_lines() {
        let text = format!("{A} name=ops\n{B} ro\n{G} name=ci rw\n");
        let t = Tokens::parse(&text, "t").expect("valid");
        assert_eq!(t.check_named(A), Some((TokenRight::All, "ops")));
        assert_eq!(t.check_named(B), Some((TokenRight::Get, "token#2")));
        assert_eq!(t.check_named(G), Some((TokenRight::All, "ci")));
        let e = Tokens::parse(&format!("{A} name=\n"), "t").unwrap_err();
        assert!(e.contains("line 1") && e.contains("name="), "{e}");
    }

    #[test]
    fn malformed_token_lines_name_the_file_and_line() {
        let e = Tokens::parse(&format!("{A}\n\n{B} rx\n"), "/etc/vspc/tokens").unwrap_err();
        assert!(
            e.contains("/etc/vspc/tokens, line 3") && e.contains("\"rx\""),
            "{e}"
        );
        let e = Tokens::parse("a ro extra\n", "f").unwrap_err();
        assert!(e.contains("f, line 1") && e.contains("3 words"), "{e}");
        let e = Tokens::parse("# only a comment\n\n", "f").unwrap_err();
        assert!(e.contains("holds no token"), "{e}");
        let e = Tokens::parse("caf\u{e9}-0123456789abcdef\n", "f").unwrap_err();
        assert!(e.contains("line 1"), "{e}");
    }

    /// The review's finding: `a#verylongsecret rw name=ops` was the token
    /// `a`. A `#` inside a word is part of it; one at the start of the
    /// line or after whitespace starts a comment.
    #[test]
    fn a_hash_inside_a_token_is_part_of_it() {
        let t = Tokens::parse("a#verylongsecret rw name=ops\n", "f").expect("valid");
        assert_eq!(
            t.check_named("a#verylongsecret"),
            Some((TokenRight::All, "ops"))
        );
        assert_eq!(t.check("a"), None);
        let t = Tokens::parse(&format!("{A}#x ro #comment\n\t# note\n#{B}\n"), "f").expect("valid");
        assert_eq!(t.check(&format!("{A}#x")), Some(TokenRight::Get));
        assert_eq!(t.check(B), None, "a line starting with # is a comment");
        assert_eq!(strip_comment("tok#en  # c"), "tok#en  ");
        assert_eq!(strip_comment("# all"), "");
        assert_eq!(strip_comment("x\t#y"), "x\t");
    }

    #[test]
    fn short_tokens_are_refused_naming_the_file_and_line() {
        let e = Tokens::parse(&format!("{A}\n# fine\nshort-token ro\n"), "/etc/t").unwrap_err();
        assert!(
            e.contains("/etc/t, line 3") && e.contains("11 characters") && e.contains("16"),
            "{e}"
        );
        // The cut token of the finding: what was left of it is refused too.
        let e = Tokens::parse("a #verylongsecret rw\n", "f").unwrap_err();
        assert!(e.contains("f, line 1") && e.contains("1 characters"), "{e}");
        assert!(Tokens::parse("exactly-16-chars\n", "f").is_ok());
    }

    #[test]
    fn token_file_modes() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tokens");
        std::fs::write(&path, format!("{A}\n")).expect("write");
        let chmod = |m: u32| {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(m)).expect("chmod")
        };
        chmod(0o600);
        assert!(Tokens::load(&path).is_ok());
        chmod(0o644);
        assert!(
            Tokens::load(&path).is_ok(),
            "world-readable: a warning only"
        );
        for (mode, who) in [(0o620, "group-writable"), (0o646, "world-writable")] {
            chmod(mode);
            let e = Tokens::load(&path).unwrap_err();
            assert!(
                e.contains(&path.display().to_string()) && e.contains(who),
                "{mode:o}: {e}"
            );
        }
    }

    #[test]
    fn hosts_this_server_answers_for() {
        let names = vec!["vspc.example.com".to_string()];
        for ok in [
            "127.0.0.1",
            "127.0.0.1:13372",
            "10.1.2.3:80",
            "[::1]",
            "[::1]:13372",
            "[2001:db8::1]:8080",
            "localhost",
            "LocalHost:13372",
            "localhost.:1",
            "vspc.example.com",
            "VSPC.example.com.:443",
        ] {
            assert!(host_allowed(ok, &names), "{ok} should be answered");
        }
        for bad in [
            "",
            ":80",
            "rebind.attacker.example",
            "rebind.attacker.example:13372",
            "localhost.attacker.example",
            "127.0.0.1.nip.io",
            "2130706433",
            "::1",
            "[::1",
            "[::1]x",
            "[::1]:",
            "[evil]:80",
            "127.0.0.1:99999",
            "127.0.0.1:80:80",
            "localhost:http",
            "example.com",
        ] {
            assert!(!host_allowed(bad, &names), "{bad:?} should be refused");
        }
    }

    #[test]
    fn the_security_policy_names_the_websocket() {
        let p = content_security_policy(Some("127.0.0.1:13372"));
        assert!(p.contains("frame-ancestors 'none'"), "{p}");
        assert!(
            p.contains("connect-src 'self' ws://127.0.0.1:13372 wss://127.0.0.1:13372"),
            "{p}"
        );
        assert!(!p.contains("script-src 'self' 'unsafe-inline'"), "{p}");
    }

    #[test]
    fn only_loopback_goes_without_tokens() {
        assert!(check_exposure("127.0.0.1".parse().expect("ip"), false).is_ok());
        assert!(check_exposure("::1".parse().expect("ip"), false).is_ok());
        assert!(check_exposure("0.0.0.0".parse().expect("ip"), true).is_ok());
        let e = check_exposure("0.0.0.0".parse().expect("ip"), false).unwrap_err();
        assert!(e.contains("--http-token-file"), "{e}");
    }

    /// One request over a fresh connection; (status, body).
    async fn ask(addr: SocketAddr, head: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let req =
            format!("{head}\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
        s.write_all(req.as_bytes()).await.expect("write");
        let mut raw = String::new();
        s.read_to_string(&mut raw).await.expect("read");
        let status = raw
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .expect("status");
        let body = raw.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        (status, body.to_string())
    }

    #[tokio::test]
    async fn routes_and_tokens_in_process() {
        let hub = Hub::new(
            crate::hub::HubConfig {
                port_range_start: 1,
                vm_ports: false,
                interface: "127.0.0.1".parse().expect("ip"),
                expire: Duration::from_secs(60),
                vmotion_timeout: Duration::from_secs(60),
                client_limit: None,
                console_queue: 1 << 20,
                console_protocol: crate::hub::ConsoleProtocol::Auto,
                console_stall: None,
                replay_bytes: 0,
                console_replay: false,
            },
            crate::backend_host::Backends::spawn(Vec::new(), 1 << 20).expect("backends"),
        );
        let id = crate::hub::Identity {
            key: "0".repeat(32),
            uuid: "0000000000000000-0000000000000000".into(),
            name: "web-1".into(),
        };
        let peer = hub.new_peer(1 << 20, crate::outbox::Encoding::Raw);
        hub.attach_vm(&id, peer).expect("attach");
        let tokens = Tokens::parse("rw-token-0123456\nro-token-0123456 ro\n", "t").expect("tokens");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let cfg = HttpConfig {
            addr,
            tokens: Some(Arc::new(tokens)),
            tls: None,
            handshake_timeout: Duration::from_secs(1),
            required: true,
            hosts: Vec::new(),
            header_timeout: Duration::from_secs(10),
            max_connections: 16,
        };
        tokio::spawn(serve(listener, hub.clone(), cfg));

        assert_eq!(ask(addr, "GET /healthz HTTP/1.1").await.0, 200);
        let (code, body) = ask(addr, "GET /api/v1/vms HTTP/1.1").await;
        assert_eq!(code, 401, "{body}");
        assert!(body.contains("\"error\""), "{body}");
        let (code, body) = ask(
            addr,
            "GET /api/v1/vms HTTP/1.1\r\nAuthorization: Bearer ro-token-0123456",
        )
        .await;
        assert_eq!(code, 200, "{body}");
        assert!(body.contains("\"name\":\"web-1\""), "{body}");
        let (code, _) = ask(
            addr,
            "GET /api/v1/vms HTTP/1.1\r\nAuthorization: Bearer nope",
        )
        .await;
        assert_eq!(code, 401);
        let (code, body) = ask(
            addr,
            "POST /api/v1/vms/web-1/clear HTTP/1.1\r\nAuthorization: Bearer ro-token-0123456",
        )
        .await;
        assert_eq!(code, 403, "{body}");
        let (code, body) = ask(
            addr,
            "POST /api/v1/vms/web-1/clear HTTP/1.1\r\nAuthorization: bearer rw-token-0123456",
        )
        .await;
        assert_eq!((code, body.as_str()), (200, "{\"cleared\":0}"));
        let (code, body) = ask(
            addr,
            "GET /api/v1/vms/nope HTTP/1.1\r\nAuthorization: Bearer rw-token-0123456",
        )
        .await;
        assert_eq!(code, 404, "{body}");
        let (code, body) = ask(
            addr,
            "GET /console_log/00000000-0000-0000-0000-000000000000 HTTP/1.1\r\nAuthorization: Bearer rw-token-0123456",
        )
        .await;
        assert_eq!(code, 404, "no backend keeps transcripts: {body}");
        let (code, body) = ask(
            addr,
            "GET /metrics HTTP/1.1\r\nAuthorization: Bearer ro-token-0123456",
        )
        .await;
        assert_eq!(code, 200);
        assert!(body.contains("vspc_vms 1\n"), "{body}");
        assert!(
            body.contains("vspc_connections_accepted_total{listener=\"http\"}"),
            "{body}"
        );
    }

    #[test]
    fn flags_and_config_file_take_the_http_settings() {
        use crate::config::Config;
        let argv = |a: &[&str]| {
            a.iter()
                .map(|s| std::ffi::OsString::from(*s))
                .collect::<Vec<_>>()
        };
        let c = Config::from_argv(argv(&["vspc"])).expect("defaults");
        assert_eq!(c.http_port, None, "the default port is best effort");
        assert_eq!(c.http_iface.to_string(), "127.0.0.1");
        assert!(!c.no_http && c.http_token_file.is_none() && c.http_cert.is_none());
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("vspc.toml");
        std::fs::write(
            &path,
            "http-port = 8080\nhttp-iface = \"::1\"\nhttp-token-file = \"/etc/vspc/tokens\"\n",
        )
        .expect("write");
        let file = path.display().to_string();
        let c = Config::from_argv(argv(&["vspc", "--config", &file])).expect("config file");
        assert_eq!(c.http_port, Some(8080));
        assert_eq!(c.http_iface.to_string(), "::1");
        assert_eq!(
            c.http_token_file.as_deref(),
            Some(FsPath::new("/etc/vspc/tokens"))
        );
        let c = Config::from_argv(argv(&["vspc", "--no-http"])).expect("--no-http");
        assert!(c.no_http);

        let c = Config::from_argv(argv(&["vspc"])).expect("defaults");
        assert!(c.http_host.is_empty());
        assert_eq!(c.http_header_timeout, Duration::from_secs(10));
        assert_eq!(c.http_max_connections, 1024);
        std::fs::write(
            &path,
            "http_host = [\"Vspc.Example.com.\", \"b.example\"]\n\
             http-header-timeout = 2\nhttp-max-connections = 8\n",
        )
        .expect("write");
        let c = Config::from_argv(argv(&[
            "vspc",
            "--config",
            &file,
            "--http-host",
            "c.example",
        ]))
        .expect("config file");
        assert_eq!(c.http_host, ["vspc.example.com", "b.example", "c.example"]);
        assert_eq!(c.http_header_timeout, Duration::from_secs(2));
        assert_eq!(c.http_max_connections, 8);
        for bad in ["a b", "x.example:80", "x-.example", "a..b"] {
            let e = Config::from_argv(argv(&["vspc", "--http-host", bad]))
                .expect_err(bad)
                .to_string();
            assert!(
                e.contains("--http-host") && e.contains("host name"),
                "{bad}: {e}"
            );
        }
        assert!(Config::from_argv(argv(&["vspc", "--http-max-connections", "0"])).is_err());
        assert!(Config::from_argv(argv(&["vspc", "--http-header-timeout", "0"])).is_err());
        assert!(Config::from_argv(argv(&["vspc", "--http-key", "k.pem"])).is_err());
    }

    #[test]
    fn rfc3339_dates() {
        let at = |s: u64| rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(1_796_040_000), "2026-11-30T12:00:00Z");
    }
}
