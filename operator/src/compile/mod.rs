//! The compilation core: cluster state in, one `NodeAgentConfig` spec per
//! node out. Pure (no I/O, no async) and incremental: every change reports
//! which nodes it can affect, and only those are recompiled.
//!
//! - A pod change updates the memberships it can change (observations,
//!   policy targets, rule peers) one pod at a time, without rescanning.
//! - A namespace label change re-resolves the selectors that use namespace
//!   labels; a policy or observation change re-resolves that object only.
//! - A Service or EndpointSlice change recompiles every node that has
//!   local endpoints (see [`services`]).
//! - An invalid spec keeps its last valid version in force (enforcement is
//!   never dropped by a bad edit) and is reported, never acted on.

pub(crate) mod assemble;
pub(crate) mod peer_sets;
pub(crate) mod selector;
pub(crate) mod services;
pub(crate) mod slices;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};

use flowlens_api::{
    flow_policy::{FlowPolicySpec, Peer, PolicyInForce},
    network_observation::NetworkObservationSpec,
    node_agent_config::{CollectorEndpoint, Direction, NodeAgentConfigSpec},
    validate::{self, FieldErrors},
};
use sha2::{Digest, Sha256};

use self::peer_sets::set_name;
use crate::model::{
    EndpointSliceInfo, NamespaceInfo, NodeInfo, PodInfo, PodKey, ServiceInfo, ServiceKey, SliceKey,
};

/// A content hash: the first 16 hex digits of SHA-256.
pub(crate) fn content_hash(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    d.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// Identifies a policy: (namespace, name).
pub(crate) type PolicyKey = (String, String);

/// An observation as compiled.
pub(crate) struct Observation {
    pub name: String,
    pub uid: String,
    pub generation: i64,
    /// The spec in force (the last valid one) and its generation.
    pub spec: Option<NetworkObservationSpec>,
    pub spec_generation: i64,
    /// Problems of the latest spec (its generation may be newer than `spec`'s).
    pub error: Option<FieldErrors>,
    pub window_seconds: u32,
    /// Selected pods that can be traced.
    pub selected: BTreeSet<PodKey>,
    /// Selected pods that cannot (host network).
    pub untraceable: BTreeSet<PodKey>,
    pub by_node: BTreeMap<String, BTreeSet<PodKey>>,
    /// The end (Unix seconds) of the last window its status shows, as last
    /// seen: the collector's watermark when it first hears of the observation.
    pub counted_through: Option<i64>,
}

/// One rule of a compiled policy.
pub(crate) struct Rule {
    pub direction: Direction,
    pub index: usize,
    pub any_peer: bool,
    pub peers: Vec<Peer>,
    pub ports: Vec<flowlens_api::node_agent_config::PortRange>,
    /// The name of the rule's address set: what selects the peers, not who
    /// they are (see [`set_name`]), so it stays when pods come and go. The
    /// set itself is in [`Compiler::peer_sets`], shared by every rule that
    /// names it.
    pub set_name: String,
}

/// A named address set, cut into the slices written for agents.
#[derive(Debug)]
pub struct BuiltSet {
    pub(crate) slices: Vec<slices::Slice>,
}

impl BuiltSet {
    /// How many AddressSetSlices the set is written as.
    pub fn slice_count(&self) -> usize {
        self.slices.len()
    }

    /// Every entry of the set.
    #[cfg(test)]
    pub fn entries(&self) -> Vec<flowlens_api::node_agent_config::CidrEntry> {
        let mut all: Vec<_> = self.slices.iter().flat_map(|s| s.spec.entries()).collect();
        all.sort();
        all
    }
}

/// A FlowPolicy as the compiler takes it in.
#[derive(Clone, Debug)]
pub struct PolicyObject {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// `metadata.creationTimestamp`, Unix seconds: older policies' rules
    /// rank first when an endpoint has more rules than slots.
    pub created: i64,
    pub generation: i64,
    /// The latest spec.
    pub spec: FlowPolicySpec,
    /// `status.inForce` as last written: the spec in force before a restart.
    pub in_force: Option<PolicyInForce>,
}

/// A policy as compiled.
pub(crate) struct Policy {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// `metadata.creationTimestamp`, Unix seconds.
    pub created: i64,
    pub generation: i64,
    /// The spec in force (the last valid one), its generation and revision.
    pub spec: Option<FlowPolicySpec>,
    pub spec_generation: i64,
    pub revision: Option<String>,
    pub error: Option<FieldErrors>,
    pub targets: BTreeSet<PodKey>,
    pub unenforceable: BTreeSet<PodKey>,
    pub by_node: BTreeMap<String, BTreeSet<PodKey>>,
    pub rules: Vec<Rule>,
}

/// What a status controller needs to know about a policy.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct PolicyView {
    pub revision: Option<String>,
    pub error: Option<FieldErrors>,
    pub generation: i64,
    pub targeted_nodes: BTreeSet<String>,
    pub selected_pods: usize,
    pub unenforceable_pods: Vec<PodKey>,
}

