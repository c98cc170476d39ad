//! The compiler's view of cluster objects: only what compilation needs,
//! converted once at the edge (so the core and its benchmarks never touch
//! full API objects, and the operator does not keep whole Pods in memory).

mod endpoint_slice;
mod service;
mod workload;

use std::{collections::BTreeMap, net::IpAddr};

use flowlens_api::node_agent_config::WorkloadRef;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::ResourceExt;

pub(crate) use endpoint_slice::{EndpointSliceInfo, SliceKey, endpoint_slice_info};
#[cfg(test)]
pub(crate) use endpoint_slice::{SliceEndpoint, SlicePort};
pub(crate) use service::{ServiceInfo, ServiceKey, ServicePortInfo, service_info};
use workload::workload_of;

/// `namespace/name`.
pub(crate) type PodKey = String;

/// The node label holding a node's zone.
pub(crate) const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
const LEGACY_ZONE_LABEL: &str = "failure-domain.beta.kubernetes.io/zone";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub node: Option<String>,
    pub ips: Vec<IpAddr>,
    pub labels: BTreeMap<String, String>,
    pub host_network: bool,
    pub workload: WorkloadRef,
    /// Succeeded or Failed: its IP may already belong to another pod.
    pub finished: bool,
}

impl PodInfo {
    pub(crate) fn key(&self) -> PodKey {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Running on a node with an IP, not host-networked: traffic can be
    /// attributed to it and blocked for it alone.
    pub(crate) fn isolatable(&self) -> bool {
        self.node.is_some() && !self.ips.is_empty() && !self.host_network && !self.finished
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    pub uid: String,
    pub zone: Option<String>,
    /// Its `InternalIP` and `ExternalIP` addresses (NodePorts are open on
    /// them; a peer with one of them is the node).
    pub addresses: Vec<IpAddr>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamespaceInfo {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

/// Converts a Pod.
pub(crate) fn pod_info(p: &Pod) -> PodInfo {
    let spec = p.spec.as_ref();
    let status = p.status.as_ref();
    let mut ips: Vec<IpAddr> = status
        .and_then(|s| s.pod_ips.as_ref())
        .map(|v| v.iter().filter_map(|i| i.ip.parse().ok()).collect())
        .unwrap_or_default();
    if ips.is_empty()
        && let Some(ip) = status
            .and_then(|s| s.pod_ip.as_ref())
            .and_then(|i| i.parse().ok())
    {
        ips.push(ip);
    }
    let owner = p
        .metadata
        .owner_references
        .as_ref()
        .and_then(|o| {
            o.iter()
                .find(|r| r.controller == Some(true))
                .or_else(|| o.first())
        })
        .map(|o| (o.kind.as_str(), o.name.as_str()));
    let labels = p.labels().clone();
    let name = p.name_any();
    let workload = workload_of(
        &name,
        owner,
        labels.get("pod-template-hash").map(String::as_str),
    );
    let phase = status.and_then(|s| s.phase.as_deref());
    PodInfo {
        namespace: p.namespace().unwrap_or_default(),
        uid: p.uid().unwrap_or_default(),
        name,
        node: spec
            .and_then(|s| s.node_name.clone())
            .filter(|n| !n.is_empty()),
        ips,
        labels,
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        workload,
        finished: matches!(phase, Some("Succeeded") | Some("Failed")),
    }
}

/// Converts a Node.
pub(crate) fn node_info(n: &Node) -> NodeInfo {
    let labels = n.labels();
    NodeInfo {
        name: n.name_any(),
        uid: n.uid().unwrap_or_default(),
        zone: labels
            .get(ZONE_LABEL)
            .or_else(|| labels.get(LEGACY_ZONE_LABEL))
            .cloned(),
        addresses: node_addresses(n),
    }
}

/// A node's `InternalIP` and `ExternalIP` addresses, sorted.
fn node_addresses(n: &Node) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = n
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| matches!(a.type_.as_str(), "InternalIP" | "ExternalIP"))
        .filter_map(|a| a.address.parse().ok())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Converts a Namespace.
pub(crate) fn namespace_info(n: &Namespace) -> NamespaceInfo {
    NamespaceInfo {
        name: n.name_any(),
        labels: n.labels().clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_a_pod() {
        let p: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "web-7d9c5b6f4-x2k8p", "namespace": "shop", "uid": "u1",
                "labels": {"app": "web", "pod-template-hash": "7d9c5b6f4"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d9c5b6f4", "uid": "rs", "controller": true}]
            },
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "x"}]},
            "status": {"phase": "Running", "podIP": "10.0.0.5", "podIPs": [{"ip": "10.0.0.5"}, {"ip": "fd00::5"}]}
        }))
        .unwrap();
        let i = pod_info(&p);
        assert_eq!(i.key(), "shop/web-7d9c5b6f4-x2k8p");
        assert_eq!(i.workload.to_string(), "Deployment/web");
        assert_eq!(i.ips.len(), 2);
        assert!(i.isolatable());
    }

    #[test]
    fn pods_that_cannot_be_isolated() {
        let p: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "n"},
            "spec": {"containers": []}
        }))
        .unwrap();
        let i = pod_info(&p);
        assert!(!i.isolatable(), "no node, no IP");
        let mut hn = i.clone();
        hn.node = Some("n1".into());
        hn.ips = vec!["10.0.0.1".parse().unwrap()];
        hn.host_network = true;
        assert!(!hn.isolatable());
        hn.host_network = false;
        hn.finished = true;
        assert!(!hn.isolatable());
    }

    #[test]
    fn zone_labels() {
        let n: Node = serde_json::from_value(serde_json::json!({"metadata": {"name": "n1", "labels": {"failure-domain.beta.kubernetes.io/zone": "z9"}}})).unwrap();
        assert_eq!(node_info(&n).zone.as_deref(), Some("z9"));
    }

    #[test]
    fn node_addresses_are_internal_and_external_ips() {
        let n: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n1"},
            "status": {"addresses": [
                {"type": "Hostname", "address": "n1"},
                {"type": "InternalIP", "address": "192.0.2.2"},
                {"type": "ExternalIP", "address": "198.51.100.2"},
                {"type": "InternalDNS", "address": "n1.internal"}
            ]}
        }))
        .unwrap();
        let a: Vec<String> = node_info(&n)
            .addresses
            .iter()
            .map(|a| a.to_string())
            .collect();
        assert_eq!(a, vec!["192.0.2.2", "198.51.100.2"]);
    }
}
