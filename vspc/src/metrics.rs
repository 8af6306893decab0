//! The daemon's counters, and their Prometheus text exposition.
//!
//! Counters are plain atomics owned by the [`Hub`] ([`Metrics`]) or by the
//! VM entries (bytes each way), bumped with one relaxed add where things
//! happen; nothing is locked on the data path. [`render`] reads them at
//! scrape time into a snapshot and writes it with prometheus-client's
//! Prometheus text encoder (version 0.0.4): names prefixed `vspc_`, base
//! units (bytes, seconds), `_total` on counters, and no per-VM labels, so
//! the number of series does not grow with the number of VMs.

use crate::hub::Hub;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The `Content-Type` of [`render`]'s output.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// A listening socket, as the `listener` label names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Proxy = 0,
    Admin = 1,
    Console = 2,
    Http = 3,
    Ssh = 4,
}

impl Listener {
    const ALL: [Listener; 5] = [
        Listener::Proxy,
        Listener::Admin,
        Listener::Console,
        Listener::Http,
        Listener::Ssh,
    ];

    fn label(self) -> &'static str {
        match self {
            Listener::Proxy => "proxy",
            Listener::Admin => "admin",
            Listener::Console => "console",
            Listener::Http => "http",
            Listener::Ssh => "ssh",
        }
    }
}

/// How a vMotion (or an attempt at one) ended, as the `outcome` label
/// names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vmotion {
    /// COMPLETE moved the VM to the destination.
    Complete = 0,
    /// ABORT left the VM with the source.
    Abort = 1,
    /// `--vmotion-timeout` passed with the vMotion still pending.
    Timeout = 2,
    /// BEGIN was answered NOTNOW (another vMotion of the port pending).
    NotNow = 3,
    /// A PEER whose cookie matched no pending vMotion.
    RefusedPeer = 4,
}

impl Vmotion {
    const ALL: [Vmotion; 5] = [
        Vmotion::Complete,
        Vmotion::Abort,
        Vmotion::Timeout,
        Vmotion::NotNow,
        Vmotion::RefusedPeer,
    ];

    fn label(self) -> &'static str {
        match self {
            Vmotion::Complete => "complete",
            Vmotion::Abort => "abort",
            Vmotion::Timeout => "timeout",
            Vmotion::NotNow => "notnow",
            Vmotion::RefusedPeer => "refused_peer",
        }
    }
}

/// Why a console went away, as the `reason` label names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disconnect {
    /// The client closed its connection (or it failed).
    Closed = 0,
    /// Its socket took no output for `--console-stall-timeout`.
    Stall = 1,
    /// Cleared through the admin port or the HTTP API.
    Cleared = 2,
}

impl Disconnect {
    const ALL: [Disconnect; 3] = [Disconnect::Closed, Disconnect::Stall, Disconnect::Cleared];

    fn label(self) -> &'static str {
        match self {
            Disconnect::Closed => "closed",
            Disconnect::Stall => "stall",
            Disconnect::Cleared => "cleared",
        }
    }
}

/// Why the SSH front door closed a connection itself, as the `reason`
/// label names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SshClosed {
    /// Not authenticated within `--ssh-auth-timeout`.
    AuthTimeout = 0,
    /// Closed at accept: `--ssh-max-unauthenticated` connections were
    /// already waiting to authenticate.
    Unauthenticated = 1,
    /// No data either way for `--ssh-idle-timeout`.
    Idle = 2,
    /// Its key was removed or narrowed by a reload (a session closed).
    Revoked = 3,
}

impl SshClosed {
    const ALL: [SshClosed; 4] = [
        SshClosed::AuthTimeout,
        SshClosed::Unauthenticated,
        SshClosed::Idle,
        SshClosed::Revoked,
    ];

    fn label(self) -> &'static str {
        match self {
            SshClosed::AuthTimeout => "auth_timeout",
            SshClosed::Unauthenticated => "unauthenticated_limit",
            SshClosed::Idle => "idle",
            SshClosed::Revoked => "revoked",
        }
    }
}

