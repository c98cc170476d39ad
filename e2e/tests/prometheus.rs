//! Prometheus and OpenTelemetry, for real: Debian's `prometheus` scrapes
//! the operator and the agents of a simulated cluster with real traffic,
//! evaluates Flowlens' rules and the Grafana dashboard's queries, and
//! PromQL returns what status says (and what the clients themselves saw);
//! the operator pushes the same figures over OTLP/gRPC to a receiver built
//! from the official protocol definitions.
//!
//! The first test needs no cluster: the rules file passes `promtool`, the
//! PrometheusRule carries the same groups, and the dashboard is valid JSON
//! with queries. The second needs root and the local control plane (`just up`).

use std::time::Duration;

use flowlens_e2e::{
    agent::AGENT_HTTP_PORT,
    fixtures::{
        TwoNodes, deny_web_to_db, policy, status_after, two_nodes, wait_enforced, wait_ready,
    },
    otlp::OtlpReceiver,
    prometheus::{
        DASHBOARD, PROMETHEUS_RULE, Prometheus, RULES_FILE, dashboard_queries, repo_root,
    },
    sim::poll,
    traffic::{spawn_iperf3_timed, spawn_traffic},
};
use serde_json::{Value, json};

fn read(path: &str) -> String {
    std::fs::read_to_string(repo_root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn the_rules_and_the_dashboard_are_valid() {
    let out = std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(repo_root().join(RULES_FILE))
        .output()
        .expect("promtool (Debian's prometheus package; hack/setup.sh installs it)");
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    println!("{said}");
    assert!(out.status.success(), "promtool check rules: {said}");

    let plain: serde_yaml::Value = serde_yaml::from_str(&read(RULES_FILE)).unwrap();
    let operator: serde_yaml::Value = serde_yaml::from_str(&read(PROMETHEUS_RULE)).unwrap();
    assert_eq!(operator["kind"], "PrometheusRule");
    assert_eq!(
        operator["spec"]["groups"], plain["groups"],
        "{PROMETHEUS_RULE} must carry the groups of {RULES_FILE}"
    );

    let dashboard: Value = serde_json::from_str(&read(DASHBOARD)).unwrap();
    let queries = dashboard_queries(&dashboard, &[("observation", "o"), ("namespace", ".*")]);
    assert!(queries.len() >= 15, "{queries:?}");
    for (title, q) in &queries {
        assert!(!q.contains('$'), "{title}: a variable left in {q}");
    }
}

/// Polls Prometheus until `promql` has the single value `want` (it scrapes
/// every second), or fails with the last value it had.
async fn wait_value(prom: &Prometheus, promql: &str, want: f64) {
    let r = poll(
        Duration::from_secs(20),
        &format!("{promql} == {want}"),
        || async { (prom.value(promql).ok() == Some(want)).then_some(()) },
    )
    .await;
    if let Err(e) = r {
        panic!("{e}; Prometheus has {:?}", prom.query(promql));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_and_otlp_return_what_status_says() {
    let TwoNodes {
        mut sim,
        run,
        shop,
        web,
        db,
        ..
    } = two_nodes("e2e-prom").await;
    sim.objects
        .observation(
            &run,
            json!({"namespaces": [shop], "groupBy": ["namespace", "workload", "zone"], "window": "5s"}),
        )
        .await
        .unwrap();
    deny_web_to_db(&sim, &shop).await;
    // The OTLP export is configured by the standard variables.
    let otlp = OtlpReceiver::start().await.unwrap();
    let endpoint = format!("http://{}", otlp.addr);
    sim.start_operator_with_env(
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_METRIC_EXPORT_INTERVAL", "1000"),
        ],
    );
    sim.start_agents().await.unwrap();
    wait_ready(&sim, &run).await;
    wait_enforced(&sim, &shop, "deny-db").await;

    let agents: Vec<std::net::SocketAddr> = sim
        .topo
        .nodes
        .iter()
        .map(|n| std::net::SocketAddr::from((n.uplink4, AGENT_HTTP_PORT)))
        .collect();
    let operator = [sim.operator().metrics];
    let prom = Prometheus::start(
        &sim.topo.work_dir,
        &[
            ("flowlens-operator", &operator),
            ("flowlens-agent", &agents),
        ],
    )
    .unwrap();

    // Traffic: 4 s of iperf3 from web to db (across zones), and connects
    // the policy blocks.
    let db_ip = sim.topo.pods[db].ip4.to_string();
    let transfer = spawn_iperf3_timed(&sim.topo, db, web, &db_ip, 5201, 4, "20M");
    let blocked = spawn_traffic(
        &sim.topo,
        web,
        "connect-loop",
        &format!("{db_ip}:5432"),
        &["--duration-ms", "2000", "--interval-ms", "20"],
    )
    .join()
    .unwrap();
    let transfer = transfer.join().unwrap();
    let denied = blocked["denied"].as_u64().unwrap();
    assert!(denied > 10 && blocked["successes"] == 0, "{blocked}");
    println!("iperf3: {transfer:?}; blocked: {blocked}");

    // Status, once every window of the traffic is in it (a window that
    // began after it), and the policy's count of what the client saw.
    let ended = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let status = status_after(&sim, &run, ended + 1).await;
    let total = status.total.clone().unwrap();
    poll(
        Duration::from_secs(45),
        "blocked connects in status",
        || async {
            let s = policy(&sim, &shop, "deny-db").await;
            (s.blocked.as_ref()?.connections == denied).then_some(())
        },
    )
    .await
    .unwrap();
    println!("status total: {total:?}");
    assert!(total.bytes > 10_000_000, "{total:?}");
    assert!(total.cross_zone_bytes > 0, "{total:?}");

    let o = format!("observation=\"{run}\"");
    let checks = [
        (
            format!("flowlens_observation_bytes_total{{{o}}}"),
            total.bytes,
        ),
        (
            format!("flowlens_observation_packets_total{{{o}}}"),
            total.packets,
        ),
        (
            format!("flowlens_observation_payload_bytes_total{{{o}}}"),
            total.payload_bytes,
        ),
        (
            format!("flowlens_observation_cross_zone_bytes_total{{{o}}}"),
            total.cross_zone_bytes,
        ),
        // The flow series add up to the totals.
        (
            format!("sum(flowlens_flow_bytes_total{{{o}}})"),
            total.bytes,
        ),
        (
            format!("sum(flowlens_flow_packets_total{{{o}}})"),
            total.packets,
        ),
        (
            format!(
                "flowlens_policy_blocked_connections_total{{namespace=\"{shop}\",policy=\"deny-db\"}}"
            ),
            denied,
        ),
        // The agents count the same attempts on their node.
        (
            format!(
                "sum(flowlens_agent_policy_connections_total{{namespace=\"{shop}\",policy=\"deny-db\",verdict=\"blocked\"}})"
            ),
            denied,
        ),
    ];
    for (q, want) in &checks {
        wait_value(&prom, q, *want as f64).await;
        println!("{q} = {want}");
    }
    // OTLP carries the same figures (its export every second).
    let otlp_checks = [
        (
            "flowlens.observation.bytes",
            vec![("observation", run.as_str())],
            total.bytes,
        ),
        (
            "flowlens.observation.packets",
            vec![("observation", run.as_str())],
            total.packets,
        ),
        (
            "flowlens.observation.cross_zone_bytes",
            vec![("observation", run.as_str())],
            total.cross_zone_bytes,
        ),
        (
            "flowlens.flow.bytes",
            vec![("observation", run.as_str())],
            total.bytes,
        ),
        (
            "flowlens.policy.blocked.connections",
            vec![("namespace", shop.as_str()), ("policy", "deny-db")],
            denied,
        ),
    ];
    for (metric, with, want) in &otlp_checks {
        let r = poll(
            Duration::from_secs(20),
            &format!("OTLP {metric} {with:?} == {want}"),
            || async { (otlp.sum(metric, with) == *want as f64).then_some(()) },
        )
        .await;
        if let Err(e) = r {
            panic!(
                "{e}; received {:?} ({} requests)",
                otlp.values(metric, with),
                otlp.requests()
            );
        }
        println!("OTLP {metric} {with:?} = {want}");
    }
    assert_eq!(
        otlp.unit("flowlens.observation.bytes").as_deref(),
        Some("By")
    );
    let rtt = otlp.values(
        "flowlens.observation.rtt",
        &[("observation", &run), ("quantile", "0.5")],
    );
    assert!(
        rtt.len() == 1 && rtt[0].1 > 0.0 && rtt[0].1 < 1.0,
        "{rtt:?}"
    );
    assert!(
        otlp.resource()
            .contains(&("service.name".to_owned(), "flowlens-operator".to_owned())),
        "{:?}",
        otlp.resource()
    );

    // The busiest flow is iperf3's, web to db on 5201 across zones.
    let flow = prom
        .query(&format!("topk(1, flowlens_flow_bytes_total{{{o}}})"))
        .unwrap();
    let labels = &flow[0].labels;
    println!("busiest flow: {labels:?} {}", flow[0].value);
    assert!(
        labels["source_workload"]
            .as_str()
            .unwrap()
            .ends_with("/web"),
        "{labels:?}"
    );
    assert!(
        labels["destination_workload"]
            .as_str()
            .unwrap()
            .ends_with("/db")
    );
    assert_eq!(labels["source_zone"], "zone-a");
    assert_eq!(labels["destination_zone"], "zone-b");
    assert_eq!(labels["port"], "5201");
    assert_eq!(labels["protocol"], "TCP");
    let p50 = prom
        .value(&format!(
            "histogram_quantile(0.5, sum by (le) (flowlens_observation_rtt_seconds_bucket{{{o}}}))"
        ))
        .unwrap();
    println!("RTT p50 from the histogram: {p50} s");
    assert!(p50 > 0.0 && p50 < 1.0, "{p50}");

    // Every target is up, every rule evaluates.
    let targets = prom.targets().unwrap();
    assert_eq!(targets.len(), 3, "{targets:?}");
    for (job, health, error) in &targets {
        assert_eq!(health, "up", "{job}: {error}");
    }
    let rules = poll(Duration::from_secs(20), "every rule evaluated", || async {
        let r = prom.rules().ok()?;
        (!r.is_empty() && r.iter().all(|(_, h, _)| h != "unknown")).then_some(r)
    })
    .await
    .unwrap();
    for (name, health, error) in &rules {
        assert_eq!(health, "ok", "rule {name}: {error}");
    }
    // A rule's rate needs two scrapes of its series before an evaluation:
    // the observation's series may be younger than that (CI once read no
    // sample here, every rule healthy).
    let rate = format!("flowlens:observation_bytes:rate5m{{{o}}}");
    let recorded = poll(
        Duration::from_secs(30),
        "the recording rule's rate",
        || async { prom.value(&rate).ok() },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: {:?}", prom.query(&rate)));
    assert!(recorded > 0.0, "the recording rule has a rate: {recorded}");

    // Every panel of the dashboard evaluates, with data.
    let dashboard: Value = serde_json::from_str(&read(DASHBOARD)).unwrap();
    let queries = dashboard_queries(&dashboard, &[("observation", &run), ("namespace", &shop)]);
    // (A rate needs two scrapes of a series: the policy's appeared with its
    // first final window, perhaps a second ago.)
    for (title, q) in &queries {
        let r = poll(
            Duration::from_secs(15),
            &format!("panel {title:?}"),
            || async { prom.query(q).ok().filter(|v| !v.is_empty()) },
        )
        .await;
        if let Err(e) = r {
            panic!("{e}: {q}: {:?}", prom.query(q));
        }
    }
    println!(
        "{} rules and {} dashboard queries evaluate; {} targets up",
        rules.len(),
        queries.len(),
        targets.len()
    );
    drop(prom);
    sim.shutdown().await.unwrap();
}
