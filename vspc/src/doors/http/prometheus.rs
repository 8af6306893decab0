//! The Prometheus text exposition of the daemon's counters (`GET
//! /metrics`): [`render`] reads [`Metrics`](crate::metrics::Metrics) and the
//! hub's totals at scrape time into a snapshot and writes it with
//! prometheus-client's text encoder (version 0.0.4): names prefixed
//! `vspc_`, base units (bytes, seconds), `_total` on counters, and no per-VM
//! labels, so the number of series does not grow with the number of VMs.

use crate::hub::Hub;
use crate::metrics::{Counts, HistogramSnapshot};
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

/// The `Content-Type` of [`render`]'s output.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

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
    /// The hub's counters.
    counts: Counts,
    /// (backend, queued bytes, dropped events).
    backends: Vec<(String, u64, u64)>,
}

impl Snapshot {
    fn take(hub: &Hub) -> Snapshot {
        let t = hub.totals();
        let mut counts = hub.metrics().read();
        // The console ports' accepting thread counts its own errors.
        if let Some(c) = counts
            .accept_errors
            .iter_mut()
            .find(|(l, _)| *l == "console")
        {
            c.1 += hub.console_accept_errors();
        }
        // Only these two speak TLS.
        counts
            .tls_failures
            .retain(|(l, _)| matches!(*l, "proxy" | "http"));
        Snapshot {
            vms: t.vms,
            vms_connected: t.vms_connected,
            consoles: t.consoles,
            bytes_out: t.bytes_out,
            bytes_in: t.bytes_in,
            skipped: crate::outbox::skipped_total(),
            counts,
            backends: hub.backend().stats(),
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

/// One family's value, as [`Snapshot::families`] lists it.
enum Family<'a> {
    Gauge(u64),
    Counter(u64),
    /// A counter in bytes (`_bytes_total`).
    Bytes(u64),
    /// A counter per value of one label.
    Labelled(&'static str, &'a [(&'static str, u64)]),
    Histogram(&'a HistogramSnapshot),
}

impl Snapshot {
    /// Every family but the per-backend ones: (name, help, value).
    fn families(&self) -> Vec<(&'static str, &'static str, Family<'_>)> {
        use Family::*;
        let c = &self.counts;
        vec![
            (
                "vms",
                "VM serial ports known (each holds a console port).",
                Gauge(self.vms),
            ),
            (
                "vms_connected",
                "VM serial ports with an ESXi connection now.",
                Gauge(self.vms_connected),
            ),
            (
                "consoles",
                "Consoles attached now, over all VMs.",
                Gauge(self.consoles),
            ),
            (
                "connections_accepted",
                "Connections accepted, by listener.",
                Labelled("listener", &c.accepted),
            ),
            (
                "proxy_refused",
                "Proxy-port connections closed at accept: their address is not in --proxy-allow.",
                Counter(c.proxy_refused),
            ),
            (
                "http_connections_refused",
                "HTTP connections closed at accept: --http-max-connections were open.",
                Counter(c.http_refused),
            ),
            (
                "accept_errors",
                "Failed accept() calls, by listener.",
                Labelled("listener", &c.accept_errors),
            ),
            (
                "tls_handshake_failures",
                "TLS handshakes that failed or timed out, by listener.",
                Labelled("listener", &c.tls_failures),
            ),
            (
                "ssh_closed",
                "SSH connections and sessions closed by vspc, by reason.",
                Labelled("reason", &c.ssh_closed),
            ),
            (
                "vm_to_console",
                "Serial output read from VMs (counted once, however many consoles see it).",
                Bytes(self.bytes_out),
            ),
            (
                "console_to_vm",
                "Console input accepted for VMs.",
                Bytes(self.bytes_in),
            ),
            (
                "console_skipped",
                "Output skipped for consoles that fell a whole queue behind.",
                Bytes(self.skipped),
            ),
            (
                "console_disconnects",
                "Consoles gone, by reason.",
                Labelled("reason", &c.disconnects),
            ),
            (
                "vmotions",
                "vMotions, by outcome.",
                Labelled("outcome", &c.vmotions),
            ),
            (
                "vmotion_goahead",
                "Time from VMOTION-BEGIN to the GOAHEAD answer.",
                Histogram(&c.goahead),
            ),
            (
                "vmotion_complete",
                "Time from VMOTION-BEGIN to COMPLETE.",
                Histogram(&c.complete),
            ),
        ]
    }
}

impl prometheus_client::collector::Collector for Snapshot {
    fn encode(&self, mut e: DescriptorEncoder) -> Fmt {
        let e = &mut e;
        let info = [("version", env!("CARGO_PKG_VERSION"))];
        let mut m = e.encode_descriptor(
            "build_info",
            "The running vspc's version.",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(1i64).encode(m.encode_family(&info)?)?;
        for (name, help, family) in self.families() {
            match family {
                Family::Gauge(v) => gauge(e, name, help, None, gauge_i(v))?,
                Family::Counter(v) => counter(e, name, help, None, v)?,
                Family::Bytes(v) => counter(e, name, help, Some(&Unit::Bytes), v)?,
                Family::Labelled(label, values) => labelled_counters(e, name, help, label, values)?,
                Family::Histogram(h) => histogram(e, name, help, h)?,
            }
        }
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
