//! The report endpoint: agents POST their completed windows here
//! (`POST /v1/reports`, JSON [`ReportBatch`], answered with a [`ReportAck`]).
//!
//! Each request is authenticated (a pod-bound ServiceAccount token, checked
//! with TokenReview) and a node may only report for itself. What it may
//! truthfully say is checked by [`crate::collect::admission`] (a refused
//! batch is answered 422, a refused part is dropped; both are counted in
//! `report_refusals` by reason). Parts go into the books of
//! [`crate::collect`]; [`crate::finalize`] merges final windows
//! and hands them to the status controllers, which write them at most once
//! per window. The answer tells the agent which windows are in status, so it
//! forgets only those: a collector restart or outage loses no window, and
//! the status watermarks (`lastWindow.end`, `countedUntil`) keep any window
//! from counting twice.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use axum::{
    Router,
    body::Body,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::post,
};
use flowlens_api::{
    live::{LIVE_POLL_HOLD_SECONDS, LivePush, LiveReply},
    report::{ObservationWindow, POLICY_WINDOW_SECONDS, PolicyWindow, ReportAck, ReportBatch},
};
use tracing::{debug, info, warn};

use crate::{
    auth::{AuthError, Authenticator, Identity},
    collect::{
        Accepted, Timing,
        admission::{Admission, ObservationScope, Refusal, Refused, Scope},
        observation_book::ObservationBook,
        policy_book::PolicyBook,
    },
    compile::{Compiler, Observation},
    context::Context,
    live::{
        api::{ClientCert, FrontProxySetting},
        hub::LiveHub,
    },
    metrics::{KindLabels, PartLabels, RefusalLabels},
};

/// Largest report accepted. Agents split bigger backlogs. No byte of a
/// body is read before its token is verified: an unauthenticated request
/// costs its headers only.
pub(crate) const MAX_REPORT_BYTES: usize = 16 << 20;

/// Reports handled at once (authentication, reading, admission, books);
/// more wait up to [`QUEUE_TIMEOUT`], then are answered 503. Agents of
/// every node report at the same window ends, so they queue rather than
/// fail at once.
pub(crate) const MAX_CONCURRENT_REPORTS: usize = 32;
/// How long a report waits for its turn.
const QUEUE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The collector's state.
pub struct Collector {
    /// Changes on every start: agents resend what an earlier process held.
    pub(crate) instance: String,
    pub(crate) auth: Authenticator,
    pub(crate) observations: Mutex<ObservationBook>,
    pub(crate) policies: Mutex<PolicyBook>,
    /// What nodes may report ([`crate::collect::admission`]).
    pub(crate) admission: Mutex<Admission>,
    /// Stands still while reports cannot be verified.
    pub(crate) deadline_clock: Mutex<crate::collect::deadline_clock::DeadlineClock>,
    /// Live records and their readers ([`crate::live`]).
    pub live: Arc<LiveHub>,
    /// How the API server proxies live-API readers (or why it cannot).
    pub front_proxy: FrontProxySetting,
}

impl Collector {
    pub fn new(auth: Authenticator, timing: Timing) -> Self {
        Collector {
            instance: format!("{:x}-{}", std::process::id(), timing.started_ms),
            auth,
            observations: Mutex::new(ObservationBook::new(timing)),
            policies: Mutex::new(PolicyBook::new(timing, POLICY_WINDOW_SECONDS)),
            admission: Mutex::new(Admission::new()),
            deadline_clock: Mutex::default(),
            live: Arc::default(),
            front_proxy: Arc::new(std::sync::RwLock::new(Err(
                "the API server's front-proxy settings are not read yet".into(),
            ))),
        }
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// What the report endpoint's handler needs.
#[derive(Clone)]
struct Endpoint {
    ctx: Arc<Context>,
    collector: Arc<Collector>,
    /// [`MAX_CONCURRENT_REPORTS`] permits.
    turns: Arc<tokio::sync::Semaphore>,
}

pub fn router(ctx: Arc<Context>, collector: Arc<Collector>) -> Router {
    let live = crate::live::api::router(
        collector.live.clone(),
        collector.front_proxy.clone(),
        ctx.metrics.clone(),
    );
    Router::new()
        .route("/v1/reports", post(report))
        .route("/v1/live", post(live_push))
        .with_state(Endpoint {
            ctx,
            collector,
            turns: Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_REPORTS)),
        })
        .merge(live)
}

