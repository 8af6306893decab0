//! `vspc-bench fanout`: fan-out throughput. N VMs each send B bytes of their
//! own deterministic pattern as fast as they can; each of their C consoles
//! checks every byte against the regenerated pattern (see `stream.rs`;
//! `--pattern all-bytes` puts 0xFF in it, so telnet escaping works on both
//! legs).
//! Measured from the first byte sent to the last byte verified, first
//! through a bare TCP relay (`relay-server`, a child process), then through
//! the daemon, then (with `--logging`) through a daemon writing a
//! transcript per VM with the Logging backend, all of the same shape; the
//! ratios say what the daemon's telnet and fan-out, and its transcripts,
//! cost.
//!
//! Every console reads as fast as it can, so the daemon must get every byte
//! to every console, after the report the run fails for: a console it told
//! "skipped N bytes" (because it fell more than `--console-queue` behind);
//! a console that got a wrong byte or was closed; and a console that had
//! not received its last byte 30 s after the relay finished the same work
//! (without the relay: when no console has verified a byte for
//! `--stall-secs`).
//!
//! The consoles are of the kinds `--console-kind` says (see `kinds.rs`).
//! Connections to the daemon are set up by the simulation (handshake,
//! listing, and for consoles that speak first their negotiation) and then
//! taken out of it ([`SimVm::into_raw`]); silent consoles are only
//! connected, and the VMs start as soon as the daemon has attached them
//! all. From then on each VM is one writer task and each console one
//! reader task.

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use clap::Args;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinSet;
use vspc_codec::wire::Decoder;
use vspc_testkit::sim::{ConsoleOptions, RawConn, Role, SimConsole, SimVm, VmOptions};
use vspc_testkit::{LogTo, Process};

use super::kinds::{ByKind, ConsoleKind, KindOpts, Kinds};
use super::stream::{
    listing, stream_measured, Pattern, PatternKind, Phase, RawConsole, Reading, Shape, WireKind,
    PERIOD,
};
use super::{
    check_ports, conclude, identity, pool, round, runtime_with_signals, stopped, wait_listed,
    DaemonOpts, Failure, Target, FD_SLACK, STEP_WAIT,
};

/// How long the Logging daemon may take to exit after SIGTERM (it writes
/// out whatever its backend queue still holds first).
const STOP_WAIT: Duration = Duration::from_secs(120);
/// Transcripts are read (and compared with the pattern) this many bytes at
/// a time.
const COMPARE_BUF: usize = 512 * 1024;
/// How long after the relay finished the same work a console through the
/// daemon may still be waiting for its last byte.
pub(crate) const AFTER_RELAY: Duration = Duration::from_secs(30);
/// How often the daemon's console count is read while silent consoles
/// attach (well inside its 0.3 s detection window).
const ATTACH_POLL: Duration = Duration::from_millis(2);

#[derive(Args)]
pub struct FanoutArgs {
    #[command(flatten)]
    daemon: DaemonOpts,

    #[command(flatten)]
    kind: KindOpts,

    /// VMs sending.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100_000))]
    vms: u32,

    /// Consoles per VM.
    #[arg(long, value_name = "C", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    consoles: u32,

    /// Bytes each VM sends.
    #[arg(long, value_name = "B", value_parser = clap::value_parser!(u64).range(1..))]
    bytes_per_vm: u64,

    /// Size of each VM write (of data; more on the wire with 0xFF doubled).
    #[arg(long, value_name = "BYTES", default_value_t = 64 * 1024,
          value_parser = clap::value_parser!(u64).range(1..=(PERIOD as u64)))]
    chunk: u64,

    /// The bytes the VMs send: `no-ff`, values 0x00-0xFE (telnet escaping
    /// is a no-op); `all-bytes`, every value 0x00-0xFF evenly, so about one
    /// byte in 256 is 0xFF: the VMs double it, the daemon undoubles it and
    /// doubles it again for each console, whose decoder undoubles it.
    #[arg(long, value_enum, value_name = "KIND", default_value_t = PatternKind::NoFf)]
    pattern: PatternKind,

    /// For experiments: a VM sends at most this many bytes ahead of its
    /// slowest console, in every phase (0: no limit, VMs write at full
    /// speed as a real guest does). The daemon is meant to need no such
    /// help: it pauses reading a VM briefly for a console that lags, and a
    /// console more than --console-queue behind skips the oldest output
    /// and is told so in-band; such a notice fails this run.
    #[arg(long, value_name = "BYTES", default_value_t = 0)]
    window: u64,

    /// Handshakes (and console negotiations) in flight at once.
    #[arg(long, value_name = "K", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..=65536))]
    in_flight: u32,

    /// Without the relay phase (--no-relay): fail when no byte is verified
    /// for this long. With it, the relay runs first and a console through
    /// the daemon fails if it has not received its last byte 30 s after
    /// the relay's time for the same work.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    stall_secs: u64,

    /// After the Memory phase, the same traffic through a daemon started
    /// with `--backend Logging`, whose transcripts are then checked byte for
    /// byte (after the daemon's SIGTERM shutdown, which flushes them).
    #[arg(long)]
    logging: bool,

    /// Where --logging's transcripts go: a new directory inside DIR,
    /// removed afterwards. Use a local disk (not tmpfs): writing them is
    /// part of what is measured.
    #[arg(
        long,
        value_name = "DIR",
        default_value = "/var/tmp",
        requires = "logging"
    )]
    logging_dir: PathBuf,

    /// Measure the daemon only.
    #[arg(long)]
    no_relay: bool,
}

