//! Assembles one node's `NodeAgentConfig` spec from the compiled state. The
//! output is canonical (every list sorted), so its revision changes only when
//! its content does.

use std::collections::{BTreeMap, BTreeSet};

use flowlens_api::{
    flow_policy::PolicyMode,
    node_agent_config::{
        BlockRule, Direction, LocalEndpoint, NodeAgentConfigSpec, ObservationConfig, PolicyRef,
    },
};

use super::{Compiler, Rule, content_hash, services};
use crate::model::{NodeInfo, PodKey};

/// Local pod -> the labels the observations tracing it keep.
type KeptLabels = BTreeMap<PodKey, BTreeSet<String>>;

/// The blocking part of a node's config.
#[derive(Default)]
struct Blocking {
    /// Sorted by id, each with its rank in [`RuleOrder`] as `priority`.
    rules: Vec<BlockRule>,
    policies: BTreeSet<PolicyRef>,
}

pub(crate) fn node_config(c: &mut Compiler, node: &NodeInfo) -> NodeAgentConfigSpec {
    // Local endpoints, with the labels the observations tracing them keep.
    let mut keep = KeptLabels::new();
    let observations = observation_configs(c, node, &mut keep);
    let blocking = blocking(c, node, &mut keep);
    let endpoints = local_endpoints(c, &keep);
    // The agent translates connections of its local endpoints only: a node
    // without any gets no Services (most nodes of a large cluster carry
    // none, and configs stay small).
    let services = if endpoints.is_empty() || c.no_endpoint_slices {
        Vec::new()
    } else {
        services::frontends(c, node)
    };

    let mut spec = NodeAgentConfigSpec {
        node_name: node.name.clone(),
        zone: node.zone.clone(),
        revision: String::new(),
        collector: c.collector.clone(),
        endpoints,
        observations,
        // Written as AddressSetSlices, which agents read by name.
        address_sets: Vec::new(),
        rules: blocking.rules,
        policies: blocking.policies.into_iter().collect(),
        services,
    };
    spec.revision = content_hash(&serde_json::to_vec(&spec).expect("a spec serializes"));
    spec
}

/// The observations tracing pods on `node`; records the labels each keeps
/// of its local pods in `keep`.
fn observation_configs(
    c: &Compiler,
    node: &NodeInfo,
    keep: &mut KeptLabels,
) -> Vec<ObservationConfig> {
    let mut observations = Vec::new();
    for o in c.observations.values() {
        let (Some(spec), Some(local)) = (&o.spec, o.by_node.get(&node.name)) else {
            continue;
        };
        if local.is_empty() {
            continue;
        }
        for k in local {
            keep.entry(k.clone())
                .or_default()
                .extend(spec.keep_labels.iter().cloned());
        }
        observations.push(ObservationConfig {
            name: o.name.clone(),
            uid: o.uid.clone(),
            generation: o.spec_generation,
            window_seconds: o.window_seconds,

            group_by: spec.group_by.clone(),
            keep_labels: spec.keep_labels.clone(),
            top_n: spec.top_n,
            max_series: spec.max_series,
            endpoints: local.iter().cloned().collect(),
        });
    }
    observations
}

/// The rules of the policies targeting pods on `node`, with their address
/// sets; adds those pods to `keep`.
fn blocking(c: &Compiler, node: &NodeInfo, keep: &mut KeptLabels) -> Blocking {
    let mut out = Blocking::default();
    let mut ordered = Vec::new();
    for pol in c.policies.values() {
        let (Some(spec), Some(revision), Some(local)) =
            (&pol.spec, &pol.revision, pol.by_node.get(&node.name))
        else {
            continue;
        };
        if local.is_empty() {
            continue;
        }
        let policy = PolicyRef {
            namespace: pol.namespace.clone(),
            name: pol.name.clone(),
            revision: revision.clone(),
        };
        out.policies.insert(policy.clone());
        for k in local {
            keep.entry(k.clone()).or_default();
        }
        let mode: PolicyMode = spec.mode;
        for rule in &pol.rules {
            let order = RuleOrder {
                mode,
                created: pol.created,
                uid: pol.uid.clone(),
                namespace: pol.namespace.clone(),
                name: pol.name.clone(),
                direction: rule.direction,
                index: rule.index,
            };
            let block = block_rule(rule, &policy, mode, local);
            ordered.push((order, block));
        }
    }
    out.rules = prioritized(ordered);
    out.rules.sort_by(|a, b| a.id.cmp(&b.id));
    out
}

/// The order in which a node's rules get an endpoint's 64 slots per
/// direction (the rest are dropped and reported): `Enforce` before `Audit`,
/// then older policies first (`creationTimestamp`, then uid: neither is
/// chosen by the policy's author), then the rule's index in the policy.
/// The namespace and name only break ties between policies without a uid.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct RuleOrder {
    mode: PolicyMode,
    created: i64,
    uid: String,
    namespace: String,
    name: String,
    direction: Direction,
    index: usize,
}

/// Sets each rule's `priority` to its rank in [`RuleOrder`] (0 first).
fn prioritized(mut ordered: Vec<(RuleOrder, BlockRule)>) -> Vec<BlockRule> {
    ordered.sort_by(|(a, _), (b, _)| a.cmp(b));
    ordered
        .into_iter()
        .zip(0..)
        .map(|((_, rule), priority)| BlockRule { priority, ..rule })
        .collect()
}

/// One rule of `policy` for the pods `local`, naming its address set
/// (unless it matches any peer).
fn block_rule(
    rule: &Rule,
    policy: &PolicyRef,
    mode: PolicyMode,
    local: &BTreeSet<PodKey>,
) -> BlockRule {
    let dir = match rule.direction {
        Direction::Egress => "egress",
        Direction::Ingress => "ingress",
    };
    let address_set = (!rule.any_peer).then(|| rule.set_name.clone());
    BlockRule {
        id: format!("{}/{}/{dir}/{}", policy.namespace, policy.name, rule.index),
        policy: policy.clone(),
        direction: rule.direction,
        mode,
        endpoints: local.iter().cloned().collect(),
        any_peer: rule.any_peer,
        address_set,
        ports: rule.ports.clone(),
        // Set by `prioritized`, once every rule of the node is known.
        priority: 0,
    }
}

/// The pods in `keep` that still exist, with the labels kept of each.
fn local_endpoints(c: &Compiler, keep: &KeptLabels) -> Vec<LocalEndpoint> {
    keep.iter()
        .filter_map(|(k, labels)| {
            let p = c.pods.get(k)?;
            Some(LocalEndpoint {
                namespace: p.namespace.clone(),
                pod: p.name.clone(),
                uid: p.uid.clone(),
                workload: p.workload.clone(),
                ips: p.ips.iter().map(|ip| ip.to_string()).collect(),
                labels: labels
                    .iter()
                    .filter_map(|l| p.labels.get(l).map(|v| (l.clone(), v.clone())))
                    .collect(),
            })
        })
        .collect()
}
