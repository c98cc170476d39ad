//! `kill -9` of the agent: enforcement and counting never stop, live
//! connections are not reset, and the restarted agent adopts its pins.

use std::{
    collections::BTreeMap,
    process::Stdio,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use flowlens_api::{
    flow_policy::{PolicyMode, Protocol},
    node_agent_config::{Direction, NodeAgentConfigSpec},
    report::ObservationWindow,
};
use flowlens_e2e::{
    agent::Agent,
    config::SpecBuilder,
    process::{Proc, workspace_bin},
    topology::Topology,
    traffic::echo_server,
};
use serde_json::Value;

fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Link pin name -> kernel link id, read with bpftool.
fn pinned_links(root: &std::path::Path) -> BTreeMap<String, u64> {
    let dir = root
        .join(flowlens_agent::datapath::pins::LAYOUT_VERSION)
        .join("links");
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let o = std::process::Command::new("bpftool")
            .args(["link", "show", "pinned"])
            .arg(e.path())
            .arg("-j")
            .output()
            .unwrap();
        let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
        out.insert(
            e.file_name().to_string_lossy().into_owned(),
            v["id"].as_u64().unwrap_or(0),
        );
    }
    out
}

/// Pods `a` and `b` on one node, echo servers on `b`:80 and `b`:5432, and a
/// config that traces `a` and blocks `a` -> `b`:5432.
struct DbBlocked {
    topo: Topology,
    n: usize,
    a: usize,
    b: usize,
    spec: NodeAgentConfigSpec,
    _servers: [Proc; 2],
}

fn db_blocked() -> DbBlocked {
    let mut topo = Topology::new();
    let n = topo.add_node("n1", None);
    let a = topo.add_pod(n, "a");
    let b = topo.add_pod(n, "b");
    let servers = [echo_server(&topo, b, 80), echo_server(&topo, b, 5432)];
    let peer = format!("{}/32", topo.pods[b].ip4);
    let spec = SpecBuilder::new(&topo, n)
        .trace("obs", 5, &[a])
        .rule(
            "no-db",
            Direction::Egress,
            PolicyMode::Enforce,
            &[a],
            &[&peer],
            &[(Protocol::Tcp, 5432, 5432)],
        )
        .build();
    DbBlocked {
        topo,
        n,
        a,
        b,
        spec,
        _servers: servers,
    }
}

