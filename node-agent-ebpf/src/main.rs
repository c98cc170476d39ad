//! Flowlens kernel programs. Entry points are thin; the work is in the modules.
//!
//! - `fl_from_pod` / `fl_to_pod`: TC on the host side of a pod's interface
//!   (ingress = traffic leaving the pod, egress = traffic entering it): flow
//!   accounting and enforcement.
//! - `fl_sockops` (preferred) / `fl_tcp_probe` (fallback): smoothed RTT.
//! - `fl_tcp_retrans`: TCP retransmissions of traced flows.
//! - `fl_kfree_skb`: kernel drops of traced flows, by reason.
//! - `fl_connect4` / `fl_connect6`: reject blocked connections at `connect()`,
//!   and translate connections to Services (`service.rs`).
//! - `fl_sendmsg4` / `fl_sendmsg6`: translate unconnected UDP datagrams to
//!   Services.
//! - `fl_getpeername4/6`, `fl_recvmsg4/6`: a translated socket's peer, and
//!   the source of its replies, is the Service address it used.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]
// Map keys are passed by reference on purpose: the helpers take pointers,
// and a by-value generic would copy 40-byte keys through the stack.
#![allow(clippy::needless_borrows_for_generic_args)]
// `if a > b { a - b } else { 0 }`: the compare-and-branch form the verifier
// tracks bounds through.
#![allow(clippy::manual_saturating_arithmetic, clippy::implicit_saturating_sub)]

mod atomic;
mod dns;
mod drop;
mod flow;
mod maps;
mod packet;
mod policy;
mod rtt;
mod service;

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_RTT_CB, BPF_SOCK_OPS_RTT_CB_FLAG, TC_ACT_SHOT, TC_ACT_UNSPEC, bpf_sock_addr,
        bpf_sock_ops,
    },
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_socket_cookie,
    },
    macros::{cgroup_sock_addr, classifier, sock_ops, tracepoint},
    programs::{SockAddrContext, SockOpsContext, TcContext, TracePointContext},
};
use flowlens_agent_common::{
    COUNTER_CONNECT_DENIED, COUNTER_SERVICE_TRANSLATED, DIRECTION_EGRESS, DIRECTION_INGRESS,
    DNS_PORT, ENDPOINT_POLICY_EGRESS, ENDPOINT_POLICY_INGRESS, ENDPOINT_TRACE, EndpointInfo,
    EndpointKey, FlowKey, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, ROLE_CLIENT, ROLE_SERVER,
    SUSPECT_SPOOFED, ServiceConnKey, ServiceSocket, VERDICT_AUDIT, VERDICT_DROP, VERDICT_PASS,
    audited_rule, pass_word, passes_in, v4_mapped,
};

use crate::{
    maps::{FL_CGROUPS, FL_ENDPOINTS, FL_SVC_CONNS, FL_SVC_SOCKS, bump, config},
    packet::{TCP_ACK, TCP_SYN},
};

#[classifier]
pub fn fl_from_pod(ctx: TcContext) -> i32 {
    on_packet(&ctx, DIRECTION_EGRESS)
}

#[classifier]
pub fn fl_to_pod(ctx: TcContext) -> i32 {
    on_packet(&ctx, DIRECTION_INGRESS)
}

