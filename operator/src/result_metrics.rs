//! What final windows add to Prometheus: each observation's totals and its
//! flows (labelled by the observation's `groupBy`), and each policy's
//! blocked and audited counts. The operator is where windows are merged
//! across nodes, so these counters follow the same counting rule as status
//! (nothing counted twice) and their sums equal status' figures.
//!
//! Cardinality is bounded by each observation's `maxSeries`: at most that
//! many flow series are exported, the rest are added to one `other` series
//! (`source_kind="other"`), and `flowlens_observation_series_folded_total`
//! counts what was folded. A flow in no window for [`IDLE_SECS`] is dropped
//! and its slot freed; if it comes back, its counters start again from 0,
//! which `rate()` and `increase()` read as a counter reset.
//!
//! RTT histograms use powers of two from 32 µs to 4.19 s as bounds. Those
//! are edges of the kernel's buckets, so every kernel bucket lies within
//! one Prometheus bucket, and bucket counts are exact. The one exception is
//! a sample equal to a bound, which is counted in the next bucket up. The
//! `_sum` adds each kernel bucket's midpoint, so it is within 1.6% of the
//! true sum.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use flowlens_api::{
    histogram::Histogram,
    network_observation::{FlowEndpoint, LatencyPercentiles},
    report::protocol_name,
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};

use crate::collect::{
    merge::{MergedFlow, WindowResult},
    policy_book::{PolicyDelta, PolicyKey},
};

/// A flow series in no window for this long is dropped.
pub const IDLE_SECS: i64 = 300;

/// RTT bucket bounds: 32 µs << k.
const RTT_BOUNDS: usize = 18;

fn rtt_bound_micros(k: usize) -> u64 {
    32 << k
}

/// Labels of a flow series, without `observation`.
pub(crate) type Labels = Vec<(String, String)>;

/// RTT samples by Prometheus bucket (the last is `+Inf`), and their sum.
#[derive(Clone, Debug, PartialEq)]
struct RttHistogram {
    buckets: [u64; RTT_BOUNDS + 1],
    sum_seconds: f64,
}

impl Default for RttHistogram {
    fn default() -> Self {
        RttHistogram {
            buckets: [0; RTT_BOUNDS + 1],
            sum_seconds: 0.0,
        }
    }
}

impl RttHistogram {
    fn add(&mut self, h: &Histogram) {
        for (lower, upper, n) in h.buckets() {
            let slot = (0..RTT_BOUNDS)
                .find(|&k| upper <= rtt_bound_micros(k))
                .unwrap_or(RTT_BOUNDS);
            self.buckets[slot] = self.buckets[slot].saturating_add(n);
            self.sum_seconds += n as f64 * (lower + upper) as f64 / 2.0 / 1e6;
        }
    }

    fn count(&self) -> u64 {
        self.buckets.iter().fold(0u64, |a, n| a.saturating_add(*n))
    }

    fn is_empty(&self) -> bool {
        self.count() == 0
    }

