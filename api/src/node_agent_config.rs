//! `NodeAgentConfig`: everything one node's agent needs, fully resolved by the
//! operator (spec), and what the agent applied (status).

// kube's `printcolumn(...)` attributes repeat keys by design.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{
    flow_policy::{PolicyMode, Protocol},
    group_by::GroupBy,
};

/// The configuration of the agent on one node. Cluster-scoped, named after
/// the node, written by the operator only (users should not edit it).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "flowlens.dev",
    version = "v1alpha1",
    kind = "NodeAgentConfig",
    plural = "nodeagentconfigs",
    shortname = "nac",
    category = "flowlens",
    status = "NodeAgentConfigStatus",
    doc = "Per-node agent configuration, written by the Flowlens operator. Do not edit.",
    printcolumn(name = "Zone", type_ = "string", json_path = ".spec.zone"),
    printcolumn(name = "Revision", type_ = "string", json_path = ".spec.revision"),
    printcolumn(
        name = "Applied",
        type_ = "string",
        json_path = ".status.appliedRevision"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Applied\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct NodeAgentConfigSpec {
    /// The node this configuration is for (equal to `metadata.name`).
    pub node_name: String,

    /// The node's `topology.kubernetes.io/zone` label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,

    /// Content hash of everything below; changes only when the content does.
    pub revision: String,

    /// Where the agent sends its window reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collector: Option<CollectorEndpoint>,

    /// Pods on this node that are traced or targeted by a rule.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<LocalEndpoint>,

    /// Observations tracing at least one local endpoint.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub observations: Vec<ObservationConfig>,

    /// Address sets given inline, for configs written by hand (standalone
    /// agents). The operator leaves this empty: a set a rule names and that
    /// is not here is read from the `AddressSetSlice` objects labelled
    /// `flowlens.dev/address-set=<name>`, and the config is applied only
    /// once all of them are read.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub address_sets: Vec<AddressSet>,

    /// Block and audit rules that apply to local endpoints.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<BlockRule>,

    /// Policies that target this node, with their revision; the agent reports
    /// them back once applied.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<PolicyRef>,

    /// Service addresses kube-proxy would translate for this node's pods,
    /// with their ready backends. The agent translates `connect()`s of its
    /// local endpoints to them itself (a socket-level load balancer), so
    /// rules and counts see the backend pod.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<ServiceFrontend>,
}

impl NodeAgentConfigSpec {
    /// The address sets the rules name that are not given inline: the ones
    /// read from `AddressSetSlice`s.
    pub fn sets_in_slices(&self) -> std::collections::BTreeSet<String> {
        let inline: std::collections::BTreeSet<&str> =
            self.address_sets.iter().map(|s| s.name.as_str()).collect();
        self.rules
            .iter()
            .filter_map(|r| r.address_set.as_deref())
            .filter(|n| !inline.contains(n))
            .map(str::to_owned)
            .collect()
    }
}

/// One address and port of a Service: a ClusterIP, an externalIP, a
/// LoadBalancer ingress IP, or one of this node's addresses with a NodePort.
#[derive(
    Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub struct ServiceFrontend {
    /// `namespace/name` of the Service.
    pub service: String,
    pub address: String,
    pub port: u16,
    pub protocol: Protocol,
    /// `sessionAffinity: ClientIP`: a client always gets the same backend.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub client_affinity: bool,
    /// A NodePort on one of this node's addresses: kube-proxy translates
    /// the port on every local address of the node (the pod network's
    /// gateway address included), so the agent translates it on each.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub node_port: bool,
    /// Ready backends (pod address and target port, named ports resolved),
    /// at most [`MAX_SERVICE_BACKENDS`]. Empty: the agent leaves the
    /// connection to kube-proxy, which refuses it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<ServiceBackend>,
}

/// The most backends one frontend carries to agents; kube-proxy's choice
/// among more is not reproduced (the operator keeps the first, sorted).
pub const MAX_SERVICE_BACKENDS: usize = 256;

/// A ready endpoint of a Service port.
#[derive(
    Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub struct ServiceBackend {
    pub address: String,
    pub port: u16,
}

/// The operator's report endpoint.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CollectorEndpoint {
    /// e.g. `https://flowlens-operator.flowlens-system.svc:9443`.
    pub url: String,
    /// PEM CA bundle that signs the collector's serving certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_bundle: Option<String>,
}

/// A pod on this node.
#[derive(
    Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub struct LocalEndpoint {
    pub namespace: String,
    pub pod: String,
    /// The pod's UID (used to find its cgroup).
    pub uid: String,
    /// The owning workload, e.g. `Deployment/web`.
    pub workload: WorkloadRef,
    /// Pod IPs (IPv4 and/or IPv6).
    pub ips: Vec<String>,
    /// Only the labels some observation keeps.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

impl LocalEndpoint {
    /// `namespace/pod`, the reference used by observations and rules.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.pod)
    }
}

/// The workload owning a pod.
#[derive(
    Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadRef {
    /// `Deployment`, `StatefulSet`, `DaemonSet`, `Job`, `CronJob`, `ReplicaSet`,
    /// another owner kind, or `Pod` for a bare pod.
    pub kind: String,
    pub name: String,
}

impl std::fmt::Display for WorkloadRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.kind, self.name)
    }
}

/// One observation, as the agent needs it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ObservationConfig {
    pub name: String,
    pub uid: String,
    pub generation: i64,
    pub window_seconds: u32,
    pub group_by: Vec<GroupBy>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keep_labels: Vec<String>,
    pub top_n: u32,
    pub max_series: u32,
    /// Local endpoints traced, as `namespace/pod`.
    pub endpoints: Vec<String>,
}