#[inline(always)]
fn on_packet(ctx: &TcContext, direction: u8) -> i32 {
    let Some(cfg) = config() else {
        return TC_ACT_UNSPEC;
    };
    // One load: the epoch and, in its bit 0, the table generation stay
    // consistent with each other whatever the agent writes meanwhile.
    let epoch = cfg.epoch;
    let generation = maps::generation(epoch);
    // Not zero-initialised: `parse` writes every field it returns.
    let mut slot = core::mem::MaybeUninit::<packet::Packet>::uninit();
    // SAFETY: parse() writes every field before returning true; nothing is
    // read when it returns false.
    if !packet::parse(ctx, unsafe { &mut *slot.as_mut_ptr() }) {
        return TC_ACT_UNSPEC;
    }
    let mut p = unsafe { slot.assume_init() };
    if p.fragment != packet::FRAGMENT_NONE {
        packet::fragment_ports(&mut p);
    }
    let egress = direction == DIRECTION_EGRESS;
    // The flow as seen from the local endpoint.
    let mut key = FlowKey {
        local_addr: if egress { p.src } else { p.dst },
        remote_addr: if egress { p.dst } else { p.src },
        local_port: if egress { p.sport } else { p.dport },
        remote_port: if egress { p.dport } else { p.sport },
        protocol: p.protocol,
        direction,
        _pad: [0; 2],
    };

    // DNS of a traced pod (a query it sends, an answer it receives): a copy
    // for the agent. Two compares for every other packet.
    if (if egress { p.dport } else { p.sport }) == DNS_PORT
        && (p.protocol == PROTO_UDP || p.protocol == PROTO_TCP)
        && p.opaque == 0
        && epoch != 0
    {
        dns::capture(ctx, &p, egress, generation);
    }

    // Fast path: a flow already known, in this epoch, to be traced and to
    // pass (untouched, or audited: counted against its rule) is counted
    // with one lookup. Leaving a pod, only through the interface whose
    // packets made the entry (whose source address was checked then): a
    // pod forging another's address never takes it.
    // Not for a SYN: it opens a new connection on the 5-tuple, to be decided
    // afresh (a bare ACK sent first must not pave its way).
    let existing = flow::lookup(&key);
    let syn = p.protocol == PROTO_TCP && p.tcp_flags & TCP_SYN != 0 && p.tcp_flags & TCP_ACK == 0;
    if !syn && p.opaque == 0 && !existing.is_null() && epoch != 0 {
        let pass = unsafe { core::ptr::read_volatile(&raw const (*existing).pass) };
        if passes_in(pass, epoch) && (!egress || unsafe { (*existing).ifindex } == skb_ifindex(ctx))
        {
            if let Some((endpoint_id, rule_direction, slot)) = audited_rule(pass) {
                let d = policy::Decision {
                    verdict: VERDICT_AUDIT,
                    slot,
                    rule_direction,
                };
                let peer = policy::Peer::of_flow(&key, p.protocol, 0);
                policy::count(generation, endpoint_id, &d, p.packets, &peer);
            }
            flow::add(existing, &p);
            return TC_ACT_UNSPEC;
        }
    }
    // The same for an endpoint with rules that is not traced (no flow
    // entry): a connection its rules passed in this epoch passes with one
    // lookup of the verdict cache. ICMP is decided per packet (below).
    if existing.is_null()
        && !syn
        && p.opaque == 0
        && epoch != 0
        && p.protocol != PROTO_ICMP
        && p.protocol != PROTO_ICMPV6
    {
        key.direction = 0;
        let passed =
            policy::passed_untraced(&key, epoch, if egress { skb_ifindex(ctx) } else { 0 });
        key.direction = direction;
        if passed {
            return TC_ACT_UNSPEC;
        }
    }

    // A packet leaving a pod must come from an address the pod owns: one
    // with another source is dropped if the pod has rules, and never
    // counted as the traffic of the pod whose address it forged.
    if egress {
        match source_check(skb_ifindex(ctx), &p.src) {
            SOURCE_OWNED => {}
            SOURCE_SPOOFED_DROP => return TC_ACT_SHOT,
            _ => return TC_ACT_UNSPEC,
        }
    }

    let ep = match unsafe {
        FL_ENDPOINTS.get(&EndpointKey {
            generation,
            addr: key.local_addr,
        })
    } {
        Some(ep) => ep,
        None => return TC_ACT_UNSPEC,
    };

    // How the flow's later packets pass (`FlowStats::pass`), if they do.
    let mut pass = pass_word(epoch, false, 0, 0, 0);
    // A packet to a Service frontend did not go through our connect()
    // translation: kube-proxy will pick its backend, so it may not pass if
    // the rules block one.
    if egress
        && ep.flags & ENDPOINT_POLICY_EGRESS != 0
        && let Some(svc) = service::frontend(generation, &p.dst, p.dport, p.protocol)
        && let Some(why) = service::any_blocked(generation, svc, &p.src, ep, p.protocol)
    {
        // Named as the Service address on its port, whichever side's rules
        // refused (no branch on the direction: see `policy::Peer`).
        let peer = policy::Peer {
            addr: p.dst,
            remote_port: p.dport,
            local_port: p.dport,
            protocol: p.protocol,
            attempt: syn as u8,
        };
        policy::count(generation, why.endpoint_id, &why.decision, p.packets, &peer);
        return TC_ACT_SHOT;
    }
    if ep.flags & (ENDPOINT_POLICY_EGRESS | ENDPOINT_POLICY_INGRESS) != 0 {
        // Rules that cannot be evaluated are not skipped: the packet is
        // dropped (an orphan fragment, a missing transport header, an
        // extension-header chain longer than walked).
        if p.opaque != 0 {
            maps::suspect(p.opaque as u32 - 1);
            return TC_ACT_SHOT;
        }
        // The connection key: the flow key with direction 0.
        key.direction = 0;
        let d = policy::unpack(policy::packet_decision(
            epoch,
            ep,
            &p,
            direction as u64 | (skb_ifindex(ctx) as u64) << 32,
            &key,
        ));
        key.direction = direction;
        if d.verdict != VERDICT_PASS {
            let peer = policy::Peer::of_flow(&key, p.protocol, syn as u8);
            policy::count(generation, ep.id, &d, p.packets, &peer);
            if d.verdict == VERDICT_DROP {
                return TC_ACT_SHOT;
            }
            // Audited: passes, and the flow entry remembers the rule so
            // that later packets are counted against it on the fast path.
            pass = pass_word(epoch, true, ep.id, d.rule_direction, d.slot);
        }
        // ICMP shares one key per peer across message types, and neighbour
        // discovery passes whatever the rules say: always evaluated.
        if p.protocol == PROTO_ICMP || p.protocol == PROTO_ICMPV6 {
            pass = 0;
        }
    }

    if ep.flags & ENDPOINT_TRACE != 0 {
        flow::account(&key, &p, existing, pass, skb_ifindex(ctx));
    }
    TC_ACT_UNSPEC
}

