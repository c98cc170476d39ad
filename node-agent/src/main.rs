//! `flowlens-agent`: the Flowlens node agent.
//!
//! ```text
//! flowlens-agent [run] --node-name N            # config from the API server
//! flowlens-agent [run] --config-file F          # standalone: config from a file
//! flowlens-agent dump [--addr 127.0.0.1:9990]   # print a running agent's windows
//! flowlens-agent cleanup                        # remove every pin (uninstall)
//! ```

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use flowlens_agent::{
    cgroups, config_source,
    control::{ControlLoop, ControlOptions, Event, Reporting},
    datapath::{self, Datapath, DatapathOptions, RttHook, pins},
    dump, http,
    metrics::Metrics,
    report,
    spool::{Restored, Spool},
    state::Shared,
    status,
};
use tracing::{error, info, warn};

#[derive(Parser)]
#[command(
    name = "flowlens-agent",
    version,
    about = "Flowlens node agent: eBPF flow accounting, RTT sampling and enforcement"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent (the default).
    Run(Box<RunArgs>),
    /// Print a running agent's current windows, RTT percentiles and block counters.
    Dump {
        /// The agent's HTTP address.
        #[arg(long, default_value = "127.0.0.1:9990")]
        addr: String,
        /// Print the raw JSON of /debug/window.
        #[arg(long)]
        json: bool,
        /// Series to list per window.
        #[arg(long, default_value_t = 10)]
        top: usize,
    },
    /// Detach every program and remove every map this agent pinned.
    Cleanup {
        #[arg(long, default_value = pins::DEFAULT_ROOT)]
        bpffs_root: PathBuf,
        /// The agent's spool (`run --state-dir`), removed too.
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Then wait until terminated (the uninstall DaemonSet's pods stay
        /// Ready so that `kubectl rollout status` says every node is clean).
        #[arg(long)]
        wait: bool,
    },
}

#[derive(Args, Clone)]
struct RunArgs {
    /// This node's name: the agent applies the NodeAgentConfig of that name.
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,

    /// Standalone mode: read the NodeAgentConfig (object or spec, YAML) from
    /// this file, re-reading it when it changes, instead of the API server.
    #[arg(long, env = "FLOWLENS_CONFIG_FILE")]
    config_file: Option<PathBuf>,

    /// Where programs, links and maps are pinned (one root per agent).
    #[arg(long, env = "FLOWLENS_BPFFS_ROOT", default_value = pins::DEFAULT_ROOT)]
    bpffs_root: PathBuf,

    /// Cgroup v2 directory of the node's pods: sockets under it get RTT
    /// (sock_ops) and connect-time rejection. Default: the kubelet's
    /// `kubepods.slice` or `kubepods` under the cgroup2 mount, else the mount
    /// itself. `none` disables both.
    #[arg(long, env = "FLOWLENS_CGROUP_ROOT")]
    cgroup_root: Option<String>,

    /// The CNI's result cache, where bridge CNIs name each pod's host-side
    /// interface (routed CNIs need no cache: the route names it).
    #[arg(
        long,
        env = "FLOWLENS_CNI_CACHE_DIR",
        default_value = "/var/lib/cni/results"
    )]
    cni_cache_dir: PathBuf,

    /// RTT hook: `auto` picks the best the kernel offers.
    #[arg(long, value_enum, default_value = "auto")]
    rtt_hook: RttHook,

    /// Address of /metrics, /healthz, /readyz and /debug/window.
    #[arg(long, env = "FLOWLENS_HTTP_ADDR", default_value = "0.0.0.0:9990")]
    http_addr: SocketAddr,

    /// Entries of each flow table (connections x directions per window).
    /// Two tables are preallocated (152 bytes an entry: 40 MB at the
    /// default). Over half full, the table is drained every second instead
    /// of at window ends.
    #[arg(long, default_value_t = 131072)]
    flow_table_size: u32,

    /// Entries of each policy table (peer classes, class rules, ports); a
    /// configuration gets half (the next one is written beside it). When the
    /// rules do not fit, whole policies are left out and reported, the rest
    /// apply. The tables are not preallocated.
    #[arg(long, default_value_t = 524288, value_parser = clap::value_parser!(u32).range(2..=16_777_216))]
    policy_table_size: u32,

    /// Entries of each RTT histogram table (connections x buckets per window).
    #[arg(long, default_value_t = 65536)]
    rtt_table_size: u32,

    /// Minimum time between two RTT samples of one socket, in milliseconds.
    #[arg(long, default_value_t = 10)]
    rtt_sample_interval_ms: u64,

    /// Longest time between two drains of the kernel tables, in seconds
    /// (drains also happen at every window boundary).
    #[arg(long, default_value_t = 30)]
    max_drain_interval_secs: u64,

    /// Operator report endpoint, overriding `spec.collector.url`.
    #[arg(long, env = "FLOWLENS_COLLECTOR_URL")]
    collector_url: Option<String>,

    /// ServiceAccount token presented to the collector: a projected token
    /// with audience `flowlens.dev/collector`, bound to this agent's pod.
    #[arg(
        long,
        env = "FLOWLENS_TOKEN_FILE",
        default_value = "/var/run/secrets/flowlens/token"
    )]
    token_file: PathBuf,

    /// A node-local directory (a hostPath in the DaemonSet) where the agent
    /// keeps what it drained from the kernel until the operator commits it:
    /// a successor after a crash reports it, exactly once. Without it, what
    /// was drained but not committed dies with the agent.
    #[arg(long, env = "FLOWLENS_STATE_DIR")]
    state_dir: Option<PathBuf>,

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
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn,aya=warn"));
    let b = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Json => b.json().init(),
        LogFormat::Text => b.init(),
    }
}

