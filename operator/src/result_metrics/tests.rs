use std::collections::BTreeMap;

use flowlens_api::{
    histogram::Histogram,
    network_observation::FlowEndpoint,
    report::{Matches, Traffic},
};
use prometheus_client::registry::Registry;

use super::*;

fn pod(ns: &str, workload: &str) -> FlowEndpoint {
    FlowEndpoint {
        namespace: Some(ns.into()),
        workload: Some(workload.into()),
        ..Default::default()
    }
}

fn flow(src: FlowEndpoint, dst: FlowEndpoint, port: u16, bytes: u64) -> MergedFlow {
    MergedFlow {
        source: src,
        destination: dst,
        port,
        protocol: 6,
        service: None,
        traffic: Traffic {
            packets: bytes / 100,
            bytes,
            payload_bytes: bytes / 2,
        },
        flows: 1,
        rtt: Histogram::default(),
    }
}

fn window(end: i64, flows: &[MergedFlow]) -> WindowResult {
    let mut w = WindowResult {
        start: end - 10,
        end,
        ..Default::default()
    };
    for f in flows {
        w.bytes += f.traffic.bytes;
        w.packets += f.traffic.packets;
        w.payload_bytes += f.traffic.payload_bytes;
        w.flows += f.flows;
    }
    w
}

/// Records a window made of `flows`.
fn record(
    m: &ResultMetrics,
    uid: &str,
    name: &str,
    max_series: usize,
    end: i64,
    flows: &[MergedFlow],
) {
    m.record_window(uid, name, max_series, &window(end, flows), flows);
}

fn scrape(m: &ResultMetrics) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(m.clone()));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
    out
}

/// Values of the samples whose name is `name` and whose labels include
/// every one of `with`.
fn samples(text: &str, name: &str, with: &[&str]) -> Vec<u64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter(|l| with.iter().all(|w| l.contains(w)))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect()
}

#[test]
fn flows_sum_to_the_observation_totals() {
    let m = ResultMetrics::default();
    let a = flow(
        pod("shop", "Deployment/web"),
        pod("shop", "Deployment/db"),
        5432,
        1_000,
    );
    let b = flow(
        pod("shop", "Deployment/web"),
        pod("shop", "Deployment/cache"),
        6379,
        300,
    );
    record(&m, "uid-1", "shop", 100, 110, &[a.clone(), b]);
    record(&m, "uid-1", "shop", 100, 120, &[a]);
    let text = scrape(&m);
    assert_eq!(
        samples(&text, "flowlens_observation_bytes_total", &[]),
        [2_300]
    );
    assert_eq!(
        samples(&text, "flowlens_observation_windows_total", &[]),
        [2]
    );
    let flows = samples(
        &text,
        "flowlens_flow_bytes_total",
        &["observation=\"shop\""],
    );
    assert_eq!(flows.iter().sum::<u64>(), 2_300);
    assert_eq!(
        samples(
            &text,
            "flowlens_flow_bytes_total",
            &[
                "destination_workload=\"Deployment/db\"",
                "port=\"5432\"",
                "protocol=\"TCP\""
            ]
        ),
        [2_000]
    );
    assert_eq!(
        samples(&text, "flowlens_flow_connections_total", &["Deployment/db"]),
        [2]
    );
    assert!(text.ends_with("# EOF\n"), "{text}");
}

