use std::sync::Arc;

use flowlens_agent_common::{
    AttemptKey, AttemptStats, DIRECTION_EGRESS, DIRECTION_INGRESS, FLOW_FLAG_SYN,
    FLOW_FLAG_SYN_ACK, FlowKey, FlowStats, OverflowKey, RttKey, RuleCounterKey, RuleCounters,
    VERDICT_AUDIT, VERDICT_DROP, rtt_bucket, rule_scope, v4_mapped,
};
use flowlens_api::{node_agent_config::NodeAgentConfigSpec, report::Role};

use super::*;

const CONFIG: &str = r#"
nodeName: n1
zone: z1
revision: r1
endpoints:
- {namespace: a, pod: client-1, uid: u1, workload: {kind: Deployment, name: client}, ips: [10.0.0.1], labels: {app: client}}
- {namespace: a, pod: server-1, uid: u2, workload: {kind: Deployment, name: server}, ips: [10.0.0.2], labels: {app: server}}
observations:
- {name: o, uid: ou, generation: 1, windowSeconds: 10, groupBy: [namespace, workload], topN: 10, maxSeries: 100, endpoints: [a/client-1, a/server-1]}
rules:
- id: a/p/egress/0
  policy: {namespace: a, name: p, revision: x}
  direction: Egress
  mode: Enforce
  endpoints: [a/client-1]
  anyPeer: true
"#;

fn spec() -> NodeAgentConfigSpec {
    serde_yaml::from_str(CONFIG).unwrap()
}

fn ip(last: u8) -> [u8; 16] {
    v4_mapped([10, 0, 0, last])
}

#[allow(clippy::too_many_arguments)]
fn flow(
    local: u8,
    remote: [u8; 16],
    lport: u16,
    rport: u16,
    dir: u8,
    packets: u64,
    bytes: u64,
    flags: u32,
) -> (FlowKey, FlowStats) {
    (
        FlowKey {
            local_addr: ip(local),
            remote_addr: remote,
            local_port: lport,
            remote_port: rport,
            protocol: 6,
            direction: dir,
            _pad: [0; 2],
        },
        FlowStats {
            packets,
            bytes,
            payload_bytes: bytes.saturating_sub(52 * packets),
            flags,
            ..Default::default()
        },
    )
}

/// t = 1000 s exactly, the start of a 10 s window.
const T0: i64 = 1_000_000;

fn agg() -> Aggregator {
    let mut a = Aggregator::new(T0 - 30_000);
    a.set_config(&spec(), T0 - 30_000);
    let _ = a.close_due(T0);
    a
}

fn totals(w: &ObservationWindow) -> (u64, u64, u64) {
    w.series.iter().fold((0, 0, 0), |(f, p, b), s| {
        (
            f + s.flows,
            p + s.tx.packets + s.rx.packets,
            b + s.tx.bytes + s.rx.bytes,
        )
    })
}

#[test]
fn a_connection_between_two_traced_local_pods_counts_once() {
    let mut a = agg();
    let d = Drained {
        flows: vec![
            // At the client's interface.
            flow(
                1,
                ip(2),
                40000,
                5201,
                DIRECTION_EGRESS,
                100,
                100_000,
                FLOW_FLAG_SYN,
            ),
            flow(
                1,
                ip(2),
                40000,
                5201,
                DIRECTION_INGRESS,
                50,
                2_600,
                FLOW_FLAG_SYN_ACK,
            ),
            // At the server's interface: the same packets again.
            flow(
                2,
                ip(1),
                5201,
                40000,
                DIRECTION_INGRESS,
                100,
                100_000,
                FLOW_FLAG_SYN,
            ),
            flow(
                2,
                ip(1),
                5201,
                40000,
                DIRECTION_EGRESS,
                50,
                2_600,
                FLOW_FLAG_SYN_ACK,
            ),
        ],
        ..Default::default()
    };
    a.ingest(&d, T0 + 1000);
    let (windows, _) = a.close_due(T0 + 10_000);
    assert_eq!(windows.len(), 1);
    let w = &windows[0];
    assert!(w.complete);
    assert_eq!(totals(w), (1, 150, 102_600));
    let client = w.series.iter().find(|s| s.role == Role::Client).unwrap();
    assert_eq!(client.port, 5201);
    assert_eq!(client.local.workload.as_deref(), Some("Deployment/client"));
    assert_eq!(client.remote.as_deref(), Some("10.0.0.2"));
}

