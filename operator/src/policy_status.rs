//! `FlowPolicy` status: what is in force where, told truthfully.
//!
//! `Ready` says whether the spec is valid and compiled; `Enforced` whether
//! every targeted node's agent reports this revision applied; `Degraded`
//! names the nodes and pods where enforcement is partial.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use flowlens_api::{
    FlowPolicy, NodeAgentConfig,
    conditions::{self, reason},
    flow_policy::{FlowPolicyStatus, PolicyNodes, PolicyPods, PolicySummary},
};
use futures::StreamExt;
use k8s_openapi::jiff::Timestamp;
use kube::{
    Api, Resource, ResourceExt,
    runtime::{
        Controller, WatchStreamExt,
        controller::Action,
        events::{Event, EventType},
        predicates, reflector,
        reflector::{ObjectRef, Store},
        watcher,
    },
};
use tracing::{info, instrument, warn};

use crate::{
    collect::policy_book::PolicyDelta,
    compile::PolicyView,
    context::Context,
    error::{Error, Result},
    status_apply::{apply_status, time},
};

const CONTROLLER: &str = "flowpolicy-status";

/// Names in messages are cut after this many.
const LIST_LIMIT: usize = 5;

fn list(items: &[String]) -> String {
    let mut s = items
        .iter()
        .take(LIST_LIMIT)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if items.len() > LIST_LIMIT {
        s.push_str(&format!(" and {} more", items.len() - LIST_LIMIT));
    }
    s
}

/// Applies final policy-counter windows to a status: windows that end after
/// `countedUntil` are added, so replaying one (after an operator restart)
/// never counts it twice.
pub(crate) fn write_policy_counts(deltas: &[PolicyDelta], s: &mut FlowPolicyStatus) {
    for d in deltas {
        let shown = s.counted_until.as_ref().map(|t| t.0.as_second());
        if shown.is_some_and(|e| e >= d.end) {
            continue;
        }
        if !d.top.is_empty() || !s.top_blocked.is_empty() {
            s.top_blocked =
                crate::collect::attempts::merge_top(&s.top_blocked, d.top.clone(), d.end);
        }
        let b = s.blocked.get_or_insert_with(Default::default);
        // Saturating: the counters add up reports' counts.
        b.packets = b.packets.saturating_add(d.blocked.packets);
        b.connections = b.connections.saturating_add(d.blocked.connections);
        let a = s.audited.get_or_insert_with(Default::default);
        a.packets = a.packets.saturating_add(d.audited.packets);
        a.connections = a.connections.saturating_add(d.audited.connections);
        s.counted_until = Some(time(d.end));
    }
}