impl FanoutArgs {
    fn shape(&self) -> Shape {
        Shape {
            total: self.bytes_per_vm,
            chunk: usize::try_from(self.chunk).unwrap_or(usize::MAX),
            window: self.window,
            stall: Duration::from_secs(self.stall_secs),
            deadline: None,
        }
    }
}

/// The JSON line (fields in this order).
#[derive(Serialize)]
struct FanoutReport {
    mode: &'static str,
    vms: u32,
    consoles_per_vm: u32,
    bytes_per_vm: u64,
    /// N × C × B: what the consoles verified, per side.
    delivered_bytes: u64,
    /// `--console-kind`, the consoles of each kind, and how many of each
    /// got every byte in order through the daemon (the Memory phase).
    console_kind: &'static str,
    consoles_by_kind: ByKind,
    exact_by_kind: ByKind,
    pattern: &'static str,
    /// Most bytes a VM ran ahead of its slowest console (0: no limit).
    window: u64,
    vspc_s: f64,
    /// Bytes the consoles received per second (skipped ones not counted).
    vspc_mib_s: f64,
    /// Daemon CPU (user + system) per GiB delivered to consoles.
    cpu_s_per_gib: f64,
    /// The daemon's VmHWM over the whole run (setup included).
    rss_peak_kib: u64,
    /// The bench's own CPU during the daemon's streaming phase.
    bench_cpu_s: f64,
    /// Consoles the daemon told it skipped output (each one fails the run),
    /// and the bytes skipped.
    skipped_consoles: u64,
    skipped_bytes: u64,
    /// The same with `--backend Logging` (a fresh daemon).
    logging_s: Option<f64>,
    logging_mib_s: Option<f64>,
    /// logging_mib_s / vspc_mib_s.
    logging_ratio: Option<f64>,
    logging_cpu_s_per_gib: Option<f64>,
    /// That daemon's VmHWM (it ran only this phase).
    logging_rss_peak_kib: Option<u64>,
    logging_skipped_bytes: Option<u64>,
    /// SIGTERM to exit: the backend writing out what it still held.
    logging_stop_s: Option<f64>,
    /// "K of N": transcripts with exactly B bytes, all the VM's, in order.
    transcripts_complete: Option<String>,
    relay_s: Option<f64>,
    relay_mib_s: Option<f64>,
    relay_cpu_s_per_gib: Option<f64>,
    relay_rss_peak_kib: Option<u64>,
    relay_bench_cpu_s: Option<f64>,
    /// vspc_mib_s / relay_mib_s.
    ratio: Option<f64>,
}

/// What the Logging phase found.
struct Logged {
    phase: Phase,
    stop_s: f64,
    complete: usize,
    /// One line per transcript that is not exactly its VM's output.
    incomplete: Vec<String>,
}

