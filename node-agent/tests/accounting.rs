//! Flow accounting against independent ground truth, on the real kernel:
//! iperf3's own byte counts, over real veths in network namespaces.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flowlens_api::{
    flow_policy::PolicyMode,
    node_agent_config::Direction,
    report::{ObservationWindow, Role, Series},
};
use flowlens_e2e::{
    agent::Agent,
    config::SpecBuilder,
    topology::Topology,
    traffic::{self, Iperf3},
};

fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// The start of the 5 s window before the current one: the first packets
/// sent may be counted in it (the agent drains at a window's end, a few
/// milliseconds after the boundary, and what it drains belongs to the
/// window that ended), so a test that counts every packet reads from there.
fn window_before_now() -> i64 {
    let now = now_s();
    now - now % 5 - 5
}

fn series<'a>(
    windows: &'a [ObservationWindow],
    pred: impl Fn(&Series) -> bool + 'a,
) -> impl Iterator<Item = &'a Series> + 'a {
    windows
        .iter()
        .flat_map(|w| w.series.iter())
        .filter(move |s| pred(s))
}

/// Runs an iperf3 TCP transfer paced at 4 Gbit/s.
fn iperf3(topo: &Topology, server: usize, client: usize, server_ip: &str, bytes: &str) -> Iperf3 {
    traffic::iperf3(topo, server, client, server_ip, 5201, bytes, "4G")
}

