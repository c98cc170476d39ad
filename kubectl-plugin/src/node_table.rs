//! `kubectl flowlens status`: one row per node, from its NodeAgentConfig
//! (what the operator asked for and what the node's agent reports).

use flowlens_api::{NodeAgentConfig, NodeAgentConfigStatus, conditions};
use kube::ResourceExt;

use crate::table::Table;

/// The table of nodes, sorted by name.
pub fn node_table(configs: &[NodeAgentConfig]) -> Table {
    let mut t = Table::new(&[
        "NODE", "AGENT", "REVISION", "HOOKS", "PODS", "POLICIES", "PROBLEMS",
    ]);
    let mut configs: Vec<&NodeAgentConfig> = configs.iter().collect();
    configs.sort_by_key(|c| c.name_any());
    for c in configs {
        t.row(node_row(c));
    }
    t
}

fn node_row(c: &NodeAgentConfig) -> Vec<String> {
    let Some(s) = c.status.as_ref() else {
        return vec![
            c.name_any(),
            "-".into(),
            format!("{} (not applied)", short(&c.spec.revision)),
            "-".into(),
            "-".into(),
            "-".into(),
            "no status: is the agent running on this node?".into(),
        ];
    };
    let revision = match s.applied_revision.as_deref() {
        Some(r) if r == c.spec.revision => short(r).to_owned(),
        Some(r) => format!("{} (wants {})", short(r), short(&c.spec.revision)),
        None => format!("{} (not applied)", short(&c.spec.revision)),
    };
    let hooks = s
        .hooks
        .as_ref()
        // The connect hooks are a family of cgroup programs: their kind
        // is enough here (`-o json` lists them).
        .map(|h| {
            let connect = h.connect.split('/').next().unwrap_or_default();
            format!("{} {} {connect}", h.flows, h.rtt)
        })
        .unwrap_or_else(|| "-".into());
    let pods = s
        .endpoints
        .as_ref()
        .map(|e| {
            let waiting = e.missing.len() + e.unattached.len();
            if waiting == 0 {
                format!("{} attached", e.attached)
            } else {
                format!("{} attached, {waiting} not", e.attached)
            }
        })
        .unwrap_or_else(|| "-".into());
    let policies = if s.policies_not_in_force.is_empty() {
        format!("{} in force", s.policies.len())
    } else {
        format!(
            "{} in force, {} not",
            s.policies.len(),
            s.policies_not_in_force.len()
        )
    };
    vec![
        c.name_any(),
        s.agent_version.clone().unwrap_or_else(|| "-".into()),
        revision,
        hooks,
        pods,
        policies,
        problems(s),
    ]
}

/// Why the node is not as asked: conditions that say so, then policies
/// not in force; `none` when all is well.
fn problems(s: &NodeAgentConfigStatus) -> String {
    let mut p: Vec<String> = s
        .conditions
        .iter()
        .filter(|c| {
            (c.type_ == conditions::DEGRADED && c.status == "True")
                || (c.type_ == conditions::APPLIED && c.status == "False")
        })
        .map(|c| format!("{}: {}", c.reason, c.message))
        .collect();
    p.extend(s.policies_not_in_force.iter().map(|n| {
        format!(
            "{}/{} {}: {}",
            n.policy.namespace, n.policy.name, n.reason, n.message
        )
    }));
    if p.is_empty() {
        "none".into()
    } else {
        p.join("; ")
    }
}

/// Revisions are content hashes: the first 12 characters name one.
fn short(revision: &str) -> &str {
    revision.get(..12).unwrap_or(revision)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config(name: &str, revision: &str, status: serde_json::Value) -> NodeAgentConfig {
        let mut c: NodeAgentConfig = serde_json::from_value(json!({
            "apiVersion": "flowlens.dev/v1alpha1",
            "kind": "NodeAgentConfig",
            "metadata": {"name": name},
            "spec": {"nodeName": name, "revision": revision},
        }))
        .unwrap();
        if !status.is_null() {
            c.status = Some(serde_json::from_value(status).unwrap());
        }
        c
    }

    #[test]
    fn a_healthy_node_and_a_silent_one() {
        let healthy = config(
            "node-a",
            "0123456789abcdef",
            json!({
                "appliedRevision": "0123456789abcdef",
                "agentVersion": "0.1.0",
                "hooks": {"flows": "tcx", "rtt": "sock_ops", "connect": "cgroup/connect4+connect6",
                          "retransmits": "tracepoint/tcp/tcp_retransmit_skb", "drops": "none"},
                "endpoints": {"attached": 3, "missing": [], "unattached": [], "links": []},
                "policies": [{"namespace": "shop", "name": "web-no-db", "revision": "r1"}],
                "conditions": [{"type": "Degraded", "status": "False", "reason": "AsExpected",
                                "message": "", "lastTransitionTime": "2026-12-04T00:00:00Z"}],
            }),
        );
        let silent = config("node-b", "0123456789abcdef", serde_json::Value::Null);
        let out = node_table(&[silent, healthy]).to_string();
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[1].starts_with("node-a "), "{out}");
        assert!(lines[1].contains("0123456789ab "), "{out}");
        assert!(lines[1].contains("tcx sock_ops cgroup "), "{out}");
        assert!(lines[1].contains("3 attached"), "{out}");
        assert!(lines[1].contains("1 in force"), "{out}");
        assert!(lines[1].ends_with("none"), "{out}");
        assert!(lines[2].contains("is the agent running"), "{out}");
    }

    #[test]
    fn problems_name_their_reason() {
        let c = config(
            "node-a",
            "newrevision0000",
            json!({
                "appliedRevision": "oldrevision0000",
                "policiesNotInForce": [{"policy": {"namespace": "shop", "name": "p", "revision": "r"},
                                        "reason": "Unattached", "message": "shop/web-1 not attached"}],
                "conditions": [{"type": "Applied", "status": "False", "reason": "ApplyFailed",
                                "message": "the rule table is full", "lastTransitionTime": "2026-12-04T00:00:00Z"}],
            }),
        );
        let out = node_table(&[c]).to_string();
        assert!(out.contains("oldrevision0 (wants newrevision0)"), "{out}");
        assert!(out.contains("0 in force, 1 not"), "{out}");
        assert!(
            out.contains(
                "ApplyFailed: the rule table is full; shop/p Unattached: shop/web-1 not attached"
            ),
            "{out}"
        );
    }
}
