//! Access control and the audit trail, against the real `vspc` binary:
//!
//! - `--proxy-allow`: a VM connecting from 127.0.0.2 (the client socket is
//!   bound there; the whole loopback range works without namespaces) is
//!   closed at accept when only 127.0.0.1/32 may connect, the log names
//!   its address and `/metrics` counts it;
//! - a hijack: with the allow-list, an attacker from 127.0.0.2 claiming a
//!   live VM's uuid is refused and the real VM's console keeps working both
//!   ways; without it, the takeover from another address is logged as a
//!   warning naming both addresses;
//! - an invalid range is a start-up usage error naming it;
//! - audit: a console-port, two admin-port (native and vSPC.py) and two
//!   browser consoles each log a start and an end line with who, which VM,
//!   what was granted, from where, the duration and the bytes each way,
//!   and the jsonl plugin gets the same events.

use std::net::SocketAddr;

use crate::common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use vspc_testkit::sim::{Identity, Role, SimConsole, SimVm, VmOptions};

/// The daemon's proxy port as reached on 127.0.0.1 (it listens on all
/// addresses in these tests).
fn proxy(d: &Daemon) -> SocketAddr {
    SocketAddr::new("127.0.0.1".parse().expect("ip"), d.proxy.port())
}

/// A TCP connection to `to` from the local address `from`.
async fn connect_from(from: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(from.parse().expect("ip"), 0))?;
    let s = sock.connect(to).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// A VM from the local address `from`: ready, or why not.
async fn vm_from(from: &str, d: &Daemon, id: &Identity) -> Result<SimVm, String> {
    let stream = connect_from(from, proxy(d))
        .await
        .map_err(|e| format!("connect from {from}: {e}"))?;
    let opts = VmOptions::default();
    let vm = SimVm::start(stream, id, Role::Source, &opts);
    match tokio::time::timeout(T, vm.wait_ready()).await {
        Ok(Ok(())) => Ok(vm),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no handshake in time".into()),
    }
}

/// The daemon's log lines that contain every one of `needles`.
fn lines_with(d: &Daemon, needles: &[&str]) -> Vec<String> {
    d.log()
        .lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn a_vm_from_outside_the_allow_list_is_refused_at_accept() {
    let http = free_port();
    let d = Daemon::builder()
        .proxy_iface("0.0.0.0")
        .args(&["--proxy-allow", "127.0.0.1/32"])
        .args(&["--http-port", &http.to_string()])
        .start();
    let id = Identity::numbered(1100);
    let refused = vm_from("127.0.0.2", &d, &id).await;
    assert!(refused.is_err(), "a VM from 127.0.0.2 was served");
    assert!(
        d.wait_log("refused a connection from 127.0.0.2", T).await,
        "no log line names the refused address:\n{}",
        d.log()
    );
    assert!(try_list_vms(d.admin).await.expect("list").is_empty());
    // The allowed network still gets in.
    let vm = vm_from("127.0.0.1", &d, &id)
        .await
        .expect("VM from 127.0.0.1");
    wait_for_vm(d.admin, &id.name, T).await;
    let addr = SocketAddr::new("127.0.0.1".parse().expect("ip"), http);
    let metrics = crate::http::request(addr, "GET", "/metrics", None).await;
    assert!(
        metrics.text().contains("vspc_proxy_refused_total 1"),
        "{}",
        metrics.text()
    );
    vm.close().await;
}

#[tokio::test]
async fn a_hijack_from_another_address_is_refused_and_the_console_goes_on() {
    let d = Daemon::builder()
        .proxy_iface("0.0.0.0")
        .args(&["--proxy-allow", "127.0.0.1/32"])
        .start();
    let id = Identity::numbered(1101);
    let vm = vm_from("127.0.0.1", &d, &id).await.expect("real VM");
    let (_, port) = wait_for_vm(d.admin, &id.name, T).await;
    let console = console_synced(&vm, &d, port).await;
    let attacker = vm_from("127.0.0.2", &d, &id).await;
    assert!(attacker.is_err(), "the attacker's connection was served");
    assert!(d.wait_log("refused a connection from 127.0.0.2", T).await);
    vm.send(b"still mine").await.expect("VM output");
    assert_eq!(
        console.read_exact_data(10, T).await.expect("console reads"),
        b"still mine"
    );
    console.send(b"typed").await.expect("console input");
    assert_eq!(vm.read_exact_data(5, T).await.expect("VM reads"), b"typed");
    assert!(vm.closed().is_none(), "the real VM was disconnected");
    assert!(lines_with(&d, &["replaces its live connection"]).is_empty());
}

#[tokio::test]
async fn without_an_allow_list_a_takeover_from_another_address_is_a_warning() {
    let d = Daemon::builder().proxy_iface("0.0.0.0").start();
    let id = Identity::numbered(1102);
    let first = vm_from("127.0.0.1", &d, &id).await.expect("first VM");
    wait_for_vm(d.admin, &id.name, T).await;
    let _second = vm_from("127.0.0.2", &d, &id).await.expect("second VM");
    assert!(d.wait_log("replaces its live connection", T).await);
    let lines = lines_with(&d, &["replaces its live connection"]);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("WARN") && l.contains("127.0.0.2:") && l.contains("127.0.0.1:")),
        "{lines:?}"
    );
    first
        .wait_closed(T)
        .await
        .expect("the old connection closes");
}

