//! The SSH front door, end to end: the real daemon with `--ssh-port`,
//! simulated VMs, and OpenSSH's own client (`ssh`, and `ssh-keygen` for the
//! keys; Debian's `openssh-client`, installed by `.ci/run`; a missing one
//! fails the test naming the package).
//!
//! - a permitted key gets the console: the recent output first, then all
//!   256 byte values each way (no pty: OpenSSH passes bytes through), and
//!   `~.` at the start of a line closes it; the audit lines name the key's
//!   comment and fingerprint;
//! - a key without the VM in its `vms=` patterns, and an unknown VM, are
//!   refused with a message; a `mode="read-only"` key's typing never
//!   reaches the VM; an unknown key and a password attempt are refused;
//!   `list@` shows only the key's VMs (`name:uuid:port`);
//! - SIGHUP re-reads the authorized keys (a revoked key is refused for new
//!   sessions); a malformed line is logged with its line number and
//!   skipped; the host key is made with mode 0600; a host key that does
//!   not parse, a missing keys file or none at all stop start-up, naming
//!   it;
//! - on a pseudo-terminal (`ssh -tt` under `script`) the console works and
//!   `~.` typed there closes it;
//! - flow control: 6 MiB out while a 1 MiB paste goes in, every byte; a
//!   stopped ssh (SIGSTOP) does not hold the VM up and is dropped as a
//!   stall;
//! - a session outlives its client's EOF (`</dev/null` still gets output)
//!   but not its connection: a SIGKILLed client's exclusive lock is free
//!   at once;
//! - a reload closes the sessions of a removed or narrowed key (audit
//!   line) and refuses its new channels over an open ControlMaster;
//! - before login: the auth timeout, the cap on waiting connections, and
//!   the counters in `/metrics`; the idle timeout;
//! - key files others may write are refused (start-up, reload), a host key
//!   others may read is warned about.
//!
//! The set-up time and the burst rate through the SSH front door are
//! measured by the load tool: `vspc-bench burst --via ssh`.
//!
//! Every ssh process a test starts is killed when the test ends (a guard),
//! and every wait is bounded.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use vspc_testkit::sim::{Identity, SimVm};

/// The path of `program`, or a failure naming the package to install.
fn require(program: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(program);
        if std::fs::metadata(&candidate)
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        {
            return candidate;
        }
    }
    panic!(
        "`{program}` is not installed, and this test runs the real program: \
         install the Debian package `openssh-client` (.ci/run does this in CI)"
    );
}

/// A key pair made by ssh-keygen in `dir`; returns the private key's path
/// and the public key line.
fn keygen(dir: &Path, name: &str) -> (PathBuf, String) {
    let key = dir.join(name);
    let out = Command::new(require("ssh-keygen"))
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&key)
        .stdin(Stdio::null())
        .output()
        .expect("run ssh-keygen");
    assert!(out.status.success(), "ssh-keygen failed: {out:?}");
    let public = std::fs::read_to_string(key.with_extension("pub")).expect("read the public key");
    (key, public.trim().to_string())
}

/// A key `label` made in `dir`, and the only one in `dir/authorized_keys`.
pub(crate) fn only_key(dir: &Path, label: &str) -> PathBuf {
    let (key, public) = keygen(dir, label);
    std::fs::write(dir.join("authorized_keys"), format!("{public}\n")).expect("write");
    key
}

/// Wait until `ssh` has its console: the session's audit start line.
async fn session_started(d: &Daemon, ssh: &Ssh) {
    assert!(
        d.wait_log("audit: console session started", T * 2).await,
        "the console did not start: {}",
        ssh.err()
    );
}

/// A running ssh; killed when dropped. Its stdout and stderr are collected
/// by threads.
pub(crate) struct Ssh {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    /// The threads copying stdout and stderr.
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Drop for Ssh {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The options every run uses: no config, no known hosts, never a prompt,
/// only the key given.
fn ssh_command(port: u16, key: &Path, user: &str, extra: &[&str]) -> Command {
    ssh_command_at("127.0.0.1", port, key, user, extra)
}

/// [`ssh_command`] to a daemon on `host` (a cluster node's own address).
pub(crate) fn ssh_command_at(
    host: &str,
    port: u16,
    key: &Path,
    user: &str,
    extra: &[&str],
) -> Command {
    let mut cmd = Command::new(require("ssh"));
    cmd.args(["-F", "/dev/null"])
        .args(["-o", "StrictHostKeyChecking=no"])
        .args(["-o", "UserKnownHostsFile=/dev/null"])
        .args(["-o", "BatchMode=yes"])
        .args(["-o", "IdentitiesOnly=yes"])
        .args(["-o", "ConnectTimeout=5"])
        .args(["-o", "LogLevel=ERROR"])
        .args(extra)
        .arg("-i")
        .arg(key)
        .args(["-p", &port.to_string()])
        .arg(format!("{user}@{host}"))
        .env_remove("SSH_AUTH_SOCK");
    cmd
}

impl Ssh {
    pub(crate) fn spawn(mut cmd: Command) -> Ssh {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start ssh");
        let (stdout, stderr) = (Arc::default(), Arc::default());
        let readers = vec![
            collect_bytes(child.stdout.take().expect("stdout"), Arc::clone(&stdout)),
            collect_bytes(child.stderr.take().expect("stderr"), Arc::clone(&stderr)),
        ];
        Ssh {
            stdin: child.stdin.take(),
            child,
            stdout,
            stderr,
            readers,
        }
    }

    fn write(&mut self, bytes: &[u8]) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(bytes).expect("write to ssh");
        stdin.flush().expect("flush");
    }

    pub(crate) fn out(&self) -> Vec<u8> {
        self.stdout.lock().expect("lock").clone()
    }

    pub(crate) fn err(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().expect("lock")).into_owned()
    }

