//! `flowlens-bench scale`: what the operator writes to the API server, and
//! how fast it gets there, as the cluster grows.
//!
//! Against the local API server and a real `flowlens-operator`: `--nodes`
//! nodes, `--pods` running pods with their IPs (both families with
//! `--dual-stack`) spread over team namespaces of 5,000 pods, one
//! observation of every team and `--policies` FlowPolicies, all created
//! before the operator starts. Two shapes:
//! - `namespace-wide`: policy k keeps pods of one app from the pods of the
//!   next team namespace (a `namespaceSelector` on a team label): each
//!   policy's peers are a whole team;
//! - `app-scoped`: policy k keeps app k from app k+1 of its own namespace.
//!
//! Then, one at a time, each settled before the next: `--ip-changes` pods get
//! a new IP, one more policy is applied, one team namespace is relabelled
//! out of the policies' selectors. Watches on every NodeAgentConfig and
//! every AddressSetSlice see each write (what the agents' watches would
//! get); an event's bytes are the sizes of the objects written for it, its
//! propagation the time from the change to the last of them. Settled means
//! nothing written for [`QUIET`].
//!
//! The watch also acknowledges each new revision as its node's agent
//! would (status: applied revision, policies in force), so policies roll
//! out and their status is written. Operator writes are counted from its
//! `flowlens_operator_api_writes_total`: at rest over `--idle-seconds`, and the
//! FlowPolicy status writes of the policy applied.
//!
//! One cluster-wide watch stands in for the agents' per-node watches; the
//! API server's fan-out to 1,000 watchers is not measured.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use flowlens_api::{AddressSetSlice, NodeAgentConfig};
use flowlens_e2e::{
    cluster::{client, unique_name},
    objects::TestObjects,
    operator::Operator,
    resources::{process_cpu_ns, process_status_kb},
    stats::percentile,
};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
    runtime::{WatchStreamExt, watcher},
};
use serde_json::json;

/// Pods per team namespace.
const TEAM_PODS: usize = 5000;

/// Pods created at once.
const CREATE_CONCURRENCY: usize = 16;

/// No config written for this long: the change has reached every config.
const QUIET: Duration = Duration::from_secs(3);

/// What the operator writes, by its `resource` label.
const WRITTEN: [&str; 5] = [
    "nodeagentconfigs",
    "addresssetslices",
    "flowpolicies/status",
    "networkobservations/status",
    "events",
];

/// Agent acknowledgements written at once.
const ACK_CONCURRENCY: usize = 32;

/// How long one change may take to settle.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    NamespaceWide,
    AppScoped,
}

impl std::str::FromStr for Shape {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "namespace-wide" => Ok(Shape::NamespaceWide),
            "app-scoped" => Ok(Shape::AppScoped),
            _ => Err(format!("{s}: namespace-wide or app-scoped")),
        }
    }
}

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Shape::NamespaceWide => "namespace-wide",
            Shape::AppScoped => "app-scoped",
        }
    }
}

pub struct Args {
    pub nodes: usize,
    pub pods: usize,
    pub policies: usize,
    pub shape: Shape,
    pub dual_stack: bool,
    pub ip_changes: usize,
    /// How long the operator's writes at rest are counted.
    pub idle: Duration,
    pub json: bool,
}

/// What the watches saw written.
#[derive(Default)]
struct Writes {
    seen: Vec<Write>,
    max_bytes: usize,
    /// Node -> the last revision seen (a status write repeats it).
    revisions: std::collections::HashMap<String, String>,
}

/// One object written, as a watch saw it.
struct Write {
    at: Instant,
    /// The object's size (0 for a delete).
    bytes: usize,
    slice: bool,
}

/// What one change cost.
#[derive(Clone, Copy, Debug, Default)]
struct Cost {
    configs: usize,
    /// AddressSetSlices written or deleted.
    slices: usize,
    bytes: usize,
    propagation_ms: f64,
}

struct Bench {
    client: Client,
    objects: TestObjects,
    run: String,
    teams: Vec<String>,
    apps: usize,
    args: Args,
    writes: Arc<Mutex<Writes>>,
}

