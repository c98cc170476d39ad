//! Writes each node's `NodeAgentConfig` (server-side apply) when, and only
//! when, its content changed; deletes the configs of nodes that are gone.
//! The address sets the configs name are written first, and the ones no
//! config names are deleted last (`address_set_writer`).
//!
//! Nothing is written before every watched kind has been listed once: a
//! half-synced view would drop rules for pods not seen yet.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::{Duration, Instant},
};

use flowlens_api::{NodeAgentConfig, node_agent_config::NodeAgentConfigSpec};
use futures::StreamExt;
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, Patch, PatchParams},
};
use tracing::{debug, info, warn};

use crate::{
    address_set_writer::{NamedOnServer, SliceWriter},
    compile::BuiltSet,
    context::Context,
    error::Result,
};

/// The field manager of everything the operator writes.
pub(crate) const FIELD_MANAGER: &str = "flowlens-operator";
const CONTROLLER: &str = "node-agent-config";

/// How long to wait for more events before compiling (coalesces bursts).
pub(crate) const DEBOUNCE: Duration = Duration::from_millis(20);

/// Configs written at once.
pub(crate) const WRITE_CONCURRENCY: usize = 8;

fn object(spec: &NodeAgentConfigSpec, node_uid: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "flowlens.dev/v1alpha1",
        "kind": "NodeAgentConfig",
        "metadata": {
            "name": spec.node_name,
            "labels": {"app.kubernetes.io/managed-by": "flowlens-operator"},
            // Garbage-collected with its Node even when the operator is gone.
            "ownerReferences": [{
                "apiVersion": "v1", "kind": "Node", "name": spec.node_name, "uid": node_uid,
            }],
        },
        "spec": spec,
    })
}

/// How long after a failed write its node is marked dirty again.
const RETRY_DELAY: Duration = Duration::from_secs(2);

/// A node and its config (`None`: the node is gone, delete its config).
type NodeWork = (String, Option<NodeAgentConfigSpec>);

/// Node name -> node UID (the owner of its config).
type NodeUids = BTreeMap<String, String>;

/// Runs until the process ends.
pub async fn run(ctx: Arc<Context>) {
    let api: Api<NodeAgentConfig> = Api::all(ctx.client.clone());
    wait_for_sync(&ctx).await;
    let mut on_server: NamedOnServer = ctx
        .configs
        .state()
        .iter()
        .map(|c| (c.name_any(), c.spec.sets_in_slices()))
        .collect();
    let slices = load_slices(&ctx).await;
    tokio::spawn(slices.watch_foreign(ctx.clone()));
    loop {
        let started = Instant::now();
        let (work, node_uids, sets) = compile_dirty(&ctx);
        ctx.metrics
            .compile_seconds
            .observe(started.elapsed().as_secs_f64());
        // Sets first: a config is written only once the sets it names are.
        if !slices.write_changed(&ctx, &sets).await {
            retry_later(&ctx, work.into_iter().map(|(n, _)| n).collect());
            ctx.changed.notified().await;
            continue;
        }
        // Decide what to write, then write up to WRITE_CONCURRENCY configs
        // at once (a policy change touches many nodes).
        let todo = changed_configs(&ctx, work);
        let planned: Vec<(String, Option<BTreeSet<String>>)> = todo
            .iter()
            .map(|(n, spec)| {
                (
                    n.clone(),
                    spec.as_ref().map(NodeAgentConfigSpec::sets_in_slices),
                )
            })
            .collect();
        let failed = write_all(&ctx, &api, todo, &node_uids).await;
        for (node, names) in planned {
            if failed.contains(&node) {
                continue;
            }
            match names {
                Some(names) => on_server.insert(node, names),
                None => on_server.remove(&node),
            };
        }
        // Sets no config names any more, once no config on the server names them.
        if !slices.delete_unnamed(&ctx, &sets, &on_server).await {
            retry_later(&ctx, BTreeSet::new());
        }
        ctx.metrics.reconciled(CONTROLLER, started);
        if !failed.is_empty() {
            retry_later(&ctx, failed);
        }
        ctx.changed.notified().await;
        tokio::time::sleep(DEBOUNCE).await;
    }
}

/// The slices written so far, retrying until they can be listed.
async fn load_slices(ctx: &Context) -> SliceWriter {
    loop {
        match SliceWriter::load(ctx).await {
            Ok(w) => return w,
            Err(e) => {
                warn!(error = %e, "cannot list AddressSetSlices; retrying");
                tokio::time::sleep(RETRY_DELAY).await;
            }
        }
    }
}