#[test]
fn an_invalid_range_is_a_usage_error_naming_it() {
    let out = run_to_exit(&["--proxy-allow", "127.0.0.1/32,10.0.0.0/33"], T);
    assert_eq!(
        out.status.and_then(|s| s.code()),
        Some(2),
        "stderr: {}",
        out.stderr
    );
    assert!(
        out.stderr.contains("10.0.0.0/33") && out.stderr.contains("--proxy-allow"),
        "{}",
        out.stderr
    );
    let out = run_to_exit(&["--proxy-allow", "10.1.2.3/8"], T);
    assert!(
        out.stderr.contains("did you mean 10.0.0.0/8"),
        "{}",
        out.stderr
    );
}

/// The `audit:` start and end lines of the session of `kind`, once both
/// are in the log.
async fn audit_lines(d: &Daemon, kind: &str) -> (String, String) {
    let k = format!("kind={kind} ");
    let found = eventually(T, || {
        !lines_with(d, &["audit: console session ended", &k]).is_empty()
    })
    .await;
    assert!(found, "no audit end line for {kind}:\n{}", d.log());
    let start = lines_with(d, &["audit: console session started", &k]);
    let end = lines_with(d, &["audit: console session ended", &k]);
    assert_eq!((start.len(), end.len()), (1, 1), "{start:?} {end:?}");
    (start[0].clone(), end[0].clone())
}

/// Check the fields both audit lines of one session carry.
fn common_fields(start: &str, end: &str, vm: &str, access: &str, user: &str) {
    for line in [start, end] {
        assert!(line.contains(&format!("vm=\"{vm}\"")), "{line}");
        assert!(line.contains(&format!("access={access}")), "{line}");
        assert!(line.contains("peer=127.0.0.1:"), "{line}");
        assert!(line.contains(&format!("user=\"{user}\"")), "{line}");
    }
    let session = |l: &str| {
        l.split_whitespace()
            .find(|w| w.starts_with("session="))
            .map(str::to_string)
    };
    assert!(session(start).is_some() && session(start) == session(end));
    assert!(end.contains("duration_s="), "{end}");
}

