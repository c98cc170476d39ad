//! Feeds watch events of Nodes, Namespaces, Pods, Services, EndpointSlices,
//! NetworkObservations and FlowPolicies into the compiler (kube-runtime
//! watchers: relist, resume and backoff are theirs). A relist replaces the
//! kind's whole state, so objects deleted while the watch was down are
//! deleted here too.
//!
//! Every watch of the operator retries with [`watch_backoff`]: capped at a
//! few seconds, so that after an API-server outage (whose watches end in
//! "too old resource version" and a relist) the view is current again
//! within seconds, not the minutes kube-runtime's default backoff (up to
//! 30 s per attempt, grown during the outage) can take. While a kind's
//! watch fails, `flowlens_operator_watch_stale{kind}` is 1.
//!
//! EndpointSlices are watched in the version the API server serves:
//! `discovery.k8s.io/v1` (1.21+), else `v1beta1` (1.20 and older; removed
//! in 1.25), as untyped objects converted by [`model::endpoint_slice_info`].

use std::{collections::BTreeSet, fmt::Debug, sync::Arc, time::Duration};

use flowlens_api::{FlowPolicy, NetworkObservation};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{ApiResource, DynamicObject, GroupVersionKind},
    runtime::{
        WatchStreamExt,
        utils::{Backoff, ResetTimerBackoff},
        watcher,
    },
};
use serde::de::DeserializeOwned;
use tracing::{info, warn};

use crate::{
    compile::{Compiler, PolicyObject},
    context::{Context, Kind},
    metrics::KindLabels,
    model,
};

/// How one kind enters the compiler.
trait Feed: Resource + Clone + Debug + DeserializeOwned + Send + Sync + 'static {
    const KIND: Kind;
    const NAME: &'static str;
    /// What the compiler takes of an object (converted at the edge: a
    /// relist holds these, not the whole objects, until it ends).
    type Info;
    /// The compiler's key of an object.
    fn key(&self) -> String;
    fn info(&self) -> Self::Info;
    fn apply(info: Self::Info, c: &mut Compiler);
    fn delete(key: &str, c: &mut Compiler);
    /// Keys of this kind currently in the compiler.
    fn keys(c: &Compiler) -> BTreeSet<String>;
}

impl Feed for Node {
    const KIND: Kind = Kind::Node;
    const NAME: &'static str = "Node";
    type Info = model::NodeInfo;
    fn key(&self) -> String {
        self.name_any()
    }
    fn info(&self) -> Self::Info {
        model::node_info(self)
    }
    fn apply(info: Self::Info, c: &mut Compiler) {
        c.upsert_node(info);
    }
    fn delete(key: &str, c: &mut Compiler) {
        c.delete_node(key);
    }
    fn keys(c: &Compiler) -> BTreeSet<String> {
        c.node_names().cloned().collect()
    }
}

impl Feed for Namespace {
    const KIND: Kind = Kind::Namespace;
    const NAME: &'static str = "Namespace";
    type Info = model::NamespaceInfo;
    fn key(&self) -> String {
        self.name_any()
    }
    fn info(&self) -> Self::Info {
        model::namespace_info(self)
    }
    fn apply(info: Self::Info, c: &mut Compiler) {
        c.upsert_namespace(info);
    }
    fn delete(key: &str, c: &mut Compiler) {
        c.delete_namespace(key);
    }
    fn keys(c: &Compiler) -> BTreeSet<String> {
        c.namespace_names().cloned().collect()
    }
}

impl Feed for Pod {
    const KIND: Kind = Kind::Pod;
    const NAME: &'static str = "Pod";
    type Info = model::PodInfo;
    fn key(&self) -> String {
        format!(
            "{}/{}",
            self.namespace().unwrap_or_default(),
            self.name_any()
        )
    }
    fn info(&self) -> Self::Info {
        model::pod_info(self)
    }
    fn apply(info: Self::Info, c: &mut Compiler) {
        c.upsert_pod(info);
    }
    fn delete(key: &str, c: &mut Compiler) {
        c.delete_pod(key);
    }
    fn keys(c: &Compiler) -> BTreeSet<String> {
        c.pod_keys().cloned().collect()
    }
}

impl Feed for Service {
    const KIND: Kind = Kind::Service;
    const NAME: &'static str = "Service";
    type Info = model::ServiceInfo;
    fn key(&self) -> String {
        format!(
            "{}/{}",
            self.namespace().unwrap_or_default(),
            self.name_any()
        )
    }
    fn info(&self) -> Self::Info {
        model::service_info(self)
    }
    fn apply(info: Self::Info, c: &mut Compiler) {
        c.upsert_service(info);
    }
    fn delete(key: &str, c: &mut Compiler) {
        c.delete_service(key);
    }
    fn keys(c: &Compiler) -> BTreeSet<String> {
        c.service_keys().cloned().collect()
    }
}

