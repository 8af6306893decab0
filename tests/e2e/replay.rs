//! What the VM said before you came: every VM's replay ring
//! (`--replay-bytes`) shown first to the doors people use, never to a raw
//! client on a console port, kept across reconnects and vMotions, cut
//! cleanly, and `/api/v1/vms/{vm}/recent`. The browser and OpenSSH are in
//! `web.rs` and `ssh.rs` (their first bytes are the replay and its
//! marker).

use crate::admin::{native_connect, pickle_session, PickleAnswer, PySession};
use crate::client::Client;
use crate::common::*;
use crate::http::{daemon, get};
use vspc_testkit::sim::{Identity, SimConsole, SimVm};

/// Wait until the VM's ring (`/recent`) holds exactly `want`.
async fn ring_holds(http: std::net::SocketAddr, vm: &str, want: &[u8]) {
    let path = format!("/api/v1/vms/{vm}/recent");
    wait_for(T, "the ring to hold what the VM sent", async || {
        let got = get(http, &path).await.body;
        if got == want {
            Ok(())
        } else {
            Err(format!("it holds {} bytes, not {}", got.len(), want.len()))
        }
    })
    .await
}

/// A native admin session (as `vspc-client` opens) on `vm` shows `history`
/// then the marker first; returns the console.
async fn replayed_to_native(d: &Daemon, vm: &str, history: &[u8]) -> SimConsole {
    let (_, console) = native_connect(d, vm, None)
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"));
    let shown = [history, LIVE].concat();
    let got = console
        .read_exact_data(shown.len(), T)
        .await
        .expect("replay");
    assert_eq!(got, shown, "the replay, then the marker");
    console
}

const PANIC: &[u8] = b"Kernel panic - not syncing: VFS: Unable to mount root fs\r\n";

/// A daemon with the default (Memory) backend and the HTTP API, a VM that
/// printed [`PANIC`] with no console attached, and its console port.
async fn panicked(extra: &[&str], n: u32) -> (Daemon, std::net::SocketAddr, Identity, SimVm, u16) {
    let (d, http) = daemon(extra);
    let id = Identity::numbered(n);
    let (vm, port) = vm_up(&d, &id).await;
    vm.send(PANIC).await.expect("VM output");
    // Delivered to the (absent) consoles, so in the ring, when the
    // listing counts it.
    ring_holds(http, &id.name, PANIC).await;
    (d, http, id, vm, port)
}

#[tokio::test]
async fn the_admin_protocols_show_what_the_vm_printed_before_then_live_output() {
    let (d, _, id, vm, _) = panicked(&[], 9501).await;
    // The native protocol (vspc-client): history, the marker, then live.
    let (_, console) = native_connect(&d, &id.name, None)
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"));
    let want = [PANIC, LIVE].concat();
    let got = console
        .read_exact_data(want.len(), T)
        .await
        .expect("replay");
    assert_eq!(got, want);
    vm.send(b"still alive\r\n").await.expect("VM output");
    let live = console.read_exact_data(13, T).await.expect("live");
    assert_eq!(live, b"still alive\r\n");
    // vSPC.py's query protocol (vSPCClient): the history is the seed.
    match pickle_session(&d, &id.name, "free_for_all").await {
        PickleAnswer::Found { seed, .. } => assert_eq!(
            seed.as_bytes(),
            [PANIC, b"still alive\r\n"].concat(),
            "the seed is the ring"
        ),
        PickleAnswer::Other(status, rest) => panic!("pickle session: {status} {rest:?}"),
    }
}

#[tokio::test]
async fn console_ports_replay_only_to_telnet_clients_and_only_when_asked() {
    // By default no console-port client sees old bytes.
    let (d, _, _, vm, port) = panicked(&[], 9502).await;
    let telnet = SimConsole::connect(d.console(port)).await.expect("telnet");
    vm.send(b"new\r\n").await.expect("VM output");
    assert_eq!(
        telnet.read_exact_data(5, T).await.expect("live"),
        b"new\r\n"
    );
    drop((telnet, vm, d));

    // With --console-replay: a telnet client gets it; gdb (raw, speaks
    // first) and a silent raw client (nc) never do.
    let (d, _, _, vm, port) = panicked(&["--console-replay"], 9503).await;
    let telnet = SimConsole::connect(d.console(port)).await.expect("telnet");
    let want = [PANIC, LIVE].concat();
    assert_eq!(
        telnet.read_exact_data(want.len(), T).await.expect("replay"),
        want
    );
    let mut gdb = tokio::net::TcpStream::connect(d.console(port))
        .await
        .expect("gdb");
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    gdb.write_all(b"+$qSupported#37").await.expect("gdb writes");
    let mut nc = tokio::net::TcpStream::connect(d.console(port))
        .await
        .expect("nc");
    // gdb is decided raw at its first byte; nc after the detection window
    // and the unanswered offer.
    let typed = vm.read_exact_data(15, T).await.expect("gdb's bytes");
    assert_eq!(typed, b"+$qSupported#37");
    let mut offer = [0u8; 15];
    nc.read_exact(&mut offer).await.expect("the telnet offer");
    // Whether nc is decided raw (no answer to the offer) before or after
    // the VM speaks again, the history is not what it gets.
    vm.send(b"after\r\n").await.expect("VM output");
    for (who, s) in [("gdb", &mut gdb), ("nc", &mut nc)] {
        let mut got = [0u8; 7];
        s.read_exact(&mut got).await.expect("live output");
        assert_eq!(&got, b"after\r\n", "{who} saw old bytes");
    }
}

