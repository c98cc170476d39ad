//! The report path from bytes to status, as the fuzz target `report`
//! (`fuzz/`) drives it: decoded as [`crate::collector`] decodes a body,
//! admitted ([`crate::collect::admission`]) against a small fixed cluster,
//! added to the books, merged and written to status as [`crate::finalize`]
//! and the status controllers do, with invariants asserted on the way.
//!
//! Built only under `cfg(fuzzing)` (cargo fuzz sets it) and in tests, which
//! run the checked-in corpus (`fuzz/corpus/report/`) through it.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
};

use flowlens_api::{
    FlowPolicyStatus, GroupBy,
    node_agent_config::WorkloadRef,
    report::{POLICY_WINDOW_SECONDS, ReportBatch},
};
use k8s_openapi::jiff::Timestamp;

use crate::{
    collect::{
        Directory, Timing,
        admission::{Admission, ObservationScope, Scope},
        merge::{MergeParams, WindowResult, merge},
        observation_book::ObservationBook,
        policy_book::{PolicyBook, PolicyKey},
    },
    compile::ObservationView,
    model::{NodeInfo, PodInfo},
    observation_status::observation_status,
    policy_status::write_policy_counts,
};

/// The operator's clock (ms): a multiple of every window length used.
pub const NOW_MS: i64 = 1_700_000_000_000;
/// The reporting node (the one the token names).
pub const NODE: &str = "a";
/// The observation tracing pods on [`NODE`] (10 s windows, maxSeries 4,
/// topN 3), and one tracing pods on node `b` only.
pub const OBSERVATION: &str = "u";
pub const OTHER_OBSERVATION: &str = "v";
const WINDOW_SECONDS: u32 = 10;
const MAX_SERIES: u32 = 4;
const TOP_N: u32 = 3;

/// Runs one report body through the collector, the books, the merge and the
/// status writers. Panics when an invariant does not hold.
pub fn report(body: &[u8]) {
    let Ok(batch) = serde_json::from_slice::<ReportBatch>(body) else {
        return; // 400
    };
    if batch.node != NODE {
        return; // 403: a node reports only for itself
    }
    let mut op = Operator::new();
    op.receive(baseline(), NOW_MS - 10_000);
    op.finalize();
    let before = op.totals();
    let refused = op.receive(batch, NOW_MS).is_none();
    let open_after_report = op.observations.open_parts();
    op.finalize();
    let after = op.totals();
    if refused {
        assert_eq!(open_after_report, 0, "a refused report stored parts");
        assert_eq!(before, after, "a refused report changed status");
    }
    assert!(
        after.covers(&before),
        "totals decreased: {before:?} -> {after:?}"
    );
}

/// The cluster: nodes `a` (zone z1) and `b` (zone z2); pod `ns/here`
/// (10.1.0.1) on `a` and `ns/there` (10.1.1.1) on `b`, both traced by
/// [`OBSERVATION`]; a host-network address of each node; policy `ns/p`
/// in force on `a`, `ns/q` on `b` only.
struct World {
    observations: BTreeMap<String, ObservationScope>,
    pods: HashMap<IpAddr, PodInfo>,
    nodes: HashMap<IpAddr, NodeInfo>,
    traced: HashSet<IpAddr>,
    zones: BTreeMap<String, String>,
    policies: BTreeSet<PolicyKey>,
    in_force_here: BTreeSet<PolicyKey>,
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("an IP")
}

