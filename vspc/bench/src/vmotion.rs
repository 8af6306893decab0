//! `vspc-bench vmotion`: vMotions at a set rate while every byte is checked.
//!
//! N VMs stream their pattern ([`Pattern`], `--stream` bytes per second
//! each) to one console per VM, which checks every byte from the first
//! ([`Verifier`]: nothing lost, duplicated or reordered). Meanwhile the
//! fleet does `--rate` vMotions per second for `--duration` seconds: VM `i`
//! moves at `i / R`, then every `N / R` seconds, each time the whole
//! hand-over ESXi performs ([`vmotion`]: BEGIN, GOAHEAD, a new destination
//! connection presenting the cookie in PEER, PEER-OK, COMPLETE, the source
//! closing), and its stream goes on from the destination. A VM that falls
//! behind its schedule catches up at once, so every scheduled vMotion is
//! attempted and the achieved rate says whether the fleet kept up.
//!
//! The simulated source times BEGIN to GOAHEAD and the destination PEER to
//! PEER-OK, each up to the read that carried the answer. At the end every
//! console must have received its VM's stream up to the last byte sent,
//! and the daemon's own count of completed vMotions (its metrics, on the
//! HTTP port P+2+N) must equal the bench's. Any failed vMotion or wrong
//! byte fails the run.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use vspc_testkit::sim::{SimConsole, SimVm};

use super::churn::with_daemon;
use super::fanout::peak_rss_kib;
use super::scrape::metric;
use super::simulate::{vmotion, Rng};
use super::soak::{connect_fleet, Errors};
use super::stream::{Pattern, Verifier};
use super::{cpu_s, identity, round, DaemonOpts, Failure, Target, PROGRESS_EVERY, STEP_WAIT};

/// VM output tick.
const TICK: Duration = Duration::from_millis(100);
/// How long the consoles may take to receive the tail after the last
/// vMotion.
const FINAL_WAIT: Duration = Duration::from_secs(30);
/// The first vMotion is this long after the tasks start.
const LEAD_IN: Duration = Duration::from_millis(200);

#[derive(Args)]
pub(crate) struct VmotionArgs {
    #[command(flatten)]
    daemon: DaemonOpts,

    /// Simulated VMs, each streaming to one console.
    #[arg(long, value_name = "N", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    vms: u32,

    /// vMotions per second across the whole fleet.
    #[arg(long, value_name = "R", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    rate: u32,

    /// Seconds during which vMotions are started.
    #[arg(long, value_name = "SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..))]
    duration: u64,

    /// Output bytes per second per VM.
    #[arg(long, value_name = "BYTES_PER_S", default_value_t = 10_240)]
    stream: u64,
}

/// The JSON line of the vmotion mode.
#[derive(Serialize)]
struct VmotionReport {
    mode: &'static str,
    vms: u32,
    duration_s: u64,
    stream_per_vm: u64,
    /// vMotions per second asked for (`--rate`).
    rate_target: u32,
    vmotions_attempted: u64,
    vmotions_completed: u64,
    vmotions_failed: u64,
    /// The daemon's `vspc_vmotions_total{outcome="complete"}` over the run.
    daemon_vmotions_completed: u64,
    /// Completed vMotions per second, from the first scheduled one until
    /// the last VM finished its schedule.
    vmotions_per_s: f64,
    /// How late the latest vMotion started against its schedule.
    start_lag_max_ms: f64,
    goahead_p50_ms: f64,
    goahead_p99_ms: f64,
    goahead_max_ms: f64,
    peer_ok_p50_ms: f64,
    peer_ok_p99_ms: f64,
    peer_ok_max_ms: f64,
    bytes_verified: u64,
    errors: u64,
    /// The daemon's CPU (user + system) over the vMotion phase.
    daemon_cpu_s: f64,
    daemon_rss_peak_kib: u64,
}

/// What the tasks share.
struct Ctx {
    proxy: std::net::SocketAddr,
    vms: usize,
    rate: u32,
    stream: u64,
    pattern: Arc<Pattern>,
    /// Per VM, stream bytes sent so far.
    sent: Vec<AtomicU64>,
    attempted: AtomicU64,
    completed: AtomicU64,
    failed: AtomicU64,
    verified: AtomicU64,
    errors: Errors,
    seed: u64,
}

