//! `vspc-bench`: the load tool. It starts a `vspc` daemon on loopback (or
//! watches one that is already running), drives simulated ESXi VMs and
//! console users at it, and prints one JSON line of measurements on stdout;
//! progress and diagnostics go to stderr.
//!
//! Modes are subcommands. `attach` connects N VMs and C consoles per VM and
//! measures how long that takes and what it costs the daemon (memory,
//! descriptors, CPU), and with `--scrape K` how long `GET /metrics` takes
//! with all of them attached.
//!
//! A daemon the bench started (through the test kit's launcher,
//! [`vspc_testkit::Daemon`]) is killed (SIGKILL) on every way out: success,
//! error, Ctrl-C or SIGTERM, and a panic. It runs in its own process group,
//! so a Ctrl-C at the terminal reaches only the bench, which then tears down.

#![forbid(unsafe_code)]

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use clap::{Args, Parser, Subcommand};
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinSet;
use vspc_testkit::sim::{self, ConsoleOptions, Identity, Role, SimConsole, SimVm, VmOptions};
use vspc_testkit::{Daemon, Process};

mod burst;
mod churn;
mod cluster;
mod fanout;
mod kinds;
mod latency;
mod relay;
mod scrape;
mod simulate;
mod soak;
mod stream;
mod vmotion;

/// Descriptors a process needs besides the per-VM ones (runtime, listeners,
/// log file, admin queries, slack).
const FD_SLACK: u64 = 64;
/// Where the kernel's ephemeral ports start when /proc does not say.
const DEFAULT_EPHEMERAL_START: u32 = 32768;
/// How long a daemon (--attach-to) or the relay may take to open its
/// listeners.
const READY_WAIT: Duration = Duration::from_secs(15);
/// Limit for one VM handshake or one console negotiation under load.
const STEP_WAIT: Duration = Duration::from_secs(30);
/// How long the admin listing may take to show every VM after the last
/// handshake finished.
const LISTING_WAIT: Duration = Duration::from_secs(60);
/// Listing poll period.
const LISTING_POLL: Duration = Duration::from_millis(50);
/// Pause before the final readings, so the daemon's allocator settles.
const SETTLE: Duration = Duration::from_secs(1);
/// A default daemon built this long before the bench gets a warning.
const STALE_DAEMON: Duration = Duration::from_secs(60);
/// Period of the progress lines on stderr.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

#[derive(Parser)]
#[command(
    name = "vspc-bench",
    version,
    about = "Load tool for vspc: drives simulated ESXi VMs and console users at a \
             daemon and prints one JSON line of measurements on stdout"
)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Connect N simulated VMs and C consoles per VM; measure the attach
    /// times and the daemon's memory, descriptors and CPU.
    Attach(AttachArgs),
    /// Simulate N ESXi VMs against an existing concentrator (echo, stream,
    /// vMotion) until Ctrl-C or --duration.
    Sim(simulate::SimArgs),
    /// Connect/attach/exchange/disconnect cycles; the daemon's descriptors
    /// and memory before and after.
    Churn(churn::ChurnArgs),
    /// Long run: streaming VMs, verifying consoles, random reconnects and
    /// vMotions; every byte checked.
    Soak(soak::SoakArgs),
    /// Fan-out throughput: N VMs stream to C consoles each through a bare
    /// TCP relay, then the same through the daemon; the ratio. The consoles
    /// are of every kind real users run (--console-kind: telnet clients
    /// that speak first or wait, and raw readers such as nc), and each must
    /// get every byte.
    Fanout(fanout::FanoutArgs),
    /// One VM writes B bytes at full speed to C consoles reading as fast as
    /// they can, while stuck consoles never read and slow ones read at a
    /// limited rate; every fast console must get every byte, undelayed.
    /// The consoles are of the kinds --console-kind gives. With `--via ssh`
    /// the consoles are OpenSSH clients logged in through the SSH front
    /// door.
    Burst(burst::BurstArgs),
    /// Console round trip through an echoing VM while other VMs stream at
    /// serial-port rate.
    Latency(latency::LatencyArgs),
    /// VMs streaming to verifying consoles while the fleet does R full
    /// vMotions per second; BEGIN→GOAHEAD and PEER→PEER-OK times.
    Vmotion(vmotion::VmotionArgs),
    /// A cluster of nodes sharing one redis-server: streaming VMs with
    /// verifying consoles on other nodes, cross-node vMotions, a node
    /// killed and restarted every --kill-every s; or with --scale V, one
    /// node's listing of V VMs spread over the nodes.
    Cluster(cluster::ClusterArgs),
    /// The bare TCP relay `fanout` compares against (a child process).
    #[command(hide = true)]
    RelayServer(relay::RelayArgs),
}

