//! Blocking on the real kernel: what a rule blocks, what it lets through,
//! Audit, removal, IPv6, and config swaps without a gap.

use std::time::{Duration, Instant};

use flowlens_api::{
    flow_policy::{PolicyMode, Protocol},
    node_agent_config::Direction,
};
use flowlens_e2e::{
    agent::Agent,
    config::SpecBuilder,
    process::{Proc, wait_for, workspace_bin},
    topology::Topology,
};
use serde_json::Value;

const TCP: Protocol = Protocol::Tcp;

fn echo(topo: &Topology, pod: usize, port: u16) -> Proc {
    Proc::spawn(
        "echo",
        topo.pod_cmd(
            pod,
            workspace_bin("flowlens-traffic"),
            &["echo-server", "--port", &port.to_string()],
        ),
        None,
    )
}

fn addr(ip: impl std::fmt::Display, port: u16) -> String {
    let s = ip.to_string();
    if s.contains(':') {
        format!("[{s}]:{port}")
    } else {
        format!("{s}:{port}")
    }
}

/// Runs the connect loop from `pod` to `to` and returns its JSON summary.
fn connect_loop(topo: &Topology, pod: usize, to: &str, duration_ms: u64, timeout_ms: u64) -> Value {
    let out = topo.pod_output(
        pod,
        workspace_bin("flowlens-traffic"),
        &[
            "connect-loop",
            "--to",
            to,
            "--interval-ms",
            "10",
            "--duration-ms",
            &duration_ms.to_string(),
            "--timeout-ms",
            &timeout_ms.to_string(),
        ],
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "connect-loop: {e}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn connects(topo: &Topology, pod: usize, to: &str) -> bool {
    connect_loop(topo, pod, to, 1, 500)["successes"].as_u64() == Some(1)
}

struct Setup {
    topo: Topology,
    a: usize,
    b: usize,
    c: usize,
    _servers: Vec<Proc>,
}

fn setup() -> Setup {
    let mut topo = Topology::new();
    let n = topo.add_node("n1", None);
    let a = topo.add_pod(n, "a");
    let b = topo.add_pod(n, "b");
    let c = topo.add_pod(n, "c");
    let servers = vec![
        echo(&topo, b, 5432),
        echo(&topo, b, 80),
        echo(&topo, c, 5432),
        echo(&topo, a, 9000),
    ];
    std::thread::sleep(Duration::from_millis(200));
    Setup {
        topo,
        a,
        b,
        c,
        _servers: servers,
    }
}

fn b_ips(s: &Setup) -> [String; 2] {
    [
        format!("{}/32", s.topo.pods[s.b].ip4),
        format!("{}/128", s.topo.pods[s.b].ip6),
    ]
}

#[test]
fn a_port_rule_blocks_its_connections_at_connect_time_and_nothing_else() {
    let s = setup();
    let (topo, a, b, c) = (&s.topo, s.a, s.b, s.c);
    let peers = b_ips(&s);
    let spec = SpecBuilder::new(topo, 0)
        .trace("obs", 5, &[a, b, c])
        .rule(
            "no-db",
            Direction::Egress,
            PolicyMode::Enforce,
            &[a],
            &[&peers[0], &peers[1]],
            &[(TCP, 5432, 5432)],
        )
        .build();
    let agent = Agent::standalone(topo, 0, &spec, &[]);
    assert_eq!(
        agent.dump().unwrap().hooks.connect,
        "cgroup/connect4+connect6+sendmsg4+sendmsg6+getpeername4+getpeername6+recvmsg4+recvmsg6"
    );

    // Blocked: rejected by connect() itself (EPERM), at once.
    let started = Instant::now();
    let r = connect_loop(topo, a, &addr(topo.pods[b].ip4, 5432), 300, 2000);
    let elapsed = started.elapsed();
    println!("a -> b:5432 (IPv4): {r} in {elapsed:?}");
    assert_eq!(r["successes"], 0);
    assert_eq!(
        r["denied"], r["attempts"],
        "every attempt rejected at connect(): {r}"
    );
    assert!(
        elapsed < Duration::from_secs(2),
        "rejections must be immediate, not SYN timeouts"
    );
    let r6 = connect_loop(topo, a, &addr(topo.pods[b].ip6, 5432), 100, 2000);
    assert_eq!(
        (r6["successes"].as_u64(), r6["denied"] == r6["attempts"]),
        (Some(0), true),
        "IPv6: {r6}"
    );

    // Allowed: another port of b, the same port of c, and over IPv6.
    assert!(connects(topo, a, &addr(topo.pods[b].ip4, 80)));
    assert!(connects(topo, a, &addr(topo.pods[c].ip4, 5432)));
    assert!(connects(topo, a, &addr(topo.pods[b].ip6, 80)));

    let blocked = wait_for(Duration::from_secs(5), || {
        agent
            .dump()
            .map(|d| d.policy("test", "no-db"))
            .filter(|m| m.blocked.connections > 0)
    })
    .unwrap();
    let attempts = r["attempts"].as_u64().unwrap() + r6["attempts"].as_u64().unwrap();
    println!("policy counters: {blocked:?} for {attempts} attempts");
    assert_eq!(blocked.blocked.connections, attempts);
    assert_eq!(blocked.audited.packets, 0);
}

#[test]
fn without_cgroups_the_tc_programs_drop_and_count_syns() {
    let s = setup();
    let (topo, a, b) = (&s.topo, s.a, s.b);
    let peers = b_ips(&s);
    let spec = SpecBuilder::new(topo, 0)
        .rule(
            "no-db",
            Direction::Egress,
            PolicyMode::Enforce,
            &[a],
            &[&peers[0], &peers[1]],
            &[(TCP, 5432, 5432)],
        )
        .build();
    let agent = Agent::standalone(topo, 0, &spec, &["--cgroup-root", "none"]);
    assert_eq!(agent.dump().unwrap().hooks.connect, "none");
    let r = connect_loop(topo, a, &addr(topo.pods[b].ip4, 5432), 300, 100);
    println!("a -> b:5432 with TC only: {r}");
    assert_eq!(r["successes"], 0);
    assert_eq!(r["denied"], 0);
    assert!(connects(topo, a, &addr(topo.pods[b].ip4, 80)));
    let m = wait_for(Duration::from_secs(15), || {
        agent
            .dump()
            .map(|d| d.policy("test", "no-db"))
            .filter(|m| m.blocked.packets > 0)
    })
    .unwrap();
    assert!(
        m.blocked.connections >= r["attempts"].as_u64().unwrap(),
        "every SYN counted: {m:?} {r}"
    );
}

/// A policy is in force only where the kernel shows its programs attached:
/// the agent reads its links back, and one detached behind its back (by
/// `bpftool`, a CNI re-initialising the interface) is attached again at the
/// next reconcile, with new link ids, and the block holds.
#[test]
fn a_detached_program_is_seen_and_attached_again() {
    let s = setup();
    let (topo, a, b) = (&s.topo, s.a, s.b);
    let peers = b_ips(&s);
    let spec = SpecBuilder::new(topo, 0)
        .rule(
            "no-db",
            Direction::Egress,
            PolicyMode::Enforce,
            &[a],
            &[&peers[0], &peers[1]],
            &[(TCP, 5432, 5432)],
        )
        .build();
    let agent = Agent::standalone(topo, 0, &spec, &["--cgroup-root", "none"]);
    let links_of_a = |d: &flowlens_e2e::agent::AgentDump| {
        d.endpoints
            .links
            .iter()
            .find(|l| l.pod.ends_with(&format!("/{}", topo.pods[a].name)))
            .cloned()
    };
    let before = wait_for(Duration::from_secs(10), || {
        agent
            .dump()
            .filter(|d| d.policies.iter().any(|p| p.name == "no-db") && links_of_a(d).is_some())
    })
    .expect("the policy in force with a's links listed");
    let old = links_of_a(&before).unwrap();
    println!(
        "a's links: from pod {}, to pod {}",
        old.from_pod_link, old.to_pod_link
    );
    let out = std::process::Command::new("bpftool")
        .args(["link", "detach", "id", &old.from_pod_link.to_string()])
        .output()
        .expect("running bpftool");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = wait_for(Duration::from_secs(10), || {
        agent.dump().filter(|d| {
            links_of_a(d).is_some_and(|l| l.from_pod_link != old.from_pod_link)
                && d.policies.iter().any(|p| p.name == "no-db")
        })
    })
    .expect("a's program attached again, with a new link");
    let new = links_of_a(&after).unwrap();
    println!(
        "after detaching link {}: new link {}",
        old.from_pod_link, new.from_pod_link
    );
    assert!(
        after.policies_not_in_force.is_empty(),
        "{:?}",
        after.policies_not_in_force
    );
    let r = connect_loop(topo, a, &addr(topo.pods[b].ip4, 5432), 100, 50);
    println!("a -> b:5432 after re-attachment: {r}");
    assert_eq!(r["successes"], 0);
}

/// Fail-static: a config that disappears or turns invalid changes nothing
/// in the kernel; the agent says so until a config can be read again.
#[test]
fn a_missing_or_invalid_config_keeps_the_last_one_in_force() {
    let s = setup();
    let (topo, a, b) = (&s.topo, s.a, s.b);
    let peers = b_ips(&s);
    let spec = SpecBuilder::new(topo, 0)
        .rule(
            "no-db",
            Direction::Egress,
            PolicyMode::Enforce,
            &[a],
            &[&peers[0], &peers[1]],
            &[(TCP, 5432, 5432)],
        )
        .build();
    let agent = Agent::standalone(topo, 0, &spec, &["--cgroup-root", "none"]);
    let db = addr(topo.pods[b].ip4, 5432);
    let config_problem = |want: bool| {
        wait_for(Duration::from_secs(10), || {
            agent
                .dump()
                .filter(|d| d.problems.iter().any(|p| p["reason"] == "ConfigMissing") == want)
        })
    };
    for (what, damage) in [
        ("deleted", None),
        ("invalid", Some("nodeName: [this is not a config")),
    ] {
        match damage {
            None => std::fs::remove_file(&agent.config_path).unwrap(),
            Some(text) => std::fs::write(&agent.config_path, text).unwrap(),
        }
        let d = config_problem(true)
            .unwrap_or_else(|| panic!("config {what}: no ConfigMissing problem"));
        assert_eq!(d.applied_revision.as_deref(), Some(spec.revision.as_str()));
        assert!(
            d.policies.iter().any(|p| p.name == "no-db"),
            "config {what}: {:?}",
            d.policies
        );
        let r = connect_loop(topo, a, &db, 100, 50);
        println!("config {what}: a -> b:5432: {r}");
        assert_eq!(r["successes"], 0, "config {what}: the block was lifted");
        assert!(connects(topo, a, &addr(topo.pods[b].ip4, 80)));
    }
    agent.set_config(&spec);
    assert!(
        config_problem(false).is_some(),
        "the problem stays after the config is back"
    );
}

#[test]
fn ingress_rules_block_connections_to_a_pod_but_not_its_own() {
    let s = setup();
    let (topo, a, b) = (&s.topo, s.a, s.b);
    // Quarantine b: no connection may be opened towards it.
    let spec = SpecBuilder::new(topo, 0)
        .rule(
            "quarantine",
            Direction::Ingress,
            PolicyMode::Enforce,
            &[b],
            &[],
            &[],
        )
        .build();
    let _agent = Agent::standalone(topo, 0, &spec, &[]);
    for port in [80, 5432] {
        let r = connect_loop(topo, a, &addr(topo.pods[b].ip4, port), 100, 200);
        assert_eq!(r["successes"], 0, "a -> b:{port}: {r}");
    }
    // b's own connections work: their replies are not "connections to b".
    assert!(connects(topo, b, &addr(topo.pods[a].ip4, 9000)));
    assert!(connects(topo, b, &addr(topo.pods[a].ip6, 9000)));
}

#[test]
fn audit_counts_without_blocking_and_removing_a_rule_restores_within_a_second() {
    let s = setup();
    let (topo, a, b) = (&s.topo, s.a, s.b);
    let peers = b_ips(&s);
    let mut cfg = SpecBuilder::new(topo, 0);
    cfg.rule(
        "no-db",
        Direction::Egress,
        PolicyMode::Audit,
        &[a],
        &[&peers[0], &peers[1]],
        &[(TCP, 5432, 5432)],
    );
    let spec = cfg.build();
    let mut agent = Agent::standalone(topo, 0, &spec, &[]);
    let r = connect_loop(topo, a, &addr(topo.pods[b].ip4, 5432), 200, 500);
    assert_eq!(r["successes"], r["attempts"], "Audit blocks nothing: {r}");
    let m = wait_for(Duration::from_secs(15), || {
        agent
            .dump()
            .map(|d| d.policy("test", "no-db"))
            .filter(|m| m.audited.connections > 0)
    })
    .unwrap();
    println!("audit: {m:?} for {r}");
    assert_eq!(m.audited.connections, r["attempts"].as_u64().unwrap());
    assert_eq!(m.blocked.packets, 0);

    // Enforce, then remove the rule while a client keeps trying.
    cfg.remove_policy("no-db").rule(
        "no-db",
        Direction::Egress,
        PolicyMode::Enforce,
        &[a],
        &[&peers[0], &peers[1]],
        &[(TCP, 5432, 5432)],
    );
    let spec = cfg.build();
    agent.set_config(&spec);
    agent.wait_revision(&spec.revision, Duration::from_secs(10));
    assert!(!connects(topo, a, &addr(topo.pods[b].ip4, 5432)));

    let to = addr(topo.pods[b].ip4, 5432);
    let mut client = topo.pod_cmd(
        a,
        workspace_bin("flowlens-traffic"),
        &[
            "connect-loop",
            "--to",
            &to,
            "--interval-ms",
            "10",
            "--duration-ms",
            "3000",
            "--timeout-ms",
            "50",
        ],
    );
    client.stdout(std::process::Stdio::piped());
    let child = client.spawn().unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    cfg.remove_policy("no-db");
    let spec = cfg.build();
    agent.set_config(&spec);
    let out = child.wait_with_output().unwrap();
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    let first = r["first_success_ms"]
        .as_u64()
        .expect("connections succeed again");
    println!("rule removed at ~1000 ms; first successful connect at {first} ms");
    assert!(
        (900..2000).contains(&first),
        "restored {} ms after removal",
        first.saturating_sub(1000)
    );
}

#[test]
fn config_swaps_never_let_a_blocked_connection_through() {
    let s = setup();
    let (topo, a, b, c) = (&s.topo, s.a, s.b, s.c);
    let peers = b_ips(&s);
    let mut cfg = SpecBuilder::new(topo, 0);
    cfg.trace("obs", 5, &[a, b, c]).rule(
        "no-db",
        Direction::Egress,
        PolicyMode::Enforce,
        &[a],
        &[&peers[0], &peers[1]],
        &[(TCP, 5432, 5432)],
    );
    let spec = cfg.build();
    let agent = Agent::standalone(topo, 0, &spec, &["--cgroup-root", "none"]);
    let to = addr(topo.pods[b].ip4, 5432);
    let mut client = topo.pod_cmd(
        a,
        workspace_bin("flowlens-traffic"),
        &[
            "connect-loop",
            "--to",
            &to,
            "--interval-ms",
            "5",
            "--duration-ms",
            "6000",
            "--timeout-ms",
            "20",
        ],
    );
    client.stdout(std::process::Stdio::piped());
    let child = client.spawn().unwrap();
    // Thirty revisions that keep the block but change everything around it.
    for i in 0..30u16 {
        cfg.remove_policy("churn").rule(
            "churn",
            Direction::Egress,
            PolicyMode::Enforce,
            &[c],
            &[&peers[0]],
            &[(TCP, 6000 + i, 6000 + i)],
        );
        agent.set_config(&cfg.build());
        std::thread::sleep(Duration::from_millis(150));
    }
    let out = child.wait_with_output().unwrap();
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    println!("during 30 config swaps: {r}");
    assert_eq!(r["successes"], 0);
}

/// A connection allowed before a block and idle while the rules change
/// twice (a block, then an unrelated change that flips the tables back to
/// the generation the connection was first decided in) is blocked when it
/// speaks again: cached verdicts belong to a config epoch, not to the
/// one-bit table generation.
#[test]
fn an_idle_connection_decided_before_a_block_is_blocked_after_later_changes() {
    idle_connection_across_a_block(true);
}

/// The same for pods no observation traces: their established connections
/// pass by the cached verdict alone (no flow entry), which a new config
/// must invalidate just the same.
#[test]
fn an_idle_connection_of_a_pod_not_traced_is_blocked_after_later_changes() {
    idle_connection_across_a_block(false);
}

fn idle_connection_across_a_block(traced: bool) {
    let s = setup();
    let (topo, a, b, c) = (&s.topo, s.a, s.b, s.c);
    let peers = b_ips(&s);
    let mut cfg = SpecBuilder::new(topo, 0);
    if traced {
        cfg.trace("obs", 5, &[a, b, c]);
    }
    // `a` has rules from the start, so the connection's verdict (pass) is
    // decided and cached when it opens.
    cfg.rule(
        "other-port",
        Direction::Egress,
        PolicyMode::Enforce,
        &[a],
        &[&peers[0]],
        &[(TCP, 6001, 6001)],
    );
    let spec = cfg.build();
    let mut agent = Agent::standalone(topo, 0, &spec, &[]);

    let mut client = topo.pod_cmd(
        a,
        workspace_bin("flowlens-traffic"),
        &[
            "idle-exchange",
            "--to",
            &addr(topo.pods[b].ip4, 5432),
            "--idle-ms",
            "6000",
            "--timeout-ms",
            "1000",
        ],
    );
    client.stdout(std::process::Stdio::piped());
    let mut child = client.spawn().unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert!(line.contains("connected"), "{line}");

    cfg.rule(
        "no-db",
        Direction::Egress,
        PolicyMode::Enforce,
        &[a],
        &[&peers[0], &peers[1]],
        &[(TCP, 5432, 5432)],
    );
    let blocked = cfg.build();
    agent.set_config(&blocked);
    agent.wait_revision(&blocked.revision, Duration::from_secs(5));
    cfg.rule(
        "unrelated",
        Direction::Egress,
        PolicyMode::Enforce,
        &[c],
        &[&peers[0]],
        &[(TCP, 6000, 6000)],
    );
    let later = cfg.build();
    agent.set_config(&later);
    agent.wait_revision(&later.revision, Duration::from_secs(5));

    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    let _ = child.wait();
    let r: Value = serde_json::from_str(rest.trim()).unwrap_or_else(|e| panic!("{rest:?}: {e}"));
    println!("idle connection across a block and a later change: {r}");
    assert_eq!(r["first"], true, "the connection worked before the block");
    assert_eq!(r["second"], false, "the block holds after later changes");
}
