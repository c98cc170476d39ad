//! Every map of the datapath. All are pinned by name under the agent's pin
//! root, so counters, configuration and enforcement survive the agent.
//!
//! Result maps (flows, overflow, RTT, rule counters, named attempts) sit behind a one-slot array of maps:
//! the agent swaps an empty map in, the kernel waits for running programs
//! (`synchronize_rcu` on every map-in-map update), then the agent drains the
//! old map with no concurrent writer. Nothing is lost or counted twice.
//!
//! Configuration maps (endpoints, rule LPM tries) are keyed by a one-bit
//! generation: the agent writes the inactive generation, then bumps
//! `FL_CONFIG.epoch` (whose bit 0 is the generation) with one array update.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{Array, ArrayOfMaps, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, SkStorage},
    macros::btf_map,
};
use flowlens_agent_common::{
    AttemptKey, AttemptStats, BackendKey, ClassRuleKey, ConnKey, ConnState, DatapathConfig,
    DnsBudget, DnsEvent, ENDPOINT_TRACE, EndpointInfo, EndpointKey, FlowKey, FlowStats, FragKey,
    FragPorts, NUM_COUNTERS, NUM_DROP_REASONS, NUM_SUSPECT, OverflowKey, PeerKey, PodAddrs,
    PodInterface, PortKey, RttKey, RuleCounterKey, RuleCounters, ServiceBackendAddr,
    ServiceConnKey, ServiceInfo, ServiceKey, ServiceSocket, SkbLayout,
};

/// Capacity of the flow-table template; the agent creates the real tables
/// (same type, key and value) with its own `--flow-table-size`.
pub const FLOW_TABLE_TEMPLATE: usize = 65536;
pub const RTT_TABLE_TEMPLATE: usize = 65536;
pub const OVERFLOW_TABLE_TEMPLATE: usize = 8192;
pub const RULE_COUNTER_TEMPLATE: usize = 8192;
pub const ATTEMPT_TABLE_TEMPLATE: usize = 4096;

#[btf_map]
pub static FL_CONFIG: Array<DatapathConfig, 1> = Array::new();

#[btf_map]
pub static FL_ENDPOINTS: HashMap<EndpointKey, EndpointInfo, 32768> = HashMap::new();

/// Peer prefix -> peer class (shared by every endpoint and rule), by
/// generation.
#[btf_map]
pub static FL_PEER_CLASSES: LpmTrie<PeerKey, u32, 524288> = LpmTrie::new();

/// (endpoint and direction, peer class) -> the rule slots that match.
/// Not preallocated: most nodes use a small part of it.
#[btf_map]
pub static FL_CLASS_RULES: HashMap<ClassRuleKey, u64, 524288, { BPF_F_NO_PREALLOC as usize }> =
    HashMap::new();

#[btf_map]
pub static FL_PORTS: LpmTrie<PortKey, u64, 131072> = LpmTrie::new();

#[btf_map]
pub static FL_CONNS: LruHashMap<ConnKey, ConnState, 262144> = LruHashMap::new();

#[btf_map]
pub static FL_CGROUPS: HashMap<u64, PodAddrs, 16384> = HashMap::new();

/// A pod interface (host-side ifindex) -> the addresses its pod owns: a
/// packet from the pod with another source is spoofed. Written by the agent
/// as it attaches, independent of the config generation.
#[btf_map]
pub static FL_IFACES: HashMap<u32, PodInterface, 16384> = HashMap::new();

/// Service frontends (ClusterIPs, node ports, ...) by generation.
#[btf_map]
pub static FL_SERVICES: HashMap<ServiceKey, ServiceInfo, 65536> = HashMap::new();

/// Service backends by generation and index.
#[btf_map]
pub static FL_SVC_BACKENDS: HashMap<BackendKey, ServiceBackendAddr, 262144> = HashMap::new();

/// Connections translated at `connect()` -> the Service's id, read by the
/// agent to name the Service of a flow.
#[btf_map]
pub static FL_SVC_CONNS: LruHashMap<ServiceConnKey, u64, 65536> = LruHashMap::new();

/// Socket cookie -> the frontend it connected to (for `getpeername()`).
#[btf_map]
pub static FL_SVC_SOCKS: LruHashMap<u64, ServiceSocket, 65536> = LruHashMap::new();

#[btf_map]
pub static FL_COUNTERS: PerCpuArray<u64, { NUM_COUNTERS as usize }> = PerCpuArray::new();