#[derive(Args)]
struct AttachArgs {
    /// Simulated VMs to connect (names sim-vm-00001, ...).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    vms: u32,

    /// Consoles to attach to each VM.
    #[arg(long, value_name = "C", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(0..=1000))]
    consoles: u32,

    /// The daemon to start [default: `vspc` next to this executable].
    #[arg(long, value_name = "PATH", conflicts_with = "attach_to")]
    vspc: Option<PathBuf>,

    /// Ports of the started daemon: proxy P, admin P+1, consoles from P+2.
    #[arg(long, value_name = "P", default_value_t = 20000, conflicts_with = "attach_to",
          value_parser = clap::value_parser!(u16).range(1..))]
    base_port: u16,

    /// Keep everything connected this many seconds after measuring (Ctrl-C
    /// ends the wait early).
    #[arg(long, value_name = "SECS", default_value_t = 0)]
    keep_open: u64,

    /// Handshakes (and console negotiations) in flight at once.
    #[arg(long, value_name = "K", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..=65536))]
    in_flight: u32,

    /// Bytes of output (lines of text) each VM prints once it is listed,
    /// before any console attaches: what fills each VM's replay ring
    /// (`--replay-bytes`), so the RSS figure includes full rings.
    #[arg(long, value_name = "BYTES", default_value_t = 0,
          value_parser = clap::value_parser!(u32).range(0..=(64 << 20)))]
    say: u32,

    /// Measure the already running daemon with this process id instead of
    /// starting one (needs --proxy and --admin).
    #[arg(long, value_name = "PID", requires_all = ["proxy", "admin"])]
    attach_to: Option<u32>,

    /// The running daemon's proxy address (with --attach-to).
    #[arg(long, value_name = "ADDR", requires = "attach_to")]
    proxy: Option<SocketAddr>,

    /// The running daemon's admin address (with --attach-to).
    #[arg(long, value_name = "ADDR", requires = "attach_to")]
    admin: Option<SocketAddr>,

    /// The running daemon's console-port address, its --interface (with
    /// --attach-to) [default: 127.0.0.1].
    #[arg(long, value_name = "ADDR", requires = "attach_to")]
    console_iface: Option<IpAddr>,

    /// Once everything is attached, fetch GET /metrics K times from the
    /// daemon's HTTP port (a started daemon gets --http-port P+2+N, just
    /// past its console ports) and report p50/max and the size.
    #[arg(long, value_name = "K", default_value_t = 0)]
    scrape: u32,

    /// The running daemon's HTTP address (with --attach-to and --scrape).
    #[arg(long, value_name = "ADDR", requires_all = ["attach_to", "scrape"])]
    http: Option<SocketAddr>,
}

/// How a run ends badly.
enum Failure {
    /// One line for stderr.
    Error(String),
    /// SIGINT or SIGTERM.
    Interrupted,
}

impl From<String> for Failure {
    fn from(msg: String) -> Self {
        Failure::Error(msg)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.mode {
        Mode::Attach(args) => attach(args),
        Mode::Sim(args) => simulate::run(args),
        Mode::Churn(args) => churn::run(args),
        Mode::Soak(args) => soak::run(args),
        Mode::Fanout(args) => fanout::run(args),
        Mode::Burst(args) => burst::run(args),
        Mode::Latency(args) => latency::run(args),
        Mode::Vmotion(args) => vmotion::run(args),
        Mode::Cluster(args) => cluster::run(args),
        Mode::RelayServer(args) => relay::serve(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Error(msg)) => {
            eprintln!("vspc-bench: {msg}");
            ExitCode::FAILURE
        }
        Err(Failure::Interrupted) => {
            eprintln!("vspc-bench: interrupted; daemon and connections torn down");
            ExitCode::from(130)
        }
    }
}

// ---------------------------------------------------------------------------
// attach

/// Which daemon a mode starts, on which ports, with which extra flags
/// (shared by the modes that start their own daemon).
#[derive(Args, Clone, Debug)]
pub(crate) struct DaemonOpts {
    /// The daemon to start [default: `vspc` next to this executable].
    #[arg(long, value_name = "PATH")]
    pub(crate) vspc: Option<PathBuf>,

