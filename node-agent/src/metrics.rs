//! Prometheus metrics of the agent. Labels are bounded: direction, table,
//! verdict, and policy (bounded by the config), never pods or addresses.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct DirectionLabels {
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct TableLabels {
    pub table: &'static str,
}

/// Which tables a drain swapped out: `all`, or `rules` (a policy window
/// ended, no observation's window did).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct DrainLabels {
    pub tables: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct PolicyLabels {
    pub namespace: String,
    pub policy: String,
    pub verdict: &'static str,
}

/// A kernel drop reason (`enum skb_drop_reason` name: bounded by the kernel).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ReasonLabels {
    pub reason: String,
}

/// What became of a DNS message (a fixed set, see `dns_messages`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct OutcomeLabels {
    pub outcome: String,
}

/// A bounded piece of the agent's own state (see `aggregate`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct StateLabels {
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ResultLabels {
    pub result: &'static str,
}

pub struct Metrics {
    pub(crate) registry: Registry,
    pub(crate) bytes: Family<DirectionLabels, Counter>,
    pub(crate) packets: Family<DirectionLabels, Counter>,
    pub(crate) flows: Gauge,
    pub(crate) rtt: Histogram,
    pub(crate) policy_packets: Family<PolicyLabels, Counter>,
    pub(crate) policy_connections: Family<PolicyLabels, Counter>,
    pub(crate) table_entries: Family<TableLabels, Gauge>,
    pub(crate) table_capacity: Family<TableLabels, Gauge>,
    pub(crate) table_full: Family<TableLabels, Counter>,
    pub(crate) kernel_drops: Family<ReasonLabels, Counter>,
    pub(crate) drops_without_flow: Counter,
    /// Suspect packets of attached pods, by reason.
    pub(crate) suspect_packets: Family<ReasonLabels, Counter>,
    /// DNS messages of traced pods, by what became of them.
    pub(crate) dns_messages: Family<OutcomeLabels, Counter>,
    /// Names remembered (pod, address) and queries awaiting an answer.
    pub(crate) dns_names: Gauge,
    pub(crate) dns_pending: Gauge,
    pub(crate) service_translated: Counter,
    pub(crate) drain_seconds: Family<DrainLabels, Histogram, fn() -> Histogram>,
    /// Entries a full bound of the aggregator's state could not keep.
    pub(crate) state_overflows: Family<StateLabels, Counter>,
    pub(crate) applies: Family<ResultLabels, Counter>,
    pub(crate) attached_interfaces: Gauge,
    /// Traced pods or pods with rules whose programs are not attached.
    pub(crate) unattached_endpoints: Gauge,
    pub(crate) windows_reported: Counter,
    pub(crate) windows_dropped: Counter,
    /// Report requests, by result (ok, unreachable, refused).
    pub(crate) reports: Family<ResultLabels, Counter>,
    /// Windows waiting to be sent or committed.
    pub(crate) report_buffer: Gauge,
    /// Spool commits that failed (the agent then goes on without it).
    pub(crate) spool_failures: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Buckets of the RTT histogram, in microseconds (50 µs to 1 s).
const RTT_BUCKETS_US: [f64; 14] = [
    50.0, 100.0, 250.0, 500.0, 1e3, 2.5e3, 5e3, 1e4, 2.5e4, 5e4, 1e5, 2.5e5, 5e5, 1e6,
];

/// Buckets of the drain-duration histogram, in seconds.
const DRAIN_BUCKETS_S: [f64; 9] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];

