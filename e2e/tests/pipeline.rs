//! End to end: simulated nodes with real agents in cluster mode, the real
//! operator, real traffic; every assertion reads the API (status), and
//! compares with independent ground truth (iperf3's byte counts, the
//! injected delay, TCP_INFO, the clients' own connect() results).
//!
//! Needs root and the local control plane (`just up`); `just e2e` runs it.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use flowlens_api::{
    AddressSetSlice, FlowPolicy, NetworkObservation, NodeAgentConfig,
    address_set_slice::SET_LABEL,
    network_observation::{NetworkObservationStatus, TopFlow},
};
use flowlens_e2e::{
    cluster::unique_name,
    fixtures::{
        TwoNodes, condition, deny_web_to_db, observation, policy, status_after, two_nodes,
        wait_enforced, wait_ready, wait_refused,
    },
    kubectl::InterfaceCounters,
    operator::http_post,
    process::require_root,
    sim::{SimCluster, poll},
    traffic::{echo_server, iperf3, spawn_iperf3_timed, spawn_traffic},
};
use kube::{
    Api,
    api::{DeleteParams, ListParams},
};
use serde_json::json;

fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn flow<'a>(flows: &'a [TopFlow], src: &str, dst: &str, port: u16) -> Option<&'a TopFlow> {
    flows.iter().find(|f| {
        f.source.workload.as_deref() == Some(src)
            && f.destination.workload.as_deref() == Some(dst)
            && f.port == port
    })
}

