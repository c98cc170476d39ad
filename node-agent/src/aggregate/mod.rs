//! Turns drained kernel records into per-observation windows and per-policy
//! counters. Pure: the caller passes the time and the drained records.
//!
//! Counting rule (the same as the operator's, so numbers never double): a
//! packet is counted at its sender's endpoint when the sender is traced by the
//! observation, else at its receiver's. Here that means: traffic *from* a
//! local endpoint always counts; traffic *to* it counts only when the remote
//! is not a traced endpoint of this node (the operator applies the same rule
//! for remotes traced on other nodes). A connection between two traced pods
//! counts as one flow, at the client.

mod live;
pub(crate) mod role;

use std::{
    collections::{BTreeMap, HashMap, HashSet, hash_map::Entry},
    hash::BuildHasher,
    net::{IpAddr, Ipv6Addr},
    sync::{Arc, LazyLock},
};

use flowlens_agent_common::{
    AttemptKey, AttemptStats, DIRECTION_EGRESS, FLOW_FLAG_SYN, FLOW_FLAG_SYN_ACK, FlowKey,
    FlowStats, OverflowKey, PROTO_TCP, RttKey, RuleCounterKey, RuleCounters, VERDICT_AUDIT,
    VERDICT_DROP, split_rule_scope,
};
use flowlens_api::{
    GroupBy,
    dns::{DnsWindow, MAX_RCODES, rcode_name, top_names},
    histogram::Histogram,
    network_observation::{FlowEndpoint, PodDimensions},
    node_agent_config::NodeAgentConfigSpec,
    report::{
        AttemptDirection, AttemptVerdict, MAX_NAMED_ATTEMPTS, Matches, NamedAttempt,
        ObservationWindow, POLICY_WINDOW_SECONDS, PolicyMatches, PolicyWindow, Role, Series,
        Traffic,
    },
};

use crate::{dns::tracker as dns, tables::Tables};

/// Maps of the per-drain hot path: keyed by what the kernel tables hold
/// (which a pod's traffic chooses), hashed with foldhash's randomly seeded
/// hasher rather than SipHash (several times faster on these keys, and
/// still seeded per process).
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
type FastSet<K> = HashSet<K, foldhash::fast::RandomState>;

/// Everything one drain of the kernel tables returned.
#[derive(Clone, Debug, Default)]
pub(crate) struct Drained {
    pub flows: Vec<(FlowKey, FlowStats)>,
    pub overflow: Vec<(OverflowKey, FlowStats)>,
    pub rtt: Vec<(RttKey, u64)>,
    pub rules: Vec<(RuleCounterKey, RuleCounters)>,
    /// Blocked and audited attempts by peer and port.
    pub attempts: Vec<(AttemptKey, AttemptStats)>,
    /// CLOCK_MONOTONIC (ns) when the tables were read: the kernel stamps
    /// attempts with it.
    pub read_at_ns: u64,
    /// Connections the connect hook translated from a Service frontend to
    /// a backend, with the Service's id (only those seen in `flows`).
    pub services: Vec<ConnService>,
}

/// A connection a local client opened through a Service (the client port
/// is not part of it: the connect hook runs before one is chosen).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ConnService {
    pub client: [u8; 16],
    pub backend: [u8; 16],
    pub port: u16,
    pub protocol: u8,
    pub service_id: u64,
}

/// A connection as seen from a local endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct ConnId {
    local: [u8; 16],
    remote: [u8; 16],
    local_port: u16,
    remote_port: u16,
    protocol: u8,
}

#[derive(Default, Clone)]
struct ConnFacts {
    tx: Traffic,
    rx: Traffic,
    tx_flags: u32,
    rx_flags: u32,
    retransmits: u64,
    drops: u64,
    rtt: Histogram,
    /// The Service the local client connected through (its id).
    service: Option<u64>,
}

