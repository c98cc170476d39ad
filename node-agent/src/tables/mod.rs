//! Compiles a `NodeAgentConfig` spec into the contents of the kernel tables
//! (endpoints, peer and port LPM entries) and the slot map used to attribute
//! rule counters. Pure: no I/O, no kernel.

pub(crate) mod prefix;
pub(crate) mod services;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::IpAddr,
};

use flowlens_agent_common::{
    DIRECTION_EGRESS, DIRECTION_INGRESS, DirectionRules, ENDPOINT_POLICY_EGRESS,
    ENDPOINT_POLICY_INGRESS, ENDPOINT_TRACE, EndpointInfo,
};
use flowlens_api::{
    flow_policy::PolicyMode,
    node_agent_config::{BlockRule, Direction, NodeAgentConfigSpec, PolicyRef},
};

use prefix::{AddrEntry, AddrPrefix, PortPrefix, PortSpan, addr_bytes, port_masks};

/// Rule slots per endpoint and direction (bits of a `u64`).
pub(crate) const MAX_SLOTS: usize = 64;

/// A local endpoint as the datapath sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct EndpointRef {
    /// `namespace/pod`.
    pub key: String,
    pub uid: String,
    pub id: u32,
    pub ips: Vec<IpAddr>,
    pub traced: bool,
    pub has_rules: bool,
}

/// What a rule slot stands for (to attribute counters).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SlotRule {
    pub rule_id: String,
    pub namespace: String,
    pub policy: String,
    pub mode: PolicyMode,
}

/// A problem found while compiling, reported in status and logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Problem {
    /// More than 64 rules for one endpoint and direction; `dropped` rules are
    /// not in force (Audit rules are dropped first).
    TooManyRules {
        endpoint: String,
        direction: Direction,
        dropped: Vec<String>,
    },
    /// A rule names an address set the config does not define.
    UnknownAddressSet { rule: String, set: String },
    /// An address set entry that is not a CIDR.
    BadCidr { set: String, value: String },
    /// A rule names an endpoint the config does not define.
    UnknownEndpoint { rule: String, endpoint: String },
    /// An endpoint IP that does not parse.
    BadEndpointIp { endpoint: String, value: String },
    /// A Service frontend or backend address that does not parse (or a
    /// backend of the other IP family).
    BadServiceAddress { service: String, value: String },
    /// The kernel's Service `table` is full: later frontends are not
    /// translated (their connections go through kube-proxy unchecked).
    TooManyServices { table: &'static str, limit: usize },
    /// The config's rules need more entries of a policy `table` than one
    /// generation has (`capacity`): the policies `left_out` (`namespace/name`)
    /// are not in the kernel; every other policy is.
    PolicyTableFull {
        table: &'static str,
        needed: usize,
        capacity: usize,
        left_out: Vec<String>,
    },
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::TooManyRules {
                endpoint,
                direction,
                dropped,
            } => write!(
                f,
                "{endpoint} has more than {MAX_SLOTS} {direction:?} rules; not in force: {}",
                dropped.join(", ")
            ),
            Problem::UnknownAddressSet { rule, set } => {
                write!(
                    f,
                    "rule {rule} names address set {set}, which the config does not define"
                )
            }
            Problem::BadCidr { set, value } => {
                write!(f, "address set {set}: {value:?} is not a CIDR")
            }
            Problem::UnknownEndpoint { rule, endpoint } => {
                write!(
                    f,
                    "rule {rule} names endpoint {endpoint}, which the config does not define"
                )
            }
            Problem::BadEndpointIp { endpoint, value } => {
                write!(f, "endpoint {endpoint}: {value:?} is not an IP address")
            }
            Problem::BadServiceAddress { service, value } => write!(
                f,
                "service {service}: {value:?} is not an IP address of the frontend's family"
            ),
            Problem::TooManyServices { table, limit } => write!(
                f,
                "more than {limit} Service {table}: the rest are not translated at connect()"
            ),
            Problem::PolicyTableFull {
                table,
                needed,
                capacity,
                left_out,
            } => write!(
                f,
                "the kernel's {table} table holds {capacity} entries per generation and the config needs {needed}; left out on this node: {}; raise --policy-table-size or select fewer peers",
                named(left_out)
            ),
        }
    }
}

/// Pods or policies named in a problem, at most.
const NAMED: usize = 5;