pub fn run(args: FanoutArgs) -> Result<(), Failure> {
    let (n, c) = (u64::from(args.vms), u64::from(args.consoles));
    let kinds = args.kind.kinds(&args.daemon.daemon_arg)?;
    check_fds(n, c, u64::from(args.in_flight))?;
    let (rt, stop) = runtime_with_signals()?;
    // The daemon's ports, before the relay takes its time.
    check_ports(args.daemon.base_port, args.vms, &rt)?;
    let pattern = Arc::new(Pattern::of(args.pattern));
    // Failures found after a phase completed: reported after the JSON line.
    let mut failures = Vec::new();

    // Phase 1: the relay, same shape, same ports: how long the work takes
    // without the daemon.
    let relay = if args.no_relay {
        None
    } else {
        Some(on_relay(&rt, &stop, args.daemon.base_port, |pid| {
            relay_phase(&args, pid, pattern.clone())
        })?)
    };
    let (shape, gave_up) = match &relay {
        Some(r) => {
            let deadline = Duration::from_secs_f64(r.secs) + AFTER_RELAY;
            let shape = Shape {
                deadline: Some(deadline),
                ..args.shape()
            };
            let when = format!(
                "{} s after the relay finished the same work ({:.1} s after the first byte)",
                AFTER_RELAY.as_secs(),
                deadline.as_secs_f64()
            );
            (shape, when)
        }
        None => (
            args.shape(),
            format!(
                "when no console had verified a byte for {} s",
                args.stall_secs
            ),
        ),
    };

    // Phase 2: the daemon.
    let (mut daemon, target) = args.daemon.start(args.vms, &[], &rt)?;
    let result = rt.block_on(async {
        tokio::select! {
            r = vspc_phase(&args, "vspc", target, shape, kinds, pattern.clone()) => r,
            _ = stopped(stop.clone()) => Err(Failure::Interrupted),
        }
    });
    let vspc = conclude(result, daemon.process())?;
    failures.extend(console_failures(&vspc, "vspc", &gave_up));

    // Phase 3: the daemon writing transcripts (the VMs wait for the disk,
    // so the stall rule, not the relay's time, limits it).
    let logged = if args.logging {
        let logged = logging_phase(&args, &rt, &stop, kinds, pattern.clone())?;
        let when = format!(
            "when no console had verified a byte for {} s",
            args.stall_secs
        );
        failures.extend(console_failures(&logged.phase, "logging", &when));
        if !logged.incomplete.is_empty() {
            failures.push(format!(
                "logging: {} of {} transcripts are not exactly their VM's {} bytes: {}",
                logged.incomplete.len(),
                args.vms,
                args.bytes_per_vm,
                listing(logged.incomplete.iter().cloned())
            ));
        }
        Some(logged)
    } else {
        None
    };
    rt.shutdown_background();

    let (skipped_consoles, skipped_bytes) = vspc.skips();
    let logging = logged.as_ref().map(|l| &l.phase);
    let report = FanoutReport {
        mode: "fanout",
        vms: args.vms,
        consoles_per_vm: args.consoles,
        bytes_per_vm: args.bytes_per_vm,
        delivered_bytes: n * c * args.bytes_per_vm,
        console_kind: kinds.name(),
        consoles_by_kind: ByKind::count(vspc.consoles.iter().map(|c| (c.kind, true))),
        exact_by_kind: ByKind::count(vspc.consoles.iter().map(|c| (c.kind, c.exact()))),
        pattern: pattern.describe(),
        window: args.window,
        vspc_s: round(vspc.secs, 3),
        vspc_mib_s: round(vspc.mib_s, 1),
        cpu_s_per_gib: round(vspc.cpu_s_per_gib, 3),
        rss_peak_kib: vspc.rss_peak_kib,
        bench_cpu_s: round(vspc.bench_cpu_s, 2),
        skipped_consoles,
        skipped_bytes,
        logging_s: logging.map(|l| round(l.secs, 3)),
        logging_mib_s: logging.map(|l| round(l.mib_s, 1)),
        logging_ratio: logging.map(|l| round(l.mib_s / vspc.mib_s, 3)),
        logging_cpu_s_per_gib: logging.map(|l| round(l.cpu_s_per_gib, 3)),
        logging_rss_peak_kib: logging.map(|l| l.rss_peak_kib),
        logging_skipped_bytes: logging.map(|l| l.skips().1),
        logging_stop_s: logged.as_ref().map(|l| round(l.stop_s, 3)),
        transcripts_complete: logged
            .as_ref()
            .map(|l| format!("{} of {}", l.complete, args.vms)),
        relay_s: relay.as_ref().map(|r| round(r.secs, 3)),
        relay_mib_s: relay.as_ref().map(|r| round(r.mib_s, 1)),
        relay_cpu_s_per_gib: relay.as_ref().map(|r| round(r.cpu_s_per_gib, 3)),
        relay_rss_peak_kib: relay.as_ref().map(|r| r.rss_peak_kib),
        relay_bench_cpu_s: relay.as_ref().map(|r| round(r.bench_cpu_s, 2)),
        ratio: relay.as_ref().map(|r| round(vspc.mib_s / r.mib_s, 3)),
    };
    let line =
        serde_json::to_string(&report).map_err(|e| format!("cannot format the report: {e}"))?;
    println!("{line}");
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("\n  ").into())
    }
}