    /// Wait until stdout holds `n` bytes.
    pub(crate) async fn read_out(&self, n: usize, limit: Duration) -> Vec<u8> {
        let len = || self.stdout.lock().expect("lock").len();
        assert!(
            eventually(limit, || len() >= n).await,
            "ssh printed {} of {n} bytes within {limit:?}; stderr: {}",
            len(),
            self.err()
        );
        self.out()
    }

    /// Wait until stdout holds `needle`.
    async fn wait_out(&self, needle: &str, limit: Duration) -> bool {
        eventually(limit, || {
            String::from_utf8_lossy(&self.out()).contains(needle)
        })
        .await
    }

    /// Wait for the exit.
    async fn exit(&mut self, limit: Duration) -> ExitStatus {
        let Some(status) = child_exit(&mut self.child, limit).await else {
            panic!("ssh did not exit within {limit:?}; stderr: {}", self.err())
        };
        // The readers take the last bytes; briefly, as a ControlMaster
        // that ssh left behind holds the pipes open.
        eventually(SHORT, || self.readers.iter().all(|r| r.is_finished())).await;
        status
    }
}

/// Run ssh with no input to its end: (status, stdout, stderr).
pub(crate) async fn run(cmd: Command) -> (ExitStatus, String, String) {
    let mut ssh = Ssh::spawn(cmd);
    ssh.stdin = None;
    let status = ssh.exit(T * 3).await;
    (
        status,
        String::from_utf8_lossy(&ssh.out()).into_owned(),
        ssh.err(),
    )
}

/// A daemon with the SSH front door on a free port, its host key and
/// authorized keys in `dir`.
async fn daemon(dir: &Path, extra: &[&str]) -> (Daemon, u16) {
    let port = free_port();
    let host_key = dir.join("host/ssh_host_ed25519_key").display().to_string();
    let keys = dir.join("authorized_keys").display().to_string();
    let mut args = vec![
        "--ssh-port".to_string(),
        port.to_string(),
        "--ssh-iface".into(),
        "127.0.0.1".into(),
        "--ssh-host-key".into(),
        host_key,
        "--ssh-authorized-keys".into(),
        keys,
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    // Whatever the umask, the keys file is the owner's alone (vspc refuses
    // one that others may write).
    chmod(&dir.join("authorized_keys"), 0o600);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let d = Daemon::start(&refs);
    let open = async || {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
    };
    assert!(
        eventually_async(T, open).await,
        "the SSH port never opened:\n{}",
        d.log()
    );
    (d, port)
}

/// Set `path`'s permission bits (when it exists).
fn chmod(path: &Path, mode: u32) {
    if path.exists() {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }
}

/// Send `sig` (`-HUP`, `-STOP`, …) to `pid`.
fn signal(sig: &str, pid: u32) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill {sig} {pid} failed");
}

/// SIGHUP the daemon and wait until its log has one more `needle` line.
async fn sighup_until(d: &Daemon, needle: &str) {
    let before = d.log().matches(needle).count();
    signal("-HUP", d.pid());
    assert!(
        d.wait_log_count(needle, before + 1, T).await,
        "no {needle:?} after SIGHUP:\n{}",
        d.log()
    );
}

/// Wait until `path` exists (a control socket).
async fn wait_path(path: &Path, limit: Duration) -> bool {
    eventually(limit, || path.exists()).await
}

/// Wait until the VM has read `n` bytes of console input.
async fn vm_reads(vm: &SimVm, n: usize) -> Vec<u8> {
    vm.read_exact_data(n, T)
        .await
        .expect("console input reaches the VM")
}