/// An address from the kernel's 16-byte form (IPv4-mapped for IPv4).
pub(crate) fn ip_from_bytes(b: &[u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(*b);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// A local endpoint's dimensions with their hash computed once, when the
/// view is built: a series key is hashed for every drained connection, and
/// hashing the endpoint's strings and labels each time was most of it.
/// Equal endpoints have equal hashes (one hasher for the process, seeded at
/// random so that pod names cannot be chosen to collide), so two views'
/// copies of one endpoint still make one series.
#[derive(Debug, PartialEq, Eq)]
struct LocalDims {
    hash: u64,
    endpoint: FlowEndpoint,
}

static LOCAL_DIMS_HASHER: LazyLock<foldhash::fast::RandomState> =
    LazyLock::new(foldhash::fast::RandomState::default);

impl LocalDims {
    fn new(endpoint: FlowEndpoint) -> Self {
        let hash = LOCAL_DIMS_HASHER.hash_one(&endpoint);
        LocalDims { hash, endpoint }
    }
}

impl std::hash::Hash for LocalDims {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct SeriesKey {
    local: Arc<LocalDims>,
    remote: Option<IpAddr>,
    port: u16,
    protocol: u8,
    role: Role,
    service: Option<String>,
    /// The DNS name the local pods resolved to `remote`.
    remote_name: Option<Arc<str>>,
}

/// The key of the `other` series (made once; its clones share the endpoint).
static OTHER: LazyLock<SeriesKey> = LazyLock::new(SeriesKey::other);

impl SeriesKey {
    fn other() -> Self {
        SeriesKey {
            local: Arc::new(LocalDims::new(FlowEndpoint::other())),
            remote: None,
            port: 0,
            protocol: 0,
            role: Role::Client,
            service: None,
            remote_name: None,
        }
    }
}

#[derive(Default, Clone)]
struct SeriesAcc {
    flows: u64,
    tx: Traffic,
    rx: Traffic,
    retransmits: u64,
    drops: u64,
    rtt: Histogram,
}

/// The parameters of an observation that shape its windows; a change closes
/// the current window.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ObsParams {
    name: String,
    generation: i64,
    window_seconds: u32,
    max_series: u32,
    group_by: Vec<GroupBy>,
}

#[derive(Clone)]
struct ObsView {
    uid: String,
    params: ObsParams,
    /// Local address -> the dimensions of its endpoint.
    /// Shared with the series keys of the window (a key per connection
    /// would otherwise copy the endpoint's strings).
    dims: FastMap<[u8; 16], Arc<LocalDims>>,
}

#[derive(Clone)]
struct OpenWindow {
    start: i64,
    complete: bool,
    series: FastMap<SeriesKey, SeriesAcc>,
    seen: FastSet<ConnId>,
    /// Fingerprints of the series folded into `other` (64-bit hashes: a
    /// collision among the at most `MAX_FOLDED_TRACKED` tracked is
    /// negligible, and a key would cost an endpoint's strings).
    folded: FastSet<u64>,
    fingerprints: foldhash::quality::RandomState,
    overflow_packets: u64,
    dns: DnsAcc,
}

/// Distinct names counted per window (for `topNames`); queries of further
/// names are counted, not named.
pub(crate) const MAX_WINDOW_NAMES: usize = 1024;

/// The DNS of one observation's pods in an open window.
#[derive(Clone, Default)]
struct DnsAcc {
    queries: u64,
    responses: BTreeMap<u16, u64>,
    unanswered: u64,
    latency: Histogram,
    names: FastMap<Arc<str>, u64>,
}

impl DnsAcc {
    fn add(&mut self, seen: &dns::Seen) {
        match seen {
            dns::Seen::Query { qname } => {
                self.queries = self.queries.saturating_add(1);
                if let Some(n) = qname
                    && (self.names.len() < MAX_WINDOW_NAMES || self.names.contains_key(n))
                {
                    *self.names.entry(Arc::clone(n)).or_default() += 1;
                }
            }
            dns::Seen::Answer { rcode, latency_us } => {
                // Codes beyond the header's 16 cannot occur; bounded anyway.
                if self.responses.len() < MAX_RCODES || self.responses.contains_key(rcode) {
                    *self.responses.entry(*rcode).or_default() += 1;
                }
                self.latency.record(*latency_us);
            }
            dns::Seen::Nothing => {}
        }
    }

    fn window(&self) -> Option<DnsWindow> {
        let w = DnsWindow {
            queries: self.queries,
            responses: self
                .responses
                .iter()
                .map(|(c, n)| (rcode_name(*c), *n))
                .collect(),
            unanswered: self.unanswered,
            latency: self.latency.clone(),
            top_names: top_names(self.names.iter().map(|(n, c)| (n.to_string(), *c))),
        };
        (!w.is_empty()).then_some(w)
    }
}

impl OpenWindow {
    /// The next window of the same observation, in this one's tables
    /// emptied: a window holds about as many connections and series as the
    /// one before, so its tables are not grown again from nothing (at 64,000
    /// connections a window, growing them was a tenth of the agent's time).
    /// Each table keeps room for what this window held, no more (a burst's
    /// window does not keep its memory for good).
    fn reused(mut self, start: i64, complete: bool) -> Self {
        let held = (self.series.len(), self.seen.len(), self.folded.len());
        self.series.clear();
        self.seen.clear();
        self.folded.clear();
        self.series.shrink_to(held.0);
        self.seen.shrink_to(held.1);
        self.folded.shrink_to(held.2);
        OpenWindow {
            series: self.series,
            seen: self.seen,
            folded: self.folded,
            ..OpenWindow::new(start, complete)
        }
    }

    fn new(start: i64, complete: bool) -> Self {
        OpenWindow {
            start,
            complete,
            series: FastMap::default(),
            seen: FastSet::default(),
            folded: FastSet::default(),
            fingerprints: foldhash::quality::RandomState::default(),
            overflow_packets: 0,
            dns: DnsAcc::default(),
        }
    }
}

/// Bounds of the aggregator's own memory, whatever the pods do (a pod
/// opening a million connections a minute, say). Past a bound, nothing
/// counted is lost: only what the state was for is given up, and counted in
/// [`AggregatorStats`].
///
/// Connections remembered with their role (about 64 bytes each).
pub(crate) const MAX_REMEMBERED_ROLES: usize = 1 << 18;
/// Distinct connections per open window, to count each as one flow.
pub(crate) const MAX_WINDOW_CONNECTIONS: usize = 1 << 18;
/// Distinct series folded into `other` per window, to count them.
pub(crate) const MAX_FOLDED_TRACKED: usize = 1 << 16;

/// Counters the aggregator keeps about itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct AggregatorStats {
    /// Packets of addresses that are not a local endpoint of the config.
    pub unattributed_packets: u64,
    /// Rule matches of slots unknown to the generation's tables.
    pub unattributed_matches: u64,
    /// Connections whose role was decided without being remembered (the
    /// role memory was full): a later drain without the SYN decides again
    /// from the ports.
    pub roles_not_remembered: u64,
    /// Connections of a full window not counted as a flow (their bytes
    /// are): flows are undercounted rather than counted twice.
    pub flows_not_counted: u64,
    /// Series folded into `other` beyond the tracked bound (the window's
    /// `foldedSeries` is then a lower bound).
    pub folded_not_tracked: u64,
}

/// Named attempts tracked per policy in one window (the busiest
/// [`MAX_NAMED_ATTEMPTS`] are reported).
const MAX_TRACKED_ATTEMPTS: usize = 1024;

/// One named attempt's identity within a policy's window.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct AttemptId {
    pod: String,
    direction: u8,
    peer: [u8; 16],
    port: u16,
    protocol: u8,
    verdict: AttemptVerdict,
}