fn main() -> anyhow::Result<()> {
    flowlens_agent::allocator::limit_arenas();
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Dump { addr, json, top }) => {
            let d = dump::fetch(&addr)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&d)?);
            } else {
                dump::print(&d, top, &mut std::io::stdout())?;
            }
            Ok(())
        }
        Some(Command::Cleanup {
            bpffs_root,
            state_dir,
            wait,
        }) => {
            let n = datapath::remove_pins(&bpffs_root).context("removing pins")?;
            println!("removed {n} pinned objects under {}", bpffs_root.display());
            if let Some(dir) = state_dir {
                match std::fs::remove_dir_all(&dir) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(e).with_context(|| format!("removing {}", dir.display()));
                    }
                    _ => println!("removed the spool {}", dir.display()),
                }
            }
            if wait {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?
                    .block_on(shutdown_signal());
            }
            Ok(())
        }
        Some(Command::Run(args)) => run(*args),
        None => run(cli.run),
    }
}

/// How often the control loop reconciles the datapath with the pods.
const RECONCILE_INTERVAL: Duration = Duration::from_secs(2);

/// Worker threads of the async runtime (HTTP, config watch, status, reports).
const WORKER_THREADS: usize = 2;

/// How long the reporter gets to send the windows flushed at shutdown.
const REPORTER_SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

fn run(args: RunArgs) -> anyhow::Result<()> {
    init_logs(args.log_format);
    let node = node_name(&args)?;
    let cgroup_root = cgroup_root(&args);
    let dp_opts = DatapathOptions {
        bpffs_root: args.bpffs_root.clone(),
        cgroup_root: cgroup_root.clone(),
        rtt_hook: args.rtt_hook,
        flow_table_size: args.flow_table_size,
        rtt_table_size: args.rtt_table_size,
        policy_table_size: args.policy_table_size,
        rtt_sample_interval: Duration::from_millis(args.rtt_sample_interval_ms),
    };
    info!(node = %node, bpffs_root = %args.bpffs_root.display(), cgroup_root = ?cgroup_root, "starting flowlens-agent {}", env!("CARGO_PKG_VERSION"));
    let reports = args.config_file.is_none() || args.collector_url.is_some();
    let (spool, restored) = if reports {
        open_spool(args.state_dir.as_deref())
    } else {
        if let Some(dir) = &args.state_dir {
            warn!(state_dir = %dir.display(), "--state-dir is not used: an agent with --config-file and no --collector-url reports nothing, so it keeps no spool");
        }
        (None, None)
    };
    let spooled = restored
        .as_ref()
        .map(|r| r.drained_maps.clone())
        .unwrap_or_default();
    let datapath = Datapath::open(&dp_opts, &spooled).context("opening the eBPF datapath")?;
    flowlens_agent::allocator::release();

    let shared = Shared::default();
    let metrics = Arc::new(Metrics::new());
    let (events_tx, events_rx) = std::sync::mpsc::channel();
    let (wake_tx, wake_rx) = tokio::sync::mpsc::unbounded_channel();
    let agent = restored
        .as_ref()
        .map(|r| r.agent.clone())
        .unwrap_or_else(report::new_agent_id);
    let outbox = report::Outbox::default();
    let live = Arc::new(report::live::LiveFeed::default());
    let last_part = restored.as_ref().map_or(0, |r| r.next_part);
    if let Some(r) = restored {
        info!(agent = %r.agent, windows = r.windows.len(), policy_windows = r.policies.len(), "reporting what the previous agent's spool held");
        outbox.restore(r.windows, r.policies);
    }
    let control = ControlLoop::new(
        ControlOptions {
            node: node.clone(),
            cgroup_root,
            cni_cache_dir: args.cni_cache_dir.clone(),
            reconcile_interval: RECONCILE_INTERVAL,
            max_drain_interval: Duration::from_secs(args.max_drain_interval_secs.max(1)),
        },
        datapath,
        shared.clone(),
        metrics.clone(),
        reports.then(|| Reporting {
            agent: agent.clone(),
            outbox: outbox.clone(),
            wake: wake_tx,
            spool,
            last_part,
            live: live.clone(),
        }),
    );
    let control_thread = std::thread::Builder::new()
        .name("control".into())
        .spawn(move || control.run(events_rx))?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKER_THREADS)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let router = http::router(shared.clone(), metrics.clone(), events_tx.clone());
        spawn_http_server(args.http_addr, router);
        start_config_source(&args, &node, &shared, &events_tx).await?;
        if reports {
            tokio::spawn(report::live::run(
                live,
                node.clone(),
                args.collector_url.clone(),
                args.token_file.clone(),
                shared.clone(),
                events_tx.clone(),
            ));
        }
        let reporter_task = spawn_reporter(
            &args,
            &node,
            reports.then_some((agent, outbox)),
            wake_rx,
            shared.clone(),
            metrics.clone(),
        );

        shutdown_signal().await;
        info!("shutting down: flushing open windows; pinned programs keep enforcing");
        let _ = events_tx.send(Event::Shutdown);
        let _ = tokio::task::spawn_blocking(move || control_thread.join()).await;
        // Give the reporter a moment to send the flushed parts.
        if tokio::time::timeout(REPORTER_SHUTDOWN_GRACE, reporter_task)
            .await
            .is_err()
        {
            warn!("reporter did not finish in time; unsent windows are lost");
        }
        anyhow::Ok(())
    })?;
    Ok(())
}

