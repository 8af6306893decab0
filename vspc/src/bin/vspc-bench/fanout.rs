//! `vspc-bench fanout`: fan-out throughput. N VMs each send B bytes of their
//! own deterministic pattern as fast as they can; each of their C consoles
//! checks every byte against the regenerated pattern. Measured from the
//! first byte sent to the last byte verified, first through the daemon,
//! then through a bare TCP relay (`relay-server`, a child process) of the
//! same shape; the ratio says what the daemon's telnet and fan-out cost.
//!
//! The pattern uses the byte values 0x00..=0xFE only: no 0xFF, so telnet
//! escaping is a no-op and the daemon moves exactly the bytes the relay
//! moves (it still scans for IAC in both directions, which is part of what
//! is measured).
//!
//! Connections to the daemon are set up by the simulation (handshake,
//! listing, console negotiation) and then taken out of it
//! ([`SimVm::into_raw`]); from then on each VM is one writer task and each
//! console one reader task, with a reused buffer and one slice compare per
//! run of data.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use clap::Args;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinSet;
use vspc::sim::{ConsoleOptions, RawConn, Role, SimConsole, SimVm, VmOptions};
use vspc::wire::{Decoder, Event};

use super::{
    cpu_s, identity, pool, round, runtime_with_signals, stopped, wait_listed, wait_ready,
    DaemonOpts, Failure, Spawned, Target, FD_SLACK, PROGRESS_EVERY, STEP_WAIT,
};

/// The pattern's period: a prime, so whole-chunk losses never line up.
const PERIOD: usize = 1_048_573;
/// A console's read buffer.
const READ_BUF: usize = 32 * 1024;
/// Most bytes shown from a mismatching read.
const SHOW: usize = 48;

#[derive(Args)]
pub struct FanoutArgs {
    #[command(flatten)]
    daemon: DaemonOpts,

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

    /// Size of each VM write.
    #[arg(long, value_name = "BYTES", default_value_t = 64 * 1024,
          value_parser = clap::value_parser!(u64).range(1..=(PERIOD as u64)))]
    chunk: u64,

    /// A VM sends at most this many bytes ahead of its slowest console (0:
    /// no limit), in both phases. The daemon drops a console that falls
    /// `--console-queue` (1 MiB) behind instead of slowing the VM, so an
    /// unlimited sender loses consoles whenever the bench reads slower than
    /// the daemon writes.
    #[arg(long, value_name = "BYTES", default_value_t = 768 * 1024)]
    window: u64,

    /// Handshakes (and console negotiations) in flight at once.
    #[arg(long, value_name = "K", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..=65536))]
    in_flight: u32,

    /// Fail when no byte is verified for this long.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    stall_secs: u64,

    /// Measure the daemon only.
    #[arg(long)]
    no_relay: bool,
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
    pattern: &'static str,
    /// Most bytes a VM ran ahead of its slowest console (0: no limit).
    window: u64,
    vspc_s: f64,
    vspc_mib_s: f64,
    /// Daemon CPU (user + system) per GiB delivered to consoles.
    cpu_s_per_gib: f64,
    /// The daemon's VmHWM over the whole run (setup included).
    rss_peak_kib: u64,
    /// The bench's own CPU during the daemon's streaming phase.
    bench_cpu_s: f64,
    relay_s: Option<f64>,
    relay_mib_s: Option<f64>,
    relay_cpu_s_per_gib: Option<f64>,
    relay_rss_peak_kib: Option<u64>,
    relay_bench_cpu_s: Option<f64>,
    /// vspc_mib_s / relay_mib_s.
    ratio: Option<f64>,
}

/// What one streaming phase measured.
struct Phase {
    secs: f64,
    mib_s: f64,
    cpu_s_per_gib: f64,
    rss_peak_kib: u64,
    bench_cpu_s: f64,
}

