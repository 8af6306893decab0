//! `vspc-bench burst --via ssh`: the burst to consoles that are the real
//! OpenSSH client logged in through the daemon's SSH front door.
//!
//! The daemon is started with `--ssh-port P+3` on 127.0.0.1 and a host key
//! and an authorized key made by `ssh-keygen` in a private temporary
//! directory (removed at the end). First `--logins` runs of
//! `ssh list@127.0.0.1` are timed from start to exit (the set-up of one
//! session). Then C `ssh VM@127.0.0.1` clients are started with stdout
//! piped as the console and stdin held open; once the daemon has logged
//! each session's start, the VM writes B bytes at full speed and every
//! client's stdout is checked byte for byte, in order (a skip notice is a
//! wrong byte here). Timed from the first byte written to the last
//! client's last byte. Every ssh is killed when the run ends, however it
//! ends; the daemon too.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::io::AsyncWriteExt;

use super::super::fanout::{attach_raw, peak_rss_kib};
use super::super::kinds::Kinds;
use super::super::stream::Pattern;
use super::super::{
    conclude, cpu_s, identity, round, runtime_with_signals, stopped, Failure, STEP_WAIT,
};
use super::{relay_phase, BurstArgs, Shape, IN_FLIGHT};

/// The daemon's log line for each console session that starts.
const SESSION_STARTED: &str = "audit: console session started";
/// A console's read buffer.
const READ_BUF: usize = 64 * 1024;
/// Most stderr kept per ssh client.
const STDERR_KEEP: usize = 4096;

/// The JSON line (fields in this order).
#[derive(Serialize)]
struct SshBurstReport {
    mode: &'static str,
    via: &'static str,
    bytes: u64,
    consoles: u32,
    chunk: u64,
    /// `ssh list@127.0.0.1` runs timed, start to exit, and the best and
    /// median of them.
    logins: u32,
    login_min_ms: f64,
    login_median_ms: f64,
    /// First byte written to the last client's last byte.
    vspc_s: f64,
    /// bytes × consoles / vspc_s.
    mib_s: f64,
    /// Per client: every byte, in order.
    verified: Vec<bool>,
    every_byte: bool,
    /// The daemon's CPU (user + system) over vspc_s, and per GiB delivered.
    daemon_cpu_s: f64,
    cpu_s_per_gib: f64,
    rss_peak_kib: u64,
    /// The ssh clients' CPU over the burst, all together.
    ssh_cpu_s: f64,
    bench_cpu_s: f64,
    /// The same burst to plain TCP consoles through the bare relay.
    relay_s: Option<f64>,
    relay_mib_s: Option<f64>,
    relay_cpu_s: Option<f64>,
    /// mib_s / relay_mib_s.
    ratio: Option<f64>,
}

/// What the burst through the daemon measured.
struct Measured {
    login_ms: Vec<f64>,
    secs: f64,
    verified: Vec<bool>,
    errors: Vec<String>,
    cpu_s: f64,
    rss_peak_kib: u64,
    ssh_cpu_s: f64,
    bench_cpu_s: f64,
}