/// A condition's status, reason and message.
type Verdict = (bool, &'static str, String);

/// The status of a policy, from the compiler's view and the agents' reports
/// (`configs`: node name -> its NodeAgentConfig). Keeps `current`'s match
/// counters and condition transition times.
pub(crate) fn policy_status(
    namespace: &str,
    name: &str,
    view: &PolicyView,
    configs: &BTreeMap<String, Arc<NodeAgentConfig>>,
    current: &FlowPolicyStatus,
    now: Timestamp,
) -> FlowPolicyStatus {
    let mut s = current.clone();
    let generation = Some(view.generation);
    s.observed_generation = generation;
    s.revision = view.revision.clone();
    let nodes = NodeStates::of(namespace, name, view, configs);
    for (type_, (status, reason, message)) in [
        (conditions::READY, ready(view)),
        (conditions::ENFORCED, enforced(view, &nodes)),
        (conditions::DEGRADED, degraded(view, &nodes)),
    ] {
        conditions::set(
            &mut s.conditions,
            type_,
            status,
            reason,
            message,
            generation,
            now,
        );
    }
    let targeted = view.targeted_nodes.len();
    s.nodes = Some(PolicyNodes {
        targeted: targeted as u32,
        enforcing: nodes.enforcing.len() as u32,
    });
    s.pods = Some(PolicyPods {
        selected: view.selected_pods as u32,
        unenforceable: view.unenforceable_pods.len() as u32,
    });
    s.summary = Some(PolicySummary {
        nodes: format!("{}/{targeted}", nodes.enforcing.len()),
    });
    s
}

/// Rollout progress ("k of N nodes") is written at most this often per
/// policy. Flips of a condition, new counts and the end of a rollout are
/// written at once.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(10);

/// Policies remembered by [`ProgressThrottle`], at most (beyond, it
/// forgets: a write comes a little early).
const PROGRESS_REMEMBERED: usize = 100_000;

/// Whether `after` differs from `before` only in rollout progress: how many
/// nodes enforce, and the message of an Enforced condition whose status and
/// reason stay the same.
pub(crate) fn progress_only(before: &FlowPolicyStatus, after: &FlowPolicyStatus) -> bool {
    let mut a = after.clone();
    a.nodes = before.nodes.clone();
    a.summary = before.summary.clone();
    if let (Some(b), Some(c)) = (
        conditions::get(&before.conditions, conditions::ENFORCED),
        a.conditions
            .iter_mut()
            .find(|c| c.type_ == conditions::ENFORCED),
    ) && b.status == c.status
        && b.reason == c.reason
    {
        c.message = b.message.clone();
    }
    a == *before
}

/// When each policy's status was last written, to space out writes of
/// rollout progress.
#[derive(Default)]
pub struct ProgressThrottle {
    written: Mutex<HashMap<String, Instant>>,
}

impl ProgressThrottle {
    /// How long a progress-only write of `uid` must wait, if at all.
    pub(crate) fn wait(&self, uid: &str, now: Instant) -> Option<Duration> {
        let m = self.written.lock().expect("progress throttle lock");
        let last = *m.get(uid)?;
        PROGRESS_INTERVAL
            .checked_sub(now.saturating_duration_since(last))
            .filter(|d| !d.is_zero())
    }

    pub(crate) fn wrote(&self, uid: &str, now: Instant) {
        let mut m = self.written.lock().expect("progress throttle lock");
        if m.len() >= PROGRESS_REMEMBERED && !m.contains_key(uid) {
            m.clear();
        }
        m.insert(uid.to_owned(), now);
    }
}

/// Ready: the spec is valid and compiled.
fn ready(view: &PolicyView) -> Verdict {
    match (&view.error, &view.revision) {
        (Some(e), Some(rev)) => (
            false,
            reason::INVALID_SPEC,
            format!("{e}; the previous valid revision {rev} stays in force"),
        ),
        (Some(e), None) => (false, reason::INVALID_SPEC, e.to_string()),
        (None, _) => (
            true,
            reason::COMPILED,
            format!(
                "compiled for {} pod(s) on {} node(s)",
                view.selected_pods,
                view.targeted_nodes.len()
            ),
        ),
    }
}

/// Where the policy's revision is applied, from the agents' reports.
struct NodeStates {
    enforcing: Vec<String>,
    waiting: Vec<String>,
    /// `node <name>: <reason>: <message>` of degraded nodes.
    degraded: Vec<String>,
}

impl NodeStates {
    fn of(
        namespace: &str,
        name: &str,
        view: &PolicyView,
        configs: &BTreeMap<String, Arc<NodeAgentConfig>>,
    ) -> Self {
        let mut n = NodeStates {
            enforcing: Vec::new(),
            waiting: Vec::new(),
            degraded: Vec::new(),
        };
        for node in &view.targeted_nodes {
            let status = configs.get(node).and_then(|n| n.status.as_ref());
            let applied = status.is_some_and(|st| {
                st.policies.iter().any(|p| {
                    p.namespace == namespace
                        && p.name == name
                        && Some(&p.revision) == view.revision.as_ref()
                })
            });
            if applied {
                n.enforcing.push(node.clone());
            } else {
                n.waiting.push(node.clone());
            }
            // The agent applied the revision but cannot say it is in force
            // (programs not attached, rules left out, an old kernel).
            if let Some(p) = status.and_then(|st| {
                st.policies_not_in_force.iter().find(|p| {
                    p.policy.namespace == namespace
                        && p.policy.name == name
                        && Some(&p.policy.revision) == view.revision.as_ref()
                })
            }) {
                n.degraded
                    .push(format!("node {node}: {}: {}", p.reason, p.message));
            }
            // A node degraded only because some policies do not fit its
            // tables names those in `policiesNotInForce` (above); the
            // others are in force there. (The agent puts that reason first
            // only when it is the node's only kind of problem.)
            if let Some(c) = status
                .and_then(|st| conditions::get(&st.conditions, conditions::DEGRADED))
                .filter(|c| c.status == "True" && c.reason != reason::POLICY_TABLE_FULL)
            {
                n.degraded
                    .push(format!("node {node}: {}: {}", c.reason, c.message));
            }
        }
        n
    }
}

/// Enforced: each targeted node's agent reports this revision applied.
fn enforced(view: &PolicyView, nodes: &NodeStates) -> Verdict {
    let targeted = view.targeted_nodes.len();
    match (targeted, nodes.waiting.is_empty(), &view.revision) {
        (0, _, _) => (
            false,
            reason::NO_TARGETS,
            "no running pod with an IP matches podSelector: nothing to enforce".to_owned(),
        ),
        (_, true, Some(rev)) => (
            true,
            reason::ENFORCED,
            format!("revision {rev} is in force on {targeted} node(s)"),
        ),
        _ => (
            false,
            reason::PENDING,
            format!(
                "{} of {targeted} node(s) enforce revision {}; waiting for: {}",
                nodes.enforcing.len(),
                view.revision.as_deref().unwrap_or("-"),
                list(&nodes.waiting)
            ),
        ),
    }
}

/// Degraded: host-network pods (cannot be isolated) and degraded nodes.
fn degraded(view: &PolicyView, nodes: &NodeStates) -> Verdict {
    let degraded = &nodes.degraded;
    if !view.unenforceable_pods.is_empty() {
        let mut m = format!(
            "{} selected pod(s) use the host network and cannot be isolated per pod (not enforced for them): {}",
            view.unenforceable_pods.len(),
            list(&view.unenforceable_pods)
        );
        if !degraded.is_empty() {
            m.push_str(&format!("; {}", list(degraded)));
        }
        (true, reason::HOST_NETWORK_POD, m)
    } else if !degraded.is_empty() {
        (true, reason::NODE_DEGRADED, list(degraded))
    } else {
        (
            false,
            reason::AS_EXPECTED,
            "enforced as specified wherever it applies".to_owned(),
        )
    }
}

fn configs_by_node(store: &Store<NodeAgentConfig>) -> BTreeMap<String, Arc<NodeAgentConfig>> {
    store
        .state()
        .into_iter()
        .map(|n| (n.name_any(), n))
        .collect()
}

#[instrument(skip(policy, ctx), fields(policy = %format!("{}/{}", policy.namespace().unwrap_or_default(), policy.name_any())))]
async fn reconcile(policy: Arc<FlowPolicy>, ctx: Arc<Context>) -> Result<Action> {
    // Before every input is listed once, the compiler's view is partial:
    // reporting it would tell users a wrong story. The end of the initial
    // sync triggers every policy.
    if !ctx.sync.is_synced() {
        return Ok(Action::requeue(Duration::from_millis(500)));
    }
    let started = std::time::Instant::now();
    ctx.metrics.reconciling(CONTROLLER);
    let ns = policy.namespace().unwrap_or_default();

    let name = policy.name_any();
    let key = (ns.clone(), name.clone());
    let Some((view, in_force)) =
        ctx.with_compiler(|c| Some((c.policy_view(&key)?, c.policy_in_force(&key))))
    else {
        // Not compiled yet (or deleted): the compiler triggers us when it is.
        return Ok(Action::await_change());
    };
    // The cached object may be older than the last status written (see
    // StatusMemory): never compute counts from it then.
    let uid = policy.uid().unwrap_or_default();
    let current = ctx
        .policy_statuses
        .base(&uid, policy.status.clone().unwrap_or_default());
    let mut status = policy_status(
        &ns,
        &name,
        &view,
        &configs_by_node(&ctx.configs),
        &current,
        Timestamp::now(),
    );
    // The spec in force, so that a restarted operator keeps it when the
    // latest edit is invalid.
    status.in_force = in_force;
    let counts = ctx.policy_results.pending(&key);
    write_policy_counts(&counts, &mut status);
    if status != current {
        // During a rollout every node's acknowledgement changes "k of N":
        // written at most every PROGRESS_INTERVAL, the rest coalesced.
        if progress_only(&current, &status)
            && let Some(wait) = ctx.policy_progress.wait(&uid, Instant::now())
        {
            ctx.metrics.reconciled(CONTROLLER, started);
            return Ok(Action::requeue(wait));
        }
        publish_transitions(&ctx, &policy, &current, &status).await;
        let api: Api<FlowPolicy> = Api::namespaced(ctx.client.clone(), &ns);
        apply_status(&api, &name, &status, &ctx.metrics, "flowpolicies/status").await?;
        tracing::debug!(before = ?current, after = ?status, "wrote FlowPolicy status");
        ctx.policy_statuses.wrote(&uid, status);
        ctx.policy_progress.wrote(&uid, Instant::now());
    }
    if let Some(last) = counts.last() {
        ctx.policy_results.committed(&key, last.end);
    }
    ctx.metrics.reconciled(CONTROLLER, started);
    Ok(Action::await_change())
}

/// Kubernetes Events for the transitions that matter to a user.
async fn publish_transitions(
    ctx: &Context,
    policy: &FlowPolicy,
    before: &FlowPolicyStatus,
    after: &FlowPolicyStatus,
) {
    let flipped = |t: &str| {
        let b =
            conditions::get(&before.conditions, t).map(|c| (c.status.clone(), c.reason.clone()));
        let a = conditions::get(&after.conditions, t).map(|c| (c.status.clone(), c.reason.clone()));
        (b != a)
            .then(|| conditions::get(&after.conditions, t).cloned())
            .flatten()
    };
    let mut events = Vec::new();
    if let Some(c) = flipped(conditions::READY).filter(|c| c.status == "False") {
        events.push((EventType::Warning, c.reason, c.message));
    }
    if let Some(c) = flipped(conditions::ENFORCED).filter(|c| c.status == "True") {
        events.push((EventType::Normal, c.reason, c.message));
    }
    if let Some(c) = flipped(conditions::DEGRADED).filter(|c| c.status == "True") {
        events.push((EventType::Warning, c.reason, c.message));
    }
    for (type_, reason, note) in events {
        let ev = Event {
            type_,
            reason,
            note: Some(note),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&ev, &policy.object_ref(&())).await {
            warn!(error = %e, "cannot publish an Event");
        } else {
            ctx.metrics.wrote("events", "create");
            tracing::debug!(reason = %ev.reason, "published an Event");
        }
    }
}

fn error_policy(_: Arc<FlowPolicy>, e: &Error, ctx: Arc<Context>) -> Action {
    warn!(error = %e, "FlowPolicy status reconcile failed");
    ctx.metrics.failed(CONTROLLER, e.metric_label());
    Action::requeue(Duration::from_secs(5))
}

/// What of one NodeAgentConfig the status of its policies depends on.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct NodeFacts {
    /// `(namespace, name, revision)` in the spec, and applied by the agent.
    spec: BTreeSet<(String, String, String)>,
    applied: BTreeSet<(String, String, String)>,
    /// The Degraded condition (status, reason, message).
    degraded: Option<(String, String, String)>,
}