fn drain_histogram() -> Histogram {
    Histogram::new(DRAIN_BUCKETS_S)
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("flowlens_agent");
        let m = Metrics {
            bytes: Family::default(),
            packets: Family::default(),
            flows: Gauge::default(),
            rtt: Histogram::new(RTT_BUCKETS_US),
            policy_packets: Family::default(),
            policy_connections: Family::default(),
            table_entries: Family::default(),
            table_capacity: Family::default(),
            table_full: Family::default(),
            kernel_drops: Family::default(),
            drops_without_flow: Counter::default(),
            service_translated: Counter::default(),
            suspect_packets: Family::default(),
            dns_messages: Family::default(),
            dns_names: Gauge::default(),
            dns_pending: Gauge::default(),
            drain_seconds: Family::new_with_constructor(drain_histogram),
            state_overflows: Family::default(),
            applies: Family::default(),
            attached_interfaces: Gauge::default(),
            unattached_endpoints: Gauge::default(),
            windows_reported: Counter::default(),
            windows_dropped: Counter::default(),
            reports: Family::default(),
            report_buffer: Gauge::default(),
            spool_failures: Counter::default(),
            registry: Registry::default(),
        };
        // In this order: the exposition lists metrics as registered.
        m.register_traffic(&mut registry);
        m.register_policies(&mut registry);
        m.register_tables(&mut registry);
        m.register_kernel_drops(&mut registry);
        m.register_datapath(&mut registry);
        m.register_reporting(&mut registry);
        Metrics { registry, ..m }
    }

    /// Bytes, packets, flows and RTT of traced pods.
    fn register_traffic(&self, registry: &mut Registry) {
        registry.register(
            "bytes",
            "IP-layer bytes seen at traced pod interfaces",
            self.bytes.clone(),
        );
        registry.register(
            "packets",
            "Packets seen at traced pod interfaces",
            self.packets.clone(),
        );
        registry.register(
            "flows",
            "Flow-table entries in the last drain",
            self.flows.clone(),
        );
        registry.register(
            "rtt_microseconds",
            "TCP smoothed RTT samples of traced pods",
            self.rtt.clone(),
        );
    }

    /// What policies matched.
    fn register_policies(&self, registry: &mut Registry) {
        registry.register(
            "policy_packets",
            "Packets matched by policies",
            self.policy_packets.clone(),
        );
        registry.register(
            "policy_connections",
            "Connection attempts matched by policies",
            self.policy_connections.clone(),
        );
    }

    /// Fill of the kernel tables.
    fn register_tables(&self, registry: &mut Registry) {
        registry.register(
            "table_entries",
            "Entries of a kernel table at the last drain",
            self.table_entries.clone(),
        );
        registry.register(
            "table_capacity",
            "Capacity of a kernel table",
            self.table_capacity.clone(),
        );
        registry.register(
            "table_full",
            "Updates a full kernel table could not store",
            self.table_full.clone(),
        );
    }

    /// Packets of traced pods the kernel dropped.
    fn register_kernel_drops(&self, registry: &mut Registry) {
        registry.register(
            "kernel_drops",
            "Packets of traced pods the kernel dropped, by drop reason",
            self.kernel_drops.clone(),
        );
        registry.register(
            "kernel_drops_without_flow",
            "Kernel drops of traced pods whose flow had no entry (not in any window)",
            self.drops_without_flow.clone(),
        );
        registry.register(
            "suspect_packets",
            "Packets of attached pods whose rules cannot be evaluated (orphan_fragment, truncated, ipv6_extension_headers) or whose source the pod does not own (spoofed_source), by reason; dropped at pods with rules, never counted as another pod's traffic",
            self.suspect_packets.clone(),
        );
        registry.register(
            "dns_messages",
            "DNS messages of traced pods by outcome: copied (by the kernel), dropped_in_kernel (over the per-CPU budget or the ring buffer full), unreadable (malformed, cut TCP), unmatched_answer (no waiting query: forged, late or repeated), pending_full, names_full",
            self.dns_messages.clone(),
        );
        registry.register(
            "dns_names",
            "(pod, address) pairs whose DNS name the agent remembers",
            self.dns_names.clone(),
        );
        registry.register(
            "dns_pending_queries",
            "DNS queries of traced pods awaiting their answer",
            self.dns_pending.clone(),
        );
        registry.register(
            "service_connections_translated",
            "Connections of local pods to a Service address sent to a backend at connect()",
            self.service_translated.clone(),
        );
    }

    /// Draining, configuring and attaching the datapath.
    fn register_datapath(&self, registry: &mut Registry) {
        registry.register(
            "drain_duration_seconds",
            "Time to swap and drain the kernel tables, by the tables drained (all, or only the rule counters at a policy window's end)",
            self.drain_seconds.clone(),
        );
        registry.register(
            "state_overflows",
            "Entries the agent's bounded per-window state could not keep, by state (roles: a connection's role decided again later; window_connections: a connection not counted as a flow; folded_series: a folded series not counted in foldedSeries); bytes and packets are never lost",
            self.state_overflows.clone(),
        );
        registry.register(
            "config_applies",
            "Configurations applied to the datapath",
            self.applies.clone(),
        );
        registry.register(
            "attached_interfaces",
            "Pod interfaces whose TC programs the kernel shows attached",
            self.attached_interfaces.clone(),
        );
        registry.register(
            "unattached_endpoints",
            "Traced pods or pods with rules whose programs are not attached (interface not found, or not shown by the kernel)",
            self.unattached_endpoints.clone(),
        );
    }

    /// Windows reported to the operator.
    fn register_reporting(&self, registry: &mut Registry) {
        registry.register(
            "windows_reported",
            "Observation windows acknowledged by the operator",
            self.windows_reported.clone(),
        );
        registry.register(
            "windows_dropped",
            "Observation windows dropped because the report buffer was full",
            self.windows_dropped.clone(),
        );
        registry.register(
            "reports",
            "Report requests to the operator, by result",
            self.reports.clone(),
        );
        registry.register(
            "report_buffer_windows",
            "Completed windows held until the operator commits them",
            self.report_buffer.clone(),
        );
        registry.register(
            "spool_failures",
            "Spool writes that failed (the agent then reports without one: counts drained but not committed are lost if it dies)",
            self.spool_failures.clone(),
        );
    }

    /// The text exposition format.
    pub(crate) fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }
}