/// The interface of the packet (a fresh load each time: a value kept
/// across calls would take stack the verifier counts against 512 bytes).
#[inline(always)]
fn skb_ifindex(ctx: &TcContext) -> u32 {
    unsafe {
        core::ptr::read_volatile(
            &raw const (*(ctx.as_ptr() as *const aya_ebpf::bindings::__sk_buff)).ifindex,
        )
    }
}

const SOURCE_OWNED: u32 = 0;
const SOURCE_SPOOFED_DROP: u32 = 1;
const SOURCE_SPOOFED_PASS: u32 = 2;

/// Whether the pod behind interface `ifindex` owns `src` (`SOURCE_*`).
/// Interfaces the agent has not described pass; IPv6 link-local and
/// unspecified sources (neighbour discovery, duplicate address detection)
/// are every pod's own.
#[inline(never)]
fn source_check(ifindex: u32, src: &[u8; 16]) -> u32 {
    let Some(pod) = (unsafe { maps::FL_IFACES.get(&ifindex) }) else {
        return SOURCE_OWNED;
    };
    if same_addr(src, &pod.addrs.addr4) || same_addr(src, &pod.addrs.addr6) {
        return SOURCE_OWNED;
    }
    if (src[0] == 0xfe && src[1] & 0xc0 == 0x80) || addr_words(src) == (0, 0) {
        return SOURCE_OWNED;
    }
    maps::suspect(SUSPECT_SPOOFED);
    if pod.drop_spoofed != 0 {
        SOURCE_SPOOFED_DROP
    } else {
        SOURCE_SPOOFED_PASS
    }
}

