//! The browser console, end to end: the real daemon with `--http-port`, a
//! simulated VM, and
//!
//! - a WebSocket client in Rust (tokio-tungstenite, the client of the crate
//!   axum's `ws` feature is built on) on `GET /api/v1/vms/{vm}/console`:
//!   all 256 byte values each way, text frames as UTF-8, the JSON status
//!   frames across a VM reconnect, a read-only token's typing never
//!   reaching the VM, `mode=exclusive` refused beside another console, 404
//!   for an unknown VM, 401 without a token, `?token=` as well as the
//!   header, 403 for a page of another site, a clear through the API, and
//!   bulk both ways through the flow control;
//! - the pages (`/`, `/vms/{vm}`, `/static/...`) over plain HTTP;
//! - a real browser: headless Chromium (Debian's `chromium`, driven by
//!   `playwright-core` from `tests/web/`, installed by `.ci/run`) opens
//!   `/vms/{vm}`, shows the VM's output in the terminal, and its typed keys
//!   reach the VM byte-exact. A missing browser fails the test, naming the
//!   package.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::*;
use crate::http::{daemon, logging_daemon, request};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value as Json;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use vspc_testkit::sim::{Identity, SimVm};

pub(crate) type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The token file of the tests that need one.
const TOKENS: &str = "rw-secret-0123456\nro-secret-0123456 ro\n";

/// A daemon with an HTTP port and the token file [`TOKENS`]; the file's
/// directory lives as long as the daemon is needed.
fn daemon_with_tokens() -> (Daemon, SocketAddr, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tokens");
    crate::http::write_token_file(&path, TOKENS);
    let file = path.display().to_string();
    let (d, http) = daemon(&["--http-token-file", &file]);
    (d, http, dir)
}

/// Open the console WebSocket at `path` (with its query), with `token` as
/// a bearer header if given; the handshake's error if it is refused.
pub(crate) async fn ws_connect(
    http: SocketAddr,
    path: &str,
    token: Option<&str>,
) -> Result<Ws, WsError> {
    let mut req = format!("ws://{http}{path}")
        .into_client_request()
        .expect("a valid request");
    if let Some(t) = token {
        req.headers_mut().insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {t}")).expect("header"),
        );
    }
    match tokio::time::timeout(T, tokio_tungstenite::connect_async(req)).await {
        Ok(r) => r.map(|(ws, _)| ws),
        Err(_) => panic!("the WebSocket handshake on {path} took more than {T:?}"),
    }
}

