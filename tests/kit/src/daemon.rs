//! The harness: start the real `vspc` binary on private ports, capture its
//! log, query its admin port, connect over TLS, and make test data. The
//! end-to-end tests and the load tool both start daemons through it.
//!
//! By default every daemon gets its own proxy and admin ports and its own
//! console port range, picked at random in 20000..32000 and checked with a
//! bind first, so test processes running side by side do not collide; the
//! load tool gives fixed ports, its own binary, a log file and a process
//! group of the daemon's own instead (see [`DaemonBuilder`]). The daemon is
//! killed (SIGKILL) when its [`Daemon`] is dropped, unless it was stopped
//! before ([`Daemon::terminate`]), and its log is printed when the test is
//! failing (or always, with `VSPC_TEST_LOG=1`).

use std::collections::HashSet;
use std::net::{SocketAddr, TcpListener, TcpStream as StdTcpStream};
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::process::{collect, LogTo, Process};
use crate::sim::{Identity, Received, SimConsole, SimVm};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The `vspc` binary to run: `$VSPC_BIN` if set, else the `vspc` Cargo built
/// beside the running program (`target/<profile>/vspc`, found from a test
/// binary in `target/<profile>/deps/` or a tool in `target/<profile>/`).
pub fn bin() -> &'static str {
    static BIN: OnceLock<String> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(path) = std::env::var_os("VSPC_BIN") {
            return path.to_string_lossy().into_owned();
        }
        let exe = std::env::current_exe().unwrap_or_default();
        exe.ancestors()
            .skip(1)
            .take(2)
            .map(|dir| dir.join("vspc"))
            .find(|p| p.is_file())
            .unwrap_or_else(|| PathBuf::from("vspc"))
            .to_string_lossy()
            .into_owned()
    })
}
/// The usual limit for one step of a test.
pub const T: Duration = Duration::from_secs(5);
/// How many console ports each daemon's range is checked for.
const RANGE_LEN: u16 = 16;

/// The workspace root (the `vspc` package lives one level below).
pub fn repo_root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

// ---------------------------------------------------------------------------
// Ports.

fn taken() -> &'static Mutex<HashSet<u16>> {
    static TAKEN: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    TAKEN.get_or_init(|| Mutex::new(HashSet::new()))
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("getrandom");
    u64::from_le_bytes(b)
}

fn bindable(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// A port in 20000..32000 that this process has never handed out and that
/// can be bound right now.
pub fn free_port() -> u16 {
    let mut taken = taken().lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let p = 20000 + (random_u64() % 12000) as u16;
        if !taken.contains(&p) && bindable(p) {
            taken.insert(p);
            return p;
        }
    }
}

/// The start R of `len` consecutive ports in 20000..31000, none handed out
/// before and all bindable now.
pub fn free_range(len: u16) -> u16 {
    let mut taken = taken().lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let r = 20000 + (random_u64() % (11000 - u64::from(len))) as u16;
        let ports = r..r + len;
        if ports.clone().all(|p| !taken.contains(&p)) && ports.clone().all(bindable) {
            taken.extend(ports);
            return r;
        }
    }
}

// ---------------------------------------------------------------------------
// The daemon.

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

// ---------------------------------------------------------------------------
// The admin port (vSPC.py query protocol v3, vspc/PROTOCOL.md §7.1).

/// `pickle(3)`, protocol 2.
pub const PICKLE_VERSION_3: &[u8] = b"\x80\x02\x4b\x03\x2e";
/// `pickle(None)`, protocol 2.
pub const PICKLE_NONE: &[u8] = b"\x80\x02\x4e\x2e";

/// `pickle(s)` for a str, protocol 2 (BINUNICODE).
pub fn pickle_str(s: &str) -> Vec<u8> {
    let mut out = vec![0x80, 0x02, 0x58];
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
    out.push(0x2e);
    out
}

/// One row of the listing: name, uuid (display form), console port.
pub type VmRow = (String, String, Option<u16>);

/// The daemon's VM listing, like `vSPCClient` with no VM name, sorted;
/// panics on any protocol failure.
pub async fn list_vms(admin: SocketAddr) -> Vec<VmRow> {
    match try_list_vms(admin).await {
        Ok(rows) => rows,
        Err(e) => panic!("admin query on {admin} failed: {e}"),
    }
}

/// [`list_vms`], with the failure as a value.
pub async fn try_list_vms(admin: SocketAddr) -> Result<Vec<VmRow>, String> {
    let mut rows = crate::sim::list_vms(admin)
        .await
        .map_err(|e| e.to_string())?;
    rows.sort();
    Ok(rows)
}