/// The busiest attempts, by attempts then packets, most recent first on a
/// tie (at most [`MAX_NAMED_ATTEMPTS`]).
fn busiest<'a>(named: impl Iterator<Item = &'a NamedAttempt>) -> Vec<NamedAttempt> {
    let mut v: Vec<&NamedAttempt> = named.collect();
    v.sort_by(|a, b| {
        (b.attempts, b.packets, b.last_seen, &a.pod, &a.peer, a.port).cmp(&(
            a.attempts,
            a.packets,
            a.last_seen,
            &b.pod,
            &b.peer,
            b.port,
        ))
    });
    v.into_iter().take(MAX_NAMED_ATTEMPTS).cloned().collect()
}

/// Per-observation windows and per-policy counters of one node.
#[derive(Clone)]
pub(crate) struct Aggregator {
    started_ms: i64,
    observations: BTreeMap<String, (ObsView, OpenWindow)>,
    /// Connection -> (local role, last seen ms): the SYN is only seen once.
    roles: FastMap<ConnId, (Role, i64)>,
    policy_start: i64,
    policy: BTreeMap<(String, String), PolicyMatches>,
    /// Named attempts of the open policy window, by policy.
    named: BTreeMap<(String, String), HashMap<AttemptId, NamedAttempt>>,
    generation_tables: [Option<Arc<Tables>>; 2],
    closed: Vec<ObservationWindow>,
    /// The last part number used (observation and policy parts share the
    /// counter; a successor continues from its predecessor's spool).
    parts: u64,
    /// Service id -> `namespace/name`, of this config and the one before
    /// (a connection translated just before a change still drains after it).
    service_names: HashMap<u64, String>,
    service_names_before: HashMap<u64, String>,
    /// DNS queries awaiting answers, and the names pods resolved.
    pub dns: dns::DnsTracker,
    pub stats: AggregatorStats,
}

/// A connection's local role: from the handshake when `facts` saw it, else
/// `remembered`, else guessed from ports and who sent.
fn decide_role(id: &ConnId, facts: &ConnFacts, remembered: Option<Role>) -> Role {
    let decided = (facts.tx_flags | facts.rx_flags) & (FLOW_FLAG_SYN | FLOW_FLAG_SYN_ACK) != 0;
    match (decided, remembered) {
        (false, Some(r)) => r,
        _ => role::local_role(
            facts.tx_flags,
            facts.rx_flags,
            id.local_port,
            id.remote_port,
            !facts.tx.is_zero(),
        ),
    }
}

fn window_start(now_ms: i64, seconds: u32) -> i64 {
    let s = now_ms.div_euclid(1000);
    s - s.rem_euclid(i64::from(seconds.max(1)))
}

impl ConnId {
    fn of(k: &FlowKey) -> Self {
        ConnId {
            local: k.local_addr,
            remote: k.remote_addr,
            local_port: k.local_port,
            remote_port: k.remote_port,
            protocol: k.protocol,
        }
    }
}

impl Drained {
    /// Sorts the flow records by key, which puts a connection's two
    /// directions side by side (the key's direction is its last field):
    /// what [`for_each_connection`] reads without building a map.
    pub(crate) fn sort_flows(&mut self) {
        self.flows.sort_unstable_by_key(|e| e.0);
    }
}