/// An address as two words (word loads: the verifier and JIT prefer them to
/// a byte loop).
#[inline(always)]
pub(crate) fn addr_words(a: &[u8; 16]) -> (u64, u64) {
    let p = a.as_ptr() as *const u64;
    unsafe {
        (
            core::ptr::read_unaligned(p),
            core::ptr::read_unaligned(p.add(1)),
        )
    }
}

#[inline(always)]
fn same_addr(a: &[u8; 16], b: &[u8; 16]) -> bool {
    addr_words(a) == addr_words(b)
}

#[sock_ops]
pub fn fl_sockops(ctx: SockOpsContext) -> u32 {
    let ops = ctx.ops as *const bpf_sock_ops;
    // The operation and the socket first: most RTT callbacks of a busy
    // socket fall within its sampling interval and stop here, before the
    // (costly, converted) address fields are read.
    let (op, sk) = unsafe {
        (
            ctx_u32(&raw const (*ops).op),
            core::ptr::read_volatile(&raw const (*ops).__bindgen_anon_2.sk),
        )
    };
    if op == BPF_SOCK_OPS_RTT_CB && !rtt::due(sk) {
        return 1;
    }
    // Every other context field is read here, in straight-line code: the
    // verifier only accepts context loads at constant offsets, and LLVM may
    // otherwise share an address computation between branches.
    let (family, l4, r4, l6, r6, lport, rport_raw, srtt_us) = unsafe {
        (
            ctx_u32(&raw const (*ops).family),
            ctx_u32(&raw const (*ops).local_ip4),
            ctx_u32(&raw const (*ops).remote_ip4),
            [
                ctx_u32(&raw const (*ops).local_ip6[0]),
                ctx_u32(&raw const (*ops).local_ip6[1]),
                ctx_u32(&raw const (*ops).local_ip6[2]),
                ctx_u32(&raw const (*ops).local_ip6[3]),
            ],
            [
                ctx_u32(&raw const (*ops).remote_ip6[0]),
                ctx_u32(&raw const (*ops).remote_ip6[1]),
                ctx_u32(&raw const (*ops).remote_ip6[2]),
                ctx_u32(&raw const (*ops).remote_ip6[3]),
            ],
            ctx_u32(&raw const (*ops).local_port),
            ctx_u32(&raw const (*ops).remote_port),
            ctx_u32(&raw const (*ops).srtt_us),
        )
    };
    let (local, remote) = match family {
        2 => (v4_mapped(l4.to_ne_bytes()), v4_mapped(r4.to_ne_bytes())),
        10 => (ip6_bytes(l6), ip6_bytes(r6)),
        _ => return 1,
    };
    if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB || op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        if is_traced(&local) {
            let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_RTT_CB_FLAG) as i32);
        }
    } else if op == BPF_SOCK_OPS_RTT_CB {
        // srtt_us is the kernel's smoothed RTT in microseconds, left-shifted by 3.
        let srtt = srtt_us >> 3;
        // local_port is in host order; remote_port holds the network-order
        // port in its upper 16 bits.
        let rport = u16::from_be((rport_raw >> 16) as u16);
        rtt::record(&local, &remote, lport as u16, rport, srtt, 0);
    }
    1
}

/// Reads a 32-bit context field (a single load at a constant offset).
#[inline(always)]
unsafe fn ctx_u32(p: *const u32) -> u32 {
    unsafe { core::ptr::read_volatile(p) }
}

#[inline(always)]
fn ip6_bytes(words: [u32; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = words[i].to_ne_bytes();
        out[i * 4] = b[0];
        out[i * 4 + 1] = b[1];
        out[i * 4 + 2] = b[2];
        out[i * 4 + 3] = b[3];
        i += 1;
    }
    out
}

/// Whether `local` is an endpoint traced by the active configuration.
#[inline(always)]
fn is_traced(local: &[u8; 16]) -> bool {
    config().is_some_and(|cfg| maps::is_traced(maps::generation(cfg.epoch), local))
}