    /// `(upper bound in seconds, samples)`, as prometheus-client takes them
    /// (not cumulative).
    fn encoded(&self) -> Vec<(f64, u64)> {
        (0..=RTT_BOUNDS)
            .map(|k| {
                let bound = if k == RTT_BOUNDS {
                    f64::INFINITY
                } else {
                    rtt_bound_micros(k) as f64 / 1e6
                };
                (bound, self.buckets[k])
            })
            .collect()
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct FlowCounters {
    pub bytes: u64,
    pub packets: u64,
    pub connections: u64,
    rtt: RttHistogram,
    /// End (unix seconds) of the last window the flow was in.
    last_seen: i64,
}

impl FlowCounters {
    fn add(&mut self, f: &MergedFlow, end: i64) {
        self.bytes = self.bytes.saturating_add(f.traffic.bytes);
        self.packets = self.packets.saturating_add(f.traffic.packets);
        self.connections = self.connections.saturating_add(f.flows);
        self.rtt.add(&f.rtt);
        self.last_seen = self.last_seen.max(end);
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Totals {
    pub windows: u64,
    pub bytes: u64,
    pub payload_bytes: u64,
    pub packets: u64,
    pub connections: u64,
    pub cross_zone_bytes: u64,
    pub retransmits: u64,
    pub drops: u64,
    /// Series folded into `other`, summed over windows.
    pub folded: u64,
    rtt: RttHistogram,
    /// RTT percentiles of the last window with samples.
    pub last_rtt: Option<LatencyPercentiles>,
    pub dns_queries: u64,
    pub dns_unanswered: u64,
    /// DNS answers by response code.
    pub dns_responses: BTreeMap<String, u64>,
    /// Query-to-answer time of DNS queries (the RTT buckets).
    dns_latency: RttHistogram,
    /// The names queried most in the last window with DNS (at most 10).
    pub dns_top_names: Vec<flowlens_api::dns::NameCount>,
}

#[derive(Debug)]
struct ObservationSeries {
    name: String,
    max_series: usize,
    totals: Totals,
    flows: BTreeMap<Labels, FlowCounters>,
}

/// The labels of the `other` series.
fn other_labels() -> Labels {
    vec![
        ("source_kind".into(), "other".into()),
        ("destination_kind".into(), "other".into()),
    ]
}

/// A label name from a Kubernetes label key: `app.kubernetes.io/name` ->
/// `app_kubernetes_io_name` (what kube-state-metrics does).
fn sanitize(key: &str) -> String {
    key.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

fn endpoint_labels(side: &str, e: &FlowEndpoint, out: &mut Labels) {
    let kind = if e.other {
        "other"
    } else if e.external {
        "external"
    } else if e.host_network {
        "host"
    } else {
        "pod"
    };
    out.push((format!("{side}_kind"), kind.into()));
    for (name, value) in [
        ("namespace", &e.namespace),
        ("workload", &e.workload),
        ("pod", &e.pod),
        ("node", &e.node),
        ("zone", &e.zone),
        ("address", &e.address),
        ("name", &e.name),
    ] {
        if let Some(v) = value {
            out.push((format!("{side}_{name}"), v.clone()));
        }
    }
    for (k, v) in &e.labels {
        let name = format!("{side}_label_{}", sanitize(k));
        // Two keys that sanitize alike (`a.b`, `a_b`): the first is kept,
        // as a repeated label name would make the whole scrape invalid.
        if !out.iter().any(|(n, _)| *n == name) {
            out.push((name, v.clone()));
        }
    }
}

/// The labels of a flow (without `observation`).
fn flow_labels(f: &MergedFlow) -> Labels {
    if f.source.other || f.destination.other {
        return other_labels();
    }
    let mut l = Vec::with_capacity(12);
    endpoint_labels("source", &f.source, &mut l);
    endpoint_labels("destination", &f.destination, &mut l);
    l.push(("port".into(), f.port.to_string()));
    l.push(("protocol".into(), protocol_name(f.protocol)));
    if let Some(s) = &f.service {
        l.push(("service".into(), s.clone()));
    }
    l
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct PolicyCounters {
    pub blocked_packets: u64,
    pub blocked_connections: u64,
    pub audited_packets: u64,
    pub audited_connections: u64,
}

#[derive(Debug, Default)]
struct Inner {
    /// By observation UID.
    observations: BTreeMap<String, ObservationSeries>,
    policies: BTreeMap<PolicyKey, PolicyCounters>,
}

/// The series of every observation and policy, encoded on each scrape.
#[derive(Clone, Debug, Default)]
pub struct ResultMetrics {
    inner: Arc<Mutex<Inner>>,
}

impl ResultMetrics {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("result metrics lock")
    }

    /// Adds a final window of the observation `uid` (named `name`) and its
    /// flows (as [`crate::collect::merge::merge_window`] returns them).
    pub(crate) fn record_window(
        &self,
        uid: &str,
        name: &str,
        max_series: usize,
        window: &WindowResult,
        flows: &[MergedFlow],
    ) {
        let mut inner = self.lock();
        let o = inner
            .observations
            .entry(uid.to_owned())
            .or_insert_with(|| ObservationSeries {
                name: name.to_owned(),
                max_series,
                totals: Totals::default(),
                flows: BTreeMap::new(),
            });
        o.max_series = max_series;
        let t = &mut o.totals;
        t.windows += 1;
        t.bytes = t.bytes.saturating_add(window.bytes);
        t.payload_bytes = t.payload_bytes.saturating_add(window.payload_bytes);
        t.packets = t.packets.saturating_add(window.packets);
        t.connections = t.connections.saturating_add(window.flows);
        t.cross_zone_bytes = t.cross_zone_bytes.saturating_add(window.cross_zone_bytes);
        t.retransmits = t.retransmits.saturating_add(window.retransmits);
        t.drops = t.drops.saturating_add(window.drops);
        t.folded = t.folded.saturating_add(window.folded_series);
        if window.latency.is_some() {
            t.last_rtt = window.latency.clone();
        }
        if let Some(d) = &window.dns {
            t.dns_queries = t.dns_queries.saturating_add(d.queries);
            t.dns_unanswered = t.dns_unanswered.saturating_add(d.unanswered);
            for (code, n) in &d.responses {
                let c = t.dns_responses.entry(code.clone()).or_default();
                *c = c.saturating_add(*n);
            }
            t.dns_latency.add(&d.latency);
            t.dns_top_names = d.top_names.clone();
        }

        let end = window.end;
        let idle_before = end - IDLE_SECS.max(5 * (window.end - window.start));
        o.flows.retain(|_, c| c.last_seen >= idle_before);
        let other = other_labels();
        for f in flows {
            t.rtt.add(&f.rtt);
            let mut labels = flow_labels(f);
            let kept = o.flows.len() - usize::from(o.flows.contains_key(&other));
            if labels != other && !o.flows.contains_key(&labels) && kept >= max_series {
                t.folded = t.folded.saturating_add(1);
                labels = other.clone();
            }
            o.flows.entry(labels).or_default().add(f, end);
        }
    }

    /// Adds final policy windows.
    pub(crate) fn record_policies(&self, deltas: &[(PolicyKey, PolicyDelta)]) {
        let mut inner = self.lock();
        for (key, d) in deltas {
            let c = inner.policies.entry(key.clone()).or_default();
            c.blocked_packets = c.blocked_packets.saturating_add(d.blocked.packets);
            c.blocked_connections = c.blocked_connections.saturating_add(d.blocked.connections);
            c.audited_packets = c.audited_packets.saturating_add(d.audited.packets);
            c.audited_connections = c.audited_connections.saturating_add(d.audited.connections);
        }
    }

    /// Drops the series of observations and policies that no longer exist.
    pub(crate) fn retain(
        &self,
        observation_exists: impl Fn(&str) -> bool,
        policy_exists: impl Fn(&PolicyKey) -> bool,
    ) {
        let mut inner = self.lock();
        inner.observations.retain(|uid, _| observation_exists(uid));
        inner.policies.retain(|k, _| policy_exists(k));
    }

    /// Calls `f` with each observation's name and totals.
    pub(crate) fn each_observation(&self, mut f: impl FnMut(&str, &Totals)) {
        for o in self.lock().observations.values() {
            f(&o.name, &o.totals);
        }
    }

    /// Calls `f` with each flow series: its observation, labels, counters.
    pub(crate) fn each_flow(&self, mut f: impl FnMut(&str, &Labels, &FlowCounters)) {
        for o in self.lock().observations.values() {
            for (labels, c) in &o.flows {
                f(&o.name, labels, c);
            }
        }
    }

    /// Calls `f` with each policy's counters.
    pub(crate) fn each_policy(&self, mut f: impl FnMut(&PolicyKey, &PolicyCounters)) {
        for (k, c) in &self.lock().policies {
            f(k, c);
        }
    }

    /// Flow series held for the observation `uid` (the `other` one included).
    pub fn flow_series(&self, uid: &str) -> usize {
        self.lock()
            .observations
            .get(uid)
            .map_or(0, |o| o.flows.len())
    }
}

/// A counter of the results, as Prometheus and OTLP name it.
pub(crate) struct CounterDef<T> {
    /// Without `_total`, which the encoder appends.
    pub prometheus: &'static str,
    pub otlp: &'static str,
    /// UCUM, as OTLP sends it.
    pub unit: &'static str,
    pub help: &'static str,
    pub value: fn(&T) -> u64,
}

/// Each observation's counters (label `observation`).
pub(crate) const OBSERVATION_COUNTERS: [CounterDef<Totals>; 11] = [
    CounterDef {
        prometheus: "flowlens_observation_dns_queries",
        otlp: "flowlens.observation.dns.queries",
        unit: "{query}",
        help: "DNS queries the observation's pods sent (to port 53, UDP or TCP)",
        value: |t| t.dns_queries,
    },
    CounterDef {
        prometheus: "flowlens_observation_dns_unanswered",
        otlp: "flowlens.observation.dns.unanswered",
        unit: "{query}",
        help: "DNS queries of the observation's pods without an answer within 10 s",
        value: |t| t.dns_unanswered,
    },
    CounterDef {
        prometheus: "flowlens_observation_windows",
        otlp: "flowlens.observation.windows",
        unit: "{window}",
        help: "Windows merged into the observation's series",
        value: |t| t.windows,
    },
    CounterDef {
        prometheus: "flowlens_observation_bytes",
        otlp: "flowlens.observation.bytes",
        unit: "By",
        help: "IP-layer bytes of the observation (both directions, each packet counted once across nodes)",
        value: |t| t.bytes,
    },
    CounterDef {
        prometheus: "flowlens_observation_payload_bytes",
        otlp: "flowlens.observation.payload_bytes",
        unit: "By",
        help: "Transport payload bytes of the observation",
        value: |t| t.payload_bytes,
    },
    CounterDef {
        prometheus: "flowlens_observation_packets",
        otlp: "flowlens.observation.packets",
        unit: "{packet}",
        help: "Packets of the observation",
        value: |t| t.packets,
    },
    CounterDef {
        prometheus: "flowlens_observation_connections",
        otlp: "flowlens.observation.connections",
        unit: "{connection}",
        help: "Connections (5-tuples) seen, summed over windows",
        value: |t| t.connections,
    },
    CounterDef {
        prometheus: "flowlens_observation_cross_zone_bytes",
        otlp: "flowlens.observation.cross_zone_bytes",
        unit: "By",
        help: "Bytes between pods or nodes of different zones",
        value: |t| t.cross_zone_bytes,
    },
    CounterDef {
        prometheus: "flowlens_observation_retransmits",
        otlp: "flowlens.observation.retransmits",
        unit: "{segment}",
        help: "TCP segments retransmitted by traced pods",
        value: |t| t.retransmits,
    },
    CounterDef {
        prometheus: "flowlens_observation_drops",
        otlp: "flowlens.observation.drops",
        unit: "{packet}",
        help: "Packets of traced pods the kernel dropped",
        value: |t| t.drops,
    },
    CounterDef {
        prometheus: "flowlens_observation_series_folded",
        otlp: "flowlens.observation.series_folded",
        unit: "{series}",
        help: "Flow series folded into the other series because maxSeries was reached (per window, summed)",
        value: |t| t.folded,
    },
];

/// Each flow's counters (labels `observation` and the flow's).
pub(crate) const FLOW_COUNTERS: [CounterDef<FlowCounters>; 3] = [
    CounterDef {
        prometheus: "flowlens_flow_bytes",
        otlp: "flowlens.flow.bytes",
        unit: "By",
        help: "IP-layer bytes of a flow (client to server and back), by the observation's groupBy",
        value: |f| f.bytes,
    },
    CounterDef {
        prometheus: "flowlens_flow_packets",
        otlp: "flowlens.flow.packets",
        unit: "{packet}",
        help: "Packets of a flow, by the observation's groupBy",
        value: |f| f.packets,
    },
    CounterDef {
        prometheus: "flowlens_flow_connections",
        otlp: "flowlens.flow.connections",
        unit: "{connection}",
        help: "Connections of a flow, summed over windows",
        value: |f| f.connections,
    },
];

/// Each policy's counters (labels `namespace`, `policy`).
pub(crate) const POLICY_COUNTERS: [CounterDef<PolicyCounters>; 4] = [
    CounterDef {
        prometheus: "flowlens_policy_blocked_connections",
        otlp: "flowlens.policy.blocked.connections",
        unit: "{connection}",
        help: "Connection attempts dropped by a FlowPolicy's Enforce rules",
        value: |p| p.blocked_connections,
    },
    CounterDef {
        prometheus: "flowlens_policy_blocked_packets",
        otlp: "flowlens.policy.blocked.packets",
        unit: "{packet}",
        help: "Packets dropped by a FlowPolicy's Enforce rules",
        value: |p| p.blocked_packets,
    },
    CounterDef {
        prometheus: "flowlens_policy_audited_connections",
        otlp: "flowlens.policy.audited.connections",
        unit: "{connection}",
        help: "Connection attempts matched by a FlowPolicy's Audit rules",
        value: |p| p.audited_connections,
    },
    CounterDef {
        prometheus: "flowlens_policy_audited_packets",
        otlp: "flowlens.policy.audited.packets",
        unit: "{packet}",
        help: "Packets matched by a FlowPolicy's Audit rules",
        value: |p| p.audited_packets,
    },
];

/// Writes one counter family: `name` (`_total` is appended), one series per
/// item.
fn counters<'a, T: 'a>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    items: impl Iterator<Item = (&'a str, &'a T)>,
    value: impl Fn(&T) -> u64,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (observation, t) in items {
        ConstCounter::new(value(t))
            .encode(family.encode_family(&[("observation", observation)])?)?;
    }
    Ok(())
}

impl Collector for ResultMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let inner = self.lock();
        let obs = || inner.observations.values().map(|o| (o.name.as_str(), o));
        for c in &OBSERVATION_COUNTERS {
            let v = c.value;
            counters(&mut encoder, c.prometheus, c.help, obs(), |o| v(&o.totals))?;
        }
        {
            let mut family = encoder.encode_descriptor(
                "flowlens_observation_flow_series",
                "Flow series exported for the observation (other included)",
                None,
                MetricType::Gauge,
            )?;
            for (name, o) in obs() {
                ConstGauge::new(o.flows.len() as i64)
                    .encode(family.encode_family(&[("observation", name)])?)?;
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "flowlens_observation_max_series",
                "The observation's series budget (spec.maxSeries)",
                None,
                MetricType::Gauge,
            )?;
            for (name, o) in obs() {
                ConstGauge::new(o.max_series as i64)
                    .encode(family.encode_family(&[("observation", name)])?)?;
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "flowlens_observation_rtt_seconds",
                "TCP smoothed RTT samples of the observation",
                None,
                MetricType::Histogram,
            )?;
            for (name, o) in obs() {
                let h = &o.totals.rtt;
                family
                    .encode_family(&[("observation", name)])?
                    .encode_histogram::<NoLabelSet>(h.sum_seconds, h.count(), &h.encoded(), None)?;
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "flowlens_observation_dns_responses",
                "DNS answers to the observation's pods, by response code (NOERROR, NXDOMAIN, SERVFAIL, ...)",
                None,
                MetricType::Counter,
            )?;
            for (name, o) in obs() {
                for (code, n) in &o.totals.dns_responses {
                    let set = [("observation", name), ("rcode", code.as_str())];
                    ConstCounter::new(*n).encode(family.encode_family(&set)?)?;
                }
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "flowlens_observation_dns_latency_seconds",
                "DNS query-to-answer time of the observation's pods",
                None,
                MetricType::Histogram,
            )?;
            for (name, o) in obs() {
                let h = &o.totals.dns_latency;
                if h.is_empty() {
                    continue;
                }
                family
                    .encode_family(&[("observation", name)])?
                    .encode_histogram::<NoLabelSet>(h.sum_seconds, h.count(), &h.encoded(), None)?;
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "flowlens_observation_dns_top_name_queries",
                "Queries of the names the observation's pods asked most, in the last window with DNS (at most 10 names)",
                None,
                MetricType::Gauge,
            )?;
            for (name, o) in obs() {
                for n in &o.totals.dns_top_names {
                    let set = [("observation", name), ("name", n.name.as_str())];
                    ConstGauge::new(n.queries.min(i64::MAX as u64) as i64)
                        .encode(family.encode_family(&set)?)?;
                }
            }
        }
        for c in &FLOW_COUNTERS {
            let value = c.value;
            let mut family =
                encoder.encode_descriptor(c.prometheus, c.help, None, MetricType::Counter)?;
            for (obs_name, o) in obs() {
                for (labels, f) in &o.flows {
                    let set = ([("observation", obs_name)], labels.as_slice());
                    ConstCounter::new(value(f)).encode(family.encode_family(&set)?)?;
                }
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "flowlens_flow_rtt_seconds",
                "TCP smoothed RTT samples of a flow, by the observation's groupBy",
                None,
                MetricType::Histogram,
            )?;
            for (obs_name, o) in obs() {
                for (labels, f) in o.flows.iter().filter(|(_, f)| !f.rtt.is_empty()) {
                    let set = ([("observation", obs_name)], labels.as_slice());
                    let h = &f.rtt;
                    family.encode_family(&set)?.encode_histogram::<NoLabelSet>(
                        h.sum_seconds,
                        h.count(),
                        &h.encoded(),
                        None,
                    )?;
                }
            }
        }
        for c in &POLICY_COUNTERS {
            let value = c.value;
            let mut family =
                encoder.encode_descriptor(c.prometheus, c.help, None, MetricType::Counter)?;
            for ((namespace, policy), c) in &inner.policies {
                let set = [
                    ("namespace", namespace.as_str()),
                    ("policy", policy.as_str()),
                ];
                ConstCounter::new(value(c)).encode(family.encode_family(&set)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
