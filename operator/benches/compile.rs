//! Compiler benchmark (`just bench`, or `cargo bench -p flowlens-operator --bench compile`):
//!
//! (b) a full compile of 100 nodes x 10,000 pods x 200 policies (goal
//!     < 200 ms, operator RSS < 150 MB);
//! (c) what one pod change recompiles (goal: only the affected nodes).
//!
//! The cluster is synthetic but shaped like a real one: 100 namespaces of
//! 100 pods in 20 apps, 2 policies per namespace (a pod selector, an egress
//! rule to an app in the namespaces of a team, an ingress rule from an app),
//! 10 observations selecting namespaces by team.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    time::Instant,
};

use flowlens_api::{FlowPolicySpec, NetworkObservationSpec, node_agent_config::WorkloadRef};
use flowlens_operator::{
    compile::{Compiler, PolicyObject},
    model::{NamespaceInfo, NodeInfo, PodInfo},
};

const NODES: usize = 100;
const NAMESPACES: usize = 100;
const PODS_PER_NAMESPACE: usize = 100;
const APPS: usize = 20;
const TEAMS: usize = 10;

fn pod(ns: usize, i: usize) -> PodInfo {
    let n = ns * PODS_PER_NAMESPACE + i;
    PodInfo {
        namespace: format!("ns-{ns}"),
        name: format!("app{}-{i}", i % APPS),
        uid: format!("uid-{n}"),
        node: Some(format!("node-{}", n % NODES)),
        ips: vec![IpAddr::V4(Ipv4Addr::new(
            10,
            (n / 65536) as u8,
            ((n / 256) % 256) as u8,
            (n % 256) as u8,
        ))],
        labels: BTreeMap::from([
            ("app".to_string(), format!("app{}", i % APPS)),
            (
                "tier".to_string(),
                if i.is_multiple_of(2) {
                    "front".into()
                } else {
                    "back".into()
                },
            ),
            ("pod-template-hash".to_string(), "abc".into()),
        ]),
        host_network: false,
        workload: WorkloadRef {
            kind: "Deployment".into(),
            name: format!("app{}", i % APPS),
        },
        finished: false,
    }
}

fn policy(k: usize) -> FlowPolicySpec {
    serde_yaml::from_str(&format!(
        "podSelector: {{matchLabels: {{app: app{a}}}}}\n\
         egress: [{{to: [{{namespaceSelector: {{matchLabels: {{team: t{t}}}}}, podSelector: {{matchLabels: {{app: app{b}}}}}}}], ports: [{{port: 5432}}, {{port: 6379}}]}}]\n\
         ingress: [{{from: [{{podSelector: {{matchLabels: {{app: app{c}}}}}}}], ports: [{{port: 8080}}]}}]",
        a = k % APPS,
        t = k % TEAMS,
        b = (k + 1) % APPS,
        c = (k + 2) % APPS
    ))
    .unwrap()
}

fn load() -> Compiler {
    let mut c = Compiler::new();
    c.begin_bulk();
    for n in 0..NODES {
        c.upsert_node(NodeInfo {
            name: format!("node-{n}"),
            uid: format!("n{n}"),
            zone: Some(format!("zone-{}", n % 3)),
            addresses: Vec::new(),
        });
    }
    for ns in 0..NAMESPACES {
        c.upsert_namespace(NamespaceInfo {
            name: format!("ns-{ns}"),
            labels: BTreeMap::from([("team".to_string(), format!("t{}", ns % TEAMS))]),
        });
        for i in 0..PODS_PER_NAMESPACE {
            c.upsert_pod(pod(ns, i));
        }
    }
    for k in 0..NAMESPACES * 2 {
        c.upsert_policy(PolicyObject {
            namespace: format!("ns-{}", k / 2),
            name: format!("p{k}"),
            uid: format!("pu{k}"),
            created: k as i64,
            generation: 1,
            spec: policy(k),
            in_force: None,
        });
    }
    for o in 0..TEAMS {
        let spec: NetworkObservationSpec = serde_yaml::from_str(&format!(
            "namespaceSelector: {{matchLabels: {{team: t{o}}}}}\nkeepLabels: [app]"
        ))
        .unwrap();
        c.upsert_observation(&format!("obs-{o}"), &format!("ou{o}"), 1, spec);
    }
    c
}

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(|l| l.split_whitespace().nth(1).unwrap().parse::<f64>().unwrap() / 1024.0)
        })
        .unwrap_or(f64::NAN)
}

fn main() {
    let runs = 5;
    let mut totals = Vec::new();
    let mut c = Compiler::new();
    let mut kernel_entries = 0usize;
    let mut slices = 0usize;
    for _ in 0..runs {
        let started = Instant::now();
        c = load();
        c.finish_bulk();
        let nodes: Vec<String> = c.take_dirty_nodes().into_iter().collect();
        let mut configs = Vec::with_capacity(nodes.len());
        for n in &nodes {
            configs.push(c.node_config(n).unwrap());
        }
        // And the address sets the configs name, cut into slices.
        slices = c.address_sets().values().map(|s| s.slice_count()).sum();
        let t = started.elapsed().as_secs_f64() * 1000.0;
        totals.push(t);
        kernel_entries = configs.iter().map(|s| s.rules.len()).sum();
        assert_eq!(configs.len(), NODES);
    }
    totals.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let median = totals[runs / 2];
    let rss = peak_rss_mb();

    // (c) One pod change: a pod that is a peer of some rules and traced.
    let mut p = pod(3, 1);
    p.ips = vec!["10.250.250.1".parse().unwrap()];
    let t0 = Instant::now();
    c.upsert_pod(p);
    let dirty = c.take_dirty_nodes();
    for n in &dirty {
        c.node_config(n).unwrap();
    }
    // The sets holding it are built again.
    c.address_sets();
    let one_pod_ms = t0.elapsed().as_secs_f64() * 1000.0;
    // A pod nobody selects for anything.
    let mut lone = pod(4, 2);
    lone.labels = BTreeMap::from([("app".to_string(), "unselected".to_string())]);
    lone.namespace = "ns-unobserved".into();
    c.upsert_pod(lone);
    let unrelated = c.take_dirty_nodes().len();

    println!("| measure | result | goal |");
    println!("|---|---|---|");
    println!(
        "| full compile: 100 nodes, 10,000 pods, 200 policies, 10 observations, and {slices} address set slices (median of {runs}) | {median:.0} ms | < 200 ms |"
    );
    println!("| peak RSS of the process holding that state | {rss:.0} MB | < 150 MB |");
    println!(
        "| one peer pod's IP changes: nodes recompiled (its sets built again) | {} of {NODES} ({one_pod_ms:.1} ms) | only affected |",
        dirty.len()
    );
    println!("| an unselected pod appears: nodes recompiled | {unrelated} of {NODES} | 0 |");
    println!(
        "{{\"bench\":\"compile\",\"median_ms\":{median:.1},\"peak_rss_mb\":{rss:.1},\"one_pod_nodes\":{},\"one_pod_ms\":{one_pod_ms:.2},\"unrelated_nodes\":{unrelated},\"rules\":{kernel_entries}}}",
        dirty.len()
    );
}
