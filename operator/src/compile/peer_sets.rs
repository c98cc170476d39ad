//! The address sets of rules' peers, shared by every rule with the same
//! peers: named after what selects the peers, kept up to date as pods and
//! namespaces change, built into slices on demand.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::Arc,
};

use flowlens_api::{flow_policy::Peer, node_agent_config::CidrEntry};

use super::{BuiltSet, Compiler, content_hash, selector, slices};
use crate::model::{PodInfo, PodKey};

/// One address set: the peers that select it and the pods they match.
pub(crate) struct PeerSet {
    /// The namespace a peer without `namespaceSelector` selects pods of.
    namespace: String,
    peers: Vec<Peer>,
    /// Matching pods with their addresses.
    members: BTreeMap<PodKey, Vec<IpAddr>>,
    /// Built on demand, dropped when the members change.
    built: Option<Arc<BuiltSet>>,
    /// Rules naming the set; it goes with the last.
    rules: usize,
}

pub(crate) type PeerSets = HashMap<String, PeerSet>;

/// The name of the address set of a rule of a policy in `namespace` with
/// peers `peers`. Rules with the same peers share it (and its slices); the
/// namespace counts only when a peer selects pods of the policy's own
/// namespace (a `podSelector` without `namespaceSelector`).
pub(crate) fn set_name(namespace: &str, peers: &[Peer]) -> String {
    let identity = serde_json::json!([if own_namespace(peers) { namespace } else { "" }, peers]);
    format!(
        "as-{}",
        content_hash(&serde_json::to_vec(&identity).expect("peers serialize"))
    )
}

fn own_namespace(peers: &[Peer]) -> bool {
    peers
        .iter()
        .any(|p| p.ip_block.is_none() && p.namespace_selector.is_none())
}

impl Compiler {
    /// A rule names set `name` of `peers`: made, with its members, by the
    /// first such rule.
    pub(super) fn acquire_set(&mut self, name: &str, namespace: &str, peers: &[Peer]) {
        if let Some(s) = self.peer_sets.get_mut(name) {
            s.rules += 1;
            return;
        }
        let mut set = PeerSet {
            namespace: namespace.to_owned(),
            peers: peers.to_vec(),
            members: BTreeMap::new(),
            built: None,
            rules: 1,
        };
        set.members = self.members(&set);
        self.peer_sets.insert(name.to_owned(), set);
    }

    /// A rule no longer names set `name`.
    pub(super) fn release_set(&mut self, name: &str) {
        if let Some(s) = self.peer_sets.get_mut(name) {
            s.rules -= 1;
            if s.rules == 0 {
                self.peer_sets.remove(name);
            }
        }
    }

    /// The pods `set`'s peers select, with their addresses.
    fn members(&self, set: &PeerSet) -> BTreeMap<PodKey, Vec<IpAddr>> {
        let mut members = BTreeMap::new();
        for peer in set.peers.iter().filter(|p| p.ip_block.is_none()) {
            let namespaces: Vec<&String> = match &peer.namespace_selector {
                Some(sel) => self
                    .namespaces
                    .values()
                    .filter(|n| selector::matches(sel, &n.labels))
                    .map(|n| &n.name)
                    .collect(),
                None => vec![&set.namespace],
            };
            for n in namespaces {
                for p in self.candidates(n, peer.pod_selector.as_ref()) {
                    if Self::peer_eligible(p) {
                        members.insert(p.key(), p.ips.clone());
                    }
                }
            }
        }
        members
    }

    /// Pod `key` changed (`new`: its latest version, with its namespace's
    /// labels): the sets it enters, leaves or changes addresses in.
    pub(super) fn peer_sets_pod_changed(
        &mut self,
        key: &str,
        new: Option<&PodInfo>,
        new_ns_labels: Option<&BTreeMap<String, String>>,
    ) {
        for set in self.peer_sets.values_mut() {
            let was = set.members.get(key);
            let now = match (new, new_ns_labels) {
                (Some(p), Some(l))
                    if Self::peer_eligible(p)
                        && set
                            .peers
                            .iter()
                            .any(|x| Self::peer_selects(x, &set.namespace, p, l)) =>
                {
                    Some(&p.ips)
                }
                _ => None,
            };
            if was == now {
                continue;
            }
            match now {
                Some(ips) => set.members.insert(key.to_owned(), ips.clone()),
                None => set.members.remove(key),
            };
            set.built = None;
        }
    }

    /// Namespace labels changed: the members of every set that selects
    /// namespaces by label.
    pub(super) fn peer_sets_namespaces_changed(&mut self) {
        let by_label: Vec<String> = self
            .peer_sets
            .iter()
            .filter(|(_, s)| s.peers.iter().any(|p| p.namespace_selector.is_some()))
            .map(|(n, _)| n.clone())
            .collect();
        for name in by_label {
            let members = self.members(&self.peer_sets[&name]);
            let set = self.peer_sets.get_mut(&name).expect("listed above");
            if set.members != members {
                set.members = members;
                set.built = None;
            }
        }
    }

    /// Every address set a config names (those of the rules of policies
    /// that target pods), built when its members changed since the last
    /// call.
    pub fn address_sets(&mut self) -> BTreeMap<String, Arc<BuiltSet>> {
        let named: Vec<&String> = self
            .policies
            .values()
            .filter(|p| p.spec.is_some() && !p.by_node.is_empty())
            .flat_map(|p| p.rules.iter())
            .filter(|r| !r.any_peer)
            .map(|r| &r.set_name)
            .collect();
        let mut sets = BTreeMap::new();
        for name in named {
            if sets.contains_key(name) {
                continue;
            }
            let Some(set) = self.peer_sets.get_mut(name) else {
                continue;
            };
            if set.built.is_none() {
                set.built = Some(build(name, set));
            }
            sets.insert(name.clone(), set.built.clone().expect("built above"));
        }
        sets
    }
}

/// The entries of `set` (its members' addresses and its `ipBlock`s), cut
/// into slices; a member's addresses go by the member.
fn build(name: &str, set: &PeerSet) -> Arc<BuiltSet> {
    let addresses: Vec<(&str, CidrEntry)> = set
        .members
        .iter()
        .flat_map(|(pod, ips)| {
            ips.iter().map(move |ip| {
                let len = if ip.is_ipv4() { 32 } else { 128 };
                (
                    pod.as_str(),
                    CidrEntry {
                        cidr: format!("{ip}/{len}"),
                        except: Vec::new(),
                    },
                )
            })
        })
        .collect();
    let blocks: Vec<CidrEntry> = set
        .peers
        .iter()
        .filter_map(|p| {
            p.ip_block.as_ref().map(|b| CidrEntry {
                cidr: b.cidr.clone(),
                except: b.except.clone(),
            })
        })
        .collect();
    let entries = addresses
        .iter()
        .map(|(pod, e)| (*pod, e))
        .chain(blocks.iter().map(|b| (b.cidr.as_str(), b)));
    Arc::new(BuiltSet {
        slices: slices::slices(name, entries),
    })
}