    /// Ports of the started daemon: proxy P, admin P+1, consoles from P+2
    /// (below the ephemeral range); the bare relay (fanout, burst, latency)
    /// uses P and P+1 too.
    #[arg(long, value_name = "P", default_value_t = 20000,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub(crate) base_port: u16,

    /// One more daemon flag (repeatable), e.g.
    /// `--daemon-arg=--console-queue=8388608`.
    #[arg(long, value_name = "ARG", allow_hyphen_values = true)]
    pub(crate) daemon_arg: Vec<String>,
}

impl DaemonOpts {
    /// Check that `console_ports` ports from P+2 are free and below the
    /// ephemeral range, then start the daemon with `extra` flags and the
    /// `--daemon-arg`s and wait until it accepts connections.
    pub(crate) fn start(
        &self,
        console_ports: u32,
        extra: &[&str],
        rt: &tokio::runtime::Runtime,
    ) -> Result<(Daemon, Target), Failure> {
        check_ports(self.base_port, console_ports, rt)?;
        let mut flags: Vec<&str> = extra.to_vec();
        flags.extend(self.daemon_arg.iter().map(String::as_str));
        let daemon = launch(self.vspc.as_deref(), self.base_port, &flags)?;
        let target = Target::of(&daemon);
        Ok((daemon, target))
    }
}

/// The daemon being measured.
#[derive(Clone, Copy)]
struct Target {
    pid: u32,
    proxy: SocketAddr,
    admin: SocketAddr,
    console_ip: IpAddr,
    /// The HTTP listener, where the mode asked for one.
    http: Option<SocketAddr>,
}

impl Target {
    /// A daemon the bench started.
    fn of(daemon: &Daemon) -> Target {
        Target {
            pid: daemon.pid(),
            proxy: daemon.proxy,
            admin: daemon.admin,
            console_ip: daemon.local,
            http: None,
        }
    }
}

/// The JSON line of the attach mode (fields in this order).
#[derive(Serialize)]
struct AttachReport {
    mode: &'static str,
    vms: u32,
    consoles_per_vm: u32,
    /// First VM connect until the admin listing shows every VM with a port.
    attach_s: f64,
    /// First console connect until every console has received its VM's line.
    console_attach_s: f64,
    rss_start_kib: u64,
    rss_kib: u64,
    rss_per_vm_kib: f64,
    daemon_fds: u64,
    daemon_cpu_s: f64,
    /// With --scrape.
    #[serde(flatten)]
    scrape: Option<scrape::Scrapes>,
}

fn attach(args: AttachArgs) -> Result<(), Failure> {
    let n = u64::from(args.vms);
    let c = u64::from(args.consoles);

    // Descriptors: the bench holds 1 + C sockets per VM.
    let bench_limit = rlimit::increase_nofile_limit(u64::MAX)
        .map_err(|e| format!("cannot raise the open-files limit: {e}"))?;
    let bench_need = n * (1 + c) + FD_SLACK + u64::from(args.in_flight);
    if bench_need > bench_limit {
        return Err(format!(
            "--vms {n} --consoles {c} needs about {bench_need} open files in the bench, \
             but its limit is {bench_limit} (hard limit); lower --vms or --consoles"
        )
        .into());
    }

    let (rt, stop) = runtime_with_signals()?;

    let mut spawned = None;
    let target = match args.attach_to {
        Some(pid) => {
            let (Some(proxy), Some(admin)) = (args.proxy, args.admin) else {
                return Err("--attach-to needs --proxy ADDR and --admin ADDR"
                    .to_string()
                    .into());
            };
            check_daemon_fds(pid, n, c)?;
            Target {
                pid,
                proxy,
                admin,
                console_ip: args.console_iface.unwrap_or(Ipv4Addr::LOCALHOST.into()),
                http: args.http,
            }
        }
        None => {
            // The daemon inherits our (raised) limit and raises its own soft
            // limit to the same hard limit.
            let daemon_need = n * (2 + c) + FD_SLACK;
            if daemon_need > bench_limit {
                return Err(format!(
                    "--vms {n} --consoles {c} needs about {daemon_need} open files in the \
                     daemon (2 + C per VM), but its limit would be {bench_limit}; \
                     lower --vms or --consoles"
                )
                .into());
            }
            // With --scrape, the HTTP port follows the console ports.
            let http_port = u32::from(args.base_port) + 2 + args.vms;
            let scraping = args.scrape > 0;
            check_ports(args.base_port, args.vms + u32::from(scraping), &rt)?;
            let http_flag = format!("--http-port={http_port}");
            let flags: &[&str] = if scraping { &[&http_flag] } else { &[] };
            let daemon = launch(args.vspc.as_deref(), args.base_port, flags)?;
            let mut target = Target::of(&daemon);
            if scraping {
                // Below the ephemeral range, so it fits.
                let port = u16::try_from(http_port).map_err(|e| e.to_string())?;
                target.http = Some(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
            }
            spawned = Some(daemon);
            target
        }
    };

    let result = rt.block_on(async {
        tokio::select! {
            r = run_attach(&args, target, stop.clone()) => r,
            _ = stopped(stop.clone()) => Err(Failure::Interrupted),
        }
    });
    // Every simulated peer is gone with the future; now the daemon.
    rt.shutdown_background();
    match spawned {
        Some(mut daemon) => conclude(result, daemon.process()),
        None => result,
    }
}

async fn run_attach(
    args: &AttachArgs,
    target: Target,
    stop: watch::Receiver<bool>,
) -> Result<(), Failure> {
    let n = args.vms as usize;
    let c = args.consoles as usize;
    let width = args.in_flight as usize;
    wait_ready(target).await?;
    let rss_start_kib = rss_kib(target.pid)?;
    eprintln!(
        "vspc-bench: daemon pid {} ready (proxy {}, admin {}); VmRSS {rss_start_kib} KiB",
        target.pid, target.proxy, target.admin
    );

    // Phase 1: N VMs, then the listing.
    eprintln!("vspc-bench: connecting {n} VMs ({width} handshakes in flight)");
    let t0 = Instant::now();
    let proxy = target.proxy;
    let vm_opts = VmOptions {
        timeout: STEP_WAIT,
        ..VmOptions::default()
    };
    // The slowest TCP connect and the slowest telnet handshake, in µs: a
    // connect near 1 s is a SYN the daemon's full accept queue dropped.
    let slowest = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let vms = {
        let slowest = slowest.clone();
        pool("VMs connected", n, width, move |i| {
            let (vm_opts, slowest) = (vm_opts.clone(), slowest.clone());
            async move {
                let id = identity(i);
                let fail = |e: &dyn std::fmt::Display| {
                    format!("VM {} to the proxy port {proxy}: {e}", id.name)
                };
                let start = Instant::now();
                let tcp = tokio::net::TcpStream::connect(proxy)
                    .await
                    .map_err(|e| fail(&e))?;
                tcp.set_nodelay(true).map_err(|e| fail(&e))?;
                let connected = Instant::now();
                let vm = SimVm::start(tcp, &id, Role::Source, &vm_opts);
                vm.wait_ready().await.map_err(|e| fail(&e))?;
                let micros = |d: Duration| d.as_micros().try_into().unwrap_or(u64::MAX);
                slowest[0].fetch_max(micros(connected - start), Ordering::Relaxed);
                slowest[1].fetch_max(micros(connected.elapsed()), Ordering::Relaxed);
                Ok(vm)
            }
        })
        .await?
    };
    let handshakes_s = t0.elapsed().as_secs_f64();
    let ports = wait_listed(target.admin, n).await?;
    let attach_s = t0.elapsed().as_secs_f64();
    let ms = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64 / 1000.0;
    eprintln!(
        "vspc-bench: {n} VMs attached in {attach_s:.3} s (handshakes done after \
         {handshakes_s:.3} s; slowest TCP connect {:.1} ms, slowest handshake {:.1} ms)",
        ms(&slowest[0]),
        ms(&slowest[1])
    );

    let vms = Arc::new(vms);
    if args.say > 0 {
        // Lines of printable text, as a booting VM prints them.
        let line = b"[    0.000000] vspc-bench: the VM says something before anyone came\r\n";
        let text: Arc<Vec<u8>> = Arc::new(
            line.iter()
                .copied()
                .cycle()
                .take(args.say as usize)
                .collect(),
        );
        eprintln!("vspc-bench: each VM prints {} bytes", args.say);
        let vms = vms.clone();
        pool("VMs printed", n, width, move |i| {
            let (vms, text) = (vms.clone(), text.clone());
            async move { vms[i].send(&text).await.map_err(|e| e.to_string()) }
        })
        .await?;
        // Taken in and delivered (no console holds anything back).
        tokio::time::sleep(SETTLE).await;
    }

    // Phase 2: C consoles per VM, each proved to receive its VM's line.
    let t1 = Instant::now();
    let ports = Arc::new(ports);
    let ip = target.console_ip;
    let console_opts = ConsoleOptions {
        timeout: STEP_WAIT,
        ..ConsoleOptions::default()
    };
    eprintln!("vspc-bench: attaching {} consoles ({c} per VM)", n * c);
    let consoles = if c == 0 {
        Vec::new()
    } else {
        let ports = ports.clone();
        pool("consoles negotiated", n * c, width, move |k| {
            let (vm, port) = (k / c, ports[k / c]);
            let opts = console_opts.clone();
            async move {
                let console = SimConsole::connect_with((ip, port), &opts)
                    .await
                    .map_err(|e| format!("console of {} on {ip}:{port}: {e}", identity(vm).name))?;
                if let Some(reason) = console.closed() {
                    let said = console.recv_data(Duration::ZERO).await;
                    return Err(format!(
                        "console of {} on {ip}:{port} was closed by the daemon ({reason}): {:?}",
                        identity(vm).name,
                        String::from_utf8_lossy(&said).trim_end()
                    ));
                }
                Ok(console)
            }
        })
        .await?
    };
    let consoles = Arc::new(consoles);
    if c > 0 {
        let nonce = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let (vms, consoles) = (vms.clone(), consoles.clone());
        pool("VMs verified", n, width, move |i| {
            let (vms, consoles) = (vms.clone(), consoles.clone());
            async move { verify(i, c, nonce, &vms, &consoles).await }
        })
        .await?;
    }
    let console_attach_s = t1.elapsed().as_secs_f64();
    eprintln!(
        "vspc-bench: {} consoles attached and verified in {console_attach_s:.3} s",
        n * c
    );

    tokio::time::sleep(SETTLE).await;
    let rss = rss_kib(target.pid)?;
    let (daemon_fds, daemon_cpu_s) = (fd_count(target.pid)?, cpu_s(target.pid)?);
    let scrape = match (args.scrape, target.http) {
        (0, _) => None,
        (k, Some(http)) => {
            eprintln!("vspc-bench: GET http://{http}/metrics {k} times");
            Some(scrape::scrape(http, k).await?)
        }
        (_, None) => {
            return Err("--scrape with --attach-to needs --http ADDR"
                .to_string()
                .into())
        }
    };
    let report = AttachReport {
        mode: "attach",
        vms: args.vms,
        consoles_per_vm: args.consoles,
        attach_s: round(attach_s, 3),
        console_attach_s: round(console_attach_s, 3),
        rss_start_kib,
        rss_kib: rss,
        rss_per_vm_kib: round((rss as f64 - rss_start_kib as f64) / n as f64, 2),
        daemon_fds,
        daemon_cpu_s: round(daemon_cpu_s, 2),
        scrape,
    };
    if let Ok(own) = rss_kib(std::process::id()) {
        eprintln!("vspc-bench: the bench's own VmRSS is {own} KiB");
    }
    let line =
        serde_json::to_string(&report).map_err(|e| format!("cannot format the report: {e}"))?;
    println!("{line}");

    if args.keep_open > 0 {
        eprintln!(
            "vspc-bench: keeping {n} VMs and {} consoles connected for {} s \
             (proxy {}, admin {}; Ctrl-C ends early)",
            n * c,
            args.keep_open,
            target.proxy,
            target.admin
        );
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(args.keep_open)) => {}
            _ = stopped(stop) => eprintln!("vspc-bench: keep-open ended by a signal"),
        }
    }
    eprintln!("vspc-bench: tearing down");
    Ok(())
}

