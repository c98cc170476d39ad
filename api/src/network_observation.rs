//! `NetworkObservation`: which pods to trace, how to aggregate, and the results.

// kube's `printcolumn(...)` attributes repeat keys by design.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::{
    group_by::GroupBy, label_selector::LabelSelector, node_agent_config::WorkloadRef, patterns,
};

/// What to trace and how to aggregate it. Cluster-scoped: observing several
/// namespaces is a platform-team action.
///
/// Pods are selected when their namespace is listed in `namespaces` **or**
/// matches `namespaceSelector`, **and** they match `podSelector` (all pods when
/// it is omitted). With neither `namespaces` nor `namespaceSelector`, nothing is
/// selected.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "flowlens.dev",
    version = "v1alpha1",
    kind = "NetworkObservation",
    plural = "networkobservations",
    shortname = "nobs",
    shortname = "netobs",
    category = "flowlens",
    status = "NetworkObservationStatus",
    doc = "Traces the traffic of selected pods and reports who talks to whom, how much and how fast.",
    printcolumn(
        name = "Nodes",
        type_ = "string",
        json_path = ".status.summary.nodes",
        description = "Nodes reporting / nodes selected"
    ),
    printcolumn(
        name = "Flows",
        type_ = "integer",
        json_path = ".status.lastWindow.flows",
        description = "Flows in the last window"
    ),
    printcolumn(
        name = "Throughput",
        type_ = "string",
        json_path = ".status.summary.throughput",
        description = "Bytes per second over the last window"
    ),
    printcolumn(
        name = "RTT-P50",
        type_ = "string",
        json_path = ".status.summary.rttP50",
        description = "Median TCP smoothed RTT over the last window"
    ),
    printcolumn(
        name = "RTT-P99",
        type_ = "string",
        json_path = ".status.summary.rttP99",
        description = "99th percentile TCP smoothed RTT over the last window"
    ),
    printcolumn(
        name = "Retransmits",
        type_ = "integer",
        json_path = ".status.lastWindow.retransmits",
        priority = 1,
        description = "TCP segments retransmitted in the last window"
    ),
    printcolumn(
        name = "Drops",
        type_ = "integer",
        json_path = ".status.lastWindow.drops",
        priority = 1,
        description = "Packets the kernel dropped in the last window"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.namespaces) || has(self.namespaceSelector)").message("set namespaces, namespaceSelector or both: without them nothing is observed"))]
#[x_kube(validation = Rule::new("!has(self.groupBy) || self.groupBy.all(g, !g.startsWith('label:') || (has(self.keepLabels) && g.substring(6) in self.keepLabels))").message("every groupBy label:<key> must also be listed in keepLabels"))]
pub struct NetworkObservationSpec {
    /// Namespaces to trace, by name. ORed with `namespaceSelector`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(length(max = 63), regex(pattern = patterns::NAMESPACE_NAME)))]
    pub namespaces: Vec<String>,

    /// Namespaces to trace, by label. ORed with `namespaces`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,

    /// Pods to trace within the selected namespaces; all pods when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,

    /// Pod label keys kept as dimensions of the results (and usable in
    /// `groupBy` as `label:<key>`). Other labels never leave the node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(max = 316), regex(pattern = patterns::LABEL_KEY)))]
    pub keep_labels: Vec<String>,

    /// Dimensions to group results by: `namespace`, `workload`, `pod`, `node`,
    /// `zone`, `service`, `label:<key>`. Default `[namespace, workload]`.
    /// `service` is the Service a client connected through: top flows always
    /// name it (traffic through a Service is never merged with direct
    /// traffic), and `[service]` alone groups by Service without pod
    /// dimensions.
    #[serde(default = "GroupBy::defaults")]
    #[schemars(length(min = 1, max = 8))]
    pub group_by: Vec<GroupBy>,

    /// Aggregation window (`10s`, `1m`, `1m30s`); at least `5s`, at most `1h`.
    /// Status is updated once per window.
    #[serde(default = "default_window")]
    #[schemars(length(max = 16), regex(pattern = patterns::WINDOW))]
    pub window: String,

    /// How many flows (by bytes) to list in `status.topFlows`.
    #[serde(default = "default_top_n")]
    #[schemars(range(min = 1, max = 100))]
    pub top_n: u32,

    /// Cardinality budget: the number of distinct series (dimension
    /// combinations) kept per window. Series beyond it fold into an `other`
    /// bucket, and the `Ready` condition says so.
    #[serde(default = "default_max_series")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_series: u32,
}

fn default_window() -> String {
    "30s".to_owned()
}
fn default_top_n() -> u32 {
    10
}
fn default_max_series() -> u32 {
    1000
}

