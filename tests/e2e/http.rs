//! The HTTP API and `/metrics`, end to end: the real daemon with
//! `--http-port`, requests written by hand over TCP (HTTP/1.1,
//! `Connection: close`), and the metrics text read by a real Prometheus
//! text parser (the `prometheus-parse` crate).
//!
//! - every endpoint answers, with JSON errors and meaningful codes (404 for
//!   an unknown VM, route or transcript);
//! - the metrics follow traffic: bytes each way, consoles, accepts, and a
//!   vMotion's outcome and timings;
//! - `/console_log` returns the tail of a Logging transcript;
//! - tokens: none, a wrong one and a read-only one on a write are refused;
//! - start-up refuses a non-loopback HTTP address without a token file and
//!   a malformed token file, naming the line.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::common::*;
use prometheus_parse::{Scrape, Value};
use serde_json::Value as Json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use vspc_testkit::sim::{Identity, Role, SimVm, VmOptions, VmotionReply};

/// An HTTP answer.
pub(crate) struct Resp {
    pub(crate) status: u16,
    /// Header names lowercased.
    headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
}

impl Resp {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub(crate) fn json(&self) -> Json {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Decode a chunked body.
fn unchunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size_text = String::from_utf8_lossy(&raw[..eol]);
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).expect("chunk size");
        if size == 0 {
            return out;
        }
        let start = eol + 2;
        out.extend_from_slice(&raw[start..start + size]);
        raw = &raw[start + size + 2..];
    }
}

/// One request, the answer read to the end.
pub(crate) async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> Resp {
    let s = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect to the HTTP port {addr}: {e}"));
    exchange(s, addr, method, path, token).await
}

/// One request on a connected stream (TCP or TLS).
async fn exchange<S>(s: S, addr: SocketAddr, method: &str, path: &str, token: Option<&str>) -> Resp
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    if method != "GET" {
        req.push_str("Content-Length: 0\r\n");
    }
    req.push_str("\r\n");
    send_raw(s, &req).await.unwrap_or_else(|e| panic!("{e}"))
}

/// Send `req` as it is (the whole request, header and body) on a
/// connected stream and read the answer to the end; what went wrong if no
/// answer came (the connection closed first, or nothing within [`T`]).
pub(crate) async fn send_raw<S>(mut s: S, req: &str) -> Result<Resp, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("send request: {e}"))?;
    let mut raw = Vec::new();
    match tokio::time::timeout(T, s.read_to_end(&mut raw)).await {
        Err(_) => return Err(format!("the answer took more than {T:?}")),
        Ok(Ok(_)) => {}
        // A TLS peer that closes without close_notify, after the answer.
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
        Ok(Err(e)) => return Err(format!("read answer: {e}")),
    }
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no header end in {:?}", String::from_utf8_lossy(&raw)))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line in {head:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"))
    {
        body = unchunk(&body);
    }
    Ok(Resp {
        status,
        headers,
        body,
    })
}

/// [`send_raw`] on a new connection to `addr`.
pub(crate) async fn raw(addr: SocketAddr, req: &str) -> Resp {
    let s = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect to the HTTP port {addr}: {e}"));
    send_raw(s, req)
        .await
        .unwrap_or_else(|e| panic!("{e}; request {req:?}"))
}

/// Write a token file readable and writable by its owner only (vspc
/// refuses one that others may write).
pub(crate) fn write_token_file(path: &std::path::Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).expect("write the token file");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .expect("chmod the token file");
}

pub(crate) async fn get(addr: SocketAddr, path: &str) -> Resp {
    request(addr, "GET", path, None).await
}

/// Start a daemon with an HTTP port; returns it and the HTTP address.
pub(crate) fn daemon(extra: &[&str]) -> (Daemon, SocketAddr) {
    let port = free_port();
    let mut args = vec!["--http-port".to_string(), port.to_string()];
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let d = Daemon::start(&refs);
    let addr = SocketAddr::new("127.0.0.1".parse().expect("ip"), port);
    (d, addr)
}

/// A daemon with the HTTP API and the Logging backend (transcripts in the
/// returned directory); returns the directory, the daemon and the HTTP
/// address.
pub(crate) fn logging_daemon() -> (tempfile::TempDir, Daemon, SocketAddr) {
    let logs = tempfile::tempdir().expect("tempdir");
    let dir = logs.path().display().to_string();
    let (d, http) = daemon(&["--backend", "Logging", "-l", &dir]);
    (logs, d, http)
}

/// `/metrics`, parsed.
async fn scrape(addr: SocketAddr) -> Scrape {
    let r = get(addr, "/metrics").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("text/plain")),
        "content type {:?}",
        r.header("content-type")
    );
    Scrape::parse(r.text().lines().map(|l| Ok(l.to_string()))).expect("Prometheus text")
}

/// The value of the sample `name` with these labels (counter, gauge or
/// untyped, e.g. a histogram's `_count`).
fn value(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    s.samples
        .iter()
        .find(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .and_then(|x| match x.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(v),
            _ => None,
        })
}

