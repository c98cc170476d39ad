//! The socket-level Service load balancer.
//!
//! kube-proxy translates a Service address (ClusterIP, NodePort, ...) to a
//! backend after the packet has left the pod, so a rule about the backend pod
//! would never see it. Instead, when a local endpoint `connect()`s to a
//! Service frontend, the connect hook chooses a backend itself, among those
//! the rules allow for this client (the client's egress rules, and the
//! backend's ingress rules when it is a pod of this node), and rewrites the
//! destination: the packets then carry the backend's address, kube-proxy has
//! nothing to translate, and counting and rules see the backend pod. When
//! every backend examined is blocked the connect fails with EPERM.
//!
//! Packets that still carry a frontend address did not go through
//! `connect()` (raw sockets, unconnected UDP): kube-proxy will choose their
//! backend, so the TC hook drops them when the rules block any backend
//! examined for that client.

use aya_ebpf::helpers::bpf_get_prandom_u32;
use flowlens_agent_common::{
    BackendKey, EndpointInfo, EndpointKey, ROLE_CLIENT, ROLE_SERVER, SERVICE_BACKENDS_EXAMINED,
    SERVICE_CLIENT_AFFINITY, ServiceBackendAddr, ServiceInfo, ServiceKey, VERDICT_DROP,
};

use crate::{
    maps::{FL_ENDPOINTS, FL_SERVICES, FL_SVC_BACKENDS},
    policy::{self, Decision},
};

/// The Service frontend at `addr:port`, if it is one.
#[inline(always)]
pub fn frontend(
    generation: u32,
    addr: &[u8; 16],
    port: u16,
    protocol: u8,
) -> Option<&'static ServiceInfo> {
    unsafe {
        FL_SERVICES.get(&ServiceKey {
            generation,
            addr: *addr,
            port,
            protocol,
            _pad: 0,
        })
    }
}

/// A blocking decision and the endpoint whose rule made it.
#[derive(Clone, Copy)]
pub struct Blocked {
    pub endpoint_id: u32,
    pub decision: Decision,
}

/// The rules' verdict on `client` connecting to `backend`, if they block it.
#[inline(always)]
fn blocked(
    generation: u32,
    client: &[u8; 16],
    ep: Option<&EndpointInfo>,
    backend: &ServiceBackendAddr,
    protocol: u8,
) -> Option<Blocked> {
    if let Some(ep) = ep {
        let d = policy::evaluate(
            generation,
            ep,
            ROLE_CLIENT,
            &backend.addr,
            protocol,
            backend.port,
        );
        if d.verdict == VERDICT_DROP {
            return Some(Blocked {
                endpoint_id: ep.id,
                decision: d,
            });
        }
    }
    if let Some(peer) = unsafe {
        FL_ENDPOINTS.get(&EndpointKey {
            generation,
            addr: backend.addr,
        })
    } {
        let d = policy::evaluate(
            generation,
            peer,
            ROLE_SERVER,
            client,
            protocol,
            backend.port,
        );
        if d.verdict == VERDICT_DROP {
            return Some(Blocked {
                endpoint_id: peer.id,
                decision: d,
            });
        }
    }
    None
}

/// What the connect hook does with a connection to a frontend.
pub enum Choice {
    /// Connect to this backend instead.
    Backend(ServiceBackendAddr),
    /// Every backend examined is blocked for this client.
    Refused(Blocked),
    /// No backend (kube-proxy rejects these connections itself).
    Unavailable,
}

/// Rules written against the Service address itself (an `ipBlock` with a
/// ClusterIP or LoadBalancer IP) still apply to the client.
#[inline(always)]
fn frontend_blocked(
    generation: u32,
    addr: &[u8; 16],
    port: u16,
    ep: Option<&EndpointInfo>,
    protocol: u8,
) -> Option<Blocked> {
    let ep = ep?;
    let d = policy::evaluate(generation, ep, ROLE_CLIENT, addr, protocol, port);
    (d.verdict == VERDICT_DROP).then_some(Blocked {
        endpoint_id: ep.id,
        decision: d,
    })
}

/// A hash of the client's address, for `sessionAffinity: ClientIP`.
#[inline(always)]
fn client_hash(client: &[u8; 16]) -> u32 {
    let mut h: u32 = 2166136261;
    let mut i = 0;
    while i < 16 {
        h = (h ^ client[i] as u32).wrapping_mul(16777619);
        i += 1;
    }
    h
}

/// Chooses a backend of `svc` the rules allow for `client`: from a random
/// one (the client's own with affinity; `sticky`'s for the datagrams of one
/// socket), the first allowed of up to [`SERVICE_BACKENDS_EXAMINED`] in
/// order.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn choose(
    generation: u32,
    svc: &ServiceInfo,
    svc_addr: &[u8; 16],
    svc_port: u16,
    client: &[u8; 16],
    ep: Option<&EndpointInfo>,
    protocol: u8,
    sticky: Option<u32>,
) -> Choice {
    if let Some(why) = frontend_blocked(generation, svc_addr, svc_port, ep, protocol) {
        return Choice::Refused(why);
    }
    let count = svc.count;
    if count == 0 {
        return Choice::Unavailable;
    }
    let seed = if svc.flags & SERVICE_CLIENT_AFFINITY != 0 {
        client_hash(client)
    } else if let Some(s) = sticky {
        s
    } else {
        unsafe { bpf_get_prandom_u32() }
    };
    let start = seed % count;
    let mut refused = None;
    let mut i = 0;
    while i < SERVICE_BACKENDS_EXAMINED {
        if i >= count {
            break;
        }
        let mut idx = start + i;
        if idx >= count {
            idx -= count;
        }
        let key = BackendKey {
            generation,
            index: svc.first.wrapping_add(idx),
        };
        if let Some(b) = unsafe { FL_SVC_BACKENDS.get(&key) } {
            match blocked(generation, client, ep, b, protocol) {
                None => return Choice::Backend(*b),
                Some(why) => refused = Some(why),
            }
        }
        i += 1;
    }
    match refused {
        Some(why) => Choice::Refused(why),
        None => Choice::Unavailable,
    }
}

/// For a packet to a frontend that bypassed `connect()`: the block that
/// applies when any examined backend is blocked for `client`.
#[inline(always)]
pub fn any_blocked(
    generation: u32,
    svc: &ServiceInfo,
    client: &[u8; 16],
    ep: &EndpointInfo,
    protocol: u8,
) -> Option<Blocked> {
    let mut i = 0;
    while i < SERVICE_BACKENDS_EXAMINED {
        if i >= svc.count {
            break;
        }
        let key = BackendKey {
            generation,
            index: svc.first.wrapping_add(i),
        };
        if let Some(b) = unsafe { FL_SVC_BACKENDS.get(&key) }
            && let Some(why) = blocked(generation, client, Some(ep), b, protocol)
        {
            return Some(why);
        }
        i += 1;
    }
    None
}
