use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use flowlens_api::NodeAgentConfig;
use flowlens_e2e::{
    cluster::{client, unique_name},
    objects::TestObjects,
    operator::Operator,
};
use futures::{StreamExt, TryStreamExt};
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, watcher},
};
use serde_json::json;

use flowlens_e2e::{resources::process_status_kb, stats::percentile};

#[derive(Default)]
struct Pending {
    /// IP -> (node, sent at).
    ips: HashMap<String, (String, Instant)>,
    ip_latency: Vec<f64>,
    /// Policy -> (nodes still to carry it, sent at).
    policies: HashMap<String, (BTreeSet<String>, Instant)>,
    policy_latency: Vec<f64>,
}

fn observe(p: &mut Pending, nac: &NodeAgentConfig, now: Instant) {
    let node = &nac.spec.node_name;
    for e in &nac.spec.endpoints {
        for ip in &e.ips {
            if p.ips.get(ip).is_some_and(|(n, _)| n == node) {
                let (_, t) = p.ips.remove(ip).unwrap();
                p.ip_latency.push((now - t).as_secs_f64() * 1000.0);
            }
        }
    }
    let carried: BTreeSet<&str> = nac
        .spec
        .rules
        .iter()
        .map(|r| r.policy.name.as_str())
        .collect();
    let mut done = Vec::new();
    for (name, (waiting, t)) in p.policies.iter_mut() {
        if carried.contains(name.as_str()) && waiting.remove(node) && waiting.is_empty() {
            done.push((name.clone(), *t));
        }
    }
    for (name, t) in done {
        p.policies.remove(&name);
        p.policy_latency.push((now - t).as_secs_f64() * 1000.0);
    }
}

