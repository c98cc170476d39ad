//! Per-flow packet and byte accounting, aggregated in the kernel.

use aya_ebpf::bindings::BPF_NOEXIST;
use flowlens_agent_common::{
    COUNTER_FLOW_TABLE_FULL, FLOW_FLAG_FIN, FLOW_FLAG_RST, FLOW_FLAG_SYN, FLOW_FLAG_SYN_ACK,
    FlowKey, FlowStats, OverflowKey, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP,
};

use crate::{
    atomic::{add_u32, add_u64},
    maps::{FL_FLOW_SCRATCH, FL_FLOWS, FL_OVERFLOW, bump},
    packet::{Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

/// Flags that tell who opened the flow: TCP SYN / SYN-ACK, and ICMP echo
/// request / reply (which play the same roles for ping).
#[inline(always)]
fn tcp_flow_flags(p: &Packet) -> u32 {
    if p.protocol == PROTO_ICMP || p.protocol == PROTO_ICMPV6 {
        return match p.icmp_type {
            8 | 128 => FLOW_FLAG_SYN,
            0 | 129 => FLOW_FLAG_SYN_ACK,
            _ => 0,
        };
    }
    if p.protocol != PROTO_TCP {
        return 0;
    }
    let f = p.tcp_flags;
    let mut out = 0;
    if f & TCP_SYN != 0 {
        out |= if f & TCP_ACK != 0 {
            FLOW_FLAG_SYN_ACK
        } else {
            FLOW_FLAG_SYN
        };
    }
    if f & TCP_FIN != 0 {
        out |= FLOW_FLAG_FIN;
    }
    if f & TCP_RST != 0 {
        out |= FLOW_FLAG_RST;
    }
    out
}

/// The live flow-table entry of `key`, or null. A raw pointer rather than
/// an `Option`: the verifier rejects spilling the undefined payload of a
/// `None`.
#[inline(always)]
pub fn lookup(key: &FlowKey) -> *mut FlowStats {
    match FL_FLOWS.get(0) {
        Some(flows) => flows.get_ptr_mut(key).unwrap_or(core::ptr::null_mut()),
        None => core::ptr::null_mut(),
    }
}

/// Adds a packet to an entry.
#[inline(always)]
pub fn add(stats: *mut FlowStats, p: &Packet) {
    add_with_flags(stats, p, tcp_flow_flags(p));
}

#[inline(always)]
fn add_with_flags(stats: *mut FlowStats, p: &Packet, flags: u32) {
    unsafe {
        add_u64(&raw mut (*stats).packets, p.packets);
        add_u64(&raw mut (*stats).bytes, p.bytes);
        add_u64(&raw mut (*stats).payload_bytes, p.payload_bytes);
        // Flags only ever gain bits; a lost race loses a bit that the next
        // packet of the same kind sets again.
        if flags != 0 && (*stats).flags & flags != flags {
            (*stats).flags |= flags;
        }
    }
}

/// Counts a packet of a traced endpoint. `key` is the flow as seen from the
/// local endpoint, `existing` its entry if the caller found one (else null),
/// `pass` whether and how the key's packets pass in this epoch
/// (`FlowStats::pass`, 0: not known to) and `ifindex` the interface of the
/// program, both recorded for the fast path.
#[inline(never)]
pub fn account(key: &FlowKey, p: &Packet, existing: *mut FlowStats, pass: u64, ifindex: u32) {
    let Some(flows) = FL_FLOWS.get(0) else {
        return;
    };
    let flags = tcp_flow_flags(p);
    if !existing.is_null() {
        let stats = existing;
        add_with_flags(stats, p, flags);
        // Plain stores: racing writers store a word of the current epoch
        // or 0 (a word of another epoch never passes), and the one
        // interface whose program sees the key's packets.
        unsafe {
            core::ptr::write_volatile(&raw mut (*stats).pass, pass);
            (*stats).ifindex = ifindex;
        }
        return;
    }
    let Some(fresh) = new_entry(p, flags, pass, ifindex) else {
        return;
    };
    match flows.insert(key, fresh, BPF_NOEXIST as u64) {
        Ok(()) => {}
        // Another CPU created it first.
        Err(-17) => {
            if let Some(stats) = flows.get_ptr_mut(key) {
                add_with_flags(stats, p, flags);
            }
        }
        // Table full: keep the totals exact in the per-endpoint overflow table.
        Err(_) => {
            bump(COUNTER_FLOW_TABLE_FULL);
            account_overflow(key, p);
        }
    }
}

/// A new entry for packet `p`, written in this CPU's scratch slot rather
/// than on the stack: the TC programs' frames are close to the verifier's
/// 512 bytes. Only the TC programs use the slot, and they do not nest on a
/// CPU.
#[inline(always)]
fn new_entry(p: &Packet, flags: u32, pass: u64, ifindex: u32) -> Option<&'static FlowStats> {
    let e = FL_FLOW_SCRATCH.get_ptr_mut(0)?;
    // Field by field: a struct literal would be built on the stack first.
    unsafe {
        (*e).packets = p.packets;
        (*e).bytes = p.bytes;
        (*e).payload_bytes = p.payload_bytes;
        (*e).flags = flags;
        (*e).retransmits = 0;
        (*e).drops = 0;
        (*e).ifindex = ifindex;
        (*e).pass = pass;
        Some(&*e)
    }
}

#[inline(always)]
fn account_overflow(key: &FlowKey, p: &Packet) {
    let Some(overflow) = FL_OVERFLOW.get(0) else {
        return;
    };
    let okey = OverflowKey {
        local_addr: key.local_addr,
        direction: key.direction,
        _pad: [0; 7],
    };
    if let Some(stats) = overflow.get_ptr_mut(&okey) {
        add_with_flags(stats, p, 0);
        return;
    }
    let Some(fresh) = new_entry(p, 0, 0, 0) else {
        return;
    };
    if overflow.insert(&okey, fresh, BPF_NOEXIST as u64).is_err()
        && let Some(stats) = overflow.get_ptr_mut(&okey)
    {
        add_with_flags(stats, p, 0);
    }
}

/// Counts one TCP retransmission on the egress flow `key`.
#[inline(always)]
pub fn account_retransmit(key: &FlowKey) {
    let Some(flows) = FL_FLOWS.get(0) else {
        return;
    };
    if let Some(stats) = flows.get_ptr_mut(key) {
        unsafe {
            let r = &raw mut (*stats).retransmits;
            add_u32(r, 1);
        }
        return;
    }
    let fresh = FlowStats {
        packets: 0,
        bytes: 0,
        payload_bytes: 0,
        flags: 0,
        retransmits: 1,
        drops: 0,
        ifindex: 0,
        pass: 0,
    };
    let _ = flows.insert(key, &fresh, BPF_NOEXIST as u64);
}

/// Counts one kernel drop on the flow `key`; false when the flow has no
/// entry (nothing of it was counted in this drain period).
#[inline(always)]
pub fn account_drop(key: &FlowKey) -> bool {
    let Some(flows) = FL_FLOWS.get(0) else {
        return false;
    };
    match flows.get_ptr_mut(key) {
        Some(stats) => {
            unsafe { add_u32(&raw mut (*stats).drops, 1) };
            true
        }
        None => false,
    }
}