/// A named set of CIDRs.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AddressSet {
    pub name: String,
    pub entries: Vec<CidrEntry>,
}

/// A CIDR minus some sub-CIDRs. Pod addresses are `/32` or `/128`.
#[derive(
    Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub struct CidrEntry {
    pub cidr: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub except: Vec<String>,
}

/// One compiled rule: traffic in `direction` between the listed local
/// endpoints and the peers, on the ports, is blocked (`Enforce`) or counted
/// (`Audit`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BlockRule {
    /// Stable id: `<namespace>/<policy>/<egress|ingress>/<index>`.
    pub id: String,
    pub policy: PolicyRef,
    pub direction: Direction,
    pub mode: PolicyMode,
    /// Local endpoints (`namespace/pod`) the rule applies to.
    pub endpoints: Vec<String>,
    /// The rule matches every peer (no `to`/`from` in the policy).
    pub any_peer: bool,
    /// With `anyPeer: false`, the address set holding the peers: inline in
    /// `addressSets`, or the `AddressSetSlice` objects of that name. A rule
    /// whose peers resolved to no address has an empty set and blocks
    /// nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address_set: Option<String>,
    /// Ports; every port and protocol when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortRange>,
    /// The rule's rank among this node's rules, lowest first: when an
    /// endpoint has more rules in a direction than its 64 slots, the
    /// lowest-ranked ones are kept. The operator ranks `Enforce` before
    /// `Audit`, then by the policy's `creationTimestamp` (older first), then
    /// its uid, then the rule's index in the policy (numerically): a policy
    /// created later, whatever its name, cannot push out an older policy's
    /// rules. Rules of equal rank (configs written before this field: all 0)
    /// keep the former order: `Enforce` first, then by `id`.
    #[serde(default)]
    pub priority: u64,
}

/// A reference to a FlowPolicy at a revision.
#[derive(
    Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub struct PolicyRef {
    pub namespace: String,
    pub name: String,
    pub revision: String,
}

/// Direction of traffic relative to the local endpoint.
#[derive(
    Serialize,
    Deserialize,
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    JsonSchema,
)]
pub enum Direction {
    /// From the local endpoint.
    #[default]
    Egress,
    /// To the local endpoint.
    Ingress,
}

/// An inclusive port range of one protocol. `0..=65535` is every port.
#[derive(
    Serialize,
    Deserialize,
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub struct PortRange {
    pub protocol: Protocol,
    pub first: u16,
    pub last: u16,
}

/// What the agent applied, written by the agent.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeAgentConfigStatus {
    /// The `spec.revision` the datapath currently enforces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_revision: Option<String>,

    /// `Applied` (reason `Applied`, or why not) and `Degraded` (reasons such
    /// as `FlowTableFull`, `UnsupportedKernel`, `InterfaceNotFound`,
    /// `TooManyRules`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,

    /// The kernel hooks in use, by purpose.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hooks: Option<DatapathHooks>,

    /// Policies in force on this node, at the revision applied: every rule
    /// of theirs is in the kernel, and the programs that enforce it are
    /// attached (read back from the kernel) to every pod it selects here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<PolicyRef>,

    /// Policies of the applied revision that are not (fully) in force on
    /// this node, and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies_not_in_force: Vec<PolicyNotInForce>,

    /// Observations this node's agent runs, at the generation applied.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub observations: Vec<ObservationRef>,

    /// Endpoints whose interface is attached, and those still missing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<EndpointAttachment>,

    /// The agent's version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
}

/// An observation at one generation.
#[derive(
    Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub struct ObservationRef {
    pub name: String,
    pub generation: i64,
}

/// The hook chosen for each purpose (`none` when the kernel offers none).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatapathHooks {
    /// e.g. `tcx` or `tc-clsact`.
    pub flows: String,
    /// e.g. `fentry/tcp_rcv_established`, `sock_ops`, `tracepoint/tcp/tcp_probe`.
    pub rtt: String,
    /// e.g. `cgroup/connect4+connect6`, or `none`.
    pub connect: String,
    /// e.g. `tracepoint/tcp/tcp_retransmit_skb`.
    pub retransmits: String,
    /// Kernel drops, e.g. `tracepoint/skb/kfree_skb` (absent from agents
    /// that predate the drop hook).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub drops: String,
}

/// Attachment state of local endpoints.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EndpointAttachment {
    /// Endpoints whose programs are attached, as read back from the kernel.
    pub attached: u32,
    /// Endpoints whose interface was not found yet (`namespace/pod`), at most 20.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<String>,
    /// Endpoints whose interface was found but whose programs the kernel
    /// does not show attached (`namespace/pod`), at most 20.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unattached: Vec<String>,
    /// The TC links of attached endpoints, as the kernel reports them (at
    /// most 256 listed; `attached` counts all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<PodLinks>,
}

/// The TC links of one endpoint's interface, read back from the kernel.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodLinks {
    /// `namespace/pod`.
    pub pod: String,
    /// The host-side interface.
    pub interface: String,
    /// Link id of the program on traffic leaving the pod (TCX ingress).
    pub from_pod_link: u32,
    /// Link id of the program on traffic entering the pod (TCX egress).
    pub to_pod_link: u32,
}

/// A policy of the applied revision that is not fully in force on a node.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyNotInForce {
    pub policy: PolicyRef,
    /// `Unattached` (programs not attached to some selected pods),
    /// `InterfaceNotFound`, `UnsupportedKernel` or `TooManyRules`.
    pub reason: String,
    pub message: String,
}