/// `a, b, c, d, e and 3 more`: a list for a problem's message.
pub(crate) fn named<S: AsRef<str>>(items: &[S]) -> String {
    let mut s = items
        .iter()
        .take(NAMED)
        .map(AsRef::as_ref)
        .collect::<Vec<_>>()
        .join(", ");
    if items.len() > NAMED {
        s.push_str(&format!(" and {} more", items.len() - NAMED));
    }
    s
}

/// Entries each policy table can take for one generation: the agent writes
/// the next generation while the current one is in force, so a generation
/// has half of each kernel table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Capacity {
    pub peer_classes: usize,
    pub class_rules: usize,
    pub ports: usize,
}

impl Capacity {
    /// No limit (tests).
    #[cfg(test)]
    pub(crate) const UNLIMITED: Capacity = Capacity {
        peer_classes: usize::MAX,
        class_rules: usize::MAX,
        ports: usize::MAX,
    };

    /// The capacity of one generation of kernel tables of these sizes.
    pub(crate) fn per_generation(peer_classes: u32, class_rules: u32, ports: u32) -> Capacity {
        Capacity {
            peer_classes: peer_classes as usize / 2,
            class_rules: class_rules as usize / 2,
            ports: ports as usize / 2,
        }
    }
}

/// The compiled tables, without generation (added when written).
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Tables {
    /// Kernel endpoint entries: address -> info.
    pub endpoints: Vec<([u8; 16], EndpointInfo)>,
    /// Peer class LPM entries: prefix -> class (shared by every endpoint).
    pub peer_classes: Vec<(AddrPrefix, u32)>,
    /// Class rule entries: (direction, endpoint id, class, slot mask).
    pub class_rules: Vec<(u8, u32, u32, u64)>,
    /// Port LPM entries: (direction, endpoint id, prefix, mask).
    pub ports: Vec<(u8, u32, PortPrefix, u64)>,
    /// (endpoint id, direction, slot) -> rule.
    pub slots: BTreeMap<(u32, u8, u8), SlotRule>,
    pub endpoint_refs: Vec<EndpointRef>,
    /// Service frontends and backends (the socket-level load balancer).
    pub services: services::ServiceTables,
    pub problems: Vec<Problem>,
}

impl Tables {
    /// The first policy table this generation does not fit in: (table,
    /// entries needed, capacity).
    fn overflow(&self, cap: Capacity) -> Option<(&'static str, usize, usize)> {
        [
            ("peer class", self.peer_classes.len(), cap.peer_classes),
            ("class rule", self.class_rules.len(), cap.class_rules),
            ("port", self.ports.len(), cap.ports),
        ]
        .into_iter()
        .find(|(_, n, c)| n > c)
    }

    /// Entries of the policy tables (peer classes, class rules, ports).
    pub(crate) fn policy_entries(&self) -> usize {
        self.peer_classes.len() + self.class_rules.len() + self.ports.len()
    }

    /// The endpoint with this id.
    pub(crate) fn endpoint(&self, id: u32) -> Option<&EndpointRef> {
        self.endpoint_refs.iter().find(|e| e.id == id)
    }
}

fn kernel_direction(d: Direction) -> u8 {
    match d {
        Direction::Egress => DIRECTION_EGRESS,
        Direction::Ingress => DIRECTION_INGRESS,
    }
}

/// Compiles a config for a node whose own addresses are `host_addrs` (where
/// NodePorts are translated), within the kernel's `capacity`. Never fails:
/// problems are collected in `Tables::problems`.
///
/// When the rules do not fit, whole policies are left out, in the reverse
/// of their precedence (Audit before Enforce, newer before older): the
/// longest run of policies in precedence order that fits is kept, then each
/// later policy that still fits on its own (up to [`FIT_ATTEMPTS`]). The
/// rest are reported, and everything else applies: a table that is full
/// never holds back a new pod or an unrelated policy.
pub(crate) fn compile(
    spec: &NodeAgentConfigSpec,
    host_addrs: &[IpAddr],
    capacity: Capacity,
) -> Tables {
    let all = compile_without(spec, host_addrs, &HashSet::new());
    let Some((table, needed, cap)) = all.overflow(capacity) else {
        return all;
    };
    let order = precedence(spec);
    let without = |kept: &[&PolicyRef]| -> HashSet<(&str, &str)> {
        let kept: HashSet<(&str, &str)> = kept.iter().map(|p| policy_key(p)).collect();
        order
            .iter()
            .map(|p| policy_key(p))
            .filter(|k| !kept.contains(k))
            .collect()
    };
    // The longest fitting run, by bisection (no policy always fits).
    let (mut lo, mut hi) = (0usize, order.len());
    let mut best = compile_without(spec, host_addrs, &without(&[]));
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        let t = compile_without(spec, host_addrs, &without(&order[..mid]));
        if t.overflow(capacity).is_none() {
            lo = mid;
            best = t;
        } else {
            hi = mid - 1;
        }
    }
    let mut kept: Vec<&PolicyRef> = order[..lo].to_vec();
    let mut left_out = Vec::new();
    let mut attempts = 0;
    for (i, p) in order.iter().enumerate().skip(lo) {
        // Policy `lo` is known not to fit after the run.
        if i > lo && attempts < FIT_ATTEMPTS {
            attempts += 1;
            kept.push(p);
            let t = compile_without(spec, host_addrs, &without(&kept));
            if t.overflow(capacity).is_none() {
                best = t;
                continue;
            }
            kept.pop();
        }
        left_out.push(format!("{}/{}", p.namespace, p.name));
    }
    best.problems.push(Problem::PolicyTableFull {
        table,
        needed,
        capacity: cap,
        left_out,
    });
    best
}

