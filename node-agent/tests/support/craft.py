"""Crafted packets from a hostile pod, and a sniffer that counts what arrives.

  craft.py send <case> <src> <dst>   sends the case's packets with raw sockets
  craft.py sniff <seconds> <src>...  counts frames arriving on eth0 from <src>

Raw IP sockets (IP_HDRINCL) leave each header as written: fragments are sent
as they are, never reassembled or refragmented by the sender's kernel.
"""
import os
import socket
import struct
import sys
import time

TCP, UDP, ICMPV6, DSTOPTS, FRAGMENT = 6, 17, 58, 60, 44


def csum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def pseudo4(src, dst, proto, seg):
    return socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, proto, len(seg))


def pseudo6(src, dst, proto, seg):
    return (socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst)
            + struct.pack("!IxxxB", len(seg), proto))


def tcp_syn(pseudo, sport, dport):
    h = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 0x02, 65535, 0, 0)
    return h[:16] + struct.pack("!H", csum(pseudo(TCP, h) + h)) + h[18:]


def udp(pseudo, sport, dport, payload):
    h = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0)
    c = csum(pseudo(UDP, h + payload) + h + payload) or 0xFFFF
    return h[:6] + struct.pack("!H", c) + payload


def ip4(src, dst, proto, body, ident=None, frag=0):
    # One identification per sender process: each case is its own datagram.
    ident = os.getpid() & 0xFFFF if ident is None else ident
    h = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), ident, frag, 64, proto, 0,
                    socket.inet_aton(src), socket.inet_aton(dst))
    return h + body


def send4(dst, packets):
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    for p in packets:
        s.sendto(p, (dst, 0))
        time.sleep(0.01)


def fragments4(src, dst, proto, seg, size):
    """`seg` cut into `size`-byte fragments (size a multiple of 8)."""
    out = []
    for off in range(0, len(seg), size):
        more = 0x2000 if off + size < len(seg) else 0
        out.append(ip4(src, dst, proto, seg[off:off + size], frag=more | (off // 8)))
    return out


def ip6(src, dst, next_header, body, hop_limit=64):
    return struct.pack("!IHBB16s16s", 6 << 28, len(body), next_header, hop_limit,
                       socket.inet_pton(socket.AF_INET6, src),
                       socket.inet_pton(socket.AF_INET6, dst)) + body


def dest_opts_chain(n, last, body):
    """`n` destination-options headers (8 bytes each, PadN) before `body`."""
    for i in range(n):
        nxt = last if i == 0 else DSTOPTS
        body = struct.pack("!BBBB4x", nxt, 0, 1, 4) + body
    return body


def send6(dst, packets):
    s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
    for p in packets:
        s.sendto(p, (dst, 0))
        time.sleep(0.01)


def send(case, src, dst):
    p4 = lambda proto, seg: pseudo4(src, dst, proto, seg)
    p6 = lambda proto, seg: pseudo6(src, dst, proto, seg)
    payload = b"EXFILTRATED-DATA" * 4
    if case == "syn-in-8-byte-fragments":
        send4(dst, fragments4(src, dst, TCP, tcp_syn(p4, 40000, 5432), 8))
    elif case.startswith("udp-in-fragments:"):
        port = int(case.split(":")[1])
        send4(dst, fragments4(src, dst, UDP, udp(p4, 40001, port, payload), 16))
    elif case == "lone-later-fragment":
        seg = udp(p4, 40002, 5000, payload)
        send4(dst, [ip4(src, dst, UDP, seg[16:32], frag=0x2000 | 2)])
    elif case.startswith("udp-from:"):
        # A datagram to <dst>:5002 with the given source address.
        spoofed = case.split(":", 1)[1]
        seg = udp(lambda proto, seg: pseudo4(spoofed, dst, proto, seg), 40003, 5002, payload)
        send4(dst, [ip4(spoofed, dst, UDP, seg)])
    elif case.startswith("syn-behind-dest-opts:"):
        n, port = (int(x) for x in case.split(":")[1:3])
        body = dest_opts_chain(n, TCP, tcp_syn(p6, 40004, port))
        send6(dst, [ip6(src, dst, DSTOPTS, body)])
    elif case == "neighbour-solicitation-with-data":
        ns = struct.pack("!BBHI16s", 135, 0, 0, 0, socket.inet_pton(socket.AF_INET6, dst)) + payload
        ns = ns[:2] + struct.pack("!H", csum(p6(ICMPV6, ns) + ns)) + ns[4:]
        send6(dst, [ip6(src, dst, ICMPV6, ns, hop_limit=255)])
    else:
        sys.exit("unknown case " + case)


def sniff(seconds, sources):
    want = set()
    for a in sources:
        fam = socket.AF_INET6 if ":" in a else socket.AF_INET
        want.add(socket.inet_pton(fam, a))
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
    s.bind(("eth0", 0))
    s.settimeout(0.1)
    n, end = 0, time.time() + seconds
    while time.time() < end:
        try:
            f, addr = s.recvfrom(65535)
        except socket.timeout:
            continue
        if addr[2] == socket.PACKET_OUTGOING:
            continue
        et = struct.unpack("!H", f[12:14])[0]
        src = f[26:30] if et == 0x0800 else f[22:38] if et == 0x86DD else None
        if src in want:
            n += 1
    print(n)


if __name__ == "__main__":
    if sys.argv[1] == "send":
        send(*sys.argv[2:5])
    else:
        sniff(float(sys.argv[2]), sys.argv[3:])