#[test]
fn traffic_with_an_untraced_remote_counts_both_directions() {
    let mut a = agg();
    let remote = v4_mapped([192, 168, 1, 1]);
    a.ingest(
        &Drained {
            flows: vec![
                flow(
                    1,
                    remote,
                    40000,
                    443,
                    DIRECTION_EGRESS,
                    10,
                    1_000,
                    FLOW_FLAG_SYN,
                ),
                flow(
                    1,
                    remote,
                    40000,
                    443,
                    DIRECTION_INGRESS,
                    20,
                    30_000,
                    FLOW_FLAG_SYN_ACK,
                ),
            ],
            ..Default::default()
        },
        T0 + 500,
    );
    let (w, _) = a.close_due(T0 + 10_000);
    assert_eq!(totals(&w[0]), (1, 30, 31_000));
}

#[test]
fn the_role_survives_drains_without_the_handshake() {
    let mut a = agg();
    let remote = v4_mapped([192, 168, 1, 1]);
    // A high server port: only the SYN tells who the client is.
    a.ingest(
        &Drained {
            flows: vec![flow(
                1,
                remote,
                40000,
                50000,
                DIRECTION_INGRESS,
                1,
                60,
                FLOW_FLAG_SYN,
            )],
            ..Default::default()
        },
        T0 + 100,
    );
    a.ingest(
        &Drained {
            flows: vec![flow(1, remote, 40000, 50000, DIRECTION_EGRESS, 5, 600, 0)],
            ..Default::default()
        },
        T0 + 2000,
    );
    let (w, _) = a.close_due(T0 + 10_000);
    assert_eq!(w[0].series.len(), 1, "{:?}", w[0].series);
    assert_eq!(w[0].series[0].role, Role::Server);
    assert_eq!(w[0].series[0].port, 40000);
    assert_eq!(
        w[0].series[0].flows, 1,
        "one connection, seen in two drains"
    );
}

#[test]
fn windows_align_to_the_clock_and_the_first_is_incomplete() {
    let mut a = Aggregator::new(T0 + 3_000);
    a.set_config(&spec(), T0 + 3_000);
    a.ingest(
        &Drained {
            flows: vec![flow(1, ip(9), 40000, 80, DIRECTION_EGRESS, 1, 100, 0)],
            ..Default::default()
        },
        T0 + 4_000,
    );
    assert!(a.close_due(T0 + 9_999).0.is_empty());
    let (w, _) = a.close_due(T0 + 10_000);
    assert_eq!((w[0].start, w[0].end(), w[0].complete), (1000, 1010, false));
    let (w, _) = a.close_due(T0 + 20_000);
    assert_eq!((w[0].start, w[0].complete), (1010, true));
    assert!(w[0].series.is_empty(), "an idle window is still reported");
}

#[test]
fn series_beyond_the_budget_fold_into_other() {
    let mut s = spec();
    s.observations[0].max_series = 2;
    let mut a = Aggregator::new(T0);
    a.set_config(&s, T0);
    let flows = (0..5)
        .map(|i| {
            flow(
                1,
                v4_mapped([172, 16, 0, i]),
                40000,
                80,
                DIRECTION_EGRESS,
                1,
                100,
                FLOW_FLAG_SYN,
            )
        })
        .collect();
    a.ingest(
        &Drained {
            flows,
            ..Default::default()
        },
        T0 + 1,
    );
    let (w, _) = a.close_due(T0 + 10_000);
    let w = &w[0];
    assert_eq!(w.series.len(), 3);
    assert_eq!(w.folded_series, 3);
    let other = w.series.iter().find(|s| s.local.other).unwrap();
    assert_eq!((other.flows, other.tx.bytes), (3, 300));
    assert_eq!(totals(w), (5, 5, 500), "nothing lost by folding");
}