/// Policies tried one by one after the longest fitting run.
const FIT_ATTEMPTS: usize = 16;

fn policy_key(p: &PolicyRef) -> (&str, &str) {
    (p.namespace.as_str(), p.name.as_str())
}

/// The policies of the config's rules, the one to keep first first:
/// Enforce before Audit, then by the operator's priority (older first),
/// then by name.
fn precedence(spec: &NodeAgentConfigSpec) -> Vec<&PolicyRef> {
    let mut rank: HashMap<(&str, &str), (bool, u64, &PolicyRef)> = HashMap::new();
    for r in &spec.rules {
        let e = rank
            .entry(policy_key(&r.policy))
            .or_insert((true, u64::MAX, &r.policy));
        e.0 &= r.mode != PolicyMode::Enforce;
        e.1 = e.1.min(r.priority);
    }
    let mut order: Vec<_> = rank.into_iter().collect();
    order.sort_by_key(|&((namespace, name), (audit, priority, _))| {
        (audit, priority, namespace, name)
    });
    order.into_iter().map(|(_, (_, _, p))| p).collect()
}

/// What a rule's peers are, as an address set of the node.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum PeerSet<'a> {
    Any,
    Named(&'a str),
}

/// [`compile`] without the rules of the policies `left_out`.
fn compile_without(
    spec: &NodeAgentConfigSpec,
    host_addrs: &[IpAddr],
    left_out: &HashSet<(&str, &str)>,
) -> Tables {
    let mut t = Tables::default();
    let sets = address_sets(spec, &mut t.problems);
    let ids = number_endpoints(spec, &mut t);
    let per_endpoint = rules_per_endpoint(spec, &ids, left_out, &mut t.problems);

    let mut reported_sets = BTreeSet::new();
    let mut info: HashMap<u32, EndpointInfo> = HashMap::new();
    let mut ranked = Vec::with_capacity(per_endpoint.len());
    // The sets the rules in force name: only those are in the kernel.
    let mut used: BTreeSet<PeerSet> = BTreeSet::new();
    for ((id, dir), rules) in per_endpoint {
        let rules = rank_rules(rules, id, dir, &mut t);
        let rules_info = assign_slots(&rules, id, dir, &mut t);
        for r in &rules {
            let Some(set) = peer_set(r) else {
                continue;
            };
            if let PeerSet::Named(name) = set
                && !sets.contains_key(name)
            {
                // Matches no peer.
                if reported_sets.insert(name.to_owned()) {
                    t.problems.push(Problem::UnknownAddressSet {
                        rule: r.id.clone(),
                        set: name.to_owned(),
                    });
                }
                continue;
            }
            used.insert(set);
        }
        let e = info.entry(id).or_insert(EndpointInfo {
            id,
            ..Default::default()
        });
        if dir == DIRECTION_EGRESS {
            e.egress = rules_info;
            e.flags |= ENDPOINT_POLICY_EGRESS;
        } else {
            e.ingress = rules_info;
            e.flags |= ENDPOINT_POLICY_INGRESS;
        }
        ranked.push((id, dir, rules));
    }
    let all = [AddrEntry {
        cidr: AddrPrefix::new(0, 0),
        except: Vec::new(),
    }];
    let used: Vec<PeerSet> = used.into_iter().collect();
    let entries: Vec<&[AddrEntry]> = used
        .iter()
        .map(|s| match s {
            PeerSet::Any => &all[..],
            PeerSet::Named(name) => sets[name].as_slice(),
        })
        .collect();
    let classes = prefix::peer_classes(&entries);
    let classes_of = classes.classes_of_sets(used.len());
    let index: HashMap<PeerSet, usize> = used.iter().enumerate().map(|(i, s)| (*s, i)).collect();
    t.peer_classes = classes.entries;
    // Endpoints with the same rule list share the computed contents.
    let mut cache: HashMap<Vec<&str>, RuleContents> = HashMap::new();
    for (id, dir, rules) in ranked {
        let signature: Vec<&str> = rules.iter().map(|r| r.id.as_str()).collect();
        let (class_masks, ports) = cache
            .entry(signature)
            .or_insert_with(|| rule_contents(&rules, &index, &classes_of));
        t.class_rules
            .extend(class_masks.iter().map(|&(c, m)| (dir, id, c, m)));
        t.ports.extend(ports.iter().map(|&(p, m)| (dir, id, p, m)));
    }
    endpoint_entries(&mut t, info);
    t.services = services::compile(spec, host_addrs, &mut t.problems);
    t
}