/// One drain's flow and RTT records, by connection, handed to `each` one
/// connection at a time. With `d.flows` sorted ([`Drained::sort_flows`]) a
/// connection's records are adjacent and no table of every connection is
/// built (at 64,000 connections that table was ~20 MB per drain); unsorted
/// records are sorted in a copy first.
fn for_each_connection(d: &Drained, mut each: impl FnMut(ConnId, &ConnFacts)) {
    let sorted_copy;
    let flows: &[(FlowKey, FlowStats)] = if d.flows.is_sorted_by(|a, b| a.0 <= b.0) {
        &d.flows
    } else {
        let mut v = d.flows.clone();
        v.sort_unstable_by_key(|e| e.0);
        sorted_copy = v;
        &sorted_copy
    };
    let mut rtt: FastMap<ConnId, Histogram> = FastMap::default();
    for (k, n) in &d.rtt {
        let id = ConnId {
            local: k.local_addr,
            remote: k.remote_addr,
            local_port: k.local_port,
            remote_port: k.remote_port,
            protocol: PROTO_TCP,
        };
        rtt.entry(id).or_default().add_bucket(k.bucket, *n);
    }
    let via: FastMap<([u8; 16], [u8; 16], u16, u8), u64> = d
        .services
        .iter()
        .map(|c| ((c.client, c.backend, c.port, c.protocol), c.service_id))
        .collect();
    let service = |id: &ConnId| {
        if via.is_empty() {
            return None;
        }
        via.get(&(id.local, id.remote, id.remote_port, id.protocol))
            .copied()
    };
    let mut finish = |id: ConnId, mut f: ConnFacts| {
        if !rtt.is_empty()
            && let Some(h) = rtt.remove(&id)
        {
            f.rtt = h;
        }
        f.service = service(&id);
        each(id, &f);
    };
    let mut current: Option<(ConnId, ConnFacts)> = None;
    for (k, s) in flows {
        let id = ConnId::of(k);
        let f = match &mut current {
            Some((open, f)) if *open == id => f,
            _ => {
                if let Some((open, f)) = current.take() {
                    finish(open, f);
                }
                &mut current.insert((id, ConnFacts::default())).1
            }
        };
        let t = Traffic {
            packets: s.packets,
            bytes: s.bytes,
            payload_bytes: s.payload_bytes,
        };
        f.drops = f.drops.saturating_add(u64::from(s.drops));
        if k.direction == DIRECTION_EGRESS {
            f.tx.add(&t);
            f.tx_flags |= s.flags;
            f.retransmits = f.retransmits.saturating_add(u64::from(s.retransmits));
        } else {
            f.rx.add(&t);
            f.rx_flags |= s.flags;
        }
    }
    if let Some((open, f)) = current.take() {
        finish(open, f);
    }
    // RTT samples of connections with no flow record in this drain.
    for (id, h) in rtt.drain() {
        let f = ConnFacts {
            rtt: h,
            service: service(&id),
            ..ConnFacts::default()
        };
        each(id, &f);
    }
}

/// What an attempt's kernel key names, through the tables of its
/// generation: the rule, the local pod (`namespace/pod`), the direction,
/// the verdict and the server's port.
pub(crate) struct AttemptOf<'a> {
    pub rule: &'a crate::tables::SlotRule,
    pub pod: &'a str,
    pub direction: u8,
    pub verdict: AttemptVerdict,
    pub port: u16,
}

pub(crate) fn attempt_of<'a>(
    generation_tables: &'a [Option<Arc<Tables>>; 2],
    k: &AttemptKey,
) -> Option<AttemptOf<'a>> {
    let (generation, direction, endpoint) = split_rule_scope(k.scope);
    let tables = generation_tables[generation as usize].as_ref()?;
    let rule = tables.slots.get(&(endpoint, direction, k.slot))?;
    let ep = tables.endpoint(endpoint)?;
    let verdict = match k.verdict {
        VERDICT_DROP => AttemptVerdict::Blocked,
        VERDICT_AUDIT => AttemptVerdict::Audited,
        _ => return None,
    };
    Some(AttemptOf {
        rule,
        pod: &ep.key,
        direction,
        verdict,
        // The server's port: the peer's when the local pod opened the
        // connection.
        port: if direction == DIRECTION_EGRESS {
            k.remote_port
        } else {
            k.local_port
        },
    })
}

/// How long a connection's role is remembered after it was last seen.
const ROLE_MEMORY_MS: i64 = 10 * 60 * 1000;

impl Aggregator {
    pub(crate) fn new(now_ms: i64) -> Self {
        Aggregator {
            started_ms: now_ms,
            observations: BTreeMap::new(),
            roles: FastMap::default(),
            policy_start: window_start(now_ms, POLICY_WINDOW_SECONDS),
            named: BTreeMap::new(),
            policy: BTreeMap::new(),
            generation_tables: [None, None],
            closed: Vec::new(),
            parts: 0,
            service_names: HashMap::new(),
            service_names_before: HashMap::new(),
            dns: dns::DnsTracker::default(),
            stats: AggregatorStats::default(),
        }
    }

    /// Tables in force for a kernel generation (to attribute rule counters).
    pub(crate) fn set_generation_tables(&mut self, generation: u32, tables: Arc<Tables>) {
        self.generation_tables[(generation & 1) as usize] = Some(tables);
    }

