//! The report endpoint: agents POST their completed windows here
//! (`POST /v1/reports`, JSON [`ReportBatch`], answered with a [`ReportAck`]).
//!
//! Each request is authenticated (a pod-bound ServiceAccount token, checked
//! with TokenReview) and a node may only report for itself. Parts go into
//! the books of [`crate::collect`]; once a second, final windows are merged
//! and handed to the status controllers, which write them at most once per
//! window. The answer tells the agent which windows are in status, so it
//! forgets only those: a collector restart or outage loses no window, and
//! the status watermarks (`lastWindow.end`, `countedUntil`) keep any window
//! from counting twice.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    body::Bytes,
    extract::{DefaultBodyLimit, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::post,
};
use flowlens_api::report::{POLICY_WINDOW_SECONDS, ReportAck, ReportBatch};
use tracing::{debug, info, warn};

use crate::{
    auth::{AuthError, Authenticator, Identity},
    collect::{
        Directory, Timing,
        merge::{MergeParams, merge},
        observation_book::ObservationBook,
        policy_book::PolicyBook,
    },
    compile::{Compiler, Observation},
    context::Context,
    metrics::KindLabels,
    model::PodInfo,
};

/// Largest report accepted. Agents split bigger backlogs.
pub const MAX_REPORT_BYTES: usize = 16 << 20;

/// The collector's state.
pub struct Collector {
    /// Changes on every start: agents resend what an earlier process held.
    pub instance: String,
    pub auth: Authenticator,
    pub observations: Mutex<ObservationBook>,
    pub policies: Mutex<PolicyBook>,
}

impl Collector {
    pub fn new(auth: Authenticator, timing: Timing) -> Self {
        Collector {
            instance: format!("{:x}-{}", std::process::id(), timing.started_ms),
            auth,
            observations: Mutex::new(ObservationBook::new(timing)),
            policies: Mutex::new(PolicyBook::new(timing, POLICY_WINDOW_SECONDS)),
        }
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// One observation as [`crate::collect::merge`] sees the cluster.
struct ObservationDirectory<'a> {
    compiler: &'a Compiler,
    observation: &'a Observation,
}

impl Directory for ObservationDirectory<'_> {
    fn pod(&self, ip: &IpAddr) -> Option<&PodInfo> {
        self.compiler.pod_by_ip(ip)
    }

    fn traced(&self, ip: &IpAddr) -> bool {
        self.compiler
            .pod_by_ip(ip)
            .is_some_and(|p| self.observation.selected.contains(&p.key()))
    }

    fn zone(&self, node: &str) -> Option<&str> {
        self.compiler.node(node).and_then(|n| n.zone.as_deref())
    }
}

pub fn router(ctx: Arc<Context>) -> Router {
    Router::new()
        .route("/v1/reports", post(report))
        .layer(DefaultBodyLimit::max(MAX_REPORT_BYTES))
        .with_state(ctx)
}

fn reply(ctx: &Context, status: StatusCode, outcome: &'static str, msg: String) -> Response {
    ctx.metrics
        .reports
        .get_or_create(&KindLabels { kind: outcome })
        .inc();
    if status.is_server_error() {
        debug!(outcome, "{msg}");
    } else {
        warn!(outcome, "refused a report: {msg}");
    }
    (status, msg).into_response()
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

async fn report(State(ctx): State<Arc<Context>>, headers: HeaderMap, body: Bytes) -> Response {
    let collector = &ctx.collector;
    if !ctx.sync.is_synced() {
        return reply(
            &ctx,
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the operator is starting (initial sync); retry".into(),
        );
    }
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
                AuthError::Api(_) => "unavailable",
                _ if e.status() == 401 => "unauthenticated",
                _ => "forbidden",
            };
            return reply(&ctx, status, outcome, e.to_string());
        }
    };
    let batch: ReportBatch = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            return reply(
                &ctx,
                StatusCode::BAD_REQUEST,
                "invalid",
                format!("the report is not a ReportBatch: {e}"),
            );
        }
    };
    let now = now_ms();
    // Which node is speaking, which observations exist (by UID).
    let (node, known) = {
        let c = ctx.compiler.lock().expect("compiler lock");
        let node = node_of(&id, &c);
        let known: HashMap<String, i64> = c.observations().map(|o| (o.uid.clone(), 0)).collect();
        (node, known)
    };
    let node = match node {
        Ok(n) if n == batch.node => n,
        Ok(n) => {
            return reply(
                &ctx,
                StatusCode::FORBIDDEN,
                "forbidden",
                format!(
                    "{} runs on node {n} and may not report for node {}",
                    id.user, batch.node
                ),
            );
        }
        Err(msg) => return reply(&ctx, StatusCode::FORBIDDEN, "forbidden", msg),
    };

    let mut ack = ReportAck {
        collector: collector.instance.clone(),
        ..Default::default()
    };
    let mut gone: BTreeMap<String, i64> = BTreeMap::new();
    {
        let mut book = collector.observations.lock().expect("book lock");
        for w in batch.windows {
            let outcome = if !known.contains_key(&w.uid) {
                // Deleted observation: let the agent forget it.
                let e = gone.entry(w.uid.clone()).or_insert(0);
                *e = (*e).max(w.end());
                "unknown"
            } else {
                book.add(&node, &batch.agent, w, now).label()
            };
            ctx.metrics
                .report_parts
                .get_or_create(&crate::metrics::PartLabels {
                    kind: "observation",
                    outcome,
                })
                .inc();
        }
    }
    {
        let mut book = collector.policies.lock().expect("book lock");
        for p in batch.policy_windows {
            let outcome = book.add(&node, &batch.agent, p, now).label();
            ctx.metrics
                .report_parts
                .get_or_create(&crate::metrics::PartLabels {
                    kind: "policy",
                    outcome,
                })
                .inc();
        }
    }
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

