//! Compiles the config's Service frontends into the kernel's Service tables:
//! frontend (address, port, protocol) -> a range of the backend table.
//! Frontends with the same backends share one range. Pure.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
};

use flowlens_agent_common::{SERVICE_CLIENT_AFFINITY, ServiceBackendAddr, ServiceInfo};
use flowlens_api::node_agent_config::{NodeAgentConfigSpec, ServiceBackend};

use super::{Problem, prefix::addr_bytes};

/// Capacity of the kernel's backend table (`FL_SVC_BACKENDS`), per generation.
pub(crate) const MAX_BACKEND_ENTRIES: usize = 131072;
/// Capacity of the kernel's frontend table (`FL_SERVICES`), per generation.
pub(crate) const MAX_FRONTEND_ENTRIES: usize = 32768;

/// A frontend as the kernel keys it (without the generation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Frontend {
    pub addr: [u8; 16],
    pub port: u16,
    pub protocol: u8,
}

/// The Service tables of one config.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct ServiceTables {
    pub frontends: Vec<(Frontend, ServiceInfo)>,
    /// The backend table: entry `i` is `FL_SVC_BACKENDS[(generation, i)]`.
    pub backends: Vec<ServiceBackendAddr>,
    /// Service id -> `namespace/name`.
    pub names: HashMap<u64, String>,
    /// Every backend as (address, port, protocol): the connections whose
    /// Service the agent asks the kernel's connection record about.
    pub backend_set: HashSet<Frontend>,
}