/// Reads an address stored as `struct sockaddr_in`/`sockaddr_in6` in a
/// tracepoint record at `off`.
#[inline(always)]
fn sockaddr_at(ctx: &TracePointContext, off: usize) -> Option<[u8; 16]> {
    let family: u16 = unsafe { ctx.read_at(off) }.ok()?;
    match family {
        2 => {
            let a: [u8; 4] = unsafe { ctx.read_at(off + 4) }.ok()?;
            Some(v4_mapped(a))
        }
        10 => unsafe { ctx.read_at(off + 8) }.ok(),
        _ => None,
    }
}

/// `tcp:tcp_probe`: fires for every segment received on an established TCP
/// socket; `srtt` is already in microseconds. Offsets from
/// `/sys/kernel/tracing/events/tcp/tcp_probe/format`.
#[tracepoint]
pub fn fl_tcp_probe(ctx: TracePointContext) -> u32 {
    let _ = try_tcp_probe(&ctx);
    0
}

#[inline(always)]
fn try_tcp_probe(ctx: &TracePointContext) -> Option<()> {
    let local = sockaddr_at(ctx, 8)?;
    let remote = sockaddr_at(ctx, 36)?;
    let sport: u16 = unsafe { ctx.read_at(64) }.ok()?;
    let dport: u16 = unsafe { ctx.read_at(66) }.ok()?;
    let srtt: u32 = unsafe { ctx.read_at(100) }.ok()?;
    let cookie: u64 = unsafe { ctx.read_at(112) }.ok()?;
    rtt::record(&local, &remote, sport, dport, srtt, cookie);
    Some(())
}

/// `tcp:tcp_retransmit_skb`: one retransmitted segment of a local socket.
#[tracepoint]
pub fn fl_tcp_retrans(ctx: TracePointContext) -> u32 {
    let _ = try_tcp_retrans(&ctx);
    0
}

#[inline(always)]
fn try_tcp_retrans(ctx: &TracePointContext) -> Option<()> {
    let sport: u16 = unsafe { ctx.read_at(28) }.ok()?;
    let dport: u16 = unsafe { ctx.read_at(30) }.ok()?;
    let family: u16 = unsafe { ctx.read_at(32) }.ok()?;
    let (local, remote) = if family == 2 {
        let s: [u8; 4] = unsafe { ctx.read_at(34) }.ok()?;
        let d: [u8; 4] = unsafe { ctx.read_at(38) }.ok()?;
        (v4_mapped(s), v4_mapped(d))
    } else {
        let s: [u8; 16] = unsafe { ctx.read_at(42) }.ok()?;
        let d: [u8; 16] = unsafe { ctx.read_at(58) }.ok()?;
        (s, d)
    };
    if !is_traced(&local) {
        return None;
    }
    let key = FlowKey {
        local_addr: local,
        remote_addr: remote,
        local_port: sport,
        remote_port: dport,
        protocol: PROTO_TCP,
        direction: DIRECTION_EGRESS,
        _pad: [0; 2],
    };
    flow::account_retransmit(&key);
    Some(())
}

/// `skb:kfree_skb`: the kernel dropped a packet (with a reason).
#[tracepoint]
pub fn fl_kfree_skb(ctx: TracePointContext) -> u32 {
    let _ = drop::on_kfree_skb(&ctx);
    0
}

#[cgroup_sock_addr(connect4)]
pub fn fl_connect4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    let (ip4, port, protocol) = unsafe {
        (
            ctx_u32(&raw const (*sa).user_ip4),
            ctx_u32(&raw const (*sa).user_port),
            ctx_u32(&raw const (*sa).protocol),
        )
    };
    on_connect(
        &ctx,
        false,
        v4_mapped(ip4.to_ne_bytes()),
        true,
        port,
        protocol,
    )
}

