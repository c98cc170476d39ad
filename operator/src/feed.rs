//! Feeds watch events of Nodes, Namespaces, Pods, NetworkObservations and
//! FlowPolicies into the compiler (kube-runtime watchers: relist, resume
//! and backoff are theirs). A relist replaces the kind's whole state, so
//! objects deleted while the watch was down are deleted here too.

use std::{collections::BTreeSet, fmt::Debug, sync::Arc};

use flowlens_api::{FlowPolicy, NetworkObservation};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::{
    Api, Resource, ResourceExt,
    runtime::{WatchStreamExt, watcher},
};
use serde::de::DeserializeOwned;
use tracing::{info, warn};

use crate::{
    compile::Compiler,
    context::{Context, Kind},
    metrics::KindLabels,
    model,
};

/// How one kind enters the compiler.
trait Feed: Resource + Clone + Debug + DeserializeOwned + Send + Sync + 'static {
    const KIND: Kind;
    const NAME: &'static str;
    /// The compiler's key of an object.
    fn key(&self) -> String;
    fn apply(&self, c: &mut Compiler);
    fn delete(key: &str, c: &mut Compiler);
    /// Keys of this kind currently in the compiler.
    fn keys(c: &Compiler) -> BTreeSet<String>;
}

impl Feed for Node {
    const KIND: Kind = Kind::Node;
    const NAME: &'static str = "Node";
    fn key(&self) -> String {
        self.name_any()
    }
    fn apply(&self, c: &mut Compiler) {
        c.upsert_node(model::node_info(self));
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
    fn key(&self) -> String {
        self.name_any()
    }
    fn apply(&self, c: &mut Compiler) {
        c.upsert_namespace(model::namespace_info(self));
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
    fn key(&self) -> String {
        format!(
            "{}/{}",
            self.namespace().unwrap_or_default(),
            self.name_any()
        )
    }
    fn apply(&self, c: &mut Compiler) {
        c.upsert_pod(model::pod_info(self));
    }
    fn delete(key: &str, c: &mut Compiler) {
        c.delete_pod(key);
    }
    fn keys(c: &Compiler) -> BTreeSet<String> {
        c.pod_keys().cloned().collect()
    }
}

impl Feed for NetworkObservation {
    const KIND: Kind = Kind::Observation;
    const NAME: &'static str = "NetworkObservation";
    fn key(&self) -> String {
        self.name_any()
    }
    fn apply(&self, c: &mut Compiler) {
        c.upsert_observation(
            &self.name_any(),
            &self.uid().unwrap_or_default(),
            self.metadata.generation.unwrap_or(0),
            self.spec.clone(),
        );
        let shown = self.status.as_ref().and_then(|s| s.last_window.as_ref());
        c.set_counted_through(&self.name_any(), shown.map(|w| w.end.0.as_second()));
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
    fn key(&self) -> String {
        format!(
            "{}/{}",
            self.namespace().unwrap_or_default(),
            self.name_any()
        )
    }
    fn apply(&self, c: &mut Compiler) {
        c.upsert_policy(
            &self.namespace().unwrap_or_default(),
            &self.name_any(),
            &self.uid().unwrap_or_default(),
            self.metadata.generation.unwrap_or(0),
            self.spec.clone(),
        );
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

async fn run<K: Feed>(ctx: Arc<Context>, api: Api<K>)
where
    K::DynamicType: Default,
{
    let mut stream = watcher(api, watcher::Config::default().any_semantic())
        .default_backoff()
        .boxed();
    let mut relist: Option<Vec<K>> = None;
    let label = KindLabels { kind: K::NAME };
    while let Some(event) = stream.next().await {
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                warn!(kind = K::NAME, error = %e, "watch failed; retrying with backoff");
                continue;
            }
        };
        ctx.metrics.watch_events.get_or_create(&label).inc();
        match event {
            watcher::Event::Init => relist = Some(Vec::new()),
            watcher::Event::InitApply(o) => relist.get_or_insert_with(Vec::new).push(o),
            watcher::Event::InitDone => {
                let objects = relist.take().unwrap_or_default();
                let n = objects.len();
                ctx.with_compiler(|c| {
                    let present: BTreeSet<String> = objects.iter().map(Feed::key).collect();
                    for gone in K::keys(c).difference(&present) {
                        K::delete(gone, c);
                    }
                    for o in &objects {
                        o.apply(c);
                    }
                });
                if ctx.sync.mark(K::KIND) {
                    ctx.with_compiler(|c| c.finish_bulk());
                    info!("initial sync of every watched kind complete");
                }
                info!(kind = K::NAME, objects = n, "listed");
            }
            watcher::Event::Apply(o) => ctx.with_compiler(|c| o.apply(c)),
            watcher::Event::Delete(o) => ctx.with_compiler(|c| K::delete(&o.key(), c)),
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
        run::<NetworkObservation>(ctx.clone(), Api::all(client.clone())),
        run::<FlowPolicy>(ctx.clone(), Api::all(client.clone())),
    );
}