/// The id of a Service in kernel records: FNV-1a of `namespace/name`.
pub(crate) fn service_id(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Compiles `spec.services`; bad addresses and overflow become problems.
pub(crate) fn compile(
    spec: &NodeAgentConfigSpec,
    host_addrs: &[IpAddr],
    problems: &mut Vec<Problem>,
) -> ServiceTables {
    let mut t = ServiceTables::default();
    let mut ranges: HashMap<Vec<ServiceBackendAddr>, (u32, u32)> = HashMap::new();
    let mut seen: HashSet<Frontend> = HashSet::new();
    // Past the limit, later frontends that still fit (a single ClusterIP
    // after a NodePort on many addresses) are still entered.
    let mut full = false;
    for f in &spec.services {
        let Ok(addr) = f.address.parse::<IpAddr>() else {
            problems.push(Problem::BadServiceAddress {
                service: f.service.clone(),
                value: f.address.clone(),
            });
            continue;
        };
        let protocol = f.protocol.number();
        // A NodePort is translated on every local address of the family.
        let addrs: Vec<IpAddr> = std::iter::once(addr)
            .chain(
                host_addrs
                    .iter()
                    .filter(|h| f.node_port && h.is_ipv4() == addr.is_ipv4())
                    .copied(),
            )
            .collect();
        let frontends: Vec<Frontend> = addrs
            .into_iter()
            .map(|a| Frontend {
                addr: addr_bytes(a),
                port: f.port,
                protocol,
            })
            .filter(|fr| seen.insert(*fr))
            .collect();
        if frontends.is_empty() {
            continue;
        }
        if t.frontends.len() + frontends.len() > MAX_FRONTEND_ENTRIES {
            if !full {
                problems.push(Problem::TooManyServices {
                    table: "frontends",
                    limit: MAX_FRONTEND_ENTRIES,
                });
            }
            full = true;
            continue;
        }
        let backends = backend_entries(&f.service, &f.backends, addr.is_ipv4(), problems);
        for b in &backends {
            t.backend_set.insert(Frontend {
                addr: b.addr,
                port: b.port,
                protocol,
            });
        }
        let (first, count) = match ranges.get(&backends) {
            Some(r) => *r,
            None => {
                if t.backends.len() + backends.len() > MAX_BACKEND_ENTRIES {
                    problems.push(Problem::TooManyServices {
                        table: "backends",
                        limit: MAX_BACKEND_ENTRIES,
                    });
                    break;
                }
                let r = (t.backends.len() as u32, backends.len() as u32);
                t.backends.extend_from_slice(&backends);
                ranges.insert(backends, r);
                r
            }
        };
        let id = service_id(&f.service);
        t.names.insert(id, f.service.clone());
        let info = ServiceInfo {
            service_id: id,
            first,
            count,
            flags: if f.client_affinity {
                SERVICE_CLIENT_AFFINITY
            } else {
                0
            },
            _pad: 0,
        };
        t.frontends
            .extend(frontends.into_iter().map(|fr| (fr, info)));
    }
    t
}

/// The kernel form of a frontend's backends (same family as the frontend).
fn backend_entries(
    service: &str,
    backends: &[ServiceBackend],
    v4: bool,
    problems: &mut Vec<Problem>,
) -> Vec<ServiceBackendAddr> {
    let mut out = Vec::with_capacity(backends.len());
    for b in backends {
        match b.address.parse::<IpAddr>() {
            Ok(ip) if ip.is_ipv4() == v4 => out.push(ServiceBackendAddr {
                addr: addr_bytes(ip),
                port: b.port,
                _pad: [0; 6],
            }),
            _ => problems.push(Problem::BadServiceAddress {
                service: service.to_owned(),
                value: b.address.clone(),
            }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use flowlens_api::{flow_policy::Protocol, node_agent_config::ServiceFrontend};

    use super::*;

    fn frontend(
        service: &str,
        address: &str,
        port: u16,
        backends: &[(&str, u16)],
    ) -> ServiceFrontend {
        ServiceFrontend {
            service: service.into(),
            address: address.into(),
            port,
            protocol: Protocol::Tcp,
            client_affinity: false,
            node_port: false,
            backends: backends
                .iter()
                .map(|(a, p)| ServiceBackend {
                    address: (*a).into(),
                    port: *p,
                })
                .collect(),
        }
    }

    #[test]
    fn frontends_with_the_same_backends_share_one_range() {
        let spec = NodeAgentConfigSpec {
            services: vec![
                frontend(
                    "shop/db",
                    "10.97.0.20",
                    5432,
                    &[("10.244.0.5", 5432), ("10.244.0.6", 5432)],
                ),
                frontend(
                    "shop/db",
                    "192.0.2.2",
                    30432,
                    &[("10.244.0.5", 5432), ("10.244.0.6", 5432)],
                ),
                frontend("shop/web", "10.97.0.21", 80, &[("10.244.0.7", 8080)]),
            ],
            ..Default::default()
        };
        let mut problems = Vec::new();
        let t = compile(&spec, &[], &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(t.backends.len(), 3, "db's two backends once, web's one");
        assert_eq!(t.frontends.len(), 3);
        let (a, b, c) = (&t.frontends[0].1, &t.frontends[1].1, &t.frontends[2].1);
        assert_eq!((a.first, a.count), (b.first, b.count));
        assert_eq!((c.first, c.count), (2, 1));
        assert_eq!(a.service_id, service_id("shop/db"));
        assert_eq!(t.names[&c.service_id], "shop/web");
        assert_eq!(t.backends[2].port, 8080);
        assert!(t.backend_set.contains(&Frontend {
            addr: addr_bytes("10.244.0.7".parse().unwrap()),
            port: 8080,
            protocol: 6,
        }));
    }

    #[test]
    fn bad_and_wrong_family_addresses_are_problems_not_entries() {
        let spec = NodeAgentConfigSpec {
            services: vec![
                frontend("a/x", "not-an-ip", 80, &[]),
                frontend(
                    "a/y",
                    "10.97.0.9",
                    80,
                    &[("fd00::1", 80), ("10.244.0.9", 80)],
                ),
            ],
            ..Default::default()
        };
        let mut problems = Vec::new();
        let t = compile(&spec, &[], &mut problems);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert_eq!(t.frontends.len(), 1);
        assert_eq!(
            t.frontends[0].1.count, 1,
            "only the IPv4 backend of an IPv4 frontend"
        );
    }

    #[test]
    fn a_node_port_is_translated_on_every_local_address_of_its_family() {
        let mut np = frontend("shop/db", "192.0.2.2", 30432, &[("10.244.0.5", 5432)]);
        np.node_port = true;
        let spec = NodeAgentConfigSpec {
            services: vec![
                np,
                frontend("shop/db", "10.97.0.20", 5432, &[("10.244.0.5", 5432)]),
            ],
            ..Default::default()
        };
        let host: Vec<IpAddr> = ["192.0.2.2", "10.244.0.1", "fd00::1"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let mut problems = Vec::new();
        let t = compile(&spec, &host, &mut problems);
        let addrs: Vec<IpAddr> = t
            .frontends
            .iter()
            .map(|(f, _)| crate::aggregate::ip_from_bytes(&f.addr))
            .collect();
        assert_eq!(
            addrs,
            ["192.0.2.2", "10.244.0.1", "10.97.0.20"]
                .iter()
                .map(|a| a.parse::<IpAddr>().unwrap())
                .collect::<Vec<_>>(),
            "the gateway address too, the IPv6 one not, the ClusterIP once"
        );
        assert_eq!(t.backends.len(), 1, "one backend range shared");
    }

    #[test]
    fn service_ids_are_stable_and_distinct() {
        assert_eq!(service_id("shop/db"), service_id("shop/db"));
        assert_ne!(service_id("shop/db"), service_id("shop/dc"));
    }
}