#[test]
fn the_budget_folds_new_series_into_other_and_counts_them() {
    let m = ResultMetrics::default();
    let f = |port| flow(pod("a", "x"), pod("b", "y"), port, 100);
    let flows = [f(1), f(2), f(3)];
    m.record_window("u", "o", 2, &window(110, &flows), &flows);
    let text = scrape(&m);
    assert_eq!(m.flow_series("u"), 3, "two flows and other");
    assert_eq!(
        samples(&text, "flowlens_observation_series_folded_total", &[]),
        [1]
    );
    assert_eq!(
        samples(
            &text,
            "flowlens_flow_bytes_total",
            &["source_kind=\"other\"", "destination_kind=\"other\""]
        ),
        [100]
    );
    assert_eq!(
        samples(&text, "flowlens_flow_bytes_total", &[])
            .iter()
            .sum::<u64>(),
        300
    );
    // The merge's own `other` flow joins the same series, without using
    // the budget.
    let other = MergedFlow {
        source: FlowEndpoint::other(),
        destination: FlowEndpoint::other(),
        protocol: 0,
        ..f(0)
    };
    record(&m, "u", "o", 2, 120, &[other]);
    let text = scrape(&m);
    assert_eq!(
        samples(
            &text,
            "flowlens_flow_bytes_total",
            &["source_kind=\"other\""]
        ),
        [200]
    );
    assert_eq!(m.flow_series("u"), 3);
}

#[test]
fn idle_series_are_dropped_and_free_their_slot() {
    let m = ResultMetrics::default();
    let f = |port| flow(pod("a", "x"), pod("b", "y"), port, 100);
    record(&m, "u", "o", 1, 110, &[f(1)]);
    record(&m, "u", "o", 1, 110 + IDLE_SECS, &[f(1)]);
    // Port 1 was seen IDLE_SECS ago: kept; port 2 is over the budget.
    record(&m, "u", "o", 1, 120 + IDLE_SECS, &[f(2)]);
    let text = scrape(&m);
    assert_eq!(
        samples(&text, "flowlens_flow_bytes_total", &["port=\"1\""]),
        [200]
    );
    assert_eq!(
        samples(
            &text,
            "flowlens_flow_bytes_total",
            &["source_kind=\"other\""]
        ),
        [100]
    );
    // Much later, port 1 is gone and port 2 takes its slot.
    record(&m, "u", "o", 1, 1_000 + 3 * IDLE_SECS, &[f(2)]);
    let text = scrape(&m);
    assert!(samples(&text, "flowlens_flow_bytes_total", &["port=\"1\""]).is_empty());
    assert!(
        samples(
            &text,
            "flowlens_flow_bytes_total",
            &["source_kind=\"other\""]
        )
        .is_empty()
    );
    assert_eq!(
        samples(&text, "flowlens_flow_bytes_total", &["port=\"2\""]),
        [100]
    );
    // Totals never expire.
    assert_eq!(
        samples(&text, "flowlens_observation_bytes_total", &[]),
        [400]
    );
}

#[test]
fn labels_follow_prometheus_naming() {
    let m = ResultMetrics::default();
    let mut src = pod("shop", "Deployment/web");
    src.labels = BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "web".to_string()),
        ("app_kubernetes_io/name".to_string(), "clash".to_string()),
    ]);
    let dst = FlowEndpoint {
        address: Some("203.0.113.7".into()),
        external: true,
        ..Default::default()
    };
    let mut f = flow(src, dst, 443, 10);
    f.service = Some("shop/api".into());
    record(&m, "u", "o\"bs", 10, 110, &[f]);
    let text = scrape(&m);
    let line = text
        .lines()
        .find(|l| l.starts_with("flowlens_flow_bytes_total{"))
        .unwrap();
    assert_eq!(
        line,
        "flowlens_flow_bytes_total{observation=\"o\\\"bs\",source_kind=\"pod\",source_namespace=\"shop\",\
         source_workload=\"Deployment/web\",source_label_app_kubernetes_io_name=\"web\",\
         destination_kind=\"external\",destination_address=\"203.0.113.7\",port=\"443\",\
         protocol=\"TCP\",service=\"shop/api\"} 10"
    );
}

