//! End-to-end tests of `vspc-client`: the real client binary against the
//! real daemon, with simulated VMs ([`vspc_testkit::sim::SimVm`]). The client runs
//! with stdin piped (not a terminal), except in `terminal_is_restored`,
//! where `tests/client_pty.py` runs it under a pseudo-terminal.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::common::*;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use vspc_testkit::sim::Identity;

/// The client under test.
const CLIENT: &str = env!("CARGO_BIN_EXE_vspc-client");

// ---------------------------------------------------------------------------
// Helpers.

/// A running `vspc-client` with piped stdin, stdout and stderr.
pub(crate) struct Client {
    child: Child,
    stdin: Option<ChildStdin>,
    out: Arc<Mutex<Vec<u8>>>,
    err: Arc<Mutex<Vec<u8>>>,
    threads: Vec<JoinHandle<()>>,
    status: Option<ExitStatus>,
}

/// A child's pipe, collected into `into` (nothing when the pipe is absent).
fn pump<R: Read + Send + 'static>(pipe: Option<R>, into: Arc<Mutex<Vec<u8>>>) -> JoinHandle<()> {
    match pipe {
        Some(pipe) => collect_bytes(pipe, into),
        None => std::thread::spawn(|| {}),
    }
}

impl Client {
    /// Run the client against `d`'s admin port with `args`.
    pub(crate) fn start(d: &Daemon, args: &[&str]) -> Client {
        Client::start_at(d.admin, args)
    }

    fn start_at(admin: SocketAddr, args: &[&str]) -> Client {
        let mut child = Command::new(CLIENT)
            .args([
                "-s",
                &admin.ip().to_string(),
                "-a",
                &admin.port().to_string(),
            ])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {CLIENT}: {e}"));
        let out = Arc::new(Mutex::new(Vec::new()));
        let err = Arc::new(Mutex::new(Vec::new()));
        let threads = vec![
            pump(child.stdout.take(), out.clone()),
            pump(child.stderr.take(), err.clone()),
        ];
        Client {
            stdin: child.stdin.take(),
            child,
            out,
            err,
            threads,
            status: None,
        }
    }

    fn write(&mut self, bytes: &[u8]) {
        let stdin = self.stdin.as_mut().expect("stdin still open");
        stdin.write_all(bytes).expect("write to the client's stdin");
        stdin.flush().expect("flush the client's stdin");
    }

    pub(crate) fn close_stdin(&mut self) {
        self.stdin = None;
    }

    fn stdout(&self) -> Vec<u8> {
        self.out.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.err.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }

    /// Wait for the client to exit; panics (with its output) if it does not
    /// within `limit`. Its output is complete afterwards.
    async fn exit(&mut self, limit: Duration) -> ExitStatus {
        let Some(status) = child_exit(&mut self.child, limit).await else {
            panic!(
                "the client did not exit within {limit:?}\nstdout: {:?}\nstderr: {}",
                String::from_utf8_lossy(&self.stdout()),
                self.stderr()
            )
        };
        self.status = Some(status);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        status
    }

    /// The exit code, insisting that the client exits.
    pub(crate) async fn code(&mut self, limit: Duration) -> i32 {
        let status = self.exit(limit).await;
        status.code().unwrap_or_else(|| {
            panic!(
                "the client died of a signal: {status}; stderr: {}",
                self.stderr()
            )
        })
    }

    /// Wait until stderr contains `needle`.
    async fn wait_stderr(&self, needle: &str, limit: Duration) -> bool {
        eventually(limit, || self.stderr().contains(needle)).await
    }