    /// Takes a new config. Windows of removed or reshaped observations are
    /// closed (as incomplete) and returned by the next [`Self::close_due`].
    pub(crate) fn set_config(&mut self, spec: &NodeAgentConfigSpec, now_ms: i64) {
        let endpoints: HashMap<String, &flowlens_api::node_agent_config::LocalEndpoint> =
            spec.endpoints.iter().map(|e| (e.key(), e)).collect();
        let current: HashMap<u64, String> = spec
            .services
            .iter()
            .map(|f| {
                (
                    crate::tables::services::service_id(&f.service),
                    f.service.clone(),
                )
            })
            .collect();
        self.service_names_before = std::mem::replace(&mut self.service_names, current);
        let mut next = BTreeMap::new();
        for o in &spec.observations {
            let params = ObsParams {
                name: o.name.clone(),
                generation: o.generation,
                window_seconds: o.window_seconds.max(1),
                max_series: o.max_series,
                group_by: o.group_by.clone(),
            };
            let mut dims = FastMap::default();
            for key in &o.endpoints {
                let Some(e) = endpoints.get(key) else {
                    continue;
                };
                let d = Arc::new(LocalDims::new(FlowEndpoint::project(
                    &o.group_by,
                    &o.keep_labels,
                    &PodDimensions {
                        namespace: &e.namespace,
                        workload: &e.workload,
                        pod: &e.pod,
                        node: Some(&spec.node_name),
                        zone: spec.zone.as_deref(),
                        labels: &e.labels,
                    },
                )));
                for ip in &e.ips {
                    if let Ok(ip) = ip.parse::<IpAddr>() {
                        dims.insert(crate::tables::prefix::addr_bytes(ip), Arc::clone(&d));
                    }
                }
            }
            let view = ObsView {
                uid: o.uid.clone(),
                params,
                dims,
            };
            let window = match self.observations.remove(&o.uid) {
                Some((old, w)) if old.params == view.params => w,
                Some((old, w)) => {
                    let closed = self.finish(&old, w, false, true);
                    self.closed.push(closed);
                    OpenWindow::new(window_start(now_ms, view.params.window_seconds), false)
                }
                None => OpenWindow::new(window_start(now_ms, view.params.window_seconds), false),
            };
            next.insert(o.uid.clone(), (view, window));
        }
        for (_, (old, w)) in std::mem::take(&mut self.observations) {
            let closed = self.finish(&old, w, false, true);
            self.closed.push(closed);
        }
        self.observations = next;
    }

    /// Adds one drain's records at time `now_ms`.
    pub(crate) fn ingest(&mut self, d: &Drained, now_ms: i64) {
        for_each_connection(d, |id, facts| self.add_connection(id, facts, now_ms));
        self.add_overflow(&d.overflow);
        self.add_rule_counters(&d.rules);
        self.add_attempts(&d.attempts, now_ms, d.read_at_ns);
        self.roles
            .retain(|_, (_, seen)| now_ms - *seen < ROLE_MEMORY_MS);
        for local in self.dns.expire(now_ms) {
            for (view, window) in self.observations.values_mut() {
                if view.dims.contains_key(&local) {
                    window.dns.unanswered = window.dns.unanswered.saturating_add(1);
                }
            }
        }
    }

    /// Adds DNS packets of traced pods (before the drain whose connections
    /// they named: a pod resolves, then connects).
    pub(crate) fn ingest_dns(&mut self, packets: &[dns::DnsPacket], now_ms: i64) {
        for p in packets {
            let seen = self.dns.observe(p, now_ms);
            if seen == dns::Seen::Nothing {
                continue;
            }
            for (view, window) in self.observations.values_mut() {
                if view.dims.contains_key(&p.local) {
                    window.dns.add(&seen);
                }
            }
        }
    }

    /// The local side's role: from the handshake when this drain saw it,
    /// else as remembered, else guessed from ports and who sent.
    fn role_of(&self, id: &ConnId, facts: &ConnFacts) -> Role {
        decide_role(id, facts, self.roles.get(id).map(|(r, _)| *r))
    }

    /// `role_of`, then remembered, with one hash lookup (this runs once
    /// per drained connection).
    fn remember_role(&mut self, id: &ConnId, facts: &ConnFacts, now_ms: i64) -> Role {
        let full = self.roles.len() >= MAX_REMEMBERED_ROLES;
        match self.roles.entry(*id) {
            Entry::Occupied(mut e) => {
                let role = decide_role(id, facts, Some(e.get().0));
                *e.get_mut() = (role, now_ms);
                role
            }
            Entry::Vacant(e) => {
                let role = decide_role(id, facts, None);
                if full {
                    self.stats.roles_not_remembered =
                        self.stats.roles_not_remembered.saturating_add(1);
                } else {
                    e.insert((role, now_ms));
                }
                role
            }
        }
    }

    /// The Service (`namespace/name`) a local client connected through.
    fn service_of(&self, role: Role, facts: &ConnFacts) -> Option<String> {
        match (role, facts.service) {
            (Role::Client, Some(sid)) => self
                .service_names
                .get(&sid)
                .or_else(|| self.service_names_before.get(&sid))
                .cloned(),
            _ => None,
        }
    }

