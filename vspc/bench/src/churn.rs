//! `vspc-bench churn`: K short lives of a VM and a console. Each cycle a VM
//! connects (full handshake), a console attaches to its port, a few bytes
//! go each way and are checked, and both disconnect; W cycles run at once
//! over a rotating set of 4·W VM identities, so mappings are reused. The
//! daemon runs with `--vm-expire-time 1`, so once the cycles are over every
//! mapping expires and its port returns to the pool. The daemon's open
//! descriptors and resident memory are read before and after: a leak shows
//! as a difference.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use tokio::sync::{watch, Mutex};
use vspc_testkit::sim::{self, ConsoleOptions, Identity, Role, SimConsole, SimVm, VmOptions};

use super::{
    conclude, fd_count, pool, round, rss_kib, runtime_with_signals, stopped, DaemonOpts, Failure,
    Target, STEP_WAIT,
};

/// How long the mappings may take to expire after the last cycle.
const EXPIRE_WAIT: Duration = Duration::from_secs(60);
/// RSS sampling period for the peak.
const PEAK_EVERY: Duration = Duration::from_millis(100);

#[derive(Args)]
pub(crate) struct ChurnArgs {
    #[command(flatten)]
    daemon: DaemonOpts,

    /// Connect/attach/exchange/disconnect cycles.
    #[arg(long, value_name = "K", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    cycles: u32,

    /// Cycles in flight at once (the VM identities rotate over 4·W).
    #[arg(long, value_name = "W", default_value_t = 32,
          value_parser = clap::value_parser!(u32).range(1..=4096))]
    parallel: u32,

    /// Cycles run (and expired) before the first readings, so one-time
    /// allocations (buffers, table capacities) are not counted as growth.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    warmup: u32,

    /// Seconds to wait after the listing is empty, before the final
    /// readings (the daemon's allocator returns freed pages within ~10 s).
    #[arg(long, value_name = "SECS", default_value_t = 2)]
    settle: u64,
}

/// The JSON line of the churn mode.
#[derive(Serialize)]
struct ChurnReport {
    mode: &'static str,
    cycles: u32,
    parallel: u32,
    identities: u32,
    warmup: u32,
    seconds: f64,
    cycles_per_s: f64,
    fds_start: u64,
    fds_end: u64,
    rss_start_kib: u64,
    rss_end_kib: u64,
    rss_peak_kib: u64,
    rss_diff_kib: i64,
    /// Bytes the daemon's allocator counts as in use (the admin port's
    /// `stats`; `null` for a daemon without it).
    heap_start_bytes: Option<u64>,
    heap_end_bytes: Option<u64>,
    heap_diff_bytes: Option<i64>,
}

pub(crate) fn run(args: ChurnArgs) -> Result<(), Failure> {
    let identities = args.parallel * 4;
    let extra = ["--vm-expire-time", "1"];
    let opts = args.daemon.clone();
    with_daemon(&opts, identities, &extra, move |target, _stop| {
        churn(args, target)
    })
}

/// Start the daemon on loopback (proxy `base`, admin `base`+1, console
/// ports from `base`+2, `console_ports` of them below the ephemeral range)
/// with `extra` flags, run `body` once it accepts connections, and tear
/// everything down on every way out, as `attach` does. `body` gets a
/// receiver that turns true at SIGINT/SIGTERM; the run also ends then.
pub(crate) fn with_daemon<F, Fut>(
    opts: &DaemonOpts,
    console_ports: u32,
    extra: &[&str],
    body: F,
) -> Result<(), Failure>
where
    F: FnOnce(Target, watch::Receiver<bool>) -> Fut,
    Fut: Future<Output = Result<(), Failure>>,
{
    rlimit::increase_nofile_limit(u64::MAX)
        .map_err(|e| format!("cannot raise the open-files limit: {e}"))?;
    let (rt, stop) = runtime_with_signals()?;
    let (mut daemon, target) = opts.start(console_ports, extra, &rt)?;
    let result = rt.block_on(async {
        tokio::select! {
            r = body(target, stop.clone()) => r,
            _ = stopped(stop.clone()) => Err(Failure::Interrupted),
        }
    });
    rt.shutdown_background();
    conclude(result, daemon.process())
}

