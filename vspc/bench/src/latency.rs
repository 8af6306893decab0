//! `vspc-bench latency`: console round trips under background load. Of N
//! VMs with one console each, VM 0 echoes whatever console input reaches
//! it, and the other N-1 stream their pattern at serial-port rate (11,520
//! bytes/s by default: 1,152 bytes every 100 ms, each VM at its own phase,
//! each write up to `--jitter-ms` late), which their consoles verify. VM 0's
//! console types one byte at a time and times the way back:
//! console → daemon → VM → daemon → console.
//!
//! The echo VM and the typing console run on their own thread (a
//! single-threaded runtime), so the background tasks of the bench do not
//! queue ahead of them. With `--busy-poll` that thread spins on
//! non-blocking sockets instead of sleeping, as the peers of a real
//! concentrator (an ESXi host, a user's terminal) would be on machines of
//! their own: their wake-ups then stay out of the figure.
//!
//! Then the same run goes through the bare relay (`relay-server`) on the
//! same ports: the latency any server on this machine could reach under
//! the same load.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use vspc_codec::wire::{encode, Decoder, Event};

use super::fanout::{attach_raw, check_fds, on_relay, peak_rss_kib, relay_attach};
use super::kinds::Kinds;
use super::stream::{splitmix64, verify_console, Pattern, Progress, RawConsole, Verifier};
use super::{
    conclude, cpu_s, round, runtime_with_signals, stopped, DaemonOpts, Failure, STEP_WAIT,
};

#[derive(Args)]
pub struct LatencyArgs {
    #[command(flatten)]
    daemon: DaemonOpts,

    /// VMs, one console each: one echoes, the others stream.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100_000))]
    vms: u32,

    /// Round trips measured.
    #[arg(long, value_name = "S", default_value_t = 2000,
          value_parser = clap::value_parser!(u32).range(1..))]
    samples: u32,

    /// Round trips made first and not counted.
    #[arg(long, value_name = "W", default_value_t = 50)]
    warmup: u32,

    /// Pause between round trips.
    #[arg(long, value_name = "MICROS", default_value_t = 1000)]
    gap_us: u64,

    /// Bytes per second each streaming VM sends (115,200 baud = 11,520).
    #[arg(long, value_name = "BYTES", default_value_t = 11_520)]
    rate: u64,

    /// A streaming VM writes every this many milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 100,
          value_parser = clap::value_parser!(u64).range(1..=10_000))]
    tick_ms: u64,

    /// Each write is late by up to this many milliseconds (random).
    #[arg(long, value_name = "MS", default_value_t = 20)]
    jitter_ms: u64,

    /// Streaming runs this long before the first round trip.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    ramp_ms: u64,

    /// Handshakes (and console negotiations) in flight at once.
    #[arg(long, value_name = "K", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..=65536))]
    in_flight: u32,

    /// The probe's thread (echo VM and typing console) spins instead of
    /// sleeping between bytes; it takes a CPU for the run.
    #[arg(long)]
    busy_poll: bool,

    /// Measure the daemon only.
    #[arg(long)]
    no_relay: bool,
}

/// The JSON line (fields in this order).
#[derive(Serialize)]
struct LatencyReport {
    mode: &'static str,
    vms: u32,
    streaming_vms: u32,
    samples: usize,
    p50_us: u64,
    p99_us: u64,
    p999_us: u64,
    max_us: u64,
    mean_us: f64,
    busy_poll: bool,
    /// What the streaming VMs were set to send, together.
    bg_target_bytes_s: u64,
    /// What their consoles verified per second while the probe ran.
    bg_bytes_s: f64,
    /// Daemon CPU (user + system) per second while the probe ran.
    daemon_cpu_pct: f64,
    rss_peak_kib: u64,
    /// The same through the bare relay.
    relay_p50_us: Option<u64>,
    relay_p99_us: Option<u64>,
    relay_p999_us: Option<u64>,
    relay_max_us: Option<u64>,
    relay_bg_bytes_s: Option<f64>,
}

/// What one run under load measured.
struct Probed {
    /// Round trips in microseconds, sorted.
    rtts: Vec<u64>,
    bg_bytes_s: f64,
    cpu_pct: f64,
}

impl Probed {
    fn pick(&self, q: f64) -> u64 {
        let k = ((q * self.rtts.len() as f64).ceil() as usize).clamp(1, self.rtts.len());
        self.rtts[k - 1]
    }
}

