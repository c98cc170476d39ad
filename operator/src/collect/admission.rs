//! Admission of report parts: what a node may truthfully say, checked before
//! anything reaches the books. Pure, no I/O, unit-tested.
//!
//! A node reports only for itself (checked with its token, in
//! [`crate::collector`]); here each part is checked against the cluster as
//! the operator sees it ([`Scope`]) and the clock. Every refusal has a
//! [`Refusal`] reason. Two kinds:
//!
//! - **The whole batch is refused** (HTTP 422, nothing of it is stored) for
//!   what no agent of this version sends, whatever the cluster does: a
//!   window start not a multiple of its length
//!   ([`Refusal::MisalignedWindow`]; policy windows: of
//!   [`POLICY_WINDOW_SECONDS`]), a window length of zero
//!   ([`Refusal::WrongWindowSeconds`]), a window starting in the future
//!   beyond [`CLOCK_SKEW_S`] ([`Refusal::FutureWindow`]: the node's clock is
//!   wrong, which the agent's log must show), a string longer than
//!   [`MAX_FIELD_BYTES`] or more than [`MAX_LABELS`] labels
//!   ([`Refusal::FieldTooLong`]).
//! - **Only the offending part is dropped** (the rest of the batch is
//!   stored, the answer is 200) for what an honest agent can send while its
//!   config catches up with the cluster: a window length that is not the
//!   observation's (its spec just changed), a window older than the agents'
//!   buffer horizon ([`Refusal::StaleWindow`]), an observation the node is not
//!   in ([`Refusal::ObservationNotOnNode`]), a series whose local pod is on
//!   another node ([`Refusal::ForeignPod`]), more series than `maxSeries` + 1
//!   ([`Refusal::TooManySeries`]: `maxSeries` was just lowered), and a part
//!   from a fifth agent process, or a seventeenth part, of one node in one
//!   window ([`Refusal::TooManyAgents`], checked by the books when the part
//!   is added, so two requests at once cannot both pass). For policy counters
//!   of a policy not in force on the node ([`Refusal::PolicyNotOnNode`]) only
//!   that policy's entry is dropped from the window. A dropped part is not
//!   acknowledged: the agent holds it until its window is committed (or its
//!   buffer is full) and does not resend it.
//!
//! Config changes reach agents after the operator sees them, so an
//! observation or policy that was on the node a moment ago is still
//! accepted from it for a short time ([`Admission`] remembers when each was
//! last in force there).

use std::collections::HashMap;

use flowlens_api::{
    dns::{DnsWindow, MAX_RCODES, MAX_TOP_NAMES},
    network_observation::FlowEndpoint,
    report::{
        MAX_NAMED_ATTEMPTS, ObservationWindow, POLICY_WINDOW_SECONDS, PolicyWindow, ReportBatch,
        Series,
    },
};

/// How far in the future (seconds) a window may start: clocks of nodes
/// differ.
pub(crate) const CLOCK_SKEW_S: i64 = 60;
/// How many windows an agent buffers (node-agent/src/report/buffer.rs):
/// nothing older can come from an honest agent.
pub(crate) const BUFFER_WINDOWS: i64 = 256;
/// Agent processes (parts) of one node in one window: a few restarts.
pub(crate) const MAX_AGENTS_PER_WINDOW: usize = 4;
/// Parts of one node in one window: an agent's parts closed early (it
/// stopped, was killed, or the observation changed), and its last one.
pub(crate) const MAX_PARTS_PER_WINDOW: usize = 16;
/// Longest string in a report (a label key is at most 317 bytes).
pub(crate) const MAX_FIELD_BYTES: usize = 320;
/// Most labels on one endpoint.
pub(crate) const MAX_LABELS: usize = 64;
/// How often a refusal is logged per node and reason.
pub(crate) const LOG_INTERVAL_MS: i64 = 60_000;
/// Remembered (observation or policy, node) pairs and log stamps; beyond
/// this the oldest are forgotten.
const MAX_MEMORY: usize = 100_000;

/// Why a part (or a batch) was refused. The label is stable: it is the
/// `reason` of the `report_refusals` metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Refusal {
    MisalignedWindow,
    WrongWindowSeconds,
    FutureWindow,
    StaleWindow,
    ObservationNotOnNode,
    ForeignPod,
    PolicyNotOnNode,
    TooManyAgents,
    TooManySeries,
    FieldTooLong,
    BadAddress,
    BadDns,
}