/// VM number `i` (0-based) of this run: `sim-vm-00001` for 0.
fn identity(i: usize) -> Identity {
    Identity::numbered(i as u32 + 1)
}

/// VM `i` sends one unique line; each of its consoles must receive exactly it.
async fn verify(
    i: usize,
    c: usize,
    nonce: u64,
    vms: &[SimVm],
    consoles: &[SimConsole],
) -> Result<(), String> {
    let name = identity(i).name;
    let line = format!("vspc-bench {name} {nonce:016x}\n");
    let vm = vms
        .get(i)
        .ok_or_else(|| format!("internal error: no VM {i}"))?;
    vm.send(line.as_bytes())
        .await
        .map_err(|e| format!("VM {name} sending its line: {e}"))?;
    for j in 0..c {
        let console = consoles
            .get(i * c + j)
            .ok_or_else(|| format!("internal error: no console {j} of VM {i}"))?;
        let got = console
            .read_until(b"\n", STEP_WAIT)
            .await
            .map_err(|e| format!("console {j} of {name} waiting for its VM's line: {e}"))?;
        if got != line.as_bytes() {
            return Err(format!(
                "console {j} of {name} received {:?}, expected {:?}",
                String::from_utf8_lossy(&got),
                line
            ));
        }
    }
    Ok(())
}

