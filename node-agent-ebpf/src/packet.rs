//! Parsing of the IPv4/IPv6 and transport headers of a packet at TC.
//!
//! Headers are read with `bpf_skb_load_bytes`, which also works when they are
//! not in the linear part of the skb. Sizes account for GSO: a super-packet
//! of N segments counts as N packets, each with its own headers.

use aya_ebpf::{EbpfContext, bindings::__sk_buff, programs::TcContext};
use flowlens_agent_common::{
    FragKey, FragPorts, PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP, PROTO_UDP,
};

use crate::maps::FL_FRAGS;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;

/// TCP flag bits.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Why rules cannot be evaluated on a packet ([`Packet::opaque`]); each is
/// its `SUSPECT_*` index plus one, 0 when they can.
pub const OPAQUE_ORPHAN_FRAGMENT: u8 = 1;
pub const OPAQUE_TRUNCATED: u8 = 2;
pub const OPAQUE_EXT_HEADERS: u8 = 3;

/// [`Packet::fragment`]: not a fragment, the first, or a later one.
pub const FRAGMENT_NONE: u8 = 0;
pub const FRAGMENT_FIRST: u8 = 1;
pub const FRAGMENT_LATER: u8 = 2;

/// What the datapath needs of one packet. Aligned so that addresses move
/// as words, not bytes.
#[repr(C, align(8))]
pub struct Packet {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Host byte order; 0 when the protocol has no ports (or for non-first fragments).
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
    pub tcp_flags: u8,
    /// ICMP or ICMPv6 type.
    pub icmp_type: u8,
    /// `OPAQUE_*`: why the transport header (ports, flags) is unknown, so
    /// that rules cannot be evaluated; 0 when it is known. Such a packet is
    /// counted (with the ports it has, 0 if none) and, at an endpoint with
    /// rules, dropped.
    pub opaque: u8,
    /// The datagram's identification, for fragments.
    pub frag_id: u32,
    /// `FRAGMENT_*`: whether the packet is a fragment, and which.
    pub fragment: u8,
    /// Wire packets (GSO segments).
    pub packets: u64,
    /// IP-layer bytes of all segments.
    pub bytes: u64,
    /// Transport payload bytes.
    pub payload_bytes: u64,
}

#[inline(always)]
fn skb(ctx: &TcContext) -> *const __sk_buff {
    ctx.as_ptr() as *const __sk_buff
}

/// Parses an IPv4 or IPv6 packet into `out`; false for anything else (ARP, ...).
/// A call of its own so that its temporaries do not add to the caller's stack.
///
/// The common case (headers in the linear part, no IPv6 extension headers)
/// reads the packet directly; anything else goes through the helper-based
/// parser.
///
/// Every field of `out` is written before returning true, so the caller
/// needs no (costly) zero-initialisation.
#[inline(never)]
pub fn parse(ctx: &TcContext, out: &mut Packet) -> bool {
    // Volatile: plain stores get merged into a `memset` call, which the BPF
    // backend turns into a byte loop.
    unsafe {
        core::ptr::write_volatile(&mut out.sport, 0);
        core::ptr::write_volatile(&mut out.dport, 0);
        core::ptr::write_volatile(&mut out.tcp_flags, 0);
        core::ptr::write_volatile(&mut out.icmp_type, 0);
        core::ptr::write_volatile(&mut out.protocol, 0);
        core::ptr::write_volatile(&mut out.opaque, 0);
        core::ptr::write_volatile(&mut out.fragment, FRAGMENT_NONE);
    }
    if parse_direct(ctx, out) {
        return true;
    }
    match parse_inner(ctx, out) {
        Some(()) => true,
        None => false,
    }
}

/// A pointer to `len` bytes at `off`, if they are in the linear data.
#[inline(always)]
fn bytes_at(ctx: &TcContext, off: usize, len: usize) -> Option<*const u8> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + len > end {
        return None;
    }
    Some((start + off) as *const u8)
}

