//! `NetworkObservation` status: whether the observation is valid and
//! deployed, where, and (from agents' reports) what it observed.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use flowlens_api::{
    NetworkObservation, NodeAgentConfig,
    conditions::{self, reason},
    format,
    network_observation::{
        NetworkObservationStatus, ObservationNodes, ObservationPods, ObservationSummary,
        SeriesUsage, TrafficTotal, WindowTraffic,
    },
};
use futures::StreamExt;
use k8s_openapi::jiff::Timestamp;
use kube::{
    Api, ResourceExt,
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
    collect::merge::WindowResult,
    compile::ObservationView,
    context::Context,
    error::{Error, Result},
    status_apply::{apply_status, time},
};

const CONTROLLER: &str = "networkobservation-status";

/// Whether `node`'s agent runs the observation at `generation` (so an
/// unrelated config change, a pod coming or going, never makes it look
/// undeployed while the agent applies the new revision).
fn deployed(nac: Option<&Arc<NodeAgentConfig>>, name: &str, generation: i64) -> bool {
    nac.and_then(|n| n.status.as_ref()).is_some_and(|s| {
        s.observations
            .iter()
            .any(|o| o.name == name && o.generation == generation)
    })
}

/// Writes a final window's figures into a status. `total` grows only when
/// this window is newer than the one the status already shows, so rewriting
/// (after an operator restart, or a retried write) never counts it twice.
fn write_window(r: &WindowResult, s: &mut NetworkObservationStatus) {
    let shown_end = s.last_window.as_ref().map(|w| w.end.0.as_second());
    if shown_end.is_some_and(|e| e >= r.end) {
        return;
    }
    let secs = (r.end - r.start).max(1) as u64;
    s.last_window = Some(WindowTraffic {
        start: time(r.start),
        end: time(r.end),
        flows: r.flows,
        packets: r.packets,
        bytes: r.bytes,
        payload_bytes: r.payload_bytes,
        bytes_per_second: r.bytes / secs,
        packets_per_second: r.packets / secs,
        cross_zone_bytes: r.cross_zone_bytes,
        retransmits: r.retransmits,
        drops: r.drops,
    });
    let total = s.total.get_or_insert_with(|| TrafficTotal {
        since: Some(time(r.start)),
        ..Default::default()
    });
    // Saturating: the figures add up reports' counts.
    total.packets = total.packets.saturating_add(r.packets);
    total.bytes = total.bytes.saturating_add(r.bytes);
    total.payload_bytes = total.payload_bytes.saturating_add(r.payload_bytes);
    total.cross_zone_bytes = total.cross_zone_bytes.saturating_add(r.cross_zone_bytes);
    total.windows = total.windows.saturating_add(1);
    s.latency = r.latency.clone();
    s.dns = r.dns.as_ref().map(crate::collect::merge::dns_status);
    s.top_flows = r.top_flows.clone();
    s.series = Some(SeriesUsage {
        series: r.series,
        max_series: r.max_series,
        folded: r.folded_series,
    });
    let summary = s.summary.get_or_insert_with(ObservationSummary::default);
    summary.throughput = format::rate(r.bytes as f64 / secs as f64);
    match &r.latency {
        Some(l) if l.samples > 0 => {
            summary.rtt_p50 = format::micros(l.p50_micros);
            summary.rtt_p99 = format::micros(l.p99_micros);
        }
        _ => {
            summary.rtt_p50 = "-".into();
            summary.rtt_p99 = "-".into();
        }
    }
}

/// Applies final windows (oldest first) to a status.
fn write_windows(results: &[WindowResult], s: &mut NetworkObservationStatus) {
    for r in results {
        write_window(r, s);
    }
}

