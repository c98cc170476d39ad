//! The control loop: the one thread that owns the datapath.
//!
//! It applies configs as they arrive, keeps pod interfaces and cgroups in
//! sync, drains the kernel tables at window boundaries (so between drains the
//! live counts sit in pinned kernel maps and survive an agent crash),
//! commits what it drained to the spool (so that drained counts survive a
//! crash too; see `spool.rs`) and publishes windows, a snapshot and metrics.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    net::IpAddr,
    path::PathBuf,
    sync::{Arc, mpsc},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use flowlens_agent_common::{
    DIRECTION_EGRESS, PodAddrs, PodInterface, SUSPECT_EXT_HEADERS, SUSPECT_ORPHAN_FRAGMENT,
    SUSPECT_SPOOFED, SUSPECT_TRUNCATED,
};
use flowlens_api::{
    conditions::reason,
    node_agent_config::{EndpointAttachment, NodeAgentConfigSpec, ObservationRef},
    report::{ObservationWindow, PolicyMatches, PolicyWindow},
};
use tracing::{debug, error, info, warn};

use crate::{
    aggregate::{Aggregator, Drained},
    cgroups,
    datapath::{
        Datapath, DrainScope,
        attach::{Interface, TcLinks},
        revision_hash,
    },
    in_force, interfaces,
    metrics::{
        DirectionLabels, DrainLabels, Metrics, PolicyLabels, ReasonLabels, ResultLabels,
        TableLabels,
    },
    report::Outbox,
    spool::{SPOOL_VERSION, Spool, SpoolState, SpooledPart},
    state::{Problem, Shared},
    tables::{self, Tables},
};

/// Requests to the control loop.
pub enum Event {
    /// A new config (from the API server or a file).
    Config(Arc<NodeAgentConfigSpec>),
    /// The config cannot be read (deleted, unreadable, invalid): why, or
    /// None once it can again. The last applied config stays in force.
    ConfigUnavailable(Option<String>),
    /// The uid of the NodeAgentConfig object the config came from.
    ConfigObject(String),
    /// Windows and policy matches as they stand now, without draining (for `dump`).
    Preview(tokio::sync::oneshot::Sender<Preview>),
    /// Someone started observing live flows: drain every second.
    LiveWatched,
    /// Stop: drain and flush open windows as incomplete parts.
    Shutdown,
}

/// The newest of the configs in `first` and `queued` (events already
/// waiting), the other queued events in their order, and how many configs
/// were superseded unapplied. A rollout that rewrites many address-set
/// slices sends a config per slice; each apply compiles and writes the
/// whole tables (~150 ms at 100,000 peer addresses: `cargo bench -p
/// flowlens-agent --bench join`), so only the newest one waiting is worth
/// applying: every config is complete, none is a delta.
fn newest_config(
    first: Arc<NodeAgentConfigSpec>,
    queued: impl IntoIterator<Item = Event>,
) -> (Arc<NodeAgentConfigSpec>, VecDeque<Event>, usize) {
    let mut newest = first;
    let mut others = VecDeque::new();
    let mut superseded = 0;
    for event in queued {
        match event {
            Event::Config(spec) => {
                newest = spec;
                superseded += 1;
            }
            other => others.push_back(other),
        }
    }
    (newest, others, superseded)
}

/// The live view: open windows including what the kernel counted since the
/// last drain, and policy matches since the agent started (including live).
#[derive(Debug, Default)]
pub struct Preview {
    pub windows: Vec<ObservationWindow>,
    pub policies: Vec<PolicyMatches>,
}

/// Where completed windows go when the agent reports to a collector.
pub struct Reporting {
    /// The agent id parts are reported under.
    pub agent: String,
    pub outbox: Outbox,
    /// Woken when windows are added; dropped when the loop stops.
    pub wake: tokio::sync::mpsc::UnboundedSender<()>,
    /// With `--state-dir`: drained counts survive a crash.
    pub spool: Option<Spool>,
    /// The last part number a predecessor (the spool) may have used.
    pub last_part: u64,
    /// Live records for `kubectl flowlens observe`.
    pub live: Arc<crate::report::live::LiveFeed>,
}

#[derive(Clone, Debug)]
pub struct ControlOptions {
    pub node: String,
    /// Where pods' cgroups live (for connect-time rejection), if known.
    pub cgroup_root: Option<PathBuf>,
    /// The CNI's result cache (pod interfaces on bridge CNIs).
    pub cni_cache_dir: PathBuf,
    /// How often to re-resolve pod interfaces and cgroups.
    pub reconcile_interval: Duration,
    /// Longest time between two drains of the flow tables.
    pub max_drain_interval: Duration,
}

/// How deep under the cgroup root pod cgroups are looked for.
const POD_CGROUP_MAX_DEPTH: usize = 6;

/// Pods without an interface named in the node's problem message.
const MISSING_PODS_NAMED: usize = 5;
/// How a failed apply's problem message starts (it outlives reconciles).
const APPLY_FAILED_PREFIX: &str = "cannot apply revision";
/// Retries of a failed apply: the first after this, doubling...
const APPLY_RETRY_FIRST: Duration = Duration::from_secs(1);
/// ...up to this.
const APPLY_RETRY_MAX: Duration = Duration::from_secs(300);