/// What a status controller needs to know about an observation.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct ObservationView {
    pub error: Option<FieldErrors>,
    pub generation: i64,
    /// The generation of the spec in force.
    pub spec_generation: i64,
    pub window_seconds: u32,
    pub selected_nodes: BTreeSet<String>,
    pub traced_pods: usize,
    pub untraceable_pods: Vec<PodKey>,
}

#[derive(Default)]
pub struct Compiler {
    nodes: BTreeMap<String, NodeInfo>,
    namespaces: HashMap<String, NamespaceInfo>,
    pods: HashMap<PodKey, PodInfo>,
    by_ns: HashMap<String, BTreeSet<PodKey>>,
    /// (namespace, label key, label value) -> pods.
    label_index: HashMap<(String, String, String), BTreeSet<PodKey>>,
    /// Pod IP -> pod (isolatable pods only).
    by_ip: HashMap<IpAddr, PodKey>,
    /// Node address (InternalIP, ExternalIP) -> node.
    node_by_address: HashMap<IpAddr, String>,
    /// Host-network pod IP -> pod (its address is its node's).
    host_network_by_ip: HashMap<IpAddr, PodKey>,
    services: HashMap<ServiceKey, ServiceInfo>,
    slices: HashMap<SliceKey, EndpointSliceInfo>,
    slices_by_service: HashMap<ServiceKey, BTreeSet<SliceKey>>,
    /// The API server serves no EndpointSlices: Services have no known
    /// backends, so none are handed to agents (they would refuse every
    /// connection to them).
    no_endpoint_slices: bool,
    observations: BTreeMap<String, Observation>,
    policies: BTreeMap<PolicyKey, Policy>,
    /// Address sets by name (see `peer_sets`).
    peer_sets: peer_sets::PeerSets,
    collector: Option<CollectorEndpoint>,
    dirty: BTreeSet<String>,
    dirty_policies: BTreeSet<PolicyKey>,
    dirty_observations: BTreeSet<String>,
    bulk: bool,
}

fn empty_labels() -> &'static BTreeMap<String, String> {
    static EMPTY: std::sync::OnceLock<BTreeMap<String, String>> = std::sync::OnceLock::new();
    EMPTY.get_or_init(BTreeMap::new)
}

impl Compiler {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a bulk load (initial sync): changes are recorded without
    /// incremental bookkeeping until [`Self::finish_bulk`] rebuilds everything.
    pub fn begin_bulk(&mut self) {
        self.bulk = true;
    }

    /// Ends a bulk load: resolves every observation and policy, marks every node dirty.
    pub fn finish_bulk(&mut self) {
        self.bulk = false;
        let names: Vec<String> = self.observations.keys().cloned().collect();
        for n in names {
            self.resolve_observation(&n);
        }
        let keys: Vec<PolicyKey> = self.policies.keys().cloned().collect();
        for k in keys {
            self.resolve_policy(&k);
        }
        self.dirty.extend(self.nodes.keys().cloned());
        self.dirty_policies.extend(self.policies.keys().cloned());
        self.dirty_observations
            .extend(self.observations.keys().cloned());
    }

    /// Where agents report, and the CA bundle they verify it with.
    pub fn collector(&self) -> Option<&CollectorEndpoint> {
        self.collector.as_ref()
    }

    pub fn set_collector(&mut self, c: Option<CollectorEndpoint>) {
        if self.collector != c {
            self.collector = c;
            self.dirty.extend(self.nodes.keys().cloned());
        }
    }

