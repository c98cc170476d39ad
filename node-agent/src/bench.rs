//! What the agent's benchmarks (`benches/`) drive: the work a node does
//! when a config or a slice of its address sets changes.

use flowlens_api::NodeAgentConfigSpec;

use crate::{
    address_sets::{ReadSlice, join},
    tables::{self, Capacity},
};

/// Capacities of the policy tables as the agent creates them by default
/// (node-agent-ebpf/src/maps.rs).
const DEFAULT_CAPACITY: (u32, u32, u32) = (524_288, 524_288, 131_072);

/// Joins `spec` with `slices` and compiles the kernel tables, as the agent
/// does on every change of either; returns the entries of the policy
/// tables and the problems found (a benchmark asserts there are none).
pub fn join_and_compile(spec: &NodeAgentConfigSpec, slices: &[ReadSlice]) -> (usize, usize) {
    let joined = join(spec, slices).expect("every set has a usable slice");
    let (p, c, ports) = DEFAULT_CAPACITY;
    let t = tables::compile(&joined, &[], Capacity::per_generation(p, c, ports));
    (t.policy_entries(), t.problems.len())
}