impl World {
    fn new() -> Self {
        let scope = |on_node| ObservationScope {
            window_seconds: WINDOW_SECONDS,
            max_series: MAX_SERIES,
            on_node,
        };
        let mut w = World {
            observations: [
                (OBSERVATION.to_owned(), scope(true)),
                (OTHER_OBSERVATION.to_owned(), scope(false)),
            ]
            .into(),
            pods: HashMap::new(),
            nodes: HashMap::new(),
            traced: HashSet::new(),
            zones: [("a".into(), "z1".into()), ("b".into(), "z2".into())].into(),
            policies: [("ns".into(), "p".into()), ("ns".into(), "q".into())].into(),
            in_force_here: [("ns".into(), "p".into())].into(),
        };
        for (addr, node) in [("10.0.0.1", "a"), ("10.0.0.2", "b")] {
            let n = NodeInfo {
                name: node.into(),
                uid: node.into(),
                zone: w.zones.get(node).cloned(),
                addresses: vec![ip(addr)],
            };
            w.nodes.insert(ip(addr), n);
        }
        for (addr, name, node) in [("10.1.0.1", "here", "a"), ("10.1.1.1", "there", "b")] {
            let p = PodInfo {
                namespace: "ns".into(),
                name: name.into(),
                uid: name.into(),
                node: Some(node.into()),
                ips: vec![ip(addr)],
                labels: [("app".to_string(), name.to_string())].into(),
                host_network: false,
                workload: WorkloadRef {
                    kind: "Deployment".into(),
                    name: name.into(),
                },
                finished: false,
            };
            w.pods.insert(ip(addr), p);
            w.traced.insert(ip(addr));
        }
        w
    }

    /// The nodes an observation selects (for [`ObservationBook::take_final`]).
    fn selected(&self, uid: &str) -> BTreeSet<String> {
        match uid {
            OBSERVATION => ["a".to_string(), "b".to_string()].into(),
            _ => ["b".to_string()].into(),
        }
    }
}

impl Scope for World {
    fn observation(&self, uid: &str) -> Option<ObservationScope> {
        self.observations.get(uid).copied()
    }

    fn pod_node(&self, namespace: &str, name: &str) -> Option<Option<&str>> {
        self.pods
            .values()
            .find(|p| p.namespace == namespace && p.name == name)
            .map(|p| p.node.as_deref())
    }

    fn policy_on_node(&self, namespace: &str, name: &str) -> bool {
        self.in_force_here
            .contains(&(namespace.to_owned(), name.to_owned()))
    }
}

impl Directory for World {
    fn pod(&self, ip: &IpAddr) -> Option<&PodInfo> {
        self.pods.get(ip)
    }

    fn node(&self, ip: &IpAddr) -> Option<&NodeInfo> {
        self.nodes.get(ip)
    }

    fn traced(&self, ip: &IpAddr) -> bool {
        self.traced.contains(ip)
    }

    fn zone(&self, node: &str) -> Option<&str> {
        self.zones.get(node).map(String::as_str)
    }
}

/// What status shows: the observation's totals and each policy's counters.
#[derive(Clone, Debug, Default, PartialEq)]
struct Totals {
    windows: u64,
    packets: u64,
    bytes: u64,
    payload_bytes: u64,
    cross_zone_bytes: u64,
    /// Policy -> (blocked packets, blocked connections, audited packets,
    /// audited connections).
    policies: BTreeMap<PolicyKey, [u64; 4]>,
}

impl Totals {
    /// Every figure of `self` is at least `before`'s.
    fn covers(&self, before: &Totals) -> bool {
        let observation = self.windows >= before.windows
            && self.packets >= before.packets
            && self.bytes >= before.bytes
            && self.payload_bytes >= before.payload_bytes
            && self.cross_zone_bytes >= before.cross_zone_bytes;
        observation
            && before.policies.iter().all(|(k, b)| {
                self.policies
                    .get(k)
                    .is_some_and(|a| a.iter().zip(b).all(|(a, b)| a >= b))
            })
    }
}

/// The collector's books and the status they end in.
struct Operator {
    world: World,
    admission: Admission,
    observations: ObservationBook,
    policies: PolicyBook,
    observation_status: flowlens_api::network_observation::NetworkObservationStatus,
    policy_status: BTreeMap<PolicyKey, FlowPolicyStatus>,
}

impl Operator {
    fn new() -> Self {
        let timing = Timing {
            started_ms: 0,
            startup_grace_ms: 0,
            grace_ms: 5_000,
        };
        Operator {
            world: World::new(),
            admission: Admission::new(),
            observations: ObservationBook::new(timing),
            policies: PolicyBook::new(timing, POLICY_WINDOW_SECONDS),
            observation_status: Default::default(),
            policy_status: BTreeMap::new(),
        }
    }