#[test]
fn rtt_samples_join_their_connection() {
    let mut a = agg();
    let remote = v4_mapped([192, 168, 1, 1]);
    let rtt = |us: u32, n: u64| {
        (
            RttKey {
                local_addr: ip(1),
                remote_addr: remote,
                local_port: 40000,
                remote_port: 443,
                bucket: rtt_bucket(us),
                _pad: 0,
            },
            n,
        )
    };
    a.ingest(
        &Drained {
            flows: vec![flow(
                1,
                remote,
                40000,
                443,
                DIRECTION_EGRESS,
                1,
                60,
                FLOW_FLAG_SYN,
            )],
            rtt: vec![rtt(20_000, 9), rtt(40_000, 1)],
            ..Default::default()
        },
        T0 + 1,
    );
    let (w, _) = a.close_due(T0 + 10_000);
    let s = &w[0].series[0];
    assert_eq!(s.rtt.count(), 10);
    let p50 = s.rtt.quantile(0.5).unwrap() as f64;
    assert!((p50 - 20_000.0).abs() / 20_000.0 < 0.04, "{p50}");
}

#[test]
fn overflow_keeps_totals() {
    let mut a = agg();
    let s = FlowStats {
        packets: 7,
        bytes: 700,
        payload_bytes: 336,
        ..Default::default()
    };
    a.ingest(
        &Drained {
            overflow: vec![(
                OverflowKey {
                    local_addr: ip(1),
                    direction: DIRECTION_EGRESS,
                    _pad: [0; 7],
                },
                s,
            )],
            ..Default::default()
        },
        T0 + 1,
    );
    let (w, _) = a.close_due(T0 + 10_000);
    assert_eq!(w[0].overflow_packets, 7);
    assert_eq!(totals(&w[0]).2, 700);
}

#[test]
fn rule_counters_are_attributed_through_the_generation_tables() {
    let mut a = agg();
    let tables = Arc::new(crate::tables::compile(
        &spec(),
        &[],
        crate::tables::Capacity::UNLIMITED,
    ));
    a.set_generation_tables(1, tables);
    let key = |verdict| RuleCounterKey {
        scope: rule_scope(1, DIRECTION_EGRESS, 1),
        slot: 0,
        verdict,
        _pad: [0; 2],
    };
    a.ingest(
        &Drained {
            rules: vec![
                (
                    key(VERDICT_DROP),
                    RuleCounters {
                        packets: 4,
                        connections: 3,
                    },
                ),
                (
                    key(VERDICT_AUDIT),
                    RuleCounters {
                        packets: 1,
                        connections: 0,
                    },
                ),
                (
                    RuleCounterKey {
                        scope: rule_scope(0, DIRECTION_EGRESS, 1),
                        slot: 0,
                        verdict: VERDICT_DROP,
                        _pad: [0; 2],
                    },
                    RuleCounters {
                        packets: 9,
                        connections: 9,
                    },
                ),
            ],
            ..Default::default()
        },
        T0 + 1,
    );
    assert_eq!(
        a.stats.unattributed_matches, 18,
        "generation 0 has no tables"
    );
    let (_, p) = a.close_due(T0 + 10_000);
    assert_eq!(p.len(), 1);
    let m = &p[0].policies[0];
    assert_eq!((m.namespace.as_str(), m.name.as_str()), ("a", "p"));
    assert_eq!(
        (m.blocked.packets, m.blocked.connections, m.audited.packets),
        (4, 3, 1)
    );
}

