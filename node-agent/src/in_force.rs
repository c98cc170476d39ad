//! What is in force on this node: which endpoints have their programs
//! attached (as read back from the kernel), and which policies of the
//! applied revision are enforced for every pod they select here. Pure: the
//! control loop gathers the facts, this module judges them.
//!
//! A policy is in force when every endpoint one of its rules applies to has
//! verified TC links, and none of its rules was left out of the kernel
//! (more than 64 rules on an endpoint). Anything else is reported, with the
//! reason, and the operator does not call the policy Enforced on this node.

use std::collections::{BTreeMap, BTreeSet};

use flowlens_api::{
    conditions::reason,
    node_agent_config::{NodeAgentConfigSpec, PodLinks, PolicyNotInForce, PolicyRef},
};

use crate::{
    datapath::attach::{Interface, TcLinks},
    tables,
};

/// Links listed in status, at most.
pub(crate) const LINKS_LISTED: usize = 256;

/// Where each local endpoint (traced or with rules) stands.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct EndpointStates {
    /// Endpoints whose every interface has verified links.
    pub attached: BTreeMap<String, Vec<PodLinks>>,
    /// Endpoints with an interface whose links the kernel does not show.
    pub unattached: Vec<String>,
    /// Endpoints no interface routes to.
    pub missing: Vec<String>,
    /// Attached endpoints where another program runs before Flowlens'.
    pub not_first: Vec<String>,
}

/// Judges each endpoint from the interfaces found for it and the links the
/// kernel shows.
pub(crate) fn endpoint_states(
    endpoint_interfaces: &[(String, Vec<Interface>)],
    verified: &BTreeMap<Interface, TcLinks>,
) -> EndpointStates {
    let mut st = EndpointStates::default();
    for (pod, ifaces) in endpoint_interfaces {
        if ifaces.is_empty() {
            st.missing.push(pod.clone());
            continue;
        }
        let mut links = Vec::new();
        let mut first = true;
        for iface in ifaces {
            match verified.get(iface) {
                Some(l) => {
                    first &= l.first;
                    links.push(PodLinks {
                        pod: pod.clone(),
                        interface: iface.0.clone(),
                        from_pod_link: l.from_pod,
                        to_pod_link: l.to_pod,
                    });
                }
                None => {
                    links.clear();
                    break;
                }
            }
        }
        if links.is_empty() {
            st.unattached.push(pod.clone());
        } else {
            if !first {
                st.not_first.push(pod.clone());
            }
            st.attached.insert(pod.clone(), links);
        }
    }
    st.missing.sort();
    st.unattached.sort();
    st
}

