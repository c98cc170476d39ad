//! `flowlens-operator`: compiles NetworkObservations, FlowPolicies and the
//! cluster's Pods, Namespaces and Nodes into one NodeAgentConfig per node,
//! and writes what is in force (and what was observed) back into status.

use std::{net::SocketAddr, sync::Arc};

use anyhow::Context as _;
use clap::Parser;
use flowlens_api::{NetworkObservation, NodeAgentConfig};
use flowlens_operator::{
    compile::Compiler,
    config_writer,
    context::{Context, SyncState, Triggers},
    error::Error,
    feed, http,
    metrics::Metrics,
    observation_status, policy_status,
    results::ResultStore,
};
use futures::StreamExt;
use kube::{
    Api, Client, ResourceExt,
    api::ListParams,
    runtime::{
        WatchStreamExt,
        events::{Recorder, Reporter},
        reflector, watcher,
    },
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tracing::{error, info};

#[derive(Parser)]
#[command(
    name = "flowlens-operator",
    version,
    about = "Flowlens operator: compiles observations and policies into per-node agent configs"
)]
struct Args {
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "FLOWLENS_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,

    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn"));
    let b = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Json => b.json().init(),
        LogFormat::Text => b.init(),
    }
}

/// Exits with the install command when the CRDs are missing.
async fn check_crds(client: &Client) -> Result<(), Error> {
    let api: Api<NetworkObservation> = Api::all(client.clone());
    match api.list(&ListParams::default().limit(1)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Err(Error::CrdsMissing),
        Err(e) => Err(e.into()),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_logs(args.log_format);
    let client = Client::try_default()
        .await
        .context("connecting to the API server (KUBECONFIG, ~/.kube/config or in-cluster)")?;
    if let Err(e) = check_crds(&client).await {
        error!("{e}");
        eprintln!("flowlens-operator: {e}");
        std::process::exit(1);
    }
    info!("starting flowlens-operator {}", env!("CARGO_PKG_VERSION"));

    // One watch of NodeAgentConfigs, shared by the writer and both controllers.
    let (configs, writer) = reflector::store_shared::<NodeAgentConfig>(1024);
    let for_policies = writer.subscribe().expect("a shared store");
    let for_observations = writer.subscribe().expect("a shared store");
    let (policy_tx, policy_rx) = mpsc::unbounded_channel();
    let (obs_tx, obs_rx) = mpsc::unbounded_channel();
    let metrics = Arc::new(Metrics::new());
    let ctx = Arc::new(Context {
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "flowlens-operator".into(),
                instance: std::env::var("POD_NAME").ok(),
            },
        ),
        client: client.clone(),
        compiler: std::sync::Mutex::new(Compiler::new()),
        sync: SyncState::default(),
        changed: Default::default(),
        configs,
        written: Default::default(),
        metrics: metrics.clone(),
        results: ResultStore::default(),
        triggers: Triggers {
            policies: policy_tx,
            observations: obs_tx,
        },
    });

    let nac_watch = {
        let ctx = ctx.clone();
        watcher(
            Api::<NodeAgentConfig>::all(client.clone()),
            watcher::Config::default(),
        )
        .default_backoff()
        .reflect_shared(writer)
        .for_each(move |ev| {
            // A config changed or deleted by someone else is rewritten.
            if let Ok(watcher::Event::Apply(n) | watcher::Event::Delete(n)) = &ev {
                let ours = ctx
                    .written
                    .lock()
                    .expect("written lock")
                    .get(&n.name_any())
                    .cloned();
                let deleted = matches!(ev, Ok(watcher::Event::Delete(_)));
                if deleted || ours.is_some_and(|r| r != n.spec.revision) {
                    ctx.written
                        .lock()
                        .expect("written lock")
                        .remove(&n.name_any());
                    let name = n.name_any();
                    ctx.with_compiler(|c| c.mark_dirty([name]));
                }
            }
            futures::future::ready(())
        })
    };

    let router = http::router(ctx.clone());
    let addr = args.metrics_addr;
    tokio::spawn(async move {
        if let Err(e) = http::serve(addr, router).await {
            error!(addr = %addr, error = %e, "metrics server failed");
        }
    });

    tokio::select! {
        _ = nac_watch => error!("NodeAgentConfig watch ended"),
        _ = feed::run_all(ctx.clone()) => error!("watch feeds ended"),
        _ = config_writer::run(ctx.clone()) => error!("config writer ended"),
        _ = policy_status::run(ctx.clone(), for_policies, UnboundedReceiverStream::new(policy_rx)) => error!("FlowPolicy controller ended"),
        _ = observation_status::run(ctx.clone(), for_observations, UnboundedReceiverStream::new(obs_rx)) => error!("NetworkObservation controller ended"),
        _ = shutdown_signal() => info!("shutting down"),
    }
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
