//! The I/O shell of DNS: empties the kernel's DNS ring buffer and parses
//! every copy. The control loop calls it every 200 ms and before each
//! drain (so an answer is known before the connection it led to); the
//! kernel never wakes anyone (a wakeup per packet cost microseconds in the
//! packet's path), and a read takes what is there, in one batch.

use aya::maps::{MapData, RingBuf};
use flowlens_agent_common::{DIRECTION_EGRESS, DNS_CAPTURE_BYTES, DnsEvent, PROTO_TCP};

use super::{message, tracker::DnsPacket};

/// Records read per call at most (the rest wait for the next call).
pub(crate) const MAX_READ: usize = 65_536;

/// Reads every record the ring holds (up to [`MAX_READ`]) into `out`.
pub(crate) fn read(ring: &mut RingBuf<MapData>, out: &mut Vec<DnsPacket>) {
    for _ in 0..MAX_READ {
        let Some(item) = ring.next() else { break };
        if let Some(p) = packet(&item) {
            out.push(p);
        }
    }
}

/// One ring record as a packet (its message parsed); `None` for a record
/// of the wrong size (never written by this object's programs).
fn packet(record: &[u8]) -> Option<DnsPacket> {
    if record.len() < std::mem::size_of::<DnsEvent>() {
        return None;
    }
    // SAFETY: DnsEvent is plain old data of exactly this size, any bit
    // pattern valid; read unaligned from the ring's bytes.
    let ev: DnsEvent = unsafe { std::ptr::read_unaligned(record.as_ptr().cast()) };
    let captured = usize::from(ev.captured).min(DNS_CAPTURE_BYTES);
    let message = message::parse(
        &ev.payload[..captured],
        ev.payload_len as usize,
        ev.protocol == PROTO_TCP,
    );
    Some(DnsPacket {
        ts_ns: ev.ts_ns,
        local: ev.local_addr,
        remote: ev.remote_addr,
        local_port: ev.local_port,
        remote_port: ev.remote_port,
        protocol: ev.protocol,
        from_pod: ev.direction == DIRECTION_EGRESS,
        message,
    })
}
