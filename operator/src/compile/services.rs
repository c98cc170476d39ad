//! The Service frontends of one node, with their ready backends: what
//! kube-proxy (iptables mode) would translate for a pod on that node, so
//! the node's agent can translate its local pods' `connect()`s itself and
//! its rules and counts see the backend pod.
//!
//! - Frontends: every ClusterIP, externalIP and LoadBalancer ingress IP of
//!   a Service with each of its ports; for `NodePort` and `LoadBalancer`
//!   Services also this node's own addresses (InternalIP, ExternalIP) with
//!   each `nodePort` (kube-proxy translates nodePorts only for local
//!   destination addresses: another node's address is translated there).
//!   Headless and ExternalName Services have no ClusterIP and are skipped,
//!   as kube-proxy skips them.
//! - Backends of a Service port: the ready endpoints of the Service's
//!   EndpointSlices whose port has the Service port's name and protocol
//!   (its number is the resolved targetPort, named or not), of the
//!   frontend's address family; sorted, deduplicated, at most
//!   [`MAX_SERVICE_BACKENDS`]. `internalTrafficPolicy: Local` keeps only
//!   the backends on this node for ClusterIP frontends (the policy is about
//!   ClusterIP traffic; externalTrafficPolicy does not apply to pods'
//!   own connections, which kube-proxy sends to every endpoint).

use std::{
    collections::{BTreeSet, HashSet},
    net::IpAddr,
};

use flowlens_api::node_agent_config::{MAX_SERVICE_BACKENDS, ServiceBackend, ServiceFrontend};

use super::Compiler;
use crate::model::{NodeInfo, ServiceInfo, ServicePortInfo};

/// Every frontend a pod on `node` can reach, sorted (by Service, address,
/// port, protocol), each address, port and protocol once.
pub(crate) fn frontends(c: &Compiler, node: &NodeInfo) -> Vec<ServiceFrontend> {
    let mut out = Vec::new();
    for s in c.services.values() {
        if s.cluster_ips.is_empty() {
            continue;
        }
        for p in &s.ports {
            service_port(c, node, s, p, &mut out);
        }
    }
    out.sort();
    // Two Services claiming one externalIP: the first (by name) keeps it.
    let mut seen = HashSet::new();
    out.retain(|f| seen.insert((f.address.clone(), f.port, f.protocol)));
    out
}

/// The frontends of one port of `s`.
fn service_port(
    c: &Compiler,
    node: &NodeInfo,
    s: &ServiceInfo,
    p: &ServicePortInfo,
    out: &mut Vec<ServiceFrontend>,
) {
    // `local_only`: internalTrafficPolicy Local applies; `node_port`: one
    // of this node's addresses with a nodePort.
    let frontend =
        |address: IpAddr, port: u16, local_only: bool, node_port: bool| ServiceFrontend {
            service: s.key(),
            address: address.to_string(),
            port,
            protocol: p.protocol,
            client_affinity: s.client_affinity,
            node_port,
            backends: backends(
                c,
                s,
                p,
                address.is_ipv4(),
                local_only.then_some(node.name.as_str()),
            ),
        };
    for ip in &s.cluster_ips {
        out.push(frontend(*ip, p.port, s.internal_local, false));
    }
    for ip in s.external_ips.iter().chain(&s.load_balancer_ips) {
        out.push(frontend(*ip, p.port, false, false));
    }
    if let (true, Some(node_port)) = (s.node_ports, p.node_port) {
        for ip in &node.addresses {
            out.push(frontend(*ip, node_port, false, true));
        }
    }
}

/// The ready backends of port `p` of `s` in one address family, only those
/// on `on_node` when given.
fn backends(
    c: &Compiler,
    s: &ServiceInfo,
    p: &ServicePortInfo,
    v4: bool,
    on_node: Option<&str>,
) -> Vec<ServiceBackend> {
    let mut set: BTreeSet<(IpAddr, u16)> = BTreeSet::new();
    let slices = c.slices_by_service.get(&s.key()).into_iter().flatten();
    for slice in slices.filter_map(|k| c.slices.get(k)) {
        let Some(port) = slice
            .ports
            .iter()
            .find(|sp| sp.name == p.name && sp.protocol == p.protocol)
        else {
            continue;
        };
        for e in &slice.endpoints {
            if on_node.is_some_and(|n| e.node.as_deref() != Some(n)) {
                continue;
            }
            for a in e.addresses.iter().filter(|a| a.is_ipv4() == v4) {
                set.insert((*a, port.port));
            }
        }
    }
    set.into_iter()
        .take(MAX_SERVICE_BACKENDS)
        .map(|(a, port)| ServiceBackend {
            address: a.to_string(),
            port,
        })
        .collect()
}

#[cfg(test)]
mod tests;