/// EndpointSlices, of whichever version the API server serves.
impl Feed for DynamicObject {
    const KIND: Kind = Kind::EndpointSlice;
    const NAME: &'static str = "EndpointSlice";
    type Info = model::EndpointSliceInfo;
    fn key(&self) -> String {
        format!(
            "{}/{}",
            self.namespace().unwrap_or_default(),
            self.name_any()
        )
    }
    fn info(&self) -> Self::Info {
        model::endpoint_slice_info(self)
    }
    fn apply(info: Self::Info, c: &mut Compiler) {
        c.upsert_endpoint_slice(info);
    }
    fn delete(key: &str, c: &mut Compiler) {
        c.delete_endpoint_slice(key);
    }
    fn keys(c: &Compiler) -> BTreeSet<String> {
        c.endpoint_slice_keys().cloned().collect()
    }
}

impl Feed for NetworkObservation {
    const KIND: Kind = Kind::Observation;
    const NAME: &'static str = "NetworkObservation";
    /// The object itself: there are few.
    type Info = NetworkObservation;
    fn key(&self) -> String {
        self.name_any()
    }
    fn info(&self) -> Self::Info {
        self.clone()
    }
    fn apply(o: Self::Info, c: &mut Compiler) {
        c.upsert_observation(
            &o.name_any(),
            &o.uid().unwrap_or_default(),
            o.metadata.generation.unwrap_or(0),
            o.spec.clone(),
        );
        let shown = o.status.as_ref().and_then(|s| s.last_window.as_ref());
        c.set_counted_through(&o.name_any(), shown.map(|w| w.end.0.as_second()));
    }
    fn delete(key: &str, c: &mut Compiler) {
        c.delete_observation(key);
    }
    fn keys(c: &Compiler) -> BTreeSet<String> {
        c.observations().map(|o| o.name.clone()).collect()
    }
}

impl Feed for FlowPolicy {
    const KIND: Kind = Kind::Policy;
    const NAME: &'static str = "FlowPolicy";
    type Info = PolicyObject;
    fn key(&self) -> String {
        format!(
            "{}/{}",
            self.namespace().unwrap_or_default(),
            self.name_any()
        )
    }
    fn info(&self) -> Self::Info {
        policy_object(self)
    }
    fn apply(info: Self::Info, c: &mut Compiler) {
        c.upsert_policy(info);
    }
    fn delete(key: &str, c: &mut Compiler) {
        if let Some((ns, name)) = key.split_once('/') {
            c.delete_policy(ns, name);
        }
    }
    fn keys(c: &Compiler) -> BTreeSet<String> {
        c.policy_keys().map(|(ns, n)| format!("{ns}/{n}")).collect()
    }
}

/// A FlowPolicy as the compiler takes it in: with its creation time (the
/// order of rules on a full endpoint) and the spec its status says is in
/// force (kept in force across a restart when the latest spec is invalid).
fn policy_object(p: &FlowPolicy) -> PolicyObject {
    PolicyObject {
        namespace: p.namespace().unwrap_or_default(),
        name: p.name_any(),
        uid: p.uid().unwrap_or_default(),
        created: p
            .metadata
            .creation_timestamp
            .as_ref()
            .map_or(0, |t| t.0.as_second()),
        generation: p.metadata.generation.unwrap_or(0),
        spec: p.spec.clone(),
        in_force: p.status.as_ref().and_then(|s| s.in_force.clone()),
    }
}

/// The backoff of every watch: 100 ms doubling to at most 4 s (with
/// jitter), from the start again after 30 s without a failure.
/// kube-runtime's default (800 ms doubling to 30 s, reset after 120 s) is
/// kind to a struggling API server but leaves the operator's view stale for
/// minutes after an outage; one watch per kind and per controller, each
/// retrying at most every 4 s, is kind enough.
pub fn watch_backoff() -> impl Backoff {
    ResetTimerBackoff::new(
        watcher::ExponentialBackoff::from(
            backon::ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(100))
                .with_max_delay(Duration::from_secs(4))
                .with_factor(2.0)
                .with_jitter()
                .without_max_times(),
        ),
        Duration::from_secs(30),
    )
}