/// A phase through the daemon fails for each of: consoles that were told
/// output was skipped, consoles it gave up on before their last byte
/// (`when` it did), consoles that got a wrong byte or were closed.
fn console_failures(phase: &Phase, what: &str, when: &str) -> Vec<String> {
    [
        phase.check_skips(what),
        phase.check_unfinished(what, when),
        phase.check_wrong(what),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// Raise the open-files limit and check it holds the bench's sockets
/// (1 + C per VM) and the daemon's (2 + C per VM; the relay needs fewer).
pub(crate) fn check_fds(n: u64, c: u64, in_flight: u64) -> Result<(), String> {
    let limit = rlimit::increase_nofile_limit(u64::MAX)
        .map_err(|e| format!("cannot raise the open-files limit: {e}"))?;
    let bench = n * (1 + c) + FD_SLACK + in_flight;
    let daemon = n * (2 + c) + FD_SLACK;
    if bench.max(daemon) > limit {
        return Err(format!(
            "--vms {n} with {c} console(s) each needs about {bench} open files in the bench \
             and {daemon} in the daemon, but the limit is {limit} (hard limit); lower --vms \
             or --consoles"
        ));
    }
    Ok(())
}

/// VmHWM (peak resident set) from /proc/PID/status, in KiB.
pub(crate) fn peak_rss_kib(pid: u32) -> Result<u64, String> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {path}: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| format!("no VmHWM in {path}"))
}

// ---------------------------------------------------------------------------
// Through the daemon, with transcripts.

/// A directory removed (with its contents) when dropped, however the phase
/// ends: transcripts of a big run take gigabytes.
struct TranscriptDir(PathBuf);

impl Drop for TranscriptDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The Logging phase: a fresh daemon with `--backend Logging -l DIR`, the
/// same traffic, then SIGTERM (the daemon flushes its transcripts on the way
/// out) and every transcript compared with its VM's pattern.
fn logging_phase(
    args: &FanoutArgs,
    rt: &tokio::runtime::Runtime,
    stop: &watch::Receiver<bool>,
    kinds: Kinds,
    pattern: Arc<Pattern>,
) -> Result<Logged, Failure> {
    let stamp = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let dir = args
        .logging_dir
        .join(format!("vspc-bench-logs.{}.{stamp:x}", std::process::id()));
    std::fs::create_dir(&dir).map_err(|e| {
        format!(
            "cannot create the transcript directory {} (--logging-dir): {e}",
            dir.display()
        )
    })?;
    let dir = TranscriptDir(dir);
    if let Some(fs) = fs_type(&dir.0).filter(|t| t == "tmpfs" || t == "ramfs") {
        eprintln!(
            "vspc-bench: warning: {} is on {fs}, in memory: the Logging figure will not \
             include disk writes (choose --logging-dir on a local disk)",
            dir.0.display()
        );
    }
    let logdir = dir
        .0
        .to_str()
        .ok_or_else(|| format!("the transcript directory {} is not UTF-8", dir.0.display()))?;
    eprintln!("vspc-bench: logging: transcripts in {logdir}");
    let (mut daemon, target) =
        args.daemon
            .start(args.vms, &["--backend", "Logging", "-l", logdir], rt)?;
    let result = rt.block_on(async {
        tokio::select! {
            r = async {
                let phase =
                    vspc_phase(args, "logging", target, args.shape(), kinds, pattern.clone())
                        .await?;
                let stopping = Instant::now();
                daemon.terminate(STOP_WAIT).await?;
                Ok((phase, stopping.elapsed().as_secs_f64()))
            } => r,
            _ = stopped(stop.clone()) => Err(Failure::Interrupted),
        }
    });
    let (phase, stop_s) = conclude(result, daemon.process())?;
    eprintln!("vspc-bench: logging: daemon stopped after {stop_s:.3} s; checking transcripts");
    let mut incomplete = Vec::new();
    for vm in 0..args.vms as usize {
        if let Err(e) = check_transcript(&dir.0, vm, args.bytes_per_vm, &pattern) {
            incomplete.push(e);
        }
    }
    Ok(Logged {
        phase,
        stop_s,
        complete: args.vms as usize - incomplete.len(),
        incomplete,
    })
}

/// Is DIR/NAME.log exactly VM `vm`'s `total` bytes? If not, says how it
/// differs: its size, and the first byte that differs from the VM's output.
fn check_transcript(dir: &Path, vm: usize, total: u64, pattern: &Pattern) -> Result<(), String> {
    let name = format!("{}.log", identity(vm).name);
    let path = dir.join(&name);
    let mut file = std::fs::File::open(&path).map_err(|e| format!("{name}: {e}"))?;
    let mut buf = vec![0u8; COMPARE_BUF];
    let mut at = 0u64;
    let mut differs = None;
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| format!("{name}: read error at byte {at}: {e}"))?;
        if n == 0 {
            break;
        }
        if differs.is_none() {
            let mine = n.min(usize::try_from(total.saturating_sub(at)).unwrap_or(usize::MAX));
            differs = pattern
                .first_difference(vm, at, &buf[..mine])
                .map(|i| at + i as u64);
        }
        at += n as u64;
    }
    match (at == total, differs) {
        (true, None) => Ok(()),
        (_, Some(byte)) => Err(format!(
            "{name}: {at} bytes, differing from its VM's output from byte {byte} on"
        )),
        (false, None) => Err(format!(
            "{name}: {at} bytes, a correct start of its VM's {total}"
        )),
    }
}