    /// Marks nodes for recompilation (a failed write, a config edited by someone else).
    pub fn mark_dirty(&mut self, nodes: impl IntoIterator<Item = String>) {
        self.dirty.extend(nodes);
    }

    /// Nodes whose config may have changed since the last call.
    pub fn take_dirty_nodes(&mut self) -> BTreeSet<String> {
        std::mem::take(&mut self.dirty)
    }

    /// Policies whose targets, validity or revision may have changed.
    pub(crate) fn take_dirty_policies(&mut self) -> BTreeSet<PolicyKey> {
        std::mem::take(&mut self.dirty_policies)
    }

    /// Observations whose selection or validity may have changed.
    pub(crate) fn take_dirty_observations(&mut self) -> BTreeSet<String> {
        std::mem::take(&mut self.dirty_observations)
    }

    pub(crate) fn node_names(&self) -> impl Iterator<Item = &String> {
        self.nodes.keys()
    }

    pub(crate) fn namespace_names(&self) -> impl Iterator<Item = &String> {
        self.namespaces.keys()
    }

    pub(crate) fn pod_keys(&self) -> impl Iterator<Item = &PodKey> {
        self.pods.keys()
    }

    pub(crate) fn policy_keys(&self) -> impl Iterator<Item = &PolicyKey> {
        self.policies.keys()
    }

    pub(crate) fn node(&self, name: &str) -> Option<&NodeInfo> {
        self.nodes.get(name)
    }

    pub(crate) fn pod(&self, key: &str) -> Option<&PodInfo> {
        self.pods.get(key)
    }

    /// The isolatable pod owning an IP.
    pub(crate) fn pod_by_ip(&self, ip: &IpAddr) -> Option<&PodInfo> {
        self.by_ip.get(ip).and_then(|k| self.pods.get(k))
    }

    /// The Service with this cluster IP (a scan: for naming the few refused
    /// Service connections of a window, not for a hot path).
    pub(crate) fn service_by_ip(&self, ip: &IpAddr) -> Option<&ServiceInfo> {
        self.services.values().find(|s| s.cluster_ips.contains(ip))
    }

    /// The node whose address this is: one of its InternalIP and ExternalIP
    /// addresses, or the IP of a host-network pod on it.
    pub(crate) fn node_by_address(&self, ip: &IpAddr) -> Option<&NodeInfo> {
        let name = self.node_by_address.get(ip).or_else(|| {
            self.host_network_by_ip
                .get(ip)
                .and_then(|k| self.pods.get(k))
                .and_then(|p| p.node.as_ref())
        })?;
        self.nodes.get(name)
    }

    pub(crate) fn observations(&self) -> impl Iterator<Item = &Observation> {
        self.observations.values()
    }

    pub(crate) fn policy(&self, key: &PolicyKey) -> Option<&Policy> {
        self.policies.get(key)
    }

    // ---- nodes and namespaces ----

    pub fn upsert_node(&mut self, n: NodeInfo) {
        if self.nodes.get(&n.name) != Some(&n) {
            self.dirty.insert(n.name.clone());
            self.unindex_node_addresses(&n.name);
            for a in &n.addresses {
                self.node_by_address.insert(*a, n.name.clone());
            }
            self.nodes.insert(n.name.clone(), n);
        }
    }

    pub(crate) fn delete_node(&mut self, name: &str) {
        self.unindex_node_addresses(name);
        if self.nodes.remove(name).is_some() {
            self.dirty.insert(name.to_owned());
        }
    }

    fn unindex_node_addresses(&mut self, name: &str) {
        if let Some(old) = self.nodes.get(name) {
            for a in &old.addresses {
                if self.node_by_address.get(a).map(String::as_str) == Some(name) {
                    self.node_by_address.remove(a);
                }
            }
        }
    }

    // ---- services ----

    pub(crate) fn service_keys(&self) -> impl Iterator<Item = &ServiceKey> {
        self.services.keys()
    }

    pub(crate) fn endpoint_slice_keys(&self) -> impl Iterator<Item = &SliceKey> {
        self.slices.keys()
    }

    pub(crate) fn upsert_service(&mut self, s: ServiceInfo) {
        let key = s.key();
        if self.services.get(&key) != Some(&s) {
            self.services.insert(key, s);
            self.services_changed();
        }
    }