impl Default for NetworkObservationSpec {
    fn default() -> Self {
        Self {
            namespaces: Vec::new(),
            namespace_selector: None,
            pod_selector: None,
            keep_labels: Vec::new(),
            group_by: GroupBy::defaults(),
            window: default_window(),
            top_n: default_top_n(),
            max_series: default_max_series(),
        }
    }
}

/// The results of an observation, written by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkObservationStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// `Ready`: the spec is valid and the observation is deployed to its nodes.
    /// Reasons: `InvalidSpec`, `NoPodsSelected`, `Deploying`, `Observing`,
    /// `SeriesBudgetExceeded`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,

    /// Nodes hosting selected pods, and how many of them reported the last window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<ObservationNodes>,

    /// Pods selected, and selected pods that cannot be traced (for example
    /// `hostNetwork` pods, whose traffic is the node's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<ObservationPods>,

    /// Traffic in the last completed window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_window: Option<WindowTraffic>,

    /// Traffic since the observation began (kept across operator restarts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<TrafficTotal>,

    /// TCP smoothed RTT over the last window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency: Option<LatencyPercentiles>,

    /// DNS of the traced pods over the last window: queries, answers by
    /// response code, query-to-answer latency, the names queried most.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<crate::dns::DnsStatus>,

    /// The `topN` flows of the last window, by bytes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub top_flows: Vec<TopFlow>,

    /// Series counted in the last window against `maxSeries`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub series: Option<SeriesUsage>,

    /// Human-readable figures for `kubectl get` columns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<ObservationSummary>,
}

/// Node counts of an observation.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ObservationNodes {
    /// Nodes that host at least one selected pod.
    pub selected: u32,
    /// Selected nodes whose agent reported the last window.
    pub reporting: u32,
}

/// Pod counts of an observation.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ObservationPods {
    /// Pods traced (selected, running on a node, with an IP).
    pub traced: u32,
    /// Selected pods that cannot be traced, such as `hostNetwork` pods.
    #[serde(default)]
    pub untraceable: u32,
}

/// Traffic of one window. Bytes are IP-layer bytes (IP header and payload, per
/// packet on the wire, link-layer framing excluded); `payloadBytes` are the
/// transport payload (TCP/UDP/SCTP data) within them.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WindowTraffic {
    pub start: Time,
    pub end: Time,
    /// Distinct connections (5-tuples) seen in the window.
    pub flows: u64,
    pub packets: u64,
    pub bytes: u64,
    #[serde(default)]
    pub payload_bytes: u64,
    pub bytes_per_second: u64,
    pub packets_per_second: u64,
    /// Bytes between a pod and a pod or node of another zone (both zones
    /// known).
    #[serde(default)]
    pub cross_zone_bytes: u64,
    /// TCP segments retransmitted by traced pods.
    #[serde(default)]
    pub retransmits: u64,
    /// Packets of traced pods the kernel dropped (on nodes whose kernel
    /// offers the drop hook; see the agents' `NodeAgentConfig` status).
    #[serde(default)]
    pub drops: u64,
}

/// Traffic since the observation began.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrafficTotal {
    pub packets: u64,
    /// IP-layer bytes.
    pub bytes: u64,
    /// Transport payload bytes (what applications sent).
    #[serde(default)]
    pub payload_bytes: u64,
    /// Bytes between pods of different zones.
    #[serde(default)]
    pub cross_zone_bytes: u64,
    /// When counting began.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Time>,
    /// Windows included.
    #[serde(default)]
    pub windows: u64,
}

/// Percentiles of TCP smoothed RTT samples, in microseconds.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LatencyPercentiles {
    /// Number of RTT samples (readings of a socket's smoothed RTT).
    pub samples: u64,
    pub p50_micros: u64,
    pub p95_micros: u64,
    pub p99_micros: u64,
}

/// The dimensions of one side of a flow. Only the dimensions in `groupBy` are
/// set. A node, or a pod on the host network (whose address is its node's),
/// has `node` and `hostNetwork: true` (and `zone` when grouping by zone). A
/// peer that is neither a known pod nor a node has `external: true`, its
/// address and, when the traced pods resolved it, its DNS `name` (grouping
/// by `dnsName`, the name without the address); the overflow bucket of `maxSeries` has `other: true`.
#[derive(
    Serialize,
    Deserialize,
    Clone,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub struct FlowEndpoint {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// An external peer's DNS name: the name the traced pods asked for when
    /// their resolver answered with this address (CNAMEs followed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub external: bool,
    /// The node's own network: a node address (InternalIP, ExternalIP) or a
    /// `hostNetwork` pod, named by `node`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub host_network: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub other: bool,
}

/// What a pod offers to an observation's dimensions.
#[derive(Clone, Copy, Debug)]
pub struct PodDimensions<'a> {
    pub namespace: &'a str,
    pub workload: &'a WorkloadRef,
    pub pod: &'a str,
    pub node: Option<&'a str>,
    pub zone: Option<&'a str>,
    pub labels: &'a BTreeMap<String, String>,
}