    /// Admits a batch and adds what is admitted to the books, as the report
    /// endpoint does. `None`: the batch is refused (422).
    fn receive(&mut self, batch: ReportBatch, now_ms: i64) -> Option<()> {
        let (windows, policy_windows) = (batch.windows.len(), batch.policy_windows.len());
        let agent = batch.agent.clone();
        let admitted = self
            .admission
            .admit(&self.world, NODE, batch, now_ms)
            .ok()?;
        let dropped = |prefix: &str| {
            admitted
                .dropped
                .iter()
                .filter(|r| r.field.starts_with(prefix) && !r.field.contains(".policies["))
                .count()
        };
        assert_eq!(
            admitted.windows.len() + dropped("windows["),
            windows,
            "every window is admitted or dropped, once: {:?}",
            admitted.dropped
        );
        assert_eq!(
            admitted.policy_windows.len() + dropped("policyWindows["),
            policy_windows,
            "every policy window is admitted or dropped, once: {:?}",
            admitted.dropped
        );
        let now_s = now_ms.div_euclid(1000);
        for w in &admitted.windows {
            assert!(w.window_seconds > 0 && w.start % i64::from(w.window_seconds) == 0);
            assert!(w.start <= now_s + crate::collect::admission::CLOCK_SKEW_S);
            if let Some(o) = self.world.observations.get(&w.uid) {
                assert_eq!(w.window_seconds, o.window_seconds);
                assert!(w.series.len() as u64 <= u64::from(o.max_series) + 1);
                for s in &w.series {
                    assert!(s.local.node.as_deref().is_none_or(|n| n == NODE));
                    if let (Some(ns), Some(pod)) = (&s.local.namespace, &s.local.pod) {
                        let on = self.world.pod_node(ns, pod).flatten();
                        assert!(on.is_none_or(|n| n == NODE), "a foreign pod admitted");
                    }
                }
            }
        }
        for w in &admitted.policy_windows {
            for p in &w.policies {
                assert!(
                    self.world
                        .in_force_here
                        .contains(&(p.namespace.clone(), p.name.clone())),
                    "counters of a policy not in force admitted"
                );
            }
        }
        for w in admitted.windows {
            // Unknown observations are answered as gone, not stored.
            if self.world.observations.contains_key(&w.uid) {
                self.observations.track(&w.uid, 0);
                self.observations.add(NODE, &agent, w, now_ms);
            }
        }
        for w in admitted.policy_windows {
            self.policies.add(NODE, &agent, w, now_ms);
        }
        Some(())
    }

    /// Takes every open window as final (their deadlines all passed), merges
    /// them and writes status.
    fn finalize(&mut self) {
        let now = i64::MAX;
        let selected: BTreeMap<String, BTreeSet<String>> = self
            .world
            .observations
            .keys()
            .map(|uid| (uid.clone(), self.world.selected(uid)))
            .collect();
        let finals = self.observations.take_final(now, |uid| selected.get(uid));
        assert_eq!(self.observations.open_parts(), 0);
        let group_by = [GroupBy::Namespace, GroupBy::Workload, GroupBy::Zone];
        let keep_labels = ["app".to_string()];
        let params = MergeParams {
            group_by: &group_by,
            keep_labels: &keep_labels,
            top_n: TOP_N as usize,
            max_series: MAX_SERIES as usize,
        };
        let mut results: Vec<WindowResult> = Vec::new();
        for w in finals.iter().filter(|w| w.uid == OBSERVATION) {
            let r = merge(w.start, w.end, &w.parts, &params, &self.world);
            assert_eq!(
                r,
                merge(w.start, w.end, &w.parts, &params, &self.world),
                "merge is deterministic"
            );
            check_result(&r, w.parts.len());
            results.push(r);
        }
        if !results.is_empty() {
            let view = ObservationView {
                generation: 1,
                spec_generation: 1,
                window_seconds: WINDOW_SECONDS,
                selected_nodes: self.world.selected(OBSERVATION),
                traced_pods: 2,
                ..Default::default()
            };
            self.observation_status = observation_status(
                OBSERVATION,
                &view,
                &BTreeMap::<String, Arc<flowlens_api::NodeAgentConfig>>::new(),
                &results,
                &self.observation_status,
                Timestamp::from_second(NOW_MS / 1000).expect("a timestamp"),
            );
        }
        let mut deltas: BTreeMap<PolicyKey, Vec<_>> = BTreeMap::new();
        for (key, d) in self.policies.take_final(now) {
            assert!(self.world.in_force_here.contains(&key));
            assert_eq!(d.nodes, 1, "only {NODE} reports");
            if self.world.policies.contains(&key) {
                deltas.entry(key).or_default().push(d);
            }
        }
        for (key, d) in deltas {
            write_policy_counts(&d, self.policy_status.entry(key).or_default());
        }
    }