#[tokio::test]
async fn a_permitted_key_gets_the_console_byte_exact_and_tilde_dot_closes_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = only_key(dir.path(), "alice");
    let logs = dir.path().join("logs");
    std::fs::create_dir(&logs).expect("mkdir");
    let (d, port) = daemon(
        dir.path(),
        &["--backend", "Logging", "-l", &logs.display().to_string()],
    )
    .await;
    let host_key = dir.path().join("host/ssh_host_ed25519_key");
    let mode = std::fs::metadata(&host_key)
        .expect("the host key was made")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "host key mode {mode:o}");

    let id = Identity::numbered(8100);
    let (vm, _) = vm_up(&d, &id).await;
    vm.send(b"before the console\r\n").await.expect("VM output");
    let transcript = logs.join(format!("{}.log", id.name));
    let held = || file_holds(&transcript, |t| t.ends_with(b"before the console\r\n"));
    assert!(
        eventually(T, held).await,
        "the transcript never held the output"
    );

    let mut ssh = Ssh::spawn(ssh_command(port, &key, &id.name, &[]));
    // The recent output first, then the marker where live output begins.
    assert_eq!(
        ssh.read_out(20 + LIVE.len(), T * 2).await,
        [&b"before the console\r\n"[..], LIVE].concat(),
        "stderr: {}",
        ssh.err()
    );
    // VM -> client: every byte value.
    let out = all_bytes(8);
    vm.send(&out).await.expect("VM output");
    let seen = 20 + LIVE.len();
    assert_eq!(&ssh.read_out(seen + out.len(), T).await[seen..], &out[..]);
    // Client -> VM: every byte value (no `~` at a line's start in it).
    let typed = all_bytes(4);
    ssh.write(&typed);
    assert_eq!(vm_reads(&vm, typed.len()).await, typed);
    // `~` mid-line passes; `~~` at a line's start sends one `~`.
    ssh.write(b"a~b\n~~c\n");
    assert_eq!(vm_reads(&vm, 7).await, b"a~b\n~c\n");
    assert!(
        d.wait_log("audit: console session started", T).await,
        "no audit start line:\n{}",
        d.log()
    );
    // `~.` at a line's start closes the session; the line before it goes.
    ssh.write(b"last\r~.");
    assert_eq!(vm_reads(&vm, 5).await, b"last\r");
    let status = ssh.exit(T).await;
    assert!(ssh.err().contains("closed (~.)"), "stderr: {}", ssh.err());
    assert_eq!(status.code(), Some(0), "stderr: {}", ssh.err());
    assert!(
        d.wait_log("audit: console session ended", T).await,
        "no audit end line:\n{}",
        d.log()
    );
    let log = d.log();
    let start = log
        .lines()
        .find(|l| l.contains("audit: console session started"))
        .expect("start line");
    assert!(start.contains("kind=ssh"), "{start}");
    assert!(start.contains("alice SHA256:"), "{start}");
    assert!(start.contains("127.0.0.1:"), "{start}");
    let end = log
        .lines()
        .find(|l| l.contains("audit: console session ended"))
        .expect("end line");
    let typed_total = typed.len() + 7 + 5;
    assert!(end.contains(&format!("bytes_to_vm={typed_total}")), "{end}");
    assert!(
        end.contains(&format!("bytes_from_vm={}", seen + out.len())),
        "{end}"
    );
    assert!(end.contains("duration_s="), "{end}");
}