#[test]
fn kill_9_keeps_blocking_keeps_streams_and_loses_no_count() {
    let s = db_blocked();
    let (topo, n, a, b, spec) = (&s.topo, s.n, s.a, s.b, &s.spec);
    let traffic = workspace_bin("flowlens-traffic");
    let mut agent = Agent::standalone(topo, n, spec, &[]);
    let links_before = pinned_links(&agent.bpffs_root);
    assert_eq!(
        links_before.keys().filter(|k| k.starts_with("tc_")).count(),
        2,
        "{links_before:?}"
    );

    let from = now_s() - now_s() % 5;
    let b4 = topo.pods[b].ip4;
    let mut stream = topo.pod_cmd(
        a,
        &traffic,
        &[
            "stream",
            "--to",
            &format!("{b4}:80"),
            "--duration-ms",
            "9000",
            "--chunk",
            "1000",
            "--interval-ms",
            "10",
        ],
    );
    stream.stdout(Stdio::piped());
    let stream = stream.spawn().unwrap();
    let mut blocked = topo.pod_cmd(
        a,
        &traffic,
        &[
            "connect-loop",
            "--to",
            &format!("{b4}:5432"),
            "--interval-ms",
            "10",
            "--duration-ms",
            "9000",
            "--timeout-ms",
            "50",
        ],
    );
    blocked.stdout(Stdio::piped());
    let blocked = blocked.spawn().unwrap();

    std::thread::sleep(Duration::from_millis(2500));
    let before_kill = agent.dump().unwrap();
    agent.kill9();
    std::thread::sleep(Duration::from_secs(3));
    agent.restart(topo);
    agent.wait_revision(&spec.revision, Duration::from_secs(30));
    // TC and cgroup links are adopted in place (same kernel link). Perf-event
    // links (tracepoints) cannot change program, so those are re-attached.
    let adoptable = |m: &BTreeMap<String, u64>| {
        m.iter()
            .filter(|(k, _)| !k.starts_with("tp_"))
            .map(|(k, v)| (k.clone(), *v))
            .collect::<BTreeMap<_, _>>()
    };
    let links_after = pinned_links(&agent.bpffs_root);
    assert_eq!(
        adoptable(&links_before),
        adoptable(&links_after),
        "the restarted agent must adopt the pinned links, not attach new ones"
    );
    assert_eq!(links_before.len(), links_after.len());

    let s: Value = serde_json::from_slice(&stream.wait_with_output().unwrap().stdout).unwrap();
    let c: Value = serde_json::from_slice(&blocked.wait_with_output().unwrap().stdout).unwrap();
    println!("blocked connects while the agent was killed and restarted: {c}");
    println!("long-lived stream: {s}");
    assert_eq!(c["successes"], 0, "a blocked connection got through");
    assert!(c["attempts"].as_u64().unwrap() > 300);
    assert_eq!(s["ok"], true, "the allowed stream was broken: {s}");

    // Every byte of the stream is counted exactly once across both agents.
    let after = agent.windows("obs", from, now_s() + 1, Duration::from_secs(20));
    let mut parts: Vec<ObservationWindow> = before_kill
        .history
        .into_iter()
        .filter(|w| w.uid == "obs" && w.start >= from)
        .collect();
    parts.extend(after);
    let counted: u64 = parts
        .iter()
        .flat_map(|w| &w.series)
        .filter(|x| x.port == 80 && x.remote.as_deref() == Some(&b4.to_string()))
        .map(|x| x.tx.payload_bytes)
        .sum();
    let sent = s["bytes"].as_u64().unwrap();
    println!("stream payload sent {sent} bytes; counted across the kill {counted} bytes");
    assert_eq!(
        counted, sent,
        "bytes lost or double counted across the restart"
    );
}

/// An upgrade: the pins of an older layout (here: this agent's own, renamed
/// to `v1`) keep enforcing until the new agent enforces its first config,
/// then they are removed and their programs detach.
#[test]
fn a_new_layout_takes_over_and_removes_the_old_one() {
    let s = db_blocked();
    let (topo, n, a, b, spec) = (&s.topo, s.n, s.a, s.b, &s.spec);
    let traffic = workspace_bin("flowlens-traffic");
    let mut agent = Agent::standalone(topo, n, spec, &[]);
    let old_links: Vec<u64> = pinned_links(&agent.bpffs_root).into_values().collect();
    assert!(!old_links.is_empty());
    agent.kill9();
    let root = agent.bpffs_root.clone();
    let current = root.join(flowlens_agent::datapath::pins::LAYOUT_VERSION);
    std::fs::rename(&current, root.join("v1")).expect("renaming a bpffs directory");

    agent.restart(topo);
    agent.wait_revision(&spec.revision, Duration::from_secs(30));
    assert!(!root.join("v1").exists(), "the old layout is removed");
    let new_links: Vec<u64> = pinned_links(&root).into_values().collect();
    assert!(!new_links.is_empty());
    // The old links are gone from the kernel, not only from bpffs.
    let out = std::process::Command::new("bpftool")
        .args(["link", "show", "-j"])
        .output()
        .unwrap();
    let live: Vec<u64> = serde_json::from_slice::<Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l["id"].as_u64())
        .collect();
    let lingering: Vec<&u64> = old_links.iter().filter(|id| live.contains(id)).collect();
    assert!(
        lingering.is_empty(),
        "old links still attached: {lingering:?}"
    );
    // And the rule is still enforced (by the new programs).
    let to = format!("{}:5432", topo.pods[b].ip4);
    let out = topo.pod_output(
        a,
        &traffic,
        &[
            "connect-loop",
            "--to",
            &to,
            "--duration-ms",
            "200",
            "--interval-ms",
            "20",
        ],
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["successes"], 0, "{r}");
    assert!(r["attempts"].as_u64().unwrap() > 0);
}