pub fn run(args: LatencyArgs) -> Result<(), Failure> {
    check_fds(u64::from(args.vms), 1, u64::from(args.in_flight))?;
    let (rt, stop) = runtime_with_signals()?;
    let (mut daemon, target) = args.daemon.start(args.vms, &[], &rt)?;
    let result = rt.block_on(async {
        tokio::select! {
            r = async {
                let n = args.vms as usize;
                let (vms, consoles) =
                    attach_raw(target, n, 1, args.in_flight as usize, Kinds::speak_first()).await?;
                let probed = under_load(&args, vms, consoles, target.pid).await?;
                Ok((probed, peak_rss_kib(target.pid)?))
            } => r,
            _ = stopped(stop.clone()) => Err(Failure::Interrupted),
        }
    });
    let (vspc, rss_peak_kib) = conclude(result, daemon.process())?;

    // The same through the bare relay, same ports.
    let relay = if args.no_relay {
        None
    } else {
        let args = &args;
        Some(on_relay(
            &rt,
            &stop,
            args.daemon.base_port,
            |pid| async move {
                let (vms, consoles) = relay_attach(
                    args.daemon.base_port,
                    args.vms as usize,
                    1,
                    args.in_flight as usize,
                )
                .await?;
                under_load(args, vms, consoles, pid).await
            },
        )?)
    };
    rt.shutdown_background();

    let mean = vspc.rtts.iter().sum::<u64>() as f64 / vspc.rtts.len() as f64;
    let report = LatencyReport {
        mode: "latency",
        vms: args.vms,
        streaming_vms: args.vms - 1,
        samples: vspc.rtts.len(),
        p50_us: vspc.pick(0.5),
        p99_us: vspc.pick(0.99),
        p999_us: vspc.pick(0.999),
        max_us: vspc.pick(1.0),
        mean_us: round(mean, 1),
        busy_poll: args.busy_poll,
        bg_target_bytes_s: u64::from(args.vms - 1) * args.rate,
        bg_bytes_s: round(vspc.bg_bytes_s, 0),
        daemon_cpu_pct: round(vspc.cpu_pct, 1),
        rss_peak_kib,
        relay_p50_us: relay.as_ref().map(|r| r.pick(0.5)),
        relay_p99_us: relay.as_ref().map(|r| r.pick(0.99)),
        relay_p999_us: relay.as_ref().map(|r| r.pick(0.999)),
        relay_max_us: relay.as_ref().map(|r| r.pick(1.0)),
        relay_bg_bytes_s: relay.as_ref().map(|r| round(r.bg_bytes_s, 0)),
    };
    let line =
        serde_json::to_string(&report).map_err(|e| format!("cannot format the report: {e}"))?;
    println!("{line}");
    Ok(())
}

/// Stream from VMs 1.. to their consoles, then time round trips through
/// VM 0 and its console; `pid` is the server's, for its CPU time.
async fn under_load(
    args: &LatencyArgs,
    vms: Vec<TcpStream>,
    consoles: Vec<RawConsole>,
    pid: u32,
) -> Result<Probed, Failure> {
    let n = args.vms as usize;
    let pattern = Arc::new(Pattern::new());
    let progress = Arc::new(AtomicU64::new(0));
    let per_tick = usize::try_from(args.rate * args.tick_ms / 1000)
        .map_err(|_| "--rate is too large".to_string())?
        .max(1);
    let tick = Duration::from_millis(args.tick_ms);
    let jitter = Duration::from_millis(args.jitter_ms);

    // The background: VMs 1.. stream, their consoles verify.
    let mut background = JoinSet::new();
    let mut vms = vms.into_iter();
    let echo_vm = vms.next().ok_or("internal error: no VM 0".to_string())?;
    for (i, vm) in vms.enumerate().map(|(i, s)| (i + 1, s)) {
        let pattern = pattern.clone();
        background
            .spawn(async move { serial_stream(vm, i, per_tick, tick, jitter, pattern).await });
    }
    let mut consoles = consoles.into_iter();
    let RawConsole { conn: probe, .. } = consoles
        .next()
        .ok_or("internal error: no console 0".to_string())?;
    for RawConsole { vm, conn, wire, .. } in consoles {
        // A skip notice fails at once: these consoles read as fast as they can.
        let mut v = Verifier::new(vm, None, pattern.clone());
        let progress = Progress::counting(progress.clone());
        background.spawn(async move {
            verify_console(conn, wire, &mut v, None, &progress)
                .await
                .map(|_| ())
                .map_err(|e| format!("console of VM {vm}: {e}"))
        });
    }
    eprintln!(
        "vspc-bench: {} VMs streaming {per_tick} bytes every {} ms; probing after {} ms",
        n - 1,
        args.tick_ms,
        args.ramp_ms
    );
    let ramp = tokio::time::sleep(Duration::from_millis(args.ramp_ms));
    tokio::select! {
        _ = ramp => {}
        Some(joined) = background.join_next() => return Err(ended(joined).into()),
    }

    // The probe, on its own thread.
    let probe = probe
        .stream
        .into_std()
        .map_err(|e| format!("probe console: {e}"))?;
    let echo_vm = echo_vm.into_std().map_err(|e| format!("echo VM: {e}"))?;
    let (done, result) = tokio::sync::oneshot::channel();
    let (samples, warmup) = (args.samples as usize, args.warmup as usize);
    let gap = Duration::from_micros(args.gap_us);
    let busy = args.busy_poll;
    let (bg0, cpu0, t0) = (
        progress.load(Ordering::Relaxed),
        cpu_s(pid)?,
        Instant::now(),
    );
    std::thread::Builder::new()
        .name("probe".into())
        .spawn(move || {
            let r = if busy {
                spin::probe(probe, echo_vm, samples, warmup, gap)
            } else {
                probe_thread(probe, echo_vm, samples, warmup, gap)
            };
            let _ = done.send(r);
        })
        .map_err(|e| format!("cannot start the probe thread: {e}"))?;
    let mut rtts = tokio::select! {
        r = result => r.map_err(|_| "the probe thread died".to_string())??,
        Some(joined) = background.join_next() => return Err(ended(joined).into()),
    };
    let secs = t0.elapsed().as_secs_f64();
    let (bg1, cpu1) = (progress.load(Ordering::Relaxed), cpu_s(pid)?);
    background.abort_all();
    rtts.sort_unstable();
    Ok(Probed {
        rtts,
        bg_bytes_s: (bg1 - bg0) as f64 / secs,
        cpu_pct: 100.0 * (cpu1 - cpu0) / secs,
    })
}

