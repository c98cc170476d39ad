//! Building `NodeAgentConfig` specs for agent tests (what the operator would
//! write), from topology pods.

use flowlens_api::{
    GroupBy,
    flow_policy::{PolicyMode, Protocol},
    node_agent_config::{
        AddressSet, BlockRule, CidrEntry, Direction, LocalEndpoint, NodeAgentConfigSpec,
        ObservationConfig, PolicyRef, PortRange, ServiceBackend, ServiceFrontend, WorkloadRef,
    },
};

use crate::topology::Topology;

/// A spec for one node.
pub struct SpecBuilder<'a> {
    topo: &'a Topology,
    node: usize,
    pub spec: NodeAgentConfigSpec,
    revision: u32,
}

impl<'a> SpecBuilder<'a> {
    pub fn new(topo: &'a Topology, node: usize) -> Self {
        let n = &topo.nodes[node];
        SpecBuilder {
            topo,
            node,
            spec: NodeAgentConfigSpec {
                node_name: n.name.clone(),
                zone: n.zone.clone(),
                revision: "r0".into(),
                ..Default::default()
            },
            revision: 0,
        }
    }

    fn key(&self, pod: usize) -> String {
        format!("test/{}", self.topo.pods[pod].name)
    }

    fn ensure_endpoint(&mut self, pod: usize) -> String {
        let key = self.key(pod);
        assert_eq!(
            self.topo.pods[pod].node, self.node,
            "pod {} is not on this node",
            self.topo.pods[pod].name
        );
        if !self.spec.endpoints.iter().any(|e| e.key() == key) {
            let p = &self.topo.pods[pod];
            self.spec.endpoints.push(LocalEndpoint {
                namespace: "test".into(),
                pod: p.name.clone(),
                uid: p.uid.clone(),
                workload: WorkloadRef {
                    kind: "Deployment".into(),
                    name: p.name.clone(),
                },
                ips: vec![p.ip4.to_string(), p.ip6.to_string()],
                labels: Default::default(),
            });
        }
        key
    }

    /// Traces `pods` (all on this node) in observation `uid`.
    pub fn trace(&mut self, uid: &str, window_seconds: u32, pods: &[usize]) -> &mut Self {
        let endpoints = pods.iter().map(|p| self.ensure_endpoint(*p)).collect();
        self.spec.observations.push(ObservationConfig {
            name: uid.into(),
            uid: uid.into(),
            generation: 1,
            window_seconds,
            group_by: vec![GroupBy::Namespace, GroupBy::Pod],
            keep_labels: vec![],
            top_n: 10,
            max_series: 1000,
            endpoints,
        });
        self
    }

    /// Adds a rule of policy `test/<policy>` on `pods` against `peers`
    /// (CIDRs; empty = every peer) on `ports` (protocol, first, last; empty =
    /// every port).
    pub fn rule(
        &mut self,
        policy: &str,
        direction: Direction,
        mode: PolicyMode,
        pods: &[usize],
        peers: &[&str],
        ports: &[(Protocol, u16, u16)],
    ) -> &mut Self {
        let endpoints = pods.iter().map(|p| self.ensure_endpoint(*p)).collect();
        let index = self
            .spec
            .rules
            .iter()
            .filter(|r| r.policy.name == policy)
            .count();
        let dir = match direction {
            Direction::Egress => "egress",
            Direction::Ingress => "ingress",
        };
        let id = format!("test/{policy}/{dir}/{index}");
        let address_set = (!peers.is_empty()).then(|| {
            let name = format!("as-{policy}-{dir}-{index}");
            self.spec.address_sets.push(AddressSet {
                name: name.clone(),
                entries: peers
                    .iter()
                    .map(|c| CidrEntry {
                        cidr: c.to_string(),
                        except: vec![],
                    })
                    .collect(),
            });
            name
        });
        let policy_ref = PolicyRef {
            namespace: "test".into(),
            name: policy.into(),
            revision: "p1".into(),
        };
        if !self.spec.policies.contains(&policy_ref) {
            self.spec.policies.push(policy_ref.clone());
        }
        self.spec.rules.push(BlockRule {
            id,
            policy: policy_ref,
            direction,
            mode,
            endpoints,
            any_peer: peers.is_empty(),
            address_set,
            ports: ports
                .iter()
                .map(|(protocol, first, last)| PortRange {
                    protocol: *protocol,
                    first: *first,
                    last: *last,
                })
                .collect(),
            priority: 0,
        });
        self
    }

    /// Adds a TCP Service frontend `test/<name>` at `address:port` whose
    /// backends are `backends` (pod, target port), IPv4 or IPv6 like the
    /// address.
    pub fn service(
        &mut self,
        name: &str,
        address: &str,
        port: u16,
        backends: &[(usize, u16)],
    ) -> &mut Self {
        self.service_of(Protocol::Tcp, name, address, port, backends)
    }

    /// [`Self::service`] for another protocol.
    pub fn service_of(
        &mut self,
        protocol: Protocol,
        name: &str,
        address: &str,
        port: u16,
        backends: &[(usize, u16)],
    ) -> &mut Self {
        let v6 = address.contains(':');
        self.spec.services.push(ServiceFrontend {
            service: format!("test/{name}"),
            address: address.into(),
            port,
            protocol,
            client_affinity: false,
            node_port: false,
            backends: backends
                .iter()
                .map(|(pod, port)| {
                    let p = &self.topo.pods[*pod];
                    ServiceBackend {
                        address: if v6 {
                            p.ip6.to_string()
                        } else {
                            p.ip4.to_string()
                        },
                        port: *port,
                    }
                })
                .collect(),
        });
        self
    }

    /// Removes every rule of a policy.
    pub fn remove_policy(&mut self, policy: &str) -> &mut Self {
        self.spec.rules.retain(|r| r.policy.name != policy);
        self.spec.policies.retain(|p| p.name != policy);
        self
    }

    /// The spec with a fresh revision.
    pub fn build(&mut self) -> NodeAgentConfigSpec {
        self.revision += 1;
        self.spec.revision = format!("r{}", self.revision);
        self.spec.clone()
    }
}