/// The type of the file system holding `path` (the longest mount point
/// above it in /proc/self/mounts), if that can be told.
fn fs_type(path: &Path) -> Option<String> {
    let path = std::fs::canonicalize(path).ok()?;
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, point, fs) = (f.next()?, f.next()?, f.next()?);
            path.starts_with(point)
                .then(|| (point.len(), fs.to_string()))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, fs)| fs)
}

// ---------------------------------------------------------------------------
// Through the daemon.

/// Connect N VMs and C consoles each of the kinds `kinds` gives them, and
/// take every connection out of the simulation: the VMs' streams (by VM)
/// and the consoles (console k of the run is console k % C of VM k / C).
///
/// Consoles that speak first are connected and negotiated first (as the
/// simulator's console, then handed over). Silent ones are then only
/// connected: the daemon attaches a console at accept and tells a silent
/// one apart 0.3 s later, so this returns as soon as the daemon counts
/// every console attached (its native admin protocol's `stats`, then
/// `list` for each VM's count), and the flood that follows starts while
/// they are still being told apart.
pub(crate) async fn attach_raw(
    target: Target,
    n: usize,
    c: usize,
    width: usize,
    kinds: Kinds,
) -> Result<(Vec<TcpStream>, Vec<RawConsole>), String> {
    let proxy = target.proxy;
    let vm_opts = VmOptions {
        timeout: STEP_WAIT,
        ..VmOptions::default()
    };
    eprintln!("vspc-bench: connecting {n} VMs");
    let vms = pool("VMs connected", n, width, move |i| {
        let vm_opts = vm_opts.clone();
        async move {
            let id = identity(i);
            let fail = |e: &dyn std::fmt::Display| format!("VM {} to {proxy}: {e}", id.name);
            let tcp = TcpStream::connect(proxy).await.map_err(|e| fail(&e))?;
            tcp.set_nodelay(true).map_err(|e| fail(&e))?;
            let vm = SimVm::start(tcp, &id, Role::Source, &vm_opts);
            vm.wait_ready().await.map_err(|e| fail(&e))?;
            Ok(vm)
        }
    })
    .await?;
    let ports = Arc::new(wait_listed(target.admin, n).await?);
    // Listed means named: the handshake is over, the stream can be taken.
    let mut set = JoinSet::new();
    for (i, vm) in vms.into_iter().enumerate() {
        set.spawn(async move { (i, vm.into_raw::<TcpStream>().await) });
    }
    let mut vm_streams: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();
    while let Some(joined) = set.join_next().await {
        let (i, raw) = joined.map_err(|e| format!("a VM task failed: {e}"))?;
        let raw = raw.map_err(|e| format!("VM {}: {e}", identity(i).name))?;
        vm_streams[i] = Some(raw.stream);
    }
    let vm_streams = vm_streams
        .into_iter()
        .map(|s| s.ok_or("internal error: a VM stream went missing"))
        .collect::<Result<Vec<_>, _>>()?;

    let (loud, silent): (Vec<usize>, Vec<usize>) = (0..n * c).partition(|&k| !kinds.of(k).silent());
    eprintln!(
        "vspc-bench: attaching {} consoles ({c} per VM; --console-kind {}: {} speaking first, \
         {} silent; the daemon's --console-protocol {})",
        n * c,
        kinds.name(),
        loud.len(),
        silent.len(),
        kinds.protocol_name()
    );
    let ip = target.console_ip;
    let opts = ConsoleOptions {
        timeout: STEP_WAIT,
        ..ConsoleOptions::default()
    };
    let loud = Arc::new(loud);
    let mut consoles = {
        let (loud, ports) = (loud.clone(), ports.clone());
        pool("consoles negotiated", loud.len(), width, move |j| {
            let k = loud[j];
            let (vm, port, opts) = (k / c, ports[k / c], opts.clone());
            async move {
                let name = identity(vm).name;
                let fail =
                    |e: &dyn std::fmt::Display| format!("console of {name} on {ip}:{port}: {e}");
                let console = SimConsole::connect_with((ip, port), &opts)
                    .await
                    .map_err(|e| fail(&e))?;
                if let Some(reason) = console.closed() {
                    return Err(fail(&format!("closed by the daemon ({reason})")));
                }
                let conn = console
                    .into_raw::<TcpStream>()
                    .await
                    .map_err(|e| fail(&e))?;
                Ok(RawConsole {
                    vm,
                    index: k % c,
                    kind: Some(ConsoleKind::SpeakFirst),
                    wire: WireKind::Telnet,
                    conn,
                })
            }
        })
        .await?
    };
    if !silent.is_empty() {
        let connecting = Instant::now();
        let silent = Arc::new(silent);
        let quiet = {
            let silent = silent.clone();
            pool("silent consoles connected", silent.len(), width, move |j| {
                let k = silent[j];
                let (vm, port, kind) = (k / c, ports[k / c], kinds.of(k));
                async move {
                    let fail = |e: &dyn std::fmt::Display| {
                        format!(
                            "{} console of {} on {ip}:{port}: {e}",
                            kind.name(),
                            identity(vm).name
                        )
                    };
                    let stream = TcpStream::connect((ip, port)).await.map_err(|e| fail(&e))?;
                    stream.set_nodelay(true).map_err(|e| fail(&e))?;
                    let wire = match kind {
                        ConsoleKind::SilentRaw => WireKind::Raw(kinds.raw_prefix()),
                        ConsoleKind::SilentTelnet | ConsoleKind::SpeakFirst => {
                            WireKind::TelnetAnswering
                        }
                    };
                    Ok(RawConsole {
                        vm,
                        index: k % c,
                        kind: Some(kind),
                        wire,
                        conn: RawConn {
                            stream,
                            data: Vec::new(),
                            decoder: Decoder::default(),
                            events: Vec::new(),
                            binary: false,
                        },
                    })
                }
            })
            .await?
        };
        let connected = connecting.elapsed();
        wait_attached(target.admin, n, c).await?;
        eprintln!(
            "vspc-bench: {} silent consoles connected in {:.3} s; the daemon had attached every \
             console {:.3} s after the first connected",
            silent.len(),
            connected.as_secs_f64(),
            connecting.elapsed().as_secs_f64()
        );
        consoles.extend(quiet);
        consoles.sort_by_key(|r| r.vm * c + r.index);
    }
    Ok((vm_streams, consoles))
}