    pub(crate) fn delete_service(&mut self, key: &str) {
        if self.services.remove(key).is_some() {
            self.services_changed();
        }
    }

    pub(crate) fn upsert_endpoint_slice(&mut self, s: EndpointSliceInfo) {
        let key = s.key();
        if self.slices.get(&key) == Some(&s) {
            return;
        }
        self.unindex_slice(&key);
        if let Some(svc) = &s.service {
            self.slices_by_service
                .entry(svc.clone())
                .or_default()
                .insert(key.clone());
        }
        self.slices.insert(key, s);
        self.services_changed();
    }

    pub(crate) fn delete_endpoint_slice(&mut self, key: &str) {
        self.unindex_slice(key);
        if self.slices.remove(key).is_some() {
            self.services_changed();
        }
    }

    fn unindex_slice(&mut self, key: &str) {
        let Some(svc) = self.slices.get(key).and_then(|s| s.service.clone()) else {
            return;
        };
        if let Some(set) = self.slices_by_service.get_mut(&svc) {
            set.remove(key);
            if set.is_empty() {
                self.slices_by_service.remove(&svc);
            }
        }
    }

    /// Records whether the API server serves EndpointSlices at all.
    pub(crate) fn set_endpoint_slices_served(&mut self, served: bool) {
        if self.no_endpoint_slices == served {
            self.no_endpoint_slices = !served;
            self.services_changed();
        }
    }

    /// Any Service or backend may be reached from any node, so every node
    /// with local endpoints is recompiled (nodes without any carry no
    /// Services). That is O(nodes x Services) per Endpoints change: on a
    /// large, churning cluster this is the first cost to cut (issue 12),
    /// for example by recompiling only the frontends of the changed Service.
    fn services_changed(&mut self) {
        if self.bulk {
            return;
        }
        let nodes: BTreeSet<String> = self
            .observations
            .values()
            .filter(|o| o.spec.is_some())
            .flat_map(|o| o.by_node.keys())
            .chain(
                self.policies
                    .values()
                    .filter(|p| p.spec.is_some())
                    .flat_map(|p| p.by_node.keys()),
            )
            .cloned()
            .collect();
        self.dirty.extend(nodes);
    }

    pub fn upsert_namespace(&mut self, ns: NamespaceInfo) {
        let changed = self
            .namespaces
            .get(&ns.name)
            .is_none_or(|old| old.labels != ns.labels);
        self.namespaces.insert(ns.name.clone(), ns);
        if changed && !self.bulk {
            self.namespace_labels_changed();
        }
    }

    pub(crate) fn delete_namespace(&mut self, name: &str) {
        if self.namespaces.remove(name).is_some() && !self.bulk {
            self.namespace_labels_changed();
        }
    }

    /// Re-resolves everything that selects by namespace labels.
    fn namespace_labels_changed(&mut self) {
        let obs: Vec<String> = self
            .observations
            .values()
            .filter(|o| {
                o.spec
                    .as_ref()
                    .is_some_and(|s| s.namespace_selector.is_some())
            })
            .map(|o| o.name.clone())
            .collect();
        for n in obs {
            self.resolve_observation(&n);
        }
        self.peer_sets_namespaces_changed();
    }

    fn ns_labels(&self, ns: &str) -> &BTreeMap<String, String> {
        self.namespaces
            .get(ns)
            .map(|n| &n.labels)
            .unwrap_or_else(|| empty_labels())
    }

    // ---- pods ----

    fn index_pod(&mut self, p: &PodInfo, add: bool) {
        let key = p.key();
        let set = self.by_ns.entry(p.namespace.clone()).or_default();
        if add {
            set.insert(key.clone());
        } else {
            set.remove(&key);
        }
        for (k, v) in &p.labels {
            let e = self
                .label_index
                .entry((p.namespace.clone(), k.clone(), v.clone()))
                .or_default();
            if add {
                e.insert(key.clone());
            } else {
                e.remove(&key);
            }
        }
        let by_ip = if p.isolatable() {
            Some(&mut self.by_ip)
        } else if p.host_network && p.node.is_some() && !p.finished {
            Some(&mut self.host_network_by_ip)
        } else {
            None
        };
        if let Some(by_ip) = by_ip {
            for ip in &p.ips {
                if add {
                    by_ip.insert(*ip, key.clone());
                } else if by_ip.get(ip) == Some(&key) {
                    by_ip.remove(ip);
                }
            }
        }
    }

