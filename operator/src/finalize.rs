//! Window finalisation: once a second, final windows are taken from the
//! collector's books, merged ([`crate::collect::merge`]) and queued in
//! [`crate::results`], and the status controllers are woken.

use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
    sync::Arc,
    time::Duration,
};

use tracing::debug;

use crate::{
    collect::{
        Directory,
        attempts::{PeerNames, name_attempts},
        merge::{MergeParams, merge_window},
    },
    collector::{Collector, now_ms},
    compile::{Compiler, Observation},
    context::Context,
    model::{NodeInfo, PodInfo},
};

/// How often due windows are finalized.
const FINALIZE_EVERY: Duration = Duration::from_secs(1);

/// One observation as [`crate::collect::merge`] sees the cluster.
struct ObservationDirectory<'a> {
    compiler: &'a Compiler,
    observation: &'a Observation,
}

impl Directory for ObservationDirectory<'_> {
    fn pod(&self, ip: &IpAddr) -> Option<&PodInfo> {
        self.compiler.pod_by_ip(ip)
    }

    fn node(&self, ip: &IpAddr) -> Option<&NodeInfo> {
        self.compiler.node_by_address(ip)
    }

    fn traced(&self, ip: &IpAddr) -> bool {
        self.compiler
            .pod_by_ip(ip)
            .is_some_and(|p| self.observation.selected.contains(&p.key()))
    }

    fn zone(&self, node: &str) -> Option<&str> {
        self.compiler.node(node).and_then(|n| n.zone.as_deref())
    }
}

/// Names the peers of blocked and audited attempts.
struct PolicyPeers<'a> {
    compiler: &'a Compiler,
}

impl PeerNames for PolicyPeers<'_> {
    fn name(&self, ip: &IpAddr) -> Option<String> {
        peer_name(self.compiler, ip)
    }
}

/// A peer address as the cluster names it: `namespace/pod`, `node/<name>`,
/// `service/<namespace>/<name>`.
pub(crate) fn peer_name(compiler: &Compiler, ip: &IpAddr) -> Option<String> {
    if let Some(p) = compiler.pod_by_ip(ip) {
        return Some(format!("{}/{}", p.namespace, p.name));
    }
    if let Some(n) = compiler.node_by_address(ip) {
        return Some(format!("node/{}", n.name));
    }
    compiler
        .service_by_ip(ip)
        .map(|s| format!("service/{}/{}", s.namespace, s.name))
}

/// Finalizes due windows once a second: merges them and wakes the status
/// controllers.
pub async fn finalize_loop(ctx: Arc<Context>, collector: Arc<Collector>) {
    let mut tick = tokio::time::interval(FINALIZE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if ctx.sync.is_synced() {
            finalize_due(&ctx, &collector, now_ms());
        }
    }
}

/// Merges every final window and hands the results to the status writers.
fn finalize_due(ctx: &Context, collector: &Collector, now: i64) {
    // Deadlines wait while reports cannot be verified (an API-server
    // outage): see collect::deadline_clock.
    let now = {
        let clock = collector
            .deadline_clock
            .lock()
            .expect("deadline clock lock");
        ctx.metrics
            .deadlines_paused
            .set(i64::from(clock.paused(now)));
        clock.now(now)
    };
    let c = ctx.compiler.lock().expect("compiler lock");
    // Observations: expected nodes, by UID.
    let by_uid: HashMap<&str, &Observation> =
        c.observations().map(|o| (o.uid.as_str(), o)).collect();
    let expected: HashMap<&str, BTreeSet<String>> = by_uid
        .iter()
        .map(|(uid, o)| (*uid, o.by_node.keys().cloned().collect()))
        .collect();
    let finals = {
        let mut book = collector.observations.lock().expect("book lock");
        let finals = book.take_final(now, |uid| expected.get(uid));
        for uid in book.uids() {
            if !by_uid.contains_key(uid.as_str()) {
                book.forget(&uid);
                ctx.results.forget(&uid);
            }
        }
        ctx.metrics.open_parts.set(book.open_parts() as i64);
        finals
    };
    let mut wake_observations = BTreeSet::new();
    for w in finals {
        let Some(obs) = by_uid.get(w.uid.as_str()) else {
            continue;
        };
        let Some(spec) = &obs.spec else { continue };
        let params = MergeParams {
            group_by: &spec.group_by,
            keep_labels: &spec.keep_labels,
            top_n: spec.top_n as usize,
            max_series: spec.max_series as usize,
        };
        let dir = ObservationDirectory {
            compiler: &c,
            observation: obs,
        };
        let started = std::time::Instant::now();
        let (r, flows) = merge_window(w.start, w.end, &w.parts, &params, &dir);
        ctx.metrics
            .merge_seconds
            .observe(started.elapsed().as_secs_f64());
        debug!(observation = %obs.name, start = w.start, end = w.end, nodes = r.nodes_reporting, bytes = r.bytes, "window final");
        ctx.metrics.windows_finalized.inc();
        ctx.metrics
            .results
            .record_window(&w.uid, &obs.name, params.max_series, &r, &flows);
        ctx.results.publish(&w.uid, r);
        wake_observations.insert(obs.name.clone());
    }
    // Policies.
    let deltas = {
        let mut book = collector.policies.lock().expect("book lock");
        let d = book.take_final(now);
        (d, book.finalized_through())
    };
    let (deltas, through) = deltas;
    let mut wake_policies = BTreeSet::new();
    let names = PolicyPeers { compiler: &c };
    let known: Vec<_> = deltas
        .into_iter()
        .filter(|(k, _)| c.policy(k).is_some())
        .inspect(|(k, _)| {
            wake_policies.insert(k.clone());
        })
        .map(|(k, mut d)| {
            d.top = name_attempts(&std::mem::take(&mut d.attempts), &names);
            (k, d)
        })
        .collect();
    ctx.policy_results.retain(|k| c.policy(k).is_some());
    ctx.metrics.results.record_policies(&known);
    ctx.metrics
        .results
        .retain(|uid| by_uid.contains_key(uid), |k| c.policy(k).is_some());
    drop(c);
    ctx.policy_results.publish(known, through);
    // Policies whose counts did not make it (a failed write) are retried.
    wake_policies.extend(ctx.policy_results.waiting());
    for name in wake_observations {
        let _ = ctx.triggers.observations.send(name);
    }
    for key in wake_policies {
        let _ = ctx.triggers.policies.send(key);
    }
}