/// Poll the admin listing until every VM of this run is there with a
/// console port; returns the ports, by VM.
async fn wait_listed(admin: SocketAddr, n: usize) -> Result<Vec<u16>, String> {
    let start = Instant::now();
    loop {
        let rows = sim::list_vms(admin)
            .await
            .map_err(|e| format!("admin listing from {admin}: {e}"))?;
        let (ports, found) = match_listing(&rows, n)?;
        if found == n {
            return Ok(ports);
        }
        if start.elapsed() > LISTING_WAIT {
            return Err(format!(
                "the admin listing shows only {found} of {n} VMs with a console port \
                 {:.0} s after the last handshake ({} rows in all)",
                LISTING_WAIT.as_secs_f64(),
                rows.len()
            ));
        }
        tokio::time::sleep(LISTING_POLL).await;
    }
}

/// The console port of each VM of this run found in `rows` (0 where it is
/// missing) and how many were found; an error if the daemon lists one port
/// for two VMs.
fn match_listing(
    rows: &[(String, String, Option<u16>)],
    n: usize,
) -> Result<(Vec<u16>, usize), String> {
    use std::collections::HashMap;
    let by_uuid: HashMap<&str, (&str, Option<u16>)> = rows
        .iter()
        .map(|(name, uuid, port)| (uuid.as_str(), (name.as_str(), *port)))
        .collect();
    let mut owner: HashMap<u16, usize> = HashMap::with_capacity(n);
    let mut ports = vec![0u16; n];
    let mut found = 0;
    for (i, slot) in ports.iter_mut().enumerate() {
        let id = identity(i);
        let Some(&(name, Some(port))) = by_uuid.get(id.uuid_display().as_str()) else {
            continue;
        };
        if name != id.name {
            return Err(format!(
                "the admin listing names VM {} ({}) {name:?}",
                id.name,
                id.uuid_display()
            ));
        }
        if let Some(other) = owner.insert(port, i) {
            return Err(format!(
                "the admin listing gives console port {port} to both {} and {}",
                identity(other).name,
                id.name
            ));
        }
        *slot = port;
        found += 1;
    }
    Ok((ports, found))
}