async fn churn(args: ChurnArgs, target: Target) -> Result<(), Failure> {
    let identities = args.parallel * 4;
    let pid = target.pid;
    let locks: Arc<Vec<Mutex<()>>> = Arc::new((0..identities).map(|_| Mutex::new(())).collect());
    let nonce = super::simulate::Rng::seed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    if args.warmup > 0 {
        eprintln!("vspc-bench: warming up with {} cycles", args.warmup);
        run_cycles(args.warmup as usize, &args, target, &locks, nonce).await?;
        all_expired(target).await?;
        tokio::time::sleep(Duration::from_secs(args.settle)).await;
    }
    let fds_start = fd_count(pid)?;
    let rss_start_kib = rss_kib(pid)?;
    let heap_start = heap_allocated(target.admin).await;
    eprintln!(
        "vspc-bench: daemon pid {pid} ready: {fds_start} descriptors, VmRSS {rss_start_kib} KiB; \
         {} cycles, {} in flight, {identities} identities",
        args.cycles, args.parallel
    );
    let peak = Arc::new(AtomicU64::new(rss_start_kib));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                if let Ok(rss) = rss_kib(pid) {
                    peak.fetch_max(rss, Ordering::Relaxed);
                }
                tokio::time::sleep(PEAK_EVERY).await;
            }
        })
    };
    let cycles = args.cycles as usize;
    let seconds = run_cycles(cycles, &args, target, &locks, nonce).await?;
    eprintln!("vspc-bench: {cycles} cycles in {seconds:.1} s; waiting for the mappings to expire");
    let t1 = Instant::now();
    all_expired(target).await?;
    eprintln!(
        "vspc-bench: listing empty {:.1} s after the last cycle; settling",
        t1.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(args.settle)).await;
    sampler.abort();
    let fds_end = fd_count(pid)?;
    let rss_end_kib = rss_kib(pid)?;
    let heap_end = heap_allocated(target.admin).await;
    let report = ChurnReport {
        mode: "churn",
        cycles: args.cycles,
        parallel: args.parallel,
        identities,
        warmup: args.warmup,
        seconds: round(seconds, 3),
        cycles_per_s: round(f64::from(args.cycles) / seconds, 1),
        fds_start,
        fds_end,
        rss_start_kib,
        rss_end_kib,
        rss_peak_kib: peak.load(Ordering::Relaxed).max(rss_end_kib),
        rss_diff_kib: rss_end_kib as i64 - rss_start_kib as i64,
        heap_start_bytes: heap_start,
        heap_end_bytes: heap_end,
        heap_diff_bytes: heap_start.zip(heap_end).map(|(a, b)| b as i64 - a as i64),
    };
    if fds_end != fds_start {
        eprintln!(
            "vspc-bench: descriptor count changed: {fds_start} before, {fds_end} after \
             (ls -l /proc/{pid}/fd)"
        );
    }
    let line =
        serde_json::to_string(&report).map_err(|e| format!("cannot format the report: {e}"))?;
    println!("{line}");
    Ok(())
}