impl Refusal {
    pub(crate) const ALL: [Refusal; 12] = [
        Refusal::MisalignedWindow,
        Refusal::WrongWindowSeconds,
        Refusal::FutureWindow,
        Refusal::StaleWindow,
        Refusal::ObservationNotOnNode,
        Refusal::ForeignPod,
        Refusal::PolicyNotOnNode,
        Refusal::TooManyAgents,
        Refusal::TooManySeries,
        Refusal::FieldTooLong,
        Refusal::BadAddress,
        Refusal::BadDns,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            Refusal::MisalignedWindow => "MisalignedWindow",
            Refusal::WrongWindowSeconds => "WrongWindowSeconds",
            Refusal::FutureWindow => "FutureWindow",
            Refusal::StaleWindow => "StaleWindow",
            Refusal::ObservationNotOnNode => "ObservationNotOnNode",
            Refusal::ForeignPod => "ForeignPod",
            Refusal::PolicyNotOnNode => "PolicyNotOnNode",
            Refusal::TooManyAgents => "TooManyAgents",
            Refusal::TooManySeries => "TooManySeries",
            Refusal::FieldTooLong => "FieldTooLong",
            Refusal::BadAddress => "BadAddress",
            Refusal::BadDns => "BadDns",
        }
    }
}

/// One refusal: the reason, the field (`windows[2].series[5].local.pod`)
/// and what was wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Refused {
    pub reason: Refusal,
    pub field: String,
    pub detail: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} at {}: {}",
            self.reason.label(),
            self.field,
            self.detail
        )
    }
}

fn refused(reason: Refusal, field: impl Into<String>, detail: impl Into<String>) -> Refused {
    Refused {
        reason,
        field: field.into(),
        detail: detail.into(),
    }
}

/// An observation as admission sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ObservationScope {
    pub window_seconds: u32,
    pub max_series: u32,
    /// The observation traces pods on the reporting node now.
    pub on_node: bool,
}

/// What the cluster says about one reporting node.
pub(crate) trait Scope {
    /// The observation with this UID; `None` when it does not exist (its
    /// parts are answered as gone, not refused).
    fn observation(&self, uid: &str) -> Option<ObservationScope>;
    /// The node of the pod `namespace/name`: `None` when no such pod is
    /// known (deleted since: its last window is still truthful),
    /// `Some(None)` when it is not scheduled.
    fn pod_node(&self, namespace: &str, name: &str) -> Option<Option<&str>>;
    /// The policy targets pods on the reporting node now.
    fn policy_on_node(&self, namespace: &str, name: &str) -> bool;
}

/// What admission remembers between requests: when an observation or a
/// policy was last in force on a node, and when a refusal was last logged.
#[derive(Debug, Default)]
pub(crate) struct Admission {
    /// `(uid, node)` -> until when (ms) the node may still report for it.
    observations: HashMap<(String, String), i64>,
    /// `(namespace, name, node)` -> until when (ms).
    policies: HashMap<(String, String, String), i64>,
    /// `(node, reason)` -> when last logged (ms).
    logged: HashMap<(String, &'static str), i64>,
}

/// How long after an observation with windows of `window_seconds` left a
/// node its parts are still accepted from it: the window then open, and
/// the time for the agent's config to catch up.
fn grace_ms(window_seconds: u32) -> i64 {
    (2 * i64::from(window_seconds) + CLOCK_SKEW_S) * 1000
}

fn check_len(s: &str, field: impl FnOnce() -> String) -> Result<(), Refused> {
    if s.len() > MAX_FIELD_BYTES {
        return Err(refused(
            Refusal::FieldTooLong,
            field(),
            format!("{} bytes, at most {MAX_FIELD_BYTES}", s.len()),
        ));
    }
    Ok(())
}

fn check_endpoint(e: &FlowEndpoint, at: &str) -> Result<(), Refused> {
    let opt = |v: &Option<String>, name: &str| match v {
        Some(s) => check_len(s, || format!("{at}.{name}")),
        None => Ok(()),
    };
    opt(&e.namespace, "namespace")?;
    opt(&e.workload, "workload")?;
    opt(&e.pod, "pod")?;
    opt(&e.node, "node")?;
    opt(&e.zone, "zone")?;
    opt(&e.address, "address")?;
    if e.labels.len() > MAX_LABELS {
        return Err(refused(
            Refusal::FieldTooLong,
            format!("{at}.labels"),
            format!("{} labels, at most {MAX_LABELS}", e.labels.len()),
        ));
    }
    for (k, v) in &e.labels {
        check_len(k, || format!("{at}.labels"))?;
        check_len(v, || format!("{at}.labels[{k}]"))?;
    }
    Ok(())
}

fn check_dns_name(name: &str, field: impl FnOnce() -> String) -> Result<(), Refused> {
    flowlens_api::dns::check_name(name)
        .map_err(|e| refused(Refusal::BadDns, field(), format!("not a DNS name: {e}")))
}

/// A window's DNS: bounded lists, response codes as the agents name them,
/// plain names.
fn check_dns(d: &DnsWindow, at: &str) -> Result<(), Refused> {
    if d.responses.len() > MAX_RCODES {
        return Err(refused(
            Refusal::FieldTooLong,
            format!("{at}.responses"),
            format!("{} response codes, at most {MAX_RCODES}", d.responses.len()),
        ));
    }
    for code in d.responses.keys() {
        let known = code.len() <= 16
            && !code.is_empty()
            && code
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit());
        if !known {
            return Err(refused(
                Refusal::BadDns,
                format!("{at}.responses"),
                format!("{code:?} is not a response code name"),
            ));
        }
    }
    if d.top_names.len() > MAX_TOP_NAMES {
        return Err(refused(
            Refusal::FieldTooLong,
            format!("{at}.topNames"),
            format!("{} names, at most {MAX_TOP_NAMES}", d.top_names.len()),
        ));
    }
    for (k, n) in d.top_names.iter().enumerate() {
        check_dns_name(&n.name, || format!("{at}.topNames[{k}].name"))?;
    }
    Ok(())
}

