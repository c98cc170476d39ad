//! Rule evaluation: which rule slots match a connection, and the verdict.
//!
//! Rules are evaluated per *connection*, by who opened it: egress rules for
//! connections the local endpoint opened (port = the remote server port),
//! ingress rules for connections opened towards it (port = the local port).
//! So replies to a pod's own connections are never caught by its ingress
//! rules, and the replies a server sends are never caught by egress rules.
//! The verdict is cached per connection and config epoch in `FL_CONNS` (the
//! epoch, not the one-bit generation: a verdict of two flips ago must not
//! come back; for an endpoint that is not traced, the cache is its fast
//! path), and for traced flows that pass, untouched or audited, in the flow
//! entry's pass word (`FlowStats::pass`).

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::bpf_ktime_get_ns,
    maps::lpm_trie::Key,
};
use flowlens_agent_common::{
    AttemptKey, AttemptStats, COUNTER_CONN_TABLE_FULL, ClassRuleKey, ConnKey, ConnState,
    DIRECTION_EGRESS, DIRECTION_INGRESS, ENDPOINT_POLICY_EGRESS, ENDPOINT_POLICY_INGRESS,
    ENDPOINT_TRACE, EndpointInfo, NO_CLASS, PEER_GENERATION_BITS, PORT_SCOPE_BITS, PROTO_ICMPV6,
    PROTO_SCTP, PROTO_TCP, PROTO_UDP, PeerKey, PortKey, ROLE_CLIENT, ROLE_SERVER, RuleCounterKey,
    RuleCounters, VERDICT_AUDIT, VERDICT_DROP, VERDICT_PASS, peer_generation, rule_scope,
};

use crate::{
    atomic::add_u64,
    maps::{FL_ATTEMPTS, FL_CLASS_RULES, FL_CONNS, FL_PEER_CLASSES, FL_PORTS, FL_RULE_CNT, bump},
    packet::{Packet, TCP_ACK, TCP_SYN},
};

/// The outcome of evaluating rules for one connection.
#[derive(Clone, Copy)]
pub struct Decision {
    pub verdict: u8,
    pub slot: u8,
    /// Direction of the rules that decided (egress for client connections).
    pub rule_direction: u8,
}

const PASS: Decision = Decision {
    verdict: VERDICT_PASS,
    slot: 0,
    rule_direction: DIRECTION_EGRESS,
};

/// Index of the lowest set bit (x != 0), without loops or `ctz`.
#[inline(always)]
fn lowest_slot(x: u64) -> u8 {
    let mut v = x & x.wrapping_neg();
    let mut n = 0u8;
    if v >> 32 != 0 {
        n += 32;
        v >>= 32;
    }
    if v >> 16 != 0 {
        n += 16;
        v >>= 16;
    }
    if v >> 8 != 0 {
        n += 8;
        v >>= 8;
    }
    if v >> 4 != 0 {
        n += 4;
        v >>= 4;
    }
    if v >> 2 != 0 {
        n += 2;
        v >>= 2;
    }
    if v >> 1 != 0 {
        n += 1;
    }
    n
}

#[inline(always)]
fn has_ports(protocol: u8) -> bool {
    protocol == PROTO_TCP || protocol == PROTO_UDP || protocol == PROTO_SCTP
}

/// Evaluates the rules of `ep` for a connection in which the local endpoint
/// has `role`, with the remote `peer`, `protocol` and server `port`.
#[inline(always)]
pub fn evaluate(
    generation: u32,
    ep: &EndpointInfo,
    role: u8,
    peer: &[u8; 16],
    protocol: u8,
    port: u16,
) -> Decision {
    let (direction, rules, flag) = if role == ROLE_CLIENT {
        (DIRECTION_EGRESS, &ep.egress, ENDPOINT_POLICY_EGRESS)
    } else {
        (DIRECTION_INGRESS, &ep.ingress, ENDPOINT_POLICY_INGRESS)
    };
    if ep.flags & flag == 0 {
        return PASS;
    }
    let scope = rule_scope(generation, direction, ep.id);
    let mut hi = [0u8; 8];
    let mut lo = [0u8; 8];
    hi.copy_from_slice(&peer[..8]);
    lo.copy_from_slice(&peer[8..]);
    let peer_mask = peer_slots(
        generation,
        u32::from_ne_bytes(scope),
        u64::from_ne_bytes(hi),
        u64::from_ne_bytes(lo),
    );
    if peer_mask == 0 {
        return PASS;
    }
    let mut port_mask = rules.any_port_mask;
    if has_ports(protocol) {
        let port_key = Key::new(
            PORT_SCOPE_BITS + 16,
            PortKey {
                scope,
                protocol,
                port: port.to_be_bytes(),
                _pad: 0,
            },
        );
        if let Some(m) = FL_PORTS.get(&port_key) {
            port_mask |= *m;
        }
    }
    let matched = peer_mask & port_mask;
    if matched == 0 {
        return PASS;
    }
    let enforce = matched & rules.enforce_mask;
    if enforce != 0 {
        Decision {
            verdict: VERDICT_DROP,
            slot: lowest_slot(enforce),
            rule_direction: direction,
        }
    } else {
        Decision {
            verdict: VERDICT_AUDIT,
            slot: lowest_slot(matched),
            rule_direction: direction,
        }
    }
}