/// Answers a refused request: counted by outcome; logged once a minute per
/// outcome (a client resending in a loop does not flood the log).
fn reply(
    ctx: &Context,
    collector: &Collector,
    status: StatusCode,
    outcome: &'static str,
    msg: String,
) -> Response {
    ctx.metrics
        .reports
        .get_or_create(&KindLabels { kind: outcome })
        .inc();
    if status.is_server_error() {
        debug!(outcome, "{msg}");
    } else if collector
        .admission
        .lock()
        .expect("admission lock")
        .should_log("", outcome, now_ms())
    {
        warn!(
            outcome,
            "refused a report: {msg} (logged once a minute per outcome)"
        );
    }
    (status, msg).into_response()
}

/// 503 until the initial sync: pods and policies unknown, nothing could
/// be admitted.
fn starting(ctx: &Context, collector: &Collector) -> Option<Response> {
    (!ctx.sync.is_synced()).then(|| {
        reply(
            ctx,
            collector,
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the operator is starting (initial sync); retry".into(),
        )
    })
}

/// The node an agent runs on, from the pod its token is bound to.
fn node_of(id: &Identity, compiler: &Compiler) -> Result<String, String> {
    if let Some(n) = &id.node {
        return Ok(n.clone());
    }
    let (ns, name, uid) = id.pod.as_ref().expect("identity has a pod or a node");
    match compiler.pod(&format!("{ns}/{name}")) {
        Some(p) if &p.uid != uid => Err(format!(
            "the token is bound to pod {ns}/{name} with UID {uid}, which no longer exists"
        )),
        Some(p) => p
            .node
            .clone()
            .ok_or_else(|| format!("pod {ns}/{name} is not scheduled on a node")),
        None => Err(format!("pod {ns}/{name} (the token's) is not known (yet)")),
    }
}

async fn report(
    State(Endpoint {
        ctx,
        collector,
        turns,
    }): State<Endpoint>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if let Some(starting) = starting(&ctx, &collector) {
        return starting;
    }
    let _turn = match tokio::time::timeout(QUEUE_TIMEOUT, turns.acquire()).await {
        Ok(Ok(permit)) => permit,
        _ => {
            return reply(
                &ctx,
                &collector,
                StatusCode::SERVICE_UNAVAILABLE,
                "busy",
                format!(
                    "{MAX_CONCURRENT_REPORTS} reports are being handled and this one waited {QUEUE_TIMEOUT:?}; retry"
                ),
            );
        }
    };
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > MAX_REPORT_BYTES as u64
    {
        return too_large(&ctx, &collector);
    }
    let (node, batch) =
        match authenticate::<ReportBatch>(&ctx, &collector, &headers, body, MAX_REPORT_BYTES, |b| {
            &b.node
        })
        .await
        {
            Ok(x) => x,
            Err(refused) => return refused,
        };
    let agent = batch.agent.clone();
    let now = now_ms();
    let (known, admitted) = {
        let compiler = ctx.compiler.lock().expect("compiler lock");
        // Observations that exist (by UID), with the end of the last window
        // their status shows.
        let known: HashMap<String, i64> = compiler
            .observations()
            .map(|o| (o.uid.clone(), o.counted_through.unwrap_or(0)))
            .collect();
        let scope = NodeScope::new(&compiler, &node);
        let admitted = collector
            .admission
            .lock()
            .expect("admission lock")
            .admit(&scope, &node, batch, now);
        (known, admitted)
    };
    let admitted = match admitted {
        Ok(a) => a,
        Err(r) => {
            refusal(&ctx, &collector, &node, &r, now);
            ctx.metrics
                .reports
                .get_or_create(&KindLabels { kind: "refused" })
                .inc();
            return (
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("the report of node {node} is refused: {r}"),
            )
                .into_response();
        }
    };
    for r in &admitted.dropped {
        refusal(&ctx, &collector, &node, r, now);
    }
    let gone = add_observation_parts(
        &ctx,
        &collector,
        &node,
        &agent,
        admitted.windows,
        &known,
        now,
    );
    add_policy_parts(
        &ctx,
        &collector,
        &node,
        &agent,
        admitted.policy_windows,
        now,
    );

    let mut ack = ReportAck {
        collector: collector.instance.clone(),
        ..Default::default()
    };
    for uid in known.keys() {
        if let Some(end) = ctx.results.committed_end(uid) {
            ack.committed.insert(uid.clone(), end);
        }
    }
    ack.committed.extend(gone);
    ack.policy_committed = ctx.policy_results.committed_through();
    ctx.metrics
        .reports
        .get_or_create(&KindLabels { kind: "accepted" })
        .inc();
    axum::Json(ack).into_response()
}