impl NodeFacts {
    pub(crate) fn of(nac: &NodeAgentConfig) -> Self {
        let refs = |v: &[flowlens_api::node_agent_config::PolicyRef]| {
            v.iter()
                .map(|p| (p.namespace.clone(), p.name.clone(), p.revision.clone()))
                .collect()
        };
        let status = nac.status.as_ref();
        NodeFacts {
            spec: refs(&nac.spec.policies),
            applied: status.map(|s| refs(&s.policies)).unwrap_or_default(),
            degraded: status
                .and_then(|s| conditions::get(&s.conditions, conditions::DEGRADED))
                .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone())),
        }
    }
}

/// The policies whose status a change of one node's config can change: a
/// config write for one policy must not wake every policy of the node.
pub(crate) fn affected_policies(
    prev: Option<&NodeFacts>,
    next: &NodeFacts,
) -> BTreeSet<(String, String)> {
    let empty = NodeFacts::default();
    let prev = prev.unwrap_or(&empty);
    let key = |(ns, n, _): &(String, String, String)| (ns.clone(), n.clone());
    if prev.degraded != next.degraded {
        return prev
            .spec
            .iter()
            .chain(&next.spec)
            .chain(&prev.applied)
            .chain(&next.applied)
            .map(key)
            .collect();
    }
    prev.spec
        .symmetric_difference(&next.spec)
        .chain(prev.applied.symmetric_difference(&next.applied))
        .map(key)
        .collect()
}