/// Strings and label counts of a whole batch.
fn check_fields(batch: &ReportBatch) -> Result<(), Refused> {
    check_len(&batch.node, || "node".into())?;
    check_len(&batch.agent, || "agent".into())?;
    for (i, w) in batch.windows.iter().enumerate() {
        check_len(&w.observation, || format!("windows[{i}].observation"))?;
        check_len(&w.uid, || format!("windows[{i}].uid"))?;
        for (j, s) in w.series.iter().enumerate() {
            let at = format!("windows[{i}].series[{j}]");
            check_endpoint(&s.local, &format!("{at}.local"))?;
            if let Some(r) = &s.remote {
                check_len(r, || format!("{at}.remote"))?;
            }
            if let Some(svc) = &s.service {
                check_len(svc, || format!("{at}.service"))?;
            }
            if let Some(n) = &s.remote_name {
                check_dns_name(n, || format!("{at}.remoteName"))?;
            }
        }
        if let Some(d) = &w.dns {
            check_dns(d, &format!("windows[{i}].dns"))?;
        }
    }
    for (i, w) in batch.policy_windows.iter().enumerate() {
        for (j, p) in w.policies.iter().enumerate() {
            check_len(&p.namespace, || {
                format!("policyWindows[{i}].policies[{j}].namespace")
            })?;
            check_len(&p.name, || format!("policyWindows[{i}].policies[{j}].name"))?;
            let at = format!("policyWindows[{i}].policies[{j}].attempts");
            if p.attempts.len() > MAX_NAMED_ATTEMPTS {
                return Err(refused(
                    Refusal::FieldTooLong,
                    at,
                    format!(
                        "{} attempts, at most {MAX_NAMED_ATTEMPTS}",
                        p.attempts.len()
                    ),
                ));
            }
            for (k, a) in p.attempts.iter().enumerate() {
                check_len(&a.pod, || format!("{at}[{k}].pod"))?;
                check_len(&a.peer, || format!("{at}[{k}].peer"))?;
            }
        }
    }
    Ok(())
}

/// Keeps the named attempts a node may truthfully report: of a pod on it
/// (or deleted since), with a peer that is an IP address. The rest are
/// dropped one by one (the policy's counts stay).
fn admit_attempts(
    scope: &impl Scope,
    node: &str,
    p: &mut flowlens_api::report::PolicyMatches,
    at: &str,
    dropped: &mut Vec<Refused>,
) {
    let mut k = 0;
    p.attempts.retain(|a| {
        let here = format!("{at}.attempts[{k}]");
        k += 1;
        let local =
            a.pod
                .split_once('/')
                .is_some_and(|(ns, name)| match scope.pod_node(ns, name) {
                    None => true,
                    Some(n) => n == Some(node),
                });
        if !local {
            dropped.push(refused(
                Refusal::ForeignPod,
                format!("{here}.pod"),
                format!("{} is not a pod of node {node}", a.pod),
            ));
            return false;
        }
        if a.peer.parse::<std::net::IpAddr>().is_err() {
            dropped.push(refused(
                Refusal::BadAddress,
                format!("{here}.peer"),
                format!("{:?} is not an IP address", a.peer),
            ));
            return false;
        }
        true
    });
}

