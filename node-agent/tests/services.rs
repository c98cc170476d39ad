//! Services on the real kernel: a local pod's `connect()` to a Service
//! address goes to a backend the rules allow (no kube-proxy is needed, so
//! none runs here: a connection that succeeds was translated), is refused at
//! `connect()` when every backend is blocked, is counted once under the
//! backend pod with the Service named, and `getpeername()` still says the
//! Service address.

use std::time::Duration;

use flowlens_api::{
    flow_policy::{PolicyMode, Protocol},
    node_agent_config::Direction,
    report::Role,
};
use flowlens_e2e::{
    agent::Agent,
    config::SpecBuilder,
    process::{Proc, wait_for, workspace_bin},
    topology::Topology,
};
use serde_json::Value;

const TCP: Protocol = Protocol::Tcp;
/// A Service address no interface or route knows: only a translated
/// connection can reach anything.
const VIP: &str = "10.96.77.10";
const VIP6: &str = "fd00:96::77:10";

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

fn connect_loop(topo: &Topology, pod: usize, to: &str, duration_ms: u64) -> Value {
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
            "1000",
        ],
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "connect-loop: {e}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
fn a_service_connect_goes_to_an_allowed_backend_or_is_refused_when_all_are_blocked() {
    let mut topo = Topology::new();
    let n = topo.add_node("n1", None);
    let web = topo.add_pod(n, "web");
    let db1 = topo.add_pod(n, "db1");
    let db2 = topo.add_pod(n, "db2");
    let udp_echo = "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.bind(('0.0.0.0', 5353))\nwhile True:\n    d, a = s.recvfrom(100)\n    s.sendto(d, a)\n";
    let _servers = [
        echo(&topo, db1, 5432),
        echo(&topo, db2, 5432),
        echo(&topo, db1, 8080),
        Proc::spawn(
            "udp-echo",
            topo.pod_cmd(db2, "python3", &["-c", udp_echo]),
            None,
        ),
    ];
    std::thread::sleep(Duration::from_millis(200));

    // db: port 5432 -> the two db pods; api: port 80 -> db1's 8080.
    let mut b = SpecBuilder::new(&topo, 0);
    b.trace("obs", 2, &[web, db1, db2])
        .service("db", VIP, 5432, &[(db1, 5432), (db2, 5432)])
        .service("db", VIP6, 5432, &[(db1, 5432), (db2, 5432)])
        .service("api", "10.96.77.11", 80, &[(db1, 8080)])
        .service_of(Protocol::Udp, "dns", "10.96.77.12", 53, &[(db2, 5353)]);
    let spec = b.build();
    let mut agent = Agent::standalone(&topo, 0, &spec, &[]);

    let open = connect_loop(&topo, web, &format!("{VIP}:5432"), 300);
    println!("web -> db Service, no rule: {open}");
    assert_eq!(
        open["successes"], open["attempts"],
        "every connect translated: {open}"
    );
    let open6 = connect_loop(&topo, web, &format!("[{VIP6}]:5432"), 100);
    assert_eq!(open6["successes"], open6["attempts"], "IPv6: {open6}");
    let api = connect_loop(&topo, web, "10.96.77.11:80", 100);
    assert_eq!(
        api["successes"], api["attempts"],
        "port 80 -> targetPort 8080: {api}"
    );

    // getpeername() says the Service address, as through kube-proxy.
    let peer = topo.pod_output(
        web,
        "python3",
        &[
            "-c",
            &format!(
                "import socket; s = socket.create_connection(('{VIP}', 5432), timeout=2); print(s.getpeername())"
            ),
        ],
    );
    let peer = String::from_utf8_lossy(&peer.stdout);
    assert_eq!(peer.trim(), format!("('{VIP}', 5432)"), "getpeername");

    // A connected UDP socket (glibc's resolver) gets its replies from the
    // Service address it connected to, not from the backend.
    let reply = topo.pod_output(
        web,
        "python3",
        &[
            "-c",
            "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2); \
             s.connect(('10.96.77.12', 53)); s.send(b'q'); d, a = s.recvfrom(100); print(d.decode(), a)",
        ],
    );
    let ss = topo.pod_output(db2, "ss", &["-uanp"]);
    let err = format!(
        "{}\n{}",
        String::from_utf8_lossy(&reply.stderr),
        String::from_utf8_lossy(&ss.stdout)
    );
    let reply = String::from_utf8_lossy(&reply.stdout);
    assert_eq!(reply.trim(), "q ('10.96.77.12', 53)", "recvmsg: {err}");
    // sendto() on an unconnected socket (musl's resolver) too.
    let reply = topo.pod_output(
        web,
        "python3",
        &[
            "-c",
            "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2); \
             s.sendto(b'u', ('10.96.77.12', 53)); d, a = s.recvfrom(100); print(d.decode(), a)",
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&reply.stdout).trim(),
        "u ('10.96.77.12', 53)",
        "sendmsg: {}",
        String::from_utf8_lossy(&reply.stderr)
    );

    // Counted under the backend pods, with the Service named, once.
    let named = wait_for(Duration::from_secs(10), || {
        let d = agent.dump()?;
        let series: Vec<_> = d
            .live
            .iter()
            .chain(d.history.iter())
            .flat_map(|w| w.series.clone())
            .filter(|s| s.role == Role::Client && s.local.pod.as_deref() == Some("web"))
            .collect();
        let flows: u64 = series
            .iter()
            .filter(|s| s.service.as_deref() == Some("test/db") && s.port == 5432)
            .map(|s| s.flows)
            .sum();
        (flows >= open["successes"].as_u64()? + open6["successes"].as_u64()?).then_some(series)
    })
    .expect("web's connections through the db Service, named");
    for s in &named {
        let remote = s.remote.clone().unwrap_or_default();
        assert!(
            remote != VIP && remote != VIP6,
            "a series names the Service address instead of the backend: {s:?}"
        );
    }
    assert!(
        named
            .iter()
            .any(|s| s.service.as_deref() == Some("test/api") && s.port == 8080),
        "api's connections are to db1:8080: {named:?}"
    );

    // A rule blocking db1:5432 for web: every connection goes to db2.
    let db1_ips = [
        format!("{}/32", topo.pods[db1].ip4),
        format!("{}/128", topo.pods[db1].ip6),
    ];
    b.rule(
        "no-db1",
        Direction::Egress,
        PolicyMode::Enforce,
        &[web],
        &[&db1_ips[0], &db1_ips[1]],
        &[(TCP, 5432, 5432)],
    );
    let spec = b.build();
    agent.set_config(&spec);
    agent.wait_revision(&spec.revision, Duration::from_secs(10));
    let some = connect_loop(&topo, web, &format!("{VIP}:5432"), 300);
    println!("db1 blocked: {some}");
    assert_eq!(
        some["successes"], some["attempts"],
        "db2 takes them all: {some}"
    );
    assert_eq!(
        agent
            .dump()
            .unwrap()
            .policy("test", "no-db1")
            .blocked
            .connections,
        0
    );

    // Both blocked: refused at connect(), immediately, and counted.
    let db2_ips = [
        format!("{}/32", topo.pods[db2].ip4),
        format!("{}/128", topo.pods[db2].ip6),
    ];
    b.rule(
        "no-db2",
        Direction::Egress,
        PolicyMode::Enforce,
        &[web],
        &[&db2_ips[0], &db2_ips[1]],
        &[(TCP, 5432, 5432)],
    );
    let spec = b.build();
    agent.set_config(&spec);
    agent.wait_revision(&spec.revision, Duration::from_secs(10));
    let none = connect_loop(&topo, web, &format!("{VIP}:5432"), 300);
    println!("db1 and db2 blocked: {none}");
    assert_eq!(none["successes"], 0);
    assert_eq!(
        none["denied"], none["attempts"],
        "refused at connect(): {none}"
    );
    let none6 = connect_loop(&topo, web, &format!("[{VIP6}]:5432"), 100);
    assert_eq!(none6["denied"], none6["attempts"], "IPv6: {none6}");
    let counted = wait_for(Duration::from_secs(5), || {
        let d = agent.dump()?;
        let n = d.policy("test", "no-db1").blocked.connections
            + d.policy("test", "no-db2").blocked.connections;
        (n >= none["attempts"].as_u64()? + none6["attempts"].as_u64()?).then_some(n)
    });
    assert!(counted.is_some(), "every refusal counted");
    // The other Service still works.
    let api = connect_loop(&topo, web, "10.96.77.11:80", 100);
    assert_eq!(api["successes"], api["attempts"], "{api}");

    // A rule written against the Service address itself still applies.
    b.remove_policy("no-db1").remove_policy("no-db2").rule(
        "no-api-address",
        Direction::Egress,
        PolicyMode::Enforce,
        &[web],
        &["10.96.77.11/32"],
        &[(TCP, 80, 80)],
    );
    let spec = b.build();
    agent.set_config(&spec);
    agent.wait_revision(&spec.revision, Duration::from_secs(10));
    let api = connect_loop(&topo, web, "10.96.77.11:80", 100);
    assert_eq!(
        api["denied"], api["attempts"],
        "an ipBlock on the ClusterIP: {api}"
    );
    let db = connect_loop(&topo, web, &format!("{VIP}:5432"), 100);
    assert_eq!(db["successes"], db["attempts"], "{db}");
}