/// The rule slots of `scope` (an endpoint and direction) whose address sets
/// hold the peer `hi`:`lo`: the peer's class (which address sets hold it),
/// then the slots of that class. From registers, in a subprogram of its own:
/// one result instead of a path per miss keeps the callers within the
/// verifier's budget.
#[inline(never)]
fn peer_slots(generation: u32, scope: u32, hi: u64, lo: u64) -> u64 {
    let mut addr = [0u8; 16];
    addr[..8].copy_from_slice(&hi.to_ne_bytes());
    addr[8..].copy_from_slice(&lo.to_ne_bytes());
    let key = Key::new(
        PEER_GENERATION_BITS + 128,
        PeerKey {
            generation: peer_generation(generation),
            addr,
            _pad: [0; 4],
        },
    );
    let class = match FL_PEER_CLASSES.get(&key) {
        Some(c) => *c,
        None => return 0,
    };
    if class == NO_CLASS {
        return 0;
    }
    let key = ClassRuleKey {
        scope: scope.to_ne_bytes(),
        class,
    };
    // SAFETY: a copy of the value is taken at once; the agent writes the
    // entries of the other generation only.
    match unsafe { FL_CLASS_RULES.get(&key) } {
        Some(m) => *m,
        None => 0,
    }
}

/// Who opened the connection this packet belongs to, when the connection
/// table does not know: the sender of a SYN is the client, the sender of a
/// SYN-ACK the server. A TCP packet without SYN belongs to a connection that
/// began before the table knew it (it survives agent restarts, so only an
/// eviction does that): a well-known port (< 32768) marks the server,
/// otherwise the sender is taken as the client. Any other protocol has no
/// handshake: the sender of the first packet seen is the client, whatever
/// its ports (a UDP datagram from port 53 is not a reply unless the pod
/// asked first; taking it for one would skip the rules that apply to it).
#[inline(always)]
fn guess_role(p: &Packet, direction: u8, local_port: u16, remote_port: u16) -> u8 {
    let sender_is_local = direction == DIRECTION_EGRESS;
    if p.protocol == PROTO_TCP && p.tcp_flags & TCP_SYN != 0 {
        let sender_is_client = p.tcp_flags & TCP_ACK == 0;
        return if sender_is_local == sender_is_client {
            ROLE_CLIENT
        } else {
            ROLE_SERVER
        };
    }
    if p.protocol == PROTO_TCP {
        if local_port < remote_port && local_port < 32768 {
            return ROLE_SERVER;
        }
        if remote_port < local_port && remote_port < 32768 {
            return ROLE_CLIENT;
        }
    }
    if sender_is_local {
        ROLE_CLIENT
    } else {
        ROLE_SERVER
    }
}

/// Whether `a` is an IPv6 link-local (fe80::/10), multicast (ff00::/8) or
/// the unspecified address: where neighbour discovery is addressed.
#[inline(always)]
fn link_scoped(a: &[u8; 16]) -> bool {
    a[0] == 0xff || (a[0] == 0xfe && a[1] & 0xc0 == 0x80) || crate::addr_words(a) == (0, 0)
}

/// Packs a [`Decision`] into a register-sized value (BPF-to-BPF calls
/// return one register).
#[inline(always)]
pub fn pack(d: Decision) -> u32 {
    (d.verdict as u32) | ((d.slot as u32) << 8) | ((d.rule_direction as u32) << 16)
}

#[inline(always)]
pub fn unpack(v: u32) -> Decision {
    Decision {
        verdict: v as u8,
        slot: (v >> 8) as u8,
        rule_direction: (v >> 16) as u8,
    }
}