/// Pods without an interface listed in the node's status.
const MISSING_PODS_LISTED: usize = 20;
/// How often the DNS ring buffer is read into the windows (and the name
/// table), between drains too: at the kernel's budget of 16,384 copies a
/// second per CPU, 200 ms of two CPUs' copies fit its 4 MiB.
const DNS_INTERVAL: Duration = Duration::from_millis(200);
/// How long `FlowTableFull` stays reported after the last overflow.
const TABLE_FULL_HELD_MS: i64 = 10 * 60_000;

/// `FlowTableFull` while the flow table (of `capacity` entries) overflowed
/// within [`TABLE_FULL_HELD_MS`] of `now_ms`. The message holds no count,
/// so it does not change from one drain to the next (each change is a
/// status write); `flowlens_agent_table_full_total` has the counts.
fn flow_table_full_problem(capacity: u32, full_at: Option<i64>, now_ms: i64) -> Option<Problem> {
    full_at
        .filter(|at| now_ms - at < TABLE_FULL_HELD_MS)
        .map(|_| Problem {
            reason: reason::FLOW_TABLE_FULL.into(),
            message: format!(
                "the flow table ({capacity} entries) filled up in the last 10 minutes: packets of new connections were counted without their flow (totals stay exact, in the 'other' series; flowlens_agent_table_full_total counts them); raise --flow-table-size"
            ),
        })
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub struct ControlLoop {
    opts: ControlOptions,
    datapath: Datapath,
    agg: Aggregator,
    spec: Option<Arc<NodeAgentConfigSpec>>,
    tables: Option<Arc<Tables>>,
    /// Interfaces whose programs the kernel shows attached, with their links.
    attached: BTreeMap<Interface, TcLinks>,
    shared: Shared,
    metrics: Arc<Metrics>,
    /// None: standalone without a collector (windows only in `dump`).
    reporting: Option<Reporting>,
    last_kernel: crate::datapath::KernelCounters,
    last_agg_stats: crate::aggregate::AggregatorStats,
    last_dns_stats: crate::dns::tracker::DnsStats,
    /// When (ms) a drain last found the flow table had overflowed.
    flow_table_full_at: Option<i64>,
    last_drops: BTreeMap<String, u64>,
    other_layouts_removed: bool,
    next_flow_drain: i64,
    next_rule_drain: i64,
    policy_totals: BTreeMap<(String, String), PolicyMatches>,
    /// A config whose apply failed: retried at the instant, with the next
    /// backoff (reset by a new revision or a success).
    retry: Option<(Arc<NodeAgentConfigSpec>, Instant, Duration)>,
}

impl ControlLoop {
    pub fn new(
        opts: ControlOptions,
        mut datapath: Datapath,
        shared: Shared,
        metrics: Arc<Metrics>,
        reporting: Option<Reporting>,
    ) -> Self {
        let now = now_ms();
        let last_kernel = datapath.counters().unwrap_or_default();
        let last_drops = datapath.drops_by_reason().unwrap_or_default();
        shared.update(|s| {
            s.node = opts.node.clone();
            s.hooks = datapath.hooks().clone();
        });
        let mut agg = Aggregator::new(now);
        if let Some(r) = &reporting {
            agg.continue_parts_after(r.last_part);
        }
        ControlLoop {
            agg,
            opts,
            datapath,
            spec: None,
            tables: None,
            attached: BTreeMap::new(),
            shared,
            metrics,
            reporting,
            last_kernel,
            last_agg_stats: Default::default(),
            last_dns_stats: Default::default(),
            flow_table_full_at: None,
            last_drops,
            other_layouts_removed: false,
            // No drain before the first config: records drained without
            // observations to attribute them to would be lost, while the
            // kernel keeps them safely until then.
            next_flow_drain: i64::MAX,
            next_rule_drain: i64::MAX,
            policy_totals: BTreeMap::new(),
            retry: None,
        }
    }

    /// Runs until `Shutdown` or until every sender is gone.
    pub fn run(mut self, events: mpsc::Receiver<Event>) {
        let mut next_reconcile = Instant::now();
        let mut next_dns = Instant::now();
        // Events taken from the channel while looking for a newer config,
        // handled before the channel's next ones.
        let mut held: VecDeque<Event> = VecDeque::new();
        loop {
            self.shared.beat_control();
            let now = now_ms();
            let next_drain = self.next_flow_drain.min(self.next_rule_drain);
            let until_dns = next_dns.saturating_duration_since(Instant::now());
            let until_drain =
                Duration::from_millis((next_drain.saturating_sub(now)).clamp(0, 3_600_000) as u64);
            let until_reconcile = next_reconcile.saturating_duration_since(Instant::now());
            let until_retry = self.retry.as_ref().map_or(Duration::MAX, |(_, at, _)| {
                at.saturating_duration_since(Instant::now())
            });
            let next = match held.pop_front() {
                Some(event) => Ok(event),
                None => events.recv_timeout(
                    until_drain
                        .min(until_reconcile)
                        .min(until_retry)
                        .min(until_dns),
                ),
            };
            match next {
                Ok(Event::Config(spec)) => {
                    let waiting: Vec<Event> = held.drain(..).chain(events.try_iter()).collect();
                    let (spec, others, superseded) = newest_config(spec, waiting);
                    if superseded > 0 {
                        debug!(superseded, revision = %spec.revision, "applying only the newest of the configs waiting");
                    }
                    held = others;
                    self.apply(spec)
                }
                Ok(Event::ConfigUnavailable(why)) => self.config_unavailable(why),
                Ok(Event::ConfigObject(uid)) => self.shared.update(|s| s.config_uid = Some(uid)),
                Ok(Event::Preview(reply)) => {
                    let _ = reply.send(self.preview());
                }
                Ok(Event::LiveWatched) => {
                    if self.spec.is_some() {
                        self.schedule_flow_drain(now_ms());
                    }
                }
                Ok(Event::Shutdown) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                    self.shutdown();
                    return;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            if let Some((spec, at, _)) = &self.retry
                && Instant::now() >= *at
            {
                let spec = spec.clone();
                info!(revision = %spec.revision, "retrying the config apply that failed");
                self.apply(spec);
            }
            if Instant::now() >= next_reconcile {
                self.reconcile();
                next_reconcile = Instant::now() + self.opts.reconcile_interval;
            }
            if Instant::now() >= next_dns {
                self.ingest_dns(now_ms());
                next_dns = Instant::now() + DNS_INTERVAL;
            }
            let now = now_ms();
            if now >= self.next_flow_drain.min(self.next_rule_drain) {
                self.drain(now);
            }
        }
    }

    /// Fail-static: a config that cannot be read changes nothing in the
    /// kernel; it is a problem until a config can be read again.
    fn config_unavailable(&mut self, why: Option<String>) {
        let in_force = self
            .spec
            .as_ref()
            .map_or("none".to_owned(), |s| s.revision.clone());
        if let Some(why) = &why {
            warn!(problem = %why, revision = %in_force, "config unavailable; the last applied one stays in force");
        }
        self.shared.update(|s| {
            s.problems.retain(|p| p.reason != reason::CONFIG_MISSING);
            if let Some(why) = why {
                s.problems.push(Problem {
                    reason: reason::CONFIG_MISSING.into(),
                    message: format!("{why}; revision {in_force} stays in force"),
                });
            }
        });
    }

    fn apply(&mut self, spec: Arc<NodeAgentConfigSpec>) {
        // The whole spec: a set it names can change under the same revision.
        if self.spec.as_deref().is_some_and(|s| *s == *spec) && self.tables.is_some() {
            return;
        }
        // The backoff grows only while the same revision keeps failing.
        let backoff = match &self.retry {
            Some((pending, _, next)) if pending.revision == spec.revision => *next,
            _ => APPLY_RETRY_FIRST,
        };
        self.retry = None;
        let started = Instant::now();
        let tables = Arc::new(tables::compile(
            &spec,
            &crate::interfaces::host_addresses(),
            self.datapath.policy_capacity(),
        ));
        // A restarted agent finds the kernel enforcing some revision: when it
        // is this one with the same sets, the tables it compiles are those
        // in force (compilation is deterministic), so counters of that
        // generation stay attributable.
        let identity = crate::address_sets::enforced_identity(&spec);
        if let Ok(active) = self.datapath.active_revision_hash()
            && active == revision_hash(&identity)
        {
            self.agg
                .set_generation_tables(self.datapath.generation(), tables.clone());
        }
        self.shared
            .update(|s| s.desired_revision = Some(spec.revision.clone()));
        match self.datapath.apply(tables.clone(), &identity) {
            Ok(()) => {
                self.metrics
                    .applies
                    .get_or_create(&ResultLabels { result: "ok" })
                    .inc();
                self.agg
                    .set_generation_tables(self.datapath.generation(), tables.clone());
                self.agg.set_config(&spec, now_ms());
                info!(
                    revision = %spec.revision,
                    endpoints = tables.endpoint_refs.len(),
                    kernel_entries = tables.endpoints.len() + tables.policy_entries(),
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "applied config"
                );
                for p in &tables.problems {
                    warn!(revision = %spec.revision, problem = %p, "config problem");
                }
                self.spec = Some(spec.clone());
                self.tables = Some(tables);
                self.shared.update(|s| {
                    s.problems
                        .retain(|p| !p.message.starts_with(APPLY_FAILED_PREFIX));
                });
                // Attach to the pods' interfaces before saying the revision
                // is applied: "applied" means counted and enforced.
                self.reconcile();
                if !self.other_layouts_removed {
                    // Enforced by this agent's programs now: those of an
                    // earlier version can go.
                    self.datapath.remove_other_layouts();
                    self.other_layouts_removed = true;
                }
                self.shared.set_ready(true);
                self.shared.update(|s| {
                    s.applied_revision = Some(spec.revision.clone());
                    s.apply_error = None;
                    s.generation = self.datapath.generation();
                    s.collector = spec.collector.clone();
                    s.observations = spec
                        .observations
                        .iter()
                        .map(|o| ObservationRef {
                            name: o.name.clone(),
                            generation: o.generation,
                        })
                        .collect();
                });
                self.schedule_flow_drain(now_ms());
            }
            Err(e) => {
                self.metrics
                    .applies
                    .get_or_create(&ResultLabels {
                        result: e.metric_label(),
                    })
                    .inc();
                error!(revision = %spec.revision, error = %e, retry_in_s = backoff.as_secs(), "cannot apply config; the previous one stays in force");
                let in_force = self
                    .spec
                    .as_ref()
                    .map_or("none".to_owned(), |s| s.revision.clone());
                self.shared.update(|s| {
                    s.apply_error = Some(e.to_string());
                    s.problems
                        .retain(|p| !p.message.starts_with(APPLY_FAILED_PREFIX));
                    s.problems.push(Problem {
                        reason: reason::APPLY_FAILED.into(),
                        message: format!(
                            "{APPLY_FAILED_PREFIX} {}: {e}; revision {in_force} stays in force; retrying in {} s",
                            spec.revision,
                            backoff.as_secs()
                        ),
                    });
                });
                self.retry = Some((
                    spec.clone(),
                    Instant::now() + backoff,
                    (backoff * 2).min(APPLY_RETRY_MAX),
                ));
            }
        }
    }

    /// Resolves pod interfaces and cgroups and syncs attachments.
    fn reconcile(&mut self) {
        let Some(tables) = self.tables.clone() else {
            return;
        };
        let endpoint_interfaces = self.attach_pod_interfaces(&tables);
        self.sync_pod_cgroups(&tables);
        self.publish_attachment(&tables, &endpoint_interfaces);
    }

    /// Attaches to the interfaces of the pods traced or with rules; returns
    /// each such pod (`namespace/pod`) with the interfaces found for it
    /// (none: no interface routes to it).
    fn attach_pod_interfaces(&mut self, tables: &Tables) -> Vec<(String, Vec<Interface>)> {
        let routes = interfaces::read_routes().unwrap_or_else(|e| {
            warn!(error = %e, "cannot read routes");
            Vec::new()
        });
        let cni = interfaces::read_cni_cache(&self.opts.cni_cache_dir);
        let mut wanted = BTreeSet::new();
        // Each interface's pod addresses, for anti-spoofing.
        let mut owners: BTreeMap<u32, PodInterface> = BTreeMap::new();
        let mut endpoint_interfaces = Vec::new();
        for ep in &tables.endpoint_refs {
            if !ep.traced && !ep.has_rules {
                continue;
            }
            let mut found: Vec<Interface> = Vec::new();
            for ip in &ep.ips {
                if let Some(ifname) = interfaces::pod_interface(&cni, &routes, ip)
                    && let Some(idx) = interfaces::ifindex(ifname)
                {
                    let iface = (ifname.to_owned(), idx);
                    if !found.contains(&iface) {
                        found.push(iface.clone());
                    }
                    wanted.insert(iface);
                    let owner = owners.entry(idx).or_default();
                    match ip {
                        IpAddr::V4(_) => owner.addrs.addr4 = crate::tables::prefix::addr_bytes(*ip),
                        IpAddr::V6(_) => owner.addrs.addr6 = crate::tables::prefix::addr_bytes(*ip),
                    }
                    if ep.has_rules {
                        owner.drop_spoofed = 1;
                    }
                }
            }
            endpoint_interfaces.push((ep.key.clone(), found));
        }
        match self.datapath.sync_interfaces(&wanted) {
            Ok(attached) => {
                if attached != self.attached {
                    debug!(attached = attached.len(), "pod interfaces in sync");
                }
                self.attached = attached;
            }
            Err(e) => {
                warn!(error = %e, "cannot sync pod interfaces");
                // Nothing verified: nothing is said to be attached.
                self.attached.clear();
            }
        }
        if let Err(e) = self.datapath.sync_pod_interfaces(&owners) {
            warn!(error = %e, "cannot write the pod interfaces' addresses (anti-spoofing)");
        }
        self.metrics
            .attached_interfaces
            .set(self.attached.len() as i64);
        endpoint_interfaces
    }

    /// Cgroups of local endpoints, for connect-time rejection (pods with
    /// rules) and Service translation (every endpoint, so traced pods'
    /// Service connections are counted under the backend).
    fn sync_pod_cgroups(&mut self, tables: &Tables) {
        let mut cgroup_entries = BTreeMap::new();
        if let Some(root) = &self.opts.cgroup_root {
            let found = cgroups::find_pod_cgroups(root, POD_CGROUP_MAX_DEPTH);
            for ep in tables
                .endpoint_refs
                .iter()
                .filter(|e| e.has_rules || e.traced)
            {
                let Some((id, _)) = found.get(&ep.uid) else {
                    continue;
                };
                let mut c = PodAddrs::default();
                for ip in &ep.ips {
                    match ip {
                        IpAddr::V4(_) => c.addr4 = crate::tables::prefix::addr_bytes(*ip),
                        IpAddr::V6(_) => c.addr6 = crate::tables::prefix::addr_bytes(*ip),
                    }
                }
                cgroup_entries.insert(*id, c);
            }
        }
        if let Err(e) = self.datapath.sync_cgroups(&cgroup_entries) {
            warn!(error = %e, "cannot sync pod cgroups");
        }
    }

    /// Publishes which pods are attached (as the kernel shows them), which
    /// policies are in force, and the config's and the attachments'
    /// problems as the node's.
    fn publish_attachment(
        &mut self,
        tables: &Tables,
        endpoint_interfaces: &[(String, Vec<Interface>)],
    ) {
        let states = in_force::endpoint_states(endpoint_interfaces, &self.attached);
        let tc_supported = crate::datapath::attach::tcx_supported();
        let (policies, not_in_force) = match &self.spec {
            Some(spec) => {
                in_force::policies_in_force(spec, &states, &tables.problems, tc_supported)
            }
            None => (Vec::new(), Vec::new()),
        };
        let mut problems: Vec<Problem> = tables
            .problems
            .iter()
            .map(|p| Problem {
                reason: match p {
                    tables::Problem::TooManyRules { .. } => reason::TOO_MANY_RULES.into(),
                    tables::Problem::PolicyTableFull { .. } => reason::POLICY_TABLE_FULL.into(),
                    _ => reason::APPLY_FAILED.into(),
                },
                message: p.to_string(),
            })
            .collect();
        if !tc_supported {
            problems.push(Problem {
                reason: reason::UNSUPPORTED_KERNEL.into(),
                message: "the kernel has no TCX (Linux 6.6+): no per-pod program is attached, pods on this node are neither counted nor blocked at their interfaces".into(),
            });
        }
        for (reason, pods, what) in [
            (
                reason::INTERFACE_NOT_FOUND,
                &states.missing,
                "no interface routes to",
            ),
            (
                reason::UNATTACHED,
                &states.unattached,
                "the kernel does not show the programs attached for",
            ),
            (
                reason::NOT_FIRST,
                &states.not_first,
                "another program runs before Flowlens' (it may redirect or accept packets unseen) for",
            ),
        ] {
            if pods.is_empty() {
                continue;
            }
            problems.push(Problem {
                reason: reason.into(),
                message: format!(
                    "{what} {} pod(s) ({}{}){}",
                    pods.len(),
                    pods.iter()
                        .take(MISSING_PODS_NAMED)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", "),
                    if pods.len() > MISSING_PODS_NAMED {
                        ", ..."
                    } else {
                        ""
                    },
                    if reason == reason::NOT_FIRST {
                        ""
                    } else {
                        ": their traffic is neither counted nor blocked by TC"
                    }
                ),
            });
        }
        self.metrics
            .unattached_endpoints
            .set((states.unattached.len() + states.missing.len()) as i64);
        self.shared.update(|s| {
            s.endpoints = EndpointAttachment {
                attached: states.attached.len() as u32,
                missing: states
                    .missing
                    .iter()
                    .take(MISSING_PODS_LISTED)
                    .cloned()
                    .collect(),
                unattached: states
                    .unattached
                    .iter()
                    .take(MISSING_PODS_LISTED)
                    .cloned()
                    .collect(),
                links: states
                    .attached
                    .values()
                    .flatten()
                    .take(in_force::LINKS_LISTED)
                    .cloned()
                    .collect(),
            };
            s.policies = policies;
            s.policies_not_in_force = not_in_force;
            // Problems found elsewhere (drains, config source, applies) stay.
            s.problems.retain(|p| {
                p.reason == reason::FLOW_TABLE_FULL
                    || p.reason == reason::CONFIG_MISSING
                    || p.reason == reason::APPLY_FAILED
                        && p.message.starts_with(APPLY_FAILED_PREFIX)
            });
            s.problems.extend(problems);
            // A full policy table concerns the policies left out (each
            // reported in `policiesNotInForce`): last, so that the node's
            // Degraded reason names a problem of every policy when there is one.
            s.problems
                .sort_by_key(|p| p.reason == reason::POLICY_TABLE_FULL);
            s.hooks = self.datapath.hooks().clone();
        });
    }

    fn schedule_flow_drain(&mut self, now: i64) {
        let fill = self.datapath.fill.flows;
        let pressure = fill.1 > 0 && fill.0 as u64 * 2 > u64::from(fill.1);
        let live = self
            .reporting
            .as_ref()
            .is_some_and(|r| r.live.watching(now));
        let cap = if pressure || live {
            1000
        } else {
            self.opts.max_drain_interval.as_millis() as i64
        };
        let boundary = self.agg.next_boundary_ms(now).unwrap_or(i64::MAX);
        self.next_flow_drain = boundary.min(now + cap);
        self.next_rule_drain = self.agg.next_policy_boundary_ms(now);
    }

    fn drain(&mut self, now: i64) {
        let started = Instant::now();
        if let Some(left) = self.datapath.take_leftovers() {
            // A predecessor drained these and committed them nowhere. Into
            // the open windows (not closing any: the live tables' records
            // belong there too), and into the spool before the drain below
            // empties the tables they are in.
            self.observe(&left);
            self.agg.ingest(&left, now);
            self.aggregator_state();
            self.hand_over(Vec::new(), Vec::new(), now);
        }
        let scope = if now >= self.next_flow_drain {
            DrainScope::All
        } else {
            DrainScope::Rules
        };
        let drained = match self.datapath.drain(scope) {
            Ok(d) => d,
            Err(e) => {
                error!(error = %e, "cannot drain the kernel tables");
                self.schedule_flow_drain(now);
                return;
            }
        };
        // DNS read up to now, before the connections just drained: a pod
        // resolves a name, then connects to the address (the answer was
        // copied before the connection's first packet was counted).
        self.ingest_dns(now);

        let tables = match scope {
            DrainScope::All => "all",
            DrainScope::Rules => "rules",
        };
        self.metrics
            .drain_seconds
            .get_or_create(&DrainLabels { tables })
            .observe(started.elapsed().as_secs_f64());
        self.count(&drained, now);
        if scope == DrainScope::All {
            if let Some(r) = &self.reporting
                && r.live.watching(now)
            {
                r.live.push(self.agg.live_records(&drained, now));
            }
            self.schedule_flow_drain(now);
        } else {
            // The flow tables keep their schedule.
            self.next_rule_drain = self.agg.next_policy_boundary_ms(now);
        }
        let kernel = self.datapath.counters().unwrap_or_default();
        self.shared.update(|s| {
            s.open_windows = self.agg.snapshot();
            s.kernel.last_drain_micros = started.elapsed().as_micros() as u64;
        });
        self.kernel_state(kernel);
        let entries = drained.flows.len();
        self.datapath.recycle(drained);
        crate::allocator::release_after_drain(entries);
    }

    /// The DNS packets read so far into the open windows and the name
    /// table.
    fn ingest_dns(&mut self, now: i64) {
        let dns = self.datapath.take_dns();
        if !dns.is_empty() {
            self.agg.ingest_dns(&dns, now);
        }
    }

    /// Drained records into windows; closed windows out (spooled first).
    fn count(&mut self, drained: &Drained, now: i64) {
        self.observe(drained);
        self.agg.ingest(drained, now);
        self.aggregator_state();
        let (windows, policies) = self.agg.close_due(now);
        self.publish(windows, policies, now);
    }

    /// What the aggregator's bounds could not keep, into the metrics.
    fn aggregator_state(&mut self) {
        let now = self.agg.stats.clone();
        let before = std::mem::replace(&mut self.last_agg_stats, now.clone());
        for (state, n, b) in [
            (
                "roles",
                now.roles_not_remembered,
                before.roles_not_remembered,
            ),
            (
                "window_connections",
                now.flows_not_counted,
                before.flows_not_counted,
            ),
            (
                "folded_series",
                now.folded_not_tracked,
                before.folded_not_tracked,
            ),
        ] {
            if n > b {
                self.metrics
                    .state_overflows
                    .get_or_create(&crate::metrics::StateLabels { state })
                    .inc_by(n - b);
            }
        }
    }

    fn kernel_state(&mut self, k: crate::datapath::KernelCounters) {
        let prev = self.last_kernel;
        for (table, now, before) in [
            ("flows", k.flow_table_full, prev.flow_table_full),
            ("rtt", k.rtt_table_full, prev.rtt_table_full),
            ("connections", k.conn_table_full, prev.conn_table_full),
        ] {
            // Exported at 0 from the start, so `increase()` sees the first.
            let full = self
                .metrics
                .table_full
                .get_or_create(&TableLabels { table });
            if now > before {
                full.inc_by(now - before);
            }
        }
        if k.service_translated > prev.service_translated {
            self.metrics
                .service_translated
                .inc_by(k.service_translated - prev.service_translated);
        }
        for (reason, i) in [
            ("orphan_fragment", SUSPECT_ORPHAN_FRAGMENT),
            ("truncated", SUSPECT_TRUNCATED),
            ("ipv6_extension_headers", SUSPECT_EXT_HEADERS),
            ("spoofed_source", SUSPECT_SPOOFED),
        ] {
            let (now, before) = (k.suspect[i as usize], prev.suspect[i as usize]);
            if now > before {
                self.metrics
                    .suspect_packets
                    .get_or_create(&ReasonLabels {
                        reason: reason.to_owned(),
                    })
                    .inc_by(now - before);
            }
        }
        let d = &self.agg.dns.stats;
        let prev_dns = std::mem::replace(&mut self.last_dns_stats, d.clone());
        for (outcome, now, before) in [
            ("copied", k.dns_copied, prev.dns_copied),
            ("dropped_in_kernel", k.dns_dropped, prev.dns_dropped),
            ("unreadable", d.unreadable, prev_dns.unreadable),
            ("unmatched_answer", d.unmatched, prev_dns.unmatched),
            ("pending_full", d.pending_full, prev_dns.pending_full),
            ("names_full", d.names_full, prev_dns.names_full),
        ] {
            let c = self
                .metrics
                .dns_messages
                .get_or_create(&crate::metrics::OutcomeLabels {
                    outcome: outcome.to_owned(),
                });
            if now > before {
                c.inc_by(now - before);
            }
        }
        let (names, pending) = self.agg.dns.sizes();
        self.metrics.dns_names.set(names as i64);
        self.metrics.dns_pending.set(pending as i64);
        if k.drops_without_flow > prev.drops_without_flow {
            self.metrics
                .drops_without_flow
                .inc_by(k.drops_without_flow - prev.drops_without_flow);
        }
        let drops = self.datapath.drops_by_reason().unwrap_or_default();
        for (reason, n) in &drops {
            let before = self.last_drops.get(reason).copied().unwrap_or(0);
            if *n > before {
                self.metrics
                    .kernel_drops
                    .get_or_create(&ReasonLabels {
                        reason: reason.clone(),
                    })
                    .inc_by(n - before);
            }
        }
        let fill = self.datapath.fill;
        for (table, (n, cap)) in [
            ("flows", fill.flows),
            ("rtt", fill.rtt),
            ("overflow", fill.overflow),
            ("rules", fill.rules),
            ("attempts", fill.attempts),
        ] {
            self.metrics
                .table_entries
                .get_or_create(&TableLabels { table })
                .set(n as i64);
            self.metrics
                .table_capacity
                .get_or_create(&TableLabels { table })
                .set(i64::from(cap));
        }
        // A stable message, held for a while after the last overflow: the
        // node's status is written when the problem starts and ends, not
        // on every drain of a full table (the counts are in
        // `flowlens_agent_table_full_total`).
        let now = now_ms();
        if k.flow_table_full > prev.flow_table_full {
            self.flow_table_full_at = Some(now);
        }
        let full = flow_table_full_problem(fill.flows.1, self.flow_table_full_at, now);
        self.shared.update(|s| {
            s.kernel.flow_entries = fill.flows.0;
            s.kernel.flow_capacity = fill.flows.1;
            s.kernel.rtt_entries = fill.rtt.0;
            s.kernel.rtt_capacity = fill.rtt.1;
            s.kernel.flow_table_full = k.flow_table_full;
            s.kernel.rtt_table_full = k.rtt_table_full;
            s.kernel.conn_table_full = k.conn_table_full;
            s.kernel.rtt_samples = k.rtt_samples;
            s.kernel.connect_denied = k.connect_denied;
            s.kernel.drops = drops.clone();
            s.kernel.drops_without_flow = k.drops_without_flow;
            s.kernel.service_translated = k.service_translated;
            s.problems.retain(|p| p.reason != reason::FLOW_TABLE_FULL);
            s.problems.extend(full);
        });
        self.last_kernel = k;
        self.last_drops = drops;
    }

    /// Feeds metrics from drained records.
    fn observe(&mut self, d: &Drained) {
        let (mut tx, mut rx) = ((0u64, 0u64), (0u64, 0u64));
        for (k, s) in &d.flows {
            let t = if k.direction == DIRECTION_EGRESS {
                &mut tx
            } else {
                &mut rx
            };
            t.0 = t.0.saturating_add(s.packets);
            t.1 = t.1.saturating_add(s.bytes);
        }
        for (k, s) in &d.overflow {
            let t = if k.direction == DIRECTION_EGRESS {
                &mut tx
            } else {
                &mut rx
            };
            t.0 = t.0.saturating_add(s.packets);
            t.1 = t.1.saturating_add(s.bytes);
        }
        for (dir, (p, b)) in [("egress", tx), ("ingress", rx)] {
            self.metrics
                .packets
                .get_or_create(&DirectionLabels { direction: dir })
                .inc_by(p);
            self.metrics
                .bytes
                .get_or_create(&DirectionLabels { direction: dir })
                .inc_by(b);
        }
        self.metrics.flows.set(d.flows.len() as i64);
        for (k, n) in &d.rtt {
            let mid = flowlens_agent_common::rtt_bucket_lower(k.bucket)
                + flowlens_agent_common::rtt_bucket_width(k.bucket) / 2;
            for _ in 0..(*n).min(10_000) {
                self.metrics.rtt.observe(mid as f64);
            }
        }
    }

    fn publish(&mut self, windows: Vec<ObservationWindow>, policies: Vec<PolicyWindow>, now: i64) {
        for pw in &policies {
            for m in &pw.policies {
                for (verdict, x) in [("blocked", m.blocked), ("audited", m.audited)] {
                    let labels = PolicyLabels {
                        namespace: m.namespace.clone(),
                        policy: m.name.clone(),
                        verdict,
                    };
                    self.metrics
                        .policy_packets
                        .get_or_create(&labels)
                        .inc_by(x.packets);
                    self.metrics
                        .policy_connections
                        .get_or_create(&labels)
                        .inc_by(x.connections);
                }
                let t = self
                    .policy_totals
                    .entry((m.namespace.clone(), m.name.clone()))
                    .or_insert_with(|| PolicyMatches {
                        namespace: m.namespace.clone(),
                        name: m.name.clone(),
                        ..Default::default()
                    });
                t.blocked.add(&m.blocked);
                t.audited.add(&m.audited);
            }
        }
        let totals: Vec<PolicyMatches> = self.policy_totals.values().cloned().collect();
        self.shared.update(|s| {
            for w in &windows {
                s.last_windows.insert(w.uid.clone(), w.clone());
                s.history.push(w.clone());
            }
            let excess = s.history.len().saturating_sub(crate::state::HISTORY);
            s.history.drain(..excess);
            s.policy_totals = totals;
        });
        self.hand_over(windows, policies, now);
    }

    /// Commits what was drained to the spool (closed windows, open windows
    /// as parts, the spare tables holding the records), then hands closed
    /// windows to the reporter. In that order: a part the operator has
    /// must be in the spool, or a successor could count it again.
    fn hand_over(
        &mut self,
        windows: Vec<ObservationWindow>,
        policies: Vec<PolicyWindow>,
        now: i64,
    ) {
        let Some(r) = self.reporting.as_mut() else {
            // Windows stay in `dump` only; the spare tables are emptied now
            // (a successor would count them again).
            if let Err(e) = self.datapath.clear_spares() {
                error!(error = %e, "cannot empty the spare kernel tables");
            }
            return;
        };
        let mut spooled = false;
        if let Some(spool) = r.spool.as_mut() {
            let committed = match self.datapath.spare_ids() {
                Ok(drained_maps) => {
                    let (open_windows, open_policies) = self.agg.spool_open_parts(now);
                    let new: Vec<SpooledPart> = windows
                        .iter()
                        .cloned()
                        .map(SpooledPart::Observation)
                        .chain(policies.iter().cloned().map(SpooledPart::Policy))
                        .collect();
                    let mut closed: Vec<u64> = r.outbox.lock().uncommitted_parts().collect();
                    closed.extend(new.iter().map(SpooledPart::part));
                    let state = SpoolState {
                        version: SPOOL_VERSION,
                        agent: r.agent.clone(),
                        next_part: self.agg.last_part(),
                        drained_maps,
                        open_windows,
                        open_policies,
                        closed,
                    };
                    spool.commit(&state, &new).map_err(|e| e.to_string())
                }
                Err(e) => Err(e.to_string()),
            };
            match committed {
                Ok(()) => spooled = true,
                Err(e) => {
                    // A stale state would count again what is reported
                    // from now on: it goes, and the agent goes on without.
                    let removed = spool.abandon();
                    error!(error = %e, state_removed = ?removed, "cannot write the spool: going on without it (counts drained but not committed are lost if the agent dies); check the --state-dir volume");
                    self.metrics.spool_failures.inc();
                    r.spool = None;
                }
            }
        }
        if !spooled {
            // Nothing vouches for the spare tables' records: empty them
            // now, or a successor would count them again.
            if let Err(e) = self.datapath.clear_spares() {
                error!(error = %e, "cannot empty the spare kernel tables");
            }
        }
        if windows.is_empty() && policies.is_empty() {
            return;
        }
        let dropped = {
            let mut outbox = r.outbox.lock();
            let dropped = outbox.push(windows, policies);
            self.metrics.report_buffer.set(outbox.len() as i64);
            dropped
        };
        if dropped > 0 {
            self.metrics.windows_dropped.inc_by(dropped as u64);
            warn!(dropped, "report buffer full: dropped the oldest windows");
        }
        let _ = r.wake.send(());
    }

    fn preview(&mut self) -> Preview {
        let peeked = self.datapath.peek().unwrap_or_default();
        let (windows, open) = self.agg.preview(&peeked, now_ms());
        let mut totals = self.policy_totals.clone();
        for m in open {
            let t = totals
                .entry((m.namespace.clone(), m.name.clone()))
                .or_insert_with(|| PolicyMatches {
                    namespace: m.namespace.clone(),
                    name: m.name.clone(),
                    ..Default::default()
                });
            t.blocked.add(&m.blocked);
            t.audited.add(&m.audited);
        }
        Preview {
            windows,
            policies: totals.into_values().collect(),
        }
    }

    fn shutdown(&mut self) {
        if self.spec.is_none() {
            return;
        }
        let now = now_ms();
        if let Some(left) = self.datapath.take_leftovers() {
            self.observe(&left);
            self.agg.ingest(&left, now);
        }
        if let Ok(d) = self.datapath.drain(DrainScope::All) {
            self.observe(&d);
            self.agg.ingest(&d, now);
        }
        let (windows, policies) = self.agg.flush(now);
        info!(
            windows = windows.len(),
            "flushing open windows as incomplete parts"
        );
        self.publish(windows, policies, now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_newest_waiting_config_is_applied_and_other_events_keep_their_order() {
        let spec = |revision: &str| {
            Arc::new(NodeAgentConfigSpec {
                revision: revision.into(),
                ..Default::default()
            })
        };
        let (newest, others, superseded) = newest_config(
            spec("r1"),
            [
                Event::ConfigUnavailable(None),
                Event::Config(spec("r2")),
                Event::ConfigObject("uid".into()),
                Event::ConfigUnavailable(Some("why".into())),
                Event::Config(spec("r3")),
                Event::Shutdown,
            ],
        );
        assert_eq!(newest.revision, "r3");
        assert_eq!(superseded, 2);
        let kinds: Vec<String> = others
            .iter()
            .map(|e| match e {
                Event::ConfigUnavailable(why) => format!("unavailable {why:?}"),
                Event::ConfigObject(uid) => format!("object {uid}"),
                Event::Shutdown => "shutdown".into(),
                _ => "other".into(),
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "unavailable None",
                "object uid",
                "unavailable Some(\"why\")",
                "shutdown"
            ]
        );
        // Nothing waiting: the config itself.
        let (newest, others, superseded) = newest_config(spec("r1"), []);
        assert_eq!(
            (newest.revision.as_str(), others.len(), superseded),
            ("r1", 0, 0)
        );
    }

    #[test]
    fn a_full_flow_table_is_one_steady_problem_not_a_write_per_drain() {
        assert_eq!(flow_table_full_problem(65536, None, 1_000), None);
        let at = 1_000;
        let first = flow_table_full_problem(65536, Some(at), at).unwrap();
        assert_eq!(first.reason, reason::FLOW_TABLE_FULL);
        // Drains later, still overflowing or not: the same problem, word
        // for word, so the node's status is not rewritten.
        for later in [at + 1_000, at + 60_000, at + TABLE_FULL_HELD_MS - 1] {
            assert_eq!(
                flow_table_full_problem(65536, Some(at), later),
                Some(first.clone())
            );
        }
        assert_eq!(
            flow_table_full_problem(65536, Some(at), at + TABLE_FULL_HELD_MS),
            None,
            "cleared 10 minutes after the last overflow"
        );
    }
}