/// What a VM task hands back: its timings (µs) and its connection.
struct VmEnd {
    goahead: Vec<u64>,
    peer_ok: Vec<u64>,
    lag_max: Duration,
    vm: Option<SimVm>,
}

/// The daemon's count of completed vMotions.
const COMPLETE_SERIES: &str = "vspc_vmotions_total{outcome=\"complete\"}";

pub(crate) fn run(args: VmotionArgs) -> Result<(), Failure> {
    let (opts, vms) = (args.daemon.clone(), args.vms);
    // The HTTP port follows the console ports (checked free with them).
    let http_port = u32::from(opts.base_port) + 2 + vms;
    let http = u16::try_from(http_port)
        .map(|p| SocketAddr::from((Ipv4Addr::LOCALHOST, p)))
        .map_err(|_| format!("--base-port {} is too high for --vms {vms}", opts.base_port))?;
    let flag = format!("--http-port={http_port}");
    with_daemon(&opts, vms + 1, &[&flag], move |target, _stop| {
        run_vmotions(args, target, http)
    })
}

async fn run_vmotions(args: VmotionArgs, target: Target, http: SocketAddr) -> Result<(), Failure> {
    let n = args.vms as usize;
    let pid = target.pid;
    let (vms, consoles) = connect_fleet(target, n, 1).await?;
    let ctx = Arc::new(Ctx {
        proxy: target.proxy,
        vms: n,
        rate: args.rate,
        stream: args.stream,
        pattern: Arc::new(Pattern::new()),
        sent: (0..n).map(|_| AtomicU64::new(0)).collect(),
        attempted: AtomicU64::new(0),
        completed: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        verified: AtomicU64::new(0),
        errors: Errors::default(),
        seed: Rng::seed(),
    });
    eprintln!(
        "vspc-bench: {} vMotions/s for {} s across {n} VMs streaming {} B/s each",
        args.rate, args.duration, args.stream
    );
    let (done_tx, done) = watch::channel(false);
    let mut readers = JoinSet::new();
    for (i, console) in consoles.into_iter().enumerate() {
        readers.spawn(console_task(i, ctx.clone(), console, done.clone()));
    }
    let complete0 = metric(http, COMPLETE_SERIES).await?;
    let cpu0 = cpu_s(pid)?;
    let start = Instant::now() + LEAD_IN;
    let end = start + Duration::from_secs(args.duration);
    let mut movers = JoinSet::new();
    for (i, vm) in vms.into_iter().enumerate() {
        movers.spawn(vm_task(i, ctx.clone(), vm, start, end));
    }
    let mut ends = Vec::with_capacity(n);
    let mut ticker = tokio::time::interval_at(start + PROGRESS_EVERY, PROGRESS_EVERY);
    loop {
        tokio::select! {
            joined = movers.join_next() => match joined {
                Some(Ok(e)) => ends.push(e),
                Some(Err(e)) => ctx.errors.report(&format!("a VM task failed: {e}")),
                None => break,
            },
            _ = ticker.tick() => eprintln!(
                "vspc-bench:   {:.0} s: {} vMotions done, {} failed, {} bytes verified",
                start.elapsed().as_secs_f64(),
                ctx.completed.load(Ordering::Relaxed),
                ctx.failed.load(Ordering::Relaxed),
                ctx.verified.load(Ordering::Relaxed),
            ),
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let daemon_cpu_s = cpu_s(pid)? - cpu0;
    eprintln!("vspc-bench: schedule done in {elapsed:.2} s; checking every console's tail");
    let _ = done_tx.send(true);
    let drained = tokio::time::timeout(FINAL_WAIT * 2, async {
        while let Some(r) = readers.join_next().await {
            if let Err(e) = r {
                ctx.errors.report(&format!("a console task failed: {e}"));
            }
        }
    })
    .await;
    if drained.is_err() {
        ctx.errors
            .report("console tasks still running long after the end");
    }
    let mut goahead: Vec<u64> = ends
        .iter()
        .flat_map(|e| e.goahead.iter().copied())
        .collect();
    let mut peer_ok: Vec<u64> = ends
        .iter()
        .flat_map(|e| e.peer_ok.iter().copied())
        .collect();
    let lag = ends.iter().map(|e| e.lag_max).max().unwrap_or_default();
    for e in &mut ends {
        if let Some(vm) = e.vm.take() {
            vm.close().await;
        }
    }
    let daemon_complete = metric(http, COMPLETE_SERIES).await? - complete0;
    let [g50, g99, gmax] = percentiles_ms(&mut goahead);
    let [p50, p99, pmax] = percentiles_ms(&mut peer_ok);
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let report = VmotionReport {
        mode: "vmotion",
        vms: args.vms,
        duration_s: args.duration,
        stream_per_vm: args.stream,
        rate_target: args.rate,
        vmotions_attempted: get(&ctx.attempted),
        vmotions_completed: get(&ctx.completed),
        vmotions_failed: get(&ctx.failed),
        daemon_vmotions_completed: daemon_complete as u64,
        vmotions_per_s: round(get(&ctx.completed) as f64 / elapsed.max(1e-9), 1),
        start_lag_max_ms: round(lag.as_secs_f64() * 1e3, 1),
        goahead_p50_ms: g50,
        goahead_p99_ms: g99,
        goahead_max_ms: gmax,
        peer_ok_p50_ms: p50,
        peer_ok_p99_ms: p99,
        peer_ok_max_ms: pmax,
        bytes_verified: get(&ctx.verified),
        errors: ctx.errors.count(),
        daemon_cpu_s: round(daemon_cpu_s, 2),
        daemon_rss_peak_kib: peak_rss_kib(pid)?,
    };
    let line =
        serde_json::to_string(&report).map_err(|e| format!("cannot format the report: {e}"))?;
    println!("{line}");
    if report.vmotions_failed > 0 || report.errors > 0 {
        return Err(format!(
            "{} of {} vMotions failed, {} errors (see above)",
            report.vmotions_failed, report.vmotions_attempted, report.errors
        )
        .into());
    }
    if report.vmotions_completed != report.vmotions_attempted {
        return Err(format!(
            "only {} of {} vMotions completed",
            report.vmotions_completed, report.vmotions_attempted
        )
        .into());
    }
    if report.daemon_vmotions_completed != report.vmotions_completed {
        return Err(format!(
            "the daemon counted {} completed vMotions, the bench {}",
            report.daemon_vmotions_completed, report.vmotions_completed
        )
        .into());
    }
    Ok(())
}

/// p50, p99 and max of `micros`, in milliseconds (zeros when empty).
fn percentiles_ms(micros: &mut [u64]) -> [f64; 3] {
    micros.sort_unstable();
    let at = |p: f64| {
        let rank = ((p * micros.len() as f64).ceil() as usize).clamp(1, micros.len().max(1));
        micros
            .get(rank - 1)
            .map_or(0.0, |&us| round(us as f64 / 1e3, 3))
    };
    [at(0.50), at(0.99), at(1.0)]
}

fn micros(d: Duration) -> u64 {
    d.as_micros().try_into().unwrap_or(u64::MAX)
}

/// VM `i`: stream every tick, vMotion on schedule until `end`.
async fn vm_task(i: usize, ctx: Arc<Ctx>, vm: SimVm, start: Instant, end: Instant) -> VmEnd {
    let name = identity(i).name;
    let id = identity(i);
    let mut rng = Rng::new(ctx.seed ^ (i as u64) << 20);
    let period = Duration::from_secs_f64(ctx.vms as f64 / f64::from(ctx.rate));
    let mut next_vmotion = start + Duration::from_secs_f64(i as f64 / f64::from(ctx.rate));
    // Spread the ticks over the fleet.
    let mut next_tick = start + TICK.mul_f64(i as f64 / ctx.vms as f64);
    let (mut pos, mut budget) = (0u64, 0.0f64);
    let mut out = VmEnd {
        goahead: Vec::new(),
        peer_ok: Vec::new(),
        lag_max: Duration::ZERO,
        vm: None,
    };
    let mut vm = Some(vm);
    while let Some(current) = vm.take() {
        let wake = next_tick.min(next_vmotion);
        if wake >= end {
            vm = Some(current);
            break;
        }
        tokio::time::sleep_until(wake).await;
        if let Some(why) = current.closed() {
            ctx.errors
                .report(&format!("the daemon closed {name}'s connection ({why})"));
            break;
        }
        let now = Instant::now();
        if now >= next_tick {
            next_tick += TICK;
            budget += ctx.stream as f64 * TICK.as_secs_f64();
            let len = budget as usize;
            budget -= len as f64;
            if len > 0 {
                if let Err(e) = current.send(ctx.pattern.piece(i, pos, len)).await {
                    ctx.errors
                        .report(&format!("{name} sending output at byte {pos}: {e}"));
                    break;
                }
                pos += len as u64;
                ctx.sent[i].store(pos, Ordering::Relaxed);
            }
        }
        // Only vMotions scheduled before the end (a VM behind its
        // schedule may get here after it).
        if now < next_vmotion || next_vmotion >= end {
            vm = Some(current);
            continue;
        }
        out.lag_max = out.lag_max.max(now - next_vmotion);
        next_vmotion += period;
        ctx.attempted.fetch_add(1, Ordering::Relaxed);
        let moved = vmotion(ctx.proxy, &id, current, STEP_WAIT, rng.next() as u32).await;
        if !moved.leftover.is_empty() {
            ctx.errors.report(&format!(
                "{name} received {} bytes of console input nobody typed",
                moved.leftover.len()
            ));
        }
        out.goahead.extend(moved.goahead.map(micros));
        out.peer_ok.extend(moved.peer_ok.map(micros));
        match moved.result {
            Ok(()) => ctx.completed.fetch_add(1, Ordering::Relaxed),
            Err(e) => {
                ctx.errors.report(&format!("{name}: vMotion failed: {e}"));
                ctx.failed.fetch_add(1, Ordering::Relaxed)
            }
        };
        vm = Some(moved.vm);
    }
    out.vm = vm;
    out
}

/// The console of VM `i`: every byte checked; once `done`, it must reach
/// the last byte its VM sent.
async fn console_task(
    i: usize,
    ctx: Arc<Ctx>,
    console: SimConsole,
    mut done: watch::Receiver<bool>,
) {
    let who = format!("the console of {}", identity(i).name);
    let mut v = Verifier::new(i, None, ctx.pattern.clone());
    let mut tail_by = None;
    loop {
        let data = console.recv_data(TICK).await;
        if !data.is_empty() {
            let before = v.received;
            if let Err(e) = v.data(&data) {
                ctx.errors.report(&format!("{who}: {e}"));
                break;
            }
            ctx.verified
                .fetch_add(v.received - before, Ordering::Relaxed);
        }
        if let Some(why) = console.closed() {
            ctx.errors
                .report(&format!("{who} was closed by the daemon ({why})"));
            break;
        }
        if !*done.borrow_and_update() {
            continue;
        }
        let sent = ctx.sent[i].load(Ordering::Relaxed);
        if v.got >= sent {
            break;
        }
        let by = *tail_by.get_or_insert_with(|| Instant::now() + FINAL_WAIT);
        if Instant::now() > by {
            ctx.errors.report(&format!(
                "{who} received the stream only up to byte {} of {sent} within {} s after \
                 the last vMotion (tail lost)",
                v.got,
                FINAL_WAIT.as_secs()
            ));
            break;
        }
    }
    console.close().await;
}

#[cfg(test)]
mod tests {
    use super::percentiles_ms;

    #[test]
    fn percentiles() {
        let mut v: Vec<u64> = (1..=1000).rev().map(|k| k * 10).collect();
        assert_eq!(percentiles_ms(&mut v), [5.0, 9.9, 10.0]);
        assert_eq!(percentiles_ms(&mut []), [0.0, 0.0, 0.0]);
        assert_eq!(percentiles_ms(&mut [1500]), [1.5, 1.5, 1.5]);
    }
}
