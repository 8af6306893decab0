//! `vspc-bench burst`: one VM writes B bytes at full speed (no window, as a
//! guest dumping a kernel log does) to C consoles that read as fast as they
//! can. Alongside them, `--stuck K` consoles connect, negotiate and then read
//! nothing while the fast ones are served, and `--slow K` consoles read at
//! `--slow-rate` bytes per second. The daemon must get every byte, in order,
//! to every fast console, without the stuck or slow ones holding it back; a
//! console it cannot keep up with loses the oldest output and is told so
//! in-band, which here is a count in the report, not a failure.
//!
//! Timed from the first byte written to the last fast console's last byte.
//! After that the stuck consoles start reading, and they and the slow ones
//! read to the end of the VM's stream, each byte checked, each skip notice
//! counted, so the report says what the daemon kept for them, what it
//! skipped, and whether they are still connected.
//!
//! Every console, fast, stuck or slow, is of the kind `--console-kind`
//! gives it (console k of the run, counting the fast ones, then the stuck,
//! then the slow ones; see `kinds.rs`), so a stuck silent-telnet console
//! does not answer the daemon's offer until it starts reading.
//!
//! First, unless `--no-relay`, the same burst to C fast consoles through
//! the bare relay (without stuck or slow consoles: it writes to its
//! consoles in turn, so one that does not read would stop it); a fast
//! console through the daemon that has not got its last byte 30 s after
//! the relay's time fails the run.
//!
//! With `--via ssh` the consoles are the real OpenSSH client logged in
//! through the daemon's SSH front door instead (see [`ssh`]).

use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use serde::Serialize;

use super::fanout::{all_fast, attach_raw, check_fds, on_relay, relay_attach, AFTER_RELAY};
use super::kinds::{tally, ByKind, KindOpts};
use super::stream::{listing, stream_measured, ConsoleEnd, Pattern, Phase, Reading, Shape, PERIOD};
use super::{check_ports, conclude, round, runtime_with_signals, stopped, DaemonOpts, Failure};

mod ssh;

/// Console negotiations in flight at once (a burst has few consoles).
const IN_FLIGHT: usize = 64;

#[derive(Args)]
pub struct BurstArgs {
    #[command(flatten)]
    daemon: DaemonOpts,

    #[command(flatten)]
    kind: KindOpts,

    /// Bytes the VM writes, at full speed.
    #[arg(long, value_name = "B", default_value_t = 64 << 20,
          value_parser = clap::value_parser!(u64).range(1..))]
    bytes: u64,

    /// Consoles reading as fast as they can; each must get every byte, in
    /// order.
    #[arg(long, value_name = "C", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    consoles: u32,

    /// Consoles that connect (and, if of a kind that speaks first,
    /// negotiate) and then do not read until the fast ones are done (they
    /// must not slow them down). They follow --console-kind too: console k
    /// of the run counts the fast ones first, then these, then --slow.
    #[arg(long, value_name = "K", default_value_t = 0,
          value_parser = clap::value_parser!(u32).range(0..=10_000))]
    stuck: u32,

    /// Consoles reading at most --slow-rate bytes per second (they must
    /// stay connected and not slow the fast ones down); of --console-kind's
    /// kinds too.
    #[arg(long, value_name = "K", default_value_t = 0,
          value_parser = clap::value_parser!(u32).range(0..=10_000))]
    slow: u32,

    /// Read rate of each --slow console, telnet bytes per second. The
    /// daemon waits for a console that reads at least 320 KiB/s, so the
    /// default is well below that: a console it must give up on.
    #[arg(long, value_name = "BYTES_PER_SEC", default_value_t = 100 * 1024,
          value_parser = clap::value_parser!(u64).range(1..))]
    slow_rate: u64,

    /// Size of each VM write.
    #[arg(long, value_name = "BYTES", default_value_t = 64 * 1024,
          value_parser = clap::value_parser!(u64).range(1..=(PERIOD as u64)))]
    chunk: u64,

    /// A console that has not got every byte when no console has verified
    /// one for this long fails (with the relay, for the fast consoles:
    /// one that has not got its last byte 30 s after the relay's time for
    /// the same burst fails).
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    stall_secs: u64,

    /// Measure the daemon only.
    #[arg(long)]
    no_relay: bool,

    /// How the consoles reach the daemon: its telnet console port, or the
    /// SSH front door with the real OpenSSH client (`ssh`, with keys made by
    /// `ssh-keygen`; Debian's openssh-client), its stdout piped as the
    /// console, on port P+3 (--console-kind is then refused: every console
    /// is an OpenSSH client).
    #[arg(long, value_enum, default_value_t = Via::Telnet)]
    via: Via,

    /// With --via ssh: `list@` logins timed before the burst.
    #[arg(long, value_name = "N", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    logins: u32,
}

/// How the consoles connect (`--via`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Via {
    /// The VM's telnet console port.
    Telnet,
    /// The SSH front door, through OpenSSH's `ssh`.
    Ssh,
}