/// Splits the applied spec's policies into those in force and those not,
/// given the endpoint states, the compiler's problems and whether the
/// kernel can attach the TC programs at all.
pub(crate) fn policies_in_force(
    spec: &NodeAgentConfigSpec,
    endpoints: &EndpointStates,
    problems: &[tables::Problem],
    tc_supported: bool,
) -> (Vec<PolicyRef>, Vec<PolicyNotInForce>) {
    // Rules left out of the kernel, by id.
    let dropped: BTreeSet<&str> = problems
        .iter()
        .flat_map(|p| match p {
            tables::Problem::TooManyRules { dropped, .. } => dropped.as_slice(),
            _ => &[],
        })
        .map(String::as_str)
        .collect();
    // Policies left out of full tables, with the problem's message.
    let table_full: Vec<(&str, String)> = problems
        .iter()
        .filter_map(|p| match p {
            tables::Problem::PolicyTableFull { left_out, .. } => Some((left_out, p.to_string())),
            _ => None,
        })
        .flat_map(|(left_out, message)| left_out.iter().map(move |l| (l.as_str(), message.clone())))
        .collect();
    let mut in_force = Vec::new();
    let mut not = Vec::new();
    for policy in &spec.policies {
        let rules: Vec<_> = spec.rules.iter().filter(|r| &r.policy == policy).collect();
        let pods: BTreeSet<&str> = rules
            .iter()
            .flat_map(|r| r.endpoints.iter().map(String::as_str))
            .collect();
        let left_out: Vec<&str> = rules
            .iter()
            .map(|r| r.id.as_str())
            .filter(|id| dropped.contains(id))
            .collect();
        let unattached: Vec<&str> = pods
            .iter()
            .copied()
            .filter(|p| endpoints.unattached.iter().any(|u| u == p))
            .collect();
        let missing: Vec<&str> = pods
            .iter()
            .copied()
            .filter(|p| endpoints.missing.iter().any(|m| m == p))
            .collect();
        let key = format!("{}/{}", policy.namespace, policy.name);
        let full = table_full.iter().find(|(l, _)| *l == key);
        let problem = if let Some((_, message)) = full {
            Some((reason::POLICY_TABLE_FULL, message.clone()))
        } else if !pods.is_empty() && !tc_supported {
            Some((
                reason::UNSUPPORTED_KERNEL,
                "the kernel has no TCX (Linux 6.6+): the per-pod programs cannot be attached"
                    .to_owned(),
            ))
        } else if !left_out.is_empty() {
            Some((
                reason::TOO_MANY_RULES,
                format!(
                    "{} rule(s) left out of the kernel (more than {} rules on a pod): {}",
                    left_out.len(),
                    tables::MAX_SLOTS,
                    tables::named(&left_out)
                ),
            ))
        } else if !unattached.is_empty() {
            Some((
                reason::UNATTACHED,
                format!(
                    "the kernel does not show the programs attached for {} selected pod(s): {}",
                    unattached.len(),
                    tables::named(&unattached)
                ),
            ))
        } else if !missing.is_empty() {
            Some((
                reason::INTERFACE_NOT_FOUND,
                format!(
                    "no interface routes to {} selected pod(s) yet: {}",
                    missing.len(),
                    tables::named(&missing)
                ),
            ))
        } else {
            None
        };
        match problem {
            None => in_force.push(policy.clone()),
            Some((reason, message)) => not.push(PolicyNotInForce {
                policy: policy.clone(),
                reason: reason.to_owned(),
                message,
            }),
        }
    }
    (in_force, not)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(n: &str, i: u32) -> Interface {
        (n.to_owned(), i)
    }

    fn links(first: bool) -> TcLinks {
        TcLinks {
            from_pod: 10,
            to_pod: 11,
            first,
        }
    }

    const SPEC: &str = r#"
nodeName: n1
revision: r1
endpoints:
- {namespace: a, pod: p1, uid: u1, workload: {kind: Pod, name: p1}, ips: [10.0.0.1]}
- {namespace: a, pod: p2, uid: u2, workload: {kind: Pod, name: p2}, ips: [10.0.0.2]}
policies:
- {namespace: a, name: one, revision: x}
- {namespace: a, name: two, revision: y}
rules:
- {id: a/one/egress/0, policy: {namespace: a, name: one, revision: x}, direction: Egress, mode: Enforce, endpoints: [a/p1], anyPeer: true, ports: []}
- {id: a/two/egress/0, policy: {namespace: a, name: two, revision: y}, direction: Egress, mode: Enforce, endpoints: [a/p2], anyPeer: true, ports: []}
"#;

    fn spec() -> NodeAgentConfigSpec {
        serde_yaml::from_str(SPEC).unwrap()
    }

    #[test]
    fn an_endpoint_is_attached_only_when_every_interface_is_verified() {
        let eps = vec![
            ("a/p1".to_owned(), vec![iface("v1", 1)]),
            ("a/p2".to_owned(), vec![iface("v2", 2), iface("v3", 3)]),
            ("a/p3".to_owned(), vec![]),
        ];
        let verified = BTreeMap::from([
            (iface("v1", 1), links(false)),
            (iface("v2", 2), links(true)),
        ]);
        let st = endpoint_states(&eps, &verified);
        assert_eq!(st.attached.keys().collect::<Vec<_>>(), ["a/p1"]);
        assert_eq!(st.attached["a/p1"][0].from_pod_link, 10);
        assert_eq!(st.unattached, ["a/p2"]);
        assert_eq!(st.missing, ["a/p3"]);
        assert_eq!(st.not_first, ["a/p1"]);
    }

    #[test]
    fn a_policy_is_in_force_only_where_its_pods_are_attached() {
        let eps = vec![
            ("a/p1".to_owned(), vec![iface("v1", 1)]),
            ("a/p2".to_owned(), vec![iface("v2", 2)]),
        ];
        let verified = BTreeMap::from([(iface("v1", 1), links(true))]);
        let st = endpoint_states(&eps, &verified);
        let (yes, no) = policies_in_force(&spec(), &st, &[], true);
        assert_eq!(yes.len(), 1);
        assert_eq!(yes[0].name, "one");
        assert_eq!(no.len(), 1);
        assert_eq!(no[0].policy.name, "two");
        assert_eq!(no[0].reason, reason::UNATTACHED);
        assert!(no[0].message.contains("a/p2"), "{}", no[0].message);
    }

    #[test]
    fn rules_left_out_or_an_old_kernel_keep_a_policy_out_of_force() {
        let eps = vec![
            ("a/p1".to_owned(), vec![iface("v1", 1)]),
            ("a/p2".to_owned(), vec![iface("v2", 2)]),
        ];
        let verified =
            BTreeMap::from([(iface("v1", 1), links(true)), (iface("v2", 2), links(true))]);
        let st = endpoint_states(&eps, &verified);
        let problems = [tables::Problem::TooManyRules {
            endpoint: "a/p1".into(),
            direction: flowlens_api::node_agent_config::Direction::Egress,
            dropped: vec!["a/one/egress/0".into()],
        }];
        let (yes, no) = policies_in_force(&spec(), &st, &problems, true);
        assert_eq!(
            yes.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
            ["two"]
        );
        assert_eq!(no[0].reason, reason::TOO_MANY_RULES);
        let (yes, no) = policies_in_force(&spec(), &st, &[], false);
        assert!(yes.is_empty());
        assert!(no.iter().all(|p| p.reason == reason::UNSUPPORTED_KERNEL));
    }
}