pub async fn run(args: Args) {
    let client = client().await.expect("the local control plane (just up)");
    let run = unique_name("scale");
    let objects = TestObjects::new(client.clone(), &run);
    objects.sweep_earlier_runs().await;
    let teams = (0..args.pods.div_ceil(TEAM_PODS).max(2))
        .map(|k| format!("{run}-team-{k}"))
        .collect();
    let bench = Bench {
        client,
        objects,
        run,
        teams,
        apps: args.policies + 2,
        args,
        writes: Arc::default(),
    };
    let started = Instant::now();
    bench.create_cluster().await;
    eprintln!(
        "created {} nodes, {} pods and {} policies in {:.0} s",
        bench.args.nodes,
        bench.args.pods,
        bench.args.policies,
        started.elapsed().as_secs_f64()
    );

    let op = Operator::start(&bench.run, &[]);
    let watch = bench.spawn_config_watch();
    let slice_watch = bench.spawn_slice_watch();
    let started = Instant::now();
    let settled = bench
        .settle(bench.args.nodes, Instant::now() + SETTLE_TIMEOUT)
        .await;
    let initial = bench.take_writes();
    let full_compile_s = op.metric_sum("flowlens_operator_compile_duration_seconds_sum", "");
    let compiles_before = op.metric_sum("flowlens_operator_compile_duration_seconds_count", "");
    eprintln!(
        "operator wrote {} configs ({:.1} MB) and settled in {:.1} s",
        initial.configs,
        initial.bytes as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );

    // At rest: what the operator writes with nothing changing.
    let by_resource = |op: &Operator| -> Vec<f64> {
        WRITTEN
            .iter()
            .map(|r| {
                op.metric_sum(
                    "flowlens_operator_api_writes_total",
                    &format!("resource=\"{r}\""),
                )
            })
            .collect()
    };
    // The policies' first rollout can go on after the last config write
    // (their status follows the acknowledgements): at rest is after it.
    wait_until_writes_stop(&op).await;
    let rollout_status_writes = op.metric_sum(
        "flowlens_operator_api_writes_total",
        "resource=\"flowpolicies/status\"",
    );
    let writes_at_rest = op.writes();
    let before = by_resource(&op);
    tokio::time::sleep(bench.args.idle).await;
    let per_minute = 60.0 / bench.args.idle.as_secs_f64().max(1.0);
    let writes_per_minute_at_rest = (op.writes() - writes_at_rest) * per_minute;
    let at_rest_by_resource: serde_json::Map<String, serde_json::Value> = WRITTEN
        .iter()
        .zip(by_resource(&op).iter().zip(&before))
        .map(|(r, (after, before))| (r.to_string(), json!((after - before) * per_minute)))
        .collect();

    let mut ip = Vec::new();
    for j in 0..bench.args.ip_changes {
        let pod = j * bench.args.pods / bench.args.ip_changes.max(1);
        let c = bench.change_pod_ip(pod, j).await;
        eprintln!(
            "pod p{pod} new IP: {} configs, {} slices, {:.1} KiB, {:.0} ms",
            c.configs,
            c.slices,
            c.bytes as f64 / 1024.0,
            c.propagation_ms
        );
        ip.push(c);
    }
    let policy_status = |op: &Operator| {
        op.metric_sum(
            "flowlens_operator_api_writes_total",
            "resource=\"flowpolicies/status\"",
        )
    };
    let before = policy_status(&op);
    let policy = bench.apply_policy(bench.args.policies).await;
    // Its status follows the acknowledgements (the policy is the only one
    // changing now).
    tokio::time::sleep(QUIET).await;
    let policy_status_writes = policy_status(&op) - before;
    let label = bench.relabel_team().await;
    let incremental_s =
        op.metric_sum("flowlens_operator_compile_duration_seconds_sum", "") - full_compile_s;
    let incremental_n =
        op.metric_sum("flowlens_operator_compile_duration_seconds_count", "") - compiles_before;
    watch.abort();
    slice_watch.abort();

    let mut latencies: Vec<f64> = ip.iter().map(|c| c.propagation_ms).collect();
    latencies.push(policy.propagation_ms);
    latencies.push(label.propagation_ms);
    latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let mean = |v: &[Cost], f: fn(&Cost) -> usize| {
        v.iter().map(f).sum::<usize>() as f64 / v.len().max(1) as f64
    };
    let report = Report {
        max_object_bytes: bench.writes.lock().unwrap().max_bytes,
        initial,
        bytes_per_pod_ip_change: mean(&ip, |c| c.bytes),
        configs_per_pod_ip_change: mean(&ip, |c| c.configs),
        slices_per_pod_ip_change: mean(&ip, |c| c.slices),
        policy,
        label,
        propagation_p50_ms: percentile(&latencies, 0.5),
        propagation_p99_ms: percentile(&latencies, 0.99),
        operator_rss_mb: process_status_kb(op.proc.pid(), "VmHWM") as f64 / 1024.0,
        operator_cpu_s: process_cpu_ns(op.proc.pid()) / 1e9,
        full_compile_ms: full_compile_s * 1000.0,
        incremental_compile_ms: incremental_s * 1000.0 / incremental_n.max(1.0),
        failed_reconciles: op.metric_sum("flowlens_operator_reconcile_errors_total", "") as u64,
        writes_per_minute_at_rest,
        at_rest_by_resource,
        rollout_status_writes,
        policy_status_writes,
        settled,
    };
    report.print(&bench.args);
    drop(op);
    bench.objects.cleanup().await;
}