    pub fn upsert_pod(&mut self, p: PodInfo) {
        let key = p.key();
        let old = self.pods.get(&key).cloned();
        if old.as_ref() == Some(&p) {
            return;
        }
        if let Some(o) = &old {
            self.index_pod(o, false);
        }
        self.index_pod(&p, true);
        self.pods.insert(key.clone(), p.clone());
        if !self.bulk {
            self.pod_changed(&key, old.as_ref(), Some(&p));
        }
    }

    pub(crate) fn delete_pod(&mut self, key: &str) {
        if let Some(old) = self.pods.remove(key) {
            self.index_pod(&old, false);
            if !self.bulk {
                self.pod_changed(key, Some(&old), None);
            }
        }
    }

    fn obs_selects(
        spec: &NetworkObservationSpec,
        p: &PodInfo,
        ns_labels: &BTreeMap<String, String>,
    ) -> bool {
        let ns_ok = spec.namespaces.contains(&p.namespace)
            || spec
                .namespace_selector
                .as_ref()
                .is_some_and(|s| selector::matches(s, ns_labels));
        ns_ok
            && spec
                .pod_selector
                .as_ref()
                .is_none_or(|s| selector::matches(s, &p.labels))
    }

    fn peer_selects(
        peer: &Peer,
        policy_ns: &str,
        p: &PodInfo,
        ns_labels: &BTreeMap<String, String>,
    ) -> bool {
        if peer.ip_block.is_some() {
            return false;
        }
        let ns_ok = match &peer.namespace_selector {
            Some(s) => selector::matches(s, ns_labels),
            None => p.namespace == policy_ns,
        };
        ns_ok
            && peer
                .pod_selector
                .as_ref()
                .is_none_or(|s| selector::matches(s, &p.labels))
    }

    /// A pod can be a peer when its addresses are its own.
    fn peer_eligible(p: &PodInfo) -> bool {
        !p.ips.is_empty() && !p.host_network && !p.finished
    }

    /// Incremental bookkeeping for one pod.
    fn pod_changed(&mut self, key: &str, old: Option<&PodInfo>, new: Option<&PodInfo>) {
        let new_ns_labels = new.map(|p| self.ns_labels(&p.namespace).clone());
        let ns_labels = new_ns_labels.as_ref();
        let traced = self.observations_pod_changed(key, old, new, ns_labels);
        let targeted = self.policies_pod_changed(key, old, new);
        // Configs name the sets, so only the sets change.
        self.peer_sets_pod_changed(key, new, ns_labels);
        if traced || targeted {
            for p in [old, new].into_iter().flatten() {
                if let Some(n) = &p.node {
                    self.dirty.insert(n.clone());
                }
            }
        }
    }

    /// Updates the observations that select (or selected) the pod; true when
    /// it is (or was) traced by one (then its node's config changes).
    fn observations_pod_changed(
        &mut self,
        key: &str,
        old: Option<&PodInfo>,
        new: Option<&PodInfo>,
        new_ns_labels: Option<&BTreeMap<String, String>>,
    ) -> bool {
        let mut touch = false;
        for obs in self.observations.values_mut() {
            let Some(spec) = &obs.spec else { continue };
            let was_selected = obs.selected.contains(key);
            let was = was_selected || obs.untraceable.contains(key);
            let now = match (new, new_ns_labels) {
                (Some(p), Some(l)) => Self::obs_selects(spec, p, l),
                _ => false,
            };
            if !was && !now {
                continue;
            }
            remove_member(
                &mut obs.selected,
                &mut obs.untraceable,
                &mut obs.by_node,
                key,
                old,
            );
            if let (true, Some(p)) = (now, new) {
                add_member(&mut obs.selected, &mut obs.untraceable, &mut obs.by_node, p);
            }
            // Only traced pods appear in configs.
            if was_selected || obs.selected.contains(key) {
                touch = true;
            }
            self.dirty_observations.insert(obs.name.clone());
        }
        touch
    }