#[test]
fn iperf3_bytes_match_and_a_same_node_pair_counts_once() {
    let mut topo = Topology::new();
    let node = topo.add_node("n1", Some("z1"));
    let a = topo.add_pod(node, "a");
    let b = topo.add_pod(node, "b");
    let spec = SpecBuilder::new(&topo, node)
        .trace("obs", 5, &[a, b])
        .build();
    let agent = Agent::standalone(&topo, node, &spec, &[]);

    let from = now_s() - now_s() % 5;
    let sent = iperf3(&topo, b, a, &topo.pods[b].ip4.to_string(), "200M");
    let sent6 = iperf3(&topo, b, a, &topo.pods[b].ip6.to_string(), "50M");
    let until = now_s() + 1;
    let windows = agent.windows("obs", from, until, Duration::from_secs(20));

    let (a_ip4, b_ip4) = (topo.pods[a].ip4.to_string(), topo.pods[b].ip4.to_string());
    let b_ip6 = topo.pods[b].ip6.to_string();
    let is_a = |s: &Series| s.local.pod.as_deref() == Some("a");
    let is_b = |s: &Series| s.local.pod.as_deref() == Some("b");

    // Payload bytes a -> b on 5201 (data and control connections) against
    // iperf3's payload count: like with like.
    let client4: Vec<&Series> = series(&windows, |s| {
        is_a(s) && s.port == 5201 && s.remote.as_deref() == Some(&b_ip4)
    })
    .collect();
    assert!(
        !client4.is_empty(),
        "no series for a -> b:5201 in {windows:#?}"
    );
    assert!(client4.iter().all(|s| s.role == Role::Client));
    let payload: u64 = client4.iter().map(|s| s.tx.payload_bytes).sum();
    let expected = sent.wire_payload();
    let err = (payload as f64 - expected as f64).abs() / expected as f64;
    println!(
        "IPv4: iperf3 sent {} bytes with {} retransmitted segments ({expected} on the wire); Flowlens counted {payload} payload bytes ({:.4}% off)",
        sent.bytes,
        sent.retransmits,
        err * 100.0
    );
    assert!(
        err < 0.01,
        "payload {payload} vs iperf3 {expected}: {:.3}% off",
        err * 100.0
    );
    assert!(
        payload >= sent.received,
        "less payload on the wire ({payload}) than the server received ({})",
        sent.received
    );

    // Wire (IP-layer) bytes: payload plus one IPv4+TCP header per segment
    // (20 + 32 with timestamps; SYNs carry a little more).
    let packets: u64 = client4.iter().map(|s| s.tx.packets).sum();
    let wire: u64 = client4.iter().map(|s| s.tx.bytes).sum();
    let per_packet = (wire - payload) as f64 / packets as f64;
    println!("IPv4: {packets} segments, {wire} IP bytes, {per_packet:.2} header bytes per segment");
    assert!(
        (52.0..53.0).contains(&per_packet),
        "header bytes per segment {per_packet}"
    );
    // Against what was counted, not iperf3's sent count (which, unpaced,
    // includes what was still queued when it stopped): a segment carries at
    // most one MSS, so a super-packet counted as one would fall far short.
    assert!(
        packets as f64 >= payload as f64 / 1448.0,
        "GSO super-packets must count as their segments: {packets} packets for {payload} payload bytes"
    );

    // The same connection seen at b: b's sends count, b's receives (a's
    // sends, already counted at a) do not; the connection counts once.
    let server4: Vec<&Series> = series(&windows, |s| {
        is_b(s) && s.remote.as_deref() == Some(&a_ip4) && s.port == 5201
    })
    .collect();
    assert!(!server4.is_empty());
    assert!(
        server4
            .iter()
            .all(|s| s.role == Role::Server && s.rx.is_zero() && s.flows == 0),
        "{server4:#?}"
    );
    let total_payload: u64 = windows
        .iter()
        .flat_map(|w| &w.series)
        .map(|s| s.tx.payload_bytes + s.rx.payload_bytes)
        .sum();
    let all_sent = sent.wire_payload() + sent6.wire_payload();
    assert!(
        (total_payload as f64) < all_sent as f64 * 1.01,
        "double counting: {total_payload} payload bytes observed for {all_sent} sent"
    );
    // `flows` counts the connections active in a window: iperf3's control
    // and data connections, in each window the transfer touched.
    let per_window: Vec<u64> = windows
        .iter()
        .map(|w| {
            w.series
                .iter()
                .filter(|s| is_a(s) && s.port == 5201 && s.remote.as_deref() == Some(&b_ip4))
                .map(|s| s.flows)
                .sum()
        })
        .collect();
    assert!(
        per_window.iter().all(|&f| f <= 2) && per_window.contains(&2),
        "iperf3 uses a control and a data connection: flows per window {per_window:?}"
    );

    // IPv6 is counted the same way.
    let payload6: u64 = series(&windows, |s| {
        is_a(s) && s.port == 5201 && s.remote.as_deref() == Some(&b_ip6)
    })
    .map(|s| s.tx.payload_bytes)
    .sum();
    let expected6 = sent6.wire_payload();
    let err6 = (payload6 as f64 - expected6 as f64).abs() / expected6 as f64;
    println!(
        "IPv6: iperf3 put {expected6} payload bytes on the wire; Flowlens counted {payload6} ({:.4}% off)",
        err6 * 100.0
    );
    assert!(err6 < 0.01, "IPv6 payload {payload6} vs {expected6}");
    assert!(
        payload6 >= sent6.received,
        "IPv6: less payload on the wire ({payload6}) than received ({})",
        sent6.received
    );
}