#[tokio::test]
async fn keys_are_held_to_their_vms_and_modes_and_reloaded_on_sighup() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (full, full_pub) = keygen(dir.path(), "full");
    let (web, web_pub) = keygen(dir.path(), "web");
    let (ro, ro_pub) = keygen(dir.path(), "ro");
    let (stranger, _) = keygen(dir.path(), "stranger");
    let keys_file = dir.path().join("authorized_keys");
    std::fs::write(
        &keys_file,
        format!(
            "# vspc keys\n\
             {full_pub}\n\
             vms=\"web-*\" {stranger_like}\n\
             vms=\"web-*\",mode=\"write\" {web_pub}\n\
             vms=\"db-1\",mode=\"read-only\" {ro_pub}\n",
            // A malformed line (unterminated quote) with the stranger's
            // key: skipped, never taken as allow-all.
            stranger_like = "ssh-ed25519-but-broken \"",
        ),
    )
    .expect("write");
    let (d, port) = daemon(dir.path(), &[]).await;
    assert!(
        d.wait_log("authorized_keys:3: skipping", T).await,
        "the malformed line 3 was not reported:\n{}",
        d.log()
    );

    let web_id = Identity {
        name: "web-1".into(),
        ..Identity::numbered(8201)
    };
    let db_id = Identity {
        name: "db-1".into(),
        ..Identity::numbered(8202)
    };
    let (web_vm, web_port) = vm_up(&d, &web_id).await;
    let (db_vm, db_port) = vm_up(&d, &db_id).await;

    // list@: only the key's VMs, name:uuid:port.
    let (status, out, err) = run(ssh_command(port, &web, "list", &[])).await;
    assert!(status.success(), "{err}");
    assert_eq!(
        out,
        format!("web-1:{}:{web_port}\n", web_id.uuid_display()),
        "{err}"
    );
    let (status, out, err) = run(ssh_command(port, &full, "list", &[])).await;
    assert!(status.success(), "{err}");
    assert_eq!(
        out,
        format!(
            "db-1:{}:{db_port}\nweb-1:{}:{web_port}\n",
            db_id.uuid_display(),
            web_id.uuid_display()
        )
    );

    // A VM outside the key's patterns, and an unknown VM: refused alike.
    for user in ["db-1", "no-such-vm"] {
        let (status, out, err) = run(ssh_command(port, &web, user, &[])).await;
        assert_eq!(status.code(), Some(1), "{user}: {err}");
        assert!(out.is_empty(), "{user}: {out}");
        assert!(err.contains("no VM named"), "{user}: {err}");
    }
    // By uuid, within the patterns (the name matches).
    let mut by_uuid = Ssh::spawn(ssh_command(port, &web, &web_id.uuid_display(), &[]));
    // Output before the console joins is not its to see: wait for it.
    session_started(&d, &by_uuid).await;
    web_vm.send(b"via uuid").await.expect("VM output");
    assert_eq!(by_uuid.read_out(8, T * 2).await, b"via uuid");
    by_uuid.write(b"w");
    assert_eq!(vm_reads(&web_vm, 1).await, b"w");
    drop(by_uuid);

    // Read-only: output comes, typing never reaches the VM.
    let mut watch = Ssh::spawn(ssh_command(port, &ro, "db-1", &[]));
    assert!(
        eventually(T * 2, || watch.err().contains("read-only")).await,
        "not told read-only: {}",
        watch.err()
    );
    db_vm.send(b"output").await.expect("VM output");
    assert_eq!(watch.read_out(6, T).await, b"output");
    watch.write(b"rm -rf /\r");
    let got = db_vm.recv_data(Duration::from_millis(500)).await;
    assert!(
        got.is_empty(),
        "a read-only key's input reached the VM: {got:?}"
    );
    drop(watch);

    // An unknown key; a password attempt (BatchMode: it cannot prompt).
    let (status, _, err) = run(ssh_command(port, &stranger, "web-1", &[])).await;
    assert_eq!(status.code(), Some(255), "{err}");
    assert!(err.contains("Permission denied"), "{err}");
    let (status, _, err) = run(ssh_command(
        port,
        &full,
        "web-1",
        &[
            "-o",
            "PreferredAuthentications=password,keyboard-interactive",
            "-o",
            "PubkeyAuthentication=no",
        ],
    ))
    .await;
    assert_eq!(status.code(), Some(255), "{err}");
    assert!(err.contains("Permission denied"), "{err}");

    // Revoke the web key; SIGHUP; new sessions with it are refused, the
    // others still work.
    std::fs::write(&keys_file, format!("{full_pub}\n{ro_pub}\n")).expect("rewrite");
    let loaded = d.log().matches("SSH authorized keys loaded").count();
    let ok = Command::new("kill")
        .args(["-HUP", &d.pid().to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -HUP failed");
    assert!(
        d.wait_log_count("SSH authorized keys loaded", loaded + 1, T)
            .await,
        "no reload:\n{}",
        d.log()
    );
    let (status, _, err) = run(ssh_command(port, &web, "list", &[])).await;
    assert_eq!(status.code(), Some(255), "the revoked key got in: {err}");
    assert!(err.contains("Permission denied"), "{err}");
    let (status, out, err) = run(ssh_command(port, &full, "list", &[])).await;
    assert!(status.success(), "{err}");
    assert_eq!(out.lines().count(), 2, "{out}");
}

#[tokio::test]
async fn on_a_pty_the_console_works_and_tilde_dot_closes_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = only_key(dir.path(), "tty");
    let (d, port) = daemon(dir.path(), &[]).await;
    let id = Identity::numbered(8300);
    let (vm, _) = vm_up(&d, &id).await;

    // `script` gives ssh a terminal; -tt asks for a pty, -e none leaves `~.`
    // to the server.
    let ssh = ssh_command(port, &key, &id.name, &["-tt", "-e", "none"]);
    let line = format!(
        "{} {}",
        shell_words(ssh.get_program().to_string_lossy().as_ref()),
        ssh.get_args()
            .map(|a| shell_words(a.to_string_lossy().as_ref()))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let mut cmd = Command::new(require("script"));
    cmd.args(["-q", "-e", "-c", &line, "/dev/null"])
        .env_remove("SSH_AUTH_SOCK");
    let mut tty = Ssh::spawn(cmd);
    assert!(
        d.wait_log("audit: console session started", T * 2).await,
        "the console did not start: {:?}",
        String::from_utf8_lossy(&tty.out())
    );
    vm.send(b"login: ").await.expect("VM output");
    assert!(
        tty.wait_out("login: ", T * 2).await,
        "no output on the pty: {:?}",
        tty.err()
    );
    tty.write(b"root\r");
    assert_eq!(vm_reads(&vm, 5).await, b"root\r");
    tty.write(b"~.");
    tty.exit(T).await;
}

/// Bulk both ways at once through the channel's window and the pipe: 6
/// MiB of output while a 1 MiB paste goes in, every byte in order.
#[tokio::test]
async fn bulk_both_ways_at_once_arrives_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = only_key(dir.path(), "bulk");
    let (d, port) = daemon(dir.path(), &[]).await;
    let id = Identity::numbered(8500);
    let (vm, _) = vm_up(&d, &id).await;
    let mut ssh = Ssh::spawn(ssh_command(port, &key, &id.name, &[]));
    session_started(&d, &ssh).await;
    let out = XorShift::new(8500).bytes(6 << 20);
    // No `~` in the paste: the escape would take `~.` or `~~` after a
    // newline.
    let paste: Vec<u8> = XorShift::new(8501)
        .bytes(1 << 20)
        .into_iter()
        .map(|b| if b == b'~' { b'}' } else { b })
        .collect();
    let mut stdin = ssh.stdin.take().expect("stdin");
    let to_write = paste.clone();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&to_write);
        stdin
    });
    let ((), typed) = tokio::join!(
        async {
            for chunk in out.chunks(256 * 1024) {
                vm.send(chunk).await.expect("VM output");
            }
        },
        vm.read_exact_data(paste.len(), T * 4)
    );
    assert!(
        typed.expect("the paste reaches the VM") == paste,
        "the paste arrived changed"
    );
    let got = ssh.read_out(out.len(), T * 4).await;
    assert!(got == out, "the output arrived changed");
    ssh.stdin = writer.join().ok();
}

