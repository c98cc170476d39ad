//! Condition types and reasons used in Flowlens statuses, in one place so that
//! operator, agent and tests agree on the spelling.

/// `NetworkObservation` / `FlowPolicy`: the spec is valid and compiled.
pub const READY: &str = "Ready";
/// `FlowPolicy`: every targeted node enforces the current revision.
pub const ENFORCED: &str = "Enforced";
/// `FlowPolicy` / `NodeAgentConfig`: something is in force only partly.
pub const DEGRADED: &str = "Degraded";
/// `NodeAgentConfig`: the agent applied `spec.revision`.
pub const APPLIED: &str = "Applied";

/// Condition reasons.
pub mod reason {
    pub const INVALID_SPEC: &str = "InvalidSpec";
    pub const COMPILED: &str = "Compiled";
    pub const NO_PODS_SELECTED: &str = "NoPodsSelected";
    pub const DEPLOYING: &str = "Deploying";
    pub const OBSERVING: &str = "Observing";
    pub const SERIES_BUDGET_EXCEEDED: &str = "SeriesBudgetExceeded";
    pub const ENFORCED: &str = "Enforced";
    pub const PENDING: &str = "Pending";
    pub const NO_TARGETS: &str = "NoTargets";
    pub const AS_EXPECTED: &str = "AsExpected";
    pub const HOST_NETWORK_POD: &str = "HostNetworkPod";
    pub const NODE_DEGRADED: &str = "NodeDegraded";
    pub const APPLIED: &str = "Applied";
    pub const APPLY_FAILED: &str = "ApplyFailed";
    pub const FLOW_TABLE_FULL: &str = "FlowTableFull";
    pub const UNSUPPORTED_KERNEL: &str = "UnsupportedKernel";
    pub const INTERFACE_NOT_FOUND: &str = "InterfaceNotFound";
    pub const TOO_MANY_RULES: &str = "TooManyRules";
}
