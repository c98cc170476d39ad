//! On a real cluster (`just cluster`: kubelet, containerd, a real CNI,
//! kube-proxy), Flowlens installed from its images with kubectl (`just
//! cluster-install`). Workloads are Deployments of the test image; every
//! Flowlens figure is read through the API (status) and compared with the
//! kernel's own interface counters of the pods, or with the clients' own
//! connect() results.
//!
//! `just cluster-test` starts the cluster, installs Flowlens, runs these and
//! stops the cluster.

use std::time::{Duration, Instant};

use flowlens_api::{
    FlowPolicy, NetworkObservation, NodeAgentConfig,
    network_observation::{NetworkObservationStatus, TrafficTotal},
};
use flowlens_e2e::{
    cluster::client,
    kubectl::{TestNamespace, exec, kubectl, require_cluster, rollout_status, wait_until},
    objects::eventually,
};
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, api::ListParams};

/// Ethernet (14) + IPv4 (20) + TCP with timestamps (32) bytes of every frame
/// of these TCP flows.
const FRAME_HEADERS: u64 = 66;

/// The TCP payload a pod interface carried: its bytes less every frame's
/// headers. (The veth counts GSO super-frames as one frame with one set of
/// headers, so its byte count cannot be compared with status' IP bytes,
/// which count every segment's headers as a NIC would send them; payload is
/// the same either way.)
fn wire_payload(d: &flowlens_e2e::kubectl::InterfaceCounters) -> u64 {
    (d.tx_bytes + d.rx_bytes) - FRAME_HEADERS * (d.tx_packets + d.rx_packets)
}

fn pct(a: u64, b: u64) -> f64 {
    (a as f64 - b as f64) / b as f64 * 100.0
}

/// A NetworkObservation of one test namespace (5 s windows, grouped down to
/// pods), read back through the API.
struct Observed {
    api: Api<NetworkObservation>,
    name: String,
}

impl Observed {
    /// Applies it and waits for its first window: the node's agent runs it.
    async fn start(client: &kube::Client, ns: &TestNamespace) -> Observed {
        let name = ns.name.clone();
        flowlens_e2e::kubectl::apply(&format!(
            r#"apiVersion: flowlens.dev/v1alpha1
kind: NetworkObservation
metadata: {{name: {name}}}
spec:
  namespaces: [{ns}]
  keepLabels: [app]
  groupBy: [namespace, workload, pod]
  window: 5s
"#,
            ns = ns.name
        ))
        .unwrap();
        let o = Observed {
            api: Api::all(client.clone()),
            name,
        };
        o.wait("a first window in status", |s| {
            s.last_window.as_ref().map(|_| ())
        })
        .await;
        o
    }

    /// Polls the status until `f` finds what it wants.
    async fn wait<T>(&self, what: &str, f: impl Fn(NetworkObservationStatus) -> Option<T>) -> T {
        eventually(Duration::from_secs(90), what, || {
            let (api, name) = (self.api.clone(), self.name.clone());
            let f = &f;
            async move { f(api.get(&name).await.ok()?.status?) }
        })
        .await
    }

    /// The total so far.
    async fn total(&self) -> TrafficTotal {
        self.wait("a total", |s| Some(s.total.unwrap_or_default()))
            .await
    }

