//! The agent's HTTP endpoints: `/metrics`, `/healthz`, `/readyz` and
//! `/debug/window` (the JSON that `flowlens-agent dump` prints).

use std::{
    net::SocketAddr,
    sync::{Arc, mpsc},
    time::Duration,
};

use axum::{
    Json, Router,
    extract::State,
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
        .route("/healthz", get(|| async { "ok" }))
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

async fn debug_window(State(s): State<AppState>) -> impl IntoResponse {
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
}

/// Serves until the process ends.
pub async fn serve(addr: SocketAddr, router: Router) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, router).await
}