/// Largest live push accepted ([`MAX_LIVE_PUSH`] records of a few hundred
/// bytes).
const MAX_LIVE_BYTES: usize = 4 << 20;

/// `POST /v1/live`: an agent's live records (see [`crate::live`]), admitted
/// and published; the answer says whether anyone reads, after holding the
/// request up to [`LIVE_POLL_HOLD_SECONDS`] while nobody does.
async fn live_push(
    State(Endpoint { ctx, collector, .. }): State<Endpoint>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if let Some(starting) = starting(&ctx, &collector) {
        return starting;
    }
    let (node, push) =
        match authenticate::<LivePush>(&ctx, &collector, &headers, body, MAX_LIVE_BYTES, |p| {
            &p.node
        })
        .await
        {
            Ok(x) => x,
            Err(refused) => return refused,
        };
    let now = now_ms();
    let lost = push.lost;
    let admitted = if push.records.is_empty() {
        Default::default()
    } else {
        let compiler = ctx.compiler.lock().expect("compiler lock");
        crate::live::admit::admit(
            push,
            &node,
            &LiveNodeScope {
                compiler: &compiler,
            },
            now,
        )
    };
    let m = &ctx.metrics.live_records;
    m.get_or_create(&KindLabels { kind: "admitted" })
        .inc_by(admitted.records.len() as u64);
    m.get_or_create(&KindLabels { kind: "dropped" })
        .inc_by(admitted.dropped as u64);
    m.get_or_create(&KindLabels { kind: "lost" }).inc_by(lost);
    if let Some(why) = &admitted.reason
        && collector
            .admission
            .lock()
            .expect("admission lock")
            .should_log(&node, "live_dropped", now)
    {
        warn!(%node, dropped = admitted.dropped, "dropped live records: {why} (logged once a minute per node)");
    }
    if !admitted.records.is_empty() {
        collector.live.publish(admitted.records, now);
    }
    collector.live.publish_lost(lost);
    let watching = collector.live.readers() > 0
        || collector
            .live
            .wait_for_reader(std::time::Duration::from_secs(LIVE_POLL_HOLD_SECONDS))
            .await;
    axum::Json(LiveReply { watching }).into_response()
}

/// Who a node's live records may name.
struct LiveNodeScope<'a> {
    compiler: &'a Compiler,
}

impl crate::collect::attempts::PeerNames for LiveNodeScope<'_> {
    fn name(&self, ip: &std::net::IpAddr) -> Option<String> {
        crate::finalize::peer_name(self.compiler, ip)
    }
}