fn peer_set(r: &BlockRule) -> Option<PeerSet<'_>> {
    if r.any_peer {
        Some(PeerSet::Any)
    } else {
        r.address_set.as_deref().map(PeerSet::Named)
    }
}

/// The class rule and port entries of one endpoint and direction.
type RuleContents = (Vec<(u32, u64)>, Vec<(PortPrefix, u64)>);

/// Address sets by name; entries that do not parse are problems.
fn address_sets<'a>(
    spec: &'a NodeAgentConfigSpec,
    problems: &mut Vec<Problem>,
) -> HashMap<&'a str, Vec<AddrEntry>> {
    let mut sets = HashMap::new();
    for set in &spec.address_sets {
        let mut entries = Vec::new();
        for e in &set.entries {
            let cidr = match e.cidr.parse() {
                Ok(n) => AddrPrefix::from_net(&n),
                Err(_) => {
                    problems.push(Problem::BadCidr {
                        set: set.name.clone(),
                        value: e.cidr.clone(),
                    });
                    continue;
                }
            };
            let mut except = Vec::new();
            for x in &e.except {
                match x.parse() {
                    Ok(n) => except.push(AddrPrefix::from_net(&n)),
                    Err(_) => problems.push(Problem::BadCidr {
                        set: set.name.clone(),
                        value: x.clone(),
                    }),
                }
            }
            entries.push(AddrEntry { cidr, except });
        }
        sets.insert(set.name.as_str(), entries);
    }
    sets
}

/// Endpoints, with ids in sorted order (into `t.endpoint_refs`); returns
/// key -> id.
fn number_endpoints(spec: &NodeAgentConfigSpec, t: &mut Tables) -> HashMap<String, u32> {
    let traced: BTreeSet<&str> = spec
        .observations
        .iter()
        .flat_map(|o| o.endpoints.iter().map(String::as_str))
        .collect();
    let mut endpoints: Vec<_> = spec.endpoints.iter().collect();
    endpoints.sort_by_key(|e| e.key());
    let mut ids: HashMap<String, u32> = HashMap::new();
    for (i, e) in endpoints.iter().enumerate() {
        let key = e.key();
        let id = i as u32 + 1;
        ids.insert(key.clone(), id);
        let mut ips = Vec::new();
        for s in &e.ips {
            match s.parse::<IpAddr>() {
                Ok(ip) => ips.push(ip),
                Err(_) => t.problems.push(Problem::BadEndpointIp {
                    endpoint: key.clone(),
                    value: s.clone(),
                }),
            }
        }
        t.endpoint_refs.push(EndpointRef {
            traced: traced.contains(key.as_str()),
            key,
            uid: e.uid.clone(),
            id,
            ips,
            has_rules: false,
        });
    }
    ids
}

/// Rules per (endpoint id, kernel direction).
fn rules_per_endpoint<'a>(
    spec: &'a NodeAgentConfigSpec,
    ids: &HashMap<String, u32>,
    left_out: &HashSet<(&str, &str)>,
    problems: &mut Vec<Problem>,
) -> BTreeMap<(u32, u8), Vec<&'a BlockRule>> {
    let mut per_endpoint: BTreeMap<(u32, u8), Vec<&BlockRule>> = BTreeMap::new();
    for rule in &spec.rules {
        if left_out.contains(&policy_key(&rule.policy)) {
            continue;
        }
        for ep in &rule.endpoints {
            match ids.get(ep) {
                Some(&id) => per_endpoint
                    .entry((id, kernel_direction(rule.direction)))
                    .or_default()
                    .push(rule),
                None => problems.push(Problem::UnknownEndpoint {
                    rule: rule.id.clone(),
                    endpoint: ep.clone(),
                }),
            }
        }
    }
    per_endpoint
}

