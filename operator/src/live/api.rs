//! The live API the operator serves through the API server (aggregated
//! API `live.flowlens.dev/v1alpha1`, resource `flows`):
//!
//! - discovery (`/apis`, `/apis/live.flowlens.dev[/v1alpha1]`, `/openapi/v2`),
//!   open: it says only that the resource exists;
//! - `GET .../flows` (cluster-wide) and `.../namespaces/<ns>/flows`:
//!   newline-delimited JSON ([`LiveLine`]). With `watch=true` the stream
//!   stays open (the API server treats it as long-running and authorizes
//!   the `watch` verb); without, the records of the last `sinceSeconds`
//!   (default 10), collected for [`LIST_COLLECT`] first so that idle
//!   agents have time to drain.
//!
//! The API server authorizes the user (`list`/`watch` on
//! `flows.live.flowlens.dev`, in the namespace or cluster-wide); this end
//! only checks that the request comes from it ([`FrontProxy`]).

use std::{
    sync::{Arc, RwLock},
    time::Duration,
};

use axum::{
    Extension, Json, Router,
    body::Body,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use flowlens_api::live::{LIVE_GROUP, LIVE_RESOURCE, LIVE_VERSION, LiveFlow, LiveLine};
use futures::StreamExt as _;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;
use tracing::info;

use super::{
    front_proxy::FrontProxy,
    hub::{LiveHub, Update},
};
use crate::metrics::Metrics;

/// How long a one-shot read waits for agents to drain and post.
pub const LIST_COLLECT: Duration = Duration::from_millis(2500);
/// `sinceSeconds` of a one-shot read by default.
const DEFAULT_SINCE_S: i64 = 10;

/// The verified client certificate's common name of a TLS connection
/// (set per connection by the collector's server).
#[derive(Clone, Debug, Default)]
pub struct ClientCert(pub Option<String>);

/// The front-proxy settings, or why the API cannot be served.
pub type FrontProxySetting = Arc<RwLock<Result<FrontProxy, String>>>;

#[derive(Clone)]
struct LiveApi {
    hub: Arc<LiveHub>,
    front_proxy: FrontProxySetting,
    metrics: Arc<Metrics>,
}

pub fn router(hub: Arc<LiveHub>, front_proxy: FrontProxySetting, metrics: Arc<Metrics>) -> Router {
    let base = format!("/apis/{LIVE_GROUP}/{LIVE_VERSION}");
    Router::new()
        .route("/apis", get(group_list))
        .route(&format!("/apis/{LIVE_GROUP}"), get(group))
        .route(&base, get(resources))
        .route("/openapi/v2", get(openapi))
        .route(&format!("{base}/{LIVE_RESOURCE}"), get(flows_all))
        .route(
            &format!("{base}/namespaces/{{namespace}}/{LIVE_RESOURCE}"),
            get(flows_in),
        )
        .with_state(LiveApi {
            hub,
            front_proxy,
            metrics,
        })
}

fn group_version() -> serde_json::Value {
    json!({"groupVersion": format!("{LIVE_GROUP}/{LIVE_VERSION}"), "version": LIVE_VERSION})
}

async fn group_list() -> Json<serde_json::Value> {
    Json(json!({
        "kind": "APIGroupList", "apiVersion": "v1",
        "groups": [{"name": LIVE_GROUP, "versions": [group_version()], "preferredVersion": group_version()}],
    }))
}

async fn group() -> Json<serde_json::Value> {
    Json(json!({
        "kind": "APIGroup", "apiVersion": "v1", "name": LIVE_GROUP,
        "versions": [group_version()], "preferredVersion": group_version(),
    }))
}

async fn resources() -> Json<serde_json::Value> {
    Json(json!({
        "kind": "APIResourceList", "apiVersion": "v1",
        "groupVersion": format!("{LIVE_GROUP}/{LIVE_VERSION}"),
        "resources": [{
            "name": LIVE_RESOURCE, "singularName": "flow", "namespaced": true,
            "kind": "Flow", "verbs": ["list", "watch"],
        }],
    }))
}

async fn openapi() -> Json<serde_json::Value> {
    Json(json!({
        "swagger": "2.0",
        "info": {"title": "Flowlens live flows", "version": LIVE_VERSION},
        "paths": {},
    }))
}

/// A Kubernetes `Status` error, which kubectl and client libraries show.
fn status(code: StatusCode, reason: &str, message: String) -> Response {
    (
        code,
        Json(json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": message, "reason": reason, "code": code.as_u16(),
        })),
    )
        .into_response()
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct FlowsQuery {
    watch: Option<String>,
    since_seconds: Option<i64>,
    timeout_seconds: Option<u64>,
}