/// The HTTP status a refused handshake got.
fn refused_with(r: Result<Ws, WsError>) -> u16 {
    match r {
        Err(WsError::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("the handshake failed, but not with an HTTP answer: {e}"),
        Ok(_) => panic!("the handshake was accepted"),
    }
}

/// The next frame, within [`T`]; `None` once the socket ended.
async fn next(ws: &mut Ws) -> Option<Message> {
    match tokio::time::timeout(T, ws.next()).await {
        Ok(Some(Ok(m))) => Some(m),
        Ok(Some(Err(_))) | Ok(None) => None,
        Err(_) => panic!("no WebSocket frame within {T:?}"),
    }
}

/// The next text frame as JSON (binary frames before it are skipped).
pub(crate) async fn next_json(ws: &mut Ws) -> Json {
    loop {
        match next(ws).await {
            Some(Message::Text(t)) => {
                return serde_json::from_str(t.as_str())
                    .unwrap_or_else(|e| panic!("a text frame that is not JSON ({e}): {t}"))
            }
            Some(Message::Binary(_) | Message::Ping(_) | Message::Pong(_)) => {}
            other => panic!("the WebSocket ended while a JSON frame was awaited: {other:?}"),
        }
    }
}

/// Binary frames until `n` bytes came (text frames are skipped).
pub(crate) async fn read_bytes(ws: &mut Ws, n: usize) -> Vec<u8> {
    let mut got = Vec::new();
    while got.len() < n {
        match next(ws).await {
            Some(Message::Binary(b)) => got.extend_from_slice(&b),
            Some(Message::Text(_) | Message::Ping(_) | Message::Pong(_)) => {}
            other => panic!(
                "the WebSocket ended after {} of {n} bytes: {other:?}",
                got.len()
            ),
        }
    }
    got
}

async fn send(ws: &mut Ws, m: Message) {
    tokio::time::timeout(T, ws.send(m))
        .await
        .expect("the send took too long")
        .expect("send on the WebSocket");
}

/// The console path of `id`'s VM, by name.
pub(crate) fn console_path(id: &Identity, query: &str) -> String {
    format!("/api/v1/vms/{}/console{query}", id.name)
}

#[tokio::test]
async fn websocket_console_is_byte_exact_both_ways_and_survives_a_reconnect() {
    // Logging keeps the recent output a new console is shown first.
    let (logs, d, http) = logging_daemon();
    let id = Identity::numbered(7300);
    let (vm, _) = vm_up(&d, &id).await;
    vm.send(b"before the console\r\n").await.expect("VM output");
    let transcript = logs.path().join(format!("{}.log", id.name));
    let held = || file_holds(&transcript, |t| t.ends_with(b"before the console\r\n"));
    assert!(
        eventually(T, held).await,
        "the transcript never held the VM's output"
    );

    let mut ws = ws_connect(http, &console_path(&id, ""), None)
        .await
        .expect("the console opens");
    let hello = next_json(&mut ws).await;
    assert_eq!(hello["vm"], id.name.as_str(), "{hello}");
    assert_eq!(hello["uuid"], id.uuid_display().as_str(), "{hello}");
    assert_eq!(hello["access"], "free-for-all", "{hello}");
    assert_eq!(hello["vm_connected"], true, "{hello}");
    // The recent output comes first.
    let seed = read_bytes(&mut ws, 20 + LIVE.len()).await;
    assert_eq!(seed, [&b"before the console\r\n"[..], LIVE].concat());

    // VM -> browser: every byte value, as it is (no telnet escaping).
    let out = all_bytes(8);
    vm.send(&out).await.expect("VM output");
    assert_eq!(read_bytes(&mut ws, out.len()).await, out);

    // Browser -> VM: binary frames as they are, text frames as UTF-8.
    let typed = all_bytes(4);
    send(&mut ws, Message::binary(typed.clone())).await;
    assert_eq!(
        vm.read_exact_data(typed.len(), T).await.expect("input"),
        typed
    );
    send(&mut ws, Message::text("grüße ✓\r")).await;
    let utf8 = "grüße ✓\r".as_bytes();
    assert_eq!(
        vm.read_exact_data(utf8.len(), T).await.expect("input"),
        utf8
    );

    // The VM goes and comes back: the session stays and says so.
    vm.hang_up(T)
        .await
        .expect("the daemon closes the VM's side");
    assert_eq!(
        next_json(&mut ws).await,
        serde_json::json!({ "vm_connected": false })
    );
    let vm = SimVm::connect(d.proxy, &id).await.expect("VM reconnects");
    assert_eq!(
        next_json(&mut ws).await,
        serde_json::json!({ "vm_connected": true })
    );
    vm.send(b"after the reconnect").await.expect("VM output");
    assert_eq!(read_bytes(&mut ws, 19).await, b"after the reconnect");
    send(&mut ws, Message::binary(b"still typing".to_vec())).await;
    assert_eq!(
        vm.read_exact_data(12, T).await.expect("input"),
        b"still typing"
    );

    // The listing counts the browser console; closing it detaches it.
    let row = request(http, "GET", &format!("/api/v1/vms/{}", id.name), None)
        .await
        .json();
    assert_eq!(row["consoles"], 1, "{row}");
    send(&mut ws, Message::Close(None)).await;
    wait_for(T, "the closed browser console detached", async || {
        let row = request(http, "GET", &format!("/api/v1/vms/{}", id.name), None)
            .await
            .json();
        if row["consoles"] == 0 {
            Ok(())
        } else {
            Err(format!("still attached: {row}"))
        }
    })
    .await;
}

/// Bulk both ways through the pipe and its flow control: 6 MiB of output
/// (more than a console's queue would hold at once if nothing pushed back)
/// and a 1 MiB paste in frames of 48 KiB, every byte in order.
#[tokio::test]
async fn bulk_both_ways_arrives_whole() {
    let (d, http) = daemon(&[]);
    let id = Identity::numbered(7304);
    let (vm, _) = vm_up(&d, &id).await;
    let mut ws = ws_connect(http, &console_path(&id, ""), None)
        .await
        .expect("the console opens");
    assert_eq!(next_json(&mut ws).await["access"], "free-for-all");

    let out = XorShift::new(7304).bytes(6 << 20);
    let ((), got) = tokio::join!(
        async {
            for chunk in out.chunks(256 * 1024) {
                vm.send(chunk).await.expect("VM output");
            }
        },
        read_bytes(&mut ws, out.len())
    );
    assert!(got == out, "the output arrived changed");

    let paste = XorShift::new(7305).bytes(1 << 20);
    let (_, typed) = tokio::join!(
        async {
            for chunk in paste.chunks(48 * 1024) {
                send(&mut ws, Message::binary(chunk.to_vec())).await;
            }
        },
        vm.read_exact_data(paste.len(), T)
    );
    assert!(
        typed.expect("the paste reaches the VM") == paste,
        "the paste arrived changed"
    );
}

/// A browser that reads nothing is a stuck console like any other: given
/// up on after `--console-stall-timeout`, counted as a stall, and its
/// socket closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_that_reads_nothing_is_dropped_as_a_stall() {
    let (d, http) = daemon(&["--console-stall-timeout", "1"]);
    let id = Identity::numbered(7306);
    let (vm, _) = vm_up(&d, &id).await;
    // A small receive buffer, so that the daemon's side fills quickly.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let tcp = socket.connect(http).await.expect("connect");
    let req = format!("ws://{http}{}", console_path(&id, ""))
        .into_client_request()
        .expect("request");
    let (mut stuck, _) = tokio::time::timeout(
        T,
        tokio_tungstenite::client_async(req, MaybeTlsStream::Plain(tcp)),
    )
    .await
    .expect("the handshake took too long")
    .expect("the console opens");
    assert_eq!(next_json(&mut stuck).await["access"], "free-for-all");

    let out = XorShift::new(7306).bytes(16 << 20);
    for chunk in out.chunks(256 * 1024) {
        vm.send(chunk).await.expect("VM output");
    }
    let dropped = "the stuck browser console dropped as a stall";
    wait_for(Duration::from_secs(20), dropped, async || {
        let metrics = request(http, "GET", "/metrics", None).await.text();
        let stalls = metrics
            .lines()
            .any(|l| l == "vspc_console_disconnects_total{reason=\"stall\"} 1");
        let row = request(http, "GET", &format!("/api/v1/vms/{}", id.name), None)
            .await
            .json();
        if stalls && row["consoles"] == 0 {
            Ok(())
        } else {
            Err(format!("{row}\n{metrics}"))
        }
    })
    .await;
    // Reading now, it gets what its socket held, then the end.
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(Ok(_)) = stuck.next().await {}
    })
    .await;
    assert!(ended.is_ok(), "the stuck browser's socket was never closed");
}

