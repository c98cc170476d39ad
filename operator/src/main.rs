//! `flowlens-operator`: compiles NetworkObservations, FlowPolicies and the
//! cluster's Pods, Namespaces and Nodes into one NodeAgentConfig per node,
//! and writes what is in force (and what was observed) back into status.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use flowlens_api::{NetworkObservation, NodeAgentConfig, node_agent_config::CollectorEndpoint};
use flowlens_operator::{
    auth::Authenticator,
    collect::Timing,
    collector::{self, Collector, ServerTls},
    collector_tls::{self, CollectorTls},
    compile::Compiler,
    config_writer,
    context::{Context, SyncState, Triggers},
    error::Error,
    feed, finalize, http, leader,
    metrics::Metrics,
    observation_status, policy_status,
    results::ResultStore,
    status_apply::StatusMemory,
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
use tracing::{error, info, warn};

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

    /// Address of the report endpoint agents send their windows to.
    #[arg(long, env = "FLOWLENS_COLLECTOR_ADDR", default_value = "0.0.0.0:9443")]
    collector_addr: SocketAddr,

    /// The URL agents reach the report endpoint at (written into every
    /// NodeAgentConfig). Default in a cluster (POD_NAMESPACE set):
    /// `http[s]://flowlens-collector.<namespace>.svc:<port>`.
    #[arg(long, env = "FLOWLENS_COLLECTOR_URL")]
    collector_url: Option<String>,

    /// Serve the report endpoint over TLS with this certificate (PEM)...
    #[arg(
        long,
        env = "FLOWLENS_COLLECTOR_TLS_CERT",
        requires = "collector_tls_key"
    )]
    collector_tls_cert: Option<PathBuf>,

    /// ...and this private key (PEM).
    #[arg(
        long,
        env = "FLOWLENS_COLLECTOR_TLS_KEY",
        requires = "collector_tls_cert"
    )]
    collector_tls_key: Option<PathBuf>,

    /// CA bundle (PEM) agents verify the report endpoint with; default: the
    /// certificate itself.
    #[arg(long, env = "FLOWLENS_COLLECTOR_CA")]
    collector_ca_file: Option<PathBuf>,

    /// In a cluster (POD_NAMESPACE set) without --collector-tls-cert, the
    /// operator provisions the report endpoint's CA and certificate in the
    /// Secret `flowlens-collector-tls` and serves TLS; this serves plain
    /// HTTP instead.
    #[arg(long, env = "FLOWLENS_COLLECTOR_INSECURE")]
    collector_insecure: bool,

    /// The ServiceAccount (`namespace/name`) agents authenticate as; `*`
    /// accepts any account whose token is bound to a pod.
    #[arg(
        long,
        env = "FLOWLENS_AGENT_SERVICE_ACCOUNT",
        default_value = "flowlens-system/flowlens-agent"
    )]
    agent_service_account: String,

    /// The audience agents' tokens must be issued for (empty: the API
    /// server's own audience).
    #[arg(long, env = "FLOWLENS_REPORT_AUDIENCE", default_value = flowlens_api::report::REPORT_AUDIENCE)]
    report_audience: String,

    /// Time a window waits for late nodes after it ends.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    report_grace: Duration,

    /// After a start, time given to agents to resend what they hold before
    /// windows are finalized without them.
    #[arg(long, value_parser = parse_duration, default_value = "15s")]
    report_startup_grace: Duration,

    /// Run only while holding the `--lease-name` Lease in POD_NAMESPACE
    /// (needs POD_NAME and POD_NAMESPACE): for more than one replica.
    #[arg(long, env = "FLOWLENS_LEADER_ELECTION")]
    leader_election: bool,

    /// The Lease replicas compete for.
    #[arg(long, default_value = "flowlens-operator")]
    lease_name: String,

    /// How long a lease holds without renewal: a standby takes over at most
    /// this long after the leader died.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    lease_duration: Duration,

    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,

    /// Push observation and policy metrics over OTLP/gRPC to this endpoint
    /// (e.g. `http://otel-collector:4317`). Also on when
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT`
    /// is set; the other `OTEL_*` variables apply.
    #[arg(long)]
    otlp_endpoint: Option<String>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    flowlens_api::duration::parse_duration(s).map_err(|e| e.to_string())
}

impl Args {
    /// The namespace whose Secret holds a provisioned collector certificate,
    /// when the operator provisions one.
    fn provisioned_tls_namespace(&self) -> Option<String> {
        if self.collector_tls_cert.is_some() || self.collector_insecure {
            return None;
        }
        std::env::var("POD_NAMESPACE").ok()
    }

    /// Where agents send reports, and the CA they verify it with
    /// (`provisioned_ca`: the operator's own, see `collector_tls`).
    fn collector_endpoint(
        &self,
        provisioned_ca: Option<&str>,
    ) -> anyhow::Result<Option<CollectorEndpoint>> {
        let tls = self.collector_tls_cert.is_some() || provisioned_ca.is_some();
        let url = match (&self.collector_url, std::env::var("POD_NAMESPACE")) {
            (Some(u), _) => u.clone(),
            (None, Ok(ns)) => format!(
                "{}://flowlens-collector.{ns}.svc:{}",
                if tls { "https" } else { "http" },
                self.collector_addr.port()
            ),
            (None, Err(_)) => return Ok(None),
        };
        let ca_bundle = match (&self.collector_ca_file, &self.collector_tls_cert) {
            (Some(f), _) | (None, Some(f)) => Some(
                std::fs::read_to_string(f)
                    .with_context(|| format!("reading the collector CA bundle {}", f.display()))?,
            ),
            (None, None) => provisioned_ca.map(str::to_owned),
        };
        Ok(Some(CollectorEndpoint { url, ca_bundle }))
    }
}

fn now_s() -> i64 {
    collector::now_ms() / 1000
}

/// The report endpoint's TLS: from files, provisioned by the operator, or
/// none (plain HTTP).
async fn collector_tls(
    args: &Args,
    client: &Client,
) -> anyhow::Result<(Option<Arc<ServerTls>>, Option<CollectorTls>)> {
    if let (Some(cert), Some(key)) = (&args.collector_tls_cert, &args.collector_tls_key) {
        return Ok((Some(Arc::new(ServerTls::from_files(cert, key)?)), None));
    }
    let Some(ns) = args.provisioned_tls_namespace() else {
        return Ok((None, None));
    };
    let tls = collector_tls::ensure(client, &ns, now_s())
        .await
        .with_context(|| {
            format!(
                "provisioning the report endpoint's certificate (Secret {ns}/{}): the operator needs get, create and patch on secrets there",
                collector_tls::SECRET_NAME
            )
        })?;
    let server = ServerTls::from_pem(&tls.cert, &tls.key)?;
    Ok((Some(Arc::new(server)), Some(tls)))
}

/// Renews the provisioned certificate when due (checked hourly): the
/// endpoint serves the new one, and agents get a changed CA bundle through
/// their configs.
async fn renew_collector_tls(
    args: &Args,
    ctx: Arc<Context>,
    server: Option<Arc<ServerTls>>,
    mut current: Option<CollectorTls>,
) {
    let (Some(server), Some(ns)) = (server, args.provisioned_tls_namespace()) else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        let next = match collector_tls::ensure(&ctx.client, &ns, now_s()).await {
            Ok(t) => t,
            Err(e) => {
                warn!(error = %e, "cannot renew the report endpoint's certificate; retrying in an hour");
                continue;
            }
        };
        if current.as_ref() == Some(&next) {
            continue;
        }
        if let Err(e) = server.replace(&next.cert, &next.key) {
            warn!(error = %e, "cannot serve the renewed certificate");
            continue;
        }
        if current.as_ref().map(|c| &c.ca_bundle) != Some(&next.ca_bundle) {
            match args.collector_endpoint(Some(&next.ca_bundle)) {
                Ok(endpoint) => ctx.with_compiler(|c| c.set_collector(endpoint)),
                Err(e) => warn!(error = %e, "cannot publish the renewed CA bundle"),
            }
        }
        current = Some(next);
    }
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
    let params = ListParams::default().limit(1);
    let listed = match Api::<NetworkObservation>::all(client.clone())
        .list(&params)
        .await
    {
        // The newest kind: CRDs of an older release lack it.
        Ok(_) => Api::<flowlens_api::AddressSetSlice>::all(client.clone())
            .list(&params)
            .await
            .map(|_| ()),
        Err(e) => Err(e),
    };
    match listed {
        Ok(()) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Err(Error::CrdsMissing),
        Err(e) => Err(e.into()),
    }
}

/// How many NodeAgentConfig events the shared reflector buffers for its
/// subscribers.
const CONFIG_STORE_BUFFER: usize = 1024;

/// The shortest lease `--lease-duration` is rounded up to, in seconds.
const MIN_LEASE_SECONDS: u64 = 2;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_logs(args.log_format);
    let client = connect().await?;
    info!("starting flowlens-operator {}", env!("CARGO_PKG_VERSION"));

    let leading = spawn_http_server(args.metrics_addr);
    let mut leadership = if args.leader_election {
        let opts = leader_options(&args)?;
        tokio::select! {
            l = leader::acquire(client.clone(), &opts) => Some(l?),
            _ = shutdown_signal() => return Ok(()),
        }
    } else {
        None
    };
    let lost = async {
        match leadership.as_mut() {
            Some(l) => l.lost().await,
            None => std::future::pending().await,
        }
    };

    // One watch of NodeAgentConfigs, shared by the writer and both controllers.
    let (configs, writer) = reflector::store_shared::<NodeAgentConfig>(CONFIG_STORE_BUFFER);
    let for_policies = writer.subscribe().expect("a shared store");
    let for_observations = writer.subscribe().expect("a shared store");
    let (policy_tx, policy_rx) = mpsc::unbounded_channel();
    let (obs_tx, obs_rx) = mpsc::unbounded_channel();
    let metrics = Arc::new(Metrics::new());
    let otlp = if args.otlp_endpoint.is_some() || flowlens_operator::otlp::configured_by_env() {
        let provider = flowlens_operator::otlp::start(
            &metrics.results,
            args.otlp_endpoint.as_deref(),
        )
        .context(
            "starting the OTLP metrics export (check --otlp-endpoint and OTEL_EXPORTER_OTLP_*)",
        )?;
        info!("exporting metrics over OTLP");
        Some(provider)
    } else {
        None
    };
    let (server_tls, provisioned_tls) = collector_tls(&args, &client).await?;
    let compiler = new_compiler(&args, provisioned_tls.as_ref())?;
    let collector = new_collector(&args, &client);
    let triggers = Triggers {
        policies: policy_tx,
        observations: obs_tx,
    };
    let ctx = new_context(&client, compiler, configs, metrics, triggers);
    let nac_watch = watch_node_agent_configs(ctx.clone(), client.clone(), writer);

    let _ = leading.set(ctx.clone());

    let collector_router = collector::router(ctx.clone(), collector.clone());
    let collector_addr = args.collector_addr;
    let collector_server = collector::serve(collector_addr, collector_router, server_tls.clone());
    let live_setup =
        flowlens_operator::live::setup::run(ctx.clone(), collector.clone(), server_tls.clone());

    tokio::select! {
        _ = renew_collector_tls(&args, ctx.clone(), server_tls, provisioned_tls) => error!("certificate renewal ended"),
        r = collector_server => error!(addr = %collector_addr, "report endpoint failed: {r:?}"),
        _ = live_setup => error!("live API setup ended"),
        _ = finalize::finalize_loop(ctx.clone(), collector) => error!("window finalizer ended"),
        _ = nac_watch => error!("NodeAgentConfig watch ended"),
        _ = feed::run_all(ctx.clone()) => error!("watch feeds ended"),
        _ = config_writer::run(ctx.clone()) => error!("config writer ended"),
        _ = policy_status::run(ctx.clone(), for_policies, UnboundedReceiverStream::new(policy_rx)) => error!("FlowPolicy controller ended"),
        _ = observation_status::run(ctx.clone(), for_observations, UnboundedReceiverStream::new(obs_rx)) => error!("NetworkObservation controller ended"),
        _ = lost => {
            error!("lost the lease: exiting, so that only the new leader writes");
            std::process::exit(1);
        }
        _ = shutdown_signal() => info!("shutting down"),
    }
    if let Some(provider) = otlp {
        let _ =
            tokio::task::spawn_blocking(move || flowlens_operator::otlp::shutdown(provider)).await;
    }
    Ok(())
}

/// Connects to the API server; exits with the install command when the
/// CRDs are missing.
async fn connect() -> anyhow::Result<Client> {
    let client = Client::try_default()
        .await
        .context("connecting to the API server (KUBECONFIG, ~/.kube/config or in-cluster)")?;
    if let Err(e) = check_crds(&client).await {
        error!("{e}");
        eprintln!("flowlens-operator: {e}");
        std::process::exit(1);
    }
    Ok(client)
}

/// Serves /metrics, /healthz and /readyz in the background; they report on
/// the context once it is set in the returned cell.
fn spawn_http_server(addr: SocketAddr) -> http::Leading {
    let leading = http::Leading::default();
    let router = http::router(leading.clone());
    tokio::spawn(async move {
        if let Err(e) = http::serve(addr, router).await {
            error!(addr = %addr, error = %e, "metrics server failed");
        }
    });
    leading
}

/// The lease this replica competes for (`--leader-election`).
fn leader_options(args: &Args) -> anyhow::Result<leader::LeaderOptions> {
    Ok(leader::LeaderOptions {
        namespace: std::env::var("POD_NAMESPACE")
            .context("--leader-election needs POD_NAMESPACE (the Lease's namespace)")?,
        pod_name: std::env::var("POD_NAME")
            .context("--leader-election needs POD_NAME (this replica's identity)")?,
        lease_name: args.lease_name.clone(),
        lease_seconds: args.lease_duration.as_secs().max(MIN_LEASE_SECONDS),
    })
}

/// A compiler that tells agents where to report (see
/// [`Args::collector_endpoint`]).
fn new_compiler(args: &Args, provisioned_tls: Option<&CollectorTls>) -> anyhow::Result<Compiler> {
    let collector_endpoint =
        args.collector_endpoint(provisioned_tls.map(|t| t.ca_bundle.as_str()))?;
    if collector_endpoint.is_none() {
        warn!(
            "no --collector-url (and no POD_NAMESPACE): agents are not told where to report; observation results stay empty unless agents set --collector-url"
        );
    }
    let mut compiler = Compiler::new();
    compiler.set_collector(collector_endpoint);
    Ok(compiler)
}

/// The report collector: authenticates agents and times windows.
fn new_collector(args: &Args, client: &Client) -> Arc<Collector> {
    let auth = Authenticator::new(
        client.clone(),
        Some(args.report_audience.clone())
            .filter(|a| !a.is_empty())
            .into_iter()
            .collect(),
        Some(args.agent_service_account.clone()).filter(|a| a != "*" && !a.is_empty()),
    );
    let timing = Timing {
        started_ms: collector::now_ms(),
        startup_grace_ms: args.report_startup_grace.as_millis() as i64,
        grace_ms: args.report_grace.as_millis() as i64,
    };
    Arc::new(Collector::new(auth, timing))
}

fn new_context(
    client: &Client,
    compiler: Compiler,
    configs: reflector::Store<NodeAgentConfig>,
    metrics: Arc<Metrics>,
    triggers: Triggers,
) -> Arc<Context> {
    Arc::new(Context {
        policy_results: Default::default(),
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "flowlens-operator".into(),
                instance: std::env::var("POD_NAME").ok(),
            },
        ),
        client: client.clone(),
        compiler: std::sync::Mutex::new(compiler),
        sync: SyncState::default(),
        changed: Default::default(),
        configs,
        written: Default::default(),
        metrics,
        results: ResultStore::default(),
        observation_statuses: StatusMemory::new(|s| {
            s.last_window.as_ref().map(|w| w.end.0.as_second())
        }),
        policy_statuses: StatusMemory::new(|s| s.counted_until.as_ref().map(|t| t.0.as_second())),
        policy_progress: Default::default(),
        triggers,
    })
}

/// Watches NodeAgentConfigs into the shared store, and has a config that
/// someone else changed or deleted rewritten.
fn watch_node_agent_configs(
    ctx: Arc<Context>,
    client: Client,
    writer: reflector::store::Writer<NodeAgentConfig>,
) -> impl Future<Output = ()> {
    watcher(
        Api::<NodeAgentConfig>::all(client),
        watcher::Config::default(),
    )
    .backoff(feed::watch_backoff())
    .reflect_shared(writer)
    .for_each(move |ev| {
        if let Ok(watcher::Event::Apply(n) | watcher::Event::Delete(n)) = &ev {
            let deleted = matches!(ev, Ok(watcher::Event::Delete(_)));
            rewrite_if_foreign(&ctx, n, deleted);
        }
        futures::future::ready(())
    })
}

/// Marks `n`'s node dirty when its config was deleted or is not the
/// revision the writer last wrote.
fn rewrite_if_foreign(ctx: &Context, n: &NodeAgentConfig, deleted: bool) {
    let ours = ctx
        .written
        .lock()
        .expect("written lock")
        .get(&n.name_any())
        .cloned();
    if deleted || ours.is_some_and(|r| r != n.spec.revision) {
        ctx.written
            .lock()
            .expect("written lock")
            .remove(&n.name_any());
        let name = n.name_any();
        ctx.with_compiler(|c| c.mark_dirty([name]));
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