#[inline(always)]
fn be16(p: *const u8, off: usize) -> u16 {
    u16::from_be(unsafe { *(p.add(off) as *const u16) })
}

/// The IPv4 header without options, read with word loads.
#[repr(C)]
struct Ipv4Header {
    vihl: u8,
    tos: u8,
    tot_len: u16,
    id: u16,
    frag_off: u16,
    ttl: u8,
    protocol: u8,
    check: u16,
    saddr: u32,
    daddr: u32,
}

/// Writes the IPv4-mapped form of a network-order IPv4 address with word stores.
#[inline(always)]
fn write_v4_mapped(dst: &mut [u8; 16], addr: u32) {
    let p = dst.as_mut_ptr();
    unsafe {
        *(p as *mut u64) = 0;
        *(p.add(8) as *mut u32) = u32::from_ne_bytes([0, 0, 0xff, 0xff]);
        *(p.add(12) as *mut u32) = addr;
    }
}

/// The fast path: direct packet access.
#[inline(always)]
fn parse_direct(ctx: &TcContext, p: &mut Packet) -> bool {
    let skb = skb(ctx);
    let ethertype = u16::from_be(unsafe { (*skb).protocol } as u16);
    let skb_len = unsafe { (*skb).len } as u64;
    let gso_segs = unsafe { (*skb).gso_segs } as u64;
    let segs = if gso_segs > 1 { gso_segs } else { 1 };
    if skb_len <= ETH_HLEN as u64 {
        return false;
    }
    let l3_len_skb = skb_len - ETH_HLEN as u64;
    let (l4_off, l3_hdr, l3_total) = if ethertype == ETH_P_IP {
        let Some(h) = bytes_at(ctx, ETH_HLEN, 20) else {
            return false;
        };
        let h = unsafe { &*(h as *const Ipv4Header) };
        if h.vihl != 0x45 {
            // IP options (rare): the slow path handles them.
            return false;
        }
        // Fragments (more-fragments bit or an offset): the slow path
        // remembers or recalls their ports.
        if u16::from_be(h.frag_off) & 0x3fff != 0 {
            return false;
        }
        p.protocol = h.protocol;
        write_v4_mapped(&mut p.src, h.saddr);
        write_v4_mapped(&mut p.dst, h.daddr);
        (ETH_HLEN + 20, 20u64, u16::from_be(h.tot_len) as u64)
    } else if ethertype == ETH_P_IPV6 {
        let Some(h) = bytes_at(ctx, ETH_HLEN, 40) else {
            return false;
        };
        let next = unsafe { *h.add(6) };
        if !matches!(next, PROTO_TCP | PROTO_UDP | PROTO_SCTP | PROTO_ICMPV6) {
            // Extension headers: the slow path walks them.
            return false;
        }
        p.protocol = next;
        // Word copies (x86 and arm64 JITs allow unaligned packet loads).
        unsafe {
            let (s, d) = (
                p.src.as_mut_ptr() as *mut u64,
                p.dst.as_mut_ptr() as *mut u64,
            );
            *s = *(h.add(8) as *const u64);
            *s.add(1) = *(h.add(16) as *const u64);
            *d = *(h.add(24) as *const u64);
            *d.add(1) = *(h.add(32) as *const u64);
        }
        (ETH_HLEN + 40, 40u64, be16(h, 4) as u64 + 40)
    } else {
        return false;
    };
    let l4_hdr: u64 = match p.protocol {
        PROTO_TCP => {
            let Some(t) = bytes_at(ctx, l4_off, 14) else {
                return false;
            };
            p.sport = be16(t, 0);
            p.dport = be16(t, 2);
            p.tcp_flags = unsafe { *t.add(13) };
            ((unsafe { *t.add(12) } >> 4) as u64) * 4
        }
        PROTO_UDP | PROTO_SCTP => {
            let Some(u) = bytes_at(ctx, l4_off, 4) else {
                return false;
            };
            p.sport = be16(u, 0);
            p.dport = be16(u, 2);
            if p.protocol == PROTO_UDP { 8 } else { 12 }
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            let Some(i) = bytes_at(ctx, l4_off, 1) else {
                return false;
            };
            p.icmp_type = unsafe { *i };
            8
        }
        _ => 0,
    };
    let l3_super = if segs > 1 || l3_total == 0 || l3_total > l3_len_skb {
        l3_len_skb
    } else {
        l3_total
    };
    let hdrs = l3_hdr + l4_hdr;
    p.packets = segs;
    p.bytes = l3_super + (segs - 1) * hdrs;
    p.payload_bytes = if l3_super > hdrs { l3_super - hdrs } else { 0 };
    true
}

