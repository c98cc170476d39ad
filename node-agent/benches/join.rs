//! What a node does when a slice of its address sets changes (`just bench`,
//! or `cargo bench -p flowlens-agent --bench join`): the config joined with
//! every slice of its sets, then the kernel tables compiled, both whole.
//!
//! The node of issue 12's namespace-wide shape at full size, dual-stack:
//! 50 local pods, each the target of 10 policies whose peers are a team of
//! 5,000 pods (10,000 addresses, 10 slices of 1,000); 10 teams, so 100,000
//! peer addresses in 100 slices.

use std::time::Instant;

use flowlens_agent::{address_sets::read_slice, bench::join_and_compile};
use flowlens_api::{AddressSetSliceSpec, NodeAgentConfigSpec};

const LOCAL_PODS: usize = 50;
const TEAMS: usize = 10;
const TEAM_PODS: usize = 5000;
const SLICE_PODS: usize = 500;
const RUNS: usize = 10;

fn spec() -> NodeAgentConfigSpec {
    let endpoints: Vec<_> = (0..LOCAL_PODS)
        .map(|i| {
            serde_json::json!({
                "namespace": "local", "pod": format!("p{i}"), "uid": format!("u{i}"),
                "workload": {"kind": "Deployment", "name": "app"},
                "ips": [format!("10.250.0.{i}"), format!("fd00:250::{i:x}")],
            })
        })
        .collect();
    let rules: Vec<_> = (0..TEAMS)
        .map(|t| {
            serde_json::json!({
                "id": format!("local/deny-{t}/egress/0"),
                "policy": {"namespace": "local", "name": format!("deny-{t}"), "revision": "r"},
                "direction": "Egress", "mode": "Enforce",
                "endpoints": (0..LOCAL_PODS).map(|i| format!("local/p{i}")).collect::<Vec<_>>(),
                "anyPeer": false, "addressSet": format!("as-team-{t}"),
                "ports": [{"protocol": "TCP", "first": 5432, "last": 5432}],
                "priority": t,
            })
        })
        .collect();
    serde_json::from_value(serde_json::json!({
        "nodeName": "n", "revision": "r", "endpoints": endpoints, "rules": rules,
    }))
    .expect("a valid config")
}

fn slices() -> Vec<flowlens_agent::address_sets::ReadSlice> {
    let mut out = Vec::new();
    for t in 0..TEAMS {
        for s in 0..TEAM_PODS / SLICE_PODS {
            let addresses = (0..SLICE_PODS)
                .flat_map(|i| {
                    let n = t * TEAM_PODS + s * SLICE_PODS + i;
                    [
                        format!("10.{}.{}.{}", 1 + n / 65536, (n / 256) % 256, n % 256),
                        format!("fd00:{:x}::{:x}", 1 + n / 65536, n % 65536),
                    ]
                })
                .collect();
            let set = format!("as-team-{t}");
            let spec = AddressSetSliceSpec {
                address_set: set.clone(),
                addresses,
                blocks: Vec::new(),
            };
            out.push(read_slice(&format!("{set}-4-{s:x}"), Some(&set), spec));
        }
    }
    out
}

fn main() {
    let spec = spec();
    let slices = slices();
    let mut times = Vec::new();
    let mut entries = 0;
    for _ in 0..RUNS {
        let started = Instant::now();
        let (n, problems) = join_and_compile(&spec, &slices);
        times.push(started.elapsed().as_secs_f64() * 1e3);
        assert_eq!(problems, 0, "the config compiles without problems");
        entries = n;
    }
    times.sort_by(f64::total_cmp);
    println!(
        "join + compile, {LOCAL_PODS} local pods x {TEAMS} rules, {} slices of {} addresses ({} peer addresses): {entries} policy-table entries, median {:.1} ms, max {:.1} ms ({RUNS} runs)",
        slices.len(),
        2 * SLICE_PODS,
        slices.len() * 2 * SLICE_PODS,
        times[RUNS / 2],
        times[RUNS - 1],
    );
}
