//! `FlowPolicy`: connections to block (or audit), enforced in the kernel.

// kube's `printcolumn(...)` attributes repeat keys by design.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{label_selector::LabelSelector, patterns};

/// Blocks connections of the pods it selects, in the kernel of their node.
///
/// The shape follows NetworkPolicy, with **block** semantics: a connection is
/// blocked when any rule of any `Enforce` policy matches it. A rule without
/// `to`/`from` matches every peer; a rule without `ports` matches every port
/// and protocol; a selector that matches nothing blocks nothing.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "flowlens.dev",
    version = "v1alpha1",
    kind = "FlowPolicy",
    plural = "flowpolicies",
    namespaced,
    shortname = "fpol",
    category = "flowlens",
    status = "FlowPolicyStatus",
    doc = "Blocks (or audits) connections of selected pods, enforced in the kernel of their nodes.",
    printcolumn(name = "Mode", type_ = "string", json_path = ".spec.mode"),
    printcolumn(
        name = "Enforcing",
        type_ = "string",
        json_path = ".status.summary.nodes",
        description = "Nodes enforcing / nodes targeted"
    ),
    printcolumn(
        name = "Blocked",
        type_ = "integer",
        json_path = ".status.blocked.connections",
        description = "Connection attempts blocked since the policy was created"
    ),
    printcolumn(
        name = "Audited",
        type_ = "integer",
        json_path = ".status.audited.connections",
        description = "Connection attempts that matched in Audit mode",
        priority = 1
    ),
    printcolumn(
        name = "Blocked-Packets",
        type_ = "integer",
        json_path = ".status.blocked.packets",
        description = "Packets dropped since the policy was created",
        priority = 1
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
pub struct FlowPolicySpec {
    /// `Enforce` (default) drops matching traffic; `Audit` only counts it.
    #[serde(default)]
    pub mode: PolicyMode,

    /// Pods of this namespace the policy applies to; `{}` selects all of them.
    pub pod_selector: LabelSelector,

    /// Connections from the selected pods to these peers and ports are blocked.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub egress: Vec<EgressRule>,

    /// Connections to the selected pods from these peers on these ports are blocked.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub ingress: Vec<IngressRule>,
}

/// `Enforce` or `Audit`.
#[derive(
    Serialize,
    Deserialize,
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    JsonSchema,
)]
pub enum PolicyMode {
    /// Drop matching packets and reject matching connects.
    #[default]
    Enforce,
    /// Count matching packets and connection attempts, drop nothing.
    Audit,
}

/// Blocks traffic from the selected pods to `to` on `ports`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EgressRule {
    /// Destinations; every destination when omitted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub to: Vec<Peer>,
    /// Destination ports; every port and protocol when omitted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub ports: Vec<PortSpec>,
}

/// Blocks traffic to the selected pods from `from` on `ports`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IngressRule {
    /// Sources; every source when omitted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub from: Vec<Peer>,
    /// Ports of the selected pods; every port and protocol when omitted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub ports: Vec<PortSpec>,
}

/// A peer, as in NetworkPolicy: pods (`podSelector` in this namespace,
/// `namespaceSelector` for all pods of matching namespaces, both for matching
/// pods in matching namespaces) or an `ipBlock`, not both.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.podSelector) || has(self.namespaceSelector) || has(self.ipBlock)").message("a peer needs podSelector, namespaceSelector or ipBlock"))]
#[x_kube(validation = Rule::new("!has(self.ipBlock) || !(has(self.podSelector) || has(self.namespaceSelector))").message("ipBlock cannot be combined with podSelector or namespaceSelector"))]
pub struct Peer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_block: Option<IpBlock>,
}

/// An IPv4 or IPv6 CIDR, minus the CIDRs in `except` (which must lie inside it).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IpBlock {
    /// e.g. `10.0.0.0/8` or `fd00::/64`.
    #[schemars(length(max = 64), regex(pattern = patterns::CIDR))]
    pub cidr: String,
    /// Sub-ranges of `cidr` not matched.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(max = 64), regex(pattern = patterns::CIDR)))]
    pub except: Vec<String>,
}

/// A port or port range of one protocol.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.endPort) || (has(self.port) && self.endPort >= self.port)").message("endPort needs port and must be at least port"))]
pub struct PortSpec {
    /// `TCP` (default), `UDP` or `SCTP`.
    #[serde(default)]
    pub protocol: Protocol,
    /// A port number; every port of `protocol` when omitted. Named ports are
    /// not supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<u16>,
    /// With `port`, the last port of the range `port..=endPort`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub end_port: Option<u16>,
}

/// A transport protocol.
#[derive(
    Serialize,
    Deserialize,
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    JsonSchema,
)]
pub enum Protocol {
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    #[serde(rename = "SCTP")]
    Sctp,
}