/// Run `job(0..total)` with at most `width` jobs at once; the results in
/// index order, or the first error (the other jobs are then dropped).
async fn pool<T, F, Fut>(what: &str, total: usize, width: usize, job: F) -> Result<Vec<T>, String>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<T, String>> + Send + 'static,
{
    let job = Arc::new(job);
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let mut workers = JoinSet::new();
    for _ in 0..width.min(total) {
        let (job, next, done) = (job.clone(), next.clone(), done.clone());
        workers.spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return Ok::<_, String>(out);
                }
                out.push((i, job(i).await?));
                done.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    let mut slots: Vec<Option<T>> = std::iter::repeat_with(|| None).take(total).collect();
    let start = tokio::time::Instant::now() + PROGRESS_EVERY;
    let mut ticker = tokio::time::interval_at(start, PROGRESS_EVERY);
    loop {
        tokio::select! {
            joined = workers.join_next() => match joined {
                None => break,
                Some(Ok(Ok(items))) => {
                    for (i, item) in items {
                        if let Some(slot) = slots.get_mut(i) {
                            *slot = Some(item);
                        }
                    }
                }
                Some(Ok(Err(e))) => return Err(e),
                Some(Err(e)) => return Err(format!("a worker ({what}) failed: {e}")),
            },
            _ = ticker.tick() => {
                eprintln!("vspc-bench:   {what}: {}/{total}", done.load(Ordering::Relaxed));
            }
        }
    }
    slots
        .into_iter()
        .enumerate()
        .map(|(i, slot)| slot.ok_or_else(|| format!("internal error: job {i} ({what}) lost")))
        .collect()
}