/// Kernel drops against a known count: each UDP datagram to a port nobody
/// listens on is dropped by the receiving pod's kernel (`NO_SOCKET`).
#[test]
fn datagrams_to_a_closed_port_count_as_kernel_drops() {
    const DATAGRAMS: u64 = 40;
    let mut topo = Topology::new();
    let node = topo.add_node("n1", Some("z1"));
    let a = topo.add_pod(node, "a");
    let b = topo.add_pod(node, "b");
    let spec = SpecBuilder::new(&topo, node)
        .trace("obs", 5, &[a, b])
        .build();
    let agent = Agent::standalone(&topo, node, &spec, &[]);
    let hooks = agent.dump().expect("dump").hooks;
    assert_eq!(hooks.drops, "tracepoint/skb/kfree_skb", "{hooks:?}");

    let from = window_before_now();
    // A new socket per datagram: a connected socket would stop sending
    // after the first ICMP port-unreachable.
    let b_ip = topo.pods[b].ip4.to_string();
    let script = format!("for i in $(seq {DATAGRAMS}); do echo drop-me > /dev/udp/{b_ip}/9; done");
    let out = topo.pod_output(a, "bash", &["-c", &script]);
    assert!(out.status.success(), "{out:?}");
    let until = now_s() + 1;
    let windows = agent.windows("obs", from, until, Duration::from_secs(20));

    let a_ip = topo.pods[a].ip4.to_string();
    let at_b: u64 = series(&windows, |s| {
        s.local.pod.as_deref() == Some("b") && s.remote.as_deref() == Some(&a_ip)
    })
    .map(|s| s.drops)
    .sum();
    let all: u64 = series(&windows, |_| true).map(|s| s.drops).sum();
    let dump = agent.dump().expect("dump");
    let without_flow = dump.kernel["dropsWithoutFlow"].as_u64().unwrap_or(0);
    let no_socket = dump.kernel["drops"]["NO_SOCKET"].as_u64().unwrap_or(0);
    println!(
        "kernel drops: sent {DATAGRAMS} datagrams to a closed port; b's series count {at_b} drops ({all} in all series, {without_flow} without a flow entry); NO_SOCKET {no_socket}"
    );
    assert_eq!(all, at_b, "drops belong to the receiver only");
    assert_eq!(
        at_b + without_flow,
        DATAGRAMS,
        "every datagram is one drop, counted once"
    );
    assert!(at_b >= DATAGRAMS - 2, "{at_b} of {DATAGRAMS} in flows");
    assert!(no_socket >= DATAGRAMS, "{:#}", dump.kernel);
    let n = agent.metric_sum("flowlens_agent_kernel_drops_total", "reason=\"NO_SOCKET\"");
    assert!(n >= DATAGRAMS as f64, "NO_SOCKET drop metric {n}");
}

/// Pods a and b on one node; a traced (`window_seconds` windows: its series
/// carry both directions) and its traffic to b audited by rule `audit-b`.
struct AuditedPair {
    // Dropped before the topology it runs in.
    agent: Agent,
    topo: Topology,
    a: usize,
    b: usize,
    b4: String,
}

fn audited_pair(window_seconds: u32) -> AuditedPair {
    let mut topo = Topology::new();
    let node = topo.add_node("n1", None);
    let a = topo.add_pod(node, "a");
    let b = topo.add_pod(node, "b");
    let b4 = topo.pods[b].ip4.to_string();
    let spec = SpecBuilder::new(&topo, node)
        .trace("obs", window_seconds, &[a])
        .rule(
            "audit-b",
            Direction::Egress,
            PolicyMode::Audit,
            &[a],
            &[&format!("{b4}/32")],
            &[],
        )
        .build();
    let agent = Agent::standalone(&topo, node, &spec, &[]);
    AuditedPair {
        agent,
        topo,
        a,
        b,
        b4,
    }
}

/// The packets `audit-b` audited, once the policy window holding `until`
/// (unix seconds) is published (policy matches are published per
/// completed 10 s window).
fn audited_packets_until(agent: &Agent, until: i64) -> u64 {
    let published = until - until % 10 + 10;
    while now_s() < published + 2 {
        std::thread::sleep(Duration::from_millis(250));
    }
    agent.metric_sum(
        "flowlens_agent_policy_packets_total",
        "policy=\"audit-b\",verdict=\"audited\"",
    ) as u64
}