/// Ready: the spec is valid and the observation runs on every selected
/// node (`deployed_on` of `selected`); the reason also tells a window that
/// exceeded `maxSeries`.
fn ready(
    view: &ObservationView,
    s: &NetworkObservationStatus,
    selected: u32,
    deployed_on: usize,
) -> (bool, &'static str, String) {
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
    match &view.error {
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
        None => match s.series.as_ref().filter(|u| u.folded > 0) {
            Some(u) => (
                true,
                reason::SERIES_BUDGET_EXCEEDED,
                format!(
                    "observing {} pod(s) on {selected} node(s); the last window had more series than maxSeries ({}): {} folded into 'other'{untraceable}",
                    view.traced_pods, u.max_series, u.folded
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
    }
}

/// The status of an observation. `results` are final windows not yet in
/// status, oldest first; fields they do not cover are kept from `current`.
pub(crate) fn observation_status(
    name: &str,
    view: &ObservationView,
    configs: &BTreeMap<String, Arc<NodeAgentConfig>>,
    results: &[WindowResult],
    current: &NetworkObservationStatus,
    now: Timestamp,
) -> NetworkObservationStatus {
    let mut s = current.clone();
    let result = results.last();
    // Window figures first: conditions describe the window status shows.
    write_windows(results, &mut s);
    let generation = Some(view.generation);
    s.observed_generation = generation;
    let selected = view.selected_nodes.len() as u32;
    let deployed_on = view
        .selected_nodes
        .iter()
        .filter(|n| deployed(configs.get(*n), name, view.spec_generation))
        .count();
    let (ready, r, m) = ready(view, &s, selected, deployed_on);
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
    ctx.metrics.reconciling(CONTROLLER);
    let name = obs.name_any();

    let Some(view) = ctx.with_compiler(|c| c.observation_view(&name)) else {
        return Ok(Action::await_change());
    };
    let uid = obs.uid().unwrap_or_default();
    let results = ctx.results.pending(&uid);
    // The cached object may be older than the last status written (see
    // StatusMemory): never compute figures from it then.
    let current = ctx
        .observation_statuses
        .base(&uid, obs.status.clone().unwrap_or_default());
    let status = observation_status(
        &name,
        &view,
        &configs_by_node(&ctx.configs),
        &results,
        &current,
        Timestamp::now(),
    );
    if status != current {
        let api: Api<NetworkObservation> = Api::all(ctx.client.clone());
        apply_status(
            &api,
            &name,
            &status,
            &ctx.metrics,
            "networkobservations/status",
        )
        .await?;
        tracing::debug!(before = ?current, after = ?status, "wrote NetworkObservation status");
        ctx.observation_statuses.wrote(&uid, status);
    }
    // In status now (written, or already there): the windows are committed.
    if let Some(r) = results.last() {
        ctx.results.committed(&uid, r.end);
    }
    ctx.metrics.reconciled(CONTROLLER, started);
    Ok(Action::await_change())
}

fn error_policy(_: Arc<NetworkObservation>, e: &Error, ctx: Arc<Context>) -> Action {
    warn!(error = %e, "NetworkObservation status reconcile failed");
    ctx.metrics.failed(CONTROLLER, e.metric_label());
    Action::requeue(Duration::from_secs(5))
}

/// `(name, generation)` of the observations in a config's spec and in its
/// agent's status.
type ObservationFacts = (BTreeSet<(String, i64)>, BTreeSet<(String, i64)>);

fn observation_facts(nac: &NodeAgentConfig) -> ObservationFacts {
    (
        nac.spec
            .observations
            .iter()
            .map(|o| (o.name.clone(), o.generation))
            .collect(),
        nac.status
            .iter()
            .flat_map(|s| &s.observations)
            .map(|o| (o.name.clone(), o.generation))
            .collect(),
    )
}

/// The observations whose status a change of one node's config can change.
fn affected_observations(
    prev: Option<&ObservationFacts>,
    next: &ObservationFacts,
) -> BTreeSet<String> {
    let empty = ObservationFacts::default();
    let prev = prev.unwrap_or(&empty);
    prev.0
        .symmetric_difference(&next.0)
        .chain(prev.1.symmetric_difference(&next.1))
        .map(|(n, _)| n.clone())
        .collect()
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
        .backoff(crate::feed::watch_backoff())
        .reflect(writer)
        .applied_objects()
        .predicate_filter(predicates::generation, Default::default());
    let seen: std::sync::Mutex<std::collections::HashMap<String, ObservationFacts>> =
        Default::default();
    Controller::for_stream(observations, reader)
        .watches_shared_stream(nacs, move |nac| {
            let facts = observation_facts(&nac);
            let mut seen = seen.lock().expect("facts lock");
            let affected = affected_observations(seen.get(&nac.name_any()), &facts);
            seen.insert(nac.name_any(), facts);
            affected
                .into_iter()
                .map(|n| ObjectRef::new(&n))
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

#[cfg(test)]
mod tests {
    use flowlens_api::{
        conditions::get,
        node_agent_config::{
            NodeAgentConfigSpec, NodeAgentConfigStatus, ObservationConfig, ObservationRef,
        },
    };

    use super::*;

    fn view() -> ObservationView {
        ObservationView {
            generation: 2,
            spec_generation: 2,
            window_seconds: 10,
            selected_nodes: ["n1".to_string()].into(),
            traced_pods: 3,
            ..Default::default()
        }
    }

    fn deployed_configs() -> BTreeMap<String, Arc<NodeAgentConfig>> {
        let mut n = NodeAgentConfig::new(
            "n1",
            NodeAgentConfigSpec {
                node_name: "n1".into(),
                revision: "r1".into(),
                observations: vec![ObservationConfig {
                    name: "o".into(),
                    generation: 2,
                    ..Default::default()
                }],
                ..Default::default()
            },
        );
        n.status = Some(NodeAgentConfigStatus {
            applied_revision: Some("r1".into()),
            observations: vec![ObservationRef {
                name: "o".into(),
                generation: 2,
            }],
            ..Default::default()
        });
        [("n1".to_string(), Arc::new(n))].into()
    }

    fn window(start: i64, folded: u64) -> WindowResult {
        WindowResult {
            start,
            end: start + 10,
            nodes_reporting: 1,
            bytes: 1000,
            packets: 10,
            series: 2,
            max_series: 2,
            folded_series: folded,
            ..Default::default()
        }
    }

    #[test]
    fn the_budget_condition_follows_the_window_status_shows() {
        let cfgs = deployed_configs();
        let now = Timestamp::now();
        let s = observation_status(
            "o",
            &view(),
            &cfgs,
            &[window(100, 3)],
            &Default::default(),
            now,
        );
        let ready = get(&s.conditions, "Ready").unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("True", "SeriesBudgetExceeded")
        );
        // Another reconcile without a new window (a config changed) keeps it.
        let again = observation_status("o", &view(), &cfgs, &[], &s, now);
        assert_eq!(again, s, "nothing new, nothing to write");
        // The next window is within budget.
        let next = observation_status("o", &view(), &cfgs, &[window(110, 0)], &s, now);
        assert_eq!(get(&next.conditions, "Ready").unwrap().reason, "Observing");
        assert_eq!(next.total.as_ref().unwrap().bytes, 2000);
        assert_eq!(next.summary.as_ref().unwrap().nodes, "1/1");
    }

    #[test]
    fn totals_count_each_window_once() {
        let w = |start: i64, bytes: u64| WindowResult {
            start,
            end: start + 10,
            packets: 1,
            bytes,
            ..Default::default()
        };
        let mut s = NetworkObservationStatus::default();
        write_window(&w(100, 1000), &mut s);
        write_window(&w(100, 1000), &mut s);
        assert_eq!(
            s.total.as_ref().unwrap().bytes,
            1000,
            "a window written twice counts once"
        );
        write_window(&w(110, 500), &mut s);
        let t = s.total.as_ref().unwrap();
        assert_eq!((t.bytes, t.packets, t.windows), (1500, 2, 2));
        assert_eq!(s.last_window.as_ref().unwrap().bytes_per_second, 50);
        assert_eq!(s.summary.as_ref().unwrap().throughput, "50 B/s");
        write_window(&w(100, 9999), &mut s);
        assert_eq!(
            s.total.as_ref().unwrap().bytes,
            1500,
            "an older window is ignored"
        );
    }

    #[test]
    fn deploying_until_every_node_applied_it() {
        let mut cfgs = deployed_configs();
        let mut n = (*cfgs["n1"]).clone();
        n.status.as_mut().unwrap().observations[0].generation = 1;
        cfgs.insert("n1".into(), Arc::new(n));
        let s = observation_status(
            "o",
            &view(),
            &cfgs,
            &[],
            &Default::default(),
            Timestamp::now(),
        );
        let ready = get(&s.conditions, "Ready").unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "Deploying")
        );
        assert_eq!(s.summary.as_ref().unwrap().throughput, "-");
    }
}