/// Wait until the daemon's admin and proxy ports accept connections (a
/// daemon the bench started is ready when [`launch`] returns it; this is for
/// `--attach-to`).
async fn wait_ready(target: Target) -> Result<(), String> {
    let start = Instant::now();
    let probe = |addr: SocketAddr| async move {
        matches!(
            tokio::time::timeout(
                Duration::from_millis(500),
                tokio::net::TcpStream::connect(addr)
            )
            .await,
            Ok(Ok(_))
        )
    };
    loop {
        if !Path::new(&format!("/proc/{}", target.pid)).exists() {
            return Err(format!("no process {} (--attach-to)", target.pid));
        }
        if probe(target.admin).await && probe(target.proxy).await {
            return Ok(());
        }
        if start.elapsed() > READY_WAIT {
            return Err(format!(
                "the daemon did not accept connections on admin {} and proxy {} within {} s",
                target.admin,
                target.proxy,
                READY_WAIT.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `console ports P+2 .. P+2+N` must stay below the ephemeral range (or
/// they would collide with the bench's own outgoing connections), and all
/// ports from P on must be free now.
fn check_ports(base: u16, vms: u32, rt: &tokio::runtime::Runtime) -> Result<(), String> {
    let ephemeral = ephemeral_start();
    let end = u32::from(base) + 2 + vms; // one past the last console port
    if end > ephemeral {
        return Err(format!(
            "--base-port {base} with --vms {vms} puts console ports at {}..{}, into the \
             ephemeral port range (from {ephemeral}) where the bench's own connections \
             get their ports; lower --base-port or --vms",
            u32::from(base) + 2,
            end - 1
        ));
    }
    let _enter = rt.enter();
    for port in u32::from(base)..end {
        let port = port as u16; // below `ephemeral`, so it fits
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        // SO_REUSEADDR as the daemon binds: TIME_WAIT left by an earlier
        // run does not count, a listener does.
        let bound = tokio::net::TcpSocket::new_v4()
            .and_then(|s| s.set_reuseaddr(true).map(|()| s))
            .and_then(|s| s.bind(addr));
        if let Err(e) = bound {
            return Err(format!(
                "port {port} on 127.0.0.1 is not free ({e}); the daemon needs {base}..{} \
                 (proxy, admin, consoles): choose another --base-port",
                end - 1
            ));
        }
    }
    Ok(())
}

/// The first ephemeral port (`/proc/sys/net/ipv4/ip_local_port_range`).
fn ephemeral_start() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(DEFAULT_EPHEMERAL_START)
}

/// `vspc` next to this executable; warns if it was built well before the
/// bench (`cargo run --bin vspc-bench` does not rebuild it).
fn default_daemon() -> Result<PathBuf, String> {
    let exe = std::env::current_exe()
        .map_err(|e| format!("cannot find this executable's directory: {e}"))?;
    let path = exe.with_file_name("vspc");
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    if let (Some(daemon), Some(bench)) = (mtime(&path), mtime(&exe)) {
        // One cargo build links both within seconds of each other.
        if bench.duration_since(daemon).is_ok_and(|d| d > STALE_DAEMON) {
            eprintln!(
                "vspc-bench: warning: {} was built {} s before this bench and may be \
                 stale; `cargo build -p vspc --bins` rebuilds both",
                path.display(),
                bench.duration_since(daemon).map_or(0, |d| d.as_secs())
            );
        }
    }
    Ok(path)
}

/// With --attach-to: the daemon's open-files soft limit must hold N VMs.
fn check_daemon_fds(pid: u32, n: u64, c: u64) -> Result<(), String> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .map_err(|e| format!("cannot read /proc/{pid}/limits (--attach-to {pid}): {e}"))?;
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .ok_or_else(|| format!("no open-files limit in /proc/{pid}/limits"))?;
    let Ok(soft) = soft.parse::<u64>() else {
        return Ok(()); // "unlimited"
    };
    let open = fd_count(pid)?;
    let need = open + n * (2 + c) + FD_SLACK;
    if need > soft {
        return Err(format!(
            "--vms {n} --consoles {c} needs about {need} open files in daemon {pid} \
             ({open} open now, 2 + C per VM), but its limit is {soft}; lower --vms or --consoles"
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The daemon the bench started.

/// Start the daemon at `vspc` (default: `vspc` next to this executable) on
/// loopback, proxy port `base`, admin `base`+1, console ports from `base`+2,
/// with `flags`, and wait until it accepts connections. It runs in a process
/// group of its own and logs into a private temporary directory, which
/// [`conclude`] removes unless the run failed.
fn launch(vspc: Option<&Path>, base: u16, flags: &[&str]) -> Result<Daemon, String> {
    let path = match vspc {
        Some(p) => p.to_path_buf(),
        None => default_daemon()?,
    };
    if !path.is_file() {
        return Err(format!(
            "no vspc daemon at {} (build it with `cargo build -p vspc --bins`, or pass --vspc PATH)",
            path.display()
        ));
    }
    let [proxy, admin, consoles] = [0, 1, 2].map(|k| base.saturating_add(k));
    eprintln!(
        "vspc-bench: starting {} (proxy 127.0.0.1:{proxy}, admin {admin}, consoles from \
         {consoles})",
        path.display()
    );
    let mut daemon = Daemon::builder()
        .binary(&path)
        .proxy_port(proxy)
        .admin_port(admin)
        .range_start(consoles)
        .args(flags)
        .log_to_temp_dir("vspc-bench")
        .own_process_group()
        .try_start()?;
    if let Some(log) = daemon.process().log_path() {
        eprintln!("vspc-bench: daemon log {}", log.display());
    }
    Ok(daemon)
}

/// Kill a child the bench started (daemon or relay) and pass the result
/// on; a failure gets the child's exit status and last log line when it
/// had died, and keeps its log.
pub(crate) fn conclude<T>(result: Result<T, Failure>, child: &mut Process) -> Result<T, Failure> {
    match result {
        Ok(v) => {
            child.kill();
            child.discard_log();
            Ok(v)
        }
        Err(Failure::Error(msg)) => Err(child.failed(&msg).into()),
        Err(Failure::Interrupted) => {
            child.kill();
            child.discard_log();
            Err(Failure::Interrupted)
        }
    }
}

// ---------------------------------------------------------------------------
// Signals.

/// The multi-threaded runtime every mode runs on.
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))
}

/// The runtime plus a receiver that turns true at SIGINT/SIGTERM.
pub(crate) fn runtime_with_signals(
) -> Result<(tokio::runtime::Runtime, watch::Receiver<bool>), Failure> {
    let rt = runtime()?;
    let stop = {
        let _enter = rt.enter();
        watch_signals()?
    };
    Ok((rt, stop))
}

/// A receiver that turns true at the first SIGINT or SIGTERM. Must be
/// called inside the runtime.
fn watch_signals() -> Result<watch::Receiver<bool>, String> {
    use tokio::signal::unix::{signal, SignalKind};
    let register = |kind: SignalKind, name: &str| {
        signal(kind).map_err(|e| format!("cannot watch {name}: {e}"))
    };
    let mut int = register(SignalKind::interrupt(), "SIGINT")?;
    let mut term = register(SignalKind::terminate(), "SIGTERM")?;
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        let _ = tx.send(true);
        // Keep the sender, so receivers never see it dropped.
        std::future::pending::<()>().await;
    });
    Ok(rx)
}

/// Resolves once a signal has arrived.
async fn stopped(mut rx: watch::Receiver<bool>) {
    if rx.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

// ---------------------------------------------------------------------------
// /proc readings.

/// VmRSS from /proc/PID/status, in KiB.
fn rss_kib(pid: u32) -> Result<u64, String> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {path}: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| format!("no VmRSS in {path}"))
}

/// Entries of /proc/PID/fd.
fn fd_count(pid: u32) -> Result<u64, String> {
    let path = format!("/proc/{pid}/fd");
    let dir = std::fs::read_dir(&path).map_err(|e| format!("cannot list {path}: {e}"))?;
    Ok(dir.count() as u64)
}

/// utime + stime from /proc/PID/stat, in seconds.
fn cpu_s(pid: u32) -> Result<f64, String> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {path}: {e}"))?;
    // The command name (field 2) may hold spaces; fields 3.. follow its ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
    match (field(14), field(15)) {
        (Some(utime), Some(stime)) => Ok((utime + stime) as f64 / clock_ticks()),
        _ => Err(format!("cannot parse utime and stime in {path}")),
    }
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on Linux if that fails).
fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

fn round(x: f64, places: i32) -> f64 {
    let m = 10f64.powi(places);
    (x * m).round() / m
}