impl crate::live::admit::LiveScope for LiveNodeScope<'_> {
    fn pod(&self, namespace: &str, name: &str) -> Option<(Option<&str>, String)> {
        self.compiler.pod(&format!("{namespace}/{name}")).map(|p| {
            (
                p.node.as_deref(),
                format!("{}/{}", p.workload.kind, p.workload.name),
            )
        })
    }

    fn policy_on_node(&self, namespace: &str, name: &str, node: &str) -> bool {
        NodeScope::new(self.compiler, node).policy_on_node(namespace, name)
    }

    fn traced(&self, ip: &std::net::IpAddr) -> bool {
        self.compiler.pod_by_ip(ip).is_some_and(|p| {
            let key = p.key();
            self.compiler
                .observations()
                .any(|o| o.selected.contains(&key))
        })
    }
}

/// 413: the agent splits its backlog into smaller batches.
fn too_large(ctx: &Context, collector: &Collector) -> Response {
    reply(
        ctx,
        collector,
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
        format!("the report is larger than {MAX_REPORT_BYTES} bytes (or could not be read)"),
    )
}

/// Checks the token, reads and parses the body (a `T` of at most `max`
/// bytes) and checks that the agent speaks for its own node (`node_of_body`).
/// Returns the node and the body, or the refusal.
async fn authenticate<T: serde::de::DeserializeOwned>(
    ctx: &Context,
    collector: &Collector,
    headers: &HeaderMap,
    body: Body,
    max: usize,
    node_of_body: impl Fn(&T) -> &str,
) -> Result<(String, T), Response> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
        .trim();
    let id = match collector.auth.verify(token).await {
        Ok(id) => id,
        Err(e) => {
            let status = StatusCode::from_u16(e.status()).expect("valid status");
            let outcome = match e {
                AuthError::Api(_) => {
                    // The agent holds its windows and resends: their
                    // deadlines wait for it.
                    collector
                        .deadline_clock
                        .lock()
                        .expect("deadline clock lock")
                        .unverifiable(now_ms());
                    "unavailable"
                }
                _ if e.status() == StatusCode::UNAUTHORIZED.as_u16() => "unauthenticated",
                _ => "forbidden",
            };
            return Err(reply(ctx, collector, status, outcome, e.to_string()));
        }
    };
    // Only now is the body read.
    let Ok(body) = axum::body::to_bytes(body, max).await else {
        return Err(too_large(ctx, collector));
    };
    let batch: T = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            return Err(reply(
                ctx,
                collector,
                StatusCode::BAD_REQUEST,
                "invalid",
                format!(
                    "the body is not a {}: {e}",
                    std::any::type_name::<T>()
                        .rsplit("::")
                        .next()
                        .unwrap_or("report")
                ),
            ));
        }
    };
    let node = node_of(&id, &ctx.compiler.lock().expect("compiler lock"));
    match node {
        Ok(n) if n == node_of_body(&batch) => Ok((n, batch)),
        Ok(n) => Err(reply(
            ctx,
            collector,
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "{} runs on node {n} and may not report for node {}",
                id.user,
                node_of_body(&batch)
            ),
        )),
        Err(msg) => Err(reply(
            ctx,
            collector,
            StatusCode::FORBIDDEN,
            "forbidden",
            msg,
        )),
    }
}

/// Adds observation parts to the book. `known`: the observations that exist
/// (by UID) and the end of the last window their status shows, which seeds
/// the book when it first sees one (parts of windows already in status are
/// `counted`). Returns the deleted observations' UIDs with the end of their
/// last part, so the agent forgets them.
fn add_observation_parts(
    ctx: &Context,
    collector: &Collector,
    node: &str,
    agent: &str,
    parts: Vec<ObservationWindow>,
    known: &HashMap<String, i64>,
    now: i64,
) -> BTreeMap<String, i64> {
    let mut gone: BTreeMap<String, i64> = BTreeMap::new();
    let mut book = collector.observations.lock().expect("book lock");
    for w in parts {
        let outcome = match known.get(&w.uid) {
            None => {
                let e = gone.entry(w.uid.clone()).or_insert(0);
                *e = (*e).max(w.end());
                "unknown"
            }
            Some(&counted_through) => {
                book.track(&w.uid, counted_through);
                let (uid, start) = (w.uid.clone(), w.start);
                let accepted = book.add(node, agent, w, now);
                if accepted == Accepted::TooManyAgents {
                    too_many_agents(ctx, collector, node, agent, &format!("{uid} {start}"), now);
                }
                accepted.label()
            }
        };
        ctx.metrics
            .report_parts
            .get_or_create(&PartLabels {
                kind: "observation",
                outcome,
            })
            .inc();
    }
    gone
}

