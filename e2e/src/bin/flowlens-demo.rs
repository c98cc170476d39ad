//! `just demo`: Flowlens on simulated nodes, with live numbers.
//!
//! Starts the operator and one agent per simulated node (three nodes in two
//! zones, 5 ms between the zones), a small shop application with continuous
//! traffic, applies the samples of `config/samples/` (windows shortened to
//! 10 s so numbers move), and prints `kubectl get
//! networkobservations,flowpolicies -A` every window until Ctrl-C, or for
//! `DEMO_SECONDS`. Then it removes everything it created.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use flowlens_e2e::{
    cluster::{kubeconfig_path, repo_root},
    process::{Proc, require_root, workspace_bin},
    sim::SimCluster,
    traffic::echo_server,
};
use kube::{
    Api,
    api::{DynamicObject, Patch, PatchParams},
    core::GroupVersionKind,
    discovery::ApiResource,
};
use serde::Deserialize;

const RUN: &str = "flowlens-demo";
const WINDOW: Duration = Duration::from_secs(10);

fn kubectl_get() {
    let out = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig_path())
        .args(["get", "networkobservations,flowpolicies", "-A"])
        .output();
    match out {
        Ok(o) => print!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => println!("(kubectl: {e})"),
    }
}

/// Applies every object of the samples (namespaces first), with
/// observation windows set to 10 s.
async fn apply_samples(client: &kube::Client) -> anyhow::Result<Vec<String>> {
    let dir = repo_root().join("config/samples");
    let mut files: Vec<_> = std::fs::read_dir(&dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .filter(|p| !p.to_string_lossy().contains("nodeagentconfig"))
        .collect();
    files.sort();
    let mut applied = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f)?;
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let mut v = serde_json::Value::deserialize(doc)?;
            if v.is_null() {
                continue;
            }
            let (api_version, kind) = (
                v["apiVersion"].as_str().unwrap_or_default().to_owned(),
                v["kind"].as_str().unwrap_or_default().to_owned(),
            );
            if kind == "Namespace" {
                clear_terminating(client, v["metadata"]["name"].as_str().unwrap_or_default())
                    .await?;
            }
            if kind == "NetworkObservation" {
                v["spec"]["window"] = "10s".into();
            }
            v["metadata"]["labels"][flowlens_e2e::objects::TEST_LABEL] = RUN.into();
            let (group, version) = api_version.split_once('/').unwrap_or(("", &api_version));
            let gvk = GroupVersionKind::gvk(group, version, &kind);
            let plural = match kind.as_str() {
                "Namespace" => "namespaces".to_owned(),
                "FlowPolicy" => "flowpolicies".to_owned(),
                k => format!("{}s", k.to_lowercase()),
            };
            let ar = ApiResource::from_gvk_with_plural(&gvk, &plural);
            let name = v["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let api: Api<DynamicObject> = match v["metadata"]["namespace"].as_str() {
                Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
                None => Api::all_with(client.clone(), &ar),
            };
            api.patch(
                &name,
                &PatchParams::apply("flowlens-demo").force(),
                &Patch::Apply(&v),
            )
            .await
            .with_context(|| format!("applying {kind} {name} from {}", f.display()))?;
            applied.push(format!("{kind}/{name}"));
        }
    }
    Ok(applied)
}

/// A namespace left terminating by an earlier run (the local control plane
/// runs no namespace controller) would refuse new objects: finish it.
async fn clear_terminating(client: &kube::Client, name: &str) -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::{Namespace, Pod};
    let Some(ns) = Api::<Namespace>::all(client.clone()).get_opt(name).await? else {
        return Ok(());
    };
    if ns.metadata.deletion_timestamp.is_none() {
        return Ok(());
    }
    let pods = Api::<Pod>::namespaced(client.clone(), name);
    pods.delete_collection(
        &kube::api::DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        },
        &Default::default(),
    )
    .await?;
    flowlens_e2e::cluster::delete_namespace(client, name).await
}