    /// Adds one connection's facts to the series of every observation that
    /// traces its local side.
    fn add_connection(&mut self, id: ConnId, facts: &ConnFacts, now_ms: i64) {
        let role = self.remember_role(&id, facts, now_ms);
        let port = role::server_port(role, id.local_port, id.remote_port);
        let service = self.service_of(role, facts);
        let remote_name = self.dns.name_of(&id.local, &id.remote, now_ms);
        let mut attributed = false;
        for (view, window) in self.observations.values_mut() {
            let Some(dims) = view.dims.get(&id.local) else {
                continue;
            };
            attributed = true;
            let remote_traced_here = view.dims.contains_key(&id.remote);
            let key = SeriesKey {
                local: Arc::clone(dims),
                remote: Some(ip_from_bytes(&id.remote)),
                port,
                protocol: id.protocol,
                role,
                service: service.clone(),
                remote_name: remote_name.clone(),
            };
            let counts_flow = !(remote_traced_here && role == Role::Server);
            let new_flow = counts_flow
                && if window.seen.len() < MAX_WINDOW_CONNECTIONS {
                    window.seen.insert(id)
                } else {
                    let untracked = !window.seen.contains(&id);
                    if untracked {
                        self.stats.flows_not_counted =
                            self.stats.flows_not_counted.saturating_add(1);
                    }
                    false
                };
            let acc = series_slot(window, key, view.params.max_series, &mut self.stats);
            if new_flow {
                acc.flows = acc.flows.saturating_add(1);
            }
            acc.tx.add(&facts.tx);
            if !remote_traced_here {
                acc.rx.add(&facts.rx);
            }
            acc.retransmits = acc.retransmits.saturating_add(facts.retransmits);
            acc.drops = acc.drops.saturating_add(facts.drops);
            acc.rtt.merge(&facts.rtt);
        }
        if !attributed {
            self.stats.unattributed_packets = self
                .stats
                .unattributed_packets
                .saturating_add(facts.tx.packets.saturating_add(facts.rx.packets));
        }
    }

    /// Traffic of connections the kernel's flow table had no room for: into
    /// the `other` series of the observations tracing their local address.
    fn add_overflow(&mut self, overflow: &[(OverflowKey, FlowStats)]) {
        for (k, s) in overflow {
            let t = Traffic {
                packets: s.packets,
                bytes: s.bytes,
                payload_bytes: s.payload_bytes,
            };
            for (view, window) in self.observations.values_mut() {
                if !view.dims.contains_key(&k.local_addr) {
                    continue;
                }
                window.overflow_packets = window.overflow_packets.saturating_add(s.packets);
                let acc = window.series.entry(OTHER.clone()).or_default();
                if k.direction == DIRECTION_EGRESS {
                    acc.tx.add(&t);
                } else {
                    acc.rx.add(&t);
                }
            }
        }
    }

    /// Rule counters into the open policy window, by the policy of the
    /// rule in their slot (in the tables of their generation).
    fn add_rule_counters(&mut self, rules: &[(RuleCounterKey, RuleCounters)]) {
        for (k, c) in rules {
            let (generation, direction, endpoint) = split_rule_scope(k.scope);
            let rule = self.generation_tables[generation as usize]
                .as_ref()
                .and_then(|t| t.slots.get(&(endpoint, direction, k.slot)));
            let Some(rule) = rule else {
                self.stats.unattributed_matches = self
                    .stats
                    .unattributed_matches
                    .saturating_add(c.packets.saturating_add(c.connections));
                continue;
            };
            let m = self
                .policy
                .entry((rule.namespace.clone(), rule.policy.clone()))
                .or_insert_with(|| PolicyMatches {
                    namespace: rule.namespace.clone(),
                    name: rule.policy.clone(),
                    ..Default::default()
                });
            let add = Matches {
                packets: c.packets,
                connections: c.connections,
            };
            match k.verdict {
                VERDICT_DROP => m.blocked.add(&add),
                VERDICT_AUDIT => m.audited.add(&add),
                _ => {}
            }
        }
    }

    /// Named attempts into the open policy window (at most
    /// [`MAX_TRACKED_ATTEMPTS`] per policy; the counts hold the rest).
    fn add_attempts(
        &mut self,
        attempts: &[(AttemptKey, AttemptStats)],
        now_ms: i64,
        read_at_ns: u64,
    ) {
        for (k, a) in attempts {
            let Some(of) = attempt_of(&self.generation_tables, k) else {
                continue;
            };
            let (rule, direction, verdict) = (of.rule, of.direction, of.verdict);
            let id = AttemptId {
                pod: of.pod.to_owned(),
                direction,
                peer: k.peer,
                port: of.port,
                protocol: k.protocol,
                verdict,
            };
            let ago_ms =
                (read_at_ns.saturating_sub(a.last_ns) / 1_000_000).min(i64::MAX as u64) as i64;
            let last_seen = now_ms.saturating_sub(ago_ms).div_euclid(1000);
            let named = self
                .named
                .entry((rule.namespace.clone(), rule.policy.clone()))
                .or_default();
            let tracked = named.len();
            match named.entry(id) {
                std::collections::hash_map::Entry::Occupied(mut e) => {
                    let n = e.get_mut();
                    n.attempts = n.attempts.saturating_add(a.attempts);
                    n.packets = n.packets.saturating_add(a.packets);
                    n.last_seen = n.last_seen.max(last_seen);
                }
                std::collections::hash_map::Entry::Vacant(e) if tracked < MAX_TRACKED_ATTEMPTS => {
                    let id = e.key();
                    let n = NamedAttempt {
                        pod: id.pod.clone(),
                        direction: if id.direction == DIRECTION_EGRESS {
                            AttemptDirection::Egress
                        } else {
                            AttemptDirection::Ingress
                        },
                        peer: ip_from_bytes(&id.peer).to_string(),
                        port: id.port,
                        protocol: id.protocol,
                        verdict,
                        attempts: a.attempts,
                        packets: a.packets,
                        last_seen,
                    };
                    e.insert(n);
                }
                std::collections::hash_map::Entry::Vacant(_) => {}
            }
        }
    }