/// Suspect packets of attached pods, by `SUSPECT_*` reason.
#[btf_map]
pub static FL_SUSPECT: PerCpuArray<u64, { NUM_SUSPECT as usize }> = PerCpuArray::new();

/// The ports of fragmented datagrams, from their first fragment, so that
/// later fragments meet the same rules and count under the same flow.
#[btf_map]
pub static FL_FRAGS: LruHashMap<FragKey, FragPorts, 8192> = LruHashMap::new();

/// Kernel drops of traced endpoints by drop reason (`enum skb_drop_reason`).
#[btf_map]
pub static FL_DROP_REASONS: PerCpuArray<u64, { NUM_DROP_REASONS as usize }> = PerCpuArray::new();

/// `struct sk_buff` offsets for the drop hook, written by the agent.
#[btf_map]
pub static FL_SKB_LAYOUT: Array<SkbLayout, 1> = Array::new();

/// Socket cookie -> time of its last RTT sample (rate limit per socket),
/// for the `tcp_probe` fallback, which has no socket to store it in.
#[btf_map]
pub static FL_RTT_LAST: LruHashMap<u64, u64, 65536> = LruHashMap::new();

/// Time of a socket's last RTT sample, stored in the socket itself (no
/// table to fill or evict): the `sock_ops` rate limit.
#[btf_map]
pub static FL_RTT_SOCK: SkStorage<u64> = SkStorage::new();

/// One new flow entry per CPU, built here before its insert (see
/// `flow::new_entry`).
#[btf_map]
pub static FL_FLOW_SCRATCH: PerCpuArray<FlowStats, 1> = PerCpuArray::new();

/// DNS packets of traced pods, copied for the agent to parse (4 MiB:
/// about 7,300 messages; the agent reads it every 200 ms).
#[btf_map]
pub static FL_DNS_EVENTS: RingBuf<DnsEvent, { 4 << 20 }> = RingBuf::new();

/// The DNS copy's per-CPU budget and counters.
#[btf_map]
pub static FL_DNS_BUDGET: PerCpuArray<DnsBudget, 1> = PerCpuArray::new();

#[btf_map]
pub static FL_FLOWS: ArrayOfMaps<HashMap<FlowKey, FlowStats, FLOW_TABLE_TEMPLATE>, 1> =
    ArrayOfMaps::new();

#[btf_map]
pub static FL_OVERFLOW: ArrayOfMaps<HashMap<OverflowKey, FlowStats, OVERFLOW_TABLE_TEMPLATE>, 1> =
    ArrayOfMaps::new();

#[btf_map]
pub static FL_RULE_CNT: ArrayOfMaps<
    HashMap<RuleCounterKey, RuleCounters, RULE_COUNTER_TEMPLATE>,
    1,
> = ArrayOfMaps::new();

/// Blocked and audited attempts by peer and port (bounded: a full table
/// drops the name, never the count in `FL_RULE_CNT`).
#[btf_map]
pub static FL_ATTEMPTS: ArrayOfMaps<HashMap<AttemptKey, AttemptStats, ATTEMPT_TABLE_TEMPLATE>, 1> =
    ArrayOfMaps::new();

#[btf_map]
pub static FL_RTT: ArrayOfMaps<HashMap<RttKey, u64, RTT_TABLE_TEMPLATE>, 1> = ArrayOfMaps::new();

/// Adds one to a global counter.
#[inline(always)]
pub fn bump(counter: u32) {
    if let Some(p) = FL_COUNTERS.get_ptr_mut(counter) {
        // Per-CPU slot: no other writer.
        unsafe { *p += 1 };
    }
}

/// Adds one to a `SUSPECT_*` counter.
#[inline(always)]
pub fn suspect(reason: u32) {
    if let Some(p) = FL_SUSPECT.get_ptr_mut(reason) {
        unsafe { *p += 1 };
    }
}

/// The table generation of a config epoch.
#[inline(always)]
pub fn generation(epoch: u32) -> u32 {
    epoch & 1
}

/// Whether `addr` is an endpoint traced in table generation `generation`.
#[inline(always)]
pub fn is_traced(generation: u32, addr: &[u8; 16]) -> bool {
    matches!(
        unsafe { FL_ENDPOINTS.get(&EndpointKey { generation, addr: *addr }) },
        Some(ep) if ep.flags & ENDPOINT_TRACE != 0
    )
}

/// The active configuration epoch and settings.
#[inline(always)]
pub fn config() -> Option<&'static DatapathConfig> {
    FL_CONFIG.get(0)
}