    /// Updates the policies that target the pod; true when it is or was a
    /// target (its node's config changes).
    fn policies_pod_changed(
        &mut self,
        key: &str,
        old: Option<&PodInfo>,
        new: Option<&PodInfo>,
    ) -> bool {
        let mut touch = false;
        for (pkey, pol) in self.policies.iter_mut() {
            let Some(spec) = &pol.spec else { continue };
            // Targets: pods of the policy's namespace.
            let in_ns = |p: &PodInfo| p.namespace == pol.namespace;
            let was_target = pol.targets.contains(key);
            let was = was_target || pol.unenforceable.contains(key);
            let now =
                new.is_some_and(|p| in_ns(p) && selector::matches(&spec.pod_selector, &p.labels));
            if was || now {
                remove_member(
                    &mut pol.targets,
                    &mut pol.unenforceable,
                    &mut pol.by_node,
                    key,
                    old,
                );
                if let (true, Some(p)) = (now, new) {
                    add_member(
                        &mut pol.targets,
                        &mut pol.unenforceable,
                        &mut pol.by_node,
                        p,
                    );
                }
                if pol.targets.contains(key) || was_target {
                    touch = true;
                }
                self.dirty_policies.insert(pkey.clone());
            }
        }
        touch
    }

    /// Pods of namespace `ns` that may match `sel` (an index lookup when the
    /// selector requires a label, else every pod of the namespace).
    fn candidates(&self, ns: &str, sel: Option<&flowlens_api::LabelSelector>) -> Vec<&PodInfo> {
        let keys: Option<&BTreeSet<PodKey>> = match sel.and_then(selector::required_pair) {
            Some((k, v)) => self
                .label_index
                .get(&(ns.to_owned(), k.to_owned(), v.to_owned())),
            None => self.by_ns.get(ns),
        };
        keys.into_iter()
            .flatten()
            .filter_map(|k| self.pods.get(k))
            .filter(|p| sel.is_none_or(|s| selector::matches(s, &p.labels)))
            .collect()
    }

    // ---- observations ----

    pub fn upsert_observation(
        &mut self,
        name: &str,
        uid: &str,
        generation: i64,
        spec: NetworkObservationSpec,
    ) {
        let error = validate::network_observation(&spec).err();
        let o = self
            .observations
            .entry(name.to_owned())
            .or_insert_with(|| Observation {
                name: name.to_owned(),
                uid: uid.to_owned(),
                generation,
                spec: None,
                spec_generation: 0,
                error: None,
                window_seconds: 30,
                selected: BTreeSet::new(),
                untraceable: BTreeSet::new(),
                by_node: BTreeMap::new(),
                counted_through: None,
            });
        let same =
            o.generation == generation && o.uid == uid && o.spec.is_some() == error.is_none();
        o.uid = uid.to_owned();
        o.generation = generation;
        o.error = error.clone();
        if error.is_none() {
            o.window_seconds = flowlens_api::duration::parse_window(&spec.window)
                .map(|d| d.as_secs() as u32)
                .unwrap_or(30);
            o.spec = Some(spec);
            o.spec_generation = generation;
        }
        self.dirty_observations.insert(name.to_owned());
        if same && !self.bulk {
            return;
        }
        if !self.bulk {
            self.resolve_observation(name);
        }
    }

    /// Records the end of the last window an observation's status shows
    /// (changes nothing compiled).
    pub(crate) fn set_counted_through(&mut self, name: &str, end: Option<i64>) {
        if let Some(o) = self.observations.get_mut(name) {
            o.counted_through = end;
        }
    }

    pub(crate) fn delete_observation(&mut self, name: &str) {
        if let Some(o) = self.observations.remove(name) {
            self.dirty.extend(o.by_node.into_keys());
            self.dirty_observations.insert(name.to_owned());
        }
    }

    fn resolve_observation(&mut self, name: &str) {
        let Some(o) = self.observations.get(name) else {
            return;
        };
        let Some(spec) = o.spec.clone() else { return };
        let mut namespaces: BTreeSet<String> = spec.namespaces.iter().cloned().collect();
        if let Some(sel) = &spec.namespace_selector {
            namespaces.extend(
                self.namespaces
                    .values()
                    .filter(|n| selector::matches(sel, &n.labels))
                    .map(|n| n.name.clone()),
            );
        }
        let mut selected = BTreeSet::new();
        let mut untraceable = BTreeSet::new();
        let mut by_node: BTreeMap<String, BTreeSet<PodKey>> = BTreeMap::new();
        for ns in &namespaces {
            for p in self.candidates(ns, spec.pod_selector.as_ref()) {
                add_member(&mut selected, &mut untraceable, &mut by_node, p);
            }
        }
        let o = self.observations.get_mut(name).unwrap();
        let old_nodes: Vec<String> = o.by_node.keys().cloned().collect();
        self.dirty.extend(old_nodes);
        self.dirty.extend(by_node.keys().cloned());
        o.selected = selected;
        o.untraceable = untraceable;
        o.by_node = by_node;
        self.dirty_observations.insert(name.to_owned());
    }