pub(super) fn run(args: BurstArgs) -> Result<(), Failure> {
    if args.stuck > 0 || args.slow > 0 {
        return Err(Failure::from(
            "--via ssh measures fast consoles only: drop --stuck and --slow".to_string(),
        ));
    }
    let ssh = require("ssh")?;
    let keygen = require("ssh-keygen")?;
    let dir = KeyDir::new()?;
    let host_key = make_key(&keygen, &dir.0, "host_key")?;
    let user_key = make_key(&keygen, &dir.0, "bench")?;
    let public = std::fs::read_to_string(user_key.with_extension("pub"))
        .map_err(|e| format!("cannot read the public key made by ssh-keygen: {e}"))?;
    let keys = dir.0.join("authorized_keys");
    std::fs::write(&keys, public).map_err(|e| format!("cannot write {}: {e}", keys.display()))?;
    let ssh_port = args
        .daemon
        .base_port
        .checked_add(3)
        .ok_or_else(|| "--base-port too high".to_string())?;
    std::net::TcpListener::bind(("127.0.0.1", ssh_port)).map_err(|e| {
        format!("port {ssh_port} on 127.0.0.1 (P+3, the SSH port) is not free ({e})")
    })?;

    let (rt, stop) = runtime_with_signals()?;
    let port = ssh_port.to_string();
    let (host_key, keys) = (host_key.display().to_string(), keys.display().to_string());
    let flags = [
        "--ssh-port",
        &port,
        "--ssh-iface",
        "127.0.0.1",
        "--ssh-host-key",
        &host_key,
        "--ssh-authorized-keys",
        &keys,
    ];
    let (mut daemon, target) = args.daemon.start(1, &flags, &rt)?;
    let log = daemon.process().log_path().map(Path::to_path_buf);
    let client = Client {
        ssh,
        key: user_key,
        port: ssh_port,
    };
    let pattern = Arc::new(Pattern::new());
    let shape = Shape {
        total: args.bytes,
        chunk: usize::try_from(args.chunk).unwrap_or(usize::MAX),
        window: 0,
        stall: Duration::from_secs(args.stall_secs),
        deadline: None,
    };
    let result = (|| -> Result<Measured, Failure> {
        let mut vms = rt.block_on(async {
            tokio::select! {
                r = attach_raw(target, 1, 0, IN_FLIGHT, Kinds::speak_first()) => r.map(|(vms, _)| vms).map_err(Failure::from),
                _ = stopped(stop.clone()) => Err(Failure::Interrupted),
            }
        })?;
        let mut vm = vms
            .pop()
            .ok_or_else(|| "internal error: no VM stream".to_string())?;
        let name = identity(0).name;
        let login_ms = time_logins(&client, &name, args.logins, &stop)?;
        eprintln!("vspc-bench: starting {} ssh console(s)", args.consoles);
        let mut clients = Clients(Vec::new());
        for _ in 0..args.consoles {
            clients.0.push(client.console(&name)?);
        }
        wait_sessions(&mut clients, log.as_deref(), &stop)?;

        let (tx, rx) = mpsc::channel();
        let verified_bytes = Arc::new(AtomicU64::new(0));
        for (i, c) in clients.0.iter_mut().enumerate() {
            let stdout = c
                .child
                .stdout
                .take()
                .ok_or_else(|| "internal error: no ssh stdout".to_string())?;
            let (tx, pattern, progress) = (tx.clone(), pattern.clone(), verified_bytes.clone());
            std::thread::spawn(move || {
                let _ = tx.send((i, verify(stdout, &pattern, args.bytes, &progress)));
            });
        }
        drop(tx);
        let (cpu0, bench0) = (cpu_s(target.pid)?, cpu_s(std::process::id())?);
        let ssh0: f64 = clients.cpu_s();
        let start = Instant::now();
        let writer = rt.spawn(async move {
            let mut sent = 0u64;
            while sent < shape.total {
                let len = shape
                    .chunk
                    .min(usize::try_from(shape.total - sent).unwrap_or(usize::MAX));
                vm.write_all(pattern.piece(0, sent, len))
                    .await
                    .map_err(|e| format!("the VM writing at byte {sent}: {e}"))?;
                sent += len as u64;
            }
            Ok::<_, String>(vm)
        });
        let mut ends: Vec<Option<Result<Instant, String>>> =
            (0..args.consoles).map(|_| None).collect();
        let (mut last, mut last_at) = (0, Instant::now());
        while ends.iter().any(Option::is_none) {
            if *stop.borrow() {
                return Err(Failure::Interrupted);
            }
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok((i, end)) => ends[i] = Some(end),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            let now = verified_bytes.load(Ordering::Relaxed);
            if now != last {
                (last, last_at) = (now, Instant::now());
            } else if last_at.elapsed() > shape.stall {
                let msg = format!(
                    "no console verified a byte for {} s ({last} verified in all); ssh said: {}",
                    shape.stall.as_secs(),
                    clients.stderr()
                );
                return Err(msg.into());
            }
        }
        let finished = ends
            .iter()
            .filter_map(|e| e.as_ref()?.as_ref().ok())
            .max()
            .copied();
        let secs = finished.map_or(0.0, |t| t.duration_since(start).as_secs_f64());
        let (cpu, bench) = (
            cpu_s(target.pid)? - cpu0,
            cpu_s(std::process::id())? - bench0,
        );
        let ssh_cpu_s = clients.cpu_s() - ssh0;
        let vm = rt
            .block_on(writer)
            .map_err(|e| format!("the VM writer failed: {e}"))??;
        drop(vm);
        let rss_peak_kib = peak_rss_kib(target.pid)?;
        let mut errors = Vec::new();
        let verified = ends
            .into_iter()
            .enumerate()
            .map(|(i, e)| match e {
                Some(Ok(_)) => true,
                Some(Err(msg)) => {
                    errors.push(format!("ssh console {i}: {msg}"));
                    false
                }
                None => {
                    errors.push(format!("ssh console {i}: its reader went away"));
                    false
                }
            })
            .collect();
        if !errors.is_empty() {
            errors.push(format!("ssh said: {}", clients.stderr()));
        }
        Ok(Measured {
            login_ms,
            secs,
            verified,
            errors,
            cpu_s: cpu,
            rss_peak_kib,
            ssh_cpu_s,
            bench_cpu_s: bench,
        })
    })();
    let m = conclude(result, daemon.process())?;
    let fast = args.consoles;
    let mib = (args.bytes * u64::from(fast)) as f64 / f64::from(1 << 20);
    let mib_s = if m.secs > 0.0 { mib / m.secs } else { 0.0 };
    eprintln!(
        "vspc-bench: vspc via ssh: {mib_s:.1} MiB/s ({:.3} s)",
        m.secs
    );
    let relay = relay_phase(&args, &rt, &stop, shape, Arc::new(Pattern::new()))?;
    rt.shutdown_background();

    let mut sorted = m.login_ms.clone();
    sorted.sort_by(f64::total_cmp);
    let every_byte = m.verified.iter().all(|v| *v);
    let report = SshBurstReport {
        mode: "burst",
        via: "ssh",
        bytes: args.bytes,
        consoles: fast,
        chunk: args.chunk,
        logins: args.logins,
        login_min_ms: round(sorted.first().copied().unwrap_or(0.0), 1),
        login_median_ms: round(sorted.get(sorted.len() / 2).copied().unwrap_or(0.0), 1),
        vspc_s: round(m.secs, 3),
        mib_s: round(mib_s, 1),
        verified: m.verified,
        every_byte,
        daemon_cpu_s: round(m.cpu_s, 2),
        cpu_s_per_gib: round(m.cpu_s / (mib / 1024.0), 3),
        rss_peak_kib: m.rss_peak_kib,
        ssh_cpu_s: round(m.ssh_cpu_s, 2),
        bench_cpu_s: round(m.bench_cpu_s, 2),
        relay_s: relay.as_ref().map(|r| round(r.secs, 3)),
        relay_mib_s: relay.as_ref().map(|r| round(r.mib_s, 1)),
        relay_cpu_s: relay.as_ref().map(|r| round(r.cpu_s, 2)),
        ratio: relay.as_ref().map(|r| round(mib_s / r.mib_s, 3)),
    };
    let line =
        serde_json::to_string(&report).map_err(|e| format!("cannot format the report: {e}"))?;
    println!("{line}");
    if m.errors.is_empty() {
        Ok(())
    } else {
        Err(m.errors.join("\n  ").into())
    }
}

