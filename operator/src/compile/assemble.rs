//! Assembles one node's `NodeAgentConfig` spec from the compiled state. The
//! output is canonical (every list sorted), so its revision changes only when
//! its content does.

use std::collections::{BTreeMap, BTreeSet};

use flowlens_api::{
    flow_policy::PolicyMode,
    node_agent_config::{
        AddressSet, BlockRule, Direction, LocalEndpoint, NodeAgentConfigSpec, ObservationConfig,
        PolicyRef,
    },
};

use super::{Compiler, content_hash};
use crate::model::{NodeInfo, PodKey};

pub(crate) fn node_config(c: &mut Compiler, node: &NodeInfo) -> NodeAgentConfigSpec {
    // Local endpoints, with the labels the observations tracing them keep.
    let mut keep: BTreeMap<PodKey, BTreeSet<String>> = BTreeMap::new();
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

    let mut rules = Vec::new();
    let mut sets: BTreeMap<String, AddressSet> = BTreeMap::new();
    let mut policies = BTreeSet::new();
    for pol in c.policies.values_mut() {
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
        policies.insert(policy.clone());
        for k in local {
            keep.entry(k.clone()).or_default();
        }
        let mode: PolicyMode = spec.mode;
        for rule in &mut pol.rules {
            let dir = match rule.direction {
                Direction::Egress => "egress",
                Direction::Ingress => "ingress",
            };
            let address_set = if rule.any_peer {
                None
            } else {
                let s = Compiler::rule_set(rule);
                sets.entry(s.name.clone()).or_insert_with(|| AddressSet {
                    name: s.name.clone(),
                    entries: s.entries.clone(),
                });
                Some(s.name.clone())
            };
            rules.push(BlockRule {
                id: format!("{}/{}/{dir}/{}", policy.namespace, policy.name, rule.index),
                policy: policy.clone(),
                direction: rule.direction,
                mode,
                endpoints: local.iter().cloned().collect(),
                any_peer: rule.any_peer,
                address_set,
                ports: rule.ports.clone(),
            });
        }
    }
    rules.sort_by(|a, b| a.id.cmp(&b.id));

    let endpoints: Vec<LocalEndpoint> = keep
        .iter()
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
        .collect();

    let mut spec = NodeAgentConfigSpec {
        node_name: node.name.clone(),
        zone: node.zone.clone(),
        revision: String::new(),
        collector: c.collector.clone(),
        endpoints,
        observations,
        address_sets: sets.into_values().collect(),
        rules,
        policies: policies.into_iter().collect(),
    };
    spec.revision = content_hash(&serde_json::to_vec(&spec).expect("a spec serializes"));
    spec
}