/// Why a background task ended (they run until aborted).
fn ended(joined: Result<Result<(), String>, tokio::task::JoinError>) -> String {
    match joined {
        Ok(Ok(())) => "internal error: a background task ended".into(),
        Ok(Err(e)) => format!("background: {e}"),
        Err(e) => format!("a background task failed: {e}"),
    }
}

/// Send VM `vm`'s pattern, `per_tick` bytes every `tick` (at a phase of its
/// own, each write up to `jitter` late), until aborted.
async fn serial_stream(
    mut stream: TcpStream,
    vm: usize,
    per_tick: usize,
    tick: Duration,
    jitter: Duration,
    pattern: Arc<Pattern>,
) -> Result<(), String> {
    let mut rng = splitmix64(vm as u64);
    let mut frac = |d: Duration| {
        rng = splitmix64(rng);
        d.mul_f64((rng >> 11) as f64 / (1u64 << 53) as f64)
    };
    let mut next = tokio::time::Instant::now() + frac(tick);
    let mut sent = 0u64;
    loop {
        tokio::time::sleep_until(next + frac(jitter)).await;
        let mut left = per_tick;
        while left > 0 {
            // One write per tick unless the piece wraps the pattern's table.
            let piece = pattern.piece(vm, sent, left);
            stream
                .write_all(piece)
                .await
                .map_err(|e| format!("VM {vm} writing: {e}"))?;
            sent += piece.len() as u64;
            left -= piece.len();
        }
        next += tick;
    }
}

fn probe_thread(
    console: std::net::TcpStream,
    vm: std::net::TcpStream,
    samples: usize,
    warmup: usize,
    gap: Duration,
) -> Result<Vec<u64>, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("probe: cannot start a runtime: {e}"))?;
    rt.block_on(async move {
        let console = TcpStream::from_std(console).map_err(|e| format!("probe console: {e}"))?;
        let vm = TcpStream::from_std(vm).map_err(|e| format!("echo VM: {e}"))?;
        let echo = tokio::spawn(echo(vm));
        let rtts = probe(console, samples, warmup, gap).await;
        echo.abort();
        rtts
    })
}

/// The echo VM: every data byte of console input goes straight back.
async fn echo(mut vm: TcpStream) -> Result<(), String> {
    let mut dec = Decoder::default();
    let mut buf = vec![0u8; 4096];
    let mut out = Vec::with_capacity(4096);
    loop {
        let n = match vm.read(&mut buf).await {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) => return Err(format!("echo VM: {e}")),
        };
        dec.decode(&buf[..n], |ev| {
            if let Event::Data(d) = ev {
                encode::data(d, &mut out);
            }
        })
        .map_err(|e| format!("echo VM: {e}"))?;
        if !out.is_empty() {
            vm.write_all(&out)
                .await
                .map_err(|e| format!("echo VM: {e}"))?;
            out.clear();
        }
    }
}