/// One endpoint's rules in slot order, at most `MAX_SLOTS`; the rest are a
/// problem. The order: `Enforce` first, then by the operator's `priority`
/// (older policies first, see [`BlockRule::priority`]), then (for configs
/// without priorities) by id, a rule index compared as a number.
fn rank_rules<'a>(
    mut rules: Vec<&'a BlockRule>,
    id: u32,
    dir: u8,
    t: &mut Tables,
) -> Vec<&'a BlockRule> {
    rules.sort_by(|a, b| slot_order(a).cmp(&slot_order(b)));
    let mut seen = HashSet::new();
    rules.retain(|r| seen.insert(r.id.as_str()));
    if rules.len() > MAX_SLOTS {
        let dropped = rules
            .split_off(MAX_SLOTS)
            .into_iter()
            .map(|r| r.id.clone())
            .collect();
        let endpoint = t.endpoint(id).map(|e| e.key.clone()).unwrap_or_default();
        let direction = if dir == DIRECTION_EGRESS {
            Direction::Egress
        } else {
            Direction::Ingress
        };
        t.problems.push(Problem::TooManyRules {
            endpoint,
            direction,
            dropped,
        });
    }
    rules
}

/// The sort key of [`rank_rules`]: mode, priority, then the id split into
/// its policy part and its numeric index (`a/p/egress/10` after
/// `a/p/egress/2`); an id without a numeric index sorts as text.
fn slot_order(r: &BlockRule) -> (bool, u64, &str, Option<u64>, &str) {
    let audit = r.mode != PolicyMode::Enforce;
    let (policy, index) = match r.id.rsplit_once('/') {
        Some((policy, index)) => (policy, index.parse().ok()),
        None => (r.id.as_str(), None),
    };
    (audit, r.priority, policy, index, r.id.as_str())
}

/// Records each rule's slot (into `t.slots`) and returns the direction's
/// slot masks.
fn assign_slots(rules: &[&BlockRule], id: u32, dir: u8, t: &mut Tables) -> DirectionRules {
    let mut rules_info = DirectionRules::default();
    for (slot, r) in rules.iter().enumerate() {
        if r.mode == PolicyMode::Enforce {
            rules_info.enforce_mask |= 1 << slot;
        }
        if r.ports.is_empty() {
            rules_info.any_port_mask |= 1 << slot;
        }
        t.slots.insert(
            (id, dir, slot as u8),
            SlotRule {
                rule_id: r.id.clone(),
                namespace: r.policy.namespace.clone(),
                policy: r.policy.name.clone(),
                mode: r.mode,
            },
        );
    }
    rules_info
}

/// The class rule and port LPM entries of a slot-ordered rule list:
/// `classes_of[index[set]]` are the classes that hold each set.
fn rule_contents(
    rules: &[&BlockRule],
    index: &HashMap<PeerSet, usize>,
    classes_of: &[Vec<u32>],
) -> RuleContents {
    let mut masks: BTreeMap<u32, u64> = BTreeMap::new();
    for (slot, r) in rules.iter().enumerate() {
        let Some(&i) = peer_set(r).and_then(|s| index.get(&s)) else {
            continue;
        };
        for &class in &classes_of[i] {
            *masks.entry(class).or_default() |= 1u64 << slot;
        }
    }
    let spans: Vec<Vec<PortSpan>> = rules
        .iter()
        .map(|r| {
            r.ports
                .iter()
                .map(|p| PortSpan {
                    protocol: p.protocol.number(),
                    first: p.first,
                    last: p.last,
                })
                .collect()
        })
        .collect();
    let port_slots: Vec<(u8, &[PortSpan])> = spans
        .iter()
        .enumerate()
        .filter(|(_, s)| !s.is_empty())
        .map(|(slot, s)| (slot as u8, s.as_slice()))
        .collect();
    (masks.into_iter().collect(), port_masks(&port_slots))
}

