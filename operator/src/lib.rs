//! The Flowlens operator.
//!
//! - [`model`]: the compiler's view of Pods, Nodes and Namespaces.
//! - [`compile`]: the pure, incremental compiler (cluster state ->
//!   per-node `NodeAgentConfig` specs).
//! - [`feed`]: watch events into the compiler; [`config_writer`]: configs out.
//! - [`policy_status`], [`observation_status`]: status controllers (pure
//!   status functions plus a kube-runtime `Controller` each).
//! - [`collect`] (pure) and [`collector`] (HTTP, [`auth`]): agents' reports
//!   into the books of open windows; [`finalize`]: final windows merged.
//! - [`results`]: final windows on their way to status;
//!   [`result_metrics`]: the same windows as Prometheus series, which
//!   [`otlp`] also pushes over OpenTelemetry.
//! - `fuzz` (only under `cfg(fuzzing)` and in tests): the report path as
//!   the fuzz target drives it (`fuzz/`).

pub mod address_set_writer;
pub mod auth;
pub mod collect;
pub mod collector;
pub mod collector_tls;
pub mod compile;
pub mod config_writer;
pub mod context;
pub mod error;
pub mod feed;
pub mod finalize;
#[cfg(any(test, fuzzing))]
pub mod fuzz;
pub mod http;
pub mod leader;
pub mod live;
pub mod metrics;
pub mod model;
pub mod observation_status;
pub mod otlp;
pub mod policy_status;
pub mod result_metrics;
pub mod results;
pub mod status_apply;