/// Poll the daemon's native admin protocol on `admin` until it has
/// attached `c` consoles to each of the `n` VMs of this run: `stats` (the
/// total, cheap) until it counts them all, then `list` to check each VM.
async fn wait_attached(admin: SocketAddr, n: usize, c: usize) -> Result<(), String> {
    let mut ask = AdminLines::connect(admin).await?;
    let want = n * c;
    let start = Instant::now();
    loop {
        let stats = ask.answer("stats").await?;
        let counted = stats["consoles"]
            .as_u64()
            .ok_or_else(|| format!("admin `stats` on {admin} gave no console count: {stats}"))?;
        let mut short = None;
        if counted >= want as u64 {
            let list = ask.answer("list").await?;
            let rows = list["vms"].as_array().ok_or_else(|| {
                format!("admin `list` on {admin} gave no VMs: {}", abbreviate(&list))
            })?;
            let by_uuid: std::collections::HashMap<&str, u64> = rows
                .iter()
                .filter_map(|r| Some((r["uuid"].as_str()?, r["consoles"].as_u64()?)))
                .collect();
            short = (0..n).find_map(|i| {
                let id = identity(i);
                let got = by_uuid
                    .get(id.uuid_display().as_str())
                    .copied()
                    .unwrap_or(0);
                (got != c as u64).then(|| format!("{} has {got}", id.name))
            });
            if short.is_none() {
                return Ok(());
            }
        }
        if start.elapsed() > STEP_WAIT {
            return Err(format!(
                "the daemon had attached {counted} of the {want} consoles ({c} per VM{}) {} s \
                 after they connected (admin `stats` and `list` on {admin})",
                short.map_or(String::new(), |s| format!("; {s}")),
                STEP_WAIT.as_secs()
            ));
        }
        tokio::time::sleep(ATTACH_POLL).await;
    }
}

/// A JSON value, cut short for a message.
fn abbreviate(v: &serde_json::Value) -> String {
    let text = v.to_string();
    match text.char_indices().nth(200) {
        Some((at, _)) => format!("{}...", &text[..at]),
        None => text,
    }
}

/// One connection to the daemon's native admin protocol: a command line,
/// a JSON line back.
struct AdminLines {
    addr: SocketAddr,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::net::tcp::OwnedReadHalf>>,
    write: tokio::net::tcp::OwnedWriteHalf,
}