/// Waits for the initial sync of every input and of the configs themselves.
async fn wait_for_sync(ctx: &Context) {
    while !ctx.sync.is_synced() {
        let notified = ctx.sync.notify.notified();
        if ctx.sync.is_synced() {
            break;
        }
        notified.await;
    }
    ctx.configs.wait_until_ready().await.ok();
}

/// Compiles the config of every dirty node and of every node that is gone
/// but still has a config; with the UIDs of the nodes that exist and every
/// address set the configs name.
fn compile_dirty(ctx: &Context) -> (Vec<NodeWork>, NodeUids, BTreeMap<String, Arc<BuiltSet>>) {
    ctx.with_compiler(|c| {
        let mut dirty = c.take_dirty_nodes();
        // Configs whose node is gone.
        for nac in ctx.configs.state() {
            if c.node(&nac.name_any()).is_none() {
                dirty.insert(nac.name_any());
            }
        }
        let work: Vec<NodeWork> = dirty
            .into_iter()
            .map(|n| {
                let cfg = c.node_config(&n);
                (n, cfg)
            })
            .collect();
        let uids: NodeUids = work
            .iter()
            .filter_map(|(n, _)| c.node(n).map(|i| (n.clone(), i.uid.clone())))
            .collect();
        (work, uids, c.address_sets())
    })
}

/// The configs of `work` that differ from what is written; notes the ones
/// found already in place as written.
fn changed_configs(ctx: &Context, work: Vec<NodeWork>) -> Vec<NodeWork> {
    let mut todo = Vec::new();
    for (node, spec) in work {
        let current = ctx
            .configs
            .get(&kube::runtime::reflector::ObjectRef::new(&node));
        let written = ctx
            .written
            .lock()
            .expect("written lock")
            .get(&node)
            .cloned();
        match (&spec, &current) {
            // Already written by us (the reflector may lag behind), or already there.
            (Some(s), _) if written.as_deref() == Some(s.revision.as_str()) => {}
            (Some(s), Some(cur)) if cur.spec == *s => {
                ctx.written
                    .lock()
                    .expect("written lock")
                    .insert(node.clone(), s.revision.clone());
            }
            (None, None) => {}
            _ => todo.push((node, spec)),
        }
    }
    todo
}

/// Writes (or deletes) the configs of `todo`, WRITE_CONCURRENCY at once;
/// returns the nodes whose write failed.
async fn write_all(
    ctx: &Context,
    api: &Api<NodeAgentConfig>,
    todo: Vec<NodeWork>,
    node_uids: &NodeUids,
) -> BTreeSet<String> {
    futures::stream::iter(todo)
        .map(|(node, spec)| {
            let uid = node_uids.get(&node).cloned().unwrap_or_default();
            async move {
                let outcome = match &spec {
                    Some(s) => write(ctx, api, s, &uid).await,
                    None => delete(ctx, api, &node).await,
                };
                ctx.metrics.reconciling(CONTROLLER);
                match outcome {
                    Ok(()) => None,
                    Err(e) => {
                        warn!(node = %node, error = %e, "cannot write NodeAgentConfig; will retry");
                        ctx.metrics.failed(CONTROLLER, e.metric_label());
                        Some(node)
                    }
                }
            }
        })
        .buffer_unordered(WRITE_CONCURRENCY)
        .filter_map(futures::future::ready)
        .collect()
        .await
}

/// Marks the nodes `failed` dirty again after RETRY_DELAY.
fn retry_later(ctx: &Arc<Context>, failed: BTreeSet<String>) {
    let ctx = ctx.clone();
    tokio::spawn(async move {
        tokio::time::sleep(RETRY_DELAY).await;
        ctx.with_compiler(|c| c.mark_dirty(failed));
    });
}

async fn write(
    ctx: &Context,
    api: &Api<NodeAgentConfig>,
    spec: &NodeAgentConfigSpec,
    node_uid: &str,
) -> Result<()> {
    let obj = object(spec, node_uid);
    api.patch(
        &spec.node_name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&obj),
    )
    .await?;
    ctx.metrics.wrote("nodeagentconfigs", "apply");
    ctx.written
        .lock()
        .expect("written lock")
        .insert(spec.node_name.clone(), spec.revision.clone());
    debug!(node = %spec.node_name, revision = %spec.revision, "wrote NodeAgentConfig");
    Ok(())
}

async fn delete(ctx: &Context, api: &Api<NodeAgentConfig>, node: &str) -> Result<()> {
    match api.delete(node, &DeleteParams::default()).await {
        Ok(_) => {
            ctx.metrics.wrote("nodeagentconfigs", "delete");
            ctx.written.lock().expect("written lock").remove(node);

            info!(
                node,
                "deleted the NodeAgentConfig of a node that no longer exists"
            );
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}
