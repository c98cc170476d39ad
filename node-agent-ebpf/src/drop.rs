//! Kernel drops of traced flows, from the `skb:kfree_skb` tracepoint.
//!
//! The tracepoint fires when the kernel frees a packet with a drop reason
//! (normal frees go to `consume_skb`). The packet's headers are read from
//! the `sk_buff` at offsets the agent resolved from BTF ([`SkbLayout`]); the
//! drop is counted in the flow entry the TC programs created for it, and by
//! reason in `FL_DROP_REASONS`.

use aya_ebpf::{
    helpers::{bpf_probe_read_kernel, bpf_probe_read_kernel_buf},
    programs::TracePointContext,
};
use flowlens_agent_common::{
    COUNTER_DROPS_WITHOUT_FLOW, DIRECTION_EGRESS, DIRECTION_INGRESS, FlowKey, NUM_DROP_REASONS,
    PROTO_SCTP, PROTO_TCP, PROTO_UDP, SkbLayout, v4_mapped,
};

use crate::{
    flow,
    maps::{FL_DROP_REASONS, FL_SKB_LAYOUT, bump, config, is_traced},
};

/// `SKB_NOT_DROPPED_YET` and `SKB_CONSUMED` are not drops.
const FIRST_DROP_REASON: u32 = 2;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
/// `skb->network_header`/`transport_header` when unset.
const UNSET_HEADER: u16 = 0xffff;

/// Offsets in the tracepoint record, from
/// `/sys/kernel/tracing/events/skb/kfree_skb/format`.
const TP_SKBADDR: usize = 8;
const TP_PROTOCOL: usize = 32;
const TP_REASON: usize = 36;

#[inline(always)]
fn read<T>(addr: u64) -> Option<T> {
    unsafe { bpf_probe_read_kernel(addr as *const T) }.ok()
}

#[inline(always)]
pub fn on_kfree_skb(ctx: &TracePointContext) -> Option<()> {
    let reason: u32 = unsafe { ctx.read_at(TP_REASON) }.ok()?;
    if reason < FIRST_DROP_REASON {
        return None;
    }
    // Host order: the tracepoint stores ntohs(skb->protocol).
    let ethertype: u16 = unsafe { ctx.read_at(TP_PROTOCOL) }.ok()?;
    if ethertype != ETH_P_IP && ethertype != ETH_P_IPV6 {
        return None;
    }
    let cfg = config()?;
    let layout = FL_SKB_LAYOUT.get(0)?;
    if layout.valid != 1 {
        return None;
    }
    let skb: u64 = unsafe { ctx.read_at(TP_SKBADDR) }.ok()?;
    // The packet as on the wire: local = source, remote = destination.
    let mut key = FlowKey {
        local_addr: [0; 16],
        remote_addr: [0; 16],
        local_port: 0,
        remote_port: 0,
        protocol: 0,
        direction: DIRECTION_EGRESS,
        _pad: [0; 2],
    };
    headers(skb, layout, ethertype == ETH_P_IPV6, &mut key)?;

    // The endpoint the drop belongs to: the receiver if it is traced here,
    // else the sender.
    let generation = crate::maps::generation(cfg.epoch);
    if is_traced(generation, &key.remote_addr) {
        core::mem::swap(&mut key.local_addr, &mut key.remote_addr);
        core::mem::swap(&mut key.local_port, &mut key.remote_port);
        key.direction = DIRECTION_INGRESS;
    } else if !is_traced(generation, &key.local_addr) {
        return None;
    }

    let slot = if reason < NUM_DROP_REASONS {
        reason
    } else {
        NUM_DROP_REASONS - 1
    };
    if let Some(p) = FL_DROP_REASONS.get_ptr_mut(slot) {
        // Per-CPU slot: no other writer.
        unsafe { *p += 1 };
    }
    if !flow::account_drop(&key) {
        bump(COUNTER_DROPS_WITHOUT_FLOW);
    }
    Some(())
}

/// Reads the IP and transport headers of the packet at `skb` into `key`
/// (source as local, destination as remote).
#[inline(never)]
fn headers(skb: u64, layout: &SkbLayout, v6: bool, key: &mut FlowKey) -> Option<()> {
    let head: u64 = read(skb + u64::from(layout.head))?;
    let nh: u16 = read(skb + u64::from(layout.network_header))?;
    let th: u16 = read(skb + u64::from(layout.transport_header))?;
    if head == 0 || nh == UNSET_HEADER {
        return None;
    }
    let ip = head + u64::from(nh);
    let (l4_default, first_fragment) = if v6 {
        // Version/class/flow (4), payload length (2), next header (1), hop limit (1).
        let fixed: [u8; 8] = read(ip)?;
        if fixed[0] >> 4 != 6 {
            return None;
        }
        key.protocol = fixed[6];
        read_into(ip + 8, &mut key.local_addr)?;
        read_into(ip + 24, &mut key.remote_addr)?;
        (ip + 40, true)
    } else {
        // Version/IHL .. checksum (12 bytes), then the addresses.
        let fixed: [u8; 12] = read(ip)?;
        if fixed[0] >> 4 != 4 {
            return None;
        }
        key.protocol = fixed[9];
        let addrs: [u8; 8] = read(ip + 12)?;
        key.local_addr = v4_mapped([addrs[0], addrs[1], addrs[2], addrs[3]]);
        key.remote_addr = v4_mapped([addrs[4], addrs[5], addrs[6], addrs[7]]);
        let ihl = u64::from(fixed[0] & 0x0f) * 4;
        let frag = u16::from_be_bytes([fixed[6], fixed[7]]) & 0x1fff;
        (ip + ihl, frag == 0)
    };
    if first_fragment && matches!(key.protocol, PROTO_TCP | PROTO_UDP | PROTO_SCTP) {
        // The transport header offset, when the stack has set it past the
        // IP header; else right after the fixed header.
        let l4 = if th != UNSET_HEADER && th > nh {
            head + u64::from(th)
        } else {
            l4_default
        };
        let ports: [u8; 4] = read(l4)?;
        key.local_port = u16::from_be_bytes([ports[0], ports[1]]);
        key.remote_port = u16::from_be_bytes([ports[2], ports[3]]);
    }
    Some(())
}

#[inline(always)]
fn read_into(addr: u64, dst: &mut [u8; 16]) -> Option<()> {
    unsafe { bpf_probe_read_kernel_buf(addr as *const u8, dst) }.ok()
}
