//! DNS end to end: a real resolver (dnsmasq, from Debian) behind a 10 ms
//! each-way delay line answers made-up names (a CNAME, an NXDOMAIN, a
//! REFUSED) to a traced pod; the pod resolves with a stub resolver's
//! query (UDP and TCP) and connects to the answer. Status must name the
//! external peer, count the answers by code, and time them at the injected
//! delay; a hostile pod's malformed, truncated and forged DNS changes
//! nothing and crashes nothing.
//!
//! Needs root and the local control plane (`just up`); `just e2e` runs it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flowlens_api::network_observation::{NetworkObservationStatus, TopFlow};
use flowlens_e2e::{
    cluster::unique_name,
    fixtures::{observation, wait_ready},
    process::{Proc, require_root, workspace_bin},
    sim::{SimCluster, poll},
    traffic::echo_server,
};
use serde_json::json;

/// The injected one-way delay between the zones: a query and its answer
/// each cross it once.
const ONE_WAY: Duration = Duration::from_millis(10);
const WINDOW_S: u64 = 10;

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Sleeps until one second into the next window, so that a short burst
/// lands in one window.
fn start_of_next_window() {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let next = (now.as_secs() / WINDOW_S + 1) * WINDOW_S + 1;
    std::thread::sleep(Duration::from_secs(next) - now);
}