#[cgroup_sock_addr(connect6)]
pub fn fl_connect6(ctx: SockAddrContext) -> i32 {
    let remote = unsafe { read_ip6(ctx.sock_addr) };
    let (port, protocol) = unsafe {
        (
            ctx_u32(&raw const (*ctx.sock_addr).user_port),
            ctx_u32(&raw const (*ctx.sock_addr).protocol),
        )
    };
    let mapped = remote[..10] == [0u8; 10] && remote[10] == 0xff && remote[11] == 0xff;
    on_connect(&ctx, true, remote, mapped, port, protocol)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn fl_sendmsg4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    let (ip4, port, protocol) = unsafe {
        (
            ctx_u32(&raw const (*sa).user_ip4),
            ctx_u32(&raw const (*sa).user_port),
            ctx_u32(&raw const (*sa).protocol),
        )
    };
    on_sendmsg(
        &ctx,
        false,
        v4_mapped(ip4.to_ne_bytes()),
        true,
        port,
        protocol,
    )
}

#[cgroup_sock_addr(sendmsg6)]
pub fn fl_sendmsg6(ctx: SockAddrContext) -> i32 {
    let remote = unsafe { read_ip6(ctx.sock_addr) };
    let (port, protocol) = unsafe {
        (
            ctx_u32(&raw const (*ctx.sock_addr).user_port),
            ctx_u32(&raw const (*ctx.sock_addr).protocol),
        )
    };
    let mapped = remote[..10] == [0u8; 10] && remote[10] == 0xff && remote[11] == 0xff;
    on_sendmsg(&ctx, true, remote, mapped, port, protocol)
}

#[cgroup_sock_addr(getpeername4)]
pub fn fl_getpeername4(ctx: SockAddrContext) -> i32 {
    restore_frontend4(&ctx);
    1
}

#[cgroup_sock_addr(getpeername6)]
pub fn fl_getpeername6(ctx: SockAddrContext) -> i32 {
    restore_frontend6(&ctx);
    1
}

/// A reply on a translated UDP socket comes from the backend: the
/// application (glibc's resolver checks this) sees the Service address.
#[cgroup_sock_addr(recvmsg4)]
pub fn fl_recvmsg4(ctx: SockAddrContext) -> i32 {
    restore_frontend4(&ctx);
    1
}

#[cgroup_sock_addr(recvmsg6)]
pub fn fl_recvmsg6(ctx: SockAddrContext) -> i32 {
    restore_frontend6(&ctx);
    1
}

/// Rewrites the context's address from the socket's backend to the
/// frontend it connected to (only when it is that backend).
#[inline(always)]
fn restore_frontend4(ctx: &SockAddrContext) {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(s) = (unsafe { FL_SVC_SOCKS.get(&cookie) }) else {
        return;
    };
    let sa = ctx.sock_addr;
    let (ip4, port) = unsafe {
        (
            ctx_u32(&raw const (*sa).user_ip4),
            ctx_u32(&raw const (*sa).user_port),
        )
    };
    if v4_mapped(ip4.to_ne_bytes()) != s.backend || u16::from_be(port as u16) != s.backend_port {
        return;
    }
    let a = [
        s.frontend[12],
        s.frontend[13],
        s.frontend[14],
        s.frontend[15],
    ];
    unsafe {
        ctx_write_u32(&raw mut (*sa).user_ip4, u32::from_ne_bytes(a));
        ctx_write_u32(&raw mut (*sa).user_port, s.port.to_be() as u32);
    }
}

#[inline(always)]
fn restore_frontend6(ctx: &SockAddrContext) {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(s) = (unsafe { FL_SVC_SOCKS.get(&cookie) }) else {
        return;
    };
    let sa = ctx.sock_addr;
    let ip6 = unsafe { read_ip6(sa) };
    let port = unsafe { ctx_u32(&raw const (*sa).user_port) };
    if ip6 != s.backend || u16::from_be(port as u16) != s.backend_port {
        return;
    }
    unsafe {
        write_ip6(sa, &s.frontend);
        ctx_write_u32(&raw mut (*sa).user_port, s.port.to_be() as u32);
    }
}