/// A slow or stuck console in the report.
#[derive(Serialize)]
struct Other {
    kind: &'static str,
    /// Data bytes received, each checked.
    received: u64,
    /// Bytes the daemon announced in-band it skipped, in how many notices.
    skipped: u64,
    notices: u64,
    /// received + skipped is the whole burst, every byte received in order.
    verified: bool,
    /// Still connected at the end.
    connected: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

impl Other {
    fn of(c: &ConsoleEnd) -> Other {
        Other {
            kind: c.kind.map_or("-", |k| k.name()),
            received: c.received,
            skipped: c.skipped,
            notices: c.notices,
            verified: c.error.is_none(),
            connected: c.connected,
            error: c.error.clone(),
        }
    }
}

/// The JSON line (fields in this order).
#[derive(Serialize)]
struct BurstReport {
    mode: &'static str,
    bytes: u64,
    /// Fast consoles.
    consoles: u32,
    /// `--console-kind`; the fast consoles of each kind, and how many of
    /// them got every byte in order.
    console_kind: &'static str,
    consoles_by_kind: ByKind,
    exact_by_kind: ByKind,
    stuck: u32,
    slow: u32,
    slow_rate: Option<u64>,
    chunk: u64,
    /// First byte written to the last fast console's last byte.
    vspc_s: f64,
    /// bytes × consoles / vspc_s (bytes skipped for a fast console, a
    /// failure, are not counted).
    mib_s: f64,
    /// Per fast console: every byte, in order, none skipped, still connected.
    verified: Vec<bool>,
    /// Every fast console got every byte in order.
    every_byte: bool,
    slow_consoles: Vec<Other>,
    slow_skipped_bytes: u64,
    /// Every slow console still connected, no byte wrong.
    slow_connected: bool,
    stuck_consoles: Vec<Other>,
    stuck_skipped_bytes: u64,
    /// The daemon's CPU (user + system) over vspc_s, and per GiB delivered.
    daemon_cpu_s: f64,
    cpu_s_per_gib: f64,
    /// The daemon's VmHWM (it ran only this burst).
    rss_peak_kib: u64,
    bench_cpu_s: f64,
    relay_s: Option<f64>,
    relay_mib_s: Option<f64>,
    relay_cpu_s: Option<f64>,
    /// mib_s / relay_mib_s.
    ratio: Option<f64>,
}

pub fn run(args: BurstArgs) -> Result<(), Failure> {
    if args.via == Via::Ssh {
        if args.kind.console_kind.is_some() {
            return Err(
                "--console-kind is for consoles on the console port; with --via ssh \
                        every console is an OpenSSH client"
                    .to_string()
                    .into(),
            );
        }
        return ssh::run(args);
    }
    let kinds = args.kind.kinds(&args.daemon.daemon_arg)?;
    let (fast, stuck, slow) = (
        args.consoles as usize,
        args.stuck as usize,
        args.slow as usize,
    );
    let all = fast + stuck + slow;
    check_fds(1, all as u64, IN_FLIGHT as u64)?;
    let (rt, stop) = runtime_with_signals()?;
    // The daemon's ports, before the relay takes its time.
    check_ports(args.daemon.base_port, 1, &rt)?;
    let pattern = Arc::new(Pattern::new());
    let shape = Shape {
        total: args.bytes,
        chunk: usize::try_from(args.chunk).unwrap_or(usize::MAX),
        window: 0,
        stall: Duration::from_secs(args.stall_secs),
        deadline: None,
    };
    // Consoles 0.. are fast, then the stuck ones, then the slow ones.
    let reading = |index: usize| {
        if index < fast {
            Reading::Fast
        } else if index < fast + stuck {
            Reading::Stuck
        } else {
            Reading::Limited(args.slow_rate)
        }
    };

    // The relay first: its time for the burst sets the fast consoles'
    // deadline through the daemon.
    let relay = relay_phase(&args, &rt, &stop, shape, pattern.clone())?;
    let (shape, gave_up) = match &relay {
        Some(r) => {
            let deadline = Duration::from_secs_f64(r.secs) + AFTER_RELAY;
            let when = format!(
                "{} s after the relay finished the same burst ({:.1} s after the first byte)",
                AFTER_RELAY.as_secs(),
                deadline.as_secs_f64()
            );
            let shape = Shape {
                deadline: Some(deadline),
                ..shape
            };
            (shape, when)
        }
        None => (
            shape,
            format!(
                "when no console had verified a byte for {} s",
                args.stall_secs
            ),
        ),
    };

    let (mut daemon, target) = args.daemon.start(1, &[], &rt)?;
    let result = rt.block_on(async {
        tokio::select! {
            r = async {
                let (vms, consoles) = attach_raw(target, 1, all, IN_FLIGHT, kinds).await?;
                let consoles = consoles.into_iter().map(|c| {
                    let r = reading(c.index);
                    (c, r)
                });
                stream_measured("vspc", target.pid, vms, consoles.collect(), shape, pattern.clone())
                    .await
            } => r,
            _ = stopped(stop.clone()) => Err(Failure::Interrupted),
        }
    });
    let vspc = conclude(result, daemon.process())?;
    rt.shutdown_background();

    let of = |r: Reading| vspc.consoles.iter().filter(move |c| c.reading == r);
    let slow_ends: Vec<&ConsoleEnd> = of(Reading::Limited(args.slow_rate)).collect();
    let stuck_ends: Vec<&ConsoleEnd> = of(Reading::Stuck).collect();
    let verified: Vec<bool> = of(Reading::Fast).map(ConsoleEnd::exact).collect();
    let report = BurstReport {
        mode: "burst",
        bytes: args.bytes,
        consoles: args.consoles,
        console_kind: kinds.name(),
        consoles_by_kind: ByKind::count(of(Reading::Fast).map(|c| (c.kind, true))),
        exact_by_kind: ByKind::count(of(Reading::Fast).map(|c| (c.kind, c.exact()))),
        stuck: args.stuck,
        slow: args.slow,
        slow_rate: (slow > 0).then_some(args.slow_rate),
        chunk: args.chunk,
        vspc_s: round(vspc.secs, 3),
        mib_s: round(vspc.mib_s, 1),
        every_byte: verified.iter().all(|v| *v),
        verified,
        slow_consoles: slow_ends.iter().map(|c| Other::of(c)).collect(),
        slow_skipped_bytes: slow_ends.iter().map(|c| c.skipped).sum(),
        slow_connected: slow_ends.iter().all(|c| c.connected && c.error.is_none()),
        stuck_consoles: stuck_ends.iter().map(|c| Other::of(c)).collect(),
        stuck_skipped_bytes: stuck_ends.iter().map(|c| c.skipped).sum(),
        daemon_cpu_s: round(vspc.cpu_s, 2),
        cpu_s_per_gib: round(vspc.cpu_s_per_gib, 3),
        rss_peak_kib: vspc.rss_peak_kib,
        bench_cpu_s: round(vspc.bench_cpu_s, 2),
        relay_s: relay.as_ref().map(|r| round(r.secs, 3)),
        relay_mib_s: relay.as_ref().map(|r| round(r.mib_s, 1)),
        relay_cpu_s: relay.as_ref().map(|r| round(r.cpu_s, 2)),
        ratio: relay.as_ref().map(|r| round(vspc.mib_s / r.mib_s, 3)),
    };
    let line =
        serde_json::to_string(&report).map_err(|e| format!("cannot format the report: {e}"))?;
    println!("{line}");
    failures(&vspc, args.bytes, &gave_up)
}

/// The same burst to the fast consoles through the bare relay, unless
/// --no-relay.
fn relay_phase(
    args: &BurstArgs,
    rt: &tokio::runtime::Runtime,
    stop: &tokio::sync::watch::Receiver<bool>,
    shape: Shape,
    pattern: Arc<Pattern>,
) -> Result<Option<Phase>, Failure> {
    if args.no_relay {
        return Ok(None);
    }
    let (fast, base) = (args.consoles as usize, args.daemon.base_port);
    Ok(Some(on_relay(rt, stop, base, |pid| async move {
        let (vms, consoles) = relay_attach(base, 1, fast, IN_FLIGHT).await?;
        let phase = stream_measured("relay", pid, vms, all_fast(consoles), shape, pattern).await?;
        phase.check_errors("relay")?;
        Ok(phase)
    })?))
}

/// A fast console that missed, or got a wrong, byte fails the run, and so
/// does one that had not got its last byte `when` the phase gave up on it;
/// so does a slow console the daemon dropped or sent a wrong byte (it
/// reads, so it must be kept). Stuck consoles are only reported.
fn failures(vspc: &Phase, bytes: u64, when: &str) -> Result<(), Failure> {
    let describe = |c: &ConsoleEnd| {
        let mut why = Vec::new();
        if let Some(e) = &c.error {
            why.push(e.clone());
        }
        if c.skipped > 0 && c.reading == Reading::Fast {
            why.push(format!(
                "the daemon skipped {} of its {bytes} bytes ({} notices), received {}",
                c.skipped, c.notices, c.received
            ));
        }
        if !c.connected && c.error.is_none() {
            why.push("disconnected after its last byte".into());
        }
        format!("{}: {}", c.who(), why.join("; "))
    };
    let mut lines: Vec<String> = vspc.check_unfinished("vspc", when).into_iter().collect();
    let fast: Vec<&ConsoleEnd> = vspc
        .consoles
        .iter()
        .filter(|c| c.reading == Reading::Fast && !c.exact() && !c.unfinished)
        .collect();
    if !fast.is_empty() {
        lines.push(format!(
            "{} fast console(s) ({}) did not get every byte in order: {}",
            fast.len(),
            tally(fast.iter().map(|c| c.kind)),
            listing(fast.into_iter().map(describe))
        ));
    }
    let slow: Vec<String> = vspc
        .consoles
        .iter()
        .filter(|c| matches!(c.reading, Reading::Limited(_)) && (c.error.is_some() || !c.connected))
        .map(describe)
        .collect();
    if !slow.is_empty() {
        lines.push(format!(
            "{} slow console(s) were dropped or got a wrong byte: {}",
            slow.len(),
            listing(slow.into_iter())
        ));
    }
    if lines.is_empty() {
        Ok(())
    } else {
        Err(lines.join("\n  ").into())
    }
}