    /// The open policy window's matches, each with its busiest named
    /// attempts.
    fn policy_matches(&self) -> Vec<PolicyMatches> {
        let mut out: BTreeMap<(String, String), PolicyMatches> = self.policy.clone();
        for (key, named) in &self.named {
            let m = out.entry(key.clone()).or_insert_with(|| PolicyMatches {
                namespace: key.0.clone(),
                name: key.1.clone(),
                ..Default::default()
            });
            m.attempts = busiest(named.values());
        }
        out.into_values().collect()
    }

    /// [`Self::policy_matches`], emptying the open policy window.
    fn take_policy_matches(&mut self) -> Vec<PolicyMatches> {
        let out = self.policy_matches();
        self.policy.clear();
        self.named.clear();
        out
    }

    /// Closes every window that ended by `now_ms`.
    pub(crate) fn close_due(&mut self, now_ms: i64) -> (Vec<ObservationWindow>, Vec<PolicyWindow>) {
        let mut out = std::mem::take(&mut self.closed);
        let uids: Vec<String> = self.observations.keys().cloned().collect();
        for uid in uids {
            let (view, window) = self.observations.get(&uid).unwrap();
            let w = i64::from(view.params.window_seconds);
            if now_ms.div_euclid(1000) < window.start + w {
                continue;
            }
            let (view, window) = self.observations.remove(&uid).unwrap();
            let complete = window.complete;
            let next_start = window_start(now_ms, view.params.window_seconds);
            let part = self.next_part();
            out.push(window_part(&view, &window, part, complete, false));
            let next_complete = self.started_ms <= next_start * 1000;
            let next = window.reused(next_start, next_complete);
            self.observations.insert(uid, (view, next));
        }
        let mut policies = Vec::new();
        let pw = i64::from(POLICY_WINDOW_SECONDS);
        if now_ms.div_euclid(1000) >= self.policy_start + pw {
            let matches = self.take_policy_matches();
            if !matches.is_empty() {
                policies.push(PolicyWindow {
                    start: self.policy_start,
                    window_seconds: POLICY_WINDOW_SECONDS,
                    policies: matches,
                    part: self.next_part(),
                });
            }
            self.policy_start = window_start(now_ms, POLICY_WINDOW_SECONDS);
        }
        (out, policies)
    }

    /// The open windows as they stand (for `flowlens-agent dump`).
    pub(crate) fn snapshot(&self) -> Vec<ObservationWindow> {
        self.observations
            .iter()
            .map(|(_, (view, w))| build_window(&view.params, &view.uid, w, false))
            .collect()
    }

    /// The open windows as they would stand after also counting `peeked`
    /// (records read from the live tables without draining them).
    pub(crate) fn preview(
        &self,
        peeked: &Drained,
        now_ms: i64,
    ) -> (Vec<ObservationWindow>, Vec<PolicyMatches>) {
        let mut copy = self.clone();
        copy.ingest(peeked, now_ms);
        (copy.snapshot(), copy.policy_snapshot())
    }

    /// The next time (ms) a window of any observation ends.
    pub(crate) fn next_boundary_ms(&self, now_ms: i64) -> Option<i64> {
        self.observations
            .values()
            .map(|(v, _)| {
                (window_start(now_ms, v.params.window_seconds) + i64::from(v.params.window_seconds))
                    * 1000
            })
            .min()
    }

    /// The next time (ms) the policy window ends.
    pub(crate) fn next_policy_boundary_ms(&self, now_ms: i64) -> i64 {
        (window_start(now_ms, POLICY_WINDOW_SECONDS) + i64::from(POLICY_WINDOW_SECONDS)) * 1000
    }

    /// Closes every open window now, as incomplete (on shutdown).
    pub(crate) fn flush(&mut self, now_ms: i64) -> (Vec<ObservationWindow>, Vec<PolicyWindow>) {
        let mut out = std::mem::take(&mut self.closed);
        for (_, (view, w)) in std::mem::take(&mut self.observations) {
            out.push(self.finish(&view, w, false, true));
        }
        let matches = self.take_policy_matches();
        let policies = if matches.is_empty() {
            Vec::new()
        } else {
            let now_s = now_ms.div_euclid(1000);
            vec![PolicyWindow {
                start: self.policy_start,
                window_seconds: (now_s - self.policy_start).max(1) as u32,
                policies: matches,
                part: self.next_part(),
            }]
        };
        (out, policies)
    }