#[tokio::test]
async fn tokens_locks_and_unknown_vms() {
    let (d, http, _dir) = daemon_with_tokens();
    let id = Identity::numbered(7301);
    let (vm, port) = vm_up(&d, &id).await;
    let path = console_path(&id, "");

    // 401 without a token or with a wrong one; 404 for an unknown VM.
    assert_eq!(refused_with(ws_connect(http, &path, None).await), 401);
    assert_eq!(
        refused_with(ws_connect(http, &path, Some("wrong")).await),
        401
    );
    assert_eq!(
        refused_with(ws_connect(http, &console_path(&id, "?token=wrong"), None).await),
        401
    );
    assert_eq!(
        refused_with(
            ws_connect(
                http,
                "/api/v1/vms/no-such-vm/console",
                Some("rw-secret-0123456")
            )
            .await
        ),
        404
    );
    assert_eq!(
        refused_with(
            ws_connect(
                http,
                &console_path(&id, "?mode=shared"),
                Some("rw-secret-0123456")
            )
            .await
        ),
        400
    );
    // A page of another site may not open a console, even with a token.
    let mut req = format!("ws://{http}{path}")
        .into_client_request()
        .expect("request");
    req.headers_mut()
        .insert("origin", HeaderValue::from_static("https://evil.example"));
    req.headers_mut().insert(
        "authorization",
        HeaderValue::from_static("Bearer rw-secret-0123456"),
    );
    let r = tokio::time::timeout(T, tokio_tungstenite::connect_async(req))
        .await
        .expect("the handshake took too long");
    assert_eq!(refused_with(r.map(|(ws, _)| ws)), 403);
    // A read-only token may not take a lock that writes.
    assert_eq!(
        refused_with(
            ws_connect(
                http,
                &console_path(&id, "?mode=write&token=ro-secret-0123456"),
                None
            )
            .await
        ),
        403
    );

    // A read-only token (here in the address, as a browser gives it) gets a
    // read-only session: it sees output, its typing never reaches the VM.
    let mut ro = ws_connect(http, &console_path(&id, "?token=ro-secret-0123456"), None)
        .await
        .expect("the read-only console opens");
    assert_eq!(next_json(&mut ro).await["access"], "read-only");
    send(&mut ro, Message::binary(b"LEAK".to_vec())).await;
    send(&mut ro, Message::text("leak")).await;
    let mut rw = ws_connect(http, &path, Some("rw-secret-0123456"))
        .await
        .expect("the read-write console opens");
    assert_eq!(next_json(&mut rw).await["access"], "free-for-all");
    send(&mut rw, Message::binary(b"MARK".to_vec())).await;
    assert_eq!(vm.read_exact_data(4, T).await.expect("input"), b"MARK");
    assert!(
        vm.recv_data(Duration::from_millis(300)).await.is_empty(),
        "the read-only console's typing reached the VM"
    );
    vm.send(b"to both").await.expect("VM output");
    assert_eq!(read_bytes(&mut ro, 7).await, b"to both");
    assert_eq!(read_bytes(&mut rw, 7).await, b"to both");

    // Exclusive is refused while another console is attached (here two
    // browsers and a telnet user): the browser is told why, then closed.
    let telnet = console_synced(&vm, &d, port).await;
    let mut ex = ws_connect(
        http,
        &console_path(&id, "?mode=exclusive"),
        Some("rw-secret-0123456"),
    )
    .await
    .expect("the handshake itself succeeds");
    let refusal = next_json(&mut ex).await;
    assert_eq!(refusal["code"], "lock_failed", "{refusal}");
    assert!(
        refusal["error"]
            .as_str()
            .unwrap_or("")
            .contains("exclusive"),
        "{refusal}"
    );
    match next(&mut ex).await {
        Some(Message::Close(Some(f))) => assert_eq!(u16::from(f.code), 4409, "{f:?}"),
        other => panic!("expected a close frame after the refusal, got {other:?}"),
    }
    telnet.close().await;
    drop(ro);
    drop(rw);

    // Alone (once the closed consoles have detached), exclusive is
    // granted, and then a telnet console is refused.
    wait_consoles(&d, &id.name, 0).await;
    let mut ex = ws_connect(
        http,
        &console_path(&id, "?mode=exclusive"),
        Some("rw-secret-0123456"),
    )
    .await
    .expect("handshake");
    let first = next_json(&mut ex).await;
    assert_eq!(
        first["access"], "exclusive",
        "exclusive not granted: {first}"
    );
    let late = vspc_testkit::sim::SimConsole::connect(d.console(port))
        .await
        .expect("connect");
    let (said, closed) = late.read_to_end(T).await;
    assert!(closed, "the telnet console was not closed");
    assert!(
        String::from_utf8_lossy(&said).contains("exclusive"),
        "{:?}",
        String::from_utf8_lossy(&said)
    );
    send(&mut ex, Message::binary(b"mine".to_vec())).await;
    assert_eq!(vm.read_exact_data(4, T).await.expect("input"), b"mine");

    // Cleared through the API: told why, then closed.
    let r = request(
        http,
        "POST",
        &format!("/api/v1/vms/{}/clear", id.name),
        Some("rw-secret-0123456"),
    )
    .await;
    assert_eq!(r.json()["cleared"], 1, "{}", r.text());
    let mut told = Vec::new();
    loop {
        match next(&mut ex).await {
            Some(Message::Binary(b)) => told.extend_from_slice(&b),
            Some(Message::Close(Some(f))) => {
                assert_eq!(u16::from(f.code), 1000, "{f:?}");
                break;
            }
            other => panic!("expected the notice and a close, got {other:?}"),
        }
    }
    assert!(
        String::from_utf8_lossy(&told).contains("cleared"),
        "{:?}",
        String::from_utf8_lossy(&told)
    );
}

