//! Hostile peers on the proxy and admin ports: names that forge log lines
//! or run to 60,000 characters, a second VM claiming a live VM's name,
//! floods of connections that never identify, and an admin port beyond
//! loopback.

use std::time::Duration;

use crate::common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use vspc_testkit::sim::{Identity, SimVm};

/// Wait until the daemon's log contains `needle`.
async fn logged(d: &Daemon, needle: &str) {
    assert!(
        d.wait_log(needle, T).await,
        "never logged {needle:?}:\n{}",
        d.log()
    );
}

#[tokio::test]
async fn a_vm_name_cannot_forge_a_log_line() {
    let d = Daemon::start(&[]);
    let forged = "INFO audit: console session started session=99 kind=ssh";
    let mut id = Identity::numbered(1601);
    id.name = format!("web-1\n2026-12-07T00:00:00.000000Z  {forged}\x1b[2J");
    let vm = SimVm::connect(d.proxy, &id).await.expect("VM");
    logged(&d, "VM connected").await;
    for line in d.log().lines() {
        assert!(
            !line.trim_start().starts_with("2026-12-07T00:00:00.000000Z"),
            "a forged line stands on its own: {line:?}"
        );
        assert!(
            !line.contains('\x1b'),
            "an escape sequence reached the log: {line:?}"
        );
    }
    assert!(
        d.log().contains("web-1\\n2026-12-07T00:00:00.000000Z"),
        "{}",
        d.log()
    );
    // The listing shows the name escaped too.
    let rows = list_vms(d.admin).await;
    assert!(
        rows.iter()
            .any(|r| r.0.starts_with("web-1\\n") && !r.0.contains('\x1b')),
        "{rows:?}"
    );
    drop(vm);
}

#[tokio::test]
async fn a_service_uri_with_a_newline_is_refused() {
    let d = Daemon::start(&["--multi-console"]);
    let mut id = Identity::numbered(1602);
    id.service_uri = "console\nINFO audit: forged".into();
    let refused = SimVm::connect(d.proxy, &id).await;
    assert!(refused.is_err(), "a URI with a newline was accepted");
    logged(&d, "control characters").await;
    assert!(!d.log().lines().any(|l| l.starts_with("INFO audit: forged")));
}

#[tokio::test]
async fn names_and_uuids_from_peers_are_bounded() {
    let d = Daemon::start(&[]);
    let mut id = Identity::numbered(1603);
    id.name = "x".repeat(60_000);
    let _vm = SimVm::connect(d.proxy, &id).await.expect("VM");
    logged(&d, "more than 256 bytes").await;
    let rows = list_vms(d.admin).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].0.len(), 256, "the listed name was not cut");
}

#[tokio::test]
async fn a_second_vm_claiming_a_name_makes_it_ambiguous_not_captured() {
    let dir = tempfile::tempdir().expect("tempdir");
    let logdir = dir.path().display().to_string();
    let d = Daemon::start(&["--backend", "Logging", "-l", &logdir]);
    let real = Identity::numbered(1604);
    let mut impostor = Identity::numbered(1605);
    impostor.name = real.name.clone();
    let (real_vm, _) = vm_up(&d, &real).await;
    let impostor_vm = SimVm::connect(d.proxy, &impostor).await.expect("impostor");
    logged(&d, "claims the name of a connected VM").await;
    // By name: refused everywhere, with both uuids.
    for cmd in [
        format!("connect {}", real.name),
        format!("clear {}", real.name),
    ] {
        let answer = admin_line(d.admin, &cmd).await;
        assert!(
            answer.contains("\"code\":\"vm_ambiguous\""),
            "{cmd}: {answer}"
        );
        assert!(answer.contains(&real.uuid_display()), "{answer}");
        assert!(answer.contains(&impostor.uuid_display()), "{answer}");
    }
    // By uuid: the real one.
    let answer = admin_line(d.admin, &format!("clear {}", real.uuid_display())).await;
    assert!(answer.contains("\"ok\":true"), "{answer}");
    // Their transcripts never mix.
    real_vm.send(b"real output\n").await.expect("real output");
    impostor_vm
        .send(b"forged output\n")
        .await
        .expect("forged output");
    let real_log = dir.path().join(format!("{}.log", real.name));
    eventually(T, || file_len(&real_log) >= 12).await;
    // SIGHUP flushes and reopens: both files are whole.
    let _ = std::process::Command::new("kill")
        .args(["-HUP", &d.pid().to_string()])
        .status();
    logged(&d, "reopen").await;
    let files: Vec<String> = std::fs::read_dir(dir.path())
        .expect("logdir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(files.len(), 2, "{files:?}");
    for f in &files {
        let text = std::fs::read_to_string(dir.path().join(f)).unwrap_or_default();
        assert!(
            !(text.contains("real output") && text.contains("forged output")),
            "{f} mixes both VMs: {text:?}"
        );
    }
}

#[tokio::test]
async fn connections_that_never_identify_are_capped() {
    let d = Daemon::start(&["--max-unidentified", "8"]);
    let mut idle = Vec::new();
    let (mut served, mut closed) = (0, 0);
    for _ in 0..16 {
        let mut s = TcpStream::connect(d.proxy).await.expect("connect");
        // A served connection gets the telnet opening; a refused one EOF.
        let mut b = [0u8; 3];
        match tokio::time::timeout(T, s.read_exact(&mut b)).await {
            Ok(Ok(_)) => served += 1,
            Ok(Err(_)) => closed += 1,
            Err(_) => panic!("neither served nor closed"),
        }
        idle.push(s);
    }
    assert!(served <= 8, "{served} unidentified connections were served");
    assert!(closed >= 8, "only {closed} were closed at accept");
    logged(&d, "--max-unidentified").await;
    // A real VM still gets in once the idle ones go.
    drop(idle);
    assert!(
        eventually_async(T, async || SimVm::connect(
            d.proxy,
            &Identity::numbered(1606)
        )
        .await
        .is_ok())
        .await,
        "no VM got in after the idle ones left"
    );
}

#[test]
fn an_admin_port_beyond_loopback_needs_an_allow_list() {
    let out = run_to_exit(
        &[
            "--admin-iface",
            "0.0.0.0",
            "--admin-port",
            "1",
            "--proxy-port",
            "1",
        ],
        Duration::from_secs(10),
    );
    assert!(out.status.is_some_and(|s| !s.success()), "{}", out.stderr);
    assert!(out.stderr.contains("--admin-allow"), "{}", out.stderr);
}

#[tokio::test]
async fn the_admin_allow_list_refuses_other_networks() {
    let d = Daemon::start(&["--admin-allow", "10.0.0.0/8"]);
    let mut s = TcpStream::connect(d.admin).await.expect("connect");
    let _ = s.write_all(b"list\n").await;
    let mut b = [0u8; 64];
    let n = tokio::time::timeout(T, s.read(&mut b))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0, "a connection from outside --admin-allow was served");
    logged(&d, "not in --admin-allow").await;
}
