//! What the fuzz targets drive (`fuzz/`):
//! - `node_config`: the compiler of kernel tables, a JSON
//!   `NodeAgentConfigSpec` compiled for a node with fixed addresses, with
//!   what the kernel maps can hold asserted;
//! - `dns_message`: a DNS packet's copied payload through the parser and
//!   the query/answer tracker, as a hostile pod would send it.
//!
//! Built only under `cfg(fuzzing)` (cargo fuzz sets it) and in tests, which
//! run the checked-in corpora (`fuzz/corpus/<target>/`) through them.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use flowlens_agent_common::{
    DIRECTION_EGRESS, DIRECTION_INGRESS, ENDPOINT_POLICY_EGRESS, ENDPOINT_POLICY_INGRESS,
    MAX_ENDPOINT_ID, NO_CLASS,
};
use flowlens_api::NodeAgentConfigSpec;

use crate::tables::{
    self, MAX_SLOTS,
    services::{MAX_BACKEND_ENTRIES, MAX_FRONTEND_ENTRIES},
};

/// The node's own addresses (where NodePorts are translated).
pub const HOST_ADDRS: [IpAddr; 3] = [
    IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
    IpAddr::V4(Ipv4Addr::new(192, 168, 1, 10)),
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1)),
];

/// Capacities of the kernel maps (node-agent-ebpf/src/maps.rs), for the
/// tables the compiler does not bound itself.
const ENDPOINTS_MAX_ENTRIES: usize = 32768;

/// Small policy tables, so that leaving policies out is exercised too.
const POLICY_CAPACITY: tables::Capacity = tables::Capacity {
    peer_classes: 64,
    class_rules: 64,
    ports: 64,
};

/// Compiles one spec body. Panics when the tables break what the kernel
/// or the counters rely on.
pub fn node_config(body: &[u8]) {
    let Ok(spec) = serde_json::from_slice::<NodeAgentConfigSpec>(body) else {
        return;
    };
    let t = tables::compile(&spec, &HOST_ADDRS, POLICY_CAPACITY);

    // What fits in the maps: the compiler leaves policies out rather than
    // write more than a generation holds.
    assert!(t.endpoints.len() <= ENDPOINTS_MAX_ENTRIES);
    assert!(t.peer_classes.len() <= POLICY_CAPACITY.peer_classes);
    assert!(t.class_rules.len() <= POLICY_CAPACITY.class_rules);
    assert!(t.ports.len() <= POLICY_CAPACITY.ports);
    assert!(t.services.frontends.len() <= MAX_FRONTEND_ENTRIES);
    assert!(t.services.backends.len() <= MAX_BACKEND_ENTRIES);

    // Endpoint ids are unique and fit in rule keys.
    let ids: BTreeSet<u32> = t.endpoint_refs.iter().map(|e| e.id).collect();
    assert_eq!(ids.len(), t.endpoint_refs.len(), "endpoint ids are unique");
    assert!(ids.iter().all(|&id| id > 0 && id < MAX_ENDPOINT_ID));

    // Slots: at most 64 per endpoint and direction, each for a known endpoint.
    let mut slots: BTreeMap<(u32, u8), u64> = BTreeMap::new();
    for &(id, dir, slot) in t.slots.keys() {
        assert!(ids.contains(&id));
        assert!(dir == DIRECTION_EGRESS || dir == DIRECTION_INGRESS);
        assert!(usize::from(slot) < MAX_SLOTS, "slot {slot}");
        *slots.entry((id, dir)).or_default() |= 1 << slot;
    }
    // LPM entries and endpoint masks name only assigned slots.
    let assigned = |dir: u8, id: u32| slots.get(&(id, dir)).copied().unwrap_or(0);
    let classes: BTreeSet<u32> = t.peer_classes.iter().map(|&(_, c)| c).collect();
    for &(dir, id, class, mask) in &t.class_rules {
        assert_eq!(mask & !assigned(dir, id), 0, "class mask {mask:#x} of {id}");
        assert!(
            class != NO_CLASS && classes.contains(&class),
            "class {class}"
        );
    }
    for &(dir, id, _, mask) in &t.ports {
        assert_eq!(mask & !assigned(dir, id), 0, "port mask {mask:#x} of {id}");
    }
    for (_, e) in &t.endpoints {
        assert!(ids.contains(&e.id));
        for (flag, dir, rules) in [
            (ENDPOINT_POLICY_EGRESS, DIRECTION_EGRESS, e.egress),
            (ENDPOINT_POLICY_INGRESS, DIRECTION_INGRESS, e.ingress),
        ] {
            let a = assigned(dir, e.id);
            assert_eq!(e.flags & flag != 0, a != 0, "policy flag of {}", e.id);
            assert_eq!(rules.enforce_mask & !a, 0);
            assert_eq!(rules.any_port_mask & !a, 0);
        }
    }

    // Every frontend's backends are in the backend table.
    for (f, info) in &t.services.frontends {
        let end = u64::from(info.first) + u64::from(info.count);
        assert!(
            end <= t.services.backends.len() as u64,
            "frontend {f:?}: backends {}..{end} of {}",
            info.first,
            t.services.backends.len()
        );
        assert!(t.services.names.contains_key(&info.service_id));
    }
}

/// One DNS payload, read as the kernel copies it (cut at 512 bytes, UDP
/// and TCP), then as a query and as the answer to it. Panics when the
/// parser or the tracker breaks its bounds.
pub fn dns_message(payload: &[u8]) {
    use crate::dns::{
        message::parse,
        tracker::{DnsPacket, DnsTracker, Seen},
    };
    use flowlens_agent_common::DNS_CAPTURE_BYTES;

    let copied = &payload[..payload.len().min(DNS_CAPTURE_BYTES)];
    let mut tracker = DnsTracker::default();
    for tcp in [false, true] {
        let message = parse(copied, payload.len(), tcp);
        if let Ok(m) = &message {
            assert!(m.answers.len() <= 64, "answers unbounded");
            if let Some(q) = &m.qname {
                assert!(
                    flowlens_api::dns::check_name(q).is_ok(),
                    "{q:?} is no plain name"
                );
            }
            assert!(!m.cut || m.answers.is_empty(), "answers from a cut copy");
        }
        for (from_pod, ts) in [(true, 1_000), (false, 21_000)] {
            let p = DnsPacket {
                ts_ns: ts,
                local: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 5],
                remote: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 53],
                local_port: 4000,
                remote_port: 53,
                protocol: if tcp { 6 } else { 17 },
                from_pod,
                message: message.clone(),
            };
            if let Seen::Answer { latency_us, .. } = tracker.observe(&p, 0) {
                assert_eq!(latency_us, 20, "latency from the stamps");
            }
        }
    }
    let (names, pending) = tracker.sizes();
    assert!(names <= 64 && pending <= 2, "tracker state unbounded");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every input of the checked-in DNS corpus.
    #[test]
    fn the_dns_corpus_passes() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/dns_message");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            dns_message(&std::fs::read(e.unwrap().path()).unwrap());
            n += 1;
        }
        assert!(n > 0, "no corpus in {}", dir.display());
    }

    /// Every input of the checked-in corpus (seeds and the crashes found).
    #[test]
    fn the_corpus_passes() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/node_config");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            node_config(&std::fs::read(e.unwrap().path()).unwrap());
            n += 1;
        }
        assert!(n > 0, "no corpus in {}", dir.display());
    }
}