/// Finalizes due windows once a second: merges them and wakes the status
/// controllers.
pub async fn finalize_loop(ctx: Arc<Context>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if ctx.sync.is_synced() {
            finalize_due(&ctx, now_ms());
        }
    }
}

/// Merges every final window and hands the results to the status writers.
pub fn finalize_due(ctx: &Context, now: i64) {
    let collector = &ctx.collector;
    let c = ctx.compiler.lock().expect("compiler lock");
    // Observations: expected nodes, by UID.
    let by_uid: HashMap<&str, &Observation> =
        c.observations().map(|o| (o.uid.as_str(), o)).collect();
    let expected: HashMap<&str, BTreeSet<String>> = by_uid
        .iter()
        .map(|(uid, o)| (*uid, o.by_node.keys().cloned().collect()))
        .collect();
    let finals = {
        let mut book = collector.observations.lock().expect("book lock");
        let finals = book.take_final(now, |uid| expected.get(uid));
        for uid in book.uids() {
            if !by_uid.contains_key(uid.as_str()) {
                book.forget(&uid);
                ctx.results.forget(&uid);
            }
        }
        ctx.metrics.open_parts.set(book.open_parts() as i64);
        finals
    };
    let mut wake_observations = BTreeSet::new();
    for w in finals {
        let Some(obs) = by_uid.get(w.uid.as_str()) else {
            continue;
        };
        let Some(spec) = &obs.spec else { continue };
        let params = MergeParams {
            group_by: &spec.group_by,
            keep_labels: &spec.keep_labels,
            top_n: spec.top_n as usize,
            max_series: spec.max_series as usize,
        };
        let dir = ObservationDirectory {
            compiler: &c,
            observation: obs,
        };
        let started = std::time::Instant::now();
        let r = merge(w.start, w.end, &w.parts, &params, &dir);
        ctx.metrics
            .merge_seconds
            .observe(started.elapsed().as_secs_f64());
        debug!(observation = %obs.name, start = w.start, end = w.end, nodes = r.nodes_reporting, bytes = r.bytes, "window final");
        ctx.metrics.windows_finalized.inc();
        ctx.results.publish(&w.uid, r);
        wake_observations.insert(obs.name.clone());
    }
    // Policies.
    let deltas = {
        let mut book = collector.policies.lock().expect("book lock");
        let d = book.take_final(now);
        (d, book.finalized_through())
    };
    let (deltas, through) = deltas;
    let mut wake_policies = BTreeSet::new();
    let known: Vec<_> = deltas
        .into_iter()
        .filter(|(k, _)| c.policy(k).is_some())
        .inspect(|(k, _)| {
            wake_policies.insert(k.clone());
        })
        .collect();
    ctx.policy_results.retain(|k| c.policy(k).is_some());
    drop(c);
    ctx.policy_results.publish(known, through);
    // Policies whose counts did not make it (a failed write) are retried.
    wake_policies.extend(ctx.policy_results.waiting());
    for name in wake_observations {
        let _ = ctx.triggers.observations.send(name);
    }
    for key in wake_policies {
        let _ = ctx.triggers.policies.send(key);
    }
}

/// TLS files of the report endpoint.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Serves the report endpoint, over TLS when `tls` is set.
pub async fn serve(addr: SocketAddr, router: Router, tls: Option<TlsFiles>) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    info!(%addr, tls = tls.is_some(), "report endpoint listening");
    let Some(tls) = tls else {
        axum::serve(listener, router).await?;
        return Ok(());
    };
    let acceptor = tls_acceptor(&tls)?;
    loop {
        let (stream, peer) = listener.accept().await?;
        let acceptor = acceptor.clone();
        let router = router.clone();
        tokio::spawn(async move {
            let stream = match acceptor.accept(stream).await {
                Ok(s) => s,
                Err(e) => {
                    debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
            };
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

fn tls_acceptor(tls: &TlsFiles) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use anyhow::Context as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&tls.cert)
        .with_context(|| format!("reading --collector-tls-cert {}", tls.cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing --collector-tls-cert {}", tls.cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(&tls.key)
        .with_context(|| format!("reading --collector-tls-key {}", tls.key.display()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .context("--collector-tls-cert and --collector-tls-key do not match")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}