/// An ssh that stops reading (SIGSTOP) is a stuck console like any other:
/// the VM goes on without it, and after `--console-stall-timeout` its
/// session ends (the audit end line) and the channel is closed.
#[tokio::test]
async fn a_stopped_client_is_dropped_as_a_stall() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = only_key(dir.path(), "stuck");
    let (d, port) = daemon(dir.path(), &["--console-stall-timeout", "1"]).await;
    let id = Identity::numbered(8600);
    let (vm, _) = vm_up(&d, &id).await;
    let mut ssh = Ssh::spawn(ssh_command(port, &key, &id.name, &[]));
    session_started(&d, &ssh).await;
    let signal = |sig: &str, pid: u32| {
        let ok = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} {pid} failed");
    };
    signal("-STOP", ssh.child.id());
    let out = XorShift::new(8600).bytes(16 << 20);
    tokio::time::timeout(T * 4, async {
        for chunk in out.chunks(256 * 1024) {
            vm.send(chunk).await.expect("VM output");
        }
    })
    .await
    .expect("the VM was held up by a stopped SSH client");
    assert!(
        d.wait_log("audit: console session ended", T * 2).await,
        "the stuck session never ended:\n{}",
        d.log()
    );
    signal("-CONT", ssh.child.id());
    ssh.exit(T * 2).await;
}

/// Start-up stops, naming the file, on a host key it cannot parse, on a
/// missing authorized keys file, and on `--ssh-port` without one; a
/// failed start makes no host key.
#[test]
fn bad_ssh_files_stop_start_up_naming_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, public) = keygen(dir.path(), "k");
    let keys = dir.path().join("authorized_keys");
    std::fs::write(&keys, format!("{public}\n")).expect("write");
    let bad_key = dir.path().join("bad_host_key");
    std::fs::write(&bad_key, "not a key\n").expect("write");
    let new_key = dir.path().join("new/host_key");
    let port = free_port().to_string();
    let proxy = free_port().to_string();
    let admin = free_port().to_string();
    let base = [
        "--no-http",
        "--proxy-iface",
        "127.0.0.1",
        "--proxy-port",
        &proxy,
        "--admin-port",
        &admin,
        "--ssh-iface",
        "127.0.0.1",
        "--ssh-port",
        &port,
    ];
    let path = |p: &Path| p.display().to_string();
    let cases: [(Vec<String>, String); 3] = [
        (
            vec![
                "--ssh-host-key".into(),
                path(&bad_key),
                "--ssh-authorized-keys".into(),
                path(&keys),
            ],
            path(&bad_key),
        ),
        (
            vec![
                "--ssh-host-key".into(),
                path(&new_key),
                "--ssh-authorized-keys".into(),
                path(&dir.path().join("missing")),
            ],
            path(&dir.path().join("missing")),
        ),
        (
            vec!["--ssh-host-key".into(), path(&new_key)],
            "--ssh-authorized-keys".into(),
        ),
    ];
    for (extra, named) in cases {
        let mut args: Vec<&str> = base.to_vec();
        args.extend(extra.iter().map(String::as_str));
        let exit = run_to_exit(&args, T);
        let status = exit.status.expect("the daemon exits");
        assert!(!status.success(), "{args:?} started");
        assert!(exit.stderr.contains(&named), "{args:?}: {}", exit.stderr);
    }
    assert!(!new_key.exists(), "a failed start made a host key");
}

/// Quote `s` for `sh -c`.
fn shell_words(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// EOF on ssh's stdin is not the end of a session: `ssh VM@host
/// </dev/null` still gets the VM's output. But a client that is gone
/// (SIGKILL, after that EOF) ends its session at once, on a quiet VM too:
/// the audit end line, and its exclusive lock is free for the next key.
#[tokio::test]
async fn after_eof_output_flows_and_a_killed_client_frees_its_exclusive_lock() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (key, public) = keygen(dir.path(), "excl");
    std::fs::write(
        dir.path().join("authorized_keys"),
        format!("mode=\"exclusive\" {public}\n"),
    )
    .expect("write");
    let (d, port) = daemon(dir.path(), &[]).await;
    let id = Identity::numbered(8700);
    let (vm, _) = vm_up(&d, &id).await;

    let mut first = Ssh::spawn(ssh_command(port, &key, &id.name, &[]));
    // Its stdin closes at once: ssh sends EOF on the channel.
    first.stdin = None;
    session_started(&d, &first).await;
    vm.send(b"still watching").await.expect("VM output");
    assert!(
        first.wait_out("still watching", T).await,
        "no output after EOF: {:?}; stderr: {}",
        String::from_utf8_lossy(&first.out()),
        first.err()
    );

    // SIGKILL: the connection closes, the VM stays quiet.
    first.child.kill().expect("kill ssh");
    first.child.wait().expect("wait ssh");
    assert!(
        d.wait_log("audit: console session ended", Duration::from_secs(2))
            .await,
        "the dead client's session did not end within 2 s:\n{}",
        d.log()
    );

    // The lock is free: a second exclusive session gets the console.
    let mut second = Ssh::spawn(ssh_command(port, &key, &id.name, &[]));
    assert!(
        d.wait_log_count("audit: console session started", 2, Duration::from_secs(2))
            .await,
        "the second exclusive session did not start: {}\n{}",
        second.err(),
        d.log()
    );
    vm.send(b"second").await.expect("VM output");
    assert!(
        second.wait_out("second", T).await,
        "no output on the second session: {}",
        second.err()
    );
    second.write(b"x");
    assert_eq!(vm_reads(&vm, 1).await, b"x");
}

