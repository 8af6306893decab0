//! The Debian package, end to end, on this machine: made with cargo-deb
//! from the binaries this test run built, installed with `dpkg -i`, checked
//! (files, the vspc user, the unit with `systemd-analyze verify` and
//! `security`), its unit's `ExecStart` run as the vspc user with a simulated
//! VM and console, then removed (configuration and state kept) and purged
//! (nothing left). It needs root, dpkg, systemd-analyze, setpriv and
//! cargo-deb (.ci/run installs them); without one it says so and skips.
//! It also skips when a vspc package is already installed, which it would
//! replace.
//!
//! Logrotate's rename-then-SIGHUP, with the packaged logrotate file, loses
//! no byte of a VM that writes throughout ([`logrotate_loses_no_byte`]).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use vspc_testkit::sim::Identity;

/// Only one of these tests touches the system's package database at once.
static DPKG: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn run(prog: &str, args: &[&str]) -> Output {
    Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"))
}

fn ok(prog: &str, args: &[&str]) -> String {
    let out = run(prog, args);
    assert!(
        out.status.success(),
        "{prog} {args:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn have(prog: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {prog}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn cargo() -> PathBuf {
    std::env::var_os("CARGO")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("cargo"))
}

/// Why this machine cannot run the package test, if it cannot.
fn cannot() -> Option<String> {
    if !run("id", &["-u"]).stdout.starts_with(b"0") {
        return Some("not root (dpkg -i needs root)".into());
    }
    for prog in ["dpkg", "systemd-analyze", "setpriv"] {
        if !have(prog) {
            return Some(format!("{prog} is not installed"));
        }
    }
    let deb = Command::new(cargo())
        .args(["deb", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !deb.is_ok_and(|s| s.success()) {
        return Some(
            "cargo-deb is not installed (cargo install cargo-deb --locked, as .ci/run does)".into(),
        );
    }
    if run("dpkg-query", &["-W", "-f=${Status}", "vspc"])
        .stdout
        .starts_with(b"install")
    {
        return Some("a vspc package is installed already; this test would replace it".into());
    }
    None
}

/// Purges the package when the test ends, however it ends.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = run("dpkg", &["--purge", "vspc"]);
    }
}