/// Adds policy-counter parts to the book.
fn add_policy_parts(
    ctx: &Context,
    collector: &Collector,
    node: &str,
    agent: &str,
    parts: Vec<PolicyWindow>,
    now: i64,
) {
    let mut book = collector.policies.lock().expect("book lock");
    for p in parts {
        let start = p.start;
        let accepted = book.add(node, agent, p, now);
        if accepted == Accepted::TooManyAgents {
            too_many_agents(ctx, collector, node, agent, &format!("policy {start}"), now);
        }
        let outcome = accepted.label();
        ctx.metrics
            .report_parts
            .get_or_create(&PartLabels {
                kind: "policy",
                outcome,
            })
            .inc();
    }
}

/// Counts a refusal and logs it (once per node and reason per minute).
fn refusal(ctx: &Context, collector: &Collector, node: &str, r: &Refused, now: i64) {
    ctx.metrics
        .report_refusals
        .get_or_create(&RefusalLabels {
            reason: r.reason.label(),
        })
        .inc();
    let log = collector
        .admission
        .lock()
        .expect("admission lock")
        .should_log(node, r.reason.label(), now);
    if log {
        warn!(
            node,
            reason = r.reason.label(),
            field = %r.field,
            "refused a report part: {} (logged once a minute per node and reason)",
            r.detail
        );
    }
}

/// A part refused by a book: its node already has parts of the window from
/// too many agent processes or parts. `window`: which window, for the log.
fn too_many_agents(
    ctx: &Context,
    collector: &Collector,
    node: &str,
    agent: &str,
    window: &str,
    now: i64,
) {
    let r = Refused {
        reason: Refusal::TooManyAgents,
        field: "agent".into(),
        detail: format!(
            "a part from agent {agent} would exceed node {node}'s {} agent processes or {} parts in window {window}",
            crate::collect::admission::MAX_AGENTS_PER_WINDOW,
            crate::collect::admission::MAX_PARTS_PER_WINDOW
        ),
    };
    refusal(ctx, collector, node, &r, now);
}

/// The cluster as admission sees it from one node.
struct NodeScope<'a> {
    compiler: &'a Compiler,
    node: &'a str,
    observations: HashMap<&'a str, &'a Observation>,
}

impl<'a> NodeScope<'a> {
    fn new(compiler: &'a Compiler, node: &'a str) -> Self {
        NodeScope {
            compiler,
            node,
            observations: compiler
                .observations()
                .map(|o| (o.uid.as_str(), o))
                .collect(),
        }
    }
}

impl Scope for NodeScope<'_> {
    fn observation(&self, uid: &str) -> Option<ObservationScope> {
        let o = self.observations.get(uid)?;
        Some(ObservationScope {
            window_seconds: o.window_seconds,
            max_series: o.spec.as_ref().map_or(
                flowlens_api::network_observation::NetworkObservationSpec::default().max_series,
                |s| s.max_series,
            ),
            // As in the node's config (compile/assemble.rs).
            on_node: o.spec.is_some() && o.by_node.get(self.node).is_some_and(|p| !p.is_empty()),
        })
    }

    fn pod_node(&self, namespace: &str, name: &str) -> Option<Option<&str>> {
        self.compiler
            .pod(&format!("{namespace}/{name}"))
            .map(|p| p.node.as_deref())
    }

    fn policy_on_node(&self, namespace: &str, name: &str) -> bool {
        self.compiler
            .policy(&(namespace.to_owned(), name.to_owned()))
            .is_some_and(|p| {
                // As in the node's config (compile/assemble.rs).
                p.spec.is_some()
                    && p.revision.is_some()
                    && p.by_node.get(self.node).is_some_and(|t| !t.is_empty())
            })
    }
}