    pub(crate) fn observation_view(&self, name: &str) -> Option<ObservationView> {
        let o = self.observations.get(name)?;
        Some(ObservationView {
            error: o.error.clone(),
            generation: o.generation,
            spec_generation: o.spec_generation,
            window_seconds: o.window_seconds,

            selected_nodes: o.by_node.keys().cloned().collect(),
            traced_pods: o.selected.len(),
            untraceable_pods: o.untraceable.iter().cloned().collect(),
        })
    }

    // ---- policies ----

    /// Takes in a policy's latest spec. A valid one is put in force; an
    /// invalid one is reported and the spec in force stays: the last valid
    /// one this compiler saw or, when it saw none (after a start), the one
    /// the policy's status says was in force, if that is valid.
    pub fn upsert_policy(&mut self, object: PolicyObject) {
        let PolicyObject {
            namespace,
            name,
            uid,
            created,
            generation,
            spec,
            in_force,
        } = object;
        let key = (namespace.clone(), name.clone());
        let error = validate::flow_policy(&spec).err();
        let p = self.policies.entry(key.clone()).or_insert_with(|| Policy {
            namespace,
            name,
            uid: String::new(),
            created,
            generation,
            spec: None,
            spec_generation: 0,
            revision: None,
            error: None,
            targets: BTreeSet::new(),
            unenforceable: BTreeSet::new(),
            by_node: BTreeMap::new(),
            rules: Vec::new(),
        });
        if p.uid != uid || p.created != created {
            // A new order among the node's rules (see `assemble`).
            self.dirty.extend(p.by_node.keys().cloned());
        }
        p.uid = uid;
        p.created = created;
        p.generation = generation;
        p.error = error.clone();
        self.dirty_policies.insert(key.clone());
        let (spec, spec_generation) = match (error, p.spec.is_some(), in_force) {
            (None, _, _) => (spec, generation),
            (Some(_), false, Some(seed)) if validate::flow_policy(&seed.spec).is_ok() => {
                (seed.spec, seed.generation)
            }
            // The last valid spec (if any) stays in force.
            (Some(_), _, _) => return,
        };
        let revision = content_hash(&serde_json::to_vec(&spec).expect("a spec serializes"));
        p.spec_generation = spec_generation;
        if p.revision.as_deref() == Some(revision.as_str()) {
            return;
        }
        p.revision = Some(revision);
        p.spec = Some(spec);
        if !self.bulk {
            self.resolve_policy(&key);
        }
    }

    pub(crate) fn delete_policy(&mut self, namespace: &str, name: &str) {
        let key = (namespace.to_owned(), name.to_owned());
        if let Some(p) = self.policies.remove(&key) {
            for r in p.rules.iter().filter(|r| !r.any_peer) {
                self.release_set(&r.set_name);
            }
            self.dirty.extend(p.by_node.into_keys());
            self.dirty_policies.insert(key);
        }
    }