    /// The total once a window that started after now is in status (every
    /// window up to now is counted).
    async fn total_after_now(&self) -> TrafficTotal {
        let now = now_s();
        self.wait("windows after the traffic", |s| {
            (s.last_window.as_ref()?.start.0.as_second() > now).then_some(s.total?)
        })
        .await
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        let _ = kubectl(&["delete", "networkobservation", &self.name, "--wait=false"]);
    }
}

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flowlens_runs_from_its_images_unprivileged_on_every_node() {
    require_cluster();
    let client = client().await.unwrap();
    let pods = Api::<Pod>::namespaced(client.clone(), "flowlens-system")
        .list(&ListParams::default())
        .await
        .unwrap();
    let nodes = kubectl(&["get", "nodes", "-o", "name"]).unwrap();
    let node_count = nodes.lines().count();
    let mut agents = 0;
    let mut operators = 0;
    for p in &pods.items {
        let name = p.metadata.name.clone().unwrap_or_default();
        let spec = p.spec.as_ref().unwrap();
        for c in spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
        {
            let privileged = c
                .security_context
                .as_ref()
                .and_then(|s| s.privileged)
                .unwrap_or(false);
            assert!(!privileged, "{name}/{} is privileged", c.name);
        }
        let running = p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
        if name.starts_with("flowlens-agent-") && running {
            agents += 1;
        }
        if name.starts_with("flowlens-operator-") && running {
            operators += 1;
        }
    }
    assert_eq!(agents, node_count, "one agent per node");
    assert!(operators >= 1, "an operator runs");
    // Every node's agent applied its config (status written by the agent).
    let configs = Api::<NodeAgentConfig>::all(client.clone());
    eventually(
        Duration::from_secs(60),
        "every node's config applied",
        || {
            let configs = configs.clone();
            async move {
                let list = configs.list(&ListParams::default()).await.ok()?;
                (list.items.len() == node_count
                    && list.items.iter().all(|c| {
                        let applied = c.status.as_ref().and_then(|s| s.applied_revision.clone());
                        applied.is_some() && applied.as_deref() == Some(c.spec.revision.as_str())
                    }))
                .then_some(())
            }
        },
    )
    .await;
    // Reports go over TLS, verified with the CA the operator provisioned.
    for c in configs.list(&ListParams::default()).await.unwrap().items {
        let collector = c.spec.collector.clone().expect("a collector endpoint");
        assert!(collector.url.starts_with("https://"), "{}", collector.url);
        assert!(
            collector
                .ca_bundle
                .as_deref()
                .is_some_and(|b| b.contains("BEGIN CERTIFICATE")),
            "a CA bundle for the collector"
        );
    }
    // /debug/window answers only on the node itself: a pod is refused.
    let ns = TestNamespace::new("fl-priv", &[]).unwrap();
    let (pod, _) = ns.deploy("probe", "sleep infinity").unwrap();
    let node_ip = kubectl(&[
        "get",
        "nodes",
        "-o",
        "jsonpath={.items[0].status.addresses[?(@.type==\"InternalIP\")].address}",
    ])
    .unwrap();
    let code = exec(
        &ns.name,
        &pod,
        &[
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://{node_ip}:9990/debug/window"),
        ],
    )
    .unwrap();
    assert_eq!(code, "403", "/debug/window from a pod");
    let metrics = exec(
        &ns.name,
        &pod,
        &["curl", "-sf", &format!("http://{node_ip}:9990/metrics")],
    )
    .unwrap();
    assert!(
        metrics.contains("flowlens_agent"),
        "metrics are served to pods"
    );
    // `kubectl flowlens status` (the cluster admin's kubeconfig): the node
    // is listed with its revision applied and no problem.
    let (ok, table, err) = flowlens_e2e::kubectl::kubectl_flowlens(
        &flowlens_e2e::cluster::kubeconfig_path(),
        &["status"],
    );
    println!("{table}{err}");
    assert!(ok, "kubectl flowlens status failed");
    let rows: Vec<&str> = table.lines().skip(1).collect();
    assert!(!rows.is_empty(), "no node in {table}");
    for row in rows {
        assert!(
            !row.contains("wants") && !row.contains("not applied"),
            "{row}"
        );
        assert!(row.ends_with("none"), "a problem: {row}");
    }
}

