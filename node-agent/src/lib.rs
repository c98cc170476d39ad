//! The Flowlens node agent: loads the eBPF datapath, applies the node's
//! `NodeAgentConfig`, drains kernel counters into windows and reports them.
//!
//! Pure logic (no I/O) lives in `tables` (config -> kernel tables) and
//! `aggregate` (kernel records -> windows); the kernel is touched only in
//! [`datapath`]; the rest wires them to the API server, files and HTTP.
//! `fuzz` (only under `cfg(fuzzing)` and in tests) drives `tables` as the
//! fuzz target does (`fuzz/`); `bench` drives `address_sets` and `tables`
//! for `benches/join.rs`.

pub mod address_sets;
mod aggregate;
pub mod allocator;
pub mod bench;
pub mod cgroups;
pub mod config_source;
pub mod control;
pub mod datapath;
mod dns;
pub mod dump;
#[cfg(any(test, fuzzing))]
pub mod fuzz;
pub mod http;
mod in_force;
mod interfaces;
pub mod metrics;
pub mod report;
pub mod spool;
pub mod state;
pub mod status;
mod tables;