struct Report {
    max_object_bytes: usize,
    initial: Cost,
    bytes_per_pod_ip_change: f64,
    configs_per_pod_ip_change: f64,
    slices_per_pod_ip_change: f64,
    policy: Cost,
    label: Cost,
    propagation_p50_ms: f64,
    propagation_p99_ms: f64,
    operator_rss_mb: f64,
    operator_cpu_s: f64,
    full_compile_ms: f64,
    incremental_compile_ms: f64,
    failed_reconciles: u64,
    /// Operator writes per minute with nothing changing.
    writes_per_minute_at_rest: f64,
    at_rest_by_resource: serde_json::Map<String, serde_json::Value>,
    /// FlowPolicy status writes from the operator's start to rest, while
    /// every policy rolls out once.
    rollout_status_writes: f64,
    /// FlowPolicy status writes for one policy rolled out.
    policy_status_writes: f64,
    /// The configs were all written at the start.
    settled: bool,
}

impl Report {
    fn print(&self, a: &Args) {
        let kib = |b: f64| b / 1024.0;
        if !a.json {
            println!(
                "| scale: {} nodes, {} pods, {} policies, {}{} | measured | goal |",
                a.nodes,
                a.pods,
                a.policies,
                a.shape.name(),
                if a.dual_stack { ", dual-stack" } else { "" }
            );
            println!("|---|---|---|");
            println!(
                "| largest object written (config or slice) | {:.1} KiB | < 256 KiB |",
                kib(self.max_object_bytes as f64)
            );
            println!(
                "| written for one pod IP change ({} changes) | {:.1} KiB in {:.1} configs, {:.1} slices | < 64 KiB |",
                a.ip_changes,
                kib(self.bytes_per_pod_ip_change),
                self.configs_per_pod_ip_change,
                self.slices_per_pod_ip_change
            );
            println!(
                "| written for one policy applied | {:.1} KiB in {} configs, {} slices | - |",
                kib(self.policy.bytes as f64),
                self.policy.configs,
                self.policy.slices
            );
            println!(
                "| written for one namespace label change | {:.1} KiB in {} configs, {} slices | - |",
                kib(self.label.bytes as f64),
                self.label.configs,
                self.label.slices
            );
            println!(
                "| written at start | {:.1} MiB in {} configs, {} slices | - |",
                kib(kib(self.initial.bytes as f64)),
                self.initial.configs,
                self.initial.slices
            );
            println!(
                "| propagation to every affected config, p50 / p99 | {:.0} / {:.0} ms | p99 < 1 s |",
                self.propagation_p50_ms, self.propagation_p99_ms
            );
            println!(
                "| operator peak RSS, CPU | {:.0} MB, {:.1} s | < 512 MB |",
                self.operator_rss_mb, self.operator_cpu_s
            );
            println!(
                "| compile: full (start) / incremental (mean) | {:.0} / {:.1} ms | full < 1 s |",
                self.full_compile_ms, self.incremental_compile_ms
            );
            println!(
                "| operator writes per minute at rest | {:.0} ({}) | 0 |",
                self.writes_per_minute_at_rest,
                serde_json::Value::Object(self.at_rest_by_resource.clone())
            );
            println!(
                "| FlowPolicy status writes while {} policies roll out at the start | {:.0} | bounded |",
                a.policies, self.rollout_status_writes
            );
            println!(
                "| FlowPolicy status writes for one policy rolled out to {} nodes | {:.0} | bounded |",
                self.policy.configs, self.policy_status_writes
            );
            println!(
                "| failed reconciles; settled at start | {}; {} | 0; true |",
                self.failed_reconciles, self.settled
            );
        }
        println!(
            "{}",
            json!({
                "bench": "scale",
                "nodes": a.nodes,
                "pods": a.pods,
                "policies": a.policies,
                "shape": a.shape.name(),
                "dual_stack": a.dual_stack,
                "max_object_bytes": self.max_object_bytes,
                "bytes_per_pod_ip_change": self.bytes_per_pod_ip_change.round(),
                "configs_per_pod_ip_change": self.configs_per_pod_ip_change,
                "slices_per_pod_ip_change": self.slices_per_pod_ip_change,
                "bytes_per_policy_applied": self.policy.bytes,
                "bytes_per_namespace_label_change": self.label.bytes,
                "initial_bytes": self.initial.bytes,
                "propagation_p50_ms": self.propagation_p50_ms.round(),
                "propagation_p99_ms": self.propagation_p99_ms.round(),
                "operator_rss_mb": self.operator_rss_mb.round(),
                "operator_cpu_s": (self.operator_cpu_s * 10.0).round() / 10.0,
                "full_compile_ms": self.full_compile_ms.round(),
                "incremental_compile_ms": (self.incremental_compile_ms * 10.0).round() / 10.0,
                "failed_reconciles": self.failed_reconciles,
                "writes_per_minute_at_rest": self.writes_per_minute_at_rest,
                "writes_per_minute_at_rest_by_resource": self.at_rest_by_resource,
                "policy_status_writes_per_rollout": self.policy_status_writes,
                "status_writes_in_first_rollout": self.rollout_status_writes,
                "settled": self.settled,
            })
        );
    }
}