impl Protocol {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }
}

/// Where the policy is enforced and what it matched, written by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FlowPolicyStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// `Ready` (spec valid and compiled; reason `InvalidSpec` otherwise),
    /// `Enforced` (every targeted node runs this revision), `Degraded` (a node
    /// cannot enforce it fully; the message names the node and the reason).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,

    /// Nodes hosting selected pods, and those whose agent reports this
    /// revision applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<PolicyNodes>,

    /// Pods selected by `podSelector`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<PolicyPods>,

    /// Content hash of the compiled spec; agents report which revision they apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,

    /// Traffic dropped by `Enforce` rules since the policy was created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocked: Option<MatchCounters>,

    /// Traffic matched by `Audit` rules since the policy was created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audited: Option<MatchCounters>,

    /// End of the last policy-counter window included in `blocked` and
    /// `audited` (counters are updated at most once per window).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counted_until: Option<Time>,

    /// Who tried to reach whom: the blocked and audited connection
    /// attempts with the most attempts, seen in the last hour (at most 10;
    /// `blocked` and `audited` count every match, named or not).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub top_blocked: Vec<TopAttempt>,

    /// Human-readable figures for `kubectl get flowpolicies`.

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<PolicySummary>,

    /// The spec in force: the last valid one, which stays in force while a
    /// later edit is invalid (`Ready` is then `False`, reason
    /// `InvalidSpec`). Kept here so that it stays in force across operator
    /// restarts too; the operator reads it only when it knows no valid
    /// spec of the policy (after a start) and the latest one is invalid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_force: Option<PolicyInForce>,
}

/// A valid spec of a policy and the generation it was written at.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyInForce {
    /// The `metadata.generation` of `spec`.
    pub generation: i64,
    pub spec: FlowPolicySpec,
}

/// Node counts of a policy.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyNodes {
    pub targeted: u32,
    pub enforcing: u32,
}

/// Pod counts of a policy.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyPods {
    /// Selected pods with an IP, on a node.
    pub selected: u32,
    /// Selected pods that cannot be isolated per pod (`hostNetwork`).
    #[serde(default)]
    pub unenforceable: u32,
}

/// Packets and connection attempts matched.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MatchCounters {
    /// Packets matched (dropped for `blocked`).
    pub packets: u64,
    /// Connection attempts matched: TCP SYNs and `connect()` calls rejected at
    /// the socket.
    pub connections: u64,
}

/// Attempts of one source to reach one destination, matched by the policy.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TopAttempt {
    /// `Blocked` (an `Enforce` rule dropped it) or `Audited`.
    pub verdict: String,
    /// Who opened the connection: `namespace/pod`, `node/<name>` (a node or
    /// a host-network pod) or an IP address.
    pub source: String,
    /// Whom it tried to reach, named the same way (`service/namespace/name`
    /// when a Service's address was refused as a whole).
    pub destination: String,
    /// The destination port.
    pub port: u16,
    /// `TCP`, `UDP`, `SCTP`, `ICMP`, `ICMPv6` or the IP protocol number.
    pub protocol: String,
    /// Connection attempts (TCP SYNs, `connect()` calls).
    pub attempts: u64,
    /// Packets matched.
    pub packets: u64,
    /// The last attempt.
    pub last_seen: Time,
    /// The node whose agent saw the last attempt.
    pub node: String,
}

/// Preformatted figures for `kubectl get flowpolicies`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicySummary {
    /// `enforcing/targeted`, e.g. `3/3`.
    pub nodes: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let spec: FlowPolicySpec =
            serde_yaml::from_str("podSelector: {}\negress: [{ports: [{port: 5432}]}]").unwrap();
        assert_eq!(spec.mode, PolicyMode::Enforce);
        assert!(spec.pod_selector.is_empty());
        assert_eq!(spec.egress[0].ports[0].protocol, Protocol::Tcp);
        assert!(spec.egress[0].to.is_empty());
        assert!(spec.ingress.is_empty());
    }

    #[test]
    fn round_trips_through_json() {
        let spec: FlowPolicySpec = serde_yaml::from_str(
            r#"
mode: Audit
podSelector: {matchLabels: {app: api}}
egress:
- to:
  - namespaceSelector: {matchLabels: {team: data}}
    podSelector: {matchLabels: {app: postgres}}
  - ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}
  ports: [{protocol: TCP, port: 5432}, {protocol: UDP, port: 1000, endPort: 2000}]
ingress:
- from: [{ipBlock: {cidr: "fd00::/64"}}]
"#,
        )
        .unwrap();
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(json["mode"], "Audit");
        assert_eq!(json["egress"][0]["ports"][1]["endPort"], 2000);
        let back: FlowPolicySpec = serde_json::from_value(json).unwrap();
        assert_eq!(back, spec);
    }
}