impl AdminLines {
    async fn connect(addr: SocketAddr) -> Result<AdminLines, String> {
        use tokio::io::AsyncBufReadExt;
        let stream = tokio::time::timeout(STEP_WAIT, TcpStream::connect(addr))
            .await
            .map_err(|_| format!("connecting to the admin port {addr}: no answer"))?
            .map_err(|e| format!("connecting to the admin port {addr}: {e}"))?;
        let (read, write) = stream.into_split();
        Ok(AdminLines {
            addr,
            lines: tokio::io::BufReader::new(read).lines(),
            write,
        })
    }

    /// Send `command`; its answer, which must say `"ok":true`.
    async fn answer(&mut self, command: &str) -> Result<serde_json::Value, String> {
        let addr = self.addr;
        let fail = |e: &dyn std::fmt::Display| format!("admin `{command}` on {addr}: {e}");
        let exchange = async {
            self.write
                .write_all(format!("{command}\n").as_bytes())
                .await
                .map_err(|e| fail(&e))?;
            self.lines
                .next_line()
                .await
                .map_err(|e| fail(&e))?
                .ok_or_else(|| fail(&"the daemon closed the connection"))
        };
        let line = tokio::time::timeout(STEP_WAIT, exchange)
            .await
            .map_err(|_| fail(&format!("no answer in {} s", STEP_WAIT.as_secs())))??;
        let value: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| fail(&format!("not JSON ({e})")))?;
        if value["ok"] != serde_json::Value::Bool(true) {
            return Err(fail(&format!("refused: {}", abbreviate(&value))));
        }
        Ok(value)
    }
}

/// One phase through the daemon (`what` names it). How each console ended
/// is left to the caller, which reports it.
async fn vspc_phase(
    args: &FanoutArgs,
    what: &str,
    target: Target,
    shape: Shape,
    kinds: Kinds,
    pattern: Arc<Pattern>,
) -> Result<Phase, Failure> {
    let (n, c) = (args.vms as usize, args.consoles as usize);
    let (vms, consoles) = attach_raw(target, n, c, args.in_flight as usize, kinds).await?;
    stream_measured(what, target.pid, vms, all_fast(consoles), shape, pattern).await
}

/// Every console reading at full speed.
pub(crate) fn all_fast(consoles: Vec<RawConsole>) -> Vec<(RawConsole, Reading)> {
    consoles.into_iter().map(|c| (c, Reading::Fast)).collect()
}

// ---------------------------------------------------------------------------
// Through the bare relay.

/// Start `relay-server` (this executable) on ports P (VMs) and P+1
/// (consoles), in its own process group, logging into a private temporary
/// directory; it exits when we close its stdin, or on a kill.
fn spawn_relay(base: u16) -> Result<Process, String> {
    let exe = std::env::current_exe()
        .map_err(|e| format!("cannot find this executable for the relay: {e}"))?;
    let (vm_port, console_port) = (base.to_string(), base.saturating_add(1).to_string());
    let mut cmd = Command::new(&exe);
    cmd.arg("relay-server")
        .args(["--vm-port", &vm_port, "--console-port", &console_port])
        .stdin(Stdio::piped());
    let relay = Process::spawn(cmd, &LogTo::TempDir("vspc-bench-relay".into()), true)?;
    eprintln!(
        "vspc-bench: started the bare relay (VMs 127.0.0.1:{vm_port}, consoles {console_port}); \
         log {}",
        relay
            .log_path()
            .map_or("-".into(), |p| p.display().to_string())
    );
    Ok(relay)
}

/// Start the bare relay on ports `base` and `base + 1`, wait until it
/// accepts, and run `f(pid)` against it (until done or Ctrl-C); the relay
/// is stopped however that ends.
pub(crate) fn on_relay<T, F, Fut>(
    rt: &tokio::runtime::Runtime,
    stop: &watch::Receiver<bool>,
    base: u16,
    f: F,
) -> Result<T, Failure>
where
    F: FnOnce(u32) -> Fut,
    Fut: std::future::Future<Output = Result<T, Failure>>,
{
    let mut relay = spawn_relay(base)?;
    let pid = relay.pid();
    let result = rt.block_on(async {
        tokio::select! {
            r = async {
                relay_ready(&mut relay, base).await?;
                f(pid).await
            } => r,
            _ = stopped(stop.clone()) => Err(Failure::Interrupted),
        }
    });
    conclude(result, &mut relay)
}