/// Named attempts reach the policy window with the local pod, the peer and
/// the server's port (the remote port for egress rules), summed per peer
/// and port, stamped with wall time from the kernel's monotonic clock; a
/// scope the tables do not know is not named.
#[test]
fn named_attempts_are_attributed_and_summed() {
    let mut a = agg();
    let tables = Arc::new(crate::tables::compile(
        &spec(),
        &[],
        crate::tables::Capacity::UNLIMITED,
    ));
    a.set_generation_tables(1, tables);
    let key = |generation, peer: u8| AttemptKey {
        scope: rule_scope(generation, DIRECTION_EGRESS, 1),
        slot: 0,
        verdict: VERDICT_DROP,
        protocol: 6,
        _pad: 0,
        remote_port: 5432,
        local_port: 40000,
        peer: ip(peer),
    };
    let stats = |attempts, last_ns| AttemptStats {
        attempts,
        packets: attempts,
        last_ns,
    };
    // Read at monotonic 100 s, wall T0 + 1 s: a match at 98 s was 2 s ago.
    let drained = |v| Drained {
        attempts: v,
        read_at_ns: 100_000_000_000,
        ..Default::default()
    };
    a.ingest(
        &drained(vec![
            (key(1, 9), stats(3, 98_000_000_000)),
            (key(0, 9), stats(5, 0)),
        ]),
        T0 + 1_000,
    );
    a.ingest(
        &drained(vec![(key(1, 9), stats(2, 99_500_000_000))]),
        T0 + 2_000,
    );
    let (_, p) = a.close_due(T0 + 10_000);
    let named = &p[0].policies[0].attempts;
    assert_eq!(named.len(), 1, "{named:?}");
    let n = &named[0];
    assert_eq!(n.peer, "10.0.0.9");
    assert_eq!(n.pod, "a/client-1");
    assert_eq!((n.port, n.protocol, n.attempts, n.packets), (5432, 6, 5, 5));
    assert_eq!(n.direction, flowlens_api::report::AttemptDirection::Egress);
    assert_eq!(n.verdict, flowlens_api::report::AttemptVerdict::Blocked);
    assert_eq!(n.last_seen, (T0 + 1_500).div_euclid(1000));
}

/// What a killed agent's spool holds of its open windows: each as a part
/// closed early, numbered past every part used so far and never numbered
/// again; closing the windows afterwards counts nothing twice within the
/// agent (the successor's parts only carry what it drains itself).
#[test]
fn spooled_open_parts_use_up_their_part_numbers() {
    let mut a = agg();
    let tables = Arc::new(crate::tables::compile(
        &spec(),
        &[],
        crate::tables::Capacity::UNLIMITED,
    ));
    a.set_generation_tables(1, tables);
    a.ingest(
        &Drained {
            flows: vec![flow(1, ip(9), 40000, 80, DIRECTION_EGRESS, 1, 100, 0)],
            rules: vec![(
                RuleCounterKey {
                    scope: rule_scope(1, DIRECTION_EGRESS, 1),
                    slot: 0,
                    verdict: VERDICT_DROP,
                    _pad: [0; 2],
                },
                RuleCounters {
                    packets: 2,
                    connections: 2,
                },
            )],
            ..Default::default()
        },
        T0 + 1,
    );
    let before = a.last_part();
    let (w, p) = a.spool_open_parts(T0 + 4_000);
    assert_eq!(w.len(), 1);
    assert!(w[0].closed_early && !w[0].complete);
    assert_eq!(totals(&w[0]).2, 100, "what was drained so far");
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].policies[0].blocked.connections, 2);
    assert_eq!(p[0].window_seconds, 4);
    let spooled = [w[0].part, p[0].part];
    assert_eq!(spooled, [before + 1, before + 2]);
    assert_eq!(a.last_part(), before + 2);
    let (w2, p2) = a.close_due(T0 + 10_000);
    assert!(
        !spooled.contains(&w2[0].part) && !spooled.contains(&p2[0].part),
        "the closed parts take new numbers: {spooled:?}"
    );
    let mut b = agg();
    b.continue_parts_after(a.last_part());
    let (w3, _) = b.spool_open_parts(T0 + 1_000);
    assert!(w3.is_empty() || w3[0].part > a.last_part());
}

#[test]
fn a_reshaped_observation_closes_its_window_early() {
    let mut a = agg();
    a.ingest(
        &Drained {
            flows: vec![flow(1, ip(9), 40000, 80, DIRECTION_EGRESS, 1, 100, 0)],
            ..Default::default()
        },
        T0 + 1,
    );
    let mut s = spec();
    s.observations[0].group_by.push(flowlens_api::GroupBy::Pod);
    s.observations[0].generation = 2;
    a.set_config(&s, T0 + 2_000);
    let (w, _) = a.close_due(T0 + 3_000);
    assert_eq!(w.len(), 1);
    assert!(!w[0].complete);
    assert_eq!(totals(&w[0]).2, 100);
}

