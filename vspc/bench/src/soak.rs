//! `vspc-bench soak`: a long run where every byte is checked.
//!
//! Each of N VMs streams its own sequence of 8-byte big-endian words
//! `A5 <vm: 3 bytes> <counter: 4 bytes>` at `--rate` bytes per second, so a
//! byte's position in its VM's stream can be recovered from any 16 bytes.
//! C consoles per VM find their position in the first bytes they receive
//! and from then on demand exactly the next byte of the stream: a lost,
//! duplicated, reordered or foreign byte is an error.
//!
//! At random moments (mean `--action-every` seconds per VM) a VM either
//! reconnects (closes its connection, waits until the daemon has closed
//! its side, stays away 0.1-1.5 s, connects again with the same identity and
//! resumes its sequence) or vMotions (BEGIN, GOAHEAD, destination with PEER,
//! PEER-OK, COMPLETE, source closed; nothing sent in between; the sequence
//! goes on from the destination). Either way the consoles' stream must stay
//! contiguous.
//!
//! Consoles also type 16-byte records `< console seq vm check FF >` (one
//! write each) that the VM checks. Input typed while the VM is disconnected
//! is dropped by design, so the rule is: every record is exact, and per
//! console the sequence numbers a VM receives strictly increase (no
//! duplicate, no reordering); they must also be consecutive, except for the
//! first record of each console after a reconnect (a vMotion holds input,
//! so no gap is allowed across one). At the end every console sends a final
//! record while everything is connected and quiet, which must arrive, and
//! must have received its VM's stream up to the last byte sent.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use vspc_testkit::sim::{self, ConsoleOptions, Role, SimConsole, SimVm, VmOptions};

use super::churn::with_daemon;
use super::simulate::{vmotion, Rng};
use super::{
    identity, pool, round, rss_kib, stopped, wait_listed, DaemonOpts, Failure, Target, STEP_WAIT,
};

/// Daemon RSS sampling period.
const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// VM output tick.
const TICK: Duration = Duration::from_millis(100);
/// How long the end phases may take.
const FINAL_WAIT: Duration = Duration::from_secs(30);
/// Errors printed; the rest are only counted.
const MAX_REPORTED: u64 = 20;
/// No final record sent yet.
const NONE: u32 = u32::MAX;
/// Connection attempts for one reconnect before the VM gives up.
const RECONNECT_TRIES: u32 = 5;

#[derive(Args)]
pub(crate) struct SoakArgs {
    #[command(flatten)]
    daemon: DaemonOpts,

    /// Seconds of random traffic, reconnects and vMotions.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    duration: u64,

    /// Simulated VMs.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=10_000))]
    vms: u32,

    /// Consoles per VM.
    #[arg(long, value_name = "C", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=100))]
    consoles: u32,

    /// Output bytes per second per VM.
    #[arg(long, value_name = "BYTES_PER_S", default_value_t = 4096)]
    rate: u64,

    /// Mean seconds between a VM's reconnects/vMotions (half each).
    #[arg(long, value_name = "SECS", default_value_t = 20,
          value_parser = clap::value_parser!(u64).range(1..))]
    action_every: u64,
}

/// The JSON line of the soak mode.
#[derive(Serialize)]
struct SoakReport {
    mode: &'static str,
    duration_s: f64,
    vms: u32,
    consoles_per_vm: u32,
    rate_per_vm: u64,
    bytes_verified: u64,
    output_bytes_verified: u64,
    input_bytes_verified: u64,
    vmotions: u64,
    reconnects: u64,
    errors: u64,
    rss_samples: usize,
    rss_min_kib: u64,
    rss_max_kib: u64,
    rss_first_kib: u64,
    rss_last_kib: u64,
}

/// What one VM publishes to its consoles.
struct VmShared {
    /// Stream bytes sent so far: the position of the next one.
    sent: AtomicU64,
    /// Per console, the sequence number of its final record (NONE before).
    final_seq: Vec<AtomicU32>,
}