pub fn run(args: FanoutArgs) -> Result<(), Failure> {
    let (n, c) = (u64::from(args.vms), u64::from(args.consoles));
    check_fds(n, c, u64::from(args.in_flight))?;
    let (rt, stop) = runtime_with_signals()?;
    let pattern = Arc::new(Pattern::new());

    // Phase 1: the daemon.
    let (mut daemon, target) = args.daemon.start(args.vms, &[], &rt)?;
    let result = rt.block_on(async {
        tokio::select! {
            r = vspc_phase(&args, target, &mut daemon, pattern.clone()) => r,
            _ = stopped(stop.clone()) => Err(Failure::Interrupted),
        }
    });
    let vspc = conclude(result, daemon)?;

    // Phase 2: the relay, same shape, same ports.
    let relay = if args.no_relay {
        None
    } else {
        Some(on_relay(&rt, &stop, args.daemon.base_port, |pid| {
            relay_phase(&args, pid, pattern.clone())
        })?)
    };
    rt.shutdown_background();

    let report = FanoutReport {
        mode: "fanout",
        vms: args.vms,
        consoles_per_vm: args.consoles,
        bytes_per_vm: args.bytes_per_vm,
        delivered_bytes: n * c * args.bytes_per_vm,
        pattern: "0x00-0xFE (no 0xFF, telnet escaping is a no-op)",
        window: args.window,
        vspc_s: round(vspc.secs, 3),
        vspc_mib_s: round(vspc.mib_s, 1),
        cpu_s_per_gib: round(vspc.cpu_s_per_gib, 3),
        rss_peak_kib: vspc.rss_peak_kib,
        bench_cpu_s: round(vspc.bench_cpu_s, 2),
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
    Ok(())
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

/// Kill a child the bench started (daemon or relay) and pass the result
/// on; a failure gets the child's exit status and last log line when it
/// had died, and keeps its log.
pub(crate) fn conclude<T>(result: Result<T, Failure>, mut child: Spawned) -> Result<T, Failure> {
    match result {
        Ok(v) => {
            child.kill();
            child.remove_dir();
            Ok(v)
        }
        Err(Failure::Error(msg)) => Err(child.fail(&msg).into()),
        Err(Failure::Interrupted) => {
            child.kill();
            child.remove_dir();
            Err(Failure::Interrupted)
        }
    }
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
// The pattern.

/// Every VM's stream is the same pseudo-random table of bytes 0x00..=0xFE
/// with period [`PERIOD`], read from a VM-specific starting point. The table
/// is stored twice over, so any piece up to a period long is one slice:
/// sending and checking are slice writes and slice compares.
pub(crate) struct Pattern {
    table: Vec<u8>,
}

impl Pattern {
    pub(crate) fn new() -> Pattern {
        let mut table = Vec::with_capacity(2 * PERIOD);
        let mut x = 0x5eed_u64;
        while table.len() < PERIOD {
            x = splitmix64(x);
            for b in x.to_le_bytes() {
                if table.len() < PERIOD {
                    table.push((u32::from(b) * 255 / 256) as u8);
                }
            }
        }
        table.extend_from_within(..PERIOD);
        Pattern { table }
    }

    /// Bytes `offset .. offset + len` of VM `vm`'s stream; `len` ≤ PERIOD.
    pub(crate) fn piece(&self, vm: usize, offset: u64, len: usize) -> &[u8] {
        let start = (vm as u64).wrapping_mul(0x9e37_79b9) % PERIOD as u64;
        let at = ((start + offset % PERIOD as u64) % PERIOD as u64) as usize;
        &self.table[at..at + len.min(PERIOD)]
    }
}

pub(crate) fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Checks one console's data against its VM's pattern.
pub(crate) struct Verifier {
    pub(crate) vm: usize,
    /// Data bytes verified so far.
    pub(crate) got: u64,
    /// How many the VM sends (`None`: no end).
    pub(crate) expect: Option<u64>,
    pattern: Arc<Pattern>,
}

impl Verifier {
    pub(crate) fn new(vm: usize, expect: Option<u64>, pattern: Arc<Pattern>) -> Verifier {
        Verifier {
            vm,
            got: 0,
            expect,
            pattern,
        }
    }

    pub(crate) fn done(&self) -> bool {
        self.expect.is_some_and(|e| self.got >= e)
    }

    /// Check one run of data bytes.
    pub(crate) fn data(&mut self, mut d: &[u8]) -> Result<(), String> {
        if let Some(expect) = self.expect {
            if self.got + d.len() as u64 > expect {
                return Err(format!(
                    "received {} bytes more than the {expect} its VM sent: {:?}",
                    self.got + d.len() as u64 - expect,
                    String::from_utf8_lossy(&d[..d.len().min(SHOW)])
                ));
            }
        }
        while !d.is_empty() {
            let len = d.len().min(PERIOD);
            let want = self.pattern.piece(self.vm, self.got, len);
            if d[..len] != *want {
                let at = d.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
                let shown = &d[at..(at + SHOW).min(d.len())];
                return Err(format!(
                    "byte {} differs from the pattern (0x{:02x}, expected 0x{:02x}); \
                     received from there: {:?}",
                    self.got + at as u64,
                    d[at],
                    want[at],
                    String::from_utf8_lossy(shown)
                ));
            }
            self.got += len as u64;
            d = &d[len..];
        }
        Ok(())
    }
}

/// How far each console of one VM has verified, so the VM's sender can
/// stay within `--window` of the slowest.
pub(crate) struct Flow {
    verified: Vec<AtomicU64>,
    /// Wakes the sender after a console made progress.
    progress: tokio::sync::Notify,
}

impl Flow {
    fn new(consoles: usize) -> Flow {
        Flow {
            verified: (0..consoles).map(|_| AtomicU64::new(0)).collect(),
            progress: tokio::sync::Notify::new(),
        }
    }

    fn slowest(&self) -> u64 {
        self.verified
            .iter()
            .map(|v| v.load(Ordering::Relaxed))
            .min()
            .unwrap_or(u64::MAX)
    }

    /// Console `j` has verified `got` bytes.
    fn report(&self, j: usize, got: u64) {
        if let Some(v) = self.verified.get(j) {
            v.store(got, Ordering::Relaxed);
            self.progress.notify_one();
        }
    }
}

/// Read a console's telnet stream until its VM's bytes are all verified
/// (forever without `expect`); every read is added to `progress`. Returns
/// when the last byte was verified, and the stream.
pub(crate) async fn verify_console(
    conn: RawConn<TcpStream>,
    mut v: Verifier,
    progress: Arc<AtomicU64>,
    flow: Option<(Arc<Flow>, usize)>,
) -> Result<(Instant, TcpStream), String> {
    let RawConn {
        mut stream,
        data,
        mut decoder,
        ..
    } = conn;
    v.data(&data)?;
    progress.fetch_add(data.len() as u64, Ordering::Relaxed);
    let mut buf = vec![0u8; READ_BUF];
    while !v.done() {
        let n = match stream.read(&mut buf).await {
            Ok(0) => {
                return Err(format!(
                    "closed by the other side after {} data bytes{}",
                    v.got,
                    v.expect.map_or(String::new(), |e| format!(" of {e}"))
                ))
            }
            Ok(n) => n,
            Err(e) => return Err(format!("read error after {} data bytes: {e}", v.got)),
        };
        let before = v.got;
        let mut bad = Ok(());
        decoder
            .decode(&buf[..n], |ev| {
                if let (Event::Data(d), Ok(())) = (ev, &bad) {
                    bad = v.data(d);
                }
            })
            .map_err(|e| format!("telnet decode error: {e}"))?;
        bad?;
        progress.fetch_add(v.got - before, Ordering::Relaxed);
        if let Some((flow, j)) = &flow {
            flow.report(*j, v.got);
        }
    }
    Ok((Instant::now(), stream))
}

/// Send `total` bytes of VM `vm`'s pattern in writes of up to `chunk`
/// bytes once `gate` opens, never more than `window` bytes (0: no limit)
/// ahead of the slowest console; returns the stream (kept open until the
/// phase ends).
#[allow(clippy::too_many_arguments)]
async fn send_pattern(
    mut stream: TcpStream,
    vm: usize,
    total: u64,
    chunk: usize,
    window: u64,
    flow: Arc<Flow>,
    pattern: Arc<Pattern>,
    mut gate: watch::Receiver<bool>,
) -> Result<TcpStream, String> {
    if gate.wait_for(|open| *open).await.is_err() {
        return Err("internal error: start gate dropped".into());
    }
    let mut sent = 0u64;
    while sent < total {
        let mut room = total - sent;
        if window > 0 {
            loop {
                let ahead = sent.saturating_sub(flow.slowest());
                if ahead < window {
                    room = room.min(window - ahead);
                    break;
                }
                // A console's report after the check leaves a permit.
                flow.progress.notified().await;
            }
        }
        let len = chunk.min(room as usize);
        stream
            .write_all(pattern.piece(vm, sent, len))
            .await
            .map_err(|e| format!("VM {vm} writing at byte {sent}: {e}"))?;
        sent += len as u64;
    }
    Ok(stream)
}

/// A console's connection and its VM.
pub(crate) struct RawConsole {
    pub(crate) vm: usize,
    pub(crate) conn: RawConn<TcpStream>,
}

/// Stream every VM's bytes to its consoles; returns (seconds from the gate
/// opening to the last console done, bench CPU seconds).
async fn stream_phase(
    what: &str,
    vms: Vec<TcpStream>,
    consoles: Vec<RawConsole>,
    args: &FanoutArgs,
    pattern: Arc<Pattern>,
) -> Result<f64, String> {
    let total = args.bytes_per_vm;
    let all = consoles.len() as u64 * total;
    let progress = Arc::new(AtomicU64::new(0));
    let mut per_vm = vec![0usize; vms.len()];
    for console in &consoles {
        if let Some(count) = per_vm.get_mut(console.vm) {
            *count += 1;
        }
    }
    let flows: Vec<Arc<Flow>> = per_vm.iter().map(|&c| Arc::new(Flow::new(c))).collect();
    let mut readers = JoinSet::new();
    for RawConsole { vm, conn } in consoles {
        let v = Verifier::new(vm, Some(total), pattern.clone());
        let progress = progress.clone();
        let flow = flows.get(vm).map(|f| (f.clone(), per_vm[vm] - 1));
        if let Some(count) = per_vm.get_mut(vm) {
            *count -= 1; // console numbers count down: each gets its own slot
        }
        readers.spawn(async move {
            verify_console(conn, v, progress, flow)
                .await
                .map_err(|e| format!("console of VM {vm}: {e}"))
        });
    }
    let (gate, gate_rx) = watch::channel(false);
    let mut writers = JoinSet::new();
    for (vm, stream) in vms.into_iter().enumerate() {
        writers.spawn(send_pattern(
            stream,
            vm,
            total,
            args.chunk as usize,
            args.window,
            flows[vm].clone(),
            pattern.clone(),
            gate_rx.clone(),
        ));
    }
    eprintln!(
        "vspc-bench: {what}: streaming {} MiB to {} consoles",
        all >> 20,
        readers.len()
    );
    let t0 = Instant::now();
    let _ = gate.send(true);
    let mut last = t0;
    let mut kept = Vec::new(); // streams stay open until the phase ends
    let mut ticker =
        tokio::time::interval_at(tokio::time::Instant::now() + PROGRESS_EVERY, PROGRESS_EVERY);
    let (mut seen, mut since) = (0, Instant::now());
    let stall = Duration::from_secs(args.stall_secs);
    while !readers.is_empty() {
        tokio::select! {
            joined = readers.join_next() => match joined {
                Some(Ok(Ok((at, stream)))) => {
                    last = last.max(at);
                    kept.push(stream);
                }
                Some(Ok(Err(e))) => return Err(format!("{what}: {e}")),
                Some(Err(e)) => return Err(format!("{what}: a console task failed: {e}")),
                None => {}
            },
            Some(joined) = writers.join_next() => match joined {
                Ok(Ok(stream)) => kept.push(stream),
                Ok(Err(e)) => return Err(format!("{what}: {e}")),
                Err(e) => return Err(format!("{what}: a VM task failed: {e}")),
            },
            _ = ticker.tick() => {
                let now = progress.load(Ordering::Relaxed);
                eprintln!(
                    "vspc-bench:   {what}: {} / {} MiB verified, {} consoles to go",
                    now >> 20, all >> 20, readers.len()
                );
                if now != seen {
                    (seen, since) = (now, Instant::now());
                } else if since.elapsed() > stall {
                    return Err(format!(
                        "{what}: no byte verified for {} s ({now} of {all} bytes, {} of \
                         the consoles not done)",
                        args.stall_secs,
                        readers.len()
                    ));
                }
            }
        }
    }
    Ok((last - t0).as_secs_f64())
}

/// Measure one phase around `stream`: CPU and peak memory of `pid`, and the
/// bench's own CPU.
async fn measured(
    pid: u32,
    delivered: u64,
    stream: impl std::future::Future<Output = Result<f64, String>>,
) -> Result<Phase, String> {
    let me = std::process::id();
    let (cpu0, me0) = (cpu_s(pid)?, cpu_s(me)?);
    let secs = stream.await?;
    let (cpu1, me1) = (cpu_s(pid)?, cpu_s(me)?);
    let gib = delivered as f64 / f64::from(1u32 << 30);
    Ok(Phase {
        secs,
        mib_s: delivered as f64 / f64::from(1u32 << 20) / secs.max(1e-9),
        cpu_s_per_gib: (cpu1 - cpu0) / gib,
        rss_peak_kib: peak_rss_kib(pid)?,
        bench_cpu_s: me1 - me0,
    })
}

// ---------------------------------------------------------------------------
// Through the daemon.

/// Connect N VMs and C consoles each through the simulation, then take
/// every connection out of it: the VMs' streams (by VM) and the consoles.
pub(crate) async fn attach_raw(
    target: Target,
    n: usize,
    c: usize,
    width: usize,
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

    eprintln!("vspc-bench: attaching {} consoles ({c} per VM)", n * c);
    let ip = target.console_ip;
    let opts = ConsoleOptions {
        timeout: STEP_WAIT,
        ..ConsoleOptions::default()
    };
    let consoles = pool("consoles negotiated", n * c, width, move |k| {
        let (vm, port, opts) = (k / c, ports[k / c], opts.clone());
        async move {
            let name = identity(vm).name;
            let fail = |e: &dyn std::fmt::Display| format!("console of {name} on {ip}:{port}: {e}");
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
            Ok(RawConsole { vm, conn })
        }
    })
    .await?;
    Ok((vm_streams, consoles))
}

async fn vspc_phase(
    args: &FanoutArgs,
    target: Target,
    daemon: &mut Spawned,
    pattern: Arc<Pattern>,
) -> Result<Phase, Failure> {
    wait_ready(target, Some(daemon)).await?;
    let (n, c) = (args.vms as usize, args.consoles as usize);
    let (vms, consoles) = attach_raw(target, n, c, args.in_flight as usize).await?;
    stream_measured("vspc", target.pid, vms, consoles, args, pattern).await
}

/// Stream every VM's bytes to its consoles through the server with process
/// id `pid` (`what` names it), timing it and reading the server's CPU.
async fn stream_measured(
    what: &str,
    pid: u32,
    vms: Vec<TcpStream>,
    consoles: Vec<RawConsole>,
    args: &FanoutArgs,
    pattern: Arc<Pattern>,
) -> Result<Phase, Failure> {
    let delivered = u64::from(args.vms) * u64::from(args.consoles) * args.bytes_per_vm;
    let phase = measured(
        pid,
        delivered,
        stream_phase(what, vms, consoles, args, pattern),
    )
    .await?;
    eprintln!(
        "vspc-bench: {what}: {:.1} MiB/s ({:.3} s)",
        phase.mib_s, phase.secs
    );
    Ok(phase)
}

// ---------------------------------------------------------------------------
// Through the bare relay.

/// Start `relay-server` (this executable) on ports P (VMs) and P+1
/// (consoles); it exits when we close its stdin, or on a kill.
fn spawn_relay(base: u16) -> Result<Spawned, String> {
    let exe = std::env::current_exe()
        .map_err(|e| format!("cannot find this executable for the relay: {e}"))?;
    let stamp = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let dir =
        std::env::temp_dir().join(format!("vspc-bench-relay.{}.{stamp:x}", std::process::id()));
    std::fs::create_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let log = dir.join("relay.log");
    let log_file =
        std::fs::File::create(&log).map_err(|e| format!("cannot create {}: {e}", log.display()))?;
    let (vm_port, console_port) = (base.to_string(), (base + 1).to_string());
    eprintln!(
        "vspc-bench: starting the bare relay (VMs 127.0.0.1:{vm_port}, consoles {console_port}); log {}",
        log.display()
    );
    let child = relay_command(&exe)
        .args(["--vm-port", &vm_port, "--console-port", &console_port])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .map_err(|e| format!("cannot run {} relay-server: {e}", exe.display()))?;
    Ok(Spawned {
        child,
        dir,
        log,
        reaped: false,
    })
}

fn relay_command(exe: &Path) -> Command {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(exe);
    cmd.arg("relay-server").process_group(0);
    cmd
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
    let pid = relay.child.id();
    let result = rt.block_on(async {
        tokio::select! {
            r = async {
                relay_ready(&mut relay, base).await?;
                f(pid).await
            } => r,
            _ = stopped(stop.clone()) => Err(Failure::Interrupted),
        }
    });
    conclude(result, relay)
}

/// Wait until the relay accepts on both ports.
async fn relay_ready(relay: &mut Spawned, base: u16) -> Result<(), String> {
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
    stream_measured("relay", pid, vms, consoles, args, pattern).await
}