/// Waits until the operator wrote nothing for [`QUIET`] (at most
/// [`SETTLE_TIMEOUT`]).
async fn wait_until_writes_stop(op: &Operator) {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    let mut last = op.writes();
    let mut since = Instant::now();
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = op.writes();
        if now != last {
            (last, since) = (now, Instant::now());
        } else if since.elapsed() >= QUIET {
            return;
        }
    }
    eprintln!("the operator was still writing after {SETTLE_TIMEOUT:?}");
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Writes each config's status as its agent would once it applied the
/// revision: every policy of the spec in force.
async fn acknowledge(
    api: Api<NodeAgentConfig>,
    rx: tokio::sync::mpsc::UnboundedReceiver<NodeAgentConfig>,
) {
    tokio_stream::wrappers::UnboundedReceiverStream::new(rx)
        .for_each_concurrent(ACK_CONCURRENCY, |nac| {
            let api = api.clone();
            async move {
                let patch = json!({
                    "apiVersion": "flowlens.dev/v1alpha1",
                    "kind": "NodeAgentConfig",
                    "status": {
                        "appliedRevision": nac.spec.revision,
                        "policies": nac.spec.policies,
                        "conditions": [{
                            "type": "Applied", "status": "True", "reason": "Applied",
                            "message": "simulated agent",
                            "lastTransitionTime": "2026-01-01T00:00:00Z",
                        }],
                    },
                });
                let _ = api
                    .patch_status(
                        &nac.spec.node_name,
                        &PatchParams::apply("flowlens-agent").force(),
                        &Patch::Apply(&patch),
                    )
                    .await;
            }
        })
        .await;
}