/// Audited connections take the fast path after their first packet (the
/// flow entry remembers the rule and counts against it): every packet is
/// still counted against the rule exactly once, so the rule's packets equal
/// the connection's, both directions, as the flow table counted them.
#[test]
fn every_audited_packet_is_counted_once_against_its_rule() {
    let pair = audited_pair(5);
    let (agent, topo, a, b, b4) = (&pair.agent, &pair.topo, pair.a, pair.b, &pair.b4);

    let from = window_before_now();
    let sent = iperf3(topo, b, a, b4, "40M");
    let until = now_s() + 1;
    let windows = agent.windows("obs", from, until, Duration::from_secs(20));
    let to_b: Vec<&Series> =
        series(&windows, |s| s.remote.as_deref() == Some(b4.as_str())).collect();
    let flow_packets: u64 = to_b.iter().map(|s| s.tx.packets + s.rx.packets).sum();
    let audited = audited_packets_until(agent, until);
    let blocked = agent.metric_sum("flowlens_agent_policy_packets_total", "verdict=\"blocked\"");
    println!(
        "iperf3 sent {} bytes; a <-> b: {flow_packets} packets in the flow table, {audited} audited",
        sent.bytes
    );
    assert!(
        flow_packets as f64 >= sent.wire_payload() as f64 / 1448.0,
        "the transfer was counted: {flow_packets} packets for {} bytes",
        sent.wire_payload()
    );
    assert_eq!(
        audited, flow_packets,
        "every packet of the audited connections is counted against the rule once"
    );
    assert_eq!(blocked, 0.0);
}

/// With 30 s windows the flow tables are drained once a window; the 10 s
/// policy windows in between drain only the rule counters. Across both,
/// every datagram is counted once: in the flow table and against the
/// audit rule, against the client's own count of what it sent.
#[test]
fn policy_windows_drain_only_the_rule_counters_and_lose_no_packet() {
    const DATAGRAMS: u64 = 100;
    const WINDOW: i64 = 30;
    let pair = audited_pair(WINDOW as u32);
    let (agent, topo, a, b4) = (&pair.agent, &pair.topo, pair.a, &pair.b4);
    let drains = |tables: &str| {
        agent.metric_sum(
            "flowlens_agent_drain_duration_seconds_count",
            &format!("tables=\"{tables}\""),
        )
    };

    let now = now_s();
    let from = now - now % WINDOW - WINDOW;
    let (all_before, rules_before) = (drains("all"), drains("rules"));
    // 100 datagrams over 10 s, each from a new socket (a new connection,
    // decided and audited on its own), so at least one policy window ends
    // while they are sent.
    let script = format!(
        "n=0; for i in $(seq {DATAGRAMS}); do echo x > /dev/udp/{b4}/9 && n=$((n+1)); sleep 0.1; done; echo $n"
    );
    let out = topo.pod_output(a, "bash", &["-c", &script]);
    let sent: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    let end = now_s();
    let windows = agent.windows("obs", from, end - end % WINDOW, Duration::from_secs(45));
    let (all, rules) = (drains("all") - all_before, drains("rules") - rules_before);
    let windows_ended = (now_s() / WINDOW - now / WINDOW) as f64;
    let to_b: u64 = series(&windows, |s| {
        s.remote.as_deref() == Some(b4.as_str()) && s.port == 9
    })
    .map(|s| s.tx.packets)
    .sum();
    let audited = audited_packets_until(agent, end);
    println!(
        "sent {sent} datagrams in {}s; flow table {to_b}, audited {audited}; drains meanwhile: {all} of every table ({windows_ended} windows ended), {rules} of the rule counters only",
        end - now
    );
    assert_eq!(sent, DATAGRAMS, "{out:?}");
    assert_eq!(to_b, sent, "every datagram in the flow table once");
    assert_eq!(audited, sent, "every datagram against the rule once");
    assert!(rules >= 1.0, "a policy window ended while sending: {rules}");
    assert!(
        all <= windows_ended,
        "the flow tables are drained at window ends only ({windows_ended} ended): {all}"
    );
}
