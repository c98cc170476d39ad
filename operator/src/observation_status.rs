//! `NetworkObservation` status: whether the observation is valid and
//! deployed, where, and (from agents' reports) what it observed.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use flowlens_api::{
    NetworkObservation, NodeAgentConfig,
    conditions::{self, reason},
    network_observation::{
        NetworkObservationStatus, ObservationNodes, ObservationPods, ObservationSummary,
    },
};
use futures::StreamExt;
use k8s_openapi::jiff::Timestamp;
use kube::{
    Api, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{
        Controller, WatchStreamExt,
        controller::Action,
        predicates, reflector,
        reflector::{ObjectRef, Store},
        watcher,
    },
};
use tracing::{info, instrument, warn};

use crate::{
    compile::ObservationView,
    config_writer::FIELD_MANAGER,
    context::Context,
    error::{Error, Result},
    metrics::{ControllerLabels, ErrorLabels},
    results::WindowResult,
};

const CONTROLLER: &str = "networkobservation-status";

/// Whether `node`'s agent runs the observation at `generation`.
fn deployed(nac: Option<&Arc<NodeAgentConfig>>, name: &str, generation: i64) -> bool {
    let Some(nac) = nac else { return false };
    let in_spec = nac
        .spec
        .observations
        .iter()
        .any(|o| o.name == name && o.generation == generation);
    let applied = nac
        .status
        .as_ref()
        .and_then(|s| s.applied_revision.as_ref())
        == Some(&nac.spec.revision);
    in_spec && applied
}

