use std::collections::{BTreeMap, HashMap, HashSet};

use flowlens_api::{
    node_agent_config::WorkloadRef,
    report::{Series, Traffic},
};

use super::*;

#[derive(Default)]
struct Dir {
    pods: HashMap<IpAddr, PodInfo>,
    nodes: HashMap<IpAddr, NodeInfo>,
    traced: HashSet<IpAddr>,
    zones: BTreeMap<String, String>,
}

impl Directory for Dir {
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

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

impl Dir {
    fn new() -> Self {
        let mut d = Dir::default();
        d.zones.insert("n1".into(), "z1".into());
        d.zones.insert("n2".into(), "z2".into());
        d.zones.insert("n3".into(), "z1".into());
        d
    }

    /// An address of node `node` (a node address or a host-network pod's).
    fn add_node_address(&mut self, addr: &str, node: &str) {
        let n = NodeInfo {
            name: node.into(),
            uid: node.into(),
            zone: self.zones.get(node).cloned(),
            addresses: vec![ip(addr)],
        };
        self.nodes.insert(ip(addr), n);
    }

    fn add_pod(
        &mut self,
        addr: &str,
        ns: &str,
        name: &str,
        workload: &str,
        node: &str,
        traced: bool,
    ) {
        let p = PodInfo {
            namespace: ns.into(),
            name: name.into(),
            uid: name.into(),
            node: Some(node.into()),
            ips: vec![ip(addr)],
            labels: [
                ("app".to_string(), workload.to_string()),
                ("version".into(), "v2".into()),
            ]
            .into(),
            host_network: false,
            workload: WorkloadRef {
                kind: "Deployment".into(),
                name: workload.into(),
            },
            finished: false,
        };
        self.pods.insert(ip(addr), p);
        if traced {
            self.traced.insert(ip(addr));
        }
    }
}

fn traffic(packets: u64, bytes: u64) -> Traffic {
    Traffic {
        packets,
        bytes,
        payload_bytes: bytes - packets * 52,
    }
}

fn dims(ns: &str, workload: &str) -> FlowEndpoint {
    FlowEndpoint {
        namespace: Some(ns.into()),
        workload: Some(format!("Deployment/{workload}")),
        ..Default::default()
    }
}

#[allow(clippy::too_many_arguments)]
fn series(
    local: FlowEndpoint,
    remote: &str,
    port: u16,
    role: Role,
    flows: u64,
    tx: Traffic,
    rx: Traffic,
    rtt_micros: &[u32],
) -> Series {
    let mut rtt = Histogram::default();
    for &m in rtt_micros {
        rtt.record(m);
    }
    Series {
        local,
        remote: Some(remote.into()),
        port,
        protocol: 6,
        role,
        flows,
        tx,
        rx,
        rtt,
        ..Default::default()
    }
}

fn part(series: Vec<Series>) -> ObservationWindow {
    ObservationWindow {
        uid: "u".into(),
        observation: "o".into(),
        start: 100,
        window_seconds: 10,
        complete: true,
        series,
        ..Default::default()
    }
}

const DEFAULT: MergeParams = MergeParams {
    group_by: &[GroupBy::Namespace, GroupBy::Workload],
    keep_labels: &[],
    top_n: 10,
    max_series: 100,
};

#[test]
fn a_connection_between_traced_pods_counts_once() {
    let d = web_and_db();
    // web (n1, z1) -> db (n2, z2).
    let from_n1 = part(vec![web_db_side(Role::Client, &[1000, 1000])]);
    let from_n2 = part(vec![web_db_side(Role::Server, &[1000])]);
    let r = merge(
        100,
        110,
        &[("n1".into(), from_n1), ("n2".into(), from_n2)],
        &DEFAULT,
        &d,
    );
    assert_eq!(r.nodes_reporting, 2);
    assert_eq!((r.packets, r.bytes, r.flows), (15, 10_780, 1));
    assert_eq!(r.payload_bytes, 10_000);
    assert_eq!(r.cross_zone_bytes, 10_780, "n1 is in z1, n2 in z2");
    assert_eq!(r.top_flows.len(), 1, "both sides are one flow");
    let f = &r.top_flows[0];
    assert_eq!(f.source.workload.as_deref(), Some("Deployment/web"));
    assert_eq!(f.destination.workload.as_deref(), Some("Deployment/db"));
    assert_eq!(
        (f.port, f.protocol.as_str(), f.bytes, f.flows),
        (5432, "TCP", 10_780, 1)
    );
    let l = r.latency.unwrap();
    assert_eq!(
        l.samples, 2,
        "the client's samples only: both ends are traced"
    );
    assert!((968..=1032).contains(&l.p50_micros), "{l:?}");
}

#[test]
fn traffic_with_untraced_peers_counts_both_directions() {
    let mut d = Dir::new();
    d.add_pod("10.0.1.1", "shop", "web-1", "web", "n1", true);
    d.add_pod("10.0.3.1", "other", "cache-1", "cache", "n3", false);
    let p = part(vec![
        series(
            dims("shop", "web"),
            "10.0.3.1",
            6379,
            Role::Client,
            2,
            traffic(4, 400),
            traffic(4, 800),
            &[],
        ),
        series(
            dims("shop", "web"),
            "203.0.113.9",
            443,
            Role::Client,
            1,
            traffic(3, 300),
            traffic(3, 3000),
            &[],
        ),
    ]);
    let r = merge(100, 110, &[("n1".into(), p)], &DEFAULT, &d);
    assert_eq!((r.bytes, r.flows), (4500, 3));
    assert_eq!(
        r.cross_zone_bytes, 0,
        "n3 is in z1 too; external has no zone"
    );
    let ext = &r.top_flows[0];
    assert_eq!(ext.destination.address.as_deref(), Some("203.0.113.9"));
    assert!(ext.destination.external);
    let cache = &r.top_flows[1];
    assert_eq!(cache.destination.namespace.as_deref(), Some("other"));
    assert!(!cache.destination.external);
}

#[test]
fn external_peers_carry_the_name_their_pods_resolved_and_group_by_it() {
    let mut d = Dir::new();
    d.add_pod("10.0.1.1", "shop", "web-1", "web", "n1", true);
    let named = |addr: &str, name: Option<&str>, bytes: u64| {
        let mut s = series(
            dims("shop", "web"),
            addr,
            443,
            Role::Client,
            1,
            traffic(2, bytes),
            traffic(2, bytes),
            &[],
        );
        s.remote_name = name.map(str::to_owned);
        s
    };
    let mut p = part(vec![
        named("203.0.113.9", Some("cdn.example"), 1000),
        named("203.0.113.10", Some("cdn.example"), 900),
        named("198.51.100.1", None, 800),
    ]);
    let mut lat = Histogram::default();
    lat.record(20_000);
    p.dns = Some(DnsWindow {
        queries: 2,
        responses: [("NOERROR".to_owned(), 2)].into(),
        latency: lat.clone(),
        ..Default::default()
    });
    let mut p2 = part(vec![]);
    p2.dns = Some(DnsWindow {
        queries: 1,
        responses: [("NXDOMAIN".to_owned(), 1)].into(),
        latency: lat,
        ..Default::default()
    });
    let parts = [("n1".to_string(), p), ("n2".to_string(), p2)];

    // By address: each address its own row, with its name.
    let r = merge(100, 110, &parts, &DEFAULT, &d);
    assert_eq!(r.top_flows.len(), 3);
    let first = &r.top_flows[0].destination;
    assert_eq!(
        (
            first.address.as_deref(),
            first.name.as_deref(),
            first.external
        ),
        (Some("203.0.113.9"), Some("cdn.example"), true)
    );
    assert_eq!(r.top_flows[2].destination.name, None);
    let dns = dns_status(r.dns.as_ref().unwrap());
    assert_eq!(dns.queries, 3);
    assert_eq!(dns.responses["NOERROR"], 2);
    assert_eq!(dns.responses["NXDOMAIN"], 1);
    let l = dns.latency.unwrap();
    assert_eq!(l.samples, 2);
    assert!(l.p50_micros.abs_diff(20_000) < 20_000 / 32, "{l:?}");

    // By name: the two addresses of cdn.example are one row.
    let params = MergeParams {
        group_by: &[GroupBy::Namespace, GroupBy::Workload, GroupBy::DnsName],
        ..DEFAULT
    };
    let r = merge(100, 110, &parts, &params, &d);
    assert_eq!(r.top_flows.len(), 2);
    let cdn = &r.top_flows[0];
    assert_eq!(
        (
            cdn.destination.address.as_deref(),
            cdn.destination.name.as_deref()
        ),
        (None, Some("cdn.example"))
    );
    assert_eq!((cdn.bytes, cdn.flows), (3800, 2));
    assert_eq!(
        r.top_flows[1].destination.address.as_deref(),
        Some("198.51.100.1"),
        "a peer without a name keeps its address"
    );
}

#[test]
fn remote_pods_get_the_same_dimensions_as_local_ones() {
    let mut d = Dir::new();
    d.add_pod("10.0.2.1", "shop", "db-1", "db", "n2", false);
    let params = MergeParams {
        group_by: &[GroupBy::Namespace, GroupBy::Pod, GroupBy::Zone],
        keep_labels: &["version".to_string()],
        ..DEFAULT
    };
    let mut local = dims("shop", "web");
    local.workload = None;
    let p = part(vec![series(
        local,
        "10.0.2.1",
        5432,
        Role::Client,
        1,
        traffic(1, 100),
        traffic(1, 100),
        &[],
    )]);
    let r = merge(100, 110, &[("n1".into(), p)], &params, &d);
    let dst = &r.top_flows[0].destination;
    assert_eq!(dst.pod.as_deref(), Some("db-1"));
    assert_eq!(dst.zone.as_deref(), Some("z2"));
    assert_eq!(dst.workload, None, "workload is not in groupBy");
    assert_eq!(dst.labels.get("version").map(String::as_str), Some("v2"));
    assert!(
        !dst.labels.contains_key("app"),
        "only keepLabels leave the cluster state"
    );
}

#[test]
fn series_beyond_max_series_fold_into_other() {
    let d = Dir::new();
    let p = part(
        (1..=5u64)
            .map(|i| {
                series(
                    dims("shop", "web"),
                    &format!("198.51.100.{i}"),
                    80,
                    Role::Client,
                    1,
                    traffic(i, i * 1000),
                    Traffic::default(),
                    &[],
                )
            })
            .collect(),
    );
    let params = MergeParams {
        max_series: 2,
        ..DEFAULT
    };
    let r = merge(100, 110, &[("n1".into(), p)], &params, &d);
    assert_eq!((r.series, r.folded_series, r.max_series), (2, 3, 2));
    assert_eq!(r.bytes, 15_000, "folding loses no bytes");
    let shown: Vec<(bool, u64)> = r
        .top_flows
        .iter()
        .map(|f| (f.source.other, f.bytes))
        .collect();
    assert_eq!(shown, vec![(true, 6000), (false, 5000), (false, 4000)]);
}

#[test]
fn agents_folded_series_join_the_other_bucket() {
    let d = Dir::new();
    let mut p = part(vec![Series {
        local: FlowEndpoint {
            other: true,
            ..Default::default()
        },
        remote: None,
        port: 0,
        protocol: 0,
        role: Role::Client,
        flows: 3,
        tx: traffic(3, 300),
        rx: traffic(3, 300),
        ..Default::default()
    }]);
    p.folded_series = 7;
    let r = merge(100, 110, &[("n1".into(), p)], &DEFAULT, &d);
    assert_eq!((r.series, r.folded_series), (0, 7));
    assert!(r.top_flows[0].source.other && r.top_flows[0].destination.other);
    assert_eq!(r.top_flows[0].bytes, 600);
}

#[test]
fn top_n_limits_the_list_not_the_totals() {
    let d = Dir::new();
    let p = part(
        (1..=5u64)
            .map(|i| {
                series(
                    dims("shop", "web"),
                    &format!("198.51.100.{i}"),
                    80,
                    Role::Client,
                    1,
                    traffic(i, i * 1000),
                    Traffic::default(),
                    &[],
                )
            })
            .collect(),
    );
    let params = MergeParams {
        top_n: 2,
        ..DEFAULT
    };
    let r = merge(100, 110, &[("n1".into(), p)], &params, &d);
    assert_eq!(r.top_flows.len(), 2);
    assert_eq!(r.top_flows[0].bytes, 5000);
    assert_eq!((r.series, r.bytes), (5, 15_000));
}

/// web-1 (n1) and db-1 (n2), both traced.
fn web_and_db() -> Dir {
    let mut d = Dir::new();
    d.add_pod("10.0.1.1", "shop", "web-1", "web", "n1", true);
    d.add_pod("10.0.2.1", "shop", "db-1", "db", "n2", true);
    d
}

/// One side of a web -> db:5432 connection (10 data segments one way, 5
/// ACKs back) as its node reports it: web's (client) or db's (server).
fn web_db_side(role: Role, rtt_micros: &[u32]) -> Series {
    let (local, remote, tx, rx) = match role {
        Role::Client => ("web", "10.0.2.1", traffic(10, 10_520), traffic(5, 260)),
        Role::Server => ("db", "10.0.1.1", traffic(5, 260), traffic(10, 10_520)),
    };
    series(
        dims("shop", local),
        remote,
        5432,
        role,
        1,
        tx,
        rx,
        rtt_micros,
    )
}

#[test]
fn kernel_drops_add_up_across_nodes() {
    let d = web_and_db();
    // Each side drops what its own kernel dropped: added, never deduplicated.
    let mut from_n1 = web_db_side(Role::Client, &[]);
    from_n1.drops = 2;
    let mut from_n2 = web_db_side(Role::Server, &[]);
    from_n2.drops = 3;
    let r = merge(
        100,
        110,
        &[
            ("n1".into(), part(vec![from_n1])),
            ("n2".into(), part(vec![from_n2])),
        ],
        &DEFAULT,
        &d,
    );
    assert_eq!(r.drops, 5);
    assert_eq!(r.packets, 15, "drops do not change the traffic counts");
}

#[test]
fn the_servers_rtt_counts_only_when_its_client_is_not_traced() {
    let mut d = web_and_db();
    d.add_pod("10.0.3.1", "other", "cache-1", "cache", "n3", false);
    // A request/response connection: the client sees the network's 20 ms,
    // the server 40 ms (its replies are ACKed by the next request).
    let client = web_db_side(Role::Client, &[20_000, 20_000]);
    let server = web_db_side(Role::Server, &[40_000, 40_000, 40_000]);
    let r = merge(
        100,
        110,
        &[
            ("n1".into(), part(vec![client])),
            ("n2".into(), part(vec![server.clone()])),
        ],
        &DEFAULT,
        &d,
    );
    let l = r.latency.unwrap();
    assert_eq!(l.samples, 2);
    assert!((19_000..=21_000).contains(&l.p50_micros), "{l:?}");
    assert_eq!(r.top_flows[0].rtt_p50_micros, Some(l.p50_micros));

    // An untraced client: the server's samples are all there is.
    let untraced_client = Series {
        remote: Some("10.0.3.1".into()),
        ..server
    };
    let r = merge(
        100,
        110,
        &[("n2".into(), part(vec![untraced_client]))],
        &DEFAULT,
        &d,
    );
    assert_eq!(r.latency.unwrap().samples, 3);
}

#[test]
fn node_addresses_and_host_network_pods_are_named_as_their_node() {
    let mut d = Dir::new();
    d.add_pod("10.0.1.1", "shop", "web-1", "web", "n1", true);
    d.add_node_address("192.0.2.2", "n2");
    d.add_node_address("198.51.100.2", "n2");
    let p = part(vec![
        // The kubelet probing web (from n1's own address would be the same).
        series(
            dims("shop", "web"),
            "192.0.2.2",
            8080,
            Role::Server,
            1,
            traffic(2, 200),
            traffic(2, 200),
            &[],
        ),
        // web -> a host-network DaemonSet pod on n2, through its ExternalIP.
        series(
            dims("shop", "web"),
            "198.51.100.2",
            9100,
            Role::Client,
            1,
            traffic(1, 100),
            traffic(1, 100),
            &[],
        ),
    ]);
    let params = MergeParams {
        group_by: &[GroupBy::Namespace, GroupBy::Zone],
        ..DEFAULT
    };
    let r = merge(100, 110, &[("n1".into(), p)], &params, &d);
    assert_eq!(r.top_flows.len(), 2);
    let node = FlowEndpoint {
        node: Some("n2".into()),
        zone: Some("z2".into()),
        host_network: true,
        ..Default::default()
    };
    let probe = r.top_flows.iter().find(|f| f.port == 8080).unwrap();
    assert_eq!(probe.source, node, "named as the node, not external");
    let scrape = r.top_flows.iter().find(|f| f.port == 9100).unwrap();
    assert_eq!(scrape.destination, node);
    assert_eq!(r.cross_zone_bytes, 600, "n2 is in z2");
    let json = serde_json::to_value(&scrape.destination).unwrap();
    assert_eq!(
        json,
        serde_json::json!({"node": "n2", "zone": "z2", "hostNetwork": true})
    );
}

fn through(mut s: Series, service: &str) -> Series {
    s.service = Some(service.into());
    s
}

#[test]
fn flows_through_a_service_name_it_and_are_not_merged_with_direct_ones() {
    let mut d = Dir::new();
    d.add_pod("10.0.1.1", "shop", "web-1", "web", "n1", true);
    d.add_pod("10.0.2.1", "shop", "db-1", "db", "n2", false);
    let direct = series(
        dims("shop", "web"),
        "10.0.2.1",
        5432,
        Role::Client,
        1,
        traffic(1, 100),
        traffic(1, 100),
        &[],
    );
    let via = through(
        series(
            dims("shop", "web"),
            "10.0.2.1",
            5432,
            Role::Client,
            2,
            traffic(3, 300),
            traffic(3, 300),
            &[],
        ),
        "shop/db",
    );
    let r = merge(
        100,
        110,
        &[("n1".into(), part(vec![direct, via]))],
        &DEFAULT,
        &d,
    );
    assert_eq!(r.top_flows.len(), 2, "{:#?}", r.top_flows);
    assert_eq!(r.top_flows[0].service.as_deref(), Some("shop/db"));
    assert_eq!(
        r.top_flows[0].destination.workload.as_deref(),
        Some("Deployment/db"),
        "the destination is the backend pod"
    );
    assert_eq!((r.top_flows[0].bytes, r.top_flows[0].flows), (600, 2));
    assert_eq!(r.top_flows[1].service, None);
    assert_eq!(r.bytes, 800);

    // groupBy [service]: no pod dimensions, one flow per Service and port.
    let params = MergeParams {
        group_by: &[GroupBy::Service],
        ..DEFAULT
    };
    let local = FlowEndpoint::default();
    let p = part(vec![
        through(
            series(
                local.clone(),
                "10.0.2.1",
                5432,
                Role::Client,
                1,
                traffic(2, 200),
                traffic(2, 200),
                &[],
            ),
            "shop/db",
        ),
        series(
            local,
            "10.0.2.1",
            5432,
            Role::Client,
            1,
            traffic(1, 100),
            traffic(1, 100),
            &[],
        ),
    ]);
    let r = merge(100, 110, &[("n1".into(), p)], &params, &d);
    let services: Vec<Option<&str>> = r.top_flows.iter().map(|f| f.service.as_deref()).collect();
    assert_eq!(services, vec![Some("shop/db"), None]);
    assert_eq!(r.top_flows[0].destination, FlowEndpoint::default());
}

#[test]
fn the_servers_side_of_a_service_connection_joins_the_clients_flow() {
    let d = web_and_db();
    // web -> Service shop/db -> db-1: web's agent knows the Service, db's
    // agent sees a connection from web's address.
    let from_n1 = part(vec![through(web_db_side(Role::Client, &[1000]), "shop/db")]);
    let from_n2 = part(vec![web_db_side(Role::Server, &[])]);
    let r = merge(
        100,
        110,
        &[
            ("n1".into(), from_n1.clone()),
            ("n2".into(), from_n2.clone()),
        ],
        &DEFAULT,
        &d,
    );
    assert_eq!(r.top_flows.len(), 1, "{:#?}", r.top_flows);
    let f = &r.top_flows[0];
    assert_eq!(f.service.as_deref(), Some("shop/db"));
    assert_eq!((f.bytes, f.flows), (10_780, 1), "both directions, once");

    // web also connected to db directly: which of the two the server's
    // side belongs to is unknown, so it stays a flow of its own.
    let mut both = from_n1;
    both.series.push(web_db_side(Role::Client, &[]));
    let r = merge(
        100,
        110,
        &[("n1".into(), both), ("n2".into(), from_n2)],
        &DEFAULT,
        &d,
    );
    assert_eq!(r.top_flows.len(), 2, "{:#?}", r.top_flows);
    assert_eq!(r.bytes, 10_520 * 2 + 260, "the server's side once");
}

#[test]
fn forged_counts_saturate_instead_of_overflowing() {
    let d = Dir::new();
    let max = Traffic {
        packets: u64::MAX,
        bytes: u64::MAX,
        payload_bytes: u64::MAX,
    };
    let mut s = series(
        dims("ns", "a"),
        "10.9.9.9",
        80,
        Role::Client,
        u64::MAX,
        max,
        max,
        &[],
    );
    s.retransmits = u64::MAX;
    s.drops = u64::MAX;
    let mut p = part(vec![s.clone(), s]);
    p.folded_series = u64::MAX;
    let r = merge(
        100,
        110,
        &[("n1".into(), p.clone()), ("n2".into(), p)],
        &DEFAULT,
        &d,
    );
    assert_eq!(
        (r.flows, r.packets, r.bytes, r.drops, r.folded_series),
        (u64::MAX, u64::MAX, u64::MAX, u64::MAX, u64::MAX)
    );
}
