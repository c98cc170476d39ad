//! The agent's HTTP endpoints: `/metrics`, `/healthz`, `/readyz` and
//! `/debug/window` (the JSON that `flowlens-agent dump` prints). The agent
//! uses the host network, so its port is open to every pod: `/debug/window`
//! (which names pods, peers and blocked attempts) answers only connections
//! from the node itself (loopback).

use std::{
    net::SocketAddr,
    sync::{Arc, mpsc},
    time::Duration,
};

use axum::{
    Json, Router,
    extract::{ConnectInfo, State},
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use serde::{Deserialize, Serialize};

use crate::{
    control::Event,
    metrics::Metrics,
    state::{AgentSnapshot, Shared},
};

#[derive(Clone)]
struct AppState {
    shared: Shared,
    metrics: Arc<Metrics>,
    control: mpsc::Sender<Event>,
}

/// What `/debug/window` returns.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DebugWindow {
    /// Open windows including what the kernel counted since the last drain.
    pub live: Vec<flowlens_api::report::ObservationWindow>,
    /// Policy matches since the agent started, including live counts.
    pub live_policies: Vec<flowlens_api::report::PolicyMatches>,
    #[serde(flatten)]
    pub(crate) snapshot: AgentSnapshot,
}

pub fn router(shared: Shared, metrics: Arc<Metrics>, control: mpsc::Sender<Event>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthy))
        .route("/readyz", get(ready))
        .route("/debug/window", get(debug_window))
        .with_state(AppState {
            shared,
            metrics,
            control,
        })
}

async fn metrics_handler(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}

async fn healthy(State(s): State<AppState>) -> impl IntoResponse {
    match s.shared.stuck() {
        None => (StatusCode::OK, "ok"),
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
    }
}

async fn ready(State(s): State<AppState>) -> impl IntoResponse {
    if s.shared.is_ready() {
        (StatusCode::OK, "ready")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "no configuration applied yet",
        )
    }
}

async fn debug_window(
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    State(s): State<AppState>,
) -> axum::response::Response {
    if !peer.ip().to_canonical().is_loopback() {
        return (
            StatusCode::FORBIDDEN,
            "/debug/window answers only on the node itself: run `flowlens-agent dump` there \
             (kubectl -n flowlens-system exec <agent pod> -- flowlens-agent dump)\n",
        )
            .into_response();
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    let preview = if s.control.send(Event::Preview(tx)).is_ok() {
        tokio::time::timeout(Duration::from_secs(5), rx)
            .await
            .ok()
            .and_then(|r| r.ok())
            .unwrap_or_default()
    } else {
        Default::default()
    };
    Json(DebugWindow {
        live: preview.windows,
        live_policies: preview.policies,
        snapshot: s.shared.read(),
    })
    .into_response()
}

/// Serves until the process ends.
pub async fn serve(addr: SocketAddr, router: Router) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await
}