/// A reload applies to connections already open (OpenSSH's ControlMaster
/// keeps one open and opens channels over it): a removed key gets no new
/// channel over its old connection, and its open session is closed with an
/// audit line; a key whose `mode=` went from write to read-only has its
/// write session closed too, while an unchanged key's session stays.
#[tokio::test]
async fn a_reload_closes_revoked_and_narrowed_sessions_and_refuses_their_channels() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (gone, gone_pub) = keygen(dir.path(), "gone");
    let (narrow, narrow_pub) = keygen(dir.path(), "narrow");
    let (stay, stay_pub) = keygen(dir.path(), "stay");
    let keys_file = dir.path().join("authorized_keys");
    std::fs::write(
        &keys_file,
        format!(
            "mode=\"write\" {gone_pub}\n\
             vms=\"cm-2\",mode=\"write\" {narrow_pub}\n\
             vms=\"cm-3\" {stay_pub}\n"
        ),
    )
    .expect("write");
    let (d, port) = daemon(dir.path(), &[]).await;
    let one = Identity {
        name: "cm-1".into(),
        ..Identity::numbered(8801)
    };
    let two = Identity {
        name: "cm-2".into(),
        ..Identity::numbered(8802)
    };
    let three = Identity {
        name: "cm-3".into(),
        ..Identity::numbered(8803)
    };
    let (vm1, _) = vm_up(&d, &one).await;
    let (_vm2, _) = vm_up(&d, &two).await;
    let (vm3, _) = vm_up(&d, &three).await;

    // Two masters for the key that goes: one carries a session, the other
    // none yet.
    let master = |path: &Path| {
        let cp = format!("ControlPath={}", path.display());
        ssh_command(
            port,
            &gone,
            "cm-1",
            &[
                "-N",
                "-o",
                "ControlMaster=yes",
                "-o",
                &cp,
                "-o",
                "ControlPersist=no",
            ],
        )
    };
    let over = |path: &Path| {
        let cp = format!("ControlPath={}", path.display());
        ssh_command(port, &gone, "cm-1", &["-o", "ControlMaster=no", "-o", &cp])
    };
    let (m1, m2) = (dir.path().join("m1"), dir.path().join("m2"));
    let _master1 = Ssh::spawn(master(&m1));
    let _master2 = Ssh::spawn(master(&m2));
    assert!(
        wait_path(&m1, T).await,
        "no control socket {}",
        m1.display()
    );
    assert!(
        wait_path(&m2, T).await,
        "no control socket {}",
        m2.display()
    );

    let mut session = Ssh::spawn(over(&m1));
    assert!(
        d.wait_log_count("audit: console session started", 1, T * 2)
            .await,
        "no session over the master: {}",
        session.err()
    );
    session.write(b"w");
    assert_eq!(vm_reads(&vm1, 1).await, b"w");
    let mut narrowed = Ssh::spawn(ssh_command(port, &narrow, "cm-2", &[]));
    let mut stays = Ssh::spawn(ssh_command(port, &stay, "cm-3", &[]));
    assert!(
        d.wait_log_count("audit: console session started", 3, T * 2)
            .await,
        "the sessions did not start: {} / {}",
        narrowed.err(),
        stays.err()
    );

    // Remove the first key, make the second read-only; reload.
    std::fs::write(
        &keys_file,
        format!("vms=\"cm-2\",mode=\"read-only\" {narrow_pub}\nvms=\"cm-3\" {stay_pub}\n"),
    )
    .expect("rewrite");
    sighup_until(&d, "SSH authorized keys loaded").await;
    assert!(
        d.wait_log_count("audit: console session closed by a reload", 2, T)
            .await,
        "the revoked and narrowed sessions were not closed:\n{}",
        d.log()
    );
    for (ssh, why) in [(&mut session, "removed"), (&mut narrowed, "mode=")] {
        let status = ssh.exit(T).await;
        assert_eq!(status.code(), Some(1), "stderr: {}", ssh.err());
        assert!(ssh.err().contains(why), "stderr: {}", ssh.err());
    }
    assert!(
        d.wait_log_count("audit: console session ended", 2, T).await,
        "no audit end lines:\n{}",
        d.log()
    );
    let log = d.log();
    let closed: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("closed by a reload"))
        .collect();
    assert!(
        closed.iter().any(|l| l.contains("gone SHA256:")),
        "{closed:?}"
    );
    assert!(
        closed.iter().any(|l| l.contains("narrow SHA256:")),
        "{closed:?}"
    );
    assert!(
        !closed.iter().any(|l| l.contains("stay SHA256:")),
        "{closed:?}"
    );

    // A new channel over the other master: refused.
    let (status, _, err) = run(over(&m2)).await;
    assert_ne!(
        status.code(),
        Some(0),
        "a revoked key opened a channel: {err}"
    );
    let got = vm1.recv_data(Duration::from_millis(300)).await;
    assert!(got.is_empty(), "{got:?}");
    assert!(
        d.log()
            .contains("SSH channel refused: the key is no longer in the authorized keys"),
        "{}",
        d.log()
    );

    // The unchanged key's session goes on.
    vm3.send(b"still on").await.expect("VM output");
    assert!(
        stays.wait_out("still on", T).await,
        "stderr: {}",
        stays.err()
    );
    stays.write(b"k");
    assert_eq!(vm_reads(&vm3, 1).await, b"k");
}