/// A histogram of durations with fixed bucket bounds, in atomics.
#[derive(Debug)]
pub struct Histogram {
    /// Upper bounds of the buckets, in seconds, ascending.
    bounds: &'static [f64],
    /// Observations per bucket (not cumulative); the last is +Inf.
    counts: Vec<AtomicU64>,
    /// Sum of all observations, in nanoseconds (584 years fit).
    sum_ns: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_ns: AtomicU64::new(0),
        }
    }

    /// Count one observation.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self
            .bounds
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    fn snapshot(&self) -> HistogramSnapshot {
        let per_bucket: Vec<u64> = self
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        let mut buckets: Vec<(f64, u64)> = self
            .bounds
            .iter()
            .copied()
            .zip(per_bucket.iter().copied())
            .collect();
        buckets.push((f64::INFINITY, per_bucket.last().copied().unwrap_or(0)));
        HistogramSnapshot {
            count: per_bucket.iter().sum(),
            sum: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
            buckets,
        }
    }
}

/// BEGIN→GOAHEAD: the daemon answers at once, so microseconds to a second.
const GOAHEAD_BOUNDS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.05, 0.1, 1.0,
];

/// BEGIN→COMPLETE: a vMotion takes seconds to minutes (300 s times out).
const COMPLETE_BOUNDS: &[f64] = &[0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];