/// The status of an observation. `result` is the last completed window, if
/// any; fields it does not cover are kept from `current`.
pub fn observation_status(
    name: &str,
    view: &ObservationView,
    configs: &BTreeMap<String, Arc<NodeAgentConfig>>,
    result: Option<&WindowResult>,
    current: &NetworkObservationStatus,
    now: Timestamp,
) -> NetworkObservationStatus {
    let mut s = current.clone();
    let generation = Some(view.generation);
    s.observed_generation = generation;
    let selected = view.selected_nodes.len() as u32;
    let deployed_on = view
        .selected_nodes
        .iter()
        .filter(|n| deployed(configs.get(*n), name, view.spec_generation))
        .count();
    let untraceable = if view.untraceable_pods.is_empty() {
        String::new()
    } else {
        format!(
            "; {} selected pod(s) use the host network and are not traced (their traffic is the node's): {}",
            view.untraceable_pods.len(),
            view.untraceable_pods
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    let (ready, r, m) = match &view.error {
        Some(e) if view.spec_generation > 0 => (
            false,
            reason::INVALID_SPEC,
            format!("{e}; generation {} stays in force", view.spec_generation),
        ),
        Some(e) => (false, reason::INVALID_SPEC, e.to_string()),
        None if selected == 0 => (
            false,
            reason::NO_PODS_SELECTED,
            format!("no running pod with an IP matches the selection{untraceable}"),
        ),
        None if deployed_on < selected as usize => (
            false,
            reason::DEPLOYING,
            format!("{deployed_on} of {selected} node(s) run this observation{untraceable}"),
        ),
        None => match result.filter(|r| r.folded_series > 0) {
            Some(r) => (
                true,
                reason::SERIES_BUDGET_EXCEEDED,
                format!(
                    "observing {} pod(s) on {selected} node(s); the last window had more series than maxSeries ({}): {} folded into 'other'{untraceable}",
                    view.traced_pods, r.max_series, r.folded_series
                ),
            ),
            None => (
                true,
                reason::OBSERVING,
                format!(
                    "observing {} pod(s) on {selected} node(s){untraceable}",
                    view.traced_pods
                ),
            ),
        },
    };
    conditions::set(
        &mut s.conditions,
        conditions::READY,
        ready,
        r,
        m,
        generation,
        now,
    );
    let reporting = result
        .map(|r| r.nodes_reporting)
        .or(s.nodes.as_ref().map(|n| n.reporting))
        .unwrap_or(0);
    s.nodes = Some(ObservationNodes {
        selected,
        reporting,
    });
    s.pods = Some(ObservationPods {
        traced: view.traced_pods as u32,
        untraceable: view.untraceable_pods.len() as u32,
    });
    if let Some(r) = result {
        r.write_into(&mut s);
    }
    let summary = s.summary.get_or_insert_with(ObservationSummary::default);
    summary.nodes = format!(
        "{}/{selected}",
        s.nodes.as_ref().map(|n| n.reporting).unwrap_or(0)
    );
    if summary.throughput.is_empty() {
        summary.throughput = "-".into();
        summary.rtt_p50 = "-".into();
        summary.rtt_p99 = "-".into();
    }
    s
}

fn configs_by_node(store: &Store<NodeAgentConfig>) -> BTreeMap<String, Arc<NodeAgentConfig>> {
    store
        .state()
        .into_iter()
        .map(|n| (n.name_any(), n))
        .collect()
}

#[instrument(skip(obs, ctx), fields(observation = %obs.name_any()))]
async fn reconcile(obs: Arc<NetworkObservation>, ctx: Arc<Context>) -> Result<Action> {
    // See policy_status: never report a partial view.
    if !ctx.sync.is_synced() {
        return Ok(Action::requeue(Duration::from_millis(500)));
    }
    let started = std::time::Instant::now();
    ctx.metrics
        .reconciles
        .get_or_create(&ControllerLabels {
            controller: CONTROLLER,
        })
        .inc();
    let name = obs.name_any();

    let Some(view) = ctx.with_compiler(|c| c.observation_view(&name)) else {
        return Ok(Action::await_change());
    };
    let uid = obs.uid().unwrap_or_default();
    let result = ctx.results.latest(&uid);
    let current = obs.status.clone().unwrap_or_default();
    let status = observation_status(
        &name,
        &view,
        &configs_by_node(&ctx.configs),
        result.as_ref(),
        &current,
        Timestamp::now(),
    );
    if status != current {
        let api: Api<NetworkObservation> = Api::all(ctx.client.clone());
        let patch = serde_json::json!({"apiVersion": "flowlens.dev/v1alpha1", "kind": "NetworkObservation", "status": status});
        api.patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
        ctx.metrics.wrote("networkobservations/status", "apply");
        tracing::debug!(before = ?current, after = ?status, "wrote NetworkObservation status");

        if let Some(r) = &result {
            ctx.results.committed(&uid, r.end);
        }
    } else if let Some(r) = &result {
        ctx.results.committed(&uid, r.end);
    }
    ctx.metrics
        .reconcile_seconds
        .get_or_create(&ControllerLabels {
            controller: CONTROLLER,
        })
        .observe(started.elapsed().as_secs_f64());
    Ok(Action::await_change())
}

fn error_policy(_: Arc<NetworkObservation>, e: &Error, ctx: Arc<Context>) -> Action {
    warn!(error = %e, "NetworkObservation status reconcile failed");
    ctx.metrics
        .reconcile_errors
        .get_or_create(&ErrorLabels {
            controller: CONTROLLER,
            reason: e.metric_label(),
        })
        .inc();
    Action::requeue(Duration::from_secs(5))
}

/// Runs the controller until the process ends.
pub async fn run(
    ctx: Arc<Context>,
    nacs: impl futures::Stream<Item = Arc<NodeAgentConfig>> + Send + 'static,
    triggers: impl futures::Stream<Item = String> + Send + 'static,
) {
    let api: Api<NetworkObservation> = Api::all(ctx.client.clone());
    let (reader, writer) = reflector::store();
    let observations = watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(predicates::generation, Default::default());
    Controller::for_stream(observations, reader)
        .watches_shared_stream(nacs, |nac| {
            nac.spec
                .observations
                .iter()
                .map(|o| ObjectRef::new(&o.name))
                .collect::<Vec<_>>()
        })
        .reconcile_on(triggers.map(|name| ObjectRef::new(&name)))
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "NetworkObservation controller event");
            }
        })
        .await;
    info!("NetworkObservation status controller stopped");
}