/// Type one byte, wait for it to come back; `warmup + samples` times.
async fn probe(
    mut console: TcpStream,
    samples: usize,
    warmup: usize,
    gap: Duration,
) -> Result<Vec<u64>, String> {
    let mut dec = Decoder::default();
    let mut buf = vec![0u8; 4096];
    let mut rtts = Vec::with_capacity(samples);
    for k in 0..warmup + samples {
        let byte = b'a' + (k % 26) as u8;
        let t = Instant::now();
        console
            .write_all(&[byte])
            .await
            .map_err(|e| format!("probe console writing: {e}"))?;
        let mut back = false;
        while !back {
            let n = match tokio::time::timeout(STEP_WAIT, console.read(&mut buf)).await {
                Err(_) => return Err(format!("round trip {k}: no echo within {STEP_WAIT:?}")),
                Ok(Ok(0)) => return Err(format!("round trip {k}: console closed")),
                Ok(Ok(n)) => n,
                Ok(Err(e)) => return Err(format!("round trip {k}: {e}")),
            };
            back = echoed(&mut dec, &buf[..n], byte, k)?;
        }
        let rtt = t.elapsed();
        if k >= warmup {
            rtts.push(rtt.as_micros().try_into().unwrap_or(u64::MAX));
        }
        tokio::time::sleep(gap).await;
    }
    Ok(rtts)
}

/// Whether what the probe console read (`data`) is the echo of `byte`, in
/// round trip `k`; anything else is an error.
fn echoed(dec: &mut Decoder, data: &[u8], byte: u8, k: usize) -> Result<bool, String> {
    let mut back = false;
    let mut stray = None;
    dec.decode(data, |ev| {
        if let Event::Data(d) = ev {
            for &b in d {
                if b == byte && !back {
                    back = true;
                } else {
                    stray = Some(b);
                }
            }
        }
    })
    .map_err(|e| format!("probe console: {e}"))?;
    match stray {
        Some(b) => Err(format!(
            "round trip {k}: the console received 0x{b:02x}, expected only 0x{byte:02x}"
        )),
        None => Ok(back),
    }
}

/// The probe's busy-polling variant: both sockets non-blocking, one thread
/// that never sleeps while a round trip is under way.
mod spin {
    use super::STEP_WAIT;
    use std::io::{self, Read, Write};
    use std::net::TcpStream;
    use std::time::{Duration, Instant};
    use vspc_codec::wire::{encode, Decoder, Event};

    /// Read what is there without waiting: `Ok(None)` if nothing is.
    fn try_read(s: &mut TcpStream, buf: &mut [u8], what: &str) -> Result<Option<usize>, String> {
        match s.read(buf) {
            Ok(0) => Err(format!("{what} closed")),
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(None),
            Err(e) => Err(format!("{what}: {e}")),
        }
    }

    /// Write all of `data`, spinning while the socket is full.
    fn write_all(s: &mut TcpStream, mut data: &[u8], what: &str) -> Result<(), String> {
        let t = Instant::now();
        while !data.is_empty() {
            match s.write(data) {
                Ok(n) => data = &data[n..],
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) =>
                {
                    if t.elapsed() > STEP_WAIT {
                        return Err(format!("{what}: cannot write for {STEP_WAIT:?}"));
                    }
                    std::hint::spin_loop();
                }
                Err(e) => return Err(format!("{what}: {e}")),
            }
        }
        Ok(())
    }

    pub(super) fn probe(
        mut console: TcpStream,
        mut vm: TcpStream,
        samples: usize,
        warmup: usize,
        gap: Duration,
    ) -> Result<Vec<u64>, String> {
        for s in [&console, &vm] {
            s.set_nonblocking(true)
                .map_err(|e| format!("probe: cannot make a socket non-blocking: {e}"))?;
        }
        let (mut cdec, mut vdec) = (Decoder::default(), Decoder::default());
        let mut buf = vec![0u8; 4096];
        let mut out = Vec::with_capacity(4096);
        let mut rtts = Vec::with_capacity(samples);
        for k in 0..warmup + samples {
            let byte = b'a' + (k % 26) as u8;
            let t = Instant::now();
            write_all(&mut console, &[byte], "probe console")?;
            let mut back = false;
            while !back {
                // The echo VM's side.
                if let Some(n) = try_read(&mut vm, &mut buf, "echo VM")? {
                    vdec.decode(&buf[..n], |ev| {
                        if let Event::Data(d) = ev {
                            encode::data(d, &mut out);
                        }
                    })
                    .map_err(|e| format!("echo VM: {e}"))?;
                    if !out.is_empty() {
                        write_all(&mut vm, &out, "echo VM")?;
                        out.clear();
                    }
                }
                // The console's side.
                if let Some(n) = try_read(&mut console, &mut buf, "probe console")? {
                    back = super::echoed(&mut cdec, &buf[..n], byte, k)?;
                }
                if !back && t.elapsed() > STEP_WAIT {
                    return Err(format!("round trip {k}: no echo within {STEP_WAIT:?}"));
                }
                // Any other thread that wants this CPU gets it at once.
                std::thread::yield_now();
            }
            let rtt = t.elapsed();
            if k >= warmup {
                rtts.push(rtt.as_micros().try_into().unwrap_or(u64::MAX));
            }
            std::thread::sleep(gap);
        }
        Ok(rtts)
    }
}