/// One cycle: VM up, its port from the listing, a console attached, bytes
/// both ways, both closed. Identity `k mod 4W`, never two cycles at once.
async fn cycle(k: usize, target: Target, locks: &[Mutex<()>], nonce: u64) -> Result<(), String> {
    let slot = k % locks.len();
    let _mine = locks[slot].lock().await;
    let id = Identity::numbered(slot as u32 + 1);
    let fail =
        |what: &str, e: &dyn std::fmt::Display| format!("cycle {k}, {}: {what}: {e}", id.name);
    let opts = VmOptions {
        timeout: STEP_WAIT,
        ..VmOptions::default()
    };
    let vm = SimVm::connect_with(target.proxy, &id, Role::Source, &opts)
        .await
        .map_err(|e| fail("VM handshake", &e))?;
    let port = port_of(target.admin, &id)
        .await
        .map_err(|e| fail("finding its console port", &e))?;
    let console_opts = ConsoleOptions {
        timeout: STEP_WAIT,
        ..ConsoleOptions::default()
    };
    let console = SimConsole::connect_with((target.console_ip, port), &console_opts)
        .await
        .map_err(|e| fail(&format!("console on port {port}"), &e))?;
    if let Some(reason) = console.closed() {
        return Err(fail(
            &format!("console on port {port}"),
            &format!("closed by the daemon ({reason})"),
        ));
    }
    let out = format!("churn {k} {nonce:x} out\r\n");
    vm.send(out.as_bytes())
        .await
        .map_err(|e| fail("VM output", &e))?;
    let got = console
        .read_until(b"\n", STEP_WAIT)
        .await
        .map_err(|e| fail("console waiting for the VM's line", &e))?;
    if got != out.as_bytes() {
        return Err(fail(
            "console received",
            &format!("{:?}, expected {out:?}", String::from_utf8_lossy(&got)),
        ));
    }
    let input = [format!("churn {k} in ").as_bytes(), b"\xff\x00\r\n"].concat();
    console
        .send(&input)
        .await
        .map_err(|e| fail("console input", &e))?;
    let got = vm
        .read_exact_data(input.len(), STEP_WAIT)
        .await
        .map_err(|e| fail("VM waiting for the console's input", &e))?;
    if got != input {
        return Err(fail(
            "VM received",
            &format!("{}, expected {}", sim::hex(&got), sim::hex(&input)),
        ));
    }
    console.close().await;
    vm.close().await;
    Ok(())
}

/// The console port the admin listing gives `id` (polled: a VM is listed a
/// moment after its handshake).
async fn port_of(admin: std::net::SocketAddr, id: &Identity) -> Result<u16, String> {
    let uuid = id.uuid_display();
    let start = Instant::now();
    loop {
        let rows = sim::list_vms(admin)
            .await
            .map_err(|e| format!("admin listing: {e}"))?;
        if let Some((_, _, Some(port))) = rows.iter().find(|(_, u, _)| *u == uuid) {
            return Ok(*port);
        }
        if start.elapsed() > STEP_WAIT {
            return Err(format!(
                "not listed with a port after {} s",
                STEP_WAIT.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Run `n` cycles, `--parallel` at a time; returns the seconds taken.
async fn run_cycles(
    n: usize,
    args: &ChurnArgs,
    target: Target,
    locks: &Arc<Vec<Mutex<()>>>,
    nonce: u64,
) -> Result<f64, Failure> {
    let t0 = Instant::now();
    let locks = locks.clone();
    pool("cycles", n, args.parallel as usize, move |k| {
        let locks = locks.clone();
        async move { cycle(k, target, &locks, nonce).await }
    })
    .await?;
    Ok(t0.elapsed().as_secs_f64())
}

/// Wait until the daemon lists no VM (they expire after a second).
async fn all_expired(target: Target) -> Result<(), Failure> {
    let t1 = Instant::now();
    loop {
        let rows = sim::list_vms(target.admin)
            .await
            .map_err(|e| format!("admin listing: {e}"))?;
        if rows.is_empty() {
            return Ok(());
        }
        if t1.elapsed() > EXPIRE_WAIT {
            return Err(format!(
                "{} VMs still listed {} s after the last cycle with --vm-expire-time 1, e.g. {:?}",
                rows.len(),
                EXPIRE_WAIT.as_secs(),
                rows[0]
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The daemon's heap in use, from the native admin protocol's `stats`;
/// `None` if it does not answer that (another concentrator, an old vspc).
async fn heap_allocated(admin: std::net::SocketAddr) -> Option<u64> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let ask = async {
        let mut stream = tokio::net::TcpStream::connect(admin).await.ok()?;
        stream.write_all(b"stats\n").await.ok()?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).await.ok()?;
        let answer: serde_json::Value = serde_json::from_str(&line).ok()?;
        answer["heap_allocated_bytes"].as_u64()
    };
    tokio::time::timeout(STEP_WAIT, ask).await.ok().flatten()
}
