//! The Flowlens node agent: loads the eBPF datapath, applies the node's
//! `NodeAgentConfig`, drains kernel counters into windows and reports them.
//!
//! Pure logic (no I/O) lives in `tables` (config -> kernel tables) and
//! `aggregate` (kernel records -> windows); the kernel is touched only in
//! [`datapath`]; the rest wires them to the API server, files and HTTP.

mod aggregate;
pub mod cgroups;
pub mod config_source;
pub mod control;
pub mod datapath;
pub mod dump;
pub mod http;
mod interfaces;
pub mod metrics;
pub mod report;
pub mod state;
pub mod status;
mod tables;
