//! A hostile pod against the TC programs: packets crafted to be taken for
//! replies, so that the rules meant for them are skipped. Each case was seen
//! to get through before its fix.

use std::time::Duration;

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

/// Counts the UDP datagrams that reach `port` for `secs` seconds.
const UDP_COUNTER: &str = "
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(('0.0.0.0', int(sys.argv[1])))
s.settimeout(0.2)
n, end = 0, time.time() + float(sys.argv[2])
while time.time() < end:
    try:
        s.recvfrom(100); n += 1
    except socket.timeout:
        pass
print(n)
";

/// Sends `count` datagrams from source port `sport` to `dst:dport`.
const UDP_SENDER: &str = "
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(('0.0.0.0', int(sys.argv[1])))
for _ in range(int(sys.argv[4])):
    s.sendto(b'x', (sys.argv[2], int(sys.argv[3]))); time.sleep(0.01)
";

/// Datagrams `from` sent from source port `sport` that reached `to:port`.
fn udp_received(topo: &Topology, from: usize, sport: u16, to: usize, port: u16) -> u64 {
    let counter = std::thread::scope(|sc| {
        let h = sc.spawn(|| {
            topo.pod_output(
                to,
                "python3",
                &["-c", UDP_COUNTER, &port.to_string(), "1.5"],
            )
        });
        std::thread::sleep(Duration::from_millis(300));
        let dst = topo.pods[to].ip4.to_string();
        let sent = topo.pod_output(
            from,
            "python3",
            &[
                "-c",
                UDP_SENDER,
                &sport.to_string(),
                &dst,
                &port.to_string(),
                "10",
            ],
        );
        assert!(
            sent.status.success(),
            "sender: {}",
            String::from_utf8_lossy(&sent.stderr)
        );
        h.join().unwrap()
    });
    String::from_utf8_lossy(&counter.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("counter: {}", String::from_utf8_lossy(&counter.stderr)))
}

#[test]
fn udp_from_a_low_source_port_is_not_taken_for_a_reply() {
    let mut topo = Topology::new();
    let n = topo.add_node("n1", None);
    let a = topo.add_pod(n, "a");
    let b = topo.add_pod(n, "b");
    let b_ip = format!("{}/32", topo.pods[b].ip4);
    let mut cfg = SpecBuilder::new(&topo, 0);
    // a may not send UDP to b:5000; b takes no UDP on 5001 from anyone.
    cfg.rule(
        "no-5000",
        Direction::Egress,
        PolicyMode::Enforce,
        &[a],
        &[&b_ip],
        &[(Protocol::Udp, 5000, 5000)],
    )
    .rule(
        "quarantine-5001",
        Direction::Ingress,
        PolicyMode::Enforce,
        &[b],
        &[],
        &[(Protocol::Udp, 5001, 5001)],
    );
    let spec = cfg.build();
    let _agent = Agent::standalone(&topo, 0, &spec, &[]);
    let egress = udp_received(&topo, a, 53, b, 5000);
    let ingress = udp_received(&topo, a, 53, b, 5001);
    let ingress_4000 = udp_received(&topo, a, 4000, b, 5001);
    let allowed = udp_received(&topo, a, 53, b, 5002);
    println!(
        "from port 53: to b:5000 (egress block) {egress}/10, to b:5001 (ingress block) \
         {ingress}/10; from 4000 to b:5001 {ingress_4000}/10; to b:5002 (allowed) {allowed}/10"
    );
    assert_eq!(
        egress, 0,
        "a's egress rule skipped for a datagram from port 53"
    );
    assert_eq!(
        ingress, 0,
        "b's ingress rule skipped for a datagram from port 53"
    );
    assert_eq!(
        ingress_4000, 0,
        "b's ingress rule skipped for a datagram from port 4000"
    );
    assert_eq!(allowed, 10, "an allowed port must still work");
}