#[tokio::test]
async fn the_ring_survives_a_reconnect_and_a_vmotion() {
    let (d, http, id, vm, _) = panicked(&[], 9504).await;
    vm.close().await;
    let (vm2, _) = vm_up(&d, &id).await;
    vm2.send(b"rebooted\r\n").await.expect("VM output");
    let seq = [7, 7, 7, 7];
    let cookie = match vm2.begin_vmotion(&seq).await {
        Ok(vspc_testkit::sim::VmotionReply::GoAhead { cookie }) => cookie,
        other => panic!("BEGIN: {other:?}"),
    };
    let dst = SimVm::connect_destination(d.proxy, &id, &cookie)
        .await
        .expect("PEER");
    dst.complete(&seq).await.expect("COMPLETE");
    dst.send(b"moved\r\n").await.expect("VM output");
    let want = [PANIC, b"rebooted\r\n", b"moved\r\n"].concat();
    ring_holds(http, &id.name, &want).await;
    replayed_to_native(&d, &id.name, &want).await;
}

#[tokio::test]
async fn a_burst_leaves_exactly_the_last_bytes_cut_at_a_line() {
    let (d, http) = daemon(&["--replay-bytes", "1000"]);
    let id = Identity::numbered(9505);
    let (vm, _) = vm_up(&d, &id).await;
    // 1 MiB of numbered lines, every byte value inside them.
    let mut burst = Vec::new();
    let mut n = 0u32;
    while burst.len() < 1 << 20 {
        burst.extend_from_slice(format!("line {n} ").as_bytes());
        burst.extend((0u8..=255).filter(|&b| b != b'\n'));
        burst.extend_from_slice(b"\r\n");
        n += 1;
    }
    vm.send(&burst).await.expect("VM output");
    let last = &burst[burst.len() - 1000..];
    ring_holds(http, &id.name, last).await;
    // Shown from the first line break in it: no half line.
    let start = last.iter().position(|&b| b == b'\n').expect("a line break") + 1;
    replayed_to_native(&d, &id.name, &last[start..]).await;
}

#[tokio::test]
async fn replay_bytes_zero_keeps_todays_behaviour() {
    let (d, http, id, vm, _) = {
        let (d, http) = daemon(&["--replay-bytes", "0"]);
        let id = Identity::numbered(9506);
        let (vm, port) = vm_up(&d, &id).await;
        vm.send(PANIC).await.expect("VM output");
        (d, http, id, vm, port)
    };
    // The old output is delivered (to nobody) before the console comes:
    // otherwise it would be live output to it, rightly.
    let row = format!("/api/v1/vms/{}", id.name);
    let delivered = async || {
        let v: serde_json::Value =
            serde_json::from_str(&get(http, &row).await.text()).unwrap_or_default();
        v["bytes_from_vm"].as_u64() == Some(PANIC.len() as u64)
    };
    assert!(
        eventually_async(T, delivered).await,
        "the daemon never read the VM's output"
    );
    let (_, console) = native_connect(&d, &id.name, None)
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"));
    vm.send(b"live\r\n").await.expect("VM output");
    assert_eq!(
        console.read_exact_data(6, T).await.expect("live"),
        b"live\r\n"
    );
    let log = get(http, &format!("/console_log/{}", id.uuid_display())).await;
    assert_eq!(log.status, 404, "{}", log.text());
    let recent = get(http, &format!("/api/v1/vms/{}/recent", id.name)).await;
    assert_eq!(recent.status, 200);
    assert!(recent.body.is_empty());
}

#[tokio::test]
async fn vspc_client_and_a_vspc_py_client_show_it_first() {
    let (d, _, id, vm, _) = panicked(&[], 9507).await;
    // vspc-client VM (the native protocol), its output through a pipe.
    let mut c = Client::start(&d, &[&id.name]);
    let want = [PANIC, LIVE].concat();
    assert_eq!(c.wait_stdout(want.len(), T).await, want);
    vm.send(b"live\r\n").await.expect("VM output");
    let all = [&want[..], b"live\r\n"].concat();
    assert_eq!(c.wait_stdout(all.len(), T).await, all);
    c.close_stdin();
    assert_eq!(c.code(T).await, 0);
    // vSPC.py's query protocol as its vSPCClient speaks it
    // (tests/vspc_session.py): the seed is what the VM printed.
    let mut py = PySession::start(&d, &id.name, "free_for_all", 10, b"");
    assert_eq!(py.line("status=").await, "vm_found");
    py.line("mode=").await;
    let seed = [PANIC, b"live\r\n"].concat();
    assert_eq!(py.line("seed=").await, vspc_testkit::sim::hex(&seed));
}

/// `--replay-bytes` out of its range (0 to 64 MiB) or not a number stops
/// the daemon before it starts, naming the flag and the range.
#[test]
fn a_replay_size_out_of_range_is_refused_naming_the_flag() {
    for bad in ["67108865", "-1", "16k", "18446744073709551616"] {
        let out = std::process::Command::new(vspc_testkit::bin())
            .args(["--replay-bytes", bad, "--check-config"])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run vspc");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{bad}: {err}");
        assert!(err.contains("flag --replay-bytes"), "{bad}: {err}");
        assert!(err.contains(bad), "{bad}: the value is not named: {err}");
    }
    let out = std::process::Command::new(vspc_testkit::bin())
        .args(["--replay-bytes", "67108864", "--check-config"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run vspc");
    assert!(
        out.status.success(),
        "64 MiB is allowed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