/// Runs until the process ends. `nacs` is a subscription to
/// the shared NodeAgentConfig stream; `triggers` carries policies whose
/// compiled state changed.
pub async fn run(
    ctx: Arc<Context>,
    nacs: impl futures::Stream<Item = Arc<NodeAgentConfig>> + Send + 'static,
    triggers: impl futures::Stream<Item = (String, String)> + Send + 'static,
) {
    let api: Api<FlowPolicy> = Api::all(ctx.client.clone());
    let (reader, writer) = reflector::store();
    // Status-only changes (our own writes) do not retrigger.
    let policies = watcher(api, watcher::Config::default())
        .backoff(crate::feed::watch_backoff())
        .reflect(writer)
        .applied_objects()
        .predicate_filter(predicates::generation, Default::default());
    let seen: std::sync::Mutex<std::collections::HashMap<String, NodeFacts>> = Default::default();
    Controller::for_stream(policies, reader)
        .watches_shared_stream(nacs, move |nac| {
            let facts = NodeFacts::of(&nac);
            let mut seen = seen.lock().expect("facts lock");
            let affected = affected_policies(seen.get(&nac.name_any()), &facts);
            seen.insert(nac.name_any(), facts);
            affected
                .into_iter()
                .map(|(ns, name)| ObjectRef::new(&name).within(&ns))
                .collect::<Vec<_>>()
        })
        .reconcile_on(triggers.map(|(ns, name)| ObjectRef::new(&name).within(&ns)))
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "FlowPolicy controller event");
            }
        })
        .await;
    info!("FlowPolicy status controller stopped");
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_config_change_wakes_only_the_policies_it_concerns() {
        let mut n = nac("n1", &[("shop", "a", "r1"), ("shop", "b", "r1")], None);
        let before = NodeFacts::of(&n);
        // The operator adds policy c to the spec.
        let nn = Arc::make_mut(&mut n);
        nn.spec.policies.push(PolicyRef {
            namespace: "shop".into(),
            name: "c".into(),
            revision: "r9".into(),
        });
        let after = NodeFacts::of(&n);
        assert_eq!(
            affected_policies(Some(&before), &after),
            [("shop".to_string(), "c".to_string())].into()
        );
        assert_eq!(affected_policies(Some(&after), &after), BTreeSet::new());
        // The node becomes degraded: every policy on it.
        let degraded = NodeFacts::of(&nac(
            "n1",
            &[("shop", "a", "r1"), ("shop", "b", "r1")],
            Some(("FlowTableFull", "full")),
        ));
        assert_eq!(affected_policies(Some(&before), &degraded).len(), 2);
    }

    use std::collections::BTreeSet;

    use flowlens_api::{
        conditions::get,
        node_agent_config::{NodeAgentConfigSpec, NodeAgentConfigStatus, PolicyRef},
        validate,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

    use super::*;

    fn nac(
        node: &str,
        policies: &[(&str, &str, &str)],
        degraded: Option<(&str, &str)>,
    ) -> Arc<NodeAgentConfig> {
        let mut n = NodeAgentConfig::new(
            node,
            NodeAgentConfigSpec {
                node_name: node.into(),
                revision: "r".into(),
                ..Default::default()
            },
        );
        let mut st = NodeAgentConfigStatus {
            policies: policies
                .iter()
                .map(|(ns, n, r)| PolicyRef {
                    namespace: ns.to_string(),
                    name: n.to_string(),
                    revision: r.to_string(),
                })
                .collect(),
            ..Default::default()
        };
        if let Some((reason, message)) = degraded {
            st.conditions.push(Condition {
                type_: "Degraded".into(),
                status: "True".into(),
                reason: reason.into(),
                message: message.into(),
                observed_generation: None,
                last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    Timestamp::UNIX_EPOCH,
                ),
            });
        }
        n.status = Some(st);
        Arc::new(n)
    }

    /// `n` with `name` of shop (revision rev1) not in force, for `reason`.
    fn not_in_force(
        mut n: Arc<NodeAgentConfig>,
        name: &str,
        reason: &str,
        message: &str,
    ) -> Arc<NodeAgentConfig> {
        Arc::make_mut(&mut n)
            .status
            .as_mut()
            .unwrap()
            .policies_not_in_force
            .push(flowlens_api::node_agent_config::PolicyNotInForce {
                policy: PolicyRef {
                    namespace: "shop".into(),
                    name: name.into(),
                    revision: "rev1".into(),
                },
                reason: reason.into(),
                message: message.into(),
            });
        n
    }

    fn view(nodes: &[&str]) -> PolicyView {
        PolicyView {
            revision: Some("rev1".into()),
            error: None,
            generation: 3,
            targeted_nodes: nodes.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>(),
            selected_pods: 4,
            unenforceable_pods: vec![],
        }
    }

    fn configs(v: Vec<Arc<NodeAgentConfig>>) -> BTreeMap<String, Arc<NodeAgentConfig>> {
        v.into_iter().map(|n| (n.name_any(), n)).collect()
    }

    #[test]
    fn enforced_when_every_targeted_node_applied_this_revision() {
        let cfgs = configs(vec![
            nac("n1", &[("shop", "p", "rev1")], None),
            nac("n2", &[("shop", "p", "rev0")], None),
        ]);
        let s = policy_status(
            "shop",
            "p",
            &view(&["n1", "n2"]),
            &cfgs,
            &Default::default(),
            Timestamp::now(),
        );
        let e = get(&s.conditions, "Enforced").unwrap();
        assert_eq!((e.status.as_str(), e.reason.as_str()), ("False", "Pending"));
        assert!(
            e.message.contains("1 of 2") && e.message.contains("n2"),
            "{}",
            e.message
        );
        assert_eq!(s.summary.as_ref().unwrap().nodes, "1/2");
        assert_eq!(s.observed_generation, Some(3));

        let cfgs = configs(vec![
            nac("n1", &[("shop", "p", "rev1")], None),
            nac("n2", &[("shop", "p", "rev1")], None),
        ]);
        let s2 = policy_status(
            "shop",
            "p",
            &view(&["n1", "n2"]),
            &cfgs,
            &s,
            Timestamp::now(),
        );
        assert_eq!(get(&s2.conditions, "Enforced").unwrap().status, "True");
        assert_eq!(
            s2.nodes,
            Some(PolicyNodes {
                targeted: 2,
                enforcing: 2
            })
        );
    }

    #[test]
    fn a_node_that_cannot_verify_its_attachments_is_not_counted_as_enforcing() {
        let n2 = not_in_force(
            nac("n2", &[], None),
            "p",
            "Unattached",
            "the kernel does not show the programs attached for 1 selected pod(s): shop/db-0",
        );
        let cfgs = configs(vec![nac("n1", &[("shop", "p", "rev1")], None), n2]);
        let s = policy_status(
            "shop",
            "p",
            &view(&["n1", "n2"]),
            &cfgs,
            &Default::default(),
            Timestamp::now(),
        );
        let e = get(&s.conditions, "Enforced").unwrap();
        assert_eq!((e.status.as_str(), e.reason.as_str()), ("False", "Pending"));
        let d = get(&s.conditions, "Degraded").unwrap();
        assert_eq!(d.status, "True");
        assert!(
            d.message.contains("node n2: Unattached") && d.message.contains("shop/db-0"),
            "{}",
            d.message
        );
    }

    /// A node whose tables left out policy q: q is Degraded naming the
    /// node, p (in force there) is not.
    #[test]
    fn a_full_policy_table_degrades_only_the_policies_left_out() {
        let msg = "the kernel's peer class table holds 32 entries per generation and the config needs 42; left out on this node: shop/q";
        let n1 = not_in_force(
            nac(
                "n1",
                &[("shop", "p", "rev1")],
                Some(("PolicyTableFull", msg)),
            ),
            "q",
            "PolicyTableFull",
            msg,
        );
        let cfgs = configs(vec![n1]);
        let status = |name: &str| {
            policy_status(
                "shop",
                name,
                &view(&["n1"]),
                &cfgs,
                &Default::default(),
                Timestamp::now(),
            )
        };
        let p = status("p");
        let d = get(&p.conditions, "Degraded").unwrap();
        assert_eq!(d.status, "False", "{}", d.message);
        assert_eq!(get(&p.conditions, "Enforced").unwrap().status, "True");
        let q = status("q");
        let d = get(&q.conditions, "Degraded").unwrap();
        assert!(
            d.status == "True" && d.message.contains("node n1: PolicyTableFull"),
            "{}",
            d.message
        );
        assert_eq!(get(&q.conditions, "Enforced").unwrap().status, "False");
    }

    /// Three of four nodes acknowledge one by one, then the fourth: the
    /// middle steps are progress only, the last flips Enforced.
    #[test]
    fn rollout_steps_are_progress_only_until_enforced_flips() {
        let nodes = ["n1", "n2", "n3", "n4"];
        let mut cfgs: Vec<Arc<NodeAgentConfig>> = nodes.iter().map(|n| nac(n, &[], None)).collect();
        let mut current = FlowPolicyStatus::default();
        let mut steps = Vec::new();
        for i in 0..=nodes.len() {
            if i > 0 {
                cfgs[i - 1] = nac(nodes[i - 1], &[("shop", "p", "rev1")], None);
            }
            let next = policy_status(
                "shop",
                "p",
                &view(&nodes),
                &configs(cfgs.clone()),
                &current,
                Timestamp::now(),
            );
            steps.push(progress_only(&current, &next));
            current = next;
        }
        assert_eq!(steps, vec![false, true, true, true, false]);
        assert_eq!(get(&current.conditions, "Enforced").unwrap().status, "True");

        // New counts are never held back.
        let mut counted = current.clone();
        counted.blocked = Some(Default::default());
        assert!(!progress_only(&current, &counted));
    }

    #[test]
    fn progress_is_written_at_most_every_interval() {
        let t = ProgressThrottle::default();
        let t0 = Instant::now();
        assert_eq!(t.wait("a", t0), None, "never written");
        t.wrote("a", t0);
        assert_eq!(
            t.wait("a", t0 + Duration::from_millis(500)),
            Some(PROGRESS_INTERVAL - Duration::from_millis(500))
        );
        assert_eq!(t.wait("a", t0 + PROGRESS_INTERVAL), None);
        assert_eq!(t.wait("b", t0), None, "per policy");
    }

    #[test]
    fn nothing_changes_when_nothing_changed() {
        let cfgs = configs(vec![nac("n1", &[("shop", "p", "rev1")], None)]);
        let s = policy_status(
            "shop",
            "p",
            &view(&["n1"]),
            &cfgs,
            &Default::default(),
            Timestamp::now(),
        );
        let again = policy_status("shop", "p", &view(&["n1"]), &cfgs, &s, Timestamp::now());
        assert_eq!(s, again, "an idle cluster must produce no status write");
    }

    #[test]
    fn invalid_specs_and_degraded_nodes_are_named() {
        let mut v = view(&["n1"]);
        let spec: flowlens_api::FlowPolicySpec =
            serde_yaml::from_str("podSelector: {}\negress: [{ports: [{port: 10, endPort: 5}]}]")
                .unwrap();
        v.error = validate::flow_policy(&spec).err();
        v.unenforceable_pods = vec!["shop/hostnet-1".into()];
        let cfgs = configs(vec![nac(
            "n1",
            &[("shop", "p", "rev1")],
            Some(("TooManyRules", "shop/web-1 has more than 64 Egress rules")),
        )]);
        let s = policy_status(
            "shop",
            "p",
            &v,
            &cfgs,
            &Default::default(),
            Timestamp::now(),
        );
        let r = get(&s.conditions, "Ready").unwrap();
        assert_eq!(
            (r.status.as_str(), r.reason.as_str()),
            ("False", "InvalidSpec")
        );
        assert!(
            r.message.contains("spec.egress[0].ports[0].endPort")
                && r.message.contains("rev1 stays in force"),
            "{}",
            r.message
        );
        let d = get(&s.conditions, "Degraded").unwrap();
        assert_eq!(d.reason, "HostNetworkPod");
        assert!(
            d.message.contains("shop/hostnet-1") && d.message.contains("node n1: TooManyRules"),
            "{}",
            d.message
        );
    }

    #[test]
    fn policy_counts_count_each_window_once() {
        let d = |end: i64, n: u64| PolicyDelta {
            end,
            blocked: flowlens_api::report::Matches {
                packets: n,
                connections: n,
            },
            ..Default::default()
        };
        let mut s = FlowPolicyStatus::default();
        write_policy_counts(&[d(110, 3), d(120, 4)], &mut s);
        write_policy_counts(&[d(120, 4)], &mut s);
        assert_eq!(s.blocked.as_ref().unwrap().connections, 7);
        assert_eq!(s.counted_until.as_ref().unwrap().0.as_second(), 120);
    }

    #[test]
    fn no_targets() {
        let s = policy_status(
            "shop",
            "p",
            &view(&[]),
            &BTreeMap::new(),
            &Default::default(),
            Timestamp::now(),
        );
        assert_eq!(get(&s.conditions, "Enforced").unwrap().reason, "NoTargets");
    }
}
