//! Parsing of the IPv4/IPv6 and transport headers of a packet at TC.
//!
//! Headers are read with `bpf_skb_load_bytes`, which also works when they are
//! not in the linear part of the skb. Sizes account for GSO: a super-packet
//! of N segments counts as N packets, each with its own headers.

use aya_ebpf::{EbpfContext, bindings::__sk_buff, programs::TcContext};
use flowlens_agent_common::{
    PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP, PROTO_UDP, v4_mapped,
};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;

/// TCP flag bits.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// What the datapath needs of one packet.
pub struct Packet {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Host byte order; 0 when the protocol has no ports (or for non-first fragments).
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
    pub tcp_flags: u8,
    /// ICMPv6 type (neighbour discovery is never blocked).
    pub icmp_type: u8,
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

impl Packet {
    pub const EMPTY: Packet = Packet {
        src: [0; 16],
        dst: [0; 16],
        sport: 0,
        dport: 0,
        protocol: 0,
        tcp_flags: 0,
        icmp_type: 0,
        packets: 0,
        bytes: 0,
        payload_bytes: 0,
    };
}

/// Parses an IPv4 or IPv6 packet into `out`; false for anything else (ARP, ...).
/// A call of its own so that its temporaries do not add to the caller's stack.
#[inline(never)]
pub fn parse(ctx: &TcContext, out: &mut Packet) -> bool {
    match parse_inner(ctx, out) {
        Some(()) => true,
        None => false,
    }
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

    let (l4_off, l3_hdr, l3_total, first_fragment) = match ethertype {
        ETH_P_IP => {
            let h: [u8; 20] = ctx.load(ETH_HLEN).ok()?;
            if h[0] >> 4 != 4 {
                return None;
            }
            let ihl = ((h[0] & 0x0f) as usize) * 4;
            if ihl < 20 {
                return None;
            }
            let tot_len = u16::from_be_bytes([h[2], h[3]]) as u64;
            let frag_off = u16::from_be_bytes([h[6], h[7]]) & 0x1fff;
            p.protocol = h[9];
            p.src = v4_mapped([h[12], h[13], h[14], h[15]]);
            p.dst = v4_mapped([h[16], h[17], h[18], h[19]]);
            (ETH_HLEN + ihl, ihl as u64, tot_len, frag_off == 0)
        }
        ETH_P_IPV6 => {
            let h: [u8; 8] = ctx.load(ETH_HLEN).ok()?;
            if h[0] >> 4 != 6 {
                return None;
            }
            let payload_len = u16::from_be_bytes([h[4], h[5]]) as u64;
            let mut next = h[6];
            p.src = ctx.load(ETH_HLEN + 8).ok()?;
            p.dst = ctx.load(ETH_HLEN + 24).ok()?;
            let mut off = ETH_HLEN + 40;
            let mut first = true;
            // Skip up to four extension headers.
            let mut i = 0;
            while i < 4 {
                match next {
                    // Hop-by-hop, routing, destination options.
                    0 | 43 | 60 => {
                        let e: [u8; 2] = ctx.load(off).ok()?;
                        next = e[0];
                        off += (e[1] as usize + 1) * 8;
                    }
                    // Fragment header: 8 bytes.
                    44 => {
                        let e: [u8; 4] = ctx.load(off).ok()?;
                        next = e[0];
                        let frag = u16::from_be_bytes([e[2], e[3]]) >> 3;
                        first = frag == 0;
                        off += 8;
                    }
                    _ => break,
                }
                i += 1;
            }
            p.protocol = next;
            let l3_hdr = (off - ETH_HLEN) as u64;
            (off, l3_hdr, payload_len + 40, first)
        }
        _ => return None,
    };

    // The L3 size of the (super-)packet: the IP length field for ordinary
    // packets (it excludes link-layer padding), the skb length for GSO
    // super-packets (whose length field is not meaningful).
    let l3_super = if segs > 1 || l3_total == 0 || l3_total > l3_len_skb {
        l3_len_skb
    } else {
        l3_total
    };

    let mut l4_hdr: u64 = 0;
    if first_fragment {
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
    }

    let hdrs = l3_hdr + l4_hdr;
    let payload_super = if l3_super > hdrs { l3_super - hdrs } else { 0 };
    p.bytes = l3_super + (segs - 1) * hdrs;
    p.payload_bytes = payload_super;
    Some(())
}