/// Reads `user_ip6` (four loads at constant offsets).
#[inline(always)]
unsafe fn read_ip6(sa: *mut bpf_sock_addr) -> [u8; 16] {
    unsafe {
        ip6_bytes([
            ctx_u32(&raw const (*sa).user_ip6[0]),
            ctx_u32(&raw const (*sa).user_ip6[1]),
            ctx_u32(&raw const (*sa).user_ip6[2]),
            ctx_u32(&raw const (*sa).user_ip6[3]),
        ])
    }
}

/// Writes `user_ip6` (four stores at constant offsets).
#[inline(always)]
unsafe fn write_ip6(sa: *mut bpf_sock_addr, a: &[u8; 16]) {
    let w = |i: usize| u32::from_ne_bytes([a[i * 4], a[i * 4 + 1], a[i * 4 + 2], a[i * 4 + 3]]);
    unsafe {
        ctx_write_u32(&raw mut (*sa).user_ip6[0], w(0));
        ctx_write_u32(&raw mut (*sa).user_ip6[1], w(1));
        ctx_write_u32(&raw mut (*sa).user_ip6[2], w(2));
        ctx_write_u32(&raw mut (*sa).user_ip6[3], w(3));
    }
}

/// Writes a 32-bit context field (a single store at a constant offset).
#[inline(always)]
unsafe fn ctx_write_u32(p: *mut u32, v: u32) {
    unsafe { core::ptr::write_volatile(p, v) }
}

/// The pod addresses of the calling task's cgroup (or of the nearest
/// registered ancestor: containers live in sub-cgroups of their pod).
#[inline(always)]
fn caller_endpoint() -> Option<&'static flowlens_agent_common::PodAddrs> {
    let id = unsafe { bpf_get_current_cgroup_id() };
    if let Some(e) = unsafe { FL_CGROUPS.get(&id) } {
        return Some(e);
    }
    let mut level = 1;
    while level < 12 {
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 {
            return None;
        }
        if let Some(e) = unsafe { FL_CGROUPS.get(&id) } {
            return Some(e);
        }
        level += 1;
    }
    None
}

/// The caller's pod address (of the destination's family), the table
/// generation and the pod's endpoint entry, when the caller is a local
/// endpoint's task.
#[inline(always)]
fn caller(v4: bool) -> Option<(u32, [u8; 16], Option<&'static EndpointInfo>)> {
    let cfg = config()?;
    let cg = caller_endpoint()?;
    let local = if v4 { cg.addr4 } else { cg.addr6 };
    if local == [0u8; 16] {
        return None;
    }
    let generation = maps::generation(cfg.epoch);
    let ep = unsafe {
        FL_ENDPOINTS.get(&EndpointKey {
            generation,
            addr: local,
        })
    };
    Some((generation, local, ep))
}

/// Records a translation: the connection's Service (for the agent) and the
/// socket's frontend and backend (for getpeername and recvmsg).
#[inline(always)]
fn record_translation(
    ctx: &SockAddrContext,
    local: [u8; 16],
    frontend: [u8; 16],
    port: u16,
    protocol: u8,
    service_id: u64,
    b: &flowlens_agent_common::ServiceBackendAddr,
) {
    let conn = ServiceConnKey {
        client: local,
        backend: b.addr,
        port: b.port,
        protocol,
        _pad: 0,
    };
    let _ = FL_SVC_CONNS.insert(&conn, &service_id, 0);
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let sock = ServiceSocket {
        frontend,
        backend: b.addr,
        port,
        backend_port: b.port,
        _pad: [0; 4],
    };
    let _ = FL_SVC_SOCKS.insert(&cookie, &sock, 0);
    bump(COUNTER_SERVICE_TRANSLATED);
}

