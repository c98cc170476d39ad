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
    /// The kernel does not show the programs attached to a pod's interface.
    pub const UNATTACHED: &str = "Unattached";
    /// Another program runs before Flowlens' on a pod's interface.
    pub const NOT_FIRST: &str = "NotFirst";
    /// The node's config is missing or unreadable: the last one applied stays.
    pub const CONFIG_MISSING: &str = "ConfigMissing";
    pub const TOO_MANY_RULES: &str = "TooManyRules";
    /// The node's policy tables cannot hold every policy: some are left
    /// out there (named in the message).
    pub const POLICY_TABLE_FULL: &str = "PolicyTableFull";
    /// The collector refused a report window for good (the agent dropped
    /// it; the operator's log and report_refusals metric say why).
    pub const REPORT_REFUSED: &str = "ReportRefused";
}

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};

/// Sets condition `type_` in `conditions`. `lastTransitionTime` changes only
/// when the status flips; reason, message and `observedGeneration` are always
/// updated. Returns true when anything changed.
pub fn set(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    observed_generation: Option<i64>,
    now: Timestamp,
) -> bool {
    let status = if status { "True" } else { "False" }.to_owned();
    let message = message.into();
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            let before = c.clone();
            if c.status != status {
                c.last_transition_time = Time(now);
            }
            c.status = status;
            c.reason = reason.to_owned();
            c.message = message;
            c.observed_generation = observed_generation;
            *c != before
        }
        None => {
            conditions.push(Condition {
                type_: type_.to_owned(),
                status,
                reason: reason.to_owned(),
                message,
                observed_generation,
                last_transition_time: Time(now),
            });
            true
        }
    }
}

/// The condition of type `type_`, if present.
pub fn get<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_moves_only_on_flips() {
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let t1: Timestamp = "2026-01-01T00:01:00Z".parse().unwrap();
        let t2: Timestamp = "2026-01-01T00:02:00Z".parse().unwrap();
        let mut c = Vec::new();
        assert!(set(&mut c, READY, true, "Compiled", "ok", Some(1), t0));
        assert!(
            !set(&mut c, READY, true, "Compiled", "ok", Some(1), t1),
            "nothing changed"
        );
        assert!(set(&mut c, READY, true, "Compiled", "ok now", Some(2), t1));
        assert_eq!(c[0].last_transition_time.0, t0);
        assert!(set(
            &mut c,
            READY,
            false,
            reason::INVALID_SPEC,
            "bad",
            Some(3),
            t2
        ));
        assert_eq!(c[0].last_transition_time.0, t2);
        assert_eq!(get(&c, READY).unwrap().reason, "InvalidSpec");
    }
}