/// Latency between the two zones.
const INTER_ZONE_DELAY: Duration = Duration::from_millis(5);

const CHECKOUT_PORT: u16 = 8080;
const PAYMENTS_API_PORT: u16 = 8443;
const POSTGRES_PORT: u16 = 5432;

/// A count (or duration in ms) no demo reaches: traffic runs until stopped.
const FOREVER: &str = "100000000";

struct Demo {
    sim: SimCluster,
    traffic: Vec<Proc>,
}

/// The shop application's pods (indexes into the topology's pods).
struct Shop {
    web1: usize,
    web2: usize,
    checkout: usize,
    api: usize,
    pg: usize,
}

async fn start() -> anyhow::Result<Demo> {
    let nodes = [
        ("demo-a1", "zone-a"),
        ("demo-a2", "zone-a"),
        ("demo-b1", "zone-b"),
    ];
    let mut sim = SimCluster::new(RUN, &nodes).await?;
    sim.topo.add_delay("zone-a", "zone-b", INTER_ZONE_DELAY);
    let applied = apply_samples(&sim.client).await?;
    println!("applied {}", applied.join(", "));

    let shop = add_shop(&mut sim).await?;
    sim.start_operator(&[]);
    sim.start_agents().await?;
    let traffic = start_traffic(&sim, &shop);
    Ok(Demo { sim, traffic })
}

/// The shop's pods: two web pods (one per zone), checkout, the payments API
/// and postgres.
async fn add_shop(sim: &mut SimCluster) -> anyhow::Result<Shop> {
    let name = |n: &'static str| ("app.kubernetes.io/name", n);
    let version = |v: &'static str| ("app.kubernetes.io/version", v);
    let web1 = sim
        .add_pod(
            0,
            "shop",
            "web-7d9c5-x2k8p",
            &[name("web"), version("1.4.2")],
            Some("web"),
        )
        .await?;
    let web2 = sim
        .add_pod(
            2,
            "shop",
            "web-7d9c5-q9z4m",
            &[name("web"), version("1.5.0")],
            Some("web"),
        )
        .await?;
    let checkout = sim
        .add_pod(
            1,
            "shop",
            "checkout-5f6b8-k2v7r",
            &[name("checkout"), version("2.0.1")],
            Some("checkout"),
        )
        .await?;
    let api = sim
        .add_pod(
            2,
            "payments",
            "payments-api-6c9d7-m4n8s",
            &[name("payments-api")],
            Some("payments-api"),
        )
        .await?;
    let pg = sim
        .add_pod(1, "payments", "postgres-0", &[name("postgres")], None)
        .await?;
    Ok(Shop {
        web1,
        web2,
        checkout,
        api,
        pg,
    })
}

/// The shop's servers and continuous traffic between its pods.
fn start_traffic(sim: &SimCluster, shop: &Shop) -> Vec<Proc> {
    let Shop {
        web1,
        web2,
        checkout,
        api,
        pg,
    } = *shop;
    let addr = |p: usize, port: u16| format!("{}:{port}", sim.topo.pods[p].ip4);
    let mut traffic = vec![
        echo_server(&sim.topo, checkout, CHECKOUT_PORT),
        echo_server(&sim.topo, api, PAYMENTS_API_PORT),
        echo_server(&sim.topo, pg, POSTGRES_PORT),
    ];
    let tool = workspace_bin("flowlens-traffic");
    let mut spawn = |name: &str, pod: usize, args: &[&str]| {
        traffic.push(Proc::spawn(name, sim.topo.pod_cmd(pod, &tool, args), None));
    };
    // Shoppers: web -> checkout, same zone and across zones.
    for (name, web) in [("web-checkout", web1), ("web-checkout-xz", web2)] {
        spawn(
            name,
            web,
            &[
                "ping-pong",
                "--to",
                &addr(checkout, CHECKOUT_PORT),
                "--count",
                FOREVER,
                "--interval-ms",
                "20",
                "--size",
                "512",
            ],
        );
    }
    // Checkout -> payments API -> postgres: steady streams.
    for (name, from, to, port, chunk) in [
        ("checkout-api", checkout, api, PAYMENTS_API_PORT, "8192"),
        ("api-postgres", api, pg, POSTGRES_PORT, "4096"),
    ] {
        spawn(
            name,
            from,
            &[
                "stream",
                "--to",
                &addr(to, port),
                "--duration-ms",
                FOREVER,
                "--chunk",
                chunk,
                "--interval-ms",
                "5",
            ],
        );
    }
    // A web pod trying to reach postgres directly: web-no-direct-db blocks it.
    spawn(
        "web-postgres",
        web1,
        &[
            "connect-loop",
            "--to",
            &addr(pg, POSTGRES_PORT),
            "--duration-ms",
            FOREVER,
            "--interval-ms",
            "500",
            "--timeout-ms",
            "200",
        ],
    );
    traffic
}

