//! `kubectl flowlens observe` end to end in the simulated cluster: real
//! agents post live records to the real operator, which serves them
//! through the real API server (API aggregation, its front-proxy client
//! certificate), to users RBAC allows. Ground truth: the moment the client
//! connects, and its own connect() results.
//!
//! Needs root and the local control plane (`just up`). The APIService is
//! cluster-wide: this binary's one test owns it.

use std::time::{Duration, Instant};

use flowlens_api::live::{LiveDirection, LiveVerdict};
use flowlens_e2e::{
    fixtures::{TwoNodes, deny_web_to_db, two_nodes, wait_enforced, wait_ready},
    kubectl::kubectl_flowlens,
    live::{CollectorCerts, LiveApiService, Observer, unix_ms},
    topology::GATEWAY,
    traffic::{echo_server, spawn_traffic},
};
use serde_json::json;

/// How soon a connection must show (the goal).
const LIVE_WITHIN: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observe_follows_connections_and_blocked_attempts_within_seconds_for_allowed_users() {
    let TwoNodes {
        mut sim,
        run,
        shop,
        web,
        db,
        ..
    } = two_nodes("e2e-live").await;
    // Flows of traced pods; blocked attempts of any pod a policy selects.
    sim.objects
        .observation(&run, json!({"namespaces": [shop], "window": "10s"}))
        .await
        .unwrap();
    let service = format!("{run}-live");
    let port = sim.collector.port();
    let certs = CollectorCerts::new(
        &sim.topo.work_dir,
        &[
            format!("{service}.{}.svc", sim.agent_namespace),
            GATEWAY.to_string(),
        ],
    )
    .unwrap();
    let api =
        LiveApiService::register(&sim.agent_namespace, &service, GATEWAY.into(), port).unwrap();
    sim.start_operator_tls(&certs, &[]);
    sim.start_agents().await.unwrap();
    wait_ready(&sim, &run).await;
    api.wait_available(Duration::from_secs(60)).unwrap();

    // Headers naming a user count only with the API server's certificate.
    let direct = std::process::Command::new("curl")
        .args([
            "-sk",
            "-w",
            "\n%{http_code}",
            "-H",
            "X-Remote-User: system:admin",
        ])
        .arg(format!(
            "https://{}/apis/live.flowlens.dev/v1alpha1/flows",
            sim.collector
        ))
        .output()
        .unwrap();
    let direct = String::from_utf8_lossy(&direct.stdout);
    println!("direct, forged user: {direct}");
    assert!(direct.trim_end().ends_with("401"), "{direct}");
    assert!(direct.contains("only the API server"), "{direct}");

    // A user without a role is refused by the API server.
    let viewer = sim.user_kubeconfig(&shop, "viewer").await.unwrap();
    let (ok, _, err) = kubectl_flowlens(&viewer, &["observe", "-n", &shop]);
    println!("without a role: {err}");
    assert!(!ok, "a user without a role read live flows");
    assert!(
        err.contains("refused to list flows.live.flowlens.dev"),
        "{err}"
    );
    // flowlens-view in the namespace: that namespace, not the cluster.
    sim.grant_role_in_namespace(
        "deploy/base/user-rbac.yaml",
        "flowlens-view",
        &shop,
        "viewer",
    )
    .await
    .unwrap();
    let (ok, _, err) = kubectl_flowlens(&viewer, &["observe"]);
    assert!(
        !ok && err.contains("refused to list"),
        "cluster-wide: {err}"
    );
    let observer = Observer::start(&viewer, &["observe", "-n", &shop, "--follow"]).unwrap();
    // The reader is registered, agents drain every second.
    std::thread::sleep(Duration::from_secs(3));

    // A new connection shows within 2 s.
    let _db = echo_server(&sim.topo, db, 5432);
    let db_ip = sim.topo.pods[db].ip4.to_string();
    let started = Instant::now();
    let started_ms = unix_ms();
    let one = spawn_traffic(
        &sim.topo,
        web,
        "connect-loop",
        &format!("{db_ip}:5432"),
        &["--duration-ms", "1", "--interval-ms", "1"],
    )
    .join()
    .unwrap();
    assert_eq!(one["successes"], 1, "{one}");
    let (at, r) = observer
        .wait_for(started, Duration::from_secs(10), |r| {
            r.pod == "web-1"
                && r.verdict == LiveVerdict::Forwarded
                && r.port == 5432
                && r.connections >= 1
        })
        .unwrap();
    let latency = at - started;
    println!(
        "new connection shown after {latency:?} (drained {} ms after the connect, shown {} ms after the drain): {r:?}",
        r.time - started_ms,
        started_ms + latency.as_millis() as i64 - r.time
    );
    assert_eq!(r.direction, LiveDirection::Egress);
    assert_eq!(
        r.peer_name.as_deref(),
        Some(format!("{shop}/db-1").as_str())
    );
    assert_eq!(r.workload.as_deref(), Some("Deployment/web"));
    assert_eq!(r.node, format!("{run}-a1"));
    assert!(r.packets >= 3 && r.bytes > 0, "{r:?}");
    assert!(latency < LIVE_WITHIN, "shown after {latency:?}");

    // A blocked attempt shows with its policy within 2 s, and the attempts
    // shown add up to the client's refused connects.
    deny_web_to_db(&sim, &shop).await;
    wait_enforced(&sim, &shop, "deny-db").await;
    let started = Instant::now();
    let blocked = spawn_traffic(
        &sim.topo,
        web,
        "connect-loop",
        &format!("{db_ip}:5432"),
        &["--duration-ms", "500", "--interval-ms", "50"],
    )
    .join()
    .unwrap();
    let denied = blocked["denied"].as_u64().unwrap();
    assert!(denied >= 5 && blocked["successes"] == 0, "{blocked}");
    let (at, r) = observer
        .wait_for(started, Duration::from_secs(10), |r| {
            r.verdict == LiveVerdict::Blocked
        })
        .unwrap();
    let latency = at - started;
    println!("blocked attempt shown after {latency:?}: {r:?}");
    assert_eq!(
        r.policy.as_deref(),
        Some(format!("{shop}/deny-db").as_str())
    );
    assert_eq!((r.pod.as_str(), r.port), ("web-1", 5432));
    assert_eq!(
        r.peer_name.as_deref(),
        Some(format!("{shop}/db-1").as_str())
    );
    // The client ran for 0.5 s: its first attempt came at most that long
    // before the record could.
    assert!(
        latency < LIVE_WITHIN + Duration::from_millis(500),
        "shown after {latency:?}"
    );
    let shown = || -> u64 {
        observer
            .records()
            .iter()
            .filter(|r| r.verdict == LiveVerdict::Blocked)
            .map(|r| r.connections)
            .sum()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while shown() < denied && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(observer.lost(), 0);
    assert_eq!(shown(), denied, "attempts shown = connects refused");
    // The one connection made is shown once (at its client, not again by
    // the server's node).
    let opened: u64 = observer
        .records()
        .iter()
        .filter(|r| r.verdict == LiveVerdict::Forwarded && r.port == 5432)
        .map(|r| r.connections)
        .sum();
    assert_eq!(opened, 1, "{:?}", observer.records());
    // Only the namespace asked for.
    assert!(observer.records().iter().all(|r| r.namespace == shop));
    drop(observer);

    // A one-shot read (no --follow) in table form.
    let (ok, out, err) = kubectl_flowlens(&viewer, &["observe", "-n", &shop, "--since", "1m"]);
    assert!(ok, "{err}");
    println!("{out}");
    assert!(
        out.lines().any(
            |l| l.contains(&format!("{shop}/web-1 -> {shop}/db-1:5432/TCP"))
                && l.contains("BLOCKED")
                && l.contains(&format!("{shop}/deny-db"))
        ),
        "{out}"
    );
    drop(api);
    sim.shutdown().await.unwrap();
}