/// Whether the rules of an endpoint that is not traced passed connection
/// `conn` (a flow key with direction 0) in this epoch: the fast path of
/// such an endpoint's packets, one lookup. `ifindex` is the interface a
/// packet leaving the pod came through (the one the decided packet came
/// through, whose source was checked then), 0 for a packet entering it.
#[inline(always)]
pub fn passed_untraced(conn: &ConnKey, epoch: u32, ifindex: u32) -> bool {
    match unsafe { FL_CONNS.get(conn) } {
        Some(st) => {
            st.epoch == epoch
                && st.verdict == VERDICT_PASS
                && st.untraced != 0
                && (ifindex == 0 || st.ifindex == ifindex)
        }
        None => false,
    }
}

/// The verdict (packed) for a packet of a local endpoint with rules. `conn`
/// is the packet's flow key with `direction` 0 (the connection key);
/// `direction_ifindex` the packet's direction in the low 32 bits and its
/// interface in the high ones (packed: a BPF call takes five arguments).
#[inline(never)]
pub fn packet_decision(
    epoch: u32,
    ep: &EndpointInfo,
    p: &Packet,
    direction_ifindex: u64,
    conn: &ConnKey,
) -> u32 {
    let direction = direction_ifindex as u32;
    // Neighbour discovery keeps IPv6 working whatever the rules say, on
    // the link it belongs to: to or from link-local, multicast or
    // unspecified addresses. Addressed to any other peer it meets the rules
    // like any ICMPv6 packet (else it would carry data past an egress block).
    if p.protocol == PROTO_ICMPV6
        && p.icmp_type >= 133
        && p.icmp_type <= 137
        && link_scoped(&conn.remote_addr)
    {
        return pack(PASS);
    }
    // A SYN opens a new connection: what was cached for the 5-tuple (from
    // a bare ACK sent first, say) does not decide it.
    let syn = p.protocol == PROTO_TCP && p.tcp_flags & TCP_SYN != 0 && p.tcp_flags & TCP_ACK == 0;
    let role = match unsafe { FL_CONNS.get(conn) } {
        _ if syn => guess_role(p, direction as u8, conn.local_port, conn.remote_port),
        Some(st) if st.epoch == epoch => {
            return pack(Decision {
                verdict: st.verdict,
                slot: st.slot,
                rule_direction: if st.role == ROLE_CLIENT {
                    DIRECTION_EGRESS
                } else {
                    DIRECTION_INGRESS
                },
            });
        }
        Some(st) => st.role,
        None => guess_role(p, direction as u8, conn.local_port, conn.remote_port),
    };
    let port = if role == ROLE_CLIENT {
        conn.remote_port
    } else {
        conn.local_port
    };
    let d = evaluate(
        crate::maps::generation(epoch),
        ep,
        role,
        &conn.remote_addr,
        conn.protocol,
        port,
    );
    let state = ConnState {
        role,
        verdict: d.verdict,
        slot: d.slot,
        untraced: (ep.flags & ENDPOINT_TRACE == 0) as u8,
        epoch,
        ifindex: (direction_ifindex >> 32) as u32,
    };
    if FL_CONNS.insert(conn, &state, BPF_ANY as u64).is_err() {
        bump(COUNTER_CONN_TABLE_FULL);
    }
    pack(d)
}

/// Whom a match was with: the peer (the server for egress rules, the
/// client for ingress rules), the server port and protocol, and whether it
/// was a connection attempt.
pub struct Peer {
    pub addr: [u8; 16],
    /// The peer's port and the local one (see [`AttemptKey`]).
    pub remote_port: u16,
    pub local_port: u16,
    pub protocol: u8,
    /// 1 for a connection attempt (a TCP SYN, a `connect()` call), else 0.
    pub attempt: u8,
}

impl Peer {
    /// The remote side of flow `key` (as seen from the local endpoint).
    #[inline(always)]
    pub fn of_flow(key: &ConnKey, protocol: u8, attempt: u8) -> Peer {
        Peer {
            addr: key.remote_addr,
            remote_port: key.remote_port,
            local_port: key.local_port,
            protocol,
            attempt,
        }
    }
}