/// Wait until the relay accepts on both ports.
async fn relay_ready(relay: &mut Process, base: u16) -> Result<(), String> {
    let start = Instant::now();
    loop {
        if relay.exited().is_some() {
            return Err("the relay stopped before accepting connections".into());
        }
        if TcpStream::connect(SocketAddr::from((Ipv4Addr::LOCALHOST, base)))
            .await
            .is_ok()
            && TcpStream::connect(SocketAddr::from((Ipv4Addr::LOCALHOST, base + 1)))
                .await
                .is_ok()
        {
            return Ok(());
        }
        if start.elapsed() > super::READY_WAIT {
            return Err("the relay did not accept connections".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Connect `c` consoles to each of `n` VMs through the relay on ports
/// `base` and `base + 1` (consoles first, as it wants).
pub(crate) async fn relay_attach(
    base: u16,
    n: usize,
    c: usize,
    width: usize,
) -> Result<(Vec<TcpStream>, Vec<RawConsole>), String> {
    let vm_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, base));
    let console_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, base + 1));
    eprintln!(
        "vspc-bench: relay: connecting {} consoles, then {n} VMs",
        n * c
    );
    let consoles = pool(
        "relay consoles connected",
        n * c,
        width,
        move |k| async move {
            let stream = relay_connect(console_addr, format!("console {}\n", k / c)).await?;
            Ok(RawConsole {
                vm: k / c,
                index: k % c,
                kind: None,
                wire: WireKind::Telnet,
                conn: RawConn {
                    stream,
                    data: Vec::new(),
                    decoder: Decoder::default(),
                    events: Vec::new(),
                    binary: true,
                },
            })
        },
    )
    .await?;
    let vms = pool("relay VMs connected", n, width, move |i| {
        relay_connect(vm_addr, format!("vm {i}\n"))
    })
    .await?;
    Ok((vms, consoles))
}

/// Connect, send the header line, expect `ok`.
async fn relay_connect(addr: SocketAddr, header: String) -> Result<TcpStream, String> {
    let fail = |e: &dyn std::fmt::Display| format!("relay {addr} ({}): {e}", header.trim_end());
    let mut s = TcpStream::connect(addr).await.map_err(|e| fail(&e))?;
    s.set_nodelay(true).map_err(|e| fail(&e))?;
    s.write_all(header.as_bytes()).await.map_err(|e| fail(&e))?;
    let mut ok = [0u8; 3];
    tokio::time::timeout(STEP_WAIT, s.read_exact(&mut ok))
        .await
        .map_err(|_| fail(&"no answer"))?
        .map_err(|e| fail(&e))?;
    if ok != super::relay::OK {
        return Err(fail(&format!(
            "answered {:?}",
            String::from_utf8_lossy(&ok)
        )));
    }
    Ok(s)
}

async fn relay_phase(args: &FanoutArgs, pid: u32, pattern: Arc<Pattern>) -> Result<Phase, Failure> {
    let (n, c) = (args.vms as usize, args.consoles as usize);
    let (vms, consoles) =
        relay_attach(args.daemon.base_port, n, c, args.in_flight as usize).await?;
    let phase =
        stream_measured("relay", pid, vms, all_fast(consoles), args.shape(), pattern).await?;
    phase.check_errors("relay")?;
    Ok(phase)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transcripts_are_checked_byte_for_byte() {
        let dir =
            std::env::temp_dir().join(format!("vspc-bench-transcript-test.{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create a test directory");
        let _cleanup = TranscriptDir(dir.clone());
        let pattern = Pattern::new();
        let total = 3 * COMPARE_BUF as u64 + 17;
        let mut whole = Vec::new();
        while (whole.len() as u64) < total {
            let len = (total as usize - whole.len()).min(COMPARE_BUF);
            whole.extend_from_slice(pattern.piece(0, whole.len() as u64, len));
        }
        let path = dir.join(format!("{}.log", identity(0).name));
        let check = |bytes: &[u8]| {
            std::fs::write(&path, bytes).expect("write a transcript");
            check_transcript(&dir, 0, total, &pattern)
        };
        assert_eq!(check(&whole), Ok(()));
        let short = check(&whole[..1000]).unwrap_err();
        assert!(short.contains("1000 bytes, a correct start"), "{short}");
        let mut holed = whole.clone();
        holed.drain(COMPARE_BUF + 5..COMPARE_BUF + 9);
        let holed = check(&holed).unwrap_err();
        assert!(
            holed.contains(&format!("from byte {} on", COMPARE_BUF + 5)),
            "{holed}"
        );
        let mut long = whole.clone();
        long.push(b'x');
        let long = check(&long).unwrap_err();
        assert!(long.contains(&format!("{} bytes", total + 1)), "{long}");
        let missing = check_transcript(&dir, 1, total, &pattern).unwrap_err();
        assert!(missing.contains("sim-vm-00002.log"), "{missing}");
    }
}
