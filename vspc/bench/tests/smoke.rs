//! Smoke tests of the load tool: `vspc-bench attach` starts the real
//! daemon, attaches 20 simulated VMs with 2 consoles each, times three
//! scrapes of /metrics and prints one JSON line; `vspc-bench vmotion`
//! vMotions 5 streaming VMs 20 times a second with every byte checked;
//! `vspc-bench latency` times round trips through the daemon
//! and through the bare relay, both ways of probing; `vspc-bench burst`
//! sends 8 MiB at full speed to two reading consoles and one that does not
//! read; `vspc-bench burst --via ssh` sends 4 MiB to one real OpenSSH
//! client (Debian's openssh-client) through the SSH front door and times
//! three `list@` logins; `vspc-bench fanout --logging` checks the Logging backend's
//! transcripts byte for byte; `vspc-bench fanout --console-kind` runs each
//! kind of console client (speak-first, silent-telnet, silent-raw, mixed),
//! also against `--console-protocol raw` and `telnet`, and refuses a
//! silent raw reader on a telnet-only daemon; `vspc-bench cluster --scale`
//! lists 30 VMs of two nodes from one, and `cluster --failover` times a
//! console on a surviving node flowing again after its VM's node is killed.

use std::process::Command;

/// Run `vspc-bench MODE ARGS --base-port P` on free ports (`ports` of
/// them) and return its one JSON line.
fn bench(ports: u16, args: &[&str]) -> serde_json::Value {
    let mut last_stderr = String::new();
    for _attempt in 0..3 {
        let base = vspc_testkit::free_range(ports);
        let out = Command::new(env!("CARGO_BIN_EXE_vspc-bench"))
            .args(args)
            .args(["--base-port", &base.to_string()])
            .args(["--vspc", vspc_testkit::bin()])
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
    // Proxy, admin, 20 console ports and the HTTP port.
    let v = bench(
        2 + 20 + 1,
        &["attach", "--vms", "20", "--consoles", "2", "--scrape", "3"],
    );
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
    assert_eq!(v["scrapes"], 3, "{v}");
    let p50 = v["scrape_p50_ms"].as_f64().expect("scrape_p50_ms");
    let max = v["scrape_max_ms"].as_f64().expect("scrape_max_ms");
    assert!(p50 > 0.0 && p50 <= max, "{v}");
    assert!(v["scrape_bytes"].as_u64().is_some_and(|b| b > 100), "{v}");
}

#[test]
fn vmotions_at_a_rate_with_every_byte_checked() {
    // Proxy, admin, 5 console ports and the HTTP port.
    let v = bench(
        2 + 5 + 1,
        &["vmotion", "--vms", "5", "--rate", "20", "--duration", "2"],
    );
    assert_eq!(v["mode"], "vmotion", "{v}");
    assert_eq!(v["vms"], 5, "{v}");
    // 20 a second for 2 s, every one a whole hand-over.
    assert_eq!(v["vmotions_attempted"], 40, "{v}");
    assert_eq!(v["vmotions_completed"], 40, "{v}");
    assert_eq!(v["vmotions_failed"], 0, "{v}");
    // The daemon counted them too.
    assert_eq!(v["daemon_vmotions_completed"], 40, "{v}");
    assert_eq!(v["errors"], 0, "{v}");
    assert!(v["vmotions_per_s"].as_f64().is_some_and(|r| r > 0.0), "{v}");
    // 5 VMs at 10 KiB/s for about 2 s, checked on their consoles.
    let verified = v["bytes_verified"].as_u64().expect("bytes_verified");
    assert!(verified >= 50_000, "{v}");
    for what in ["goahead", "peer_ok"] {
        let ms = |q: &str| {
            let key = format!("{what}_{q}_ms");
            v[&key].as_f64().unwrap_or_else(|| panic!("{key}: {v}"))
        };
        assert!(ms("p50") > 0.0, "{what}: {v}");
        assert!(
            ms("p50") <= ms("p99") && ms("p99") <= ms("max"),
            "{what}: {v}"
        );
    }
    assert!(
        v["daemon_rss_peak_kib"].as_u64().is_some_and(|k| k > 0),
        "{v}"
    );
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

#[test]
fn burst_to_two_consoles_past_a_stuck_one() {
    let v = bench(
        2 + 1,
        &[
            "burst",
            "--bytes",
            "8388608",
            "--consoles",
            "2",
            "--stuck",
            "1",
        ],
    );
    assert_eq!(v["mode"], "burst", "{v}");
    assert_eq!(v["bytes"], 8_388_608, "{v}");
    assert_eq!(v["consoles"], 2, "{v}");
    assert_eq!(v["stuck"], 1, "{v}");
    // Both reading consoles got every byte, in order.
    assert_eq!(v["verified"], serde_json::json!([true, true]), "{v}");
    assert_eq!(v["every_byte"], true, "{v}");
    for key in ["mib_s", "relay_mib_s", "ratio"] {
        let x = v[key].as_f64().unwrap_or_else(|| panic!("{key}: {v}"));
        assert!(x > 0.0, "{key}: {v}");
    }
    assert!(v["rss_peak_kib"].as_u64().is_some_and(|k| k > 0), "{v}");
    // The stuck console was kept: once it read, what it got and what the
    // daemon said it skipped add up to the whole burst, in order.
    let stuck = &v["stuck_consoles"][0];
    assert_eq!(stuck["verified"], true, "{v}");
    assert_eq!(stuck["connected"], true, "{v}");
    let (got, skipped) = (stuck["received"].as_u64(), stuck["skipped"].as_u64());
    assert_eq!(got.zip(skipped).map(|(g, s)| g + s), Some(8_388_608), "{v}");
}

#[test]
fn burst_via_ssh_to_one_openssh_client() {
    // Proxy, admin, one console port and the SSH port (P+3).
    let v = bench(
        2 + 1 + 1,
        &[
            "burst",
            "--via",
            "ssh",
            "--bytes",
            "4194304",
            "--consoles",
            "1",
            "--logins",
            "3",
        ],
    );
    assert_eq!(v["mode"], "burst", "{v}");
    assert_eq!(v["via"], "ssh", "{v}");
    assert_eq!(v["bytes"], 4_194_304, "{v}");
    assert_eq!(v["consoles"], 1, "{v}");
    assert_eq!(v["verified"], serde_json::json!([true]), "{v}");
    assert_eq!(v["every_byte"], true, "{v}");
    assert_eq!(v["logins"], 3, "{v}");
    let min = v["login_min_ms"].as_f64().expect("login_min_ms");
    let median = v["login_median_ms"].as_f64().expect("login_median_ms");
    assert!(min > 0.0 && min <= median, "{v}");
    for key in ["mib_s", "relay_mib_s", "ratio"] {
        let x = v[key].as_f64().unwrap_or_else(|| panic!("{key}: {v}"));
        assert!(x > 0.0, "{key}: {v}");
    }
}

#[test]
fn fanout_with_transcripts() {
    // Transcripts on the target directory's disk, in a directory of this
    // test's own; the bench removes its subdirectory when done.
    let parent = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("bench-smoke-logging.{}", std::process::id()));
    std::fs::create_dir_all(&parent).expect("create the transcript parent");
    let dir = parent.to_str().expect("UTF-8 path");
    let v = bench(
        2 + 4,
        &[
            "fanout",
            "--vms",
            "4",
            "--consoles",
            "2",
            "--bytes-per-vm",
            "1000000",
            "--logging",
            "--logging-dir",
            dir,
        ],
    );
    assert_eq!(v["mode"], "fanout", "{v}");
    assert_eq!(v["window"], 0, "{v}");
    assert_eq!(v["skipped_consoles"], 0, "{v}");
    assert_eq!(v["transcripts_complete"], "4 of 4", "{v}");
    assert_eq!(v["logging_skipped_bytes"], 0, "{v}");
    for key in [
        "vspc_mib_s",
        "logging_mib_s",
        "logging_ratio",
        "relay_mib_s",
    ] {
        let x = v[key].as_f64().unwrap_or_else(|| panic!("{key}: {v}"));
        assert!(x > 0.0, "{key}: {v}");
    }
    assert!(
        v["logging_rss_peak_kib"].as_u64().is_some_and(|k| k > 0),
        "{v}"
    );
    let left: Vec<_> = std::fs::read_dir(&parent)
        .expect("list the transcript parent")
        .collect();
    assert!(left.is_empty(), "transcripts left behind: {left:?}");
    let _ = std::fs::remove_dir(&parent);
}

/// One small fan-out of `fanout_with_every_console_kind`.
struct KindRun {
    vms: u16,
    consoles: u16,
    /// More flags.
    extra: &'static [&'static str],
    /// The consoles of each kind, all of which must get every byte.
    kinds: &'static [(&'static str, u64)],
}