async fn flows_all(
    State(api): State<LiveApi>,
    cert: Option<Extension<ClientCert>>,
    headers: HeaderMap,
    Query(q): Query<FlowsQuery>,
) -> Response {
    flows(api, None, cert, headers, q).await
}

async fn flows_in(
    State(api): State<LiveApi>,
    Path(namespace): Path<String>,
    cert: Option<Extension<ClientCert>>,
    headers: HeaderMap,
    Query(q): Query<FlowsQuery>,
) -> Response {
    flows(api, Some(namespace), cert, headers, q).await
}

fn line(l: &LiveLine) -> Result<bytes::Bytes, std::convert::Infallible> {
    let mut v = serde_json::to_vec(l).expect("a live line serializes");
    v.push(b'\n');
    Ok(bytes::Bytes::from(v))
}

async fn flows(
    api: LiveApi,
    namespace: Option<String>,
    cert: Option<Extension<ClientCert>>,
    headers: HeaderMap,
    q: FlowsQuery,
) -> Response {
    let user = {
        let setting = api.front_proxy.read().expect("front proxy lock");
        let proxy = match &*setting {
            Ok(p) => p,
            Err(why) => {
                return status(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "ServiceUnavailable",
                    format!("live flows are not served: {why}"),
                );
            }
        };
        match proxy.user(cert.as_ref().and_then(|c| c.0.0.as_deref()), &headers) {
            Ok(u) => u,
            Err(why) => return status(StatusCode::UNAUTHORIZED, "Unauthorized", why),
        }
    };
    let watch = matches!(q.watch.as_deref(), Some("true" | "1"));
    let since_s = q
        .since_seconds
        .unwrap_or(if watch { 0 } else { DEFAULT_SINCE_S })
        .clamp(0, super::hub::RECENT_MS / 1000);
    info!(user = %user.name, namespace = namespace.as_deref().unwrap_or("*"), watch, since_s, "live flows read");
    let reading = api.hub.read();
    api.metrics.live_readers.set(api.hub.readers() as i64);
    let keep = {
        let namespace = namespace.clone();
        move |r: &LiveFlow| namespace.as_deref().is_none_or(|ns| r.namespace == ns)
    };
    let since_ms = crate::collector::now_ms() - since_s * 1000;
    let ndjson = [(header::CONTENT_TYPE, "application/json;stream=watch")];
    if !watch {
        tokio::time::sleep(LIST_COLLECT).await;
        let recent = api.hub.recent(since_ms, &keep);
        drop(reading);
        api.metrics.live_readers.set(api.hub.readers() as i64);
        let lines: Vec<_> = recent
            .iter()
            .map(|r| line(&LiveLine::Flow((**r).clone())))
            .collect();
        return (ndjson, Body::from_stream(futures::stream::iter(lines))).into_response();
    }
    let (head, rx) = api.hub.recent_then_follow(since_ms, &keep);
    let deadline = q
        .timeout_seconds
        .filter(|s| *s > 0)
        .map(|s| tokio::time::Instant::now() + Duration::from_secs(s));
    let head = futures::stream::iter(
        head.into_iter()
            .map(|r| line(&LiveLine::Flow((*r).clone())))
            .collect::<Vec<_>>(),
    );
    let follower = Follower {
        rx,
        _reading: reading,
        metrics: api.metrics.clone(),
        hub: api.hub.clone(),
    };
    let tail = futures::stream::unfold(
        (follower, keep, deadline),
        |(mut f, keep, deadline)| async move {
            loop {
                let next = match deadline {
                    Some(d) => match tokio::time::timeout_at(d, f.rx.recv()).await {
                        Ok(r) => r,
                        Err(_) => return None,
                    },
                    None => f.rx.recv().await,
                };
                let l = match next {
                    Ok(Update::Flow(r)) if keep(&r) => LiveLine::Flow((*r).clone()),
                    Ok(Update::Flow(_)) => continue,
                    Ok(Update::Lost(n)) => LiveLine::Lost { lost: n },
                    Err(RecvError::Lagged(n)) => LiveLine::Lost { lost: n },
                    Err(RecvError::Closed) => return None,
                };
                return Some((line(&l), (f, keep, deadline)));
            }
        },
    );
    (ndjson, Body::from_stream(head.chain(tail))).into_response()
}

/// A following reader: counted until its stream is dropped.
struct Follower {
    rx: tokio::sync::broadcast::Receiver<Update>,
    _reading: super::hub::Reading,
    metrics: Arc<Metrics>,
    hub: Arc<LiveHub>,
}

impl Drop for Follower {
    fn drop(&mut self) {
        // `_reading` drops after this: one reader fewer.
        self.metrics
            .live_readers
            .set(self.hub.readers().saturating_sub(1) as i64);
    }
}
