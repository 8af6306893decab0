//! The daemon's counters.
//!
//! Counters are plain atomics owned by the hub ([`Metrics`]) or by the VM
//! entries (bytes each way), bumped with one relaxed add where things
//! happen; nothing is locked on the data path. [`Metrics::read`] reads them
//! all at once; the HTTP door writes them as Prometheus text
//! (`crate::doors::http::prometheus`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// An enum whose variants index a counter array, each with the label
/// value `/metrics` shows it under. One list per enum, so the variants,
/// their labels and the list of all of them cannot drift apart.
macro_rules! labelled {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $($(#[$vmeta:meta])* $variant:ident => $label:literal,)+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            /// Every variant, in index order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];
            /// How many variants there are (the counter arrays' length).
            pub const COUNT: usize = [$($label,)+].len();

            /// The label value.
            pub fn label(self) -> &'static str {
                match self {
                    $($name::$variant => $label,)+
                }
            }
        }
    };
}

labelled! {
    /// A front door's listening socket, as the `listener` label names it.
    pub enum Door {
        Proxy => "proxy",
        Admin => "admin",
        Console => "console",
        Http => "http",
        Ssh => "ssh",
    }
}

impl Door {
    /// What log lines call the door's port.
    pub fn port_name(self) -> &'static str {
        match self {
            Door::Proxy => "proxy port",
            Door::Admin => "admin port",
            Door::Console => "console port",
            Door::Http => "HTTP port",
            Door::Ssh => "SSH port",
        }
    }
}

labelled! {
    /// How a vMotion (or an attempt at one) ended, as the `outcome` label
    /// names it.
    pub enum Vmotion {
        /// COMPLETE moved the VM to the destination.
        Complete => "complete",
        /// ABORT left the VM with the source.
        Abort => "abort",
        /// `--vmotion-timeout` passed with the vMotion still pending.
        Timeout => "timeout",
        /// BEGIN was answered NOTNOW (another vMotion of the port pending).
        NotNow => "notnow",
        /// A PEER whose cookie matched no pending vMotion.
        RefusedPeer => "refused_peer",
    }
}

labelled! {
    /// Why a console went away, as the `reason` label names it.
    pub enum Disconnect {
        /// The client closed its connection (or it failed).
        Closed => "closed",
        /// Its socket took no output for `--console-stall-timeout`.
        Stall => "stall",
        /// Cleared through the admin port or the HTTP API.
        Cleared => "cleared",
    }
}

labelled! {
    /// Why the SSH front door closed a connection itself, as the `reason`
    /// label names it.
    pub enum SshClosed {
        /// Not authenticated within `--ssh-auth-timeout`.
        AuthTimeout => "auth_timeout",
        /// Closed at accept: `--ssh-max-unauthenticated` connections were
        /// already waiting to authenticate.
        Unauthenticated => "unauthenticated_limit",
        /// No data either way for `--ssh-idle-timeout`.
        Idle => "idle",
        /// Its key was removed or narrowed by a reload (a session closed).
        Revoked => "revoked",
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
    /// Connections accepted, by [`Door`].
    accepted: [AtomicU64; Door::COUNT],
    /// accept() failures (descriptors exhausted and the like), by
    /// [`Door`].
    accept_errors: [AtomicU64; Door::COUNT],
    /// TLS handshakes that failed or timed out, by [`Door`] (proxy or
    /// http).
    tls_failures: [AtomicU64; Door::COUNT],
    /// SSH connections and sessions the front door closed, by
    /// [`SshClosed`] reason.
    ssh_closed: [AtomicU64; SshClosed::COUNT],
    /// vMotions by [`Vmotion`] outcome.
    vmotions: [AtomicU64; Vmotion::COUNT],
    /// Time from VMOTION-BEGIN to the GOAHEAD answer.
    pub goahead: Histogram,
    /// Time from VMOTION-BEGIN to a successful COMPLETE.
    pub complete: Histogram,
    /// Consoles gone, by [`Disconnect`] reason.
    disconnects: [AtomicU64; Disconnect::COUNT],
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
    pub fn accepted(&self, l: Door) {
        self.accepted[l as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// accept() failed on `l`.
    pub fn accept_error(&self, l: Door) {
        self.accept_errors[l as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// A TLS handshake on `l` failed or timed out.
    pub fn tls_failure(&self, l: Door) {
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
    pub fn accepted_on(&self, l: Door) -> u64 {
        self.accepted[l as usize].load(Ordering::Relaxed)
    }
}

/// A histogram as read at scrape time.
#[derive(Debug, Clone)]
pub struct HistogramSnapshot {
    /// Observations in all.
    pub count: u64,
    /// Their sum, in seconds.
    pub sum: f64,
    /// (upper bound, observations in this bucket), +Inf last.
    pub buckets: Vec<(f64, u64)>,
}

/// Every counter of [`Metrics`], read at one moment, with its labels.
#[derive(Debug, Clone)]
pub struct Counts {
    /// (label, value) of each labelled counter family.
    pub accepted: Vec<(&'static str, u64)>,
    pub accept_errors: Vec<(&'static str, u64)>,
    pub tls_failures: Vec<(&'static str, u64)>,
    pub ssh_closed: Vec<(&'static str, u64)>,
    pub vmotions: Vec<(&'static str, u64)>,
    pub disconnects: Vec<(&'static str, u64)>,
    pub goahead: HistogramSnapshot,
    pub complete: HistogramSnapshot,
    /// Proxy connections refused by `--proxy-allow`.
    pub proxy_refused: u64,
    /// HTTP connections refused by `--http-max-connections`.
    pub http_refused: u64,
}

/// The counters of `a`, each with its variant's label.
fn labelled<const N: usize>(
    a: &[AtomicU64; N],
    labels: impl Iterator<Item = &'static str>,
) -> Vec<(&'static str, u64)> {
    labels
        .zip(a.iter())
        .map(|(l, v)| (l, v.load(Ordering::Relaxed)))
        .collect()
}

impl Metrics {
    /// Read every counter now.
    pub fn read(&self) -> Counts {
        Counts {
            accepted: labelled(&self.accepted, Door::ALL.iter().map(|l| l.label())),
            accept_errors: labelled(&self.accept_errors, Door::ALL.iter().map(|l| l.label())),
            tls_failures: labelled(&self.tls_failures, Door::ALL.iter().map(|l| l.label())),
            ssh_closed: labelled(&self.ssh_closed, SshClosed::ALL.iter().map(|r| r.label())),
            vmotions: labelled(&self.vmotions, Vmotion::ALL.iter().map(|o| o.label())),
            disconnects: labelled(&self.disconnects, Disconnect::ALL.iter().map(|r| r.label())),
            goahead: self.goahead.snapshot(),
            complete: self.complete.snapshot(),
            proxy_refused: self.proxy_refused.load(Ordering::Relaxed),
            http_refused: self.http_refused.load(Ordering::Relaxed),
        }
    }
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