/// The .deb of the binaries this run built: cargo-deb is pointed at a
/// target directory whose `release/` holds copies of them, so no release
/// build is needed.
fn build_deb(work: &Path) -> PathBuf {
    let fake = work.join("target");
    let release = fake.join("release");
    std::fs::create_dir_all(&release).expect("mkdir");
    let built = Path::new(bin()).parent().expect("bin dir").to_path_buf();
    for name in ["vspc", "vspc-client"] {
        std::fs::copy(built.join(name), release.join(name))
            .unwrap_or_else(|e| panic!("copy {name}: {e}"));
    }
    let out_dir = work.join("out");
    std::fs::create_dir_all(&out_dir).expect("mkdir");
    let out = Command::new(cargo())
        .current_dir(repo_root())
        .env("CARGO_TARGET_DIR", &fake)
        .args(["deb", "-p", "vspc", "--no-build", "--fast", "--output"])
        .arg(&out_dir)
        .stdin(Stdio::null())
        .output()
        .expect("cargo deb runs");
    assert!(
        out.status.success(),
        "cargo deb failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deb = std::fs::read_dir(&out_dir)
        .expect("out dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .expect("a .deb");
    let name = deb.file_name().and_then(|n| n.to_str()).unwrap_or("");
    assert!(
        name.starts_with("vspc_") && name.ends_with("_amd64.deb"),
        "{name}"
    );
    deb
}

/// The unit's `ExecStart=` command line, split on spaces (it has no quotes).
fn exec_start(unit: &str) -> Vec<String> {
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("the unit has ExecStart=");
    line.split_whitespace().map(String::from).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deb_installs_runs_as_vspc_and_purges_clean() {
    if let Some(why) = cannot() {
        eprintln!("SKIPPED the_deb_installs_runs_as_vspc_and_purges_clean: {why}");
        return;
    }
    let _one = DPKG.lock().await;
    let work = tempfile::tempdir().expect("temp dir");
    let deb = build_deb(work.path());
    let deb_s = deb.to_str().expect("utf-8 path");

    let _purge = Installed;
    ok("dpkg", &["-i", deb_s]);

    // Files, where an operator looks for them.
    for f in [
        "/usr/bin/vspc",
        "/usr/bin/vspc-client",
        "/etc/vspc/vspc.toml",
        "/etc/logrotate.d/vspc",
        "/usr/lib/systemd/system/vspc.service",
        "/usr/share/man/man1/vspc.1",
        "/usr/share/man/man1/vspc-client.1",
        "/usr/share/man/man1/vspc-import.1",
        "/usr/share/bash-completion/completions/vspc",
        "/usr/share/zsh/vendor-completions/_vspc",
        "/usr/share/fish/vendor_completions.d/vspc.fish",
    ] {
        // cargo-deb gzips man pages.
        let gz = format!("{f}.gz");
        assert!(
            Path::new(f).is_file() || (f.contains("/man/") && Path::new(&gz).is_file()),
            "{f} is not installed"
        );
    }
    assert!(ok("dpkg-query", &["-W", "-f=${Conffiles}", "vspc"]).contains("/etc/vspc/vspc.toml"));
    assert!(!Path::new("/usr/bin/vspc-bench").exists());
    // The system user, without a login.
    let user = ok("getent", &["passwd", "vspc"]);
    assert!(user.trim_end().ends_with("/usr/sbin/nologin"), "{user}");
    let owner = ok(
        "stat",
        &["-c", "%U:%G %a", "/var/lib/vspc", "/var/log/vspc"],
    );
    assert_eq!(owner, "vspc:vspc 750\nvspc:vspc 750\n");

    // The unit: valid, and hardened.
    let unit_path = "/usr/lib/systemd/system/vspc.service";
    let verify = run("systemd-analyze", &["verify", unit_path]);
    let said = String::from_utf8_lossy(&verify.stderr);
    assert!(
        verify.status.success() && !said.contains("vspc.service:"),
        "systemd-analyze verify: {}\n{said}",
        verify.status
    );
    let security = run(
        "systemd-analyze",
        &["security", "--offline=true", unit_path],
    );
    let text = String::from_utf8_lossy(&security.stdout);
    let score = text
        .lines()
        .find_map(|l| l.split("Overall exposure level for vspc.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse::<f64>().ok());
    eprintln!("systemd-analyze security: exposure {score:?}");
    if let Some(score) = score {
        assert!(score <= 2.5, "exposure {score} is above 2.5:\n{text}");
    }
    assert_eq!(
        ok("/usr/bin/vspc", &["--check-config", "/etc/vspc/vspc.toml"]).trim(),
        "vspc: note: port map /var/lib/vspc/vspc-map.toml: not made yet\n\
         vspc: configuration OK (/etc/vspc/vspc.toml and the flags)"
    );

    // ExecStart as the vspc user, on test ports; then a VM and a console.
    let unit = std::fs::read_to_string(unit_path).expect("unit");
    let argv = exec_start(&unit);
    let (binary, rest) = argv.split_first().expect("a command");
    let mut args: Vec<&str> = rest.iter().map(String::as_str).collect();
    args.push("--no-http");
    let mut d = Daemon::builder()
        .binary(binary)
        .wrapped(&[
            "setpriv",
            "--reuid=vspc",
            "--regid=vspc",
            "--init-groups",
            "--",
        ])
        .args(&args)
        .start();
    let id = Identity::numbered(9100);
    let (vm, port) = vm_up(&d, &id).await;
    let console = console_synced(&vm, &d, port).await;
    vm.send(b"hello from the packaged daemon\r\n")
        .await
        .expect("VM writes");
    console
        .read_until(b"hello from the packaged daemon", T)
        .await
        .expect("the console gets the VM's output");
    // The File map, written by the vspc user under its state directory.
    let map = Path::new("/var/lib/vspc/vspc-map.toml");
    assert!(
        eventually(T, || std::fs::read_to_string(map)
            .is_ok_and(|t| t.contains(&id.uuid_display())))
        .await,
        "no map at {}",
        map.display()
    );
    assert_eq!(
        ok("stat", &["-c", "%U", "/var/lib/vspc/vspc-map.toml"]),
        "vspc\n"
    );
    drop(console);
    drop(vm);
    d.terminate(T).await.expect("vspc stops");

    // remove keeps /etc/vspc and /var/lib/vspc; purge keeps nothing.
    ok("dpkg", &["--remove", "vspc"]);
    assert!(!Path::new("/usr/bin/vspc").exists());
    assert!(Path::new("/etc/vspc/vspc.toml").exists());
    assert!(map.exists());
    ok("dpkg", &["--purge", "vspc"]);
    for gone in [
        "/etc/vspc",
        "/var/lib/vspc",
        "/var/log/vspc",
        "/etc/logrotate.d/vspc",
    ] {
        assert!(!Path::new(gone).exists(), "{gone} is left after purge");
    }
    assert!(!run("getent", &["passwd", "vspc"]).status.success());
    assert!(!run("getent", &["group", "vspc"]).status.success());
    assert!(!run("dpkg-query", &["-W", "vspc"]).status.success());
}

/// logrotate with the packaged file (paths and the HUP pointed at this
/// test's daemon) while a VM writes all the time: the rotated transcripts
/// and the new one together hold every byte, once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logrotate_loses_no_byte() {
    if !have("logrotate") {
        eprintln!(
            "SKIPPED logrotate_loses_no_byte: logrotate is not installed (.ci/run installs it)"
        );
        return;
    }
    let logs = tempfile::tempdir().expect("temp dir");
    let logdir = logs.path().to_str().expect("utf-8").to_string();
    let d = Daemon::builder()
        .args(&["--no-http", "--backend", "Logging", "-l", &logdir])
        .start();
    let id = Identity {
        name: "rotated".into(),
        ..Identity::numbered(9200)
    };
    let (vm, _port) = vm_up(&d, &id).await;

    let packaged = std::fs::read_to_string(repo_root().join("packaging/debian/vspc.logrotate"))
        .expect("packaged logrotate file");
    let conf = packaged
        .replace("/var/log/vspc/", &format!("{logdir}/"))
        .replace(
            "systemctl kill --signal=HUP --kill-whom=main vspc.service",
            &format!("kill -HUP {}", d.pid()),
        );
    assert!(
        conf.contains("kill -HUP"),
        "the postrotate line changed:\n{conf}"
    );
    let conf_path = logs.path().join("logrotate.conf");
    // logrotate refuses a config others may write; a temp dir's file is 0644.
    std::fs::write(&conf_path, conf).expect("write conf");
    let state = logs.path().join("logrotate.state");

    // The VM writes numbered lines while logrotate rotates three times.
    let writer = tokio::spawn(async move {
        let mut sent = Vec::new();
        for i in 0..3000u32 {
            let line = format!("line {i:05} of the transcript\n");
            vm.send(line.as_bytes()).await.expect("VM writes");
            sent.extend_from_slice(line.as_bytes());
            if i % 50 == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        (vm, sent)
    });
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let out = Command::new("logrotate")
            .arg("-f")
            .arg("-s")
            .arg(&state)
            .arg(&conf_path)
            .output()
            .expect("logrotate runs");
        assert!(
            out.status.success(),
            "logrotate: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let (_vm, sent) = writer.await.expect("writer");
    let current = logs.path().join("rotated.log");
    // Oldest first: .3.gz .. .2.gz (compressed), .1 (delaycompress), then
    // the live file, which fills up as the last bytes arrive.
    let deadline = Instant::now() + T;
    loop {
        let mut all = Vec::new();
        for n in (2..=8).rev() {
            let gz = logs.path().join(format!("rotated.log.{n}.gz"));
            if gz.exists() {
                let out = Command::new("gzip")
                    .arg("-dc")
                    .arg(&gz)
                    .output()
                    .expect("gzip");
                all.extend_from_slice(&out.stdout);
            }
        }
        if let Ok(b) = std::fs::read(logs.path().join("rotated.log.1")) {
            all.extend_from_slice(&b);
        }
        if let Ok(b) = std::fs::read(&current) {
            all.extend_from_slice(&b);
        }
        if all == sent {
            break;
        }
        if Instant::now() > deadline {
            let rotated = std::fs::read_dir(logs.path())
                .expect("dir")
                .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect::<Vec<_>>();
            panic!(
                "the transcripts hold {} bytes, the VM sent {} (files: {rotated:?})",
                all.len(),
                sent.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        logs.path().join("rotated.log.1").exists(),
        "nothing was rotated"
    );
}