fn pct(a: u64, b: u64) -> f64 {
    (a as f64 - b as f64) / b as f64 * 100.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_latency_zones_and_budgets_reach_observation_status() {
    require_root();
    let run = unique_name("e2e-obs");
    let (a1, a2, b1) = (
        format!("{run}-a1"),
        format!("{run}-a2"),
        format!("{run}-b1"),
    );
    let mut sim = SimCluster::new(&run, &[(&a1, "zone-a"), (&a2, "zone-a"), (&b1, "zone-b")])
        .await
        .unwrap();
    // 10 ms each way between the zones: +20 ms of RTT.
    sim.topo
        .add_delay("zone-a", "zone-b", Duration::from_millis(10));
    let (shop, other) = (format!("{run}-shop"), format!("{run}-other"));
    sim.objects.namespace(&shop, &[]).await.unwrap();
    sim.objects.namespace(&other, &[]).await.unwrap();
    let web = sim
        .add_pod(
            0,
            &shop,
            "web-1",
            &[("app", "web"), ("version", "v1")],
            Some("web"),
        )
        .await
        .unwrap();
    let api = sim
        .add_pod(0, &shop, "api-1", &[("app", "api")], Some("api"))
        .await
        .unwrap();
    let db = sim
        .add_pod(2, &shop, "db-1", &[("app", "db")], Some("db"))
        .await
        .unwrap();
    let ext = sim
        .add_pod(1, &other, "ext-1", &[("app", "ext")], Some("ext"))
        .await
        .unwrap();
    let obs = run.clone();
    let budget = format!("{run}-budget");
    sim.objects
        .observation(
            &obs,
            json!({"namespaces": [shop], "keepLabels": ["app"], "window": "5s"}),
        )
        .await
        .unwrap();
    sim.objects
        .observation(
            &budget,
            json!({"namespaces": [shop], "groupBy": ["pod"], "maxSeries": 2, "window": "5s"}),
        )
        .await
        .unwrap();
    sim.start_operator(&[]);
    sim.start_agents().await.unwrap();
    wait_ready(&sim, &obs).await;
    let s = observation(&sim, &obs).await;
    assert_eq!(
        s.nodes.as_ref().map(|n| n.selected),
        Some(2),
        "web and api on a1, db on b1"
    );
    let writes_before = sim.operator().metric_sum(
        "flowlens_operator_api_writes_total",
        "networkobservations/status",
    );
    let test_started = Instant::now();

    // 1. Bytes: one iperf3 transfer web (zone-a) -> db (zone-b).
    let base = observation(&sim, &obs).await.total.unwrap_or_default();
    let t0 = Instant::now();
    let sent = iperf3(
        &sim.topo,
        db,
        web,
        &sim.topo.pods[db].ip4.to_string(),
        5201,
        "20M",
        "400M",
    );
    let transfer_end = now_s();
    let first = poll(
        Duration::from_secs(30),
        "the first bytes in status",
        || async {
            let t = observation(&sim, &obs).await.total.unwrap_or_default();
            (t.payload_bytes > base.payload_bytes).then(|| t0.elapsed())
        },
    )
    .await
    .unwrap();
    let s = status_after(&sim, &obs, transfer_end + 1).await;
    let total = s.total.clone().unwrap_or_default();
    let payload = total.payload_bytes - base.payload_bytes;
    let bytes = total.bytes - base.bytes;
    let cross = total.cross_zone_bytes - base.cross_zone_bytes;
    let expected = sent.wire_payload();
    println!(
        "bytes: iperf3 sent {} payload bytes ({} retransmitted segments); status counts {payload} ({:+.4}%), {bytes} IP bytes, {cross} cross-zone; first numbers in status {:.1} s after the transfer started",
        expected,
        sent.retransmits,
        pct(payload, expected),
        first.as_secs_f64()
    );
    assert!(
        pct(payload, expected).abs() < 2.0,
        "status payload {payload} vs iperf3 {expected}: {:.3}% off",
        pct(payload, expected)
    );
    assert!(payload >= sent.received, "never less than iperf3 received");
    assert_eq!(
        cross, bytes,
        "web and db are in different zones: all of it crosses"
    );

    // 2. RTT: ping-pong across zones (web -> db) and on one node (api -> web),
    // plus a flow to an untraced pod (web -> ext) for the series budget.
    let _db_echo = echo_server(&sim.topo, db, 7000);
    let _web_echo = echo_server(&sim.topo, web, 7001);
    let _ext_echo = echo_server(&sim.topo, ext, 7002);
    let (db_ip, web_ip, ext_ip) = (
        sim.topo.pods[db].ip4.to_string(),
        sim.topo.pods[web].ip4.to_string(),
        sim.topo.pods[ext].ip4.to_string(),
    );
    // 12 s of traffic; status is read while it flows.
    let pp = ["--count", "600", "--interval-ms", "20"];
    let pp_start = Instant::now();
    let cross_pp = spawn_traffic(&sim.topo, web, "ping-pong", &format!("{db_ip}:7000"), &pp);
    let local_pp = spawn_traffic(&sim.topo, api, "ping-pong", &format!("{web_ip}:7001"), &pp);
    let ext_pp = spawn_traffic(&sim.topo, web, "ping-pong", &format!("{ext_ip}:7002"), &pp);
    let s = poll(
        Duration::from_secs(30),
        "a window with both ping-pong flows",
        || async {
            let s = observation(&sim, &obs).await;
            let both = flow(&s.top_flows, "Deployment/web", "Deployment/db", 7000)
                .and(flow(&s.top_flows, "Deployment/api", "Deployment/web", 7001))
                .is_some();
            both.then_some(s)
        },
    )
    .await
    .unwrap();
    println!(
        "latency to status: ping-pong flows in topFlows {:.1} s after they started",
        pp_start.elapsed().as_secs_f64()
    );
    // The budget observation groups by pod with maxSeries 2: three
    // concurrent flows overflow into `other`, and Ready says so.
    let b = poll(
        Duration::from_secs(30),
        "a window over the series budget",
        || async {
            let s = observation(&sim, &budget).await;
            s.series.as_ref().is_some_and(|u| u.folded > 0).then_some(s)
        },
    )
    .await
    .unwrap();
    // The cross-zone p50 of every window the ping-pong spans: a stall of
    // this shared machine inflates the kernel's srtt for the window it
    // falls in, so each window is kept and compared below.
    let mut xz_windows = BTreeMap::new();
    let mut record = |s: &NetworkObservationStatus| {
        if let (Some(w), Some(f)) = (
            s.last_window.as_ref(),
            flow(&s.top_flows, "Deployment/web", "Deployment/db", 7000),
        ) && let Some(p50) = f.rtt_p50_micros
        {
            xz_windows.insert(w.start.0.as_second(), p50);
        }
    };
    record(&s);
    while !cross_pp.is_finished() {
        record(&observation(&sim, &obs).await);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (cross_pp, local_pp) = (cross_pp.join().unwrap(), local_pp.join().unwrap());
    ext_pp.join().unwrap();
    let xz = flow(&s.top_flows, "Deployment/web", "Deployment/db", 7000).unwrap();
    let local = flow(&s.top_flows, "Deployment/api", "Deployment/web", 7001).unwrap();
    let (xz50, xz99) = (xz.rtt_p50_micros.unwrap(), xz.rtt_p99_micros.unwrap());
    let local50 = local.rtt_p50_micros.unwrap();
    let srtt = cross_pp["tcp_info_srtt_us"].as_u64().unwrap();
    let closest = xz_windows
        .values()
        .copied()
        .min_by_key(|p| p.abs_diff(srtt))
        .unwrap_or(xz50);
    println!(
        "rtt: cross-zone p50 {xz50} µs p99 {xz99} µs, per window {:?} (TCP_INFO srtt {srtt} µs, app p50 {} µs); same-node p50 {local50} µs (TCP_INFO {} µs); window latency p50 {} p99 {}",
        xz_windows.values().collect::<Vec<_>>(),
        cross_pp["p50_us"],
        local_pp["tcp_info_srtt_us"],
        s.latency.as_ref().map(|l| l.p50_micros).unwrap_or(0),
        s.latency.as_ref().map(|l| l.p99_micros).unwrap_or(0),
    );
    assert!(
        (19_000..=30_000).contains(&xz50),
        "cross-zone p50 {xz50} µs must reflect the injected 20 ms"
    );
    assert!(
        xz_windows.values().all(|p| (19_000..=30_000).contains(p)),
        "every window's cross-zone p50 must reflect the injected 20 ms: {xz_windows:?}"
    );
    assert!(
        (closest as f64 - srtt as f64).abs() <= srtt as f64 * 0.15,
        "cross-zone p50 per window {xz_windows:?} µs vs the kernel's srtt {srtt} µs"
    );
    assert!(
        local50 < 5_000 && local50 * 5 < xz50,
        "same-node p50 {local50} µs"
    );
    assert_eq!(
        local.flows, 1,
        "a connection between two traced pods counts once"
    );
    // keepLabels: app, and only app.
    assert_eq!(
        xz.source.labels.iter().collect::<Vec<_>>(),
        vec![(&"app".to_string(), &"web".to_string())]
    );
    assert_eq!(
        xz.destination.labels.get("app").map(String::as_str),
        Some("db")
    );
    assert_eq!(xz.destination.zone, None, "zone is not in groupBy");
    let to_ext = s
        .top_flows
        .iter()
        .find(|f| f.port == 7002)
        .expect("web -> ext in topFlows");
    assert_eq!(
        to_ext.destination.namespace.as_deref(),
        Some(other.as_str())
    );

    // 3. The series budget.
    let usage = b.series.clone().unwrap();
    let ready = condition(&b.conditions, "Ready").unwrap();
    println!(
        "budget: {usage:?}; Ready: {} {}: {}",
        ready.status, ready.reason, ready.message
    );
    assert_eq!((usage.series, usage.max_series), (2, 2));
    assert!(usage.folded >= 1);
    assert_eq!(ready.reason, "SeriesBudgetExceeded");
    assert!(
        b.top_flows.iter().any(|f| f.source.other),
        "an `other` flow"
    );

    // 4. Writes: at most about one status write per window per observation.
    let windows = test_started.elapsed().as_secs_f64() / 5.0;
    let writes = sim.operator().metric_sum(
        "flowlens_operator_api_writes_total",
        "networkobservations/status",
    ) - writes_before;
    println!(
        "writes: {writes} NetworkObservation status writes for 2 observations over {:.0} s ({windows:.1} windows each)",
        test_started.elapsed().as_secs_f64()
    );
    assert!(
        writes <= 2.0 * (windows + 2.0),
        "{writes} status writes for {windows:.1} windows of 2 observations"
    );

    // 5. Deleting the observation removes it from every node's config and
    // from the agents.
    Api::<NetworkObservation>::all(sim.client.clone())
        .delete(&budget, &DeleteParams::default())
        .await
        .unwrap();
    let uid_gone = poll(
        Duration::from_secs(20),
        "configs without the deleted observation",
        || async {
            let nacs = Api::<NodeAgentConfig>::all(sim.client.clone());
            for n in [&a1, &b1] {
                let nac = nacs.get(n).await.ok()?;
                if nac.spec.observations.iter().any(|o| o.name == budget) {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
    uid_gone.unwrap();
    sim.wait_applied(0, Duration::from_secs(20)).await.unwrap();
    let d = sim.agent(0).dump().unwrap();
    assert!(
        d.live.iter().all(|w| w.observation != budget),
        "the agent stopped tracing the deleted observation"
    );
    sim.shutdown().await.unwrap();
}

/// `kubectl flowlens` with a user's own kubeconfig: refused while the user
/// has no role; with `flowlens-view` (deploy/base/user-rbac.yaml), `status`
/// shows each node with its applied revision and no problem, and `top` the
/// flow between the pods.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_flowlens_shows_nodes_and_top_flows_to_users_allowed_to_see_them() {
    let TwoNodes {
        mut sim,
        run,
        a1,
        b1,
        shop,
        web,
        db,
    } = two_nodes("e2e-plugin").await;
    sim.objects
        .observation(
            &run,
            json!({"namespaces": [shop], "groupBy": ["namespace", "pod"], "window": "5s"}),
        )
        .await
        .unwrap();
    sim.start_operator(&[]);
    sim.start_agents().await.unwrap();
    wait_ready(&sim, &run).await;
    let db_ip = sim.topo.pods[db].ip4.to_string();
    let transfer = spawn_iperf3_timed(&sim.topo, db, web, &db_ip, 5201, 25, "20M");

    let kubeconfig = sim.user_kubeconfig(&shop, "viewer").await.unwrap();
    let (ok, _, err) = flowlens_e2e::kubectl::kubectl_flowlens(&kubeconfig, &["status"]);
    println!("without a role: {err}");
    assert!(!ok, "a user without a role listed node configs");
    assert!(
        err.contains("refused to list nodeagentconfigs.flowlens.dev"),
        "{err}"
    );
    let (ok, _, err) = flowlens_e2e::kubectl::kubectl_flowlens(&kubeconfig, &["top", &run]);
    assert!(!ok && err.contains("refused to get"), "{err}");

    sim.grant_cluster_role(
        "deploy/base/user-rbac.yaml",
        "flowlens-view",
        &shop,
        "viewer",
    )
    .await
    .unwrap();
    let table = poll(Duration::from_secs(10), "status allowed", || async {
        let (ok, out, _) = flowlens_e2e::kubectl::kubectl_flowlens(&kubeconfig, &["status"]);
        ok.then_some(out)
    })
    .await
    .unwrap();
    println!("{table}");
    for node in [&a1, &b1] {
        let row = table
            .lines()
            .find(|l| l.starts_with(&format!("{node} ")))
            .unwrap_or_else(|| panic!("no row for {node}:\n{table}"));
        assert!(
            !row.contains("wants") && !row.contains("not applied"),
            "{row}"
        );
        assert!(row.ends_with("none"), "{row}");
    }
    // A window of the running transfer.
    let top = poll(Duration::from_secs(20), "web-1's flow in top", || async {
        let (ok, top, err) = flowlens_e2e::kubectl::kubectl_flowlens(&kubeconfig, &["top", &run]);
        assert!(ok, "{err}");
        top.contains(&format!("{shop}/web-1 ")).then_some(top)
    })
    .await
    .unwrap();
    println!("{top}");
    let flow = top
        .lines()
        .find(|l| l.starts_with(&format!("{shop}/web-1 ")))
        .unwrap();
    assert!(flow.contains(&format!("{shop}/db-1")), "{flow}");
    assert!(flow.contains(" 5201 ") && flow.contains(" TCP "), "{flow}");
    transfer.join().unwrap();
    sim.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_block_audit_and_count_in_status() {
    let TwoNodes {
        mut sim,
        run,
        a1,
        b1,
        shop,
        web,
        db,
    } = two_nodes("e2e-pol").await;
    let other = format!("{run}-other");
    sim.objects
        .namespace(&other, &[("team", &format!("{run}-other"))])
        .await
        .unwrap();
    let ext = sim
        .add_pod(1, &other, "ext-1", &[("app", "ext")], Some("ext"))
        .await
        .unwrap();
    deny_web_to_db(&sim, &shop).await;
    sim.objects
        .policy(
            &shop,
            "audit-other",
            json!({"mode": "Audit", "podSelector": {"matchLabels": {"app": "web"}},
                   "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"team": format!("{run}-other")}}}]}]}),
        )
        .await
        .unwrap();
    sim.start_operator(&[]);
    sim.start_agents().await.unwrap();
    for p in ["deny-db", "audit-other"] {
        wait_enforced(&sim, &shop, p).await;
    }
    let s = policy(&sim, &shop, "deny-db").await;
    assert_eq!(
        s.summary.as_ref().unwrap().nodes,
        "1/1",
        "web's node enforces"
    );

    let _db = echo_server(&sim.topo, db, 5432);
    let _ext = echo_server(&sim.topo, ext, 8080);
    let db_ip = sim.topo.pods[db].ip4.to_string();
    let ext_ip = sim.topo.pods[ext].ip4.to_string();
    let loop_args = ["--duration-ms", "2000", "--interval-ms", "20"];
    let blocked = spawn_traffic(
        &sim.topo,
        web,
        "connect-loop",
        &format!("{db_ip}:5432"),
        &loop_args,
    )
    .join()
    .unwrap();
    let audited = spawn_traffic(
        &sim.topo,
        web,
        "connect-loop",
        &format!("{ext_ip}:8080"),
        &loop_args,
    )
    .join()
    .unwrap();
    let denied = blocked["denied"].as_u64().unwrap();
    let ok = audited["successes"].as_u64().unwrap();
    println!("policy: deny-db {blocked}; audit-other {audited}");
    assert_eq!(blocked["successes"], 0, "Enforce blocks: {blocked}");
    assert!(denied > 10);
    assert!(
        ok > 10 && audited["successes"] == audited["attempts"],
        "Audit never blocks: {audited}"
    );

    // Status counts exactly what the clients saw, once every policy window
    // is final.
    let t0 = Instant::now();
    let s = poll(
        Duration::from_secs(60),
        "blocked counters in status",
        || async {
            let s = policy(&sim, &shop, "deny-db").await;
            (s.blocked.as_ref().map(|b| b.connections) == Some(denied)).then_some(s)
        },
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}: status {:?}",
            futures::executor::block_on(policy(&sim, &shop, "deny-db"))
        )
    });
    let a = poll(
        Duration::from_secs(60),
        "audited counters in status",
        || async {
            let s = policy(&sim, &shop, "audit-other").await;
            s.audited.as_ref().filter(|a| a.connections >= ok).cloned()
        },
    )
    .await
    .unwrap();
    println!(
        "policy status: blocked {:?} (clients saw {denied} EPERM), audited {a:?} (clients connected {ok} times); {:.1} s after the traffic",
        s.blocked,
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(a.connections, ok, "one audited SYN per connection");
    assert!(
        a.packets >= 3 * ok,
        "audit counts every packet of the connections"
    );

    // Who tried to reach whom: status names both sides and the port, with
    // as many attempts as the client saw refused (or made, when audited).
    let top = |s: &flowlens_api::flow_policy::FlowPolicyStatus| {
        s.top_blocked
            .iter()
            .map(|t| {
                (
                    t.verdict.clone(),
                    t.source.clone(),
                    t.destination.clone(),
                    t.port,
                    t.protocol.clone(),
                    t.attempts,
                    t.node.clone(),
                )
            })
            .collect::<Vec<_>>()
    };
    let blocked_top = top(&policy(&sim, &shop, "deny-db").await);
    let audited_top = top(&policy(&sim, &shop, "audit-other").await);
    println!("topBlocked: deny-db {blocked_top:?}; audit-other {audited_top:?}");
    assert_eq!(
        blocked_top,
        [(
            "Blocked".to_owned(),
            format!("{shop}/web-1"),
            format!("{shop}/db-1"),
            5432,
            "TCP".to_owned(),
            denied,
            a1.clone()
        )]
    );
    assert_eq!(
        audited_top,
        [(
            "Audited".to_owned(),
            format!("{shop}/web-1"),
            format!("{other}/ext-1"),
            8080,
            "TCP".to_owned(),
            ok,
            a1.clone()
        )]
    );

    // `kubectl flowlens blocked` shows the same, from status.
    let (ok_cli, table, err) = flowlens_e2e::kubectl::kubectl_flowlens(
        &flowlens_e2e::cluster::kubeconfig_path(),
        &["blocked", "-n", &shop],
    );
    println!("kubectl flowlens blocked -n {shop}:\n{table}");
    assert!(ok_cli, "{err}");
    let row = table
        .lines()
        .find(|l| l.contains("deny-db"))
        .unwrap_or_else(|| panic!("no deny-db row:\n{table}"));
    for cell in [
        "Blocked",
        &format!("{shop}/web-1"),
        &format!("{shop}/db-1"),
        "5432",
        &denied.to_string(),
    ] {
        assert!(row.contains(cell), "{cell:?} not in {row:?}");
    }

    // A node reports only for itself: node a1's token cannot speak for b1,
    // and no token gets nothing.
    let token =
        std::fs::read_to_string(sim.topo.work_dir.join(format!("{a1}-report-token"))).unwrap();
    let forged =
        json!({"node": b1, "agent": "forger", "windows": [], "policyWindows": []}).to_string();
    let (code, body) =
        http_post(sim.collector, "/v1/reports", Some(token.trim()), &forged).unwrap();
    assert_eq!(code, 403, "{body}");
    assert!(
        body.contains(&format!("may not report for node {b1}")),
        "{body}"
    );
    let (code, body) = http_post(sim.collector, "/v1/reports", None, &forged).unwrap();
    assert_eq!(code, 401, "{body}");
    let own = json!({"node": a1, "agent": "probe", "windows": [], "policyWindows": []}).to_string();
    let (code, body) = http_post(sim.collector, "/v1/reports", Some(token.trim()), &own).unwrap();
    assert_eq!(code, 200, "its own node: {body}");

    // Deleting the Enforce policy lifts the block and removes its rules.
    Api::<FlowPolicy>::namespaced(sim.client.clone(), &shop)
        .delete("deny-db", &DeleteParams::default())
        .await
        .unwrap();
    poll(
        Duration::from_secs(20),
        "the rules of deny-db gone from the config",
        || async {
            let nac = Api::<NodeAgentConfig>::all(sim.client.clone())
                .get(&a1)
                .await
                .ok()?;
            nac.spec
                .rules
                .iter()
                .all(|r| r.policy.name != "deny-db")
                .then_some(())
        },
    )
    .await
    .unwrap();
    sim.wait_applied(0, Duration::from_secs(20)).await.unwrap();
    let after = spawn_traffic(
        &sim.topo,
        web,
        "connect-loop",
        &format!("{db_ip}:5432"),
        &["--duration-ms", "300"],
    )
    .join()
    .unwrap();
    assert_eq!(after["successes"], after["attempts"], "unblocked: {after}");
    sim.shutdown().await.unwrap();
}

/// Fail-static across a deleted NodeAgentConfig: the agent keeps the last
/// config (it used to apply an empty one, lifting every block until the
/// operator wrote the config again), and the operator writes it again.
/// A node whose policy tables cannot hold every policy: the policy that
/// does not fit is left out there and reported (node Degraded, the policy
/// Degraded naming the node), every other policy applies, and a pod created
/// afterwards on that node is enforced.
/// A pod that becomes a peer reaches the kernel through its rule's address
/// set: the set's AddressSetSlice is rewritten, the config of the node
/// enforcing the rule is not, and its agent blocks the new peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_peer_is_blocked_through_its_address_set_without_a_new_config() {
    let TwoNodes {
        mut sim,
        a1,
        shop,
        web,
        ..
    } = two_nodes("e2e-set").await;
    deny_web_to_db(&sim, &shop).await;
    sim.start_operator(&[]);
    sim.start_agents().await.unwrap();
    wait_enforced(&sim, &shop, "deny-db").await;
    let configs = Api::<NodeAgentConfig>::all(sim.client.clone());
    let before = configs.get(&a1).await.unwrap().spec;
    assert!(before.address_sets.is_empty(), "configs name their sets");
    let set = before.rules[0].address_set.clone().unwrap();

    let db2 = sim
        .add_pod(1, &shop, "db-2", &[("app", "db")], Some("db"))
        .await
        .unwrap();
    let db2_ip = sim.topo.pods[db2].ip4.to_string();
    let slices = Api::<AddressSetSlice>::all(sim.client.clone());
    let of_set = ListParams::default().labels(&format!("{SET_LABEL}={set}"));
    poll(
        Duration::from_secs(30),
        "db-2 in the set's slice",
        || async {
            let l = slices.list(&of_set).await.ok()?;
            l.items
                .iter()
                .any(|s| s.spec.addresses.contains(&db2_ip))
                .then_some(())
        },
    )
    .await
    .unwrap();
    let _db = echo_server(&sim.topo, db2, 5432);
    let addr = format!("{db2_ip}:5432");
    let refused = wait_refused(&sim, web, &addr, Duration::from_secs(30))
        .await
        .unwrap();
    println!("web -> db-2 ({set}): {refused}");
    assert_eq!(
        configs.get(&a1).await.unwrap().spec,
        before,
        "web's config is unchanged"
    );
}

/// A rollout rewrites many slices of a set at once. The agent joins and
/// compiles the whole config per pass (~150 ms at 100,000 addresses), so it
/// takes in every slice event already waiting before a pass, and applies
/// only the newest config waiting: a burst costs a few passes, not one per
/// slice, and the last write is in force. No operator: the test writes
/// web's node config and the set's slices itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_slice_writes_is_applied_in_a_few_passes_ending_with_the_last() {
    const SLICES: usize = 100;
    let TwoNodes {
        mut sim,
        run,
        a1,
        web,
        db,
        ..
    } = two_nodes("e2e-burst").await;
    let mut spec = flowlens_e2e::config::SpecBuilder::new(&sim.topo, 0)
        .rule(
            "burst",
            flowlens_api::node_agent_config::Direction::Egress,
            flowlens_api::flow_policy::PolicyMode::Enforce,
            &[web],
            &["192.0.2.1/32"],
            &[(flowlens_api::flow_policy::Protocol::Tcp, 5432, 5432)],
        )
        .build();
    spec.address_sets.clear();
    spec.revision = "burst-1".into();
    let set = spec.rules[0].address_set.clone().unwrap();
    let labels = |with_set: bool| {
        let mut l = BTreeMap::from([(flowlens_e2e::objects::TEST_LABEL.to_owned(), run.clone())]);
        if with_set {
            l.insert(SET_LABEL.to_owned(), set.clone());
        }
        l
    };
    // 100 slices of 1,000 addresses each (none of them db's); `round`
    // changes each slice's last address.
    let slice = |i: usize, last: String| {
        let mut addresses: Vec<String> = (0..999)
            .map(|j| {
                let n = i * 1000 + j;
                format!("10.{}.{}.{}", 128 + n / 65536, (n / 256) % 256, n % 256)
            })
            .collect();
        addresses.push(last);
        let mut s = AddressSetSlice::new(
            &format!("{set}-0-{i}"),
            flowlens_api::address_set_slice::AddressSetSliceSpec {
                address_set: set.clone(),
                addresses,
                ..Default::default()
            },
        );
        s.metadata.labels = Some(labels(true));
        s
    };
    let slices = Api::<AddressSetSlice>::all(sim.client.clone());
    let pp = kube::api::PostParams::default();
    for i in 0..SLICES {
        slices
            .create(&pp, &slice(i, format!("10.200.0.{i}")))
            .await
            .unwrap();
    }
    let mut nac = NodeAgentConfig::new(&a1, spec);
    nac.metadata.labels = Some(labels(false));
    Api::<NodeAgentConfig>::all(sim.client.clone())
        .create(&pp, &nac)
        .await
        .unwrap();
    sim.start_agent(0, &[]).await.unwrap();
    sim.wait_applied(0, Duration::from_secs(60)).await.unwrap();
    let agent = sim.agents[0].as_ref().unwrap();
    let applies = || agent.metric_sum("flowlens_agent_config_applies_total", "");
    let before = applies();

    // The burst: every slice rewritten as fast as the API server takes it;
    // the last one written now holds db's address.
    let db_ip = sim.topo.pods[db].ip4.to_string();
    let started = Instant::now();
    for i in 0..SLICES {
        let last = if i == SLICES - 1 {
            db_ip.clone()
        } else {
            format!("10.201.0.{i}")
        };
        let mut s = slice(i, last);
        s.metadata.resource_version = slices
            .get(&s.metadata.name.clone().unwrap())
            .await
            .unwrap()
            .metadata
            .resource_version;
        slices
            .replace(&s.metadata.name.clone().unwrap(), &pp, &s)
            .await
            .unwrap();
    }
    let written = started.elapsed();
    let _db = echo_server(&sim.topo, db, 5432);
    let addr = format!("{db_ip}:5432");
    let refused = wait_refused(&sim, web, &addr, Duration::from_secs(60)).await;
    let in_force = started.elapsed();
    // Whatever was still waiting settles.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let passes = applies() - before;
    println!(
        "{SLICES} slice writes in {written:?}: {passes} config applies; the last write in force after {in_force:?}"
    );
    for line in agent
        .proc
        .log_text()
        .lines()
        .filter(|l| l.contains("applied config") || l.contains("apply") || l.contains("newest"))
    {
        println!("agent: {line}");
    }
    refused.unwrap();
    assert!(passes >= 1.0, "the burst was applied");
    assert!(
        passes <= (SLICES / 4) as f64,
        "{passes} applies for {SLICES} slice writes: events were not coalesced"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_policy_table_leaves_one_policy_out_and_still_enforces_a_new_pod() {
    let TwoNodes {
        mut sim,
        a1,
        shop,
        web,
        db,
        ..
    } = two_nodes("e2e-full").await;
    deny_web_to_db(&sim, &shop).await;
    // 40 peer prefixes: more than web's node holds (32 per generation).
    let wide: Vec<_> = (0..40)
        .map(|i| json!({"ipBlock": {"cidr": format!("198.51.100.{i}/32")}}))
        .collect();
    sim.objects
        .policy(
            &shop,
            "wide",
            json!({"podSelector": {"matchLabels": {"app": "web"}},
                   "egress": [{"to": wide, "ports": [{"port": 9999}]}]}),
        )
        .await
        .unwrap();
    sim.start_operator(&[]);
    sim.start_agents_with(|node| {
        if node == 0 {
            vec!["--policy-table-size", "64"]
        } else {
            Vec::new()
        }
    })
    .await
    .unwrap();
    wait_enforced(&sim, &shop, "deny-db").await;
    let degraded = poll(Duration::from_secs(30), "wide Degraded", || async {
        let s = policy(&sim, &shop, "wide").await;
        condition(&s.conditions, "Degraded")
            .filter(|c| c.status == "True" && c.message.contains(&a1))
            .cloned()
    })
    .await
    .unwrap();
    println!("wide: {}", degraded.message);
    assert!(
        degraded.message.contains("PolicyTableFull") && degraded.message.contains("shop/wide"),
        "{}",
        degraded.message
    );
    let nac = Api::<NodeAgentConfig>::all(sim.client.clone())
        .get(&a1)
        .await
        .unwrap();
    let node_degraded = condition(&nac.status.as_ref().unwrap().conditions, "Degraded")
        .cloned()
        .unwrap();
    println!(
        "node {a1}: {}: {}",
        node_degraded.reason, node_degraded.message
    );
    assert_eq!(
        (node_degraded.status.as_str(), node_degraded.reason.as_str()),
        ("True", "PolicyTableFull")
    );

    // A pod created now on the full node gets the rules that fit.
    let web2 = sim
        .add_pod(0, &shop, "web-2", &[("app", "web")], Some("web"))
        .await
        .unwrap();
    poll(
        Duration::from_secs(30),
        "web-2 in the applied config",
        || async {
            let d = sim.agent(0).dump()?;
            let nac = Api::<NodeAgentConfig>::all(sim.client.clone())
                .get(&a1)
                .await
                .ok()?;
            (nac.spec.endpoints.iter().any(|e| e.pod == "web-2")
                && d.applied_revision.as_ref() == Some(&nac.spec.revision))
            .then_some(())
        },
    )
    .await
    .unwrap();
    wait_enforced(&sim, &shop, "deny-db").await;
    let _db = echo_server(&sim.topo, db, 5432);
    let db_addr = format!("{}:5432", sim.topo.pods[db].ip4);
    let loop_args = ["--duration-ms", "1000", "--interval-ms", "20"];
    for (pod, name) in [(web, "web-1"), (web2, "web-2")] {
        let r = spawn_traffic(&sim.topo, pod, "connect-loop", &db_addr, &loop_args)
            .join()
            .unwrap();
        println!("{name} -> db: {r}");
        assert_eq!(r["successes"], 0, "{name} is enforced: {r}");
        assert!(r["denied"].as_u64().unwrap() > 5, "{r}");
    }
    // The left-out policy is still reported, with the node.
    let s = policy(&sim, &shop, "wide").await;
    let d = condition(&s.conditions, "Degraded").unwrap();
    assert!(d.status == "True" && d.message.contains(&a1), "{d:?}");
    sim.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_node_config_lifts_no_block() {
    let TwoNodes {
        mut sim,
        a1,
        shop,
        web,
        db,
        ..
    } = two_nodes("e2e-nacdel").await;
    deny_web_to_db(&sim, &shop).await;
    sim.start_operator(&[]);
    sim.start_agents().await.unwrap();
    wait_enforced(&sim, &shop, "deny-db").await;
    let _db = echo_server(&sim.topo, db, 5432);
    let db_ip = sim.topo.pods[db].ip4.to_string();
    let blocked = spawn_traffic(
        &sim.topo,
        web,
        "connect-loop",
        &format!("{db_ip}:5432"),
        &["--duration-ms", "6000", "--interval-ms", "10"],
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let nacs: Api<NodeAgentConfig> = Api::all(sim.objects.client.clone());
    nacs.delete(&a1, &DeleteParams::default()).await.unwrap();
    let r = blocked.join().unwrap();
    println!("connects to db:5432 while web's NodeAgentConfig was deleted: {r}");
    assert!(r["attempts"].as_u64().unwrap() > 100, "{r}");
    assert_eq!(r["successes"], 0, "the deletion lifted the block: {r}");
    poll(
        Duration::from_secs(30),
        "the operator writes the deleted NodeAgentConfig again",
        || async { nacs.get_opt(&a1).await.ok().flatten() },
    )
    .await
    .unwrap();
    wait_enforced(&sim, &shop, "deny-db").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_restart_loses_no_window_and_counts_none_twice() {
    let TwoNodes {
        mut sim,
        run,
        shop,
        web,
        db,
        ..
    } = two_nodes("e2e-rst").await;
    sim.objects
        .observation(&run, json!({"namespaces": [shop], "window": "5s"}))
        .await
        .unwrap();
    deny_web_to_db(&sim, &shop).await;
    sim.start_operator(&[]);
    sim.start_agents().await.unwrap();
    wait_ready(&sim, &run).await;
    wait_enforced(&sim, &shop, "deny-db").await;
    let base = observation(&sim, &run).await.total.unwrap_or_default();

    // 24 s of iperf3 at 40 Mbit/s; the operator is killed (SIGKILL) after
    // 6 s and comes back 8 s later: agents hold their windows meanwhile.
    let db_ip = sim.topo.pods[db].ip4.to_string();
    let transfer = spawn_iperf3_timed(&sim.topo, db, web, &db_ip, 5201, 24, "40M");
    let _db = echo_server(&sim.topo, db, 5432);
    let blocked = spawn_traffic(
        &sim.topo,
        web,
        "connect-loop",
        &format!("{db_ip}:5432"),
        &["--duration-ms", "24000", "--interval-ms", "10"],
    );
    tokio::time::sleep(Duration::from_secs(6)).await;
    sim.operator.as_mut().unwrap().proc.kill9();
    tokio::time::sleep(Duration::from_secs(8)).await;
    sim.start_operator(&[]);
    let sent = transfer.join().unwrap();
    let blocked = blocked.join().unwrap();
    let denied = blocked["denied"].as_u64().unwrap();
    assert_eq!(
        blocked["successes"], 0,
        "a blocked connect got through: {blocked}"
    );
    assert!(denied > 1000, "{blocked}");
    let end = now_s();
    let s = status_after(&sim, &run, end + 1).await;
    let t = s.total.unwrap_or_default();
    let payload = t.payload_bytes - base.payload_bytes;
    let expected = sent.wire_payload();
    println!(
        "restart: iperf3 sent {expected} payload bytes; status counts {payload} ({:+.4}%) over {} windows",
        pct(payload, expected),
        t.windows - base.windows
    );
    assert!(
        pct(payload, expected).abs() < 2.0,
        "across an operator restart: {payload} counted vs {expected} sent ({:+.3}%)",
        pct(payload, expected)
    );
    let counted = poll(
        Duration::from_secs(60),
        "every blocked attempt in status",
        || async {
            let b = policy(&sim, &shop, "deny-db").await.blocked?.connections;
            (b >= denied).then_some(b)
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: the client saw {denied} refused connects"));
    println!("restart: status counts {counted} blocked connects; the client saw {denied} refused");
    assert_eq!(counted, denied, "blocked attempts lost or counted twice");
    let late = sim
        .operator()
        .metric_sum("flowlens_operator_report_parts_total", "late");
    assert_eq!(late, 0.0, "no part arrived after its window was final");
    sim.shutdown().await.unwrap();
}

/// `kill -9` of the agent (twice, restarted 2 s later each time) under
/// traffic and a blocked-connect loop: nothing gets through, every blocked
/// attempt is counted in status once, and the observation holds what the
/// interface carried. Counts drained but not yet committed live in the
/// agent's spool (`--state-dir`); the successor reports them under the same
/// agent id and part numbers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_kill_9_loses_no_count_and_counts_none_twice() {
    let TwoNodes {
        mut sim,
        run,
        shop,
        web,
        db,
        ..
    } = two_nodes("e2e-akill").await;
    sim.objects
        .observation(
            &run,
            json!({"namespaces": [shop], "groupBy": ["pod"], "window": "5s"}),
        )
        .await
        .unwrap();
    deny_web_to_db(&sim, &shop).await;
    sim.start_operator(&[]);
    sim.start_agents().await.unwrap();
    wait_enforced(&sim, &shop, "deny-db").await;
    wait_ready(&sim, &run).await;
    let out = sim
        .topo
        .pod_output(web, "ethtool", &["-K", "eth0", "tso", "off", "gso", "off"]);
    assert!(out.status.success(), "ethtool: {out:?}");
    let base = status_after(&sim, &run, now_s())
        .await
        .total
        .unwrap_or_default();
    let blocked_base = policy(&sim, &shop, "deny-db")
        .await
        .blocked
        .map(|b| b.connections)
        .unwrap_or(0);
    let c0 = pod_ip_traffic(&sim, web);

    let db_ip = sim.topo.pods[db].ip4.to_string();
    let _db = echo_server(&sim.topo, db, 5432);
    let traffic = spawn_iperf3_timed(&sim.topo, db, web, &db_ip, 5201, 26, "40M");
    let blocked = spawn_traffic(
        &sim.topo,
        web,
        "connect-loop",
        &format!("{db_ip}:5432"),
        &["--duration-ms", "26000", "--interval-ms", "10"],
    );
    // Two kills at different points of the 10 s policy window and the 5 s
    // observation window.
    for wait in [7_300, 6_100] {
        tokio::time::sleep(Duration::from_millis(wait)).await;
        let agent = sim.agents[0].as_mut().unwrap();
        agent.kill9();
        println!("agent kill -9 at {} (unix s)", now_s());
        tokio::time::sleep(Duration::from_secs(2)).await;
        agent.restart(&sim.topo);
    }
    let sent = tokio::task::spawn_blocking(move || traffic.join().unwrap())
        .await
        .unwrap();
    let blocked = tokio::task::spawn_blocking(move || blocked.join().unwrap())
        .await
        .unwrap();
    let end = now_s();
    let c1 = pod_ip_traffic(&sim, web);
    let denied = blocked["denied"].as_u64().unwrap();
    println!("agent kill -9: iperf3 {sent:?}; blocked loop {blocked}");
    assert_eq!(
        blocked["successes"], 0,
        "a blocked connect got through: {blocked}"
    );
    assert!(denied > 1000, "{blocked}");

    let counted = poll(
        Duration::from_secs(60),
        "every blocked attempt in status",
        || async {
            let b = policy(&sim, &shop, "deny-db").await.blocked?.connections - blocked_base;
            (b >= denied).then_some(b)
        },
    )
    .await
    .unwrap_or_else(|e| {
        let s = futures::executor::block_on(policy(&sim, &shop, "deny-db"));
        panic!(
            "{e}: the client saw {denied} refused connects; status {:?}",
            s.blocked
        )
    });
    let s = status_after(&sim, &run, end + 1).await;
    let total = s.total.unwrap_or_default();
    let (bytes, carried) = (total.bytes - base.bytes, c1.0 - c0.0);
    let off = pct(bytes, carried);
    println!(
        "agent kill -9: status counts {counted} blocked connects (the client saw {denied} refused); observation {bytes} bytes, web's interface {carried} ({off:+.3}%)"
    );
    // Settle: a late part would show up as more.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let again = policy(&sim, &shop, "deny-db")
        .await
        .blocked
        .unwrap()
        .connections
        - blocked_base;
    assert_eq!(counted, denied, "blocked attempts lost or counted twice");
    assert_eq!(again, denied, "blocked attempts counted twice later");
    assert!(
        off.abs() <= 0.5,
        "status holds what the interface carried across the kills: {off:+.3}%"
    );
    sim.shutdown().await.unwrap();
}

/// A report request that claims `len` bytes of body and sends none.
fn post_claiming(addr: std::net::SocketAddr, len: usize) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "POST /v1/reports HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let (head, body) = buf.split_once("\r\n\r\n")?;
    Some((
        head.split_whitespace().nth(1)?.parse().ok()?,
        body.to_owned(),
    ))
}

/// One forged or malformed report; `expect`: the HTTP status it must get.
struct Hostile {
    what: &'static str,
    token: Option<String>,
    body: String,
    expect: u16,
}

/// A compromised node: with its agent's real pod-bound token, node a1 sends
/// forged and malformed reports about other nodes, observations and
/// policies, and junk. Each is refused (or harmless); afterwards the
/// operator runs, the refusals are counted by reason, another node's
/// results are exactly what they were, and new traffic is still counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_agent_cannot_crash_the_operator_or_change_other_nodes_results() {
    let TwoNodes {
        mut sim,
        run,
        a1,
        b1,
        shop,
        web,
        db,
    } = two_nodes("e2e-hostile").await;
    // The victim: an observation of pods on b1 only, and a policy in force
    // on b1 only.
    let victim_ns = format!("{run}-victim");
    sim.objects.namespace(&victim_ns, &[]).await.unwrap();
    let v1 = sim
        .add_pod(1, &victim_ns, "v-1", &[("app", "v")], Some("v"))
        .await
        .unwrap();
    let v2 = sim
        .add_pod(1, &victim_ns, "v-2", &[("app", "v")], Some("v"))
        .await
        .unwrap();
    let (victim, both) = (format!("{run}-victim"), format!("{run}-both"));
    sim.objects
        .observation(
            &victim,
            json!({"namespaces": [victim_ns], "groupBy": ["pod"], "window": "5s", "maxSeries": 10}),
        )
        .await
        .unwrap();
    sim.objects
        .observation(
            &both,
            json!({"namespaces": [shop], "groupBy": ["pod"], "window": "5s", "maxSeries": 10}),
        )
        .await
        .unwrap();
    sim.objects
        .policy(
            &shop,
            "guard-db",
            json!({"podSelector": {"matchLabels": {"app": "db"}},
                   "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                                "ports": [{"port": 9999}]}]}),
        )
        .await
        .unwrap();
    sim.start_operator(&[]);
    sim.start_agents().await.unwrap();
    for name in [&victim, &both] {
        wait_ready(&sim, name).await;
    }
    wait_enforced(&sim, &shop, "guard-db").await;

    // The victim's traffic, on b1 alone, fully counted before the attack.
    let v2_ip = sim.topo.pods[v2].ip4.to_string();
    let sent = iperf3(&sim.topo, v2, v1, &v2_ip, 5201, "5M", "100M");
    let before = status_after(&sim, &victim, now_s() + 1)
        .await
        .total
        .unwrap_or_default();
    assert!(
        before.payload_bytes >= sent.bytes,
        "the victim's transfer is counted before the attack: {before:?} vs {sent:?}"
    );
    let guard_before = policy(&sim, &shop, "guard-db").await;

    // The attack.
    let uid = |name: String| {
        let client = sim.client.clone();
        async move {
            Api::<NetworkObservation>::all(client)
                .get(&name)
                .await
                .unwrap()
                .metadata
                .uid
                .unwrap()
        }
    };
    let (victim_uid, both_uid) = (uid(victim.clone()).await, uid(both.clone()).await);
    let token = std::fs::read_to_string(sim.topo.work_dir.join(format!("{a1}-report-token")))
        .unwrap()
        .trim()
        .to_owned();
    // The window open now: a part of it is taken if nothing refuses it.
    let t = now_s() - now_s().rem_euclid(5);
    let pod = |ns: &str, name: &str| json!({"namespace": ns, "pod": name});
    let series = |local: serde_json::Value, bytes: u64| {
        json!({"local": local, "remote": "203.0.113.66", "port": 443, "protocol": 6,
               "role": "Client", "flows": 1,
               "tx": {"packets": 1, "bytes": bytes, "payloadBytes": bytes},
               "rx": {"packets": 0, "bytes": 0, "payloadBytes": 0},
               "retransmits": 0, "drops": 0, "rtt": []})
    };
    let window = |name: &str, uid: &str, start: i64, secs: u64, series: Vec<serde_json::Value>| {
        json!({"observation": name, "uid": uid, "generation": 1, "start": start,
               "windowSeconds": secs, "complete": true, "series": series,
               "foldedSeries": 0})
    };
    let batch = |node: &str,
                 agent: &str,
                 windows: Vec<serde_json::Value>,
                 policies: Vec<serde_json::Value>| {
        json!({"node": node, "agent": agent, "windows": windows, "policyWindows": policies})
            .to_string()
    };
    let web_pod = pod(&shop, "web-1");
    let db_pod = pod(&shop, "db-1");
    let forged_bytes = 1_000_000_000_000u64;
    let own = |windows| batch(&a1, "forger", windows, vec![]);
    let guard_counts = json!([{"namespace": shop, "name": "guard-db",
                               "blocked": {"packets": forged_bytes, "connections": forged_bytes},
                               "audited": {"packets": 0, "connections": 0}}]);
    let policy_window = |start: i64, policies: &serde_json::Value| json!({"start": start, "windowSeconds": 10, "policies": policies});
    let t10 = now_s() - now_s().rem_euclid(10);
    let mut cases = vec![
        Hostile {
            what: "no token",
            token: None,
            body: own(vec![]),
            expect: 401,
        },
        Hostile {
            what: "a made-up token",
            token: Some("eyJhbGciOiJSUzI1NiJ9.e30.c2ln".into()),
            body: own(vec![]),
            expect: 401,
        },
        Hostile {
            what: "reporting as node b1",
            token: Some(token.clone()),
            body: batch(
                &b1,
                "forger",
                vec![window(
                    &victim,
                    &victim_uid,
                    t,
                    5,
                    vec![series(pod(&victim_ns, "v-1"), forged_bytes)],
                )],
                vec![],
            ),
            expect: 403,
        },
        Hostile {
            what: "not JSON",
            token: Some(token.clone()),
            body: "\u{0}\u{1}not json".into(),
            expect: 400,
        },
        Hostile {
            what: "the wrong shape",
            token: Some(token.clone()),
            body: json!({"node": a1, "agent": "x", "windows": "all of them"}).to_string(),
            expect: 400,
        },
        Hostile {
            what: "JSON nested 100,000 deep",
            token: Some(token.clone()),
            body: format!(
                "{{\"node\": \"{a1}\", \"agent\": \"x\", \"windows\": {}{}}}",
                "[".repeat(100_000),
                "]".repeat(100_000)
            ),
            expect: 400,
        },
        Hostile {
            what: "a window starting at 9.3e15 (once: an overflow)",
            token: Some(token.clone()),
            body: own(vec![window(
                &both,
                &both_uid,
                9_300_000_000_000_000,
                5,
                vec![],
            )]),
            expect: 422,
        },
        Hostile {
            what: "a window starting at i64::MIN",
            token: Some(token.clone()),
            body: own(vec![window(&both, &both_uid, i64::MIN, 5, vec![])]),
            expect: 422,
        },
        Hostile {
            what: "a misaligned window",
            token: Some(token.clone()),
            body: own(vec![window(&both, &both_uid, t + 1, 5, vec![])]),
            expect: 422,
        },
        Hostile {
            what: "a zero-second window",
            token: Some(token.clone()),
            body: own(vec![window(&both, &both_uid, t, 0, vec![])]),
            expect: 422,
        },
        Hostile {
            what: "a window of u32::MAX seconds",
            token: Some(token.clone()),
            body: own(vec![window(
                &both,
                &both_uid,
                0,
                u64::from(u32::MAX),
                vec![],
            )]),
            expect: 200,
        },
        Hostile {
            what: "a window an hour in the future",
            token: Some(token.clone()),
            body: own(vec![window(&both, &both_uid, t + 3600, 5, vec![])]),
            expect: 422,
        },
        Hostile {
            what: "a window from a year ago",
            token: Some(token.clone()),
            body: own(vec![window(
                &both,
                &both_uid,
                t - 365 * 86_400,
                5,
                vec![series(web_pod.clone(), forged_bytes)],
            )]),
            expect: 200,
        },
        Hostile {
            what: "the victim observation, not on a1",
            token: Some(token.clone()),
            body: own(vec![window(
                &victim,
                &victim_uid,
                t,
                5,
                vec![series(pod(&victim_ns, "v-1"), forged_bytes)],
            )]),
            expect: 200,
        },
        Hostile {
            what: "a series of b1's pod db",
            token: Some(token.clone()),
            body: own(vec![window(
                &both,
                &both_uid,
                t,
                5,
                vec![series(db_pod.clone(), forged_bytes)],
            )]),
            expect: 200,
        },
        Hostile {
            // Taken as the node's own (an honest agent names pods deleted
            // since); it cannot name another node's.
            what: "a series of a pod that does not exist",
            token: Some(token.clone()),
            body: own(vec![window(
                &both,
                &both_uid,
                t,
                5,
                vec![series(pod(&shop, "ghost"), 1)],
            )]),
            expect: 200,
        },
        Hostile {
            what: "more series than maxSeries + 1",
            token: Some(token.clone()),
            body: own(vec![window(
                &both,
                &both_uid,
                t,
                5,
                (0..50).map(|_| series(web_pod.clone(), 1)).collect(),
            )]),
            expect: 200,
        },
        Hostile {
            what: "a 10 kB label value",
            token: Some(token.clone()),
            body: own(vec![window(
                &both,
                &both_uid,
                t,
                5,
                vec![series(
                    json!({"namespace": shop, "pod": "web-1", "labels": {"app": "x".repeat(10_000)}}),
                    1,
                )],
            )]),
            expect: 422,
        },
        Hostile {
            what: "100 labels",
            token: Some(token.clone()),
            body: own(vec![window(
                &both,
                &both_uid,
                t,
                5,
                vec![series(
                    json!({"namespace": shop, "pod": "web-1",
                           "labels": (0..100).map(|i| (format!("k{i}"), json!("v"))).collect::<serde_json::Map<_, _>>()}),
                    1,
                )],
            )]),
            expect: 422,
        },
        Hostile {
            what: "a 1 MB remote address",
            token: Some(token.clone()),
            body: own(vec![window(
                &both,
                &both_uid,
                t,
                5,
                vec![
                    json!({"local": web_pod, "remote": "9".repeat(1 << 20), "port": 1, "protocol": 6,
                            "role": "Client", "flows": 1,
                            "tx": {"packets": 1, "bytes": 1, "payloadBytes": 1},
                            "rx": {"packets": 0, "bytes": 0, "payloadBytes": 0},
                            "retransmits": 0, "drops": 0, "rtt": []}),
                ],
            )]),
            expect: 422,
        },
        Hostile {
            what: "an observation that does not exist",
            token: Some(token.clone()),
            body: own(vec![window(
                "nope",
                "00000000-0000-0000-0000-000000000000",
                t,
                5,
                vec![series(web_pod.clone(), 1)],
            )]),
            expect: 200,
        },
        Hostile {
            what: "counters of b1's policy guard-db",
            token: Some(token.clone()),
            body: batch(
                &a1,
                "forger",
                vec![],
                vec![policy_window(t10, &guard_counts)],
            ),
            expect: 200,
        },
        Hostile {
            what: "a policy window a day in the future",
            token: Some(token.clone()),
            body: batch(
                &a1,
                "forger",
                vec![],
                vec![policy_window(t10 + 86_400, &json!([]))],
            ),
            expect: 422,
        },
        Hostile {
            what: "a policy window starting at 9.3e15",
            token: Some(token.clone()),
            body: batch(
                &a1,
                "forger",
                vec![],
                vec![policy_window(9_300_000_000_000_000, &json!([]))],
            ),
            expect: 422,
        },
    ];
    // The same window of a1 from ten agent processes: only a few are taken.
    for i in 0..10 {
        cases.push(Hostile {
            what: "one of ten agents of a1 in one window",
            token: Some(token.clone()),
            body: batch(
                &a1,
                &format!("forger-{i}"),
                vec![window(&both, &both_uid, t, 5, vec![])],
                vec![],
            ),
            expect: 200,
        });
    }
    let collector = sim.collector;
    let mut failures = vec![];
    for c in &cases {
        let token = c.token.clone();
        let body = c.body.clone();
        let got = tokio::task::spawn_blocking(move || {
            http_post(collector, "/v1/reports", token.as_deref(), &body)
        })
        .await
        .unwrap();
        match got {
            Some((code, _)) if code == c.expect => {}
            Some((code, body)) => failures.push(format!(
                "{}: HTTP {code} (expected {}): {}",
                c.what,
                c.expect,
                body.chars().take(300).collect::<String>()
            )),
            None => failures.push(format!("{}: no answer (is the operator alive?)", c.what)),
        }
    }
    // A 17 MiB body is refused from its Content-Length, before the token
    // is checked or a byte of it read.
    let claimed = tokio::task::spawn_blocking(move || post_claiming(collector, 17 << 20))
        .await
        .unwrap();
    if claimed.as_ref().map(|(c, _)| *c) != Some(413) {
        failures.push(format!("a 17 MiB body: {claimed:?} (expected 413)"));
    }
    println!("hostile agent: {} reports sent", cases.len() + 1);
    assert!(failures.is_empty(), "{failures:#?}");

    // The operator is alive and says what it refused, by reason.
    let op = sim.operator();
    for reason in [
        "MisalignedWindow",
        "WrongWindowSeconds",
        "FutureWindow",
        "StaleWindow",
        "ObservationNotOnNode",
        "ForeignPod",
        "PolicyNotOnNode",
        "TooManyAgents",
        "TooManySeries",
        "FieldTooLong",
    ] {
        let n = op.metric_sum(
            "flowlens_operator_report_refusals_total",
            &format!("reason=\"{reason}\""),
        );
        println!("hostile agent: refusals {reason}: {n}");
        assert!(n >= 1.0, "refusals of {reason} are counted: {n}");
    }

    // Two more windows later: the victim's results are exactly what they
    // were, guard-db's counters too, and no forged peer or pod shows up.
    let after = status_after(&sim, &victim, now_s() + 6).await;
    let total = after.total.clone().unwrap_or_default();
    assert_eq!(
        (
            total.packets,
            total.bytes,
            total.payload_bytes,
            total.cross_zone_bytes
        ),
        (
            before.packets,
            before.bytes,
            before.payload_bytes,
            before.cross_zone_bytes
        ),
        "the victim's totals are unchanged"
    );
    println!(
        "hostile agent: victim totals before {before:?}, after {total:?} (iperf3 sent {} bytes)",
        sent.bytes
    );
    let both_status = status_after(&sim, &both, now_s()).await;
    // (The ghost's one byte on a1 is a1's to claim.)
    let forged = |f: &TopFlow| {
        let text = serde_json::to_string(f).unwrap();
        text.contains("203.0.113.66") && !text.contains("ghost")
    };
    for s in [&after, &both_status] {
        assert!(
            !s.top_flows.iter().any(forged),
            "no forged flow in status: {:?}",
            s.top_flows
        );
    }
    let both_total = both_status.total.unwrap_or_default();
    assert!(
        both_total.bytes < forged_bytes,
        "no forged bytes in {both}: {both_total:?}"
    );
    let guard_after = policy(&sim, &shop, "guard-db").await;
    assert_eq!(
        guard_after.blocked, guard_before.blocked,
        "guard-db's counters are unchanged"
    );

    // And nothing is frozen: new traffic of b1 and of a1 is counted.
    let more = iperf3(&sim.topo, v2, v1, &v2_ip, 5202, "3M", "100M");
    let db_ip = sim.topo.pods[db].ip4.to_string();
    let _db = echo_server(&sim.topo, db, 7000);
    let talked = spawn_traffic(
        &sim.topo,
        web,
        "connect-loop",
        &format!("{db_ip}:7000"),
        &["--duration-ms", "500", "--interval-ms", "50"],
    )
    .join()
    .unwrap();
    assert!(talked["successes"].as_u64().unwrap() > 0, "{talked}");
    let end = now_s() + 1;
    let later = status_after(&sim, &victim, end)
        .await
        .total
        .unwrap_or_default();
    assert!(
        later.payload_bytes >= total.payload_bytes + more.bytes,
        "the victim's new traffic is counted: {later:?}, {more:?}"
    );
    poll(
        Duration::from_secs(30),
        "a1's new traffic counted",
        || async {
            let s = observation(&sim, &both).await;
            s.total
                .filter(|t| t.packets > both_total.packets)
                .map(|_| ())
        },
    )
    .await
    .unwrap();
    sim.shutdown().await.unwrap();
}

/// A pod's own interface counters: (IP-layer bytes, packets) it sent and
/// received (the kernel's, exact; Ethernet headers taken off).
fn pod_ip_traffic(sim: &SimCluster, pod: usize) -> (u64, u64) {
    let mut args = vec!["cat"];
    args.extend(InterfaceCounters::ETH0_FILES);
    let out = sim.topo.pod_output(pod, args[0], &args[1..]);
    let c = InterfaceCounters::parse(&String::from_utf8_lossy(&out.stdout)).unwrap();
    let packets = c.tx_packets + c.rx_packets;
    (c.tx_bytes + c.rx_bytes - 14 * packets, packets)
}

/// The state directory of the local control plane (`.flowlens/`, where its
/// kubeconfig is).
fn control_plane_dir() -> std::path::PathBuf {
    flowlens_e2e::cluster::kubeconfig_path()
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The local control plane's kube-apiserver: killed (SIGKILL, as a crash)
/// or started again (`hack/local-cluster.sh up`, on the same etcd).
fn kill_api_server() {
    let pid_file = control_plane_dir().join("run/kube-apiserver.pid");
    let pid = std::fs::read_to_string(&pid_file).unwrap_or_else(|e| {
        panic!(
            "{}: {e}: this test needs the local control plane of `just up`",
            pid_file.display()
        )
    });
    let ok = std::process::Command::new("kill")
        .args(["-9", pid.trim()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -9 {pid}");
}

fn start_api_server() {
    let repo = control_plane_dir().parent().unwrap().to_path_buf();
    let out = std::process::Command::new(repo.join("hack/local-cluster.sh"))
        .arg("up")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "hack/local-cluster.sh up: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The control plane crashes for 60 s in the middle of 100 s of traffic
/// between traced pods of two nodes, with a blocked connect loop running:
/// enforcement never lapses, and status ends up holding every byte the
/// pods' interfaces carried (none twice), the outage's windows within 30 s
/// of the API server's return.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_server_outage_loses_no_traffic_and_lifts_no_block() {
    let TwoNodes {
        mut sim,
        run,
        web,
        db,
        shop,
        ..
    } = two_nodes("e2e-outage").await;
    let obs = run.clone();
    sim.objects
        .observation(
            &obs,
            json!({"namespaces": [shop], "groupBy": ["pod"], "window": "5s"}),
        )
        .await
        .unwrap();
    deny_web_to_db(&sim, &shop).await;
    sim.start_operator(&[]);
    sim.start_agents().await.unwrap();
    wait_enforced(&sim, &shop, "deny-db").await;
    // Segmentation offload off on web's interface: its counters then count
    // each packet as sent, as the datapath does (with GSO they count a
    // super-packet's headers once).
    let out = sim
        .topo
        .pod_output(web, "ethtool", &["-K", "eth0", "tso", "off", "gso", "off"]);
    assert!(out.status.success(), "ethtool: {out:?}");
    let base = status_after(&sim, &obs, now_s())
        .await
        .total
        .unwrap_or_default();
    let c0 = pod_ip_traffic(&sim, web);

    let db_ip = sim.topo.pods[db].ip4.to_string();
    let _db = echo_server(&sim.topo, db, 5432);
    let blocked_base = policy(&sim, &shop, "deny-db")
        .await
        .blocked
        .map(|b| b.connections)
        .unwrap_or(0);
    // A 2-minute outage in the middle of 160 s of traffic.
    let traffic = spawn_iperf3_timed(&sim.topo, db, web, &db_ip, 5201, 160, "100M");
    let blocked = spawn_traffic(
        &sim.topo,
        web,
        "connect-loop",
        &format!("{db_ip}:5432"),
        &["--duration-ms", "160000", "--interval-ms", "100"],
    );
    tokio::time::sleep(Duration::from_secs(20)).await;
    kill_api_server();
    let down = Instant::now();
    println!("outage: kube-apiserver killed");
    tokio::time::sleep(Duration::from_secs(60)).await;
    // The operator says its view may be stale, and stays ready (agents'
    // reports reach only ready pods).
    let (code, body) = flowlens_e2e::operator::http_get(sim.operator().metrics, "/readyz").unwrap();
    println!("outage: /readyz {code}: {body}");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("may be stale"), "{body}");
    assert!(
        sim.operator()
            .metric_sum("flowlens_operator_watch_stale", "")
            >= 1.0
    );
    tokio::time::sleep(Duration::from_secs(60)).await;
    tokio::task::spawn_blocking(start_api_server).await.unwrap();
    let back = Instant::now();
    let at_return = pod_ip_traffic(&sim, web);
    println!(
        "outage: kube-apiserver ready again after {:.1} s",
        back.duration_since(down).as_secs_f64()
    );

    // Everything carried until the return reaches status within 30 s of it.
    let until_return = at_return.0 - c0.0;
    let converged = poll(
        Duration::from_secs(60),
        "the outage's traffic in status",
        || async {
            let t = observation(&sim, &obs).await.total?;
            (t.bytes - base.bytes >= until_return - until_return / 200).then(|| back.elapsed())
        },
    )
    .await
    .unwrap();
    println!(
        "outage: status held the {until_return} bytes carried until the return {:.1} s after it",
        converged.as_secs_f64()
    );

    let sent = tokio::task::spawn_blocking(move || traffic.join().unwrap())
        .await
        .unwrap();
    let blocked = tokio::task::spawn_blocking(move || blocked.join().unwrap())
        .await
        .unwrap();
    let end = now_s();
    let c1 = pod_ip_traffic(&sim, web);
    let s = status_after(&sim, &obs, end + 1).await;
    let total = s.total.unwrap_or_default();
    let (counted, carried) = (total.bytes - base.bytes, c1.0 - c0.0);
    let off = pct(counted, carried);
    println!(
        "outage: status {counted} bytes, {} packets; web's interface {carried} bytes, {} packets ({off:+.3}%); iperf3 {sent:?}; blocked loop {blocked}",
        total.packets - base.packets,
        c1.1 - c0.1
    );
    assert!(
        converged <= Duration::from_secs(30),
        "the outage's windows took {converged:?} to reach status"
    );
    assert!(
        off.abs() <= 0.5,
        "status holds what the interfaces carried: {off:+.3}%"
    );
    assert_eq!(blocked["successes"], 0, "the block held: {blocked}");
    let denied = blocked["denied"].as_u64().unwrap();
    assert!(denied > 1000, "{blocked}");
    let counted = poll(
        Duration::from_secs(60),
        "every blocked attempt in status",
        || async {
            let b = policy(&sim, &shop, "deny-db").await.blocked?.connections - blocked_base;
            (b >= denied).then_some(b)
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: the client saw {denied} refused connects"));
    println!("outage: status counts {counted} blocked connects; the client saw {denied} refused");
    assert_eq!(counted, denied, "blocked attempts lost or counted twice");
    let stale = sim
        .operator()
        .metric_sum("flowlens_operator_watch_stale", "");
    assert_eq!(stale, 0.0, "every watch listed again after the outage");
    sim.shutdown().await.unwrap();
}