fn must(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    value(s, name, labels).unwrap_or_else(|| panic!("no sample {name} {labels:?}"))
}

/// Scrape until `ok` holds (the daemon counts asynchronously).
async fn scrape_until(addr: SocketAddr, what: &str, ok: impl Fn(&Scrape) -> bool) -> Scrape {
    wait_for(T, &format!("metrics showing {what}"), async || {
        let s = scrape(addr).await;
        if ok(&s) {
            Ok(s)
        } else {
            Err("not yet".into())
        }
    })
    .await
}

fn hex32(id: &Identity) -> String {
    id.uuid.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn endpoints_answer_and_metrics_follow_traffic() {
    let (d, http) = daemon(&[]);

    let h = get(http, "/healthz").await;
    assert_eq!(h.status, 200);
    assert_eq!(h.json()["status"], "ok");

    let s = scrape(http).await;
    assert_eq!(must(&s, "vspc_vms", &[]), 0.0);
    assert_eq!(
        must(
            &s,
            "vspc_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    assert_eq!(
        must(&s, "vspc_backend_queued_bytes", &[("backend", "Memory")]),
        0.0
    );
    assert_eq!(
        must(
            &s,
            "vspc_backend_dropped_events_total",
            &[("backend", "Memory")]
        ),
        0.0
    );
    for sample in &s.samples {
        assert!(sample.metric.starts_with("vspc_"), "{}", sample.metric);
        for k in sample.labels.keys() {
            assert!(
                !["vm", "name", "uuid"].contains(&k.as_str()),
                "per-VM label on {}",
                sample.metric
            );
        }
    }

    let id = Identity::numbered(7100);
    let (vm, port) = vm_up(&d, &id).await;
    let console = console_synced(&vm, &d, port).await;
    vm.send(b"hello from the VM\r\n").await.expect("VM output");
    console.send(b"typed").await.expect("console input");
    assert_eq!(
        vm.read_exact_data(5, T)
            .await
            .expect("input reaches the VM"),
        b"typed"
    );

    let s = scrape_until(http, "the VM's output", |s| {
        value(s, "vspc_vm_to_console_bytes_total", &[]).unwrap_or(0.0) >= 19.0
    })
    .await;
    assert_eq!(must(&s, "vspc_vms", &[]), 1.0);
    assert_eq!(must(&s, "vspc_vms_connected", &[]), 1.0);
    assert_eq!(must(&s, "vspc_consoles", &[]), 1.0);
    assert!(must(&s, "vspc_console_to_vm_bytes_total", &[]) >= 5.0);
    assert!(
        must(
            &s,
            "vspc_connections_accepted_total",
            &[("listener", "proxy")]
        ) >= 1.0
    );
    assert!(
        must(
            &s,
            "vspc_connections_accepted_total",
            &[("listener", "console")]
        ) >= 1.0
    );
    assert!(
        must(
            &s,
            "vspc_connections_accepted_total",
            &[("listener", "http")]
        ) >= 2.0
    );
    assert!(
        must(
            &s,
            "vspc_connections_accepted_total",
            &[("listener", "admin")]
        ) >= 1.0
    );
    assert_eq!(
        must(&s, "vspc_accept_errors_total", &[("listener", "proxy")]),
        0.0
    );
    assert_eq!(
        must(
            &s,
            "vspc_tls_handshake_failures_total",
            &[("listener", "proxy")]
        ),
        0.0
    );
    assert_eq!(must(&s, "vspc_console_skipped_bytes_total", &[]), 0.0);

    // The listing and one VM, by name and by two spellings of its uuid.
    let all = get(http, "/api/v1/vms").await;
    assert_eq!(all.status, 200);
    let list = all.json();
    let rows = list["vms"].as_array().expect("vms array");
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert_eq!(row["name"], id.name.as_str());
    assert_eq!(row["uuid"], id.uuid_display().as_str());
    assert_eq!(row["port"], port);
    assert_eq!(row["vm_connected"], true);
    assert_eq!(row["consoles"], 1);
    assert!(row["bytes_from_vm"].as_u64().unwrap_or(0) >= 19, "{row}");
    assert!(row["bytes_to_vm"].as_u64().unwrap_or(0) >= 5, "{row}");
    assert!(
        row["peer"].as_str().unwrap_or("").starts_with("127.0.0.1:"),
        "{row}"
    );
    let since = row["connected_since"].as_str().unwrap_or("");
    assert!(since.len() == 20 && since.ends_with('Z'), "{row}");
    for key in [id.name.clone(), id.uuid_display(), hex32(&id)] {
        let one = get(http, &format!("/api/v1/vms/{key}")).await;
        assert_eq!(one.status, 200, "{key}: {}", one.text());
        assert_eq!(one.json()["name"], id.name.as_str());
    }

    // The 404s, as JSON.
    let none = get(http, "/api/v1/vms/no-such-vm").await;
    assert_eq!(none.status, 404);
    assert!(none.json()["error"]
        .as_str()
        .is_some_and(|e| e.contains("no-such-vm")));
    let route = get(http, "/nowhere").await;
    assert_eq!(route.status, 404);
    assert!(route.json()["error"].is_string());
    // The Memory backend keeps no transcript: the replay ring answers
    // (the VM said nothing yet), and /recent is the same ring.
    let log = get(http, &format!("/console_log/{}", hex32(&id))).await;
    assert_eq!(log.status, 200, "{}", log.text());
    let recent = get(http, &format!("/api/v1/vms/{}/recent", id.name)).await;
    assert_eq!(recent.status, 200, "{}", recent.text());
    assert_eq!(log.text(), recent.text());

    // Clearing (no token file: loopback is trusted) disconnects the console
    // and counts it.
    let cleared = request(
        http,
        "POST",
        &format!("/api/v1/vms/{}/clear", id.name),
        None,
    )
    .await;
    assert_eq!(cleared.status, 200, "{}", cleared.text());
    assert_eq!(cleared.json()["cleared"], 1);
    let s = scrape_until(http, "the cleared console", |s| {
        value(
            s,
            "vspc_console_disconnects_total",
            &[("reason", "cleared")],
        ) == Some(1.0)
    })
    .await;
    assert_eq!(must(&s, "vspc_consoles", &[]), 0.0);
    drop(console);
}

#[tokio::test]
async fn a_vmotion_moves_the_outcome_counters_and_the_histograms() {
    let (d, http) = daemon(&[]);
    let id = Identity::numbered(7200);
    let (src, _port) = vm_up(&d, &id).await;
    let seq = [7u8, 2, 0, 0];
    let cookie = match src.begin_vmotion(&seq).await.expect("BEGIN") {
        VmotionReply::GoAhead { cookie } => cookie,
        other => panic!("wanted GOAHEAD, got {other:?}"),
    };
    // A second BEGIN while one is pending: NOTNOW.
    assert_eq!(
        src.begin_vmotion(&[9, 9, 9, 9]).await.expect("BEGIN"),
        VmotionReply::NotNow
    );
    // A PEER with a wrong cookie gets silence, and is counted.
    let mut wrong = cookie.clone();
    let last = wrong.len() - 1;
    wrong[last] ^= 1;
    let stray = SimVm::start(
        TcpStream::connect(d.proxy).await.expect("connect"),
        &Identity::numbered(7201),
        Role::Destination { cookie: wrong },
        &VmOptions {
            timeout: Duration::from_millis(500),
            ..VmOptions::default()
        },
    );
    assert!(
        stray.wait_ready().await.is_err(),
        "a wrong cookie was answered"
    );
    let dest = SimVm::connect_destination(d.proxy, &id, &cookie)
        .await
        .expect("PEER");
    dest.complete(&seq).await.expect("COMPLETE");
    let s = scrape_until(http, "the completed vMotion", |s| {
        value(s, "vspc_vmotions_total", &[("outcome", "complete")]) == Some(1.0)
    })
    .await;
    assert_eq!(
        must(&s, "vspc_vmotions_total", &[("outcome", "notnow")]),
        1.0
    );
    assert_eq!(
        must(&s, "vspc_vmotions_total", &[("outcome", "refused_peer")]),
        1.0
    );
    assert_eq!(
        must(&s, "vspc_vmotions_total", &[("outcome", "abort")]),
        0.0
    );
    assert_eq!(
        must(&s, "vspc_vmotions_total", &[("outcome", "timeout")]),
        0.0
    );
    assert_eq!(must(&s, "vspc_vmotion_goahead_seconds_count", &[]), 1.0);
    assert_eq!(must(&s, "vspc_vmotion_complete_seconds_count", &[]), 1.0);
    let buckets = s
        .samples
        .iter()
        .find(|x| x.metric == "vspc_vmotion_complete_seconds")
        .map(|x| x.value.clone());
    match buckets {
        Some(Value::Histogram(b)) => {
            let inf = b.iter().find(|c| c.less_than.is_infinite()).expect("+Inf");
            assert_eq!(inf.count, 1.0);
        }
        other => panic!("no complete-time histogram: {other:?}"),
    }

    // An ABORT on the new carrier counts too.
    let seq2 = [7u8, 2, 0, 1];
    assert!(matches!(
        dest.begin_vmotion(&seq2).await.expect("BEGIN"),
        VmotionReply::GoAhead { .. }
    ));
    dest.abort().await.expect("ABORT");
    let s = scrape_until(http, "the aborted vMotion", |s| {
        value(s, "vspc_vmotions_total", &[("outcome", "abort")]) == Some(1.0)
    })
    .await;
    assert_eq!(must(&s, "vspc_vmotion_goahead_seconds_count", &[]), 2.0);
    assert_eq!(must(&s, "vspc_vms_connected", &[]), 1.0);
    let one = get(http, &format!("/api/v1/vms/{}", id.name)).await;
    assert_eq!(one.json()["vm_connected"], true);
}

#[tokio::test]
async fn console_log_returns_the_tail_of_a_logging_transcript() {
    let dir = tempfile::tempdir().expect("tempdir");
    let logdir = dir.path().display().to_string();
    let (d, http) = daemon(&["--backend", "Logging", "-l", &logdir]);
    let id = Identity::numbered(7300);
    let (vm, _port) = vm_up(&d, &id).await;
    vm.send(b"first line\r\nsecond line\r\n")
        .await
        .expect("VM output");
    let whole = wait_for(T, "the transcript", async || {
        let r = get(http, &format!("/console_log/{}", hex32(&id))).await;
        if r.status == 200 && r.body.ends_with(b"second line\r\n") {
            Ok(r)
        } else {
            Err(format!("{} {}", r.status, r.text()))
        }
    })
    .await;
    assert_eq!(whole.body, b"first line\r\nsecond line\r\n");
    assert_eq!(
        whole.header("content-type"),
        Some("application/octet-stream")
    );
    // The last N bytes, with the uuid in the listing's spelling.
    let tail = get(
        http,
        &format!("/console_log/{}?bytes=13", id.uuid_display()),
    )
    .await;
    assert_eq!(tail.status, 200);
    assert_eq!(tail.body, b"second line\r\n");
    let bad = get(http, &format!("/console_log/{}?bytes=x", hex32(&id))).await;
    assert_eq!(bad.status, 400);
    assert!(bad.json()["error"].is_string());
    let unknown = get(http, "/console_log/00000000000000000000000000000000").await;
    assert_eq!(unknown.status, 404);
    assert!(unknown.json()["error"].is_string());
}

#[tokio::test]
async fn tokens_are_required_and_read_only_ones_cannot_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("tokens");
    write_token_file(
        &file,
        "# who may ask\nwrite-token-1234\nread-token-56789 ro  # dashboards\n",
    );
    let file = file.display().to_string();
    let (d, http) = daemon(&["--http-token-file", &file]);
    let id = Identity::numbered(7400);
    let (_vm, _port) = vm_up(&d, &id).await;

    // Health needs no token.
    assert_eq!(get(http, "/healthz").await.status, 200);
    for path in ["/metrics", "/api/v1/vms", "/api/v1/vms/no-such-vm"] {
        let r = request(http, "GET", path, None).await;
        assert_eq!(r.status, 401, "{path} without a token");
        assert!(r.json()["error"].is_string());
        assert_eq!(r.header("www-authenticate"), Some("Bearer"));
        let r = request(http, "GET", path, Some("wrong-token")).await;
        assert_eq!(r.status, 401, "{path} with a wrong token");
        assert!(r.json()["error"].is_string());
    }
    let r = request(http, "GET", "/api/v1/vms", Some("read-token-56789")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["vms"][0]["name"], id.name.as_str());
    let r = request(http, "GET", "/metrics", Some("write-token-1234")).await;
    assert_eq!(r.status, 200);
    // A known token still gets a 404 for an unknown VM.
    let r = request(
        http,
        "GET",
        "/api/v1/vms/no-such-vm",
        Some("read-token-56789"),
    )
    .await;
    assert_eq!(r.status, 404);

    let clear = format!("/api/v1/vms/{}/clear", id.name);
    let r = request(http, "POST", &clear, Some("read-token-56789")).await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(r.json()["error"]
        .as_str()
        .is_some_and(|e| e.contains("read-only")));
    let r = request(http, "POST", &clear, None).await;
    assert_eq!(r.status, 401);
    let r = request(http, "POST", &clear, Some("write-token-1234")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["cleared"], 0);
}

#[tokio::test]
async fn the_http_port_speaks_tls_with_http_cert() {
    let crt = cert_path("server.crt").display().to_string();
    let key = cert_path("server.key").display().to_string();
    let (_d, http) = daemon(&["--http-cert", &crt, "--http-key", &key]);
    let tls = tls_connect(http).await.expect("TLS handshake");
    let r = exchange(tls, http, "GET", "/healthz", None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    // Plain HTTP on the TLS port fails its handshake, and is counted.
    let mut plain = TcpStream::connect(http).await.expect("connect");
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(T, plain.read_to_end(&mut sink)).await;
    let counted = eventually_async(T, async || {
        let tls = tls_connect(http).await.expect("TLS handshake");
        let r = exchange(tls, http, "GET", "/metrics", None).await;
        assert_eq!(r.status, 200);
        let s = Scrape::parse(r.text().lines().map(|l| Ok(l.to_string()))).expect("parse");
        value(
            &s,
            "vspc_tls_handshake_failures_total",
            &[("listener", "http")],
        ) >= Some(1.0)
    })
    .await;
    assert!(counted, "the failed handshake was not counted");
}

#[test]
fn start_up_refuses_an_open_http_port_and_a_malformed_token_file() {
    let (proxy, admin, http) = (free_port(), free_port(), free_port());
    let ports = |extra: &[&str]| {
        let mut v: Vec<String> = [
            "--proxy-iface",
            "127.0.0.1",
            "--proxy-port",
            &proxy.to_string(),
            "--admin-port",
            &admin.to_string(),
            "--http-port",
            &http.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let run = |args: Vec<String>| {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        run_to_exit(&refs, Duration::from_secs(10))
    };

    let out = run(ports(&["--http-iface", "0.0.0.0"]));
    assert_eq!(out.status.and_then(|s| s.code()), Some(1), "{}", out.stderr);
    assert!(
        out.stderr.contains("0.0.0.0") && out.stderr.contains("--http-token-file"),
        "{}",
        out.stderr
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("tokens");
    write_token_file(&file, "good-token-0123456\n\ngood-token-2-0123456 admin\n");
    let path = file.display().to_string();
    let out = run(ports(&["--http-token-file", &path]));
    assert_eq!(out.status.and_then(|s| s.code()), Some(1), "{}", out.stderr);
    assert!(
        out.stderr.contains(&path) && out.stderr.contains("line 3"),
        "{}",
        out.stderr
    );
}

// ---------------------------------------------------------------------------
// Hardening (issue "Hardening").

/// A request written by hand: `method path`, the `Host` given, extra
/// header lines, and a body; the connection closes after the answer
/// (`Connection: close`, unless `extra` has a Connection line).
fn handmade(method: &str, path: &str, host: &str, extra: &[&str], body: &str) -> String {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n");
    if !extra
        .iter()
        .any(|l| l.to_ascii_lowercase().starts_with("connection:"))
    {
        req.push_str("Connection: close\r\n");
    }
    for line in extra {
        req.push_str(line);
        req.push_str("\r\n");
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    req
}

/// DNS rebinding: a name of the attacker's that resolves to this host
/// makes the attacker's page "same origin" with the daemon. Every request
/// whose Host is not an IP address, localhost or an `--http-host` name is
/// answered 421 before any route runs: the WebSocket upgrade (with an
/// Origin that matches its Host, as a rebound page sends it), the API,
/// `/console_log`, `/metrics`, the pages; and a request without Host.
#[tokio::test]
async fn requests_for_a_foreign_host_get_421_whatever_the_route() {
    let (_logs, d, http) = logging_daemon();
    let id = Identity::numbered(7500);
    let (vm, _port) = vm_up(&d, &id).await;
    vm.send(b"secret console output\r\n")
        .await
        .expect("VM output");
    let evil = format!("rebind.attacker.example:{}", http.port());
    let origin = format!("Origin: http://{evil}");
    let upgrade = [
        origin.as_str(),
        "Connection: close, Upgrade",
        "Upgrade: websocket",
        "Sec-WebSocket-Version: 13",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
    ];
    let console = format!("/api/v1/vms/{}/console?mode=write", id.name);
    let log = format!("/console_log/{}", hex32(&id));
    let with_origin = [origin.as_str()];
    let asks: Vec<(String, &[&str])> = vec![
        (console.clone(), &upgrade[..]),
        ("/api/v1/vms".into(), &with_origin[..]),
        (log.clone(), &with_origin[..]),
        ("/metrics".into(), &[][..]),
        ("/".into(), &[][..]),
        (format!("/vms/{}", id.name), &[][..]),
        ("/static/console.js".into(), &[][..]),
        ("/healthz".into(), &[][..]),
    ];
    for (path, extra) in &asks {
        let r = raw(http, &handmade("GET", path, &evil, extra, "")).await;
        assert_eq!(r.status, 421, "{path} for {evil}: {}", r.text());
        let e = r.json()["error"].as_str().unwrap_or("").to_string();
        assert!(
            e.contains("rebind.attacker.example") && e.contains("--http-host"),
            "{path}: {e}"
        );
        assert!(!r.text().contains("secret console output"), "{path}");
    }
    // The same with the name in an absolute request target.
    let r = raw(
        http,
        &format!(
            "GET http://{evil}/api/v1/vms HTTP/1.1\r\nHost: {http}\r\nConnection: close\r\n\r\n"
        ),
    )
    .await;
    assert_eq!(r.status, 421, "{}", r.text());
    // A POST that would clear the consoles.
    let clear = format!("/api/v1/vms/{}/clear", id.name);
    let r = raw(
        http,
        &handmade("POST", &clear, &evil, &[origin.as_str()], ""),
    )
    .await;
    assert_eq!(r.status, 421, "{}", r.text());
    // HTTP/1.0 without a Host.
    let r = raw(http, "GET /api/v1/vms HTTP/1.0\r\n\r\n").await;
    assert_eq!(r.status, 421, "{}", r.text());
    assert!(r.json()["error"]
        .as_str()
        .is_some_and(|e| e.contains("no Host")));

    // IP addresses and localhost are answered, with or without a port.
    let port = http.port();
    for host in [
        http.to_string(),
        "127.0.0.1".to_string(),
        format!("localhost:{port}"),
        "LOCALHOST".to_string(),
        format!("[::1]:{port}"),
    ] {
        let r = raw(http, &handmade("GET", "/api/v1/vms", &host, &[], "")).await;
        assert_eq!(r.status, 200, "Host {host}: {}", r.text());
    }
    let r = raw(http, &handmade("GET", &log, "127.0.0.1", &[], "")).await;
    assert_ne!(r.status, 421, "{}", r.text());

    // --http-host names a name of the server's own: then it is answered.
    let (_d2, http2) = daemon(&["--http-host", "rebind.attacker.example,other.example"]);
    let evil2 = format!("rebind.attacker.example:{}", http2.port());
    let r = raw(http2, &handmade("GET", "/api/v1/vms", &evil2, &[], "")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = raw(http2, &handmade("GET", "/", "Other.Example", &[], "")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = raw(http2, &handmade("GET", "/", "third.example", &[], "")).await;
    assert_eq!(r.status, 421, "{}", r.text());
}

/// A web page may POST a form anywhere (no CORS preflight): without a
/// token file, `POST .../clear` from another site cleared the consoles. A
/// request that changes state is refused (403) when its Origin is another
/// site, or when it carries a form's content type without `X-Vspc: 1`;
/// curl's POST (no Origin, no content type) still works.
#[tokio::test]
async fn cross_site_posts_are_refused_and_curl_still_clears() {
    let (d, http) = daemon(&[]);
    let id = Identity::numbered(7501);
    let (vm, port) = vm_up(&d, &id).await;
    let console = console_synced(&vm, &d, port).await;
    let clear = format!("/api/v1/vms/{}/clear", id.name);
    let host = http.to_string();
    let own = format!("Origin: http://{host}");
    let refused: Vec<(Vec<&str>, &str, &str)> = vec![
        (
            vec![
                "Origin: http://evil.example",
                "Content-Type: application/x-www-form-urlencoded",
            ],
            "x=1",
            "evil.example",
        ),
        (vec!["Origin: http://evil.example"], "", "evil.example"),
        (vec!["Origin: null"], "", "null"),
        (
            vec!["Origin: http://evil.example", "X-Vspc: 1"],
            "",
            "evil.example",
        ),
        (
            vec!["Content-Type: application/x-www-form-urlencoded"],
            "x=1",
            "application/x-www-form-urlencoded",
        ),
        (
            vec![own.as_str(), "Content-Type: text/plain;charset=UTF-8"],
            "x",
            "text/plain",
        ),
        (
            vec!["Content-Type: multipart/form-data; boundary=b"],
            "--b--\r\n",
            "multipart/form-data",
        ),
    ];
    for (extra, body, named) in &refused {
        let r = raw(http, &handmade("POST", &clear, &host, extra, body)).await;
        assert_eq!(r.status, 403, "{extra:?}: {}", r.text());
        let e = r.json()["error"].as_str().unwrap_or("").to_string();
        assert!(e.contains(named), "{extra:?}: {e}");
    }
    let row = request(http, "GET", &format!("/api/v1/vms/{}", id.name), None).await;
    assert_eq!(
        row.json()["consoles"],
        1,
        "a refused POST cleared the console"
    );

    // Allowed: the form type with X-Vspc: 1, this server's own Origin, curl.
    let r = raw(
        http,
        &handmade(
            "POST",
            &clear,
            &host,
            &[
                "Content-Type: application/x-www-form-urlencoded",
                "X-Vspc: 1",
            ],
            "x=1",
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["cleared"], 1, "{}", r.text());
    let (_, closed) = console.read_to_end(T).await;
    assert!(closed, "the allowed clear did not disconnect the console");
    let r = raw(
        http,
        &handmade(
            "POST",
            &clear,
            &host,
            &[own.as_str(), "Content-Type: application/json"],
            "{}",
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = request(http, "POST", &clear, None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.json()["cleared"].is_u64(), "{}", r.text());
}

/// Every answer says `X-Content-Type-Options: nosniff`; the pages and
/// their scripts and styles may not be framed (`X-Frame-Options: DENY`,
/// CSP `frame-ancestors 'none'`) and load nothing from elsewhere; the
/// list page has no inline script (the policy would block it).
#[tokio::test]
async fn every_answer_carries_the_security_headers() {
    let (d, http) = daemon(&[]);
    let id = Identity::numbered(7502);
    let (_vm, _port) = vm_up(&d, &id).await;
    let framed = [
        "/".to_string(),
        format!("/vms/{}", id.name),
        "/vms/no-such-vm".into(),
        "/static/xterm.js".into(),
        "/static/xterm.css".into(),
        "/static/console.js".into(),
        "/static/index.js".into(),
        "/static/vspc.css".into(),
    ];
    for path in &framed {
        let r = get(http, path).await;
        assert_eq!(
            r.header("x-content-type-options"),
            Some("nosniff"),
            "{path}"
        );
        assert_eq!(r.header("x-frame-options"), Some("DENY"), "{path}");
        let csp = r.header("content-security-policy").unwrap_or("");
        for part in [
            "default-src 'self'",
            "frame-ancestors 'none'",
            "base-uri 'none'",
            "form-action 'none'",
            &format!("connect-src 'self' ws://{http} wss://{http}"),
        ] {
            assert!(csp.contains(part), "{path}: {part} missing from {csp:?}");
        }
        assert!(!csp.contains("script-src 'self' 'unsafe-inline'"), "{csp}");
    }
    for path in [
        "/healthz",
        "/metrics",
        "/api/v1/vms",
        "/nowhere",
        "/api/v1/vms/nope",
    ] {
        let r = get(http, path).await;
        assert_eq!(
            r.header("x-content-type-options"),
            Some("nosniff"),
            "{path}"
        );
    }
    let r = raw(http, &handmade("GET", "/", "evil.example", &[], "")).await;
    assert_eq!(r.status, 421);
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    let html = get(http, "/").await.text();
    assert!(html.contains("<script src=\"/static/index.js\">"), "{html}");
    assert!(!html.contains("<script>"), "an inline script: {html}");
}

/// `/console_log` answers hold up to 16 MiB each until sent: only 4 at
/// once; a fifth gets 503 with Retry-After, and the slots come back when
/// the answers are done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_log_answers_four_at_once_and_503_past_that() {
    let (logs, d, http) = logging_daemon();
    let id = Identity::numbered(7503);
    let (vm, _port) = vm_up(&d, &id).await;
    // More than the socket buffers of a client that reads nothing hold.
    let size = 12 << 20;
    let out = XorShift::new(7503).bytes(size);
    for chunk in out.chunks(256 * 1024) {
        vm.send(chunk).await.expect("VM output");
    }
    let transcript = logs.path().join(format!("{}.log", id.name));
    assert!(
        eventually(Duration::from_secs(30), || file_len(&transcript)
            >= size as u64)
        .await,
        "the transcript never held the output"
    );
    let path = format!("/console_log/{}?bytes=16777216", hex32(&id));
    let ask = handmade("GET", &path, &http.to_string(), &[], "");
    // Four clients that read the status line, then nothing more.
    let mut stuck = Vec::new();
    for _ in 0..4 {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
        let mut s = socket.connect(http).await.expect("connect");
        s.write_all(ask.as_bytes()).await.expect("send");
        let mut first = [0u8; 12];
        tokio::time::timeout(Duration::from_secs(20), s.read_exact(&mut first))
            .await
            .expect("no answer")
            .expect("read");
        assert_eq!(
            &first,
            b"HTTP/1.1 200",
            "{:?}",
            String::from_utf8_lossy(&first)
        );
        stuck.push(s);
    }
    let r = raw(http, &ask).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.header("retry-after"), Some("1"));
    assert!(r.json()["error"]
        .as_str()
        .is_some_and(|e| e.contains("console_log")));
    // Other routes are not held up.
    assert_eq!(get(http, "/healthz").await.status, 200);
    drop(stuck);
    let tail = wait_for(T, "the slots back", async || {
        let r = raw(
            http,
            &handmade(
                "GET",
                &format!("/console_log/{}?bytes=10", hex32(&id)),
                &http.to_string(),
                &[],
                "",
            ),
        )
        .await;
        if r.status == 200 {
            return Ok(r.body);
        }
        assert_eq!(r.status, 503, "{}", r.text());
        Err("still 503".into())
    })
    .await;
    assert_eq!(tail, out[size - 10..]);
}

/// A client that sends half a header is disconnected after
/// `--http-header-timeout` (it was served after 70 s before), and never
/// answered.
#[tokio::test]
async fn a_half_sent_header_is_cut_off_after_the_header_timeout() {
    let (_d, http) = daemon(&["--http-header-timeout", "1"]);
    let mut s = TcpStream::connect(http).await.expect("connect");
    let started = Instant::now();
    s.write_all(format!("GET /healthz HTTP/1.1\r\nHost: {http}\r\nX-Slow: ").as_bytes())
        .await
        .expect("send half a header");
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got)).await;
    let took = started.elapsed();
    assert!(read.is_ok(), "the connection was still open after {took:?}");
    assert!(
        took >= Duration::from_millis(900),
        "closed too early: {took:?}"
    );
    assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
    // Finishing the header now gets nothing.
    let _ = s.write_all(b"x\r\n\r\n").await;
    let mut more = Vec::new();
    let _ = tokio::time::timeout(T, s.read_to_end(&mut more)).await;
    assert!(!String::from_utf8_lossy(&more).contains("200"), "{more:?}");
    // A whole request in time is answered.
    assert_eq!(get(http, "/healthz").await.status, 200);
}

/// `--http-max-connections`: past it a new connection is closed at once
/// (no answer) and counted; a closed connection frees its place.
#[tokio::test]
async fn connections_past_the_cap_are_closed_and_counted() {
    let (_d, http) = daemon(&["--http-max-connections", "3"]);
    // Three idle connections hold every place (the daemon has taken them
    // once a request on a fourth is refused).
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(TcpStream::connect(http).await.expect("connect"));
    }
    let ask = handmade("GET", "/healthz", &http.to_string(), &[], "");
    let s = TcpStream::connect(http).await.expect("the kernel accepts");
    let refused = send_raw(s, &ask).await;
    assert!(
        refused.is_err(),
        "a fourth connection was served: {}",
        refused.map(|r| r.status).unwrap_or(0)
    );
    // One goes: its place is free again.
    drop(idle.pop());
    let metrics = wait_for(T, "a place free again", async || {
        let s = TcpStream::connect(http).await.expect("connect");
        match send_raw(s, &handmade("GET", "/metrics", &http.to_string(), &[], "")).await {
            Ok(r) if r.status == 200 => Ok(r.text()),
            other => Err(format!("{:?}", other.map(|r| r.status))),
        }
    })
    .await;
    let s = Scrape::parse(metrics.lines().map(|l| Ok(l.to_string()))).expect("parse");
    assert!(
        value(&s, "vspc_http_connections_refused_total", &[]) >= Some(1.0),
        "{metrics}"
    );
    drop(idle);
}

/// Token files: a `#` inside a token is part of it (the review's
/// `a#verylongsecret rw name=ops` was the token `a`), a token shorter
/// than 16 characters stops start-up naming the file and line, a
/// group-writable file stops it, and a world-readable one is warned about.
#[tokio::test]
async fn token_files_keep_hashes_refuse_short_tokens_and_loose_modes() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("tokens");
    write_token_file(&file, "a#verylongsecret rw name=ops\n");
    let path = file.display().to_string();
    let (_d, http) = daemon(&["--http-token-file", &path]);
    let r = request(http, "GET", "/api/v1/vms", Some("a#verylongsecret")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = request(http, "GET", "/api/v1/vms", Some("a")).await;
    assert_eq!(r.status, 401, "the cut token was taken: {}", r.text());

    let (proxy, admin, port) = (free_port(), free_port(), free_port());
    let run = |extra: &[&str]| {
        let mut args = vec![
            "--proxy-iface".to_string(),
            "127.0.0.1".into(),
            "--proxy-port".into(),
            proxy.to_string(),
            "--admin-port".into(),
            admin.to_string(),
            "--http-port".into(),
            port.to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        run_to_exit(&refs, Duration::from_secs(10))
    };
    let short = dir.path().join("short");
    write_token_file(&short, "# the ops team\na #verylongsecret rw name=ops\n");
    let short = short.display().to_string();
    let out = run(&["--http-token-file", &short]);
    assert_eq!(out.status.and_then(|s| s.code()), Some(1), "{}", out.stderr);
    assert!(
        out.stderr.contains(&short) && out.stderr.contains("line 2") && out.stderr.contains("16"),
        "{}",
        out.stderr
    );

    let loose = dir.path().join("loose");
    write_token_file(&loose, "a-long-enough-token\n");
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o664)).expect("chmod");
    let loose_path = loose.display().to_string();
    let out = run(&["--http-token-file", &loose_path]);
    assert_eq!(out.status.and_then(|s| s.code()), Some(1), "{}", out.stderr);
    assert!(
        out.stderr.contains(&loose_path) && out.stderr.contains("group-writable"),
        "{}",
        out.stderr
    );

    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let (d, http) = daemon(&["--http-token-file", &loose_path]);
    assert!(
        d.wait_log("world-readable", T).await,
        "no warning: {}",
        d.log()
    );
    let warning = d
        .log()
        .lines()
        .find(|l| l.contains("world-readable"))
        .unwrap_or("")
        .to_string();
    assert!(
        warning.contains("WARN") && warning.contains(&loose_path),
        "{warning}"
    );
    let r = request(http, "GET", "/api/v1/vms", Some("a-long-enough-token")).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

/// A name two VMs have finds neither over HTTP: 409 with both uuids, for
/// the API, the clear and the console page; a uuid finds the real one.
#[tokio::test]
async fn an_ambiguous_name_gets_409_with_the_uuids() {
    let (d, http) = daemon(&[]);
    let real = Identity::numbered(1701);
    let mut impostor = Identity::numbered(1702);
    impostor.name = real.name.clone();
    let (_real_vm, _) = vm_up(&d, &real).await;
    let _impostor_vm = SimVm::connect(d.proxy, &impostor).await.expect("impostor");
    assert!(
        d.wait_log("claims the name of a connected VM", T).await,
        "{}",
        d.log()
    );
    for (method, path) in [
        ("GET", format!("/api/v1/vms/{}", real.name)),
        ("POST", format!("/api/v1/vms/{}/clear", real.name)),
        ("GET", format!("/vms/{}", real.name)),
    ] {
        let r = request(http, method, &path, None).await;
        assert_eq!(r.status, 409, "{method} {path}");
        let body = String::from_utf8_lossy(&r.body).into_owned();
        assert!(
            body.contains(&real.uuid_display()) && body.contains(&impostor.uuid_display()),
            "{method} {path}: {body}"
        );
    }
    let r = get(http, &format!("/api/v1/vms/{}", real.uuid_display())).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["uuid"], real.uuid_display());
}