/// Start and length of one window, whatever it belongs to: aligned, not
/// in the future.
fn check_window(start: i64, window_seconds: u32, at: &str, now_s: i64) -> Result<(), Refused> {
    if window_seconds == 0 {
        return Err(refused(
            Refusal::WrongWindowSeconds,
            format!("{at}.windowSeconds"),
            "0",
        ));
    }
    if start.rem_euclid(i64::from(window_seconds)) != 0 {
        return Err(refused(
            Refusal::MisalignedWindow,
            format!("{at}.start"),
            format!("{start} is not a multiple of windowSeconds {window_seconds}"),
        ));
    }
    if start > now_s.saturating_add(CLOCK_SKEW_S) {
        return Err(refused(
            Refusal::FutureWindow,
            format!("{at}.start"),
            format!(
                "{start} is more than {CLOCK_SKEW_S} s after the operator's clock ({now_s}): check the node's clock"
            ),
        ));
    }
    Ok(())
}

/// A window older than the agents' buffer horizon.
fn is_stale(start: i64, window_seconds: u32, now_s: i64) -> bool {
    let horizon = BUFFER_WINDOWS.saturating_mul(i64::from(window_seconds));
    start.saturating_add(i64::from(window_seconds)) < now_s.saturating_sub(horizon)
}

/// What admission kept of a batch, and what it dropped.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Admitted {
    pub windows: Vec<ObservationWindow>,
    pub policy_windows: Vec<PolicyWindow>,
    pub dropped: Vec<Refused>,
}

impl Admission {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Checks a batch from `node` (already authenticated). `Err`: the whole
    /// batch is refused. `Ok`: what may go into the books, and the parts
    /// (or policy entries) dropped.
    pub(crate) fn admit(
        &mut self,
        scope: &impl Scope,
        node: &str,
        batch: ReportBatch,
        now_ms: i64,
    ) -> Result<Admitted, Refused> {
        let now_s = now_ms.div_euclid(1000);
        check_fields(&batch)?;
        for (i, w) in batch.windows.iter().enumerate() {
            check_window(w.start, w.window_seconds, &format!("windows[{i}]"), now_s)?;
        }
        for (i, w) in batch.policy_windows.iter().enumerate() {
            let at = format!("policyWindows[{i}]");
            // Its own windowSeconds is not used: a part flushed by a stopping
            // agent is shorter, and the book counts every part in the
            // 10 s window of its start.
            check_window(w.start, POLICY_WINDOW_SECONDS, &at, now_s)?;
        }
        self.forget_expired(now_ms);

        let mut out = Admitted::default();
        for (i, w) in batch.windows.into_iter().enumerate() {
            match self.admit_observation(scope, node, &w, i, now_ms) {
                Ok(()) => out.windows.push(w),
                Err(r) => out.dropped.push(r),
            }
        }
        for (i, mut w) in batch.policy_windows.into_iter().enumerate() {
            let at = format!("policyWindows[{i}]");
            if is_stale(w.start, POLICY_WINDOW_SECONDS, now_s) {
                out.dropped.push(refused(
                    Refusal::StaleWindow,
                    format!("{at}.start"),
                    format!("{} is older than the agents' buffer", w.start),
                ));
                continue;
            }
            for (j, p) in w.policies.iter_mut().enumerate() {
                admit_attempts(
                    scope,
                    node,
                    p,
                    &format!("{at}.policies[{j}]"),
                    &mut out.dropped,
                );
            }
            let mut j = 0;
            w.policies.retain(|p| {
                let ok = self.policy_in_force(scope, node, &p.namespace, &p.name, now_ms);
                if !ok {
                    out.dropped.push(refused(
                        Refusal::PolicyNotOnNode,
                        format!("{at}.policies[{j}]"),
                        format!(
                            "policy {}/{} is not in force on node {node}",
                            p.namespace, p.name
                        ),
                    ));
                }
                j += 1;
                ok
            });
            out.policy_windows.push(w);
        }
        Ok(out)
    }

