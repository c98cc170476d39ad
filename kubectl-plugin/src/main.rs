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
//! - `observe`: live flows, seconds after the packets, with blocked and
//!   audited attempts and their policy (the live API, through the API
//!   server: `list`/`watch` on `flows.live.flowlens.dev`).

mod blocked_table;
mod flow_table;
mod node_table;
mod observe;
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
    about = "Flowlens from kubectl: live flows, nodes' status, observations' top flows, blocked attempts"
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
    /// Live flows: connections as they happen, blocked and audited attempts
    /// with their policy.
    Observe {
        /// Only this namespace's pods (default: every namespace you may read).
        #[arg(short, long)]
        namespace: Option<String>,
        /// Only flows of this pod (on either side).
        #[arg(long)]
        pod: Option<String>,
        /// Only flows of this workload's pods (`Deployment/web` or `web`).
        #[arg(long)]
        workload: Option<String>,
        /// Only flows to this server port.
        #[arg(long)]
        port: Option<u16>,
        /// Only this verdict.
        #[arg(long, value_enum)]
        verdict: Option<VerdictArg>,
        /// Keep printing new flows until interrupted.
        #[arg(short, long)]
        follow: bool,
        /// Start with the flows of this long ago (`30s`, `5m`; at most 5m).
        /// Default: 10s, or none with `--follow`.
        #[arg(long, value_parser = parse_duration)]
        since: Option<Duration>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum VerdictArg {
    Forwarded,
    Blocked,
    Audited,
}

impl From<VerdictArg> for flowlens_api::live::LiveVerdict {
    fn from(v: VerdictArg) -> Self {
        match v {
            VerdictArg::Forwarded => Self::Forwarded,
            VerdictArg::Blocked => Self::Blocked,
            VerdictArg::Audited => Self::Audited,
        }
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    flowlens_api::duration::parse_duration(s).map_err(|e| e.to_string())
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
        Command::Observe {
            namespace,
            pod,
            workload,
            port,
            verdict,
            follow,
            since,
        } => {
            let filter = observe::Filter {
                pod,
                workload,
                port,
                verdict: verdict.map(Into::into),
            };
            observe(
                client,
                cli.output,
                namespace.as_deref(),
                &filter,
                follow,
                since,
            )
            .await?;
        }
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

/// Streams the live API's lines, filtered, until it ends (or forever with
/// `follow`).
async fn observe(
    client: Client,
    output: Output,
    namespace: Option<&str>,
    filter: &observe::Filter,
    follow: bool,
    since: Option<Duration>,
) -> anyhow::Result<()> {
    use futures::{AsyncBufReadExt as _, TryStreamExt as _};
    let path = observe::path(namespace, follow, since.map(|d| d.as_secs()));
    let request = http::Request::get(&path).body(Vec::new())?;
    let body = client.request_stream(request).await.map_err(|e| {
        let resource = "flows.live.flowlens.dev";
        match &e {
            kube::Error::Api(s) if s.code == 404 || s.code == 503 => anyhow::anyhow!(
                "the live flows API is not available ({}): is the APIService v1alpha1.live.flowlens.dev installed and Available (`kubectl get apiservice v1alpha1.live.flowlens.dev`), and the operator running?",
                s.message
            ),
            _ => explain(e, if follow { "watch" } else { "list" }, resource),
        }
    })?;
    let mut lines = body.lines();
    while let Some(text) = lines
        .try_next()
        .await
        .context("reading the live flows stream")?
    {
        if text.trim().is_empty() {
            continue;
        }
        let l: flowlens_api::live::LiveLine = match serde_json::from_str(&text) {
            Ok(l) => l,
            Err(e) => {
                anyhow::bail!("the live flows API sent a line that is not a flow ({e}): {text}")
            }
        };
        match output {
            Output::Json => {
                if let flowlens_api::live::LiveLine::Flow(r) = &l
                    && !filter.matches(r)
                {
                    continue;
                }
                println!("{text}");
            }
            Output::Table => {
                if let Some(s) = observe::render(&l, filter) {
                    println!("{s}");
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
