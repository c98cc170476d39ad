//! The compiler of kernel tables as the fuzz target `node_config` (`fuzz/`)
//! drives it: a JSON `NodeAgentConfigSpec` compiled for a node with fixed
//! addresses, with what the kernel maps can hold asserted.
//!
//! Built only under `cfg(fuzzing)` (cargo fuzz sets it) and in tests, which
//! run the checked-in corpus (`fuzz/corpus/node_config/`) through it.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use flowlens_agent_common::{
    DIRECTION_EGRESS, DIRECTION_INGRESS, ENDPOINT_POLICY_EGRESS, ENDPOINT_POLICY_INGRESS,
    MAX_ENDPOINT_ID,
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
const PEERS_MAX_ENTRIES: usize = 524288;
const PORTS_MAX_ENTRIES: usize = 131072;

/// Compiles one spec body. Panics when the tables break what the kernel
/// or the counters rely on.
pub fn node_config(body: &[u8]) {
    let Ok(spec) = serde_json::from_slice::<NodeAgentConfigSpec>(body) else {
        return;
    };
    let t = tables::compile(&spec, &HOST_ADDRS);

    // What fits in the maps.
    assert!(t.endpoints.len() <= ENDPOINTS_MAX_ENTRIES);
    assert!(t.peers.len() <= PEERS_MAX_ENTRIES);
    assert!(t.ports.len() <= PORTS_MAX_ENTRIES);
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
    for &(dir, id, _, mask) in &t.peers {
        assert_eq!(mask & !assigned(dir, id), 0, "peer mask {mask:#x} of {id}");
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

#[cfg(test)]
mod tests {
    use super::*;

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