impl Bench {
    fn node(&self, i: usize) -> String {
        format!("{}-n{}", self.run, i % self.args.nodes)
    }

    fn team(&self, pod: usize) -> &str {
        &self.teams[pod % self.teams.len()]
    }

    /// The addresses of pod `i` (generation `g` of its IPs).
    fn ips(&self, i: usize, g: usize) -> Vec<String> {
        let mut v = vec![format!(
            "{}.{}.{}.{}",
            10 + g % 200,
            (i >> 16) & 255,
            (i >> 8) & 255,
            i & 255
        )];
        if self.args.dual_stack {
            v.push(format!("fd00:{g:x}::{:x}:{:x}", i / 65536, i % 65536));
        }
        v
    }

    async fn create_cluster(&self) {
        for i in 0..self.args.nodes {
            self.objects
                .node(&self.node(i), &format!("zone-{}", i % 3))
                .await
                .unwrap();
        }
        for t in &self.teams {
            self.objects
                .namespace(t, &[("team", t.as_str())])
                .await
                .unwrap();
        }
        self.objects
            .observation(
                &self.run,
                json!({"namespaces": self.teams, "window": "30s"}),
            )
            .await
            .unwrap();
        futures::stream::iter((0..self.args.pods).map(|i| async move {
            let app = format!("app-{}", i % self.apps);
            let ips = self.ips(i, 0);
            let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
            self.objects
                .pod(
                    self.team(i),
                    &format!("p{i}"),
                    &self.node(i),
                    &ips,
                    &[("app", &app)],
                    Some(&app),
                )
                .await
                .unwrap();
        }))
        .buffer_unordered(CREATE_CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
        for k in 0..self.args.policies {
            self.policy(k).await;
        }
    }

    /// Policy k: app k may not reach the next team (namespace-wide) or app
    /// k + 1 of its namespace (app-scoped) on port 5432.
    async fn policy(&self, k: usize) {
        let ns = &self.teams[k % self.teams.len()];
        let to = match self.args.shape {
            Shape::NamespaceWide => {
                let next = &self.teams[(k + 1) % self.teams.len()];
                json!([{"namespaceSelector": {"matchLabels": {"team": next}}}])
            }
            Shape::AppScoped => {
                json!([{"podSelector": {"matchLabels": {"app": format!("app-{}", (k + 1) % self.apps)}}}])
            }
        };
        self.objects
            .policy(
                ns,
                &format!("deny-{k}"),
                json!({"podSelector": {"matchLabels": {"app": format!("app-{}", k % self.apps)}},
                       "egress": [{"to": to, "ports": [{"port": 5432}]}]}),
            )
            .await
            .unwrap();
    }

    /// Records every config write the API server sends to a watcher, and
    /// acknowledges each new revision as the node's agent would.
    fn spawn_config_watch(&self) -> tokio::task::JoinHandle<()> {
        let writes = self.writes.clone();
        let api = Api::<NodeAgentConfig>::all(self.client.clone());
        let (ack_tx, ack_rx) = tokio::sync::mpsc::unbounded_channel::<NodeAgentConfig>();
        let acks = tokio::spawn(acknowledge(api.clone(), ack_rx));
        tokio::spawn(async move {
            let _acks = AbortOnDrop(acks);
            let mut s = watcher(api, watcher::Config::default())
                .applied_objects()
                .boxed();
            while let Ok(Some(nac)) = s.try_next().await {
                let node = nac.spec.node_name.clone();
                let new = {
                    let mut w = writes.lock().unwrap();
                    let new = w.revisions.get(&node) != Some(&nac.spec.revision);
                    if new {
                        let bytes = serde_json::to_vec(&nac).map_or(0, |b| b.len());
                        w.seen.push(Write {
                            at: Instant::now(),
                            bytes,
                            slice: false,
                        });
                        w.max_bytes = w.max_bytes.max(bytes);
                        w.revisions.insert(node, nac.spec.revision.clone());
                    }
                    new
                };
                if new {
                    let _ = ack_tx.send(nac);
                }
            }
        })
    }

    /// Records every AddressSetSlice written or deleted.
    fn spawn_slice_watch(&self) -> tokio::task::JoinHandle<()> {
        let writes = self.writes.clone();
        let api = Api::<AddressSetSlice>::all(self.client.clone());
        tokio::spawn(async move {
            let mut s = watcher(api, watcher::Config::default()).boxed();
            while let Ok(Some(event)) = s.try_next().await {
                let bytes = match event {
                    watcher::Event::Apply(o) => serde_json::to_vec(&o).map_or(0, |b| b.len()),
                    watcher::Event::Delete(_) => 0,
                    _ => continue,
                };
                let mut w = writes.lock().unwrap();
                w.seen.push(Write {
                    at: Instant::now(),
                    bytes,
                    slice: true,
                });
                w.max_bytes = w.max_bytes.max(bytes);
            }
        })
    }

    /// Waits until the configs of `nodes` nodes were written and then none
    /// for [`QUIET`] (with `nodes` 0, also when none was written); false
    /// when that did not happen by `deadline` (configs the API server
    /// refuses are retried for ever).
    async fn settle(&self, nodes: usize, deadline: Instant) -> bool {
        loop {
            let (last, written) = {
                let w = self.writes.lock().unwrap();
                (w.seen.last().map(|w| w.at), w.revisions.len())
            };
            let quiet = last.map_or(nodes == 0, |t| t.elapsed() >= QUIET);
            if written >= nodes && quiet {
                return true;
            }
            if Instant::now() > deadline {
                eprintln!("configs still being written after {SETTLE_TIMEOUT:?}");
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The writes seen since the last call, as one change's cost (from `at`).
    fn take_writes(&self) -> Cost {
        self.cost_since(None)
    }

    fn cost_since(&self, at: Option<Instant>) -> Cost {
        let seen = std::mem::take(&mut self.writes.lock().unwrap().seen);
        Cost {
            configs: seen.iter().filter(|w| !w.slice).count(),
            slices: seen.iter().filter(|w| w.slice).count(),
            bytes: seen.iter().map(|w| w.bytes).sum(),
            propagation_ms: match (at, seen.last()) {
                (Some(at), Some(last)) => (last.at - at).as_secs_f64() * 1000.0,
                _ => 0.0,
            },
        }
    }

    /// Runs `change`, waits until it settled, and returns its cost.
    async fn measure(&self, change: impl Future<Output = ()>) -> Cost {
        self.take_writes();
        let at = Instant::now();
        change.await;
        // At least one config carries the change (or nothing did).
        tokio::time::sleep(QUIET).await;
        self.settle(0, at + SETTLE_TIMEOUT).await;
        self.cost_since(Some(at))
    }

    async fn change_pod_ip(&self, pod: usize, j: usize) -> Cost {
        let ips = self.ips(pod, j + 1);
        let ns = self.team(pod).to_owned();
        self.measure(async {
            let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
            self.objects
                .set_pod_ips(&ns, &format!("p{pod}"), &ips)
                .await
                .unwrap();
        })
        .await
    }

    async fn apply_policy(&self, k: usize) -> Cost {
        self.measure(self.policy(k)).await
    }

    /// Team 1 leaves the selectors of the policies that name it.
    async fn relabel_team(&self) -> Cost {
        let api = Api::<Namespace>::all(self.client.clone());
        let ns = self.teams[1].clone();
        self.measure(async {
            api.patch(
                &ns,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"team": format!("{ns}-moved")}}})),
            )
            .await
            .unwrap();
        })
        .await
    }
}