/// The path of `program` on PATH, or an error naming the package.
fn require(program: &str) -> Result<PathBuf, String> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .ok_or_else(|| {
            format!(
                "`{program}` is not on PATH, and --via ssh runs the real OpenSSH client: \
                 install the package openssh-client"
            )
        })
}

/// A private temporary directory for the keys, removed when dropped.
struct KeyDir(PathBuf);

impl KeyDir {
    fn new() -> Result<KeyDir, String> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir =
            std::env::temp_dir().join(format!("vspc-bench-ssh.{}.{nanos}", std::process::id()));
        std::fs::create_dir(&dir)
            .and_then(|()| std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)))
            .map_err(|e| format!("cannot make {}: {e}", dir.display()))?;
        Ok(KeyDir(dir))
    }
}

impl Drop for KeyDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An ed25519 key pair made by `ssh-keygen` as `dir/name`; its path.
fn make_key(keygen: &Path, dir: &Path, name: &str) -> Result<PathBuf, String> {
    let key = dir.join(name);
    let out = Command::new(keygen)
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&key)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", keygen.display()))?;
    if !out.status.success() {
        return Err(format!(
            "ssh-keygen failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(key)
}

/// How to run the OpenSSH client against the daemon.
struct Client {
    ssh: PathBuf,
    key: PathBuf,
    port: u16,
}

impl Client {
    /// `ssh -F /dev/null … -i KEY -p PORT user@127.0.0.1`: no config, no
    /// known hosts, never a prompt, only this key.
    fn command(&self, user: &str) -> Command {
        let mut cmd = Command::new(&self.ssh);
        cmd.args(["-F", "/dev/null"])
            .args(["-o", "StrictHostKeyChecking=no"])
            .args(["-o", "UserKnownHostsFile=/dev/null"])
            .args(["-o", "BatchMode=yes"])
            .args(["-o", "IdentitiesOnly=yes"])
            .args(["-o", "LogLevel=ERROR"])
            .arg("-i")
            .arg(&self.key)
            .args(["-p", &self.port.to_string()])
            .arg(format!("{user}@127.0.0.1"))
            .env_remove("SSH_AUTH_SOCK");
        cmd
    }

    /// A console on `vm`: stdout piped (the console), stdin held open,
    /// stderr kept.
    fn console(&self, vm: &str) -> Result<Console, String> {
        let mut child = self
            .command(vm)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.ssh.display()))?;
        let stdin = child.stdin.take();
        let stderr = Arc::new(Mutex::new(Vec::new()));
        if let Some(mut from) = child.stderr.take() {
            let into = stderr.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 1024];
                while let Ok(n @ 1..) = from.read(&mut buf) {
                    let mut kept = into.lock().unwrap_or_else(|e| e.into_inner());
                    if kept.len() < STDERR_KEEP {
                        kept.extend_from_slice(&buf[..n]);
                    }
                }
            });
        }
        Ok(Console {
            child,
            _stdin: stdin,
            stderr,
        })
    }
}