impl FlowEndpoint {
    /// A pod projected on an observation's `groupBy` and `keepLabels`: only
    /// the dimensions in `groupBy` are set, and the labels kept are those of
    /// `keepLabels` and of `groupBy`'s `label:<key>` items. The agent applies
    /// it to local pods, the operator to remote ones: one projection, so the
    /// two sides always agree.
    pub fn project(
        group_by: &[GroupBy],
        keep_labels: &[String],
        pod: &PodDimensions<'_>,
    ) -> FlowEndpoint {
        let by = |g: GroupBy| group_by.contains(&g);
        let label_keys = keep_labels
            .iter()
            .chain(group_by.iter().filter_map(|g| match g {
                GroupBy::Label(k) => Some(k),
                _ => None,
            }));
        FlowEndpoint {
            namespace: by(GroupBy::Namespace).then(|| pod.namespace.to_owned()),
            workload: by(GroupBy::Workload).then(|| pod.workload.to_string()),
            pod: by(GroupBy::Pod).then(|| pod.pod.to_owned()),
            node: by(GroupBy::Node)
                .then_some(pod.node)
                .flatten()
                .map(str::to_owned),
            zone: by(GroupBy::Zone)
                .then_some(pod.zone)
                .flatten()
                .map(str::to_owned),
            labels: label_keys
                .filter_map(|k| pod.labels.get(k).map(|v| (k.clone(), v.clone())))
                .collect(),
            address: None,
            name: None,
            external: false,
            host_network: false,
            other: false,
        }
    }

    /// The overflow bucket of `maxSeries`.
    pub fn other() -> FlowEndpoint {
        FlowEndpoint {
            other: true,
            ..Default::default()
        }
    }
}

/// One flow in `topFlows`: traffic between a client (`source`) and a server
/// (`destination`) on the server's `port`, both directions summed.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TopFlow {
    pub source: FlowEndpoint,
    pub destination: FlowEndpoint,
    /// The server port (0 when the protocol has none); through a Service,
    /// the backend's (target) port.
    pub port: u16,
    /// The Service (`namespace/name`) the client connected through; the
    /// `destination` is then the backend it was sent to. Absent for direct
    /// connections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// `TCP`, `UDP`, `SCTP`, `ICMP`, `ICMPv6` or the IP protocol number.
    pub protocol: String,
    pub bytes: u64,
    pub packets: u64,
    /// Connections in the window.
    #[serde(default)]
    pub flows: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_p50_micros: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_p99_micros: Option<u64>,
}

/// Cardinality of the last window.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SeriesUsage {
    /// Distinct series kept.
    pub series: u64,
    /// The budget (`spec.maxSeries`).
    pub max_series: u64,
    /// Series folded into the `other` bucket because the budget was reached.
    pub folded: u64,
}

/// Preformatted figures for `kubectl get networkobservations`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ObservationSummary {
    /// `reporting/selected`, e.g. `2/2`.
    pub nodes: String,
    /// e.g. `1.2 MB/s`.
    pub throughput: String,
    /// e.g. `850µs`.
    pub rtt_p50: String,
    /// e.g. `12.3ms`.
    pub rtt_p99: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_apply_when_fields_are_missing() {
        let spec: NetworkObservationSpec = serde_yaml::from_str("namespaces: [shop]").unwrap();
        assert_eq!(spec.window, "30s");
        assert_eq!(spec.top_n, 10);
        assert_eq!(spec.max_series, 1000);
        assert_eq!(spec.group_by, vec![GroupBy::Namespace, GroupBy::Workload]);
        assert_eq!(
            spec,
            NetworkObservationSpec {
                namespaces: vec!["shop".into()],
                ..Default::default()
            }
        );
    }

    #[test]
    fn round_trips_through_json() {
        let spec: NetworkObservationSpec = serde_yaml::from_str(
            r#"
namespaceSelector: {matchLabels: {team: payments}}
podSelector: {matchExpressions: [{key: app, operator: Exists}]}
keepLabels: [app, version]
groupBy: [namespace, workload, zone, "label:app"]
window: 1m
topN: 5
maxSeries: 200
"#,
        )
        .unwrap();
        let json = serde_json::to_string(&spec).unwrap();
        let back: NetworkObservationSpec = serde_json::from_str(&json).unwrap();
        assert_eq!(back, spec);
        assert!(
            json.contains(r#""groupBy":["namespace","workload","zone","label:app"]"#),
            "{json}"
        );
    }

    #[test]
    fn empty_status_serializes_to_empty_object() {
        let s = serde_json::to_string(&NetworkObservationStatus::default()).unwrap();
        assert_eq!(s, "{}");
    }
}
