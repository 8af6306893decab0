//! `vspc-bench sim`: a standalone simulator of ESXi serial ports. It
//! connects N named VMs to a concentrator that is already running (vspc or
//! any vSPC), optionally echoes console input, streams a readable counter
//! pattern and vMotions every VM at a period, until Ctrl-C or `--duration`.
//! A status line goes to stderr every few seconds and one JSON summary line
//! to stdout at the end.
//!
//! Also home of what the other simulating modes share: identities with a
//! name prefix, the vMotion handoff as ESXi performs it, a small PRNG.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use serde::Serialize;
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;
use vspc_testkit::sim::{Identity, Role, SimVm, VmOptions, VmotionReply};

use super::{round, stopped, watch_signals, Failure};

/// Period of the status line.
const STATUS_EVERY: Duration = Duration::from_secs(5);
/// Period of the streaming ticks.
const TICK: Duration = Duration::from_millis(100);
/// Handshakes in flight at once (a burst of N connects would overflow a
/// small accept queue).
const CONNECT_WIDTH: usize = 256;
/// First and longest wait before reconnecting a VM whose connection ended.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Limit of every handshake and vMotion step.
const STEP_WAIT: Duration = Duration::from_secs(30);
/// Connection errors printed before the rest are only counted.
const MAX_REPORTED: u64 = 20;

#[derive(Args)]
pub(crate) struct SimArgs {
    /// The concentrator's proxy address, where ESXi would connect
    /// (HOST:PORT).
    #[arg(long, value_name = "ADDR")]
    proxy: String,

    /// Simulated VMs to connect.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100_000))]
    vms: u32,

    /// VM names are PREFIX-00001, PREFIX-00002, ...; the uuids depend on
    /// the prefix too, so two simulators with different prefixes never
    /// share a VM.
    #[arg(long, value_name = "P", default_value = "sim")]
    name_prefix: String,

    /// Number of the first VM.
    #[arg(long, value_name = "I", default_value_t = 1)]
    start_index: u32,

    /// Echo console input back as output, like a guest shell.
    #[arg(long)]
    echo: bool,

    /// Stream readable counter lines (`NAME 000000000042`) at this many
    /// bytes per second per VM.
    #[arg(long, value_name = "BYTES_PER_S", default_value_t = 0)]
    stream: u64,

    /// vMotion every VM this often (first ones spread over the period): a
    /// new connection of the same VM takes over, as ESXi does.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    vmotion_every: Option<u64>,

    /// Stop after this many seconds [default: until Ctrl-C].
    #[arg(long, value_name = "SECS")]
    duration: Option<u64>,
}

/// The counters of a run, shared by every VM task.
#[derive(Default)]
struct Stats {
    connected: AtomicU64,
    connects: AtomicU64,
    connect_failures: AtomicU64,
    disconnects: AtomicU64,
    vmotions_done: AtomicU64,
    vmotions_failed: AtomicU64,
    bytes_sent: AtomicU64,
    bytes_echoed: AtomicU64,
    reported: AtomicU64,
}

impl Stats {
    fn get(a: &AtomicU64) -> u64 {
        a.load(Ordering::Relaxed)
    }

    fn add(a: &AtomicU64, n: u64) {
        a.fetch_add(n, Ordering::Relaxed);
    }

    /// Print `msg` unless MAX_REPORTED messages were printed already.
    fn report(&self, msg: &str) {
        let n = self.reported.fetch_add(1, Ordering::Relaxed);
        if n < MAX_REPORTED {
            eprintln!("vspc-bench: {msg}");
        } else if n == MAX_REPORTED {
            eprintln!("vspc-bench: (further errors are only counted)");
        }
    }
}

/// The JSON line of the sim mode.
#[derive(Serialize)]
struct SimReport {
    mode: &'static str,
    proxy: String,
    vms: u32,
    /// VMs connected when the run ended.
    vms_connected: u64,
    seconds: f64,
    connects: u64,
    connect_failures: u64,
    disconnects: u64,
    vmotions_done: u64,
    vmotions_failed: u64,
    bytes_sent: u64,
    bytes_echoed: u64,
}

/// What every VM task needs to know.
struct Plan {
    proxy: SocketAddr,
    prefix: String,
    start_index: u32,
    echo: bool,
    stream: u64,
    vmotion_every: Option<Duration>,
}