/// The hub's and the network layer's counters (see the module doc).
#[derive(Debug)]
pub struct Metrics {
    /// Connections accepted, by [`Listener`].
    accepted: [AtomicU64; 5],
    /// accept() failures (descriptors exhausted and the like), by
    /// [`Listener`].
    accept_errors: [AtomicU64; 5],
    /// TLS handshakes that failed or timed out, by [`Listener`] (proxy or
    /// http).
    tls_failures: [AtomicU64; 5],
    /// SSH connections and sessions the front door closed, by
    /// [`SshClosed`] reason.
    ssh_closed: [AtomicU64; 4],
    /// vMotions by [`Vmotion`] outcome.
    vmotions: [AtomicU64; 5],
    /// Time from VMOTION-BEGIN to the GOAHEAD answer.
    pub goahead: Histogram,
    /// Time from VMOTION-BEGIN to a successful COMPLETE.
    pub complete: Histogram,
    /// Consoles gone, by [`Disconnect`] reason.
    disconnects: [AtomicU64; 3],
    /// Output bytes of VM entries that expired (the live ones are summed
    /// from the entries at scrape time), so the total never goes down.
    pub(crate) retired_out: AtomicU64,
    /// Console input bytes of VM entries that expired.
    pub(crate) retired_in: AtomicU64,
    /// Proxy-port connections closed at accept because their address is
    /// not in `--proxy-allow`: someone else trying to be a VM.
    proxy_refused: AtomicU64,
    /// HTTP connections closed at accept: `--http-max-connections` were
    /// open.
    http_refused: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics {
            accepted: Default::default(),
            accept_errors: Default::default(),
            tls_failures: Default::default(),
            ssh_closed: Default::default(),
            vmotions: Default::default(),
            goahead: Histogram::new(GOAHEAD_BOUNDS),
            complete: Histogram::new(COMPLETE_BOUNDS),
            disconnects: Default::default(),
            retired_out: AtomicU64::new(0),
            retired_in: AtomicU64::new(0),
            proxy_refused: AtomicU64::new(0),
            http_refused: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    /// A connection was accepted on `l`.
    pub fn accepted(&self, l: Listener) {
        self.accepted[l as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// accept() failed on `l`.
    pub fn accept_error(&self, l: Listener) {
        self.accept_errors[l as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// A TLS handshake on `l` failed or timed out.
    pub fn tls_failure(&self, l: Listener) {
        self.tls_failures[l as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// The SSH front door closed a connection or session for this reason.
    pub fn ssh_closed(&self, reason: SshClosed) {
        self.ssh_closed[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// A vMotion ended (or was refused) this way.
    pub fn vmotion(&self, outcome: Vmotion) {
        self.vmotions[outcome as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// A console went away for this reason.
    pub fn disconnect(&self, reason: Disconnect) {
        self.disconnects[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// A proxy-port connection from outside `--proxy-allow` was closed.
    pub fn proxy_refused(&self) {
        self.proxy_refused.fetch_add(1, Ordering::Relaxed);
    }

    /// An HTTP connection was closed at accept: the most allowed were open.
    pub fn http_refused(&self) {
        self.http_refused.fetch_add(1, Ordering::Relaxed);
    }

    /// Connections accepted on `l` so far.
    pub fn accepted_on(&self, l: Listener) -> u64 {
        self.accepted[l as usize].load(Ordering::Relaxed)
    }
}

/// A histogram as read at scrape time.
#[derive(Debug, Clone)]
struct HistogramSnapshot {
    count: u64,
    sum: f64,
    /// (upper bound, observations in this bucket), +Inf last.
    buckets: Vec<(f64, u64)>,
}

/// Everything a scrape shows, read from the atomics in one go.
#[derive(Debug)]
struct Snapshot {
    /// The hub's [`crate::hub::Totals`], field by field.
    vms: u64,
    vms_connected: u64,
    consoles: u64,
    bytes_out: u64,
    bytes_in: u64,
    /// Output bytes skipped for lagging consoles (the outboxes' counter).
    skipped: u64,
    /// (label, value) of each labelled counter family.
    accepted: Vec<(&'static str, u64)>,
    accept_errors: Vec<(&'static str, u64)>,
    tls_failures: Vec<(&'static str, u64)>,
    ssh_closed: Vec<(&'static str, u64)>,
    vmotions: Vec<(&'static str, u64)>,
    goahead: HistogramSnapshot,
    complete: HistogramSnapshot,
    disconnects: Vec<(&'static str, u64)>,
    /// (backend, queued bytes, dropped events).
    backends: Vec<(String, u64, u64)>,
    /// Proxy connections refused by `--proxy-allow`.
    proxy_refused: u64,
    /// HTTP connections refused by `--http-max-connections`.
    http_refused: u64,
}

fn load_all<const N: usize>(
    a: &[AtomicU64; N],
    labels: impl Iterator<Item = &'static str>,
) -> Vec<(&'static str, u64)> {
    labels
        .zip(a.iter())
        .map(|(l, v)| (l, v.load(Ordering::Relaxed)))
        .collect()
}

impl Snapshot {
    fn take(hub: &Hub) -> Snapshot {
        let m = hub.metrics();
        let t = hub.totals();
        Snapshot {
            vms: t.vms,
            vms_connected: t.vms_connected,
            consoles: t.consoles,
            bytes_out: t.bytes_out,
            bytes_in: t.bytes_in,
            skipped: crate::outbox::skipped_total(),
            accepted: load_all(&m.accepted, Listener::ALL.iter().map(|l| l.label())),
            accept_errors: {
                let mut v = load_all(&m.accept_errors, Listener::ALL.iter().map(|l| l.label()));
                // The console ports' accepting thread counts its own.
                v[Listener::Console as usize].1 += hub.console_accept_errors();
                v
            },
            tls_failures: load_all(&m.tls_failures, Listener::ALL.iter().map(|l| l.label()))
                .into_iter()
                // Only these two speak TLS.
                .filter(|(l, _)| matches!(*l, "proxy" | "http"))
                .collect(),
            ssh_closed: load_all(&m.ssh_closed, SshClosed::ALL.iter().map(|r| r.label())),
            vmotions: load_all(&m.vmotions, Vmotion::ALL.iter().map(|o| o.label())),
            goahead: m.goahead.snapshot(),
            complete: m.complete.snapshot(),
            disconnects: load_all(&m.disconnects, Disconnect::ALL.iter().map(|r| r.label())),
            backends: hub.backend().stats(),
            proxy_refused: m.proxy_refused.load(Ordering::Relaxed),
            http_refused: m.http_refused.load(Ordering::Relaxed),
        }
    }
}

type Fmt = Result<(), std::fmt::Error>;

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, unit: Option<&Unit>, v: u64) -> Fmt {
    let m = e.encode_descriptor(name, help, unit, MetricType::Counter)?;
    ConstCounter::new(v).encode(m)
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, unit: Option<&Unit>, v: i64) -> Fmt {
    let m = e.encode_descriptor(name, help, unit, MetricType::Gauge)?;
    ConstGauge::new(v).encode(m)
}

fn labelled_counters(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    values: &[(&'static str, u64)],
) -> Fmt {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (value, n) in values {
        let labels = [(label, *value)];
        ConstCounter::new(*n).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

fn histogram(e: &mut DescriptorEncoder, name: &str, help: &str, h: &HistogramSnapshot) -> Fmt {
    let mut m = e.encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Histogram)?;
    // The encoder adds the +Inf bucket itself when it is missing; ours is
    // last, with the observations past every bound.
    m.encode_histogram::<NoLabelSet>(h.sum, h.count, &h.buckets, None)
}

fn gauge_i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl prometheus_client::collector::Collector for Snapshot {
    fn encode(&self, mut e: DescriptorEncoder) -> Fmt {
        let e = &mut e;
        let info = [("version", env!("CARGO_PKG_VERSION"))];
        {
            let mut m = e.encode_descriptor(
                "build_info",
                "The running vspc's version.",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(1i64).encode(m.encode_family(&info)?)?;
        }
        gauge(
            e,
            "vms",
            "VM serial ports known (each holds a console port).",
            None,
            gauge_i(self.vms),
        )?;
        gauge(
            e,
            "vms_connected",
            "VM serial ports with an ESXi connection now.",
            None,
            gauge_i(self.vms_connected),
        )?;
        gauge(
            e,
            "consoles",
            "Consoles attached now, over all VMs.",
            None,
            gauge_i(self.consoles),
        )?;
        labelled_counters(
            e,
            "connections_accepted",
            "Connections accepted, by listener.",
            "listener",
            &self.accepted,
        )?;
        counter(
            e,
            "proxy_refused",
            "Proxy-port connections closed at accept: their address is not in --proxy-allow.",
            None,
            self.proxy_refused,
        )?;
        counter(
            e,
            "http_connections_refused",
            "HTTP connections closed at accept: --http-max-connections were open.",
            None,
            self.http_refused,
        )?;
        labelled_counters(
            e,
            "accept_errors",
            "Failed accept() calls, by listener.",
            "listener",
            &self.accept_errors,
        )?;
        labelled_counters(
            e,
            "tls_handshake_failures",
            "TLS handshakes that failed or timed out, by listener.",
            "listener",
            &self.tls_failures,
        )?;
        labelled_counters(
            e,
            "ssh_closed",
            "SSH connections and sessions closed by vspc, by reason.",
            "reason",
            &self.ssh_closed,
        )?;
        counter(
            e,
            "vm_to_console",
            "Serial output read from VMs (counted once, however many consoles see it).",
            Some(&Unit::Bytes),
            self.bytes_out,
        )?;
        counter(
            e,
            "console_to_vm",
            "Console input accepted for VMs.",
            Some(&Unit::Bytes),
            self.bytes_in,
        )?;
        counter(
            e,
            "console_skipped",
            "Output skipped for consoles that fell a whole queue behind.",
            Some(&Unit::Bytes),
            self.skipped,
        )?;
        labelled_counters(
            e,
            "console_disconnects",
            "Consoles gone, by reason.",
            "reason",
            &self.disconnects,
        )?;
        labelled_counters(
            e,
            "vmotions",
            "vMotions, by outcome.",
            "outcome",
            &self.vmotions,
        )?;
        histogram(
            e,
            "vmotion_goahead",
            "Time from VMOTION-BEGIN to the GOAHEAD answer.",
            &self.goahead,
        )?;
        histogram(
            e,
            "vmotion_complete",
            "Time from VMOTION-BEGIN to COMPLETE.",
            &self.complete,
        )?;
        {
            let mut m = e.encode_descriptor(
                "backend_queued",
                "Console output queued for a backend.",
                Some(&Unit::Bytes),
                MetricType::Gauge,
            )?;
            for (name, queued, _) in &self.backends {
                let labels = [("backend", name.as_str())];
                ConstGauge::new(gauge_i(*queued)).encode(m.encode_family(&labels)?)?;
            }
        }
        let mut m = e.encode_descriptor(
            "backend_dropped_events",
            "Console output events dropped for a backend over its --backend-queue budget.",
            None,
            MetricType::Counter,
        )?;
        for (name, _, dropped) in &self.backends {
            let labels = [("backend", name.as_str())];
            ConstCounter::new(*dropped).encode(m.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// The Prometheus text exposition of `hub`'s counters, read now.
pub fn render(hub: &Hub) -> String {
    let mut registry = Registry::with_prefix("vspc");
    registry.register_collector(Box::new(Snapshot::take(hub)));
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry) {
        tracing::error!("cannot encode metrics: {e}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_per_bucket_with_inf_last() {
        let h = Histogram::new(&[0.1, 1.0]);
        h.observe(Duration::from_millis(50));
        h.observe(Duration::from_millis(500));
        h.observe(Duration::from_secs(5));
        let s = h.snapshot();
        assert_eq!(s.count, 3);
        assert_eq!(s.buckets, vec![(0.1, 1), (1.0, 1), (f64::INFINITY, 1)]);
        assert!((s.sum - 5.55).abs() < 1e-9, "{}", s.sum);
    }
}