#[test]
fn fanout_with_every_console_kind() {
    let runs = [
        KindRun {
            vms: 3,
            consoles: 1,
            extra: &["--console-kind", "speak-first"],
            kinds: &[("speak-first", 3)],
        },
        KindRun {
            vms: 3,
            consoles: 1,
            extra: &["--console-kind", "silent-telnet"],
            kinds: &[("silent-telnet", 3)],
        },
        KindRun {
            vms: 3,
            consoles: 1,
            extra: &["--console-kind", "silent-raw"],
            kinds: &[("silent-raw", 3)],
        },
        // One VM with all three kinds (the default).
        KindRun {
            vms: 1,
            consoles: 3,
            extra: &[],
            kinds: &[("speak-first", 1), ("silent-telnet", 1), ("silent-raw", 1)],
        },
        // No offer on a raw-only daemon; a telnet-only one negotiates at
        // once with a client that waits for it; 0xFF on both legs.
        KindRun {
            vms: 3,
            consoles: 1,
            extra: &[
                "--console-kind",
                "silent-raw",
                "--daemon-arg=--console-protocol=raw",
                "--pattern",
                "all-bytes",
            ],
            kinds: &[("silent-raw", 3)],
        },
        KindRun {
            vms: 3,
            consoles: 1,
            extra: &[
                "--console-kind",
                "silent-telnet",
                "--daemon-arg=--console-protocol=telnet",
                "--pattern",
                "all-bytes",
            ],
            kinds: &[("silent-telnet", 3)],
        },
    ];
    for run in runs {
        let (vms, consoles) = (run.vms.to_string(), run.consoles.to_string());
        let mut args = vec![
            "fanout",
            "--vms",
            &vms,
            "--consoles",
            &consoles,
            "--bytes-per-vm",
            "1048576",
        ];
        args.extend_from_slice(run.extra);
        let v = bench(2 + run.vms, &args);
        let what = format!("{args:?}: {v}");
        let kind = run
            .extra
            .iter()
            .position(|a| *a == "--console-kind")
            .and_then(|i| run.extra.get(i + 1))
            .map_or("mixed", |k| *k);
        assert_eq!(v["console_kind"], kind, "{what}");
        let want: serde_json::Map<String, serde_json::Value> = run
            .kinds
            .iter()
            .map(|&(k, c)| (k.to_string(), c.into()))
            .collect();
        let want = serde_json::Value::Object(want);
        assert_eq!(v["consoles_by_kind"], want, "{what}");
        assert_eq!(v["exact_by_kind"], want, "{what}");
        assert_eq!(v["skipped_consoles"], 0, "{what}");
        assert!(v["relay_s"].as_f64().is_some_and(|s| s > 0.0), "{what}");
    }
}

