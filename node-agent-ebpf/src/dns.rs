//! DNS messages of traced pods, copied to the agent: the queries a pod
//! sends to port 53 and the answers it receives from port 53 (UDP and
//! TCP). The agent parses them (names of external peers, response codes,
//! latency); nothing here reads the message itself.
//!
//! Bounded: at most `DNS_EVENTS_PER_CPU_SECOND` copies per CPU per second
//! and a 4 MiB ring buffer; what does not fit is counted in
//! `FL_DNS_BUDGET.dropped`, never waited for. No copy wakes the agent (a
//! wakeup is an interrupt and a context switch in the packet's path: it
//! made a copy cost 8.5 µs); the agent reads the ring on its own clock.
//! The packet always passes on to the rest of the program unchanged.

use aya_ebpf::{EbpfContext, helpers::bpf_ktime_get_ns, programs::TcContext};
use flowlens_agent_common::{DNS_CAPTURE_BYTES, DNS_EVENTS_PER_CPU_SECOND};

/// `bpf_ringbuf_submit` flag: do not wake the reader.
const BPF_RB_NO_WAKEUP: u64 = 1;

use crate::{
    maps::{FL_DNS_BUDGET, FL_DNS_EVENTS, is_traced},
    packet::Packet,
};

const ETH_HLEN: u64 = 14;

/// Copies one DNS packet of local address `local` (traced in `generation`)
/// to the ring buffer, within the budget. `p` is a single packet (not a
/// GSO train) with a non-empty payload; the caller checked the port.
#[inline(never)]
pub fn capture(ctx: &TcContext, p: &Packet, egress: bool, generation: u32) {
    if p.packets != 1 || p.payload_bytes == 0 || p.payload_bytes > p.bytes {
        return;
    }
    let local = if egress { &p.src } else { &p.dst };
    if !is_traced(generation, local) {
        return;
    }
    let Some(budget) = FL_DNS_BUDGET.get_ptr_mut(0) else {
        return;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    // Per-CPU slot: no other writer.
    let b = unsafe { &mut *budget };
    if now.wrapping_sub(b.window_ns) >= 1_000_000_000 {
        b.window_ns = now;
        b.used = 0;
    }
    if b.used >= DNS_EVENTS_PER_CPU_SECOND {
        b.dropped += 1;
        return;
    }
    let Some(mut entry) = FL_DNS_EVENTS.reserve(0) else {
        b.dropped += 1;
        return;
    };
    b.used += 1;
    // The payload starts after the IP and transport headers: the packet's
    // IP bytes less its payload.
    let offset = ETH_HLEN + (p.bytes - p.payload_bytes);
    let len = if p.payload_bytes > DNS_CAPTURE_BYTES as u64 {
        DNS_CAPTURE_BYTES as u32
    } else {
        p.payload_bytes as u32
    };
    let ev = entry.as_mut_ptr();
    let copied = unsafe {
        (*ev).ts_ns = now;
        (*ev).local_addr = *local;
        (*ev).remote_addr = if egress { p.dst } else { p.src };
        (*ev).local_port = if egress { p.sport } else { p.dport };
        (*ev).remote_port = if egress { p.dport } else { p.sport };
        (*ev).protocol = p.protocol;
        (*ev).direction = if egress { 0 } else { 1 };
        (*ev).captured = len as u16;
        (*ev).payload_len = p.payload_bytes as u32;
        (*ev)._pad = 0;
        load_payload(ctx, offset as u32, &mut (*ev).payload, len)
    };
    if copied {
        b.captured += 1;
        entry.submit(BPF_RB_NO_WAKEUP);
    } else {
        b.dropped += 1;
        entry.discard(BPF_RB_NO_WAKEUP);
    }
}

/// `len` bytes (1..=DNS_CAPTURE_BYTES) of the packet at `offset` into `buf`.
#[inline(always)]
fn load_payload(ctx: &TcContext, offset: u32, buf: &mut [u8; DNS_CAPTURE_BYTES], len: u32) -> bool {
    // The verifier needs the length's bounds on the register passed.
    let len = len & (2 * DNS_CAPTURE_BYTES as u32 - 1);
    if len == 0 || len > DNS_CAPTURE_BYTES as u32 {
        return false;
    }
    let r = unsafe {
        aya_ebpf::helpers::bpf_skb_load_bytes(
            ctx.as_ptr() as *const _,
            offset,
            buf.as_mut_ptr() as *mut _,
            len,
        )
    };
    r == 0
}
