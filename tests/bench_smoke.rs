//! Smoke tests of the load tool: `vspc-bench attach` starts the real
//! daemon, attaches 20 simulated VMs with 2 consoles each and prints one
//! JSON line; `vspc-bench latency` times round trips through the daemon
//! and through the bare relay, both ways of probing.

use std::net::TcpListener;
use std::process::Command;

/// A base port P in 20000..30000 with P .. P+len all bindable now.
fn free_base(len: u16) -> u16 {
    loop {
        let mut b = [0u8; 2];
        getrandom::fill(&mut b).expect("getrandom");
        let base = 20000 + u16::from_le_bytes(b) % 10000;
        if (base..base + len).all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok()) {
            return base;
        }
    }
}

/// Run `vspc-bench MODE ARGS --base-port P` on free ports (`ports` of
/// them) and return its one JSON line.
fn bench(ports: u16, args: &[&str]) -> serde_json::Value {
    let mut last_stderr = String::new();
    for _attempt in 0..3 {
        let base = free_base(ports);
        let out = Command::new(env!("CARGO_BIN_EXE_vspc-bench"))
            .args(args)
            .args(["--base-port", &base.to_string()])
            .args(["--vspc", env!("CARGO_BIN_EXE_vspc")])
            .env_remove("SUPPORT_MULTI_CONSOLE")
            .env_remove("VM_CLIENT_LIMIT")
            .output()
            .expect("run vspc-bench");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if !out.status.success() && stderr.contains("is not free") {
            // Another test process took a port between our check and its.
            last_stderr = stderr;
            continue;
        }
        assert!(
            out.status.success(),
            "vspc-bench exited with {}; stderr:\n{stderr}",
            out.status
        );
        let stdout = String::from_utf8(out.stdout).expect("stdout is UTF-8");
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(lines.len(), 1, "expected one JSON line, got {stdout:?}");
        return serde_json::from_str(lines[0])
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", lines[0]));
    }
    panic!("ports kept being taken; last stderr:\n{last_stderr}");
}

#[test]
fn attach_20_vms_with_2_consoles_each() {
    let v = bench(2 + 20, &["attach", "--vms", "20", "--consoles", "2"]);
    assert_eq!(v["mode"], "attach", "{v}");
    assert_eq!(v["vms"], 20, "{v}");
    assert_eq!(v["consoles_per_vm"], 2, "{v}");
    let attach_s = v["attach_s"].as_f64().expect("attach_s is a number");
    assert!(attach_s > 0.0, "{v}");
    assert!(v["console_attach_s"].as_f64().is_some(), "{v}");
    let rss = v["rss_kib"].as_u64().expect("rss_kib is an integer");
    assert!(rss > 0, "{v}");
    // 20 VMs with 2 consoles: at least 20 VM sockets, 20 console
    // listeners and 40 console sockets.
    let fds = v["daemon_fds"].as_u64().expect("daemon_fds is an integer");
    assert!(fds >= 80, "{v}");
}

#[test]
fn latency_through_the_daemon_and_the_relay() {
    for probe in [&[][..], &["--busy-poll"][..]] {
        let mut args = vec![
            "latency",
            "--vms",
            "4",
            "--samples",
            "40",
            "--ramp-ms",
            "300",
        ];
        args.extend_from_slice(probe);
        let v = bench(2 + 4, &args);
        assert_eq!(v["mode"], "latency", "{v}");
        assert_eq!(v["busy_poll"], !probe.is_empty(), "{v}");
        assert_eq!(v["samples"], 40, "{v}");
        for key in ["p50_us", "p99_us", "relay_p50_us", "relay_p99_us"] {
            let us = v[key].as_u64().unwrap_or_else(|| panic!("{key}: {v}"));
            assert!(us > 0 && us < 1_000_000, "{key}: {v}");
        }
        assert!(v["p50_us"].as_u64() <= v["p99_us"].as_u64(), "{v}");
        // The three streaming VMs' bytes reached their consoles, verified,
        // through both servers.
        for key in ["bg_bytes_s", "relay_bg_bytes_s"] {
            let rate = v[key].as_f64().unwrap_or_else(|| panic!("{key}: {v}"));
            assert!(rate > 0.0, "{key}: {v}");
        }
    }
}