    fn admit_observation(
        &mut self,
        scope: &impl Scope,
        node: &str,
        w: &ObservationWindow,
        i: usize,
        now_ms: i64,
    ) -> Result<(), Refused> {
        let at = format!("windows[{i}]");
        let Some(o) = scope.observation(&w.uid) else {
            return Ok(()); // deleted: answered as gone
        };
        let key = (w.uid.clone(), node.to_owned());
        if o.on_node {
            self.observations
                .insert(key, now_ms.saturating_add(grace_ms(o.window_seconds)));
        } else if self.observations.get(&key).is_none_or(|&t| now_ms > t) {
            return Err(refused(
                Refusal::ObservationNotOnNode,
                format!("{at}.uid"),
                format!(
                    "observation {} ({}) traces no pod on node {node}",
                    w.observation, w.uid
                ),
            ));
        }
        if w.window_seconds != o.window_seconds {
            return Err(refused(
                Refusal::WrongWindowSeconds,
                format!("{at}.windowSeconds"),
                format!(
                    "{}, the observation's is {}",
                    w.window_seconds, o.window_seconds
                ),
            ));
        }
        if is_stale(w.start, w.window_seconds, now_ms.div_euclid(1000)) {
            return Err(refused(
                Refusal::StaleWindow,
                format!("{at}.start"),
                format!("{} is older than the agents' buffer", w.start),
            ));
        }
        let limit = u64::from(o.max_series) + 1;
        if w.series.len() as u64 > limit {
            return Err(refused(
                Refusal::TooManySeries,
                format!("{at}.series"),
                format!(
                    "{} series, maxSeries is {} (+1 for other)",
                    w.series.len(),
                    o.max_series
                ),
            ));
        }
        for (j, s) in w.series.iter().enumerate() {
            check_local(scope, node, s, &format!("{at}.series[{j}].local"))?;
        }
        Ok(())
    }

    fn policy_in_force(
        &mut self,
        scope: &impl Scope,
        node: &str,
        namespace: &str,
        name: &str,
        now_ms: i64,
    ) -> bool {
        let key = (namespace.to_owned(), name.to_owned(), node.to_owned());
        if scope.policy_on_node(namespace, name) {
            self.policies
                .insert(key, now_ms.saturating_add(grace_ms(POLICY_WINDOW_SECONDS)));
            return true;
        }
        self.policies.get(&key).is_some_and(|&t| now_ms <= t)
    }

    fn forget_expired(&mut self, now_ms: i64) {
        if self.observations.len() > MAX_MEMORY {
            self.observations.retain(|_, t| now_ms <= *t);
            if self.observations.len() > MAX_MEMORY {
                self.observations.clear();
            }
        }
        if self.policies.len() > MAX_MEMORY {
            self.policies.retain(|_, t| now_ms <= *t);
            if self.policies.len() > MAX_MEMORY {
                self.policies.clear();
            }
        }
    }

    /// Whether to log a refusal for `reason` (a [`Refusal`]'s label, or an
    /// outcome of the endpoint) from `node` (empty when not known yet) now:
    /// once per node and reason per [`LOG_INTERVAL_MS`].
    pub(crate) fn should_log(&mut self, node: &str, reason: &'static str, now_ms: i64) -> bool {
        let key = (node.to_owned(), reason);
        if self
            .logged
            .get(&key)
            .is_some_and(|&t| now_ms.saturating_sub(t) < LOG_INTERVAL_MS)
        {
            return false;
        }
        if self.logged.len() >= MAX_MEMORY {
            self.logged
                .retain(|_, t| now_ms.saturating_sub(*t) < LOG_INTERVAL_MS);
        }
        self.logged.insert(key, now_ms);
        true
    }
}

/// A series' local side must be this node's: its node (when named) is this
/// one, and its pod (when named with its namespace) is not on another node.
fn check_local(scope: &impl Scope, node: &str, s: &Series, at: &str) -> Result<(), Refused> {
    if let Some(n) = &s.local.node
        && n != node
    {
        return Err(refused(
            Refusal::ForeignPod,
            format!("{at}.node"),
            format!("node {n} is not the reporting node {node}"),
        ));
    }
    if let (Some(ns), Some(pod)) = (&s.local.namespace, &s.local.pod)
        && let Some(Some(other)) = scope.pod_node(ns, pod)
        && other != node
    {
        return Err(refused(
            Refusal::ForeignPod,
            format!("{at}.pod"),
            format!("pod {ns}/{pod} runs on node {other}, not on {node}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