    /// The open windows as [`Self::flush`] would close them now, without
    /// closing them: what a killed agent's successor reports from the
    /// spool. Their part numbers are used up (never reused by this agent).
    pub(crate) fn spool_open_parts(
        &mut self,
        now_ms: i64,
    ) -> (Vec<ObservationWindow>, Vec<PolicyWindow>) {
        let first = self.parts + 1;
        self.parts += self.observations.len() as u64;
        let windows = self
            .observations
            .values()
            .zip(first..)
            .map(|((view, w), part)| window_part(view, w, part, false, true))
            .collect();
        let mut policies = Vec::new();
        if !self.policy.is_empty() || !self.named.is_empty() {
            let now_s = now_ms.div_euclid(1000);
            policies.push(PolicyWindow {
                start: self.policy_start,
                window_seconds: (now_s - self.policy_start)
                    .clamp(1, i64::from(POLICY_WINDOW_SECONDS))
                    as u32,
                policies: self.policy_matches(),
                part: self.next_part(),
            });
        }
        (windows, policies)
    }

    fn next_part(&mut self) -> u64 {
        self.parts += 1;
        self.parts
    }

    /// The last part number used.
    pub(crate) fn last_part(&self) -> u64 {
        self.parts
    }

    /// Continues a predecessor's numbering (every number up to `last` may
    /// be in use at the operator).
    pub(crate) fn continue_parts_after(&mut self, last: u64) {
        self.parts = self.parts.max(last);
    }

    /// Policy matches of the open policy window.
    pub(crate) fn policy_snapshot(&self) -> Vec<PolicyMatches> {
        self.policy_matches()
    }

    /// A completed part: `closed_early` when it was closed before its
    /// window ended (shutdown, observation changed).
    fn finish(
        &mut self,
        view: &ObsView,
        w: OpenWindow,
        complete: bool,
        closed_early: bool,
    ) -> ObservationWindow {
        let part = self.next_part();
        window_part(view, &w, part, complete, closed_early)
    }
}

/// Part `part` of an observation's window: what `w` holds.
fn window_part(
    view: &ObsView,
    w: &OpenWindow,
    part: u64,
    complete: bool,
    closed_early: bool,
) -> ObservationWindow {
    let mut out = build_window(&view.params, &view.uid, w, complete);
    out.part = part;
    out.closed_early = closed_early;
    out
}

fn series_slot<'w>(
    window: &'w mut OpenWindow,
    key: SeriesKey,
    max_series: u32,
    stats: &mut AggregatorStats,
) -> &'w mut SeriesAcc {
    // Most calls: room for a new series (checked without hashing `other`
    // until the window is full), or a series the window has.
    let len = window.series.len();
    let room = len < max_series as usize
        || len - usize::from(window.series.contains_key(&*OTHER)) < max_series as usize;
    if room || window.series.contains_key(&key) {
        return window.series.entry(key).or_default();
    }
    let fingerprint = window.fingerprints.hash_one(&key);
    if window.folded.len() < MAX_FOLDED_TRACKED {
        window.folded.insert(fingerprint);
    } else if !window.folded.contains(&fingerprint) {
        stats.folded_not_tracked = stats.folded_not_tracked.saturating_add(1);
    }
    // A cheap clone: the endpoint is shared.
    window.series.entry(OTHER.clone()).or_default()
}

fn build_window(
    params: &ObsParams,
    uid: &str,
    w: &OpenWindow,
    complete: bool,
) -> ObservationWindow {
    let mut out: Vec<Series> = w
        .series
        .iter()
        .map(|(k, a)| Series {
            local: FlowEndpoint::clone(&k.local.endpoint),
            remote: k.remote.map(|ip| ip.to_string()),
            remote_name: k.remote_name.as_deref().map(str::to_owned),
            port: k.port,
            protocol: k.protocol,
            role: k.role,
            service: k.service.clone(),
            flows: a.flows,
            tx: a.tx,
            rx: a.rx,
            retransmits: a.retransmits,
            drops: a.drops,
            rtt: a.rtt.clone(),
        })
        .collect();
    out.sort_by(|a, b| {
        (b.tx.bytes.saturating_add(b.rx.bytes))
            .cmp(&(a.tx.bytes.saturating_add(a.rx.bytes)))
            .then_with(|| a.remote.cmp(&b.remote))
            .then_with(|| a.port.cmp(&b.port))
    });
    ObservationWindow {
        observation: params.name.clone(),
        uid: uid.to_owned(),
        generation: params.generation,
        start: w.start,
        window_seconds: params.window_seconds,
        complete,
        series: out,
        folded_series: w.folded.len() as u64,
        overflow_packets: w.overflow_packets,
        dns: w.dns.window(),
        part: 0,
        closed_early: false,
    }
}

#[cfg(test)]
mod tests;