#[test]
fn a_silent_raw_reader_on_a_telnet_only_daemon_is_refused() {
    for kind in ["silent-raw", "mixed"] {
        let out = Command::new(env!("CARGO_BIN_EXE_vspc-bench"))
            .args(["fanout", "--vms", "1", "--bytes-per-vm", "1000"])
            .args(["--console-kind", kind])
            .arg("--daemon-arg=--console-protocol=telnet")
            .args(["--vspc", vspc_testkit::bin()])
            .output()
            .expect("run vspc-bench");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{kind}: {stderr}");
        assert!(out.stdout.is_empty(), "{kind}: no report expected");
        assert!(
            stderr.contains(&format!(
                "--console-kind {kind} cannot run against --console-protocol=telnet"
            )),
            "{kind}: {stderr}"
        );
    }
}

#[test]
fn cluster_scale_lists_every_vm_of_two_nodes_from_one() {
    let v = bench(200, &["cluster", "--nodes", "2", "--scale", "30"]);
    assert_eq!(v["mode"], "cluster-scale", "{v}");
    assert_eq!(v["vms"], 30, "{v}");
    let fds = v["nodes_end"].as_array().expect("nodes_end");
    assert_eq!(fds.len(), 2, "{v}");
    // Every node listens on all 30 console ports.
    assert!(fds.iter().all(|n| n["fds"].as_u64() >= Some(30)), "{v}");
}

#[test]
fn cluster_failover_times_a_console_flowing_again_after_a_kill() {
    let v = bench(200, &["cluster", "--failover", "1"]);
    assert_eq!(v["mode"], "cluster-failover", "{v}");
    assert_eq!(v["trials"], 1, "{v}");
    let flowing = v["flowing_ms"].as_array().expect("flowing_ms");
    assert_eq!(flowing.len(), 1, "{v}");
    // After the VM reconnected, and within the wait for a new holder.
    let ms = flowing[0].as_f64().expect("a number");
    let reconnected = v["reconnected_p50_ms"].as_f64().expect("a number");
    assert!(ms >= reconnected && ms < 10_000.0, "{v}");
}