/// The report endpoint's certificate, replaceable while serving (the
/// operator renews what it provisions; see [`crate::collector_tls`]), and
/// the CA of client certificates it asks for (the API server's front-proxy
/// CA, for the live API; agents present none and use tokens).
pub struct ServerTls {
    config: std::sync::RwLock<Arc<rustls::ServerConfig>>,
    pem: std::sync::Mutex<(String, String, Option<String>)>,
}

/// How long a client may take to finish its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl ServerTls {
    /// From PEM files (`--collector-tls-cert`, `--collector-tls-key`, as
    /// cert-manager writes them).
    pub fn from_files(cert: &std::path::Path, key: &std::path::Path) -> anyhow::Result<ServerTls> {
        use anyhow::Context as _;
        let read = |p: &std::path::Path, flag: &str| {
            std::fs::read_to_string(p).with_context(|| format!("reading {flag} {}", p.display()))
        };
        ServerTls::from_pem(
            &read(cert, "--collector-tls-cert")?,
            &read(key, "--collector-tls-key")?,
        )
    }

    /// From a PEM certificate chain and key.
    pub fn from_pem(cert: &str, key: &str) -> anyhow::Result<ServerTls> {
        Ok(ServerTls {
            config: std::sync::RwLock::new(server_config(cert, key, None)?),
            pem: std::sync::Mutex::new((cert.to_owned(), key.to_owned(), None)),
        })
    }

    /// Serves a new certificate to connections from now on.
    pub fn replace(&self, cert: &str, key: &str) -> anyhow::Result<()> {
        let mut pem = self.pem.lock().expect("tls lock");
        *self.config.write().expect("tls lock") = server_config(cert, key, pem.2.as_deref())?;
        (pem.0, pem.1) = (cert.to_owned(), key.to_owned());
        Ok(())
    }

    /// Asks clients for a certificate signed by `ca` (PEM) from now on.
    pub fn set_client_ca(&self, ca: Option<&str>) -> anyhow::Result<()> {
        let mut pem = self.pem.lock().expect("tls lock");
        *self.config.write().expect("tls lock") = server_config(&pem.0, &pem.1, ca)?;
        pem.2 = ca.map(str::to_owned);
        Ok(())
    }

    fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config.read().expect("tls lock").clone())
    }
}

fn server_config(
    cert: &str,
    key: &str,
    client_ca: Option<&str>,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use anyhow::Context as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert.as_bytes())
        .collect::<Result<_, _>>()
        .context("parsing the collector's certificate (PEM)")?;
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes())
        .context("parsing the collector's private key (PEM)")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(ca.as_bytes()) {
                roots
                    .add(c.context("parsing the front-proxy CA (PEM)")?)
                    .context("the front-proxy CA is not a usable certificate")?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .allow_unauthenticated()
            .build()
            .context("building the client certificate verifier")?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .context("the collector's certificate and key do not match")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Serves the report endpoint, over TLS when `tls` is set. An accept error
/// (file descriptors exhausted, say) is logged and retried, never fatal.
pub async fn serve(
    addr: SocketAddr,
    router: Router,
    tls: Option<Arc<ServerTls>>,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    info!(%addr, tls = tls.is_some(), "report endpoint listening");
    let Some(tls) = tls else {
        axum::serve(listener, router).await?;
        return Ok(());
    };
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(%addr, error = %e, "cannot accept a report connection; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let acceptor = tls.acceptor();
        let router = router.clone();
        tokio::spawn(async move {
            let stream =
                match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                };
            // A verified client certificate (the API server's, proxying a
            // live-API reader) is known to every request of the connection.
            let cn = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| crate::live::front_proxy::common_name(c));
            let router = router.layer(axum::Extension(ClientCert(cn)));
            let service = hyper_util::service::TowerToHyperService::new(router);
            if let Err(e) =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await
            {
                debug!(%peer, error = %e, "report connection ended");
            }
        });
    }
}