    fn totals(&self) -> Totals {
        let t = self.observation_status.total.clone().unwrap_or_default();
        Totals {
            windows: t.windows,
            packets: t.packets,
            bytes: t.bytes,
            payload_bytes: t.payload_bytes,
            cross_zone_bytes: t.cross_zone_bytes,
            policies: self
                .policy_status
                .iter()
                .map(|(k, s)| {
                    let b = s.blocked.clone().unwrap_or_default();
                    let a = s.audited.clone().unwrap_or_default();
                    (
                        k.clone(),
                        [b.packets, b.connections, a.packets, a.connections],
                    )
                })
                .collect(),
        }
    }
}

/// What status promises of a merged window.
fn check_result(r: &WindowResult, parts: usize) {
    assert!(r.end > r.start);
    assert!(r.series <= r.max_series, "{} series kept", r.series);
    assert!(r.top_flows.len() <= TOP_N as usize);
    assert!(r.nodes_reporting as usize <= parts);
    if let Some(l) = &r.latency {
        assert!(l.p50_micros <= l.p95_micros && l.p95_micros <= l.p99_micros);
    }
    for f in &r.top_flows {
        if let (Some(p50), Some(p99)) = (f.rtt_p50_micros, f.rtt_p99_micros) {
            assert!(p50 <= p99);
        }
    }
}

/// An earlier window from [`NODE`], already in status when the fuzzed
/// report arrives.
fn baseline() -> ReportBatch {
    serde_json::from_value(serde_json::json!({
        "node": NODE,
        "agent": "x0",
        "windows": [{
            "observation": "o", "uid": OBSERVATION, "generation": 1,
            "start": NOW_MS / 1000 - 30, "windowSeconds": WINDOW_SECONDS,
            "complete": true, "foldedSeries": 0, "part": 1,
            "series": [{
                "local": {"namespace": "ns", "workload": "Deployment/here"},
                "remote": "10.1.1.1", "port": 80, "protocol": 6, "role": "Client",
                "flows": 2,
                "tx": {"packets": 10, "bytes": 5000, "payloadBytes": 4480},
                "rx": {"packets": 8, "bytes": 9000, "payloadBytes": 8584}
            }]
        }],
        "policyWindows": [{
            "start": NOW_MS / 1000 - 30, "windowSeconds": 10,
            "policies": [{
                "namespace": "ns", "name": "p",
                "blocked": {"packets": 3, "connections": 1},
                "audited": {"packets": 0, "connections": 0}
            }]
        }]
    }))
    .expect("the baseline report")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/report")
    }

    fn seed(name: &str) -> ReportBatch {
        serde_json::from_slice(&std::fs::read(corpus().join(name)).unwrap()).unwrap()
    }

    /// Every input of the checked-in corpus (seeds and the crashes found),
    /// and the baseline alone.
    #[test]
    fn the_corpus_passes() {
        report(&serde_json::to_vec(&baseline()).unwrap());
        let mut n = 0;
        for e in std::fs::read_dir(corpus()).unwrap() {
            report(&std::fs::read(e.unwrap().path()).unwrap());
            n += 1;
        }
        assert!(n > 0, "no corpus in {}", corpus().display());
    }

    /// The seeds reach status (the world lets a truthful report through).
    #[test]
    fn a_seed_reaches_status() {
        let mut op = Operator::new();
        op.receive(baseline(), NOW_MS - 10_000).unwrap();
        op.finalize();
        op.receive(seed("seed-both.json"), NOW_MS).unwrap();
        op.finalize();
        let t = op.totals();
        assert_eq!(t.windows, 3, "the baseline's window and two more");
        assert_eq!(t.policies[&("ns".into(), "p".into())], [4, 2, 1, 1]);
        assert!(t.bytes > 0);
        assert!(
            op.receive(seed("seed-refused-misaligned.json"), NOW_MS)
                .is_none()
        );
    }
}