#[tokio::test]
async fn every_console_session_is_audited_in_the_log_and_the_backends() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tokens = dir.path().join("tokens");
    crate::http::write_token_file(
        &tokens,
        "ops-secret-0123456 name=ops\nreader-secret-0123 ro\n",
    );
    let events = dir.path().join("events.jsonl");
    let jsonl = &crate::backends::plugins().jsonl;
    let http_port = free_port();
    let d = Daemon::builder()
        .args(&["--http-port", &http_port.to_string()])
        .args(&["--http-token-file", &tokens.display().to_string()])
        .args(&["--backend", &jsonl.display().to_string()])
        .args(&["--jsonl-file", &events.display().to_string()])
        .start();
    let http = SocketAddr::new("127.0.0.1".parse().expect("ip"), http_port);
    let id = Identity::numbered(1103);
    let (vm, port) = vm_up(&d, &id).await;

    // A console port: 3 bytes typed (and the telnet opening out).
    let console = SimConsole::connect(d.console(port))
        .await
        .expect("console connects");
    console.send(b"abc").await.expect("type");
    assert_eq!(vm.read_exact_data(3, T).await.expect("VM reads"), b"abc");
    console.close().await;
    let (start, end) = audit_lines(&d, "console-port").await;
    common_fields(&start, &end, &id.name, "free-for-all", "");
    assert!(end.contains("bytes_to_vm=3 "), "{end}");
    assert!(!end.contains("bytes_from_vm=0"), "{end}");

    // The admin port's native protocol, raw: 5 bytes in, 3 out.
    let mut admin = TcpStream::connect(d.admin).await.expect("admin port");
    admin
        .write_all(format!("connect {} write raw\n", id.name).as_bytes())
        .await
        .expect("connect");
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while !line.ends_with(b"\n") {
        tokio::time::timeout(T, admin.read_exact(&mut b))
            .await
            .expect("answer in time")
            .expect("read");
        line.push(b[0]);
    }
    admin.write_all(b"hello").await.expect("type");
    assert_eq!(vm.read_exact_data(5, T).await.expect("VM reads"), b"hello");
    vm.send(b"out").await.expect("output");
    let mut got = [0u8; 3];
    tokio::time::timeout(T, admin.read_exact(&mut got))
        .await
        .expect("in time")
        .expect("read");
    drop(admin);
    let (start, end) = audit_lines(&d, "admin-native").await;
    common_fields(&start, &end, &id.name, "write", "");
    assert!(end.contains("bytes_to_vm=5 "), "{end}");
    assert!(end.contains("bytes_from_vm=3"), "{end}");

    // The admin port's vSPC.py protocol: 4 bytes in.
    let crate::admin::PickleAnswer::Found { console, .. } =
        crate::admin::pickle_session(&d, &id.name, "exclusive").await
    else {
        panic!("no vSPC.py console session");
    };
    console.send(b"wxyz").await.expect("type");
    assert_eq!(vm.read_exact_data(4, T).await.expect("VM reads"), b"wxyz");
    console.close().await;
    let (start, end) = audit_lines(&d, "admin-vspc").await;
    common_fields(&start, &end, &id.name, "exclusive", "");
    assert!(end.contains("bytes_to_vm=4 "), "{end}");

    // The browser console with the named token: 2 bytes in.
    let path = format!(
        "ws://{http}/api/v1/vms/{}/console?mode=free-for-all",
        id.name
    );
    let mut req = path.into_client_request().expect("request");
    req.headers_mut().insert(
        "authorization",
        HeaderValue::from_static("Bearer ops-secret-0123456"),
    );
    let (mut ws, _) = tokio::time::timeout(T, tokio_tungstenite::connect_async(req))
        .await
        .expect("handshake in time")
        .expect("handshake");
    // The hello frame says the session is up.
    let hello = tokio::time::timeout(T, ws.next()).await.expect("hello");
    assert!(matches!(hello, Some(Ok(Message::Text(_)))), "{hello:?}");
    ws.send(Message::binary(b"xy".to_vec()))
        .await
        .expect("send");
    assert_eq!(vm.read_exact_data(2, T).await.expect("VM reads"), b"xy");
    ws.close(None).await.expect("close");
    drop(ws);
    let (start, end) = audit_lines(&d, "web").await;
    common_fields(&start, &end, &id.name, "free-for-all", "ops");
    assert!(end.contains("bytes_to_vm=2 "), "{end}");

    // A read-only token without a name is known by its position.
    let path = format!("ws://{http}/api/v1/vms/{}/console", id.name);
    let mut req = path.into_client_request().expect("request");
    req.headers_mut().insert(
        "authorization",
        HeaderValue::from_static("Bearer reader-secret-0123"),
    );
    let (mut ws, _) = tokio::time::timeout(T, tokio_tungstenite::connect_async(req))
        .await
        .expect("handshake in time")
        .expect("handshake");
    let _ = tokio::time::timeout(T, ws.next()).await.expect("hello");
    assert!(d.wait_log("user=\"token#2\"", T).await, "{}", d.log());
    let ro = lines_with(&d, &["audit: console session started", "user=\"token#2\""]);
    assert!(ro[0].contains("access=read-only"), "{ro:?}");
    drop(ws);

    // The backends saw the same sessions.
    let parse = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(&events)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };
    let ended = |kind: &str| {
        parse()
            .into_iter()
            .find(|e| e["event"] == "session_ended" && e["kind"] == kind)
    };
    let all_there = eventually(T, || {
        ["console-port", "admin-native", "admin-vspc", "web"]
            .iter()
            .all(|k| ended(k).is_some())
    })
    .await;
    assert!(all_there, "session events missing: {:?}", parse());
    let port_end = ended("console-port").expect("console-port");
    assert_eq!(port_end["bytes_to_vm"], 3, "{port_end}");
    assert_eq!(port_end["name"], id.name.as_str(), "{port_end}");
    assert!(port_end["duration_ms"].is_u64(), "{port_end}");
    let admin_end = ended("admin-native").expect("admin-native");
    assert_eq!(admin_end["bytes_from_vm"], 3, "{admin_end}");
    assert_eq!(admin_end["access"], "write", "{admin_end}");
    let web_end = ended("web").expect("web");
    assert_eq!(web_end["user"], "ops", "{web_end}");
    assert!(
        web_end["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("127.0.0.1:")),
        "{web_end}"
    );
    let started: Vec<_> = parse()
        .into_iter()
        .filter(|e| e["event"] == "session_started")
        .collect();
    assert!(started.len() >= 4, "{started:?}");
    assert!(
        started
            .iter()
            .all(|e| e["bytes_to_vm"].is_null() && e["session"].is_u64()),
        "{started:?}"
    );
}