async fn run<K: Feed>(ctx: Arc<Context>, api: Api<K>) {
    let mut stream = watcher(api, watcher::Config::default().any_semantic())
        .backoff(watch_backoff())
        .boxed();
    // A relist in progress: each object's key and what the compiler takes.
    let mut relist: Option<Vec<(String, K::Info)>> = None;
    let label = KindLabels { kind: K::NAME };
    let stale = ctx.metrics.watch_stale.get_or_create(&label).clone();
    while let Some(event) = stream.next().await {
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                ctx.sync.set_stale(K::KIND, true);
                if stale.set(1) == 0 {
                    warn!(kind = K::NAME, error = %e, "watch failed; the view of this kind may be stale until it is listed again");
                } else {
                    tracing::debug!(kind = K::NAME, error = %e, "watch failed again");
                }
                continue;
            }
        };
        ctx.metrics.watch_events.get_or_create(&label).inc();
        match event {
            watcher::Event::Init => relist = Some(Vec::new()),
            watcher::Event::InitApply(o) => relist
                .get_or_insert_with(Vec::new)
                .push((o.key(), o.info())),
            watcher::Event::InitDone => {
                let objects = relist.take().unwrap_or_default();
                let n = objects.len();
                ctx.with_compiler(|c| {
                    let present: BTreeSet<&String> = objects.iter().map(|(k, _)| k).collect();
                    for gone in K::keys(c).iter().filter(|k| !present.contains(k)) {
                        K::delete(gone, c);
                    }
                    for (_, info) in objects {
                        K::apply(info, c);
                    }
                });
                mark_synced(&ctx, K::KIND);
                ctx.sync.set_stale(K::KIND, false);
                if stale.set(0) == 1 {
                    info!(
                        kind = K::NAME,
                        objects = n,
                        "listed again: the view is current"
                    );
                } else {
                    info!(kind = K::NAME, objects = n, "listed");
                }
            }
            watcher::Event::Apply(o) => {
                let info = o.info();
                ctx.with_compiler(|c| K::apply(info, c));
            }
            watcher::Event::Delete(o) => ctx.with_compiler(|c| K::delete(&o.key(), c)),
        }
    }
}

/// Records that a kind finished its initial list; the last one ends the
/// bulk load.
fn mark_synced(ctx: &Context, kind: Kind) {
    if ctx.sync.mark(kind) {
        ctx.with_compiler(|c| c.finish_bulk());
        info!("initial sync of every watched kind complete");
    }
}

/// The EndpointSlice group.
const DISCOVERY_GROUP: &str = "discovery.k8s.io";

/// The EndpointSlice version to watch among those served: `v1`, else
/// `v1beta1`.
fn endpoint_slice_version<'a>(served: impl IntoIterator<Item = &'a str>) -> Option<&'static str> {
    let served: Vec<&str> = served.into_iter().collect();
    ["v1", "v1beta1"].into_iter().find(|v| served.contains(v))
}

/// Asks the API server which EndpointSlice version it serves (retrying
/// while it does not answer); `None` when it serves none.
async fn discover_endpoint_slices(client: &Client) -> Option<ApiResource> {
    let mut delay = Duration::from_secs(1);
    loop {
        match kube::discovery::group(client, DISCOVERY_GROUP).await {
            Ok(g) => {
                let v = endpoint_slice_version(g.versions())?;
                let gvk = GroupVersionKind::gvk(DISCOVERY_GROUP, v, "EndpointSlice");
                return Some(ApiResource::from_gvk_with_plural(&gvk, "endpointslices"));
            }
            Err(kube::Error::Discovery(_)) => return None,
            Err(e) => {
                warn!(error = %e, "discovering the EndpointSlice version failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// Watches EndpointSlices in the version the server serves. Without any,
/// Services have no known backends and none reach agents.
async fn run_endpoint_slices(ctx: Arc<Context>) {
    let client = ctx.client.clone();
    match discover_endpoint_slices(&client).await {
        Some(ar) => {
            info!(version = %ar.api_version, "watching EndpointSlices");
            run::<DynamicObject>(ctx, Api::all_with(client, &ar)).await;
        }
        None => {
            warn!(
                "the API server serves no {DISCOVERY_GROUP} EndpointSlices: Services are not handed to agents"
            );
            ctx.with_compiler(|c| c.set_endpoint_slices_served(false));
            mark_synced(&ctx, Kind::EndpointSlice);
            std::future::pending::<()>().await;
        }
    }
}

/// Runs every feed until the process ends.
pub async fn run_all(ctx: Arc<Context>) {
    let client = ctx.client.clone();
    ctx.with_compiler(|c| c.begin_bulk());
    tokio::join!(
        run::<Node>(ctx.clone(), Api::all(client.clone())),
        run::<Namespace>(ctx.clone(), Api::all(client.clone())),
        run::<Pod>(ctx.clone(), Api::all(client.clone())),
        run::<Service>(ctx.clone(), Api::all(client.clone())),
        run_endpoint_slices(ctx.clone()),
        run::<NetworkObservation>(ctx.clone(), Api::all(client.clone())),
        run::<FlowPolicy>(ctx.clone(), Api::all(client.clone())),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_slice_version_prefers_v1() {
        assert_eq!(endpoint_slice_version(["v1beta1", "v1"]), Some("v1"));
        assert_eq!(
            endpoint_slice_version(["v1beta1"]),
            Some("v1beta1"),
            "Kubernetes 1.20"
        );
        assert_eq!(endpoint_slice_version(["v2alpha1"]), None);
        assert_eq!(endpoint_slice_version([]), None);
    }
}
