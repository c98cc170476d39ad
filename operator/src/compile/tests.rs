use std::collections::BTreeMap;

use flowlens_api::{
    flow_policy::{FlowPolicySpec, PolicyMode, Protocol},
    network_observation::NetworkObservationSpec,
    node_agent_config::{CidrEntry, Direction, NodeAgentConfigSpec, PortRange, WorkloadRef},
};

use super::*;
use crate::model::{NamespaceInfo, NodeInfo, PodInfo};

pub(super) fn node(name: &str, zone: &str) -> NodeInfo {
    NodeInfo {
        name: name.into(),
        uid: format!("uid-{name}"),
        zone: Some(zone.into()),
        addresses: Vec::new(),
    }
}

pub(super) fn ns(name: &str, labels: &[(&str, &str)]) -> NamespaceInfo {
    NamespaceInfo {
        name: name.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

pub(super) fn pod(ns: &str, name: &str, node: &str, ip: &str, labels: &[(&str, &str)]) -> PodInfo {
    PodInfo {
        namespace: ns.into(),
        name: name.into(),
        uid: format!("uid-{ns}-{name}"),
        node: Some(node.into()),
        ips: ip
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().unwrap())
            .collect(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        host_network: false,
        workload: WorkloadRef {
            kind: "Deployment".into(),
            name: name.split('-').next().unwrap().into(),
        },
        finished: false,
    }
}

pub(super) fn obs(yaml: &str) -> NetworkObservationSpec {
    serde_yaml::from_str(yaml).unwrap()
}

pub(super) fn pol(yaml: &str) -> FlowPolicySpec {
    serde_yaml::from_str(yaml).unwrap()
}

/// A policy object created at time 0, with no status.
pub(super) fn policy(
    namespace: &str,
    name: &str,
    uid: &str,
    generation: i64,
    spec: FlowPolicySpec,
) -> PolicyObject {
    PolicyObject {
        namespace: namespace.into(),
        name: name.into(),
        uid: uid.into(),
        created: 0,
        generation,
        spec,
        in_force: None,
    }
}

/// A small shop: web and api in `shop` (zone a), db in `data` (zone b).
pub(super) fn shop() -> Compiler {
    let mut c = Compiler::new();
    c.upsert_node(node("n1", "a"));
    c.upsert_node(node("n2", "b"));
    c.upsert_namespace(ns("shop", &[("team", "store")]));
    c.upsert_namespace(ns("data", &[("team", "data")]));
    c.upsert_pod(pod(
        "shop",
        "web-1",
        "n1",
        "10.0.1.1,fd00::1:1",
        &[("app", "web"), ("version", "v1"), ("secret", "x")],
    ));
    c.upsert_pod(pod("shop", "api-1", "n1", "10.0.1.2", &[("app", "api")]));
    c.upsert_pod(pod("data", "db-1", "n2", "10.0.2.1", &[("app", "db")]));
    c.take_dirty_nodes();
    c
}

pub(super) fn cfg(c: &mut Compiler, n: &str) -> NodeAgentConfigSpec {
    c.node_config(n).unwrap()
}

#[test]
fn observations_list_only_local_pods_and_keep_only_kept_labels() {
    let mut c = shop();
    c.upsert_observation("o", "ou", 1, obs("namespaces: [shop, data]\nkeepLabels: [version]\ngroupBy: [namespace, 'label:version']"));
    assert_eq!(
        c.take_dirty_nodes(),
        BTreeSet::from(["n1".to_string(), "n2".to_string()])
    );
    let n1 = cfg(&mut c, "n1");
    assert_eq!(n1.zone.as_deref(), Some("a"));
    assert_eq!(n1.observations.len(), 1);
    assert_eq!(
        n1.observations[0].endpoints,
        vec!["shop/api-1", "shop/web-1"]
    );
    let web = n1.endpoints.iter().find(|e| e.pod == "web-1").unwrap();
    assert_eq!(
        web.labels,
        BTreeMap::from([("version".to_string(), "v1".to_string())]),
        "only kept labels leave the operator"
    );
    assert_eq!(web.ips, vec!["10.0.1.1", "fd00::1:1"]);
    assert_eq!(web.workload.to_string(), "Deployment/web");
    assert_eq!(
        cfg(&mut c, "n2").observations[0].endpoints,
        vec!["data/db-1"]
    );
}

#[test]
fn namespace_selector_and_pod_selector() {
    let mut c = shop();
    c.upsert_observation("o", "ou", 1, obs("namespaceSelector: {matchLabels: {team: store}}\npodSelector: {matchExpressions: [{key: app, operator: In, values: [web]}]}"));
    assert_eq!(
        c.observation_view("o").unwrap().selected_nodes,
        BTreeSet::from(["n1".to_string()])
    );
    assert_eq!(
        cfg(&mut c, "n1").observations[0].endpoints,
        vec!["shop/web-1"]
    );
    assert!(cfg(&mut c, "n2").observations.is_empty());
    // Relabel the data namespace into the selection.
    c.take_dirty_nodes();
    c.upsert_namespace(ns("data", &[("team", "store")]));
    c.take_dirty_nodes();
    assert!(
        cfg(&mut c, "n2").observations.is_empty(),
        "data's only pod (app=db) does not match the podSelector"
    );
    c.upsert_pod(pod("data", "db-1", "n2", "10.0.2.1", &[("app", "web")]));
    assert_eq!(
        cfg(&mut c, "n2").observations[0].endpoints,
        vec!["data/db-1"]
    );
}

#[test]
fn pods_without_ip_are_picked_up_when_they_get_one() {
    let mut c = shop();
    c.upsert_observation("o", "ou", 1, obs("namespaces: [shop]"));
    c.take_dirty_nodes();
    c.upsert_pod(pod("shop", "new-1", "n2", "", &[]));
    assert!(
        c.take_dirty_nodes().is_empty(),
        "a pod without IP changes nothing"
    );
    c.upsert_pod(pod("shop", "new-1", "n2", "10.0.2.9", &[]));
    assert_eq!(c.take_dirty_nodes(), BTreeSet::from(["n2".to_string()]));
    assert_eq!(
        cfg(&mut c, "n2").observations[0].endpoints,
        vec!["shop/new-1"]
    );
}

#[test]
fn host_network_pods_are_reported_never_pretended() {
    let mut c = shop();
    let mut hn = pod("shop", "ds-1", "n1", "192.168.0.1", &[("app", "web")]);
    hn.host_network = true;
    c.upsert_pod(hn);
    c.upsert_observation("o", "ou", 1, obs("namespaces: [shop]"));
    c.upsert_policy(policy(
        "shop",
        "p",
        "pu",
        1,
        pol("podSelector: {matchLabels: {app: web}}\negress: [{}]"),
    ));
    c.upsert_policy(policy(
        "data",
        "q",
        "qu",
        1,
        pol("podSelector: {}\negress: [{to: [{namespaceSelector: {}}]}]"),
    ));
    let v = c.observation_view("o").unwrap();
    assert_eq!(v.untraceable_pods, vec!["shop/ds-1"]);
    assert_eq!(v.traced_pods, 2);
    let p = c.policy_view(&("shop".into(), "p".into())).unwrap();
    assert_eq!(p.unenforceable_pods, vec!["shop/ds-1"]);
    assert_eq!(p.selected_pods, 1);
    let n1 = cfg(&mut c, "n1");
    assert!(n1.endpoints.iter().all(|e| e.pod != "ds-1"));
    // Not a peer either: its address is the node's.
    let n2 = cfg(&mut c, "n2");
    let set = set_entries(&mut c, n2.rules[0].address_set.as_ref().unwrap());
    assert!(set.iter().all(|e| e.cidr != "192.168.0.1/32"), "{set:?}");
}

#[test]
fn policies_compile_to_local_targets_and_remote_address_sets() {
    let mut c = shop();
    c.upsert_policy(policy(
        "shop",
        "web-no-db",
        "pu",
        1,
        pol("podSelector: {matchLabels: {app: web}}\negress:\n- to: [{namespaceSelector: {matchLabels: {team: data}}, podSelector: {matchLabels: {app: db}}}, {ipBlock: {cidr: 172.16.0.0/12, except: [172.16.1.0/24]}}]\n  ports: [{port: 5432}, {protocol: UDP}]"),
    ));
    assert_eq!(
        c.take_dirty_nodes(),
        BTreeSet::from(["n1".to_string()]),
        "only the node of the selected pod"
    );
    let n1 = cfg(&mut c, "n1");
    assert_eq!(n1.rules.len(), 1);
    let r = &n1.rules[0];
    assert_eq!(r.id, "shop/web-no-db/egress/0");
    assert_eq!(r.endpoints, vec!["shop/web-1"]);
    assert_eq!(
        (r.direction, r.mode, r.any_peer),
        (Direction::Egress, PolicyMode::Enforce, false)
    );
    assert_eq!(
        r.ports,
        vec![
            PortRange {
                protocol: Protocol::Tcp,
                first: 5432,
                last: 5432
            },
            PortRange {
                protocol: Protocol::Udp,
                first: 0,
                last: 65535
            }
        ]
    );
    assert!(n1.address_sets.is_empty(), "sets are written as slices");
    let set = set_entries(&mut c, r.address_set.as_ref().unwrap());
    let cidrs: Vec<&str> = set.iter().map(|e| e.cidr.as_str()).collect();
    assert_eq!(cidrs, vec!["10.0.2.1/32", "172.16.0.0/12"]);
    assert_eq!(set[1].except, vec!["172.16.1.0/24"]);
    assert_eq!(n1.policies[0].name, "web-no-db");
    assert!(
        cfg(&mut c, "n2").rules.is_empty(),
        "the peer's node does not carry the rule"
    );
    assert_eq!(
        n1.endpoints
            .iter()
            .find(|e| e.pod == "web-1")
            .unwrap()
            .labels
            .len(),
        0,
        "policy-only endpoints carry no labels"
    );
}

#[test]
fn peer_changes_change_the_address_set_and_no_config() {
    let mut c = shop();
    c.upsert_policy(policy("shop", "p", "pu", 1, pol("podSelector: {matchLabels: {app: web}}\negress: [{to: [{namespaceSelector: {}, podSelector: {matchLabels: {app: db}}}]}]")));
    c.take_dirty_nodes();
    let before = cfg(&mut c, "n1");
    let name = before.rules[0].address_set.clone().unwrap();
    let entries = |c: &mut Compiler| {
        set_entries(c, &name)
            .into_iter()
            .map(|e| e.cidr)
            .collect::<Vec<_>>()
    };
    assert_eq!(entries(&mut c), vec!["10.0.2.1/32"]);
    // A new db pod on n2 changes the set n1's config names, not the config.
    c.upsert_pod(pod("data", "db-2", "n2", "10.0.2.2", &[("app", "db")]));
    assert!(c.take_dirty_nodes().is_empty());
    assert_eq!(entries(&mut c), vec!["10.0.2.1/32", "10.0.2.2/32"]);
    assert_eq!(cfg(&mut c, "n1"), before, "the config is unchanged");
    // Deleting a pod removes its address.
    c.delete_pod("data/db-1");
    assert!(c.take_dirty_nodes().is_empty());
    assert_eq!(entries(&mut c), vec!["10.0.2.2/32"]);
    // An unrelated pod touches nothing.
    c.upsert_pod(pod(
        "data",
        "cache-1",
        "n2",
        "10.0.2.3",
        &[("app", "cache")],
    ));
    assert!(c.take_dirty_nodes().is_empty());
}

#[test]
fn a_selector_matching_nothing_blocks_nothing_and_every_peer_is_explicit() {
    let mut c = shop();
    c.upsert_policy(policy(
        "shop",
        "none",
        "u1",
        1,
        pol("podSelector: {}\negress: [{to: [{podSelector: {matchLabels: {app: ghost}}}]}]"),
    ));
    c.upsert_policy(policy(
        "shop",
        "all",
        "u2",
        1,
        pol("podSelector: {matchLabels: {app: api}}\ningress: [{}]\negress: [{}]"),
    ));
    let n1 = cfg(&mut c, "n1");
    let none = n1.rules.iter().find(|r| r.policy.name == "none").unwrap();
    assert!(!none.any_peer);
    let set = set_entries(&mut c, none.address_set.as_ref().unwrap());
    assert!(set.is_empty(), "an empty set: blocks nothing");
    let all: Vec<_> = n1.rules.iter().filter(|r| r.policy.name == "all").collect();
    assert_eq!(all.len(), 2);
    assert!(
        all.iter()
            .all(|r| r.any_peer && r.address_set.is_none() && r.endpoints == vec!["shop/api-1"])
    );
}

#[test]
fn overlapping_policies_keep_their_modes() {
    let mut c = shop();
    c.upsert_policy(policy(
        "shop",
        "audit",
        "u1",
        1,
        pol("mode: Audit\npodSelector: {}\negress: [{ports: [{port: 80}]}]"),
    ));
    c.upsert_policy(policy(
        "shop",
        "enforce",
        "u2",
        1,
        pol("podSelector: {matchLabels: {app: web}}\negress: [{ports: [{port: 80}]}]"),
    ));
    let n1 = cfg(&mut c, "n1");
    let modes: Vec<(String, PolicyMode, Vec<String>)> = n1
        .rules
        .iter()
        .map(|r| (r.policy.name.clone(), r.mode, r.endpoints.clone()))
        .collect();
    assert_eq!(
        modes,
        vec![
            (
                "audit".into(),
                PolicyMode::Audit,
                vec!["shop/api-1".into(), "shop/web-1".into()]
            ),
            (
                "enforce".into(),
                PolicyMode::Enforce,
                vec!["shop/web-1".into()]
            )
        ]
    );
}

#[test]
fn revisions_change_only_with_content() {
    let mut c = shop();
    c.upsert_observation("o", "ou", 1, obs("namespaces: [shop]"));
    let a = cfg(&mut c, "n1");
    let b = cfg(&mut c, "n1");
    assert_eq!(a, b);
    c.upsert_pod(pod("data", "other", "n1", "10.0.1.99", &[]));
    assert_eq!(
        cfg(&mut c, "n1").revision,
        a.revision,
        "an untraced pod is not in the config"
    );
    c.upsert_pod(pod(
        "shop",
        "web-1",
        "n1",
        "10.0.1.1,fd00::1:1",
        &[("app", "web"), ("version", "v2")],
    ));
    assert_eq!(
        cfg(&mut c, "n1").revision,
        a.revision,
        "a label nobody keeps is not in the config"
    );
    c.upsert_pod(pod("shop", "web-1", "n1", "10.0.1.7", &[("app", "web")]));
    assert_ne!(cfg(&mut c, "n1").revision, a.revision);
}

#[test]
fn an_invalid_update_keeps_the_last_valid_policy_in_force() {
    let mut c = shop();
    c.upsert_policy(policy(
        "shop",
        "p",
        "pu",
        1,
        pol("podSelector: {}\negress: [{ports: [{port: 5432}]}]"),
    ));
    let before = cfg(&mut c, "n1");
    c.upsert_policy(policy("shop", "p", "pu", 2, pol("podSelector: {}\negress: [{to: [{ipBlock: {cidr: 10.0.0.0/16, except: [10.1.0.0/24]}}]}]")));
    let v = c.policy_view(&("shop".into(), "p".into())).unwrap();
    let err = v.error.unwrap();
    assert_eq!(err.0[0].field, "spec.egress[0].to[0].ipBlock.except[0]");
    assert_eq!(
        cfg(&mut c, "n1").rules,
        before.rules,
        "still enforcing generation 1"
    );
    c.upsert_policy(policy(
        "shop",
        "p",
        "pu",
        3,
        pol("podSelector: {}\negress: [{ports: [{port: 6432}]}]"),
    ));
    assert!(
        c.policy_view(&("shop".into(), "p".into()))
            .unwrap()
            .error
            .is_none()
    );
    assert_eq!(cfg(&mut c, "n1").rules[0].ports[0].first, 6432);
}

/// After an operator restart the first spec the compiler sees may be an
/// invalid edit: the spec in force comes from the policy's status then.
#[test]
fn after_a_restart_an_invalid_edit_keeps_the_spec_in_force_from_status() {
    let key: PolicyKey = ("shop".into(), "p".into());
    let valid = || pol("podSelector: {}\negress: [{ports: [{port: 5432}]}]");
    let invalid = || {
        pol(
            "podSelector: {}\negress: [{to: [{ipBlock: {cidr: 10.0.0.0/16, except: [10.1.0.0/24]}}]}]",
        )
    };
    // Before the restart: generation 1 valid, in force; its status says so.
    let mut before = shop();
    before.upsert_policy(policy("shop", "p", "pu", 1, valid()));
    let rules_before = cfg(&mut before, "n1").rules;
    let revision_before = before.policy_view(&key).unwrap().revision;
    let in_force = before.policy_in_force(&key).unwrap();
    assert_eq!(in_force.generation, 1);

    // After the restart, as the feed loads it: generation 2 is invalid.
    let restarted = |status: Option<PolicyInForce>| {
        let mut c = Compiler::new();
        c.begin_bulk();
        let shop = shop();
        for n in shop.nodes.values() {
            c.upsert_node(n.clone());
        }
        for n in shop.namespaces.values() {
            c.upsert_namespace(n.clone());
        }
        for p in shop.pods.values() {
            c.upsert_pod(p.clone());
        }
        c.upsert_policy(PolicyObject {
            in_force: status,
            ..policy("shop", "p", "pu", 2, invalid())
        });
        c.finish_bulk();
        c
    };
    let mut c = restarted(Some(in_force.clone()));
    assert_eq!(
        cfg(&mut c, "n1").rules,
        rules_before,
        "generation 1 stays in force"
    );
    let v = c.policy_view(&key).unwrap();
    assert!(v.error.is_some(), "the invalid edit is reported");
    assert_eq!((v.generation, v.revision), (2, revision_before));
    assert_eq!(
        c.policy_in_force(&key),
        Some(in_force.clone()),
        "and written again"
    );

    // Without status (what happened before), nothing would be in force.
    let mut c = restarted(None);
    assert!(cfg(&mut c, "n1").rules.is_empty());
    assert_eq!(c.policy_in_force(&key), None);

    // A spec in status that is not valid itself is not put in force.
    let mut c = restarted(Some(PolicyInForce {
        generation: 1,
        spec: invalid(),
    }));
    assert!(cfg(&mut c, "n1").rules.is_empty());

    // A valid latest spec wins over the status.
    let mut c = shop();
    c.upsert_policy(PolicyObject {
        in_force: Some(in_force),
        ..policy(
            "shop",
            "p",
            "pu",
            3,
            pol("podSelector: {}\negress: [{ports: [{port: 6432}]}]"),
        )
    });
    assert_eq!(cfg(&mut c, "n1").rules[0].ports[0].first, 6432);
    assert_eq!(c.policy_in_force(&key).unwrap().generation, 3);
}

/// A policy created later cannot push an older policy's rules out of a
/// full endpoint by its name: rules rank by mode, creation, uid, index.
#[test]
fn rules_rank_by_mode_then_policy_age_then_rule_index() {
    let mut c = shop();
    let eleven_rules = (0..11)
        .map(|p| format!("{{ports: [{{port: {}}}]}}", 1000 + p))
        .collect::<Vec<_>>()
        .join(", ");
    let spec = |mode: &str| {
        pol(&format!(
            "mode: {mode}\npodSelector: {{matchLabels: {{app: web}}}}\negress: [{eleven_rules}]"
        ))
    };
    for (name, uid, created, mode) in [
        ("a-new", "u-new", 200, "Enforce"),
        ("z-old", "u-old", 100, "Enforce"),
        ("b-same-second", "u-0", 100, "Enforce"),
        ("audit-oldest", "u-audit", 1, "Audit"),
    ] {
        c.upsert_policy(PolicyObject {
            created,
            ..policy("shop", name, uid, 1, spec(mode))
        });
    }
    let mut ranked = cfg(&mut c, "n1").rules;
    ranked.sort_by_key(|r| r.priority);
    let order: Vec<&str> = ranked.iter().map(|r| r.id.as_str()).collect();
    let ids = |name: &str| {
        (0..11)
            .map(|i| format!("shop/{name}/egress/{i}"))
            .collect::<Vec<_>>()
    };
    let expected: Vec<String> = [
        ids("b-same-second"), // created at 100, uid u-0
        ids("z-old"),         // created at 100, uid u-old
        ids("a-new"),
        ids("audit-oldest"),
    ]
    .concat();
    assert_eq!(order, expected, "index 10 after 2, older policies first");
    assert_eq!(
        ranked.iter().map(|r| r.priority).collect::<Vec<_>>(),
        (0..44).collect::<Vec<_>>()
    );
}

#[test]
fn deleting_things_cleans_up() {
    let mut c = shop();
    c.upsert_policy(policy(
        "shop",
        "p",
        "pu",
        1,
        pol("podSelector: {}\negress: [{}]"),
    ));
    c.upsert_observation("o", "ou", 1, obs("namespaces: [data]"));
    c.take_dirty_nodes();
    c.delete_policy("shop", "p");
    assert_eq!(c.take_dirty_nodes(), BTreeSet::from(["n1".to_string()]));
    assert!(cfg(&mut c, "n1").rules.is_empty());
    c.delete_observation("o");
    assert_eq!(c.take_dirty_nodes(), BTreeSet::from(["n2".to_string()]));
    c.delete_node("n2");
    assert!(c.node_config("n2").is_none());
}

/// A tiny deterministic generator (no external crates needed for a test).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// One of three Services of namespace `a`, with random ports and settings.
fn random_service(rng: &mut Lcg) -> crate::model::ServiceInfo {
    let k = rng.next(3);
    crate::model::ServiceInfo {
        namespace: "a".into(),
        name: format!("s{k}"),
        cluster_ips: match rng.next(4) {
            0 => Vec::new(),
            1 => vec![
                format!("10.96.0.{k}").parse().unwrap(),
                format!("fd00:96::{k}").parse().unwrap(),
            ],
            _ => vec![format!("10.96.0.{k}").parse().unwrap()],
        },
        external_ips: if rng.next(3) == 0 {
            vec!["203.0.113.1".parse().unwrap()]
        } else {
            Vec::new()
        },
        load_balancer_ips: Vec::new(),
        ports: vec![crate::model::ServicePortInfo {
            name: ["", "http"][rng.next(2) as usize].into(),
            port: 80,
            protocol: Protocol::Tcp,
            node_port: (rng.next(2) == 0).then_some(30080),
        }],
        node_ports: rng.next(2) == 0,
        client_affinity: rng.next(2) == 0,
        internal_local: rng.next(3) == 0,
    }
}

/// One of four EndpointSlices of namespace `a`, for a random Service.
fn random_slice(rng: &mut Lcg) -> crate::model::EndpointSliceInfo {
    let endpoints = (0..rng.next(4))
        .map(|_| crate::model::SliceEndpoint {
            addresses: vec![
                format!("10.{}.{}.{}", rng.next(3), rng.next(3), rng.next(250) + 1)
                    .parse()
                    .unwrap(),
            ],
            node: Some(format!("n{}", rng.next(3) + 1)),
        })
        .collect();
    crate::model::EndpointSliceInfo {
        namespace: "a".into(),
        name: format!("e{}", rng.next(4)),
        service: Some(format!("a/s{}", rng.next(3))),
        endpoints,
        ports: vec![crate::model::SlicePort {
            name: ["", "http"][rng.next(2) as usize].into(),
            port: 8080,
            protocol: Protocol::Tcp,
        }],
    }
}

/// The incremental compiler agrees with a bulk compile of the final state
/// after any sequence of events, and so does what a writer that recompiles
/// only the nodes marked dirty would have written.
#[test]
fn incremental_equals_bulk() {
    let mut frontends = 0;
    for seed in 1..=20u64 {
        let mut written: BTreeMap<String, Option<NodeAgentConfigSpec>> = BTreeMap::new();
        let mut rng = Lcg(seed);
        let mut inc = Compiler::new();
        let nss = ["a", "b", "c"];
        let apps = ["web", "api", "db"];
        for (i, n) in ["n1", "n2", "n3"].into_iter().enumerate() {
            let mut info = node(n, if n == "n3" { "z2" } else { "z1" });
            info.addresses = vec![format!("192.0.2.{i}").parse().unwrap()];
            inc.upsert_node(info);
        }
        for (i, n) in nss.iter().enumerate() {
            inc.upsert_namespace(ns(n, &[("team", if i == 0 { "x" } else { "y" })]));
        }
        inc.upsert_observation(
            "o1",
            "u1",
            1,
            obs("namespaceSelector: {matchLabels: {team: y}}\nkeepLabels: [app]"),
        );
        inc.upsert_policy(policy("a", "p1", "pu1", 1, pol("podSelector: {matchLabels: {app: web}}\negress: [{to: [{namespaceSelector: {matchLabels: {team: y}}, podSelector: {matchLabels: {app: db}}}], ports: [{port: 5432}]}]")));
        inc.upsert_policy(policy("b", "p2", "pu2", 1, pol("mode: Audit\npodSelector: {}\ningress: [{from: [{podSelector: {matchExpressions: [{key: app, operator: NotIn, values: [db]}]}}]}]")));
        for step in 0..300 {
            for n in inc.take_dirty_nodes() {
                let spec = inc.node_config(&n);
                written.insert(n, spec);
            }
            // As the writer does after each compile: sets are built (and
            // cached) as they are, so a stale cache would show below.
            inc.address_sets();
            match rng.next(14) {
                0..=5 => {
                    let n = nss[rng.next(3) as usize];
                    let name = format!("p{}", rng.next(12));
                    let nd = format!("n{}", rng.next(3) + 1);
                    let ip = if rng.next(5) == 0 {
                        String::new()
                    } else {
                        format!("10.{}.{}.{}", rng.next(3), rng.next(3), rng.next(250) + 1)
                    };
                    let mut p = pod(n, &name, &nd, &ip, &[("app", apps[rng.next(3) as usize])]);
                    p.host_network = rng.next(15) == 0;
                    inc.upsert_pod(p);
                }
                6 => {
                    let key = format!("{}/p{}", nss[rng.next(3) as usize], rng.next(12));
                    inc.delete_pod(&key);
                }
                7 => {
                    let n = nss[rng.next(3) as usize];
                    inc.upsert_namespace(ns(
                        n,
                        &[("team", if rng.next(2) == 0 { "x" } else { "y" })],
                    ));
                }
                8 => {
                    let app = apps[rng.next(3) as usize];
                    inc.upsert_policy(policy("c", "p3", "pu3", step, pol(&format!("podSelector: {{matchLabels: {{app: {app}}}}}\negress: [{{to: [{{namespaceSelector: {{}}}}]}}]"))));
                }
                10 => inc.upsert_service(random_service(&mut rng)),
                11 => inc.delete_service(&format!("a/s{}", rng.next(3))),
                12 => inc.upsert_endpoint_slice(random_slice(&mut rng)),
                13 => inc.delete_endpoint_slice(&format!("a/e{}", rng.next(4))),
                _ => {
                    inc.upsert_observation(
                        "o2",
                        "u2",
                        step,
                        obs(&format!(
                            "namespaces: [{}]\npodSelector: {{matchLabels: {{app: {}}}}}",
                            nss[rng.next(3) as usize],
                            apps[rng.next(3) as usize]
                        )),
                    );
                }
            }
        }
        // The same final state, loaded in bulk.
        let mut bulk = Compiler::new();
        bulk.begin_bulk();
        for n in inc.nodes.values() {
            bulk.upsert_node(n.clone());
        }
        for n in inc.namespaces.values() {
            bulk.upsert_namespace(n.clone());
        }
        for s in inc.services.values() {
            bulk.upsert_service(s.clone());
        }
        for s in inc.slices.values() {
            bulk.upsert_endpoint_slice(s.clone());
        }
        for p in inc.pods.values() {
            bulk.upsert_pod(p.clone());
        }
        for o in inc.observations.values() {
            bulk.upsert_observation(&o.name, &o.uid, o.generation, o.spec.clone().unwrap());
        }
        for p in inc.policies.values() {
            bulk.upsert_policy(PolicyObject {
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                uid: p.uid.clone(),
                created: p.created,
                generation: p.generation,
                spec: p.spec.clone().unwrap(),
                in_force: None,
            });
        }
        bulk.finish_bulk();
        for n in inc.take_dirty_nodes() {
            let spec = inc.node_config(&n);
            written.insert(n, spec);
        }
        for n in ["n1", "n2", "n3"] {
            let want = bulk.node_config(n);
            assert_eq!(inc.node_config(n), want, "seed {seed}, node {n}");
            assert_eq!(written[n], want, "seed {seed}, node {n}: as written");
            frontends += want.map_or(0, |w| w.services.len());
        }
        let slices = |c: &mut Compiler| -> BTreeMap<String, Vec<slices::Slice>> {
            c.address_sets()
                .into_iter()
                .map(|(name, set)| (name, set.slices.clone()))
                .collect()
        };
        assert_eq!(
            slices(&mut inc),
            slices(&mut bulk),
            "seed {seed}: address sets"
        );
    }
    assert!(frontends > 0, "the events reach Services");
}

#[test]
fn node_addresses_and_host_network_pods_resolve_to_their_node() {
    let mut c = shop();
    let mut n2 = node("n2", "b");
    n2.addresses = vec!["192.0.2.2".parse().unwrap()];
    c.upsert_node(n2);
    let mut hn = pod("kube-system", "exporter-1", "n1", "192.0.2.1", &[]);
    hn.host_network = true;
    c.upsert_pod(hn);
    let name = |c: &Compiler, ip: &str| {
        c.node_by_address(&ip.parse().unwrap())
            .map(|n| n.name.clone())
    };
    assert_eq!(name(&c, "192.0.2.2").as_deref(), Some("n2"));
    assert_eq!(
        name(&c, "192.0.2.1").as_deref(),
        Some("n1"),
        "a host-network pod"
    );
    assert_eq!(name(&c, "10.0.1.1"), None, "a pod's own address");
    assert!(c.pod_by_ip(&"192.0.2.1".parse().unwrap()).is_none());
    c.delete_pod("kube-system/exporter-1");
    assert_eq!(name(&c, "192.0.2.1"), None);
    c.upsert_node(node("n2", "b"));
    assert_eq!(name(&c, "192.0.2.2"), None, "the address is gone");
}

/// The entries of the address set `name`, as written for agents.
fn set_entries(c: &mut Compiler, name: &str) -> Vec<CidrEntry> {
    c.address_sets()
        .get(name)
        .unwrap_or_else(|| panic!("no address set {name}"))
        .entries()
}

#[test]
fn rules_with_the_same_peers_share_one_set_and_its_name_does_not_follow_content() {
    let mut c = shop();
    let to_db = "egress: [{to: [{namespaceSelector: {matchLabels: {team: data}}}]}]";
    c.upsert_policy(policy(
        "shop",
        "a",
        "ua",
        1,
        pol(&format!(
            "podSelector: {{matchLabels: {{app: web}}}}\n{to_db}"
        )),
    ));
    c.upsert_policy(policy(
        "data",
        "b",
        "ub",
        1,
        pol(&format!("podSelector: {{}}\n{to_db}")),
    ));
    c.upsert_policy(policy("shop", "own", "uc", 1, pol("podSelector: {matchLabels: {app: web}}\negress: [{to: [{podSelector: {matchLabels: {app: api}}}]}]")));
    let sets = c.address_sets();
    let n1 = cfg(&mut c, "n1");
    let named: BTreeSet<&String> = n1
        .rules
        .iter()
        .filter_map(|r| r.address_set.as_ref())
        .collect();
    assert_eq!(named.len(), 2, "{named:?}");
    let shared = &n1
        .rules
        .iter()
        .find(|r| r.policy.name == "a")
        .unwrap()
        .address_set;
    assert!(sets.contains_key(shared.as_ref().unwrap()));
    let n2 = cfg(&mut c, "n2");
    let b = n2.rules.iter().find(|r| r.policy.name == "b").unwrap();
    assert_eq!(
        &b.address_set, shared,
        "policy b in another namespace shares it"
    );
    // The same selector in another namespace selects other pods: another set.
    assert_ne!(
        set_name("shop", &[serde_yaml::from_str("podSelector: {}").unwrap()]),
        set_name("data", &[serde_yaml::from_str("podSelector: {}").unwrap()])
    );
    assert_eq!(
        set_name(
            "shop",
            &[serde_yaml::from_str("namespaceSelector: {}").unwrap()]
        ),
        set_name(
            "data",
            &[serde_yaml::from_str("namespaceSelector: {}").unwrap()]
        )
    );
}