/// Adds a match to the counters of the deciding rule and to the named
/// attempts (peer and port). Inlined: it only packs its arguments into
/// registers for [`count_packed`], so the verifier never follows pointers
/// into the caller's stack from there (it did, and the TC program no longer
/// verified within its budget).
#[inline(always)]
pub fn count(generation: u32, ep_id: u32, d: &Decision, packets: u64, peer: &Peer) {
    let scope = u32::from_be_bytes(rule_scope(generation, d.rule_direction, ep_id));
    let rule = (u64::from(scope) << 32) | (u64::from(d.slot) << 8) | u64::from(d.verdict);
    let mut hi = [0u8; 8];
    let mut lo = [0u8; 8];
    hi.copy_from_slice(&peer.addr[..8]);
    lo.copy_from_slice(&peer.addr[8..]);
    let ports = (u64::from(peer.remote_port) << 48)
        | (u64::from(peer.local_port) << 32)
        | (u64::from(peer.protocol) << 8)
        | u64::from(peer.attempt);
    count_packed(rule, packets, ports);
    name(
        rule,
        packets,
        u64::from_ne_bytes(hi),
        u64::from_ne_bytes(lo),
        ports,
    );
}

/// [`count`] without naming the peer: for Service connections refused at
/// the socket, whose backend loop leaves the verifier too many states to
/// follow another subprogram through.
#[inline(always)]
pub fn count_unnamed(generation: u32, ep_id: u32, d: &Decision, packets: u64, attempt: u8) {
    let scope = u32::from_be_bytes(rule_scope(generation, d.rule_direction, ep_id));
    let rule = (u64::from(scope) << 32) | (u64::from(d.slot) << 8) | u64::from(d.verdict);
    count_packed(rule, packets, u64::from(attempt));
}

/// The rule counters of [`count`], from registers: `rule` is scope << 32 |
/// slot << 8 | verdict; `ports` remote port << 48 | local port << 32 |
/// protocol << 8 | attempt (and for [`name`], `hi`, `lo` the peer address).
#[inline(never)]
fn count_packed(rule: u64, packets: u64, ports: u64) {
    let scope = ((rule >> 32) as u32).to_be_bytes();
    let slot = (rule >> 8) as u8;
    let verdict = rule as u8;
    let connections = ports & 1;
    if let Some(counters) = FL_RULE_CNT.get(0) {
        let key = RuleCounterKey {
            scope,
            slot,
            verdict,
            _pad: [0; 2],
        };
        if let Some(c) = counters.get_ptr_mut(&key) {
            add_u64(unsafe { &raw mut (*c).packets }, packets);
            add_u64(unsafe { &raw mut (*c).connections }, connections);
        } else {
            let fresh = RuleCounters {
                packets,
                connections,
            };
            if counters.insert(&key, &fresh, BPF_NOEXIST as u64).is_err() {
                // Another CPU inserted it first.
                if let Some(c) = counters.get_ptr_mut(&key) {
                    add_u64(unsafe { &raw mut (*c).packets }, packets);
                    add_u64(unsafe { &raw mut (*c).connections }, connections);
                }
            }
        }
    }
}

/// The named attempts (its own subprogram, called after [`count_packed`]
/// rather than from it: the stacks of nested calls add up).
#[inline(never)]
fn name(rule: u64, packets: u64, hi: u64, lo: u64, ports: u64) {
    let scope = ((rule >> 32) as u32).to_be_bytes();
    let slot = (rule >> 8) as u8;
    let verdict = rule as u8;
    let connections = ports & 1;
    let Some(table) = FL_ATTEMPTS.get(0) else {
        return;
    };
    let mut peer = [0u8; 16];
    peer[..8].copy_from_slice(&hi.to_ne_bytes());
    peer[8..].copy_from_slice(&lo.to_ne_bytes());
    let key = AttemptKey {
        scope,
        slot,
        verdict,
        protocol: (ports >> 8) as u8,
        _pad: 0,
        remote_port: (ports >> 48) as u16,
        local_port: (ports >> 32) as u16,
        peer,
    };
    let now = unsafe { bpf_ktime_get_ns() };
    // Two CPUs inserting the same new key at once lose one's first match
    // (the name only; `FL_RULE_CNT` has the count).
    match table.get_ptr_mut(&key) {
        Some(a) => {
            add_u64(unsafe { &raw mut (*a).attempts }, connections);
            add_u64(unsafe { &raw mut (*a).packets }, packets);
            unsafe { (*a).last_ns = now };
        }
        None => {
            let fresh = AttemptStats {
                attempts: connections,
                packets,
                last_ns: now,
            };
            let _ = table.insert(&key, &fresh, BPF_NOEXIST as u64);
        }
    }
}