    fn resolve_policy(&mut self, key: &PolicyKey) {
        let Some(pol) = self.policies.get(key) else {
            return;
        };
        let Some(spec) = pol.spec.clone() else { return };
        let ns = pol.namespace.clone();

        let mut targets = BTreeSet::new();
        let mut unenforceable = BTreeSet::new();
        let mut by_node: BTreeMap<String, BTreeSet<PodKey>> = BTreeMap::new();
        for p in self.candidates(&ns, Some(&spec.pod_selector)) {
            add_member(&mut targets, &mut unenforceable, &mut by_node, p);
        }

        let mut rules = Vec::new();
        let specs = spec
            .egress
            .iter()
            .map(|r| (Direction::Egress, &r.to, &r.ports))
            .chain(
                spec.ingress
                    .iter()
                    .map(|r| (Direction::Ingress, &r.from, &r.ports)),
            );
        let mut counters = [0usize; 2];
        for (direction, peers, ports) in specs {
            let index = &mut counters[direction as usize];
            rules.push(Rule {
                direction,
                index: *index,
                set_name: set_name(&ns, peers),
                any_peer: peers.is_empty(),
                peers: peers.clone(),
                ports: ports.iter().map(port_range).collect(),
            });
            *index += 1;
        }

        // The new rules' sets first: a set both name stays.
        for r in rules.iter().filter(|r| !r.any_peer) {
            self.acquire_set(&r.set_name, &ns, &r.peers);
        }
        let pol = self.policies.get_mut(key).unwrap();
        let old_rules = std::mem::take(&mut pol.rules);
        let old_nodes: Vec<String> = pol.by_node.keys().cloned().collect();
        self.dirty.extend(old_nodes);
        self.dirty.extend(by_node.keys().cloned());
        pol.targets = targets;
        pol.unenforceable = unenforceable;
        pol.by_node = by_node;
        pol.rules = rules;
        self.dirty_policies.insert(key.clone());
        for r in old_rules.iter().filter(|r| !r.any_peer) {
            self.release_set(&r.set_name);
        }
    }

    pub(crate) fn policy_view(&self, key: &PolicyKey) -> Option<PolicyView> {
        let p = self.policies.get(key)?;
        Some(PolicyView {
            revision: p.revision.clone(),
            error: p.error.clone(),
            generation: p.generation,
            targeted_nodes: p.by_node.keys().cloned().collect(),
            selected_pods: p.targets.len(),
            unenforceable_pods: p.unenforceable.iter().cloned().collect(),
        })
    }

    /// The spec in force of a policy and its generation, for
    /// `status.inForce` (so that it stays in force across restarts).
    pub(crate) fn policy_in_force(&self, key: &PolicyKey) -> Option<PolicyInForce> {
        let p = self.policies.get(key)?;
        Some(PolicyInForce {
            generation: p.spec_generation,
            spec: p.spec.clone()?,
        })
    }

    /// The config of one node, or `None` when the node does not exist.
    pub fn node_config(&mut self, node: &str) -> Option<NodeAgentConfigSpec> {
        let info = self.nodes.get(node)?.clone();
        Some(assemble::node_config(self, &info))
    }
}

fn port_range(
    p: &flowlens_api::flow_policy::PortSpec,
) -> flowlens_api::node_agent_config::PortRange {
    let (first, last) = match (p.port, p.end_port) {
        (None, _) => (0, u16::MAX),
        (Some(a), None) => (a, a),
        (Some(a), Some(b)) => (a, b.max(a)),
    };
    flowlens_api::node_agent_config::PortRange {
        protocol: p.protocol,
        first,
        last,
    }
}

fn add_member(
    selected: &mut BTreeSet<PodKey>,
    untraceable: &mut BTreeSet<PodKey>,
    by_node: &mut BTreeMap<String, BTreeSet<PodKey>>,
    p: &PodInfo,
) {
    let key = p.key();
    if p.isolatable() {
        selected.insert(key.clone());
        by_node
            .entry(p.node.clone().unwrap())
            .or_default()
            .insert(key);
    } else if p.host_network && !p.finished {
        untraceable.insert(key);
    }
}

fn remove_member(
    selected: &mut BTreeSet<PodKey>,
    untraceable: &mut BTreeSet<PodKey>,
    by_node: &mut BTreeMap<String, BTreeSet<PodKey>>,
    key: &str,
    old: Option<&PodInfo>,
) {
    selected.remove(key);
    untraceable.remove(key);
    let node = old.and_then(|p| p.node.clone());
    let mut drop_node = None;
    match node {
        Some(n) => {
            if let Some(s) = by_node.get_mut(&n) {
                s.remove(key);
                if s.is_empty() {
                    drop_node = Some(n);
                }
            }
        }
        None => {
            for (n, s) in by_node.iter_mut() {
                if s.remove(key) && s.is_empty() {
                    drop_node = Some(n.clone());
                }
            }
        }
    }
    if let Some(n) = drop_node {
        by_node.remove(&n);
    }
}

#[cfg(test)]
mod tests;