#[test]
fn kernel_drops_join_the_series_of_the_endpoint_that_dropped() {
    let mut a = agg();
    // UDP to a closed port of the server: counted at both interfaces, the
    // drops (3 datagrams) on the server's ingress key only.
    let mut to_server = flow(2, ip(1), 9, 40000, DIRECTION_INGRESS, 3, 300, 0);
    to_server.0.protocol = 17;
    to_server.1.drops = 3;
    let mut from_client = flow(1, ip(2), 40000, 9, DIRECTION_EGRESS, 3, 300, 0);
    from_client.0.protocol = 17;
    a.ingest(
        &Drained {
            flows: vec![from_client, to_server],
            ..Default::default()
        },
        T0 + 1000,
    );
    let (windows, _) = a.close_due(T0 + 10_000);
    let w = &windows[0];
    let drops: u64 = w.series.iter().map(|s| s.drops).sum();
    assert_eq!(drops, 3, "{:#?}", w.series);
    let server = w
        .series
        .iter()
        .find(|s| s.local.workload.as_deref() == Some("Deployment/server"))
        .unwrap();
    assert_eq!(server.drops, 3);
    // The datagrams themselves still count once (at the client).
    assert_eq!(totals(w).1, 3);
}

/// A pod opening more connections in a window than the aggregator keeps:
/// every byte is still counted, flows are undercounted (never twice), the
/// memory stays bounded and what it gave up is counted.
#[test]
fn a_connection_flood_keeps_every_byte_and_bounds_the_state() {
    let mut a = agg();
    let extra = 100usize;
    let n = MAX_WINDOW_CONNECTIONS + extra;
    let remote = v4_mapped([192, 168, 1, 1]);
    let conn = |i: usize| {
        let mut r = remote;
        r[14] = (i >> 16) as u8;
        flow(
            1,
            r,
            (i & 0xffff) as u16,
            443,
            DIRECTION_EGRESS,
            1,
            100,
            FLOW_FLAG_SYN,
        )
    };
    a.ingest(
        &Drained {
            flows: (0..n).map(conn).collect(),
            ..Default::default()
        },
        T0 + 500,
    );
    // The same connections again in a later drain of the same window: the
    // tracked ones are known, the untracked ones still not counted twice.
    a.ingest(
        &Drained {
            flows: (0..n).map(conn).collect(),
            ..Default::default()
        },
        T0 + 1500,
    );
    assert!(a.roles.len() <= MAX_REMEMBERED_ROLES);
    assert_eq!(a.stats.flows_not_counted, 2 * extra as u64);
    assert_eq!(
        a.stats.roles_not_remembered,
        2 * (n - MAX_REMEMBERED_ROLES) as u64
    );
    let (w, _) = a.close_due(T0 + 10_000);
    let (flows, packets, bytes) = totals(&w[0]);
    assert_eq!(flows, MAX_WINDOW_CONNECTIONS as u64);
    assert_eq!(packets, 2 * n as u64);
    assert_eq!(bytes, 200 * n as u64);
}