/// One `ssh VM@…` console.
struct Console {
    child: Child,
    /// Held open: the console's input, never written.
    _stdin: Option<ChildStdin>,
    stderr: Arc<Mutex<Vec<u8>>>,
}

/// The running consoles; each is killed and reaped when this is dropped.
struct Clients(Vec<Console>);

impl Clients {
    /// The clients' CPU so far, together.
    fn cpu_s(&self) -> f64 {
        self.0.iter().filter_map(|c| cpu_s(c.child.id()).ok()).sum()
    }

    /// What the clients said on stderr, one line.
    fn stderr(&self) -> String {
        let said: Vec<String> = self
            .0
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let text = c.stderr.lock().unwrap_or_else(|e| e.into_inner());
                format!("[{i}] {}", String::from_utf8_lossy(&text).trim())
            })
            .collect();
        said.join(" ")
    }
}

impl Drop for Clients {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.child.kill();
            let _ = c.child.wait();
        }
    }
}

/// Time `n` runs of `ssh list@127.0.0.1`, start to exit; each must list
/// `vm`. In milliseconds.
fn time_logins(
    client: &Client,
    vm: &str,
    n: u32,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> Result<Vec<f64>, Failure> {
    let mut ms = Vec::new();
    for _ in 0..n {
        if *stop.borrow() {
            return Err(Failure::Interrupted);
        }
        let started = Instant::now();
        let out = client
            .command("list")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot start {}: {e}", client.ssh.display()))?;
        ms.push(started.elapsed().as_secs_f64() * 1000.0);
        let listing = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || !listing.contains(vm) {
            return Err(Failure::from(format!(
                "`ssh list@127.0.0.1` exited with {} and listed {:?} (not {vm}): {}",
                out.status,
                listing.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
    }
    Ok(ms)
}

/// Wait until the daemon has logged a session start for every client (so
/// none misses the first bytes); an exited client is an error.
fn wait_sessions(
    clients: &mut Clients,
    log: Option<&Path>,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> Result<(), Failure> {
    let log = log.ok_or_else(|| "internal error: the daemon has no log file".to_string())?;
    let want = clients.0.len();
    let start = Instant::now();
    loop {
        if *stop.borrow() {
            return Err(Failure::Interrupted);
        }
        for (i, c) in clients.0.iter_mut().enumerate() {
            if let Ok(Some(status)) = c.child.try_wait() {
                std::thread::sleep(Duration::from_millis(50));
                let said = c.stderr.lock().unwrap_or_else(|e| e.into_inner()).clone();
                return Err(Failure::from(format!(
                    "ssh console {i} exited with {status} before the burst: {}",
                    String::from_utf8_lossy(&said).trim()
                )));
            }
        }
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let started = text.matches(SESSION_STARTED).count();
        if started >= want {
            return Ok(());
        }
        if start.elapsed() > STEP_WAIT {
            return Err(Failure::from(format!(
                "the daemon logged {started} of {want} SSH console sessions started within {} s; \
                 ssh said: {}",
                STEP_WAIT.as_secs(),
                clients.stderr()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Read `total` bytes from an ssh client's stdout, each checked against
/// the VM's pattern in order; when the last arrived.
fn verify(
    mut from: impl Read,
    pattern: &Pattern,
    total: u64,
    progress: &AtomicU64,
) -> Result<Instant, String> {
    let mut buf = vec![0u8; READ_BUF];
    let mut got = 0u64;
    while got < total {
        let n = match from.read(&mut buf) {
            Ok(0) => {
                return Err(format!(
                    "ssh closed its output after {got} of {total} bytes"
                ))
            }
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("reading ssh's output at byte {got}: {e}")),
        };
        let data = &buf[..n];
        if data.len() as u64 > total - got {
            return Err(format!(
                "{} bytes more than the {total} the VM wrote",
                data.len() as u64 - (total - got)
            ));
        }
        if let Some(at) = pattern.first_difference(0, got, data) {
            let show = &data[at..data.len().min(at + 48)];
            return Err(format!(
                "wrong byte at offset {}: got {:?}",
                got + at as u64,
                String::from_utf8_lossy(show)
            ));
        }
        got += n as u64;
        progress.fetch_add(n as u64, Ordering::Relaxed);
    }
    Ok(Instant::now())
}