/// The kernel's endpoint entries: one per address of every endpoint that is
/// traced or has rules.
fn endpoint_entries(t: &mut Tables, mut info: HashMap<u32, EndpointInfo>) {
    for ep in &mut t.endpoint_refs {
        let mut i = info.remove(&ep.id).unwrap_or(EndpointInfo {
            id: ep.id,
            ..Default::default()
        });
        ep.has_rules = i.flags & (ENDPOINT_POLICY_EGRESS | ENDPOINT_POLICY_INGRESS) != 0;
        if ep.traced {
            i.flags |= ENDPOINT_TRACE;
        }
        if i.flags == 0 {
            continue;
        }
        for ip in &ep.ips {
            t.endpoints.push((addr_bytes(*ip), i));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> NodeAgentConfigSpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    const BASE: &str = r#"
nodeName: n1
revision: r1
endpoints:
- {namespace: a, pod: client, uid: u1, workload: {kind: Deployment, name: client}, ips: [10.0.0.1, "fd00::1"]}
- {namespace: a, pod: db, uid: u2, workload: {kind: StatefulSet, name: db}, ips: [10.0.0.2]}
- {namespace: a, pod: idle, uid: u3, workload: {kind: Pod, name: idle}, ips: [10.0.0.3]}
observations:
- {name: o, uid: ou, generation: 1, windowSeconds: 30, groupBy: [namespace], topN: 10, maxSeries: 100, endpoints: [a/client, a/db]}
addressSets:
- name: dbs
  entries: [{cidr: 10.0.0.2/32}, {cidr: 10.9.0.0/16, except: [10.9.1.0/24]}]
rules:
- id: a/p/egress/0
  policy: {namespace: a, name: p, revision: x}
  direction: Egress
  mode: Enforce
  endpoints: [a/client]
  anyPeer: false
  addressSet: dbs
  ports: [{protocol: TCP, first: 5432, last: 5432}]
- id: a/q/ingress/0
  policy: {namespace: a, name: q, revision: y}
  direction: Ingress
  mode: Audit
  endpoints: [a/db]
  anyPeer: true
"#;

    #[test]
    fn endpoints_get_flags_and_one_entry_per_ip() {
        let t = compile(&spec(BASE), &[], Capacity::UNLIMITED);
        assert!(t.problems.is_empty(), "{:?}", t.problems);
        let client: Vec<_> = t.endpoints.iter().filter(|(_, i)| i.id == 1).collect();
        assert_eq!(client.len(), 2, "IPv4 and IPv6 entries");
        assert_eq!(client[0].1.flags, ENDPOINT_TRACE | ENDPOINT_POLICY_EGRESS);
        assert_eq!(client[0].1.egress.enforce_mask, 1);
        assert_eq!(client[0].1.egress.any_port_mask, 0);
        let db = t.endpoints.iter().find(|(_, i)| i.id == 2).unwrap().1;
        assert_eq!(db.flags, ENDPOINT_TRACE | ENDPOINT_POLICY_INGRESS);
        assert_eq!(db.ingress.enforce_mask, 0, "audit");
        assert_eq!(db.ingress.any_port_mask, 1);
        assert!(
            t.endpoints.iter().all(|(_, i)| i.id != 3),
            "idle pod has nothing to do"
        );
    }

    #[test]
    fn peer_classes_are_shared_and_rules_are_scoped_to_their_endpoint() {
        let t = compile(&spec(BASE), &[], Capacity::UNLIMITED);
        // The sets in use: any peer (q) and dbs (p).
        let classes: Vec<(u8, u32)> = t.peer_classes.iter().map(|(p, c)| (p.len, *c)).collect();
        assert_eq!(
            classes,
            vec![(0, 1), (128, 2), (96 + 16, 2), (96 + 24, 1)],
            "::/0 is any peer; 10.0.0.2 and 10.9/16 are also dbs; the except /24 only any peer"
        );
        assert_eq!(
            t.class_rules,
            vec![
                (DIRECTION_EGRESS, 1, 2, 1),
                (DIRECTION_INGRESS, 2, 1, 1),
                (DIRECTION_INGRESS, 2, 2, 1),
            ]
        );
        let ports: Vec<_> = t.ports.iter().filter(|(_, id, _, _)| *id == 1).collect();
        assert_eq!(ports.len(), 1);
        assert_eq!(
            (
                ports[0].2.protocol,
                ports[0].2.port,
                ports[0].2.len,
                ports[0].3
            ),
            (6, 5432, 16, 1)
        );
        assert_eq!(t.slots[&(1, DIRECTION_EGRESS, 0)].policy, "p");
    }

    /// 100 local pods with a rule each to the same 1,000 peers: the kernel
    /// holds the peers once (the old per-endpoint layout held 100,000).
    #[test]
    fn tables_grow_with_distinct_peers_not_endpoints_times_peers() {
        let mut s = spec(BASE);
        let template_ep = s.endpoints[0].clone();
        s.endpoints.clear();
        for i in 0..100 {
            let mut e = template_ep.clone();
            e.pod = format!("c{i}");
            e.uid = format!("u{i}");
            e.ips = vec![format!("10.1.0.{i}")];
            s.endpoints.push(e);
        }
        s.address_sets[0].entries = (0..1000)
            .map(|i| flowlens_api::node_agent_config::CidrEntry {
                cidr: format!("10.2.{}.{}/32", i / 256, i % 256),
                except: vec![],
            })
            .collect();
        s.rules.truncate(1);
        s.rules[0].endpoints = (0..100).map(|i| format!("a/c{i}")).collect();
        let t = compile(&s, &[], Capacity::UNLIMITED);
        assert!(t.problems.is_empty(), "{:?}", t.problems);
        assert_eq!(t.peer_classes.len(), 1000);
        assert_eq!(
            t.class_rules.len(),
            100,
            "one class, one entry per endpoint"
        );
    }

    /// Three policies; the tables hold two of them. The newest Enforce
    /// policy is left out, the older ones and a new pod's rules apply.
    #[test]
    fn a_full_table_leaves_out_whole_policies_and_applies_the_rest() {
        let mut s = spec(BASE);
        let template = s.rules[0].clone();
        s.rules.clear();
        s.policies.clear();
        s.address_sets[0].entries = (0..40)
            .map(|i| flowlens_api::node_agent_config::CidrEntry {
                cidr: format!("10.2.0.{i}/32"),
                except: vec![],
            })
            .collect();
        s.address_sets
            .push(flowlens_api::node_agent_config::AddressSet {
                name: "small".into(),
                entries: vec![flowlens_api::node_agent_config::CidrEntry {
                    cidr: "10.3.0.0/16".into(),
                    except: vec![],
                }],
            });
        for (name, priority, set) in [
            ("old", 0, "small"),
            ("big", 10, "dbs"),
            ("new", 20, "small"),
        ] {
            let mut r = template.clone();
            r.id = format!("a/{name}/egress/0");
            r.policy.name = name.into();
            r.priority = priority;
            r.address_set = Some(set.into());
            s.policies.push(r.policy.clone());
            s.rules.push(r);
        }
        let cap = Capacity {
            peer_classes: 20,
            class_rules: 20,
            ports: 20,
        };
        let t = compile(&s, &[], cap);
        match &t.problems[..] {
            [
                Problem::PolicyTableFull {
                    table,
                    needed,
                    capacity,
                    left_out,
                },
            ] => {
                assert_eq!((*table, *needed, *capacity), ("peer class", 41, 20));
                assert_eq!(left_out, &["a/big".to_owned()]);
            }
            p => panic!("{p:?}"),
        }
        let kept: BTreeSet<&str> = t.slots.values().map(|r| r.policy.as_str()).collect();
        assert_eq!(
            kept,
            BTreeSet::from(["new", "old"]),
            "the later small policy still fits"
        );
        assert_eq!(t.peer_classes.len(), 1);
        assert!(t.problems[0].to_string().contains("a/big"));

        // A new pod the kept policies select gets their rules.
        let mut pod = s.endpoints[0].clone();
        pod.pod = "client-2".into();
        pod.uid = "u9".into();
        pod.ips = vec!["10.0.0.9".into()];
        s.endpoints.push(pod);
        for r in &mut s.rules {
            r.endpoints.push("a/client-2".into());
        }
        let t = compile(&s, &[], cap);
        let id = t
            .endpoint_refs
            .iter()
            .find(|e| e.key == "a/client-2")
            .unwrap()
            .id;
        assert!(
            t.class_rules
                .iter()
                .any(|&(_, e, _, m)| e == id && m == 0b11)
        );
        assert!(
            matches!(&t.problems[..], [Problem::PolicyTableFull { left_out, .. }] if left_out == &["a/big".to_owned()])
        );
    }

    #[test]
    fn enforce_rules_take_the_first_slots_and_overflow_is_reported() {
        let mut s = spec(BASE);
        let template = s.rules[0].clone();
        s.rules.clear();
        for i in 0..70 {
            let mut r = template.clone();
            r.id = format!("a/p/egress/{i:02}");
            r.mode = if i % 2 == 0 {
                PolicyMode::Audit
            } else {
                PolicyMode::Enforce
            };
            s.rules.push(r);
        }
        let t = compile(&s, &[], Capacity::UNLIMITED);
        let client = t.endpoints.iter().find(|(_, i)| i.id == 1).unwrap().1;
        assert_eq!(
            client.egress.enforce_mask.count_ones(),
            35,
            "every enforce rule kept"
        );
        match &t.problems[..] {
            [Problem::TooManyRules { dropped, .. }] => {
                assert_eq!(dropped.len(), 6);
                assert!(
                    dropped.iter().all(|r| {
                        let i: u32 = r.rsplit('/').next().unwrap().parse().unwrap();
                        i.is_multiple_of(2)
                    }),
                    "only audit rules dropped: {dropped:?}"
                );
            }
            p => panic!("{p:?}"),
        }
    }

    /// 64 rules of an older policy `a/z-old` and 64 of a newer `a/a-new`
    /// (whose name sorts first), as the operator ranks them.
    #[test]
    fn a_newer_policy_whose_name_sorts_first_does_not_push_out_an_older_ones_rules() {
        let mut s = spec(BASE);
        let template = s.rules[0].clone();
        s.rules.clear();
        for (policy, first_priority) in [("z-old", 0), ("a-new", 64)] {
            for i in 0..64 {
                let mut r = template.clone();
                r.id = format!("a/{policy}/egress/{i}");
                r.policy.name = policy.into();
                r.priority = first_priority + i;
                s.rules.push(r);
            }
        }
        let t = compile(&s, &[], Capacity::UNLIMITED);
        assert!(
            (0..64).all(|slot| t.slots[&(1, DIRECTION_EGRESS, slot)].policy == "z-old"),
            "the older policy keeps every slot"
        );
        assert_eq!(
            t.slots[&(1, DIRECTION_EGRESS, 10)].rule_id,
            "a/z-old/egress/10"
        );
        match &t.problems[..] {
            [Problem::TooManyRules { dropped, .. }] => {
                assert_eq!(dropped.len(), 64);
                assert!(
                    dropped.iter().all(|r| r.starts_with("a/a-new/")),
                    "{dropped:?}"
                );
            }
            p => panic!("{p:?}"),
        }
    }

    /// Configs written before priorities (all 0): by id, the rule index
    /// compared as a number.
    #[test]
    fn without_priorities_rule_index_10_sorts_after_2() {
        let mut s = spec(BASE);
        let template = s.rules[0].clone();
        s.rules.clear();
        for i in (0..70).rev() {
            let mut r = template.clone();
            r.id = format!("a/p/egress/{i}");
            s.rules.push(r);
        }
        let t = compile(&s, &[], Capacity::UNLIMITED);
        assert_eq!(t.slots[&(1, DIRECTION_EGRESS, 2)].rule_id, "a/p/egress/2");
        assert_eq!(t.slots[&(1, DIRECTION_EGRESS, 10)].rule_id, "a/p/egress/10");
        match &t.problems[..] {
            [Problem::TooManyRules { dropped, .. }] => {
                assert_eq!(
                    dropped,
                    &(64..70)
                        .map(|i| format!("a/p/egress/{i}"))
                        .collect::<Vec<_>>()
                );
            }
            p => panic!("{p:?}"),
        }
    }

    #[test]
    fn problems_instead_of_panics() {
        let mut s = spec(BASE);
        s.rules[0].address_set = Some("missing".into());
        s.rules[1].endpoints.push("a/ghost".into());
        s.address_sets[0]
            .entries
            .push(flowlens_api::node_agent_config::CidrEntry {
                cidr: "nope".into(),
                except: vec![],
            });
        s.endpoints[2].ips.push("not-an-ip".into());
        let t = compile(&s, &[], Capacity::UNLIMITED);
        assert_eq!(t.problems.len(), 4, "{:?}", t.problems);
        // The rule with a missing set matches no peer: no entries for it.
        assert!(t.class_rules.iter().all(|(_, id, _, _)| *id != 1));
    }

    #[test]
    fn identical_rule_lists_compile_once_and_replicate() {
        let mut s = spec(BASE);
        s.rules[1].endpoints = vec!["a/db".into(), "a/idle".into()];
        let t = compile(&s, &[], Capacity::UNLIMITED);
        let ingress: Vec<_> = t
            .class_rules
            .iter()
            .filter(|(d, _, _, _)| *d == DIRECTION_INGRESS)
            .collect();
        // Any peer is in both classes (with and without dbs).
        let of = |id: u32| -> Vec<(u32, u64)> {
            ingress
                .iter()
                .filter(|r| r.1 == id)
                .map(|r| (r.2, r.3))
                .collect()
        };
        assert_eq!(of(2), vec![(1, 1), (2, 1)]);
        assert_eq!(of(2), of(3));
    }
}