/// A bare ACK from port 80 to b:5432, then a connect() from port 80 to
/// b:5432: prints `connected` or `failed <error>`.
const ACK_THEN_CONNECT: &str = "
import socket, struct, sys
src, dst = sys.argv[1], sys.argv[2]
def csum(b):
    s = sum(struct.unpack('!%dH' % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xffff); s += s >> 16
    return ~s & 0xffff
h = struct.pack('!HHIIBBHHH', 80, 5432, 1, 1, 5 << 4, 0x10, 65535, 0, 0)
c = csum(socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack('!BBH', 0, 6, len(h)) + h)
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
raw.sendto(h[:16] + struct.pack('!H', c) + h[18:], (dst, 0))
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((src, 80)); s.settimeout(1)
try:
    s.connect((dst, 5432)); print('connected')
except Exception as e:
    print('failed', type(e).__name__)
";

#[test]
fn a_syn_after_a_bare_ack_on_the_same_ports_is_still_blocked() {
    let mut topo = Topology::new();
    let n = topo.add_node("n1", None);
    let a = topo.add_pod(n, "a");
    let b = topo.add_pod(n, "b");
    let _server = Proc::spawn(
        "echo",
        topo.pod_cmd(
            b,
            workspace_bin("flowlens-traffic"),
            &["echo-server", "--port", "5432"],
        ),
        None,
    );
    std::thread::sleep(Duration::from_millis(200));
    let b_ip = format!("{}/32", topo.pods[b].ip4);
    let mut cfg = SpecBuilder::new(&topo, 0);
    cfg.trace("obs", 5, &[a, b]).rule(
        "no-db",
        Direction::Egress,
        PolicyMode::Enforce,
        &[a],
        &[&b_ip],
        &[(Protocol::Tcp, 5432, 5432)],
    );
    let spec = cfg.build();
    // TC alone decides (no connect hook to refuse the connect() first).
    let _agent = Agent::standalone(&topo, 0, &spec, &["--cgroup-root", "none"]);
    let (src, dst) = (topo.pods[a].ip4.to_string(), topo.pods[b].ip4.to_string());
    let out = topo.pod_output(a, "python3", &["-c", ACK_THEN_CONNECT, &src, &dst]);
    let out = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    println!("bare ACK from port 80, then connect() from port 80 to b:5432: {out}");
    assert_ne!(out, "connected", "the ACK paved the SYN's way");
    assert!(out.starts_with("failed"), "{out}");
}

/// Crafted packets and the sniffer that counts what arrives (support/craft.py).
const CRAFT: &str = include_str!("support/craft.py");

/// Frames from any of `sources` that reach pod `to` while pod `from` sends
/// the crafted `case` to `dst`.
fn crafted_arrivals(
    topo: &Topology,
    from: usize,
    case: &str,
    dst: &str,
    to: usize,
    sources: &[&str],
) -> u64 {
    let src = if dst.contains(':') {
        topo.pods[from].ip6.to_string()
    } else {
        topo.pods[from].ip4.to_string()
    };
    let sniffed = std::thread::scope(|sc| {
        let h = sc.spawn(|| {
            let mut args = vec!["-c", CRAFT, "sniff", "1.2"];
            args.extend_from_slice(sources);
            topo.pod_output(to, "python3", &args)
        });
        std::thread::sleep(Duration::from_millis(300));
        let sent = topo.pod_output(from, "python3", &["-c", CRAFT, "send", case, &src, dst]);
        assert!(
            sent.status.success(),
            "{case}: {}",
            String::from_utf8_lossy(&sent.stderr)
        );
        h.join().unwrap()
    });
    String::from_utf8_lossy(&sniffed.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("sniffer: {}", String::from_utf8_lossy(&sniffed.stderr)))
}

/// Fragments, long IPv6 extension-header chains, spoofed sources and
/// neighbour discovery used as a data channel, against rules that stop the
/// plain packets. Each got through before its fix (ports of later fragments
/// were unknown, a first fragment too short for the TCP header was not
/// parsed, four extension headers were walked, neighbour discovery passed to
/// any address, a pod's source address was not checked).
#[test]
fn crafted_packets_do_not_get_past_the_rules() {
    crafted_packets_against_rules(true);
}

/// The same with no pod traced: established connections then pass by the
/// verdict cache (`FL_CONNS`), not the flow table, and a forged packet must
/// not take that path either.
#[test]
fn crafted_packets_do_not_get_past_the_rules_of_pods_not_traced() {
    crafted_packets_against_rules(false);
}

fn crafted_packets_against_rules(traced: bool) {
    let mut topo = Topology::new();
    let n = topo.add_node("n1", None);
    let a = topo.add_pod(n, "a");
    let b = topo.add_pod(n, "b");
    let c = topo.add_pod(n, "c");
    let (b4, b6) = (topo.pods[b].ip4.to_string(), topo.pods[b].ip6.to_string());
    let (b4_net, b6_net) = (format!("{b4}/32"), format!("{b6}/128"));
    let mut cfg = SpecBuilder::new(&topo, 0);
    // a may not reach b on TCP 5432 or UDP 5000; c may not reach b at all.
    if traced {
        cfg.trace("obs", 5, &[a, b, c]);
    }
    cfg.rule(
        "no-db",
        Direction::Egress,
        PolicyMode::Enforce,
        &[a],
        &[&b4_net, &b6_net],
        &[(Protocol::Tcp, 5432, 5432), (Protocol::Udp, 5000, 5000)],
    )
    .rule(
        "isolated",
        Direction::Egress,
        PolicyMode::Enforce,
        &[c],
        &[&b4_net, &b6_net],
        &[],
    );
    let spec = cfg.build();
    let agent = Agent::standalone(&topo, 0, &spec, &["--cgroup-root", "none"]);
    // Neighbours resolved first: what is counted below is the crafted packets.
    for p in [a, c] {
        topo.pod_output(p, "ping", &["-c1", "-W1", &b4]);
        topo.pod_output(p, "ping", &["-6", "-c1", "-W1", &b6]);
    }
    let (a4, a6, c6) = (
        topo.pods[a].ip4.to_string(),
        topo.pods[a].ip6.to_string(),
        topo.pods[c].ip6.to_string(),
    );
    let cases: [(&str, usize, &str, &str, u64); 12] = [
        // (what, from, case, to address, frames expected at b)
        (
            "SYN to 5432 in 8-byte fragments",
            a,
            "syn-in-8-byte-fragments",
            &b4,
            0,
        ),
        (
            "UDP to 5000 in fragments",
            a,
            "udp-in-fragments:5000",
            &b4,
            0,
        ),
        (
            "UDP to 5002 (allowed) in fragments",
            a,
            "udp-in-fragments:5002",
            &b4,
            5,
        ),
        ("a later fragment alone", a, "lone-later-fragment", &b4, 0),
        (
            "SYN to 5432 behind 5 destination options",
            a,
            "syn-behind-dest-opts:5:5432",
            &b6,
            0,
        ),
        (
            "SYN to 5432 behind 9 destination options",
            a,
            "syn-behind-dest-opts:9:5432",
            &b6,
            0,
        ),
        (
            "SYN to 5433 (allowed) behind 5 destination options",
            a,
            "syn-behind-dest-opts:5:5433",
            &b6,
            1,
        ),
        (
            "neighbour solicitation with data, egress blocked",
            c,
            "neighbour-solicitation-with-data",
            &b6,
            0,
        ),
        (
            "neighbour solicitation with data, allowed",
            a,
            "neighbour-solicitation-with-data",
            &b6,
            1,
        ),
        (
            "UDP to 5002 from a spoofed source",
            a,
            "udp-from:10.250.0.99",
            &b4,
            0,
        ),
        (
            "UDP to 5002 from its own source",
            a,
            &format!("udp-from:{a4}"),
            &b4,
            1,
        ),
        // Right after the case above (usually within one drain period), so
        // a's flow entry (or, not traced, its cached verdict) for these
        // ports is there and known to pass: the fast path must not take c's
        // forgery for a's packet.
        (
            "UDP to 5002 from c with a's address and ports",
            c,
            &format!("udp-from:{a4}"),
            &b4,
            0,
        ),
    ];
    let mut wrong = Vec::new();
    for (what, from, case, dst, expected) in cases {
        let sources = [a4.as_str(), a6.as_str(), c6.as_str(), "10.250.0.99"];
        let got = crafted_arrivals(&topo, from, case, dst, b, &sources);
        println!("{what}: {got} frame(s) reached b (expected {expected})");
        if got != expected {
            wrong.push(format!(
                "{what}: {got} frame(s) reached b, expected {expected}"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    // Each kind was seen and counted by reason.
    for reason in [
        "orphan_fragment",
        "truncated",
        "ipv6_extension_headers",
        "spoofed_source",
    ] {
        // The metrics follow the kernel's counters at each drain (the
        // 5 s window).
        let n = wait_for(Duration::from_secs(15), || {
            let n = agent.metric_sum(
                "flowlens_agent_suspect_packets_total",
                &format!("reason=\"{reason}\""),
            );
            (n >= 1.0).then_some(n)
        });
        println!("suspect packets, {reason}: {n:?}");
        assert!(n.is_some(), "no suspect packet counted as {reason}");
    }
}

/// Sends `count` malformed 40-byte DNS messages (a header promising 65,535
/// answers) to `dst:53` as fast as Python can, and prints how many the
/// socket took.
const DNS_FLOOD: &str = "
import socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
junk, n = struct.pack('!6H', 1, 0x8180, 0, 0xffff, 0, 0) + bytes(28), 0
for _ in range(int(sys.argv[2])):
    try:
        s.sendto(junk, (sys.argv[1], 53)); n += 1
    except OSError:
        pass
print(n)
";

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// The host side's receive drops of a pod's interface (packets the pod sent
/// that never reached the TC programs).
fn rx_dropped(topo: &Topology, pod: usize) -> u64 {
    let out = topo
        .node_cmd(
            topo.pods[pod].node,
            "ip",
            &["-s", "-j", "link", "show", &topo.pods[pod].host_if],
        )
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v[0]["stats64"]["rx"]["dropped"].as_u64().unwrap_or(0)
}

/// A pod floods port 53 with malformed DNS far past the copy budget: every
/// packet is still counted, the copies over budget are dropped and
/// counted (never waited for), the rules still hold, and the agent stays up.
#[test]
fn a_dns_flood_is_counted_exactly_and_its_copies_stay_within_the_budget() {
    let mut topo = Topology::new();
    let n = topo.add_node("n1", None);
    let a = topo.add_pod(n, "a");
    let b = topo.add_pod(n, "b");
    let b_ip = format!("{}/32", topo.pods[b].ip4);
    let mut cfg = SpecBuilder::new(&topo, 0);
    cfg.trace("obs", 5, &[a]).rule(
        "no-5000",
        Direction::Egress,
        PolicyMode::Enforce,
        &[a],
        &[&b_ip],
        &[(Protocol::Udp, 5000, 5000)],
    );
    let spec = cfg.build();
    let agent = Agent::standalone(&topo, 0, &spec, &[]);
    let from = {
        let t = now_s();
        t - t % 5
    };
    let dropped_before = rx_dropped(&topo, a);
    let out = topo.pod_output(
        a,
        "python3",
        &["-c", DNS_FLOOD, &topo.pods[b].ip4.to_string(), "100000"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sent: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert_eq!(
        rx_dropped(&topo, a),
        dropped_before,
        "the veth dropped some: the ground truth would not be exact"
    );
    // The rules hold during and after the flood.
    let blocked = udp_received(&topo, a, 4000, b, 5000);
    let allowed = udp_received(&topo, a, 4000, b, 5002);

    let until = now_s() + 1;
    let windows = agent.windows("obs", from, until, Duration::from_secs(20));
    let b_ip4 = topo.pods[b].ip4.to_string();
    let counted: u64 = windows
        .iter()
        .flat_map(|w| w.series.iter())
        .filter(|s| s.remote.as_deref() == Some(b_ip4.as_str()) && s.port == 53 && s.protocol == 17)
        .map(|s| s.tx.packets)
        .sum();
    let copied = agent.metric_sum("flowlens_agent_dns_messages_total", "outcome=\"copied\"");
    let over = agent.metric_sum(
        "flowlens_agent_dns_messages_total",
        "outcome=\"dropped_in_kernel\"",
    );
    let unreadable = agent.metric_sum(
        "flowlens_agent_dns_messages_total",
        "outcome=\"unreadable\"",
    );
    println!(
        "DNS flood: {sent} sent, {counted} counted; copies: {copied} made, {over} dropped, \
         {unreadable} unreadable; b:5000 (blocked) {blocked}/10, b:5002 {allowed}/10"
    );
    assert_eq!(counted, sent, "every packet of the flood counted, once");
    assert_eq!(
        copied + over,
        sent as f64,
        "every packet copied or counted as not"
    );
    assert!(
        over > 0.0,
        "100,000 packets at once must exceed the copy budget"
    );
    assert_eq!(unreadable, copied, "every copy read, and none readable");
    assert_eq!((blocked, allowed), (0, 10));
    assert!(agent.dump().is_some(), "the agent answers after the flood");
}
