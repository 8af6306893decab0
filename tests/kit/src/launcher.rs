//! The launcher: start the real `vspc` binary on private ports (or given
//! ones, see [`crate::ports`]), capture its log, stop it. The end-to-end
//! tests and the load tool both start daemons through it.
//!
//! The load tool gives fixed ports, its own binary, a log file and a
//! process group of the daemon's own (see [`DaemonBuilder`]). The daemon is
//! killed (SIGKILL) when its [`Daemon`] is dropped, unless it was stopped
//! before ([`Daemon::terminate`]), and its log is printed when the test is
//! failing (or always, with `VSPC_TEST_LOG=1`).

use std::net::{SocketAddr, TcpStream as StdTcpStream};
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::ports::{bin, free_port, free_range};
use crate::process::{collect, LogTo, Process};

/// How many console ports each daemon's range is checked for.
const RANGE_LEN: u16 = 16;

/// A running `vspc` process.
pub struct Daemon {
    process: Process,
    /// Where simulated VMs connect.
    pub proxy: SocketAddr,
    /// The admin (query) port.
    pub admin: SocketAddr,
    /// The first console port (`-r`).
    pub range_start: u16,
    /// Address of the admin and console listeners.
    pub local: std::net::IpAddr,
}

/// Options for [`Daemon`]; ports are added by [`DaemonBuilder::start`].
#[derive(Clone)]
pub struct DaemonBuilder {
    args: Vec<String>,
    envs: Vec<(String, String)>,
    proxy_iface: String,
    /// `--admin-iface` and `--interface` (console ports).
    local_iface: String,
    /// A command the daemon runs under (e.g. `prlimit --nofile=40:40 --`).
    wrapper: Vec<String>,
    /// Fixed `--proxy-port`, `--admin-port` and `-r` (random when `None`).
    proxy_port: Option<u16>,
    admin_port: Option<u16>,
    range_start: Option<u16>,
    /// The binary ([`bin`] when `None`).
    binary: Option<PathBuf>,
    log_to: LogTo,
    own_group: bool,
}

impl DaemonBuilder {
    pub fn arg(mut self, a: &str) -> Self {
        self.args.push(a.to_string());
        self
    }

    pub fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.envs.push((key.into(), value.into()));
        self
    }

    /// `--proxy-iface` (default 127.0.0.1).
    pub fn proxy_iface(mut self, iface: &str) -> Self {
        self.proxy_iface = iface.into();
        self
    }

    /// `--admin-iface` and `--interface` (default 127.0.0.1).
    pub fn local_iface(mut self, iface: &str) -> Self {
        self.local_iface = iface.into();
        self
    }

    /// Run the daemon under `wrapper` (a program and its arguments that end
    /// by running the daemon's command line, as `prlimit ... --` does).
    pub fn wrapped(mut self, wrapper: &[&str]) -> Self {
        self.wrapper = wrapper.iter().map(|a| a.to_string()).collect();
        self
    }

    /// Use this `--proxy-port` instead of a random one.
    pub fn proxy_port(mut self, port: u16) -> Self {
        self.proxy_port = Some(port);
        self
    }

    /// Use this `--admin-port` instead of a random one.
    pub fn admin_port(mut self, port: u16) -> Self {
        self.admin_port = Some(port);
        self
    }

    /// Use this `-r` (first console port) instead of a random one.
    pub fn range_start(mut self, port: u16) -> Self {
        self.range_start = Some(port);
        self
    }

    /// Run this binary instead of [`bin`].
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.binary = Some(path.into());
        self
    }

    /// Write the daemon's log to a file in a new directory `PREFIX.*` in
    /// the temporary directory, kept after a failure, instead of keeping
    /// it in memory (see [`LogTo::TempDir`]).
    pub fn log_to_temp_dir(mut self, prefix: &str) -> Self {
        self.log_to = LogTo::TempDir(prefix.into());
        self
    }

    /// Start the daemon in a process group of its own, so that a terminal's
    /// Ctrl-C reaches only the caller (which then stops it).
    pub fn own_process_group(mut self) -> Self {
        self.own_group = true;
        self
    }

    /// The proxy port, admin port and console range of `d`: for starting
    /// the daemon again after [`Daemon::kill9`].
    pub fn same_ports_as(self, d: &Daemon) -> Self {
        self.proxy_port(d.proxy.port())
            .admin_port(d.admin.port())
            .range_start(d.range_start)
    }

    /// Start the daemon and wait until it is ready; panics (with its log)
    /// if it does not come up. Retries with other ports if a port was taken
    /// by someone else in the meantime.
    pub fn start(self) -> Daemon {
        self.try_start().unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`DaemonBuilder::start`], with the failure as a value: what went
    /// wrong, the daemon's exit status and last log line if it exited, and
    /// its log (or where it is).
    pub fn try_start(self) -> Result<Daemon, String> {
        let ip: std::net::IpAddr = self
            .proxy_iface
            .parse()
            .map_err(|e| format!("proxy iface {:?}: {e}", self.proxy_iface))?;
        let local: std::net::IpAddr = self
            .local_iface
            .parse()
            .map_err(|e| format!("local iface {:?}: {e}", self.local_iface))?;
        let binary = self.binary.clone().unwrap_or_else(|| bin().into());
        for attempt in 0..3 {
            let proxy_port = self.proxy_port.unwrap_or_else(free_port);
            let admin_port = self.admin_port.unwrap_or_else(free_port);
            let range_start = self.range_start.unwrap_or_else(|| free_range(RANGE_LEN));
            let mut cmd = match self.wrapper.split_first() {
                Some((prog, rest)) => {
                    let mut c = Command::new(prog);
                    c.args(rest).arg(&binary);
                    c
                }
                None => Command::new(&binary),
            };
            cmd.args(["--proxy-iface", &self.proxy_iface])
                .args(["--admin-iface", &self.local_iface])
                .args(["--interface", &self.local_iface])
                .args(["--proxy-port", &proxy_port.to_string()])
                .args(["--admin-port", &admin_port.to_string()])
                .args(["-r", &range_start.to_string()])
                .args(&self.args)
                .env_remove("SUPPORT_MULTI_CONSOLE")
                .env_remove("VM_CLIENT_LIMIT")
                .envs(self.envs.iter().map(|(k, v)| (k, v)))
                .stdin(Stdio::null());
            let process = Process::spawn(cmd, &self.log_to, self.own_group)?;
            let mut daemon = Daemon {
                process,
                proxy: SocketAddr::new(ip, proxy_port),
                admin: SocketAddr::new(local, admin_port),
                local,
                range_start,
            };
            match daemon.wait_ready(Duration::from_secs(15)) {
                Ok(()) => return Ok(daemon),
                Err(why) => {
                    let log = daemon.log();
                    let port_clash = log.contains("in use") || log.contains("AddrInUse");
                    if attempt < 2 && port_clash {
                        daemon.process.kill();
                        daemon.process.discard_log();
                        // Fixed ports may still be held by a process that
                        // is going away: give it a moment.
                        std::thread::sleep(Duration::from_millis(200));
                        continue;
                    }
                    return Err(daemon.process.failed(&format!(
                        "{} did not start ({why}); args {:?}",
                        binary.display(),
                        self.args
                    )));
                }
            }
        }
        unreachable!("the last attempt returns")
    }
}