    /// Wait until stdout holds at least `n` bytes.
    pub(crate) async fn wait_stdout(&self, n: usize, limit: Duration) -> Vec<u8> {
        eventually(limit, || self.stdout().len() >= n).await;
        self.stdout()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Run the client to completion with stdin closed: (exit code, stdout, stderr).
async fn run_client(d: &Daemon, args: &[&str]) -> (i32, String, String) {
    let mut c = Client::start(d, args);
    c.close_stdin();
    let code = c.code(T).await;
    (
        code,
        String::from_utf8_lossy(&c.stdout()).into_owned(),
        c.stderr(),
    )
}

/// One native admin command and its JSON answer.
async fn native(admin: SocketAddr, command: &str) -> Value {
    let work = async {
        let mut s = TcpStream::connect(admin).await.expect("connect to admin");
        s.write_all(format!("{command}\n").as_bytes())
            .await
            .expect("send admin command");
        let mut line = String::new();
        tokio::io::BufReader::new(s)
            .read_line(&mut line)
            .await
            .expect("read admin answer");
        serde_json::from_str::<Value>(&line)
            .unwrap_or_else(|e| panic!("admin answer {line:?} is not JSON: {e}"))
    };
    tokio::time::timeout(T, work)
        .await
        .unwrap_or_else(|_| panic!("no answer to {command:?} within {T:?}"))
}

// ---------------------------------------------------------------------------
// The tests.

#[tokio::test]
async fn listing_plain_and_json() {
    let d = Daemon::start(&[]);
    // Started in reverse order, so sorting is visible.
    let (b, c) = (Identity::numbered(102), Identity::numbered(101));
    let (_vm_b, port_b) = vm_up(&d, &b).await;
    let (_vm_c, port_c) = vm_up(&d, &c).await;

    let (code, out, err) = run_client(&d, &[]).await;
    assert_eq!(code, 0, "stderr: {err}");
    let want = format!(
        "{}:{}:{port_c}\n{}:{}:{port_b}\n",
        c.name,
        c.uuid_display(),
        b.name,
        b.uuid_display()
    );
    assert_eq!(out, want);

    let (code, out, err) = run_client(&d, &["--json"]).await;
    assert_eq!(code, 0, "stderr: {err}");
    assert_eq!(
        out.lines().count(),
        1,
        "--json should print one line: {out:?}"
    );
    let vms: Value = serde_json::from_str(&out).expect("--json prints JSON");
    let vms = vms.as_array().expect("--json prints an array");
    assert_eq!(vms.len(), 2, "{out}");
    assert_eq!(vms[0]["name"], c.name.as_str());
    assert_eq!(vms[0]["uuid"], c.uuid_display().as_str());
    assert_eq!(vms[0]["port"], port_c);
    assert_eq!(vms[1]["name"], b.name.as_str());
    assert_eq!(vms[1]["port"], port_b);
}

#[tokio::test]
async fn session_through_a_pipe_is_byte_exact() {
    let d = Daemon::start(&[]);
    let id = Identity::numbered(110);
    let (vm, _) = vm_up(&d, &id).await;
    let mut c = Client::start(&d, &[&id.name]);
    wait_consoles_within(d.admin, &id.name, 1, T).await;

    // VM to client: every byte value, 0xFF and telnet-looking bytes included.
    let all = every_byte(1);
    vm.send(&all).await.expect("VM send");
    let got = c.wait_stdout(all.len(), T).await;
    assert_eq!(got, all, "client stdout differs from what the VM sent");

    // Client to VM: every byte value (0x1d too: a pipe has no escape key),
    // then IAC pairs and a CR alone.
    let mut input = every_byte(1);
    input.extend_from_slice(b"\xff\xff\r\x00\r");
    c.write(&input);
    let got = vm
        .read_exact_data(input.len(), T)
        .await
        .expect("VM receives the client's input");
    assert_eq!(
        got, input,
        "the VM got something else than the client's stdin"
    );

    c.close_stdin();
    assert_eq!(c.code(T).await, 0, "stderr: {}", c.stderr());
    assert_eq!(c.stdout(), all, "no output beyond the VM's");
    assert!(
        !c.stderr().contains("closed by the server"),
        "end of input is our close, not the server's: {}",
        c.stderr()
    );
    wait_consoles_within(d.admin, &id.name, 0, T).await;
}

#[tokio::test]
async fn unknown_vm_lists_known_ones() {
    let d = Daemon::start(&[]);
    let (a, b) = (Identity::numbered(121), Identity::numbered(120));
    let (_vm_a, _) = vm_up(&d, &a).await;
    let (_vm_b, _) = vm_up(&d, &b).await;

    let (code, out, err) = run_client(&d, &["no-such-vm"]).await;
    assert_eq!(code, 1, "stderr: {err}");
    assert!(out.is_empty(), "stdout: {out:?}");
    let mut lines = err.lines();
    assert_eq!(
        lines.next(),
        Some(
            format!(
                "vspc-client: no VM called 'no-such-vm' on {}; known VMs:",
                d.admin.ip()
            )
            .as_str()
        ),
        "{err}"
    );
    let rest: Vec<&str> = lines.collect();
    assert_eq!(rest, [b.name.as_str(), a.name.as_str()], "{err}");

    let (code, _, err) = run_client(&d, &["--clear", "no-such-vm"]).await;
    assert_eq!(code, 1, "stderr: {err}");
    assert!(err.contains(&a.name) && err.contains(&b.name), "{err}");
}

#[tokio::test]
async fn locks_refused_and_read_only() {
    let d = Daemon::start(&[]);
    let id = Identity::numbered(130);
    let (vm, _) = vm_up(&d, &id).await;

    // An exclusive holder keeps a write lock out.
    let mut excl = Client::start(&d, &["--client-lock-mode", "exclusive", &id.name]);
    wait_consoles_within(d.admin, &id.name, 1, T).await;
    let (code, _, err) = run_client(&d, &["--client-lock-mode", "write", &id.name]).await;
    assert_eq!(code, 3, "stderr: {err}");
    assert!(
        err.starts_with(&format!(
            "vspc-client: cannot get a write lock on {}: ",
            id.name
        )),
        "{err}"
    );
    assert!(err.contains("exclusive"), "{err}");
    excl.close_stdin();
    assert_eq!(excl.code(T).await, 0, "stderr: {}", excl.stderr());
    wait_consoles_within(d.admin, &id.name, 0, T).await;

    // A writer, then a default client: read-only, its input is discarded.
    let mut writer = Client::start(&d, &["--client-lock-mode", "write", &id.name]);
    wait_consoles_within(d.admin, &id.name, 1, T).await;
    let mut reader = Client::start(&d, &[&id.name]);
    assert!(
        reader.wait_stderr("read-only", T).await,
        "no read-only notice: {}",
        reader.stderr()
    );
    assert!(
        reader.stderr().contains(&format!(
            "vspc-client: someone holds a write lock on {}; this session is read-only (your input is discarded)",
            id.name
        )),
        "{}",
        reader.stderr()
    );
    wait_consoles_within(d.admin, &id.name, 2, T).await;
    reader.write(b"from-the-reader");
    assert!(
        vm.recv_data(SHORT).await.is_empty(),
        "the read-only client's input reached the VM"
    );
    writer.write(b"from-the-writer");
    let got = vm.read_exact_data(15, T).await.expect("the writer's input");
    assert_eq!(got, b"from-the-writer");
    assert!(vm.recv_data(SHORT).await.is_empty());

    // Both see the VM's output.
    vm.send(b"to everyone").await.expect("VM send");
    assert_eq!(writer.wait_stdout(11, T).await, b"to everyone");
    assert_eq!(reader.wait_stdout(11, T).await, b"to everyone");
    reader.close_stdin();
    writer.close_stdin();
    assert_eq!(reader.code(T).await, 0);
    assert_eq!(writer.code(T).await, 0);
}

#[tokio::test]
async fn clear_ends_sessions() {
    let d = Daemon::start(&[]);
    let id = Identity::numbered(140);
    let (_vm, _) = vm_up(&d, &id).await;
    let mut c = Client::start(&d, &[&id.name]);
    wait_consoles_within(d.admin, &id.name, 1, T).await;

    let (code, out, err) = run_client(&d, &["--clear", &id.name]).await;
    assert_eq!(code, 0, "stderr: {err}");
    assert_eq!(out, format!("cleared 1 console(s) of {}\n", id.name));

    assert_eq!(c.code(T).await, 0, "stderr: {}", c.stderr());
    assert!(
        c.stderr()
            .contains("\r\nvspc-client: connection closed by the server"),
        "{:?}",
        c.stderr()
    );
    assert!(
        String::from_utf8_lossy(&c.stdout()).contains("cleared by an administrator"),
        "the server's goodbye should reach stdout: {:?}",
        String::from_utf8_lossy(&c.stdout())
    );
    wait_consoles_within(d.admin, &id.name, 0, T).await;

    let (code, out, err) = run_client(&d, &["--clear", &id.uuid_display()]).await;
    assert_eq!(code, 0, "stderr: {err}");
    assert!(out.starts_with("cleared 0 console(s)"), "{out}");
}

#[tokio::test]
async fn no_server_is_one_line_and_status_1() {
    let port = free_port();
    let admin: SocketAddr = ([127, 0, 0, 1], port).into();
    for args in [&[][..], &["some-vm"][..]] {
        let mut c = Client::start_at(admin, args);
        c.close_stdin();
        assert_eq!(c.code(T).await, 1);
        let err = c.stderr();
        assert_eq!(err.lines().count(), 1, "{err:?}");
        assert!(
            err.starts_with(&format!(
                "vspc-client: cannot connect to 127.0.0.1:{port}: "
            )),
            "{err:?}"
        );
        assert!(c.stdout().is_empty());
    }
}

#[tokio::test]
async fn usage_errors_are_status_2() {
    let d = Daemon::start(&[]);
    for args in [
        &["--client-lock-mode", "bogus", "vm"][..],
        &["--json", "vm"][..],
        &["--no-such-flag"][..],
    ] {
        let (code, _, err) = run_client(&d, args).await;
        assert_eq!(code, 2, "{args:?}: {err}");
    }
}

// ---------------------------------------------------------------------------
// Under a pseudo-terminal: raw mode, the escape menu, and the terminal
// restored. tests/client_pty.py drives the terminal; this side plays the VM
// and the admin. The script prints `MARK name` lines when it needs this side
// to act, and waits for a `go` line on its stdin between its two runs.

/// The script's output so far.
struct Script {
    child: Child,
    stdin: Option<ChildStdin>,
    out: Arc<Mutex<String>>,
}

impl Script {
    fn output(&self) -> String {
        self.out.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    async fn wait_mark(&self, mark: &str, limit: Duration) {
        let line = format!("MARK {mark}\n");
        assert!(
            eventually(limit, || self.output().contains(&line)).await,
            "no {line:?} from the script within {limit:?}; its output:\n{}",
            self.output()
        );
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("----- client_pty.py output -----\n{}-----", self.output());
        }
    }
}

#[tokio::test]
async fn terminal_is_restored() {
    if Command::new("python3").arg("--version").output().is_err() {
        println!("python3 not found: skipping the pseudo-terminal test");
        return;
    }
    let d = Daemon::start(&[]);
    let id = Identity::numbered(150);
    let (vm, _) = vm_up(&d, &id).await;
    let script_path = repo_root().join("tests/client_pty.py");
    let mut child = Command::new("python3")
        .arg(&script_path)
        .arg(CLIENT)
        .arg(d.admin.port().to_string())
        .arg(&id.name)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python3");
    let out = Arc::new(Mutex::new(String::new()));
    for pipe in [
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let out = out.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { return };
                let mut out = out.lock().unwrap_or_else(|e| e.into_inner());
                out.push_str(&line);
                out.push('\n');
            }
        });
    }
    let mut script = Script {
        stdin: child.stdin.take(),
        child,
        out,
    };

    // Run 1: output, typing, the menu (continue), more typing, quit.
    wait_consoles_within(d.admin, &id.name, 1, 2 * T).await;
    vm.send(b"hello-from-vm-1\r\n").await.expect("VM send");
    let got = vm.read_exact_data(14, 3 * T).await.unwrap_or_else(|e| {
        panic!(
            "the VM did not get the typed text: {e}; script output:\n{}",
            script.output()
        )
    });
    assert_eq!(got, b"typed-1typed-2", "only the typed text reaches the VM");
    script.wait_mark("run1-done", 2 * T).await;
    wait_consoles_within(d.admin, &id.name, 0, T).await;
    assert!(
        vm.recv_data(SHORT).await.is_empty(),
        "nothing else reached the VM"
    );

    // Run 2: the server closes the session.
    if let Some(stdin) = script.stdin.as_mut() {
        stdin.write_all(b"go\n").expect("tell the script to go on");
        stdin.flush().expect("flush");
    }
    wait_consoles_within(d.admin, &id.name, 1, 2 * T).await;
    vm.send(b"hello-from-vm-2\r\n").await.expect("VM send");
    script.wait_mark("run2-ready", T).await;
    let answer = native(d.admin, &format!("clear {}", id.name)).await;
    assert_eq!(answer["cleared"], 1, "{answer}");

    let Some(status) = child_exit(&mut script.child, 3 * T).await else {
        panic!(
            "the script did not finish; its output:\n{}",
            script.output()
        )
    };
    // The reader threads may still be collecting the last lines.
    eventually(T, || script.output().contains("ALL OK")).await;
    assert!(
        status.success(),
        "client_pty.py failed ({status}); its output:\n{}",
        script.output()
    );
    assert!(script.output().contains("ALL OK"), "{}", script.output());
}