#[tokio::test]
async fn pages_list_the_vms_and_carry_the_token() {
    let (d, http, _dir) = daemon_with_tokens();
    let id = Identity::numbered(7302);
    let (_vm, _) = vm_up(&d, &id).await;

    // Pages need the token too; their 401 says how to give it.
    let r = request(http, "GET", "/", None).await;
    assert_eq!(r.status, 401);
    assert!(r.text().contains("?token="), "{}", r.text());
    let r = request(http, "GET", "/?token=ro-secret-0123456", None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r
        .header("content-type")
        .is_some_and(|c| c.starts_with("text/html")));
    let html = r.text();
    assert!(html.contains(&id.name), "{html}");
    assert!(html.contains("connected"), "{html}");
    let link = format!("/vms/{}?token=ro-secret-0123456", id.uuid_display());
    assert!(html.contains(&link), "no link {link} in {html}");

    let r = request(http, "GET", &link, None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let html = r.text();
    for needle in [
        "/static/xterm.js",
        "/static/addon-fit.js",
        "/static/console.js",
    ] {
        assert!(html.contains(needle), "{needle} missing from {html}");
    }
    let r = request(http, "GET", "/vms/no-such-vm", Some("ro-secret-0123456")).await;
    assert_eq!(r.status, 404);

    // The scripts need no token (a script tag cannot send one) and come
    // from the binary.
    let r = request(http, "GET", "/static/xterm.js", None).await;
    assert_eq!(r.status, 200);
    assert!(r.text().contains("xterm"));
    assert!(r
        .header("content-type")
        .is_some_and(|c| c.starts_with("text/javascript")));
    assert_eq!(
        request(http, "GET", "/static/nope.js", None).await.status,
        404
    );
}

// ---------------------------------------------------------------------------
// The real browser.

/// Where Chromium is: `$CHROMIUM`, else Debian's `/usr/bin/chromium`.
fn chromium() -> PathBuf {
    std::env::var_os("CHROMIUM").map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from)
}