/// Fetch `/metrics` from the HTTP port.
async fn metrics(http: u16) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", http))
        .await
        .expect("connect to the HTTP port");
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .expect("send");
    let mut out = Vec::new();
    tokio::time::timeout(T, tcp.read_to_end(&mut out))
        .await
        .expect("the metrics came")
        .expect("read");
    String::from_utf8_lossy(&out).into_owned()
}

/// The value of the sample line that starts with `series`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

/// Read from a silent connection until it closes: (bytes read, whether it
/// closed within `limit`).
async fn until_closed(tcp: &mut tokio::net::TcpStream, limit: Duration) -> (Vec<u8>, bool) {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Err(_) => return (got, false),
            Ok(Ok(0)) | Ok(Err(_)) => return (got, true),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Before authentication: a client that says nothing is closed after
/// `--ssh-auth-timeout`; past `--ssh-max-unauthenticated` waiting
/// connections one more is closed at once; both are counted, and SSH
/// connections show in `/metrics` as `listener="ssh"`.
#[tokio::test]
async fn unauthenticated_connections_are_timed_out_capped_and_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = only_key(dir.path(), "m");
    let http = free_port();
    let http_port = http.to_string();
    let (d, port) = daemon(
        dir.path(),
        &[
            "--ssh-auth-timeout",
            "2",
            "--ssh-max-unauthenticated",
            "2",
            "--http-iface",
            "127.0.0.1",
            "--http-port",
            &http_port,
        ],
    )
    .await;
    // The helper's probe of the port took a place until it closed; give
    // the daemon time to let it go (its version line, then EOF; nothing
    // the test can watch says when).
    tokio::time::sleep(Duration::from_millis(100)).await;

    let start = Instant::now();
    let mut silent1 = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let mut silent2 = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    // Both are accepted: the server's version line comes.
    for s in [&mut silent1, &mut silent2] {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 8];
        let n = tokio::time::timeout(T, s.read(&mut buf))
            .await
            .expect("a version line")
            .expect("read");
        assert_eq!(&buf[..n.min(4)], b"SSH-", "{:?}", &buf[..n]);
    }
    // A third is closed at once, with nothing said.
    let mut third = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let (said, closed) = until_closed(&mut third, Duration::from_millis(1000)).await;
    assert!(closed, "the connection over the cap stayed open");
    assert!(said.is_empty(), "{:?}", String::from_utf8_lossy(&said));
    assert!(
        d.wait_log("--ssh-max-unauthenticated", T).await,
        "{}",
        d.log()
    );
    // The silent ones are closed after the auth timeout (2 s), not before.
    for s in [&mut silent1, &mut silent2] {
        let (_, closed) = until_closed(s, T).await;
        assert!(closed, "a silent client stayed connected");
    }
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(1800) && took < Duration::from_secs(5),
        "closed after {took:?}"
    );
    assert!(
        d.wait_log("not authenticated within 2 s", T).await,
        "{}",
        d.log()
    );

    // The places are free again: a login works.
    let (status, out, err) = run(ssh_command(port, &key, "list", &[])).await;
    assert!(status.success(), "{err}");
    assert!(out.is_empty(), "{out}");
    let m = metrics(http).await;
    let accepted = sample(&m, "vspc_connections_accepted_total{listener=\"ssh\"}");
    assert!(accepted.is_some_and(|n| n >= 4.0), "{m}");
    assert_eq!(
        sample(
            &m,
            "vspc_ssh_closed_total{reason=\"unauthenticated_limit\"}"
        ),
        Some(1.0),
        "{m}"
    );
    assert!(
        sample(&m, "vspc_ssh_closed_total{reason=\"auth_timeout\"}").is_some_and(|n| n >= 2.0),
        "{m}"
    );
}

/// `--ssh-idle-timeout`: a session with no console data either way is
/// closed after that long; one with data stays.
#[tokio::test]
async fn an_idle_connection_is_closed_after_the_idle_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = only_key(dir.path(), "idle");
    let (d, port) = daemon(dir.path(), &["--ssh-idle-timeout", "2"]).await;
    let id = Identity::numbered(8900);
    let (vm, _) = vm_up(&d, &id).await;
    let mut ssh = Ssh::spawn(ssh_command(port, &key, &id.name, &[]));
    session_started(&d, &ssh).await;
    let start = Instant::now();
    // Data every half second keeps it open past the timeout (the pauses
    // are the test).
    for i in 0..6u8 {
        vm.send(&[b'a' + i]).await.expect("VM output");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        ssh.child.try_wait().expect("try_wait").is_none(),
        "closed while busy"
    );
    ssh.exit(T).await;
    let took = start.elapsed();
    assert!(took >= Duration::from_secs(4), "closed after {took:?}");
    assert!(
        d.wait_log("no console data for 2 s", T).await,
        "{}",
        d.log()
    );
    assert!(
        d.wait_log("audit: console session ended", T).await,
        "{}",
        d.log()
    );
}