/// `sendto()` on an unconnected UDP socket to a Service address: the
/// datagram goes to a backend the rules allow (the same one for every
/// datagram of the socket), or fails with EPERM.
#[inline(always)]
fn on_sendmsg(
    ctx: &SockAddrContext,
    ctx6: bool,
    remote: [u8; 16],
    v4: bool,
    port_raw: u32,
    protocol: u32,
) -> i32 {
    let Some((generation, local, ep)) = caller(v4) else {
        return 1;
    };
    let protocol = protocol as u8;
    let port = u16::from_be(port_raw as u16);
    let Some(svc) = service::frontend(generation, &remote, port, protocol) else {
        return 1;
    };
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let sticky = Some((cookie ^ (cookie >> 32)) as u32);
    match service::choose(generation, svc, &remote, port, &local, ep, protocol, sticky) {
        service::Choice::Backend(b) => {
            translate(ctx, ctx6, &b);
            record_translation(ctx, local, remote, port, protocol, svc.service_id, &b);
            1
        }
        service::Choice::Refused(why) => {
            policy::count_unnamed(generation, why.endpoint_id, &why.decision, 1, 0);
            0
        }
        service::Choice::Unavailable => 1,
    }
}

/// Returns 1 to allow the connect, 0 to reject it with EPERM. `port_raw` is
/// the context's `user_port` (network order in the low 16 bits).
#[inline(always)]
fn on_connect(
    ctx: &SockAddrContext,
    ctx6: bool,
    remote: [u8; 16],
    v4: bool,
    port_raw: u32,
    protocol: u32,
) -> i32 {
    let Some((generation, local, ep)) = caller(v4) else {
        return 1;
    };
    let protocol = protocol as u8;
    let port = u16::from_be(port_raw as u16);
    if let Some(svc) = service::frontend(generation, &remote, port, protocol) {
        return match service::choose(generation, svc, &remote, port, &local, ep, protocol, None) {
            service::Choice::Backend(b) => {
                translate(ctx, ctx6, &b);
                record_translation(ctx, local, remote, port, protocol, svc.service_id, &b);
                1
            }
            service::Choice::Refused(why) => {
                policy::count_unnamed(generation, why.endpoint_id, &why.decision, 0, 1);
                bump(COUNTER_CONNECT_DENIED);
                forget_socket(ctx);
                0
            }
            service::Choice::Unavailable => {
                forget_socket(ctx);
                1
            }
        };
    }
    // A socket may connect again elsewhere: its old Service is no more its
    // peer.
    forget_socket(ctx);
    if let Some(ep) = ep {
        let d = policy::evaluate(generation, ep, ROLE_CLIENT, &remote, protocol, port);
        if d.verdict == VERDICT_DROP {
            let peer = policy::Peer {
                addr: remote,
                remote_port: port,
                local_port: port,
                protocol,
                attempt: 1,
            };
            policy::count(generation, ep.id, &d, 0, &peer);
            bump(COUNTER_CONNECT_DENIED);
            return 0;
        }
    }
    // The destination may be a pod of this node whose ingress rules block us.
    if let Some(peer) = unsafe {
        FL_ENDPOINTS.get(&EndpointKey {
            generation,
            addr: remote,
        })
    } {
        let d = policy::evaluate(generation, peer, ROLE_SERVER, &local, protocol, port);
        if d.verdict == VERDICT_DROP {
            let client = policy::Peer {
                addr: local,
                remote_port: port,
                local_port: port,
                protocol,
                attempt: 1,
            };
            policy::count(generation, peer.id, &d, 0, &client);
            bump(COUNTER_CONNECT_DENIED);
            return 0;
        }
    }
    1
}

/// Forgets what a socket was translated to.
#[inline(always)]
fn forget_socket(ctx: &SockAddrContext) {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = FL_SVC_SOCKS.remove(&cookie);
}

/// Rewrites the connect()'s destination to `b`.
#[inline(always)]
fn translate(ctx: &SockAddrContext, ctx6: bool, b: &flowlens_agent_common::ServiceBackendAddr) {
    let sa = ctx.sock_addr;
    unsafe {
        if !ctx6 {
            let a = [b.addr[12], b.addr[13], b.addr[14], b.addr[15]];
            ctx_write_u32(&raw mut (*sa).user_ip4, u32::from_ne_bytes(a));
        } else {
            write_ip6(sa, &b.addr);
        }
        ctx_write_u32(&raw mut (*sa).user_port, b.port.to_be() as u32);
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