/// This node's name: `--node-name`, else the config file's, else
/// `standalone`.
fn node_name(args: &RunArgs) -> anyhow::Result<String> {
    Ok(match (&args.node_name, &args.config_file) {
        (Some(n), _) => n.clone(),
        (None, Some(f)) => config_source::parse_config(
            &std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?,
        )
        .map(|s| s.node_name)
        .unwrap_or_else(|_| "standalone".into()),
        (None, None) => {
            anyhow::bail!("set --node-name (or NODE_NAME), or --config-file for standalone mode")
        }
    })
}

/// The cgroup v2 directory holding pods' cgroups (`none`: no cgroup hooks).
fn cgroup_root(args: &RunArgs) -> Option<PathBuf> {
    match args.cgroup_root.as_deref() {
        Some("none") => None,
        Some(p) => Some(PathBuf::from(p)),
        None => cgroups::cgroup2_root().map(|root| cgroups::pod_cgroup_root(&root)),
    }
}

fn spawn_http_server(addr: SocketAddr, router: axum::Router) {
    tokio::spawn(async move {
        if let Err(e) = http::serve(addr, router).await {
            error!(addr = %addr, error = %e, "HTTP server failed");
        }
    });
}

/// Feeds the control loop its config: from `--config-file`, or from the
/// API server (then also publishes the node's status).
async fn start_config_source(
    args: &RunArgs,
    node: &str,
    shared: &Shared,
    events_tx: &std::sync::mpsc::Sender<Event>,
) -> anyhow::Result<()> {
    if let Some(path) = &args.config_file {
        config_source::watch_file(path.clone(), events_tx.clone());
        return Ok(());
    }
    let client = kube::Client::try_default()
        .await
        .context("connecting to the API server (KUBECONFIG or in-cluster)")?;
    tokio::spawn(config_source::watch_api(
        client.clone(),
        node.to_owned(),
        events_tx.clone(),
    ));
    tokio::spawn(status::run(client, node.to_owned(), shared.clone()));
    Ok(())
}

/// Opens the spool in `dir` and adopts what a predecessor left there.
/// Without a spool (none asked for, or it cannot be used), the agent
/// reports as before, and says what that costs.
fn open_spool(dir: Option<&std::path::Path>) -> (Option<Spool>, Option<Restored>) {
    let Some(dir) = dir else {
        return (None, None);
    };
    let (mut spool, restored) = match Spool::open(dir) {
        Ok((spool, restored, warning)) => {
            if let Some(w) = warning {
                warn!("{w}");
            }
            (spool, restored)
        }
        Err(e) => {
            error!(error = %e, "cannot open the spool: going on without it (counts drained but not committed are lost if the agent dies); check the --state-dir volume");
            return (None, None);
        }
    };
    if let Some(r) = &restored
        && let Err(e) = spool.adopt(r)
    {
        // Its parts are still reported (below); the tables it names are
        // emptied by the first drain as planned.
        error!(error = %e, "cannot write the spool: going on without it");
        let _ = spool.abandon();
        return (None, restored);
    }
    (Some(spool), restored)
}

/// Sends completed windows to the operator. Standalone without a
/// collector, windows are served by /debug/window (and `dump`) only.
fn spawn_reporter(
    args: &RunArgs,
    node: &str,
    reporting: Option<(String, report::Outbox)>,
    wake_rx: tokio::sync::mpsc::UnboundedReceiver<()>,
    shared: Shared,
    metrics: Arc<Metrics>,
) -> tokio::task::JoinHandle<()> {
    match reporting {
        Some((agent, outbox)) => {
            let reporter = report::Reporter::new(
                report::ReporterOptions {
                    node: node.to_owned(),
                    collector_url: args.collector_url.clone(),
                    token_file: args.token_file.clone(),
                },
                agent,
                outbox,
            );
            tokio::spawn(reporter.run(wake_rx, shared, metrics))
        }
        None => tokio::spawn(async move {
            let mut rx = wake_rx;
            while rx.recv().await.is_some() {}
        }),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