async fn stopped() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    require_root();
    let seconds: Option<u64> = std::env::var("DEMO_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok());
    let started = Instant::now();
    println!(
        "Flowlens demo: 3 simulated nodes in 2 zones (5 ms apart), a shop app, the samples of config/samples/."
    );
    let demo = tokio::select! {
        d = start() => Some(d),
        _ = stopped() => None,
    };
    let demo = match demo {
        Some(Ok(d)) => d,
        Some(Err(e)) => {
            eprintln!("the demo could not start: {e:#}");
            // Whatever was created is labelled: remove it.
            let c = flowlens_e2e::cluster::client().await?;
            flowlens_e2e::objects::TestObjects::new(c, RUN)
                .cleanup()
                .await;
            std::process::exit(1);
        }
        None => {
            let c = flowlens_e2e::cluster::client().await?;
            flowlens_e2e::objects::TestObjects::new(c, RUN)
                .cleanup()
                .await;
            return Ok(());
        }
    };
    println!(
        "\nRunning. Point your own kubectl at it:\n  export KUBECONFIG={}\n  kubectl get networkobservations,flowpolicies -A\n  kubectl get networkobservation shop-traffic -o yaml\n{}\n",
        kubeconfig_path().display(),
        match seconds {
            Some(s) => format!("Stops by itself after {s} s (DEMO_SECONDS)."),
            None => "Ctrl-C stops it and removes everything it created.".to_owned(),
        }
    );
    let deadline = seconds.map(|s| started + Duration::from_secs(s));
    let mut tick = tokio::time::interval(WINDOW);
    let mut last_refresh = Instant::now();
    let stop = stopped();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut stop => break,
            _ = tokio::time::sleep_until(deadline.map(tokio::time::Instant::from_std).unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600))) => break,
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        println!("--- {:>4} s ---", started.elapsed().as_secs());
        kubectl_get();
        // Tokens last an hour; renew them like a kubelet would.
        if last_refresh.elapsed() > Duration::from_secs(1800) {
            for n in 0..demo.sim.topo.nodes.len() {
                demo.sim.write_tokens(n).await?;
            }
            last_refresh = Instant::now();
        }
    }
    println!("--- final ---");
    kubectl_get();
    // The operator's load on the API server while it ran.
    let op = demo.sim.operator();
    let secs = started.elapsed().as_secs_f64();
    let total = op.writes();
    let by = |r: &str| {
        op.metric_sum(
            "flowlens_operator_api_writes_total",
            &format!("resource=\"{r}\""),
        )
    };
    println!(
        "\noperator API writes: {total} in {secs:.0} s ({:.1}/min): NodeAgentConfigs {}, NetworkObservation status {}, FlowPolicy status {}, Events {}",
        total / secs * 60.0,
        by("nodeagentconfigs"),
        by("networkobservations/status"),
        by("flowpolicies/status"),
        by("events"),
    );
    println!(
        "\nstopping: agents, operator, traffic; removing objects, pins, namespaces and interfaces"
    );
    let Demo { sim, traffic } = demo;
    drop(traffic);
    sim.shutdown().await?;
    println!("done: nothing left behind");
    Ok(())
}
