//! Shared test harness for Flowlens' integration and end-to-end tests.
//!
//! - [`cluster`]: a client for the local control plane (`just up`), unique
//!   names, and cleanup that works without a controller-manager.
//! - [`topology`]: simulated nodes and pods (network namespaces, routed
//!   veths, per-pod cgroups) and a delay line between zones.
//! - [`agent`]: running a real `flowlens-agent` for a node and reading it back.
//! - [`argocd`]: Argo CD's health checks of the Flowlens kinds, run in Lua.
//! - [`fixtures`]: status reads and waits, and the two-node shop, shared by
//!   the end-to-end tests.
//! - [`kubectl`]: the real cluster (`just cluster`) as a user drives it.
//! - [`process`]: child processes that die with the test.
//! - [`prometheus`]: a real Prometheus scraping the operator and agents;
//!   [`otlp`]: a real OTLP/gRPC receiver for the operator's export;
//!   [`report_sink`]: a collector that commits every report (benchmarks).
//! - [`sim`]: a simulated cluster (nodes, agents in cluster mode, the
//!   operator), with `proxy` for the API server; [`traffic`]: iperf3 and
//!   `flowlens-traffic` runs.
//! - [`stats`]: medians and bootstrap intervals of benchmark rounds;
//!   [`resources`]: CPU and memory from /proc; [`tc_floor`]: the minimal TC
//!   program the datapath benchmark compares against.
//!
//! Binaries: `flowlens-delay-line` (the delay line) and `flowlens-traffic`
//! (echo server, ping-pong, connect loop, long-lived stream).

pub mod agent;
pub mod argocd;
pub mod cluster;
pub mod config;
pub mod fixtures;
pub mod kubectl;
pub mod live;
mod metrics;
pub mod objects;
pub mod operator;
pub mod otlp;
pub mod process;
pub mod prometheus;
mod proxy;
pub mod report_sink;
pub mod resources;
pub mod sim;
pub mod stats;
pub mod tc_floor;
pub mod topology;
pub mod traffic;