#[test]
fn rtt_buckets_are_exact_at_the_kernels_edges() {
    let m = ResultMetrics::default();
    let mut f = flow(pod("a", "x"), pod("b", "y"), 80, 10);
    for us in [20, 100, 1_000, 1_000, 5_000_000] {
        f.rtt.record(us);
    }
    record(&m, "u", "o", 10, 110, &[f]);
    let text = scrape(&m);
    let le = |b: &str| {
        samples(
            &text,
            "flowlens_observation_rtt_seconds_bucket",
            &[&format!("le=\"{b}\"")],
        )
    };
    assert_eq!(le("0.000032"), [1], "{text}");
    assert_eq!(le("0.000128"), [2]);
    assert_eq!(le("0.001024"), [4]);
    assert_eq!(le("4.194304"), [4]);
    assert_eq!(le("+Inf"), [5]);
    assert_eq!(
        samples(&text, "flowlens_observation_rtt_seconds_count", &[]),
        [5]
    );
    assert_eq!(
        samples(&text, "flowlens_flow_rtt_seconds_count", &["port=\"80\""]),
        [5]
    );
}

#[test]
fn deleted_objects_lose_their_series() {
    let m = ResultMetrics::default();
    let f = flow(pod("a", "x"), pod("b", "y"), 80, 10);
    record(&m, "keep", "kept", 10, 110, std::slice::from_ref(&f));
    record(&m, "gone", "deleted", 10, 110, &[f]);
    let blocked = Matches {
        packets: 3,
        connections: 2,
    };
    let delta = PolicyDelta {
        end: 110,
        blocked,
        nodes: 1,
        ..Default::default()
    };
    let key = |n: &str| ("shop".to_string(), n.to_string());
    m.record_policies(&[(key("p"), delta.clone()), (key("q"), delta.clone())]);
    m.record_policies(&[(key("p"), delta)]);
    m.retain(|uid| uid == "keep", |k| k.1 == "p");
    let text = scrape(&m);
    assert!(!text.contains("deleted"));
    assert!(text.contains("kept"));
    assert_eq!(
        samples(
            &text,
            "flowlens_policy_blocked_connections_total",
            &["namespace=\"shop\"", "policy=\"p\""]
        ),
        [4]
    );
    assert_eq!(
        samples(&text, "flowlens_policy_blocked_packets_total", &[]),
        [6]
    );
    assert!(!text.contains("policy=\"q\""));
}

#[test]
fn dns_adds_up_over_windows_and_names_the_peers() {
    use flowlens_api::dns::{DnsWindow, NameCount};

    let m = ResultMetrics::default();
    let ext = FlowEndpoint {
        address: Some("192.0.2.7".into()),
        name: Some("api.payments.example".into()),
        external: true,
        ..Default::default()
    };
    let f = flow(pod("shop", "web"), ext, 443, 1000);
    let mut lat = flowlens_api::histogram::Histogram::default();
    lat.record(20_000);
    for (end, nx) in [(110, 1), (120, 2)] {
        let mut w = window(end, std::slice::from_ref(&f));
        w.dns = Some(DnsWindow {
            queries: 2 + nx,
            responses: [("NOERROR".to_owned(), 2), ("NXDOMAIN".to_owned(), nx)].into(),
            latency: lat.clone(),
            top_names: vec![NameCount {
                name: "api.payments.example".into(),
                queries: 2,
            }],
            ..Default::default()
        });
        m.record_window("u", "shop", 10, &w, std::slice::from_ref(&f));
    }
    let text = scrape(&m);
    assert_eq!(
        samples(&text, "flowlens_observation_dns_queries_total", &[]),
        vec![7]
    );
    assert_eq!(
        samples(
            &text,
            "flowlens_observation_dns_responses_total",
            &["rcode=\"NXDOMAIN\""]
        ),
        vec![3]
    );
    assert_eq!(
        samples(&text, "flowlens_observation_dns_latency_seconds_count", &[]),
        vec![2]
    );
    assert_eq!(
        samples(
            &text,
            "flowlens_observation_dns_top_name_queries",
            &["name=\"api.payments.example\""]
        ),
        vec![2]
    );
    assert_eq!(
        samples(
            &text,
            "flowlens_flow_bytes_total",
            &[
                "destination_name=\"api.payments.example\"",
                "destination_address=\"192.0.2.7\""
            ]
        ),
        vec![2000]
    );
}