async fn wait_drained(p: &Arc<Mutex<Pending>>, what: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let left = {
            let p = p.lock().unwrap();
            if what == "ips" {
                p.ips.len()
            } else {
                p.policies.len()
            }
        };
        if left == 0 {
            return;
        }
        if Instant::now() > deadline {
            panic!("{left} {what} never reached their NodeAgentConfig within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Pods created at once.
const CREATE_CONCURRENCY: usize = 16;

/// Zones the nodes are spread over.
const ZONES: usize = 3;

/// Time the operator gets to write every node's config once.
const SETTLE: Duration = Duration::from_secs(2);

/// How long the pod IPs (or policies) of a phase get to reach their
/// NodeAgentConfigs.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

/// A pod: (name, node, value of its `app` label).
type PodSpec = (String, String, String);

/// What one run measured; latencies in milliseconds, sorted.
struct Results {
    nodes: usize,
    pods: usize,
    policies: usize,
    rate: u64,
    ip: Vec<f64>,
    /// Policies applied one per second.
    single: Vec<f64>,
    /// Policies applied at once.
    burst: Vec<f64>,
    writes: f64,
    rss_kb: u64,
}

/// The benchmark's objects, and what is waiting to reach a config.
struct Bench {
    c: Client,
    run: String,
    ns: String,
    specs: Vec<PodSpec>,
    pending: Arc<Mutex<Pending>>,
}

pub async fn run(nodes: usize, pods: usize, policies: usize, rate: u64) {
    let c = client().await.expect("the local control plane (just up)");
    let run = unique_name("bench");
    let t = TestObjects::new(c.clone(), &run);
    t.sweep_earlier_runs().await;
    let ns = format!("{run}-ns");
    let specs = create_cluster(&t, &run, &ns, nodes, pods, policies).await;

    let op = Operator::start(&run, &[]);
    let bench = Bench {
        c,
        run,
        ns,
        specs,
        pending: Arc::new(Mutex::new(Pending::default())),
    };
    let watch = bench.spawn_config_watch();
    // Let the operator settle (every node's config written once).
    tokio::time::sleep(SETTLE).await;
    let writes_before = op.writes();

    bench.set_pod_ips(rate).await;
    wait_drained(&bench.pending, "ips", DRAIN_TIMEOUT).await;
    let single = bench.apply_policies(policies).await;
    let writes = op.writes() - writes_before;
    watch.abort();

    let (mut ip, mut burst, mut single) = {
        let p = bench.pending.lock().unwrap();
        (p.ip_latency.clone(), p.policy_latency.clone(), single)
    };
    ip.sort_by(|a, b| a.partial_cmp(b).unwrap());
    single.sort_by(|a, b| a.partial_cmp(b).unwrap());
    burst.sort_by(|a, b| a.partial_cmp(b).unwrap());
    print_results(&Results {
        nodes,
        pods,
        policies,
        rate,
        ip,
        single,
        burst,
        writes,
        rss_kb: process_status_kb(op.proc.pid(), "VmHWM"),
    });
    drop(op);
    t.cleanup().await;
}

/// Creates the nodes, the namespace, an observation of it and the pods
/// (without IPs; `policies + 1` apps spread over the nodes).
async fn create_cluster(
    t: &TestObjects,
    run: &str,
    ns: &str,
    nodes: usize,
    pods: usize,
    policies: usize,
) -> Vec<PodSpec> {
    let node_names: Vec<String> = (0..nodes).map(|i| format!("{run}-n{i}")).collect();
    for (i, n) in node_names.iter().enumerate() {
        t.node(n, &format!("zone-{}", i % ZONES)).await.unwrap();
    }
    t.namespace(ns, &[]).await.unwrap();
    t.observation(run, json!({"namespaces": [ns], "window": "30s"}))
        .await
        .unwrap();
    let groups = policies.max(1) + 1;
    let started = Instant::now();
    let specs: Vec<PodSpec> = (0..pods)
        .map(|i| {
            (
                format!("p{i}"),
                node_names[i % nodes].clone(),
                format!("app-{}", i % groups),
            )
        })
        .collect();
    futures::stream::iter(specs.iter().map(|(name, node, app)| async move {
        t.pod(ns, name, node, &[], &[("app", app)], Some(app))
            .await
            .unwrap();
    }))
    .buffer_unordered(CREATE_CONCURRENCY)
    .collect::<Vec<_>>()
    .await;
    eprintln!(
        "created {nodes} nodes and {pods} pods without IPs in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    specs
}

impl Bench {
    /// Watches NodeAgentConfigs, resolving what they carry in `pending`.
    fn spawn_config_watch(&self) -> tokio::task::JoinHandle<()> {
        let pending = self.pending.clone();
        let api = Api::<NodeAgentConfig>::all(self.c.clone());
        tokio::spawn(async move {
            let mut s = watcher(api, watcher::Config::default())
                .applied_objects()
                .boxed();
            while let Ok(Some(nac)) = s.try_next().await {
                observe(&mut pending.lock().unwrap(), &nac, Instant::now());
            }
        })
    }

    /// Gives the pods their IPs, at `rate` per second.
    async fn set_pod_ips(&self, rate: u64) {
        let interval = Duration::from_micros(1_000_000 / rate.max(1));
        let mut tick = tokio::time::interval(interval);
        let mut sends = Vec::new();
        for (i, (name, node, _)) in self.specs.iter().enumerate() {
            tick.tick().await;
            let ip = format!("10.{}.{}.{}", 200 + i / 65536, (i / 256) % 256, i % 256);
            self.pending
                .lock()
                .unwrap()
                .ips
                .insert(ip.clone(), (node.clone(), Instant::now()));
            let t = TestObjects::new(self.c.clone(), &self.run);
            let (ns, name) = (self.ns.clone(), name.clone());
            sends.push(tokio::spawn(async move {
                t.set_pod_ips(&ns, &name, &[&ip]).await.unwrap()
            }));
        }
        for s in sends {
            s.await.unwrap();
        }
    }

    /// Policies: pods of app-k may not reach app-(k+1). The first half
    /// one per second (each alone, as applied by hand or a GitOps sync
    /// of one change), the second half all at once (a sync of many
    /// changes). Returns the latencies of the first half; those of the
    /// second stay in `pending`.
    async fn apply_policies(&self, policies: usize) -> Vec<f64> {
        let half = policies / 2;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        for k in 0..half {
            tick.tick().await;
            self.apply_policy(k).await;
        }
        wait_drained(&self.pending, "policies", DRAIN_TIMEOUT).await;
        let single: Vec<f64> = std::mem::take(&mut self.pending.lock().unwrap().policy_latency);
        futures::future::join_all((half..policies).map(|k| self.apply_policy(k))).await;
        wait_drained(&self.pending, "policies", DRAIN_TIMEOUT).await;
        single
    }

    /// Marks policy `k` pending (from now), and returns the future that
    /// applies it.
    fn apply_policy(&self, k: usize) -> impl Future<Output = ()> + use<> {
        let app = format!("app-{k}");
        let targeted: BTreeSet<String> = self
            .specs
            .iter()
            .filter(|(_, _, a)| *a == app)
            .map(|(_, n, _)| n.clone())
            .collect();
        let name = format!("deny-{k}");
        self.pending
            .lock()
            .unwrap()
            .policies
            .insert(name.clone(), (targeted, Instant::now()));
        let t = TestObjects::new(self.c.clone(), &self.run);
        let ns = self.ns.clone();
        async move {
            t.policy(
                &ns,
                &name,
                json!({"podSelector": {"matchLabels": {"app": app}},
                       "egress": [{"to": [{"podSelector": {"matchLabels": {"app": format!("app-{}", k + 1)}}}],
                                   "ports": [{"port": 5432}]}]}),
            )
            .await
            .unwrap();
        }
    }
}

fn print_results(r: &Results) {
    let Results {
        nodes,
        pods,
        policies,
        rate,
        writes,
        rss_kb: rss,
        ..
    } = r;
    let (ipl, pl, burst) = (&r.ip, &r.single, &r.burst);
    println!(
        "| propagation ({nodes} nodes, {pods} pods, {policies} policies) | p50 | p99 | max | goal |"
    );
    println!("|---|---|---|---|---|");
    println!(
        "| pod IP set -> its node's NodeAgentConfig written ({} pods at {rate}/s) | {:.0} ms | {:.0} ms | {:.0} ms | p99 < 500 ms |",
        ipl.len(),
        percentile(ipl, 0.5),
        percentile(ipl, 0.99),
        percentile(ipl, 1.0)
    );
    println!(
        "| FlowPolicy applied -> every affected NodeAgentConfig written ({} policies, one per second) | {:.0} ms | {:.0} ms | {:.0} ms | p99 < 500 ms |",
        pl.len(),
        percentile(pl, 0.5),
        percentile(pl, 0.99),
        percentile(pl, 1.0)
    );
    println!(
        "| the same, {} policies applied at once | {:.0} ms | {:.0} ms | {:.0} ms | - |",
        burst.len(),
        percentile(burst, 0.5),
        percentile(burst, 0.99),
        percentile(burst, 1.0)
    );
    println!(
        "operator: {writes} API writes for {pods} IPs and {policies} policies; peak RSS {} MB",
        rss / 1024
    );
    println!(
        "{{\"bench\":\"propagation\",\"nodes\":{nodes},\"pods\":{pods},\"policies\":{policies},\"ip_p50_ms\":{:.1},\"ip_p99_ms\":{:.1},\"policy_p50_ms\":{:.1},\"policy_p99_ms\":{:.1},\"burst_p99_ms\":{:.1},\"operator_writes\":{writes},\"operator_peak_rss_kb\":{rss}}}",
        percentile(ipl, 0.5),
        percentile(ipl, 0.99),
        percentile(pl, 0.5),
        percentile(pl, 0.99),
        percentile(burst, 0.99)
    );
}