/// Poll the listing until the VM called `name` (or with uuid `name`) has a
/// console port; returns (uuid, port).
pub async fn wait_for_vm(admin: SocketAddr, name: &str, limit: Duration) -> (String, u16) {
    let deadline = Instant::now() + limit;
    loop {
        let rows = list_vms(admin).await;
        if let Some((_, uuid, Some(port))) = rows.iter().find(|r| r.0 == name || r.1 == name) {
            return (uuid.clone(), *port);
        }
        if Instant::now() > deadline {
            panic!("VM {name:?} not listed with a port within {limit:?}; listing: {rows:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Poll the listing until `name` is gone; false if it is still there.
pub async fn wait_vm_gone(admin: SocketAddr, name: &str, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if !list_vms(admin).await.iter().any(|r| r.0 == name) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------
// Consoles.

/// Connect a console to `port` and make sure the daemon has processed its
/// negotiation answers before returning: the console types a unique marker
/// and `vm` must receive exactly it (the answers were sent before it).
pub async fn console_synced(vm: &SimVm, daemon: &Daemon, port: u16) -> SimConsole {
    let console = SimConsole::connect(daemon.console(port))
        .await
        .unwrap_or_else(|e| panic!("console on port {port}: {e}"));
    sync_console(vm, &console).await;
    console
}

/// Type a unique marker on `console` and read exactly it on `vm`.
pub async fn sync_console(vm: &SimVm, console: &SimConsole) {
    static N: AtomicU32 = AtomicU32::new(0);
    let marker = format!("<sync {}>", N.fetch_add(1, Ordering::Relaxed));
    console.send(marker.as_bytes()).await.expect("console send");
    let got = vm
        .read_exact_data(marker.len(), T)
        .await
        .unwrap_or_else(|e| panic!("VM did not get the console's sync marker: {e}"));
    assert_eq!(
        String::from_utf8_lossy(&got),
        marker,
        "VM got something else than the sync marker"
    );
}

// ---------------------------------------------------------------------------
// Data.

/// Every byte value 0..=255, `reps` times, then NUL, CR LF, CR NUL, IAC IAC
/// and a lone CR in the middle.
pub fn all_bytes(reps: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(reps * 256 + 16);
    for _ in 0..reps {
        v.extend(0..=255u8);
    }
    v.extend_from_slice(b"\0\r\n\r\0\xff\xff\rX\xff\0");
    v
}

/// A small seeded PRNG (xorshift64*), so garbage is reproducible.
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> XorShift {
        XorShift(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}

// ---------------------------------------------------------------------------
// TLS.

/// `tests/certs/<name>`.
pub fn cert_path(name: &str) -> PathBuf {
    repo_root().join("tests/certs").join(name)
}

/// A TLS client connection to `addr`: trusts `tests/certs/ca.crt` if it
/// exists, otherwise any certificate (ESXi pins a thumbprint; these tests
/// only exercise the transport).
pub async fn tls_connect(
    addr: SocketAddr,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(std::io::Error::other)?;
    let ca = cert_path("ca.crt");
    let config = if ca.exists() {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&ca).map_err(std::io::Error::other)? {
            roots
                .add(cert.map_err(std::io::Error::other)?)
                .map_err(std::io::Error::other)?;
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
            .with_no_client_auth()
    };
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from("localhost").map_err(std::io::Error::other)?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
}

/// Accepts any server certificate but still checks the handshake
/// signatures, so the TLS session itself is real.
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

// ---------------------------------------------------------------------------
// A raw connection that records exactly what the daemon sends.

/// A plain TCP connection for byte-level tests: everything the daemon sends
/// is kept as raw bytes and also decoded into commands and data.
pub struct Raw {
    pub stream: TcpStream,
    dec: vspc_codec::wire::Decoder,
    /// Every byte received.
    pub bytes: Vec<u8>,
    /// Every command received.
    pub events: Vec<Received>,
    /// Every data byte received (IAC unescaped).
    pub data: Vec<u8>,
    /// The daemon closed (EOF) or reset the connection.
    pub closed: bool,
}

impl Raw {
    pub async fn connect(addr: SocketAddr) -> Raw {
        let stream = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        stream.set_nodelay(true).expect("nodelay");
        Raw {
            stream,
            dec: vspc_codec::wire::Decoder::default(),
            bytes: Vec::new(),
            events: Vec::new(),
            data: Vec::new(),
            closed: false,
        }
    }

    /// Write `bytes` in one write.
    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// One read, unless `deadline` passes first; false on timeout.
    async fn read_some(&mut self, deadline: tokio::time::Instant) -> bool {
        if self.closed {
            return false;
        }
        let mut buf = vec![0u8; 64 * 1024];
        match tokio::time::timeout_at(deadline, self.stream.read(&mut buf)).await {
            Err(_) => false,
            Ok(Ok(0)) | Ok(Err(_)) => {
                self.closed = true;
                true
            }
            Ok(Ok(n)) => {
                self.bytes.extend_from_slice(&buf[..n]);
                let (events, data) = (&mut self.events, &mut self.data);
                self.dec
                    .decode(&buf[..n], |ev| match ev {
                        vspc_codec::wire::Event::Data(d) => data.extend_from_slice(d),
                        other => events.extend(Received::from_event(&other)),
                    })
                    .unwrap_or_else(|e| panic!("daemon sent undecodable telnet: {e}"));
                true
            }
        }
    }

    /// Read until `done` holds (true), the connection ends or `limit` passes.
    pub async fn until(&mut self, limit: Duration, done: impl Fn(&Raw) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while !done(self) {
            if !self.read_some(deadline).await
                && (self.closed || tokio::time::Instant::now() >= deadline)
            {
                return done(self);
            }
        }
        true
    }

    /// Read until at least `n` commands have arrived in total.
    pub async fn until_events(&mut self, n: usize, limit: Duration) -> bool {
        self.until(limit, |r| r.events.len() >= n).await
    }

    /// Read until at least `n` bytes have arrived in total.
    pub async fn until_bytes(&mut self, n: usize, limit: Duration) -> bool {
        self.until(limit, |r| r.bytes.len() >= n).await
    }

    /// Read whatever arrives during `period`.
    pub async fn quiet(&mut self, period: Duration) {
        let deadline = tokio::time::Instant::now() + period;
        while self.read_some(deadline).await {}
    }

    /// Read until the daemon closes the connection; false if it did not
    /// within `limit`.
    pub async fn read_to_close(&mut self, limit: Duration) -> bool {
        self.until(limit, |r| r.closed).await
    }
}

/// A short readable form of a command, for failure messages.
pub fn describe(ev: &Received) -> String {
    use vspc_codec::wire::Verb;
    match ev {
        Received::Negotiate(verb, o) => {
            let v = match verb {
                Verb::Will => "WILL",
                Verb::Wont => "WONT",
                Verb::Do => "DO",
                Verb::Dont => "DONT",
            };
            format!("{v} {o}")
        }
        Received::Vmware(body) => match body.split_first() {
            Some((code, payload)) => format!("SB232 {code:02x} [{}]", crate::sim::hex(payload)),
            None => "SB232 (empty)".into(),
        },
        Received::Subneg { option, payload } => {
            format!("SB{option} [{}]", crate::sim::hex(payload))
        }
        Received::Command(c) => format!("IAC {c:02x}"),
        Received::Malformed(m) => format!("MALFORMED {m}"),
    }
}

/// [`describe`] for a list, one per line.
pub fn describe_all(events: &[Received]) -> String {
    events
        .iter()
        .enumerate()
        .map(|(i, e)| format!("  {i:3}: {}\n", describe(e)))
        .collect()
}

/// Connect a VM and wait until it is listed; returns it and its port.
pub async fn vm_up(d: &Daemon, id: &Identity) -> (SimVm, u16) {
    let vm = SimVm::connect(d.proxy, id)
        .await
        .unwrap_or_else(|e| panic!("VM {} did not connect: {e}", id.name));
    let (_, port) = wait_for_vm(d.admin, &id.name, T).await;
    (vm, port)
}

// ---------------------------------------------------------------------------
// Waiting for the daemon: the one set of helpers every test uses.

/// Milliseconds, for short waits in tests.
pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Poll `done` every 20 ms until it holds (true) or `limit` passes (false).
pub async fn eventually(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if done() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(ms(20)).await;
    }
}

/// The line the native admin protocol answers to `cmd` (on a connection
/// of its own).
pub async fn admin_line(admin: SocketAddr, cmd: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(admin)
        .await
        .expect("admin port");
    s.write_all(format!("{cmd}\n").as_bytes())
        .await
        .expect("admin write");
    let mut out = Vec::new();
    let mut b = [0u8; 4096];
    while !out.ends_with(b"\n") {
        let n = tokio::time::timeout(T, s.read(&mut b))
            .await
            .expect("admin answer in time")
            .expect("admin read");
        assert!(n > 0, "admin port closed");
        out.extend_from_slice(&b[..n]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// How many consoles the VM called `name` has (the native `list`), if it
/// is listed.
pub async fn console_count(admin: SocketAddr, name: &str) -> Option<usize> {
    let line = admin_line(admin, "list").await;
    let v: serde_json::Value = serde_json::from_str(&line).ok()?;
    let row = v["vms"].as_array()?.iter().find(|vm| vm["name"] == name)?;
    row["consoles"].as_u64().map(|n| n as usize)
}

/// Wait until the VM called `name` has exactly `n` consoles attached, for
/// at most [`T`].
pub async fn wait_consoles(d: &Daemon, name: &str, n: usize) {
    wait_consoles_within(d.admin, name, n, T).await
}

/// [`wait_consoles`] on any admin port, for at most `limit`.
pub async fn wait_consoles_within(admin: SocketAddr, name: &str, n: usize, limit: Duration) {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let now = console_count(admin, name).await;
        if now == Some(n) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "VM {name} should have {n} console(s) within {limit:?}; the admin port says {now:?}"
        );
        tokio::time::sleep(ms(20)).await;
    }
}