/// `kubectl flowlens` as a user of the installed cluster: refused without a
/// role; once bound to Kubernetes' own `view` ClusterRole (which the
/// controller-manager aggregates `flowlens-view` into), allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_flowlens_shows_a_user_what_rbac_allows() {
    require_cluster();
    let client = client().await.unwrap();
    let ns = TestNamespace::new("fl-user", &[]).unwrap();
    let kubeconfig = std::env::temp_dir().join(format!("{}-viewer.kubeconfig", ns.name));
    flowlens_e2e::cluster::service_account_kubeconfig(&client, &ns.name, "viewer", &kubeconfig)
        .await
        .unwrap();
    let (ok, _, err) = flowlens_e2e::kubectl::kubectl_flowlens(&kubeconfig, &["status"]);
    println!("without a role: {err}");
    assert!(!ok, "a user without a role listed node configs");
    assert!(err.contains("refused to list"), "{err}");
    let binding = format!("{}-viewer", ns.name);
    flowlens_e2e::kubectl::apply(&format!(
        r#"apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {{name: {binding}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: view}}
subjects: [{{kind: ServiceAccount, name: viewer, namespace: {ns}}}]
"#,
        ns = ns.name
    ))
    .unwrap();
    let table = wait_until(
        Duration::from_secs(30),
        Duration::from_millis(500),
        "status allowed through view",
        || {
            let (ok, out, _) = flowlens_e2e::kubectl::kubectl_flowlens(&kubeconfig, &["status"]);
            ok.then_some(out)
        },
    );
    let _ = kubectl(&["delete", "clusterrolebinding", &binding]);
    let _ = std::fs::remove_file(&kubeconfig);
    println!("with view: {table}");
    assert!(table.lines().count() >= 2, "no node listed: {table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_traffic_in_status_matches_the_pods_interface_counters() {
    require_cluster();
    let client = client().await.unwrap();
    let ns = TestNamespace::new("fl-traffic", &[]).unwrap();
    let (server, server_ip) = ns.deploy("server", "exec iperf3 -s").unwrap();
    let (client_pod, _) = ns.deploy("client", "exec sleep infinity").unwrap();
    let obs = Observed::start(&client, &ns).await;
    let total_before = obs.total().await;
    let before = ns.eth0(&client_pod).unwrap();
    // Paced, so that nothing is still queued when it ends.
    exec(
        &ns.name,
        &client_pod,
        &[
            "iperf3",
            "-c",
            &server_ip,
            "-t",
            "4",
            "-b",
            "200M",
            "--connect-timeout",
            "3000",
        ],
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let after = ns.eth0(&client_pod).unwrap();
    let total = obs.total_after_now().await;
    // Top flows (of the last window) name the real pods and workloads: look
    // while a second transfer runs.
    let (ns_name, pod, ip) = (ns.name.clone(), client_pod.clone(), server_ip.clone());
    let second = std::thread::spawn(move || {
        exec(
            &ns_name,
            &pod,
            &["iperf3", "-c", &ip, "-t", "12", "-b", "10M"],
        )
    });
    let top = obs
        .wait("a top flow to 5201", |s| {
            s.top_flows.into_iter().find(|f| f.port == 5201)
        })
        .await;
    second.join().unwrap().unwrap();
    let d = after.since(&before);
    let counted = total.payload_bytes - total_before.payload_bytes;
    let wire = wire_payload(&d);
    println!(
        "client eth0: {} bytes in {} frames = {wire} payload bytes; status: {counted} payload bytes ({:+.4}%), {} IP bytes in {} packets",
        d.tx_bytes + d.rx_bytes,
        d.tx_packets + d.rx_packets,
        pct(counted, wire),
        total.bytes - total_before.bytes,
        total.packets - total_before.packets,
    );
    assert!(
        pct(counted, wire).abs() < 0.5,
        "status {counted} vs interface {wire}: {:+.3}%",
        pct(counted, wire)
    );
    assert_eq!(top.source.workload.as_deref(), Some("Deployment/client"));
    assert_eq!(
        top.destination.workload.as_deref(),
        Some("Deployment/server")
    );
    assert_eq!(top.source.pod.as_deref(), Some(client_pod.as_str()));
    assert_eq!(top.destination.pod.as_deref(), Some(server.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_blocks_in_the_kernel_and_its_counters_rise() {
    require_cluster();
    let client = client().await.unwrap();
    let (ns, web, db_ip) = blocked_web_and_db("fl-policy").await;
    let policies = Api::<FlowPolicy>::namespaced(client.clone(), &ns.name);
    let attempts = 20;
    let script = format!(
        "ok=0; for i in $(seq 1 {attempts}); do nc -z -w 2 {db_ip} 5432 && ok=$((ok+1)); done; \
         allowed=0; nc -z -w 2 {db_ip} 5201 && allowed=1; echo $ok $allowed"
    );
    let out = exec(&ns.name, &web, &["bash", "-c", &script]).unwrap();
    let v: Vec<u64> = out.split_whitespace().map(|s| s.parse().unwrap()).collect();
    assert_eq!(v[0], 0, "blocked connections that got through");
    assert_eq!(v[1], 1, "the allowed port works");
    let started = Instant::now();
    let blocked = eventually(
        Duration::from_secs(60),
        "blocked attempts in status",
        || {
            let p = policies.clone();
            async move {
                let s = p.get("web-no-db").await.ok()?.status?;
                let b = s.blocked?;
                (b.connections >= attempts).then_some(b)
            }
        },
    )
    .await;
    println!(
        "blocked {} connections ({} packets) in status {:?} after the attempts",
        blocked.connections,
        blocked.packets,
        started.elapsed()
    );
    assert_eq!(
        blocked.connections, attempts,
        "each refused attempt counted once"
    );
}

/// A web -> db:5432 block in force in a fresh namespace: (namespace, web
/// pod, db IP).
async fn blocked_web_and_db(prefix: &str) -> (TestNamespace, String, String) {
    let client = client().await.unwrap();
    let ns = TestNamespace::new(prefix, &[]).unwrap();
    let (_, db_ip) = ns.deploy("db", "nc -lk -p 5432 & exec iperf3 -s").unwrap();
    let (web, _) = ns.deploy("web", "exec sleep infinity").unwrap();
    flowlens_e2e::kubectl::apply(&format!(
        r#"apiVersion: flowlens.dev/v1alpha1
kind: FlowPolicy
metadata: {{name: web-no-db, namespace: {ns}}}
spec:
  mode: Enforce
  podSelector: {{matchLabels: {{app: web}}}}
  egress:
  - to: [{{podSelector: {{matchLabels: {{app: db}}}}}}]
    ports: [{{protocol: TCP, port: 5432}}]
"#,
        ns = ns.name
    ))
    .unwrap();
    let policies = Api::<FlowPolicy>::namespaced(client.clone(), &ns.name);
    eventually(Duration::from_secs(60), "Enforced on every node", || {
        let p = policies.clone();
        async move {
            let s = p.get("web-no-db").await.ok()?.status?;
            let enforced = s
                .conditions
                .iter()
                .any(|c| c.type_ == "Enforced" && c.status == "True");
            let nodes = s.nodes?;
            (enforced && nodes.targeted >= 1 && nodes.enforcing == nodes.targeted).then_some(())
        }
    })
    .await;
    (ns, web, db_ip)
}

/// The blocked connections web-no-db's status counts once it counts at
/// least `attempts` (90 s at most).
async fn blocked_in_status(ns: &str, attempts: u64) -> u64 {
    let policies = Api::<FlowPolicy>::namespaced(client().await.unwrap(), ns);
    eventually(
        Duration::from_secs(90),
        &format!("{attempts} blocked attempts in status"),
        || {
            let p = policies.clone();
            async move {
                let b = p.get("web-no-db").await.ok()?.status?.blocked?;
                (b.connections >= attempts).then_some(b.connections)
            }
        },
    )
    .await
}

/// For `secs` seconds: a connect to db:5432 every 10 ms and one allowed
/// iperf3 stream to db:5201. Prints `attempts succeeded iperf3_exit_code`.
fn retry_and_stream_script(db_ip: &str, secs: u32) -> String {
    format!(
        "end=$((SECONDS+{secs})); n=0; ok=0; \
         iperf3 -c {db_ip} -t {secs} -b 20M > /tmp/stream.log 2>&1 & s=$!; \
         while [ $SECONDS -lt $end ]; do n=$((n+1)); nc -z -w 1 {db_ip} 5432 2>/dev/null && ok=$((ok+1)); sleep 0.01; done; \
         wait $s; echo $n $ok $?"
    )
}

fn parse_three(out: &str) -> (u64, u64, i64) {
    let v: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(v.len(), 3, "unexpected output {out:?}");
    (
        v[0].parse().unwrap(),
        v[1].parse().unwrap(),
        v[2].parse().unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_update_of_the_agents_lets_no_blocked_connection_through() {
    require_cluster();
    let (ns, web, db_ip) = blocked_web_and_db("fl-roll").await;
    let (ns_name, web_pod, script) = (
        ns.name.clone(),
        web.clone(),
        retry_and_stream_script(&db_ip, 40),
    );
    let load = std::thread::spawn(move || exec(&ns_name, &web_pod, &["bash", "-c", &script]));
    std::thread::sleep(Duration::from_secs(3));
    let started = Instant::now();
    kubectl(&[
        "-n",
        "flowlens-system",
        "rollout",
        "restart",
        "ds/flowlens-agent",
    ])
    .unwrap();
    rollout_status("flowlens-system", "ds/flowlens-agent").unwrap();
    let rollout = started.elapsed();
    let (attempts, through, stream_rc) = parse_three(&load.join().unwrap().unwrap());
    println!(
        "rolling update took {rollout:?}; {attempts} blocked attempts every 10 ms, {through} got through; allowed stream exit {stream_rc}"
    );
    assert!(attempts > 500, "the retry loop ran ({attempts} attempts)");
    assert_eq!(
        through, 0,
        "blocked connections got through during the rollout"
    );
    assert_eq!(stream_rc, 0, "the allowed long-lived stream was reset");
    // Each agent hands its drained counts to its successor through the
    // node's spool: every refused attempt is in status, once.
    let counted = blocked_in_status(&ns.name, attempts).await;
    println!("status counts {counted} blocked connects; the client made {attempts}");
    assert_eq!(counted, attempts, "blocked attempts lost or counted twice");
}

/// The restart count of the agent pods' container, summed.
fn agent_restarts() -> u64 {
    kubectl(&[
        "-n",
        "flowlens-system",
        "get",
        "pods",
        "-l",
        "app.kubernetes.io/name=flowlens-agent",
        "-o",
        "jsonpath={.items[*].status.containerStatuses[*].restartCount}",
    ])
    .unwrap()
    .split_whitespace()
    .map(|n| n.parse::<u64>().unwrap())
    .sum()
}

/// `kill -9` of the agent process on the node (a crash: no shutdown, no
/// last report); the kubelet restarts the container and the successor
/// reports what its predecessor drained, from the node's spool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_kill_9_lets_no_blocked_connection_through_and_loses_no_count() {
    require_cluster();
    let (ns, web, db_ip) = blocked_web_and_db("fl-kill").await;
    let restarts = agent_restarts();
    let (ns_name, web_pod, script) = (
        ns.name.clone(),
        web.clone(),
        retry_and_stream_script(&db_ip, 30),
    );
    let load = std::thread::spawn(move || exec(&ns_name, &web_pod, &["bash", "-c", &script]));
    std::thread::sleep(Duration::from_secs(8));
    // The cluster's node is this machine: its agent is a process here.
    let killed = std::process::Command::new("pkill")
        .args(["-9", "-x", "flowlens-agent"])
        .status()
        .unwrap();
    assert!(killed.success(), "no flowlens-agent process to kill");
    let started = Instant::now();
    wait_until(
        Duration::from_secs(60),
        Duration::from_millis(200),
        "the kubelet restarted the agent",
        || (agent_restarts() > restarts).then_some(()),
    );
    rollout_status("flowlens-system", "ds/flowlens-agent").unwrap();
    let back = started.elapsed();
    let (attempts, through, stream_rc) = parse_three(&load.join().unwrap().unwrap());
    println!(
        "agent kill -9: back and ready after {back:?}; {attempts} blocked attempts every 10 ms, {through} got through; allowed stream exit {stream_rc}"
    );
    assert!(attempts > 500, "the retry loop ran ({attempts} attempts)");
    assert_eq!(
        through, 0,
        "blocked connections got through across the kill"
    );
    assert_eq!(stream_rc, 0, "the allowed long-lived stream was reset");
    let counted = blocked_in_status(&ns.name, attempts).await;
    println!("agent kill -9: status counts {counted} blocked connects; the client made {attempts}");
    assert_eq!(counted, attempts, "blocked attempts lost or counted twice");
    // Named too, across the kill: web to db on 5432, every attempt.
    let top = Api::<FlowPolicy>::namespaced(client().await.unwrap(), &ns.name)
        .get("web-no-db")
        .await
        .unwrap()
        .status
        .unwrap()
        .top_blocked;
    println!("agent kill -9: topBlocked {top:?}");
    assert_eq!(top.len(), 1, "{top:?}");
    let t = &top[0];
    assert_eq!(
        (t.verdict.as_str(), t.port, t.protocol.as_str()),
        ("Blocked", 5432, "TCP")
    );
    assert!(
        t.source == format!("{}/{web}", ns.name)
            && t.destination.starts_with(&format!("{}/db", ns.name)),
        "{t:?}"
    );
    assert_eq!(t.attempts, attempts, "named attempts lost or counted twice");
}

fn lease_holder() -> String {
    kubectl(&[
        "-n",
        "flowlens-system",
        "get",
        "lease",
        "flowlens-operator",
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ])
    .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_operator_takes_over_and_no_window_is_lost_or_doubled() {
    require_cluster();
    let client = client().await.unwrap();
    // A leader that runs: the lease holder (`<pod>_<process start>`) is the
    // pod with the leader label.
    let (holder, leader) = wait_until(
        Duration::from_secs(60),
        Duration::from_millis(500),
        "a leader",
        || {
            let labelled = kubectl(&[
                "-n",
                "flowlens-system",
                "get",
                "pod",
                "-l",
                "flowlens.dev/collector=leader",
                "-o",
                "jsonpath={.items[*].metadata.name}",
            ])
            .ok()?;
            let holder = lease_holder();
            let pod = holder.rsplit_once('_')?.0.to_owned();
            (labelled.trim() == pod).then_some((holder, pod))
        },
    );
    let ns = TestNamespace::new("fl-lead", &[]).unwrap();
    let (_, server_ip) = ns.deploy("server", "exec iperf3 -s").unwrap();
    let (client_pod, _) = ns.deploy("client", "exec sleep infinity").unwrap();
    let obs = Observed::start(&client, &ns).await;
    let before_total = obs.total().await;
    let before = ns.eth0(&client_pod).unwrap();
    let (ns_name, pod, ip) = (ns.name.clone(), client_pod.clone(), server_ip.clone());
    let traffic = std::thread::spawn(move || {
        exec(
            &ns_name,
            &pod,
            &["iperf3", "-c", &ip, "-t", "20", "-b", "50M"],
        )
    });
    std::thread::sleep(Duration::from_secs(5));
    // Kill the leader's container (as a crash would), not its pod object.
    let cid = kubectl(&[
        "-n",
        "flowlens-system",
        "get",
        "pod",
        &leader,
        "-o",
        "jsonpath={.status.containerStatuses[0].containerID}",
    ])
    .unwrap();
    let cid = cid.trim_start_matches("containerd://");
    let killed = Instant::now();
    let out = std::process::Command::new("ctr")
        .args([
            "--address",
            "/run/flowlens-cluster/containerd.sock",
            "-n",
            "k8s.io",
            "tasks",
            "kill",
            "-s",
            "SIGKILL",
            cid,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "killing the leader: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let new_leader = wait_until(
        Duration::from_secs(30),
        Duration::from_millis(200),
        "a new leader",
        || {
            let h = lease_holder();
            (!h.is_empty() && h != holder).then_some(h)
        },
    );
    let takeover = killed.elapsed();
    println!("leader {leader} killed; {new_leader} took over after {takeover:?}");
    assert!(
        takeover < Duration::from_secs(15),
        "takeover took {takeover:?}"
    );
    traffic.join().unwrap().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let after = ns.eth0(&client_pod).unwrap();
    let total = obs.total_after_now().await;
    let d = after.since(&before);
    let counted = total.payload_bytes - before_total.payload_bytes;
    let wire = wire_payload(&d);
    println!(
        "across the handover: status {counted} payload bytes vs interface {wire} ({:+.4}%)",
        pct(counted, wire)
    );
    assert!(
        pct(counted, wire).abs() < 0.5,
        "status {counted} vs interface {wire}"
    );
}

fn flowlens_programs() -> usize {
    let out = std::process::Command::new("bpftool")
        .args(["prog", "show"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(" name fl_"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uninstall_keeps_enforcing_until_the_cleanup_removes_every_program() {
    require_cluster();
    let before = flowlens_programs();
    assert!(before > 0, "Flowlens programs are loaded");
    kubectl(&[
        "delete",
        "-k",
        "deploy/overlays/local",
        "--wait=true",
        "--timeout=120s",
    ])
    .unwrap();
    let left = flowlens_programs();
    println!("{before} programs before the uninstall, {left} after deleting Flowlens' workloads");
    assert!(
        left > 0,
        "deleting the DaemonSet must not be what removes enforcement"
    );
    kubectl(&["apply", "-k", "deploy/overlays/local/uninstall"]).unwrap();
    rollout_status("flowlens-uninstall", "ds/flowlens-cleanup").unwrap();
    wait_until(
        Duration::from_secs(30),
        Duration::from_millis(200),
        "programs removed",
        || (flowlens_programs() == 0).then_some(()),
    );
    kubectl(&[
        "delete",
        "-k",
        "deploy/overlays/local/uninstall",
        "--wait=true",
        "--timeout=120s",
    ])
    .unwrap();
    // Put Flowlens back for the other tests.
    kubectl(&["apply", "-k", "deploy/overlays/local"]).unwrap();
    rollout_status("flowlens-system", "ds/flowlens-agent").unwrap();
    rollout_status("flowlens-system", "deploy/flowlens-operator").unwrap();
}

/// `{"spec": ...}` of this node's NodeAgentConfig lists `address:port` as a
/// Service frontend with backends, and the agent applied that revision.
fn agent_translates(address: &str, port: u16) -> bool {
    let Ok(out) = kubectl(&["get", "nodeagentconfigs", "-o", "json"]) else {
        return false;
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&out) else {
        return false;
    };
    v["items"].as_array().into_iter().flatten().any(|nac| {
        let listed = nac["spec"]["services"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|f| {
                f["address"] == address
                    && f["port"] == port
                    && f["backends"].as_array().is_some_and(|b| !b.is_empty())
            });
        listed && nac["status"]["appliedRevision"] == nac["spec"]["revision"]
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_services_blocked_connections_are_refused_and_traffic_counts_once() {
    require_cluster();
    let client = client().await.unwrap();
    let ns = TestNamespace::new("fl-svc", &[]).unwrap();
    let (db, _) = ns
        .deploy_with_ports(
            "db",
            "nc -lk -p 5432 & exec iperf3 -s",
            &[("pg", 5432), ("iperf", 5201)],
        )
        .unwrap();
    let (web, _) = ns.deploy("web", "exec sleep infinity").unwrap();
    // db: 5432 as is, and 80 -> the named port `iperf` (5201); db-np: a
    // NodePort to the named port `pg`.
    flowlens_e2e::kubectl::apply(&format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: db, namespace: {ns}}}
spec:
  selector: {{app: db}}
  ports:
  - {{name: pg, port: 5432, targetPort: 5432}}
  - {{name: http, port: 80, targetPort: iperf}}
---
apiVersion: v1
kind: Service
metadata: {{name: db-np, namespace: {ns}}}
spec:
  type: NodePort
  selector: {{app: db}}
  ports:
  - {{name: pg, port: 15432, targetPort: pg}}
---
apiVersion: flowlens.dev/v1alpha1
kind: FlowPolicy
metadata: {{name: web-no-db, namespace: {ns}}}
spec:
  mode: Enforce
  podSelector: {{matchLabels: {{app: web}}}}
  egress:
  - to: [{{podSelector: {{matchLabels: {{app: db}}}}}}]
    ports: [{{protocol: TCP, port: 5432}}]
"#,
        ns = ns.name
    ))
    .unwrap();
    let get = |what: &str, path: &str| {
        kubectl(&[
            "-n",
            &ns.name,
            "get",
            what,
            "-o",
            &format!("jsonpath={path}"),
        ])
        .unwrap()
    };
    let cluster_ip = get("service/db", "{.spec.clusterIP}");
    let node_port: u16 = get("service/db-np", "{.spec.ports[0].nodePort}")
        .parse()
        .unwrap();
    let node_ip = kubectl(&[
        "get",
        "nodes",
        "-o",
        "jsonpath={.items[0].status.addresses[?(@.type==\"InternalIP\")].address}",
    ])
    .unwrap();
    let obs = Observed::start(&client, &ns).await;
    wait_until(
        Duration::from_secs(60),
        Duration::from_millis(500),
        "the agent translates the Services",
        || {
            (agent_translates(&cluster_ip, 5432)
                && agent_translates(&cluster_ip, 80)
                && agent_translates(&node_ip, node_port))
            .then_some(())
        },
    );

    // Blocked through the ClusterIP and the NodePort: refused by connect()
    // itself (nc fails at once instead of waiting for its 2 s timeout).
    let attempts = 20;
    let script = format!(
        "t0=$(date +%s%N); ok=0; for i in $(seq 1 {attempts}); do \
           nc -z -w 2 {cluster_ip} 5432 && ok=$((ok+1)); nc -z -w 2 {node_ip} {node_port} && ok=$((ok+1)); \
         done; ms=$(( ($(date +%s%N) - t0) / 1000000 )); \
         allowed=0; nc -z -w 2 {cluster_ip} 80 && allowed=1; echo $ok $allowed $ms"
    );
    let out = exec(&ns.name, &web, &["bash", "-c", &script]).unwrap();
    let v: Vec<u64> = out.split_whitespace().map(|s| s.parse().unwrap()).collect();
    println!(
        "through Services: {} of {} blocked connections got through, in {} ms; allowed port: {}",
        v[0],
        2 * attempts,
        v[2],
        v[1]
    );
    assert_eq!(v[0], 0, "blocked connections that got through a Service");
    assert_eq!(v[1], 1, "the Service's allowed port (80 -> iperf) works");
    assert!(
        v[2] < 2 * attempts * 500,
        "{} ms for {} refusals: not refused at connect()",
        v[2],
        2 * attempts
    );
    let policies = Api::<FlowPolicy>::namespaced(client.clone(), &ns.name);
    let blocked = eventually(Duration::from_secs(60), "refusals in status", || {
        let p = policies.clone();
        async move {
            let b = p.get("web-no-db").await.ok()?.status?.blocked?;
            (b.connections >= 2 * attempts).then_some(b)
        }
    })
    .await;
    assert_eq!(
        blocked.connections,
        2 * attempts,
        "each refusal counted once"
    );

    // Bytes through the Service: once, as the web -> db pod flow.
    let total_before = obs.total().await;
    let before = ns.eth0(&web).unwrap();
    exec(
        &ns.name,
        &web,
        &[
            "iperf3",
            "-c",
            &cluster_ip,
            "-p",
            "80",
            "-t",
            "4",
            "-b",
            "200M",
            "--connect-timeout",
            "3000",
        ],
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let after = ns.eth0(&web).unwrap();
    let total = obs.total_after_now().await;
    let d = after.since(&before);
    let counted = total.payload_bytes - total_before.payload_bytes;
    let wire = wire_payload(&d);
    println!(
        "through the Service: web eth0 {wire} payload bytes; status {counted} ({:+.4}%)",
        pct(counted, wire)
    );
    assert!(
        pct(counted, wire).abs() < 0.5,
        "status {counted} vs interface {wire}: {:+.3}% (2x would be double counting)",
        pct(counted, wire)
    );
    let (ns_name, pod, ip) = (ns.name.clone(), web.clone(), cluster_ip.clone());
    let second = std::thread::spawn(move || {
        exec(
            &ns_name,
            &pod,
            &["iperf3", "-c", &ip, "-p", "80", "-t", "12", "-b", "10M"],
        )
    });
    let service = format!("{}/db", ns.name);
    let top = obs
        .wait("a top flow through the Service", |s| {
            s.top_flows
                .into_iter()
                .find(|f| f.service.as_deref() == Some(service.as_str()))
        })
        .await;
    second.join().unwrap().unwrap();
    println!("top flow: {top:?}");
    assert_eq!(top.port, 5201, "the backend's port, not the Service's");
    assert_eq!(top.destination.pod.as_deref(), Some(db.as_str()));
    assert_eq!(top.source.pod.as_deref(), Some(web.as_str()));

    // The node itself (its API server port here) is named as the node, not
    // as an external address.
    let node_name = kubectl(&["get", "nodes", "-o", "jsonpath={.items[0].metadata.name}"]).unwrap();
    let (ns_name, pod, ip) = (ns.name.clone(), web.clone(), node_ip.clone());
    let pinger = std::thread::spawn(move || {
        exec(
            &ns_name,
            &pod,
            &[
                "bash",
                "-c",
                &format!("for i in $(seq 1 30); do nc -z -w 1 {ip} 26443; sleep 0.5; done; true"),
            ],
        )
    });
    let to_node = obs
        .wait("a top flow to the node", |s| {
            s.top_flows.into_iter().find(|f| f.port == 26443)
        })
        .await;
    pinger.join().unwrap().unwrap();
    println!("top flow to the node: {to_node:?}");
    assert_eq!(
        to_node.destination.node.as_deref(),
        Some(node_name.as_str())
    );
    assert!(to_node.destination.host_network, "{to_node:?}");
    assert!(!to_node.destination.external, "{to_node:?}");

    // The cluster's DNS (dnsmasq, fed from the Services): the pod's lookups
    // of the Service's name are in status, answered NOERROR and timed.
    let fqdn = format!("db.{}.svc.cluster.local", ns.name);
    let (ns_name, pod, name) = (ns.name.clone(), web.clone(), fqdn.clone());
    let resolver = std::thread::spawn(move || {
        exec(
            &ns_name,
            &pod,
            &[
                "bash",
                "-c",
                &format!(
                    "for i in $(seq 1 20); do getent hosts {name}. || exit 1; sleep 0.5; done"
                ),
            ],
        )
    });
    let dns = obs
        .wait("the pod's DNS in status", |s| {
            s.dns.filter(|d| {
                d.responses.get("NOERROR").copied().unwrap_or(0) >= 1
                    && d.top_names.iter().any(|n| n.name == fqdn)
            })
        })
        .await;
    let answered = resolver.join().unwrap();
    println!("cluster DNS in status: {dns:?}");
    assert!(answered.is_ok(), "getent: {answered:?}");
    let latency = dns.latency.expect("answered queries are timed");
    assert!(
        latency.samples >= 1 && latency.p50_micros > 0,
        "{latency:?}"
    );
}

/// In the pod: the time (unix ms, the node's clock) just before `nc -z` to
/// `to`, then nc's exit code.
fn connect_at(ns: &str, pod: &str, to: &str, port: u16) -> (i64, i32) {
    let out = exec(
        ns,
        pod,
        &[
            "bash",
            "-c",
            &format!("date +%s%3N; nc -z -w 1 {to} {port}; echo $?"),
        ],
    )
    .unwrap();
    let v: Vec<&str> = out.split_whitespace().collect();
    (v[0].parse().unwrap(), v[1].parse().unwrap())
}

/// `kubectl flowlens observe` through the installed cluster's API server
/// (APIService v1alpha1.live.flowlens.dev, served by the operator): refused
/// to a user without a role; with `view` in the namespace, `--follow`
/// shows a new connection, and a blocked attempt with its policy, within
/// 2 s of the connect (timed with the pod's clock, the node's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observe_follows_a_new_connection_and_a_blocked_attempt_within_two_seconds() {
    use flowlens_api::live::LiveVerdict;
    use flowlens_e2e::{
        kubectl::kubectl_flowlens,
        live::{Observer, unix_ms},
    };
    require_cluster();
    let client = client().await.unwrap();
    let (ns, web, db_ip) = blocked_web_and_db("fl-live").await;
    let _obs = Observed::start(&client, &ns).await;
    wait_until(
        Duration::from_secs(60),
        Duration::from_millis(500),
        "the live API available",
        || {
            kubectl(&[
                "get",
                "apiservice",
                "v1alpha1.live.flowlens.dev",
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Available\")].status}",
            ])
            .ok()
            .filter(|s| s == "True")
        },
    );
    let kubeconfig = std::env::temp_dir().join(format!("{}-live.kubeconfig", ns.name));
    flowlens_e2e::cluster::service_account_kubeconfig(&client, &ns.name, "viewer", &kubeconfig)
        .await
        .unwrap();
    let (ok, _, err) = kubectl_flowlens(&kubeconfig, &["observe", "-n", &ns.name]);
    println!("without a role: {err}");
    assert!(!ok, "a user without a role read live flows");
    assert!(
        err.contains("refused to list flows.live.flowlens.dev"),
        "{err}"
    );
    flowlens_e2e::kubectl::apply(&format!(
        r#"apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: viewer, namespace: {ns}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: view}}
subjects: [{{kind: ServiceAccount, name: viewer, namespace: {ns}}}]
"#,
        ns = ns.name
    ))
    .unwrap();
    wait_until(
        Duration::from_secs(30),
        Duration::from_millis(500),
        "observe allowed through view",
        || {
            kubectl_flowlens(&kubeconfig, &["observe", "-n", &ns.name, "--since", "1s"])
                .0
                .then_some(())
        },
    );
    let observer = Observer::start(&kubeconfig, &["observe", "-n", &ns.name, "--follow"]).unwrap();
    // Arrival times on the same clock as the pod's.
    let (base, base_ms) = (Instant::now(), unix_ms());
    let arrival_ms = |at: Instant| base_ms + (at - base).as_millis() as i64;
    std::thread::sleep(Duration::from_secs(3));

    let (connected_ms, code) = connect_at(&ns.name, &web, &db_ip, 5201);
    assert_eq!(code, 0, "the allowed port");
    let (at, r) = observer
        .wait_for(base, Duration::from_secs(10), |r| {
            r.pod == web
                && r.port == 5201
                && r.verdict == LiveVerdict::Forwarded
                && r.connections >= 1
        })
        .unwrap();
    let shown = arrival_ms(at) - connected_ms;
    println!("real cluster: new connection shown {shown} ms after the connect: {r:?}");
    assert!(
        r.peer_name
            .as_deref()
            .is_some_and(|p| p.starts_with(&format!("{}/db-", ns.name))),
        "{r:?}"
    );
    assert!(shown < 2000, "shown {shown} ms after the connect");

    let (refused_ms, code) = connect_at(&ns.name, &web, &db_ip, 5432);
    assert_ne!(code, 0, "the blocked port");
    let (at, r) = observer
        .wait_for(base, Duration::from_secs(10), |r| {
            r.verdict == LiveVerdict::Blocked
        })
        .unwrap();
    let shown = arrival_ms(at) - refused_ms;
    println!("real cluster: blocked attempt shown {shown} ms after the connect: {r:?}");
    assert_eq!(
        r.policy.as_deref(),
        Some(format!("{}/web-no-db", ns.name).as_str())
    );
    assert_eq!((r.pod.as_str(), r.port), (web.as_str(), 5432));
    assert!(shown < 2000, "shown {shown} ms after the connect");
    drop(observer);
    let _ = std::fs::remove_file(&kubeconfig);
}
