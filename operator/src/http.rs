//! `/metrics`, `/healthz` and `/readyz` (ready once every watched kind has
//! been listed and configs can be written; a standby replica, waiting for
//! the lease, is ready to take over). While a watch fails (the API server
//! is unreachable), `/readyz` stays 200, as the collector Service routes
//! agents' reports only to ready pods and those must go on, and says which
//! kinds the operator's view of may be stale.

use std::{
    net::SocketAddr,
    sync::{Arc, OnceLock},
};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};

use crate::context::Context;

/// The operator's context, set once this replica leads (at once without
/// leader election).
pub type Leading = Arc<OnceLock<Arc<Context>>>;

pub fn router(leading: Leading) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .with_state(leading)
}

async fn metrics(State(leading): State<Leading>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        leading
            .get()
            .map(|ctx| ctx.metrics.encode())
            .unwrap_or_else(|| "# EOF\n".to_owned()),
    )
}

async fn ready(State(leading): State<Leading>) -> impl IntoResponse {
    let Some(ctx) = leading.get() else {
        return (StatusCode::OK, "standby: waiting for the lease".to_owned());
    };
    if !ctx.sync.is_synced() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "initial sync in progress".to_owned(),
        );
    }
    let stale = ctx.sync.stale_kinds();
    if stale.is_empty() {
        (StatusCode::OK, "ready".to_owned())
    } else {
        (
            StatusCode::OK,
            format!(
                "ready; the watches of {} fail: the view of them may be stale (reports are still accepted)",
                stale.join(", ")
            ),
        )
    }
}

pub async fn serve(addr: SocketAddr, router: Router) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, router).await
}