pub(crate) fn run(args: SimArgs) -> Result<(), Failure> {
    let bench_limit = rlimit::increase_nofile_limit(u64::MAX)
        .map_err(|e| format!("cannot raise the open-files limit: {e}"))?;
    // Two sockets per VM during a vMotion.
    let need = 2 * u64::from(args.vms) + super::FD_SLACK;
    if need > bench_limit {
        return Err(format!(
            "--vms {} needs about {need} open files, but the limit is {bench_limit}",
            args.vms
        )
        .into());
    }
    let rt = super::runtime()?;
    let result = rt.block_on(simulate(args));
    rt.shutdown_background();
    result
}

async fn simulate(args: SimArgs) -> Result<(), Failure> {
    let stop = watch_signals()?;
    let proxy = tokio::net::lookup_host(args.proxy.as_str())
        .await
        .map_err(|e| format!("--proxy {}: {e}", args.proxy))?
        .next()
        .ok_or_else(|| format!("--proxy {}: no address", args.proxy))?;
    let plan = Arc::new(Plan {
        proxy,
        prefix: args.name_prefix.clone(),
        start_index: args.start_index,
        echo: args.echo,
        stream: args.stream,
        vmotion_every: args.vmotion_every.map(Duration::from_secs),
    });
    eprintln!(
        "vspc-bench: simulating {} VMs ({}-{:05} ...) against {proxy}{}{}{}",
        args.vms,
        args.name_prefix,
        args.start_index,
        if args.echo { ", echoing" } else { "" },
        if args.stream > 0 {
            format!(", streaming {} B/s each", args.stream)
        } else {
            String::new()
        },
        match args.vmotion_every {
            Some(s) => format!(", vMotion every {s} s"),
            None => String::new(),
        }
    );
    let stats = Arc::new(Stats::default());
    let (end_tx, end) = watch::channel(false);
    let gate = Arc::new(Semaphore::new(CONNECT_WIDTH));
    let mut tasks = tokio::task::JoinSet::new();
    for k in 0..args.vms {
        let (plan, stats, end, gate) = (plan.clone(), stats.clone(), end.clone(), gate.clone());
        tasks.spawn(run_vm(plan, k, stats, end, gate));
    }

    let t0 = Instant::now();
    let limit = args.duration.map(|s| t0 + Duration::from_secs(s));
    let mut status = tokio::time::interval_at(t0 + STATUS_EVERY, STATUS_EVERY);
    let interrupted = loop {
        let until_limit = async {
            match limit {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = status.tick() => print_status(&stats, t0),
            _ = until_limit => break false,
            _ = stopped(stop.clone()) => break true,
        }
    };
    let seconds = t0.elapsed().as_secs_f64();
    let vms_connected = Stats::get(&stats.connected);
    // Every VM closes its connection.
    let _ = end_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    let report = SimReport {
        mode: "sim",
        proxy: proxy.to_string(),
        vms: args.vms,
        vms_connected,
        seconds: round(seconds, 3),
        connects: Stats::get(&stats.connects),
        connect_failures: Stats::get(&stats.connect_failures),
        disconnects: Stats::get(&stats.disconnects),
        vmotions_done: Stats::get(&stats.vmotions_done),
        vmotions_failed: Stats::get(&stats.vmotions_failed),
        bytes_sent: Stats::get(&stats.bytes_sent),
        bytes_echoed: Stats::get(&stats.bytes_echoed),
    };
    let line =
        serde_json::to_string(&report).map_err(|e| format!("cannot format the report: {e}"))?;
    println!("{line}");
    if interrupted {
        eprintln!("vspc-bench: stopped by a signal; every VM disconnected");
    }
    Ok(())
}

fn print_status(stats: &Stats, t0: Instant) {
    eprintln!(
        "vspc-bench: {:.0} s: {} VMs connected, {} connect failures, {} disconnects, \
         vMotions {} done / {} failed, {} bytes sent, {} echoed",
        t0.elapsed().as_secs_f64(),
        Stats::get(&stats.connected),
        Stats::get(&stats.connect_failures),
        Stats::get(&stats.disconnects),
        Stats::get(&stats.vmotions_done),
        Stats::get(&stats.vmotions_failed),
        Stats::get(&stats.bytes_sent),
        Stats::get(&stats.bytes_echoed),
    );
}

/// Resolves once `end` turns true.
async fn ended(mut end: watch::Receiver<bool>) {
    if end.wait_for(|e| *e).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// One VM for the whole run: connect, serve, and reconnect with a backoff
/// when the concentrator drops it (as ESXi retries).
async fn run_vm(
    plan: Arc<Plan>,
    k: u32,
    stats: Arc<Stats>,
    end: watch::Receiver<bool>,
    gate: Arc<Semaphore>,
) {
    let index = plan.start_index.saturating_add(k);
    let id = named_identity(&plan.prefix, index);
    let opts = VmOptions {
        timeout: STEP_WAIT,
        ..VmOptions::default()
    };
    let mut rng = Rng::new(u64::from(index) ^ Rng::seed());
    let mut line = 0u64;
    let mut backoff = BACKOFF_MIN;
    while !*end.borrow() {
        let connected = {
            let Ok(_permit) = gate.acquire().await else {
                return;
            };
            tokio::select! {
                r = SimVm::connect_with(plan.proxy, &id, Role::Source, &opts) => Some(r),
                _ = ended(end.clone()) => None,
            }
        };
        match connected {
            None => return,
            Some(Ok(vm)) => {
                Stats::add(&stats.connects, 1);
                stats.connected.fetch_add(1, Ordering::Relaxed);
                backoff = BACKOFF_MIN;
                let why = serve(&plan, &id, vm, &stats, &mut rng, &mut line, end.clone()).await;
                stats.connected.fetch_sub(1, Ordering::Relaxed);
                match why {
                    None => return,
                    Some(why) => {
                        Stats::add(&stats.disconnects, 1);
                        stats.report(&format!("{}: {why}; reconnecting", id.name));
                    }
                }
            }
            Some(Err(e)) => {
                Stats::add(&stats.connect_failures, 1);
                stats.report(&format!(
                    "{} cannot connect to {}: {e}",
                    id.name, plan.proxy
                ));
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = ended(end.clone()) => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Serve one connection until the run ends (`None`, the connection closed)
/// or the connection fails (`Some(why)`).
async fn serve(
    plan: &Plan,
    id: &Identity,
    mut vm: SimVm,
    stats: &Stats,
    rng: &mut Rng,
    line: &mut u64,
    end: watch::Receiver<bool>,
) -> Option<String> {
    let start = Instant::now();
    let mut next_tick = start + TICK;
    let mut budget = 0.0f64;
    let mut pending: Vec<u8> = Vec::new();
    let mut next_vmotion = plan.vmotion_every.map(|every| {
        // Spread the first vMotions over the period.
        start + every.mul_f64(rng.unit())
    });
    loop {
        let wait = next_tick.saturating_duration_since(Instant::now());
        let input = tokio::select! {
            input = vm.recv_data(wait) => input,
            _ = ended(end.clone()) => {
                vm.close().await;
                return None;
            }
        };
        if let Err(e) = echo(plan, &vm, &input, stats).await {
            return Some(e);
        }
        if let Some(why) = vm.closed() {
            return Some(format!("the concentrator closed the connection ({why})"));
        }
        let now = Instant::now();
        if now < next_tick {
            continue;
        }
        next_tick = now + TICK;
        if plan.stream > 0 {
            budget += plan.stream as f64 * TICK.as_secs_f64();
            let n = budget as usize;
            budget -= n as f64;
            while pending.len() < n {
                *line += 1;
                pending.extend_from_slice(format!("{} {:012}\r\n", id.name, *line).as_bytes());
            }
            if n > 0 {
                let chunk: Vec<u8> = pending.drain(..n).collect();
                if let Err(e) = vm.send(&chunk).await {
                    return Some(format!("sending output: {e}"));
                }
                Stats::add(&stats.bytes_sent, n as u64);
            }
        }
        if let (Some(at), Some(every)) = (next_vmotion, plan.vmotion_every) {
            if now >= at {
                next_vmotion = Some(now + every);
                let moved = vmotion(plan.proxy, id, vm, STEP_WAIT, rng.next() as u32).await;
                vm = moved.vm;
                if let Err(e) = echo(plan, &vm, &moved.leftover, stats).await {
                    return Some(e);
                }
                match moved.result {
                    Ok(()) => Stats::add(&stats.vmotions_done, 1),
                    Err(e) => {
                        Stats::add(&stats.vmotions_failed, 1);
                        stats.report(&format!("{}: vMotion failed: {e}", id.name));
                    }
                }
            }
        }
    }
}

/// With --echo, send console input back as output.
async fn echo(plan: &Plan, vm: &SimVm, input: &[u8], stats: &Stats) -> Result<(), String> {
    if plan.echo && !input.is_empty() {
        vm.send(input)
            .await
            .map_err(|e| format!("echoing input: {e}"))?;
        Stats::add(&stats.bytes_echoed, input.len() as u64);
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Shared with the other simulating modes.

/// VM number `index` with names `PREFIX-00001`; the uuid mixes in the
/// prefix, so different prefixes give different VMs.
pub(crate) fn named_identity(prefix: &str, index: u32) -> Identity {
    let mut id = Identity::numbered(index);
    // FNV-1a of the prefix, folded into the uuid's mixed half.
    let hash = prefix.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let mixed = u64::from_be_bytes(id.uuid[8..].try_into().unwrap_or_default()) ^ hash;
    id.uuid[8..].copy_from_slice(&mixed.to_be_bytes());
    id.name = format!("{prefix}-{index:05}");
    id
}

/// The outcome of a vMotion attempt.
pub(crate) struct Moved {
    /// The connection that now carries the VM: the destination after a
    /// success, the source otherwise.
    pub vm: SimVm,
    /// Console input the source had received and nobody read yet (after a
    /// success; it precedes whatever the destination receives).
    pub leftover: Vec<u8>,
    pub result: Result<(), String>,
    /// BEGIN written to GOAHEAD (or NOTNOW) read, at the source.
    pub goahead: Option<Duration>,
    /// PEER written to PEER-OK read, at the destination.
    pub peer_ok: Option<Duration>,
}

/// vMotion `source` as ESXi does: VMOTION-BEGIN on the source, GOAHEAD,
/// a new destination connection presenting the cookie in VMOTION-PEER,
/// PEER-OK, VMOTION-COMPLETE on the destination, then the source closes.
/// The caller sends nothing in between. A failure after GOAHEAD sends
/// VMOTION-ABORT on the source, which stays the VM's connection.
pub(crate) async fn vmotion(
    proxy: SocketAddr,
    id: &Identity,
    source: SimVm,
    timeout: Duration,
    seq: u32,
) -> Moved {
    let seq = seq.to_be_bytes();
    let failed = |vm: SimVm, e: String, goahead: Option<Duration>| Moved {
        vm,
        leftover: Vec::new(),
        result: Err(e),
        goahead,
        peer_ok: None,
    };
    let (cookie, goahead) = match source.begin_vmotion_timed(&seq).await {
        Ok((VmotionReply::GoAhead { cookie }, took)) => (cookie, Some(took)),
        Ok((VmotionReply::NotNow, took)) => {
            return failed(source, "VMOTION-NOTNOW".into(), Some(took))
        }
        Err(e) => return failed(source, format!("VMOTION-BEGIN: {e}"), None),
    };
    let opts = VmOptions {
        timeout,
        ..VmOptions::default()
    };
    let dest = match SimVm::connect_with(proxy, id, Role::Destination { cookie }, &opts).await {
        Ok(dest) => dest,
        Err(e) => {
            let _ = source.abort().await;
            return failed(source, format!("destination connection: {e}"), goahead);
        }
    };
    if let Err(e) = dest.complete(&seq).await {
        let _ = source.abort().await;
        return failed(source, format!("VMOTION-COMPLETE: {e}"), goahead);
    }
    let peer_ok = dest.peer_round_trip();
    let leftover = source.recv_data(Duration::ZERO).await;
    source.close().await;
    Moved {
        vm: dest,
        leftover,
        result: Ok(()),
        goahead,
        peer_ok,
    }
}

/// xorshift64*: plenty for jitter and choices.
pub(crate) struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        // splitmix64 of the seed, never zero.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((z ^ (z >> 31)) | 1)
    }

    /// A seed from the clock.
    pub fn seed() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform duration in [lo, hi).
    pub fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        lo + (hi.saturating_sub(lo)).mul_f64(self.unit())
    }
}