/// IPv6 extension headers the slow path skips (`next header` values).
const IPV6_EXT_HOP_BY_HOP: u8 = 0;
const IPV6_EXT_ROUTING: u8 = 43;
const IPV6_EXT_FRAGMENT: u8 = 44;
const IPV6_EXT_DEST_OPTS: u8 = 60;
const IPV6_EXT_AUTH: u8 = 51;
const IPV6_EXT_MOBILITY: u8 = 135;
const IPV6_EXT_HIP: u8 = 139;
const IPV6_EXT_SHIM6: u8 = 140;
/// Extension headers walked at most (a bounded loop for the verifier). A
/// packet with more is opaque: at an endpoint with rules it is dropped,
/// never passed unevaluated. RFC 8200 expects each header at most once (the
/// destination options twice), so legitimate chains are shorter.
pub const IPV6_MAX_EXT_HEADERS: u32 = 8;

/// Whether `next` is an IPv6 extension header (RFC 7045's list; ESP ends
/// the chain: what follows it is encrypted).
#[inline(always)]
fn is_ipv6_ext(next: u8) -> bool {
    matches!(
        next,
        IPV6_EXT_HOP_BY_HOP
            | IPV6_EXT_ROUTING
            | IPV6_EXT_FRAGMENT
            | IPV6_EXT_DEST_OPTS
            | IPV6_EXT_AUTH
            | IPV6_EXT_MOBILITY
            | IPV6_EXT_HIP
            | IPV6_EXT_SHIM6
    )
}

/// The network layer as the slow path found it. Compact: it lives on the
/// parser's stack, which adds to the TC program's (512 bytes in all).
struct L3 {
    /// Offset of the transport header.
    l4_off: u32,
    /// Length of the IP header(s).
    l3_hdr: u32,
    /// The IP length field (header included).
    l3_total: u32,
    /// False for non-first fragments (they carry no transport header).
    first_fragment: bool,
    /// Part of a fragmented datagram (first or not).
    fragmented: bool,
    /// The datagram's identification (fragments only).
    frag_id: u32,
    /// The extension-header chain is longer than the datapath walks (or
    /// cut short).
    too_many_ext: bool,
}

