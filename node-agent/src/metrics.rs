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
    pub(crate) drain_seconds: Histogram,
    pub(crate) applies: Family<ResultLabels, Counter>,
    pub(crate) attached_interfaces: Gauge,
    pub(crate) windows_reported: Counter,
    pub(crate) windows_dropped: Counter,
    /// Report requests, by result (ok, unreachable, refused).
    pub(crate) reports: Family<ResultLabels, Counter>,
    /// Windows waiting to be sent or committed.
    pub(crate) report_buffer: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("flowlens_agent");
        let m = Metrics {
            bytes: Family::default(),
            packets: Family::default(),
            flows: Gauge::default(),
            rtt: Histogram::new([
                50.0, 100.0, 250.0, 500.0, 1e3, 2.5e3, 5e3, 1e4, 2.5e4, 5e4, 1e5, 2.5e5, 5e5, 1e6,
            ]),
            policy_packets: Family::default(),
            policy_connections: Family::default(),
            table_entries: Family::default(),
            table_capacity: Family::default(),
            table_full: Family::default(),
            kernel_drops: Family::default(),
            drops_without_flow: Counter::default(),
            drain_seconds: Histogram::new([0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0]),
            applies: Family::default(),
            attached_interfaces: Gauge::default(),
            windows_reported: Counter::default(),
            windows_dropped: Counter::default(),
            reports: Family::default(),
            report_buffer: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "bytes",
            "IP-layer bytes seen at traced pod interfaces",
            m.bytes.clone(),
        );
        registry.register(
            "packets",
            "Packets seen at traced pod interfaces",
            m.packets.clone(),
        );
        registry.register(
            "flows",
            "Flow-table entries in the last drain",
            m.flows.clone(),
        );
        registry.register(
            "rtt_microseconds",
            "TCP smoothed RTT samples of traced pods",
            m.rtt.clone(),
        );
        registry.register(
            "policy_packets",
            "Packets matched by policies",
            m.policy_packets.clone(),
        );
        registry.register(
            "policy_connections",
            "Connection attempts matched by policies",
            m.policy_connections.clone(),
        );
        registry.register(
            "table_entries",
            "Entries of a kernel table at the last drain",
            m.table_entries.clone(),
        );
        registry.register(
            "table_capacity",
            "Capacity of a kernel table",
            m.table_capacity.clone(),
        );
        registry.register(
            "table_full",
            "Updates a full kernel table could not store",
            m.table_full.clone(),
        );
        registry.register(
            "kernel_drops",
            "Packets of traced pods the kernel dropped, by drop reason",
            m.kernel_drops.clone(),
        );
        registry.register(
            "kernel_drops_without_flow",
            "Kernel drops of traced pods whose flow had no entry (not in any window)",
            m.drops_without_flow.clone(),
        );
        registry.register(
            "drain_duration_seconds",
            "Time to swap and drain the kernel tables",
            m.drain_seconds.clone(),
        );
        registry.register(
            "config_applies",
            "Configurations applied to the datapath",
            m.applies.clone(),
        );
        registry.register(
            "attached_interfaces",
            "Pod interfaces carrying the TC programs",
            m.attached_interfaces.clone(),
        );
        registry.register(
            "windows_reported",
            "Observation windows acknowledged by the operator",
            m.windows_reported.clone(),
        );
        registry.register(
            "windows_dropped",
            "Observation windows dropped because the report buffer was full",
            m.windows_dropped.clone(),
        );
        registry.register(
            "reports",
            "Report requests to the operator, by result",
            m.reports.clone(),
        );
        registry.register(
            "report_buffer_windows",
            "Completed windows held until the operator commits them",
            m.report_buffer.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The text exposition format.
    pub(crate) fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }
}