/// `flowlens-traffic resolve` in pod `pod`: its JSON line.
fn resolve(
    sim: &SimCluster,
    pod: usize,
    server: &str,
    name: &str,
    extra: &[&str],
) -> serde_json::Value {
    let mut args = vec!["resolve", "--server", server, "--name", name];
    args.extend_from_slice(extra);
    let out = sim
        .topo
        .pod_output(pod, workspace_bin("flowlens-traffic"), &args);
    assert!(
        out.status.success(),
        "resolve {name}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn to_address<'a>(flows: &'a [TopFlow], addr: &str, port: u16) -> Option<&'a TopFlow> {
    flows
        .iter()
        .find(|f| f.destination.address.as_deref() == Some(addr) && f.port == port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolved_names_response_codes_and_dns_latency_reach_status() {
    require_root();
    let run = unique_name("e2e-dns");
    let (a1, b1) = (format!("{run}-a1"), format!("{run}-b1"));
    let mut sim = SimCluster::new(&run, &[(&a1, "zone-a"), (&b1, "zone-b")])
        .await
        .unwrap();
    sim.topo.add_delay("zone-a", "zone-b", ONE_WAY);
    let (shop, lab) = (format!("{run}-shop"), format!("{run}-lab"));
    sim.objects.namespace(&shop, &[]).await.unwrap();
    sim.objects.namespace(&lab, &[]).await.unwrap();
    let client = sim
        .add_pod(0, &shop, "client-1", &[("app", "client")], Some("client"))
        .await
        .unwrap();
    let mallory = sim
        .add_pod(0, &lab, "mallory-1", &[("app", "mallory")], Some("mallory"))
        .await
        .unwrap();
    // Outside the cluster (no Pod objects): the resolver and the service
    // its names point at are external addresses.
    let resolver = sim.topo.add_pod(1, "resolver");
    let api = sim.topo.add_pod(1, "api");
    let (resolver_ip, api_ip) = (
        sim.topo.pods[resolver].ip4.to_string(),
        sim.topo.pods[api].ip4.to_string(),
    );
    let (resolver_ip6, api_ip6) = (
        sim.topo.pods[resolver].ip6.to_string(),
        sim.topo.pods[api].ip6.to_string(),
    );
    let log = sim.topo.work_dir.join("dnsmasq.log");
    let _dnsmasq = Proc::spawn(
        "dnsmasq",
        sim.topo.pod_cmd(
            resolver,
            "dnsmasq",
            &[
                "--no-daemon",
                "--conf-file=/dev/null",
                "--pid-file=",
                "--user=root",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                &format!("--listen-address={resolver_ip},{resolver_ip6}"),
                "--port=53",
                &format!("--host-record=api.payments.example,{api_ip},{api_ip6}"),
                "--cname=www.payments.example,api.payments.example",
                "--local=/payments.example/",
                "--log-queries",
            ],
        ),
        Some(log.clone()),
    );
    let _web = echo_server(&sim.topo, api, 8443);
    let obs = run.clone();
    let by_name = format!("{run}-by-name");
    sim.objects
        .observation(&obs, json!({"namespaces": [shop], "window": "10s"}))
        .await
        .unwrap();
    sim.objects
        .observation(
            &by_name,
            json!({"namespaces": [shop], "window": "10s",
                   "groupBy": ["namespace", "workload", "dnsName"]}),
        )
        .await
        .unwrap();
    let lab_obs = format!("{run}-lab");
    sim.objects
        .observation(&lab_obs, json!({"namespaces": [lab], "window": "10s"}))
        .await
        .unwrap();
    sim.start_operator(&[]);
    sim.start_agents().await.unwrap();
    wait_ready(&sim, &obs).await;
    wait_ready(&sim, &lab_obs).await;
    let server = format!("{resolver_ip}:53");
    // dnsmasq is up when it answers.
    poll(Duration::from_secs(10), "dnsmasq answering", || async {
        let out = sim.topo.pod_output(
            api,
            workspace_bin("flowlens-traffic"),
            &[
                "resolve",
                "--server",
                &server,
                "--name",
                "api.payments.example",
            ],
        );
        out.status.success().then_some(())
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}\ndnsmasq log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    });

    // 1. Six queries in one window: three names resolved through a CNAME
    //    (each followed by a connection to the answer), an NXDOMAIN over
    //    UDP and over TCP, a REFUSED.
    start_of_next_window();
    let burst_start = now_s();
    let mut elapsed_us = Vec::new();
    for _ in 0..3 {
        let r = resolve(
            &sim,
            client,
            &server,
            "www.payments.example",
            &["--connect", "8443"],
        );
        assert_eq!(r["rcode"], 0, "{r}");
        assert_eq!(r["addresses"], json!([api_ip]), "{r}");
        assert_eq!(r["connected"], true, "{r}");
        elapsed_us.push(r["elapsed_us"].as_u64().unwrap());
    }
    let r = resolve(&sim, client, &server, "missing.payments.example", &[]);
    assert_eq!(r["rcode"], 3, "{r}");
    elapsed_us.push(r["elapsed_us"].as_u64().unwrap());
    let r = resolve(
        &sim,
        client,
        &server,
        "missing.payments.example",
        &["--tcp"],
    );
    assert_eq!(r["rcode"], 3, "{r}");
    let r = resolve(&sim, client, &server, "elsewhere.example", &[]);
    assert_eq!(r["rcode"], 5, "{r}");
    elapsed_us.push(r["elapsed_us"].as_u64().unwrap());
    assert_eq!(
        now_s() / WINDOW_S,
        burst_start / WINDOW_S,
        "the burst must fit one window"
    );
    // Ground truth: the client's own clock saw at least the injected round trip.
    let injected_us = 2 * ONE_WAY.as_micros() as u64;
    for e in &elapsed_us {
        assert!(*e >= injected_us, "{e} µs < the injected {injected_us} µs");
    }

    // 2. In the next window, the hostile pod: malformed, truncated, random and forged
    //    (`evil.example` is the api's address) DNS "answers" from port 53
    //    to the client, and junk to the resolver.
    start_of_next_window();
    let client_ip = sim.topo.pods[client].ip4.to_string();
    for (to, from) in [
        (format!("{client_ip}:40000"), "53"),
        (server.clone(), "40001"),
    ] {
        let out = sim.topo.pod_output(
            mallory,
            workspace_bin("flowlens-traffic"),
            &[
                "dns-junk",
                "--to",
                &to,
                "--from-port",
                from,
                "--forge-address",
                &api_ip,
            ],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Then the client reaches the api again without resolving: still the
    // name it resolved, not the forged one.
    let out = sim.topo.pod_output(
        client,
        workspace_bin("flowlens-traffic"),
        &[
            "ping-pong",
            "--to",
            &format!("{api_ip}:8443"),
            "--count",
            "3",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // And over IPv6: an AAAA query to the resolver's IPv6 address, then a
    // connection to the answer.
    let r = resolve(
        &sim,
        client,
        &format!("[{resolver_ip6}]:53"),
        "www.payments.example",
        &["--type", "AAAA", "--connect", "8443"],
    );
    assert_eq!(
        (&r["rcode"], &r["addresses"], &r["connected"]),
        (&json!(0), &json!([api_ip6]), &json!(true)),
        "{r}"
    );

    // 3. Status of the burst's window.
    let window_start = (burst_start / WINDOW_S * WINDOW_S) as i64;
    let burst = |s: &NetworkObservationStatus| {
        s.last_window
            .as_ref()
            .is_some_and(|w| w.start.0.as_second() == window_start)
    };
    let s = poll(
        Duration::from_secs(45),
        "the burst's window in status",
        || async {
            let s = observation(&sim, &obs).await;
            burst(&s).then_some(s)
        },
    )
    .await
    .unwrap();
    let dns = s.dns.clone().unwrap_or_else(|| panic!("no dns in {s:?}"));
    assert_eq!(dns.queries, 6, "{dns:?}");
    assert_eq!(
        dns.responses,
        [
            ("NOERROR".to_owned(), 3),
            ("NXDOMAIN".to_owned(), 2),
            ("REFUSED".to_owned(), 1)
        ]
        .into(),
        "{dns:?}"
    );
    assert_eq!(dns.unanswered, 0, "{dns:?}");
    assert_eq!(dns.top_names[0].name, "www.payments.example", "{dns:?}");
    assert_eq!(dns.top_names[0].queries, 3, "{dns:?}");
    // The kernel timed query to answer at the pod's interface: the injected
    // round trip plus the resolver's and the delay line's own time. Stated
    // tolerance: +5 ms (and the histogram's 1/32 bucket width).
    let l = dns.latency.clone().unwrap();
    assert_eq!(l.samples, 6, "{l:?}");
    let low = injected_us - injected_us / 32;
    let high = injected_us + 5_000;
    assert!(
        (low..=high).contains(&l.p50_micros) && l.p99_micros <= high + high / 32,
        "DNS latency {l:?} not within [{low}, {high}] µs of the injected {injected_us} µs"
    );
    let median_client = {
        let mut v = elapsed_us.clone();
        v.sort();
        v[v.len() / 2]
    };
    assert!(
        l.p50_micros <= median_client + median_client / 32,
        "the kernel's p50 {} µs exceeds the client's own median {median_client} µs",
        l.p50_micros
    );
    eprintln!(
        "DNS latency: p50 {} µs, p99 {} µs; injected {injected_us} µs; client median {median_client} µs",
        l.p50_micros, l.p99_micros
    );

    // The connections to the api are named by what the client resolved.
    let to_api = to_address(&s.top_flows, &api_ip, 8443)
        .unwrap_or_else(|| panic!("no flow to {api_ip}:8443 in {:?}", s.top_flows));
    assert!(to_api.destination.external);
    assert_eq!(
        to_api.destination.name.as_deref(),
        Some("www.payments.example"),
        "{to_api:?}"
    );
    assert_eq!(to_api.flows, 3, "{to_api:?}");
    let to_resolver = to_address(&s.top_flows, &resolver_ip, 53);
    assert!(
        to_resolver.is_some_and(|f| f.destination.name.is_none()),
        "the resolver was never resolved: {to_resolver:?}"
    );
    // Grouped by name: the api is its name, without its address.
    let s2 = poll(Duration::from_secs(30), "the by-name window", || async {
        let s = observation(&sim, &by_name).await;
        burst(&s).then_some(s)
    })
    .await
    .unwrap();
    let named = s2
        .top_flows
        .iter()
        .find(|f| f.destination.name.as_deref() == Some("www.payments.example"))
        .unwrap_or_else(|| panic!("no named flow in {:?}", s2.top_flows));
    assert_eq!(
        (named.destination.address.as_deref(), named.port),
        (None, 8443)
    );

    // 4. The forged answer taught nothing, the later connection kept the
    //    resolved name, and the IPv6 connection has it too. The operator's
    //    flow counters hold every window: 3 + 1 + 1 named connections.
    let op = sim.operator();
    let f = format!("observation=\"{obs}\"");
    let named = "destination_name=\"www.payments.example\"";
    poll(
        Duration::from_secs(45),
        "the later connection counted",
        || async {
            let n = op.metric_sum("flowlens_flow_connections_total", named);
            (n >= 10.0).then_some(n)
        },
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}: {} connections named (3 + 1 + 1 per observation expected)",
            op.metric_sum("flowlens_flow_connections_total", named)
        )
    });
    assert_eq!(
        op.metric_sum("flowlens_flow_connections_total", named),
        10.0,
        "both observations: 3 + 1 + 1 connections each, none counted twice"
    );
    assert_eq!(
        op.metric_sum(
            "flowlens_flow_connections_total",
            &format!("destination_address=\"{api_ip6}\",destination_name=\"www.payments.example\"")
        ),
        1.0,
        "the IPv6 connection, named (the by-name observation has no address)"
    );
    let later = observation(&sim, &obs).await;
    let all = serde_json::to_string(&later).unwrap() + &serde_json::to_string(&s).unwrap();
    assert!(
        !all.contains("evil.example"),
        "a forged name reached status: {all}"
    );
    assert_eq!(
        op.metric_sum("flowlens_", "evil.example"),
        0.0,
        "a forged name reached the metrics"
    );
    let agent = sim.agent(0);
    assert!(
        agent.metric_sum(
            "flowlens_agent_dns_messages_total",
            "outcome=\"unreadable\""
        ) >= 7.0,
        "the malformed messages are counted as unreadable"
    );
    assert!(
        agent.metric_sum(
            "flowlens_agent_dns_messages_total",
            "outcome=\"unmatched_answer\""
        ) >= 1.0,
        "the forged answer is counted as unmatched"
    );
    assert_eq!(
        agent.metric_sum(
            "flowlens_agent_dns_messages_total",
            "outcome=\"dropped_in_kernel\""
        ),
        0.0
    );
    // The operator's counters agree with status (nothing counted twice).
    assert_eq!(
        op.metric_sum("flowlens_observation_dns_queries_total", &f),
        7.0,
        "6 in the burst, the AAAA query after"
    );
    assert_eq!(
        op.metric_sum(
            "flowlens_observation_dns_responses_total",
            &format!("{f},rcode=\"NXDOMAIN\"")
        ),
        2.0
    );
    sim.shutdown().await.unwrap();
}
