//! Services, as kube-proxy sees them: the addresses it translates and the
//! ports, with the few settings that change which backends a client gets.

use std::net::IpAddr;

use flowlens_api::flow_policy::Protocol;
use k8s_openapi::api::core::v1::Service;
use kube::ResourceExt;

/// `namespace/name` of a Service.
pub(crate) type ServiceKey = String;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceInfo {
    pub namespace: String,
    pub name: String,
    /// `clusterIPs` (or `clusterIP`). Empty for headless and ExternalName
    /// Services, which kube-proxy does not translate at all.
    pub cluster_ips: Vec<IpAddr>,
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip`.
    pub load_balancer_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePortInfo>,
    /// `type: NodePort` or `LoadBalancer`: the ports' `nodePort`s are open
    /// on every node's addresses.
    pub node_ports: bool,
    /// `sessionAffinity: ClientIP`.
    pub client_affinity: bool,
    /// `internalTrafficPolicy: Local`: ClusterIP traffic goes only to
    /// backends on the client's own node.
    pub internal_local: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePortInfo {
    /// The port's name (`""` for the only port of a Service): EndpointSlice
    /// ports carry the same name, with the resolved target port.
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
    pub node_port: Option<u16>,
}

impl ServiceInfo {
    pub(crate) fn key(&self) -> ServiceKey {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A protocol name of the core API (`TCP`, `UDP`, `SCTP`; TCP when absent).
pub(crate) fn protocol(p: Option<&str>) -> Option<Protocol> {
    match p.unwrap_or("TCP") {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        "SCTP" => Some(Protocol::Sctp),
        _ => None,
    }
}

/// A port number of the API (an `i32`), when it is one.
pub(crate) fn port(p: i32) -> Option<u16> {
    u16::try_from(p).ok().filter(|p| *p != 0)
}

fn ips<'a>(v: impl IntoIterator<Item = &'a String>) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = v.into_iter().filter_map(|s| s.parse().ok()).collect();
    out.sort();
    out.dedup();
    out
}

/// Converts a Service.
pub(crate) fn service_info(s: &Service) -> ServiceInfo {
    let spec = s.spec.as_ref();
    let kind = spec.and_then(|s| s.type_.as_deref()).unwrap_or("ClusterIP");
    // `clusterIPs` (1.20+) holds `clusterIP` first; "None" parses as no IP.
    let cluster_ips = match spec {
        Some(sp) if kind != "ExternalName" => match &sp.cluster_ips {
            Some(v) if !v.is_empty() => ips(v),
            _ => ips(sp.cluster_ip.iter()),
        },
        _ => Vec::new(),
    };
    let ports = spec
        .and_then(|s| s.ports.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|p| {
            Some(ServicePortInfo {
                name: p.name.clone().unwrap_or_default(),
                port: port(p.port)?,
                protocol: protocol(p.protocol.as_deref())?,
                node_port: p.node_port.and_then(port),
            })
        })
        .collect();
    let load_balancer_ips = s
        .status
        .as_ref()
        .and_then(|st| st.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .map(|v| ips(v.iter().filter_map(|i| i.ip.as_ref())))
        .unwrap_or_default();
    ServiceInfo {
        namespace: s.namespace().unwrap_or_default(),
        name: s.name_any(),
        cluster_ips,
        external_ips: ips(spec
            .and_then(|s| s.external_ips.as_ref())
            .into_iter()
            .flatten()),
        load_balancer_ips,
        ports,
        node_ports: matches!(kind, "NodePort" | "LoadBalancer"),
        client_affinity: spec.and_then(|s| s.session_affinity.as_deref()) == Some("ClientIP"),
        internal_local: spec.and_then(|s| s.internal_traffic_policy.as_deref()) == Some("Local"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(v: serde_json::Value) -> ServiceInfo {
        service_info(&serde_json::from_value(v).unwrap())
    }

    #[test]
    fn converts_a_load_balancer() {
        let s = svc(serde_json::json!({
            "metadata": {"name": "db", "namespace": "data"},
            "spec": {
                "type": "LoadBalancer", "clusterIP": "10.96.0.10",
                "clusterIPs": ["10.96.0.10", "fd00:96::10"],
                "externalIPs": ["192.0.2.7"], "sessionAffinity": "ClientIP",
                "internalTrafficPolicy": "Local",
                "ports": [
                    {"name": "pg", "port": 5432, "targetPort": "postgres", "nodePort": 30432},
                    {"name": "dns", "port": 53, "protocol": "UDP"}
                ]
            },
            "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}, {"hostname": "lb.example"}]}}
        }));
        assert_eq!(s.key(), "data/db");
        assert_eq!(s.cluster_ips.len(), 2);
        assert_eq!(s.external_ips, vec!["192.0.2.7".parse::<IpAddr>().unwrap()]);
        assert_eq!(
            s.load_balancer_ips,
            vec!["198.51.100.1".parse::<IpAddr>().unwrap()]
        );
        assert!(s.node_ports && s.client_affinity && s.internal_local);
        assert_eq!(
            s.ports,
            vec![
                ServicePortInfo {
                    name: "pg".into(),
                    port: 5432,
                    protocol: Protocol::Tcp,
                    node_port: Some(30432)
                },
                ServicePortInfo {
                    name: "dns".into(),
                    port: 53,
                    protocol: Protocol::Udp,
                    node_port: None
                },
            ]
        );
    }

    #[test]
    fn headless_and_external_name_have_no_cluster_ip() {
        let headless = svc(serde_json::json!({
            "metadata": {"name": "h", "namespace": "n"},
            "spec": {"clusterIP": "None", "clusterIPs": ["None"], "ports": [{"port": 80}]}
        }));
        assert!(headless.cluster_ips.is_empty());
        assert!(!headless.node_ports);
        let ext = svc(serde_json::json!({
            "metadata": {"name": "e", "namespace": "n"},
            "spec": {"type": "ExternalName", "externalName": "example.com"}
        }));
        assert!(ext.cluster_ips.is_empty());
    }
}