#[inline(always)]
fn parse_inner(ctx: &TcContext, p: &mut Packet) -> Option<()> {
    let skb = skb(ctx);
    // skb->protocol holds the big-endian ethertype in the low 16 bits.
    let ethertype = u16::from_be(unsafe { (*skb).protocol } as u16);
    let skb_len = unsafe { (*skb).len } as u64;
    let gso_segs = unsafe { (*skb).gso_segs } as u64;
    let segs = if gso_segs > 1 { gso_segs } else { 1 };
    if skb_len <= ETH_HLEN as u64 {
        return None;
    }
    let l3_len_skb = skb_len - ETH_HLEN as u64;

    p.packets = segs;

    let l3 = match ethertype {
        ETH_P_IP => parse_ipv4_slow(ctx, p)?,
        ETH_P_IPV6 => parse_ipv6_slow(ctx, p)?,
        _ => return None,
    };

    // The L3 size of the (super-)packet: the IP length field for ordinary
    // packets (it excludes link-layer padding), the skb length for GSO
    // super-packets (whose length field is not meaningful).
    let l3_total = l3.l3_total as u64;
    let l3_super = if segs > 1 || l3_total == 0 || l3_total > l3_len_skb {
        l3_len_skb
    } else {
        l3_total
    };

    let mut l4_hdr: u64 = 0;
    if l3.too_many_ext {
        p.opaque = OPAQUE_EXT_HEADERS;
    } else if l3.first_fragment {
        match parse_l4_slow(ctx, p, l3.l4_off as usize) {
            Some(h) => l4_hdr = h,
            None => p.opaque = OPAQUE_TRUNCATED,
        }
    } else {
        // No ICMP header in a later fragment: not an echo request or reply.
        p.icmp_type = 255;
    }
    if l3.fragmented {
        p.fragment = if l3.first_fragment {
            FRAGMENT_FIRST
        } else {
            FRAGMENT_LATER
        };
        p.frag_id = l3.frag_id;
    }

    let hdrs = l3.l3_hdr as u64 + l4_hdr;
    let payload_super = if l3_super > hdrs { l3_super - hdrs } else { 0 };
    p.bytes = l3_super + (segs - 1) * hdrs;
    p.payload_bytes = payload_super;
    Some(())
}

/// The IPv4 header (with options) at `ETH_HLEN`: protocol and addresses.
#[inline(always)]
fn parse_ipv4_slow(ctx: &TcContext, p: &mut Packet) -> Option<L3> {
    let h: [u8; 20] = ctx.load(ETH_HLEN).ok()?;
    if h[0] >> 4 != 4 {
        return None;
    }
    let ihl = ((h[0] & 0x0f) as usize) * 4;
    if ihl < 20 {
        return None;
    }
    let tot_len = u16::from_be_bytes([h[2], h[3]]) as u32;
    let frag = u16::from_be_bytes([h[6], h[7]]);
    let frag_off = frag & 0x1fff;
    p.protocol = h[9];
    // Word stores (byte-wise copies spill every byte to the stack).
    let addrs: [u32; 2] = ctx.load(ETH_HLEN + 12).ok()?;
    write_v4_mapped(&mut p.src, addrs[0]);
    write_v4_mapped(&mut p.dst, addrs[1]);
    Some(L3 {
        l4_off: (ETH_HLEN + ihl) as u32,
        l3_hdr: ihl as u32,
        l3_total: tot_len,
        first_fragment: frag_off == 0,
        fragmented: frag & 0x3fff != 0,
        frag_id: u16::from_be_bytes([h[4], h[5]]) as u32,
        too_many_ext: false,
    })
}

