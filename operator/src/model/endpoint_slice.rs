//! EndpointSlices: the ready backends of a Service. Read as untyped objects
//! so that one conversion serves `discovery.k8s.io/v1` and `v1beta1` (the
//! only version of Kubernetes 1.20 and older); the fields used are the same
//! in both, except where an endpoint's node is written.

use std::{collections::BTreeMap, net::IpAddr};

use flowlens_api::flow_policy::Protocol;
use kube::{ResourceExt, api::DynamicObject};
use serde::Deserialize;

use super::service::{ServiceKey, port, protocol};

/// `namespace/name` of an EndpointSlice.
pub(crate) type SliceKey = String;

/// The label naming a slice's Service.
pub(crate) const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The v1beta1 topology key holding an endpoint's node.
const HOSTNAME_TOPOLOGY: &str = "kubernetes.io/hostname";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSliceInfo {
    pub namespace: String,
    pub name: String,
    /// `namespace/name` of the Service it belongs to; `None` when the slice
    /// has no `kubernetes.io/service-name` label (then nothing uses it).
    pub service: Option<ServiceKey>,
    /// Ready endpoints with an IP address (slices of addressType FQDN have none).
    pub endpoints: Vec<SliceEndpoint>,
    pub ports: Vec<SlicePort>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceEndpoint {
    pub addresses: Vec<IpAddr>,
    /// The node it runs on (`nodeName`, or v1beta1's
    /// `topology["kubernetes.io/hostname"]`).
    pub node: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePort {
    /// The Service port's name.
    pub name: String,
    /// The resolved target port.
    pub port: u16,
    pub protocol: Protocol,
}

impl EndpointSliceInfo {
    pub(crate) fn key(&self) -> SliceKey {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct RawSlice {
    address_type: String,
    endpoints: Option<Vec<RawEndpoint>>,
    ports: Option<Vec<RawPort>>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct RawEndpoint {
    addresses: Vec<String>,
    conditions: Option<RawConditions>,
    node_name: Option<String>,
    topology: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawConditions {
    ready: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawPort {
    name: Option<String>,
    port: Option<i32>,
    protocol: Option<String>,
}

/// Converts an EndpointSlice of either version. A slice whose body does
/// not parse has no endpoints (its Service then has no backends from it).
pub(crate) fn endpoint_slice_info(o: &DynamicObject) -> EndpointSliceInfo {
    let namespace = o.namespace().unwrap_or_default();
    let raw: RawSlice = serde_json::from_value(o.data.clone()).unwrap_or_default();
    let ip_slice = matches!(raw.address_type.as_str(), "IPv4" | "IPv6");
    let endpoints = raw
        .endpoints
        .unwrap_or_default()
        .into_iter()
        // An absent `ready` means ready.
        .filter(|e| ip_slice && e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
        .filter_map(|e| {
            let addresses: Vec<IpAddr> =
                e.addresses.iter().filter_map(|a| a.parse().ok()).collect();
            (!addresses.is_empty()).then(|| SliceEndpoint {
                addresses,
                node: e
                    .node_name
                    .or_else(|| e.topology.and_then(|mut t| t.remove(HOSTNAME_TOPOLOGY))),
            })
        })
        .collect();
    let ports = raw
        .ports
        .unwrap_or_default()
        .into_iter()
        .filter_map(|p| {
            Some(SlicePort {
                name: p.name.unwrap_or_default(),
                port: port(p.port?)?,
                protocol: protocol(p.protocol.as_deref())?,
            })
        })
        .collect();
    EndpointSliceInfo {
        service: o
            .labels()
            .get(SERVICE_NAME_LABEL)
            .map(|s| format!("{namespace}/{s}")),
        name: o.name_any(),
        namespace,
        endpoints,
        ports,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(v: serde_json::Value) -> EndpointSliceInfo {
        endpoint_slice_info(&serde_json::from_value(v).unwrap())
    }

    #[test]
    fn converts_v1() {
        let s = slice(serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "db-abc", "namespace": "data", "labels": {"kubernetes.io/service-name": "db"}},
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["10.0.2.1"], "conditions": {"ready": true}, "nodeName": "n2"},
                {"addresses": ["10.0.2.2"], "conditions": {"ready": false}, "nodeName": "n2"},
                {"addresses": ["10.0.2.3"], "nodeName": "n3"}
            ],
            "ports": [{"name": "pg", "port": 5432, "protocol": "TCP"}, {"name": "x"}]
        }));
        assert_eq!(s.key(), "data/db-abc");
        assert_eq!(s.service.as_deref(), Some("data/db"));
        let addrs: Vec<String> = s
            .endpoints
            .iter()
            .map(|e| e.addresses[0].to_string())
            .collect();
        assert_eq!(
            addrs,
            vec!["10.0.2.1", "10.0.2.3"],
            "not ready excluded; absent = ready"
        );
        assert_eq!(s.endpoints[1].node.as_deref(), Some("n3"));
        assert_eq!(
            s.ports,
            vec![SlicePort {
                name: "pg".into(),
                port: 5432,
                protocol: Protocol::Tcp
            }]
        );
    }

    #[test]
    fn converts_v1beta1_topology_and_skips_fqdn() {
        let s = slice(serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice",
            "metadata": {"name": "web-1", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv6",
            "endpoints": [{"addresses": ["fd00::1"], "conditions": {"ready": true}, "topology": {"kubernetes.io/hostname": "n1"}}],
            "ports": [{"port": 8080}]
        }));
        assert_eq!(s.endpoints[0].node.as_deref(), Some("n1"));
        assert_eq!(s.ports[0].name, "");
        let f = slice(serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "f", "namespace": "n"},
            "addressType": "FQDN",
            "endpoints": [{"addresses": ["example.com"]}]
        }));
        assert!(f.endpoints.is_empty() && f.service.is_none());
    }
}