/// Live records: a connection between two local pods once, at its client,
/// with the opening counted; a blocked attempt with its policy and the
/// time of its last match.
#[test]
fn live_records_show_each_connection_once_and_attempts_with_their_policy() {
    use flowlens_api::live::{LiveDirection, LiveVerdict};
    let mut a = agg();
    let tables = Arc::new(crate::tables::compile(
        &spec(),
        &[],
        crate::tables::Capacity::UNLIMITED,
    ));
    a.set_generation_tables(1, tables);
    let d = Drained {
        flows: vec![
            flow(
                1,
                ip(2),
                40000,
                5201,
                DIRECTION_EGRESS,
                3,
                180,
                FLOW_FLAG_SYN,
            ),
            flow(
                1,
                ip(2),
                40000,
                5201,
                DIRECTION_INGRESS,
                2,
                120,
                FLOW_FLAG_SYN_ACK,
            ),
            flow(
                2,
                ip(1),
                5201,
                40000,
                DIRECTION_INGRESS,
                3,
                180,
                FLOW_FLAG_SYN,
            ),
            flow(
                2,
                ip(1),
                5201,
                40000,
                DIRECTION_EGRESS,
                2,
                120,
                FLOW_FLAG_SYN_ACK,
            ),
            // Inbound from outside the node: shown at the server.
            flow(2, ip(7), 5201, 50000, DIRECTION_INGRESS, 1, 60, 0),
        ],
        attempts: vec![(
            AttemptKey {
                scope: rule_scope(1, DIRECTION_EGRESS, 1),
                slot: 0,
                verdict: VERDICT_DROP,
                protocol: 6,
                _pad: 0,
                remote_port: 5432,
                local_port: 40001,
                peer: ip(9),
            },
            AttemptStats {
                attempts: 4,
                packets: 0,
                last_ns: 99_000_000_000,
            },
        )],
        read_at_ns: 100_000_000_000,
        ..Default::default()
    };
    a.ingest(&d, T0);
    let mut live = a.live_records(&d, T0);
    live.sort_by_key(|r| (r.pod.clone(), r.peer.clone()));
    assert_eq!(live.len(), 3, "{live:?}");
    let client = &live[0];
    assert_eq!(
        (client.pod.as_str(), client.peer.as_str()),
        ("client-1", "10.0.0.2")
    );
    assert_eq!(client.direction, LiveDirection::Egress);
    assert_eq!(
        (
            client.port,
            client.connections,
            client.packets,
            client.bytes
        ),
        (5201, 1, 5, 300)
    );
    let blocked = &live[1];
    assert_eq!(blocked.verdict, LiveVerdict::Blocked);
    assert_eq!(blocked.policy.as_deref(), Some("a/p"));
    assert_eq!(
        (blocked.peer.as_str(), blocked.port, blocked.connections),
        ("10.0.0.9", 5432, 4)
    );
    assert_eq!(
        blocked.time,
        T0 - 1_000,
        "the last match, from the kernel's clock"
    );
    let inbound = &live[2];
    assert_eq!(
        (inbound.pod.as_str(), inbound.peer.as_str()),
        ("server-1", "10.0.0.7")
    );
    assert_eq!(inbound.direction, LiveDirection::Ingress);
    assert_eq!(
        (inbound.port, inbound.connections),
        (5201, 0),
        "no SYN seen"
    );
}

#[test]
fn dns_answers_name_the_connections_that_follow_and_fill_the_window() {
    use crate::dns::{
        message::{DnsMessage, ParseError},
        tracker::DnsPacket,
    };

    let mut a = agg();
    let resolver = v4_mapped([192, 168, 1, 53]);
    let web = v4_mapped([203, 0, 113, 7]);
    let packet =
        |ts_ns: u64, from_pod: bool, id: u16, rcode: u16, qname: &str, answers| DnsPacket {
            ts_ns,
            local: ip(1),
            remote: resolver,
            local_port: 5353,
            remote_port: 53,
            protocol: 17,
            from_pod,
            message: Ok(DnsMessage {
                id,
                response: !from_pod,
                rcode,
                qname: Some(qname.into()),
                answers,
                cut: false,
            }),
        };
    let answer = vec![("203.0.113.7".parse().unwrap(), 30)];
    a.ingest_dns(
        &[
            packet(1_000_000, true, 1, 0, "api.example", vec![]),
            packet(21_000_000, false, 1, 0, "api.example", answer),
            packet(30_000_000, true, 2, 0, "gone.example", vec![]),
            packet(32_000_000, false, 2, 3, "gone.example", vec![]),
            // Never answered.
            packet(40_000_000, true, 3, 0, "slow.example", vec![]),
            // Unreadable.
            DnsPacket {
                message: Err(ParseError::Short),
                ..packet(50_000_000, false, 9, 0, "x.example", vec![])
            },
        ],
        T0 + 100,
    );
    a.ingest(
        &Drained {
            flows: vec![flow(
                1,
                web,
                40000,
                443,
                DIRECTION_EGRESS,
                3,
                300,
                FLOW_FLAG_SYN,
            )],
            ..Default::default()
        },
        T0 + 500,
    );
    // The query of slow.example gives up within the window.
    a.ingest(&Drained::default(), T0 + 100 + dns_wait());
    let (w, _) = a.close_due(T0 + 20_000);
    let w = w.iter().find(|w| w.start == T0 / 1000).unwrap();
    let to_web = w
        .series
        .iter()
        .find(|s| s.remote.as_deref() == Some("203.0.113.7"))
        .unwrap();
    assert_eq!(to_web.remote_name.as_deref(), Some("api.example"));
    let dns = w.dns.as_ref().unwrap();
    assert_eq!(dns.queries, 3);
    assert_eq!(
        dns.responses,
        [("NOERROR".to_owned(), 1), ("NXDOMAIN".to_owned(), 1)].into()
    );
    assert_eq!(dns.unanswered, 1);
    assert_eq!(dns.latency.count(), 2);
    let median = dns.latency.quantile(0.5).unwrap();
    assert!((2_000..=20_000 + 20_000 / 32).contains(&median), "{median}");
    assert_eq!(dns.top_names.len(), 3);
    assert_eq!(a.dns.stats.unreadable, 1);
}