/// As OpenSSH's StrictModes: an authorized keys file or host key that
/// group or others may write stops start-up, naming it; a host key they may
/// read starts with a warning naming it; on SIGHUP a keys file others may
/// write is refused (an error) and the keys loaded before stay.
#[tokio::test]
async fn writable_key_files_are_refused_and_a_readable_host_key_is_warned_about() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (key, public) = keygen(dir.path(), "perm");
    let keys = dir.path().join("authorized_keys");
    std::fs::write(&keys, format!("{public}\n")).expect("write");
    // An ssh-keygen ed25519 key is an OpenSSH private key vspc can use.
    let (host_key, _) = keygen(dir.path(), "host");
    let path = |p: &Path| p.display().to_string();
    let start = |host: &Path| {
        let (port, proxy, admin) = (free_port(), free_port(), free_port());
        let args: Vec<String> = [
            "--no-http",
            "--proxy-iface",
            "127.0.0.1",
            "--proxy-port",
            &proxy.to_string(),
            "--admin-port",
            &admin.to_string(),
            "--ssh-iface",
            "127.0.0.1",
            "--ssh-port",
            &port.to_string(),
            "--ssh-host-key",
            &path(host),
            "--ssh-authorized-keys",
            &path(&keys),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        run_to_exit(&args.iter().map(String::as_str).collect::<Vec<_>>(), T)
    };
    chmod(&host_key, 0o600);
    for (file, mode, who) in [
        (&keys, 0o620, "group"),
        (&keys, 0o602, "others"),
        (&host_key, 0o660, "group"),
    ] {
        chmod(&keys, 0o600);
        chmod(&host_key, 0o600);
        chmod(file, mode);
        let exit = start(&host_key);
        let status = exit.status.expect("the daemon exits");
        assert!(
            !status.success(),
            "started with {} mode {mode:o}",
            file.display()
        );
        let want = format!("{} is writable by {who}", path(file));
        assert!(exit.stderr.contains(&want), "{want}: {}", exit.stderr);
    }
    chmod(&keys, 0o600);

    // Readable by the group: starts, with a warning naming the file.
    chmod(&host_key, 0o640);
    let host_arg = path(&host_key);
    let (d, port) = daemon(dir.path(), &["--ssh-host-key", &host_arg]).await;
    let warning = format!("SSH host key {} is readable by group", path(&host_key));
    assert!(d.wait_log(&warning, T).await, "{}", d.log());
    assert!(
        d.log()
            .lines()
            .any(|l| l.contains(&warning) && l.contains("WARN")),
        "{}",
        d.log()
    );

    // Reload of a keys file others may write: refused, the old keys stay.
    std::fs::write(&keys, "# emptied by someone else\n").expect("rewrite");
    chmod(&keys, 0o666);
    sighup_until(&d, "keeping the SSH authorized keys loaded before").await;
    assert!(
        d.log().lines().any(|l| l.contains("ERROR")
            && l.contains(&format!("{} is writable by group and others", path(&keys)))),
        "{}",
        d.log()
    );
    let (status, _, err) = run(ssh_command(port, &key, "list", &[])).await;
    assert!(
        status.success(),
        "the keys loaded before were dropped: {err}"
    );
}

/// A second VM (another uuid) that claims `web-1`'s name: `ssh web-1@`
/// reaches neither; a key allowed by name sees neither in `list@`; a key
/// with every VM is told both uuids; a `uuid:` pattern reaches the real one
/// only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impostor_name_reaches_no_one_and_uuid_patterns_hold() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (full, full_pub) = keygen(dir.path(), "full");
    let (web, web_pub) = keygen(dir.path(), "web");
    let (pinned, pinned_pub) = keygen(dir.path(), "pinned");
    let real = Identity {
        name: "web-1".into(),
        ..Identity::numbered(8301)
    };
    let impostor = Identity {
        name: "web-1".into(),
        ..Identity::numbered(8302)
    };
    std::fs::write(
        dir.path().join("authorized_keys"),
        format!(
            "{full_pub}\nvms=\"web-*\" {web_pub}\nvms=\"uuid:{}\" {pinned_pub}\n",
            real.uuid_display()
        ),
    )
    .expect("write");
    let (d, port) = daemon(dir.path(), &[]).await;
    let (real_vm, _) = vm_up(&d, &real).await;
    let _impostor_vm = SimVm::connect(d.proxy, &impostor).await.expect("impostor");
    assert!(
        d.wait_log("claims the name of a connected VM", T).await,
        "{}",
        d.log()
    );
    // By name: the key that may see every VM is told both uuids.
    let (status, _, err) = run(ssh_command(port, &full, "web-1", &[])).await;
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("more than one VM is named"), "{err}");
    assert!(
        err.contains(&real.uuid_display()) && err.contains(&impostor.uuid_display()),
        "{err}"
    );
    // A name pattern no longer sees either (the name identifies neither).
    let (status, _, err) = run(ssh_command(port, &web, "web-1", &[])).await;
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("no VM named"), "{err}");
    let (_, out, _) = run(ssh_command(port, &web, "list", &[])).await;
    assert_eq!(out, "", "a name pattern listed an ambiguous name");
    // The uuid pattern: the real VM, by uuid, and never the impostor.
    let (status, _, err) = run(ssh_command(port, &pinned, &impostor.uuid_display(), &[])).await;
    assert_eq!(
        status.code(),
        Some(1),
        "the uuid: key reached the impostor: {err}"
    );
    let console = Ssh::spawn(ssh_command(port, &pinned, &real.uuid_display(), &[]));
    // The VM says it again until the console, attaching meanwhile, shows it.
    let shown = eventually_async(T, async || {
        real_vm.send(b"real\r\n").await.expect("output");
        console.out().windows(4).any(|w| w == b"real")
    })
    .await;
    assert!(shown, "no output by uuid:\n{}", d.log());
}
