//! The Flowlens API: custom resources of group `flowlens.dev`, version `v1alpha1`.
//!
//! - [`NetworkObservation`] (cluster-scoped): what to trace and how to aggregate it;
//!   its status carries traffic and TCP latency results.
//! - [`FlowPolicy`] (namespaced): connections to block (or audit) in the kernel.
//! - [`NodeAgentConfig`] (cluster-scoped, one per node): everything a node agent
//!   needs, fully resolved by the operator. Its status is written by the agent.
//! - [`AddressSetSlice`] (cluster-scoped): a slice of an address set that
//!   block rules name, written by the operator, watched by the agents whose
//!   configs name the set.
//!
//! The types carry their OpenAPI validation (patterns, enums, ranges, list limits)
//! so that malformed objects are rejected at apply time, and [`validate`] repeats
//! every check (plus the cross-field ones that need CEL on the server) so that the
//! operator can report a precise `InvalidSpec` reason on any cluster version.
#![forbid(unsafe_code)]

pub mod address_set_slice;
pub mod conditions;
pub mod crd;
pub mod dns;
pub mod duration;
pub mod flow_policy;
pub mod format;
pub mod group_by;
pub mod histogram;
pub mod label_selector;
pub mod labels;
pub mod live;
pub mod network_observation;
pub mod node_agent_config;
pub mod patterns;
pub mod report;
pub mod validate;

pub use address_set_slice::{AddressSetSlice, AddressSetSliceSpec};
pub use flow_policy::{FlowPolicy, FlowPolicySpec, FlowPolicyStatus};
pub use group_by::GroupBy;
pub use label_selector::{LabelSelector, LabelSelectorOperator, LabelSelectorRequirement};
pub use network_observation::{
    NetworkObservation, NetworkObservationSpec, NetworkObservationStatus,
};
pub use node_agent_config::{NodeAgentConfig, NodeAgentConfigSpec, NodeAgentConfigStatus};

/// The API group of every Flowlens resource.
pub const GROUP: &str = "flowlens.dev";
/// The API version of every Flowlens resource.
pub const VERSION: &str = "v1alpha1";
/// The `kubectl get` category shared by the Flowlens resources (`kubectl get flowlens`).
pub const CATEGORY: &str = "flowlens";
