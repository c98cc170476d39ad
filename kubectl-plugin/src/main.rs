//! `kubectl flowlens`: Flowlens as a kubectl plugin. Everything it shows
//! comes from the API server with the user's own kubeconfig, so the
//! cluster's authentication and RBAC decide what a user may see.
//!
//! - `status`: per node, the agent's version, hooks, applied revision,
//!   attached pods, policies in force and problems (NodeAgentConfigs).
//! - `top <observation>`: the busiest flows of an observation's last window
//!   (its status), refreshed with `--watch`.
//! - `blocked`: who tried to reach whom and was blocked or audited, by
//!   FlowPolicy (their `status.topBlocked`).

mod blocked_table;
mod flow_table;
mod node_table;
mod table;

use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use flowlens_api::{FlowPolicy, NetworkObservation, NodeAgentConfig};
use kube::{
    Api, Client, Config,
    api::ListParams,
    config::{KubeConfigOptions, Kubeconfig},
};

#[derive(Parser)]
#[command(
    name = "kubectl flowlens",
    version,
    about = "Flowlens from kubectl: nodes' status, observations' top flows, blocked attempts"
)]
struct Cli {
    /// The kubeconfig file (default: $KUBECONFIG, then ~/.kube/config).
    #[arg(long, global = true)]
    kubeconfig: Option<std::path::PathBuf>,
    /// The kubeconfig context to use.
    #[arg(long, global = true)]
    context: Option<String>,
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Per node: agent version, hooks, applied revision, pods, policies, problems.
    Status,
    /// The busiest flows of an observation's last window.
    Top {
        /// The NetworkObservation.
        observation: String,
        /// Print again every `--interval` until interrupted.
        #[arg(short, long)]
        watch: bool,
        /// Seconds between refreshes with `--watch`.
        #[arg(long, default_value_t = 5)]
        interval: u64,
    },
    /// Blocked and audited attempts (source, destination, port) by FlowPolicy.
    Blocked {
        /// Only the policies of this namespace (default: every namespace).
        #[arg(short, long)]
        namespace: Option<String>,
        /// Only this policy (needs `--namespace`).
        policy: Option<String>,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let client = client(&cli).await?;
    match cli.command {
        Command::Status => {
            let configs = Api::<NodeAgentConfig>::all(client)
                .list(&ListParams::default())
                .await
                .map_err(|e| explain(e, "list", "nodeagentconfigs.flowlens.dev"))?
                .items;
            match cli.output {
                Output::Table if configs.is_empty() => {
                    println!("no NodeAgentConfigs: is the Flowlens operator installed and running?")
                }
                Output::Table => print!("{}", node_table::node_table(&configs)),
                Output::Json => {
                    let nodes: Vec<_> = configs
                        .iter()
                        .map(|c| {
                            serde_json::json!({
                                "node": c.spec.node_name,
                                "revision": c.spec.revision,
                                "status": c.status,
                            })
                        })
                        .collect();
                    println!("{}", serde_json::to_string_pretty(&nodes)?);
                }
            }
        }
        Command::Top {
            observation,
            watch,
            interval,
        } => {
            let api = Api::<NetworkObservation>::all(client);
            loop {
                let obs = api
                    .get(&observation)
                    .await
                    .map_err(|e| explain(e, "get", "networkobservations.flowlens.dev"))?;
                match cli.output {
                    Output::Table => print!("{}", flow_table::top_flows(&obs)),
                    Output::Json => println!(
                        "{}",
                        serde_json::to_string(&obs.status.map(|s| s.top_flows))?
                    ),
                }
                if !watch {
                    break;
                }
                tokio::time::sleep(Duration::from_secs(interval.max(1))).await;
                if matches!(cli.output, Output::Table) {
                    println!();
                }
            }
        }
        Command::Blocked { namespace, policy } => {
            let api = match &namespace {
                Some(ns) => Api::<FlowPolicy>::namespaced(client, ns),
                None => Api::<FlowPolicy>::all(client),
            };
            let policies = match (&policy, &namespace) {
                (Some(name), Some(_)) => vec![
                    api.get(name)
                        .await
                        .map_err(|e| explain(e, "get", "flowpolicies.flowlens.dev"))?,
                ],
                (Some(_), None) => {
                    anyhow::bail!("a policy is named within its namespace: pass --namespace")
                }
                (None, _) => {
                    api.list(&ListParams::default())
                        .await
                        .map_err(|e| explain(e, "list", "flowpolicies.flowlens.dev"))?
                        .items
                }
            };
            match cli.output {
                Output::Table => {
                    let now = k8s_openapi::jiff::Timestamp::now().as_second();
                    print!("{}", blocked_table::blocked_table(&policies, now));
                }
                Output::Json => {
                    let rows: Vec<_> = policies
                        .iter()
                        .map(|p| {
                            serde_json::json!({
                                "namespace": p.metadata.namespace,
                                "policy": p.metadata.name,
                                "topBlocked": p.status.as_ref().map(|s| &s.top_blocked),
                            })
                        })
                        .collect();
                    println!("{}", serde_json::to_string_pretty(&rows)?);
                }
            }
        }
    }
    Ok(())
}

async fn client(cli: &Cli) -> anyhow::Result<Client> {
    let options = KubeConfigOptions {
        context: cli.context.clone(),
        ..Default::default()
    };
    let config = match &cli.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .with_context(|| format!("reading the kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kubeconfig, &options).await?
        }
        None => match Config::from_kubeconfig(&options).await {
            Ok(c) => c,
            Err(_) if cli.context.is_none() => Config::infer()
                .await
                .context("no kubeconfig found: set KUBECONFIG or pass --kubeconfig")?,
            Err(e) => return Err(e.into()),
        },
    };
    Ok(Client::try_from(config)?)
}

/// The API server's refusal, with what to do about it.
fn explain(e: kube::Error, verb: &str, resource: &str) -> anyhow::Error {
    match &e {
        kube::Error::Api(s) if s.code == 403 => anyhow::anyhow!(
            "the API server refused to {verb} {resource}: {}. Ask a cluster admin for a role that allows it (Flowlens' `flowlens-view` ClusterRole covers it)",
            s.message
        ),
        kube::Error::Api(s) if s.code == 404 && verb == "get" => {
            anyhow::anyhow!(
                "{resource}: {} (`kubectl get {}` lists them)",
                s.message,
                resource.split('.').next().unwrap_or(resource)
            )
        }
        kube::Error::Api(s) if s.code == 404 => anyhow::anyhow!(
            "{resource} is not served: are the Flowlens CRDs installed (`kubectl apply --server-side -f crds/`)?"
        ),
        _ => anyhow::Error::new(e).context(format!("{verb} {resource}")),
    }
}