impl Daemon {
    pub fn builder() -> DaemonBuilder {
        DaemonBuilder {
            args: Vec::new(),
            envs: Vec::new(),
            proxy_iface: "127.0.0.1".into(),
            local_iface: "127.0.0.1".into(),
            wrapper: Vec::new(),
            proxy_port: None,
            admin_port: None,
            range_start: None,
            binary: None,
            log_to: LogTo::Memory,
            own_group: false,
        }
    }

    /// Start with extra arguments.
    pub fn start(args: &[&str]) -> Daemon {
        Daemon::builder().args(args).start()
    }

    /// Ready: the admin port and the proxy port both accept a TCP
    /// connection (the daemon binds every listener before it accepts).
    fn wait_ready(&mut self, limit: Duration) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        let probe = |a: SocketAddr| StdTcpStream::connect_timeout(&a, Duration::from_millis(200));
        loop {
            if self.process.exited().is_some() {
                return Err("it stopped before its ports accepted connections".into());
            }
            if probe(self.admin).is_ok() && probe(self.proxy).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "admin {} and proxy {} did not accept connections within {limit:?}",
                    self.admin, self.proxy
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything the daemon logged so far (stderr; stdout lines prefixed,
    /// unless the log goes to a file).
    pub fn log(&self) -> String {
        self.process.log()
    }

    /// Wait until the log contains `needle`.
    pub async fn wait_log(&self, needle: &str, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.log().contains(needle) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.log().contains(needle)
    }

    /// Wait until the log holds at least `n` lines with `needle`.
    pub async fn wait_log_count(&self, needle: &str, n: usize, limit: Duration) -> bool {
        crate::wait::eventually(limit, || self.log().matches(needle).count() >= n).await
    }

    /// A console port's address (`--interface` is 127.0.0.1).
    pub fn console(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.local, port)
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.process.running()
    }

    /// SIGKILL the daemon and wait for it to be gone; its log is kept (see
    /// [`Daemon::log`]).
    pub fn kill9(&mut self) {
        self.process.kill();
    }

    /// Stop the daemon with SIGTERM, as an init system does, and wait up to
    /// `limit` for it to exit (see [`Process::terminate`]).
    pub async fn terminate(&mut self, limit: Duration) -> Result<(), String> {
        self.process.terminate(limit).await
    }

    /// The daemon's process: its exit status, log file, last log line.
    pub fn process(&mut self) -> &mut Process {
        &mut self.process
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.process.kill();
        if std::thread::panicking() || std::env::var_os("VSPC_TEST_LOG").is_some() {
            eprintln!(
                "----- vspc log (proxy {}, admin {}, -r {}) -----\n{}----- end of vspc log -----",
                self.proxy,
                self.admin,
                self.range_start,
                self.log()
            );
        }
    }
}

/// How a short-lived run of the binary ended.
pub struct Exit {
    /// `None` if it was still running at the time limit (then killed).
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
}

/// Run the binary with `args` and wait up to `limit` for it to exit.
pub fn run_to_exit(args: &[&str], limit: Duration) -> Exit {
    run_to_exit_env(args, &[], limit)
}

/// [`run_to_exit`] with extra environment variables.
pub fn run_to_exit_env(args: &[&str], envs: &[(&str, &str)], limit: Duration) -> Exit {
    let mut child = Command::new(bin())
        .args(args)
        .env_remove("SUPPORT_MULTI_CONSOLE")
        .env_remove("VM_CLIENT_LIMIT")
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin()));
    let out = Arc::new(Mutex::new(String::new()));
    let err = Arc::new(Mutex::new(String::new()));
    let threads = [
        collect(child.stdout.take(), out.clone(), ""),
        collect(child.stderr.take(), err.clone(), ""),
    ];
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    for t in threads {
        let _ = t.join();
    }
    let text = |s: &Arc<Mutex<String>>| s.lock().unwrap_or_else(|e| e.into_inner()).clone();
    Exit {
        status,
        stdout: text(&out),
        stderr: text(&err),
    }
}