fn dns_wait() -> i64 {
    crate::dns::tracker::ANSWER_WAIT_MS
}

#[test]
fn connections_group_both_directions_sorted_or_not() {
    let remote = v4_mapped([192, 168, 1, 1]);
    let other = v4_mapped([192, 168, 1, 2]);
    // Two connections, their directions interleaved (the kernel's bucket
    // order), and an RTT sample of a third with no flow record.
    let flows = vec![
        flow(
            1,
            remote,
            40000,
            443,
            DIRECTION_EGRESS,
            2,
            120,
            FLOW_FLAG_SYN,
        ),
        flow(1, other, 40001, 443, DIRECTION_INGRESS, 5, 500, 0),
        flow(
            1,
            remote,
            40000,
            443,
            DIRECTION_INGRESS,
            3,
            300,
            FLOW_FLAG_SYN_ACK,
        ),
        flow(1, other, 40001, 443, DIRECTION_EGRESS, 7, 700, 0),
    ];
    let rtt_only = RttKey {
        local_addr: ip(1),
        remote_addr: v4_mapped([192, 168, 1, 3]),
        local_port: 40002,
        remote_port: 443,
        bucket: rtt_bucket(1_000),
        _pad: 0,
    };
    let collect = |d: &Drained| {
        let mut out = Vec::new();
        for_each_connection(d, |id, f| {
            out.push((
                id.remote,
                f.tx.packets,
                f.rx.packets,
                f.tx_flags,
                f.rx_flags,
                f.rtt.count(),
            ))
        });
        out.sort();
        out
    };
    let mut d = Drained {
        flows,
        rtt: vec![(rtt_only, 4)],
        ..Default::default()
    };
    let unsorted = collect(&d);
    d.sort_flows();
    let sorted = collect(&d);
    assert_eq!(unsorted, sorted);
    assert_eq!(
        sorted,
        vec![
            (remote, 2, 3, FLOW_FLAG_SYN, FLOW_FLAG_SYN_ACK, 0),
            (other, 7, 5, 0, 0, 0),
            (v4_mapped([192, 168, 1, 3]), 0, 0, 0, 0, 4),
        ]
    );
}

/// Two pods of one workload (or one pod's endpoint in two views) project
/// to equal dimensions held in different `Arc`s: their series keys must be
/// one key, although only the precomputed hash is hashed.
#[test]
fn equal_dimensions_in_different_arcs_make_one_series_key() {
    let endpoint = |pod: &str| FlowEndpoint {
        namespace: Some("a".into()),
        workload: Some("Deployment/client".into()),
        pod: (!pod.is_empty()).then(|| pod.to_owned()),
        ..Default::default()
    };
    let key = |dims: LocalDims| SeriesKey {
        local: Arc::new(dims),
        ..SeriesKey::other()
    };
    let mut series: FastMap<SeriesKey, u32> = FastMap::default();
    *series.entry(key(LocalDims::new(endpoint("")))).or_default() += 1;
    *series.entry(key(LocalDims::new(endpoint("")))).or_default() += 1;
    assert_eq!(series.len(), 1, "equal dimensions, one series");
    assert_eq!(series.values().next(), Some(&2));
    *series
        .entry(key(LocalDims::new(endpoint("client-1"))))
        .or_default() += 1;
    assert_eq!(series.len(), 2, "other dimensions, another series");
}