/// The IPv6 header at `ETH_HLEN` and up to IPV6_MAX_EXT_HEADERS extension
/// headers: protocol and addresses (the protocol is the header after the
/// chain).
#[inline(always)]
fn parse_ipv6_slow(ctx: &TcContext, p: &mut Packet) -> Option<L3> {
    let h: [u8; 8] = ctx.load(ETH_HLEN).ok()?;
    if h[0] >> 4 != 6 {
        return None;
    }
    let payload_len = u16::from_be_bytes([h[4], h[5]]) as u32;
    let mut next = h[6];
    p.src = ctx.load(ETH_HLEN + 8).ok()?;
    p.dst = ctx.load(ETH_HLEN + 24).ok()?;
    let mut off = ETH_HLEN + 40;
    let mut first = true;
    let mut fragmented = false;
    let mut frag_id = 0u32;
    let mut cut = false;
    let mut i = 0;
    while i < IPV6_MAX_EXT_HEADERS {
        match next {
            // Fragment header: 8 bytes.
            IPV6_EXT_FRAGMENT => {
                let Ok(e) = ctx.load::<[u8; 8]>(off) else {
                    cut = true;
                    break;
                };
                next = e[0];
                let frag = u16::from_be_bytes([e[2], e[3]]) >> 3;
                first = frag == 0;
                fragmented = true;
                frag_id = u32::from_be_bytes([e[4], e[5], e[6], e[7]]);
                off += 8;
            }
            // Authentication header: length in 4-byte units, minus 2.
            IPV6_EXT_AUTH => {
                let Ok(e) = ctx.load::<[u8; 2]>(off) else {
                    cut = true;
                    break;
                };
                next = e[0];
                off += (e[1] as usize + 2) * 4;
            }
            // The others: length in 8-byte units, minus 1.
            n if is_ipv6_ext(n) => {
                let Ok(e) = ctx.load::<[u8; 2]>(off) else {
                    cut = true;
                    break;
                };
                next = e[0];
                off += (e[1] as usize + 1) * 8;
            }
            _ => break,
        }
        i += 1;
    }
    p.protocol = next;
    let l3_hdr = (off - ETH_HLEN) as u32;
    Some(L3 {
        l4_off: off as u32,
        l3_hdr,
        l3_total: payload_len + 40,
        first_fragment: first,
        fragmented,
        frag_id,
        too_many_ext: cut || is_ipv6_ext(next),
    })
}

/// The transport header at `l4_off`: ports, TCP flags or ICMP type; returns
/// its length (0 for other protocols).
#[inline(always)]
fn parse_l4_slow(ctx: &TcContext, p: &mut Packet, l4_off: usize) -> Option<u64> {
    let mut l4_hdr: u64 = 0;
    match p.protocol {
        PROTO_TCP => {
            let t: [u8; 14] = ctx.load(l4_off).ok()?;
            p.sport = u16::from_be_bytes([t[0], t[1]]);
            p.dport = u16::from_be_bytes([t[2], t[3]]);
            l4_hdr = ((t[12] >> 4) as u64) * 4;
            p.tcp_flags = t[13];
        }
        PROTO_UDP => {
            let u: [u8; 4] = ctx.load(l4_off).ok()?;
            p.sport = u16::from_be_bytes([u[0], u[1]]);
            p.dport = u16::from_be_bytes([u[2], u[3]]);
            l4_hdr = 8;
        }
        PROTO_SCTP => {
            let s: [u8; 4] = ctx.load(l4_off).ok()?;
            p.sport = u16::from_be_bytes([s[0], s[1]]);
            p.dport = u16::from_be_bytes([s[2], s[3]]);
            l4_hdr = 12;
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            let i: [u8; 1] = ctx.load(l4_off).ok()?;
            p.icmp_type = i[0];
            l4_hdr = 8;
        }
        _ => {}
    }
    Some(l4_hdr)
}

/// A fragment's ports: the first fragment of a datagram records them, the
/// others take them from it (so they meet the same rules and count under
/// the same flow). A later fragment whose first was not seen is opaque.
/// A call of its own, from the program rather than the parser: its key
/// stays off the parser's stack (the verifier sums the stacks of a chain of
/// calls).
#[inline(never)]
pub fn fragment_ports(p: &mut Packet) {
    if p.opaque != 0 || !matches!(p.protocol, PROTO_TCP | PROTO_UDP | PROTO_SCTP) {
        return;
    }
    let key = FragKey {
        src: p.src,
        dst: p.dst,
        id: p.frag_id,
        protocol: p.protocol,
        _pad: [0; 3],
    };
    if p.fragment == FRAGMENT_FIRST {
        let ports = FragPorts {
            sport: p.sport,
            dport: p.dport,
        };
        let _ = FL_FRAGS.insert(&key, &ports, 0);
        return;
    }
    match unsafe { FL_FRAGS.get(&key) } {
        Some(ports) => {
            p.sport = ports.sport;
            p.dport = ports.dport;
        }
        None => p.opaque = OPAQUE_ORPHAN_FRAGMENT,
    }
}