/// The browser driver's folder (`tests/web/`).
fn web_dir() -> PathBuf {
    repo_root().join("tests/web")
}

/// A process group the test started (node, and the Chromium it launches),
/// stopped when dropped: SIGTERM first (Playwright then closes the
/// browser), SIGKILL to the group after a grace period.
struct Driver {
    child: Child,
}

impl Driver {
    fn signal(&self, sig: &str) {
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill")
            .args(["-s", sig, "--", &group])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    /// Wait up to `limit` for the process to exit; true if it did.
    fn wait_exit(&mut self, limit: Duration) -> bool {
        eventually_blocking(limit, || matches!(self.child.try_wait(), Ok(Some(_))))
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if !self.wait_exit(Duration::ZERO) {
            self.signal("TERM");
            self.wait_exit(Duration::from_secs(5));
        }
        // Whatever is left of the group (a browser whose driver died).
        self.signal("KILL");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the browser driver printed, line by line.
struct Said {
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    /// Every line so far, for failure messages.
    seen: Vec<String>,
    /// The longest wait for one step.
    step: Duration,
}

impl Said {
    /// Wait for the line starting with `what`; a `FAIL` line, the end of
    /// the output or a silent step fails the test with everything said.
    async fn wait_for(&mut self, what: &str) -> String {
        loop {
            match tokio::time::timeout(self.step, self.lines.recv()).await {
                Ok(Some(line)) => {
                    self.seen.push(line.clone());
                    if line.starts_with(what) {
                        return line;
                    }
                    assert!(
                        !line.starts_with("FAIL"),
                        "the browser step before {what} failed:\n{}",
                        self.seen.join("\n")
                    );
                }
                Ok(None) => panic!(
                    "the browser driver ended before {what}:\n{}",
                    self.seen.join("\n")
                ),
                Err(_) => panic!(
                    "the browser driver said nothing for {:?} while {what} was awaited:\n{}",
                    self.step,
                    self.seen.join("\n")
                ),
            }
        }
    }
}

/// Fail, naming what to install, if Chromium, node or playwright-core is
/// missing.
fn check_browser() -> PathBuf {
    let browser = chromium();
    assert!(
        browser.is_file(),
        "{} is missing: install the Debian packages `chromium` and `chromium-driver` \
         (apt-get install chromium chromium-driver; .ci/run does), or set CHROMIUM",
        browser.display()
    );
    let node_ok = Command::new("node")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        node_ok,
        "node is missing: install the Debian package `nodejs` (and `npm`)"
    );
    assert!(
        web_dir().join("node_modules/playwright-core").is_dir(),
        "tests/web/node_modules/playwright-core is missing: run `npm ci` in tests/web (.ci/run does)"
    );
    browser
}

/// Run a browser driver script of `tests/web/` with `args`; its process
/// group is stopped when the [`Driver`] is dropped.
fn drive(browser: &std::path::Path, script: &str, args: &[&std::ffi::OsStr]) -> (Driver, Said) {
    drive_with_env(browser, script, args, &[])
}

/// [`drive`], with more environment for the script.
fn drive_with_env(
    browser: &std::path::Path,
    script: &str,
    args: &[&std::ffi::OsStr],
    env: &[(&str, &str)],
) -> (Driver, Said) {
    let mut cmd = Command::new("node");
    cmd.current_dir(web_dir())
        .arg(script)
        .args(args)
        .envs(env.iter().copied())
        .env("CHROMIUM", browser)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn().expect("run node");
    let (tx, lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    let stdout = child.stdout.take().expect("stdout");
    let stderr = child.stderr.take().expect("stderr");
    let driver = Driver { child };
    for pipe in [
        Box::new(stdout) as Box<dyn std::io::Read + Send>,
        Box::new(stderr),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
    }
    drop(tx);
    // Browsers start slowly on a busy 2-core machine: a step may take 30 s.
    let said = Said {
        lines,
        seen: Vec::new(),
        step: Duration::from_secs(30),
    };
    (driver, said)
}

impl Said {
    /// Fail if the page's console reported something the Content Security
    /// Policy blocked.
    fn assert_no_csp_violation(&self) {
        assert!(
            !self
                .seen
                .iter()
                .any(|l| l.contains("Content Security Policy") || l.contains("Refused to")),
            "the Content-Security-Policy blocked something:\n{}",
            self.seen.join("\n")
        );
    }
}

#[tokio::test]
async fn chromium_shows_the_output_and_types_to_the_vm() {
    let browser = check_browser();
    let (d, http, _dir) = daemon_with_tokens();
    let id = Identity::numbered(7303);
    let (vm, _) = vm_up(&d, &id).await;
    // Printed before the page opens: the page shows it first, then the
    // "-- live --" line (the VM's replay ring).
    let before = "panic: printed before the browser came";
    vm.send(format!("{before}\r\n").as_bytes())
        .await
        .expect("VM output");
    let profile = tempfile::tempdir().expect("a browser profile directory");
    let marker = "hello from the VM, in the browser";
    let url = format!("http://{http}/vms/{}?token=rw-secret-0123456", id.name);
    let mut args: Vec<&std::ffi::OsStr> =
        vec![url.as_ref(), marker.as_ref(), profile.path().as_os_str()];
    let shot = std::env::var_os("VSPC_WEB_SCREENSHOT");
    if let Some(shot) = &shot {
        args.push(shot);
    }
    let (mut driver, mut said) =
        drive_with_env(&browser, "console_test.mjs", &args, &[("BEFORE", before)]);

    let ready = said.wait_for("READY").await;
    assert_eq!(ready, "READY free-for-all");
    said.wait_for("BEFORE").await;
    vm.send(format!("{marker}\r\n").as_bytes())
        .await
        .expect("VM output");
    said.wait_for("SAW").await;
    said.wait_for("TYPED").await;
    // Keys as a terminal sends them: Enter is CR, Ctrl-C is ETX, the arrow
    // is CSI A, Backspace is DEL.
    let expected = b"typed in the browser\r\x03\x1b[A\t\x7f\x1b";
    let got = vm
        .read_exact_data(expected.len(), T)
        .await
        .expect("the typed keys reach the VM");
    assert_eq!(got, expected, "{:?}", String::from_utf8_lossy(&got));
    assert!(
        vm.recv_data(Duration::from_millis(200)).await.is_empty(),
        "more than the keys reached the VM"
    );
    vm.hang_up(T).await.expect("the VM hangs up");
    said.wait_for("VMDOWN").await;
    let _vm = SimVm::connect(d.proxy, &id).await.expect("VM reconnects");
    said.wait_for("VMUP").await;
    said.wait_for("DONE").await;
    said.assert_no_csp_violation();
    assert!(
        driver.wait_exit(T),
        "the browser driver did not exit after DONE"
    );
}

/// The name DNS rebinding uses, made to resolve to 127.0.0.1 in Chromium.
const REBIND: &str = "rebind.attacker.example";

/// Chromium opens the daemon's list page as `http://REBIND:PORT/` and, from
/// that page, asks the API and opens a console (`tests/web/rebind_test.mjs`).
fn rebind_browser(http: SocketAddr, vm: &str, profile: &std::path::Path) -> (Driver, Said) {
    let browser = check_browser();
    let base = format!("http://{REBIND}:{}", http.port());
    let rules = format!("MAP {REBIND} 127.0.0.1");
    let args: Vec<&std::ffi::OsStr> = vec![
        base.as_ref(),
        vm.as_ref(),
        profile.as_os_str(),
        rules.as_ref(),
    ];
    drive(&browser, "rebind_test.mjs", &args)
}

/// DNS rebinding against a loopback daemon without a token file: a page
/// of the attacker's, by a name of the attacker's that now resolves to
/// 127.0.0.1, is same-origin with the daemon as far as the browser knows.
/// The daemon answers such a Host with 421: no page, no API, no console.
#[tokio::test]
async fn chromium_by_a_rebound_name_gets_no_page_and_no_console() {
    let (d, http) = daemon(&[]);
    let id = Identity::numbered(7310);
    let (_vm, _) = vm_up(&d, &id).await;
    let profile = tempfile::tempdir().expect("a browser profile directory");
    let (mut driver, mut said) = rebind_browser(http, &id.name, profile.path());
    assert_eq!(said.wait_for("PAGE").await, "PAGE 421 unlisted");
    assert_eq!(said.wait_for("API").await, "API 421");
    assert_eq!(said.wait_for("WS").await, "WS refused");
    assert_eq!(said.wait_for("CONSOLE").await, "CONSOLE none");
    said.wait_for("DONE").await;
    // Refused by the daemon, not by the browser's policy.
    said.assert_no_csp_violation();
    assert!(driver.wait_exit(T), "the browser driver did not exit");
    let row = request(http, "GET", &format!("/api/v1/vms/{}", id.name), None)
        .await
        .json();
    assert_eq!(row["consoles"], 0, "a console was opened: {row}");
}

/// With `--http-host rebind.attacker.example` the name is the server's
/// own: the page, the API and the console work by it, and the pages'
/// Content-Security-Policy (the list page's script, the console's
/// WebSocket by that name) blocks nothing.
#[tokio::test]
async fn chromium_by_an_http_host_name_gets_the_page_and_a_console() {
    let (d, http) = daemon(&["--http-host", REBIND]);
    let id = Identity::numbered(7311);
    let (_vm, _) = vm_up(&d, &id).await;
    let profile = tempfile::tempdir().expect("a browser profile directory");
    let (mut driver, mut said) = rebind_browser(http, &id.name, profile.path());
    assert_eq!(said.wait_for("PAGE").await, "PAGE 200 listed");
    assert_eq!(said.wait_for("INDEXJS").await, "INDEXJS yes");
    assert_eq!(said.wait_for("API").await, "API 200");
    assert_eq!(said.wait_for("WS").await, "WS open");
    assert_eq!(said.wait_for("CONSOLE").await, "CONSOLE free-for-all");
    said.wait_for("DONE").await;
    said.assert_no_csp_violation();
    assert!(driver.wait_exit(T), "the browser driver did not exit");
}