struct Ctx {
    proxy: std::net::SocketAddr,
    rate: u64,
    action_every: Duration,
    vms: Vec<VmShared>,
    output_verified: AtomicU64,
    input_verified: AtomicU64,
    vmotions: AtomicU64,
    reconnects: AtomicU64,
    errors: Errors,
    /// VMs that stopped output and actions (end phase 1).
    quiet: AtomicUsize,
    seed: u64,
}

/// A run's error count; the first [`MAX_REPORTED`] errors are printed.
#[derive(Default)]
pub(crate) struct Errors(AtomicU64);

impl Errors {
    /// Count an error and print it, unless many were printed already.
    pub(crate) fn report(&self, msg: &str) {
        let n = self.0.fetch_add(1, Ordering::Relaxed);
        if n < MAX_REPORTED {
            eprintln!("vspc-bench: ERROR: {msg}");
        } else if n == MAX_REPORTED {
            eprintln!("vspc-bench: (further errors are only counted)");
        }
    }

    pub(crate) fn count(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Connect N VMs (sources), wait until the admin listing shows them all,
/// then attach C consoles to each; the consoles in VM order (VM `k / c`).
pub(crate) async fn connect_fleet(
    target: Target,
    n: usize,
    c: usize,
) -> Result<(Vec<SimVm>, Vec<SimConsole>), Failure> {
    let opts = VmOptions {
        timeout: STEP_WAIT,
        ..VmOptions::default()
    };
    eprintln!("vspc-bench: connecting {n} VMs");
    let proxy = target.proxy;
    let vms = pool("VMs connected", n, 64, move |i| {
        let opts = opts.clone();
        async move {
            SimVm::connect_with(proxy, &identity(i), Role::Source, &opts)
                .await
                .map_err(|e| format!("VM {}: {e}", identity(i).name))
        }
    })
    .await?;
    let ports = Arc::new(wait_listed(target.admin, n).await?);
    let ip = target.console_ip;
    let consoles = pool("consoles attached", n * c, 64, move |k| {
        let port = ports[k / c];
        async move {
            let opts = ConsoleOptions {
                timeout: STEP_WAIT,
                ..ConsoleOptions::default()
            };
            let console = SimConsole::connect_with((ip, port), &opts)
                .await
                .map_err(|e| format!("console on {ip}:{port}: {e}"))?;
            match console.closed() {
                Some(why) => Err(format!(
                    "console on {ip}:{port} closed by the daemon: {why}"
                )),
                None => Ok(console),
            }
        }
    })
    .await?;
    Ok((vms, consoles))
}

impl Ctx {
    fn error(&self, msg: String) {
        self.errors.report(&msg);
    }

    fn count(a: &AtomicU64, n: u64) {
        a.fetch_add(n, Ordering::Relaxed);
    }

    fn get(a: &AtomicU64) -> u64 {
        a.load(Ordering::Relaxed)
    }
}

/// Phases of the run.
const RUN: u8 = 0;
/// VMs stop output and actions; consoles stop typing.
const QUIESCE: u8 = 1;
/// Final records; everyone drains and checks the tail.
const FINAL: u8 = 2;

pub(crate) fn run(args: SoakArgs) -> Result<(), Failure> {
    let (opts, vms) = (args.daemon.clone(), args.vms);
    with_daemon(&opts, vms, &[], move |target, stop| {
        soak(args, target, stop)
    })
}

async fn soak(args: SoakArgs, target: Target, stop: watch::Receiver<bool>) -> Result<(), Failure> {
    let n = args.vms as usize;
    let c = args.consoles as usize;
    let pid = target.pid;
    let (vms, consoles) = connect_fleet(target, n, c).await?;
    let ctx = Arc::new(Ctx {
        proxy: target.proxy,
        rate: args.rate,
        action_every: Duration::from_secs(args.action_every),
        vms: (0..n)
            .map(|_| VmShared {
                sent: AtomicU64::new(0),
                final_seq: (0..c).map(|_| AtomicU32::new(NONE)).collect(),
            })
            .collect(),
        output_verified: AtomicU64::new(0),
        input_verified: AtomicU64::new(0),
        vmotions: AtomicU64::new(0),
        reconnects: AtomicU64::new(0),
        errors: Errors::default(),
        quiet: AtomicUsize::new(0),
        seed: Rng::seed(),
    });
    let (phase_tx, phase) = watch::channel(RUN);
    let mut tasks = JoinSet::new();
    for (i, vm) in vms.into_iter().enumerate() {
        tasks.spawn(vm_task(i, c, ctx.clone(), vm, phase.clone()));
    }
    for (k, console) in consoles.into_iter().enumerate() {
        tasks.spawn(console_task(
            k / c,
            k % c,
            ctx.clone(),
            console,
            phase.clone(),
        ));
    }
    eprintln!(
        "vspc-bench: soaking for {} s: {n} VMs at {} B/s, {c} console(s) each, an action \
         every {} s per VM on average",
        args.duration, args.rate, args.action_every
    );

    let t0 = Instant::now();
    let end = t0 + Duration::from_secs(args.duration);
    let mut rss = vec![rss_kib(pid)?];
    let mut sampler = tokio::time::interval_at(t0 + SAMPLE_EVERY, SAMPLE_EVERY);
    loop {
        tokio::select! {
            _ = sampler.tick() => {
                let now = rss_kib(pid)?;
                rss.push(now);
                eprintln!(
                    "vspc-bench: {:.0} s: VmRSS {now} KiB; verified {} output / {} input bytes; \
                     {} vMotions, {} reconnects, {} errors",
                    t0.elapsed().as_secs_f64(),
                    Ctx::get(&ctx.output_verified),
                    Ctx::get(&ctx.input_verified),
                    Ctx::get(&ctx.vmotions),
                    Ctx::get(&ctx.reconnects),
                    ctx.errors.count(),
                );
            }
            _ = tokio::time::sleep_until(end) => break,
            _ = stopped(stop.clone()) => return Err(Failure::Interrupted),
        }
    }
    let duration_s = t0.elapsed().as_secs_f64();
    eprintln!("vspc-bench: quiescing, then checking every stream's tail");
    let _ = phase_tx.send(QUIESCE);
    let quiet_by = Instant::now() + FINAL_WAIT + STEP_WAIT * 2;
    while ctx.quiet.load(Ordering::Relaxed) < n {
        if Instant::now() > quiet_by {
            ctx.error(format!(
                "only {} of {n} VMs went quiet",
                ctx.quiet.load(Ordering::Relaxed)
            ));
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = phase_tx.send(FINAL);
    let joined = tokio::time::timeout(FINAL_WAIT * 3, async {
        while let Some(r) = tasks.join_next().await {
            if let Err(e) = r {
                ctx.error(format!("a task failed: {e}"));
            }
        }
    })
    .await;
    if joined.is_err() {
        ctx.error("tasks still running long after the end".into());
    }
    rss.push(rss_kib(pid)?);
    let output = Ctx::get(&ctx.output_verified);
    let input = Ctx::get(&ctx.input_verified);
    let report = SoakReport {
        mode: "soak",
        duration_s: round(duration_s, 1),
        vms: args.vms,
        consoles_per_vm: args.consoles,
        rate_per_vm: args.rate,
        bytes_verified: output + input,
        output_bytes_verified: output,
        input_bytes_verified: input,
        vmotions: Ctx::get(&ctx.vmotions),
        reconnects: Ctx::get(&ctx.reconnects),
        errors: ctx.errors.count(),
        rss_samples: rss.len(),
        rss_min_kib: rss.iter().copied().min().unwrap_or(0),
        rss_max_kib: rss.iter().copied().max().unwrap_or(0),
        rss_first_kib: rss.first().copied().unwrap_or(0),
        rss_last_kib: rss.last().copied().unwrap_or(0),
    };
    let line =
        serde_json::to_string(&report).map_err(|e| format!("cannot format the report: {e}"))?;
    println!("{line}");
    if report.errors > 0 {
        return Err(format!("{} errors (see above)", report.errors).into());
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The VM's output stream.

/// Word `n` of VM `vm`'s stream.
fn word(vm: usize, n: u64) -> u64 {
    (0xA5 << 56) | ((vm as u64 & 0xFF_FFFF) << 32) | (n & 0xFFFF_FFFF)
}

/// Byte `pos` of VM `vm`'s stream.
fn stream_byte(vm: usize, pos: u64) -> u8 {
    word(vm, pos / 8).to_be_bytes()[(pos % 8) as usize]
}

fn stream_bytes(vm: usize, from: u64, len: usize) -> Vec<u8> {
    (from..from + len as u64)
        .map(|p| stream_byte(vm, p))
        .collect()
}

/// A console's check of its VM's stream.
struct StreamCheck {
    vm: usize,
    /// Position of the next byte, once found.
    next: Option<u64>,
    /// The first bytes, until the position is found.
    pending: Vec<u8>,
}

impl StreamCheck {
    /// Check `data`; the number of bytes verified, or what went wrong (the
    /// check then starts over with the next bytes).
    fn feed(&mut self, data: &[u8]) -> Result<u64, String> {
        let Some(next) = self.next else {
            self.pending.extend_from_slice(data);
            if self.pending.len() < 16 {
                return Ok(0);
            }
            let pending = std::mem::take(&mut self.pending);
            let start = (0..8).find_map(|k| {
                let w = u64::from_be_bytes(pending[k..k + 8].try_into().ok()?);
                if w >> 56 != 0xA5 || (w >> 32) & 0xFF_FFFF != self.vm as u64 & 0xFF_FFFF {
                    return None;
                }
                let p0 = (w & 0xFFFF_FFFF).checked_mul(8)?.checked_sub(k as u64)?;
                let fits = pending
                    .iter()
                    .enumerate()
                    .all(|(i, &b)| b == stream_byte(self.vm, p0 + i as u64));
                fits.then_some(p0)
            });
            return match start {
                Some(p0) => {
                    self.next = Some(p0 + pending.len() as u64);
                    Ok(pending.len() as u64)
                }
                None => Err(format!(
                    "the first bytes received are not a contiguous piece of the VM's stream: {}",
                    sim::hex(&pending[..pending.len().min(64)])
                )),
            };
        };
        for (i, &b) in data.iter().enumerate() {
            let pos = next + i as u64;
            let want = stream_byte(self.vm, pos);
            if b != want {
                self.next = None;
                let upto = (i + 24).min(data.len());
                return Err(format!(
                    "stream byte {pos} is {b:02x}, expected {want:02x}; received from there: {} \
                     (expected {})",
                    sim::hex(&data[i..upto]),
                    sim::hex(&stream_bytes(self.vm, pos, upto - i))
                ));
            }
        }
        self.next = Some(next + data.len() as u64);
        Ok(data.len() as u64)
    }
}

// ---------------------------------------------------------------------------
// Console input records.

const RECORD: usize = 16;

fn record_check(vm: usize, console: usize, seq: u32) -> u32 {
    Rng::new(((vm as u64) << 48) ^ ((console as u64) << 32) ^ u64::from(seq)).next() as u32
}

/// `< console(2) seq(4) vm(3) check(4) FF >`.
fn record(vm: usize, console: usize, seq: u32) -> [u8; RECORD] {
    let mut r = [0u8; RECORD];
    r[0] = b'<';
    r[1..3].copy_from_slice(&(console as u16).to_be_bytes());
    r[3..7].copy_from_slice(&seq.to_be_bytes());
    r[7..10].copy_from_slice(&(vm as u32).to_be_bytes()[1..]);
    r[10..14].copy_from_slice(&record_check(vm, console, seq).to_be_bytes());
    r[14] = 0xFF;
    r[15] = b'>';
    r
}

/// A VM's check of its consoles' records.
struct InputCheck {
    vm: usize,
    buf: Vec<u8>,
    /// Per console, the last sequence number received.
    last: Vec<Option<u32>>,
    /// Per console, whether a gap is allowed (first record after a reconnect).
    fresh: Vec<bool>,
}

impl InputCheck {
    fn new(vm: usize, consoles: usize) -> InputCheck {
        InputCheck {
            vm,
            buf: Vec::new(),
            last: vec![None; consoles],
            fresh: vec![true; consoles],
        }
    }

    /// Check `data`; bytes verified, and the problems found.
    fn feed(&mut self, data: &[u8], errors: &mut Vec<String>) -> u64 {
        self.buf.extend_from_slice(data);
        let mut verified = 0;
        let mut at = 0;
        while self.buf.len() - at >= RECORD {
            let r = &self.buf[at..at + RECORD];
            at += RECORD;
            let j = usize::from(u16::from_be_bytes([r[1], r[2]]));
            let seq = u32::from_be_bytes([r[3], r[4], r[5], r[6]]);
            if j >= self.last.len() || r != record(self.vm, j, seq) {
                errors.push(format!(
                    "VM {} received a malformed input record {} (buffered: {})",
                    identity(self.vm).name,
                    sim::hex(r),
                    sim::hex(&self.buf[at - RECORD..self.buf.len().min(at + 32)])
                ));
                // Framing is lost: start over with the next data.
                at = self.buf.len();
                self.fresh.iter_mut().for_each(|f| *f = true);
                break;
            }
            match self.last[j] {
                Some(last) if seq <= last => errors.push(format!(
                    "VM {} received record {seq} of console {j} after record {last} \
                     (duplicated or reordered input)",
                    identity(self.vm).name
                )),
                Some(last) if seq != last + 1 && !self.fresh[j] => errors.push(format!(
                    "VM {} received record {seq} of console {j} right after {last}, with no \
                     reconnect in between (input lost)",
                    identity(self.vm).name
                )),
                _ => verified += RECORD as u64,
            }
            self.last[j] = Some(seq);
            self.fresh[j] = false;
        }
        self.buf.drain(..at);
        verified
    }

    /// The VM connected anew: input typed meanwhile was dropped.
    fn reconnected(&mut self) {
        self.buf.clear();
        self.fresh.iter_mut().for_each(|f| *f = true);
    }
}

// ---------------------------------------------------------------------------
// Tasks.

async fn vm_task(
    i: usize,
    consoles: usize,
    ctx: Arc<Ctx>,
    mut vm: SimVm,
    phase: watch::Receiver<u8>,
) {
    let id = identity(i);
    let name = id.name.clone();
    let me = &ctx.vms[i];
    let mut rng = Rng::new(ctx.seed ^ (i as u64) << 20);
    let mut input = InputCheck::new(i, consoles);
    let mut errors = Vec::new();
    let mut pos = 0u64;
    let mut budget = 0.0f64;
    let mut next_tick = Instant::now() + TICK;
    let mut next_action =
        Instant::now() + rng.between(ctx.action_every / 4, ctx.action_every * 7 / 4);
    let mut quiet = false;
    let mut final_since: Option<Instant> = None;
    let opts = VmOptions {
        timeout: STEP_WAIT,
        ..VmOptions::default()
    };
    let feed = |input: &mut InputCheck, data: &[u8], errors: &mut Vec<String>| {
        let n = input.feed(data, errors);
        Ctx::count(&ctx.input_verified, n);
        for e in errors.drain(..) {
            ctx.error(e);
        }
    };
    loop {
        let ph = *phase.borrow();
        if ph >= QUIESCE && !quiet {
            quiet = true;
            ctx.quiet.fetch_add(1, Ordering::Relaxed);
        }
        let data = vm
            .recv_data(next_tick.saturating_duration_since(Instant::now()))
            .await;
        feed(&mut input, &data, &mut errors);
        if let Some(why) = vm.closed() {
            ctx.error(format!(
                "the daemon closed {name}'s connection ({why}); reconnecting"
            ));
            match reconnect(&ctx, &id, &opts, &mut input).await {
                Some(new) => vm = new,
                None => return,
            }
            continue;
        }
        let now = Instant::now();
        if now < next_tick {
            continue;
        }
        next_tick = now + TICK;
        if ph == RUN {
            budget += ctx.rate as f64 * TICK.as_secs_f64();
            let len = budget as usize;
            budget -= len as f64;
            if len > 0 {
                if let Err(e) = vm.send(&stream_bytes(i, pos, len)).await {
                    ctx.error(format!("{name} sending output: {e}"));
                } else {
                    pos += len as u64;
                    me.sent.store(pos, Ordering::Relaxed);
                }
            }
            if now >= next_action {
                next_action = now + rng.between(ctx.action_every / 4, ctx.action_every * 7 / 4);
                if rng.unit() < 0.5 {
                    let moved = vmotion(ctx.proxy, &id, vm, STEP_WAIT, rng.next() as u32).await;
                    vm = moved.vm;
                    feed(&mut input, &moved.leftover, &mut errors);
                    match moved.result {
                        Ok(()) => Ctx::count(&ctx.vmotions, 1),
                        Err(e) => ctx.error(format!("{name}: vMotion failed: {e}")),
                    }
                } else {
                    if let Err(e) = vm.hang_up(STEP_WAIT).await {
                        ctx.error(format!("{name}: hanging up: {e}"));
                    }
                    let rest = vm.recv_data(Duration::ZERO).await;
                    feed(&mut input, &rest, &mut errors);
                    drop(vm);
                    let away = rng.between(Duration::from_millis(100), Duration::from_millis(1500));
                    tokio::time::sleep(away).await;
                    match reconnect(&ctx, &id, &opts, &mut input).await {
                        Some(new) => vm = new,
                        None => return,
                    }
                    Ctx::count(&ctx.reconnects, 1);
                }
            }
        } else if ph == FINAL {
            let since = *final_since.get_or_insert(now);
            let missing: Vec<usize> = (0..consoles)
                .filter(|&j| {
                    let want = me.final_seq[j].load(Ordering::Relaxed);
                    want == NONE || input.last[j] != Some(want)
                })
                .collect();
            if missing.is_empty() {
                break;
            }
            if now - since > FINAL_WAIT {
                ctx.error(format!(
                    "{name} did not receive the final input record of console(s) {missing:?} \
                     within {} s (last received: {:?})",
                    FINAL_WAIT.as_secs(),
                    input.last
                ));
                break;
            }
        }
    }
    vm.close().await;
}

/// Connect VM `id` again (a few tries); `None` if it cannot.
async fn reconnect(
    ctx: &Ctx,
    id: &vspc_testkit::sim::Identity,
    opts: &VmOptions,
    input: &mut InputCheck,
) -> Option<SimVm> {
    input.reconnected();
    for attempt in 1..=RECONNECT_TRIES {
        match SimVm::connect_with(ctx.proxy, id, Role::Source, opts).await {
            Ok(vm) => return Some(vm),
            Err(e) => {
                ctx.error(format!("{} reconnecting (attempt {attempt}): {e}", id.name));
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    None
}

async fn console_task(
    i: usize,
    j: usize,
    ctx: Arc<Ctx>,
    console: SimConsole,
    phase: watch::Receiver<u8>,
) {
    let who = format!("console {j} of {}", identity(i).name);
    let vm = &ctx.vms[i];
    let mut rng = Rng::new(ctx.seed ^ ((i as u64) << 24) ^ (j as u64) ^ 0x5eed);
    let mut check = StreamCheck {
        vm: i,
        next: None,
        pending: Vec::new(),
    };
    let mut seq = 0u32;
    let typing = (Duration::from_millis(200), Duration::from_millis(800));
    let mut next_send = Instant::now() + rng.between(Duration::ZERO, typing.1);
    let mut final_since: Option<Instant> = None;
    loop {
        let ph = *phase.borrow();
        let wait = next_send
            .saturating_duration_since(Instant::now())
            .min(TICK);
        let data = console.recv_data(wait).await;
        match check.feed(&data) {
            Ok(n) => Ctx::count(&ctx.output_verified, n),
            Err(e) => ctx.error(format!("{who}: {e}")),
        }
        if let Some(why) = console.closed() {
            ctx.error(format!("{who} was closed by the daemon ({why})"));
            return;
        }
        let now = Instant::now();
        if ph == RUN && now >= next_send {
            next_send = now + rng.between(typing.0, typing.1);
            if let Err(e) = console.send(&record(i, j, seq)).await {
                ctx.error(format!("{who} typing: {e}"));
            }
            seq += 1;
        } else if ph == FINAL {
            let since = match final_since {
                Some(s) => s,
                None => {
                    vm.final_seq[j].store(seq, Ordering::Relaxed);
                    if let Err(e) = console.send(&record(i, j, seq)).await {
                        ctx.error(format!("{who} typing its final record: {e}"));
                    }
                    seq += 1;
                    *final_since.insert(now)
                }
            };
            let sent = vm.sent.load(Ordering::Relaxed);
            match check.next {
                Some(next) if next == sent => break,
                Some(next) if next > sent => {
                    ctx.error(format!(
                        "{who} is at stream byte {next}, past the {sent} sent"
                    ));
                    break;
                }
                None if sent == 0 => break,
                _ => {}
            }
            if now - since > FINAL_WAIT {
                ctx.error(format!(
                    "{who} received the stream only up to byte {:?} of {sent} within {} s \
                     after the VM stopped (tail lost)",
                    check.next,
                    FINAL_WAIT.as_secs()
                ));
                break;
            }
        }
    }
    console.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_check_finds_its_place_and_catches_a_lost_byte() {
        let stream = stream_bytes(7, 0, 4096);
        let mut check = StreamCheck {
            vm: 7,
            next: None,
            pending: Vec::new(),
        };
        // Joins mid-word, in small pieces.
        assert_eq!(check.feed(&stream[1003..1010]), Ok(0));
        assert_eq!(check.feed(&stream[1010..1100]), Ok(97));
        assert_eq!(check.next, Some(1100));
        // One byte lost.
        assert!(check.feed(&stream[1101..1200]).is_err());
        // Another VM's stream is refused.
        let mut other = StreamCheck {
            vm: 8,
            next: None,
            pending: Vec::new(),
        };
        assert!(other.feed(&stream[..64]).is_err());
    }

    #[test]
    fn input_check_rules() {
        let mut check = InputCheck::new(3, 2);
        let mut errors = Vec::new();
        let recs = |seqs: &[(usize, u32)]| -> Vec<u8> {
            seqs.iter().flat_map(|&(j, s)| record(3, j, s)).collect()
        };
        // The first record may be any; then consecutive per console.
        let n = check.feed(&recs(&[(0, 5), (1, 0), (0, 6)]), &mut errors);
        assert_eq!((n, errors.len()), (48, 0));
        // A gap without a reconnect, then a duplicate.
        check.feed(&recs(&[(0, 8)]), &mut errors);
        check.feed(&recs(&[(0, 8)]), &mut errors);
        assert_eq!(errors.len(), 2, "{errors:?}");
        // After a reconnect a gap is fine, going back is not.
        errors.clear();
        check.reconnected();
        check.feed(&recs(&[(0, 20), (1, 0)]), &mut errors);
        assert_eq!(errors.len(), 1, "{errors:?}");
        // A corrupted record.
        errors.clear();
        let mut bad = recs(&[(0, 21)]);
        bad[12] ^= 1;
        check.feed(&bad, &mut errors);
        assert_eq!(errors.len(), 1);
    }
}
